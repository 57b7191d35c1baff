/*
 * ingest_append.c — the transaction of an append to a resumable upload
 * (docs/resumable.md), from the upload's lock to its COMMIT: the takeover of
 * the upload's advisory lock from an earlier append, the upload's row read
 * and judged (404, 409, 410, 413), the COPY of its rows into upload_rows; at
 * its end either the upload's offset moved (204) or every staged row moved
 * into users as one batch (200, with the upload's Idempotency-Key claimed);
 * and fail mode's marking of the upload as failed. ingest_tx.c owns the rest
 * of the transaction (the connection, the COPY's end, the dead letters'
 * COPY, failure, the answer's JSON, the key's claim) and calls in here.
 *
 *   UP_LOCK (one message: BEGIN, lock_timeout, the upload's lock tried and its row read, checked, COPY upload_rows)
 *     -> [UP_TAKEOVER (another append held the lock: the same again, its holder terminated, the lock waited for)]
 *     -> STREAMING -> COPY_END -> [DEAD_LETTERS into upload_rejected]
 *     -> not completing: UP_CLOSE (offset, counts, expiry) -> COMMIT: 204
 *     -> completing: [UP_ERRORS] -> [UP_KEY] -> UP_BATCH (batch + export horizon) -> UP_MOVE (staged rows into
 *        users, ORDER BY line; dead letters into rejected_records; staging deleted) -> UP_CLOSE -> COMMIT: 200
 */
#include "ingest_internal.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "export.h"

/** An append's rows: staged with the upload's id (the same text columns as users', the line where a users row has
 * its batch_id). */
#define COPY_UPLOAD_ROWS_SQL                                                                                           \
    "COPY upload_rows (upload_id, line, name, email, image_path, image_type, image_size) FROM STDIN"

static unsigned upload_expiry(const ji_ingest_t *in)
{
    return in->env->upload_expiry_s != 0 ? in->env->upload_expiry_s : JI_DEFAULT_UPLOAD_EXPIRY_S;
}

/* ---- the start: one message from BEGIN to COPY IN (two when another append holds the lock) ---- */

/** Refuses the append before anything of it was kept: `status` may differ from the kind's (410). */
static void refuse_append(ji_ingest_t *in, ji_error_kind_t kind, int status, uint64_t offset, const char *message)
{
    ji_error_t e;

    ji_error_set(&e, kind, 0, NULL, "%s", message);
    in->result_offset = offset;
    ji_ingest_abort(in, &e);
    in->status = status;
}

static int64_t field_int(const PGresult *res, int col, int64_t null_value)
{
    return PQgetisnull(res, 0, col) ? null_value : strtoll(PQgetvalue(res, 0, col), NULL, 10);
}

/** The columns of the upload's row as the opening reads it (UPLOAD_ROW_COLUMNS). */
enum {
    ROW_LOCK,
    ROW_STATE,
    ROW_EXPIRED,
    ROW_LENGTH,
    ROW_OFFSET,
    ROW_LINES,
    ROW_INSERTED,
    ROW_SKIPPED,
    ROW_IMAGES,
    ROW_APPENDS,
    ROW_SKIP_ERRORS,
    ROW_MAX_ERRORS,
    ROW_KEY,
    ROW_BATCH_KEY,
    ROW_UPLOAD_ID,
};
#define UPLOAD_ROW_COLUMNS                                                                                             \
    "state, expires_at <= now(), length, upload_offset, lines, inserted, skipped, images, appends, skip_errors, "      \
    "max_errors, idempotency_key, batch_key, upload_id"

/**
 * The row decides (no row or expired: 404; committed: 409; failed or cancelled: 410; another offset: 409; an
 * Upload-Length that differs, is below the offset or over --max-upload-bytes: 413). True when it refused the append
 * (answered). The opening's CHECK statement asks the same of the row, but for the lengths.
 */
