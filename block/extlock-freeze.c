/*
 * extlock: QMP extent-lock-freeze / extent-lock-thaw
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * A freeze is the coordinator operation "extlockctl freeze" uses: a
 * session of its own (client id "<node's client id>/freeze") asks for a
 * shared lock on the whole lock-space, which the coordinator grants in
 * timestamp order.  While it is held, no host writes to the image.
 *
 * Everything runs in the main loop: the freeze's connection is served by
 * the main AioContext whatever the node's is, extent-lock-freeze is a
 * coroutine command that yields while its session is set up (the connect
 * runs in a thread: extlock_conn_new_co()) and until the grant, so the
 * main loop (guests, the node's own I/O, HMP) goes on meanwhile, and the
 * freeze's timer ends it at its timeout.  The freeze reads only the
 * node's options, which are fixed after its open, never the lock client
 * that lives in the node's AioContext.  A connection is never freed from
 * inside its own callbacks: a bottom half does that.
 *
 * While a node's freeze is pending or held, block_resize on a node of
 * the same lock-space in this process is refused at once
 * (extlock_freeze_check_resize()): its maintenance lock would wait
 * behind the freeze, and extent-lock-thaw could not run meanwhile.
 */

#include "qemu/osdep.h"
#include "qapi/error.h"
#include "qapi/qapi-commands-block-extlock.h"
#include "qapi/qapi-events-block-extlock.h"
#include "qemu/error-report.h"
#include "qemu/main-loop.h"
#include "qemu/coroutine.h"
#include "qom/object_interfaces.h"
#include "crypto/tlscreds.h"
#include "extlock-int.h"
#include "extlock-compat.h"
#include "trace.h"

#define EXTLOCK_FREEZE_MAX_TIMEOUT_S (7 * 24 * 3600)
#define EXTLOCK_FREEZE_WHOLE_SPACE   ((uint64_t)1 << 63)

typedef struct ExtlockFreeze {
    char *node_name;
    char *lock_space;
    char *client_id;
    ExtlockConnection *conn;
    QEMUTimer *timer;           /* the freeze's deadline */
    Coroutine *co;              /* extent-lock-freeze, until the grant */
    bool woken;                 /* @co is scheduled already */
    bool granted;
    bool final;                 /* the lock request's final reply came */
    uint64_t req_id;            /* the lock request */
    bool failed;                /* refused, or the session went away */
    bool timed_out;
    bool ended;                 /* out of extlock_freezes, being freed */
    char *error;                /* why it failed */
    uint64_t token;
    int64_t start_ns;           /* QEMU_CLOCK_REALTIME */
    int64_t granted_ns;
} ExtlockFreeze;

/*
 * node-name -> ExtlockFreeze.  Changed in the main loop only, under
 * extlock_freezes_lock, which extlock_freeze_check_resize() also takes:
 * it runs in the resized node's AioContext, an iothread's maybe.
 */
static GHashTable *extlock_freezes;
static QemuMutex extlock_freezes_lock;
static bool extlock_freezes_ready;      /* the two above are set up */

static void extlock_freezes_init(void)
{
    if (!extlock_freezes) {
        qemu_mutex_init(&extlock_freezes_lock);
        extlock_freezes = g_hash_table_new(g_str_hash, g_str_equal);
        /* See extlock_freeze_check_resize(), in any thread */
        qatomic_store_release(&extlock_freezes_ready, true);
    }
}

static void extlock_freeze_free_bh(void *opaque)
{
    ExtlockFreeze *f = opaque;

    extlock_conn_free(f->conn);
    if (f->timer) {
        timer_free(f->timer);
    }
    g_free(f->node_name);
    g_free(f->lock_space);
    g_free(f->client_id);
    g_free(f->error);
    g_free(f);
}

/*
 * Forget @f and release its lock: the connection says bye (at once if
 * @now, else from a bottom half, for callers inside the connection's
 * callbacks or in a coroutine).
 */
