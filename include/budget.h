/*
 * budget.h — a memory budget shared by every worker of the process: an atomic
 * count of the bytes that requests in progress have reserved, never above its
 * limit. Two are in use: --max-memory (every upload reserves what it may hold
 * before its body is read) and --array-memory-budget (JSON-array requests
 * reserve their --max-array-memory, give part back once their body is
 * scanned, and the rest when they are disposed).
 */
#ifndef JI_BUDGET_H
#define JI_BUDGET_H

#include <stdatomic.h>
#include "common.h"

typedef struct st_ji_budget_t {
    uint64_t limit;
    _Atomic uint64_t reserved;
    _Atomic uint64_t refused; /**< reservations refused (503): the /metrics count of this limit */
    _Atomic uint64_t
        over_request_cap; /**< requests refused for wanting more than one may hold (counted by the owner) */
} ji_budget_t;

/** A budget of `limit` bytes, nothing reserved. */
void ji_budget_init(ji_budget_t *b, uint64_t limit);

/** Reserves `bytes` when they fit under the limit: true, or false with nothing reserved (counted). Any thread. */
bool ji_budget_reserve(ji_budget_t *b, uint64_t bytes) JI_MUST_CHECK;

/** Gives back `bytes` reserved earlier (all of a reservation or part of it). Any thread. */
void ji_budget_release(ji_budget_t *b, uint64_t bytes);

/** Bytes reserved now. */
uint64_t ji_budget_reserved(ji_budget_t *b);

#endif
