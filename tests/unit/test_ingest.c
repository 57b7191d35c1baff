/*
 * test_ingest.c — the ingest against a real PostgreSQL (JI_TEST_DB;
 * skipped with 77 when empty), driven by a real h2o evloop the way the
 * request paths drive it: bodies fed in small pieces with the resume
 * protocol, records in record mode. Checks the committed rows and files, a
 * bad record (its line, nothing left), skip mode, Idempotency-Key replays
 * (same bytes, 422 for another body, 409 while the first runs, expiry, the
 * sweeps), that failed requests give their connection back to the pool, and
 * that no answer carries PostgreSQL's own text. The test works in a database
 * of its own (ji_unit_ingest), created and dropped here; blocking libpq
 * appears only in this file's checks.
 */
#include "ingest.h"
#include "schema.h"
#include "unit.h"
#include "unit_loop.h"

#include <dirent.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define TEST_DB_NAME "ji_unit_ingest"

static const char *admin_url;
static char ingest_url[2048];
static PGconn *conn; /* blocking, for the checks */

static h2o_loop_t *loop;
static h2o_timeout_t zero_timeout;
static ji_pg_pool_t *pool;
static ji_image_store_t store;
static char images_dir[256];
static ji_ingest_stats_t stats;
static ji_ingest_env_t env;

/* ------------------------------------------------------------------ loop and database helpers */

#define now_sec unit_now_sec

static bool run_until(const bool *flag, double seconds)
{
    return unit_run_until(loop, flag, seconds);
}

/** Runs the loop until no connection of the pool is busy (rollbacks and sweeps in the background are done). */
static bool run_until_pool_settled(double seconds)
{
    double deadline = now_sec() + seconds;
    while (ji_pg_pool_busy(pool) != 0 && now_sec() < deadline)
        h2o_evloop_run(loop, 10);
    return ji_pg_pool_busy(pool) == 0;
}

/** The single value of a query on the checking connection ("" when none or on error, which is reported). */
static const char *sql_value(const char *sql)
{
    static char value[4096];
    PGresult *res = PQexec(conn, sql);

    value[0] = '\0';
    if (PQresultStatus(res) != PGRES_TUPLES_OK && PQresultStatus(res) != PGRES_COMMAND_OK) {
        fprintf(stderr, "query failed: %s: %s", sql, PQerrorMessage(conn));
        CHECK(!"query failed");
    } else if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) > 0 && !PQgetisnull(res, 0, 0)) {
        snprintf(value, sizeof(value), "%s", PQgetvalue(res, 0, 0));
    }
    PQclear(res);
    return value;
}

static long sql_long(const char *sql)
{
    return strtol(sql_value(sql), NULL, 10);
}

/** Files below the images directory, .pending included (journals of requests in flight). */
static int count_files(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    int n = 0;

    if (d == NULL)
        return 0;
    while ((e = readdir(d)) != NULL) {
        char path[1024];
        struct stat st;
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        if (lstat(path, &st) != 0)
            continue;
        n += S_ISDIR(st.st_mode) ? count_files(path) : 1;
    }
    closedir(d);
    return n;
}

static void sha256_hex(const char *data, size_t len, char out[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;

    CHECK(EVP_Digest(data, len, md, &n, EVP_sha256(), NULL) == 1);
    for (unsigned i = 0; i < n && i < 32; i++)
        sprintf(out + 2 * i, "%02x", md[i]);
    out[64] = '\0';
}

static void base64(const unsigned char *in, size_t len, char *out)
{
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i, o = 0;

    for (i = 0; i + 2 < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = t[v >> 18];
        out[o++] = t[(v >> 12) & 63];
        out[o++] = t[(v >> 6) & 63];
        out[o++] = t[v & 63];
    }
    if (i < len) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < len ? (uint32_t)in[i + 1] << 8 : 0);
        out[o++] = t[v >> 18];
        out[o++] = t[(v >> 12) & 63];
        out[o++] = i + 1 < len ? t[(v >> 6) & 63] : '=';
        out[o++] = '=';
    }
    out[o] = '\0';
}

/** A small PNG-signature image, distinct per seed. */
static size_t png(unsigned seed, unsigned char *out, size_t len)
{
    static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    rng_t r = {seed * 2654435761u + 1};

    memcpy(out, sig, 8);
    rng_fill(&r, out + 8, len - 8);
    return len;
}

/* ------------------------------------------------------------------ an owner that feeds like the request paths */

typedef struct {
    ji_ingest_t *in;
    const char *body;
    size_t len, off;
    size_t piece; /**< bytes offered per feed */
    size_t hold;  /**< stop feeding once this many bytes were fed (0: never) */
    bool ended, done, resumed;
    int status;
    char answer[8192];
    /* record mode */
    const char *const *names;
    const char *const *emails;
    size_t nrecords, next_record;
} owner_t;

