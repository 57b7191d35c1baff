/*
 * ingest_tx.c — the transaction of one ingest, every step a callback of the
 * connection (ingest.c feeds the COPY rows in between):
 *
 *   CONNECTING -> OPENING (BEGIN, lock_timeout, batch row, horizon lock, COPY) -> STREAMING
 *     -> COPY_END -> [DEAD_LETTERS] -> COMMIT (counts, COMMIT) -> DONE
 *   with an Idempotency-Key:
 *   CONNECTING -> BEGIN -> CLAIM -> OPENING (batch row, horizon lock, COPY) -> STREAMING
 *     -> COPY_END -> [DEAD_LETTERS] -> SUMMARY (counts) -> COMMIT (answer kept, COMMIT) -> DONE
 *   CLAIM -> REPLAY -> DONE | FAILED     (the key committed earlier)
 *   (any step) -> FAILED
 *
 * Round trips are what a small request pays for (each one is a wake-up of
 * the server process and of this loop): statements that need no answer in
 * between go as one simple-query message (ji_pg_script) whose results come
 * back together. Without a key a request waits for PostgreSQL three times:
 * the opening, COPY's end, the counts with COMMIT (dead letters add two).
 * Values in these messages are numbers or literals escaped by libpq.
 *
 * CLAIM (idempotency.c) bounds the transaction's lock waits (lock_timeout)
 * and, with an Idempotency-Key, tries the key's lock without waiting (a key
 * whose first request still runs: 409 at once) and looks the key up. A key
 * committed earlier is replayed: the transaction rolls back, the connection
 * goes back to the pool, the body is only hashed, and at its end the digest
 * decides (same: the kept answer, byte for byte; different: 422).
 *
 * DEAD_LETTERS (skip mode, when a record was rejected): a second COPY, into
 * rejected_records, fed from the request's spool (dead_letters.h) in slices
 * of the COPY buffer, with the same backpressure as the users COPY.
 *
 * Before its COPY takes any user_id, an ingest takes the export horizon's
 * lock naming its lower bound (export.h): exports return only rows below the
 * bound of every ingest in flight.
 *
 * A failed request's connection is rolled back in the background and goes
 * back to the pool (the answer does not wait), except while it holds an
 * Idempotency-Key's lock: then the answer waits for the ROLLBACK, so that the
 * key is free when the client learns of the failure. PostgreSQL's own
 * messages go to stderr, never into an answer.
 *
 * Appends to a resumable upload take their own path (see "appends to a
 * resumable upload" below and docs/resumable.md): the upload's lock and row
 * first, their rows staged in upload_rows, and at the end either the
 * upload's offset moved (204) or every staged row moved into users (200).
 */
#include "ingest_internal.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dead_letters.h"
#include "export.h"
#include "row_encoder.h"
#include "schema.h"

/** An append's rows and dead letters: staged with the upload's id (the same text columns as users' and
 * rejected_records', the line where a users row has its batch_id). */
#define COPY_UPLOAD_ROWS_SQL                                                                                           \
    "COPY upload_rows (upload_id, line, name, email, image_path, image_type, image_size) FROM STDIN"
#define COPY_UPLOAD_REJECTED_SQL "COPY upload_rejected (upload_id, line, error, field, record, truncated) FROM STDIN"

static void send_takeover(ji_ingest_t *in);
static void on_copy_start(ji_pg_t *pg, void *ctx, PGresult *res, const char *err);

/** SQLSTATE of a lock not granted within lock_timeout. */
#define JI_SQLSTATE_LOCK_NOT_AVAILABLE "55P03"

/* ------------------------------------------------------------------ failure */

void ji_ingest_tx_release(ji_ingest_t *in)
{
    if (in->pg != NULL) {
        ji_pg_pool_put_rollback(in->env->pg_pool, in->pg, "jsonl-ingest: the request failed");
        in->pg = NULL;
    }
}

/** The line the request has reached (0 before the first). */
static uint64_t current_line(const ji_ingest_t *in)
{
    return in->record_mode ? in->inserted + in->skipped : ji_splitter_line(&in->splitter);
}

void ji_ingest_tx_fail(ji_ingest_t *in, const char *what, const PGresult *res, const char *why)
{
    const char *sqlstate = res != NULL ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    /* a server that answered with an error is not "unavailable": only a lost or refused connection is */
    bool lost = in->pg == NULL || PQstatus(ji_pg_conn(in->pg)) != CONNECTION_OK;
    ji_error_t err;

    if (in->state == ST_DONE || in->state == ST_FAILED)
        return;
    fprintf(stderr, "ingest %s: line %" PRIu64 ": %s: %s\n", in->batch_key, current_line(in), what,
            why != NULL && why[0] != '\0' ? why : "(no message)");
    if (lost)
        ji_error_set(&err, JI_ERR_DB, 0, NULL, "database unavailable: %s", what);
    else if (sqlstate != NULL && strcmp(sqlstate, JI_SQLSTATE_LOCK_NOT_AVAILABLE) == 0)
        ji_error_set(&err, JI_ERR_BUSY, 0, NULL,
                     "database busy: %s (a lock was not granted within JI_PG_LOCK_TIMEOUT_MS, " JI_STR(
                         JI_PG_LOCK_TIMEOUT_MS) " ms)",
                     what);
    else
        ji_error_set(&err, JI_ERR_INTERNAL, 0, NULL, "database error: %s", what);
    ji_ingest_abort(in, &err);
}

