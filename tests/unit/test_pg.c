/*
 * test_pg.c — the Postgres layer against a real server (JI_TEST_DB: skipped
 * with 77 when none is configured, failed when it does not answer), driven
 * by a real h2o evloop: connecting, queries with parameters, the schema (twice, legacy table, concurrent
 * creators), bulk COPY with the 1/drain protocol, COPY errors, pool reuse,
 * refused connections, and connections the server terminates while idle in
 * the pool or during COPY. Blocking libpq appears only in this test's own
 * set-up code, never in the layer under test.
 */
#include "pg.h"
#include "row_encoder.h"
#include "schema.h"
#include "service_limits.h"
#include "unit.h"
#include "unit_loop.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char *db_url;

/* ---- loop helpers ---- */

#define now_sec unit_now_sec
#define run_until unit_run_until

/** Runs the loop a little so that closed sockets get disposed of before the loop is destroyed. */
static void settle(h2o_loop_t *loop)
{
    for (int i = 0; i < 3; i++)
        h2o_evloop_run(loop, 0);
}

static bool has_trailing_space(const char *s)
{
    size_t n = strlen(s);
    return n > 0 && (s[n - 1] == '\n' || s[n - 1] == ' ' || s[n - 1] == '\r' || s[n - 1] == '\t');
}

/** Open file descriptors of this process (to catch a dup that was never closed). */
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

/* ---- ready ---- */

typedef struct {
    bool done;
    int calls;
    ji_pg_t *pg;
    char err[512];
    bool has_err;
} ready_t;

static void on_ready(ji_pg_t *pg, void *ctx, const char *err)
{
    ready_t *r = ctx;
    r->done = true;
    r->calls++;
    r->pg = pg;
    r->has_err = err != NULL;
    snprintf(r->err, sizeof(r->err), "%s", err != NULL ? err : "");
}

static ji_pg_t *get_conn(h2o_loop_t *loop, ji_pg_pool_t *pool)
{
    ready_t r = {0};
    ji_pg_t *pg = ji_pg_pool_get(pool, on_ready, &r);

    CHECK(pg != NULL);
    CHECK(!r.done); /* never synchronous */
    CHECK(run_until(loop, &r.done, 10));
    CHECK_EQ_INT(r.calls, 1);
    CHECK(r.pg == pg);
    if (r.has_err) {
        fprintf(stderr, "connect failed: %s\n", r.err);
        CHECK(!r.has_err);
        ji_pg_free(pg);
        return NULL;
    }
    return pg;
}

/* ---- query ---- */

typedef struct {
    bool done;
    int calls;
    bool has_err;
    char err[512];
    ExecStatusType status;
    char value[256];
    char tuples[32];
    int ntuples;
} result_t;

static void on_result(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    result_t *r = ctx;
    (void)pg;
    r->done = true;
    r->calls++;
    r->has_err = err != NULL;
    snprintf(r->err, sizeof(r->err), "%s", err != NULL ? err : "");
    r->status = res != NULL ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    r->ntuples = res != NULL ? PQntuples(res) : 0;
    snprintf(r->value, sizeof(r->value), "%s", r->ntuples > 0 && PQnfields(res) > 0 ? PQgetvalue(res, 0, 0) : "");
    snprintf(r->tuples, sizeof(r->tuples), "%s", res != NULL ? PQcmdTuples(res) : "");
}

static result_t query(h2o_loop_t *loop, ji_pg_t *pg, const char *sql, int n, const char *const *values)
{
    result_t r = {0};
    if (ji_pg_query(pg, sql, n, values, on_result, &r) != 0) {
        r.has_err = true;
        snprintf(r.err, sizeof(r.err), "%s", ji_pg_error(pg));
        return r;
    }
    CHECK(!r.done);
    CHECK(run_until(loop, &r.done, 30));
    CHECK_EQ_INT(r.calls, 1);
    return r;
}

/** A query that must succeed; returns the first value. */
static result_t query_ok(h2o_loop_t *loop, ji_pg_t *pg, const char *sql, int n, const char *const *values)
{
    result_t r = query(loop, pg, sql, n, values);
    if (r.has_err)
        fprintf(stderr, "query failed: %s: %s\n", sql, r.err);
    CHECK(!r.has_err);
    return r;
}

/* ---- blocking helpers for set-up only ---- */

/** conninfo (a URL or key=value) rewritten as key=value, so that a keyword appended later overrides it. */
static bool keyvalue_conninfo(const char *conninfo, char *out, size_t size)
{
    char *err = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &err);
    size_t n = 0;
    bool fits = true;

    if (opts == NULL) {
        fprintf(stderr, "pg: %s: %s", conninfo, err != NULL ? err : "cannot parse\n");
        PQfreemem(err);
        return false;
    }
    for (const PQconninfoOption *o = opts; o->keyword != NULL; o++) {
        if (o->val == NULL || o->val[0] == '\0')
            continue;
        /* at most: a space, the keyword, =', every byte escaped, ' and the NUL */
        if (n + 1 + strlen(o->keyword) + 2 + 2 * strlen(o->val) + 2 > size) {
            fits = false;
            break;
        }
        n += (size_t)sprintf(out + n, "%s%s='", n > 0 ? " " : "", o->keyword);
        for (const char *c = o->val; *c != '\0'; c++) {
            if (*c == '\'' || *c == '\\')
                out[n++] = '\\';
            out[n++] = *c;
        }
        out[n++] = '\'';
    }
    out[n] = '\0';
    PQconninfoFree(opts);
    return fits;
}

static PGconn *blocking_conn(void)
{
    PGconn *conn = PQconnectdb(db_url);
    if (PQstatus(conn) != CONNECTION_OK) {
        fprintf(stderr, "blocking connect: %s", PQerrorMessage(conn));
        CHECK(!"blocking connect");
    }
    return conn;
}

static bool exec_ok(PGconn *conn, const char *sql)
{
    PGresult *res = PQexec(conn, sql);
    ExecStatusType st = PQresultStatus(res);
    bool ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
    if (!ok)
        fprintf(stderr, "exec %s: %s", sql, PQresultErrorMessage(res));
    PQclear(res);
    return ok;
}

static long exec_long(PGconn *conn, const char *sql)
{
    PGresult *res = PQexec(conn, sql);
    long v = -1;
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
        v = strtol(PQgetvalue(res, 0, 0), NULL, 10);
    else
        fprintf(stderr, "exec %s: %s", sql, PQresultErrorMessage(res));
    PQclear(res);
    return v;
}

/** A batch id no other run uses (rows are deleted again at the end). */
static int64_t scratch_batch_id(void)
{
    return -(int64_t)(((uint64_t)time(NULL) << 20) ^ ((uint64_t)getpid() << 4) ^ (uint64_t)(now_sec() * 1e6));
}

static void ensure_public_schema(void)
{
    PGconn *conn = blocking_conn();
    ji_error_t err = {0};
    CHECK_EQ_INT(ji_schema_ensure(conn, &err), 0);
    PQfinish(conn);
}

/* ---- tests ---- */

