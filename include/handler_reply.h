/*
 * handler_reply.h — answers from h2o handlers (the buffered POST /users path,
 * the JSON-array mode, the read side, health and metrics): status with its
 * reason phrase, Content-Type and Content-Length, Retry-After, Allow, and the
 * error object of json_text.h. Every error answer of a handler goes through
 * ji_reply_error: the ji_error_kind_t decides the status and the headers.
 *
 * Each function starts the response: it is the last thing the caller does with
 * the request (h2o may dispose of it before the function returns). Answers
 * carry Content-Length; an error answer to a request other than GET or HEAD
 * closes the connection, one to GET or HEAD keeps it open.
 */
#ifndef JI_HANDLER_REPLY_H
#define JI_HANDLER_REPLY_H

#include <h2o.h>
#include "common.h"
#include "json_text.h"

/** Adds `Retry-After: <seconds>` to the answer. */
void ji_reply_add_retry_after(h2o_req_t *req, unsigned seconds);

/** Sends a JSON body (copied) with `status`; Retry-After when `retry_after` is not 0. */
void ji_reply_json(h2o_req_t *req, int status, const char *body, size_t len, unsigned retry_after);

/**
 * Sends 200 with the text of `t` (copied) as a body of `content_type`, then frees `t`. A text left incomplete
 * by a failed allocation is answered as an internal error instead.
 */
void ji_reply_ok_text(h2o_req_t *req, const char *content_type, ji_text_t *t);

/**
 * Sends `{"error":...,"line":...,"field":...}` with the status of err->kind, and the headers that kind calls for
 * (Retry-After for the 503 kinds, WWW-Authenticate for 401).
 */
void ji_reply_error(h2o_req_t *req, const ji_error_t *err);

/** ji_reply_error of an error made here: `kind` and a printf-style message (no line, no field). */
void ji_reply_errorf(h2o_req_t *req, ji_error_kind_t kind, const char *fmt, ...) JI_PRINTF(3, 4);

/** 405 (JI_ERR_METHOD) for the request's method, with `Allow: <allow>` (e.g. "GET, HEAD"). */
void ji_reply_method_not_allowed(h2o_req_t *req, const char *allow);

#endif
