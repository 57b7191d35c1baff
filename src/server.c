/*
 * server.c — process start-up and the workers: opens the images directory,
 * creates the schema and removes what crashed requests left (blocking, before
 * any loop runs), registers the h2o handlers, then runs one event loop per
 * thread, all sharing one listening socket (the loop with the fewest connections
 * takes the next one), each with its own h2o context and database pool.
 */
#include "server.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "array_mode.h"
#include "batches.h"
#include "front_door.h"
#include "h2o_bridge.h"
#include "gunzip.h"
#include "reads.h"
#include "health.h"
#include "metrics.h"
#include "ingest.h"
#include "handler_reply.h"
#include "json_text.h"
#include "schema.h"
#include "uploads.h"


/* ------------------------------------------------------------------ h2o handlers */

static h2o_pathconf_t *register_handler(h2o_hostconf_t *host, const char *path,
                                        int (*on_req)(h2o_handler_t *, h2o_req_t *))
{
    h2o_pathconf_t *pathconf = h2o_config_register_path(host, path, 0);
    h2o_handler_t *handler = h2o_create_handler(pathconf, sizeof(*handler));
    handler->on_req = on_req;
    return pathconf;
}

static int on_not_found(h2o_handler_t *self, h2o_req_t *req)
{
    (void)self;
    ji_reply_errorf(req, JI_ERR_NOT_FOUND, "no such route");
    return 0;
}

/*
 * /users through h2o: GET and HEAD are the export; a POST arrives here only as a JSON-array upload whose body the
 * front door read (upload_stream.c), with its options and places in the route data.
 */
static int on_users(h2o_handler_t *self, h2o_req_t *req)
{
    ji_worker_t *w = ji_worker_of(req->conn->ctx);
    ji_array_request_t *ar;

    (void)self;
    if (!h2o_memis(req->method.base, req->method.len, H2O_STRLIT("POST")))
        return ji_reads_handle_users(w, req);
    if ((ar = ji_bridge_route_data(req)) == NULL) {
        ji_reply_errorf(req, JI_ERR_INTERNAL, "an upload reached h2o without the front door");
        return 0;
    }
    return ji_array_mode_handle(w, req, &ar->params, &ar->admission);
}

/* ------------------------------------------------------------------ authorization */

/** The Host names a loopback listener accepts by default (DNS rebinding: a page's own name is refused). */
#define JI_LOOPBACK_HOST_NAMES "localhost,127.0.0.1,[::1]"

static bool listen_is_loopback(const ji_config_t *cfg)
{
    const char *h = cfg->listen_host;
    return strcmp(h, "localhost") == 0 || strncmp(h, "127.", 4) == 0 || strcmp(h, "::1") == 0 ||
           strcmp(h, "[::1]") == 0;
}

static int load_token(ji_server_t *server, const char *path)
{
    char buf[1024];
    FILE *f = fopen(path, "r");
    size_t n;

    if (f == NULL) {
        fprintf(stderr, "--token-file %s: %s\n", path, strerror(errno));
        return -1;
    }
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    buf[strcspn(buf, "\r\n")] = '\0';
    n = strlen(buf);
    if (n < JI_MIN_TOKEN_BYTES) {
        fprintf(stderr,
                "--token-file %s: the token (the first line) has %zu bytes, fewer than JI_MIN_TOKEN_BYTES "
                "(" JI_STR(JI_MIN_TOKEN_BYTES) "): a short token can be guessed\n",
                path, n);
        return -1;
    }
    server->token = strdup(buf);
    server->policy.token = server->token;
    server->policy.token_len = n;
    return server->token != NULL ? 0 : -1;
}

/* ------------------------------------------------------------------ admission */

int ji_server_admit_ingest(ji_worker_t *w, ji_error_t *err)
{
    ji_server_t *server = w->server;

    if (!atomic_load(&server->db_ready)) {
        atomic_fetch_add_explicit(&w->stats.refused_db, 1, memory_order_relaxed);
        return ji_error_set(err, JI_ERR_DB, 0, NULL, "database unavailable: not reachable since start-up");
    }
    if (atomic_fetch_add(&server->ingests_running, 1) >= server->config->max_ingests) {
        atomic_fetch_sub(&server->ingests_running, 1);
        atomic_fetch_add_explicit(&w->stats.limit_ingests, 1, memory_order_relaxed);
        return ji_error_set(err, JI_ERR_BUSY, 0, NULL, "too many uploads in progress (--max-ingests %u): retry later",
                            server->config->max_ingests);
    }
    return 0;
}

