"""The access log (--access-log) and the request-duration histogram of /metrics.

One JSON line per request, whatever the route and whoever answered it (the
streaming upload path, the h2o handlers, the front door's own refusals);
X-Forwarded-For believed only from --trusted-proxies; SIGHUP reopens the
file; `off` writes nothing; the histogram counts the same requests.
"""
import datetime
import json
import os
import re
import signal
import time

import helpers

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FIELDS = {"time", "client", "method", "path", "route", "status", "body_bytes", "rows", "images", "ms", "batch_id"}


def req(srv, method, path, body=b"", extra=(), content_type="application/x-ndjson"):
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"] + list(extra)
    if method == "POST":
        head += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body  # a path's characters as single bytes
    status, _, resp = helpers.raw_request(srv.host, srv.port, data)
    return status, resp


def read_lines(path):
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    assert raw == b"" or raw.endswith(b"\n"), "a line was cut"
    return [json.loads(line) for line in raw.decode("ascii").splitlines()]


def wait_lines(path, n):
    assert helpers.wait_for(lambda: len(read_lines(path)) >= n), f"fewer than {n} lines in {path}: {read_lines(path)}"
    return read_lines(path)


class Logged:
    """Requests one at a time, each waiting for its line: a line is written once the answer's last byte left
    the server, which may be after the client read it and sent the next request to another thread."""

    def __init__(self, srv, log):
        self.srv, self.log = srv, log
        self.n = len(wait_lines(log, 1))  # start_server's own /healthz probes

    def __call__(self, *args, **kw):
        st, resp = req(self.srv, *args, **kw)
        self.n += 1
        wait_lines(self.log, self.n)
        return st, resp


def check_common(line, method, path, route, status, started, ended):
    assert set(line) >= FIELDS, line
    assert ISO_MS.match(line["time"]), line
    t = datetime.datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    assert started - 1 <= t.timestamp() <= ended + 1, (line, started, ended)
    assert line["client"] == "127.0.0.1", line
    assert (line["method"], line["path"], line["route"], line["status"]) == (method, path, route, status), line
    assert isinstance(line["ms"], (int, float)) and 0 <= line["ms"] <= (ended - started) * 1000 + 50, line


def test_one_line_per_request_on_every_route(start_server, db, tmp_path):
    log = str(tmp_path / "access.log")
    srv = start_server(args=["--access-log", log])
    logged = Logged(srv, log)
    n0 = logged.n
    body = helpers.good_body("al", n=3, image_bytes=200)
    started = time.time()
    st, resp = logged("POST", "/users?on_error=fail", body)
    assert st == 200, resp
    answer = json.loads(resp)
    st_bad, _ = logged("POST", "/users", b'{"name": "x", "email": \n')
    assert st_bad == 400
    st_user, _ = logged("GET", f"/users/{answer['first_user_id']}")
    assert st_user == 200
    assert logged("GET", "/no/such/route")[0] == 404
    assert logged("GET", "/healthz")[0] == 200
    assert logged("DELETE", "/users")[0] == 405
    ended = time.time()
    lines = wait_lines(log, n0 + 6)[n0:]
    assert len(lines) == 6, lines

    up = lines[0]
    check_common(up, "POST", "/users", "/users", 200, started, ended)  # the query is not logged
    assert up["body_bytes"] == len(body)
    assert (up["rows"], up["images"], up["batch_id"]) == (3, 3, answer["batch_id"])
    assert answer["batch_id"] == int(db.sql("SELECT max(batch_id) FROM batches"))

    bad = lines[1]
    check_common(bad, "POST", "/users", "/users", 400, started, ended)
    assert bad["body_bytes"] == len(b'{"name": "x", "email": \n')
    assert (bad["rows"], bad["images"], bad["batch_id"]) == (0, 0, None)

    user = lines[2]
    check_common(user, "GET", f"/users/{answer['first_user_id']}", "/users/{id}", 200, started, ended)
    assert (user["body_bytes"], user["rows"], user["images"], user["batch_id"]) == (0, None, None, None)

    check_common(lines[3], "GET", "/no/such/route", "other", 404, started, ended)
    check_common(lines[4], "GET", "/healthz", "/healthz", 200, started, ended)
    check_common(lines[5], "DELETE", "/users", "/users", 405, started, ended)
    for line in lines[3:]:
        assert (line["rows"], line["images"], line["batch_id"]) == (None, None, None), line
    # the lines are ordered as the requests were answered, their times too
    times = [line["time"] for line in lines]
    assert times == sorted(times)


