/*
 * budget.c — a process-wide memory budget (budget.h): a compare-and-swap
 * loop, so that concurrent reservations never take the count above the limit,
 * even for a moment.
 */
#include "budget.h"

#include <assert.h>

void ji_budget_init(ji_budget_t *b, uint64_t limit)
{
    b->limit = limit;
    atomic_init(&b->reserved, 0);
    atomic_init(&b->refused, 0);
    atomic_init(&b->over_request_cap, 0);
}

bool ji_budget_reserve(ji_budget_t *b, uint64_t bytes)
{
    uint64_t now = atomic_load(&b->reserved);

    do {
        if (bytes > b->limit || now > b->limit - bytes) {
            atomic_fetch_add_explicit(&b->refused, 1, memory_order_relaxed);
            return false;
        }
    } while (!atomic_compare_exchange_weak(&b->reserved, &now, now + bytes));
    return true;
}

void ji_budget_release(ji_budget_t *b, uint64_t bytes)
{
    uint64_t before = atomic_fetch_sub(&b->reserved, bytes);

    assert(before >= bytes); /* releasing more than was reserved is a bug of the caller */
    (void)before;
}

uint64_t ji_budget_reserved(ji_budget_t *b)
{
    return atomic_load(&b->reserved);
}
