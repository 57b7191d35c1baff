/*
 * reads.c — owns the read side of the service: one user as JSON, a user's
 * image streamed from its file, the JSON Lines / CSV export streamed page by
 * page, readiness (a database round trip) and the Prometheus metrics. All of
 * them are ordinary h2o handlers on the worker's event loop; the database is
 * reached through the worker's non-blocking pool (pg.h), never blocking.
 *
 * Lifetime: every request's state is allocated with h2o_mem_alloc_shared from
 * the request's pool, with a dispose callback that cancels whatever is still
 * running (ji_pg_free of a connection in use, close of an image file). h2o
 * disposes the pool when the response is done or the client went away, so no
 * path leaks. Any h2o_send may dispose the request synchronously (a HEAD, an
 * error, a pipelined next request): it is always the last thing a function
 * does with that state.
 *
 * Export: keyset pagination, one statement per page (WHERE user_id > $last
 * ORDER BY user_id LIMIT page). The connection goes back to the pool after
 * each page, so a slow client holds no database connection. The next page is
 * fetched while the current one is being sent (two page buffers): memory is
 * two pages, whatever the table size.
 */
#include "reads.h"
#include "handler_reply.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "json_text.h"

/** The row columns, in this order, of every query that returns users. created_at as RFC 3339 in UTC. */
#define USER_COLUMNS                                                                                                   \
    "user_id, name, email, image_path IS NOT NULL, image_type, image_size, batch_id, "                                 \
    "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
enum { COL_ID, COL_NAME, COL_EMAIL, COL_HAS_IMAGE, COL_IMAGE_TYPE, COL_IMAGE_SIZE, COL_BATCH_ID, COL_CREATED_AT, NCOLS };

static const char SQL_USER[] = "SELECT " USER_COLUMNS " FROM users WHERE user_id = $1";
static const char SQL_IMAGE[] = "SELECT image_path, image_type FROM users WHERE user_id = $1";
static const char SQL_PAGE[] = "SELECT " USER_COLUMNS " FROM users WHERE user_id > $1 ORDER BY user_id LIMIT $2";
static const char SQL_PING[] = "SELECT 1";

static const char CSV_HEADER[] = "user_id,name,email,image_url,image_type,image_size,batch_id,created_at\r\n";

/* ------------------------------------------------------------------ answers */

/** A complete answer with a body (copied). May dispose the request: the caller's last action. */
static void send_body(h2o_req_t *req, int status, const char *reason, const char *type, const char *body, size_t len)
{
    req->res.status = status;
    req->res.reason = reason;
    req->res.content_length = len;
    h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL, type, strlen(type));
    h2o_send_inline(req, body, len); /* copies; sends no body for HEAD */
}

/** Sends `t` (then frees it; an incomplete text becomes a 500). May dispose the request: the caller's last action. */
static void send_text(h2o_req_t *req, int status, const char *reason, const char *type, ji_text_t *t)
{
    if (t->failed || t->base == NULL) {
        ji_text_free(t);
        send_body(req, 500, "Internal Server Error", "application/json", H2O_STRLIT("{\"error\":\"out of memory\"}\n"));
        return;
    }
    send_body(req, status, reason, type, t->base, t->len); /* copied before anything is sent */
    ji_text_free(t);                                       /* ours, not the request's: still valid here */
}

/** `{"error":"<message>"}`; a 503 carries Retry-After. */
static void send_error(h2o_req_t *req, int status, const char *reason, const char *fmt, ...) JI_PRINTF(4, 5);
static void send_error(h2o_req_t *req, int status, const char *reason, const char *fmt, ...)
{
    ji_text_t t = {0};
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    ji_text_append(&t, "{\"error\":", 9);
    ji_text_json_string(&t, msg, strlen(msg));
    ji_text_append(&t, "}\n", 2);
    if (status == 503)
        ji_reply_add_retry_after(req, JI_RETRY_AFTER_BUSY_S);
    send_text(req, status, reason, "application/json", &t);
}

static void send_db_unavailable(h2o_req_t *req, const char *why)
{
    send_error(req, 503, "Service Unavailable", "database unavailable: %s", why);
}

/** GET or HEAD; anything else gets 405 here (and false). */
static bool accept_method(h2o_req_t *req, const char *allow, bool *head)
{
    *head = h2o_memis(req->method.base, req->method.len, H2O_STRLIT("HEAD"));
    if (*head || h2o_memis(req->method.base, req->method.len, H2O_STRLIT("GET")))
        return true;
    h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_ALLOW, NULL, allow, strlen(allow));
    send_error(req, 405, "Method Not Allowed", "method %.*s is not allowed here (allowed: %s)", (int)req->method.len,
               req->method.base, allow);
    return false;
}

/** The database is usable for reads: the schema exists (start-up finished). Else answers 503. */
static bool db_usable(ji_worker_t *w, h2o_req_t *req)
{
    if (atomic_load_explicit(&w->server->db_ready, memory_order_acquire))
        return true;
    send_db_unavailable(req, "the schema is not ready yet (the database was unreachable at start; retrying)");
    return false;
}

/* ------------------------------------------------------------------ numbers */

/** Most characters of a client's value quoted back in an error message. */
#define ECHO_MAX 40

