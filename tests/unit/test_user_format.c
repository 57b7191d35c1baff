/*
 * test_user_format.c — known answers for the written forms of a user row:
 * one CSV cell (RFC 4180 quoting, neutralisation of each leading character
 * that makes a spreadsheet evaluate a cell, the raw mode, the cells that must
 * stay untouched) and whole rows as JSON and CSV, built from PGresults made
 * in memory (PQmakeEmptyPGresult + PQsetvalue: no database needed).
 */
#include "user_format.h"
#include "unit.h"

#include <stdlib.h>
#include <string.h>

/* The cell as the export writes it (NUL-terminated copy in `out`, which the caller frees). */
static char *cell(const char *s, size_t len, ji_csv_formulas_t formulas)
{
    ji_text_t t = {0};
    char *out;

    ji_csv_cell(&t, s, len, formulas);
    CHECK(!t.failed);
    out = malloc(t.len + 1);
    memcpy(out, t.base != NULL ? t.base : "", t.len);
    out[t.len] = '\0';
    ji_text_free(&t);
    return out;
}

#define CHECK_CELL(in, formulas, want)                                                                                 \
    do {                                                                                                               \
        char *got_ = cell((in), strlen(in), (formulas));                                                               \
        CHECK_EQ_STR(got_, (want));                                                                                    \
        free(got_);                                                                                                    \
    } while (0)

static void test_plain(void)
{
    CHECK_CELL("vladimir", JI_CSV_FORMULAS_NEUTRALISE, "vladimir");
    CHECK_CELL("", JI_CSV_FORMULAS_NEUTRALISE, "");
    CHECK_CELL("a=b+c-d@e", JI_CSV_FORMULAS_NEUTRALISE, "a=b+c-d@e"); /* only the first character counts */
    CHECK_CELL(" =1", JI_CSV_FORMULAS_NEUTRALISE, " =1");
    CHECK_CELL("'quoted already", JI_CSV_FORMULAS_NEUTRALISE, "'quoted already");
    CHECK_CELL("Ελένη", JI_CSV_FORMULAS_NEUTRALISE, "Ελένη");
}

static void test_quoting(void)
{
    CHECK_CELL("Smith, John", JI_CSV_FORMULAS_NEUTRALISE, "\"Smith, John\"");
    CHECK_CELL("say \"hi\"", JI_CSV_FORMULAS_NEUTRALISE, "\"say \"\"hi\"\"\"");
    CHECK_CELL("\"", JI_CSV_FORMULAS_NEUTRALISE, "\"\"\"\"");
    CHECK_CELL("multi\nline", JI_CSV_FORMULAS_NEUTRALISE, "\"multi\nline\"");
    CHECK_CELL("cr\rlf\n", JI_CSV_FORMULAS_RAW, "\"cr\rlf\n\"");
}

static void test_formulas_neutralised(void)
{
    CHECK_CELL("=HYPERLINK(\"http://x\")", JI_CSV_FORMULAS_NEUTRALISE, "\"'=HYPERLINK(\"\"http://x\"\")\"");
    CHECK_CELL("=1+2", JI_CSV_FORMULAS_NEUTRALISE, "'=1+2");
    CHECK_CELL("+1", JI_CSV_FORMULAS_NEUTRALISE, "'+1");
    CHECK_CELL("-1", JI_CSV_FORMULAS_NEUTRALISE, "'-1");
    CHECK_CELL("@SUM(A1)", JI_CSV_FORMULAS_NEUTRALISE, "'@SUM(A1)");
    CHECK_CELL("\tx", JI_CSV_FORMULAS_NEUTRALISE, "'\tx");
    CHECK_CELL("\rx", JI_CSV_FORMULAS_NEUTRALISE, "\"'\rx\""); /* CR also makes the cell quoted */
    CHECK_CELL("=", JI_CSV_FORMULAS_NEUTRALISE, "'=");
    CHECK_CELL("-1,2", JI_CSV_FORMULAS_NEUTRALISE, "\"'-1,2\"");
}

