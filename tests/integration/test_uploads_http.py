"""Resumable uploads over HTTP (docs/resumable.md, docs/api.md): the routes, the tus 1.0.0 and IETF draft
(interop version 6) headers, creation, HEAD, GET, PATCH, DELETE, OPTIONS, the limits, the expiry, the token
auth and the counters, against the real binary and a real PostgreSQL."""
import base64
import email.utils
import hashlib
import http.client
import json
import os
import re
import socket
import time

import pytest

import helpers

TOKEN_RE = re.compile(r"^/uploads/[0-9a-f]{32}$")
TUS = {"Tus-Resumable": "1.0.0"}
DRAFT = {"Upload-Draft-Interop-Version": "6"}
OCTETS = {"Content-Type": "application/offset+octet-stream"}
PARTIAL = {"Content-Type": "application/partial-upload"}


class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def h(self, name):
        return self.headers.get(name.lower())

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<HTTP {self.status} {self.headers} {self.body[:300]!r}>"


def call(srv, method, path, headers=None, body=None):
    """One request on its own connection (http.client: no 1xx other than 100 expected here)."""
    c = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        h = {"Host": "localhost"}
        h.update(headers or {})
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    finally:
        c.close()


def create_tus(srv, length=None, extra=None, query=""):
    h = dict(TUS)
    if length is None:
        h["Upload-Defer-Length"] = "1"
    else:
        h["Upload-Length"] = str(length)
    h.update(extra or {})
    r = call(srv, "POST", "/uploads" + query, h)
    assert r.status == 201, r
    assert TOKEN_RE.match(r.h("location")), r
    return r


def patch_tus(srv, loc, offset, data, extra=None):
    h = dict(TUS, **OCTETS)
    h["Upload-Offset"] = str(offset)
    h.update(extra or {})
    return call(srv, "PATCH", loc, h, data)


def patch_draft(srv, loc, offset, data, complete, extra=None):
    h = dict(DRAFT, **PARTIAL)
    h["Upload-Offset"] = str(offset)
    h["Upload-Complete"] = "?1" if complete else "?0"
    h.update(extra or {})
    return call(srv, "PATCH", loc, h, data)


def head(srv, loc, extra=None):
    return call(srv, "HEAD", loc, extra)


def state(srv, loc):
    r = call(srv, "GET", loc)
    assert r.status == 200, r
    return r.json()


def fixture_bytes():
    with open(helpers.fixture_path("basic.jsonl"), "rb") as f:
        return f.read()


def rows_without_ids(db):
    """The users rows as content: name, email, image type and size, and the image's bytes."""
    out = []
    for r in db.users():
        out.append((r["name"], r["email"], r["image_type"], r["image_size"]))
    return out


def image_digests(db, images_dir):
    out = []
    for r in db.users():
        if r["image_path"]:
            with open(os.path.join(images_dir, r["image_path"]), "rb") as f:
                out.append(hashlib.sha256(f.read()).hexdigest())
        else:
            out.append(None)
    return out


def metric(srv, name):
    r = call(srv, "GET", "/metrics")
    assert r.status == 200, r
    m = re.search(rb"^jsonl_ingest_" + name.encode() + rb" (\d+)$", r.body, re.M)
    assert m, name
    return int(m.group(1))


# ------------------------------------------------------------------ capabilities and creation


def test_options_names_the_protocol(start_server):
    srv = start_server(args=["--max-upload-bytes", "123456"])
    r = call(srv, "OPTIONS", "/uploads")
    assert r.status == 204, r
    assert r.h("tus-version") == "1.0.0"
    assert r.h("tus-resumable") == "1.0.0"
    assert r.h("tus-max-size") == "123456"
    assert set(r.h("tus-extension").split(",")) == {"creation", "creation-with-upload", "creation-defer-length",
                                                    "termination", "expiration"}
    assert "content-length" not in r.headers and r.body == b""
    # a Tus-Resumable of another version does not matter to OPTIONS
    assert call(srv, "OPTIONS", "/uploads", {"Tus-Resumable": "0.2.2"}).status == 204
    r = call(srv, "GET", "/uploads")
    assert r.status == 405 and r.h("allow") == "OPTIONS, POST", r


