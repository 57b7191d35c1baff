/*
 * common.h — what every stage of jsonl-ingest shares: the error record that
 * travels from the stage that found a problem to the HTTP response, the named
 * limits, and a few small macros.
 */
#ifndef JI_COMMON_H
#define JI_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#define JI_MUST_CHECK __attribute__((warn_unused_result))
#define JI_PRINTF(a, b) __attribute__((format(printf, a, b)))
#define JI_CONTAINER_OF(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

/* ---- named limits (each one is named again in the error it causes) ---- */
/** Most Unicode characters in `name` and `email` (varchar(255)). */
#define JI_MAX_FIELD_CHARS 255
/** Default for --max-record-bytes: the longest line one record may take. */
#define JI_DEFAULT_MAX_RECORD_BYTES (8u * 1024 * 1024)
/** Default for --max-array-bytes: the largest body of the JSON-array mode. */
#define JI_DEFAULT_MAX_ARRAY_BYTES (256u * 1024 * 1024)
/** Default for --max-inflated-bytes: the most one gzip body may inflate to. */
#define JI_DEFAULT_MAX_INFLATED_BYTES (64ull * 1024 * 1024 * 1024)
/** yajl rescans a string that spans its input chunks: feed it at least this much at a time. */
#define JI_FEED_MIN_BYTES (64u * 1024)
/** Bytes of COPY data gathered before they are handed to libpq. */
#define JI_COPY_BUFFER_BYTES (64u * 1024)
/** Most bytes of one request head (request line and headers). */
#define JI_MAX_HEAD_BYTES (16u * 1024)
/** Most headers in one request head. */
#define JI_MAX_HEADERS 64
/** Errors listed in a skip-mode response. */
#define JI_MAX_REPORTED_ERRORS 100

/** What kind of failure: decides the HTTP status. */
typedef enum {
    JI_ERR_NONE = 0,
    JI_ERR_MALFORMED,   /**< 400: not JSON, not UTF-8, bad framing */
    JI_ERR_INVALID,     /**< 422: JSON fine, record breaks a rule */
    JI_ERR_TOO_LARGE,   /**< 413: record or body over a limit */
    JI_ERR_UNSUPPORTED, /**< 415: unknown format or content encoding */
    JI_ERR_DB,          /**< 503: database unavailable or failed */
    JI_ERR_DISK_FULL,   /**< 507: no space for an image */
    JI_ERR_INTERNAL,    /**< 500: anything else (I/O error, out of memory) */
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

#endif
