"""Resumable uploads with a real client nobody here wrote: tus-js-client 4.x (clients/node, pinned in its lock
file, installed by scripts/setup-node-client) driven by clients/node/upload.mjs.

- tus 1.0.0 (tus-v1) and the IETF draft (ietf-draft-05), in 8 MiB PATCHes and in one PATCH, of a generated
  117 MB file (scripts/gen-users, 1000 users): every row and image equal, row for row, to the same file sent
  in one POST /users, and the same counts;
- through a flaky TCP path (flaky_proxy.py: each connection cut after a seeded random number of bytes) with
  retries: complete, exact, no duplicate row, no stray file after `gc`; the bytes resent are a figure;
- kill -9 of the instance in the middle of an append, restart on the same database and images directory:
  HEAD gives a durable offset (at a line end, never backwards) and the client continues to an exact result;
- resume on a second instance behind HAProxy (scripts/cluster, deploy/haproxy.cfg) after the first is killed;
- a 585 MB upload in 8 MiB appends with the server's peak RSS under 16 MiB (memory-marked).
"""
import json
import os
import shutil
import signal
import subprocess
import tempfile

import pytest

import helpers
from flaky_proxy import FlakyProxy

NODE_DIR = os.path.join(helpers.ROOT, "clients", "node")
UPLOAD_MJS = os.path.join(NODE_DIR, "upload.mjs")
SETUP_NODE_CLIENT = os.path.join(helpers.ROOT, "scripts", "setup-node-client")
MiB = 1 << 20
CHUNK_8MIB = 8 * MiB
N_USERS = 1000             # 117 MB, as the other big tests
MEMORY_USERS = 5000        # 585 MB
PEAK_RSS_LIMIT_MIB = 16
PROTOCOLS = ("tus-v1", "ietf-draft-05")
# retries for drops and restarts: many, short (the proxy cuts often; a restart takes about a second)
PATIENT_RETRIES = ",".join(["100"] * 5 + ["300"] * 20 + ["1000"] * 60)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def node_client():
    """The Node.js client installed (npm ci from the lock file when node_modules is missing or stale)."""
    if shutil.which("node") is None:
        pytest.fail("node is not installed (scripts/setup-deps installs nodejs)", pytrace=False)
    r = subprocess.run([SETUP_NODE_CLIENT], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"scripts/setup-node-client failed:\n{r.stdout}{r.stderr}"
    return UPLOAD_MJS


class Generated:
    """A scripts/gen-users file and the sha256 and length of every image, by email."""

    def __init__(self, work, n):
        out = os.path.join(work, f"gen-{n}")
        self.path = helpers.gen_users(n, out, timeout=600)
        self.size = os.path.getsize(self.path)
        self.n = n
        self.hashes = {}
        with open(os.path.join(out, f"users-{n}.hashes.tsv")) as f:
            for line in f:
                email, digest, length = line.rstrip("\n").split("\t")
                self.hashes[email] = (digest, int(length))


@pytest.fixture(scope="module")
def work_dir():
    work = tempfile.mkdtemp(prefix="ji-resumable-", dir=helpers.roomy_tmp(3_000_000_000))
    yield work
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def users_117mb(work_dir):
    g = Generated(work_dir, N_USERS)
    assert g.size > 115_000_000
    return g


@pytest.fixture
def big_images(work_dir, tmp_path):
    """An images directory on the roomy tmp (the 117 MB file's images are 88 MB), removed after the test."""
    d = tempfile.mkdtemp(prefix="images-", dir=work_dir)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ helpers
def run_client(endpoint, path, protocol="tus-v1", chunk=CHUNK_8MIB, retry_delays=None, extra=(), timeout=600,
               check=True):
    """clients/node/upload.mjs -> its JSON result line (a dict; "_rc" and "_stderr" added)."""
    cmd = ["node", UPLOAD_MJS, "--file", str(path), "--protocol", protocol,
           "--chunk-size", "Infinity" if chunk is None else str(chunk), "--progress", "lines"]
    if endpoint:
        cmd += ["--endpoint", endpoint]
    if retry_delays is not None:
        cmd += ["--retry-delays", retry_delays]
    cmd += list(extra)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    assert lines, f"upload.mjs printed no result (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    res = json.loads(lines[-1])
    res["_rc"], res["_stderr"] = r.returncode, r.stderr
    if check:
        assert r.returncode == 0 and res["ok"], f"upload failed: {res}\n{r.stderr[-3000:]}"
    return res


def start_client(endpoint, path, protocol="tus-v1", chunk=CHUNK_8MIB, retry_delays=None, extra=()):
    cmd = ["node", UPLOAD_MJS, "--file", str(path), "--protocol", protocol, "--endpoint", endpoint,
           "--chunk-size", "Infinity" if chunk is None else str(chunk), "--progress", "lines"]
    if retry_delays is not None:
        cmd += ["--retry-delays", retry_delays]
    cmd += list(extra)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def finish_client(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    lines = [l for l in out.splitlines() if l.startswith("{")]
    assert lines, f"upload.mjs printed no result (exit {proc.returncode}):\n{out}\n{err}"
    res = json.loads(lines[-1])
    res["_rc"], res["_stderr"] = proc.returncode, err
    return res


def committed_answer(res, size, n):
    """The final answer of a completed resumable upload: the POST /users JSON (the draft's final PATCH, or the
    kept answer of GET /uploads/{token} for tus) with the whole file's counts."""
    assert res["ok"], res
    assert res["offset"] == size, res
    a = res.get("answer")
    assert isinstance(a, dict), f"no final answer JSON: {res}"
    got = {k: a.get(k) for k in ("inserted", "skipped", "lines", "images", "bytes")}
    assert got == {"inserted": n, "skipped": 0, "lines": n, "images": n, "bytes": size}, a
    assert isinstance(a.get("batch_id"), int), a
    return a


def batch_rows(db, images_dir, batch_id):
    """(name, email, image_type, image_size, sha256 of the image file) of a batch, in user_id order."""
    out = []
    for r in db.users(f"batch_id = {int(batch_id)}"):
        p = os.path.join(images_dir, r["image_path"]) if r["image_path"] else None
        digest = helpers.sha256_file(p) if p and os.path.isfile(p) else None
        out.append((r["name"], r["email"], r["image_type"], r["image_size"], digest))
    return out


def check_exact(db, images_dir, gen, batch_id):
    """The batch is the generated file: one row per user in file order, each image byte for byte."""
    rows = batch_rows(db, images_dir, batch_id)
    emails = [r[1] for r in rows]
    assert len(emails) == len(set(emails)), f"duplicate rows: {len(emails) - len(set(emails))}"
    assert emails == [f"user{i}@example.com" for i in range(gen.n)], \
        f"{len(rows)} rows, not the {gen.n} users in file order"
    bad = [r for r in rows
           if r[0] != r[1].split("@")[0] or (r[4], r[3]) != gen.hashes[r[1]]]
    assert not bad, f"{len(bad)} rows differ from the file, e.g. {bad[:3]}"
    return rows


def run_gc(db_url, images_dir):
    r = subprocess.run([helpers.BINARY, "gc", "--db", db_url, "--images-dir", images_dir],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def head_upload(host, port, token, protocol="tus-v1"):
    extra = "Tus-Resumable: 1.0.0\r\n" if protocol == "tus-v1" else "Upload-Draft-Interop-Version: 6\r\n"
    st, hdrs, _ = helpers.raw_request(host, port, (f"HEAD /uploads/{token} HTTP/1.1\r\nHost: localhost\r\n"
                                                   f"{extra}Connection: close\r\n\r\n").encode(), timeout=10)
    return st, hdrs


def durable_offset(db):
    v = db.sql("SELECT coalesce(max(upload_offset), 0) FROM uploads")
    return int(v or 0)


def byte_at(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(1)


# ------------------------------------------------------------------ tests
@pytest.mark.timeout(300)
@pytest.mark.parametrize("chunk", [CHUNK_8MIB, None], ids=["8MiB", "one-PATCH"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_117mb_equals_plain_post(node_client, start_server, db, users_117mb, big_images, protocol, chunk, figures):
    """tus-js-client uploads the 117 MB file; then the same file goes in one POST /users: both batches are equal
    row for row (name, email, image type, size and bytes), with the same counts."""
    gen = users_117mb
    srv = start_server(images_dir=big_images)
    res = run_client(srv.base, gen.path, protocol, chunk)
    a = committed_answer(res, gen.size, gen.n)
    if chunk is None:
        assert res["bytes_sent"] == gen.size, f"bytes resent without a drop: {res['bytes_sent']} of {gen.size}"
    else:
        # an append keeps whole lines: the record a PATCH ends in is sent again at the start of the next one
        line_max = 117_100 + 64
        n_patches = -(-gen.size // chunk)
        assert gen.size <= res["bytes_sent"] <= gen.size + n_patches * line_max, \
            f"{res['bytes_sent']} bytes sent for {gen.size} in {n_patches} PATCHes"
    if protocol == "tus-v1":
        assert res["content_location"] == f"/batches/{a['batch_id']}", res
    resumable_rows = check_exact(db, big_images, gen, a["batch_id"])
    st, _, body = helpers.raw_request(srv.host, srv.port, (f"GET /uploads/{res['token']} HTTP/1.1\r\n"
                                                           "Host: localhost\r\nConnection: close\r\n\r\n").encode())
    assert st == 200, (st, body[:300])
    state = json.loads(body)
    assert state.get("batch_id") == a["batch_id"] and state.get("offset") == gen.size, state

    up = helpers.stream_upload(srv.host, srv.port, "/users", gen.path,
                               headers=["Content-Type: application/x-ndjson"], timeout=300)
    assert up["response"] is not None and up["response"].status == 200, up
    p = up["response"].json()
    for k in ("inserted", "skipped", "lines", "images", "bytes"):
        assert p[k] == a[k], f"{k}: POST {p[k]}, resumable {a[k]}"
    post_rows = batch_rows(db, big_images, p["batch_id"])
    assert post_rows == resumable_rows, "the resumable upload's rows differ from the same file's POST /users"
    assert db.count_users() == 2 * gen.n
    assert helpers.pending_files(big_images) == []
    figures(f"resumable {protocol} {'8 MiB PATCHes' if chunk else 'one PATCH'}: {gen.size / 1e6:.0f} MB in "
            f"{res['seconds']:.2f} s ({gen.size / 1e6 / res['seconds']:.1f} MB/s, {res['requests']} requests, "
            f"{res['bytes_sent'] - gen.size} bytes of partial lines sent again), "
            f"last byte -> answer {res['last_byte_to_answer_s']:.3f} s")


@pytest.mark.timeout(420)
@pytest.mark.parametrize("protocol,chunk", [("tus-v1", CHUNK_8MIB), ("ietf-draft-05", None)],
                         ids=["tus-8MiB", "ietf-one-PATCH"])
def test_flaky_path_completes_exactly(node_client, start_server, db, users_117mb, big_images, protocol, chunk,
                                      figures):
    """Through a path that cuts every connection after 2..24 MiB from the client (seeded), tus-js-client retries
    from the server's offset and completes: every row and image exact, no duplicate, and after `gc` the images
    directory holds exactly the rows' files."""
    gen = users_117mb
    srv = start_server(images_dir=big_images)
    with FlakyProxy(srv.host, srv.port, seed=20261207, cut_min=2 * MiB, cut_max=24 * MiB) as proxy:
        res = run_client(f"http://127.0.0.1:{proxy.port}", gen.path, protocol, chunk, retry_delays=PATIENT_RETRIES)
        stats = proxy.stats()
    a = committed_answer(res, gen.size, gen.n)
    assert stats["cuts"] >= 3, f"the path cut only {stats['cuts']} connections: the test proves little ({stats})"
    assert res["retries"] >= 1, res
    check_exact(db, big_images, gen, a["batch_id"])
    assert db.count_users() == gen.n
    assert int(db.sql("SELECT count(DISTINCT email) FROM users")) == gen.n

    run_gc(db.url, big_images)
    files = helpers.image_files(big_images)
    assert len(files) == gen.n, f"{len(files)} image files for {gen.n} rows after gc"
    assert sorted(files) == sorted(os.path.normpath(r["image_path"]) for r in db.users())
    assert helpers.pending_files(big_images) == []
    assert db.sql("SELECT count(*) FROM upload_rows") == "0"

    resent = stats["bytes_from_client"] - gen.size
    figures(f"flaky path {protocol} {'8 MiB PATCHes' if chunk else 'one PATCH'}: {stats['cuts']} cuts in "
            f"{stats['connections']} connections, {res['retries']} retries; the server's side received "
            f"{stats['bytes_from_client']} bytes for a {gen.size}-byte file (+{resent / 1e6:.1f} MB, "
            f"{100 * resent / gen.size:.1f}%; {resent / max(stats['cuts'], 1) / 1e6:.2f} MB per drop), "
            f"the client sent {res['bytes_sent']} (+{(res['bytes_sent'] - gen.size) / 1e6:.1f} MB)")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_kill_9_mid_append_then_resume(node_client, start_server, db, users_117mb, big_images, protocol):
    """kill -9 of the server while an 8 MiB append streams; restarted on the same port, database and images
    directory, HEAD answers a durable offset (a line end, never backwards) and the same client continues to an
    exact result; `gc` leaves exactly the rows' files."""
    gen = users_117mb
    srv = start_server(images_dir=big_images)
    proc = start_client(srv.base, gen.path, protocol, CHUNK_8MIB, retry_delays=PATIENT_RETRIES)
    try:
        assert helpers.wait_for(lambda: durable_offset(db) > 0 or proc.poll() is not None, timeout=120), \
            "no append was committed"
        assert proc.poll() is None, f"the client ended before the kill: {proc.communicate()}"
        # the next append is under way once image files beyond those of the committed appends appear
        n_files = len(helpers.all_files(big_images))
        assert helpers.wait_for(lambda: len(helpers.all_files(big_images)) > n_files + 3 or proc.poll() is not None,
                                timeout=60, interval=0.01), "the next append wrote no image"
        before = durable_offset(db)
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(10)
        at_kill = durable_offset(db)
        assert 0 < at_kill < gen.size, at_kill
        assert at_kill >= before
        assert byte_at(gen.path, at_kill - 1) == b"\n", f"durable offset {at_kill} is not at a line end"
        token = db.sql("SELECT token FROM uploads")
        srv2 = start_server(images_dir=big_images, port=srv.port)
        st, hdrs = head_upload(srv2.host, srv2.port, token, protocol)
        assert st == 200, (st, hdrs)
        head_offset = int(hdrs["upload-offset"])
        assert at_kill <= head_offset <= gen.size, f"HEAD offset {head_offset}, durable at the kill {at_kill}"
        res = finish_client(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert res["_rc"] == 0, f"{res}\n{res['_stderr'][-3000:]}"
    assert res["retries"] >= 1, res
    a = committed_answer(res, gen.size, gen.n)
    check_exact(db, big_images, gen, a["batch_id"])
    assert db.count_users() == gen.n
    run_gc(db.url, big_images)
    assert len(helpers.image_files(big_images)) == gen.n
    assert helpers.pending_files(big_images) == []


@pytest.mark.timeout(300)
def test_resume_on_second_instance_behind_haproxy(node_client, module_db, db, users_117mb, work_dir):
    """The first part goes straight to instance A; A is killed (-9) in the middle of an append; the upload is
    finished through HAProxy, on instance B (same database and images directory), and is exact."""
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed (scripts/setup-deps installs it)", pytrace=False)
    from test_cluster import Cluster
    gen = users_117mb
    cwork = tempfile.mkdtemp(prefix="cluster-", dir=work_dir)
    cluster = Cluster(cwork, module_db)
    cluster.start()
    try:
        a_port, b_port = cluster.ports
        proc = start_client(f"http://127.0.0.1:{a_port}", gen.path, "tus-v1", CHUNK_8MIB, retry_delays="")
        try:
            assert helpers.wait_for(lambda: durable_offset(db) > 0 or proc.poll() is not None, timeout=120), \
                "no append was committed on A"
            assert proc.poll() is None, f"the client ended before the kill: {proc.communicate()}"
            n_files = len(helpers.all_files(cluster.images_dir))
            helpers.wait_for(lambda: len(helpers.all_files(cluster.images_dir)) > n_files + 3, timeout=60,
                             interval=0.01)
            os.kill(cluster.pid(a_port), signal.SIGKILL)
            first = finish_client(proc, timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert first["_rc"] != 0 and not first["ok"], f"the upload through A did not fail with A: {first}"
        at_kill = durable_offset(db)
        assert 0 < at_kill < gen.size and byte_at(gen.path, at_kill - 1) == b"\n", at_kill
        token = first["token"]
        assert token and token == db.sql("SELECT token FROM uploads"), first

        st, hdrs = head_upload(cluster.host, b_port, token)
        assert st == 200 and int(hdrs["upload-offset"]) == at_kill, (st, hdrs)
        res = run_client(None, gen.path, "tus-v1", CHUNK_8MIB, retry_delays=PATIENT_RETRIES,
                         extra=["--upload-url", f"http://127.0.0.1:{cluster.http_port}/uploads/{token}"])
        resumed = cluster.metrics(b_port).get("jsonl_ingest_uploads_resumed_total", 0)
        assert resumed >= 1, "instance B counted no resumed append"
        a = committed_answer(res, gen.size, gen.n)
        assert res["bytes_sent"] <= gen.size - at_kill + CHUNK_8MIB, \
            f"resent more than the rest: {res['bytes_sent']} after offset {at_kill}"
        check_exact(db, cluster.images_dir, gen, a["batch_id"])
        assert db.count_users() == gen.n
        run_gc(db.url, cluster.images_dir)
        assert len(helpers.image_files(cluster.images_dir)) == gen.n
        assert helpers.pending_files(cluster.images_dir) == []
    finally:
        cluster.stop()
        reports = cluster.sanitizer_reports()
        shutil.rmtree(cwork, ignore_errors=True)
    assert not reports, "sanitizer report in an instance's log:\n" + "\n".join(reports)


@pytest.mark.memory
@pytest.mark.timeout(600)
def test_585mb_in_8mib_appends_bounded_memory(node_client, start_server, db, work_dir, big_images, figures):
    """A 585 MB resumable upload (tus, 8 MiB PATCHes) keeps the server's peak RSS under 16 MiB; every row and
    image exact."""
    srv = start_server(images_dir=big_images)
    gen = Generated(work_dir, MEMORY_USERS)
    try:
        assert gen.size > 580_000_000
        idle_kib = srv.status_kib("VmRSS")
        res = run_client(srv.base, gen.path, "tus-v1", CHUNK_8MIB)
        hwm_kib = srv.status_kib("VmHWM")
        a = committed_answer(res, gen.size, gen.n)
        figures(f"resumable memory: {gen.size / 1e6:.0f} MB in {res['requests']} requests (8 MiB PATCHes): "
                f"{gen.size / 1e6 / res['seconds']:.1f} MB/s, peak RSS {(hwm_kib or 0) / 1024:.1f} MiB "
                f"(idle {(idle_kib or 0) / 1024:.1f} MiB), last byte -> answer {res['last_byte_to_answer_s']:.3f} s")
        check_exact(db, big_images, gen, a["batch_id"])
        assert hwm_kib is not None, "could not read the server's VmHWM"
        assert hwm_kib / 1024 < PEAK_RSS_LIMIT_MIB, f"peak RSS {hwm_kib / 1024:.1f} MiB >= {PEAK_RSS_LIMIT_MIB} MiB"
    finally:
        shutil.rmtree(os.path.dirname(gen.path), ignore_errors=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["tus", "ietf"])
def test_scripts_upload_prints_the_answer(node_client, start_server, db, tmp_path, protocol):
    """scripts/upload FILE URL: stdout is the batch's POST /users JSON, stderr says where the upload went and
    how it ended (no terminal: plain lines); --metadata reaches the upload (skip mode keeps a bad record aside)."""
    srv = start_server()
    body = helpers.good_body("su", n=30) + b'{"name": "bad"}\n' + helpers.good_body("sv", n=5)
    path = helpers.write(tmp_path / "up.jsonl", body)
    r = subprocess.run([os.path.join(helpers.ROOT, "scripts", "upload"), path, srv.base, "--protocol", protocol,
                        "--chunk-size", "4096", "--metadata", "on_error=skip"],
                       capture_output=True, text=True, timeout=110, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"scripts/upload exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    assert {k: answer.get(k) for k in ("inserted", "skipped", "lines", "images", "bytes")} == \
        {"inserted": 35, "skipped": 1, "lines": 36, "images": 35, "bytes": len(body)}, answer
    assert db.count_users() == 35
    assert "upload URL http://127.0.0.1:" in r.stderr and "done:" in r.stderr, r.stderr
    assert "\r" not in r.stderr, "progress drew a terminal line into a pipe"

    bad = subprocess.run([os.path.join(helpers.ROOT, "scripts", "upload"), path, srv.base, "--protocol", protocol,
                          "--retries", "0"], capture_output=True, text=True, timeout=110, stdin=subprocess.DEVNULL)
    assert bad.returncode == 1, f"a failing upload exited {bad.returncode}\n{bad.stdout}\n{bad.stderr}"
    err = json.loads(bad.stdout.strip().splitlines()[-1])
    assert err.get("line") == 31, err
    assert db.count_users() == 35, "the failed upload committed rows"
