/*
 * pg.c — owns every PostgreSQL connection an event loop uses: connecting
 * without blocking (PQconnectStart + PQconnectPoll driven by the loop),
 * running one statement at a time, feeding COPY FROM STDIN with explicit
 * output backpressure, noticing a dead server, the per-loop pool of idle
 * connections, and giving back connections of failed requests: their COPY is
 * ended with an error and their transaction rolled back in the background,
 * so that a bad request does not cost a new server process. (The one-statement
 * call on a pooled connection, ji_pg_call_t, is built on this API in pg_call.c.)
 *
 * libpq's socket is watched through a dup registered with the h2o evloop with
 * H2O_SOCKET_FLAG_DONT_READ, so h2o only reports readiness and libpq does all
 * reading and writing. The dup keeps the watched socket alive even when libpq
 * closes its own fd, so "which socket am I watching" is answered by the
 * socket's inode, not by its fd number (libpq may reuse the number for the
 * next address it tries).
 *
 * Callback discipline: a callback may free its connection (or whatever owns it).
 * Every callback is invoked as the last thing a function does, between
 * enter()/leave(), and ji_pg_free called inside one releases everything but
 * the struct, which leave() frees once the callback has returned.
 *
 * The pool's timeouts live in the loop's timeout list: ji_pg_pool_free must run
 * outside h2o_evloop_run (h2o walks that list while running timeouts).
 */
#include "pg.h"

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/** Largest piece handed to PQputCopyData in one call (its length is an int). */
#define JI_PG_COPY_MAX_PIECE (1u << 30)

typedef enum {
    JI_PG_CONNECTING, /**< PQconnectPoll in progress */
    JI_PG_READY,      /**< connected, no operation in progress */
    JI_PG_QUERY,      /**< a statement was sent; collecting its results */
    JI_PG_COPY_IN,    /**< COPY FROM STDIN: the caller feeds ji_pg_copy_put */
    JI_PG_COPY_END,   /**< CopyDone/CopyFail sent; collecting the COPY's result */
    JI_PG_FAILED,     /**< the connection is dead; ji_pg_error says why */
} ji_pg_state_t;

struct st_ji_pg_pool_t {
    h2o_loop_t *loop;
    char *conninfo;
    size_t max_idle;
    /* Written by the pool's own thread only; atomic so that /metrics may read them from any thread. */
    _Atomic size_t idle_count;
    _Atomic size_t busy_count;
    h2o_linklist_t idle;           /**< most recently used first */
    h2o_timeout_t zero_timeout;    /**< "later, from the loop" */
    h2o_timeout_t connect_timeout; /**< connect_timeout_ms */
    uint64_t connect_timeout_ms;
    h2o_linklist_t recycling;      /**< connections rolling back before they go idle (ji_pg_pool_put_rollback) */
    h2o_timeout_t recycle_timeout; /**< JI_PG_ROLLBACK_TIMEOUT_MS */
};

struct st_ji_pg_t {
    ji_pg_pool_t *pool;
    PGconn *conn;
    h2o_socket_t *sock; /**< watches a dup of PQsocket; NULL when nothing is watched */
    dev_t sock_dev;     /**< identity of the socket `sock` duplicates */
    ino_t sock_ino;
    ji_pg_state_t state;
    bool drain_pending;  /**< ji_pg_copy_put answered 1: the event callback fires once output drained */
    bool idle;           /**< linked in pool->idle */
    bool handed_out;     /**< counted in pool->busy_count */
    bool ready_pending;  /**< the ready callback is due from defer_entry */
    bool retry_on_defer; /**< a reused connection found dead before its ready callback: connect anew once */
    bool freed;          /**< ji_pg_free ran inside a callback; leave() frees the struct */
    bool recycling;      /**< given back to be rolled back: in pool->recycling (through idle_link), still busy */
    bool rolled_back;    /**< recycling: ROLLBACK was sent */
    bool then_sent;      /**< recycling: then_sql was sent (its failure is logged) */
    char *then_sql;      /**< recycling: the statement still to run before the connection goes idle */
    unsigned in_cb;      /**< callbacks of ours on the stack */
    ji_pg_ready_cb ready_cb;
    ji_pg_result_cb result_cb;
    void *op_ctx;
    ji_pg_event_cb event_cb;
    void *event_ctx;
    PGresult *first_error; /**< results of the statement in progress */
    PGresult *last_result;
    h2o_timeout_entry_t defer_entry;
    h2o_timeout_entry_t connect_entry;
    h2o_timeout_entry_t recycle_entry;
    h2o_linklist_t idle_link;
    char copy_abort[128]; /**< recycling: the CopyFail message for a COPY still in progress */
    char errbuf[512];
};