static void feed_more(owner_t *o)
{
    if (o->names != NULL) {
        while (o->next_record < o->nrecords) {
            size_t i = o->next_record++;
            int r = ji_ingest_put_record(o->in, i + 1, o->names[i], strlen(o->names[i]), o->emails[i],
                                         strlen(o->emails[i]), NULL, 0);
            if (r != 0)
                return;
        }
        o->ended = true;
        ji_ingest_end(o->in);
        return;
    }
    while (o->off < o->len) {
        size_t n = o->len - o->off, taken;
        if (n > o->piece)
            n = o->piece;
        if (o->hold != 0) {
            if (o->off >= o->hold)
                return;
            if (o->off + n > o->hold)
                n = o->hold - o->off;
        }
        taken = ji_ingest_feed(o->in, o->body + o->off, n);
        o->off += taken;
        if (taken < n)
            return; /* resume comes, or done */
    }
    if (!o->ended) {
        o->ended = true;
        ji_ingest_end(o->in);
    }
}

static void on_resume(ji_ingest_t *in, void *owner)
{
    owner_t *o = owner;

    (void)in;
    o->resumed = true;
    feed_more(o);
}

static void on_done(ji_ingest_t *in, void *owner, int status, const char *body, size_t len, unsigned retry_after)
{
    owner_t *o = owner;

    (void)retry_after;
    o->status = status;
    snprintf(o->answer, sizeof(o->answer), "%.*s", (int)len, body);
    o->done = true;
    o->in = NULL;
    ji_ingest_free(in);
}

static const ji_ingest_callbacks_t callbacks = {on_resume, on_done};

static void start(owner_t *o, const char *body, size_t piece, const char *key, bool skip)
{
    ji_ingest_params_t params = {.skip_errors = skip, .idempotency_key = key};

    memset(o, 0, sizeof(*o));
    o->body = body;
    o->len = body != NULL ? strlen(body) : 0;
    o->piece = piece;
    o->in = ji_ingest_new(&env, &params, &callbacks, o);
    CHECK(o->in != NULL);
}

/** Runs one ingest to its answer; returns the status. */
static int ingest(owner_t *o, const char *body, size_t piece, const char *key, bool skip)
{
    start(o, body, piece, key, skip);
    CHECK(run_until(&o->done, 20));
    if (!o->done) {
        ji_ingest_free(o->in);
        o->in = NULL;
    }
    return o->status;
}

/** A JSON number member of an answer (-1 when missing). */
static long long member(const char *answer, const char *name)
{
    char pat[64];
    const char *p;

    snprintf(pat, sizeof(pat), "\"%s\":", name);
    p = strstr(answer, pat);
    return p != NULL ? strtoll(p + strlen(pat), NULL, 10) : -1;
}

/* ------------------------------------------------------------------ tests */

static void test_key_check(void)
{
    ji_error_t err;
    char key[JI_IDEMPOTENCY_KEY_CAP], big[JI_MAX_IDEMPOTENCY_KEY_BYTES + 4];

    CHECK_EQ_INT(ji_idempotency_key_check("abc-123_~!", 10, &err), 0);
    CHECK_EQ_INT(ji_idempotency_key_check("\"abc\"", 5, &err), 0);
    ji_idempotency_key_copy(key, "\"abc\"", 5);
    CHECK_EQ_STR(key, "abc");
    ji_idempotency_key_copy(key, "abc", 3);
    CHECK_EQ_STR(key, "abc");
    memset(big, 'k', sizeof(big));
    CHECK_EQ_INT(ji_idempotency_key_check(big, JI_MAX_IDEMPOTENCY_KEY_BYTES, &err), 0);
    CHECK_EQ_INT(ji_idempotency_key_check(big, JI_MAX_IDEMPOTENCY_KEY_BYTES + 1, &err), -1);
    CHECK_EQ_INT(err.kind, JI_ERR_MALFORMED);
    CHECK(strstr(err.message, "JI_MAX_IDEMPOTENCY_KEY_BYTES (255)") != NULL);
    big[0] = big[JI_MAX_IDEMPOTENCY_KEY_BYTES + 1] = '"';
    CHECK_EQ_INT(ji_idempotency_key_check(big, JI_MAX_IDEMPOTENCY_KEY_BYTES + 2, &err), 0); /* quotes not counted */
    ji_idempotency_key_copy(key, big, JI_MAX_IDEMPOTENCY_KEY_BYTES + 2);
    CHECK_EQ_INT(strlen(key), JI_MAX_IDEMPOTENCY_KEY_BYTES);
    CHECK_EQ_INT(ji_idempotency_key_check(big, JI_MAX_IDEMPOTENCY_KEY_BYTES + 3, &err), -1);

    static const struct {
        const char *v;
        size_t len;
    } bad[] = {{"", 0},         {"\"\"", 2},     {"\"", 1},          {"\"abc", 4}, {"a b", 3},
               {"a\tb", 3},     {"\xff", 1},     {"caf\xc3\xa9", 5}, {"a\x7f", 2}, {"a\0b", 3},
               {"\"a\\b\"", 5}, {"\"a\"b\"", 5}, {"\"a b\"", 5}};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        ji_error_clear(&err);
        CHECK_EQ_INT(ji_idempotency_key_check(bad[i].v, bad[i].len, &err), -1);
        CHECK_EQ_INT(err.kind, JI_ERR_MALFORMED);
        CHECK(err.message[0] != '\0');
    }
    CHECK(ji_idempotency_lock_id("abc") == ji_idempotency_lock_id("abc"));
    CHECK(ji_idempotency_lock_id("abc") != ji_idempotency_lock_id("abd"));
}

