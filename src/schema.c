/*
 * schema.c — owns the database schema: creates the `batches` and `users`
 * tables and the users(batch_id) index when missing (batches also keeps each
 * Idempotency-Key with the answer it got and the digest of the request that
 * got it), upgrades a `users` table made by someone else (a benchmark
 * harness's (user_id, name, email, image)) and a `batches` table of an older
 * version with the columns the service needs, answers whether a batch key
 * committed, and clears expired Idempotency-Keys. Blocking libpq on purpose:
 * it runs before any event loop starts and from the `gc` command, never on a
 * loop (the service's own sweep only borrows the statement text).
 */
#include "schema.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/** Key of the transaction-scoped advisory lock that serialises schema creation across processes ("jsonlsch"). */
#define JI_SCHEMA_LOCK_KEY "7668516004150733672"

/* Each statement runs inside one transaction holding the advisory lock, so two processes starting at once
 * cannot both try to create the same table (CREATE TABLE IF NOT EXISTS alone races on pg_type). */
static const char SQL_CREATE_BATCHES[] = "CREATE TABLE IF NOT EXISTS batches ("
                                         "batch_id bigserial PRIMARY KEY, "
                                         "batch_key text NOT NULL UNIQUE, "
                                         "idempotency_key text UNIQUE, "
                                         "response text, "
                                         "request_digest bytea, "
                                         "created_at timestamptz NOT NULL DEFAULT now())";

/* ALTER TABLE takes an ACCESS EXCLUSIVE lock even when nothing is missing, and every running upload holds a lock
 * on batches: look at the catalog first, alter only a table of an older version. */
static const char SQL_BATCHES_MISSING_KEY[] =
    "SELECT count(*) FROM unnest(ARRAY['idempotency_key', 'response']) AS c WHERE NOT EXISTS "
    "(SELECT 1 FROM pg_attribute a WHERE a.attrelid = 'batches'::regclass AND a.attname = c AND NOT a.attisdropped)";

/* batches from before Idempotency-Key support */
static const char SQL_BATCHES_IDEMPOTENCY[] = "ALTER TABLE batches "
                                              "ADD COLUMN IF NOT EXISTS idempotency_key text UNIQUE, "
                                              "ADD COLUMN IF NOT EXISTS response text";

static const char SQL_BATCHES_HAS_DIGEST[] =
    "SELECT count(*) FROM pg_attribute a WHERE a.attrelid = 'batches'::regclass AND a.attname = 'request_digest' "
    "AND NOT a.attisdropped";

/* batches from before request digests (a key kept without one is replayed whatever the body) */
static const char SQL_BATCHES_DIGEST[] = "ALTER TABLE batches ADD COLUMN IF NOT EXISTS request_digest bytea";

/* batches from before their counts were kept (GET /batches reads them; NULL for batches older than that) */
static const char SQL_BATCHES_MISSING_COUNTS[] =
    "SELECT count(*) FROM unnest(ARRAY['inserted', 'skipped', 'lines', 'images', 'bytes']) AS c WHERE NOT EXISTS "
    "(SELECT 1 FROM pg_attribute a WHERE a.attrelid = 'batches'::regclass AND a.attname = c AND NOT a.attisdropped)";

static const char SQL_BATCHES_COUNTS[] = "ALTER TABLE batches "
                                         "ADD COLUMN IF NOT EXISTS inserted bigint, "
                                         "ADD COLUMN IF NOT EXISTS skipped bigint, "
                                         "ADD COLUMN IF NOT EXISTS lines bigint, "
                                         "ADD COLUMN IF NOT EXISTS images bigint, "
                                         "ADD COLUMN IF NOT EXISTS bytes bigint";

/*
 * The dead letters of skip mode: one row per rejected record, in its batch's transaction. `record` is the line
 * byte for byte without its line end (its first JI_DEAD_LETTER_KEEP_BYTES when `truncated`). Deleting a batch
 * deletes its dead letters.
 */
