/*
 * upload_headers.c — reads and judges the headers of resumable uploads (tus
 * 1.0.0 and the IETF draft) from a parsed request head: protocol, lengths,
 * offsets, completion, metadata options, Content-Type and Content-Encoding.
 */
#include "upload_headers.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "base64.h"
#include "idempotency.h"

static bool value_is(const struct phr_header *h, const char *lit)
{
    return h->value_len == strlen(lit) && memcmp(h->value, lit, h->value_len) == 0;
}

/** A decimal number of at most 18 digits: 0, or -1. */
static int parse_number(const struct phr_header *h, uint64_t *out)
{
    uint64_t n = 0;

    if (h->value_len == 0 || h->value_len > 18)
        return -1;
    for (size_t i = 0; i < h->value_len; i++) {
        if (h->value[i] < '0' || h->value[i] > '9')
            return -1;
        n = n * 10 + (uint64_t)(h->value[i] - '0');
    }
    *out = n;
    return 0;
}

static int once(bool *seen, const char *name, ji_error_t *err)
{
    if (*seen)
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "more than one %s header", name);
    *seen = true;
    return 0;
}

int ji_upload_headers_parse(ji_upload_headers_t *u, const ji_request_head_t *h, ji_error_t *err)
{
    bool seen_interop = false, seen_defer = false, seen_metadata = false;

    memset(u, 0, sizeof(*u));
    for (size_t i = 0; i < h->num_headers; i++) {
        const struct phr_header *hdr = &h->headers[i];
        if (ji_header_is(hdr, "tus-resumable")) {
            if (u->tus_resumable != NULL)
                return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "more than one Tus-Resumable header");
            u->tus_resumable = hdr;
        } else if (ji_header_is(hdr, "upload-draft-interop-version")) {
            if (once(&seen_interop, "Upload-Draft-Interop-Version", err) != 0)
                return -1;
            if (!value_is(hdr, JI_DRAFT_INTEROP_VERSION))
                return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL,
                                    "Upload-Draft-Interop-Version must be " JI_DRAFT_INTEROP_VERSION);
            u->draft = true;
        } else if (ji_header_is(hdr, "upload-complete")) {
            if (once(&u->has_complete, "Upload-Complete", err) != 0)
                return -1;
            if (!value_is(hdr, "?0") && !value_is(hdr, "?1"))
                return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "Upload-Complete must be ?0 or ?1");
            u->complete = value_is(hdr, "?1");
        } else if (ji_header_is(hdr, "upload-offset")) {
            if (once(&u->has_offset, "Upload-Offset", err) != 0)
                return -1;
            if (parse_number(hdr, &u->offset) != 0)
                return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "Upload-Offset must be a number of bytes");
        } else if (ji_header_is(hdr, "upload-length")) {
            if (once(&u->has_length, "Upload-Length", err) != 0)
                return -1;
            if (parse_number(hdr, &u->length) != 0)
                return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "Upload-Length must be a number of bytes");
        } else if (ji_header_is(hdr, "upload-defer-length")) {
            if (once(&seen_defer, "Upload-Defer-Length", err) != 0)
                return -1;
            if (!value_is(hdr, "1"))
                return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "Upload-Defer-Length must be 1");
            u->defer_length = true;
        } else if (ji_header_is(hdr, "upload-metadata")) {
            if (once(&seen_metadata, "Upload-Metadata", err) != 0)
                return -1;
            u->metadata = hdr->value;
            u->metadata_len = hdr->value_len;
        }
    }
    if (u->has_length && u->defer_length)
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "Upload-Length and Upload-Defer-Length together");
    return 0;
}

bool ji_upload_headers_draft_creation(const ji_request_head_t *h)
{
    bool complete = false, interop = false;

    for (size_t i = 0; i < h->num_headers; i++) {
        complete |= ji_header_is(&h->headers[i], "upload-complete");
        interop |= ji_header_is(&h->headers[i], "upload-draft-interop-version");
    }
    return complete && interop;
}

