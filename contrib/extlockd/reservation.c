/*
 * extlockd: SCSI-3 persistent reservations, one state per lock-space
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The coordinator is the "shared database" of the reservations of every
 * lock-space (one emulated logical unit).  The state machine itself is
 * util/extlock-reservation.c; this file runs it on "pr-out", answers
 * "pr-in", and distributes the result (docs/protocol.rst, "Persistent
 * reservations"):
 *
 *  - The I_T nexus is the session's client-id, so registrations outlive
 *    sessions (a QEMU restart or migration keeps its registration).
 *  - A session *subscribes* with its first pr-in, pr-out or pr-ack.  Every
 *    change is pushed ("pr-update", with a sequence number "seq") to every
 *    subscribed session of the lock-space.  Only "pr-ack" acknowledges a
 *    state: the reply to a pr-in does not (a node that reconnects while
 *    its writes in flight keep it from acknowledging asks for the state
 *    again, and must still drain them first).
 *  - A pr-out that changed the state is answered only once (a) the state
 *    file (or etcd) holds the new state and (b) every subscribed session of
 *    the lock-space has acknowledged it ("pr-ack" with that seq) or lost
 *    its lease (it stops I/O before the coordinator notices the lapse,
 *    docs/design.rst).  A disconnected session is waited for until it comes
 *    back (and gets the state with its welcome) or its lease lapses.
 *  - A session that has not acknowledged within --pr-ack-timeout-ms is
 *    expired, like a lapsed lease; the change still waits until the lease
 *    it had ends (by then its client has stopped I/O on its own).
 *  - A pr-out with a "request" number is remembered per client-id and
 *    lock-space (its last PR_REQUESTS_KEPT ones, in a table of the server
 *    that outlives a forgotten empty state, and in the state file with the
 *    lock-space's reservation entry, pr_append_requests()): the same
 *    request again (a client retrying after its connection dropped, or
 *    after a restart) is answered with the first result instead of being
 *    applied twice.
 *  - PREEMPT AND ABORT also ends every session of the preempted client-ids
 *    in the lock-space once they acknowledged: their locks go (like
 *    release-session), and they get "session-expired".  An expired one
 *    (no acknowledgement) keeps its locks until the fence margin.
 *
 * The state is kept while the lock-space has no sessions, and is saved in
 * the state file's "reservations" member with the epoch.  A lock-space
 * whose state is empty (no registration, no reservation, no pr-out
 * waiting) and that has no session any more is forgotten (its memory
 * freed, left out of the state file, which means the same: no
 * registration); the seq of a later state there goes on from the highest
 * one forgotten, so that no client sees it go back.
 *
 * Registrations are counted per identity (the one whose session made the
 * client-id's registration, its "owner"): a new registration beyond the
 * identity's "max-registrations" in the lock-space, or in a lock-space
 * beyond its "max-lock-spaces" with registrations (policy.h), is refused
 * with insufficient-registration-resources, like one beyond the
 * lock-space's EXTLOCK_PR_MAX_REGISTRANTS, so one identity cannot take
 * every slot nor leave state in ever more lock-spaces.  The owners are
 * saved with the state ("owners"), so the limits hold after a restart or
 * an HA takeover.
 */
#include <inttypes.h>
#include <limits.h>
#include <string.h>
#include <glib.h>
#include <json-c/json.h>

#include "server-int.h"
#include "state-file.h"

/*
 * pr-outs of one session that may wait for their answer at once: each
 * queues a change and pushes a pr-update to every subscribed session, so
 * a client sending them without waiting must not pile them up in front of
 * the others (docs/extlockd.rst, "Limits")
 */
#define PR_MAX_PENDING_PER_SESSION 16

/* A pr-out whose state change waits for the state file and the acks */
typedef struct PrOp {
    char session[33];            /* who sent it */
    uint64_t conn_serial;        /* ... on this connection */
    bool has_id;
    uint64_t id;
    uint32_t generation;
    uint64_t seq;
    uint64_t state_gen;          /* state writer generation holding it */
    bool written;
    int64_t start_us;            /* pushed at (for the ack timeout) */
    char *client_id;             /* of the sender */
    uint64_t request;            /* the sender's request number, or 0 */
    GPtrArray *abort;            /* PREEMPT AND ABORT: preempted client-ids */
} PrOp;

/* server->pr */
struct ExtlockdPrTable {
    GHashTable *spaces;          /* lock-space name -> ExtlockdPr */
    uint64_t seq_floor;          /* highest seq of a forgotten state */
    bool checking;               /* in reservation_check_all() */
    bool again;                  /* ... and asked to check again */
    guint later;                 /* reservation_check_later()'s source */
    /*
     * lock-space + client-id -> PrRequests: kept apart from the states,
     * so that a retry is recognised after an empty state was forgotten
     */
    GHashTable *requests;
    uint64_t requests_clock;     /* stamps PrRequests.used */
};

typedef struct ExtlockdPr {
    char *space;                 /* lock-space name */
    ExtlockPrState state;
    uint64_t seq;                /* bumped by every change */
    uint64_t seq_base;           /* seq when created: no change since */
    GHashTable *owners;          /* registered client-id -> identity */
    GQueue ops;                  /* PrOp, in seq order */
} ExtlockdPr;

/* A numbered pr-out of a client-id and its result */
typedef struct PrRequest {
    uint64_t request;            /* 0: unused */
    ExtlockPrStatus result;
    uint32_t generation;
    uint64_t seq;
} PrRequest;

/*
 * The last PR_REQUESTS_KEPT numbered pr-outs of a client-id: a guest may
 * have several in flight when the connection drops, and each is retried
 */
#define PR_REQUESTS_KEPT    16

typedef struct PrRequests {
    PrRequest r[PR_REQUESTS_KEPT];
    unsigned next;               /* the slot the next one takes */
    uint64_t used;               /* last new request (ExtlockdPrTable) */
} PrRequests;

static void pr_op_free(PrOp *op)
{
    if (op->abort) {
        g_ptr_array_unref(op->abort);
    }
    g_free(op->client_id);
    g_free(op);
}

