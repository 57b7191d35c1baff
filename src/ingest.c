/*
 * ingest.c — one POST /users request: owns its splitter, record parser,
 * image batch, database connection and COPY buffer, and drives them through
 * the steps below. Everything that can fail ends in fail(), which drops the
 * transaction, removes the request's files and answers with the error.
 *
 *   CONNECTING -> BEGIN -> BATCH -> COPY_START -> STREAMING -> COPY_END
 *     -> SUMMARY -> COMMIT -> DONE            (any step) -> FAILED
 */
#include "ingest.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "image_store.h"
#include "record_parser.h"
#include "json_text.h"
#include "row_encoder.h"
#include "splitter.h"

/** Message kept per reported error in skip mode. */
#define JI_REPORTED_ERROR_CHARS sizeof(((ji_error_t *)0)->message)

typedef enum {
    ST_CONNECTING,
    ST_BEGIN,
    ST_BATCH,
    ST_COPY_START,
    ST_STREAMING,
    ST_COPY_END,
    ST_SUMMARY,
    ST_COMMIT,
    ST_DONE,
    ST_FAILED,
} ingest_state_t;

typedef struct {
    uint64_t line;
    char field[32];
    char message[JI_REPORTED_ERROR_CHARS];
} reported_error_t;

struct st_ji_ingest_t {
    const ji_ingest_env_t *env;
    ji_ingest_params_t params;
    const ji_ingest_callbacks_t *cb;
    void *owner;
    ingest_state_t state;
    bool ended;       /**< the owner fed every body byte */
    bool lines_ended; /**< the splitter saw the end of input */
    bool paused;      /**< COPY output backed up: waiting for the drain event */
    bool refused;     /**< the owner was given less than it offered: it waits for resume */
    bool record_mode; /**< records come from ji_ingest_put_record, not from body bytes */
    bool replayed;    /**< answered from an earlier request with the same Idempotency-Key */
    char *idempotency_key;
    struct timespec started;

    ji_pg_t *pg;
    ji_image_batch_t *images;
    ji_splitter_t splitter;
    ji_record_parser_t *parser;

    /* the line being parsed */
    bool line_failed;
    bool line_has_image;
    ji_image_info_t line_image;

    char *copy_buf;
    size_t copy_len;
    int64_t batch_id;
    char batch_id_text[24];
    char first_id[24], last_id[24];

    uint64_t inserted, skipped, images_stored, bytes;
    reported_error_t *reported;
    size_t nreported;

    ji_error_t err;
    int status;
    unsigned retry_after;
    ji_text_t answer;

    h2o_timeout_entry_t defer; /**< delivers callbacks from the loop */
    bool pending_resume, pending_done;
};

static void fail(ji_ingest_t *in, const ji_error_t *err);
static void finish(ji_ingest_t *in);

/* ------------------------------------------------------------------ callbacks to the owner */

static void on_defer(h2o_timeout_entry_t *entry)
{
    ji_ingest_t *in = JI_CONTAINER_OF(entry, ji_ingest_t, defer);

    if (in->pending_done) {
        in->pending_done = false;
        in->pending_resume = false;
        in->cb->done(in, in->owner, in->status, in->answer.base, in->answer.len, in->retry_after);
        return; /* the owner may have freed `in` */
    }
    if (in->pending_resume) {
        in->pending_resume = false;
        in->refused = false;
        in->cb->resume(in, in->owner);
    }
}

static void schedule(ji_ingest_t *in)
{
    if (!h2o_timeout_is_linked(&in->defer))
        h2o_timeout_link(in->env->loop, in->env->zero_timeout, &in->defer);
}

static void schedule_resume(ji_ingest_t *in)
{
    if (!in->refused)
        return;
    in->pending_resume = true;
    schedule(in);
}

static double elapsed_ms(const ji_ingest_t *in)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - in->started.tv_sec) * 1e3 + (now.tv_nsec - in->started.tv_nsec) / 1e6;
}