/** A client's value for an error message: at most ECHO_MAX printable ASCII characters (others become '?'). */
static const char *echo_value(char buf[ECHO_MAX + 1], const char *s, size_t len)
{
    size_t n = len < ECHO_MAX ? len : ECHO_MAX;

    for (size_t i = 0; i < n; i++)
        buf[i] = s[i] >= 0x20 && s[i] <= 0x7e ? s[i] : '?';
    buf[n] = '\0';
    return buf;
}

/** Parses 1 to 19 decimal digits, at most INT64_MAX. 0, or -1. */
static int parse_int64(const char *s, size_t len, int64_t *out)
{
    uint64_t v = 0;

    if (len == 0 || len > 19)
        return -1;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    if (v > (uint64_t)INT64_MAX)
        return -1;
    *out = (int64_t)v;
    return 0;
}

/* ------------------------------------------------------------------ one statement through the pool */

typedef struct st_db_call_t db_call_t;
/** The statement's result (valid during the call only), or `err`. The connection is back in the pool already. */
typedef void (*db_call_cb)(db_call_t *call, PGresult *res, const char *err);

/** One statement on a pooled connection; embedded in a request's state. */
struct st_db_call_t {
    ji_pg_pool_t *pool;
    ji_pg_t *pg; /**< set while a connection is being obtained or the statement runs */
    const char *sql;
    int nparams;
    char params[2][24];
    const char *values[2];
    db_call_cb cb;
};

static void db_call_on_result(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    db_call_t *c = ctx;

    /* back to the pool first (kept when healthy); `res` and `err` stay valid until this callback returns */
    c->pg = NULL;
    ji_pg_pool_put(c->pool, pg);
    c->cb(c, res, err);
}

static void db_call_on_ready(ji_pg_t *pg, void *ctx, const char *err)
{
    db_call_t *c = ctx;
    char msg[256];

    if (err == NULL) {
        if (ji_pg_query(pg, c->sql, c->nparams, c->values, db_call_on_result, c) == 0)
            return;
        err = ji_pg_error(pg);
    }
    snprintf(msg, sizeof(msg), "%s", err);
    c->pg = NULL;
    ji_pg_free(pg);
    c->cb(c, NULL, msg);
}

static const char START_STOPPING[] = "the server is shutting down";
static const char START_NO_MEMORY[] = "out of memory";

/**
 * Starts the statement (parameters in c->params[0..nparams-1]). NULL, or why not: START_STOPPING (once the
 * server is stopping no new database work starts, so the pool drains and can be freed) or START_NO_MEMORY.
 */
static const char *db_call_start(db_call_t *c, ji_worker_t *w, const char *sql, int nparams, db_call_cb cb)
{
    if (atomic_load_explicit(&w->server->stopping, memory_order_relaxed))
        return START_STOPPING;
    c->pool = w->pg_pool;
    c->sql = sql;
    c->nparams = nparams;
    for (int i = 0; i < nparams; i++)
        c->values[i] = c->params[i];
    c->cb = cb;
    if ((c->pg = ji_pg_pool_get(c->pool, db_call_on_ready, c)) == NULL)
        return START_NO_MEMORY;
    return NULL;
}

/** Answers a request whose database work could not start. */
static void send_start_failed(h2o_req_t *req, const char *why)
{
    if (why == START_NO_MEMORY)
        send_error(req, 500, "Internal Server Error", "%s", why);
    else
        send_error(req, 503, "Service Unavailable", "%s", why);
}

/** Cancels what runs: the connection is closed (the server abandons the statement); no callback follows. */
static void db_call_cancel(db_call_t *c)
{
    if (c->pg != NULL) {
        ji_pg_free(c->pg);
        c->pg = NULL;
    }
}

/** A result has the expected shape: rows and `ncols` columns. */
static bool result_ok(const PGresult *res, int ncols)
{
    return res != NULL && PQresultStatus(res) == PGRES_TUPLES_OK && PQnfields(res) == ncols;
}

/* ------------------------------------------------------------------ row encoders */

#define APPEND_LIT(t, s) ji_text_append((t), (s), sizeof(s) - 1)

static void append_col(ji_text_t *t, const PGresult *res, int row, int col)
{
    ji_text_append(t, PQgetvalue(res, row, col), (size_t)PQgetlength(res, row, col));
}

/** A JSON number column (bigint text), or null. */
static void json_number_or_null(ji_text_t *t, const PGresult *res, int row, int col)
{
    if (PQgetisnull(res, row, col))
        APPEND_LIT(t, "null");
    else
        append_col(t, res, row, col);
}

static void json_string_or_null(ji_text_t *t, const PGresult *res, int row, int col)
{
    if (PQgetisnull(res, row, col))
        APPEND_LIT(t, "null");
    else
        ji_text_json_string(t, PQgetvalue(res, row, col), (size_t)PQgetlength(res, row, col));
}

static bool has_image(const PGresult *res, int row)
{
    return PQgetvalue(res, row, COL_HAS_IMAGE)[0] == 't';
}