static void test_commit_in_pieces(void)
{
    unsigned char img[3][700];
    char b64[3][1000], body[8192];
    size_t ilen[3];
    owner_t o;
    PGresult *res;
    long before = sql_long("SELECT count(*) FROM users");
    int files_before = count_files(images_dir);

    for (unsigned i = 0; i < 3; i++) {
        ilen[i] = png(i + 1, img[i], 300 + 200 * i);
        base64(img[i], ilen[i], b64[i]);
    }
    snprintf(body, sizeof(body),
             "{\"name\":\"ann\",\"email\":\"ann@example.com\",\"image\":\"%s\"}\n"
             "{\"name\":\"bob\",\"email\":\"bob@example.com\"}\r\n"
             "\n"
             "{\"user\":\"c\\u00e9line\",\"email\":\"c@example.com\",\"image\":\"%s\"}\n"
             "{\"name\":\"dan\",\"email\":\"dan@example.com\",\"image\":null}\n"
             "{\"name\":\"eve\",\"email\":\"eve@example.com\",\"image\":\"data:image/png;base64,%s\"}",
             b64[0], b64[1], b64[2]);
    CHECK_EQ_INT(ingest(&o, body, 7, NULL, false), 200);
    CHECK_EQ_INT(member(o.answer, "inserted"), 5);
    CHECK_EQ_INT(member(o.answer, "images"), 3);
    CHECK_EQ_INT(member(o.answer, "lines"), 6);
    CHECK_EQ_INT(member(o.answer, "skipped"), 0);
    CHECK_EQ_INT(member(o.answer, "bytes"), (long long)strlen(body));
    CHECK_EQ_INT(sql_long("SELECT count(*) FROM users") - before, 5);

    /* the rows, in order, with their files holding exactly the decoded bytes */
    char sql[256];
    snprintf(sql, sizeof(sql),
             "SELECT name, email, image_path, image_type, image_size FROM users WHERE batch_id = %lld ORDER BY user_id",
             member(o.answer, "batch_id"));
    res = PQexec(conn, sql);
    CHECK_EQ_INT(PQntuples(res), 5);
    if (PQntuples(res) == 5) {
        static const char *names[] = {"ann", "bob", "c\xc3\xa9line", "dan", "eve"};
        static const int image_of[] = {0, -1, 1, -1, 2};
        for (int r = 0; r < 5; r++) {
            CHECK_EQ_STR(PQgetvalue(res, r, 0), names[r]);
            CHECK(strchr(PQgetvalue(res, r, 1), '@') != NULL);
            if (image_of[r] < 0) {
                CHECK(PQgetisnull(res, r, 2));
                continue;
            }
            char path[512], got[1024];
            FILE *f;
            size_t n = 0;
            snprintf(path, sizeof(path), "%s/%s", images_dir, PQgetvalue(res, r, 2));
            CHECK_EQ_STR(PQgetvalue(res, r, 3), "image/png");
            CHECK_EQ_INT(strtol(PQgetvalue(res, r, 4), NULL, 10), (long)ilen[image_of[r]]);
            if ((f = fopen(path, "rb")) != NULL) {
                n = fread(got, 1, sizeof(got), f);
                fclose(f);
            }
            CHECK_EQ_INT(n, ilen[image_of[r]]);
            CHECK(memcmp(got, img[image_of[r]], ilen[image_of[r]]) == 0);
        }
    }
    PQclear(res);
    CHECK_EQ_INT(count_files(images_dir) - files_before, 3); /* the journal is gone */
    CHECK(run_until_pool_settled(5));
}

static void test_bad_record(void)
{
    unsigned char img[400];
    char b64[600], body[4096];
    owner_t o;
    long before = sql_long("SELECT count(*) FROM users"), batches = sql_long("SELECT count(*) FROM batches");
    int files_before = count_files(images_dir);

    base64(img, png(9, img, sizeof(img)), b64);
    snprintf(body, sizeof(body),
             "{\"name\":\"a\",\"email\":\"a@example.com\",\"image\":\"%s\"}\n"
             "{\"name\":\"b\",\"email\":\"b@example.com\",\"image\":\"%s\"}\n"
             "{\"name\":\"no email\"}\n"
             "{\"name\":\"d\",\"email\":\"d@example.com\"}\n",
             b64, b64);
    CHECK_EQ_INT(ingest(&o, body, 5, NULL, false), 422);
    CHECK_EQ_INT(member(o.answer, "line"), 3);
    CHECK(strstr(o.answer, "\"field\":\"email\"") != NULL);
    CHECK(run_until_pool_settled(5));
    CHECK_EQ_INT(sql_long("SELECT count(*) FROM users"), before);
    CHECK_EQ_INT(sql_long("SELECT count(*) FROM batches"), batches);
    CHECK_EQ_INT(count_files(images_dir), files_before);

    /* malformed JSON is 400 with its line */
    CHECK_EQ_INT(ingest(&o, "{\"name\":\"a\",\"email\":\"a@example.com\"}\n{\"name\":\n", 3, NULL, false), 400);
    CHECK_EQ_INT(member(o.answer, "line"), 2);
    CHECK(run_until_pool_settled(5));
    CHECK_EQ_INT(sql_long("SELECT count(*) FROM users"), before);
    CHECK_EQ_INT(count_files(images_dir), files_before);
}

