/*
 * extlock: cluster-wide maintenance of a shared image (resize, snapshots)
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
#include "qemu/memalign.h"
#include "qemu/units.h"
#include "block/snapshot.h"
#include "extlock-compat.h"
#include "extlock-maint.h"
#include "trace.h"

/* The snapshot copy (extlock_maint_unshare()) per request */
#define EXTLOCK_MAINT_COPY_CHUNK (1 * MiB)

/* What a maintenance does while it holds the lock; graph read-locked */
typedef int coroutine_fn ExtlockMaintOp(ExtlockMaint *m, void *opaque,
                                        Error **errp);

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
    /* The reopen reads the child: I/O in flight for on-stuck-io */
    extlock_client_io_start(c);
    aio_bh_schedule_oneshot(qemu_get_aio_context(), extlock_maint_reload_bh,
                            &r);
    qemu_coroutine_yield();
    extlock_client_io_done(c);
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

/*
 * Run @op(@m, @opaque, errp) as a cluster-wide maintenance: get the
 * maintenance lock (granted after this node's earlier requests are done,
 * in local order, and after every other host has given back its locks; no
 * later request of any host runs before it is given back), keep this
 * node's own requests out, reread the metadata if another host's
 * maintenance ran since, run @op, and announce the image file's length
 * when letting go: every other host rereads the metadata.
 */
static int coroutine_fn GRAPH_RDLOCK
extlock_maint_run(ExtlockMaint *m, const char *what, ExtlockMaintOp *op,
                  void *opaque, Error **errp)
{
    BlockDriverState *bs = m->bs;
    BlockDriverState *leaf;
    ExtlockRequest own = {
        .offset = EXTLOCK_MAINT_OFFSET,
        .length = EXTLOCK_MAINT_LENGTH,
        .mode = EXTLOCK_MODE_EXCLUSIVE,
        .maint = true,
        /* The QMP commands drain the node around the maintenance */
        .no_drain_cut = true,
    };
    int64_t len;
    int ret;

    ret = extlock_client_lock(m->client, &own);
    if (ret < 0) {
        error_setg(errp, "extlock: node '%s': could not get the maintenance "
                   "lock of lock-space '%s' for the %s (lease lost, "
                   "coordinator unreachable or the wait cancelled); nothing "
                   "was changed", extlock_maint_name(m),
                   m->client->lock_space, what);
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
    }
    if (ret == 0) {
        /*
         * It writes the child under the maintenance lock: I/O in flight,
         * so that a host that loses its lease while the storage holds a
         * metadata write is fenced by on-stuck-io like for a data write
         */
        extlock_client_io_start(m->client);
        ret = op(m, opaque, errp);
        extlock_client_io_done(m->client);
    }

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
    m->owner = false;
    extlock_maint_unbusy(m);
    return ret;
}

typedef struct ExtlockMaintResize {
    int64_t offset;
    bool exact;
    PreallocMode prealloc;
    BdrvRequestFlags flags;
} ExtlockMaintResize;

static int coroutine_fn GRAPH_RDLOCK
extlock_maint_resize_op(ExtlockMaint *m, void *opaque, Error **errp)
{
    ExtlockMaintResize *r = opaque;
    BlockDriverState *bs = m->bs;
    int64_t len;
    int ret;

    len = extlock_co_child_getlength(bs->file->bs);
    if (len < 0) {
        error_setg_errno(errp, -len, "extlock: could not get the length of "
                         "node '%s'", bdrv_get_node_name(bs->file->bs));
        return len;
    }
    if (r->offset < len) {
        error_setg(errp, "extlock: node '%s': another host resized the image "
                   "to %" PRId64 " bytes meanwhile; shrinking a shared image "
                   "is not supported", extlock_maint_name(m), len);
        return -ENOTSUP;
    }
    ret = bdrv_co_truncate(bs->file, r->offset, r->exact, r->prealloc,
                           r->flags, errp);
    if (ret == 0) {
        ret = bdrv_co_flush(bs->file->bs);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "extlock: flushing node '%s' after "
                             "the resize", bdrv_get_node_name(bs->file->bs));
        }
    }
    return ret;
}

int coroutine_fn GRAPH_RDLOCK
extlock_maint_truncate(ExtlockMaint *m, int64_t offset, bool exact,
                       PreallocMode prealloc, BdrvRequestFlags flags,
                       Error **errp)
{
    ExtlockMaintResize r = {
        .offset = offset,
        .exact = exact,
        .prealloc = prealloc,
        .flags = flags,
    };
    int ret;

    trace_extlock_maint_begin(extlock_maint_name(m), offset);
    ret = extlock_maint_run(m, "resize", extlock_maint_resize_op, &r, errp);
    if (ret == 0) {
        m->last_size = offset;
        m->client->opts.grow_limit = MAX(m->client->opts.grow_limit,
                                         (uint64_t)offset);
    }
    trace_extlock_maint_done(extlock_maint_name(m), offset, ret);
    return ret;
}