static const char SQL_CREATE_REJECTED[] = "CREATE TABLE IF NOT EXISTS rejected_records ("
                                          "batch_id bigint NOT NULL REFERENCES batches (batch_id) ON DELETE CASCADE, "
                                          "line bigint NOT NULL, "
                                          "error text NOT NULL, "
                                          "field text, "
                                          "record bytea NOT NULL, "
                                          "truncated boolean NOT NULL DEFAULT false, "
                                          "PRIMARY KEY (batch_id, line))";

/*
 * Resumable uploads (docs/resumable.md). `uploads` holds one row per upload resource: its options, its durable
 * offset and the counts of the lines before it, and once it ends its outcome (kept until `expires_at` so that a
 * client that lost the final answer can still read it). `batch_key` becomes the batch's key when the upload
 * commits and names the image journals of its appends. Staged rows and staged dead letters wait in
 * upload_rows and upload_rejected until the upload commits (moved into users / rejected_records) or ends
 * otherwise (deleted with the upload).
 */
static const char SQL_CREATE_UPLOADS[] = "CREATE TABLE IF NOT EXISTS uploads ("
                                         "upload_id bigserial PRIMARY KEY, "
                                         "token text NOT NULL UNIQUE, "
                                         "protocol text NOT NULL, "
                                         "batch_key text NOT NULL UNIQUE, "
                                         "length bigint, "
                                         "upload_offset bigint NOT NULL DEFAULT 0, "
                                         "lines bigint NOT NULL DEFAULT 0, "
                                         "inserted bigint NOT NULL DEFAULT 0, "
                                         "skipped bigint NOT NULL DEFAULT 0, "
                                         "images bigint NOT NULL DEFAULT 0, "
                                         "appends bigint NOT NULL DEFAULT 0, "
                                         "skip_errors boolean NOT NULL DEFAULT false, "
                                         "max_errors bigint, "
                                         "idempotency_key text, "
                                         "metadata text, "
                                         "state text NOT NULL DEFAULT 'open', "
                                         "batch_id bigint, "
                                         "answer_status integer, "
                                         "answer text, "
                                         "created_at timestamptz NOT NULL DEFAULT now(), "
                                         "updated_at timestamptz NOT NULL DEFAULT now(), "
                                         "expires_at timestamptz NOT NULL)";

static const char SQL_CREATE_UPLOAD_ROWS[] = "CREATE TABLE IF NOT EXISTS upload_rows ("
                                             "upload_id bigint NOT NULL REFERENCES uploads (upload_id) "
                                             "ON DELETE CASCADE, "
                                             "line bigint NOT NULL, "
                                             "name varchar(255) NOT NULL, "
                                             "email varchar(255) NOT NULL, "
                                             "image_path text, "
                                             "image_type text, "
                                             "image_size bigint, "
                                             "PRIMARY KEY (upload_id, line))";

static const char SQL_CREATE_UPLOAD_REJECTED[] = "CREATE TABLE IF NOT EXISTS upload_rejected ("
                                                 "upload_id bigint NOT NULL REFERENCES uploads (upload_id) "
                                                 "ON DELETE CASCADE, "
                                                 "line bigint NOT NULL, "
                                                 "error text NOT NULL, "
                                                 "field text, "
                                                 "record bytea NOT NULL, "
                                                 "truncated boolean NOT NULL DEFAULT false, "
                                                 "PRIMARY KEY (upload_id, line))";

static const char SQL_CREATE_UPLOADS_EXPIRY_INDEX[] =
    "CREATE INDEX IF NOT EXISTS uploads_expires_at_idx ON uploads (expires_at)";

/* the sweep of expired keys reads keys by age: a small index over the rows that still hold a key */
static const char SQL_HAS_KEY_AGE_INDEX[] =
    "SELECT count(*) FROM pg_class WHERE oid = to_regclass('batches_key_age_idx')";

