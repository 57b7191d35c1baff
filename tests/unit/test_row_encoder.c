/*
 * test_row_encoder.c — known answers for one user row in COPY text format:
 * plain rows, rows without an image, every escape, and the cap edge (the
 * encoder never writes past `cap` and answers 0 when the row does not fit).
 */
#include "row_encoder.h"
#include "unit.h"

#include <stdint.h>
#include <string.h>

static ji_row_t make_row(int64_t batch_id, const char *name, const char *email, const char *path, const char *type,
                         uint64_t size)
{
    ji_row_t row = {batch_id, name, strlen(name), email, strlen(email), path, type, size};
    return row;
}

/* Encodes into a buffer guarded by sentinel bytes; returns the length and checks nothing was written past cap. */
static size_t encode_guarded(const ji_row_t *row, size_t cap, char *out)
{
    char buf[1024];
    size_t n;

    memset(buf, '#', sizeof(buf));
    n = ji_row_encode(buf, cap, row);
    for (size_t i = cap; i < sizeof(buf); i++) {
        if (buf[i] != '#') {
            CHECK(!"wrote past cap");
            break;
        }
    }
    memcpy(out, buf, n);
    out[n] = '\0';
    return n;
}

static void test_plain_row(void)
{
    ji_row_t row = make_row(42, "vladimir", "someone@gmail.com", "ab/cd/0123.jpg", "image/jpeg", 12345);
    char out[1024];
    size_t n = encode_guarded(&row, 512, out);

    CHECK_EQ_STR(out, "42\tvladimir\tsomeone@gmail.com\tab/cd/0123.jpg\timage/jpeg\t12345\n");
    CHECK_EQ_INT(n, strlen(out));
}

static void test_no_image(void)
{
    ji_row_t row = make_row(7, "ann", "a@b.c", NULL, "image/png", 99);
    char out[1024];

    encode_guarded(&row, 512, out);
    /* with no path the type and size are NULL too, whatever the struct says */
    CHECK_EQ_STR(out, "7\tann\ta@b.c\t\\N\t\\N\t\\N\n");
}

static void test_image_without_type(void)
{
    ji_row_t row = make_row(1, "n", "e@x", "p.bin", NULL, 0);
    char out[1024];

    encode_guarded(&row, 512, out);
    CHECK_EQ_STR(out, "1\tn\te@x\tp.bin\t\\N\t0\n");
}

static void test_every_escape(void)
{
    ji_row_t row = make_row(3, "a\\b\tc\nd\re", "\\\\@\t", "x\\y\tz", "t\ny\r", 5);
    char out[1024];

    encode_guarded(&row, 512, out);
    CHECK_EQ_STR(out, "3\ta\\\\b\\tc\\nd\\re\t\\\\\\\\@\\t\tx\\\\y\\tz\tt\\ny\\r\t5\n");
}

static void test_other_bytes_pass(void)
{
    /* \N text inside a value is data, not NULL: its backslash is escaped; UTF-8 and other controls pass as is */
    ji_row_t row = make_row(9, "\\N", "\xc3\xa9t\xc3\xa9\x01\x7f@x", NULL, NULL, 0);
    char out[1024];

    encode_guarded(&row, 512, out);
    CHECK_EQ_STR(out, "9\t\\\\N\t\xc3\xa9t\xc3\xa9\x01\x7f@x\t\\N\t\\N\t\\N\n");
}

static void test_extreme_numbers(void)
{
    ji_row_t row = make_row(INT64_MIN, "n", "e@x", "p", "t", UINT64_MAX);
    char out[1024];

    encode_guarded(&row, 512, out);
    CHECK_EQ_STR(out, "-9223372036854775808\tn\te@x\tp\tt\t18446744073709551615\n");
}

static void test_cap_edge(void)
{
    ji_row_t row = make_row(12, "a\tb", "c@d", "p/q", "image/gif", 100);
    const char *want = "12\ta\\tb\tc@d\tp/q\timage/gif\t100\n";
    size_t len = strlen(want);
    char out[1024];

    /* exactly enough */
    CHECK_EQ_INT(encode_guarded(&row, len, out), len);
    CHECK_EQ_STR(out, want);
    /* every smaller cap fails without writing past it, including caps that split an escape */
    for (size_t cap = 0; cap < len; cap++)
        CHECK_EQ_INT(encode_guarded(&row, cap, out), 0);
}

static void test_max_bytes_bound(void)
{
    /* a field made only of escaped bytes doubles; JI_ROW_MAX_BYTES must hold the worst case */
    char name[255], email[255];
    ji_row_t row;
    char buf[JI_ROW_MAX_BYTES(255, 255)];

    memset(name, '\\', sizeof(name));
    memset(email, '\n', sizeof(email));
    row = (ji_row_t){INT64_MIN,    name,          sizeof(name),
                     email,        sizeof(email), "aa/bb/0123456789abcdef0123456789abcdef.jpeg",
                     "image/jpeg", UINT64_MAX};
    CHECK(ji_row_encode(buf, sizeof(buf), &row) > 4 * 255);
}

UNIT_MAIN("row_encoder", {"plain_row", test_plain_row}, {"no_image", test_no_image},
          {"image_without_type", test_image_without_type}, {"every_escape", test_every_escape},
          {"other_bytes_pass", test_other_bytes_pass}, {"extreme_numbers", test_extreme_numbers},
          {"cap_edge", test_cap_edge}, {"max_bytes_bound", test_max_bytes_bound})
