"""Content-Digest (RFC 9530) on POST /users: sha-256 and sha-512 over the
content as received (after chunked framing, before gzip is inflated),
checked before COMMIT on the streaming path and before the ingest starts in
JSON-array mode; a mismatch is 400 with nothing committed; a malformed header
is 400 before a byte of the body is read."""
import base64
import hashlib
import json
import time

import pytest

import helpers
from checks import assert_error, assert_nothing_left, assert_success

MISMATCH = "Content-Digest {} does not match the content"


def b64(data):
    return base64.b64encode(data).decode()


def sha256(data):
    return "sha-256=:" + b64(hashlib.sha256(data).digest()) + ":"


def sha512(data):
    return "sha-512=:" + b64(hashlib.sha512(data).digest()) + ":"


def post_bytes(srv, tmp_path, data, digest=None, name="body", headers=(), **kw):
    hs = list(headers) + ([f"Content-Digest: {digest}"] if digest is not None else [])
    return helpers.post(srv, helpers.write(tmp_path / name, data), tmp_path, headers=hs, **kw)


def batches(db):
    return int(db.sql("SELECT count(*) FROM batches")) if db.table_exists("batches") else 0


def state(db, srv):
    """What is committed: users, batches, image files (pending journals included)."""
    return db.count_users(), batches(db), sorted(helpers.all_files(srv.images_dir))


def assert_mismatch(res, db, srv, alg="sha-256", before=None):
    """400 naming the algorithm, and nothing committed: no user, no batch, no file left (since `before`)."""
    j = assert_error(res, 400)
    assert j["error"] == MISMATCH.format(alg), j
    if before is None:
        assert_nothing_left(db, srv.images_dir)
        before = (0, 0, [])
    else:
        assert helpers.wait_for(lambda: state(db, srv) == before, timeout=3.0), (state(db, srv), before)
    assert batches(db) == before[1]


# ------------------------------------------------------------------ JSON Lines, streamed


def test_right_sha256(server, db, tmp_path):
    body = helpers.good_body("d256", n=5)
    res = post_bytes(server, tmp_path, body, sha256(body))
    assert_success(res, inserted=5, images=5)
    assert db.count_users() == 5


def test_right_sha512(server, db, tmp_path):
    body = helpers.good_body("d512", n=5)
    res = post_bytes(server, tmp_path, body, sha512(body))
    assert_success(res, inserted=5, images=5)


def test_right_both(server, db, tmp_path):
    body = helpers.good_body("dboth", n=5)
    res = post_bytes(server, tmp_path, body, f"{sha512(body)}, {sha256(body)}")
    assert_success(res, inserted=5, images=5)


@pytest.mark.parametrize("which", ["sha-256", "sha-512", "both-512-wrong"])
def test_wrong_digest_commits_nothing(server, db, tmp_path, which):
    """A body of 200 records with images: files are written while it streams; a wrong digest at its end leaves
    no row, no batch and no file."""
    body = helpers.good_body("dwrong", n=200, image_bytes=3000)
    other = body[:-2] + b" \n"  # one byte differs
    if which == "sha-256":
        digest, alg = sha256(other), "sha-256"
    elif which == "sha-512":
        digest, alg = sha512(other), "sha-512"
    else:
        digest, alg = f"{sha256(body)}, {sha512(other)}", "sha-512"
    res = post_bytes(server, tmp_path, body, digest)
    assert_mismatch(res, db, server, alg)
    # the server is fine afterwards, and the same body with its right digest goes in
    res = post_bytes(server, tmp_path, body, sha256(body))
    assert_success(res, inserted=200, images=200)


def test_wrong_digest_of_empty_body(server, db, tmp_path):
    res = post_bytes(server, tmp_path, b"", sha256(b"x"))
    assert_mismatch(res, db, server)
    res = post_bytes(server, tmp_path, b"", sha256(b""))
    assert_success(res, inserted=0)


def test_gzip_digest_is_over_the_compressed_bytes(server, db, tmp_path):
    body = helpers.good_body("dgz", n=20)
    gz = helpers.gzip_bytes(body)
    res = post_bytes(server, tmp_path, gz, sha256(gz), headers=["Content-Encoding: gzip"])
    assert_success(res, inserted=20, images=20)
    before = state(db, server)
    # the digest of the inflated text is not the digest of the content
    res = post_bytes(server, tmp_path, gz, sha256(body), headers=["Content-Encoding: gzip"])
    assert_mismatch(res, db, server, before=before)


def test_chunked_with_curl(server, db, tmp_path):
    body = helpers.good_body("dchunk", n=30)
    res = post_bytes(server, tmp_path, body, sha512(body), mode="chunked")
    assert_success(res, inserted=30, images=30)
    before = state(db, server)
    res = post_bytes(server, tmp_path, body, sha512(body + b"\n"), mode="chunked")
    assert_mismatch(res, db, server, "sha-512", before)


