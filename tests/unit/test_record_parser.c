/*
 * test_record_parser.c — records, rules and errors of the record parser, driven through the real splitter.
 * Every table case is run whole, cut in two at every byte, and in 1-byte pieces: the log of what the
 * handlers saw (images, records, errors with status, line and field) must be the same each time.
 */
#include "record_parser.h"

#include <stdarg.h>
#include <stdlib.h>

#include "array_scan.h"
#include "splitter.h"
#include "unit.h"

/* ---- a driver: splitter -> parser -> a text log ---- */

typedef struct {
    ji_record_parser_t *p;
    ji_splitter_t sp;
    bool skip; /* on an error: log it, reset, go on with the next line */
    char *log;
    size_t log_len, log_cap;
    uint64_t image_fail_line;  /* on_image fails on this line */
    uint64_t record_fail_line; /* on_record fails on this line */
    uint64_t pause_line;       /* on_record asks to pause on this line */
    int pauses;
    char *image; /* the last image, whole */
    size_t image_len;
} drv_t;

static void logf_(drv_t *d, const char *fmt, ...) JI_PRINTF(2, 3);
static void logf_(drv_t *d, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (d->log_len + (size_t)n + 1 > d->log_cap) {
        d->log_cap = (d->log_len + (size_t)n + 1) * 2;
        d->log = realloc(d->log, d->log_cap);
    }
    va_start(ap, fmt);
    vsnprintf(d->log + d->log_len, d->log_cap - d->log_len, fmt, ap);
    va_end(ap);
    d->log_len += (size_t)n;
}

static void log_err(drv_t *d, const ji_error_t *err)
{
    logf_(d, "E%llu:%d:%s:%s|", (unsigned long long)err->line, ji_error_http_status(err->kind), err->field,
          err->message);
}

static int h_image(void *ctx, uint64_t line, const char *text, size_t len, ji_error_t *err)
{
    drv_t *d = ctx;
    if (len <= 64)
        logf_(d, "I%llu:%.*s|", (unsigned long long)line, (int)len, text);
    else
        logf_(d, "I%llu:<%zu bytes>|", (unsigned long long)line, len);
    free(d->image);
    d->image = malloc(len);
    memcpy(d->image, text, len);
    d->image_len = len;
    if (line == d->image_fail_line)
        return ji_error_set(err, JI_ERR_INVALID, line, "image", "image is not valid base64 (test)");
    return 0;
}

static int h_record(void *ctx, const ji_record_t *rec, ji_error_t *err)
{
    drv_t *d = ctx;
    logf_(d, "R%llu:%.*s/%.*s/%d|", (unsigned long long)rec->line, (int)rec->name_len, rec->name, (int)rec->email_len,
          rec->email, rec->has_image);
    if (rec->line == d->record_fail_line)
        return ji_error_set(err, JI_ERR_DB, rec->line, NULL, "database went away (test)");
    if (rec->line == d->pause_line) {
        d->pauses++;
        return 1;
    }
    return 0;
}

static const ji_record_handler_t rec_handler = {h_image, h_record};

/* An error from the parser: logged; in skip mode the parser is reset and the splitter goes on. */
static int failed(drv_t *d, const ji_error_t *err)
{
    log_err(d, err);
    if (!d->skip)
        return -1;
    if (ji_record_parser_reset(d->p) != 0) {
        logf_(d, "reset failed|");
        return -1;
    }
    return 0;
}

static int s_data(void *ctx, uint64_t line, const char *data, size_t len)
{
    drv_t *d = ctx;
    ji_error_t err;
    ji_error_clear(&err);
    if (ji_record_parser_feed(d->p, line, data, len, &err) != 0)
        return failed(d, &err);
    return 0;
}

static int s_line_end(void *ctx, uint64_t line)
{
    drv_t *d = ctx;
    ji_error_t err;
    ji_error_clear(&err);
    int r = ji_record_parser_end_line(d->p, line, &err);
    if (r < 0)
        return failed(d, &err);
    return r;
}

static const ji_splitter_handler_t split_handler = {s_data, s_line_end};

static void drv_init(drv_t *d, bool skip)
{
    memset(d, 0, sizeof(*d));
    d->skip = skip;
    d->p = ji_record_parser_new(&rec_handler, d);
    ji_splitter_init(&d->sp, JI_DEFAULT_MAX_RECORD_BYTES, &split_handler, d);
    logf_(d, "%s", "");
}

static void drv_free(drv_t *d)
{
    ji_record_parser_free(d->p);
    free(d->log);
    free(d->image);
}

/* Feeds one piece, resuming after pauses. false once the splitter stopped. */
static bool drv_feed(drv_t *d, const char *data, size_t len)
{
    while (len > 0) {
        size_t used = 0;
        ji_split_result_t res = ji_splitter_feed(&d->sp, data, len, &used);
        if (res == JI_SPLIT_OK)
            return true;
        if (res != JI_SPLIT_PAUSED) {
            logf_(d, "S%d|", (int)res);
            return false;
        }
        data += used;
        len -= used;
    }
    return true;
}

static void drv_finish(drv_t *d)
{
    ji_split_result_t res = ji_splitter_finish(&d->sp);
    if (res != JI_SPLIT_OK && res != JI_SPLIT_PAUSED)
        logf_(d, "S%d|", (int)res);
}

/* Runs `body` cut at `cut` (0..len; len = whole), or in pieces of `piece` bytes when piece > 0. Returns the log. */
static char *run(const char *body, size_t len, bool skip, size_t cut, size_t piece)
{
    drv_t d;
    drv_init(&d, skip);
    bool go = true;
    if (piece > 0) {
        for (size_t off = 0; go && off < len; off += piece)
            go = drv_feed(&d, body + off, len - off < piece ? len - off : piece);
    } else {
        go = drv_feed(&d, body, cut) && drv_feed(&d, body + cut, len - cut);
    }
    if (go)
        drv_finish(&d);
    char *log = d.log;
    d.log = NULL;
    drv_free(&d);
    return log;
}