static const char SQL_CREATE_KEY_AGE_INDEX[] =
    "CREATE INDEX IF NOT EXISTS batches_key_age_idx ON batches (created_at) WHERE idempotency_key IS NOT NULL";

/*
 * Clears up to JI_IDEMPOTENCY_SWEEP_ROWS keys older than the TTL (%u: seconds), oldest first; their batches and
 * rows stay. Rows locked by someone else (an upload reusing that key right now) are skipped, never waited for.
 */
#define SQL_EXPIRE_KEYS                                                                                                \
    "UPDATE batches SET idempotency_key = NULL, response = NULL, request_digest = NULL WHERE batch_id IN "             \
    "(SELECT batch_id FROM batches WHERE idempotency_key IS NOT NULL AND created_at < now() - make_interval(secs "     \
    "=> %u) ORDER BY created_at LIMIT " JI_STR(JI_IDEMPOTENCY_SWEEP_ROWS) " FOR UPDATE SKIP LOCKED)"

static const char SQL_CREATE_USERS[] = "CREATE TABLE IF NOT EXISTS users ("
                                       "user_id bigserial PRIMARY KEY, "
                                       "name varchar(255) NOT NULL, "
                                       "email varchar(255) NOT NULL, "
                                       "image_path text, "
                                       "image_type text, "
                                       "image_size bigint, "
                                       "batch_id bigint, "
                                       "created_at timestamptz NOT NULL DEFAULT now())";

/* ALTER TABLE takes an ACCESS EXCLUSIVE lock even when every column exists, which would queue behind running
 * ingests (and everything else behind it); so look at the catalog first and alter only when needed. */
static const char SQL_MISSING_COLUMNS[] =
    "SELECT count(*) FROM unnest(ARRAY['image_path', 'image_type', 'image_size', 'batch_id', 'created_at']) AS c "
    "WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = 'users'::regclass AND a.attname = c "
    "AND NOT a.attisdropped)";

static const char SQL_ADD_COLUMNS[] = "ALTER TABLE users "
                                      "ADD COLUMN IF NOT EXISTS image_path text, "
                                      "ADD COLUMN IF NOT EXISTS image_type text, "
                                      "ADD COLUMN IF NOT EXISTS image_size bigint, "
                                      "ADD COLUMN IF NOT EXISTS batch_id bigint, "
                                      "ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now()";

/* Any index whose first column is batch_id will do (CREATE INDEX IF NOT EXISTS locks the table first). */
static const char SQL_HAS_BATCH_INDEX[] =
    "SELECT count(*) FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
    "WHERE i.indrelid = 'users'::regclass AND a.attname = 'batch_id'";

static const char SQL_CREATE_BATCH_INDEX[] = "CREATE INDEX IF NOT EXISTS users_batch_id_idx ON users (batch_id)";

/** Runs `sql` expecting `want`; on failure fills `err` naming `what`. */
static int exec_expect(PGconn *conn, const char *sql, ExecStatusType want, const char *what, ji_error_t *err,
                       long *count_out)
{
    PGresult *res = PQexec(conn, sql);
    int ret = -1;

    if (PQresultStatus(res) != want) {
        const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
        if (msg == NULL)
            msg = PQerrorMessage(conn);
        ji_error_set(err, JI_ERR_DB, 0, NULL, "schema: %s failed: %s", what, msg);
        size_t n = strlen(err->message);
        while (n > 0 && (err->message[n - 1] == '\n' || err->message[n - 1] == ' '))
            err->message[--n] = '\0';
        goto cleanup;
    }
    if (count_out != NULL && want == PGRES_COMMAND_OK)
        *count_out = strtol(PQcmdTuples(res), NULL, 10); /* rows an UPDATE touched */
    else if (count_out != NULL)
        *count_out = PQntuples(res) == 1 ? strtol(PQgetvalue(res, 0, 0), NULL, 10) : 0;
    ret = 0;

cleanup:
    PQclear(res);
    return ret;
}

