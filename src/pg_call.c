/*
 * pg_call.c — owns ji_pg_call_t (declared in pg.h): one statement on a pooled
 * connection, from getting the connection to delivering the result, for
 * callers that want a result and not a connection. Built only on pg.h's
 * public API: pool get/put, query, free.
 */
#include "pg.h"

#include <assert.h>
#include <stdio.h>

static void call_on_result(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_pg_call_t *c = ctx;

    /* back to the pool first (kept when healthy); `res` and `err` stay valid until this callback returns */
    c->pg = NULL;
    ji_pg_pool_put(c->pool, pg);
    c->cb(c, res, err);
}

static void call_on_ready(ji_pg_t *pg, void *ctx, const char *err)
{
    ji_pg_call_t *c = ctx;
    char msg[512]; /* as long as the connection's own error buffer */

    if (err == NULL) {
        if (ji_pg_query(pg, c->sql, c->nparams, c->values, call_on_result, c) == 0)
            return;
        err = ji_pg_error(pg);
    }
    snprintf(msg, sizeof(msg), "%s", err); /* `err` lives in `pg`, freed next */
    c->pg = NULL;
    ji_pg_free(pg);
    c->cb(c, NULL, msg);
}

int ji_pg_call_start(ji_pg_call_t *call, ji_pg_pool_t *pool, const char *sql, int nparams, const char *const *values,
                     ji_pg_call_cb cb)
{
    assert(call->pg == NULL); /* not running already */
    call->pool = pool;
    call->sql = sql;
    call->nparams = nparams;
    call->values = values;
    call->cb = cb;
    if ((call->pg = ji_pg_pool_get(pool, call_on_ready, call)) == NULL)
        return -1;
    return 0;
}

void ji_pg_call_cancel(ji_pg_call_t *call)
{
    if (call->pg != NULL) {
        ji_pg_free(call->pg);
        call->pg = NULL;
    }
}