static void on_sock_read(h2o_socket_t *sock, const char *err);
static void on_sock_write(h2o_socket_t *sock, const char *err);
static void fail(ji_pg_t *pg, const char *msg);
static int await_result(ji_pg_t *pg, ji_pg_state_t state, ji_pg_result_cb cb, void *ctx);

/* ---- small helpers ---- */

/** Copies a message, trimmed of libpq's trailing newline (and any other trailing white space). */
static void copy_message(char *dst, size_t cap, const char *msg)
{
    size_t n;

    snprintf(dst, cap, "%s", msg != NULL && msg[0] != '\0' ? msg : "unknown database error");
    n = strlen(dst);
    while (n > 0 && (dst[n - 1] == '\n' || dst[n - 1] == '\r' || dst[n - 1] == ' ' || dst[n - 1] == '\t'))
        dst[--n] = '\0';
}

static void set_error(ji_pg_t *pg, const char *msg)
{
    copy_message(pg->errbuf, sizeof(pg->errbuf), msg);
}

static const char *conn_message(ji_pg_t *pg)
{
    return pg->conn != NULL ? PQerrorMessage(pg->conn) : "no connection";
}

/** The message of an error result: the server's primary text when there is one, else libpq's full message. */
static const char *result_message(const PGresult *res)
{
    const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    return msg != NULL ? msg : PQresultErrorMessage(res);
}

/* Notices (e.g. "relation already exists, skipping", or the FATAL that precedes a terminated idle connection)
 * would go to stderr by default; the failure itself reaches the caller through the callbacks. */
