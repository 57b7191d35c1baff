/*
 * ingest.h — one POST /users request from its first body byte to its answer:
 * body bytes -> line splitter -> record parser -> image files + COPY rows ->
 * COMMIT. It does not know where the bytes come from (a socket on the
 * streaming path, a buffered body in an h2o handler): its owner feeds it and
 * sends the answer. Memory is bounded per record.
 *
 * Flow control: ji_ingest_feed takes what it can; when it takes less than it
 * was given, the owner stops feeding until the resume callback. Callbacks
 * never fire from inside a ji_ingest_* call: they come from the event loop.
 *
 * Idempotency-Key: a request with a key whose first request committed within
 * --idempotency-ttl is a replay: the owner feeds the body as usual, the
 * ingest only hashes it, and at the end answers the first answer (same
 * content) or 422 (other content). A key whose first request still runs is
 * 409 before the first resume. The key rules are in idempotency.h.
 */
#ifndef JI_INGEST_H
#define JI_INGEST_H

#include <h2o.h>
#include <stdatomic.h>
#include "common.h"
#include "idempotency.h"
#include "image_store.h"
#include "pg.h"

typedef struct st_ji_ingest_t ji_ingest_t;

/**
 * Counters of the ingests of one thread, written by that thread only and read by /metrics from any thread
 * (relaxed atomics: each value is exact, the set is not a snapshot).
 */
typedef struct st_ji_ingest_stats_t {
    _Atomic uint64_t requests; /**< ingests started */
    _Atomic uint64_t ingests_ok, ingests_failed, ingests_in_flight;
    _Atomic uint64_t records, images, body_bytes;
    _Atomic uint64_t rejected_records;          /**< skip mode: rejected records committed as dead letters */
    _Atomic uint64_t errors[JI_ERR_KIND_COUNT]; /**< failed ingests by ji_error_kind_t */
    _Atomic uint64_t limit_record_bytes;        /**< records over --max-record-bytes */
    _Atomic uint64_t uploads_created;           /**< resumable uploads created (uploads.c) */
    _Atomic uint64_t uploads_completed;         /**< resumable uploads committed as a batch (by their last append) */
    _Atomic uint64_t uploads_expired;           /**< resumable uploads discarded by the expiry sweep */
    _Atomic uint64_t uploads_resumed;           /**< appends at an offset above 0 that were kept */
} ji_ingest_stats_t;

/**
 * What an ingest needs from the thread it runs on. Owned by the caller (one per event loop), it outlives every
 * ingest started with it. Admission (how many ingests may run, whether the database is ready) is the caller's.
 * Ingests of the loop write `next_key_sweep_ms`; the rest is theirs to read.
 */
typedef struct st_ji_ingest_env_t {
    h2o_loop_t *loop;
    h2o_timeout_t *zero_timeout; /**< a zero-delay timeout list of `loop`: callbacks are delivered through it */
    ji_pg_pool_t *pg_pool;
    ji_image_store_t *images;
    size_t max_record_bytes;    /**< --max-record-bytes */
    unsigned idempotency_ttl_s; /**< --idempotency-ttl (0: JI_DEFAULT_IDEMPOTENCY_TTL_S) */
    ji_ingest_stats_t *stats;
    uint64_t max_upload_bytes; /**< --max-upload-bytes: no append may take an upload past it (0: the default) */
    unsigned upload_expiry_s;  /**< --upload-expiry: an append moves expires_at to now + this (0: the default) */
    /** Interrupted appends whose owner is gone, still finishing on their own (the loop waits for them to stop). */
    unsigned orphans;
    /** Loop time (ms) after which the next committed ingest sweeps expired Idempotency-Keys (0: at once). */
    uint64_t next_key_sweep_ms;
} ji_ingest_env_t;

