/* test_config.c — command-line parsing: defaults, every flag, and rejected values. */
#include <stdlib.h>

#include "config.h"
#include "unit.h"

static int parse(ji_config_t *cfg, int argc, const char **argv)
{
    return ji_config_parse(cfg, argc, (char **)argv);
}

static void test_defaults(void)
{
    const char *argv[] = {"jsonl-ingest", NULL};
    ji_config_t cfg;

    unsetenv("DATABASE_URL");
    CHECK_EQ_INT(parse(&cfg, 1, argv), 0);
    CHECK_EQ_INT(cfg.command, JI_CMD_SERVE);
    CHECK_EQ_STR(cfg.listen_host, "127.0.0.1");
    CHECK_EQ_INT(cfg.listen_port, 8000);
    CHECK_EQ_STR(cfg.db, "");
    CHECK(cfg.fsync);
    CHECK_EQ_INT(cfg.max_record_bytes, JI_DEFAULT_MAX_RECORD_BYTES);
    CHECK(cfg.threads >= 1);
}

static void test_flags(void)
{
    const char *argv[] = {"jsonl-ingest", "--listen", "0.0.0.0:9001", "--db", "dbname=x", "--images-dir", "/tmp/i",
                          "--threads", "3", "--max-record-bytes", "1000", "--max-array-bytes", "2000", "--fsync",
                          "off", "--token-file", "/tmp/t", NULL};
    ji_config_t cfg;

    CHECK_EQ_INT(parse(&cfg, 17, argv), 0);
    CHECK_EQ_STR(cfg.listen_host, "0.0.0.0");
    CHECK_EQ_INT(cfg.listen_port, 9001);
    CHECK_EQ_STR(cfg.db, "dbname=x");
    CHECK_EQ_STR(cfg.images_dir, "/tmp/i");
    CHECK_EQ_INT(cfg.threads, 3);
    CHECK_EQ_INT(cfg.max_record_bytes, 1000);
    CHECK_EQ_INT(cfg.max_array_bytes, 2000);
    CHECK(!cfg.fsync);
    CHECK_EQ_STR(cfg.token_file, "/tmp/t");
}

static void test_limits_survive_later_flags(void)
{
    const char *argv[] = {"jsonl-ingest", "--max-ingests", "3", "--idle-timeout", "7", "--max-inflated-bytes", "999",
                          "--fsync", "on", "--fsync", "off", NULL};
    ji_config_t cfg;

    CHECK_EQ_INT(parse(&cfg, 11, argv), 0);
    CHECK_EQ_INT(cfg.max_ingests, 3);
    CHECK_EQ_INT(cfg.idle_timeout_ms, 7000);
    CHECK_EQ_INT(cfg.max_inflated_bytes, 999);
    CHECK(!cfg.fsync);
}

static void test_env_db_and_gc(void)
{
    const char *argv[] = {"jsonl-ingest", "gc", "--images-dir", "x", NULL};
    ji_config_t cfg;

    setenv("DATABASE_URL", "postgres://u@h/d", 1);
    CHECK_EQ_INT(parse(&cfg, 4, argv), 0);
    CHECK_EQ_INT(cfg.command, JI_CMD_GC);
    CHECK_EQ_STR(cfg.db, "postgres://u@h/d");
    unsetenv("DATABASE_URL");
}

static void test_rejects(void)
{
    const char *bad_listen[] = {"x", "--listen", "nocolon", NULL};
    const char *bad_port[] = {"x", "--listen", "h:70000", NULL};
    const char *bad_fsync[] = {"x", "--fsync", "maybe", NULL};
    const char *bad_size[] = {"x", "--max-record-bytes", "12k", NULL};
    const char *zero_size[] = {"x", "--max-record-bytes", "0", NULL};
    const char *extra[] = {"x", "surplus", NULL};
    ji_config_t cfg;

    CHECK_EQ_INT(parse(&cfg, 3, bad_listen), -1);
    CHECK_EQ_INT(parse(&cfg, 3, bad_port), -1);
    CHECK_EQ_INT(parse(&cfg, 3, bad_fsync), -1);
    CHECK_EQ_INT(parse(&cfg, 3, bad_size), -1);
    CHECK_EQ_INT(parse(&cfg, 3, zero_size), -1);
    CHECK_EQ_INT(parse(&cfg, 2, extra), -1);
}

UNIT_MAIN("config", {"defaults", test_defaults}, {"flags", test_flags}, {"limits_survive_later_flags", test_limits_survive_later_flags}, {"env_db_and_gc", test_env_db_and_gc},
          {"rejects", test_rejects})
