"""Faults and limits against the real binary and a real PostgreSQL: --max-ingests,
--idle-timeout, oversize heads, framing, gzip, --token-file, Idempotency-Key, a
lost database, a full disk, SIGTERM, kill -9 and gc, and skip mode with a mix of
bad records. Every test checks the status, the error JSON, the users rows, and
that no image file (nor anything under .pending/) is left behind by a request
that finished or failed."""
import base64
import os
import select
import signal
import socket
import subprocess
import threading
import time

import pytest

import helpers
from checks import assert_error, assert_nothing_left, assert_success, check_image_row

PNG = "image/png"


# ------------------------------------------------------------------ local helpers
def records(tag, n, image_bytes=300):
    """[(name, email, image bytes)] of n good records with PNG images."""
    return [(f"{tag} {i}", f"{tag}-{i}@example.com", helpers.png_bytes(image_bytes, f"{tag}-{i}"))
            for i in range(n)]


def body_of(recs):
    return b"".join(helpers.record_line(n, e, img) + b"\n" for n, e, img in recs)


def post_bytes(srv, tmp_path, data, name="body.jsonl", **kw):
    return helpers.post(srv, helpers.write(tmp_path / name, data), tmp_path, **kw)


def check_committed(db, images_dir, recs, where="true"):
    """The rows are exactly recs (in order), each image byte-identical, and the files
    under the images dir are exactly the committed ones (.pending/ empty)."""
    rows = db.users(where)
    assert [(r["name"], r["email"]) for r in rows] == [(n, e) for n, e, _ in recs]
    for r, (_, _, img) in zip(rows, recs):
        if img is None:
            assert r["image_path"] is None, r
        else:
            check_image_row(r, images_dir, img, PNG)
    assert helpers.pending_files(images_dir) == [], helpers.pending_files(images_dir)
    on_disk = set(helpers.image_files(images_dir))
    in_db = {r["image_path"] for r in db.users() if r["image_path"]}
    assert on_disk == in_db, f"files on disk not matching committed rows: {sorted(on_disk ^ in_db)[:10]}"
    return rows


def assert_failed_cleanly(db, images_dir, users_before, settle=3.0):
    """After a failed request with earlier commits: no new rows, and the only files
    under the images dir are those of committed rows (.pending/ empty)."""
    def clean():
        in_db = {r["image_path"] for r in db.users() if r["image_path"]}
        return set(helpers.all_files(images_dir)) == in_db
    if not helpers.wait_for(clean, timeout=settle):
        in_db = {r["image_path"] for r in db.users() if r["image_path"]}
        extra = sorted(set(helpers.all_files(images_dir)) - in_db)
        raise AssertionError(f"files left under the images dir: {extra[:10]}")
    assert db.count_users() == users_before


def check_retry_after(res):
    retry = res.headers.get("retry-after")
    assert retry is not None, f"{res.status} without Retry-After: {res.headers}"
    assert retry.strip().isdigit(), f"Retry-After {retry!r} is not delay-seconds"
    return int(retry)


