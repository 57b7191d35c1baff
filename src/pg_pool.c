/*
 * pg_pool.c — owns the per-loop pool of PostgreSQL connections: handing out an
 * idle connection or a new one, taking connections back (kept idle when
 * healthy and there is room), and giving back connections of failed requests:
 * their COPY is ended with an error and their transaction rolled back in the
 * background, so that a bad request does not cost a new server process. One
 * connection itself (connecting, statements, COPY, failure) is pg.c's; what the
 * two share is in pg_internal.h.
 *
 * Idle connections are used most recently used first, so under a steady load the same ones serve every request;
 * after a burst, those beyond JI_PG_KEEP_IDLE that nobody took for JI_PG_IDLE_CLOSE_MS are closed.
 *
 * The pool's timeouts live in the loop's timeout list: ji_pg_pool_free must run
 * outside h2o_evloop_run (h2o walks that list while running timeouts).
 */
#include "pg_internal.h"

#include <assert.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void on_recycle_timeout(h2o_timeout_entry_t *entry);
static void on_idle_timeout(h2o_timeout_entry_t *entry);

/* ---- pool ---- */

/** The connect timeout in ms: the conninfo's connect_timeout, else PGCONNECT_TIMEOUT, else the default. */
static uint64_t connect_timeout_ms(const char *conninfo)
{
    PQconninfoOption *opts = PQconninfoParse(conninfo, NULL), *o;
    const char *value = getenv("PGCONNECT_TIMEOUT");
    uint64_t ms = JI_PG_CONNECT_TIMEOUT_MS;
    long secs;

    for (o = opts; o != NULL && o->keyword != NULL; o++) {
        if (strcmp(o->keyword, "connect_timeout") == 0 && o->val != NULL && o->val[0] != '\0')
            value = o->val;
    }
    if (value != NULL && (secs = strtol(value, NULL, 10)) > 0)
        ms =
            (uint64_t)secs * 1000 < JI_PG_CONNECT_TIMEOUT_MIN_MS ? JI_PG_CONNECT_TIMEOUT_MIN_MS : (uint64_t)secs * 1000;
    PQconninfoFree(opts);
    return ms;
}

ji_pg_pool_t *ji_pg_pool_new(h2o_loop_t *loop, const char *conninfo, size_t max_idle)
{
    ji_pg_pool_t *pool = calloc(1, sizeof(*pool));

    if (pool == NULL)
        goto error;
    if ((pool->conninfo = strdup(conninfo != NULL ? conninfo : "")) == NULL)
        goto error;
    pool->loop = loop;
    pool->max_idle = max_idle;
    h2o_linklist_init_anchor(&pool->idle);
    h2o_linklist_init_anchor(&pool->recycling);
    h2o_timeout_init(loop, &pool->zero_timeout, 0);
    h2o_timeout_init(loop, &pool->recycle_timeout, JI_PG_ROLLBACK_TIMEOUT_MS);
    h2o_timeout_init(loop, &pool->idle_timeout, JI_PG_IDLE_CLOSE_MS);
    pool->connect_timeout_ms = connect_timeout_ms(pool->conninfo);
    h2o_timeout_init(loop, &pool->connect_timeout, pool->connect_timeout_ms);
    return pool;

error:
    if (pool != NULL)
        free(pool->conninfo);
    free(pool);
    return NULL;
}

void ji_pg_pool_free(ji_pg_pool_t *pool)
{
    if (pool == NULL)
        return;
    while (!h2o_linklist_is_empty(&pool->idle))
        ji_pg_free(JI_CONTAINER_OF(pool->idle.next, ji_pg_t, idle_link));
    while (!h2o_linklist_is_empty(&pool->recycling))
        ji_pg_free(JI_CONTAINER_OF(pool->recycling.next, ji_pg_t, idle_link));
    assert(pool->busy_count == 0);
    h2o_timeout_dispose(pool->loop, &pool->zero_timeout);
    h2o_timeout_dispose(pool->loop, &pool->recycle_timeout);
    h2o_timeout_dispose(pool->loop, &pool->idle_timeout);
    h2o_timeout_dispose(pool->loop, &pool->connect_timeout);
    free(pool->conninfo);
    free(pool);
}

