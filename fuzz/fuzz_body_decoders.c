/*
 * fuzz_body_decoders.c — libFuzzer target over the body decoders of the
 * streaming path: chunked framing removed in place (body_decoder.c), then the
 * content decoded (content_decoder.c: gzip through gunzip.c, zstd through
 * unzstd.c) with a small output buffer and a small cap, the input cut into
 * reads of sizes the input itself chooses. Every input goes through both
 * content decoders, so one corpus serves both. The decoders must end in a
 * verdict (body done, more input needed, or an error), never read or write
 * outside their buffers, and never produce more than the cap.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "body_decoder.h"
#include "content_decoder.h"

#define FUZZ_INFLATE_CAP (1u << 20)

static void run(const uint8_t *data, size_t size, ji_content_encoding_t encoding)
{
    ji_body_decoder_t body;
    ji_content_decoder_t *d;
    ji_error_t err;
    char *buf, out[4096];
    size_t buf_len = 0, pos = 1;
    bool chunked, failed = false;

    chunked = data[0] & 1;
    if (chunked)
        ji_body_decoder_init_chunked(&body);
    else
        ji_body_decoder_init_length(&body, data[0] >> 1);
    if ((d = ji_content_decoder_new(encoding, FUZZ_INFLATE_CAP)) == NULL)
        return;
    if ((buf = malloc(size)) == NULL) {
        ji_content_decoder_free(d);
        return;
    }
    while (pos < size && !failed) {
        size_t piece = 1 + data[pos] % 64, avail = 0;
        pos++;
        if (piece > size - pos)
            piece = size - pos;
        memcpy(buf + buf_len, data + pos, piece);
        buf_len += piece;
        pos += piece;
        if (ji_body_decoder_prepare(&body, buf, &buf_len, &avail, &err) != 0)
            break;
        if (avail > buf_len)
            abort();
        while (avail > 0) {
            size_t used = 0, produced = 0;
            if (ji_content_decoder_run(d, buf, avail, &used, out, sizeof(out), &produced, &err) != 0) {
                failed = true;
                break;
            }
            if (used > avail || produced > sizeof(out) || ji_content_decoder_total_out(d) > FUZZ_INFLATE_CAP)
                abort();
            memmove(buf, buf + used, buf_len - used);
            buf_len -= used;
            ji_body_decoder_consumed(&body, used);
            avail -= used;
            if (ji_content_decoder_check_end(d, avail, false, &err) != 0) {
                failed = true;
                break;
            }
            if (used == 0 && produced < sizeof(out))
                break;
        }
        if (ji_body_decoder_done(&body))
            (void)!ji_content_decoder_check_end(d, 0, true, &err);
    }
    free(buf);
    ji_content_decoder_free(d);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    run(data, size, JI_ENCODING_GZIP);
    run(data, size, JI_ENCODING_ZSTD);
    return 0;
}
