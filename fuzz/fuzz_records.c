/*
 * fuzz_records.c — libFuzzer target over the line splitter and the record parser, driven the way src/ingest.c
 * drives them (a copy of its handler logic, reset and skip rules: keep the two in step), without sockets, files
 * or PostgreSQL.
 *
 * The fuzz input is a request body. Everything else is drawn from the input too: a PRNG seeded with a hash of
 * the input picks --max-record-bytes (the default or a small one), where the body is cut into pieces, and after
 * which records the handler asks to pause. Each input runs four times:
 *
 *   A  skip mode (?on_error=skip), the body in one piece, no pauses     — the reference
 *   B  skip mode, random pieces and pauses                              — must match A exactly
 *   C  stop at the first error, random pieces and pauses                — must be A cut at A's first error
 *   D  stop at the first error, one byte at a time (bodies up to 2 KiB) — must match C
 *
 * and the handlers check on every call: fragments are non-empty, inside the piece being fed and free of '\n';
 * line numbers only grow; an image comes at most once per record and is non-empty, valid UTF-8 without NUL;
 * a record's name and email are valid UTF-8, 1 to 255 characters, without NUL, and the email has exactly one
 * '@' with text on both sides; every error has a kind, a message and the right line. A broken check aborts
 * (a crash for libFuzzer); so do ASan, UBSan and leaks.
 *
 * Every piece is copied into its own heap block and freed once fed, so a pointer kept into an old piece is a
 * use-after-free that ASan reports.
 *
 * Build and run: scripts/fuzz records [SECONDS]; reproduce: scripts/fuzz records CRASH-FILE...
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "record_parser.h"
#include "splitter.h"
#include "utf8.h"

/** Most records and errors remembered per run (inputs are at most a few KiB: one per line at most). */
#define FZ_MAX_ITEMS 4096
/** Bodies fed one byte at a time (run D) only up to this size: yajl is slow per call. */
#define FZ_MAX_BYTEWISE 2048

#define FZ_CHECK(cond)                                                                                                 \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "fuzz_records: check failed at %s:%d: %s\n", __FILE__, __LINE__, #cond);                   \
            abort();                                                                                                   \
        }                                                                                                              \
    } while (0)

typedef struct {
    uint64_t line;
    uint64_t hash; /* of name, email and image */
} item_t;

typedef struct {
    uint64_t line;
    ji_error_kind_t kind;
} fault_t;

/** Messages kept per run, for the report of a failed comparison. */
#define FZ_KEPT_MESSAGES 8

typedef struct {
    /* how it runs */
    const char *label;
    size_t max_record_bytes;
    bool skip_errors;
    uint64_t pause_salt; /* on_record asks to pause when the mix of line and salt says so; 0 = never */

    /* the stages, and ingest.c's per-line state */
    ji_splitter_t splitter;
    ji_record_parser_t *parser;
    bool line_failed;

    /* the piece being fed */
    const char *piece;
    size_t piece_len;

    /* checks */
    uint64_t last_line_seen; /* highest line number a handler saw */
    uint64_t last_record_line;
    uint64_t image_line; /* line of the image handed over for the current record (0 = none) */
    uint64_t image_hash;

    /* outcome */
    item_t records[FZ_MAX_ITEMS];
    size_t nrecords;
    fault_t skipped[FZ_MAX_ITEMS]; /* skip mode: errors reported */
    size_t nskipped;
    bool failed; /* the request failed: stop mode, or a fatal error */
    fault_t fatal;
    char messages[FZ_KEPT_MESSAGES][120]; /* the first errors, skipped or fatal */
    size_t nmessages;
} run_t;

/* ------------------------------------------------------------------ small tools */

