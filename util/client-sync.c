/*
 * extlock: a simple blocking coordinator client for tools and tests
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Reads are buffered (one recv() usually brings several replies) and
 * timeouts use poll().  Replies from the server may be longer than
 * EXTLOCK_MAX_LINE (a status reply lists every lock), so this client keeps
 * its own buffer with a much larger limit instead of ExtlockLineBuf.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <gio/gio.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include "extlock/client-sync.h"

/* Longest reply line accepted from the server */
#define CLIENT_MAX_LINE (256 * 1024 * 1024)
#define CLIENT_READ_SIZE (64 * 1024)

struct ExtlockConn {
    int fd;
    char *address;
    uint64_t next_id;
    GByteArray *in;             /* received bytes */
    size_t in_pos;              /* start of unconsumed data */
    size_t scanned;             /* bytes after in_pos known to have no '\n' */
    GString *out;
    /* TLS (blocking socket) */
    gnutls_session_t tls;
    gnutls_certificate_credentials_t x509;
    gnutls_psk_client_credentials_t psk;
    char *host;                 /* for the server certificate check */
};

/* gnutls_strerror(), plus the alert the coordinator sent, if any */
static const char *tls_why(ExtlockConn *conn, int ret, char *buf, size_t size)
{
    if (ret == GNUTLS_E_FATAL_ALERT_RECEIVED ||
        ret == GNUTLS_E_WARNING_ALERT_RECEIVED) {
        g_snprintf(buf, size, "the coordinator refused us: %s",
                   gnutls_alert_get_name(gnutls_alert_get(conn->tls)));
        return buf;
    }
    return gnutls_strerror(ret);
}

static int connect_unix(const char *path, GError **errp,
                        const char *address)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int fd;

    if (strlen(path) >= sizeof(sa.sun_path) || !path[0]) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "cannot connect to %s: invalid socket path", address);
        return -1;
    }
    strcpy(sa.sun_path, path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        int e = errno;
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(e),
                    "cannot connect to %s: %s", address, g_strerror(e));
        return -1;
    }
    while (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        int e = errno;

        if (e == EINTR) {
            continue;
        }
        close(fd);
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(e),
                    "cannot connect to %s: %s", address, g_strerror(e));
        return -1;
    }
    return fd;
}

static int connect_tcp(const char *hostport, GError **errp,
                       const char *address, char **host_out)
{
    g_autofree char *host = NULL;
    const char *colon, *port;
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC,
        .ai_socktype = SOCK_STREAM,
    };
    struct addrinfo *res = NULL, *ai;
    int fd = -1, e = 0, r, one = 1;

    if (hostport[0] == '[') {
        const char *close_br = strchr(hostport, ']');

        if (!close_br || close_br[1] != ':') {
            goto bad;
        }
        host = g_strndup(hostport + 1, close_br - hostport - 1);
        port = close_br + 2;
    } else {
        colon = strrchr(hostport, ':');
        if (!colon) {
            goto bad;
        }
        host = g_strndup(hostport, colon - hostport);
        port = colon + 1;
    }
    if (!host[0] || !port[0]) {
        goto bad;
    }
    if (host_out) {
        *host_out = g_strdup(host);
    }

    r = getaddrinfo(host, port, &hints, &res);
    if (r != 0) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_HOST_NOT_FOUND,
                    "cannot connect to %s: %s", address, gai_strerror(r));
        return -1;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC,
                    ai->ai_protocol);
        if (fd < 0) {
            e = errno;
            continue;
        }
        do {
            r = connect(fd, ai->ai_addr, ai->ai_addrlen);
        } while (r < 0 && errno == EINTR);
        if (r == 0) {
            break;
        }
        e = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(e),
                    "cannot connect to %s: %s", address, g_strerror(e));
        return -1;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;

bad:
    g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                "cannot connect to %s: expected tcp:HOST:PORT", address);
    return -1;
}

