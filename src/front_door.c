/*
 * front_door.c — owns a connection from accept until it is handed to h2o or
 * closed: request-head parsing, routing, the streamed POST /users body
 * (framing, feed batching, pause/resume), and writing the answer.
 */
#include "front_door.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>

#include "body_decoder.h"
#include "gunzip.h"
#include "h2o/http1.h"
#include "ingest.h"
#include "picohttp.h"
#include "request_options.h"
#include "json_text.h"




typedef enum {
    CONN_HEAD,       /**< reading a request head */
    CONN_SNIFF,      /**< head parsed, looking at the first body byte to choose the format */
    CONN_BODY,       /**< streaming the body into the ingest */
    CONN_FINISHING,  /**< body complete, the ingest commits */
    CONN_RESPONDING, /**< writing the answer */
    CONN_LINGERING,  /**< answer sent, draining what the client still sends before closing */
} conn_state_t;

typedef struct st_ji_conn_t {
    ji_worker_t *worker;
    h2o_socket_t *sock;
    struct timeval connected_at;
    conn_state_t state;

    /* the request */
    size_t head_len;
    bool keep_alive;
    bool expect_continue;
    bool continue_sent;
    bool chunked;
    uint64_t content_length;
    ji_body_decoder_t body;
    ji_ingest_t *ingest;
    bool admitted; /**< holds an upload place (ji_server_admit_ingest) */
    ji_ingest_params_t params;
    char idempotency_key[JI_MAX_IDEMPOTENCY_VALUE_BYTES + 1];
    bool flush_due;
    bool gzip;           /**< Content-Encoding: gzip */
    ji_gunzip_t *gunzip; /**< its inflater, while the body streams */
    char *inflated;      /**< JI_INFLATE_BUFFER_BYTES of inflated body */
    size_t inflated_off, inflated_len;

    /* the answer */
    ji_text_t response;
    bool close_after;
    bool response_pending; /**< ready while the 100 Continue was still being written */

    h2o_timeout_entry_t flush_timer;
    h2o_timeout_entry_t idle_timer;
    h2o_linklist_t link; /**< in worker->conns */
} ji_conn_t;

static void on_read_head(h2o_socket_t *sock, const char *err);
static void on_read_body(h2o_socket_t *sock, const char *err);
static void process_head(ji_conn_t *c);
static void process_body(ji_conn_t *c);
static void send_response(ji_conn_t *c);

/* ------------------------------------------------------------------ lifetime */

static void stop_timers(ji_conn_t *c)
{
    if (h2o_timeout_is_linked(&c->flush_timer))
        h2o_timeout_unlink(&c->flush_timer);
    if (h2o_timeout_is_linked(&c->idle_timer))
        h2o_timeout_unlink(&c->idle_timer);
}

static void free_gzip(ji_conn_t *c)
{
    if (c->gunzip != NULL) {
        ji_gunzip_free(c->gunzip);
        c->gunzip = NULL;
    }
    free(c->inflated);
    c->inflated = NULL;
    c->inflated_off = c->inflated_len = 0;
    c->gzip = false;
}

/** Frees the ingest (aborting it when unfinished) and gives its upload place back. */
static void free_ingest(ji_conn_t *c)
{
    if (c->ingest != NULL) {
        ji_ingest_free(c->ingest);
        c->ingest = NULL;
    }
    if (c->admitted) {
        ji_server_release_ingest(c->worker);
        c->admitted = false;
    }
}

static void close_conn(ji_conn_t *c)
{
    stop_timers(c);
    if (h2o_linklist_is_linked(&c->link))
        h2o_linklist_unlink(&c->link);
    free_ingest(c);
    free_gzip(c);
    ji_text_free(&c->response);
    if (c->sock != NULL) {
        c->sock->data = NULL;
        h2o_socket_close(c->sock);
    }
    free(c);
}

static void arm_idle(ji_conn_t *c, h2o_timeout_t *which)
{
    if (h2o_timeout_is_linked(&c->idle_timer))
        h2o_timeout_unlink(&c->idle_timer);
    h2o_timeout_link(c->worker->ctx.loop, which, &c->idle_timer);
}

