/*
 * pg.h — non-blocking libpq on an h2o event loop, and a per-thread pool of
 * idle connections. The connection's socket is watched by the loop (a dup of
 * PQsocket registered with h2o_evloop_socket_create); nothing here ever
 * blocks. The layer knows nothing of JSON or HTTP.
 *
 * One operation at a time per connection: a query (answered by a result
 * callback), or a COPY FROM STDIN in progress (fed with ji_pg_copy_put, ended
 * with ji_pg_copy_end). Output backpressure is explicit: ji_pg_copy_put
 * answers 1 when libpq could not hand everything to the kernel, and the
 * drain callback fires once it has.
 *
 * Most callers want neither a connection nor COPY, only one statement's
 * result: ji_pg_call_t (at the end; pg_call.c) gets a pooled connection, runs
 * the statement, gives the connection back and delivers the result.
 */
#ifndef JI_PG_H
#define JI_PG_H

#include <libpq-fe.h>
#include <h2o.h>
#include "common.h"

typedef struct st_ji_pg_t ji_pg_t;
typedef struct st_ji_pg_pool_t ji_pg_pool_t;

/** Connected (err NULL) or failed (err says why; the caller still owns `pg` and frees or puts it back). */
typedef void (*ji_pg_ready_cb)(ji_pg_t *pg, void *ctx, const char *err);
/**
 * The result of a query. `res` is valid only during the call (the layer clears it). On failure `err` is
 * non-NULL (the server's message or the connection error) and `res` may be NULL. For a COPY ... FROM STDIN
 * statement, success means the server entered COPY IN mode (PQresultStatus(res) == PGRES_COPY_IN).
 */
typedef void (*ji_pg_result_cb)(ji_pg_t *pg, void *ctx, PGresult *res, const char *err);
/**
 * The results of a script (ji_pg_script), in the order of its statements. On success `n` results, one per
 * statement (the last one PGRES_COPY_IN when the script ends with COPY ... FROM STDIN: the connection is then in
 * COPY IN). On failure `err` is set, `results[0..n-1]` are the statements that succeeded, and `failed` is the error
 * result of statement n (NULL when the connection was lost); the server skipped the statements after it. Every
 * result is valid only during the call.
 */
typedef void (*ji_pg_script_cb)(ji_pg_t *pg, void *ctx, PGresult *const *results, int n, PGresult *failed,
                                const char *err);
/** Output drained (err NULL), or the connection failed while nothing else would have told (err set). */
typedef void (*ji_pg_event_cb)(ji_pg_t *pg, void *ctx, const char *err);

/* ---- pool: one per event loop (thread) ---- */

/**
 * A pool for `loop` connecting with `conninfo` (copied), keeping at most `max_idle` idle connections: those beyond
 * JI_PG_KEEP_IDLE are closed when unused for JI_PG_IDLE_CLOSE_MS.
 */
ji_pg_pool_t *ji_pg_pool_new(h2o_loop_t *loop, const char *conninfo, size_t max_idle);
/**
 * Frees every idle connection; connections handed out must have been put back or freed before. Call it outside
 * h2o_evloop_run (the pool's timeouts sit in the loop's timeout list, which h2o walks while running callbacks).
 */
void ji_pg_pool_free(ji_pg_pool_t *pool);
/**
 * A connection: an idle one when there is one, else a new one. `cb` always fires later from the loop, never
 * inside this call. Returns NULL only when out of memory. Cancel by ji_pg_free (no callback after that).
 */
ji_pg_t *ji_pg_pool_get(ji_pg_pool_t *pool, ji_pg_ready_cb cb, void *ctx);
/** Gives `pg` back: kept idle when healthy, out of any transaction and the pool has room; freed otherwise. */
void ji_pg_pool_put(ji_pg_pool_t *pool, ji_pg_t *pg);
/**
 * Gives back `pg` after a failed request without waiting for the server: a COPY in progress is ended with an
 * error (`copy_abort_msg`, which the server logs; NULL: a default), a statement in flight is waited for, the
 * transaction rolled back, then the connection goes idle like ji_pg_pool_put. A broken connection, or one that
 * takes longer than JI_PG_ROLLBACK_TIMEOUT_MS, is closed instead. No callback fires for the caller again;
 * until it is done the connection counts as busy.
 */
void ji_pg_pool_put_rollback(ji_pg_pool_t *pool, ji_pg_t *pg, const char *copy_abort_msg);
/**
 * Gives back `pg` like ji_pg_pool_put, after running `sql` (copied; one statement, no parameters) on it in the
 * background, outside any transaction: housekeeping that must not delay an answer. Its failure is logged to
 * stderr, never reported. Same rules as ji_pg_pool_put_rollback.
 */
