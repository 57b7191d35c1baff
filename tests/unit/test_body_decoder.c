/* test_body_decoder.c — Content-Length and chunked framing, decoded in place, cut at every byte boundary. */
#include <stdlib.h>

#include "body_decoder.h"
#include "unit.h"

/*
 * Simulates the front door: bytes arrive in pieces of `step` into a buffer; the decoder prepares them; the test
 * consumes everything available. Returns the decoded body, and in *rest what followed the body.
 */
static int run(bool chunked, uint64_t content_length, const char *wire, size_t wire_len, size_t step, char *body,
               size_t *body_len, char *rest, size_t *rest_len)
{
    ji_body_decoder_t d;
    char buf[4096];
    size_t buf_len = 0, fed = 0;
    ji_error_t err;

    if (chunked)
        ji_body_decoder_init_chunked(&d);
    else
        ji_body_decoder_init_length(&d, content_length);
    *body_len = 0;
    while (!ji_body_decoder_done(&d)) {
        size_t n = wire_len - fed < step ? wire_len - fed : step, avail;
        if (n == 0)
            return -2; /* ran out of input before the body ended */
        memcpy(buf + buf_len, wire + fed, n);
        buf_len += n;
        fed += n;
        if (ji_body_decoder_prepare(&d, buf, &buf_len, &avail, &err) != 0)
            return -1;
        memcpy(body + *body_len, buf, avail);
        *body_len += avail;
        memmove(buf, buf + avail, buf_len - avail);
        buf_len -= avail;
        ji_body_decoder_consumed(&d, avail);
    }
    memcpy(rest, buf, buf_len);
    memcpy(rest + buf_len, wire + fed, wire_len - fed);
    *rest_len = buf_len + wire_len - fed;
    return 0;
}

static void test_content_length(void)
{
    static const char wire[] = "{\"a\":1}\n{\"b\":2}\nGET / HTTP/1.1\r\n\r\n";
    char body[256], rest[256];
    size_t body_len, rest_len;

    for (size_t step = 1; step <= sizeof(wire) - 1; step++) {
        CHECK_EQ_INT(run(false, 16, wire, sizeof(wire) - 1, step, body, &body_len, rest, &rest_len), 0);
        CHECK_EQ_INT(body_len, 16);
        CHECK(memcmp(body, wire, 16) == 0);
        CHECK_EQ_INT(rest_len, sizeof(wire) - 1 - 16);
        CHECK(memcmp(rest, wire + 16, rest_len) == 0);
    }
}

static void test_empty_length(void)
{
    char body[16], rest[16];
    size_t body_len, rest_len;

    CHECK_EQ_INT(run(false, 0, "", 0, 1, body, &body_len, rest, &rest_len), 0);
    CHECK_EQ_INT(body_len, 0);
}

static void test_chunked_every_step(void)
{
    static const char wire[] = "7\r\n{\"a\":1}\r\n"
                               "1;ext=1\r\n\n\r\n"
                               "A\r\n{\"bb\":22}\n\r\n"
                               "0\r\nX-Trailer: t\r\n\r\n"
                               "POST /users HTTP/1.1\r\n";
    static const char expect_body[] = "{\"a\":1}\n{\"bb\":22}\n";
    static const char expect_rest[] = "POST /users HTTP/1.1\r\n";
    char body[256], rest[256];
    size_t body_len, rest_len;

    for (size_t step = 1; step <= sizeof(wire) - 1; step++) {
        CHECK_EQ_INT(run(true, 0, wire, sizeof(wire) - 1, step, body, &body_len, rest, &rest_len), 0);
        CHECK_EQ_INT(body_len, sizeof(expect_body) - 1);
        CHECK(memcmp(body, expect_body, body_len) == 0);
        CHECK_EQ_INT(rest_len, sizeof(expect_rest) - 1);
        CHECK(memcmp(rest, expect_rest, rest_len) == 0);
    }
}

static void test_chunked_malformed(void)
{
    static const char wire[] = "zz\r\nhello\r\n0\r\n\r\n";
    char body[64], rest[64];
    size_t body_len, rest_len;

    CHECK_EQ_INT(run(true, 0, wire, sizeof(wire) - 1, 64, body, &body_len, rest, &rest_len), -1);
}

static void test_chunked_truncated(void)
{
    static const char wire[] = "5\r\nhel";
    char body[64], rest[64];
    size_t body_len, rest_len;

    CHECK_EQ_INT(run(true, 0, wire, sizeof(wire) - 1, 2, body, &body_len, rest, &rest_len), -2);
    CHECK_EQ_INT(body_len, 3);
}

static void test_partial_consumption(void)
{
    /* the consumer takes only part of what is available: the rest stays decoded at the front */
    static const char wire[] = "4\r\nabcd\r\n4\r\nefgh\r\n0\r\n\r\n";
    ji_body_decoder_t d;
    char buf[64];
    size_t buf_len = 13, avail;
    ji_error_t err;

    ji_body_decoder_init_chunked(&d);
    memcpy(buf, wire, 13);
    CHECK_EQ_INT(ji_body_decoder_prepare(&d, buf, &buf_len, &avail, &err), 0);
    CHECK_EQ_INT(avail, 5);
    CHECK(memcmp(buf, "abcde", 5) == 0);
    memmove(buf, buf + 2, buf_len - 2); /* consume "ab" */
    buf_len -= 2;
    ji_body_decoder_consumed(&d, 2);
    memcpy(buf + buf_len, wire + 13, sizeof(wire) - 1 - 13);
    buf_len += sizeof(wire) - 1 - 13;
    CHECK_EQ_INT(ji_body_decoder_prepare(&d, buf, &buf_len, &avail, &err), 0);
    CHECK_EQ_INT(avail, 6);
    CHECK(memcmp(buf, "cdefgh", 6) == 0);
    CHECK(d.complete);
    ji_body_decoder_consumed(&d, 6);
    CHECK(ji_body_decoder_done(&d));
}

UNIT_MAIN("body_decoder", {"content_length", test_content_length}, {"empty_length", test_empty_length},
          {"chunked_every_step", test_chunked_every_step}, {"chunked_malformed", test_chunked_malformed},
          {"chunked_truncated", test_chunked_truncated}, {"partial_consumption", test_partial_consumption})