static void on_idle_timeout(h2o_timeout_entry_t *entry)
{
    ji_conn_t *c = JI_CONTAINER_OF(entry, ji_conn_t, idle_timer);

    if (c->state == CONN_BODY && c->ingest != NULL) {
        ji_error_t err;
        ji_error_set(&err, JI_ERR_MALFORMED, 0, NULL, "request body stalled: no bytes for %u ms",
                     (unsigned)c->worker->idle_timeout.timeout);
        ji_ingest_fail(c->ingest, &err);
        h2o_socket_read_stop(c->sock);
        return;
    }
    close_conn(c); /* a stalled head, or the end of lingering */
}

static void on_flush_timer(h2o_timeout_entry_t *entry)
{
    ji_conn_t *c = JI_CONTAINER_OF(entry, ji_conn_t, flush_timer);

    c->flush_due = true;
    process_body(c);
}

/** Back to reading a new request head on this connection. */
static void start_next_request(ji_conn_t *c)
{
    c->state = CONN_HEAD;
    c->head_len = 0;
    c->keep_alive = false;
    c->expect_continue = c->continue_sent = c->chunked = false;
    c->content_length = 0;
    c->flush_due = false;
    c->close_after = c->response_pending = false;
    free_gzip(c);
    memset(&c->params, 0, sizeof(c->params));
    ji_text_free(&c->response);
    arm_idle(c, &c->worker->idle_timeout);
    h2o_socket_read_start(c->sock, on_read_head);
    if (c->sock->input->size != 0)
        process_head(c); /* a pipelined request is already here */
}

/* ------------------------------------------------------------------ writing the answer */

static void on_linger_read(h2o_socket_t *sock, const char *err)
{
    ji_conn_t *c = sock->data;

    if (err != NULL) {
        close_conn(c);
        return;
    }
    h2o_buffer_consume(&sock->input, sock->input->size);
}

static void on_response_written(h2o_socket_t *sock, const char *err)
{
    ji_conn_t *c = sock->data;

    if (err != NULL || c->state != CONN_RESPONDING) {
        close_conn(c);
        return;
    }
    ji_text_free(&c->response);
    if (!c->close_after) {
        start_next_request(c);
        return;
    }
    /* Closing with unread input would reset the connection and could destroy the answer before the client
     * reads it: stop sending, drain what still comes for a moment, then close. */
    c->state = CONN_LINGERING;
    shutdown(h2o_socket_get_fd(sock), SHUT_WR);
    arm_idle(c, &c->worker->linger_timeout);
    h2o_buffer_consume(&sock->input, sock->input->size);
    h2o_socket_read_start(sock, on_linger_read);
}

static void send_response(ji_conn_t *c)
{
    h2o_iovec_t buf;

    if (h2o_socket_is_writing(c->sock)) {
        c->response_pending = true; /* the 100 Continue is still on its way */
        return;
    }
    c->state = CONN_RESPONDING;
    stop_timers(c);
    h2o_socket_read_stop(c->sock);
    buf = h2o_iovec_init(c->response.base, c->response.len);
    h2o_socket_write(c->sock, &buf, 1, on_response_written);
}

/** Prepares the whole answer in c->response. 0, or -1 when out of memory. */
static int build_response(ji_conn_t *c, int status, const char *body, size_t len, unsigned retry_after,
                          const char *extra_headers)
{
    ji_text_t *t = &c->response;

    ji_text_free(t);
    c->close_after = status != 200 || !c->keep_alive;
    ji_text_printf(t, "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n", status,
                   ji_http_reason(status), len);
    if (retry_after != 0)
        ji_text_printf(t, "Retry-After: %u\r\n", retry_after);
    if (extra_headers != NULL)
        ji_text_printf(t, "%s", extra_headers);
    ji_text_printf(t, "Connection: %s\r\n\r\n", c->close_after ? "close" : "keep-alive");
    ji_text_append(t, body, len);
    return t->failed ? -1 : 0;
}