/** BEGIN, with every lock wait of the transaction bounded by JI_PG_LOCK_TIMEOUT_MS. */
static int begin_bounded(PGconn *conn, ji_error_t *err)
{
    if (exec_expect(conn, "BEGIN", PGRES_COMMAND_OK, "BEGIN", err, NULL) != 0)
        return -1;
    if (exec_expect(conn, "SET LOCAL lock_timeout = " JI_STR(JI_PG_LOCK_TIMEOUT_MS), PGRES_COMMAND_OK,
                    "setting lock_timeout", err, NULL) != 0) {
        PQclear(PQexec(conn, "ROLLBACK"));
        return -1;
    }
    return 0;
}

int ji_schema_ensure(PGconn *conn, ji_error_t *err)
{
    long missing = 0, indexes = 0, has_digest = 0;

    if (begin_bounded(conn, err) != 0)
        return -1;
    /* "relation already exists, skipping" is expected on every start but the first: keep it out of stderr. */
    if (exec_expect(conn, "SET LOCAL client_min_messages = warning", PGRES_COMMAND_OK, "SET", err, NULL) != 0)
        goto rollback;
    if (exec_expect(conn, "SELECT pg_advisory_xact_lock(" JI_SCHEMA_LOCK_KEY ")", PGRES_TUPLES_OK,
                    "taking the schema lock", err, NULL) != 0)
        goto rollback;
    if (exec_expect(conn, SQL_CREATE_BATCHES, PGRES_COMMAND_OK, "creating table batches", err, NULL) != 0)
        goto rollback;
    if (exec_expect(conn, SQL_BATCHES_MISSING_KEY, PGRES_TUPLES_OK, "reading the columns of batches", err, &missing) !=
        0)
        goto rollback;
    if (missing > 0 && exec_expect(conn, SQL_BATCHES_IDEMPOTENCY, PGRES_COMMAND_OK,
                                   "adding idempotency columns to batches", err, NULL) != 0)
        goto rollback;
    if (exec_expect(conn, SQL_BATCHES_HAS_DIGEST, PGRES_TUPLES_OK, "reading the columns of batches", err,
                    &has_digest) != 0)
        goto rollback;
    if (has_digest == 0 &&
        exec_expect(conn, SQL_BATCHES_DIGEST, PGRES_COMMAND_OK, "adding request_digest to batches", err, NULL) != 0)
        goto rollback;
    if (exec_expect(conn, SQL_BATCHES_MISSING_COUNTS, PGRES_TUPLES_OK, "reading the columns of batches", err,
                    &missing) != 0)
        goto rollback;
    if (missing > 0 &&
        exec_expect(conn, SQL_BATCHES_COUNTS, PGRES_COMMAND_OK, "adding counts to batches", err, NULL) != 0)
        goto rollback;
    if (exec_expect(conn, SQL_CREATE_REJECTED, PGRES_COMMAND_OK, "creating table rejected_records", err, NULL) != 0)
        goto rollback;
    if (exec_expect(conn, SQL_HAS_KEY_AGE_INDEX, PGRES_TUPLES_OK, "reading the indexes of batches", err, &indexes) != 0)
        goto rollback;
    if (indexes == 0 && exec_expect(conn, SQL_CREATE_KEY_AGE_INDEX, PGRES_COMMAND_OK,
                                    "creating index batches_key_age_idx", err, NULL) != 0)
        goto rollback;
    if (exec_expect(conn, SQL_CREATE_USERS, PGRES_COMMAND_OK, "creating table users", err, NULL) != 0)
        goto rollback;
    if (exec_expect(conn, SQL_MISSING_COLUMNS, PGRES_TUPLES_OK, "reading the columns of users", err, &missing) != 0)
        goto rollback;
    if (missing > 0 && exec_expect(conn, SQL_ADD_COLUMNS, PGRES_COMMAND_OK, "adding columns to users", err, NULL) != 0)
        goto rollback;
    if (exec_expect(conn, SQL_HAS_BATCH_INDEX, PGRES_TUPLES_OK, "reading the indexes of users", err, &indexes) != 0)
        goto rollback;
    if (indexes == 0 && exec_expect(conn, SQL_CREATE_BATCH_INDEX, PGRES_COMMAND_OK, "creating index users_batch_id_idx",
                                    err, NULL) != 0)
        goto rollback;
    if (exec_expect(conn, SQL_CREATE_UPLOADS, PGRES_COMMAND_OK, "creating table uploads", err, NULL) != 0)
        goto rollback;
    if (exec_expect(conn, SQL_CREATE_UPLOAD_ROWS, PGRES_COMMAND_OK, "creating table upload_rows", err, NULL) != 0)
        goto rollback;
    if (exec_expect(conn, SQL_CREATE_UPLOAD_REJECTED, PGRES_COMMAND_OK, "creating table upload_rejected", err, NULL) !=
        0)
        goto rollback;
    if (exec_expect(conn, SQL_CREATE_UPLOADS_EXPIRY_INDEX, PGRES_COMMAND_OK, "creating index uploads_expires_at_idx",
                    err, NULL) != 0)
        goto rollback;
    /* a failed COMMIT has ended the transaction already: nothing to roll back */
    return exec_expect(conn, "COMMIT", PGRES_COMMAND_OK, "COMMIT", err, NULL);

rollback:
    PQclear(PQexec(conn, "ROLLBACK"));
    return -1;
}

