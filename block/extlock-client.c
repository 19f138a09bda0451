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
static void extlock_handle_granted(ExtlockClient *c, ExtlockRequest *req,
                                   ExtlockMsg *msg);
static void extlock_handle_revoke(ExtlockClient *c, ExtlockMsg *msg);
static void extlock_cache_timer_cb(void *opaque);
static void extlock_cache_drop(ExtlockClient *c, ExtlockCachedLock *l);

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
        extlock_handle_granted(c, req, msg);
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
    case EXTLOCK_MSG_DOWNGRADED:
        return;
    case EXTLOCK_MSG_SESSION_EXPIRED:
        extlock_client_fail(c, msg->message ? msg->message
                                            : "session expired");
        return;
    case EXTLOCK_MSG_REVOKE:
        extlock_handle_revoke(c, msg);
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

    /*
     * Cached locks are worthless now: drop the idle ones; active ones take
     * no new users and are forgotten when their requests are done.
     */
    while (!QTAILQ_EMPTY(&c->idle)) {
        ExtlockCachedLock *l = QTAILQ_FIRST(&c->idle);
        extlock_cache_drop(c, l);
    }
    g_hash_table_iter_init(&it, c->lock_ids);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        ((ExtlockCachedLock *)value)->revoking = true;
    }
    if (c->cache_timer) {
        timer_del(c->cache_timer);
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
                                  const ExtlockClientOptions *opts,
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
    c->lock_ids = g_hash_table_new(g_int64_hash, g_int64_equal);
    c->opts = *opts;
    extlock_linebuf_init(&c->in);
    QLIST_INIT(&c->waiting);
    QTAILQ_INIT(&c->idle);
    qemu_co_queue_init(&c->grant_queue);

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
    assert(QLIST_EMPTY(&c->waiting));
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
    /* bye released every lock; nothing may use them any more */
    while (extlock_itree_first(&c->locks)) {
        ExtlockCachedLock *l = container_of(extlock_itree_first(&c->locks),
                                            ExtlockCachedLock, node);
        assert(l->users == 0);
        extlock_cache_drop(c, l);
    }
    extlock_linebuf_destroy(&c->in);
    g_string_free(c->out, true);
    g_hash_table_destroy(c->pending);
    g_hash_table_destroy(c->lock_ids);
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
    if (c->cache_timer) {
        timer_free(c->cache_timer);
        c->cache_timer = NULL;
    }
    c->ctx = NULL;
}

void extlock_client_attach_aio_context(ExtlockClient *c, AioContext *ctx)
{
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);

    c->ctx = ctx;
    c->cache_timer = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS,
                                   extlock_cache_timer_cb, c);
    /* Catch up on revocations and ageing that were due while detached */
    timer_mod(c->cache_timer, now);
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
 * The lock cache
 *
 * Every lock granted to this node is an ExtlockCachedLock in c->locks
 * (by extent) and c->lock_ids (by id).  A lock with users > 0 is active;
 * with users == 0 it is idle and sits in the c->idle LRU (cache=on), or
 * has been given back already (cache=off).  A revoked lock takes no new
 * users; when its last user is done (and its minimum hold time is over)
 * it is given back in whole or in part, or downgraded.
 */

static ExtlockExtent extlock_ext(uint64_t offset, uint64_t length)
{
    return (ExtlockExtent) { .start = offset, .end = offset + length };
}

static bool extlock_ext_contains(ExtlockExtent outer, ExtlockExtent inner)
{
    return outer.start <= inner.start && inner.end <= outer.end;
}

static void extlock_cache_idle_add(ExtlockClient *c, ExtlockCachedLock *l)
{
    assert(!l->in_lru);
    QTAILQ_INSERT_TAIL(&c->idle, l, lru);
    l->in_lru = true;
    c->n_idle++;
}

static void extlock_cache_idle_del(ExtlockClient *c, ExtlockCachedLock *l)
{
    if (l->in_lru) {
        QTAILQ_REMOVE(&c->idle, l, lru);
        l->in_lru = false;
        c->n_idle--;
    }
}

static void extlock_cache_drop(ExtlockClient *c, ExtlockCachedLock *l)
{
    extlock_cache_idle_del(c, l);
    extlock_itree_remove(&c->locks, &l->node);
    g_hash_table_remove(c->lock_ids, &l->lock_id);
    g_free(l);
}

