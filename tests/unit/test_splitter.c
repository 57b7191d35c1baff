/*
 * test_splitter.c — lines come out the same however the input is cut; limits, pauses and handler errors; the
 * stream offset past the last line end.
 */
#include "splitter.h"

#include <stdlib.h>

#include "unit.h"

/* What the handlers saw, written as text: each ended line becomes "<n>:<bytes>|". */
typedef struct {
    const char *buf; /* the caller's buffer: fragments must point into it */
    size_t buf_len;
    char out[4096];
    size_t out_len;
    char cur[1024]; /* the current line's bytes so far */
    size_t cur_len;
    uint64_t cur_line;
    bool bad;           /* a fragment was empty, outside buf, or carried a '\n' or a wrong line number */
    size_t max_seen;    /* longest line passed on */
    uint64_t pause_at;  /* on_line_end returns 1 for this line */
    uint64_t fail_data; /* on_data returns -1 on this line */
    uint64_t fail_end;  /* on_line_end returns -1 for this line */
} rec_t;

static int on_data(void *ctx, uint64_t line, const char *data, size_t len)
{
    rec_t *r = ctx;
    if (len == 0 || data < r->buf || data + len > r->buf + r->buf_len || memchr(data, '\n', len) != NULL)
        r->bad = true;
    if (r->cur_len > 0 && line != r->cur_line)
        r->bad = true;
    r->cur_line = line;
    if (line == r->fail_data)
        return -1;
    if (r->cur_len + len < sizeof(r->cur)) {
        memcpy(r->cur + r->cur_len, data, len);
        r->cur_len += len;
    }
    if (r->cur_len > r->max_seen)
        r->max_seen = r->cur_len;
    return 0;
}

static int on_line_end(void *ctx, uint64_t line)
{
    rec_t *r = ctx;
    if (r->cur_len > 0 && line != r->cur_line)
        r->bad = true;
    if (line == r->fail_end)
        return -1;
    r->out_len += (size_t)snprintf(r->out + r->out_len, sizeof(r->out) - r->out_len, "%llu:%.*s|",
                                   (unsigned long long)line, (int)r->cur_len, r->cur);
    r->cur_len = 0;
    return line == r->pause_at ? 1 : 0;
}

static const ji_splitter_handler_t handler = {on_data, on_line_end};

static void rec_init(rec_t *r, const char *buf, size_t len)
{
    memset(r, 0, sizeof(*r));
    r->buf = buf;
    r->buf_len = len;
}

/* Splits `text` fed in pieces cut at the given offsets (ascending, ending with len), then finishes. */
static ji_split_result_t split(rec_t *r, ji_splitter_t *s, const char *text, size_t len, const size_t *cuts,
                               size_t ncuts, size_t max)
{
    size_t from = 0;
    if (ncuts == 0 || cuts[ncuts - 1] != len)
        r->bad = true; /* the test itself is wrong */
    ji_splitter_init(s, max, &handler, r);
    for (size_t i = 0; i < ncuts; i++) {
        size_t used = 0;
        ji_split_result_t res = ji_splitter_feed(s, text + from, cuts[i] - from, &used);
        if (res != JI_SPLIT_OK)
            return res;
        if (used != cuts[i] - from)
            r->bad = true;
        from = cuts[i];
    }
    return ji_splitter_finish(s);
}

static const char sample[] = "{\"a\":1}\r\n\n   \nlast-but-one\r\n\r\nx\nend without newline";
static const char sample_lines[] = "1:{\"a\":1}\r|2:|3:   |4:last-but-one\r|5:\r|6:x|7:end without newline|";

static void test_whole(void)
{
    rec_t r;
    ji_splitter_t s;
    size_t len = strlen(sample);
    size_t cuts[] = {len};
    rec_init(&r, sample, len);
    CHECK_EQ_INT(split(&r, &s, sample, len, cuts, 1, 100), JI_SPLIT_OK);
    CHECK_EQ_STR(r.out, sample_lines);
    CHECK(!r.bad);
    CHECK_EQ_INT(ji_splitter_lines_done(&s), 7);
}

