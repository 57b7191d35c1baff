/*
 * export.c — owns the streamed export of the users (GET /users as JSON Lines,
 * GET /users.csv): one request, one pooled connection held from its first
 * statement to its last, one snapshot, rows below the export horizon only.
 *
 *   CONNECTING -> HORIZON -> BEGIN -> PAGE -> PAGE ... -> (connection back)
 *
 * HORIZON (autocommit, before the snapshot exists) reads the sequence, then
 * the ingests' horizon locks (export.h). BEGIN opens a REPEATABLE READ READ
 * ONLY transaction; its first page takes the snapshot, so every batch whose
 * lock was gone when HORIZON read pg_locks is in it (a lock goes only after
 * its transaction is visible to new snapshots). Each page is a keyset
 * statement (user_id > $last AND user_id < $horizon ORDER BY user_id LIMIT
 * page) in that transaction. The next page is fetched while the current one
 * is being sent (two page buffers): memory is two pages, whatever the table.
 *
 * The connection goes back to the pool, its transaction rolled back in the
 * background, after the last page, on a failure, and from the request pool's
 * dispose callback when the client goes away. Any h2o_send or ji_reply_* may
 * dispose the request at once: it is the last thing a function does.
 */
#include "export.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "handler_reply.h"
#include "pg.h"
#include "server.h"

static const char SQL_BEGIN[] = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
/*
 * The first statement of the snapshot: a committed batch with rows at or above the horizon (its ids interleave
 * with a batch still in flight) would be cut; the horizon comes down to its first row, so it is whole or absent.
 * The batches above the horizon are found once (a materialized CTE: usually none, or a few): written as an IN
 * subquery over users, a planner without statistics (a table just filled) may run that subquery again for every
 * row of users, and an export of 200,000 rows then waits minutes for its first page. "OFFSET 0" keeps the planner
 * from reading min() by walking the primary key from the first user_id (every older row, for a recent batch).
 */
static const char SQL_WHOLE_BATCHES[] =
    "WITH above AS MATERIALIZED (SELECT DISTINCT batch_id FROM users WHERE user_id >= $1::bigint) "
    "SELECT least($1::bigint, (SELECT min(u.user_id) FROM (SELECT user_id FROM users WHERE batch_id IN "
    "(SELECT batch_id FROM above) OFFSET 0) u))";
static const char SQL_PAGE[] =
    "SELECT " JI_USER_COLUMNS " FROM users WHERE user_id > $1 AND user_id < $3 ORDER BY user_id LIMIT $2";

/** Room for an int64 in decimal, sign and NUL included: the text of a statement parameter. */
#define INT64_TEXT 24

typedef struct st_export_t {
    h2o_generator_t super;
    h2o_req_t *req;
    ji_worker_t *w;
    ji_pg_t *pg; /**< the request's connection, from the start to the last page (NULL before and after) */
    bool csv, head;
    ji_export_query_t q;        /**< after_id: then the last user_id fetched; limit: then the rows still wanted */
    uint64_t sent_rows;         /**< rows fetched so far (for messages) */
    unsigned asked;             /**< LIMIT of the running fetch */
    char params[3][INT64_TEXT]; /**< after_id, LIMIT and the horizon, as text */
    const char *values[3];
    ji_text_t page[2]; /**< one being sent, one being filled */
    unsigned filling;  /**< index of the page the running fetch fills (or that is ready) */
    bool started;      /**< the response headers went out */
    bool sending;      /**< an h2o_send is in flight (its page must stay untouched) */
    bool ready;        /**< page[filling] is complete and waits for the previous send */
    bool last;         /**< ... and it is the final one */
    bool failed;       /**< a fetch failed after the headers: end the response with an error */
} export_t;

static void export_on_page(ji_pg_t *pg, void *ctx, PGresult *res, const char *err);

/** Gives the connection back: its read-only transaction rolls back in the background (a broken one is closed). */
static void export_release(export_t *e)
{
    if (e->pg != NULL) {
        ji_pg_pool_put_rollback(e->w->pg_pool, e->pg, NULL);
        e->pg = NULL;
    }
}