void ji_server_release_ingest(ji_worker_t *w)
{
    atomic_fetch_sub(&w->server->ingests_running, 1);
}

/* ------------------------------------------------------------------ connections and descriptors */

/*
 * Raises the soft open-files limit to the hard one, as Go's runtime and nginx's worker_rlimit_nofile do: the soft
 * limit (often 1024) is a default for programs that use select(), which this one does not, and each connection
 * costs a descriptor. Writes what happened to `note` for the start-up line; returns the limit now in force.
 */
static unsigned long raise_nofile(char *note, size_t size)
{
    struct rlimit rl;
    rlim_t was, want;

    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) {
        snprintf(note, size, "open files: unknown (%s)", strerror(errno));
        return JI_MIN_DEFAULT_MAX_CONNECTIONS;
    }
    was = rl.rlim_cur;
    want = rl.rlim_max == RLIM_INFINITY ? JI_NOFILE_UNLIMITED_CAP : rl.rlim_max;
    if (was != RLIM_INFINITY && was >= want) {
        snprintf(note, size, "open files %llu", (unsigned long long)was);
        return (unsigned long)was;
    }
    rl.rlim_cur = want;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
        snprintf(note, size, "open files %llu (could not raise it to %llu: %s)", (unsigned long long)was,
                 (unsigned long long)want, strerror(errno));
        return (unsigned long)was;
    }
    snprintf(note, size, "open files %llu (raised from %llu)", (unsigned long long)want, (unsigned long long)was);
    return (unsigned long)want;
}

/** The default of --max-connections for `nofile` descriptors: what is left after files and database connections. */
static unsigned default_max_connections(const ji_config_t *cfg, unsigned long nofile)
{
    unsigned long reserved = JI_FD_RESERVE_FIXED + (unsigned long)JI_FD_RESERVE_PER_THREAD * cfg->threads +
                             (unsigned long)JI_FD_RESERVE_PER_INGEST * cfg->max_ingests;
    unsigned long n = nofile > reserved ? (nofile - reserved) / 2 : 0;

    if (n < JI_MIN_DEFAULT_MAX_CONNECTIONS)
        n = JI_MIN_DEFAULT_MAX_CONNECTIONS;
    return n > JI_MAX_FLAG_VALUE ? JI_MAX_FLAG_VALUE : (unsigned)n;
}

static void init_connection_cap(ji_server_t *server, const ji_config_t *cfg)
{
    ji_error_t err;
    ji_text_t body = {0};

    server->max_connections =
        cfg->max_connections != 0 ? cfg->max_connections : default_max_connections(cfg, server->nofile);
    if (cfg->max_connections != 0 && cfg->max_connections >= server->nofile)
        fprintf(stderr,
                "--max-connections %u is not below the open-files limit (%lu): past the limit accepting pauses "
                "(JI_ACCEPT_PAUSE_MS) instead of answering 503\n",
                cfg->max_connections, server->nofile);
    ji_error_set(&err, JI_ERR_BUSY, 0, NULL, "too many connections open (--max-connections %u): retry later",
                 server->max_connections);
    ji_response_error_json(&body, &err);
    snprintf(server->connections_refusal, sizeof(server->connections_refusal), "%.*s", body.failed ? 0 : (int)body.len,
             body.base != NULL ? body.base : "");
    ji_text_free(&body);
}

/* ------------------------------------------------------------------ workers */

static int open_listener(const ji_config_t *cfg)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *res, *ai;
    char host[256], port[8];
    int fd = -1, on = 1, r;

    snprintf(host, sizeof(host), "%s", cfg->listen_host);
    if (host[0] == '[') { /* [::1] */
        memmove(host, host + 1, strlen(host));
        host[strcspn(host, "]")] = '\0';
    }
    snprintf(port, sizeof(port), "%u", cfg->listen_port);
    if ((r = getaddrinfo(host, port, &hints, &res)) != 0) {
        fprintf(stderr, "--listen %s:%s: %s\n", cfg->listen_host, port, gai_strerror(r));
        return -1;
    }
    for (ai = res; ai != NULL; ai = ai->ai_next) {
        if ((fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, 0)) == -1)
            continue;
        /* no SO_REUSEPORT: a second process on the same address fails here instead of splitting the traffic */
        if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) == 0 &&
            bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, SOMAXCONN) == 0)
            break;
        close(fd);
        fd = -1;
    }
    if (fd == -1)
        fprintf(stderr, "cannot listen on %s:%s: %s\n", cfg->listen_host, port, strerror(errno));
    freeaddrinfo(res);
    return fd;
}

