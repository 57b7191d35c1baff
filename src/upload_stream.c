/*
 * upload_stream.c — the body of a POST /users, from the first body byte to
 * the answer. Places are taken before a byte is read (the client's share, an
 * upload place); then the first body byte decides the format when nothing
 * else did. JSON Lines stream: framing is removed in place (body_decoder),
 * gzip or zstd is decoded in slices (content_decoder), and the bytes are fed
 * to an ingest, with reading paused whenever the ingest is full. A JSON
 * array is read whole (bounded by --max-array-bytes) and handed to the array
 * mode through the h2o bridge. A body slower than --min-body-rate is cut. With a
 * Content-Digest, the streamed body is hashed as it is taken from the wire
 * and checked before the ingest may commit.
 *
 * Resumable uploads (docs/resumable.md) take the same stream: a creation
 * first inserts the upload's row (uploads.c), a draft creation with a body
 * then sends 104 with the upload's Location, and the body is an append of the
 * ingest (ingest.h); the answer carries the protocol's headers. A client that
 * goes away mid-append interrupts the ingest, which keeps the complete lines
 * that arrived.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "array_mode.h"
#include "body_decoder.h"
#include "conn.h"
#include "content_decoder.h"
#include "content_digest.h"
#include "ingest.h"
#include "uploads.h"

typedef enum {
    UPLOAD_CREATING,  /**< a resumable upload's row is being inserted */
    UPLOAD_SNIFF,     /**< the first body byte decides the format */
    UPLOAD_STREAM,    /**< JSON Lines: streaming into the ingest */
    UPLOAD_ARRAY,     /**< JSON array: reading the body whole */
    UPLOAD_FINISHING, /**< every body byte was given to the ingest: it commits */
    UPLOAD_ANSWERED,  /**< the answer is out (or the array mode answers) */
} upload_state_t;

struct st_ji_upload_t {
    ji_conn_t *conn;
    upload_state_t state;
    ji_upload_options_t options;
    ji_ingest_params_t params;
    ji_body_decoder_t body;
    bool expect_continue, continue_sent;
    bool client_slot;        /**< holds a place of --max-client-ingests */
    bool admitted;           /**< holds an upload place (--max-ingests, database ready) */
    uint64_t memory;         /**< bytes of --max-memory held */
    uint64_t content_length; /**< the head's Content-Length (0: chunked) */
    ji_ingest_t *ingest;
    ji_content_digest_t *digest; /**< Content-Digest of a stream: the wire bytes hashed (NULL: no check) */
    ji_ingest_outcome_t outcome; /**< what a streamed upload committed (the JSON-array mode: array_request) */
    uint64_t body_received;      /**< body bytes that arrived, taken or not (framing included), for the access log */

    /* feeding */
    bool flush_due;
    h2o_timeout_entry_t flush_timer; /**< feeds a part-filled buffer after JI_FEED_FLUSH_MS */
    h2o_timeout_entry_t yield_timer; /**< goes on after a slice of work, once the loop served others */

    /* Content-Encoding: gzip or zstd */
    ji_content_decoder_t *decoder;
    char *inflated; /**< JI_INFLATE_BUFFER_BYTES of decoded body */
    size_t inflated_off, inflated_len;

    /* the JSON-array mode */
    char *head_copy; /**< the request head, for the h2o request built when the body is complete */
    size_t head_len;
    char *array_body;
    size_t array_len, array_cap;
    ji_array_request_t array_request;

    /* a resumable upload */
    bool resumable;
    ji_resumable_request_t rr; /**< its request (the append's token set once a creation's row is in) */
    ji_upload_create_t create; /**< a creation's INSERT */
    time_t expires_at;         /**< a creation's expiry (0: unknown) */
    bool has_body;             /**< the request carries a body (chunked, or a Content-Length above 0) */
    bool interim;              /**< a 104 is to be sent before the body is read */
    bool http11;               /**< the client speaks HTTP/1.1 (1xx answers allowed) */
    char interim_text[256];    /**< the 104 (and a 100 Continue before it) while it is written */

    /* --min-body-rate */
    h2o_timeout_entry_t rate_timer; /**< once a second while the body is read */
    uint64_t rate_bytes;            /**< wire bytes read in the current window */
    unsigned rate_seconds;          /**< seconds of the current window spent waiting for the client */
};

static void process_body(ji_upload_t *u);

/** A cheap monotonic clock (milliseconds) for slicing work: the loop's own clock stands still within a turn. */
static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}
static void on_read_body(h2o_socket_t *sock, const char *err);

static const ji_config_t *config_of(const ji_upload_t *u)
{
    return u->conn->worker->server->config;
}

/* ------------------------------------------------------------------ lifetime */

