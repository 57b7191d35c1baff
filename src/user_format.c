/*
 * user_format.c — owns the written forms of a user row: the JSON object of
 * GET /users/{id} and the JSON Lines export, the CSV record of the CSV export,
 * and the CSV cell (RFC 4180 quoting, formula neutralisation).
 */
#include "user_format.h"

#include <string.h>

#define APPEND_LIT(t, s) ji_text_append((t), (s), sizeof(s) - 1)

static void append_col(ji_text_t *t, const PGresult *res, int row, int col)
{
    ji_text_append(t, PQgetvalue(res, row, col), (size_t)PQgetlength(res, row, col));
}

/** A JSON number column (bigint text), or null. */
static void json_number_or_null(ji_text_t *t, const PGresult *res, int row, int col)
{
    if (PQgetisnull(res, row, col))
        APPEND_LIT(t, "null");
    else
        append_col(t, res, row, col);
}

static void json_string_or_null(ji_text_t *t, const PGresult *res, int row, int col)
{
    if (PQgetisnull(res, row, col))
        APPEND_LIT(t, "null");
    else
        ji_text_json_string(t, PQgetvalue(res, row, col), (size_t)PQgetlength(res, row, col));
}

static bool has_image(const PGresult *res, int row)
{
    return PQgetvalue(res, row, JI_USER_COL_HAS_IMAGE)[0] == 't';
}

void ji_user_json(ji_text_t *t, const PGresult *res, int row)
{
    APPEND_LIT(t, "{\"user_id\":");
    append_col(t, res, row, JI_USER_COL_ID);
    APPEND_LIT(t, ",\"name\":");
    json_string_or_null(t, res, row, JI_USER_COL_NAME);
    APPEND_LIT(t, ",\"email\":");
    json_string_or_null(t, res, row, JI_USER_COL_EMAIL);
    APPEND_LIT(t, ",\"image_url\":");
    if (has_image(res, row)) {
        APPEND_LIT(t, "\"/users/");
        append_col(t, res, row, JI_USER_COL_ID);
        APPEND_LIT(t, "/image\"");
    } else {
        APPEND_LIT(t, "null");
    }
    APPEND_LIT(t, ",\"image_type\":");
    json_string_or_null(t, res, row, JI_USER_COL_IMAGE_TYPE);
    APPEND_LIT(t, ",\"image_size\":");
    json_number_or_null(t, res, row, JI_USER_COL_IMAGE_SIZE);
    APPEND_LIT(t, ",\"batch_id\":");
    json_number_or_null(t, res, row, JI_USER_COL_BATCH_ID);
    APPEND_LIT(t, ",\"created_at\":");
    json_string_or_null(t, res, row, JI_USER_COL_CREATED_AT);
    APPEND_LIT(t, "}\n");
}

/** A comma, then the column as a CSV cell (NULL is an empty cell). */
static void csv_col(ji_text_t *t, const PGresult *res, int row, int col, ji_csv_formulas_t formulas)
{
    APPEND_LIT(t, ",");
    if (!PQgetisnull(res, row, col))
        ji_csv_cell(t, PQgetvalue(res, row, col), (size_t)PQgetlength(res, row, col), formulas);
}

void ji_user_csv(ji_text_t *t, const PGresult *res, int row, ji_csv_formulas_t formulas)
{
    append_col(t, res, row, JI_USER_COL_ID); /* a bigint: digits only */
    csv_col(t, res, row, JI_USER_COL_NAME, formulas);
    csv_col(t, res, row, JI_USER_COL_EMAIL, formulas);
    APPEND_LIT(t, ",");
    if (has_image(res, row)) {
        APPEND_LIT(t, "/users/");
        append_col(t, res, row, JI_USER_COL_ID);
        APPEND_LIT(t, "/image");
    }
    csv_col(t, res, row, JI_USER_COL_IMAGE_TYPE, formulas);
    csv_col(t, res, row, JI_USER_COL_IMAGE_SIZE, formulas);
    csv_col(t, res, row, JI_USER_COL_BATCH_ID, formulas);
    csv_col(t, res, row, JI_USER_COL_CREATED_AT, formulas);
    APPEND_LIT(t, "\r\n");
}

bool ji_csv_is_formula(const char *s, size_t len)
{
    return len > 0 && memchr("=+-@\t\r", s[0], 6) != NULL;
}

static bool needs_quotes(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (s[i] == ',' || s[i] == '"' || s[i] == '\r' || s[i] == '\n')
            return true;
    return false;
}

void ji_csv_cell(ji_text_t *t, const char *s, size_t len, ji_csv_formulas_t formulas)
{
    bool quote = needs_quotes(s, len);
    size_t start = 0;

    if (quote)
        APPEND_LIT(t, "\"");
    if (formulas == JI_CSV_FORMULAS_NEUTRALISE && ji_csv_is_formula(s, len))
        APPEND_LIT(t, "'");
    if (!quote) {
        ji_text_append(t, s, len);
        return;
    }
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '"') {
            ji_text_append(t, s + start, i + 1 - start); /* up to and including the quote ... */
            start = i;                                   /* ... which is written again: "" */
        }
    }
    ji_text_append(t, s + start, len - start);
    APPEND_LIT(t, "\"");
}
