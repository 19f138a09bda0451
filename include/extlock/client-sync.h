/*
 * extlock: a simple blocking coordinator client for tools and tests
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Used by extlockctl, extlock-bench and the integration tests.  The QEMU
 * block driver has its own non-blocking, coroutine based client.
 *
 * Addresses: "unix:PATH", "tcp:HOST:PORT", or a plain path (UNIX socket).
 */
#ifndef EXTLOCK_CLIENT_SYNC_H
#define EXTLOCK_CLIENT_SYNC_H

#include <glib.h>
#include "extlock/protocol.h"

typedef struct ExtlockConn ExtlockConn;

/* Connect (blocking); NULL and @errp set on failure */
ExtlockConn *extlock_conn_connect(const char *address, GError **errp);

/*
 * TLS to a TCP coordinator (docs/extlockd.rst).  @creds_dir is laid out
 * like QEMU's client tls-creds: ca-cert.pem (verifies the server),
 * client-cert.pem + client-key.pem (optional, our identity), or keys.psk
 * with @psk_username's "username:hexkey" line for PSK.
 */
typedef struct ExtlockTlsOptions {
    const char *creds_dir;
    const char *psk_username;   /* NULL: x509 */
    /* checked in the server's certificate; NULL: the host of the address */
    const char *hostname;
    bool no_verify_peer;        /* do not verify the server (testing) */
} ExtlockTlsOptions;

/* extlock_conn_connect(), then the TLS handshake if @tls is not NULL */
ExtlockConn *extlock_conn_connect_tls(const char *address,
                                      const ExtlockTlsOptions *tls,
                                      GError **errp);

/*
 * For event-driven users (extlock-bench) that poll extlock_conn_fd():
 * recv()/send() with MSG_DONTWAIT semantics, through TLS if the
 * connection has it (-1 with errno EAGAIN: nothing now; after a TLS send
 * returned EAGAIN, pass the same bytes again, more may follow them).
 * Data TLS has decrypted already is invisible to poll():
 * extlock_conn_tls_pending() says so.  Call extlock_conn_set_nonblocking()
 * first; the blocking calls above keep working afterwards.
 */
void extlock_conn_set_nonblocking(ExtlockConn *conn);
ssize_t extlock_conn_recv_nb(ExtlockConn *conn, void *buf, size_t len);
ssize_t extlock_conn_send_nb(ExtlockConn *conn, const void *buf, size_t len);
bool extlock_conn_tls_pending(ExtlockConn *conn);
void extlock_conn_close(ExtlockConn *conn);
int extlock_conn_fd(ExtlockConn *conn);
/* The address it was connected to */
const char *extlock_conn_address(ExtlockConn *conn);

/* Next request id this connection would use (ids start at 1) */
uint64_t extlock_conn_next_id(ExtlockConn *conn);

/* Send a message; if it is a request without has_id, an id is assigned */
bool extlock_conn_send(ExtlockConn *conn, ExtlockMsg *msg, GError **errp);
/* Send raw bytes (tests use this for malformed input) */
bool extlock_conn_send_raw(ExtlockConn *conn, const void *data, size_t len,
                           GError **errp);

/*
 * Receive one message, waiting at most @timeout_ms (-1: forever).
 * Returns false with @errp set on timeout (G_IO_ERROR_TIMED_OUT),
 * EOF (G_IO_ERROR_CLOSED) or an unparsable line (G_IO_ERROR_INVALID_DATA).
 * @msg must be initialised; the caller clears it.
 */
bool extlock_conn_recv(ExtlockConn *conn, ExtlockMsg *msg, int timeout_ms,
                       GError **errp);
/* True if a complete line is already buffered (no syscall) */
bool extlock_conn_has_buffered(ExtlockConn *conn);
/* Non-blocking: read what the socket has into the buffer; false on EOF/error */
bool extlock_conn_fill(ExtlockConn *conn, GError **errp);

/*
 * Send a request and wait for its final reply (skipping "waiting" interim
 * replies and notifications for other ids).  Returns false with @errp set
 * on I/O errors; an "error" reply is returned in @reply, not as failure.
 */
bool extlock_conn_call(ExtlockConn *conn, ExtlockMsg *request,
                       ExtlockMsg *reply, int timeout_ms, GError **errp);

/* hello + welcome; fails (errp) if the server answers with an error */
bool extlock_conn_hello(ExtlockConn *conn, const char *client_id,
                        const char *lock_space, uint32_t lease_ms,
                        ExtlockMsg *welcome, GError **errp);

/*
 * HA coordinators (docs/extlockd.rst "High availability"): @addresses is
 * a comma-separated list.  Connect and say hello to each in turn; a
 * follower's "not-leader" error that names the leader is followed at
 * once, one that does not (no leader yet) makes us try the next address,
 * with a short back-off after each round.  Gives up after @timeout_ms.
 * @tls may be NULL.  Other hello errors fail at once.
 */
ExtlockConn *extlock_conn_connect_leader(const char *addresses,
                                         const ExtlockTlsOptions *tls,
                                         const char *client_id,
                                         const char *lock_space,
                                         uint32_t lease_ms,
                                         ExtlockMsg *welcome, int timeout_ms,
                                         GError **errp);

#endif /* EXTLOCK_CLIENT_SYNC_H */
