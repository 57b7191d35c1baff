/*
 * request_rules.c — parses a request head once and judges it: framing, the
 * headers that must not repeat, who may ask (token, Origin, Host), and what a
 * POST /users asks for (format, on_error, Content-Encoding, Idempotency-Key,
 * Content-Digest).
 */
#include "request_rules.h"

#include "idempotency.h"

#include <openssl/crypto.h>
#include <string.h>
#include <strings.h>

static bool span_is(const char *s, size_t len, const char *lit)
{
    return len == strlen(lit) && memcmp(s, lit, len) == 0;
}

bool ji_header_is(const struct phr_header *h, const char *name)
{
    return h->name != NULL && h->name_len == strlen(name) && strncasecmp(h->name, name, h->name_len) == 0;
}

static bool value_is(const struct phr_header *h, const char *value)
{
    return h->value_len == strlen(value) && strncasecmp(h->value, value, h->value_len) == 0;
}

int ji_content_encoding_parse(const char *value, size_t len, ji_content_encoding_t *encoding)
{
    static const struct {
        const char *name;
        ji_content_encoding_t encoding;
    } known[] = {
        {"identity", JI_ENCODING_IDENTITY},
        {"gzip", JI_ENCODING_GZIP},
        {"x-gzip", JI_ENCODING_GZIP},
        {"zstd", JI_ENCODING_ZSTD},
    };

    for (size_t i = 0; i != sizeof(known) / sizeof(known[0]); i++) {
        if (len == strlen(known[i].name) && strncasecmp(value, known[i].name, len) == 0) {
            *encoding = known[i].encoding;
            return 0;
        }
    }
    return -1;
}

/** Calls `fn` for each comma-separated element of `s` (spaces and tabs around it trimmed); stops when it returns true. */
static bool any_element(const char *s, size_t len, bool (*fn)(const char *e, size_t elen, const void *arg),
                        const void *arg)
{
    const char *p = s, *end = s + len;

    while (p <= end) {
        const char *comma = memchr(p, ',', end - p), *stop = comma != NULL ? comma : end, *q = stop;
        while (p < stop && (*p == ' ' || *p == '\t'))
            p++;
        while (q > p && (q[-1] == ' ' || q[-1] == '\t'))
            q--;
        if (q > p && fn(p, q - p, arg))
            return true;
        if (comma == NULL)
            break;
        p = comma + 1;
    }
    return false;
}

static bool element_is_token(const char *e, size_t elen, const void *token)
{
    return elen == strlen(token) && strncasecmp(e, token, elen) == 0;
}

static bool value_has_token(const struct phr_header *h, const char *token)
{
    return any_element(h->value, h->value_len, element_is_token, token);
}

/** Whether the (possibly partial) head holds more header lines than JI_MAX_HEADERS. */
static bool too_many_headers(const char *buf, size_t len)
{
    size_t lines = 0;

    for (const char *p = buf, *end = buf + len; p < end && (p = memchr(p, '\n', end - p)) != NULL; p++) {
        lines++;
        if (p + 1 < end && (p[1] == '\n' || (p[1] == '\r' && p + 2 < end && p[2] == '\n')))
            break; /* the blank line: the head ended */
    }
    return lines > JI_MAX_HEADERS + 1; /* the request line is one of them */
}

static int parse_content_length(ji_request_head_t *h, const struct phr_header *hdr, ji_error_t *err)
{
    uint64_t n = 0;

    if (hdr->value_len == 0 || hdr->value_len > 19)
        goto Bad;
    for (size_t k = 0; k < hdr->value_len; k++) {
        if (hdr->value[k] < '0' || hdr->value[k] > '9')
            goto Bad;
        n = n * 10 + (uint64_t)(hdr->value[k] - '0');
    }
    if (h->has_length && n != h->content_length)
        goto Bad;
    h->has_length = true;
    h->content_length = n;
    return 0;
Bad:
    return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "invalid Content-Length");
}

