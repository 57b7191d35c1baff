/*
 * h2o_bridge.h — serves one request, whose head the front door already
 * parsed and judged, through h2o's handler stack, on a connection the front
 * door keeps. The bridge is an h2o connection of our own (h2o_conn_t with a
 * final output stream that writes HTTP/1.1 to the socket), so h2o never reads
 * the socket: every request on every connection goes through the front door's
 * rules first, and the connection comes back to it after each answer.
 *
 * While the bridge runs, the caller does not read the socket. The answer is
 * written with a send timeout: a reader that accepts nothing for that long is
 * cut (the done callback reports it as not reusable).
 */
#ifndef JI_H2O_BRIDGE_H
#define JI_H2O_BRIDGE_H

#include <h2o.h>
#include "request_rules.h"

typedef struct st_ji_bridge_t ji_bridge_t;

typedef enum {
    JI_BRIDGE_KEEP_ALIVE, /**< the answer was written; the connection may carry another request */
    JI_BRIDGE_CLOSE,      /**< the answer was written; the connection must close (Connection: close) */
    JI_BRIDGE_FAILED,     /**< the write failed or timed out: a write may still be pending, close at once */
} ji_bridge_end_t;

/** The request ended with the answer's `status` (0: none began). The bridge is already freed when this runs. */
typedef void (*ji_bridge_done_cb)(void *owner, ji_bridge_end_t end, int status);

typedef struct st_ji_bridge_params_t {
    h2o_accept_ctx_t *accept_ctx;
    h2o_socket_t *sock;
    struct timeval connected_at;
    h2o_timeout_t *send_timeout; /**< a write that makes no progress for this long cuts the connection */
    bool keep_alive;             /**< the client allows another request afterwards */
    h2o_iovec_t entity;          /**< the request body (owned by the caller until done), or empty */
    void *route_data;            /**< what the handler gets from ji_bridge_route_data */
    ji_bridge_done_cb done;
    void *owner;
} ji_bridge_params_t;

/** Builds an h2o request from `head` (copied) and runs h2o's handlers for it. NULL when out of memory. */
ji_bridge_t *ji_bridge_start(const ji_bridge_params_t *params, const ji_request_head_t *head);

/** Ends a request early (shutdown, the connection closes): its handler stops, no callback fires. */
void ji_bridge_abort(ji_bridge_t *b);

/** Inside an h2o handler: the route_data of the request, or NULL when the request did not come through a bridge. */
void *ji_bridge_route_data(h2o_req_t *req);

#endif
