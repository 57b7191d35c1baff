/*
 * record_parser.c — owns turning lines of JSON text into validated user
 * records, and the field rules themselves (ji_record_check_name/_email, also
 * used by the JSON-array mode).
 *
 * One yajl handle parses the whole body (yajl_allow_multiple_values): a fresh
 * handle per line costs ~40% on tiny records. Line structure is enforced on
 * top of it from the callbacks: `depth` counts open containers, the value
 * that opens at depth 0 must be an object and only one may complete per line.
 * The splitter strips the '\n', so at the end of a line that has bytes after
 * its object (or no object at all) a "\n" is fed to yajl: a number waiting
 * for its end is completed, and any other cut token becomes a yajl error.
 * Nothing is ever left inside yajl's lexer from one line to the next.
 *
 * yajl's own UTF-8 check is off (yajl_dont_validate_strings): every string,
 * key or value at any depth, is checked strictly here instead. `\u` escapes
 * yajl mangles are found by escape_scan in the raw fragment before yajl sees
 * it; inside a string callback yajl_get_bytes_consumed() is the end of the
 * token just lexed (yajl 2.1 updates it as it lexes, verified by the unit
 * tests), so a bad escape before that offset belongs to this string.
 *
 * Nesting is bounded by JI_MAX_JSON_DEPTH, checked as each container opens:
 * a deeper record fails before yajl's parse stack grows further.
 *
 * Long tokens are fed to yajl in growing pieces. yajl 2.1 copies a token
 * that is cut by the end of its input into its lexer buffer and, when more
 * input comes, lexes the token again from its first byte: fed as fragments
 * of f bytes, a string of L bytes costs about L*L/(2f) bytes of scanning (a
 * 64 MiB image in 256 KiB fragments: 8 GB). So while yajl may be holding a
 * cut token (`pending`: the bytes given to it since the end of the last
 * token it called back for), fragments smaller than `pending` are held back
 * here and given to yajl together once they add up to `pending`. Each piece
 * is then at least as long as what yajl rescans for it, the pieces of one
 * token at least double, and the total scan stays under three times the
 * line. Small records never wait: when yajl holds nothing, or the fragment
 * is longer than what it holds, the fragment goes to yajl at once, uncopied.
 *
 * Memory: two fixed 1020-byte buffers for name and email, plus what yajl
 * keeps (its token and decode buffers, at most one line long), plus the
 * held-back bytes: never more than yajl's copy of the pending token, so at
 * most half the line received so far, within --max-record-bytes.
 * A hold buffer above JI_RECORD_HOLD_KEEP_BYTES is freed when its line ends.
 */
#include "record_parser.h"

#include <stdlib.h>
#include <string.h>
#include <yajl/yajl_parse.h>

#include "escape_scan.h"
#include "utf8.h"

/** Longest name or email in bytes: JI_MAX_FIELD_CHARS characters of at most 4 bytes. */
#define JI_MAX_FIELD_BYTES (JI_MAX_FIELD_CHARS * 4)

/** A hold buffer up to this size is kept from one line to the next; a bigger one is freed when its line ends. */
#define JI_RECORD_HOLD_KEEP_BYTES (64u * 1024)

typedef enum {
    MEMBER_OTHER,
    MEMBER_NAME, /* name, user, username */
    MEMBER_EMAIL,
    MEMBER_IMAGE,
} member_t;

#define SEEN_NAME (1u << MEMBER_NAME)
#define SEEN_EMAIL (1u << MEMBER_EMAIL)
#define SEEN_IMAGE (1u << MEMBER_IMAGE)

struct st_ji_record_parser_t {
    const ji_record_handler_t *handler;
    void *ctx;
    yajl_handle hand;
    ji_error_t *err; /* where callbacks report; set on entry to feed/end_line */
    bool failed;     /* an error was reported: only reset() may follow */