static void pr_free(gpointer p)
{
    ExtlockdPr *pr = p;
    PrOp *op;

    while ((op = g_queue_pop_head(&pr->ops))) {
        pr_op_free(op);
    }
    extlock_pr_destroy(&pr->state);
    g_hash_table_destroy(pr->owners);
    g_free(pr->space);
    g_free(pr);
}

void reservation_init(ExtlockdServer *server)
{
    server->pr = g_new0(struct ExtlockdPrTable, 1);
    server->pr->spaces = g_hash_table_new_full(g_str_hash, g_str_equal,
                                               NULL, pr_free);
    server->pr->requests = g_hash_table_new_full(g_str_hash, g_str_equal,
                                                 g_free, g_free);
}

void reservation_fini(ExtlockdServer *server)
{
    if (server->pr) {
        g_clear_handle_id(&server->pr->later, g_source_remove);
        g_hash_table_destroy(server->pr->spaces);
        g_hash_table_destroy(server->pr->requests);
        g_clear_pointer(&server->pr, g_free);
    }
}

static ExtlockdPr *pr_get(ExtlockdServer *server, const char *space)
{
    ExtlockdPr *pr = g_hash_table_lookup(server->pr->spaces, space);

    if (!pr) {
        pr = g_new0(ExtlockdPr, 1);
        pr->space = g_strdup(space);
        extlock_pr_init(&pr->state);
        g_queue_init(&pr->ops);
        pr->owners = g_hash_table_new_full(g_str_hash, g_str_equal,
                                           g_free, g_free);
        pr->seq = pr->seq_base = server->pr->seq_floor;
        g_hash_table_insert(server->pr->spaces, pr->space, pr);
    }
    return pr;
}

static void pr_fill_msg(ExtlockMsg *r, ExtlockdPr *pr)
{
    r->pr_seq = pr->seq;
    r->pr = &pr->state;
}

static void pr_send_update(ExtlockdSession *session, ExtlockdPr *pr)
{
    ExtlockMsg r;

    extlock_msg_init(&r, EXTLOCK_MSG_PR_UPDATE);
    pr_fill_msg(&r, pr);
    conn_send_msg(session->conn, &r);
}

static void pr_subscribe(ExtlockdSession *session)
{
    if (!session->pr_subscribed) {
        session->pr_subscribed = true;
        session->pr_since_us = g_get_monotonic_time();
    }
}

/*
 * Does the change with @seq still wait for @session?  Until it acknowledged
 * it, or its lease ended: an expired session (lapsed lease, ack timeout)
 * is waited for until the lease it had would have ended
 */
static bool pr_waits_for(ExtlockdSession *session, ExtlockdPr *pr,
                         uint64_t seq, int64_t now)
{
    return session->pr_subscribed && session->pr_acked < seq &&
           (session->state != SESSION_EXPIRED ||
            now < session->deadline_us) &&
           strcmp(session->space->name, pr->space) == 0;
}

/*
 * End every session of @client_id in @pr's lock-space (PREEMPT AND ABORT
 * of change @seq).  Only a session that acknowledged @seq is known to have
 * drained its writes: its locks go at once.  One whose lease lapsed
 * instead (the change waited for that) may still have writes in flight:
 * its locks go by the lease rule, at its deadline plus the fence margin
 * and after the fence agent, like any lapsed session's.  A connected one
 * that never subscribed is expired the same way.
 */
static void pr_abort_client(ExtlockdServer *server, ExtlockdPr *pr,
                            const char *client_id, uint64_t seq)
{
    g_autoptr(GPtrArray) ids = g_ptr_array_new_with_free_func(g_free);

    for (GList *l = server->session_list.head; l; l = l->next) {
        ExtlockdSession *session = l->data;

        if (strcmp(session->client_id, client_id) == 0 &&
            strcmp(session->space->name, pr->space) == 0 &&
            session->state != SESSION_EXPIRED &&
            !session->grace_fenced) {
            g_ptr_array_add(ids, g_strdup(session->id));
        }
    }
    for (guint i = 0; i < ids->len; i++) {
        ExtlockdSession *session = g_hash_table_lookup(server->sessions,
                                                       ids->pdata[i]);

        if (!session) {
            continue;
        }
        if (session->pr_acked >= seq) {
            session_abort(session, "preempted by PERSISTENT RESERVE OUT "
                          "PREEMPT AND ABORT");
        } else if (session->state == SESSION_ACTIVE) {
            g_warning("session %s (%s, lock-space %s) preempted by "
                      "PERSISTENT RESERVE OUT PREEMPT AND ABORT without "
                      "having applied it: expiring it", session->id,
                      session->client_id, pr->space);
            session_expire(session);
        }
    }
}

/* Answer the pr-outs of @pr whose change every session has applied */
static void pr_check(ExtlockdServer *server, ExtlockdPr *pr)
{
    int64_t now = g_get_monotonic_time();
    PrOp *op;

    while ((op = g_queue_peek_head(&pr->ops)) && op->written) {
        ExtlockdSession *from;
        ExtlockMsg r;

        for (GList *l = server->session_list.head; l; l = l->next) {
            ExtlockdSession *s = l->data;

            if (pr_waits_for(s, pr, op->seq, now)) {
                if (s->state == SESSION_EXPIRED) {
                    server_schedule(server, s->deadline_us);
                }
                return;
            }
        }
        g_queue_pop_head(&pr->ops);
        if (g_queue_is_empty(&pr->ops) &&
            !g_hash_table_contains(server->spaces, pr->space)) {
            /* Its sessions went while it waited: forget it if empty */
            reservation_check_later(server);
        }
        for (guint i = 0; op->abort && i < op->abort->len; i++) {
            pr_abort_client(server, pr, op->abort->pdata[i], op->seq);
        }
        from = g_hash_table_lookup(server->sessions, op->session);
        if (from && from->conn && from->conn->serial == op->conn_serial) {
            extlock_msg_init(&r, EXTLOCK_MSG_PR_RESULT);
            r.has_id = op->has_id;
            r.id = op->id;
            r.pr_result = EXTLOCK_PR_OK;
            r.pr_generation = op->generation;
            r.pr_seq = op->seq;
            conn_send_msg(from->conn, &r);
        }
        pr_op_free(op);
    }
}

