/*
 * extlock: non-blocking coordinator client for the extlock block filter
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qapi/error.h"
#include "qemu/error-report.h"
#include "qemu/sockets.h"
#include "qemu/main-loop.h"
#include "io/channel-socket.h"
#include "extlock-client.h"
#include "trace.h"

/* How long open waits for the coordinator's welcome */
#define EXTLOCK_HELLO_TIMEOUT_MS 10000
/* How long close waits to hand "bye" to the kernel */
#define EXTLOCK_BYE_TIMEOUT_MS   1000

static void extlock_client_set_handlers(ExtlockClient *c);
static void extlock_client_fail(ExtlockClient *c, const char *why);

static char *extlock_address_str(const SocketAddress *addr)
{
    switch (addr->type) {
    case SOCKET_ADDRESS_TYPE_UNIX:
        return g_strdup_printf("unix:%s", addr->u.q_unix.path);
    case SOCKET_ADDRESS_TYPE_INET:
        return g_strdup_printf("inet:%s:%s", addr->u.inet.host,
                               addr->u.inet.port);
    case SOCKET_ADDRESS_TYPE_VSOCK:
        return g_strdup_printf("vsock:%s:%s", addr->u.vsock.cid,
                               addr->u.vsock.port);
    case SOCKET_ADDRESS_TYPE_FD:
        return g_strdup_printf("fd:%s", addr->u.fd.str);
    default:
        return g_strdup("unknown");
    }
}

static void extlock_request_finish(ExtlockRequest *req, int ret)
{
    req->done = true;
    req->ret = ret;
}

/* ------------------------------------------------------------------------
 * Output
 */

static void extlock_client_flush(ExtlockClient *c)
{
    while (c->fd >= 0 && c->out_done < c->out->len) {
        ssize_t n = send(c->fd, c->out->str + c->out_done,
                         c->out->len - c->out_done, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                break;
            }
            extlock_client_fail(c, strerror(errno));
            return;
        }
        c->out_done += n;
    }
    if (c->out_done == c->out->len) {
        g_string_truncate(c->out, 0);
        c->out_done = 0;
    }
    extlock_client_set_handlers(c);
}

static void extlock_client_send(ExtlockClient *c, const ExtlockMsg *msg)
{
    if (c->fd < 0) {
        return;
    }
    extlock_msg_format(msg, c->out);
    extlock_client_flush(c);
}

/* ------------------------------------------------------------------------
 * Input
 */

static void extlock_client_handle(ExtlockClient *c, ExtlockMsg *msg,
                                  GPtrArray *wake)
{
    ExtlockRequest *req = NULL;

    if (msg->has_id) {
        req = g_hash_table_lookup(c->pending, &msg->id);
    }

    switch (msg->type) {
    case EXTLOCK_MSG_WAITING:
        if (req && !req->queued) {
            req->queued = true;
            req->token = msg->token;
            c->stats.waits++;
            for (guint i = 0; msg->blockers && i < msg->blockers->len; i++) {
                ExtlockBlocker *b = &g_array_index(msg->blockers,
                                                   ExtlockBlocker, i);
                g_ptr_array_add(req->blocked_by, g_strdup(b->client_id));
            }
            trace_extlock_client_waiting(c->node_name, req->id, req->offset,
                                         req->length, req->blocked_by->len);
        }
        return;
    case EXTLOCK_MSG_GRANTED:
        if (!req) {
            break;
        }
        req->granted = true;
        req->lock_id = msg->lock;
        req->token = msg->token;
        req->grant_ns = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
        c->stats.grants++;
        if (req->queued) {
            c->stats.total_wait_us += (req->grant_ns - req->start_ns) / 1000;
        }
        trace_extlock_client_granted(c->node_name, req->id, msg->lock,
                                     msg->token);
        g_hash_table_remove(c->pending, &req->id);
        extlock_request_finish(req, 0);
        g_ptr_array_add(wake, req);
        return;
    case EXTLOCK_MSG_ERROR:
        if (!req) {
            /* error to an unlock or renew: the session is in trouble */
            error_report("extlock: node '%s': coordinator %s: %s (%s)",
                         c->node_name, c->address, msg->message,
                         extlock_error_code_name(msg->error));
            if (msg->has_id && msg->id == c->renew_id) {
                c->renew_id = 0;
            }
            return;
        }
        error_report("extlock: node '%s': coordinator %s refused lock "
                     "[%" PRIu64 ", +%" PRIu64 "): %s (%s)", c->node_name,
                     c->address, req->offset, req->length, msg->message,
                     extlock_error_code_name(msg->error));
        c->stats.errors++;
        g_hash_table_remove(c->pending, &req->id);
        extlock_request_finish(req, -EIO);
        g_ptr_array_add(wake, req);
        return;
    case EXTLOCK_MSG_RENEWED:
        if (msg->has_id && msg->id == c->renew_id) {
            c->lease_deadline_ns = c->renew_sent_ns +
                                   (int64_t)c->lease_ms * SCALE_MS;
            c->renew_id = 0;
            trace_extlock_client_renewed(c->node_name,
                                         extlock_client_lease_remaining_ms(c));
        }
        return;
    case EXTLOCK_MSG_UNLOCKED:
        return;
    case EXTLOCK_MSG_SESSION_EXPIRED:
        extlock_client_fail(c, msg->message ? msg->message
                                            : "session expired");
        return;
    case EXTLOCK_MSG_REVOKE:
        /* Locks are held only while requests run; nothing is cached yet */
        return;
    default:
        break;
    }
    trace_extlock_client_unexpected(c->node_name,
                                    extlock_msg_type_name(msg->type));
}