    /* the current line */
    uint64_t line;
    bool line_open;        /* fed since its last end_line/reset */
    uint64_t skip_line;    /* after reset() mid-line: the rest of this line is ignored (0 = none) */
    ji_escape_scan_t scan; /* bad `\u` escapes in the raw text */
    size_t line_len;       /* bytes given to yajl so far */
    size_t frag_off;       /* line offset of the fragment yajl is parsing */
    size_t token_end;      /* line offset just past the last token yajl called back for */
    size_t last_nonws_end; /* line offset just past the last non-whitespace byte */
    size_t record_end;     /* line offset just past the '}' that closed the record */
    size_t depth;          /* open objects and arrays */
    bool record_done;      /* the line's object is complete */

    /* the current record */
    unsigned seen;                                /* SEEN_* */
    member_t member;                              /* top-level member being parsed */
    char field[sizeof(((ji_error_t *)0)->field)]; /* its name, for errors */
    bool has_image;
    size_t name_len, email_len;
    char name[JI_MAX_FIELD_BYTES];
    char email[JI_MAX_FIELD_BYTES];

    /* bytes of the current line held back from yajl; they follow line offset line_len */
    char *hold;
    size_t hold_len, hold_cap;
};

/* ---- the field rules ---- */

/* Rules common to name and email. `what` names the field in messages and in err->field. */
static int check_field(const char *what, const char *s, size_t len, uint64_t line, ji_error_t *err)
{
    if (!ji_utf8_valid(s, len))
        return ji_error_set(err, JI_ERR_MALFORMED, line, NULL, "invalid UTF-8");
    if (len == 0)
        return ji_error_set(err, JI_ERR_INVALID, line, what, "%s is empty", what);
    /* more than 4 bytes a character is impossible, so a longer string need not be counted */
    if (len > JI_MAX_FIELD_BYTES || ji_utf8_chars(s, len) > JI_MAX_FIELD_CHARS)
        return ji_error_set(err, JI_ERR_INVALID, line, what, "%s is longer than %d characters", what,
                            JI_MAX_FIELD_CHARS);
    if (memchr(s, '\0', len) != NULL)
        return ji_error_set(err, JI_ERR_INVALID, line, what, "%s contains a NUL character", what);
    return 0;
}

int ji_record_check_name(const char *s, size_t len, uint64_t line, ji_error_t *err)
{
    return check_field("name", s, len, line, err);
}

int ji_record_check_email(const char *s, size_t len, uint64_t line, ji_error_t *err)
{
    if (check_field("email", s, len, line, err) != 0)
        return -1;
    const char *at = memchr(s, '@', len);
    size_t before = at != NULL ? (size_t)(at - s) : 0;
    if (at == NULL || before == 0 || before == len - 1 || memchr(at + 1, '@', len - before - 1) != NULL)
        return ji_error_set(err, JI_ERR_INVALID, line, "email",
                            "email must contain exactly one '@' with text on both sides");
    return 0;
}

/* ---- helpers for the callbacks ---- */

/* Callbacks stop yajl by returning 0; the error is already in p->err. */
static int fail(ji_record_parser_t *p)
{
    p->failed = true;
    return 0;
}

static int malformed(ji_record_parser_t *p, const char *msg)
{
    ji_error_set(p->err, JI_ERR_MALFORMED, p->line, NULL, "%s", msg);
    return fail(p);
}

static int invalid(ji_record_parser_t *p, const char *field, const char *msg)
{
    ji_error_set(p->err, JI_ERR_INVALID, p->line, field, "%s", msg);
    return fail(p);
}

/* Copies a member name for err->field: cut to fit at a character boundary, before any NUL or invalid byte. */
static void copy_field_name(char *dst, size_t cap, const unsigned char *key, size_t len)
{
    size_t n = 0;
    while (n < len) {
        unsigned char c = key[n];
        size_t w = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
        if (c == 0 || n + w > len || n + w >= cap || !ji_utf8_valid((const char *)key + n, w))
            break;
        n += w;
    }
    memcpy(dst, key, n);
    dst[n] = '\0';
}