static void extlock_freeze_end(ExtlockFreeze *f, bool now)
{
    assert(!f->ended);
    f->ended = true;
    if (f->timer) {
        timer_del(f->timer);
    }
    qemu_mutex_lock(&extlock_freezes_lock);
    g_hash_table_remove(extlock_freezes, f->node_name);
    qemu_mutex_unlock(&extlock_freezes_lock);
    if (now) {
        extlock_freeze_free_bh(f);
    } else {
        aio_bh_schedule_oneshot(qemu_get_aio_context(),
                                extlock_freeze_free_bh, f);
    }
}

static int64_t extlock_freeze_frozen_ms(ExtlockFreeze *f)
{
    return (qemu_clock_get_ns(QEMU_CLOCK_REALTIME) - f->granted_ns) /
           SCALE_MS;
}

/* extent-lock-freeze looks again (scheduled once per yield) */
static void extlock_freeze_wake(ExtlockFreeze *f)
{
    if (f->co && !f->woken) {
        f->woken = true;
        aio_co_schedule(qemu_get_aio_context(), f->co);
    }
}

/* The freeze cannot go on: wake extent-lock-freeze, or end the freeze */
static void extlock_freeze_fail(ExtlockFreeze *f, const char *why)
{
    if (f->ended || f->failed) {
        return;
    }
    f->failed = true;
    f->error = g_strdup(why);
    if (f->co) {
        extlock_freeze_wake(f);
    } else if (f->granted) {
        error_report("extlock: node '%s': freeze of lock-space %s (token "
                     "%" PRIu64 ") ended: %s; the cut is no longer "
                     "guaranteed", f->node_name, f->lock_space, f->token,
                     why);
        qapi_event_send_extent_lock_thawed(f->node_name, f->lock_space,
                                           f->token,
                                           EXTENT_LOCK_THAW_REASON_SESSION_LOST,
                                           extlock_freeze_frozen_ms(f));
        extlock_freeze_end(f, false);
    }
}

static void extlock_freeze_timer_cb(void *opaque)
{
    ExtlockFreeze *f = opaque;

    if (f->ended) {
        return;
    }
    f->timed_out = true;
    if (f->co) {
        extlock_freeze_wake(f);
    } else if (f->granted) {
        error_report("extlock: node '%s': freeze of lock-space %s (token "
                     "%" PRIu64 ") timed out after %" PRId64 " ms frozen; "
                     "thawed", f->node_name, f->lock_space, f->token,
                     extlock_freeze_frozen_ms(f));
        qapi_event_send_extent_lock_thawed(f->node_name, f->lock_space,
                                           f->token,
                                           EXTENT_LOCK_THAW_REASON_TIMEOUT,
                                           extlock_freeze_frozen_ms(f));
        extlock_freeze_end(f, false);
    }
}

/*
 * The connection's callbacks.  The freeze holds one lock and asks for
 * nothing else: a revocation cannot come (a shared lock on everything
 * is revoked only for a writer, which waits behind it in timestamp
 * order), and on a reconnection the lock is not reclaimed: a new or
 * reclaimed session ends the freeze.
 */
static void extlock_freeze_request_reply(void *opaque, void *req,
                                         ExtlockMsg *msg)
{
    ExtlockFreeze *f = opaque;

    if (msg->type != EXTLOCK_MSG_WAITING) {
        f->final = true;
        extlock_freeze_wake(f);
    }
    if (msg->type == EXTLOCK_MSG_GRANTED) {
        f->granted = true;
        f->token = msg->token;
        f->granted_ns = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
        extlock_freeze_wake(f);
    } else if (msg->type == EXTLOCK_MSG_ERROR) {
        g_autofree char *why = g_strdup_printf("coordinator refused the "
            "freeze lock: %s (%s)", msg->message ? msg->message : "",
            extlock_error_code_name(msg->error));

        extlock_freeze_fail(f, why);
    }
}