/** Answers an error found by the front door itself, then closes. `extra_headers`: NULL or "Name: value\r\n"... */
static void respond_error_with(ji_conn_t *c, ji_error_kind_t kind, const char *message, const char *extra_headers)
{
    ji_error_t err;
    ji_text_t body = {0};
    int r;

    ji_error_set(&err, kind, 0, NULL, "%s", message);
    ji_response_error_json(&body, &err);
    c->keep_alive = false;
    c->state = CONN_RESPONDING;
    h2o_socket_read_stop(c->sock);
    r = body.failed ? -1
                    : build_response(c, ji_error_http_status(kind), body.base, body.len, ji_error_retry_after(kind),
                                     extra_headers);
    ji_text_free(&body);
    if (r != 0)
        close_conn(c);
    else
        send_response(c);
}

static void respond_error(ji_conn_t *c, ji_error_kind_t kind, const char *message)
{
    respond_error_with(c, kind, message, kind == JI_ERR_UNAUTHORIZED ? "WWW-Authenticate: Bearer\r\n" : NULL);
}

/* ------------------------------------------------------------------ the ingest's callbacks */

static void on_continue_written(h2o_socket_t *sock, const char *err)
{
    ji_conn_t *c = sock->data;

    if (err != NULL) {
        close_conn(c);
        return;
    }
    if (c->response_pending) {
        c->response_pending = false;
        send_response(c);
        return;
    }
    if (c->state == CONN_BODY || c->state == CONN_SNIFF) {
        arm_idle(c, &c->worker->idle_timeout);
        h2o_socket_read_start(sock, c->state == CONN_BODY ? on_read_body : on_read_head);
        if (c->state == CONN_BODY)
            process_body(c);
    }
}

static void send_continue(ji_conn_t *c)
{
    static h2o_iovec_t line = {H2O_STRLIT("HTTP/1.1 100 Continue\r\n\r\n")};

    c->continue_sent = true;
    h2o_socket_read_stop(c->sock);
    h2o_socket_write(c->sock, &line, 1, on_continue_written);
}

static void on_ingest_resume(ji_ingest_t *in, void *owner)
{
    ji_conn_t *c = owner;

    (void)in;
    if (c->state != CONN_BODY)
        return;
    if (c->expect_continue && !c->continue_sent) {
        send_continue(c);
        return;
    }
    if (h2o_socket_is_writing(c->sock))
        return; /* on_continue_written goes on */
    arm_idle(c, &c->worker->idle_timeout);
    h2o_socket_read_start(c->sock, on_read_body);
    process_body(c);
}

static void on_ingest_done(ji_ingest_t *in, void *owner, int status, const char *body, size_t len,
                           unsigned retry_after)
{
    ji_conn_t *c = owner;
    int r;

    if (status != 200)
        fprintf(stderr, "POST /users %d %.*s", status, (int)len, body);
    /* the body is not all read after a failure: the connection cannot carry another request */
    if (c->state != CONN_FINISHING)
        c->keep_alive = false;
    c->state = CONN_RESPONDING;
    h2o_socket_read_stop(c->sock);
    r = build_response(c, status, body, len, retry_after, NULL);
    (void)in;
    free_ingest(c); /* `body` belonged to the ingest; the answer was copied */
    if (r != 0)
        close_conn(c);
    else
        send_response(c);
}

static const ji_ingest_callbacks_t ingest_callbacks = {on_ingest_resume, on_ingest_done};

/* ------------------------------------------------------------------ the streamed body */

/** Body bytes were fed to the ingest: the wire side is done; stop reading and let the ingest commit. */
static void body_complete(ji_conn_t *c)
{
    h2o_socket_read_stop(c->sock);
    if (h2o_timeout_is_linked(&c->idle_timer))
        h2o_timeout_unlink(&c->idle_timer);
    c->state = CONN_FINISHING;
    ji_ingest_end(c->ingest);
}

/** The ingest took less than offered (full, or failed): stop reading until it resumes or answers. */
static void ingest_full(ji_conn_t *c)
{
    h2o_socket_read_stop(c->sock);
    if (h2o_timeout_is_linked(&c->idle_timer))
        h2o_timeout_unlink(&c->idle_timer);
}

static void body_failed(ji_conn_t *c, ji_error_t *err)
{
    h2o_socket_read_stop(c->sock);
    ji_ingest_fail(c->ingest, err);
}

