/*
 * server.c — process start-up and the workers: opens the images directory,
 * creates the schema and removes what crashed requests left (blocking, before
 * any loop runs), registers the h2o handlers, then runs one event loop per
 * thread, each with its own listening socket (SO_REUSEPORT), h2o context and
 * database pool.
 */
#include "server.h"

#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "array_mode.h"
#include "front_door.h"
#include "reads.h"
#include "ingest.h"
#include "request_options.h"
#include "response.h"
#include "schema.h"

/** Idle database connections kept per worker. */
#define JI_PG_MAX_IDLE 4
/** A part-filled input buffer is fed after this long without more bytes. */
#define JI_FEED_FLUSH_MS 5
/** A request head or body that receives nothing for this long is cut. */
#define JI_IDLE_TIMEOUT_MS 30000
/** How long an error answer waits for the client to stop sending before the connection closes. */
#define JI_LINGER_MS 2000
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

static void send_json(h2o_req_t *req, int status, const char *reason, const char *body, size_t len)
{
    req->res.status = status;
    req->res.reason = reason;
    h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL, H2O_STRLIT("application/json"));
    h2o_send_inline(req, body, len);
}

static void send_error(h2o_req_t *req, int status, const char *reason, const char *message)
{
    ji_error_t err;
    ji_text_t t = {0};

    ji_error_set(&err, JI_ERR_INTERNAL, 0, NULL, "%s", message);
    ji_response_error_json(&t, &err);
    send_json(req, status, reason, t.base != NULL ? t.base : "{}\n", t.base != NULL ? t.len : 3);
    ji_text_free(&t);
}

static int on_healthz(h2o_handler_t *self, h2o_req_t *req)
{
    (void)self;
    if (!h2o_memis(req->method.base, req->method.len, H2O_STRLIT("GET")) &&
        !h2o_memis(req->method.base, req->method.len, H2O_STRLIT("HEAD")))
        return -1;
    send_json(req, 200, "OK", H2O_STRLIT("{\"status\":\"ok\"}\n"));
    return 0;
}

static int on_not_found(h2o_handler_t *self, h2o_req_t *req)
{
    (void)self;
    send_error(req, 404, "Not Found", "no such route");
    return 0;
}

/*
 * POST /users on a connection that h2o already owns (a keep-alive connection whose first request went to an
 * h2o route): h2o has buffered the body, which is fed to the same ingest as the streaming path.
 */
typedef struct st_buffered_ingest_t {
    h2o_req_t *req;
    ji_ingest_t *ingest;
    size_t offset;
} buffered_ingest_t;

static void buffered_resume(ji_ingest_t *in, void *owner)
{
    buffered_ingest_t *b = owner;
    size_t len = b->req->entity.len;

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
    if (retry_after != 0) {
        char *v = h2o_mem_alloc_pool(&req->pool, 16);
        int n = snprintf(v, 16, "%u", retry_after);
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_RETRY_AFTER, NULL, v, (size_t)n);
    }
    send_json(req, status, status == 200 ? "OK" : "Error", copy.base, copy.len);
}

static const ji_ingest_callbacks_t buffered_callbacks = {buffered_resume, buffered_done};

static void buffered_dispose(void *p)
{
    buffered_ingest_t *b = p;
    if (b->ingest != NULL)
        ji_ingest_free(b->ingest); /* the client went away: abort */
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
    if (req->query_at != SIZE_MAX) {
        const char *q = req->path.base + req->query_at + 1;
        if (ji_request_options_parse_query(&options, q, req->path.len - req->query_at - 1, &err) != 0) {
            send_error(req, ji_error_http_status(err.kind), "Error", err.message);
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
    if ((b->ingest = ji_ingest_new(w, &params, &buffered_callbacks, b)) == NULL)
        send_error(req, 500, "Internal Server Error", "out of memory");
    return 0;
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
    h2o_context_init(&w->ctx, h2o_evloop_create(), &server->h2o_config);
    w->accept_ctx.ctx = &w->ctx;
    w->accept_ctx.hosts = server->h2o_config.hosts;
    h2o_timeout_init(w->ctx.loop, &w->feed_flush_timeout, JI_FEED_FLUSH_MS);
    h2o_timeout_init(w->ctx.loop, &w->idle_timeout, JI_IDLE_TIMEOUT_MS);
    h2o_timeout_init(w->ctx.loop, &w->linger_timeout, JI_LINGER_MS);
    if ((w->pg_pool = ji_pg_pool_new(w->ctx.loop, server->config->db, JI_PG_MAX_IDLE)) == NULL) {
        fprintf(stderr, "out of memory\n");
        return -1;
    }
    w->listener = h2o_evloop_socket_create(w->ctx.loop, listen_fd, H2O_SOCKET_FLAG_DONT_READ);
    w->listener->data = w;
    h2o_socket_read_start(w->listener, on_accept);
    return 0;
}

static void *worker_run(void *arg)
{
    ji_worker_t *w = arg;

    while (h2o_evloop_run(w->ctx.loop, INT32_MAX) == 0)
        ;
    return NULL;
}

/* ------------------------------------------------------------------ start-up */

static int batch_committed(void *ctx, const char *key)
{
    return ji_schema_batch_committed(ctx, key);
}

/** Blocking database work before any loop runs: schema, then leftovers of crashed requests. */
static int prepare_storage(ji_server_t *server)
{
    const ji_config_t *cfg = server->config;
    PGconn *conn = PQconnectdb(cfg->db);
    ji_error_t err;
    uint64_t removed = 0;
    int ret = -1;

    if (PQstatus(conn) != CONNECTION_OK) {
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

static void configure_h2o(ji_server_t *server)
{
    h2o_globalconf_t *conf = &server->h2o_config;
    h2o_hostconf_t *host;

    h2o_config_init(conf);
    conf->http1.req_timeout = JI_H2O_REQUEST_TIMEOUT_MS;
    conf->max_request_entity_size = server->config->max_array_bytes;
    host = h2o_config_register_host(conf, h2o_iovec_init(H2O_STRLIT("default")), 65535);
    register_handler(host, "/healthz", on_healthz);
    ji_reads_register(host);
    register_handler(host, "/users", on_users);
    register_handler(host, "/", on_not_found);
}

int ji_server_run(const ji_config_t *config)
{
    ji_server_t server = {.config = config};
    ji_worker_t *workers = NULL;
    pthread_t *threads = NULL;
    ji_error_t err;
    unsigned i;
    int ret = 1;

    signal(SIGPIPE, SIG_IGN);
    if (ji_image_store_open(&server.images, config->images_dir, config->fsync, &err) != 0) {
        fprintf(stderr, "images directory %s: %s\n", config->images_dir, err.message);
        return 1;
    }
    if (prepare_storage(&server) != 0)
        goto Exit;
    configure_h2o(&server);

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
    }
    fprintf(stderr, "jsonl-ingest listening on %s:%u (%u threads, images in %s, fsync %s)\n", config->listen_host,
            config->listen_port, config->threads, config->images_dir, config->fsync ? "on" : "off");
    for (i = 1; i < config->threads; i++)
        if (pthread_create(&threads[i], NULL, worker_run, &workers[i]) != 0) {
            fprintf(stderr, "cannot start thread %u\n", i);
            goto Exit;
        }
    worker_run(&workers[0]);
    ret = 0;
Exit:
    /* the loops run until the process ends; only a failed start gets here */
    free(threads);
    free(workers);
    ji_image_store_close(&server.images);
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
    ret = prepare_storage(&server) == 0 ? 0 : 1;
    ji_image_store_close(&server.images);
    return ret;
}