/** 412 unless Tus-Resumable says the version this service speaks. */
static int check_tus_version(const ji_upload_headers_t *u, ji_error_t *err)
{
    if (u->tus_resumable == NULL || !value_is(u->tus_resumable, JI_TUS_VERSION))
        return ji_error_set(err, JI_ERR_PRECONDITION, 0, NULL,
                            "Tus-Resumable must be " JI_TUS_VERSION " (the tus version this service speaks)");
    return 0;
}

/** The head's Content-Type is `type` (parameters ignored, case-insensitive). */
static bool content_type_is(const ji_request_head_t *h, const char *type)
{
    const char *v;
    size_t len;

    if (h->content_type == NULL)
        return false;
    v = h->content_type->value;
    len = h->content_type->value_len;
    if (memchr(v, ';', len) != NULL)
        len = (size_t)((const char *)memchr(v, ';', len) - v);
    while (len > 0 && (v[len - 1] == ' ' || v[len - 1] == '\t'))
        len--;
    return len == strlen(type) && strncasecmp(v, type, len) == 0;
}

static int check_identity(const ji_request_head_t *h, ji_error_t *err)
{
    if (h->unknown_encoding || h->encoding != JI_ENCODING_IDENTITY)
        return ji_error_set(err, JI_ERR_UNSUPPORTED, 0, NULL,
                            "a resumable upload takes identity content only: a Content-Encoding cannot be resumed");
    return 0;
}

/*
 * The metadata's value of one pair, decoded into `out` (JI_BASE64_DECODED_MAX(len) bytes); its length, or -1
 * (invalid base64).
 */
static long decode_value(const char *v, size_t len, char *out)
{
    ji_base64_t d;
    long n;

    ji_base64_init(&d);
    if ((n = ji_base64_decode(&d, v, len, (unsigned char *)out)) < 0 || ji_base64_finish(&d) != 0)
        return -1;
    return n;
}

int ji_upload_metadata_apply(ji_upload_options_t *o, const char *metadata, size_t len, ji_error_t *err)
{
    const char *p = metadata, *end = metadata + len;
    char *query = NULL, *value = NULL;
    size_t qlen = 0;
    int ret = -1;

    /* the options become a query of their own, checked by the rules of POST /users' query */
    if ((query = malloc(len + 1)) == NULL || (value = malloc(JI_BASE64_DECODED_MAX(len) + 1)) == NULL) {
        ji_error_set(err, JI_ERR_INTERNAL, 0, NULL, "out of memory");
        goto cleanup;
    }
    while (p < end) {
        const char *comma = memchr(p, ',', (size_t)(end - p)), *stop = comma != NULL ? comma : end;
        const char *key, *sp, *v;
        size_t klen, vlen;
        long n;

        while (p < stop && (*p == ' ' || *p == '\t'))
            p++;
        key = p;
        sp = memchr(p, ' ', (size_t)(stop - p));
        klen = (size_t)((sp != NULL ? sp : stop) - key);
        v = sp != NULL ? sp + 1 : stop;
        vlen = (size_t)(stop - v);
        while (vlen > 0 && (v[vlen - 1] == ' ' || v[vlen - 1] == '\t'))
            vlen--;
        p = stop + 1;
        if (klen == 0)
            continue;
        if ((n = decode_value(v, vlen, value)) < 0) {
            ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "Upload-Metadata: the value of %.*s is not base64",
                         (int)(klen < 64 ? klen : 64), key);
            goto cleanup;
        }
        value[n] = '\0';
        if ((klen == 8 && memcmp(key, "on_error", 8) == 0) || (klen == 10 && memcmp(key, "max_errors", 10) == 0)) {
            if (memchr(value, '&', (size_t)n) != NULL || memchr(value, '=', (size_t)n) != NULL ||
                (size_t)n + klen + 2 > len) {
                ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "Upload-Metadata: bad value of %.*s", (int)klen, key);
                goto cleanup;
            }
            qlen += (size_t)snprintf(query + qlen, len + 1 - qlen, "%s%.*s=%s", qlen != 0 ? "&" : "", (int)klen, key,
                                     value);
        } else if (klen == 15 && memcmp(key, "idempotency_key", 15) == 0) {
            if (ji_idempotency_key_check(value, (size_t)n, err) != 0)
                goto cleanup;
            if (o->idempotency_key[0] == '\0') /* the header wins over the metadata */
                ji_idempotency_key_copy(o->idempotency_key, value, (size_t)n);
        }
    }
    if (qlen != 0 && ji_upload_options_parse_query(o, query, qlen, err) != 0)
        goto cleanup;
    ret = 0;
