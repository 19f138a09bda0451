/*
 * extlock: lease arithmetic of the driver, without QEMU
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Pure functions shared by the connection (extlock-connection.c) and the
 * unit tests (tests/unit/test-lease.c).  Times are nanoseconds of one
 * monotonic clock; durations in milliseconds as the protocol has them.
 *
 * The node's lease deadline is the time it SENT the last acknowledged
 * renewal (or hello) plus the lease, minus a client margin.  The
 * coordinator received that message later, and re-grants a lapsed
 * session's locks only after its own deadline plus its fence margin, so
 * the node stops starting I/O well before anyone else can be granted its
 * extents (docs/design.rst).
 */
#ifndef BLOCK_EXTLOCK_LEASE_H
#define BLOCK_EXTLOCK_LEASE_H

#include <stdint.h>

/* The client-side safety margin: a tenth of the lease, at most 1 s */
int64_t extlock_lease_margin_ns(uint32_t lease_ms);

/* Deadline of a lease of @lease_ms acknowledged for a message sent then */
int64_t extlock_lease_deadline(uint32_t lease_ms, int64_t sent_ns);

/*
 * The in-flight bound for lease deadline @deadline_ns: the coordinator may
 * re-grant the node's locks from deadline + client margin + fence margin
 * on; a request still in the child by then could land after another
 * host's write, so the node gives up at the deadline + 90 % of both
 * margins, leaving a tenth of them for exiting.
 */
int64_t extlock_lease_stuck_bound(int64_t deadline_ns, uint32_t lease_ms,
                                  uint32_t fence_margin_ms);

/* When to send the next renewal: three per lease */
int64_t extlock_lease_renew_at(uint32_t lease_ms, int64_t now_ns);

/* Reconnection backoff: the wait after one of @prev_ms, within [min, max] */
int64_t extlock_backoff_next_ms(int64_t prev_ms, int64_t min_ms,
                                int64_t max_ms);

#endif /* BLOCK_EXTLOCK_LEASE_H */