/* Runs `body` every way and checks the log against `want` each time. Returns the number of mismatches. */
static int check_all_cuts(const char *body, size_t len, bool skip, const char *want, const char *label)
{
    int wrong = 0;
    for (size_t cut = 0; cut <= len + 1; cut++) {
        char *got = cut <= len ? run(body, len, skip, cut, 0) : run(body, len, skip, 0, 1);
        if (strcmp(got, want) != 0) {
            if (wrong++ == 0)
                fprintf(stderr, "%s: %s\n  body: %.*s\n  want: %s\n  got:  %s\n", label,
                        cut <= len ? "cut" : "1-byte pieces", (int)(len > 300 ? 300 : len), body, want, got);
        }
        free(got);
    }
    return wrong;
}

/* Both modes: in skip mode the log is `want`; without it the same, and an error also stops the splitter. */
static int check_both(const char *body, size_t len, const char *want, const char *label)
{
    bool has_error = want[0] == 'E' || strstr(want, "|E") != NULL;
    size_t wl = strlen(want);
    char *want_stop = malloc(wl + 4);
    memcpy(want_stop, want, wl + 1);
    if (has_error)
        strcat(want_stop, "S2|");
    int wrong = check_all_cuts(body, len, true, want, label) + check_all_cuts(body, len, false, want_stop, label);
    free(want_stop);
    return wrong;
}

/* ---- table of single-line cases ---- */

typedef struct {
    const char *body;
    const char *want;
} case_t;

#define NE ",\"name\":\"n\",\"email\":\"e@x\"}" /* closes a record that is otherwise fine */

