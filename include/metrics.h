/*
 * metrics.h — GET /metrics, the Prometheus text exposition (format 0.0.4) of
 * the process. Each subsystem keeps its own counters where it works and
 * exposes them in its header: the ingests' ji_ingest_stats_t (ingest.h), the
 * worker's admission counters ji_worker_stats_t (server.h), the database
 * pool's idle/busy gauges (pg.h). The handler gathers them over every worker,
 * as h2o's status handler gathers from each of its subsystems, and writes the
 * families; nothing is counted here.
 */
#ifndef JI_METRICS_H
#define JI_METRICS_H

#include <h2o.h>

/** Registers /metrics on `host` (GET and HEAD on the exact path; 405 with Allow, or 404 below it). */
void ji_metrics_register(h2o_hostconf_t *host);

#endif
