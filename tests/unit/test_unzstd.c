/*
 * test_unzstd.c — zstd bodies, through the content decoder interface both body paths use, come out the same
 * however the wire cuts them and however small the output buffer; truncated, corrupt, oversized, multi-frame,
 * skippable-frame and trailing-garbage bodies; frames that ask for a window over JI_MAX_ZSTD_WINDOW_LOG; the
 * memory bound against libzstd's own estimate. Inputs are made here with libzstd's compressor from seeded
 * pseudo-random data.
 */
#define ZSTD_STATIC_LINKING_ONLY /* ZSTD_estimateDStreamSize, only to check the bound the service uses */
#include "content_decoder.h"
#include "unzstd.h"

#include <stdlib.h>
#include <zstd.h>

#include "unit.h"

/* ------------------------------------------------------------------ inputs */

static uint64_t rng_state = 0x2545f4914f6cdd1dull;

static uint64_t rng(void)
{
    uint64_t x = rng_state; /* xorshift64 */
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}

/* Data that compresses somewhat: runs of repeated text mixed with random bytes. */
static char *make_data(size_t n)
{
    static const char words[] = "{\"name\":\"vladimir\",\"email\":\"someone@gmail.com\",\"image\":\"iVBORw0KGgo=\"}\n";
    char *d = malloc(n ? n : 1);
    size_t i = 0;
    while (i < n) {
        size_t run = 1 + rng() % 200;
        bool text = rng() % 2;
        for (size_t k = 0; k < run && i < n; k++, i++)
            d[i] = text ? words[(i + k) % (sizeof(words) - 1)] : (char)rng();
    }
    return d;
}

typedef struct {
    unsigned char *p;
    size_t len, cap;
} buf_t;

static void buf_append(buf_t *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        b->cap = b->cap * 2 > b->len + n ? b->cap * 2 : b->len + n + 64;
        b->p = realloc(b->p, b->cap);
    }
    if (n > 0)
        memcpy(b->p + b->len, p, n);
    b->len += n;
}

/* One zstd frame of `data` with a checksum; `window_log` 0 leaves the window to the level. */
static void zstd_frame(buf_t *out, const char *data, size_t n, int level, int window_log)
{
    ZSTD_CCtx *c = ZSTD_createCCtx();
    size_t bound = ZSTD_compressBound(n), r;

    CHECK(c != NULL);
    CHECK(!ZSTD_isError(ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, level)));
    CHECK(!ZSTD_isError(ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 1)));
    if (window_log != 0) {
        CHECK(!ZSTD_isError(ZSTD_CCtx_setParameter(c, ZSTD_c_windowLog, window_log)));
        /* the content size would let the frame declare a window no larger than the content */
        CHECK(!ZSTD_isError(ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, 0)));
    }
    if (out->len + bound > out->cap) {
        out->cap = out->len + bound;
        out->p = realloc(out->p, out->cap);
    }
    if (window_log == 0) {
        r = ZSTD_compress2(c, out->p + out->len, bound, data, n);
        CHECK(!ZSTD_isError(r));
        out->len += r;
    } else {
        /* streamed, with the size unknown when the frame header is written: the window stays as asked */
        ZSTD_inBuffer in = {data, n, 0};
        ZSTD_outBuffer o = {out->p + out->len, bound, 0};
        CHECK(!ZSTD_isError(ZSTD_compressStream2(c, &o, &in, ZSTD_e_continue)));
        in = (ZSTD_inBuffer){data + in.pos, n - in.pos, 0};
        do
            r = ZSTD_compressStream2(c, &o, &in, ZSTD_e_end);
        while (!ZSTD_isError(r) && r != 0);
        CHECK(!ZSTD_isError(r));
        out->len += o.pos;
    }
    ZSTD_freeCCtx(c);
}

/* ------------------------------------------------------------------ the driver */

typedef enum { DONE_OK, DONE_ERROR, DONE_GARBAGE } done_t;

