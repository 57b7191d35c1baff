/* handler_reply.c — answers sent through h2o's handler stack: JSON bodies and errors with their headers. */
#include "handler_reply.h"

#include <stdarg.h>
#include <stdio.h>

#include "json_text.h"

void ji_reply_add_retry_after(h2o_req_t *req, unsigned seconds)
{
    char *v = h2o_mem_alloc_pool(&req->pool, 16);
    int n = snprintf(v, 16, "%u", seconds);

    h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_RETRY_AFTER, NULL, v, (size_t)n);
}

void ji_reply_json(h2o_req_t *req, int status, const char *body, size_t len, unsigned retry_after)
{
    req->res.status = status;
    req->res.reason = ji_http_reason(status);
    h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL, H2O_STRLIT("application/json"));
    if (retry_after != 0)
        ji_reply_add_retry_after(req, retry_after);
    h2o_send_inline(req, body, len); /* copies */
}

void ji_reply_error(h2o_req_t *req, const ji_error_t *err)
{
    ji_text_t t = {0};

    ji_response_error_json(&t, err);
    if (t.failed) {
        ji_reply_json(req, 500, H2O_STRLIT("{\"error\":\"out of memory\"}\n"), 0);
    } else {
        if (err->kind == JI_ERR_UNAUTHORIZED)
            h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_WWW_AUTHENTICATE, NULL, H2O_STRLIT("Bearer"));
        ji_reply_json(req, ji_error_http_status(err->kind), t.base, t.len, ji_error_retry_after(err->kind));
    }
    ji_text_free(&t);
}

void ji_reply_errorf(h2o_req_t *req, ji_error_kind_t kind, const char *fmt, ...)
{
    ji_error_t err = {.kind = kind};
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(err.message, sizeof(err.message), fmt, ap);
    va_end(ap);
    ji_reply_error(req, &err);
}
