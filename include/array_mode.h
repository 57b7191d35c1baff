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

/** Serves `req` (its body, req->entity, is complete). Always answers; returns 0 like an h2o handler. */
int ji_array_mode_handle(ji_worker_t *w, h2o_req_t *req, const ji_ingest_params_t *params);

#endif