static void extlock_freeze_request_lost(void *opaque, void *req)
{
    ExtlockFreeze *f = opaque;

    f->final = true;
    extlock_freeze_wake(f);
    extlock_freeze_fail(f, "the coordinator connection broke before the "
                        "freeze lock was granted");
}

static void extlock_freeze_read_done(void *opaque)
{
}

static void extlock_freeze_revoke(void *opaque, ExtlockMsg *msg)
{
}

static bool extlock_freeze_reply(void *opaque, ExtlockMsg *msg)
{
    return true;
}

static void extlock_freeze_lock_dropped(void *opaque, uint64_t lock_id)
{
    extlock_freeze_fail(opaque, "the coordinator dropped the freeze lock");
}

static void extlock_freeze_fence_status(void *opaque, ExtlockMsg *msg)
{
}

static void extlock_freeze_lease_lost(void *opaque)
{
    extlock_freeze_fail(opaque, "the freeze's lease expired");
}

static void extlock_freeze_state_changed(void *opaque)
{
}

static GArray *extlock_freeze_held_locks(void *opaque)
{
    return g_array_new(false, true, sizeof(ExtlockReclaim));
}

static void extlock_freeze_session_resumed(void *opaque, GArray *locks)
{
}

static void extlock_freeze_session_reclaimed(void *opaque, GArray *reclaims)
{
    extlock_freeze_fail(opaque, "the coordinator restarted");
}

static uint64_t extlock_freeze_session_new(void *opaque)
{
    extlock_freeze_fail(opaque, "the freeze's session expired");
    return 1;
}

static const ExtlockConnOps extlock_freeze_conn_ops = {
    .request_reply = extlock_freeze_request_reply,
    .request_lost = extlock_freeze_request_lost,
    .read_done = extlock_freeze_read_done,
    .revoke = extlock_freeze_revoke,
    .reply = extlock_freeze_reply,
    .lock_dropped = extlock_freeze_lock_dropped,
    .fence_status = extlock_freeze_fence_status,
    .lease_lost = extlock_freeze_lease_lost,
    .state_changed = extlock_freeze_state_changed,
    .held_locks = extlock_freeze_held_locks,
    .session_resumed = extlock_freeze_session_resumed,
    .session_reclaimed = extlock_freeze_session_reclaimed,
    .session_new = extlock_freeze_session_new,
};

/* The extlock node @node_name, or NULL with @errp set */
static BlockDriverState *extlock_freeze_find_node(const char *node_name,
                                                  Error **errp)
{
    BlockDriverState *bs = bdrv_find_node(node_name);

    if (!bs) {
        error_setg(errp, "Cannot find node '%s'", node_name);
        return NULL;
    }
    if (bs->drv != &bdrv_extlock || !bs->opaque ||
        !((BDRVExtlockState *)bs->opaque)->client) {
        error_setg(errp, "Node '%s' is not an extlock node", node_name);
        return NULL;
    }
    return bs;
}