typedef struct {
    buf_t out;
    bool finished;
    size_t garbage_at; /* offset in the whole input of the first byte not consumed (DONE_GARBAGE) */
    ji_error_t err;
    size_t max_out_call; /* most bytes produced by one call */
    bool bad;            /* the contract was broken: over out_cap, progress-less loop, ... */
} result_t;

/*
 * Feeds `in` cut into pieces (cuts ascending, the last one == len, or piece sizes drawn at random when `cuts` is
 * NULL and `max_piece` > 0) with an output buffer of `out_cap` bytes, the way a streaming caller would.
 */
static done_t run_pieces(const unsigned char *in, size_t len, const size_t *cuts, size_t ncuts, size_t max_piece,
                         size_t out_cap, uint64_t max_out, result_t *res)
{
    ji_content_decoder_t *z = ji_content_decoder_new(JI_ENCODING_ZSTD, max_out);
    char *out = malloc(out_cap + 16);
    size_t from = 0, ci = 0;
    done_t d = DONE_OK;

    memset(res, 0, sizeof(*res));
    CHECK(z != NULL);
    while (from < len || from == 0) {
        size_t to = cuts != NULL ? (ci < ncuts ? cuts[ci++] : len) : from + 1 + (size_t)(rng() % max_piece);
        size_t pos = 0, n;
        if (to > len)
            to = len;
        n = to - from;
        for (;;) {
            size_t used = 0, got = 0;
            memset(out + out_cap, 0x5a, 16);
            if (ji_content_decoder_run(z, (const char *)in + from + pos, n - pos, &used, out, out_cap, &got,
                                       &res->err) != 0) {
                d = DONE_ERROR;
                goto end;
            }
            for (int k = 0; k < 16; k++)
                if ((unsigned char)out[out_cap + k] != 0x5a)
                    res->bad = true;
            if (used > n - pos || got > out_cap)
                res->bad = true;
            buf_append(&res->out, out, got);
            if (got > res->max_out_call)
                res->max_out_call = got;
            pos += used;
            if (got == out_cap)
                continue; /* more may be pending inside the decoder */
            if (pos == n)
                break;
            /* room left and input left: only a finished frame followed by garbage stops like this */
            if (!ji_content_decoder_finished(z))
                res->bad = true;
            res->garbage_at = from + pos;
            d = DONE_GARBAGE;
            goto end;
        }
        from = to;
        if (len == 0)
            break;
    }
end:
    res->finished = ji_content_decoder_finished(z);
    if (d == DONE_OK && ji_content_decoder_total_out(z) != res->out.len)
        res->bad = true;
    ji_content_decoder_free(z);
    free(out);
    return d;
}

static void result_free(result_t *r)
{
    free(r->out.p);
    memset(&r->out, 0, sizeof(r->out));
}

static bool same(const result_t *r, const char *data, size_t n)
{
    return r->out.len == n && (n == 0 || memcmp(r->out.p, data, n) == 0);
}

/* ------------------------------------------------------------------ tests */

/* A small body cut once at every offset, with 1-byte, 7-byte and 64 KiB output buffers; then byte by byte. */
static void test_small_every_cut(void)
{
    size_t n = 3000;
    char *data = make_data(n);
    buf_t zs = {0};
    result_t r;
    size_t outs[] = {1, 7, 64 * 1024};
    int wrong = 0, unfinished = 0, broken = 0;

    zstd_frame(&zs, data, n, 3, 0);
    for (size_t o = 0; o < sizeof(outs) / sizeof(outs[0]); o++) {
        for (size_t cut = 0; cut <= zs.len; cut++) {
            size_t cuts[2] = {cut, zs.len};
            done_t d = run_pieces(zs.p, zs.len, cuts, 2, 0, outs[o], JI_DEFAULT_MAX_INFLATED_BYTES, &r);
            wrong += d != DONE_OK || !same(&r, data, n);
            unfinished += !r.finished;
            broken += r.bad || r.max_out_call > outs[o];
            result_free(&r);
        }
    }
    CHECK_EQ_INT(wrong, 0);
    CHECK_EQ_INT(unfinished, 0);
    CHECK_EQ_INT(broken, 0);

    CHECK_EQ_INT(run_pieces(zs.p, zs.len, NULL, 0, 1, 1, JI_DEFAULT_MAX_INFLATED_BYTES, &r), DONE_OK);
    CHECK(same(&r, data, n));
    CHECK(r.finished);
    CHECK(!r.bad);
    result_free(&r);
    free(zs.p);
    free(data);
}

