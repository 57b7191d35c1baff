/*
 * metrics.c — owns GET /metrics: reads every worker's counters (relaxed
 * atomic loads, callable from any thread; each value is exact, the set is not
 * one instant), sums them per family and writes the Prometheus text format.
 *
 * Two passes, like h2o's status handler: gather (one visit per worker, each
 * subsystem's counters added by its own function), then write. A metric
 * family's lines must be contiguous in the format, and some families mix
 * subsystems (limits_total), hence the totals struct in between.
 */
#include "metrics.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "access_log.h"
#include "handler_reply.h"
#include "routes.h"
#include "server.h"

#define LOAD(field) atomic_load_explicit(&(field), memory_order_relaxed)

/** The process's counters, summed over the workers. */
typedef struct st_totals_t {
    /* ingests (ji_ingest_stats_t) */
    uint64_t requests, ingests_ok, ingests_failed, ingests_in_flight, records, rejected_records, images, body_bytes;
    uint64_t errors[JI_ERR_KIND_COUNT];
    uint64_t limit_record_bytes;
    uint64_t uploads_created, uploads_completed, uploads_expired, uploads_resumed;
    /* admission (ji_worker_stats_t) */
    uint64_t limit_ingests, refused_db, limit_client_ingests, limit_body_rate, connections_open, accept_paused;
    uint64_t limit_connections, connections_shed;
    /* database pools */
    uint64_t pg_idle, pg_busy;
    /* the process */
    uint64_t rss, hwm;
    /* answered requests (ji_request_durations_t), per bucket as counted: cumulative when written */
    uint64_t dur_buckets[JI_ROUTE_COUNT + 1][JI_STATUS_CLASS_COUNT][JI_REQUEST_DURATION_BUCKET_COUNT + 1];
    uint64_t dur_sum_us[JI_ROUTE_COUNT + 1][JI_STATUS_CLASS_COUNT];
    uint64_t dur_count[JI_ROUTE_COUNT + 1][JI_STATUS_CLASS_COUNT];
} totals_t;

/* ------------------------------------------------------------------ gather */

static void gather_ingest(totals_t *t, ji_ingest_stats_t *s)
{
    t->requests += LOAD(s->requests);
    t->ingests_ok += LOAD(s->ingests_ok);
    t->ingests_failed += LOAD(s->ingests_failed);
    t->ingests_in_flight += LOAD(s->ingests_in_flight);
    t->records += LOAD(s->records);
    t->rejected_records += LOAD(s->rejected_records);
    t->images += LOAD(s->images);
    t->body_bytes += LOAD(s->body_bytes);
    for (unsigned k = 0; k < JI_ERR_KIND_COUNT; k++)
        t->errors[k] += LOAD(s->errors[k]);
    t->limit_record_bytes += LOAD(s->limit_record_bytes);
    t->uploads_created += LOAD(s->uploads_created);
    t->uploads_completed += LOAD(s->uploads_completed);
    t->uploads_expired += LOAD(s->uploads_expired);
    t->uploads_resumed += LOAD(s->uploads_resumed);
}

static void gather_admission(totals_t *t, ji_worker_stats_t *s)
{
    t->limit_ingests += LOAD(s->limit_ingests);
    t->refused_db += LOAD(s->refused_db);
    t->limit_client_ingests += LOAD(s->limit_client_ingests);
    t->limit_body_rate += LOAD(s->limit_body_rate);
    t->connections_open += LOAD(s->connections_open);
    t->accept_paused += LOAD(s->accept_paused);
    t->limit_connections += LOAD(s->limit_connections);
    t->connections_shed += LOAD(s->connections_shed);
}

static void gather_durations(totals_t *t, ji_request_durations_t *d)
{
    for (unsigned r = 0; r <= JI_ROUTE_COUNT; r++)
        for (unsigned k = 0; k < JI_STATUS_CLASS_COUNT; k++) {
            for (unsigned b = 0; b <= JI_REQUEST_DURATION_BUCKET_COUNT; b++)
                t->dur_buckets[r][k][b] += LOAD(d->buckets[r][k][b]);
            t->dur_sum_us[r][k] += LOAD(d->sum_us[r][k]);
            t->dur_count[r][k] += LOAD(d->count[r][k]);
        }
}

static void gather_pool(totals_t *t, const ji_pg_pool_t *pool)
{
    if (pool == NULL) /* a worker whose start-up failed */
        return;
    t->pg_idle += ji_pg_pool_idle(pool);
    t->pg_busy += ji_pg_pool_busy(pool);
}

/** VmRSS and VmHWM of this process, in bytes (0 when /proc cannot tell). */
static void gather_memory(totals_t *t)
{
    char buf[8192];
    size_t len = 0;
    ssize_t n;
    int fd;

    if ((fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC)) == -1)
        return;
    while (len < sizeof(buf) - 1 &&
           ((n = read(fd, buf + len, sizeof(buf) - 1 - len)) > 0 || (n == -1 && errno == EINTR)))
        if (n > 0)
            len += (size_t)n;
    close(fd);
    buf[len] = '\0';
    for (char *line = buf, *next; line != NULL; line = next) {
        if ((next = strchr(line, '\n')) != NULL)
            next++;
        if (strncmp(line, "VmRSS:", 6) == 0)
            t->rss = strtoull(line + 6, NULL, 10) * 1024;
        else if (strncmp(line, "VmHWM:", 6) == 0)
            t->hwm = strtoull(line + 6, NULL, 10) * 1024;
    }
}

