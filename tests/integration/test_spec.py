"""Other promises of the HTTP contract (docs/api.md): length limits counted in
characters, JSON-array mode, ?on_error=skip, Idempotency-Key, --token-file,
reads, gc."""
import json
import os
import subprocess

import pytest

import helpers
from checks import assert_error, assert_nothing_left, assert_success, check_fixture_rows


def post_bytes(srv, tmp_path, data, name="body", **kw):
    return helpers.post(srv, helpers.write(tmp_path / name, data), tmp_path, **kw)


@pytest.mark.parametrize("char", ["n", "é", "张", "😀"])
def test_name_of_255_characters_is_accepted(server, db, tmp_path, char):
    """255 characters as Postgres counts varchar(255), whatever their UTF-8 length."""
    name = char * 255
    email = "x" * 200 + "@" + "e" * 54  # 255 characters
    res = post_bytes(server, tmp_path, helpers.record_line(name, email) + b"\n")
    assert_success(res, inserted=1, images=0)
    rows = db.users()
    assert [(r["name"], r["email"]) for r in rows] == [(name, email)]
    assert rows[0]["image_path"] is None


def test_json_array_mode(server, db, tmp_path):
    """?format=array: the same records as one JSON array (the naive baseline)."""
    recs = [json.loads(line) for line in helpers.fixture_bytes("basic.jsonl").decode().splitlines()]
    body = json.dumps(recs, ensure_ascii=False).encode()
    res = post_bytes(server, tmp_path, body, query="format=array", content_type="application/json")
    j = assert_success(res, inserted=10, images=6)
    check_fixture_rows(db, server.images_dir, "basic.jsonl", j)


def test_json_array_detected_by_first_byte(server, db, tmp_path):
    body = b"  \n[" + b",".join(helpers.good_body("arr", n=3).strip().split(b"\n")) + b"]\n"
    res = post_bytes(server, tmp_path, body, content_type="application/json")
    assert_success(res, inserted=3, images=3)
    assert db.count_users() == 3


def test_json_array_invalid_record_is_all_or_nothing(server, db, tmp_path):
    body = b"[" + b",".join(helpers.good_body("arrbad", n=2).strip().split(b"\n")) + b',{"name": "x"}]'
    res = post_bytes(server, tmp_path, body, query="format=array", content_type="application/json")
    assert_error(res, 422, field="email")
    assert_nothing_left(db, server.images_dir)


def test_json_array_over_max_array_bytes(start_server, db, tmp_path):
    srv = start_server(args=["--max-array-bytes", "2000"])
    body = b"[" + b",".join(helpers.good_body("arrbig", n=10).strip().split(b"\n")) + b"]"
    assert len(body) > 2000
    res = post_bytes(srv, tmp_path, body, query="format=array", content_type="application/json")
    assert_error(res, 413)
    assert_nothing_left(db, srv.images_dir)


def test_on_error_skip(server, db, tmp_path):
    good = helpers.good_body("skip", n=3).split(b"\n")
    body = good[0] + b"\n" + b'{"name": "bad"}\n' + good[1] + b"\n" + b'{"name": "bad2", "email": "nope"}\n' + good[2] + b"\n"
    res = post_bytes(server, tmp_path, body, query="on_error=skip")
    assert res.status == 200, res
    j = res.json()
    assert j["inserted"] == 3 and j["skipped"] == 2, j
    assert [e["line"] for e in j["errors"]] == [2, 4], j
    assert all(isinstance(e["error"], str) and e["error"] for e in j["errors"]), j
    assert [r["email"] for r in db.users()] == [f"skip-{i}@example.com" for i in range(3)]
    assert len(helpers.image_files(server.images_dir)) == 3
    assert helpers.pending_files(server.images_dir) == []


def test_idempotency_key_replays_first_response(server, db, tmp_path):
    f = helpers.write(tmp_path / "b.jsonl", helpers.good_body("idem", n=3))
    r1 = helpers.post(server, f, tmp_path, headers=["Idempotency-Key: test-key-1"])
    j1 = assert_success(r1, inserted=3)
    r2 = helpers.post(server, f, tmp_path, headers=["Idempotency-Key: test-key-1"])
    assert r2.status == 200, r2
    j2 = r2.json()
    assert (j2["batch_id"], j2["inserted"], j2["first_user_id"]) == (j1["batch_id"], 3, j1["first_user_id"])
    assert db.count_users() == 3
    assert len(helpers.image_files(server.images_dir)) == 3
    r3 = helpers.post(server, f, tmp_path, headers=["Idempotency-Key: test-key-2"])
    assert_success(r3, inserted=3)
    assert db.count_users() == 6


