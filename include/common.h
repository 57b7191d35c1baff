/*
 * common.h — what every stage of jsonl-ingest shares: the error record that
 * travels from the stage that found a problem to the HTTP response, the named
 * limits (service_limits.h), and a few small macros.
 */
#ifndef JI_COMMON_H
#define JI_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#define JI_MUST_CHECK __attribute__((warn_unused_result))
#define JI_PRINTF(a, b) __attribute__((format(printf, a, b)))
#define JI_CONTAINER_OF(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

#include "service_limits.h"

/** What kind of failure: decides the HTTP status (and the `kind` label of the errors metric). */
typedef enum {
    JI_ERR_NONE = 0,
    JI_ERR_MALFORMED,       /**< 400: not JSON, not UTF-8, bad framing or header */
    JI_ERR_UNAUTHORIZED,    /**< 401: --token-file set and no valid bearer token */
    JI_ERR_FORBIDDEN,       /**< 403: Origin or Host not allowed */
    JI_ERR_NOT_FOUND,       /**< 404: no such route or resource */
    JI_ERR_METHOD,          /**< 405: the route exists, the method does not */
    JI_ERR_TOO_SLOW,        /**< 408: a body slower than --min-body-rate */
    JI_ERR_CONFLICT,        /**< 409: the Idempotency-Key's first request still runs; an upload's offset differs */
    JI_ERR_GONE,            /**< 410: the resumable upload ended (failed or cancelled) */
    JI_ERR_PRECONDITION,    /**< 412: a Tus-Resumable version other than 1.0.0 */
    JI_ERR_TOO_LARGE,       /**< 413: record or body over a limit */
    JI_ERR_UNSUPPORTED,     /**< 415: unknown format or content encoding */
    JI_ERR_EXPECTATION,     /**< 417: an Expect other than 100-continue */
    JI_ERR_INVALID,         /**< 422: JSON fine, record breaks a rule */
    JI_ERR_HEAD_TOO_LARGE,  /**< 431: request head over JI_MAX_HEAD_BYTES or JI_MAX_HEADERS */
    JI_ERR_INTERNAL,        /**< 500: anything else (I/O error, out of memory) */
    JI_ERR_NOT_IMPLEMENTED, /**< 501: a Transfer-Encoding other than chunked */
    JI_ERR_DB,              /**< 503: database unavailable */
    JI_ERR_BUSY,            /**< 503: a limit on work in progress (ingests, memory, per client) */
    JI_ERR_STOPPING,        /**< 503: the server is shutting down */
    JI_ERR_DISK_FULL,       /**< 507: no space for an image */
    JI_ERR_KIND_COUNT       /**< number of kinds (array sizes) */
} ji_error_kind_t;

/** One error, with the 1-based line of the record (0 when no line applies) and the field (empty when none). */
typedef struct st_ji_error_t {
    ji_error_kind_t kind;
    uint64_t line;
    char field[32];
    char message[256];
} ji_error_t;

/** Fills `err` (a NULL `field` leaves it empty). Returns -1 so callers can `return ji_error_set(...)`. */
int ji_error_set(ji_error_t *err, ji_error_kind_t kind, uint64_t line, const char *field, const char *fmt, ...)
    JI_PRINTF(5, 6);
/** Clears `err` to JI_ERR_NONE. */
void ji_error_clear(ji_error_t *err);
/** The HTTP status of a kind (200 for JI_ERR_NONE). */
int ji_error_http_status(ji_error_kind_t kind);
/** A short stable name of a kind ("malformed", "db", "busy"...), the `kind` label of metrics. */
const char *ji_error_kind_name(ji_error_kind_t kind);
/** Seconds of Retry-After a kind's answer carries (0: none). */
unsigned ji_error_retry_after(ji_error_kind_t kind);

#endif