/* A 3 MiB body (several 128 KiB blocks, a 4 MiB window) in random pieces and random output sizes. */
static void test_big_random_pieces(void)
{
    size_t n = 3 * 1024 * 1024;
    char *data = make_data(n);
    buf_t zs = {0};
    result_t r;

    zstd_frame(&zs, data, n, 1, 22);
    for (int round = 0; round < 4; round++) {
        size_t max_piece = round == 0 ? 7 : round == 1 ? 100 : round == 2 ? 10000 : 1000000;
        CHECK_EQ_INT(run_pieces(zs.p, zs.len, NULL, 0, max_piece, round == 0 ? 65536 : 1 + rng() % 70000,
                                JI_DEFAULT_MAX_INFLATED_BYTES, &r),
                     DONE_OK);
        CHECK(same(&r, data, n));
        CHECK(r.finished);
        CHECK(!r.bad);
        result_free(&r);
    }
    free(zs.p);
    free(data);
}

/* Every prefix of a body: no error, not finished, what came out is a prefix of the data; the end rule says so. */
static void test_truncated(void)
{
    size_t n = 2000;
    char *data = make_data(n);
    buf_t zs = {0};
    result_t r;
    int bad = 0;

    zstd_frame(&zs, data, n, 3, 0);
    for (size_t len = 0; len < zs.len; len++) {
        size_t cuts[1] = {len};
        done_t d = run_pieces(zs.p, len, cuts, 1, 0, 512, JI_DEFAULT_MAX_INFLATED_BYTES, &r);
        bad += d != DONE_OK || r.finished || r.bad || r.out.len > n ||
               (r.out.len > 0 && memcmp(r.out.p, data, r.out.len) != 0);
        result_free(&r);
    }
    CHECK_EQ_INT(bad, 0);
    {
        ji_content_decoder_t *z = ji_content_decoder_new(JI_ENCODING_ZSTD, 1 << 20);
        char out[4096];
        size_t used, got;
        ji_error_t err;
        CHECK_EQ_INT(ji_content_decoder_run(z, (const char *)zs.p, zs.len - 1, &used, out, sizeof(out), &got, &err), 0);
        CHECK_EQ_INT(ji_content_decoder_check_end(z, 0, false, &err), 0);
        CHECK_EQ_INT(ji_content_decoder_check_end(z, 0, true, &err), -1);
        CHECK_EQ_INT(err.kind, JI_ERR_MALFORMED);
        CHECK_EQ_STR(err.message, "corrupt zstd body: truncated");
        ji_content_decoder_free(z);
    }
    free(zs.p);
    free(data);
}