/**
 * One append to a resumable upload (docs/resumable.md): the body continues the upload named `token` at `offset`.
 * Its rows are staged (upload_rows), not inserted; its rejected records go to upload_rejected. Under the upload's
 * lock (a later append takes over from an earlier one still holding it) the ingest reads the upload's row: its
 * options (on_error, max_errors, Idempotency-Key) and the counts of the lines before `offset` replace those of
 * ji_ingest_params_t, and line numbers continue from there. At the end of the body (or when the client is gone,
 * ji_ingest_interrupt) the complete lines received are staged and the upload's offset moves past the last of
 * them, in one transaction; a partial last line is not kept (the client sends it again). When the body completes
 * the upload, the same transaction moves every staged row into users as one batch.
 */
typedef struct st_ji_ingest_append_t {
    char token[JI_UPLOAD_TOKEN_CHARS + 1]; /**< the upload's token (lowercase hex) */
    uint64_t offset;                       /**< the client's Upload-Offset: the durable offset, or 409 */
    int64_t length;                        /**< Upload-Length given with this request (-1: none) */
    bool completes;                        /**< Upload-Complete: ?1 (draft): the upload ends with this body */
    bool draft;                            /**< the request speaks the IETF draft (else tus 1.0.0) */
} ji_ingest_append_t;

/**
 * The upload lock: a transaction advisory lock of two int4 keys, 'U' (85) in the top 8 bits of the first and the
 * upload_id in the other 56 bits (the export horizon's locks have 'J'). An append holds it from before it reads the
 * upload's row to its COMMIT or ROLLBACK; whoever must change the upload (a later append, DELETE) takes it after
 * terminating its holder. `id` is an SQL expression of type bigint.
 */
#define JI_UPLOAD_LOCK_TAG_KEY "1426063360" /* 85 << 24 */
#define JI_UPLOAD_LOCK_ARGS(id)                                                                                        \
    "((" JI_UPLOAD_LOCK_TAG_KEY " | ((" id ") >> 32))::int4, ((" id ") & 4294967295)::bit(32)::int4)"
/** The lock: "SELECT " JI_UPLOAD_LOCK_SQL("$1::bigint"), waits (bounded by the transaction's lock_timeout). */
#define JI_UPLOAD_LOCK_SQL(id) "pg_advisory_xact_lock" JI_UPLOAD_LOCK_ARGS(id)
/**
 * Terminates every other backend holding the upload lock of `id` (their transactions roll back); an expression
 * giving how many. The lock is free once they are gone: take it with JI_UPLOAD_LOCK_SQL in a later expression.
 */
#define JI_UPLOAD_TERMINATE_SQL(id)                                                                                    \
    "(SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted "          \
    "AND l.objsubid = 2 AND l.classid::bigint = (" JI_UPLOAD_LOCK_TAG_KEY " | ((" id ") >> 32)) "                      \
    "AND l.objid::bigint = ((" id ") & 4294967295) AND l.pid <> pg_backend_pid() "                                     \
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))"

typedef struct st_ji_ingest_params_t {
    bool skip_errors;    /**< ?on_error=skip: rejected records are skipped and kept as dead letters */
    bool has_max_errors; /**< ?max_errors=N (implies skip_errors) */
    uint64_t max_errors; /**< the (N+1)-th rejected record fails the request (422 naming its line) */
    uint64_t body_bytes; /**< record mode: the size of the body the records came from (reported as "bytes") */
    /**
     * The Idempotency-Key header's value as received (NUL-terminated, copied by ji_ingest_new), or NULL. The
     * ingest checks it again (ji_idempotency_key_check: 400 when bad) and removes the quotes of the quoted form.
     */
    const char *idempotency_key;
    /** A resumable upload's append (copied by ji_ingest_new), or NULL for a POST /users. */
    const ji_ingest_append_t *append;
} ji_ingest_params_t;

typedef struct st_ji_ingest_callbacks_t {
    /** The ingest can take bytes again (it is ready to stream, or its backpressure cleared). */
    void (*resume)(ji_ingest_t *in, void *owner);
    /**
     * The answer: HTTP `status`, a JSON `body` valid until ji_ingest_free, and for 503 a Retry-After value in
     * seconds (0: none). The owner sends it, then frees the ingest.
     */
    void (*done)(ji_ingest_t *in, void *owner, int status, const char *body, size_t len, unsigned retry_after);
} ji_ingest_callbacks_t;