static uint64_t fnv1a(uint64_t h, const void *p, size_t n)
{
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

#define FNV_START 0xcbf29ce484222325ull

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

typedef struct {
    uint64_t s;
} prng_t;

static uint64_t prng_next(prng_t *p)
{
    p->s += 0x9e3779b97f4a7c15ull; /* splitmix64 */
    return mix(p->s);
}

static void check_error(const ji_error_t *err, uint64_t line)
{
    FZ_CHECK(err->kind == JI_ERR_MALFORMED || err->kind == JI_ERR_INVALID || err->kind == JI_ERR_TOO_LARGE);
    FZ_CHECK(err->line == 0 || err->line == line);
    FZ_CHECK(memchr(err->message, '\0', sizeof(err->message)) != NULL);
    FZ_CHECK(err->message[0] != '\0');
    FZ_CHECK(memchr(err->field, '\0', sizeof(err->field)) != NULL);
}

static void check_field(const char *s, size_t len, bool email)
{
    size_t chars;

    FZ_CHECK(s != NULL || len == 0);
    FZ_CHECK(len > 0);
    FZ_CHECK(ji_utf8_valid(s, len));
    FZ_CHECK(memchr(s, '\0', len) == NULL);
    chars = ji_utf8_chars(s, len);
    FZ_CHECK(chars >= 1 && chars <= JI_MAX_FIELD_CHARS);
    if (email) {
        const char *at = memchr(s, '@', len);
        FZ_CHECK(at != NULL);
        FZ_CHECK(at > s && at < s + len - 1);
        FZ_CHECK(memchr(at + 1, '@', (size_t)(s + len - at - 1)) == NULL);
    }
}

/* ------------------------------------------------------------------ record handler (ingest.c: on_image, on_record) */

static int on_image(void *ctx, uint64_t line, const char *text, size_t len, ji_error_t *err)
{
    run_t *r = ctx;

    FZ_CHECK(line == ji_splitter_line(&r->splitter));
    FZ_CHECK(r->image_line != line); /* at most once per record */
    FZ_CHECK(len > 0);
    FZ_CHECK(ji_utf8_valid(text, len));
    FZ_CHECK(memchr(text, '\0', len) == NULL);
    /* the image store's own verdict on bad base64: an invalid record, decided by content alone */
    if (text[0] == '!')
        return ji_error_set(err, JI_ERR_INVALID, line, "image", "image is not valid base64");
    r->image_line = line;
    r->image_hash = fnv1a(FNV_START, text, len);
    return 0;
}

static int on_record(void *ctx, const ji_record_t *rec, ji_error_t *err)
{
    run_t *r = ctx;
    uint64_t h = FNV_START;

    (void)err;
    FZ_CHECK(rec->line == ji_splitter_line(&r->splitter));
    FZ_CHECK(rec->line > r->last_record_line);
    FZ_CHECK(rec->has_image == (r->image_line == rec->line));
    check_field(rec->name, rec->name_len, false);
    check_field(rec->email, rec->email_len, true);
    r->last_record_line = rec->line;
    FZ_CHECK(r->nrecords < FZ_MAX_ITEMS);
    h = fnv1a(h, rec->name, rec->name_len);
    h = fnv1a(h, "\0", 1);
    h = fnv1a(h, rec->email, rec->email_len);
    if (rec->has_image)
        h ^= mix(r->image_hash);
    r->records[r->nrecords].line = rec->line;
    r->records[r->nrecords].hash = h;
    r->nrecords++;
    r->image_line = 0;
    return r->pause_salt != 0 && mix(rec->line ^ r->pause_salt) % 3 == 0 ? 1 : 0;
}

static const ji_record_handler_t record_handler = {on_image, on_record};

/* ------------------------------------------------------------------ splitter handler (ingest.c) */

static void keep_message(run_t *r, const ji_error_t *err)
{
    if (r->nmessages < FZ_KEPT_MESSAGES)
        snprintf(r->messages[r->nmessages++], sizeof(r->messages[0]), "line %llu kind %d%s%s: %s",
                 (unsigned long long)err->line, (int)err->kind, err->field[0] ? " field " : "", err->field,
                 err->message);
}

static void fail(run_t *r, const ji_error_t *err)
{
    if (r->failed)
        return;
    keep_message(r, err);
    r->failed = true;
    r->fatal.line = err->line;
    r->fatal.kind = err->kind;
}

/* ingest.c record_error(): skipped in skip mode, fatal otherwise. 0 go on, -1 stop. */
static int record_error(run_t *r, ji_error_t *err, uint64_t line)
{
    check_error(err, line);
    if (err->line == 0)
        err->line = line;
    if (r->skip_errors && (err->kind == JI_ERR_MALFORMED || err->kind == JI_ERR_INVALID)) {
        FZ_CHECK(r->nskipped < FZ_MAX_ITEMS);
        r->skipped[r->nskipped].line = err->line;
        r->skipped[r->nskipped].kind = err->kind;
        r->nskipped++;
        keep_message(r, err);
        r->line_failed = true;
        return 0;
    }
    fail(r, err);
    return -1;
}

static void see_line(run_t *r, uint64_t line)
{
    FZ_CHECK(line == ji_splitter_line(&r->splitter));
    FZ_CHECK(line >= r->last_line_seen);
    r->last_line_seen = line;
}

static int on_line_data(void *ctx, uint64_t line, const char *data, size_t len)
{
    run_t *r = ctx;
    ji_error_t err;

    see_line(r, line);
    FZ_CHECK(len > 0);
    FZ_CHECK(data >= r->piece && data + len <= r->piece + r->piece_len);
    FZ_CHECK(memchr(data, '\n', len) == NULL);
    if (r->line_failed)
        return 0;
    memset(&err, 0, sizeof(err));
    if (ji_record_parser_feed(r->parser, line, data, len, &err) == 0)
        return 0;
    if (r->image_line == line)
        r->image_line = 0; /* forget_line_image */
    return record_error(r, &err, line);
}

static int on_line_end(void *ctx, uint64_t line)
{
    run_t *r = ctx;
    ji_error_t err;
    int v;

    see_line(r, line);
    if (r->line_failed) {
        r->line_failed = false;
        FZ_CHECK(ji_record_parser_reset(r->parser) == 0);
        return 0;
    }
    memset(&err, 0, sizeof(err));
    v = ji_record_parser_end_line(r->parser, line, &err);
    if (v >= 0) {
        FZ_CHECK(v == 0 || v == 1);
        FZ_CHECK(r->image_line != line); /* an image without its record */
        return v;
    }
    if (r->image_line == line)
        r->image_line = 0;
    if (record_error(r, &err, line) < 0)
        return -1;
    FZ_CHECK(ji_record_parser_reset(r->parser) == 0);
    r->line_failed = false;
    return 0;
}

static const ji_splitter_handler_t splitter_handler = {on_line_data, on_line_end};

/* ------------------------------------------------------------------ ingest.c's feed and finish */

static void too_long(run_t *r, ji_error_t *err)
{
    uint64_t line = ji_splitter_line(&r->splitter);
    ji_error_set(err, JI_ERR_TOO_LARGE, line, NULL, "record on line %llu is longer than --max-record-bytes",
                 (unsigned long long)line);
}

/* ingest.c skip_long_line(), as it is: keep the two in step */
static void skip_long_line(run_t *r)
{
    ji_error_t err;

    too_long(r, &err);
    if (r->image_line == err.line)
        r->image_line = 0;
    if (!r->line_failed) { /* a line that failed already was reported once */
        FZ_CHECK(r->nskipped < FZ_MAX_ITEMS);
        r->skipped[r->nskipped].line = err.line;
        r->skipped[r->nskipped].kind = err.kind;
        r->nskipped++;
        keep_message(r, &err);
    }
    r->line_failed = false;
    FZ_CHECK(ji_record_parser_reset(r->parser) == 0);
    ji_splitter_skip_line(&r->splitter);
}

/* ingest.c splitter_ok(): false when the request failed */
static bool splitter_ok(run_t *r, ji_split_result_t res)
{
    ji_error_t err;

    switch (res) {
    case JI_SPLIT_OK:
    case JI_SPLIT_PAUSED:
        return !r->failed;
    case JI_SPLIT_TOO_LONG:
        too_long(r, &err);
        fail(r, &err);
        return false;
    case JI_SPLIT_ERROR:
        break;
    }
    FZ_CHECK(r->failed); /* a handler said -1 only after failing the request */
    return false;
}

/* ji_ingest_feed(): bytes taken (all of them unless a pause or a failure). */
static size_t ingest_feed(run_t *r, const char *data, size_t len)
{
    size_t consumed = 0;
    ji_split_result_t res;

    for (;;) {
        size_t n = 0;
        res = ji_splitter_feed(&r->splitter, data + consumed, len - consumed, &n);
        FZ_CHECK(n <= len - consumed);
        consumed += n;
        if (res != JI_SPLIT_TOO_LONG || !r->skip_errors || r->failed)
            break;
        skip_long_line(r);
    }
    if (res == JI_SPLIT_OK)
        FZ_CHECK(consumed == len);
    if (res == JI_SPLIT_PAUSED)
        FZ_CHECK(consumed > 0 && data[consumed - 1] == '\n');
    splitter_ok(r, res);
    return consumed;
}

/* Feeds `len` bytes as one piece of its own heap block, re-offering what a pause left, like the front door. */
static void feed_piece(run_t *r, const uint8_t *bytes, size_t len)
{
    char *piece = malloc(len ? len : 1);
    size_t off = 0;

    FZ_CHECK(piece != NULL);
    memcpy(piece, bytes, len);
    r->piece = piece;
    r->piece_len = len;
    while (off < len && !r->failed)
        off += ingest_feed(r, piece + off, len - off);
    r->piece = NULL;
    r->piece_len = 0;
    free(piece);
}

static void run_body(run_t *r, const char *label, const uint8_t *body, size_t len, size_t max_record_bytes,
                     bool skip_errors, uint64_t pause_salt, prng_t *cuts, size_t fixed_piece)
{
    size_t off = 0;

    memset(r, 0, sizeof(*r));
    r->label = label;
    r->max_record_bytes = max_record_bytes;
    r->skip_errors = skip_errors;
    r->pause_salt = pause_salt;
    ji_splitter_init(&r->splitter, max_record_bytes, &splitter_handler, r);
    FZ_CHECK((r->parser = ji_record_parser_new(&record_handler, r)) != NULL);
    while (off < len && !r->failed) {
        size_t n = len - off;
        if (fixed_piece != 0) {
            n = fixed_piece;
        } else if (cuts != NULL) {
            uint64_t x = prng_next(cuts);
            switch (x & 3) { /* mostly small pieces: they cut tokens, escapes and UTF-8 sequences */
            case 0:
                n = 1;
                break;
            case 1:
                n = 1 + (x >> 8) % 8;
                break;
            case 2:
                n = 1 + (x >> 8) % 64;
                break;
            default:
                n = 1 + (x >> 8) % (len + 1);
                break;
            }
        }
        if (n > len - off)
            n = len - off;
        feed_piece(r, body + off, n);
        off += n;
    }
    if (!r->failed) {
        ji_split_result_t res = ji_splitter_finish(&r->splitter);
        FZ_CHECK(res != JI_SPLIT_TOO_LONG);
        splitter_ok(r, res);
    }
    FZ_CHECK(!r->line_failed || r->failed);
    ji_record_parser_free(r->parser);
}

/* ------------------------------------------------------------------ the comparisons */

static void dump(const run_t *r)
{
    fprintf(stderr, "run %s: %s mode, --max-record-bytes %zu, pauses %s\n", r->label, r->skip_errors ? "skip" : "stop",
            r->max_record_bytes, r->pause_salt ? "yes" : "no");
    fprintf(stderr, "  %zu records on lines:", r->nrecords);
    for (size_t i = 0; i < r->nrecords && i < 40; i++)
        fprintf(stderr, " %llu", (unsigned long long)r->records[i].line);
    fprintf(stderr, "\n  %zu skipped (line:kind):", r->nskipped);
    for (size_t i = 0; i < r->nskipped && i < 40; i++)
        fprintf(stderr, " %llu:%d", (unsigned long long)r->skipped[i].line, (int)r->skipped[i].kind);
    fprintf(stderr, "\n  failed: %s", r->failed ? "yes" : "no");
    if (r->failed)
        fprintf(stderr, " (line %llu kind %d)", (unsigned long long)r->fatal.line, (int)r->fatal.kind);
    fprintf(stderr, "\n");
    for (size_t i = 0; i < r->nmessages; i++)
        fprintf(stderr, "  error: %s\n", r->messages[i]);
}

/* A failed comparison: the runs are described, then abort. */
#define FZ_SAME(cond, a, b)                                                                                            \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "fuzz_records: runs %s and %s differ at %s:%d: %s\n", (a)->label, (b)->label, __FILE__,    \
                    __LINE__, #cond);                                                                                  \
            dump(a);                                                                                                   \
            if ((b) != (a))                                                                                            \
                dump(b);                                                                                               \
            abort();                                                                                                   \
        }                                                                                                              \
    } while (0)

