/*
 * test_config.c — command-line parsing: defaults, every flag, rejected values,
 * and strict numbers: every numeric flag refuses signs, spaces, junk, empty
 * values, overflow and values out of range, with a message naming the flag.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

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
    const char *argv[] = {"jsonl-ingest",
                          "--listen",
                          "0.0.0.0:9001",
                          "--db",
                          "dbname=x",
                          "--images-dir",
                          "/tmp/i",
                          "--threads",
                          "3",
                          "--max-record-bytes",
                          "1000",
                          "--max-array-bytes",
                          "2000",
                          "--fsync",
                          "off",
                          "--token-file",
                          "/tmp/t",
                          NULL};
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
    const char *argv[] = {"jsonl-ingest", "--max-ingests", "3",  "--idle-timeout", "7",   "--max-inflated-bytes",
                          "999",          "--fsync",       "on", "--fsync",        "off", NULL};
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

/* Parses with stderr captured into `msg` (what the parser printed, NUL-terminated). */
static int parse_capture(ji_config_t *cfg, int argc, const char **argv, char *msg, size_t cap)
{
    FILE *tmp = tmpfile();
    int saved = dup(2), rc;
    size_t n = 0;

    msg[0] = '\0';
    if (tmp == NULL || saved < 0) {
        CHECK(!"tmpfile/dup");
        return parse(cfg, argc, argv);
    }
    fflush(stderr);
    dup2(fileno(tmp), 2);
    rc = parse(cfg, argc, argv);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    rewind(tmp);
    n = fread(msg, 1, cap - 1, tmp);
    msg[n] = '\0';
    fclose(tmp);
    return rc;
}

/* `flag value` is refused, and the message names the flag and quotes the value. */
static void check_refused(const char *flag, const char *value)
{
    const char *argv[] = {"x", flag, value, NULL};
    char msg[512], quoted[64];
    ji_config_t cfg;
    int rc = parse_capture(&cfg, 3, argv, msg, sizeof(msg));

    snprintf(quoted, sizeof(quoted), "'%s'", value);
    CHECK_EQ_INT(rc, -1);
    CHECK(strncmp(msg, flag, strlen(flag)) == 0 && msg[strlen(flag)] == ':');
    CHECK(strstr(msg, quoted) != NULL);
    if (rc != -1 || strstr(msg, quoted) == NULL)
        fprintf(stderr, "  %s '%s': rc %d, message: %s\n", flag, value, rc, msg);
}

static void test_numbers_are_strict(void)
{
    static const char *flags[] = {"--threads",     "--max-record-bytes", "--max-array-bytes",
                                  "--max-ingests", "--idle-timeout",     "--max-inflated-bytes"};
    static const char *bad[] = {
        "-1",
        " -1",
        "-0",
        "+1",
        "+0",
        " 1",
        "1 ",
        "\t1",
        "1\n",
        "",
        " ",
        "abc",
        "1a",
        "12k",
        "1K",
        "1M",
        "1.5",
        "1e3",
        "0x10",
        "1_000",
        "0",
        "00",
        "18446744073709551616",
        "99999999999999999999",
        "184467440737095516150",
    };
    char msg[512];
    ji_config_t cfg;

    for (size_t f = 0; f < sizeof(flags) / sizeof(flags[0]); f++)
        for (size_t b = 0; b < sizeof(bad) / sizeof(bad[0]); b++)
            check_refused(flags[f], bad[b]);

    /* the audit's case, and what the message says */
    {
        const char *argv[] = {"x", "--max-record-bytes", " -1", NULL};
        CHECK_EQ_INT(parse_capture(&cfg, 3, argv, msg, sizeof(msg)), -1);
        CHECK(strstr(msg, "--max-record-bytes: expected 1 to 18446744073709551615 bytes") != NULL);
        CHECK(strstr(msg, "no sign, space or suffix") != NULL);
        CHECK(strstr(msg, "got ' -1'") != NULL);
    }
    /* the range: the limit that sets it is named */
    check_refused("--threads", "257");
    check_refused("--max-ingests", "1000001");
    check_refused("--idle-timeout", "1000001");
    {
        const char *argv[] = {"x", "--threads", "257", NULL};
        CHECK_EQ_INT(parse_capture(&cfg, 3, argv, msg, sizeof(msg)), -1);
        CHECK(strstr(msg, "1 to " JI_STR(JI_MAX_THREADS) " threads (JI_MAX_THREADS)") != NULL);
    }
    {
        const char *argv[] = {"x", "--idle-timeout", "1000001", NULL};
        CHECK_EQ_INT(parse_capture(&cfg, 3, argv, msg, sizeof(msg)), -1);
        CHECK(strstr(msg, "1 to " JI_STR(JI_MAX_FLAG_VALUE) " seconds (JI_MAX_FLAG_VALUE)") != NULL);
    }
}

