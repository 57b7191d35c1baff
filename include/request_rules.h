/*
 * request_rules.h — the rules every request head goes through, in one place,
 * before a byte of its body is read: the request line and headers are parsed
 * once (picohttpparser) into ji_request_head_t; framing (Content-Length,
 * chunked, Expect, Connection), duplicate and malformed headers, the bearer
 * token, Origin and Host are judged here; and for POST /users the query
 * options, the format rules, Content-Encoding, the Idempotency-Key and the
 * Content-Digest.
 * Nothing here touches a socket: the front door feeds it bytes and acts on
 * the verdict, and the fuzz target feeds it anything.
 */
#ifndef JI_REQUEST_RULES_H
#define JI_REQUEST_RULES_H

#include "common.h"
#include "content_digest.h"
#include "ingest.h"
#include "picohttp.h"

typedef enum { JI_FORMAT_UNDECIDED, JI_FORMAT_JSONL, JI_FORMAT_ARRAY } ji_format_t;
typedef enum { JI_ENCODING_IDENTITY, JI_ENCODING_GZIP, JI_ENCODING_ZSTD } ji_content_encoding_t;

/** A parsed request head. Pointers point into the buffer given to ji_request_head_parse. */
typedef struct st_ji_request_head_t {
    size_t head_len; /**< bytes of the head, blank line included */
    const char *method;
    size_t method_len;
    const char *path; /**< without the query */
    size_t path_len;
    const char *query; /**< after '?', NULL when there is none */
    size_t query_len;
    int minor_version;
    struct phr_header headers[JI_MAX_HEADERS];
    size_t num_headers;

    /* framing */
    bool has_length;
    uint64_t content_length;
    bool chunked;
    bool expect_continue;
    bool keep_alive;

    /* headers the rules look at (NULL when absent) */
    const struct phr_header *host, *origin, *authorization, *content_type, *idempotency_key, *forwarded_for;
    const struct phr_header *content_digest; /**< judged per route (ji_upload_options_parse) */
    ji_content_encoding_t encoding;
    bool unknown_encoding; /**< a Content-Encoding other than gzip/zstd/identity (judged per route) */
} ji_request_head_t;

/** True when the request carries a body (a Content-Length above 0, or chunked). */
static inline bool ji_request_has_body(const ji_request_head_t *h)
{
    return h->chunked || (h->has_length && h->content_length > 0);
}

/**
 * Parses the head at the front of `buf`. 0 = parsed (h filled), 1 = incomplete (read more), -1 = refused (`err`
 * filled: 400 malformed or ambiguous framing, 431 over JI_MAX_HEAD_BYTES or JI_MAX_HEADERS, 501 an unknown
 * Transfer-Encoding, 417 an unknown Expect, 400 a duplicate Authorization, Host, Origin, Idempotency-Key or
 * Content-Digest).
 */
int ji_request_head_parse(ji_request_head_t *h, const char *buf, size_t len, ji_error_t *err) JI_MUST_CHECK;

/**
 * The Content-Encoding named by `value` (ASCII case-insensitive): "identity", "gzip" (or "x-gzip"), "zstd". 0, or
 * -1 for any other value (a list of codings included).
 */
int ji_content_encoding_parse(const char *value, size_t len, ji_content_encoding_t *encoding) JI_MUST_CHECK;

/** True when the header's name is `name` (ASCII case-insensitive). */
bool ji_header_is(const struct phr_header *h, const char *name);

/* ---- who may ask ---- */

/** Lists of allowed Origin and Host values (--allowed-origins, --allowed-hosts); "*" allows any. Read-only. */
typedef struct st_ji_request_policy_t {
    const char *token; /**< --token-file's token, NULL: no authentication */
    size_t token_len;
    const char *allowed_origins; /**< comma-separated, exact (scheme://host[:port]); NULL or "": none */
    const char *allowed_hosts;   /**< comma-separated host names (port ignored); "*": any */
} ji_request_policy_t;

/**
 * Origin, Host and the bearer token, in that order. 0, or -1 with `err`: 403 for an Origin that is not allowed
 * or a Host that is not allowed, 401 for a missing or wrong token (compared in constant time). `needs_token`
 * says whether the route requires the token when one is configured; `check_host` whether the Host is judged.
 */
int ji_request_check_policy(const ji_request_head_t *h, const ji_request_policy_t *p, bool needs_token, bool check_host,
                            ji_error_t *err) JI_MUST_CHECK;

/* ---- POST /users ---- */

/** What a POST /users asks for. */
typedef struct st_ji_upload_options_t {
    ji_format_t format; /**< from ?format=, else the Content-Type; UNDECIDED: the first body byte decides */
    bool skip_errors;   /**< ?on_error=skip (or ?max_errors=N) */
    bool has_max_errors;
    uint64_t max_errors; /**< ?max_errors=N: the (N+1)-th rejected record fails the request */
    ji_content_encoding_t encoding;
    char idempotency_key[JI_MAX_IDEMPOTENCY_KEY_BYTES + 1]; /**< "" when none (quotes of the quoted form removed) */
    ji_content_digest_expect_t digest; /**< Content-Digest: the digests to check (none: all false) */
    bool has_append;                   /**< the body is an append to a resumable upload (`append`) */
    ji_ingest_append_t append;
} ji_upload_options_t;

/**
 * The upload's options from its head: query (format, on_error), Content-Type, Content-Encoding, Idempotency-Key
 * and Content-Digest. 0, or -1 with `err` (415 unknown format or encoding, 400 bad on_error, key or digest).
 */
int ji_upload_options_parse(ji_upload_options_t *o, const ji_request_head_t *h, ji_error_t *err) JI_MUST_CHECK;

/** Reads the query string (without '?'). 0, or -1 with `err` filled (415 unknown format, 400 unknown on_error). */
int ji_upload_options_parse_query(ji_upload_options_t *o, const char *query, size_t len, ji_error_t *err) JI_MUST_CHECK;

/** True for the Content-Types that mean JSON Lines (parameters such as "; charset=utf-8" ignored). */
bool ji_content_type_is_jsonl(const char *value, size_t len);

/** The first-byte rule: 1 when the first non-space byte of `body` is '[', 0 when another byte, -1 when none yet. */
int ji_body_is_array(const char *body, size_t len);

#endif
