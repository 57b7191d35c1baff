/*
 * handler_reply.h — JSON answers from h2o handlers (the buffered POST /users path,
 * the JSON-array mode, the read side): status with its reason phrase,
 * Content-Type, Retry-After, and the error object of json_text.h.
 */
#ifndef JI_HANDLER_REPLY_H
#define JI_HANDLER_REPLY_H

#include <h2o.h>
#include "common.h"

/** Adds `Retry-After: <seconds>` to the answer. */
void ji_reply_add_retry_after(h2o_req_t *req, unsigned seconds);

/** Sends a JSON body (copied) with `status`; Retry-After when `retry_after` is not 0. */
void ji_reply_json(h2o_req_t *req, int status, const char *body, size_t len, unsigned retry_after);

/**
 * Sends `{"error":...,"line":...,"field":...}` with the status of err->kind, and the headers that kind calls for
 * (Retry-After for the 503 kinds, WWW-Authenticate for 401).
 */
void ji_reply_error(h2o_req_t *req, const ji_error_t *err);

/** ji_reply_error of an error made here: `kind` and a printf-style message (no line, no field). */
void ji_reply_errorf(h2o_req_t *req, ji_error_kind_t kind, const char *fmt, ...) JI_PRINTF(3, 4);

#endif
