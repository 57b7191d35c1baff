/*
 * request_options.h — what a POST /users request asks for, read the same way
 * on the streaming path and in h2o handlers: the query (`format`,
 * `on_error`), the Content-Type rule for JSON Lines, and the first-byte rule.
 */
#ifndef JI_REQUEST_OPTIONS_H
#define JI_REQUEST_OPTIONS_H

#include "common.h"

typedef enum { JI_FORMAT_UNDECIDED, JI_FORMAT_JSONL, JI_FORMAT_ARRAY } ji_format_t;

typedef struct st_ji_request_options_t {
    ji_format_t format; /**< from ?format= (UNDECIDED when absent) */
    bool skip_errors;   /**< ?on_error=skip */
} ji_request_options_t;

/** Reads the query string (without '?'). 0, or -1 with `err` filled (415 unknown format, 400 unknown on_error). */
int ji_request_options_parse_query(ji_request_options_t *o, const char *query, size_t len, ji_error_t *err)
    JI_MUST_CHECK;

/** True for the Content-Types that mean JSON Lines (parameters such as "; charset=utf-8" ignored). */
bool ji_request_content_type_is_jsonl(const char *value, size_t len);

/** The first-byte rule: 1 when the first non-space byte of `body` is '[', 0 when another byte, -1 when none yet. */
int ji_request_body_is_array(const char *body, size_t len);

#endif
