"""Hardening of the JSON-array mode and of nesting (security audit, findings 1
and 2): a record nested deeper than JI_MAX_JSON_DEPTH is 400 with its line in
JSON Lines, in array bodies and in gzip array bodies, and the process lives
on; one array request may hold at most --max-array-memory (its body and the
tree estimated from the values a pre-scan counts: 413 above), all array
requests together at most --array-memory-budget (503 with Retry-After before
the tree is built); gzip array bombs leave peak RSS bounded."""
import concurrent.futures
import json
import subprocess
import time

import pytest

import helpers
from checks import assert_error, assert_nothing_left, assert_serves_good_request, assert_success

MAX_DEPTH = 64  # JI_MAX_JSON_DEPTH
DEPTH_MESSAGE = "record nested deeper than JI_MAX_JSON_DEPTH (64)"
MIB = 1 << 20
# docs/security.md: with the default flags, 8 concurrent copies of the 8 KB gzip array request of finding 2
# leave the process's peak RSS under this
EIGHT_GZIP_COPIES_PEAK_MIB = 64


def post_bytes(srv, tmp_path, data, name="body", **kw):
    return helpers.post(srv, helpers.write(tmp_path / name, data), tmp_path, **kw)


def records(tag, n):
    return [json.loads(line) for line in helpers.good_body(tag, n=n, image_bytes=200).splitlines()]


def nested(levels, value=b"1"):
    """`levels` arrays around `value`."""
    return b"[" * levels + value + b"]" * levels


def crash_body():
    """Finding 1: 600 KB, 300,000 '[' then 300,000 ']'."""
    return b"[" * 300000 + b"]" * 300000


