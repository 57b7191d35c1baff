"""Hardening of what the service reads from disk and the command line, against
the real binary and a real PostgreSQL:

- nothing under the images directory is reached through a symbolic link: a
  row whose image_path crosses one is not served, a planted shard symlink does
  not redirect a write, gc does not unlink through one;
- image files are created 0640 and directories 0750 (less the umask);
- numeric options are strict (`--max-record-bytes ' -1'` is refused);
- a token file whose token is shorter than 16 bytes is refused at start.
"""
import os
import stat
import subprocess

import helpers
from checks import assert_success, assert_serves_good_request

SECRET = b"root:x:0:0:SECRET-OUTSIDE-THE-IMAGES-DIRECTORY\n"
MIN_TOKEN_BYTES = 16  # JI_MIN_TOKEN_BYTES


def get(srv, path, tmp_path):
    return helpers.curl([srv.base + path], tmp_path)


def outside_dir(tmp_path):
    """A directory next to the images directory, holding a file the service must never serve or touch."""
    d = tmp_path / "outside"
    d.mkdir(exist_ok=True)
    helpers.write(d / "passwd", SECRET)
    return d


def one_image_user(srv, db, tmp_path, tag="u"):
    """Ingests one user with a PNG image; returns (user_id, image_path)."""
    f = helpers.write(tmp_path / f"{tag}.jsonl", helpers.good_body(tag, n=1))
    j = assert_success(helpers.post(srv, f, tmp_path), inserted=1, images=1)
    uid = j["first_user_id"]
    return uid, db.users(f"user_id = {uid}")[0]["image_path"]


def assert_not_served(srv, tmp_path, uid):
    r = get(srv, f"/users/{uid}/image", tmp_path)
    assert r.status in (404, 500), r
    assert b"SECRET" not in r.body, r
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    return r


