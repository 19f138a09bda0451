/*
 * extlockd: connections
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * One client socket each: non-blocking reads into a line buffer, lines
 * handed to dispatch.c, replies buffered in a GString and written out at
 * the end of the main loop callback (conn_flush_all()), the TLS
 * handshake and TLS I/O (tls.h), back-pressure (input stops while much
 * output is pending, and a client that does not read is disconnected),
 * the limits on connections that have not said hello, and closing.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <glib.h>

#include "ha.h"
#include "server-int.h"

#define READ_ROUNDS         4           /* reads per callback at most */
#define BACKPRESSURE_OUTPUT (1024 * 1024) /* stop reading above this */
#define CLOSE_TIMEOUT_US    (5 * G_USEC_PER_SEC)
/* What is read of a connection that hung up while its input was paused */
#define GONE_READ_MAX       (1024 * 1024)

/* The main loop source of a connection */
typedef struct ConnSource {
    GSource source;
    ExtlockdConn *conn;
} ConnSource;

GString *conn_out(ExtlockdConn *conn)
{
    if (!conn->dirty) {
        conn->dirty = true;
        g_queue_push_tail_link(&conn->server->dirty, &conn->dirty_link);
    }
    return conn->out;
}

void conn_urgent(ExtlockdConn *conn)
{
    GQueue *dirty = &conn->server->dirty;

    if (conn->dirty && dirty->head != &conn->dirty_link) {
        g_queue_unlink(dirty, &conn->dirty_link);
        g_queue_push_head_link(dirty, &conn->dirty_link);
    }
}

void conn_send_msg(ExtlockdConn *conn, const ExtlockMsg *msg)
{
    /* HA: nothing leaves a leader that cannot prove its etcd lease */
    if (conn->server->ha) {
        extlockd_ha_assert_lease(conn->server->ha);
    }
    extlock_msg_format(msg, conn_out(conn));
}

void G_GNUC_PRINTF(5, 6)
conn_send_error(ExtlockdConn *conn, bool has_id, uint64_t id,
                ExtlockErrorCode code, const char *fmt, ...)
{
    g_autofree char *text = NULL;
    va_list ap;

    va_start(ap, fmt);
    text = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    if (conn->server->ha) {
        extlockd_ha_assert_lease(conn->server->ha);
    }
    conn->server->nerrors++;
    VERBOSE(conn->server, "%s: error %s: %s", conn->peer,
            extlock_error_code_name(code), text);
    extlock_format_error(conn_out(conn), has_id, id, code, "%s", text);
}

/*
 * While a connection waits with neither input nor output wanted (its
 * hello waits for the state file), poll() would not tell that the peer
 * closed a TCP socket: POLLHUP comes only when both directions are shut,
 * that is once something was sent to a closed peer and it answered with a
 * reset, and here nothing is sent.  POLLRDHUP (Linux) says that the peer
 * will send no more; such a connection is handled as one whose peer is
 * gone (conn_hangup_paused()).  Only when nothing else is wanted: it stays
 * reported, and a connection that writes would see it on every loop turn.
 */
#define CONN_RDHUP ((GIOCondition)POLLRDHUP)

void conn_set_events(ExtlockdConn *conn, GIOCondition events)
{
    if (events == 0 && !conn->closing && !conn->handshaking) {
        events = CONN_RDHUP;
    }
    if (conn->events != events) {
        conn->events = events;
        g_source_modify_unix_fd(conn->source, conn->tag, events);
    }
}

/* Plain or TLS I/O on the connection's non-blocking socket */
ssize_t conn_sys_send(ExtlockdConn *conn, const void *buf, size_t len)
{
    if (conn->tls) {
        return extlockd_tls_send(conn->tls, buf, len);
    }
    return send(conn->fd, buf, len, MSG_NOSIGNAL);
}