def metric(srv, name):
    st, _, body = helpers.raw_request(srv.host, srv.port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert st == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not found")


class TableLock:
    """Holds ACCESS EXCLUSIVE on a table from a psql session, so that ingests stall at COPY with their trees."""

    def __init__(self, db_url, table):
        self.proc = subprocess.Popen(["psql", db_url, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.proc.stdin.write(f"BEGIN;\nLOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;\n\\echo locked\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.strip() == "locked", f"could not lock {table}: {line!r} {self.proc.stderr.read()}"

    def release(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("COMMIT;\n")
            self.proc.stdin.close()
            self.proc.wait(10)


# ------------------------------------------------------------------ finding 1: nesting
def test_jsonl_record_nested_too_deep_is_400_with_its_line(server, db, tmp_path):
    ok = helpers.record_line("a", "a@example.com", x=json.loads(nested(MAX_DEPTH - 1)))
    deep = b'{"name":"b","email":"b@example.com","x":' + crash_body() + b"}"
    res = post_bytes(server, tmp_path, ok + b"\n" + deep + b"\n" + ok + b"\n")
    j = assert_error(res, 400, line=2)
    assert DEPTH_MESSAGE in j["error"], j
    assert_nothing_left(db, server.images_dir)
    assert server.alive()
    assert_serves_good_request(server, db, tmp_path)


def test_jsonl_depth_limit_is_exact(server, db, tmp_path):
    """64 levels (the record's object and 63 arrays) pass; 65 do not."""
    fine = b'{"name":"a","email":"a@example.com","x":' + nested(MAX_DEPTH - 1) + b"}\n"
    res = post_bytes(server, tmp_path, fine, name="fine")
    assert_success(res, inserted=1)
    over = b'{"name":"a","email":"a@example.com","x":' + nested(MAX_DEPTH) + b"}\n"
    j = assert_error(post_bytes(server, tmp_path, over, name="over"), 400, line=1)
    assert DEPTH_MESSAGE in j["error"], j
    # skip mode reports it like any bad line
    res = post_bytes(server, tmp_path, over + fine, name="skip", query="on_error=skip")
    assert res.status == 200, res
    j = res.json()
    assert j["inserted"] == 1 and j["skipped"] == 1 and j["errors"][0]["line"] == 1, j


@pytest.mark.parametrize("how", ["sniffed", "format=array"])
def test_array_crash_body_is_400_and_the_process_lives(server, db, tmp_path, how):
    """The request of finding 1: text/plain, first byte '['; it used to kill the process in yajl_tree_free."""
    res = post_bytes(server, tmp_path, crash_body(), content_type="text/plain",
                     query="format=array" if how == "format=array" else "")
    j = assert_error(res, 400, line=1)
    assert DEPTH_MESSAGE in j["error"], j
    assert server.alive()
    assert server.healthy()
    assert_serves_good_request(server, db, tmp_path)


def test_gzip_array_crash_body_is_400_and_the_process_lives(server, db, tmp_path):
    gz = helpers.gzip_bytes(crash_body())
    assert len(gz) < 2000
    res = post_bytes(server, tmp_path, gz, content_type="application/json", query="format=array",
                     headers=["Content-Encoding: gzip"])
    j = assert_error(res, 400, line=1)
    assert DEPTH_MESSAGE in j["error"], j
    assert server.alive()
    assert_serves_good_request(server, db, tmp_path)


def test_array_deep_element_names_its_position(server, db, tmp_path):
    recs = records("deep", 4)
    recs[2]["x"] = json.loads(nested(MAX_DEPTH))  # element 3: its object and 64 arrays
    body = json.dumps(recs).encode()
    j = assert_error(post_bytes(server, tmp_path, body, query="format=array"), 400, line=3)
    assert DEPTH_MESSAGE in j["error"], j
    assert_nothing_left(db, server.images_dir)
    # one level less is fine: the element, like a JSON Lines record, may nest 64 levels
    recs[2]["x"] = json.loads(nested(MAX_DEPTH - 1))
    res = post_bytes(server, tmp_path, json.dumps(recs).encode(), name="ok", query="format=array")
    assert_success(res, inserted=4, images=4)


def test_array_comments_are_refused(server, db, tmp_path):
    """yajl's tree parser accepts comments; a comment could hide nesting from the pre-scan."""
    body = b'[{"name":"a","email":"a@example.com"} /* " */, ' + nested(200) + b" /* \" */]"
    j = assert_error(post_bytes(server, tmp_path, body, query="format=array"), 400, line=1)
    assert "comment" in j["error"], j
    assert_nothing_left(db, server.images_dir)


# ------------------------------------------------------------------ finding 2: one request's memory
def test_array_value_count_cap_is_413(start_server, db, tmp_path):
    """200 KB of zeros: far under --max-array-bytes, but 100,000 values would make a ~10 MB tree."""
    srv = start_server(args=["--max-array-memory", str(MIB), "--array-memory-budget", str(MIB)])
    body = b"[" + b",".join([b"0"] * 100000) + b"]"
    j = assert_error(post_bytes(srv, tmp_path, body, query="format=array"), 413)
    assert "--max-array-memory" in j["error"] and "values" in j["error"], j
    # the same bytes as one string are few values: that fits
    recs = records("fits", 3)
    recs[0]["bio"] = "x" * 200000
    res = post_bytes(srv, tmp_path, json.dumps(recs).encode(), name="fits", query="format=array")
    assert_success(res, inserted=3, images=3)
    assert metric(srv, 'jsonl_ingest_limits_total{limit="max_array_memory"}') == 1


def test_array_body_over_request_cap_is_413(start_server, db, tmp_path):
    """A body whose bytes alone (received, then copied for yajl) pass --max-array-memory."""
    srv = start_server(args=["--max-array-memory", str(MIB), "--array-memory-budget", str(4 * MIB)])
    recs = records("big", 2)
    recs[0]["bio"] = "x" * 600000
    body = json.dumps(recs).encode()
    j = assert_error(post_bytes(srv, tmp_path, body, query="format=array"), 413)
    assert "--max-array-memory" in j["error"], j
    assert_nothing_left(db, srv.images_dir)
    # what the request reserved came back: the budget is whole again
    res = post_bytes(srv, tmp_path, json.dumps(records("after", 3)).encode(), name="after", query="format=array")
    assert_success(res, inserted=3, images=3)


def test_gzip_array_inflate_is_capped_by_request_memory(start_server, db, tmp_path):
    srv = start_server(args=["--max-array-memory", str(MIB), "--array-memory-budget", str(MIB)])
    gz = helpers.gzip_bytes(b"[" + b" " * (2 * MIB) + b"]")
    j = assert_error(post_bytes(srv, tmp_path, gz, query="format=array", headers=["Content-Encoding: gzip"]), 413)
    assert "--max-array-memory" in j["error"], j
    assert srv.alive()


def test_array_budget_smaller_than_request_cap_is_refused_at_start(tmp_path):
    r = subprocess.run([helpers.BINARY, "--max-array-memory", "2000000", "--array-memory-budget", "1000000",
                        "--listen", f"127.0.0.1:{helpers.free_port()}", "--images-dir", str(tmp_path / "img")],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode != 0
    assert "--array-memory-budget" in r.stderr and "--max-array-memory" in r.stderr, r.stderr


# ------------------------------------------------------------------ finding 2: all array requests together
def test_array_budget_exhausted_is_503_with_retry_after(start_server, db, tmp_path):
    """One array request in progress holds the whole budget: the next one is 503 before its tree is built,
    and is served once the first is done."""
    srv = start_server(args=["--max-array-memory", str(MIB), "--array-memory-budget", str(MIB)])
    first = helpers.write(tmp_path / "first.json", json.dumps(records("first", 3)).encode())
    lock = TableLock(db.url, "users")
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(helpers.post, srv, first, tmp_path, query="format=array")
            # admitted, parsed, and waiting for COPY: its ingest is in flight
            assert helpers.wait_for(lambda: metric(srv, "jsonl_ingest_ingests_in_flight") == 1, timeout=10)
            res = post_bytes(srv, tmp_path, json.dumps(records("second", 3)).encode(), name="second",
                             query="format=array")
            j = assert_error(res, 503)
            assert res.headers.get("retry-after") == "1", res.headers
            assert "--array-memory-budget" in j["error"], j
            assert metric(srv, 'jsonl_ingest_limits_total{limit="array_memory_budget"}') == 1
            lock.release()
            assert_success(fut.result(timeout=20), inserted=3, images=3)
    finally:
        lock.release()
    res = post_bytes(srv, tmp_path, json.dumps(records("third", 3)).encode(), name="third", query="format=array")
    assert_success(res, inserted=3, images=3)
    assert db.count_users() == 6


# ------------------------------------------------------------------ peak RSS (release build only: ASan inflates RSS)
def concurrent_posts(srv, tmp_path, files, n, headers=()):
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futs = [pool.submit(helpers.post, srv, files[i % len(files)], tmp_path, content_type="application/json",
                            query="format=array", headers=headers) for i in range(n)]
        return [f.result(timeout=60) for f in futs]


@pytest.mark.memory
@pytest.mark.parametrize("unit", [b"0", b"{}"])
def test_four_gzip_array_bombs_at_once_stay_under_256_mib(server, db, tmp_path, unit, figures):
    """Finding 2: ~8 KB of gzip inflating to 8 MB of `[0,0,...]` (or `[{},{},...]`), four at once, default flags."""
    count = 8_000_000 // (len(unit) + 1)
    gz = helpers.gzip_bytes(b"[" + b",".join([unit] * count) + b"]")
    assert len(gz) < 9000
    f = helpers.write(tmp_path / "bomb.json.gz", gz)
    idle = server.status_kib("VmHWM")
    results = concurrent_posts(server, tmp_path, [f], 4, headers=["Content-Encoding: gzip"])
    hwm = server.status_kib("VmHWM")
    figures(f"array gzip bomb [{unit.decode()},...] x4: peak RSS {hwm / 1024:.1f} MiB (idle {idle / 1024:.1f} MiB), "
            f"answers {sorted(r.status for r in results)}")
    for r in results:
        assert r.status in (413, 503), r
    assert hwm < 256 * 1024, f"peak RSS {hwm / 1024:.1f} MiB"
    assert server.alive()
    assert db.count_users() == 0


@pytest.mark.memory
def test_eight_gzip_array_bombs_peak_rss_bound(server, db, tmp_path, figures):
    """8 concurrent copies of finding 2's request: peak RSS under the bound docs/security.md states."""
    gz = helpers.gzip_bytes(b"[" + b",".join([b"0"] * 4_000_000) + b"]")
    f = helpers.write(tmp_path / "bomb.json.gz", gz)
    results = concurrent_posts(server, tmp_path, [f], 8, headers=["Content-Encoding: gzip"])
    hwm = server.status_kib("VmHWM")
    figures(f"array gzip bomb x8: peak RSS {hwm / 1024:.1f} MiB, answers {sorted(r.status for r in results)}")
    for r in results:
        assert r.status in (413, 503), r
        if r.status == 503:
            assert r.headers.get("retry-after") == "1", r.headers
    assert hwm < EIGHT_GZIP_COPIES_PEAK_MIB * 1024, f"peak RSS {hwm / 1024:.1f} MiB"
    assert server.alive()


@pytest.mark.memory
@pytest.mark.timeout(120)
def test_budget_bounds_array_trees_held_at_once(server, db, tmp_path, figures):
    """Eight array requests that each fit --max-array-memory (default flags), all stalled at COPY with their trees
    built: the budget lets only what fits in --array-memory-budget in (the rest: 503), so peak RSS stays under
    idle + the budget (+ h2o's buffered bodies and slack). Without the budget the eight trees would take ~300 MB."""
    n = 100_000
    body = json.dumps([{"name": f"n{i}", "email": f"e{i}@x"} for i in range(n)]).encode()
    f = helpers.write(tmp_path / "fits.json", body)
    idle = server.status_kib("VmRSS")
    lock = TableLock(db.url, "users")
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(helpers.post, server, f, tmp_path, content_type="application/json",
                                query="format=array", max_time=60) for _ in range(8)]
            # the refused ones answer at once; the admitted ones wait for the lock
            helpers.wait_for(lambda: sum(x.done() for x in futs) >= 4, timeout=30)
            time.sleep(1)
            hwm_locked = server.status_kib("VmHWM")
            in_flight = metric(server, "jsonl_ingest_ingests_in_flight")
            lock.release()
            results = [x.result(timeout=60) for x in futs]
    finally:
        lock.release()
    statuses = sorted(r.status for r in results)
    hwm = server.status_kib("VmHWM")
    figures(f"array budget: 8 requests of {len(body) / 1e6:.1f} MB ({n} records) at once: answers {statuses}, "
            f"{in_flight:.0f} held trees at once, peak RSS {hwm / 1024:.1f} MiB (idle {idle / 1024:.1f} MiB)")
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert set(statuses) <= {200, 503}, statuses
    assert in_flight == statuses.count(200)
    for r in results:
        if r.status == 503:
            assert r.headers.get("retry-after") == "1", r.headers
    assert db.count_users() == n * statuses.count(200)
    bound_kib = idle + (128 + 8 * len(body) / MIB + 32) * 1024
    assert hwm_locked < bound_kib and hwm < bound_kib, f"peak RSS {hwm / 1024:.1f} MiB"