/*
 * Answering a pr-out may end sessions (PREEMPT AND ABORT), which checks
 * again: such nested checks are done by the outermost call, in a loop.
 */
void reservation_check_all(ExtlockdServer *server)
{
    GHashTableIter iter;
    gpointer value;

    if (!server->pr || server->shutting_down) {
        return;
    }
    if (server->pr->checking) {
        server->pr->again = true;
        return;
    }
    server->pr->checking = true;
    do {
        server->pr->again = false;
        g_hash_table_iter_init(&iter, server->pr->spaces);
        while (g_hash_table_iter_next(&iter, NULL, &value)) {
            pr_check(server, value);
        }
    } while (server->pr->again);
    server->pr->checking = false;
}

static bool pr_state_empty(const ExtlockdPr *pr)
{
    return pr->state.registrants->len == 0 &&
           pr->state.type == EXTLOCK_PR_TYPE_NONE && !pr->state.holder;
}

/*
 * Forget the lock-spaces whose reservation state is empty and that have
 * no session (none can wait for a seq there, nor retry a pr-out by its
 * session); only from the main loop, never while walking the table
 */
static void reservation_sweep(ExtlockdServer *server)
{
    GHashTableIter iter;
    gpointer value;

    g_hash_table_iter_init(&iter, server->pr->spaces);
    while (g_hash_table_iter_next(&iter, NULL, &value)) {
        ExtlockdPr *pr = value;

        if (pr_state_empty(pr) && g_queue_is_empty(&pr->ops) &&
            !g_hash_table_contains(server->spaces, pr->space)) {
            server->pr->seq_floor = MAX(server->pr->seq_floor, pr->seq);
            VERBOSE(server, "lock-space %s: empty reservation state "
                    "forgotten (seq %" PRIu64 ")", pr->space, pr->seq);
            g_hash_table_iter_remove(&iter);
        }
    }
}

unsigned reservation_count(ExtlockdServer *server)
{
    return server->pr ? g_hash_table_size(server->pr->spaces) : 0;
}

static gboolean reservation_later_cb(gpointer opaque)
{
    ExtlockdServer *server = opaque;

    server->pr->later = 0;
    reservation_check_all(server);
    if (!server->pr->checking) {
        reservation_sweep(server);
    }
    return G_SOURCE_REMOVE;
}

void reservation_space_unused(ExtlockdServer *server, const char *space)
{
    if (server->pr && g_hash_table_contains(server->pr->spaces, space)) {
        reservation_check_later(server);
    }
}

/*
 * Answering a pr-out may end sessions (PREEMPT AND ABORT): a caller that
 * walks the sessions (the lease timer) must not have the next one freed
 * under it, so sessions that expire or go away check from the main loop,
 * as soon as it gets back there
 */
void reservation_check_later(ExtlockdServer *server)
{
    if (server->pr && !server->pr->later && !server->shutting_down) {
        server->pr->later = g_idle_add_full(G_PRIORITY_DEFAULT,
                                            reservation_later_cb, server,
                                            NULL);
    }
}

void reservation_state_written(ExtlockdServer *server, uint64_t gen, bool ok)
{
    GHashTableIter iter;
    gpointer value;

    if (!ok) {
        /* Retried with the next write; the pr-outs keep waiting */
        return;
    }
    g_hash_table_iter_init(&iter, server->pr->spaces);
    while (g_hash_table_iter_next(&iter, NULL, &value)) {
        ExtlockdPr *pr = value;

        for (GList *l = pr->ops.head; l; l = l->next) {
            PrOp *op = l->data;

            if (op->state_gen && op->state_gen <= gen) {
                op->written = true;
            }
        }
    }
    reservation_check_all(server);
}

/* The ack timeout of the server */
static int64_t pr_ack_timeout_us(ExtlockdServer *server)
{
    uint32_t ms = server->cfg.pr_ack_timeout_ms;

    return (int64_t)(ms ? ms : EXTLOCKD_DEFAULT_PR_ACK_TIMEOUT_MS) * 1000;
}

/*
 * Expire the sessions that did not acknowledge a change within the ack
 * timeout, counted from the push or, for a session that subscribed later
 * (and got the state in the reply to its pr-in), from its subscription;
 * returns the next time to look again (INT64_MAX: none)
 */
int64_t reservation_check_deadlines(ExtlockdServer *server, int64_t now)
{
    g_autoptr(GPtrArray) late = g_ptr_array_new_with_free_func(g_free);
    int64_t timeout_us = pr_ack_timeout_us(server);
    int64_t next = INT64_MAX;
    GHashTableIter iter;
    gpointer value;

    if (!server->pr || server->shutting_down) {
        return INT64_MAX;
    }
    g_hash_table_iter_init(&iter, server->pr->spaces);
    while (g_hash_table_iter_next(&iter, NULL, &value)) {
        ExtlockdPr *pr = value;

        for (GList *o = pr->ops.head; o; o = o->next) {
            PrOp *op = o->data;

            if (now < op->start_us + timeout_us) {
                next = MIN(next, op->start_us + timeout_us);
                continue;
            }
            for (GList *l = server->session_list.head; l; l = l->next) {
                ExtlockdSession *s = l->data;
                int64_t due = MAX(op->start_us, s->pr_since_us) + timeout_us;

                if (s->state == SESSION_EXPIRED ||
                    !pr_waits_for(s, pr, op->seq, now)) {
                    continue;
                }
                if (now < due) {
                    next = MIN(next, due);
                } else {
                    g_ptr_array_add(late, g_strdup(s->id));
                }
            }
        }
    }
    /* Expiring checks the pr-outs again: not while walking them */
    for (guint i = 0; i < late->len; i++) {
        ExtlockdSession *s = g_hash_table_lookup(server->sessions,
                                                 late->pdata[i]);

        if (!s || s->state == SESSION_EXPIRED) {
            continue;           /* listed twice */
        }
        g_warning("session %s (%s, lock-space %s) did not acknowledge a "
                  "persistent reservation change within %" PRId64 " ms: "
                  "expiring it; the change completes when its lease ends",
                  s->id, s->client_id, s->space->name, timeout_us / 1000);
        session_log_event(s, "pr-ack-timeout", NULL);
        session_expire_because(s, "no acknowledgement of a persistent "
                               "reservation change within "
                               "--pr-ack-timeout-ms");
        next = MIN(next, s->deadline_us);
    }
    return next;
}

