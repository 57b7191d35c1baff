/*
 * content_decoder.h — one interface over the Content-Encodings a POST /users
 * body may carry (gzip: gunzip.h, zstd: unzstd.h), so the streaming path and
 * the JSON-array mode decode any of them the same way. The contract is the
 * one of gunzip.h and unzstd.h: wire bytes in, decoded bytes out into the
 * caller's buffer, the decoded total capped, trailing bytes and truncation
 * judged by check_end().
 */
#ifndef JI_CONTENT_DECODER_H
#define JI_CONTENT_DECODER_H

#include "common.h"
#include "request_rules.h"

typedef struct st_ji_content_decoder_t ji_content_decoder_t;

/**
 * A decoder of `encoding` (JI_ENCODING_GZIP or JI_ENCODING_ZSTD) for one body, capped at `max_out` decoded bytes.
 * NULL when out of memory (or for JI_ENCODING_IDENTITY, which needs none).
 */
ji_content_decoder_t *ji_content_decoder_new(ji_content_encoding_t encoding, uint64_t max_out);
void ji_content_decoder_free(ji_content_decoder_t *d);

/** Decodes from `in` into `out`: ji_gunzip_run / ji_unzstd_run. */
int ji_content_decoder_run(ji_content_decoder_t *d, const char *in, size_t in_len, size_t *in_used, char *out,
                           size_t out_cap, size_t *out_len, ji_error_t *err) JI_MUST_CHECK;

/** True when the input so far ends exactly after a complete gzip member or zstd frame. */
bool ji_content_decoder_finished(const ji_content_decoder_t *d);

/** Trailing bytes after the end, or a truncated end: ji_gunzip_check_end / ji_unzstd_check_end. */
int ji_content_decoder_check_end(const ji_content_decoder_t *d, size_t trailing, bool input_ended,
                                 ji_error_t *err) JI_MUST_CHECK;

/** Total decoded so far. */
uint64_t ji_content_decoder_total_out(const ji_content_decoder_t *d);

/**
 * Memory one decoder of `encoding` may hold beyond what JI_UPLOAD_FIXED_BYTES already counts (zlib's 32 KiB
 * window is in it; a zstd window is not): what an upload reserves from --max-memory for it.
 */
uint64_t ji_content_decoder_memory(ji_content_encoding_t encoding);

#endif
