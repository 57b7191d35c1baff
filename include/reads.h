/*
 * reads.h — the read side, as ordinary h2o handlers: GET /users/{id},
 * GET /users/{id}/image, the streamed export GET /users (JSON Lines) and
 * GET /users.csv, GET /readyz and GET /metrics. Database work goes through
 * the worker's non-blocking pool.
 */
#ifndef JI_READS_H
#define JI_READS_H

#include "server.h"

/** GET and HEAD requests under /users (the POST ones never come here). Returns 0, or -1 when not handled. */
int ji_reads_handle_users(ji_worker_t *w, h2o_req_t *req);

/** Registers /readyz, /metrics and /users.csv on `host`. */
void ji_reads_register(h2o_hostconf_t *host);

#endif
