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
 * Appends to a resumable upload share the connection, the COPY's end, the
 * dead letters (into upload_rejected), failure and the key's claim with a
 * POST; their own steps (the upload's lock and row, the staging, the final
 * commit, fail mode) are in ingest_append.c.
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

void ji_ingest_tx_build_answer(ji_ingest_t *in)
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

void ji_ingest_tx_succeed(ji_ingest_t *in)
{
    in->state = ST_DONE;
    in->status = 200;
    ji_ingest_answer(in);
}

/* ------------------------------------------------------------------ the steps, last to first */

unsigned ji_ingest_tx_key_ttl(const ji_ingest_t *in)
{
    return in->env->idempotency_ttl_s != 0 ? in->env->idempotency_ttl_s : JI_DEFAULT_IDEMPOTENCY_TTL_S;
}

void ji_ingest_tx_give_back(ji_ingest_t *in)
{
    ji_ingest_env_t *env = in->env;
    uint64_t now = h2o_now(env->loop);
    unsigned ttl = ji_ingest_tx_key_ttl(in);
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

void ji_ingest_tx_send_script(ji_ingest_t *in, ji_text_t *sql, ingest_state_t state, ji_pg_script_cb cb,
                              const char *what)
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
    ji_ingest_tx_give_back(in);
    atomic_fetch_add_explicit(&in->env->stats->ingests_ok, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&in->env->stats->records, in->inserted, memory_order_relaxed);
    atomic_fetch_add_explicit(&in->env->stats->rejected_records, in->skipped, memory_order_relaxed);
    atomic_fetch_add_explicit(&in->env->stats->images, in->images_stored, memory_order_relaxed);
    ji_ingest_tx_succeed(in);
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
    ji_ingest_tx_build_answer(in);
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
 * Rows from which the first user id is found walking the primary key from the export horizon's bound rather than
 * scanning the batch's own index entries: the walk reads the ids that concurrent uploads took in between (a heap
 * fetch each), the scan every row of the batch, so the walk wins only for big batches.
 */
#define ID_WALK_MIN_ROWS 4096

/**
 * The batch's counts (GET /batches) and the first and last user id of the answer. The COPY took its ids in line
 * order from the sequence. A batch of fewer than ID_WALK_MIN_ROWS rows reads both ids with one scan of its index
 * entries, fenced by "OFFSET 0" from the min/max rewrite that walks the primary key from the table's first row.
 * A bigger one takes its last id from the session's currval and its first from a walk of the primary key from the
 * opening's horizon bound (every id of the batch is at least that bound): a 300,000-row batch no longer reads all
 * its rows again at its end (50-100 ms).
 */
