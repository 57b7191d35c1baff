/*
 * splitter.c — owns cutting the decoded body into lines: it finds each '\n'
 * with memchr, hands the bytes before it on as fragments that point into the
 * caller's buffer (no copy, no buffer of its own), counts lines, enforces the
 * per-line byte limit before any byte over it is passed on, stops where a
 * handler asks to pause, and keeps the stream offset just past the last '\n'
 * it consumed (one store per line: no second scan of the bytes).
 */
#include "splitter.h"

#include <string.h>

void ji_splitter_init(ji_splitter_t *s, size_t max_line_bytes, const ji_splitter_handler_t *handler, void *ctx)
{
    s->handler = handler;
    s->ctx = ctx;
    s->line = 1;
    s->line_bytes = 0;
    s->max_line_bytes = max_line_bytes;
    s->skipping = false;
    s->consumed = 0;
    s->line_end = 0;
}

void ji_splitter_skip_line(ji_splitter_t *s)
{
    s->skipping = true;
}

/* Ends a skipped line: no handler call. */
static void end_skipped_line(ji_splitter_t *s)
{
    s->skipping = false;
    s->line++;
    s->line_bytes = 0;
}

/* Ends the current line. On success the next line starts; on error `line` keeps naming the failed one. */
static ji_split_result_t end_line(ji_splitter_t *s)
{
    int r = s->handler->on_line_end(s->ctx, s->line);

    if (r != 0 && r != 1)
        return JI_SPLIT_ERROR;
    s->line++;
    s->line_bytes = 0;
    return r == 1 ? JI_SPLIT_PAUSED : JI_SPLIT_OK;
}

ji_split_result_t ji_splitter_feed(ji_splitter_t *s, const char *data, size_t len, size_t *consumed)
{
    size_t pos = 0;
    ji_split_result_t res = JI_SPLIT_OK;

    while (pos < len) {
        const char *nl = memchr(data + pos, '\n', len - pos);
        size_t end = nl != NULL ? (size_t)(nl - data) : len;
        size_t n = end - pos;

        if (s->skipping) {
            if (nl == NULL) {
                pos = len;
                break;
            }
            end_skipped_line(s);
            pos = end + 1;
            s->line_end = s->consumed + pos;
            continue;
        }
        if (n != 0) {
            if (n > s->max_line_bytes - s->line_bytes) {
                res = JI_SPLIT_TOO_LONG;
                break;
            }
            if (s->handler->on_data(s->ctx, s->line, data + pos, n) != 0) {
                res = JI_SPLIT_ERROR;
                break;
            }
            s->line_bytes += n;
        }
        if (nl == NULL) {
            pos = len;
            break;
        }
        res = end_line(s);
        if (res == JI_SPLIT_ERROR)
            break;
        pos = end + 1;
        s->line_end = s->consumed + pos;
        if (res == JI_SPLIT_PAUSED)
            break;
    }
    s->consumed += pos;
    *consumed = pos;
    return res;
}

ji_split_result_t ji_splitter_finish(ji_splitter_t *s)
{
    if (s->skipping) {
        end_skipped_line(s);
        return JI_SPLIT_OK;
    }
    if (s->line_bytes == 0)
        return JI_SPLIT_OK; /* nothing after the last '\n': no line */
    return end_line(s);
}
