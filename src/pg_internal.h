/*
 * pg_internal.h — private to pg.c and pg_pool.c; nothing else includes it.
 * The connection and pool structs, the connection's states, and the calls
 * between pg.c (one connection: connecting, statements, COPY, failure) and
 * pg_pool.c (the per-loop pool, giving connections back).
 */
#ifndef JI_PG_INTERNAL_H
#define JI_PG_INTERNAL_H

#include <sys/types.h>

#include "pg.h"

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
    h2o_timeout_t idle_timeout;    /**< JI_PG_IDLE_CLOSE_MS: an idle connection beyond JI_PG_KEEP_IDLE is closed */
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
    ji_pg_script_cb script_cb; /**< a script's owner (ji_pg_script); result_cb is NULL then */
    void *op_ctx;
    ji_pg_event_cb event_cb;
    void *event_ctx;
    PGresult *first_error; /**< results of the statement in progress */
    PGresult *last_result;
    bool script;                                           /**< the statement in progress is a script */
    int nscript;                                           /**< script: results kept so far */
    PGresult *script_results[JI_PG_SCRIPT_MAX_STATEMENTS]; /**< script: one per statement that succeeded */
    h2o_timeout_entry_t defer_entry;
    h2o_timeout_entry_t connect_entry;
    h2o_timeout_entry_t recycle_entry;
    h2o_timeout_entry_t idle_entry; /**< idle: in pool->idle_timeout since it went idle */
    h2o_linklist_t idle_link;
    char copy_abort[128]; /**< recycling: the CopyFail message for a COPY still in progress */
    char errbuf[512];
};

/* ---- pg.c, for the pool ---- */

/** A new connection of `pool`, zeroed, not connecting yet (its defer and connect timeouts set); NULL: out of memory. */
ji_pg_t *ji_pg__new(ji_pg_pool_t *pool);
/** (Re)connects `pg` from scratch; the ready callback reports the outcome, always later from the loop. */
void ji_pg__start_connect(ji_pg_t *pg);
/** What was sent is on its way: wait in `state` for the result that goes to `cb`. 0, or -1 (connection broken). */
int ji_pg__await_result(ji_pg_t *pg, ji_pg_state_t state, ji_pg_result_cb cb, void *ctx) JI_MUST_CHECK;
/** Copies a message, trimmed of libpq's trailing newline (and any other trailing white space). */
void ji_pg__copy_message(char *dst, size_t cap, const char *msg);

/* ---- pg_pool.c, for the connection ---- */

/** Takes `pg` off the pool's idle list. */
void ji_pg__unlink_idle(ji_pg_t *pg);

#endif
