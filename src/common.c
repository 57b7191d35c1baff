/* common.c — the error record shared by every stage. */
#include "common.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int ji_error_set(ji_error_t *err, ji_error_kind_t kind, uint64_t line, const char *field, const char *fmt, ...)
{
    va_list ap;

    err->kind = kind;
    err->line = line;
    snprintf(err->field, sizeof(err->field), "%s", field != NULL ? field : "");
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
    return -1;
}

void ji_error_clear(ji_error_t *err)
{
    memset(err, 0, sizeof(*err));
}

static const struct {
    int status;
    const char *name;
} kinds[JI_ERR_KIND_COUNT] = {
    [JI_ERR_NONE] = {200, "none"},
    [JI_ERR_MALFORMED] = {400, "malformed"},
    [JI_ERR_UNAUTHORIZED] = {401, "unauthorized"},
    [JI_ERR_FORBIDDEN] = {403, "forbidden"},
    [JI_ERR_NOT_FOUND] = {404, "not_found"},
    [JI_ERR_METHOD] = {405, "method"},
    [JI_ERR_TOO_SLOW] = {408, "too_slow"},
    [JI_ERR_CONFLICT] = {409, "conflict"},
    [JI_ERR_GONE] = {410, "gone"},
    [JI_ERR_PRECONDITION] = {412, "precondition"},
    [JI_ERR_TOO_LARGE] = {413, "too_large"},
    [JI_ERR_UNSUPPORTED] = {415, "unsupported"},
    [JI_ERR_EXPECTATION] = {417, "expectation"},
    [JI_ERR_INVALID] = {422, "invalid"},
    [JI_ERR_HEAD_TOO_LARGE] = {431, "head_too_large"},
    [JI_ERR_INTERNAL] = {500, "internal"},
    [JI_ERR_NOT_IMPLEMENTED] = {501, "not_implemented"},
    [JI_ERR_DB] = {503, "db"},
    [JI_ERR_BUSY] = {503, "busy"},
    [JI_ERR_STOPPING] = {503, "stopping"},
    [JI_ERR_DISK_FULL] = {507, "disk_full"},
};

int ji_error_http_status(ji_error_kind_t kind)
{
    return (unsigned)kind < JI_ERR_KIND_COUNT ? kinds[kind].status : 500;
}

const char *ji_error_kind_name(ji_error_kind_t kind)
{
    return (unsigned)kind < JI_ERR_KIND_COUNT ? kinds[kind].name : "internal";
}

unsigned ji_error_retry_after(ji_error_kind_t kind)
{
    switch (kind) {
    case JI_ERR_DB:
        return JI_RETRY_AFTER_DB_S;
    case JI_ERR_BUSY:
    case JI_ERR_STOPPING:
        return JI_RETRY_AFTER_BUSY_S;
    default:
        return 0;
    }
}