void reservation_welcomed(ExtlockdSession *session)
{
    ExtlockdPr *pr = g_hash_table_lookup(session->server->pr->spaces,
                                         session->space->name);

    /* A session that comes back gets the state before anything else */
    if (session->pr_subscribed && pr && session->conn) {
        pr_send_update(session, pr);
    }
}

void reservation_handle_in(ExtlockdConn *conn, ExtlockdSession *session,
                           ExtlockMsg *m)
{
    ExtlockdPr *pr = pr_get(conn->server, session->space->name);
    uint64_t acked = session->pr_acked;
    ExtlockMsg r;

    pr_subscribe(session);
    /*
     * Not an acknowledgement: the client applies the state and drains the
     * writes it forbids, then sends pr-ack (a pr-out may wait for it)
     */
    extlock_msg_init(&r, EXTLOCK_MSG_PR_STATUS);
    r.has_id = m->has_id;
    r.id = m->id;
    pr_fill_msg(&r, pr);
    conn_send_msg(conn, &r);
    if (session->pr_acked != acked) {
        /* Only then can a pr-out be answered (a flood costs nothing) */
        reservation_check_all(conn->server);
    }
}

void reservation_handle_ack(ExtlockdConn *conn, ExtlockdSession *session,
                            ExtlockMsg *m)
{
    ExtlockdPr *pr = pr_get(conn->server, session->space->name);
    uint64_t acked = session->pr_acked;
    ExtlockMsg r;

    if (m->pr_seq > pr->seq) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_INVALID,
                        "pr-ack of seq %" PRIu64 ", but the reservation "
                        "state of %s is at %" PRIu64, m->pr_seq, pr->space,
                        pr->seq);
        return;
    }
    pr_subscribe(session);
    session->pr_acked = MAX(session->pr_acked, m->pr_seq);
    extlock_msg_init(&r, EXTLOCK_MSG_PR_ACKED);
    r.has_id = m->has_id;
    r.id = m->id;
    r.pr_seq = m->pr_seq;
    conn_send_msg(conn, &r);
    if (session->pr_acked != acked) {
        /* Only then can a pr-out be answered (a flood costs nothing) */
        reservation_check_all(conn->server);
    }
}

/*
 * Every client-id that ever sent a numbered pr-out has an entry per
 * lock-space, kept when its empty reservation state is forgotten (its
 * retry must still not be applied again).  Past PR_REQUESTS_MAX of them
 * in the server, the one whose last new request is the oldest goes.
 */
#define PR_REQUESTS_MAX     4096

static char *pr_requests_key(const char *space, const char *client_id)
{
    /* lock-space names and client-ids are printable: no newline */
    return g_strdup_printf("%s\n%s", space, client_id);
}

static PrRequests *pr_requests_find(ExtlockdServer *server,
                                    const char *space, const char *client_id)
{
    g_autofree char *key = pr_requests_key(space, client_id);

    return g_hash_table_lookup(server->pr->requests, key);
}

static PrRequests *pr_requests_get(ExtlockdServer *server,
                                   const char *space, const char *client_id)
{
    GHashTable *t = server->pr->requests;
    PrRequests *reqs = pr_requests_find(server, space, client_id);

    if (!reqs) {
        if (g_hash_table_size(t) >= PR_REQUESTS_MAX) {
            GHashTableIter iter;
            gpointer key, value, oldest = NULL;
            uint64_t used = UINT64_MAX;

            g_hash_table_iter_init(&iter, t);
            while (g_hash_table_iter_next(&iter, &key, &value)) {
                if (((PrRequests *)value)->used < used) {
                    used = ((PrRequests *)value)->used;
                    oldest = key;
                }
            }
            g_hash_table_remove(t, oldest);
        }
        reqs = g_new0(PrRequests, 1);
        g_hash_table_insert(t, pr_requests_key(space, client_id), reqs);
    }
    reqs->used = ++server->pr->requests_clock;
    return reqs;
}

/*
 * @m repeats one of the last numbered pr-outs of its client-id (up to
 * PR_REQUESTS_KEPT of them): if that one still
 * waits, its reply goes to @conn now; if it was answered, answer again.
 * Returns false if @m is a new request.
 */
static bool pr_retried(ExtlockdServer *server, ExtlockdPr *pr,
                       ExtlockdConn *conn, ExtlockdSession *session,
                       ExtlockMsg *m)
{
    PrRequests *reqs = pr_requests_find(server, pr->space,
                                        session->client_id);
    PrRequest *last = NULL;
    ExtlockMsg r;

    for (unsigned i = 0; reqs && i < PR_REQUESTS_KEPT; i++) {
        if (reqs->r[i].request == m->pr_request) {
            last = &reqs->r[i];
        }
    }
    if (!last) {
        return false;
    }
    g_message("lock-space %s: %s retried request %" PRIu64 " (%s, "
              "not applied again)", pr->space, session->client_id,
              m->pr_request, extlock_pr_status_name(last->result));
    for (GList *l = pr->ops.head; l; l = l->next) {
        PrOp *op = l->data;

        if (op->request == m->pr_request &&
            strcmp(op->client_id, session->client_id) == 0) {
            memcpy(op->session, session->id, sizeof(op->session));
            op->conn_serial = conn->serial;
            op->has_id = m->has_id;
            op->id = m->id;
            session->pr_acked = MAX(session->pr_acked, op->seq);
            reservation_check_all(server);
            return true;
        }
    }
    extlock_msg_init(&r, EXTLOCK_MSG_PR_RESULT);
    r.has_id = m->has_id;
    r.id = m->id;
    r.pr_result = last->result;
    r.pr_generation = last->generation;
    r.pr_seq = last->seq;
    conn_send_msg(conn, &r);
    return true;
}