static void test_skip_mode(void)
{
    static const char body[] = "{\"name\":\"s1\",\"email\":\"s1@example.com\"}\n"
                               "{\"name\":\"bad\"}\n"
                               "{\"name\":\"s2\",\"email\":\"s2@example.com\"}\n"
                               "{\"name\":\"bad2\",\"email\":\"nope\"}\n"
                               "not json\n"
                               "{\"name\":\"s3\",\"email\":\"s3@example.com\"}\n";
    owner_t o;
    char sql[128];

    CHECK_EQ_INT(ingest(&o, body, 11, NULL, true), 200);
    CHECK_EQ_INT(member(o.answer, "inserted"), 3);
    CHECK_EQ_INT(member(o.answer, "skipped"), 3);
    CHECK(strstr(o.answer, "\"errors\":[{\"line\":2,") != NULL);
    CHECK(strstr(o.answer, "{\"line\":4,") != NULL);
    CHECK(strstr(o.answer, "{\"line\":5,") != NULL);
    snprintf(sql, sizeof(sql), "SELECT string_agg(name, ',' ORDER BY user_id) FROM users WHERE batch_id = %lld",
             member(o.answer, "batch_id"));
    CHECK_EQ_STR(sql_value(sql), "s1,s2,s3");
    CHECK(run_until_pool_settled(5));
}

static void test_replay(void)
{
    static const char body[] = "{\"name\":\"r1\",\"email\":\"r1@example.com\"}\n"
                               "{\"name\":\"r2\",\"email\":\"r2@example.com\"}\n";
    static const char other[] = "{\"name\":\"r1\",\"email\":\"r1@example.com\"}\n"
                                "{\"name\":\"r2\",\"email\":\"r2@example.org\"}\n";
    char first[8192], digest[65];
    owner_t o;
    long users;

    CHECK_EQ_INT(ingest(&o, body, 13, "unit-replay", false), 200);
    snprintf(first, sizeof(first), "%s", o.answer);
    users = sql_long("SELECT count(*) FROM users");
    /* the digest is SHA-256 of the body bytes, kept with the key and the answer */
    sha256_hex(body, strlen(body), digest);
    CHECK_EQ_STR(sql_value("SELECT encode(request_digest, 'hex') FROM batches WHERE idempotency_key = 'unit-replay'"),
                 digest);
    CHECK_EQ_STR(sql_value("SELECT response FROM batches WHERE idempotency_key = 'unit-replay'"), first);

    /* the same body, other pieces, the quoted form of the key: the first answer byte for byte, nothing stored */
    CHECK_EQ_INT(ingest(&o, body, 1, "\"unit-replay\"", false), 200);
    CHECK_EQ_STR(o.answer, first);
    CHECK_EQ_INT(member(o.answer, "bytes"), (long long)strlen(body));
    CHECK_EQ_INT(sql_long("SELECT count(*) FROM users"), users);

    /* another body under the key: 422, nothing stored; the key still answers the first body */
    CHECK_EQ_INT(ingest(&o, other, 64, "unit-replay", false), 422);
    CHECK(strstr(o.answer, "Idempotency-Key") != NULL);
    CHECK_EQ_INT(ingest(&o, body, 64, "unit-replay", false), 200);
    CHECK_EQ_STR(o.answer, first);
    /* a prefix of the body is another body */
    CHECK_EQ_INT(ingest(&o, "{\"name\":\"r1\",\"email\":\"r1@example.com\"}\n", 64, "unit-replay", false), 422);
    CHECK_EQ_INT(sql_long("SELECT count(*) FROM users"), users);
    CHECK_EQ_INT(sql_long("SELECT count(*) FROM batches WHERE idempotency_key = 'unit-replay'"), 1);

    /* a bad key never reaches the database */
    CHECK_EQ_INT(ingest(&o, body, 64, "caf\xc3\xa9", false), 400);
    CHECK(strstr(o.answer, "visible ASCII") != NULL);
    CHECK(run_until_pool_settled(5));
}

