/*
 * extlockd: request dispatch
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * One request line: parse it (extlock/protocol.h), check that the
 * connection may send it, and call its handler in session.c,
 * lockspace.c or status.c.
 */
#include <inttypes.h>
#include <glib.h>

#include "server-int.h"

void dispatch_line(ExtlockdConn *conn, const char *line, size_t len)
{
    ExtlockdServer *server = conn->server;
    ExtlockdSession *session = conn->session;
    ExtlockProtoError err;
    ExtlockMsg m;

    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    if (!extlock_msg_parse(line, len, &m, &err)) {
        conn_send_error(conn, m.has_id, m.id, err.code, "%s", err.message);
        return;
    }
    VERBOSE(server, "%s: %s request %" PRIu64, conn->peer,
            extlock_msg_type_name(m.type), m.id);

    switch (m.type) {
    case EXTLOCK_MSG_HELLO:
        session_handle_hello(conn, &m);
        break;
    case EXTLOCK_MSG_STATUS:
        status_handle(conn, &m);
        break;
    case EXTLOCK_MSG_BYE:
        session_handle_bye(conn, &m);
        break;
    case EXTLOCK_MSG_RELEASE_SESSION:
        session_handle_release(conn, &m);
        break;
    case EXTLOCK_MSG_LOCK:
    case EXTLOCK_MSG_UNLOCK:
    case EXTLOCK_MSG_CANCEL:
    case EXTLOCK_MSG_RENEW:
    case EXTLOCK_MSG_DOWNGRADE:
    case EXTLOCK_MSG_RECLAIM:
    case EXTLOCK_MSG_RECLAIM_DONE:
        if (!session) {
            conn_send_error(conn, m.has_id, m.id, EXTLOCK_ERR_STATE,
                            "%s before hello", extlock_msg_type_name(m.type));
        } else if (m.type == EXTLOCK_MSG_LOCK) {
            lockspace_handle_lock(conn, session, &m);
        } else if (m.type == EXTLOCK_MSG_UNLOCK) {
            lockspace_handle_unlock(conn, session, &m);
        } else if (m.type == EXTLOCK_MSG_CANCEL) {
            lockspace_handle_cancel(conn, session, &m);
        } else if (m.type == EXTLOCK_MSG_RENEW) {
            session_handle_renew(conn, session, &m);
        } else if (m.type == EXTLOCK_MSG_DOWNGRADE) {
            lockspace_handle_downgrade(conn, session, &m);
        } else if (m.type == EXTLOCK_MSG_RECLAIM) {
            lockspace_handle_reclaim(conn, session, &m);
        } else {
            lockspace_handle_reclaim_done(conn, session, &m);
        }
        break;
    default:
        conn_send_error(conn, m.has_id, m.id, EXTLOCK_ERR_UNKNOWN_TYPE,
                        "\"%s\" is not a request",
                        extlock_msg_type_name(m.type));
        break;
    }
    extlock_msg_clear(&m);
}
