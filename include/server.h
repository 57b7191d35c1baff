/*
 * server.h — the process: h2o configuration and handlers shared by all
 * threads, and one worker per thread (its own event loop, h2o context,
 * a share of the one listening socket, database pool and timers). Nothing is
 * shared between workers but read-only configuration.
 */
#ifndef JI_SERVER_H
#define JI_SERVER_H

#include <h2o.h>
#include <stdatomic.h>
#include "access_log.h"
#include "client_addr.h"
#include "client_slots.h"
#include "budget.h"
#include "common.h"
#include "config.h"
#include "image_store.h"
#include "ingest.h"
#include "pg.h"
#include "request_rules.h"
#include "uploads.h"

typedef struct st_ji_worker_t ji_worker_t;

/** State shared by every worker: read-only after start-up, except the atomics. */
typedef struct st_ji_server_t {
    const ji_config_t *config;
    ji_image_store_t images;
    h2o_globalconf_t h2o_config;
    ji_worker_t *workers; /**< all workers, for /metrics */
    unsigned nworkers;
    _Atomic bool db_ready;            /**< schema created and leftovers collected: ingests may start */
    _Atomic bool stopping;            /**< SIGTERM: no new connections, finish what runs */
    _Atomic unsigned ingests_running; /**< POST /users requests in flight, all workers (cap: --max-ingests) */
    _Atomic unsigned connections;     /**< client connections open, all workers (cap: max_connections) */
    unsigned max_connections;         /**< --max-connections, or the default derived from nofile */
    unsigned long nofile;             /**< the open-files limit (RLIMIT_NOFILE) the process runs with */
    char connections_refusal[192];    /**< the JSON body of the 503 past max_connections */
    char *token;                      /**< --token-file's token, or NULL */
    ji_request_policy_t policy;     /**< token, allowed origins and hosts: what every request head is checked against */
    ji_client_slots_t client_slots; /**< uploads running per client (--max-client-ingests) */
    ji_trusted_proxies_t trusted_proxies; /**< --trusted-proxies */
    ji_budget_t memory_budget;            /**< what all uploads hold, all workers (--max-memory) */
    ji_budget_t array_budget;             /**< memory of JSON-array requests, all workers (--array-memory-budget) */
    ji_access_log_t access_log;           /**< --access-log: every loop writes its requests' lines here */
    _Atomic bool signals_done;            /**< the process is ending: the signal thread returns */
} ji_server_t;

/** Counters of one worker outside its ingests (relaxed atomics, read by /metrics from any thread). */
typedef struct st_ji_worker_stats_t {
    _Atomic uint64_t connections_open;     /**< client connections open now */
    _Atomic uint64_t limit_ingests;        /**< uploads refused because --max-ingests were running */
    _Atomic uint64_t limit_client_ingests; /**< uploads refused because their client ran --max-client-ingests */
    _Atomic uint64_t limit_body_rate;      /**< uploads cut for a body slower than --min-body-rate */
    _Atomic uint64_t refused_db;           /**< uploads refused because the database was not ready */
    _Atomic uint64_t accept_paused;        /**< times accepting paused for want of file descriptors */
    _Atomic uint64_t limit_connections;    /**< connections answered 503 because --max-connections were open */
    _Atomic uint64_t connections_shed;     /**< idle kept-alive connections closed to make room for a new one */
} ji_worker_stats_t;

struct st_ji_worker_t {
    ji_server_t *server;
    h2o_context_t ctx;
    h2o_accept_ctx_t accept_ctx;
    h2o_socket_t *listener;
    ji_pg_pool_t *pg_pool;
    /** Timers of the streaming path (h2o_timeout lists, one per delay). */
    h2o_timeout_t feed_flush_timeout;   /**< feed a part-filled buffer after this long without more bytes */
    h2o_timeout_t idle_timeout;         /**< a stalled head or body is cut after this */
    h2o_timeout_t keepalive_timeout;    /**< a kept-alive connection idle between requests is closed after this */
    h2o_timeout_t linger_timeout;       /**< how long an error response waits for the client to stop sending */
    h2o_timeout_t yield_timeout;        /**< 1 ms: work split in slices goes on after the loop served the others */
    h2o_timeout_t accept_pause_timeout; /**< out of file descriptors: accepting pauses this long */
    h2o_timeout_entry_t accept_pause;
    h2o_timeout_t accept_defer_timeout; /**< JI_ACCEPT_DEFER_MS */
    h2o_timeout_entry_t accept_defer;   /**< a connection left to a less loaded loop: taken here once it runs out */
    bool accept_forced;                 /**< the deferral ran out: the next accept is tried whatever the load */
    h2o_linklist_t conns;               /**< front-door connections of this worker (closed when it stops) */
    h2o_linklist_t idle_conns;          /**< kept-alive connections waiting for a request, the longest idle first */
    /** Idle kept-alive connections here not yet promised to a loop that needs room (any thread claims them). */
    _Atomic long sheddable;
    _Atomic unsigned shed_wanted; /**< promised ones this loop still has to close (at its next wake-up) */
    uint64_t refused_logged_at; /**< loop time of the last log line about refused connections (at most one a second) */
    uint64_t refused_unlogged;  /**< connections refused since that line */
    ji_ingest_env_t ingest_env; /**< what this worker's ingests run with */
    ji_ingest_stats_t ingest_stats;
    ji_upload_sweeper_t upload_sweeper; /**< the expiry sweep of resumable uploads (worker 0 only) */
    ji_worker_stats_t stats;
    ji_request_durations_t request_durations; /**< answered requests by route and status class (/metrics) */
    _Atomic bool draining_busy; /**< stopping: requests still run on this worker (idle connections wait for all) */
};

/** The worker that owns an h2o context. */
static inline ji_worker_t *ji_worker_of(h2o_context_t *ctx)
{
    return JI_CONTAINER_OF(ctx, ji_worker_t, ctx);
}

/**
 * Admission of an upload, before any body byte is read: the database must be ready and fewer than --max-ingests
 * uploads may run in the process. 0 = admitted (release with ji_server_release_ingest once the ingest is freed),
 * -1 = refused (`err` filled: JI_ERR_BUSY or JI_ERR_DB; counted in the worker's stats).
 */
int ji_server_admit_ingest(ji_worker_t *w, ji_error_t *err) JI_MUST_CHECK;
void ji_server_release_ingest(ji_worker_t *w);
/** A client connection of `w` closed (front_door.c): a loop that left new connections to a lighter loop may take
 * them again. */
void ji_server_connection_closed(ji_worker_t *w);

/** Runs the service until it fails to start (returns non-zero) or is stopped. */
int ji_server_run(const ji_config_t *config);

/** The `gc` command: removes image files of requests that never committed. */
int ji_server_gc(const ji_config_t *config);

#endif