/* ------------------------------------------------------------------ failure */

static void release_db(ji_ingest_t *in)
{
    if (in->pg != NULL) {
        ji_pg_free(in->pg); /* closing the connection rolls the transaction back */
        in->pg = NULL;
    }
}

static void fail(ji_ingest_t *in, const ji_error_t *err)
{
    if (in->state == ST_DONE || in->state == ST_FAILED)
        return;
    in->state = ST_FAILED;
    in->err = *err;
    release_db(in);
    if (in->images != NULL) {
        ji_image_batch_abort(in->images);
        in->images = NULL;
    }
    in->status = ji_error_http_status(err->kind);
    in->retry_after = ji_error_retry_after(err->kind);
    ji_text_free(&in->answer);
    ji_response_error_json(&in->answer, err);
    atomic_fetch_add_explicit(&in->env->stats->ingests_failed, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&in->env->stats->errors[err->kind], 1, memory_order_relaxed);
    if (err->kind == JI_ERR_TOO_LARGE)
        atomic_fetch_add_explicit(&in->env->stats->limit_record_bytes, 1, memory_order_relaxed);
    in->pending_done = true;
    schedule(in);
}

static void fail_db(ji_ingest_t *in, const char *what, const char *why)
{
    ji_error_t err;
    /* a server that answered with an error is not "unavailable": only a lost or refused connection is */
    bool lost = in->pg == NULL || PQstatus(ji_pg_conn(in->pg)) != CONNECTION_OK;
    ji_error_set(&err, lost ? JI_ERR_DB : JI_ERR_INTERNAL, 0, NULL, "%s: %s", what, why != NULL ? why : "");
    fail(in, &err);
}

/* ------------------------------------------------------------------ rows */

/** Hands the COPY buffer to libpq. 0 = sent, 1 = backed up (paused), -1 = failed. */
static int flush_rows(ji_ingest_t *in)
{
    int r;

    if (in->copy_len == 0)
        return in->paused ? 1 : 0;
    r = ji_pg_copy_put(in->pg, in->copy_buf, in->copy_len);
    in->copy_len = 0;
    if (r < 0) {
        fail_db(in, "database connection lost during COPY", ji_pg_error(in->pg));
        return -1;
    }
    if (r == 1)
        in->paused = true;
    return r;
}

static void remember_error(ji_ingest_t *in, const ji_error_t *err)
{
    in->skipped++;
    if (in->nreported == JI_MAX_REPORTED_ERRORS)
        return;
    if (in->reported == NULL && (in->reported = calloc(JI_MAX_REPORTED_ERRORS, sizeof(*in->reported))) == NULL)
        return;
    in->reported[in->nreported].line = err->line;
    memcpy(in->reported[in->nreported].field, err->field, sizeof(err->field));
    memcpy(in->reported[in->nreported].message, err->message, sizeof(err->message));
    in->nreported++;
}

/** A record-level error: skipped in skip mode, fatal otherwise. Returns the splitter verdict (0 go on, -1 stop). */
static int record_error(ji_ingest_t *in, ji_error_t *err, uint64_t line)
{
    bool skippable = err->kind == JI_ERR_MALFORMED || err->kind == JI_ERR_INVALID;

    if (err->line == 0)
        err->line = line;
    if (in->params.skip_errors && skippable) {
        remember_error(in, err);
        in->line_failed = true;
        return 0;
    }
    fail(in, err);
    return -1;
}

/* ------------------------------------------------------------------ record handler */

static int on_image(void *ctx, uint64_t line, const char *text, size_t len, ji_error_t *err)
{
    ji_ingest_t *in = ctx;
    int r = ji_image_batch_write(in->images, line, text, len, &in->line_image, err);

    if (r < 0)
        return -1;
    in->line_has_image = r == 0;
    return 0;
}

