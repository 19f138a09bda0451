/*
 * extlock: cluster-wide maintenance of a shared image (resize)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * See extlock-maint.h for the protocol.  Everything runs in the node's
 * AioContext.  m->busy keeps requests out of the child while it rereads
 * its metadata or while this node's own maintenance changes it; requests
 * wait on m->waiters meanwhile, and m->in_flight tells when the child is
 * idle.
 */

#include "qemu/osdep.h"
#include "qapi/error.h"
#include "qemu/error-report.h"
#include "extlock-compat.h"
#include "extlock-maint.h"
#include "trace.h"

static const char *extlock_maint_name(ExtlockMaint *m)
{
    return bdrv_get_node_name(m->bs);
}

/* Wait until no admitted request runs any more */
static void coroutine_fn extlock_maint_wait_idle(ExtlockMaint *m)
{
    while (m->in_flight > 0) {
        m->idle_co = qemu_coroutine_self();
        qemu_coroutine_yield();
    }
}

void extlock_maint_exit(ExtlockMaint *m)
{
    assert(m->in_flight > 0);
    if (--m->in_flight == 0 && m->idle_co) {
        Coroutine *co = m->idle_co;

        m->idle_co = NULL;
        aio_co_wake(co);
    }
}

static void coroutine_fn extlock_maint_unbusy(ExtlockMaint *m)
{
    m->busy = false;
    qemu_co_queue_restart_all(&m->waiters);
}

/*
 * Reread the metadata of @bs and the nodes below it along their file
 * children, bottom up, and refresh their lengths.  The bottom node (the
 * protocol: nfs, file) gets @size as its length if its driver cannot ask
 * the storage (libnfs keeps the length it saw at open).
 */
static int GRAPH_RDLOCK
extlock_maint_reload_node(BlockDriverState *bs, uint64_t size, Error **errp)
{
    int64_t hint;
    int ret;

    if (bs->file) {
        ret = extlock_maint_reload_node(bs->file->bs, size, errp);
        if (ret < 0) {
            return ret;
        }
    }
    ret = bdrv_invalidate_cache(bs, errp);
    if (ret < 0) {
        error_prepend(errp, "extlock: rereading node '%s' after a "
                      "maintenance: ", bdrv_get_node_name(bs));
        return ret;
    }
    /* What the reread found (qcow2 sets it from its header) */
    hint = bs->total_sectors;
    if (!bs->file) {
        hint = MAX(hint, (int64_t)DIV_ROUND_UP(size, BDRV_SECTOR_SIZE));
    }
    ret = extlock_refresh_total_sectors(bs, hint);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "extlock: node '%s': could not refresh "
                         "its length after a maintenance",
                         bdrv_get_node_name(bs));
        return ret;
    }
    return 0;
}

typedef struct ExtlockMaintReload {
    ExtlockMaint *m;
    Coroutine *co;
    Error *err;
    int ret;
} ExtlockMaintReload;

/*
 * In the main loop, synchronously, as a migration target activates its
 * images: a coroutine that yielded in the middle would let the monitor
 * look at a qcow2 node that is closed and not yet reopened (query-block
 * aborts on it).  Reread the child's metadata, refresh the node's length,
 * and tell the parents if it changed.
 */