static const case_t cases[] = {
    /* valid records */
    {"{\"name\":\"vladimir\",\"email\":\"someone@gmail.com\",\"image\":\"aGVsbG8=\"}\n",
     "I1:aGVsbG8=|R1:vladimir/someone@gmail.com/1|"},
    {"{\"image\":\"aGk=\",\"email\":\"a@b\",\"name\":\"x\"}", "I1:aGk=|R1:x/a@b/1|"},
    {"{\"user\":\"u\",\"email\":\"a@b\"}\n", "R1:u/a@b/0|"},
    {"{\"username\":\"uu\",\"email\":\"a@b\",\"image\":null}\n", "R1:uu/a@b/0|"},
    {"{\"name\":\"n\",\"email\":\"a@b\",\"image\":\"\"}\n", "R1:n/a@b/0|"},
    {"  {  \"name\" : \"n\" , \"email\" : \"a@b\" }  \t\r\n", "R1:n/a@b/0|"},
    {"{\"age\":30,\"tags\":[\"x\",{\"name\":1,\"email\":[],\"image\":7}],\"name\":\"n\",\"meta\":{\"image\":5,"
     "\"deep\":[[[{\"a\":null}]]]},\"email\":\"e@x\",\"ok\":true,\"f\":false,\"z\":null,\"e\":{},\"a\":[]}\n",
     "R1:n/e@x/0|"},
    {"{\"Name\":5,\"EMAIL\":6,\"images\":7" NE "\n", "R1:n/e@x/0|"}, /* member names are case-sensitive */
    {"{\"big\":123456789012345678901234567890123456789e999999,\"neg\":-1.5e-99999,\"i\":-0" NE "\n", "R1:n/e@x/0|"},
    {"{\"name\":\"a\\nb\\\"c\\/d\\u00e9\\ud83d\\ude00\\\\u0000\",\"email\":\"x@y\"}\n",
     "R1:a\nb\"c/d\xc3\xa9\xf0\x9f\x98\x80\\u0000/x@y/0|"},
    {"{\"name\":\"\xc5\xbd\xc3\xa1k \xe6\x97\xa5\xf0\x9f\x98\x80\",\"email\":\"\xc3\xa9@\xc3\xa9.fr\"}\n",
     "R1:\xc5\xbd\xc3\xa1k \xe6\x97\xa5\xf0\x9f\x98\x80/\xc3\xa9@\xc3\xa9.fr/0|"},
    {"{\"image\":\"ab\\/cd\\ne\\u0041\\r\\n\"" NE "\n", "I1:ab/cd\neA\r\n|R1:n/e@x/1|"},
    {"{\"image\":\"data:image/png;base64,iVBO\"" NE, "I1:data:image/png;base64,iVBO|R1:n/e@x/1|"},

    /* blank lines */
    {"\n", ""},
    {"   \n", ""},
    {"\r\n", ""},
    {"\t \r\n", ""},
    {"\r", ""},

    /* missing and mistyped fields */
    {"{\"email\":\"a@b\"}\n", "E1:422:name:missing field \"name\"|"},
    {"{\"name\":\"a\"}\n", "E1:422:email:missing field \"email\"|"},
    {"{}\n", "E1:422:name:missing field \"name\"|"},
    {"{\"name\":5,\"email\":\"a@b\"}\n", "E1:422:name:name must be a string|"},
    {"{\"user\":null,\"email\":\"a@b\"}\n", "E1:422:name:name must be a string|"},
    {"{\"username\":{\"first\":\"a\"},\"email\":\"a@b\"}\n", "E1:422:name:name must be a string|"},
    {"{\"name\":[\"a\"],\"email\":\"a@b\"}\n", "E1:422:name:name must be a string|"},
    {"{\"name\":true,\"email\":\"a@b\"}\n", "E1:422:name:name must be a string|"},
    {"{\"name\":\"a\",\"email\":12}\n", "E1:422:email:email must be a string|"},
    {"{\"name\":\"a\",\"email\":null}\n", "E1:422:email:email must be a string|"},
    {"{\"image\":5" NE "\n", "E1:422:image:image must be a string or null|"},
    {"{\"image\":true" NE "\n", "E1:422:image:image must be a string or null|"},
    {"{\"image\":{\"data\":\"x\"}" NE "\n", "E1:422:image:image must be a string or null|"},
    {"{\"image\":[]" NE "\n", "E1:422:image:image must be a string or null|"},

    /* field rules */
    {"{\"name\":\"\",\"email\":\"a@b\"}\n", "E1:422:name:name is empty|"},
    {"{\"name\":\"a\",\"email\":\"\"}\n", "E1:422:email:email is empty|"},
    {"{\"name\":\"a\",\"email\":\"ab\"}\n", "E1:422:email:email must contain exactly one '@' with text on both sides|"},
    {"{\"name\":\"a\",\"email\":\"a@@b\"}\n",
     "E1:422:email:email must contain exactly one '@' with text on both sides|"},
    {"{\"name\":\"a\",\"email\":\"a@b@c\"}\n",
     "E1:422:email:email must contain exactly one '@' with text on both sides|"},
    {"{\"name\":\"a\",\"email\":\"@b\"}\n", "E1:422:email:email must contain exactly one '@' with text on both sides|"},
    {"{\"name\":\"a\",\"email\":\"a@\"}\n", "E1:422:email:email must contain exactly one '@' with text on both sides|"},
    {"{\"name\":\"a\",\"email\":\"@\"}\n", "E1:422:email:email must contain exactly one '@' with text on both sides|"},

    /* a member given twice */
    {"{\"name\":\"a\",\"user\":\"b\",\"email\":\"a@b\"}\n",
     "E1:422:name:duplicate member \"user\" (name, user and username are one field)|"},
    {"{\"user\":\"a\",\"username\":\"b\",\"email\":\"a@b\"}\n",
     "E1:422:name:duplicate member \"username\" (name, user and username are one field)|"},
    {"{\"name\":\"a\",\"name\":\"a\",\"email\":\"a@b\"}\n",
     "E1:422:name:duplicate member \"name\" (name, user and username are one field)|"},
    {"{\"email\":\"a@b\",\"name\":\"a\",\"email\":\"a@b\"}\n", "E1:422:email:duplicate member \"email\"|"},
    {"{\"image\":\"eA==\",\"image\":null" NE "\n", "I1:eA==|E1:422:image:duplicate member \"image\"|"},
    {"{\"x\":1,\"x\":2,\"m\":{\"name\":1,\"name\":2}" NE "\n", "R1:n/e@x/0|"}, /* ignored ones may repeat */

    /* invalid UTF-8 in any string: 400 */
    {"{\"name\":\"\xc0\xaf\",\"email\":\"a@b\"}\n", "E1:400::invalid UTF-8|"},
    {"{\"name\":\"a\xed\xa0\x80\",\"email\":\"a@b\"}\n", "E1:400::invalid UTF-8|"},
    {"{\"name\":\"a\",\"email\":\"a@b\xe2\x82\"}\n", "E1:400::invalid UTF-8|"},
    {"{\"bio\":\"\xf4\x90\x80\x80\"" NE "\n", "E1:400::invalid UTF-8|"},
    {"{\"b\xc0\xafo\":1" NE "\n", "E1:400::invalid UTF-8|"},
    {"{\"m\":{\"k\":[\"ok\",\"\xff\"]}" NE "\n", "E1:400::invalid UTF-8|"},
    {"{\"m\":{\"k\xed\xbf\xbf\":1}" NE "\n", "E1:400::invalid UTF-8|"},
    {"{\"image\":\"aGk\xc3\"" NE "\n", "E1:400::invalid UTF-8|"},
    {"{\"name\":\"a\",\xff}\n", "E1:400::lexical error: invalid char in json text|"},

    /* \u0000 and unpaired surrogate escapes: 422 naming the top-level member */
    {"{\"name\":\"a\\u0000b\",\"email\":\"a@b\"}\n", "E1:422:name:\\u0000 escape in a string is not allowed|"},
    {"{\"user\":\"\\ud800\",\"email\":\"a@b\"}\n", "E1:422:name:unpaired surrogate escape in a string is not allowed|"},
    {"{\"name\":\"a\",\"email\":\"a@b\\udc00\"}\n",
     "E1:422:email:unpaired surrogate escape in a string is not allowed|"},
    {"{\"name\":\"a\",\"email\":\"a@\\ud800\\u0041\"}\n",
     "E1:422:email:unpaired surrogate escape in a string is not allowed|"},
    {"{\"image\":\"aGk\\u0000\"" NE "\n", "E1:422:image:\\u0000 escape in a string is not allowed|"},
    {"{\"bio\":\"x\\ud800\"" NE "\n", "E1:422:bio:unpaired surrogate escape in a string is not allowed|"},
    {"{\"meta\":{\"x\":[\"a\",\"\\udc00\"]}" NE "\n",
     "E1:422:meta:unpaired surrogate escape in a string is not allowed|"},
    {"{\"meta\":{\"k\\ud800\":1}" NE "\n", "E1:422:meta:unpaired surrogate escape in a member name is not allowed|"},
    {"{\"na\\u0000me\":1" NE "\n", "E1:422:na:\\u0000 escape in a member name is not allowed|"},
    /* the bad escape is in the third string of the line: the first two, called back earlier, are fine */
    {"{\"a\":\"x\\\\u0000\",\"b\":\"\\u00e9\",\"c\":\"\\u0000\"" NE "\n",
     "E1:422:c:\\u0000 escape in a string is not allowed|"},
    /* a valid pair, then a lone one in the next member */
    {"{\"a\":\"\\ud83d\\ude00\",\"b\":[1,{\"c\":\"\\ud83d\"}]" NE "\n",
     "E1:422:b:unpaired surrogate escape in a string is not allowed|"},
    /* ...and the first member's name when it holds the only bad one */
    {"{\"first\":\"\\ud83d \\ude00\",\"b\":\"\\u0000\"" NE "\n",
     "E1:422:first:unpaired surrogate escape in a string is not allowed|"},

    /* not exactly one object on the line: 400 */
    {"{\"name\":\"a\",\"email\":\"a@b\"}{\"name\":\"b\",\"email\":\"b@c\"}\n",
     "E1:400::more than one JSON value on the line|"},
    {"{\"name\":\"a\",\"email\":\"a@b\"} 5\n", "E1:400::more than one JSON value on the line|"},
    {"{\"name\":\"a\",\"email\":\"a@b\"} \"x\"\n", "E1:400::more than one JSON value on the line|"},
    {"{\"name\":\"a\",\"email\":\"a@b\"} []\n", "E1:400::more than one JSON value on the line|"},
    {"{\"name\":\"a\",\"email\":\"a@b\"} tru\n", "E1:400::lexical error: invalid string in json text|"},
    {"{\"name\":\"a\",\"email\":\"a@b\"} }\n", "E1:400::parse error: unallowed token at this point in JSON text|"},
    {"[{\"name\":\"a\",\"email\":\"a@b\"}]\n", "E1:400::expected a JSON object, found an array|"},
    {"\"str\"\n", "E1:400::expected a JSON object, found a string|"},
    {"42\n", "E1:400::expected a JSON object, found a number|"},
    {"-7", "E1:400::expected a JSON object, found a number|"},
    {"null\n", "E1:400::expected a JSON object, found null|"},
    {"true\n", "E1:400::expected a JSON object, found a boolean|"},
    {"{\"name\":\"a\",\"email\":\"a@b\"\n", "E1:400::line ends inside a JSON value|"},
    {"{\"name\":\"a\n", "E1:400::line ends inside a JSON value|"},
    {"{\"name\":\n", "E1:400::line ends inside a JSON value|"},
    {"{\"n\":12\n", "E1:400::line ends inside a JSON value|"},
    {"{\n", "E1:400::line ends inside a JSON value|"},
    {"{\"a\":[1,{\"b\":2}\n", "E1:400::line ends inside a JSON value|"},
    {"\"abc\n", "E1:400::lexical error: invalid character inside string|"},
    {"nul\n", "E1:400::lexical error: invalid string in json text|"},
    {"{\"name\" \"a\"}\n", "E1:400::parse error: object key and value must be separated by a colon (':')|"},
    {"{\"name\":\"a\",}\n", "E1:400::parse error: invalid object key (must be a string)|"},
    {"{\"name\":\"a\" /* c */}\n",
     "E1:400::lexical error: probable comment found in input text, comments are not enabled|"},
};