static void test_replay_record_mode(void)
{
    static const char *names[] = {"m1", "m2", "m3"};
    static const char *emails[] = {"m1@example.com", "m2@example.com", "m3@example.com"};
    static const char *emails2[] = {"m1@example.com", "m2@example.com", "other@example.com"};
    ji_ingest_params_t params = {.idempotency_key = "unit-records"};
    char first[8192];
    owner_t o;
    int round;

    for (round = 0; round < 4; round++) {
        memset(&o, 0, sizeof(o));
        o.names = names;
        o.emails = round == 2 ? emails2 : emails;
        o.nrecords = 3;
        o.in = ji_ingest_new(&env, &params, &callbacks, &o);
        CHECK(run_until(&o.done, 20));
        if (round == 0) {
            CHECK_EQ_INT(o.status, 200);
            CHECK_EQ_INT(member(o.answer, "inserted"), 3);
            snprintf(first, sizeof(first), "%s", o.answer);
        } else if (round == 2) {
            CHECK_EQ_INT(o.status, 422);
        } else {
            CHECK_EQ_INT(o.status, 200);
            CHECK_EQ_STR(o.answer, first);
        }
    }
    CHECK_EQ_INT(sql_long("SELECT count(*) FROM users WHERE name IN ('m1', 'm2', 'm3')"), 3);
    CHECK(run_until_pool_settled(5));
}

/** The key's first request still streams: another with the key is 409 at once; other uploads go on. */
static void test_key_in_progress(void)
{
    static const char body[] = "{\"name\":\"p1\",\"email\":\"p1@example.com\"}\n"
                               "{\"name\":\"p2\",\"email\":\"p2@example.com\"}\n";
    owner_t a, b, c;
    double t0;

    start(&a, body, 8, "unit-running", false);
    a.hold = 20; /* half a line, then the client stalls */
    CHECK(run_until(&a.resumed, 10));
    CHECK_EQ_INT(a.off, 20);

    t0 = now_sec();
    CHECK_EQ_INT(ingest(&b, body, 8, "unit-running", false), 409);
    CHECK(now_sec() - t0 < 2);
    CHECK(strstr(b.answer, "in progress") != NULL);
    CHECK(!a.done);
    /* nobody waits for a lock in the server */
    CHECK_EQ_INT(sql_long("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                          "AND datname = '" TEST_DB_NAME "'"),
                 0);

    CHECK_EQ_INT(ingest(&c, "{\"name\":\"other\",\"email\":\"o@example.com\"}\n", 64, NULL, false), 200);
    CHECK(!a.done);

    a.hold = 0;
    feed_more(&a);
    CHECK(run_until(&a.done, 10));
    CHECK_EQ_INT(a.status, 200);
    CHECK_EQ_INT(member(a.answer, "inserted"), 2);
    /* now the key replays */
    CHECK_EQ_INT(ingest(&b, body, 64, "unit-running", false), 200);
    CHECK_EQ_STR(b.answer, a.answer);
    CHECK(run_until_pool_settled(5));
}

static void test_key_expiry(void)
{
    static const char body[] = "{\"name\":\"x1\",\"email\":\"x1@example.com\"}\n";
    static const char other[] = "{\"name\":\"x2\",\"email\":\"x2@example.com\"}\n";
    owner_t o;
    long long first_batch;
    uint64_t cleared = 0;
    ji_error_t err;
    char sql[256];

    env.idempotency_ttl_s = 3600;
    CHECK_EQ_INT(ingest(&o, body, 64, "unit-expiry", false), 200);
    first_batch = member(o.answer, "batch_id");
    CHECK_EQ_INT(ingest(&o, other, 64, "unit-expiry", false), 422);

    /* older than the TTL: the key may be used again; the old batch keeps its rows and loses its key */
    sql_value("UPDATE batches SET created_at = now() - interval '2 hours' WHERE idempotency_key = 'unit-expiry'");
    CHECK_EQ_INT(ingest(&o, other, 64, "unit-expiry", false), 200);
    CHECK(member(o.answer, "batch_id") != first_batch);
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM batches b JOIN users u USING (batch_id) WHERE b.batch_id = %lld "
             "AND b.idempotency_key IS NULL AND b.response IS NULL AND b.request_digest IS NULL",
             first_batch);
    CHECK_EQ_INT(sql_long(sql), 1);
    snprintf(sql, sizeof(sql), "SELECT batch_id FROM batches WHERE idempotency_key = 'unit-expiry'");
    CHECK_EQ_INT(sql_long(sql), member(o.answer, "batch_id"));

    /* gc's sweep: every expired key, batches stay */
    CHECK_EQ_INT(ingest(&o, body, 64, "unit-gc-1", false), 200);
    CHECK_EQ_INT(ingest(&o, body, 64, "unit-gc-2", false), 200);
    sql_value("UPDATE batches SET created_at = now() - interval '2 hours' WHERE idempotency_key LIKE 'unit-gc-%'");
    CHECK(run_until_pool_settled(5));
    CHECK_EQ_INT(ji_schema_expire_idempotency_keys(conn, 3600, &cleared, &err), 0);
    CHECK(cleared >= 2);
    CHECK_EQ_INT(sql_long("SELECT count(*) FROM batches WHERE idempotency_key LIKE 'unit-gc-%'"), 0);
    CHECK_EQ_INT(sql_long("SELECT count(*) FROM batches WHERE idempotency_key IS NOT NULL AND created_at < now() - "
                          "interval '1 hour'"),
                 0);

    /* the service's own sweep: after a committed upload, in the background, once per interval */
    env.next_key_sweep_ms = 0;
    CHECK_EQ_INT(ingest(&o, body, 64, "unit-sweep", false), 200);
    CHECK(run_until_pool_settled(5));
    sql_value("UPDATE batches SET created_at = now() - interval '2 hours' WHERE idempotency_key = 'unit-sweep'");
    CHECK(env.next_key_sweep_ms > h2o_now(loop)); /* swept after the upload above: not due again yet */
    CHECK_EQ_INT(ingest(&o, other, 64, NULL, false), 200);
    CHECK(run_until_pool_settled(5));
    CHECK_EQ_INT(sql_long("SELECT count(*) FROM batches WHERE idempotency_key = 'unit-sweep'"), 1);
    env.next_key_sweep_ms = 0; /* due */
    CHECK_EQ_INT(ingest(&o, other, 64, NULL, false), 200);
    CHECK(run_until_pool_settled(5));
    CHECK_EQ_INT(sql_long("SELECT count(*) FROM batches WHERE idempotency_key = 'unit-sweep'"), 0);
    env.idempotency_ttl_s = 0;
}

