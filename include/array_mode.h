/*
 * array_mode.h — POST /users with a JSON array: the baseline that shows what
 * buffering costs. Like the Node.js body-parser version it is naive on
 * purpose: the whole body is held, yajl builds the whole tree, then the
 * records go through the same checks, image store and COPY as JSON Lines.
 *
 * Naive, but bounded: a request is admitted before its body is read (an
 * upload place of --max-ingests and --max-array-memory bytes of the process's
 * --array-memory-budget, else 503 with Retry-After); the body is capped by
 * --max-array-bytes (inflated: also by --max-array-memory); and before the
 * tree is built a pre-scan (array_scan.h) refuses a record nested deeper than
 * JI_MAX_JSON_DEPTH (400) and a body whose tree would not fit
 * --max-array-memory (413).
 */
#ifndef JI_ARRAY_MODE_H
#define JI_ARRAY_MODE_H

#include "server.h"

/** What an admitted array request holds until it is disposed. All zero: nothing. */
typedef struct st_ji_array_admission_t {
    ji_worker_t *worker; /**< NULL when nothing is held */
    uint64_t reserved;   /**< bytes of the server's array budget */
} ji_array_admission_t;

/**
 * One JSON-array upload as the front door carries it to the handler through the h2o bridge: its options and its
 * admission. Owned by the front door's upload, which lives until the answer is written.
 */
typedef struct st_ji_array_request_t {
    ji_ingest_params_t params;
    ji_array_admission_t admission;
    ji_ingest_outcome_t outcome; /**< filled by the handler when the ingest answers (for the access log) */
} ji_array_request_t;

/**
 * Admits an array request before any byte of its body is read: --max-array-memory bytes of --array-memory-budget
 * (the upload place, --max-ingests, is the caller's). 0 = admitted (`adm` filled: pass it to ji_array_mode_handle,
 * or give it back with ji_array_mode_release), -1 = refused with nothing held (`err`: JI_ERR_BUSY, 503 with
 * Retry-After).
 */
int ji_array_mode_admit(ji_worker_t *w, ji_array_admission_t *adm, ji_error_t *err) JI_MUST_CHECK;

/** Gives back what `adm` holds (nothing when it holds nothing) and clears it. */
void ji_array_mode_release(ji_array_admission_t *adm);

/**
 * Serves `req` (its body, req->entity, is complete). `adm` is what ji_array_mode_admit gave for it: the request
 * takes it over (and clears `*adm`), keeps only what it needs once the body is scanned, and releases it when it
 * is done. NULL: it admits the request itself first. Always answers; returns 0 like an h2o handler.
 */
int ji_array_mode_handle(ji_worker_t *w, h2o_req_t *req, const ji_ingest_params_t *params, ji_array_admission_t *adm);

#endif
