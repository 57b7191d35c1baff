/*
 * batches.c — owns the read side of the batches and their dead letters:
 * GET /batches/{id} (one batch), GET /batches (every batch, JSON Lines) and
 * GET /batches/{id}/rejected (a batch's rejected records as JSON Lines, or
 * with ?format=raw the rejected lines byte for byte).
 *
 * GET /batches/{id} is one statement on a pooled connection (ji_pg_call_t).
 * The two streams have export.c's shape, with state of their own:
 *
 *   CONNECTING -> BEGIN -> [EXISTS] -> PAGE -> PAGE ... -> (connection back)
 *
 * BEGIN opens a REPEATABLE READ READ ONLY transaction on a connection held for
 * the request; EXISTS (the rejected records only) answers 404 for an unknown
 * batch before anything is sent; each PAGE is a keyset statement (batch_id >
 * $last, or line > $last). The next page is fetched while the current one is
 * being sent, and no further: memory is two pages, whatever the table.
 *
 * A page of rejected records is cut by rows and by bytes in one statement: of
 * the next JI_REJECTED_PAGE_ROWS records, those whose running sum of bytes
 * (record, error and field) stays within JI_REJECTED_PAGE_BYTES, and always
 * the first. Records come as hex text (encode(record, 'hex'), whatever the
 * server's bytea_output) and are decoded into the page. The answer is then
 * written from the page JI_REJECTED_CHUNK_BYTES at a time: a record that is
 * valid UTF-8 as a JSON string, any other as base64, or, for format=raw, the
 * bytes as they are. Escaping (up to 6 bytes for one) thus never makes a copy
 * of the page.
 *
 * Errors before the status line are JSON answers (a database's own words go
 * to the log); after it the response ends without its final chunk, so the
 * client sees a cut transfer. Any h2o_send or ji_reply_* may dispose the
 * request at once: it is the last thing a function does.
 */
#include "batches.h"

#include <inttypes.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "handler_reply.h"
#include "json_text.h"
#include "pg.h"
#include "read_params.h"
#include "server.h"
#include "user_format.h"
#include "utf8.h"

#define BATCH_COLUMNS                                                                                                  \
    "batch_id, " JI_SQL_TIMESTAMP("created_at") ", inserted, skipped, lines, images, bytes, idempotency_key"
enum { COL_ID, COL_CREATED_AT, COL_INSERTED, COL_SKIPPED, COL_LINES, COL_IMAGES, COL_BYTES, COL_KEY, BATCH_NCOLS };

static const char SQL_BATCH[] = "SELECT " BATCH_COLUMNS " FROM batches WHERE batch_id = $1";
static const char SQL_BATCH_PAGE[] =
    "SELECT " BATCH_COLUMNS " FROM batches WHERE batch_id > $1 ORDER BY batch_id LIMIT $2";
static const char SQL_BEGIN[] = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
static const char SQL_EXISTS[] = "SELECT 1 FROM batches WHERE batch_id = $1";

/*
 * A page of rejected records: $1 the batch, $2 the last line sent, $3 JI_REJECTED_PAGE_ROWS, $4
 * JI_REJECTED_PAGE_BYTES. `window_rows` is how many records the row window held: fewer than $3, all returned, means
 * this is the last page. octet_length reads a stored value's size without fetching it.
 */
#define REJECTED_PAGE_SQL(cols, bytes, where)                                                                          \
    "SELECT line, " cols ", encode(record, 'hex'), truncated, window_rows FROM (SELECT r.*, "                          \
    "count(*) OVER () AS window_rows, row_number() OVER w AS i, sum(" bytes ") OVER w AS upto FROM "                   \
    "(SELECT line, error, field, record, truncated FROM rejected_records WHERE batch_id = $1 AND line > $2" where      \
    " ORDER BY line LIMIT $3) r WINDOW w AS (ORDER BY line ROWS UNBOUNDED PRECEDING)) s "                              \
    "WHERE i = 1 OR upto <= $4 ORDER BY line"
static const char SQL_REJECTED_PAGE[] =
    REJECTED_PAGE_SQL("error, field", "octet_length(record) + octet_length(error) + coalesce(octet_length(field), 0)",
                      "");
/* format=raw: only the records, truncated ones left out */
static const char SQL_RAW_PAGE[] =
    REJECTED_PAGE_SQL("'' AS error, NULL::text AS field", "octet_length(record)", " AND NOT truncated");
