/*
 * array_budget.h — the memory budget of the JSON-array mode, shared by every
 * worker of the process (--array-memory-budget): an atomic count of the bytes
 * that array requests in progress have reserved. A request reserves its
 * --max-array-memory before its body is read, may give part of it back once
 * it knows what it needs, and releases the rest when it is disposed.
 */
#ifndef JI_ARRAY_BUDGET_H
#define JI_ARRAY_BUDGET_H

#include <stdatomic.h>
#include "common.h"

typedef struct st_ji_array_budget_t {
    uint64_t limit;
    _Atomic uint64_t reserved;
    _Atomic uint64_t refused;          /**< reservations refused (503): the /metrics count of this limit */
    _Atomic uint64_t over_request_cap; /**< requests refused over --max-array-memory (413), counted by array mode */
} ji_array_budget_t;

/** A budget of `limit` bytes, nothing reserved. */
void ji_array_budget_init(ji_array_budget_t *b, uint64_t limit);

/** Reserves `bytes` when they fit under the limit: true, or false with nothing reserved (counted). Any thread. */
bool ji_array_budget_reserve(ji_array_budget_t *b, uint64_t bytes) JI_MUST_CHECK;

/** Gives back `bytes` reserved earlier (all of a reservation or part of it). Any thread. */
void ji_array_budget_release(ji_array_budget_t *b, uint64_t bytes);

/** Bytes reserved now. */
uint64_t ji_array_budget_reserved(ji_array_budget_t *b);

#endif
