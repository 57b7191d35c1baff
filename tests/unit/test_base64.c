/*
 * test_base64.c — the strict streaming base64 decoder: every validity rule,
 * input cut at every byte boundary, and random data of every small length
 * and a few big ones, checked against the original bytes (encoded by
 * OpenSSL's EVP_EncodeBlock) and against OpenSSL's EVP_DecodeBlock.
 * Every piece is decoded into a heap buffer of exactly
 * JI_BASE64_DECODED_MAX(piece) bytes, so ASan catches any write past it.
 */
#include "base64.h"
#include "unit.h"

#include <openssl/evp.h>
#include <stdlib.h>
#include <time.h>


/* Splits `in` at the offsets in `cuts` (ascending, `ncuts` of them) and decodes the pieces. 0 with `out`/`outlen`
 * filled, or -1 with *why set. `out` must hold len bytes. */
static int decode_cut(const char *in, size_t len, const size_t *cuts, size_t ncuts, unsigned char *out, size_t *outlen,
                      const char **why)
{
    ji_base64_t d;
    size_t start = 0, total = 0;

    ji_base64_init(&d);
    *why = NULL;
    for (size_t i = 0; i <= ncuts; i++) {
        size_t end = i < ncuts ? cuts[i] : len, n = end - start;
        unsigned char *piece = malloc(JI_BASE64_DECODED_MAX(n));
        long got = ji_base64_decode(&d, in + start, n, piece);
        if (got < 0) {
            free(piece);
            *why = d.error;
            return -1;
        }
        if ((size_t)got > JI_BASE64_DECODED_MAX(n) - 1) /* the slack byte is never data */
            *why = "decoded more than the bound";
        memcpy(out + total, piece, (size_t)got);
        free(piece);
        total += (size_t)got;
        start = end;
    }
    if (ji_base64_finish(&d) != 0) {
        *why = d.error;
        return -1;
    }
    *outlen = total;
    return *why == NULL ? 0 : -1;
}

static int decode_whole(const char *in, size_t len, unsigned char *out, size_t *outlen, const char **why)
{
    return decode_cut(in, len, NULL, 0, out, outlen, why);
}

/* Decodes a C string whole, byte by byte, and cut in two at every place; all must agree with `expect`
 * (NULL: must be invalid). */
static void check_all_cuts(const char *in, const char *expect, size_t expect_len)
{
    size_t len = strlen(in), outlen = 0;
    unsigned char out[256];
    const char *why;

    if (expect != NULL) {
        CHECK_EQ_INT(decode_whole(in, len, out, &outlen, &why), 0);
        CHECK_EQ_INT(outlen, expect_len);
        CHECK(outlen == expect_len && memcmp(out, expect, expect_len) == 0);
        if (why != NULL)
            fprintf(stderr, "  input \"%s\": %s\n", in, why);
    } else {
        CHECK_EQ_INT(decode_whole(in, len, out, &outlen, &why), -1);
        CHECK(why != NULL);
        if (why == NULL)
            fprintf(stderr, "  input \"%s\" was accepted\n", in);
    }
    /* two pieces, cut at every byte */
    for (size_t c = 0; c <= len; c++) {
        int rc = decode_cut(in, len, &c, 1, out, &outlen, &why);
        if (expect != NULL) {
            CHECK(rc == 0 && outlen == expect_len && memcmp(out, expect, expect_len) == 0);
        } else {
            CHECK(rc == -1 && why != NULL);
        }
    }
    /* three pieces, every pair of cuts */
    for (size_t c1 = 0; c1 <= len; c1++) {
        for (size_t c2 = c1; c2 <= len; c2++) {
            size_t cuts[2] = {c1, c2};
            int rc = decode_cut(in, len, cuts, 2, out, &outlen, &why);
            if (expect != NULL) {
                CHECK(rc == 0 && outlen == expect_len && memcmp(out, expect, expect_len) == 0);
            } else {
                CHECK(rc == -1);
            }
        }
    }
    /* one byte at a time */
    {
        size_t cuts[256];
        for (size_t i = 0; i < len; i++)
            cuts[i] = i + 1;
        int rc = decode_cut(in, len, cuts, len, out, &outlen, &why);
        if (expect != NULL) {
            CHECK(rc == 0 && outlen == expect_len && memcmp(out, expect, expect_len) == 0);
        } else {
            CHECK(rc == -1);
        }
    }
}

#define VALID(in, expect) check_all_cuts(in, expect, sizeof(expect) - 1)
#define INVALID(in) check_all_cuts(in, NULL, 0)

static void test_known_answers(void)
{
    VALID("", "");
    VALID("QQ==", "A");
    VALID("QQ", "A");
    VALID("QUI=", "AB");
    VALID("QUI", "AB");
    VALID("QUJD", "ABC");
    VALID("QUJDRA==", "ABCD");
    VALID("QUJDRA", "ABCD");
    VALID("QUJDREU=", "ABCDE");
    VALID("QUJDREU", "ABCDE");
    VALID("QUJDREVG", "ABCDEF");
    VALID("+/+/", "\xfb\xff\xbf");
    VALID("AAAA", "\0\0\0");
    VALID("//8=", "\xff\xff");
    VALID("aGVsbG8gd29ybGQ=", "hello world");
}

