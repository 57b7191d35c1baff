/*
 * schema.c — owns the database schema: creates the `batches` and `users`
 * tables and the users(batch_id) index when missing (batches also keeps each
 * Idempotency-Key with the answer it got), upgrades a `users` table
 * made by someone else (a benchmark harness's (user_id, name, email, image))
 * with the columns the service needs, and answers whether a batch key
 * committed. Blocking libpq on purpose: it runs before any event loop starts
 * and from the `gc` command, never on a loop.
 */
#include "schema.h"

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
                                         "created_at timestamptz NOT NULL DEFAULT now())";

/* batches from before Idempotency-Key support (a small table: the lock of ALTER is harmless at start-up) */
static const char SQL_BATCHES_IDEMPOTENCY[] = "ALTER TABLE batches "
                                              "ADD COLUMN IF NOT EXISTS idempotency_key text UNIQUE, "
                                              "ADD COLUMN IF NOT EXISTS response text";

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
    if (count_out != NULL)
        *count_out = PQntuples(res) == 1 ? strtol(PQgetvalue(res, 0, 0), NULL, 10) : 0;
    ret = 0;

cleanup:
    PQclear(res);
    return ret;
}

int ji_schema_ensure(PGconn *conn, ji_error_t *err)
{
    long missing = 0, indexes = 0;

    if (exec_expect(conn, "BEGIN", PGRES_COMMAND_OK, "BEGIN", err, NULL) != 0)
        return -1;
    /* "relation already exists, skipping" is expected on every start but the first: keep it out of stderr. */
    if (exec_expect(conn, "SET LOCAL client_min_messages = warning", PGRES_COMMAND_OK, "SET", err, NULL) != 0)
        goto rollback;
    if (exec_expect(conn, "SELECT pg_advisory_xact_lock(" JI_SCHEMA_LOCK_KEY ")", PGRES_TUPLES_OK,
                    "taking the schema lock", err, NULL) != 0)
        goto rollback;
    if (exec_expect(conn, SQL_CREATE_BATCHES, PGRES_COMMAND_OK, "creating table batches", err, NULL) != 0)
        goto rollback;
    if (exec_expect(conn, SQL_BATCHES_IDEMPOTENCY, PGRES_COMMAND_OK, "adding idempotency columns to batches", err,
                    NULL) != 0)
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
    /* a failed COMMIT has ended the transaction already: nothing to roll back */
    return exec_expect(conn, "COMMIT", PGRES_COMMAND_OK, "COMMIT", err, NULL);

rollback:
    PQclear(PQexec(conn, "ROLLBACK"));
    return -1;
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