static ssize_t conn_sys_recv(ExtlockdConn *conn, void *buf, size_t len)
{
    if (conn->tls) {
        return extlockd_tls_recv(conn->tls, buf, len);
    }
    return recv(conn->fd, buf, len, 0);
}

/*
 * Records GnuTLS has decrypted already are invisible to poll(): make the
 * source dispatch again if the connection wants input
 */
static void conn_kick_tls(ExtlockdConn *conn)
{
    if (conn->tls && !conn->handshaking && (conn->events & G_IO_IN) &&
        extlockd_tls_pending(conn->tls)) {
        g_source_set_ready_time(conn->source, 0);
    }
}

/*
 * The peer of @conn is gone: nothing is sent to it any more, its input is
 * no longer paused (neither the state file write of its hello nor its
 * unread output is a reason to wait for anybody), its session's waiting
 * requests are cancelled, and of the lines it sent only those that give
 * something up are applied (dispatch_line()).  So a hung-up client can
 * neither be granted a lock nobody will use nor keep its session alive:
 * the session is detached when the connection is destroyed, at the end of
 * those lines, and its lease runs as after any disconnect.
 */
static void conn_mark_gone(ExtlockdConn *conn)
{
    conn->peer_gone = true;
    conn->awaiting_state = false;
    g_string_truncate(conn->out, 0);
    conn->out_pos = 0;
    if (conn->session) {
        session_peer_gone(conn->session);
    }
}

/*
 * The peer closed its end (a write failed with EPIPE or ECONNRESET), but
 * what it sent before closing may still wait unread in the socket: the
 * unlocks and the "bye" of a client that exits while the coordinator
 * sends it a revoke.  Destroying the connection now would drop them and
 * keep its locks until its lease ran out, and the clients waiting for
 * them with it.  So drop the output from now on, and let the read side
 * take the rest; it destroys the connection at the end of input.
 *
 * The same with TLS: GnuTLS reports the failed send() as
 * GNUTLS_E_PUSH_ERROR (EPIPE) or GNUTLS_E_PREMATURE_TERMINATION
 * (ECONNRESET), and extlockd_tls_send() leaves that send()'s errno.  In
 * GnuTLS (3.7, its record layer) such an error only forbids further
 * writes on the session; its read side stays usable, so the records the
 * peer sent before it closed are still decrypted (and a record cut short
 * by the peer's end fails the read, which ends the connection like any
 * end of input).  test-extlockd-hangup.c checks both.
 */
static void conn_peer_gone(ExtlockdConn *conn)
{
    VERBOSE(conn->server, "%s: peer closed; reading what it sent",
            conn->peer);
    conn_mark_gone(conn);
    /* poll() reports the unread input and the end of it */
    conn_set_events(conn, G_IO_IN);
}

/* Returns false if the connection was destroyed */
static bool conn_flush(ExtlockdConn *conn)
{
    size_t pending;
    GIOCondition events;

    if (conn->peer_gone) {
        g_string_truncate(conn->out, 0);
        conn->out_pos = 0;
        if (conn->closing) {
            conn_destroy(conn);
            return false;
        }
        return true;
    }
    while (conn->out_pos < conn->out->len) {
        ssize_t n = conn_sys_send(conn, conn->out->str + conn->out_pos,
                                  conn->out->len - conn->out_pos);
        if (n > 0) {
            conn->out_pos += n;
            continue;
        }
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        }
        if (n < 0 && !conn->closing &&
            (errno == EPIPE || errno == ECONNRESET)) {
            conn_peer_gone(conn);
            return true;
        }
        VERBOSE(conn->server, "%s: write failed: %s", conn->peer,
                n < 0 ? (conn->tls ? extlockd_tls_error(conn->tls) :
                         g_strerror(errno)) : "no progress");
        conn_destroy(conn);
        return false;
    }

    if (conn->out_pos == conn->out->len) {
        g_string_truncate(conn->out, 0);
        conn->out_pos = 0;
        conn->out_allowance = 0;
        if (conn->closing) {
            conn_destroy(conn);
            return false;
        }
        if (!conn->handshaking) {
            conn_set_events(conn, conn->awaiting_state ? 0 : G_IO_IN);
            conn_kick_tls(conn);
        }
        return true;
    }

    pending = conn->out->len - conn->out_pos;
    if (pending > EXTLOCKD_MAX_OUTPUT + conn->out_allowance) {
        g_warning("disconnecting %s: it does not read its replies "
                  "(%zu bytes pending)", conn->peer, pending);
        conn_destroy(conn);
        return false;
    }
    if (conn->out_pos >= READ_CHUNK && conn->out_pos >= conn->out->len / 2) {
        g_string_erase(conn->out, 0, conn->out_pos);
        conn->out_pos = 0;
    }
    events = G_IO_OUT;
    if (!conn->closing && !conn->awaiting_state &&
        pending < BACKPRESSURE_OUTPUT) {
        events |= G_IO_IN;
    }
    conn_set_events(conn, events);
    conn_kick_tls(conn);
    return true;
}

