/*
 * front_door.c — owns every connection from accept to close, and how many
 * stay open (--max-connections, --keepalive-timeout): reads each
 * request head, puts it through the same rules whatever came before on the
 * connection (request_rules.c, routes.c), then hands the request to the stage
 * that serves it (upload_stream.c for POST /users and for the creations and
 * appends of resumable uploads, whose upload headers are judged here first;
 * the h2o bridge for the rest) and writes answers of its own. After each answer the connection comes
 * back here (keep-alive, pipelining) or lingers and closes.
 */
#include "front_door.h"

#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "conn.h"
#include "routes.h"
#include "upload_headers.h"

static void on_read_head(h2o_socket_t *sock, const char *err);
static void process_head(ji_conn_t *c);
static void send_response(ji_conn_t *c);

/* ------------------------------------------------------------------ flow control and timers */

void ji_conn_pause_reading(ji_conn_t *c)
{
    if (c->reading) {
        h2o_socket_read_stop(c->sock);
        c->reading = false;
    }
    if (h2o_timeout_is_linked(&c->idle_timer))
        h2o_timeout_unlink(&c->idle_timer);
}

void ji_conn_touch(ji_conn_t *c)
{
    if (h2o_timeout_is_linked(&c->idle_timer))
        h2o_timeout_unlink(&c->idle_timer);
    h2o_timeout_link(c->worker->ctx.loop, &c->worker->idle_timeout, &c->idle_timer);
}

void ji_conn_resume_reading(ji_conn_t *c, h2o_socket_cb cb)
{
    ji_conn_touch(c);
    if (!c->reading || c->read_cb != cb) {
        c->read_cb = cb;
        h2o_socket_read_start(c->sock, cb);
        c->reading = true;
    }
}

/** Arms the idle timer on another delay (lingering, sending) without reading. */
static void arm_timer(ji_conn_t *c, h2o_timeout_t *which)
{
    if (h2o_timeout_is_linked(&c->idle_timer))
        h2o_timeout_unlink(&c->idle_timer);
    h2o_timeout_link(c->worker->ctx.loop, which, &c->idle_timer);
}

/* ------------------------------------------------------------------ kept-alive connections between requests */

/** The connection waits for its next request: --keepalive-timeout, and it may be closed to make room. */
static void idle_enter(ji_conn_t *c)
{
    ji_worker_t *w = c->worker;

    arm_timer(c, &w->keepalive_timeout);
    h2o_linklist_insert(&w->idle_conns, &c->idle_link); /* the tail: the longest idle stay first */
    atomic_fetch_add_explicit(&w->sheddable, 1, memory_order_relaxed);
}

static void idle_leave(ji_conn_t *c)
{
    if (!h2o_linklist_is_linked(&c->idle_link))
        return;
    h2o_linklist_unlink(&c->idle_link);
    atomic_fetch_sub_explicit(&c->worker->sheddable, 1, memory_order_relaxed);
}

/** Takes one of `w`'s idle kept-alive connections for closing (any thread). false: none is left unpromised. */
static bool claim_idle(ji_worker_t *w)
{
    long n = atomic_load_explicit(&w->sheddable, memory_order_relaxed);

    while (n > 0)
        if (atomic_compare_exchange_weak_explicit(&w->sheddable, &n, n - 1, memory_order_relaxed, memory_order_relaxed))
            return true;
    return false;
}

/*
 * Keeps one claim on `w` (its own thread): closes its longest idle kept-alive connection. When the claimed one
 * got a request meanwhile and none is idle, the claim is given back and the process stays one over the cap until
 * a connection closes.
 */
static void close_claimed(ji_worker_t *w)
{
    atomic_fetch_add_explicit(&w->sheddable, 1, memory_order_relaxed); /* idle_leave takes it again */
    if (h2o_linklist_is_empty(&w->idle_conns))
        return;
    atomic_fetch_add_explicit(&w->stats.connections_shed, 1, memory_order_relaxed);
    ji_conn_close(H2O_STRUCT_FROM_MEMBER(ji_conn_t, idle_link, w->idle_conns.next));
}

