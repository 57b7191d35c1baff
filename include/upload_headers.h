/*
 * upload_headers.h — the headers of resumable uploads (docs/resumable.md),
 * read from a parsed request head and judged before any body byte or
 * database row: which protocol a request speaks (tus 1.0.0 or the IETF
 * draft, interop version 6), Tus-Resumable, Upload-Length and
 * Upload-Defer-Length, Upload-Offset, Upload-Complete (a structured-field
 * boolean), Upload-Metadata (whose keys on_error, max_errors and
 * idempotency_key are options of the upload), the Content-Type of an append
 * and its Content-Encoding. Nothing here touches a socket or the database.
 */
#ifndef JI_UPLOAD_HEADERS_H
#define JI_UPLOAD_HEADERS_H

#include "common.h"
#include "request_rules.h"

/** The tus version this service speaks (Tus-Resumable, Tus-Version). */
#define JI_TUS_VERSION "1.0.0"
/** The IETF draft's interop version this service speaks (Upload-Draft-Interop-Version). */
#define JI_DRAFT_INTEROP_VERSION "6"
/** The tus extensions this service implements (Tus-Extension). */
#define JI_TUS_EXTENSIONS "creation,creation-with-upload,creation-defer-length,termination,expiration"

/** The upload headers of one request, as sent (absent ones false / NULL). */
typedef struct st_ji_upload_headers_t {
    const struct phr_header *tus_resumable; /**< Tus-Resumable */
    bool draft;                             /**< Upload-Draft-Interop-Version: 6 */
    bool has_complete, complete;            /**< Upload-Complete: ?0 / ?1 */
    bool has_offset;
    uint64_t offset; /**< Upload-Offset */
    bool has_length;
    uint64_t length;      /**< Upload-Length */
    bool defer_length;    /**< Upload-Defer-Length: 1 */
    const char *metadata; /**< Upload-Metadata as sent (points into the head), or NULL */
    size_t metadata_len;
} ji_upload_headers_t;

/**
 * Reads the upload headers of `h`. 0, or -1 with `err` (400: a header given twice, a number that is not one, an
 * Upload-Complete other than ?0/?1, an Upload-Defer-Length other than 1, an interop version other than 6).
 */
int ji_upload_headers_parse(ji_upload_headers_t *u, const ji_request_head_t *h, ji_error_t *err) JI_MUST_CHECK;

/** A draft creation: a POST /users with both Upload-Complete and Upload-Draft-Interop-Version (of any value). */
bool ji_upload_headers_draft_creation(const ji_request_head_t *h);

/** What a creation request asks for: the options the upload keeps for all its appends. */
typedef struct st_ji_upload_creation_t {
    bool draft;                  /**< the IETF draft (POST /users), else tus (POST /uploads) */
    bool has_length;             /**< the length is known (tus Upload-Length) */
    uint64_t length;             /**< bytes of the whole upload */
    bool complete;               /**< draft: Upload-Complete: ?1 (the body is the whole upload) */
    ji_upload_options_t options; /**< on_error, max_errors, Idempotency-Key (query, header, metadata) */
} ji_upload_creation_t;

/**
 * Judges a creation: tus `POST /uploads` (412 without Tus-Resumable: 1.0.0; 400 without Upload-Length or
 * Upload-Defer-Length: 1; 413 for a length above `max_bytes`; 415 for a body whose Content-Type is not
 * application/offset+octet-stream) or a draft `POST /users`. Options come from the query, the Idempotency-Key
 * header and the metadata keys on_error, max_errors and idempotency_key, checked like those of POST /users (400).
 * Any Content-Encoding other than identity is 415. 0, or -1 with `err`.
 */
int ji_upload_creation_check(ji_upload_creation_t *c, const ji_request_head_t *h, const ji_upload_headers_t *u,
                             bool draft, uint64_t max_bytes, ji_error_t *err) JI_MUST_CHECK;

/**
 * Judges an append (PATCH): the draft when the interop header is there (Upload-Offset and Upload-Complete
 * required, Content-Type application/partial-upload), else tus (412 without Tus-Resumable: 1.0.0, Upload-Offset
 * required, Content-Type application/offset+octet-stream). 415 for a wrong Content-Type or a Content-Encoding other
 * than identity, 413 for an Upload-Length above `max_bytes`. 0, or -1 with `err`.
 */
int ji_upload_append_check(const ji_request_head_t *h, const ji_upload_headers_t *u, uint64_t max_bytes,
                           ji_error_t *err) JI_MUST_CHECK;

/**
 * Applies Upload-Metadata (`key base64value` pairs, comma-separated; a key alone has an empty value) to `o`: keys
 * on_error, max_errors and idempotency_key, others ignored. 0, or -1 with `err` (400: bad base64, a bad value).
 */
int ji_upload_metadata_apply(ji_upload_options_t *o, const char *metadata, size_t len, ji_error_t *err) JI_MUST_CHECK;

#endif