/*
 * Would @req register @client_id anew in @pr's lock-space (@pr NULL: a
 * lock-space without reservation state)?  Only a REGISTER (from key 0) or
 * REGISTER AND IGNORE EXISTING KEY with a non-zero service action key of a
 * client-id that is not registered yet adds a registration.
 */
static bool pr_new_registration(ExtlockdPr *pr, const char *client_id,
                                const ExtlockPrOut *req)
{
    return (req->action == EXTLOCK_PR_REGISTER ||
            req->action == EXTLOCK_PR_REGISTER_AND_IGNORE) &&
           req->sa_key != 0 &&
           (req->action != EXTLOCK_PR_REGISTER || req->key == 0) &&
           !(pr && extlock_pr_find(&pr->state, client_id));
}

/* Does @identity own a registration in @pr? */
static bool pr_owned_by(ExtlockdPr *pr, const char *identity)
{
    GHashTableIter iter;
    gpointer value;

    g_hash_table_iter_init(&iter, pr->owners);
    while (g_hash_table_iter_next(&iter, NULL, &value)) {
        if (strcmp(value, identity) == 0) {
            return true;
        }
    }
    return false;
}

/*
 * Would @req register @session's client-id in a lock-space where its
 * identity has no registration yet, beyond the lock-spaces its
 * "max-lock-spaces" allows (policy.h)?  Then it is refused like a full
 * lock-space (insufficient-registration-resources: what the guest's SCSI
 * stack understands) and the log names the limit.  Registrations without
 * owner (a state file of an older extlockd) count for nobody.
 */
static bool pr_over_space_limit(ExtlockdServer *server, ExtlockdPr *pr,
                                ExtlockdConn *conn, ExtlockdSession *session,
                                const ExtlockPrOut *req)
{
    const char *identity = conn->identity ? conn->identity : "";
    unsigned limit = extlockd_policy_max_lock_spaces(server->policy,
                                                     identity);
    unsigned count = 0;
    GHashTableIter iter;
    gpointer value;

    if (limit == UINT_MAX ||
        !pr_new_registration(pr, session->client_id, req) ||
        (pr && pr_owned_by(pr, identity))) {
        return false;
    }
    g_hash_table_iter_init(&iter, server->pr->spaces);
    while (g_hash_table_iter_next(&iter, NULL, &value)) {
        count += pr_owned_by(value, identity);
    }
    if (count < limit) {
        return false;
    }
    server_log_refusal(server, "%s: lock-space %s: registration of %s "
                       "refused: identity %s already has registrations in %u "
                       "lock-spaces (its max-lock-spaces is %u)", conn->peer,
                       session->space->name, session->client_id, identity,
                       count, limit);
    return true;
}

/*
 * Would @req register @session's client-id anew beyond the limit of its
 * identity in @pr's lock-space?  Then it is refused like a full
 * lock-space (insufficient-registration-resources) and the log says why.
 */
static bool pr_over_limit(ExtlockdServer *server, ExtlockdPr *pr,
                          ExtlockdConn *conn, ExtlockdSession *session,
                          const ExtlockPrOut *req)
{
    const char *identity = conn->identity ? conn->identity : "";
    unsigned limit, count = 0;

    if (!pr_new_registration(pr, session->client_id, req)) {
        return false;
    }
    limit = extlockd_policy_max_registrations(server->policy, identity);
    if (limit >= EXTLOCK_PR_MAX_REGISTRANTS) {
        return false;           /* only the lock-space's own limit */
    }
    for (guint i = 0; i < pr->state.registrants->len; i++) {
        const ExtlockPrRegistrant *r = pr->state.registrants->pdata[i];
        const char *owner = g_hash_table_lookup(pr->owners, r->nexus);

        count += owner && strcmp(owner, identity) == 0;
    }
    if (count < limit) {
        return false;
    }
    server_log_refusal(server, "%s: lock-space %s: registration of %s "
                       "refused: identity %s already has %u registrations "
                       "there (its max-registrations is %u)", conn->peer,
                       pr->space, session->client_id, identity, count,
                       limit);
    return true;
}

/*
 * After a change: @client_id's registration (if any) belongs to the
 * identity that made it, or to @identity if it had no owner (one loaded
 * from an older state file); client-ids no longer registered have no
 * owner.  A session of another identity that may use the same client-id
 * does not take the registration over: it would escape that identity's
 * limits.
 */
static gboolean pr_owner_unregistered(gpointer key, gpointer value,
                                      gpointer opaque)
{
    ExtlockdPr *pr = opaque;

    return !extlock_pr_find(&pr->state, key);
}

static void pr_note_owner(ExtlockdPr *pr, const char *client_id,
                          const char *identity)
{
    if (extlock_pr_find(&pr->state, client_id) &&
        !g_hash_table_contains(pr->owners, client_id)) {
        g_hash_table_insert(pr->owners, g_strdup(client_id),
                            g_strdup(identity ? identity : ""));
    }
    g_hash_table_foreach_remove(pr->owners, pr_owner_unregistered, pr);
}