void ji_front_door_shed(ji_worker_t *w)
{
    for (unsigned n = atomic_exchange_explicit(&w->shed_wanted, 0, memory_order_relaxed); n != 0; n--)
        close_claimed(w);
}

/* ------------------------------------------------------------------ the access log */

/*
 * Every request whose head came ends in end_request exactly once: after its answer's last byte was written
 * (after_answer), or when its connection closes first (ji_conn_close: the client left, a write failed, shutdown).
 */

/** A request begins: its head (NULL: one that could not be parsed) is complete. */
static void begin_request(ji_conn_t *c, const ji_request_head_t *head)
{
    ji_access_entry_t *e = &c->entry;

    memset(e, 0, sizeof(*e));
    clock_gettime(CLOCK_REALTIME, &e->wall);
    clock_gettime(CLOCK_MONOTONIC, &e->start);
    e->route_index = JI_ROUTE_COUNT;
    e->route = ji_route_name(JI_ROUTE_COUNT);
    if (head != NULL) {
        size_t n = head->method_len < sizeof(e->method) - 1 ? head->method_len : sizeof(e->method) - 1;
        memcpy(e->method, head->method, n);
        e->method[n] = '\0';
        e->path_truncated = head->path_len > sizeof(e->path);
        e->path_len = e->path_truncated ? sizeof(e->path) : head->path_len;
        memcpy(e->path, head->path, e->path_len);
        e->has_head = true;
    }
    c->entry_open = true;
}

/** The request ended: its line in the access log, its duration in the histogram (when it was answered). */
static void end_request(ji_conn_t *c)
{
    ji_worker_t *w = c->worker;
    struct timespec end;

    if (!c->entry_open)
        return;
    c->entry_open = false;
    if (c->upload != NULL)
        ji_upload_outcome(c->upload, &c->entry);
    clock_gettime(CLOCK_MONOTONIC, &end);
    ji_request_durations_observe(&w->request_durations, c->entry.route_index, c->entry.status,
                                 ji_access_entry_seconds(&c->entry.start, &end));
    ji_access_log_write(&w->server->access_log, &c->entry, c->client, &end);
}

/* ------------------------------------------------------------------ lifetime */

void ji_conn_close(ji_conn_t *c)
{
    end_request(c);
    ji_conn_pause_reading(c);
    idle_leave(c);
    if (h2o_linklist_is_linked(&c->link))
        h2o_linklist_unlink(&c->link);
    if (c->bridge != NULL) { /* first: its request may point into the upload's body (the JSON-array mode) */
        ji_bridge_abort(c->bridge);
        c->bridge = NULL;
    }
    if (c->upload != NULL) {
        ji_upload_free(c->upload); /* aborts an unfinished request */
        c->upload = NULL;
    }
    ji_text_free(&c->response);
    if (c->sock != NULL) {
        c->sock->data = NULL;
        h2o_socket_close(c->sock);
    }
    atomic_fetch_sub_explicit(&c->worker->stats.connections_open, 1, memory_order_relaxed);
    atomic_fetch_sub_explicit(&c->worker->server->connections, 1, memory_order_relaxed);
    ji_server_connection_closed(c->worker);
    free(c);
}

static void on_idle_timeout(h2o_timeout_entry_t *entry)
{
    ji_conn_t *c = JI_CONTAINER_OF(entry, ji_conn_t, idle_timer);

    if (c->state == JI_CONN_UPLOAD && c->upload != NULL) {
        ji_upload_idle(c->upload);
        return;
    }
    ji_conn_close(c); /* a stalled head, an idle keep-alive connection, a reader that accepts nothing, lingering over */
}

/** Back to reading a new request head on this connection. */
static void start_next_request(ji_conn_t *c)
{
    c->state = JI_CONN_HEAD;
    c->keep_alive = false;
    c->body_unread = false;
    c->close_after = c->response_pending = false;
    ji_text_free(&c->response);
    ji_conn_resume_reading(c, on_read_head);
    if (c->sock->input->size != 0)
        process_head(c); /* a pipelined request is already here */
    else if (c->requests_served)
        idle_enter(c);
}