static void test_connect_and_query(void)
{
    h2o_loop_t *loop = h2o_evloop_create();
    ji_pg_pool_t *pool = ji_pg_pool_new(loop, db_url, 4);
    ji_pg_t *pg = get_conn(loop, pool);
    result_t r;

    if (pg == NULL)
        goto cleanup;
    CHECK_EQ_INT(ji_pg_pool_busy(pool), 1);
    CHECK_EQ_INT(ji_pg_pool_idle(pool), 0);

    {
        const char *values[] = {"41", "h\xc3\xa9llo\twörld"};
        r = query_ok(loop, pg, "SELECT $1::int + 1, $2::text", 2, values);
        CHECK_EQ_INT(r.status, PGRES_TUPLES_OK);
        CHECK_EQ_STR(r.value, "42");
        r = query_ok(loop, pg, "SELECT $1::text", 1, values + 1);
        CHECK_EQ_STR(r.value, "h\xc3\xa9llo\twörld");
        r = query_ok(loop, pg, "SHOW client_encoding", 0, NULL);
        CHECK_EQ_STR(r.value, "UTF8");
    }

    /* a server error reaches the callback with the server's message, trimmed; the connection stays usable */
    r = query(loop, pg, "SELECT * FROM ji_no_such_table", 0, NULL);
    CHECK(r.has_err);
    CHECK(strstr(r.err, "ji_no_such_table") != NULL);
    CHECK(!has_trailing_space(r.err));
    CHECK_EQ_INT(r.status, PGRES_FATAL_ERROR);
    r = query_ok(loop, pg, "SELECT 7", 0, NULL);
    CHECK_EQ_STR(r.value, "7");

    /* a large result arrives in many reads */
    r = query_ok(loop, pg, "SELECT repeat('x', 1000) FROM generate_series(1, 20000)", 0, NULL);
    CHECK_EQ_INT(r.ntuples, 20000);

    /* one operation at a time; misuse answers -1 with a message and breaks nothing */
    {
        result_t a = {0}, b = {0};
        CHECK_EQ_INT(ji_pg_query(pg, "SELECT pg_sleep(0.05)", 0, NULL, on_result, &a), 0);
        CHECK_EQ_INT(ji_pg_query(pg, "SELECT 1", 0, NULL, on_result, &b), -1);
        CHECK(strstr(ji_pg_error(pg), "in progress") != NULL);
        CHECK_EQ_INT(ji_pg_copy_put(pg, "x", 1), -1);
        CHECK(run_until(loop, &a.done, 10));
        CHECK(!a.has_err);
        CHECK(!b.done);
    }
    CHECK_EQ_INT(ji_pg_copy_put(pg, "x", 1), -1);
    CHECK(strstr(ji_pg_error(pg), "no COPY in progress") != NULL);

    ji_pg_pool_put(pool, pg);
    CHECK_EQ_INT(ji_pg_pool_busy(pool), 0);
    CHECK_EQ_INT(ji_pg_pool_idle(pool), 1);

cleanup:
    ji_pg_pool_free(pool);
    settle(loop);
    h2o_evloop_destroy(loop);
}

static long count_columns(PGconn *conn)
{
    return exec_long(conn, "SELECT count(*) FROM information_schema.columns WHERE table_schema = current_schema() "
                           "AND table_name = 'users'");
}

typedef struct {
    char schema[64];
    int ret;
    char message[256];
} ensure_job_t;

static void *ensure_thread(void *arg)
{
    ensure_job_t *job = arg;
    char sql[128];
    PGconn *conn = PQconnectdb(db_url);
    ji_error_t err = {0};

    job->ret = -1;
    snprintf(sql, sizeof(sql), "SET search_path TO %s", job->schema);
    if (PQstatus(conn) == CONNECTION_OK && exec_ok(conn, sql)) {
        job->ret = ji_schema_ensure(conn, &err);
        snprintf(job->message, sizeof(job->message), "%s", err.message);
    }
    PQfinish(conn);
    return NULL;
}

static void test_schema(void)
{
    PGconn *conn = blocking_conn();
    ji_error_t err = {0};
    char schema[64], sql[512];

    CHECK(exec_ok(conn, "SET client_min_messages = warning"));
    snprintf(schema, sizeof(schema), "ji_test_%ld", (long)getpid());
    snprintf(sql, sizeof(sql), "DROP SCHEMA IF EXISTS %s CASCADE; CREATE SCHEMA %s; SET search_path TO %s", schema,
             schema, schema);
    CHECK(exec_ok(conn, sql));

    /* fresh, then again (idempotent) */
    CHECK_EQ_INT(ji_schema_ensure(conn, &err), 0);
    CHECK_EQ_INT(ji_schema_ensure(conn, &err), 0);
    CHECK_EQ_INT(count_columns(conn), 8);
    CHECK_EQ_INT(exec_long(conn, "SELECT count(*) FROM pg_indexes WHERE schemaname = current_schema() AND "
                                 "indexname = 'users_batch_id_idx'"),
                 1);
    CHECK_EQ_INT(PQtransactionStatus(conn), PQTRANS_IDLE);

    /* batch keys */
    CHECK_EQ_INT(ji_schema_batch_committed(conn, "key-1"), 0);
    CHECK(exec_ok(conn, "INSERT INTO batches (batch_key) VALUES ('key-1')"));
    CHECK_EQ_INT(ji_schema_batch_committed(conn, "key-1"), 1);
    CHECK_EQ_INT(ji_schema_batch_committed(conn, "key-2"), 0);

    /* a users table made by a benchmark harness gets the missing columns; its rows survive */
    CHECK(exec_ok(conn, "DROP TABLE users"));
    CHECK(exec_ok(conn, "CREATE TABLE users (user_id serial PRIMARY KEY, name varchar(255), email varchar(255), "
                        "image varchar)"));
    CHECK(exec_ok(conn, "INSERT INTO users (name, email) VALUES ('old', 'old@x')"));
    CHECK_EQ_INT(ji_schema_ensure(conn, &err), 0);
    CHECK_EQ_INT(count_columns(conn), 9);
    CHECK_EQ_INT(exec_long(conn, "SELECT count(*) FROM users WHERE created_at IS NOT NULL AND batch_id IS NULL"), 1);
    CHECK_EQ_INT(exec_long(conn, "SELECT count(*) FROM pg_indexes WHERE schemaname = current_schema() AND "
                                 "indexname = 'users_batch_id_idx'"),
                 1);

    /* a broken connection gives -1 and a message */
    {
        PGconn *bad = PQconnectdb("host=127.0.0.1 port=1 connect_timeout=2");
        ji_error_t e2 = {0};
        CHECK_EQ_INT(ji_schema_ensure(bad, &e2), -1);
        CHECK_EQ_INT(e2.kind, JI_ERR_DB);
        CHECK(e2.message[0] != '\0');
        CHECK_EQ_INT(ji_schema_batch_committed(bad, "k"), -1);
        PQfinish(bad);
    }

    /* several processes starting at once, on an empty schema */
    snprintf(sql, sizeof(sql), "DROP SCHEMA %s CASCADE; CREATE SCHEMA %s", schema, schema);
    CHECK(exec_ok(conn, sql));
    {
        enum { N = 6 };
        pthread_t threads[N];
        ensure_job_t jobs[N];
        for (int i = 0; i < N; i++) {
            snprintf(jobs[i].schema, sizeof(jobs[i].schema), "%s", schema);
            jobs[i].message[0] = '\0';
            CHECK_EQ_INT(pthread_create(&threads[i], NULL, ensure_thread, &jobs[i]), 0);
        }
        for (int i = 0; i < N; i++) {
            pthread_join(threads[i], NULL);
            if (jobs[i].ret != 0)
                fprintf(stderr, "concurrent ensure %d: %s\n", i, jobs[i].message);
            CHECK_EQ_INT(jobs[i].ret, 0);
        }
    }
    CHECK_EQ_INT(count_columns(conn), 8);

    snprintf(sql, sizeof(sql), "DROP SCHEMA %s CASCADE", schema);
    CHECK(exec_ok(conn, sql));
    PQfinish(conn);
}

/* ---- COPY driven by the 1/drain protocol ---- */