static void test_cut_at_every_two_places(void)
{
    size_t len = strlen(sample);
    long wrong = 0;
    for (size_t a = 0; a <= len; a++) {
        for (size_t b = a; b <= len; b++) {
            rec_t r;
            ji_splitter_t s;
            size_t cuts[] = {a, b, len};
            rec_init(&r, sample, len);
            ji_split_result_t res = split(&r, &s, sample, len, cuts, 3, 100);
            if (res != JI_SPLIT_OK || r.bad || strcmp(r.out, sample_lines) != 0 || ji_splitter_lines_done(&s) != 7) {
                if (wrong++ < 3)
                    fprintf(stderr, "cut %zu,%zu: %s\n", a, b, r.out);
            }
        }
    }
    CHECK_EQ_INT(wrong, 0);
}

static void test_one_byte_pieces(void)
{
    size_t len = strlen(sample);
    size_t cuts[sizeof(sample)];
    for (size_t i = 0; i < len; i++)
        cuts[i] = i + 1;
    rec_t r;
    ji_splitter_t s;
    rec_init(&r, sample, len);
    CHECK_EQ_INT(split(&r, &s, sample, len, cuts, len, 100), JI_SPLIT_OK);
    CHECK_EQ_STR(r.out, sample_lines);
    CHECK(!r.bad);
}

/* After a final '\n' there is no further line; an empty body has none at all; a lone "\r" is a line. */
static void test_trailing_newline_and_empty(void)
{
    rec_t r;
    ji_splitter_t s;
    size_t cuts[] = {4};
    rec_init(&r, "a\nb\n", 4);
    CHECK_EQ_INT(split(&r, &s, "a\nb\n", 4, cuts, 1, 10), JI_SPLIT_OK);
    CHECK_EQ_STR(r.out, "1:a|2:b|");
    CHECK_EQ_INT(ji_splitter_lines_done(&s), 2);

    size_t none[] = {0};
    rec_init(&r, "", 0);
    CHECK_EQ_INT(split(&r, &s, "", 0, none, 1, 10), JI_SPLIT_OK);
    CHECK_EQ_INT(r.out_len, 0);
    CHECK_EQ_INT(ji_splitter_lines_done(&s), 0);

    size_t one[] = {1};
    rec_init(&r, "\n", 1);
    CHECK_EQ_INT(split(&r, &s, "\n", 1, one, 1, 10), JI_SPLIT_OK);
    CHECK_EQ_STR(r.out, "1:|");

    rec_init(&r, "\r", 1);
    CHECK_EQ_INT(split(&r, &s, "\r", 1, one, 1, 10), JI_SPLIT_OK);
    CHECK_EQ_STR(r.out, "1:\r|");
}