/*
 * yajl rescans a string that spans the chunks it is fed: feed a good amount at a time unless the body ended
 * or nothing more came for a moment. Returns true when `have` bytes should wait for more (timer armed).
 */
static bool wait_for_more(ji_conn_t *c, size_t have, bool ended)
{
    if (ended || have >= JI_FEED_MIN_BYTES || c->flush_due) {
        c->flush_due = false;
        if (h2o_timeout_is_linked(&c->flush_timer))
            h2o_timeout_unlink(&c->flush_timer);
        return false;
    }
    if (have != 0 && !h2o_timeout_is_linked(&c->flush_timer))
        h2o_timeout_link(c->worker->ctx.loop, &c->worker->feed_flush_timeout, &c->flush_timer);
    return true;
}

static void consume_wire(ji_conn_t *c, size_t n)
{
    if (n != 0) {
        h2o_buffer_consume(&c->sock->input, n);
        ji_body_decoder_consumed(&c->body, n);
    }
}

/* Content-Encoding: gzip — wire bytes are inflated into c->inflated, which is fed to the ingest. */
static void process_gzip(ji_conn_t *c, size_t avail)
{
    ji_error_t err;

    for (;;) {
        bool wire_done;
        size_t taken;

        bool ran = false;

        /* a finished inflater still takes a further gzip member (multi-member bodies, any read boundary) */
        if (c->inflated_len < JI_INFLATE_BUFFER_BYTES && avail != 0) {
            size_t used = 0, out = 0;
            if (c->inflated_off != 0) {
                memmove(c->inflated, c->inflated + c->inflated_off, c->inflated_len);
                c->inflated_off = 0;
            }
            if (ji_gunzip_run(c->gunzip, c->sock->input->bytes, avail, &used, c->inflated + c->inflated_len,
                              JI_INFLATE_BUFFER_BYTES - c->inflated_len, &out, &err) != 0) {
                body_failed(c, &err);
                return;
            }
            consume_wire(c, used);
            avail -= used;
            c->inflated_len += out;
            ran = true;
        }
        if (ran && ji_gunzip_finished(c->gunzip) && avail != 0) {
            ji_error_set(&err, JI_ERR_MALFORMED, 0, NULL, "data after the end of the gzip body");
            body_failed(c, &err);
            return;
        }
        wire_done = ji_body_decoder_done(&c->body);
        if (wire_done && c->inflated_len == 0) {
            if (!ji_gunzip_finished(c->gunzip)) {
                ji_error_set(&err, JI_ERR_MALFORMED, 0, NULL, "corrupt gzip body: truncated");
                body_failed(c, &err);
                return;
            }
            body_complete(c);
            return;
        }
        if (c->inflated_len == 0 ||
            wait_for_more(c, c->inflated_len, wire_done || c->inflated_len == JI_INFLATE_BUFFER_BYTES))
            return;
        taken = ji_ingest_feed(c->ingest, c->inflated + c->inflated_off, c->inflated_len);
        c->inflated_off += taken;
        c->inflated_len -= taken;
        if (c->inflated_len != 0) {
            ingest_full(c);
            return;
        }
        c->inflated_off = 0;
    }
}

static void process_body(ji_conn_t *c)
{
    h2o_buffer_t *input = c->sock->input;
    size_t buf_len = input->size, avail = 0, taken;
    ji_error_t err;

    if (c->state != CONN_BODY || c->ingest == NULL)
        return;
    if (ji_body_decoder_prepare(&c->body, input->bytes, &buf_len, &avail, &err) != 0) {
        body_failed(c, &err);
        return;
    }
    input->size = buf_len;
    if (c->gunzip != NULL) {
        process_gzip(c, avail);
        return;
    }
    if (wait_for_more(c, avail, c->body.complete))
        return;
    taken = avail != 0 ? ji_ingest_feed(c->ingest, input->bytes, avail) : 0;
    consume_wire(c, taken);
    if (taken < avail) {
        ingest_full(c);
        return;
    }
    if (ji_body_decoder_done(&c->body))
        body_complete(c);
}

