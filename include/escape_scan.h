/*
 * escape_scan.h — finds `\u` escapes that yajl silently mangles, in the raw
 * JSON text of one line, before yajl sees it: `\u0000` (a NUL inside a
 * string) and unpaired UTF-16 surrogates (`\ud800` alone, `\udc00` alone, or
 * a high surrogate followed by anything but a low one). The text may arrive
 * in fragments that cut an escape anywhere.
 */
#ifndef JI_ESCAPE_SCAN_H
#define JI_ESCAPE_SCAN_H

#include "common.h"

typedef struct st_ji_escape_scan_t {
    size_t offset;   /**< bytes of the line scanned so far */
    size_t bad_at;   /**< offset of the backslash of the first bad escape, or SIZE_MAX */
    const char *why; /**< what was wrong with it ("\\u0000 escape", "unpaired surrogate escape") */
    /* partial escape carried between fragments */
    char _pending[12];
    size_t _pending_len;
    size_t _pending_at;
} ji_escape_scan_t;

/** Starts a new line. */
void ji_escape_scan_reset(ji_escape_scan_t *s);
/** Scans the next fragment of the line. Fast on text without backslashes. */
void ji_escape_scan_feed(ji_escape_scan_t *s, const char *data, size_t len);
/** End of the line: an escape cut by the end is judged as it stands. */
void ji_escape_scan_finish(ji_escape_scan_t *s);

#endif