/* Send "unlock" for @part of @l and forget that part locally */
static void extlock_lock_give_back(ExtlockClient *c, ExtlockCachedLock *l,
                                   ExtlockExtent part)
{
    ExtlockExtent ext = l->node.ext;
    ExtlockMsg msg;

    assert(l->users == 0);
    extlock_msg_init(&msg, EXTLOCK_MSG_UNLOCK);
    msg.has_id = true;
    msg.id = c->next_id++;
    msg.lock = l->lock_id;
    if (part.start != ext.start || part.end != ext.end) {
        /* Only ever a head or a tail: the rest stays one extent */
        assert(part.start == ext.start || part.end == ext.end);
        msg.has_extent = true;
        msg.offset = part.start;
        msg.length = part.end - part.start;
    }
    trace_extlock_client_unlock(c->node_name, l->lock_id, part.start,
                                part.end - part.start);
    extlock_client_send(c, &msg);
    extlock_msg_clear(&msg);

    if (!msg.has_extent) {
        extlock_cache_drop(c, l);
        return;
    }
    extlock_itree_remove(&c->locks, &l->node);
    if (part.start == ext.start) {
        l->node.ext.start = part.end;
    } else {
        l->node.ext.end = part.start;
    }
    extlock_itree_insert(&c->locks, &l->node);
}

/*
 * Which part of a revoked lock to give back: the part the waiting request
 * wants, widened to the end of the lock on the side this node has not used
 * since the lock was granted.  So two hosts working on disjoint ranges
 * split a grown lock between them once and then stop talking.  If the
 * used span touches the wanted part or lies on both sides, the whole lock.
 */
static ExtlockExtent extlock_revoke_part(ExtlockCachedLock *l)
{
    ExtlockExtent ext = l->node.ext;
    ExtlockExtent want = l->revoke_ext;
    ExtlockExtent used = l->used;

    if (want.start < ext.start) {
        want.start = ext.start;
    }
    if (want.end > ext.end) {
        want.end = ext.end;
    }
    if (want.start >= want.end || used.start >= used.end) {
        return ext;
    }
    if (used.end <= want.start && want.start > ext.start) {
        return (ExtlockExtent) { .start = want.start, .end = ext.end };
    }
    if (used.start >= want.end && want.end < ext.end) {
        return (ExtlockExtent) { .start = ext.start, .end = want.end };
    }
    return ext;
}

static void extlock_cache_arm_timer(ExtlockClient *c, int64_t when)
{
    if (c->cache_timer &&
        (!timer_pending(c->cache_timer) ||
         timer_expire_time_ns(c->cache_timer) > when)) {
        timer_mod(c->cache_timer, when);
    }
}

/* Give a revoked lock back if nobody uses it and it was held long enough */
static void extlock_lock_try_revoke(ExtlockClient *c, ExtlockCachedLock *l)
{
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    int64_t hold_until = l->granted_ns + (int64_t)c->opts.min_hold_us * 1000;
    int64_t latency_us;

    if (!l->revoking || l->users > 0) {
        return;
    }
    if (c->fd < 0) {
        extlock_lock_give_back(c, l, l->node.ext);  /* just forgets it */
        return;
    }
    if (now < hold_until) {
        extlock_cache_arm_timer(c, hold_until);
        return;
    }

    latency_us = (now - l->revoke_ns) / 1000;
    c->stats.revocations++;
    c->stats.revocation_us += latency_us;
    c->stats.revocation_max_us = MAX(c->stats.revocation_max_us, latency_us);

    if (c->opts.cache && l->revoke_mode == EXTLOCK_MODE_SHARED &&
        l->mode == EXTLOCK_MODE_EXCLUSIVE) {
        /* A reader wants in: keep reading under a shared lock */
        ExtlockMsg msg;

        extlock_msg_init(&msg, EXTLOCK_MSG_DOWNGRADE);
        msg.has_id = true;
        msg.id = c->next_id++;
        msg.lock = l->lock_id;
        trace_extlock_client_downgrade(c->node_name, l->lock_id);
        extlock_client_send(c, &msg);
        extlock_msg_clear(&msg);
        c->stats.downgrades++;
        l->mode = EXTLOCK_MODE_SHARED;
        l->revoking = false;
        extlock_cache_idle_add(c, l);
        return;
    }

    extlock_lock_give_back(c, l, c->opts.cache ? extlock_revoke_part(l)
                                               : l->node.ext);
    if (g_hash_table_contains(c->lock_ids, &l->lock_id)) {
        /* The rest of the lock stays cached */
        l->revoking = false;
        extlock_cache_idle_add(c, l);
    }
}

static void extlock_cache_evict(ExtlockClient *c)
{
    while (c->n_idle > c->opts.cache_size) {
        ExtlockCachedLock *l = QTAILQ_FIRST(&c->idle);
        c->stats.cache_evictions++;
        extlock_cache_idle_del(c, l);
        extlock_lock_give_back(c, l, l->node.ext);
    }
}

