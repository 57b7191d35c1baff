/* test_escape_scan.c — bad `\u` escapes found in raw JSON text, whole and cut at every place. */
#include "escape_scan.h"

#include <stdlib.h>

#include "unit.h"

#define NONE SIZE_MAX
static const char NUL_WHY[] = "\\u0000 escape";
static const char SUR_WHY[] = "unpaired surrogate escape";

typedef struct {
    const char *text;
    size_t bad_at;
    const char *why;
} scan_case_t;

static const scan_case_t cases[] = {
    {"\"abc\"", NONE, NULL},
    {"{\"a\":\"x\\\"y\\\\z\\/w\\n\\t\\b\\f\\r\"}", NONE, NULL},
    {"\"\\u0000\"", 1, NUL_WHY},
    {"\"ab\\u0000\"", 3, NUL_WHY},
    {"\"\\\\u0000\"", NONE, NULL}, /* escaped backslash, then plain "u0000" */
    {"\"\\\\ud800\"", NONE, NULL},
    {"\"\\f0000\\bdc00\"", NONE, NULL}, /* one-letter escapes followed by hex-looking text */
    {"\"\\\\\\u0000\"", 3, NUL_WHY},    /* \\ then \u0000 */
    {"\"\\\\\\\\u0000\"", NONE, NULL},  /* \\\\ then plain text */
    {"\"\\u0041\\u00e9\\u20AC\"", NONE, NULL},
    {"\"\\ud800\"", 1, SUR_WHY}, /* lone high, then the closing quote */
    {"\"\\uDBFF\"", 1, SUR_WHY},
    {"\"\\udc00\"", 1, SUR_WHY}, /* lone low */
    {"\"\\uDFFF\"", 1, SUR_WHY},
    {"\"\\ud83d\\ude00\"", NONE, NULL}, /* a proper pair */
    {"\"\\uD83D\\uDE00\"", NONE, NULL},
    {"\"\\udbff\\udfff\"", NONE, NULL},
    {"\"\\ud800\\u0041\"", 1, SUR_WHY},        /* high then a non-surrogate escape */
    {"\"\\ud800\\ud800\\udc00\"", 1, SUR_WHY}, /* the first high is unpaired */
    {"\"\\ud800\\u0000\"", 1, SUR_WHY},
    {"\"\\ud800\\n\"", 1, SUR_WHY},      /* high then another escape */
    {"\"\\ud800\\\\\"", 1, SUR_WHY},     /* high then an escaped backslash */
    {"\"\\ud800x\\udc00\"", 1, SUR_WHY}, /* high then plain text */
    {"\"\\udc00\\ud800\"", 1, SUR_WHY},  /* low then high: both unpaired, the first counts */
    {"\"\\u0000\\ud800\"", 1, NUL_WHY},
    {"\"ok\\u00e9\\u0000\"", 9, NUL_WHY},
    {"{\"k\\u0000\":1}", 3, NUL_WHY}, /* keys too */
    {"\"\\u12\"", NONE, NULL},        /* not a \u escape yajl accepts; yajl reports that itself */
    {"\"\\u12\\u0000\"", 5, NUL_WHY}, /* ...and a backslash cutting it starts the next escape */
    {"\"\\ud800\\uZZZZ\"", 1, SUR_WHY},
    {"\"a\" \"\\ud83d\" \"\\ude00\"", 5, SUR_WHY}, /* a pair across two strings is no pair */
};

/* Feeds `text` cut at `cut1` and `cut2` (cut1 <= cut2), then finishes. */
static void scan_cut(ji_escape_scan_t *s, const char *text, size_t cut1, size_t cut2)
{
    size_t len = strlen(text);
    ji_escape_scan_reset(s);
    ji_escape_scan_feed(s, text, cut1);
    ji_escape_scan_feed(s, text + cut1, cut2 - cut1);
    ji_escape_scan_feed(s, text + cut2, len - cut2);
    ji_escape_scan_finish(s);
}

static bool same(const ji_escape_scan_t *s, const scan_case_t *c)
{
    if (s->bad_at != c->bad_at)
        return false;
    if (c->why == NULL)
        return s->why == NULL;
    return s->why != NULL && strcmp(s->why, c->why) == 0;
}