def test_json_array_upload_is_logged_with_its_batch(start_server, db, tmp_path):
    log = str(tmp_path / "access.log")
    srv = start_server(args=["--access-log", log])
    logged = Logged(srv, log)
    n0 = logged.n
    body = json.dumps([{"name": "arr a", "email": "arr-a@example.com"},
                       {"name": "arr b", "email": "arr-b@example.com"}]).encode()
    st, resp = logged("POST", "/users", body, content_type="application/json")
    assert st == 200, resp
    line = wait_lines(log, n0 + 1)[n0]
    assert (line["route"], line["status"], line["body_bytes"]) == ("/users", 200, len(body))
    assert (line["rows"], line["images"], line["batch_id"]) == (2, 0, json.loads(resp)["batch_id"])


def test_path_is_escaped_and_cut(start_server, tmp_path):
    log = str(tmp_path / "access.log")
    srv = start_server(args=["--access-log", log])
    logged = Logged(srv, log)
    n0 = logged.n
    assert logged("GET", '/a"b\\c\xe9')[0] == 404
    assert logged("GET", "/" + "x" * 1000)[0] == 404
    assert logged("GET", "/a\x7f")[0] == 400  # a head that cannot be parsed: no method, no path
    lines = wait_lines(log, n0 + 3)[n0:]
    assert lines[0]["path"] == '/a"b\\c\xe9'  # every byte outside printable ASCII as \u00XX
    with open(log, "rb") as f:
        assert b'"/a\\"b\\\\c\\u00e9"' in f.read()
    assert lines[1]["path"] == "/" + "x" * 255 and lines[1]["path_truncated"] is True
    assert (lines[2]["method"], lines[2]["path"], lines[2]["route"], lines[2]["status"]) == (None, None, "other", 400)


def test_forwarded_for_from_an_untrusted_peer_is_ignored(start_server, tmp_path):
    log = str(tmp_path / "access.log")
    srv = start_server(args=["--access-log", log])
    logged = Logged(srv, log)
    n0 = logged.n
    assert logged("GET", "/healthz", extra=["X-Forwarded-For: 203.0.113.9"])[0] == 200
    assert wait_lines(log, n0 + 1)[n0]["client"] == "127.0.0.1"


def test_forwarded_for_from_a_trusted_proxy_names_the_rightmost_untrusted_hop(start_server, tmp_path):
    log = str(tmp_path / "access.log")
    srv = start_server(args=["--access-log", log, "--trusted-proxies", "127.0.0.1/32,10.0.0.0/8"])
    logged = Logged(srv, log)
    n0 = logged.n
    # the client wrote 198.51.100.66 itself; the proxy appended the address it saw, then a trusted inner proxy
    assert logged("GET", "/healthz", extra=["X-Forwarded-For: 198.51.100.66, 203.0.113.9, 10.1.2.3"])[0] == 200
    # a proxy that adds its own header after the client's (HAProxy's option forwardfor)
    assert logged("GET", "/healthz",
               extra=["X-Forwarded-For: 198.51.100.66", "X-Forwarded-For: 203.0.113.10"])[0] == 200
    assert logged("GET", "/healthz")[0] == 200  # no header: the peer
    lines = wait_lines(log, n0 + 3)[n0:]
    assert [line["client"] for line in lines] == ["203.0.113.9", "203.0.113.10", "127.0.0.1"]


def test_sighup_reopens_the_log_file(start_server, tmp_path):
    log = str(tmp_path / "access.log")
    srv = start_server(args=["--access-log", log])
    logged = Logged(srv, log)
    n0 = logged.n
    assert logged("GET", "/healthz?before")[0] == 200
    wait_lines(log, n0 + 1)
    os.rename(log, log + ".1")
    assert req(srv, "GET", "/readyz")[0] in (200, 503)  # still into the renamed file
    assert helpers.wait_for(lambda: len(read_lines(log + ".1")) == n0 + 2)
    assert not os.path.exists(log)
    srv.proc.send_signal(signal.SIGHUP)
    assert helpers.wait_for(lambda: os.path.exists(log)), "no new file after SIGHUP"
    assert req(srv, "GET", "/metrics")[0] == 200
    lines = wait_lines(log, 1)
    assert [(line["path"], line["status"]) for line in lines] == [("/metrics", 200)]
    assert len(read_lines(log + ".1")) == n0 + 2
    assert srv.alive()


