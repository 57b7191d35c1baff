"""Content-Encoding: zstd on POST /users, against the real binary and a real PostgreSQL:
bodies made by zstd(1) stream like gzip ones (rows and image files byte-identical to a
plain upload; Content-Length, chunked, and a body dribbled in small pieces so frames
are split across reads); several frames are one body; corrupt, truncated and
trailing-garbage bodies are 400, past --max-inflated-bytes is 413, a frame asking for
a window over JI_MAX_ZSTD_WINDOW_LOG (2^23 bytes) is 413; the JSON-array mode decodes
zstd too. A failed request leaves no row and no file."""
import base64
import hashlib
import json
import os
import random
import shutil
import subprocess
import threading
import time

import pytest

import helpers
from checks import assert_error, assert_nothing_left, assert_success, check_fixture_rows, check_image_row

ZSTD = shutil.which("zstd")
pytestmark = pytest.mark.skipif(ZSTD is None, reason="zstd(1) is not installed (scripts/setup-deps installs it)")

ZSTD_HDR = ["Content-Encoding: zstd"]
WINDOW_ERROR = "zstd frame needs a window larger than 2^JI_MAX_ZSTD_WINDOW_LOG (2^23) bytes"


# ------------------------------------------------------------------ local helpers
def zstd_bytes(data, *args):
    """data compressed by zstd(1), read from stdin (its size unknown to zstd, as in a pipe)."""
    return subprocess.run([ZSTD, "-q", "-c", *args], input=data, stdout=subprocess.PIPE, check=True).stdout


def records(tag, n, image_bytes=300):
    return [(f"{tag} {i}", f"{tag}-{i}@example.com", helpers.png_bytes(image_bytes, f"{tag}-{i}")) for i in range(n)]


def compressible_records(tag, n, image_bytes):
    """Like records(), with images of four letters after the PNG signature (entropy-coded by zstd)."""
    return [(f"{tag} {i}", f"{tag}-{i}@example.com",
             helpers.PNG_SIGNATURE + bytes(random.Random(f"{tag}-{i}").choices(b"abcd", k=image_bytes - 8)))
            for i in range(n)]


def body_of(recs):
    return b"".join(helpers.record_line(n, e, img) + b"\n" for n, e, img in recs)


def post_bytes(srv, tmp_path, data, name="body.zst", headers=ZSTD_HDR, **kw):
    return helpers.post(srv, helpers.write(tmp_path / name, data), tmp_path, headers=headers, **kw)


def check_committed(db, images_dir, recs, where="true"):
    """The rows are exactly recs (in order), each image byte-identical, no file besides theirs."""
    rows = db.users(where)
    assert [(r["name"], r["email"]) for r in rows] == [(n, e) for n, e, _ in recs]
    for r, (_, _, img) in zip(rows, recs):
        check_image_row(r, images_dir, img, "image/png")
    assert helpers.pending_files(images_dir) == []
    in_db = {r["image_path"] for r in db.users() if r["image_path"]}
    assert set(helpers.image_files(images_dir)) == in_db
    return rows


def assert_failed_cleanly(db, images_dir, users_before):
    """No new row, and no file under the images dir but those of committed rows."""
    def clean():
        in_db = {r["image_path"] for r in db.users() if r["image_path"]}
        return set(helpers.all_files(images_dir)) == in_db
    assert helpers.wait_for(clean, timeout=3), helpers.all_files(images_dir)[:10]
    assert db.count_users() == users_before