/* Timer: minimum hold times that ran out, idle locks that aged out */
static void extlock_cache_timer_cb(void *opaque)
{
    ExtlockClient *c = opaque;
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    int64_t idle_ns = (int64_t)c->opts.cache_idle_ms * SCALE_MS;
    g_autoptr(GPtrArray) revoking = g_ptr_array_new();
    GHashTableIter it;
    gpointer value;
    ExtlockCachedLock *l;

    g_hash_table_iter_init(&it, c->lock_ids);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        l = value;
        if (l->revoking && l->users == 0) {
            g_ptr_array_add(revoking, l);
        }
    }
    for (guint i = 0; i < revoking->len; i++) {
        extlock_lock_try_revoke(c, g_ptr_array_index(revoking, i));
    }

    while ((l = QTAILQ_FIRST(&c->idle)) && l->last_used_ns + idle_ns <= now) {
        c->stats.cache_evictions++;
        extlock_cache_idle_del(c, l);
        extlock_lock_give_back(c, l, l->node.ext);
    }
    l = QTAILQ_FIRST(&c->idle);
    if (l) {
        extlock_cache_arm_timer(c, l->last_used_ns + idle_ns);
    }
}

typedef struct ExtlockFind {
    ExtlockExtent ext;
    ExtlockMode mode;
    ExtlockCachedLock *found;
} ExtlockFind;

static bool extlock_cache_find_cb(ExtlockITNode *node, void *opaque)
{
    ExtlockFind *f = opaque;
    ExtlockCachedLock *l = container_of(node, ExtlockCachedLock, node);

    if (!l->revoking && extlock_ext_contains(node->ext, f->ext) &&
        (l->mode == EXTLOCK_MODE_EXCLUSIVE || f->mode == EXTLOCK_MODE_SHARED)) {
        f->found = l;
        return false;
    }
    return true;
}

static ExtlockCachedLock *extlock_cache_find(ExtlockClient *c,
                                             ExtlockExtent ext,
                                             ExtlockMode mode)
{
    ExtlockFind f = { .ext = ext, .mode = mode };

    extlock_itree_foreach_overlap(&c->locks, ext, extlock_cache_find_cb, &f);
    return f.found;
}

static void extlock_lock_use(ExtlockClient *c, ExtlockCachedLock *l,
                             ExtlockExtent ext)
{
    extlock_cache_idle_del(c, l);
    l->users++;
    if (l->used.start >= l->used.end) {
        l->used = ext;
    } else {
        l->used.start = MIN(l->used.start, ext.start);
        l->used.end = MAX(l->used.end, ext.end);
    }
}

static void extlock_handle_granted(ExtlockClient *c, ExtlockRequest *req,
                                   ExtlockMsg *msg)
{
    ExtlockCachedLock *l = g_new0(ExtlockCachedLock, 1);
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);

    l->node.ext = extlock_ext(msg->offset, msg->length);
    l->lock_id = msg->lock;
    l->token = msg->token;
    l->mode = msg->mode;
    l->granted_ns = l->last_used_ns = now;
    extlock_itree_insert(&c->locks, &l->node);
    g_hash_table_insert(c->lock_ids, &l->lock_id, l);
    extlock_lock_use(c, l, extlock_ext(req->offset, req->length));

    req->lock = l;
    req->token = msg->token;
    c->stats.grants++;
    if (req->queued) {
        c->stats.total_wait_us += (now - req->start_ns) / 1000;
    }
    trace_extlock_client_granted(c->node_name, req->id, msg->lock,
                                 msg->offset, msg->length, msg->token);
}

static void extlock_handle_revoke(ExtlockClient *c, ExtlockMsg *msg)
{
    ExtlockCachedLock *l = g_hash_table_lookup(c->lock_ids, &msg->lock);
    ExtlockExtent want = extlock_ext(msg->offset, msg->length);

    trace_extlock_client_revoke(c->node_name, msg->lock, msg->offset,
                                msg->length, extlock_mode_name(msg->mode),
                                l ? l->users : 0);
    if (!l) {
        return;     /* already given back */
    }
    if (!l->revoking) {
        l->revoking = true;
        l->revoke_ns = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
        l->revoke_mode = msg->mode;
        l->revoke_ext = want;
        extlock_cache_idle_del(c, l);
    } else {
        if (msg->mode == EXTLOCK_MODE_EXCLUSIVE) {
            l->revoke_mode = EXTLOCK_MODE_EXCLUSIVE;
        }
        l->revoke_ext.start = MIN(l->revoke_ext.start, want.start);
        l->revoke_ext.end = MAX(l->revoke_ext.end, want.end);
    }
    extlock_lock_try_revoke(c, l);
}