enum { REJ_COL_LINE, REJ_COL_ERROR, REJ_COL_FIELD, REJ_COL_RECORD, REJ_COL_TRUNCATED, REJ_COL_WINDOW, REJ_NCOLS };

/** Room for an int64 in decimal, sign and NUL included: the text of a statement parameter. */
#define INT64_TEXT 24
/** Bytes of a record base64-encoded at a time (a multiple of 3), and the room their text takes. */
#define BASE64_PIECE 3072
#define BASE64_PIECE_TEXT (BASE64_PIECE / 3 * 4 + 1)

#define APPEND_LIT(t, s) ji_text_append((t), (s), sizeof(s) - 1)

/* ------------------------------------------------------------------ common steps */

/** GET or HEAD (`*head` says which); anything else is answered 405 (and false). routes.c refused them already. */
static bool accept_method(h2o_req_t *req, bool *head)
{
    *head = h2o_memis(req->method.base, req->method.len, H2O_STRLIT("HEAD"));
    if (*head || h2o_memis(req->method.base, req->method.len, H2O_STRLIT("GET")))
        return true;
    ji_reply_method_not_allowed(req, "GET, HEAD");
    return false;
}

/** The database is usable for reads: the schema exists (start-up finished). Else answers 503. */
static bool db_usable(ji_worker_t *w, h2o_req_t *req)
{
    if (atomic_load_explicit(&w->server->db_ready, memory_order_acquire))
        return true;
    ji_reply_errorf(req, JI_ERR_DB,
                    "database unavailable: the schema is not ready yet "
                    "(the database was unreachable at start; retrying)");
    return false;
}

static bool stopping(const ji_worker_t *w)
{
    return atomic_load_explicit(&w->server->stopping, memory_order_relaxed);
}

/** A result has rows of `ncols` columns. */
static bool result_ok(const PGresult *res, int ncols)
{
    return res != NULL && PQresultStatus(res) == PGRES_TUPLES_OK && PQnfields(res) == ncols;
}

/* ------------------------------------------------------------------ one batch as JSON */

static void append_col(ji_text_t *t, const PGresult *res, int row, int col)
{
    ji_text_append(t, PQgetvalue(res, row, col), (size_t)PQgetlength(res, row, col));
}

static void number_or_null(ji_text_t *t, const PGresult *res, int row, int col)
{
    if (PQgetisnull(res, row, col))
        APPEND_LIT(t, "null");
    else
        append_col(t, res, row, col);
}

static void string_or_null(ji_text_t *t, const PGresult *res, int row, int col)
{
    if (PQgetisnull(res, row, col))
        APPEND_LIT(t, "null");
    else
        ji_text_json_string(t, PQgetvalue(res, row, col), (size_t)PQgetlength(res, row, col));
}

/** Row `row` of `res` (BATCH_COLUMNS) as a JSON object and a newline. */
static void batch_json(ji_text_t *t, const PGresult *res, int row)
{
    const char *skipped = PQgetvalue(res, row, COL_SKIPPED);
    bool rejected = !PQgetisnull(res, row, COL_SKIPPED) && skipped[0] != '-' && strcmp(skipped, "0") != 0;

    APPEND_LIT(t, "{\"batch_id\":");
    append_col(t, res, row, COL_ID);
    APPEND_LIT(t, ",\"created_at\":");
    string_or_null(t, res, row, COL_CREATED_AT);
    APPEND_LIT(t, ",\"inserted\":");
    number_or_null(t, res, row, COL_INSERTED);
    APPEND_LIT(t, ",\"skipped\":");
    number_or_null(t, res, row, COL_SKIPPED);
    APPEND_LIT(t, ",\"lines\":");
    number_or_null(t, res, row, COL_LINES);
    APPEND_LIT(t, ",\"images\":");
    number_or_null(t, res, row, COL_IMAGES);
    APPEND_LIT(t, ",\"bytes\":");
    number_or_null(t, res, row, COL_BYTES);
    APPEND_LIT(t, ",\"idempotency_key\":");
    string_or_null(t, res, row, COL_KEY);
    APPEND_LIT(t, ",\"rejected_url\":");
    if (rejected) {
        APPEND_LIT(t, "\"/batches/");
        append_col(t, res, row, COL_ID);
        APPEND_LIT(t, "/rejected\"");
    } else {
        APPEND_LIT(t, "null");
    }
    APPEND_LIT(t, "}\n");
}

/* ------------------------------------------------------------------ GET /batches/{id} */

typedef struct st_batch_read_t {
    ji_pg_call_t call;
    h2o_req_t *req;
    int64_t id;
    char id_text[INT64_TEXT];
    const char *values[1];
} batch_read_t;