def raw_chunked(server, body, digest, piece=7, extra=()):
    """POST body in chunks of `piece` bytes (chunk extensions and a trailer included) from a raw socket."""
    head = helpers.post_head("/users", chunked=True, extra=[f"Content-Digest: {digest}"] + list(extra))
    framed = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(body[i:i + piece]), body[i:i + piece])
                      for i in range(0, len(body), piece))
    return helpers.raw_request(server.host, server.port, head + framed + b"0\r\nX-Trailer: 1\r\n\r\n")


def test_chunked_raw_small_chunks(server, db, tmp_path):
    """The framing is not part of the content: many 7-byte chunks hash as the plain body."""
    body = helpers.good_body("draw", n=10)
    status, _, resp = raw_chunked(server, body, sha256(body))
    assert status == 200, resp
    assert json.loads(resp)["inserted"] == 10
    before = state(db, server)
    status, _, resp = raw_chunked(server, body, sha256(b"%x\r\n" % len(body) + body))
    assert status == 400, resp
    assert json.loads(resp)["error"] == MISMATCH.format("sha-256")
    assert helpers.wait_for(lambda: state(db, server) == before, timeout=3.0)


def test_unknown_algorithm_only_is_not_checked(server, db, tmp_path):
    body = helpers.good_body("dunk", n=3)
    md5 = "md5=:" + b64(hashlib.md5(b"something else").digest()) + ":"
    res = post_bytes(server, tmp_path, body, md5)
    assert_success(res, inserted=3)
    res = post_bytes(server, tmp_path, body, f'sha-384=:{b64(bytes(48))}:, unixsum=12, x=("a" b);q=?0')
    assert_success(res, inserted=3)


def test_unknown_and_right_known(server, db, tmp_path):
    body = helpers.good_body("dunk2", n=3)
    md5 = "md5=:" + b64(hashlib.md5(b"something else").digest()) + ":"
    res = post_bytes(server, tmp_path, body, f"{md5}, {sha256(body)}")
    assert_success(res, inserted=3)
    before = state(db, server)
    res = post_bytes(server, tmp_path, body, f"{md5}, {sha256(body + b'x')}")
    assert_mismatch(res, db, server, before=before)


GOOD_256 = b64(bytes(32))
MALFORMED = [
    pytest.param("sha-256=" + GOOD_256, id="no-colons"),
    pytest.param("sha-256=:" + GOOD_256, id="no-closing-colon"),
    pytest.param("sha-256=:" + GOOD_256[:10] + "*" + GOOD_256[11:] + ":", id="bad-base64-char"),
    pytest.param("sha-256=:" + GOOD_256[:-2] + "=:", id="bad-padding"),
    pytest.param("sha-256=:" + b64(bytes(31)) + ":", id="short"),
    pytest.param("sha-512=:" + GOOD_256 + ":", id="sha512-of-32-bytes"),
    pytest.param("sha-256=\"" + GOOD_256 + "\"", id="string-not-bytes"),
    pytest.param("SHA-256=:" + GOOD_256 + ":", id="uppercase-key"),
    pytest.param("sha-256=:" + GOOD_256 + ":,", id="trailing-comma"),
    pytest.param("sha-256=:" + GOOD_256 + ": md5=:AAAA:", id="no-comma"),
    pytest.param("sha-256=:" + GOOD_256 + ":, sha-256=:" + GOOD_256 + ":", id="twice-in-one-line"),
    pytest.param("md5=:AA=A:", id="unknown-but-not-a-dictionary"),
    pytest.param("sha-256=:" + GOOD_256 + ":, x=\"" + "a" * 1100 + "\"", id="over-JI_MAX_CONTENT_DIGEST_BYTES"),
]


def head_refused_before_body(server, extra):
    """Sends only the head of a 10 MB upload: the answer must come without a byte of the body."""
    c = helpers.HTTPConn(server.host, server.port)
    try:
        c.send(helpers.post_head("/users", length=10_000_000, extra=extra))
        r = c.read_response()
        return r, c.closed_by_peer()
    finally:
        c.close()


@pytest.mark.parametrize("value", MALFORMED)
def test_malformed_header_is_400_before_the_body(server, db, value):
    r, closed = head_refused_before_body(server, [f"Content-Digest: {value}"])
    assert r.status == 400, r
    assert "Content-Digest" in json.loads(r.body)["error"], r
    assert closed
    assert db.count_users() == 0


def test_two_header_lines_are_400(server, db):
    body = b"x"
    r, closed = head_refused_before_body(server, [f"Content-Digest: {sha256(body)}",
                                                  f"Content-Digest: {sha512(body)}"])
    assert r.status == 400, r
    assert json.loads(r.body)["error"] == "more than one Content-Digest header"
    assert closed


# ------------------------------------------------------------------ JSON-array mode