static void ignore_notice(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

static void clear_results(ji_pg_t *pg)
{
    PQclear(pg->first_error);
    PQclear(pg->last_result);
    pg->first_error = pg->last_result = NULL;
}

/* ---- the watched socket ---- */

static void close_socket(ji_pg_t *pg)
{
    if (pg->sock == NULL)
        return;
    pg->sock->data = NULL;
    h2o_socket_close(pg->sock); /* removes it from epoll and closes our dup; libpq's fd stays open */
    pg->sock = NULL;
}

/** Makes pg->sock watch the socket libpq uses now. 0, or -1 with errbuf set. */
static int watch_socket(ji_pg_t *pg)
{
    struct stat st;
    int fd = PQsocket(pg->conn), dupfd;

    if (fd < 0) {
        set_error(pg, "libpq has no socket");
        return -1;
    }
    if (fstat(fd, &st) != 0) {
        set_error(pg, strerror(errno));
        return -1;
    }
    if (pg->sock != NULL && st.st_dev == pg->sock_dev && st.st_ino == pg->sock_ino)
        return 0;
    close_socket(pg);
    if ((dupfd = fcntl(fd, F_DUPFD_CLOEXEC, 0)) < 0) {
        set_error(pg, strerror(errno));
        return -1;
    }
    pg->sock = h2o_evloop_socket_create(pg->pool->loop, dupfd, H2O_SOCKET_FLAG_DONT_READ);
    pg->sock->data = pg;
    pg->sock_dev = st.st_dev;
    pg->sock_ino = st.st_ino;
    return 0;
}

static void set_reading(ji_pg_t *pg, bool on)
{
    if (pg->sock == NULL)
        return;
    if (on && !h2o_socket_is_reading(pg->sock))
        h2o_socket_read_start(pg->sock, on_sock_read);
    else if (!on && h2o_socket_is_reading(pg->sock))
        h2o_socket_read_stop(pg->sock);
}

static void arm_write(ji_pg_t *pg)
{
    if (pg->sock != NULL && !h2o_socket_is_writing(pg->sock))
        h2o_socket_notify_write(pg->sock, on_sock_write);
}

/** PQflush; arms the write notification while output remains. 0 sent, 1 pending, -1 failed (errbuf set). */
static int flush_output(ji_pg_t *pg)
{
    int r = PQflush(pg->conn);

    if (r < 0) {
        set_error(pg, conn_message(pg));
        return -1;
    }
    if (r > 0)
        arm_write(pg);
    return r;
}

/** The connection is dead and the caller learns it from a return value: no callback. */
static void break_quietly(ji_pg_t *pg)
{
    pg->state = JI_PG_FAILED;
    pg->drain_pending = false;
    close_socket(pg);
    clear_results(pg);
}

/* ---- invoking callbacks (the last thing a function does) ---- */

static void enter(ji_pg_t *pg)
{
    pg->in_cb++;
}

/** Finishes a callback: frees the struct when the callback freed the connection. */
static void leave(ji_pg_t *pg)
{
    if (--pg->in_cb == 0 && pg->freed)
        free(pg);
}

static void deliver_ready(ji_pg_t *pg, const char *err)
{
    ji_pg_ready_cb cb = pg->ready_cb;
    char msg[sizeof(pg->errbuf)];

    pg->ready_cb = NULL;
    if (cb == NULL)
        return;
    if (err != NULL)
        copy_message(msg, sizeof(msg), err);
    enter(pg);
    cb(pg, pg->op_ctx, err != NULL ? msg : NULL);
    leave(pg);
}

/** Hands `res` (owned here, cleared afterwards) to the result callback. */
static void deliver_result(ji_pg_t *pg, PGresult *res, const char *err)
{
    ji_pg_result_cb cb = pg->result_cb;
    char msg[sizeof(pg->errbuf)];

    pg->result_cb = NULL;
    if (err != NULL)
        copy_message(msg, sizeof(msg), err);
    if (cb != NULL) {
        enter(pg);
        cb(pg, pg->op_ctx, res, err != NULL ? msg : NULL);
        leave(pg);
    }
    PQclear(res);
}

static void deliver_event(ji_pg_t *pg, const char *err)
{
    char msg[sizeof(pg->errbuf)];

    if (pg->event_cb == NULL)
        return;
    if (err != NULL)
        copy_message(msg, sizeof(msg), err);
    enter(pg);
    pg->event_cb(pg, pg->event_ctx, err != NULL ? msg : NULL);
    leave(pg);
}

/* ---- connecting ---- */

static void connected(ji_pg_t *pg)
{
    h2o_timeout_unlink(&pg->connect_entry);
    if (PQsetnonblocking(pg->conn, 1) != 0) {
        fail(pg, conn_message(pg));
        return;
    }
    if (watch_socket(pg) != 0) {
        char msg[sizeof(pg->errbuf)];
        memcpy(msg, pg->errbuf, sizeof(msg));
        fail(pg, msg);
        return;
    }
    pg->state = JI_PG_READY;
    pg->errbuf[0] = '\0';
    /* From now on readability is always watched: results, and a server that goes away. */
    set_reading(pg, true);
    deliver_ready(pg, NULL);
}

static void connect_step(ji_pg_t *pg)
{
    switch (PQconnectPoll(pg->conn)) {
    case PGRES_POLLING_OK:
        connected(pg);
        return;
    case PGRES_POLLING_READING:
        if (watch_socket(pg) != 0)
            break;
        set_reading(pg, true);
        return;
    case PGRES_POLLING_WRITING:
    case PGRES_POLLING_ACTIVE: /* unused by libpq since 7.x; "call again" */
        if (watch_socket(pg) != 0)
            break;
        set_reading(pg, false);
        arm_write(pg);
        return;
    case PGRES_POLLING_FAILED:
        set_error(pg, conn_message(pg));
        break;
    }
    {
        char msg[sizeof(pg->errbuf)];
        memcpy(msg, pg->errbuf, sizeof(msg));
        fail(pg, msg);
    }
}

static void on_defer(h2o_timeout_entry_t *entry);
static void on_recycle_timeout(h2o_timeout_entry_t *entry);

/** Fails a connection whose caller must not hear of it synchronously: the ready callback comes from the loop. */
static void fail_deferred(ji_pg_t *pg, const char *msg)
{
    set_error(pg, msg);
    pg->state = JI_PG_FAILED;
    close_socket(pg);
    pg->ready_pending = true;
    if (!h2o_linklist_is_linked(&pg->defer_entry._link))
        h2o_timeout_link(pg->pool->loop, &pg->pool->zero_timeout, &pg->defer_entry);
}

static void start_connect(ji_pg_t *pg)
{
    /* client_encoding after the caller's conninfo (expanded from "dbname") wins over it: rows are UTF-8. */
    static const char *const keys[] = {"fallback_application_name", "dbname", "client_encoding", NULL};
    const char *values[] = {"jsonl-ingest", pg->pool->conninfo, "UTF8", NULL};

    close_socket(pg);
    h2o_timeout_unlink(&pg->connect_entry);
    if (pg->conn != NULL)
        PQfinish(pg->conn);
    clear_results(pg);
    pg->errbuf[0] = '\0';
    pg->state = JI_PG_CONNECTING;

    /* Note: a host name (not hostaddr) is resolved with a blocking getaddrinfo inside PQconnectStart. */
    pg->conn = PQconnectStartParams(keys, values, 1);
    if (pg->conn == NULL) {
        fail_deferred(pg, "out of memory");
        return;
    }
    if (PQstatus(pg->conn) == CONNECTION_BAD) {
        fail_deferred(pg, PQerrorMessage(pg->conn));
        return;
    }
    PQsetNoticeProcessor(pg->conn, ignore_notice, NULL);
    if (watch_socket(pg) != 0) {
        char msg[sizeof(pg->errbuf)];
        memcpy(msg, pg->errbuf, sizeof(msg));
        fail_deferred(pg, msg);
        return;
    }
    /* libpq: after PQconnectStart, behave as if PQconnectPoll had answered PGRES_POLLING_WRITING */
    arm_write(pg);
    h2o_timeout_link(pg->pool->loop, &pg->pool->connect_timeout, &pg->connect_entry);
}

static void on_connect_timeout(h2o_timeout_entry_t *entry)
{
    ji_pg_t *pg = JI_CONTAINER_OF(entry, ji_pg_t, connect_entry);
    char msg[160];

    snprintf(msg, sizeof(msg),
             "could not connect to the database within %" PRIu64 " ms (connect_timeout, default "
             "JI_PG_CONNECT_TIMEOUT_MS)",
             pg->pool->connect_timeout_ms);
    fail(pg, msg);
}

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

static void on_defer(h2o_timeout_entry_t *entry)
{
    ji_pg_t *pg = JI_CONTAINER_OF(entry, ji_pg_t, defer_entry);

    pg->ready_pending = false;
    if (pg->state == JI_PG_FAILED && pg->retry_on_defer) {
        /* an idle connection died between ji_pg_pool_get and now: the caller asked for a connection, not for
         * that one */
        pg->retry_on_defer = false;
        start_connect(pg);
        return;
    }
    pg->retry_on_defer = false;
    deliver_ready(pg, pg->state == JI_PG_FAILED ? pg->errbuf : NULL);
}

/* ---- failure ---- */

/** The connection died: stop watching it and tell whoever is waiting on it (last thing the caller does). */
static void fail(ji_pg_t *pg, const char *msg)
{
    ji_pg_state_t prev = pg->state;

    set_error(pg, msg);
    pg->state = JI_PG_FAILED;
    pg->drain_pending = false;
    close_socket(pg); /* an EOF stays readable: keep it out of the loop */
    h2o_timeout_unlink(&pg->connect_entry);
    clear_results(pg);

    switch (prev) {
    case JI_PG_CONNECTING:
        deliver_ready(pg, pg->errbuf);
        return;
    case JI_PG_QUERY:
    case JI_PG_COPY_END:
        deliver_result(pg, NULL, pg->errbuf);
        return;
    case JI_PG_READY:
    case JI_PG_COPY_IN:
        if (pg->idle || pg->recycling) {
            ji_pg_free(pg); /* the pool drops it; nobody else knows it */
            return;
        }
        if (pg->ready_pending)
            return; /* on_defer reports or reconnects */
        deliver_event(pg, pg->errbuf);
        return;
    case JI_PG_FAILED:
        return;
    }
}

/* ---- results ---- */

static bool is_error_status(ExecStatusType st)
{
    return st == PGRES_FATAL_ERROR || st == PGRES_BAD_RESPONSE || st == PGRES_NONFATAL_ERROR;
}

/** Reads every result libpq has parsed; delivers once the statement is complete (or COPY IN began). */
static void collect_results(ji_pg_t *pg)
{
    PGresult *res;

    for (;;) {
        if (PQisBusy(pg->conn))
            return; /* wait for more input */
        if ((res = PQgetResult(pg->conn)) == NULL)
            break;
        switch (PQresultStatus(res)) {
        case PGRES_COPY_IN:
            if (pg->state == JI_PG_QUERY && pg->first_error == NULL) {
                clear_results(pg);
                pg->state = JI_PG_COPY_IN;
                deliver_result(pg, res, NULL);
                return;
            }
            /* COPY IN after an error or after CopyDone cannot be continued */
            PQclear(res);
            fail(pg, "unexpected COPY IN state");
            return;
        case PGRES_COPY_OUT:
        case PGRES_COPY_BOTH:
            PQclear(res);
            fail(pg, "COPY TO STDOUT is not supported on event-loop connections");
            return;
        default:
            if (is_error_status(PQresultStatus(res))) {
                if (pg->first_error == NULL)
                    pg->first_error = res;
                else
                    PQclear(res);
            } else if (pg->first_error != NULL) {
                PQclear(res);
            } else {
                PQclear(pg->last_result);
                pg->last_result = res;
            }
            break;
        }
    }

    /* the statement is complete */
    if (PQstatus(pg->conn) != CONNECTION_OK) {
        fail(pg, pg->first_error != NULL ? result_message(pg->first_error) : conn_message(pg));
        return;
    }
    pg->state = JI_PG_READY;
    if (pg->first_error != NULL) {
        res = pg->first_error;
        pg->first_error = NULL;
        clear_results(pg);
        set_error(pg, result_message(res));
        deliver_result(pg, res, pg->errbuf);
    } else {
        res = pg->last_result;
        pg->last_result = NULL;
        deliver_result(pg, res, NULL);
    }
}

/** Something arrived during COPY IN. libpq holds back an ErrorResponse until CopyDone, so this sees only a lost
 * connection or a state libpq itself gave up on. */
static void check_copy_in(ji_pg_t *pg)
{
    PGresult *res;
    ExecStatusType st;

    (void)PQisBusy(pg->conn); /* parses pending notices */
    if (PQstatus(pg->conn) != CONNECTION_OK) {
        fail(pg, conn_message(pg));
        return;
    }
    res = PQgetResult(pg->conn); /* PGRES_COPY_IN while the COPY goes on */
    st = PQresultStatus(res);
    if (res != NULL && st == PGRES_COPY_IN) {
        PQclear(res);
        return;
    }
    {
        char msg[sizeof(pg->errbuf)];
        copy_message(msg, sizeof(msg), res != NULL ? result_message(res) : "COPY ended unexpectedly");
        PQclear(res);
        fail(pg, msg);
    }
}

static void handle_input(ji_pg_t *pg)
{
    switch (pg->state) {
    case JI_PG_QUERY:
    case JI_PG_COPY_END:
        collect_results(pg);
        return;
    case JI_PG_COPY_IN:
        check_copy_in(pg);
        return;
    case JI_PG_READY:
        (void)PQisBusy(pg->conn); /* parses ParameterStatus / notices that arrive while idle */
        if (PQstatus(pg->conn) != CONNECTION_OK)
            fail(pg, conn_message(pg));
        return;
    case JI_PG_CONNECTING:
    case JI_PG_FAILED:
        return;
    }
}

/* ---- socket events ---- */

static void on_sock_read(h2o_socket_t *sock, const char *err)
{
    ji_pg_t *pg = sock->data;

    if (pg == NULL)
        return;
    if (err != NULL) {
        fail(pg, err);
        return;
    }
    if (pg->state == JI_PG_CONNECTING) {
        connect_step(pg);
        return;
    }
    if (!PQconsumeInput(pg->conn)) {
        fail(pg, conn_message(pg));
        return;
    }
    handle_input(pg);
}

static void on_sock_write(h2o_socket_t *sock, const char *err)
{
    ji_pg_t *pg = sock->data;
    int r;

    if (pg == NULL)
        return;
    if (err != NULL) {
        fail(pg, err);
        return;
    }
    switch (pg->state) {
    case JI_PG_CONNECTING:
        connect_step(pg);
        return;
    case JI_PG_FAILED:
        return;
    default:
        break;
    }
    if ((r = flush_output(pg)) < 0) {
        char msg[sizeof(pg->errbuf)];
        memcpy(msg, pg->errbuf, sizeof(msg));
        fail(pg, msg);
        return;
    }
    if (r > 0)
        return; /* armed again */
    switch (pg->state) {
    case JI_PG_COPY_IN:
        if (pg->drain_pending) {
            pg->drain_pending = false;
            deliver_event(pg, NULL);
        }
        return;
    case JI_PG_QUERY:
    case JI_PG_COPY_END:
        /* pqSendSome reads while the socket is full (to avoid a deadlock): look at what it may have read */
        collect_results(pg);
        return;
    default:
        return;
    }
}

/* ---- pool ---- */

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
    h2o_timeout_dispose(pool->loop, &pool->connect_timeout);
    free(pool->conninfo);
    free(pool);
}

