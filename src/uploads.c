/*
 * uploads.c — owns the resource of a resumable upload apart from its bodies:
 * tokens, the creation's row, HEAD / GET / DELETE /uploads/{token} and
 * OPTIONS /uploads (h2o handlers; statements through ji_pg_call_t, never
 * blocking), the headers the answers share, and the expiry sweep (on the
 * loop, and blocking for start-up and `gc`).
 *
 * Lifetime: a handler's state lives in the request's pool with a dispose
 * callback that cancels its statement; any ji_reply_* or h2o_send may
 * dispose the request, so it is the last thing a function does.
 */
#include "uploads.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "handler_reply.h"
#include "server.h"
#include "user_format.h"

/* ------------------------------------------------------------------ statements */

static const char SQL_INSERT[] =
    "INSERT INTO uploads (token, protocol, batch_key, length, skip_errors, max_errors, idempotency_key, metadata, "
    "expires_at) VALUES ($1, $2, $3, $4::bigint, $5::boolean, $6::bigint, $7, $8, now() + make_interval(secs => "
    "$9::int)) RETURNING floor(extract(epoch FROM expires_at))::bigint";

/** The columns of STATE_COLUMNS, in order. */
enum { COL_STATE, COL_OFFSET, COL_LENGTH, COL_LIVE, COL_EXPIRES, COL_PROTOCOL, COL_JSON, STATE_NCOLS };

/* One upload as HEAD and GET answer it; `live`: not expired yet. */
static const char SQL_STATE[] =
    "SELECT state, upload_offset, length, expires_at > now(), floor(extract(epoch FROM expires_at))::bigint, protocol, "
    "json_build_object('token', token, 'protocol', protocol, 'state', state, 'offset', upload_offset, 'length', "
    "length, 'lines', lines, 'inserted', inserted, 'skipped', skipped, 'images', images, 'appends', appends, "
    "'on_error', CASE WHEN skip_errors THEN 'skip' ELSE 'fail' END, 'max_errors', max_errors, 'idempotency_key', "
    "idempotency_key, 'metadata', metadata, 'created_at', " JI_SQL_TIMESTAMP(
        "created_at") ", 'expires_at', " JI_SQL_TIMESTAMP("expires_at") ", 'batch_id', batch_id, 'batch_url', "
                                                                        "'/batches/' || batch_id, 'answer_status', "
                                                                        "answer_status, 'answer', answer::json)::text "
                                                                        "FROM uploads WHERE token = $1";

/*
 * DELETE: takes over an append still running (terminates the backend that holds the upload's lock: its
 * transaction rolls back), waits for the lock, then deletes the row (staged rows cascade). Only an upload that is
 * open or committed and not expired; the batch of a committed one stays.
 */
static const char SQL_DELETE[] =
    "WITH u AS (SELECT upload_id FROM uploads WHERE token = $1 AND state IN ('open', 'committed') AND "
    "expires_at > now()), "
    "t AS (SELECT u.upload_id, " JI_UPLOAD_TERMINATE_SQL(
        "u.upload_id") " AS n FROM u), "
                       "k AS (SELECT t.upload_id, " JI_UPLOAD_LOCK_SQL(
                           "t.upload_id") " FROM t) "
                                          "DELETE FROM uploads d USING k WHERE d.upload_id = k.upload_id RETURNING "
                                          "d.batch_key, d.state";

/*
 * The expiry sweep: uploads whose expires_at passed, oldest first, that no append holds (its lock is tried,
 * never waited for; a row another sweep deletes is skipped).
 */
static const char SQL_SWEEP[] =
    "DELETE FROM uploads WHERE upload_id IN (SELECT upload_id FROM uploads WHERE expires_at < now() ORDER BY "
    "expires_at LIMIT " JI_STR(JI_UPLOAD_SWEEP_ROWS) " FOR UPDATE SKIP LOCKED) AND "
                                                     "pg_try_advisory_xact_lock" JI_UPLOAD_LOCK_ARGS(
                                                         "upload_id") " RETURNING batch_key, state";

/* ------------------------------------------------------------------ small things */

int ji_upload_token_new(char out[JI_UPLOAD_TOKEN_CHARS + 1])
{
    unsigned char raw[JI_UPLOAD_TOKEN_CHARS / 2];

    if (getrandom(raw, sizeof(raw), 0) != (ssize_t)sizeof(raw))
        return -1;
    ji_hex_encode(raw, sizeof(raw), out);
    out[JI_UPLOAD_TOKEN_CHARS] = '\0';
    return 0;
}

