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

int ji_error_http_status(ji_error_kind_t kind)
{
    switch (kind) {
    case JI_ERR_NONE:
        return 200;
    case JI_ERR_MALFORMED:
        return 400;
    case JI_ERR_INVALID:
        return 422;
    case JI_ERR_TOO_LARGE:
        return 413;
    case JI_ERR_UNSUPPORTED:
        return 415;
    case JI_ERR_DB:
        return 503;
    case JI_ERR_DISK_FULL:
        return 507;
    case JI_ERR_INTERNAL:
        break;
    }
    return 500;
}
