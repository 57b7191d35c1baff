/*
 * reads.h — the read side, as ordinary h2o handlers: GET /users/{id},
 * GET /users/{id}/image, the streamed export GET /users (JSON Lines) and
 * GET /users.csv, GET /readyz and GET /metrics. Database work goes through
 * the worker's non-blocking pool; nothing here blocks on the network.
 *
 * Memory: a single-row read holds one row; an image is streamed from its file
 * in JI_READS_IMAGE_CHUNK_BYTES pieces; an export holds at most two pages of
 * JI_READS_EXPORT_PAGE_ROWS rows (one being sent, one being fetched), whatever
 * the size of the table. A client that goes away mid-response frees everything
 * (the request pool's dispose callback cancels the database operation).
 */
#ifndef JI_READS_H
#define JI_READS_H

#include "server.h"

/** Rows fetched by one export query (keyset pagination: WHERE user_id > last ORDER BY user_id LIMIT this). */
#define JI_READS_EXPORT_PAGE_ROWS 1000
/** Bytes of an image file read and sent at a time. */
#define JI_READS_IMAGE_CHUNK_BYTES (64u * 1024)
/** GET /readyz answers 503 when the database round trip takes longer than this many seconds. */
#define JI_READS_READYZ_TIMEOUT_S 2
/** Retry-After (seconds) of a 503 from the read side. */
#define JI_READS_RETRY_AFTER_S 1

/**
 * Every request under /users that is not a POST: GET or HEAD of /users (export), /users/{id} and
 * /users/{id}/image; other methods get 405, other paths 404 (JSON bodies). Returns 0 (always handled).
 */
int ji_reads_handle_users(ji_worker_t *w, h2o_req_t *req);

/** Registers /readyz, /metrics and /users.csv on `host`. */
void ji_reads_register(h2o_hostconf_t *host);

#endif
