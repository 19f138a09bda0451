/*
 * extlockctl freeze --guest-agent: the QEMU guest agent's fsfreeze
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The guest agent (qemu-ga) is reached through the host side of its
 * channel: the unix socket of the chardev behind the guest's
 * org.qemu.guest_agent.0 virtio-serial port (e.g. -chardev
 * socket,path=/run/vm1-ga.sock,server=on,wait=off,id=ga0).  Each call
 * connects, resynchronises with guest-sync-delimited (a previous client
 * may have left a reply in the channel: everything before the agent's
 * 0xFF delimiter and the reply with our id is dropped), sends one
 * command, reads its reply and disconnects, so that nothing holds the
 * channel between calls.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <glib.h>
#include <json-c/json.h>
#include "guest-agent.h"

#define GA_MAX_REPLY (1024 * 1024)

typedef struct GaConn {
    int fd;
    GString *in;
    int64_t deadline_us;        /* g_get_monotonic_time() */
} GaConn;

static bool ga_fail(char **err, const char *path, const char *fmt, ...)
    G_GNUC_PRINTF(3, 4);

static bool ga_fail(char **err, const char *path, const char *fmt, ...)
{
    g_autofree char *msg = NULL;
    va_list ap;

    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    *err = g_strdup_printf("guest agent %s: %s", path, msg);
    return false;
}

/* Wait for @events on the socket until the deadline; false on timeout */
static bool ga_wait(GaConn *c, short events)
{
    struct pollfd p = { .fd = c->fd, .events = events };
    int64_t left_ms;
    int n;

    do {
        left_ms = (c->deadline_us - g_get_monotonic_time()) / 1000;
        if (left_ms <= 0) {
            return false;
        }
        n = poll(&p, 1, (int)MIN(left_ms, 1000));
    } while (n == 0 || (n < 0 && errno == EINTR));
    return n > 0;
}

static bool ga_send(GaConn *c, const char *path, const char *data,
                    size_t len, char **err)
{
    size_t done = 0;

    while (done < len) {
        ssize_t n = send(c->fd, data + done, len - done, MSG_NOSIGNAL);

        if (n > 0) {
            done += n;
        } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            if (!ga_wait(c, POLLOUT)) {
                return ga_fail(err, path, "timed out sending");
            }
        } else {
            return ga_fail(err, path, "send: %s", g_strerror(errno));
        }
    }
    return true;
}

/*
 * The next line (a JSON reply) into @line, without its newline.  With
 * @delimited, everything up to and including the first 0xFF is dropped
 * first.
 */
static bool ga_read_line(GaConn *c, const char *path, bool delimited,
                         char **line, char **err)
{
    for (;;) {
        char *nl;
        char buf[4096];
        ssize_t n;

        if (delimited) {
            char *ff = memchr(c->in->str, 0xff, c->in->len);

            if (ff) {
                g_string_erase(c->in, 0, ff - c->in->str + 1);
                delimited = false;
            } else {
                g_string_truncate(c->in, 0);
            }
        }
        nl = delimited ? NULL : memchr(c->in->str, '\n', c->in->len);
        if (nl) {
            *line = g_strndup(c->in->str, nl - c->in->str);
            g_string_erase(c->in, 0, nl - c->in->str + 1);
            return true;
        }
        if (c->in->len > GA_MAX_REPLY) {
            return ga_fail(err, path, "reply too long");
        }
        n = recv(c->fd, buf, sizeof(buf), 0);
        if (n > 0) {
            g_string_append_len(c->in, buf, n);
        } else if (n == 0) {
            return ga_fail(err, path, "connection closed");
        } else if (errno == EAGAIN || errno == EINTR) {
            if (!ga_wait(c, POLLIN)) {
                return ga_fail(err, path, "no reply in time");
            }
        } else {
            return ga_fail(err, path, "recv: %s", g_strerror(errno));
        }
    }
}

static bool ga_connect(GaConn *c, const char *path, char **err)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };

    if (strlen(path) >= sizeof(sa.sun_path)) {
        return ga_fail(err, path, "socket path too long");
    }
    strcpy(sa.sun_path, path);
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (c->fd < 0) {
        return ga_fail(err, path, "socket: %s", g_strerror(errno));
    }
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 &&
        errno != EINPROGRESS) {
        return ga_fail(err, path, "connect: %s", g_strerror(errno));
    }
    if (!ga_wait(c, POLLOUT)) {
        return ga_fail(err, path, "connect timed out");
    }
    return true;
}