void ji_http_date(time_t t, char out[JI_HTTP_DATE_CAP])
{
    struct tm tm;

    gmtime_r(&t, &tm);
    strftime(out, JI_HTTP_DATE_CAP, "%a, %d %b %Y %H:%M:%S GMT", &tm);
}

void ji_upload_headers_write(ji_text_t *t, bool draft, const char *token, bool location, int64_t offset, int complete,
                             time_t expires_at)
{
    char date[JI_HTTP_DATE_CAP];

    if (draft)
        ji_text_printf(t, "Upload-Draft-Interop-Version: " JI_DRAFT_INTEROP_VERSION "\r\n");
    else
        ji_text_printf(t, "Tus-Resumable: " JI_TUS_VERSION "\r\n");
    if (location)
        ji_text_printf(t, "Location: /uploads/%s\r\n", token);
    if (offset >= 0)
        ji_text_printf(t, "Upload-Offset: %" PRId64 "\r\n", offset);
    if (draft && complete >= 0)
        ji_text_printf(t, "Upload-Complete: ?%d\r\n", complete != 0);
    if (expires_at != 0) {
        time_t now = time(NULL);
        ji_http_date(expires_at, date);
        if (draft)
            ji_text_printf(t, "Upload-Limit: max-age=%lld\r\n", (long long)(expires_at > now ? expires_at - now : 0));
        else
            ji_text_printf(t, "Upload-Expires: %s\r\n", date);
    }
}

/** The upload's files: every file its appends wrote (its journals name them). */
static void drop_upload_files(ji_image_store_t *images, const char *batch_key)
{
    uint64_t removed = 0;
    ji_error_t err;

    if (ji_image_store_drop_upload(images, batch_key, &removed, &err) != 0)
        fprintf(stderr, "upload %s: cannot remove its image files: %s\n", batch_key, err.message);
}

/** After a DELETE or a sweep: the files of every deleted upload that never committed (a committed one's are users'). */
static uint64_t drop_deleted(ji_image_store_t *images, PGresult *res)
{
    uint64_t discarded = 0;

    for (int i = 0; i < PQntuples(res); i++) {
        if (strcmp(PQgetvalue(res, i, 1), "committed") == 0)
            continue;
        drop_upload_files(images, PQgetvalue(res, i, 0));
        discarded++;
    }
    return discarded;
}

/* ------------------------------------------------------------------ creation */

static void create_on_result(ji_pg_call_t *call, PGresult *res, const char *err)
{
    ji_upload_create_t *cr = JI_CONTAINER_OF(call, ji_upload_create_t, call);

    free(cr->metadata);
    cr->metadata = NULL;
    if (err == NULL && (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1))
        err = "unexpected answer from the database";
    if (err == NULL)
        cr->expires_at = (time_t)strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    cr->cb(cr, err);
}

int ji_upload_create_start(ji_upload_create_t *cr, struct st_ji_worker_t *w, const ji_upload_creation_t *c,
                           const char *metadata, size_t metadata_len, ji_upload_create_cb cb, ji_error_t *err)
{
    if (atomic_load_explicit(&w->server->stopping, memory_order_relaxed))
        return ji_error_set(err, JI_ERR_STOPPING, 0, NULL, "the server is shutting down: retry on another instance");
    if (ji_upload_token_new(cr->token) != 0 || ji_upload_token_new(cr->batch_key) != 0)
        return ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "no random bytes for a token");
    if (metadata != NULL && (cr->metadata = strndup(metadata, metadata_len)) == NULL)
        return ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
    snprintf(cr->length_text, sizeof(cr->length_text), "%" PRIu64, c->length);
    snprintf(cr->max_errors_text, sizeof(cr->max_errors_text), "%" PRIu64, c->options.max_errors);
    snprintf(cr->expiry_text, sizeof(cr->expiry_text), "%u", w->server->config->upload_expiry_s);
    cr->values[0] = cr->token;
    cr->values[1] = c->draft ? "draft" : "tus";
    cr->values[2] = cr->batch_key;
    cr->values[3] = c->has_length ? cr->length_text : NULL;
    cr->values[4] = c->options.skip_errors ? "true" : "false";
    cr->values[5] = c->options.has_max_errors ? cr->max_errors_text : NULL;
    cr->values[6] = c->options.idempotency_key[0] != '\0' ? c->options.idempotency_key : NULL;
    cr->values[7] = cr->metadata;
    cr->values[8] = cr->expiry_text;
    cr->cb = cb;
    /* the key stays the caller's: `c` must outlive the call */
    cr->idempotency_key = cr->values[6];
    if (ji_pg_call_start(&cr->call, w->pg_pool, SQL_INSERT, 9, cr->values, create_on_result) != 0) {
        free(cr->metadata);
        cr->metadata = NULL;
        return ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
    }
    return 0;
}