void conn_flush_all(ExtlockdServer *server)
{
    GList *link;

    while ((link = g_queue_pop_head_link(&server->dirty)) != NULL) {
        ExtlockdConn *conn = link->data;

        conn->dirty = false;
        conn_flush(conn);
    }
}

void conn_close_after_flush(ExtlockdConn *conn)
{
    if (conn->closing) {
        return;
    }
    conn->closing = true;
    conn->closing_since_us = g_get_monotonic_time();
    conn_out(conn);        /* the flush closes it once the output is out */
    server_schedule(conn->server, conn->closing_since_us + CLOSE_TIMEOUT_US);
}

void conn_process_lines(ExtlockdConn *conn)
{
    ExtlockdServer *server = conn->server;
    const char *line;
    size_t len;

    while (!conn->closing && !conn->awaiting_state) {
        ExtlockLineResult r = extlock_linebuf_next(&conn->lb, &line, &len);

        if (r == EXTLOCK_LINE_NONE) {
            break;
        }
        server->nmessages++;
        if (r == EXTLOCK_LINE_TOO_LONG) {
            conn_send_error(conn, false, 0, EXTLOCK_ERR_LINE_TOO_LONG,
                            "message longer than %d bytes dropped",
                            EXTLOCK_MAX_LINE);
            continue;
        }
        dispatch_line(conn, line, len);
    }
}

/* Returns false if the connection was destroyed */
static bool conn_read(ExtlockdConn *conn)
{
    ExtlockdServer *server = conn->server;
    ExtlockdSession *session = conn->session;

    if (session && g_get_monotonic_time() >= session->deadline_us) {
        /* Too late: nothing it sends now may extend the lease */
        session_expire(session);
        return true;
    }
    for (int round = 0; round < READ_ROUNDS && !conn->closing; round++) {
        ssize_t n = conn_sys_recv(conn, server->rbuf, READ_CHUNK);

        if (n > 0) {
            extlock_linebuf_append(&conn->lb, server->rbuf, n);
            conn_process_lines(conn);
            if (n < READ_CHUNK &&
                !(conn->tls && extlockd_tls_pending(conn->tls))) {
                break;
            }
            continue;
        }
        if (n < 0 && errno == EINTR) {
            round--;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        }
        VERBOSE(server, "%s: %s", conn->peer,
                n == 0 ? "end of input" :
                conn->tls ? extlockd_tls_error(conn->tls) : g_strerror(errno));
        /* Try to deliver what is pending (e.g. replies before EOF) */
        if (conn->dirty) {
            g_queue_unlink(&server->dirty, &conn->dirty_link);
            conn->dirty = false;
            if (!conn_flush(conn)) {
                return false;
            }
        }
        conn_destroy(conn);
        return false;
    }
    /* conn_flush() stops reading while much output is pending */
    conn_kick_tls(conn);
    return true;
}

