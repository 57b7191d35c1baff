/*
 * unit_loop.h — running an h2o event loop in unit tests that talk to a real
 * PostgreSQL: until a flag turns true, for a while, with a wall-clock limit.
 */
#ifndef JI_UNIT_LOOP_H
#define JI_UNIT_LOOP_H

#include <h2o.h>
#include <stdbool.h>
#include <time.h>

static inline double unit_now_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/** Runs `loop` until *flag turns true or `seconds` pass; returns *flag. */
static inline bool unit_run_until(h2o_loop_t *loop, const bool *flag, double seconds)
{
    double deadline = unit_now_sec() + seconds;
    while (!*flag && unit_now_sec() < deadline)
        h2o_evloop_run(loop, 10);
    return *flag;
}

/** Runs `loop` for `seconds`. */
static inline void unit_run_for(h2o_loop_t *loop, double seconds)
{
    double deadline = unit_now_sec() + seconds;
    while (unit_now_sec() < deadline)
        h2o_evloop_run(loop, 10);
}

#endif