ExtlockConn *extlock_conn_connect(const char *address, GError **errp)
{
    ExtlockConn *conn;
    char *host = NULL;
    int fd;

    if (!address || !address[0]) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "empty coordinator address");
        return NULL;
    }
    if (g_str_has_prefix(address, "unix:")) {
        fd = connect_unix(address + 5, errp, address);
    } else if (g_str_has_prefix(address, "tcp:")) {
        fd = connect_tcp(address + 4, errp, address, &host);
    } else {
        fd = connect_unix(address, errp, address);
    }
    if (fd < 0) {
        g_free(host);
        return NULL;
    }

    conn = g_new0(ExtlockConn, 1);
    conn->host = host;
    conn->fd = fd;
    conn->address = g_strdup(address);
    conn->next_id = 1;
    conn->in = g_byte_array_sized_new(CLIENT_READ_SIZE);
    conn->out = g_string_sized_new(256);
    return conn;
}

void extlock_conn_close(ExtlockConn *conn)
{
    if (!conn) {
        return;
    }
    if (conn->tls) {
        gnutls_deinit(conn->tls);
    }
    if (conn->x509) {
        gnutls_certificate_free_credentials(conn->x509);
    }
    if (conn->psk) {
        gnutls_psk_free_client_credentials(conn->psk);
    }
    g_free(conn->host);
    if (conn->fd >= 0) {
        close(conn->fd);
    }
    g_free(conn->address);
    g_byte_array_free(conn->in, true);
    g_string_free(conn->out, true);
    g_free(conn);
}

int extlock_conn_fd(ExtlockConn *conn)
{
    return conn->fd;
}

const char *extlock_conn_address(ExtlockConn *conn)
{
    return conn->address;
}

uint64_t extlock_conn_next_id(ExtlockConn *conn)
{
    return conn->next_id;
}

bool extlock_conn_send_raw(ExtlockConn *conn, const void *data, size_t len,
                           GError **errp)
{
    const char *p = data;

    while (len) {
        ssize_t n;

        if (conn->tls) {
            n = gnutls_record_send(conn->tls, p, len);
            if (n == GNUTLS_E_AGAIN) {
                struct pollfd pfd = { .fd = conn->fd, .events = POLLOUT };

                poll(&pfd, 1, -1);
                continue;
            }
            if (n == GNUTLS_E_INTERRUPTED) {
                continue;
            }
            if (n < 0) {
                struct pollfd pfd = { .fd = conn->fd, .events = POLLIN };
                char why[128], byte;

                /* The coordinator may have said why it hung up */
                if (n != GNUTLS_E_FATAL_ALERT_RECEIVED &&
                    poll(&pfd, 1, 100) > 0) {
                    int r = gnutls_record_recv(conn->tls, &byte, 1);

                    if (r == GNUTLS_E_FATAL_ALERT_RECEIVED) {
                        n = r;
                    }
                }
                g_set_error(errp, G_IO_ERROR, G_IO_ERROR_FAILED,
                            "TLS send to %s failed: %s", conn->address,
                            tls_why(conn, n, why, sizeof(why)));
                return false;
            }
            p += n;
            len -= n;
            continue;
        }
        n = send(conn->fd, p, len, MSG_NOSIGNAL);

        if (n < 0) {
            int e = errno;

            if (e == EINTR) {
                continue;
            }
            if (e == EAGAIN || e == EWOULDBLOCK) {
                struct pollfd pfd = { .fd = conn->fd, .events = POLLOUT };

                poll(&pfd, 1, -1);
                continue;
            }
            g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(e),
                        "send to %s failed: %s", conn->address,
                        g_strerror(e));
            return false;
        }
        p += n;
        len -= n;
    }
    return true;
}

static bool msg_is_request(ExtlockMsgType type)
{
    switch (type) {
    case EXTLOCK_MSG_HELLO:
    case EXTLOCK_MSG_LOCK:
    case EXTLOCK_MSG_UNLOCK:
    case EXTLOCK_MSG_CANCEL:
    case EXTLOCK_MSG_RENEW:
    case EXTLOCK_MSG_BYE:
    case EXTLOCK_MSG_STATUS:
    case EXTLOCK_MSG_RECLAIM:
    case EXTLOCK_MSG_DOWNGRADE:
    case EXTLOCK_MSG_RECLAIM_DONE:
        return true;
    default:
        return false;
    }
}

