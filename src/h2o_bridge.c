/*
 * h2o_bridge.c — an h2o connection of our own for one request at a time:
 * fills an h2o_req_t from a parsed head, runs h2o_process_request, and is the
 * final output stream that writes the status line, headers and body to the
 * socket, proceeding the generator after each write.
 */
#include "h2o_bridge.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

struct st_ji_bridge_t {
    h2o_conn_t super; /**< first: h2o gives handlers req->conn */
    h2o_req_t req;
    h2o_ostream_t ostr_final;
    ji_bridge_params_t params;
    bool sent_headers;
    bool final_sent; /**< the last piece is on its way */
    bool persistent; /**< the connection may carry another request after this answer */
    bool writing;
    h2o_timeout_entry_t send_timer;
    h2o_timeout_entry_t empty_write; /**< completes a write of nothing from the loop */
};

static const h2o_conn_callbacks_t bridge_callbacks;

static ji_bridge_t *bridge_of(h2o_conn_t *conn)
{
    return conn->callbacks == &bridge_callbacks ? (ji_bridge_t *)conn : NULL;
}

static socklen_t get_sockname(h2o_conn_t *conn, struct sockaddr *sa)
{
    return h2o_socket_getsockname(((ji_bridge_t *)conn)->params.sock, sa);
}

static socklen_t get_peername(h2o_conn_t *conn, struct sockaddr *sa)
{
    return h2o_socket_getpeername(((ji_bridge_t *)conn)->params.sock, sa);
}

static h2o_socket_t *get_socket(h2o_conn_t *conn)
{
    return ((ji_bridge_t *)conn)->params.sock;
}

static const h2o_conn_callbacks_t bridge_callbacks = {
    .get_sockname = get_sockname,
    .get_peername = get_peername,
    .get_socket = get_socket,
};

void *ji_bridge_route_data(h2o_req_t *req)
{
    ji_bridge_t *b = bridge_of(req->conn);
    return b != NULL ? b->params.route_data : NULL;
}

/* ------------------------------------------------------------------ ending */

static void bridge_free(ji_bridge_t *b)
{
    if (h2o_timeout_is_linked(&b->send_timer))
        h2o_timeout_unlink(&b->send_timer);
    if (h2o_timeout_is_linked(&b->empty_write))
        h2o_timeout_unlink(&b->empty_write);
    h2o_dispose_request(&b->req); /* stops a generator still running; runs the pool's dispose callbacks */
    free(b);
}

static void finish(ji_bridge_t *b, ji_bridge_end_t end)
{
    ji_bridge_done_cb done = b->params.done;
    void *owner = b->params.owner;
    int status = b->sent_headers ? b->req.res.status : 0;

    bridge_free(b);
    done(owner, end, status);
}

void ji_bridge_abort(ji_bridge_t *b)
{
    bridge_free(b);
}

static void on_send_timeout(h2o_timeout_entry_t *entry)
{
    ji_bridge_t *b = JI_CONTAINER_OF(entry, ji_bridge_t, send_timer);
    finish(b, JI_BRIDGE_FAILED); /* the owner closes the socket, which drops the write in flight */
}

/* ------------------------------------------------------------------ writing */

static void on_written(h2o_socket_t *sock, const char *err)
{
    ji_bridge_t *b = sock->data;

    b->writing = false;
    if (h2o_timeout_is_linked(&b->send_timer))
        h2o_timeout_unlink(&b->send_timer);
    if (err != NULL) {
        finish(b, JI_BRIDGE_FAILED);
        return;
    }
    if (b->final_sent) {
        finish(b, b->persistent ? JI_BRIDGE_KEEP_ALIVE : JI_BRIDGE_CLOSE);
        return;
    }
    h2o_proceed_response(&b->req);
}

static void on_empty_write(h2o_timeout_entry_t *entry)
{
    ji_bridge_t *b = JI_CONTAINER_OF(entry, ji_bridge_t, empty_write);
    on_written(b->params.sock, NULL);
}

/** The status line and headers, with Connection and the framing the answer gets on the wire. */
static h2o_iovec_t flatten_head(ji_bridge_t *b, size_t body_len, bool final)
{
    h2o_req_t *req = &b->req;
    /* a HEAD answer and a 204 have no body: no framing (a 204 carries no Content-Length) */
    bool head_method =
        h2o_memis(req->input.method.base, req->input.method.len, H2O_STRLIT("HEAD")) || req->res.status == 204;
    bool chunked = h2o_find_header(&req->res.headers, H2O_TOKEN_TRANSFER_ENCODING, -1) != -1;
    size_t cap = 256 + strlen(req->res.reason), len;
    char *buf;

    if (req->res.content_length == SIZE_MAX && !chunked && !head_method) {
        if (final)
            req->res.content_length = body_len; /* the whole answer is here: its length is known */
        else
            b->persistent = false; /* the end of the body is the end of the connection */
    }
    for (size_t i = 0; i != req->res.headers.size; i++)
        cap += req->res.headers.entries[i].name->len + req->res.headers.entries[i].value.len + 4;
    buf = h2o_mem_alloc_pool(&req->pool, cap);
    len = (size_t)snprintf(buf, cap, "HTTP/1.1 %d %s\r\nConnection: %s\r\n", req->res.status, req->res.reason,
                           b->persistent ? "keep-alive" : "close");
    if (req->res.content_length != SIZE_MAX)
        len += (size_t)snprintf(buf + len, cap - len, "Content-Length: %zu\r\n", req->res.content_length);
    for (size_t i = 0; i != req->res.headers.size; i++) {
        const h2o_header_t *h = &req->res.headers.entries[i];
        memcpy(buf + len, h->orig_name != NULL ? h->orig_name : h->name->base, h->name->len);
        len += h->name->len;
        memcpy(buf + len, ": ", 2);
        len += 2;
        memcpy(buf + len, h->value.base, h->value.len);
        len += h->value.len;
        memcpy(buf + len, "\r\n", 2);
        len += 2;
    }
    memcpy(buf + len, "\r\n", 2);
    return h2o_iovec_init(buf, len + 2);
}

