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
#include "extlock-pr.h"
#include "extlock-compat.h"

static ExtentLockMode extlock_qapi_mode(ExtlockMode mode)
{
    return mode == EXTLOCK_MODE_EXCLUSIVE ? EXTENT_LOCK_MODE_EXCLUSIVE
                                          : EXTENT_LOCK_MODE_SHARED;
}

static void extlock_held_info(const ExtlockHeldInfo *l, void *opaque)
{
    ExtentLockHeldList ***tail = opaque;
    ExtentLockHeld *h = g_new0(ExtentLockHeld, 1);

    h->offset = l->offset;
    h->length = l->length;
    h->mode = extlock_qapi_mode(l->mode);
    h->token = l->token;
    h->held_ms = l->held_ms;
    switch (l->state) {
    case EXTLOCK_LOCK_STALE:
        h->state = EXTENT_LOCK_STATE_STALE;
        break;
    case EXTLOCK_LOCK_REVOKING:
        h->state = EXTENT_LOCK_STATE_REVOKING;
        break;
    case EXTLOCK_LOCK_ACTIVE:
        h->state = EXTENT_LOCK_STATE_ACTIVE;
        break;
    default:
        h->state = EXTENT_LOCK_STATE_CACHED;
        break;
    }
    h->in_flight = l->users;
    QAPI_LIST_APPEND(*tail, h);
}

static void extlock_waiter_info(const ExtlockWaiterInfo *req, void *opaque)
{
    ExtentLockWaiterList ***tail = opaque;
    ExtentLockWaiter *w = g_new0(ExtentLockWaiter, 1);
    strList **bt = &w->blocked_by;

    w->offset = req->offset;
    w->length = req->length;
    w->mode = extlock_qapi_mode(req->mode);
    w->has_token = req->queued;
    w->token = req->token;
    w->waited_ms = req->waited_ms;
    for (guint i = 0; req->blocked_by && i < req->blocked_by->len; i++) {
        QAPI_LIST_APPEND(bt, g_strdup(g_ptr_array_index(req->blocked_by, i)));
    }
    QAPI_LIST_APPEND(*tail, w);
}

static ExtentLockHistogram *extlock_qapi_hist(const ExtlockHist *h)
{
    ExtentLockHistogram *out = g_new0(ExtentLockHistogram, 1);
    uint64List **tail = &out->buckets;

    for (unsigned i = 0; i < EXTLOCK_HIST_BUCKETS; i++) {
        QAPI_LIST_APPEND(tail, h->buckets[i]);
    }
    out->count = h->count;
    out->sum_us = h->sum_us;
    out->max_us = h->max_us;
    return out;
}

/* Runs in the node's AioContext (7.2: with it acquired) */
static ExtentLockNodeInfo *extlock_node_info(BlockDriverState *bs)
{
    BDRVExtlockState *s = bs->opaque;
    ExtlockClient *c = s->client;
    ExtentLockNodeInfo *info = g_new0(ExtentLockNodeInfo, 1);
    ExtentLockHeldList **held_tail = &info->held;
    ExtentLockWaiterList **wait_tail = &info->waiting;
    strList **addr_tail = &info->coordinators;
    ExtlockConnInfo conn;

    extlock_conn_get_info(extlock_client_conn(c), &conn);
    info->node_name = g_strdup(bdrv_get_node_name(bs));
    info->lock_space = g_strdup(s->lock_space);
    info->client_id = g_strdup(s->client_id);
    info->coordinator = g_strdup(conn.address);
    for (size_t i = 0; conn.addresses[i]; i++) {
        QAPI_LIST_APPEND(addr_tail, g_strdup(conn.addresses[i]));
    }
    info->connected = conn.connected;
    switch (conn.state) {
    case EXTLOCK_CONN_ACTIVE:
        info->state = EXTENT_LOCK_SESSION_STATE_ACTIVE;
        break;
    case EXTLOCK_CONN_RECONNECTING:
        info->state = EXTENT_LOCK_SESSION_STATE_RECONNECTING;
        break;
    default:
        info->state = EXTENT_LOCK_SESSION_STATE_LEASE_LOST;
        break;
    }
    if (conn.connected) {
        EXTLOCK_QAPI_SET_HAS(info, session);
        info->session = g_strdup(conn.session);
    }
    info->has_epoch = true;
    info->epoch = conn.epoch;
    info->granularity = s->granularity;
    info->lock_cache = s->cache_opts.cache;
    info->lease_time = conn.lease_ms;
    info->lease_remaining = conn.lease_remaining_ms;

    extlock_client_foreach_lock(c, extlock_held_info, &held_tail);
    extlock_client_foreach_waiter(c, extlock_waiter_info, &wait_tail);

    info->counters = g_new0(ExtentLockCounters, 1);
    extlock_get_counters(c, info->counters);
    info->stack = extlock_stack_info(&s->stack);
    info->wait_histogram =
        extlock_qapi_hist(&extlock_client_stats(c)->wait_hist);
    info->hold_histogram =
        extlock_qapi_hist(&extlock_client_stats(c)->hold_hist);
    info->reservation = extlock_pr_info(c->pr);
    if (info->reservation) {
        EXTLOCK_QAPI_SET_HAS(info, reservation);
    }
    info->maintenance = g_new0(ExtentLockMaintenanceInfo, 1);
    info->maintenance->generation = c->maint_gen;
    info->maintenance->running = s->maint.owner;
    info->maintenance->owned = s->maint.owned;
    info->maintenance->reloads = s->maint.reloads;
    if (c->has_maint_size) {
        info->maintenance->has_announced_size = true;
        info->maintenance->announced_size = c->maint_size;
    }
    return info;
}

typedef struct ExtlockNodeInfoJob {
    BlockDriverState *bs;
    ExtentLockNodeInfo *info;
} ExtlockNodeInfoJob;

static void extlock_node_info_job(void *opaque)
{
    ExtlockNodeInfoJob *job = opaque;

    job->info = extlock_node_info(job->bs);
}

ExtentLockNodeInfoList *qmp_query_extent_locks(EXTLOCK_QAPI_OPT_PARAM(
                                                   const char *, node_name),
                                               Error **errp)
{
    ExtentLockNodeInfoList *head = NULL, **tail = &head;
    BlockDriverState *bs;
    GSList *nodes = NULL, *l;

    if (node_name) {
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
        if (bs->drv != &bdrv_extlock || !bs->opaque ||
            !((BDRVExtlockState *)bs->opaque)->client) {
            continue;
        }
        if (node_name && strcmp(bdrv_get_node_name(bs), node_name)) {
            continue;
        }
        /* Referenced: 10.0 polls the main loop while a node answers */
        bdrv_ref(bs);
        nodes = g_slist_prepend(nodes, bs);
    }
    nodes = g_slist_reverse(nodes);
    for (l = nodes; l; l = l->next) {
        ExtlockNodeInfoJob job = { .bs = l->data };

        extlock_run_in_aio_context(bdrv_get_aio_context(job.bs),
                                   extlock_node_info_job, &job);
        QAPI_LIST_APPEND(tail, job.info);
        bdrv_unref(job.bs);
    }
    g_slist_free(nodes);
    return head;
}