def test_tus_creation_and_head(start_server, db):
    srv = start_server(args=["--upload-expiry", "3600"])
    before = time.time()
    r = create_tus(srv, 500)
    assert r.h("tus-resumable") == "1.0.0"
    expires = email.utils.parsedate_to_datetime(r.h("upload-expires")).timestamp()
    assert before + 3600 - 5 <= expires <= time.time() + 3600 + 5, r
    loc = r.h("location")
    h = head(srv, loc, TUS)
    assert h.status == 200, h
    assert h.h("upload-offset") == "0" and h.h("upload-length") == "500", h
    assert h.h("cache-control") == "no-store" and h.h("tus-resumable") == "1.0.0"
    assert h.h("upload-complete") == "?0"
    assert re.match(r"^max-age=\d+$", h.h("upload-limit")), h
    assert 3590 <= int(h.h("upload-limit").split("=")[1]) <= 3600
    assert email.utils.parsedate_to_datetime(h.h("upload-expires")).timestamp() == pytest.approx(expires, abs=2)
    # the token is 128 random bits: two uploads never share one; the row holds it
    loc2 = create_tus(srv, 500).h("location")
    assert loc2 != loc
    assert db.sql("SELECT count(*) FROM uploads WHERE protocol = 'tus' AND state = 'open'") == "2"
    assert len(set(db.sql("SELECT string_agg(batch_key, ',') FROM uploads").split(","))) == 2


def test_tus_resumable_missing_or_wrong_is_412(server, db):
    for extra in ({}, {"Tus-Resumable": "0.2.2"}, {"Tus-Resumable": ""}):
        r = call(server, "POST", "/uploads", dict(extra, **{"Upload-Length": "10"}))
        assert r.status == 412, r
        assert r.h("tus-version") == "1.0.0", r
        assert "error" in r.json()
    loc = create_tus(server, 10).h("location")
    r = call(server, "PATCH", loc, dict(OCTETS, **{"Upload-Offset": "0"}), b"")
    assert r.status == 412 and r.h("tus-version") == "1.0.0", r
    r = call(server, "HEAD", loc, {"Tus-Resumable": "2.0.0"})
    assert r.status == 412, r
    assert db.sql("SELECT count(*) FROM uploads") == "1"


def test_defer_length(server):
    loc = create_tus(server, None).h("location")
    h = head(server, loc, TUS)
    assert h.status == 200 and h.h("upload-defer-length") == "1" and "upload-length" not in h.headers, h
    assert state(server, loc)["length"] is None
    for bad in ({"Upload-Length": "10", "Upload-Defer-Length": "1"}, {"Upload-Defer-Length": "2"}, {},
                {"Upload-Length": "-1"}, {"Upload-Length": "1x"}):
        r = call(server, "POST", "/uploads", dict(TUS, **bad))
        assert r.status == 400, (bad, r)


def test_creation_over_max_upload_bytes_is_413(start_server, db):
    srv = start_server(args=["--max-upload-bytes", "1000"])
    r = call(srv, "POST", "/uploads", dict(TUS, **{"Upload-Length": "1001"}))
    assert r.status == 413 and "--max-upload-bytes" in r.json()["error"], r
    assert db.sql("SELECT count(*) FROM uploads") == "0"
    create_tus(srv, 1000)
    r = patch_tus(srv, create_tus(srv, None).h("location"), 0, b"", {"Upload-Length": "1001"})
    assert r.status == 413, r