static void on_read_body(h2o_socket_t *sock, const char *err)
{
    ji_conn_t *c = sock->data;

    if (err != NULL) {
        /* the client went away mid-upload: close_conn aborts the ingest (rollback, files removed) */
        close_conn(c);
        return;
    }
    arm_idle(c, &c->worker->idle_timeout);
    process_body(c);
}

static void start_stream(ji_conn_t *c)
{
    ji_error_t err;

    h2o_buffer_consume(&c->sock->input, c->head_len);
    if (c->chunked)
        ji_body_decoder_init_chunked(&c->body);
    else
        ji_body_decoder_init_length(&c->body, c->content_length);
    c->state = CONN_BODY;
    if (c->gzip && ((c->gunzip = ji_gunzip_new(c->worker->server->config->max_inflated_bytes)) == NULL ||
                    (c->inflated = malloc(JI_INFLATE_BUFFER_BYTES)) == NULL)) {
        respond_error(c, JI_ERR_INTERNAL, "out of memory");
        return;
    }
    h2o_socket_read_stop(c->sock); /* nothing is read until the ingest is ready */
    if (h2o_timeout_is_linked(&c->idle_timer))
        h2o_timeout_unlink(&c->idle_timer);
    if (ji_server_admit_ingest(c->worker, &err) != 0) {
        respond_error(c, err.kind, err.message);
        return;
    }
    c->admitted = true;
    if ((c->ingest = ji_ingest_new(&c->worker->ingest_env, &c->params, &ingest_callbacks, c)) == NULL)
        respond_error(c, JI_ERR_INTERNAL, "out of memory");
}

/* ------------------------------------------------------------------ routing */

static void hand_to_h2o(ji_conn_t *c)
{
    h2o_socket_t *sock = c->sock;
    ji_worker_t *w = c->worker;
    struct timeval connected_at = c->connected_at;

    h2o_socket_read_stop(sock);
    c->sock = NULL;
    close_conn(c);
    sock->data = NULL;
    h2o_http1_accept(&w->accept_ctx, sock, connected_at);
}

static bool header_is(const struct phr_header *h, const char *name)
{
    return h->name_len == strlen(name) && strncasecmp(h->name, name, h->name_len) == 0;
}

static bool value_is(const struct phr_header *h, const char *value)
{
    return h->value_len == strlen(value) && strncasecmp(h->value, value, h->value_len) == 0;
}

static bool value_has_token(const struct phr_header *h, const char *token)
{
    size_t tlen = strlen(token);
    const char *p = h->value, *end = h->value + h->value_len;

    while (p < end) {
        const char *comma = memchr(p, ',', end - p), *stop = comma ? comma : end;
        while (p < stop && (*p == ' ' || *p == '\t'))
            p++;
        const char *q = stop;
        while (q > p && (q[-1] == ' ' || q[-1] == '\t'))
            q--;
        if ((size_t)(q - p) == tlen && strncasecmp(p, token, tlen) == 0)
            return true;
        p = stop + 1;
    }
    return false;
}

static bool span_is(const char *s, size_t len, const char *lit)
{
    return len == strlen(lit) && memcmp(s, lit, len) == 0;
}

/** Looks at the first non-space body byte. 1 = '[' (array), 0 = anything else or an empty body, -2 = not yet. */
static int sniff_array(ji_conn_t *c)
{
    const char *body = c->sock->input->bytes + c->head_len;
    size_t have = c->sock->input->size - c->head_len, len;
    char copy[4096];
    int found;

    if (c->chunked) {
        /* decode a copy of the first framed bytes; the real decoding happens later, in place */
        struct phr_chunked_decoder dec = {0};
        ssize_t r;
        len = have < sizeof(copy) ? have : sizeof(copy);
        memcpy(copy, body, len);
        dec.consume_trailer = 1;
        r = phr_decode_chunked(&dec, copy, &len);
        if (r == -1)
            return 0; /* the streaming path reports the framing error */
        if ((found = ji_request_body_is_array(copy, len)) >= 0)
            return found;
        return r >= 0 || have >= JI_MAX_SNIFF_BYTES ? 0 : -2;
    }
    len = have < c->content_length ? have : (size_t)c->content_length;
    if ((found = ji_request_body_is_array(body, len)) >= 0)
        return found;
    return len == c->content_length || len >= JI_MAX_SNIFF_BYTES ? 0 : -2;
}

