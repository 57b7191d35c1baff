/*
 * health.h — the two questions a load balancer or orchestrator asks:
 * GET /healthz, "is the process alive and its event loop turning?" (answered
 * at once, whatever the database does), and GET /readyz, "should it get
 * traffic?" (a database round trip within JI_READYZ_TIMEOUT_S, the schema
 * ready, the server not stopping).
 */
#ifndef JI_HEALTH_H
#define JI_HEALTH_H

#include <h2o.h>

/**
 * Registers /healthz and /readyz on `host`. Both answer GET and HEAD (405 with Allow otherwise) on their exact
 * path (404 below it). Their handlers find their worker with ji_worker_of (server.h).
 */
void ji_health_register(h2o_hostconf_t *host);

#endif
