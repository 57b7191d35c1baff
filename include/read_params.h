/*
 * read_params.h — the parameters of the read side's requests, shared by every
 * read route: an id in a path (`/users/{id}`, `/batches/{id}`), the pieces of
 * a query string, the keyset window of the streamed reads (`after_id`,
 * `limit`), and a client's value quoted back in an error message.
 *
 * The rules are one for every route: an id, `after_id` and `limit` are 1 to
 * 19 decimal digits, at most INT64_MAX; no sign, no space, no exponent.
 */
#ifndef JI_READ_PARAMS_H
#define JI_READ_PARAMS_H

#include "common.h"

/** Most characters of a client's value quoted back in an error message. */
#define JI_ECHO_MAX 40

/** One `key=value` of a query string (`has_value` false for a bare `key`; `value` is then empty). */
typedef struct st_ji_query_param_t {
    const char *key;
    size_t key_len;
    const char *value;
    size_t value_len;
    bool has_value;
} ji_query_param_t;

/** The window of a keyset read: rows after `after_id` (0), at most `limit` of them (UINT64_MAX: all). */
typedef struct st_ji_keyset_t {
    int64_t after_id;
    uint64_t limit;
} ji_keyset_t;

/** Parses 1 to 19 decimal digits, at most INT64_MAX. 0, or -1. */
int ji_parse_int64(const char *s, size_t len, int64_t *out) JI_MUST_CHECK;

/** A client's value for an error message: at most JI_ECHO_MAX printable ASCII characters (others become '?'). */
const char *ji_echo_value(char buf[JI_ECHO_MAX + 1], const char *s, size_t len);

/**
 * The next parameter of the query string `*cursor` .. `end` (`&`-separated; empty pieces are skipped). true with
 * `p` filled and `*cursor` moved past it, or false at the end.
 */
bool ji_query_next(const char **cursor, const char *end, ji_query_param_t *p);

/** The parameter is `key=...` (a bare `key`, without '=', is not). */
bool ji_query_param_is(const ji_query_param_t *p, const char *key);

/**
 * Takes `p` into `k` when it is `after_id=` or `limit=`: 1 when taken, 0 when it is another parameter, -1 with
 * `err` (400) when its value is not an integer from 0 to INT64_MAX.
 */
int ji_keyset_param(const ji_query_param_t *p, ji_keyset_t *k, ji_error_t *err) JI_MUST_CHECK;

#endif
