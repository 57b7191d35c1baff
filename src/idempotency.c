/*
 * idempotency.c — owns the Idempotency-Key rules: the key alphabet and
 * length, the quoted form, a key's advisory-lock id, the SHA-256 request
 * digest (OpenSSL's EVP interface) stored with a key, and the statements that
 * claim a key in an ingest's transaction. A key's lock is only ever tried,
 * never waited for: a running first request makes the second one 409.
 */
#include "idempotency.h"

#include <inttypes.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/** The rule, as every refusal states it. */
#define KEY_RULE                                                                                                       \
    "Idempotency-Key must be 1 to JI_MAX_IDEMPOTENCY_KEY_BYTES (" JI_STR(                                              \
        JI_MAX_IDEMPOTENCY_KEY_BYTES) ") bytes of visible ASCII"

int ji_idempotency_key_check(const char *value, size_t len, ji_error_t *err)
{
    bool quoted = len > 0 && value[0] == '"';
    const char *key = value;
    size_t n = len;

    if (quoted) {
        if (len < 2 || value[len - 1] != '"')
            return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, "Idempotency-Key: a quoted key must end with '\"'");
        key++;
        n -= 2;
    }
    if (n == 0 || n > JI_MAX_IDEMPOTENCY_KEY_BYTES)
        return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, KEY_RULE);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)key[i];
        if (c < 0x21 || c > 0x7e)
            return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL, KEY_RULE " (byte %zu is 0x%02x)", i + 1, c);
        if (quoted && (c == '"' || c == '\\'))
            return ji_error_set(err, JI_ERR_MALFORMED, 0, NULL,
                                "Idempotency-Key: a quoted key may not hold '\"' or '\\'");
    }
    return 0;
}

void ji_idempotency_key_copy(char dst[JI_IDEMPOTENCY_KEY_CAP], const char *value, size_t len)
{
    if (len >= 2 && value[0] == '"' && value[len - 1] == '"') {
        value++;
        len -= 2;
    }
    if (len > JI_MAX_IDEMPOTENCY_KEY_BYTES)
        len = JI_MAX_IDEMPOTENCY_KEY_BYTES;
    memcpy(dst, value, len);
    dst[len] = '\0';
}

int64_t ji_idempotency_lock_id(const char *key)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    uint64_t id = 0;

    if (EVP_Digest(key, strlen(key), md, &mdlen, EVP_sha256(), NULL) != 1 || mdlen < 8)
        return 0;
    for (int i = 0; i < 8; i++)
        id = id << 8 | md[i];
    return (int64_t)id;
}

/* ------------------------------------------------------------------ request digest */

struct st_ji_request_digest_t {
    EVP_MD_CTX *ctx;
    bool final;
    bool failed;
    char hex[JI_REQUEST_DIGEST_HEX_LEN + 1];
};

ji_request_digest_t *ji_request_digest_new(void)
{
    ji_request_digest_t *d = calloc(1, sizeof(*d));

    if (d == NULL)
        return NULL;
    if ((d->ctx = EVP_MD_CTX_new()) == NULL || EVP_DigestInit_ex(d->ctx, EVP_sha256(), NULL) != 1) {
        ji_request_digest_free(d);
        return NULL;
    }
    return d;
}

void ji_request_digest_update(ji_request_digest_t *d, const void *data, size_t len)
{
    if (d->final || len == 0)
        return;
    if (EVP_DigestUpdate(d->ctx, data, len) != 1)
        d->failed = true;
}

/** A number in 8 bytes, little-endian: the fixed form of record mode. */
static void update_u64(ji_request_digest_t *d, uint64_t v)
{
    unsigned char b[8];

    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(v >> (8 * i));
    ji_request_digest_update(d, b, sizeof(b));
}

/** A length-prefixed byte string: no two different field lists hash the same bytes. */
static void update_field(ji_request_digest_t *d, const char *s, size_t len)
{
    update_u64(d, len);
    ji_request_digest_update(d, s, len);
}

void ji_request_digest_record(ji_request_digest_t *d, uint64_t line, const char *name, size_t name_len,
                              const char *email, size_t email_len, const char *image, size_t image_len)
{
    ji_request_digest_update(d, "R", 1);
    update_u64(d, line);
    update_field(d, name, name_len);
    update_field(d, email, email_len);
    update_field(d, image != NULL ? image : "", image != NULL ? image_len : 0);
}

void ji_request_digest_broken(ji_request_digest_t *d, const ji_error_t *err)
{
    ji_request_digest_update(d, "E", 1);
    update_u64(d, err->line);
    update_u64(d, (uint64_t)err->kind);
    update_field(d, err->field, strlen(err->field));
    update_field(d, err->message, strlen(err->message));
}

