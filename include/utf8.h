/*
 * utf8.h — strict UTF-8 checking (yajl's own check lets overlong forms and
 * encoded surrogates through; PostgreSQL rejects them) and counting of
 * Unicode characters as PostgreSQL counts varchar(n).
 */
#ifndef JI_UTF8_H
#define JI_UTF8_H

#include "common.h"

/** True when `s` is well-formed UTF-8: no overlong forms, no surrogates (U+D800..DFFF), nothing above U+10FFFF, no truncation. */
bool ji_utf8_valid(const char *s, size_t len);

/** Offset of the first byte that starts an ill-formed sequence, or SIZE_MAX when `s` is valid. */
size_t ji_utf8_invalid_at(const char *s, size_t len);

/** Number of code points in `s`, which must be valid UTF-8. */
size_t ji_utf8_chars(const char *s, size_t len);

#endif