void ji_upload_create_dispose(ji_upload_create_t *cr)
{
    ji_pg_call_cancel(&cr->call);
    free(cr->metadata);
    cr->metadata = NULL;
}

/* ------------------------------------------------------------------ expiry */

static void sweep_on_result(ji_pg_call_t *call, PGresult *res, const char *err)
{
    ji_upload_sweeper_t *s = JI_CONTAINER_OF(call, ji_upload_sweeper_t, call);
    ji_worker_t *w = JI_CONTAINER_OF(s, ji_worker_t, upload_sweeper);
    uint64_t discarded;

    s->running = false;
    if (err != NULL || PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "sweeping expired uploads: %s\n", err != NULL ? err : "unexpected answer from the database");
        return;
    }
    discarded = drop_deleted(&w->server->images, res);
    atomic_fetch_add_explicit(&w->ingest_stats.uploads_expired, discarded, memory_order_relaxed);
    if (PQntuples(res) == JI_UPLOAD_SWEEP_ROWS)
        s->next_ms = 0; /* more may be waiting: again at the next turn */
}

void ji_uploads_sweep_tick(ji_worker_t *w)
{
    ji_upload_sweeper_t *s = &w->upload_sweeper;
    unsigned expiry = w->server->config->upload_expiry_s;
    uint64_t now = h2o_now(w->ctx.loop),
             interval_s = expiry < JI_UPLOAD_SWEEP_INTERVAL_S ? expiry : JI_UPLOAD_SWEEP_INTERVAL_S;

    if (s->running || now < s->next_ms || !atomic_load_explicit(&w->server->db_ready, memory_order_acquire) ||
        atomic_load_explicit(&w->server->stopping, memory_order_relaxed))
        return;
    s->next_ms = now + interval_s * 1000;
    if (!s->scheduled) {
        /* the blocking sweep of start-up just ran: the loop's first one waits an interval (and takes no pooled
         * connection while the first requests come in) */
        s->scheduled = true;
        return;
    }
    if (ji_pg_call_start(&s->call, w->pg_pool, SQL_SWEEP, 0, NULL, sweep_on_result) == 0)
        s->running = true;
}

void ji_uploads_sweep_dispose(ji_upload_sweeper_t *s)
{
    ji_pg_call_cancel(&s->call);
    s->running = false;
}

int ji_uploads_expire_blocking(PGconn *conn, ji_image_store_t *images, uint64_t *expired, ji_error_t *err)
{
    for (;;) {
        PGresult *res = PQexec(conn, SQL_SWEEP);
        int n;

        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            ji_error_set(err, JI_ERR_DB, 0, NULL, "sweeping expired uploads: %s", PQerrorMessage(conn));
            PQclear(res);
            return -1;
        }
        *expired += drop_deleted(images, res);
        n = PQntuples(res);
        PQclear(res);
        if (n < JI_UPLOAD_SWEEP_ROWS)
            return 0;
    }
}

/* ------------------------------------------------------------------ the handlers */

typedef struct st_upload_read_t {
    ji_pg_call_t call;
    h2o_req_t *req;
    ji_worker_t *w;
    char token[JI_UPLOAD_TOKEN_CHARS + 1];
    const char *values[1];
} upload_read_t;

static void upload_read_dispose(void *p)
{
    ji_pg_call_cancel(&((upload_read_t *)p)->call);
}

static void add_header(h2o_req_t *req, const char *name, const char *fmt, ...) JI_PRINTF(3, 4);
static void add_header(h2o_req_t *req, const char *name, const char *fmt, ...)
{
    char buf[128];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(buf))
        return;
    h2o_add_header_by_str(&req->pool, &req->res.headers, name, strlen(name), 0, NULL,
                          h2o_strdup(&req->pool, buf, n).base, (size_t)n);
}

/**
 * 404 (unknown or expired) or 410 (ended; a GET gets the state, whose answer is the failure): false when the row
 * is a live upload to answer about.
 */
