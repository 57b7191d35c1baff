/*
 * server.c — process start-up and the workers: opens the images directory,
 * creates the schema and removes what crashed requests left (blocking, before
 * any loop runs), registers the h2o handlers, then runs one event loop per
 * thread, each with its own listening socket (SO_REUSEPORT), h2o context and
 * database pool.
 */
#include "server.h"

#include <errno.h>
#include <openssl/crypto.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "array_mode.h"
#include "front_door.h"
#include "gunzip.h"
#include "reads.h"
#include "health.h"
#include "metrics.h"
#include "ingest.h"
#include "request_options.h"
#include "handler_reply.h"
#include "json_text.h"
#include "schema.h"

/** h2o's deadline for a whole buffered request (head and body) on its own routes. */
#define JI_H2O_REQUEST_TIMEOUT_MS (10 * 60 * 1000)

/* ------------------------------------------------------------------ h2o handlers */

static h2o_pathconf_t *register_handler(h2o_hostconf_t *host, const char *path, int (*on_req)(h2o_handler_t *, h2o_req_t *))
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
 * POST /users on a connection that h2o already owns (a keep-alive connection whose first request went to an
 * h2o route): h2o has buffered the body, which is fed to the same ingest as the streaming path.
 */
typedef struct st_buffered_ingest_t {
    h2o_req_t *req;
    ji_ingest_t *ingest;
    size_t offset;       /**< entity bytes used */
    ji_gunzip_t *gunzip; /**< Content-Encoding: gzip */
    char *inflated;      /**< JI_FEED_MIN_BYTES of inflated body not yet fed */
    size_t inflated_off, inflated_len;
    ji_worker_t *worker;
    bool admitted; /**< holds an upload place (ji_server_admit_ingest) */
} buffered_ingest_t;

/** Inflates and feeds a gzip entity piece by piece (memory stays bounded even here). */
static void buffered_resume_gzip(buffered_ingest_t *b, ji_ingest_t *in)
{
    size_t len = b->req->entity.len, used, out, taken;
    ji_error_t err;

    for (;;) {
        if (b->inflated_len != 0) {
            taken = ji_ingest_feed(in, b->inflated + b->inflated_off, b->inflated_len);
            b->inflated_off += taken;
            b->inflated_len -= taken;
            if (b->inflated_len != 0)
                return; /* full: resume comes again */
        }
        if (ji_gunzip_finished(b->gunzip)) {
            if (b->offset == len) {
                ji_ingest_end(in);
                return;
            }
            ji_error_set(&err, JI_ERR_MALFORMED, 0, NULL, "data after the end of the gzip body");
            ji_ingest_fail(in, &err);
            return;
        }
        if (b->offset == len) {
            ji_error_set(&err, JI_ERR_MALFORMED, 0, NULL, "corrupt gzip body: truncated");
            ji_ingest_fail(in, &err);
            return;
        }
        if (ji_gunzip_run(b->gunzip, b->req->entity.base + b->offset, len - b->offset, &used, b->inflated,
                          JI_FEED_MIN_BYTES, &out, &err) != 0) {
            ji_ingest_fail(in, &err);
            return;
        }
        b->offset += used;
        b->inflated_off = 0;
        b->inflated_len = out;
    }
}

static void buffered_resume(ji_ingest_t *in, void *owner)
{
    buffered_ingest_t *b = owner;
    size_t len = b->req->entity.len;

    if (b->gunzip != NULL) {
        buffered_resume_gzip(b, in);
        return;
    }
    b->offset += ji_ingest_feed(in, b->req->entity.base + b->offset, len - b->offset);
    if (b->offset == len)
        ji_ingest_end(in);
}

static void buffered_done(ji_ingest_t *in, void *owner, int status, const char *body, size_t len,
                          unsigned retry_after)
{
    buffered_ingest_t *b = owner;
    h2o_req_t *req = b->req;
    h2o_iovec_t copy = h2o_strdup(&req->pool, body, len);

    b->ingest = NULL;
    ji_ingest_free(in);
    if (b->admitted) {
        ji_server_release_ingest(b->worker);
        b->admitted = false;
    }
    ji_reply_json(req, status, copy.base, copy.len, retry_after);
}

