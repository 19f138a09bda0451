/*
 * extlockd: listeners
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Listening sockets (UNIX and TCP, the latter with TLS unless
 * --insecure): opening them, removing stale UNIX sockets, accepting
 * connections and finding out who the peer is (SO_PEERCRED on UNIX
 * sockets, the address on TCP) before connection.c takes over.
 */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <glib.h>
#include <glib-unix.h>
#include <gio/gio.h>

#include "server-int.h"

#define LISTEN_PAUSE_MS     100         /* after EMFILE and friends */

struct ExtlockdListener {
    ExtlockdServer *server;
    char *address;
    int fd;
    bool is_tcp;
    guint watch;
    guint resume_timer;
    char *unix_path;             /* unlinked at exit if still ours */
    dev_t dev;
    ino_t ino;
    bool tls;                    /* TCP with TLS */
};

static gboolean listener_accept(int fd, GIOCondition cond, gpointer opaque);

static gboolean listener_resume(gpointer opaque)
{
    ExtlockdListener *listener = opaque;

    listener->resume_timer = 0;
    listener->watch = g_unix_fd_add(listener->fd, G_IO_IN, listener_accept,
                                    listener);
    return G_SOURCE_REMOVE;
}

static void listener_describe_peer(ExtlockdListener *listener,
                                   struct sockaddr *sa,
                                   socklen_t len, char *buf, size_t size)
{
    char host[NI_MAXHOST], serv[NI_MAXSERV];

    if (!listener->is_tcp ||
        getnameinfo(sa, len, host, sizeof(host), serv, sizeof(serv),
                    NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
        g_strlcpy(buf, listener->address, size);
        return;
    }
    if (sa->sa_family == AF_INET6) {
        g_snprintf(buf, size, "[%s]:%s", host, serv);
    } else {
        g_snprintf(buf, size, "%s:%s", host, serv);
    }
}

/*
 * Who is @fd?  UNIX: "uid:N" from SO_PEERCRED (and the pid, in @peer);
 * TCP with TLS: known after the handshake; TCP without: "anonymous".
 * @key: what the per-peer cap counts (the uid, or the IP address).
 */
static bool listener_identify_peer(ExtlockdListener *listener, int fd,
                                   struct sockaddr *sa,
                                   socklen_t len, char *peer, size_t peer_size,
                                   char *key, size_t key_size, char *identity,
                                   size_t identity_size)
{
    identity[0] = '\0';
    if (!listener->is_tcp) {
        struct ucred cred;
        socklen_t clen = sizeof(cred);
        size_t used = strlen(peer);

        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) < 0) {
            g_warning("%s: cannot get the peer's credentials: %s; closing",
                      listener->address, g_strerror(errno));
            return false;
        }
        g_snprintf(peer + used, peer_size - used, " uid %u pid %ld",
                   (unsigned)cred.uid, (long)cred.pid);
        g_snprintf(identity, identity_size, "uid:%u", (unsigned)cred.uid);
        g_strlcpy(key, identity, key_size);
        return true;
    }
    if (getnameinfo(sa, len, key, key_size, NULL, 0, NI_NUMERICHOST) != 0) {
        g_strlcpy(key, "?", key_size);
    }
    if (!listener->tls) {
        g_strlcpy(identity, EXTLOCKD_IDENTITY_ANONYMOUS, identity_size);
    }
    return true;
}

