/*
 * body_decoder.h — HTTP/1.1 request body framing on the streaming path:
 * Content-Length or chunked. It works in place on the connection's input
 * buffer: chunked framing is stripped where the bytes lie, so the decoded
 * body always starts at the front of the buffer and nothing is copied. Bytes
 * after the end of the body (a pipelined request) are left untouched behind it.
 */
#ifndef JI_BODY_DECODER_H
#define JI_BODY_DECODER_H

#include "common.h"
#include "picohttp.h"

typedef struct st_ji_body_decoder_t {
    bool chunked;
    bool complete;       /**< the whole body is decoded and sits in the buffer */
    uint64_t remaining;  /**< Content-Length: body bytes not yet consumed */
    size_t decoded;      /**< chunked: decoded bytes at the front of the buffer, not yet consumed */
    uint64_t wire_bytes; /**< body bytes seen on the wire (framing included) */
    struct phr_chunked_decoder _chunked;
} ji_body_decoder_t;

void ji_body_decoder_init_length(ji_body_decoder_t *d, uint64_t content_length);
void ji_body_decoder_init_chunked(ji_body_decoder_t *d);

/**
 * Looks at the buffer (`buf`, `*buf_len` bytes, the front being whatever was not consumed yet) after new bytes
 * arrived. Chunked framing is removed in place, which may shrink `*buf_len`. On return `*avail` body bytes are
 * ready at `buf`. 0, or -1 when the chunked framing is malformed (`err` filled, JI_ERR_MALFORMED).
 */
int ji_body_decoder_prepare(ji_body_decoder_t *d, char *buf, size_t *buf_len, size_t *avail,
                            ji_error_t *err) JI_MUST_CHECK;

/** `n` body bytes were consumed from the front of the buffer. */
void ji_body_decoder_consumed(ji_body_decoder_t *d, size_t n);

/** True once every body byte was decoded and consumed. */
static inline bool ji_body_decoder_done(const ji_body_decoder_t *d)
{
    return d->complete && (d->chunked ? d->decoded == 0 : d->remaining == 0);
}

#endif