def send_in_pieces(srv, head_extra, data, piece, pause, chunked=False):
    """POST /users on a raw socket, the body in `piece`-byte writes `pause` seconds apart."""
    c = helpers.HTTPConn(srv.host, srv.port, timeout=30)
    try:
        c.send(helpers.post_head("/users", None if chunked else len(data), extra=head_extra, chunked=chunked))
        for at in range(0, len(data), piece):
            part = data[at:at + piece]
            c.send(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            time.sleep(pause)
        if chunked:
            c.send(b"0\r\n\r\n")
        return c.read_response()
    finally:
        c.close()


# ------------------------------------------------------------------ good bodies
@pytest.mark.parametrize("mode", ["data-binary", "chunked", "pipe"])
def test_zstd_fixture_same_rows_and_files_as_plain(server, db, tmp_path, mode):
    """basic.jsonl through zstd(1): the rows and image files of a plain upload; "bytes" is the decoded size."""
    plain = helpers.fixture_path("basic.jsonl")
    if mode == "pipe":
        # the command of docs/api.md, as a shell runs it
        cmd = (f"{ZSTD} -c {plain} | curl -sS -o {tmp_path}/out.json -w '%{{http_code}}' --data-binary @- "
               f"-H 'Content-Type: application/x-ndjson' -H 'Content-Encoding: zstd' {server.url}")
        r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=30)
        assert r.stdout == "200", (r.stdout, r.stderr, open(f"{tmp_path}/out.json").read())
        j = json.load(open(f"{tmp_path}/out.json"))
        assert j["inserted"] == 10 and j["images"] == 6 and j["bytes"] == os.path.getsize(plain), j
    else:
        zs = helpers.write(tmp_path / "basic.jsonl.zst", zstd_bytes(helpers.fixture_bytes("basic.jsonl")))
        res = helpers.post(server, zs, tmp_path, mode=mode, headers=ZSTD_HDR)
        j = assert_success(res, inserted=10, images=6, body_bytes=os.path.getsize(plain))
    # check_fixture_rows compares each image file byte for byte with the fixture's decoded image
    check_fixture_rows(db, server.images_dir, "basic.jsonl", j)
    assert helpers.pending_files(server.images_dir) == []


def test_zstd_generated_upload_every_image_verified(server, db, tmp_path):
    """300 generated users with 20 KB images, zstd -19: every row and every file byte checked."""
    out = tmp_path / "gen"
    subprocess.run([helpers.PYTHON, helpers.GEN_USERS, "--users", "300", "--image-bytes", "20000",
                    "--all-hashes", "--seed", "11", "--out", str(out)], check=True, capture_output=True)
    body = (out / "users-300.jsonl").read_bytes()
    res = post_bytes(server, tmp_path, zstd_bytes(body, "-19"), max_time=60)
    assert_success(res, inserted=300, images=300, lines=300, body_bytes=len(body))
    hashes = {}
    for line in (out / "users-300.hashes.tsv").read_text().splitlines():
        email, digest = line.split("\t")[:2]
        hashes[email] = digest
    rows = db.users()
    assert len(rows) == 300
    for r in rows:
        assert helpers.sha256_file(os.path.join(server.images_dir, r["image_path"])) == hashes[r["email"]], r


def test_zstd_frames_split_across_reads(server, db, tmp_path):
    """7-byte writes 5 ms apart (frame header, block headers and checksum all cut), Content-Length and chunked;
    then `cat a.zst b.zst` with the second frame in its own write."""
    recs = records("split", 3, image_bytes=600)
    zs = zstd_bytes(body_of(recs))
    res = send_in_pieces(server, ZSTD_HDR, zs, 7, 0.005)
    assert res.status == 200, res
    j = res.json()
    assert j["inserted"] == 3 and j["bytes"] == len(body_of(recs)), j
    check_committed(db, server.images_dir, recs)

    more = records("split-chunked", 3, image_bytes=800)
    res = send_in_pieces(server, ZSTD_HDR, zstd_bytes(body_of(more)), 11, 0.005, chunked=True)
    assert res.status == 200, res
    check_committed(db, server.images_dir, recs + more)

    first, second = records("frame1", 3, image_bytes=2000), records("frame2", 2, image_bytes=2000)
    a, b = zstd_bytes(body_of(first)), zstd_bytes(body_of(second))
    c = helpers.HTTPConn(server.host, server.port, timeout=20)
    try:
        c.send(helpers.post_head("/users", len(a) + len(b), extra=ZSTD_HDR))
        c.send(a)
        time.sleep(0.3)  # the first frame is decoded and fed before the second arrives
        c.send(b)
        res = c.read_response()
    finally:
        c.close()
    assert res.status == 200, res
    assert res.json()["inserted"] == 5
    check_committed(db, server.images_dir, recs + more + first + second)