class Upload:
    """POST /users on a raw socket, its body sent piece by piece. send() stops as soon
    as the server answers (or closes), so an early answer is never lost."""

    def __init__(self, srv, length=None, headers=(), path="/users", chunked=False, timeout=20,
                 content_type="application/x-ndjson"):
        self.timeout = timeout
        self.conn = helpers.HTTPConn(srv.host, srv.port, timeout=timeout)
        self.answered = False
        self.conn.send(helpers.post_head(path, length, content_type=content_type, extra=headers,
                                         chunked=chunked))

    def send(self, data):
        """True when every byte went out, False when the server answered or closed first."""
        if self.answered:
            return False
        sock = self.conn.sock
        view = memoryview(data)
        sock.setblocking(False)
        try:
            deadline = time.monotonic() + self.timeout
            while view:
                if time.monotonic() > deadline:
                    raise TimeoutError("the server did not take the body")
                r, w, _ = select.select([sock], [sock], [], 1.0)
                if r:
                    self.answered = True
                    return False
                if w:
                    try:
                        n = sock.send(view)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except (BrokenPipeError, ConnectionResetError):
                        self.answered = True
                        return False
                    view = view[n:]
            return True
        finally:
            sock.setblocking(True)
            sock.settimeout(self.timeout)

    def send_slowly(self, data, pieces, delay):
        step = max(1, -(-len(data) // pieces))
        for i in range(0, len(data), step):
            if not self.send(data[i:i + step]):
                return False
            time.sleep(delay)
        return True

    def response(self, timeout=None):
        self.conn.sock.settimeout(timeout or self.timeout)
        return self.conn.read_response()

    def close(self):
        self.conn.close()


def metric(srv, name):
    st, _, body = helpers.raw_request(srv.host, srv.port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n"
                                      b"Connection: close\r\n\r\n", timeout=5)
    assert st == 200, body[:200]
    for line in body.decode().splitlines():
        if line.startswith(f"jsonl_ingest_{name} "):
            return int(float(line.split()[1]))
    raise AssertionError(f"metric jsonl_ingest_{name} not in /metrics")


def copy_in_progress(db):
    """A COPY into users is running in the module's database (an ingest is streaming). The COPY ends the message
    that opens the ingest's transaction: the query text is that whole message."""
    return int(db.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                      "AND pid <> pg_backend_pid() AND state <> 'idle' AND query LIKE '%COPY users %FROM STDIN'")) > 0


def get_status(srv, path, headers=()):
    head = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n" + "".join(h + "\r\n" for h in headers) + "Connection: close\r\n\r\n"
    st, _, _ = helpers.raw_request(srv.host, srv.port, head.encode(), timeout=5)
    return st


# ------------------------------------------------------------------ 1. --max-ingests
@pytest.mark.timeout(30)
def test_max_ingests_503_while_one_upload_is_held_open(start_server, db, tmp_path):
    srv = start_server(args=["--max-ingests", "1"])
    held = records("held", 6, image_bytes=2000)
    body = body_of(held)
    cut = len(body_of(held[:3]))
    up = Upload(srv, len(body))
    try:
        assert up.send(body[:cut])
        assert helpers.wait_for(lambda: metric(srv, "ingests_in_flight") == 1, timeout=5), \
            "the held upload never showed up as an ingest in flight"
        # a second upload while the first holds the only slot
        res = post_bytes(srv, tmp_path, body_of(records("second", 3)), name="second.jsonl")
        assert_error(res, 503)
        check_retry_after(res)
        assert db.count_users() == 0
        # the first completes
        assert up.send(body[cut:])
        assert_success(up.response(), inserted=6, images=6, body_bytes=len(body))
    finally:
        up.close()
    check_committed(db, srv.images_dir, held)
    # and the slot is free again
    third = records("third", 3)
    res = post_bytes(srv, tmp_path, body_of(third), name="third.jsonl")
    assert_success(res, inserted=3, images=3)
    assert db.count_users() == 9
    check_committed(db, srv.images_dir, held + third)


# ------------------------------------------------------------------ 2. --idle-timeout
@pytest.mark.timeout(30)
def test_idle_timeout_cuts_a_stalled_body_but_not_a_slow_steady_one(start_server, db, tmp_path):
    srv = start_server(args=["--idle-timeout", "1"])
    recs = records("stall", 6, image_bytes=3000)
    body = body_of(recs)
    up = Upload(srv, len(body))
    try:
        assert up.send(body[:len(body) * 2 // 3])  # four records and a bit, then nothing
        t0 = time.monotonic()
        try:
            res = up.response(timeout=6)
        except socket.timeout:
            pytest.fail("stalled request not answered within 6 s (--idle-timeout 1)")
        waited = time.monotonic() - t0
        # docs/api.md: a body that stalls gets 400 "request body stalled ...", then the connection closes
        j = assert_error(res, 400)
        assert j["error"].startswith("request body stalled"), j
        assert waited < 5, f"stalled request cut only after {waited:.1f} s (--idle-timeout 1)"
        assert up.conn.closed_by_peer(5), "connection not closed after the idle-timeout answer"
    finally:
        up.close()
    assert_nothing_left(db, srv.images_dir)

    # 10 pieces, 300 ms apart: 3 s in all, never 1 s without a byte
    steady = records("steady", 10, image_bytes=1000)
    body = body_of(steady)
    up = Upload(srv, len(body))
    try:
        t0 = time.monotonic()
        assert up.send_slowly(body, pieces=10, delay=0.3), "the server answered before the body was sent"
        res = up.response()
        assert time.monotonic() - t0 > 2.5
    finally:
        up.close()
    assert_success(res, inserted=10, images=10, body_bytes=len(body))
    check_committed(db, srv.images_dir, steady)


# ------------------------------------------------------------------ 3. 431
def head_answer(srv, parts, timeout=5):
    """Send the pieces of a request one write each, 1 ms apart (a slow client); the
    answer, or a string saying what happened instead."""
    c = helpers.HTTPConn(srv.host, srv.port, timeout=timeout)
    try:
        try:
            for p in parts:
                c.send(p)
                time.sleep(0.001)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return c.read_response()
    except socket.timeout:
        return f"no answer within {timeout} s"
    except (ConnectionError, OSError) as e:
        return f"closed without an answer ({e!r})"
    finally:
        c.close()


def test_431_request_head_over_16_kib(server, db, tmp_path):
    body = body_of(records("big-head", 2))
    start = b"POST /users HTTP/1.1\r\nHost: localhost\r\n"
    cases = {
        # a few long header lines, written one by one, the head never ends
        "10 long headers, one write each": [start] + [f"X-H{i}: {'v' * 2000}\r\n".encode() for i in range(10)],
        # a complete ~20 KiB head with its body in one write (what a real client sends)
        "complete 20 KiB head and body in one write": [
            helpers.post_head("/users", len(body), extra=["X-Padding: " + "p" * (20 * 1024)]) + body],
        # many short header lines (more than the front door's 64), one write each, past 16 KiB
        "300 short headers, one write each": [start] + [f"X-H{i}: {'v' * 60}\r\n".encode() for i in range(300)],
    }
    problems = []
    for name, parts in cases.items():
        assert sum(map(len, parts)) > 16 * 1024
        res = head_answer(server, parts)
        if isinstance(res, str) or res.status != 431:
            problems.append(f"{name}: {res}")
            continue
        assert_error(res, 431)
    assert not problems, "no 431 for a head over 16 KiB:\n  " + "\n  ".join(problems)
    assert_nothing_left(db, server.images_dir)
    assert server.alive()


# ------------------------------------------------------------------ 4. framing
def test_400_content_length_with_chunked_and_bad_chunk_size(server, db, tmp_path):
    body = body_of(records("frame", 3))
    # both framings at once: request smuggling material, refused from the head
    head = helpers.post_head("/users", len(body), extra=["Transfer-Encoding: chunked"])
    c = helpers.HTTPConn(server.host, server.port)
    try:
        c.send(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        res = c.read_response()
    finally:
        c.close()
    assert_error(res, 400)
    assert_nothing_left(db, server.images_dir)

    # a first chunk of good records with images (written), then a chunk-size line "zz"
    good = body_of(records("chunk", 20, image_bytes=4000))
    up = Upload(server, chunked=True)
    try:
        up.send(b"%x\r\n%s\r\n" % (len(good), good))
        assert helpers.wait_for(lambda: helpers.image_files(server.images_dir), timeout=5), \
            "the first chunk's images were never written"
        up.send(b"zz\r\n" + body + b"\r\n0\r\n\r\n")
        res = up.response()
    finally:
        up.close()
    assert_error(res, 400)
    assert_nothing_left(db, server.images_dir)
    # the server still ingests
    ok = records("after-frame", 2)
    assert_success(post_bytes(server, tmp_path, body_of(ok)), inserted=2, images=2)
    check_committed(db, server.images_dir, ok)


# ------------------------------------------------------------------ 5. gzip
@pytest.mark.timeout(40)
def test_gzip_valid_corrupt_too_large_and_trailing_bytes(start_server, db, tmp_path):
    srv = start_server(args=["--max-inflated-bytes", "100000"])
    gz_hdr = ["Content-Encoding: gzip"]

    # valid: images byte-identical, "bytes" counts the inflated body
    good = records("gz", 8, image_bytes=5000)
    body = body_of(good)
    assert len(body) < 100000
    res = post_bytes(srv, tmp_path, helpers.gzip_bytes(body), name="good.gz", headers=gz_hdr)
    j = assert_success(res, inserted=8, images=8, body_bytes=len(body))
    check_committed(db, srv.images_dir, good, where=f"batch_id = {j['batch_id']}")

    # corrupt: bytes flipped well inside the stream (after some records inflated)
    big = body_of(records("gzc", 12, image_bytes=5000))
    assert len(big) < 100000
    gz = helpers.gzip_bytes(big)
    at = len(gz) * 2 // 3
    corrupt = gz[:at] + bytes(b ^ 0x5A for b in gz[at:at + 64]) + gz[at + 64:]
    res = post_bytes(srv, tmp_path, corrupt, name="corrupt.gz", headers=gz_hdr)
    assert_error(res, 400)
    assert_failed_cleanly(db, srv.images_dir, 8)
    check_committed(db, srv.images_dir, good)

    # inflates past --max-inflated-bytes 100000: highly compressible images (zeros)
    zeros = [(f"zz {i}", f"zz-{i}@example.com", helpers.PNG_SIGNATURE + bytes(6000)) for i in range(40)]
    zbody = body_of(zeros)
    zgz = helpers.gzip_bytes(zbody)
    assert len(zbody) > 300000 and len(zgz) < 20000
    res = post_bytes(srv, tmp_path, zgz, name="bomb.gz", headers=gz_hdr)
    assert_error(res, 413)
    assert_failed_cleanly(db, srv.images_dir, 8)
    check_committed(db, srv.images_dir, good)

    # bytes after the end of the gzip stream
    tail = records("gzt", 3)
    res = post_bytes(srv, tmp_path, helpers.gzip_bytes(body_of(tail)) + b"trailing junk\n", name="tail.gz",
                     headers=gz_hdr)
    assert_error(res, 400)
    assert_failed_cleanly(db, srv.images_dir, 8)
    check_committed(db, srv.images_dir, good)


def test_gzip_two_members_in_separate_writes(server, db, tmp_path):
    """A multi-member gzip body (cat a.gz b.gz) is one body, whatever the read boundaries."""
    first, second = records("gm1", 3, image_bytes=2000), records("gm2", 2, image_bytes=2000)
    a, b = helpers.gzip_bytes(body_of(first)), helpers.gzip_bytes(body_of(second))
    up = Upload(server, length=len(a) + len(b), headers=["Content-Encoding: gzip"])
    try:
        assert up.send(a)
        time.sleep(0.3)  # the first member is inflated and fed before the second arrives
        assert up.send(b)
        res = up.response()
    finally:
        up.close()
    assert res.status == 200, res.body
    assert res.json()["inserted"] == 5
    check_committed(db, server.images_dir, first + second)


# ------------------------------------------------------------------ 6. --token-file
def test_token_file_401_from_the_head_and_200_with_the_token(start_server, db, tmp_path):
    token = "s3cr3t-T0ken_value"
    tf = helpers.write(tmp_path / "token", (token + "\n").encode())
    srv = start_server(args=["--token-file", tf])
    body = body_of(records("tok", 3))

    for hdrs in ([], ["Authorization: Bearer wrong-token"], [f"Authorization: Basic {token}"],
                 [f"Authorization: Bearer {token}x"]):
        res = post_bytes(srv, tmp_path, body, headers=hdrs)
        assert_error(res, 401)
        assert res.headers.get("www-authenticate", "").lower().startswith("bearer"), res.headers
    assert_nothing_left(db, srv.images_dir)

    # only the head, announcing 1 MB that never comes: the 401 comes at once
    c = helpers.HTTPConn(srv.host, srv.port, timeout=5)
    try:
        t0 = time.monotonic()
        c.send(helpers.post_head("/users", 1000000))
        res = c.read_response()
        took = time.monotonic() - t0
    finally:
        c.close()
    assert_error(res, 401)
    assert res.headers.get("www-authenticate", "").lower().startswith("bearer"), res.headers
    assert took < 2, f"401 took {took:.1f} s: the server waited for the body"

    assert get_status(srv, "/healthz") == 200
    recs = records("tok", 3)
    res = post_bytes(srv, tmp_path, body_of(recs), headers=[f"Authorization: Bearer {token}"])
    assert_success(res, inserted=3, images=3)
    check_committed(db, srv.images_dir, recs)


# ------------------------------------------------------------------ 7. Idempotency-Key
@pytest.mark.timeout(40)
def test_idempotency_key_replay_race_and_failed_key_stays_free(server, db, tmp_path):
    # same key twice: the same answer byte for byte, rows once
    recs = records("idem", 4)
    hdr = ["Idempotency-Key: key-one"]
    r1 = post_bytes(server, tmp_path, body_of(recs), headers=hdr)
    j1 = assert_success(r1, inserted=4, images=4)
    r2 = post_bytes(server, tmp_path, body_of(recs), headers=hdr)
    assert r2.status == 200, r2
    assert r2.body == r1.body
    assert db.count_users() == 4
    check_committed(db, server.images_dir, recs)

    # two racing requests with one key, slow bodies: the second is 409 while the first runs; rows once
    race = records("race", 10, image_bytes=2000)
    rbody = body_of(race)
    results = [None, None]

    def run(i):
        up = Upload(server, len(rbody), headers=["Idempotency-Key: key-race"], timeout=20)
        try:
            up.send_slowly(rbody, pieces=6, delay=0.2)
            results[i] = up.response()
        except Exception as e:  # noqa: BLE001
            results[i] = e
        finally:
            up.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(25)
    a, b = results
    assert isinstance(a, helpers.RawResponse) and isinstance(b, helpers.RawResponse), results
    assert sorted((a.status, b.status)) == [200, 409], results
    if a.status != 200:
        a, b = b, a
    ja = a.json()
    assert ja["inserted"] == 10, ja
    assert db.count_users() == 14
    again = post_bytes(server, tmp_path, rbody, headers=["Idempotency-Key: key-race"])
    assert again.status == 200 and again.body == a.body, "the key did not replay the first answer byte for byte"
    check_committed(db, server.images_dir, race, where=f"batch_id = {ja['batch_id']}")

    # a key whose request failed (422) is not reserved
    bad = body_of(records("fix", 2)) + b'{"name": "no email"}\n'
    hdr = ["Idempotency-Key: key-fix"]
    res = post_bytes(server, tmp_path, bad, headers=hdr)
    assert_error(res, 422, line=3, field="email")
    assert_failed_cleanly(db, server.images_dir, 14)
    fixed = records("fix", 3)
    r3 = post_bytes(server, tmp_path, body_of(fixed), headers=hdr)
    j3 = assert_success(r3, inserted=3, images=3)
    assert j3["batch_id"] not in (j1["batch_id"], ja["batch_id"])
    r4 = post_bytes(server, tmp_path, body_of(fixed), headers=hdr)
    assert r4.status == 200 and r4.body == r3.body
    assert db.count_users() == 17
    check_committed(db, server.images_dir, fixed, where=f"batch_id = {j3['batch_id']}")


# ------------------------------------------------------------------ 8. database lost mid-upload
@pytest.mark.timeout(60)
def test_database_lost_mid_upload_503_then_recovers(start_server, db, tmp_path):
    port = helpers.free_port()
    real_host, real_port = helpers.conninfo_hostport(db.url)
    proxy = helpers.TcpProxy(port, real_host, real_port)
    try:
        srv = start_server(db=helpers.conninfo_with(db.url, host="127.0.0.1", port=port))
        recs = records("lost", 30, image_bytes=20000)
        body = body_of(recs)
        first = len(body_of(recs[:8]))
        up = Upload(srv, len(body))
        try:
            assert up.send(body[:first])
            assert helpers.wait_for(lambda: copy_in_progress(db), timeout=10), "no COPY running"
            assert helpers.wait_for(lambda: len(helpers.image_files(srv.images_dir)) >= 2, timeout=10), \
                "no image written yet"
            proxy.cut()
            up.send(body[first:])
            res = up.response()
        finally:
            up.close()
        assert_error(res, 503)
        check_retry_after(res)
        # checked on the real database port, not through the forwarder
        assert_nothing_left(db, srv.images_dir)
        assert srv.alive()

        # the database comes back on the same port: the same server ingests again
        proxy = helpers.TcpProxy(port, real_host, real_port)
        assert helpers.wait_for(lambda: get_status(srv, "/readyz") == 200, timeout=15), "/readyz never 200"
        again = records("back", 3)
        res = post_bytes(srv, tmp_path, body_of(again), name="again.jsonl")
        assert_success(res, inserted=3, images=3)
        check_committed(db, srv.images_dir, again)
    finally:
        proxy.cut()


# ------------------------------------------------------------------ 9. disk full
@pytest.mark.timeout(40)
def test_507_images_dir_full(start_server, db, tmp_path):
    mnt = str(tmp_path / "small-images")
    os.mkdir(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", mnt], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 512 KiB tmpfs (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    srv = None
    try:
        srv = start_server(images_dir=mnt)
        recs = records("full", 10, image_bytes=100000)  # 1 MB of images into 512 KiB
        res = post_bytes(srv, tmp_path, body_of(recs), name="full.jsonl")
        j = assert_error(res, 507)
        assert isinstance(j.get("line"), int) and 1 <= j["line"] <= 10, j
        assert_nothing_left(db, mnt)
        assert srv.alive()
        # space is back (the failed request's files are gone): small images fit
        ok = records("fits", 3)
        assert_success(post_bytes(srv, tmp_path, body_of(ok), name="ok.jsonl"), inserted=3, images=3)
        check_committed(db, mnt, ok)
    finally:
        if srv is not None:
            srv.stop()
        if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mnt], capture_output=True)


# ------------------------------------------------------------------ 10. SIGTERM
def refuses_new_connections(srv):
    """Connections are refused, or accepted by no one (no answer to GET /healthz)."""
    try:
        s = socket.create_connection((srv.host, srv.port), timeout=0.5)
    except OSError:
        return True
    try:
        s.settimeout(1.0)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        return s.recv(100) == b""
    except (socket.timeout, OSError):
        return True
    finally:
        s.close()


@pytest.mark.timeout(40)
def test_sigterm_finishes_the_upload_in_flight_then_exits_0(start_server, db, tmp_path):
    srv = start_server()
    recs = records("term", 8, image_bytes=3000)
    body = body_of(recs)
    half = len(body_of(recs[:4]))
    up = Upload(srv, len(body))
    try:
        assert up.send(body[:half])
        assert helpers.wait_for(lambda: copy_in_progress(db), timeout=10), "no COPY running"
        srv.proc.send_signal(signal.SIGTERM)
        assert helpers.wait_for(lambda: refuses_new_connections(srv), timeout=5, interval=0.2), \
            "new connections still served after SIGTERM"
        assert srv.alive(), "exited with an upload in flight"
        assert up.send(body[half:]), "the upload in flight was cut by SIGTERM"
        res = up.response()
    finally:
        up.close()
    assert_success(res, inserted=8, images=8, body_bytes=len(body))
    try:
        rc = srv.proc.wait(5)
    except subprocess.TimeoutExpired:
        pytest.fail("still running 5 s after SIGTERM and the last request")
    assert rc == 0, f"exit status {rc}"
    check_committed(db, srv.images_dir, recs)


def test_stop_and_continue_keeps_every_loop_serving(start_server, db, tmp_path):
    """SIGSTOP then SIGCONT makes epoll_wait fail with EINTR in every idle loop: the loops go on, the upload in
    flight (its loop idle, waiting for the body) completes, and new requests and an export are answered."""
    srv = start_server()
    recs = records("stop", 8, image_bytes=3000)
    body = body_of(recs)
    half = len(body_of(recs[:4]))
    up = Upload(srv, len(body))
    try:
        assert up.send(body[:half])
        assert helpers.wait_for(lambda: copy_in_progress(db), timeout=10), "no COPY running"
        time.sleep(0.3)  # every loop back in epoll_wait
        srv.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.3)
        srv.proc.send_signal(signal.SIGCONT)
        time.sleep(0.5)
        assert srv.alive(), "the server exited after SIGSTOP/SIGCONT"
        assert up.send(body[half:]), "the upload in flight was cut"
        res = up.response()
    finally:
        up.close()
    assert_success(res, inserted=8, images=8, body_bytes=len(body))
    check_committed(db, srv.images_dir, recs)
    for _ in range(8):  # connections land on either loop
        assert srv.healthy()
    st, _, body = helpers.raw_request(srv.host, srv.port, b"GET /users HTTP/1.1\r\nHost: localhost\r\n"
                                      b"Connection: close\r\n\r\n")
    assert st == 200 and body.count(b"\n") == 8, (st, body[:300])


# ------------------------------------------------------------------ 11. kill -9, gc, start-up clean-up
def upload_then_kill(srv, db, tag):
    """Start an upload with images, SIGKILL the server once some images are on disk."""
    recs = records(tag, 30, image_bytes=20000)
    body = body_of(recs)
    up = Upload(srv, len(body))
    try:
        assert up.send(body[:len(body_of(recs[:10]))])
        assert helpers.wait_for(lambda: len(helpers.image_files(srv.images_dir)) >= 3, timeout=10), \
            "no image written before the kill"
        srv.proc.kill()
        srv.proc.wait(5)
    finally:
        up.close()
    assert db.count_users() == 0


@pytest.mark.timeout(60)
def test_kill_9_mid_upload_gc_and_startup_remove_leftovers(start_server, db, tmp_path, images_dir):
    srv = start_server(images_dir=images_dir)
    upload_then_kill(srv, db, "kill-a")
    left = helpers.all_files(images_dir)
    r = subprocess.run([helpers.BINARY, "gc", "--db", db.url, "--images-dir", images_dir],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"gc exited {r.returncode}: {r.stdout}{r.stderr}"
    assert helpers.all_files(images_dir) == [], \
        f"gc left {helpers.all_files(images_dir)[:10]} (of {len(left)} before)"
    assert db.count_users() == 0

    # another kill -9; this time a restart cleans up
    srv2 = start_server(images_dir=images_dir)
    upload_then_kill(srv2, db, "kill-b")
    assert helpers.all_files(images_dir), "nothing left to clean up (the kill came too late?)"
    srv3 = start_server(images_dir=images_dir)
    assert helpers.wait_for(lambda: helpers.all_files(images_dir) == [], timeout=10), \
        f"leftovers after restart: {helpers.all_files(images_dir)[:10]}"
    assert db.count_users() == 0
    ok = records("after-kill", 3)
    assert_success(post_bytes(srv3, tmp_path, body_of(ok)), inserted=3, images=3)
    check_committed(db, images_dir, ok)


# ------------------------------------------------------------------ 12. on_error=skip with a mix
def test_skip_mode_mix_of_bad_records(start_server, db, tmp_path):
    srv = start_server(args=["--max-record-bytes", "6000"])
    good = records("mix", 3, image_bytes=1500)
    lines = [
        helpers.record_line(*good[0]),                                            # 1 good
        b'{"name": "broken", "email": "broken@example.com"',                       # 2 malformed JSON
        helpers.record_line(*good[1]),                                            # 3 good
        b'{"name": "no email", "image": "' + base64.b64encode(helpers.png_bytes(1500, "ne")) + b'"}',  # 4 no email
        helpers.record_line("bad b64", "b64@example.com",                         # 5 invalid: image,
                            base64.b64encode(helpers.png_bytes(3000, "b64")).decode()
                            + "*!not base64"),                                    #   late in the string
        helpers.record_line("too big", "big@example.com", helpers.png_bytes(8000, "big")),  # 6 oversize
        helpers.record_line(*good[2]),                                            # 7 good
    ]
    assert len(lines[4]) < 6000 < len(lines[5])
    body = b"\n".join(lines) + b"\n"
    res = post_bytes(srv, tmp_path, body, query="on_error=skip")
    assert res.status == 200, res
    j = res.json()
    assert (j["inserted"], j["skipped"], j["lines"], j["images"]) == (3, 4, 7, 3), j
    errs = j.get("errors")
    assert isinstance(errs, list) and [e.get("line") for e in errs] == [2, 4, 5, 6], j
    for e in errs:
        assert isinstance(e.get("error"), str) and e["error"], e
    by_line = {e["line"]: e for e in errs}
    assert by_line[4].get("field") == "email", by_line[4]
    assert by_line[5].get("field") == "image", by_line[5]
    assert j["last_user_id"] - j["first_user_id"] == 2, j
    check_committed(db, srv.images_dir, good)