bool extlock_conn_send(ExtlockConn *conn, ExtlockMsg *msg, GError **errp)
{
    if (msg_is_request(msg->type)) {
        if (!msg->has_id) {
            msg->id = conn->next_id++;
            msg->has_id = true;
        } else if (msg->id >= conn->next_id) {
            conn->next_id = msg->id + 1;
        }
    }
    g_string_truncate(conn->out, 0);
    extlock_msg_format(msg, conn->out);
    return extlock_conn_send_raw(conn, conn->out->str, conn->out->len, errp);
}

/* Find a complete line; returns its length (without '\n') or -1 */
static gssize find_line(ExtlockConn *conn)
{
    const guint8 *start = conn->in->data + conn->in_pos;
    size_t avail = conn->in->len - conn->in_pos;
    const guint8 *nl;

    if (conn->scanned >= avail) {
        return -1;
    }
    nl = memchr(start + conn->scanned, '\n', avail - conn->scanned);
    if (!nl) {
        conn->scanned = avail;
        return -1;
    }
    return nl - start;
}

bool extlock_conn_has_buffered(ExtlockConn *conn)
{
    return find_line(conn) >= 0;
}

/*
 * read_some() over TLS.  The socket is blocking: with MSG_DONTWAIT, only
 * read if GnuTLS has buffered data or poll() says the socket is readable
 * (a record that has begun to arrive is then read to its end).
 */
static int read_some_tls(ExtlockConn *conn, int flags, size_t old,
                         GError **errp)
{
    ssize_t n;

    if ((flags & MSG_DONTWAIT) && !gnutls_record_check_pending(conn->tls)) {
        struct pollfd pfd = { .fd = conn->fd, .events = POLLIN };

        if (poll(&pfd, 1, 0) <= 0) {
            return 0;
        }
    }
    g_byte_array_set_size(conn->in, old + CLIENT_READ_SIZE);
    for (;;) {
        n = gnutls_record_recv(conn->tls, conn->in->data + old,
                               CLIENT_READ_SIZE);
        if (n == GNUTLS_E_AGAIN) {
            /* a non-blocking socket in the middle of a record */
            struct pollfd pfd = { .fd = conn->fd, .events = POLLIN };

            poll(&pfd, 1, -1);
            continue;
        }
        if (n != GNUTLS_E_INTERRUPTED) {
            break;
        }
    }
    g_byte_array_set_size(conn->in, old + MAX(n, 0));
    if (n > 0) {
        return 1;
    }
    if (n == 0 || n == GNUTLS_E_PREMATURE_TERMINATION) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_CLOSED,
                    "connection to %s closed", conn->address);
    } else {
        char why[128];

        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_FAILED,
                    "TLS receive from %s failed: %s", conn->address,
                    tls_why(conn, n, why, sizeof(why)));
    }
    return -1;
}

/* One recv() into the buffer: 1 data, 0 would block, -1 EOF or error */
static int read_some(ExtlockConn *conn, int flags, GError **errp)
{
    size_t old;
    ssize_t n;

    if (conn->in_pos) {
        size_t rest = conn->in->len - conn->in_pos;

        memmove(conn->in->data, conn->in->data + conn->in_pos, rest);
        g_byte_array_set_size(conn->in, rest);
        conn->in_pos = 0;
    }
    old = conn->in->len;
    if (conn->tls) {
        return read_some_tls(conn, flags, old, errp);
    }
    g_byte_array_set_size(conn->in, old + CLIENT_READ_SIZE);
    do {
        n = recv(conn->fd, conn->in->data + old, CLIENT_READ_SIZE, flags);
    } while (n < 0 && errno == EINTR);
    g_byte_array_set_size(conn->in, old + MAX(n, 0));
    if (n > 0) {
        return 1;
    }
    if (n == 0) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_CLOSED,
                    "connection to %s closed", conn->address);
        return -1;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
        return 0;
    }
    {
        int e = errno;
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(e),
                    "receive from %s failed: %s", conn->address,
                    g_strerror(e));
    }
    return -1;
}