static void batch_read_dispose(void *p)
{
    ji_pg_call_cancel(&((batch_read_t *)p)->call);
}

static void batch_on_result(ji_pg_call_t *call, PGresult *res, const char *err)
{
    batch_read_t *b = JI_CONTAINER_OF(call, batch_read_t, call);
    ji_text_t t = {0};

    if (err != NULL) {
        fprintf(stderr, "GET /batches/%" PRId64 ": database: %s\n", b->id, err);
        ji_reply_errorf(b->req, JI_ERR_DB, "database error");
        return;
    }
    if (!result_ok(res, BATCH_NCOLS)) {
        ji_reply_errorf(b->req, JI_ERR_INTERNAL, "unexpected answer from the database");
        return;
    }
    if (PQntuples(res) == 0) {
        ji_reply_errorf(b->req, JI_ERR_NOT_FOUND, "no batch %" PRId64, b->id);
        return;
    }
    batch_json(&t, res, 0);
    ji_reply_ok_text(b->req, "application/json", &t);
}

static void get_batch(ji_worker_t *w, h2o_req_t *req, int64_t id)
{
    batch_read_t *b = h2o_mem_alloc_shared(&req->pool, sizeof(*b), batch_read_dispose);

    memset(b, 0, sizeof(*b));
    b->req = req;
    b->id = id;
    snprintf(b->id_text, sizeof(b->id_text), "%" PRId64, id);
    b->values[0] = b->id_text;
    if (stopping(w)) {
        ji_reply_errorf(req, JI_ERR_STOPPING, "the server is shutting down");
        return;
    }
    if (ji_pg_call_start(&b->call, w->pg_pool, SQL_BATCH, 1, b->values, batch_on_result) != 0)
        ji_reply_errorf(req, JI_ERR_INTERNAL, "out of memory");
}

/* ------------------------------------------------------------------ the streams: state */

typedef enum {
    STREAM_BATCHES,  /**< GET /batches */
    STREAM_REJECTED, /**< GET /batches/{id}/rejected: JSON Lines */
    STREAM_RAW,      /**< GET /batches/{id}/rejected?format=raw */
} stream_kind_t;

/** One rejected record of a page: its line and where its bytes are in the page. */
typedef struct st_rejected_row_t {
    int64_t line;
    size_t error_off, error_len, field_off, field_len, record_off, record_len;
    bool field_null, truncated;
    bool utf8; /**< the record is valid UTF-8: written as a JSON string, else as base64 */
} rejected_row_t;

/** One page: the JSON lines of batches in `text`, or rejected records described by `rows` over `bytes`. */
typedef struct st_page_t {
    ji_text_t text;
    char *bytes; /**< the error, field and record bytes of every row (malloc'd, exactly as many as needed) */
    rejected_row_t rows[JI_REJECTED_PAGE_ROWS];
    unsigned nrows;
    bool last; /**< no page follows */
} page_t;

/** Where the writing of a page of rejected records is: in which record, and in what part of it. */
typedef enum {
    PART_HEAD, /**< nothing of the record written yet */
    PART_BODY, /**< its bytes up to `off` written */
} part_t;

typedef struct st_stream_t {
    h2o_generator_t super;
    h2o_req_t *req;
    ji_worker_t *w;
    ji_pg_t *pg; /**< the request's connection, from the start to the last page (NULL before and after) */
    stream_kind_t kind;
    bool head;
    int64_t batch_id; /**< the rejected records' batch */
    ji_keyset_t k;    /**< after_id: then the last batch_id or line fetched; limit: then the batches still wanted */
    uint64_t fetched; /**< rows fetched so far (for messages) */
    unsigned asked;   /**< LIMIT of the running /batches fetch */
    char params[4][INT64_TEXT];
    const char *values[4];
    page_t page[2];
    unsigned filling; /**< index of the page the running fetch fills (or that is ready) */
    unsigned emit;    /**< index of the page being written out, while `emitting` */
    unsigned row;     /**< rejected records: the record being written ... */
    part_t part;      /**< ... what of it is written ... */
    size_t off;       /**< ... and how many of its bytes */
    ji_text_t out;    /**< rejected records: the piece h2o is sending */
    bool started;     /**< the response headers went out */
    bool sending;     /**< an h2o_send is in flight (what it points to must stay untouched) */
    bool ready;       /**< page[filling] is complete and waits for the previous page to be written out */
    bool emitting;    /**< page[emit] is being written out */
    bool page_done;   /**< ... and the piece in flight is its last */
    bool cut;         /**< no further page will come (a failure): end the response with an error */
} stream_t;