static bool upload_refuses(ji_ingest_t *in, const PGresult *res)
{
    const char *state;
    uint64_t offset;

    if (PQntuples(res) != 1 || PQnfields(res) <= ROW_UPLOAD_ID) {
        refuse_append(in, JI_ERR_NOT_FOUND, 404, 0, "no such upload");
        return true;
    }
    state = PQgetvalue(res, 0, ROW_STATE);
    offset = (uint64_t)field_int(res, ROW_OFFSET, 0);
    if (strcmp(state, "committed") == 0) {
        refuse_append(in, JI_ERR_CONFLICT, 409, offset, "the upload is complete already");
        return true;
    }
    if (strcmp(state, "open") != 0) {
        refuse_append(in, JI_ERR_NOT_FOUND, 410, offset, "the upload ended (failed or cancelled)");
        return true;
    }
    if (PQgetvalue(res, 0, ROW_EXPIRED)[0] == 't') {
        refuse_append(in, JI_ERR_NOT_FOUND, 404, 0, "no such upload (it expired)");
        return true;
    }
    if (offset != in->app.offset) {
        refuse_append(in, JI_ERR_CONFLICT, 409, offset, "Upload-Offset is not the upload's offset");
        return true;
    }
    in->length = field_int(res, ROW_LENGTH, -1);
    if (in->app.length >= 0) {
        if (in->length >= 0 && in->length != in->app.length) {
            refuse_append(in, JI_ERR_TOO_LARGE, 413, offset, "Upload-Length differs from the upload's length");
            return true;
        }
        in->length = in->app.length;
    }
    if (in->length >= 0 && ((uint64_t)in->length < offset || (uint64_t)in->length > in->max_upload)) {
        refuse_append(in, JI_ERR_TOO_LARGE, 413, offset,
                      (uint64_t)in->length < offset ? "Upload-Length is below the upload's offset"
                                                    : "Upload-Length is over --max-upload-bytes");
        return true;
    }
    return false;
}