static void bridge_send(h2o_ostream_t *self, h2o_req_t *req, h2o_iovec_t *inbufs, size_t inbufcnt,
                        h2o_send_state_t state)
{
    ji_bridge_t *b = JI_CONTAINER_OF(self, ji_bridge_t, ostr_final);
    h2o_iovec_t *bufs = h2o_mem_alloc_pool(&req->pool, sizeof(*bufs) * (inbufcnt + 1));
    size_t n = 0, body_len = 0;

    for (size_t i = 0; i != inbufcnt; i++)
        body_len += inbufs[i].len;
    if (!req->bytes_counted_by_ostream)
        req->bytes_sent += body_len;
    if (state == H2O_SEND_STATE_ERROR)
        b->persistent = false;
    if (!b->sent_headers) {
        bufs[n++] = flatten_head(b, body_len, !h2o_send_state_is_in_progress(state));
        b->sent_headers = true;
    }
    if (inbufcnt != 0) {
        memcpy(bufs + n, inbufs, sizeof(*bufs) * inbufcnt);
        n += inbufcnt;
    }
    b->final_sent = !h2o_send_state_is_in_progress(state);
    b->writing = true;
    h2o_timeout_link(b->super.ctx->loop, b->params.send_timeout, &b->send_timer);
    b->params.sock->data = b;
    if (n == 0) {
        h2o_timeout_link(b->super.ctx->loop, &b->super.ctx->zero_timeout, &b->empty_write);
        return;
    }
    h2o_socket_write(b->params.sock, bufs, n, on_written);
}

/* ------------------------------------------------------------------ starting */

static h2o_iovec_t pool_copy(h2o_mem_pool_t *pool, const char *s, size_t len)
{
    return h2o_strdup(pool, s, len);
}

ji_bridge_t *ji_bridge_start(const ji_bridge_params_t *params, const ji_request_head_t *head)
{
    ji_bridge_t *b = calloc(1, sizeof(*b));
    h2o_req_t *req;
    size_t path_len;

    if (b == NULL)
        return NULL;
    b->params = *params;
    b->super.ctx = params->accept_ctx->ctx;
    b->super.hosts = params->accept_ctx->hosts;
    b->super.connected_at = params->connected_at;
    b->super.callbacks = &bridge_callbacks;
    b->persistent = params->keep_alive;
    b->send_timer.cb = on_send_timeout;
    b->empty_write.cb = on_empty_write;

    req = &b->req;
    h2o_init_request(req, &b->super, NULL);
    req->_ostr_top = &b->ostr_final;
    b->ostr_final.do_send = bridge_send;
    req->version = head->minor_version >= 1 ? 0x101 : 0x100;
    req->http1_is_persistent = params->keep_alive;
    req->input.scheme = &H2O_URL_SCHEME_HTTP;
    req->input.method = pool_copy(&req->pool, head->method, head->method_len);
    path_len = head->path_len + (head->query != NULL ? head->query_len + 1 : 0);
    req->input.path = pool_copy(&req->pool, head->path, path_len);
    if (head->host != NULL)
        req->input.authority = pool_copy(&req->pool, head->host->value, head->host->value_len);
    else
        req->input.authority = h2o_iovec_init(H2O_STRLIT("localhost"));
    for (size_t i = 0; i != head->num_headers; i++) {
        const struct phr_header *h = &head->headers[i];
        h2o_iovec_t name = pool_copy(&req->pool, h->name, h->name_len), value;
        const h2o_token_t *token;
        h2o_strtolower(name.base, name.len);
        value = pool_copy(&req->pool, h->value, h->value_len);
        if ((token = h2o_lookup_token(name.base, name.len)) != NULL)
            h2o_add_header(&req->pool, &req->headers, token, NULL, value.base, value.len);
        else
            h2o_add_header_by_str(&req->pool, &req->headers, name.base, name.len, 0, NULL, value.base, value.len);
    }
    req->entity = params->entity.base != NULL ? params->entity : h2o_iovec_init(NULL, 0);
    h2o_process_request(req);
    return b;
}