/* ------------------------------------------------------------------ answers of our own */

static void on_linger_read(h2o_socket_t *sock, const char *err)
{
    ji_conn_t *c = sock->data;

    if (err != NULL) {
        ji_conn_close(c);
        return;
    }
    h2o_buffer_consume(&sock->input, sock->input->size);
}

/** The answer is out: the next request, or stop sending, drain what still comes for a moment, then close. */
static void after_answer(ji_conn_t *c, bool reusable)
{
    end_request(c);
    c->requests_served = true;
    if (c->upload != NULL) { /* its places and memory go with its answer */
        ji_upload_free(c->upload);
        c->upload = NULL;
    }
    if (reusable && c->keep_alive && !c->body_unread &&
        !atomic_load_explicit(&c->worker->server->stopping, memory_order_relaxed)) {
        start_next_request(c);
        return;
    }
    /* Closing with unread input would reset the connection and could destroy the answer before the client reads
     * it: stop sending, drain for a moment, then close. */
    c->state = JI_CONN_LINGERING;
    shutdown(h2o_socket_get_fd(c->sock), SHUT_WR);
    h2o_buffer_consume(&c->sock->input, c->sock->input->size);
    ji_conn_pause_reading(c);
    arm_timer(c, &c->worker->linger_timeout);
    c->read_cb = on_linger_read;
    h2o_socket_read_start(c->sock, on_linger_read);
    c->reading = true;
}

static void on_response_written(h2o_socket_t *sock, const char *err)
{
    ji_conn_t *c = sock->data;

    if (err != NULL || c->state != JI_CONN_RESPONDING) {
        ji_conn_close(c);
        return;
    }
    ji_text_free(&c->response);
    after_answer(c, !c->close_after);
}

void ji_conn_send_pending(ji_conn_t *c)
{
    c->response_pending = false;
    send_response(c);
}

bool ji_conn_is_writing(const ji_conn_t *c)
{
    return h2o_socket_is_writing(c->sock);
}

static void send_response(ji_conn_t *c)
{
    h2o_iovec_t buf;

    if (h2o_socket_is_writing(c->sock)) {
        c->response_pending = true; /* a 100 Continue is still on its way: upload_stream.c sends it after */
        return;
    }
    c->state = JI_CONN_RESPONDING;
    ji_conn_pause_reading(c);
    arm_timer(c, &c->worker->idle_timeout); /* the send timeout */
    buf = h2o_iovec_init(c->response.base, c->response.len);
    c->sock->data = c;
    h2o_socket_write(c->sock, &buf, 1, on_response_written);
}

void ji_conn_respond(ji_conn_t *c, int status, const char *body, size_t len, unsigned retry_after,
                     const char *extra_headers)
{
    ji_text_t *t = &c->response;
    bool stopping = atomic_load_explicit(&c->worker->server->stopping, memory_order_relaxed);

    ji_text_free(t);
    c->entry.status = status;
    c->close_after = !c->keep_alive || c->body_unread || stopping;
    ji_text_printf(t, "HTTP/1.1 %d %s\r\n", status, ji_http_reason(status));
    if (status != 204) /* a 204 has no body, nor its type or length */
        ji_text_printf(t, "Content-Type: application/json\r\nContent-Length: %zu\r\n", len);
    if (retry_after != 0)
        ji_text_printf(t, "Retry-After: %u\r\n", retry_after);
    if (extra_headers != NULL)
        ji_text_printf(t, "%s", extra_headers);
    ji_text_printf(t, "Connection: %s\r\n\r\n", c->close_after ? "close" : "keep-alive");
    ji_text_append(t, body, len);
    c->state = JI_CONN_RESPONDING;
    ji_conn_pause_reading(c);
    if (t->failed) {
        ji_conn_close(c);
        return;
    }
    send_response(c);
}

