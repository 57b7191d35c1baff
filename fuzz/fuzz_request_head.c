/*
 * fuzz_request_head.c — libFuzzer target over the request rules: the head
 * parser (framing, duplicate headers, limits), the route table, the policy
 * check (Origin, Host, bearer token), the upload options (query, Content-Type,
 * Content-Encoding, Idempotency-Key, Content-Digest), the headers of resumable
 * uploads (Upload-Offset, -Length, -Complete, -Metadata; creation and append
 * verdicts) and the first-byte rule. Any input must end in a verdict, never a crash, a parsed head must point
 * inside the input, and only a Content-Digest header asks for a digest check.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "request_rules.h"
#include "routes.h"
#include "upload_headers.h"

static void check_inside(const char *base, size_t len, const char *p, size_t n)
{
    if (p != NULL && (p < base || p + n > base + len))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const ji_request_policy_t policies[] = {
        {.token = "0123456789abcdef", .token_len = 16, .allowed_origins = NULL, .allowed_hosts = "localhost,[::1]"},
        {.token = NULL, .allowed_origins = "http://a.example, *", .allowed_hosts = "*"},
    };
    char *buf = malloc(size + 1);
    ji_request_head_t head;
    ji_upload_options_t options;
    ji_route_t route;
    ji_error_t err;
    int r;

    if (buf == NULL)
        return 0;
    memcpy(buf, data, size);
    buf[size] = '\0';
    r = ji_request_head_parse(&head, buf, size, &err);
    if (r == 0) {
        if (head.head_len == 0 || head.head_len > size)
            abort();
        check_inside(buf, size, head.method, head.method_len);
        check_inside(buf, size, head.path, head.path_len);
        check_inside(buf, size, head.query, head.query_len);
        for (size_t i = 0; i < head.num_headers; i++) {
            check_inside(buf, size, head.headers[i].name, head.headers[i].name_len);
            check_inside(buf, size, head.headers[i].value, head.headers[i].value_len);
        }
        if (ji_route_match(head.method, head.method_len, head.path, head.path_len, &route, &err) != 0 &&
            err.kind != JI_ERR_NOT_FOUND && err.kind != JI_ERR_METHOD)
            abort();
        for (size_t i = 0; i < sizeof(policies) / sizeof(policies[0]); i++)
            (void)!ji_request_check_policy(&head, &policies[i], true, true, &err);
        if (ji_upload_options_parse(&options, &head, &err) == 0 &&
            (strlen(options.idempotency_key) > JI_MAX_IDEMPOTENCY_KEY_BYTES ||
             (head.content_digest == NULL && ji_content_digest_wanted(&options.digest))))
            abort();
        {
            ji_upload_headers_t up;
            ji_upload_creation_t creation;
            if (ji_upload_headers_parse(&up, &head, &err) == 0) {
                check_inside(buf, size, up.metadata, up.metadata_len);
                for (int draft = 0; draft < 2; draft++)
                    if (ji_upload_creation_check(&creation, &head, &up, draft != 0, 1000, &err) == 0 &&
                        creation.has_length && creation.length > 1000)
                        abort(); /* a length over the limit is 413, never accepted */
                (void)!ji_upload_append_check(&head, &up, 1000, &err);
                if (up.metadata != NULL && ji_upload_options_parse(&options, &head, &err) == 0 &&
                    ji_upload_metadata_apply(&options, up.metadata, up.metadata_len, &err) == 0 &&
                    strlen(options.idempotency_key) > JI_MAX_IDEMPOTENCY_KEY_BYTES)
                    abort();
            }
        }
        (void)ji_body_is_array(buf + head.head_len, size - head.head_len);
    } else if (r < 0 && ji_error_http_status(err.kind) < 400) {
        abort();
    }
    free(buf);
    return 0;
}