def run_binary(args, timeout=15):
    """Runs the binary to completion (a server that starts instead of refusing is killed: a failure)."""
    try:
        return subprocess.run([helpers.BINARY] + list(args), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{args} did not exit within {timeout} s (it should refuse to start): {e.stderr!r}")


# ------------------------------------------------------------------ symlinks: the read side
def test_image_path_through_a_symlink_is_not_served(server, db, tmp_path):
    outside = outside_dir(tmp_path)
    images = server.images_dir
    uid, path = one_image_user(server, db, tmp_path)
    assert get(server, f"/users/{uid}/image", tmp_path).status == 200

    # 1. the audit's case: image_path 'etclink/passwd', etclink -> a directory outside
    os.symlink(outside, os.path.join(images, "etclink"))
    db.sql(f"UPDATE users SET image_path = 'etclink/passwd' WHERE user_id = {uid}")
    r = assert_not_served(server, tmp_path, uid)
    assert "symbolic link" in r.json()["error"], r

    # 2. the row's own path, its shard "ab" swapped for a symlink to a copy outside with the secret at cd/<name>
    db.sql(f"UPDATE users SET image_path = '{path}' WHERE user_id = {uid}")
    shard, rest = path.split("/", 1)
    os.makedirs(os.path.dirname(os.path.join(outside, rest)))
    helpers.write(os.path.join(outside, rest), SECRET)
    os.rename(os.path.join(images, shard), os.path.join(tmp_path, "real-shard"))
    os.symlink(outside, os.path.join(images, shard))
    assert_not_served(server, tmp_path, uid)

    # 3. the shard real again, the file itself a symlink to the secret
    os.unlink(os.path.join(images, shard))
    os.rename(os.path.join(tmp_path, "real-shard"), os.path.join(images, shard))
    assert get(server, f"/users/{uid}/image", tmp_path).status == 200
    os.unlink(os.path.join(images, path))
    os.symlink(os.path.join(outside, "passwd"), os.path.join(images, path))
    assert_not_served(server, tmp_path, uid)

    # 4. a path that climbs out
    db.sql(f"UPDATE users SET image_path = '../outside/passwd' WHERE user_id = {uid}")
    assert_not_served(server, tmp_path, uid)

    assert server.alive()
    assert_serves_good_request(server, db, tmp_path)


# ------------------------------------------------------------------ symlinks: the write side and gc
def test_planted_shard_symlinks_do_not_redirect_a_write(server, db, tmp_path):
    outside = outside_dir(tmp_path)
    images = server.images_dir
    # every first-level shard "00".."ff" points outside: whatever name is drawn, its directory is a link
    for i in range(256):
        os.symlink(outside, os.path.join(images, f"{i:02x}"))
    f = helpers.write(tmp_path / "b.jsonl", helpers.good_body("planted", n=3))
    res = helpers.post(server, f, tmp_path)
    assert res.status == 500, res
    j = res.json()
    assert j.get("line") == 1 and j.get("field") == "image", j
    assert "symbolic link" in j["error"], j
    assert sorted(os.listdir(outside)) == ["passwd"], "a write went through a planted shard symlink"
    assert db.count_users() == 0
    assert helpers.pending_files(images) == []

    # the links gone, the same upload goes to real directories
    for i in range(256):
        os.unlink(os.path.join(images, f"{i:02x}"))
    assert_serves_good_request(server, db, tmp_path)
    for p in helpers.image_files(images):
        shard = os.path.join(images, p.split(os.sep)[0])
        assert not os.path.islink(shard) and os.path.isdir(shard)
    assert sorted(os.listdir(outside)) == ["passwd"]


def test_gc_does_not_unlink_through_a_symlink(db, images_dir, tmp_path, start_server):
    """A journal left by a dead request lists a path whose shard is a symlink to a directory outside: gc (the
    subcommand) ends that journal without unlinking the file outside."""
    srv = start_server()  # creates the schema and .pending
    srv.stop()
    outside = outside_dir(tmp_path)
    name = "abcd" + "0123456789abcdef" + "0123456789ab" + ".png"
    os.makedirs(os.path.join(outside, "cd"))
    helpers.write(os.path.join(outside, "cd", name), b"victim")
    os.symlink(outside, os.path.join(images_dir, "ab"))
    os.symlink(outside, os.path.join(images_dir, "etclink"))
    journal = os.path.join(images_dir, ".pending", "0123456789abcdef0123456789abcdef.list")
    helpers.write(journal, f"etclink/passwd\nab/cd/{name}\n".encode())
    r = run_binary(["gc", "--db", db.url, "--images-dir", images_dir])
    assert r.returncode == 0, r.stderr
    assert os.path.exists(os.path.join(outside, "cd", name)), "gc unlinked a file through a shard symlink"
    assert os.path.exists(os.path.join(outside, "passwd"))
    assert not os.path.exists(journal)


# ------------------------------------------------------------------ file modes
def stored_modes(srv, db, tmp_path, tag):
    _, path = one_image_user(srv, db, tmp_path, tag)
    images = srv.images_dir
    shard1, shard2 = path.split("/")[0], "/".join(path.split("/")[:2])
    mode = lambda p: stat.S_IMODE(os.lstat(os.path.join(images, p)).st_mode)  # noqa: E731
    return {"file": mode(path), "shard1": mode(shard1), "shard2": mode(shard2), ".pending": mode(".pending")}


def test_image_files_0640_and_directories_0750(start_server, db, tmp_path):
    """The server inherits the umask it is started with, as under a systemd unit's UMask=."""
    old = os.umask(0o022)
    try:
        srv = start_server(images_dir=str(tmp_path / "i022"))
    finally:
        os.umask(old)
    m = stored_modes(srv, db, tmp_path, "m022")
    assert m == {"file": 0o640, "shard1": 0o750, "shard2": 0o750, ".pending": 0o750}, {k: oct(v) for k, v in m.items()}

    old = os.umask(0o077)
    try:
        srv2 = start_server(images_dir=str(tmp_path / "i077"))
    finally:
        os.umask(old)
    m = stored_modes(srv2, db, tmp_path, "m077")
    assert m == {"file": 0o600, "shard1": 0o700, "shard2": 0o700, ".pending": 0o700}, {k: oct(v) for k, v in m.items()}


# ------------------------------------------------------------------ numeric options
def test_negative_max_record_bytes_is_refused(db, images_dir):
    def run(flag, value):
        # everything else valid: a binary that took the value would start serving (and be killed: a failure)
        return run_binary([flag, value, "--listen", f"127.0.0.1:{helpers.free_port()}", "--db", db.url,
                           "--images-dir", images_dir], timeout=5)

    r = run("--max-record-bytes", " -1")
    assert r.returncode != 0, r
    assert "--max-record-bytes" in r.stderr and "' -1'" in r.stderr, r.stderr
    assert "no sign, space or suffix" in r.stderr, r.stderr
    for flag, value in (("--max-array-bytes", "+5"), ("--threads", "2 "), ("--max-ingests", "-3"),
                        ("--idle-timeout", "1e3"), ("--max-inflated-bytes", "18446744073709551616")):
        r = run(flag, value)
        assert r.returncode != 0 and flag in r.stderr and f"'{value}'" in r.stderr, (flag, value, r)


# ------------------------------------------------------------------ token length
def test_token_shorter_than_16_bytes_is_refused_at_start(start_server, db, images_dir, tmp_path):
    for name, content in (("short", b"x" * (MIN_TOKEN_BYTES - 1) + b"\n"), ("empty", b""),
                          ("short-nonl", b"0123456789abcde")):
        tf = helpers.write(tmp_path / name, content)
        r = run_binary(["--listen", f"127.0.0.1:{helpers.free_port()}", "--db", db.url, "--images-dir", images_dir,
                        "--token-file", tf])
        assert r.returncode != 0, (name, r)
        assert "--token-file" in r.stderr and "JI_MIN_TOKEN_BYTES (16)" in r.stderr, (name, r.stderr)
    # exactly 16 bytes (and a trailing newline, not counted) is enough
    token = "0123456789abcdef"
    srv = start_server(args=["--token-file", helpers.write(tmp_path / "ok", (token + "\n").encode())])
    f = helpers.write(tmp_path / "b.jsonl", helpers.good_body("tok", n=1))
    assert helpers.post(srv, f, tmp_path).status == 401
    assert_success(helpers.post(srv, f, tmp_path, headers=[f"Authorization: Bearer {token}"]), inserted=1)
