/*
 * fuzz_array.c — libFuzzer target over the checks of the JSON-array mode that run before and beside yajl's tree:
 * the pre-scan (src/array_scan.c: nesting, values, elements, comments, the tree estimate) and the record rules,
 * without sockets, files or PostgreSQL. Built like fuzz_records.c (clang -fsanitize=fuzzer,address,undefined)
 * from fuzz/fuzz_array.c src/array_scan.c src/record_parser.c src/escape_scan.c src/utf8.c src/common.c, linked
 * with yajl.
 *
 * The fuzz input is a request body. For each input:
 *
 *   1. the scan of the body whole is the reference; scans of the same body cut into random pieces (a PRNG seeded
 *      with a hash of the input) must give exactly the same result;
 *   2. a scan with a random cap on values stops at value cap + 1, or agrees with the reference when under it;
 *   3. when the scan passes and yajl_tree_parse accepts the body, the tree must have as many values (nodes and
 *      member names) as counted, the nesting measured, as many elements as counted for a top-level array, and must
 *      have allocated no more than ji_array_scan_tree_bytes() says (ASan's count of bytes in use);
 *   4. when the scan stops for depth and yajl accepts the body, the first too-deep element of the tree is the one
 *      the scan named;
 *   5. every element's name and email go through the array mode's field rules, and what they accept is valid;
 *   6. the cursor over the array's element texts (the array mode's dead letters) agrees with the tree;
 *   7. the body read as JSON Lines: on every line the record parser and the scan draw the nesting line at the same
 *      depth (JI_MAX_JSON_DEPTH): the parser's depth error only where the scan stops for depth, and no record the
 *      parser accepts nests deeper.
 *
 * A broken check aborts (a crash for libFuzzer); so do ASan, UBSan and leaks. Inputs are at most a few KiB
 * (-max_len), so even the too-deep ones are safe to hand to yajl_tree_parse here.
 *
 * Build and run like fuzz_records: scripts/fuzz builds every fuzz/fuzz_*.c; corpus: fuzz/corpus/array/.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yajl/yajl_tree.h>

#include "array_scan.h"
#include "record_parser.h"
#include "utf8.h"

#define FZ_CHECK(cond)                                                                                                 \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "fuzz_array: check failed at %s:%d: %s\n", __FILE__, __LINE__, #cond);                     \
            abort();                                                                                                   \
        }                                                                                                              \
    } while (0)

/** The array mode's depth: the outer array is one level above its elements, the records. */
#define ARRAY_DEPTH (JI_MAX_JSON_DEPTH + 1)
#define DEPTH_MESSAGE "record nested deeper than JI_MAX_JSON_DEPTH (" JI_STR(JI_MAX_JSON_DEPTH) ")"

#ifdef __SANITIZE_ADDRESS__
#define FZ_HAVE_HEAP_COUNT 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FZ_HAVE_HEAP_COUNT 1
#endif
#endif
#ifdef FZ_HAVE_HEAP_COUNT
size_t __sanitizer_get_current_allocated_bytes(void);
#endif

/* ------------------------------------------------------------------ element texts */

/*
 * The cursor that finds a rejected element's bytes (ji_array_elements_next, the dead letters of the array mode):
 * over an array yajl accepted it gives as many elements as the tree has, each non-empty, inside the text, in
 * order, and each one parses alone to a value of the same type.
 */
static void check_element_texts(const char *text, size_t len, yajl_val root)
{
    ji_array_elements_t c = {0};
    const char *start, *prev_end = text;
    size_t n = 0, elen;
    char msg[128];

    while (ji_array_elements_next(&c, text, len, &start, &elen)) {
        FZ_CHECK(n < root->u.array.len);
        FZ_CHECK(elen > 0 && start >= prev_end && start + elen <= text + len);
        char *one = malloc(elen + 1);
        FZ_CHECK(one != NULL);
        memcpy(one, start, elen);
        one[elen] = '\0';
        yajl_val v = yajl_tree_parse(one, msg, sizeof(msg));
        free(one);
        if (v != NULL) { /* a lone string or number may need what follows it to end: only types are compared */
            FZ_CHECK(v->type == root->u.array.values[n]->type);
            yajl_tree_free(v);
        }
        prev_end = start + elen;
        n++;
    }
    FZ_CHECK(n == root->u.array.len);
}

/* ------------------------------------------------------------------ small tools */