static const ji_ingest_callbacks_t buffered_callbacks = {buffered_resume, buffered_done};

static void buffered_dispose(void *p)
{
    buffered_ingest_t *b = p;
    if (b->ingest != NULL)
        ji_ingest_free(b->ingest); /* the client went away: abort */
    if (b->admitted)
        ji_server_release_ingest(b->worker);
    if (b->gunzip != NULL)
        ji_gunzip_free(b->gunzip);
    free(b->inflated);
}

static int on_users(h2o_handler_t *self, h2o_req_t *req)
{
    ji_worker_t *w = ji_worker_of(req->conn->ctx);
    ji_request_options_t options;
    ji_ingest_params_t params = {0};
    buffered_ingest_t *b;
    ji_error_t err;
    ssize_t ct;

    (void)self;
    if (!h2o_memis(req->method.base, req->method.len, H2O_STRLIT("POST")))
        return ji_reads_handle_users(w, req);
    ct = h2o_find_header(&req->headers, H2O_TOKEN_AUTHORIZATION, -1);
    if (!ji_server_authorized(w->server, ct != -1 ? req->headers.entries[ct].value.base : NULL,
                              ct != -1 ? req->headers.entries[ct].value.len : 0)) {
        ji_reply_errorf(req, JI_ERR_UNAUTHORIZED, "missing or invalid bearer token");
        return 0;
    }
    if ((ct = h2o_find_header_by_str(&req->headers, H2O_STRLIT("idempotency-key"), -1)) != -1) {
        h2o_iovec_t v = req->headers.entries[ct].value;
        if (v.len == 0 || v.len > JI_MAX_IDEMPOTENCY_KEY_BYTES) {
            ji_reply_errorf(req, JI_ERR_MALFORMED, "Idempotency-Key must be 1 to " JI_STR(JI_MAX_IDEMPOTENCY_KEY_BYTES) " bytes");
            return 0;
        }
        params.idempotency_key = h2o_strdup(&req->pool, v.base, v.len).base;
    }
    if (req->query_at != SIZE_MAX) {
        const char *q = req->path.base + req->query_at + 1;
        if (ji_request_options_parse_query(&options, q, req->path.len - req->query_at - 1, &err) != 0) {
            ji_reply_error(req, &err);
            return 0;
        }
    } else {
        memset(&options, 0, sizeof(options));
    }
    params.skip_errors = options.skip_errors;
    if (options.format == JI_FORMAT_UNDECIDED) {
        ct = h2o_find_header(&req->headers, H2O_TOKEN_CONTENT_TYPE, -1);
        if (ct != -1 && ji_request_content_type_is_jsonl(req->headers.entries[ct].value.base,
                                                         req->headers.entries[ct].value.len))
            options.format = JI_FORMAT_JSONL;
        else if (ji_request_body_is_array(req->entity.base, req->entity.len) == 1)
            options.format = JI_FORMAT_ARRAY;
    }
    if (options.format == JI_FORMAT_ARRAY) {
        params.body_bytes = req->entity.len;
        return ji_array_mode_handle(w, req, &params);
    }

    /* JSON Lines on a connection h2o owns: the body is already buffered, feed it to the same ingest */
    b = h2o_mem_alloc_shared(&req->pool, sizeof(*b), buffered_dispose);
    memset(b, 0, sizeof(*b));
    b->req = req;
    if ((ct = h2o_find_header(&req->headers, H2O_TOKEN_CONTENT_ENCODING, -1)) != -1) {
        h2o_iovec_t v = req->headers.entries[ct].value;
        if (h2o_lcstris(v.base, v.len, H2O_STRLIT("gzip")) || h2o_lcstris(v.base, v.len, H2O_STRLIT("x-gzip"))) {
            if ((b->gunzip = ji_gunzip_new(w->server->config->max_inflated_bytes)) == NULL ||
                (b->inflated = malloc(JI_FEED_MIN_BYTES)) == NULL) {
                ji_reply_errorf(req, JI_ERR_INTERNAL, "out of memory");
                return 0;
            }
        } else if (!h2o_lcstris(v.base, v.len, H2O_STRLIT("identity"))) {
            ji_reply_errorf(req, JI_ERR_UNSUPPORTED, "unsupported Content-Encoding");
            return 0;
        }
    }
    b->worker = w;
    if (ji_server_admit_ingest(w, &err) != 0) {
        ji_reply_error(req, &err);
        return 0;
    }
    b->admitted = true;
    if ((b->ingest = ji_ingest_new(&w->ingest_env, &params, &buffered_callbacks, b)) == NULL)
        ji_reply_errorf(req, JI_ERR_INTERNAL, "out of memory");
    return 0;
}