void ji_pg__unlink_idle(ji_pg_t *pg)
{
    h2o_linklist_unlink(&pg->idle_link);
    h2o_timeout_unlink(&pg->idle_entry);
    pg->idle = false;
    pg->pool->idle_count--;
}

/** An idle connection unused for JI_PG_IDLE_CLOSE_MS: closed while the worker keeps more than JI_PG_KEEP_IDLE. */
static void on_idle_timeout(h2o_timeout_entry_t *entry)
{
    ji_pg_t *pg = JI_CONTAINER_OF(entry, ji_pg_t, idle_entry);

    if (pg->idle && pg->pool->idle_count > JI_PG_KEEP_IDLE)
        ji_pg_free(pg);
}

ji_pg_t *ji_pg_pool_get(ji_pg_pool_t *pool, ji_pg_ready_cb cb, void *ctx)
{
    ji_pg_t *pg;

    while (!h2o_linklist_is_empty(&pool->idle)) {
        pg = JI_CONTAINER_OF(pool->idle.next, ji_pg_t, idle_link);
        ji_pg__unlink_idle(pg);
        if (pg->state != JI_PG_READY || PQstatus(pg->conn) != CONNECTION_OK) {
            ji_pg_free(pg);
            continue;
        }
        pg->handed_out = true;
        pool->busy_count++;
        pg->ready_cb = cb;
        pg->op_ctx = ctx;
        pg->ready_pending = true;
        pg->retry_on_defer = true;
        h2o_timeout_link(pool->loop, &pool->zero_timeout, &pg->defer_entry);
        return pg;
    }

    if ((pg = ji_pg__new(pool)) == NULL)
        return NULL;
    pg->recycle_entry.cb = on_recycle_timeout;
    pg->idle_entry.cb = on_idle_timeout;
    pg->handed_out = true;
    pool->busy_count++;
    pg->ready_cb = cb;
    pg->op_ctx = ctx;
    ji_pg__start_connect(pg);
    return pg;
}

/** Drops every callback and context of the connection's last owner: nothing of it is called any more. */
static void forget_owner(ji_pg_t *pg)
{
    pg->ready_cb = NULL;
    pg->result_cb = NULL;
    pg->script_cb = NULL;
    pg->op_ctx = NULL;
    pg->event_cb = NULL;
    pg->event_ctx = NULL;
    pg->drain_pending = false;
}

void ji_pg_pool_put(ji_pg_pool_t *pool, ji_pg_t *pg)
{
    if (pg == NULL || pg->freed)
        return;
    assert(pg->pool == pool && pg->handed_out && !pg->recycling);
    pg->handed_out = false;
    pool->busy_count--;

    if (pg->state == JI_PG_READY && !pg->ready_pending && pg->sock != NULL && PQstatus(pg->conn) == CONNECTION_OK &&
        PQtransactionStatus(pg->conn) == PQTRANS_IDLE && pool->idle_count < pool->max_idle) {
        forget_owner(pg);
        pg->errbuf[0] = '\0';
        h2o_linklist_insert(pool->idle.next, &pg->idle_link);
        pg->idle = true;
        pool->idle_count++;
        if (pool->idle_count > JI_PG_KEEP_IDLE)
            h2o_timeout_link(pool->loop, &pool->idle_timeout, &pg->idle_entry);
        return;
    }
    ji_pg_free(pg);
}

size_t ji_pg_pool_idle(const ji_pg_pool_t *pool)
{
    return atomic_load_explicit(&pool->idle_count, memory_order_relaxed);
}

size_t ji_pg_pool_busy(const ji_pg_pool_t *pool)
{
    return atomic_load_explicit(&pool->busy_count, memory_order_relaxed);
}

/* ---- giving back a connection that must roll back first ---- */

static void recycle_step(ji_pg_t *pg);

static void on_recycle_result(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    (void)ctx;
    (void)res;
    if (err != NULL && pg->then_sent && pg->state != JI_PG_FAILED)
        fprintf(stderr, "database: background statement failed: %s\n", err);
    pg->then_sent = false;
    recycle_step(pg);
}

