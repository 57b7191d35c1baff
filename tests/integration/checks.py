"""Assertions shared by the integration test modules."""
import os

import helpers
from helpers import IMAGE_PATH_RE, EXTENSIONS


def assert_json_response(res):
    ctype = res.headers.get("content-type", "")
    assert ctype.startswith("application/json"), f"Content-Type {ctype!r}, body {res.body[:200]!r}"
    return res.json()


def assert_success(res, *, inserted, body_bytes=None, images=None, lines=None):
    """A 200 ingest response with the documented fields."""
    assert res.status == 200, res
    j = assert_json_response(res)
    for k in ("inserted", "skipped", "lines", "images", "bytes", "batch_id", "first_user_id",
              "last_user_id", "elapsed_ms"):
        assert k in j, f"response lacks {k!r}: {j}"
    assert j["inserted"] == inserted, j
    assert j["skipped"] == 0, j
    if images is not None:
        assert j["images"] == images, j
    if lines is not None:
        assert j["lines"] == lines, j
    if body_bytes is not None:
        assert j["bytes"] == body_bytes, j
    assert isinstance(j["batch_id"], int), j
    assert isinstance(j["elapsed_ms"], (int, float)) and j["elapsed_ms"] >= 0, j
    if inserted:
        assert j["last_user_id"] - j["first_user_id"] == inserted - 1, j
    return j


def check_image_row(row, images_dir, expected_bytes, expected_type):
    path = row["image_path"]
    assert path is not None, f"{row['email']}: no image_path"
    assert not os.path.isabs(path), f"image_path {path!r} is not relative to the images dir"
    m = IMAGE_PATH_RE.match(path)
    assert m, f"image_path {path!r} does not look like ab/cd/<32 hex>.<ext>"
    if expected_type in EXTENSIONS:
        assert m.group(1) in EXTENSIONS[expected_type], f"{path}: extension for {expected_type}"
    assert row["image_type"] == expected_type, row
    assert row["image_size"] == len(expected_bytes), row
    full = os.path.join(images_dir, path)
    with open(full, "rb") as f:
        data = f.read()
    assert data == expected_bytes, f"{path}: {len(data)} bytes stored, differ from the {len(expected_bytes)} sent"


def check_fixture_rows(db, images_dir, fixture, resp_json, rows=None):
    """The rows of one upload of a committed fixture: names, emails, images, batch."""
    exp = helpers.expected(fixture)
    rows = rows if rows is not None else db.users(f"batch_id = {int(resp_json['batch_id'])}")
    assert [(r["name"], r["email"]) for r in rows] == [(e["name"], e["email"]) for e in exp["records"]]
    assert rows[0]["user_id"] == resp_json["first_user_id"]
    assert rows[-1]["user_id"] == resp_json["last_user_id"]
    for r, e in zip(rows, exp["records"]):
        assert r["batch_id"] == resp_json["batch_id"]
        if e["image"] is None:
            assert r["image_path"] is None, r
        else:
            with open(os.path.join(helpers.FIXTURES, e["image"]), "rb") as f:
                check_image_row(r, images_dir, f.read(), e["image_type"])
    assert db.batch_count(resp_json["batch_id"]) == 1


def assert_nothing_left(db, images_dir, users_before=0, settle=3.0):
    """After a failed request: no new rows, and no file anywhere under the images dir."""
    left = helpers.wait_for(lambda: not helpers.all_files(images_dir), timeout=settle)
    assert left, f"files left under the images dir: {helpers.all_files(images_dir)[:10]}"
    assert db.count_users() == users_before


def assert_error(res, status, line=None, field=None):
    assert res.status == status, res
    j = assert_json_response(res)
    assert isinstance(j.get("error"), str) and j["error"], j
    if line is not None:
        assert j.get("line") == line, j
    if field is not None:
        assert j.get("field") == field, j
    assert "close" in res.headers.get("connection", "").lower(), \
        f"error response without Connection: close: {res.headers}"
    return j


def assert_serves_good_request(srv, db, tmp_path, tag="after"):
    """The server still ingests a good request (small records, small images)."""
    before = db.count_users()
    body = helpers.good_body(tag, n=3, image_bytes=300)
    f = helpers.write(os.path.join(str(tmp_path), f"good-{tag}.jsonl"), body)
    res = helpers.post(srv, f, tmp_path)
    assert_success(res, inserted=3, images=3)
    assert db.count_users() == before + 3
    assert helpers.pending_files(srv.images_dir) == []
