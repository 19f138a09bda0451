/*
 * extlock: QMP query-extent-locks
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qapi/error.h"
#include "qapi/qapi-commands-block-extlock.h"
#include "extlock-int.h"

static ExtentLockMode extlock_qapi_mode(ExtlockMode mode)
{
    return mode == EXTLOCK_MODE_EXCLUSIVE ? EXTENT_LOCK_MODE_EXCLUSIVE
                                          : EXTENT_LOCK_MODE_SHARED;
}

static void extlock_held_info(ExtlockCachedLock *l, void *opaque)
{
    ExtentLockHeldList ***tail = opaque;
    ExtentLockHeld *h = g_new0(ExtentLockHeld, 1);
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);

    h->offset = l->ce.node.ext.start;
    h->length = l->ce.node.ext.end - l->ce.node.ext.start;
    h->mode = extlock_qapi_mode(l->ce.mode);
    h->token = l->token;
    h->held_ms = (now - l->granted_ns) / SCALE_MS;
    h->state = l->ce.stale ? EXTENT_LOCK_STATE_STALE :
               l->ce.revoking ? EXTENT_LOCK_STATE_REVOKING :
               l->users ? EXTENT_LOCK_STATE_ACTIVE : EXTENT_LOCK_STATE_CACHED;
    h->in_flight = l->users;
    QAPI_LIST_APPEND(*tail, h);
}

/* Called with the node's AioContext acquired */
static ExtentLockNodeInfo *extlock_node_info(BlockDriverState *bs)
{
    BDRVExtlockState *s = bs->opaque;
    ExtlockClient *c = s->client;
    ExtentLockNodeInfo *info = g_new0(ExtentLockNodeInfo, 1);
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    ExtentLockHeldList **held_tail = &info->held;
    ExtentLockWaiterList **wait_tail = &info->waiting;
    ExtlockRequest *req;

    info->node_name = g_strdup(bdrv_get_node_name(bs));
    info->lock_space = g_strdup(s->lock_space);
    info->client_id = g_strdup(s->client_id);
    info->coordinator = g_strdup(c->address);
    info->connected = extlock_client_connected(c);
    switch (c->state) {
    case EXTLOCK_SESSION_ACTIVE:
        info->state = EXTENT_LOCK_SESSION_STATE_ACTIVE;
        break;
    case EXTLOCK_SESSION_RECONNECTING:
        info->state = EXTENT_LOCK_SESSION_STATE_RECONNECTING;
        break;
    case EXTLOCK_SESSION_RECLAIMING:
        info->state = EXTENT_LOCK_SESSION_STATE_RECLAIMING;
        break;
    default:
        info->state = EXTENT_LOCK_SESSION_STATE_LEASE_LOST;
        break;
    }
    if (info->connected) {
        info->has_session = true;
        info->session = g_strdup(c->session);
    }
    info->has_epoch = true;
    info->epoch = c->epoch;
    info->granularity = s->granularity;
    info->lock_cache = c->opts.cache;
    info->lease_time = c->lease_ms;
    info->lease_remaining = extlock_client_lease_remaining_ms(c);

    extlock_client_foreach_lock(c, extlock_held_info, &held_tail);

    QLIST_FOREACH(req, &c->waiting, next) {
        ExtentLockWaiter *w = g_new0(ExtentLockWaiter, 1);
        strList **bt = &w->blocked_by;

        w->offset = req->offset;
        w->length = req->length;
        w->mode = extlock_qapi_mode(req->mode);
        w->has_token = req->queued;
        w->token = req->token;
        w->waited_ms = (now - req->start_ns) / SCALE_MS;
        for (guint i = 0; req->blocked_by && i < req->blocked_by->len; i++) {
            QAPI_LIST_APPEND(bt,
                             g_strdup(g_ptr_array_index(req->blocked_by, i)));
        }
        QAPI_LIST_APPEND(wait_tail, w);
    }

    info->counters = g_new0(ExtentLockCounters, 1);
    info->counters->requests = c->stats.requests;
    info->counters->grants = c->stats.grants;
    info->counters->waits = c->stats.waits;
    info->counters->total_wait_us = c->stats.total_wait_us;
    info->counters->errors = c->stats.errors;
    info->counters->cache_hits = c->stats.cache_hits;
    info->counters->revocations = c->stats.revocations;
    info->counters->revocation_wait_us = c->stats.revocation_us;
    info->counters->revocation_max_us = c->stats.revocation_max_us;
    info->counters->downgrades = c->stats.downgrades;
    info->counters->cache_evictions = c->stats.cache_evictions;
    info->counters->reconnects = c->stats.reconnects;
    info->counters->lease_losses = c->stats.lease_losses;
    info->stack = extlock_stack_info(&s->stack);
    return info;
}

ExtentLockNodeInfoList *qmp_query_extent_locks(bool has_node_name,
                                               const char *node_name,
                                               Error **errp)
{
    ExtentLockNodeInfoList *head = NULL, **tail = &head;
    BlockDriverState *bs;

    if (has_node_name) {
        bs = bdrv_find_node(node_name);
        if (!bs) {
            error_setg(errp, "Cannot find node '%s'", node_name);
            return NULL;
        }
        if (bs->drv != &bdrv_extlock) {
            error_setg(errp, "Node '%s' is not an extlock node", node_name);
            return NULL;
        }
    }

    for (bs = bdrv_next_all_states(NULL); bs; bs = bdrv_next_all_states(bs)) {
        AioContext *ctx;

        if (bs->drv != &bdrv_extlock || !bs->opaque ||
            !((BDRVExtlockState *)bs->opaque)->client) {
            continue;
        }
        if (has_node_name && strcmp(bdrv_get_node_name(bs), node_name)) {
            continue;
        }
        ctx = bdrv_get_aio_context(bs);
        aio_context_acquire(ctx);
        QAPI_LIST_APPEND(tail, extlock_node_info(bs));
        aio_context_release(ctx);
    }
    return head;
}
