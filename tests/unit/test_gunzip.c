/*
 * test_gunzip.c — gzip bodies come out the same however the wire cuts them and however small the output buffer;
 * corrupt, truncated, oversized, multi-member and trailing-garbage bodies. Inputs are made here with zlib's own
 * deflate (gzip wrapper), from seeded pseudo-random data.
 */
#include "gunzip.h"

#include <stdlib.h>
#include <zlib.h>

#include "unit.h"

/* ------------------------------------------------------------------ inputs */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

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

/* One gzip member of `data`; with `named` the header carries a name, an extra field, a comment and a header CRC. */
static void gzip_member(buf_t *out, const char *data, size_t n, int level, bool named)
{
    z_stream z;
    gz_header h;
    unsigned char chunk[4096];
    int r;

    memset(&z, 0, sizeof(z));
    CHECK_EQ_INT(deflateInit2(&z, level, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY), Z_OK);
    if (named) {
        static unsigned char extra[] = "AB\x04\x00wxyz";
        memset(&h, 0, sizeof(h));
        h.name = (Bytef *)"users.jsonl";
        h.comment = (Bytef *)"made by test_gunzip";
        h.extra = extra;
        h.extra_len = 8;
        h.hcrc = 1;
        h.os = 3;
        CHECK_EQ_INT(deflateSetHeader(&z, &h), Z_OK);
    }
    z.next_in = (Bytef *)(uintptr_t)data;
    z.avail_in = (uInt)n;
    do {
        z.next_out = chunk;
        z.avail_out = sizeof(chunk);
        r = deflate(&z, Z_FINISH);
        CHECK(r == Z_OK || r == Z_STREAM_END || r == Z_BUF_ERROR);
        buf_append(out, chunk, sizeof(chunk) - z.avail_out);
    } while (r != Z_STREAM_END);
    deflateEnd(&z);
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
                         size_t out_cap, uint64_t max_inflated, result_t *res)
{
    ji_gunzip_t *g = ji_gunzip_new(max_inflated);
    char *out = malloc(out_cap + 16);
    size_t from = 0, ci = 0;
    done_t d = DONE_OK;

    memset(res, 0, sizeof(*res));
    while (from < len || from == 0) {
        size_t to = cuts != NULL ? (ci < ncuts ? cuts[ci++] : len) : from + 1 + (size_t)(rng() % max_piece);
        size_t pos = 0, n;
        if (to > len)
            to = len;
        n = to - from;
        for (;;) {
            size_t used = 0, got = 0;
            memset(out + out_cap, 0x5a, 16);
            if (ji_gunzip_run(g, (const char *)in + from + pos, n - pos, &used, out, out_cap, &got, &res->err) != 0) {
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
                continue; /* more may be pending inside zlib (out_cap is never 0 here) */
            if (pos == n)
                break;
            /* room left and input left: only a finished stream followed by garbage stops like this */
            if (!ji_gunzip_finished(g))
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
    res->finished = ji_gunzip_finished(g);
    if (d == DONE_OK && ji_gunzip_total_out(g) != res->out.len)
        res->bad = true;
    ji_gunzip_free(g);
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

/* A small body cut once at every offset, with 1-byte and 64 KiB output buffers. */
static void test_small_every_cut(void)
{
    size_t n = 3000;
    char *data = make_data(n);
    buf_t gz = {0};
    result_t r;
    size_t outs[] = {1, 7, 64 * 1024};
    int wrong = 0, unfinished = 0, broken = 0;

    gzip_member(&gz, data, n, 6, true);
    for (size_t o = 0; o < sizeof(outs) / sizeof(outs[0]); o++) {
        for (size_t cut = 0; cut <= gz.len; cut++) {
            size_t cuts[2] = {cut, gz.len};
            done_t d = run_pieces(gz.p, gz.len, cuts, 2, 0, outs[o], JI_DEFAULT_MAX_INFLATED_BYTES, &r);
            wrong += d != DONE_OK || !same(&r, data, n);
            unfinished += !r.finished;
            broken += r.bad || r.max_out_call > outs[o];
            result_free(&r);
        }
    }
    CHECK_EQ_INT(wrong, 0);
    CHECK_EQ_INT(unfinished, 0);
    CHECK_EQ_INT(broken, 0);

    /* every byte on its own */
    CHECK_EQ_INT(run_pieces(gz.p, gz.len, NULL, 0, 1, 1, JI_DEFAULT_MAX_INFLATED_BYTES, &r), DONE_OK);
    CHECK(same(&r, data, n));
    CHECK(r.finished);
    CHECK(!r.bad);
    result_free(&r);
    free(gz.p);
    free(data);
}

/* A big body in random pieces, output buffers of 1 byte, random sizes and 64 KiB. */
static void test_big_random_pieces(void)
{
    size_t n = 3 * 1024 * 1024, small = 256 * 1024;
    char *data = make_data(n);
    buf_t gz = {0}, gz_small = {0};
    result_t r;

    gzip_member(&gz, data, n, 1, false);
    for (int round = 0; round < 4; round++) {
        size_t max_piece = round == 0 ? 1 : round == 1 ? 100 : round == 2 ? 10000 : 1000000;
        CHECK_EQ_INT(run_pieces(gz.p, gz.len, NULL, 0, max_piece, 64 * 1024, JI_DEFAULT_MAX_INFLATED_BYTES, &r),
                     DONE_OK);
        CHECK(same(&r, data, n));
        CHECK(r.finished);
        CHECK(!r.bad);
        result_free(&r);
    }
    CHECK_EQ_INT(run_pieces(gz.p, gz.len, NULL, 0, 5000, 1 + rng() % 3000, JI_DEFAULT_MAX_INFLATED_BYTES, &r), DONE_OK);
    CHECK(same(&r, data, n));
    result_free(&r);

    /* 1-byte output costs one zlib call per byte: a smaller body */
    gzip_member(&gz_small, data, small, 9, false);
    CHECK_EQ_INT(run_pieces(gz_small.p, gz_small.len, NULL, 0, 3000, 1, JI_DEFAULT_MAX_INFLATED_BYTES, &r), DONE_OK);
    CHECK(same(&r, data, small));
    CHECK(r.finished);
    CHECK_EQ_INT(r.max_out_call, 1);
    result_free(&r);
    free(gz.p);
    free(gz_small.p);
    free(data);
}

/* Every prefix of a body: no error, not finished, and what came out is a prefix of the data. */
static void test_truncated(void)
{
    size_t n = 2000;
    char *data = make_data(n);
    buf_t gz = {0};
    result_t r;
    int bad = 0;

    gzip_member(&gz, data, n, 6, true);
    for (size_t len = 0; len < gz.len; len++) {
        size_t cuts[1] = {len};
        done_t d = run_pieces(gz.p, len, cuts, 1, 0, 512, JI_DEFAULT_MAX_INFLATED_BYTES, &r);
        bad += d != DONE_OK || r.finished || r.bad || r.out.len > n ||
               (r.out.len > 0 && memcmp(r.out.p, data, r.out.len) != 0);
        result_free(&r);
    }
    CHECK_EQ_INT(bad, 0);
    free(gz.p);
    free(data);
}

/* Any bit flipped in the compressed data or the trailer is an error naming zlib's reason. */
static void test_corrupt(void)
{
    size_t n = 2000;
    char *data = make_data(n);
    buf_t gz = {0};
    result_t r;
    int undetected = 0, wrong_kind = 0;

    gzip_member(&gz, data, n, 6, false);
    /* 10-byte header without optional fields; its MTIME, XFL and OS bytes are not checked by anyone */
    for (size_t i = 10; i < gz.len; i++) {
        size_t cuts[1] = {gz.len};
        done_t d;
        gz.p[i] ^= 0x01; /* the lowest bit of a deflate byte is always read */
        d = run_pieces(gz.p, gz.len, cuts, 1, 0, 4096, JI_DEFAULT_MAX_INFLATED_BYTES, &r);
        gz.p[i] ^= 0x01;
        undetected += d != DONE_ERROR;
        wrong_kind +=
            d == DONE_ERROR && (r.err.kind != JI_ERR_MALFORMED ||
                                strncmp(r.err.message, "corrupt gzip body: ", 19) != 0 || strlen(r.err.message) <= 19);
        result_free(&r);
    }
    CHECK_EQ_INT(undetected, 0);
    CHECK_EQ_INT(wrong_kind, 0);

    /* a bad magic, a zlib (not gzip) stream, plain JSON */
    {
        static const char json[] = "{\"name\":\"a\",\"email\":\"a@b\"}\n";
        unsigned char zl[128];
        uLongf zl_len = sizeof(zl);
        size_t cuts[1];
        CHECK_EQ_INT(compress2(zl, &zl_len, (const Bytef *)json, sizeof(json) - 1, 6), Z_OK);
        cuts[0] = zl_len;
        CHECK_EQ_INT(run_pieces(zl, zl_len, cuts, 1, 0, 100, JI_DEFAULT_MAX_INFLATED_BYTES, &r), DONE_ERROR);
        CHECK_EQ_INT(r.err.kind, JI_ERR_MALFORMED);
        CHECK_EQ_STR(r.err.message, "corrupt gzip body: incorrect header check");
        result_free(&r);
        cuts[0] = sizeof(json) - 1;
        CHECK_EQ_INT(run_pieces((const unsigned char *)json, sizeof(json) - 1, cuts, 1, 0, 100,
                                JI_DEFAULT_MAX_INFLATED_BYTES, &r),
                     DONE_ERROR);
        CHECK_EQ_STR(r.err.message, "corrupt gzip body: incorrect header check");
        CHECK_EQ_INT(r.err.line, 0);
        result_free(&r);
    }

    /* after an error every call fails the same way, consuming nothing */
    {
        ji_gunzip_t *g = ji_gunzip_new(1000);
        char out[16];
        size_t used = 99, got = 99;
        ji_error_t err;
        CHECK_EQ_INT(ji_gunzip_run(g, "nope", 4, &used, out, sizeof(out), &got, &err), -1);
        CHECK_EQ_INT(err.kind, JI_ERR_MALFORMED);
        ji_error_clear(&err);
        CHECK_EQ_INT(ji_gunzip_run(g, (const char *)gz.p, gz.len, &used, out, sizeof(out), &got, &err), -1);
        CHECK_EQ_INT(used, 0);
        CHECK_EQ_INT(got, 0);
        CHECK_EQ_STR(err.message, "corrupt gzip body: incorrect header check");
        ji_gunzip_free(g);
    }
    free(gz.p);
    free(data);
}

/* The inflated cap: exactly the cap is fine, one byte more fails, and a bomb stops at the cap. */
static void test_cap(void)
{
    size_t n = 100000, bomb = 64 * 1024 * 1024;
    char *data = make_data(n), *zeros = calloc(1, bomb);
    buf_t gz = {0}, gz_bomb = {0}, gz_empty = {0};
    result_t r;
    size_t outs[] = {1, 999, 64 * 1024, 1024 * 1024};

    gzip_member(&gz, data, n, 6, false);
    for (size_t o = 0; o < sizeof(outs) / sizeof(outs[0]); o++) {
        CHECK_EQ_INT(run_pieces(gz.p, gz.len, NULL, 0, 777, outs[o], n, &r), DONE_OK);
        CHECK(same(&r, data, n));
        CHECK(r.finished);
        result_free(&r);
        CHECK_EQ_INT(run_pieces(gz.p, gz.len, NULL, 0, 777, outs[o], n - 1, &r), DONE_ERROR);
        CHECK_EQ_INT(r.err.kind, JI_ERR_TOO_LARGE);
        CHECK_EQ_STR(r.err.message, "inflated body is larger than 99999 bytes");
        CHECK(r.out.len <= n - 1); /* nothing past the cap was handed out */
        result_free(&r);
    }

    /* 64 MiB of zeros in ~64 KiB of gzip: stopped at the 1 MiB cap */
    gzip_member(&gz_bomb, zeros, bomb, 9, false);
    CHECK(gz_bomb.len < 256 * 1024);
    CHECK_EQ_INT(run_pieces(gz_bomb.p, gz_bomb.len, NULL, 0, 65536, 65536, 1024 * 1024, &r), DONE_ERROR);
    CHECK_EQ_INT(r.err.kind, JI_ERR_TOO_LARGE);
    CHECK_EQ_STR(r.err.message, "inflated body is larger than 1048576 bytes");
    CHECK(r.out.len <= 1024 * 1024);
    result_free(&r);

    /* an empty member under a cap of 0 */
    gzip_member(&gz_empty, "", 0, 6, false);
    CHECK_EQ_INT(run_pieces(gz_empty.p, gz_empty.len, NULL, 0, 3, 10, 0, &r), DONE_OK);
    CHECK_EQ_INT(r.out.len, 0);
    CHECK(r.finished);
    result_free(&r);
    CHECK_EQ_INT(run_pieces(gz.p, gz.len, NULL, 0, 3, 10, 0, &r), DONE_ERROR);
    CHECK_EQ_STR(r.err.message, "inflated body is larger than 0 bytes");
    result_free(&r);

    free(gz.p);
    free(gz_bomb.p);
    free(gz_empty.p);
    free(zeros);
    free(data);
}

/* `cat a.gz empty.gz b.gz` inflates to a then b, cut anywhere; finished() only at member ends. */
static void test_multi_member(void)
{
    size_t na = 1500, nb = 900;
    char *a = make_data(na), *b = make_data(nb), *ab = malloc(na + nb);
    buf_t gz = {0};
    result_t r;
    size_t end_a, end_empty;
    int wrong = 0, bad = 0;

    memcpy(ab, a, na);
    memcpy(ab + na, b, nb);
    gzip_member(&gz, a, na, 6, true);
    end_a = gz.len;
    gzip_member(&gz, "", 0, 6, false);
    end_empty = gz.len;
    gzip_member(&gz, b, nb, 1, false);

    for (size_t cut = 0; cut <= gz.len; cut++) {
        size_t cuts[2] = {cut, gz.len};
        done_t d = run_pieces(gz.p, gz.len, cuts, 2, 0, cut % 2 ? 1 : 4096, JI_DEFAULT_MAX_INFLATED_BYTES, &r);
        wrong += d != DONE_OK || !same(&r, ab, na + nb) || !r.finished;
        bad += r.bad;
        result_free(&r);
    }
    CHECK_EQ_INT(wrong, 0);
    CHECK_EQ_INT(bad, 0);

    /* finished() at each member end, not in between */
    for (size_t len = 0; len <= gz.len; len++) {
        size_t cuts[1] = {len};
        bool at_end = len == end_a || len == end_empty || len == gz.len;
        done_t d = run_pieces(gz.p, len, cuts, 1, 0, 4096, JI_DEFAULT_MAX_INFLATED_BYTES, &r);
        bad += d != DONE_OK || r.finished != at_end;
        result_free(&r);
    }
    CHECK_EQ_INT(bad, 0);

    /* all three members in one call */
    {
        ji_gunzip_t *g = ji_gunzip_new(JI_DEFAULT_MAX_INFLATED_BYTES);
        char out[8192];
        size_t used, got;
        ji_error_t err;
        CHECK_EQ_INT(ji_gunzip_run(g, (const char *)gz.p, gz.len, &used, out, sizeof(out), &got, &err), 0);
        CHECK_EQ_INT(used, gz.len);
        CHECK_EQ_INT(got, na + nb);
        CHECK(ji_gunzip_finished(g));
        ji_gunzip_free(g);
    }

    /* a member ends exactly when the output buffer is full: the next one still starts */
    {
        ji_gunzip_t *g = ji_gunzip_new(JI_DEFAULT_MAX_INFLATED_BYTES);
        char out[8192];
        size_t used, got, used2, got2;
        ji_error_t err;
        CHECK_EQ_INT(ji_gunzip_run(g, (const char *)gz.p, gz.len, &used, out, na, &got, &err), 0);
        CHECK_EQ_INT(got, na);
        CHECK(used == gz.len || !ji_gunzip_finished(g)); /* never "finished with bytes left" before b */
        CHECK_EQ_INT(ji_gunzip_run(g, (const char *)gz.p + used, gz.len - used, &used2, out + na, sizeof(out) - na,
                                   &got2, &err),
                     0);
        CHECK_EQ_INT(used + used2, gz.len);
        CHECK_EQ_INT(got2, nb);
        CHECK(memcmp(out, ab, na + nb) == 0);
        CHECK(ji_gunzip_finished(g));
        ji_gunzip_free(g);
    }
    free(gz.p);
    free(a);
    free(b);
    free(ab);
}

/* Bytes after the last member that are not gzip: left unconsumed for the caller; "\x1f" junk is corrupt. */
static void test_trailing_garbage(void)
{
    size_t n = 1000;
    char *data = make_data(n);
    buf_t gz = {0};
    result_t r;
    size_t member;
    static const char *junk[] = {"x", "\n", "\0\0\0\0", "{\"name\":\"a\"}\n"};

    gzip_member(&gz, data, n, 6, false);
    member = gz.len;
    for (size_t j = 0; j < sizeof(junk) / sizeof(junk[0]); j++) {
        size_t jl = j == 2 ? 4 : strlen(junk[j]);
        gz.len = member;
        buf_append(&gz, junk[j], jl);
        for (size_t cut = member - 3; cut <= gz.len; cut++) {
            size_t cuts[2] = {cut, gz.len};
            CHECK_EQ_INT(run_pieces(gz.p, gz.len, cuts, 2, 0, 4096, JI_DEFAULT_MAX_INFLATED_BYTES, &r), DONE_GARBAGE);
            CHECK_EQ_INT(r.garbage_at, member);
            CHECK(r.finished);
            CHECK(same(&r, data, n));
            CHECK(!r.bad);
            result_free(&r);
        }
    }

    /* 0x1f starts a member: what follows must be a gzip header */
    gz.len = member;
    buf_append(&gz, "\x1f\x00garbage", 9);
    CHECK_EQ_INT(run_pieces(gz.p, gz.len, NULL, 0, 5, 4096, JI_DEFAULT_MAX_INFLATED_BYTES, &r), DONE_ERROR);
    CHECK_EQ_STR(r.err.message, "corrupt gzip body: incorrect header check");
    result_free(&r);

    /* a body ending with a lone 0x1f is an unfinished second member */
    gz.len = member;
    buf_append(&gz, "\x1f", 1);
    CHECK_EQ_INT(run_pieces(gz.p, gz.len, NULL, 0, 50, 4096, JI_DEFAULT_MAX_INFLATED_BYTES, &r), DONE_OK);
    CHECK(!r.finished);
    CHECK(same(&r, data, n));
    result_free(&r);
    free(gz.p);
    free(data);
}

/* Zero-sized calls are harmless. */
static void test_empty_calls(void)
{
    ji_gunzip_t *g = ji_gunzip_new(100);
    char out[4];
    size_t used = 9, got = 9;
    ji_error_t err;

    CHECK_EQ_INT(ji_gunzip_run(g, "", 0, &used, out, sizeof(out), &got, &err), 0);
    CHECK_EQ_INT(used, 0);
    CHECK_EQ_INT(got, 0);
    CHECK_EQ_INT(ji_gunzip_run(g, "\x1f\x8b", 2, &used, out, 0, &got, &err), 0);
    CHECK_EQ_INT(got, 0);
    CHECK(!ji_gunzip_finished(g));
    CHECK_EQ_INT(ji_gunzip_total_out(g), 0);
    ji_gunzip_free(g);
    ji_gunzip_free(NULL);
}

UNIT_MAIN("gunzip", {"small_every_cut", test_small_every_cut}, {"big_random_pieces", test_big_random_pieces},
          {"truncated", test_truncated}, {"corrupt", test_corrupt}, {"cap", test_cap},
          {"multi_member", test_multi_member}, {"trailing_garbage", test_trailing_garbage},
          {"empty_calls", test_empty_calls})