/* ------------------------------------------------------------------ the streams: pages */

static void stream_on_page(ji_pg_t *pg, void *ctx, PGresult *res, const char *err);

/** Gives the connection back: its read-only transaction rolls back in the background (a broken one is closed). */
static void stream_release(stream_t *s)
{
    if (s->pg != NULL) {
        ji_pg_pool_put_rollback(s->w->pg_pool, s->pg, NULL);
        s->pg = NULL;
    }
}

static void stream_dispose(void *p)
{
    stream_t *s = p;

    stream_release(s); /* a statement in flight is waited for (bounded), then ROLLBACK */
    for (int i = 0; i < 2; i++) {
        ji_text_free(&s->page[i].text);
        free(s->page[i].bytes);
        s->page[i].bytes = NULL;
    }
    ji_text_free(&s->out);
}

/** Logs why a stream whose 200 is out ends early (the client sees a cut response, no final chunk). */
static void stream_log_cut(stream_t *s, const char *why)
{
    fprintf(stderr, "GET %.*s: cut after %" PRIu64 " rows: %s\n", (int)s->req->path.len, s->req->path.base, s->fetched,
            why);
}

/**
 * A step failed before the status line went out: the database's words (`err`) go to the log, the client gets a
 * stable 503 (JI_ERR_DB) or, for another kind, the fixed `err`.
 */
static void stream_refuse(stream_t *s, ji_error_kind_t kind, const char *err)
{
    h2o_req_t *req = s->req;

    stream_release(s);
    if (kind == JI_ERR_DB) {
        fprintf(stderr, "GET %.*s: database: %s\n", (int)req->path.len, req->path.base, err);
        ji_reply_errorf(req, JI_ERR_DB, "database error");
        return;
    }
    ji_reply_errorf(req, kind, "%s", err);
}

/** Starts fetching the next page into page[filling]. NULL, or why not (the caller answers). */
static const char *stream_fetch(stream_t *s)
{
    int nparams = 4;
    const char *sql;

    if (stopping(s->w))
        return "the server is shutting down"; /* no new database work: the pool drains */
    if (s->kind == STREAM_BATCHES) {
        s->asked = s->k.limit < JI_EXPORT_PAGE_ROWS ? (unsigned)s->k.limit : JI_EXPORT_PAGE_ROWS;
        snprintf(s->params[0], sizeof(s->params[0]), "%" PRId64, s->k.after_id);
        snprintf(s->params[1], sizeof(s->params[1]), "%u", s->asked);
        sql = SQL_BATCH_PAGE;
        nparams = 2;
    } else {
        snprintf(s->params[0], sizeof(s->params[0]), "%" PRId64, s->batch_id);
        snprintf(s->params[1], sizeof(s->params[1]), "%" PRId64, s->k.after_id);
        snprintf(s->params[2], sizeof(s->params[2]), "%u", (unsigned)JI_REJECTED_PAGE_ROWS);
        snprintf(s->params[3], sizeof(s->params[3]), "%u", (unsigned)JI_REJECTED_PAGE_BYTES);
        sql = s->kind == STREAM_RAW ? SQL_RAW_PAGE : SQL_REJECTED_PAGE;
    }
    if (ji_pg_query(s->pg, sql, nparams, s->values, stream_on_page, s) != 0)
        return ji_pg_error(s->pg);
    return NULL;
}

/** Fills `p` with the batches of `res`. NULL, or why not. */
static const char *fill_batches(stream_t *s, page_t *p, const PGresult *res)
{
    int n = PQntuples(res);

    p->text.len = 0;
    for (int i = 0; i < n; i++)
        batch_json(&p->text, res, i);
    if (p->text.failed)
        return "out of memory";
    if (n > 0)
        s->k.after_id = strtoll(PQgetvalue(res, n - 1, COL_ID), NULL, 10);
    if (s->k.limit != UINT64_MAX)
        s->k.limit -= (uint64_t)n;
    p->nrows = (unsigned)n;
    p->last = (unsigned)n < s->asked || s->k.limit == 0;
    return NULL;
}