/* A byte changed anywhere after the magic number is an error (the checksum catches what decodes). */
static void test_corrupt(void)
{
    size_t n = 2000;
    char *data = make_data(n);
    buf_t zs = {0};
    result_t r;
    int undetected = 0, wrong_kind = 0;

    zstd_frame(&zs, data, n, 3, 0);
    for (size_t i = 4; i < zs.len; i++) {
        size_t cuts[1] = {zs.len};
        done_t d;
        zs.p[i] ^= 0xa5;
        d = run_pieces(zs.p, zs.len, cuts, 1, 0, 4096, JI_DEFAULT_MAX_INFLATED_BYTES, &r);
        zs.p[i] ^= 0xa5;
        /* a damaged frame may also just look unfinished (a size field grew): the end rule reports that */
        undetected += d == DONE_OK && r.finished;
        wrong_kind += d == DONE_ERROR && r.err.kind != JI_ERR_MALFORMED && r.err.kind != JI_ERR_TOO_LARGE;
        wrong_kind +=
            d == DONE_ERROR && r.err.kind == JI_ERR_MALFORMED && strncmp(r.err.message, "corrupt zstd body: ", 19) != 0;
        result_free(&r);
    }
    CHECK_EQ_INT(undetected, 0);
    CHECK_EQ_INT(wrong_kind, 0);

    /* plain JSON, and a gzip body, are not zstd (their first bytes do not start a frame) */
    {
        static const char json[] = "{\"name\":\"a\"}\n";
        size_t cuts[1] = {sizeof(json) - 1};
        CHECK_EQ_INT(run_pieces((const unsigned char *)json, sizeof(json) - 1, cuts, 1, 0, 100,
                                JI_DEFAULT_MAX_INFLATED_BYTES, &r),
                     DONE_ERROR);
        CHECK_EQ_INT(r.err.kind, JI_ERR_MALFORMED);
        CHECK_EQ_STR(r.err.message, "corrupt zstd body: Unknown frame descriptor");
        CHECK_EQ_INT(r.err.line, 0);
        result_free(&r);
    }

    /* after an error every call fails the same way, consuming nothing */
    {
        ji_content_decoder_t *z = ji_content_decoder_new(JI_ENCODING_ZSTD, 1000);
        char out[16];
        size_t used = 99, got = 99;
        ji_error_t err;
        CHECK_EQ_INT(ji_content_decoder_run(z, "nope", 4, &used, out, sizeof(out), &got, &err), -1);
        CHECK_EQ_INT(err.kind, JI_ERR_MALFORMED);
        ji_error_clear(&err);
        CHECK_EQ_INT(ji_content_decoder_run(z, (const char *)zs.p, zs.len, &used, out, sizeof(out), &got, &err), -1);
        CHECK_EQ_INT(used, 0);
        CHECK_EQ_INT(got, 0);
        CHECK_EQ_STR(err.message, "corrupt zstd body: Unknown frame descriptor");
        ji_content_decoder_free(z);
    }
    free(zs.p);
    free(data);
}

/* The decoded cap: exactly the cap is fine, one byte more fails, and a bomb stops at the cap. */
static void test_cap(void)
{
    size_t n = 100000, bomb = 64 * 1024 * 1024;
    char *data = make_data(n), *zeros = calloc(1, bomb);
    buf_t zs = {0}, zs_bomb = {0};
    result_t r;
    size_t outs[] = {1, 999, 64 * 1024, 1024 * 1024};

    zstd_frame(&zs, data, n, 3, 0);
    for (size_t o = 0; o < sizeof(outs) / sizeof(outs[0]); o++) {
        CHECK_EQ_INT(run_pieces(zs.p, zs.len, NULL, 0, 777, outs[o], n, &r), DONE_OK);
        CHECK(same(&r, data, n));
        CHECK(r.finished);
        result_free(&r);
        CHECK_EQ_INT(run_pieces(zs.p, zs.len, NULL, 0, 777, outs[o], n - 1, &r), DONE_ERROR);
        CHECK_EQ_INT(r.err.kind, JI_ERR_TOO_LARGE);
        CHECK_EQ_STR(r.err.message, "inflated body is larger than 99999 bytes");
        CHECK(r.out.len <= n - 1);
        result_free(&r);
    }

    /* 64 MiB of zeros in a few KiB of zstd: stopped at the 1 MiB cap */
    zstd_frame(&zs_bomb, zeros, bomb, 19, 0);
    CHECK(zs_bomb.len < 16 * 1024);
    CHECK_EQ_INT(run_pieces(zs_bomb.p, zs_bomb.len, NULL, 0, 65536, 65536, 1024 * 1024, &r), DONE_ERROR);
    CHECK_EQ_INT(r.err.kind, JI_ERR_TOO_LARGE);
    CHECK_EQ_STR(r.err.message, "inflated body is larger than 1048576 bytes");
    CHECK(r.out.len <= 1024 * 1024);
    result_free(&r);
    free(zs.p);
    free(zs_bomb.p);
    free(zeros);
    free(data);
}