static void on_accept(h2o_socket_t *listener, const char *err);

static void on_accept_pause_end(h2o_timeout_entry_t *entry)
{
    ji_worker_t *w = JI_CONTAINER_OF(entry, ji_worker_t, accept_pause);

    if (w->listener != NULL)
        h2o_socket_read_start(w->listener, on_accept);
}

/** The deferral ran out: a connection still waiting (the lighter loops are busy) is taken by this loop. */
static void on_accept_defer_end(h2o_timeout_entry_t *entry)
{
    ji_worker_t *w = JI_CONTAINER_OF(entry, ji_worker_t, accept_defer);

    if (w->listener == NULL || h2o_timeout_is_linked(&w->accept_pause))
        return;
    h2o_socket_read_start(w->listener, on_accept);
    /* one attempt whatever the load (nothing waiting: the next connection is balanced again) */
    w->accept_forced = true;
    on_accept(w->listener, NULL);
    w->accept_forced = false;
}

/** Another loop holds fewer client connections than this one (it should take the next connection). */
static bool another_loop_is_lighter(const ji_worker_t *w)
{
    const ji_server_t *server = w->server;
    uint64_t mine = atomic_load_explicit(&w->stats.connections_open, memory_order_relaxed);

    for (unsigned i = 0; i < server->nworkers; i++) {
        const ji_worker_t *other = &server->workers[i];
        if (other != w && atomic_load_explicit(&other->stats.connections_open, memory_order_relaxed) < mine)
            return true;
    }
    return false;
}

/*
 * Every worker's loop watches the one listening socket; a loop takes a connection unless another loop holds
 * fewer connections: then it stops watching for JI_ACCEPT_DEFER_MS and leaves the connection to that loop, which is
 * woken too when it waits in epoll (every loop watching the socket is woken). If the connection is still there
 * when the deferral runs out (the lighter loop is busy), this loop takes it; one of its own connections closing
 * makes it look again before that (ji_server_connection_closed). So two big uploads that arrive
 * together go to two loops (not both to the first one awake), kept-alive connections spread evenly, and a busy
 * loop never holds up a connection for more than JI_ACCEPT_DEFER_MS. Out of file descriptors (EMFILE, ENFILE) the socket
 * stays readable: stop accepting for JI_ACCEPT_PAUSE_MS instead of spinning.
 */
static void on_accept(h2o_socket_t *listener, const char *err)
{
    ji_worker_t *w = listener->data;
    h2o_socket_t *sock;

    if (err != NULL)
        return;
    for (unsigned n = 0; n < JI_ACCEPT_BATCH; n++) {
        if (!w->accept_forced && another_loop_is_lighter(w)) {
            h2o_socket_read_stop(listener);
            if (!h2o_timeout_is_linked(&w->accept_defer))
                h2o_timeout_link(w->ctx.loop, &w->accept_defer_timeout, &w->accept_defer);
            return;
        }
        w->accept_forced = false;
        if (h2o_timeout_is_linked(&w->accept_defer))
            h2o_timeout_unlink(&w->accept_defer); /* taking connections again: the deferral is over */
        errno = 0;
        if ((sock = h2o_evloop_socket_accept(listener)) == NULL) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                atomic_fetch_add_explicit(&w->stats.accept_paused, 1, memory_order_relaxed);
                h2o_socket_read_stop(listener);
                h2o_timeout_link(w->ctx.loop, &w->accept_pause_timeout, &w->accept_pause);
            }
            return;
        }
        ji_front_door_accept(w, sock);
    }
}

/*
 * A connection of this loop closed. A loop that stopped watching the listening socket because another held fewer
 * connections watches again at once (it may be the lighter one now) instead of waiting out JI_ACCEPT_DEFER_MS; if it
 * still holds more, on_accept stops again under the same deadline, so no connection waits longer than before.
 */
void ji_server_connection_closed(ji_worker_t *w)
{
    if (w->listener != NULL && h2o_timeout_is_linked(&w->accept_defer) && !h2o_timeout_is_linked(&w->accept_pause))
        h2o_socket_read_start(w->listener, on_accept);
}