def test_token_of_the_wrong_shape_or_unknown_is_404(server):
    good = "0123456789abcdef0123456789abcdef"
    for path in ("/uploads/" + good.upper(), "/uploads/" + good[:-1], "/uploads/" + good + "0",
                 "/uploads/" + good + "/", "/uploads/", "/uploads/" + good[:-1] + "g", "/uploads/" + good + "/x"):
        for method in ("HEAD", "GET", "DELETE"):
            r = call(server, method, path)
            assert r.status == 404, (method, path, r)
        r = call(server, "PATCH", path, dict(TUS, **OCTETS, **{"Upload-Offset": "0"}), b"")
        assert r.status == 404, (path, r)
    for method in ("HEAD", "GET", "DELETE"):
        r = call(server, method, "/uploads/" + good, TUS)
        assert r.status == 404, (method, r)
    r = patch_tus(server, "/uploads/" + good, 0, b'{"name":"a","email":"a@b.c"}\n')
    assert r.status == 404, r
    r = call(server, "PUT", "/uploads/" + good)
    assert r.status == 405 and r.h("allow") == "DELETE, GET, HEAD, PATCH", r


def b64(s):
    return base64.b64encode(s.encode()).decode()


def test_metadata_and_query_options_are_stored(server):
    md = f"filename {b64('crawl.jsonl')},on_error {b64('skip')},max_errors {b64('5')},idempotency_key {b64('k-1')},empty"
    loc = create_tus(server, 100, {"Upload-Metadata": md}).h("location")
    s = state(server, loc)
    assert s["on_error"] == "skip" and s["max_errors"] == 5 and s["idempotency_key"] == "k-1", s
    assert s["metadata"] == md and s["protocol"] == "tus" and s["state"] == "open", s
    assert s["token"] == loc.rsplit("/", 1)[1] and s["offset"] == 0 and s["length"] == 100, s
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$", s["expires_at"]), s
    assert s["batch_id"] is None and s["answer"] is None
    # the query and the header
    loc = create_tus(server, 100, {"Idempotency-Key": '"k-2"'}, query="?on_error=skip&max_errors=2").h("location")
    s = state(server, loc)
    assert s["on_error"] == "skip" and s["max_errors"] == 2 and s["idempotency_key"] == "k-2", s
    s = state(server, create_tus(server, 100).h("location"))
    assert s["on_error"] == "fail" and s["max_errors"] is None and s["idempotency_key"] is None, s
    # validated like POST /users: 400
    for bad in (f"on_error {b64('maybe')}", f"max_errors {b64('x')}", "on_error !!!",
                f"idempotency_key {b64('a b')}", f"on_error {b64('fail')},max_errors {b64('3')}"):
        r = call(server, "POST", "/uploads", dict(TUS, **{"Upload-Length": "1", "Upload-Metadata": bad}))
        assert r.status == 400, (bad, r)
    r = call(server, "POST", "/uploads?on_error=maybe", dict(TUS, **{"Upload-Length": "1"}))
    assert r.status == 400, r


# ------------------------------------------------------------------ the draft


def test_draft_creation_empty(server, db):
    r = call(server, "POST", "/users", dict(DRAFT, **{"Upload-Complete": "?0"}))
    assert r.status == 201, r
    assert TOKEN_RE.match(r.h("location")), r
    assert r.h("upload-offset") == "0" and r.h("upload-complete") == "?0", r
    assert r.h("upload-draft-interop-version") == "6"
    s = state(server, r.h("location"))
    assert s["protocol"] == "draft" and s["offset"] == 0 and s["length"] is None, s
    # without the interop header (or without Upload-Complete), POST /users is a plain upload
    r = call(server, "POST", "/users", {"Upload-Complete": "?0", "Content-Type": "application/x-ndjson"},
             b'{"name":"a","email":"a@example.com"}\n')
    assert r.status == 200 and r.json()["inserted"] == 1 and "location" not in r.headers, r
    assert db.sql("SELECT count(*) FROM uploads") == "1"


def read_raw_answers(sock):
    """Reads interim answers and the final one from a raw socket: [(status, headers)], final body."""
    buf = b""
    answers = []
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {answers} {buf!r}"
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        hdrs = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
        answers.append((status, hdrs))
        if status >= 200:
            n = int(hdrs.get("content-length", "0"))
            while len(buf) < n:
                buf += sock.recv(65536)
            return answers, buf[:n]


