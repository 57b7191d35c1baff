/*
 * utf8.c — owns strict UTF-8 validation and character counting. yajl's own
 * check lets overlong forms and encoded surrogates through, and PostgreSQL
 * rejects them in the middle of a COPY, so every string of a record passes
 * through ji_utf8_valid (Unicode 3.x, table 3-7 "well-formed byte sequences").
 */
#include "utf8.h"

#include <string.h>

#define JI_UTF8_HIGH_BITS 0x8080808080808080ull

/* True when the 8 bytes at `p` are all ASCII. memcpy keeps unaligned reads defined; compilers turn it into one load. */
static inline bool ascii8(const unsigned char *p)
{
    uint64_t w;
    memcpy(&w, p, sizeof(w));
    return (w & JI_UTF8_HIGH_BITS) == 0;
}

static inline bool is_cont(unsigned char c)
{
    return (c & 0xC0) == 0x80;
}

bool ji_utf8_valid(const char *s, size_t len)
{
    return ji_utf8_invalid_at(s, len) == SIZE_MAX;
}

size_t ji_utf8_invalid_at(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;

    while (i < len) {
        /* fast path: base64 images and most names are pure ASCII */
        if (len - i >= 16 && ascii8(p + i) && ascii8(p + i + 8)) {
            i += 16;
            continue;
        }
        unsigned char c = p[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t left = len - i;
        if (c >= 0xC2 && c <= 0xDF) { /* U+0080..U+07FF; C0 and C1 would be overlong */
            if (left < 2 || !is_cont(p[i + 1]))
                return i;
            i += 2;
        } else if (c >= 0xE0 && c <= 0xEF) { /* U+0800..U+FFFF */
            if (left < 3)
                return i;
            unsigned char c1 = p[i + 1];
            unsigned char lo = 0x80, hi = 0xBF;
            if (c == 0xE0)
                lo = 0xA0; /* below: overlong */
            else if (c == 0xED)
                hi = 0x9F; /* above: surrogates U+D800..U+DFFF */
            if (c1 < lo || c1 > hi || !is_cont(p[i + 2]))
                return i;
            i += 3;
        } else if (c >= 0xF0 && c <= 0xF4) { /* U+10000..U+10FFFF */
            if (left < 4)
                return i;
            unsigned char c1 = p[i + 1];
            unsigned char lo = 0x80, hi = 0xBF;
            if (c == 0xF0)
                lo = 0x90; /* below: overlong */
            else if (c == 0xF4)
                hi = 0x8F; /* above: past U+10FFFF */
            if (c1 < lo || c1 > hi || !is_cont(p[i + 2]) || !is_cont(p[i + 3]))
                return i;
            i += 4;
        } else {
            /* a stray continuation byte, C0/C1 (always overlong), or F5..FF (past U+10FFFF) */
            return i;
        }
    }
    return SIZE_MAX;
}

size_t ji_utf8_chars(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t chars = 0, i = 0;

    /* every byte that is not a continuation byte starts a character */
    for (; len - i >= 8; i += 8) {
        if (ascii8(p + i)) {
            chars += 8;
            continue;
        }
        for (size_t k = 0; k < 8; k++)
            chars += !is_cont(p[i + k]);
    }
    for (; i < len; i++)
        chars += !is_cont(p[i]);
    return chars;
}