typedef struct {
    h2o_loop_t *loop;
    ji_pg_t *pg;
    int64_t batch_id;
    long total_rows;
    long next_row;
    const char *(*make_name)(long i, char *buf, size_t cap); /* NULL: plain names */
    const char *raw;                                         /* non-NULL: feed these bytes instead of generated rows */
    size_t raw_len, raw_off;
    char *chunk;
    size_t chunk_cap;
    long puts, ones, drains, events_with_error;
    bool waiting_drain;
    bool protocol_violation;
    result_t end;
    char event_err[512];
} copy_job_t;

static const char *tricky_name(long i, char *buf, size_t cap)
{
    if (i % 1000 == 0)
        snprintf(buf, cap, "tab\there\\back\nnl\rcr #%ld", i);
    else
        snprintf(buf, cap, "user%ld", i);
    return buf;
}

static size_t fill_chunk(copy_job_t *job)
{
    size_t len = 0;

    if (job->raw != NULL) {
        len = job->raw_len - job->raw_off < job->chunk_cap ? job->raw_len - job->raw_off : job->chunk_cap;
        memcpy(job->chunk, job->raw + job->raw_off, len);
        job->raw_off += len;
        return len;
    }
    while (job->next_row < job->total_rows) {
        char name[64], email[64];
        ji_row_t row = {0};
        size_t n;

        row.batch_id = job->batch_id;
        row.name = job->make_name != NULL ? job->make_name(job->next_row, name, sizeof(name)) : name;
        if (job->make_name == NULL)
            snprintf(name, sizeof(name), "user%ld", job->next_row);
        row.name_len = strlen(row.name);
        snprintf(email, sizeof(email), "u%ld@example.com", job->next_row);
        row.email = email;
        row.email_len = strlen(email);
        if (job->next_row % 2 == 0) {
            row.image_path = "ab/cd/0123456789abcdef0123456789abcdef.jpg";
            row.image_type = "image/jpeg";
            row.image_size = 1000 + (uint64_t)job->next_row;
        }
        if ((n = ji_row_encode(job->chunk + len, job->chunk_cap - len, &row)) == 0)
            break; /* chunk full */
        len += n;
        job->next_row++;
    }
    return len;
}

static void on_copy_end(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    copy_job_t *job = ctx;
    on_result(pg, &job->end, res, err);
}

static void produce(copy_job_t *job)
{
    for (;;) {
        size_t len = fill_chunk(job);
        int r;
        if (len == 0) {
            if (ji_pg_copy_end(job->pg, NULL, on_copy_end, job) != 0) {
                job->end.done = true;
                job->end.has_err = true;
                snprintf(job->end.err, sizeof(job->end.err), "%s", ji_pg_error(job->pg));
            }
            return;
        }
        job->puts++;
        r = ji_pg_copy_put(job->pg, job->chunk, len);
        if (r < 0) {
            job->end.done = true;
            job->end.has_err = true;
            snprintf(job->end.err, sizeof(job->end.err), "put: %s", ji_pg_error(job->pg));
            return;
        }
        if (r == 1) {
            job->ones++;
            job->waiting_drain = true;
            return; /* stop producing until drained */
        }
    }
}

static void on_copy_event(ji_pg_t *pg, void *ctx, const char *err)
{
    copy_job_t *job = ctx;
    (void)pg;
    if (err != NULL) {
        job->events_with_error++;
        snprintf(job->event_err, sizeof(job->event_err), "%s", err);
        job->end.done = true;
        job->end.has_err = true;
        snprintf(job->end.err, sizeof(job->end.err), "event: %s", err);
        return;
    }
    job->drains++;
    if (!job->waiting_drain)
        job->protocol_violation = true; /* a drain nobody asked for */
    job->waiting_drain = false;
    produce(job);
}

static void on_copy_started(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    copy_job_t *job = ctx;
    if (err != NULL || PQresultStatus(res) != PGRES_COPY_IN) {
        on_result(pg, &job->end, res, err);
        return;
    }
    ji_pg_set_event_cb(pg, on_copy_event, job);
    produce(job);
}

/** Starts `sql` (a COPY FROM STDIN) and feeds it to the end; returns the seconds it took. */
static double run_copy(copy_job_t *job, const char *sql)
{
    double t0 = now_sec();
    if (ji_pg_query(job->pg, sql, 0, NULL, on_copy_started, job) != 0) {
        job->end.has_err = true;
        snprintf(job->end.err, sizeof(job->end.err), "%s", ji_pg_error(job->pg));
        return 0;
    }
    CHECK(run_until(job->loop, &job->end.done, 60));
    return now_sec() - t0;
}

static void test_copy_bulk(void)
{
    h2o_loop_t *loop = h2o_evloop_create();
    ji_pg_pool_t *pool = ji_pg_pool_new(loop, db_url, 4);
    ji_pg_t *pg;
    copy_job_t job = {0};
    char bid[32], tricky[64];
    const char *values[2];
    result_t r;
    double secs;

    ensure_public_schema();
    if ((pg = get_conn(loop, pool)) == NULL)
        goto cleanup;

    job.loop = loop;
    job.pg = pg;
    job.batch_id = scratch_batch_id();
    job.total_rows = 100000;
    job.make_name = tricky_name;
    job.chunk_cap = JI_COPY_BUFFER_BYTES;
    job.chunk = malloc(job.chunk_cap);
    snprintf(bid, sizeof(bid), "%" PRId64, job.batch_id);

    query_ok(loop, pg, "BEGIN", 0, NULL);
    secs = run_copy(&job, JI_COPY_USERS_SQL);
    if (job.end.has_err)
        fprintf(stderr, "copy failed: %s\n", job.end.err);
    CHECK(!job.end.has_err);
    CHECK_EQ_INT(job.end.status, PGRES_COMMAND_OK);
    CHECK_EQ_STR(job.end.tuples, "100000");
    CHECK(!job.protocol_violation);
    CHECK_EQ_INT(job.drains, job.ones);
    CHECK_EQ_INT(job.events_with_error, 0);
    query_ok(loop, pg, "COMMIT", 0, NULL);
    printf("COPY of %ld small rows in %ld pieces of <= %u bytes: %.3f s, %.0f rows/s (put returned 1 %ld times)\n",
           job.total_rows, job.puts, JI_COPY_BUFFER_BYTES, secs, (double)job.total_rows / secs, job.ones);

    values[0] = bid;
    r = query_ok(loop, pg, "SELECT count(*) FROM users WHERE batch_id = $1", 1, values);
    CHECK_EQ_STR(r.value, "100000");
    r = query_ok(loop, pg,
                 "SELECT count(*) FROM users WHERE batch_id = $1 AND image_path IS NULL AND "
                 "image_type IS NULL AND image_size IS NULL",
                 1, values);
    CHECK_EQ_STR(r.value, "50000");
    /* the escapes survive the trip through the server */
    values[1] = tricky_name(5000, tricky, sizeof(tricky));
    r = query_ok(loop, pg,
                 "SELECT count(*) FROM users WHERE batch_id = $1 AND name = $2 AND email = 'u5000@example.com'", 2,
                 values);
    CHECK_EQ_STR(r.value, "1");
    r = query_ok(loop, pg, "SELECT image_size FROM users WHERE batch_id = $1 AND email = 'u5000@example.com'", 1,
                 values);
    CHECK_EQ_STR(r.value, "6000");
    query_ok(loop, pg, "DELETE FROM users WHERE batch_id = $1", 1, values);

    ji_pg_pool_put(pool, pg);
    CHECK_EQ_INT(ji_pg_pool_idle(pool), 1);

cleanup:
    free(job.chunk);
    ji_pg_pool_free(pool);
    settle(loop);
    h2o_evloop_destroy(loop);
}

/* A server that stops reading (a trigger sleeps on the first row) fills the socket: put must answer 1, the drain
 * must follow, and nothing may be lost. */