static void extlock_maint_reload_bh(void *opaque)
{
    ExtlockMaintReload *r = opaque;
    ExtlockMaint *m = r->m;
    BlockDriverState *bs = m->bs;
    AioContext *ctx = bdrv_get_aio_context(bs);
    ExtlockClient *c = m->client;
    int64_t old;
    BdrvChild *parent;

    extlock_aio_context_acquire(ctx);
    bdrv_graph_rdlock_main_loop();
    old = bs->total_sectors;
    r->ret = extlock_maint_reload_node(bs->file->bs,
                                       c->has_maint_size ? c->maint_size : 0,
                                       &r->err);
    if (r->ret == 0) {
        r->ret = extlock_refresh_total_sectors(bs, old);
        if (r->ret < 0) {
            error_setg_errno(&r->err, -r->ret, "extlock: node '%s': could "
                             "not refresh its length after a maintenance",
                             bdrv_get_node_name(bs));
        }
    }
    if (r->ret == 0 && bs->total_sectors != old) {
        /* The guest device learns the new size, as after block_resize */
        QLIST_FOREACH(parent, &bs->parents, next_parent) {
            if (parent->klass->resize) {
                parent->klass->resize(parent);
            }
        }
    }
    trace_extlock_maint_reloaded(bdrv_get_node_name(bs), c->maint_gen,
                                 old * BDRV_SECTOR_SIZE,
                                 bs->total_sectors * BDRV_SECTOR_SIZE);
    bdrv_graph_rdunlock_main_loop();
    extlock_aio_context_release(ctx);
    aio_co_wake(r->co);
}

/*
 * A maintenance ran elsewhere (a grant showed a new count): with nothing
 * in flight, reread the metadata
 */
static int coroutine_fn extlock_maint_reload(ExtlockMaint *m, Error **errp)
{
    ExtlockMaintReload r = { .m = m, .co = qemu_coroutine_self() };
    ExtlockClient *c = m->client;

    assert(m->busy && !m->in_flight);
    c->maint_reload = false;
    aio_bh_schedule_oneshot(qemu_get_aio_context(), extlock_maint_reload_bh,
                            &r);
    qemu_coroutine_yield();
    if (r.ret < 0) {
        error_propagate(errp, r.err);
        return r.ret;
    }
    m->reloads++;
    m->last_size = m->bs->total_sectors * BDRV_SECTOR_SIZE;
    c->opts.grow_limit = MAX(c->opts.grow_limit, (uint64_t)m->last_size);
    return 0;
}

int coroutine_fn GRAPH_RDLOCK extlock_maint_enter(ExtlockMaint *m,
                                                  bool locked)
{
    Error *err = NULL;
    int ret;

    for (;;) {
        if (m->busy) {
            qemu_co_queue_wait(&m->waiters, NULL);
            continue;
        }
        /*
         * Reread only under a lock: without one a maintenance may be
         * running right now.  A request without a lock (flush, zero
         * length) reads no metadata that a maintenance changes.
         */
        if (!m->client->maint_reload || !locked) {
            m->in_flight++;
            return 0;
        }
        m->busy = true;
        extlock_maint_wait_idle(m);
        ret = extlock_maint_reload(m, &err);
        extlock_maint_unbusy(m);
        if (ret < 0) {
            /* No caller to return it to: say it, and fail the request */
            error_report_err(err);
            return -EIO;
        }
    }
}

