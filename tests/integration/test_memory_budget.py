"""--max-memory: one process-wide budget for what uploads hold. Every upload
reserves its worst case (JI_UPLOAD_FIXED_BYTES plus twice --max-record-bytes,
or its --max-array-memory) before its body is read; past the budget it gets
503. Peak RSS stays under the budget whatever the load: many concurrent
uploads of max-size records plus abandoned ones."""
import base64
import os
import socket
import subprocess
import threading
import time

import pytest

import helpers

MIB = 1 << 20
RECORD_BYTES = 4 * MIB
BUDGET = 160 * MIB


def big_record(i):
    image = base64.b64encode(helpers.png_bytes(RECORD_BYTES * 3 // 4 - 4096, f"big-{i % 4}")).decode()
    return helpers.record_line(f"big {i}", f"big{i}@example.com", image) + b"\n"


@pytest.mark.memory
@pytest.mark.timeout(240)
def test_peak_rss_stays_under_max_memory(start_server, db, figures):
    srv = start_server(args=["--max-record-bytes", str(RECORD_BYTES), "--max-memory", str(BUDGET),
                             "--max-ingests", "64", "--max-client-ingests", "0", "--threads", "2"])
    bodies = [big_record(i) for i in range(4)]
    assert all(len(b) < RECORD_BYTES for b in bodies)
    statuses = []
    lock = threading.Lock()

    def upload(i):
        body = bodies[i % 4]
        c = helpers.HTTPConn(srv.host, srv.port, timeout=120)
        try:
            c.send(helpers.post_head("/users", length=len(body)))
            for off in range(0, len(body), 256 * 1024):
                c.send(body[off:off + 256 * 1024])
            st = c.read_response().status
        except (ConnectionError, OSError):
            st = "reset"
        finally:
            c.close()
        with lock:
            statuses.append(st)

    def abandon(i):
        body = bodies[i % 4]
        try:
            s = socket.create_connection((srv.host, srv.port), timeout=30)
            s.sendall(helpers.post_head("/users", length=len(body)) + body[:len(body) // 2])
            time.sleep(0.05)
            s.close()
        except OSError:
            pass

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for batch in range(0, 200, 8):
        ab = [threading.Thread(target=abandon, args=(batch + k,)) for k in range(8)]
        for t in ab:
            t.start()
        for t in ab:
            t.join()
    for t in threads:
        t.join()
    hwm = srv.status_kib("VmHWM") * 1024
    ok = statuses.count(200)
    refused = statuses.count(503)
    figures(f"--max-memory {BUDGET // MIB} MiB, 64 uploads of {RECORD_BYTES // MIB} MiB records + 200 abandoned: "
            f"{ok} committed, {refused} refused (503), peak RSS {hwm / MIB:.1f} MiB")
    assert ok >= 1 and ok + refused == 64, statuses
    assert db.count_users() == ok
    assert hwm < BUDGET, f"peak RSS {hwm / MIB:.1f} MiB over --max-memory {BUDGET // MIB} MiB"
    assert srv.healthy()
    # everything was given back: a new upload is admitted
    st, _, resp = helpers.raw_request(srv.host, srv.port, helpers.post_head("/users", length=len(bodies[0]))
                                      + bodies[0], timeout=60)
    assert st == 200, resp


def test_max_memory_smaller_than_one_upload_refuses_to_start(db, tmp_path):
    import subprocess
    p = subprocess.run([helpers.BINARY, "--listen", f"127.0.0.1:{helpers.free_port()}", "--db", db.url,
                        "--images-dir", str(tmp_path / "img"), "--max-record-bytes", str(64 * MIB),
                        "--max-memory", str(64 * MIB)], capture_output=True, timeout=30)
    assert p.returncode != 0
    assert b"--max-memory" in p.stderr, p.stderr


def test_uploads_past_max_memory_get_503(start_server, db):
    # room for exactly one upload: 1 MiB fixed + 2 x 1 MiB records
    srv = start_server(args=["--max-record-bytes", str(MIB), "--max-memory", str(3 * MIB), "--min-body-rate", "0",
                             "--max-array-memory", str(MIB), "--array-memory-budget", str(MIB)])
    body = helpers.record_line("m", "m@example.com") + b"\n"
    held = helpers.HTTPConn(srv.host, srv.port)
    try:
        # chunked: no Content-Length bounds its records, so it reserves for --max-record-bytes
        held.send(helpers.post_head("/users", chunked=True) + f"{len(body):x}\r\n".encode() + body[:5])
        time.sleep(0.3)
        st, headers, resp = helpers.raw_request(srv.host, srv.port, helpers.post_head(
            "/users", length=len(body), extra=["Connection: close"]) + body)
        assert st == 503 and headers.get("retry-after") and b"--max-memory" in resp, resp
        held.send(body[5:] + b"\r\n0\r\n\r\n")
        assert held.read_response().status == 200
    finally:
        held.close()
    st, _, _ = helpers.raw_request(srv.host, srv.port, helpers.post_head(
        "/users", length=len(body), extra=["Connection: close"]) + body)
    assert st == 200
    assert db.count_users() == 2


def test_small_uploads_reserve_for_their_length(start_server, db):
    # room for one upload of --max-record-bytes records, but a Content-Length bounds what a body's records hold:
    # small uploads at once all fit (with a reservation for 1 MiB records each, the second would get 503)
    srv = start_server(args=["--max-record-bytes", str(MIB), "--max-memory", str(3 * MIB), "--min-body-rate", "0",
                             "--max-array-memory", str(MIB), "--array-memory-budget", str(MIB)])
    body = helpers.record_line("s", "s@example.com") + b"\n"
    held = [helpers.HTTPConn(srv.host, srv.port) for _ in range(2)]
    try:
        for c in held:
            c.send(helpers.post_head("/users", length=len(body)) + body[:5])
        time.sleep(0.3)
        for c in held:
            c.send(body[5:])
            assert c.read_response().status == 200
    finally:
        for c in held:
            c.close()
    assert db.count_users() == 2


def test_zstd_upload_needing_more_than_the_whole_budget_is_413_not_a_retry(start_server, db):
    # JSON Lines fit (1 MiB fixed + 2 x 1 MiB records), but a zstd window on top can never fit in 3 MiB: 413, no
    # Retry-After (a 503 would send the client back forever); a plain upload still runs
    srv = start_server(args=["--max-record-bytes", str(MIB), "--max-memory", str(3 * MIB), "--min-body-rate", "0",
                             "--max-array-memory", str(MIB), "--array-memory-budget", str(MIB)])
    body = helpers.record_line("z", "z@example.com") + b"\n"
    packed = subprocess.run(["zstd", "-q", "-c"], input=body, capture_output=True, check=True).stdout
    st, headers, resp = helpers.raw_request(srv.host, srv.port, helpers.post_head(
        "/users", length=len(packed), extra=["Content-Encoding: zstd", "Connection: close"]) + packed)
    assert st == 413 and "retry-after" not in headers and b"--max-memory" in resp, (st, headers, resp)
    st, _, _ = helpers.raw_request(srv.host, srv.port, helpers.post_head(
        "/users", length=len(body), extra=["Connection: close"]) + body)
    assert st == 200
    assert db.count_users() == 1