static gboolean listener_accept(int fd, GIOCondition cond, gpointer opaque)
{
    ExtlockdListener *listener = opaque;
    ExtlockdServer *server = listener->server;

    for (int i = 0; i < 64; i++) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        char peer[NI_MAXHOST + NI_MAXSERV + 64];
        char key[NI_MAXHOST + 8], identity[32];
        int cfd;

        cfd = accept4(fd, (struct sockaddr *)&ss, &len,
                      SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) {
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                break;
            }
            g_warning("accept on %s failed: %s; pausing for %d ms",
                      listener->address, g_strerror(errno), LISTEN_PAUSE_MS);
            listener->watch = 0;
            listener->resume_timer = g_timeout_add(LISTEN_PAUSE_MS,
                                                   listener_resume, listener);
            return G_SOURCE_REMOVE;
        }
        if (listener->is_tcp) {
            int one = 1;
            setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        }
        listener_describe_peer(listener, (struct sockaddr *)&ss, len, peer,
                               sizeof(peer));
        if (!listener_identify_peer(listener, cfd, (struct sockaddr *)&ss, len,
                                    peer,
                                    sizeof(peer), key, sizeof(key), identity,
                                    sizeof(identity))) {
            close(cfd);
            continue;
        }
        if (!(identity[0] && extlockd_policy_is_admin(server->policy,
                                                      identity)) &&
            !conn_admit(server, key, peer)) {
            if (!listener->tls) {
                /* Best effort: say why (TLS peers get no plaintext) */
                static const char why[] =
                    "{\"type\":\"error\",\"code\":\"limit-exceeded\","
                    "\"message\":\"too many connections without hello; "
                    "try again later\"}\n";
                ssize_t n = send(cfd, why, sizeof(why) - 1,
                                 MSG_DONTWAIT | MSG_NOSIGNAL);
                (void)n;
            }
            close(cfd);
            continue;
        }
        conn_new(server, cfd, peer, key, identity[0] ? identity : NULL,
                 listener->tls);
    }
    return G_SOURCE_CONTINUE;
}

static void listener_close(ExtlockdListener *listener)
{
    if (listener->watch) {
        g_source_remove(listener->watch);
        listener->watch = 0;
    }
    if (listener->resume_timer) {
        g_source_remove(listener->resume_timer);
        listener->resume_timer = 0;
    }
    if (listener->fd >= 0) {
        close(listener->fd);
        listener->fd = -1;
    }
    if (listener->unix_path) {
        struct stat st;

        /* Only remove the socket if it is still the one we created */
        if (lstat(listener->unix_path,
                  &st) == 0 && st.st_dev == listener->dev &&
            st.st_ino == listener->ino) {
            unlink(listener->unix_path);
        }
        g_free(listener->unix_path);
        listener->unix_path = NULL;
    }
}

void listener_free(gpointer p)
{
    ExtlockdListener *listener = p;

    listener_close(listener);
    g_free(listener->address);
    g_free(listener);
}

static void listener_add(ExtlockdServer *server, const char *address, int fd,
                         bool is_tcp, const char *unix_path)
{
    ExtlockdListener *listener = g_new0(ExtlockdListener, 1);

    listener->tls = is_tcp && server->tls;
    listener->server = server;
    listener->address = g_strdup(address);
    listener->fd = fd;
    listener->is_tcp = is_tcp;
    if (unix_path) {
        struct stat st;

        listener->unix_path = g_strdup(unix_path);
        if (lstat(unix_path, &st) == 0) {
            listener->dev = st.st_dev;
            listener->ino = st.st_ino;
        }
    }
    listener->watch = g_unix_fd_add(fd, G_IO_IN, listener_accept, listener);
    g_ptr_array_add(server->listeners, listener);
}

static bool listener_remove_stale_socket(const char *path, GError **errp)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    struct stat st;
    int fd, ret, err;

    if (lstat(path, &st) < 0) {
        if (errno == ENOENT) {
            return true;
        }
        err = errno;
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(err),
                    "cannot stat %s: %s", path, g_strerror(err));
        return false;
    }
    if (!S_ISSOCK(st.st_mode)) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_EXISTS,
                    "%s exists and is not a socket", path);
        return false;
    }
    g_strlcpy(sun.sun_path, path, sizeof(sun.sun_path));
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        err = errno;
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(err),
                    "socket: %s", g_strerror(err));
        return false;
    }
    ret = connect(fd, (struct sockaddr *)&sun, sizeof(sun));
    err = errno;
    close(fd);
    if (ret == 0) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_ADDRESS_IN_USE,
                    "another server is listening on %s", path);
        return false;
    }
    if (err != ECONNREFUSED && err != ENOENT) {
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(err),
                    "cannot probe %s: %s", path, g_strerror(err));
        return false;
    }
    g_message("removing stale socket %s", path);
    if (unlink(path) < 0 && errno != ENOENT) {
        err = errno;
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(err),
                    "cannot remove stale socket %s: %s", path,
                    g_strerror(err));
        return false;
    }
    return true;
}