/* `cat a.zst skippable empty.zst b.zst` decodes to a then b, cut anywhere; finished() only at frame ends. */
static void test_multi_frame(void)
{
    size_t na = 1500, nb = 900;
    char *a = make_data(na), *b = make_data(nb), *ab = malloc(na + nb);
    static const unsigned char skippable[] = {0x5e, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 'x', 'y', 'z'};
    buf_t zs = {0};
    result_t r;
    size_t end_a, end_skip, end_empty;
    int wrong = 0, bad = 0;

    memcpy(ab, a, na);
    memcpy(ab + na, b, nb);
    zstd_frame(&zs, a, na, 3, 0);
    end_a = zs.len;
    buf_append(&zs, skippable, sizeof(skippable));
    end_skip = zs.len;
    zstd_frame(&zs, "", 0, 3, 0);
    end_empty = zs.len;
    zstd_frame(&zs, b, nb, 1, 0);

    for (size_t cut = 0; cut <= zs.len; cut++) {
        size_t cuts[2] = {cut, zs.len};
        done_t d = run_pieces(zs.p, zs.len, cuts, 2, 0, cut % 2 ? 1 : 4096, JI_DEFAULT_MAX_INFLATED_BYTES, &r);
        wrong += d != DONE_OK || !same(&r, ab, na + nb) || !r.finished;
        bad += r.bad;
        result_free(&r);
    }
    CHECK_EQ_INT(wrong, 0);
    CHECK_EQ_INT(bad, 0);

    for (size_t len = 0; len <= zs.len; len++) {
        size_t cuts[1] = {len};
        bool at_end = len == end_a || len == end_skip || len == end_empty || len == zs.len;
        done_t d = run_pieces(zs.p, len, cuts, 1, 0, 4096, JI_DEFAULT_MAX_INFLATED_BYTES, &r);
        bad += d != DONE_OK || r.finished != at_end;
        result_free(&r);
    }
    CHECK_EQ_INT(bad, 0);

    /* a frame ends exactly when the output buffer is full: the next one still starts */
    {
        ji_content_decoder_t *z = ji_content_decoder_new(JI_ENCODING_ZSTD, JI_DEFAULT_MAX_INFLATED_BYTES);
        char out[8192];
        size_t used, got, used2, got2;
        ji_error_t err;
        CHECK_EQ_INT(ji_content_decoder_run(z, (const char *)zs.p, zs.len, &used, out, na, &got, &err), 0);
        CHECK_EQ_INT(got, na);
        CHECK(used == zs.len || !ji_content_decoder_finished(z));
        CHECK_EQ_INT(ji_content_decoder_run(z, (const char *)zs.p + used, zs.len - used, &used2, out + na,
                                            sizeof(out) - na, &got2, &err),
                     0);
        CHECK_EQ_INT(used + used2, zs.len);
        CHECK_EQ_INT(got2, nb);
        CHECK(memcmp(out, ab, na + nb) == 0);
        CHECK(ji_content_decoder_finished(z));
        ji_content_decoder_free(z);
    }
    free(zs.p);
    free(a);
    free(b);
    free(ab);
}

