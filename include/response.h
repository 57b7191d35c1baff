/*
 * response.h — the JSON bodies the service answers with: the success summary
 * of an ingest and the error object. A small append-only text buffer with
 * JSON string escaping, used by both the streaming path and h2o handlers.
 */
#ifndef JI_RESPONSE_H
#define JI_RESPONSE_H

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
void ji_text_free(ji_text_t *t);

/** The reason phrase of an HTTP status ("Unprocessable Entity"). */
const char *ji_http_reason(int status);

/** `{"error":...,"line":N,"field":...}` plus a newline (line and field only when set). */
void ji_response_error_json(ji_text_t *t, const ji_error_t *err);

#endif