/* A value opens at depth 0: it must be the line's one object. `kind` names what it is instead, or NULL for an object. */
static int top_level(ji_record_parser_t *p, const char *kind)
{
    if (p->record_done)
        return malformed(p, "more than one JSON value on the line");
    if (kind != NULL) {
        ji_error_set(p->err, JI_ERR_MALFORMED, p->line, NULL, "expected a JSON object, found %s", kind);
        return fail(p);
    }
    return 1;
}

/* A non-string value of a top-level member: the type rules of the known members. */
static int member_value(ji_record_parser_t *p, bool is_null)
{
    switch (p->member) {
    case MEMBER_NAME:
        return invalid(p, "name", "name must be a string");
    case MEMBER_EMAIL:
        return invalid(p, "email", "email must be a string");
    case MEMBER_IMAGE:
        return is_null ? 1 : invalid(p, "image", "image must be a string or null");
    case MEMBER_OTHER:
        break;
    }
    return 1;
}

/* Every callback: yajl just finished a token, so its lexer holds nothing before this offset. */
static void token_done(ji_record_parser_t *p)
{
    p->token_end = p->frag_off + yajl_get_bytes_consumed(p->hand);
}

/* A scalar or container starts: depth 0 must be the record object, depth 1 is a member's value. */
static int value_starts(ji_record_parser_t *p, const char *kind, bool is_null)
{
    token_done(p);
    if (p->depth == 0)
        return top_level(p, kind);
    if (p->depth == 1)
        return member_value(p, is_null);
    return 1;
}

/* The first bad escape of the line lies inside the string yajl just lexed (it ends at the current offset). */
static bool bad_escape_here(ji_record_parser_t *p)
{
    return p->scan.bad_at != SIZE_MAX && p->scan.bad_at < p->frag_off + yajl_get_bytes_consumed(p->hand);
}

static int bad_escape(ji_record_parser_t *p, const char *field, bool in_key)
{
    ji_error_set(p->err, JI_ERR_INVALID, p->line, field, "%s in a %s is not allowed", p->scan.why,
                 in_key ? "member name" : "string");
    return fail(p);
}

/* ---- yajl callbacks ---- */

static int on_null(void *ctx)
{
    return value_starts(ctx, "null", true);
}

static int on_boolean(void *ctx, int value)
{
    (void)value;
    return value_starts(ctx, "a boolean", false);
}

/* Raw number text: numbers are never converted, so huge ones in ignored members are fine. */
static int on_number(void *ctx, const char *s, size_t len)
{
    (void)s;
    (void)len;
    return value_starts(ctx, "a number", false);
}

/* A container opens: one level deeper, JI_MAX_JSON_DEPTH at most (the record's object is level 1). */
static int deeper(ji_record_parser_t *p)
{
    if (p->depth >= JI_MAX_JSON_DEPTH)
        return malformed(p, "record nested deeper than JI_MAX_JSON_DEPTH (" JI_STR(JI_MAX_JSON_DEPTH) ")");
    p->depth++;
    return 1;
}

static int on_start_map(void *ctx)
{
    ji_record_parser_t *p = ctx;
    if (value_starts(p, NULL, false) == 0)
        return 0;
    return deeper(p);
}

static int on_end_map(void *ctx)
{
    ji_record_parser_t *p = ctx;
    token_done(p);
    if (--p->depth == 0) {
        p->record_done = true;
        p->record_end = p->frag_off + yajl_get_bytes_consumed(p->hand);
    }
    return 1;
}

static int on_start_array(void *ctx)
{
    ji_record_parser_t *p = ctx;
    if (value_starts(p, "an array", false) == 0)
        return 0;
    return deeper(p);
}

static int on_end_array(void *ctx)
{
    ji_record_parser_t *p = ctx;
    token_done(p);
    p->depth--;
    return 1;
}

static member_t member_of(const unsigned char *key, size_t len)
{
#define KEY_IS(lit) (len == sizeof(lit) - 1 && memcmp(key, lit, len) == 0)
    if (KEY_IS("name") || KEY_IS("user") || KEY_IS("username"))
        return MEMBER_NAME;
    if (KEY_IS("email"))
        return MEMBER_EMAIL;
    if (KEY_IS("image"))
        return MEMBER_IMAGE;
    return MEMBER_OTHER;
#undef KEY_IS
}

