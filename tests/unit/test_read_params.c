/*
 * test_read_params.c — known answers for the read side's parameters: ids
 * (digits only, 1 to 19 of them, at most INT64_MAX), query strings split into
 * parameters, the keyset window and its 400s, and echoed values; and the JSON
 * escaping of a string given in pieces, which /rejected relies on.
 */
#include "json_text.h"
#include "read_params.h"
#include "unit.h"

#include <stdlib.h>
#include <string.h>

static int parse(const char *s, int64_t *out)
{
    return ji_parse_int64(s, strlen(s), out);
}

static void test_int64(void)
{
    int64_t v = -1;

    CHECK_EQ_INT(parse("0", &v), 0);
    CHECK_EQ_INT(v, 0);
    CHECK_EQ_INT(parse("007", &v), 0);
    CHECK_EQ_INT(v, 7);
    CHECK_EQ_INT(parse("9223372036854775807", &v), 0);
    CHECK(v == INT64_MAX);
    static const char *const bad[] = {"",
                                      "-1",
                                      "+1",
                                      " 1",
                                      "1 ",
                                      "1.5",
                                      "1e3",
                                      "0x1",
                                      "9223372036854775808",
                                      "18446744073709551616",
                                      "00000000000000000001",
                                      "%31"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        v = 42;
        CHECK_EQ_INT(parse(bad[i], &v), -1);
        CHECK_EQ_INT(v, 42);
    }
}

static void test_query(void)
{
    const char *q = "&after_id=5&&limit&format=raw&x=", *end = q + strlen(q), *cur = q;
    ji_query_param_t p;

    CHECK(ji_query_next(&cur, end, &p));
    CHECK(ji_query_param_is(&p, "after_id") && p.value_len == 1 && p.value[0] == '5');
    CHECK(ji_query_next(&cur, end, &p));
    CHECK(!p.has_value && p.key_len == 5 && !ji_query_param_is(&p, "limit")); /* a bare key has no value */
    CHECK(ji_query_next(&cur, end, &p));
    CHECK(ji_query_param_is(&p, "format") && p.value_len == 3 && memcmp(p.value, "raw", 3) == 0);
    CHECK(ji_query_next(&cur, end, &p));
    CHECK(ji_query_param_is(&p, "x") && p.value_len == 0);
    CHECK(!ji_query_next(&cur, end, &p));
    CHECK(!ji_query_next(&cur, end, &p));
    cur = end = "";
    CHECK(!ji_query_next(&cur, end, &p));
}

static int keyset(const char *param, ji_keyset_t *k, ji_error_t *err)
{
    const char *cur = param;
    ji_query_param_t p;

    if (!ji_query_next(&cur, param + strlen(param), &p))
        return -2;
    return ji_keyset_param(&p, k, err);
}

static void test_keyset(void)
{
    ji_keyset_t k = {.after_id = 0, .limit = UINT64_MAX};
    ji_error_t err;

    CHECK_EQ_INT(keyset("after_id=12", &k, &err), 1);
    CHECK_EQ_INT(keyset("limit=0", &k, &err), 1);
    CHECK(k.after_id == 12 && k.limit == 0);
    CHECK_EQ_INT(keyset("formulas=raw", &k, &err), 0);
    CHECK_EQ_INT(keyset("limit", &k, &err), 0);
    CHECK_EQ_INT(keyset("limit=-1", &k, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_MALFORMED);
    CHECK_EQ_STR(err.message, "limit must be an integer from 0 to 9223372036854775807, not \"-1\"");
    CHECK_EQ_INT(keyset("after_id=\x01x", &k, &err), -1);
    CHECK_EQ_STR(err.message, "after_id must be an integer from 0 to 9223372036854775807, not \"?x\"");
    CHECK(k.after_id == 12 && k.limit == 0);
}

static void test_echo(void)
{
    char buf[JI_ECHO_MAX + 1], long_value[100];

    CHECK_EQ_STR(ji_echo_value(buf, "a\r\nb\xff", 5), "a??b?");
    memset(long_value, 'z', sizeof(long_value));
    CHECK_EQ_INT(strlen(ji_echo_value(buf, long_value, sizeof(long_value))), JI_ECHO_MAX);
}

static void test_escape_in_pieces(void)
{
    static const char s[] = "q\"\\\x01\n\xc3\xa9\x7f end";
    ji_text_t whole = {0}, pieces = {0};

    ji_text_json_escape(&whole, s, sizeof(s) - 1);
    CHECK_EQ_STR(whole.base, "q\\\"\\\\\\u0001\\n\xc3\xa9\x7f end");
    for (size_t i = 0; i < sizeof(s) - 1; i++)
        ji_text_json_escape(&pieces, s + i, 1); /* cut anywhere, even inside a character */
    CHECK(pieces.len == whole.len && memcmp(pieces.base, whole.base, whole.len) == 0);
    ji_text_free(&pieces);
    ji_text_json_string(&pieces, s, sizeof(s) - 1);
    CHECK(pieces.len == whole.len + 2 && pieces.base[0] == '"' && pieces.base[pieces.len - 1] == '"');
    ji_text_free(&whole);
    ji_text_free(&pieces);
}

UNIT_MAIN("read_params", {"int64", test_int64}, {"query", test_query}, {"keyset", test_keyset}, {"echo", test_echo},
          {"escape_in_pieces", test_escape_in_pieces})