void reservation_handle_out(ExtlockdConn *conn, ExtlockdSession *session,
                            ExtlockMsg *m)
{
    ExtlockdServer *server = conn->server;
    ExtlockdPr *pr = pr_get(server, session->space->name);
    g_autoptr(GPtrArray) preempted = g_ptr_array_new_with_free_func(g_free);
    ExtlockPrOut req = {
        .action = m->pr_action,
        .type = m->pr_type,
        .key = m->pr_key,
        .sa_key = m->pr_sa_key,
        .aptpl = m->aptpl,
    };
    ExtlockPrStatus st;
    PrRequests *reqs;
    PrRequest *last;
    unsigned pending = 0;
    PrOp *op;

    for (GList *l = pr->ops.head; l; l = l->next) {
        pending += strcmp(((PrOp *)l->data)->session, session->id) == 0;
    }
    if (pending >= PR_MAX_PENDING_PER_SESSION) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_LIMIT,
                        "session has %u pr-out requests waiting for their "
                        "answer (limit %u): wait for one", pending,
                        PR_MAX_PENDING_PER_SESSION);
        return;
    }
    pr_subscribe(session);
    if (m->pr_request &&
        pr_retried(server, pr, conn, session, m)) {
        return;
    }
    if (pr_over_limit(server, pr, conn, session, &req) ||
        pr_over_space_limit(server, pr, conn, session, &req)) {
        st = EXTLOCK_PR_NO_RESOURCES;
    } else {
        st = extlock_pr_out(&pr->state, session->client_id, &req, preempted);
    }
    if (st == EXTLOCK_PR_OK) {
        pr_note_owner(pr, session->client_id, conn->identity);
    }
    if (m->pr_request) {
        reqs = pr_requests_get(server, pr->space, session->client_id);
        last = &reqs->r[reqs->next++ % PR_REQUESTS_KEPT];
        last->request = m->pr_request;
        last->result = st;
        last->generation = pr->state.generation;
        last->seq = pr->seq + (st == EXTLOCK_PR_OK);
    }
    if (st != EXTLOCK_PR_OK) {
        ExtlockMsg r;

        /* Changes nothing: a flood of them must not flood the log */
        VERBOSE(server, "lock-space %s: %s %s by %s: %s (generation %u)",
                pr->space, extlock_pr_action_name(req.action),
                req.type ? extlock_pr_type_name(req.type) : "",
                session->client_id, extlock_pr_status_name(st),
                pr->state.generation);
        extlock_msg_init(&r, EXTLOCK_MSG_PR_RESULT);
        r.has_id = m->has_id;
        r.id = m->id;
        r.pr_result = st;
        r.pr_generation = pr->state.generation;
        r.pr_seq = pr->seq;
        conn_send_msg(conn, &r);
        return;
    }

    g_message("lock-space %s: %s %s by %s: %s (generation %u)", pr->space,
              extlock_pr_action_name(req.action),
              req.type ? extlock_pr_type_name(req.type) : "",
              session->client_id, extlock_pr_status_name(st),
              pr->state.generation);
    /* Push the new state to every subscriber, save it, wait for both */
    pr->seq++;
    session->pr_acked = pr->seq;     /* the reply tells the sender */
    for (GList *l = server->session_list.head; l; l = l->next) {
        ExtlockdSession *s = l->data;

        if (s != session && s->pr_subscribed && s->conn &&
            s->state == SESSION_ACTIVE &&
            strcmp(s->space->name, pr->space) == 0) {
            pr_send_update(s, pr);
        }
    }
    /* The sender gets the update too: its driver applies it like others */
    pr_send_update(session, pr);

    op = g_new0(PrOp, 1);
    memcpy(op->session, session->id, sizeof(op->session));
    op->conn_serial = conn->serial;
    op->has_id = m->has_id;
    op->id = m->id;
    op->generation = pr->state.generation;
    op->seq = pr->seq;
    op->start_us = g_get_monotonic_time();
    op->client_id = g_strdup(session->client_id);
    op->request = m->pr_request;
    server_schedule(server, op->start_us + pr_ack_timeout_us(server));
    if (req.action == EXTLOCK_PR_PREEMPT_AND_ABORT && preempted->len) {
        op->abort = g_steal_pointer(&preempted);
    }
    g_queue_push_tail(&pr->ops, op);
    op->state_gen = server_save_state_async(server);
    if (!op->state_gen) {
        /* not even formatted: answered after the next successful write */
        g_warning("lock-space %s: the reservation change waits for the "
                  "state file", pr->space);
    }
}

/*
 * State file: "reservations":[{"lock-space":S, <the members of a
 * pr-status>, "requests":[...], "owners":[...]}, ...], lock-spaces that
 * never had a registration left out
 */
/*
 * The numbered pr-outs of @pr's client-ids as a "requests" member, each
 * client-id's oldest first: a coordinator restarted (or a new HA leader)
 * answers a retry of one of them with its first result instead of
 * applying it again.  They are written with the change they made (the
 * state is written before a change is answered).
 */