/* Returns false if the connection was destroyed or is still shaking hands */
static bool conn_tls_handshake(ExtlockdConn *conn)
{
    ExtlockdServer *server = conn->server;
    g_autoptr(GError) err = NULL;
    int r = extlockd_tls_handshake(conn->tls, &err);

    if (r < 0) {
        server_log_refusal(server, "%s: connection refused: %s", conn->peer,
                           err->message);
        conn_destroy(conn);
        return false;
    }
    if (r == 0) {
        conn_set_events(conn, extlockd_tls_events(conn->tls));
        return false;
    }
    conn->handshaking = false;
    conn->identity = g_strdup(extlockd_tls_identity(conn->tls));
    g_message("%s: TLS identity %s", conn->peer, conn->identity);
    if (extlockd_policy_is_admin(server->policy, conn->identity)) {
        conn_unauth_done(conn);
    }
    conn_set_events(conn, G_IO_IN);
    return true;
}

/*
 * The peer hung up while the input of @conn was paused (its hello waits
 * for the state file, or back-pressure) and nothing was being written.
 * What it sent after the pause began is still in the socket: a "bye" or
 * unlocks among it must not wait for its lease to run out.  Its session
 * must not stay either, however long the pause would have lasted.  So the
 * pause ends now: read what is left, once (the peer is gone, so it is at
 * most a socket buffer; GONE_READ_MAX bounds it anyway), apply the lines
 * that release something (conn_mark_gone()), and destroy the connection,
 * which detaches its session, all in this callback.
 */
static void conn_hangup_paused(ExtlockdConn *conn)
{
    ExtlockdServer *server = conn->server;
    ExtlockdSession *session = conn->session;
    size_t total = 0;

    conn_mark_gone(conn);
    if (session && g_get_monotonic_time() >= session->deadline_us) {
        /* Too late, as in conn_read(): its lease lapsed before */
        session_expire(session);
        conn_destroy(conn);
        return;
    }
    while (total < GONE_READ_MAX) {
        ssize_t n = conn_sys_recv(conn, server->rbuf,
                                  MIN(READ_CHUNK, GONE_READ_MAX - total));

        if (n > 0) {
            extlock_linebuf_append(&conn->lb, server->rbuf, n);
            total += n;
        } else if (!(n < 0 && errno == EINTR)) {
            break;
        }
    }
    VERBOSE(server, "%s: hung up while its input was paused; %zu bytes "
            "left to read", conn->peer, total);
    conn_process_lines(conn);
    conn_destroy(conn);
}

static gboolean conn_source_dispatch(GSource *source, GSourceFunc cb,
                                     gpointer data)
{
    ConnSource *cs = (ConnSource *)source;
    ExtlockdConn *conn = cs->conn;
    ExtlockdServer *server = conn->server;
    GIOCondition rev = g_source_query_unix_fd(source, conn->tag);

    g_source_set_ready_time(source, -1);
    if (conn->handshaking) {
        if (!conn_tls_handshake(conn)) {
            conn_flush_all(server);
            return G_SOURCE_CONTINUE;
        }
        rev |= G_IO_IN;         /* application data may be buffered */
    } else if (conn->tls && extlockd_tls_pending(conn->tls)) {
        rev |= G_IO_IN;
    }
    if (rev & G_IO_OUT) {
        conn_out(conn);
    }
    if ((rev & (G_IO_IN | G_IO_HUP | G_IO_ERR)) && (conn->events & G_IO_IN)) {
        conn_read(conn);
    } else if ((rev & (G_IO_HUP | G_IO_ERR | CONN_RDHUP)) &&
               !(rev & G_IO_OUT)) {
        if (conn->closing || conn->handshaking || conn->peer_gone) {
            conn_destroy(conn);
        } else {
            conn_hangup_paused(conn);
        }
    }
    conn_flush_all(server);
    return G_SOURCE_CONTINUE;
}

