/*
 * extlock: is the stack below an extlock node safe to share?
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#ifndef BLOCK_EXTLOCK_STACK_H
#define BLOCK_EXTLOCK_STACK_H

#include "block/block_int.h"
#include "extlock-compat.h"
#include "qapi/qapi-types-block-extlock.h"

typedef struct ExtlockStack {
    /*
     * A qcow2 node is below: its metadata (L1/L2 tables, refcounts,
     * header) must not change while the image is shared, so the node
     * forwards write-zeroes as data writes and ignores discards.
     */
    bool metadata_frozen;
    bool allocation_check;          /* the option; false = unsafe skip */
    uint64_t scanned_bytes;         /* by the allocation check at open */
    uint64_t scan_us;
    /* Counters, updated in the node's AioContext */
    uint64_t discards_ignored;
    uint64_t zero_writes_as_data;
} ExtlockStack;

/*
 * Check the nodes below the extlock node (@child and its children, not
 * backing files) and fill @st.  Fails, with an error that says what to
 * do, when the stack could corrupt the image or let hosts see stale data
 * while several hosts share it: a qcow2 image that is not fully allocated
 * (unless @allocation_check is false), has internal snapshots, persistent
 * bitmaps, lazy refcounts, encryption or a dirty or corrupt flag; a
 * format with allocation metadata other than qcow2; a filter that changes
 * allocation; detect-zeroes above a qcow2 node; a file or block device on
 * a network or cluster file system without cache.direct=on; an nfs node
 * with libnfs's readahead or page cache.  Main loop,
 * at open.
 */
bool GRAPH_RDLOCK extlock_stack_check(BlockDriverState *child,
                                      bool allocation_check,
                                      ExtlockStack *st, Error **errp);

/*
 * Write zeroes to [@offset, @offset + @bytes) of @child as ordinary data
 * writes (bounded bounce buffer), for a metadata-frozen stack: qcow2's own
 * write-zeroes would set zero flags in L2 entries.  The caller holds the
 * exclusive lock on the range.  Only BDRV_REQ_FUA of @flags is kept.
 */
int coroutine_fn GRAPH_RDLOCK
extlock_stack_co_zero_as_data(BdrvChild *child, int64_t offset, int64_t bytes,
                              BdrvRequestFlags flags);

/* For query-extent-locks */
ExtentLockStackInfo *extlock_stack_info(const ExtlockStack *st);

#endif /* BLOCK_EXTLOCK_STACK_H */