void ji_upload_free(ji_upload_t *u)
{
    ji_worker_t *w = u->conn->worker;

    if (h2o_timeout_is_linked(&u->flush_timer))
        h2o_timeout_unlink(&u->flush_timer);
    if (h2o_timeout_is_linked(&u->yield_timer))
        h2o_timeout_unlink(&u->yield_timer);
    if (h2o_timeout_is_linked(&u->rate_timer))
        h2o_timeout_unlink(&u->rate_timer);
    if (u->ingest != NULL)
        ji_ingest_free(u->ingest); /* aborts an unfinished request (an interrupted append finishes on its own) */
    if (u->resumable)
        ji_upload_create_dispose(&u->create);
    ji_array_mode_release(&u->array_request.admission);
    if (u->admitted)
        ji_server_release_ingest(w);
    if (u->memory != 0)
        ji_budget_release(&w->server->memory_budget, u->memory);
    if (u->client_slot)
        ji_client_slots_release(&w->server->client_slots, u->conn->client);
    ji_content_decoder_free(u->decoder);
    ji_content_digest_free(u->digest);
    free(u->inflated);
    free(u->head_copy);
    free(u->array_body);
    free(u);
}

/** Answers and lets the connection go on (keep-alive only when the whole body was read). */
static void answer(ji_upload_t *u, int status, const char *body, size_t len, unsigned retry_after)
{
    ji_conn_t *c = u->conn;

    u->state = UPLOAD_ANSWERED;
    c->body_unread = !ji_body_decoder_done(&u->body);
    if (status >= 300)
        c->keep_alive = false; /* a failed upload ends its connection, whatever was read of it */
    ji_conn_respond(c, status, body, len, retry_after, NULL);
}

/** A resumable upload's answer: `status` with the protocol's headers (`extra`) and a JSON body (may be empty). */
static void answer_with(ji_upload_t *u, int status, const char *body, size_t len, unsigned retry_after,
                        const char *extra)
{
    ji_conn_t *c = u->conn;

    u->state = UPLOAD_ANSWERED;
    c->body_unread = !ji_body_decoder_done(&u->body);
    if (status >= 300)
        c->keep_alive = false;
    ji_conn_respond(c, status, body, len, retry_after, extra);
}

static void answer_error(ji_upload_t *u, const ji_error_t *err)
{
    if (u->resumable) { /* with the protocol's headers */
        ji_text_t body = {0}, extra = {0};
        ji_response_error_json(&body, err);
        ji_upload_headers_write(&extra, u->rr.append.draft, u->rr.append.token, false, -1, -1, 0);
        fprintf(stderr, "%s: %d %.*s", u->conn->client, ji_error_http_status(err->kind), (int)body.len,
                body.base != NULL ? body.base : "\n");
        if (body.failed || extra.failed) {
            ji_text_free(&body);
            ji_text_free(&extra);
            ji_conn_close(u->conn);
            return;
        }
        u->conn->body_unread = !ji_body_decoder_done(&u->body);
        answer_with(u, ji_error_http_status(err->kind), body.base, body.len, ji_error_retry_after(err->kind),
                    extra.base);
        ji_text_free(&body);
        ji_text_free(&extra);
        return;
    }
    u->state = UPLOAD_ANSWERED;
    u->conn->body_unread = !ji_body_decoder_done(&u->body);
    u->conn->keep_alive = false;
    ji_conn_respond_error(u->conn, err);
}

/** Fails the request: through the ingest when there is one (it rolls back, then answers), else at once. */
static void fail(ji_upload_t *u, const ji_error_t *err)
{
    if (u->state == UPLOAD_ANSWERED)
        return;
    ji_conn_pause_reading(u->conn);
    if (u->state == UPLOAD_CREATING)
        ji_upload_create_dispose(&u->create);
    if (u->ingest != NULL)
        ji_ingest_fail(u->ingest, err);
    else
        answer_error(u, err);
}

/* ------------------------------------------------------------------ timers */

void ji_upload_idle(ji_upload_t *u)
{
    ji_error_t err;

    ji_error_set(&err, JI_ERR_MALFORMED, 0, NULL, "request body stalled: no bytes for %u ms",
                 (unsigned)u->conn->worker->idle_timeout.timeout);
    fail(u, &err);
}

void ji_upload_stop(ji_upload_t *u)
{
    ji_error_t err;

    if (u->state == UPLOAD_FINISHING || u->state == UPLOAD_ANSWERED)
        return;
    ji_error_set(&err, JI_ERR_STOPPING, 0, NULL, "the server is shutting down: upload again (nothing was committed)");
    fail(u, &err);
}

static void on_rate_timer(h2o_timeout_entry_t *entry)
{
    ji_upload_t *u = JI_CONTAINER_OF(entry, ji_upload_t, rate_timer);
    const ji_config_t *cfg = config_of(u);
    ji_error_t err;

    if (u->state != UPLOAD_SNIFF && u->state != UPLOAD_STREAM && u->state != UPLOAD_ARRAY)
        return;
    h2o_timeout_link(u->conn->worker->ctx.loop, &u->conn->worker->ctx.one_sec_timeout, &u->rate_timer);
    if (!u->conn->reading)
        return; /* the server is the slow side: the client is not timed */
    if (++u->rate_seconds < cfg->min_body_rate_window_s)
        return;
    if (u->rate_bytes < (uint64_t)cfg->min_body_rate * cfg->min_body_rate_window_s) {
        atomic_fetch_add_explicit(&u->conn->worker->stats.limit_body_rate, 1, memory_order_relaxed);
        ji_error_set(&err, JI_ERR_TOO_SLOW, 0, NULL,
                     "request body slower than --min-body-rate (%u bytes/s over %u s): %llu bytes in the last window",
                     cfg->min_body_rate, cfg->min_body_rate_window_s, (unsigned long long)u->rate_bytes);
        fail(u, &err);
        return;
    }
    u->rate_seconds = 0;
    u->rate_bytes = 0;
}