int coroutine_fn GRAPH_RDLOCK
extlock_maint_truncate(ExtlockMaint *m, int64_t offset, bool exact,
                       PreallocMode prealloc, BdrvRequestFlags flags,
                       Error **errp)
{
    BlockDriverState *bs = m->bs;
    BlockDriverState *leaf;
    ExtlockRequest own = {
        .offset = EXTLOCK_MAINT_OFFSET,
        .length = EXTLOCK_MAINT_LENGTH,
        .mode = EXTLOCK_MODE_EXCLUSIVE,
        .maint = true,
        /* qmp_block_resize drains the node around the truncate */
        .no_drain_cut = true,
    };
    int64_t len;
    int ret;

    trace_extlock_maint_begin(extlock_maint_name(m), offset);
    /*
     * Granted after this node's earlier requests are done (local order)
     * and every other host has given back its locks; no later request
     * of any host runs before it is given back
     */
    ret = extlock_client_lock(m->client, &own);
    if (ret < 0) {
        error_setg(errp, "extlock: node '%s': could not get the maintenance "
                   "lock of lock-space '%s' (lease lost, coordinator "
                   "unreachable or the wait cancelled); nothing was changed",
                   extlock_maint_name(m), m->client->lock_space);
        trace_extlock_maint_done(extlock_maint_name(m), offset, ret);
        return ret;
    }
    while (m->busy) {
        qemu_co_queue_wait(&m->waiters, NULL);
    }
    m->busy = true;
    m->owner = true;
    m->owned++;
    extlock_maint_wait_idle(m);     /* flushes, which take no lock */

    if (m->client->maint_reload) {
        /* Another host's maintenance ran since: start from the disk */
        ret = extlock_maint_reload(m, errp);
        if (ret < 0) {
            goto out;
        }
    }
    len = extlock_co_child_getlength(bs->file->bs);
    if (len < 0) {
        error_setg_errno(errp, -len, "extlock: could not get the length of "
                         "node '%s'", bdrv_get_node_name(bs->file->bs));
        ret = len;
        goto out;
    }
    if (offset < len) {
        error_setg(errp, "extlock: node '%s': another host resized the image "
                   "to %" PRId64 " bytes meanwhile; shrinking a shared image "
                   "is not supported", extlock_maint_name(m), len);
        ret = -ENOTSUP;
        goto out;
    }

    ret = bdrv_co_truncate(bs->file, offset, exact, prealloc, flags, errp);
    if (ret == 0) {
        ret = bdrv_co_flush(bs->file->bs);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "extlock: flushing node '%s' after "
                             "the resize", bdrv_get_node_name(bs->file->bs));
        }
    }

out:
    for (leaf = bs->file->bs; leaf->file; leaf = leaf->file->bs) {
        /* down to the protocol node */
    }
    len = extlock_co_child_getlength(leaf);
    if (len >= 0) {
        /* Also after a failure: what is on the disk now */
        extlock_client_unlock_announce(m->client, &own, len);
    } else {
        extlock_client_unlock(m->client, &own);
    }
    if (ret == 0) {
        m->last_size = offset;
        m->client->opts.grow_limit = MAX(m->client->opts.grow_limit,
                                         (uint64_t)offset);
    }
    trace_extlock_maint_done(extlock_maint_name(m), offset, ret);
    m->owner = false;
    extlock_maint_unbusy(m);
    return ret;
}

/*
 * A renewal showed a maintenance and the node may be idle: reread now, so
 * that the guest sees a new size without waiting for its next request.
 * Under a shared lock (on one byte), like any request: no maintenance
 * runs while it is held, so the metadata read is whole.
 */
static void coroutine_fn extlock_maint_kick_entry(void *opaque)
{
    ExtlockMaint *m = opaque;
    ExtlockRequest req = {
        .offset = 0,
        .length = 1,
        .mode = EXTLOCK_MODE_SHARED,
        .maint = true,
    };

    if (extlock_client_lock(m->client, &req) == 0) {
        bdrv_graph_co_rdlock();
        if (extlock_maint_enter(m, true) == 0) {
            extlock_maint_exit(m);
        }
        bdrv_graph_co_rdunlock();
        extlock_client_unlock(m->client, &req);
    }
    m->kicked = false;
    bdrv_dec_in_flight(m->bs);
}

static void extlock_maint_kick(void *opaque)
{
    ExtlockMaint *m = opaque;

    if (m->kicked) {
        return;
    }
    m->kicked = true;
    /* A drain waits for it (and cuts its wait for the lock) */
    bdrv_inc_in_flight(m->bs);
    aio_co_enter(bdrv_get_aio_context(m->bs),
                 qemu_coroutine_create(extlock_maint_kick_entry, m));
}

void extlock_maint_init(ExtlockMaint *m, BlockDriverState *bs,
                        ExtlockClient *c)
{
    *m = (ExtlockMaint) {
        .bs = bs,
        .client = c,
    };
    qemu_co_queue_init(&m->waiters);
    c->maint_kick = extlock_maint_kick;
    c->maint_opaque = m;
}
