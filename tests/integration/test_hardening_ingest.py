"""Hardening of the ingest: Idempotency-Key rules (visible ASCII, 422 for another
body, 409 while the first request runs, byte-identical replays, expiry after
--idempotency-ttl by the service and by gc), no PostgreSQL text in 5xx answers,
and failed requests that give their database connection back instead of
costing a new server process each."""
import gzip
import hashlib
import json
import os
import subprocess
import threading
import time

import pytest

import helpers
from checks import assert_error, assert_success


# ------------------------------------------------------------------ local helpers
def body(tag, n=3, image_bytes=200):
    return helpers.good_body(tag, n=n, image_bytes=image_bytes)


def head(length, headers=(), chunked=False):
    """A POST /users head as bytes (header values may hold any byte)."""
    h = [b"POST /users HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/x-ndjson"]
    h.append(b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % length)
    h += [x if isinstance(x, bytes) else x.encode() for x in headers]
    return b"\r\n".join(h) + b"\r\n\r\n"


def chunked(data, piece=100):
    out = b""
    for i in range(0, len(data), piece):
        part = data[i:i + piece]
        out += b"%x\r\n" % len(part) + part + b"\r\n"
    return out + b"0\r\n\r\n"


def post(srv, data, headers=(), conn=None, as_chunks=False):
    """One POST /users on a raw connection (a new one unless `conn` is given)."""
    c = conn or helpers.HTTPConn(srv.host, srv.port, timeout=20)
    try:
        c.send(head(len(data), headers, chunked=as_chunks) + (chunked(data) if as_chunks else data))
        return c.read_response()
    finally:
        if conn is None:
            c.close()


def h2o_owned_conn(srv):
    """A keep-alive connection whose first request went to h2o (GET /healthz): later requests take h2o's path."""
    c = helpers.HTTPConn(srv.host, srv.port, timeout=20)
    c.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert c.read_response().status == 200
    return c


def key(k):
    return b"Idempotency-Key: " + (k if isinstance(k, bytes) else k.encode())


def db_name(db):
    return db.sql("SELECT current_database()")


def batches(db):
    return json.loads(db.sql("SELECT coalesce(json_agg(t ORDER BY batch_id), '[]') FROM (SELECT batch_id, "
                             "idempotency_key, response IS NOT NULL AS has_response, encode(request_digest, 'hex') "
                             "AS digest FROM batches) t"))


def ingest_backends(db):
    """pids of the service's connections to the module's database."""
    out = db.sql("SELECT string_agg(pid::text, ' ') FROM pg_stat_activity WHERE datname = current_database() "
                 "AND application_name = 'jsonl-ingest'")
    return set(out.split())


class SlowUpload:
    """A POST /users whose body is sent in parts, on a raw socket."""

    def __init__(self, srv, data, headers=()):
        self.data = data
        self.conn = helpers.HTTPConn(srv.host, srv.port, timeout=20)
        self.conn.send(head(len(data), headers))
        self.sent = 0

    def send(self, n):
        self.conn.send(self.data[self.sent:self.sent + n])
        self.sent += n

    def finish(self):
        self.conn.send(self.data[self.sent:])
        self.sent = len(self.data)
        return self.conn.read_response()

    def close(self):
        self.conn.close()


def assert_no_pg_text(res):
    text = res.body.decode("utf-8", "replace")
    for needle in ("pg-secret", "ERROR:", "invalid byte sequence", "canceling statement", "violates",
                   "connection to server", "relation \"", "SQLSTATE"):
        assert needle not in text, f"the answer carries PostgreSQL's text ({needle!r}): {text}"


# ------------------------------------------------------------------ key syntax
BAD_KEYS = [b"\xff", b"caf\xc3\xa9", b"a b", b"k" * 256, b'"k\\ey"', b'"unterminated', b'""', b"tab\there"]