static int on_map_key(void *ctx, const unsigned char *key, size_t len)
{
    ji_record_parser_t *p = ctx;
    token_done(p);

    if (p->depth != 1) {
        if (bad_escape_here(p))
            return bad_escape(p, p->field, true);
        if (!ji_utf8_valid((const char *)key, len))
            return malformed(p, "invalid UTF-8");
        return 1;
    }
    p->member = member_of(key, len);
    switch (p->member) {
    case MEMBER_NAME:
        strcpy(p->field, "name");
        break;
    case MEMBER_EMAIL:
        strcpy(p->field, "email");
        break;
    case MEMBER_IMAGE:
        strcpy(p->field, "image");
        break;
    case MEMBER_OTHER:
        copy_field_name(p->field, sizeof(p->field), key, len);
        break;
    }
    if (bad_escape_here(p))
        return bad_escape(p, p->field, true);
    if (!ji_utf8_valid((const char *)key, len))
        return malformed(p, "invalid UTF-8");
    if (p->member != MEMBER_OTHER) {
        unsigned bit = 1u << p->member;
        if (p->seen & bit) {
            if (p->member == MEMBER_NAME)
                ji_error_set(p->err, JI_ERR_INVALID, p->line, "name",
                             "duplicate member \"%.*s\" (name, user and username are one field)", (int)len, key);
            else
                ji_error_set(p->err, JI_ERR_INVALID, p->line, p->field, "duplicate member \"%s\"", p->field);
            return fail(p);
        }
        p->seen |= bit;
    }
    return 1;
}

static int on_string(void *ctx, const unsigned char *str, size_t len)
{
    ji_record_parser_t *p = ctx;
    const char *s = (const char *)str;

    token_done(p);
    if (p->depth == 0)
        return top_level(p, "a string");
    if (bad_escape_here(p))
        return bad_escape(p, p->field, false);
    if (p->depth > 1 || p->member == MEMBER_OTHER) {
        if (!ji_utf8_valid(s, len))
            return malformed(p, "invalid UTF-8");
        return 1;
    }
    switch (p->member) {
    case MEMBER_NAME:
        if (ji_record_check_name(s, len, p->line, p->err) != 0)
            return fail(p);
        memcpy(p->name, s, len);
        p->name_len = len;
        break;
    case MEMBER_EMAIL:
        if (ji_record_check_email(s, len, p->line, p->err) != 0)
            return fail(p);
        memcpy(p->email, s, len);
        p->email_len = len;
        break;
    case MEMBER_IMAGE:
        if (!ji_utf8_valid(s, len))
            return malformed(p, "invalid UTF-8");
        if (len == 0)
            break; /* "" means no image */
        if (p->handler->on_image(p->ctx, p->line, s, len, p->err) != 0) {
            if (p->err->kind == JI_ERR_NONE)
                ji_error_set(p->err, JI_ERR_INTERNAL, p->line, "image", "image handler failed");
            return fail(p);
        }
        p->has_image = true;
        break;
    case MEMBER_OTHER:
        break;
    }
    return 1;
}

static const yajl_callbacks callbacks = {
    .yajl_null = on_null,
    .yajl_boolean = on_boolean,
    .yajl_number = on_number,
    .yajl_string = on_string,
    .yajl_start_map = on_start_map,
    .yajl_map_key = on_map_key,
    .yajl_end_map = on_end_map,
    .yajl_start_array = on_start_array,
    .yajl_end_array = on_end_array,
};

/* ---- the parser ---- */

static yajl_handle new_handle(ji_record_parser_t *p)
{
    yajl_handle h = yajl_alloc(&callbacks, NULL, p);
    if (h == NULL)
        return NULL;
    if (!yajl_config(h, yajl_allow_multiple_values, 1) || !yajl_config(h, yajl_dont_validate_strings, 1)) {
        yajl_free(h);
        return NULL;
    }
    return h;
}

