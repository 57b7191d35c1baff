"""Appends to resumable uploads (the engine): each PATCH stages its complete lines in upload_rows and moves the
durable offset past the last newline; the append that completes the upload moves every staged row into users as
one batch, row for row and file for file like the same body POSTed. Fail mode ends the upload; skip mode keeps
dead letters across appends; a client that drops keeps its complete lines; a later append takes over; gc leaves
the files of an open upload alone and removes those of an upload that is gone. Uploads are created with psql."""
import json
import os
import secrets
import socket
import subprocess
import time

import pytest

import helpers


def rec(i, tag="up", image=True):
    return helpers.record_line(f"{tag} {i}", f"{tag}-{i}@example.com",
                               helpers.png_bytes(1500 + i, f"{tag}-{i}") if image else None) + b"\n"


def body_of(n, tag="up", image=True):
    return b"".join(rec(i, tag, image) for i in range(n))


def create_upload(db, length=None, skip=False, max_errors=None, key=None):
    token, batch_key = secrets.token_hex(16), secrets.token_hex(16)
    db.sql("INSERT INTO uploads (token, protocol, batch_key, length, skip_errors, max_errors, idempotency_key, "
           f"expires_at) VALUES ('{token}', 'tus', '{batch_key}', {'NULL' if length is None else int(length)}, "
           f"{'true' if skip else 'false'}, {'NULL' if max_errors is None else int(max_errors)}, "
           f"{'NULL' if key is None else repr(key)}, now() + interval '1 hour')")
    return token, batch_key


def patch_head(token, offset, length, upload_length=None, complete=False):
    head = (f"PATCH /uploads/{token} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/offset+octet-stream\r\n"
            f"Tus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\nContent-Length: {length}\r\nConnection: close\r\n")
    if upload_length is not None:
        head += f"Upload-Length: {upload_length}\r\n"
    if complete:
        head += "Upload-Complete: ?1\r\n"
    return (head + "\r\n").encode()


def patch(srv, token, offset, body, **kw):
    """A tus PATCH. The tus answer of the completing one is 204 with Content-Location; the final JSON answer is
    then read back from GET /uploads/{token} (its kept answer) and returned as the 200 it is."""
    c = helpers.HTTPConn(srv.host, srv.port, timeout=60)
    try:
        c.send(patch_head(token, offset, len(body), **kw) + body)
        r = c.read_response()
    finally:
        c.close()
    if r.status == 204 and "content-location" in r.headers:
        st, _, got = helpers.raw_request(srv.host, srv.port, f"GET /uploads/{token} HTTP/1.1\r\nHost: localhost\r\n"
                                         "Connection: close\r\n\r\n".encode())
        assert st == 200, got
        kept = json.loads(got)
        assert r.headers["content-location"] == kept["batch_url"], (r, kept)
        r = helpers.RawResponse(kept["answer_status"], "OK", r.headers, (json.dumps(kept["answer"], separators=(",", ":")) + "\n").encode(), r.interim)
    return r


def post(srv, body, query=""):
    c = helpers.HTTPConn(srv.host, srv.port, timeout=60)
    try:
        c.send(helpers.post_head(f"/users{'?' + query if query else ''}", length=len(body)) + body)
        return c.read_response()
    finally:
        c.close()


def upload_row(db, token):
    return db.sql(f"SELECT concat_ws(',', state, upload_offset, lines, inserted, skipped, appends) FROM uploads "
                  f"WHERE token = '{token}'")


def offset_of(r):
    return int(r.headers["upload-offset"])


def rows_and_files(db, images_dir, batch_id):
    out = []
    for u in db.users(f"batch_id = {int(batch_id)}"):
        digest = helpers.sha256_file(os.path.join(images_dir, u["image_path"])) if u["image_path"] else None
        out.append((u["name"], u["email"], u["image_type"], u["image_size"], digest))
    return out