/* ------------------------------------------------------------------------
 * Requests
 */

/* Is a request of ours on its way that will likely cover @mode too? */
static bool extlock_grant_in_flight(ExtlockClient *c, ExtlockMode mode)
{
    ExtlockRequest *r;

    QLIST_FOREACH(r, &c->waiting, next) {
        if (!r->queued && (r->mode == EXTLOCK_MODE_EXCLUSIVE ||
                           mode == EXTLOCK_MODE_SHARED)) {
            return true;
        }
    }
    return false;
}

int coroutine_fn extlock_client_lock(ExtlockClient *c, ExtlockRequest *req)
{
    ExtlockExtent ext = extlock_ext(req->offset, req->length);
    ExtlockMsg msg;

    req->lock = NULL;
    if (c->opts.cache) {
        for (;;) {
            ExtlockCachedLock *l = extlock_cache_find(c, ext, req->mode);
            if (l) {
                extlock_lock_use(c, l, ext);
                c->stats.cache_hits++;
                req->lock = l;
                return 0;
            }
            /*
             * A grant on its way will probably have grown over our range:
             * wait for it rather than queueing behind it at the
             * coordinator.  Not once it waits there: no head-of-line
             * blocking behind other hosts.
             */
            if (c->fd < 0 || !extlock_grant_in_flight(c, req->mode)) {
                break;
            }
            qemu_co_queue_wait(&c->grant_queue, NULL);
        }
    }

    req->id = c->next_id++;
    req->co = qemu_coroutine_self();
    req->queued = req->done = false;
    req->ret = 0;
    req->token = 0;
    req->start_ns = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    c->stats.requests++;

    if (c->fd < 0) {
        c->stats.errors++;
        return -EIO;
    }
    if (req->start_ns >= c->lease_deadline_ns) {
        /* Fencing: past our lease, somebody else may own our locks */
        error_report_once("extlock: node '%s': lease expired, failing I/O",
                          c->node_name);
        c->stats.errors++;
        return -EIO;
    }

    req->blocked_by = g_ptr_array_new_with_free_func(g_free);
    QLIST_INSERT_HEAD(&c->waiting, req, next);
    g_hash_table_insert(c->pending, &req->id, req);

    extlock_msg_init(&msg, EXTLOCK_MSG_LOCK);
    msg.has_id = true;
    msg.id = req->id;
    msg.has_extent = true;
    msg.offset = req->offset;
    msg.length = req->length;
    msg.mode = req->mode;
    msg.wait = true;
    if (c->opts.cache && c->opts.grow_limit) {
        msg.has_limit = true;
        msg.limit_offset = 0;
        msg.limit_length = MAX(c->opts.grow_limit, ext.end);
    }
    trace_extlock_client_lock(c->node_name, req->id, req->offset,
                              req->length, extlock_mode_name(req->mode));
    extlock_client_send(c, &msg);
    extlock_msg_clear(&msg);

    while (!req->done) {
        qemu_coroutine_yield();
    }
    req->co = NULL;
    QLIST_REMOVE(req, next);
    g_ptr_array_free(req->blocked_by, true);
    req->blocked_by = NULL;
    /* Others may be waiting to see whether this grant covers them */
    qemu_co_queue_restart_all(&c->grant_queue);
    return req->ret;
}

void extlock_client_unlock(ExtlockClient *c, ExtlockRequest *req)
{
    ExtlockCachedLock *l = req->lock;

    assert(l && l->users > 0);
    req->lock = NULL;
    l->users--;
    l->last_used_ns = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    if (l->users > 0) {
        return;
    }
    if (!c->opts.cache || c->fd < 0) {
        extlock_lock_give_back(c, l, l->node.ext);
    } else if (l->revoking) {
        extlock_lock_try_revoke(c, l);
    } else {
        extlock_cache_idle_add(c, l);
        extlock_cache_evict(c);
        extlock_cache_arm_timer(c, l->last_used_ns +
                                (int64_t)c->opts.cache_idle_ms * SCALE_MS);
    }
}

/* For QMP: every lock this node holds */
void extlock_client_foreach_lock(ExtlockClient *c,
                                 void (*fn)(ExtlockCachedLock *l, void *),
                                 void *opaque)
{
    ExtlockITNode *n;

    for (n = extlock_itree_first(&c->locks); n; n = extlock_itree_next(n)) {
        fn(container_of(n, ExtlockCachedLock, node), opaque);
    }
}
