"""Dead letters: in skip mode every rejected record is kept with its batch, byte for byte, in the same transaction;
?max_errors=N fails the request at the (N+1)-th; a failed request keeps nothing; the batch and its rejected records
are read back over HTTP (GET /batches/{id}, /rejected, ?format=raw) and the fixed lines resend."""
import base64
import json
import subprocess
import time

import pytest

import helpers

MAX_RECORD = 100_000  # --max-record-bytes of these tests


def png(n, seed):
    return helpers.png_bytes(n, seed)


def good(i, tag="dl"):
    return helpers.record_line(f"{tag} {i}", f"{tag}-{i}@example.com", png(2000, f"{tag}-{i}"))


# one bad line of each kind: (line bytes, field or None, a word of the error, truncated)
OVERSIZE = b'{"name":"big","email":"big@example.com","image":"' + b"A" * (MAX_RECORD + 5000) + b'"}'
BAD = [
    (b'{"name": "broken", "email": "broken@example.com"', None, "", False),                     # malformed JSON
    (b'{"name": "\xff\xfeoops", "email": "u@example.com"}', None, "", False),                 # invalid UTF-8
    (b'{"name": "no email", "image": "' + base64.b64encode(png(3000, "ne")) + b'"}', "email", "email", False),
    (helpers.record_line("bad b64", "b64@example.com", "iVBO!!!!not base64"), "image", "", False),
    (OVERSIZE, None, "max-record-bytes", True),                                                # oversize
    (b'{"name": "nul \\u0000 inside", "email": "nul@example.com"}', "name", "", False),       # NUL escape
]


def mixed_body():
    """good, bad, good, bad, ... with CRLF on one bad line: returns (body, {line: (bytes, field, word, trunc)})."""
    lines, bad_at = [], {}
    for i, b in enumerate(BAD):
        lines.append(good(i))
        lines.append(b[0])
        bad_at[len(lines)] = b
    lines.append(good(99))
    body = b""
    for n, line in enumerate(lines, 1):
        body += line + (b"\r\n" if n == 2 else b"\n")
    return body, bad_at, len(lines)


def dead_letters(db, batch_id):
    out = db.sql("SELECT coalesce(json_agg(json_build_object('line', line, 'error', error, 'field', field, "
                 "'record', encode(record, 'base64'), 'truncated', truncated) ORDER BY line), '[]') "
                 f"FROM rejected_records WHERE batch_id = {int(batch_id)}")
    rows = json.loads(out)
    for r in rows:
        r["record"] = base64.b64decode(r["record"].replace("\n", ""))
    return rows


def post(srv, body, query="on_error=skip", headers=()):
    c = helpers.HTTPConn(srv.host, srv.port, timeout=60)
    try:
        c.send(helpers.post_head(f"/users?{query}", length=len(body), extra=headers) + body)
        return c.read_response()
    finally:
        c.close()