static void extlock_client_read(void *opaque)
{
    ExtlockClient *c = opaque;
    g_autoptr(GPtrArray) wake = g_ptr_array_new();
    char buf[16384];

    while (c->fd >= 0) {
        ssize_t n = recv(c->fd, buf, sizeof(buf), 0);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        }
        if (n <= 0) {
            extlock_client_fail(c, n == 0 ? "connection closed by coordinator"
                                          : strerror(errno));
            break;
        }
        extlock_linebuf_append(&c->in, buf, n);
        for (;;) {
            const char *line;
            size_t len;
            ExtlockMsg msg;
            ExtlockProtoError err;
            ExtlockLineResult r = extlock_linebuf_next(&c->in, &line, &len);

            if (r == EXTLOCK_LINE_NONE) {
                break;
            }
            if (r == EXTLOCK_LINE_TOO_LONG) {
                extlock_client_fail(c, "oversized message from coordinator");
                break;
            }
            extlock_msg_init(&msg, EXTLOCK_MSG_INVALID);
            if (!extlock_msg_parse(line, len, &msg, &err)) {
                g_autofree char *why =
                    g_strdup_printf("bad message from coordinator: %s",
                                    err.message);
                extlock_msg_clear(&msg);
                extlock_client_fail(c, why);
                break;
            }
            extlock_client_handle(c, &msg, wake);
            extlock_msg_clear(&msg);
            if (c->fd < 0) {
                break;
            }
        }
        if ((size_t)n < sizeof(buf)) {
            break;
        }
    }

    /*
     * Wake the requests only now, so that what they do (send, unlock,
     * even fail the connection) cannot disturb the parsing above.
     */
    for (guint i = 0; i < wake->len; i++) {
        ExtlockRequest *req = g_ptr_array_index(wake, i);
        if (req->co) {
            aio_co_wake(req->co);
        }
    }
}

static void extlock_client_write(void *opaque)
{
    extlock_client_flush(opaque);
}

static void extlock_client_set_handlers(ExtlockClient *c)
{
    if (c->fd < 0 || !c->ctx) {
        return;
    }
    aio_set_fd_handler(c->ctx, c->fd, false, extlock_client_read,
                       c->out->len > c->out_done ? extlock_client_write : NULL,
                       NULL, NULL, c);
}

/*
 * The connection is unusable: fail every pending request and stop.
 * Requests that hold locks keep running: the coordinator keeps their
 * locks until our lease lapses.
 */