/** The key is free again: the connection goes back (or is rolled back in the background), the answer goes out. */
static void on_key_unlocked(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    (void)res;
    (void)err;
    if (!in->unlock_rolled_back && PQstatus(ji_pg_conn(pg)) == CONNECTION_OK &&
        PQtransactionStatus(ji_pg_conn(pg)) != PQTRANS_IDLE) {
        /* the COPY ended with its error: now the transaction */
        in->unlock_rolled_back = true;
        if (ji_pg_query(pg, "ROLLBACK", 0, NULL, on_key_unlocked, in) == 0)
            return;
    }
    ji_ingest_tx_release(in);
    ji_ingest_answer(in);
}

/*
 * A request that holds its Idempotency-Key's lock rolls back before it answers (one or two round trips), so
 * that the key is free when the client learns of the failure: a corrected retry at once does not meet a 409.
 * When no statement can be sent now (one is in flight, or the connection is broken), or without the key's lock,
 * the connection is rolled back in the background like any other and the answer does not wait.
 */
bool ji_ingest_tx_abort(ji_ingest_t *in)
{
    bool waits = false;

    if (in->key_locked && in->pg != NULL) {
        in->key_locked = false;
        ji_pg_set_event_cb(in->pg, NULL, NULL);
        if (in->state_before_failure == ST_STREAMING) {
            waits = ji_pg_copy_end(in->pg, "jsonl-ingest: the request failed", on_key_unlocked, in) == 0;
        } else {
            in->unlock_rolled_back = true;
            waits = ji_pg_query(in->pg, "ROLLBACK", 0, NULL, on_key_unlocked, in) == 0;
        }
    }
    if (!waits)
        ji_ingest_tx_release(in);
    return waits;
}

/* ------------------------------------------------------------------ the answer */

static double elapsed_ms(const ji_ingest_t *in)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - in->started.tv_sec) * 1e3 + (now.tv_nsec - in->started.tv_nsec) / 1e6;
}

/** The success answer, built before COMMIT so that an Idempotency-Key can keep it in the same transaction. */
static void build_answer(ji_ingest_t *in)
{
    ji_text_t *t = &in->answer;

    ji_text_free(t);
    ji_text_printf(t,
                   "{\"inserted\":%" PRIu64 ",\"skipped\":%" PRIu64 ",\"lines\":%" PRIu64 ",\"images\":%" PRIu64
                   ",\"bytes\":%" PRIu64 ",\"batch_id\":%" PRId64 ",\"first_user_id\":%s,\"last_user_id\":%s"
                   ",\"elapsed_ms\":%.1f",
                   in->inserted, in->skipped, ji_ingest_lines(in), in->images_stored, in->bytes, in->batch_id,
                   in->first_id, in->last_id, elapsed_ms(in));
    if (in->skipped > 0)
        ji_text_printf(t, ",\"rejected_url\":\"/batches/%" PRId64 "/rejected\"", in->batch_id);
    else
        ji_text_append(t, H2O_STRLIT(",\"rejected_url\":null"));
    if (in->params.skip_errors) {
        ji_text_append(t, ",\"errors\":[", 11);
        for (size_t i = 0; i < in->nreported; i++) {
            ji_text_printf(t, "%s{\"line\":%" PRIu64 ",\"error\":", i ? "," : "", in->reported[i].line);
            ji_text_json_string(t, in->reported[i].message, strlen(in->reported[i].message));
            if (in->reported[i].field[0] != '\0') {
                ji_text_append(t, ",\"field\":", 9);
                ji_text_json_string(t, in->reported[i].field, strlen(in->reported[i].field));
            }
            ji_text_append(t, "}", 1);
        }
        ji_text_append(t, "]", 1);
    }
    ji_text_append(t, "}\n", 2);
}

uint64_t ji_ingest_lines(const ji_ingest_t *in)
{
    return in->record_mode ? in->inserted + in->skipped : ji_splitter_lines_done(&in->splitter);
}

/** Answers 200 with what in->answer holds. */
static void succeed(ji_ingest_t *in)
{
    in->state = ST_DONE;
    in->status = 200;
    ji_ingest_answer(in);
}

/* ------------------------------------------------------------------ the steps, last to first */

/** TTL of Idempotency-Keys (seconds). */
static unsigned key_ttl(const ji_ingest_t *in)
{
    return in->env->idempotency_ttl_s != 0 ? in->env->idempotency_ttl_s : JI_DEFAULT_IDEMPOTENCY_TTL_S;
}

/**
 * A committed request's connection goes back to the pool; once per sweep interval of this loop it first clears
 * expired Idempotency-Keys, in the background (the answer does not wait).
 */
