"""The read side of the batches (docs/api.md): GET /batches/{id}, GET /batches and a batch's dead letters,
GET /batches/{id}/rejected (JSON Lines, and ?format=raw byte for byte), against the real binary and a real
PostgreSQL. Batches and rejected records are written with SQL, as an ingest in skip mode leaves them."""
import base64
import hashlib
import http.client
import json
import re
import socket
import time

import pytest

import helpers

CREATED_AT_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
BATCH_KEYS = ["batch_id", "created_at", "inserted", "skipped", "lines", "images", "bytes", "idempotency_key",
              "rejected_url"]
PAGE_ROWS = 1000  # JI_EXPORT_PAGE_ROWS: /batches pages like the users export
REJECTED_PAGE_ROWS = 256  # JI_REJECTED_PAGE_ROWS
REJECTED_PAGE_BYTES = 1 << 20  # JI_REJECTED_PAGE_BYTES
BAD_NUMBERS = ("x", "-1", "+1", "1.5", "1e3", "9223372036854775808", "99999999999999999999", "%201", "1%20", "0x1")


def get(srv, path, tmp_path, extra=()):
    return helpers.curl(list(extra) + [srv.base + path], tmp_path, max_time=120)


def assert_json_error(res, status):
    assert res.status == status, res
    assert res.headers.get("content-type", "").startswith("application/json"), res.headers
    j = res.json()
    assert isinstance(j.get("error"), str) and j["error"], j
    return j


def ndjson(res):
    assert res.status == 200, res
    assert res.rc == 0, res  # a whole chunked answer (curl fails on a cut one)
    assert res.headers.get("content-type") == "application/x-ndjson", res.headers
    text = res.body.decode("utf-8")
    assert text == "" or text.endswith("\n"), text[-200:]
    return [json.loads(l) for l in text.splitlines()]


