"""Connections at their limits: the open-files limit raised at start, --max-connections (idle kept-alive
connections closed to make room, else 503 with Retry-After), --keepalive-timeout, and a flood of idle
connections at the open-files limit (no busy loop, uploads in flight go on)."""
import json
import os
import re
import socket
import subprocess
import time

import pytest

import helpers

# include/service_limits.h
FD_RESERVE_FIXED = 32
FD_RESERVE_PER_THREAD = 8
FD_RESERVE_PER_INGEST = 2
DEFAULT_MAX_INGESTS = 64
RETRY_AFTER_BUSY_S = 1


def default_max_connections(nofile, threads, max_ingests=DEFAULT_MAX_INGESTS):
    reserved = FD_RESERVE_FIXED + FD_RESERVE_PER_THREAD * threads + FD_RESERVE_PER_INGEST * max_ingests
    return max((nofile - reserved) // 2, 16)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metrics(srv):
    st, _, body = helpers.raw_request(srv.host, srv.port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n"
                                      b"Connection: close\r\n\r\n", timeout=5)
    assert st == 200, body[:300]
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name[len("jsonl_ingest_"):]] = int(float(value))
    return out


def settle(srv):
    """Waits until only the caller's own /metrics connection is open (the start-up probe and earlier answers with
    Connection: close linger until their client's FIN), so that a test owns every place under the cap."""
    assert helpers.wait_for(lambda: metrics(srv)["connections_open"] == 1, timeout=5), metrics(srv)
    time.sleep(0.2)  # the /metrics connection itself goes


def metrics_when_quiet(srv):
    """/metrics once the test's connections are gone (asked earlier, it would take a place under the cap)."""
    time.sleep(0.5)
    return helpers.wait_for(lambda: (lambda m: m if m["connections_open"] == 1 else None)(metrics(srv)), timeout=5)


def healthz(c):
    c.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    return c.read_response()


