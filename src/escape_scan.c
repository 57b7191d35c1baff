/*
 * escape_scan.c — owns the detection of the `\u` escapes yajl mangles without
 * a word (`\u0000`, unpaired UTF-16 surrogates), found in the raw text of a
 * line before yajl decodes it. It only looks at backslashes: text between
 * them is skipped with memchr, so a base64 image costs one memchr call.
 *
 * An escape cut by a fragment boundary is kept in `_pending` (at most
 * `\uD83D\uDE0` = 11 bytes before it can be judged) and finished with the
 * next fragment. Only the first bad escape of a line is recorded.
 */
#include "escape_scan.h"

#include <string.h>

static const char why_nul[] = "\\u0000 escape";
static const char why_surrogate[] = "unpaired surrogate escape";

typedef enum {
    STEP_MORE, /* the escape goes on */
    STEP_DONE, /* a complete escape that is fine */
    STEP_REDO, /* not a \u escape after all (yajl rejects it): look at the byte again as plain text */
    STEP_BAD,  /* a bad escape: see `why` */
} step_t;

/* The code unit of the 4 hex digits at `h` (already checked). */
static unsigned code_unit(const char *h)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++)
        v = (v << 4) | (unsigned)ji_hex_value((unsigned char)h[i]);
    return v;
}

static bool is_high(unsigned u)
{
    return u >= 0xD800 && u <= 0xDBFF;
}

static bool is_low(unsigned u)
{
    return u >= 0xDC00 && u <= 0xDFFF;
}

/*
 * Appends `c` to the pending escape (which starts with its backslash) and says how it stands. Positions:
 * 0 '\', 1 'u', 2..5 hex, and after a high surrogate 6 '\', 7 'u', 8..11 hex of the low one.
 */
static step_t step(ji_escape_scan_t *s, unsigned char c, const char **why)
{
    size_t n = s->_pending_len;

    s->_pending[n] = (char)c;
    s->_pending_len = ++n;
    if (n == 2)
        return c == 'u' ? STEP_MORE : STEP_DONE; /* `\\`, `\"`, `\n`...: two bytes and done */
    if (n <= 6) {
        if (ji_hex_value(c) < 0)
            return STEP_REDO;
        if (n < 6)
            return STEP_MORE;
        unsigned u = code_unit(s->_pending + 2);
        if (u == 0) {
            *why = why_nul;
            return STEP_BAD;
        }
        if (is_low(u)) {
            *why = why_surrogate;
            return STEP_BAD;
        }
        return is_high(u) ? STEP_MORE : STEP_DONE;
    }
    /* a high surrogate must be followed at once by `\u` and a low surrogate */
    *why = why_surrogate;
    if (n == 7)
        return c == '\\' ? STEP_MORE : STEP_BAD;
    if (n == 8)
        return c == 'u' ? STEP_MORE : STEP_BAD;
    if (ji_hex_value(c) < 0)
        return STEP_BAD;
    if (n < 12)
        return STEP_MORE;
    return is_low(code_unit(s->_pending + 8)) ? STEP_DONE : STEP_BAD;
}

void ji_escape_scan_reset(ji_escape_scan_t *s)
{
    s->offset = 0;
    s->bad_at = SIZE_MAX;
    s->why = NULL;
    s->_pending_len = 0;
    s->_pending_at = 0;
}

void ji_escape_scan_feed(ji_escape_scan_t *s, const char *data, size_t len)
{
    size_t i = 0;

    if (s->bad_at != SIZE_MAX)
        goto done; /* only the first one matters */
    while (i < len) {
        if (s->_pending_len == 0) {
            const char *bs = memchr(data + i, '\\', len - i);
            if (bs == NULL)
                break;
            i = (size_t)(bs - data);
            s->_pending[0] = '\\';
            s->_pending_len = 1;
            s->_pending_at = s->offset + i;
            i++;
            continue;
        }
        const char *why = NULL;
        switch (step(s, (unsigned char)data[i], &why)) {
        case STEP_MORE:
            i++;
            break;
        case STEP_DONE:
            s->_pending_len = 0;
            i++;
            break;
        case STEP_REDO:
            s->_pending_len = 0; /* data[i] is looked at again, it may start an escape */
            break;
        case STEP_BAD:
            s->bad_at = s->_pending_at;
            s->why = why;
            s->_pending_len = 0;
            goto done;
        }
    }
done:
    s->offset += len;
}

void ji_escape_scan_finish(ji_escape_scan_t *s)
{
    /* 6 to 11 pending bytes: a whole high surrogate whose partner never came. Fewer: a cut `\u` escape,
     * which is malformed JSON that yajl reports itself. */
    if (s->bad_at == SIZE_MAX && s->_pending_len >= 6) {
        s->bad_at = s->_pending_at;
        s->why = why_surrogate;
    }
    s->_pending_len = 0;
}
