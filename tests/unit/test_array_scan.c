/*
 * test_array_scan.c — the pre-scan of JSON-array bodies: values, elements and nesting counted across strings and
 * escapes, the stops (too deep, too many values, a comment) with their offset and element, the same result
 * however the text is cut, and the tree estimate checked against what yajl_tree_parse really allocates.
 */
#include "array_scan.h"

#include <malloc.h>
#include <stdlib.h>
#include <yajl/yajl_tree.h>

#include "unit.h"

#ifdef __SANITIZE_ADDRESS__
/* ASan replaces malloc: its own count of the bytes asked for (smaller than glibc's chunks, still an upper bound) */
size_t __sanitizer_get_current_allocated_bytes(void);
#define ALLOCATOR "ASan"
/* yajl grows arrays one slot at a time and ASan's realloc always copies: keep the arrays short */
#define TREE_ELEMENTS 5000
static size_t heap_in_use(void)
{
    return __sanitizer_get_current_allocated_bytes();
}
#else
#define ALLOCATOR "glibc"
#define TREE_ELEMENTS 200000
static size_t heap_in_use(void)
{
    struct mallinfo2 m = mallinfo2();
    return m.uordblks + m.hblkhd;
}
#endif

static ji_array_scan_t scan_whole(const char *s, size_t len, size_t max_depth, uint64_t max_values, int *rc)
{
    ji_array_scan_t scan;
    ji_array_scan_init(&scan, max_depth, max_values);
    *rc = ji_array_scan_feed(&scan, s, len);
    return scan;
}

static bool same_scan(const ji_array_scan_t *a, const ji_array_scan_t *b)
{
    return a->values == b->values && a->elements == b->elements && a->depth == b->depth && a->deepest == b->deepest &&
           a->longest_escaped == b->longest_escaped && a->stop == b->stop && a->stop_offset == b->stop_offset &&
           a->stop_element == b->stop_element && (a->stop != JI_ARRAY_SCAN_OK || a->scanned == b->scanned);
}

/* The scan of `s` cut at every byte, and in 1-byte pieces, equals the scan of `s` whole. Returns mismatches. */
static int check_cuts(const char *s, size_t max_depth, uint64_t max_values)
{
    size_t len = strlen(s);
    int rc, wrong = 0;
    ji_array_scan_t whole = scan_whole(s, len, max_depth, max_values, &rc);

    for (size_t cut = 0; cut <= len + 1; cut++) {
        ji_array_scan_t scan;
        ji_array_scan_init(&scan, max_depth, max_values);
        if (cut <= len) {
            if (ji_array_scan_feed(&scan, s, cut) == 0 && ji_array_scan_feed(&scan, s + cut, len - cut) != 0)
                CHECK(scan.stop != JI_ARRAY_SCAN_OK);
        } else {
            for (size_t i = 0; i < len; i++)
                if (ji_array_scan_feed(&scan, s + i, 1) != 0)
                    break;
        }
        if (!same_scan(&whole, &scan) && wrong++ == 0)
            fprintf(stderr, "cut %zu of %s: values %llu/%llu stop %d/%d\n", cut, s, (unsigned long long)whole.values,
                    (unsigned long long)scan.values, (int)whole.stop, (int)scan.stop);
    }
    return wrong;
}

static void test_counts(void)
{
    int rc;
    const char *s = "[0,{},[],\"a\",true,null,-1.5e3,{\"k\":\"v\"}]";
    ji_array_scan_t scan = scan_whole(s, strlen(s), 65, UINT64_MAX, &rc);

    CHECK_EQ_INT(rc, 0);
    CHECK_EQ_INT(scan.stop, JI_ARRAY_SCAN_OK);
    CHECK_EQ_INT(scan.values, 11); /* the array, 8 elements, a member name and its value */
    CHECK_EQ_INT(scan.elements, 8);
    CHECK_EQ_INT(scan.deepest, 2);
    CHECK_EQ_INT(scan.depth, 0);
    CHECK_EQ_INT(scan.longest_escaped, 0);
    CHECK_EQ_INT(scan.scanned, strlen(s));

    /* brackets, quotes, commas and slashes inside strings are string bytes */
    s = " [ \"[[[{\" , \"a\\\"]]/,\" ,\"\\\\\", \"//\" ] ";
    scan = scan_whole(s, strlen(s), 65, UINT64_MAX, &rc);
    CHECK_EQ_INT(rc, 0);
    CHECK_EQ_INT(scan.values, 5);
    CHECK_EQ_INT(scan.elements, 4);
    CHECK_EQ_INT(scan.deepest, 1);
    CHECK_EQ_INT(scan.longest_escaped, strlen("\"a\\\"]]/,\""));

    /* whitespace of every kind yajl skips separates bare tokens */
    s = "[1\t2\n3\r4\v5\f6 7]";
    scan = scan_whole(s, strlen(s), 65, UINT64_MAX, &rc);
    CHECK_EQ_INT(scan.values, 8);
    CHECK_EQ_INT(scan.elements, 7);

    /* elements are counted at depth 1 only; more closers than openers stay at depth 0 */
    s = "]]] [[1,2],[3]] {\"a\":[4]}";
    scan = scan_whole(s, strlen(s), 65, UINT64_MAX, &rc);
    CHECK_EQ_INT(rc, 0);
    CHECK_EQ_INT(scan.elements, 2 + 2); /* [1,2] and [3]; then "a" and [4] inside the object at depth 1 */
    CHECK_EQ_INT(scan.depth, 0);
}