static GSourceFuncs conn_source_funcs = {
    .dispatch = conn_source_dispatch,
};

/*
 * Connections without hello: in server->unauth (accept order, hence
 * deadline order) and counted per peer, until they say hello or close
 */
void conn_unauth_done(ExtlockdConn *conn)
{
    ExtlockdServer *server = conn->server;
    guint n;

    if (!conn->unauth) {
        return;
    }
    conn->unauth = false;
    g_queue_unlink(&server->unauth, &conn->unauth_link);
    n = GPOINTER_TO_UINT(g_hash_table_lookup(server->unauth_per_peer,
                                             conn->peer_key));
    if (n <= 1) {
        g_hash_table_remove(server->unauth_per_peer, conn->peer_key);
    } else {
        g_hash_table_insert(server->unauth_per_peer, g_strdup(conn->peer_key),
                            GUINT_TO_POINTER(n - 1));
    }
}

/* May one more connection without hello come from @key? */
bool conn_admit(ExtlockdServer *server, const char *key, const char *peer)
{
    guint n = GPOINTER_TO_UINT(g_hash_table_lookup(server->unauth_per_peer,
                                                   key));
    int64_t now;

    if (server->unauth.length < server->cfg.max_unauth &&
        n < server->cfg.max_unauth_per_peer) {
        return true;
    }
    server->refused++;
    now = g_get_monotonic_time();
    /* One line per second at most: the refusals are a flood themselves */
    if (now - server->refused_logged_us >= G_USEC_PER_SEC) {
        g_warning("refusing connection from %s: %u connections without "
                  "hello from it, %u in total (limits %u per peer, %u in "
                  "total; --max-unauth-per-peer, --max-unauth); %" PRIu64
                  " refused since the last report", peer, n,
                  server->unauth.length, server->cfg.max_unauth_per_peer,
                  server->cfg.max_unauth,
                  server->refused - server->refused_logged);
        server->refused_logged_us = now;
        server->refused_logged = server->refused;
    }
    return false;
}

void conn_new(ExtlockdServer *server, int fd, const char *peer,
              const char *key, const char *identity, bool tls)
{
    ExtlockdConn *conn = g_new0(ExtlockdConn, 1);
    g_autoptr(GError) err = NULL;
    ConnSource *cs;

    if (tls) {
        conn->tls = extlockd_tls_new(server->tls, fd, &err);
        if (!conn->tls) {
            g_warning("%s: %s", peer, err->message);
            close(fd);
            g_free(conn);
            return;
        }
        conn->handshaking = true;
    }
    conn->identity = g_strdup(identity);
    conn->peer_key = g_strdup(key);
    conn->accepted_us = g_get_monotonic_time();
    conn->status_tokens = server->cfg.status_rate;
    conn->status_refill_us = conn->accepted_us +
                          G_USEC_PER_SEC / server->cfg.status_rate;
    conn->server = server;
    /*
     * Admin identities on the UNIX socket (extlockctl) are authenticated
     * by the kernel and need no hello; all others are limited until hello
     */
    if (!identity || !extlockd_policy_is_admin(server->policy, identity)) {
        conn->unauth = true;
        conn->unauth_link.data = conn;
        g_queue_push_tail_link(&server->unauth, &conn->unauth_link);
        g_hash_table_insert(server->unauth_per_peer, g_strdup(key),
                            GUINT_TO_POINTER(GPOINTER_TO_UINT(
                                g_hash_table_lookup(server->unauth_per_peer,
                                                    key)) + 1));
        server_schedule(server, conn->accepted_us +
                        server->cfg.hello_timeout_ms * 1000LL);
    }
    conn->serial = ++server->next_serial;
    conn->peer = g_strdup_printf("#%" PRIu64 " (%s)", conn->serial, peer);
    conn->fd = fd;
    conn->out = g_string_sized_new(4096);
    extlock_linebuf_init(&conn->lb);
    conn->link.data = conn;
    conn->dirty_link.data = conn;
    g_queue_push_tail_link(&server->conns, &conn->link);

    conn->source = g_source_new(&conn_source_funcs, sizeof(ConnSource));
    cs = (ConnSource *)conn->source;
    cs->conn = conn;
    conn->events = G_IO_IN;
    conn->tag = g_source_add_unix_fd(conn->source, fd, conn->events);
    /*
     * Nothing here runs a nested main loop, so the source need not be
     * blocked while it dispatches.  Blocking and unblocking it removes
     * and re-adds its fd, and glib then wakes its own poll() (an eventfd
     * write, and a read and another poll() in the next iteration): three
     * system calls for every batch of messages of every connection.
     */
    g_source_set_can_recurse(conn->source, TRUE);
    g_source_attach(conn->source, NULL);
    VERBOSE(server, "connection %s accepted", conn->peer);
}