static void test_copy_backpressure(void)
{
    h2o_loop_t *loop = h2o_evloop_create();
    ji_pg_pool_t *pool = ji_pg_pool_new(loop, db_url, 4);
    ji_pg_t *pg;
    copy_job_t job = {0};
    result_t r;
    enum { ROWS = 40000, ROW_BYTES = 1000 };
    char *data = NULL;
    size_t off = 0;

    if ((pg = get_conn(loop, pool)) == NULL)
        goto cleanup;
    query_ok(loop, pg, "CREATE TEMP TABLE bp (x text)", 0, NULL);
    query_ok(loop, pg,
             "CREATE FUNCTION pg_temp.bp_slow() RETURNS trigger LANGUAGE plpgsql AS "
             "$$BEGIN IF NEW.x = 'sleep' THEN PERFORM pg_sleep(1); END IF; RETURN NEW; END$$",
             0, NULL);
    query_ok(loop, pg, "CREATE TRIGGER bp_slow BEFORE INSERT ON bp FOR EACH ROW EXECUTE FUNCTION pg_temp.bp_slow()", 0,
             NULL);

    /* 40 MB of rows, the first of which makes the server sleep for a second */
    data = malloc((size_t)ROWS * (ROW_BYTES + 1) + 16);
    off += (size_t)sprintf(data, "sleep\n");
    for (int i = 1; i < ROWS; i++) {
        memset(data + off, 'a' + i % 26, ROW_BYTES);
        off += ROW_BYTES;
        data[off++] = '\n';
    }

    job.loop = loop;
    job.pg = pg;
    job.raw = data;
    job.raw_len = off;
    job.chunk_cap = JI_COPY_BUFFER_BYTES;
    job.chunk = malloc(job.chunk_cap);
    run_copy(&job, "COPY bp FROM STDIN");
    if (job.end.has_err)
        fprintf(stderr, "copy failed: %s\n", job.end.err);
    CHECK(!job.end.has_err);
    CHECK_EQ_STR(job.end.tuples, "40000");
    CHECK(job.ones > 0);
    CHECK_EQ_INT(job.drains, job.ones);
    CHECK(!job.protocol_violation);
    printf("backpressure: %ld puts, %ld answered 1, %ld drains\n", job.puts, job.ones, job.drains);
    r = query_ok(loop, pg, "SELECT count(*), sum(length(x)) FROM bp", 0, NULL);
    CHECK_EQ_STR(r.value, "40000");
    ji_pg_pool_put(pool, pg);

cleanup:
    free(job.chunk);
    free(data);
    ji_pg_pool_free(pool);
    settle(loop);
    h2o_evloop_destroy(loop);
}

/* Starts a COPY and returns once the server is in COPY IN. */
static bool start_copy(h2o_loop_t *loop, ji_pg_t *pg, const char *sql)
{
    result_t r = {0};
    CHECK_EQ_INT(ji_pg_query(pg, sql, 0, NULL, on_result, &r), 0);
    CHECK(run_until(loop, &r.done, 10));
    CHECK(!r.has_err);
    CHECK_EQ_INT(r.status, PGRES_COPY_IN);
    return r.done && r.status == PGRES_COPY_IN;
}

static result_t end_copy(h2o_loop_t *loop, ji_pg_t *pg, const char *abort_msg)
{
    result_t r = {0};
    CHECK_EQ_INT(ji_pg_copy_end(pg, abort_msg, on_result, &r), 0);
    CHECK(!r.done);
    CHECK(run_until(loop, &r.done, 10));
    return r;
}

static void test_copy_errors(void)
{
    h2o_loop_t *loop = h2o_evloop_create();
    ji_pg_pool_t *pool = ji_pg_pool_new(loop, db_url, 4);
    ji_pg_t *pg;
    result_t r;
    char *big = NULL;

    ensure_public_schema();
    if ((pg = get_conn(loop, pool)) == NULL)
        goto cleanup;

    /* a row with too few columns: the error comes through copy_end's callback */
    if (start_copy(loop, pg, JI_COPY_USERS_SQL)) {
        CHECK(ji_pg_copy_put(pg, "1\tonly-a-name\n", 14) >= 0);
        r = end_copy(loop, pg, NULL);
        CHECK(r.has_err);
        CHECK(strstr(r.err, "missing data") != NULL);
        CHECK(!has_trailing_space(r.err));
        CHECK_EQ_INT(r.status, PGRES_FATAL_ERROR);
    }
    /* the connection is still usable and out of any transaction */
    r = query_ok(loop, pg, "SELECT 1", 0, NULL);
    CHECK_EQ_STR(r.value, "1");

    /* bad data first, then megabytes more: the server discards them, the error still arrives at the end */
    if (start_copy(loop, pg, JI_COPY_USERS_SQL)) {
        size_t n = 4u << 20;
        CHECK(ji_pg_copy_put(pg, "x\ty\tz\t\\N\t\\N\t\\N\n", 16) >= 0);
        big = malloc(n);
        for (size_t i = 0; i < n; i++)
            big[i] = (i % 64 == 63) ? '\n' : 'q';
        for (size_t sent = 0; sent < n; sent += JI_COPY_BUFFER_BYTES) {
            int rc = ji_pg_copy_put(pg, big + sent, JI_COPY_BUFFER_BYTES);
            CHECK(rc >= 0);
            if (rc == 1) {
                /* honour the protocol without an event callback: let the loop flush */
                ji_pg_set_event_cb(pg, NULL, NULL);
                for (int i = 0; i < 50; i++)
                    h2o_evloop_run(loop, 10);
            }
        }
        r = end_copy(loop, pg, NULL);
        CHECK(r.has_err);
        CHECK(strstr(r.err, "bigint") != NULL);
    }

    /* aborting a COPY reports our reason */
    if (start_copy(loop, pg, JI_COPY_USERS_SQL)) {
        CHECK(ji_pg_copy_put(pg, "1\ta\tb@c\t\\N\t\\N\t\\N\n", 18) >= 0);
        r = end_copy(loop, pg, "client went away");
        CHECK(r.has_err);
        CHECK(strstr(r.err, "client went away") != NULL);
    }
    CHECK_EQ_INT(ji_pg_copy_end(pg, NULL, on_result, NULL), -1); /* no COPY in progress */

    /* inside a transaction, an error leaves it aborted: put must not keep that connection */
    query_ok(loop, pg, "BEGIN", 0, NULL);
    r = query(loop, pg, "SELECT 1/0", 0, NULL);
    CHECK(r.has_err);
    CHECK(strstr(r.err, "division by zero") != NULL);
    CHECK_EQ_INT(PQtransactionStatus(ji_pg_conn(pg)), PQTRANS_INERROR);
    ji_pg_pool_put(pool, pg);
    CHECK_EQ_INT(ji_pg_pool_idle(pool), 0);
    CHECK_EQ_INT(ji_pg_pool_busy(pool), 0);

cleanup:
    free(big);
    ji_pg_pool_free(pool);
    settle(loop);
    h2o_evloop_destroy(loop);
}

