/*
 * export.h — the streamed export of the users (GET /users as JSON Lines,
 * GET /users.csv), and the export horizon that makes its cursor safe.
 *
 * One export request is one database snapshot: it holds one pooled
 * connection from its first statement to its last, reads the horizon, then
 * every page inside one REPEATABLE READ READ ONLY transaction (keyset pages
 * of JI_EXPORT_PAGE_ROWS rows, at most two pages in memory). It returns only
 * rows with a user_id below the horizon: below the first id every ingest
 * still in flight may take, so that a consumer that resumes with
 * after_id=<greatest id seen> never skips a row that commits later.
 *
 * The horizon lives in the database: each ingest takes, before its COPY
 * takes any id from the sequence, a shared transaction advisory lock whose
 * two-int4 key names its lower bound (JI_EXPORT_HORIZON_LOCK_SQL); the
 * export reads the sequence, then pg_locks (JI_EXPORT_HORIZON_SQL). A lock
 * lasts as long as its transaction, and dies with its session, so the bound
 * holds across instances sharing the database and across crashes.
 */
#ifndef JI_EXPORT_H
#define JI_EXPORT_H

#include <h2o.h>
#include <stdbool.h>
#include <stdint.h>
#include "service_limits.h"
#include "user_format.h"

typedef struct st_ji_worker_t ji_worker_t;

/**
 * The first 8 bits of the first int4 of an ingest's horizon lock ('J'); the other 24 bits and the second int4
 * hold its lower bound (56 bits: bounds are capped at JI_EXPORT_HORIZON_MAX_BOUND, which only delays rows).
 */
#define JI_EXPORT_HORIZON_TAG 74
#define JI_EXPORT_HORIZON_TAG_KEY "1241513984"          /* JI_EXPORT_HORIZON_TAG << 24 */
#define JI_EXPORT_HORIZON_MAX_BOUND "72057594037927935" /* 2^56 - 1 */

/** The next id the users sequence gives (1 when it gave none yet): a lower bound of every id taken later. */
#define JI_EXPORT_SEQ_NEXT_SQL                                                                                         \
    "coalesce(pg_sequence_last_value(pg_get_serial_sequence('users', 'user_id')::regclass) + 1, 1)"

/**
 * An ingest's horizon step, in its transaction before its COPY: a shared advisory lock, held to COMMIT or
 * ROLLBACK, naming the next id of the sequence. Every id the COPY takes afterwards is at least that bound, which
 * the statement returns as its first column (the ingest looks for its first user id from there).
 * Shared, so that any number of ingests hold the same bound at once without waiting.
 */
#define JI_EXPORT_HORIZON_LOCK_SQL                                                                                     \
    "SELECT b, pg_advisory_xact_lock_shared((" JI_EXPORT_HORIZON_TAG_KEY " | (b >> 32))::int4, "                       \
    "(b & 4294967295)::bit(32)::int4) FROM (SELECT least(" JI_EXPORT_SEQ_NEXT_SQL ", " JI_EXPORT_HORIZON_MAX_BOUND     \
    ") AS b OFFSET 0) s"

/**
 * The horizon: the next id of the sequence, lowered to the bound of every ingest lock of this database. The
 * sequence is read first (the lock subquery depends on its value): an ingest that locks after pg_locks was read
 * takes its ids after the sequence was read, so above the horizon. No sequence: no horizon (INT64_MAX).
 */
#define JI_EXPORT_HORIZON_SQL                                                                                          \
    "SELECT CASE WHEN q.seq IS NULL THEN 9223372036854775807 ELSE least(q.next, (SELECT "                              \
    "min(((l.classid::bigint & 16777215) << 32) | l.objid::bigint) FROM pg_locks l WHERE l.locktype = 'advisory' "     \
    "AND l.objsubid = 2 AND l.classid::bigint >> 24 = " JI_STR(                                                        \
        JI_EXPORT_HORIZON_TAG) " AND l.database = (SELECT oid "                                                        \
                               "FROM pg_database WHERE datname = current_database()) AND q.next IS NOT NULL)) END "    \
                               "FROM (SELECT r.seq, "                                                                  \
                               "coalesce(pg_sequence_last_value(r.seq) + 1, 1) AS next FROM (SELECT "                  \
                               "pg_get_serial_sequence('users', "                                                      \
                               "'user_id')::regclass AS seq) r OFFSET 0) q"

/** The export's query parameters. */
typedef struct st_ji_export_query_t {
    int64_t after_id;           /**< only users after this one (0) */
    uint64_t limit;             /**< at most this many rows (UINT64_MAX: all) */
    ji_csv_formulas_t formulas; /**< CSV only: formulas=raw, else neutralised */
} ji_export_query_t;

/**
 * Starts the export answering `req` (GET or HEAD, `head`), as CSV when `csv`. The database must be usable (the
 * caller checked). Everything lives in the request's pool; a client that goes away gives the connection back
 * (the transaction rolled back) through the pool's dispose callback.
 */
void ji_export_start(ji_worker_t *w, h2o_req_t *req, bool csv, bool head, const ji_export_query_t *q);

#endif
