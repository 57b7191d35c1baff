"""Streaming behaviour seen from a raw socket: work happens while the upload
is arriving, the first error is answered before the upload ends, and a client
that goes away mid-upload leaves nothing behind."""
import socket
import struct
import time

import pytest

import helpers
from checks import assert_error, assert_nothing_left, assert_serves_good_request, assert_success

HUGE = 100_000_000  # announced Content-Length, never sent in full


def records(tag, n, image_bytes):
    return [helpers.record_line(f"{tag} {i}", f"{tag}-{i}@example.com", helpers.png_bytes(image_bytes, f"{tag}{i}"))
            + b"\n" for i in range(n)]


def test_body_split_into_tiny_writes(server, db, tmp_path):
    """Lines, JSON tokens and base64 quads cut at every possible place."""
    body = helpers.good_body("tiny", n=3, image_bytes=300) + b"\r\n  \n" + helpers.good_body("tiny2", n=1)
    c = helpers.HTTPConn(server.host, server.port, timeout=15)
    try:
        c.send(helpers.post_head("/users", len(body)))
        for i in range(0, len(body), 7):
            c.send(body[i:i + 7])
            if i % 70 == 0:
                time.sleep(0.001)
        r = c.read_response()
    finally:
        c.close()
    assert_success(r, inserted=4, images=4, body_bytes=len(body))
    assert db.count_users() == 4


def test_images_written_while_upload_in_flight(server, db, tmp_path):
    """Streaming: image files appear before the body is complete; no row is
    visible before the commit; closing the connection then removes them."""
    c = helpers.HTTPConn(server.host, server.port, timeout=15)
    try:
        c.send(helpers.post_head("/users", HUGE))
        c.send(b"".join(records("inflight", 30, 20_000)))
        appeared = helpers.wait_for(lambda: helpers.all_files(server.images_dir), timeout=5)
        assert appeared, "no image file written within 5 s although 30 complete records were sent"
        assert db.count_users() == 0, "rows visible before the request committed"
    finally:
        c.close()
    time.sleep(1.0)
    assert_nothing_left(db, server.images_dir, settle=5)
    assert server.healthy()
    assert_serves_good_request(server, db, tmp_path)


EARLY = {
    # case: (server args, bytes sent after two good records, status, field)
    "malformed-400": ([], b'{"name": "x", "email": \n', 400, None),
    "invalid-422": ([], b'{"name": "x", "email": "not-an-email"}\n', 422, "email"),
    # a 1 MB line (no newline yet) against --max-record-bytes 100000
    "too-long-413": (["--max-record-bytes", "100000"],
                     b'{"name": "x", "email": "x@example.com", "image": "' + b"A" * 300_000, 413, None),
}


@pytest.mark.parametrize("case", list(EARLY))
def test_first_error_answered_before_upload_ends(start_server, db, tmp_path, case):
    args, bad, status, field = EARLY[case]
    srv = start_server(args=args)
    good = b"".join(records("early", 2, 20_000))
    c = helpers.HTTPConn(srv.host, srv.port, timeout=10)
    try:
        c.send(helpers.post_head("/users", HUGE) + good + bad)
        t0 = time.monotonic()
        try:
            r = c.read_response()  # the rest of the 100 MB body is never sent
        except socket.timeout:
            pytest.fail("no response within 10 s: the server waits for the rest of the upload")
        took = time.monotonic() - t0
        assert_error(r, status, line=3, field=field)
        assert c.closed_by_peer(5), "connection not closed after the early error response"
    finally:
        c.close()
    assert took < 10
    assert_nothing_left(db, srv.images_dir)
    assert_serves_good_request(srv, db, tmp_path)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_disconnects_mid_upload(server, db, tmp_path, how):
    """Content-Length 10 MB, a few hundred KB of good records with images, then
    the client goes away: no rows, no files, the server stays healthy."""
    c = helpers.HTTPConn(server.host, server.port, timeout=10)
    c.send(helpers.post_head("/users", 10_000_000))
    sent = 0
    for rec in records("gone", 20, 20_000):  # ~540 KB
        c.send(rec)
        sent += len(rec)
    c.send(b'{"name": "half a rec')  # and stop in the middle of a record
    time.sleep(0.5)  # let the server take in what was sent
    if how == "reset":
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    time.sleep(1.0)
    assert_nothing_left(db, server.images_dir, settle=5)
    assert server.alive()
    assert server.healthy()
    assert_serves_good_request(server, db, tmp_path)
    # and the aborted request did not commit late
    time.sleep(0.5)
    assert [r["email"] for r in db.users() if r["email"].startswith("gone-")] == []


def test_disconnect_during_chunked_upload(server, db, tmp_path):
    c = helpers.HTTPConn(server.host, server.port, timeout=10)
    c.send(helpers.post_head("/users", chunked=True))
    for rec in records("gonec", 10, 20_000):
        c.send(b"%x\r\n%s\r\n" % (len(rec), rec))
    time.sleep(0.5)
    c.close()
    time.sleep(1.0)
    assert_nothing_left(db, server.images_dir, settle=5)
    assert server.healthy()
    assert_serves_good_request(server, db, tmp_path)