/** One user as a JSON object and a newline. */
static void encode_json_row(ji_text_t *t, const PGresult *res, int row)
{
    APPEND_LIT(t, "{\"user_id\":");
    append_col(t, res, row, COL_ID);
    APPEND_LIT(t, ",\"name\":");
    json_string_or_null(t, res, row, COL_NAME);
    APPEND_LIT(t, ",\"email\":");
    json_string_or_null(t, res, row, COL_EMAIL);
    APPEND_LIT(t, ",\"image_url\":");
    if (has_image(res, row)) {
        APPEND_LIT(t, "\"/users/");
        append_col(t, res, row, COL_ID);
        APPEND_LIT(t, "/image\"");
    } else {
        APPEND_LIT(t, "null");
    }
    APPEND_LIT(t, ",\"image_type\":");
    json_string_or_null(t, res, row, COL_IMAGE_TYPE);
    APPEND_LIT(t, ",\"image_size\":");
    json_number_or_null(t, res, row, COL_IMAGE_SIZE);
    APPEND_LIT(t, ",\"batch_id\":");
    json_number_or_null(t, res, row, COL_BATCH_ID);
    APPEND_LIT(t, ",\"created_at\":");
    json_string_or_null(t, res, row, COL_CREATED_AT);
    APPEND_LIT(t, "}\n");
}

/** One CSV field (RFC 4180): quoted, with quotes doubled, when it holds a comma, a quote, CR or LF. */
static void csv_field(ji_text_t *t, const char *s, size_t len)
{
    size_t start = 0;

    if (strcspn(s, ",\"\r\n") >= len) {
        ji_text_append(t, s, len);
        return;
    }
    APPEND_LIT(t, "\"");
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '"') {
            ji_text_append(t, s + start, i + 1 - start); /* up to and including the quote ... */
            start = i;                                   /* ... which is written again: "" */
        }
    }
    ji_text_append(t, s + start, len - start);
    APPEND_LIT(t, "\"");
}

static void csv_col(ji_text_t *t, const PGresult *res, int row, int col)
{
    if (!PQgetisnull(res, row, col)) /* NULL is an empty field */
        csv_field(t, PQgetvalue(res, row, col), (size_t)PQgetlength(res, row, col));
}

/** One user as a CSV record (CRLF), columns as in CSV_HEADER. */
static void encode_csv_row(ji_text_t *t, const PGresult *res, int row)
{
    append_col(t, res, row, COL_ID);
    APPEND_LIT(t, ",");
    csv_col(t, res, row, COL_NAME);
    APPEND_LIT(t, ",");
    csv_col(t, res, row, COL_EMAIL);
    APPEND_LIT(t, ",");
    if (has_image(res, row)) {
        APPEND_LIT(t, "/users/");
        append_col(t, res, row, COL_ID);
        APPEND_LIT(t, "/image");
    }
    APPEND_LIT(t, ",");
    csv_col(t, res, row, COL_IMAGE_TYPE);
    APPEND_LIT(t, ",");
    csv_col(t, res, row, COL_IMAGE_SIZE);
    APPEND_LIT(t, ",");
    csv_col(t, res, row, COL_BATCH_ID);
    APPEND_LIT(t, ",");
    csv_col(t, res, row, COL_CREATED_AT);
    APPEND_LIT(t, "\r\n");
}

/* ------------------------------------------------------------------ GET /users/{id} */

typedef struct st_user_req_t {
    db_call_t call;
    h2o_req_t *req;
    int64_t id;
} user_req_t;

static void user_dispose(void *p)
{
    user_req_t *u = p;
    db_call_cancel(&u->call);
}

static void user_on_result(db_call_t *call, PGresult *res, const char *err)
{
    user_req_t *u = JI_CONTAINER_OF(call, user_req_t, call);
    ji_text_t t = {0};

    if (err != NULL) {
        send_db_unavailable(u->req, err);
        return;
    }
    if (!result_ok(res, NCOLS)) {
        send_error(u->req, 500, "Internal Server Error", "unexpected answer from the database");
        return;
    }
    if (PQntuples(res) == 0) {
        send_error(u->req, 404, "Not Found", "no user %" PRId64, u->id);
        return;
    }
    encode_json_row(&t, res, 0);
    send_text(u->req, 200, "OK", "application/json", &t);
}

static void get_user(ji_worker_t *w, h2o_req_t *req, int64_t id)
{
    user_req_t *u = h2o_mem_alloc_shared(&req->pool, sizeof(*u), user_dispose);
    const char *why;

    memset(u, 0, sizeof(*u));
    u->req = req;
    u->id = id;
    snprintf(u->call.params[0], sizeof(u->call.params[0]), "%" PRId64, id);
    if ((why = db_call_start(&u->call, w, SQL_USER, 1, user_on_result)) != NULL)
        send_start_failed(req, why);
}

/* ------------------------------------------------------------------ GET /users/{id}/image */

typedef struct st_image_req_t {
    h2o_generator_t super;
    db_call_t call;
    h2o_req_t *req;
    ji_worker_t *w;
    int64_t id;
    bool head;
    int fd;        /**< the image file while it is being sent, else -1 */
    uint64_t left; /**< bytes still to send */
    char *buf;     /**< JI_IMAGE_CHUNK_BYTES or the file size, whichever is smaller (request pool) */
    size_t buf_cap;
} image_req_t;

static void image_close(image_req_t *r)
{
    if (r->fd != -1) {
        close(r->fd);
        r->fd = -1;
    }
}

static void image_dispose(void *p)
{
    image_req_t *r = p;

    db_call_cancel(&r->call);
    image_close(r);
}