def test_access_log_off_writes_nothing(start_server, tmp_path):
    srv = start_server(args=["--access-log", "off"])
    assert req(srv, "GET", "/healthz")[0] == 200
    assert req(srv, "GET", "/nope")[0] == 404
    srv.stop()
    with open(srv.log_path, "rb") as f:
        log = f.read()
    assert b'"route"' not in log and b'{"time"' not in log, log[-2000:]


def test_default_is_stderr(start_server):
    srv = start_server()
    assert req(srv, "GET", "/nope-on-stderr")[0] == 404
    srv.stop()
    with open(srv.log_path, "rb") as f:
        lines = [json.loads(l) for l in f.read().splitlines() if l.startswith(b'{"time"')]
    assert [line["status"] for line in lines if line["path"] == "/nope-on-stderr"] == [404]


def test_empty_access_log_value_is_refused(tmp_path):
    import subprocess
    r = subprocess.run([helpers.BINARY, "--access-log", "", "--help"], capture_output=True, timeout=10)
    assert r.returncode != 0 and b"--access-log" in r.stderr


def parse_histogram(text):
    """{(route, class): {"buckets": [(le, n)...], "sum": s, "count": c}} of jsonl_ingest_request_duration_seconds."""
    out = {}
    pat = re.compile(r'^jsonl_ingest_request_duration_seconds_(bucket|sum|count)\{route="([^"]*)",'
                     r'status_class="([^"]*)"(?:,le="([^"]*)")?\} (\S+)$')
    for line in text.splitlines():
        m = pat.match(line)
        if not m:
            assert not line.startswith("jsonl_ingest_request_duration_seconds"), line
            continue
        kind, route, cls, le, value = m.groups()
        h = out.setdefault((route, cls), {"buckets": []})
        if kind == "bucket":
            h["buckets"].append((float(le), int(value)))
        else:
            h[kind] = float(value) if kind == "sum" else int(value)
    return out


def test_duration_histogram_is_cumulative_and_counts_every_request(start_server, db, tmp_path):
    log = str(tmp_path / "access.log")
    srv = start_server(args=["--access-log", log])
    logged = Logged(srv, log)
    for _ in range(3):
        assert logged("GET", "/healthz")[0] == 200
    for _ in range(2):
        assert logged("GET", "/missing")[0] == 404
    assert logged("POST", "/users", helpers.good_body("hist", n=2))[0] == 200
    assert logged("POST", "/users", b"not json\n")[0] == 400
    n = logged.n
    st, body = req(srv, "GET", "/metrics")
    assert st == 200
    text = body.decode()
    assert "# TYPE jsonl_ingest_request_duration_seconds histogram" in text
    hist = parse_histogram(text)
    lines = read_lines(log)[:n]  # the /metrics request itself is counted after its answer
    expect = {}
    for line in lines:
        key = (line["route"], f"{line['status'] // 100}xx")
        expect[key] = expect.get(key, 0) + 1
    assert {k: h["count"] for k, h in hist.items()} == expect
    assert expect[("/healthz", "2xx")] >= 4 and expect[("other", "4xx")] == 2
    assert expect[("/users", "2xx")] == 1 and expect[("/users", "4xx")] == 1
    for key, h in hist.items():
        les = [le for le, _ in h["buckets"]]
        counts = [c for _, c in h["buckets"]]
        assert les == sorted(les) and les[-1] == float("inf") and len(les) == 15, key
        assert counts == sorted(counts), f"{key}: buckets not cumulative: {counts}"
        assert counts[-1] == h["count"]
        assert 0 <= h["sum"] <= h["count"] * 60
        total_ms = sum(line["ms"] for line in lines if (line["route"], f"{line['status'] // 100}xx") == key)
        assert abs(h["sum"] - total_ms / 1000) < 0.001 * h["count"] + 0.001, (key, h["sum"], total_ms)