/* ------------------------------------------------------------------ authorization */

bool ji_server_authorized(const ji_server_t *server, const char *value, size_t len)
{
    static const char scheme[] = "Bearer ";

    if (server->token == NULL)
        return true;
    if (value == NULL || len < sizeof(scheme) - 1 || strncasecmp(value, scheme, sizeof(scheme) - 1) != 0)
        return false;
    value += sizeof(scheme) - 1;
    len -= sizeof(scheme) - 1;
    while (len > 0 && value[0] == ' ') {
        value++;
        len--;
    }
    return len == server->token_len && CRYPTO_memcmp(value, server->token, len) == 0;
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
    if (n == 0) {
        fprintf(stderr, "--token-file %s: the first line is empty\n", path);
        return -1;
    }
    server->token = strdup(buf);
    server->token_len = n;
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
        if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) == 0 &&
            setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on, sizeof(on)) == 0 && bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 &&
            listen(fd, SOMAXCONN) == 0)
            break;
        close(fd);
        fd = -1;
    }
    if (fd == -1)
        fprintf(stderr, "cannot listen on %s:%s: %s\n", cfg->listen_host, port, strerror(errno));
    freeaddrinfo(res);
    return fd;
}

static void on_accept(h2o_socket_t *listener, const char *err)
{
    ji_worker_t *w = listener->data;
    h2o_socket_t *sock;

    if (err != NULL)
        return;
    while ((sock = h2o_evloop_socket_accept(listener)) != NULL)
        ji_front_door_accept(w, sock);
}

static int worker_init(ji_worker_t *w, ji_server_t *server, int listen_fd)
{
    memset(w, 0, sizeof(*w));
    w->server = server;
    h2o_linklist_init_anchor(&w->conns);
    h2o_context_init(&w->ctx, h2o_evloop_create(), &server->h2o_config);
    w->accept_ctx.ctx = &w->ctx;
    w->accept_ctx.hosts = server->h2o_config.hosts;
    h2o_timeout_init(w->ctx.loop, &w->feed_flush_timeout, JI_FEED_FLUSH_MS);
    h2o_timeout_init(w->ctx.loop, &w->idle_timeout, server->config->idle_timeout_ms);
    h2o_timeout_init(w->ctx.loop, &w->linger_timeout, JI_LINGER_MS);
    if ((w->pg_pool = ji_pg_pool_new(w->ctx.loop, server->config->db, JI_PG_MAX_IDLE)) == NULL) {
        fprintf(stderr, "out of memory\n");
        return -1;
    }
    w->ingest_env = (ji_ingest_env_t){
        .loop = w->ctx.loop,
        .zero_timeout = &w->ctx.zero_timeout,
        .pg_pool = w->pg_pool,
        .images = &server->images,
        .max_record_bytes = server->config->max_record_bytes,
        .stats = &w->ingest_stats,
    };
    w->listener = h2o_evloop_socket_create(w->ctx.loop, listen_fd, H2O_SOCKET_FLAG_DONT_READ);
    w->listener->data = w;
    h2o_socket_read_start(w->listener, on_accept);
    return 0;
}

/*
 * Runs the loop until a stop was requested and nothing is in flight here (or the grace period ran out). On the
 * stop request the listener closes: new connections go to no one, requests in flight finish or roll back.
 */
