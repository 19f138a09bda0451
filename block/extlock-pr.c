/*
 * extlock: SCSI-3 persistent reservations of an extlock node
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * See extlock-pr.h.  PERSISTENT RESERVE OUT goes to the coordinator
 * (pr-out) and waits in its coroutine for the reply, which comes only
 * after every node of the lock-space applied the change; PERSISTENT
 * RESERVE IN is answered from the cached state, which is the state of
 * the last change that completed (or newer).
 *
 * Every state the node takes (pushed, or the reply to its pr-in after a
 * reconnection) is acknowledged with pr-ack, and only once the writes in
 * flight it forbids have drained.  A pr-out carries a request number, and
 * is sent again with it when the connection comes back: the coordinator
 * answers a retry instead of applying it twice.
 */
#include "qemu/osdep.h"
#include "qemu/coroutine.h"
#include "block/aio.h"
#include "qapi/qapi-events-block-extlock.h"
#include "extlock-pr.h"
#include "extlock-compat.h"

typedef struct ExtlockPrWait {
    uint64_t id;                /* message id on this connection, or 0 */
    Coroutine *co;
    bool done;
    int ret;
    ExtlockMsg msg;             /* the pr-out, to send again */
    QTAILQ_ENTRY(ExtlockPrWait) next;
} ExtlockPrWait;

ExtlockPr *extlock_pr_new(ExtlockConnection *conn, const char *client_id,
                          const char *node_name)
{
    ExtlockPr *pr = g_new0(ExtlockPr, 1);

    pr->conn = conn;
    pr->client_id = g_strdup(client_id);
    pr->node_name = g_strdup(node_name);
    extlock_pr_init(&pr->state);
    pr->may_read = true;
    pr->may_write = true;
    pr->waits = g_hash_table_new(g_int64_hash, g_int64_equal);
    QTAILQ_INIT(&pr->pending);
    /* unique across restarts of this client-id (coordinator memory) */
    pr->next_request = ((uint64_t)g_random_int() << 31 ^ g_random_int()) &
                       ((1ULL << 62) - 1);
    return pr;
}

void extlock_pr_free(ExtlockPr *pr)
{
    if (!pr) {
        return;
    }
    assert(g_hash_table_size(pr->waits) == 0);
    assert(QTAILQ_EMPTY(&pr->pending));
    g_hash_table_destroy(pr->waits);
    extlock_pr_destroy(&pr->state);
    g_free(pr->client_id);
    g_free(pr->node_name);
    g_free(pr);
}

/* (Re)subscribe: after every new connection (new or resumed session) */
void extlock_pr_subscribe(ExtlockPr *pr)
{
    ExtlockMsg m;

    if (!pr || pr->unsupported) {
        return;
    }
    extlock_msg_init(&m, EXTLOCK_MSG_PR_IN);
    pr->subscribe_id = extlock_conn_send(pr->conn, &m);
}

ExtentLockReservationInfo *extlock_pr_info(ExtlockPr *pr)
{
    ExtentLockReservationInfo *info;
    const ExtlockPrRegistrant *me;

    if (!pr || !pr->subscribed) {
        return NULL;
    }
    info = g_new0(ExtentLockReservationInfo, 1);
    info->seq = pr->seq;
    info->generation = pr->state.generation;
    info->type = pr->state.type;
    if (pr->state.holder) {
        EXTLOCK_QAPI_SET_HAS(info, holder);
        info->holder = g_strdup(pr->state.holder);
    }
    info->registered_keys = pr->state.registrants->len;
    me = extlock_pr_find(&pr->state, pr->client_id);
    if (me) {
        info->has_key = true;
        info->key = me->key;
    }
    info->may_read = pr->may_read;
    info->may_write = pr->may_write;
    info->conflicts = pr->io_conflicts;
    return info;
}

static void extlock_pr_send_ack(ExtlockPr *pr, uint64_t seq)
{
    ExtlockMsg m;

    if (extlock_conn_state(pr->conn) != EXTLOCK_CONN_ACTIVE) {
        return;     /* acknowledged after the pr-in of the next connection */
    }
    extlock_msg_init(&m, EXTLOCK_MSG_PR_ACK);
    m.pr_seq = seq;
    extlock_conn_send(pr->conn, &m);
}

/*
 * Take @st (seq @seq) as the state; true if write access or this node's
 * registration went away (PREEMPT AND ABORT ends its session once it
 * acknowledged: its writes in flight must be done by then).  A pushed
 * state older than ours is ignored; the answer to our subscription
 * (@current) is the coordinator's state now and replaces ours whatever its
 * seq: a coordinator that lost its state starts the seq again.
 */
