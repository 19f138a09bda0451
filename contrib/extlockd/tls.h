/*
 * extlockd: TLS on TCP connections (GnuTLS), non-blocking
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Credentials come from a directory laid out like QEMU's tls-creds
 * objects: ca-cert.pem, server-cert.pem, server-key.pem (x509, optional
 * ca-crl.pem) and/or keys.psk ("identity:hexkey" lines, PSK).  With
 * verify_peer, x509 clients must present a certificate signed by the CA;
 * PSK clients are authenticated by their key.
 *
 * The session works on the connection's non-blocking fd: every call may
 * return "again" (errno EAGAIN), after which the caller waits for the
 * events that extlockd_tls_events() names.  Decrypted data may be
 * buffered inside GnuTLS where poll() cannot see it:
 * extlockd_tls_pending() tells.
 */
#ifndef EXTLOCKD_TLS_H
#define EXTLOCKD_TLS_H

#include <glib.h>
#include <stdbool.h>
#include <sys/types.h>

typedef struct ExtlockdTlsCreds ExtlockdTlsCreds;
typedef struct ExtlockdTls ExtlockdTls;

ExtlockdTlsCreds *extlockd_tls_creds_load(const char *dir, bool verify_peer,
                                          GError **errp);
void extlockd_tls_creds_free(ExtlockdTlsCreds *creds);
/* "x509", "psk" or "x509+psk" */
const char *extlockd_tls_creds_kinds(const ExtlockdTlsCreds *creds);

ExtlockdTls *extlockd_tls_new(ExtlockdTlsCreds *creds, int fd,
                              GError **errp);
void extlockd_tls_free(ExtlockdTls *t);

/*
 * Drive the handshake: 1 done (the peer is authenticated, see
 * extlockd_tls_identity()), 0 again, -1 failed (@errp says why: bad
 * certificate, unknown PSK identity, not TLS at all...).
 */
int extlockd_tls_handshake(ExtlockdTls *t, GError **errp);
/* G_IO_IN or G_IO_OUT: what the last "again" waits for */
GIOCondition extlockd_tls_events(ExtlockdTls *t);
/* After the handshake: "x509:CN", "psk:NAME" or "anonymous" */
const char *extlockd_tls_identity(ExtlockdTls *t);

/*
 * Like recv()/send() on a non-blocking socket: > 0 bytes, 0 end of
 * stream (recv), -1 with errno EAGAIN/EINTR, EPROTO (a TLS error), or
 * the errno of the socket's failed send()/recv() (EPIPE, ECONNRESET, ...),
 * with extlockd_tls_error() saying why.  After a failed send() the session
 * still receives what the peer sent before.  After send() returned
 * EAGAIN, the next send() must pass at least the same bytes again (the
 * record is already encrypted; GnuTLS finishes sending it).
 */
ssize_t extlockd_tls_recv(ExtlockdTls *t, void *buf, size_t len);
ssize_t extlockd_tls_send(ExtlockdTls *t, const void *buf, size_t len);
bool extlockd_tls_pending(ExtlockdTls *t);
const char *extlockd_tls_error(ExtlockdTls *t);

#endif /* EXTLOCKD_TLS_H */