static void test_whitespace(void)
{
    VALID(" ", "");
    VALID(" \t\r\n", "");
    VALID(" Q Q = = \n", "A");
    VALID("QUJD\r\nRA==\r\n", "ABCD");
    VALID("Q\nU\nJ\nD", "ABC");
    VALID("QQ=\n=", "A");
    VALID("QUI=\n\n", "AB");
    VALID("\tQUJD\t", "ABC");
}

static void test_bad_characters(void)
{
    INVALID("-");
    INVALID("_");
    INVALID("!");
    INVALID("QU-D");
    INVALID("QU_D");
    INVALID("QUJD!");
    INVALID("QUJD*");
    INVALID("QUJD\xc3\xa9"); /* UTF-8 */
    INVALID("\xff");
    INVALID("QU\vD"); /* vertical tab is not whitespace here */
    INVALID("QU\fD"); /* nor form feed */
    INVALID("QUJD{}");
    INVALID("QUJD.");
    INVALID("data:image/png;base64,QUJD"); /* URLs are image_store's business */

    /* an embedded NUL byte (not a C string, so by hand) */
    {
        const char in[] = "QU\0D";
        unsigned char out[8];
        size_t outlen;
        const char *why;
        CHECK_EQ_INT(decode_whole(in, 4, out, &outlen, &why), -1);
    }
}

static void test_padding_rules(void)
{
    INVALID("=");
    INVALID("==");
    INVALID("Q=");
    INVALID("Q==");
    INVALID("QQ=");   /* padded but length not a multiple of 4 */
    INVALID("QQ==="); /* too much padding */
    INVALID("QUI==");
    INVALID("QUJD="); /* no padding after a full group */
    INVALID("QUJD==");
    INVALID("QQ=A");     /* data after padding */
    INVALID("QQ==QQ=="); /* two padded blobs */
    INVALID("QQ== QUJD");
    INVALID("QUI=A");
    INVALID("Q===");
    INVALID("QQ===");
    INVALID("QQ= = =");
}

static void test_length_rules(void)
{
    INVALID("Q");
    INVALID("QUJDR");
    INVALID("QUJD R");
    INVALID("QUJD\nR\n");
    VALID("QUJDRE", "ABCD");
    VALID("QUJDREU", "ABCDE");
}

static void test_error_is_sticky(void)
{
    ji_base64_t d;
    unsigned char out[JI_BASE64_DECODED_MAX(8)];

    ji_base64_init(&d);
    CHECK_EQ_INT(ji_base64_decode(&d, "QU!D", 4, out), -1);
    CHECK(d.error != NULL);
    CHECK_EQ_INT(ji_base64_decode(&d, "QUJD", 4, out), -1);
    CHECK_EQ_INT(ji_base64_finish(&d), -1);

    /* chars counts alphabet characters only */
    ji_base64_init(&d);
    CHECK_EQ_INT(ji_base64_decode(&d, " \n\t\r", 4, out), 0);
    CHECK_EQ_INT(ji_base64_chars(&d), 0);
    CHECK_EQ_INT(ji_base64_decode(&d, "QU\nJD", 5, out), 3);
    CHECK_EQ_INT(ji_base64_chars(&d), 4);
    CHECK_EQ_INT(ji_base64_finish(&d), 0);
}

static void test_error_messages(void)
{
    ji_base64_t d;
    unsigned char out[JI_BASE64_DECODED_MAX(8)];

    ji_base64_init(&d);
    CHECK_EQ_INT(ji_base64_decode(&d, "QU-D", 4, out), -1);
    CHECK(d.error != NULL && strstr(d.error, "URL-safe") != NULL);
    ji_base64_init(&d);
    CHECK_EQ_INT(ji_base64_decode(&d, "QU\xc3", 3, out), -1);
    CHECK(d.error != NULL && strstr(d.error, "non-ASCII") != NULL);
    ji_base64_init(&d);
    CHECK_EQ_INT(ji_base64_decode(&d, "QUJDR", 5, out), 3);
    CHECK_EQ_INT(ji_base64_finish(&d), -1);
    CHECK(d.error != NULL && strstr(d.error, "one character left over") != NULL);
}

/* Base64 of `n` random bytes in several spellings, decoded whole and in random pieces: must give the bytes back,
 * and agree with EVP_DecodeBlock on the padded form. */
