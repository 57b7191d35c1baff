/*
 * ingest_tx.c — the transaction of one ingest, every step a callback of the
 * connection (ingest.c feeds the COPY rows in between):
 *
 *   CONNECTING -> BEGIN -> CLAIM -> BATCH -> COPY_START (horizon lock, COPY) -> STREAMING
 *     -> COPY_END -> [DEAD_LETTERS] -> SUMMARY -> [KEEP_ANSWER] -> COMMIT -> DONE
 *   CLAIM -> REPLAY -> DONE | FAILED     (the key committed earlier)
 *   (any step) -> FAILED
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
    ji_image_batch_commit(in->images);
    in->images = NULL;
    give_back_committed(in);
    atomic_fetch_add_explicit(&in->env->stats->ingests_ok, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&in->env->stats->records, in->inserted, memory_order_relaxed);
    atomic_fetch_add_explicit(&in->env->stats->rejected_records, in->skipped, memory_order_relaxed);
    atomic_fetch_add_explicit(&in->env->stats->images, in->images_stored, memory_order_relaxed);
    succeed(in);
}

static void send_commit(ji_ingest_t *in)
{
    in->state = ST_COMMIT;
    if (ji_pg_query(in->pg, "COMMIT", 0, NULL, on_commit, in) != 0)
        ji_ingest_tx_fail(in, "sending COMMIT failed", NULL, ji_pg_error(in->pg));
}

static void on_answer_kept(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    (void)pg;
    if (err != NULL) {
        ji_ingest_tx_fail(in, "keeping the answer of the Idempotency-Key failed", res, err);
        return;
    }
    send_commit(in);
}

static void on_summary(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;
    const char *digest;
    ji_error_t e;

    if (err != NULL) {
        ji_ingest_tx_fail(in, "keeping the batch's counts failed", res, err);
        return;
    }
    if (res != NULL && PQntuples(res) == 1 && !PQgetisnull(res, 0, 0)) {
        snprintf(in->first_id, sizeof(in->first_id), "%s", PQgetvalue(res, 0, 0));
        snprintf(in->last_id, sizeof(in->last_id), "%s", PQgetvalue(res, 0, 1));
    }
    build_answer(in);
    if (!in->keyed) {
        send_commit(in);
        return;
    }
    if ((digest = ji_request_digest_hex(in->digest)) == NULL) {
        ji_error_set(&e, JI_ERR_INTERNAL, 0, NULL, "computing the request digest failed");
        ji_ingest_abort(in, &e);
        return;
    }
    const char *params[3] = {in->batch_id_text, in->answer.base, digest};
    in->state = ST_KEEP_ANSWER;
    if (ji_pg_query(pg, "UPDATE batches SET response = $2, request_digest = decode($3, 'hex') WHERE batch_id = $1", 3,
                    params, on_answer_kept, in) != 0)
        ji_ingest_tx_fail(in, "keeping the answer of the Idempotency-Key failed", NULL, ji_pg_error(pg));
}

/** The batch keeps its counts (GET /batches) and tells the first and last user id of the answer. */
static void send_summary(ji_ingest_t *in)
{
    char counts[5][24];
    const char *params[6] = {in->batch_id_text, counts[0], counts[1], counts[2], counts[3], counts[4]};

    snprintf(counts[0], sizeof(counts[0]), "%" PRIu64, in->inserted);
    snprintf(counts[1], sizeof(counts[1]), "%" PRIu64, in->skipped);
    snprintf(counts[2], sizeof(counts[2]), "%" PRIu64, ji_ingest_lines(in));
    snprintf(counts[3], sizeof(counts[3]), "%" PRIu64, in->images_stored);
    snprintf(counts[4], sizeof(counts[4]), "%" PRIu64, in->bytes);
    in->state = ST_SUMMARY;
    if (ji_pg_query(in->pg,
                    "UPDATE batches SET inserted = $2, skipped = $3, lines = $4, images = $5, bytes = $6 "
                    "WHERE batch_id = $1 RETURNING (SELECT min(user_id) FROM users WHERE batch_id = $1), "
                    "(SELECT max(user_id) FROM users WHERE batch_id = $1)",
                    6, params, on_summary, in) != 0)
        ji_ingest_tx_fail(in, "sending the summary query failed", NULL, ji_pg_error(in->pg));
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
    send_summary(in);
}

