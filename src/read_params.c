/*
 * read_params.c — owns the parameters of the read side's requests: ids in
 * paths, query strings split into parameters, the keyset window (after_id,
 * limit) with its errors, and values echoed back to the client.
 */
#include "read_params.h"

#include <inttypes.h>
#include <string.h>

int ji_parse_int64(const char *s, size_t len, int64_t *out)
{
    uint64_t v = 0;

    if (len == 0 || len > 19)
        return -1;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (uint64_t)(s[i] - '0'); /* 19 digits fit in uint64_t */
    }
    if (v > (uint64_t)INT64_MAX)
        return -1;
    *out = (int64_t)v;
    return 0;
}

const char *ji_echo_value(char buf[JI_ECHO_MAX + 1], const char *s, size_t len)
{
    size_t n = len < JI_ECHO_MAX ? len : JI_ECHO_MAX;

    for (size_t i = 0; i < n; i++)
        buf[i] = s[i] >= 0x20 && s[i] <= 0x7e ? s[i] : '?';
    buf[n] = '\0';
    return buf;
}

bool ji_query_next(const char **cursor, const char *end, ji_query_param_t *p)
{
    const char *s = *cursor;

    while (s < end && *s == '&')
        s++;
    if (s >= end) {
        *cursor = end;
        return false;
    }
    {
        const char *amp = memchr(s, '&', (size_t)(end - s)), *stop = amp != NULL ? amp : end;
        const char *eq = memchr(s, '=', (size_t)(stop - s));

        p->key = s;
        p->key_len = (size_t)((eq != NULL ? eq : stop) - s);
        p->has_value = eq != NULL;
        p->value = eq != NULL ? eq + 1 : stop;
        p->value_len = (size_t)(stop - p->value);
        *cursor = stop;
    }
    return true;
}

bool ji_query_param_is(const ji_query_param_t *p, const char *key)
{
    return p->has_value && p->key_len == strlen(key) && memcmp(p->key, key, p->key_len) == 0;
}

int ji_keyset_param(const ji_query_param_t *p, ji_keyset_t *k, ji_error_t *err)
{
    bool after = ji_query_param_is(p, "after_id"), limit = ji_query_param_is(p, "limit");
    char echo[JI_ECHO_MAX + 1];
    int64_t n;

    if (!after && !limit)
        return 0;
    if (ji_parse_int64(p->value, p->value_len, &n) != 0)
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "%s must be an integer from 0 to %" PRId64 ", not \"%s\"",
                            after ? "after_id" : "limit", INT64_MAX, ji_echo_value(echo, p->value, p->value_len));
    if (after)
        k->after_id = n;
    else
        k->limit = (uint64_t)n;
    return 1;
}
