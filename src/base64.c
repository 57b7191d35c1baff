/*
 * base64.c — owns the strictness of base64 decoding. Every input byte is
 * classified through one 256-entry table (alphabet, whitespace, '=', or
 * invalid) before libb64 sees it; libb64 then decodes the piece as it is,
 * because the only non-alphabet bytes a valid piece can hold (whitespace and
 * final '=') are exactly the ones libb64 skips. libb64's state carries the
 * 0-3 characters of an unfinished group from one piece to the next, and the
 * byte it writes past its returned length is covered by the slack in
 * JI_BASE64_DECODED_MAX.
 *
 * Why the rules: libb64 alone accepts anything (see docs/libraries.md). Here:
 * '=' only as final padding, at most two, only whitespace or '=' after the
 * first one, and the padded length a multiple of 4. Unpadded input is fine
 * unless it ends with a lone character (4n+1 characters cannot be bytes).
 * The unused low bits of the last character are not checked ("QR==" decodes
 * like "QQ=="), as OpenSSL and most decoders do.
 */
#include "base64.h"

/* Classes of an input byte. Alphabet is 0 so that eight bytes can be tested with one OR. */
enum {
    B64_ALPHA = 0, /**< A-Z a-z 0-9 + / */
    B64_WS = 1,    /**< space, \t, \r, \n: skipped */
    B64_PAD = 2,   /**< '=' */
    B64_BAD = 3,   /**< anything else */
};

/* clang-format off */
static const unsigned char b64_class[256] = {
    /*       0  1  2  3  4  5  6  7  8  9  a  b  c  d  e  f */
    /* 0 */  3, 3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 3, 3, 1, 3, 3,   /* \t \n \r */
    /* 1 */  3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
    /* 2 */  1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 3, 3, 3, 0,   /* ' ' '+' '/' */
    /* 3 */  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 3, 2, 3, 3,   /* 0-9 '=' */
    /* 4 */  3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,   /* A-O */
    /* 5 */  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 3, 3, 3,   /* P-Z */
    /* 6 */  3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,   /* a-o */
    /* 7 */  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 3, 3, 3,   /* p-z */
    /* 8 */  3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,   /* 8-f: non-ASCII */
    /* 9 */  3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
    /* a */  3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
    /* b */  3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
    /* c */  3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
    /* d */  3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
    /* e */  3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
    /* f */  3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
};
/* clang-format on */

/** libb64 takes an int length: feed it at most this much per call. */
#define B64_MAX_CALL (1 << 30)

void ji_base64_init(ji_base64_t *d)
{
    base64_init_decodestate(&d->_state);
    d->_chars = 0;
    d->_padding = 0;
    d->error = NULL;
}

static int fail(ji_base64_t *d, const char *why)
{
    if (d->error == NULL)
        d->error = why;
    return -1;
}

static const char *bad_byte_reason(unsigned char c)
{
    if (c >= 0x80)
        return "non-ASCII byte";
    if (c == '-' || c == '_')
        return "'-' or '_' (URL-safe base64 is not accepted)";
    return "character outside the base64 alphabet";
}

/* One '=' arrives; `_chars` counts every alphabet character before it. */
static int take_padding(ji_base64_t *d)
{
    unsigned rem = (unsigned)(d->_chars % 4);

    d->_padding++;
    if (d->_padding > 2)
        return fail(d, "more than two '=' padding characters");
    /* "xx==" and "xxx=" are the only complete padded groups. */
    if (rem < 2 || (d->_padding == 2 && rem != 2))
        return fail(d, rem < 2 ? "'=' where no padding can be" : "more '=' padding than the last group needs");
    return 0;
}

/* Checks a piece; on success `_chars` and `_padding` include it. */
static int validate(ji_base64_t *d, const unsigned char *p, const unsigned char *end)
{
    const unsigned char *start = p;
    size_t skipped = 0;

    if (d->_padding == 0) {
        /* The hot loop: eight table loads and one well-predicted branch per eight alphabet bytes; one byte at a
         * time around whitespace and the end. */
        while (p < end) {
            unsigned c;
            while (end - p >= 8 && (b64_class[p[0]] | b64_class[p[1]] | b64_class[p[2]] | b64_class[p[3]] |
                                    b64_class[p[4]] | b64_class[p[5]] | b64_class[p[6]] | b64_class[p[7]]) == 0)
                p += 8;
            if (p == end)
                break;
            c = b64_class[*p];
            if (c == B64_WS)
                skipped++;
            else if (c == B64_PAD)
                break;
            else if (c != B64_ALPHA)
                return fail(d, bad_byte_reason(*p));
            p++;
        }
        d->_chars += (uint64_t)(p - start) - skipped;
    }
    /* After the first '=': only more '=' or whitespace. */
    for (; p < end; p++) {
        switch (b64_class[*p]) {
        case B64_WS:
            break;
        case B64_PAD:
            if (take_padding(d) != 0)
                return -1;
            break;
        case B64_ALPHA:
            return fail(d, "data after '=' padding");
        default:
            return fail(d, bad_byte_reason(*p));
        }
    }
    return 0;
}

long ji_base64_decode(ji_base64_t *d, const char *in, size_t len, unsigned char *out)
{
    long total = 0;

    if (d->error != NULL)
        return -1;
    if (validate(d, (const unsigned char *)in, (const unsigned char *)in + len) != 0)
        return -1;
    /* Valid: what is not alphabet is whitespace or final '=', which libb64 skips. */
    while (len > 0) {
        int n = len > B64_MAX_CALL ? B64_MAX_CALL : (int)len;
        total += base64_decode_block(in, n, (char *)out + total, &d->_state);
        in += n;
        len -= (size_t)n;
    }
    return total;
}

int ji_base64_finish(ji_base64_t *d)
{
    unsigned rem = (unsigned)(d->_chars % 4);

    if (d->error != NULL)
        return -1;
    if (d->_padding == 0 && rem == 1)
        return fail(d, "truncated: one character left over after the last group of four");
    if (d->_padding != 0 && rem + d->_padding != 4)
        return fail(d, "'=' padding does not complete the last group of four");
    return 0;
}