static void decide_format(ji_conn_t *c)
{
    int r = sniff_array(c);

    if (r == -2) {
        c->state = CONN_SNIFF;
        if (c->expect_continue && !c->continue_sent)
            send_continue(c);
        return;
    }
    if (r == 1)
        hand_to_h2o(c);
    else
        start_stream(c);
}

/** Whether the (possibly partial) head holds more header lines than JI_MAX_HEADERS. */
static bool too_many_headers(const char *buf, size_t len)
{
    size_t lines = 0;

    for (const char *p = buf, *end = buf + len; p < end && (p = memchr(p, '\n', end - p)) != NULL; p++) {
        if (p + 1 < end && (p[1] == '\n' || (p[1] == '\r' && p + 2 < end && p[2] == '\n')))
            break; /* the blank line: the head ended */
        lines++;
    }
    return lines > JI_MAX_HEADERS + 1; /* the request line is one of them */
}

static void process_head(ji_conn_t *c)
{
    const char *method, *path;
    size_t method_len, path_len, num_headers = JI_MAX_HEADERS;
    struct phr_header headers[JI_MAX_HEADERS];
    int minor, r;
    const char *query = NULL, *v;
    size_t path_only, qlen = 0;
    ji_format_t format;
    ji_request_options_t options;
    ji_error_t err;
    bool has_length = false, connection_close = false, connection_keep_alive = false;
    const struct phr_header *authorization = NULL, *idempotency_key = NULL;

    if (c->state == CONN_SNIFF) {
        decide_format(c);
        return;
    }
    r = phr_parse_request(c->sock->input->bytes, c->sock->input->size, &method, &method_len, &path, &path_len,
                          &minor, headers, &num_headers, 0);
    if ((r == -2 && c->sock->input->size >= JI_MAX_HEAD_BYTES) || r > (int)JI_MAX_HEAD_BYTES) {
        respond_error(c, JI_ERR_HEAD_TOO_LARGE, "request head is larger than JI_MAX_HEAD_BYTES (" JI_STR(JI_MAX_HEAD_BYTES) " bytes)");
        return;
    }
    if (r == -2)
        return;
    if (r == -1) {
        /* picohttpparser says -1 for more headers than it was given room for, too */
        if (too_many_headers(c->sock->input->bytes, c->sock->input->size)) {
            respond_error(c, JI_ERR_HEAD_TOO_LARGE, "request head has more than JI_MAX_HEADERS (" JI_STR(JI_MAX_HEADERS) ") headers");
            return;
        }
        /* h2o answers malformed requests its own way */
        hand_to_h2o(c);
        return;
    }
    c->head_len = (size_t)r;

    v = memchr(path, '?', path_len);
    path_only = v ? (size_t)(v - path) : path_len;
    if (v != NULL) {
        query = v + 1;
        qlen = path_len - path_only - 1;
    }
    if (!span_is(method, method_len, "POST") || !span_is(path, path_only, "/users")) {
        hand_to_h2o(c);
        return;
    }

    /* format and mode from the query */
    if (ji_request_options_parse_query(&options, query != NULL ? query : "", qlen, &err) != 0) {
        respond_error(c, err.kind, err.message);
        return;
    }
    c->params.skip_errors = options.skip_errors;
    format = options.format;

    for (size_t i = 0; i != num_headers; i++) {
        const struct phr_header *h = &headers[i];
        if (h->name == NULL)
            continue;
        if (header_is(h, "content-length")) {
            uint64_t n = 0;
            if (h->value_len == 0 || h->value_len > 19)
                goto BadLength;
            for (size_t k = 0; k < h->value_len; k++) {
                if (h->value[k] < '0' || h->value[k] > '9')
                    goto BadLength;
                n = n * 10 + (uint64_t)(h->value[k] - '0');
            }
            if (has_length && n != c->content_length)
                goto BadLength;
            has_length = true;
            c->content_length = n;
        } else if (header_is(h, "transfer-encoding")) {
            if (!value_is(h, "chunked")) {
                respond_error(c, JI_ERR_NOT_IMPLEMENTED, "only Transfer-Encoding: chunked is supported");
                return;
            }
            c->chunked = true;
        } else if (header_is(h, "content-encoding")) {
            if (value_is(h, "gzip") || value_is(h, "x-gzip")) {
                c->gzip = true;
            } else if (!value_is(h, "identity")) {
                respond_error(c, JI_ERR_UNSUPPORTED, "unsupported Content-Encoding");
                return;
            }
        } else if (header_is(h, "content-type")) {
            if (format == JI_FORMAT_UNDECIDED && ji_request_content_type_is_jsonl(h->value, h->value_len))
                format = JI_FORMAT_JSONL;
        } else if (header_is(h, "expect")) {
            if (!value_is(h, "100-continue")) {
                respond_error(c, JI_ERR_EXPECTATION, "unknown expectation");
                return;
            }
            c->expect_continue = minor >= 1;
        } else if (header_is(h, "authorization")) {
            authorization = h;
        } else if (header_is(h, "idempotency-key")) {
            idempotency_key = h;
        } else if (header_is(h, "connection")) {
            connection_close |= value_has_token(h, "close");
            connection_keep_alive |= value_has_token(h, "keep-alive");
        }
    }
    if (has_length && c->chunked) {
        respond_error(c, JI_ERR_MALFORMED, "Content-Length and Transfer-Encoding together");
        return;
    }
    if (c->chunked && minor == 0) {
        respond_error(c, JI_ERR_MALFORMED, "chunked encoding needs HTTP/1.1");
        return;
    }
    c->keep_alive = minor >= 1 ? !connection_close : connection_keep_alive;
    /* before a byte of the body is read (a tighter limit before authentication) */
    if (!ji_server_authorized(c->worker->server, authorization ? authorization->value : NULL,
                              authorization ? authorization->value_len : 0)) {
        respond_error(c, JI_ERR_UNAUTHORIZED, "missing or invalid bearer token");
        return;
    }
    if (idempotency_key != NULL) {
        if (ji_idempotency_key_check(idempotency_key->value, idempotency_key->value_len, &err) != 0) {
            respond_error(c, err.kind, err.message);
            return;
        }
        memcpy(c->idempotency_key, idempotency_key->value, idempotency_key->value_len);
        c->idempotency_key[idempotency_key->value_len] = '\0';
        c->params.idempotency_key = c->idempotency_key;
    }

    if (format == JI_FORMAT_ARRAY) {
        /* the JSON-array mode is an h2o handler; refuse an announced oversize body before h2o buffers it */
        if (has_length && c->content_length > c->worker->server->config->max_array_bytes)
            respond_error(c, JI_ERR_TOO_LARGE, "body is larger than --max-array-bytes");
        else
            hand_to_h2o(c);
    } else if (format == JI_FORMAT_UNDECIDED) {
        decide_format(c);
    } else {
        start_stream(c);
    }
    return;

BadLength:
    respond_error(c, JI_ERR_MALFORMED, "invalid Content-Length");
}

static void on_read_head(h2o_socket_t *sock, const char *err)
{
    ji_conn_t *c = sock->data;

    if (err != NULL) {
        close_conn(c);
        return;
    }
    process_head(c);
}

void ji_front_door_accept(ji_worker_t *w, h2o_socket_t *sock)
{
    ji_conn_t *c = calloc(1, sizeof(*c));
    int rcvbuf = JI_SOCKET_RCVBUF_BYTES;

    setsockopt(h2o_socket_get_fd(sock), SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
    if (c == NULL) {
        h2o_socket_close(sock);
        return;
    }
    c->worker = w;
    c->sock = sock;
    gettimeofday(&c->connected_at, NULL);
    c->flush_timer.cb = on_flush_timer;
    c->idle_timer.cb = on_idle_timeout;
    sock->data = c;
    h2o_linklist_insert(&w->conns, &c->link);
    start_next_request(c);
}

void ji_front_door_close_all(ji_worker_t *w)
{
    while (!h2o_linklist_is_empty(&w->conns))
        close_conn(H2O_STRUCT_FROM_MEMBER(ji_conn_t, link, w->conns.next));
}