static void test_depth(void)
{
    int rc;
    char s[200];
    size_t n = 0;

    /* [ {}, [[...]] ] with the second element nested to depth 66 */
    n += (size_t)snprintf(s + n, sizeof(s) - n, "[{},");
    for (int i = 0; i < 65; i++)
        s[n++] = '[';
    for (int i = 0; i < 65; i++)
        s[n++] = ']';
    s[n++] = ']';
    s[n] = '\0';

    ji_array_scan_t scan = scan_whole(s, n, JI_MAX_JSON_DEPTH + 2, UINT64_MAX, &rc);
    CHECK_EQ_INT(rc, 0);
    CHECK_EQ_INT(scan.deepest, 66);
    scan = scan_whole(s, n, JI_MAX_JSON_DEPTH + 1, UINT64_MAX, &rc);
    CHECK_EQ_INT(rc, -1);
    CHECK_EQ_INT(scan.stop, JI_ARRAY_SCAN_TOO_DEEP);
    CHECK_EQ_INT(scan.stop_element, 2);
    CHECK_EQ_INT(scan.stop_offset, 4 + 64); /* the 66th '[' */
    CHECK_EQ_INT(scan.scanned, 4 + 65);
    CHECK_EQ_INT(check_cuts(s, JI_MAX_JSON_DEPTH + 1, UINT64_MAX), 0);

    /* nothing is scanned after a stop */
    CHECK_EQ_INT(ji_array_scan_feed(&scan, "[", 1), -1);
    CHECK_EQ_INT(scan.scanned, 4 + 65);

    /* a top-level container deeper than a limit of 0 lies in no element */
    scan = scan_whole("[", 1, 0, UINT64_MAX, &rc);
    CHECK_EQ_INT(scan.stop, JI_ARRAY_SCAN_TOO_DEEP);
    CHECK_EQ_INT(scan.stop_element, 0);

    /* the body of the crash: 300,000 '[' then 300,000 ']' stops at the 66th byte, element 1 */
    {
        size_t levels = 300000;
        char *deep = malloc(2 * levels);
        memset(deep, '[', levels);
        memset(deep + levels, ']', levels);
        scan = scan_whole(deep, 2 * levels, JI_MAX_JSON_DEPTH + 1, UINT64_MAX, &rc);
        CHECK_EQ_INT(rc, -1);
        CHECK_EQ_INT(scan.stop, JI_ARRAY_SCAN_TOO_DEEP);
        CHECK_EQ_INT(scan.stop_offset, JI_MAX_JSON_DEPTH + 1);
        CHECK_EQ_INT(scan.stop_element, 1);
        free(deep);
    }
}

static void test_too_many(void)
{
    int rc;
    const char *s = "[1,\"two\",{\"k\":[]}]";
    ji_array_scan_t scan = scan_whole(s, strlen(s), 65, 6, &rc);

    CHECK_EQ_INT(rc, 0);
    CHECK_EQ_INT(scan.values, 6);
    scan = scan_whole(s, strlen(s), 65, 5, &rc);
    CHECK_EQ_INT(rc, -1);
    CHECK_EQ_INT(scan.stop, JI_ARRAY_SCAN_TOO_MANY);
    CHECK_EQ_INT(scan.stop_offset, strlen("[1,\"two\",{\"k\":"));
    CHECK_EQ_INT(scan.stop_element, 3);
    CHECK_EQ_INT(check_cuts(s, 65, 5), 0);
    CHECK_EQ_INT(check_cuts(s, 65, 3), 0);
}

static void test_comments(void)
{
    int rc;
    /* a comment hiding a quote would make the tokenizer lose track of the nesting: refused at the '/' */
    const char *s = "[1 /* \" */, [[[[ /* \" */ ]]]]]";
    ji_array_scan_t scan = scan_whole(s, strlen(s), 65, UINT64_MAX, &rc);

    CHECK_EQ_INT(rc, -1);
    CHECK_EQ_INT(scan.stop, JI_ARRAY_SCAN_COMMENT);
    CHECK_EQ_INT(scan.stop_offset, 3);
    CHECK_EQ_INT(scan.stop_element, 1);
    scan = scan_whole("[1]\n// c", 8, 65, UINT64_MAX, &rc);
    CHECK_EQ_INT(scan.stop, JI_ARRAY_SCAN_COMMENT);
    CHECK_EQ_INT(scan.stop_element, 0);
}

