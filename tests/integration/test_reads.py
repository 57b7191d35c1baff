"""The read side (docs/api.md): GET /users/{id}, the image, the streamed JSON
Lines and CSV exports (with the CSV's formula neutralisation), /healthz,
/readyz and /metrics, against the real binary and a real PostgreSQL."""
import csv
import io
import json
import os
import re
import socket
import time

import pytest

import helpers
from checks import assert_success

# created_at as the service writes it: RFC 3339, UTC, microseconds
CREATED_AT_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
ROW_KEYS = {"user_id", "name", "email", "image_url", "image_type", "image_size", "batch_id", "created_at"}
CSV_HEADER = ["user_id", "name", "email", "image_url", "image_type", "image_size", "batch_id", "created_at"]
PAGE_ROWS = 1000  # JI_EXPORT_PAGE_ROWS: the tests cross page boundaries on purpose


def get(srv, path, tmp_path, extra=()):
    return helpers.curl(list(extra) + [srv.base + path], tmp_path)


def post_lines(srv, tmp_path, lines, name="body.jsonl"):
    return helpers.post(srv, helpers.write(tmp_path / name, b"".join(l + b"\n" for l in lines)), tmp_path)


def export_lines(res):
    assert res.status == 200, res
    assert res.headers.get("content-type", "").startswith("application/x-ndjson"), res.headers
    text = res.body.decode("utf-8")
    assert text == "" or text.endswith("\n"), text[-200:]
    return [json.loads(l) for l in text.splitlines()]


def assert_json_error(res, status):
    assert res.status == status, res
    assert res.headers.get("content-type", "").startswith("application/json"), res.headers
    j = res.json()
    assert isinstance(j.get("error"), str) and j["error"], j
    return j


def ingest_plain(srv, tmp_path, n, tag="p"):
    """n records without images through POST /users; returns the user ids."""
    res = post_lines(srv, tmp_path, [helpers.record_line(f"{tag} {i}", f"{tag}-{i}@example.com") for i in range(n)],
                     name=f"{tag}.jsonl")
    j = assert_success(res, inserted=n)
    return list(range(j["first_user_id"], j["last_user_id"] + 1))


def head(srv, path):
    """HEAD on a keep-alive connection, then GET /healthz on the same connection: the HEAD answer must have
    carried no body (else the second answer would not parse). Returns the HEAD response."""
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


def metrics(srv, tmp_path):
    """GET /metrics -> ({'name{labels}': value}, raw text); checks the exposition format on the way."""
    res = get(srv, "/metrics", tmp_path)
    assert res.status == 200, res
    assert res.headers.get("content-type", "").startswith("text/plain; version=0.0.4"), res.headers
    text = res.body.decode()
    values, helped, typed = {}, set(), set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            parts = line.split()
            assert parts[3] in ("counter", "gauge", "histogram"), line
            typed.add(parts[2])
            if parts[3] == "histogram":  # its samples: _bucket{le=...}, _sum, _count
                typed.update(parts[2] + x for x in ("_bucket", "_sum", "_count"))
                helped.update(parts[2] + x for x in ("_bucket", "_sum", "_count"))
        elif line:
            m = re.match(r"^([a-z_]+)(\{.*\})? (\d+(?:\.\d+)?(?:e[-+]?\d+)?)$", line)
            assert m, f"not a sample line: {line!r}"
            assert m.group(1).startswith("jsonl_ingest_"), line
            assert m.group(1) in helped and m.group(1) in typed, f"{m.group(1)} lacks # HELP or # TYPE"
            v = m.group(3)
            values[m.group(1) + (m.group(2) or "")] = int(v) if v.isdigit() else float(v)
    return values, text


