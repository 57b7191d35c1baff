/*
 * reads.c — owns the read side of the users: one user as JSON
 * (GET /users/{id}), a user's image streamed from its file
 * (GET /users/{id}/image), and the export as JSON Lines (GET /users) or CSV
 * (GET /users.csv), streamed page by page. All are ordinary h2o handlers on
 * the worker's event loop; each statement runs on a pooled connection through
 * ji_pg_call_t (pg.h), never blocking. Errors are answered through
 * handler_reply.h; a database's own message is logged, never sent.
 *
 * Lifetime: a request's state lives in the request's pool
 * (h2o_mem_alloc_shared) with a dispose callback that cancels what still runs
 * (the statement, an open image file): a client that goes away leaks nothing.
 * Any h2o_send or ji_reply_* may dispose the request at once (a HEAD, an
 * error, a pipelined next request): it is the last thing a function does.
 *
 * Export: the query parameters are read here; the export itself (one
 * snapshot, pages, the horizon) is export.c's.
 */
#include "reads.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "export.h"
#include "handler_reply.h"
#include "json_text.h"
#include "read_params.h"
#include "server.h"
#include "user_format.h"

static const char SQL_USER[] = "SELECT " JI_USER_COLUMNS " FROM users WHERE user_id = $1";
static const char SQL_IMAGE[] = "SELECT image_path, image_type FROM users WHERE user_id = $1";

/** Room for an int64 in decimal, sign and NUL included: the text of a statement parameter. */
#define INT64_TEXT 24

/* ------------------------------------------------------------------ common steps */

/** GET or HEAD (`*head` says which); anything else is answered 405 with `Allow: <allow>` (and false). */
static bool accept_method(h2o_req_t *req, const char *allow, bool *head)
{
    *head = h2o_memis(req->method.base, req->method.len, H2O_STRLIT("HEAD"));
    if (*head || h2o_memis(req->method.base, req->method.len, H2O_STRLIT("GET")))
        return true;
    ji_reply_method_not_allowed(req, allow);
    return false;
}

/** The database is usable for reads: the schema exists (start-up finished). Else answers 503. */
static bool db_usable(ji_worker_t *w, h2o_req_t *req)
{
    if (atomic_load_explicit(&w->server->db_ready, memory_order_acquire))
        return true;
    ji_reply_errorf(req, JI_ERR_DB,
                    "database unavailable: the schema is not ready yet "
                    "(the database was unreachable at start; retrying)");
    return false;
}

/**
 * Starts a read's statement. Once the server is stopping no new database work starts, so the pool drains and can
 * be freed. NULL, or why not, answered to `req` unless it is NULL (JI_ERR_STOPPING, or out of memory).
 */
static const char *start_read(ji_pg_call_t *call, ji_worker_t *w, h2o_req_t *req, const char *sql, int nparams,
                              const char *const *values, ji_pg_call_cb cb)
{
    bool stopping = atomic_load_explicit(&w->server->stopping, memory_order_relaxed);
    const char *why = stopping ? "the server is shutting down" : "out of memory";

    if (!stopping && ji_pg_call_start(call, w->pg_pool, sql, nparams, values, cb) == 0)
        return NULL;
    if (req != NULL)
        ji_reply_errorf(req, stopping ? JI_ERR_STOPPING : JI_ERR_INTERNAL, "%s", why);
    return why;
}

/**
 * A statement failed (`err`: the database's or the connection's words). They go to the log; the client gets a
 * stable message, 503 with Retry-After: nothing of the database's text reaches an answer.
 */
static void send_db_error(h2o_req_t *req, const char *err)
{
    fprintf(stderr, "GET %.*s: database: %s\n", (int)req->path.len, req->path.base, err);
    ji_reply_errorf(req, JI_ERR_DB, "database error");
}

/** A result has the expected shape: rows and `ncols` columns. */
static bool result_ok(const PGresult *res, int ncols)
{
    return res != NULL && PQresultStatus(res) == PGRES_TUPLES_OK && PQnfields(res) == ncols;
}

/** The answer to a statement: true when `res` has rows of `ncols` columns, else it is answered here (false). */
static bool result_usable(h2o_req_t *req, const PGresult *res, const char *err, int ncols)
{
    if (err != NULL) {
        send_db_error(req, err);
        return false;
    }
    if (!result_ok(res, ncols)) {
        ji_reply_errorf(req, JI_ERR_INTERNAL, "unexpected answer from the database");
        return false;
    }
    return true;
}