def draft_post_raw(srv, body, complete=True, query="", first_part=None):
    """POST /users as a draft creation from a raw socket: the 104 must come before the body ends."""
    s = socket.create_connection((srv.host, srv.port), timeout=30)
    try:
        h = (f"POST /users{query} HTTP/1.1\r\nHost: localhost\r\nUpload-Draft-Interop-Version: 6\r\n"
             f"Upload-Complete: ?{1 if complete else 0}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        part = len(body) // 2 if first_part is None else first_part
        s.sendall(h + body[:part])
        # the 104 comes while the rest of the body has not been sent
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            assert chunk, buf
            buf += chunk
        first = buf.split(b"\r\n", 1)[0]
        assert first == b"HTTP/1.1 104 Upload Resumption Supported", buf
        s.sendall(body[part:])

        class Prefixed:
            def __init__(self, data):
                self.data = data

            def recv(self, n):
                if self.data:
                    d, self.data = self.data, b""
                    return d
                return s.recv(n)
        return read_raw_answers(Prefixed(buf))
    finally:
        s.close()


def test_draft_creation_with_body_sends_104_then_the_answer(server, db, images_dir, tmp_path):
    data = fixture_bytes()
    answers, body = draft_post_raw(server, data)
    (s104, h104), (status, hdrs) = answers
    assert s104 == 104 and TOKEN_RE.match(h104["location"]) and h104["upload-draft-interop-version"] == "6"
    assert status == 200, (answers, body)
    assert hdrs["upload-complete"] == "?1" and hdrs["upload-offset"] == str(len(data)), hdrs
    j = json.loads(body)
    assert j["inserted"] == 10 and j["images"] == 6 and j["lines"] == 10, j
    s = state(server, h104["location"])
    assert s["state"] == "committed" and s["batch_id"] == j["batch_id"], s
    assert s["batch_url"] == f"/batches/{j['batch_id']}" and s["answer"]["inserted"] == 10, s
    h = head(server, h104["location"])
    assert h.status == 200 and h.h("upload-complete") == "?1" and h.h("upload-offset") == str(len(data)), h
    got_rows, got_images = rows_without_ids(db), image_digests(db, images_dir)
    # the same file in one POST /users gives the same rows and the same image bytes
    db.truncate_all()
    res = helpers.post(server, helpers.fixture_path("basic.jsonl"), tmp_path)
    assert res.status == 200, res
    assert rows_without_ids(db) == got_rows and image_digests(db, images_dir) == got_images


def test_draft_creation_not_complete_then_patches(server, db):
    data = fixture_bytes()
    cut = data.index(b"\n", len(data) // 3) + 1
    answers, body = draft_post_raw(server, data[:cut], complete=False)
    (s104, h104), (status, hdrs) = answers
    assert status == 201 and hdrs["upload-complete"] == "?0" and hdrs["location"] == h104["location"], answers
    assert hdrs["upload-offset"] == str(cut)
    loc = h104["location"]
    r = patch_draft(server, loc, cut, data[cut:], complete=True)
    assert r.status == 200 and r.h("upload-complete") == "?1" and r.h("upload-offset") == str(len(data)), r
    assert r.json()["inserted"] == 10
    assert db.count_users() == 10
    # a PATCH to a committed upload: 409 with its final offset
    r = patch_draft(server, loc, cut, data[cut:], complete=True)
    assert r.status == 409 and r.h("upload-offset") == str(len(data)), r


# ------------------------------------------------------------------ appends


def test_patch_content_encoding_and_type_are_415(server, db):
    loc = create_tus(server, 100).h("location")
    line = b'{"name":"a","email":"a@example.com"}\n'
    for extra in ({"Content-Encoding": "gzip"}, {"Content-Encoding": "zstd"}, {"Content-Encoding": "br"},
                  {"Content-Type": "application/x-ndjson"}, {"Content-Type": "application/partial-upload"}):
        r = patch_tus(server, loc, 0, line, extra)
        assert r.status == 415, (extra, r)
    draft = call(server, "POST", "/users", dict(DRAFT, **{"Upload-Complete": "?0"})).h("location")
    for extra in ({"Content-Encoding": "gzip"}, {"Content-Type": "application/offset+octet-stream"}):
        r = patch_draft(server, draft, 0, line, False, extra)
        assert r.status == 415, (extra, r)
    # creation with a body needs the tus content type, and no Content-Encoding
    r = call(server, "POST", "/uploads", dict(TUS, **{"Upload-Length": str(len(line))}), line)
    assert r.status == 415, r
    r = call(server, "POST", "/uploads", dict(TUS, **OCTETS, **{"Upload-Length": "38", "Content-Encoding": "gzip"}),
             line)
    assert r.status == 415, r
    assert state(server, loc)["offset"] == 0 and db.count_users() == 0


def test_tus_patch_round_trip_equals_one_post(server, db, images_dir, tmp_path):
    data = fixture_bytes()
    a = data.index(b"\n", len(data) // 3) + 1
    b = data.index(b"\n", 2 * len(data) // 3) + 1
    loc = create_tus(server, len(data)).h("location")
    r = patch_tus(server, loc, 0, data[:a])
    assert r.status == 204 and r.h("upload-offset") == str(a) and r.h("upload-expires"), r
    assert head(server, loc, TUS).h("upload-offset") == str(a)
    # a wrong offset: 409 with the right one, nothing appended
    r = patch_tus(server, loc, a + 1, data[a + 1:b])
    assert r.status == 409 and r.h("upload-offset") == str(a), r
    r = patch_tus(server, loc, 0, data[:a])
    assert r.status == 409 and r.h("upload-offset") == str(a), r
    r = patch_tus(server, loc, a, data[a:b])
    assert r.status == 204 and r.h("upload-offset") == str(b), r
    assert db.count_users() == 0  # nothing of an unfinished upload is visible
    r = patch_tus(server, loc, b, data[b:])
    assert r.status == 204 and r.h("upload-offset") == str(len(data)), r
    assert re.match(r"^/batches/\d+$", r.h("content-location")), r
    s = state(server, loc)
    assert s["state"] == "committed" and s["offset"] == len(data) and s["lines"] == 10, s
    assert r.h("content-location") == s["batch_url"]
    h = head(server, loc, TUS)
    assert h.h("upload-complete") == "?1" and h.h("upload-offset") == str(len(data)), h
    got_rows, got_images = rows_without_ids(db), image_digests(db, images_dir)
    db.truncate_all()
    res = helpers.post(server, helpers.fixture_path("basic.jsonl"), tmp_path)
    assert res.status == 200, res
    assert rows_without_ids(db) == got_rows and image_digests(db, images_dir) == got_images


def test_tus_creation_with_upload(server, db):
    data = fixture_bytes()
    cut = data.index(b"\n", len(data) // 2) + 1
    r = call(server, "POST", "/uploads", dict(TUS, **OCTETS, **{"Upload-Length": str(len(data))}), data[:cut + 7])
    assert r.status == 201 and r.h("upload-offset") == str(cut), r  # the partial last line is not kept
    r = patch_tus(server, r.h("location"), cut, data[cut:])
    assert r.status == 204 and r.h("upload-offset") == str(len(data)) and r.h("content-location"), r
    assert db.count_users() == 10


# ------------------------------------------------------------------ termination and expiry


def test_delete_then_head_is_404(server, db, images_dir):
    data = fixture_bytes()
    cut = data.index(b"\n", len(data) // 2) + 1
    loc = create_tus(server, len(data)).h("location")
    assert patch_tus(server, loc, 0, data[:cut]).status == 204
    assert helpers.image_files(images_dir), "the staged records' images are on disk"
    r = call(server, "DELETE", loc, TUS)
    assert r.status == 204 and r.h("tus-resumable") == "1.0.0", r
    assert head(server, loc, TUS).status == 404
    assert call(server, "GET", loc).status == 404
    assert call(server, "DELETE", loc, TUS).status == 404
    assert patch_tus(server, loc, cut, data[cut:]).status == 404
    assert db.sql("SELECT count(*) FROM upload_rows") == "0"
    assert helpers.image_files(images_dir) == [] and helpers.pending_files(images_dir) == []


def test_failed_upload_is_410(server):
    loc = create_tus(server, 1000).h("location")
    r = patch_tus(server, loc, 0, b'{"name":"a","email":"a@example.com"}\nnot json\n')
    assert r.status == 400 and r.json()["line"] == 2, r
    for method in ("HEAD", "GET", "DELETE"):
        assert call(server, method, loc, TUS).status == 410, method
    g = call(server, "GET", loc)
    s = g.json()
    assert g.status == 410 and s["state"] == "failed" and s["answer_status"] == 400, s
    assert s["answer"] == r.json(), s


def test_expiry_discards_the_upload_and_its_files(start_server, db, images_dir):
    srv = start_server(args=["--upload-expiry", "1"])
    data = fixture_bytes()
    cut = data.index(b"\n", len(data) // 2) + 1
    loc = create_tus(srv, len(data)).h("location")
    r = patch_tus(srv, loc, 0, data[:cut])
    assert r.status == 204, r
    assert helpers.image_files(images_dir)
    before = metric(srv, "uploads_expired_total")
    deadline = time.monotonic() + 30
    while db.sql("SELECT count(*) FROM uploads") != "0" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert db.sql("SELECT count(*) FROM uploads") == "0", "the service swept the expired upload"
    assert head(srv, loc, TUS).status == 404
    assert helpers.image_files(images_dir) == [] and helpers.pending_files(images_dir) == []
    assert db.sql("SELECT count(*) FROM upload_rows") == "0"
    assert metric(srv, "uploads_expired_total") == before + 1


def test_gc_discards_expired_uploads(start_server, db, images_dir):
    srv = start_server()
    data = fixture_bytes()
    cut = data.index(b"\n", len(data) // 2) + 1
    loc = create_tus(srv, len(data)).h("location")
    assert patch_tus(srv, loc, 0, data[:cut]).status == 204
    keep = create_tus(srv, 10).h("location")
    srv.stop()
    db.sql(f"UPDATE uploads SET expires_at = now() - interval '1 second' WHERE token = '{loc.rsplit('/', 1)[1]}'")
    import subprocess
    p = subprocess.run([helpers.BINARY, "gc", "--db", srv.db, "--images-dir", images_dir], capture_output=True,
                       timeout=60)
    assert p.returncode == 0, p
    left = db.sql("SELECT string_agg(token || ' ' || state || ' ' || (expires_at < now())::text, '; ') FROM uploads")
    assert db.sql("SELECT count(*) FROM uploads") == "1", (left, p.stderr)
    assert db.sql(f"SELECT count(*) FROM uploads WHERE token = '{keep.rsplit('/', 1)[1]}'") == "1", (left, p.stderr)
    assert helpers.image_files(images_dir) == [] and helpers.pending_files(images_dir) == [], (
        helpers.image_files(images_dir)[:5], helpers.pending_files(images_dir), p.stderr)


# ------------------------------------------------------------------ auth and counters


def test_token_file_guards_every_upload_route(start_server, tmp_path):
    tok = tmp_path / "token"
    tok.write_text("s3cret-token-0123456789\n")
    srv = start_server(args=["--token-file", str(tok)])
    auth = {"Authorization": "Bearer s3cret-token-0123456789"}
    good = "/uploads/0123456789abcdef0123456789abcdef"
    requests = [("OPTIONS", "/uploads", {}, None), ("POST", "/uploads", dict(TUS, **{"Upload-Length": "5"}), None),
                ("HEAD", good, TUS, None), ("GET", good, {}, None), ("DELETE", good, TUS, None),
                ("PATCH", good, dict(TUS, **OCTETS, **{"Upload-Offset": "0"}), b"x"),
                ("POST", "/users", dict(DRAFT, **{"Upload-Complete": "?0"}), None)]
    for method, path, h, body in requests:
        r = call(srv, method, path, h, body)
        assert r.status == 401 and r.h("www-authenticate") == "Bearer", (method, path, r)
        r = call(srv, method, path, dict(h, **{"Authorization": "Bearer wrong-token-0123456789"}), body)
        assert r.status == 401, (method, path, r)
    loc = create_tus(srv, 5, auth).h("location")
    assert call(srv, "OPTIONS", "/uploads", auth).status == 204
    assert call(srv, "HEAD", loc, dict(TUS, **auth)).status == 200
    assert call(srv, "GET", loc, auth).status == 200
    assert call(srv, "DELETE", loc, dict(TUS, **auth)).status == 204
    assert call(srv, "POST", "/users", dict(DRAFT, **auth, **{"Upload-Complete": "?0"})).status == 201


def test_metrics_count_uploads(server):
    names = ("uploads_created_total", "uploads_completed_total", "uploads_resumed_total", "uploads_expired_total")
    before = {n: metric(server, n) for n in names}
    data = fixture_bytes()
    cut = data.index(b"\n", len(data) // 2) + 1
    loc = create_tus(server, len(data)).h("location")
    assert patch_tus(server, loc, 0, data[:cut]).status == 204
    assert patch_tus(server, loc, cut, data[cut:]).status == 204
    create_tus(server, 10)
    after = {n: metric(server, n) for n in names}
    assert after["uploads_created_total"] == before["uploads_created_total"] + 2
    assert after["uploads_completed_total"] == before["uploads_completed_total"] + 1
    assert after["uploads_resumed_total"] == before["uploads_resumed_total"] + 1
    assert after["uploads_expired_total"] == before["uploads_expired_total"]


def test_access_log_names_the_upload_routes(start_server, tmp_path):
    log = tmp_path / "access.log"
    srv = start_server(args=["--access-log", str(log)])
    loc = create_tus(srv, 10).h("location")
    head(srv, loc, TUS)
    call(srv, "OPTIONS", "/uploads")
    deadline = time.monotonic() + 10
    lines = []
    while time.monotonic() < deadline:
        lines = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
        if len([l for l in lines if l.get("path", "").startswith("/uploads")]) >= 3:
            break
        time.sleep(0.1)
    routes = {(l["method"], l["route"]) for l in lines}
    assert ("POST", "/uploads") in routes and ("HEAD", "/uploads/{token}") in routes, lines
    assert ("OPTIONS", "/uploads") in routes, lines


def test_delete_takes_over_a_running_append(server, db, images_dir):
    data = fixture_bytes()
    cut = data.index(b"\n", len(data) // 2) + 1
    loc = create_tus(server, len(data)).h("location")
    token = loc.rsplit("/", 1)[1]
    s = socket.create_connection((server.host, server.port), timeout=30)
    try:
        # an append that sent half its body and stalls, holding the upload's lock
        s.sendall((f"PATCH {loc} HTTP/1.1\r\nHost: localhost\r\nTus-Resumable: 1.0.0\r\n"
                   f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
                   f"Content-Length: {len(data)}\r\n\r\n").encode() + data[:cut])
        held = ("SELECT count(*) FROM pg_locks l, uploads u WHERE u.token = '" + token + "' AND l.locktype = "
                "'advisory' AND l.objsubid = 2 AND l.granted AND l.objid::bigint = (u.upload_id & 4294967295) "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())")
        deadline = time.monotonic() + 20
        while db.sql(held) == "0" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert db.sql(held) == "1", "the append holds the upload's lock"
        r = call(server, "DELETE", loc, TUS)
        assert r.status == 204, r
        assert head(server, loc, TUS).status == 404
        # the append that was taken over does not commit anything, and ends its connection
        s.settimeout(20)
        got = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        assert not got.startswith(b"HTTP/1.1 2"), got
    finally:
        s.close()
    assert db.sql("SELECT count(*) FROM uploads") == "0" and db.count_users() == 0
    deadline = time.monotonic() + 20
    while (helpers.image_files(images_dir) or helpers.pending_files(images_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert helpers.image_files(images_dir) == [] and helpers.pending_files(images_dir) == []
