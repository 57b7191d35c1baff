"""Successful uploads: body framings, line endings, images, rows, --fsync."""
import json
import os
import subprocess
import time

import pytest

import helpers
from checks import assert_success, check_fixture_rows


def upload_and_check(server, db, tmp_path, fixture="basic.jsonl", **kw):
    path = helpers.fixture_path(fixture)
    exp = helpers.expected(fixture)
    files_before = len(helpers.image_files(server.images_dir))
    res = helpers.post(server, path, tmp_path, **kw)
    j = assert_success(res, inserted=len(exp["records"]), images=exp["images"], body_bytes=os.path.getsize(path))
    check_fixture_rows(db, server.images_dir, fixture, j)
    assert len(helpers.image_files(server.images_dir)) == files_before + exp["images"]
    assert helpers.pending_files(server.images_dir) == []
    return j


def test_content_length_upload(server, db, tmp_path):
    """curl --data-binary @file: every field of the response, every row, every image byte."""
    j = upload_and_check(server, db, tmp_path)
    assert j["lines"] == helpers.expected("basic.jsonl")["lines"]
    assert db.count_users() == len(helpers.expected("basic.jsonl")["records"])


def test_crlf_blank_lines_no_trailing_newline(server, db, tmp_path):
    """\\r\\n endings, blank and whitespace-only lines skipped, last line without newline."""
    upload_and_check(server, db, tmp_path, fixture="crlf.jsonl")
    assert db.count_users() == 3


def test_chunked_upload(server, db, tmp_path):
    res_j = upload_and_check(server, db, tmp_path, mode="chunked")
    assert res_j["inserted"] == 10


def test_upload_file_post_without_content_type(server, db, tmp_path):
    """curl -T file -X POST (no Content-Type: the first byte '{' selects JSON Lines)."""
    upload_and_check(server, db, tmp_path, mode="upload", content_type=None)


def test_application_json_content_type_with_lines(server, db, tmp_path):
    """The Node.js write-up sent JSON Lines as application/json: the first byte decides."""
    upload_and_check(server, db, tmp_path, content_type="application/json")


@pytest.mark.parametrize("ctype", ["application/jsonl", "application/jsonlines", "application/x-jsonlines"])
def test_jsonl_content_types(server, db, tmp_path, ctype):
    upload_and_check(server, db, tmp_path, content_type=ctype)


def test_expect_100_continue(server, db, tmp_path):
    """The server answers Expect: 100-continue with 100 before the body is sent."""
    t0 = time.monotonic()
    path = helpers.fixture_path("basic.jsonl")
    res = helpers.post(server, path, tmp_path, headers=["Expect: 100-continue"],
                       extra=["--expect100-timeout", "10"])
    elapsed = time.monotonic() - t0
    assert_success(res, inserted=10, images=6, body_bytes=os.path.getsize(path))
    assert 100 in [st for st, _ in res.header_blocks], \
        f"no 100 Continue seen (header blocks {res.header_blocks})"
    assert elapsed < 8, f"took {elapsed:.1f} s: curl probably waited for a 100 Continue that never came"
    assert db.count_users() == 10


def test_fsync_on(start_server, db, tmp_path):
    srv = start_server(fsync="on")
    upload_and_check(srv, db, tmp_path)
    upload_and_check(srv, db, tmp_path, fixture="crlf.jsonl")
    assert db.count_users() == 13


def test_gzip_body(server, db, tmp_path):
    """Content-Encoding: gzip is inflated in the stream."""
    gz = helpers.write(tmp_path / "basic.jsonl.gz", helpers.gzip_bytes(helpers.fixture_bytes("basic.jsonl")))
    res = helpers.post(server, gz, tmp_path, headers=["Content-Encoding: gzip"])
    j = assert_success(res, inserted=10, images=6)
    check_fixture_rows(db, server.images_dir, "basic.jsonl", j)


def test_gzip_chunked_body(server, db, tmp_path):
    gz = helpers.write(tmp_path / "basic.jsonl.gz", helpers.gzip_bytes(helpers.fixture_bytes("basic.jsonl")))
    res = helpers.post(server, gz, tmp_path, mode="chunked", headers=["Content-Encoding: gzip"])
    j = assert_success(res, inserted=10, images=6)
    check_fixture_rows(db, server.images_dir, "basic.jsonl", j)