ExtentLockCut *coroutine_fn qmp_extent_lock_freeze(const char *node_name,
                                                   int64_t timeout,
                                                   Error **errp)
{
    BlockDriverState *bs;
    BDRVExtlockState *s;
    QCryptoTLSCreds *tls_creds = NULL;
    ExtlockConnConfig cfg;
    ExtlockFreeze *f;
    ExtentLockCut *cut;
    ExtlockMsg msg;

    if (timeout < 1 || timeout > EXTLOCK_FREEZE_MAX_TIMEOUT_S) {
        error_setg(errp, "Parameter 'timeout' must be between 1 and %d "
                   "seconds, not %" PRId64, EXTLOCK_FREEZE_MAX_TIMEOUT_S,
                   timeout);
        return NULL;
    }
    bs = extlock_freeze_find_node(node_name, errp);
    if (!bs) {
        return NULL;
    }
    extlock_freezes_init();
    f = g_hash_table_lookup(extlock_freezes, node_name);
    if (f) {
        if (f->granted) {
            error_setg(errp, "Node '%s' is frozen already (token %" PRIu64
                       ")", node_name, f->token);
        } else {
            error_setg(errp, "Node '%s' is being frozen already", node_name);
        }
        return NULL;
    }
    s = bs->opaque;
    if (s->tls_creds_id) {
        Object *obj = object_resolve_path_component(object_get_objects_root(),
                                                    s->tls_creds_id);

        tls_creds = obj ? (QCryptoTLSCreds *)
            object_dynamic_cast(obj, TYPE_QCRYPTO_TLS_CREDS) : NULL;
        if (!tls_creds) {
            error_setg(errp, "Node '%s': its TLS credentials '%s' are gone",
                       node_name, s->tls_creds_id);
            return NULL;
        }
    }

    f = g_new0(ExtlockFreeze, 1);
    f->node_name = g_strdup(node_name);
    f->lock_space = g_strdup(s->lock_space);
    f->client_id = g_strdup_printf("%s/freeze", s->client_id);
    f->start_ns = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    cfg = (ExtlockConnConfig) {
        .addrs = s->coordinators,
        .client_id = f->client_id,
        .lock_space = s->lock_space,
        .lease_ms = s->lease_ms,
        .tls_creds = tls_creds,
        .tls_hostname = s->tls_hostname,
        .node_name = f->node_name,
        .stuck_io_exit = false,
        .bs = NULL,
    };
    /* Pending from now on: a second freeze of the node is refused */
    qemu_mutex_lock(&extlock_freezes_lock);
    g_hash_table_insert(extlock_freezes, f->node_name, f);
    qemu_mutex_unlock(&extlock_freezes_lock);
    /*
     * Connect in a thread while this coroutine yields, within the
     * freeze's timeout: a coordinator that does not answer never stalls
     * the main loop
     */
    trace_extlock_freeze_connect(node_name, f->lock_space, timeout);
    f->conn = extlock_conn_new_co(&cfg, &extlock_freeze_conn_ops, f,
                                  qemu_get_aio_context(),
                                  f->start_ns +
                                  timeout * NANOSECONDS_PER_SECOND, errp);
    if (!f->conn) {
        error_prepend(errp, "Cannot freeze node '%s' (lock-space %s) within "
                      "%" PRId64 " s: ", node_name, f->lock_space, timeout);
        extlock_freeze_end(f, true);
        return NULL;
    }
    f->timer = aio_timer_new(qemu_get_aio_context(), QEMU_CLOCK_REALTIME,
                             SCALE_NS, extlock_freeze_timer_cb, f);
    timer_mod(f->timer, f->start_ns + timeout * NANOSECONDS_PER_SECOND);

    extlock_msg_init(&msg, EXTLOCK_MSG_LOCK);
    msg.has_extent = true;
    msg.offset = 0;
    msg.length = EXTLOCK_FREEZE_WHOLE_SPACE;
    msg.mode = EXTLOCK_MODE_SHARED;
    msg.wait = true;
    f->co = qemu_coroutine_self();
    f->req_id = extlock_conn_request(f->conn, &msg, f);
    if (!f->req_id) {
        f->failed = f->final = true;
        f->error = g_strdup("the coordinator connection broke");
    }
    extlock_msg_clear(&msg);
    while (!f->granted && !f->failed && !f->timed_out) {
        f->woken = false;
        qemu_coroutine_yield();
    }
    if (!f->final) {
        /*
         * Timed out: cancel the request and wait for its final reply (the
         * connection forgets it then).  Bounded: if the coordinator does
         * not answer, the connection's lease ends it, and the request is
         * lost with it.
         */
        bool failed = f->failed;
        ExtlockMsg cancel;

        extlock_msg_init(&cancel, EXTLOCK_MSG_CANCEL);
        cancel.request = f->req_id;
        extlock_conn_send(f->conn, &cancel);
        extlock_msg_clear(&cancel);
        while (!f->final) {
            f->woken = false;
            qemu_coroutine_yield();
        }
        f->failed = failed;     /* the cancel's error is not the reason */
    }
    f->co = NULL;
    /* Granted just as the timeout passed counts as the timeout */
    if (!f->granted || f->failed || f->timed_out) {
        if (f->failed) {
            error_setg(errp, "Cannot freeze node '%s' (lock-space %s): %s",
                       node_name, f->lock_space, f->error);
        } else {
            error_setg(errp, "Cannot freeze node '%s' (lock-space %s): the "
                       "freeze lock was not granted within %" PRId64 " s; "
                       "request cancelled", node_name, f->lock_space,
                       timeout);
        }
        /* bye releases the lock if it came after all */
        extlock_freeze_end(f, false);
        return NULL;
    }

    cut = g_new0(ExtentLockCut, 1);
    cut->node_name = g_strdup(node_name);
    cut->lock_space = g_strdup(f->lock_space);
    cut->client_id = g_strdup(f->client_id);
    cut->token = f->token;
    cut->epoch = f->token >> 40;
    {
        /* ISO 8601 by hand: QEMU 7.2 allows no glib newer than 2.56 */
        g_autoptr(GDateTime) t = g_date_time_new_now_utc();
        g_autofree char *secs = g_date_time_format(t, "%Y-%m-%dT%H:%M:%S");

        cut->time = g_strdup_printf("%s.%06dZ", secs,
                                    g_date_time_get_microsecond(t));
    }
    cut->waited_ms = (f->granted_ns - f->start_ns) / SCALE_MS;
    info_report("extlock: node '%s': lock-space %s frozen: cut token %"
                PRIu64 " (epoch %" PRIu64 ") at %s after %" PRId64 " ms",
                node_name, f->lock_space, cut->token, cut->epoch, cut->time,
                cut->waited_ms);
    return cut;
}

