/* test_dead_letters.c — kept lines come back as COPY rows byte for byte, whatever their size and the room given. */
#include "dead_letters.h"

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "service_limits.h"
#include "unit.h"

typedef struct {
    uint64_t line;
    const char *field, *error;
    char *bytes;
    size_t len;
    bool truncated;
} want_t;

/** Feeds `len` bytes of `bytes` in pieces of `piece`. */
static void feed(ji_dead_letters_t *d, const char *bytes, size_t len, size_t piece)
{
    ji_error_t err;

    for (size_t off = 0; off < len; off += piece)
        CHECK(ji_dead_letters_line_data(d, bytes + off, len - off < piece ? len - off : piece, &err) == 0);
}

static int hex_value(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c - 'a' + 10;
}

/** Undoes COPY text escapes of [s, s+n) into `out`; returns its length. */
static size_t unescape(const char *s, size_t n, char *out)
{
    size_t len = 0;

    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\\' && i + 1 < n) {
            char c = s[++i];
            out[len++] = c == 't' ? '\t' : c == 'n' ? '\n' : c == 'r' ? '\r' : c;
        } else {
            out[len++] = s[i];
        }
    }
    return len;
}

/** Checks that `copy` (COPY text) holds exactly the rows of `want`. */
static void check_rows(const char *copy, size_t copy_len, const want_t *want, size_t nwant)
{
    const char *p = copy, *end = copy + copy_len;
    size_t row = 0;

    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p)), *col[6];
        size_t ncol = 0;
        char text[600];
        CHECK(nl != NULL);
        if (nl == NULL || row >= nwant)
            break;
        col[ncol++] = p;
        for (const char *q = p; q < nl && ncol < 6; q++)
            if (*q == '\t')
                col[ncol++] = q + 1;
        CHECK_EQ_INT(ncol, 6);
        if (ncol != 6)
            break;
        const want_t *w = &want[row];
        CHECK_EQ_INT(strtoll(col[0], NULL, 10), 42);
        CHECK_EQ_INT(strtoull(col[1], NULL, 10), w->line);
        text[unescape(col[2], (size_t)(col[3] - col[2] - 1), text)] = '\0';
        CHECK_EQ_STR(text, w->error);
        if (w->field == NULL) {
            CHECK(strncmp(col[3], "\\N\t", 3) == 0);
        } else {
            text[unescape(col[3], (size_t)(col[4] - col[3] - 1), text)] = '\0';
            CHECK_EQ_STR(text, w->field);
        }
        CHECK(strncmp(col[4], "\\\\x", 3) == 0);
        size_t hex_len = (size_t)(col[5] - col[4] - 1) - 3;
        CHECK_EQ_INT(hex_len, 2 * w->len);
        bool same = hex_len == 2 * w->len;
        for (size_t i = 0; same && i < w->len; i++)
            same = (char)(hex_value(col[4][3 + 2 * i]) << 4 | hex_value(col[4][4 + 2 * i])) == w->bytes[i];
        CHECK(same);
        CHECK(*col[5] == (w->truncated ? 't' : 'f'));
        p = nl + 1;
        row++;
    }
    CHECK_EQ_INT(row, nwant);
}

static char *random_bytes(rng_t *r, size_t n)
{
    char *b = malloc(n);
    for (size_t i = 0; i < n; i++)
        b[i] = (char)rng_next(r); /* every byte value: tabs, newlines, backslashes, NUL */
    return b;
}

