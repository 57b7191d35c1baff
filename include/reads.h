/*
 * reads.h — the read side of the users, as ordinary h2o handlers:
 * GET /users/{id}, GET /users/{id}/image, and the streamed export
 * GET /users (JSON Lines) and GET /users.csv. Database work goes through the
 * worker's non-blocking pool (ji_pg_call_t); nothing here blocks on the
 * network. Health is health.h's, metrics metrics.h's.
 *
 * Memory: a single-row read holds one row; an image is streamed from its file
 * in JI_IMAGE_CHUNK_BYTES pieces. The export (export.h: one snapshot, rows
 * below the export horizon) holds at most two pages. A client that goes away
 * mid-response frees everything (the request pool's dispose callback cancels
 * the database operation, or gives the export's connection back rolled back).
 */
#ifndef JI_READS_H
#define JI_READS_H

#include <h2o.h>

typedef struct st_ji_worker_t ji_worker_t;

/**
 * Every request under /users that is not a POST: GET or HEAD of /users (export), /users/{id} and
 * /users/{id}/image; other methods get 405 with Allow, other paths 404 (JSON bodies). Returns 0 (always handled).
 */
int ji_reads_handle_users(ji_worker_t *w, h2o_req_t *req);

/** Registers /users.csv on `host`. */
void ji_reads_register(h2o_hostconf_t *host);

#endif
