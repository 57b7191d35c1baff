"""Two instances behind HAProxy on one database and one images directory,
started by scripts/cluster with the repository's deploy/haproxy.cfg (the
module shares one cluster on free ports; a test that kills an instance leaves
it to the next test's fixture to start the cluster again).

- concurrent big uploads, plain and TLS, spread over both instances, every
  row and image file checked byte for byte;
- kill -9 of the instance streaming one upload while the other streams
  another: the killed one fails and leaves nothing once `gc` has run (during
  a third upload, whose files it must not touch); the others commit whole;
- kept-alive client connections with server-side connection reuse: every
  answer carries the counts of its own request;
- a 585 MB upload over TLS (memory-marked): bounded peak RSS of the instance,
  answer right after the last byte."""
import atexit
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time

import pytest

import helpers
from checks import assert_json_response

CLUSTER_SCRIPT = os.path.join(helpers.ROOT, "scripts", "cluster")
HAPROXY_CFG = os.path.join(helpers.ROOT, "deploy", "haproxy.cfg")
N_INSTANCES = 2
PEAK_RSS_LIMIT_MIB = 64
MEMORY_USERS = 5000

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy is not installed (scripts/setup-deps installs it)")


# ------------------------------------------------------------------ the cluster
def distinct_free_ports(n):
    ports = set()
    while len(ports) < n:
        ports.add(helpers.free_port())
    return sorted(ports)


class InstanceLog:
    """What conftest attaches to a failed test's report (port, argv, log_tail)."""

    def __init__(self, port, path, argv):
        self.port, self.log_path, self.argv = port, path, argv

    def log_tail(self, n=80):
        try:
            with open(self.log_path, "rb") as f:
                return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])
        except OSError:
            return ""


_LIVE_CLUSTERS = set()


@atexit.register
def _stop_leftover_clusters():
    # the processes run in sessions of their own: a pytest that dies past its fixtures must still stop them
    for c in list(_LIVE_CLUSTERS):
        c.stop()