static void gather(totals_t *t, ji_server_t *server)
{
    memset(t, 0, sizeof(*t));
    for (unsigned i = 0; i < server->nworkers; i++) {
        ji_worker_t *w = &server->workers[i];
        gather_ingest(t, &w->ingest_stats);
        gather_admission(t, &w->stats);
        gather_durations(t, &w->request_durations);
        gather_pool(t, w->pg_pool);
    }
    gather_memory(t);
}

/* ------------------------------------------------------------------ write */

static void family(ji_text_t *out, const char *name, const char *type, const char *help)
{
    ji_text_printf(out, "# HELP jsonl_ingest_%s %s\n# TYPE jsonl_ingest_%s %s\n", name, help, name, type);
}

/** One sample; `labels` is "" or `{name="value"}`. */
static void sample(ji_text_t *out, const char *name, const char *labels, uint64_t value)
{
    ji_text_printf(out, "jsonl_ingest_%s%s %" PRIu64 "\n", name, labels, value);
}

/** A family of one unlabelled sample. */
static void single(ji_text_t *out, const char *name, const char *type, const char *help, uint64_t value)
{
    family(out, name, type, help);
    sample(out, name, "", value);
}

/*
 * The duration histogram: one series per route and status class that saw a request (none before the first),
 * buckets cumulative with le="+Inf" equal to _count. The count is summed from the buckets, not read apart from
 * them, so it always equals the +Inf bucket even while other threads count.
 */
static void write_durations(ji_text_t *out, const totals_t *t)
{
    static const char *const classes[JI_STATUS_CLASS_COUNT] = {"2xx", "3xx", "4xx", "5xx"};

    family(out, "request_duration_seconds", "histogram",
           "Requests from their head to their answer's last byte written, by route and status class.");
    for (unsigned r = 0; r <= JI_ROUTE_COUNT; r++)
        for (unsigned k = 0; k < JI_STATUS_CLASS_COUNT; k++) {
            const char *route = ji_route_name((ji_route_id_t)r);
            uint64_t cum = 0;
            if (t->dur_count[r][k] == 0)
                continue;
            for (unsigned b = 0; b <= JI_REQUEST_DURATION_BUCKET_COUNT; b++) {
                cum += t->dur_buckets[r][k][b];
                if (b < JI_REQUEST_DURATION_BUCKET_COUNT)
                    ji_text_printf(out,
                                   "jsonl_ingest_request_duration_seconds_bucket{route=\"%s\",status_class=\"%s\","
                                   "le=\"%g\"} %" PRIu64 "\n",
                                   route, classes[k], ji_request_duration_bounds[b], cum);
                else
                    ji_text_printf(out,
                                   "jsonl_ingest_request_duration_seconds_bucket{route=\"%s\",status_class=\"%s\","
                                   "le=\"+Inf\"} %" PRIu64 "\n",
                                   route, classes[k], cum);
            }
            ji_text_printf(out, "jsonl_ingest_request_duration_seconds_sum{route=\"%s\",status_class=\"%s\"} %.6f\n",
                           route, classes[k], (double)t->dur_sum_us[r][k] / 1e6);
            ji_text_printf(out,
                           "jsonl_ingest_request_duration_seconds_count{route=\"%s\",status_class=\"%s\"} %" PRIu64
                           "\n",
                           route, classes[k], cum);
        }
}