def test_sequential_uploads_get_distinct_batches_and_files(server, db, tmp_path):
    j1 = upload_and_check(server, db, tmp_path)
    j2 = upload_and_check(server, db, tmp_path)
    assert j1["batch_id"] != j2["batch_id"]
    assert j2["first_user_id"] > j1["last_user_id"]
    rows = db.users()
    assert len(rows) == 20
    paths = [r["image_path"] for r in rows if r["image_path"]]
    assert len(paths) == 12 and len(set(paths)) == 12, "two records share an image file"
    assert len(helpers.image_files(server.images_dir)) == 12


@pytest.mark.timeout(120)
def test_concurrent_uploads_answer_their_own_first_and_last_user_id(server, db, tmp_path):
    """Uploads running at once take interleaved ids from the sequence: each answer's first and last user id are
    still its own batch's lowest and highest. 5000 rows each: past ID_WALK_MIN_ROWS, where the first id is found
    walking the primary key from the export horizon's bound, past the other batches' ids."""
    body = tmp_path / "body.jsonl"
    body.write_bytes(b"".join(b'{"name": "u%d", "email": "u%d@example.com"}\n' % (i, i) for i in range(5000)))
    procs = [subprocess.Popen(["curl", "-sS", "--max-time", "60", "-H", "Content-Type: application/x-ndjson",
                               "--data-binary", f"@{body}", server.url], stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    answers = [json.loads(p.communicate(timeout=90)[0]) for p in procs]
    interleaved = False
    for j in answers:
        assert j["inserted"] == 5000, j
        low, high, n = (int(x) for x in db.sql(
            f"SELECT min(user_id), max(user_id), count(*) FROM users WHERE batch_id = {int(j['batch_id'])}").split("|"))
        assert (j["first_user_id"], j["last_user_id"], n) == (low, high, 5000), (j, low, high, n)
        interleaved |= high - low + 1 > 5000
    # not asserted (scheduling decides), but said: whether ids of two batches did interleave in this run
    print(f"concurrent uploads: ids of batches interleaved: {interleaved}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["data-binary", "chunked"])
def test_generated_upload_every_image_verified(server, db, tmp_path, mode):
    """300 generated users with 20 KB images (~8 MB): every row and every file byte checked."""
    out = tmp_path / "gen"
    subprocess.run([helpers.PYTHON, helpers.GEN_USERS, "--users", "300", "--image-bytes", "20000",
                    "--all-hashes", "--seed", "7", "--out", str(out)], check=True, capture_output=True)
    body = out / "users-300.jsonl"
    res = helpers.post(server, body, tmp_path, mode=mode, max_time=60)
    assert_success(res, inserted=300, images=300, lines=300,
                   body_bytes=os.path.getsize(body))
    verify_all_hashes(db, server.images_dir, out / "users-300.hashes.tsv", 300)


def verify_all_hashes(db, images_dir, tsv, n):
    hashes = {}
    with open(tsv) as f:
        for line in f:
            email, digest, length = line.rstrip("\n").split("\t")
            hashes[email] = (digest, int(length))
    rows = db.users()
    assert len(rows) == n
    assert len(hashes) == n
    seen = set()
    for r in rows:
        i = int(r["email"].split("@")[0][4:])
        assert r["name"] == f"user{i}", r
        digest, length = hashes[r["email"]]
        assert r["image_path"] and helpers.IMAGE_PATH_RE.match(r["image_path"]), r
        assert r["image_path"].endswith(".png"), r
        assert r["image_type"] == "image/png", r
        assert r["image_size"] == length, r
        full = os.path.join(images_dir, r["image_path"])
        assert os.path.getsize(full) == length, r
        assert helpers.sha256_file(full) == digest, f"{r['image_path']} differs from the image of {r['email']}"
        seen.add(r["email"])
    assert seen == set(hashes)
    assert len(helpers.image_files(images_dir)) == n
    assert helpers.pending_files(images_dir) == []
