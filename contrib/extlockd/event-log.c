/*
 * extlockd: the event log (see event-log.h)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <time.h>
#include <unistd.h>
#include <glib.h>

#include "event-log.h"

struct ExtlockdEventLog {
    char *path;
    int fd;
    bool warned;
};

ExtlockdEventLog *extlockd_event_log_open(const char *path, GError **errp)
{
    ExtlockdEventLog *log;
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);

    if (fd < 0) {
        int err = errno;

        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "cannot open event log %s: %s", path, g_strerror(err));
        return NULL;
    }
    log = g_new0(ExtlockdEventLog, 1);
    log->path = g_strdup(path);
    log->fd = fd;
    return log;
}

void extlockd_event_log_close(ExtlockdEventLog *log)
{
    if (!log) {
        return;
    }
    close(log->fd);
    g_free(log->path);
    g_free(log);
}

int64_t extlockd_event_log_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ,"key":"value" with JSON escapes (names have no control characters) */
static void put_str(GString *out, const char *key, const char *value)
{
    if (!value) {
        return;
    }
    g_string_append_printf(out, ",\"%s\":\"", key);
    for (const unsigned char *p = (const unsigned char *)value; *p; p++) {
        if (*p == '"' || *p == '\\') {
            g_string_append_c(out, '\\');
            g_string_append_c(out, *p);
        } else if (*p < 0x20 || *p == 0x7f) {
            g_string_append_printf(out, "\\u%04x", *p);
        } else {
            g_string_append_c(out, *p);
        }
    }
    g_string_append_c(out, '"');
}

void extlockd_event_log_write(ExtlockdEventLog *log, const ExtlockdEvent *ev)
{
    g_autoptr(GString) out = NULL;
    size_t done = 0;

    if (!log) {
        return;
    }
    out = g_string_sized_new(256);
    g_string_append_printf(out, "{\"ts\":%" PRId64,
                           extlockd_event_log_now_ns());
    put_str(out, "event", ev->event);
    put_str(out, "lock-space", ev->lock_space);
    put_str(out, "client-id", ev->client_id);
    put_str(out, "session", ev->session);
    if (ev->has_lock) {
        g_string_append_printf(out, ",\"lock\":%" PRIu64 ",\"token\":%"
                               PRIu64 ",\"offset\":%" PRIu64 ",\"length\":%"
                               PRIu64, ev->lock, ev->token, ev->offset,
                               ev->length);
        put_str(out, "mode", extlock_mode_name(ev->mode));
    }
    put_str(out, "message", ev->message);
    g_string_append(out, "}\n");

    while (done < out->len) {
        ssize_t n = write(log->fd, out->str + done, out->len - done);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            if (!log->warned) {
                log->warned = true;
                g_warning("cannot write to event log %s: %s; events are "
                          "missing from it from now on", log->path,
                          n < 0 ? g_strerror(errno) : "no progress");
            }
            return;
        }
        done += n;
    }
}