def head(srv, path):
    """HEAD on a keep-alive connection, then GET /healthz on it: the HEAD answer must have carried no body."""
    c = helpers.HTTPConn(srv.host, srv.port)
    try:
        c.send(f"HEAD {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        r = c.read_response(head_only=True)
        c.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        after = c.read_response()
        assert after.status == 200 and after.json() == {"status": "ok"}, f"HEAD {path} sent a body: {after!r}"
        return r
    finally:
        c.close()


def sql_bytes(b):
    return f"'\\x{b.hex()}'::bytea"


def sql_text(s):
    return "'" + s.replace("'", "''") + "'" if s is not None else "NULL"


def add_batch(db, key, idempotency_key=None, counts=(None,) * 5):
    """A batch row as an ingest leaves it; returns its batch_id."""
    vals = ", ".join("NULL" if c is None else str(int(c)) for c in counts)
    return int(db.sql("INSERT INTO batches (batch_key, idempotency_key, inserted, skipped, lines, images, bytes) "
                      f"VALUES ({sql_text(key)}, {sql_text(idempotency_key)}, {vals}) RETURNING batch_id"))


def add_rejected(db, batch_id, line, error, field, record, truncated=False):
    db.sql("INSERT INTO rejected_records (batch_id, line, error, field, record, truncated) VALUES "
           f"({batch_id}, {line}, {sql_text(error)}, {sql_text(field)}, {sql_bytes(record)}, "
           f"{'true' if truncated else 'false'})")


def batch_created_at(db, batch_id):
    return db.sql("SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM batches "
                  f"WHERE batch_id = {batch_id}")


def check_rejected_object(obj, line, error, field, record, truncated):
    """One line of /rejected against the row: every key, the record as text or as base64."""
    try:
        text = record.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        assert list(obj) == ["line", "error", "field", "record", "truncated"], obj.keys()
        assert obj["record"] == text, (line, obj["record"][:200])
    else:
        assert list(obj) == ["line", "error", "field", "record", "record_base64", "truncated"], obj.keys()
        assert obj["record"] is None
        assert obj["record_base64"] == base64.b64encode(record).decode(), line
    assert obj["line"] == line and isinstance(obj["line"], int)
    assert obj["error"] == error and obj["field"] == field, obj
    assert obj["truncated"] is truncated, obj


# ------------------------------------------------------------------ GET /batches/{id}
def test_get_batch_has_every_field(server, db, tmp_path):
    b1 = add_batch(db, "k1", 'key "one"\\', (7, 3, 10, 2, 4096))
    b2 = add_batch(db, "k2", None, (5, 0, 5, 0, 300))
    b3 = add_batch(db, "k3")  # a batch from before the counts were kept: NULL counts
    r = get(server, f"/batches/{b1}", tmp_path)
    assert r.status == 200, r
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    j = r.json()
    assert list(j) == BATCH_KEYS, j
    assert j == {"batch_id": b1, "created_at": batch_created_at(db, b1), "inserted": 7, "skipped": 3, "lines": 10,
                 "images": 2, "bytes": 4096, "idempotency_key": 'key "one"\\',
                 "rejected_url": f"/batches/{b1}/rejected"}, j
    assert CREATED_AT_RE.match(j["created_at"]), j
    assert all(type(j[k]) is int for k in ("batch_id", "inserted", "skipped", "lines", "images", "bytes")), j
    j = get(server, f"/batches/{b2}", tmp_path).json()
    assert j["skipped"] == 0 and j["rejected_url"] is None and j["idempotency_key"] is None, j
    assert j["inserted"] == 5 and j["bytes"] == 300, j
    j = get(server, f"/batches/{b3}", tmp_path).json()
    assert list(j) == BATCH_KEYS, j
    assert [j[k] for k in BATCH_KEYS[2:]] == [None] * 7, j
    assert CREATED_AT_RE.match(j["created_at"]), j
    r = head(server, f"/batches/{b1}")
    assert r.status == 200 and r.headers.get("content-type", "").startswith("application/json"), r


def test_get_batch_written_by_an_upload(server, db, tmp_path):
    """A batch an upload made reads back with the counts its answer gave."""
    body = helpers.write(tmp_path / "b.jsonl", helpers.good_body("up", n=3))
    up = helpers.post(server, body, tmp_path)
    assert up.status == 200, up
    u = up.json()
    j = get(server, f"/batches/{u['batch_id']}", tmp_path).json()
    assert j["batch_id"] == u["batch_id"] and CREATED_AT_RE.match(j["created_at"]), j
    for k in ("inserted", "skipped", "lines", "images", "bytes"):
        assert j[k] == u[k], (k, j, u)
    assert j["rejected_url"] is None and j["idempotency_key"] is None, j


def test_get_batch_errors(server, db, tmp_path):
    b = add_batch(db, "k")
    assert "no batch" in assert_json_error(get(server, f"/batches/{b + 1}", tmp_path), 404)["error"]
    assert_json_error(get(server, "/batches/0", tmp_path), 404)
    assert_json_error(get(server, "/batches/9223372036854775807", tmp_path), 404)
    for bad in BAD_NUMBERS:
        for suffix in ("", "/rejected", "/rejected?format=raw"):
            j = assert_json_error(get(server, f"/batches/{bad}{suffix}", tmp_path), 400)
            assert "batch id must be an integer" in j["error"], (bad, j)
    # a raw space or an empty id is no path of ours (the request line, the exact routes)
    for path in ("/batches/", "/batches//rejected", f"/batches/{b}/", f"/batches/{b}/other", f"/batches/{b}/rejected/"):
        assert_json_error(get(server, path, tmp_path), 404)
    for method in ("POST", "DELETE", "PUT"):
        for path in (f"/batches/{b}", "/batches", f"/batches/{b}/rejected"):
            r = get(server, path, tmp_path, extra=["-X", method])
            assert_json_error(r, 405)
            assert r.headers.get("allow") == "GET, HEAD", r.headers
    st, _, body = helpers.raw_request(server.host, server.port, f"GET /batches/ {b} HTTP/1.1\r\nHost: localhost\r\n"
                                      "Connection: close\r\n\r\n".encode())
    assert st == 400, (st, body)
    assert head(server, f"/batches/{b + 1}").status == 404
    assert head(server, "/batches/+1").status == 400
    # errors keep the connection: the next request on it is answered
    c = helpers.HTTPConn(server.host, server.port)
    try:
        for path in (f"/batches/{b + 1}", "/batches/x", f"/batches/{b + 1}/rejected", f"/batches/{b}"):
            c.send(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            r = c.read_response()
        assert r.status == 200 and r.json()["batch_id"] == b, r
    finally:
        c.close()


# ------------------------------------------------------------------ GET /batches
def test_list_batches_pages_after_id_and_limit(server, db, tmp_path):
    """Batches in batch_id order across pages of JI_EXPORT_PAGE_ROWS; after_id exclusive; limit; the same 400s as
    GET /users."""
    n = 2 * PAGE_ROWS + 5
    db.sql("INSERT INTO batches (batch_key, idempotency_key, inserted, skipped, lines, images, bytes) SELECT 'k' || g, "
           "CASE WHEN g % 3 = 0 THEN 'idem-' || g END, g, g % 2, g + g % 2, 0, g * 10 FROM generate_series(1, "
           f"{n}) g")
    ids = [int(x) for x in db.sql("SELECT batch_id FROM batches ORDER BY batch_id").split()]
    assert len(ids) == n

    def window(q):
        return [o["batch_id"] for o in ndjson(get(server, "/batches" + (("?" + q) if q else ""), tmp_path))]

    everything = ndjson(get(server, "/batches", tmp_path))
    assert [o["batch_id"] for o in everything] == ids
    for o in everything:
        g = int(o["batch_id"])
        assert list(o) == BATCH_KEYS, o
        assert (o["inserted"], o["skipped"], o["lines"], o["images"], o["bytes"]) == (g, g % 2, g + g % 2, 0, g * 10)
        assert o["idempotency_key"] == (f"idem-{g}" if g % 3 == 0 else None), o
        assert o["rejected_url"] == (f"/batches/{g}/rejected" if g % 2 else None), o
        assert CREATED_AT_RE.match(o["created_at"]), o
    assert window(f"after_id={ids[PAGE_ROWS - 2]}&limit={PAGE_ROWS + 3}") == ids[PAGE_ROWS - 1:2 * PAGE_ROWS + 2]
    assert window(f"limit={PAGE_ROWS}") == ids[:PAGE_ROWS]
    assert window("limit=1") == ids[:1]
    assert window("limit=0") == []
    assert window(f"after_id={ids[-1]}") == []
    assert window(f"after_id={ids[-3]}&limit=10") == ids[-2:]
    assert window("after_id=0&limit=5&unknown=x") == ids[:5]
    after, got_all = 0, []
    while True:  # the cursor recipe
        got = window(f"after_id={after}&limit=777")
        if not got:
            break
        got_all += got
        after = got[-1]
    assert got_all == ids
    for bad in ("after_id=x", "limit=-1", "limit=", "after_id=1e3", "limit=99999999999999999999", "after_id=+1"):
        j = assert_json_error(get(server, "/batches?" + bad, tmp_path), 400)
        assert "must be an integer from 0 to 9223372036854775807" in j["error"], j
    r = head(server, "/batches")
    assert r.status == 200 and r.headers.get("content-type") == "application/x-ndjson", r


def test_list_batches_empty(server, db, tmp_path):
    assert ndjson(get(server, "/batches", tmp_path)) == []


# ------------------------------------------------------------------ GET /batches/{id}/rejected
def dead_letters():
    """(line, error, field, record, truncated) of every kind of record the read must carry unchanged."""
    big = ("ü\"\\\x01{\"name\":\"é😀\"}\t" * 360_000).encode()  # ~8 MiB of valid UTF-8 needing escapes
    assert 7 << 20 < len(big) <= 8 << 20
    return [
        (1, "not JSON: unexpected character", None, b'{"name":"quote \\" and \\\\ back", "tab\there"}', False),
        (2, "email: missing", "email", b'{"name":"\xc3\xa9l\xc3\xa8ve \xe2\x82\xac \xf0\x9f\x98\x80"}', False),
        (3, "not UTF-8", None, b'{"name":"\xff\xfe latin-1 \xe9"}', False),
        (5, "control", "name", b"\x00\x01\x02\x1f\x7f ctl \r\n\x00", False),
        (7, "line over --max-record-bytes", None, b'{"name":"' + b"x" * 60_000 + b"\xe2\x82", True),
        (8, "empty record", None, b"", False),
        (9, "a lone \\ in the error \u00e9 \"", "im\"age", b"\x80", False),
        (12, "big", "image", big, False),
        (13, "after the big one", None, b"tail \xc3", False),
    ]


def test_rejected_json_and_raw_carry_every_byte(server, db, tmp_path):
    b = add_batch(db, "k", counts=(1, 9, 10, 0, 123))
    rows = dead_letters()
    for line, error, field, record, truncated in rows:
        if len(record) > 100_000:  # too long for a psql argument: built by the server
            db.sql(f"INSERT INTO rejected_records VALUES ({b}, {line}, {sql_text(error)}, {sql_text(field)}, "
                   "convert_to(repeat(E'\\u00fc\"\\\\\\u0001{\"name\":\"\\u00e9\\U0001F600\"}\\t', 360000), 'UTF8'), "
                   "false)")
            assert db.sql(f"SELECT md5(record) FROM rejected_records WHERE line = {line}") == hashlib.md5(
                record).hexdigest()
        else:
            add_rejected(db, b, line, error, field, record, truncated)
    other = add_batch(db, "other")  # another batch's dead letters stay out
    add_rejected(db, other, 1, "elsewhere", None, b"not mine")

    got = ndjson(get(server, f"/batches/{b}/rejected", tmp_path))
    assert len(got) == len(rows), [o["line"] for o in got]
    for obj, row in zip(got, rows):
        check_rejected_object(obj, *row)
    # the same with format=json spelled out
    r = get(server, f"/batches/{b}/rejected?format=json", tmp_path)
    assert r.status == 200 and [o["line"] for o in ndjson(r)] == [row[0] for row in rows]

    r = get(server, f"/batches/{b}/rejected?format=raw", tmp_path)
    assert r.status == 200 and r.rc == 0, r
    assert r.headers.get("content-type") == "application/octet-stream", r.headers
    expected = b"".join(record + b"\n" for _, _, _, record, truncated in rows if not truncated)
    assert len(r.body) == len(expected) and r.body == expected, "raw dead letters differ from the stored bytes"
    assert head(server, f"/batches/{b}/rejected?format=raw").headers.get("content-type") == \
        "application/octet-stream"


def test_rejected_pages_by_rows_and_bytes(server, db, tmp_path):
    """Pages cut by JI_REJECTED_PAGE_ROWS and by JI_REJECTED_PAGE_BYTES, at and around their edges: every record
    once, in line order, in both forms."""
    b = add_batch(db, "k")
    n = 2 * REJECTED_PAGE_ROWS + 7
    # small records on lines 2, 4, ...; then records of a third, a half and all of a page's bytes
    db.sql(f"INSERT INTO rejected_records SELECT {b}, 2 * g, 'e' || g, CASE WHEN g % 2 = 0 THEN 'f' END, "
           f"convert_to('rec ' || g, 'UTF8'), g % 50 = 0 FROM generate_series(1, {n}) g")
    sizes = [REJECTED_PAGE_BYTES // 3] * 4 + [REJECTED_PAGE_BYTES // 2 + 1] * 3 + [REJECTED_PAGE_BYTES] * 2 + \
        [REJECTED_PAGE_BYTES + 5, 10]
    for i, size in enumerate(sizes):
        db.sql(f"INSERT INTO rejected_records VALUES ({b}, {10_000 + i}, 'big', NULL, "
               f"convert_to(rpad('{i}:', {size}, 'abc'), 'UTF8'), false)")
    expected = [(2 * g, f"e{g}", "f" if g % 2 == 0 else None, f"rec {g}".encode(), g % 50 == 0)
                for g in range(1, n + 1)]
    expected += [(10_000 + i, "big", None, (f"{i}:" + "abc" * size)[:size].encode(), False)
                 for i, size in enumerate(sizes)]
    got = ndjson(get(server, f"/batches/{b}/rejected", tmp_path))
    assert [o["line"] for o in got] == [e[0] for e in expected]
    for obj, row in zip(got, expected):
        check_rejected_object(obj, *row)
    r = get(server, f"/batches/{b}/rejected?format=raw", tmp_path)
    assert r.status == 200 and r.rc == 0, r
    assert r.body == b"".join(e[3] + b"\n" for e in expected if not e[4])


def test_rejected_errors(server, db, tmp_path):
    b = add_batch(db, "k", counts=(3, 0, 3, 0, 10))
    assert ndjson(get(server, f"/batches/{b}/rejected", tmp_path)) == []  # a batch without dead letters
    r = get(server, f"/batches/{b}/rejected?format=raw", tmp_path)
    assert r.status == 200 and r.rc == 0 and r.body == b"", r
    assert r.headers.get("content-type") == "application/octet-stream", r.headers
    for q in ("", "?format=raw"):
        j = assert_json_error(get(server, f"/batches/{b + 1}/rejected{q}", tmp_path), 404)
        assert j["error"] == f"no batch {b + 1}", j
    for q in ("format=", "format=RAW", "format=xml", "format=raw2", "format", "foo=1", "format=raw&x=1",
              "after_id=1", "limit=5", "format=raw&format=raw", "format=json&format=raw"):
        j = assert_json_error(get(server, f"/batches/{b}/rejected?{q}", tmp_path), 400)
        assert "format" in j["error"], (q, j)
    assert head(server, f"/batches/{b}/rejected").status == 200
    assert head(server, f"/batches/{b + 1}/rejected").status == 404


def test_database_errors_are_logged_not_answered(server, db, tmp_path):
    b = add_batch(db, "k")
    db.sql("ALTER TABLE rejected_records RENAME TO rejected_hidden")
    try:
        for q in ("", "?format=raw"):
            r = get(server, f"/batches/{b}/rejected{q}", tmp_path)
            assert assert_json_error(r, 503) == {"error": "database error"}, r
            assert r.headers.get("retry-after", "").isdigit(), r.headers
    finally:
        db.sql("ALTER TABLE rejected_hidden RENAME TO rejected_records")
    with open(server.log_path, "rb") as f:
        assert b'relation "rejected_records" does not exist' in f.read()
    assert get(server, f"/batches/{b}/rejected", tmp_path).status == 200


def fill_dead_letters(db, batch_id, count, size):
    """`count` records of `size` bytes, generated by the server: odd lines valid UTF-8 with characters to escape,
    even lines binary (not UTF-8). Returns record(line) computing the same bytes here."""
    unit = "q\"\\\x01é€😀 ab"  # 16 bytes of UTF-8
    db.sql(f"INSERT INTO rejected_records SELECT {batch_id}, g, 'e', NULL, CASE WHEN g % 2 = 1 THEN "
           f"convert_to(lpad(g::text, 8, '0') || repeat(E'q\"\\\\\\u0001\\u00e9\\u20ac\\U0001F600 ab', "
           f"({size} - 8) / 16), 'UTF8') ELSE decode(lpad(to_hex(g), 8, '0'), 'hex') || "
           f"decode(repeat('ff00fe01', ({size} - 4) / 4), 'hex') END, false FROM generate_series(1, {count}) g")

    def record(g):
        if g % 2:
            return (f"{g:08d}" + unit * ((size - 8) // 16)).encode()
        return bytes.fromhex(f"{g:08x}") + bytes.fromhex("ff00fe01") * ((size - 4) // 4)
    return record


@pytest.mark.memory
@pytest.mark.timeout(300)
def test_rejected_memory_stays_bounded(server, db, tmp_path, figures):
    """50 dead letters of 4 MiB (200 MiB) read back as JSON Lines and raw: the server's peak RSS stays under
    64 MiB, because it holds two pages and writes them out in pieces."""
    count, size = 50, 4 << 20
    b = add_batch(db, "k")
    record = fill_dead_letters(db, b, count, size)
    idle_kib = server.status_kib("VmHWM")
    sent = {}
    for q in ("", "?format=raw"):
        # read line by line, keeping one record in this process at a time
        c = http.client.HTTPConnection(server.host, server.port, timeout=120)
        c.request("GET", f"/batches/{b}/rejected{q}", headers={"Host": "localhost"})
        r = c.getresponse()
        assert r.status == 200, r.status
        total = 0
        for g in range(1, count + 1):
            if q:  # binary records may hold "\n" themselves
                line = r.read(len(record(g)) + 1)
                assert line == record(g) + b"\n", g
            else:
                line = r.readline()
                check_rejected_object(json.loads(line), g, "e", None, record(g), False)
            total += len(line)
        assert r.read() == b""  # the end, with the final chunk (http.client raises on a cut chunked body)
        c.close()
        sent[q or "json"] = total
    hwm_kib = server.status_kib("VmHWM")
    figures(f"rejected: {count} records of {size >> 20} MiB, {sent['json'] / 1e6:.0f} MB JSON Lines + "
            f"{sent['?format=raw'] / 1e6:.0f} MB raw, server peak RSS {hwm_kib / 1024:.1f} MiB "
            f"(before {idle_kib / 1024:.1f} MiB)")
    assert sent["?format=raw"] == sum(len(record(g)) + 1 for g in range(1, count + 1))
    assert hwm_kib < 64 * 1024, f"peak RSS {hwm_kib / 1024:.1f} MiB reading {count} records of {size >> 20} MiB"


@pytest.mark.timeout(120)
def test_rejected_client_gone_frees_everything(server, db, tmp_path):
    """Clients that close mid-answer (after a little, or with a reset) leave no busy database connection."""
    b = add_batch(db, "k")
    fill_dead_letters(db, b, 12, 1 << 20)
    for i in range(8):
        c = helpers.HTTPConn(server.host, server.port)
        c.send(f"GET /batches/{b}/rejected{'?format=raw' if i % 2 else ''} HTTP/1.1\r\nHost: localhost\r\n\r\n"
               .encode())
        c.sock.recv(4096 if i % 3 else 100_000)
        if i % 4 == 0:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.close()

    def pool_quiet():
        r = get(server, "/metrics", tmp_path)
        return 'jsonl_ingest_db_pool_connections{state="busy"} 0' in r.body.decode()

    assert helpers.wait_for(pool_quiet, timeout=10), get(server, "/metrics", tmp_path).body.decode()
    assert len(ndjson(get(server, f"/batches/{b}/rejected", tmp_path))) == 12
    assert server.alive() and server.healthy()


@pytest.mark.timeout(120)
def test_rejected_cut_when_the_database_goes_away(server, db, tmp_path):
    """The 200 is out, then the database connection dies: the answer ends without its final chunk, so the client
    cannot take what it got for the whole."""
    b = add_batch(db, "k")
    fill_dead_letters(db, b, 40, 1 << 20)
    c = helpers.HTTPConn(server.host, server.port, timeout=30)
    try:
        c.send(f"GET /batches/{b}/rejected?format=raw HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        c._read_until(b"\r\n\r\n")
        time.sleep(0.5)  # the server sends what the socket takes, and has the next page in memory
        db.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
               "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
        body = c.buf
        c.sock.settimeout(30)
        while True:
            try:
                d = c.sock.recv(1 << 20)
            except ConnectionResetError:
                break
            if not d:
                break
            body += d
    finally:
        c.close()
    assert len(body) < 40 * ((1 << 20) + 1), "the whole answer arrived although the database went away"
    assert not body.endswith(b"\r\n0\r\n\r\n"), "a cut answer ended with the final chunk"
    with open(server.log_path, "rb") as f:
        assert b"cut after" in f.read()
    assert server.alive() and server.healthy()