static void test_cuts(void)
{
    static const char *const texts[] = {
        "[0,{},[],\"a\",true,null,-1.5e3,{\"k\":\"v\"}]",
        "[\"a\\\\\",\"\\\"\",\"\\u00e9\\ud83d\\ude00\",{\"n\\\"ame\":[\"x\\\\\\\"y\"]}]",
        "[[[[[[[[[[]]]]]]]]]]",
        "[{\"name\":\"a\",\"email\":\"a@b\",\"image\":\"aGVsbG8=\"},{\"name\":\"b\",\"email\":\"b@c\",\"image\":null}]",
        "[12345678901234567890, -0.5e-7, truefalse, \"unterminated",
        "[1 /* \" */ ]",
    };
    for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
        CHECK_EQ_INT(check_cuts(texts[i], 65, UINT64_MAX), 0);
        CHECK_EQ_INT(check_cuts(texts[i], 3, UINT64_MAX), 0);
        CHECK_EQ_INT(check_cuts(texts[i], 65, 4), 0);
    }
}

/* Builds "[unit,unit,...]" of n elements. */
static char *array_of(const char *unit, size_t n, size_t *len)
{
    size_t ul = strlen(unit), o = 0;
    char *s = malloc(n * (ul + 1) + 3);
    s[o++] = '[';
    for (size_t i = 0; i < n; i++) {
        if (i > 0)
            s[o++] = ',';
        memcpy(s + o, unit, ul);
        o += ul;
    }
    s[o++] = ']';
    s[o] = '\0';
    *len = o;
    return s;
}

/* What yajl_tree_parse holds once it has built the tree of `text`. */
static size_t tree_heap_bytes(const char *text)
{
    char msg[128];
    size_t before = heap_in_use(), after;
    yajl_val root = yajl_tree_parse(text, msg, sizeof(msg));

    after = heap_in_use();
    CHECK(root != NULL);
    yajl_tree_free(root);
    return after > before ? after - before : 0;
}

static void test_tree_estimate(void)
{
    /* the shapes of the measurement in service_limits.h, and a few more */
    static const char *const units[] = {
        "0",
        "{}",
        "[]",
        "\"a\"",
        "\"\"",
        "true",
        "123456789",
        "{\"a\":0}",
        "[0,0,0,0]",
        "{\"name\":\"a\",\"email\":\"b@c\",\"image\":null}",
        "\"aaaaaaaaaaaaaaaaaaaaaaaaa\"",
        "{\"aaaaaaaaaaaaaaaaaaaaaaaaaa\":1}",
        "{\"k\":{\"k\":{\"k\":[1,[2,[3]]]}}}",
        "\"\\u00e9\\n\\\"\"",
        "{\"name\":\"n\",\"email\":\"e@x\",\"image\":\"aGVsbG8gd29ybGQgaGVsbG8gd29ybGQgaGVsbG8gd29ybGQ=\"}",
    };
    size_t n = TREE_ELEMENTS, worst_unit = 0;
    double worst = 0;

    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        size_t len;
        char *text = array_of(units[i], n, &len);
        int rc;
        ji_array_scan_t scan = scan_whole(text, len, 65, UINT64_MAX, &rc);
        uint64_t estimate = ji_array_scan_tree_bytes(&scan);
        size_t real = tree_heap_bytes(text);

        CHECK_EQ_INT(rc, 0);
        if (real > estimate)
            fprintf(stderr, "tree of [%s x %zu]: %zu bytes (%s), estimate %llu\n", units[i], n, real, ALLOCATOR,
                    (unsigned long long)estimate);
        CHECK(real <= estimate);
#ifndef __SANITIZE_ADDRESS__
        /* and not so loose that it refuses what fits: within 2x of glibc's real cost for these shapes */
        CHECK(estimate <= 2 * (uint64_t)real + 4096);
#endif
        if ((double)real / (double)estimate > worst) {
            worst = (double)real / (double)estimate;
            worst_unit = i;
        }
        free(text);
    }
    fprintf(stderr, "tightest: [%s ...] uses %.0f%% of its estimate (%s)\n", units[worst_unit], worst * 100, ALLOCATOR);

    /* one long string with escapes: its copy in the tree plus the decode buffer */
    {
        size_t len = 1u << 20;
        char *text = malloc(len + 5);
        text[0] = '[';
        text[1] = '"';
        for (size_t i = 2; i < len + 2; i += 2)
            memcpy(text + i, "\\n", 2);
        memcpy(text + len + 2, "\"]", 3);
        int rc;
        ji_array_scan_t scan = scan_whole(text, len + 4, 65, UINT64_MAX, &rc);
        CHECK_EQ_INT(scan.longest_escaped, len + 2);
        CHECK(tree_heap_bytes(text) <= ji_array_scan_tree_bytes(&scan));
        free(text);
    }
}

UNIT_MAIN("array_scan", {"counts", test_counts}, {"depth", test_depth}, {"too_many", test_too_many},
          {"comments", test_comments}, {"cuts", test_cuts}, {"tree_estimate", test_tree_estimate})