static void extlock_client_fail(ExtlockClient *c, const char *why)
{
    GHashTableIter it;
    gpointer value;

    if (c->fd < 0) {
        return;
    }
    error_report("extlock: node '%s': lost coordinator %s: %s",
                 c->node_name, c->address, why);
    trace_extlock_client_disconnected(c->node_name, why);
    if (c->ctx) {
        aio_set_fd_handler(c->ctx, c->fd, false, NULL, NULL, NULL, NULL,
                           NULL);
    }
    c->fd = -1;
    qio_channel_close(QIO_CHANNEL(c->sioc), NULL);
    if (c->renew_timer) {
        timer_del(c->renew_timer);
    }

    g_hash_table_iter_init(&it, c->pending);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        ExtlockRequest *req = value;
        c->stats.errors++;
        extlock_request_finish(req, -EIO);
        /* The request that is failing us right now just sees req->done */
        if (req->co &&
            !(qemu_in_coroutine() && req->co == qemu_coroutine_self())) {
            aio_co_schedule(c->ctx ? c->ctx : qemu_get_aio_context(),
                            req->co);
        }
        g_hash_table_iter_remove(&it);
    }
}

/* ------------------------------------------------------------------------
 * Lease
 */

static void extlock_client_renew(void *opaque)
{
    ExtlockClient *c = opaque;
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);

    if (c->fd < 0) {
        return;
    }
    if (!c->renew_id) {
        ExtlockMsg msg;
        extlock_msg_init(&msg, EXTLOCK_MSG_RENEW);
        msg.has_id = true;
        msg.id = c->renew_id = c->next_id++;
        c->renew_sent_ns = now;
        extlock_client_send(c, &msg);
        extlock_msg_clear(&msg);
    }
    /* Three renewals per lease: one lost reply does not lose the lease */
    timer_mod(c->renew_timer, now + (int64_t)c->lease_ms * SCALE_MS / 3);
}

bool extlock_client_connected(ExtlockClient *c)
{
    return c->fd >= 0;
}

int64_t extlock_client_lease_remaining_ms(ExtlockClient *c)
{
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    return (c->lease_deadline_ns - now) / SCALE_MS;
}

/* ------------------------------------------------------------------------
 * Connection set-up and teardown
 */

/* Blocking read of one message with a deadline; used during open only */
static bool extlock_client_recv_sync(ExtlockClient *c, ExtlockMsg *msg,
                                     int timeout_ms, Error **errp)
{
    int64_t deadline = g_get_monotonic_time() + timeout_ms * 1000LL;

    for (;;) {
        const char *line;
        size_t len;
        ExtlockProtoError err;
        ExtlockLineResult r = extlock_linebuf_next(&c->in, &line, &len);
        GPollFD pfd = { .fd = c->fd, .events = G_IO_IN };
        char buf[4096];
        int64_t left;
        ssize_t n;

        if (r == EXTLOCK_LINE_OK) {
            if (!extlock_msg_parse(line, len, msg, &err)) {
                error_setg(errp, "bad message from coordinator: %s",
                           err.message);
                return false;
            }
            return true;
        }
        if (r == EXTLOCK_LINE_TOO_LONG) {
            error_setg(errp, "oversized message from coordinator");
            return false;
        }
        left = (deadline - g_get_monotonic_time()) / 1000;
        if (left <= 0) {
            error_setg(errp, "coordinator did not answer within %d ms",
                       timeout_ms);
            return false;
        }
        if (g_poll(&pfd, 1, left) < 0 && errno != EINTR) {
            error_setg_errno(errp, errno, "poll");
            return false;
        }
        n = recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n == 0) {
            error_setg(errp, "coordinator closed the connection");
            return false;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
                continue;
            }
            error_setg_errno(errp, errno, "read from coordinator");
            return false;
        }
        extlock_linebuf_append(&c->in, buf, n);
    }
}

static bool extlock_client_send_sync(ExtlockClient *c, const ExtlockMsg *msg,
                                     Error **errp)
{
    g_autoptr(GString) out = g_string_new(NULL);

    extlock_msg_format(msg, out);
    if (qio_channel_write_all(QIO_CHANNEL(c->sioc), out->str, out->len,
                              errp) < 0) {
        error_prepend(errp, "write to coordinator: ");
        return false;
    }
    return true;
}