bool extlock_conn_fill(ExtlockConn *conn, GError **errp)
{
    int r;

    do {
        r = read_some(conn, MSG_DONTWAIT, errp);
    } while (r > 0 && conn->in->len - conn->in_pos < CLIENT_MAX_LINE);
    return r == 0 || r > 0;
}

bool extlock_conn_recv(ExtlockConn *conn, ExtlockMsg *msg, int timeout_ms,
                       GError **errp)
{
    gint64 deadline = timeout_ms < 0 ? -1 :
                      g_get_monotonic_time() + (gint64)timeout_ms * 1000;
    gssize len;

    extlock_msg_clear(msg);
    while ((len = find_line(conn)) < 0) {
        struct pollfd pfd = { .fd = conn->fd, .events = POLLIN };
        int wait_ms = -1, r;

        if (conn->in->len - conn->in_pos >= CLIENT_MAX_LINE) {
            g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                        "reply from %s is too long", conn->address);
            return false;
        }
        if (deadline >= 0) {
            gint64 left = deadline - g_get_monotonic_time();

            wait_ms = left <= 0 ? 0 : (int)MIN((left + 999) / 1000, G_MAXINT);
        }
        if (conn->tls && gnutls_record_check_pending(conn->tls)) {
            wait_ms = 0;        /* decrypted data poll() cannot see */
        }
        r = poll(&pfd, 1, wait_ms);
        if (r == 0 && conn->tls && gnutls_record_check_pending(conn->tls)) {
            r = 1;
        }
        if (r < 0) {
            int e = errno;

            if (e == EINTR) {
                continue;
            }
            g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(e),
                        "poll failed: %s", g_strerror(e));
            return false;
        }
        if (r == 0) {
            g_set_error(errp, G_IO_ERROR, G_IO_ERROR_TIMED_OUT,
                        "timed out waiting for %s", conn->address);
            return false;
        }
        if (read_some(conn, MSG_DONTWAIT, errp) < 0) {
            return false;
        }
    }

    {
        const char *line = (const char *)conn->in->data + conn->in_pos;
        size_t n = len;
        ExtlockProtoError perr;

        conn->in_pos += len + 1;
        conn->scanned = 0;
        if (n && line[n - 1] == '\r') {
            n--;
        }
        if (!extlock_msg_parse(line, n, msg, &perr)) {
            g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                        "bad message from %s: %s: %s", conn->address,
                        extlock_error_code_name(perr.code), perr.message);
            return false;
        }
    }
    return true;
}

bool extlock_conn_call(ExtlockConn *conn, ExtlockMsg *request,
                       ExtlockMsg *reply, int timeout_ms, GError **errp)
{
    gint64 deadline = timeout_ms < 0 ? -1 :
                      g_get_monotonic_time() + (gint64)timeout_ms * 1000;

    if (!extlock_conn_send(conn, request, errp)) {
        return false;
    }
    for (;;) {
        int left = -1;

        if (deadline >= 0) {
            gint64 us = deadline - g_get_monotonic_time();

            left = us <= 0 ? 0 : (int)MIN((us + 999) / 1000, G_MAXINT);
        }
        if (!extlock_conn_recv(conn, reply, left, errp)) {
            return false;
        }
        if (reply->has_id && reply->id == request->id &&
            reply->type != EXTLOCK_MSG_WAITING &&
            !msg_is_request(reply->type)) {
            return true;
        }
    }
}

bool extlock_conn_hello(ExtlockConn *conn, const char *client_id,
                        const char *lock_space, uint32_t lease_ms,
                        ExtlockMsg *welcome, GError **errp)
{
    ExtlockMsg req, reply;
    bool ok = false;

    extlock_msg_init(&req, EXTLOCK_MSG_HELLO);
    extlock_msg_init(&reply, EXTLOCK_MSG_INVALID);
    req.client_id = (char *)client_id;
    req.lock_space = (char *)lock_space;
    req.lease_ms = lease_ms;
    if (!extlock_conn_call(conn, &req, &reply, 30 * 1000, errp)) {
        goto out;
    }
    if (reply.type == EXTLOCK_MSG_ERROR) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_FAILED,
                    "hello refused by %s: %s: %s", conn->address,
                    extlock_error_code_name(reply.error),
                    reply.message ? reply.message : "");
        goto out;
    }
    if (reply.type != EXTLOCK_MSG_WELCOME) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                    "unexpected reply \"%s\" to hello from %s",
                    extlock_msg_type_name(reply.type), conn->address);
        goto out;
    }
    ok = true;
    if (welcome) {
        extlock_msg_clear(welcome);
        *welcome = reply;
        extlock_msg_init(&reply, EXTLOCK_MSG_INVALID);
    }
