/*
 * unzstd.h — Content-Encoding: zstd, decompressed as the body streams
 * (libzstd's streaming decoder). The same contract as gunzip.h: wire bytes
 * in, decoded bytes out into a caller-provided buffer, never more at once than
 * the caller asks for, the decoded total capped separately from the wire bytes.
 *
 * Each frame's window is bounded by JI_MAX_ZSTD_WINDOW_LOG: a frame header
 * that asks for more is refused (413) before the window is allocated.
 *
 * Several frames one after the other (`cat a.zst b.zst`, RFC 8878 section 3)
 * are one body, as the zstd tool decodes them, like gzip members here: when a
 * frame has ended and the next byte can start a frame (0x28, the first byte of
 * the zstd magic number, or 0x50-0x5f, that of a skippable frame's), the next
 * frame starts there. Skippable frames are skipped, as libzstd does. Any other
 * byte after a frame is trailing garbage: it is not consumed, and the caller
 * reports it. A body whose last frame is cut short is not finished().
 */
#ifndef JI_UNZSTD_H
#define JI_UNZSTD_H

#include "common.h"

typedef struct st_ji_unzstd_t ji_unzstd_t;

/** A new decoder for one body, capped at `max_out` decoded bytes. NULL when out of memory. */
ji_unzstd_t *ji_unzstd_new(uint64_t max_out);
void ji_unzstd_free(ji_unzstd_t *z);

/**
 * Decodes from `in` into `out`. `*in_used` and `*out_len` receive what was consumed and produced. It returns when
 * `out` is full, when `in` is used up and everything it holds has been written out, or when a frame ended and the
 * next input byte (if any) does not start another one. Decoded bytes can stay inside the decoder while `out` is
 * full: call again, with or without more input, until `*out_len` < `out_cap`.
 *
 * Returns 0, or -1 with `err` filled (line 0): corrupt data is JI_ERR_MALFORMED "corrupt zstd body: <libzstd's
 * reason>"; a frame that needs a window over 2^JI_MAX_ZSTD_WINDOW_LOG bytes, or more than `max_out` decoded bytes,
 * is JI_ERR_TOO_LARGE; out of memory is JI_ERR_INTERNAL. After -1 every further call fails the same way.
 *
 * When finished() is true and `*in_used` < `in_len`, the bytes from `in + *in_used` on are trailing garbage.
 */
int ji_unzstd_run(ji_unzstd_t *z, const char *in, size_t in_len, size_t *in_used, char *out, size_t out_cap,
                  size_t *out_len, ji_error_t *err) JI_MUST_CHECK;

/**
 * True when the input so far ends exactly after a complete frame (its checksum checked when it has one): the body
 * may end here. False before the first frame ends, and again while a following frame is under way.
 */
bool ji_unzstd_finished(const ji_unzstd_t *z);

/**
 * The end-of-body rules, as ji_gunzip_check_end: `trailing` unconsumed input bytes after a finished frame are
 * "data after the end of the zstd body"; at the end of the input (`input_ended`), a frame that is not finished is
 * "corrupt zstd body: truncated". 0 when neither applies, or -1 with `err` (JI_ERR_MALFORMED).
 */
int ji_unzstd_check_end(const ji_unzstd_t *z, size_t trailing, bool input_ended, ji_error_t *err) JI_MUST_CHECK;

/** Total decoded so far. */
uint64_t ji_unzstd_total_out(const ji_unzstd_t *z);

/** The most one decoder may hold (its window at JI_MAX_ZSTD_WINDOW_LOG and its buffers), for --max-memory. */
uint64_t ji_unzstd_memory_bound(void);

#endif
