/*
 * extlock: HMP "info extent-locks"
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qapi/error.h"
#include "extlock-compat.h"
#include EXTLOCK_QDICT_H
#include "qapi/qapi-commands-block-extlock.h"
#include "monitor/hmp.h"
#include "monitor/monitor.h"

/* Upper bound in us of the bucket holding the @q-th quantile of @h */
static uint64_t extlock_hmp_quantile(const ExtentLockHistogram *h, double q)
{
    uint64_t want = MAX((uint64_t)(q * (double)h->count), 1), seen = 0;
    const uint64List *b;
    unsigned i = 0;

    for (b = h->buckets; b; b = b->next, i++) {
        seen += b->value;
        if (seen >= want) {
            return b->next ? (uint64_t)1 << i : UINT64_MAX;
        }
    }
    return UINT64_MAX;
}

/* "  wait times: 12, p50 < 128 us, p99 < 4096 us, max 3900 us" */
static void extlock_hmp_histogram(Monitor *mon, const char *what,
                                  const ExtentLockHistogram *h)
{
    monitor_printf(mon, "  %s times: %" PRIu64, what, h->count);
    if (h->count) {
        double q[] = { 0.5, 0.99 };

        for (unsigned i = 0; i < ARRAY_SIZE(q); i++) {
            uint64_t bound = extlock_hmp_quantile(h, q[i]);

            if (bound == UINT64_MAX) {
                monitor_printf(mon, ", p%.0f >= 2^31 us", q[i] * 100);
            } else {
                monitor_printf(mon, ", p%.0f < %" PRIu64 " us", q[i] * 100,
                               bound);
            }
        }
        monitor_printf(mon, ", max %" PRIu64 " us, mean %" PRIu64 " us",
                       h->max_us, h->sum_us / h->count);
    }
    monitor_printf(mon, "\n");
}

void hmp_info_extent_locks(Monitor *mon, const QDict *qdict)
{
    const char *node = qdict_get_try_str(qdict, "node");
    Error *err = NULL;
    ExtentLockNodeInfoList *list, *l;

    list = extlock_query_extent_locks(node, &err);
    if (hmp_handle_error(mon, err)) {
        return;
    }
    if (!list) {
        monitor_printf(mon, "No extlock nodes\n");
    }
    for (l = list; l; l = l->next) {
        ExtentLockNodeInfo *n = l->value;
        ExtentLockHeldList *h;
        ExtentLockWaiterList *w;

        monitor_printf(mon, "%s: lock-space %s, client-id %s\n",
                       n->node_name, n->lock_space, n->client_id);
        monitor_printf(mon, "  coordinator %s: %s, session %s",
                       n->coordinator,
                       n->connected ? "connected" : "DISCONNECTED",
                       ExtentLockSessionState_str(n->state));
        if (n->session) {
            monitor_printf(mon, " %s, epoch %" PRIu64,
                           n->session, n->epoch);
        }
        monitor_printf(mon, ", lease %" PRIu32 " ms, %" PRId64
                       " ms left\n", n->lease_time, n->lease_remaining);
        monitor_printf(mon, "  granularity %" PRIu32 ", lock cache %s\n",
                       n->granularity, n->lock_cache ? "on" : "off");
        monitor_printf(mon, "  requests %" PRIu64 ", cache hits %" PRIu64
                       ", grants %" PRIu64 ", waits %" PRIu64
                       ", wait time %" PRIu64 " us, errors %" PRIu64 "\n",
                       n->counters->requests, n->counters->cache_hits,
                       n->counters->grants, n->counters->waits,
                       n->counters->total_wait_us, n->counters->errors);
        monitor_printf(mon, "  revocations %" PRIu64 " (%" PRIu64
                       " us total, %" PRIu64 " us max), downgrades %" PRIu64
                       ", evictions %" PRIu64 ", contended releases %"
                       PRIu64 "\n",
                       n->counters->revocations,
                       n->counters->revocation_wait_us,
                       n->counters->revocation_max_us,
                       n->counters->downgrades,
                       n->counters->cache_evictions,
                       n->counters->contended_releases);
        monitor_printf(mon, "  reconnects %" PRIu64 ", lease losses %"
                       PRIu64 "\n", n->counters->reconnects,
                       n->counters->lease_losses);
        extlock_hmp_histogram(mon, "wait", n->wait_histogram);
        extlock_hmp_histogram(mon, "hold", n->hold_histogram);
        for (h = n->held; h; h = h->next) {
            monitor_printf(mon, "  %-8s %-9s [%" PRIu64 ", +%" PRIu64
                           ") token 0x%" PRIx64 " for %" PRId64 " ms, %"
                           PRIu32 " in flight\n",
                           ExtentLockState_str(h->value->state),
                           ExtentLockMode_str(h->value->mode),
                           h->value->offset, h->value->length,
                           h->value->token, h->value->held_ms,
                           h->value->in_flight);
        }
        for (w = n->waiting; w; w = w->next) {
            strList *b;
            monitor_printf(mon, "  %-8s %-9s [%" PRIu64 ", +%" PRIu64
                           ") for %" PRId64 " ms, blocked by", "waiting",
                           ExtentLockMode_str(w->value->mode),
                           w->value->offset, w->value->length,
                           w->value->waited_ms);
            if (!w->value->blocked_by) {
                monitor_printf(mon, " (not known yet)");
            }
            for (b = w->value->blocked_by; b; b = b->next) {
                monitor_printf(mon, " %s", b->value);
            }
            monitor_printf(mon, "\n");
        }
    }
    qapi_free_ExtentLockNodeInfoList(list);
}
