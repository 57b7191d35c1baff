/*
 * array_mode.h — POST /users with a JSON array: the baseline that shows what
 * buffering costs. Like the Node.js body-parser version it is naive on
 * purpose: h2o buffers the whole body, yajl builds the whole tree, then the
 * records go through the same checks, image store and COPY as JSON Lines.
 * Its memory grows with the body; --max-array-bytes bounds it.
 */
#ifndef JI_ARRAY_MODE_H
#define JI_ARRAY_MODE_H

#include "server.h"

/**
 * One JSON-array upload as the front door carries it to the handler: its options, and the places it holds.
 * Owned by the front door's upload, which lives until the answer is written.
 */
typedef struct st_ji_array_request_t {
    ji_ingest_params_t params;
    ji_worker_t *worker;
    size_t reserved; /**< bytes of the process-wide array budget held (0: none) */
} ji_array_request_t;

/**
 * Admission of an array upload before its body is read: reserves what it may allocate from the process-wide
 * array budget. 0, or -1 with `err` (JI_ERR_BUSY: the budget is in use; retry later).
 */
int ji_array_request_admit(ji_array_request_t *ar, ji_worker_t *w, ji_error_t *err) JI_MUST_CHECK;
/** Gives back what ji_array_request_admit reserved (no-op when nothing is held). */
void ji_array_request_release(ji_array_request_t *ar);

/**
 * Serves `req`, whose body (req->entity, as received: gzip or not) is complete, as a JSON-array upload. Always
 * answers; returns 0 like an h2o handler. The caller holds the upload's places.
 */
int ji_array_mode_handle(ji_worker_t *w, h2o_req_t *req, const ji_ingest_params_t *params);

#endif
