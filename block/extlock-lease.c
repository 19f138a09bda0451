/*
 * extlock: lease arithmetic of the driver, without QEMU
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * No QEMU headers: this file is also built into tests/unit.
 */
#include "extlock-lease.h"

#define EXTLOCK_NS_PER_MS 1000000LL

int64_t extlock_lease_margin_ns(uint32_t lease_ms)
{
    int64_t tenth = (int64_t)lease_ms * EXTLOCK_NS_PER_MS / 10;
    int64_t cap = 1000 * EXTLOCK_NS_PER_MS;

    return tenth < cap ? tenth : cap;
}

int64_t extlock_lease_deadline(uint32_t lease_ms, int64_t sent_ns)
{
    return sent_ns + (int64_t)lease_ms * EXTLOCK_NS_PER_MS -
           extlock_lease_margin_ns(lease_ms);
}

int64_t extlock_lease_stuck_bound(int64_t deadline_ns, uint32_t lease_ms,
                                  uint32_t fence_margin_ms)
{
    int64_t margins = extlock_lease_margin_ns(lease_ms) +
                      (int64_t)fence_margin_ms * EXTLOCK_NS_PER_MS;

    return deadline_ns + margins - margins / 10;
}

int64_t extlock_lease_renew_at(uint32_t lease_ms, int64_t now_ns)
{
    return now_ns + (int64_t)lease_ms * EXTLOCK_NS_PER_MS / 3;
}

int64_t extlock_backoff_next_ms(int64_t prev_ms, int64_t min_ms,
                                int64_t max_ms)
{
    int64_t next = prev_ms < min_ms ? min_ms : prev_ms * 2;

    return next > max_ms ? max_ms : next;
}