static void on_flush_timer(h2o_timeout_entry_t *entry)
{
    ji_upload_t *u = JI_CONTAINER_OF(entry, ji_upload_t, flush_timer);

    u->flush_due = true;
    process_body(u);
}

static void on_yield_timer(h2o_timeout_entry_t *entry)
{
    ji_upload_t *u = JI_CONTAINER_OF(entry, ji_upload_t, yield_timer);

    if (u->state != UPLOAD_STREAM)
        return;
    ji_conn_resume_reading(u->conn, on_read_body);
    process_body(u);
}

/** Stops for this turn of the event loop: others get served, then process_body goes on. */
static void yield(ji_upload_t *u)
{
    ji_conn_pause_reading(u->conn);
    if (!h2o_timeout_is_linked(&u->yield_timer))
        h2o_timeout_link(u->conn->worker->ctx.loop, &u->conn->worker->yield_timeout, &u->yield_timer);
}

/* ------------------------------------------------------------------ 100 Continue */

static void on_continue_written(h2o_socket_t *sock, const char *err)
{
    ji_conn_t *c = sock->data;
    ji_upload_t *u = c->upload;

    if (err != NULL) {
        ji_conn_close(c);
        return;
    }
    if (c->response_pending) {
        ji_conn_send_pending(c);
        return;
    }
    if (u != NULL && (u->state == UPLOAD_SNIFF || u->state == UPLOAD_STREAM || u->state == UPLOAD_ARRAY)) {
        ji_conn_resume_reading(c, on_read_body);
        process_body(u);
    }
}

static void send_continue(ji_upload_t *u)
{
    static h2o_iovec_t line = {H2O_STRLIT("HTTP/1.1 100 Continue\r\n\r\n")};

    u->continue_sent = true;
    ji_conn_pause_reading(u->conn);
    h2o_socket_write(u->conn->sock, &line, 1, on_continue_written);
}

/**
 * A draft creation with a body: `104 Upload Resumption Supported` with the upload's Location, before the body is
 * read (after a 100 Continue when the client waits for one: both in one write).
 */
static void send_interim(ji_upload_t *u)
{
    char *text = u->interim_text;
    size_t cap = sizeof(u->interim_text);
    h2o_iovec_t buf;
    int n;

    u->interim = false;
    n = snprintf(text, cap,
                 "%sHTTP/1.1 104 Upload Resumption Supported\r\nUpload-Draft-Interop-Version: " JI_DRAFT_INTEROP_VERSION
                 "\r\nLocation: /uploads/%s\r\n\r\n",
                 u->expect_continue && !u->continue_sent ? "HTTP/1.1 100 Continue\r\n\r\n" : "", u->rr.append.token);
    if (n < 0 || (size_t)n >= cap)
        return; /* cannot happen: a token is 32 characters */
    u->continue_sent = true;
    ji_conn_pause_reading(u->conn);
    buf = h2o_iovec_init(text, (size_t)n);
    h2o_socket_write(u->conn->sock, &buf, 1, on_continue_written);
}

/** Reads body bytes (after the 100 Continue when the client waits for one, or the 104 of a draft creation). */
static void read_body(ji_upload_t *u)
{
    if (u->interim) {
        send_interim(u);
        return;
    }
    if (u->expect_continue && !u->continue_sent) {
        send_continue(u);
        return;
    }
    if (ji_conn_is_writing(u->conn))
        return; /* on_continue_written goes on */
    ji_conn_resume_reading(u->conn, on_read_body);
    process_body(u);
}

/* ------------------------------------------------------------------ the ingest's callbacks */

static void on_ingest_resume(ji_ingest_t *in, void *owner)
{
    ji_upload_t *u = owner;

    (void)in;
    if (u->state == UPLOAD_STREAM)
        read_body(u);
}

static void answer_resumable(ji_upload_t *u, int status, const char *body, size_t len, unsigned retry_after,
                             uint64_t offset);

/*
 * The ingest ended: a POST /users, or an append to a resumable upload (answered with its durable offset). A failure
 * is logged with its route; `body` belongs to the ingest: it is copied, the ingest freed, then the answer goes out
 * (which may close the connection).
 */