static bool extlock_client_hello(ExtlockClient *c, uint32_t lease_ms,
                                 Error **errp)
{
    ExtlockMsg hello, reply;
    bool ok;

    extlock_msg_init(&hello, EXTLOCK_MSG_HELLO);
    hello.has_id = true;
    hello.id = c->next_id++;
    hello.version = EXTLOCK_PROTOCOL_VERSION;
    hello.client_id = g_strdup(c->client_id);
    hello.lock_space = g_strdup(c->lock_space);
    hello.lease_ms = lease_ms;
    ok = extlock_client_send_sync(c, &hello, errp);
    extlock_msg_clear(&hello);
    if (!ok) {
        return false;
    }

    extlock_msg_init(&reply, EXTLOCK_MSG_INVALID);
    if (!extlock_client_recv_sync(c, &reply, EXTLOCK_HELLO_TIMEOUT_MS,
                                  errp)) {
        extlock_msg_clear(&reply);
        return false;
    }
    if (reply.type == EXTLOCK_MSG_ERROR) {
        error_setg(errp, "coordinator refused the session: %s (%s)",
                   reply.message ? reply.message : "",
                   extlock_error_code_name(reply.error));
        extlock_msg_clear(&reply);
        return false;
    }
    if (reply.type != EXTLOCK_MSG_WELCOME || reply.version !=
        EXTLOCK_PROTOCOL_VERSION || !reply.session) {
        error_setg(errp, "unexpected answer to hello from coordinator: %s",
                   extlock_msg_type_name(reply.type));
        extlock_msg_clear(&reply);
        return false;
    }
    c->session = g_strdup(reply.session);
    c->epoch = reply.epoch;
    c->lease_ms = reply.lease_ms;
    extlock_msg_clear(&reply);
    return true;
}

ExtlockClient *extlock_client_new(const SocketAddress *addr,
                                  const char *client_id,
                                  const char *lock_space, uint32_t lease_ms,
                                  const char *node_name, AioContext *ctx,
                                  Error **errp)
{
    ExtlockClient *c = g_new0(ExtlockClient, 1);
    int64_t sent_ns;

    c->address = extlock_address_str(addr);
    c->client_id = g_strdup(client_id);
    c->lock_space = g_strdup(lock_space);
    c->node_name = node_name;
    c->fd = -1;
    c->next_id = 1;
    c->out = g_string_sized_new(4096);
    c->pending = g_hash_table_new(g_int64_hash, g_int64_equal);
    extlock_linebuf_init(&c->in);
    QLIST_INIT(&c->requests);

    c->sioc = qio_channel_socket_new();
    qio_channel_set_name(QIO_CHANNEL(c->sioc), "extlock-coordinator");
    if (qio_channel_socket_connect_sync(c->sioc, (SocketAddress *)addr,
                                        errp) < 0) {
        error_prepend(errp, "Failed to connect to extlock coordinator at "
                      "%s: ", c->address);
        goto fail;
    }
    c->fd = c->sioc->fd;
    if (addr->type == SOCKET_ADDRESS_TYPE_INET) {
        socket_set_nodelay(c->fd);
    }

    sent_ns = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    if (!extlock_client_hello(c, lease_ms, errp)) {
        error_prepend(errp, "extlock coordinator at %s: ", c->address);
        goto fail;
    }
    c->lease_deadline_ns = sent_ns + (int64_t)c->lease_ms * SCALE_MS;
    trace_extlock_client_connected(node_name, c->address, c->session,
                                   c->epoch, c->lease_ms);

    qemu_socket_set_nonblock(c->fd);
    extlock_client_attach_aio_context(c, ctx);
    return c;

fail:
    c->fd = -1;
    extlock_client_free(c);
    return NULL;
}

void extlock_client_free(ExtlockClient *c)
{
    if (!c) {
        return;
    }
    extlock_client_detach_aio_context(c);
    assert(QLIST_EMPTY(&c->requests));
    if (c->fd >= 0) {
        /*
         * Tell the coordinator we stopped I/O, so that it releases our
         * locks now instead of after the lease.  Best effort, bounded.
         */
        ExtlockMsg bye;
        GPollFD pfd = { .fd = c->fd, .events = G_IO_OUT };
        int64_t deadline = g_get_monotonic_time() +
                           EXTLOCK_BYE_TIMEOUT_MS * 1000LL;

        extlock_msg_init(&bye, EXTLOCK_MSG_BYE);
        bye.has_id = true;
        bye.id = c->next_id++;
        extlock_msg_format(&bye, c->out);
        extlock_msg_clear(&bye);
        while (c->out_done < c->out->len &&
               g_get_monotonic_time() < deadline) {
            ssize_t n = send(c->fd, c->out->str + c->out_done,
                             c->out->len - c->out_done, MSG_NOSIGNAL);
            if (n > 0) {
                c->out_done += n;
            } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
                g_poll(&pfd, 1, 10);
            } else {
                break;
            }
        }
        trace_extlock_client_bye(c->node_name);
    }
    if (c->sioc) {
        qio_channel_close(QIO_CHANNEL(c->sioc), NULL);
        object_unref(OBJECT(c->sioc));
    }
    extlock_linebuf_destroy(&c->in);
    g_string_free(c->out, true);
    g_hash_table_destroy(c->pending);
    g_free(c->session);
    g_free(c->address);
    g_free(c->client_id);
    g_free(c->lock_space);
    g_free(c);
}