static void pr_append_requests(ExtlockdServer *server, ExtlockdPr *pr,
                               GString *out)
{
    g_autofree char *prefix = pr_requests_key(pr->space, "");
    size_t prefix_len = strlen(prefix);
    GHashTableIter iter;
    gpointer key, value;
    bool first = true;

    g_hash_table_iter_init(&iter, server->pr->requests);
    while (g_hash_table_iter_next(&iter, &key, &value)) {
        PrRequests *reqs = value;
        json_object *cid;
        const char *cid_text;

        if (strncmp(key, prefix, prefix_len) != 0) {
            continue;           /* another lock-space's */
        }
        cid = json_object_new_string((const char *)key + prefix_len);
        cid_text = json_object_to_json_string_ext(
            cid, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
        for (unsigned i = 0; i < PR_REQUESTS_KEPT; i++) {
            PrRequest *r = &reqs->r[(reqs->next + i) % PR_REQUESTS_KEPT];

            if (!r->request) {
                continue;
            }
            g_string_append(out, first ? ",\"requests\":[" : ",");
            first = false;
            g_string_append_printf(out, "{\"client-id\":%s,\"request\":%"
                                   PRIu64 ",\"result\":\"%s\","
                                   "\"generation\":%u,\"seq\":%" PRIu64 "}",
                                   cid_text, r->request,
                                   extlock_pr_status_name(r->result),
                                   r->generation, r->seq);
        }
        json_object_put(cid);
    }
    if (!first) {
        g_string_append_c(out, ']');
    }
}

/* A JSON string of @text, appended to @out */
static void pr_append_string(GString *out, const char *text)
{
    json_object *str = json_object_new_string(text);

    g_string_append(out, json_object_to_json_string_ext(
                        str, JSON_C_TO_STRING_PLAIN |
                        JSON_C_TO_STRING_NOSLASHESCAPE));
    json_object_put(str);
}

/*
 * The identity that owns each registration of @pr, as an "owners" member
 * in registration order: a coordinator restarted (or a new HA leader)
 * still counts it against that identity's max-registrations and
 * max-lock-spaces.  Registrations without owner are left out.
 */
static void pr_append_owners(ExtlockdPr *pr, GString *out)
{
    bool first = true;

    for (guint i = 0; i < pr->state.registrants->len; i++) {
        const ExtlockPrRegistrant *r = pr->state.registrants->pdata[i];
        const char *owner = g_hash_table_lookup(pr->owners, r->nexus);

        if (!owner || !owner[0]) {
            continue;
        }
        g_string_append(out, first ? ",\"owners\":[" : ",");
        first = false;
        g_string_append(out, "{\"client-id\":");
        pr_append_string(out, r->nexus);
        g_string_append(out, ",\"identity\":");
        pr_append_string(out, owner);
        g_string_append_c(out, '}');
    }
    if (!first) {
        g_string_append_c(out, ']');
    }
}

void reservation_append_state(ExtlockdServer *server, GString *out)
{
    GHashTableIter iter;
    gpointer value;
    bool first = true;

    if (!server->pr->spaces) {
        return;
    }
    g_hash_table_iter_init(&iter, server->pr->spaces);
    while (g_hash_table_iter_next(&iter, NULL, &value)) {
        ExtlockdPr *pr = value;
        g_autoptr(GString) line = g_string_new(NULL);
        ExtlockMsg r;
        const char *body;

        if (pr->seq == pr->seq_base) {
            continue;           /* no change: same as no entry */
        }
        extlock_msg_init(&r, EXTLOCK_MSG_PR_UPDATE);
        pr_fill_msg(&r, pr);
        extlock_msg_format(&r, line);
        /* {"type":"pr-update",<members>}\n -> {"lock-space":S,<members>} */
        body = strchr(line->str, ',');
        g_string_append(out, first ? ",\"reservations\":[" : ",");
        first = false;
        g_string_append(out, "{\"lock-space\":");
        {
            json_object *name = json_object_new_string(pr->space);

            g_string_append(out, json_object_to_json_string_ext(
                                name, JSON_C_TO_STRING_PLAIN |
                                JSON_C_TO_STRING_NOSLASHESCAPE));
            json_object_put(name);
        }
        g_string_append_len(out, body, strlen(body) - 2);   /* no "}\n" */
        pr_append_requests(server, pr, out);
        pr_append_owners(pr, out);
        g_string_append_c(out, '}');
    }
    if (!first) {
        g_string_append_c(out, ']');
    }
}

/* Integer member @name of the state object @obj */
static bool pr_state_int(json_object *obj, const char *name, int64_t *value)
{
    json_object *v;

    if (!json_object_object_get_ex(obj, name, &v) ||
        !json_object_is_type(v, json_type_int)) {
        return false;
    }
    *value = json_object_get_int64(v);
    return true;
}

/*
 * Load the "requests" member of a reservation entry into @pr (replacing
 * what it had), oldest first as pr_append_requests() wrote them
 */
static bool pr_load_requests(ExtlockdServer *server, ExtlockdPr *pr,
                             json_object *arr, GError **errp)
{
    g_autofree char *prefix = pr_requests_key(pr->space, "");
    size_t prefix_len = strlen(prefix);
    GHashTableIter iter;
    gpointer key;

    g_hash_table_iter_init(&iter, server->pr->requests);
    while (g_hash_table_iter_next(&iter, &key, NULL)) {
        if (strncmp(key, prefix, prefix_len) == 0) {
            g_hash_table_iter_remove(&iter);
        }
    }
    if (!arr) {
        return true;
    }
    if (!json_object_is_type(arr, json_type_array)) {
        goto bad;
    }
    for (size_t i = 0; i < json_object_array_length(arr); i++) {
        json_object *e = json_object_array_get_idx(arr, i);
        json_object *cid, *res;
        int64_t request, generation, seq;
        ExtlockPrStatus result;
        PrRequests *reqs;
        PrRequest *r;

        if (!json_object_is_type(e, json_type_object) ||
            !json_object_object_get_ex(e, "client-id", &cid) ||
            !json_object_is_type(cid, json_type_string) ||
            json_object_get_string_len(cid) == 0 ||
            !json_object_object_get_ex(e, "result", &res) ||
            !json_object_is_type(res, json_type_string) ||
            !extlock_pr_status_parse(json_object_get_string(res), &result) ||
            !pr_state_int(e, "request", &request) || request <= 0 ||
            !pr_state_int(e, "generation", &generation) || generation < 0 ||
            generation > UINT32_MAX ||
            !pr_state_int(e, "seq", &seq) || seq < 0) {
            goto bad;
        }
        reqs = pr_requests_get(server, pr->space, json_object_get_string(cid));
        r = &reqs->r[reqs->next++ % PR_REQUESTS_KEPT];
        r->request = (uint64_t)request;
        r->result = result;
        r->generation = (uint32_t)generation;
        r->seq = (uint64_t)seq;
    }
    return true;
bad:
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                "state: reservation of %s: \"requests\" must be an array of "
                "{\"client-id\",\"request\",\"result\",\"generation\","
                "\"seq\"}", pr->space);
    return false;
}

/*
 * Load the "owners" member of a reservation entry into @pr (replacing
 * what it had): each registered client-id at most once, with a non-empty
 * identity.  Without it (a file of an older extlockd) the registrations
 * have no owner until reservation_restore_owners().
 */