static void append_counts_statement(ji_ingest_t *in, ji_text_t *sql)
{
    ji_text_printf(sql,
                   "UPDATE batches SET inserted = %" PRIu64 ", skipped = %" PRIu64 ", lines = %" PRIu64
                   ", images = %" PRIu64 ", bytes = %" PRIu64,
                   in->inserted, in->skipped, ji_ingest_lines(in), in->images_stored, in->bytes);
    if (in->inserted == 0)
        ji_text_printf(sql, " WHERE batch_id = %" PRId64 " RETURNING NULL::bigint, NULL::bigint", in->batch_id);
    else if (in->inserted >= ID_WALK_MIN_ROWS && in->id_floor > 0)
        ji_text_printf(sql,
                       " WHERE batch_id = %" PRId64
                       " RETURNING (SELECT min(user_id) FROM users WHERE user_id >= %" PRId64 " AND batch_id = %" PRId64
                       "), currval(pg_get_serial_sequence('users', 'user_id'))",
                       in->batch_id, in->id_floor, in->batch_id);
    else
        ji_text_printf(sql,
                       " FROM (SELECT min(b.user_id) AS first_id, max(b.user_id) AS last_id FROM (SELECT user_id FROM "
                       "users WHERE batch_id = %" PRId64 " OFFSET 0) b) ids WHERE batch_id = %" PRId64
                       " RETURNING ids.first_id, ids.last_id",
                       in->batch_id, in->batch_id);
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
    ji_ingest_tx_build_answer(in);
    if ((digest = ji_request_digest_hex(in->digest)) == NULL) {
        ji_error_set(&e, JI_ERR_INTERNAL, 0, NULL, "computing the request digest failed");
        ji_ingest_abort(in, &e);
        return;
    }
    ji_text_append(&sql, H2O_STRLIT("UPDATE batches SET response = "));
    append_literal(&sql, pg, in->answer.base);
    ji_text_printf(&sql, ", request_digest = decode('%s', 'hex') WHERE batch_id = %" PRId64 "; COMMIT", digest,
                   in->batch_id);
    ji_ingest_tx_send_script(in, &sql, ST_COMMIT, on_answer_committed,
                             "keeping the answer of the Idempotency-Key failed");
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
    ji_ingest_tx_send_script(in, &sql, ST_COMMIT, on_counts_committed, "sending the summary and COMMIT failed");
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
    if (ji_pg_query(pg, in->append ? JI_COPY_UPLOAD_REJECTED_SQL : JI_COPY_REJECTED_SQL, 0, NULL, on_dead_letters_start,
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

void ji_ingest_tx_stream(ji_ingest_t *in)
{
    in->state = ST_STREAMING;
    ji_pg_set_event_cb(in->pg, on_pg_event, in);
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
    const PGresult *batch, *horizon;
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
    horizon = results[OPENING_BATCH + 1 - first];
    if (PQntuples(horizon) == 1 && PQnfields(horizon) >= 1 && !PQgetisnull(horizon, 0, 0))
        in->id_floor = strtoll(PQgetvalue(horizon, 0, 0), NULL, 10);
    ji_pg_set_event_cb(pg, on_pg_event, in);
    go_on_streaming(in);
}

static void send_opening(ji_ingest_t *in)
{
    ji_text_t sql = {0};
    size_t first = build_opening(in, &sql);

    ji_ingest_tx_send_script(in, &sql, ST_BATCH, on_opened, OPENING_STEPS[first]);
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
    ji_ingest_tx_succeed(in);
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

void ji_ingest_tx_settle_claim(ji_ingest_t *in, const ji_key_claim_t *claim, const ji_key_claim_steps_t *steps)
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

static const ji_key_claim_steps_t POST_KEY_STEPS = {
    .free = send_opening,
    .committed = start_replay,
    .running = "a request with this Idempotency-Key is still in progress: retry once it has finished",
};

static void on_key_claimed(ji_key_claim_t *claim, ji_pg_t *pg, void *ctx)
{
    (void)pg;
    ji_ingest_tx_settle_claim(ctx, claim, &POST_KEY_STEPS);
}

static void on_begin(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    if (err != NULL) {
        ji_ingest_tx_fail(in, "BEGIN failed", res, err);
        return;
    }
    in->state = ST_CLAIM;
    if (ji_idempotency_claim(&in->claim, pg, in->keyed ? in->key : NULL, ji_ingest_tx_key_ttl(in), on_key_claimed,
                             in) != 0)
        ji_ingest_tx_fail(in, "starting the transaction failed", NULL, ji_pg_error(pg));
}

static void on_connected(ji_pg_t *pg, void *ctx, const char *err)
{
    ji_ingest_t *in = ctx;

    if (err != NULL) {
        ji_ingest_tx_fail(in, "connecting failed", NULL, err);
        return;
    }
    if (in->append) {
        /* its own opening (the key, if any, is the upload's, claimed at its final commit) */
        ji_ingest_append_open(in);
        return;
    }
    if (!in->keyed) {
        send_opening(in);
        return;
    }
    /* with a key: BEGIN, the key claimed (ji_idempotency_claim), then the opening */
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