void ji_conn_respond_error(ji_conn_t *c, const ji_error_t *err)
{
    ji_text_t body = {0};
    int status = ji_error_http_status(err->kind);

    ji_response_error_json(&body, err);
    fprintf(stderr, "%s: %d %.*s", c->client, status, (int)body.len, body.base != NULL ? body.base : "\n");
    if (body.failed) {
        ji_text_free(&body);
        ji_conn_close(c);
        return;
    }
    ji_conn_respond(c, status, body.base, body.len, ji_error_retry_after(err->kind),
                    err->kind == JI_ERR_UNAUTHORIZED ? "WWW-Authenticate: Bearer\r\n" : NULL);
    ji_text_free(&body);
}

/**
 * A refusal from the head alone: the body (if any) is never read, so the connection cannot carry more. `extra`:
 * headers of the answer ("Name: value\r\n"...), or NULL.
 */
static void refuse_with(ji_conn_t *c, const ji_request_head_t *head, const ji_error_t *err, const char *extra)
{
    if (head == NULL || ji_request_has_body(head))
        c->body_unread = true; /* the connection closes after the answer */
    else
        h2o_buffer_consume(&c->sock->input, head->head_len);
    if (extra != NULL) {
        ji_text_t body = {0};
        ji_response_error_json(&body, err);
        fprintf(stderr, "%s: %d %.*s", c->client, ji_error_http_status(err->kind), (int)body.len,
                body.base != NULL ? body.base : "\n");
        if (body.failed) {
            ji_text_free(&body);
            ji_conn_close(c);
            return;
        }
        ji_conn_respond(c, ji_error_http_status(err->kind), body.base, body.len, ji_error_retry_after(err->kind),
                        extra);
        ji_text_free(&body);
        return;
    }
    ji_conn_respond_error(c, err);
}

/** refuse_with, plus `Allow: <allow>` when `allow` is not NULL (a 405). */
static void refuse(ji_conn_t *c, const ji_request_head_t *head, const ji_error_t *err, const char *allow)
{
    char extra[64];

    if (allow == NULL) {
        refuse_with(c, head, err, NULL);
        return;
    }
    snprintf(extra, sizeof(extra), "Allow: %s\r\n", allow);
    refuse_with(c, head, err, extra);
}

/* ------------------------------------------------------------------ h2o routes */

static void on_bridge_done(void *owner, ji_bridge_end_t end, int status)
{
    ji_conn_t *c = owner;

    c->bridge = NULL;
    c->entry.status = status;
    c->sock->data = c;
    if (end == JI_BRIDGE_FAILED) {
        ji_conn_close(c); /* a write may be pending: closing drops it */
        return;
    }
    after_answer(c, end == JI_BRIDGE_KEEP_ALIVE);
}

