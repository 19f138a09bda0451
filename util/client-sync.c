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
#include <netdb.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <gio/gio.h>
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
};

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
                       const char *address)
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
    int fd;

    if (!address || !address[0]) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "empty coordinator address");
        return NULL;
    }
    if (g_str_has_prefix(address, "unix:")) {
        fd = connect_unix(address + 5, errp, address);
    } else if (g_str_has_prefix(address, "tcp:")) {
        fd = connect_tcp(address + 4, errp, address);
    } else {
        fd = connect_unix(address, errp, address);
    }
    if (fd < 0) {
        return NULL;
    }

    conn = g_new0(ExtlockConn, 1);
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
        ssize_t n = send(conn->fd, p, len, MSG_NOSIGNAL);

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
        r = poll(&pfd, 1, wait_ms);
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