/** Starts an ingest (connects to the database, opens the transaction). NULL only when out of memory. */
ji_ingest_t *ji_ingest_new(ji_ingest_env_t *env, const ji_ingest_params_t *params, const ji_ingest_callbacks_t *cb,
                           void *owner);

/** Offers body bytes; returns how many were taken (less than `len`: wait for resume, or done comes). */
size_t ji_ingest_feed(ji_ingest_t *in, const char *data, size_t len);

/**
 * The owner holds the whole rest of the body: the next ji_ingest_feed is its last before ji_ingest_end. The rows
 * of that feed then wait for the end and go to the database with COPY's end, in one write (a small request pays
 * one system call and one wake-up of the server process fewer).
 */
void ji_ingest_last_bytes(ji_ingest_t *in);

/**
 * Record mode (the JSON-array path, whose owner parsed the body itself): one record, checked and stored like a
 * JSON Lines record. `line` is the record's position (1-based); `image` NULL or empty means none. 0 = taken,
 * 1 = taken but the database is backed up (wait for resume before the next), -1 = refused (not ready, or the
 * request failed: done comes).
 */
int ji_ingest_put_record(ji_ingest_t *in, uint64_t line, const char *name, size_t name_len, const char *email,
                         size_t email_len, const char *image, size_t image_len);

/**
 * Record mode: a record the owner found broken (wrong type, missing field); skipped or fatal like any other.
 * 0 = skipped (go on), -1 = the request failed (done comes).
 */
int ji_ingest_record_error(ji_ingest_t *in, ji_error_t *err);

/**
 * Record mode, skip mode: the bytes of the next record as they were sent, given before ji_ingest_put_record or
 * ji_ingest_record_error: kept as its dead letter if it is rejected (copied; a record over --max-record-bytes
 * never reaches here). 0, or -1 (the request failed: done comes).
 */
int ji_ingest_record_text(ji_ingest_t *in, const char *text, size_t len);

/** Every body byte was fed: finish (COPY end, make files durable, COMMIT) and answer through done. */
void ji_ingest_end(ji_ingest_t *in);

/**
 * Fails the request from outside (bad framing, client gone): `err` is answered through done unless
 * the ingest already finished or is committing.
 */
void ji_ingest_fail(ji_ingest_t *in, const ji_error_t *err);

/**
 * Append only: the client's connection is gone mid-body. The complete lines received are staged and the offset
 * moves past them (as at the end of a body that does not complete the upload); done comes with 204 (or the error
 * that ended the append). The owner may also free the ingest at once instead of waiting: an interrupted ingest
 * that has not answered yet is not aborted by ji_ingest_free but finishes on its own and frees itself, with no
 * callback. An ingest that was not streaming yet simply fails.
 */
void ji_ingest_interrupt(ji_ingest_t *in);

/**
 * Append only, after done: the upload's durable offset (for Upload-Offset), valid with 204 (the append was kept),
 * 200 (the upload committed) and 409 (the offset the client must resume from); 0 when unknown.
 */
uint64_t ji_ingest_append_offset(const ji_ingest_t *in);

/** What a request stored, for its access-log line: nothing unless it committed (a replay stored nothing). */
typedef struct st_ji_ingest_outcome_t {
    uint64_t inserted; /**< rows inserted into users */
    uint64_t images;   /**< image files kept */
    int64_t batch_id;  /**< the committed batch; 0: none */
} ji_ingest_outcome_t;

/** Fills `out` from an ingest that answered (before ji_ingest_free). */
void ji_ingest_outcome(const ji_ingest_t *in, ji_ingest_outcome_t *out);

/**
 * Frees the ingest. Before the answer this aborts: the transaction is rolled back (in the background, on a
 * connection that then goes back to the pool) and every image file of the request removed. Once COMMIT was
 * sent it never removes files (gc settles an unknown outcome).
 */
void ji_ingest_free(ji_ingest_t *in);

#endif