/* Limit 5: a 5-byte line passes ('\r' counts, '\n' does not), a 6-byte line stops before its bytes go out. */
static void test_too_long(void)
{
    static const char *const ok_inputs[] = {"abcde\nxy", "abcd\r\nabcde", "\n\nabcde\n"};
    for (size_t i = 0; i < 3; i++) {
        const char *t = ok_inputs[i];
        size_t len = strlen(t);
        for (size_t a = 0; a <= len; a++) {
            rec_t r;
            ji_splitter_t s;
            size_t cuts[] = {a, len};
            rec_init(&r, t, len);
            CHECK_EQ_INT(split(&r, &s, t, len, cuts, 2, 5), JI_SPLIT_OK);
            CHECK(!r.bad);
        }
    }

    /* line 2 is 6 bytes: every way of cutting gives TOO_LONG on line 2, and no more than 5 bytes of it went out */
    const char *t = "ok\nabcdef\nnever";
    size_t len = strlen(t);
    for (size_t a = 0; a <= len; a++) {
        for (size_t b = a; b <= len; b++) {
            rec_t r;
            ji_splitter_t s;
            size_t cuts[] = {a, b, len};
            rec_init(&r, t, len);
            ji_split_result_t res = split(&r, &s, t, len, cuts, 3, 5);
            CHECK_EQ_INT(res, JI_SPLIT_TOO_LONG);
            CHECK_EQ_INT(ji_splitter_line(&s), 2);
            CHECK(r.max_seen <= 5);
            CHECK_EQ_STR(r.out, "1:ok|");
        }
    }

    /* the '\r' of "abcde\r\n" makes it 6 bytes */
    rec_t r;
    ji_splitter_t s;
    size_t cuts[] = {7};
    rec_init(&r, "abcde\r\n", 7);
    CHECK_EQ_INT(split(&r, &s, "abcde\r\n", 7, cuts, 1, 5), JI_SPLIT_TOO_LONG);
    CHECK_EQ_INT(ji_splitter_line(&s), 1);

    /* the consumed count stops before the line that is too long */
    size_t used = 99;
    rec_init(&r, "ab\ncdefgh", 9);
    ji_splitter_init(&s, 5, &handler, &r);
    CHECK_EQ_INT(ji_splitter_feed(&s, "ab\ncdefgh", 9, &used), JI_SPLIT_TOO_LONG);
    CHECK_EQ_INT(used, 3);
}

/* Pause after line 2: the rest stays unconsumed, and feeding it later goes on where it stopped. */
static void test_pause_and_resume(void)
{
    const char *t = "one\ntwo\nthree\nfour";
    size_t len = strlen(t);
    rec_t r;
    ji_splitter_t s;
    size_t used = 0;

    rec_init(&r, t, len);
    r.pause_at = 2;
    ji_splitter_init(&s, 100, &handler, &r);
    CHECK_EQ_INT(ji_splitter_feed(&s, t, len, &used), JI_SPLIT_PAUSED);
    CHECK_EQ_INT(used, 8);
    CHECK_EQ_STR(r.out, "1:one|2:two|");
    CHECK_EQ_INT(ji_splitter_lines_done(&s), 2);
    CHECK_EQ_INT(ji_splitter_feed(&s, t + used, len - used, &used), JI_SPLIT_OK);
    CHECK_EQ_INT(used, len - 8);
    CHECK_EQ_INT(ji_splitter_finish(&s), JI_SPLIT_OK);
    CHECK_EQ_STR(r.out, "1:one|2:two|3:three|4:four|");

    /* the paused line's '\n' ends the fragment: nothing left over */
    rec_init(&r, t, 8);
    r.pause_at = 2;
    ji_splitter_init(&s, 100, &handler, &r);
    CHECK_EQ_INT(ji_splitter_feed(&s, t, 8, &used), JI_SPLIT_PAUSED);
    CHECK_EQ_INT(used, 8);

    /* pausing on every line, input cut everywhere: the same lines */
    for (size_t a = 0; a <= len; a++) {
        rec_init(&r, t, len);
        ji_splitter_init(&s, 100, &handler, &r);
        size_t pieces[][2] = {{0, a}, {a, len}};
        bool ok = true;
        for (int k = 0; k < 2; k++) {
            size_t from = pieces[k][0], to = pieces[k][1];
            while (from < to) {
                r.pause_at = s.line; /* pause after whatever line ends next */
                ji_split_result_t res = ji_splitter_feed(&s, t + from, to - from, &used);
                if (res != JI_SPLIT_OK && res != JI_SPLIT_PAUSED)
                    ok = false;
                if (res == JI_SPLIT_OK && used != to - from)
                    ok = false;
                from += used;
            }
        }
        r.pause_at = 4;
        CHECK_EQ_INT(ji_splitter_finish(&s), JI_SPLIT_PAUSED); /* counts as success */
        CHECK(ok);
        CHECK_EQ_STR(r.out, "1:one|2:two|3:three|4:four|");
    }
}