/** Reads and sends the next piece of the file (the generator's proceed callback). */
static void image_proceed(h2o_generator_t *self, h2o_req_t *req)
{
    image_req_t *r = JI_CONTAINER_OF(self, image_req_t, super);
    size_t want = r->left < r->buf_cap ? (size_t)r->left : r->buf_cap;
    h2o_send_state_t state;
    h2o_iovec_t vec;
    ssize_t n;

    while ((n = read(r->fd, r->buf, want)) == -1 && errno == EINTR)
        ;
    if (n <= 0) {
        /* the headers promised left more bytes: all the client can be told is a cut connection */
        fprintf(stderr, "GET /users/%" PRId64 "/image: %s\n", r->id,
                n == 0 ? "the file became shorter while it was sent" : strerror(errno));
        image_close(r);
        h2o_send(req, NULL, 0, H2O_SEND_STATE_ERROR);
        return;
    }
    r->left -= (uint64_t)n;
    state = r->left == 0 ? H2O_SEND_STATE_FINAL : H2O_SEND_STATE_IN_PROGRESS;
    if (state == H2O_SEND_STATE_FINAL)
        image_close(r);
    vec = h2o_iovec_init(r->buf, (size_t)n);
    h2o_send(req, &vec, 1, state);
}

static void image_stop(h2o_generator_t *self, h2o_req_t *req)
{
    (void)req;
    image_close(JI_CONTAINER_OF(self, image_req_t, super));
}

/** A relative path of the images directory that stays inside it (the database is not trusted with `..`). */
static bool safe_relative_path(const char *p)
{
    if (p[0] == '\0' || p[0] == '/')
        return false;
    for (;;) {
        size_t n = strcspn(p, "/");
        if (n == 0 || (n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.'))
            return false;
        if (p[n] == '\0')
            return true;
        p += n + 1;
    }
}

/** A Content-Type header value we are willing to send: printable ASCII, no CR/LF. */
static bool safe_media_type(const char *s, size_t len)
{
    if (len == 0 || len > 127)
        return false;
    for (size_t i = 0; i < len; i++)
        if (s[i] < 0x20 || s[i] > 0x7e)
            return false;
    return true;
}

static void image_on_result(db_call_t *call, PGresult *res, const char *err)
{
    image_req_t *r = JI_CONTAINER_OF(call, image_req_t, call);
    h2o_req_t *req = r->req;
    const char *path, *type = "application/octet-stream", *why = NULL;
    struct stat st;
    ji_error_t open_err;

    if (err != NULL) {
        send_db_unavailable(req, err);
        return;
    }
    if (!result_ok(res, 2)) {
        send_error(req, 500, "Internal Server Error", "unexpected answer from the database");
        return;
    }
    if (PQntuples(res) == 0) {
        send_error(req, 404, "Not Found", "no user %" PRId64, r->id);
        return;
    }
    if (PQgetisnull(res, 0, 0)) {
        send_error(req, 404, "Not Found", "user %" PRId64 " has no image", r->id);
        return;
    }
    path = PQgetvalue(res, 0, 0);
    if (!PQgetisnull(res, 0, 1) && safe_media_type(PQgetvalue(res, 0, 1), (size_t)PQgetlength(res, 0, 1)))
        type = h2o_strdup(&req->pool, PQgetvalue(res, 0, 1), (size_t)PQgetlength(res, 0, 1)).base;
    if (!safe_relative_path(path)) {
        send_error(req, 500, "Internal Server Error", "image path of user %" PRId64 " is not inside the images directory",
                   r->id);
        return;
    }
    if ((r->fd = ji_image_store_open_file(&r->w->server->images, path, &open_err)) == -1) {
        /* a committed row's file always exists: its absence is the server's fault, not the client's */
        send_error(req, 500, "Internal Server Error", "cannot open the image file of user %" PRId64 ": %s", r->id,
                   open_err.message);
        return;
    }
    if (fstat(r->fd, &st) != 0)
        why = strerror(errno);
    else if (!S_ISREG(st.st_mode))
        why = "not a regular file";
    if (why != NULL) {
        image_close(r);
        send_error(req, 500, "Internal Server Error", "the image file of user %" PRId64 ": %s", r->id, why);
        return;
    }
    r->left = (uint64_t)st.st_size;
    r->buf_cap = r->left < JI_IMAGE_CHUNK_BYTES ? (size_t)r->left : JI_IMAGE_CHUNK_BYTES;
    if (r->buf_cap == 0)
        r->buf_cap = 1;
    r->buf = h2o_mem_alloc_pool(&req->pool, r->buf_cap);

    req->res.status = 200;
    req->res.reason = "OK";
    req->res.content_length = (size_t)st.st_size;
    h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL, type, strlen(type));
    h2o_add_header_by_str(&req->pool, &req->res.headers, H2O_STRLIT("x-content-type-options"), 0, NULL,
                          H2O_STRLIT("nosniff"));
    r->super.proceed = image_proceed;
    r->super.stop = image_stop;
    h2o_start_response(req, &r->super);
    if (r->head || r->left == 0) {
        image_close(r);
        h2o_send(req, NULL, 0, H2O_SEND_STATE_FINAL);
        return;
    }
    image_proceed(&r->super, req);
}

static void get_image(ji_worker_t *w, h2o_req_t *req, int64_t id, bool head)
{
    image_req_t *r = h2o_mem_alloc_shared(&req->pool, sizeof(*r), image_dispose);
    const char *why;

    memset(r, 0, sizeof(*r));
    r->req = req;
    r->w = w;
    r->id = id;
    r->head = head;
    r->fd = -1;
    snprintf(r->call.params[0], sizeof(r->call.params[0]), "%" PRId64, id);
    if ((why = db_call_start(&r->call, w, SQL_IMAGE, 1, image_on_result)) != NULL)
        send_start_failed(req, why);
}

/* ------------------------------------------------------------------ GET /users, GET /users.csv */

typedef struct st_export_t {
    h2o_generator_t super;
    db_call_t call;
    h2o_req_t *req;
    ji_worker_t *w;
    bool csv, head;
    int64_t after_id;   /**< the last user_id fetched */
    uint64_t remaining; /**< rows the client still wants (UINT64_MAX: all) */
    uint64_t sent_rows; /**< rows fetched so far (for messages) */
    unsigned asked;     /**< LIMIT of the running fetch */
    ji_text_t page[2];  /**< one being sent, one being filled */
    unsigned filling;   /**< index of the page the running fetch fills (or that is ready) */
    bool started;       /**< the response headers went out */
    bool sending;       /**< an h2o_send is in flight (its page must stay untouched) */
    bool ready;         /**< page[filling] is complete and waits for the previous send */
    bool last;          /**< ... and it is the final one */
    bool failed;        /**< a fetch failed after the headers: end the response with an error */
} export_t;

static void export_on_page(db_call_t *call, PGresult *res, const char *err);

static void export_dispose(void *p)
{
    export_t *e = p;

    db_call_cancel(&e->call);
    ji_text_free(&e->page[0]);
    ji_text_free(&e->page[1]);
}

/** Starts fetching the next page into page[filling]. NULL, or why not (see db_call_start). */
static const char *export_fetch(export_t *e)
{
    e->asked = e->remaining < JI_EXPORT_PAGE_ROWS ? (unsigned)e->remaining : JI_EXPORT_PAGE_ROWS;
    snprintf(e->call.params[0], sizeof(e->call.params[0]), "%" PRId64, e->after_id);
    snprintf(e->call.params[1], sizeof(e->call.params[1]), "%u", e->asked);
    return db_call_start(&e->call, e->w, SQL_PAGE, 2, export_on_page);
}

/** Sends the ready page (starting the response with the first one) and starts fetching the next. */
static void export_flush(export_t *e)
{
    h2o_req_t *req = e->req;
    ji_text_t *p = &e->page[e->filling];
    bool last = e->last;
    h2o_iovec_t vec = h2o_iovec_init(p->base, p->len);
    const char *why;

    e->ready = false;
    e->filling ^= 1; /* the next fetch fills the other page; this one belongs to h2o until proceed */
    if (!e->started) {
        const char *type = e->csv ? "text/csv; charset=utf-8; header=present" : "application/x-ndjson";
        e->started = true;
        req->res.status = 200;
        req->res.reason = "OK";
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL, type, strlen(type));
        h2o_start_response(req, &e->super);
        if (e->head) { /* HEAD: the status says the database answered; no rows */
            h2o_send(req, NULL, 0, H2O_SEND_STATE_FINAL);
            return;
        }
    }
    if (!last && (why = export_fetch(e)) != NULL) {
        fprintf(stderr, "GET %.*s: export cut after %" PRIu64 " rows: %s\n", (int)req->path.len, req->path.base,
                e->sent_rows, why);
        e->failed = true; /* this page still goes out; the response then ends with an error */
    }
    e->sending = true;
    h2o_send(req, &vec, vec.len != 0 ? 1 : 0, last ? H2O_SEND_STATE_FINAL : H2O_SEND_STATE_IN_PROGRESS);
}

