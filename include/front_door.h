/*
 * front_door.h — every connection starts and ends here. The front door reads
 * and parses each request head itself (h2o 2.2.5 would buffer a whole body
 * before any handler runs) and puts it through the same rules on every
 * request of every connection: head limits, exact routes (404/405 from the
 * head alone), Origin and Host, the bearer token and admission, all before a
 * body byte is read. POST /users is then served by upload_stream.c; every
 * other route by h2o's handlers through the h2o bridge, on a connection the
 * front door keeps (keep-alive, pipelining, timeouts stay ours).
 */
#ifndef JI_FRONT_DOOR_H
#define JI_FRONT_DOOR_H

#include <h2o.h>
#include <stdbool.h>

typedef struct st_ji_worker_t ji_worker_t;

/**
 * Takes over a newly accepted connection. Past --max-connections (the process's count) it first closes an idle
 * kept-alive connection to make room (this loop's longest idle, or another loop's: that one closes it at its next
 * wake-up); when none is idle anywhere, the new connection gets a short 503 with Retry-After and is closed.
 */
void ji_front_door_accept(ji_worker_t *w, h2o_socket_t *sock);

/**
 * Closes the idle kept-alive connections other loops claimed here to make room under --max-connections (called by
 * the worker's loop at every wake-up).
 */
void ji_front_door_shed(ji_worker_t *w);

/**
 * Shutdown, called again and again while the loop drains: once no request is in flight on this worker, closes
 * the connections idle between requests (until then they may still ask, e.g. /readyz learns "stopping"; every
 * answer during the drain closes its connection). With `grace_over`, uploads still receiving their body are
 * answered 503.
 */
void ji_front_door_drain(ji_worker_t *w, bool grace_over);

/** Closes every connection the front door still holds on this worker (at stop; aborts unfinished ingests). */
void ji_front_door_close_all(ji_worker_t *w);

#endif