static void on_ingest_done(ji_ingest_t *in, void *owner, int status, const char *body, size_t len, unsigned retry_after)
{
    ji_upload_t *u = owner;
    bool resumable = u->resumable;
    uint64_t offset = resumable ? ji_ingest_append_offset(in) : 0;
    ji_text_t copy = {0};

    if (resumable ? status >= 300 : status != 200)
        fprintf(stderr, "%s: %s %s%s %d %.*s", u->conn->client, resumable && !u->rr.create ? "PATCH" : "POST",
                resumable ? "/uploads/" : "/users", resumable ? u->rr.append.token : "", status, (int)len, body);
    ji_text_append(&copy, body, len);
    ji_ingest_outcome(in, &u->outcome);
    ji_ingest_free(in);
    u->ingest = NULL;
    if (copy.failed) {
        ji_text_free(&copy);
        ji_conn_close(u->conn);
        return;
    }
    if (resumable)
        answer_resumable(u, status, copy.base, copy.len, retry_after, offset);
    else
        answer(u, status, copy.base, copy.len, retry_after);
    ji_text_free(&copy);
}

static const ji_ingest_callbacks_t ingest_callbacks = {on_ingest_resume, on_ingest_done};

/* ------------------------------------------------------------------ the streamed body */

/** Every body byte was given to the ingest: stop reading and let it commit (unless the Content-Digest differs). */
static void body_complete(ji_upload_t *u)
{
    ji_error_t err;

    if (u->digest != NULL && ji_content_digest_verify(u->digest, &err) != 0) {
        fail(u, &err);
        return;
    }
    ji_conn_pause_reading(u->conn);
    u->state = UPLOAD_FINISHING;
    ji_ingest_end(u->ingest);
}

/*
 * yajl rescans a string that spans the chunks it is fed: feed a good amount at a time unless the body ended
 * or nothing more came for a moment. Returns true when `have` bytes should wait for more (timer armed).
 */
static bool wait_for_more(ji_upload_t *u, size_t have, bool ended)
{
    if (ended || have >= JI_FEED_MIN_BYTES || u->flush_due) {
        u->flush_due = false;
        if (h2o_timeout_is_linked(&u->flush_timer))
            h2o_timeout_unlink(&u->flush_timer);
        return false;
    }
    if (have != 0 && !h2o_timeout_is_linked(&u->flush_timer))
        h2o_timeout_link(u->conn->worker->ctx.loop, &u->conn->worker->feed_flush_timeout, &u->flush_timer);
    return true;
}

/** `n` body bytes at the front of the input buffer are done with (hashed first: the content as received). */
static void consume_wire(ji_upload_t *u, size_t n)
{
    if (n != 0) {
        if (u->digest != NULL)
            ji_content_digest_update(u->digest, u->conn->sock->input->bytes, n);
        h2o_buffer_consume(&u->conn->sock->input, n);
        ji_body_decoder_consumed(&u->body, n);
    }
}

/*
 * Content-Encoding: gzip or zstd — wire bytes are decoded into u->inflated, which is fed to the ingest. At most
 * JI_LOOP_SLICE_MS of work are done per turn of the event loop, whatever the body inflates to.
 */
static void process_encoded(ji_upload_t *u, size_t avail)
{
    uint64_t slice_end = now_ms() + JI_LOOP_SLICE_MS;
    ji_error_t err;

    for (;;) {
        bool wire_done;
        size_t taken;

        if (u->inflated_len < JI_INFLATE_BUFFER_BYTES && avail != 0) {
            size_t used = 0, out = 0;
            if (now_ms() >= slice_end) {
                yield(u);
                return;
            }
            if (u->inflated_off != 0) {
                memmove(u->inflated, u->inflated + u->inflated_off, u->inflated_len);
                u->inflated_off = 0;
            }
            if (ji_content_decoder_run(u->decoder, u->conn->sock->input->bytes, avail, &used,
                                       u->inflated + u->inflated_len, JI_INFLATE_BUFFER_BYTES - u->inflated_len, &out,
                                       &err) != 0) {
                fail(u, &err);
                return;
            }
            consume_wire(u, used);
            avail -= used;
            u->inflated_len += out;
            if (ji_content_decoder_check_end(u->decoder, avail, false, &err) != 0) {
                fail(u, &err);
                return;
            }
        }
        wire_done = ji_body_decoder_done(&u->body);
        if (wire_done && u->inflated_len == 0) {
            if (ji_content_decoder_check_end(u->decoder, 0, true, &err) != 0) {
                fail(u, &err);
                return;
            }
            body_complete(u);
            return;
        }
        if (u->inflated_len == 0 ||
            wait_for_more(u, u->inflated_len, wire_done || u->inflated_len == JI_INFLATE_BUFFER_BYTES))
            return;
        taken = ji_ingest_feed(u->ingest, u->inflated + u->inflated_off, u->inflated_len);
        u->inflated_off += taken;
        u->inflated_len -= taken;
        if (u->inflated_len != 0) {
            ji_conn_pause_reading(u->conn); /* full: the ingest resumes us */
            return;
        }
        u->inflated_off = 0;
    }
}

