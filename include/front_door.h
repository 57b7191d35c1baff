/*
 * front_door.h — every new connection starts here. The front door reads and
 * parses the request head itself (h2o 2.2.5 would buffer the whole body
 * before any handler runs). POST /users in JSON Lines is served on the
 * streaming path: the body is decoded (Content-Length or chunked) as it
 * arrives and fed to an ingest, with reading paused whenever the ingest is
 * full. Anything else is handed to h2o's HTTP/1 stack with its bytes intact
 * (h2o_http1_accept starts from what is already in sock->input). After a
 * streamed request the connection comes back here (keep-alive, pipelining).
 */
#ifndef JI_FRONT_DOOR_H
#define JI_FRONT_DOOR_H

#include "server.h"

/** Takes over a newly accepted connection. */
void ji_front_door_accept(ji_worker_t *w, h2o_socket_t *sock);

/** Closes every connection the front door still holds on this worker (at stop; aborts unfinished ingests). */
void ji_front_door_close_all(ji_worker_t *w);

#endif