const char *ji_request_digest_hex(ji_request_digest_t *d)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;

    if (!d->final) {
        d->final = true;
        if (d->failed || EVP_DigestFinal_ex(d->ctx, md, &mdlen) != 1 || mdlen * 2 != JI_REQUEST_DIGEST_HEX_LEN) {
            d->failed = true;
        } else {
            ji_hex_encode(md, mdlen, d->hex);
            d->hex[JI_REQUEST_DIGEST_HEX_LEN] = '\0';
        }
    }
    return d->failed ? NULL : d->hex;
}

void ji_request_digest_free(ji_request_digest_t *d)
{
    if (d == NULL)
        return;
    EVP_MD_CTX_free(d->ctx);
    free(d);
}

/* ------------------------------------------------------------------ claiming a key in a transaction */

static void claim_failed(ji_key_claim_t *c, ji_pg_t *pg, const char *what, const PGresult *res, const char *err)
{
    c->found = JI_KEY_FAILED;
    c->what = what;
    c->res = res;
    c->err = err != NULL ? err : ji_pg_error(pg);
    c->_cb(c, pg, c->_ctx);
}

static void on_released(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_key_claim_t *c = ctx;

    if (err != NULL) {
        claim_failed(c, pg, "releasing an expired Idempotency-Key failed", res, err);
        return;
    }
    c->found = JI_KEY_FREE;
    c->_cb(c, pg, c->_ctx);
}

/** Columns: response, request_digest (hex), expired, batch_id. */
static void on_lookup(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_key_claim_t *c = ctx;
    const char *params[1];

    if (err != NULL) {
        claim_failed(c, pg, "looking up the Idempotency-Key failed", res, err);
        return;
    }
    if (PQntuples(res) == 0) {
        c->found = JI_KEY_FREE;
        c->_cb(c, pg, c->_ctx);
        return;
    }
    if (PQgetvalue(res, 0, 2)[0] != 't') {
        c->found = JI_KEY_COMMITTED;
        c->answer = PQgetisnull(res, 0, 0) ? NULL : PQgetvalue(res, 0, 0);
        c->answer_len = (size_t)PQgetlength(res, 0, 0);
        c->digest = PQgetisnull(res, 0, 1) ? NULL : PQgetvalue(res, 0, 1);
        c->_cb(c, pg, c->_ctx);
        return;
    }
    /* older than the TTL: the old batch keeps its rows and loses its key (this transaction holds the key's lock,
     * a sweep skips the rows others hold: nothing waits here) */
    params[0] = PQgetvalue(res, 0, 3);
    if (ji_pg_query(pg,
                    "UPDATE batches SET idempotency_key = NULL, response = NULL, request_digest = NULL "
                    "WHERE batch_id = $1",
                    1, params, on_released, c) != 0)
        claim_failed(c, pg, "releasing an expired Idempotency-Key failed", NULL, NULL);
}

static void on_guarded(ji_pg_t *pg, void *ctx, PGresult *res, const char *err)
{
    ji_key_claim_t *c = ctx;
    const char *params[2] = {c->_key, c->_ttl};

    if (err != NULL) {
        claim_failed(c, pg, "starting the transaction failed", res, err);
        return;
    }
    if (c->_key == NULL) {
        c->found = JI_KEY_FREE;
        c->_cb(c, pg, c->_ctx);
        return;
    }
    if (PQntuples(res) != 1 || PQgetvalue(res, 0, 1)[0] != 't') {
        c->found = JI_KEY_RUNNING;
        c->_cb(c, pg, c->_ctx);
        return;
    }
    c->locked = true;
    if (ji_pg_query(pg,
                    "SELECT response, encode(request_digest, 'hex'), "
                    "created_at < now() - make_interval(secs => $2::int), batch_id "
                    "FROM batches WHERE idempotency_key = $1",
                    2, params, on_lookup, c) != 0)
        claim_failed(c, pg, "looking up the Idempotency-Key failed", NULL, NULL);
}

int ji_idempotency_claim(ji_key_claim_t *claim, ji_pg_t *pg, const char *key, unsigned ttl_s,
                         void (*cb)(ji_key_claim_t *claim, ji_pg_t *pg, void *ctx), void *ctx)
{
    const char *params[2] = {JI_STR(JI_PG_LOCK_TIMEOUT_MS), claim->_lock_id};

    memset(claim, 0, sizeof(*claim));
    claim->_cb = cb;
    claim->_ctx = ctx;
    claim->_key = key;
    snprintf(claim->_ttl, sizeof(claim->_ttl), "%u", ttl_s);
    /* lock_timeout: no lock wait of the transaction outlasts it (a backstop; the key's lock is only tried) */
    if (key == NULL)
        return ji_pg_query(pg, "SELECT set_config('lock_timeout', $1, true)", 1, params, on_guarded, claim);
    snprintf(claim->_lock_id, sizeof(claim->_lock_id), "%" PRId64, ji_idempotency_lock_id(key));
    return ji_pg_query(pg, "SELECT set_config('lock_timeout', $1, true), pg_try_advisory_xact_lock($2::bigint)", 2,
                       params, on_guarded, claim);
}