static void on_recycle_timeout(h2o_timeout_entry_t *entry)
{
    ji_pg_t *pg = JI_CONTAINER_OF(entry, ji_pg_t, recycle_entry);

    ji_pg_free(pg); /* closing it rolls back on the server */
}

/**
 * One step towards idle: end a COPY, wait for the statement in flight, ROLLBACK, run then_sql, give back.
 * Called again with each result; frees the connection whenever it turns out broken.
 */
static void recycle_step(ji_pg_t *pg)
{
    ji_pg_pool_t *pool = pg->pool;
    char *sql;
    int r;

    switch (pg->state) {
    case JI_PG_QUERY:
    case JI_PG_COPY_END:
        /* its result comes first (and may be COPY IN, which the next step ends) */
        pg->result_cb = on_recycle_result;
        pg->op_ctx = NULL;
        return;
    case JI_PG_COPY_IN:
        if ((r = PQputCopyEnd(pg->conn, pg->copy_abort)) != 1 ||
            ji_pg__await_result(pg, JI_PG_COPY_END, on_recycle_result, NULL) != 0) {
            ji_pg_free(pg);
        }
        return;
    case JI_PG_READY:
        break;
    case JI_PG_CONNECTING:
    case JI_PG_FAILED:
        ji_pg_free(pg);
        return;
    }
    if (pg->sock == NULL || PQstatus(pg->conn) != CONNECTION_OK) {
        ji_pg_free(pg);
        return;
    }
    if (PQtransactionStatus(pg->conn) != PQTRANS_IDLE) {
        if (pg->rolled_back || ji_pg_query(pg, "ROLLBACK", 0, NULL, on_recycle_result, NULL) != 0)
            ji_pg_free(pg); /* a ROLLBACK that did not end the transaction: give up on the connection */
        else
            pg->rolled_back = true;
        return;
    }
    if (pg->then_sql != NULL) {
        sql = pg->then_sql; /* libpq copies the text into its output buffer */
        pg->then_sql = NULL;
        r = ji_pg_query(pg, sql, 0, NULL, on_recycle_result, NULL);
        free(sql);
        if (r != 0)
            ji_pg_free(pg);
        else
            pg->then_sent = true;
        return;
    }
    h2o_linklist_unlink(&pg->idle_link);
    h2o_timeout_unlink(&pg->recycle_entry);
    pg->recycling = false;
    pg->rolled_back = false;
    ji_pg_pool_put(pool, pg);
}

/** Takes `pg` from its user: no callback of the user fires again; the pool finishes it in the background. */
static void recycle(ji_pg_pool_t *pool, ji_pg_t *pg, const char *copy_abort_msg, const char *then_sql)
{
    if (pg == NULL || pg->freed)
        return;
    assert(pg->pool == pool && pg->handed_out && !pg->recycling);
    forget_owner(pg);
    if (pg->ready_pending) {
        /* handed out from the idle list, its ready callback not delivered yet */
        h2o_timeout_unlink(&pg->defer_entry);
        pg->ready_pending = false;
        pg->retry_on_defer = false;
    }
    if (pg->state == JI_PG_CONNECTING || pg->state == JI_PG_FAILED || pg->conn == NULL ||
        PQstatus(pg->conn) != CONNECTION_OK || (then_sql != NULL && (pg->then_sql = strdup(then_sql)) == NULL)) {
        ji_pg_free(pg);
        return;
    }
    ji_pg__copy_message(pg->copy_abort, sizeof(pg->copy_abort),
                        copy_abort_msg != NULL ? copy_abort_msg : "request aborted");
    pg->recycling = true;
    pg->rolled_back = false;
    pg->then_sent = false;
    h2o_linklist_insert(&pool->recycling, &pg->idle_link);
    h2o_timeout_link(pool->loop, &pool->recycle_timeout, &pg->recycle_entry);
    recycle_step(pg);
}

void ji_pg_pool_put_rollback(ji_pg_pool_t *pool, ji_pg_t *pg, const char *copy_abort_msg)
{
    recycle(pool, pg, copy_abort_msg, NULL);
}

void ji_pg_pool_put_after(ji_pg_pool_t *pool, ji_pg_t *pg, const char *sql)
{
    recycle(pool, pg, NULL, sql);
}