static void test_pool_reuse(void)
{
    h2o_loop_t *loop = h2o_evloop_create();
    int fds_before = count_fds();
    ji_pg_pool_t *pool = ji_pg_pool_new(loop, db_url, 1);
    ji_pg_t *a, *b, *c;
    ready_t rb = {0};

    if ((a = get_conn(loop, pool)) == NULL)
        goto cleanup;
    ji_pg_pool_put(pool, a);
    CHECK_EQ_INT(ji_pg_pool_idle(pool), 1);
    CHECK_EQ_INT(ji_pg_pool_busy(pool), 0);

    /* the second get returns the same connection, and its callback comes from the loop */
    b = ji_pg_pool_get(pool, on_ready, &rb);
    CHECK(b == a);
    CHECK(!rb.done);
    CHECK_EQ_INT(ji_pg_pool_idle(pool), 0);
    CHECK_EQ_INT(ji_pg_pool_busy(pool), 1);
    CHECK(run_until(loop, &rb.done, 5));
    CHECK(!rb.has_err);
    CHECK_EQ_INT(rb.calls, 1);
    CHECK_EQ_STR(query_ok(loop, b, "SELECT 5", 0, NULL).value, "5");

    /* two out at once; max_idle 1 keeps one */
    if ((c = get_conn(loop, pool)) == NULL)
        goto cleanup;
    CHECK(c != b);
    CHECK_EQ_INT(ji_pg_pool_busy(pool), 2);
    ji_pg_pool_put(pool, b);
    ji_pg_pool_put(pool, c);
    CHECK_EQ_INT(ji_pg_pool_idle(pool), 1);
    CHECK_EQ_INT(ji_pg_pool_busy(pool), 0);

    /* a get cancelled before its callback: no callback afterwards */
    {
        ready_t rc = {0};
        ji_pg_t *d = ji_pg_pool_get(pool, on_ready, &rc);
        ji_pg_free(d);
        for (int i = 0; i < 10; i++)
            h2o_evloop_run(loop, 5);
        CHECK(!rc.done);
        CHECK_EQ_INT(ji_pg_pool_idle(pool), 0);
        CHECK_EQ_INT(ji_pg_pool_busy(pool), 0);
        /* a new connection cancelled while connecting */
        d = ji_pg_pool_get(pool, on_ready, &rc);
        ji_pg_free(d);
        for (int i = 0; i < 10; i++)
            h2o_evloop_run(loop, 5);
        CHECK(!rc.done);
        CHECK_EQ_INT(ji_pg_pool_busy(pool), 0);
    }

cleanup:
    ji_pg_pool_free(pool);
    settle(loop);
    CHECK_EQ_INT(count_fds(), fds_before); /* libpq's socket and our dup both closed */
    h2o_evloop_destroy(loop);
}

static void test_connect_failures(void)
{
    h2o_loop_t *loop = h2o_evloop_create();
    ji_pg_pool_t *pool = ji_pg_pool_new(loop, "host=127.0.0.1 port=1 dbname=x user=x", 4);
    ready_t r = {0};
    ji_pg_t *pg = ji_pg_pool_get(pool, on_ready, &r);
    double t0 = now_sec();

    CHECK(pg != NULL);
    CHECK(!r.done);
    CHECK(run_until(loop, &r.done, 5));
    CHECK(now_sec() - t0 < 2);
    CHECK(r.has_err);
    CHECK(r.err[0] != '\0');
    CHECK(strstr(r.err, "refused") != NULL);
    CHECK(!has_trailing_space(r.err));
    printf("closed port: %s\n", r.err);
    /* the failed connection is not reusable */
    CHECK_EQ_INT(ji_pg_query(pg, "SELECT 1", 0, NULL, on_result, NULL), -1);
    ji_pg_pool_put(pool, pg);
    CHECK_EQ_INT(ji_pg_pool_idle(pool), 0);
    CHECK_EQ_INT(ji_pg_pool_busy(pool), 0);
    ji_pg_pool_free(pool);

    /* a server that answers with an error during start-up (no such database) */
    {
        char url[1024];
        ready_t r2 = {0};
        snprintf(url, sizeof(url), "%s dbname=ji_no_such_database", db_url);
        pool = ji_pg_pool_new(loop, url, 4);
        pg = ji_pg_pool_get(pool, on_ready, &r2);
        CHECK(run_until(loop, &r2.done, 5));
        CHECK(r2.has_err);
        CHECK(strstr(r2.err, "ji_no_such_database") != NULL);
        CHECK(!has_trailing_space(r2.err));
        ji_pg_free(pg);
        ji_pg_pool_free(pool);
    }

    /* an unparsable conninfo fails from the loop too */
    {
        ready_t r3 = {0};
        pool = ji_pg_pool_new(loop, "this is = not valid", 4);
        pg = ji_pg_pool_get(pool, on_ready, &r3);
        CHECK(!r3.done);
        CHECK(run_until(loop, &r3.done, 5));
        CHECK(r3.has_err);
        ji_pg_free(pg);
        ji_pg_pool_free(pool);
    }

    settle(loop);
    h2o_evloop_destroy(loop);
}

/** Terminates the backend `pid` from another connection of another pool. */
static void terminate_backend(h2o_loop_t *loop, const char *pid)
{
    ji_pg_pool_t *other = ji_pg_pool_new(loop, db_url, 1);
    ji_pg_t *killer = get_conn(loop, other);
    const char *values[] = {pid};

    if (killer != NULL) {
        CHECK_EQ_STR(query_ok(loop, killer, "SELECT pg_terminate_backend($1::int)", 1, values).value, "t");
        ji_pg_pool_put(other, killer);
    }
    ji_pg_pool_free(other);
}

static void test_terminated_while_idle(void)
{
    h2o_loop_t *loop = h2o_evloop_create();
    ji_pg_pool_t *pool = ji_pg_pool_new(loop, db_url, 4);
    ji_pg_t *pg = get_conn(loop, pool);
    char pid[256];
    double deadline;

    if (pg == NULL)
        goto cleanup;
    snprintf(pid, sizeof(pid), "%s", query_ok(loop, pg, "SELECT pg_backend_pid()", 0, NULL).value);
    ji_pg_pool_put(pool, pg);
    CHECK_EQ_INT(ji_pg_pool_idle(pool), 1);

    terminate_backend(loop, pid);
    deadline = now_sec() + 5;
    while (ji_pg_pool_idle(pool) != 0 && now_sec() < deadline)
        h2o_evloop_run(loop, 20);
    CHECK_EQ_INT(ji_pg_pool_idle(pool), 0);
    CHECK_EQ_INT(ji_pg_pool_busy(pool), 0);

    /* the next get makes a fresh connection */
    if ((pg = get_conn(loop, pool)) != NULL) {
        CHECK(strcmp(query_ok(loop, pg, "SELECT pg_backend_pid()", 0, NULL).value, pid) != 0);
        ji_pg_pool_put(pool, pg);
    }

cleanup:
    ji_pg_pool_free(pool);
    settle(loop);
    h2o_evloop_destroy(loop);
}

typedef struct {
    bool done;
    int calls;
    char err[512];
    bool has_err;
    bool free_in_cb;
} event_t;

static void on_event(ji_pg_t *pg, void *ctx, const char *err)
{
    event_t *e = ctx;
    e->done = true;
    e->calls++;
    e->has_err = err != NULL;
    snprintf(e->err, sizeof(e->err), "%s", err != NULL ? err : "");
    if (e->free_in_cb)
        ji_pg_free(pg);
}

