/* json_text.c — the growable text buffer, JSON string escaping, and the error body every answer shares. */
#include "json_text.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool reserve(ji_text_t *t, size_t more)
{
    if (t->failed)
        return false;
    if (t->len + more + 1 > t->cap) {
        size_t cap = t->cap ? t->cap : 256;
        while (cap < t->len + more + 1)
            cap *= 2;
        char *p = realloc(t->base, cap);
        if (p == NULL) {
            t->failed = true;
            return false;
        }
        t->base = p;
        t->cap = cap;
    }
    return true;
}

void ji_text_append(ji_text_t *t, const char *s, size_t len)
{
    if (!reserve(t, len))
        return;
    if (len != 0) /* `s` may be NULL then */
        memcpy(t->base + t->len, s, len);
    t->len += len;
    t->base[t->len] = '\0';
}

void ji_text_printf(ji_text_t *t, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !reserve(t, (size_t)n))
        return;
    va_start(ap, fmt);
    vsnprintf(t->base + t->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    t->len += (size_t)n;
}

void ji_text_json_string(ji_text_t *t, const char *s, size_t len)
{
    ji_text_append(t, "\"", 1);
    ji_text_json_escape(t, s, len);
    ji_text_append(t, "\"", 1);
}

void ji_text_json_escape(ji_text_t *t, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    size_t start = 0, i;

    for (i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[7];
        size_t esc_len = 2;
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        ji_text_append(t, s + start, i - start);
        esc[0] = '\\';
        switch (c) {
        case '"':
            esc[1] = '"';
            break;
        case '\\':
            esc[1] = '\\';
            break;
        case '\n':
            esc[1] = 'n';
            break;
        case '\r':
            esc[1] = 'r';
            break;
        case '\t':
            esc[1] = 't';
            break;
        default:
            memcpy(esc + 1, "u00", 3);
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            esc_len = 6;
            break;
        }
        ji_text_append(t, esc, esc_len);
        start = i + 1;
    }
    ji_text_append(t, s + start, len - start);
}

void ji_text_free(ji_text_t *t)
{
    free(t->base);
    memset(t, 0, sizeof(*t));
}

void ji_response_error_json(ji_text_t *t, const ji_error_t *err)
{
    ji_text_append(t, "{\"error\":", 9);
    ji_text_json_string(t, err->message, strlen(err->message));
    if (err->line != 0)
        ji_text_printf(t, ",\"line\":%llu", (unsigned long long)err->line);
    if (err->field[0] != '\0') {
        ji_text_append(t, ",\"field\":", 9);
        ji_text_json_string(t, err->field, strlen(err->field));
    }
    ji_text_append(t, "}\n", 2);
}

const char *ji_http_reason(int status)
{
    switch (status) {
    case 104:
        return "Upload Resumption Supported";
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 204:
        return "No Content";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 408:
        return "Request Timeout";
    case 409:
        return "Conflict";
    case 410:
        return "Gone";
    case 411:
        return "Length Required";
    case 412:
        return "Precondition Failed";
    case 413:
        return "Payload Too Large";
    case 415:
        return "Unsupported Media Type";
    case 417:
        return "Expectation Failed";
    case 422:
        return "Unprocessable Entity";
    case 431:
        return "Request Header Fields Too Large";
    case 501:
        return "Not Implemented";
    case 503:
        return "Service Unavailable";
    case 507:
        return "Insufficient Storage";
    default:
        return "Internal Server Error";
    }
}