static void process_stream(ji_upload_t *u, size_t avail)
{
    size_t taken;

    if (u->decoder != NULL) {
        process_encoded(u, avail);
        return;
    }
    if (wait_for_more(u, avail, u->body.complete))
        return;
    if (u->body.complete)
        ji_ingest_last_bytes(u->ingest);
    taken = avail != 0 ? ji_ingest_feed(u->ingest, u->conn->sock->input->bytes, avail) : 0;
    consume_wire(u, taken);
    if (taken < avail) {
        ji_conn_pause_reading(u->conn); /* full: the ingest resumes us */
        return;
    }
    if (ji_body_decoder_done(&u->body))
        body_complete(u);
}

/* ------------------------------------------------------------------ the JSON-array body */

static void array_body_complete(ji_upload_t *u)
{
    ji_conn_t *c = u->conn;
    ji_request_head_t head;
    ji_error_t err;

    ji_conn_pause_reading(c);
    /* the head was consumed with the body's first bytes: parse the kept copy again for the h2o request */
    if (ji_request_head_parse(&head, u->head_copy, u->head_len, &err) != 0) {
        ji_error_set(&err, JI_ERR_INTERNAL, 0, NULL, "the request head changed");
        answer_error(u, &err);
        return;
    }
    u->state = UPLOAD_ANSWERED;
    u->array_request.params = u->params;
    u->array_request.params.body_bytes = u->array_len;
    ji_conn_bridge(c, &head, h2o_iovec_init(u->array_body != NULL ? u->array_body : "", u->array_len),
                   &u->array_request);
}