static bool pr_load_owners(ExtlockdPr *pr, json_object *arr, GError **errp)
{
    g_hash_table_remove_all(pr->owners);
    if (!arr) {
        return true;
    }
    if (!json_object_is_type(arr, json_type_array)) {
        goto bad;
    }
    for (size_t i = 0; i < json_object_array_length(arr); i++) {
        json_object *e = json_object_array_get_idx(arr, i);
        json_object *cid, *identity;

        if (!json_object_is_type(e, json_type_object) ||
            !json_object_object_get_ex(e, "client-id", &cid) ||
            !json_object_is_type(cid, json_type_string) ||
            !json_object_object_get_ex(e, "identity", &identity) ||
            !json_object_is_type(identity, json_type_string) ||
            json_object_get_string_len(identity) == 0 ||
            !extlock_pr_find(&pr->state, json_object_get_string(cid)) ||
            g_hash_table_contains(pr->owners, json_object_get_string(cid))) {
            goto bad;
        }
        g_hash_table_insert(pr->owners,
                            g_strdup(json_object_get_string(cid)),
                            g_strdup(json_object_get_string(identity)));
    }
    return true;
bad:
    g_hash_table_remove_all(pr->owners);
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                "state: reservation of %s: \"owners\" must be an array of "
                "{\"client-id\",\"identity\"}, one per registered client-id "
                "at most", pr->space);
    return false;
}

bool reservation_load(ExtlockdServer *server, const char *data, size_t len,
                      GError **errp)
{
    json_object *arr;
    json_object *obj = extlockd_state_member_array(data, len, "reservations",
                                                   &arr, errp);
    g_autoptr(GHashTable) seen = g_hash_table_new(g_str_hash, g_str_equal);
    bool ok = false;

    if (!obj) {
        return false;
    }
    if (!arr) {
        ok = true;
        goto out;
    }
    for (size_t i = 0; i < json_object_array_length(arr); i++) {
        json_object *e = json_object_array_get_idx(arr, i);
        json_object *name, *requests = NULL, *owners = NULL;
        const char *text;
        ExtlockProtoError err;
        ExtlockMsg m;
        ExtlockdPr *pr;

        if (!json_object_is_type(e, json_type_object) ||
            !json_object_object_get_ex(e, "lock-space", &name) ||
            !json_object_is_type(name, json_type_string) ||
            !g_hash_table_add(seen, (char *)json_object_get_string(name))) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "state: reservation %zu has no or a duplicate "
                        "\"lock-space\"", i);
            goto out;
        }
        /* The numbered pr-outs and the owners are not part of a pr-update */
        if (json_object_object_get_ex(e, "requests", &requests)) {
            json_object_get(requests);
            json_object_object_del(e, "requests");
        }
        if (json_object_object_get_ex(e, "owners", &owners)) {
            json_object_get(owners);
            json_object_object_del(e, "owners");
        }
        /* Validated by the codec, as a pr-update */
        json_object_object_add(e, "type",
                               json_object_new_string("pr-update"));
        text = json_object_to_json_string_ext(e, JSON_C_TO_STRING_PLAIN);
        if (!extlock_msg_parse(text, strlen(text), &m, &err)) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "state: reservation of %s: %s",
                        json_object_get_string(name), err.message);
            json_object_put(requests);
            json_object_put(owners);
            goto out;
        }
        /* what a former term of this leader left is replaced */
        pr = pr_get(server, json_object_get_string(name));
        extlock_pr_destroy(&pr->state);
        pr->state = *m.pr;
        g_free(m.pr);
        m.pr = NULL;
        pr->seq = m.pr_seq;
        pr->seq_base = 0;
        extlock_msg_clear(&m);
        ok = pr_load_owners(pr, owners, errp) &&
             pr_load_requests(server, pr, requests, errp);
        json_object_put(owners);
        json_object_put(requests);
        if (!ok) {
            goto out;
        }
    }
    /* No entry in the state is no registration: a former term's goes */
    {
        GHashTableIter iter;
        gpointer value;

        g_hash_table_iter_init(&iter, server->pr->spaces);
        while (g_hash_table_iter_next(&iter, NULL, &value)) {
            ExtlockdPr *pr = value;

            if (!g_hash_table_contains(seen, pr->space) &&
                !pr_state_empty(pr)) {
                extlock_pr_destroy(&pr->state);
                extlock_pr_init(&pr->state);
                g_hash_table_remove_all(pr->owners);
            }
        }
    }
    ok = true;
out:
    json_object_put(obj);
    return ok;
}

/*
 * A state file of an older extlockd has no "owners": after a restart (or
 * an HA takeover), each loaded registration without a saved owner belongs
 * to the "owner" of a saved session of its client-id in its lock-space
 * (@sessions: ExtlockdStateSession), so that its identity's limits still
 * count it.  One without either stays without owner.
 */
void reservation_restore_owners(ExtlockdServer *server, GPtrArray *sessions)
{
    for (guint i = 0; sessions && i < sessions->len; i++) {
        const ExtlockdStateSession *ss = sessions->pdata[i];
        ExtlockdPr *pr = g_hash_table_lookup(server->pr->spaces,
                                             ss->lock_space);

        if (pr && ss->owner && extlock_pr_find(&pr->state, ss->client_id) &&
            !g_hash_table_contains(pr->owners, ss->client_id)) {
            g_hash_table_insert(pr->owners, g_strdup(ss->client_id),
                                g_strdup(ss->owner));
        }
    }
}

void reservation_status(ExtlockdServer *server, const char *space,
                        json_object *into)
{
    ExtlockdPr *pr = g_hash_table_lookup(server->pr->spaces, space);
    g_autoptr(GString) line = NULL;
    ExtlockMsg r;
    json_object *obj;

    if (!pr || pr->seq == pr->seq_base) {
        return;
    }
    line = g_string_new(NULL);
    extlock_msg_init(&r, EXTLOCK_MSG_PR_UPDATE);
    pr_fill_msg(&r, pr);
    extlock_msg_format(&r, line);
    obj = json_tokener_parse(line->str);
    if (obj) {
        json_object_object_del(obj, "type");
        json_object_object_add(into, "reservation", obj);
    }
}