static void *worker_run(void *arg)
{
    ji_worker_t *w = arg;
    uint64_t stop_deadline = 0;

    for (;;) {
        if (h2o_evloop_run(w->ctx.loop, JI_STOP_POLL_MS) != 0)
            break;
        if (!atomic_load(&w->server->stopping))
            continue;
        if (w->listener != NULL) {
            h2o_socket_read_stop(w->listener);
            h2o_socket_close(w->listener);
            w->listener = NULL;
            stop_deadline = h2o_now(w->ctx.loop) + JI_STOP_GRACE_MS;
        }
        /* reads start no database work once stopping; wait for theirs too (ji_pg_pool_free wants none busy) */
        if (atomic_load_explicit(&w->ingest_stats.ingests_in_flight, memory_order_relaxed) == 0 &&
            ji_pg_pool_busy(w->pg_pool) == 0)
            break;
        if (h2o_now(w->ctx.loop) >= stop_deadline) {
            fprintf(stderr, "stopping with %llu requests still in flight (their files are removed at next start)\n",
                    (unsigned long long)atomic_load(&w->ingest_stats.ingests_in_flight));
            break;
        }
    }
    return NULL;
}

static void *signal_run(void *arg)
{
    ji_server_t *server = arg;
    sigset_t set;
    int sig;

    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    if (sigwait(&set, &sig) == 0) {
        fprintf(stderr, "got %s: no new connections, finishing requests in flight\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
        atomic_store(&server->stopping, true);
    }
    return NULL;
}

/* ------------------------------------------------------------------ start-up */

static int batch_committed(void *ctx, const char *key)
{
    return ji_schema_batch_committed(ctx, key);
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
    uint64_t removed = 0;
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
    conf->http1.req_timeout = JI_H2O_REQUEST_TIMEOUT_MS;
    conf->max_request_entity_size = server->config->max_array_bytes;
    host = h2o_config_register_host(conf, h2o_iovec_init(H2O_STRLIT("default")), 65535);
    ji_health_register(host);
    ji_metrics_register(host);
    ji_reads_register(host);
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
    h2o_evloop_run(loop, 0); /* lets the loop release what the closes above deferred */
    if (w->pg_pool != NULL)
        ji_pg_pool_free(w->pg_pool);
    h2o_evloop_run(loop, 0);
    h2o_timeout_dispose(loop, &w->feed_flush_timeout);
    h2o_timeout_dispose(loop, &w->idle_timeout);
    h2o_timeout_dispose(loop, &w->linger_timeout);
    h2o_context_dispose(&w->ctx);
    h2o_evloop_destroy(loop);
}

int ji_server_run(const ji_config_t *config)
{
    ji_server_t server = {.config = config};
    ji_worker_t *workers = NULL;
    pthread_t *threads = NULL, signal_thread, retry_thread;
    bool retrying = false;
    unsigned i, started = 0, initialized = 0;
    sigset_t stop_signals;
    ji_error_t err;
    int ret = 1;

    signal(SIGPIPE, SIG_IGN);
    if (config->token_file != NULL && load_token(&server, config->token_file) != 0)
        return 1;
    if (ji_image_store_open(&server.images, config->images_dir, config->fsync, &err) != 0) {
        fprintf(stderr, "images directory %s: %s\n", config->images_dir, err.message);
        free(server.token);
        return 1;
    }
    configure_h2o(&server);

    /* every thread blocks the stop signals; one thread waits for them */
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);
    if (pthread_create(&signal_thread, NULL, signal_run, &server) != 0)
        goto Exit;
    pthread_detach(signal_thread);

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
    for (i = 0; i < config->threads; i++) {
        int fd = open_listener(config);
        if (fd == -1 || worker_init(&workers[i], &server, fd) != 0)
            goto Exit;
        initialized++;
    }
    fprintf(stderr, "jsonl-ingest listening on %s:%u (%u threads, images in %s, fsync %s)\n", config->listen_host,
            config->listen_port, config->threads, config->images_dir, config->fsync ? "on" : "off");
    for (i = 1; i < config->threads; i++) {
        if (pthread_create(&threads[i], NULL, worker_run, &workers[i]) != 0) {
            fprintf(stderr, "cannot start thread %u\n", i);
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
    free(threads);
    free(workers);
    h2o_config_dispose(&server.h2o_config);
    ji_image_store_close(&server.images);
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