@pytest.mark.timeout(40)
def test_idempotency_key_outside_visible_ascii_is_400_on_both_paths(server, db, tmp_path):
    data = body("keys")
    for k in BAD_KEYS:
        res = post(server, data, [key(k)])
        assert_error(res, 400)
        assert "Idempotency-Key" in res.json()["error"], res
        assert_no_pg_text(res)
        # the same on a connection that h2o owns
        c = h2o_owned_conn(server)
        try:
            res = post(server, data, [key(k)], conn=c)
        finally:
            c.close()
        assert res.status == 400, (k, res)
        assert "Idempotency-Key" in res.json()["error"], res
    assert db.count_users() == 0
    assert batches(db) == []
    assert helpers.image_files(server.images_dir) == []

    # the longest key, and the quoted form of the draft: "abc" and abc are one key
    long_key = "k" * 255
    r1 = post(server, data, [key(long_key)])
    assert_success(r1, inserted=3)
    r2 = post(server, data, [key('"' + long_key + '"')])
    assert r2.status == 200 and r2.body == r1.body, r2
    assert db.count_users() == 3
    assert [b["idempotency_key"] for b in batches(db)] == [long_key]


# ------------------------------------------------------------------ replays and other bodies
@pytest.mark.timeout(60)
def test_same_key_same_content_replays_bytes_other_content_is_422(server, db, tmp_path):
    data = body("replay", n=4)
    r1 = post(server, data, [key("order-7")])
    j1 = assert_success(r1, inserted=4, images=4)
    files = helpers.image_files(server.images_dir)
    (b,) = batches(db)
    assert b["idempotency_key"] == "order-7" and b["has_response"]
    assert b["digest"] == hashlib.sha256(data).hexdigest(), "the stored digest is not SHA-256 of the body"

    # the same content: Content-Length, chunked, gzip, on h2o's path: the first answer byte for byte, nothing stored
    same = [post(server, data, [key("order-7")]),
            post(server, data, [key("order-7")], as_chunks=True),
            post(server, gzip.compress(data), [key("order-7"), b"Content-Encoding: gzip"])]
    c = h2o_owned_conn(server)
    try:
        same.append(post(server, data, [key("order-7")], conn=c))
    finally:
        c.close()
    for r in same:
        assert r.status == 200, r
        assert r.body == r1.body, f"replay differs from the first answer: {r.body!r} vs {r1.body!r}"
    assert db.count_users() == 4
    assert helpers.image_files(server.images_dir) == files
    assert len(batches(db)) == 1

    # other content under the key: 422, nothing stored, the key keeps its first answer
    other = data.replace(b"replay-3@", b"replay-X@")
    for r in (post(server, other, [key("order-7")]), post(server, data[:-10] + b"\n", [key("order-7")]),
              post(server, data + data, [key("order-7")])):
        assert_error(r, 422)
        assert "Idempotency-Key" in r.json()["error"], r
    assert db.count_users() == 4
    assert helpers.image_files(server.images_dir) == files
    r3 = post(server, data, [key("order-7")])
    assert r3.status == 200 and r3.body == r1.body
    # a replay reads the whole body: its connection can carry the next request
    c = helpers.HTTPConn(server.host, server.port, timeout=20)
    try:
        ra = post(server, data, [key("order-7")], conn=c)
        rb = post(server, body("next", n=2), [key("order-8")], conn=c)
    finally:
        c.close()
    assert ra.body == r1.body
    assert_success(rb, inserted=2)
    assert j1["batch_id"] != rb.json()["batch_id"]