out:
    extlock_msg_clear(&reply);
    return ok;
}

/* The key of @user in @path ("user:hexkey" lines, QEMU's keys.psk) */
static char *psk_key_of(const char *path, const char *user, GError **errp)
{
    g_autofree char *text = NULL;
    g_auto(GStrv) lines = NULL;
    size_t ulen = strlen(user);

    if (!g_file_get_contents(path, &text, NULL, errp)) {
        return NULL;
    }
    lines = g_strsplit(text, "\n", -1);
    for (char **l = lines; *l; l++) {
        if (strncmp(*l, user, ulen) == 0 && (*l)[ulen] == ':') {
            return g_strstrip(g_strdup(*l + ulen + 1));
        }
    }
    g_set_error(errp, G_IO_ERROR, G_IO_ERROR_NOT_FOUND,
                "%s has no key for PSK username %s", path, user);
    return NULL;
}

static bool tls_setup(ExtlockConn *conn, const ExtlockTlsOptions *o,
                      GError **errp)
{
    g_autofree char *ca = g_build_filename(o->creds_dir, "ca-cert.pem", NULL);
    g_autofree char *cert = g_build_filename(o->creds_dir, "client-cert.pem",
                                             NULL);
    g_autofree char *key = g_build_filename(o->creds_dir, "client-key.pem",
                                            NULL);
    const char *hostname = o->hostname ? o->hostname : conn->host;
    int ret;

    ret = gnutls_init(&conn->tls, GNUTLS_CLIENT);
    if (ret < 0) {
        goto fail;
    }
    if (o->psk_username) {
        g_autofree char *psk_path = g_build_filename(o->creds_dir,
                                                     "keys.psk", NULL);
        g_autofree char *hex = psk_key_of(psk_path, o->psk_username, errp);
        gnutls_datum_t datum;

        if (!hex) {
            return false;
        }
        datum.data = (unsigned char *)hex;
        datum.size = strlen(hex);
        ret = gnutls_psk_allocate_client_credentials(&conn->psk);
        if (ret >= 0) {
            ret = gnutls_psk_set_client_credentials(conn->psk,
                                                    o->psk_username, &datum,
                                                    GNUTLS_PSK_KEY_HEX);
        }
        if (ret >= 0) {
            ret = gnutls_credentials_set(conn->tls, GNUTLS_CRD_PSK,
                                         conn->psk);
        }
        if (ret >= 0) {
            ret = gnutls_priority_set_direct(conn->tls,
                                             "NORMAL:+ECDHE-PSK:+DHE-PSK:"
                                             "+PSK", NULL);
        }
        if (ret < 0) {
            goto fail;
        }
    } else {
        ret = gnutls_certificate_allocate_credentials(&conn->x509);
        if (ret < 0) {
            goto fail;
        }
        if (!o->no_verify_peer) {
            ret = gnutls_certificate_set_x509_trust_file(conn->x509, ca,
                                                         GNUTLS_X509_FMT_PEM);
            if (ret <= 0) {
                g_set_error(errp, G_IO_ERROR, G_IO_ERROR_FAILED,
                            "TLS: cannot load CA certificate %s: %s", ca,
                            ret < 0 ? gnutls_strerror(ret) : "empty");
                return false;
            }
        }
        if (g_file_test(cert, G_FILE_TEST_EXISTS)) {
            ret = gnutls_certificate_set_x509_key_file(conn->x509, cert, key,
                                                       GNUTLS_X509_FMT_PEM);
            if (ret < 0) {
                g_set_error(errp, G_IO_ERROR, G_IO_ERROR_FAILED,
                            "TLS: cannot load %s / %s: %s", cert, key,
                            gnutls_strerror(ret));
                return false;
            }
        }
        ret = gnutls_credentials_set(conn->tls, GNUTLS_CRD_CERTIFICATE,
                                     conn->x509);
        if (ret >= 0) {
            ret = gnutls_set_default_priority(conn->tls);
        }
        if (ret < 0) {
            goto fail;
        }
        if (!o->no_verify_peer) {
            /*
             * The handshake fails unless the chain, the name and the key
             * purpose verify: the coordinator's certificate must be meant
             * for a TLS server (extended key usage serverAuth, if it has
             * an extended key usage at all), so that a client's
             * certificate of the same CA does not pass for it
             */
            gnutls_typed_vdata_st vdata[2] = {
                { .type = GNUTLS_DT_KEY_PURPOSE_OID,
                  .data = (unsigned char *)GNUTLS_KP_TLS_WWW_SERVER },
                { .type = GNUTLS_DT_DNS_HOSTNAME,
                  .data = (unsigned char *)hostname },
            };

            gnutls_session_set_verify_cert2(conn->tls, vdata,
                                            hostname ? 2 : 1, 0);
        }
        if (hostname && !g_hostname_is_ip_address(hostname)) {
            gnutls_server_name_set(conn->tls, GNUTLS_NAME_DNS, hostname,
                                   strlen(hostname));
        }
    }
    gnutls_transport_set_int(conn->tls, conn->fd);
    gnutls_handshake_set_timeout(conn->tls, 30 * 1000);
    do {
        ret = gnutls_handshake(conn->tls);
    } while (ret < 0 && !gnutls_error_is_fatal(ret));
    if (ret < 0) {
        unsigned status = gnutls_session_get_verify_cert_status(conn->tls);
        gnutls_datum_t text = { 0 };

        if (ret == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR && status &&
            gnutls_certificate_verification_status_print(
                status, GNUTLS_CRT_X509, &text, 0) == 0) {
            g_set_error(errp, G_IO_ERROR, G_IO_ERROR_FAILED,
                        "TLS handshake with %s failed: server certificate "
                        "rejected: %s", conn->address, text.data);
            gnutls_free(text.data);
            return false;
        }
        char why[128];

        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_FAILED,
                    "TLS handshake with %s failed: %s%s", conn->address,
                    tls_why(conn, ret, why, sizeof(why)),
                    ret == GNUTLS_E_PREMATURE_TERMINATION ||
                    ret == GNUTLS_E_PULL_ERROR ?
                    " (the coordinator refused us: see its log)" : "");
        return false;
    }
    return true;