static void test_rows_byte_for_byte(size_t room)
{
    rng_t r = {0x5eed + room};
    int dir = open(".", O_RDONLY | O_DIRECTORY);
    ji_dead_letters_t *d = ji_dead_letters_new(dir);
    want_t want[4];
    size_t nwant = 0;
    ji_error_t why, err;
    char *good = random_bytes(&r, 300000), *copy = NULL, *buf = malloc(room);
    size_t copy_len = 0;
    ptrdiff_t n;

    /* a short line with a CRLF line end, an error text with a tab and a backslash */
    want[nwant] = (want_t){.line = 3, .field = "email", .error = "bad\tthing \\ here", .len = 5};
    want[nwant].bytes = strdup("ab\tcd");
    feed(d, "ab\tcd\r", 6, 2);
    ji_error_set(&why, JI_ERR_INVALID, 3, "email", "%s", want[nwant].error);
    CHECK(ji_dead_letters_keep(d, &why, false, &err) == 0);
    nwant++;
    /* a long good line in between: forgotten */
    feed(d, good, 250000, 7000);
    ji_dead_letters_line_forget(d);
    /* a long rejected line: spilled past the memory part */
    want[nwant] = (want_t){.line = 9, .error = "lexical error", .len = 200001, .bytes = random_bytes(&r, 200001)};
    feed(d, want[nwant].bytes, want[nwant].len, 65000);
    ji_error_set(&why, JI_ERR_MALFORMED, 9, NULL, "lexical error");
    CHECK(ji_dead_letters_keep(d, &why, false, &err) == 0);
    nwant++;
    /* an oversize line: its first JI_DEAD_LETTER_KEEP_BYTES, marked truncated */
    char *over = random_bytes(&r, 150000);
    feed(d, over, 150000, 40000);
    want[nwant] =
        (want_t){.line = 12, .error = "too long", .len = JI_DEAD_LETTER_KEEP_BYTES, .bytes = over, .truncated = true};
    ji_error_set(&why, JI_ERR_TOO_LARGE, 12, NULL, "too long");
    CHECK(ji_dead_letters_keep(d, &why, true, &err) == 0);
    nwant++;
    /* an empty rejected line */
    want[nwant] = (want_t){.line = 13, .field = "name", .error = "empty", .len = 0, .bytes = strdup("")};
    ji_error_set(&why, JI_ERR_INVALID, 13, "name", "empty");
    CHECK(ji_dead_letters_keep(d, &why, false, &err) == 0);
    nwant++;
    CHECK_EQ_INT(ji_dead_letters_count(d), 4);

    while ((n = ji_dead_letters_copy_rows(d, 42, buf, room, &err)) > 0) {
        CHECK((size_t)n <= room);
        copy = realloc(copy, copy_len + (size_t)n);
        memcpy(copy + copy_len, buf, (size_t)n);
        copy_len += (size_t)n;
    }
    CHECK_EQ_INT(n, 0);
    check_rows(copy, copy_len, want, nwant);
    CHECK_EQ_INT(ji_dead_letters_copy_rows(d, 42, buf, room, &err), 0); /* done stays done */

    for (size_t i = 0; i < nwant; i++)
        free(want[i].bytes);
    free(good);
    free(copy);
    free(buf);
    ji_dead_letters_free(d);
    close(dir);
}

static void test_small_room(void)
{
    test_rows_byte_for_byte(JI_DEAD_LETTERS_COPY_MIN);
}

static void test_copy_buffer_room(void)
{
    test_rows_byte_for_byte(JI_COPY_BUFFER_BYTES + JI_COPY_BUFFER_SLACK);
}

static void test_nothing_kept(void)
{
    int dir = open(".", O_RDONLY | O_DIRECTORY);
    ji_dead_letters_t *d = ji_dead_letters_new(dir);
    char buf[JI_DEAD_LETTERS_COPY_MIN];
    ji_error_t err;

    feed(d, "{}", 2, 1);
    ji_dead_letters_line_forget(d);
    CHECK_EQ_INT(ji_dead_letters_count(d), 0);
    CHECK_EQ_INT(ji_dead_letters_copy_rows(d, 1, buf, sizeof(buf), &err), 0);
    ji_dead_letters_free(d);
    close(dir);
}

UNIT_MAIN("dead_letters", {"small_room", test_small_room}, {"copy_buffer_room", test_copy_buffer_room},
          {"nothing_kept", test_nothing_kept})