static void test_raw(void)
{
    CHECK_CELL("=HYPERLINK(\"http://x\")", JI_CSV_FORMULAS_RAW, "\"=HYPERLINK(\"\"http://x\"\")\"");
    CHECK_CELL("+1", JI_CSV_FORMULAS_RAW, "+1");
    CHECK_CELL("-1", JI_CSV_FORMULAS_RAW, "-1");
    CHECK_CELL("@SUM(A1)", JI_CSV_FORMULAS_RAW, "@SUM(A1)");
    CHECK_CELL("\tx", JI_CSV_FORMULAS_RAW, "\tx");
    CHECK_CELL("\rx", JI_CSV_FORMULAS_RAW, "\"\rx\"");
    CHECK_CELL("plain", JI_CSV_FORMULAS_RAW, "plain");
}

static void test_is_formula(void)
{
    const char *lead = "=+-@\t\r";

    for (int c = 0; c < 256; c++) {
        char s[2] = {(char)c, 'x'};
        bool want = c != 0 && strchr(lead, c) != NULL;
        CHECK_EQ_INT(ji_csv_is_formula(s, 2), want);
    }
    CHECK(!ji_csv_is_formula("", 0));
    CHECK(!ji_csv_is_formula("=", 0)); /* the length decides, not a terminator */
}

static void test_embedded_nul_and_length(void)
{
    /* the cell is `len` bytes, not a C string: bytes past `len` are not read, NULs inside are kept */
    char *got = cell("-1,2", 2, JI_CSV_FORMULAS_NEUTRALISE);
    ji_text_t t = {0};

    CHECK_EQ_STR(got, "'-1");
    free(got);
    ji_csv_cell(&t, "a\0\"", 3, JI_CSV_FORMULAS_NEUTRALISE);
    CHECK_EQ_INT(t.len, 6);
    CHECK(t.base != NULL && memcmp(t.base, "\"a\0\"\"\"", 6) == 0);
    ji_text_free(&t);
}

/* ------------------------------------------------------------------ whole rows */

/* A result of JI_USER_COLUMNS with one row; NULL values are SQL NULLs. The caller PQclear()s it. */
static PGresult *user_result(const char *const values[JI_USER_NCOLS])
{
    static const char *const names[JI_USER_NCOLS] = {"user_id",    "name",       "email",    "has_image",
                                                     "image_type", "image_size", "batch_id", "created_at"};
    PGresAttDesc attrs[JI_USER_NCOLS];
    PGresult *res = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);

    CHECK(res != NULL);
    memset(attrs, 0, sizeof(attrs));
    for (int i = 0; i < JI_USER_NCOLS; i++) {
        attrs[i].name = (char *)names[i];
        attrs[i].typlen = -1;
    }
    CHECK(PQsetResultAttrs(res, JI_USER_NCOLS, attrs));
    for (int i = 0; i < JI_USER_NCOLS; i++)
        CHECK(PQsetvalue(res, 0, i, (char *)values[i], values[i] != NULL ? (int)strlen(values[i]) : -1));
    return res;
}

static char *row_text(const PGresult *res, bool csv, ji_csv_formulas_t formulas)
{
    ji_text_t t = {0};
    char *out;

    if (csv)
        ji_user_csv(&t, res, 0, formulas);
    else
        ji_user_json(&t, res, 0);
    CHECK(!t.failed && t.base != NULL);
    out = strdup(t.base != NULL ? t.base : "");
    ji_text_free(&t);
    return out;
}

#define CHECK_ROW(res, csv, formulas, want)                                                                            \
    do {                                                                                                               \
        char *got_ = row_text((res), (csv), (formulas));                                                               \
        CHECK_EQ_STR(got_, (want));                                                                                    \
        free(got_);                                                                                                    \
    } while (0)