/*
 * Internal snapshots.  qcow2 creates one by giving every cluster of the
 * image a second reference (the snapshot's L1 table is a copy of the
 * active one), so the next guest write to any cluster would copy it
 * first: an allocation, which metadata-frozen mode must never let a guest
 * write do.  So the owner, still in the maintenance, copies the image out
 * of the snapshot: it reads and rewrites every guest cluster through
 * qcow2, which moves each to a new cluster of its own (reference count 1
 * again); the snapshot keeps the old ones.  Afterwards the image is as
 * before for every host: fully allocated, nothing shared.  The cost is a
 * copy of the whole image while every host waits.
 */
typedef struct ExtlockMaintSnapshot {
    ExtlockMaint *m;
    QEMUSnapshotInfo *sn;       /* create it, or NULL: delete */
    const char *id;
    const char *name;
    Coroutine *co;
    Error *err;
    int ret;
    bool done;
} ExtlockMaintSnapshot;

/*
 * In the main loop, as the monitor runs snapshot commands: create or
 * delete the snapshot in the node below
 */
static void extlock_maint_snapshot_bh(void *opaque)
{
    ExtlockMaintSnapshot *r = opaque;
    BlockDriverState *bs = r->m->bs;
    AioContext *ctx = bdrv_get_aio_context(bs);

    extlock_aio_context_acquire(ctx);
    bdrv_graph_rdlock_main_loop();
    if (r->sn && r->m->unshare) {
        /* The copy writes the child even if no parent of ours writes */
        r->m->copying = true;
        r->ret = bdrv_child_refresh_perms(bs, bs->file, &r->err);
        if (r->ret < 0) {
            r->m->copying = false;
            error_prepend(&r->err, "extlock: node '%s': the copy out of the "
                          "new snapshot needs to write: ",
                          bdrv_get_node_name(bs));
            goto out;
        }
    }
    if (r->sn) {
        r->ret = bdrv_snapshot_create(bs->file->bs, r->sn);
        if (r->ret < 0) {
            error_setg_errno(&r->err, -r->ret, "extlock: node '%s' could not "
                             "create snapshot '%s'",
                             bdrv_get_node_name(bs->file->bs), r->sn->name);
        }
    } else {
        r->ret = bdrv_snapshot_delete(bs->file->bs, r->id, r->name, &r->err);
    }
out:
    bdrv_graph_rdunlock_main_loop();
    extlock_aio_context_release(ctx);
    aio_co_wake(r->co);
}

/* Give every guest cluster a data cluster of its own again (see above) */
static int coroutine_fn GRAPH_RDLOCK
extlock_maint_unshare(ExtlockMaint *m, Error **errp)
{
    BdrvChild *child = m->bs->file;
    int64_t len = extlock_co_child_getlength(child->bs);
    int64_t chunk = EXTLOCK_MAINT_COPY_CHUNK;
    int64_t offset;
    void *buf;
    int ret = 0;

    if (len < 0) {
        error_setg_errno(errp, -len, "extlock: could not get the length of "
                         "node '%s'", bdrv_get_node_name(child->bs));
        return len;
    }
    if (child->bs->bl.max_transfer) {
        chunk = MIN(chunk, child->bs->bl.max_transfer);
    }
    buf = qemu_try_blockalign(child->bs, chunk);
    if (!buf) {
        error_setg(errp, "extlock: out of memory for the snapshot copy");
        return -ENOMEM;
    }
    for (offset = 0; offset < len; offset += chunk) {
        int64_t n = MIN(chunk, len - offset);

        ret = bdrv_co_pread(child, offset, n, buf, 0);
        if (ret == 0) {
            ret = bdrv_co_pwrite(child, offset, n, buf, 0);
        }
        if (ret < 0) {
            error_setg_errno(errp, -ret, "extlock: node '%s': copying the "
                             "image out of the new snapshot failed at offset "
                             "%" PRId64 "; the image may now share clusters "
                             "with the snapshot, delete the snapshot",
                             bdrv_get_node_name(child->bs), offset);
            break;
        }
    }
    qemu_vfree(buf);
    return ret < 0 ? ret : 0;
}

static int coroutine_fn GRAPH_RDLOCK
extlock_maint_snapshot_op(ExtlockMaint *m, void *opaque, Error **errp)
{
    ExtlockMaintSnapshot *r = opaque;
    int ret;

    r->co = qemu_coroutine_self();
    aio_bh_schedule_oneshot(qemu_get_aio_context(),
                            extlock_maint_snapshot_bh, r);
    qemu_coroutine_yield();
    if (r->ret < 0) {
        error_propagate(errp, r->err);
        r->err = NULL;
        return r->ret;
    }
    ret = 0;
    if (r->sn && m->unshare) {
        ret = extlock_maint_unshare(m, errp);
    }
    if (ret == 0) {
        ret = bdrv_co_flush(m->bs->file->bs);
        if (ret < 0) {
            error_setg_errno(errp, -ret, "extlock: flushing node '%s' after "
                             "the snapshot",
                             bdrv_get_node_name(m->bs->file->bs));
        }
    }
    return ret;
}