static void test_terminated_during_copy(void)
{
    h2o_loop_t *loop = h2o_evloop_create();
    ji_pg_pool_t *pool = ji_pg_pool_new(loop, db_url, 4);
    ji_pg_t *pg;
    event_t e = {0};
    char pid[256];

    ensure_public_schema();
    if ((pg = get_conn(loop, pool)) == NULL)
        goto cleanup;
    snprintf(pid, sizeof(pid), "%s", query_ok(loop, pg, "SELECT pg_backend_pid()", 0, NULL).value);
    query_ok(loop, pg, "BEGIN", 0, NULL);
    if (start_copy(loop, pg, JI_COPY_USERS_SQL)) {
        ji_pg_set_event_cb(pg, on_event, &e);
        CHECK(ji_pg_copy_put(pg, "1\ta\tb@c\t\\N\t\\N\t\\N\n", 18) >= 0);
        terminate_backend(loop, pid);
        CHECK(run_until(loop, &e.done, 5));
        CHECK(e.has_err);
        CHECK(e.err[0] != '\0');
        CHECK(!has_trailing_space(e.err));
        CHECK_EQ_INT(e.calls, 1);
        printf("terminated during COPY: %s\n", e.err);
        /* everything after says the connection failed */
        CHECK_EQ_INT(ji_pg_copy_put(pg, "x\n", 2), -1);
        CHECK_EQ_INT(ji_pg_copy_end(pg, NULL, on_result, NULL), -1);
        CHECK(ji_pg_error(pg)[0] != '\0');
    }
    ji_pg_pool_put(pool, pg); /* not kept */
    CHECK_EQ_INT(ji_pg_pool_idle(pool), 0);
    CHECK_EQ_INT(ji_pg_pool_busy(pool), 0);

    /* the same, with the event callback freeing the connection */
    if ((pg = get_conn(loop, pool)) != NULL) {
        event_t e2 = {.free_in_cb = true};
        snprintf(pid, sizeof(pid), "%s", query_ok(loop, pg, "SELECT pg_backend_pid()", 0, NULL).value);
        if (start_copy(loop, pg, JI_COPY_USERS_SQL)) {
            ji_pg_set_event_cb(pg, on_event, &e2);
            terminate_backend(loop, pid);
            CHECK(run_until(loop, &e2.done, 5));
            CHECK(e2.has_err);
        } else {
            ji_pg_free(pg);
        }
        CHECK_EQ_INT(ji_pg_pool_busy(pool), 0);
    }

cleanup:
    ji_pg_pool_free(pool);
    settle(loop);
    h2o_evloop_destroy(loop);
}

/* ---- callbacks that free or put back their connection ---- */

typedef struct {
    ji_pg_pool_t *pool;
    bool done;
    bool put_back;
    char value[64];
} reentry_t;

static void on_result_release(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    reentry_t *t = ctx;
    t->done = true;
    snprintf(t->value, sizeof(t->value), "%s", err == NULL && PQntuples(res) > 0 ? PQgetvalue(res, 0, 0) : "");
    if (t->put_back)
        ji_pg_pool_put(t->pool, pg);
    else
        ji_pg_free(pg);
}

static void on_ready_free(ji_pg_t *pg, void *ctx, const char *err)
{
    bool *done = ctx;
    (void)err;
    *done = true;
    ji_pg_free(pg);
}

typedef struct {
    ji_pg_pool_t *pool;
    h2o_loop_t *loop;
    bool done;
    reentry_t inner;
} chain_t;

static void on_ready_query(ji_pg_t *pg, void *ctx, const char *err)
{
    chain_t *c = ctx;
    c->done = true;
    if (err != NULL || ji_pg_query(pg, "SELECT 'chained'", 0, NULL, on_result_release, &c->inner) != 0)
        ji_pg_free(pg);
}

static void test_callbacks_release(void)
{
    h2o_loop_t *loop = h2o_evloop_create();
    ji_pg_pool_t *pool = ji_pg_pool_new(loop, db_url, 4);
    ji_pg_t *pg;

    /* the result callback frees the connection */
    if ((pg = get_conn(loop, pool)) != NULL) {
        reentry_t t = {pool, false, false, ""};
        CHECK_EQ_INT(ji_pg_query(pg, "SELECT 'freed'", 0, NULL, on_result_release, &t), 0);
        CHECK(run_until(loop, &t.done, 5));
        CHECK_EQ_STR(t.value, "freed");
        CHECK_EQ_INT(ji_pg_pool_busy(pool), 0);
    }
    /* the result callback puts it back; it is kept */
    if ((pg = get_conn(loop, pool)) != NULL) {
        reentry_t t = {pool, false, true, ""};
        CHECK_EQ_INT(ji_pg_query(pg, "SELECT 'put'", 0, NULL, on_result_release, &t), 0);
        CHECK(run_until(loop, &t.done, 5));
        CHECK_EQ_STR(t.value, "put");
        CHECK_EQ_INT(ji_pg_pool_idle(pool), 1);
        CHECK_EQ_INT(ji_pg_pool_busy(pool), 0);
    }
    /* the ready callback frees it (a reused one, then a new one) */
    {
        bool done = false;
        ji_pg_pool_get(pool, on_ready_free, &done);
        CHECK(run_until(loop, &done, 5));
        done = false;
        ji_pg_pool_get(pool, on_ready_free, &done);
        CHECK(run_until(loop, &done, 5));
        CHECK_EQ_INT(ji_pg_pool_busy(pool), 0);
        CHECK_EQ_INT(ji_pg_pool_idle(pool), 0);
    }
    /* the ready callback starts a query whose callback puts the connection back */
    {
        chain_t c = {pool, loop, false, {pool, false, true, ""}};
        ji_pg_pool_get(pool, on_ready_query, &c);
        CHECK(run_until(loop, &c.inner.done, 5));
        CHECK_EQ_STR(c.inner.value, "chained");
        CHECK_EQ_INT(ji_pg_pool_idle(pool), 1);
    }
    /* a failed connect whose callback frees it */
    {
        ji_pg_pool_t *bad = ji_pg_pool_new(loop, "host=127.0.0.1 port=1", 4);
        bool done = false;
        ji_pg_pool_get(bad, on_ready_free, &done);
        CHECK(run_until(loop, &done, 5));
        CHECK_EQ_INT(ji_pg_pool_busy(bad), 0);
        ji_pg_pool_free(bad);
    }

    ji_pg_pool_free(pool);
    settle(loop);
    h2o_evloop_destroy(loop);
}

static void test_many_connections(void)
{
    /* several connections of one pool progress at once on one loop */
    enum { N = 8 };
    h2o_loop_t *loop = h2o_evloop_create();
    ji_pg_pool_t *pool = ji_pg_pool_new(loop, db_url, N);
    ready_t ready[N] = {{0}};
    result_t res[N] = {{0}};
    ji_pg_t *pgs[N];
    char sql[N][64];
    double deadline = now_sec() + 10;
    bool all;

    for (int i = 0; i < N; i++)
        pgs[i] = ji_pg_pool_get(pool, on_ready, &ready[i]);
    do {
        h2o_evloop_run(loop, 20);
        all = true;
        for (int i = 0; i < N; i++)
            all = all && ready[i].done;
    } while (!all && now_sec() < deadline);
    CHECK(all);
    for (int i = 0; i < N; i++) {
        CHECK(!ready[i].has_err);
        snprintf(sql[i], sizeof(sql[i]), "SELECT %d FROM pg_sleep(0.2)", i);
        CHECK_EQ_INT(ji_pg_query(pgs[i], sql[i], 0, NULL, on_result, &res[i]), 0);
    }
    {
        double t0 = now_sec();
        do {
            h2o_evloop_run(loop, 20);
            all = true;
            for (int i = 0; i < N; i++)
                all = all && res[i].done;
        } while (!all && now_sec() < deadline);
        CHECK(all);
        CHECK(now_sec() - t0 < 0.2 * N / 2); /* concurrent, not one after another */
    }
    for (int i = 0; i < N; i++) {
        char want[8];
        snprintf(want, sizeof(want), "%d", i);
        CHECK_EQ_STR(res[i].value, want);
        ji_pg_pool_put(pool, pgs[i]);
    }
    CHECK_EQ_INT(ji_pg_pool_idle(pool), N);
    ji_pg_pool_free(pool);
    settle(loop);
    h2o_evloop_destroy(loop);
}