/** The backends of the ingest's pool now, added to `pids` (returns how many were not in it yet). */
static int collect_backends(char (*pids)[16], int *npids, int cap)
{
    PGresult *res = PQexec(conn, "SELECT pid FROM pg_stat_activity WHERE datname = '" TEST_DB_NAME
                                 "' AND application_name = 'jsonl-ingest'");
    int added = 0;

    for (int r = 0; r < PQntuples(res); r++) {
        bool seen = false;
        for (int k = 0; k < *npids; k++)
            seen |= strcmp(pids[k], PQgetvalue(res, r, 0)) == 0;
        if (!seen && *npids < cap) {
            snprintf(pids[(*npids)++], sizeof(pids[0]), "%s", PQgetvalue(res, r, 0));
            added++;
        }
    }
    PQclear(res);
    return added;
}

/** Failed requests roll back on their own connection, which goes back to the pool: no new backend each time. */
static void test_failures_keep_connections(void)
{
    static const char bad[] = "{\"name\":\"f\",\"email\":\"f@example.com\"}\n{\"name\":\"f\"}\n";
    char pids[64][16];
    int npids = 0, added = 0;
    owner_t o;
    long users = sql_long("SELECT count(*) FROM users");

    CHECK(run_until_pool_settled(5));
    collect_backends(pids, &npids, 64); /* the idle connections of the pool */
    for (int i = 0; i < 30; i++) {
        /* every other one holds an Idempotency-Key's lock; the one before the last fails from outside */
        if (i == 28) {
            start(&o, bad, 16, NULL, false);
            o.hold = 10;
            CHECK(run_until(&o.resumed, 10));
            ji_error_t err;
            ji_error_set(&err, JI_ERR_MALFORMED, 0, NULL, "request body stalled");
            ji_ingest_fail(o.in, &err);
            CHECK(run_until(&o.done, 10));
            CHECK_EQ_INT(o.status, 400);
        } else {
            CHECK_EQ_INT(ingest(&o, bad, 16, i % 2 ? "unit-failing" : NULL, false), 422);
        }
        CHECK(run_until_pool_settled(5));
        added += collect_backends(pids, &npids, 64);
    }
    printf("new backends over 30 failed requests: %d\n", added);
    CHECK(added <= 1);
    CHECK(ji_pg_pool_idle(pool) >= 1);
    CHECK_EQ_INT(sql_long("SELECT count(*) FROM users"), users);
    /* nothing is left open in the server */
    CHECK_EQ_INT(sql_long("SELECT count(*) FROM pg_stat_activity WHERE datname = '" TEST_DB_NAME
                          "' AND application_name = 'jsonl-ingest' AND state <> 'idle'"),
                 0);
    /* and the key of a failed request is free at once */
    CHECK_EQ_INT(ingest(&o, bad, 16, "unit-failing", false), 422);
    CHECK_EQ_INT(ingest(&o, "{\"name\":\"f\",\"email\":\"f@example.com\"}\n", 64, "unit-failing", false), 200);
}

/** A database error is 500 with a stable text; PostgreSQL's message stays in the log. */
static void test_db_error_hidden(void)
{
    static const char body[] = "{\"name\":\"fine\",\"email\":\"fine@example.com\"}\n"
                               "{\"name\":\"boom\",\"email\":\"boom@example.com\"}\n";
    owner_t o;

    sql_value("CREATE FUNCTION ji_unit_boom() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN "
              "IF NEW.name = 'boom' THEN RAISE EXCEPTION 'pg-secret-text %', NEW.email; END IF; RETURN NEW; END$$");
    sql_value("CREATE TRIGGER ji_unit_boom BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION ji_unit_boom()");
    CHECK_EQ_INT(ingest(&o, body, 64, "unit-boom", false), 500);
    CHECK(strstr(o.answer, "pg-secret-text") == NULL);
    CHECK(strstr(o.answer, "database error: COPY failed") != NULL);
    sql_value("DROP TRIGGER ji_unit_boom ON users");
    sql_value("DROP FUNCTION ji_unit_boom()");
    CHECK(run_until_pool_settled(5));
    CHECK_EQ_INT(ingest(&o, body, 64, "unit-boom", false), 200); /* the key stayed free */
}

