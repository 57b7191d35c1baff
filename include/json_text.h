/*
 * json_text.h — the text the service answers with: a small append-only buffer
 * with JSON string escaping, the error object every answer shares, and the
 * reason phrases. Used by the streaming path and by h2o handlers alike.
 */
#ifndef JI_JSON_TEXT_H
#define JI_JSON_TEXT_H

#include "common.h"

/** Growable text; owner frees `base` with free(). */
typedef struct st_ji_text_t {
    char *base;
    size_t len;
    size_t cap;
    bool failed; /**< an allocation failed: the text is incomplete */
} ji_text_t;

void ji_text_append(ji_text_t *t, const char *s, size_t len);
void ji_text_printf(ji_text_t *t, const char *fmt, ...) JI_PRINTF(2, 3);
/** Appends `s` as a JSON string literal, quotes included. */
void ji_text_json_string(ji_text_t *t, const char *s, size_t len);
/**
 * Appends `s` escaped as the inside of a JSON string, without quotes: double quote, backslash and control
 * characters escaped, every other byte as it is. Bytes are escaped one by one, so a string may be given in pieces
 * cut anywhere.
 */
void ji_text_json_escape(ji_text_t *t, const char *s, size_t len);
void ji_text_free(ji_text_t *t);

/** The reason phrase of an HTTP status ("Unprocessable Entity"). */
const char *ji_http_reason(int status);

/** `{"error":...,"line":N,"field":...}` plus a newline (line and field only when set). */
void ji_response_error_json(ji_text_t *t, const ji_error_t *err);

#endif
