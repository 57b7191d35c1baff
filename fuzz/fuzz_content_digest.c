/*
 * fuzz_content_digest.c — libFuzzer target over the Content-Digest header
 * parser (an RFC 8941 dictionary, strict base64, the known algorithms) and
 * its checks. The input is a header value, a newline, then a body. Any value
 * must end in a verdict, never a crash; a value that parses expects only
 * known algorithms with digests of their size; and the body hashed in
 * pieces, one call per byte run, must get the same verdict as the body hashed
 * whole.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "content_digest.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *in = (const char *)data, *nl = memchr(in, '\n', size);
    size_t value_len = nl != NULL ? (size_t)(nl - in) : size;
    const char *body = nl != NULL ? nl + 1 : in + size;
    size_t body_len = size - value_len - (nl != NULL ? 1 : 0);
    ji_content_digest_expect_t e;
    ji_content_digest_t *d;
    ji_error_t err, whole_err;
    char *value = malloc(value_len + 1); /* a copy of its own: ASan sees any read past the value */
    int whole;

    if (value == NULL)
        return 0;
    memcpy(value, in, value_len);
    if (ji_content_digest_parse(&e, value, value_len, &err) != 0) {
        if (err.kind != JI_ERR_MALFORMED || ji_content_digest_wanted(&e))
            abort();
        free(value);
        return 0;
    }
    if (value_len > JI_MAX_CONTENT_DIGEST_BYTES)
        abort();
    whole = ji_content_digest_check(&e, body, body_len, &whole_err);
    if (!ji_content_digest_wanted(&e) && whole != 0)
        abort();
    if ((d = ji_content_digest_new(&e)) != NULL) {
        /* pieces cut where the body's own bytes say: 1 to 16 bytes each */
        for (size_t off = 0; off < body_len;) {
            size_t n = 1 + ((unsigned char)body[off] & 15);
            if (n > body_len - off)
                n = body_len - off;
            ji_content_digest_update(d, body + off, n);
            off += n;
        }
        if (ji_content_digest_verify(d, &err) != whole ||
            (whole != 0 && (err.kind != whole_err.kind || strcmp(err.message, whole_err.message) != 0)))
            abort();
        ji_content_digest_free(d);
    }
    free(value);
    return 0;
}