static int worker_init(ji_worker_t *w, ji_server_t *server, int listen_fd)
{
    size_t max_idle;

    memset(w, 0, sizeof(*w));
    w->server = server;
    /* busy until this loop's own first drain pass says otherwise: a loop that drains first must not close its idle
     * connections while another still runs a request it has not reported yet */
    atomic_init(&w->draining_busy, true);
    h2o_linklist_init_anchor(&w->conns);
    h2o_linklist_init_anchor(&w->idle_conns);
    h2o_context_init(&w->ctx, h2o_evloop_create(), &server->h2o_config);
    w->accept_ctx.ctx = &w->ctx;
    w->accept_ctx.hosts = server->h2o_config.hosts;
    h2o_timeout_init(w->ctx.loop, &w->feed_flush_timeout, JI_FEED_FLUSH_MS);
    h2o_timeout_init(w->ctx.loop, &w->idle_timeout, server->config->idle_timeout_ms);
    /* never longer than --idle-timeout: that one says how long anything may wait */
    h2o_timeout_init(w->ctx.loop, &w->keepalive_timeout,
                     server->config->keepalive_timeout_ms < server->config->idle_timeout_ms
                         ? server->config->keepalive_timeout_ms
                         : server->config->idle_timeout_ms);
    h2o_timeout_init(w->ctx.loop, &w->linger_timeout, JI_LINGER_MS);
    h2o_timeout_init(w->ctx.loop, &w->yield_timeout, JI_YIELD_MS);
    h2o_timeout_init(w->ctx.loop, &w->accept_pause_timeout, JI_ACCEPT_PAUSE_MS);
    w->accept_pause.cb = on_accept_pause_end;
    h2o_timeout_init(w->ctx.loop, &w->accept_defer_timeout, JI_ACCEPT_DEFER_MS);
    w->accept_defer.cb = on_accept_defer_end;
    /* idle connections up to the worker's share of the upload places: no new server process per upload */
    max_idle = (server->config->max_ingests + server->config->threads - 1) / server->config->threads;
    if ((w->pg_pool = ji_pg_pool_new(w->ctx.loop, server->config->db,
                                     max_idle > JI_PG_KEEP_IDLE ? max_idle : JI_PG_KEEP_IDLE)) == NULL) {
        fprintf(stderr, "out of memory\n");
        return -1;
    }
    w->ingest_env = (ji_ingest_env_t){
        .loop = w->ctx.loop,
        .zero_timeout = &w->ctx.zero_timeout,
        .pg_pool = w->pg_pool,
        .images = &server->images,
        .max_record_bytes = server->config->max_record_bytes,
        .idempotency_ttl_s = server->config->idempotency_ttl_s,
        .max_upload_bytes = server->config->max_upload_bytes,
        .upload_expiry_s = server->config->upload_expiry_s,
        .stats = &w->ingest_stats,
    };
    w->listener = h2o_evloop_socket_create(w->ctx.loop, listen_fd, H2O_SOCKET_FLAG_DONT_READ);
    w->listener->data = w;
    h2o_socket_read_start(w->listener, on_accept);
    return 0;
}

/*
 * Runs the loop until a stop was requested and every connection here is closed. On the stop request the
 * listener closes (new connections go to another instance), connections idle between requests close at once,
 * and the others close after their answer. When --shutdown-grace runs out, uploads still receiving their body
 * are answered 503; JI_STOP_ANSWER_MS later the loop ends whatever is left (unfinished ingests roll back).
 */