static void test_row_with_image(void)
{
    const char *v[JI_USER_NCOLS] =
        {"42", "Smith, \"Bob\"", "bob@example.com", "t", "image/png", "452", "7", "2024-05-01T12:34:56.123456Z"};
    PGresult *res = user_result(v);

    CHECK_ROW(res, false, JI_CSV_FORMULAS_NEUTRALISE,
              "{\"user_id\":42,\"name\":\"Smith, \\\"Bob\\\"\",\"email\":\"bob@example.com\","
              "\"image_url\":\"/users/42/image\",\"image_type\":\"image/png\",\"image_size\":452,\"batch_id\":7,"
              "\"created_at\":\"2024-05-01T12:34:56.123456Z\"}\n");
    CHECK_ROW(res, true, JI_CSV_FORMULAS_NEUTRALISE,
              "42,\"Smith, \"\"Bob\"\"\",bob@example.com,/users/42/image,image/png,452,7,"
              "2024-05-01T12:34:56.123456Z\r\n");
    PQclear(res);
}

static void test_row_without_image(void)
{
    const char *v[JI_USER_NCOLS] = {"1", "ann", "a@b.c", "f", NULL, NULL, NULL, "2024-05-01T00:00:00.000000Z"};
    PGresult *res = user_result(v);

    CHECK_ROW(res, false, JI_CSV_FORMULAS_NEUTRALISE,
              "{\"user_id\":1,\"name\":\"ann\",\"email\":\"a@b.c\",\"image_url\":null,\"image_type\":null,"
              "\"image_size\":null,\"batch_id\":null,\"created_at\":\"2024-05-01T00:00:00.000000Z\"}\n");
    /* NULL is an empty cell; the columns stay in place */
    CHECK_ROW(res, true, JI_CSV_FORMULAS_NEUTRALISE, "1,ann,a@b.c,,,,,2024-05-01T00:00:00.000000Z\r\n");
    PQclear(res);
}

static void test_row_formulas(void)
{
    const char *v[JI_USER_NCOLS] = {"3", "=HYPERLINK(\"http://x\")",   "-x@y.z", "f", NULL, NULL,
                                    "9", "2024-05-01T00:00:00.000000Z"};
    PGresult *res = user_result(v);

    /* every text cell is neutralised, names and e-mails alike; JSON is not a spreadsheet format: unchanged */
    CHECK_ROW(res, true, JI_CSV_FORMULAS_NEUTRALISE,
              "3,\"'=HYPERLINK(\"\"http://x\"\")\",'-x@y.z,,,,9,2024-05-01T00:00:00.000000Z\r\n");
    CHECK_ROW(res, true, JI_CSV_FORMULAS_RAW,
              "3,\"=HYPERLINK(\"\"http://x\"\")\",-x@y.z,,,,9,2024-05-01T00:00:00.000000Z\r\n");
    CHECK_ROW(res, false, JI_CSV_FORMULAS_NEUTRALISE,
              "{\"user_id\":3,\"name\":\"=HYPERLINK(\\\"http://x\\\")\",\"email\":\"-x@y.z\",\"image_url\":null,"
              "\"image_type\":null,\"image_size\":null,\"batch_id\":9,"
              "\"created_at\":\"2024-05-01T00:00:00.000000Z\"}\n");
    PQclear(res);
}

static void test_csv_header_matches_the_row(void)
{
    const char *v[JI_USER_NCOLS] = {"1", "a", "b", "t", "c", "2", "3", "d"};
    PGresult *res = user_result(v);
    char *row = row_text(res, true, JI_CSV_FORMULAS_NEUTRALISE);
    int header_commas = 0, row_commas = 0;

    for (const char *p = JI_USER_CSV_HEADER; *p; p++)
        header_commas += *p == ',';
    for (const char *p = row; *p; p++)
        row_commas += *p == ',';
    CHECK_EQ_INT(header_commas, JI_USER_NCOLS - 1);
    CHECK_EQ_INT(row_commas, header_commas);
    free(row);
    PQclear(res);
}

UNIT_MAIN("user_format", {"plain", test_plain}, {"quoting", test_quoting},
          {"formulas_neutralised", test_formulas_neutralised}, {"raw", test_raw}, {"is_formula", test_is_formula},
          {"embedded_nul_and_length", test_embedded_nul_and_length}, {"row_with_image", test_row_with_image},
          {"row_without_image", test_row_without_image}, {"row_formulas", test_row_formulas},
          {"csv_header_matches_the_row", test_csv_header_matches_the_row})