/** A lock that is never granted ends the request after JI_PG_LOCK_TIMEOUT_MS: 503, not a wait for ever. */
static void test_lock_timeout(void)
{
    owner_t o;
    double t0;

    sql_value("BEGIN");
    sql_value("LOCK TABLE users IN ACCESS EXCLUSIVE MODE");
    t0 = now_sec();
    CHECK_EQ_INT(ingest(&o, "{\"name\":\"l\",\"email\":\"l@example.com\"}\n", 64, NULL, false), 503);
    CHECK(now_sec() - t0 >= JI_PG_LOCK_TIMEOUT_MS / 1000.0 - 0.5);
    CHECK(strstr(o.answer, "JI_PG_LOCK_TIMEOUT_MS") != NULL);
    CHECK(strstr(o.answer, "canceling") == NULL);
    sql_value("ROLLBACK");
    CHECK(run_until_pool_settled(5));
}

/* ------------------------------------------------------------------ the pool's rollback, which the ingest relies on */

typedef struct {
    bool done;
    bool failed;
} step_t;

static void on_step_ready(ji_pg_t *pg, void *ctx, const char *err)
{
    step_t *st = ctx;

    (void)pg;
    st->failed = err != NULL;
    st->done = true;
}

static void on_step_result(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    step_t *st = ctx;

    (void)pg;
    (void)res;
    st->failed = err != NULL;
    st->done = true;
}

static ji_pg_t *step_get(void)
{
    step_t st = {0};
    ji_pg_t *pg = ji_pg_pool_get(pool, on_step_ready, &st);

    CHECK(run_until(&st.done, 10));
    CHECK(!st.failed);
    return pg;
}

static void step_query(ji_pg_t *pg, const char *sql)
{
    step_t st = {0};

    CHECK_EQ_INT(ji_pg_query(pg, sql, 0, NULL, on_step_result, &st), 0);
    CHECK(run_until(&st.done, 10));
    CHECK(!st.failed);
}

/** The backend pid of a connection (runs a statement on it). */
static long backend_pid(ji_pg_t *pg)
{
    step_query(pg, "SELECT 1");
    return PQbackendPID(ji_pg_conn(pg));
}

static void test_pool_put_rollback(void)
{
    ji_pg_t *pg;
    step_t st = {0};
    long pid;

    CHECK(run_until_pool_settled(5));
    sql_value("CREATE TABLE IF NOT EXISTS ji_unit_marks (n int)");

    /* in COPY: the COPY is ended with an error, the transaction rolled back, the connection kept */
    pg = step_get();
    pid = backend_pid(pg);
    step_query(pg, "BEGIN");
    step_query(pg, "INSERT INTO ji_unit_marks VALUES (1)");
    CHECK_EQ_INT(ji_pg_query(pg, "COPY ji_unit_marks FROM STDIN", 0, NULL, on_step_result, &st), 0);
    CHECK(run_until(&st.done, 10));
    CHECK_EQ_INT(ji_pg_copy_put(pg, "2\n3\n", 4) >= 0, 1);
    ji_pg_pool_put_rollback(pool, pg, "unit: aborted");
    CHECK(ji_pg_pool_busy(pool) >= 1); /* busy until rolled back */
    CHECK(run_until_pool_settled(5));
    pg = step_get();
    CHECK_EQ_INT(backend_pid(pg), pid); /* the same backend, back from the pool */
    CHECK_EQ_INT(PQtransactionStatus(ji_pg_conn(pg)), PQTRANS_IDLE);

    /* a statement in flight: its result is awaited, then the rollback */
    step_query(pg, "BEGIN");
    step_query(pg, "INSERT INTO ji_unit_marks VALUES (4)");
    CHECK_EQ_INT(ji_pg_query(pg, "SELECT pg_sleep(0.2)", 0, NULL, on_step_result, &st), 0);
    ji_pg_pool_put_rollback(pool, pg, NULL);
    CHECK(run_until_pool_settled(5));
    pg = step_get();
    CHECK_EQ_INT(backend_pid(pg), pid);
    CHECK_EQ_STR(sql_value("SELECT count(*) FROM ji_unit_marks"), "0");

    /* put_after: the statement runs in the background, outside any transaction */
    ji_pg_pool_put_after(pool, pg, "INSERT INTO ji_unit_marks VALUES (5)");
    CHECK(run_until_pool_settled(5));
    CHECK_EQ_STR(sql_value("SELECT count(*) FROM ji_unit_marks WHERE n = 5"), "1");
    pg = step_get();
    CHECK_EQ_INT(backend_pid(pg), pid);
    /* a broken one is closed, not kept */
    {
        char sql[96];
        snprintf(sql, sizeof(sql), "SELECT pg_terminate_backend(%ld)", pid);
        sql_value(sql);
    }
    for (int i = 0; i < 5; i++)
        h2o_evloop_run(loop, 20);
    ji_pg_pool_put_rollback(pool, pg, NULL);
    CHECK(run_until_pool_settled(5));
    pg = step_get();
    CHECK(backend_pid(pg) != pid);
    ji_pg_pool_put(pool, pg);
    sql_value("DROP TABLE ji_unit_marks");
}