# ------------------------------------------------------------------ bad bodies
@pytest.mark.timeout(60)
def test_zstd_corrupt_truncated_trailing_too_large_and_window(start_server, db, tmp_path):
    srv = start_server(args=["--max-inflated-bytes", "100000"])

    good = records("zs", 8, image_bytes=5000)
    body = body_of(good)
    assert len(body) < 100000
    j = assert_success(post_bytes(srv, tmp_path, zstd_bytes(body), name="good.zst"), inserted=8, images=8,
                       body_bytes=len(body))
    check_committed(db, srv.images_dir, good, where=f"batch_id = {j['batch_id']}")

    # corrupt: bytes flipped well inside the frame, after some records were decoded and stored. Images of four
    # letters: their literals are Huffman-coded, so the damage breaks the coding itself (zstd stores random bytes
    # raw, where a flip only changes the content and the checksum at the frame's end is what catches it)
    big = body_of(compressible_records("zsc", 12, 5000))
    zs = zstd_bytes(big)
    at = len(zs) * 2 // 3
    corrupt = zs[:at] + bytes(b ^ 0x5A for b in zs[at:at + 64]) + zs[at + 64:]
    j = assert_error(post_bytes(srv, tmp_path, corrupt, name="corrupt.zst"), 400)
    assert j["error"].startswith("corrupt zstd body: "), j
    assert_failed_cleanly(db, srv.images_dir, 8)

    # checksum mismatch: the last 4 bytes (XXH64 of the content) changed
    zs = zstd_bytes(body_of(records("zsx", 3)))
    j = assert_error(post_bytes(srv, tmp_path, zs[:-4] + bytes(b ^ 1 for b in zs[-4:]), name="sum.zst"), 400)
    assert "checksum" in j["error"].lower(), j
    assert_failed_cleanly(db, srv.images_dir, 8)

    # truncated: the body ends inside the frame, records before the cut already stored
    j = assert_error(post_bytes(srv, tmp_path, zstd_bytes(big)[:-10], name="cut.zst"), 400)
    assert j["error"] == "corrupt zstd body: truncated", j
    assert_failed_cleanly(db, srv.images_dir, 8)

    # bytes after the end of the last frame
    j = assert_error(post_bytes(srv, tmp_path, zstd_bytes(body_of(records("zst", 3))) + b"trailing junk\n",
                                name="tail.zst"), 400)
    assert j["error"] == "data after the end of the zstd body", j
    assert_failed_cleanly(db, srv.images_dir, 8)

    # decodes past --max-inflated-bytes 100000: highly compressible images (zeros)
    zeros = [(f"zz {i}", f"zz-{i}@example.com", helpers.PNG_SIGNATURE + bytes(6000)) for i in range(40)]
    zbody = body_of(zeros)
    zz = zstd_bytes(zbody, "-19")
    assert len(zbody) > 300000 and len(zz) < 20000
    j = assert_error(post_bytes(srv, tmp_path, zz, name="bomb.zst"), 413)
    assert j["error"] == "inflated body is larger than 100000 bytes", j
    assert_failed_cleanly(db, srv.images_dir, 8)

    # a frame declaring a 2 GiB window (zstd --long=31 on a pipe): refused from its header
    small = body_of(records("zsw", 2))
    long31 = zstd_bytes(small, "--long=31")
    assert long31[5] == 0xA8, long31[:8].hex()  # window descriptor: 2^31 bytes
    j = assert_error(post_bytes(srv, tmp_path, long31, name="long31.zst"), 413)
    assert j["error"].startswith(WINDOW_ERROR), j
    # 2^24 (zstd --ultra -22 asks for up to 2^27): one step over the limit; --long=23 is at the limit and passes
    j = assert_error(post_bytes(srv, tmp_path, zstd_bytes(small, "--long=24"), name="long24.zst"), 413)
    assert j["error"].startswith(WINDOW_ERROR), j
    assert_failed_cleanly(db, srv.images_dir, 8)
    res = post_bytes(srv, tmp_path, zstd_bytes(small, "--long=23"), name="long23.zst")
    assert_success(res, inserted=2, images=2, body_bytes=len(small))
    assert srv.alive()


def test_zstd_and_gzip_together_is_415(server, db, tmp_path):
    """Two codings (both applied) are not supported; a body announced as zstd that is gzip is corrupt."""
    body = body_of(records("two", 2))
    assert_error(post_bytes(server, tmp_path, zstd_bytes(body),
                            headers=["Content-Encoding: gzip", "Content-Encoding: zstd"]), 415)
    j = assert_error(post_bytes(server, tmp_path, helpers.gzip_bytes(body)), 400)
    assert j["error"].startswith("corrupt zstd body: "), j
    assert_nothing_left(db, server.images_dir)


# ------------------------------------------------------------------ the JSON-array mode
def array_of(recs):
    return json.dumps([json.loads(helpers.record_line(n, e, img)) for n, e, img in recs]).encode()


