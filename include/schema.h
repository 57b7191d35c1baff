/*
 * schema.h — the tables the service needs, created at startup if missing.
 *   batches(batch_id bigserial pk, batch_key text unique, idempotency_key text unique, response text, created_at)
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

/** Whether the batch with this key committed: 1 yes, 0 no, -1 could not tell. */
int ji_schema_batch_committed(PGconn *conn, const char *batch_key);

#endif