/* Bytes after the last frame that cannot start one: left unconsumed, and the end rule names them. */
static void test_trailing_garbage(void)
{
    size_t n = 1000;
    char *data = make_data(n);
    buf_t zs = {0};
    result_t r;
    size_t frame;
    static const char *junk[] = {"x", "\n", "{\"name\":\"a\"}\n", "\x1f\x8b"};

    zstd_frame(&zs, data, n, 3, 0);
    frame = zs.len;
    for (size_t j = 0; j < sizeof(junk) / sizeof(junk[0]); j++) {
        zs.len = frame;
        buf_append(&zs, junk[j], strlen(junk[j]));
        for (size_t cut = frame - 3; cut <= zs.len; cut++) {
            size_t cuts[2] = {cut, zs.len};
            CHECK_EQ_INT(run_pieces(zs.p, zs.len, cuts, 2, 0, 4096, JI_DEFAULT_MAX_INFLATED_BYTES, &r), DONE_GARBAGE);
            CHECK_EQ_INT(r.garbage_at, frame);
            CHECK(r.finished);
            CHECK(same(&r, data, n));
            CHECK(!r.bad);
            result_free(&r);
        }
    }
    {
        ji_content_decoder_t *z = ji_content_decoder_new(JI_ENCODING_ZSTD, 1 << 20);
        char out[4096];
        size_t used, got;
        ji_error_t err;
        CHECK_EQ_INT(ji_content_decoder_run(z, (const char *)zs.p, zs.len, &used, out, sizeof(out), &got, &err), 0);
        CHECK_EQ_INT(used, frame);
        CHECK_EQ_INT(ji_content_decoder_check_end(z, zs.len - used, false, &err), -1);
        CHECK_EQ_STR(err.message, "data after the end of the zstd body");
        CHECK_EQ_INT(ji_content_decoder_check_end(z, 0, true, &err), 0);
        ji_content_decoder_free(z);
    }

    /* 0x28 starts a frame: what follows must be the rest of the magic number */
    zs.len = frame;
    buf_append(&zs, "(garbage", 8);
    CHECK_EQ_INT(run_pieces(zs.p, zs.len, NULL, 0, 5, 4096, JI_DEFAULT_MAX_INFLATED_BYTES, &r), DONE_ERROR);
    CHECK_EQ_STR(r.err.message, "corrupt zstd body: Unknown frame descriptor");
    result_free(&r);

    /* a body ending with a lone 0x28 is an unfinished second frame */
    zs.len = frame;
    buf_append(&zs, "(", 1);
    CHECK_EQ_INT(run_pieces(zs.p, zs.len, NULL, 0, 50, 4096, JI_DEFAULT_MAX_INFLATED_BYTES, &r), DONE_OK);
    CHECK(!r.finished);
    CHECK(same(&r, data, n));
    result_free(&r);
    free(zs.p);
    free(data);
}

