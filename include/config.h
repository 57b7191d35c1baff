/*
 * config.h — the command line: flags of the service and of `gc`, parsed into
 * one read-only struct shared by every thread.
 */
#ifndef JI_CONFIG_H
#define JI_CONFIG_H

#include "common.h"

typedef enum { JI_CMD_SERVE, JI_CMD_GC, JI_CMD_HELP } ji_command_t;

typedef struct st_ji_config_t {
    ji_command_t command;
    char listen_host[256];
    unsigned short listen_port;
    const char *db; /**< conninfo: --db, else DATABASE_URL, else "" (libpq's PG* variables) */
    const char *images_dir;
    unsigned threads;
    size_t max_record_bytes;
    size_t max_array_bytes;
    bool fsync;
    const char *token_file;      /**< NULL: no authentication */
    unsigned max_ingests;        /**< POST /users requests running at once in the process (--max-ingests) */
    unsigned idle_timeout_ms;    /**< a head or body that receives nothing for this long is cut (--idle-timeout) */
    uint64_t max_inflated_bytes; /**< most bytes one gzip or zstd body may decode to (--max-inflated-bytes) */
    const char *allowed_origins; /**< Origin values allowed (--allowed-origins, comma-separated); NULL: none */
    const char *
        allowed_hosts; /**< Host names allowed (--allowed-hosts); NULL: loopback names on a loopback listener, else any */
    unsigned max_client_ingests;     /**< uploads one client may run at once (--max-client-ingests; 0: no cap) */
    unsigned min_body_rate;          /**< bytes/s a body must keep up over the window (--min-body-rate; 0: off) */
    unsigned min_body_rate_window_s; /**< the window of --min-body-rate (--min-body-rate-window) */
    const char *trusted_proxies;     /**< --trusted-proxies: CIDR list whose X-Forwarded-For is believed; NULL: none */
    unsigned shutdown_grace_s;  /**< after SIGTERM, seconds uploads may take before they get 503 (--shutdown-grace) */
    unsigned idempotency_ttl_s; /**< seconds a committed Idempotency-Key answers retries (--idempotency-ttl) */
    uint64_t max_memory;        /**< what all requests together may hold (--max-memory) */
    size_t max_array_memory;    /**< most bytes one JSON-array request may hold (--max-array-memory) */
    size_t array_memory_budget; /**< most bytes all JSON-array requests may hold together (--array-memory-budget) */
    unsigned max_connections;   /**< connections open at once (--max-connections); 0: from the open-files limit */
    unsigned keepalive_timeout_ms; /**< a kept-alive connection idle this long closes (--keepalive-timeout) */
    const char *access_log;        /**< --access-log: a file, "off", or NULL for stderr */
    unsigned upload_expiry_s;      /**< a resumable upload with no append this long is discarded (--upload-expiry) */
    uint64_t max_upload_bytes;     /**< largest Upload-Length / offset of a resumable upload (--max-upload-bytes) */
} ji_config_t;

/** Fills `cfg` from argv and the environment. 0, or -1 after printing the problem to stderr. */
int ji_config_parse(ji_config_t *cfg, int argc, char **argv) JI_MUST_CHECK;

/**
 * What one upload reserves from --max-memory before its body is read: JI_UPLOAD_FIXED_BYTES plus, for JSON Lines,
 * JI_UPLOAD_RECORD_FACTOR records of --max-record-bytes, or for a JSON array its --max-array-memory.
 */
uint64_t ji_config_upload_memory(const ji_config_t *cfg, bool array);

/** Prints --help to `out`. */
void ji_config_usage(const char *argv0, void *out);

#endif