/* ------------------------------------------------------------------ GET /users/{id} */

/** A read of one user by id: its statement, the request, the id and its text (the statement's $1). */
typedef struct st_by_id_t {
    ji_pg_call_t call;
    h2o_req_t *req;
    ji_worker_t *w;
    int64_t id;
    char id_text[INT64_TEXT];
    const char *values[1];
} by_id_t;

/** Fills `r` (zeroed) and starts `sql` with the id; answers when it cannot start. */
static void by_id_start(by_id_t *r, ji_worker_t *w, h2o_req_t *req, int64_t id, const char *sql, ji_pg_call_cb cb)
{
    r->req = req;
    r->w = w;
    r->id = id;
    snprintf(r->id_text, sizeof(r->id_text), "%" PRId64, id);
    r->values[0] = r->id_text;
    start_read(&r->call, w, req, sql, 1, r->values, cb);
}

static void user_dispose(void *p)
{
    ji_pg_call_cancel(&((by_id_t *)p)->call);
}

static void user_on_result(ji_pg_call_t *call, PGresult *res, const char *err)
{
    by_id_t *u = JI_CONTAINER_OF(call, by_id_t, call);
    ji_text_t t = {0};

    if (!result_usable(u->req, res, err, JI_USER_NCOLS))
        return;
    if (PQntuples(res) == 0) {
        ji_reply_errorf(u->req, JI_ERR_NOT_FOUND, "no user %" PRId64, u->id);
        return;
    }
    ji_user_json(&t, res, 0);
    ji_reply_ok_text(u->req, "application/json", &t);
}

static void get_user(ji_worker_t *w, h2o_req_t *req, int64_t id)
{
    by_id_t *u = h2o_mem_alloc_shared(&req->pool, sizeof(*u), user_dispose);

    memset(u, 0, sizeof(*u));
    by_id_start(u, w, req, id, SQL_USER, user_on_result);
}

/* ------------------------------------------------------------------ GET /users/{id}/image */