/** The append starts from the row (which took it): counts, options, keys, the image journal and the COPY's rows. */
static void start_from_row(ji_ingest_t *in, const PGresult *res)
{
    uint64_t offset = (uint64_t)field_int(res, ROW_OFFSET, 0);
    ji_error_t e;

    snprintf(in->upload_id_text, sizeof(in->upload_id_text), "%s", PQgetvalue(res, 0, ROW_UPLOAD_ID));
    in->upload_id = strtoll(in->upload_id_text, NULL, 10);
    in->start_offset = offset;
    in->result_offset = offset;
    in->bytes = offset;
    in->lines_start = (uint64_t)field_int(res, ROW_LINES, 0);
    in->splitter.line = in->lines_start + 1;
    in->inserted = (uint64_t)field_int(res, ROW_INSERTED, 0);
    in->skipped = (uint64_t)field_int(res, ROW_SKIPPED, 0);
    in->images_stored = (uint64_t)field_int(res, ROW_IMAGES, 0);
    in->seq = (uint64_t)field_int(res, ROW_APPENDS, 0);
    in->params.skip_errors = PQgetvalue(res, 0, ROW_SKIP_ERRORS)[0] == 't';
    if (!PQgetisnull(res, 0, ROW_MAX_ERRORS)) {
        in->params.has_max_errors = true;
        in->params.skip_errors = true;
        in->params.max_errors = (uint64_t)field_int(res, ROW_MAX_ERRORS, 0);
    }
    if (!PQgetisnull(res, 0, ROW_KEY)) {
        snprintf(in->key, sizeof(in->key), "%s", PQgetvalue(res, 0, ROW_KEY));
        in->keyed = in->key[0] != '\0';
    }
    snprintf(in->upload_key, sizeof(in->upload_key), "%s", PQgetvalue(res, 0, ROW_BATCH_KEY));
    snprintf(in->batch_key, sizeof(in->batch_key), "%s", in->upload_key);
    if ((in->images = ji_image_batch_begin_append(in->env->images, in->upload_key, in->seq, &e)) == NULL) {
        ji_ingest_abort(in, &e);
        return;
    }
    if (in->params.skip_errors && (in->dead = ji_dead_letters_new(in->env->images->pending_fd)) == NULL) {
        ji_error_set(&e, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        ji_ingest_abort(in, &e);
        return;
    }
    ji_ingest_tx_stream(in);
}

/*
 * The opening message (ji_pg_script: one round trip):
 *
 *   BEGIN; lock_timeout; READ; CHECK; COPY upload_rows FROM STDIN
 *
 * READ tries the upload's lock (never waits for it) and reads the row FOR UPDATE (the row lock waits only for a
 * statement that changes the row without the upload's lock: fail mode's marking). When another append holds the
 * lock, READ stops the message with an error of its own (a text cast to int that says so); then, and only then, the
 * takeover message follows, which rolls the first one back:
 *
 *   ROLLBACK; BEGIN; lock_timeout; TERMINATE (every other holder of the lock); READ (waits for the lock, bounded by
 *   lock_timeout; FOR UPDATE reads the newest committed version of the row); CHECK; COPY
 *
 * CHECK stops the message before the COPY when the row does not take this append (no row, not open, expired, not at
 * the client's offset): C reads which answer from READ's row. The lengths (413) are C's alone, judged once the COPY
 * began: that refusal ends the COPY with the rollback. Nothing is written before the body streams.
 */

/** SQLSTATE of the errors READ and CHECK stop the message with (invalid_text_representation: a text cast to int). */
#define SQLSTATE_STOPPED "22P02"
/** Statements of a message before READ: BEGIN, lock_timeout; after a takeover ROLLBACK and TERMINATE too. */
#define OPENING_READ 2
#define TAKEOVER_READ 4

static void send_opening(ji_ingest_t *in, bool takeover);

static void on_opened(ji_pg_t *pg, void *ctx, PGresult *const *results, int n, PGresult *failed, const char *err)
{
    ji_ingest_t *in = ctx;
    bool takeover = in->state == ST_UP_TAKEOVER;
    int read = takeover ? TAKEOVER_READ : OPENING_READ;
    const char *sqlstate = failed != NULL ? PQresultErrorField(failed, PG_DIAG_SQLSTATE) : NULL;
    bool stopped =
        sqlstate != NULL && strcmp(sqlstate, SQLSTATE_STOPPED) == 0 && PQstatus(ji_pg_conn(pg)) == CONNECTION_OK;

    if (err != NULL) {
        if (stopped && n == read && !takeover) {
            send_opening(in, true); /* another append holds the lock */
            return;
        }
        if (stopped && n == read + 1) {
            /* CHECK: the row says why */
            if (!upload_refuses(in, results[read]))
                ji_ingest_tx_fail(in, "locking the upload failed", failed, err);
            return;
        }
        ji_ingest_tx_fail(in,
                          n < read    ? "finding the upload failed"
                          : n == read ? "locking the upload failed"
                                      : "starting COPY failed",
                          failed, err);
        return;
    }
    /* the connection is in COPY IN: a refusal from here ends the COPY with the rollback */
    if (n != read + 3) {
        ji_ingest_tx_fail(in, "locking the upload failed", NULL, "unexpected results of the opening statements");
        return;
    }
    if (!upload_refuses(in, results[read]))
        start_from_row(in, results[read]);
}

static void send_opening(ji_ingest_t *in, bool takeover)
{
    ji_pg_t *pg = in->pg;
    char *token = PQescapeLiteral(ji_pg_conn(pg), in->app.token, strlen(in->app.token));
    ji_text_t sql = {0};

    if (token == NULL) {
        sql.failed = true;
    } else {
        ji_text_append(&sql, takeover ? "ROLLBACK; BEGIN; " : "BEGIN; ", takeover ? 17 : 7);
        ji_text_append(&sql,
                       H2O_STRLIT("SELECT set_config('lock_timeout', '" JI_STR(JI_PG_LOCK_TIMEOUT_MS) "', true); "));
        if (takeover)
            ji_text_printf(&sql, "SELECT " JI_UPLOAD_TERMINATE_SQL("upload_id") " FROM uploads WHERE token = %s; ",
                           token);
        if (takeover)
            ji_text_append(&sql, H2O_STRLIT("SELECT " JI_UPLOAD_LOCK_SQL("upload_id")));
        else
            ji_text_append(&sql, H2O_STRLIT("SELECT CASE WHEN pg_try_advisory_xact_lock" JI_UPLOAD_LOCK_ARGS(
                                     "upload_id") " THEN 0 ELSE ('jsonl-ingest: another append holds upload ' || "
                                                  "upload_id || ': it is taken over')::int END"));
        ji_text_printf(&sql,
                       ", " UPLOAD_ROW_COLUMNS " FROM uploads WHERE token = %s FOR UPDATE; "
                       "SELECT CASE WHEN bool_and(state = 'open' AND (expires_at <= now()) IS NOT TRUE AND "
                       "coalesce(upload_offset, 0) = %" PRIu64 ") THEN 0 ELSE ('jsonl-ingest: the upload does not "
                       "take an append at offset %" PRIu64 " (' || coalesce(min(state), 'no such upload') || ')')::int "
                       "END FROM uploads WHERE token = %s; " COPY_UPLOAD_ROWS_SQL,
                       token, in->app.offset, in->app.offset, token);
        PQfreemem(token);
    }
    ji_ingest_tx_send_script(in, &sql, takeover ? ST_UP_TAKEOVER : ST_UP_LOCK, on_opened,
                             takeover ? "taking the upload over failed" : "finding the upload failed");
}

void ji_ingest_append_open(ji_ingest_t *in)
{
    send_opening(in, false);
}

/* ---- COMMIT ---- */

/** COMMIT of an append went through. */
static void on_append_commit(ji_ingest_t *in)
{
    ji_error_t e;
    uint64_t removed = 0;

    if (!in->completing) {
        /* the files belong to staged rows: files and journal stay until the upload ends */
        ji_image_batch_forget(in->images);
        in->images = NULL;
        ji_ingest_tx_give_back(in);
        ji_text_free(&in->answer);
        in->state = ST_DONE;
        in->status = 204;
        ji_ingest_answer(in);
        return;
    }
    if (in->replayed) {
        ji_image_batch_abort(in->images);
        in->images = NULL;
        if (ji_image_store_drop_upload(in->env->images, in->upload_key, &removed, &e) != 0)
            fprintf(stderr, "upload %s: %s\n", in->upload_key, e.message);
    } else {
        ji_image_batch_commit(in->images);
        in->images = NULL;
        if (ji_image_store_keep_upload(in->env->images, in->upload_key, &e) != 0)
            fprintf(stderr, "upload %s: %s\n", in->upload_key, e.message);
        atomic_fetch_add_explicit(&in->env->stats->records, in->inserted, memory_order_relaxed);
        atomic_fetch_add_explicit(&in->env->stats->rejected_records, in->skipped, memory_order_relaxed);
        atomic_fetch_add_explicit(&in->env->stats->images, in->images_stored, memory_order_relaxed);
    }
    ji_ingest_tx_give_back(in);
    atomic_fetch_add_explicit(&in->env->stats->ingests_ok, 1, memory_order_relaxed);
    ji_ingest_tx_succeed(in);
}

/** An append's COMMIT (its end, or the upload's final commit) is done or failed. */
static void on_commit(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    if (err != NULL) {
        if (PQstatus(ji_pg_conn(pg)) != CONNECTION_OK) {
            /* COMMIT may or may not have happened: keep the files and their journal, gc settles it */
            ji_image_batch_forget(in->images);
            in->images = NULL;
        }
        ji_ingest_tx_fail(in, "COMMIT failed", res, err);
        return;
    }
    on_append_commit(in);
}

static void send_commit(ji_ingest_t *in)
{
    in->state = ST_COMMIT;
    if (ji_pg_query(in->pg, "COMMIT", 0, NULL, on_commit, in) != 0)
        ji_ingest_tx_fail(in, "sending COMMIT failed", NULL, ji_pg_error(in->pg));
}

/* ---- the end of an append that keeps the upload open ---- */

static void on_upload_closed(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    (void)pg;
    if (err != NULL) {
        ji_ingest_tx_fail(in, "updating the upload failed", res, err);
        return;
    }
    send_commit(in);
}

/**
 * The complete lines of this append are staged: the offset moves past the last of them. A dead letter kept for
 * the dropped partial line (one over --max-record-bytes is kept as soon as it crosses the limit) is deleted: the
 * line comes again.
 */
static void send_stage(ji_ingest_t *in)
{
    char v[7][24];
    const char *params[8] = {in->upload_id_text, v[0], v[1], v[2], v[3], v[4], in->length >= 0 ? v[5] : NULL, v[6]};

    in->result_offset = in->start_offset + ji_splitter_line_end_offset(&in->splitter);
    snprintf(v[0], sizeof(v[0]), "%" PRIu64, in->result_offset);
    snprintf(v[1], sizeof(v[1]), "%" PRIu64, ji_splitter_lines_done(&in->splitter));
    snprintf(v[2], sizeof(v[2]), "%" PRIu64, in->inserted);
    snprintf(v[3], sizeof(v[3]), "%" PRIu64, in->skipped);
    snprintf(v[4], sizeof(v[4]), "%" PRIu64, in->images_stored);
    snprintf(v[5], sizeof(v[5]), "%" PRId64, in->length);
    snprintf(v[6], sizeof(v[6]), "%u", upload_expiry(in));
    in->state = ST_UP_CLOSE;
    if (ji_pg_query(in->pg,
                    "WITH d AS (DELETE FROM upload_rejected WHERE upload_id = $1::bigint AND line > $3::bigint) "
                    "UPDATE uploads SET upload_offset = $2::bigint, lines = $3::bigint, inserted = $4::bigint, "
                    "skipped = $5::bigint, images = $6::bigint, length = coalesce(length, $7::bigint), "
                    "appends = appends + 1, updated_at = now(), "
                    "expires_at = now() + make_interval(secs => $8::int) WHERE upload_id = $1::bigint",
                    8, params, on_upload_closed, in) != 0)
        ji_ingest_tx_fail(in, "updating the upload failed", NULL, ji_pg_error(in->pg));
}

/* ---- the end of an append that completes the upload ---- */

static void send_close(ji_ingest_t *in)
{
    char v[7][24];
    const char *params[10] = {in->upload_id_text,
                              in->batch_id_text,
                              v[0],
                              v[1],
                              v[2],
                              v[3],
                              v[4],
                              in->answer.base,
                              in->keyed ? in->answer.base : NULL,
                              v[5]};

    in->result_offset = in->start_offset + in->fed;
    snprintf(v[0], sizeof(v[0]), "%" PRIu64, in->inserted);
    snprintf(v[1], sizeof(v[1]), "%" PRIu64, in->skipped);
    snprintf(v[2], sizeof(v[2]), "%" PRIu64, ji_ingest_lines(in));
    snprintf(v[3], sizeof(v[3]), "%" PRIu64, in->images_stored);
    snprintf(v[4], sizeof(v[4]), "%" PRIu64, in->result_offset);
    snprintf(v[5], sizeof(v[5]), "%u", upload_expiry(in));
    in->state = ST_UP_CLOSE;
    if (ji_pg_query(in->pg,
                    "WITH b AS (UPDATE batches SET inserted = $3::bigint, skipped = $4::bigint, lines = $5::bigint, "
                    "images = $6::bigint, bytes = $7::bigint, response = $9 WHERE batch_id = $2::bigint) "
                    "UPDATE uploads SET state = 'committed', batch_id = $2::bigint, answer_status = 200, answer = $8, "
                    "upload_offset = $7::bigint, length = $7::bigint, lines = $5::bigint, inserted = $3::bigint, "
                    "skipped = $4::bigint, images = $6::bigint, appends = appends + 1, updated_at = now(), "
                    "expires_at = now() + make_interval(secs => $10::int) WHERE upload_id = $1::bigint",
                    10, params, on_upload_closed, in) != 0)
        ji_ingest_tx_fail(in, "updating the upload failed", NULL, ji_pg_error(in->pg));
}

static void on_moved(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    (void)pg;
    if (err != NULL) {
        ji_ingest_tx_fail(in, "moving the staged rows failed", res, err);
        return;
    }
    if (PQntuples(res) == 1 && !PQgetisnull(res, 0, 0)) {
        snprintf(in->first_id, sizeof(in->first_id), "%s", PQgetvalue(res, 0, 0));
        snprintf(in->last_id, sizeof(in->last_id), "%s", PQgetvalue(res, 0, 1));
    }
    ji_ingest_tx_build_answer(in);
    if (in->answer.failed) {
        ji_error_t e;
        ji_error_set(&e, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        ji_ingest_abort(in, &e);
        return;
    }
    send_close(in);
}

/**
 * One statement: every staged row into users in line order (ids ascending with the lines, as a POST's COPY),
 * the staged dead letters into rejected_records, the staging deleted; it tells the first and last user id.
 */
static void on_final_batch(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;
    const char *params[2] = {in->upload_id_text, in->batch_id_text};
    ji_error_t e;

    if (err != NULL) {
        ji_ingest_tx_fail(in, "creating the batch failed", res, err);
        return;
    }
    if (PQntuples(res) == 0) {
        ji_error_set(&e, JI_ERR_CONFLICT, 0, NULL, "a request with this Idempotency-Key is in progress: retry later");
        ji_ingest_abort(in, &e);
        return;
    }
    snprintf(in->batch_id_text, sizeof(in->batch_id_text), "%s", PQgetvalue(res, 0, 0));
    in->batch_id = strtoll(in->batch_id_text, NULL, 10);
    in->state = ST_UP_MOVE;
    if (ji_pg_query(pg,
                    "WITH moved AS (INSERT INTO users (name, email, image_path, image_type, image_size, batch_id) "
                    "SELECT name, email, image_path, image_type, image_size, $2::bigint FROM upload_rows "
                    "WHERE upload_id = $1::bigint ORDER BY line RETURNING user_id), "
                    "dead AS (INSERT INTO rejected_records (batch_id, line, error, field, record, truncated) "
                    "SELECT $2::bigint, line, error, field, record, truncated FROM upload_rejected "
                    "WHERE upload_id = $1::bigint), "
                    "r AS (DELETE FROM upload_rows WHERE upload_id = $1::bigint), "
                    "j AS (DELETE FROM upload_rejected WHERE upload_id = $1::bigint) "
                    "SELECT min(user_id), max(user_id) FROM moved",
                    2, params, on_moved, in) != 0)
        ji_ingest_tx_fail(in, "moving the staged rows failed", NULL, ji_pg_error(pg));
}

/** The upload's batch, with its key, and the export horizon's lock before any user id is taken (export.h). */
static void send_final_batch(ji_ingest_t *in)
{
    const char *params[2] = {in->upload_key, in->keyed ? in->key : NULL};

    in->state = ST_UP_BATCH;
    if (ji_pg_query(in->pg,
                    "WITH b AS (INSERT INTO batches (batch_key, idempotency_key) VALUES ($1, $2) "
                    "ON CONFLICT DO NOTHING RETURNING batch_id) "
                    "SELECT b.batch_id FROM b, (" JI_EXPORT_HORIZON_LOCK_SQL ") h",
                    2, params, on_final_batch, in) != 0)
        ji_ingest_tx_fail(in, "creating the batch failed", NULL, ji_pg_error(in->pg));
}

/**
 * The upload's Idempotency-Key committed another batch meanwhile: that batch stands, this upload is dropped (its
 * staged rows deleted, its files removed after COMMIT) and answers the kept answer.
 */
static void send_final_replay(ji_ingest_t *in, const ji_key_claim_t *claim)
{
    char v[2][24];
    const char *params[5] = {in->upload_id_text, in->key, in->answer.base, v[0], v[1]};
    ji_error_t e;

    ji_text_free(&in->answer);
    if (claim->answer == NULL) {
        ji_error_set(&e, JI_ERR_INTERNAL, 0, NULL, "the Idempotency-Key is taken but has no answer");
        ji_ingest_abort(in, &e);
        return;
    }
    ji_text_append(&in->answer, claim->answer, claim->answer_len);
    if (in->answer.failed) {
        ji_error_set(&e, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        ji_ingest_abort(in, &e);
        return;
    }
    params[2] = in->answer.base;
    in->replayed = true;
    in->result_offset = in->start_offset + in->fed;
    snprintf(v[0], sizeof(v[0]), "%" PRIu64, in->result_offset);
    snprintf(v[1], sizeof(v[1]), "%u", upload_expiry(in));
    in->state = ST_UP_CLOSE;
    if (ji_pg_query(in->pg,
                    "WITH r AS (DELETE FROM upload_rows WHERE upload_id = $1::bigint), "
                    "j AS (DELETE FROM upload_rejected WHERE upload_id = $1::bigint) "
                    "UPDATE uploads SET state = 'committed', "
                    "batch_id = (SELECT batch_id FROM batches WHERE idempotency_key = $2), answer_status = 200, "
                    "answer = $3, upload_offset = $4::bigint, length = $4::bigint, appends = appends + 1, "
                    "updated_at = now(), expires_at = now() + make_interval(secs => $5::int) "
                    "WHERE upload_id = $1::bigint",
                    5, params, on_upload_closed, in) != 0)
        ji_ingest_tx_fail(in, "updating the upload failed", NULL, ji_pg_error(in->pg));
}

static const ji_key_claim_steps_t FINAL_KEY_STEPS = {
    .free = send_final_batch,
    .committed = send_final_replay,
    .running = "a request with this upload's Idempotency-Key is still in progress: retry once it has finished",
};

static void on_final_key(ji_key_claim_t *claim, ji_pg_t *pg, void *ctx)
{
    (void)pg;
    ji_ingest_tx_settle_claim(ctx, claim, &FINAL_KEY_STEPS);
}

static void send_final(ji_ingest_t *in)
{
    if (!in->keyed) {
        send_final_batch(in);
        return;
    }
    in->state = ST_UP_KEY;
    if (ji_idempotency_claim(&in->claim, in->pg, in->key, ji_ingest_tx_key_ttl(in), on_final_key, in) != 0)
        ji_ingest_tx_fail(in, "claiming the Idempotency-Key failed", NULL, ji_pg_error(in->pg));
}

/** Skip mode: the answer's "errors" are the first rejected records of the whole upload. */
static void on_upload_errors(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;
    int n;

    (void)pg;
    if (err != NULL) {
        ji_ingest_tx_fail(in, "reading the rejected records failed", res, err);
        return;
    }
    n = PQntuples(res);
    if (n > 0 && in->reported == NULL && (in->reported = calloc(JI_MAX_REPORTED_ERRORS, sizeof(*in->reported))) == NULL)
        n = 0;
    in->nreported = 0;
    for (int i = 0; i < n && i < JI_MAX_REPORTED_ERRORS; i++) {
        reported_error_t *r = &in->reported[in->nreported++];
        r->line = strtoull(PQgetvalue(res, i, 0), NULL, 10);
        snprintf(r->message, sizeof(r->message), "%s", PQgetvalue(res, i, 1));
        snprintf(r->field, sizeof(r->field), "%s", PQgetvalue(res, i, 2));
    }
    send_final(in);
}

void ji_ingest_tx_end_append(ji_ingest_t *in)
{
    const char *params[1] = {in->upload_id_text};

    if (!in->completing) {
        send_stage(in);
        return;
    }
    if (!in->params.skip_errors || in->skipped == 0) {
        send_final(in);
        return;
    }
    in->state = ST_UP_ERRORS;
    if (ji_pg_query(in->pg,
                    "SELECT line, error, coalesce(field, '') FROM upload_rejected WHERE upload_id = $1::bigint "
                    "ORDER BY line LIMIT " JI_STR(JI_MAX_REPORTED_ERRORS),
                    1, params, on_upload_errors, in) != 0)
        ji_ingest_tx_fail(in, "reading the rejected records failed", NULL, ji_pg_error(in->pg));
}

/* ---- fail mode: a record ended the upload ---- */

static void on_upload_failed(ji_pg_call_t *call, PGresult *res, const char *err)
{
    ji_ingest_t *in = JI_CONTAINER_OF(call, ji_ingest_t, fail_call);
    uint64_t removed = 0;
    ji_error_t e;

    if (err != NULL)
        fprintf(stderr, "upload %s: marking it failed: %s\n", in->upload_key, err);
    /* no row updated: the upload is no longer open (a later append completed it meanwhile), its files stay */
    else if (res != NULL && strcmp(PQcmdTuples(res), "1") == 0 &&
             ji_image_store_drop_upload(in->env->images, in->upload_key, &removed, &e) != 0)
        fprintf(stderr, "upload %s: %s\n", in->upload_key, e.message);
    ji_ingest_answer(in);
}

void ji_ingest_tx_fail_upload(ji_ingest_t *in)
{
    in->upload_failing = true;
    snprintf(in->fail_status, sizeof(in->fail_status), "%d", in->status);
    in->fail_values[0] = in->upload_id_text;
    in->fail_values[1] = in->fail_status;
    in->fail_values[2] = in->answer.base;
    /* a statement of its own, after the append's ROLLBACK (it waits for the row lock the append held) */
    if (ji_pg_call_start(&in->fail_call, in->env->pg_pool,
                         "WITH r AS (DELETE FROM upload_rows WHERE upload_id = $1::bigint), "
                         "j AS (DELETE FROM upload_rejected WHERE upload_id = $1::bigint) "
                         "UPDATE uploads SET state = 'failed', answer_status = $2::int, answer = $3, "
                         "updated_at = now() WHERE upload_id = $1::bigint AND state = 'open'",
                         3, in->fail_values, on_upload_failed) != 0)
        ji_ingest_answer(in);
}