static void test_cases_whole(void)
{
    ji_escape_scan_t s;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        size_t len = strlen(cases[i].text);
        scan_cut(&s, cases[i].text, len, len);
        if (!same(&s, &cases[i]))
            fprintf(stderr, "case %zu: %s -> bad_at %zu why %s\n", i, cases[i].text, s.bad_at,
                    s.why ? s.why : "(null)");
        CHECK(same(&s, &cases[i]));
        CHECK_EQ_INT(s.offset, len);
    }
}

/* Every way to cut each case in up to three fragments: the verdict never changes. */
static void test_cases_cut_everywhere(void)
{
    ji_escape_scan_t s;
    long wrong = 0;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        size_t len = strlen(cases[i].text);
        for (size_t a = 0; a <= len; a++) {
            for (size_t b = a; b <= len; b++) {
                scan_cut(&s, cases[i].text, a, b);
                if (!same(&s, &cases[i])) {
                    if (wrong++ < 5)
                        fprintf(stderr, "case %zu cut %zu,%zu: bad_at %zu\n", i, a, b, s.bad_at);
                }
            }
        }
    }
    CHECK_EQ_INT(wrong, 0);
}

static void test_one_byte_pieces(void)
{
    ji_escape_scan_t s;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *t = cases[i].text;
        ji_escape_scan_reset(&s);
        for (size_t k = 0; t[k] != '\0'; k++)
            ji_escape_scan_feed(&s, t + k, 1);
        ji_escape_scan_finish(&s);
        CHECK(same(&s, &cases[i]));
    }
}

/* A high surrogate cut off by the end of the line is judged unpaired; a cut `\u00` is left to yajl. */
static void test_finish(void)
{
    ji_escape_scan_t s;
    ji_escape_scan_reset(&s);
    ji_escape_scan_feed(&s, "\"x\\ud800", 8);
    CHECK_EQ_INT(s.bad_at, NONE);
    ji_escape_scan_finish(&s);
    CHECK_EQ_INT(s.bad_at, 2);
    CHECK_EQ_STR(s.why, SUR_WHY);

    ji_escape_scan_reset(&s);
    ji_escape_scan_feed(&s, "\"x\\ud800\\udc", 12);
    ji_escape_scan_finish(&s);
    CHECK_EQ_INT(s.bad_at, 2);

    ji_escape_scan_reset(&s);
    ji_escape_scan_feed(&s, "\"x\\u00", 6);
    ji_escape_scan_finish(&s);
    CHECK_EQ_INT(s.bad_at, NONE);

    /* reset forgets everything, pending bytes included */
    ji_escape_scan_reset(&s);
    ji_escape_scan_feed(&s, "\"\\ud8", 5);
    ji_escape_scan_reset(&s);
    ji_escape_scan_feed(&s, "00\"", 3);
    ji_escape_scan_finish(&s);
    CHECK_EQ_INT(s.bad_at, NONE);
    CHECK_EQ_INT(s.offset, 3);
}

/* Offsets count from the start of the line across fragments, past a long backslash-free run. */
static void test_offsets_in_big_text(void)
{
    size_t n = 1 << 20;
    char *big = malloc(n + 16);
    memset(big, 'A', n);
    memcpy(big + n, "\\u0000\"", 7);
    ji_escape_scan_t s;
    ji_escape_scan_reset(&s);
    ji_escape_scan_feed(&s, "{\"image\":\"", 10);
    for (size_t off = 0; off < n + 7; off += 4096) {
        size_t len = n + 7 - off < 4096 ? n + 7 - off : 4096;
        ji_escape_scan_feed(&s, big + off, len);
    }
    ji_escape_scan_finish(&s);
    CHECK_EQ_INT(s.bad_at, 10 + n);
    CHECK_EQ_STR(s.why, NUL_WHY);
    CHECK_EQ_INT(s.offset, 10 + n + 7);

    /* the first bad escape stays the one reported */
    ji_escape_scan_reset(&s);
    ji_escape_scan_feed(&s, "\"\\udc00\"", 8);
    ji_escape_scan_feed(&s, "\"\\u0000\"", 8);
    CHECK_EQ_INT(s.bad_at, 1);
    CHECK_EQ_STR(s.why, SUR_WHY);
    free(big);
}

UNIT_MAIN("escape_scan", {"cases_whole", test_cases_whole}, {"cases_cut_everywhere", test_cases_cut_everywhere},
          {"one_byte_pieces", test_one_byte_pieces}, {"finish", test_finish},
          {"offsets_in_big_text", test_offsets_in_big_text})
