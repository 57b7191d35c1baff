/*
 * base64.h — strict, streaming base64 decoding. libb64 decodes but accepts
 * anything (it skips every character outside the alphabet, '=' anywhere, and
 * drops a lone trailing character), so this module checks every character
 * itself: the standard alphabet, spaces/tabs/CR/LF ignored, '=' padding only
 * at the end and consistent with the length, padding optional. Valid input
 * is then decoded with libb64 (which writes one byte past what it returns:
 * the slack is handled here). Input may arrive in pieces cut anywhere.
 */
#ifndef JI_BASE64_H
#define JI_BASE64_H

#include "common.h"
#include <b64/cdecode.h>

typedef struct st_ji_base64_t {
    base64_decodestate _state;
    uint64_t _chars;   /**< alphabet characters seen */
    unsigned _padding; /**< '=' seen so far (then only '=' or whitespace may follow) */
    const char *error; /**< why the input is invalid, or NULL */
} ji_base64_t;

void ji_base64_init(ji_base64_t *d);

/** Most bytes ji_base64_decode may write for `len` input bytes (slack included). */
#define JI_BASE64_DECODED_MAX(len) (((len) / 4 + 1) * 3 + 4)

/**
 * Checks and decodes the next piece. `out` must hold JI_BASE64_DECODED_MAX(len) bytes. Returns the number of
 * bytes decoded, or -1 when the input is invalid (d->error says why).
 */
long ji_base64_decode(ji_base64_t *d, const char *in, size_t len, unsigned char *out) JI_MUST_CHECK;

/** End of input: checks the length and padding. 0, or -1 with d->error set. */
int ji_base64_finish(ji_base64_t *d) JI_MUST_CHECK;

/** Alphabet characters seen so far (0 after only whitespace). */
static inline uint64_t ji_base64_chars(const ji_base64_t *d)
{
    return d->_chars;
}

#endif
