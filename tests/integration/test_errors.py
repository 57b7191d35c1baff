"""Every error class: right status, line and field; nothing committed, no file
left anywhere under the images dir, and the server still takes a good request."""
import time

import pytest

import helpers
from checks import assert_error, assert_nothing_left, assert_serves_good_request, assert_success

GOOD1 = helpers.record_line("good one", "good1@example.com", helpers.png_bytes(4000, "g1"))
GOOD2 = helpers.record_line("good two", "good2@example.com", helpers.png_bytes(4000, "g2"))


def body_with_line3(line3, after=b""):
    """Two good records with images, then the line under test (line 3)."""
    return GOOD1 + b"\n" + GOOD2 + b"\n" + line3 + b"\n" + after


def post_bytes(srv, tmp_path, data, name="body.jsonl", **kw):
    return helpers.post(srv, helpers.write(tmp_path / name, data), tmp_path, **kw)


def check_failed_cleanly(srv, db, tmp_path):
    assert_nothing_left(db, srv.images_dir)
    assert srv.alive(), "the server died"
    assert_serves_good_request(srv, db, tmp_path)


# ------------------------------------------------------------------ 400
MALFORMED = {
    "unterminated-object": b'{"name": "x", "email": "x@example.com"',
    "bad-literal": b'{"name": tru, "email": "x@example.com"}',
    "trailing-garbage": b'{"name": "x", "email": "x@example.com"} x',
    "unquoted-key": b'{name: "x", "email": "x@example.com"}',
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_400_malformed_json_on_line_3(server, db, tmp_path, case):
    res = post_bytes(server, tmp_path, body_with_line3(MALFORMED[case], after=GOOD1 + b"\n"))
    assert_error(res, 400, line=3)
    check_failed_cleanly(server, db, tmp_path)


INVALID_UTF8 = {
    "ff-byte": b"bad \xff name",
    "overlong": b"bad \xc0\xaf name",
    "encoded-surrogate": b"bad \xed\xa0\x80 name",
    "truncated-sequence": b"bad \xe4\xbd",
    "above-u10ffff": b"bad \xf4\x90\x80\x80 name",
}


@pytest.mark.parametrize("case", list(INVALID_UTF8))
def test_400_invalid_utf8(server, db, tmp_path, case):
    line = b'{"name": "' + INVALID_UTF8[case] + b'", "email": "u@example.com"}'
    res = post_bytes(server, tmp_path, body_with_line3(line))
    assert_error(res, 400, line=3)
    check_failed_cleanly(server, db, tmp_path)


def test_400_corrupt_gzip(server, db, tmp_path):
    gz = helpers.gzip_bytes(body_with_line3(GOOD1))
    corrupt = gz[:20] + bytes(b ^ 0x5A for b in gz[20:60]) + gz[60:]
    res = post_bytes(server, tmp_path, corrupt, headers=["Content-Encoding: gzip"])
    assert_error(res, 400)
    check_failed_cleanly(server, db, tmp_path)


def test_400_bad_chunked_framing(server, db, tmp_path):
    """A chunk size that is not hex: the server answers 400 and closes."""
    body = helpers.good_body("bc", n=2)
    c = helpers.HTTPConn(server.host, server.port)
    try:
        c.send(helpers.post_head("/users", chunked=True) + b"%x\r\n%s\r\nzz\r\nxxxx\r\n0\r\n\r\n" % (len(body), body))
        r = c.read_response()
        assert r.status == 400, r
        assert c.closed_by_peer(5), "connection not closed after the error"
    finally:
        c.close()
    check_failed_cleanly(server, db, tmp_path)


# ------------------------------------------------------------------ 422
LONG256 = "n" * 256
INVALID = {
    # id: (line 3, field)
    "missing-email": (b'{"name": "no email"}', "email"),
    "email-no-at": (b'{"name": "x", "email": "x.example.com"}', "email"),
    "email-two-ats": (b'{"name": "x", "email": "x@y@example.com"}', "email"),
    "email-nothing-before-at": (b'{"name": "x", "email": "@example.com"}', "email"),
    "email-nothing-after-at": (b'{"name": "x", "email": "x@"}', "email"),
    "email-empty": (b'{"name": "x", "email": ""}', "email"),
    "email-too-long": (('{"name": "x", "email": "' + "e" * 244 + '@example.com"}').encode(), "email"),
    "email-not-string": (b'{"name": "x", "email": 42}', "email"),
    "missing-name": (b'{"email": "x@example.com"}', "name"),
    "name-empty": (b'{"name": "", "email": "x@example.com"}', "name"),
    "name-256-chars": (('{"name": "' + LONG256 + '", "email": "x@example.com"}').encode(), "name"),
    "name-256-unicode-chars": (('{"name": "' + "é" * 256 + '", "email": "x@example.com"}').encode(), "name"),
    "name-not-string": (b'{"name": 42, "email": "x@example.com"}', "name"),
    "name-nul-escape": (b'{"name": "a\\u0000b", "email": "x@example.com"}', "name"),
    "name-unpaired-high-surrogate": (b'{"name": "a\\ud800b", "email": "x@example.com"}', "name"),
    "name-unpaired-low-surrogate": (b'{"name": "a\\udc00", "email": "x@example.com"}', "name"),
    "image-invalid-base64": (b'{"name": "x", "email": "x@example.com", "image": "iVBORw0K*not base64!"}',
                             "image"),
    "image-not-string": (b'{"name": "x", "email": "x@example.com", "image": 12345}', "image"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_422_invalid_record(server, db, tmp_path, case):
    line, field = INVALID[case]
    res = post_bytes(server, tmp_path, body_with_line3(line, after=GOOD1 + b"\n"))
    assert_error(res, 422, line=3, field=field)
    check_failed_cleanly(server, db, tmp_path)


# ------------------------------------------------------------------ 413
def test_413_record_over_max_record_bytes(start_server, db, tmp_path):
    srv = start_server(args=["--max-record-bytes", "1000"])
    line1 = helpers.record_line("small", "small@example.com")
    line2 = helpers.record_line("big", "big@example.com", helpers.png_bytes(3000, "big"))
    assert len(line1) < 1000 < len(line2)
    res = post_bytes(srv, tmp_path, line1 + b"\n" + line2 + b"\n" + line1 + b"\n")
    assert_error(res, 413, line=2)
    check_failed_cleanly(srv, db, tmp_path)


# ------------------------------------------------------------------ 415
@pytest.mark.parametrize("case", ["content-encoding-br", "content-encoding-compress", "format-xml"])
def test_415_unknown_encoding_or_format(server, db, tmp_path, case):
    kw = {}
    if case == "content-encoding-br":
        kw["headers"] = ["Content-Encoding: br"]
    elif case == "content-encoding-compress":
        kw["headers"] = ["Content-Encoding: compress"]
    else:
        kw["query"] = "format=xml"
    res = post_bytes(server, tmp_path, helpers.good_body("e415", n=2), **kw)
    assert_error(res, 415)
    check_failed_cleanly(server, db, tmp_path)


# ------------------------------------------------------------------ 503
@pytest.mark.timeout(90)
def test_503_database_unavailable_then_recovers(start_server, db, tmp_path, images_dir):
    """--db pointing at a closed port: 503 with Retry-After; once the database
    answers on that port, the same server ingests again."""
    # create the schema in the module database first with a normal server
    start_server(images_dir=str(tmp_path / "warmup")).stop()
    users_before = db.count_users()
    port = helpers.free_port()
    closed_db = helpers.conninfo_with(db.url, host="127.0.0.1", port=port)
    srv = start_server(db=closed_db)
    body = helpers.write(tmp_path / "b.jsonl", helpers.fixture_bytes("basic.jsonl"))
    res = helpers.post(srv, body, tmp_path)
    assert_error(res, 503)
    retry = res.headers.get("retry-after")
    assert retry is not None, f"503 without Retry-After: {res.headers}"
    assert retry.strip().isdigit(), f"Retry-After {retry!r} is not delay-seconds"
    assert_nothing_left(db, images_dir, users_before)
    assert srv.alive()

    # the database comes back on that port
    target_host, target_port = helpers.conninfo_hostport(db.url)
    proxy = helpers.TcpProxy(port, target_host, target_port)
    try:
        deadline = time.monotonic() + min(int(retry), 30) + 15
        while True:
            res = helpers.post(srv, body, tmp_path)
            if res.status != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert_success(res, inserted=10, images=6)
        assert db.count_users() == users_before + 10
    finally:
        proxy.close()


# ------------------------------------------------------------------ nothing after a failure leaks into the next request
def test_error_then_good_request_on_new_connection_has_only_its_rows(server, db, tmp_path):
    res = post_bytes(server, tmp_path, body_with_line3(b'{"name": "x"}'))
    assert_error(res, 422, line=3, field="email")
    good = helpers.good_body("next", n=2)
    res2 = post_bytes(server, tmp_path, good, name="good.jsonl")
    j = assert_success(res2, inserted=2)
    assert [r["email"] for r in db.users()] == ["next-0@example.com", "next-1@example.com"]
    assert j["first_user_id"] == db.users()[0]["user_id"]