static bool listener_open_unix(ExtlockdServer *server, const char *address,
                               const char *path, GError **errp)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    g_autofree char *dir = NULL;
    int fd, err;

    if (!path[0]) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "%s: empty socket path", address);
        return false;
    }
    if (strlen(path) >= sizeof(sun.sun_path)) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "%s: socket path longer than %zu bytes", address,
                    sizeof(sun.sun_path) - 1);
        return false;
    }
    dir = g_path_get_dirname(path);
    if (g_mkdir_with_parents(dir, 0755) < 0) {
        err = errno;
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(err),
                    "cannot create directory %s: %s", dir, g_strerror(err));
        return false;
    }
    if (!listener_remove_stale_socket(path, errp)) {
        return false;
    }
    memcpy(sun.sun_path, path, strlen(path) + 1);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 ||
        bind(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0 ||
        listen(fd, SOMAXCONN) < 0) {
        err = errno;
        if (fd >= 0) {
            close(fd);
        }
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(err),
                    "cannot listen on %s: %s", address, g_strerror(err));
        return false;
    }
    listener_add(server, address, fd, false, path);
    g_message("listening on unix:%s", path);
    return true;
}

static bool listener_open_tcp(ExtlockdServer *server, const char *address,
                              const char *hostport, GError **errp)
{
    const char *colon = strrchr(hostport, ':');
    g_autofree char *host = NULL;
    struct addrinfo hints = {
        .ai_flags = AI_PASSIVE | AI_NUMERICSERV,
        .ai_socktype = SOCK_STREAM,
    };
    struct addrinfo *res, *ai;
    int ret, err = 0, count = 0;

    if (!colon || !colon[1]) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "%s: expected tcp:HOST:PORT", address);
        return false;
    }
    if (!server->tls && !server->cfg.insecure) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED,
                    "%s: TCP without TLS lets anybody who can reach the "
                    "port take locks; give --tls-creds-dir DIR (or "
                    "--insecure to accept that)", address);
        return false;
    }
    host = g_strndup(hostport, colon - hostport);
    if (host[0] == '[' && host[strlen(host) - 1] == ']') {
        memmove(host, host + 1, strlen(host) - 2);
        host[strlen(host) - 2] = '\0';
    }
    ret = getaddrinfo(host[0] ? host : NULL, colon + 1, &hints, &res);
    if (ret != 0) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "%s: %s", address, gai_strerror(ret));
        return false;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        char desc[NI_MAXHOST], serv[NI_MAXSERV];
        struct sockaddr_storage bound;
        socklen_t bound_len;
        int one = 1;
        int fd = socket(ai->ai_family,
                        ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                        ai->ai_protocol);

        if (fd < 0) {
            err = errno;
            continue;
        }
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (ai->ai_family == AF_INET6) {
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
        }
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 ||
            listen(fd, SOMAXCONN) < 0) {
            err = errno;
            close(fd);
            continue;
        }
        listener_add(server, address, fd, true, NULL);
        bound_len = sizeof(bound);
        if (getsockname(fd, (struct sockaddr *)&bound, &bound_len) < 0 ||
            getnameinfo((struct sockaddr *)&bound, bound_len, desc,
                        NI_MAXHOST, serv, sizeof(serv),
                        NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
            g_strlcpy(desc, "?", sizeof(desc));
            g_strlcpy(serv, colon + 1, sizeof(serv));
        }
        g_message("listening on tcp:%s%s%s:%s (%s)",
                  ai->ai_family == AF_INET6 ? "[" : "", desc,
                  ai->ai_family == AF_INET6 ? "]" : "", serv,
                  server->tls ? extlockd_tls_creds_kinds(server->tls) :
                  "NO TLS, NO AUTHENTICATION");
        count++;
    }
    freeaddrinfo(res);
    if (count == 0) {
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(err),
                    "cannot listen on %s: %s", address, g_strerror(err));
        return false;
    }
    return true;
}

bool extlockd_server_listen(ExtlockdServer *server, const char *address,
                            GError **errp)
{
    if (g_str_has_prefix(address, "unix:")) {
        return listener_open_unix(server, address, address + 5, errp);
    }
    if (address[0] == '/') {
        return listener_open_unix(server, address, address, errp);
    }
    if (g_str_has_prefix(address, "tcp:")) {
        return listener_open_tcp(server, address, address + 4, errp);
    }
    g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                "unsupported address %s (use unix:PATH or tcp:HOST:PORT)",
                address);
    return false;
}

void extlockd_server_stop_listening(ExtlockdServer *server)
{
    for (guint i = 0; i < server->listeners->len; i++) {
        listener_close(server->listeners->pdata[i]);
    }
}