static void test_handler_errors(void)
{
    const char *t = "a\nb\nc\n";
    rec_t r;
    ji_splitter_t s;
    size_t used;

    rec_init(&r, t, 6);
    r.fail_data = 2;
    ji_splitter_init(&s, 100, &handler, &r);
    CHECK_EQ_INT(ji_splitter_feed(&s, t, 6, &used), JI_SPLIT_ERROR);
    CHECK_EQ_INT(ji_splitter_line(&s), 2);
    CHECK_EQ_STR(r.out, "1:a|");

    rec_init(&r, t, 6);
    r.fail_end = 3;
    ji_splitter_init(&s, 100, &handler, &r);
    CHECK_EQ_INT(ji_splitter_feed(&s, t, 6, &used), JI_SPLIT_ERROR);
    CHECK_EQ_INT(ji_splitter_line(&s), 3);
    CHECK_EQ_STR(r.out, "1:a|2:b|");

    /* finish() reports a failing end of the last line too */
    rec_init(&r, "a\nb", 3);
    r.fail_end = 2;
    ji_splitter_init(&s, 100, &handler, &r);
    CHECK_EQ_INT(ji_splitter_feed(&s, "a\nb", 3, &used), JI_SPLIT_OK);
    CHECK_EQ_INT(ji_splitter_finish(&s), JI_SPLIT_ERROR);
    CHECK_EQ_INT(ji_splitter_line(&s), 2);
}

/* Zero copy: a line given in one buffer reaches the handler as one fragment at the same address. */
typedef struct {
    const char *ptr[4];
    size_t len[4];
    int n;
} frags_t;

static int frag_data(void *ctx, uint64_t line, const char *data, size_t len)
{
    frags_t *f = ctx;
    (void)line;
    if (f->n < 4) {
        f->ptr[f->n] = data;
        f->len[f->n] = len;
    }
    f->n++;
    return 0;
}

static int frag_end(void *ctx, uint64_t line)
{
    (void)ctx;
    (void)line;
    return 0;
}

static void test_zero_copy(void)
{
    static const char t[] = "first line\nsecond";
    static const ji_splitter_handler_t h = {frag_data, frag_end};
    frags_t f = {0};
    ji_splitter_t s;
    size_t used;
    ji_splitter_init(&s, 100, &h, &f);
    CHECK_EQ_INT(ji_splitter_feed(&s, t, strlen(t), &used), JI_SPLIT_OK);
    CHECK_EQ_INT(f.n, 2);
    CHECK(f.ptr[0] == t);
    CHECK_EQ_INT(f.len[0], 10);
    CHECK(f.ptr[1] == t + 11);
    CHECK_EQ_INT(f.len[1], 6);
    CHECK_EQ_INT(ji_splitter_finish(&s), JI_SPLIT_OK);
    CHECK_EQ_INT(f.n, 2);
}

/* Reference for the offset past the last line end: the byte after the last '\n' of text[0, upto), or 0. */
static uint64_t last_newline_end(const char *text, size_t upto)
{
    for (size_t i = upto; i > 0; i--)
        if (text[i - 1] == '\n')
            return i;
    return 0;
}

/* Feeds one more slice (all of it taken) and returns the offset past the last line end so far. */
static uint64_t feed_slice(rec_t *r, ji_splitter_t *s, const char *slice)
{
    size_t used = 0;

    r->buf = slice;
    r->buf_len = strlen(slice);
    CHECK_EQ_INT(ji_splitter_feed(s, slice, r->buf_len, &used), JI_SPLIT_OK);
    CHECK_EQ_INT(used, r->buf_len);
    return ji_splitter_line_end_offset(s);
}

