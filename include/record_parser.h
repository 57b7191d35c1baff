/*
 * record_parser.h — turns the lines of a JSON Lines body into validated user
 * records with yajl. It is fed line fragments (from the splitter), keeps one
 * yajl handle for the whole body, and knows nothing of sockets, files or
 * PostgreSQL: the image string is handed to its handler as soon as yajl
 * yields it, and each complete, valid record at the end of its line.
 *
 * Rules (docs/api.md, "Record"): a line is one JSON object (blank lines are
 * skipped); `name` (aliases `user`, `username`) and `email` are strings of 1
 * to 255 characters, `email` has exactly one '@' with text on both sides;
 * `image` is optional (a string, null or ""); other members are ignored.
 * A record nests at most JI_MAX_JSON_DEPTH containers (its own object
 * counting 1). Malformed JSON, invalid UTF-8 anywhere on the line or deeper
 * nesting is JI_ERR_MALFORMED;
 * a broken rule, `\u0000` or an unpaired surrogate escape in any string is
 * JI_ERR_INVALID with the field named.
 */
#ifndef JI_RECORD_PARSER_H
#define JI_RECORD_PARSER_H

#include "common.h"

/** One validated record. The pointers live until the handler call returns. */
typedef struct st_ji_record_t {
    uint64_t line;
    const char *name;
    size_t name_len;
    const char *email;
    size_t email_len;
    bool has_image; /**< on_image was called for this record */
} ji_record_t;

typedef struct st_ji_record_handler_t {
    /**
     * The record's `image` string, whole, as JSON-decoded by yajl (base64, or a data: URL). Called at most once
     * per record, and only for a non-empty string; it may come before `name` and `email` are known. 0 = go on,
     * -1 = fail the record (fill `err`).
     */
    int (*on_image)(void *ctx, uint64_t line, const char *text, size_t len, ji_error_t *err);
    /** A complete, valid record. 0 = go on, 1 = pause after this record, -1 = fail (fill `err`). */
    int (*on_record)(void *ctx, const ji_record_t *rec, ji_error_t *err);
} ji_record_handler_t;

typedef struct st_ji_record_parser_t ji_record_parser_t;

/** Allocates a parser (caller frees with ji_record_parser_free). NULL when out of memory. */
ji_record_parser_t *ji_record_parser_new(const ji_record_handler_t *handler, void *ctx);
void ji_record_parser_free(ji_record_parser_t *p);

/** Next fragment of line `line`. 0 = fine so far, -1 = the line failed (`err` filled; see ji_record_parser_reset). */
int ji_record_parser_feed(ji_record_parser_t *p, uint64_t line, const char *data, size_t len,
                          ji_error_t *err) JI_MUST_CHECK;

/**
 * Line `line` ended. 0 = a record was delivered or the line was blank, 1 = delivered and on_record asked to
 * pause, -1 = the line failed (`err` filled).
 */
int ji_record_parser_end_line(ji_record_parser_t *p, uint64_t line, ji_error_t *err) JI_MUST_CHECK;

/**
 * Forgets the current line after a failure (a fresh yajl handle), so parsing can go on at the next line. When the
 * failure came from ji_record_parser_feed, the caller may skip the rest of that line itself or go on passing it:
 * further feeds and the end_line of the same line number are then ignored (they return 0). -1 = out of memory.
 */
int ji_record_parser_reset(ji_record_parser_t *p) JI_MUST_CHECK;

/**
 * The field rules on their own, for records that did not come through this parser (the JSON-array mode).
 * Checks strict UTF-8, length in characters, no NUL, and for email the '@' rule. 0 or -1 with `err` filled.
 */
int ji_record_check_name(const char *s, size_t len, uint64_t line, ji_error_t *err) JI_MUST_CHECK;
int ji_record_check_email(const char *s, size_t len, uint64_t line, ji_error_t *err) JI_MUST_CHECK;

#endif