# ------------------------------------------------------------------ GET /users/{id}
def test_get_user_row_has_every_field(server, db, tmp_path):
    j = assert_success(helpers.post(server, helpers.fixture_path("basic.jsonl"), tmp_path), inserted=10, images=6)
    exp = helpers.expected("basic.jsonl")["records"]
    rows = db.users()
    for uid, e, dbrow in zip(range(j["first_user_id"], j["last_user_id"] + 1), exp, rows):
        r = get(server, f"/users/{uid}", tmp_path)
        assert r.status == 200, r
        assert r.headers.get("content-type", "").startswith("application/json"), r.headers
        row = r.json()
        assert set(row) == ROW_KEYS, row
        assert row["user_id"] == uid and row["name"] == e["name"] and row["email"] == e["email"], row
        assert row["batch_id"] == j["batch_id"], row
        assert CREATED_AT_RE.match(row["created_at"]), row
        if e["image"] is None:
            assert row["image_url"] is None and row["image_type"] is None and row["image_size"] is None, row
        else:
            assert row["image_url"] == f"/users/{uid}/image", row
            assert row["image_type"] == e["image_type"], row
            assert row["image_size"] == dbrow["image_size"] == os.path.getsize(
                os.path.join(helpers.FIXTURES, e["image"])), row


