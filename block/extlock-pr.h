/*
 * extlock: SCSI-3 persistent reservations of an extlock node
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The coordinator keeps the reservation state of the lock-space
 * (docs/protocol.rst, "Persistent reservations"); the node subscribes at
 * open, caches the state it pushes (pr-update) and applies it before it
 * acknowledges: reads and writes the state excludes fail with -EBADE,
 * which scsi-hd reports as RESERVATION CONFLICT.  While nothing changes
 * the I/O path reads two cached booleans.  A push that takes write access
 * away is acknowledged only once the writes in flight have drained.
 * The node's I_T nexus is its client-id.
 *
 * Everything runs in the node's AioContext, like the connection.
 */
#ifndef BLOCK_EXTLOCK_PR_H
#define BLOCK_EXTLOCK_PR_H

#include "block/block_int.h"
#include "qapi/qapi-types-block-extlock.h"
#include "extlock-connection.h"

/*
 * Interrupted pr-outs remembered for a retry: as many as may wait at once
 * (the coordinator's limit per session, docs/protocol.rst "pr-out")
 */
#define EXTLOCK_PR_MAX_INTERRUPTED 16

typedef struct ExtlockPr {
    ExtlockConnection *conn;
    char *client_id;
    char *node_name;            /* for events */
    bool subscribed;            /* a pr-status arrived */
    bool unsupported;           /* the coordinator knows no pr-in */
    uint64_t subscribe_id;      /* the pr-in in flight, or 0 */
    ExtlockPrState state;       /* as last pushed */
    uint64_t seq;
    /* what the state allows this node: the I/O path reads only these */
    bool may_read;
    bool may_write;
    uint64_t writes_in_flight;
    uint64_t ack_after_drain;   /* seq to ack once writes drained, or 0 */
    GHashTable *waits;          /* pr-out id -> ExtlockPrWait */
    /* the pr-outs waiting for their results, sent again on reconnection */
    QTAILQ_HEAD(, ExtlockPrWait) pending;
    uint64_t next_request;      /* pr-out "request" numbers */
    /*
     * The pr-outs that failed unanswered (oldest first), each retried with
     * its number when the guest sends the same command again
     */
    ExtlockMsg interrupted[EXTLOCK_PR_MAX_INTERRUPTED];
    unsigned n_interrupted;
    bool drain_cut;             /* until the drain ends: -EBUSY */
    uint64_t io_conflicts;      /* requests refused */
} ExtlockPr;

ExtlockPr *extlock_pr_new(ExtlockConnection *conn, const char *client_id,
                          const char *node_name);
void extlock_pr_free(ExtlockPr *pr);
/* For query-extent-locks: NULL until the node got the state */
ExtentLockReservationInfo *extlock_pr_info(ExtlockPr *pr);

/* Connection events (extlock-locks.c forwards them) */
void extlock_pr_subscribe(ExtlockPr *pr);
bool extlock_pr_reply(ExtlockPr *pr, ExtlockMsg *msg);
void extlock_pr_update(ExtlockPr *pr, ExtlockMsg *msg);
void extlock_pr_conn_changed(ExtlockPr *pr, ExtlockConnState state);
/*
 * A drain's grace ran out: the pr-outs waiting for the coordinator fail
 * with -EBUSY (BUSY to the guest, which retries: the same command goes
 * with the same request number, not applied twice)
 */
void extlock_pr_drain_cut(ExtlockPr *pr);

/*
 * I/O path: may a read (write=false) or write start?  If so, and it is a
 * write, extlock_pr_io_done() must follow.  NULL @pr allows everything.
 */
static inline bool extlock_pr_io_start(ExtlockPr *pr, bool write)
{
    if (!pr) {
        return true;
    }
    if (!(write ? pr->may_write : pr->may_read)) {
        pr->io_conflicts++;
        return false;
    }
    pr->writes_in_flight += write;
    return true;
}
void extlock_pr_io_done(ExtlockPr *pr, bool write);

/* The BlockDriver callbacks (include/block/block_int-common.h) */
int coroutine_fn extlock_pr_read_keys(ExtlockPr *pr, uint32_t *generation,
                                      uint32_t num_keys, uint64_t *keys);
int coroutine_fn extlock_pr_read_reservation(ExtlockPr *pr,
                                             uint32_t *generation,
                                             uint64_t *key,
                                             BlockPrType *type);
int coroutine_fn extlock_pr_co_out(ExtlockPr *pr, ExtlockPrAction action,
                                   unsigned type, uint64_t key,
                                   uint64_t sa_key,
                                   bool aptpl);

#endif /* BLOCK_EXTLOCK_PR_H */