bool guest_agent_call(const char *path, const char *command,
                      json_object *args, int timeout_ms, json_object **ret,
                      char **err)
{
    GaConn c = { .fd = -1, .in = g_string_new(NULL),
                 .deadline_us = g_get_monotonic_time() +
                                (int64_t)timeout_ms * 1000 };
    int64_t sync_id = g_random_int_range(1, G_MAXINT32);
    g_autofree char *sync = g_strdup_printf(
        "\xff{\"execute\": \"guest-sync-delimited\", "
        "\"arguments\": {\"id\": %" G_GINT64_FORMAT "}}\n", sync_id);
    json_object *req = NULL, *reply = NULL, *v;
    const char *text;
    bool ok = false, synced = false;
    char *line = NULL;

    *ret = NULL;
    if (!ga_connect(&c, path, err) ||
        !ga_send(&c, path, sync, strlen(sync), err)) {
        goto out;
    }
    /* Replies before ours (a previous client's) are dropped */
    while (!synced) {
        if (!ga_read_line(&c, path, true, &line, err)) {
            goto out;
        }
        reply = json_tokener_parse(line);
        g_clear_pointer(&line, g_free);
        synced = reply && json_object_object_get_ex(reply, "return", &v) &&
                 json_object_is_type(v, json_type_int) &&
                 json_object_get_int64(v) == sync_id;
        g_clear_pointer(&reply, json_object_put);
    }

    req = json_object_new_object();
    json_object_object_add(req, "execute", json_object_new_string(command));
    if (args) {
        json_object_object_add(req, "arguments", json_object_get(args));
    }
    text = json_object_to_json_string_ext(req, JSON_C_TO_STRING_PLAIN);
    if (!ga_send(&c, path, text, strlen(text), err) ||
        !ga_send(&c, path, "\n", 1, err)) {
        goto out;
    }
    do {
        if (!ga_read_line(&c, path, false, &line, err)) {
            goto out;
        }
        reply = json_tokener_parse(line);
        g_clear_pointer(&line, g_free);
    } while (!reply);   /* blank lines */
    if (json_object_object_get_ex(reply, "error", &v)) {
        json_object *desc = NULL;

        json_object_object_get_ex(v, "desc", &desc);
        ga_fail(err, path, "%s: %s", command,
                desc ? json_object_get_string(desc) : "error");
        goto out;
    }
    if (!json_object_object_get_ex(reply, "return", &v)) {
        ga_fail(err, path, "%s: unexpected reply", command);
        goto out;
    }
    *ret = json_object_get(v);
    ok = true;

out:
    json_object_put(reply);
    json_object_put(req);
    if (c.fd >= 0) {
        close(c.fd);
    }
    g_string_free(c.in, true);
    return ok;
}

bool guest_agent_freeze(const char *path, char **mountpoints, int timeout_ms,
                        int64_t *frozen, char **err)
{
    json_object *args = NULL, *ret = NULL;
    bool ok;

    if (mountpoints && mountpoints[0]) {
        json_object *list = json_object_new_array();

        for (char **m = mountpoints; *m; m++) {
            json_object_array_add(list, json_object_new_string(*m));
        }
        args = json_object_new_object();
        json_object_object_add(args, "mountpoints", list);
    }
    ok = guest_agent_call(path, args ? "guest-fsfreeze-freeze-list"
                                     : "guest-fsfreeze-freeze",
                          args, timeout_ms, &ret, err);
    json_object_put(args);
    if (ok && !json_object_is_type(ret, json_type_int)) {
        ok = ga_fail(err, path, "fsfreeze: unexpected reply");
    }
    if (ok) {
        *frozen = json_object_get_int64(ret);
    }
    json_object_put(ret);
    return ok;
}

bool guest_agent_thaw(const char *path, int timeout_ms, int64_t *thawed,
                      char **err)
{
    json_object *ret = NULL;
    bool ok = guest_agent_call(path, "guest-fsfreeze-thaw", NULL, timeout_ms,
                               &ret, err);

    if (ok) {
        *thawed = json_object_is_type(ret, json_type_int) ?
                  json_object_get_int64(ret) : 0;
    }
    json_object_put(ret);
    return ok;
}