static int on_record(void *ctx, const ji_record_t *rec, ji_error_t *err)
{
    ji_ingest_t *in = ctx;
    ji_row_t row = {
        .batch_id = in->batch_id,
        .name = rec->name,
        .name_len = rec->name_len,
        .email = rec->email,
        .email_len = rec->email_len,
    };
    size_t n;

    (void)err;
    if (in->line_has_image) {
        row.image_path = in->line_image.path;
        row.image_type = in->line_image.mime;
        row.image_size = in->line_image.size;
        in->images_stored++;
        in->line_has_image = false;
    }
    n = ji_row_encode(in->copy_buf + in->copy_len, JI_COPY_BUFFER_BYTES + JI_COPY_BUFFER_SLACK - in->copy_len, &row);
    if (n == 0)
        return ji_error_set(err, JI_ERR_INTERNAL, rec->line, NULL, "row does not fit the COPY buffer");
    in->copy_len += n;
    in->inserted++;
    if (in->copy_len >= JI_COPY_BUFFER_BYTES) {
        int r = flush_rows(in);
        if (r < 0)
            return ji_error_set(err, JI_ERR_DB, rec->line, NULL, "%s", in->err.message);
        return r; /* 1: pause after this record */
    }
    return 0;
}

static const ji_record_handler_t record_handler = {on_image, on_record};

/* ------------------------------------------------------------------ splitter handler */

static void forget_line_image(ji_ingest_t *in)
{
    if (in->line_has_image) {
        ji_image_batch_remove(in->images, &in->line_image);
        in->line_has_image = false;
    }
}

static int on_line_data(void *ctx, uint64_t line, const char *data, size_t len)
{
    ji_ingest_t *in = ctx;
    ji_error_t err;

    if (in->line_failed)
        return 0;
    if (ji_record_parser_feed(in->parser, line, data, len, &err) == 0)
        return 0;
    if (in->state == ST_FAILED)
        return -1; /* a database failure inside the record handler already answered */
    forget_line_image(in);
    return record_error(in, &err, line);
}

static int on_line_end(void *ctx, uint64_t line)
{
    ji_ingest_t *in = ctx;
    ji_error_t err;
    int r;

    if (in->line_failed) {
        in->line_failed = false;
        if (ji_record_parser_reset(in->parser) != 0) {
            ji_error_set(&err, JI_ERR_INTERNAL, line, NULL, "out of memory");
            fail(in, &err);
            return -1;
        }
        return 0;
    }
    r = ji_record_parser_end_line(in->parser, line, &err);
    if (r >= 0)
        return r;
    if (in->state == ST_FAILED)
        return -1;
    forget_line_image(in);
    if (record_error(in, &err, line) < 0)
        return -1;
    if (ji_record_parser_reset(in->parser) != 0) {
        ji_error_set(&err, JI_ERR_INTERNAL, line, NULL, "out of memory");
        fail(in, &err);
        return -1;
    }
    in->line_failed = false;
    return 0;
}

static const ji_splitter_handler_t splitter_handler = {on_line_data, on_line_end};

static void too_long_error(ji_ingest_t *in, ji_error_t *err)
{
    uint64_t line = ji_splitter_line(&in->splitter);

    ji_error_set(err, JI_ERR_TOO_LARGE, line, NULL,
                 "record on line %" PRIu64 " is longer than --max-record-bytes (%zu bytes)", line,
                 in->splitter.max_line_bytes);
}

static void skip_long_line(ji_ingest_t *in)
{
    ji_error_t err;

    too_long_error(in, &err);
    forget_line_image(in);
    if (!in->line_failed) /* a line that failed already was reported once */
        remember_error(in, &err);
    atomic_fetch_add_explicit(&in->env->stats->limit_record_bytes, 1, memory_order_relaxed);
    in->line_failed = false;
    if (ji_record_parser_reset(in->parser) != 0) {
        ji_error_set(&err, JI_ERR_INTERNAL, err.line, NULL, "out of memory");
        fail(in, &err);
        return;
    }
    ji_splitter_skip_line(&in->splitter);
}