/* Frames whose window is over 2^JI_MAX_ZSTD_WINDOW_LOG: 413 from the header, before anything is decoded. */
static void test_window_limit(void)
{
    size_t n = 5000;
    char *data = make_data(n);
    buf_t at_limit = {0}, over = {0}, huge = {0};
    result_t r;
    /* a frame header alone: window descriptor 0xa8 = 2^31 bytes (what `zstd --long=31` writes), then one byte */
    static const unsigned char long31[] = {0x28, 0xb5, 0x2f, 0xfd, 0x04, 0xa8, 0x00};
    /* a single-segment frame declaring 2^40 bytes of content: its window is its content size */
    static const unsigned char single[] = {0x28, 0xb5, 0x2f, 0xfd, 0xe0, 0, 0, 0, 0, 0, 1, 0, 0, 0x01};

    zstd_frame(&at_limit, data, n, 3, JI_MAX_ZSTD_WINDOW_LOG);
    CHECK_EQ_INT(run_pieces(at_limit.p, at_limit.len, NULL, 0, 3, 4096, JI_DEFAULT_MAX_INFLATED_BYTES, &r), DONE_OK);
    CHECK(same(&r, data, n));
    CHECK(r.finished);
    result_free(&r);

    zstd_frame(&over, data, n, 3, JI_MAX_ZSTD_WINDOW_LOG + 1);
    CHECK_EQ_INT(run_pieces(over.p, over.len, NULL, 0, 3, 4096, JI_DEFAULT_MAX_INFLATED_BYTES, &r), DONE_ERROR);
    CHECK_EQ_INT(r.err.kind, JI_ERR_TOO_LARGE);
    CHECK_EQ_STR(r.err.message, "zstd frame needs a window larger than 2^JI_MAX_ZSTD_WINDOW_LOG (2^" JI_STR(
                                    JI_MAX_ZSTD_WINDOW_LOG) ") bytes: compress at level 19 or below, without --long");
    CHECK_EQ_INT(r.out.len, 0);
    result_free(&r);

    /* after a good frame, too */
    buf_append(&huge, at_limit.p, at_limit.len);
    buf_append(&huge, long31, sizeof(long31));
    CHECK_EQ_INT(run_pieces(huge.p, huge.len, NULL, 0, 1000, 4096, JI_DEFAULT_MAX_INFLATED_BYTES, &r), DONE_ERROR);
    CHECK_EQ_INT(r.err.kind, JI_ERR_TOO_LARGE);
    CHECK(r.out.len <= n && (r.out.len == 0 || memcmp(r.out.p, data, r.out.len) == 0));
    result_free(&r);

    CHECK_EQ_INT(run_pieces(single, sizeof(single), NULL, 0, 2, 4096, JI_DEFAULT_MAX_INFLATED_BYTES, &r), DONE_ERROR);
    CHECK_EQ_INT(r.err.kind, JI_ERR_TOO_LARGE);
    result_free(&r);
    free(at_limit.p);
    free(over.p);
    free(huge.p);
    free(data);
}

/* What an upload reserves for a decoder covers libzstd's own estimate at the largest window. */
static void test_memory_bound(void)
{
    size_t estimate = ZSTD_estimateDStreamSize((size_t)1 << JI_MAX_ZSTD_WINDOW_LOG);

    CHECK(ji_unzstd_memory_bound() >= estimate);
    CHECK(ji_unzstd_memory_bound() - estimate < 2 * 1024 * 1024); /* and not wildly more */
    CHECK_EQ_INT(ji_content_decoder_memory(JI_ENCODING_ZSTD), ji_unzstd_memory_bound());
    CHECK_EQ_INT(ji_content_decoder_memory(JI_ENCODING_GZIP), 0);
}

/* Zero-sized calls are harmless; identity has no decoder. */
static void test_empty_calls(void)
{
    ji_content_decoder_t *z = ji_content_decoder_new(JI_ENCODING_ZSTD, 100);
    char out[4];
    size_t used = 9, got = 9;
    ji_error_t err;

    CHECK_EQ_INT(ji_content_decoder_run(z, "", 0, &used, out, sizeof(out), &got, &err), 0);
    CHECK_EQ_INT(used, 0);
    CHECK_EQ_INT(got, 0);
    CHECK_EQ_INT(ji_content_decoder_run(z, "\x28\xb5", 2, &used, out, 0, &got, &err), 0);
    CHECK_EQ_INT(got, 0);
    CHECK(!ji_content_decoder_finished(z));
    CHECK_EQ_INT(ji_content_decoder_total_out(z), 0);
    ji_content_decoder_free(z);
    ji_content_decoder_free(NULL);
    CHECK(ji_content_decoder_new(JI_ENCODING_IDENTITY, 100) == NULL);
}

UNIT_MAIN("unzstd", {"small_every_cut", test_small_every_cut}, {"big_random_pieces", test_big_random_pieces},
          {"truncated", test_truncated}, {"corrupt", test_corrupt}, {"cap", test_cap},
          {"multi_frame", test_multi_frame}, {"trailing_garbage", test_trailing_garbage},
          {"window_limit", test_window_limit}, {"memory_bound", test_memory_bound}, {"empty_calls", test_empty_calls})