#define SQL_EXPIRE_KEYS_DO                                                                                             \
    "DO $$BEGIN PERFORM set_config('lock_timeout', '" JI_STR(JI_PG_LOCK_TIMEOUT_MS) "', true); " SQL_EXPIRE_KEYS       \
                                                                                    "; END$$"
_Static_assert(sizeof(SQL_EXPIRE_KEYS_DO) + 8 <= JI_SCHEMA_EXPIRE_STATEMENT_CAP, "the sweep statement must fit");

void ji_schema_expire_keys_statement(char *buf, size_t cap, unsigned ttl_s)
{
    /* a DO block plans its UPDATE after set_config ran, so the UPDATE's own lock waits are bounded too */
    snprintf(buf, cap, SQL_EXPIRE_KEYS_DO, ttl_s);
}

int ji_schema_expire_idempotency_keys(PGconn *conn, unsigned ttl_s, uint64_t *cleared, ji_error_t *err)
{
    char sql[sizeof(SQL_EXPIRE_KEYS) + 16];
    long n;

    if (cleared != NULL)
        *cleared = 0;
    snprintf(sql, sizeof(sql), SQL_EXPIRE_KEYS, ttl_s);
    do {
        if (begin_bounded(conn, err) != 0)
            return -1;
        if (exec_expect(conn, sql, PGRES_COMMAND_OK, "clearing expired Idempotency-Keys", err, &n) != 0) {
            PQclear(PQexec(conn, "ROLLBACK"));
            return -1;
        }
        if (exec_expect(conn, "COMMIT", PGRES_COMMAND_OK, "COMMIT", err, NULL) != 0)
            return -1;
        if (cleared != NULL)
            *cleared += (uint64_t)n;
    } while (n >= JI_IDEMPOTENCY_SWEEP_ROWS);
    return 0;
}

int ji_schema_batch_committed(PGconn *conn, const char *batch_key)
{
    const char *values[1] = {batch_key};
    PGresult *res = PQexecParams(conn, "SELECT 1 FROM batches WHERE batch_key = $1", 1, NULL, values, NULL, NULL, 0);
    int ret = -1;

    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        goto cleanup;
    ret = PQntuples(res) > 0 ? 1 : 0;

cleanup:
    PQclear(res);
    return ret;
}
