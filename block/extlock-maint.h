/*
 * extlock: cluster-wide maintenance of a shared image (resize, snapshots)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The metadata of a shared image (qcow2's header, L1/L2 and refcount
 * tables; the length of any image) may change only while no other host
 * uses it, and every other host must reread it afterwards.  A maintenance
 * is an exclusive lock on the whole range [0, 2^63), which no data
 * request asks for: the coordinator grants it in timestamp order, after
 * every host has given back the locks it holds (the revocations every
 * cached lock gets; a lock in use is given back when its requests are
 * done: the drain), and grants no later request before it is over.  The
 * owner changes the image through its own node and announces the image
 * file's new length when it unlocks; the coordinator counts maintenances
 * and puts the count (and the length) in every grant.  A node whose grant
 * shows a new count stops admitting requests, waits for those in flight,
 * rereads its child's metadata (bdrv_invalidate_cache(), the path of a
 * migration target: qcow2 reopens itself from the disk), refreshes the
 * lengths and tells its parents (the guest device) about a new size, and
 * lets the requests go.  docs/design.rst, "Metadata changes".
 */
#ifndef BLOCK_EXTLOCK_MAINT_H
#define BLOCK_EXTLOCK_MAINT_H

#include "qemu/coroutine.h"
#include "block/block_int.h"
#include "block/snapshot.h"
#include "extlock-locks.h"

typedef struct ExtlockMaint {
    BlockDriverState *bs;       /* the extlock node */
    ExtlockClient *client;
    bool busy;                  /* rereading, or running a maintenance */
    unsigned in_flight;         /* requests admitted, forwarded or not */
    Coroutine *idle_co;         /* waits for in_flight == 0 */
    CoQueue waiters;            /* requests waiting while busy */
    bool kicked;                /* a reread after a renewal is on its way */
    bool unshare;               /* metadata frozen: copy out of a snapshot */
    bool copying;               /* ... now: the child needs BLK_PERM_WRITE */
    Error *blocker;             /* refuses external snapshots ... */
    BlockDriverState *blocked_child;    /* ... of this child (a ref) */

    /* For query-extent-locks */
    bool owner;                 /* this node runs a maintenance now */
    uint64_t reloads;           /* metadata rereads after maintenances */
    uint64_t owned;             /* maintenances this node ran */
    int64_t last_size;          /* the image length after the last one */
} ExtlockMaint;

/*
 * @unshare: the child is a qcow2 in metadata-frozen mode, whose clusters
 * must not stay shared with a new internal snapshot.  Blocks external
 * snapshots of @bs's child until extlock_maint_cleanup().
 */
void extlock_maint_init(ExtlockMaint *m, BlockDriverState *bs,
                        ExtlockClient *c, bool unshare);
void extlock_maint_cleanup(ExtlockMaint *m);

/*
 * The node's permission check: -EPERM if it is (about to be) the backing
 * file of another node, as an external snapshot of it would make it (an
 * op blocker on the node itself could not be taken away before the node
 * is deleted).
 */
int GRAPH_RDLOCK extlock_maint_refuse_backing(ExtlockMaint *m, Error **errp);

/*
 * Admit a request (after its lock is granted, before it is forwarded;
 * @locked: it holds one): wait while the node rereads the metadata or
 * runs a maintenance, and, under a lock, reread it if a grant or renewal
 * showed a maintenance.  0, after which extlock_maint_exit() must follow,
 * or -EIO (the metadata could not be reread; reported).
 */
int coroutine_fn GRAPH_RDLOCK extlock_maint_enter(ExtlockMaint *m,
                                                  bool locked);
void extlock_maint_exit(ExtlockMaint *m);

/*
 * Grow the image to @offset bytes cluster-wide: get the maintenance lock
 * (every other host stopped), reread the metadata, truncate the child,
 * flush, announce the new length and let go.
 */
int coroutine_fn GRAPH_RDLOCK
extlock_maint_truncate(ExtlockMaint *m, int64_t offset, bool exact,
                       PreallocMode prealloc, BdrvRequestFlags flags,
                       Error **errp);

/*
 * Create the internal snapshot @sn (or, with @sn NULL, delete the one
 * named by @id and/or @name) in the node below, cluster-wide: under the
 * maintenance lock, so that it is a cut through every host's writes in
 * lock order and every other host rereads the snapshot table.  A new
 * snapshot is followed by a copy of the image out of it (extlock-maint.c)
 * when @unshare was given.  In the main loop, outside coroutines (the
 * monitor's snapshot commands), with the node drained.
 */
int GRAPH_RDLOCK
extlock_maint_snapshot(ExtlockMaint *m, QEMUSnapshotInfo *sn, const char *id,
                       const char *name, Error **errp);

#endif /* BLOCK_EXTLOCK_MAINT_H */