static void export_on_page(db_call_t *call, PGresult *res, const char *err)
{
    export_t *e = JI_CONTAINER_OF(call, export_t, call);
    h2o_req_t *req = e->req;
    ji_text_t *p = &e->page[e->filling];
    int n;

    if (err == NULL && !result_ok(res, NCOLS))
        err = "unexpected answer from the database";
    if (err == NULL) {
        p->len = 0;
        if (!e->started && e->csv)
            ji_text_append(p, CSV_HEADER, sizeof(CSV_HEADER) - 1);
        n = PQntuples(res);
        for (int i = 0; i < n; i++) {
            if (e->csv)
                encode_csv_row(p, res, i);
            else
                encode_json_row(p, res, i);
        }
        if (p->failed)
            err = "out of memory";
    }
    if (err != NULL) {
        if (!e->started) {
            if (p->failed)
                send_error(req, 500, "Internal Server Error", "out of memory");
            else
                send_db_unavailable(req, err);
            return;
        }
        /* the status line is gone: the client learns of the failure from a cut response (no final chunk) */
        fprintf(stderr, "GET %.*s: export cut after %" PRIu64 " rows: %s\n", (int)req->path.len, req->path.base,
                e->sent_rows, err);
        if (e->sending) {
            e->failed = true; /* ended when h2o asks for more */
            return;
        }
        h2o_send(req, NULL, 0, H2O_SEND_STATE_ERROR);
        return;
    }
    if (n > 0)
        e->after_id = strtoll(PQgetvalue(res, n - 1, COL_ID), NULL, 10);
    e->sent_rows += (uint64_t)n;
    if (e->remaining != UINT64_MAX)
        e->remaining -= (uint64_t)n;
    e->last = (unsigned)n < e->asked || e->remaining == 0;
    e->ready = true;
    if (!e->sending)
        export_flush(e);
}