/* ------------------------------------------------------------------ set-up */

/** `admin_url` with another database, as key=value conninfo (works for URLs and key=value alike). */
static int make_url(char *out, size_t cap, const char *dbname)
{
    PQconninfoOption *opts = PQconninfoParse(admin_url, NULL), *o;
    size_t n = 0;

    if (opts == NULL)
        return -1;
    out[0] = '\0';
    for (o = opts; o->keyword != NULL; o++) {
        const char *v = strcmp(o->keyword, "dbname") == 0 ? dbname : o->val;
        if (v == NULL || v[0] == '\0')
            continue;
        n += snprintf(out + n, n < cap ? cap - n : 0, "%s%s='", n ? " " : "", o->keyword);
        for (const char *p = v; *p != '\0'; p++)
            n += snprintf(out + n, n < cap ? cap - n : 0, "%s%c", *p == '\'' || *p == '\\' ? "\\" : "", *p);
        n += snprintf(out + n, n < cap ? cap - n : 0, "'");
    }
    PQconninfoFree(opts);
    return n < cap ? 0 : -1;
}

static int admin_exec(const char *sql)
{
    PGconn *a = PQconnectdb(admin_url);
    PGresult *res;
    int ok;

    if (PQstatus(a) != CONNECTION_OK) {
        fprintf(stderr, "cannot connect to %s: %s", admin_url, PQerrorMessage(a));
        PQfinish(a);
        return -1;
    }
    res = PQexec(a, sql);
    ok = PQresultStatus(res) == PGRES_COMMAND_OK;
    if (!ok)
        fprintf(stderr, "%s: %s", sql, PQerrorMessage(a));
    PQclear(res);
    PQfinish(a);
    return ok ? 0 : -1;
}

int main(void)
{
    static const unit_test_t tests[] = {{"key_check", test_key_check},
                                        {"commit_in_pieces", test_commit_in_pieces},
                                        {"bad_record", test_bad_record},
                                        {"skip_mode", test_skip_mode},
                                        {"replay", test_replay},
                                        {"replay_record_mode", test_replay_record_mode},
                                        {"key_in_progress", test_key_in_progress},
                                        {"key_expiry", test_key_expiry},
                                        {"failures_keep_connections", test_failures_keep_connections},
                                        {"db_error_hidden", test_db_error_hidden},
                                        {"lock_timeout", test_lock_timeout},
                                        {"pool_put_rollback", test_pool_put_rollback},
                                        {NULL, NULL}};
    ji_error_t err;
    int ret = 1;

    admin_url = unit_test_db();
    if (admin_url == NULL) {
        printf("ingest: no test database configured (JI_TEST_DB; meson -Dtest_database_url=...), skipped\n");
        return 77;
    }
    if (make_url(ingest_url, sizeof(ingest_url), TEST_DB_NAME) != 0 ||
        admin_exec("DROP DATABASE IF EXISTS " TEST_DB_NAME " WITH (FORCE)") != 0 ||
        admin_exec("CREATE DATABASE " TEST_DB_NAME " TEMPLATE template0 ENCODING 'UTF8'") != 0)
        return 1;
    conn = PQconnectdb(ingest_url);
    if (PQstatus(conn) != CONNECTION_OK) {
        fprintf(stderr, "cannot connect: %s", PQerrorMessage(conn));
        goto done;
    }
    if (ji_schema_ensure(conn, &err) != 0) {
        fprintf(stderr, "schema: %s\n", err.message);
        goto done;
    }
    snprintf(images_dir, sizeof(images_dir), "/tmp/ji-test-ingest-XXXXXX");
    if (mkdtemp(images_dir) == NULL || ji_image_store_open(&store, images_dir, false, &err) != 0) {
        fprintf(stderr, "images directory: %s\n", err.message);
        goto done;
    }
    loop = h2o_evloop_create();
    h2o_timeout_init(loop, &zero_timeout, 0);
    pool = ji_pg_pool_new(loop, ingest_url, JI_PG_KEEP_IDLE);
    env = (ji_ingest_env_t){
        .loop = loop,
        .zero_timeout = &zero_timeout,
        .pg_pool = pool,
        .images = &store,
        .max_record_bytes = 1 << 20,
        .stats = &stats,
    };

    ret = unit_run("ingest", tests);

    CHECK(run_until_pool_settled(5));
    ji_pg_pool_free(pool);
    for (int i = 0; i < 3; i++)
        h2o_evloop_run(loop, 0);
    h2o_timeout_dispose(loop, &zero_timeout);
    h2o_evloop_destroy(loop);
    ji_image_store_close(&store);
    {
        char cmd[300];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", images_dir);
        if (system(cmd) != 0)
            fprintf(stderr, "could not remove %s\n", images_dir);
    }
done:
    PQfinish(conn);
    admin_exec("DROP DATABASE IF EXISTS " TEST_DB_NAME " WITH (FORCE)");
    return ret;
}