ExtentLockThawInfo *qmp_extent_lock_thaw(const char *node_name, Error **errp)
{
    ExtlockFreeze *f = extlock_freezes ?
        g_hash_table_lookup(extlock_freezes, node_name) : NULL;
    ExtentLockThawInfo *info;

    if (!f || !f->granted) {
        error_setg(errp, "Node '%s' is not frozen", node_name);
        return NULL;
    }
    info = g_new0(ExtentLockThawInfo, 1);
    info->token = f->token;
    info->frozen_ms = extlock_freeze_frozen_ms(f);
    info_report("extlock: node '%s': lock-space %s thawed (token %" PRIu64
                ", frozen %" PRId64 " ms)", node_name, f->lock_space,
                f->token, info->frozen_ms);
    /* Released before the command returns: bye to the coordinator */
    extlock_freeze_end(f, true);
    return info;
}

bool extlock_freeze_check_resize(const char *node_name, const char *lock_space,
                                 Error **errp)
{
    GHashTableIter it;
    gpointer value;
    bool ok = true;

    if (!qatomic_load_acquire(&extlock_freezes_ready)) {
        return true;
    }
    qemu_mutex_lock(&extlock_freezes_lock);
    g_hash_table_iter_init(&it, extlock_freezes);
    while (ok && g_hash_table_iter_next(&it, NULL, &value)) {
        ExtlockFreeze *f = value;

        if (strcmp(f->node_name, node_name) &&
            strcmp(f->lock_space, lock_space)) {
            continue;
        }
        ok = false;
        if (f->granted) {
            error_setg(errp, "extlock: node '%s': lock-space %s is frozen by "
                       "extent-lock-freeze on node '%s' (token %" PRIu64
                       "); a resize would wait for the freeze to end: "
                       "extent-lock-thaw it first", node_name, lock_space,
                       f->node_name, f->token);
        } else {
            error_setg(errp, "extlock: node '%s': extent-lock-freeze of "
                       "lock-space %s on node '%s' is pending; a resize "
                       "would wait for it: retry after the freeze",
                       node_name, lock_space, f->node_name);
        }
    }
    qemu_mutex_unlock(&extlock_freezes_lock);
    return ok;
}