static void check_random(rng_t *r, size_t n, bool big)
{
    unsigned char *raw = malloc(n + 1), *enc = malloc(4 * (n / 3 + 2) + 1), *out = malloc(n + 16);
    unsigned char *ref = malloc(n + 16);
    size_t enc_len, outlen = 0, unpadded;
    size_t wrapped_cap = 4 * (n / 3 + 2) * 2 + 8;
    char *wrapped = malloc(wrapped_cap);
    const char *why;
    bool ok = true;

    rng_fill(r, raw, n);
    enc_len = (size_t)EVP_EncodeBlock(enc, raw, (int)n);
    CHECK_EQ_INT(enc_len % 4, 0);

    /* padded, whole */
    ok &= decode_whole((char *)enc, enc_len, out, &outlen, &why) == 0 && outlen == n && memcmp(out, raw, n) == 0;

    /* OpenSSL's decoder on the same text: its length counts the padding as zero bytes */
    {
        int pad = (enc_len >= 1 && enc[enc_len - 1] == '=') + (enc_len >= 2 && enc[enc_len - 2] == '=');
        int got = EVP_DecodeBlock(ref, enc, (int)enc_len);
        ok &= got >= 0 && (size_t)(got - pad) == n && memcmp(ref, out, n) == 0;
    }

    /* unpadded */
    unpadded = enc_len;
    while (unpadded > 0 && enc[unpadded - 1] == '=')
        unpadded--;
    ok &= decode_whole((char *)enc, unpadded, out, &outlen, &why) == 0 && outlen == n && memcmp(out, raw, n) == 0;

    /* MIME style: CRLF every 76 characters, and a trailing newline */
    {
        size_t w = 0;
        for (size_t i = 0; i < enc_len; i++) {
            if (i > 0 && i % 76 == 0) {
                wrapped[w++] = '\r';
                wrapped[w++] = '\n';
            }
            wrapped[w++] = (char)enc[i];
        }
        wrapped[w++] = '\n';
        ok &= decode_whole(wrapped, w, out, &outlen, &why) == 0 && outlen == n && memcmp(out, raw, n) == 0;

        /* the same cut into random pieces (small ones for small inputs, up to 100 KB for big ones) */
        size_t cuts[64], ncuts = 0, at = 0;
        while (ncuts < 64) {
            at += rng_next(r) % (big ? 100000 : 7);
            if (at > w)
                break;
            cuts[ncuts++] = at;
        }
        ok &= decode_cut(wrapped, w, cuts, ncuts, out, &outlen, &why) == 0 && outlen == n && memcmp(out, raw, n) == 0;
    }

    /* one byte changed to a character outside the alphabet: must fail */
    if (n > 0) {
        size_t at = rng_next(r) % unpadded;
        unsigned char keep = enc[at];
        enc[at] = "-_!*.~\x80\xff"[rng_next(r) % 8];
        ok &= decode_whole((char *)enc, enc_len, out, &outlen, &why) == -1;
        enc[at] = keep;
    }

    CHECK(ok);
    if (!ok)
        fprintf(stderr, "  random input of %zu bytes failed\n", n);
    free(raw);
    free(enc);
    free(out);
    free(ref);
    free(wrapped);
}

static void test_random_small(void)
{
    rng_t r = {0x9e3779b97f4a7c15ull};

    for (size_t n = 0; n <= 300; n++)
        for (int rep = 0; rep < 4; rep++)
            check_random(&r, n, false);
}

static void test_random_big(void)
{
    rng_t r = {0x0123456789abcdefull};
    static const size_t sizes[] = {65536, 65537, 65538, 1000000, 3u << 20};

    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
        check_random(&r, sizes[i], true);
}

/* Not a check: prints the decoder's speed (64 KiB pieces, like the image store). */
static void test_speed(void)
{
    rng_t r = {42};
    size_t n = 48u << 20, enc_len;
    unsigned char *raw = malloc(n), *enc = malloc(4 * (n / 3 + 2) + 1), *out = malloc(n + JI_BASE64_DECODED_MAX(65536));
    struct timespec t0, t1;
    ji_base64_t d;
    uint64_t total = 0;
    bool ok = true;

    rng_fill(&r, raw, n);
    enc_len = (size_t)EVP_EncodeBlock(enc, raw, (int)n);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    ji_base64_init(&d);
    for (size_t pos = 0; pos < enc_len; pos += 65536) {
        size_t piece = enc_len - pos < 65536 ? enc_len - pos : 65536;
        long got = ji_base64_decode(&d, (char *)enc + pos, piece, out + total);
        ok &= got >= 0;
        total += (uint64_t)(got > 0 ? got : 0);
    }
    ok &= ji_base64_finish(&d) == 0;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    CHECK(ok && total == n && memcmp(out, raw, n) == 0);
    double s = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("base64: decoded %zu MB of base64 at %.0f MB/s\n", enc_len / 1000000, (double)enc_len / 1e6 / s);
    free(raw);
    free(enc);
    free(out);
}

UNIT_MAIN("base64", {"known_answers", test_known_answers}, {"whitespace", test_whitespace},
          {"bad_characters", test_bad_characters}, {"padding_rules", test_padding_rules},
          {"length_rules", test_length_rules}, {"error_is_sticky", test_error_is_sticky},
          {"error_messages", test_error_messages}, {"random_small", test_random_small}, {"random_big", test_random_big},
          {"speed", test_speed})