static bool extlock_pr_apply(ExtlockPr *pr, ExtlockPrState *st, uint64_t seq,
                             bool current)
{
    bool could_write = pr->may_write;
    bool was_registered = extlock_pr_find(&pr->state, pr->client_id);
    bool changed = !pr->subscribed || seq != pr->seq;

    if (seq < pr->seq && !current) {
        return false;           /* older than what we have */
    }
    extlock_pr_destroy(&pr->state);
    pr->state = *st;
    extlock_pr_init(st);        /* @st's contents moved */
    pr->seq = seq;
    pr->subscribed = true;
    pr->may_read = extlock_pr_allows(&pr->state, pr->client_id, false);
    pr->may_write = extlock_pr_allows(&pr->state, pr->client_id, true);
    if (changed) {
        ExtentLockReservationInfo *info = extlock_pr_info(pr);

        qapi_event_send_extent_lock_reservation_changed(pr->node_name, info);
        qapi_free_ExtentLockReservationInfo(info);
    }
    return (could_write && !pr->may_write) ||
           (was_registered && !extlock_pr_find(&pr->state, pr->client_id));
}

/*
 * Take a state (pushed, or the reply to our pr-in) and acknowledge it, at
 * once or, if it forbids writes still in flight (or an earlier one did),
 * once they drained: after a reconnection too
 */
static void extlock_pr_take(ExtlockPr *pr, ExtlockPrState *st, uint64_t seq,
                            bool current)
{
    bool lost = extlock_pr_apply(pr, st, seq, current);

    if ((lost || pr->ack_after_drain) && pr->writes_in_flight) {
        /* Acknowledged once the writes that started before are done */
        pr->ack_after_drain = pr->seq;
        return;
    }
    pr->ack_after_drain = 0;
    extlock_pr_send_ack(pr, pr->seq);
}

void extlock_pr_update(ExtlockPr *pr, ExtlockMsg *msg)
{
    if (!pr || !msg->pr) {
        return;
    }
    extlock_pr_take(pr, msg->pr, msg->pr_seq, false);
}

void extlock_pr_io_done(ExtlockPr *pr, bool write)
{
    if (!pr || !write) {
        return;
    }
    assert(pr->writes_in_flight > 0);
    if (--pr->writes_in_flight == 0 && pr->ack_after_drain) {
        extlock_pr_send_ack(pr, pr->ack_after_drain);
        pr->ack_after_drain = 0;
    }
}

static int extlock_pr_errno(ExtlockPrStatus st)
{
    switch (st) {
    case EXTLOCK_PR_OK:
        return 0;
    case EXTLOCK_PR_CONFLICT:
        return -EBADE;
    case EXTLOCK_PR_INVALID_FIELD_CDB:
        return -EINVAL;
    case EXTLOCK_PR_INVALID_FIELD_PARAM:
        return -ERANGE;
    case EXTLOCK_PR_INVALID_RELEASE:
        return -EPERM;
    case EXTLOCK_PR_NO_RESOURCES:
        return -ENOSPC;
    }
    return -EIO;
}

static void extlock_pr_wake(ExtlockPrWait *w, int ret)
{
    w->done = true;
    w->ret = ret;
    aio_co_wake(w->co);
}

bool extlock_pr_reply(ExtlockPr *pr, ExtlockMsg *msg)
{
    ExtlockPrWait *w;

    if (!pr || !msg->has_id) {
        return false;
    }
    if (msg->id == pr->subscribe_id) {
        pr->subscribe_id = 0;
        if (msg->type == EXTLOCK_MSG_PR_STATUS && msg->pr) {
            extlock_pr_take(pr, msg->pr, msg->pr_seq, true);
        } else if (msg->type == EXTLOCK_MSG_ERROR &&
                   msg->error == EXTLOCK_ERR_UNKNOWN_TYPE) {
            pr->unsupported = true;
        }
        return true;
    }
    if (msg->type == EXTLOCK_MSG_PR_ACKED) {
        return true;
    }
    w = g_hash_table_lookup(pr->waits, &msg->id);
    if (!w) {
        return msg->type == EXTLOCK_MSG_PR_RESULT;
    }
    g_hash_table_remove(pr->waits, &msg->id);
    QTAILQ_REMOVE(&pr->pending, w, next);
    if (msg->type == EXTLOCK_MSG_PR_RESULT) {
        extlock_pr_wake(w, extlock_pr_errno(msg->pr_result));
    } else if (msg->type == EXTLOCK_MSG_ERROR &&
               msg->error == EXTLOCK_ERR_UNKNOWN_TYPE) {
        pr->unsupported = true;
        extlock_pr_wake(w, -ENOTSUP);
    } else {
        extlock_pr_wake(w, -EIO);
    }
    return true;
}

/*
 * @w fails without an answer: it may have been applied.  If the guest
 * sends the same command again, it goes with the same request number, so
 * that the coordinator answers it instead of applying it twice.
 */
static void extlock_pr_interrupted(ExtlockPr *pr, ExtlockPrWait *w)
{
    if (pr->n_interrupted == EXTLOCK_PR_MAX_INTERRUPTED) {
        /* the oldest goes: more never wait at once */
        memmove(&pr->interrupted[0], &pr->interrupted[1],
                sizeof(pr->interrupted[0]) * --pr->n_interrupted);
    }
    pr->interrupted[pr->n_interrupted++] = w->msg;
}

/*
 * The request number of @m: that of the oldest interrupted pr-out with the
 * same command (a retry, which is no longer interrupted then), or a new
 * one.  A new command ends the retries: the interrupted pr-outs are
 * forgotten, so that the same command sent again much later, meant as a
 * new one, is applied (a guest retries a failed command before it goes
 * on, the kernel its BUSY ones at once).
 */
