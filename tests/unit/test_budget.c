/*
 * test_budget.c — a process-wide memory budget: reservations fit under the limit
 * or are refused whole (and counted), releases give room back, and threads racing for it never take it over.
 */
#include "budget.h"

#include <pthread.h>

#include "unit.h"

static void test_reserve_release(void)
{
    ji_budget_t b;

    ji_budget_init(&b, 100);
    CHECK(ji_budget_reserve(&b, 60));
    CHECK(!ji_budget_reserve(&b, 41));
    CHECK_EQ_INT(ji_budget_reserved(&b), 60);
    CHECK(ji_budget_reserve(&b, 40));
    CHECK(!ji_budget_reserve(&b, 1));
    CHECK_EQ_INT(atomic_load(&b.refused), 2);
    ji_budget_release(&b, 30); /* part of a reservation */
    CHECK(ji_budget_reserve(&b, 30));
    ji_budget_release(&b, 100);
    CHECK_EQ_INT(ji_budget_reserved(&b), 0);
    CHECK(!ji_budget_reserve(&b, 101));
    CHECK(!ji_budget_reserve(&b, UINT64_MAX)); /* no wrap-around */
    CHECK(ji_budget_reserve(&b, 100));
    ji_budget_release(&b, 100);
}

#define THREADS 4
#define ROUNDS 100000

typedef struct {
    ji_budget_t *b;
    _Atomic uint64_t *held; /* what the threads believe they hold together */
    uint64_t over;          /* times that belief went over the limit */
    uint64_t granted;
} racer_t;

static void *race(void *arg)
{
    racer_t *r = arg;
    for (int i = 0; i < ROUNDS; i++) {
        uint64_t bytes = 10 + (uint64_t)(i % 7) * 10;
        if (!ji_budget_reserve(r->b, bytes))
            continue;
        r->granted++;
        if (atomic_fetch_add(r->held, bytes) + bytes > r->b->limit)
            r->over++;
        atomic_fetch_sub(r->held, bytes);
        ji_budget_release(r->b, bytes);
    }
    return NULL;
}

static void test_threads(void)
{
    ji_budget_t b;
    _Atomic uint64_t held = 0;
    racer_t r[THREADS];
    pthread_t t[THREADS];
    uint64_t over = 0, granted = 0;

    ji_budget_init(&b, 150);
    for (int i = 0; i < THREADS; i++) {
        r[i] = (racer_t){&b, &held, 0, 0};
        CHECK_EQ_INT(pthread_create(&t[i], NULL, race, &r[i]), 0);
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(t[i], NULL);
        over += r[i].over;
        granted += r[i].granted;
    }
    CHECK_EQ_INT(over, 0);
    CHECK(granted > 0);
    CHECK_EQ_INT(ji_budget_reserved(&b), 0);
}

UNIT_MAIN("budget", {"reserve_release", test_reserve_release}, {"threads", test_threads})
