/*
 * ingest.c — one POST /users request: owns its splitter, record parser,
 * image batch, COPY buffer and request digest, feeds the records of its body
 * (or of record mode) into COPY rows and image files, and talks to its owner
 * (resume, done). Everything that can fail ends in ji_ingest_abort(), which
 * removes the request's files, drops its transaction and answers with the
 * error. The transaction itself is ingest_tx.c's.
 *
 * An append to a resumable upload (params.append) is the same request whose
 * rows go to upload_rows, with lines numbered from the upload's start; at
 * the end of a body that does not complete the upload the partial last line
 * is dropped (drop_partial_line) and only complete lines are staged. A
 * record that fails it in fail mode fails the whole upload (record_abort).
 */
#include "ingest_internal.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "row_encoder.h"

/* ------------------------------------------------------------------ callbacks to the owner */

static void destroy(ji_ingest_t *in);

static void on_defer(h2o_timeout_entry_t *entry)
{
    ji_ingest_t *in = JI_CONTAINER_OF(entry, ji_ingest_t, defer);

    if (in->pending_done) {
        in->pending_done = false;
        in->pending_resume = false;
        if (in->orphan) { /* interrupted, and its owner is gone: nobody to tell */
            destroy(in);
            return;
        }
        in->done_delivered = true;
        in->cb->done(in, in->owner, in->status, in->answer.base != NULL ? in->answer.base : "", in->answer.len,
                     in->retry_after);
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

void ji_ingest_answer(ji_ingest_t *in)
{
    in->pending_done = true;
    schedule(in);
}

void ji_ingest_resume_owner(ji_ingest_t *in)
{
    if (!in->refused)
        return;
    in->pending_resume = true;
    schedule(in);
}

/* ------------------------------------------------------------------ failure */

void ji_ingest_abort(ji_ingest_t *in, const ji_error_t *err)
{
    if (in->state == ST_DONE || in->state == ST_FAILED)
        return;
    in->state_before_failure = in->state;
    in->state = ST_FAILED;
    in->err = *err;
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
    if (err->kind == JI_ERR_TOO_LARGE && in->record_fault)
        atomic_fetch_add_explicit(&in->env->stats->limit_record_bytes, 1, memory_order_relaxed);
    if (ji_ingest_tx_abort(in))
        return; /* answered once the key's lock is released */
    if (in->append && in->record_fault && in->upload_id != 0)
        ji_ingest_tx_fail_upload(in); /* answered once the upload is marked failed */
    else
        ji_ingest_answer(in);
}

/** Fails the request for a record of its body (in an append: the upload fails too). */
static void record_abort(ji_ingest_t *in, const ji_error_t *err)
{
    if (err->kind == JI_ERR_MALFORMED || err->kind == JI_ERR_INVALID || err->kind == JI_ERR_TOO_LARGE)
        in->record_fault = true;
    ji_ingest_abort(in, err);
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
        ji_ingest_tx_fail(in, "connection lost during COPY", NULL, ji_pg_error(in->pg));
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

/** ?max_errors=N: the (N+1)-th rejected record (`err`, just counted) fails the request. True when it did. */
static bool too_many_errors(ji_ingest_t *in, const ji_error_t *err)
{
    ji_error_t e;

    if (!in->params.has_max_errors || in->skipped <= in->params.max_errors)
        return false;
    ji_error_set(&e, JI_ERR_INVALID, err->line, NULL,
                 "more than max_errors=%" PRIu64 " records rejected; line %" PRIu64 ": %s", in->params.max_errors,
                 err->line, err->message);
    record_abort(in, &e);
    return true;
}

/** Keeps the current line as a dead letter with the error it was rejected for. False when the request failed. */
static bool keep_dead_letter(ji_ingest_t *in, const ji_error_t *why, bool truncated)
{
    ji_error_t e;

    if (in->dead == NULL)
        return true;
    if (ji_dead_letters_keep(in->dead, why, truncated, &e) == 0)
        return true;
    e.line = why->line;
    ji_ingest_abort(in, &e);
    return false;
}

/**
 * A record-level error: skipped in skip mode (the rest of the line is still read: its dead letter is kept at its
 * end), fatal otherwise. Returns the splitter verdict (0 go on, -1 stop).
 */
static int record_error(ji_ingest_t *in, ji_error_t *err, uint64_t line)
{
    bool skippable = err->kind == JI_ERR_MALFORMED || err->kind == JI_ERR_INVALID;

    if (err->line == 0)
        err->line = line;
    if (in->params.skip_errors && skippable) {
        remember_error(in, err);
        if (too_many_errors(in, err))
            return -1;
        in->line_error = *err;
        in->line_failed = true;
        return 0;
    }
    record_abort(in, err);
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
    if (in->append) {
        /* upload_rows: "<upload_id>\t<line>\t..." (the line where a users row has its batch_id) */
        size_t id_len = strlen(in->upload_id_text);
        memcpy(in->copy_buf + in->copy_len, in->upload_id_text, id_len);
        in->copy_buf[in->copy_len + id_len] = '\t';
        in->copy_len += id_len + 1;
        row.batch_id = (int64_t)rec->line;
    }
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

    if (in->dead != NULL && ji_dead_letters_line_data(in->dead, data, len, &err) != 0) {
        err.line = line;
        ji_ingest_abort(in, &err);
        return -1;
    }
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
        if (!keep_dead_letter(in, &in->line_error, false))
            return -1;
        if (ji_record_parser_reset(in->parser) != 0) {
            ji_error_set(&err, JI_ERR_INTERNAL, line, NULL, "out of memory");
            ji_ingest_abort(in, &err);
            return -1;
        }
        return 0;
    }
    r = ji_record_parser_end_line(in->parser, line, &err);
    if (r >= 0) {
        if (in->dead != NULL)
            ji_dead_letters_line_forget(in->dead);
        return r;
    }
    if (in->state == ST_FAILED)
        return -1;
    forget_line_image(in);
    if (record_error(in, &err, line) < 0 || !keep_dead_letter(in, &err, false))
        return -1;
    if (ji_record_parser_reset(in->parser) != 0) {
        ji_error_set(&err, JI_ERR_INTERNAL, line, NULL, "out of memory");
        ji_ingest_abort(in, &err);
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
    if (!in->line_failed) { /* a line that failed already was reported once */
        remember_error(in, &err);
        if (too_many_errors(in, &err))
            return;
        in->line_error = err;
    }
    atomic_fetch_add_explicit(&in->env->stats->limit_record_bytes, 1, memory_order_relaxed);
    in->line_failed = false;
    if (!keep_dead_letter(in, &in->line_error, true))
        return;
    if (ji_record_parser_reset(in->parser) != 0) {
        ji_error_set(&err, JI_ERR_INTERNAL, err.line, NULL, "out of memory");
        ji_ingest_abort(in, &err);
        return;
    }
    ji_splitter_skip_line(&in->splitter);
}

/**
 * A line over --max-record-bytes: the splitter passed none of the bytes that would cross the limit, yet its dead
 * letter keeps the first JI_DEAD_LETTER_KEEP_BYTES: they are taken from `data` (where the splitter stopped) up to
 * the line's end. False when the request failed.
 */
static bool capture_long_line_start(ji_ingest_t *in, const char *data, size_t len)
{
    uint64_t have = in->dead != NULL ? ji_dead_letters_line_bytes(in->dead) : JI_DEAD_LETTER_KEEP_BYTES;
    const char *nl;
    ji_error_t err;

    if (have >= JI_DEAD_LETTER_KEEP_BYTES)
        return true;
    if (len > JI_DEAD_LETTER_KEEP_BYTES - have)
        len = (size_t)(JI_DEAD_LETTER_KEEP_BYTES - have);
    if ((nl = memchr(data, '\n', len)) != NULL)
        len = (size_t)(nl - data);
    if (ji_dead_letters_line_data(in->dead, data, len, &err) == 0)
        return true;
    err.line = ji_splitter_line(&in->splitter);
    ji_ingest_abort(in, &err);
    return false;
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
        record_abort(in, &err);
        return false;
    case JI_SPLIT_ERROR:
        break;
    }
    if (in->state != ST_FAILED) {
        ji_error_set(&err, JI_ERR_INTERNAL, ji_splitter_line(&in->splitter), NULL, "record handling failed");
        ji_ingest_abort(in, &err);
    }
    return false;
}

/* ------------------------------------------------------------------ public */

ji_ingest_t *ji_ingest_new(ji_ingest_env_t *env, const ji_ingest_params_t *params, const ji_ingest_callbacks_t *cb,
                           void *owner)
{
    ji_ingest_t *in = calloc(1, sizeof(*in));
    ji_error_t err;

    if (in == NULL)
        return NULL;
    in->env = env;
    in->params = *params;
    in->params.idempotency_key = NULL; /* the caller's copy: in->key is ours */
    in->cb = cb;
    in->owner = owner;
    in->state = ST_CONNECTING;
    in->bytes = params->body_bytes;
    in->defer.cb = on_defer;
    in->refused = true; /* the owner waits for the first resume */
    strcpy(in->first_id, "null");
    strcpy(in->last_id, "null");
    strcpy(in->batch_key, "-");
    clock_gettime(CLOCK_MONOTONIC, &in->started);
    ji_splitter_init(&in->splitter, env->max_record_bytes, &splitter_handler, in);
    atomic_fetch_add_explicit(&env->stats->requests, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&env->stats->ingests_in_flight, 1, memory_order_relaxed);

    if (params->append != NULL) {
        /* the upload's row gives the options, the key, the counts and the image journal (ingest_tx.c) */
        in->append = true;
        in->app = *params->append;
        in->params.append = &in->app;
        in->params.skip_errors = false;
        in->params.has_max_errors = false;
        in->length = -1;
        in->max_upload = env->max_upload_bytes != 0 ? env->max_upload_bytes : JI_DEFAULT_MAX_UPLOAD_BYTES;
        if ((in->copy_buf = malloc(JI_COPY_BUFFER_BYTES + JI_COPY_BUFFER_SLACK)) == NULL ||
            (in->parser = ji_record_parser_new(&record_handler, in)) == NULL || ji_ingest_tx_start(in) != 0) {
            ji_error_set(&err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
            ji_ingest_abort(in, &err);
        }
        return in;
    }
    if (params->idempotency_key != NULL) {
        size_t len = strlen(params->idempotency_key);
        /* the request paths check it already; this keeps a bad key out of the database whoever calls */
        if (ji_idempotency_key_check(params->idempotency_key, len, &err) != 0) {
            ji_ingest_abort(in, &err);
            return in;
        }
        ji_idempotency_key_copy(in->key, params->idempotency_key, len);
        in->keyed = true;
        if ((in->digest = ji_request_digest_new()) == NULL) {
            ji_error_set(&err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
            ji_ingest_abort(in, &err);
            return in;
        }
    }

    if ((in->copy_buf = malloc(JI_COPY_BUFFER_BYTES + JI_COPY_BUFFER_SLACK)) == NULL ||
        (in->parser = ji_record_parser_new(&record_handler, in)) == NULL) {
        ji_error_set(&err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        ji_ingest_abort(in, &err);
        return in;
    }
    if (params->skip_errors && (in->dead = ji_dead_letters_new(env->images->pending_fd)) == NULL) {
        ji_error_set(&err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        ji_ingest_abort(in, &err);
        return in;
    }
    if ((in->images = ji_image_batch_begin(env->images, &err)) == NULL) {
        ji_ingest_abort(in, &err);
        return in;
    }
    snprintf(in->batch_key, sizeof(in->batch_key), "%s", ji_image_batch_key(in->images));
    if (ji_ingest_tx_start(in) != 0) {
        ji_error_set(&err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        ji_ingest_abort(in, &err);
    }
    return in;
}

/**
 * Append: `len` more bytes may not take the upload past its length or --max-upload-bytes (413, nothing of the
 * append is kept: the client sent more than it announced). False when the request failed.
 */
static bool append_fits(ji_ingest_t *in, size_t len)
{
    uint64_t end = in->start_offset + in->fed + len;
    ji_error_t err;

    if (in->length >= 0 && end > (uint64_t)in->length) {
        ji_error_set(&err, JI_ERR_TOO_LARGE, 0, NULL,
                     "the body goes past the upload's length (%" PRId64 " bytes): nothing of it was kept", in->length);
        ji_ingest_abort(in, &err);
        return false;
    }
    if (end > in->max_upload) {
        ji_error_set(&err, JI_ERR_TOO_LARGE, 0, NULL,
                     "the upload would pass --max-upload-bytes (%" PRIu64 " bytes): nothing of the body was kept",
                     in->max_upload);
        ji_ingest_abort(in, &err);
        return false;
    }
    return true;
}

/**
 * Append that does not complete the upload: a last line without its '\n' is not kept (the client sends it again
 * from the durable offset): its image file goes, its rejection (skip mode) is not counted, its bytes are not
 * captured as a dead letter (one kept already, for a line over --max-record-bytes, is deleted with the staging).
 */
static void drop_partial_line(ji_ingest_t *in)
{
    if (ji_splitter_line_end_offset(&in->splitter) == in->fed)
        return;
    forget_line_image(in);
    if (in->line_failed || in->splitter.skipping) {
        uint64_t line = ji_splitter_line(&in->splitter);
        if (in->skipped > 0)
            in->skipped--;
        if (in->nreported > 0 && in->reported[in->nreported - 1].line == line)
            in->nreported--;
    }
    in->line_failed = false;
    if (in->dead != NULL)
        ji_dead_letters_line_forget(in->dead);
}

/** Append: whether this body ends the upload (all its bytes are in). Fails the request when it cannot. */
static bool decide_completion(ji_ingest_t *in)
{
    uint64_t end = in->start_offset + in->fed;
    ji_error_t err;

    if (in->interrupted)
        in->completing = false;
    else if (in->app.completes)
        in->completing = true;
    else
        in->completing = in->length >= 0 && end == (uint64_t)in->length;
    if (in->completing && in->length >= 0 && end != (uint64_t)in->length) {
        ji_error_set(&err, JI_ERR_MALFORMED, 0, NULL,
                     "the upload was declared complete after %" PRIu64 " bytes, its length is %" PRId64, end,
                     in->length);
        ji_ingest_abort(in, &err);
        return false;
    }
    return true;
}

/** REPLAY: body bytes are only hashed. */
static size_t feed_replay(ji_ingest_t *in, const char *data, size_t len)
{
    ji_request_digest_update(in->digest, data, len);
    in->bytes += len;
    atomic_fetch_add_explicit(&in->env->stats->body_bytes, len, memory_order_relaxed);
    return len;
}

void ji_ingest_last_bytes(ji_ingest_t *in)
{
    in->last_bytes = true;
}

size_t ji_ingest_feed(ji_ingest_t *in, const char *data, size_t len)
{
    size_t consumed = 0;
    ji_split_result_t r;

    if (in->state == ST_REPLAY && !in->ended)
        return feed_replay(in, data, len);
    if (in->state != ST_STREAMING || in->paused || in->ended) {
        in->refused = true;
        return 0;
    }
    if (in->append && !append_fits(in, len))
        return 0;
    for (;;) {
        size_t n = 0;
        r = ji_splitter_feed(&in->splitter, data + consumed, len - consumed, &n);
        consumed += n;
        if (r != JI_SPLIT_TOO_LONG || !in->params.skip_errors || in->state == ST_FAILED)
            break;
        /* skip mode: an oversize record is reported and dropped like any bad record */
        if (!capture_long_line_start(in, data + consumed, len - consumed))
            break;
        skip_long_line(in);
    }
    if (in->digest != NULL)
        ji_request_digest_update(in->digest, data, consumed);
    if (in->append)
        in->fed += consumed;
    in->bytes += consumed;
    atomic_fetch_add_explicit(&in->env->stats->body_bytes, consumed, memory_order_relaxed);
    if (!splitter_ok(in, r))
        return consumed;
    /* rows reach the database while the body still arrives (the last ones with COPY's end) */
    if (!in->paused && !in->last_bytes && flush_rows(in) < 0)
        return consumed;
    if (consumed < len || in->paused)
        in->refused = true;
    if (!in->paused && consumed < len)
        ji_ingest_resume_owner(in);
    return consumed;
}

int ji_ingest_put_record(ji_ingest_t *in, uint64_t line, const char *name, size_t name_len, const char *email,
                         size_t email_len, const char *image, size_t image_len)
{
    ji_record_t rec = {.line = line, .name = name, .name_len = name_len, .email = email, .email_len = email_len};
    ji_error_t err;
    int r;

    if (in->state == ST_REPLAY && !in->ended) {
        in->record_mode = true;
        ji_request_digest_record(in->digest, line, name, name_len, email, email_len, image, image_len);
        return 0;
    }
    if (in->state != ST_STREAMING || in->paused || in->ended) {
        in->refused = true;
        return -1;
    }
    in->lines_ended = true; /* no splitter in record mode */
    in->record_mode = true;
    if (in->digest != NULL)
        ji_request_digest_record(in->digest, line, name, name_len, email, email_len, image, image_len);
    if (ji_record_check_name(name, name_len, line, &err) != 0 ||
        ji_record_check_email(email, email_len, line, &err) != 0 ||
        (image != NULL && image_len > 0 && on_image(in, line, image, image_len, &err) != 0)) {
        forget_line_image(in);
        if (record_error(in, &err, line) != 0)
            return -1;
        in->line_failed = false;
        return keep_dead_letter(in, &err, false) ? 0 : -1;
    }
    if (in->dead != NULL)
        ji_dead_letters_line_forget(in->dead);
    rec.has_image = in->line_has_image;
    r = on_record(in, &rec, &err);
    if (r < 0) {
        if (in->state != ST_FAILED)
            ji_ingest_abort(in, &err);
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
    if (in->digest != NULL && (in->state == ST_REPLAY || in->state == ST_STREAMING))
        ji_request_digest_broken(in->digest, err);
    if (in->state == ST_REPLAY && !in->ended)
        return 0;
    r = record_error(in, err, err->line);
    in->line_failed = false;
    if (r == 0 && !keep_dead_letter(in, err, false))
        return -1;
    return r;
}

int ji_ingest_record_text(ji_ingest_t *in, const char *text, size_t len)
{
    ji_error_t err;

    if (in->dead == NULL || in->state != ST_STREAMING)
        return 0;
    ji_dead_letters_line_forget(in->dead);
    if (ji_dead_letters_line_data(in->dead, text, len, &err) == 0)
        return 0;
    err.line = in->inserted + in->skipped + 1;
    ji_ingest_abort(in, &err);
    return -1;
}

void ji_ingest_finish_rows(ji_ingest_t *in)
{
    if (!in->lines_ended) {
        in->lines_ended = true;
        if (in->append && !decide_completion(in))
            return;
        if (in->append && !in->completing)
            drop_partial_line(in);
        else if (!splitter_ok(in, ji_splitter_finish(&in->splitter)))
            return;
    }
    if (in->paused)
        return;
    if (in->copy_len > 0) {
        /* the last rows go with COPY's end: one write instead of two */
        if (ji_pg_copy_queue(in->pg, in->copy_buf, in->copy_len) != 0) {
            ji_ingest_tx_fail(in, "connection lost during COPY", NULL, ji_pg_error(in->pg));
            return;
        }
        in->copy_len = 0;
    }
    ji_ingest_tx_end_copy(in);
}

void ji_ingest_end(ji_ingest_t *in)
{
    if (in->ended)
        return;
    in->ended = true;
    if (in->state == ST_STREAMING && !in->paused)
        ji_ingest_finish_rows(in);
    else if (in->state == ST_REPLAY)
        ji_ingest_tx_end_replay(in);
}

void ji_ingest_fail(ji_ingest_t *in, const ji_error_t *err)
{
    if (in->state >= ST_COMMIT)
        return;
    ji_ingest_abort(in, err);
}

void ji_ingest_interrupt(ji_ingest_t *in)
{
    ji_error_t err;

    if (!in->append || in->ended || in->state >= ST_COMMIT)
        return;
    in->interrupted = true;
    if (in->state < ST_STREAMING) {
        /* nothing of the body was taken yet: nothing to keep */
        ji_error_set(&err, JI_ERR_MALFORMED, 0, NULL, "the client went away before the body");
        ji_ingest_abort(in, &err);
        return;
    }
    ji_ingest_end(in);
}

uint64_t ji_ingest_append_offset(const ji_ingest_t *in)
{
    return in->result_offset;
}

void ji_ingest_free(ji_ingest_t *in)
{
    if (in->interrupted && !in->done_delivered) {
        /* finishes on its own: what it received is staged (or its failure settled), then it frees itself */
        in->orphan = true;
        in->env->orphans++;
        return;
    }
    destroy(in);
}

static void destroy(ji_ingest_t *in)
{
    if (in->orphan)
        in->env->orphans--;
    ji_pg_call_cancel(&in->fail_call);
    if (h2o_timeout_is_linked(&in->defer))
        h2o_timeout_unlink(&in->defer);
    if (h2o_timeout_is_linked(&in->tx_step))
        h2o_timeout_unlink(&in->tx_step);
    ji_dead_letters_free(in->dead);
    if (in->state == ST_COMMIT && in->images != NULL) {
        /* the outcome of COMMIT is not known here: leave the journal for gc */
        ji_image_batch_forget(in->images);
        in->images = NULL;
    }
    ji_ingest_tx_release(in); /* rolled back in the background (once COMMIT was sent: after its outcome) */
    if (in->images != NULL)
        ji_image_batch_abort(in->images);
    if (in->state != ST_DONE && in->state != ST_FAILED)
        atomic_fetch_add_explicit(&in->env->stats->ingests_failed, 1, memory_order_relaxed);
    atomic_fetch_sub_explicit(&in->env->stats->ingests_in_flight, 1, memory_order_relaxed);
    ji_request_digest_free(in->digest);
    if (in->parser != NULL)
        ji_record_parser_free(in->parser);
    free(in->copy_buf);
    free(in->reported);
    ji_text_free(&in->answer);
    free(in);
}

void ji_ingest_outcome(const ji_ingest_t *in, ji_ingest_outcome_t *out)
{
    bool committed = in->status == 200 && !in->replayed;

    out->inserted = committed ? in->inserted : 0;
    out->images = committed ? in->images_stored : 0;
    out->batch_id = committed ? in->batch_id : 0;
}