# ------------------------------------------------------------------ a key whose first request still runs
@pytest.mark.timeout(60)
def test_key_of_a_running_request_is_409_at_once_and_holds_nothing(start_server, db, tmp_path):
    srv = start_server(args=["--max-ingests", "3"])
    data = body("slow", n=6, image_bytes=3000)
    up = SlowUpload(srv, data, [key("slow-key")])
    try:
        up.send(len(data) // 2)
        assert helpers.wait_for(lambda: int(db.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND query LIKE '%COPY users %FROM STDIN'")) > 0,
            timeout=10), "the slow upload never started its COPY"
        # many requests with the key while the first runs: each 409 at once, none waits in the database
        for i in range(12):
            t0 = time.monotonic()
            res = post(srv, body("dup", n=2), [key("slow-key")])
            took = time.monotonic() - t0
            assert_error(res, 409)
            assert "in progress" in res.json()["error"], res
            assert took < 2, f"409 took {took:.2f} s"
        waiting = db.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                         "AND wait_event_type = 'Lock'")
        assert waiting == "0", f"{waiting} backends wait for a lock"
        # a burst of them at once: each answered at once (409, or 503 while the upload places are taken)
        results = []

        def one():
            t0 = time.monotonic()
            r = post(srv, body("burst", n=1), [key("slow-key")])
            results.append((r.status, time.monotonic() - t0))
        threads = [threading.Thread(target=one) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(results) == 10, results
        assert all(st in (409, 503) and took < 3 for st, took in results), results
        assert any(st == 409 for st, _ in results), results
        # an unrelated upload is served although --max-ingests is 3 and 12 requests came with the key
        other = post(srv, body("other", n=2))
        assert_success(other, inserted=2)
        # the first request completes
        first = up.finish()
    finally:
        up.close()
    # (not assert_success: the other upload took user ids in the middle of this one's)
    assert first.status == 200, first
    j = first.json()
    assert (j["inserted"], j["images"], j["skipped"]) == (6, 6, 0), j
    # and now the key replays its answer
    again = post(srv, data, [key("slow-key")])
    assert again.status == 200 and again.body == first.body
    assert db.count_users() == 8
    assert int(db.sql(f"SELECT count(*) FROM users WHERE batch_id = {j['batch_id']}")) == 6


@pytest.mark.timeout(40)
def test_failed_keyed_request_frees_its_key_at_once(server, db, tmp_path):
    bad = body("fix", n=2) + b'{"name": "no email"}\n'
    for attempt in range(10):
        res = post(server, bad, [key(f"fix-{attempt}")])
        assert_error(res, 422, line=3, field="email")
        # the corrected retry right after the failure: the key is free, never 409
        good = post(server, body(f"fix{attempt}", n=2), [key(f"fix-{attempt}")])
        assert_success(good, inserted=2)
    assert db.count_users() == 20


# ------------------------------------------------------------------ --idempotency-ttl
@pytest.mark.timeout(60)
def test_keys_expire_after_the_ttl_in_the_service_and_in_gc(start_server, db, images_dir, tmp_path):
    srv = start_server(args=["--idempotency-ttl", "2", "--threads", "1"])
    a, b = body("ttl-a", n=2), body("ttl-b", n=3)
    r1 = post(srv, a, [key("ttl-key")])
    j1 = assert_success(r1, inserted=2)
    assert_error(post(srv, b, [key("ttl-key")]), 422)
    time.sleep(2.5)
    # older than the TTL: the key is free for a new request; the old batch keeps its rows, loses its key
    r2 = post(srv, b, [key("ttl-key")])
    j2 = assert_success(r2, inserted=3)
    assert j2["batch_id"] != j1["batch_id"]
    rows = {x["batch_id"]: x for x in batches(db)}
    assert rows[j1["batch_id"]]["idempotency_key"] is None and not rows[j1["batch_id"]]["has_response"]
    assert rows[j1["batch_id"]]["digest"] is None
    assert rows[j2["batch_id"]]["idempotency_key"] == "ttl-key"
    assert db.count_users() == 5
    r3 = post(srv, b, [key("ttl-key")])
    assert r3.body == r2.body

    # the running service clears expired keys by itself (after a commit, once per interval)
    time.sleep(2.5)
    assert_success(post(srv, body("unrelated", n=1)), inserted=1)
    assert helpers.wait_for(lambda: db.sql("SELECT count(*) FROM batches WHERE idempotency_key IS NOT NULL") == "0",
                            timeout=5), f"expired keys still there: {batches(db)}"
    assert len(batches(db)) == 3, "a batch went away with its key"

    # gc clears them too
    r4 = post(srv, a, [key("gc-key")])
    assert_success(r4, inserted=2)
    assert srv.stop() == 0
    time.sleep(2.5)
    gc = subprocess.run([helpers.BINARY, "gc", "--db", db.url, "--images-dir", images_dir, "--idempotency-ttl", "2"],
                        capture_output=True, text=True, timeout=30)
    assert gc.returncode == 0, gc.stderr
    assert db.sql("SELECT count(*) FROM batches WHERE idempotency_key IS NOT NULL") == "0"
    assert len(batches(db)) == 4
    assert db.count_users() == 8

    bad = subprocess.run([helpers.BINARY, "--idempotency-ttl", "0"], capture_output=True, text=True, timeout=10)
    assert bad.returncode != 0 and "--idempotency-ttl" in bad.stderr


# ------------------------------------------------------------------ no PostgreSQL text in 5xx answers
@pytest.mark.timeout(60)
def test_database_errors_answer_a_stable_text_and_log_postgres_text(server, db, tmp_path):
    db.sql("CREATE OR REPLACE FUNCTION ji_boom() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN "
           "IF NEW.name LIKE 'boom%' THEN RAISE EXCEPTION 'pg-secret-text for %', NEW.email; END IF; "
           "RETURN NEW; END$$")
    db.sql("CREATE TRIGGER ji_boom BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION ji_boom()")
    try:
        data = body("fine", n=2) + body("boom", n=1)
        for hdrs in ([], [key("boom-key")]):
            res = post(server, data, hdrs)
            assert res.status == 500, res
            assert res.json()["error"] == "database error: COPY failed", res
            assert_no_pg_text(res)
        assert db.count_users() == 0
        assert helpers.wait_for(lambda: "pg-secret-text for boom-0@example.com" in server.log_tail(200), timeout=3), \
            "PostgreSQL's message is not in the log"
    finally:
        db.sql("DROP TRIGGER ji_boom ON users")
        db.sql("DROP FUNCTION ji_boom()")
    # the key of the failed request is free
    assert_success(post(server, data, [key("boom-key")]), inserted=3)

    # a lock that is never granted: 503 with Retry-After after the lock timeout, not a wait for ever
    holder = subprocess.Popen(["psql", db.url, "-X", "-q", "-v", "ON_ERROR_STOP=1"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                              env=dict(os.environ, PGAPPNAME="ji-lock-holder"))
    try:
        holder.stdin.write("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(30);\n")
        holder.stdin.flush()
        assert helpers.wait_for(lambda: db.sql(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "WHERE c.relname = 'users' AND l.mode = 'AccessExclusiveLock' AND l.granted") == "1", timeout=5)
        t0 = time.monotonic()
        res = post(server, body("locked", n=1))
        took = time.monotonic() - t0
    finally:
        db.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'ji-lock-holder'")
        holder.kill()
        holder.wait()
    assert res.status == 503, res
    assert "retry-after" in res.headers, res.headers
    assert "JI_PG_LOCK_TIMEOUT_MS" in res.json()["error"], res
    assert_no_pg_text(res)
    assert 3 < took < 15, f"the lock wait took {took:.1f} s"


# ------------------------------------------------------------------ failed requests keep their connections
@pytest.mark.timeout(60)
def test_failed_requests_reuse_backends(start_server, db, tmp_path):
    srv = start_server(args=["--threads", "1"])
    assert_success(post(srv, body("warm", n=1)), inserted=1)
    before = ingest_backends(db)
    assert len(before) == 1, before
    bad = body("bad", n=2) + b'{"name": "x", "email": "nope"}\n'
    for i in range(50):
        res = post(srv, bad, [key(f"bad-{i}")] if i % 3 == 0 else [])
        assert_error(res, 422, line=3)
    assert helpers.wait_for(lambda: db.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'jsonl-ingest' AND state <> 'idle'") == "0", timeout=5), \
        "a connection was left in a transaction"
    after = ingest_backends(db)
    # the backend of the first request served every failed one (a failure closed it before, 50 new backends)
    assert before <= after, f"the pooled backend {before} was closed by a failed request (now {after})"
    assert len(after) <= 4, f"{len(after)} backends after 50 failed requests (JI_PG_KEEP_IDLE is 4)"
    assert db.count_users() == 1
    assert helpers.pending_files(srv.images_dir) == []
