/*
 * splitter.h — the incremental newline splitter. It cuts a byte stream into
 * lines without copying them: each line reaches its handler as one or more
 * fragments (pointers into the caller's buffer) followed by an end-of-line
 * call. It numbers lines from 1, enforces the per-record byte limit before
 * passing bytes on, lets the handler pause after any line, and tells where in
 * the stream the last line it ended stops.
 */
#ifndef JI_SPLITTER_H
#define JI_SPLITTER_H

#include "common.h"

typedef struct st_ji_splitter_handler_t {
    /** Bytes of the current line (never the '\n'; a trailing '\r' is passed through). 0 = go on, -1 = stop with an error. */
    int (*on_data)(void *ctx, uint64_t line, const char *data, size_t len);
    /** The current line ended (also for empty lines). 0 = go on, 1 = pause after this line, -1 = stop with an error. */
    int (*on_line_end)(void *ctx, uint64_t line);
} ji_splitter_handler_t;

typedef enum {
    JI_SPLIT_OK,       /**< every byte given was consumed */
    JI_SPLIT_PAUSED,   /**< on_line_end asked to pause: `consumed` bytes were used, feed the rest later */
    JI_SPLIT_ERROR,    /**< a handler returned -1 */
    JI_SPLIT_TOO_LONG, /**< the current line would pass max_line_bytes; nothing of it past the limit was passed on */
} ji_split_result_t;

typedef struct st_ji_splitter_t {
    const ji_splitter_handler_t *handler;
    void *ctx;
    uint64_t line;         /**< number of the current line, 1-based */
    size_t line_bytes;     /**< bytes of the current line seen so far */
    size_t max_line_bytes; /**< limit on line_bytes (--max-record-bytes) */
    bool skipping;         /**< dropping the rest of the current line (ji_splitter_skip_line) */
    uint64_t consumed;     /**< bytes consumed since init: the stream offset of the next byte fed */
    uint64_t line_end;     /**< stream offset just past the last '\n' consumed (0: none yet) */
} ji_splitter_t;

void ji_splitter_init(ji_splitter_t *s, size_t max_line_bytes, const ji_splitter_handler_t *handler, void *ctx);

/**
 * Passes `data` on, line by line. `*consumed` receives how many bytes were used: all of them unless
 * the result is JI_SPLIT_PAUSED (then the bytes after the paused line's '\n' are left) or an error.
 */
ji_split_result_t ji_splitter_feed(ji_splitter_t *s, const char *data, size_t len, size_t *consumed) JI_MUST_CHECK;

/** End of input: ends a last line that has bytes but no '\n' (calls on_line_end for it). JI_SPLIT_PAUSED counts as success. */
ji_split_result_t ji_splitter_finish(ji_splitter_t *s) JI_MUST_CHECK;

/**
 * Drops the rest of the current line (after JI_SPLIT_TOO_LONG in skip mode): its bytes up to the next '\n' are
 * discarded without a handler call, and no on_line_end comes for it; counting goes on with the next line.
 */
void ji_splitter_skip_line(ji_splitter_t *s);

/** Number of the current line (the one an error just happened on). */
static inline uint64_t ji_splitter_line(const ji_splitter_t *s)
{
    return s->line;
}

/**
 * Stream offset (counted from the first byte fed since init) just past the last '\n' consumed: the end of the
 * last complete line, skipped lines included; 0 before any. A line ended by ji_splitter_finish (no '\n') and a
 * '\n' a failing handler call left unconsumed do not count.
 */
static inline uint64_t ji_splitter_line_end_offset(const ji_splitter_t *s)
{
    return s->line_end;
}

/** Lines fully ended so far. */
static inline uint64_t ji_splitter_lines_done(const ji_splitter_t *s)
{
    return s->line - 1;
}

#endif
