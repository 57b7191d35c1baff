/*
 * routes.h — the exact routes of the service: a request's path and method
 * decide what serves it before anything else happens. An unknown path is 404
 * and a known path with another method 405 (with its Allow list), both
 * answered from the head alone, without reading a body. Paths are compared
 * byte for byte: no percent-decoding, no dot segments, no trailing slash. An
 * upload's token is exactly JI_UPLOAD_TOKEN_CHARS lowercase hex digits: any
 * other segment after /uploads/ is 404 without a database look-up.
 */
#ifndef JI_ROUTES_H
#define JI_ROUTES_H

#include "common.h"

typedef enum {
    JI_ROUTE_USERS,      /**< /users: POST uploads; GET/HEAD export (JSON Lines) */
    JI_ROUTE_USERS_CSV,  /**< /users.csv: GET/HEAD export (CSV) */
    JI_ROUTE_USER,       /**< /users/{id} */
    JI_ROUTE_USER_IMAGE, /**< /users/{id}/image */
    JI_ROUTE_BATCHES,    /**< /batches: every batch (JSON Lines) */
    JI_ROUTE_BATCH,      /**< /batches/{id} */
    JI_ROUTE_REJECTED,   /**< /batches/{id}/rejected: a batch's dead letters */
    JI_ROUTE_HEALTHZ,    /**< /healthz */
    JI_ROUTE_READYZ,     /**< /readyz */
    JI_ROUTE_METRICS,    /**< /metrics */
    JI_ROUTE_UPLOADS,    /**< /uploads: POST creates a resumable upload (tus), OPTIONS its capabilities */
    JI_ROUTE_UPLOAD,     /**< /uploads/{token}: one resumable upload (HEAD, GET, PATCH, DELETE) */
    JI_ROUTE_COUNT,      /**< not a route: how many there are (the metrics' "other" row: 404s, bad heads) */
} ji_route_id_t;

typedef struct st_ji_route_t {
    ji_route_id_t id;
    bool upload;       /**< the method makes it an upload (POST /users): bearer token, admission, body */
    bool probe;        /**< a health probe (/healthz, /readyz): no Host check (load balancers send their own) */
    bool resumable;    /**< a route of resumable uploads (/uploads...): bearer token like an upload */
    const char *allow; /**< the route's methods, for Allow */
} ji_route_t;

/**
 * Finds the route of `method` on `path` (without the query). 0 with `route` filled, or -1 with `err` (404 no such
 * route; 405 with `route->allow` set to the methods the path takes).
 */
int ji_route_match(const char *method, size_t method_len, const char *path, size_t path_len, ji_route_t *route,
                   ji_error_t *err) JI_MUST_CHECK;

/** The route's name for logs and metric labels ("/users/{id}"...); "other" for JI_ROUTE_COUNT. */
const char *ji_route_name(ji_route_id_t id);

#endif