/** Keeps the first occurrence of a header that must appear once; a second one is 400. */
static int take_once(const struct phr_header **slot, const struct phr_header *hdr, const char *name, ji_error_t *err)
{
    if (*slot != NULL)
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "more than one %s header", name);
    *slot = hdr;
    return 0;
}

int ji_request_head_parse(ji_request_head_t *h, const char *buf, size_t len, ji_error_t *err)
{
    const char *method, *path, *q;
    size_t method_len, path_len;
    bool connection_close = false, connection_keep_alive = false;
    int minor, r;

    memset(h, 0, sizeof(*h));
    h->num_headers = JI_MAX_HEADERS;
    r = phr_parse_request(buf, len, &method, &method_len, &path, &path_len, &minor, h->headers, &h->num_headers, 0);
    if ((r == -2 && len >= JI_MAX_HEAD_BYTES) || r > JI_MAX_HEAD_BYTES)
        return ji_error_set(err, JI_ERR_HEAD_TOO_LARGE, 0, NULL,
                            "request head is larger than JI_MAX_HEAD_BYTES (" JI_STR(JI_MAX_HEAD_BYTES) " bytes)");
    if (r == -2)
        return 1;
    if (r == -1) {
        /* picohttpparser says -1 for more headers than it was given room for, too */
        if (too_many_headers(buf, len))
            return ji_error_set(err, JI_ERR_HEAD_TOO_LARGE, 0, NULL,
                                "request head has more than JI_MAX_HEADERS (" JI_STR(JI_MAX_HEADERS) ") headers");
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "malformed request head");
    }
    h->head_len = (size_t)r;
    h->method = method;
    h->method_len = method_len;
    h->minor_version = minor;
    h->path = path;
    h->path_len = path_len;
    if ((q = memchr(path, '?', path_len)) != NULL) {
        h->path_len = (size_t)(q - path);
        h->query = q + 1;
        h->query_len = path_len - h->path_len - 1;
    }
    if (minor > 1)
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "unsupported HTTP version");

    for (size_t i = 0; i != h->num_headers; i++) {
        const struct phr_header *hdr = &h->headers[i];
        if (hdr->name == NULL)
            return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "obsolete header line folding");
        if (ji_header_is(hdr, "content-length")) {
            if (parse_content_length(h, hdr, err) != 0)
                return -1;
        } else if (ji_header_is(hdr, "transfer-encoding")) {
            if (!value_is(hdr, "chunked"))
                return ji_error_set(err, JI_ERR_NOT_IMPLEMENTED, 0, NULL,
                                    "only Transfer-Encoding: chunked is supported");
            if (h->chunked)
                return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "more than one Transfer-Encoding header");
            h->chunked = true;
        } else if (ji_header_is(hdr, "content-encoding")) {
            ji_content_encoding_t enc;
            /* a second, different coding would mean both were applied: not supported */
            if (ji_content_encoding_parse(hdr->value, hdr->value_len, &enc) != 0 ||
                (enc != JI_ENCODING_IDENTITY && h->encoding != JI_ENCODING_IDENTITY && enc != h->encoding))
                h->unknown_encoding = true;
            else if (enc != JI_ENCODING_IDENTITY)
                h->encoding = enc;
        } else if (ji_header_is(hdr, "expect")) {
            if (!value_is(hdr, "100-continue"))
                return ji_error_set(err, JI_ERR_EXPECTATION, 0, NULL, "unknown expectation");
            h->expect_continue = minor >= 1;
        } else if (ji_header_is(hdr, "connection")) {
            connection_close |= value_has_token(hdr, "close");
            connection_keep_alive |= value_has_token(hdr, "keep-alive");
        } else if (ji_header_is(hdr, "host")) {
            if (take_once(&h->host, hdr, "Host", err) != 0)
                return -1;
        } else if (ji_header_is(hdr, "origin")) {
            if (take_once(&h->origin, hdr, "Origin", err) != 0)
                return -1;
        } else if (ji_header_is(hdr, "authorization")) {
            if (take_once(&h->authorization, hdr, "Authorization", err) != 0)
                return -1;
        } else if (ji_header_is(hdr, "content-type")) {
            if (h->content_type == NULL) /* the first one counts (only this module reads it) */
                h->content_type = hdr;
        } else if (ji_header_is(hdr, "idempotency-key")) {
            if (take_once(&h->idempotency_key, hdr, "Idempotency-Key", err) != 0)
                return -1;
        } else if (ji_header_is(hdr, "content-digest")) {
            if (take_once(&h->content_digest, hdr, "Content-Digest", err) != 0)
                return -1;
        } else if (ji_header_is(hdr, "x-forwarded-for")) {
            h->forwarded_for = hdr; /* the last one holds the nearest hop */
        }
    }
    if (h->has_length && h->chunked)
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "Content-Length and Transfer-Encoding together");
    if (h->chunked && minor == 0)
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "chunked encoding needs HTTP/1.1");
    h->keep_alive = minor >= 1 ? !connection_close : connection_keep_alive;
    return 0;
}