static uint64_t fnv1a(const void *p, size_t n)
{
    const unsigned char *s = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static uint64_t prng_next(uint64_t *s)
{
    uint64_t x = (*s += 0x9e3779b97f4a7c15ull); /* splitmix64 */
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static bool same_scan(const ji_array_scan_t *a, const ji_array_scan_t *b)
{
    return a->values == b->values && a->elements == b->elements && a->depth == b->depth && a->deepest == b->deepest &&
           a->longest_escaped == b->longest_escaped && a->scanned == b->scanned && a->stop == b->stop &&
           a->stop_offset == b->stop_offset && a->stop_element == b->stop_element;
}

static ji_array_scan_t scan_pieces(const uint8_t *data, size_t size, size_t max_depth, uint64_t max_values,
                                   uint64_t *rng)
{
    ji_array_scan_t s;
    size_t off = 0;

    ji_array_scan_init(&s, max_depth, max_values);
    while (off < size) {
        uint64_t x = prng_next(rng);
        size_t n = x % 4 == 0 ? 1 : 1 + (size_t)((x >> 8) % (size - off));
        if (n > size - off)
            n = size - off;
        if (ji_array_scan_feed(&s, (const char *)data + off, n) != 0)
            break;
        off += n;
    }
    return s;
}

/* ------------------------------------------------------------------ the tree */

typedef struct {
    uint64_t values;
    size_t deepest;
} tree_stats_t;

static void walk(yajl_val v, size_t depth, tree_stats_t *t)
{
    t->values++;
    if (YAJL_IS_OBJECT(v)) {
        if (depth + 1 > t->deepest)
            t->deepest = depth + 1;
        t->values += v->u.object.len; /* member names */
        for (size_t i = 0; i < v->u.object.len; i++)
            walk(v->u.object.values[i], depth + 1, t);
    } else if (YAJL_IS_ARRAY(v)) {
        if (depth + 1 > t->deepest)
            t->deepest = depth + 1;
        for (size_t i = 0; i < v->u.array.len; i++)
            walk(v->u.array.values[i], depth + 1, t);
    }
}

/* The array mode's field rules on one element (array_mode.c read_element): what they accept is valid. */
static void check_element(yajl_val v, uint64_t line)
{
    ji_error_t err;

    if (!YAJL_IS_OBJECT(v))
        return;
    for (size_t i = 0; i < v->u.object.len; i++) {
        const char *k = v->u.object.keys[i];
        yajl_val s = v->u.object.values[i];
        bool is_name = strcmp(k, "name") == 0 || strcmp(k, "user") == 0 || strcmp(k, "username") == 0;
        if (!YAJL_IS_STRING(s) || (!is_name && strcmp(k, "email") != 0))
            continue;
        size_t len = strlen(s->u.string);
        memset(&err, 0, sizeof(err));
        int r = is_name ? ji_record_check_name(s->u.string, len, line, &err)
                        : ji_record_check_email(s->u.string, len, line, &err);
        if (r != 0) {
            FZ_CHECK(err.kind == JI_ERR_INVALID || err.kind == JI_ERR_MALFORMED);
            FZ_CHECK(err.line == line && err.message[0] != '\0');
            continue;
        }
        FZ_CHECK(len > 0 && ji_utf8_valid(s->u.string, len));
        FZ_CHECK(ji_utf8_chars(s->u.string, len) <= JI_MAX_FIELD_CHARS);
        if (!is_name) {
            const char *at = strchr(s->u.string, '@');
            FZ_CHECK(at != NULL && at > s->u.string && at[1] != '\0' && strchr(at + 1, '@') == NULL);
        }
    }
}

/* 3, 4, 5: the scan against the tree yajl builds from the same text. */
static void check_tree(const uint8_t *data, size_t size, const ji_array_scan_t *ref)
{
    char *text, msg[128];
    yajl_val root;
    size_t before = 0, after = 0;

    if (memchr(data, '\0', size) != NULL)
        return; /* yajl_tree_parse reads a C string; the array mode refuses NUL first */
    if (ref->stop != JI_ARRAY_SCAN_OK && ref->stop != JI_ARRAY_SCAN_TOO_DEEP)
        return;
    FZ_CHECK((text = malloc(size + 1)) != NULL);
    memcpy(text, data, size);
    text[size] = '\0';
#ifdef FZ_HAVE_HEAP_COUNT
    before = __sanitizer_get_current_allocated_bytes();
#endif
    root = yajl_tree_parse(text, msg, sizeof(msg));
#ifdef FZ_HAVE_HEAP_COUNT
    after = __sanitizer_get_current_allocated_bytes();
#endif
    free(text);
    if (root == NULL)
        return;
    if (ref->stop == JI_ARRAY_SCAN_OK) {
        tree_stats_t t = {0, 0};
        walk(root, 0, &t);
        /* yajl_complete_parse leaves a string still open after the top-level value alone (yajl 2.1): counted by
           the scan, not built */
        FZ_CHECK(t.values == ref->values || (ref->in_string && t.values == ref->values - 1));
        FZ_CHECK(t.deepest == ref->deepest);
        FZ_CHECK(ref->depth == 0);
        if (YAJL_IS_ARRAY(root)) {
            FZ_CHECK(root->u.array.len == ref->elements);
            for (size_t i = 0; i < root->u.array.len; i++)
                check_element(root->u.array.values[i], i + 1);
            check_element_texts((const char *)data, size, root);
        }
        if (after > before)
            FZ_CHECK(after - before <= ji_array_scan_tree_bytes(ref));
    } else if (YAJL_IS_ARRAY(root)) {
        /* the first element nested deeper than the array mode allows is the one the scan named */
        uint64_t first = 0;
        for (size_t i = 0; i < root->u.array.len && first == 0; i++) {
            tree_stats_t t = {0, 0};
            walk(root->u.array.values[i], 1, &t);
            if (t.deepest > ARRAY_DEPTH)
                first = i + 1;
        }
        FZ_CHECK(first != 0);
        FZ_CHECK(first == ref->stop_element);
    }
    yajl_tree_free(root);
}

/* ------------------------------------------------------------------ 6: JSON Lines */

typedef struct {
    uint64_t record_line; /* the line of the last record delivered */
} lines_t;

static int on_image(void *ctx, uint64_t line, const char *text, size_t len, ji_error_t *err)
{
    (void)ctx, (void)line, (void)text, (void)len, (void)err;
    return 0;
}

static int on_record(void *ctx, const ji_record_t *rec, ji_error_t *err)
{
    (void)err;
    ((lines_t *)ctx)->record_line = rec->line;
    return 0;
}

static const ji_record_handler_t handler = {on_image, on_record};

static void check_lines(const uint8_t *data, size_t size)
{
    lines_t st = {0};
    ji_record_parser_t *p = ji_record_parser_new(&handler, &st);
    const char *s = (const char *)data, *end = s + size;
    uint64_t line = 0;

    FZ_CHECK(p != NULL);
    while (s < end) {
        const char *nl = memchr(s, '\n', (size_t)(end - s));
        size_t len = nl != NULL ? (size_t)(nl - s) : (size_t)(end - s);
        ji_array_scan_t scan;
        ji_error_t err;
        int r;

        line++;
        ji_array_scan_init(&scan, JI_MAX_JSON_DEPTH, UINT64_MAX);
        (void)!ji_array_scan_feed(&scan, s, len);
        memset(&err, 0, sizeof(err));
        r = len > 0 ? ji_record_parser_feed(p, line, s, len, &err) : 0;
        if (r == 0)
            r = ji_record_parser_end_line(p, line, &err);
        if (r < 0) {
            if (strcmp(err.message, DEPTH_MESSAGE) == 0) {
                FZ_CHECK(err.kind == JI_ERR_MALFORMED && err.line == line);
                FZ_CHECK(scan.stop == JI_ARRAY_SCAN_TOO_DEEP);
            }
            FZ_CHECK(ji_record_parser_reset(p) == 0);
        } else if (st.record_line == line) {
            FZ_CHECK(scan.stop == JI_ARRAY_SCAN_OK);
            FZ_CHECK(scan.deepest <= JI_MAX_JSON_DEPTH);
        }
        s += len + 1;
    }
    ji_record_parser_free(p);
}

/* ------------------------------------------------------------------ the target */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint64_t rng = fnv1a(data, size);
    ji_array_scan_t ref, s;
    uint64_t cap;

    /* 1. whole and in pieces */
    ji_array_scan_init(&ref, ARRAY_DEPTH, UINT64_MAX);
    FZ_CHECK(ji_array_scan_feed(&ref, (const char *)data, size) == (ref.stop == JI_ARRAY_SCAN_OK ? 0 : -1));
    FZ_CHECK(ref.stop != JI_ARRAY_SCAN_TOO_MANY);
    FZ_CHECK(ref.stop == JI_ARRAY_SCAN_OK ? ref.scanned == size : ref.scanned == ref.stop_offset + 1);
    FZ_CHECK(ref.stop != JI_ARRAY_SCAN_TOO_DEEP || ref.deepest == ARRAY_DEPTH + 1);
    FZ_CHECK(ref.stop == JI_ARRAY_SCAN_TOO_DEEP || ref.deepest <= ARRAY_DEPTH);
    FZ_CHECK(ref.elements <= ref.values && ref.longest_escaped <= size);
    FZ_CHECK(ji_array_scan_tree_bytes(&ref) >= ref.values * (uint64_t)JI_ARRAY_TREE_BYTES_PER_VALUE + ref.scanned);
    for (int i = 0; i < 3; i++) {
        s = scan_pieces(data, size, ARRAY_DEPTH, UINT64_MAX, &rng);
        FZ_CHECK(same_scan(&ref, &s));
    }

    /* 2. a cap on values */
    cap = ref.values > 0 ? prng_next(&rng) % (ref.values + 1) : 0;
    s = scan_pieces(data, size, ARRAY_DEPTH, cap, &rng);
    if (ref.values <= cap) {
        FZ_CHECK(same_scan(&ref, &s));
    } else if (s.stop == JI_ARRAY_SCAN_TOO_MANY) {
        FZ_CHECK(s.values == cap + 1);
        FZ_CHECK(ref.stop == JI_ARRAY_SCAN_OK || s.stop_offset <= ref.stop_offset);
    } else {
        /* stopped earlier for another reason: the same one as the reference, at the same place */
        FZ_CHECK(s.stop == ref.stop && s.stop_offset == ref.stop_offset);
    }

    /* 3, 4, 5, 6 */
    check_tree(data, size, &ref);
    check_lines(data, size);
    return 0;
}
