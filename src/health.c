/*
 * health.c — owns GET /healthz and GET /readyz.
 *
 * /healthz answers 200 from the event loop, touching nothing else: it proves
 * the thread that took the connection is responsive. /readyz asks the
 * database (SELECT 1 on a pooled connection, ji_pg_call_t) and answers 200
 * only when it replied within JI_READYZ_TIMEOUT_S, the schema is ready and the
 * server is not stopping; else 503 with Retry-After and
 * {"status":"not ready"|"stopping","error":...}. The database's own message
 * goes to stderr, never to the client.
 *
 * Lifetime: a readyz request's state lives in the request pool; its dispose
 * callback unlinks the deadline and cancels the statement, so a client that
 * goes away leaves nothing running.
 */
#include "health.h"

#include <stdio.h>
#include <string.h>

#include "handler_reply.h"
#include "server.h"

static const char SQL_PING[] = "SELECT 1";
static const char NOT_READY_SCHEMA[] = "the schema is not ready yet (the database was unreachable at start; retrying)";

/** The request's path is exactly `path` (h2o also routes what lies below a registered path here). */
static bool exact_path(h2o_req_t *req, const char *path)
{
    return h2o_memis(req->path_normalized.base, req->path_normalized.len, path, strlen(path));
}

/** GET or HEAD on the exact path; else answers 404 or 405 and returns false. */
static bool accept_request(h2o_req_t *req, const char *path)
{
    if (!exact_path(req, path)) {
        ji_reply_errorf(req, JI_ERR_NOT_FOUND, "no such route");
        return false;
    }
    if (h2o_memis(req->method.base, req->method.len, H2O_STRLIT("GET")) ||
        h2o_memis(req->method.base, req->method.len, H2O_STRLIT("HEAD")))
        return true;
    ji_reply_method_not_allowed(req, "GET, HEAD");
    return false;
}

/* ------------------------------------------------------------------ GET /healthz */

static int on_healthz(h2o_handler_t *self, h2o_req_t *req)
{
    (void)self;
    if (accept_request(req, "/healthz"))
        ji_reply_json(req, 200, H2O_STRLIT("{\"status\":\"ok\"}\n"), 0);
    return 0;
}

/* ------------------------------------------------------------------ GET /readyz */

typedef struct st_readyz_t {
    ji_pg_call_t call;
    h2o_req_t *req;
    h2o_timeout_entry_t deadline; /**< on the context's one-second list, JI_READYZ_TIMEOUT_S times */
    unsigned ticks_left;
} readyz_t;

static void readyz_dispose(void *p)
{
    readyz_t *r = p;

    h2o_timeout_unlink(&r->deadline);
    ji_pg_call_cancel(&r->call);
}

/** 503 `{"status":...,"error":...}` with the Retry-After of `kind` (JI_ERR_DB or JI_ERR_STOPPING). */
static void send_not_ready(h2o_req_t *req, ji_error_kind_t kind, const char *why)
{
    const char *status = kind == JI_ERR_STOPPING ? "stopping" : "not ready";
    ji_text_t t = {0};

    ji_text_printf(&t, "{\"status\":\"%s\",\"error\":", status);
    ji_text_json_string(&t, why, strlen(why));
    ji_text_append(&t, "}\n", 2);
    if (t.failed)
        ji_reply_errorf(req, JI_ERR_INTERNAL, "out of memory");
    else
        ji_reply_json(req, ji_error_http_status(kind), t.base, t.len, ji_error_retry_after(kind));
    ji_text_free(&t);
}

static void readyz_on_result(ji_pg_call_t *call, PGresult *res, const char *err)
{
    readyz_t *r = JI_CONTAINER_OF(call, readyz_t, call);
    ji_worker_t *w = ji_worker_of(r->req->conn->ctx);

    h2o_timeout_unlink(&r->deadline);
    if (err == NULL && (res == NULL || PQresultStatus(res) != PGRES_TUPLES_OK))
        err = "unexpected answer from the database";
    if (err != NULL) {
        fprintf(stderr, "GET /readyz: database: %s\n", err);
        send_not_ready(r->req, JI_ERR_DB, "database unavailable");
        return;
    }
    if (atomic_load_explicit(&w->server->stopping, memory_order_relaxed)) {
        send_not_ready(r->req, JI_ERR_STOPPING, "the server is shutting down");
        return;
    }
    ji_reply_json(r->req, 200, H2O_STRLIT("{\"status\":\"ready\"}\n"), 0);
}

static void readyz_on_tick(h2o_timeout_entry_t *entry)
{
    readyz_t *r = JI_CONTAINER_OF(entry, readyz_t, deadline);

    if (--r->ticks_left > 0) {
        h2o_timeout_link(r->req->conn->ctx->loop, &r->req->conn->ctx->one_sec_timeout, &r->deadline);
        return;
    }
    ji_pg_call_cancel(&r->call);
    send_not_ready(r->req, JI_ERR_DB,
                   "the database did not answer within " JI_STR(JI_READYZ_TIMEOUT_S) " s (JI_READYZ_TIMEOUT_S)");
}

static int on_readyz(h2o_handler_t *self, h2o_req_t *req)
{
    ji_worker_t *w = ji_worker_of(req->conn->ctx);
    readyz_t *r;

    (void)self;
    if (!accept_request(req, "/readyz"))
        return 0;
    /* once stopping, no new database work starts: the pool drains and can be freed */
    if (atomic_load_explicit(&w->server->stopping, memory_order_relaxed)) {
        send_not_ready(req, JI_ERR_STOPPING, "the server is shutting down");
        return 0;
    }
    if (!atomic_load_explicit(&w->server->db_ready, memory_order_acquire)) {
        send_not_ready(req, JI_ERR_DB, NOT_READY_SCHEMA);
        return 0;
    }
    r = h2o_mem_alloc_shared(&req->pool, sizeof(*r), readyz_dispose);
    memset(r, 0, sizeof(*r));
    r->req = req;
    r->deadline.cb = readyz_on_tick;
    r->ticks_left = JI_READYZ_TIMEOUT_S;
    if (ji_pg_call_start(&r->call, w->pg_pool, SQL_PING, 0, NULL, readyz_on_result) != 0) {
        ji_reply_errorf(req, JI_ERR_INTERNAL, "out of memory");
        return 0;
    }
    h2o_timeout_link(req->conn->ctx->loop, &req->conn->ctx->one_sec_timeout, &r->deadline);
    return 0;
}

/* ------------------------------------------------------------------ registration */

static void register_handler(h2o_hostconf_t *host, const char *path, int (*on_req)(h2o_handler_t *, h2o_req_t *))
{
    h2o_pathconf_t *pathconf = h2o_config_register_path(host, path, 0);
    h2o_handler_t *handler = h2o_create_handler(pathconf, sizeof(*handler));

    handler->on_req = on_req;
}

void ji_health_register(h2o_hostconf_t *host)
{
    register_handler(host, "/healthz", on_healthz);
    register_handler(host, "/readyz", on_readyz);
}
