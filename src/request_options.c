/* request_options.c — the query and Content-Type rules of POST /users (SPEC.md, "Format selection"). */
#include "request_options.h"

#include <string.h>
#include <strings.h>

static bool span_is(const char *s, size_t len, const char *lit)
{
    return len == strlen(lit) && memcmp(s, lit, len) == 0;
}

int ji_request_options_parse_query(ji_request_options_t *o, const char *query, size_t len, ji_error_t *err)
{
    const char *p = query, *end = query + len;

    memset(o, 0, sizeof(*o));
    while (p < end) {
        const char *amp = memchr(p, '&', end - p), *stop = amp != NULL ? amp : end;
        const char *eq = memchr(p, '=', stop - p), *v = eq != NULL ? eq + 1 : stop;
        size_t klen = (eq != NULL ? eq : stop) - p, vlen = stop - v;

        if (span_is(p, klen, "format")) {
            if (span_is(v, vlen, "array"))
                o->format = JI_FORMAT_ARRAY;
            else if (span_is(v, vlen, "jsonl") || span_is(v, vlen, "ndjson"))
                o->format = JI_FORMAT_JSONL;
            else
                return ji_error_set(err, JI_ERR_UNSUPPORTED, 0, NULL, "unknown format: use format=jsonl or format=array");
        } else if (span_is(p, klen, "on_error")) {
            if (span_is(v, vlen, "skip"))
                o->skip_errors = true;
            else if (!span_is(v, vlen, "fail"))
                return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "unknown on_error: use on_error=skip or on_error=fail");
        }
        p = stop + 1;
    }
    return 0;
}

bool ji_request_content_type_is_jsonl(const char *value, size_t len)
{
    static const char *const types[] = {"application/x-ndjson", "application/jsonl", "application/jsonlines",
                                        "application/x-jsonlines"};
    const char *semi = memchr(value, ';', len);

    if (semi != NULL)
        len = semi - value;
    while (len > 0 && (value[len - 1] == ' ' || value[len - 1] == '\t'))
        len--;
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
        if (len == strlen(types[i]) && strncasecmp(value, types[i], len) == 0)
            return true;
    return false;
}

int ji_request_body_is_array(const char *body, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (body[i] != ' ' && body[i] != '\t' && body[i] != '\r' && body[i] != '\n')
            return body[i] == '[';
    return -1;
}