def test_token_file(start_server, db, tmp_path):
    tok = helpers.write(tmp_path / "tokens", b"s3cret-token-0123456789\n")
    srv = start_server(args=["--token-file", tok])
    f = helpers.write(tmp_path / "b.jsonl", helpers.good_body("tok", n=2))
    res = helpers.post(srv, f, tmp_path)
    assert res.status == 401, res
    res = helpers.post(srv, f, tmp_path, headers=["Authorization: Bearer wrong"])
    assert res.status == 401, res
    assert_nothing_left(db, srv.images_dir)
    res = helpers.post(srv, f, tmp_path, headers=["Authorization: Bearer s3cret-token-0123456789"])
    assert_success(res, inserted=2)


def test_get_user_and_image(server, db, tmp_path):
    res = helpers.post(server, helpers.fixture_path("basic.jsonl"), tmp_path)
    j = assert_success(res, inserted=10)
    first = j["first_user_id"]
    r = helpers.curl([f"{server.base}/users/{first}"], tmp_path)
    assert r.status == 200, r
    row = r.json()
    assert row.get("email") == "someone@gmail.com", row
    img = helpers.curl([f"{server.base}/users/{first}/image"], tmp_path)
    assert img.status == 200, img
    assert img.headers.get("content-type", "").startswith("image/png"), img.headers
    assert img.body == open(os.path.join(helpers.FIXTURES, "images", "pixel.png"), "rb").read()
    missing = helpers.curl([f"{server.base}/users/{j['last_user_id'] + 1000}"], tmp_path)
    assert missing.status == 404, missing


def test_export_jsonl(server, db, tmp_path):
    helpers.post(server, helpers.write(tmp_path / "b.jsonl", helpers.good_body("exp", n=5)), tmp_path)
    r = helpers.curl([f"{server.base}/users?limit=3"], tmp_path)
    assert r.status == 200, r
    lines = [json.loads(l) for l in r.body.decode().splitlines() if l.strip()]
    assert [l["email"] for l in lines] == [f"exp-{i}@example.com" for i in range(3)]


def test_readyz(server, start_server, db, tmp_path):
    r = helpers.curl([f"{server.base}/readyz"], tmp_path)
    assert r.status == 200, r
    down = start_server(db=helpers.conninfo_with(db.url, host="127.0.0.1", port=helpers.free_port()),
                        images_dir=str(tmp_path / "down"))
    r = helpers.curl([f"{down.base}/readyz"], tmp_path)
    assert r.status == 503, r
    r = helpers.curl([f"{down.base}/healthz"], tmp_path)
    assert r.status == 200, r


def test_gc_removes_leftovers_of_a_killed_server(server, db, tmp_path):
    """A server killed (SIGKILL) mid-upload leaves image files of an uncommitted
    request; `jsonl-ingest gc` removes them and keeps every committed file."""
    res = helpers.post(server, helpers.fixture_path("basic.jsonl"), tmp_path)
    assert_success(res, inserted=10, images=6)
    kept = helpers.all_files(server.images_dir)
    assert len(kept) == 6
    c = helpers.HTTPConn(server.host, server.port, timeout=10)
    try:
        c.send(helpers.post_head("/users", 100_000_000))
        for i in range(20):
            c.send(helpers.record_line(f"killed {i}", f"killed-{i}@example.com",
                                       helpers.png_bytes(20_000, f"k{i}")) + b"\n")
        grew = helpers.wait_for(lambda: len(helpers.all_files(server.images_dir)) > len(kept), timeout=5)
        assert grew, "no image file of the in-flight request appeared within 5 s"
        server.proc.kill()
        server.proc.wait()
    finally:
        c.close()
    assert len(helpers.all_files(server.images_dir)) > len(kept)
    r = subprocess.run([helpers.BINARY, "gc", "--db", db.url, "--images-dir", server.images_dir],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert helpers.all_files(server.images_dir) == kept, f"gc said: {r.stdout}{r.stderr}"
    assert db.count_users() == 10