void ji_pg_pool_put_after(ji_pg_pool_t *pool, ji_pg_t *pg, const char *sql);
/** Counters for /metrics: callable from any thread (relaxed atomic loads; each value exact, not a snapshot). */
size_t ji_pg_pool_idle(const ji_pg_pool_t *pool);
size_t ji_pg_pool_busy(const ji_pg_pool_t *pool);

/* ---- one connection ---- */

/** Closes the connection (any open transaction rolls back on the server). No callback fires afterwards. */
void ji_pg_free(ji_pg_t *pg);

/** Sends one statement with text parameters (values copied by libpq). 0, or -1 (see ji_pg_error). */
int ji_pg_query(ji_pg_t *pg, const char *sql, int nparams, const char *const *values, ji_pg_result_cb cb,
                void *ctx) JI_MUST_CHECK;

/** Most statements one script may hold (JI_PG_SCRIPT_MAX_STATEMENTS). */
#define JI_PG_SCRIPT_MAX_STATEMENTS 8

/**
 * Sends several statements, separated by ';', as ONE simple-query message (no parameters: every value is in the
 * text, escaped by the caller): one round trip instead of one per statement. The server runs them in order and
 * stops at the first error; a COPY ... FROM STDIN may only be the last statement. At most
 * JI_PG_SCRIPT_MAX_STATEMENTS statements. `cb` gets every result at once. 0, or -1 (see ji_pg_error).
 */
int ji_pg_script(ji_pg_t *pg, const char *sql, ji_pg_script_cb cb, void *ctx) JI_MUST_CHECK;

/**
 * During COPY IN: queues `len` bytes (libpq copies them) and tries to send. 0 = handed to the kernel,
 * 1 = some still queued (stop producing until the drain callback), -1 = connection failed (see ji_pg_error).
 */
int ji_pg_copy_put(ji_pg_t *pg, const char *data, size_t len) JI_MUST_CHECK;

/**
 * During COPY IN: queues `len` bytes without trying to send them, for the last data before ji_pg_copy_end (whose
 * flush then sends both in one write). 0, or -1 = connection failed (see ji_pg_error).
 */
int ji_pg_copy_queue(ji_pg_t *pg, const char *data, size_t len) JI_MUST_CHECK;

/** Sets the drain/failure callback used during COPY IN (NULL to clear). */
void ji_pg_set_event_cb(ji_pg_t *pg, ji_pg_event_cb cb, void *ctx);

/** Ends COPY IN: normally (`abort_msg` NULL) or aborted. `cb` receives the COPY's final result. */
int ji_pg_copy_end(ji_pg_t *pg, const char *abort_msg, ji_pg_result_cb cb, void *ctx) JI_MUST_CHECK;

/** The last error of the connection (libpq's message, trimmed), or "" */
const char *ji_pg_error(const ji_pg_t *pg);

/** The libpq connection, for reading results' helpers only (never for blocking calls). */
PGconn *ji_pg_conn(ji_pg_t *pg);

/* ---- one statement through the pool ---- */

typedef struct st_ji_pg_call_t ji_pg_call_t;

/**
 * The statement's result, `res` valid during the call only; or `err` (the server's message or the connection's
 * error: words for a log, not for a client) with `res` possibly NULL. The connection is back in the pool already
 * (kept when healthy), so the callback may start the call again, or free the memory it is embedded in.
 */
typedef void (*ji_pg_call_cb)(ji_pg_call_t *call, PGresult *res, const char *err);

/**
 * One statement on a pooled connection, from getting the connection to delivering the result. Embed it in the
 * state of whatever waits for the result (the callback finds that state with JI_CONTAINER_OF), zeroed before the
 * first start. The fields are the layer's: read none of them.
 *
 * Whoever owns the state cancels the call when the state goes away before the result (a request's dispose
 * callback, say): ji_pg_call_cancel is harmless when nothing runs.
 */
struct st_ji_pg_call_t {
    ji_pg_pool_t *pool;
    ji_pg_t *pg; /**< set while a connection is being obtained or the statement runs */
    const char *sql;
    int nparams;
    const char *const *values;
    ji_pg_call_cb cb;
};

/**
 * Runs `sql` with `nparams` text parameters `values` on a connection of `pool`. `sql`, `values` and the strings
 * they point to are the caller's and must stay valid until the callback or ji_pg_call_cancel. `cb` always fires
 * later from the loop, never inside this call. The call must not be running already. 0, or -1 when out of
 * memory (then no callback follows).
 */
int ji_pg_call_start(ji_pg_call_t *call, ji_pg_pool_t *pool, const char *sql, int nparams, const char *const *values,
                     ji_pg_call_cb cb) JI_MUST_CHECK;

/**
 * Cancels a running call: its connection is closed (the server abandons the statement; nothing half-read goes back
 * to the pool) and no callback follows. Does nothing when the call is not running.
 */
void ji_pg_call_cancel(ji_pg_call_t *call);

#endif
