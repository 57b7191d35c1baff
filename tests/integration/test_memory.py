"""The headline property: a 584 MB upload of 5000 users with 117 KB base64
images is stored completely and exactly while the server's peak RSS stays
under 64 MiB. Throughput and latency figures are printed, not asserted.

Select with `-m memory`, deselect with `-m 'not memory'`; scripts/test runs it."""
import os
import shutil
import tempfile
import time

import pytest

import helpers
from checks import assert_success

N_USERS = 5000
PEAK_RSS_LIMIT_MIB = 64


@pytest.mark.memory
@pytest.mark.timeout(420)
def test_5000_users_584mb_bounded_memory(start_server, db, figures):
    # body ~585 MB + images ~439 MB, with room to spare
    base = helpers.roomy_tmp(2_500_000_000)
    work = tempfile.mkdtemp(prefix="ji-memory-", dir=base)
    try:
        images = os.path.join(work, "images")
        srv = start_server(fsync="off", images_dir=images)   # fail fast before generating
        gen = os.path.join(work, "gen")
        t0 = time.monotonic()
        body = helpers.gen_users(N_USERS, gen)
        gen_s = time.monotonic() - t0
        size = os.path.getsize(body)
        assert size > 580_000_000

        idle_kib = srv.status_kib("VmRSS")
        up = helpers.stream_upload(srv.host, srv.port, "/users", body,
                                   headers=["Content-Type: application/x-ndjson"], timeout=300)
        hwm_kib = srv.status_kib("VmHWM")  # read before the server is stopped
        resp = up["response"]
        total_s = up["t_response"] - up["t_start"]
        tail_s = up["t_response"] - up["t_last_byte"]
        figures(f"memory: {N_USERS} users, {size / 1e6:.0f} MB body, images on {base}: "
                f"{size / 1e6 / total_s:.1f} MB/s, peak RSS {(hwm_kib or 0) / 1024:.1f} MiB "
                f"(idle {(idle_kib or 0) / 1024:.1f} MiB), last byte -> response {tail_s:.3f} s, "
                f"total {total_s:.2f} s (gen-users {gen_s:.1f} s)")

        assert resp is not None, f"no response: {up.get('error')}"
        assert not up["early"] or up["sent"] == size, f"server answered after {up['sent']} of {size} bytes: {resp}"
        assert_success(resp, inserted=N_USERS, images=N_USERS, body_bytes=size)
        assert db.count_users() == N_USERS
        files = helpers.image_files(images)
        assert len(files) == N_USERS
        assert helpers.pending_files(images) == []

        # every file byte-identical to the image it came from
        hashes = {}
        with open(os.path.join(gen, f"users-{N_USERS}.hashes.tsv")) as f:
            for line in f:
                email, digest, length = line.rstrip("\n").split("\t")
                hashes[email] = (digest, int(length))
        rows = db.users()
        bad = []
        for r in rows:
            digest, length = hashes.pop(r["email"], (None, None))
            if digest is None:
                bad.append(f"{r['email']}: unexpected or duplicate row")
                continue
            if r["name"] != r["email"].split("@")[0]:
                bad.append(f"{r['email']}: name {r['name']!r}")
            p = os.path.join(images, r["image_path"] or "")
            if not r["image_path"] or not os.path.isfile(p):
                bad.append(f"{r['email']}: no file ({r['image_path']!r})")
            elif os.path.getsize(p) != length or helpers.sha256_file(p) != digest:
                bad.append(f"{r['email']}: {r['image_path']} differs")
        assert not bad, f"{len(bad)} bad rows, e.g. {bad[:5]}"
        assert not hashes, f"{len(hashes)} users missing, e.g. {list(hashes)[:5]}"

        assert hwm_kib is not None, "could not read the server's VmHWM"
        assert hwm_kib / 1024 < PEAK_RSS_LIMIT_MIB, \
            f"peak RSS {hwm_kib / 1024:.1f} MiB >= {PEAK_RSS_LIMIT_MIB} MiB"
    finally:
        shutil.rmtree(work, ignore_errors=True)