/* Idle connections beyond JI_PG_KEEP_IDLE go after JI_PG_IDLE_CLOSE_MS unused; the kept ones still work. */
static void test_idle_close(void)
{
    enum { N = JI_PG_KEEP_IDLE + 3 };
    h2o_loop_t *loop = h2o_evloop_create();
    ji_pg_pool_t *pool = ji_pg_pool_new(loop, db_url, N);
    ji_pg_t *pgs[N];
    double deadline;

    for (int i = 0; i < N; i++)
        CHECK((pgs[i] = get_conn(loop, pool)) != NULL);
    for (int i = 0; i < N; i++)
        ji_pg_pool_put(pool, pgs[i]);
    CHECK_EQ_INT(ji_pg_pool_idle(pool), N); /* a burst's connections serve the next requests */
    deadline = now_sec() + JI_PG_IDLE_CLOSE_MS / 2000.0;
    while (now_sec() < deadline)
        h2o_evloop_run(loop, 20);
    CHECK_EQ_INT(ji_pg_pool_idle(pool), N); /* not before the time */
    deadline = now_sec() + JI_PG_IDLE_CLOSE_MS / 1000.0 + 2;
    while (ji_pg_pool_idle(pool) > JI_PG_KEEP_IDLE && now_sec() < deadline)
        h2o_evloop_run(loop, 20);
    CHECK_EQ_INT(ji_pg_pool_idle(pool), JI_PG_KEEP_IDLE);
    h2o_evloop_run(loop, 20);
    CHECK_EQ_INT(ji_pg_pool_busy(pool), 0);
    {
        ji_pg_t *pg = get_conn(loop, pool);
        result_t res = {0};

        CHECK(pg != NULL);
        if (pg != NULL) {
            CHECK_EQ_INT(ji_pg_query(pg, "SELECT 7", 0, NULL, on_result, &res), 0);
            CHECK(run_until(loop, &res.done, 10));
            CHECK_EQ_STR(res.value, "7");
            ji_pg_pool_put(pool, pg);
        }
    }
    CHECK_EQ_INT(ji_pg_pool_idle(pool), JI_PG_KEEP_IDLE);
    ji_pg_pool_free(pool);
    settle(loop);
    h2o_evloop_destroy(loop);
}

/* libpq moves to the next host or address after a failure, with a new socket: the loop must follow it. */
static void test_socket_changes(void)
{
    h2o_loop_t *loop = h2o_evloop_create();
    int fds_before = count_fds();
    const char *variants[] = {" host=localhost", " host=127.0.0.1,127.0.0.1 port=1,%s",
                              " host=127.0.0.2,127.0.0.1 port=1,%s"};
    PGconn *probe = PQconnectdb(db_url);
    const char *port = PQport(probe);

    if (PQstatus(probe) != CONNECTION_OK || PQhost(probe)[0] == '/') {
        printf("socket_changes: needs a TCP server, skipped\n");
        goto cleanup;
    }
    for (size_t i = 0; i < sizeof(variants) / sizeof(variants[0]); i++) {
        char url[1024], extra[128];
        ji_pg_pool_t *pool;
        ji_pg_t *pg;
        snprintf(extra, sizeof(extra), variants[i], port);
        snprintf(url, sizeof(url), "%s%s", db_url, extra);
        pool = ji_pg_pool_new(loop, url, 1);
        if ((pg = get_conn(loop, pool)) != NULL) {
            CHECK_EQ_STR(query_ok(loop, pg, "SELECT 'moved'", 0, NULL).value, "moved");
            ji_pg_pool_put(pool, pg);
        } else {
            fprintf(stderr, "with %s\n", extra);
        }
        ji_pg_pool_free(pool);
    }
    settle(loop);
    CHECK_EQ_INT(count_fds(), fds_before + 1); /* + the probe */

cleanup:
    PQfinish(probe);
    h2o_evloop_destroy(loop);
}

/* A server that accepts TCP but never answers: the connect timeout (from the conninfo) fails the connection. */
static void test_connect_timeout(void)
{
    h2o_loop_t *loop = h2o_evloop_create();
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = {0};
    socklen_t len = sizeof(sin);
    char url[256];
    ji_pg_pool_t *pool;
    ready_t r = {0};
    ji_pg_t *pg;
    double t0;

    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK(bind(lfd, (struct sockaddr *)&sin, sizeof(sin)) == 0);
    CHECK(listen(lfd, 8) == 0);
    CHECK(getsockname(lfd, (struct sockaddr *)&sin, &len) == 0);
    snprintf(url, sizeof(url), "host=127.0.0.1 port=%d dbname=x user=x connect_timeout=2 sslmode=disable",
             ntohs(sin.sin_port));
    pool = ji_pg_pool_new(loop, url, 1);
    t0 = now_sec();
    pg = ji_pg_pool_get(pool, on_ready, &r);
    CHECK(run_until(loop, &r.done, 10));
    CHECK(r.has_err);
    CHECK(strstr(r.err, "within 2000 ms") != NULL);
    CHECK(now_sec() - t0 >= 1.9 && now_sec() - t0 < 5);
    printf("silent server: %s\n", r.err);
    ji_pg_free(pg);
    ji_pg_pool_free(pool);
    close(lfd);
    settle(loop);
    h2o_evloop_destroy(loop);
}

/* A query in flight when the server ends the connection gets the error through its result callback. */
static void test_terminated_during_query(void)
{
    h2o_loop_t *loop = h2o_evloop_create();
    ji_pg_pool_t *pool = ji_pg_pool_new(loop, db_url, 4);
    ji_pg_t *pg = get_conn(loop, pool);
    result_t r = {0};
    char pid[256];

    if (pg == NULL)
        goto cleanup;
    snprintf(pid, sizeof(pid), "%s", query_ok(loop, pg, "SELECT pg_backend_pid()", 0, NULL).value);
    CHECK_EQ_INT(ji_pg_query(pg, "SELECT pg_sleep(30)", 0, NULL, on_result, &r), 0);
    terminate_backend(loop, pid);
    CHECK(run_until(loop, &r.done, 5));
    CHECK(r.has_err);
    CHECK(r.err[0] != '\0');
    CHECK(!has_trailing_space(r.err));
    CHECK_EQ_INT(r.calls, 1);
    printf("terminated during a query: %s\n", r.err);
    ji_pg_pool_put(pool, pg);
    CHECK_EQ_INT(ji_pg_pool_idle(pool), 0);
    CHECK_EQ_INT(ji_pg_pool_busy(pool), 0);

cleanup:
    ji_pg_pool_free(pool);
    settle(loop);
    h2o_evloop_destroy(loop);
}

/* ---- scripts: several statements, one message ---- */

typedef struct {
    bool done;
    int calls;
    int n;
    bool has_err;
    bool has_failed;
    char err[512];
    char failed_state[8];
    ExecStatusType status[JI_PG_SCRIPT_MAX_STATEMENTS + 1];
    char value[JI_PG_SCRIPT_MAX_STATEMENTS + 1][64];
} script_t;

static void on_script(ji_pg_t *pg, void *ctx, PGresult *const *results, int n, PGresult *failed, const char *err)
{
    script_t *s = ctx;

    (void)pg;
    s->done = true;
    s->calls++;
    s->n = n;
    s->has_err = err != NULL;
    s->has_failed = failed != NULL;
    snprintf(s->err, sizeof(s->err), "%s", err != NULL ? err : "");
    snprintf(s->failed_state, sizeof(s->failed_state), "%s",
             failed != NULL && PQresultErrorField(failed, PG_DIAG_SQLSTATE) != NULL
                 ? PQresultErrorField(failed, PG_DIAG_SQLSTATE)
                 : "");
    for (int i = 0; i < n && i <= JI_PG_SCRIPT_MAX_STATEMENTS; i++) {
        s->status[i] = PQresultStatus(results[i]);
        snprintf(s->value[i], sizeof(s->value[i]), "%s",
                 PQntuples(results[i]) > 0 && PQnfields(results[i]) > 0 ? PQgetvalue(results[i], 0, 0) : "");
    }
}