static void *worker_run(void *arg)
{
    ji_worker_t *w = arg;
    uint64_t grace_end = 0, hard_end = 0;

    for (;;) {
        /* epoll_wait fails with EINTR after the process was stopped and continued (SIGSTOP/SIGCONT, a debugger, a
         * frozen cgroup), even with no signal handler: that is no reason to leave the loop, whose requests (and
         * their database transactions) would hang with nobody to run them. */
        if (h2o_evloop_run(w->ctx.loop, JI_STOP_POLL_MS) != 0 && errno != EINTR) {
            fprintf(stderr, "event loop failed: %s\n", strerror(errno));
            break;
        }
        ji_front_door_shed(w);
        if (w == &w->server->workers[0])
            ji_uploads_sweep_tick(w);
        if (!atomic_load(&w->server->stopping))
            continue;
        if (w->listener != NULL) {
            if (h2o_timeout_is_linked(&w->accept_defer))
                h2o_timeout_unlink(&w->accept_defer);
            h2o_socket_read_stop(w->listener);
            h2o_socket_close(w->listener);
            w->listener = NULL;
            grace_end = h2o_now(w->ctx.loop) + (uint64_t)w->server->config->shutdown_grace_s * 1000;
        }
        if (hard_end == 0 && h2o_now(w->ctx.loop) >= grace_end) {
            ji_front_door_drain(w, true);
            hard_end = h2o_now(w->ctx.loop) + JI_STOP_ANSWER_MS;
        } else {
            ji_front_door_drain(w, false);
        }
        /* reads start no database work once stopping; wait for theirs too (ji_pg_pool_free wants none busy), and for
         * interrupted appends still staging what their gone client sent */
        if (h2o_linklist_is_empty(&w->conns) && ji_pg_pool_busy(w->pg_pool) == 0 && w->ingest_env.orphans == 0)
            break;
        if (hard_end != 0 && h2o_now(w->ctx.loop) >= hard_end) {
            fprintf(stderr, "stopping with %llu uploads still in flight (their files are removed at next start)\n",
                    (unsigned long long)atomic_load(&w->ingest_stats.ingests_in_flight));
            break;
        }
    }
    return NULL;
}

/** The signals the signal thread waits for; every other thread blocks them. */
static void handled_signals(sigset_t *set)
{
    sigemptyset(set);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGHUP);
}

/*
 * SIGTERM, SIGINT: stop (see worker_run). SIGHUP: reopen the access log (rotation), here, while the loops write:
 * access_log.h says why that is safe. Runs until ji_server_run ends it (signals_done, then a SIGTERM to it).
 */
static void *signal_run(void *arg)
{
    ji_server_t *server = arg;
    sigset_t set;
    ji_error_t err;
    int sig;

    handled_signals(&set);
    while (sigwait(&set, &sig) == 0 && !atomic_load(&server->signals_done)) {
        if (sig == SIGHUP) {
            if (ji_access_log_reopen(&server->access_log, &err) != 0)
                fprintf(stderr, "SIGHUP: %s (lines go on to the old file)\n", err.message);
            continue;
        }
        if (!atomic_exchange(&server->stopping, true))
            fprintf(stderr, "got %s: no new connections, finishing requests in flight\n",
                    sig == SIGTERM ? "SIGTERM" : "SIGINT");
    }
    return NULL;
}

/* ------------------------------------------------------------------ start-up */

/*
 * gc's verdict on a journal: its batch committed (1: keep the files); the resumable upload of that key is still open
 * (-1: leave it alone, its staged rows name those files); else 0 (remove them). -1 when the database cannot tell.
 */
static int batch_committed(void *ctx, const char *key)
{
    const char *values[1] = {key};
    PGresult *res;
    int verdict = ji_schema_batch_committed(ctx, key);

    if (verdict != 0)
        return verdict;
    res = PQexecParams(ctx, "SELECT 1 FROM uploads WHERE batch_key = $1 AND state = 'open'", 1, NULL, values, NULL,
                       NULL, 0);
    verdict = PQresultStatus(res) != PGRES_TUPLES_OK ? -1 : PQntuples(res) > 0 ? -1 : 0;
    PQclear(res);
    return verdict;
}

/**
 * Blocking database work, before the loops run or on the start-up thread (never on a loop): schema, then the
 * leftovers of crashed requests. `quiet` drops the connection error message (retries).
 */
static int prepare_storage(ji_server_t *server, bool quiet)
{
    const ji_config_t *cfg = server->config;
    PGconn *conn = PQconnectdb(cfg->db);
    ji_error_t err;
    uint64_t removed = 0, expired = 0;
    int ret = -1;

    if (PQstatus(conn) != CONNECTION_OK) {
        if (!quiet)
            fprintf(stderr, "cannot connect to the database: %s", PQerrorMessage(conn));
        goto Exit;
    }
    if (ji_schema_ensure(conn, &err) != 0) {
        fprintf(stderr, "cannot create the schema: %s\n", err.message);
        goto Exit;
    }
    if (ji_image_store_gc(&server->images, batch_committed, conn, &removed, &err) != 0) {
        fprintf(stderr, "cannot clean the images directory: %s\n", err.message);
        goto Exit;
    }
    if (removed != 0)
        fprintf(stderr, "removed %llu image files left by interrupted requests\n", (unsigned long long)removed);
    if (ji_schema_expire_idempotency_keys(conn, cfg->idempotency_ttl_s, NULL, &err) != 0)
        fprintf(stderr, "cannot clear expired Idempotency-Keys: %s\n", err.message);
    if (ji_uploads_expire_blocking(conn, &server->images, &expired, &err) != 0)
        fprintf(stderr, "cannot discard expired uploads: %s\n", err.message);
    else if (expired != 0)
        fprintf(stderr, "discarded %llu expired resumable uploads\n", (unsigned long long)expired);
    ret = 0;
Exit:
    PQfinish(conn);
    return ret;
}