static void test_cases(void)
{
    int wrong = 0;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char label[32];
        snprintf(label, sizeof(label), "case %zu", i);
        wrong += check_both(cases[i].body, strlen(cases[i].body), cases[i].want, label) != 0;
    }
    CHECK_EQ_INT(wrong, 0);
}

/* ---- lengths: 255 characters pass, 256 do not, counted in characters ---- */

static char *repeat(const char *prefix, const char *unit, size_t n, const char *suffix, size_t *len)
{
    size_t pl = strlen(prefix), ul = strlen(unit), sl = strlen(suffix);
    char *s = malloc(pl + ul * n + sl + 1);
    memcpy(s, prefix, pl);
    for (size_t i = 0; i < n; i++)
        memcpy(s + pl + ul * i, unit, ul);
    memcpy(s + pl + ul * n, suffix, sl + 1);
    *len = pl + ul * n + sl;
    return s;
}

static void test_lengths(void)
{
    static const char *const units[] = {"a",       "\xc3\xa9",      "\xe2\x82\xac", "\xf0\x9f\x98\x80",
                                        "\\u00e9", "\\ud83d\\ude00"};
    static const char *const decoded[] = {"a",        "\xc3\xa9",        "\xe2\x82\xac", "\xf0\x9f\x98\x80",
                                          "\xc3\xa9", "\xf0\x9f\x98\x80"};
    int wrong = 0;
    for (size_t u = 0; u < sizeof(units) / sizeof(units[0]); u++) {
        size_t len, nlen, want_len;
        char *body = repeat("{\"email\":\"a@b\",\"name\":\"", units[u], 255, "\"}\n", &len);
        char *name = repeat("", decoded[u], 255, "", &nlen);
        char *want = malloc(nlen + 32);
        snprintf(want, nlen + 32, "R1:%s/a@b/0|", name);
        want_len = strlen(want);
        (void)want_len;
        wrong += check_both(body, len, want, "255 characters") != 0;
        free(body);
        free(want);
        free(name);

        body = repeat("{\"email\":\"a@b\",\"name\":\"", units[u], 256, "\"}\n", &len);
        wrong += check_both(body, len, "E1:422:name:name is longer than 255 characters|", "256 characters") != 0;
        free(body);

        /* email: 255 characters with its '@' */
        body = repeat("{\"name\":\"n\",\"email\":\"a@", units[u], 253, "\"}", &len);
        char *email = repeat("a@", decoded[u], 253, "", &nlen);
        want = malloc(nlen + 32);
        snprintf(want, nlen + 32, "R1:n/%s/0|", email);
        wrong += check_both(body, len, want, "email of 255 characters") != 0;
        free(body);
        free(want);
        free(email);
        body = repeat("{\"name\":\"n\",\"email\":\"a@", units[u], 254, "\"}", &len);
        wrong += check_both(body, len, "E1:422:email:email is longer than 255 characters|", "email 256") != 0;
        free(body);
    }
    /* far longer than any 255 characters can be: refused without being kept */
    size_t len;
    char *body = repeat("{\"name\":\"", "x", 100000, "\",\"email\":\"a@b\"}", &len);
    char *got = run(body, len, true, len, 0);
    CHECK_EQ_STR(got, "E1:422:name:name is longer than 255 characters|");
    free(got);
    free(body);
    CHECK_EQ_INT(wrong, 0);
}