static void export_dispose(void *p)
{
    export_t *e = p;

    export_release(e); /* a statement in flight is waited for (bounded), then ROLLBACK */
    ji_text_free(&e->page[0]);
    ji_text_free(&e->page[1]);
}

/** Logs why an export whose 200 is out ends early (the client sees a cut response, no final chunk). */
static void export_log_cut(export_t *e, const char *why)
{
    fprintf(stderr, "GET %.*s: export cut after %" PRIu64 " rows: %s\n", (int)e->req->path.len, e->req->path.base,
            e->sent_rows, why);
}

/**
 * A step failed before the status line went out: the database's words (`err`) go to the log, the client gets a
 * stable 503 (JI_ERR_DB) or, for `kind` JI_ERR_INTERNAL, the fixed `err`.
 */
static void export_refuse(export_t *e, ji_error_kind_t kind, const char *err)
{
    h2o_req_t *req = e->req;

    export_release(e);
    if (kind == JI_ERR_DB) {
        fprintf(stderr, "GET %.*s: database: %s\n", (int)req->path.len, req->path.base, err);
        ji_reply_errorf(req, JI_ERR_DB, "database error");
        return;
    }
    ji_reply_errorf(req, kind, "%s", err);
}

/** Starts fetching the next page into page[filling]. NULL, or why not (the caller answers). */
static const char *export_fetch(export_t *e)
{
    if (atomic_load_explicit(&e->w->server->stopping, memory_order_relaxed))
        return "the server is shutting down"; /* no new database work: the pool drains */
    e->asked = e->q.limit < JI_EXPORT_PAGE_ROWS ? (unsigned)e->q.limit : JI_EXPORT_PAGE_ROWS;
    snprintf(e->params[0], sizeof(e->params[0]), "%" PRId64, e->q.after_id);
    snprintf(e->params[1], sizeof(e->params[1]), "%u", e->asked);
    if (ji_pg_query(e->pg, SQL_PAGE, 3, e->values, export_on_page, e) != 0)
        return ji_pg_error(e->pg);
    return NULL;
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
            export_release(e);
            h2o_send(req, NULL, 0, H2O_SEND_STATE_FINAL);
            return;
        }
    }
    if (!last && (why = export_fetch(e)) != NULL) {
        export_log_cut(e, why);
        export_release(e);
        e->failed = true; /* this page still goes out; the response then ends with an error */
    }
    e->sending = true;
    h2o_send(req, &vec, vec.len != 0 ? 1 : 0, last ? H2O_SEND_STATE_FINAL : H2O_SEND_STATE_IN_PROGRESS);
}

/** Fills page[filling] with the rows of `res` (the CSV header first, before the first row). 0, or -1. */
static int export_fill(export_t *e, const PGresult *res)
{
    ji_text_t *p = &e->page[e->filling];
    int n = PQntuples(res);

    p->len = 0;
    if (!e->started && e->csv)
        ji_text_append(p, H2O_STRLIT(JI_USER_CSV_HEADER));
    for (int i = 0; i < n; i++) {
        if (e->csv)
            ji_user_csv(p, res, i, e->q.formulas);
        else
            ji_user_json(p, res, i);
    }
    return p->failed ? -1 : 0;
}

