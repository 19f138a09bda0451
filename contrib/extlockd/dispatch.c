/*
 * extlockd: request dispatch
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * One request line: parse it (extlock/protocol.h), look its type up in
 * dispatch_table, check that this connection may send it, and call its
 * handler in session.c, lockspace.c or status.c.  A line that does not
 * parse, a message type that is not a request (a reply or notification
 * type) and a refused request all get an error reply and change nothing.
 *
 * Who may send what (docs/protocol.rst, docs/extlockd.rst):
 *   DISPATCH_ANYONE           hello, bye
 *   DISPATCH_SESSION          lock, unlock, cancel, renew, downgrade,
 *                             reclaim, reclaim-done, pr-out, pr-in,
 *                             pr-ack: after hello only
 *   DISPATCH_SESSION_OR_ADMIN status: after hello, or an admin identity
 *                             (extlockctl on the UNIX socket) without one
 *   DISPATCH_ADMIN            release-session
 *
 * Once the peer of a connection is gone (it hung up while its input was
 * paused, or a write to it failed), what it sent last is still read, but
 * only the requests that give something up are applied:
 * dispatch_after_gone().
 */
#include <inttypes.h>
#include <glib.h>

#include "server-int.h"

typedef enum DispatchAccess {
    DISPATCH_ANYONE,
    DISPATCH_SESSION,
    DISPATCH_SESSION_OR_ADMIN,
    DISPATCH_ADMIN,
} DispatchAccess;

/*
 * A request handler: @conn sent @m, and @session is the session attached
 * to @conn (never NULL for DISPATCH_SESSION requests, else maybe NULL)
 */
typedef void DispatchHandler(ExtlockdConn *conn, ExtlockdSession *session,
                             ExtlockMsg *m);

typedef struct DispatchEntry {
    DispatchHandler *handler;    /* NULL: not a request */
    DispatchAccess access;
} DispatchEntry;

static const DispatchEntry dispatch_table[EXTLOCK_MSG__MAX] = {
    [EXTLOCK_MSG_HELLO] = { session_handle_hello, DISPATCH_ANYONE },
    [EXTLOCK_MSG_BYE] = { session_handle_bye, DISPATCH_ANYONE },
    [EXTLOCK_MSG_STATUS] = { status_handle, DISPATCH_SESSION_OR_ADMIN },
    [EXTLOCK_MSG_RELEASE_SESSION] = { session_handle_release,
                                      DISPATCH_ADMIN },
    [EXTLOCK_MSG_LOCK] = { lockspace_handle_lock, DISPATCH_SESSION },
    [EXTLOCK_MSG_UNLOCK] = { lockspace_handle_unlock, DISPATCH_SESSION },
    [EXTLOCK_MSG_CANCEL] = { lockspace_handle_cancel, DISPATCH_SESSION },
    [EXTLOCK_MSG_RENEW] = { session_handle_renew, DISPATCH_SESSION },
    [EXTLOCK_MSG_DOWNGRADE] = { lockspace_handle_downgrade,
                                DISPATCH_SESSION },
    [EXTLOCK_MSG_RECLAIM] = { lockspace_handle_reclaim, DISPATCH_SESSION },
    [EXTLOCK_MSG_RECLAIM_DONE] = { lockspace_handle_reclaim_done,
                                   DISPATCH_SESSION },
    [EXTLOCK_MSG_PR_OUT] = { reservation_handle_out, DISPATCH_SESSION },
    [EXTLOCK_MSG_PR_IN] = { reservation_handle_in, DISPATCH_SESSION },
    [EXTLOCK_MSG_PR_ACK] = { reservation_handle_ack, DISPATCH_SESSION },
};

/*
 * May @conn send @m, which needs @access?  If not, say why (the reply,
 * and a rate-limited log line for refusals of who sent it) and return
 * false.
 */
static bool dispatch_allowed(ExtlockdConn *conn, const ExtlockMsg *m,
                             DispatchAccess access)
{
    ExtlockdServer *server = conn->server;
    const char *type = extlock_msg_type_name(m->type);

    switch (access) {
    case DISPATCH_ANYONE:
        return true;
    case DISPATCH_SESSION:
        if (!conn->session) {
            conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_STATE,
                            "%s before hello", type);
            return false;
        }
        return true;
    case DISPATCH_SESSION_OR_ADMIN:
        if (!conn->session &&
            !extlockd_policy_is_admin(server->policy, conn->identity)) {
            server_log_refusal(server,
                               "%s: %s refused: identity %s is not an "
                               "admin and has not said hello", conn->peer,
                               type, conn->identity);
            conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_DENIED,
                            "%s before hello needs an admin identity (this "
                            "connection is %s)", type, conn->identity);
            return false;
        }
        return true;
    case DISPATCH_ADMIN:
        /*
         * release-session gives up the fencing guarantee for somebody
         * else's locks: only admins may, and the refusal changes nothing
         * (the session is not even looked up, so its existence is not
         * revealed either)
         */
        if (!conn->identity ||
            !extlockd_policy_is_admin(server->policy, conn->identity)) {
            server_log_refusal(server,
                               "%s: %s of %s refused: identity %s is not "
                               "an admin", conn->peer, type, m->session,
                               conn->identity ? conn->identity : "(none)");
            conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_DENIED,
                            "%s needs an admin identity (this connection "
                            "is %s)", type,
                            conn->identity ? conn->identity
                                           : "unidentified");
            return false;
        }
        return true;
    }
    g_assert_not_reached();
}