/** h2o sent the previous page and wants more. */
static void export_proceed(h2o_generator_t *self, h2o_req_t *req)
{
    export_t *e = JI_CONTAINER_OF(self, export_t, super);

    e->sending = false;
    if (e->failed) {
        h2o_send(req, NULL, 0, H2O_SEND_STATE_ERROR);
        return;
    }
    if (e->ready)
        export_flush(e);
    /* else the running fetch flushes when it completes */
}

static void export_stop(h2o_generator_t *self, h2o_req_t *req)
{
    (void)self;
    (void)req; /* the request pool's dispose callback cancels the fetch and frees the pages */
}

/** Parses `after_id=N&limit=M` (other parameters are ignored). 0, or -1 after answering 400. */
static int parse_export_query(h2o_req_t *req, int64_t *after_id, uint64_t *limit)
{
    const char *q, *end;

    *after_id = 0;
    *limit = UINT64_MAX;
    if (req->query_at == SIZE_MAX)
        return 0;
    q = req->path.base + req->query_at + 1;
    end = req->path.base + req->path.len;
    while (q < end) {
        const char *amp = memchr(q, '&', (size_t)(end - q)), *eq;
        size_t len = (size_t)((amp != NULL ? amp : end) - q);
        int64_t v;

        eq = memchr(q, '=', len);
        if (eq != NULL) {
            size_t klen = (size_t)(eq - q), vlen = len - klen - 1;
            bool is_after = h2o_memis(q, klen, H2O_STRLIT("after_id")), is_limit = h2o_memis(q, klen, H2O_STRLIT("limit"));
            if (is_after || is_limit) {
                if (parse_int64(eq + 1, vlen, &v) != 0) {
                    char echo[ECHO_MAX + 1];
                    send_error(req, 400, "Bad Request", "%s must be an integer from 0 to %" PRId64 ", not \"%s\"",
                               is_after ? "after_id" : "limit", INT64_MAX, echo_value(echo, eq + 1, vlen));
                    return -1;
                }
                if (is_after)
                    *after_id = v;
                else
                    *limit = (uint64_t)v;
            }
        }
        q += len + 1;
    }
    return 0;
}

static void export_users(ji_worker_t *w, h2o_req_t *req, bool csv, bool head)
{
    int64_t after_id;
    uint64_t limit;
    const char *why;
    export_t *e;

    if (parse_export_query(req, &after_id, &limit) != 0 || !db_usable(w, req))
        return;
    e = h2o_mem_alloc_shared(&req->pool, sizeof(*e), export_dispose);
    memset(e, 0, sizeof(*e));
    e->super.proceed = export_proceed;
    e->super.stop = export_stop;
    e->req = req;
    e->w = w;
    e->csv = csv;
    e->head = head;
    e->after_id = after_id;
    e->remaining = limit;
    if ((why = export_fetch(e)) != NULL)
        send_start_failed(req, why);
}

/* ------------------------------------------------------------------ /users routes */

int ji_reads_handle_users(ji_worker_t *w, h2o_req_t *req)
{
    h2o_iovec_t path = req->path_normalized;
    const char *rest, *slash;
    size_t rest_len, id_len;
    int64_t id;
    bool head;

    if (h2o_memis(path.base, path.len, H2O_STRLIT("/users"))) {
        if (accept_method(req, "GET, HEAD, POST", &head))
            export_users(w, req, false, head);
        return 0;
    }
    if (path.len <= sizeof("/users/") - 1 || memcmp(path.base, "/users/", sizeof("/users/") - 1) != 0) {
        send_error(req, 404, "Not Found", "no such route");
        return 0;
    }
    rest = path.base + sizeof("/users/") - 1;
    rest_len = path.len - (sizeof("/users/") - 1);
    slash = memchr(rest, '/', rest_len);
    id_len = slash != NULL ? (size_t)(slash - rest) : rest_len;
    if (slash != NULL && !h2o_memis(slash, rest_len - id_len, H2O_STRLIT("/image"))) {
        send_error(req, 404, "Not Found", "no such route");
        return 0;
    }
    if (!accept_method(req, "GET, HEAD", &head))
        return 0;
    if (parse_int64(rest, id_len, &id) != 0) {
        char echo[ECHO_MAX + 1];
        send_error(req, 400, "Bad Request", "user id must be an integer from 0 to %" PRId64 ", not \"%s\"", INT64_MAX,
                   echo_value(echo, rest, id_len));
        return 0;
    }
    if (!db_usable(w, req))
        return 0;
    if (slash == NULL)
        get_user(w, req, id);
    else
        get_image(w, req, id, head);
    return 0;
}

static int on_users_csv(h2o_handler_t *self, h2o_req_t *req)
{
    ji_worker_t *w = ji_worker_of(req->conn->ctx);
    bool head;

    (void)self;
    if (!h2o_memis(req->path_normalized.base, req->path_normalized.len, H2O_STRLIT("/users.csv"))) {
        send_error(req, 404, "Not Found", "no such route");
        return 0;
    }
    if (accept_method(req, "GET, HEAD", &head))
        export_users(w, req, true, head);
    return 0;
}

/* ------------------------------------------------------------------ GET /readyz */