void ji_conn_bridge(ji_conn_t *c, const ji_request_head_t *head, h2o_iovec_t entity, void *route_data)
{
    bool stopping = atomic_load_explicit(&c->worker->server->stopping, memory_order_relaxed);
    ji_bridge_params_t p = {
        .accept_ctx = &c->worker->accept_ctx,
        .sock = c->sock,
        .connected_at = c->connected_at,
        .send_timeout = &c->worker->idle_timeout,
        .keep_alive = c->keep_alive && !c->body_unread && !stopping,
        .entity = entity,
        .route_data = route_data,
        .done = on_bridge_done,
        .owner = c,
    };
    ji_error_t err;

    ji_conn_pause_reading(c);
    c->state = JI_CONN_BRIDGED;
    if ((c->bridge = ji_bridge_start(&p, head)) == NULL) {
        ji_error_set(&err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        ji_conn_respond_error(c, &err);
    }
}

/* ------------------------------------------------------------------ resumable uploads */

/** A refusal of a resumable-upload request: the protocol's headers (a 412 names the version spoken). */
static void refuse_resumable(ji_conn_t *c, const ji_request_head_t *head, const ji_error_t *err, bool draft)
{
    const char *extra = draft ? "Upload-Draft-Interop-Version: " JI_DRAFT_INTEROP_VERSION "\r\n"
                        : err->kind == JI_ERR_PRECONDITION ? "Tus-Resumable: " JI_TUS_VERSION
                                                             "\r\nTus-Version: " JI_TUS_VERSION "\r\n"
                                                           : "Tus-Resumable: " JI_TUS_VERSION "\r\n";
    refuse_with(c, head, err, extra);
}

/*
 * The routes of resumable uploads (docs/resumable.md): a creation (tus POST /uploads, draft POST /users) or an
 * append (PATCH) streams through upload_stream.c; HEAD, GET, DELETE and OPTIONS go to the h2o handlers of
 * uploads.c. Every upload header is judged here, before a body byte or a statement.
 */
static void serve_resumable(ji_conn_t *c, const ji_request_head_t *head, const ji_route_t *route)
{
    ji_server_t *server = c->worker->server;
    bool post = head->method_len == 4 && memcmp(head->method, "POST", 4) == 0;
    bool patch = head->method_len == 5 && memcmp(head->method, "PATCH", 5) == 0;
    ji_resumable_request_t rr;
    ji_upload_headers_t uh;
    ji_error_t err;

    memset(&rr, 0, sizeof(rr));
    if (ji_upload_headers_parse(&uh, head, &err) != 0) {
        refuse_resumable(c, head, &err, route->id == JI_ROUTE_USERS);
        return;
    }
    if (uh.tus_resumable != NULL && !uh.draft &&
        (uh.tus_resumable->value_len != strlen(JI_TUS_VERSION) ||
         memcmp(uh.tus_resumable->value, JI_TUS_VERSION, strlen(JI_TUS_VERSION)) != 0) &&
        !(head->method_len == 7 && memcmp(head->method, "OPTIONS", 7) == 0)) {
        ji_error_set(&err, JI_ERR_PRECONDITION, 0, NULL, "Tus-Resumable must be " JI_TUS_VERSION);
        refuse_resumable(c, head, &err, false);
        return;
    }
    if (!post && !patch) {
        if (ji_request_has_body(head)) {
            ji_error_set(&err, JI_ERR_MALFORMED, 0, NULL, "this request takes no body");
            refuse_resumable(c, head, &err, uh.draft);
            return;
        }
        ji_conn_bridge(c, head, h2o_iovec_init(NULL, 0), NULL);
        h2o_buffer_consume(&c->sock->input, head->head_len); /* the bridge copied what it needs */
        return;
    }
    if (post) {
        rr.create = true;
        if (ji_upload_creation_check(&rr.creation, head, &uh, route->id == JI_ROUTE_USERS,
                                     server->config->max_upload_bytes, &err) != 0) {
            refuse_resumable(c, head, &err, route->id == JI_ROUTE_USERS);
            return;
        }
        rr.metadata = uh.metadata;
        rr.metadata_len = uh.metadata_len;
        rr.append.draft = rr.creation.draft;
        rr.append.completes = rr.creation.complete;
        rr.append.length = rr.creation.has_length ? (int64_t)rr.creation.length : -1;
    } else {
        if (ji_upload_append_check(head, &uh, server->config->max_upload_bytes, &err) != 0) {
            refuse_resumable(c, head, &err, uh.draft);
            return;
        }
        memcpy(rr.append.token, head->path + head->path_len - JI_UPLOAD_TOKEN_CHARS, JI_UPLOAD_TOKEN_CHARS);
        rr.append.offset = uh.offset;
        rr.append.length = uh.has_length ? (int64_t)uh.length : -1;
        rr.append.completes = uh.complete; /* a tus client sends none; ?1 ends an upload of unknown length */
        rr.append.draft = uh.draft;
    }
    if (atomic_load_explicit(&server->stopping, memory_order_relaxed)) {
        ji_error_set(&err, JI_ERR_STOPPING, 0, NULL, "the server is shutting down: retry on another instance");
        refuse_resumable(c, head, &err, rr.append.draft);
        return;
    }
    c->state = JI_CONN_UPLOAD;
    ji_upload_start_resumable(c, head, &rr);
}

/* ------------------------------------------------------------------ request heads */

static void process_head(ji_conn_t *c)
{
    ji_server_t *server = c->worker->server;
    ji_request_head_t head;
    ji_upload_options_t options;
    ji_route_t route;
    ji_error_t err;
    int r;

    r = ji_request_head_parse(&head, c->sock->input->bytes, c->sock->input->size, &err);
    if (r == 1)
        return;
    if (r != 0) {
        begin_request(c, NULL);
        refuse(c, NULL, &err, NULL);
        return;
    }
    begin_request(c, &head);
    c->keep_alive = head.keep_alive;
    /* behind a trusted proxy the client may differ from request to request */
    ji_client_address((struct sockaddr *)&c->peer, &server->trusted_proxies, head.headers, head.num_headers, c->client);
    r = ji_route_match(head.method, head.method_len, head.path, head.path_len, &route, &err);
    if (r == 0 || err.kind == JI_ERR_METHOD) {
        c->entry.route_index = (int)route.id;
        c->entry.route = ji_route_name(route.id);
    }
    if (r != 0) {
        refuse(c, &head, &err, err.kind == JI_ERR_METHOD ? route.allow : NULL);
        return;
    }
    if (ji_request_check_policy(&head, &server->policy, route.upload || route.resumable, !route.probe, &err) != 0) {
        refuse(c, &head, &err, NULL);
        return;
    }
    if (route.resumable || (route.upload && ji_upload_headers_draft_creation(&head))) {
        serve_resumable(c, &head, &route);
        return;
    }
    if (route.upload) {
        if (ji_upload_options_parse(&options, &head, &err) != 0) {
            refuse(c, &head, &err, NULL);
            return;
        }
        if (atomic_load_explicit(&server->stopping, memory_order_relaxed)) {
            ji_error_set(&err, JI_ERR_STOPPING, 0, NULL, "the server is shutting down: retry on another instance");
            refuse(c, &head, &err, NULL);
            return;
        }
        c->state = JI_CONN_UPLOAD;
        ji_upload_start(c, &head, &options);
        return;
    }
    if (ji_request_has_body(&head)) {
        ji_error_set(&err, JI_ERR_MALFORMED, 0, NULL, "this route takes no request body");
        refuse(c, &head, &err, NULL);
        return;
    }
    ji_conn_bridge(c, &head, h2o_iovec_init(NULL, 0), NULL);
    h2o_buffer_consume(&c->sock->input, head.head_len); /* the bridge copied what it needs */
}

static void on_read_head(h2o_socket_t *sock, const char *err)
{
    ji_conn_t *c = sock->data;

    if (err != NULL) {
        ji_conn_close(c);
        return;
    }
    /* no touch: a head must be complete within --idle-timeout of its first wait, however it trickles; on a kept-alive
     * connection the wait starts with the head's first byte (before it, --keepalive-timeout) */
    if (h2o_linklist_is_linked(&c->idle_link)) {
        idle_leave(c);
        ji_conn_touch(c);
    }
    process_head(c);
}

/* ------------------------------------------------------------------ accept and stop */

/*
 * Past --max-connections with nothing idle to close: a short 503 written straight to the socket (it fits any send
 * buffer), no connection object, no timer. What the client already sent is read first, so that closing does not
 * reset the connection before the client reads the answer.
 */
static void refuse_connection(ji_worker_t *w, h2o_socket_t *sock)
{
    ji_server_t *server = w->server;
    int fd = h2o_socket_get_fd(sock);
    char buf[4096], answer[512];
    ssize_t n;
    int len;

    for (size_t drained = 0; drained < JI_REFUSED_DRAIN_BYTES; drained += (size_t)n)
        if ((n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT)) <= 0)
            break;
    len = snprintf(answer, sizeof(answer),
                   "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                   "Retry-After: %u\r\nConnection: close\r\n\r\n%s",
                   (int)strlen(server->connections_refusal), JI_RETRY_AFTER_BUSY_S, server->connections_refusal);
    if (len > 0 && (size_t)len < sizeof(answer) && send(fd, answer, (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL) > 0)
        shutdown(fd, SHUT_WR);
    h2o_socket_close(sock);
    atomic_fetch_add_explicit(&w->stats.limit_connections, 1, memory_order_relaxed);
    w->refused_unlogged++;
    if (h2o_now(w->ctx.loop) - w->refused_logged_at >= JI_REFUSED_LOG_INTERVAL_MS) {
        fprintf(stderr, "refused %llu connections with 503: --max-connections %u open, none idle between requests\n",
                (unsigned long long)w->refused_unlogged, server->max_connections);
        w->refused_logged_at = h2o_now(w->ctx.loop);
        w->refused_unlogged = 0;
    }
}

/** Room for one more connection past the cap: an idle kept-alive one closes, here at once or on another loop soon. */
static bool make_room(ji_worker_t *w)
{
    ji_server_t *server = w->server;

    if (claim_idle(w)) {
        close_claimed(w);
        return true;
    }
    for (unsigned i = 1; i < server->nworkers; i++) {
        ji_worker_t *other = &server->workers[(unsigned)(w - server->workers + i) % server->nworkers];
        if (claim_idle(other)) {
            atomic_fetch_add_explicit(&other->shed_wanted, 1, memory_order_relaxed);
            return true;
        }
    }
    return false;
}

void ji_front_door_accept(ji_worker_t *w, h2o_socket_t *sock)
{
    ji_server_t *server = w->server;
    ji_conn_t *c;
    int rcvbuf = JI_SOCKET_RCVBUF_BYTES;

    if (atomic_fetch_add_explicit(&server->connections, 1, memory_order_relaxed) >= server->max_connections &&
        !make_room(w)) {
        refuse_connection(w, sock);
        atomic_fetch_sub_explicit(&server->connections, 1, memory_order_relaxed);
        return;
    }
    setsockopt(h2o_socket_get_fd(sock), SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
    if ((c = calloc(1, sizeof(*c))) == NULL) {
        h2o_socket_close(sock);
        atomic_fetch_sub_explicit(&server->connections, 1, memory_order_relaxed);
        return;
    }
    c->worker = w;
    c->sock = sock;
    gettimeofday(&c->connected_at, NULL);
    if (h2o_socket_getpeername(sock, (struct sockaddr *)&c->peer) == 0)
        c->peer.ss_family = AF_UNSPEC;
    ji_client_address((struct sockaddr *)&c->peer, &w->server->trusted_proxies, NULL, 0, c->client);
    c->idle_timer.cb = on_idle_timeout;
    sock->data = c;
    h2o_linklist_insert(&w->conns, &c->link);
    atomic_fetch_add_explicit(&w->stats.connections_open, 1, memory_order_relaxed);
    start_next_request(c);
}

static bool conn_is_idle(const ji_conn_t *c)
{
    return c->state == JI_CONN_HEAD && c->sock->input->size == 0;
}

void ji_front_door_drain(ji_worker_t *w, bool grace_over)
{
    h2o_linklist_t *node, *next;
    bool busy = false;

    for (node = w->conns.next; node != &w->conns; node = next) {
        ji_conn_t *c = H2O_STRUCT_FROM_MEMBER(ji_conn_t, link, node);
        next = node->next;
        if (!conn_is_idle(c))
            busy = true;
        if (grace_over && c->state == JI_CONN_UPLOAD && c->upload != NULL)
            ji_upload_stop(c->upload);
    }
    /* idle connections stay while requests run on any worker: a health check on one learns "stopping" */
    atomic_store_explicit(&w->draining_busy, busy, memory_order_relaxed);
    for (unsigned i = 0; i < w->server->nworkers; i++)
        if (atomic_load_explicit(&w->server->workers[i].draining_busy, memory_order_relaxed))
            return;
    for (node = w->conns.next; node != &w->conns; node = next) {
        ji_conn_t *c = H2O_STRUCT_FROM_MEMBER(ji_conn_t, link, node);
        next = node->next;
        ji_conn_close(c);
    }
}

void ji_front_door_close_all(ji_worker_t *w)
{
    while (!h2o_linklist_is_empty(&w->conns))
        ji_conn_close(H2O_STRUCT_FROM_MEMBER(ji_conn_t, link, w->conns.next));
}