/** Decodes `len` hex digits into `out` (len / 2 bytes). 0, or -1 when they are not hex. */
static int hex_decode(const char *hex, size_t len, char *out)
{
    if (len % 2 != 0)
        return -1;
    for (size_t i = 0; i < len; i += 2) {
        int hi = ji_hex_value((unsigned char)hex[i]), lo = ji_hex_value((unsigned char)hex[i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        out[i / 2] = (char)(hi << 4 | lo);
    }
    return 0;
}

/** Copies column `col` of row `i` into the page's bytes at `*at`; its offset and length go to `off`, `len`. */
static void take_text(page_t *p, size_t *at, const PGresult *res, int i, int col, size_t *off, size_t *len)
{
    *off = *at;
    *len = (size_t)PQgetlength(res, i, col);
    memcpy(p->bytes + *at, PQgetvalue(res, i, col), *len);
    *at += *len;
}

/** Fills `p` with the rejected records of `res`, their bytes decoded. NULL, or why not. */
static const char *fill_rejected(stream_t *s, page_t *p, const PGresult *res)
{
    int n = PQntuples(res);
    size_t need = 0, at = 0;
    long long window;

    free(p->bytes); /* written out already: the page is the one to fill */
    p->bytes = NULL;
    p->nrows = 0;
    if (n > JI_REJECTED_PAGE_ROWS)
        return "unexpected answer from the database";
    for (int i = 0; i < n; i++)
        need += (size_t)PQgetlength(res, i, REJ_COL_ERROR) + (size_t)PQgetlength(res, i, REJ_COL_FIELD) +
                (size_t)PQgetlength(res, i, REJ_COL_RECORD) / 2;
    if ((p->bytes = malloc(need != 0 ? need : 1)) == NULL)
        return "out of memory";
    for (int i = 0; i < n; i++) {
        rejected_row_t *r = &p->rows[i];
        size_t hex_len = (size_t)PQgetlength(res, i, REJ_COL_RECORD);

        r->line = strtoll(PQgetvalue(res, i, REJ_COL_LINE), NULL, 10);
        take_text(p, &at, res, i, REJ_COL_ERROR, &r->error_off, &r->error_len);
        r->field_null = PQgetisnull(res, i, REJ_COL_FIELD);
        take_text(p, &at, res, i, REJ_COL_FIELD, &r->field_off, &r->field_len);
        r->record_off = at;
        r->record_len = hex_len / 2;
        if (hex_decode(PQgetvalue(res, i, REJ_COL_RECORD), hex_len, p->bytes + at) != 0)
            return "unexpected answer from the database";
        at += r->record_len;
        r->truncated = PQgetvalue(res, i, REJ_COL_TRUNCATED)[0] == 't';
        r->utf8 = s->kind == STREAM_REJECTED && ji_utf8_valid(p->bytes + r->record_off, r->record_len);
    }
    window = n > 0 ? strtoll(PQgetvalue(res, 0, REJ_COL_WINDOW), NULL, 10) : 0;
    p->nrows = (unsigned)n;
    if (n > 0)
        s->k.after_id = p->rows[n - 1].line;
    /* the row window was not full and every record in it came: nothing follows */
    p->last = n == 0 || (window == n && window < JI_REJECTED_PAGE_ROWS);
    return NULL;
}

/* ------------------------------------------------------------------ the streams: writing a page out */

/** The JSON of a rejected record up to the opening quote of its bytes. */
static void rejected_head(ji_text_t *o, const page_t *p, const rejected_row_t *r)
{
    ji_text_printf(o, "{\"line\":%" PRId64 ",\"error\":", r->line);
    ji_text_json_string(o, p->bytes + r->error_off, r->error_len);
    APPEND_LIT(o, ",\"field\":");
    if (r->field_null)
        APPEND_LIT(o, "null");
    else
        ji_text_json_string(o, p->bytes + r->field_off, r->field_len);
    if (r->utf8)
        APPEND_LIT(o, ",\"record\":\"");
    else
        APPEND_LIT(o, ",\"record\":null,\"record_base64\":\"");
}

/** Appends `len` bytes as standard base64 (padded); `len` is a multiple of 3 unless these are a record's last. */
static void append_base64(ji_text_t *o, const char *s, size_t len)
{
    unsigned char text[BASE64_PIECE_TEXT];

    while (len > 0) {
        size_t n = len < BASE64_PIECE ? len : BASE64_PIECE;
        int k = EVP_EncodeBlock(text, (const unsigned char *)s, (int)n);
        ji_text_append(o, (const char *)text, (size_t)k);
        s += n;
        len -= n;
    }
}

/**
 * Writes the next piece of page `p` into s->out: about JI_REJECTED_CHUNK_BYTES, from where the previous piece
 * ended. true when the page is written out whole.
 */
static bool write_rejected(stream_t *s, const page_t *p)
{
    ji_text_t *o = &s->out;

    o->len = 0;
    while (s->row < p->nrows && o->len < JI_REJECTED_CHUNK_BYTES && !o->failed) {
        const rejected_row_t *r = &p->rows[s->row];
        const char *rec = p->bytes + r->record_off + s->off;
        size_t left = r->record_len - s->off, room = JI_REJECTED_CHUNK_BYTES - o->len, n;

        if (s->part == PART_HEAD) {
            if (s->kind == STREAM_REJECTED)
                rejected_head(o, p, r);
            s->part = PART_BODY;
            s->off = 0;
            continue;
        }
        if (left > 0) {
            if (s->kind == STREAM_RAW) {
                n = left < room ? left : room;
                ji_text_append(o, rec, n);
            } else if (r->utf8) {
                n = left < room / 6 + 1 ? left : room / 6 + 1; /* an escaped byte takes up to 6 */
                ji_text_json_escape(o, rec, n);
            } else {
                n = (room / 4 + 1) * 3; /* 3 bytes make 4 characters */
                n = left < n ? left : n;
                append_base64(o, rec, n);
            }
            s->off += n;
            continue;
        }
        if (s->kind == STREAM_RAW)
            APPEND_LIT(o, "\n");
        else if (r->truncated)
            APPEND_LIT(o, "\",\"truncated\":true}\n");
        else
            APPEND_LIT(o, "\",\"truncated\":false}\n");
        s->row++;
        s->part = PART_HEAD;
    }
    return s->row >= p->nrows;
}

/** Sends the next piece of page[emit]: the whole text of a /batches page, or a piece of rejected records. */
static void stream_send_more(stream_t *s)
{
    page_t *p = &s->page[s->emit];
    h2o_iovec_t vec;

    if (s->kind == STREAM_BATCHES) {
        vec = h2o_iovec_init(p->text.base, p->text.len);
        s->page_done = true;
    } else {
        s->page_done = write_rejected(s, p);
        if (s->out.failed) {
            stream_log_cut(s, "out of memory");
            stream_release(s);
            h2o_send(s->req, NULL, 0, H2O_SEND_STATE_ERROR);
            return;
        }
        vec = h2o_iovec_init(s->out.base, s->out.len);
    }
    s->sending = true;
    h2o_send(s->req, &vec, vec.len != 0 ? 1 : 0,
             s->page_done && p->last ? H2O_SEND_STATE_FINAL : H2O_SEND_STATE_IN_PROGRESS);
}

/** The ready page becomes the one written out (the response starts with the first); the next fetch starts. */
static void stream_begin_page(stream_t *s)
{
    h2o_req_t *req = s->req;
    const char *why;

    s->emit = s->filling;
    s->filling ^= 1; /* the next fetch fills the other page */
    s->ready = false;
    s->emitting = true;
    s->row = 0;
    s->part = PART_HEAD;
    s->off = 0;
    if (!s->started) {
        const char *type = s->kind == STREAM_RAW ? "application/octet-stream" : "application/x-ndjson";
        s->started = true;
        req->res.status = 200;
        req->res.reason = "OK";
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL, type, strlen(type));
        if (s->kind == STREAM_RAW)
            h2o_add_header_by_str(&req->pool, &req->res.headers, H2O_STRLIT("x-content-type-options"), 0, NULL,
                                  H2O_STRLIT("nosniff"));
        h2o_start_response(req, &s->super);
        if (s->head) { /* HEAD: the status says the database answered; no body */
            stream_release(s);
            h2o_send(req, NULL, 0, H2O_SEND_STATE_FINAL);
            return;
        }
    }
    if (!s->page[s->emit].last && !s->cut && (why = stream_fetch(s)) != NULL) {
        stream_log_cut(s, why);
        stream_release(s);
        s->cut = true; /* this page still goes out; the response then ends with an error */
    }
    stream_send_more(s);
}

static void stream_on_page(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    stream_t *s = ctx;
    page_t *p = &s->page[s->filling];
    const char *why = err;

    (void)pg;
    if (why == NULL && !result_ok(res, s->kind == STREAM_BATCHES ? BATCH_NCOLS : REJ_NCOLS))
        why = "unexpected answer from the database";
    if (why == NULL)
        why = s->kind == STREAM_BATCHES ? fill_batches(s, p, res) : fill_rejected(s, p, res);
    if (why != NULL && !s->started) { /* nothing sent yet: an error answer */
        stream_refuse(s, err != NULL ? JI_ERR_DB : JI_ERR_INTERNAL, why);
        return;
    }
    if (why != NULL) { /* the status line is gone: the client sees a cut response (no final chunk) */
        stream_log_cut(s, why);
        stream_release(s);
        s->cut = true;
        if (!s->sending && !s->emitting)
            h2o_send(s->req, NULL, 0, H2O_SEND_STATE_ERROR);
        return; /* else ended once what is in flight went out */
    }
    s->fetched += p->nrows;
    if (p->last)
        stream_release(s); /* every row is in memory: the snapshot is no longer needed */
    s->ready = true;
    if (!s->sending && !s->emitting)
        stream_begin_page(s);
}

/** h2o sent the previous piece and wants more. */
static void stream_proceed(h2o_generator_t *self, h2o_req_t *req)
{
    stream_t *s = JI_CONTAINER_OF(self, stream_t, super);

    s->sending = false;
    if (s->emitting && !s->page_done) {
        stream_send_more(s);
        return;
    }
    s->emitting = false; /* page[emit] is free for the fetch after next */
    if (s->cut) {
        h2o_send(req, NULL, 0, H2O_SEND_STATE_ERROR);
        return;
    }
    if (s->ready)
        stream_begin_page(s);
    /* else the running fetch begins its page when it completes */
}

static void stream_stop(h2o_generator_t *self, h2o_req_t *req)
{
    (void)self;
    (void)req; /* the request pool's dispose callback gives the connection back and frees the pages */
}

/* ------------------------------------------------------------------ the streams: the first steps */

static void stream_on_exists(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    stream_t *s = ctx;
    const char *why;

    (void)pg;
    if (err != NULL) {
        stream_refuse(s, JI_ERR_DB, err);
        return;
    }
    if (!result_ok(res, 1)) {
        stream_refuse(s, JI_ERR_INTERNAL, "unexpected answer from the database");
        return;
    }
    if (PQntuples(res) == 0) {
        stream_release(s);
        ji_reply_errorf(s->req, JI_ERR_NOT_FOUND, "no batch %" PRId64, s->batch_id);
        return;
    }
    if ((why = stream_fetch(s)) != NULL)
        stream_refuse(s, stopping(s->w) ? JI_ERR_STOPPING : JI_ERR_DB, why);
}

static void stream_on_begin(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    stream_t *s = ctx;
    const char *why;

    (void)res;
    if (err != NULL) {
        stream_refuse(s, JI_ERR_DB, err);
        return;
    }
    if (s->kind != STREAM_BATCHES) {
        snprintf(s->params[0], sizeof(s->params[0]), "%" PRId64, s->batch_id);
        if (ji_pg_query(pg, SQL_EXISTS, 1, s->values, stream_on_exists, s) != 0)
            stream_refuse(s, JI_ERR_DB, ji_pg_error(pg));
        return;
    }
    if ((why = stream_fetch(s)) != NULL)
        stream_refuse(s, stopping(s->w) ? JI_ERR_STOPPING : JI_ERR_DB, why);
}

static void stream_on_connected(ji_pg_t *pg, void *ctx, const char *err)
{
    stream_t *s = ctx;

    if (err == NULL && ji_pg_query(pg, SQL_BEGIN, 0, NULL, stream_on_begin, s) == 0)
        return;
    stream_refuse(s, JI_ERR_DB, err != NULL ? err : ji_pg_error(pg));
}

/** Starts a stream answering `req`; the database must be usable (the caller checked). */
static void stream_start(ji_worker_t *w, h2o_req_t *req, stream_kind_t kind, bool head, int64_t batch_id,
                         const ji_keyset_t *k)
{
    stream_t *s = h2o_mem_alloc_shared(&req->pool, sizeof(*s), stream_dispose);

    memset(s, 0, sizeof(*s));
    s->super.proceed = stream_proceed;
    s->super.stop = stream_stop;
    s->req = req;
    s->w = w;
    s->kind = kind;
    s->head = head;
    s->batch_id = batch_id;
    s->k = *k;
    for (int i = 0; i < 4; i++)
        s->values[i] = s->params[i];
    if (stopping(w)) {
        ji_reply_errorf(req, JI_ERR_STOPPING, "the server is shutting down");
        return;
    }
    if ((s->pg = ji_pg_pool_get(w->pg_pool, stream_on_connected, s)) == NULL)
        ji_reply_errorf(req, JI_ERR_INTERNAL, "out of memory");
}

/* ------------------------------------------------------------------ queries and routes */

/** The query string of `req`: from after the '?' to `*end`. */
static const char *query_of(h2o_req_t *req, const char **end)
{
    *end = req->path.base + req->path.len;
    return req->query_at != SIZE_MAX ? req->path.base + req->query_at + 1 : *end;
}

/** GET /batches: `after_id` and `limit` as GET /users takes them (other parameters are ignored). */
static void list_batches(ji_worker_t *w, h2o_req_t *req, bool head)
{
    ji_keyset_t k = {.after_id = 0, .limit = UINT64_MAX};
    const char *end, *q = query_of(req, &end);
    ji_query_param_t p;
    ji_error_t err;

    while (ji_query_next(&q, end, &p)) {
        if (ji_keyset_param(&p, &k, &err) < 0) {
            ji_reply_error(req, &err);
            return;
        }
    }
    if (db_usable(w, req))
        stream_start(w, req, STREAM_BATCHES, head, 0, &k);
}

/** GET /batches/{id}/rejected: `format=json` (the default) or `format=raw`, and nothing else. */
static void list_rejected(ji_worker_t *w, h2o_req_t *req, bool head, int64_t id)
{
    ji_keyset_t k = {.after_id = INT64_MIN, .limit = UINT64_MAX};
    const char *end, *q = query_of(req, &end);
    stream_kind_t kind = STREAM_REJECTED;
    char echo[JI_ECHO_MAX + 1];
    bool format_seen = false;
    ji_query_param_t p;

    while (ji_query_next(&q, end, &p)) {
        if (!ji_query_param_is(&p, "format") || format_seen) {
            ji_reply_errorf(req, JI_ERR_MALFORMED,
                            "unknown or repeated query parameter \"%s\": use format=json or format=raw",
                            ji_echo_value(echo, p.key, p.key_len));
            return;
        }
        format_seen = true;
        if (h2o_memis(p.value, p.value_len, H2O_STRLIT("raw"))) {
            kind = STREAM_RAW;
        } else if (!h2o_memis(p.value, p.value_len, H2O_STRLIT("json"))) {
            ji_reply_errorf(req, JI_ERR_MALFORMED, "format must be \"json\" or \"raw\", not \"%s\"",
                            ji_echo_value(echo, p.value, p.value_len));
            return;
        }
    }
    if (db_usable(w, req))
        stream_start(w, req, kind, head, id, &k);
}

static int on_batches(h2o_handler_t *self, h2o_req_t *req)
{
    ji_worker_t *w = ji_worker_of(req->conn->ctx);
    /* the path as sent (routes.c matched it byte for byte), without the query */
    size_t len = req->query_at != SIZE_MAX ? req->query_at : req->path.len;
    const char *path = req->path.base, *seg, *slash;
    const size_t prefix = sizeof("/batches/") - 1;
    char echo[JI_ECHO_MAX + 1];
    size_t seg_len;
    int64_t id;
    bool head;

    (void)self;
    if (h2o_memis(path, len, H2O_STRLIT("/batches"))) {
        if (accept_method(req, &head))
            list_batches(w, req, head);
        return 0;
    }
    if (len <= prefix || memcmp(path, "/batches/", prefix) != 0) {
        ji_reply_errorf(req, JI_ERR_NOT_FOUND, "no such route");
        return 0;
    }
    seg = path + prefix;
    slash = memchr(seg, '/', len - prefix);
    seg_len = slash != NULL ? (size_t)(slash - seg) : len - prefix;
    if (slash != NULL && !h2o_memis(slash, len - prefix - seg_len, H2O_STRLIT("/rejected"))) {
        ji_reply_errorf(req, JI_ERR_NOT_FOUND, "no such route");
        return 0;
    }
    if (!accept_method(req, &head))
        return 0;
    if (ji_parse_int64(seg, seg_len, &id) != 0) {
        ji_reply_errorf(req, JI_ERR_MALFORMED, "batch id must be an integer from 0 to %" PRId64 ", not \"%s\"",
                        INT64_MAX, ji_echo_value(echo, seg, seg_len));
        return 0;
    }
    if (slash != NULL)
        list_rejected(w, req, head, id);
    else if (db_usable(w, req))
        get_batch(w, req, id);
    return 0;
}

void ji_batches_register(h2o_hostconf_t *host)
{
    h2o_pathconf_t *pathconf = h2o_config_register_path(host, "/batches", 0);
    h2o_handler_t *handler = h2o_create_handler(pathconf, sizeof(*handler));

    handler->on_req = on_batches;
}