void extlock_client_detach_aio_context(ExtlockClient *c)
{
    if (!c->ctx) {
        return;
    }
    if (c->fd >= 0) {
        aio_set_fd_handler(c->ctx, c->fd, false, NULL, NULL, NULL, NULL,
                           NULL);
    }
    if (c->renew_timer) {
        timer_free(c->renew_timer);
        c->renew_timer = NULL;
    }
    c->ctx = NULL;
}

void extlock_client_attach_aio_context(ExtlockClient *c, AioContext *ctx)
{
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);

    c->ctx = ctx;
    if (c->fd < 0) {
        return;
    }
    c->renew_timer = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS,
                                   extlock_client_renew, c);
    timer_mod(c->renew_timer, now + (int64_t)c->lease_ms * SCALE_MS / 3);
    extlock_client_set_handlers(c);
    /* Replies may have arrived while detached */
    extlock_client_read(c);
}

/* ------------------------------------------------------------------------
 * Locks
 */

int coroutine_fn extlock_client_lock(ExtlockClient *c, ExtlockRequest *req)
{
    ExtlockMsg msg;

    req->id = c->next_id++;
    req->co = qemu_coroutine_self();
    req->queued = req->done = req->granted = false;
    req->ret = 0;
    req->token = 0;
    req->start_ns = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    req->blocked_by = g_ptr_array_new_with_free_func(g_free);
    c->stats.requests++;

    if (c->fd < 0) {
        c->stats.errors++;
        g_ptr_array_free(req->blocked_by, true);
        req->blocked_by = NULL;
        return -EIO;
    }
    if (req->start_ns >= c->lease_deadline_ns) {
        /* Fencing: past our lease, somebody else may own our locks */
        error_report_once("extlock: node '%s': lease expired, failing I/O",
                          c->node_name);
        c->stats.errors++;
        g_ptr_array_free(req->blocked_by, true);
        req->blocked_by = NULL;
        return -EIO;
    }

    QLIST_INSERT_HEAD(&c->requests, req, next);
    g_hash_table_insert(c->pending, &req->id, req);

    extlock_msg_init(&msg, EXTLOCK_MSG_LOCK);
    msg.has_id = true;
    msg.id = req->id;
    msg.has_extent = true;
    msg.offset = req->offset;
    msg.length = req->length;
    msg.mode = req->mode;
    msg.wait = true;
    trace_extlock_client_lock(c->node_name, req->id, req->offset,
                              req->length, extlock_mode_name(req->mode));
    extlock_client_send(c, &msg);
    extlock_msg_clear(&msg);

    while (!req->done) {
        qemu_coroutine_yield();
    }
    req->co = NULL;
    if (req->ret < 0) {
        QLIST_REMOVE(req, next);
        g_ptr_array_free(req->blocked_by, true);
        req->blocked_by = NULL;
    }
    return req->ret;
}

void extlock_client_unlock(ExtlockClient *c, ExtlockRequest *req)
{
    ExtlockMsg msg;

    assert(req->granted);
    QLIST_REMOVE(req, next);
    g_ptr_array_free(req->blocked_by, true);
    req->blocked_by = NULL;

    extlock_msg_init(&msg, EXTLOCK_MSG_UNLOCK);
    msg.has_id = true;
    msg.id = c->next_id++;
    msg.lock = req->lock_id;
    trace_extlock_client_unlock(c->node_name, req->lock_id);
    extlock_client_send(c, &msg);
    extlock_msg_clear(&msg);
}