static void unlink_idle(ji_pg_t *pg)
{
    h2o_linklist_unlink(&pg->idle_link);
    pg->idle = false;
    pg->pool->idle_count--;
}

ji_pg_t *ji_pg_pool_get(ji_pg_pool_t *pool, ji_pg_ready_cb cb, void *ctx)
{
    ji_pg_t *pg;

    while (!h2o_linklist_is_empty(&pool->idle)) {
        pg = JI_CONTAINER_OF(pool->idle.next, ji_pg_t, idle_link);
        unlink_idle(pg);
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

    if ((pg = calloc(1, sizeof(*pg))) == NULL)
        return NULL;
    pg->pool = pool;
    pg->defer_entry.cb = on_defer;
    pg->connect_entry.cb = on_connect_timeout;
    pg->recycle_entry.cb = on_recycle_timeout;
    pg->handed_out = true;
    pool->busy_count++;
    pg->ready_cb = cb;
    pg->op_ctx = ctx;
    start_connect(pg);
    return pg;
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
        pg->ready_cb = NULL;
        pg->result_cb = NULL;
        pg->op_ctx = NULL;
        pg->event_cb = NULL;
        pg->event_ctx = NULL;
        pg->drain_pending = false;
        pg->errbuf[0] = '\0';
        h2o_linklist_insert(pool->idle.next, &pg->idle_link);
        pg->idle = true;
        pool->idle_count++;
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
            await_result(pg, JI_PG_COPY_END, on_recycle_result, NULL) != 0) {
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
    pg->ready_cb = NULL;
    pg->result_cb = NULL;
    pg->op_ctx = NULL;
    pg->event_cb = NULL;
    pg->event_ctx = NULL;
    pg->drain_pending = false;
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
    copy_message(pg->copy_abort, sizeof(pg->copy_abort), copy_abort_msg != NULL ? copy_abort_msg : "request aborted");
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

/* ---- one connection ---- */

void ji_pg_free(ji_pg_t *pg)
{
    if (pg == NULL || pg->freed)
        return;
    h2o_timeout_unlink(&pg->defer_entry);
    h2o_timeout_unlink(&pg->connect_entry);
    h2o_timeout_unlink(&pg->recycle_entry);
    if (pg->idle)
        unlink_idle(pg);
    if (pg->recycling) {
        h2o_linklist_unlink(&pg->idle_link);
        pg->recycling = false;
    }
    free(pg->then_sql);
    pg->then_sql = NULL;
    if (pg->handed_out) {
        pg->handed_out = false;
        pg->pool->busy_count--;
    }
    close_socket(pg);
    clear_results(pg);
    if (pg->conn != NULL) {
        PQfinish(pg->conn); /* nonblocking: queues Terminate and tries once to send it */
        pg->conn = NULL;
    }
    pg->ready_cb = NULL;
    pg->result_cb = NULL;
    pg->event_cb = NULL;
    pg->state = JI_PG_FAILED;
    pg->freed = true;
    if (pg->in_cb == 0)
        free(pg);
}

/** Checks that `pg` can start or continue an operation in `want`; -1 with errbuf set otherwise. */
static int check_state(ji_pg_t *pg, ji_pg_state_t want, const char *what)
{
    char msg[128];

    if (pg->state == JI_PG_FAILED) {
        if (pg->errbuf[0] == '\0')
            set_error(pg, "connection failed");
        return -1; /* keep the message that says why */
    }
    if (pg->state == want && !pg->ready_pending)
        return 0;
    snprintf(msg, sizeof(msg), "%s: %s", what,
             pg->state == JI_PG_CONNECTING || pg->ready_pending ? "the connection is not ready yet"
             : want == JI_PG_READY                              ? "another operation is in progress"
                                                                : "no COPY in progress");
    set_error(pg, msg);
    return -1;
}

/** What was sent is on its way: wait in `state` for the result that goes to `cb`. 0, or -1 (connection broken). */
static int await_result(ji_pg_t *pg, ji_pg_state_t state, ji_pg_result_cb cb, void *ctx)
{
    pg->state = state;
    pg->result_cb = cb;
    pg->op_ctx = ctx;
    if (flush_output(pg) < 0) {
        pg->result_cb = NULL;
        break_quietly(pg);
        return -1;
    }
    return 0;
}

int ji_pg_query(ji_pg_t *pg, const char *sql, int nparams, const char *const *values, ji_pg_result_cb cb, void *ctx)
{
    if (check_state(pg, JI_PG_READY, "query") != 0)
        return -1;
    if (!PQsendQueryParams(pg->conn, sql, nparams, NULL, values, NULL, NULL, 0)) {
        set_error(pg, conn_message(pg));
        if (PQstatus(pg->conn) != CONNECTION_OK)
            break_quietly(pg);
        return -1;
    }
    return await_result(pg, JI_PG_QUERY, cb, ctx);
}

int ji_pg_copy_put(ji_pg_t *pg, const char *data, size_t len)
{
    int r;

    if (check_state(pg, JI_PG_COPY_IN, "COPY data") != 0)
        return -1;
    while (len > 0) {
        size_t piece = len < JI_PG_COPY_MAX_PIECE ? len : JI_PG_COPY_MAX_PIECE;
        /* In nonblocking mode 0 means libpq could not grow its buffer: nothing was queued. */
        if ((r = PQputCopyData(pg->conn, data, (int)piece)) != 1) {
            set_error(pg, r == 0 ? "out of memory queuing COPY data" : conn_message(pg));
            break_quietly(pg);
            return -1;
        }
        data += piece;
        len -= piece;
    }
    if ((r = flush_output(pg)) < 0) {
        break_quietly(pg);
        return -1;
    }
    if (r > 0)
        pg->drain_pending = true;
    return r;
}

void ji_pg_set_event_cb(ji_pg_t *pg, ji_pg_event_cb cb, void *ctx)
{
    pg->event_cb = cb;
    pg->event_ctx = ctx;
}

int ji_pg_copy_end(ji_pg_t *pg, const char *abort_msg, ji_pg_result_cb cb, void *ctx)
{
    int r;

    if (check_state(pg, JI_PG_COPY_IN, "COPY end") != 0)
        return -1;
    if ((r = PQputCopyEnd(pg->conn, abort_msg)) != 1) {
        set_error(pg, r == 0 ? "out of memory queuing the end of COPY" : conn_message(pg));
        break_quietly(pg);
        return -1;
    }
    pg->drain_pending = false; /* the result callback supersedes the drain */
    return await_result(pg, JI_PG_COPY_END, cb, ctx);
}

const char *ji_pg_error(const ji_pg_t *pg)
{
    return pg->errbuf;
}

PGconn *ji_pg_conn(ji_pg_t *pg)
{
    return pg->conn;
}