cleanup:
    free(query);
    free(value);
    return ret;
}

int ji_upload_creation_check(ji_upload_creation_t *c, const ji_request_head_t *h, const ji_upload_headers_t *u,
                             bool draft, uint64_t max_bytes, ji_error_t *err)
{
    ji_upload_options_t *o = &c->options;

    memset(c, 0, sizeof(*c));
    c->draft = draft;
    if (!draft && check_tus_version(u, err) != 0)
        return -1;
    if (!draft && !u->has_length && !u->defer_length)
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL,
                            "creating an upload needs Upload-Length or "
                            "Upload-Defer-Length: 1");
    if (draft && !u->has_complete)
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "Upload-Complete is required");
    if (u->has_length && u->length > max_bytes)
        return ji_error_set(err, JI_ERR_TOO_LARGE, 0, NULL,
                            "Upload-Length %llu is larger than --max-upload-bytes (%llu bytes)",
                            (unsigned long long)u->length, (unsigned long long)max_bytes);
    if (check_identity(h, err) != 0)
        return -1;
    if (!draft && ji_request_has_body(h) && !content_type_is(h, "application/offset+octet-stream"))
        return ji_error_set(err, JI_ERR_UNSUPPORTED, 0, NULL,
                            "a creation with a body needs Content-Type: application/offset+octet-stream");
    c->has_length = u->has_length;
    c->length = u->length;
    c->complete = draft && u->complete;
    if (ji_upload_options_parse_query(o, h->query != NULL ? h->query : "", h->query_len, err) != 0)
        return -1;
    if (o->format == JI_FORMAT_ARRAY)
        return ji_error_set(err, JI_ERR_UNSUPPORTED, 0, NULL, "a resumable upload takes JSON Lines only");
    if (h->idempotency_key != NULL) {
        if (ji_idempotency_key_check(h->idempotency_key->value, h->idempotency_key->value_len, err) != 0)
            return -1;
        ji_idempotency_key_copy(o->idempotency_key, h->idempotency_key->value, h->idempotency_key->value_len);
    }
    if (u->metadata != NULL && ji_upload_metadata_apply(o, u->metadata, u->metadata_len, err) != 0)
        return -1;
    return 0;
}

int ji_upload_append_check(const ji_request_head_t *h, const ji_upload_headers_t *u, uint64_t max_bytes,
                           ji_error_t *err)
{
    if (!u->draft && check_tus_version(u, err) != 0)
        return -1;
    if (!u->has_offset)
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "an append needs Upload-Offset");
    if (u->draft && !u->has_complete)
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "an append needs Upload-Complete");
    if (check_identity(h, err) != 0)
        return -1;
    if (ji_request_has_body(h) || h->content_type != NULL) {
        const char *type = u->draft ? "application/partial-upload" : "application/offset+octet-stream";
        if (!content_type_is(h, type))
            return ji_error_set(err, JI_ERR_UNSUPPORTED, 0, NULL, "an append needs Content-Type: %s", type);
    }
    if (u->has_length && u->length > max_bytes)
        return ji_error_set(err, JI_ERR_TOO_LARGE, 0, NULL,
                            "Upload-Length %llu is larger than --max-upload-bytes (%llu bytes)",
                            (unsigned long long)u->length, (unsigned long long)max_bytes);
    return 0;
}
