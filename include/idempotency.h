/*
 * idempotency.h — the Idempotency-Key rules that both request paths and the
 * ingest share: which header values are keys, the 64-bit advisory-lock id of
 * a key, the SHA-256 fingerprint of a request's content that a key is stored
 * with (so that a retry can be told from a different request), and the key's
 * steps at the start of an ingest's transaction (lock, look-up, expiry).
 */
#ifndef JI_IDEMPOTENCY_H
#define JI_IDEMPOTENCY_H

#include "common.h"
#include "pg.h"

/** Room for a key copied by ji_idempotency_key_copy (the key and its NUL). */
#define JI_IDEMPOTENCY_KEY_CAP (JI_MAX_IDEMPOTENCY_KEY_BYTES + 1)
/** Longest header value that can hold a key: the quoted form adds two bytes. */
#define JI_MAX_IDEMPOTENCY_VALUE_BYTES (JI_MAX_IDEMPOTENCY_KEY_BYTES + 2)
/** Hex digits of a request digest (SHA-256), without the NUL. */
#define JI_REQUEST_DIGEST_HEX_LEN 64

/**
 * Checks an Idempotency-Key header value. A key is 1 to JI_MAX_IDEMPOTENCY_KEY_BYTES bytes of visible ASCII
 * (0x21-0x7e). The value is the key itself (`abc`) or the key as a quoted string (`"abc"`, the form the IETF
 * draft writes); in the quoted form the key holds no `"` or `\` (no escapes). 0, or -1 with `err` filled
 * (JI_ERR_MALFORMED: 400).
 */
int ji_idempotency_key_check(const char *value, size_t len, ji_error_t *err) JI_MUST_CHECK;

/**
 * The key a checked value stands for, NUL-terminated into `dst` (JI_IDEMPOTENCY_KEY_CAP bytes): the value, or
 * what is between its quotes. `abc` and `"abc"` are the same key.
 */
void ji_idempotency_key_copy(char dst[JI_IDEMPOTENCY_KEY_CAP], const char *value, size_t len);

/** The advisory-lock id of a key: the first 8 bytes of its SHA-256, as a signed 64-bit number. */
int64_t ji_idempotency_lock_id(const char *key);

/**
 * The fingerprint of a request's content: SHA-256 over the body bytes the ingest was fed (after chunked
 * framing and gzip were removed), or, in record mode, over each record in a fixed binary form.
 */
typedef struct st_ji_request_digest_t ji_request_digest_t;

/** NULL when out of memory. */
ji_request_digest_t *ji_request_digest_new(void);
void ji_request_digest_update(ji_request_digest_t *d, const void *data, size_t len);
/** Record mode: one record (`image` NULL or empty: none). Same records in the same order, same digest. */
void ji_request_digest_record(ji_request_digest_t *d, uint64_t line, const char *name, size_t name_len,
                              const char *email, size_t email_len, const char *image, size_t image_len);
/** Record mode: a record its owner found broken. */
void ji_request_digest_broken(ji_request_digest_t *d, const ji_error_t *err);
/**
 * The digest as lowercase hex (JI_REQUEST_DIGEST_HEX_LEN digits); later calls answer the same text, updates
 * after the first call are ignored. NULL when the hash failed.
 */
const char *ji_request_digest_hex(ji_request_digest_t *d);
void ji_request_digest_free(ji_request_digest_t *d);

/** What ji_idempotency_claim found. */
typedef enum {
    JI_KEY_FREE,      /**< no key, a new key, or an expired one now taken from its old batch: go on */
    JI_KEY_COMMITTED, /**< committed within the TTL: replay `answer` for content with `digest` */
    JI_KEY_RUNNING,   /**< the key's first request still runs (it holds the key's lock) */
    JI_KEY_FAILED,    /**< a statement failed: `what`, `res`, `err` */
} ji_key_found_t;

/** One claim. The caller owns it (embedded in its request); results are valid during the callback only. */
typedef struct st_ji_key_claim_t {
    ji_key_found_t found;
    bool locked;        /**< the transaction holds the key's lock (until its COMMIT or ROLLBACK) */
    const char *answer; /**< COMMITTED: the kept answer, or NULL when none was kept */
    size_t answer_len;
    const char *digest;  /**< COMMITTED: the kept digest (hex), or NULL (kept before digests existed) */
    const char *what;    /**< FAILED: the step that failed, a fixed text fit for an answer */
    const PGresult *res; /**< FAILED: the error result, or NULL */
    const char *err;     /**< FAILED: the server's or libpq's message, for the log only */
    /* private */
    void (*_cb)(struct st_ji_key_claim_t *claim, ji_pg_t *pg, void *ctx);
    void *_ctx;
    const char *_key;
    char _ttl[16];
    char _lock_id[24];
} ji_key_claim_t;

/**
 * The first step of an ingest's transaction, just begun on `pg`: bounds the transaction's lock waits
 * (lock_timeout JI_PG_LOCK_TIMEOUT_MS) and, with a `key` (NULL: none; the string must live until the callback),
 * tries the key's advisory lock without waiting and looks the key up; a key older than `ttl_s` seconds is taken
 * from its old batch (which keeps its rows). `cb` gets the finding from the loop, never inside this call. 0, or
 * -1 when the first statement could not be sent (see ji_pg_error).
 */
int ji_idempotency_claim(ji_key_claim_t *claim, ji_pg_t *pg, const char *key, unsigned ttl_s,
                         void (*cb)(ji_key_claim_t *claim, ji_pg_t *pg, void *ctx), void *ctx) JI_MUST_CHECK;

#endif
