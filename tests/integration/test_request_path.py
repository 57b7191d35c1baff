"""One request path for every request on every connection: exact routes, the
same head rules and checks before a body byte is read (token, Origin, Host,
admission), slow clients and slow readers cut, gzip work bounded per loop turn,
shutdown with open connections, one process per address."""
import gzip
import os
import socket
import subprocess
import threading
import time
import zlib

import pytest

import helpers


def record(i, tag="rp"):
    return helpers.record_line(f"{tag}{i}", f"{tag}{i}@example.com") + b"\n"


def head_only(srv, head, timeout=10):
    """Sends a request head (no body) and reads the answer."""
    c = helpers.HTTPConn(srv.host, srv.port, timeout=timeout)
    try:
        c.send(head)
        return c.read_response()
    finally:
        c.close()


# ------------------------------------------------------------------ exact routes
@pytest.mark.parametrize("path,status", [
    ("/users/42", 405), ("/users/abc", 405), ("/users/", 404), ("/./users", 404), ("/%75sers", 404),
    ("/x/../users", 404), ("/users?x=1/..", 200), ("/users.csv", 405), ("/healthz", 405), ("/nope", 404),
])
def test_only_post_users_ingests(server, db, path, status):
    body = record(1)
    st, headers, resp = helpers.raw_request(
        server.host, server.port,
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-ndjson\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    assert st == status, resp
    assert db.count_users() == (1 if status == 200 else 0)
    if status == 405:
        assert "allow" in headers, headers


def test_post_to_a_read_route_is_answered_from_the_head(server):
    # 200 MB announced, not one body byte sent: the 405 comes from the head alone
    r = head_only(server, b"POST /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 200000000\r\n\r\n")
    assert r.status == 405
    assert r.headers.get("connection") == "close"


def test_unknown_method_is_405_and_keepalive_survives_404(server):
    c = helpers.HTTPConn(server.host, server.port)
    try:
        c.send(b"DELETE /users HTTP/1.1\r\nHost: localhost\r\n\r\n")
        r = c.read_response()
        assert r.status == 405 and "POST" in r.headers["allow"]
        c.send(b"GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert c.read_response().status == 404
        c.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert c.read_response().status == 200
    finally:
        c.close()


def test_post_after_get_on_one_connection_gets_the_same_rules(start_server, db, tmp_path):
    token = tmp_path / "token"
    token.write_text("0123456789abcdef-secret\n")
    srv = start_server(args=["--token-file", token, "--max-ingests", "1"])
    c = helpers.HTTPConn(srv.host, srv.port)
    try:
        c.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert c.read_response().status == 200
        # no token: 401 from the head, the announced body never read
        c.send(helpers.post_head("/users", length=200_000_000).replace(b"Host: 127.0.0.1", b"Host: localhost"))
        r = c.read_response()
        assert r.status == 401 and r.headers.get("www-authenticate") == "Bearer"
    finally:
        c.close()
    # with the token, on a kept-alive connection, the upload streams like a first request
    c = helpers.HTTPConn(srv.host, srv.port)
    try:
        c.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert c.read_response().status == 200
        body = record(1) + record(2)
        c.send(helpers.post_head("/users", length=len(body), extra=["Authorization: Bearer 0123456789abcdef-secret"])
               + body)
        r = c.read_response()
        assert r.status == 200 and r.json()["inserted"] == 2
    finally:
        c.close()
    assert db.count_users() == 2


def test_duplicate_authorization_is_400(start_server, tmp_path):
    token = tmp_path / "token"
    token.write_text("0123456789abcdef-secret\n")
    srv = start_server(args=["--token-file", token])
    body = record(1)
    r = head_only(srv, helpers.post_head("/users", length=len(body), extra=[
        "Authorization: Bearer 0123456789abcdef-secret", "Authorization: Bearer wrong"]))
    assert r.status == 400 and "Authorization" in r.json()["error"]


def test_keepalive_connection_is_cut_at_idle_timeout(start_server):
    srv = start_server(args=["--idle-timeout", "1"])
    c = helpers.HTTPConn(srv.host, srv.port)
    try:
        c.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert c.read_response().status == 200
        t0 = time.monotonic()
        assert c.closed_by_peer(timeout=5)
        assert time.monotonic() - t0 < 3
    finally:
        c.close()


def test_trickled_head_is_cut_at_idle_timeout(start_server):
    srv = start_server(args=["--idle-timeout", "2"])
    s = socket.create_connection((srv.host, srv.port))
    t0 = time.monotonic()
    closed = False
    try:
        for ch in b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 200:
            try:
                s.send(bytes([ch]))
            except OSError:
                closed = True
                break
            time.sleep(0.5 if time.monotonic() - t0 < 1 else 0.05)
            s.settimeout(0.001)
            try:
                if s.recv(1) == b"":
                    closed = True
                    break
            except socket.timeout:
                pass
            except OSError:
                closed = True
                break
            if time.monotonic() - t0 > 8:
                break
    finally:
        s.close()
    # a head that keeps trickling is still cut: the idle timer runs from the first byte of the head
    assert closed or time.monotonic() - t0 <= 8


# ------------------------------------------------------------------ browsers
def test_origin_not_allowed_is_403_before_the_body(server, db):
    body = record(1)
    r = head_only(server, helpers.post_head("/users", length=len(body), content_type="text/plain",
                                            extra=["Origin: http://evil.example"]))
    assert r.status == 403 and "Origin" in r.json()["error"]
    st, _, _ = helpers.raw_request(server.host, server.port,
                                   b"GET /users HTTP/1.1\r\nHost: localhost\r\nOrigin: http://evil.example\r\n"
                                   b"Connection: close\r\n\r\n")
    assert st == 403
    assert db.count_users() == 0


def test_allowed_origin_passes(start_server, db):
    srv = start_server(args=["--allowed-origins", "http://a.example, http://ok.example:8080"])
    body = record(1)
    st, _, resp = helpers.raw_request(srv.host, srv.port, helpers.post_head(
        "/users", length=len(body), extra=["Origin: http://ok.example:8080", "Connection: close"]) + body)
    assert st == 200, resp
    assert db.count_users() == 1


@pytest.mark.parametrize("host,status", [("attacker.example", 403), ("attacker.example:8000", 403),
                                         ("localhost:1234", 200), ("127.0.0.1", 200), ("[::1]:80", 200)])
def test_host_on_a_loopback_listener(server, host, status):
    st, _, _ = helpers.raw_request(server.host, server.port,
                                   f"GET /users HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    assert st == status


def test_allowed_hosts_flag(start_server):
    srv = start_server(args=["--allowed-hosts", "ingest.internal"])
    for path, host, status in [("/metrics", "ingest.internal:8000", 200), ("/metrics", "attacker.example", 403),
                               ("/users", "localhost", 403), ("/healthz", "lb.example", 200)]:
        st, _, _ = helpers.raw_request(
            srv.host, srv.port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert st == status, (path, host)


# ------------------------------------------------------------------ slow clients
def test_body_slower_than_min_body_rate_is_cut(start_server, db):
    srv = start_server(args=["--min-body-rate", "1000", "--min-body-rate-window", "2", "--idle-timeout", "30"])
    body = b"".join(record(i) for i in range(50))
    c = helpers.HTTPConn(srv.host, srv.port, timeout=20)
    t0 = time.monotonic()
    try:
        c.send(helpers.post_head("/users", length=len(body)))
        # one byte every 0.3 s: steady, far below 1000 bytes/s
        answered = None
        for b in body:
            c.send(bytes([b]))
            c.sock.settimeout(0.3)
            try:
                answered = c.read_response()
                break
            except socket.timeout:
                pass
            except (ConnectionError, OSError):
                break
            if time.monotonic() - t0 > 15:
                break
        assert answered is not None, "no answer within 15 s"
        assert answered.status == 408 and "--min-body-rate" in answered.json()["error"]
    finally:
        c.close()
    assert time.monotonic() - t0 < 10
    assert db.count_users() == 0


def test_per_client_cap_on_concurrent_uploads(start_server, db):
    srv = start_server(args=["--max-client-ingests", "2", "--min-body-rate", "0"])
    body = b"".join(record(i) for i in range(4))
    held = []
    try:
        for _ in range(2):
            c = helpers.HTTPConn(srv.host, srv.port)
            c.send(helpers.post_head("/users", length=len(body)) + body[:10])
            held.append(c)
        time.sleep(0.3)
        r = head_only(srv, helpers.post_head("/users", length=len(body)))
        assert r.status == 503 and r.headers.get("retry-after") and "--max-client-ingests" in r.json()["error"]
        # the held uploads finish normally
        for c in held:
            c.send(body[10:])
            assert c.read_response().status == 200
    finally:
        for c in held:
            c.close()
    assert db.count_users() == 8


# ------------------------------------------------------------------ slow readers
def test_export_reader_that_accepts_nothing_is_cut(start_server, db):
    srv = start_server(args=["--idle-timeout", "2"])
    db.sql("INSERT INTO batches (batch_key) VALUES ('slowreader')")
    db.sql("INSERT INTO users (name, email, batch_id) SELECT 'n' || g || repeat('x', 200), 'e' || g || '@x.org', "
           "(SELECT max(batch_id) FROM batches) FROM generate_series(1, 40000) g")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((srv.host, srv.port))
    s.sendall(b"GET /users HTTP/1.1\r\nHost: localhost\r\n\r\n")
    time.sleep(6)  # read nothing: the server's writes stall, the send timeout (--idle-timeout) cuts them
    s.settimeout(10)
    got, closed = 0, False
    try:
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                closed = True
                break
            got += len(chunk)
    except ConnectionResetError:
        closed = True
    except socket.timeout:
        pass
    finally:
        s.close()
    assert closed, f"connection still open after {got} bytes"
    assert got < 40000 * 200, "the whole export was sent"
    assert srv.healthy()


# ------------------------------------------------------------------ gzip work per loop turn
@pytest.mark.timeout(120)
def test_gzip_of_newlines_does_not_hold_the_loop(start_server, db, tmp_path, figures):
    srv = start_server(args=["--threads", "1"])
    n = 256 << 20
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\n" * (1 << 20)
    parts = [comp.compress(block) for _ in range(n >> 20)]
    parts.append(comp.flush())
    data = b"".join(parts)
    result = {}

    def upload():
        c = helpers.HTTPConn(srv.host, srv.port, timeout=100)
        try:
            c.send(helpers.post_head("/users", length=len(data), extra=["Content-Encoding: gzip"]) + data)
            result["r"] = c.read_response()
        finally:
            c.close()

    t = threading.Thread(target=upload)
    t.start()
    worst = 0.0
    probe = helpers.HTTPConn(srv.host, srv.port, timeout=30)
    try:
        while t.is_alive():
            t0 = time.monotonic()
            probe.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert probe.read_response().status == 200
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.01)
    finally:
        probe.close()
    t.join()
    r = result["r"]
    assert r.status == 200 and r.json()["inserted"] == 0 and r.json()["lines"] == n, r
    figures(f"/healthz on the same thread during a 256 MiB gzip-of-newlines upload: worst {worst * 1000:.1f} ms")
    assert worst < 1.0


# ------------------------------------------------------------------ shutdown
def test_sigterm_with_idle_keepalive_and_scraper_connections_exits_0(start_server):
    srv = start_server()
    conns = []
    for path in (b"/healthz", b"/metrics", b"/users"):
        c = helpers.HTTPConn(srv.host, srv.port)
        c.send(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert c.read_response().status == 200
        conns.append(c)
    t0 = time.monotonic()
    rc = srv.stop()
    for c in conns:
        c.close()
    assert rc == 0
    assert time.monotonic() - t0 < 5


def test_sigterm_past_grace_answers_uploads_503(start_server, db):
    srv = start_server(args=["--shutdown-grace", "1", "--min-body-rate", "0"])
    body = b"".join(record(i) for i in range(4))
    c = helpers.HTTPConn(srv.host, srv.port, timeout=15)
    try:
        c.send(helpers.post_head("/users", length=len(body)) + body[:20])
        time.sleep(0.3)
        srv.proc.send_signal(15)
        r = c.read_response()
        assert r.status == 503 and r.headers.get("retry-after")
        assert srv.proc.wait(10) == 0
    finally:
        c.close()
    assert db.count_users() == 0


def test_upload_in_flight_at_sigterm_commits(start_server, db):
    srv = start_server(args=["--min-body-rate", "0"])
    body = b"".join(record(i) for i in range(4))
    c = helpers.HTTPConn(srv.host, srv.port, timeout=15)
    try:
        c.send(helpers.post_head("/users", length=len(body)) + body[:20])
        time.sleep(0.3)
        srv.proc.send_signal(15)
        time.sleep(0.3)
        c.send(body[20:])
        r = c.read_response()
        assert r.status == 200 and r.headers.get("connection") == "close"
        assert srv.proc.wait(10) == 0
    finally:
        c.close()
    assert db.count_users() == 4


# ------------------------------------------------------------------ one process per address
def test_second_instance_on_a_taken_address_exits_1(server, db, tmp_path):
    p = subprocess.run([helpers.BINARY, "--listen", f"{server.host}:{server.port}", "--db", db.url,
                        "--images-dir", str(tmp_path / "other")], capture_output=True, timeout=30)
    assert p.returncode == 1
    assert b"address already in use" in p.stderr.lower() or b"in use" in p.stderr.lower(), p.stderr
    assert server.healthy()


def test_per_client_cap_behind_a_trusted_proxy(start_server, db):
    srv = start_server(args=["--trusted-proxies", "127.0.0.0/8", "--max-client-ingests", "1", "--min-body-rate", "0"])
    body = record(1)
    held = helpers.HTTPConn(srv.host, srv.port)
    try:
        held.send(helpers.post_head("/users", length=len(body), extra=["X-Forwarded-For: 198.51.100.1"]) + body[:5])
        time.sleep(0.3)
        # another client behind the same proxy is not held back
        st, _, resp = helpers.raw_request(srv.host, srv.port, helpers.post_head(
            "/users", length=len(body), extra=["X-Forwarded-For: 198.51.100.2", "Connection: close"]) + body)
        assert st == 200, resp
        # the same client is, whichever proxy hop it came through
        r = head_only(srv, helpers.post_head("/users", length=len(body),
                                             extra=["X-Forwarded-For: 198.51.100.1, 127.0.0.5"]))
        assert r.status == 503
        held.send(body[5:])
        assert held.read_response().status == 200
    finally:
        held.close()
    assert db.count_users() == 2


def test_readyz_says_stopping_on_a_kept_alive_connection_during_the_drain(start_server, db):
    srv = start_server(args=["--min-body-rate", "0"])
    body = record(1) + record(2)
    probe = helpers.HTTPConn(srv.host, srv.port)
    upload = helpers.HTTPConn(srv.host, srv.port, timeout=15)
    try:
        probe.send(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert probe.read_response().status == 200
        upload.send(helpers.post_head("/users", length=len(body)) + body[:10])
        time.sleep(0.3)
        srv.proc.send_signal(15)
        time.sleep(0.5)
        probe.send(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        r = probe.read_response()
        assert r.status == 503 and r.json()["status"] == "stopping", r
        assert r.headers.get("connection") == "close"
        upload.send(body[10:])
        assert upload.read_response().status == 200
        assert srv.proc.wait(10) == 0
    finally:
        probe.close()
        upload.close()
    assert db.count_users() == 2


def test_uploads_on_one_kept_alive_connection_give_their_places_back(start_server, db):
    srv = start_server(args=["--max-ingests", "2", "--max-client-ingests", "1"])
    c = helpers.HTTPConn(srv.host, srv.port)
    try:
        for i in range(5):
            body = record(i)
            c.send(helpers.post_head("/users", length=len(body)) + body)
            r = c.read_response()
            assert r.status == 200, (i, r)
            assert r.headers.get("connection") == "keep-alive"
    finally:
        c.close()
    assert db.count_users() == 5


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_file_descriptors_does_not_spin(start_server):
    """Past the open-files limit accept() fails with EMFILE and the listener stays readable: the loops pause
    accepting (JI_ACCEPT_PAUSE_MS) instead of spinning, and serve again once descriptors are free."""
    import resource
    srv = start_server(args=["--threads", "2", "--idle-timeout", "30"])
    resource.prlimit(srv.proc.pid, resource.RLIMIT_NOFILE, (96, 96))
    held = []
    try:
        for _ in range(150):
            try:
                held.append(socket.create_connection((srv.host, srv.port), timeout=2))
            except OSError:
                break
        time.sleep(0.5)
        before = cpu_seconds(srv.proc.pid)
        time.sleep(3)
        used = cpu_seconds(srv.proc.pid) - before
        assert used < 0.6, f"{used:.2f} CPU seconds in 3 s at the descriptor limit"
    finally:
        for s in held:
            s.close()
    assert helpers.wait_for(srv.healthy, timeout=10)


def test_refusals_have_their_own_labels_not_db_errors(start_server, db):
    srv = start_server(args=["--max-ingests", "1", "--min-body-rate", "0"])
    body = record(1)
    held = helpers.HTTPConn(srv.host, srv.port)
    try:
        held.send(helpers.post_head("/users", length=len(body)) + body[:5])
        time.sleep(0.3)
        for _ in range(3):
            assert head_only(srv, helpers.post_head("/users", length=len(body))).status == 503
        held.send(body[5:])
        assert held.read_response().status == 200
    finally:
        held.close()
    st, _, text = helpers.raw_request(srv.host, srv.port,
                                      b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    values = dict(l.rsplit(" ", 1) for l in text.decode().splitlines() if l and not l.startswith("#"))
    assert values['jsonl_ingest_refused_total{reason="max_ingests"}'] == "3", text
    assert values['jsonl_ingest_errors_total{kind="db"}'] == "0", text
    assert values['jsonl_ingest_errors_total{kind="busy"}'] == "0", text
