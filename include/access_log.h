/*
 * access_log.h — the record of each finished request. One JSON line per
 * request, and its duration counted in the worker's histogram
 * (jsonl_ingest_request_duration_seconds, written by metrics.c). The line says what the front door
 * learned about it (client, method, path, route, status, body bytes, what an
 * upload stored, how long it took), written to stderr, to a file or nowhere
 * (--access-log). The log object belongs to the server and is shared by every
 * loop; a line is formatted on the loop that served the request and written
 * with one write(2).
 *
 * Concurrency, and what it relies on: the descriptor number never changes
 * while loops run. A file is opened O_APPEND, so each write(2) lands at the end
 * whole (Linux holds the file's lock across an appending write to a regular
 * file); on a pipe or a FIFO (stderr read by a supervisor) a write of at most
 * PIPE_BUF bytes is atomic, and a line is at most JI_ACCESS_LOG_LINE_BYTES
 * (= PIPE_BUF). Rotation (SIGHUP) opens the file again under its name and
 * dup2()s the new descriptor over the old number: atomic for the writers, a
 * write in flight finishes into the old file, every later one goes to the new.
 * A write blocks its loop while the destination is full (a stalled pipe).
 */
#ifndef JI_ACCESS_LOG_H
#define JI_ACCESS_LOG_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include "common.h"
#include "routes.h"

/** Bytes of the method kept (methods are short tokens; the head rules refuse long ones anyway). */
#define JI_ACCESS_LOG_METHOD_BYTES 16

typedef struct st_ji_access_log_t {
    int fd;                         /**< -1: off; 2: stderr; else the file (reopened in place on SIGHUP) */
    const char *path;               /**< the file's name, or NULL (stderr, off) */
    _Atomic uint64_t lines_written; /**< lines written whole */
    _Atomic uint64_t lines_failed;  /**< lines lost: the write failed or was cut short */
} ji_access_log_t;

/** One request as the front door saw it, from its head to its answer. */
typedef struct st_ji_access_entry_t {
    struct timespec wall;                    /**< CLOCK_REALTIME when the head was complete */
    struct timespec start;                   /**< CLOCK_MONOTONIC at the same moment: the duration's start */
    char method[JI_ACCESS_LOG_METHOD_BYTES]; /**< NUL-terminated; "" when the head could not be parsed */
    char path[JI_ACCESS_LOG_PATH_BYTES];     /**< the path without the query, cut at JI_ACCESS_LOG_PATH_BYTES */
    size_t path_len;
    bool path_truncated;
    bool has_head;         /**< the head was parsed: method and path are known */
    const char *route;     /**< the route's name (routes.h), or "other" */
    int route_index;       /**< ji_route_id_t, or JI_ROUTE_COUNT for "other" (the histogram's row) */
    int status;            /**< the answer's status; 0: the connection closed before an answer began */
    uint64_t body_bytes;   /**< request body bytes received on the wire (chunked framing included, gzip not inflated) */
    bool upload;           /**< POST /users: rows, images and batch_id apply */
    uint64_t rows, images; /**< what the upload committed (0 when it failed) */
    int64_t batch_id;      /**< the committed batch, 0: none */
} ji_access_entry_t;

/** Status classes of the histogram: 2xx, 3xx, 4xx, 5xx. */
#define JI_STATUS_CLASS_COUNT 4

/**
 * Request durations of one worker by route (JI_ROUTE_COUNT: "other") and status class, written by its loop only
 * (relaxed atomics: /metrics sums them from any thread). Buckets are per bucket here, not cumulative: bucket i
 * counts durations d with bound[i-1] < d <= bound[i]; the last one counts those above every bound (+Inf).
 */
typedef struct st_ji_request_durations_t {
    _Atomic uint64_t buckets[JI_ROUTE_COUNT + 1][JI_STATUS_CLASS_COUNT][JI_REQUEST_DURATION_BUCKET_COUNT + 1];
    _Atomic uint64_t sum_us[JI_ROUTE_COUNT + 1][JI_STATUS_CLASS_COUNT]; /**< microseconds */
    _Atomic uint64_t count[JI_ROUTE_COUNT + 1][JI_STATUS_CLASS_COUNT];
} ji_request_durations_t;

/** The bucket bounds in seconds (JI_REQUEST_DURATION_BUCKETS), JI_REQUEST_DURATION_BUCKET_COUNT of them. */
extern const double ji_request_duration_bounds[JI_REQUEST_DURATION_BUCKET_COUNT];

/** Counts one answered request (`status` 200-599; others are not counted) that took `seconds`. */
void ji_request_durations_observe(ji_request_durations_t *d, int route_index, int status, double seconds);

/**
 * Opens the log: `spec` NULL or "-" is stderr, "off" disables it, anything else is a file opened O_APPEND
 * (created 0640). 0, or -1 with `err` filled.
 */
int ji_access_log_open(ji_access_log_t *log, const char *spec, ji_error_t *err) JI_MUST_CHECK;

/** SIGHUP: opens the file again under its name (after a rotation) in place of the old one. No-op for stderr/off. */
int ji_access_log_reopen(ji_access_log_t *log, ji_error_t *err) JI_MUST_CHECK;

/** Closes a file (stderr stays open). */
void ji_access_log_close(ji_access_log_t *log);

/** Whether lines are written at all (not "off"). */
static inline bool ji_access_log_enabled(const ji_access_log_t *log)
{
    return log->fd != -1;
}

/**
 * Formats the line of `e` (newline included) into `buf` of `cap` bytes (at least JI_ACCESS_LOG_LINE_BYTES):
 * `client` is the client's address, `end` the CLOCK_MONOTONIC time the request ended. Returns its length.
 */
size_t ji_access_log_format(const ji_access_entry_t *e, const char *client, const struct timespec *end, char *buf,
                            size_t cap);

/** Formats and writes the line of `e` with one write(2). */
void ji_access_log_write(ji_access_log_t *log, const ji_access_entry_t *e, const char *client,
                         const struct timespec *end);

/** Seconds from `start` to `end`. */
double ji_access_entry_seconds(const struct timespec *start, const struct timespec *end);

#endif