/** Maps a splitter result to the request's fate. Returns false when the request failed. */
static bool splitter_ok(ji_ingest_t *in, ji_split_result_t r)
{
    ji_error_t err;

    switch (r) {
    case JI_SPLIT_OK:
    case JI_SPLIT_PAUSED:
        return in->state != ST_FAILED;
    case JI_SPLIT_TOO_LONG:
        too_long_error(in, &err);
        fail(in, &err);
        return false;
    case JI_SPLIT_ERROR:
        break;
    }
    if (in->state != ST_FAILED) {
        ji_error_set(&err, JI_ERR_INTERNAL, ji_splitter_line(&in->splitter), NULL, "record handling failed");
        fail(in, &err);
    }
    return false;
}

/* ------------------------------------------------------------------ database steps */

/** The success answer, built before COMMIT so that an Idempotency-Key can keep it in the same transaction. */
static void build_answer(ji_ingest_t *in)
{
    ji_text_t *t = &in->answer;

    ji_text_free(t);
    ji_text_printf(t,
                   "{\"inserted\":%" PRIu64 ",\"skipped\":%" PRIu64 ",\"lines\":%" PRIu64 ",\"images\":%" PRIu64
                   ",\"bytes\":%" PRIu64 ",\"batch_id\":%" PRId64 ",\"first_user_id\":%s,\"last_user_id\":%s"
                   ",\"elapsed_ms\":%.1f",
                   in->inserted, in->skipped,
                   in->record_mode ? in->inserted + in->skipped : ji_splitter_lines_done(&in->splitter),
                   in->images_stored, in->bytes, in->batch_id, in->first_id, in->last_id, elapsed_ms(in));
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

/** Answers 200 with what in->answer holds. */
static void succeed(ji_ingest_t *in)
{
    in->state = ST_DONE;
    in->status = 200;
    in->pending_done = true;
    schedule(in);
}

static void on_commit(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    (void)res;
    if (err != NULL) {
        ji_error_t e;
        bool unknown = PQstatus(ji_pg_conn(pg)) != CONNECTION_OK;
        if (unknown) {
            /* COMMIT may or may not have happened: keep the files and their journal, gc settles it */
            ji_image_batch_forget(in->images);
            in->images = NULL;
        }
        ji_error_set(&e, unknown ? JI_ERR_DB : JI_ERR_INTERNAL, 0, NULL, "COMMIT failed: %s", err);
        fail(in, &e);
        return;
    }
    ji_image_batch_commit(in->images);
    in->images = NULL;
    ji_pg_pool_put(in->env->pg_pool, in->pg);
    in->pg = NULL;
    atomic_fetch_add_explicit(&in->env->stats->ingests_ok, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&in->env->stats->records, in->inserted, memory_order_relaxed);
    atomic_fetch_add_explicit(&in->env->stats->images, in->images_stored, memory_order_relaxed);
    succeed(in);
}

static void send_commit(ji_ingest_t *in)
{
    in->state = ST_COMMIT;
    if (ji_pg_query(in->pg, "COMMIT", 0, NULL, on_commit, in) != 0)
        fail_db(in, "sending COMMIT failed", ji_pg_error(in->pg));
}

static void on_answer_kept(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    (void)pg;
    (void)res;
    if (err != NULL) {
        fail_db(in, "keeping the answer of the Idempotency-Key failed", err);
        return;
    }
    send_commit(in);
}

static void on_summary(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    if (err != NULL) {
        fail_db(in, "reading the batch's user ids failed", err);
        return;
    }
    if (PQntuples(res) == 1 && !PQgetisnull(res, 0, 0)) {
        snprintf(in->first_id, sizeof(in->first_id), "%s", PQgetvalue(res, 0, 0));
        snprintf(in->last_id, sizeof(in->last_id), "%s", PQgetvalue(res, 0, 1));
    }
    build_answer(in);
    if (in->idempotency_key != NULL) {
        const char *params[2] = {in->batch_id_text, in->answer.base};
        if (ji_pg_query(pg, "UPDATE batches SET response = $2 WHERE batch_id = $1", 2, params, on_answer_kept, in) !=
            0)
            fail_db(in, "keeping the answer of the Idempotency-Key failed", ji_pg_error(pg));
        return;
    }
    send_commit(in);
}

static void on_copy_end(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;
    const char *params[1] = {in->batch_id_text};
    ji_error_t e;

    (void)res;
    if (err != NULL) {
        fail_db(in, "COPY failed", err);
        return;
    }
    if (ji_image_batch_sync(in->images, &e) != 0) {
        fail(in, &e);
        return;
    }
    in->state = ST_SUMMARY;
    if (in->inserted == 0) {
        on_summary(pg, in, NULL, NULL);
        return;
    }
    if (ji_pg_query(pg, "SELECT min(user_id), max(user_id) FROM users WHERE batch_id = $1", 1, params, on_summary,
                    in) != 0)
        fail_db(in, "sending the summary query failed", ji_pg_error(pg));
}

static void on_pg_event(ji_pg_t *pg, void *ctx, const char *err)
{
    ji_ingest_t *in = ctx;

    (void)pg;
    if (err != NULL) {
        fail_db(in, "database connection lost", err);
        return;
    }
    in->paused = false;
    if (in->state != ST_STREAMING)
        return;
    if (in->ended)
        finish(in);
    else
        schedule_resume(in);
}

static void on_copy_start(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    (void)res;
    if (err != NULL) {
        fail_db(in, "starting COPY failed", err);
        return;
    }
    in->state = ST_STREAMING;
    ji_pg_set_event_cb(pg, on_pg_event, in);
    if (in->ended)
        finish(in);
    else
        schedule_resume(in);
}

/** The key was used by a committed request: answer what it answered, store nothing. */
static void on_replay(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;
    ji_error_t e;

    (void)pg;
    if (err != NULL) {
        fail_db(in, "reading the answer of the Idempotency-Key failed", err);
        return;
    }
    if (PQntuples(res) != 1 || PQgetisnull(res, 0, 0)) {
        ji_error_set(&e, JI_ERR_INTERNAL, 0, NULL, "the Idempotency-Key is taken but has no answer");
        fail(in, &e);
        return;
    }
    ji_text_free(&in->answer);
    ji_text_append(&in->answer, PQgetvalue(res, 0, 0), (size_t)PQgetlength(res, 0, 0));
    release_db(in); /* nothing was written: the transaction is dropped */
    ji_image_batch_abort(in->images);
    in->images = NULL;
    in->replayed = true;
    succeed(in);
}

static void on_batch(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;

    if (err != NULL) {
        fail_db(in, "creating the batch failed", err);
        return;
    }
    if (PQntuples(res) == 0) {
        /* ON CONFLICT on the Idempotency-Key: it waited for the other request, which committed */
        const char *params[1] = {in->idempotency_key};
        in->state = ST_SUMMARY;
        if (ji_pg_query(pg, "SELECT response FROM batches WHERE idempotency_key = $1", 1, params, on_replay, in) != 0)
            fail_db(in, "reading the answer of the Idempotency-Key failed", ji_pg_error(pg));
        return;
    }
    snprintf(in->batch_id_text, sizeof(in->batch_id_text), "%s", PQgetvalue(res, 0, 0));
    in->batch_id = strtoll(in->batch_id_text, NULL, 10);
    in->state = ST_COPY_START;
    if (ji_pg_query(pg, JI_COPY_USERS_SQL, 0, NULL, on_copy_start, in) != 0)
        fail_db(in, "sending COPY failed", ji_pg_error(pg));
}

static void on_begin(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_ingest_t *in = ctx;
    const char *params[2] = {ji_image_batch_key(in->images), in->idempotency_key};
    int r;

    (void)res;
    if (err != NULL) {
        fail_db(in, "BEGIN failed", err);
        return;
    }
    in->state = ST_BATCH;
    if (in->idempotency_key != NULL)
        r = ji_pg_query(pg,
                        "INSERT INTO batches (batch_key, idempotency_key) VALUES ($1, $2) "
                        "ON CONFLICT (idempotency_key) DO NOTHING RETURNING batch_id",
                        2, params, on_batch, in);
    else
        r = ji_pg_query(pg, "INSERT INTO batches (batch_key) VALUES ($1) RETURNING batch_id", 1, params, on_batch, in);
    if (r != 0)
        fail_db(in, "creating the batch failed", ji_pg_error(pg));
}

static void on_connected(ji_pg_t *pg, void *ctx, const char *err)
{
    ji_ingest_t *in = ctx;

    if (err != NULL) {
        fail_db(in, "database unavailable", err);
        return;
    }
    in->state = ST_BEGIN;
    if (ji_pg_query(pg, "BEGIN", 0, NULL, on_begin, in) != 0)
        fail_db(in, "database unavailable", ji_pg_error(pg));
}

/* ------------------------------------------------------------------ public */

ji_ingest_t *ji_ingest_new(const ji_ingest_env_t *env, const ji_ingest_params_t *params,
                           const ji_ingest_callbacks_t *cb, void *owner)
{
    ji_ingest_t *in = calloc(1, sizeof(*in));
    ji_error_t err;

    if (in == NULL)
        return NULL;
    in->env = env;
    in->params = *params;
    in->cb = cb;
    in->owner = owner;
    in->state = ST_CONNECTING;
    in->bytes = params->body_bytes;
    in->defer.cb = on_defer;
    in->refused = true; /* the owner waits for the first resume */
    strcpy(in->first_id, "null");
    strcpy(in->last_id, "null");
    clock_gettime(CLOCK_MONOTONIC, &in->started);
    ji_splitter_init(&in->splitter, env->max_record_bytes, &splitter_handler, in);
    atomic_fetch_add_explicit(&env->stats->requests, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&env->stats->ingests_in_flight, 1, memory_order_relaxed);

    if (params->idempotency_key != NULL && (in->idempotency_key = strdup(params->idempotency_key)) == NULL) {
        ji_error_set(&err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        fail(in, &err);
        return in;
    }

    if ((in->copy_buf = malloc(JI_COPY_BUFFER_BYTES + JI_COPY_BUFFER_SLACK)) == NULL ||
        (in->parser = ji_record_parser_new(&record_handler, in)) == NULL) {
        ji_error_set(&err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        fail(in, &err);
        return in;
    }
    if ((in->images = ji_image_batch_begin(env->images, &err)) == NULL) {
        fail(in, &err);
        return in;
    }
    if ((in->pg = ji_pg_pool_get(env->pg_pool, on_connected, in)) == NULL) {
        ji_error_set(&err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        fail(in, &err);
    }
    return in;
}

size_t ji_ingest_feed(ji_ingest_t *in, const char *data, size_t len)
{
    size_t consumed = 0;
    ji_split_result_t r;

    if (in->state != ST_STREAMING || in->paused || in->ended) {
        in->refused = true;
        return 0;
    }
    for (;;) {
        size_t n = 0;
        r = ji_splitter_feed(&in->splitter, data + consumed, len - consumed, &n);
        consumed += n;
        if (r != JI_SPLIT_TOO_LONG || !in->params.skip_errors || in->state == ST_FAILED)
            break;
        /* skip mode: an oversize record is reported and dropped like any bad record */
        skip_long_line(in);
    }
    in->bytes += consumed;
    atomic_fetch_add_explicit(&in->env->stats->body_bytes, consumed, memory_order_relaxed);
    if (!splitter_ok(in, r))
        return consumed;
    /* rows reach the database while the body still arrives */
    if (!in->paused && flush_rows(in) < 0)
        return consumed;
    if (consumed < len || in->paused)
        in->refused = true;
    if (!in->paused && consumed < len)
        schedule_resume(in);
    return consumed;
}

int ji_ingest_put_record(ji_ingest_t *in, uint64_t line, const char *name, size_t name_len, const char *email,
                         size_t email_len, const char *image, size_t image_len)
{
    ji_record_t rec = {.line = line, .name = name, .name_len = name_len, .email = email, .email_len = email_len};
    ji_error_t err;
    int r;

    if (in->state != ST_STREAMING || in->paused || in->ended) {
        in->refused = true;
        return -1;
    }
    in->lines_ended = true; /* no splitter in record mode */
    in->record_mode = true;
    if (ji_record_check_name(name, name_len, line, &err) != 0 || ji_record_check_email(email, email_len, line, &err) != 0 ||
        (image != NULL && image_len > 0 && on_image(in, line, image, image_len, &err) != 0)) {
        forget_line_image(in);
        return record_error(in, &err, line) == 0 ? 0 : -1;
    }
    rec.has_image = in->line_has_image;
    r = on_record(in, &rec, &err);
    if (r < 0) {
        if (in->state != ST_FAILED)
            fail(in, &err);
        return -1;
    }
    if (r == 1)
        in->refused = true;
    return r;
}

int ji_ingest_record_error(ji_ingest_t *in, ji_error_t *err)
{
    int r;

    in->record_mode = true;
    in->lines_ended = true;
    r = record_error(in, err, err->line);
    in->line_failed = false;
    return r;
}

/** Ends the lines, sends the last rows and ends the COPY; re-entered after each drain. */
static void finish(ji_ingest_t *in)
{
    if (!in->lines_ended) {
        in->lines_ended = true;
        if (!splitter_ok(in, ji_splitter_finish(&in->splitter)))
            return;
    }
    if (in->paused)
        return;
    if (in->copy_len > 0) {
        if (flush_rows(in) != 0)
            return; /* failed, or backed up: the drain event comes back here */
    }
    in->state = ST_COPY_END;
    ji_pg_set_event_cb(in->pg, NULL, NULL);
    if (ji_pg_copy_end(in->pg, NULL, on_copy_end, in) != 0)
        fail_db(in, "ending COPY failed", ji_pg_error(in->pg));
}

void ji_ingest_end(ji_ingest_t *in)
{
    if (in->ended)
        return;
    in->ended = true;
    if (in->state == ST_STREAMING && !in->paused)
        finish(in);
}

void ji_ingest_fail(ji_ingest_t *in, const ji_error_t *err)
{
    if (in->state >= ST_COMMIT)
        return;
    fail(in, err);
}

void ji_ingest_free(ji_ingest_t *in)
{
    if (h2o_timeout_is_linked(&in->defer))
        h2o_timeout_unlink(&in->defer);
    if (in->state == ST_COMMIT && in->images != NULL) {
        /* the outcome of COMMIT is not known here: leave the journal for gc */
        ji_image_batch_forget(in->images);
        in->images = NULL;
    }
    release_db(in);
    if (in->images != NULL)
        ji_image_batch_abort(in->images);
    if (in->state != ST_DONE && in->state != ST_FAILED)
        atomic_fetch_add_explicit(&in->env->stats->ingests_failed, 1, memory_order_relaxed);
    atomic_fetch_sub_explicit(&in->env->stats->ingests_in_flight, 1, memory_order_relaxed);
    free(in->idempotency_key);
    if (in->parser != NULL)
        ji_record_parser_free(in->parser);
    free(in->copy_buf);
    free(in->reported);
    ji_text_free(&in->answer);
    free(in);
}
