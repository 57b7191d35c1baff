/*
 * gunzip.h — Content-Encoding: gzip, inflated as the body streams (zlib).
 * Sits between the body decoder (framing) and the ingest: wire bytes in,
 * inflated bytes out into a caller-provided buffer, never more at once than
 * the caller asks for. Caps the inflated total (a small body must not turn
 * into an unbounded one) separately from the wire bytes.
 */
#ifndef JI_GUNZIP_H
#define JI_GUNZIP_H

#include "common.h"

/** Most bytes one gzip body may inflate to. */
#define JI_MAX_INFLATED_BYTES (64ull * 1024 * 1024 * 1024)

typedef struct st_ji_gunzip_t ji_gunzip_t;

/** A new inflater for one body (gzip wrapper required), capped at `max_inflated` bytes. NULL when out of memory. */
ji_gunzip_t *ji_gunzip_new(uint64_t max_inflated);
void ji_gunzip_free(ji_gunzip_t *g);

/**
 * Inflates from `in` into `out`. `*in_used` and `*out_len` receive what was consumed and produced; it stops when
 * `out` is full, `in` is used up, or the gzip stream ended. 0, or -1 with `err` filled (corrupt data:
 * JI_ERR_MALFORMED "corrupt gzip body: ..."; over the cap: JI_ERR_TOO_LARGE).
 */
int ji_gunzip_run(ji_gunzip_t *g, const char *in, size_t in_len, size_t *in_used, char *out, size_t out_cap,
                  size_t *out_len, ji_error_t *err) JI_MUST_CHECK;

/** True once the gzip stream ended (its trailer checked). Bytes after it are an error for the caller to report. */
bool ji_gunzip_finished(const ji_gunzip_t *g);

/** Total inflated so far. */
uint64_t ji_gunzip_total_out(const ji_gunzip_t *g);

#endif