fail:
    g_set_error(errp, G_IO_ERROR, G_IO_ERROR_FAILED, "TLS setup for %s: %s",
                conn->address, gnutls_strerror(ret));
    return false;
}

ExtlockConn *extlock_conn_connect_tls(const char *address,
                                      const ExtlockTlsOptions *tls,
                                      GError **errp)
{
    ExtlockConn *conn;

    if (tls && tls->creds_dir && !g_str_has_prefix(address, "tcp:")) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "TLS needs a tcp:HOST:PORT address, not %s", address);
        return NULL;
    }
    conn = extlock_conn_connect(address, errp);
    if (!conn || !tls || !tls->creds_dir) {
        return conn;
    }
    if (!tls_setup(conn, tls, errp)) {
        extlock_conn_close(conn);
        return NULL;
    }
    return conn;
}

void extlock_conn_set_nonblocking(ExtlockConn *conn)
{
    fcntl(conn->fd, F_SETFL, fcntl(conn->fd, F_GETFL) | O_NONBLOCK);
}

static ssize_t tls_result(ssize_t n)
{
    if (n >= 0) {
        return n;
    }
    if (n == GNUTLS_E_PREMATURE_TERMINATION) {
        return 0;
    }
    errno = n == GNUTLS_E_AGAIN ? EAGAIN :
            n == GNUTLS_E_INTERRUPTED ? EINTR : EPROTO;
    return -1;
}