static void coroutine_fn extlock_maint_snapshot_entry(void *opaque)
{
    ExtlockMaintSnapshot *r = opaque;
    ExtlockMaint *m = r->m;
    const char *name = r->sn ? r->sn->name : (r->name ? r->name : r->id);
    const char *what = r->sn ? "snapshot" : "snapshot deletion";
    Error *err = NULL;

    trace_extlock_maint_snapshot_begin(extlock_maint_name(m), what, name);
    bdrv_graph_co_rdlock();
    r->ret = extlock_maint_run(m, what, extlock_maint_snapshot_op, r, &err);
    bdrv_graph_co_rdunlock();
    trace_extlock_maint_snapshot_done(extlock_maint_name(m), what, name,
                                      r->ret);
    r->err = err;
    r->done = true;
    aio_wait_kick();
}

int GRAPH_RDLOCK
extlock_maint_snapshot(ExtlockMaint *m, QEMUSnapshotInfo *sn, const char *id,
                       const char *name, Error **errp)
{
    AioContext *ctx = bdrv_get_aio_context(m->bs);
    ExtlockMaintSnapshot r = {
        .m = m,
        .sn = sn,
        .id = id,
        .name = name,
    };

    /* Its lock requests run in the node's context, as I/O requests do */
    aio_co_enter(ctx, qemu_coroutine_create(extlock_maint_snapshot_entry, &r));
    AIO_WAIT_WHILE(ctx, !r.done);
    if (m->copying) {
        /* Give the write permission back (cannot fail: it shrinks) */
        m->copying = false;
        bdrv_child_refresh_perms(m->bs, m->bs->file, &error_abort);
    }
    if (r.ret < 0) {
        error_propagate(errp, r.err);
    }
    return r.ret;
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
    if (qatomic_read(&m->client->drain_target) > 0) {
        /*
         * Drained: a close or an AioContext move may come next, and no
         * new work may start in the node now.  The reread is left to the
         * next request (c->maint_reload stays set).
         */
        return;
    }
    m->kicked = true;
    /* A drain waits for it (and cuts its wait for the lock) */
    bdrv_inc_in_flight(m->bs);
    aio_co_enter(bdrv_get_aio_context(m->bs),
                 qemu_coroutine_create(extlock_maint_kick_entry, m));
}

void extlock_maint_init(ExtlockMaint *m, BlockDriverState *bs,
                        ExtlockClient *c, bool unshare)
{
    *m = (ExtlockMaint) {
        .bs = bs,
        .client = c,
        .unshare = unshare,
    };
    qemu_co_queue_init(&m->waiters);
    c->maint_kick = extlock_maint_kick;
    c->maint_opaque = m;
    /*
     * An external snapshot of the child would put an overlay between this
     * node and the shared image on one host only (extlock_maint_refuse_
     * backing() covers the node itself).  The child is referenced, so
     * that it is unblocked at close even if it was replaced meanwhile
     * (a node must have no blocker left when it is deleted).
     */
    bdrv_graph_rdlock_main_loop();
    error_setg(&m->blocker, "extlock: node '%s' is a shared image: an "
               "external snapshot of it or of node '%s' would move this "
               "host's writes into an overlay that the other hosts do not "
               "see; use an internal snapshot "
               "(blockdev-snapshot-internal-sync on node '%s') instead",
               bdrv_get_node_name(bs), bdrv_get_node_name(bs->file->bs),
               bdrv_get_node_name(bs));
    m->blocked_child = bs->file->bs;
    bdrv_graph_rdunlock_main_loop();
    bdrv_ref(m->blocked_child);
    bdrv_op_block(m->blocked_child, BLOCK_OP_TYPE_EXTERNAL_SNAPSHOT,
                  m->blocker);
}

int GRAPH_RDLOCK extlock_maint_refuse_backing(ExtlockMaint *m, Error **errp)
{
    BdrvChild *c;

    QLIST_FOREACH(c, &m->bs->parents, next_parent) {
        if (c->role & BDRV_CHILD_COW) {
            error_setg(errp, "%s", error_get_pretty(m->blocker));
            return -EPERM;
        }
    }
    return 0;
}

void extlock_maint_cleanup(ExtlockMaint *m)
{
    if (m->blocker) {
        bdrv_op_unblock(m->blocked_child, BLOCK_OP_TYPE_EXTERNAL_SNAPSHOT,
                        m->blocker);
        bdrv_unref(m->blocked_child);
        m->blocked_child = NULL;
        error_free(m->blocker);
        m->blocker = NULL;
    }
}
