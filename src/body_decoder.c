/*
 * body_decoder.c — Content-Length and chunked framing of streamed request
 * bodies, decoded in place at the front of the input buffer.
 */
#include "body_decoder.h"

#include <string.h>

void ji_body_decoder_init_length(ji_body_decoder_t *d, uint64_t content_length)
{
    memset(d, 0, sizeof(*d));
    d->remaining = content_length;
    d->complete = content_length == 0;
}

void ji_body_decoder_init_chunked(ji_body_decoder_t *d)
{
    memset(d, 0, sizeof(*d));
    d->chunked = true;
    d->_chunked.consume_trailer = 1;
}

int ji_body_decoder_prepare(ji_body_decoder_t *d, char *buf, size_t *buf_len, size_t *avail, ji_error_t *err)
{
    if (!d->chunked) {
        *avail = *buf_len < d->remaining ? *buf_len : (size_t)d->remaining;
        if (*avail == d->remaining)
            d->complete = true;
        return 0;
    }

    /* [decoded, not yet consumed][raw bytes that arrived since the last call] */
    if (!d->complete && *buf_len > d->decoded) {
        size_t raw = *buf_len - d->decoded, out = raw;
        ssize_t r = phr_decode_chunked(&d->_chunked, buf + d->decoded, &out);
        if (r == -1)
            return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "malformed chunked encoding");
        if (r == -2) {
            d->wire_bytes += raw;
            *buf_len = d->decoded + out;
        } else {
            /* the body ended; `r` bytes after it were moved to just behind the decoded data */
            d->wire_bytes += raw - (size_t)r;
            d->complete = true;
            *buf_len = d->decoded + out + (size_t)r;
        }
        d->decoded += out;
    }
    *avail = d->decoded;
    return 0;
}

void ji_body_decoder_consumed(ji_body_decoder_t *d, size_t n)
{
    if (d->chunked) {
        d->decoded -= n;
    } else {
        d->remaining -= n;
        d->wire_bytes += n;
    }
}
