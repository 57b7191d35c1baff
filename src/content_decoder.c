/*
 * content_decoder.c — dispatches a body's Content-Encoding to its decoder
 * module (gunzip.c, unzstd.c); it owns no decoding of its own.
 */
#include "content_decoder.h"

#include <stdlib.h>

#include "gunzip.h"
#include "unzstd.h"

struct st_ji_content_decoder_t {
    ji_content_encoding_t encoding;
    union {
        ji_gunzip_t *gzip;
        ji_unzstd_t *zstd;
    } u;
};

ji_content_decoder_t *ji_content_decoder_new(ji_content_encoding_t encoding, uint64_t max_out)
{
    ji_content_decoder_t *d = calloc(1, sizeof(*d));

    if (d == NULL)
        return NULL;
    d->encoding = encoding;
    switch (encoding) {
    case JI_ENCODING_GZIP:
        if ((d->u.gzip = ji_gunzip_new(max_out)) == NULL)
            goto Error;
        return d;
    case JI_ENCODING_ZSTD:
        if ((d->u.zstd = ji_unzstd_new(max_out)) == NULL)
            goto Error;
        return d;
    default:
        goto Error;
    }
Error:
    free(d);
    return NULL;
}

void ji_content_decoder_free(ji_content_decoder_t *d)
{
    if (d == NULL)
        return;
    if (d->encoding == JI_ENCODING_GZIP)
        ji_gunzip_free(d->u.gzip);
    else
        ji_unzstd_free(d->u.zstd);
    free(d);
}

int ji_content_decoder_run(ji_content_decoder_t *d, const char *in, size_t in_len, size_t *in_used, char *out,
                           size_t out_cap, size_t *out_len, ji_error_t *err)
{
    if (d->encoding == JI_ENCODING_GZIP)
        return ji_gunzip_run(d->u.gzip, in, in_len, in_used, out, out_cap, out_len, err);
    return ji_unzstd_run(d->u.zstd, in, in_len, in_used, out, out_cap, out_len, err);
}

bool ji_content_decoder_finished(const ji_content_decoder_t *d)
{
    return d->encoding == JI_ENCODING_GZIP ? ji_gunzip_finished(d->u.gzip) : ji_unzstd_finished(d->u.zstd);
}

int ji_content_decoder_check_end(const ji_content_decoder_t *d, size_t trailing, bool input_ended, ji_error_t *err)
{
    if (d->encoding == JI_ENCODING_GZIP)
        return ji_gunzip_check_end(d->u.gzip, trailing, input_ended, err);
    return ji_unzstd_check_end(d->u.zstd, trailing, input_ended, err);
}

uint64_t ji_content_decoder_total_out(const ji_content_decoder_t *d)
{
    return d->encoding == JI_ENCODING_GZIP ? ji_gunzip_total_out(d->u.gzip) : ji_unzstd_total_out(d->u.zstd);
}

uint64_t ji_content_decoder_memory(ji_content_encoding_t encoding)
{
    return encoding == JI_ENCODING_ZSTD ? ji_unzstd_memory_bound() : 0;
}
