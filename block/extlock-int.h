/*
 * extlock: state shared by the filter driver and its QMP/HMP commands
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#ifndef BLOCK_EXTLOCK_INT_H
#define BLOCK_EXTLOCK_INT_H

#include "block/block_int.h"
#include "qapi/qapi-types-block-core.h"
#include "extlock-locks.h"
#include "extlock-stack.h"
#include "extlock-maint.h"

typedef struct BDRVExtlockState {
    SocketAddressList *coordinators; /* in the order to try */
    char *lock_space;
    char *client_id;
    uint32_t granularity;       /* the option */
    /* Locks are rounded out to this: granularity or the child's alignment */
    uint32_t lock_alignment;
    uint32_t lease_ms;          /* requested; 0 = coordinator's default */
    ExtlockClientOptions cache_opts;
    ExtlockClient *client;
    ExtlockStack stack;         /* what is below, see extlock-stack.h */
    char *tls_creds_id;         /* for extent-lock-freeze's own session */
    char *tls_hostname;
    ExtlockMaint maint;         /* cluster-wide resize, extlock-maint.h */
} BDRVExtlockState;

extern BlockDriver bdrv_extlock;

/* @c's counters, for query-blockstats and query-extent-locks */
void extlock_get_counters(ExtlockClient *c, ExtentLockCounters *out);

/*
 * block_resize of @node_name (lock-space @lock_space): false with @errp
 * set if this process has a freeze (extent-lock-freeze) of the node or
 * of the lock-space pending or held.  Any thread.
 */
bool extlock_freeze_check_resize(const char *node_name, const char *lock_space,
                                 Error **errp);

#endif /* BLOCK_EXTLOCK_INT_H */
