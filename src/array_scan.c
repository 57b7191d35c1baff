/*
 * array_scan.c — owns the pre-scan of JSON-array bodies (array_scan.h): a
 * byte-at-a-time tokenizer that knows strings, escapes and brackets, counts
 * values and nesting, and estimates the cost of yajl's tree from them.
 *
 * Outside strings every byte is one of: '"' (a string starts: one value),
 * '{' or '[' (a container: one value, one level deeper), '}' or ']', ',' or
 * ':' or whitespace (separators), '/' (a comment: stop), or part of a bare
 * token (true, false, null, a number, or garbage yajl will refuse): a run of
 * such bytes is one value. In valid JSON two values are always separated, so
 * the counts are exact; in invalid JSON they may be off, but yajl stops at
 * the first error and never builds more than what precedes it, which the scan
 * has counted.
 */
#include "array_scan.h"

#include <string.h>

/** yajl's fixed costs on top of the values: its handle, lexer, parse stack and the first decode buffer (2 KiB). */
#define TREE_FIXED_BYTES 4096u

void ji_array_scan_init(ji_array_scan_t *s, size_t max_depth, uint64_t max_values)
{
    memset(s, 0, sizeof(*s));
    s->max_depth = max_depth;
    s->max_values = max_values;
}

static int stop(ji_array_scan_t *s, ji_array_scan_stop_t why, uint64_t offset)
{
    s->stop = why;
    s->stop_offset = offset;
    s->stop_element = s->depth >= 1 ? s->elements : 0;
    return -1;
}

/* A value starts at `offset`. 0, or -1 when it is one too many. */
static int value_starts(ji_array_scan_t *s, uint64_t offset)
{
    if (s->depth == 1)
        s->elements++;
    if (++s->values > s->max_values)
        return stop(s, JI_ARRAY_SCAN_TOO_MANY, offset);
    return 0;
}

int ji_array_scan_feed(ji_array_scan_t *s, const char *data, size_t len)
{
    const unsigned char *p = (const unsigned char *)data;
    size_t i = 0;

    if (s->stop != JI_ARRAY_SCAN_OK)
        return -1;
    while (i < len) {
        uint64_t at = s->scanned + i;
        unsigned char c = p[i++];

        if (s->in_string) {
            if (s->escaped) {
                s->escaped = false;
            } else if (c == '\\') {
                s->escaped = true;
                s->string_has_escape = true;
            } else if (c == '"') {
                s->in_string = false;
                if (s->string_has_escape && at + 1 - s->string_start > s->longest_escaped)
                    s->longest_escaped = (size_t)(at + 1 - s->string_start);
            } else {
                /* the common case: plain string bytes up to the next quote or backslash */
                while (i < len && p[i] != '"' && p[i] != '\\')
                    i++;
            }
            continue;
        }
        switch (c) {
        case '"':
            s->in_bare = false;
            s->in_string = true;
            s->string_has_escape = false;
            s->string_start = at;
            if (value_starts(s, at) != 0)
                goto Stopped;
            break;
        case '{':
        case '[':
            s->in_bare = false;
            if (value_starts(s, at) != 0)
                goto Stopped;
            if (s->depth >= s->max_depth) {
                s->deepest = s->depth + 1;
                stop(s, JI_ARRAY_SCAN_TOO_DEEP, at);
                goto Stopped;
            }
            if (++s->depth > s->deepest)
                s->deepest = s->depth;
            break;
        case '}':
        case ']':
            s->in_bare = false;
            if (s->depth > 0)
                s->depth--;
            break;
        case ',':
        case ':':
        case ' ':
        case '\t':
        case '\n':
        case '\r':
        case '\v':
        case '\f':
            s->in_bare = false;
            break;
        case '/':
            stop(s, JI_ARRAY_SCAN_COMMENT, at);
            goto Stopped;
        default:
            if (!s->in_bare) {
                s->in_bare = true;
                if (value_starts(s, at) != 0)
                    goto Stopped;
            }
            break;
        }
    }
    s->scanned += len;
    return 0;
Stopped:
    s->scanned += i;
    return -1;
}

uint64_t ji_array_scan_tree_bytes(const ji_array_scan_t *s)
{
    return s->values * (uint64_t)JI_ARRAY_TREE_BYTES_PER_VALUE + s->scanned + 2 * (uint64_t)s->longest_escaped +
           TREE_FIXED_BYTES;
}

/* ------------------------------------------------------------------ elements */

/** Whitespace between tokens as yajl reads it: JSON's four, plus '\v' and '\f', which yajl 2.1 also skips. */
static bool is_json_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

bool ji_array_elements_next(ji_array_elements_t *c, const char *text, size_t text_len, const char **start, size_t *len)
{
    size_t p = c->pos, depth = 0, end;
    bool in_string = false;

    while (p < text_len && is_json_space(text[p]))
        p++;
    if (!c->started) {
        if (p >= text_len || text[p] != '[')
            return false;
        c->started = true;
        p++;
    } else if (p < text_len && text[p] == ',') {
        p++;
    }
    while (p < text_len && is_json_space(text[p]))
        p++;
    if (p >= text_len || text[p] == ']') {
        c->pos = p;
        return false;
    }
    *start = text + p;
    for (; p < text_len; p++) {
        char ch = text[p];
        if (in_string) {
            if (ch == '\\')
                p++;
            else if (ch == '"')
                in_string = false;
            continue;
        }
        if (ch == '"') {
            in_string = true;
        } else if (ch == '[' || ch == '{') {
            depth++;
        } else if (ch == ']' || ch == '}') {
            if (depth == 0)
                break; /* the array's own end */
            depth--;
        } else if (ch == ',' && depth == 0) {
            break;
        }
    }
    end = p < text_len ? p : text_len;
    c->pos = end;
    while (end > (size_t)(*start - text) && is_json_space(text[end - 1]))
        end--;
    *len = end - (size_t)(*start - text);
    return true;
}
