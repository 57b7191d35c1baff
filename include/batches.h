/*
 * batches.h — the read side of the batches and their dead letters, as
 * ordinary h2o handlers:
 *
 *   GET /batches/{id}             one batch as a JSON object
 *   GET /batches                  every batch as JSON Lines, in batch_id order (after_id, limit)
 *   GET /batches/{id}/rejected    the batch's rejected records as JSON Lines, in line order
 *   GET /batches/{id}/rejected?format=raw
 *                                 the rejected lines byte for byte, each followed by "\n" (truncated ones left out)
 *
 * Database work goes through the worker's non-blocking pool; nothing blocks.
 *
 * Memory: /batches/{id} holds one row. The two streams hold one pooled
 * connection and one REPEATABLE READ READ ONLY snapshot for the request and
 * at most two pages: one being sent, the next being fetched. A /batches page
 * is JI_EXPORT_PAGE_ROWS rows, like the users export. A /rejected page is at
 * most JI_REJECTED_PAGE_ROWS records and stops before JI_REJECTED_PAGE_BYTES
 * of record (and error) bytes, holding always at least one record (so one
 * page is at most max(JI_REJECTED_PAGE_BYTES, the longest record)); it is
 * written out JI_REJECTED_CHUNK_BYTES at a time, so escaping and base64 cost
 * no extra copy of the page. A client that goes away frees everything (the
 * request pool's dispose callback gives the connection back rolled back).
 */
#ifndef JI_BATCHES_H
#define JI_BATCHES_H

#include <h2o.h>

/** Registers /batches (and what lies below it) on `host`. */
void ji_batches_register(h2o_hostconf_t *host);

#endif