/* ------------------------------------------------------------------ who may ask */

static bool element_is_exact(const char *e, size_t elen, const void *arg)
{
    const struct phr_header *h = arg;
    return (elen == 1 && e[0] == '*') || (elen == h->value_len && strncasecmp(e, h->value, elen) == 0);
}

/** The host name of a Host value: without the port, brackets kept for IPv6 ("[::1]:8000" -> "[::1]"). */
static size_t host_name_len(const char *v, size_t len)
{
    if (len > 0 && v[0] == '[') {
        const char *close = memchr(v, ']', len);
        return close != NULL ? (size_t)(close - v) + 1 : len;
    }
    const char *colon = memchr(v, ':', len);
    return colon != NULL ? (size_t)(colon - v) : len;
}

static bool element_is_host(const char *e, size_t elen, const void *arg)
{
    const struct phr_header *h = arg;
    size_t n = host_name_len(h->value, h->value_len);
    return (elen == 1 && e[0] == '*') || (elen == n && strncasecmp(e, h->value, n) == 0);
}

static bool token_matches(const ji_request_policy_t *p, const struct phr_header *auth)
{
    static const char scheme[] = "Bearer ";
    const char *v;
    size_t len;

    if (auth == NULL || auth->value_len < sizeof(scheme) - 1 ||
        strncasecmp(auth->value, scheme, sizeof(scheme) - 1) != 0)
        return false;
    v = auth->value + sizeof(scheme) - 1;
    len = auth->value_len - (sizeof(scheme) - 1);
    while (len > 0 && v[0] == ' ') {
        v++;
        len--;
    }
    return len == p->token_len && CRYPTO_memcmp(v, p->token, len) == 0;
}

int ji_request_check_policy(const ji_request_head_t *h, const ji_request_policy_t *p, bool needs_token, bool check_host,
                            ji_error_t *err)
{
    if (h->origin != NULL && (p->allowed_origins == NULL || !any_element(p->allowed_origins, strlen(p->allowed_origins),
                                                                         element_is_exact, h->origin)))
        return ji_error_set(err, JI_ERR_FORBIDDEN, 0, NULL, "Origin %.*s is not in --allowed-origins",
                            (int)(h->origin->value_len < 100 ? h->origin->value_len : 100), h->origin->value);
    if (check_host && h->host != NULL && p->allowed_hosts != NULL &&
        !any_element(p->allowed_hosts, strlen(p->allowed_hosts), element_is_host, h->host))
        return ji_error_set(err, JI_ERR_FORBIDDEN, 0, NULL, "Host %.*s is not in --allowed-hosts",
                            (int)(h->host->value_len < 100 ? h->host->value_len : 100), h->host->value);
    if (needs_token && p->token != NULL && !token_matches(p, h->authorization))
        return ji_error_set(err, JI_ERR_UNAUTHORIZED, 0, NULL, "missing or invalid bearer token");
    return 0;
}

/* ------------------------------------------------------------------ POST /users */