/* The offset just past the last '\n' consumed, counted over the whole stream, whatever the slices. */
static void test_line_end_offset(void)
{
    rec_t r;
    ji_splitter_t s;
    size_t used;

    /* a line split across slices: no end until its '\n' arrives, then the offset counts both slices */
    rec_init(&r, "", 0);
    ji_splitter_init(&s, 100, &handler, &r);
    CHECK_EQ_INT(ji_splitter_line_end_offset(&s), 0);
    CHECK_EQ_INT(feed_slice(&r, &s, "ab"), 0);
    CHECK_EQ_INT(feed_slice(&r, &s, "c\nde"), 4);

    /* a slice with no '\n' leaves it where it was; finish() ends a line without one: no move either */
    CHECK_EQ_INT(feed_slice(&r, &s, "fgh"), 4);
    CHECK_EQ_INT(feed_slice(&r, &s, "\n\n"), 11);
    CHECK_EQ_INT(ji_splitter_finish(&s), JI_SPLIT_OK);
    CHECK_EQ_INT(ji_splitter_line_end_offset(&s), 11);
    CHECK_EQ_STR(r.out, "1:abc|2:defgh|3:|");

    /* an over-limit line: the offset stays at the end of the line before it; once skipped, its '\n' counts */
    const char *t = "ok\nabcdef\nz";
    rec_init(&r, t, strlen(t));
    ji_splitter_init(&s, 5, &handler, &r);
    CHECK_EQ_INT(ji_splitter_feed(&s, t, strlen(t), &used), JI_SPLIT_TOO_LONG);
    CHECK_EQ_INT(used, 3);
    CHECK_EQ_INT(ji_splitter_line_end_offset(&s), 3);
    ji_splitter_skip_line(&s);
    CHECK_EQ_INT(ji_splitter_feed(&s, t + 3, 4, &used), JI_SPLIT_OK); /* "abcd": still inside the skipped line */
    CHECK_EQ_INT(ji_splitter_line_end_offset(&s), 3);
    CHECK_EQ_INT(ji_splitter_feed(&s, t + 7, strlen(t) - 7, &used), JI_SPLIT_OK);
    CHECK_EQ_INT(ji_splitter_line_end_offset(&s), 10);
    CHECK_EQ_STR(r.out, "1:ok|");

    /* a pause counts the paused line's '\n'; a failing end of line leaves its '\n' unconsumed and uncounted */
    t = "one\ntwo\nthree\n";
    rec_init(&r, t, strlen(t));
    r.pause_at = 2;
    ji_splitter_init(&s, 100, &handler, &r);
    CHECK_EQ_INT(ji_splitter_feed(&s, t, strlen(t), &used), JI_SPLIT_PAUSED);
    CHECK_EQ_INT(ji_splitter_line_end_offset(&s), 8);
    r.fail_end = 3;
    CHECK_EQ_INT(ji_splitter_feed(&s, t + used, strlen(t) - used, &used), JI_SPLIT_ERROR);
    CHECK_EQ_INT(ji_splitter_line_end_offset(&s), 8);

    /* cut anywhere in two places: after each slice, the offset is past the last '\n' fed so far */
    size_t len = strlen(sample);
    long wrong = 0;
    for (size_t a = 0; a <= len; a++) {
        for (size_t b = a; b <= len; b++) {
            size_t cuts[] = {a, b, len};
            size_t from = 0;
            rec_init(&r, sample, len);
            ji_splitter_init(&s, 100, &handler, &r);
            for (size_t i = 0; i < 3; i++) {
                if (ji_splitter_feed(&s, sample + from, cuts[i] - from, &used) != JI_SPLIT_OK ||
                    ji_splitter_line_end_offset(&s) != last_newline_end(sample, cuts[i]))
                    wrong++;
                from = cuts[i];
            }
        }
    }
    CHECK_EQ_INT(wrong, 0);
}

UNIT_MAIN("splitter", {"whole", test_whole}, {"cut_at_every_two_places", test_cut_at_every_two_places},
          {"one_byte_pieces", test_one_byte_pieces}, {"trailing_newline_and_empty", test_trailing_newline_and_empty},
          {"too_long", test_too_long}, {"pause_and_resume", test_pause_and_resume},
          {"handler_errors", test_handler_errors}, {"zero_copy", test_zero_copy},
          {"line_end_offset", test_line_end_offset})