/** Start-up without a database: keeps trying in the background; ingests answer 503 until it worked. */
static void *storage_retry_run(void *arg)
{
    ji_server_t *server = arg;

    while (!atomic_load(&server->stopping)) {
        sleep(JI_DB_RETRY_SECONDS);
        if (prepare_storage(server, true) == 0) {
            fprintf(stderr, "database reachable: schema ready, accepting uploads\n");
            atomic_store(&server->db_ready, true);
            break;
        }
    }
    return NULL;
}

static void configure_h2o(ji_server_t *server)
{
    h2o_globalconf_t *conf = &server->h2o_config;
    h2o_hostconf_t *host;

    h2o_config_init(conf);
    /* h2o never reads a connection (the front door does, h2o_bridge.c hands it requests): no h2o timeouts or
     * body limits apply */
    host = h2o_config_register_host(conf, h2o_iovec_init(H2O_STRLIT("default")), 65535);
    ji_health_register(host);
    ji_metrics_register(host);
    ji_reads_register(host);
    ji_batches_register(host);
    ji_uploads_register(host);
    register_handler(host, "/users", on_users);
    register_handler(host, "/", on_not_found);
}

/** Frees a stopped worker: its connections (unfinished ingests abort), pool, timers, context and loop. */
static void worker_dispose(ji_worker_t *w)
{
    h2o_loop_t *loop = w->ctx.loop;

    if (w->listener != NULL) {
        h2o_socket_close(w->listener);
        w->listener = NULL;
    }
    ji_front_door_close_all(w);
    ji_uploads_sweep_dispose(&w->upload_sweeper);
    h2o_evloop_run(loop, 0); /* lets the loop release what the closes above deferred */
    if (w->pg_pool != NULL)
        ji_pg_pool_free(w->pg_pool);
    h2o_evloop_run(loop, 0);
    h2o_timeout_dispose(loop, &w->feed_flush_timeout);
    h2o_timeout_dispose(loop, &w->idle_timeout);
    h2o_timeout_dispose(loop, &w->keepalive_timeout);
    h2o_timeout_dispose(loop, &w->linger_timeout);
    h2o_timeout_dispose(loop, &w->yield_timeout);
    if (h2o_timeout_is_linked(&w->accept_defer))
        h2o_timeout_unlink(&w->accept_defer);
    h2o_timeout_dispose(loop, &w->accept_defer_timeout);
    if (h2o_timeout_is_linked(&w->accept_pause))
        h2o_timeout_unlink(&w->accept_pause);
    h2o_timeout_dispose(loop, &w->accept_pause_timeout);
    h2o_context_dispose(&w->ctx);
    h2o_evloop_destroy(loop);
}

