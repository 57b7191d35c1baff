/*
 * uploads.h — the resource of a resumable upload (docs/resumable.md) apart
 * from its bodies: the token, the row a creation inserts, the answers about
 * an upload (HEAD, GET, DELETE /uploads/{token}, OPTIONS /uploads, served as
 * h2o handlers behind the front door's rules), the expiry sweep of the
 * running service and of `gc`, and the response headers the protocols share.
 * Appends (PATCH, and the body of a creation) stream through
 * upload_stream.c into an ingest (ingest.h).
 */
#ifndef JI_UPLOADS_H
#define JI_UPLOADS_H

#include <h2o.h>
#include <libpq-fe.h>
#include <time.h>
#include "common.h"
#include "image_store.h"
#include "ingest.h"
#include "json_text.h"
#include "pg.h"
#include "upload_headers.h"

struct st_ji_worker_t;

/** Room for an HTTP-date ("Sun, 06 Nov 1994 08:49:37 GMT") and its NUL. */
#define JI_HTTP_DATE_CAP 32

/** A new token (or batch key): 128 bits of getrandom as JI_UPLOAD_TOKEN_CHARS lowercase hex. 0, or -1. */
int ji_upload_token_new(char out[JI_UPLOAD_TOKEN_CHARS + 1]) JI_MUST_CHECK;

/** `t` as an HTTP-date (IMF-fixdate, GMT). */
void ji_http_date(time_t t, char out[JI_HTTP_DATE_CAP]);

/**
 * Appends the headers every answer about an upload carries, as "Name: value\r\n" lines: Tus-Resumable (tus) or
 * Upload-Draft-Interop-Version (draft), Location when `location` (the upload's path from its token), Upload-Offset
 * when `offset` >= 0, Upload-Complete (draft, when `complete` >= 0: ?0 or ?1), Upload-Expires (tus) and
 * Upload-Limit: max-age (draft) when `expires_at` is not 0.
 */
void ji_upload_headers_write(ji_text_t *t, bool draft, const char *token, bool location, int64_t offset, int complete,
                             time_t expires_at);

/* ---- creation ---- */

typedef struct st_ji_upload_create_t ji_upload_create_t;

/** The row is in (`err` NULL: token, batch_key and expires_at are set) or not (`err`: why, for the log). */
typedef void (*ji_upload_create_cb)(ji_upload_create_t *cr, const char *err);

/** One creation's INSERT, embedded in its owner's state (zeroed before start). */
struct st_ji_upload_create_t {
    ji_pg_call_t call;
    char token[JI_UPLOAD_TOKEN_CHARS + 1];
    char batch_key[JI_UPLOAD_TOKEN_CHARS + 1];
    time_t expires_at;
    char length_text[24], max_errors_text[24], expiry_text[16];
    char *metadata; /**< a copy of Upload-Metadata (owned), or NULL */
    const char *idempotency_key;
    const char *values[9];
    ji_upload_create_cb cb;
};

/**
 * Inserts the upload's row (state open, offset 0, expiring --upload-expiry from now) with a new token and batch
 * key. `c` (its Idempotency-Key) must stay valid until the callback; `metadata` (raw Upload-Metadata, may be
 * NULL) is copied. `cb` fires later from the loop.
 * 0, or -1 with `err` (out of memory, no randomness, the server stopping).
 */
int ji_upload_create_start(ji_upload_create_t *cr, struct st_ji_worker_t *w, const ji_upload_creation_t *c,
                           const char *metadata, size_t metadata_len, ji_upload_create_cb cb,
                           ji_error_t *err) JI_MUST_CHECK;

/** Cancels a creation still running (no callback follows) and frees what it holds; harmless when done. */
void ji_upload_create_dispose(ji_upload_create_t *cr);

/* ---- expiry ---- */

/** A worker's sweep of expired uploads (embedded in the worker, zeroed). */
typedef struct st_ji_upload_sweeper_t {
    ji_pg_call_t call;
    bool running;
    bool scheduled;   /**< next_ms was set once (the first sweep waits an interval: start-up swept already) */
    uint64_t next_ms; /**< loop time of the next sweep */
} ji_upload_sweeper_t;

/**
 * On a worker's loop, between turns: starts a sweep when one is due (every JI_UPLOAD_SWEEP_INTERVAL_S, or
 * --upload-expiry when shorter). A sweep deletes up to JI_UPLOAD_SWEEP_ROWS uploads whose expires_at passed and
 * that no append holds, and removes the files of those that never committed.
 */
void ji_uploads_sweep_tick(struct st_ji_worker_t *w);

/** Cancels a running sweep (the worker stops). */
void ji_uploads_sweep_dispose(ji_upload_sweeper_t *s);

/**
 * The same sweep, blocking, for start-up and `gc` (never on a loop), until no expired upload is left. Counts the
 * uploads discarded in `*expired`. 0, or -1 with `err`.
 */
int ji_uploads_expire_blocking(PGconn *conn, ji_image_store_t *images, uint64_t *expired,
                               ji_error_t *err) JI_MUST_CHECK;

/* ---- the handlers ---- */

/** Registers HEAD, GET, DELETE /uploads/{token} and OPTIONS /uploads (the front door judged their heads). */
void ji_uploads_register(h2o_hostconf_t *host);

#endif