static script_t script(h2o_loop_t *loop, ji_pg_t *pg, const char *sql)
{
    script_t s = {0};

    CHECK_EQ_INT(ji_pg_script(pg, sql, on_script, &s), 0);
    CHECK(!s.done);
    CHECK(run_until(loop, &s.done, 10));
    CHECK_EQ_INT(s.calls, 1);
    return s;
}

/** Every statement's result in order; the first error stops the rest; COPY IN as the last statement; the pool
 * taking over a script in flight. */
static void test_script(void)
{
    h2o_loop_t *loop = h2o_evloop_create();
    ji_pg_pool_t *pool = ji_pg_pool_new(loop, db_url, 4);
    ji_pg_t *pg;
    script_t s;
    result_t r;
    char pid[256];

    ensure_public_schema();
    if ((pg = get_conn(loop, pool)) == NULL)
        goto cleanup;
    query_ok(loop, pg, "DROP TABLE IF EXISTS ji_unit_script", 0, NULL);
    query_ok(loop, pg, "CREATE TABLE ji_unit_script (n int PRIMARY KEY)", 0, NULL);

    /* results in order, one per statement */
    s = script(loop, pg, "BEGIN; SELECT 41 + 1; INSERT INTO ji_unit_script VALUES (1) RETURNING n * 10; COMMIT");
    CHECK(!s.has_err);
    CHECK_EQ_INT(s.n, 4);
    CHECK_EQ_INT(s.status[0], PGRES_COMMAND_OK);
    CHECK_EQ_STR(s.value[1], "42");
    CHECK_EQ_STR(s.value[2], "10");
    CHECK_EQ_INT(s.status[3], PGRES_COMMAND_OK);
    CHECK_EQ_INT(PQtransactionStatus(ji_pg_conn(pg)), PQTRANS_IDLE);

    /* the third statement fails: two results, its error, nothing after it ran, the transaction is aborted */
    s = script(loop, pg,
               "BEGIN; SELECT 1; INSERT INTO ji_unit_script VALUES (1); INSERT INTO ji_unit_script VALUES (2)");
    CHECK(s.has_err);
    CHECK(s.has_failed);
    CHECK_EQ_INT(s.n, 2);
    CHECK_EQ_STR(s.failed_state, "23505");
    CHECK(strstr(s.err, "duplicate key") != NULL);
    CHECK(!has_trailing_space(s.err));
    CHECK_EQ_INT(PQtransactionStatus(ji_pg_conn(pg)), PQTRANS_INERROR);
    query_ok(loop, pg, "ROLLBACK", 0, NULL);
    CHECK_EQ_STR(query_ok(loop, pg, "SELECT count(*) FROM ji_unit_script", 0, NULL).value, "1");

    /* ending with COPY: the results before it, then COPY IN; the connection is in COPY */
    s = script(loop, pg, "BEGIN; SELECT 7; COPY ji_unit_script FROM STDIN");
    CHECK(!s.has_err);
    CHECK_EQ_INT(s.n, 3);
    CHECK_EQ_STR(s.value[1], "7");
    CHECK_EQ_INT(s.status[2], PGRES_COPY_IN);
    CHECK_EQ_INT(ji_pg_copy_put(pg, "3\n4\n", 4) >= 0, 1);
    r = end_copy(loop, pg, NULL);
    CHECK(!r.has_err);
    query_ok(loop, pg, "COMMIT", 0, NULL);
    CHECK_EQ_STR(query_ok(loop, pg, "SELECT count(*) FROM ji_unit_script", 0, NULL).value, "3");

    /* a script in flight given back: the pool waits for it (COPY IN included), rolls back, keeps the connection */
    snprintf(pid, sizeof(pid), "%s", query_ok(loop, pg, "SELECT pg_backend_pid()", 0, NULL).value);
    {
        script_t never = {0};
        CHECK_EQ_INT(ji_pg_script(pg, "BEGIN; SELECT pg_sleep(0.1); COPY ji_unit_script FROM STDIN", on_script, &never),
                     0);
        ji_pg_pool_put_rollback(pool, pg, "unit: taken over");
        for (int i = 0; i < 100 && ji_pg_pool_busy(pool) != 0; i++)
            h2o_evloop_run(loop, 20);
        CHECK_EQ_INT(ji_pg_pool_busy(pool), 0);
        CHECK(!never.done); /* its owner hears nothing more */
    }
    if ((pg = get_conn(loop, pool)) == NULL)
        goto cleanup;
    CHECK_EQ_STR(query_ok(loop, pg, "SELECT pg_backend_pid()", 0, NULL).value, pid);
    CHECK_EQ_INT(PQtransactionStatus(ji_pg_conn(pg)), PQTRANS_IDLE);

    /* the connection lost during a script: one callback, an error, no failed result */
    {
        script_t lost = {0};
        CHECK_EQ_INT(ji_pg_script(pg, "SELECT 1; SELECT pg_sleep(30)", on_script, &lost), 0);
        terminate_backend(loop, pid);
        CHECK(run_until(loop, &lost.done, 5));
        CHECK_EQ_INT(lost.calls, 1);
        CHECK(lost.has_err);
        CHECK(!lost.has_failed || lost.failed_state[0] != '\0');
        CHECK(lost.n <= 1);
    }
    ji_pg_pool_put(pool, pg);
    if ((pg = get_conn(loop, pool)) == NULL)
        goto cleanup;
    query_ok(loop, pg, "DROP TABLE ji_unit_script", 0, NULL);
    ji_pg_pool_put(pool, pg);

cleanup:
    ji_pg_pool_free(pool);
    settle(loop);
    h2o_evloop_destroy(loop);
}

int main(void)
{
    static const unit_test_t tests[] = {{"connect_and_query", test_connect_and_query},
                                        {"schema", test_schema},
                                        {"copy_bulk", test_copy_bulk},
                                        {"copy_backpressure", test_copy_backpressure},
                                        {"copy_errors", test_copy_errors},
                                        {"pool_reuse", test_pool_reuse},
                                        {"connect_failures", test_connect_failures},
                                        {"terminated_while_idle", test_terminated_while_idle},
                                        {"terminated_during_copy", test_terminated_during_copy},
                                        {"callbacks_release", test_callbacks_release},
                                        {"many_connections", test_many_connections},
                                        {"idle_close", test_idle_close},
                                        {"socket_changes", test_socket_changes},
                                        {"connect_timeout", test_connect_timeout},
                                        {"terminated_during_query", test_terminated_during_query},
                                        {"script", test_script},
                                        {NULL, NULL}};

    static char keyvalue[4096];
    PGconn *probe;

    db_url = unit_test_db();
    if (db_url == NULL) {
        printf("pg: no test database configured (JI_TEST_DB; meson -Dtest_database_url=...), skipped\n");
        return 77;
    }
    /* configured but not there is a failure, never a skip */
    probe = PQconnectdb(db_url);
    if (PQstatus(probe) != CONNECTION_OK) {
        fprintf(stderr, "pg: the test database %s does not answer: %s", db_url, PQerrorMessage(probe));
        PQfinish(probe);
        return 1;
    }
    PQfinish(probe);
    /* the tests append keywords (dbname=..., host=...): a URL becomes key=value first */
    if (!keyvalue_conninfo(db_url, keyvalue, sizeof(keyvalue))) {
        fprintf(stderr, "pg: cannot rewrite %s as key=value\n", db_url);
        return 1;
    }
    db_url = keyvalue;
    return unit_run("pg", tests);
}
