/*
 * content_digest.h — the Content-Digest request header (RFC 9530) of
 * POST /users: the header value parsed as an RFC 8941 Structured Field
 * Dictionary into the digests the client expects (sha-256, sha-512; other
 * algorithms are ignored), and the hashing of the content as received (after
 * chunked framing, before any Content-Encoding is undone) that checks them:
 * a streaming context fed piece by piece, or one call over a whole body.
 * Nothing here knows HTTP connections or the ingest.
 */
#ifndef JI_CONTENT_DIGEST_H
#define JI_CONTENT_DIGEST_H

#include "common.h"

/** The algorithms checked. Any other key of the dictionary is ignored. */
typedef enum { JI_DIGEST_SHA256, JI_DIGEST_SHA512, JI_DIGEST_ALG_COUNT } ji_digest_alg_t;

/** Bytes of the longest digest (SHA-512). */
#define JI_DIGEST_MAX_BYTES 64

/** What the header asks for: a digest per known algorithm present. All zero: nothing to check. */
typedef struct st_ji_content_digest_expect_t {
    bool present[JI_DIGEST_ALG_COUNT];
    unsigned char value[JI_DIGEST_ALG_COUNT][JI_DIGEST_MAX_BYTES];
} ji_content_digest_expect_t;

/** The algorithm's key in the header ("sha-256", "sha-512"). */
const char *ji_digest_alg_name(ji_digest_alg_t alg);
/** The digest size of an algorithm in bytes (32, 64). */
size_t ji_digest_alg_size(ji_digest_alg_t alg);

/**
 * Parses a Content-Digest header value into `e`. The value must be a valid RFC 8941 Dictionary (any members,
 * any item types, parameters) of at most JI_MAX_CONTENT_DIGEST_BYTES; a known algorithm must be a Byte Sequence
 * (`:base64:`) of exactly its digest size and appear once. An empty value is an empty dictionary. 0, or -1 with
 * `err` filled (JI_ERR_MALFORMED: 400) and `e` expecting nothing.
 */
int ji_content_digest_parse(ji_content_digest_expect_t *e, const char *value, size_t len,
                            ji_error_t *err) JI_MUST_CHECK;

/** True when `e` names at least one known algorithm (there is something to check). */
bool ji_content_digest_wanted(const ji_content_digest_expect_t *e);

/**
 * The hashing of one body, piece by piece: one OpenSSL EVP context per algorithm expected. Past the first
 * JI_DIGEST_INLINE_BYTES the hashing runs on a helper thread of the context (JI_DIGEST_BUFFER_BYTES of queue);
 * the calls themselves belong to one thread.
 */
typedef struct st_ji_content_digest_t ji_content_digest_t;

/** A context for the algorithms `e` expects (copied). NULL when out of memory or OpenSSL refuses. */
ji_content_digest_t *ji_content_digest_new(const ji_content_digest_expect_t *e);

/** Hashes the next `len` bytes of the content (copied when the helper hashes them: `data` may go at once). */
void ji_content_digest_update(ji_content_digest_t *d, const void *data, size_t len);

/**
 * The content ended: finishes every hash and compares it with the header's. 0 when all match, or -1 with `err`:
 * JI_ERR_MALFORMED (400) "Content-Digest sha-256 does not match the content" for the first that does not (sha-256
 * first), JI_ERR_INTERNAL when OpenSSL failed. Later calls answer the same; updates after the first are ignored.
 */
int ji_content_digest_verify(ji_content_digest_t *d, ji_error_t *err) JI_MUST_CHECK;

void ji_content_digest_free(ji_content_digest_t *d);

/** The whole content at once (`e` expecting nothing: 0). Same answers as ji_content_digest_verify. */
int ji_content_digest_check(const ji_content_digest_expect_t *e, const void *data, size_t len,
                            ji_error_t *err) JI_MUST_CHECK;

#endif
