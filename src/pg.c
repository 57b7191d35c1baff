/*
 * pg.c — owns one PostgreSQL connection on an event loop: connecting without
 * blocking (PQconnectStart + PQconnectPoll driven by the loop), running one
 * statement at a time, feeding COPY FROM STDIN with explicit output
 * backpressure, and noticing a dead server. The per-loop pool of idle
 * connections and the giving back of connections are pg_pool.c's; the
 * one-statement call on a pooled connection, ji_pg_call_t, is built on this
 * API in pg_call.c. What pg.c and pg_pool.c share is in pg_internal.h.
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
 */
#include "pg_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/** Largest piece handed to PQputCopyData in one call (its length is an int). */
#define JI_PG_COPY_MAX_PIECE (1u << 30)

static void on_sock_read(h2o_socket_t *sock, const char *err);
static void on_sock_write(h2o_socket_t *sock, const char *err);
static void fail(ji_pg_t *pg, const char *msg);

/* ---- small helpers ---- */

/** Copies a message, trimmed of libpq's trailing newline (and any other trailing white space). */
void ji_pg__copy_message(char *dst, size_t cap, const char *msg)
{
    size_t n;

    snprintf(dst, cap, "%s", msg != NULL && msg[0] != '\0' ? msg : "unknown database error");
    n = strlen(dst);
    while (n > 0 && (dst[n - 1] == '\n' || dst[n - 1] == '\r' || dst[n - 1] == ' ' || dst[n - 1] == '\t'))
        dst[--n] = '\0';
}