static void give_back_committed(ji_ingest_t *in)
{
    ji_ingest_env_t *env = in->env;
    uint64_t now = h2o_now(env->loop);
    unsigned ttl = key_ttl(in);
    char sql[JI_SCHEMA_EXPIRE_STATEMENT_CAP];

    if (now >= env->next_key_sweep_ms) {
        env->next_key_sweep_ms =
            now + 1000ull * (ttl < JI_IDEMPOTENCY_SWEEP_INTERVAL_S ? ttl : JI_IDEMPOTENCY_SWEEP_INTERVAL_S);
        ji_schema_expire_keys_statement(sql, sizeof(sql), ttl);
        ji_pg_pool_put_after(env->pg_pool, in->pg, sql);
    } else {
        ji_pg_pool_put(env->pg_pool, in->pg);
    }
    in->pg = NULL;
}

/* ---- the end: the batch's counts and COMMIT, one message when no Idempotency-Key keeps the answer ---- */

/** Appends `s` as an SQL string literal, escaped for the connection's settings (t->failed on failure). */
static void append_literal(ji_text_t *t, ji_pg_t *pg, const char *s)
{
    char *lit = PQescapeLiteral(ji_pg_conn(pg), s, strlen(s));

    if (lit == NULL) {
        t->failed = true;
        return;
    }
    ji_text_append(t, lit, strlen(lit));
    PQfreemem(lit);
}

