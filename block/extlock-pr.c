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
 */
#include "qemu/osdep.h"
#include "qemu/coroutine.h"
#include "block/aio.h"
#include "extlock-pr.h"
#include "extlock-compat.h"

typedef struct ExtlockPrWait {
    uint64_t id;
    Coroutine *co;
    bool done;
    int ret;
} ExtlockPrWait;

ExtlockPr *extlock_pr_new(ExtlockConnection *conn, const char *client_id)
{
    ExtlockPr *pr = g_new0(ExtlockPr, 1);

    pr->conn = conn;
    pr->client_id = g_strdup(client_id);
    extlock_pr_init(&pr->state);
    pr->may_read = true;
    pr->may_write = true;
    pr->waits = g_hash_table_new(g_int64_hash, g_int64_equal);
    return pr;
}

void extlock_pr_free(ExtlockPr *pr)
{
    if (!pr) {
        return;
    }
    assert(g_hash_table_size(pr->waits) == 0);
    g_hash_table_destroy(pr->waits);
    extlock_pr_destroy(&pr->state);
    g_free(pr->client_id);
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

static void extlock_pr_send_ack(ExtlockPr *pr, uint64_t seq)
{
    ExtlockMsg m;

    extlock_msg_init(&m, EXTLOCK_MSG_PR_ACK);
    m.pr_seq = seq;
    extlock_conn_send(pr->conn, &m);
}

/* Take @st (seq @seq) as the state; true if write access went away */
static bool extlock_pr_apply(ExtlockPr *pr, ExtlockPrState *st, uint64_t seq)
{
    bool could_write = pr->may_write;

    if (seq < pr->seq) {
        return false;           /* older than what we have */
    }
    extlock_pr_destroy(&pr->state);
    pr->state = *st;
    extlock_pr_init(st);        /* @st's contents moved */
    pr->seq = seq;
    pr->subscribed = true;
    pr->may_read = extlock_pr_allows(&pr->state, pr->client_id, false);
    pr->may_write = extlock_pr_allows(&pr->state, pr->client_id, true);
    return could_write && !pr->may_write;
}

void extlock_pr_update(ExtlockPr *pr, ExtlockMsg *msg)
{
    uint64_t seq = msg->pr_seq;

    if (!pr || !msg->pr) {
        return;
    }
    if (extlock_pr_apply(pr, msg->pr, seq) && pr->writes_in_flight) {
        /* Acknowledged once the writes that started before are done */
        pr->ack_after_drain = seq;
        return;
    }
    if (pr->ack_after_drain && pr->writes_in_flight) {
        pr->ack_after_drain = seq;
        return;
    }
    extlock_pr_send_ack(pr, seq);
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
            extlock_pr_apply(pr, msg->pr, msg->pr_seq);
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

/* The connection broke or came back: no reply comes to the old one */
void extlock_pr_conn_changed(ExtlockPr *pr, bool active)
{
    GHashTableIter it;
    gpointer value;

    if (!pr) {
        return;
    }
    g_hash_table_iter_init(&it, pr->waits);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        g_hash_table_iter_remove(&it);
        extlock_pr_wake(value, -EIO);
    }
    if (active) {
        extlock_pr_subscribe(pr);
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
    ExtlockPrWait w = { .co = qemu_coroutine_self() };
    ExtlockMsg m;

    if (pr->unsupported) {
        return -ENOTSUP;
    }
    extlock_msg_init(&m, EXTLOCK_MSG_PR_OUT);
    m.pr_action = action;
    m.pr_type = type & 0x0f;
    m.pr_key = key;
    m.pr_sa_key = sa_key;
    m.aptpl = aptpl;
    w.id = extlock_conn_send(pr->conn, &m);
    if (!w.id) {
        return -EIO;            /* not connected */
    }
    g_hash_table_insert(pr->waits, &w.id, &w);
    while (!w.done) {
        qemu_coroutine_yield();
    }
    return w.ret;
}