static bool answer_missing(h2o_req_t *req, PGresult *res, const char *token)
{
    const char *state;

    add_header(req, "Tus-Resumable", JI_TUS_VERSION);
    if (PQntuples(res) == 0 || strcmp(PQgetvalue(res, 0, COL_LIVE), "t") != 0) {
        ji_reply_errorf(req, JI_ERR_NOT_FOUND, "no upload %s (unknown, or expired)", token);
        return true;
    }
    state = PQgetvalue(res, 0, COL_STATE);
    if (strcmp(state, "failed") == 0 || strcmp(state, "cancelled") == 0) {
        if (h2o_memis(req->method.base, req->method.len, H2O_STRLIT("GET"))) {
            /* the state, whose answer is the failure: how a client that lost the PATCH's answer learns why */
            ji_text_t t = {0};
            ji_text_append(&t, PQgetvalue(res, 0, COL_JSON), (size_t)PQgetlength(res, 0, COL_JSON));
            ji_text_append(&t, "\n", 1);
            if (t.failed) {
                ji_text_free(&t);
                ji_reply_errorf(req, JI_ERR_INTERNAL, "out of memory");
                return true;
            }
            ji_reply_json(req, 410, t.base, t.len, 0); /* copied */
            ji_text_free(&t);
            return true;
        }
        ji_reply_errorf(req, JI_ERR_GONE, "upload %s ended (%s): create a new one", token, state);
        return true;
    }
    return false;
}

/**
 * The state read of HEAD, GET and DELETE: true when it found a live upload; otherwise the answer is sent (503 on
 * a database error, whose text goes to stderr only; 404 or 410 through answer_missing).
 */
static bool state_is_live(h2o_req_t *req, const char *token, PGresult *res, const char *err)
{
    if (err != NULL) {
        fprintf(stderr, "%.*s /uploads/%s: database: %s\n", (int)req->method.len, req->method.base, token, err);
        ji_reply_errorf(req, JI_ERR_DB, "database error");
        return false;
    }
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQnfields(res) != STATE_NCOLS) {
        ji_reply_errorf(req, JI_ERR_INTERNAL, "unexpected answer from the database");
        return false;
    }
    return !answer_missing(req, res, token);
}

static void state_on_result(ji_pg_call_t *call, PGresult *res, const char *err)
{
    upload_read_t *r = JI_CONTAINER_OF(call, upload_read_t, call);
    h2o_req_t *req = r->req;
    bool head = h2o_memis(req->method.base, req->method.len, H2O_STRLIT("HEAD"));
    time_t expires, now = time(NULL);
    char date[JI_HTTP_DATE_CAP];

    if (!state_is_live(req, r->token, res, err))
        return;
    expires = (time_t)strtoll(PQgetvalue(res, 0, COL_EXPIRES), NULL, 10);
    ji_http_date(expires, date);
    add_header(req, "Upload-Offset", "%s", PQgetvalue(res, 0, COL_OFFSET));
    if (!PQgetisnull(res, 0, COL_LENGTH))
        add_header(req, "Upload-Length", "%s", PQgetvalue(res, 0, COL_LENGTH));
    else
        add_header(req, "Upload-Defer-Length", "1");
    add_header(req, "Upload-Complete", "?%d", strcmp(PQgetvalue(res, 0, COL_STATE), "committed") == 0);
    add_header(req, "Upload-Expires", "%s", date);
    add_header(req, "Upload-Limit", "max-age=%lld", (long long)(expires > now ? expires - now : 0));
    if (strcmp(PQgetvalue(res, 0, COL_PROTOCOL), "draft") == 0)
        add_header(req, "Upload-Draft-Interop-Version", JI_DRAFT_INTEROP_VERSION);
    add_header(req, "Cache-Control", "no-store");
    if (head) {
        req->res.status = 200;
        req->res.reason = "OK";
        h2o_send_inline(req, NULL, 0);
        return;
    }
    {
        ji_text_t t = {0};
        ji_text_append(&t, PQgetvalue(res, 0, COL_JSON), (size_t)PQgetlength(res, 0, COL_JSON));
        ji_text_append(&t, "\n", 1);
        ji_reply_ok_text(req, "application/json", &t);
    }
}

static void delete_on_result(ji_pg_call_t *call, PGresult *res, const char *err);