static void begin_line(ji_record_parser_t *p, uint64_t line)
{
    p->line = line;
    p->line_open = true;
    ji_escape_scan_reset(&p->scan);
    p->line_len = 0;
    p->frag_off = 0;
    p->token_end = 0;
    p->hold_len = 0;
    p->last_nonws_end = 0;
    p->record_end = 0;
    p->depth = 0;
    p->record_done = false;
    p->seen = 0;
    p->member = MEMBER_OTHER;
    p->field[0] = '\0';
    p->has_image = false;
    p->name_len = 0;
    p->email_len = 0;
}

ji_record_parser_t *ji_record_parser_new(const ji_record_handler_t *handler, void *ctx)
{
    ji_record_parser_t *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    p->handler = handler;
    p->ctx = ctx;
    if ((p->hand = new_handle(p)) == NULL) {
        free(p);
        return NULL;
    }
    begin_line(p, 0);
    p->line_open = false;
    return p;
}

void ji_record_parser_free(ji_record_parser_t *p)
{
    if (p == NULL)
        return;
    yajl_free(p->hand);
    free(p->hold);
    free(p);
}

/* The line is over (ended or given up): its held bytes are gone, and a big hold buffer with them. */
static void drop_hold(ji_record_parser_t *p)
{
    p->hold_len = 0;
    if (p->hold_cap > JI_RECORD_HOLD_KEEP_BYTES) {
        free(p->hold);
        p->hold = NULL;
        p->hold_cap = 0;
    }
}

int ji_record_parser_reset(ji_record_parser_t *p)
{
    yajl_handle h = new_handle(p);
    if (h == NULL)
        return -1; /* the old handle stays, still failed */
    yajl_free(p->hand);
    p->hand = h;
    drop_hold(p);
    p->skip_line = p->line_open ? p->line : 0;
    begin_line(p, 0);
    p->line_open = false;
    p->failed = false;
    return 0;
}

/* Common entry checks. 1 = ignore the call (rest of a line given up by reset), 0 = go on, -1 = error. */
static int enter(ji_record_parser_t *p, uint64_t line, ji_error_t *err)
{
    if (p->skip_line != 0) {
        if (line == p->skip_line)
            return 1;
        p->skip_line = 0;
    }
    if (p->failed)
        return ji_error_set(err, JI_ERR_INTERNAL, line, NULL, "record parser used after an error without a reset");
    if (!p->line_open)
        begin_line(p, line);
    else if (line != p->line)
        return ji_error_set(err, JI_ERR_INTERNAL, line, NULL, "line %llu started before line %llu ended",
                            (unsigned long long)line, (unsigned long long)p->line);
    err->kind = JI_ERR_NONE; /* so a handler that fails without saying why is noticed */
    p->err = err;
    return 0;
}

/* Feeds yajl the fragment at line offset p->line_len. */
static int parse(ji_record_parser_t *p, const char *data, size_t len)
{
    p->frag_off = p->line_len;
    yajl_status st = yajl_parse(p->hand, (const unsigned char *)data, len);
    p->line_len += len;
    if (st == yajl_status_ok)
        return 0;
    if (p->failed)
        return -1; /* a callback said why */
    p->failed = true;
    if (st == yajl_status_error) {
        unsigned char *msg = yajl_get_error(p->hand, 0, (const unsigned char *)data, len);
        if (msg == NULL)
            return ji_error_set(p->err, JI_ERR_INTERNAL, p->line, NULL, "out of memory");
        size_t n = strlen((char *)msg);
        while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' ' || msg[n - 1] == '.'))
            n--;
        ji_error_set(p->err, JI_ERR_MALFORMED, p->line, NULL, "%.*s", (int)n, (char *)msg);
        yajl_free_error(p->hand, msg);
        return -1;
    }
    return ji_error_set(p->err, JI_ERR_INTERNAL, p->line, NULL, "yajl stopped with status %d", (int)st);
}

