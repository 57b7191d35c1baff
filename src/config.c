/*
 * config.c — parses the command line and environment into ji_config_t.
 *
 * Numbers are strict: decimal digits only. A sign (+ or -), a space before or
 * after, a suffix or any other character, an empty value, a value that
 * overflows, and one outside the flag's range are refused with a message
 * naming the flag (strtoull alone would take " -1" as 18446744073709551615).
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define JI_DEFAULT_LISTEN "127.0.0.1:8000"
#define JI_DEFAULT_IMAGES_DIR "images"

void ji_config_usage(const char *argv0, void *out)
{
    FILE *f = out;

    fprintf(f, "usage: %s [options]        serve POST /users and friends\n", argv0);
    fprintf(f, "       %s gc [options]     remove image files left by interrupted requests\n\noptions:\n", argv0);
    fprintf(f, "  --listen HOST:PORT        address to serve on (default %s)\n", JI_DEFAULT_LISTEN);
    fprintf(f, "  --db CONNINFO             PostgreSQL conninfo or URL (default: $DATABASE_URL, else libpq's PG* "
               "variables)\n");
    fprintf(f, "  --images-dir DIR          where image files go (default ./%s)\n", JI_DEFAULT_IMAGES_DIR);
    fprintf(f, "  --threads N               event-loop threads (default: number of CPUs)\n");
    fprintf(f, "  --max-record-bytes N      longest line one record may take (default %u)\n",
            JI_DEFAULT_MAX_RECORD_BYTES);
    fprintf(f, "  --max-array-bytes N       largest body in JSON-array mode (default %u)\n",
            JI_DEFAULT_MAX_ARRAY_BYTES);
    fprintf(f, "  --fsync on|off            make image files durable before COMMIT (default on)\n");
    fprintf(f,
            "  --token-file F            require 'Authorization: Bearer <token>' on POST; the token is F's first "
            "line\n                            (at least %u bytes)\n",
            JI_MIN_TOKEN_BYTES);
    fprintf(f, "  --max-ingests N           POST /users requests running at once; more get 503 (default %u)\n",
            JI_DEFAULT_MAX_INGESTS);
    fprintf(f, "  --max-client-ingests N    uploads one client address may run at once; 0 no cap (default %u)\n",
            JI_DEFAULT_MAX_CLIENT_INGESTS);
    fprintf(f, "  --max-memory N            most bytes all uploads together may hold; past it 503 (default %llu)\n",
            (unsigned long long)JI_DEFAULT_MAX_MEMORY);
    fprintf(f, "  --idle-timeout S          cut a request whose head or body stalls this many seconds (default %u)\n",
            JI_DEFAULT_IDLE_TIMEOUT_S);
    fprintf(f, "  --min-body-rate N         bytes/s an upload body must keep up over the window; 0 off (default %u)\n",
            JI_DEFAULT_MIN_BODY_RATE);
    fprintf(f, "  --min-body-rate-window S  the window of --min-body-rate in seconds (default %u)\n",
            JI_DEFAULT_MIN_BODY_RATE_WINDOW_S);
    fprintf(f, "  --max-inflated-bytes N    most bytes a gzip or zstd body may decode to (default %llu)\n",
            (unsigned long long)JI_DEFAULT_MAX_INFLATED_BYTES);
    fprintf(f, "  --max-array-memory N      most bytes one JSON-array request may hold, body and tree (default %u)\n",
            JI_DEFAULT_MAX_ARRAY_MEMORY);
    fprintf(f, "  --array-memory-budget N   most bytes all JSON-array requests may hold together (default %u)\n",
            JI_DEFAULT_ARRAY_MEMORY_BUDGET);
    fprintf(f, "  --allowed-origins LIST    Origin values allowed to send requests, comma-separated, '*' any\n"
               "                            (default none: a request with an Origin header is 403; curl sends none)\n");
    fprintf(f, "  --allowed-hosts LIST      Host names allowed, comma-separated, '*' any (default: on a loopback\n"
               "                            listener localhost,127.0.0.1,[::1] only, else any)\n");
    fprintf(f, "  --trusted-proxies LIST    CIDR blocks of proxies whose X-Forwarded-For names the client (default "
               "none)\n");
    fprintf(f, "  --idempotency-ttl S       seconds a used Idempotency-Key answers retries (default %u)\n",
            JI_DEFAULT_IDEMPOTENCY_TTL_S);
    fprintf(f, "  --shutdown-grace S        after SIGTERM, seconds uploads may take before they get 503 (default %u)\n",
            JI_DEFAULT_SHUTDOWN_GRACE_S);
    fprintf(f, "  --max-connections N       client connections open at once; past it idle kept-alive ones close or\n"
               "                            503 (default: from the open-files limit, see docs/operations.md)\n");
    fprintf(f,
            "  --keepalive-timeout S     close a kept-alive connection idle this many seconds between requests "
            "(default %u)\n",
            JI_DEFAULT_KEEPALIVE_TIMEOUT_S);
    fprintf(f, "  --upload-expiry S         seconds a resumable upload with no append is kept (default %u)\n",
            JI_DEFAULT_UPLOAD_EXPIRY_S);
    fprintf(f, "  --max-upload-bytes N      largest length of a resumable upload (default %llu)\n",
            (unsigned long long)JI_DEFAULT_MAX_UPLOAD_BYTES);
    fprintf(f, "  --access-log FILE|-|off   one JSON line per request: appended to FILE (reopened on SIGHUP),\n"
               "                            - stderr, off none (default: stderr)\n");
    fprintf(f, "  --help                    this text\n");
}

/* `s` as a decimal number: digits only, at least one, no overflow. 0, or -1 (nothing printed). */
static int parse_digits(const char *s, uint64_t *out)
{
    uint64_t v = 0;

    if (*s == '\0')
        return -1;
    for (; *s != '\0'; s++) {
        unsigned d = (unsigned)(unsigned char)*s - '0';
        if (d > 9 || v > (UINT64_MAX - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}

/*
 * The value of a numeric flag: a whole number of `unit` from `min` to `max` (`max_name`: the limit that sets
 * `max`, or NULL). 0, or -1 after printing why, with the flag's name and the value as given.
 */
static int parse_number(const char *flag, const char *s, const char *unit, uint64_t min, uint64_t max,
                        const char *max_name, uint64_t *out)
{
    uint64_t v;

    if (parse_digits(s, &v) != 0 || v < min || v > max) {
        fprintf(stderr,
                "%s: expected %" PRIu64 " to %" PRIu64 " %s%s%s%s, in decimal digits only (no sign, space or suffix); "
                "got '%s'\n",
                flag, min, max, unit, max_name != NULL ? " (" : "", max_name != NULL ? max_name : "",
                max_name != NULL ? ")" : "", s);
        return -1;
    }
    *out = v;
    return 0;
}

/* A positive number of bytes. */
static int parse_size(const char *flag, const char *s, size_t *out)
{
    uint64_t v;

    if (parse_number(flag, s, "bytes", 1, SIZE_MAX, NULL, &v) != 0)
        return -1;
    *out = (size_t)v;
    return 0;
}

/* A count or a number of seconds from 1 to `max`, the limit named `max_name`. */
static int parse_unsigned(const char *flag, const char *s, const char *unit, unsigned max, const char *max_name,
                          unsigned *out)
{
    uint64_t v;

    if (parse_number(flag, s, unit, 1, max, max_name, &v) != 0)
        return -1;
    *out = (unsigned)v;
    return 0;
}

/* A count or a number of seconds from `min` (0 allowed: "off") to `max`. */
static int parse_uint(const char *flag, const char *s, const char *unit, unsigned min, unsigned max, unsigned *out)
{
    uint64_t v;

    if (parse_number(flag, s, unit, min, max, NULL, &v) != 0)
        return -1;
    *out = (unsigned)v;
    return 0;
}

static int parse_listen(ji_config_t *cfg, const char *s)
{
    const char *colon = strrchr(s, ':');
    uint64_t port;

    if (colon == NULL || colon == s || (size_t)(colon - s) >= sizeof(cfg->listen_host))
        goto Bad;
    if (parse_digits(colon + 1, &port) != 0 || port > 65535)
        goto Bad;
    memcpy(cfg->listen_host, s, colon - s);
    cfg->listen_host[colon - s] = '\0';
    cfg->listen_port = (unsigned short)port;
    return 0;
Bad:
    fprintf(stderr, "--listen: expected HOST:PORT, got '%s'\n", s);
    return -1;
}

uint64_t ji_config_upload_memory(const ji_config_t *cfg, bool array)
{
    return JI_UPLOAD_FIXED_BYTES +
           (array ? (uint64_t)cfg->max_array_memory : (uint64_t)JI_UPLOAD_RECORD_FACTOR * cfg->max_record_bytes);
}

int ji_config_parse(ji_config_t *cfg, int argc, char **argv)
{
    enum {
        OPT_LISTEN = 1,
        OPT_DB,
        OPT_IMAGES,
        OPT_THREADS,
        OPT_MAX_RECORD,
        OPT_MAX_ARRAY,
        OPT_FSYNC,
        OPT_TOKEN,
        OPT_MAX_INGESTS,
        OPT_IDLE_TIMEOUT,
        OPT_MAX_INFLATED,
        OPT_ALLOWED_ORIGINS,
        OPT_ALLOWED_HOSTS,
        OPT_MAX_CLIENT_INGESTS,
        OPT_MIN_BODY_RATE,
        OPT_MIN_BODY_RATE_WINDOW,
        OPT_SHUTDOWN_GRACE,
        OPT_TRUSTED_PROXIES,
        OPT_IDEMPOTENCY_TTL,
        OPT_MAX_MEMORY,
        OPT_MAX_ARRAY_MEMORY,
        OPT_ARRAY_MEMORY_BUDGET,
        OPT_MAX_CONNECTIONS,
        OPT_KEEPALIVE_TIMEOUT,
        OPT_ACCESS_LOG,
        OPT_UPLOAD_EXPIRY,
        OPT_MAX_UPLOAD_BYTES,
        OPT_HELP
    };
    static const struct option options[] = {
        {"listen", required_argument, NULL, OPT_LISTEN},
        {"db", required_argument, NULL, OPT_DB},
        {"images-dir", required_argument, NULL, OPT_IMAGES},
        {"threads", required_argument, NULL, OPT_THREADS},
        {"max-record-bytes", required_argument, NULL, OPT_MAX_RECORD},
        {"max-array-bytes", required_argument, NULL, OPT_MAX_ARRAY},
        {"fsync", required_argument, NULL, OPT_FSYNC},
        {"token-file", required_argument, NULL, OPT_TOKEN},
        {"max-ingests", required_argument, NULL, OPT_MAX_INGESTS},
        {"idle-timeout", required_argument, NULL, OPT_IDLE_TIMEOUT},
        {"max-inflated-bytes", required_argument, NULL, OPT_MAX_INFLATED},
        {"allowed-origins", required_argument, NULL, OPT_ALLOWED_ORIGINS},
        {"allowed-hosts", required_argument, NULL, OPT_ALLOWED_HOSTS},
        {"max-client-ingests", required_argument, NULL, OPT_MAX_CLIENT_INGESTS},
        {"min-body-rate", required_argument, NULL, OPT_MIN_BODY_RATE},
        {"min-body-rate-window", required_argument, NULL, OPT_MIN_BODY_RATE_WINDOW},
        {"shutdown-grace", required_argument, NULL, OPT_SHUTDOWN_GRACE},
        {"trusted-proxies", required_argument, NULL, OPT_TRUSTED_PROXIES},
        {"idempotency-ttl", required_argument, NULL, OPT_IDEMPOTENCY_TTL},
        {"max-memory", required_argument, NULL, OPT_MAX_MEMORY},
        {"max-array-memory", required_argument, NULL, OPT_MAX_ARRAY_MEMORY},
        {"array-memory-budget", required_argument, NULL, OPT_ARRAY_MEMORY_BUDGET},
        {"max-connections", required_argument, NULL, OPT_MAX_CONNECTIONS},
        {"keepalive-timeout", required_argument, NULL, OPT_KEEPALIVE_TIMEOUT},
        {"access-log", required_argument, NULL, OPT_ACCESS_LOG},
        {"upload-expiry", required_argument, NULL, OPT_UPLOAD_EXPIRY},
        {"max-upload-bytes", required_argument, NULL, OPT_MAX_UPLOAD_BYTES},
        {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    const char *env_db = getenv("DATABASE_URL");
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int opt;

    memset(cfg, 0, sizeof(*cfg));
    cfg->command = JI_CMD_SERVE;
    if (parse_listen(cfg, JI_DEFAULT_LISTEN) != 0)
        return -1;
    cfg->db = env_db != NULL ? env_db : "";
    cfg->images_dir = JI_DEFAULT_IMAGES_DIR;
    cfg->threads = ncpu > 0 ? (unsigned)(ncpu < JI_MAX_THREADS ? ncpu : JI_MAX_THREADS) : 1;
    cfg->max_record_bytes = JI_DEFAULT_MAX_RECORD_BYTES;
    cfg->max_array_bytes = JI_DEFAULT_MAX_ARRAY_BYTES;
    cfg->fsync = true;
    cfg->max_ingests = JI_DEFAULT_MAX_INGESTS;
    cfg->idle_timeout_ms = JI_DEFAULT_IDLE_TIMEOUT_S * 1000;
    cfg->max_inflated_bytes = JI_DEFAULT_MAX_INFLATED_BYTES;
    cfg->max_client_ingests = JI_DEFAULT_MAX_CLIENT_INGESTS;
    cfg->min_body_rate = JI_DEFAULT_MIN_BODY_RATE;
    cfg->min_body_rate_window_s = JI_DEFAULT_MIN_BODY_RATE_WINDOW_S;
    cfg->shutdown_grace_s = JI_DEFAULT_SHUTDOWN_GRACE_S;
    cfg->idempotency_ttl_s = JI_DEFAULT_IDEMPOTENCY_TTL_S;
    cfg->max_memory = JI_DEFAULT_MAX_MEMORY;
    cfg->max_array_memory = JI_DEFAULT_MAX_ARRAY_MEMORY;
    cfg->array_memory_budget = JI_DEFAULT_ARRAY_MEMORY_BUDGET;
    cfg->keepalive_timeout_ms = JI_DEFAULT_KEEPALIVE_TIMEOUT_S * 1000;
    cfg->upload_expiry_s = JI_DEFAULT_UPLOAD_EXPIRY_S;
    cfg->max_upload_bytes = JI_DEFAULT_MAX_UPLOAD_BYTES;

    if (argc > 1 && strcmp(argv[1], "gc") == 0) {
        cfg->command = JI_CMD_GC;
        argv++;
        argc--;
    }

    optind = 1;
    while ((opt = getopt_long(argc, argv, "h", options, NULL)) != -1) {
        switch (opt) {
        case OPT_LISTEN:
            if (parse_listen(cfg, optarg) != 0)
                return -1;
            break;
        case OPT_DB:
            cfg->db = optarg;
            break;
        case OPT_IMAGES:
            cfg->images_dir = optarg;
            break;
        case OPT_THREADS:
            if (parse_unsigned("--threads", optarg, "threads", JI_MAX_THREADS, "JI_MAX_THREADS", &cfg->threads) != 0)
                return -1;
            break;
        case OPT_MAX_RECORD:
            if (parse_size("--max-record-bytes", optarg, &cfg->max_record_bytes) != 0)
                return -1;
            break;
        case OPT_MAX_INFLATED:
            if (parse_number("--max-inflated-bytes", optarg, "bytes", 1, UINT64_MAX, NULL, &cfg->max_inflated_bytes) !=
                0)
                return -1;
            break;
        case OPT_UPLOAD_EXPIRY:
            if (parse_unsigned("--upload-expiry", optarg, "seconds", JI_MAX_UPLOAD_EXPIRY_S, "JI_MAX_UPLOAD_EXPIRY_S",
                               &cfg->upload_expiry_s) != 0)
                return -1;
            break;
        case OPT_MAX_UPLOAD_BYTES:
            if (parse_number("--max-upload-bytes", optarg, "bytes", 1, INT64_MAX, NULL, &cfg->max_upload_bytes) != 0)
                return -1;
            break;
        case OPT_IDEMPOTENCY_TTL:
            if (parse_unsigned("--idempotency-ttl", optarg, "seconds", JI_MAX_IDEMPOTENCY_TTL_S,
                               "JI_MAX_IDEMPOTENCY_TTL_S", &cfg->idempotency_ttl_s) != 0)
                return -1;
            break;
        case OPT_MAX_ARRAY:
            if (parse_size("--max-array-bytes", optarg, &cfg->max_array_bytes) != 0)
                return -1;
            break;
        case OPT_MAX_MEMORY:
            if (parse_number("--max-memory", optarg, "bytes", 1, UINT64_MAX / 4, NULL, &cfg->max_memory) != 0)
                return -1;
            break;
        case OPT_MAX_ARRAY_MEMORY:
            if (parse_size("--max-array-memory", optarg, &cfg->max_array_memory) != 0)
                return -1;
            break;
        case OPT_ARRAY_MEMORY_BUDGET:
            if (parse_size("--array-memory-budget", optarg, &cfg->array_memory_budget) != 0)
                return -1;
            break;
        case OPT_FSYNC:
            if (strcmp(optarg, "on") == 0) {
                cfg->fsync = true;
            } else if (strcmp(optarg, "off") == 0) {
                cfg->fsync = false;
            } else {
                fprintf(stderr, "--fsync: expected on or off, got '%s'\n", optarg);
                return -1;
            }
            break;
        case OPT_TOKEN:
            cfg->token_file = optarg;
            break;
        case OPT_MAX_INGESTS:
            if (parse_unsigned("--max-ingests", optarg, "uploads", JI_MAX_FLAG_VALUE, "JI_MAX_FLAG_VALUE",
                               &cfg->max_ingests) != 0)
                return -1;
            break;
        case OPT_IDLE_TIMEOUT: {
            unsigned seconds;
            if (parse_unsigned("--idle-timeout", optarg, "seconds", JI_MAX_FLAG_VALUE, "JI_MAX_FLAG_VALUE", &seconds) !=
                0)
                return -1;
            cfg->idle_timeout_ms = seconds * 1000;
            break;
        }
        case OPT_ALLOWED_ORIGINS:
            cfg->allowed_origins = optarg;
            break;
        case OPT_TRUSTED_PROXIES:
            cfg->trusted_proxies = optarg;
            break;
        case OPT_ALLOWED_HOSTS:
            cfg->allowed_hosts = optarg;
            break;
        case OPT_MAX_CLIENT_INGESTS:
            if (parse_uint("--max-client-ingests", optarg, "uploads", 0, JI_MAX_FLAG_VALUE, &cfg->max_client_ingests) !=
                0)
                return -1;
            break;
        case OPT_MIN_BODY_RATE:
            if (parse_uint("--min-body-rate", optarg, "bytes/s", 0, 1u << 30, &cfg->min_body_rate) != 0)
                return -1;
            break;
        case OPT_MIN_BODY_RATE_WINDOW:
            if (parse_uint("--min-body-rate-window", optarg, "seconds", 1, 3600, &cfg->min_body_rate_window_s) != 0)
                return -1;
            break;
        case OPT_SHUTDOWN_GRACE:
            if (parse_uint("--shutdown-grace", optarg, "seconds", 0, 86400, &cfg->shutdown_grace_s) != 0)
                return -1;
            break;
        case OPT_MAX_CONNECTIONS:
            if (parse_unsigned("--max-connections", optarg, "connections", JI_MAX_FLAG_VALUE, "JI_MAX_FLAG_VALUE",
                               &cfg->max_connections) != 0)
                return -1;
            break;
        case OPT_KEEPALIVE_TIMEOUT: {
            unsigned seconds;
            if (parse_unsigned("--keepalive-timeout", optarg, "seconds", JI_MAX_FLAG_VALUE, "JI_MAX_FLAG_VALUE",
                               &seconds) != 0)
                return -1;
            cfg->keepalive_timeout_ms = seconds * 1000;
            break;
        }
        case OPT_ACCESS_LOG:
            if (optarg[0] == '\0') {
                fprintf(stderr, "--access-log: expected a file name, '-' (stderr) or off; got ''\n");
                return -1;
            }
            cfg->access_log = optarg;
            break;
        case OPT_HELP:
        case 'h':
            cfg->command = JI_CMD_HELP;
            return 0;
        default:
            return -1;
        }
    }
    if (cfg->array_memory_budget < cfg->max_array_memory) {
        fprintf(stderr,
                "--array-memory-budget (%zu) is smaller than --max-array-memory (%zu): no array request "
                "could run\n",
                cfg->array_memory_budget, cfg->max_array_memory);
        return -1;
    }
    if (ji_config_upload_memory(cfg, false) > cfg->max_memory || ji_config_upload_memory(cfg, true) > cfg->max_memory) {
        fprintf(stderr,
                "--max-memory (%llu) is smaller than what one upload may hold (%llu bytes for JSON Lines with "
                "--max-record-bytes, %llu for a JSON array with --max-array-memory): no upload could run\n",
                (unsigned long long)cfg->max_memory, (unsigned long long)ji_config_upload_memory(cfg, false),
                (unsigned long long)ji_config_upload_memory(cfg, true));
        return -1;
    }
    if (optind < argc) {
        fprintf(stderr, "unexpected argument '%s' (see --help)\n", argv[optind]);
        return -1;
    }
    return 0;
}