typedef struct st_readyz_t {
    db_call_t call;
    h2o_req_t *req;
    h2o_timeout_entry_t deadline; /**< on the context's one-second list, JI_READYZ_TIMEOUT_S times */
    unsigned ticks_left;
} readyz_t;

static void readyz_dispose(void *p)
{
    readyz_t *r = p;

    h2o_timeout_unlink(&r->deadline);
    db_call_cancel(&r->call);
}

static void send_not_ready(h2o_req_t *req, const char *status, const char *why)
{
    ji_text_t t = {0};

    APPEND_LIT(&t, "{\"status\":");
    ji_text_json_string(&t, status, strlen(status));
    APPEND_LIT(&t, ",\"error\":");
    ji_text_json_string(&t, why, strlen(why));
    APPEND_LIT(&t, "}\n");
    ji_reply_add_retry_after(req, JI_RETRY_AFTER_BUSY_S);
    send_text(req, 503, "Service Unavailable", "application/json", &t);
}

static void readyz_on_result(db_call_t *call, PGresult *res, const char *err)
{
    readyz_t *r = JI_CONTAINER_OF(call, readyz_t, call);
    ji_worker_t *w = ji_worker_of(r->req->conn->ctx);

    h2o_timeout_unlink(&r->deadline);
    if (err == NULL && (res == NULL || PQresultStatus(res) != PGRES_TUPLES_OK))
        err = "unexpected answer from the database";
    if (err != NULL) {
        char why[320];
        snprintf(why, sizeof(why), "database unavailable: %s", err);
        send_not_ready(r->req, "not ready", why);
        return;
    }
    if (atomic_load_explicit(&w->server->stopping, memory_order_relaxed)) {
        send_not_ready(r->req, "stopping", "the server is shutting down");
        return;
    }
    send_body(r->req, 200, "OK", "application/json", H2O_STRLIT("{\"status\":\"ready\"}\n"));
}

static void readyz_on_tick(h2o_timeout_entry_t *entry)
{
    readyz_t *r = JI_CONTAINER_OF(entry, readyz_t, deadline);
    char why[128];

    if (--r->ticks_left > 0) {
        h2o_timeout_link(r->req->conn->ctx->loop, &r->req->conn->ctx->one_sec_timeout, &r->deadline);
        return;
    }
    db_call_cancel(&r->call);
    snprintf(why, sizeof(why), "the database did not answer within %d s (JI_READYZ_TIMEOUT_S)",
             JI_READYZ_TIMEOUT_S);
    send_not_ready(r->req, "not ready", why);
}

static int on_readyz(h2o_handler_t *self, h2o_req_t *req)
{
    ji_worker_t *w = ji_worker_of(req->conn->ctx);
    const char *why;
    readyz_t *r;
    bool head;

    (void)self;
    if (!accept_method(req, "GET, HEAD", &head))
        return 0;
    if (atomic_load_explicit(&w->server->stopping, memory_order_relaxed)) {
        send_not_ready(req, "stopping", "the server is shutting down");
        return 0;
    }
    if (!atomic_load_explicit(&w->server->db_ready, memory_order_acquire)) {
        send_not_ready(req, "not ready",
                       "the schema is not ready yet (the database was unreachable at start; retrying)");
        return 0;
    }
    r = h2o_mem_alloc_shared(&req->pool, sizeof(*r), readyz_dispose);
    memset(r, 0, sizeof(*r));
    r->req = req;
    r->deadline.cb = readyz_on_tick;
    r->ticks_left = JI_READYZ_TIMEOUT_S;
    if ((why = db_call_start(&r->call, w, SQL_PING, 0, readyz_on_result)) != NULL) {
        send_not_ready(req, why == START_STOPPING ? "stopping" : "not ready", why);
        return 0;
    }
    h2o_timeout_link(req->conn->ctx->loop, &req->conn->ctx->one_sec_timeout, &r->deadline);
    return 0;
}

/* ------------------------------------------------------------------ GET /metrics */

/** VmRSS and VmHWM of this process, in bytes (0 when /proc cannot tell). */
static void read_memory(uint64_t *rss, uint64_t *hwm)
{
    char buf[8192];
    size_t len = 0;
    ssize_t n;
    int fd;

    *rss = *hwm = 0;
    if ((fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC)) == -1)
        return;
    while (len < sizeof(buf) - 1 && ((n = read(fd, buf + len, sizeof(buf) - 1 - len)) > 0 || (n == -1 && errno == EINTR)))
        if (n > 0)
            len += (size_t)n;
    close(fd);
    buf[len] = '\0';
    for (char *line = buf; line != NULL && *line != '\0'; line = strchr(line, '\n') != NULL ? strchr(line, '\n') + 1 : NULL) {
        if (strncmp(line, "VmRSS:", 6) == 0)
            *rss = strtoull(line + 6, NULL, 10) * 1024;
        else if (strncmp(line, "VmHWM:", 6) == 0)
            *hwm = strtoull(line + 6, NULL, 10) * 1024;
    }
}

static void metric_head(ji_text_t *t, const char *name, const char *type, const char *help)
{
    ji_text_printf(t, "# HELP jsonl_ingest_%s %s\n# TYPE jsonl_ingest_%s %s\n", name, help, name, type);
}

static void metric(ji_text_t *t, const char *name, const char *type, const char *help, uint64_t value)
{
    metric_head(t, name, type, help);
    ji_text_printf(t, "jsonl_ingest_%s %" PRIu64 "\n", name, value);
}