/** Sends `sql` (several statements, one message) in `state`; a failure to send is the request's failure. */
static void send_script(ji_ingest_t *in, ji_text_t *sql, ingest_state_t state, ji_pg_script_cb cb, const char *what)
{
    ji_error_t e;

    in->state = state;
    if (sql->failed) {
        ji_text_free(sql);
        ji_error_set(&e, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        ji_ingest_abort(in, &e);
        return;
    }
    if (ji_pg_script(in->pg, sql->base, cb, in) != 0)
        ji_ingest_tx_fail(in, what, NULL, ji_pg_error(in->pg));
    ji_text_free(sql);
}

/** The COMMIT is done: the files stay, the connection goes back, the answer (built already) goes out. */
static void committed(ji_ingest_t *in)
{
    ji_image_batch_commit(in->images);
    in->images = NULL;
    give_back_committed(in);
    atomic_fetch_add_explicit(&in->env->stats->ingests_ok, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&in->env->stats->records, in->inserted, memory_order_relaxed);
    atomic_fetch_add_explicit(&in->env->stats->rejected_records, in->skipped, memory_order_relaxed);
    atomic_fetch_add_explicit(&in->env->stats->images, in->images_stored, memory_order_relaxed);
    succeed(in);
}

static void on_append_commit(ji_ingest_t *in);

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

/**
 * A message ending with COMMIT failed: `what` names the statement before COMMIT that failed (n == 0), else COMMIT.
 * A lost connection leaves COMMIT's outcome unknown: the files and their journal stay, gc settles it.
 */
static void commit_failed(ji_ingest_t *in, ji_pg_t *pg, int n, const char *what, const PGresult *failed,
                          const char *err)
{
    if (PQstatus(ji_pg_conn(pg)) != CONNECTION_OK) {
        ji_image_batch_forget(in->images);
        in->images = NULL;
    }
    ji_ingest_tx_fail(in, n == 0 ? what : "COMMIT failed", failed, err);
}

/** The first and last user id of the batch, from the counts' RETURNING. */
static void take_id_range(ji_ingest_t *in, const PGresult *res)
{
    if (res != NULL && PQntuples(res) == 1 && !PQgetisnull(res, 0, 0)) {
        snprintf(in->first_id, sizeof(in->first_id), "%s", PQgetvalue(res, 0, 0));
        snprintf(in->last_id, sizeof(in->last_id), "%s", PQgetvalue(res, 0, 1));
    }
}

/** Without a key: results of "counts; COMMIT". */
static void on_counts_committed(ji_pg_t *pg, void *ctx, PGresult *const *results, int n, PGresult *failed,
                                const char *err)
{
    ji_ingest_t *in = ctx;

    if (err != NULL) {
        commit_failed(in, pg, n, "keeping the batch's counts failed", failed, err);
        return;
    }
    take_id_range(in, results[0]);
    build_answer(in);
    committed(in);
}

/** With a key: results of "keep the answer; COMMIT". */
static void on_answer_committed(ji_pg_t *pg, void *ctx, PGresult *const *results, int n, PGresult *failed,
                                const char *err)
{
    ji_ingest_t *in = ctx;

    (void)results;
    if (err != NULL) {
        commit_failed(in, pg, n, "keeping the answer of the Idempotency-Key failed", failed, err);
        return;
    }
    committed(in);
}

/**
 * The batch's counts (GET /batches) and the first and last user id of the answer, both ids from one scan of the
 * batch's index entries: "OFFSET 0" keeps the planner from its min/max rewrite, which walks the primary key from the
 * first user_id and filters on batch_id, i.e. every older row before the newest batch's first one (an upload
 * then cost time in proportion to the whole table: 17 ms at 180,000 rows).
 */
static void append_counts_statement(ji_ingest_t *in, ji_text_t *sql)
{
    ji_text_printf(sql,
                   "UPDATE batches SET inserted = %" PRIu64 ", skipped = %" PRIu64 ", lines = %" PRIu64
                   ", images = %" PRIu64 ", bytes = %" PRIu64
                   " FROM (SELECT min(b.user_id) AS first_id, max(b.user_id) AS last_id FROM (SELECT user_id FROM "
                   "users WHERE batch_id = %" PRId64 " OFFSET 0) b) ids WHERE batch_id = %" PRId64
                   " RETURNING ids.first_id, ids.last_id",
                   in->inserted, in->skipped, ji_ingest_lines(in), in->images_stored, in->bytes, in->batch_id,
                   in->batch_id);
}

/** With a key: the counts' ids are in; the answer is built and kept with the key, then COMMIT, in one message. */
static void on_summary(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;
    ji_text_t sql = {0};
    const char *digest;
    ji_error_t e;

    if (err != NULL) {
        ji_ingest_tx_fail(in, "keeping the batch's counts failed", res, err);
        return;
    }
    take_id_range(in, res);
    build_answer(in);
    if ((digest = ji_request_digest_hex(in->digest)) == NULL) {
        ji_error_set(&e, JI_ERR_INTERNAL, 0, NULL, "computing the request digest failed");
        ji_ingest_abort(in, &e);
        return;
    }
    ji_text_append(&sql, H2O_STRLIT("UPDATE batches SET response = "));
    append_literal(&sql, pg, in->answer.base);
    ji_text_printf(&sql, ", request_digest = decode('%s', 'hex') WHERE batch_id = %" PRId64 "; COMMIT", digest,
                   in->batch_id);
    send_script(in, &sql, ST_COMMIT, on_answer_committed, "keeping the answer of the Idempotency-Key failed");
}

/**
 * The batch keeps its counts. Without an Idempotency-Key, COMMIT goes in the same message (the answer is built
 * from its results once COMMIT is done); with one, the answer must be kept before COMMIT, so the counts go first.
 */
static void send_summary(ji_ingest_t *in)
{
    ji_text_t sql = {0};

    append_counts_statement(in, &sql);
    if (in->keyed) {
        in->state = ST_SUMMARY;
        if (!sql.failed && ji_pg_query(in->pg, sql.base, 0, NULL, on_summary, in) == 0) {
            ji_text_free(&sql);
            return;
        }
        ji_text_free(&sql);
        ji_ingest_tx_fail(in, "sending the summary query failed", NULL, ji_pg_error(in->pg));
        return;
    }
    ji_text_append(&sql, H2O_STRLIT("; COMMIT"));
    send_script(in, &sql, ST_COMMIT, on_counts_committed, "sending the summary and COMMIT failed");
}

/* ---- dead letters: the rejected records, from the spool into rejected_records ---- */

/** Bytes of dead-letter rows one step sends before it lets the loop run (then it goes on from a zero timeout). */
#define DEAD_LETTER_STEP_BYTES (16u * JI_COPY_BUFFER_BYTES)

static void on_dead_letters_end(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    (void)pg;
    if (err != NULL) {
        ji_ingest_tx_fail(in, "keeping the rejected records failed", res, err);
        return;
    }
    if (in->append)
        ji_ingest_tx_end_append(in);
    else
        send_summary(in);
}

/** Sends dead-letter rows until the connection backs up, the step's share is sent, or the spool is done. */
static void send_dead_letters(ji_ingest_t *in)
{
    size_t sent = 0;
    ji_error_t e;

    while (sent < DEAD_LETTER_STEP_BYTES) {
        ptrdiff_t n = ji_dead_letters_copy_rows(in->dead, in->append ? in->upload_id : in->batch_id, in->copy_buf,
                                                JI_COPY_BUFFER_BYTES + JI_COPY_BUFFER_SLACK, &e);
        int r;
        if (n < 0) {
            ji_ingest_abort(in, &e);
            return;
        }
        if (n == 0) {
            ji_pg_set_event_cb(in->pg, NULL, NULL);
            if (ji_pg_copy_end(in->pg, NULL, on_dead_letters_end, in) != 0)
                ji_ingest_tx_fail(in, "ending the COPY of the rejected records failed", NULL, ji_pg_error(in->pg));
            return;
        }
        if ((r = ji_pg_copy_put(in->pg, in->copy_buf, (size_t)n)) < 0) {
            ji_ingest_tx_fail(in, "connection lost during the COPY of the rejected records", NULL, ji_pg_error(in->pg));
            return;
        }
        if (r == 1)
            return; /* the drain event comes back here */
        sent += (size_t)n;
    }
    h2o_timeout_link(in->env->loop, in->env->zero_timeout, &in->tx_step);
}

static void on_dead_letters_step(h2o_timeout_entry_t *entry)
{
    send_dead_letters(JI_CONTAINER_OF(entry, ji_ingest_t, tx_step));
}

static void on_dead_letters_event(ji_pg_t *pg, void *ctx, const char *err)
{
    ji_ingest_t *in = ctx;

    (void)pg;
    if (err != NULL) {
        ji_ingest_tx_fail(in, "connection lost during the COPY of the rejected records", NULL, err);
        return;
    }
    if (!h2o_timeout_is_linked(&in->tx_step))
        send_dead_letters(in);
}

static void on_dead_letters_start(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    if (err != NULL) {
        ji_ingest_tx_fail(in, "starting the COPY of the rejected records failed", res, err);
        return;
    }
    in->tx_step.cb = on_dead_letters_step;
    ji_pg_set_event_cb(pg, on_dead_letters_event, in);
    send_dead_letters(in);
}

static void on_copy_end(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;
    ji_error_t e;

    if (err != NULL) {
        ji_ingest_tx_fail(in, "COPY failed", res, err);
        return;
    }
    if (ji_image_batch_sync(in->images, &e) != 0) {
        ji_ingest_abort(in, &e);
        return;
    }
    if (in->dead == NULL || ji_dead_letters_count(in->dead) == 0) {
        if (in->append)
            ji_ingest_tx_end_append(in);
        else
            send_summary(in);
        return;
    }
    in->state = ST_DEAD_LETTERS;
    if (ji_pg_query(pg, in->append ? COPY_UPLOAD_REJECTED_SQL : JI_COPY_REJECTED_SQL, 0, NULL, on_dead_letters_start,
                    in) != 0)
        ji_ingest_tx_fail(in, "starting the COPY of the rejected records failed", NULL, ji_pg_error(pg));
}

/** COPY can take rows: the last ones when the body ended, else the owner's next bytes. */
static void go_on_streaming(ji_ingest_t *in)
{
    if (in->ended)
        ji_ingest_finish_rows(in);
    else
        ji_ingest_resume_owner(in);
}

static void on_pg_event(ji_pg_t *pg, void *ctx, const char *err)
{
    ji_ingest_t *in = ctx;

    (void)pg;
    if (err != NULL) {
        ji_ingest_tx_fail(in, "connection lost during COPY", NULL, err);
        return;
    }
    in->paused = false;
    if (in->state == ST_STREAMING)
        go_on_streaming(in);
}

/** An append's COPY into upload_rows started: the body streams. */
static void on_copy_start(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    if (err != NULL) {
        ji_ingest_tx_fail(in, "starting COPY failed", res, err);
        return;
    }
    in->state = ST_STREAMING;
    ji_pg_set_event_cb(pg, on_pg_event, in);
    go_on_streaming(in);
}

/* ---- the opening: one message from the transaction's start to COPY IN ---- */

/** What each statement of the opening message does, for a failure's message (index: the statement). */
static const char *const OPENING_STEPS[] = {
    "BEGIN failed",
    "starting the transaction failed",
    "creating the batch failed",
    "taking the export horizon lock failed",
    "starting COPY failed",
};
#define OPENING_STATEMENTS (sizeof(OPENING_STEPS) / sizeof(OPENING_STEPS[0]))
/** The statement of OPENING_STEPS that creates the batch row. */
#define OPENING_BATCH 2

/**
 * The opening message: BEGIN; lock_timeout (no lock wait of the transaction outlasts it); the batch row; the
 * export horizon's lock, before the COPY takes any user_id (the lock names the batch's lower bound, export.h);
 * COPY's start, last (a COPY IN ends a message's run). One round trip instead of five. With an Idempotency-Key
 * the transaction began in ji_idempotency_claim, which also set lock_timeout: the message starts at the batch
 * row, which then leaves the key to a concurrent older version that does not take the key's lock (ON CONFLICT).
 * Returns the index in OPENING_STEPS of the message's first statement.
 */
static size_t build_opening(ji_ingest_t *in, ji_text_t *sql)
{
    size_t first = in->keyed ? OPENING_BATCH : 0;

    if (!in->keyed)
        ji_text_append(sql, H2O_STRLIT("BEGIN; SELECT set_config('lock_timeout', '" JI_STR(
                                JI_PG_LOCK_TIMEOUT_MS) "', true); "));
    ji_text_append(sql, H2O_STRLIT("INSERT INTO batches (batch_key"));
    ji_text_append(sql, in->keyed ? ", idempotency_key) VALUES (" : ") VALUES (", in->keyed ? 27 : 10);
    append_literal(sql, in->pg, in->batch_key);
    if (in->keyed) {
        ji_text_append(sql, ", ", 2);
        append_literal(sql, in->pg, in->key);
        ji_text_append(sql, H2O_STRLIT(") ON CONFLICT (idempotency_key) DO NOTHING"));
    } else {
        ji_text_append(sql, ")", 1);
    }
    ji_text_append(sql, H2O_STRLIT(" RETURNING batch_id; " JI_EXPORT_HORIZON_LOCK_SQL "; " JI_COPY_USERS_SQL));
    return first;
}

static void on_opened(ji_pg_t *pg, void *ctx, PGresult *const *results, int n, PGresult *failed, const char *err)
{
    ji_ingest_t *in = ctx;
    size_t first = in->keyed ? OPENING_BATCH : 0, step = first + (size_t)n;
    const PGresult *batch;
    ji_error_t e;

    if (err != NULL) {
        ji_ingest_tx_fail(in, OPENING_STEPS[step < OPENING_STATEMENTS ? step : OPENING_STATEMENTS - 1], failed, err);
        return;
    }
    /* the connection is in COPY IN: a failure from here ends the COPY first */
    in->state = ST_STREAMING;
    batch = (size_t)n == OPENING_STATEMENTS - first ? results[OPENING_BATCH - first] : NULL;
    if (batch == NULL || PQnfields(batch) != 1) {
        ji_ingest_tx_fail(in, "creating the batch failed", NULL, "unexpected results of the opening statements");
        return;
    }
    if (PQntuples(batch) == 0) {
        /* ON CONFLICT: the key was taken by someone who does not take its advisory lock (an older version) */
        ji_error_set(&e, JI_ERR_CONFLICT, 0, NULL, "a request with this Idempotency-Key is in progress: retry later");
        ji_ingest_abort(in, &e);
        return;
    }
    snprintf(in->batch_id_text, sizeof(in->batch_id_text), "%s", PQgetvalue(batch, 0, 0));
    in->batch_id = strtoll(in->batch_id_text, NULL, 10);
    ji_pg_set_event_cb(pg, on_pg_event, in);
    go_on_streaming(in);
}

static void send_opening(ji_ingest_t *in)
{
    ji_text_t sql = {0};
    size_t first = build_opening(in, &sql);

    send_script(in, &sql, ST_BATCH, on_opened, OPENING_STEPS[first]);
}

/** Every body byte was hashed: the same content gets the kept answer, other content 422. */
/* ---- replay: the key committed with an earlier request ---- */

void ji_ingest_tx_end_replay(ji_ingest_t *in)
{
    const char *digest = ji_request_digest_hex(in->digest);
    ji_error_t e;

    if (digest == NULL) {
        ji_error_set(&e, JI_ERR_INTERNAL, 0, NULL, "computing the request digest failed");
        ji_ingest_abort(in, &e);
        return;
    }
    if (in->replay_digest[0] != '\0' && strcmp(digest, in->replay_digest) != 0) {
        ji_error_set(&e, JI_ERR_INVALID, 0, NULL,
                     "this Idempotency-Key was already used with a different request body: use a new key for a new "
                     "request");
        ji_ingest_abort(in, &e);
        return;
    }
    in->replayed = true;
    succeed(in);
}

static void on_replay_unlocked(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    (void)pg;
    if (err != NULL) {
        ji_ingest_tx_fail(in, "ROLLBACK failed", res, err);
        return;
    }
    ji_pg_pool_put(in->env->pg_pool, in->pg);
    in->pg = NULL;
    in->state = ST_REPLAY;
    if (in->ended)
        ji_ingest_tx_end_replay(in);
    else
        ji_ingest_resume_owner(in);
}

/** Keeps the first answer and its digest, gives the connection back, and lets the owner send the body. */
static void start_replay(ji_ingest_t *in, const ji_key_claim_t *claim)
{
    ji_error_t e;

    if (claim->answer == NULL) {
        ji_error_set(&e, JI_ERR_INTERNAL, 0, NULL, "the Idempotency-Key is taken but has no answer");
        ji_ingest_abort(in, &e);
        return;
    }
    ji_text_free(&in->answer);
    ji_text_append(&in->answer, claim->answer, claim->answer_len);
    /* a key kept before digests existed is replayed whatever the body */
    snprintf(in->replay_digest, sizeof(in->replay_digest), "%s", claim->digest != NULL ? claim->digest : "");
    if (in->answer.failed) {
        ji_error_set(&e, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        ji_ingest_abort(in, &e);
        return;
    }
    ji_image_batch_abort(in->images);
    in->images = NULL;
    /* nothing was written: roll back (the key's lock with it) before the body is read, so that the answer never
     * comes before the key is free */
    in->key_locked = false;
    if (ji_pg_query(in->pg, "ROLLBACK", 0, NULL, on_replay_unlocked, in) != 0)
        ji_ingest_tx_fail(in, "ROLLBACK failed", NULL, ji_pg_error(in->pg));
}

/* ---- the start ---- */

/* ---- the key's claim: one switch over its outcome, for a POST and for an upload's final commit ---- */

/**
 * What a request does with each outcome of its key's claim: go on (the key is free), answer from the kept answer
 * (the key committed earlier), or 409 with `running` (the key's first request still runs: never wait for it).
 */
typedef struct {
    void (*free)(ji_ingest_t *in);
    void (*committed)(ji_ingest_t *in, const ji_key_claim_t *claim);
    const char *running;
} key_claim_steps_t;

static void settle_key_claim(ji_ingest_t *in, const ji_key_claim_t *claim, const key_claim_steps_t *steps)
{
    ji_error_t e;

    in->key_locked = claim->locked;
    switch (claim->found) {
    case JI_KEY_FREE:
        steps->free(in);
        return;
    case JI_KEY_COMMITTED:
        steps->committed(in, claim);
        return;
    case JI_KEY_RUNNING:
        /* its first request holds the key's lock until it commits or rolls back */
        ji_error_set(&e, JI_ERR_CONFLICT, 0, NULL, "%s", steps->running);
        ji_ingest_abort(in, &e);
        return;
    case JI_KEY_FAILED:
        ji_ingest_tx_fail(in, claim->what, claim->res, claim->err);
        return;
    }
}

static const key_claim_steps_t POST_KEY_STEPS = {
    .free = send_opening,
    .committed = start_replay,
    .running = "a request with this Idempotency-Key is still in progress: retry once it has finished",
};

static void on_key_claimed(ji_key_claim_t *claim, ji_pg_t *pg, void *ctx)
{
    (void)pg;
    settle_key_claim(ctx, claim, &POST_KEY_STEPS);
}

static void on_begin(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    if (err != NULL) {
        ji_ingest_tx_fail(in, "BEGIN failed", res, err);
        return;
    }
    if (in->append) {
        send_takeover(in);
        return;
    }
    in->state = ST_CLAIM;
    if (ji_idempotency_claim(&in->claim, pg, in->keyed ? in->key : NULL, key_ttl(in), on_key_claimed, in) != 0)
        ji_ingest_tx_fail(in, "starting the transaction failed", NULL, ji_pg_error(pg));
}

static void on_connected(ji_pg_t *pg, void *ctx, const char *err)
{
    ji_ingest_t *in = ctx;

    if (err != NULL) {
        ji_ingest_tx_fail(in, "connecting failed", NULL, err);
        return;
    }
    if (!in->keyed && !in->append) {
        send_opening(in);
        return;
    }
    /* with a key: BEGIN, the key claimed (ji_idempotency_claim), then the opening; an append: BEGIN, then the
     * upload's lock and row (the key, if any, is the upload's, claimed at its final commit) */
    in->state = ST_BEGIN;
    if (ji_pg_query(pg, "BEGIN", 0, NULL, on_begin, in) != 0)
        ji_ingest_tx_fail(in, "BEGIN failed", NULL, ji_pg_error(pg));
}

/* ------------------------------------------------------------------ entry points */

int ji_ingest_tx_start(ji_ingest_t *in)
{
    in->state = ST_CONNECTING;
    return (in->pg = ji_pg_pool_get(in->env->pg_pool, on_connected, in)) != NULL ? 0 : -1;
}

void ji_ingest_tx_end_copy(ji_ingest_t *in)
{
    in->state = ST_COPY_END;
    ji_pg_set_event_cb(in->pg, NULL, NULL);
    if (ji_pg_copy_end(in->pg, NULL, on_copy_end, in) != 0)
        ji_ingest_tx_fail(in, "ending COPY failed", NULL, ji_pg_error(in->pg));
}

/* ------------------------------------------------------------------ appends to a resumable upload */

/*
 * BEGIN -> UP_TAKEOVER (the row by its token; lock_timeout; every other holder of the upload lock terminated)
 *   -> UP_LOCK (the lock, the row FOR UPDATE: the newest committed version, whatever the snapshot)
 *   -> COPY upload_rows -> STREAMING -> COPY_END -> [DEAD_LETTERS into upload_rejected]
 *   -> not completing: UP_CLOSE (offset, counts, expiry) -> COMMIT: 204
 *   -> completing: [UP_ERRORS] -> [UP_KEY] -> UP_BATCH (batch + export horizon) -> UP_MOVE (staged rows into
 *      users, ORDER BY line; dead letters into rejected_records; staging deleted) -> UP_CLOSE -> COMMIT: 200
 */

static unsigned upload_expiry(const ji_ingest_t *in)
{
    return in->env->upload_expiry_s != 0 ? in->env->upload_expiry_s : JI_DEFAULT_UPLOAD_EXPIRY_S;
}

/** Refuses the append before anything of it was kept: `status` may differ from the kind's (410). */
static void refuse_append(ji_ingest_t *in, ji_error_kind_t kind, int status, uint64_t offset, const char *message)
{
    ji_error_t e;

    ji_error_set(&e, kind, 0, NULL, "%s", message);
    in->result_offset = offset;
    ji_ingest_abort(in, &e);
    in->status = status;
}

/** The rows of this append go to upload_rows from here on. */
static void start_append_copy(ji_ingest_t *in)
{
    ji_error_t e;

    if ((in->images = ji_image_batch_begin_append(in->env->images, in->upload_key, in->seq, &e)) == NULL) {
        ji_ingest_abort(in, &e);
        return;
    }
    if (in->params.skip_errors && (in->dead = ji_dead_letters_new(in->env->images->pending_fd)) == NULL) {
        ji_error_set(&e, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        ji_ingest_abort(in, &e);
        return;
    }
    in->state = ST_COPY_START;
    if (ji_pg_query(in->pg, COPY_UPLOAD_ROWS_SQL, 0, NULL, on_copy_start, in) != 0)
        ji_ingest_tx_fail(in, "sending COPY failed", NULL, ji_pg_error(in->pg));
}

static int64_t field_int(const PGresult *res, int col, int64_t null_value)
{
    return PQgetisnull(res, 0, col) ? null_value : strtoll(PQgetvalue(res, 0, col), NULL, 10);
}

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
};

static void on_upload_row(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;
    const char *state;
    uint64_t offset;

    (void)pg;
    if (err != NULL) {
        ji_ingest_tx_fail(in, "locking the upload failed", res, err);
        return;
    }
    if (PQntuples(res) != 1) {
        refuse_append(in, JI_ERR_NOT_FOUND, 404, 0, "no such upload");
        return;
    }
    state = PQgetvalue(res, 0, ROW_STATE);
    offset = (uint64_t)field_int(res, ROW_OFFSET, 0);
    if (strcmp(state, "committed") == 0) {
        refuse_append(in, JI_ERR_CONFLICT, 409, offset, "the upload is complete already");
        return;
    }
    if (strcmp(state, "open") != 0) {
        refuse_append(in, JI_ERR_NOT_FOUND, 410, offset, "the upload ended (failed or cancelled)");
        return;
    }
    if (PQgetvalue(res, 0, ROW_EXPIRED)[0] == 't') {
        refuse_append(in, JI_ERR_NOT_FOUND, 404, 0, "no such upload (it expired)");
        return;
    }
    if (offset != in->app.offset) {
        refuse_append(in, JI_ERR_CONFLICT, 409, offset, "Upload-Offset is not the upload's offset");
        return;
    }
    in->length = field_int(res, ROW_LENGTH, -1);
    if (in->app.length >= 0) {
        if (in->length >= 0 && in->length != in->app.length) {
            refuse_append(in, JI_ERR_TOO_LARGE, 413, offset, "Upload-Length differs from the upload's length");
            return;
        }
        in->length = in->app.length;
    }
    if (in->length >= 0 && ((uint64_t)in->length < offset || (uint64_t)in->length > in->max_upload)) {
        refuse_append(in, JI_ERR_TOO_LARGE, 413, offset,
                      (uint64_t)in->length < offset ? "Upload-Length is below the upload's offset"
                                                    : "Upload-Length is over --max-upload-bytes");
        return;
    }
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
    start_append_copy(in);
}

static void on_taken_over(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;
    const char *params[1] = {in->upload_id_text};

    if (err != NULL) {
        ji_ingest_tx_fail(in, "finding the upload failed", res, err);
        return;
    }
    if (PQntuples(res) != 1) {
        refuse_append(in, JI_ERR_NOT_FOUND, 404, 0, "no such upload");
        return;
    }
    snprintf(in->upload_id_text, sizeof(in->upload_id_text), "%s", PQgetvalue(res, 0, 0));
    in->upload_id = strtoll(in->upload_id_text, NULL, 10);
    in->state = ST_UP_LOCK;
    /* FOR UPDATE reads the newest committed version of the row, even one committed after this statement began */
    if (ji_pg_query(pg,
                    "SELECT " JI_UPLOAD_LOCK_SQL(
                        "$1::bigint") ", state, expires_at <= now(), length, upload_offset, "
                                      "lines, inserted, skipped, images, appends, skip_errors, "
                                      "max_errors, idempotency_key, batch_key FROM uploads "
                                      "WHERE upload_id = $1::bigint FOR UPDATE",
                    1, params, on_upload_row, in) != 0)
        ji_ingest_tx_fail(in, "locking the upload failed", NULL, ji_pg_error(pg));
}

static void send_takeover(ji_ingest_t *in)
{
    const char *params[2] = {in->app.token, JI_STR(JI_PG_LOCK_TIMEOUT_MS)};

    in->state = ST_UP_TAKEOVER;
    if (ji_pg_query(in->pg,
                    "SELECT u.upload_id, set_config('lock_timeout', $2, true), " JI_UPLOAD_TERMINATE_SQL(
                        "u.upload_id") " FROM uploads u WHERE u.token = $1",
                    2, params, on_taken_over, in) != 0)
        ji_ingest_tx_fail(in, "finding the upload failed", NULL, ji_pg_error(in->pg));
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

    in->result_offset = in->start_offset + in->fed_to_newline;
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
    build_answer(in);
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

static const key_claim_steps_t FINAL_KEY_STEPS = {
    .free = send_final_batch,
    .committed = send_final_replay,
    .running = "a request with this upload's Idempotency-Key is still in progress: retry once it has finished",
};

static void on_final_key(ji_key_claim_t *claim, ji_pg_t *pg, void *ctx)
{
    (void)pg;
    settle_key_claim(ctx, claim, &FINAL_KEY_STEPS);
}

static void send_final(ji_ingest_t *in)
{
    if (!in->keyed) {
        send_final_batch(in);
        return;
    }
    in->state = ST_UP_KEY;
    if (ji_idempotency_claim(&in->claim, in->pg, in->key, key_ttl(in), on_final_key, in) != 0)
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

/** COMMIT of an append went through. */
static void on_append_commit(ji_ingest_t *in)
{
    ji_error_t e;
    uint64_t removed = 0;

    if (!in->completing) {
        /* the files belong to staged rows: files and journal stay until the upload ends */
        ji_image_batch_forget(in->images);
        in->images = NULL;
        give_back_committed(in);
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
    give_back_committed(in);
    atomic_fetch_add_explicit(&in->env->stats->ingests_ok, 1, memory_order_relaxed);
    succeed(in);
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