static void process_array(ji_upload_t *u, size_t avail)
{
    size_t max = config_of(u)->max_array_bytes;
    const char *flag = "--max-array-bytes";
    ji_error_t err;

    if (avail != 0) {
        if (config_of(u)->max_array_memory < max) {
            max = config_of(u)->max_array_memory; /* the body alone may not pass what the request may hold */
            flag = "--max-array-memory";
        }
        if (u->array_len + avail > max) {
            ji_error_set(&err, JI_ERR_TOO_LARGE, 0, NULL, "body is larger than %s (%zu bytes)", flag, max);
            fail(u, &err);
            return;
        }
        if (u->array_len + avail > u->array_cap) {
            size_t cap = u->array_cap != 0 ? u->array_cap : JI_FEED_MIN_BYTES;
            char *p;
            while (cap < u->array_len + avail)
                cap *= 2;
            if (cap > max)
                cap = max;
            if ((p = realloc(u->array_body, cap)) == NULL) {
                ji_error_set(&err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
                fail(u, &err);
                return;
            }
            u->array_body = p;
            u->array_cap = cap;
        }
        memcpy(u->array_body + u->array_len, u->conn->sock->input->bytes, avail);
        u->array_len += avail;
        consume_wire(u, avail);
    }
    if (ji_body_decoder_done(&u->body))
        array_body_complete(u);
}

/* ------------------------------------------------------------------ choosing the format */

/**
 * Takes `bytes` more of --max-memory for this upload. 0, or -1 with `err`: 503 when other uploads hold the
 * budget, 413 when this upload needs more than the whole budget (a zstd window or a digest ring on top of the
 * records: waiting would never help, so no Retry-After invites the client back).
 */
static int reserve_memory(ji_upload_t *u, uint64_t bytes, ji_error_t *err)
{
    ji_server_t *server = u->conn->worker->server;

    if (u->memory + bytes > server->config->max_memory)
        return ji_error_set(err, JI_ERR_TOO_LARGE, 0, NULL,
                            "this upload needs %llu bytes of memory (its records, and any zstd window or digest "
                            "buffer), more than --max-memory %llu bytes: it cannot run on this server",
                            (unsigned long long)(u->memory + bytes), (unsigned long long)server->config->max_memory);
    if (!ji_budget_reserve(&server->memory_budget, bytes))
        return ji_error_set(err, JI_ERR_BUSY, 0, NULL,
                            "uploads in progress hold the memory budget (--max-memory %llu bytes): retry later",
                            (unsigned long long)server->config->max_memory);
    u->memory += bytes;
    return 0;
}

/**
 * What the records of a streamed upload may hold: JI_UPLOAD_RECORD_FACTOR times the longest record. That is
 * --max-record-bytes, or the body's Content-Length when it is smaller and not compressed (no record is longer
 * than the body): a 5 KB request of 100 records does not take 16 MiB of the budget, so that 64 of them at once do
 * not get 503 with the default --max-memory.
 */
static uint64_t stream_record_memory(const ji_upload_t *u)
{
    uint64_t most = ji_config_upload_memory(config_of(u), false) - JI_UPLOAD_FIXED_BYTES;

    if (u->content_length > 0 && u->options.encoding == JI_ENCODING_IDENTITY &&
        (uint64_t)JI_UPLOAD_RECORD_FACTOR * u->content_length < most)
        return (uint64_t)JI_UPLOAD_RECORD_FACTOR * u->content_length;
    return most;
}

static int start_stream(ji_upload_t *u, ji_error_t *err)
{
    ji_worker_t *w = u->conn->worker;

    /* a zstd decoder's window is not in JI_UPLOAD_FIXED_BYTES: it is reserved with the records */
    if (reserve_memory(u,
                       stream_record_memory(u) +
                           (ji_content_digest_wanted(&u->options.digest) ? JI_DIGEST_BUFFER_BYTES : 0) +
                           ji_content_decoder_memory(u->options.encoding),
                       err) != 0)
        return -1;
    u->state = UPLOAD_STREAM;
    if (u->options.encoding != JI_ENCODING_IDENTITY &&
        ((u->decoder = ji_content_decoder_new(u->options.encoding, config_of(u)->max_inflated_bytes)) == NULL ||
         (u->inflated = malloc(JI_INFLATE_BUFFER_BYTES)) == NULL))
        return ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
    if (ji_content_digest_wanted(&u->options.digest) && (u->digest = ji_content_digest_new(&u->options.digest)) == NULL)
        return ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
    ji_conn_pause_reading(u->conn); /* nothing is read until the ingest is ready: it resumes us */
    if ((u->ingest = ji_ingest_new(&w->ingest_env, &u->params, &ingest_callbacks, u)) == NULL)
        return ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
    return 0;
}

static int start_array(ji_upload_t *u, ji_error_t *err)
{
    if (u->body.chunked == false && u->body.remaining > config_of(u)->max_array_bytes)
        return ji_error_set(err, JI_ERR_TOO_LARGE, 0, NULL, "body is larger than --max-array-bytes (%zu bytes)",
                            config_of(u)->max_array_bytes);
    if (reserve_memory(u, ji_config_upload_memory(config_of(u), true) - JI_UPLOAD_FIXED_BYTES, err) != 0 ||
        ji_array_mode_admit(u->conn->worker, &u->array_request.admission, err) != 0)
        return -1;
    u->state = UPLOAD_ARRAY;
    return 0;
}

/** The first body byte decides. Returns true when the format is known (or the request failed). */
static bool sniff(ji_upload_t *u, size_t avail)
{
    ji_error_t err;
    int r;

    if (u->options.encoding != JI_ENCODING_IDENTITY)
        r = 0; /* the first decoded byte is not at hand: gzip or zstd bodies without a format are JSON Lines */
    else if ((r = ji_body_is_array(u->conn->sock->input->bytes, avail)) < 0)
        r = ji_body_decoder_done(&u->body) || avail >= JI_MAX_SNIFF_BYTES ? 0 : -1;
    if (r < 0)
        return false; /* not yet */
    if (r == 1 && u->params.append != NULL) {
        ji_error_set(&err, JI_ERR_UNSUPPORTED, 0, NULL, "an upload's body is JSON Lines, not a JSON array");
        fail(u, &err);
        return true;
    }
    if ((r == 1 ? start_array(u, &err) : start_stream(u, &err)) != 0) {
        fail(u, &err);
        return true;
    }
    return true;
}

static void process_body(ji_upload_t *u)
{
    ji_conn_t *c = u->conn;
    h2o_buffer_t *input = c->sock->input;
    size_t buf_len = input->size, avail = 0;
    ji_error_t err;

    if (u->state != UPLOAD_SNIFF && u->state != UPLOAD_STREAM && u->state != UPLOAD_ARRAY)
        return;
    if (ji_body_decoder_prepare(&u->body, input->bytes, &buf_len, &avail, &err) != 0) {
        fail(u, &err);
        return;
    }
    input->size = buf_len;
    if (u->body.wire_bytes + (u->body.chunked ? 0 : avail) > u->body_received)
        u->body_received = u->body.wire_bytes + (u->body.chunked ? 0 : avail);
    switch (u->state) {
    case UPLOAD_SNIFF:
        if (!sniff(u, avail) || u->state != UPLOAD_ARRAY)
            return; /* the ingest resumes a stream when it is ready */
        process_array(u, avail);
        return;
    case UPLOAD_STREAM:
        process_stream(u, avail);
        return;
    case UPLOAD_ARRAY:
        process_array(u, avail);
        return;
    default:
        return;
    }
}

static void on_read_body(h2o_socket_t *sock, const char *err)
{
    ji_conn_t *c = sock->data;
    ji_upload_t *u = c->upload;

    if (err != NULL) {
        /* the client went away mid-upload: closing aborts the ingest (rollback, files removed); an append keeps
         * the complete lines it received and finishes on its own */
        if (u->ingest != NULL && u->params.append != NULL && u->state == UPLOAD_STREAM)
            ji_ingest_interrupt(u->ingest);
        ji_conn_close(c);
        return;
    }
    ji_conn_touch(c);
    u->rate_bytes += sock->bytes_read;
    process_body(u);
}

/* ------------------------------------------------------------------ the access log */

void ji_upload_outcome(const ji_upload_t *u, ji_access_entry_t *e)
{
    const ji_ingest_outcome_t *o = u->array_body != NULL ? &u->array_request.outcome : &u->outcome;

    e->upload = true;
    e->body_bytes = u->body.wire_bytes > u->body_received ? u->body.wire_bytes : u->body_received;
    e->rows = o->inserted;
    e->images = o->images;
    e->batch_id = o->batch_id;
}

/* ------------------------------------------------------------------ start */

/**
 * The upload object and its places, before any body byte is read: NULL when it answered already. The head stays
 * in the input buffer (copied into head_copy).
 */
static ji_upload_t *upload_begin(ji_conn_t *c, const ji_request_head_t *head, const ji_upload_options_t *options,
                                 const ji_resumable_request_t *rr)
{
    ji_worker_t *w = c->worker;
    ji_upload_t *u = calloc(1, sizeof(*u));
    ji_error_t err;

    if (u == NULL) {
        ji_error_set(&err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        c->body_unread = true;
        ji_conn_respond_error(c, &err);
        return NULL;
    }
    if (rr != NULL) {
        u->resumable = true;
        u->rr = *rr;
        u->params.append = &u->rr.append;
    }
    c->upload = u;
    u->conn = c;
    u->options = *options;
    u->state = UPLOAD_SNIFF;
    u->expect_continue = head->expect_continue;
    u->flush_timer.cb = on_flush_timer;
    u->yield_timer.cb = on_yield_timer;
    u->rate_timer.cb = on_rate_timer;
    u->params.skip_errors = options->skip_errors;
    u->params.has_max_errors = options->has_max_errors;
    u->params.max_errors = options->max_errors;
    u->params.idempotency_key = options->idempotency_key[0] != '\0' ? u->options.idempotency_key : NULL;
    c->body_unread = u->has_body = ji_request_has_body(head);
    if (head->chunked)
        ji_body_decoder_init_chunked(&u->body);
    else
        ji_body_decoder_init_length(&u->body, head->content_length);
    u->content_length = head->chunked ? 0 : head->content_length;

    /* places before any body byte is read */
    if (ji_client_slots_take(&w->server->client_slots, c->client, &err) != 0) {
        atomic_fetch_add_explicit(&w->stats.limit_client_ingests, 1, memory_order_relaxed);
        answer_error(u, &err);
        return NULL;
    }
    u->client_slot = true;
    if (ji_server_admit_ingest(w, &err) != 0) {
        answer_error(u, &err);
        return NULL;
    }
    u->admitted = true;
    if (reserve_memory(u, JI_UPLOAD_FIXED_BYTES, &err) != 0) {
        answer_error(u, &err);
        return NULL;
    }
    if ((u->head_copy = malloc(head->head_len)) == NULL) {
        ji_error_set(&err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        answer_error(u, &err);
        return NULL;
    }
    memcpy(u->head_copy, c->sock->input->bytes, head->head_len);
    u->head_len = head->head_len;
    return u;
}

void ji_upload_start(ji_conn_t *c, const ji_request_head_t *head, const ji_upload_options_t *options)
{
    ji_worker_t *w = c->worker;
    ji_upload_t *u = upload_begin(c, head, options, NULL);
    ji_error_t err;

    if (u == NULL)
        return;
    h2o_buffer_consume(&c->sock->input, head->head_len);

    if (options->format != JI_FORMAT_UNDECIDED) {
        if ((options->format == JI_FORMAT_ARRAY ? start_array(u, &err) : start_stream(u, &err)) != 0) {
            answer_error(u, &err);
            return;
        }
    }
    if (config_of(u)->min_body_rate != 0)
        h2o_timeout_link(w->ctx.loop, &w->ctx.one_sec_timeout, &u->rate_timer);
    if (u->state != UPLOAD_STREAM)
        read_body(u); /* a stream reads once its ingest is ready */
}

/* ------------------------------------------------------------------ resumable uploads */

/**
 * The batch of a committed upload: the one this append committed, else the one its answer names (an upload whose
 * Idempotency-Key committed another batch meanwhile answers that batch's kept answer). 0: none.
 */
static long long batch_id_of(const ji_upload_t *u, const char *body, size_t len)
{
    static const char key[] = "\"batch_id\":";
    const char *p;

    if (u->outcome.batch_id != 0)
        return (long long)u->outcome.batch_id;
    if (body == NULL || (p = memmem(body, len, key, sizeof(key) - 1)) == NULL)
        return 0;
    p += sizeof(key) - 1;
    while (p < body + len && *p == ' ')
        p++;
    return p < body + len && *p >= '0' && *p <= '9' ? strtoll(p, NULL, 10) : 0;
}

/** The answer of an append (or of a creation's first append) from the ingest's done status. */
static void answer_resumable(ji_upload_t *u, int status, const char *body, size_t len, unsigned retry_after,
                             uint64_t offset)
{
    ji_worker_t *w = u->conn->worker;
    const ji_ingest_append_t *a = &u->rr.append;
    time_t expires = time(NULL) + (time_t)w->server->config->upload_expiry_s;
    ji_text_t extra = {0};
    bool create = u->rr.create;

    if ((status == 200 || status == 204) && a->offset > 0)
        atomic_fetch_add_explicit(&w->ingest_stats.uploads_resumed, 1, memory_order_relaxed);
    if (status == 200) { /* the upload committed */
        atomic_fetch_add_explicit(&w->ingest_stats.uploads_completed, 1, memory_order_relaxed);
        ji_upload_headers_write(&extra, a->draft, a->token, create, (int64_t)offset, 1, 0);
        if (batch_id_of(u, body, len) > 0)
            ji_text_printf(&extra, "Content-Location: /batches/%lld\r\n", batch_id_of(u, body, len));
        if (!a->draft) { /* tus: the body is not part of the protocol's answer */
            status = create ? 201 : 204;
            len = 0;
        }
    } else if (status == 204) { /* kept: the upload goes on */
        ji_upload_headers_write(&extra, a->draft, a->token, create, (int64_t)offset, 0, expires);
        if (create)
            status = 201;
        len = 0;
    } else if (status == 409) { /* the client's offset is not the upload's */
        ji_upload_headers_write(&extra, a->draft, a->token, false, (int64_t)offset, 0, 0);
    } else {
        ji_upload_headers_write(&extra, a->draft, a->token, create, -1, -1, 0);
    }
    if (extra.failed) {
        ji_text_free(&extra);
        ji_conn_close(u->conn);
        return;
    }
    answer_with(u, status, body, len, retry_after, extra.base);
    ji_text_free(&extra);
}

/** The body (of an append, or a creation's first) streams into an append ingest. */
static void start_append(ji_upload_t *u)
{
    ji_error_t err;

    if (start_stream(u, &err) != 0) {
        answer_error(u, &err);
        return;
    }
    if (config_of(u)->min_body_rate != 0)
        h2o_timeout_link(u->conn->worker->ctx.loop, &u->conn->worker->ctx.one_sec_timeout, &u->rate_timer);
}

/** A creation's row is in: answer 201 when there is nothing to append, else stream the body as the first append. */
static void on_created(ji_upload_create_t *cr, const char *db_err)
{
    ji_upload_t *u = JI_CONTAINER_OF(cr, ji_upload_t, create);
    ji_worker_t *w = u->conn->worker;
    const ji_upload_creation_t *c = &u->rr.creation;
    ji_error_t err;
    bool body = u->has_body;

    if (u->state != UPLOAD_CREATING)
        return;
    if (db_err != NULL) {
        fprintf(stderr, "%s: creating an upload: database: %s\n", u->conn->client, db_err);
        ji_error_set(&err, JI_ERR_DB, 0, NULL, "database unavailable: the upload was not created");
        answer_error(u, &err);
        return;
    }
    atomic_fetch_add_explicit(&w->ingest_stats.uploads_created, 1, memory_order_relaxed);
    memcpy(u->rr.append.token, cr->token, sizeof(u->rr.append.token));
    u->expires_at = cr->expires_at;
    /* an empty upload that is complete at once (draft ?1, or a tus length of 0) commits through an empty append */
    if (!body && !(c->draft && c->complete) && !(!c->draft && c->has_length && c->length == 0)) {
        ji_text_t extra = {0};
        ji_upload_headers_write(&extra, c->draft, cr->token, true, c->draft ? 0 : -1, c->draft ? 0 : -1,
                                cr->expires_at);
        if (extra.failed) {
            ji_text_free(&extra);
            ji_conn_close(u->conn);
            return;
        }
        answer_with(u, 201, "", 0, 0, extra.base);
        ji_text_free(&extra);
        return;
    }
    u->interim = c->draft && body && u->http11; /* no interim answer to an HTTP/1.0 client */
    u->state = UPLOAD_SNIFF;                    /* start_stream moves on to UPLOAD_STREAM */
    start_append(u);
}

void ji_upload_start_resumable(ji_conn_t *c, const ji_request_head_t *head, const ji_resumable_request_t *rr)
{
    ji_upload_options_t options = rr->create ? rr->creation.options : (ji_upload_options_t){0};
    ji_upload_t *u;
    ji_error_t err;

    options.format = JI_FORMAT_JSONL;
    options.encoding = JI_ENCODING_IDENTITY;
    memset(&options.digest, 0, sizeof(options.digest));
    if ((u = upload_begin(c, head, &options, rr)) == NULL)
        return;
    u->http11 = head->minor_version >= 1;
    if (rr->create) {
        u->state = UPLOAD_CREATING;
        ji_conn_pause_reading(c);
        if (ji_upload_create_start(&u->create, c->worker, &u->rr.creation, rr->metadata, rr->metadata_len, on_created,
                                   &err) != 0) {
            h2o_buffer_consume(&c->sock->input, head->head_len);
            answer_error(u, &err);
            return;
        }
        h2o_buffer_consume(&c->sock->input, head->head_len); /* the metadata was copied */
        return;
    }
    h2o_buffer_consume(&c->sock->input, head->head_len);
    start_append(u);
}
