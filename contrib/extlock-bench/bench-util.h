/*
 * extlock benchmarks: helpers shared by extlock-bench and extlock-handoff
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#ifndef EXTLOCK_BENCH_UTIL_H
#define EXTLOCK_BENCH_UTIL_H

#include <stdint.h>
#include <time.h>

/* CLOCK_MONOTONIC in ns: the clock of extlockd's event log too */
static inline int64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#endif /* EXTLOCK_BENCH_UTIL_H */