/* ---- several lines, skip mode: every error named with its line, the good records delivered ---- */

static const char skip_body[] = "{\"name\":\"a\",\"email\":\"a@b\"}\n"                     /* 1 */
                                "{\"name\":\"b\",\"email\":\"bad\"}\r\n"                   /* 2 */
                                "\n"                                                       /* 3 */
                                "{\"name\":\"c\",\"email\":\"c@d\",\"image\":\"aW1n\"}\n"  /* 4 */
                                "{\"name\":\"d\\u0000\",\"email\":\"d@e\",\"more\":[1]}\n" /* 5 */
                                "{\"name\":\"e\",\"email\":\"e@f\"\n"                      /* 6 */
                                "{\"name\":\"\xc0\xaf\",\"email\":\"x@y\"}\n"              /* 7 */
                                "{\"name\":\"f\",\"email\":\"f@g\"}{}\n"                   /* 8 */
                                "[1]\n"                                                    /* 9 */
                                "{\"name\":\"g\",\"email\":\"g@h\"}\r\n"                   /* 10 */
                                "{\"name\":\"h\",\"email\" \"x\"}\n"                       /* 11 */
                                "   \r\n"                                                  /* 12 */
                                "{\"email\":\"i@j\"}\n"                                    /* 13 */
                                "{\"name\":\"i\",\"email\":\"i@j\"} 1\n"                   /* 14 */
                                "{\"name\":\"j\",\"email\":\"j@k\"}";                      /* 15 */

static const char skip_want[] = "R1:a/a@b/0|"
                                "E2:422:email:email must contain exactly one '@' with text on both sides|"
                                "I4:aW1n|R4:c/c@d/1|"
                                "E5:422:name:\\u0000 escape in a string is not allowed|"
                                "E6:400::line ends inside a JSON value|"
                                "E7:400::invalid UTF-8|"
                                "E8:400::more than one JSON value on the line|"
                                "E9:400::expected a JSON object, found an array|"
                                "R10:g/g@h/0|"
                                "E11:400::parse error: object key and value must be separated by a colon (':')|"
                                "E13:422:name:missing field \"name\"|"
                                "E14:400::more than one JSON value on the line|"
                                "R15:j/j@k/0|";

static void test_skip_mode(void)
{
    CHECK_EQ_INT(check_all_cuts(skip_body, strlen(skip_body), true, skip_want, "skip mode"), 0);
    /* without skip mode the first error ends it all */
    CHECK_EQ_INT(check_all_cuts(skip_body, strlen(skip_body), false,
                                "R1:a/a@b/0|E2:422:email:email must contain exactly one '@' with text on both sides|"
                                "S2|",
                                "stop mode"),
                 0);
}

/* ---- the handlers' own results ---- */

static void test_handler_results(void)
{
    const char *body = "{\"name\":\"a\",\"email\":\"a@b\",\"image\":\"eA==\"}\n"
                       "{\"name\":\"b\",\"email\":\"b@c\",\"image\":\"eQ==\"}\n"
                       "{\"name\":\"c\",\"email\":\"c@d\"}\n";
    size_t len = strlen(body);
    drv_t d;

    /* on_image fails on line 2: its error comes back unchanged, before on_record */
    drv_init(&d, true);
    d.image_fail_line = 2;
    CHECK(drv_feed(&d, body, len));
    drv_finish(&d);
    CHECK_EQ_STR(d.log, "I1:eA==|R1:a/a@b/1|I2:eQ==|E2:422:image:image is not valid base64 (test)|R3:c/c@d/0|");
    drv_free(&d);

    /* on_record fails on line 1: unchanged too */
    drv_init(&d, false);
    d.record_fail_line = 1;
    CHECK(!drv_feed(&d, body, len));
    CHECK_EQ_STR(d.log, "I1:eA==|R1:a/a@b/1|E1:503::database went away (test)|S2|");
    drv_free(&d);

    /* on_record pauses on line 2: end_line says 1, the splitter pauses, and all goes on afterwards */
    drv_init(&d, false);
    d.pause_line = 2;
    CHECK(drv_feed(&d, body, len));
    drv_finish(&d);
    CHECK_EQ_INT(d.pauses, 1);
    CHECK_EQ_STR(d.log, "I1:eA==|R1:a/a@b/1|I2:eQ==|R2:b/b@c/1|R3:c/c@d/0|");
    drv_free(&d);
}

static int silent_fail_record(void *ctx, const ji_record_t *rec, ji_error_t *err)
{
    (void)ctx, (void)rec, (void)err;
    return -1; /* forgets to say why */
}

static int silent_fail_image(void *ctx, uint64_t line, const char *text, size_t len, ji_error_t *err)
{
    (void)ctx, (void)line, (void)text, (void)len, (void)err;
    return -1;
}

static int count_record(void *ctx, const ji_record_t *rec, ji_error_t *err)
{
    (void)rec, (void)err;
    ++*(int *)ctx;
    return 0;
}