def test_get_user_errors(server, db, tmp_path):
    ids = ingest_plain(server, tmp_path, 2)
    assert "no user" in assert_json_error(get(server, f"/users/{ids[-1] + 1}", tmp_path), 404)["error"]
    assert_json_error(get(server, "/users/0", tmp_path), 404)
    for bad in ("abc", "-1", "1.5", "1e3", "99999999999999999999", "%20"):
        assert_json_error(get(server, f"/users/{bad}", tmp_path), 400)
    for route in (f"/users/{ids[0]}/other", f"/users/{ids[0]}/image/x", "/users/"):
        assert_json_error(get(server, route, tmp_path), 404)
    r = get(server, f"/users/{ids[0]}", tmp_path, extra=["-X", "DELETE"])
    assert_json_error(r, 405)
    assert "GET" in r.headers.get("allow", ""), r.headers
    # an error answer to a GET keeps the connection open (its Content-Length frames it)
    c = helpers.HTTPConn(server.host, server.port)
    try:
        for path in (f"/users/{ids[-1] + 1}", "/users/abc", "/users/1/other", f"/users/{ids[0]}"):
            c.send(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            r = c.read_response()
            assert r.status in (200, 400, 404) and "close" not in r.headers.get("connection", ""), (path, r)
        assert r.status == 200 and r.json()["user_id"] == ids[0], r
    finally:
        c.close()
    # HEAD: the status and headers of GET, no body
    r = head(server, f"/users/{ids[0]}")
    assert r.status == 200 and r.headers.get("content-type", "").startswith("application/json"), r
    assert server.alive()


# ------------------------------------------------------------------ GET /users/{id}/image
def test_image_bytes_and_type_match_the_upload(server, db, tmp_path):
    j = assert_success(helpers.post(server, helpers.fixture_path("basic.jsonl"), tmp_path), inserted=10, images=6)
    exp = helpers.expected("basic.jsonl")["records"]
    for uid, e in zip(range(j["first_user_id"], j["last_user_id"] + 1), exp):
        r = get(server, f"/users/{uid}/image", tmp_path)
        if e["image"] is None:
            assert "no image" in assert_json_error(r, 404)["error"]
            continue
        want = helpers.fixture_bytes(e["image"])
        assert r.status == 200, r
        assert r.headers.get("content-type") == e["image_type"], r.headers
        assert int(r.headers.get("content-length", -1)) == len(want), r.headers
        assert r.body == want, f"user {uid}: {len(r.body)} bytes served, {len(want)} uploaded"
        h = head(server, f"/users/{uid}/image")
        assert h.status == 200 and h.headers.get("content-type") == e["image_type"], h
        assert int(h.headers.get("content-length", -1)) == len(want), h.headers
    assert_json_error(get(server, f"/users/{j['last_user_id'] + 1}/image", tmp_path), 404)
    assert_json_error(get(server, "/users/x/image", tmp_path), 400)


def test_large_image_is_streamed_intact(server, db, tmp_path):
    """An image of several chunks (JI_IMAGE_CHUNK_BYTES = 64 KiB) comes back byte for byte."""
    big = helpers.png_bytes(1_500_000, "big")
    j = assert_success(post_lines(server, tmp_path, [helpers.record_line("big", "big@example.com", big)]),
                       inserted=1, images=1)
    r = get(server, f"/users/{j['first_user_id']}/image", tmp_path)
    assert r.status == 200, r
    assert r.headers.get("content-type") == "image/png"
    assert r.body == big, f"{len(r.body)} bytes served, {len(big)} uploaded"


def test_image_client_gone_mid_transfer(server, db, tmp_path):
    big = helpers.png_bytes(3_000_000, "gone")
    j = assert_success(post_lines(server, tmp_path, [helpers.record_line("gone", "gone@example.com", big)]),
                       inserted=1, images=1)
    for _ in range(5):
        c = helpers.HTTPConn(server.host, server.port)
        c.send(f"GET /users/{j['first_user_id']}/image HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        c.sock.recv(1000)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        c.close()
    r = get(server, f"/users/{j['first_user_id']}/image", tmp_path)
    assert r.status == 200 and r.body == big
    assert server.alive()


# ------------------------------------------------------------------ GET /users (JSON Lines export)
@pytest.mark.timeout(120)
def test_export_pages_after_id_and_limit(server, db, tmp_path):
    """Several pages of JI_EXPORT_PAGE_ROWS; after_id/limit windows across page boundaries."""
    ids = ingest_plain(server, tmp_path, 2 * PAGE_ROWS + 500, tag="pg")
    rows = export_lines(get(server, "/users", tmp_path))
    assert [r["user_id"] for r in rows] == ids
    assert [r["email"] for r in rows] == [f"pg-{i}@example.com" for i in range(len(ids))]
    for r in rows[:3] + rows[-3:]:
        assert set(r) == ROW_KEYS and r["image_url"] is None and CREATED_AT_RE.match(r["created_at"]), r

    def window(query):
        return [r["user_id"] for r in export_lines(get(server, "/users?" + query, tmp_path))]

    assert window(f"after_id={ids[PAGE_ROWS - 2]}&limit={PAGE_ROWS + 3}") == ids[PAGE_ROWS - 1:2 * PAGE_ROWS + 2]
    assert window(f"limit={PAGE_ROWS}") == ids[:PAGE_ROWS]
    assert window(f"limit={PAGE_ROWS + 1}") == ids[:PAGE_ROWS + 1]
    assert window("limit=1") == ids[:1]
    assert window("limit=0") == []
    assert window(f"after_id={ids[-1]}") == []
    assert window(f"after_id={ids[-3]}&limit=10") == ids[-2:]
    assert window("after_id=0&limit=5&unknown=x") == ids[:5]
    # resuming from the last id seen walks the whole table, page by page
    seen, after = [], 0
    while True:
        got = window(f"after_id={after}&limit=999")
        if not got:
            break
        seen += got
        after = got[-1]
    assert seen == ids
    for bad in ("after_id=x", "limit=-1", "limit=", "after_id=1e3", "limit=99999999999999999999"):
        assert_json_error(get(server, "/users?" + bad, tmp_path), 400)


def test_export_fields_match_the_rows(server, db, tmp_path):
    j = assert_success(helpers.post(server, helpers.fixture_path("basic.jsonl"), tmp_path), inserted=10, images=6)
    exp = helpers.expected("basic.jsonl")["records"]
    rows = export_lines(get(server, "/users", tmp_path))
    assert [(r["name"], r["email"]) for r in rows] == [(e["name"], e["email"]) for e in exp]
    for r, dbrow in zip(rows, db.users()):
        assert r["user_id"] == dbrow["user_id"] and r["batch_id"] == j["batch_id"]
        assert r["image_type"] == dbrow["image_type"] and r["image_size"] == dbrow["image_size"]
        assert r["image_url"] == (None if dbrow["image_path"] is None else f"/users/{r['user_id']}/image")
    # HEAD: headers only
    for path in ("/users", "/users.csv"):
        h = head(server, path)
        assert h.status == 200, h


# ------------------------------------------------------------------ GET /users.csv
def test_export_csv_quoting(server, db, tmp_path):
    names = ["Smith, John", 'say "hi"', "multi\nline", "plain", "O'Brien \"Bob\", \\ back/slash", "Ελένη 🙂",
             "comma,and\r\ncrlf"]
    lines = [helpers.record_line(n, f"c{i}@example.com") for i, n in enumerate(names)]
    lines.append(helpers.record_line("with image", "img@example.com", helpers.png_bytes(300, "csv")))
    j = assert_success(post_lines(server, tmp_path, lines), inserted=len(lines))
    r = get(server, "/users.csv", tmp_path)
    assert r.status == 200, r
    assert r.headers.get("content-type", "").startswith("text/csv"), r.headers
    text = r.body.decode("utf-8")
    assert text.startswith(",".join(CSV_HEADER) + "\r\n"), text[:200]
    assert text.endswith("\r\n")
    # the quoting is RFC 4180's: fields with a comma, quote or line break are quoted, quotes doubled
    assert '"say ""hi"""' in text and '"Smith, John"' in text and ",plain," in text
    recs = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    assert recs[0] == CSV_HEADER
    body = recs[1:]
    assert [rec[1] for rec in body] == names + ["with image"]
    ids = list(range(j["first_user_id"], j["last_user_id"] + 1))
    for rec, uid in zip(body, ids):
        assert len(rec) == len(CSV_HEADER) and int(rec[0]) == uid and int(rec[6]) == j["batch_id"], rec
        assert CREATED_AT_RE.match(rec[7]), rec
    assert body[-1][3] == f"/users/{ids[-1]}/image" and body[-1][4] == "image/png" and body[-1][5] == "300"
    assert body[0][3] == body[0][4] == body[0][5] == ""  # NULL is an empty field
    # the same window parameters as the JSON Lines export; the header comes first even when no row does
    r = get(server, f"/users.csv?after_id={ids[1]}&limit=2", tmp_path)
    assert [rec[0] for rec in csv.reader(io.StringIO(r.body.decode(), newline=""))] == \
        ["user_id", str(ids[2]), str(ids[3])]
    r = get(server, f"/users.csv?after_id={ids[-1]}", tmp_path)
    assert r.status == 200 and r.body.decode() == ",".join(CSV_HEADER) + "\r\n", r
    assert_json_error(get(server, "/users.csv?limit=z", tmp_path), 400)
    assert_json_error(get(server, "/users.csv/1", tmp_path), 404)


# cells a spreadsheet would evaluate: the export prefixes them with ' unless ?formulas=raw
FORMULA_NAMES = ['=HYPERLINK("http://x")', "+1", "-1", "@SUM(A1)", "\tx", "\rx"]


def csv_records(srv, tmp_path, query=""):
    r = get(srv, "/users.csv" + query, tmp_path)
    assert r.status == 200, r
    recs = list(csv.reader(io.StringIO(r.body.decode("utf-8"), newline=""), strict=True))
    assert recs[0] == CSV_HEADER, recs[:1]
    return r.body.decode("utf-8"), recs[1:]


def test_export_csv_neutralises_formulas(server, db, tmp_path):
    names = FORMULA_NAMES + ["plain name", "O'Brien", "a=b+c", " =1"]
    lines = [helpers.record_line(n, f"f{i}@example.com") for i, n in enumerate(names)]
    lines.append(helpers.record_line("dash mail", "-x@example.com"))
    assert_success(post_lines(server, tmp_path, lines), inserted=len(lines))
    stored = [u["name"] for u in db.users()]
    assert stored == names + ["dash mail"], stored  # the database keeps the bytes as sent

    text, recs = csv_records(server, tmp_path)
    assert [rec[1] for rec in recs] == ["'" + n for n in FORMULA_NAMES] + names[len(FORMULA_NAMES):] + ["dash mail"]
    assert recs[-1][2] == "'-x@example.com"  # every text cell, not only names
    assert [rec[2] for rec in recs[:-1]] == [f"f{i}@example.com" for i in range(len(names))]
    # the quote mark goes inside the quotes of a quoted cell
    assert '"\'=HYPERLINK(""http://x"")"' in text and ",'+1," in text and ",'\tx," in text and '"\'\rx"' in text

    text, recs = csv_records(server, tmp_path, "?formulas=raw")
    assert [rec[1] for rec in recs] == names + ["dash mail"]
    assert recs[-1][2] == "-x@example.com"
    assert '"=HYPERLINK(""http://x"")"' in text and ",+1," in text and ",-1," in text and ",@SUM(A1)," in text
    # with the window parameters, in any order
    _, recs = csv_records(server, tmp_path, "?limit=2&formulas=raw")
    assert [rec[1] for rec in recs] == names[:2]
    _, recs = csv_records(server, tmp_path, "?formulas=raw&after_id=" + recs[0][0] + "&limit=1")
    assert [rec[1] for rec in recs] == names[1:2]
    # any other value is refused; JSON Lines is not a spreadsheet format: its rows are as stored
    for bad in ("formulas=", "formulas=RAW", "formulas=escape", "formulas=raw2", "limit=1&formulas=x"):
        r = get(server, "/users.csv?" + bad, tmp_path)
        assert "formulas" in assert_json_error(r, 400)["error"], (bad, r)
    assert [r["name"] for r in export_lines(get(server, "/users", tmp_path))] == names + ["dash mail"]


# ------------------------------------------------------------------ database errors
def test_database_errors_are_logged_not_answered(server, db, tmp_path):
    """A statement that fails answers 503 "database error" with Retry-After; PostgreSQL's own message goes to the
    server's log, never to the client."""
    ids = ingest_plain(server, tmp_path, 1)
    db.sql("ALTER TABLE users RENAME TO users_hidden")
    try:
        for path in (f"/users/{ids[0]}", f"/users/{ids[0]}/image", "/users", "/users.csv?formulas=raw"):
            r = get(server, path, tmp_path)
            j = assert_json_error(r, 503)
            assert j == {"error": "database error"}, (path, j)
            assert r.headers.get("retry-after", "").isdigit(), (path, r.headers)
            assert b"relation" not in r.body and b"users_hidden" not in r.body, r.body
    finally:
        db.sql("ALTER TABLE users_hidden RENAME TO users")
    with open(server.log_path, "rb") as f:
        assert b'relation "users" does not exist' in f.read(), "the database's message was not logged"
    assert get(server, f"/users/{ids[0]}", tmp_path).status == 200


# ------------------------------------------------------------------ memory and clients that go away
@pytest.mark.memory
@pytest.mark.timeout(180)
def test_export_memory_stays_bounded(server, db, tmp_path, figures):
    """A ~60 MB export (40 000 rows of 1.3 KB) in both formats: the server's peak RSS stays far below the size
    of the result, because it holds at most two pages at a time."""
    n = 40_000
    db.sql("INSERT INTO users (name, email) SELECT repeat('😀', 245) || ' ' || g, 'u' || g || '@' || repeat('e', 240) "
           f"FROM generate_series(1, {n}) g")
    idle_kib = server.status_kib("VmHWM")
    sizes = {}
    for path in ("/users", "/users.csv"):
        # read by hand, counting bytes, to keep the test's own memory small
        size = lines = 0
        head = tail = b""
        with socket.create_connection((server.host, server.port), timeout=60) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            while True:
                d = s.recv(1 << 20)
                if not d:
                    break
                if len(head) < 64:
                    head += d[:64]
                size += len(d)
                lines += d.count(b"\n")
                tail = (tail + d)[-16:]
        assert head.startswith(b"HTTP/1.1 200 "), f"{path}: {head!r}"
        assert tail.endswith(b"0\r\n\r\n"), f"{path}: the chunked response did not end properly: {tail!r}"
        assert lines > n, f"{path}: {lines} lines"
        sizes[path] = size
    hwm_kib = server.status_kib("VmHWM")
    figures(f"export: {n} rows, {sizes['/users'] / 1e6:.0f} MB JSON Lines + {sizes['/users.csv'] / 1e6:.0f} MB CSV, "
            f"server peak RSS {hwm_kib / 1024:.1f} MiB (before {idle_kib / 1024:.1f} MiB)")
    assert sizes["/users"] > 50_000_000
    assert hwm_kib < 32 * 1024, f"peak RSS {hwm_kib / 1024:.1f} MiB for a {sizes['/users'] / 1e6:.0f} MB export"


@pytest.mark.timeout(120)
def test_export_client_gone_frees_everything(server, db, tmp_path):
    """Clients that close mid-export (slow, or reset) leave no busy database connection behind."""
    db.sql("INSERT INTO users (name, email) SELECT 'n' || g, 'u' || g || '@x.com' FROM generate_series(1, 30000) g")
    for i in range(12):
        c = helpers.HTTPConn(server.host, server.port)
        c.send(b"GET /users" + (b".csv" if i % 2 else b"") + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        c.sock.recv(4096 if i % 3 else 100_000)
        if i % 4 == 0:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.close()

    def pool_quiet():
        v, _ = metrics(server, tmp_path)
        return v['jsonl_ingest_db_pool_connections{state="busy"}'] == 0

    assert helpers.wait_for(pool_quiet, timeout=10), metrics(server, tmp_path)[1]
    assert len(export_lines(get(server, "/users?limit=2500", tmp_path))) == 2500
    assert server.alive() and server.healthy()


# ------------------------------------------------------------------ /healthz, /readyz
def test_readyz_ready(server, tmp_path):
    r = get(server, "/readyz", tmp_path)
    assert r.status == 200, r
    assert r.json() == {"status": "ready"}


def test_operational_routes_are_exact_and_get_only(server, tmp_path):
    """/healthz, /readyz, /metrics: GET and HEAD on the exact path; another method is 405 with Allow, a path below
    them is 404, both as JSON errors."""
    r = get(server, "/healthz", tmp_path)
    assert r.status == 200 and r.json() == {"status": "ok"}, r
    for path in ("/healthz", "/readyz", "/metrics"):
        assert head(server, path).status == 200
        for method in ("DELETE", "PUT"):
            r = get(server, path, tmp_path, extra=["-X", method])
            assert "not allowed" in assert_json_error(r, 405)["error"], (path, method, r)
            assert r.headers.get("allow") == "GET, HEAD", (path, r.headers)
        assert_json_error(get(server, path + "/x", tmp_path), 404)
    r = get(server, "/users.csv", tmp_path, extra=["-X", "DELETE"])
    assert_json_error(r, 405)
    assert r.headers.get("allow") == "GET, HEAD", r.headers
    r = get(server, "/users", tmp_path, extra=["-X", "PUT"])
    assert_json_error(r, 405)
    assert r.headers.get("allow") == "GET, HEAD, POST", r.headers


def test_readyz_and_reads_when_the_database_is_down_at_start(start_server, db, tmp_path):
    """The service starts without its database: alive (healthz), not ready, reads answer 503 with Retry-After."""
    down = start_server(db=helpers.conninfo_with(db.url, host="127.0.0.1", port=helpers.free_port()),
                        images_dir=str(tmp_path / "down"))
    r = get(down, "/readyz", tmp_path)
    j = assert_json_error(r, 503)
    assert j.get("status") == "not ready", j
    assert r.headers.get("retry-after", "").isdigit(), r.headers
    assert get(down, "/healthz", tmp_path).status == 200
    for path in ("/users/1", "/users/1/image", "/users", "/users.csv"):
        r = get(down, path, tmp_path)
        assert_json_error(r, 503)
        assert r.headers.get("retry-after", "").isdigit(), (path, r.headers)
    res = post_lines(down, tmp_path, [helpers.record_line("a", "a@x.com")])
    assert_json_error(res, 503)
    v, text = metrics(down, tmp_path)
    assert v["jsonl_ingest_db_ready"] == 0
    assert v['jsonl_ingest_refused_total{reason="db_not_ready"}'] == 1, text
    assert v['jsonl_ingest_refused_total{reason="max_ingests"}'] == 0, text
    assert v["jsonl_ingest_requests_total"] == 0, text  # refused before an ingest started


@pytest.mark.timeout(90)
def test_readyz_follows_the_database(start_server, db, tmp_path):
    """Ready through a proxy to the database; 503 once the proxy is gone (existing connections cut too)."""
    start_server(images_dir=str(tmp_path / "warmup")).stop()  # the schema exists before the proxy goes away
    port = helpers.free_port()
    host, dbport = helpers.conninfo_hostport(db.url)
    proxy = helpers.TcpProxy(port, host, dbport)
    try:
        srv = start_server(db=helpers.conninfo_with(db.url, host="127.0.0.1", port=port))
        assert get(srv, "/readyz", tmp_path).status == 200
        ids = ingest_plain(srv, tmp_path, 3)
        assert get(srv, f"/users/{ids[0]}", tmp_path).status == 200
    finally:
        proxy.cut()
    r = helpers.wait_for(lambda: (lambda x: x if x.status == 503 else None)(get(srv, "/readyz", tmp_path)), timeout=15)
    assert r, "readyz did not turn 503 after the database went away"
    assert r.headers.get("retry-after", "").isdigit(), r.headers
    # libpq's words ("server closed the connection...", "could not connect...") stay in the log
    assert r.json() in ({"status": "not ready", "error": "database unavailable"},
                        {"status": "not ready",
                         "error": "the database did not answer within 2 s (JI_READYZ_TIMEOUT_S)"}), r
    assert assert_json_error(get(srv, f"/users/{ids[0]}", tmp_path), 503) == {"error": "database error"}
    assert srv.alive() and srv.healthy()


# ------------------------------------------------------------------ /metrics
def test_metrics_count_ingests(server, db, tmp_path):
    v, text = metrics(server, tmp_path)
    assert v["jsonl_ingest_records_total"] == 0 and v["jsonl_ingest_requests_total"] == 0
    assert v["jsonl_ingest_resident_memory_bytes"] > 0, text
    assert v["jsonl_ingest_resident_memory_peak_bytes"] >= v["jsonl_ingest_resident_memory_bytes"], text
    assert_success(helpers.post(server, helpers.fixture_path("basic.jsonl"), tmp_path), inserted=10, images=6)
    bad = post_lines(server, tmp_path, [helpers.record_line("a", "a@x.com"), b'{"name": "x"}'], name="bad.jsonl")
    assert bad.status == 422, bad
    v, text = metrics(server, tmp_path)
    assert v["jsonl_ingest_requests_total"] == 2, text
    assert v['jsonl_ingest_ingests_total{result="ok"}'] == 1, text
    assert v['jsonl_ingest_ingests_total{result="failed"}'] == 1, text
    assert v["jsonl_ingest_records_total"] == 10, text
    assert v["jsonl_ingest_images_total"] == 6, text
    assert v["jsonl_ingest_body_bytes_total"] >= os.path.getsize(helpers.fixture_path("basic.jsonl")), text
    assert v['jsonl_ingest_errors_total{kind="invalid"}'] == 1, text
    for kind in ("malformed", "too_large", "unsupported", "db", "disk_full", "internal"):
        assert v[f'jsonl_ingest_errors_total{{kind="{kind}"}}'] == 0, text
    assert v["jsonl_ingest_ingests_in_flight"] == 0, text
    assert 'jsonl_ingest_limits_total{limit="max_record_bytes"}' in v, text
    assert v['jsonl_ingest_refused_total{reason="max_ingests"}'] == 0, text
    assert v['jsonl_ingest_refused_total{reason="db_not_ready"}'] == 0, text
    assert get(server, "/users/1", tmp_path).status == 200  # a read puts its connection back: one idle at least
    v, text = metrics(server, tmp_path)
    assert v['jsonl_ingest_db_pool_connections{state="idle"}'] >= 1, text
    assert v['jsonl_ingest_db_pool_connections{state="busy"}'] == 0, text
    assert v["jsonl_ingest_db_ready"] == 1, text


def test_metrics_sum_over_threads(start_server, db, tmp_path):
    srv = start_server(args=("--threads", "4"))
    for i in range(8):  # new connections: the kernel spreads them over the workers' listeners
        assert_success(post_lines(srv, tmp_path, [helpers.record_line(f"t{i}", f"t{i}@x.com")], name=f"t{i}.jsonl"),
                       inserted=1)
    v, text = metrics(srv, tmp_path)
    assert v["jsonl_ingest_records_total"] == 8, text
    assert v["jsonl_ingest_workers"] == 4, text
    assert v['jsonl_ingest_db_pool_connections{state="busy"}'] == 0, text