ssize_t extlock_conn_recv_nb(ExtlockConn *conn, void *buf, size_t len)
{
    if (conn->tls) {
        return tls_result(gnutls_record_recv(conn->tls, buf, len));
    }
    return recv(conn->fd, buf, len, MSG_DONTWAIT);
}

ssize_t extlock_conn_send_nb(ExtlockConn *conn, const void *buf, size_t len)
{
    if (conn->tls) {
        return tls_result(gnutls_record_send(conn->tls, buf, len));
    }
    return send(conn->fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
}

bool extlock_conn_tls_pending(ExtlockConn *conn)
{
    return conn->tls && gnutls_record_check_pending(conn->tls) > 0;
}

/* ------------------------------------------------------------------ */
/* Several coordinators (HA)                                           */

ExtlockConn *extlock_conn_connect_leader(const char *addresses,
                                         const ExtlockTlsOptions *tls,
                                         const char *client_id,
                                         const char *lock_space,
                                         uint32_t lease_ms,
                                         ExtlockMsg *welcome, int timeout_ms,
                                         GError **errp)
{
    g_auto(GStrv) list = g_strsplit(addresses, ",", -1);
    guint n = g_strv_length(list);
    int64_t deadline = g_get_monotonic_time() + timeout_ms * 1000LL;
    g_autofree char *next = NULL;      /* named by a follower */
    g_autoptr(GString) why = g_string_new(NULL);
    guint i = 0;
    int backoff_ms = 20;

    if (n == 0) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "no coordinator address");
        return NULL;
    }
    while (g_get_monotonic_time() < deadline) {
        g_autofree char *addr = next ? g_steal_pointer(&next)
                                     : g_strdup(list[i++ % n]);
        g_autoptr(GError) err = NULL;
        ExtlockConn *conn;
        ExtlockMsg req, reply;

        conn = tls ? extlock_conn_connect_tls(addr, tls, &err)
                   : extlock_conn_connect(addr, &err);
        if (!conn) {
            g_string_printf(why, "%s", err->message);
            goto retry;
        }
        extlock_msg_init(&req, EXTLOCK_MSG_HELLO);
        extlock_msg_init(&reply, EXTLOCK_MSG_INVALID);
        req.client_id = (char *)client_id;
        req.lock_space = (char *)lock_space;
        req.lease_ms = lease_ms;
        if (!extlock_conn_call(conn, &req, &reply,
                               MAX(1, (deadline - g_get_monotonic_time()) /
                                      1000), &err)) {
            g_string_printf(why, "%s: %s", addr, err->message);
            extlock_conn_close(conn);
            extlock_msg_clear(&reply);
            goto retry;
        }
        if (reply.type == EXTLOCK_MSG_WELCOME) {
            if (welcome) {
                extlock_msg_clear(welcome);
                *welcome = reply;
            } else {
                extlock_msg_clear(&reply);
            }
            return conn;
        }
        extlock_conn_close(conn);
        if (reply.type == EXTLOCK_MSG_ERROR &&
            reply.error == EXTLOCK_ERR_NOT_LEADER) {
            g_string_printf(why, "%s: not-leader: %s", addr,
                            reply.message ? reply.message : "");
            if (reply.leader && strcmp(reply.leader, addr) != 0) {
                next = g_strdup(reply.leader);
                extlock_msg_clear(&reply);
                continue;           /* follow it at once */
            }
            extlock_msg_clear(&reply);
            goto retry;
        }
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_FAILED,
                    "hello refused by %s: %s: %s", addr,
                    reply.type == EXTLOCK_MSG_ERROR ?
                    extlock_error_code_name(reply.error) :
                    extlock_msg_type_name(reply.type),
                    reply.message ? reply.message : "");
        extlock_msg_clear(&reply);
        return NULL;
retry:
        /* A round over every address without success: wait a little */
        if (i % n == 0) {
            g_usleep(backoff_ms * 1000);
            backoff_ms = MIN(backoff_ms * 2, 500);
        }
    }
    g_set_error(errp, G_IO_ERROR, G_IO_ERROR_TIMED_OUT,
                "no leader among %s within %d ms (last: %s)", addresses,
                timeout_ms, why->str);
    return NULL;
}
