/*
 * schema.h — the tables the service needs, created at startup if missing.
 *   batches(batch_id bigserial pk, batch_key text unique, idempotency_key text unique, response text,
 *           request_digest bytea, created_at, inserted, skipped, lines, images, bytes bigint), with an index on
 *           created_at of the rows that hold a key
 *   rejected_records(batch_id bigint references batches on delete cascade, line bigint, error text not null,
 *           field text, record bytea not null, truncated boolean, primary key (batch_id, line))
 *   users(user_id bigserial pk, name varchar(255) not null, email varchar(255) not null, image_path text,
 *         image_type text, image_size bigint, batch_id bigint, created_at timestamptz)
 * Uses a blocking libpq connection: only ever called before an event loop runs, or from `gc`.
 */
#ifndef JI_SCHEMA_H
#define JI_SCHEMA_H

#include <libpq-fe.h>
#include "common.h"

/** Creates what is missing (idempotent, safe when several processes start at once). 0 or -1 with `err` filled. */
int ji_schema_ensure(PGconn *conn, ji_error_t *err) JI_MUST_CHECK;

/**
 * Clears the Idempotency-Keys older than `ttl_s` seconds (key, kept answer and digest; the batches and their
 * rows stay), JI_IDEMPOTENCY_SWEEP_ROWS per transaction until none is left. Keys being reused at this moment
 * are skipped. Counts the cleared keys in `cleared` (may be NULL). 0, or -1 with `err` filled.
 */
int ji_schema_expire_idempotency_keys(PGconn *conn, unsigned ttl_s, uint64_t *cleared, ji_error_t *err) JI_MUST_CHECK;

/**
 * The same sweep as one statement for the event loop (one round trip, at most JI_IDEMPOTENCY_SWEEP_ROWS keys,
 * its lock waits bounded by JI_PG_LOCK_TIMEOUT_MS), written into `buf` (JI_SCHEMA_EXPIRE_STATEMENT_CAP bytes).
 */
#define JI_SCHEMA_EXPIRE_STATEMENT_CAP 640
void ji_schema_expire_keys_statement(char *buf, size_t cap, unsigned ttl_s);

/** Whether the batch with this key committed: 1 yes, 0 no, -1 could not tell. */
int ji_schema_batch_committed(PGconn *conn, const char *batch_key);

#endif