static bool is_json_space(char c)
{
    /* what yajl's lexer skips */
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* Gives yajl the next bytes of the line (and the escape scan, and the tracking of the last non-space byte). */
static int give(ji_record_parser_t *p, const char *data, size_t len)
{
    size_t off = p->line_len;

    ji_escape_scan_feed(&p->scan, data, len);
    if (parse(p, data, len) != 0)
        return -1;
    for (size_t i = len; i > 0; i--) {
        if (!is_json_space(data[i - 1])) {
            p->last_nonws_end = off + i;
            break;
        }
    }
    return 0;
}

/* Gives yajl what was held back. */
static int give_held(ji_record_parser_t *p)
{
    size_t n = p->hold_len;

    if (n == 0)
        return 0;
    p->hold_len = 0;
    return give(p, p->hold, n);
}

int ji_record_parser_feed(ji_record_parser_t *p, uint64_t line, const char *data, size_t len, ji_error_t *err)
{
    int r = enter(p, line, err);
    if (r != 0)
        return r > 0 ? 0 : -1;
    /* see "Long tokens" at the top; invariant between calls: hold_len < pending, or nothing held */
    while (len > 0) {
        size_t pending = p->line_len - p->token_end;
        if (p->hold_len == 0 && len >= pending)
            return give(p, data, len);
        if (p->hold_cap < pending) {
            /* hold_len is 0 here (a piece is only held back while pending stays the same), but realloc: a big
             * block grows in place (mremap), so the pages already touched are not faulted in again */
            char *bigger = realloc(p->hold, pending);
            if (bigger == NULL)
                return give(p, data, len); /* slower, still right */
            p->hold = bigger;
            p->hold_cap = pending;
        }
        size_t n = pending - p->hold_len < len ? pending - p->hold_len : len;
        memcpy(p->hold + p->hold_len, data, n);
        p->hold_len += n;
        data += n;
        len -= n;
        if (p->hold_len == pending && give_held(p) != 0)
            return -1;
    }
    return 0;
}

int ji_record_parser_end_line(ji_record_parser_t *p, uint64_t line, ji_error_t *err)
{
    int r = enter(p, line, err);
    if (r != 0) {
        if (r > 0)
            p->skip_line = 0; /* the given-up line is over */
        return r > 0 ? 0 : -1;
    }
    p->line_open = false;
    if (give_held(p) != 0)
        return -1;
    drop_hold(p);
    ji_escape_scan_finish(&p->scan);
    if (p->depth > 0) {
        p->failed = true;
        return ji_error_set(err, JI_ERR_MALFORMED, line, NULL, "line ends inside a JSON value");
    }
    /* bytes after the object (or with no object): a token may wait in yajl's lexer; a '\n' ends or breaks it */
    if (p->last_nonws_end > p->record_end) {
        if (parse(p, "\n", 1) != 0)
            return -1;
        if (!p->record_done || p->depth > 0) {
            p->failed = true;
            return ji_error_set(err, JI_ERR_MALFORMED, line, NULL, "no JSON object on the line");
        }
    }
    if (!p->record_done)
        return 0;                     /* blank line */
    if (p->scan.bad_at != SIZE_MAX) { /* cannot happen in valid JSON, where every backslash is in a string */
        p->failed = true;
        return ji_error_set(err, JI_ERR_INVALID, line, NULL, "%s is not allowed", p->scan.why);
    }
    if (!(p->seen & SEEN_NAME)) {
        p->failed = true;
        return ji_error_set(err, JI_ERR_INVALID, line, "name", "missing field \"name\"");
    }
    if (!(p->seen & SEEN_EMAIL)) {
        p->failed = true;
        return ji_error_set(err, JI_ERR_INVALID, line, "email", "missing field \"email\"");
    }
    ji_record_t rec = {
        .line = line,
        .name = p->name,
        .name_len = p->name_len,
        .email = p->email,
        .email_len = p->email_len,
        .has_image = p->has_image,
    };
    r = p->handler->on_record(p->ctx, &rec, err);
    if (r == 0 || r == 1)
        return r;
    p->failed = true;
    if (err->kind == JI_ERR_NONE)
        ji_error_set(err, JI_ERR_INTERNAL, line, NULL, "record handler failed");
    return -1;
}
