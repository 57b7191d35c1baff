/*
 * test_pg_call.c — ji_pg_call_t, one statement through the pool, against a
 * real server (JI_TEST_DB; skipped with 77 when empty) on a real
 * h2o evloop: the result comes later from the loop with the connection
 * already back in the pool, parameters, a failing statement, a callback that
 * starts the call again, cancelling before and during the statement, and a
 * server that cannot be reached.
 */
#include "pg.h"
#include "unit.h"
#include "unit_loop.h"

#include <dirent.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *db_url;

#define now_sec unit_now_sec
#define run_until unit_run_until

#define run_for unit_run_for

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    int n = 0;
    if (d == NULL)
        return -1;
    while (readdir(d) != NULL)
        n++;
    closedir(d);
    return n;
}

/** A caller's state with the call embedded, as the read side embeds it in a request's state. */
typedef struct {
    int before;
    ji_pg_call_t call;
    ji_pg_pool_t *pool;
    int calls;
    bool done;
    bool has_err;
    char err[512];
    char value[64];
    size_t busy_in_cb, idle_in_cb;
    int restarts; /**< start the call again from the callback this many times */
    const char *values[1];
} caller_t;

static void on_call(ji_pg_call_t *call, PGresult *res, const char *err)
{
    caller_t *c = JI_CONTAINER_OF(call, caller_t, call);

    c->calls++;
    c->has_err = err != NULL;
    snprintf(c->err, sizeof(c->err), "%s", err != NULL ? err : "");
    c->value[0] = '\0';
    if (err == NULL && res != NULL && PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
        snprintf(c->value, sizeof(c->value), "%s", PQgetvalue(res, 0, 0));
    c->busy_in_cb = ji_pg_pool_busy(c->pool);
    c->idle_in_cb = ji_pg_pool_idle(c->pool);
    if (c->restarts > 0) {
        c->restarts--;
        CHECK_EQ_INT(ji_pg_call_start(&c->call, c->pool, "SELECT $1::int * 2", 1, c->values, on_call), 0);
        return;
    }
    c->done = true;
}

static void test_result_and_pool(void)
{
    h2o_loop_t *loop = h2o_evloop_create();
    int fds_before = count_fds();
    caller_t c = {.values = {"21"}};

    c.pool = ji_pg_pool_new(loop, db_url, 2);
    CHECK_EQ_INT(ji_pg_call_start(&c.call, c.pool, "SELECT $1::int * 2", 1, c.values, on_call), 0);
    CHECK(!c.done && c.calls == 0); /* never inside the start */
    CHECK_EQ_INT(ji_pg_pool_busy(c.pool), 1);
    CHECK(run_until(loop, &c.done, 10));
    CHECK_EQ_INT(c.calls, 1);
    CHECK(!c.has_err);
    CHECK_EQ_STR(c.value, "42");
    /* the connection went back before the callback, and stays idle for the next call */
    CHECK_EQ_INT(c.busy_in_cb, 0);
    CHECK_EQ_INT(c.idle_in_cb, 1);

    /* a callback that starts the call again: the same idle connection each time */
    c.done = false;
    c.calls = 0;
    c.restarts = 3;
    c.values[0] = "5";
    CHECK_EQ_INT(ji_pg_call_start(&c.call, c.pool, "SELECT $1::int * 2", 1, c.values, on_call), 0);
    CHECK(run_until(loop, &c.done, 10));
    CHECK_EQ_INT(c.calls, 4);
    CHECK_EQ_STR(c.value, "10");
    CHECK_EQ_INT(ji_pg_pool_idle(c.pool), 1);
    CHECK_EQ_INT(ji_pg_pool_busy(c.pool), 0);
    ji_pg_call_cancel(&c.call); /* nothing runs: harmless */
    CHECK_EQ_INT(ji_pg_pool_idle(c.pool), 1);

    /* a failing statement: the server's message, and the connection is not leaked */
    c.done = false;
    c.calls = 0;
    CHECK_EQ_INT(ji_pg_call_start(&c.call, c.pool, "SELECT * FROM ji_no_such_table", 0, NULL, on_call), 0);
    CHECK(run_until(loop, &c.done, 10));
    CHECK_EQ_INT(c.calls, 1);
    CHECK(c.has_err && strstr(c.err, "ji_no_such_table") != NULL);
    CHECK_EQ_INT(ji_pg_pool_busy(c.pool), 0);

    ji_pg_pool_free(c.pool);
    for (int i = 0; i < 3; i++)
        h2o_evloop_run(loop, 0);
    CHECK_EQ_INT(count_fds(), fds_before);
    h2o_evloop_destroy(loop);
}

static void test_cancel(void)
{
    h2o_loop_t *loop = h2o_evloop_create();
    caller_t c = {0};
    double t0;

    c.pool = ji_pg_pool_new(loop, db_url, 2);
    /* before the connection is there */
    CHECK_EQ_INT(ji_pg_call_start(&c.call, c.pool, "SELECT 1", 0, NULL, on_call), 0);
    ji_pg_call_cancel(&c.call);
    run_for(loop, 0.3);
    CHECK_EQ_INT(c.calls, 0);
    CHECK_EQ_INT(ji_pg_pool_busy(c.pool), 0);

    /* while the statement runs: the connection is closed, not pooled, and no callback comes */
    CHECK_EQ_INT(ji_pg_call_start(&c.call, c.pool, "SELECT pg_sleep(5)", 0, NULL, on_call), 0);
    run_for(loop, 0.5);
    CHECK_EQ_INT(c.calls, 0);
    t0 = now_sec();
    ji_pg_call_cancel(&c.call);
    CHECK(now_sec() - t0 < 1);
    CHECK_EQ_INT(ji_pg_pool_busy(c.pool), 0);
    CHECK_EQ_INT(ji_pg_pool_idle(c.pool), 0);
    run_for(loop, 0.3);
    CHECK_EQ_INT(c.calls, 0);

    /* and the call can start again afterwards */
    CHECK_EQ_INT(ji_pg_call_start(&c.call, c.pool, "SELECT 7", 0, NULL, on_call), 0);
    CHECK(run_until(loop, &c.done, 10));
    CHECK_EQ_STR(c.value, "7");

    ji_pg_pool_free(c.pool);
    for (int i = 0; i < 3; i++)
        h2o_evloop_run(loop, 0);
    h2o_evloop_destroy(loop);
}

static void test_unreachable(void)
{
    h2o_loop_t *loop = h2o_evloop_create();
    caller_t c = {0};

    c.pool = ji_pg_pool_new(loop, "host=127.0.0.1 port=1 dbname=x user=x connect_timeout=2", 2);
    CHECK_EQ_INT(ji_pg_call_start(&c.call, c.pool, "SELECT 1", 0, NULL, on_call), 0);
    CHECK(!c.done);
    CHECK(run_until(loop, &c.done, 5));
    CHECK_EQ_INT(c.calls, 1);
    CHECK(c.has_err && c.err[0] != '\0');
    CHECK_EQ_INT(ji_pg_pool_busy(c.pool), 0);
    CHECK_EQ_INT(ji_pg_pool_idle(c.pool), 0);
    ji_pg_pool_free(c.pool);
    for (int i = 0; i < 3; i++)
        h2o_evloop_run(loop, 0);
    h2o_evloop_destroy(loop);
}

int main(void)
{
    static const unit_test_t tests[] = {{"result_and_pool", test_result_and_pool},
                                        {"cancel", test_cancel},
                                        {"unreachable", test_unreachable},
                                        {NULL, NULL}};

    db_url = unit_test_db();
    if (db_url == NULL) {
        printf("pg_call: no test database configured (JI_TEST_DB; meson -Dtest_database_url=...), skipped\n");
        return 77;
    }
    return unit_run("pg_call", tests);
}