static void set_error(ji_pg_t *pg, const char *msg)
{
    ji_pg__copy_message(pg->errbuf, sizeof(pg->errbuf), msg);
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

/** Drops a script's kept results (they are delivered with its end, or a failure). */
static void clear_script(ji_pg_t *pg)
{
    for (int i = 0; i < pg->nscript; i++)
        PQclear(pg->script_results[i]);
    pg->nscript = 0;
    pg->script = false;
    pg->script_cb = NULL;
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
        ji_pg__copy_message(msg, sizeof(msg), err);
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
        ji_pg__copy_message(msg, sizeof(msg), err);
    if (cb != NULL) {
        enter(pg);
        cb(pg, pg->op_ctx, res, err != NULL ? msg : NULL);
        leave(pg);
    }
    PQclear(res);
}

/**
 * Ends a script: its owner gets the kept results, `extra` (COPY IN's, owned here) after them, and the first error
 * (taken from first_error) or `err`. When the pool took the connection over (script_cb NULL), its result callback
 * gets the error or the last result, like a single statement's.
 */
static void deliver_script(ji_pg_t *pg, PGresult *extra, const char *err)
{
    PGresult *results[JI_PG_SCRIPT_MAX_STATEMENTS + 1];
    PGresult *failed = pg->first_error;
    ji_pg_script_cb cb = pg->script_cb;
    char msg[sizeof(pg->errbuf)];
    int n = pg->nscript;

    /* the results are the caller's from here: the callback may free the connection */
    memcpy(results, pg->script_results, (size_t)n * sizeof(results[0]));
    pg->nscript = 0;
    pg->script = false;
    pg->script_cb = NULL;
    pg->first_error = NULL;
    if (extra != NULL)
        results[n++] = extra;
    if (failed != NULL) {
        set_error(pg, result_message(failed));
        err = pg->errbuf;
    }
    if (err != NULL)
        ji_pg__copy_message(msg, sizeof(msg), err);
    if (cb == NULL) {
        /* taken over by the pool: one result, like a statement's */
        PGresult *last = failed != NULL ? failed : n > 0 ? results[--n] : NULL;
        for (int i = 0; i < n; i++)
            PQclear(results[i]);
        if (failed != NULL && extra != NULL)
            PQclear(extra);
        deliver_result(pg, last, err != NULL ? msg : NULL);
        return;
    }
    pg->result_cb = NULL;
    enter(pg);
    cb(pg, pg->op_ctx, results, n, failed, err != NULL ? msg : NULL);
    leave(pg);
    for (int i = 0; i < n; i++)
        PQclear(results[i]);
    PQclear(failed);
}

static void deliver_event(ji_pg_t *pg, const char *err)
{
    char msg[sizeof(pg->errbuf)];

    if (pg->event_cb == NULL)
        return;
    if (err != NULL)
        ji_pg__copy_message(msg, sizeof(msg), err);
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

void ji_pg__start_connect(ji_pg_t *pg)
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

static void on_defer(h2o_timeout_entry_t *entry)
{
    ji_pg_t *pg = JI_CONTAINER_OF(entry, ji_pg_t, defer_entry);

    pg->ready_pending = false;
    if (pg->state == JI_PG_FAILED && pg->retry_on_defer) {
        /* an idle connection died between ji_pg_pool_get and now: the caller asked for a connection, not for
         * that one */
        pg->retry_on_defer = false;
        ji_pg__start_connect(pg);
        return;
    }
    pg->retry_on_defer = false;
    deliver_ready(pg, pg->state == JI_PG_FAILED ? pg->errbuf : NULL);
}

ji_pg_t *ji_pg__new(ji_pg_pool_t *pool)
{
    ji_pg_t *pg = calloc(1, sizeof(*pg));

    if (pg == NULL)
        return NULL;
    pg->pool = pool;
    pg->defer_entry.cb = on_defer;
    pg->connect_entry.cb = on_connect_timeout;
    return pg;
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
        if (pg->script) {
            deliver_script(pg, NULL, pg->errbuf);
            return;
        }
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
                if (pg->script)
                    deliver_script(pg, res, NULL);
                else
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
            } else if (pg->script) {
                if (pg->nscript < JI_PG_SCRIPT_MAX_STATEMENTS)
                    pg->script_results[pg->nscript++] = res;
                else
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
    if (pg->script) {
        deliver_script(pg, NULL, NULL);
        return;
    }
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
        ji_pg__copy_message(msg, sizeof(msg), res != NULL ? result_message(res) : "COPY ended unexpectedly");
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

/* ---- one connection ---- */

void ji_pg_free(ji_pg_t *pg)
{
    if (pg == NULL || pg->freed)
        return;
    h2o_timeout_unlink(&pg->defer_entry);
    h2o_timeout_unlink(&pg->connect_entry);
    h2o_timeout_unlink(&pg->recycle_entry);
    if (pg->idle)
        ji_pg__unlink_idle(pg);
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
    clear_script(pg);
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
int ji_pg__await_result(ji_pg_t *pg, ji_pg_state_t state, ji_pg_result_cb cb, void *ctx)
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
    return ji_pg__await_result(pg, JI_PG_QUERY, cb, ctx);
}

int ji_pg_script(ji_pg_t *pg, const char *sql, ji_pg_script_cb cb, void *ctx)
{
    if (check_state(pg, JI_PG_READY, "script") != 0)
        return -1;
    if (!PQsendQuery(pg->conn, sql)) {
        set_error(pg, conn_message(pg));
        if (PQstatus(pg->conn) != CONNECTION_OK)
            break_quietly(pg);
        return -1;
    }
    clear_script(pg);
    pg->script = true;
    pg->script_cb = cb;
    if (ji_pg__await_result(pg, JI_PG_QUERY, NULL, ctx) != 0) {
        clear_script(pg);
        return -1;
    }
    return 0;
}

int ji_pg_copy_queue(ji_pg_t *pg, const char *data, size_t len)
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
    return 0;
}

int ji_pg_copy_put(ji_pg_t *pg, const char *data, size_t len)
{
    int r;

    if (ji_pg_copy_queue(pg, data, len) != 0)
        return -1;
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
    return ji_pg__await_result(pg, JI_PG_COPY_END, cb, ctx);
}

const char *ji_pg_error(const ji_pg_t *pg)
{
    return pg->errbuf;
}

PGconn *ji_pg_conn(ji_pg_t *pg)
{
    return pg->conn;
}
