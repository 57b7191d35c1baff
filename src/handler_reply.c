/* handler_reply.c — answers sent through h2o's handler stack: bodies and errors with their headers. */
#include "handler_reply.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/** Most characters of a request's method quoted back in a 405 message. */
#define METHOD_ECHO_MAX 32

void ji_reply_add_retry_after(h2o_req_t *req, unsigned seconds)
{
    char *v = h2o_mem_alloc_pool(&req->pool, 16);
    int n = snprintf(v, 16, "%u", seconds);

    h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_RETRY_AFTER, NULL, v, (size_t)n);
}

/**
 * Status, Content-Type and Content-Length (also for HEAD, which gets no body), then the body (copied). An error
 * answer to anything but GET or HEAD closes the connection: the client may still be sending the body it was
 * refused. GET and HEAD keep it open. (Said here because h2o 2.2.5 would decide otherwise on its own: without a
 * Content-Length it drops keep-alive after any status but 200.)
 */
static void send_body(h2o_req_t *req, int status, const char *content_type, const char *body, size_t len)
{
    bool get_or_head = h2o_memis(req->method.base, req->method.len, H2O_STRLIT("GET")) ||
                       h2o_memis(req->method.base, req->method.len, H2O_STRLIT("HEAD"));

    req->res.status = status;
    req->res.reason = ji_http_reason(status);
    req->res.content_length = len;
    if (status >= 400 && !get_or_head)
        req->http1_is_persistent = 0;
    h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL, content_type, strlen(content_type));
    h2o_send_inline(req, body, len); /* copies; sends no body for HEAD */
}

void ji_reply_json(h2o_req_t *req, int status, const char *body, size_t len, unsigned retry_after)
{
    if (retry_after != 0)
        ji_reply_add_retry_after(req, retry_after);
    send_body(req, status, "application/json", body, len);
}

void ji_reply_ok_text(h2o_req_t *req, const char *content_type, ji_text_t *t)
{
    if (t->failed || t->base == NULL) {
        ji_text_free(t);
        ji_reply_errorf(req, JI_ERR_INTERNAL, "out of memory");
        return;
    }
    send_body(req, 200, content_type, t->base, t->len); /* copied before anything is sent */
    ji_text_free(t);                                    /* ours, not the request's: still valid here */
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

void ji_reply_method_not_allowed(h2o_req_t *req, const char *allow)
{
    int n = req->method.len < METHOD_ECHO_MAX ? (int)req->method.len : METHOD_ECHO_MAX;

    h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_ALLOW, NULL, allow, strlen(allow));
    ji_reply_errorf(req, JI_ERR_METHOD, "method %.*s is not allowed here (allowed: %s)", n, req->method.base, allow);
}