int ji_server_run(const ji_config_t *config)
{
    ji_server_t server = {.config = config};
    ji_worker_t *workers = NULL;
    pthread_t *threads = NULL, signal_thread, retry_thread;
    bool retrying = false, signals = false;
    unsigned i, started = 0, initialized = 0;
    sigset_t stop_signals;
    ji_error_t err;
    char nofile_note[160];
    int ret = 1, listen_fd = -1;

    signal(SIGPIPE, SIG_IGN);
    server.nofile = raise_nofile(nofile_note, sizeof(nofile_note));
    init_connection_cap(&server, config);
    if (config->token_file != NULL && load_token(&server, config->token_file) != 0)
        return 1;
    if (config->trusted_proxies != NULL &&
        ji_trusted_proxies_parse(&server.trusted_proxies, config->trusted_proxies, &err) != 0) {
        fprintf(stderr, "%s\n", err.message);
        free(server.token);
        return 1;
    }
    server.policy.allowed_origins = config->allowed_origins;
    server.policy.allowed_hosts = config->allowed_hosts != NULL ? config->allowed_hosts
                                  : listen_is_loopback(config)  ? JI_LOOPBACK_HOST_NAMES
                                                                : NULL;
    if (ji_client_slots_init(&server.client_slots, 2 * (size_t)config->max_ingests + 16, config->max_client_ingests) !=
        0) {
        fprintf(stderr, "out of memory\n");
        free(server.token);
        return 1;
    }
    if (ji_image_store_open(&server.images, config->images_dir, config->fsync, &err) != 0) {
        fprintf(stderr, "images directory %s: %s\n", config->images_dir, err.message);
        ji_client_slots_dispose(&server.client_slots);
        free(server.token);
        return 1;
    }
    if (ji_access_log_open(&server.access_log, config->access_log, &err) != 0) {
        fprintf(stderr, "%s\n", err.message);
        ji_image_store_close(&server.images);
        ji_client_slots_dispose(&server.client_slots);
        free(server.token);
        return 1;
    }
    configure_h2o(&server);
    ji_budget_init(&server.array_budget, config->array_memory_budget);
    ji_budget_init(&server.memory_budget, config->max_memory);

    /* every thread blocks the stop and reopen signals; one thread waits for them */
    handled_signals(&stop_signals);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);
    if (pthread_create(&signal_thread, NULL, signal_run, &server) != 0)
        goto Exit;
    signals = true;

    if (prepare_storage(&server, false) == 0) {
        atomic_store(&server.db_ready, true);
    } else {
        fprintf(stderr, "serving anyway: uploads get 503 until the database is reachable\n");
        if (pthread_create(&retry_thread, NULL, storage_retry_run, &server) == 0)
            retrying = true;
    }

    workers = calloc(config->threads, sizeof(*workers));
    threads = calloc(config->threads, sizeof(*threads));
    if (workers == NULL || threads == NULL)
        goto Exit;
    server.workers = workers;
    server.nworkers = config->threads;
    if ((listen_fd = open_listener(config)) == -1)
        goto Exit;
    for (i = 0; i < config->threads; i++) {
        int fd = fcntl(listen_fd, F_DUPFD_CLOEXEC, 0); /* each loop's socket object closes its own descriptor */
        if (fd == -1 || worker_init(&workers[i], &server, fd) != 0)
            goto Exit;
        initialized++;
    }
    fprintf(stderr, "jsonl-ingest listening on %s:%u (%u threads, images in %s, fsync %s, %s, max connections %u)\n",
            config->listen_host, config->listen_port, config->threads, config->images_dir, config->fsync ? "on" : "off",
            nofile_note, server.max_connections);
    for (i = 1; i < config->threads; i++) {
        if (pthread_create(&threads[i], NULL, worker_run, &workers[i]) != 0) {
            fprintf(stderr, "cannot start thread %u\n", i);
            for (unsigned j = i; j < config->threads; j++)
                atomic_store(&workers[j].draining_busy, false); /* these loops never run */
            atomic_store(&server.stopping, true);
            break;
        }
        started++;
    }
    worker_run(&workers[0]);
    for (i = 1; i <= started; i++)
        pthread_join(threads[i], NULL);
    ret = 0;
    fprintf(stderr, "stopped\n");
Exit:
    atomic_store(&server.stopping, true);
    if (retrying)
        pthread_join(retry_thread, NULL);
    for (i = 0; i < initialized; i++)
        worker_dispose(&workers[i]);
    if (listen_fd != -1)
        close(listen_fd);
    if (signals) { /* it may be reopening the log: end it before the log closes */
        atomic_store(&server.signals_done, true);
        pthread_kill(signal_thread, SIGTERM);
        pthread_join(signal_thread, NULL);
    }
    ji_access_log_close(&server.access_log);
    free(threads);
    free(workers);
    h2o_config_dispose(&server.h2o_config);
    ji_image_store_close(&server.images);
    ji_client_slots_dispose(&server.client_slots);
    free(server.token);
    return ret;
}

int ji_server_gc(const ji_config_t *config)
{
    ji_server_t server = {.config = config};
    ji_error_t err;
    int ret;

    if (ji_image_store_open(&server.images, config->images_dir, config->fsync, &err) != 0) {
        fprintf(stderr, "images directory %s: %s\n", config->images_dir, err.message);
        return 1;
    }
    ret = prepare_storage(&server, false) == 0 ? 0 : 1;
    ji_image_store_close(&server.images);
    return ret;
}