def refused_answer(sock, timeout=3):
    """The bytes the server wrote before closing a refused connection ('' when it wrote nothing yet)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data


def assert_503_with_retry_after(data, cap):
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "HTTP/1.1 503 Service Unavailable", data[:300]
    headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
    assert headers["retry-after"] == str(RETRY_AFTER_BUSY_S), headers
    assert headers["connection"] == "close", headers
    assert int(headers["content-length"]) == len(body), (headers, body)
    assert json.loads(body) == {"error": f"too many connections open (--max-connections {cap}): retry later"}


def start_line(srv):
    m = re.search(r"^jsonl-ingest listening on .*$", srv.log_tail(200), re.M)
    assert m, srv.log_tail()
    return m.group(0)


# ------------------------------------------------------------------ the open-files limit
def test_start_up_raises_the_soft_open_files_limit_and_says_so(start_server):
    srv = start_server(prefix=["prlimit", "--nofile=256:4096"], args=["--threads", "2"])
    line = start_line(srv)
    assert "open files 4096 (raised from 256)" in line, line
    cap = default_max_connections(4096, 2)
    assert f"max connections {cap}" in line, line
    with open(f"/proc/{srv.proc.pid}/limits") as f:
        limits = re.search(r"^Max open files\s+(\d+)\s+(\d+)", f.read(), re.M)
    assert limits.groups() == ("4096", "4096")
    assert metrics(srv)["connections_max"] == cap


def test_soft_limit_already_at_the_hard_one_is_kept(start_server):
    srv = start_server(prefix=["prlimit", "--nofile=300:300"], args=["--threads", "1", "--max-connections", "77"])
    line = start_line(srv)
    assert "open files 300," in line and "raised" not in line, line
    assert "max connections 77)" in line, line


def trickle(sock, body, until, step=0.5):
    """Sends body a piece at a time every `step` s until time `until`; returns what is left to send."""
    piece = max(1, len(body) // 40)
    while time.monotonic() < until and len(body) > piece:
        sock.sendall(body[:piece])
        body = body[piece:]
        time.sleep(step)
    return body


@pytest.mark.timeout(90)
def test_flood_of_idle_connections_at_the_open_files_limit(start_server, db, tmp_path, figures):
    """256 open files, 400 idle connections: the process stays idle (no busy loop), the connections past
    --max-connections (derived from the limit) get 503 and are closed before a descriptor runs short, an upload
    that was streaming on an older connection commits, and once the idle ones are cut a new POST succeeds."""
    srv = start_server(prefix=["prlimit", "--nofile=256:256"],
                       args=["--threads", "2", "--idle-timeout", "5", "--min-body-rate", "0"])
    cap = default_max_connections(256, 2)
    assert f"open files 256, max connections {cap})" in start_line(srv)
    body = helpers.good_body("fd", n=40)
    up = helpers.HTTPConn(srv.host, srv.port, timeout=30)
    held = []
    try:
        up.send(helpers.post_head("/users", length=len(body)))
        rest = trickle(up.sock, body, time.monotonic() + 1)
        for _ in range(400):
            held.append(socket.create_connection((srv.host, srv.port), timeout=5))
        rest = trickle(up.sock, rest, time.monotonic() + 0.5)
        before = cpu_seconds(srv.proc.pid)
        rest = trickle(up.sock, rest, time.monotonic() + 3)
        used = cpu_seconds(srv.proc.pid) - before
        figures(f"idle-connection flood at 256 open files (400 connections, --max-connections {cap} derived): "
                f"{used:.3f} CPU s in 3 s")
        assert used < 0.15, f"{used:.2f} CPU seconds in 3 s with 400 idle connections at 256 open files"
        up.send(rest)
        r = up.read_response()
        assert r.status == 200, r
        assert r.json()["inserted"] == 40
        assert db.count_users() == 40
        answers = [refused_answer(s, timeout=0.05) for s in held]
        refused = [a for a in answers if a]
        assert len(refused) >= 400 - cap, f"{len(refused)} of 400 refused, cap {cap}"
        for a in refused:
            assert_503_with_retry_after(a, cap)
    finally:
        up.close()
    # the client keeps its sockets: the server itself cuts the idle ones it kept (--idle-timeout 5)
    ok = helpers.wait_for(lambda: helpers.post(srv, helpers.write(tmp_path / "after.jsonl",
                                                                  helpers.good_body("after", n=2)),
                                               tmp_path).status == 200, timeout=20, interval=0.5)
    assert ok, "a new POST kept failing after the idle connections were cut"
    m = metrics(srv)
    for s in held:
        s.close()
    assert m["connections_refused_total"] == len(refused), m
    assert m['limits_total{limit="max_connections"}'] == len(refused)
    assert m["accept_paused_total"] == 0, "the descriptors ran out: the cap should have kept room"
    assert re.search(rf"refused \d+ connections with 503: --max-connections {cap} open", srv.log_tail(400)), \
        srv.log_tail()
    assert db.count_users() == 42


def test_flood_without_the_cap_only_pauses_accepting(start_server, db, figures):
    """The same flood with --max-connections far above the limit: accept() fails with EMFILE and the loops pause
    (JI_ACCEPT_PAUSE_MS) instead of spinning. A figure for docs/operations.md; the bound is looser."""
    srv = start_server(prefix=["prlimit", "--nofile=256:256"],
                       args=["--threads", "2", "--idle-timeout", "30", "--max-connections", "100000"])
    held = []
    try:
        for _ in range(400):
            try:
                held.append(socket.create_connection((srv.host, srv.port), timeout=2))
            except OSError:
                break
        time.sleep(0.5)
        before = cpu_seconds(srv.proc.pid)
        time.sleep(3)
        used = cpu_seconds(srv.proc.pid) - before
        figures(f"idle-connection flood at 256 open files (400 connections, no cap: accept pauses): "
                f"{used:.3f} CPU s in 3 s")
        assert used < 0.6, f"{used:.2f} CPU seconds in 3 s at the descriptor limit"
    finally:
        for s in held:
            s.close()
    assert helpers.wait_for(srv.healthy, timeout=10)
    assert metrics(srv)["accept_paused_total"] > 0


# ------------------------------------------------------------------ --max-connections
def test_max_connections_busy_ones_refuse_the_next_with_503(start_server):
    """50 connections with partial heads hold every place: the next 10 get 503 with Retry-After and are
    closed; the first 50 finish their requests."""
    srv = start_server(args=["--threads", "2", "--max-connections", "50", "--idle-timeout", "30"])
    settle(srv)
    first = [helpers.HTTPConn(srv.host, srv.port, timeout=10) for _ in range(50)]
    extra = []
    try:
        for c in first:
            c.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        time.sleep(0.5)  # every one accepted and counted
        for _ in range(10):
            s = socket.create_connection((srv.host, srv.port), timeout=5)
            extra.append(s)
            data = refused_answer(s, timeout=5)
            assert_503_with_retry_after(data, 50)
        # a refused client that sends its request at once still reads its 503
        s = socket.create_connection((srv.host, srv.port), timeout=5)
        extra.append(s)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert_503_with_retry_after(refused_answer(s, timeout=5), 50)
        for c in first:
            c.send(b"\r\n")
            assert c.read_response().status == 200
    finally:
        for c in first:
            c.close()
        for s in extra:
            s.close()
    m = metrics_when_quiet(srv)
    assert m, metrics(srv)
    assert m["connections_refused_total"] == 11 and m["connections_shed_total"] == 0, m


def test_max_connections_closes_the_longest_idle_kept_alive_one(start_server):
    """50 kept-alive connections idle between requests: a new one is served, and the one idle longest is
    closed to make room (one loop: the order is exact)."""
    srv = start_server(args=["--threads", "1", "--max-connections", "50", "--keepalive-timeout", "60",
                             "--idle-timeout", "60"])
    settle(srv)
    conns = [helpers.HTTPConn(srv.host, srv.port, timeout=10) for _ in range(50)]
    newer = []
    try:
        for c in conns:
            assert healthz(c).status == 200
        for c in conns[10:]:  # the first ten are now the ones idle longest
            assert healthz(c).status == 200
        for i in range(3):
            n = helpers.HTTPConn(srv.host, srv.port, timeout=10)
            newer.append(n)
            r = healthz(n)
            assert r.status == 200 and r.headers["connection"] == "keep-alive", r
            assert conns[i].closed_by_peer(timeout=2), f"connection {i}, idle longest, still open"
        for c in conns[3:]:
            assert not c.closed_by_peer(timeout=0.01)
            c.sock.settimeout(10)
        for c in conns[3:] + newer:
            assert healthz(c).status == 200
    finally:
        for c in conns + newer:
            c.close()
    m = metrics_when_quiet(srv)
    assert m and m["connections_shed_total"] == 3 and m["connections_refused_total"] == 0, m


def test_max_connections_room_is_made_on_other_loops_too(start_server):
    """Two loops, 50 idle kept-alive connections between them: each of 10 new connections is served (an idle
    one closes on whichever loop has one); the process keeps 50 open."""
    srv = start_server(args=["--threads", "2", "--max-connections", "50", "--keepalive-timeout", "60",
                             "--idle-timeout", "60"])
    settle(srv)
    conns = [helpers.HTTPConn(srv.host, srv.port, timeout=10) for _ in range(50)]
    try:
        for c in conns:
            assert healthz(c).status == 200
        for _ in range(10):
            n = helpers.HTTPConn(srv.host, srv.port, timeout=10)
            conns.append(n)
            assert healthz(n).status == 200
        time.sleep(0.5)  # a loop asked by another closes at its next wake-up (100 ms)
        closed = [c for c in conns if c.closed_by_peer(timeout=0.01)]
        assert len(closed) == 10, f"{len(closed)} connections closed for 10 new ones"
    finally:
        for c in conns:
            c.close()
    m = metrics_when_quiet(srv)
    assert m and m["connections_shed_total"] == 10 and m["connections_refused_total"] == 0, m


# ------------------------------------------------------------------ spreading connections over the loops
def test_a_burst_of_connections_spreads_over_the_loops(start_server):
    """24 connections opened at once (all in the listen backlog before any is accepted): each loop holds about half
    of them. A loop that holds more connections than another leaves the next one to it: the first loop awake does not
    take the whole backlog, and two big uploads that arrive together run on two threads."""
    srv = start_server(args=["--threads", "2", "--keepalive-timeout", "60", "--idle-timeout", "60"])
    settle(srv)
    socks = [socket.create_connection((srv.host, srv.port), timeout=10) for _ in range(24)]
    try:
        for s in socks:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        for s in socks:
            assert s.recv(4096).startswith(b"HTTP/1.1 200"), "no answer"
        m = metrics(srv)
        per_worker = [m[f'worker_connections_open{{worker="{i}"}}'] for i in range(2)]
        assert sum(per_worker) == m["connections_open"] == 25, m  # with the /metrics connection
        assert min(per_worker) >= 9, f"connections per loop: {per_worker}"
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------ --keepalive-timeout
def test_keepalive_timeout_closes_idle_kept_alive_but_not_a_slow_head(start_server):
    srv = start_server(args=["--keepalive-timeout", "1", "--idle-timeout", "10"])
    c = helpers.HTTPConn(srv.host, srv.port)
    slow = helpers.HTTPConn(srv.host, srv.port)
    again = helpers.HTTPConn(srv.host, srv.port)
    try:
        assert healthz(c).status == 200
        t0 = time.monotonic()
        assert c.closed_by_peer(timeout=5), "kept-alive connection not closed at --keepalive-timeout"
        assert 0.5 < time.monotonic() - t0 < 3
        # a head that trickles for 3 s on a fresh connection: --idle-timeout (10 s) applies
        for ch in b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n":
            slow.send(bytes([ch]))
            time.sleep(3 / 42)
        slow.send(b"\r\n")
        assert slow.read_response().status == 200
        # and on a kept-alive connection once the next head has begun (0.5 s after the answer)
        assert healthz(again).status == 200
        time.sleep(0.5)
        for ch in b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n":
            again.send(bytes([ch]))
            time.sleep(3 / 42)
        again.send(b"\r\n")
        assert again.read_response().status == 200
    finally:
        for x in (c, slow, again):
            x.close()


# ------------------------------------------------------------------ flags
def test_connection_flags_are_strict(db, images_dir):
    for flag, value in (("--max-connections", "0"), ("--max-connections", "-1"), ("--max-connections", "5k"),
                        ("--max-connections", "1000001"), ("--keepalive-timeout", "0"),
                        ("--keepalive-timeout", " 5"), ("--keepalive-timeout", "1.5")):
        r = subprocess.run([helpers.BINARY, flag, value, "--listen", f"127.0.0.1:{helpers.free_port()}", "--db",
                            db.url, "--images-dir", images_dir], capture_output=True, text=True, timeout=5,
                           stdin=subprocess.DEVNULL)
        assert r.returncode != 0 and flag in r.stderr and f"'{value}'" in r.stderr, (flag, value, r)
