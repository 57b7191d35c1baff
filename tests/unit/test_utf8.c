/* test_utf8.c — strict UTF-8 validation against a reference decoder, and character counting. */
#include "utf8.h"

#include <stdlib.h>

#include "unit.h"

/*
 * Reference: decode one sequence the slow, obvious way. Returns its length or 0 when ill-formed
 * (bad lead, missing continuation, overlong, surrogate, above U+10FFFF, truncated).
 */
static size_t ref_seq(const unsigned char *p, size_t left)
{
    unsigned char c = p[0];
    size_t n;
    uint32_t cp, min;
    if (c < 0x80)
        return 1;
    if ((c & 0xE0) == 0xC0) {
        n = 2, cp = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
        n = 3, cp = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
        n = 4, cp = c & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    if (left < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (p[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

static bool ref_valid(const unsigned char *p, size_t len)
{
    for (size_t i = 0; i < len;) {
        size_t n = ref_seq(p + i, len - i);
        if (n == 0)
            return false;
        i += n;
    }
    return true;
}

static bool valid_lit(const char *s)
{
    return ji_utf8_valid(s, strlen(s));
}

static void test_known_valid(void)
{
    CHECK(ji_utf8_valid("", 0));
    CHECK(valid_lit("plain ascii"));
    CHECK(valid_lit("\xc2\x80"));         /* U+0080 */
    CHECK(valid_lit("\xdf\xbf"));         /* U+07FF */
    CHECK(valid_lit("\xe0\xa0\x80"));     /* U+0800 */
    CHECK(valid_lit("\xed\x9f\xbf"));     /* U+D7FF */
    CHECK(valid_lit("\xee\x80\x80"));     /* U+E000 */
    CHECK(valid_lit("\xef\xbf\xbf"));     /* U+FFFF */
    CHECK(valid_lit("\xf0\x90\x80\x80")); /* U+10000 */
    CHECK(valid_lit("\xf4\x8f\xbf\xbf")); /* U+10FFFF */
    CHECK(valid_lit("Vladimír Žák 😀 日本"));
    CHECK(ji_utf8_valid("a\0b", 3)); /* NUL is valid UTF-8; the record rules reject it */
}

static void test_known_invalid(void)
{
    CHECK(!valid_lit("\xc0\xaf"));         /* overlong '/' */
    CHECK(!valid_lit("\xc1\xbf"));         /* overlong */
    CHECK(!valid_lit("\xe0\x80\xaf"));     /* overlong */
    CHECK(!valid_lit("\xe0\x9f\xbf"));     /* overlong U+07FF */
    CHECK(!valid_lit("\xf0\x80\x80\xaf")); /* overlong */
    CHECK(!valid_lit("\xf0\x8f\xbf\xbf")); /* overlong U+FFFF */
    CHECK(!valid_lit("\xed\xa0\x80"));     /* U+D800 */
    CHECK(!valid_lit("\xed\xb0\x80"));     /* U+DC00 */
    CHECK(!valid_lit("\xed\xbf\xbf"));     /* U+DFFF */
    CHECK(!valid_lit("\xf4\x90\x80\x80")); /* U+110000 */
    CHECK(!valid_lit("\xf5\x80\x80\x80"));
    CHECK(!valid_lit("\xff"));
    CHECK(!valid_lit("\xfe"));
    CHECK(!valid_lit("\x80")); /* stray continuation */
    CHECK(!valid_lit("a\xbf"));
    CHECK(!valid_lit("\xc3"));         /* truncated */
    CHECK(!valid_lit("\xe2\x82"));     /* truncated */
    CHECK(!valid_lit("\xf0\x9f\x98")); /* truncated */
    CHECK(!valid_lit("\xc3\x41"));     /* continuation missing */
    CHECK(!valid_lit("\xe2\x28\xa1"));
    CHECK(!valid_lit("\xf0\x9f\x98\x41"));
    /* truncation by the length, not by a NUL */
    CHECK(!ji_utf8_valid("\xe2\x82\xac", 2));
    CHECK(ji_utf8_valid("\xe2\x82\xac", 3));
}

/* Every sequence of 1 to 3 bytes, and every 4-byte one with a lead of F0..F7 and sampled tails. */
static void test_exhaustive_against_reference(void)
{
    unsigned char b[4];
    long mismatches = 0;

    for (unsigned a = 0; a < 256; a++) {
        b[0] = (unsigned char)a;
        mismatches += ji_utf8_valid((char *)b, 1) != ref_valid(b, 1);
        for (unsigned c = 0; c < 256; c++) {
            b[1] = (unsigned char)c;
            mismatches += ji_utf8_valid((char *)b, 2) != ref_valid(b, 2);
            for (unsigned d = 0; d < 256; d++) {
                b[2] = (unsigned char)d;
                mismatches += ji_utf8_valid((char *)b, 3) != ref_valid(b, 3);
            }
        }
    }
    for (unsigned a = 0xE0; a < 0x100; a++) {
        for (unsigned c = 0; c < 256; c++) {
            for (unsigned d = 0x70; d < 0xD0; d++) {
                for (unsigned e = 0x70; e < 0xD0; e += 7) {
                    b[0] = (unsigned char)a, b[1] = (unsigned char)c, b[2] = (unsigned char)d, b[3] = (unsigned char)e;
                    mismatches += ji_utf8_valid((char *)b, 4) != ref_valid(b, 4);
                }
            }
        }
    }
    CHECK_EQ_INT(mismatches, 0);
}

/* A bad byte anywhere in a long ASCII run (the 16-byte fast path) is found, and a truncated tail too. */
static void test_fast_path_positions(void)
{
    char buf[100];
    long misses = 0;

    for (size_t len = 1; len <= sizeof(buf); len++) {
        for (size_t at = 0; at < len; at++) {
            memset(buf, 'A', len);
            buf[at] = (char)0xC0;
            misses += ji_utf8_valid(buf, len); /* C0 is never valid */
            buf[at] = (char)0xE2;              /* truncated unless two continuation bytes follow */
            misses += ji_utf8_valid(buf, len);
        }
        memset(buf, 'A', len);
        misses += !ji_utf8_valid(buf, len);
        if (len >= 4) {
            memcpy(buf + len - 4, "\xf0\x9f\x98\x80", 4);
            misses += !ji_utf8_valid(buf, len);
        }
    }
    CHECK_EQ_INT(misses, 0);
}

static void test_chars(void)
{
    CHECK_EQ_INT(ji_utf8_chars("", 0), 0);
    CHECK_EQ_INT(ji_utf8_chars("abc", 3), 3);
    CHECK_EQ_INT(ji_utf8_chars("é", 2), 1);
    CHECK_EQ_INT(ji_utf8_chars("€", 3), 1);
    CHECK_EQ_INT(ji_utf8_chars("😀", 4), 1);
    const char *mix = "Vladimír Žák 😀 日本 and some more ascii text";
    CHECK_EQ_INT(ji_utf8_chars(mix, strlen(mix)), 42);

    /* long strings crossing the 8-byte steps, every length */
    char buf[4 * 300];
    for (size_t n = 0; n < 300; n++) {
        size_t len = 0;
        for (size_t i = 0; i < n; i++) {
            static const char *const pieces[] = {"a", "\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80"};
            const char *pc = pieces[(i * 7 + n) % 4];
            memcpy(buf + len, pc, strlen(pc));
            len += strlen(pc);
        }
        CHECK(ji_utf8_valid(buf, len));
        if (ji_utf8_chars(buf, len) != n) {
            CHECK_EQ_INT(ji_utf8_chars(buf, len), n);
            break;
        }
    }
}

UNIT_MAIN("utf8", {"known_valid", test_known_valid}, {"known_invalid", test_known_invalid},
          {"exhaustive_against_reference", test_exhaustive_against_reference},
          {"fast_path_positions", test_fast_path_positions}, {"chars", test_chars})
