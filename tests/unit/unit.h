/*
 * unit.h — the smallest test harness: CHECK records a failure with its line
 * and goes on; UNIT_MAIN runs the listed tests and prints one summary line.
 * A program exits 0 only when every check passed (77 = skipped, for meson).
 */
#ifndef JI_UNIT_H
#define JI_UNIT_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int unit_checks, unit_failures;

#define CHECK(cond)                                                                                                    \
    do {                                                                                                               \
        unit_checks++;                                                                                                 \
        if (!(cond)) {                                                                                                 \
            unit_failures++;                                                                                           \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);                                   \
        }                                                                                                              \
    } while (0)

#define CHECK_EQ_INT(a, b)                                                                                             \
    do {                                                                                                               \
        long long unit_a_ = (long long)(a), unit_b_ = (long long)(b);                                                  \
        unit_checks++;                                                                                                 \
        if (unit_a_ != unit_b_) {                                                                                      \
            unit_failures++;                                                                                           \
            fprintf(stderr, "%s:%d: CHECK failed: %s == %s (%lld != %lld)\n", __FILE__, __LINE__, #a, #b, unit_a_,     \
                    unit_b_);                                                                                          \
        }                                                                                                              \
    } while (0)

#define CHECK_EQ_STR(a, b)                                                                                             \
    do {                                                                                                               \
        const char *unit_a_ = (a), *unit_b_ = (b);                                                                     \
        unit_checks++;                                                                                                 \
        if (unit_a_ == NULL || unit_b_ == NULL || strcmp(unit_a_, unit_b_) != 0) {                                     \
            unit_failures++;                                                                                           \
            fprintf(stderr, "%s:%d: CHECK failed: %s == %s (\"%s\" != \"%s\")\n", __FILE__, __LINE__, #a, #b,          \
                    unit_a_ ? unit_a_ : "(null)", unit_b_ ? unit_b_ : "(null)");                                       \
        }                                                                                                              \
    } while (0)

/** A seeded xorshift generator: the same seed gives the same test data on every run. */
typedef struct {
    uint64_t s; /**< state; any non-zero seed */
} rng_t;

static inline uint64_t rng_next(rng_t *r)
{
    r->s ^= r->s << 13;
    r->s ^= r->s >> 7;
    r->s ^= r->s << 17;
    return r->s;
}

static inline void rng_fill(rng_t *r, unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(rng_next(r) >> 32);
}

/**
 * The conninfo of the scratch test database: $JI_TEST_DB (meson sets it from -Dtest_database_url; scripts/test
 * always configures one). NULL when none is configured: the program then exits 77 (skipped). A test that gets a
 * conninfo must fail, not skip, when that database does not answer.
 */
static inline const char *unit_test_db(void)
{
    const char *url = getenv("JI_TEST_DB");
    return url != NULL && url[0] != '\0' ? url : NULL;
}

typedef struct {
    const char *name;
    void (*fn)(void);
} unit_test_t;

static inline int unit_run(const char *suite, const unit_test_t *tests)
{
    for (const unit_test_t *t = tests; t->name != NULL; t++) {
        int before = unit_failures;
        t->fn();
        fprintf(stderr, "%s %s.%s\n", unit_failures == before ? "ok  " : "FAIL", suite, t->name);
    }
    printf("%s: %d checks, %d failed\n", suite, unit_checks, unit_failures);
    return unit_failures == 0 ? 0 : 1;
}

#define UNIT_MAIN(suite, ...)                                                                                          \
    int main(void)                                                                                                     \
    {                                                                                                                  \
        static const unit_test_t unit_tests_[] = {__VA_ARGS__, {NULL, NULL}};                                          \
        return unit_run(suite, unit_tests_);                                                                           \
    }

#endif