#define LOAD(field) atomic_load_explicit(&(field), memory_order_relaxed)

static int on_metrics(h2o_handler_t *self, h2o_req_t *req)
{
    ji_server_t *server = ji_worker_of(req->conn->ctx)->server;
    uint64_t requests = 0, ok = 0, failed = 0, in_flight = 0, records = 0, images = 0, bytes = 0, errors[JI_ERR_KIND_COUNT] = {0},
             lim_record = 0, lim_ingests = 0, pg_idle = 0, pg_busy = 0, rss, hwm;
    ji_text_t t = {0};
    bool head;

    (void)self;
    if (!accept_method(req, "GET, HEAD", &head))
        return 0;
    for (unsigned i = 0; i < server->nworkers; i++) {
        ji_worker_t *w = &server->workers[i];
        ji_ingest_stats_t *s = &w->ingest_stats;
        requests += LOAD(s->requests);
        ok += LOAD(s->ingests_ok);
        failed += LOAD(s->ingests_failed);
        in_flight += LOAD(s->ingests_in_flight);
        records += LOAD(s->records);
        images += LOAD(s->images);
        bytes += LOAD(s->body_bytes);
        for (unsigned k = 0; k < JI_ERR_KIND_COUNT; k++)
            errors[k] += LOAD(s->errors[k]);
        lim_record += LOAD(s->limit_record_bytes);
        lim_ingests += LOAD(w->stats.limit_ingests);
        /* the pool's counters are relaxed atomics: readable from this thread (pg.c) */
        if (w->pg_pool != NULL) {
            pg_idle += ji_pg_pool_idle(w->pg_pool);
            pg_busy += ji_pg_pool_busy(w->pg_pool);
        }
    }
    read_memory(&rss, &hwm);

    metric(&t, "requests_total", "counter", "POST /users requests that reached an ingest.", requests);
    metric_head(&t, "ingests_total", "counter", "Finished ingests by result.");
    ji_text_printf(&t, "jsonl_ingest_ingests_total{result=\"ok\"} %" PRIu64 "\n", ok);
    ji_text_printf(&t, "jsonl_ingest_ingests_total{result=\"failed\"} %" PRIu64 "\n", failed);
    metric(&t, "ingests_in_flight", "gauge", "Ingests running now.", in_flight);
    metric(&t, "records_total", "counter", "User records committed.", records);
    metric(&t, "images_total", "counter", "Image files committed.", images);
    metric(&t, "body_bytes_total", "counter", "Request body bytes read by ingests (after chunked framing).", bytes);
    metric_head(&t, "errors_total", "counter", "Failed ingests by kind of error.");
    for (unsigned k = JI_ERR_NONE + 1; k < JI_ERR_KIND_COUNT; k++)
        ji_text_printf(&t, "jsonl_ingest_errors_total{kind=\"%s\"} %" PRIu64 "\n", ji_error_kind_name(k), errors[k]);
    metric_head(&t, "limits_total", "counter", "Requests refused by a limit, by limit.");
    ji_text_printf(&t, "jsonl_ingest_limits_total{limit=\"max_record_bytes\"} %" PRIu64 "\n", lim_record);
    ji_text_printf(&t, "jsonl_ingest_limits_total{limit=\"max_ingests\"} %" PRIu64 "\n", lim_ingests);
    ji_text_printf(&t, "jsonl_ingest_limits_total{limit=\"max_array_memory\"} %" PRIu64 "\n",
                   LOAD(server->array_budget.over_request_cap));
    ji_text_printf(&t, "jsonl_ingest_limits_total{limit=\"array_memory_budget\"} %" PRIu64 "\n",
                   LOAD(server->array_budget.refused));
    metric_head(&t, "db_pool_connections", "gauge", "Database connections of the per-thread pools, by state.");
    ji_text_printf(&t, "jsonl_ingest_db_pool_connections{state=\"idle\"} %" PRIu64 "\n", pg_idle);
    ji_text_printf(&t, "jsonl_ingest_db_pool_connections{state=\"busy\"} %" PRIu64 "\n", pg_busy);
    metric(&t, "db_ready", "gauge", "1 once the schema is ready and uploads are accepted.",
           atomic_load_explicit(&server->db_ready, memory_order_relaxed) ? 1 : 0);
    metric(&t, "workers", "gauge", "Worker threads (--threads).", server->nworkers);
    metric(&t, "resident_memory_bytes", "gauge", "Resident set size (VmRSS).", rss);
    metric(&t, "resident_memory_peak_bytes", "gauge", "Peak resident set size (VmHWM).", hwm);
    send_text(req, 200, "OK", "text/plain; version=0.0.4; charset=utf-8", &t);
    return 0;
}

/* ------------------------------------------------------------------ registration */

static void register_handler(h2o_hostconf_t *host, const char *path, int (*on_req)(h2o_handler_t *, h2o_req_t *))
{
    h2o_pathconf_t *pathconf = h2o_config_register_path(host, path, 0);
    h2o_handler_t *handler = h2o_create_handler(pathconf, sizeof(*handler));
    handler->on_req = on_req;
}

void ji_reads_register(h2o_hostconf_t *host)
{
    register_handler(host, "/readyz", on_readyz);
    register_handler(host, "/metrics", on_metrics);
    register_handler(host, "/users.csv", on_users_csv);
}