static uint64_t extlock_pr_request_number(ExtlockPr *pr, const ExtlockMsg *m)
{
    for (unsigned i = 0; i < pr->n_interrupted; i++) {
        const ExtlockMsg *old = &pr->interrupted[i];
        uint64_t request = old->pr_request;

        if (old->pr_action == m->pr_action && old->pr_type == m->pr_type &&
            old->pr_key == m->pr_key && old->pr_sa_key == m->pr_sa_key &&
            old->aptpl == m->aptpl) {
            memmove(&pr->interrupted[i], &pr->interrupted[i + 1],
                    sizeof(pr->interrupted[0]) * (--pr->n_interrupted - i));
            return request;
        }
    }
    pr->n_interrupted = 0;
    return ++pr->next_request;
}

/* Send @w's pr-out on the current connection (its id: 0 if none) */
static void extlock_pr_send_out(ExtlockPr *pr, ExtlockPrWait *w)
{
    w->msg.has_id = false;
    w->id = extlock_conn_send(pr->conn, &w->msg);
    if (w->id) {
        g_hash_table_insert(pr->waits, &w->id, w);
    }
}

/*
 * The lease was lost, or a new connection is up (@state is ACTIVE only
 * then; a broken connection itself is not reported): no reply comes to
 * the old one.  While the node reconnects (the session may resume), the
 * pr-outs wait, and are sent again with their request numbers on the new
 * connection; once the lease is lost they fail.
 */
void extlock_pr_conn_changed(ExtlockPr *pr, ExtlockConnState state)
{
    ExtlockPrWait *w, *wn;

    if (!pr || state == EXTLOCK_CONN_RECONNECTING) {
        return;
    }
    g_hash_table_remove_all(pr->waits);
    QTAILQ_FOREACH_SAFE(w, &pr->pending, next, wn) {
        w->id = 0;
        if (state == EXTLOCK_CONN_LEASE_LOST) {
            QTAILQ_REMOVE(&pr->pending, w, next);
            extlock_pr_interrupted(pr, w);
            extlock_pr_wake(w, -EIO);
        }
    }
    if (state == EXTLOCK_CONN_ACTIVE) {
        extlock_pr_subscribe(pr);
        QTAILQ_FOREACH(w, &pr->pending, next) {
            extlock_pr_send_out(pr, w);
        }
    }
}

void extlock_pr_drain_cut(ExtlockPr *pr)
{
    ExtlockPrWait *w, *wn;

    if (!pr) {
        return;
    }
    pr->drain_cut = true;
    QTAILQ_FOREACH_SAFE(w, &pr->pending, next, wn) {
        QTAILQ_REMOVE(&pr->pending, w, next);
        if (w->id) {
            g_hash_table_remove(pr->waits, &w->id);
        }
        extlock_pr_interrupted(pr, w);
        extlock_pr_wake(w, -EBUSY);
    }
}

int coroutine_fn extlock_pr_read_keys(ExtlockPr *pr, uint32_t *generation,
                                      uint32_t num_keys, uint64_t *keys)
{
    GPtrArray *regs = pr->state.registrants;

    *generation = pr->state.generation;
    for (guint i = 0; i < regs->len && i < num_keys; i++) {
        keys[i] = ((ExtlockPrRegistrant *)g_ptr_array_index(regs, i))->key;
    }
    return regs->len;
}

int coroutine_fn extlock_pr_read_reservation(ExtlockPr *pr,
                                             uint32_t *generation,
                                             uint64_t *key,
                                             BlockPrType *type)
{
    *generation = pr->state.generation;
    *key = extlock_pr_reservation_key(&pr->state);
    *type = (BlockPrType)pr->state.type;
    return 0;
}

int coroutine_fn extlock_pr_co_out(ExtlockPr *pr, ExtlockPrAction action,
                                   unsigned type, uint64_t key,
                                   uint64_t sa_key,
                                   bool aptpl)
{
    g_autofree ExtlockPrWait *w = NULL;
    ExtlockMsg *m;

    if (pr->unsupported) {
        return -ENOTSUP;
    }
    if (pr->drain_cut) {
        return -EBUSY;          /* nothing may wait in a drained section */
    }
    if (extlock_conn_state(pr->conn) == EXTLOCK_CONN_LEASE_LOST) {
        return -EIO;            /* no session */
    }
    w = g_new0(ExtlockPrWait, 1);
    w->co = qemu_coroutine_self();
    m = &w->msg;
    extlock_msg_init(m, EXTLOCK_MSG_PR_OUT);
    m->pr_action = action;
    m->pr_type = type & 0x0f;
    m->pr_key = key;
    m->pr_sa_key = sa_key;
    m->aptpl = aptpl;
    m->pr_request = extlock_pr_request_number(pr, m);
    /* not sent while reconnecting: it goes on the new connection */
    extlock_pr_send_out(pr, w);
    QTAILQ_INSERT_TAIL(&pr->pending, w, next);
    while (!w->done) {
        qemu_coroutine_yield();
    }
    return w->ret;
}