void conn_destroy(ExtlockdConn *conn)
{
    ExtlockdServer *server = conn->server;

    VERBOSE(server, "connection %s closed", conn->peer);
    if (conn->gone_applied || conn->gone_dropped) {
        g_message("%s: gone: of the requests it sent last, %u applied "
                  "and %u dropped (once a client is gone, only those that "
                  "release something are applied)", conn->peer,
                  conn->gone_applied, conn->gone_dropped);
    }
    conn_unauth_done(conn);
    if (conn->session) {
        if (server->shutting_down) {
            conn->session->conn = NULL;
            conn->session = NULL;
        } else {
            session_detach(conn->session);
        }
    }
    if (conn->dirty) {
        g_queue_unlink(&server->dirty, &conn->dirty_link);
        conn->dirty = false;
    }
    g_queue_unlink(&server->conns, &conn->link);
    g_source_destroy(conn->source);
    g_source_unref(conn->source);
    extlockd_tls_free(conn->tls);
    close(conn->fd);
    extlock_linebuf_destroy(&conn->lb);
    g_string_free(conn->out, TRUE);
    g_free(conn->identity);
    g_free(conn->peer_key);
    g_free(conn->peer);
    g_free(conn);
}

/*
 * The lease timer: close the connections that said no hello in time and
 * those that have been closing too long.  Returns the next such deadline
 * (INT64_MAX: none).
 */
int64_t conn_check_timeouts(ExtlockdServer *server, int64_t now)
{
    int64_t next = INT64_MAX;
    GList *l, *lnext;

    /* Connections that never said hello, oldest first */
    while ((l = server->unauth.head) != NULL) {
        ExtlockdConn *conn = l->data;
        int64_t due = conn->accepted_us +
                      server->cfg.hello_timeout_ms * 1000LL;

        if (now < due) {
            next = MIN(next, due);
            break;
        }
        g_message("%s: closed: no hello within %u ms%s", conn->peer,
                  server->cfg.hello_timeout_ms,
                  conn->handshaking ? " (TLS handshake unfinished)" : "");
        conn_unauth_done(conn);
        if (conn->handshaking) {
            conn_destroy(conn);
            continue;
        }
        conn_send_error(conn, false, 0, EXTLOCK_ERR_STATE,
                        "no hello within %u ms: closing",
                        server->cfg.hello_timeout_ms);
        conn_close_after_flush(conn);
        next = MIN(next, conn->closing_since_us + CLOSE_TIMEOUT_US);
    }
    for (l = server->conns.head; l; l = lnext) {
        ExtlockdConn *conn = l->data;

        lnext = l->next;
        if (!conn->closing) {
            continue;
        }
        if (now - conn->closing_since_us >= CLOSE_TIMEOUT_US) {
            VERBOSE(server, "%s: closing without flushing", conn->peer);
            conn_destroy(conn);
            continue;
        }
        next = MIN(next, conn->closing_since_us + CLOSE_TIMEOUT_US);
    }
    return next;
}
