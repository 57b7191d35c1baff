/*
 * gunzip.h — Content-Encoding: gzip, inflated as the body streams (zlib).
 * Sits between the body decoder (framing) and the ingest: wire bytes in,
 * inflated bytes out into a caller-provided buffer, never more at once than
 * the caller asks for. Caps the inflated total (a small body must not turn
 * into an unbounded one) separately from the wire bytes.
 *
 * Multi-member bodies (`cat a.gz b.gz`, RFC 1952 section 2.2) are inflated as
 * one stream, as gzip(1) does: when a member has ended and the next byte is
 * 0x1f (the first byte of the gzip magic), a new member starts there. Any
 * other byte after a member is trailing garbage: it is not consumed, and the
 * caller reports it. A body must hold at least one member; a body whose last
 * member is cut short is not finished().
 */
#ifndef JI_GUNZIP_H
#define JI_GUNZIP_H

#include "common.h"

typedef struct st_ji_gunzip_t ji_gunzip_t;

/** A new inflater for one body (gzip wrapper required), capped at `max_inflated` bytes. NULL when out of memory. */
ji_gunzip_t *ji_gunzip_new(uint64_t max_inflated);
void ji_gunzip_free(ji_gunzip_t *g);

/**
 * Inflates from `in` into `out`. `*in_used` and `*out_len` receive what was consumed and produced. It returns when
 * `out` is full, when `in` is used up and everything it holds has been written out, or when a member ended and the
 * next input byte (if any) does not start another one. Inflated bytes can stay inside zlib while `out` is full: call
 * again, with or without more input, until `*out_len` < `out_cap`.
 *
 * Returns 0, or -1 with `err` filled (line 0): corrupt data or a non-gzip body is JI_ERR_MALFORMED
 * "corrupt gzip body: <zlib's reason>"; more than `max_inflated` bytes is JI_ERR_TOO_LARGE "inflated body is
 * larger than N bytes"; out of memory is JI_ERR_INTERNAL. After -1 every further call fails the same way.
 *
 * When finished() is true and `*in_used` < `in_len`, the bytes from `in + *in_used` on are trailing garbage.
 */
int ji_gunzip_run(ji_gunzip_t *g, const char *in, size_t in_len, size_t *in_used, char *out, size_t out_cap,
                  size_t *out_len, ji_error_t *err) JI_MUST_CHECK;

/**
 * True when the input so far ends exactly after a complete member (trailer and CRC checked): the body may end
 * here. False before the first member ends, and again while a following member is under way.
 */
bool ji_gunzip_finished(const ji_gunzip_t *g);

/**
 * The end-of-body rules, in one place: after ji_gunzip_run, `trailing` input bytes it did not consume follow a
 * finished member ("data after the end of the gzip body"); at the end of the input (`input_ended`), a member that
 * is not finished is "corrupt gzip body: truncated". 0 when neither applies, or -1 with `err` (JI_ERR_MALFORMED).
 */
int ji_gunzip_check_end(const ji_gunzip_t *g, size_t trailing, bool input_ended, ji_error_t *err) JI_MUST_CHECK;

/** Total inflated so far. */
uint64_t ji_gunzip_total_out(const ji_gunzip_t *g);

#endif