static void export_on_page(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    export_t *e = ctx;
    const char *why = err;
    int n;

    (void)pg;
    if (why == NULL && (PQresultStatus(res) != PGRES_TUPLES_OK || PQnfields(res) != JI_USER_NCOLS))
        why = "unexpected answer from the database";
    if (why == NULL && export_fill(e, res) != 0)
        why = "out of memory";
    if (why != NULL && !e->started) { /* nothing sent yet: an error answer */
        export_refuse(e, err != NULL ? JI_ERR_DB : JI_ERR_INTERNAL, why);
        return;
    }
    if (why != NULL) { /* the status line is gone: the client sees a cut response (no final chunk) */
        export_log_cut(e, why);
        export_release(e);
        if (e->sending) {
            e->failed = true; /* ended when h2o asks for more */
            return;
        }
        h2o_send(e->req, NULL, 0, H2O_SEND_STATE_ERROR);
        return;
    }
    n = PQntuples(res);
    if (n > 0)
        e->q.after_id = strtoll(PQgetvalue(res, n - 1, JI_USER_COL_ID), NULL, 10);
    e->sent_rows += (uint64_t)n;
    if (e->q.limit != UINT64_MAX)
        e->q.limit -= (uint64_t)n;
    e->last = (unsigned)n < e->asked || e->q.limit == 0;
    if (e->last)
        export_release(e); /* every row is in memory: the snapshot is no longer needed */
    e->ready = true;
    if (!e->sending)
        export_flush(e);
}

/** Keeps the horizon a statement answered (one bigint) in the page query's parameters; false after refusing. */
static bool take_horizon(export_t *e, PGresult *res, const char *err)
{
    if (err != NULL) {
        export_refuse(e, JI_ERR_DB, err);
        return false;
    }
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1 || PQgetisnull(res, 0, 0)) {
        export_refuse(e, JI_ERR_INTERNAL, "unexpected answer from the database");
        return false;
    }
    snprintf(e->params[2], sizeof(e->params[2]), "%s", PQgetvalue(res, 0, 0));
    return true;
}

static void export_on_whole_batches(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    export_t *e = ctx;
    const char *why;

    (void)pg;
    if (!take_horizon(e, res, err))
        return;
    if ((why = export_fetch(e)) != NULL)
        export_refuse(e,
                      atomic_load_explicit(&e->w->server->stopping, memory_order_relaxed) ? JI_ERR_STOPPING : JI_ERR_DB,
                      why);
}

static void export_on_begin(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    export_t *e = ctx;
    const char *params[1] = {e->params[2]};

    (void)res;
    if (err != NULL) {
        export_refuse(e, JI_ERR_DB, err);
        return;
    }
    if (ji_pg_query(pg, SQL_WHOLE_BATCHES, 1, params, export_on_whole_batches, e) != 0)
        export_refuse(e, JI_ERR_DB, ji_pg_error(pg));
}

static void export_on_horizon(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    export_t *e = ctx;

    if (!take_horizon(e, res, err))
        return;
    if (ji_pg_query(pg, SQL_BEGIN, 0, NULL, export_on_begin, e) != 0)
        export_refuse(e, JI_ERR_DB, ji_pg_error(pg));
}

static void export_on_connected(ji_pg_t *pg, void *ctx, const char *err)
{
    export_t *e = ctx;

    if (err == NULL && ji_pg_query(pg, JI_EXPORT_HORIZON_SQL, 0, NULL, export_on_horizon, e) == 0)
        return;
    export_refuse(e, JI_ERR_DB, err != NULL ? err : ji_pg_error(pg));
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
    (void)req; /* the request pool's dispose callback gives the connection back and frees the pages */
}

void ji_export_start(ji_worker_t *w, h2o_req_t *req, bool csv, bool head, const ji_export_query_t *q)
{
    export_t *e = h2o_mem_alloc_shared(&req->pool, sizeof(*e), export_dispose);

    memset(e, 0, sizeof(*e));
    e->super.proceed = export_proceed;
    e->super.stop = export_stop;
    e->req = req;
    e->w = w;
    e->csv = csv;
    e->head = head;
    e->q = *q;
    for (int i = 0; i < 3; i++)
        e->values[i] = e->params[i];
    if (atomic_load_explicit(&w->server->stopping, memory_order_relaxed)) {
        ji_reply_errorf(req, JI_ERR_STOPPING, "the server is shutting down");
        return;
    }
    if ((e->pg = ji_pg_pool_get(w->pg_pool, export_on_connected, e)) == NULL)
        ji_reply_errorf(req, JI_ERR_INTERNAL, "out of memory");
}