/*
 * Does the policy let @conn's identity do what @m asks ("allow",
 * policy.h)?  Only lock, reclaim and pr-out need more than a session;
 * the policy now in force is asked, so a reload that takes an action
 * away applies to open sessions too.
 */
static bool dispatch_permitted(ExtlockdConn *conn, const ExtlockMsg *m)
{
    ExtlockdServer *server = conn->server;
    g_autofree char *why = NULL;
    ExtlockdAction action;
    bool whole;

    switch (m->type) {
    case EXTLOCK_MSG_LOCK:
    case EXTLOCK_MSG_RECLAIM:
        whole = m->offset == EXTLOCK_MAINT_OFFSET &&
                m->length == EXTLOCK_MAINT_LENGTH;
        if (m->mode == EXTLOCK_MODE_EXCLUSIVE) {
            action = whole ? EXTLOCKD_ACTION_MAINTAIN : EXTLOCKD_ACTION_WRITE;
        } else {
            action = whole ? EXTLOCKD_ACTION_FREEZE : EXTLOCKD_ACTION_READ;
        }
        break;
    case EXTLOCK_MSG_PR_OUT:
        action = EXTLOCKD_ACTION_RESERVE;
        break;
    default:
        return true;
    }
    if (extlockd_policy_may(server->policy, conn->identity, action, &why)) {
        return true;
    }
    server_log_refusal(server, "%s: %s refused: %s", conn->peer,
                       extlock_msg_type_name(m->type), why);
    conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_DENIED, "%s", why);
    return false;
}

/*
 * Is @m, from a connection whose peer is gone, still applied?  Only if it
 * gives up what its session has or waits for: unlock, bye, downgrade,
 * cancel, reclaim-done (the grace period need not wait for it, unless a
 * reclaim before it was dropped), and the
 * pr-ack of a session already subscribed (a pr-out need not wait for its
 * lease).  Nothing else is: a grant (lock, reclaim) would be held for
 * nobody until the lease ran out, a renew would keep a session alive
 * that nobody renews, a hello could take over a session that its client
 * has meanwhile resumed elsewhere, and a pr-out, a pr-ack that would
 * subscribe, status and release-session are for a requester that waits
 * for the answer, which can no longer be sent.
 */
static bool dispatch_after_gone(ExtlockdConn *conn, const ExtlockMsg *m)
{
    switch (m->type) {
    case EXTLOCK_MSG_UNLOCK:
    case EXTLOCK_MSG_BYE:
    case EXTLOCK_MSG_DOWNGRADE:
    case EXTLOCK_MSG_CANCEL:
        return true;
    case EXTLOCK_MSG_RECLAIM_DONE:
        /*
         * It says that the session has reclaimed all it holds: false once
         * one of its reclaims was dropped here, and the grace period must
         * not end on it (the client may still write under that extent
         * within the lease it had)
         */
        return !conn->gone_dropped_reclaim;
    case EXTLOCK_MSG_PR_ACK:
        return conn->session && conn->session->pr_subscribed;
    default:
        return false;
    }
}

void dispatch_line(ExtlockdConn *conn, const char *line, size_t len)
{
    ExtlockdServer *server = conn->server;
    const DispatchEntry *entry = NULL;
    ExtlockProtoError err;
    ExtlockMsg m;

    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    if (!extlock_msg_parse(line, len, &m, &err)) {
        if (conn->peer_gone) {
            conn->gone_dropped++;
            server->gone_dropped++;
            return;
        }
        conn_send_error(conn, m.has_id, m.id, err.code, "%s", err.message);
        return;
    }
    if (conn->peer_gone) {
        if (!dispatch_after_gone(conn, &m)) {
            VERBOSE(server, "%s: %s request %" PRIu64 " dropped: the peer "
                    "is gone", conn->peer, extlock_msg_type_name(m.type),
                    m.id);
            conn->gone_dropped++;
            server->gone_dropped++;
            if (m.type == EXTLOCK_MSG_RECLAIM) {
                conn->gone_dropped_reclaim = true;
            }
            extlock_msg_clear(&m);
            return;
        }
        conn->gone_applied++;
    }
    VERBOSE(server, "%s: %s request %" PRIu64, conn->peer,
            extlock_msg_type_name(m.type), m.id);

    if ((unsigned)m.type < EXTLOCK_MSG__MAX) {
        entry = &dispatch_table[m.type];
    }
    if (!entry || !entry->handler) {
        conn_send_error(conn, m.has_id, m.id, EXTLOCK_ERR_UNKNOWN_TYPE,
                        "\"%s\" is not a request",
                        extlock_msg_type_name(m.type));
    } else if (dispatch_allowed(conn, &m, entry->access) &&
               dispatch_permitted(conn, &m)) {
        entry->handler(conn, conn->session, &m);
    }
    if (server->maint_unrecorded.length) {
        /* Its grants that cannot be recorded go before the next request */
        lockspace_maint_undo(server);
    }
    extlock_msg_clear(&m);
}