typedef struct st_image_req_t {
    h2o_generator_t super;
    by_id_t read;
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

    ji_pg_call_cancel(&r->read.call);
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
        fprintf(stderr, "GET /users/%" PRId64 "/image: %s\n", r->read.id,
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

/** Opens the image file of the row into r->fd. 0, or -1 after answering (a committed row's file always exists). */
static int image_open(image_req_t *r, const char *path, struct stat *st)
{
    const char *why = NULL;
    ji_error_t open_err;

    if (!safe_relative_path(path))
        why = "its path is not inside the images directory";
    else if ((r->fd = ji_image_store_open_file(&r->read.w->server->images, path, &open_err)) == -1)
        why = open_err.message; /* beneath the images directory, no symlink followed */
    else if (fstat(r->fd, st) != 0)
        why = strerror(errno);
    else if (!S_ISREG(st->st_mode))
        why = "not a regular file";
    if (why == NULL)
        return 0;
    image_close(r); /* the server's fault, not the client's */
    ji_reply_errorf(r->read.req, JI_ERR_INTERNAL, "cannot open the image file of user %" PRId64 ": %s", r->read.id,
                    why);
    return -1;
}

static void image_on_result(ji_pg_call_t *call, PGresult *res, const char *err)
{
    image_req_t *r = JI_CONTAINER_OF(call, image_req_t, read.call);
    h2o_req_t *req = r->read.req;
    const char *type = "application/octet-stream";
    struct stat st;

    if (!result_usable(req, res, err, 2))
        return;
    if (PQntuples(res) == 0) {
        ji_reply_errorf(req, JI_ERR_NOT_FOUND, "no user %" PRId64, r->read.id);
        return;
    }
    if (PQgetisnull(res, 0, 0)) {
        ji_reply_errorf(req, JI_ERR_NOT_FOUND, "user %" PRId64 " has no image", r->read.id);
        return;
    }
    if (!PQgetisnull(res, 0, 1) && safe_media_type(PQgetvalue(res, 0, 1), (size_t)PQgetlength(res, 0, 1)))
        type = h2o_strdup(&req->pool, PQgetvalue(res, 0, 1), (size_t)PQgetlength(res, 0, 1)).base;
    if (image_open(r, PQgetvalue(res, 0, 0), &st) != 0)
        return;
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

    memset(r, 0, sizeof(*r));
    r->head = head;
    r->fd = -1;
    by_id_start(&r->read, w, req, id, SQL_IMAGE, image_on_result);
}

/* ------------------------------------------------------------------ GET /users, GET /users.csv */

/**
 * Parses `after_id=N&limit=M` (read_params.h) and, for CSV, `formulas=raw` (other parameters are ignored). 0, or -1
 * after answering 400.
 */
static int parse_export_query(h2o_req_t *req, bool csv, ji_export_query_t *q)
{
    const char *end = req->path.base + req->path.len;
    const char *s = req->query_at != SIZE_MAX ? req->path.base + req->query_at + 1 : end;
    ji_keyset_t k = {.after_id = 0, .limit = UINT64_MAX};
    ji_csv_formulas_t formulas = JI_CSV_FORMULAS_NEUTRALISE;
    char echo[JI_ECHO_MAX + 1];
    ji_query_param_t p;
    ji_error_t err;
    int r;

    while (ji_query_next(&s, end, &p)) {
        if ((r = ji_keyset_param(&p, &k, &err)) < 0) {
            ji_reply_error(req, &err);
            return -1;
        }
        if (r == 0 && csv && ji_query_param_is(&p, "formulas")) {
            if (!h2o_memis(p.value, p.value_len, H2O_STRLIT("raw"))) {
                ji_reply_errorf(req, JI_ERR_MALFORMED, "formulas must be \"raw\" (or absent), not \"%s\"",
                                ji_echo_value(echo, p.value, p.value_len));
                return -1;
            }
            formulas = JI_CSV_FORMULAS_RAW;
        }
    }
    *q = (ji_export_query_t){.after_id = k.after_id, .limit = k.limit, .formulas = formulas};
    return 0;
}

static void export_users(ji_worker_t *w, h2o_req_t *req, bool csv, bool head)
{
    ji_export_query_t q;

    if (parse_export_query(req, csv, &q) != 0 || !db_usable(w, req))
        return;
    ji_export_start(w, req, csv, head, &q);
}

/* ------------------------------------------------------------------ routes */

int ji_reads_handle_users(ji_worker_t *w, h2o_req_t *req)
{
    h2o_iovec_t path = req->path_normalized;
    const size_t prefix = sizeof("/users/") - 1;
    const char *rest, *slash;
    size_t rest_len, id_len;
    char echo[JI_ECHO_MAX + 1];
    int64_t id;
    bool head;

    if (h2o_memis(path.base, path.len, H2O_STRLIT("/users"))) {
        if (accept_method(req, "GET, HEAD, POST", &head))
            export_users(w, req, false, head);
        return 0;
    }
    rest = path.base + prefix;
    rest_len = path.len > prefix ? path.len - prefix : 0;
    slash = rest_len != 0 ? memchr(rest, '/', rest_len) : NULL;
    id_len = slash != NULL ? (size_t)(slash - rest) : rest_len;
    if (rest_len == 0 || memcmp(path.base, "/users/", prefix) != 0 ||
        (slash != NULL && !h2o_memis(slash, rest_len - id_len, H2O_STRLIT("/image")))) {
        ji_reply_errorf(req, JI_ERR_NOT_FOUND, "no such route");
        return 0;
    }
    if (!accept_method(req, "GET, HEAD", &head))
        return 0;
    if (ji_parse_int64(rest, id_len, &id) != 0) {
        ji_reply_errorf(req, JI_ERR_MALFORMED, "user id must be an integer from 0 to %" PRId64 ", not \"%s\"",
                        INT64_MAX, ji_echo_value(echo, rest, id_len));
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
        ji_reply_errorf(req, JI_ERR_NOT_FOUND, "no such route");
        return 0;
    }
    if (accept_method(req, "GET, HEAD", &head))
        export_users(w, req, true, head);
    return 0;
}

void ji_reads_register(h2o_hostconf_t *host)
{
    h2o_pathconf_t *pathconf = h2o_config_register_path(host, "/users.csv", 0);
    h2o_handler_t *handler = h2o_create_handler(pathconf, sizeof(*handler));

    handler->on_req = on_users_csv;
}