/* Direct use of the API: misuse and silent handlers are errors, never silence. */
static void test_api(void)
{
    static const ji_record_handler_t silent = {silent_fail_image, silent_fail_record};
    ji_record_parser_t *p = ji_record_parser_new(&silent, NULL);
    ji_error_t err;
    const char *rec = "{\"name\":\"a\",\"email\":\"a@b\"}";
    const char *img = "{\"image\":\"eA==\",\"name\":\"a\",\"email\":\"a@b\"}";

    ji_error_clear(&err);
    CHECK_EQ_INT(ji_record_parser_feed(p, 1, rec, strlen(rec), &err), 0);
    CHECK_EQ_INT(ji_record_parser_end_line(p, 1, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_INTERNAL);
    CHECK_EQ_INT(err.line, 1);

    /* used again without reset */
    ji_error_clear(&err);
    CHECK_EQ_INT(ji_record_parser_feed(p, 2, rec, strlen(rec), &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_INTERNAL);
    CHECK_EQ_INT(ji_record_parser_reset(p), 0);

    ji_error_clear(&err);
    CHECK_EQ_INT(ji_record_parser_feed(p, 2, img, strlen(img), &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_INTERNAL);
    CHECK_EQ_STR(err.field, "image");
    CHECK_EQ_INT(err.line, 2);
    /* reset, then the caller skips the rest of line 2 itself and goes on with line 3 */
    CHECK_EQ_INT(ji_record_parser_reset(p), 0);
    ji_record_parser_free(p);

    int count = 0;
    static const ji_record_handler_t counting = {silent_fail_image, count_record};
    p = ji_record_parser_new(&counting, &count);
    ji_error_clear(&err);
    const char *nul = "{\"name\":\"a\\u0000\",";
    CHECK_EQ_INT(ji_record_parser_feed(p, 1, nul, strlen(nul), &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_INVALID);
    CHECK_EQ_INT(ji_record_parser_reset(p), 0);
    ji_error_clear(&err);
    CHECK_EQ_INT(ji_record_parser_feed(p, 2, rec, strlen(rec), &err), 0); /* line 1's rest never comes */
    CHECK_EQ_INT(ji_record_parser_end_line(p, 2, &err), 0);
    CHECK_EQ_INT(count, 1);
    /* the rest of a failed line, when it does come after the reset, is ignored up to its end */
    const char *high = "{\"name\":\"a\\ud800\",", *rest = "\"email\":\"a@b\"}";
    CHECK_EQ_INT(ji_record_parser_feed(p, 3, high, strlen(high), &err), -1);
    CHECK_EQ_INT(ji_record_parser_reset(p), 0);
    CHECK_EQ_INT(ji_record_parser_feed(p, 3, rest, strlen(rest), &err), 0);
    CHECK_EQ_INT(ji_record_parser_end_line(p, 3, &err), 0);
    CHECK_EQ_INT(ji_record_parser_feed(p, 4, rec, strlen(rec), &err), 0);
    CHECK_EQ_INT(ji_record_parser_end_line(p, 4, &err), 0);
    CHECK_EQ_INT(count, 2);
    /* a line number that changes before end_line is a caller bug, reported */
    ji_error_clear(&err);
    CHECK_EQ_INT(ji_record_parser_feed(p, 5, "{", 1, &err), 0);
    CHECK_EQ_INT(ji_record_parser_feed(p, 6, "}", 1, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_INTERNAL);
    ji_record_parser_free(p);
    ji_record_parser_free(NULL);
}

/* ---- many records through one yajl handle; a big image in 4 KiB and 64 KiB pieces ---- */

static void test_many_records(void)
{
    size_t cap = 20000 * 64, len = 0;
    char *body = malloc(cap);
    for (int i = 0; i < 20000; i++)
        len += (size_t)snprintf(body + len, cap - len, "{\"name\":\"user%d\",\"email\":\"u%d@x.org\",\"n\":%d}%s", i, i,
                                i, i % 3 == 0 ? "\r\n" : "\n");
    drv_t d;
    drv_init(&d, false);
    CHECK(drv_feed(&d, body, len));
    drv_finish(&d);
    CHECK(strstr(d.log, "R1:user0/u0@x.org/0|R2:user1/u1@x.org/0|") == d.log);
    CHECK(strstr(d.log, "|R20000:user19999/u19999@x.org/0|") != NULL);
    CHECK(strchr(d.log, 'E') == NULL);
    drv_free(&d);
    free(body);
}

static void test_big_image(void)
{
    size_t n = 3u << 20;
    char *b64 = malloc(n);
    for (size_t i = 0; i < n; i++)
        b64[i] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[(i * 2654435761u >> 7) % 64];
    size_t cap = n * 2 + 200, len = 0;
    char *body = malloc(cap);
    len += (size_t)snprintf(body, cap, "{\"name\":\"n\",\"email\":\"e@x\",\"image\":\"");
    /* every '/' written as "\/" the way PHP does: the handler must get the decoded text */
    for (size_t i = 0; i < n; i++) {
        if (b64[i] == '/')
            body[len++] = '\\';
        body[len++] = b64[i];
    }
    len += (size_t)snprintf(body + len, cap - len, "\"}\n{\"name\":\"m\",\"email\":\"f@x\"}\n");
    static const size_t pieces[] = {4096, 65536, 1 << 20};
    for (size_t k = 0; k < 3; k++) {
        drv_t d;
        drv_init(&d, false);
        for (size_t off = 0; off < len; off += pieces[k])
            CHECK(drv_feed(&d, body + off, len - off < pieces[k] ? len - off : pieces[k]));
        drv_finish(&d);
        char want[128];
        snprintf(want, sizeof(want), "I1:<%zu bytes>|R1:n/e@x/1|R2:m/f@x/0|", n);
        CHECK_EQ_STR(d.log, want);
        CHECK(d.image_len == n && memcmp(d.image, b64, n) == 0);
        drv_free(&d);
    }
    free(body);
    free(b64);
}

/* ---- long strings fed in small fragments: the parser holds fragments back from yajl ---- */

/* Appends `n` base64 characters to `body` at `*len`, every '/' written as "\/" when `escape_slash`. */
static void put_b64(char *body, size_t *len, size_t n, unsigned seed, bool escape_slash)
{
    for (size_t i = 0; i < n; i++) {
        char c =
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[((i + seed) * 2654435761u >> 9) % 64];
        if (c == '/' && escape_slash)
            body[(*len)++] = '\\';
        body[(*len)++] = c;
    }
}

/* Feeds `body` in pieces of `piece` bytes (0 = whole) in skip mode; returns the driver for its log and image. */
static void run_pieces(drv_t *d, const char *body, size_t len, size_t piece)
{
    drv_init(d, true);
    if (piece == 0)
        piece = len;
    for (size_t off = 0; off < len; off += piece)
        CHECK(drv_feed(d, body + off, len - off < piece ? len - off : piece));
    drv_finish(d);
}

static void test_long_strings_in_fragments(void)
{
    const size_t n = 1u << 20; /* characters of each long string */
    size_t cap = 8 * n + 1024, len = 0;
    char *body = malloc(cap);
    char *want_image = malloc(n);
    size_t want_len = 0;

    /* 1: a long image, fine */
    len += (size_t)snprintf(body + len, cap - len, "{\"name\":\"a\",\"email\":\"a@x\",\"image\":\"");
    size_t first_image_at = len;
    put_b64(body, &len, n, 1, false);
    len += (size_t)snprintf(body + len, cap - len, "\"}\n");
    /* 2: a raw control character deep inside a long string: 400 on line 2 */
    len += (size_t)snprintf(body + len, cap - len, "{\"name\":\"b\",\"email\":\"b@x\",\"image\":\"");
    put_b64(body, &len, n - 1000, 2, false);
    body[len++] = '\t';
    put_b64(body, &len, 999, 3, false);
    len += (size_t)snprintf(body + len, cap - len, "\"}\n");
    /* 3: a long image with "\/" escapes after a long ignored member: the handler gets the decoded text */
    len += (size_t)snprintf(body + len, cap - len, "{\"bio\":\"");
    put_b64(body, &len, n, 4, false);
    len += (size_t)snprintf(body + len, cap - len, "\",\"image\":\"");
    size_t image_at = len;
    put_b64(body, &len, n, 5, true);
    for (size_t i = image_at; i < len; i++) /* what the handler must get: the same text without backslashes */
        if (body[i] != '\\')
            want_image[want_len++] = body[i];
    len += (size_t)snprintf(body + len, cap - len, "\",\"name\":\"c\",\"email\":\"c@x\"}\n");
    /* 4: a \u0000 escape near the end of a long image: 422 naming the member, on line 4 */
    len += (size_t)snprintf(body + len, cap - len, "{\"name\":\"d\",\"email\":\"d@x\",\"image\":\"");
    put_b64(body, &len, n - 10, 6, false);
    len += (size_t)snprintf(body + len, cap - len, "\\u0000abcd\"}\n");
    /* 5: a long ignored string, and the line ends before its record does: 400 on line 5 */
    len += (size_t)snprintf(body + len, cap - len, "{\"name\":\"e\",\"email\":\"e@x\",\"x\":\"");
    put_b64(body, &len, n, 7, false);
    len += (size_t)snprintf(body + len, cap - len, "\"\n");
    /* 6: still counting lines right */
    len += (size_t)snprintf(body + len, cap - len, "{\"name\":\"f\",\"email\":\"f@x\"}");
    CHECK(len < cap);

    char want[512];
    snprintf(want, sizeof(want),
             "I1:<%zu bytes>|R1:a/a@x/1|E2:400::lexical error: invalid character inside string|I3:<%zu bytes>|"
             "R3:c/c@x/1|E4:422:image:\\u0000 escape in a string is not allowed|"
             "E5:400::line ends inside a JSON value|R6:f/f@x/0|",
             n, want_len);
    static const size_t pieces[] = {0, 1, 7, 1000, 4093, 65536};
    for (size_t k = 0; k < sizeof(pieces) / sizeof(pieces[0]); k++) {
        if (pieces[k] == 1) { /* byte by byte: only the first line, it takes a while */
            drv_t d;
            size_t first = (size_t)(strchr(body, '\n') - body) + 1;
            run_pieces(&d, body, first, 1);
            char want1[64];
            snprintf(want1, sizeof(want1), "I1:<%zu bytes>|R1:a/a@x/1|", n);
            CHECK_EQ_STR(d.log, want1);
            CHECK(d.image_len == n && memcmp(d.image, body + first_image_at, n) == 0);
            drv_free(&d);
            continue;
        }
        drv_t d;
        run_pieces(&d, body, len, pieces[k]);
        if (strcmp(d.log, want) != 0)
            fprintf(stderr, "pieces of %zu bytes\n", pieces[k]);
        CHECK_EQ_STR(d.log, want);
        CHECK(d.image_len == want_len && memcmp(d.image, want_image, want_len) == 0);
        drv_free(&d);
    }
    free(want_image);
    free(body);
}

/* ---- the rules on their own (the JSON-array mode uses them) ---- */

static void test_check_functions(void)
{
    ji_error_t err;
    ji_error_clear(&err);
    CHECK_EQ_INT(ji_record_check_name("vladimir", 8, 3, &err), 0);
    CHECK_EQ_INT(err.kind, JI_ERR_NONE);
    CHECK_EQ_INT(ji_record_check_email("someone@gmail.com", 17, 3, &err), 0);

    CHECK_EQ_INT(ji_record_check_name("", 0, 3, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_INVALID);
    CHECK_EQ_INT(err.line, 3);
    CHECK_EQ_STR(err.field, "name");
    CHECK_EQ_STR(err.message, "name is empty");

    CHECK_EQ_INT(ji_record_check_name("a\0b", 3, 4, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_INVALID);
    CHECK_EQ_STR(err.message, "name contains a NUL character");
    CHECK_EQ_INT(ji_record_check_email("a@b\0", 4, 4, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_INVALID);
    CHECK_EQ_STR(err.field, "email");

    CHECK_EQ_INT(ji_record_check_name("\xed\xa0\x80", 3, 5, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_MALFORMED);
    CHECK_EQ_STR(err.message, "invalid UTF-8");
    CHECK_EQ_INT(err.line, 5);
    CHECK_EQ_INT(ji_record_check_email("a@\xc0\xaf", 4, 5, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_MALFORMED);

    size_t len;
    char *s = repeat("", "\xe6\x97\xa5", 255, "", &len);
    CHECK_EQ_INT(ji_record_check_name(s, len, 1, &err), 0);
    free(s);
    s = repeat("", "\xe6\x97\xa5", 256, "", &len);
    CHECK_EQ_INT(ji_record_check_name(s, len, 1, &err), -1);
    CHECK_EQ_STR(err.message, "name is longer than 255 characters");
    free(s);

    static const char *const bad_emails[] = {"ab", "a@@b", "@b", "a@", "@", "a@b@c", "@@"};
    for (size_t i = 0; i < sizeof(bad_emails) / sizeof(bad_emails[0]); i++) {
        CHECK_EQ_INT(ji_record_check_email(bad_emails[i], strlen(bad_emails[i]), 9, &err), -1);
        CHECK_EQ_INT(err.kind, JI_ERR_INVALID);
        CHECK_EQ_STR(err.message, "email must contain exactly one '@' with text on both sides");
    }
    static const char *const good_emails[] = {"a@b", "x.y+z@example.org", "\xc3\xa9@\xc3\xa9", "a b@c d"};
    for (size_t i = 0; i < sizeof(good_emails) / sizeof(good_emails[0]); i++)
        CHECK_EQ_INT(ji_record_check_email(good_emails[i], strlen(good_emails[i]), 9, &err), 0);
}

/* ---- nesting: JI_MAX_JSON_DEPTH levels pass, one more is 400 with the line ---- */

#define DEPTH_MESSAGE "record nested deeper than JI_MAX_JSON_DEPTH (" JI_STR(JI_MAX_JSON_DEPTH) ")"

/* A record whose member "x" holds `levels` containers (`open` then `close`, each 1 byte): levels + 1 in all. */
static char *nested_record(size_t levels, char open, char close, size_t *len)
{
    const char *head = "{\"name\":\"n\",\"email\":\"e@x\",\"x\":";
    size_t hl = strlen(head), n = 0;
    char *s = malloc(hl + levels * 6 + 8);

    memcpy(s, head, hl);
    n = hl;
    for (size_t i = 0; i < levels; i++) {
        if (open == '{') {
            memcpy(s + n, "{\"k\":", 5);
            n += 5;
        } else {
            s[n++] = open;
        }
    }
    if (open == '{')
        s[n++] = '1';
    for (size_t i = 0; i < levels; i++)
        s[n++] = close;
    memcpy(s + n, "}\n", 3);
    n += 2;
    *len = n;
    return s;
}

static void test_depth(void)
{
    static const char brackets[][2] = {{'[', ']'}, {'{', '}'}};
    size_t len;
    char *s;

    for (size_t b = 0; b < 2; b++) {
        /* the record's own object is level 1: JI_MAX_JSON_DEPTH - 1 more levels are fine */
        s = nested_record(JI_MAX_JSON_DEPTH - 1, brackets[b][0], brackets[b][1], &len);
        CHECK_EQ_INT(check_both(s, len, "R1:n/e@x/0|", "64 levels"), 0);
        free(s);
        s = nested_record(JI_MAX_JSON_DEPTH, brackets[b][0], brackets[b][1], &len);
        CHECK_EQ_INT(check_both(s, len, "E1:400::" DEPTH_MESSAGE "|", "65 levels"), 0);
        free(s);
    }
    /* a top-level value deeper than the limit is refused as not an object first */
    CHECK_EQ_INT(check_both("[[[[]]]]\n", 9, "E1:400::expected a JSON object, found an array|", "array line"), 0);

    /* the body that crashed the array mode, as a member of a record on line 2 of 3: refused, the rest goes on */
    {
        const char *first = "{\"name\":\"a\",\"email\":\"a@b\"}\n", *last = "{\"name\":\"c\",\"email\":\"c@d\"}\n";
        size_t levels = 300000, fl = strlen(first), ll = strlen(last), n;
        char *deep = nested_record(levels, '[', ']', &n);
        char *body = malloc(fl + n + ll);
        memcpy(body, first, fl);
        memcpy(body + fl, deep, n);
        memcpy(body + fl + n, last, ll);
        char *got = run(body, fl + n + ll, true, fl + n + ll, 0);
        CHECK_EQ_STR(got, "R1:a/a@b/0|E2:400::" DEPTH_MESSAGE "|R3:c/c@d/0|");
        free(got);
        got = run(body, fl + n + ll, false, fl + 10, 0);
        CHECK_EQ_STR(got, "R1:a/a@b/0|E2:400::" DEPTH_MESSAGE "|S2|");
        free(got);
        free(body);
        free(deep);
    }
}

/* The record parser and the array pre-scan draw the line at the same depth. */
static void test_depth_agrees_with_prescan(void)
{
    for (size_t levels = JI_MAX_JSON_DEPTH - 3; levels <= JI_MAX_JSON_DEPTH + 3; levels++) {
        size_t len;
        char *s = nested_record(levels, levels % 2 ? '[' : '{', levels % 2 ? ']' : '}', &len);
        ji_array_scan_t scan;
        ji_array_scan_init(&scan, JI_MAX_JSON_DEPTH, UINT64_MAX);
        int scanned = ji_array_scan_feed(&scan, s, len);
        char *got = run(s, len, true, len, 0);
        bool parser_refused = strstr(got, DEPTH_MESSAGE) != NULL;
        CHECK_EQ_INT(scanned != 0, parser_refused);
        CHECK_EQ_INT(scan.stop == JI_ARRAY_SCAN_TOO_DEEP, levels + 1 > JI_MAX_JSON_DEPTH);
        free(got);
        free(s);
    }
}

UNIT_MAIN("record_parser", {"cases", test_cases}, {"lengths", test_lengths}, {"skip_mode", test_skip_mode},
          {"handler_results", test_handler_results}, {"api", test_api}, {"many_records", test_many_records},
          {"big_image", test_big_image}, {"long_strings_in_fragments", test_long_strings_in_fragments},
          {"check_functions", test_check_functions}, {"depth", test_depth},
          {"depth_agrees_with_prescan", test_depth_agrees_with_prescan})