def get(srv, path):
    c = helpers.HTTPConn(srv.host, srv.port, timeout=60)
    try:
        c.send(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        return c.read_response()
    finally:
        c.close()


@pytest.fixture
def srv(start_server):
    return start_server(args=["--max-record-bytes", str(MAX_RECORD)])


def test_every_kind_of_rejected_line_is_kept_byte_for_byte(srv, db):
    body, bad_at, nlines = mixed_body()
    r = post(srv, body)
    assert r.status == 200, r
    a = r.json()
    assert (a["inserted"], a["skipped"], a["lines"]) == (len(BAD) + 1, len(BAD), nlines), a
    assert a["rejected_url"] == f"/batches/{a['batch_id']}/rejected"
    rows = dead_letters(db, a["batch_id"])
    assert [x["line"] for x in rows] == sorted(bad_at), rows
    reported = {e["line"]: e for e in a["errors"]}
    for row in rows:
        line, field, word, truncated = bad_at[row["line"]]
        assert row["truncated"] is truncated, row
        if truncated:
            assert row["record"] == line[:64 * 1024], "a truncated dead letter is the line's first 64 KiB"
        else:
            assert row["record"] == line, (row["line"], row["record"][:80], line[:80])
        assert row["field"] == field, row
        assert word in row["error"] and row["error"] == reported[row["line"]]["error"], (row, reported)
    # the batch's counts are kept with it
    assert db.sql(f"SELECT concat_ws(',', inserted, skipped, lines, bytes) FROM batches "
                  f"WHERE batch_id = {a['batch_id']}") == f"{len(BAD) + 1},{len(BAD)},{nlines},{len(body)}"


def test_an_upload_without_rejected_lines_has_no_rejected_url(srv, db):
    r = post(srv, good(1) + b"\n" + good(2) + b"\n")
    assert r.status == 200 and r.json()["rejected_url"] is None and r.json()["skipped"] == 0, r
    assert db.sql("SELECT count(*) FROM rejected_records") == "0"
    r = post(srv, good(3) + b"\n", query="")
    assert r.status == 200 and r.json()["rejected_url"] is None, r


@pytest.mark.parametrize("n", [0, 2, 5])
def test_max_errors_at_the_boundary(srv, db, n):
    bad = [b[0] for b in BAD[:5]]  # five rejected lines, at lines 2, 4, 6, 8, 10
    lines = []
    for i, b in enumerate(bad):
        lines += [good(i, f"mx{n}"), b]
    body = b"\n".join(lines) + b"\n"
    r = post(srv, body, query=f"max_errors={n}")
    if n >= 5:
        assert r.status == 200 and r.json()["skipped"] == 5, r
        assert db.sql("SELECT count(*) FROM rejected_records") == "5"
        return
    assert r.status == 422, r
    assert r.json()["line"] == 2 * (n + 1), r.json()
    assert f"max_errors={n}" in r.json()["error"]
    assert db.count_users() == 0
    assert db.sql("SELECT count(*) FROM batches") == "0"
    assert db.sql("SELECT count(*) FROM rejected_records") == "0"


def test_max_errors_rules(srv, db):
    body = good(1) + b"\n" + BAD[0][0] + b"\n"
    assert post(srv, body, query="max_errors=1").status == 200
    assert post(srv, body, query="max_errors=1&on_error=skip").status == 200
    for q in ("max_errors=", "max_errors=-1", "max_errors=1x", "max_errors=+1", "max_errors=1234567890123456789",
              "max_errors=1&on_error=fail"):
        r = post(srv, body, query=q)
        assert r.status == 400 and "max_errors" in r.json()["error"], (q, r)


def test_a_failing_request_keeps_no_batch_and_no_dead_letters(srv, db):
    # default mode: the first bad line fails the request
    r = post(srv, good(1) + b"\n" + BAD[0][0] + b"\n", query="")
    assert r.status == 400, r
    # skip mode, but the request fails later (a line that is no record at all: the body ends inside a string)
    r = post(srv, good(2) + b"\n" + BAD[2][0] + b"\n" + b'{"name": "x", "email": "e@example.com", "image": 5}\n'
             + b"\x00" * 10, query="max_errors=1")
    assert r.status in (400, 422), r
    assert db.count_users() == 0
    assert db.sql("SELECT count(*) FROM batches") == "0"
    assert db.sql("SELECT count(*) FROM rejected_records") == "0"


def test_kill_9_mid_skip_mode_upload_leaves_nothing_after_gc(start_server, db, images_dir):
    srv = start_server(images_dir=images_dir, args=["--max-record-bytes", str(MAX_RECORD)])
    lines = []
    for i in range(40):
        lines += [good(i, "kill"), BAD[i % len(BAD)][0]]
    body = b"\n".join(lines) + b"\n"
    c = helpers.HTTPConn(srv.host, srv.port, timeout=30)
    try:
        c.send(helpers.post_head("/users?on_error=skip", length=len(body)) + body[:len(body) // 2])
        assert helpers.wait_for(lambda: len(helpers.image_files(images_dir)) >= 3, timeout=10)
        srv.proc.kill()
        srv.proc.wait(5)
    finally:
        c.close()
    r = subprocess.run([helpers.BINARY, "gc", "--db", db.url, "--images-dir", images_dir],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert helpers.all_files(images_dir) == [], helpers.all_files(images_dir)[:10]
    assert db.count_users() == 0
    assert db.sql("SELECT count(*) FROM rejected_records") == "0"


def test_replay_of_an_idempotent_skip_mode_upload_returns_the_rejected_url(srv, db):
    body, _, _ = mixed_body()
    hdr = ("Idempotency-Key: dead-letters-1",)
    first = post(srv, body, headers=hdr)
    assert first.status == 200, first
    again = post(srv, body, headers=hdr)
    assert again.status == 200 and again.body == first.body
    assert again.json()["rejected_url"] == f"/batches/{first.json()['batch_id']}/rejected"
    assert db.sql("SELECT count(*) FROM batches") == "1"


def test_rejected_records_are_counted_in_metrics(srv, db):
    def count():
        text = get(srv, "/metrics").body.decode()
        return int(next(line.split()[1] for line in text.splitlines()
                        if line.startswith("jsonl_ingest_rejected_records_total")))
    before = count()
    body, bad_at, _ = mixed_body()
    assert post(srv, body).status == 200
    assert count() == before + len(bad_at)
    assert post(srv, body, query="").status == 400  # a failed request counts nothing
    assert count() == before + len(bad_at)


def test_array_mode_keeps_rejected_elements_as_sent(srv, db):
    elements = [b'{"name":"a","email":"a@example.com"}', b'{"name":"b", "x":[1,{"y":"]}"}]}', b"5",
                b'"str\\"]"', b'{"name":"c","email":"c@example.com"}',
                b'{"name":"d","email":"d@example.com","image":"!!"}']
    body = b"[ " + b" ,\n ".join(elements) + b"\n]"
    c = helpers.HTTPConn(srv.host, srv.port, timeout=60)
    try:
        c.send(helpers.post_head("/users?on_error=skip", length=len(body), content_type="application/json") + body)
        r = c.read_response()
    finally:
        c.close()
    assert r.status == 200 and r.json()["skipped"] == 4, r
    rows = dead_letters(db, r.json()["batch_id"])
    assert [(x["line"], x["record"]) for x in rows] == [(i + 1, elements[i]) for i in (1, 2, 3, 5)], rows
    assert [x["field"] for x in rows] == ["email", None, None, "image"]


def stream_get_sha256(srv, path):
    """GET path; returns (status, sha256 of the body, body bytes), reading the body in pieces."""
    import hashlib
    import http.client
    c = http.client.HTTPConnection(srv.host, srv.port, timeout=300)
    try:
        c.request("GET", path, headers={"Host": "localhost"})
        r = c.getresponse()
        h, n = hashlib.sha256(), 0
        while True:
            b = r.read(1 << 20)
            if not b:
                break
            h.update(b)
            n += len(b)
        return r.status, h.hexdigest(), n
    finally:
        c.close()


@pytest.mark.memory
@pytest.mark.timeout(600)
def test_200mb_of_rejected_lines_bounded_memory_and_all_read_back(start_server, db, tmp_path, figures):
    """Nothing but rejected lines, big (spilled past 64 KiB) and small: peak RSS stays under 64 MiB, and the raw
    read-back is the body itself, byte for byte."""
    import hashlib
    srv = start_server(fsync="off")
    big = b'{"name":"big","email":"b@example.com","image":"' + b"QUFB" * 30_000 + b'!"}'   # bad base64, ~120 KB
    small = b'{"name":"small","email":' + b'"x' * 40 + b"}"                                 # malformed, ~100 B
    path = tmp_path / "rejected.jsonl"
    h, lines = hashlib.sha256(), 0
    with open(path, "wb") as f:
        while f.tell() < 200_000_000:
            block = (big + b"\n") + (small + b"\n") * 200
            f.write(block)
            h.update(block)
            lines += 201
    size = path.stat().st_size
    idle = srv.status_kib("VmRSS")
    up = helpers.stream_upload(srv.host, srv.port, "/users?on_error=skip", str(path), timeout=500)
    hwm = srv.status_kib("VmHWM")
    r = up["response"]
    assert r.status == 200, r
    a = r.json()
    assert (a["inserted"], a["skipped"], a["lines"]) == (0, lines, lines), a
    secs = up["t_response"] - up["t_start"]
    assert hwm / 1024 < 64, f"peak RSS {hwm / 1024:.1f} MiB"
    status, digest, n = stream_get_sha256(srv, f"/batches/{a['batch_id']}/rejected?format=raw")
    hwm_read = srv.status_kib("VmHWM")
    assert status == 200 and n == size and digest == h.hexdigest(), (status, n, size)
    assert hwm_read / 1024 < 64, f"peak RSS after the read-back {hwm_read / 1024:.1f} MiB"
    figures(f"dead letters: {size / 1e6:.0f} MB of rejected lines ({lines} lines), skip mode: "
            f"{size / 1e6 / secs:.1f} MB/s, peak RSS {hwm / 1024:.1f} MiB (idle {idle / 1024:.1f} MiB); "
            f"raw read-back byte-identical, peak RSS then {hwm_read / 1024:.1f} MiB")


def test_round_trip_batch_dead_letters_raw_and_resend(srv, db):
    """The answer, GET /batches/{id}, the JSON dead letters field by field, the raw form byte for byte; the raw
    lines, fixed, resend and commit."""
    body, bad_at, nlines = mixed_body()
    a = post(srv, body).json()
    bid = a["batch_id"]
    b = get(srv, f"/batches/{bid}")
    assert b.status == 200, b
    bj = b.json()
    for k in ("inserted", "skipped", "lines", "images", "bytes"):
        assert bj[k] == a[k], (k, bj, a)
    assert bj["batch_id"] == bid and bj["rejected_url"] == a["rejected_url"] and bj["idempotency_key"] is None
    assert bj["created_at"]

    r = get(srv, a["rejected_url"])
    assert r.status == 200 and r.headers["content-type"].startswith("application/x-ndjson"), r
    got = [json.loads(x) for x in r.body.decode().splitlines()]
    assert [x["line"] for x in got] == sorted(bad_at)
    for x in got:
        line, field, word, truncated = bad_at[x["line"]]
        kept = line[:64 * 1024] if truncated else line
        assert x["truncated"] is truncated and x["field"] == field and word in x["error"], x
        try:
            text = kept.decode("utf-8")
        except UnicodeDecodeError:
            assert x["record"] is None and base64.b64decode(x["record_base64"]) == kept, x
        else:
            assert x["record"] == text and "record_base64" not in x, x

    raw = get(srv, a["rejected_url"] + "?format=raw")
    assert raw.status == 200, raw
    want = b"".join(bad_at[n][0] + b"\n" for n in sorted(bad_at) if not bad_at[n][3])
    assert raw.body == want

    # fix: a producer that repairs each rejected line by replacing it with a good record; resend just them
    fixed = b"".join(good(1000 + i, "fixed") + b"\n" for i, _ in enumerate(raw.body.splitlines()))
    again = post(srv, fixed)
    assert again.status == 200 and again.json()["inserted"] == len(raw.body.splitlines()), again
    assert again.json()["rejected_url"] is None


def test_array_mode_element_texts_across_vertical_tabs(srv, db):
    """yajl skips \\v and \\f between tokens: the kept element is still exactly the element."""
    bad = b'{"name":"v","x":1}'
    body = b"[\v" + bad + b"\f,\v" + b'{"name":"ok","email":"ok@example.com"}' + b"\v]"
    c = helpers.HTTPConn(srv.host, srv.port, timeout=60)
    try:
        c.send(helpers.post_head("/users?on_error=skip", length=len(body), content_type="application/json") + body)
        r = c.read_response()
    finally:
        c.close()
    assert r.status == 200 and r.json()["skipped"] == 1 and r.json()["inserted"] == 1, r
    assert [(x["line"], x["record"]) for x in dead_letters(db, r.json()["batch_id"])] == [(1, bad)]
