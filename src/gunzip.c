/*
 * gunzip.c — owns inflating a gzip Content-Encoding as it streams: one zlib
 * stream per body in gzip-only mode (16 + MAX_WBITS), reset for each further
 * member, the cap on inflated bytes, and the error texts.
 *
 * Memory: zlib's inflate state and its 32 KiB window, nothing per byte of the
 * body. Output goes straight into the caller's buffer.
 */
#include "gunzip.h"

#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

/** First byte of every gzip member (RFC 1952: ID1 = 0x1f, ID2 = 0x8b). */
#define JI_GZIP_ID1 0x1f

struct st_ji_gunzip_t {
    z_stream z;
    uint64_t max_inflated;
    uint64_t total_out;
    bool finished; /**< the last member ended and no byte of another one was consumed */
    bool failed;   /**< an error was returned: `error` is repeated on every later call */
    ji_error_t error;
};

ji_gunzip_t *ji_gunzip_new(uint64_t max_inflated)
{
    ji_gunzip_t *g = calloc(1, sizeof(*g));

    if (g == NULL)
        return NULL;
    g->max_inflated = max_inflated;
    /* 16 + MAX_WBITS: the gzip wrapper only (a zlib or raw deflate body is corrupt), header and CRC-32 checked */
    if (inflateInit2(&g->z, 16 + MAX_WBITS) != Z_OK) {
        free(g);
        return NULL;
    }
    return g;
}

void ji_gunzip_free(ji_gunzip_t *g)
{
    if (g == NULL)
        return;
    inflateEnd(&g->z);
    free(g);
}

bool ji_gunzip_finished(const ji_gunzip_t *g)
{
    return g->finished;
}

int ji_gunzip_check_end(const ji_gunzip_t *g, size_t trailing, bool input_ended, ji_error_t *err)
{
    if (g->finished && trailing != 0)
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "data after the end of the gzip body");
    if (input_ended && !g->finished)
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "corrupt gzip body: truncated");
    return 0;
}

uint64_t ji_gunzip_total_out(const ji_gunzip_t *g)
{
    return g->total_out;
}

static int remember_failure(ji_gunzip_t *g, ji_error_t *err)
{
    g->failed = true;
    *err = g->error;
    return -1;
}

static uInt clamp_uint(size_t n)
{
    return n > UINT_MAX ? UINT_MAX : (uInt)n;
}

int ji_gunzip_run(ji_gunzip_t *g, const char *in, size_t in_len, size_t *in_used, char *out, size_t out_cap,
                  size_t *out_len, ji_error_t *err)
{
    size_t ip = 0, op = 0;
    int r = Z_OK;

    *in_used = 0;
    *out_len = 0;
    if (g->failed) {
        *err = g->error;
        return -1;
    }
    for (;;) {
        uint64_t room = g->max_inflated - g->total_out; /* total_out never passes max_inflated without failing */
        uInt ain, aout, got_in, got_out;

        /* checked before the room in `out`: finished() with bytes left over must always mean trailing garbage */
        if (g->finished) {
            /* a member ended: only the gzip magic goes on; anything else is left for the caller to report */
            if (ip == in_len || (unsigned char)in[ip] != JI_GZIP_ID1)
                break;
            if (inflateReset(&g->z) != Z_OK) {
                ji_error_set(&g->error, JI_ERR_INTERNAL, 0, NULL, "gzip: inflateReset failed");
                return remember_failure(g, err);
            }
            g->finished = false;
        }
        if (op == out_cap)
            break;
        ain = clamp_uint(in_len - ip);
        /* one byte more than the cap allows, so that going over it is seen, never silently cut */
        aout = clamp_uint(room < out_cap - op ? (size_t)room + 1 : out_cap - op);
        g->z.next_in = (Bytef *)(uintptr_t)(in + ip); /* zlib's next_in is not const; it never writes through it */
        g->z.avail_in = ain;
        g->z.next_out = (Bytef *)(out + op);
        g->z.avail_out = aout;
        r = inflate(&g->z, Z_NO_FLUSH);
        got_in = ain - g->z.avail_in;
        got_out = aout - g->z.avail_out;
        ip += got_in;
        op += got_out;
        g->total_out += got_out;
        if (g->total_out > g->max_inflated) {
            ji_error_set(&g->error, JI_ERR_TOO_LARGE, 0, NULL, "inflated body is larger than %" PRIu64 " bytes",
                         g->max_inflated);
            return remember_failure(g, err);
        }
        switch (r) {
        case Z_STREAM_END:
            g->finished = true;
            continue;
        case Z_OK:
            /* avail_out left over means zlib wrote all it could: with no input left, nothing is pending */
            if (g->z.avail_in == 0 && g->z.avail_out > 0)
                goto done;
            if (got_in == 0 && got_out == 0)
                goto done; /* cannot happen per zlib's contract; never spin */
            continue;
        case Z_BUF_ERROR:
            goto done; /* no progress possible: needs more input (or more room, but the loop checks that) */
        case Z_NEED_DICT:
            ji_error_set(&g->error, JI_ERR_MALFORMED, 0, NULL, "corrupt gzip body: preset dictionary required");
            return remember_failure(g, err);
        case Z_MEM_ERROR:
            ji_error_set(&g->error, JI_ERR_INTERNAL, 0, NULL, "gzip: out of memory");
            return remember_failure(g, err);
        default: /* Z_DATA_ERROR, Z_STREAM_ERROR */
            ji_error_set(&g->error, JI_ERR_MALFORMED, 0, NULL, "corrupt gzip body: %s",
                         g->z.msg != NULL ? g->z.msg : zError(r));
            return remember_failure(g, err);
        }
    }
done:
    *in_used = ip;
    *out_len = op;
    return 0;
}
