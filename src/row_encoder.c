/*
 * row_encoder.c — turns one validated user row into one line of PostgreSQL's
 * COPY text format (columns of JI_COPY_USERS_SQL, tab separated, \N for NULL,
 * backslash escapes for the bytes COPY would otherwise read as structure).
 * It writes into the caller's buffer and never past `cap`.
 */
#include "row_encoder.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

/** A cursor over the caller's buffer; `ok` turns false at the first byte that does not fit. */
typedef struct {
    char *dst;
    size_t cap;
    size_t len;
    bool ok;
} out_t;

static void put_bytes(out_t *o, const char *s, size_t n)
{
    if (!o->ok || n > o->cap - o->len) {
        o->ok = false;
        return;
    }
    memcpy(o->dst + o->len, s, n);
    o->len += n;
}

static void put_char(out_t *o, char c)
{
    put_bytes(o, &c, 1);
}

/* COPY text reads a backslash as an escape and \t, \n, \r as structure; everything else passes as is. */
static void put_text(out_t *o, const char *s, size_t n)
{
    size_t run = 0; /* start of the bytes that need no escaping */

    for (size_t i = 0; i < n && o->ok; i++) {
        const char *esc;
        switch (s[i]) {
        case '\\':
            esc = "\\\\";
            break;
        case '\t':
            esc = "\\t";
            break;
        case '\n':
            esc = "\\n";
            break;
        case '\r':
            esc = "\\r";
            break;
        default:
            continue;
        }
        put_bytes(o, s + run, i - run);
        put_bytes(o, esc, 2);
        run = i + 1;
    }
    put_bytes(o, s + run, n - run);
}

static void put_null(out_t *o)
{
    put_bytes(o, "\\N", 2);
}

static void put_decimal_signed(out_t *o, int64_t v)
{
    char buf[24];
    int n = snprintf(buf, sizeof(buf), "%" PRId64, v);
    put_bytes(o, buf, (size_t)n);
}

static void put_decimal_unsigned(out_t *o, uint64_t v)
{
    char buf[24];
    int n = snprintf(buf, sizeof(buf), "%" PRIu64, v);
    put_bytes(o, buf, (size_t)n);
}

size_t ji_row_encode(char *dst, size_t cap, const ji_row_t *row)
{
    out_t o = {dst, cap, 0, true};

    put_decimal_signed(&o, row->batch_id);
    put_char(&o, '\t');
    put_text(&o, row->name, row->name_len);
    put_char(&o, '\t');
    put_text(&o, row->email, row->email_len);
    put_char(&o, '\t');
    if (row->image_path == NULL) {
        put_null(&o);
        put_char(&o, '\t');
        put_null(&o);
        put_char(&o, '\t');
        put_null(&o);
    } else {
        put_text(&o, row->image_path, strlen(row->image_path));
        put_char(&o, '\t');
        if (row->image_type != NULL)
            put_text(&o, row->image_type, strlen(row->image_type));
        else
            put_null(&o);
        put_char(&o, '\t');
        put_decimal_unsigned(&o, row->image_size);
    }
    put_char(&o, '\n');

    return o.ok ? o.len : 0;
}