static void write_metrics(ji_text_t *out, const totals_t *t, ji_server_t *server)
{
    single(out, "requests_total", "counter", "POST /users requests that reached an ingest.", t->requests);
    family(out, "ingests_total", "counter", "Finished ingests by result.");
    sample(out, "ingests_total", "{result=\"ok\"}", t->ingests_ok);
    sample(out, "ingests_total", "{result=\"failed\"}", t->ingests_failed);
    single(out, "ingests_in_flight", "gauge", "Ingests running now.", t->ingests_in_flight);
    single(out, "records_total", "counter", "User records committed.", t->records);
    single(out, "rejected_records_total", "counter",
           "Records rejected in skip mode and committed as dead letters with their batch.", t->rejected_records);
    single(out, "images_total", "counter", "Image files committed.", t->images);
    single(out, "body_bytes_total", "counter", "Request body bytes read by ingests (after chunked framing).",
           t->body_bytes);
    single(out, "uploads_created_total", "counter", "Resumable uploads created (tus or draft).", t->uploads_created);
    single(out, "uploads_completed_total", "counter", "Resumable uploads committed as a batch.", t->uploads_completed);
    single(out, "uploads_expired_total", "counter",
           "Resumable uploads discarded by this process because no append came within --upload-expiry.",
           t->uploads_expired);
    single(out, "uploads_resumed_total", "counter",
           "Appends to a resumable upload at an offset above 0 that were kept.", t->uploads_resumed);
    family(out, "errors_total", "counter", "Failed ingests by kind of error.");
    for (unsigned k = JI_ERR_NONE + 1; k < JI_ERR_KIND_COUNT; k++)
        ji_text_printf(out, "jsonl_ingest_errors_total{kind=\"%s\"} %" PRIu64 "\n",
                       ji_error_kind_name((ji_error_kind_t)k), t->errors[k]);
    family(out, "limits_total", "counter", "Requests refused by a limit, by limit.");
    sample(out, "limits_total", "{limit=\"max_record_bytes\"}", t->limit_record_bytes);
    sample(out, "limits_total", "{limit=\"max_ingests\"}", t->limit_ingests);
    sample(out, "limits_total", "{limit=\"max_client_ingests\"}", t->limit_client_ingests);
    sample(out, "limits_total", "{limit=\"min_body_rate\"}", t->limit_body_rate);
    sample(out, "limits_total", "{limit=\"max_memory\"}", LOAD(server->memory_budget.refused));
    sample(out, "limits_total", "{limit=\"max_array_memory\"}", LOAD(server->array_budget.over_request_cap));
    sample(out, "limits_total", "{limit=\"array_memory_budget\"}", LOAD(server->array_budget.refused));
    sample(out, "limits_total", "{limit=\"max_connections\"}", t->limit_connections);
    family(out, "refused_total", "counter", "Uploads refused before their body was read, by reason.");
    sample(out, "refused_total", "{reason=\"max_ingests\"}", t->limit_ingests);
    sample(out, "refused_total", "{reason=\"db_not_ready\"}", t->refused_db);
    sample(out, "refused_total", "{reason=\"max_client_ingests\"}", t->limit_client_ingests);
    sample(out, "refused_total", "{reason=\"max_memory\"}", LOAD(server->memory_budget.refused));
    single(out, "connections_open", "gauge", "Client connections open now.", t->connections_open);
    family(out, "worker_connections_open", "gauge", "Client connections open now, by worker thread.");
    for (unsigned i = 0; i < server->nworkers; i++) {
        char labels[32];
        snprintf(labels, sizeof(labels), "{worker=\"%u\"}", i);
        sample(out, "worker_connections_open", labels, LOAD(server->workers[i].stats.connections_open));
    }
    single(out, "connections_max", "gauge", "Connections the process keeps open at most (--max-connections).",
           server->max_connections);
    single(out, "connections_refused_total", "counter",
           "New connections answered 503 and closed because --max-connections were open and none was idle.",
           t->limit_connections);
    single(out, "connections_shed_total", "counter",
           "Idle kept-alive connections closed to make room for a new one under --max-connections.",
           t->connections_shed);
    single(out, "accept_paused_total", "counter", "Times accepting paused for want of file descriptors.",
           t->accept_paused);
    single(out, "memory_reserved_bytes", "gauge", "Bytes of --max-memory reserved by uploads in progress.",
           ji_budget_reserved(&server->memory_budget));
    family(out, "db_pool_connections", "gauge", "Database connections of the per-thread pools, by state.");
    sample(out, "db_pool_connections", "{state=\"idle\"}", t->pg_idle);
    sample(out, "db_pool_connections", "{state=\"busy\"}", t->pg_busy);
    single(out, "db_ready", "gauge", "1 once the schema is ready and uploads are accepted.",
           atomic_load_explicit(&server->db_ready, memory_order_relaxed) ? 1 : 0);
    single(out, "workers", "gauge", "Worker threads (--threads).", server->nworkers);
    single(out, "resident_memory_bytes", "gauge", "Resident set size (VmRSS).", t->rss);
    single(out, "resident_memory_peak_bytes", "gauge", "Peak resident set size (VmHWM).", t->hwm);
    write_durations(out, t);
}

/* ------------------------------------------------------------------ GET /metrics */

static int on_metrics(h2o_handler_t *self, h2o_req_t *req)
{
    ji_server_t *server = ji_worker_of(req->conn->ctx)->server;
    ji_text_t out = {0};
    totals_t t;

    (void)self;
    if (!h2o_memis(req->path_normalized.base, req->path_normalized.len, H2O_STRLIT("/metrics"))) {
        ji_reply_errorf(req, JI_ERR_NOT_FOUND, "no such route");
        return 0;
    }
    if (!h2o_memis(req->method.base, req->method.len, H2O_STRLIT("GET")) &&
        !h2o_memis(req->method.base, req->method.len, H2O_STRLIT("HEAD"))) {
        ji_reply_method_not_allowed(req, "GET, HEAD");
        return 0;
    }
    gather(&t, server);
    write_metrics(&out, &t, server);
    ji_reply_ok_text(req, "text/plain; version=0.0.4; charset=utf-8", &out);
    return 0;
}

void ji_metrics_register(h2o_hostconf_t *host)
{
    h2o_pathconf_t *pathconf = h2o_config_register_path(host, "/metrics", 0);
    h2o_handler_t *handler = h2o_create_handler(pathconf, sizeof(*handler));

    handler->on_req = on_metrics;
}