/** A decimal number of at most 18 digits (no sign, no spaces): 0, or -1. */
static int parse_count(const char *v, size_t len, uint64_t *out)
{
    uint64_t n = 0;

    if (len == 0 || len > 18)
        return -1;
    for (size_t i = 0; i < len; i++) {
        if (v[i] < '0' || v[i] > '9')
            return -1;
        n = n * 10 + (uint64_t)(v[i] - '0');
    }
    *out = n;
    return 0;
}

int ji_upload_options_parse_query(ji_upload_options_t *o, const char *query, size_t len, ji_error_t *err)
{
    const char *p = query, *end = query + len;
    bool said_fail = false;

    while (p < end) {
        const char *amp = memchr(p, '&', end - p), *stop = amp != NULL ? amp : end;
        const char *eq = memchr(p, '=', stop - p), *v = eq != NULL ? eq + 1 : stop;
        size_t klen = (eq != NULL ? eq : stop) - p, vlen = stop - v;

        if (span_is(p, klen, "format")) {
            if (span_is(v, vlen, "array"))
                o->format = JI_FORMAT_ARRAY;
            else if (span_is(v, vlen, "jsonl") || span_is(v, vlen, "ndjson"))
                o->format = JI_FORMAT_JSONL;
            else
                return ji_error_set(err, JI_ERR_UNSUPPORTED, 0, NULL,
                                    "unknown format: use format=jsonl or format=array");
        } else if (span_is(p, klen, "on_error")) {
            if (span_is(v, vlen, "skip"))
                o->skip_errors = true;
            else if (span_is(v, vlen, "fail"))
                o->skip_errors = false;
            else
                return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL,
                                    "unknown on_error: use on_error=skip or on_error=fail");
            said_fail = !o->skip_errors;
        } else if (span_is(p, klen, "max_errors")) {
            if (parse_count(v, vlen, &o->max_errors) != 0)
                return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL,
                                    "max_errors must be a number of rejected records (0 to 18 digits)");
            o->has_max_errors = true;
        }
        p = stop + 1;
    }
    if (o->has_max_errors && said_fail)
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "max_errors goes with on_error=skip, not on_error=fail");
    if (o->has_max_errors)
        o->skip_errors = true; /* max_errors=N implies skip */
    return 0;
}

int ji_upload_options_parse(ji_upload_options_t *o, const ji_request_head_t *h, ji_error_t *err)
{
    memset(o, 0, sizeof(*o));
    if (ji_upload_options_parse_query(o, h->query != NULL ? h->query : "", h->query_len, err) != 0)
        return -1;
    if (h->unknown_encoding)
        return ji_error_set(err, JI_ERR_UNSUPPORTED, 0, NULL, "unsupported Content-Encoding");
    o->encoding = h->encoding;
    if (o->format == JI_FORMAT_UNDECIDED && h->content_type != NULL &&
        ji_content_type_is_jsonl(h->content_type->value, h->content_type->value_len))
        o->format = JI_FORMAT_JSONL;
    if (h->idempotency_key != NULL) {
        if (ji_idempotency_key_check(h->idempotency_key->value, h->idempotency_key->value_len, err) != 0)
            return -1;
        ji_idempotency_key_copy(o->idempotency_key, h->idempotency_key->value, h->idempotency_key->value_len);
    }
    if (h->content_digest != NULL &&
        ji_content_digest_parse(&o->digest, h->content_digest->value, h->content_digest->value_len, err) != 0)
        return -1;
    return 0;
}

bool ji_content_type_is_jsonl(const char *value, size_t len)
{
    static const char *const types[] = {"application/x-ndjson", "application/jsonl", "application/jsonlines",
                                        "application/x-jsonlines"};
    const char *semi = memchr(value, ';', len);

    if (semi != NULL)
        len = semi - value;
    while (len > 0 && (value[len - 1] == ' ' || value[len - 1] == '\t'))
        len--;
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
        if (len == strlen(types[i]) && strncasecmp(value, types[i], len) == 0)
            return true;
    return false;
}

int ji_body_is_array(const char *body, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (body[i] != ' ' && body[i] != '\t' && body[i] != '\r' && body[i] != '\n')
            return body[i] == '[';
    return -1;
}