static void test_numbers_at_their_bounds(void)
{
    const char *low[] = {"x", "--threads",
                         "1", "--max-record-bytes",
                         "1", "--max-array-bytes",
                         "1", "--max-ingests",
                         "1", "--idle-timeout",
                         "1", "--max-inflated-bytes",
                         "1", NULL};
    const char *high[] = {"x",
                          "--threads",
                          "256",
                          "--max-record-bytes",
                          "18446744073709551615",
                          "--max-array-bytes",
                          "18446744073709551615",
                          "--max-ingests",
                          "1000000",
                          "--idle-timeout",
                          "1000000",
                          "--max-inflated-bytes",
                          "18446744073709551615",
                          NULL};
    const char *zeros[] = {"x", "--threads", "007", "--max-record-bytes", "0100", NULL};
    ji_config_t cfg;

    CHECK_EQ_INT(parse(&cfg, 13, low), 0);
    CHECK_EQ_INT(cfg.threads, 1);
    CHECK_EQ_INT(cfg.max_record_bytes, 1);
    CHECK_EQ_INT(cfg.max_array_bytes, 1);
    CHECK_EQ_INT(cfg.max_ingests, 1);
    CHECK_EQ_INT(cfg.idle_timeout_ms, 1000);
    CHECK_EQ_INT(cfg.max_inflated_bytes, 1);

    CHECK_EQ_INT(parse(&cfg, 13, high), 0);
    CHECK_EQ_INT(cfg.threads, JI_MAX_THREADS);
    CHECK(cfg.max_record_bytes == SIZE_MAX);
    CHECK(cfg.max_array_bytes == SIZE_MAX);
    CHECK_EQ_INT(cfg.max_ingests, JI_MAX_FLAG_VALUE);
    CHECK(cfg.idle_timeout_ms == JI_MAX_FLAG_VALUE * 1000u);
    CHECK(cfg.max_inflated_bytes == UINT64_MAX);

    /* leading zeros are still decimal digits */
    CHECK_EQ_INT(parse(&cfg, 5, zeros), 0);
    CHECK_EQ_INT(cfg.threads, 7);
    CHECK_EQ_INT(cfg.max_record_bytes, 100);
}

static void test_listen_port_is_strict(void)
{
    static const char *bad[] = {"h:+80", "h:-1", "h: 80", "h:80 ", "h:", "h:8o", "h:65536", "h:99999999999999999999"};
    const char *good[] = {"x", "--listen", "[::1]:65535", NULL};
    ji_config_t cfg;

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        check_refused("--listen", bad[i]);
    CHECK_EQ_INT(parse(&cfg, 3, good), 0);
    CHECK_EQ_STR(cfg.listen_host, "[::1]");
    CHECK_EQ_INT(cfg.listen_port, 65535);
}

static void test_connection_flags(void)
{
    const char *none[] = {"x", NULL};
    const char *given[] = {"x", "--max-connections", "50", "--keepalive-timeout", "2", NULL};
    const char *high[] = {"x", "--max-connections", "1000000", "--keepalive-timeout", "1000000", NULL};
    static const char *bad[] = {"0", "-1", "+5", " 5", "5 ", "5k", "1.5", "", "1000001", "18446744073709551616"};
    ji_config_t cfg;

    CHECK_EQ_INT(parse(&cfg, 1, none), 0);
    CHECK_EQ_INT(cfg.max_connections, 0); /* derived from the open-files limit at start */
    CHECK_EQ_INT(cfg.keepalive_timeout_ms, JI_DEFAULT_KEEPALIVE_TIMEOUT_S * 1000);
    CHECK_EQ_INT(parse(&cfg, 5, given), 0);
    CHECK_EQ_INT(cfg.max_connections, 50);
    CHECK_EQ_INT(cfg.keepalive_timeout_ms, 2000);
    CHECK_EQ_INT(parse(&cfg, 5, high), 0);
    CHECK_EQ_INT(cfg.max_connections, JI_MAX_FLAG_VALUE);
    CHECK(cfg.keepalive_timeout_ms == JI_MAX_FLAG_VALUE * 1000u);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        check_refused("--max-connections", bad[i]);
        check_refused("--keepalive-timeout", bad[i]);
    }
}

UNIT_MAIN("config", {"defaults", test_defaults}, {"flags", test_flags},
          {"limits_survive_later_flags", test_limits_survive_later_flags}, {"env_db_and_gc", test_env_db_and_gc},
          {"rejects", test_rejects}, {"numbers_are_strict", test_numbers_are_strict},
          {"numbers_at_their_bounds", test_numbers_at_their_bounds},
          {"listen_port_is_strict", test_listen_port_is_strict}, {"connection_flags", test_connection_flags})
