"""Persistent connections: keep-alive with curl, pipelining with a raw socket."""
import json
import os
import subprocess

import helpers
from checks import assert_success


def curl_multi(transfers, tmp_path):
    """One curl process, several transfers joined by --next (curl reuses the
    connection when it can). Returns [(num_connects, http_code, body bytes)]."""
    cmd = ["curl", "-sS", "--max-time", "20"]
    outs = []
    for i, (args, url) in enumerate(transfers):
        out = str(tmp_path / f"multi-{i}.body")
        outs.append(out)
        if i:
            cmd.append("--next")
            cmd += ["--max-time", "20"]
        cmd += ["-o", out, "-w", "%{num_connects} %{http_code}\\n"] + args + [url]
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    lines = [l.split() for l in r.stdout.splitlines() if l.strip()]
    assert len(lines) == len(transfers), f"curl rc={r.returncode} out={r.stdout!r} err={r.stderr!r}"
    res = []
    for (nc, code), out in zip(lines, outs):
        body = open(out, "rb").read() if os.path.exists(out) else b""
        res.append((int(nc), int(code), body))
    return res


def ndjson_args(path):
    return ["-H", "Content-Type: application/x-ndjson", "--data-binary", "@" + str(path)]


def test_keepalive_two_uploads_one_connection(server, db, tmp_path):
    a = helpers.write(tmp_path / "a.jsonl", helpers.good_body("ka-a", n=4))
    b = helpers.write(tmp_path / "b.jsonl", helpers.good_body("ka-b", n=5))
    res = curl_multi([(ndjson_args(a), server.url), (ndjson_args(b), server.url)], tmp_path)
    assert [code for _, code, _ in res] == [200, 200], res
    assert sum(nc for nc, _, _ in res) == 1, f"curl opened {[nc for nc, _, _ in res]} connections"
    ja, jb = (json.loads(body) for _, _, body in res)
    assert (ja["inserted"], jb["inserted"]) == (4, 5)
    assert ja["batch_id"] != jb["batch_id"]
    rows_a = db.users(f"batch_id = {ja['batch_id']}")
    rows_b = db.users(f"batch_id = {jb['batch_id']}")
    assert [r["email"] for r in rows_a] == [f"ka-a-{i}@example.com" for i in range(4)]
    assert [r["email"] for r in rows_b] == [f"ka-b-{i}@example.com" for i in range(5)]
    assert len(helpers.image_files(server.images_dir)) == 9


def test_keepalive_chunked_then_content_length(server, db, tmp_path):
    a = helpers.write(tmp_path / "a.jsonl", helpers.good_body("kc-a", n=3))
    b = helpers.write(tmp_path / "b.jsonl", helpers.good_body("kc-b", n=2))
    res = curl_multi([(["-H", "Transfer-Encoding: chunked"] + ndjson_args(a), server.url),
                      (ndjson_args(b), server.url)], tmp_path)
    assert [code for _, code, _ in res] == [200, 200], res
    assert sum(nc for nc, _, _ in res) == 1
    assert db.count_users() == 5


def test_healthz_then_post_one_connection(server, db, tmp_path):
    a = helpers.write(tmp_path / "a.jsonl", helpers.good_body("hp", n=3))
    res = curl_multi([([], server.base + "/healthz"), (ndjson_args(a), server.url)], tmp_path)
    assert [code for _, code, _ in res] == [200, 200], res
    assert sum(nc for nc, _, _ in res) == 1, f"curl opened {[nc for nc, _, _ in res]} connections"
    assert json.loads(res[1][2])["inserted"] == 3
    assert db.count_users() == 3


def test_post_then_healthz_one_connection(server, db, tmp_path):
    a = helpers.write(tmp_path / "a.jsonl", helpers.good_body("ph", n=2))
    res = curl_multi([(ndjson_args(a), server.url), ([], server.base + "/healthz")], tmp_path)
    assert [code for _, code, _ in res] == [200, 200], res
    assert sum(nc for nc, _, _ in res) == 1
    assert db.count_users() == 2


def pipelined(server, requests):
    c = helpers.HTTPConn(server.host, server.port, timeout=15)
    try:
        c.send(b"".join(requests))  # one write: the requests arrive back to back
        return [c.read_response() for _ in requests]
    finally:
        c.close()


def test_pipelined_posts(server, db, tmp_path):
    """Two POSTs in one write: two responses, two batches, no record crosses over."""
    body_a = helpers.good_body("pipe-a", n=3)
    body_b = helpers.good_body("pipe-b", n=4)
    ra, rb = pipelined(server, [helpers.post_head("/users", len(body_a)) + body_a,
                                helpers.post_head("/users", len(body_b)) + body_b])
    ja = assert_success(ra, inserted=3, images=3, body_bytes=len(body_a))
    jb = assert_success(rb, inserted=4, images=4, body_bytes=len(body_b))
    assert ja["batch_id"] != jb["batch_id"]
    assert [r["email"] for r in db.users(f"batch_id = {ja['batch_id']}")] == \
        [f"pipe-a-{i}@example.com" for i in range(3)]
    assert [r["email"] for r in db.users(f"batch_id = {jb['batch_id']}")] == \
        [f"pipe-b-{i}@example.com" for i in range(4)]
    assert db.count_users() == 7
    assert len(helpers.image_files(server.images_dir)) == 7


def test_pipelined_chunked_posts(server, db, tmp_path):
    def chunked(body):
        mid = len(body) // 2
        parts = [body[:mid], body[mid:]]
        return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    body_a = helpers.good_body("pc-a", n=2)
    body_b = helpers.good_body("pc-b", n=3)
    ra, rb = pipelined(server, [helpers.post_head("/users", chunked=True) + chunked(body_a),
                                helpers.post_head("/users", chunked=True) + chunked(body_b)])
    assert_success(ra, inserted=2)
    assert_success(rb, inserted=3)
    assert db.count_users() == 5


def test_pipelined_get_then_post(server, db, tmp_path):
    body = helpers.good_body("gp", n=2)
    rh, rp = pipelined(server, [b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                                helpers.post_head("/users", len(body)) + body])
    assert rh.status == 200
    assert_success(rp, inserted=2)
    assert db.count_users() == 2


def test_pipelined_post_then_get(server, db, tmp_path):
    body = helpers.good_body("pg", n=2)
    rp, rh = pipelined(server, [helpers.post_head("/users", len(body)) + body,
                                b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"])
    assert_success(rp, inserted=2)
    assert rh.status == 200
    assert db.count_users() == 2