/** Sends dead-letter rows until the connection backs up, the step's share is sent, or the spool is done. */
static void send_dead_letters(ji_ingest_t *in)
{
    size_t sent = 0;
    ji_error_t e;

    while (sent < DEAD_LETTER_STEP_BYTES) {
        ptrdiff_t n = ji_dead_letters_copy_rows(in->dead, in->batch_id, in->copy_buf,
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
        send_summary(in);
        return;
    }
    in->state = ST_DEAD_LETTERS;
    if (ji_pg_query(pg, JI_COPY_REJECTED_SQL, 0, NULL, on_dead_letters_start, in) != 0)
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

/** The batch's lower bound is visible to exports (export.h) until COMMIT or ROLLBACK: its COPY may take ids. */
static void on_horizon_locked(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    if (err != NULL) {
        ji_ingest_tx_fail(in, "taking the export horizon lock failed", res, err);
        return;
    }
    if (ji_pg_query(pg, JI_COPY_USERS_SQL, 0, NULL, on_copy_start, in) != 0)
        ji_ingest_tx_fail(in, "sending COPY failed", NULL, ji_pg_error(pg));
}

static void on_batch(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;
    ji_error_t e;

    if (err != NULL) {
        ji_ingest_tx_fail(in, "creating the batch failed", res, err);
        return;
    }
    if (PQntuples(res) == 0) {
        /* ON CONFLICT: the key was taken by someone who does not take its advisory lock (an older version) */
        ji_error_set(&e, JI_ERR_CONFLICT, 0, NULL, "a request with this Idempotency-Key is in progress: retry later");
        ji_ingest_abort(in, &e);
        return;
    }
    snprintf(in->batch_id_text, sizeof(in->batch_id_text), "%s", PQgetvalue(res, 0, 0));
    in->batch_id = strtoll(in->batch_id_text, NULL, 10);
    in->state = ST_COPY_START;
    /* the export horizon first: no id may be taken before the lock that names the batch's lower bound */
    if (ji_pg_query(pg, JI_EXPORT_HORIZON_LOCK_SQL, 0, NULL, on_horizon_locked, in) != 0)
        ji_ingest_tx_fail(in, "taking the export horizon lock failed", NULL, ji_pg_error(pg));
}

static void send_batch(ji_ingest_t *in)
{
    const char *params[2] = {in->batch_key, in->key};
    int r;

    in->state = ST_BATCH;
    if (in->keyed)
        r = ji_pg_query(in->pg,
                        "INSERT INTO batches (batch_key, idempotency_key) VALUES ($1, $2) "
                        "ON CONFLICT (idempotency_key) DO NOTHING RETURNING batch_id",
                        2, params, on_batch, in);
    else
        r = ji_pg_query(in->pg, "INSERT INTO batches (batch_key) VALUES ($1) RETURNING batch_id", 1, params, on_batch,
                        in);
    if (r != 0)
        ji_ingest_tx_fail(in, "creating the batch failed", NULL, ji_pg_error(in->pg));
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

static void on_key_claimed(ji_key_claim_t *claim, ji_pg_t *pg, void *ctx)
{
    ji_ingest_t *in = ctx;
    ji_error_t e;

    (void)pg;
    in->key_locked = claim->locked;
    switch (claim->found) {
    case JI_KEY_FREE:
        send_batch(in);
        return;
    case JI_KEY_COMMITTED:
        start_replay(in, claim);
        return;
    case JI_KEY_RUNNING:
        /* its first request holds the key's lock until it commits or rolls back: never wait for it */
        ji_error_set(&e, JI_ERR_CONFLICT, 0, NULL,
                     "a request with this Idempotency-Key is still in progress: retry once it has finished");
        ji_ingest_abort(in, &e);
        return;
    case JI_KEY_FAILED:
        ji_ingest_tx_fail(in, claim->what, claim->res, claim->err);
        return;
    }
}

static void on_begin(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    if (err != NULL) {
        ji_ingest_tx_fail(in, "BEGIN failed", res, err);
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