class Cluster:
    """scripts/cluster on free ports, the service binary under test, the module's database."""

    def __init__(self, work, db_url):
        self.dir = os.path.join(work, "cluster")
        self.images_dir = os.path.join(work, "images")
        self.db_url = db_url
        self.http_port, self.https_port, *self.ports = distinct_free_ports(2 + N_INSTANCES)
        self.host = "127.0.0.1"
        self.env = dict(os.environ, JI_BINARY=helpers.BINARY, DATABASE_URL=db_url, JI_CLUSTER_DIR=self.dir,
                        JI_CLUSTER_HTTP_PORT=str(self.http_port), JI_CLUSTER_HTTPS_PORT=str(self.https_port),
                        JI_CLUSTER_PORTS=",".join(map(str, self.ports)), JI_CLUSTER_IMAGES_DIR=self.images_dir)

    def run(self, *args, timeout=120):
        return subprocess.run([CLUSTER_SCRIPT, *args], env=self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def start(self):
        _LIVE_CLUSTERS.add(self)
        r = self.run("start", str(N_INSTANCES), "--fsync", "off")
        if r.returncode != 0:
            out = r.stdout + r.stderr
            self.stop()
            pytest.fail(f"scripts/cluster start failed ({r.returncode}):\n{out}\n{self.logs_tail()}", pytrace=False)

    def stop(self):
        _LIVE_CLUSTERS.discard(self)
        return self.run("stop")

    def restart(self):
        self.stop()
        self.start()

    def pid(self, port):
        with open(os.path.join(self.dir, f"ji-{port}.pid")) as f:
            return int(f.read())

    def alive(self, port):
        try:
            os.kill(self.pid(port), 0)
            return True
        except (OSError, ValueError):
            return False

    def haproxy_alive(self):
        try:
            with open(os.path.join(self.dir, "haproxy.pid")) as f:
                os.kill(int(f.read()), 0)
            return True
        except (OSError, ValueError):
            return False

    def log_path(self, port):
        return os.path.join(self.dir, f"ji-{port}.log")

    def instance_logs(self):
        logs = [InstanceLog(p, self.log_path(p), ["instance", f"127.0.0.1:{p}"]) for p in self.ports]
        logs.append(InstanceLog(self.http_port, os.path.join(self.dir, "haproxy.log"), ["haproxy"]))
        return logs

    def logs_tail(self):
        return "\n".join(f"---- {l.log_path}\n{l.log_tail(30)}" for l in self.instance_logs())

    def metrics(self, port):
        st, _, body = helpers.raw_request(self.host, port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n"
                                          b"Connection: close\r\n\r\n", timeout=5)
        assert st == 200, f"GET /metrics on {port}: {st}"
        out = {}
        for line in body.decode().splitlines():
            m = re.match(r"^(jsonl_ingest_\w+(?:\{[^}]*\})?) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def in_flight(self, port):
        return int(self.metrics(port)["jsonl_ingest_ingests_in_flight"])

    def requests(self, port):
        return int(self.metrics(port)["jsonl_ingest_requests_total"])

    def status_kib(self, port, key):
        try:
            with open(f"/proc/{self.pid(port)}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def reset_peak_rss(self, port):
        """Resets VmHWM to the current RSS (Linux: 5 > /proc/PID/clear_refs); False when refused."""
        try:
            with open(f"/proc/{self.pid(port)}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def sanitizer_reports(self):
        reports = []
        for l in self.instance_logs():
            text = l.log_tail(100000)
            if re.search(r"ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:", text):
                reports.append(f"---- {l.log_path}\n{text[-6000:]}")
        return reports


@pytest.fixture(scope="module")
def module_cluster(module_db, tmp_path_factory):
    # room for the memory test: a 585 MB body (written beside) and 440 MB of images
    work = tempfile.mkdtemp(prefix="ji-cluster-", dir=helpers.roomy_tmp(2_500_000_000))
    c = Cluster(work, module_db)
    c.start()
    yield c
    c.stop()
    reports = c.sanitizer_reports()
    shutil.rmtree(work, ignore_errors=True)
    if reports:
        pytest.fail("sanitizer report in an instance's log:\n" + "\n".join(reports), pytrace=False)


@pytest.fixture
def cluster(request, module_cluster, db):
    """The module's cluster with both instances and HAProxy running (started again when a test killed one);
    tables truncated (db). Instance and HAProxy logs go with a failed test's report."""
    c = module_cluster
    if not (c.haproxy_alive() and all(c.alive(p) for p in c.ports)):
        c.restart()
    request.node._ji_servers = c.instance_logs()
    return c


# ------------------------------------------------------------------ bodies
def make_body(path, tag, n_users, image_bytes, seed):
    """JSON Lines with n_users records with PNG images; returns {email: (sha256, length)}."""
    rng = random.Random(seed)
    expected = {}
    with open(path, "wb") as f:
        for i in range(n_users):
            email = f"{tag}-{i}@example.com"
            n = image_bytes + rng.randrange(0, 4096)
            img = (helpers.PNG_SIGNATURE + rng.randbytes(n))[:n]
            expected[email] = (hashlib.sha256(img).hexdigest(), n)
            f.write(helpers.record_line(f"{tag} {i}", email, img) + b"\n")
    return expected


def assert_ok(res, *, inserted, images, body_bytes):
    """A 200 ingest answer with these counts. (Concurrent uploads interleave their user ids, so unlike
    checks.assert_success this does not ask for a contiguous id range: check_batch_files checks the ids.)"""
    assert res.status == 200, res
    j = assert_json_response(res)
    got = {k: j.get(k) for k in ("inserted", "skipped", "lines", "images", "bytes")}
    assert got == {"inserted": inserted, "skipped": 0, "lines": inserted, "images": images,
                   "bytes": body_bytes}, j
    assert isinstance(j.get("batch_id"), int), j
    return j


def check_batch_files(db, images_dir, resp_json, expected):
    """The batch's rows are exactly `expected`'s emails, each with its image byte for byte; returns the paths."""
    rows = db.users(f"batch_id = {int(resp_json['batch_id'])}")
    assert sorted(r["email"] for r in rows) == sorted(expected), \
        f"batch {resp_json['batch_id']}: {len(rows)} rows, {len(expected)} expected"
    assert (rows[0]["user_id"], rows[-1]["user_id"]) == (resp_json["first_user_id"], resp_json["last_user_id"])
    bad = []
    for r in rows:
        digest, length = expected[r["email"]]
        p = os.path.join(images_dir, r["image_path"] or "")
        if not r["image_path"] or not os.path.isfile(p):
            bad.append(f"{r['email']}: no file ({r['image_path']!r})")
        elif os.path.getsize(p) != length or helpers.sha256_file(p) != digest:
            bad.append(f"{r['email']}: {r['image_path']} differs from the image sent")
    assert not bad, f"{len(bad)} bad rows, e.g. {bad[:5]}"
    return [r["image_path"] for r in rows]


def tls_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the cluster's self-signed certificate
    return ctx


def connect(host, port, tls, timeout=60):
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        sock = tls_context().wrap_socket(sock, server_hostname="localhost")
    conn = helpers.HTTPConn.__new__(helpers.HTTPConn)
    conn.sock, conn.buf = sock, b""
    return conn


class PacedUpload(threading.Thread):
    """POST /users of a file through one connection at `rate` bytes/s until `finish` is set, then at full speed;
    the answer (or the error) is kept in .response / .error."""

    def __init__(self, host, port, body, tls=False, rate=128 * 1024):
        super().__init__(daemon=True)
        self.host, self.port, self.body, self.tls, self.rate = host, port, body, tls, rate
        self.size = os.path.getsize(body)
        self.finish = threading.Event()
        self.sent = 0
        self.response = None
        self.error = None

    def run(self):
        chunk = 16 * 1024
        try:
            conn = connect(self.host, self.port, self.tls)
            try:
                try:
                    conn.send(helpers.post_head("/users", self.size))
                    t0 = time.monotonic()
                    with open(self.body, "rb") as f:
                        while True:
                            data = f.read(chunk)
                            if not data:
                                break
                            conn.send(data)
                            self.sent += len(data)
                            if not self.finish.is_set():
                                delay = t0 + self.sent / self.rate - time.monotonic()
                                if delay > 0:
                                    self.finish.wait(delay)
                except OSError as e:
                    self.error = repr(e)  # the peer stopped reading: an answer may wait in the socket
                self.response = conn.read_response()
            finally:
                conn.close()
        except (OSError, ValueError) as e:
            self.error = (self.error + "; " if self.error else "") + repr(e)


# ------------------------------------------------------------------ tests
def test_config_is_the_repository_one(module_cluster):
    """The HAProxy running is the one of deploy/haproxy.cfg, with the properties the deployment relies on."""
    with open(HAPROXY_CFG) as f:
        cfg = "\n".join(l.split("#", 1)[0].rstrip() for l in f)
    for directive in ("balance leastconn", "option httpchk", "uri /readyz", "hdr Host localhost",
                      "option forwardfor", "http-reuse safe", "timeout client 1h", "timeout server 1h",
                      "timeout http-request"):
        assert directive in cfg, f"deploy/haproxy.cfg lacks {directive!r}"
    for directive in ("http-buffer-request", "http-server-close", "httpclose"):
        assert directive not in cfg, f"deploy/haproxy.cfg sets {directive!r}"
    with open(os.path.join(module_cluster.dir, "haproxy.pid")) as f:
        pid = int(f.read())
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert HAPROXY_CFG.encode() in argv, argv


@pytest.mark.timeout(240)
def test_concurrent_big_uploads_plain_and_tls(cluster, db, tmp_path):
    """8 uploads of ~20 MB at once (4 plain, 4 TLS) all commit, both instances take some, every row and file
    is exact and no two images share a file."""
    n_uploads, n_users, image_bytes = 8, 220, 64 * 1024
    bodies, expected = [], []
    for k in range(n_uploads):
        p = str(tmp_path / f"body-{k}.jsonl")
        expected.append(make_body(p, f"c{k}", n_users, image_bytes, seed=1000 + k))
        bodies.append(p)
    assert os.path.getsize(bodies[0]) > 19_000_000
    before = {p: cluster.requests(p) for p in cluster.ports}
    files_before = set(helpers.image_files(cluster.images_dir))

    results = [None] * n_uploads

    def upload(k):
        tls = k >= n_uploads // 2
        url = (f"https://127.0.0.1:{cluster.https_port}/users" if tls
               else f"http://127.0.0.1:{cluster.http_port}/users")
        d = tmp_path / f"curl-{k}"
        d.mkdir()
        args = ["-H", "Content-Type: application/x-ndjson", "-T", bodies[k], "-X", "POST"]
        if tls:
            args.append("-k")
        results[k] = helpers.curl(args + [url], d, max_time=180)

    threads = [threading.Thread(target=upload, args=(k,)) for k in range(n_uploads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    paths = []
    for k, res in enumerate(results):
        j = assert_ok(res, inserted=n_users, images=n_users, body_bytes=os.path.getsize(bodies[k]))
        paths += check_batch_files(db, cluster.images_dir, j, expected[k])
    took = {p: cluster.requests(p) - before[p] for p in cluster.ports}
    assert sum(took.values()) == n_uploads, took
    assert all(n > 0 for n in took.values()), f"one instance took every upload: {took}"
    assert len(set(paths)) == len(paths) == n_uploads * n_users, "two rows share an image file"
    new_files = set(helpers.image_files(cluster.images_dir)) - files_before
    assert new_files == set(paths), \
        f"{len(new_files - set(paths))} files without a row, {len(set(paths) - new_files)} rows without a file"
    assert db.count_users() == n_uploads * n_users
    assert helpers.pending_files(cluster.images_dir) == []


def journals(images_dir):
    d = os.path.join(images_dir, ".pending")
    return {n for n in os.listdir(d) if n.endswith(".list")} if os.path.isdir(d) else set()


def journal_paths(images_dir, name):
    with open(os.path.join(images_dir, ".pending", name)) as f:
        return [l.strip() for l in f if l.strip()]


@pytest.mark.timeout(180)
def test_kill_9_during_upload_then_gc(cluster, db, tmp_path):
    """kill -9 of the instance streaming upload A while the other streams B: A's client gets an error and
    nothing of A is committed; `gc`, run while the survivor streams C, removes A's files and none of B's or
    C's; B and C then commit with every file."""
    expected = {}
    bodies = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        bodies[name] = str(tmp_path / f"{name}.jsonl")
        expected[name] = make_body(bodies[name], f"k{name}", 120, 48 * 1024, seed=seed)
    ports = cluster.ports
    assert all(cluster.in_flight(p) == 0 for p in ports)
    j0 = journals(cluster.images_dir)

    # A: through HAProxy; whichever instance runs it, its in-flight gauge says so
    a = PacedUpload(cluster.host, cluster.http_port, bodies["a"])
    a.start()
    assert helpers.wait_for(lambda: sum(cluster.in_flight(p) for p in ports) == 1, timeout=10), \
        "upload A is not in flight on any instance"
    victim = next(p for p in ports if cluster.in_flight(p) == 1)
    survivor = next(p for p in ports if p != victim)
    assert helpers.wait_for(lambda: len(journals(cluster.images_dir) - j0) == 1, timeout=10), \
        "upload A's journal did not appear"
    (ja,) = journals(cluster.images_dir) - j0

    # B: leastconn sends the second long upload to the other instance
    b = PacedUpload(cluster.host, cluster.https_port, bodies["b"], tls=True)
    b.start()
    assert helpers.wait_for(lambda: cluster.in_flight(survivor) == 1, timeout=10), \
        f"upload B did not go to the idle instance (in flight: {[cluster.in_flight(p) for p in ports]})"
    assert helpers.wait_for(lambda: len(journals(cluster.images_dir) - j0) == 2, timeout=10)
    (jb,) = journals(cluster.images_dir) - j0 - {ja}
    # A has files on disk before the kill
    assert helpers.wait_for(lambda: len(journal_paths(cluster.images_dir, ja)) >= 3, timeout=15), \
        "upload A wrote no image yet"

    os.kill(cluster.pid(victim), signal.SIGKILL)
    a.join(30)
    assert not a.is_alive(), "upload A's client is still waiting after the kill"
    # HAProxy answers 502 and closes; a client still sending may see the reset before it reads the answer
    assert (a.response is not None and a.response.status == 502) or (a.response is None and a.error), \
        f"upload A: answer {a.response}, error {a.error}"
    a_files = journal_paths(cluster.images_dir, ja)
    assert any(os.path.exists(os.path.join(cluster.images_dir, p)) for p in a_files), \
        "the killed upload left no file for gc to find (test premise)"

    # C: the victim is gone, HAProxy sends C to the survivor (connection refused -> redispatch, or marked down)
    c = PacedUpload(cluster.host, cluster.http_port, bodies["c"])
    c.start()
    assert helpers.wait_for(lambda: cluster.in_flight(survivor) == 2, timeout=15), \
        f"upload C is not running on the survivor: {c.error or c.response}"
    assert helpers.wait_for(lambda: len(journals(cluster.images_dir) - j0 - {ja, jb}) == 1, timeout=10)
    (jc,) = journals(cluster.images_dir) - j0 - {ja, jb}
    assert helpers.wait_for(lambda: len(journal_paths(cluster.images_dir, jc)) >= 3, timeout=15)
    # a path is journalled before its file is created: judge gc by the files that exist now
    in_flight_files = [p for p in journal_paths(cluster.images_dir, jb) + journal_paths(cluster.images_dir, jc)
                       if os.path.exists(os.path.join(cluster.images_dir, p))]
    assert len(in_flight_files) >= 4

    gc = subprocess.run([helpers.BINARY, "gc", "--db", cluster.db_url, "--images-dir", cluster.images_dir],
                        capture_output=True, text=True, timeout=60)
    assert gc.returncode == 0, gc.stdout + gc.stderr
    left = [p for p in a_files if os.path.exists(os.path.join(cluster.images_dir, p))]
    assert left == [], f"gc left {len(left)} files of the killed upload, e.g. {left[:3]}"
    assert ja not in journals(cluster.images_dir), "gc left the killed upload's journal"
    assert {jb, jc} <= journals(cluster.images_dir), "gc removed the journal of an upload in flight"
    gone = [p for p in in_flight_files if not os.path.exists(os.path.join(cluster.images_dir, p))]
    assert gone == [], f"gc removed {len(gone)} files of uploads in flight, e.g. {gone[:3]}"
    assert cluster.in_flight(survivor) == 2, "B and C are no longer both in flight: gc ran too late to mean much"

    b.finish.set()
    c.finish.set()
    b.join(60)
    c.join(60)
    for name, up in (("b", b), ("c", c)):
        assert up.response is not None, f"upload {name.upper()}: {up.error}"
        j = assert_ok(up.response, inserted=120, images=120, body_bytes=os.path.getsize(bodies[name]))
        check_batch_files(db, cluster.images_dir, j, expected[name])
    assert db.count_users() == 240, "rows of the killed upload were committed"
    assert int(db.sql("SELECT count(*) FROM users WHERE email LIKE 'ka-%'")) == 0
    assert helpers.pending_files(cluster.images_dir) == []


@pytest.mark.timeout(180)
def test_keepalive_reuse_answers_match_requests(cluster, db):
    """20 clients x 10 uploads of different sizes on kept-alive connections (half TLS) through HAProxy,
    which reuses its server connections across clients: each answer's counts are its own request's."""
    n_clients, n_requests = 20, 10
    errors = []
    answers = []
    lock = threading.Lock()

    def client(t):
        tls = t % 2 == 1
        try:
            conn = connect(cluster.host, cluster.https_port if tls else cluster.http_port, tls, timeout=60)
            try:
                for r in range(n_requests):
                    n = 1 + (t * 7 + r * 5) % 23
                    tag = f"t{t}r{r}"
                    body = b"".join(helpers.record_line(f"{tag} {i}", f"{tag}-{i}@example.com",
                                                        helpers.png_bytes(100 + 37 * ((t + i) % 50), f"{tag}-{i}"))
                                    + b"\n" for i in range(n))
                    conn.send(helpers.post_head("/users", len(body)) + body)
                    resp = conn.read_response()
                    if resp.status != 200:
                        errors.append(f"{tag}: {resp}")
                        return
                    j = resp.json()
                    got = (j["inserted"], j["lines"], j["bytes"], j["images"])
                    if got != (n, n, len(body), n):
                        errors.append(f"{tag}: answer {got}, request {(n, n, len(body), n)}")
                    if resp.headers.get("connection", "").lower() == "close":
                        errors.append(f"{tag}: HAProxy closed the client connection")
                        return
                    with lock:
                        answers.append((tag, n, j["batch_id"]))
            finally:
                conn.close()
        except (OSError, ValueError, AssertionError) as e:
            errors.append(f"client {t}: {e!r}")

    threads = [threading.Thread(target=client, args=(t,)) for t in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} errors, e.g. {errors[:5]}"
    assert len(answers) == n_clients * n_requests
    # each answer's batch holds exactly that request's records
    rows = db.sql("SELECT batch_id, min(email), count(*) FROM users GROUP BY batch_id")
    by_batch = {}
    for line in rows.splitlines():
        bid, email, count = line.split("|")
        by_batch[int(bid)] = (email.split("-")[0], int(count))
    for tag, n, bid in answers:
        assert by_batch.get(bid) == (tag, n), f"{tag}: batch {bid} holds {by_batch.get(bid)}"


@pytest.mark.memory
@pytest.mark.timeout(480)
def test_585mb_over_tls_bounded_memory(cluster, db, figures):
    """5000 users (585 MB) over TLS through HAProxy: stored exactly, the instance's peak RSS under 64 MiB,
    the answer within 1 s of the last byte."""
    gen = os.path.join(os.path.dirname(cluster.images_dir), "gen")
    try:
        body = helpers.gen_users(MEMORY_USERS, gen)
        size = os.path.getsize(body)
        assert size > 580_000_000
        if not all(cluster.reset_peak_rss(p) for p in cluster.ports):
            cluster.restart()  # fresh processes: VmHWM counts this upload only
        files_before = set(helpers.image_files(cluster.images_dir))
        before = {p: cluster.requests(p) for p in cluster.ports}

        conn = connect(cluster.host, cluster.https_port, tls=True, timeout=300)
        try:
            t0 = time.monotonic()
            conn.send(helpers.post_head("/users", size))
            with open(body, "rb") as f:
                while True:
                    data = f.read(1 << 20)
                    if not data:
                        break
                    conn.send(data)
            t_last = time.monotonic()
            resp = conn.read_response()
            t_resp = time.monotonic()
        finally:
            conn.close()
        took = [p for p in cluster.ports if cluster.requests(p) > before[p]]
        assert len(took) == 1, f"instances that took the upload: {took}"
        hwm_kib = cluster.status_kib(took[0], "VmHWM")
        tail_s = t_resp - t_last
        figures(f"cluster: {MEMORY_USERS} users, {size / 1e6:.0f} MB over TLS through HAProxy: "
                f"{size / 1e6 / (t_resp - t0):.1f} MB/s, instance peak RSS {(hwm_kib or 0) / 1024:.1f} MiB, "
                f"last byte -> response {tail_s:.3f} s")

        assert_ok(resp, inserted=MEMORY_USERS, images=MEMORY_USERS, body_bytes=size)
        hashes = {}
        with open(os.path.join(gen, f"users-{MEMORY_USERS}.hashes.tsv")) as f:
            for line in f:
                email, digest, length = line.rstrip("\n").split("\t")
                hashes[email] = (digest, int(length))
        paths = check_batch_files(db, cluster.images_dir, resp.json(), hashes)
        assert set(helpers.image_files(cluster.images_dir)) - files_before == set(paths)
        assert hwm_kib is not None, "could not read the instance's VmHWM"
        assert hwm_kib / 1024 < PEAK_RSS_LIMIT_MIB, f"peak RSS {hwm_kib / 1024:.1f} MiB >= {PEAK_RSS_LIMIT_MIB} MiB"
        assert tail_s < 1.0, f"the answer came {tail_s:.2f} s after the last byte"
    finally:
        shutil.rmtree(gen, ignore_errors=True)