def append_in_pieces(srv, token, body, cuts, **last):
    """PATCHes body cut at `cuts` (byte positions, mid-line), each time from the offset the server gave."""
    offset, answers = 0, []
    for cut in cuts:
        r = patch(srv, token, offset, body[offset:cut])
        assert r.status == 204, r
        assert offset_of(r) == body.rfind(b"\n", 0, cut) + 1, (r, cut)
        offset = offset_of(r)
        answers.append(r)
    r = patch(srv, token, offset, body[offset:], **last)
    answers.append(r)
    return answers


@pytest.fixture
def srv(start_server):
    return start_server()


def test_appends_then_completion_store_what_a_post_stores(srv, db, images_dir):
    body = body_of(40)
    token, batch_key = create_upload(db, length=len(body))
    answers = append_in_pieces(srv, token, body, [len(body) // 3 + 7, 2 * len(body) // 3 + 11])
    r = answers[-1]
    assert r.status == 200 and offset_of(r) == len(body), r
    a = r.json()
    assert (a["inserted"], a["skipped"], a["lines"], a["images"], a["bytes"]) == (40, 0, 40, 40, len(body)), a
    assert a["last_user_id"] - a["first_user_id"] == 39
    assert db.sql(f"SELECT batch_key FROM batches WHERE batch_id = {a['batch_id']}") == batch_key
    assert upload_row(db, token) == f"committed,{len(body)},40,40,0,3"
    assert db.sql("SELECT count(*) FROM upload_rows") == "0"
    assert helpers.pending_files(images_dir) == []
    p = post(srv, body)
    assert p.status == 200, p
    assert set(p.json()) == set(a), (p.json(), a)
    staged = rows_and_files(db, images_dir, a["batch_id"])
    assert staged == rows_and_files(db, images_dir, p.json()["batch_id"])
    assert [u["user_id"] for u in db.users(f"batch_id = {a['batch_id']}")] == list(
        range(a["first_user_id"], a["last_user_id"] + 1)), "ids follow the lines"
    # a committed upload answers 409 with its final offset
    r = patch(srv, token, 0, b"")
    assert r.status == 409 and offset_of(r) == len(body), r


def test_partial_last_line_is_sent_again_and_deferred_length_completes(srv, db, images_dir):
    body = body_of(6)
    token, _ = create_upload(db)
    cut = body.index(b"\n") + 40  # one complete line and the start of the next
    r = patch(srv, token, 0, body[:cut])
    assert r.status == 204 and offset_of(r) == body.index(b"\n") + 1, r
    assert upload_row(db, token) == f"open,{offset_of(r)},1,1,0,1"
    assert len(helpers.image_files(images_dir)) == 1, "the partial line's image file was removed"
    off = offset_of(r)
    r = patch(srv, token, off + 1, body[off + 1:])
    assert r.status == 409 and offset_of(r) == off, r
    r = patch(srv, token, off, body[off:], upload_length=len(body))
    assert r.status == 200 and r.json()["inserted"] == 6 and r.json()["lines"] == 6, r
    assert len(helpers.image_files(images_dir)) == 6


def test_complete_flag_ends_an_upload_without_a_length(srv, db):
    body = body_of(3, image=False)
    token, _ = create_upload(db)
    r = patch(srv, token, 0, body[:-5])
    assert r.status == 204
    off = offset_of(r)
    r = patch(srv, token, off, body[off:].rstrip(b"\n"), complete=True)
    assert r.status == 200 and r.json()["inserted"] == 3, r


def test_bad_token_and_bytes_past_the_length(srv, db):
    r = patch(srv, secrets.token_hex(16), 0, b"")
    assert r.status == 404, r
    body = body_of(2, image=False)
    token, _ = create_upload(db, length=len(body) - 3)
    r = patch(srv, token, 0, body)
    assert r.status == 413, r
    assert upload_row(db, token) == "open,0,0,0,0,0"
    assert db.sql("SELECT count(*) FROM upload_rows") == "0"


def test_fail_mode_bad_record_in_the_third_append_fails_the_upload(srv, db, images_dir):
    body = body_of(9) + b'{"name": "broken", "email": \n' + body_of(2, "after")
    token, _ = create_upload(db, length=len(body))
    bad_line = 10
    third = body.index(b"broken")
    cuts = [len(body) // 4, len(body) // 2]
    offset = 0
    for cut in cuts:
        r = patch(srv, token, offset, body[offset:cut])
        assert r.status == 204, r
        offset = offset_of(r)
    assert offset < third
    r = patch(srv, token, offset, body[offset:])
    assert r.status == 400, r
    assert r.json()["line"] == bad_line, r.json()
    assert upload_row(db, token).startswith("failed,"), upload_row(db, token)
    assert db.sql(f"SELECT answer_status FROM uploads WHERE token = '{token}'") == "400"
    assert db.count_users() == 0
    assert db.sql("SELECT count(*) FROM upload_rows") == "0"
    assert helpers.all_files(images_dir) == [], helpers.all_files(images_dir)
    r = patch(srv, token, offset, body[offset:])
    assert r.status == 410, r


def test_skip_mode_keeps_dead_letters_across_appends(srv, db):
    bad1, bad2 = b'{"name": "no email"}', b'{"name": "broken",'
    body = body_of(3, image=False) + bad1 + b"\n" + body_of(3, "b", image=False) + bad2 + b"\n" + body_of(2, "c")
    token, _ = create_upload(db, length=len(body), skip=True)
    cut = body.index(b"broken") + 3  # the second bad line is cut: it is counted once, when resent
    answers = append_in_pieces(srv, token, body, [body.index(bad1) + 5, cut])
    r = answers[-1]
    assert r.status == 200, r
    a = r.json()
    assert (a["inserted"], a["skipped"], a["lines"]) == (8, 2, 10), a
    assert [e["line"] for e in a["errors"]] == [4, 8], a
    assert a["rejected_url"] == f"/batches/{a['batch_id']}/rejected"
    assert db.sql(f"SELECT string_agg(line::text, ',' ORDER BY line) FROM rejected_records "
                  f"WHERE batch_id = {a['batch_id']}") == "4,8"
    assert db.sql(f"SELECT convert_from(record, 'UTF8') FROM rejected_records WHERE batch_id = {a['batch_id']} "
                  "AND line = 8") == bad2.decode()


def test_max_errors_counts_across_the_upload(srv, db):
    bad = b'{"name": "no email"}\n'
    body = body_of(2, image=False) + bad + body_of(2, "b", image=False) + bad + body_of(1, "c", image=False)
    token, _ = create_upload(db, length=len(body), max_errors=1)
    r = patch(srv, token, 0, body[:body.index(b"b 0")])
    assert r.status == 204
    r = patch(srv, token, offset_of(r), body[offset_of(r):])
    assert r.status == 422 and r.json()["line"] == 6, r
    assert upload_row(db, token).startswith("failed,")


def test_client_dropping_mid_body_keeps_the_complete_lines(srv, db, images_dir):
    body = body_of(20)
    token, _ = create_upload(db, length=len(body))
    half = len(body) // 2 + 13
    s = socket.create_connection((srv.host, srv.port))
    s.sendall(patch_head(token, 0, len(body)) + body[:half])
    time.sleep(0.5)
    s.close()
    want = body.rfind(b"\n", 0, half) + 1
    deadline = time.time() + 20
    while time.time() < deadline and upload_row(db, token) == "open,0,0,0,0,0":
        time.sleep(0.1)
    lines = body[:want].count(b"\n")
    assert upload_row(db, token) == f"open,{want},{lines},{lines},0,1"
    r = patch(srv, token, want, body[want:])
    assert r.status == 200 and r.json()["inserted"] == 20, r
    assert len(helpers.image_files(images_dir)) == 20
    assert helpers.pending_files(images_dir) == []


def wait_for_upload_lock(db, which):
    """Waits up to 10 s until a session of this database holds an upload's advisory lock (`which`: a pg_locks
    condition naming it)."""
    deadline = time.time() + 10
    while time.time() < deadline and db.sql(
            f"SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND {which} "
            f"AND database = (SELECT oid FROM pg_database WHERE datname = current_database())") == "0":
        time.sleep(0.05)


def test_a_later_append_takes_over(srv, db):
    body = body_of(10, image=False)
    token, _ = create_upload(db, length=len(body))
    first = socket.create_connection((srv.host, srv.port))
    first.sendall(patch_head(token, 0, len(body)) + body[:len(body) // 2])
    wait_for_upload_lock(db, "classid::bigint = 1426063360")
    r = patch(srv, token, 0, body)
    assert r.status == 200 and r.json()["inserted"] == 10, r
    first.settimeout(10)
    try:
        data = first.recv(65536)
    except OSError:
        data = b""
    first.close()
    assert not data.startswith(b"HTTP/1.1 2"), data[:200]
    assert upload_row(db, token) == f"committed,{len(body)},10,10,0,1"


def test_a_session_holding_the_upload_lock_is_taken_over(srv, db):
    """The append's first message finds the lock taken: the second terminates the session holding it (its
    uncommitted offset is lost) and reads the row again: 409 with the durable offset, then appends go on."""
    body = body_of(4, image=False)
    token, _ = create_upload(db)
    upload_id = db.sql(f"SELECT upload_id FROM uploads WHERE token = '{token}'")
    lock = (f"pg_advisory_xact_lock((1426063360 | ({upload_id}::bigint >> 32))::int4, "
            f"({upload_id}::bigint & 4294967295)::bit(32)::int4)")
    holder = subprocess.Popen(["psql", db.url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c",
                               f"BEGIN; SELECT {lock}; UPDATE uploads SET upload_offset = 999 "
                               f"WHERE token = '{token}'; SELECT pg_sleep(60); COMMIT;"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_upload_lock(db, f"objid::bigint = {upload_id}")
        r = patch(srv, token, 5, body)
        assert r.status == 409 and offset_of(r) == 0, r
        assert holder.wait(10) != 0
        assert "terminat" in holder.stderr.read()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    r = patch(srv, token, 0, body)
    assert r.status == 204 and offset_of(r) == len(body), r
    r = patch(srv, token, len(body), b"", complete=True)
    assert r.status == 200 and r.json()["inserted"] == 4, r
    assert upload_row(db, token) == f"committed,{len(body)},4,4,0,2"


def gc(db, images_dir):
    r = subprocess.run([helpers.BINARY, "gc", "--db", db.url, "--images-dir", images_dir],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr


def test_gc_leaves_an_open_upload_alone_and_removes_a_gone_one(srv, db, images_dir):
    body = body_of(4)
    token, batch_key = create_upload(db, length=len(body))
    r = patch(srv, token, 0, body[:len(body) - 10])
    assert r.status == 204
    files = helpers.image_files(images_dir)
    journals = helpers.pending_files(images_dir)
    assert len(files) == 3 and len(journals) == 1 and journals[0].startswith(batch_key + ".0."), journals
    srv.stop()
    gc(db, images_dir)
    assert helpers.image_files(images_dir) == files and helpers.pending_files(images_dir) == journals
    db.sql(f"DELETE FROM uploads WHERE token = '{token}'")
    gc(db, images_dir)
    assert helpers.all_files(images_dir) == []


def test_gc_keeps_the_files_of_a_committed_upload_whose_journals_stayed(srv, db, images_dir):
    body = body_of(3)
    token, batch_key = create_upload(db, length=len(body))
    r = patch(srv, token, 0, body[:-4])
    assert r.status == 204
    journals = helpers.pending_files(images_dir)
    r = patch(srv, token, offset_of(r), body[offset_of(r):])
    assert r.status == 200
    files = helpers.image_files(images_dir)
    assert len(files) == 3 and helpers.pending_files(images_dir) == []
    # as if the process died between COMMIT and the removal of the journals
    for j in journals:
        with open(os.path.join(images_dir, ".pending", j), "w") as f:
            f.write("".join(p + "\n" for p in files))
    srv.stop()
    gc(db, images_dir)
    assert helpers.image_files(images_dir) == files and helpers.pending_files(images_dir) == []


@pytest.mark.parametrize("images", [True, False])
def test_final_commit_cost(srv, db, figures, images):
    """The final append's INSERT .. SELECT of the staged rows: one append stages every line, an empty completing
    append moves them. Sizes from JI_UPLOAD_COMMIT_ROWS ("with images,without"; default small). Not asserted."""
    sizes = [int(x) for x in os.environ.get("JI_UPLOAD_COMMIT_ROWS", "500,5000").split(",")]
    n = sizes[0] if images else sizes[1]
    line = (lambda i: helpers.record_line(f"c {i}", f"c-{i}@example.com", helpers.png_bytes(2000, f"c{i % 97}"))
            if images else helpers.record_line(f"c {i}", f"c-{i}@example.com"))
    body = b"".join(line(i) + b"\n" for i in range(n))
    token, _ = create_upload(db)
    t0 = time.monotonic()
    r = patch(srv, token, 0, body)
    t1 = time.monotonic()
    assert r.status == 204 and offset_of(r) == len(body), r
    r = patch(srv, token, len(body), b"", complete=True)
    t2 = time.monotonic()
    assert r.status == 200 and r.json()["inserted"] == n, r
    p = post(srv, body)
    t3 = time.monotonic()
    assert p.status == 200 and p.json()["inserted"] == n, p
    figures(f"upload final commit: {n} rows {'with' if images else 'without'} images: staging append "
            f"{t1 - t0:.2f} s, final commit {t2 - t1:.2f} s; the same body POSTed {t3 - t2:.2f} s")


def test_fsync_on_appends_complete_like_fsync_off(start_server, db, images_dir):
    srv = start_server(fsync="on")
    body = body_of(8)
    token, _ = create_upload(db, length=len(body))
    answers = append_in_pieces(srv, token, body, [len(body) // 2 + 3])
    assert answers[-1].status == 200 and answers[-1].json()["images"] == 8, answers[-1]
    assert len(helpers.image_files(images_dir)) == 8 and helpers.pending_files(images_dir) == []


def test_kill_mid_append_leaves_the_offset_and_the_next_append_cleans_up(start_server, db, images_dir):
    srv = start_server()
    body = body_of(12)
    token, batch_key = create_upload(db, length=len(body))
    s = socket.create_connection((srv.host, srv.port))
    s.sendall(patch_head(token, 0, len(body)) + body[:len(body) // 2])
    deadline = time.time() + 10
    while time.time() < deadline and len(helpers.image_files(images_dir)) < 3:
        time.sleep(0.05)
    assert len(helpers.image_files(images_dir)) >= 3
    srv.proc.kill()
    srv.proc.wait(5)
    s.close()
    assert upload_row(db, token) == "open,0,0,0,0,0"
    assert len(helpers.pending_files(images_dir)) == 1
    srv = start_server()  # its start-up gc leaves the journal of an open upload alone
    assert len(helpers.pending_files(images_dir)) == 1
    r = patch(srv, token, 0, body)
    assert r.status == 200 and r.json()["inserted"] == 12, r
    assert len(helpers.image_files(images_dir)) == 12, "the killed append's files were removed"
    assert helpers.pending_files(images_dir) == []


def post_keyed(srv, body, key):
    c = helpers.HTTPConn(srv.host, srv.port, timeout=60)
    try:
        c.send(helpers.post_head("/users", length=len(body), extra=(f"Idempotency-Key: {key}",)) + body)
        return c.read_response()
    finally:
        c.close()


def test_an_upload_keeps_its_answer_under_its_idempotency_key(srv, db):
    body = body_of(4, "k1", image=False)
    token, _ = create_upload(db, length=len(body), key="upload-key-1")
    r = append_in_pieces(srv, token, body, [len(body) // 2])[-1]
    assert r.status == 200, r
    p = post_keyed(srv, body, "upload-key-1")
    assert p.status == 200 and p.body == r.body, (p, r)
    assert db.count_users() == 4


def test_an_upload_whose_key_committed_meanwhile_answers_the_kept_answer(srv, db, images_dir):
    body = body_of(3, "k2")
    token, _ = create_upload(db, length=len(body), key="upload-key-2")
    r = patch(srv, token, 0, body[:-7])
    assert r.status == 204
    off = offset_of(r)
    p = post_keyed(srv, body_of(2, "other", image=False), "upload-key-2")
    assert p.status == 200, p
    r = patch(srv, token, off, body[off:])
    assert r.status == 200 and r.body == p.body, (r, p)
    assert db.count_users() == 2
    assert db.sql(f"SELECT concat_ws(',', state, batch_id) FROM uploads WHERE token = '{token}'") == \
        f"committed,{p.json()['batch_id']}"
    assert db.sql("SELECT count(*) FROM upload_rows") == "0"
    assert helpers.all_files(images_dir) == [], "the dropped upload's files were removed"


def test_an_oversize_line_cut_by_an_append_is_rejected_once(start_server, db):
    srv = start_server(args=["--max-record-bytes", "2000"])
    big = b'{"name": "big", "email": "big@example.com", "pad": "' + b"x" * 5000 + b'"}'
    body = body_of(2, image=False) + big + b"\n" + body_of(2, "z", image=False)
    token, _ = create_upload(db, length=len(body), skip=True)
    cut = body.index(big) + 3000  # past the limit: the line's dead letter is kept already
    r = append_in_pieces(srv, token, body, [cut])[-1]
    assert r.status == 200, r
    a = r.json()
    assert (a["inserted"], a["skipped"], a["lines"]) == (4, 1, 5), a
    assert db.sql(f"SELECT concat_ws(',', line, truncated) FROM rejected_records "
                  f"WHERE batch_id = {a['batch_id']}") == "3,t"


def test_completion_flag_before_the_length_is_refused_and_keeps_nothing(srv, db):
    body = body_of(3, image=False)
    token, _ = create_upload(db, length=len(body) + 10)
    r = patch(srv, token, 0, body, complete=True)
    assert r.status == 400, r
    assert upload_row(db, token) == "open,0,0,0,0,0"
    r = patch(srv, token, 0, body)
    assert r.status == 204 and offset_of(r) == len(body), r


def test_a_length_over_the_maximum_and_a_cancelled_upload_are_refused(srv, db):
    token, _ = create_upload(db)
    r = patch(srv, token, 0, b"", upload_length=64 * 1024 ** 3 + 1)
    assert r.status == 413, r
    r = patch(srv, token, 0, b"", upload_length=64 * 1024 ** 3)
    assert r.status == 204, r
    assert db.sql(f"SELECT length FROM uploads WHERE token = '{token}'") == str(64 * 1024 ** 3)
    db.sql(f"UPDATE uploads SET state = 'cancelled' WHERE token = '{token}'")
    r = patch(srv, token, 0, b"")
    assert r.status == 410, r
    token, _ = create_upload(db)
    db.sql(f"UPDATE uploads SET expires_at = now() - interval '1 second' WHERE token = '{token}'")
    r = patch(srv, token, 0, b"")
    assert r.status == 404, r
