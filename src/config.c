/* config.c — parses the command line and environment into ji_config_t. */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define JI_DEFAULT_LISTEN "127.0.0.1:8000"
#define JI_DEFAULT_IMAGES_DIR "images"

void ji_config_usage(const char *argv0, void *out)
{
    fprintf((FILE *)out,
            "usage: %s [options]        serve POST /users and friends\n"
            "       %s gc [options]     remove image files left by interrupted requests\n"
            "\n"
            "options:\n"
            "  --listen HOST:PORT        address to serve on (default " JI_DEFAULT_LISTEN ")\n"
            "  --db CONNINFO             PostgreSQL conninfo or URL (default: $DATABASE_URL, else libpq's PG* variables)\n"
            "  --images-dir DIR          where image files go (default ./" JI_DEFAULT_IMAGES_DIR ")\n"
            "  --threads N               event-loop threads (default: number of CPUs)\n"
            "  --max-record-bytes N      longest line one record may take (default %u)\n"
            "  --max-array-bytes N       largest body in JSON-array mode (default %u)\n"
            "  --fsync on|off            make image files durable before COMMIT (default on)\n"
            "  --token-file F            require 'Authorization: Bearer <token>' on POST, token read from F\n"
            "  --max-ingests N           POST /users requests running at once; more get 503 (default %u)\n"
            "  --idle-timeout S          cut a request whose head or body stalls this many seconds (default %u)\n"
            "  --max-inflated-bytes N    most bytes a gzip body may inflate to (default %llu)\n"
            "  --max-array-memory N      most bytes one JSON-array request may hold, body and tree (default %u)\n"
            "  --array-memory-budget N   most bytes all JSON-array requests may hold together (default %u)\n"
            "  --help                    this text\n",
            argv0, argv0, JI_DEFAULT_MAX_RECORD_BYTES, JI_DEFAULT_MAX_ARRAY_BYTES, JI_DEFAULT_MAX_INGESTS,
            JI_DEFAULT_IDLE_TIMEOUT_S, (unsigned long long)JI_DEFAULT_MAX_INFLATED_BYTES, JI_DEFAULT_MAX_ARRAY_MEMORY,
            JI_DEFAULT_ARRAY_MEMORY_BUDGET);
}

static int parse_size(const char *flag, const char *s, size_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v == 0 || s[0] == '-') {
        fprintf(stderr, "%s: expected a positive number of bytes, got '%s'\n", flag, s);
        return -1;
    }
    *out = (size_t)v;
    return 0;
}

static int parse_listen(ji_config_t *cfg, const char *s)
{
    const char *colon = strrchr(s, ':');
    char *end;
    unsigned long port;

    if (colon == NULL || colon == s || (size_t)(colon - s) >= sizeof(cfg->listen_host))
        goto Bad;
    errno = 0;
    port = strtoul(colon + 1, &end, 10);
    if (errno != 0 || *end != '\0' || end == colon + 1 || port > 65535)
        goto Bad;
    memcpy(cfg->listen_host, s, colon - s);
    cfg->listen_host[colon - s] = '\0';
    cfg->listen_port = (unsigned short)port;
    return 0;
Bad:
    fprintf(stderr, "--listen: expected HOST:PORT, got '%s'\n", s);
    return -1;
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
        OPT_MAX_ARRAY_MEMORY,
        OPT_ARRAY_MEMORY_BUDGET,
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
        {"max-array-memory", required_argument, NULL, OPT_MAX_ARRAY_MEMORY},
        {"array-memory-budget", required_argument, NULL, OPT_ARRAY_MEMORY_BUDGET},
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
    cfg->max_array_memory = JI_DEFAULT_MAX_ARRAY_MEMORY;
    cfg->array_memory_budget = JI_DEFAULT_ARRAY_MEMORY_BUDGET;

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
        case OPT_THREADS: {
            size_t n;
            if (parse_size("--threads", optarg, &n) != 0)
                return -1;
            if (n > JI_MAX_THREADS) {
                fprintf(stderr, "--threads: at most %d\n", JI_MAX_THREADS);
                return -1;
            }
            cfg->threads = (unsigned)n;
            break;
        }
        case OPT_MAX_RECORD:
            if (parse_size("--max-record-bytes", optarg, &cfg->max_record_bytes) != 0)
                return -1;
            break;
        case OPT_MAX_INFLATED: {
            size_t n;
            if (parse_size("--max-inflated-bytes", optarg, &n) != 0)
                return -1;
            cfg->max_inflated_bytes = n;
            break;
        }
        case OPT_MAX_ARRAY:
            if (parse_size("--max-array-bytes", optarg, &cfg->max_array_bytes) != 0)
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
        case OPT_IDLE_TIMEOUT: {
            size_t n;
            const char *flag = opt == OPT_MAX_INGESTS ? "--max-ingests" : "--idle-timeout";
            if (parse_size(flag, optarg, &n) != 0)
                return -1;
            if (n > 1000000) {
                fprintf(stderr, "%s: at most 1000000\n", flag);
                return -1;
            }
            if (opt == OPT_MAX_INGESTS)
                cfg->max_ingests = (unsigned)n;
            else
                cfg->idle_timeout_ms = (unsigned)n * 1000;
            break;
        }
        case OPT_HELP:
        case 'h':
            cfg->command = JI_CMD_HELP;
            return 0;
        default:
            return -1;
        }
    }
    if (cfg->array_memory_budget < cfg->max_array_memory) {
        fprintf(stderr, "--array-memory-budget (%zu) is smaller than --max-array-memory (%zu): no array request "
                "could run\n", cfg->array_memory_budget, cfg->max_array_memory);
        return -1;
    }
    if (optind < argc) {
        fprintf(stderr, "unexpected argument '%s' (see --help)\n", argv[optind]);
        return -1;
    }
    return 0;
}
