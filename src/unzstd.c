/*
 * unzstd.c — owns decoding a zstd Content-Encoding as it streams: one libzstd
 * decompression context per body, its window bound (ZSTD_d_windowLogMax), the
 * cap on decoded bytes, where one frame ends and the next may begin, and the
 * error texts.
 *
 * Memory: the context allocates its buffers for the first frame that needs
 * them (the window the frame declares, at most 2^JI_MAX_ZSTD_WINDOW_LOG bytes,
 * plus one block); nothing per byte of the body. Output goes straight into the
 * caller's buffer.
 */
#include "unzstd.h"

#include <inttypes.h>
#include <stdlib.h>
#include <zstd.h>
#include <zstd_errors.h>

/** First byte of a zstd frame (magic number 0xFD2FB528, little-endian). */
#define JI_ZSTD_MAGIC_FIRST 0x28
/** First bytes of a skippable frame (magic numbers 0x184D2A50 to 0x184D2A5F, little-endian). */
#define JI_ZSTD_SKIPPABLE_FIRST_MIN 0x50
#define JI_ZSTD_SKIPPABLE_FIRST_MAX 0x5f

struct st_ji_unzstd_t {
    ZSTD_DCtx *dctx;
    uint64_t max_out;
    uint64_t total_out;
    bool finished; /**< the last frame ended and no byte of another one was consumed */
    bool failed;   /**< an error was returned: `error` is repeated on every later call */
    ji_error_t error;
};

ji_unzstd_t *ji_unzstd_new(uint64_t max_out)
{
    ji_unzstd_t *z = calloc(1, sizeof(*z));

    if (z == NULL)
        return NULL;
    z->max_out = max_out;
    if ((z->dctx = ZSTD_createDCtx()) == NULL)
        goto Error;
    if (ZSTD_isError(ZSTD_DCtx_setParameter(z->dctx, ZSTD_d_windowLogMax, JI_MAX_ZSTD_WINDOW_LOG)))
        goto Error;
    return z;
Error:
    ZSTD_freeDCtx(z->dctx); /* accepts NULL */
    free(z);
    return NULL;
}

void ji_unzstd_free(ji_unzstd_t *z)
{
    if (z == NULL)
        return;
    ZSTD_freeDCtx(z->dctx);
    free(z);
}

bool ji_unzstd_finished(const ji_unzstd_t *z)
{
    return z->finished;
}

int ji_unzstd_check_end(const ji_unzstd_t *z, size_t trailing, bool input_ended, ji_error_t *err)
{
    if (z->finished && trailing != 0)
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "data after the end of the zstd body");
    if (input_ended && !z->finished)
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "corrupt zstd body: truncated");
    return 0;
}

uint64_t ji_unzstd_total_out(const ji_unzstd_t *z)
{
    return z->total_out;
}

uint64_t ji_unzstd_memory_bound(void)
{
    return ((uint64_t)1 << JI_MAX_ZSTD_WINDOW_LOG) + JI_ZSTD_DECODER_OVERHEAD_BYTES;
}

static bool starts_frame(unsigned char c)
{
    return c == JI_ZSTD_MAGIC_FIRST || (c >= JI_ZSTD_SKIPPABLE_FIRST_MIN && c <= JI_ZSTD_SKIPPABLE_FIRST_MAX);
}

static int remember_failure(ji_unzstd_t *z, ji_error_t *err)
{
    z->failed = true;
    *err = z->error;
    return -1;
}

/** libzstd's error code as the request's error. */
static void set_zstd_error(ji_unzstd_t *z, size_t code)
{
    switch (ZSTD_getErrorCode(code)) {
    case ZSTD_error_frameParameter_windowTooLarge:
        ji_error_set(&z->error, JI_ERR_TOO_LARGE, 0, NULL,
                     "zstd frame needs a window larger than 2^JI_MAX_ZSTD_WINDOW_LOG (2^" JI_STR(
                         JI_MAX_ZSTD_WINDOW_LOG) ") bytes: compress at level 19 or below, without --long");
        break;
    case ZSTD_error_memory_allocation:
        ji_error_set(&z->error, JI_ERR_INTERNAL, 0, NULL, "zstd: out of memory");
        break;
    default:
        ji_error_set(&z->error, JI_ERR_MALFORMED, 0, NULL, "corrupt zstd body: %s", ZSTD_getErrorName(code));
        break;
    }
}

int ji_unzstd_run(ji_unzstd_t *z, const char *in, size_t in_len, size_t *in_used, char *out, size_t out_cap,
                  size_t *out_len, ji_error_t *err)
{
    size_t ip = 0, op = 0;

    *in_used = 0;
    *out_len = 0;
    if (z->failed) {
        *err = z->error;
        return -1;
    }
    for (;;) {
        uint64_t room = z->max_out - z->total_out; /* total_out never passes max_out without failing */
        ZSTD_inBuffer ib;
        ZSTD_outBuffer ob;
        size_t r;

        /* checked before the room in `out`: finished() with bytes left over must always mean trailing garbage */
        if (z->finished) {
            /* a frame ended: only a frame's magic goes on (the context starts the next frame by itself) */
            if (ip == in_len || !starts_frame((unsigned char)in[ip]))
                break;
            z->finished = false;
        }
        if (op == out_cap)
            break;
        ib = (ZSTD_inBuffer){in + ip, in_len - ip, 0};
        /* one byte more than the cap allows, so that going over it is seen, never silently cut */
        ob = (ZSTD_outBuffer){out + op, room < out_cap - op ? (size_t)room + 1 : out_cap - op, 0};
        r = ZSTD_decompressStream(z->dctx, &ob, &ib);
        ip += ib.pos;
        op += ob.pos;
        z->total_out += ob.pos;
        if (z->total_out > z->max_out) {
            ji_error_set(&z->error, JI_ERR_TOO_LARGE, 0, NULL, "inflated body is larger than %" PRIu64 " bytes",
                         z->max_out);
            return remember_failure(z, err);
        }
        if (ZSTD_isError(r)) {
            set_zstd_error(z, r);
            return remember_failure(z, err);
        }
        if (r == 0) {
            z->finished = true; /* the frame is decoded, its checksum checked, and all of it flushed to `out` */
            continue;
        }
        /* output left over means the decoder flushed all it could: with no input left, nothing is pending */
        if (ib.pos == ib.size && ob.pos < ob.size)
            break;
        if (ib.pos == 0 && ob.pos == 0)
            break; /* no progress: never spin */
    }
    *in_used = ip;
    *out_len = op;
    return 0;
}
