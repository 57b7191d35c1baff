/*
 * reads.h — the read side, as ordinary h2o handlers: GET /users/{id},
 * GET /users/{id}/image, the streamed export GET /users (JSON Lines) and
 * GET /users.csv, GET /readyz and GET /metrics. Database work goes through
 * the worker's non-blocking pool; nothing here blocks on the network.
 *
 * Memory: a single-row read holds one row; an image is streamed from its file
 * in JI_IMAGE_CHUNK_BYTES pieces; an export holds at most two pages of
 * JI_EXPORT_PAGE_ROWS rows (one being sent, one being fetched), whatever
 * the size of the table. A client that goes away mid-response frees everything
 * (the request pool's dispose callback cancels the database operation).
 */
#ifndef JI_READS_H
#define JI_READS_H

#include "server.h"


/**
 * Every request under /users that is not a POST: GET or HEAD of /users (export), /users/{id} and
 * /users/{id}/image; other methods get 405, other paths 404 (JSON bodies). Returns 0 (always handled).
 */
int ji_reads_handle_users(ji_worker_t *w, h2o_req_t *req);

/** Registers /readyz, /metrics and /users.csv on `host`. */
void ji_reads_register(h2o_hostconf_t *host);

#endif