static bool same_records(const run_t *a, const run_t *b, size_t n)
{
    if (a->nrecords < n || b->nrecords < n)
        return false;
    for (size_t i = 0; i < n; i++)
        if (a->records[i].line != b->records[i].line || a->records[i].hash != b->records[i].hash)
            return false;
    return true;
}

/* Records of `ref` on lines before `line` (all of them for line 0). */
static size_t records_before(const run_t *ref, uint64_t line)
{
    size_t n = 0;
    while (n < ref->nrecords && (line == 0 || ref->records[n].line < line))
        n++;
    return n;
}

/* Kinds agree, except that a line both too long and otherwise bad may be reported either way, by where it was cut. */
static bool same_kind(ji_error_kind_t a, ji_error_kind_t b)
{
    return a == b || a == JI_ERR_TOO_LARGE || b == JI_ERR_TOO_LARGE;
}

/* Two runs of the same body in skip mode. */
static void compare_skip(const run_t *a, const run_t *b)
{
    /* one error per line: a skipped line is one skipped record */
    for (size_t i = 1; i < a->nskipped; i++)
        FZ_SAME(a->skipped[i].line > a->skipped[i - 1].line, a, a);
    for (size_t i = 1; i < b->nskipped; i++)
        FZ_SAME(b->skipped[i].line > b->skipped[i - 1].line, b, b);
    FZ_SAME(!a->failed && !b->failed, a, b); /* nothing the parser reports is fatal in skip mode */
    FZ_SAME(a->nrecords == b->nrecords && same_records(a, b, a->nrecords), a, b);
    FZ_SAME(a->nskipped == b->nskipped, a, b);
    for (size_t i = 0; i < a->nskipped; i++) {
        FZ_SAME(a->skipped[i].line == b->skipped[i].line, a, b);
        FZ_SAME(same_kind(a->skipped[i].kind, b->skipped[i].kind), a, b);
    }
}

