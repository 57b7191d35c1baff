/*
 * conn.h — one client connection as the front door keeps it, from accept to
 * close, and the primitives the stages that serve a request use on it: flow
 * control (pause_reading / resume_reading), the idle timer, and answers of
 * our own. Shared by front_door.c (lifecycle, heads, routing) and
 * upload_stream.c (POST /users bodies); nothing else includes it.
 */
#ifndef JI_CONN_H
#define JI_CONN_H

#include <sys/time.h>
#include "access_log.h"
#include "h2o_bridge.h"
#include "json_text.h"
#include "request_rules.h"
#include "server.h"

typedef struct st_ji_upload_t ji_upload_t;

typedef enum {
    JI_CONN_HEAD,       /**< reading a request head */
    JI_CONN_UPLOAD,     /**< POST /users: its body is read by upload_stream.c */
    JI_CONN_BRIDGED,    /**< an h2o handler serves the request (h2o_bridge.c) */
    JI_CONN_RESPONDING, /**< writing an answer of ours */
    JI_CONN_LINGERING,  /**< answer sent, draining what the client still sends before closing */
} ji_conn_state_t;

typedef struct st_ji_conn_t {
    ji_worker_t *worker;
    h2o_socket_t *sock;
    struct timeval connected_at;
    ji_conn_state_t state;
    struct sockaddr_storage peer;    /**< the socket's peer */
    char client[JI_CLIENT_ADDR_LEN]; /**< the client's address (behind --trusted-proxies: from X-Forwarded-For) */

    /* the request being served */
    bool keep_alive;      /**< the client allows another request on this connection */
    bool body_unread;     /**< body bytes of this request may still be on the wire: no further request */
    bool requests_served; /**< at least one request was answered (the connection is idle between requests) */
    ji_upload_t *upload;
    ji_bridge_t *bridge;
    ji_access_entry_t entry; /**< the request for its access-log line and the duration histogram */
    bool entry_open;         /**< a request began (its head came) and was not logged yet */

    /* an answer of ours */
    ji_text_t response;
    bool close_after;
    bool response_pending; /**< ready while a 100 Continue was still being written */

    bool reading;
    h2o_socket_cb read_cb;
    h2o_timeout_entry_t idle_timer;
    h2o_linklist_t link;      /**< in worker->conns */
    h2o_linklist_t idle_link; /**< in worker->idle_conns while kept alive between requests */
} ji_conn_t;

/* ---- flow control ---- */

/** Stops reading the socket (the client's TCP window fills) and the idle timer: the server is the slow side. */
void ji_conn_pause_reading(ji_conn_t *c);
/** Reads again with `cb`, the idle timer armed. Bytes already buffered fire no callback: the caller looks at them. */
void ji_conn_resume_reading(ji_conn_t *c, h2o_socket_cb cb);
/** Re-arms the idle timer (bytes arrived). */
void ji_conn_touch(ji_conn_t *c);

/* ---- answers ---- */

/**
 * Writes an answer of ours: `status` with a JSON body (copied), Retry-After when not 0, `extra_headers` (NULL or
 * "Name: value\r\n"...). The connection goes on with the next request when the request is complete and the
 * client keeps alive; otherwise it lingers and closes.
 */
void ji_conn_respond(ji_conn_t *c, int status, const char *body, size_t len, unsigned retry_after,
                     const char *extra_headers);
/** Answers an error (the status, Retry-After and WWW-Authenticate of its kind), logged to stderr. */
void ji_conn_respond_error(ji_conn_t *c, const ji_error_t *err);
/** Sends the answer that waited for a 100 Continue to be written. */
void ji_conn_send_pending(ji_conn_t *c);
/** Whether an answer is being written now (a 100 Continue, or the answer itself). */
bool ji_conn_is_writing(const ji_conn_t *c);

/** Serves the request through h2o's handlers (reading stops until it is answered). */
void ji_conn_bridge(ji_conn_t *c, const ji_request_head_t *head, h2o_iovec_t entity, void *route_data);

/** Closes the connection now (aborts what runs on it). */
void ji_conn_close(ji_conn_t *c);

/* ---- upload_stream.c, called by the front door ---- */

/** A resumable upload's request whose upload headers were judged (front_door.c). */
typedef struct st_ji_resumable_request_t {
    bool create;                   /**< a creation (tus POST /uploads, draft POST /users), else an append (PATCH) */
    ji_upload_creation_t creation; /**< a creation's options */
    const char *metadata;          /**< a creation's Upload-Metadata (in the head), or NULL */
    size_t metadata_len;
    ji_ingest_append_t append; /**< the append (a creation's first: its token is set once the row is in) */
} ji_resumable_request_t;

/**
 * Starts serving a creation or an append whose head (in c->sock->input) was judged: a creation inserts the row
 * first (and a draft creation with a body sends 104 with its Location), then the body streams into an append.
 */
void ji_upload_start_resumable(ji_conn_t *c, const ji_request_head_t *head, const ji_resumable_request_t *rr);
/** Starts serving POST /users whose head (`head`, in c->sock->input) was judged. */
void ji_upload_start(ji_conn_t *c, const ji_request_head_t *head, const ji_upload_options_t *options);
/** Frees the upload (aborting an unfinished ingest, releasing its places). */
void ji_upload_free(ji_upload_t *u);
/** The idle timer fired while the upload waited for body bytes: it fails as stalled. */
void ji_upload_idle(ji_upload_t *u);
/** Shutdown grace period over: an upload still receiving its body gets 503. */
void ji_upload_stop(ji_upload_t *u);
/** The upload's part of its access-log line: body bytes received, and what it committed. */
void ji_upload_outcome(const ji_upload_t *u, ji_access_entry_t *e);

#endif