def array_body(tag, n):
    return b"[" + b",".join(helpers.good_body(tag, n=n).strip().split(b"\n")) + b"]"


def test_array_right(server, db, tmp_path):
    body = array_body("darr", 5)
    res = post_bytes(server, tmp_path, body, f"{sha256(body)}, {sha512(body)}", query="format=array",
                     content_type="application/json")
    assert_success(res, inserted=5, images=5)


def test_array_wrong(server, db, tmp_path):
    body = array_body("darrw", 5)
    res = post_bytes(server, tmp_path, body, sha256(body[:-1]), query="format=array",
                     content_type="application/json")
    assert_mismatch(res, db, server)
    # found by its first byte, chunked, sha-512 wrong
    res = post_bytes(server, tmp_path, body, f"{sha256(body)}, {sha512(body + b' ')}",
                     content_type="application/json", mode="chunked")
    assert_mismatch(res, db, server, "sha-512")


def test_array_gzip(server, db, tmp_path):
    body = array_body("darrgz", 5)
    gz = helpers.gzip_bytes(body)
    hs = ["Content-Encoding: gzip"]
    res = post_bytes(server, tmp_path, gz, sha256(body), query="format=array", content_type="application/json",
                     headers=hs)
    assert_mismatch(res, db, server)
    res = post_bytes(server, tmp_path, gz, sha256(gz), query="format=array", content_type="application/json",
                     headers=hs)
    assert_success(res, inserted=5, images=5)


# ------------------------------------------------------------------ Idempotency-Key


def test_idempotency_replay_checks_the_digest(server, db, tmp_path):
    body = helpers.good_body("didem", n=4)
    key = ["Idempotency-Key: digest-key-1"]
    # a first request with a wrong digest fails and leaves the key free
    res = post_bytes(server, tmp_path, body, sha256(body + b"x"), headers=key)
    assert_mismatch(res, db, server)
    res = post_bytes(server, tmp_path, body, sha256(body), headers=key)
    first = assert_success(res, inserted=4)
    # a replay with a wrong digest is 400, not the kept answer
    before = state(db, server)
    res = post_bytes(server, tmp_path, body, sha512(body + b"x"), headers=key)
    assert_mismatch(res, db, server, "sha-512", before)
    # a replay with the right one (or none) is the kept answer
    res = post_bytes(server, tmp_path, body, sha512(body), headers=key)
    assert res.status == 200 and res.json()["batch_id"] == first["batch_id"], res
    res = post_bytes(server, tmp_path, body, headers=key)
    assert res.status == 200 and res.json()["batch_id"] == first["batch_id"], res
    assert db.count_users() == 4 and batches(db) == 1


def test_idempotency_replay_array_mode(server, db, tmp_path):
    body = array_body("didemarr", 3)
    key = ["Idempotency-Key: digest-key-2"]
    kw = dict(query="format=array", content_type="application/json", headers=key)
    first = assert_success(post_bytes(server, tmp_path, body, sha256(body), **kw), inserted=3)
    before = state(db, server)
    res = post_bytes(server, tmp_path, body, sha256(body + b" "), **kw)
    assert_mismatch(res, db, server, before=before)
    res = post_bytes(server, tmp_path, body, sha256(body), **kw)
    assert res.status == 200 and res.json()["batch_id"] == first["batch_id"], res
    assert db.count_users() == 3


# ------------------------------------------------------------------ bodies past the first MiB (the helper thread)


def test_big_body_hashed_by_the_helper(server, db, tmp_path):
    """~6 MB: past JI_DIGEST_INLINE_BYTES, through the 2 MiB ring more than twice; right, then one byte off."""
    body = helpers.good_body("dbig", n=60, image_bytes=75_000)
    assert len(body) > 5 << 20
    res = post_bytes(server, tmp_path, body, f"{sha256(body)}, {sha512(body)}", mode="upload")
    assert_success(res, inserted=60, images=60)
    before = state(db, server)
    other = body[:-3] + b" \n"
    res = post_bytes(server, tmp_path, body, f"{sha256(body)}, {sha512(other)}", mode="chunked")
    assert_mismatch(res, db, server, "sha-512", before)


def test_client_gone_mid_body_with_a_digest(server, db, tmp_path):
    """A client that disconnects halfway through a big body: the helper is stopped, nothing is left, the server
    goes on (under ASan: no leak, no use after free)."""
    body = helpers.good_body("dgone", n=60, image_bytes=75_000)
    c = helpers.HTTPConn(server.host, server.port)
    c.send(helpers.post_head("/users", length=len(body), extra=[f"Content-Digest: {sha512(body)}"]))
    c.send(body[:len(body) // 2])
    time.sleep(0.5)
    c.close()
    assert_nothing_left(db, server.images_dir)
    res = post_bytes(server, tmp_path, body, sha512(body), mode="upload")
    assert_success(res, inserted=60, images=60)