/** DELETE: first whether there is an upload to delete (404, 410), then the takeover and the delete. */
static void delete_check_on_result(ji_pg_call_t *call, PGresult *res, const char *err)
{
    upload_read_t *r = JI_CONTAINER_OF(call, upload_read_t, call);
    h2o_req_t *req = r->req;

    if (!state_is_live(req, r->token, res, err))
        return;
    if (ji_pg_call_start(&r->call, r->w->pg_pool, SQL_DELETE, 1, r->values, delete_on_result) != 0)
        ji_reply_errorf(req, JI_ERR_INTERNAL, "out of memory");
}

static void delete_on_result(ji_pg_call_t *call, PGresult *res, const char *err)
{
    upload_read_t *r = JI_CONTAINER_OF(call, upload_read_t, call);
    h2o_req_t *req = r->req;

    if (err != NULL) {
        fprintf(stderr, "DELETE /uploads/%s: database: %s\n", r->token, err);
        ji_reply_errorf(req, JI_ERR_DB, "database error");
        return;
    }
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        ji_reply_errorf(req, JI_ERR_INTERNAL, "unexpected answer from the database");
        return;
    }
    if (PQntuples(res) == 0) { /* another request deleted it, or it expired, meanwhile */
        ji_reply_errorf(req, JI_ERR_NOT_FOUND, "no upload %s (unknown, or expired)", r->token);
        return;
    }
    drop_deleted(&r->w->server->images, res);
    req->res.status = 204;
    req->res.reason = "No Content";
    h2o_send_inline(req, NULL, 0);
}

static void options_uploads(ji_worker_t *w, h2o_req_t *req)
{
    add_header(req, "Tus-Resumable", JI_TUS_VERSION);
    add_header(req, "Tus-Version", JI_TUS_VERSION);
    add_header(req, "Tus-Extension", JI_TUS_EXTENSIONS);
    add_header(req, "Tus-Max-Size", "%" PRIu64, w->server->config->max_upload_bytes);
    req->res.status = 204;
    req->res.reason = "No Content";
    h2o_send_inline(req, NULL, 0);
}

static int on_uploads(h2o_handler_t *self, h2o_req_t *req)
{
    static const char prefix[] = "/uploads/";
    ji_worker_t *w = ji_worker_of(req->conn->ctx);
    const char *path = req->path.base, *q = memchr(path, '?', req->path.len);
    size_t path_len = q != NULL ? (size_t)(q - path) : req->path.len;
    bool del = h2o_memis(req->method.base, req->method.len, H2O_STRLIT("DELETE"));
    upload_read_t *r;

    (void)self;
    if (h2o_memis(req->method.base, req->method.len, H2O_STRLIT("OPTIONS"))) {
        options_uploads(w, req);
        return 0;
    }
    /* the front door sent only HEAD, GET or DELETE of a token of the right shape */
    if (path_len != sizeof(prefix) - 1 + JI_UPLOAD_TOKEN_CHARS || memcmp(path, prefix, sizeof(prefix) - 1) != 0) {
        ji_reply_errorf(req, JI_ERR_NOT_FOUND, "no such route");
        return 0;
    }
    if (!atomic_load_explicit(&w->server->db_ready, memory_order_acquire)) {
        ji_reply_errorf(req, JI_ERR_DB, "database unavailable: the schema is not ready yet");
        return 0;
    }
    if (atomic_load_explicit(&w->server->stopping, memory_order_relaxed)) {
        ji_reply_errorf(req, JI_ERR_STOPPING, "the server is shutting down");
        return 0;
    }
    r = h2o_mem_alloc_shared(&req->pool, sizeof(*r), upload_read_dispose);
    memset(r, 0, sizeof(*r));
    r->req = req;
    r->w = w;
    memcpy(r->token, path + sizeof(prefix) - 1, JI_UPLOAD_TOKEN_CHARS);
    r->values[0] = r->token;
    if (ji_pg_call_start(&r->call, w->pg_pool, SQL_STATE, 1, r->values,
                         del ? delete_check_on_result : state_on_result) != 0)
        ji_reply_errorf(req, JI_ERR_INTERNAL, "out of memory");
    return 0;
}

void ji_uploads_register(h2o_hostconf_t *host)
{
    h2o_pathconf_t *pathconf = h2o_config_register_path(host, "/uploads", 0);
    h2o_handler_t *handler = h2o_create_handler(pathconf, sizeof(*handler));

    handler->on_req = on_uploads;
}