/* A stop-at-first-error run against the skip-mode reference. */
static void compare_stop(const run_t *ref, const run_t *c)
{
    uint64_t first = ref->nskipped > 0 ? ref->skipped[0].line : 0;
    size_t n = records_before(ref, first);

    FZ_SAME(c->nskipped == 0, ref, c);
    FZ_SAME(c->nrecords == n && same_records(ref, c, n), ref, c);
    FZ_SAME(c->failed == (first != 0), ref, c);
    if (first != 0) {
        FZ_SAME(c->fatal.line == first, ref, c);
        FZ_SAME(same_kind(c->fatal.kind, ref->skipped[0].kind), ref, c);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static run_t a, b, c, d; /* large: keep them off the stack */
    uint64_t h = fnv1a(FNV_START, data, size);
    prng_t knobs = {h}, cuts_b = {mix(h ^ 1)}, cuts_c = {mix(h ^ 2)};
    size_t max_record_bytes = JI_DEFAULT_MAX_RECORD_BYTES;
    uint64_t salt = prng_next(&knobs);

    if (prng_next(&knobs) % 2)
        max_record_bytes = 1 + prng_next(&knobs) % 300;
    if (salt % 4 == 0)
        salt = 0; /* a quarter of the inputs never pause */

    run_body(&a, "A", data, size, max_record_bytes, true, 0, NULL, 0);
    run_body(&b, "B", data, size, max_record_bytes, true, salt, &cuts_b, 0);
    compare_skip(&a, &b);
    run_body(&c, "C", data, size, max_record_bytes, false, salt, &cuts_c, 0);
    compare_stop(&a, &c);
    if (size <= FZ_MAX_BYTEWISE) {
        run_body(&d, "D", data, size, max_record_bytes, false, 0, NULL, 1);
        compare_stop(&a, &d);
    }
    return 0;
}