def test_zstd_array_good_corrupt_cap_and_window(start_server, db, tmp_path):
    srv = start_server(args=["--max-array-bytes", "200000"])
    good = records("arr", 5, image_bytes=3000)
    arr = array_of(good)
    res = post_bytes(srv, tmp_path, zstd_bytes(arr), name="arr.zst", query="format=array")
    assert_success(res, inserted=5, images=5)
    check_committed(db, srv.images_dir, good)

    # format from the first decoded byte is not sniffed for encoded bodies: Content-Type application/json + format
    zs = zstd_bytes(array_of(compressible_records("arrc", 5, 3000)))
    at = len(zs) // 2
    corrupt = zs[:at] + bytes(b ^ 0xFF for b in zs[at:at + 32]) + zs[at + 32:]
    j = assert_error(post_bytes(srv, tmp_path, corrupt, name="arrc.zst", query="format=array"), 400)
    assert j["error"].startswith("corrupt zstd body: "), j
    j = assert_error(post_bytes(srv, tmp_path, zs[:-3], name="arrt.zst", query="format=array"), 400)
    assert j["error"] == "corrupt zstd body: truncated", j
    j = assert_error(post_bytes(srv, tmp_path, zs + b"x", name="arrg.zst", query="format=array"), 400)
    assert j["error"] == "data after the end of the zstd body", j
    # 0x5d (']') is also the first byte of a skippable frame's magic number: a frame that never completes
    j = assert_error(post_bytes(srv, tmp_path, zs + b"]", name="arrs.zst", query="format=array"), 400)
    assert j["error"] == "corrupt zstd body: truncated", j

    # 1 MB of spaces inside brackets, ~100 bytes of zstd: past --max-array-bytes once decoded
    bomb = zstd_bytes(b"[" + b" " * 1000000 + b"]", "-19")
    assert len(bomb) < 1000
    j = assert_error(post_bytes(srv, tmp_path, bomb, name="arrb.zst", query="format=array"), 413)
    assert "--max-array-bytes" in j["error"], j

    j = assert_error(post_bytes(srv, tmp_path, zstd_bytes(arr, "--long=31"), name="arrw.zst", query="format=array"),
                     413)
    assert j["error"].startswith(WINDOW_ERROR), j
    assert_failed_cleanly(db, srv.images_dir, 5)
    assert srv.alive()


# ------------------------------------------------------------------ work per loop turn
@pytest.mark.timeout(120)
def test_zstd_of_newlines_does_not_hold_the_loop(start_server, db, tmp_path, figures):
    """64 MiB of newlines in a few KB of zstd, on a server with one event-loop thread: /healthz on that thread is
    answered within a second all along (decoding and feeding yield after JI_LOOP_SLICE_MS; without the yield the
    release build held it ~2 s, the sanitizer build far longer)."""
    srv = start_server(args=["--threads", "1"])
    n = 64 << 20
    data = subprocess.run(f"head -c {n} /dev/zero | tr '\\0' '\\n' | {ZSTD} -q -c -3", shell=True, check=True,
                          stdout=subprocess.PIPE).stdout
    assert len(data) < 100000, len(data)
    result = {}

    def upload():
        c = helpers.HTTPConn(srv.host, srv.port, timeout=100)
        try:
            c.send(helpers.post_head("/users", length=len(data), extra=ZSTD_HDR) + data)
            result["r"] = c.read_response()
        finally:
            c.close()

    t = threading.Thread(target=upload)
    t.start()
    worst = 0.0
    probe = helpers.HTTPConn(srv.host, srv.port, timeout=30)
    try:
        while t.is_alive():
            t0 = time.monotonic()
            probe.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert probe.read_response().status == 200
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.01)
    finally:
        probe.close()
    t.join()
    r = result["r"]
    assert r.status == 200 and r.json()["inserted"] == 0 and r.json()["lines"] == n, r
    figures(f"/healthz on the same thread during a 64 MiB zstd-of-newlines upload: worst {worst * 1000:.1f} ms")
    assert worst < 1.0


# ------------------------------------------------------------------ Content-Digest
@pytest.mark.parametrize("query", ["", "format=array"])
def test_zstd_content_digest_is_over_the_compressed_bytes(server, db, tmp_path, query):
    """Content-Digest covers the content as received: the zstd bytes, not what they decode to."""
    recs = records("zdg", 4)
    body = array_of(recs) if query else body_of(recs)
    zs = zstd_bytes(body)

    def digest(data):
        return "Content-Digest: sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"

    j = assert_error(post_bytes(server, tmp_path, zs, headers=ZSTD_HDR + [digest(body)], query=query), 400)
    assert "Content-Digest" in j["error"] and "sha-256" in j["error"], j
    assert_nothing_left(db, server.images_dir)
    res = post_bytes(server, tmp_path, zs, headers=ZSTD_HDR + [digest(zs)], query=query)
    assert_success(res, inserted=4, images=4)
    check_committed(db, server.images_dir, recs)
