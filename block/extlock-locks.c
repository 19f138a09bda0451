/*
 * extlock: the lock cache, revocation and the request API
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/error-report.h"
#include "qemu/main-loop.h"
#include "qapi/qapi-events-block-extlock.h"
#include "extlock-client.h"
#include "trace.h"

static void extlock_cache_timer_cb(void *opaque);

/*
 * Wait lists.  A woken coroutine that has to wait again adds itself to a
 * fresh list, so waking a list never loops (unlike entering a CoQueue
 * from outside a coroutine while its waiters re-queue themselves).
 */
static void coroutine_fn extlock_wait_on(GPtrArray **list)
{
    g_ptr_array_add(*list, qemu_coroutine_self());
    qemu_coroutine_yield();
}

static void extlock_wake_all(GPtrArray **list)
{
    GPtrArray *woken = *list;

    if (!woken->len) {
        return;
    }
    *list = g_ptr_array_new();
    for (guint i = 0; i < woken->len; i++) {
        aio_co_wake(g_ptr_array_index(woken, i));
    }
    g_ptr_array_free(woken, true);
}

/*
 * ----------------------------------------------------------------------
 * The lock cache
 *
 * Every valid lock granted to this node is an ExtlockCachedLock in
 * c->locks (by extent) and c->lock_ids (by id).  A lock with users > 0 is
 * active; with users == 0 it is idle and sits in the c->idle LRU
 * (cache=on), or has been given back already (cache=off; if disconnected,
 * right after reconnecting).  Invalid locks that requests still use are
 * only on c->stale (see ExtlockCachedLock).  A revoked lock takes no new
 * users; when its last user is done (and its minimum hold time is over)
 * it is given back in whole or in part, or downgraded.
 */

static ExtlockExtent extlock_ext(uint64_t offset, uint64_t length)
{
    return (ExtlockExtent) { .start = offset, .end = offset + length };
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
    assert(!l->ce.stale);
    extlock_cache_idle_del(c, l);
    extlock_itree_remove(&c->locks, &l->ce.node);
    g_hash_table_remove(c->lock_ids, &l->lock_id);
    g_free(l);
}

/* Send "unlock" for the whole of lock @lock_id */
static void extlock_send_unlock(ExtlockClient *c, uint64_t lock_id)
{
    ExtlockMsg msg;

    extlock_msg_init(&msg, EXTLOCK_MSG_UNLOCK);
    msg.has_id = true;
    msg.id = extlock_client_new_id(c);
    msg.lock = lock_id;
    extlock_client_send(c, &msg);
    extlock_msg_clear(&msg);
}

/*
 * @l may not be used again, but requests still run under it: take it out
 * of the cache and the id table (a new session numbers its locks afresh)
 * and keep it on c->stale until its last user is done.  @give_back: the
 * coordinator may still hold it for this session, so unlock it then.
 */
static void extlock_lock_make_stale(ExtlockClient *c, ExtlockCachedLock *l,
                                    bool give_back)
{
    assert(l->users > 0 && !l->ce.stale);
    extlock_cache_idle_del(c, l);
    extlock_itree_remove(&c->locks, &l->ce.node);
    g_hash_table_remove(c->lock_ids, &l->lock_id);
    l->ce.stale = true;
    l->ce.revoking = false;
    l->give_back = give_back;
    QLIST_INSERT_HEAD(&c->stale, l, stale_next);
}

/* The last user of stale lock @l is done */
static void extlock_stale_done(ExtlockClient *c, ExtlockCachedLock *l)
{
    assert(l->ce.stale && l->users == 0);
    QLIST_REMOVE(l, stale_next);
    if (l->give_back && c->fd >= 0 && l->session_gen == c->session_gen) {
        trace_extlock_client_unlock(c->node_name, l->lock_id,
                                    l->ce.node.ext.start,
                                    l->ce.node.ext.end - l->ce.node.ext.start);
        extlock_send_unlock(c, l->lock_id);
    }
    /*
     * Disconnected: the session's next welcome lists the lock if the
     * coordinator still holds it, and then it is unlocked as unknown.
     */
    g_free(l);
}

/* The stale lock of this session that the coordinator knows as @lock_id */
static ExtlockCachedLock *extlock_stale_find(ExtlockClient *c,
                                             uint64_t lock_id)
{
    ExtlockCachedLock *l;

    QLIST_FOREACH(l, &c->stale, stale_next) {
        if (l->give_back && l->session_gen == c->session_gen &&
            l->lock_id == lock_id) {
            return l;
        }
    }
    return NULL;
}

/*
 * Send "unlock" for @part of @l and forget that part locally.  Returns
 * false if that was all of it: then @l has been freed.
 */
static bool extlock_lock_give_back(ExtlockClient *c, ExtlockCachedLock *l,
                                   ExtlockExtent part)
{
    ExtlockExtent ext = l->ce.node.ext;
    bool whole = part.start == ext.start && part.end == ext.end;
    ExtlockMsg msg;

    assert(l->users == 0 && c->fd >= 0);
    extlock_msg_init(&msg, EXTLOCK_MSG_UNLOCK);
    msg.has_id = true;
    msg.id = extlock_client_new_id(c);
    msg.lock = l->lock_id;
    if (!whole) {
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

    if (whole) {
        extlock_cache_drop(c, l);
        return false;
    }
    extlock_itree_remove(&c->locks, &l->ce.node);
    if (part.start == ext.start) {
        l->ce.node.ext.start = part.end;
    } else {
        l->ce.node.ext.end = part.start;
    }
    extlock_itree_insert(&c->locks, &l->ce.node);
    return true;
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
    return extlock_cache_revoke_part(l->ce.node.ext, l->revoke_ext, l->used);
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

    trace_extlock_client_try_revoke(c->node_name, l->lock_id, l->ce.revoking,
                                    l->users, l->ce.stale, now < hold_until);
    if (!l->ce.revoking || l->users > 0) {
        return;
    }
    assert(!l->ce.stale);
    if (c->fd < 0) {
        /* Give it back once reconnected (the revoke is re-sent then) */
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
        l->ce.mode == EXTLOCK_MODE_EXCLUSIVE) {
        /* A reader wants in: keep reading under a shared lock */
        ExtlockMsg msg;

        extlock_msg_init(&msg, EXTLOCK_MSG_DOWNGRADE);
        msg.has_id = true;
        msg.id = extlock_client_new_id(c);
        msg.lock = l->lock_id;
        trace_extlock_client_downgrade(c->node_name, l->lock_id);
        extlock_client_send(c, &msg);
        extlock_msg_clear(&msg);
        c->stats.downgrades++;
        l->ce.mode = EXTLOCK_MODE_SHARED;
        l->ce.revoking = false;
        extlock_cache_idle_add(c, l);
        return;
    }

    if (extlock_lock_give_back(c, l, c->opts.cache ? extlock_revoke_part(l)
                                                   : l->ce.node.ext)) {
        /* The rest of the lock stays cached */
        l->ce.revoking = false;
        extlock_cache_idle_add(c, l);
    }
}

static void extlock_cache_evict(ExtlockClient *c)
{
    while (c->fd >= 0 && c->n_idle > c->opts.cache_size) {
        ExtlockCachedLock *l = QTAILQ_FIRST(&c->idle);
        c->stats.cache_evictions++;
        extlock_cache_idle_del(c, l);
        extlock_lock_give_back(c, l, l->ce.node.ext);
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
        if (l->ce.revoking && l->users == 0) {
            g_ptr_array_add(revoking, l);
        }
    }
    for (guint i = 0; i < revoking->len; i++) {
        extlock_lock_try_revoke(c, g_ptr_array_index(revoking, i));
    }

    while (c->fd >= 0 && (l = QTAILQ_FIRST(&c->idle)) &&
           l->last_used_ns + idle_ns <= now) {
        c->stats.cache_evictions++;
        extlock_cache_idle_del(c, l);
        extlock_lock_give_back(c, l, l->ce.node.ext);
    }
    l = QTAILQ_FIRST(&c->idle);
    if (l) {
        extlock_cache_arm_timer(c, l->last_used_ns + idle_ns);
    }
}

/* A cached lock that serves @ext in @mode (never a revoked or stale one) */
static ExtlockCachedLock *extlock_cache_find(ExtlockClient *c,
                                             ExtlockExtent ext,
                                             ExtlockMode mode)
{
    ExtlockCacheEntry *e = extlock_cache_lookup(&c->locks, ext, mode);

    return e ? container_of(e, ExtlockCachedLock, ce) : NULL;
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

    l->ce.node.ext = extlock_ext(msg->offset, msg->length);
    l->lock_id = msg->lock;
    l->token = msg->token;
    l->ce.mode = msg->mode;
    l->granted_ns = l->last_used_ns = now;
    l->session_gen = c->session_gen;
    extlock_itree_insert(&c->locks, &l->ce.node);
    g_hash_table_insert(c->lock_ids, &l->lock_id, l);
    extlock_lock_use(c, l, extlock_ext(req->offset, req->length));

    req->lock = l;
    req->token = msg->token;
    c->grants_grow = msg->length > req->length;
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
    if (!l->ce.revoking) {
        l->ce.revoking = true;
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

/*
 * ----------------------------------------------------------------------
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

/* Send the lock request and wait for its final reply */
static int coroutine_fn extlock_request_send(ExtlockClient *c,
                                             ExtlockRequest *req)
{
    ExtlockExtent ext = extlock_ext(req->offset, req->length);
    ExtlockMsg msg;

    req->id = extlock_client_new_id(c);
    req->co = qemu_coroutine_self();
    req->queued = req->done = req->warned = false;
    req->ret = 0;
    req->token = 0;
    req->blocked_by = g_ptr_array_new_with_free_func(g_free);
    c->stats.requests++;
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
    extlock_wake_all(&c->grant_waiters);
    return req->ret;
}

/*
 * Local order.  A cached lock serves every request of this node inside
 * it, so the node itself must keep its conflicting requests apart: a
 * request waits for the earlier requests of this node that overlap it in
 * a conflicting mode (as the coordinator does between nodes, and as it
 * did within the node when every request had a lock of its own).
 */
static void extlock_local_done(ExtlockClient *c, ExtlockRequest *req)
{
    extlock_itree_remove(&c->active, &req->local.node);
    extlock_wake_all(&c->local_waiters);
}

static int coroutine_fn extlock_client_lock_cached(ExtlockClient *c,
                                                   ExtlockRequest *req);

int coroutine_fn extlock_client_lock(ExtlockClient *c, ExtlockRequest *req)
{
    int ret;

    req->local.seq = c->next_seq++;
    req->local.mode = req->mode;
    req->local.node.ext = extlock_ext(req->offset, req->length);
    extlock_itree_insert(&c->active, &req->local.node);
    while (extlock_local_must_wait(&c->active, &req->local)) {
        extlock_wait_on(&c->local_waiters);
    }
    ret = extlock_client_lock_cached(c, req);
    if (ret < 0) {
        extlock_local_done(c, req);
    }
    return ret;
}

static int coroutine_fn extlock_client_lock_cached(ExtlockClient *c,
                                                   ExtlockRequest *req)
{
    ExtlockExtent ext = extlock_ext(req->offset, req->length);
    int64_t start_ns = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    int64_t now = start_ns;
    int ret;

    req->lock = NULL;
    req->start_ns = start_ns;
    for (;; now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME)) {
        ExtlockCachedLock *l;

        c->last_now_ns = now;

        if (c->closing) {
            return -EIO;
        }
        /*
         * Fencing: without a valid lease other hosts may own our extents,
         * so we touch nothing; queue or fail as the policy says.
         */
        if (!extlock_client_lease_valid_at(c, now)) {
            if (c->opts.lease_loss_error ||
                now - start_ns >=
                (int64_t)c->opts.lease_loss_timeout_ms * SCALE_MS) {
                /* Once per node and lease loss, not once per process */
                if (!c->no_lease_io_reported) {
                    c->no_lease_io_reported = true;
                    error_report("extlock: node '%s': no valid lease, "
                                 "failing I/O", c->node_name);
                }
                c->stats.errors++;
                return -EIO;
            }
            extlock_wait_on(&c->usable_waiters);
            continue;
        }

        if (c->opts.cache) {
            l = extlock_cache_find(c, ext, req->mode);
            if (l) {
                extlock_lock_use(c, l, ext);
                c->stats.cache_hits++;
                req->lock = l;
                return 0;
            }
            /*
             * A grant on its way will probably have grown over our range:
             * wait for it rather than queueing behind it at the
             * coordinator.  Not once it waits there (no head-of-line
             * blocking behind other hosts), and not while grants do not
             * grow (a busy lock-space: requests would go one at a time).
             */
            if (c->fd >= 0 && c->grants_grow &&
                extlock_grant_in_flight(c, req->mode)) {
                extlock_wait_on(&c->grant_waiters);
                continue;
            }
        }
        if (c->fd < 0 || c->state != EXTLOCK_SESSION_ACTIVE) {
            /* Reconnecting: woken when connected or the lease is lost */
            extlock_wait_on(&c->usable_waiters);
            continue;
        }

        ret = extlock_request_send(c, req);
        if (ret == -EAGAIN) {
            /* The connection dropped before the grant: ask again */
            continue;
        }
        return ret;
    }
}

void extlock_client_unlock(ExtlockClient *c, ExtlockRequest *req)
{
    ExtlockCachedLock *l = req->lock;

    assert(l && l->users > 0);
    req->lock = NULL;
    extlock_local_done(c, req);
    l->users--;
    /* When the request started is close enough for LRU ageing */
    l->last_used_ns = c->last_now_ns;
    if (l->users > 0) {
        return;
    }
    if (l->ce.stale) {
        extlock_stale_done(c, l);
    } else if (!c->opts.cache) {
        /*
         * No caching: give it back now, or right after reconnecting
         * (extlock_locks_retry_revokes()).  Never park it in the idle
         * list: the coordinator sends no revocations to a node that does
         * not cache, so others would wait for lock-cache-idle-time.
         */
        if (c->fd >= 0) {
            extlock_lock_give_back(c, l, l->ce.node.ext);
        }
    } else if (l->ce.revoking) {
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
    ExtlockCachedLock *l;

    for (n = extlock_itree_first(&c->locks); n; n = extlock_itree_next(n)) {
        fn(container_of(n, ExtlockCachedLock, ce.node), opaque);
    }
    QLIST_FOREACH(l, &c->stale, stale_next) {
        fn(l, opaque);
    }
}

/*
 * ----------------------------------------------------------------------
 * Interface to the connection (extlock-client.c)
 */

static void extlock_request_finish(ExtlockRequest *req, int ret)
{
    req->done = true;
    req->ret = ret;
}

void extlock_locks_handle(ExtlockClient *c, ExtlockRequest *req,
                          ExtlockMsg *msg, GPtrArray *wake)
{
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
        break;
    case EXTLOCK_MSG_GRANTED:
        if (req) {
            extlock_handle_granted(c, req, msg);
            g_hash_table_remove(c->pending, &req->id);
            extlock_request_finish(req, 0);
            g_ptr_array_add(wake, req);
        }
        break;
    case EXTLOCK_MSG_ERROR:
        if (req) {
            error_report("extlock: node '%s': coordinator %s refused lock "
                         "[%" PRIu64 ", +%" PRIu64 "): %s (%s)",
                         c->node_name, c->address, req->offset, req->length,
                         msg->message ? msg->message : "",
                         extlock_error_code_name(msg->error));
            c->stats.errors++;
            g_hash_table_remove(c->pending, &req->id);
            extlock_request_finish(req, -EIO);
            g_ptr_array_add(wake, req);
        }
        break;
    case EXTLOCK_MSG_REVOKE:
        extlock_handle_revoke(c, msg);
        break;
    default:
        break;
    }
}

void extlock_locks_disconnected(ExtlockClient *c)
{
    GHashTableIter it;
    gpointer value;

    g_hash_table_iter_init(&it, c->pending);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        ExtlockRequest *req = value;
        if (!req->co) {
            continue;   /* not a lock request (renew, unlock, ...) */
        }
        extlock_request_finish(req, -EAGAIN);
        /* The request that is failing us right now just sees req->done */
        if (!(qemu_in_coroutine() && req->co == qemu_coroutine_self())) {
            aio_co_schedule(c->ctx ? c->ctx : qemu_get_aio_context(),
                            req->co);
        }
        g_hash_table_iter_remove(&it);
    }
}

void extlock_locks_lease_lost(ExtlockClient *c)
{
    GHashTableIter it;
    gpointer value;
    g_autoptr(GPtrArray) drop = g_ptr_array_new();

    g_hash_table_iter_init(&it, c->lock_ids);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        g_ptr_array_add(drop, value);
    }
    for (guint i = 0; i < drop->len; i++) {
        ExtlockCachedLock *l = g_ptr_array_index(drop, i);

        if (l->users) {
            /* The session may yet be resumed with this lock in it */
            extlock_lock_make_stale(c, l, true);
        } else {
            extlock_cache_drop(c, l);
        }
    }
}

void extlock_locks_wake_usable(ExtlockClient *c)
{
    extlock_wake_all(&c->usable_waiters);
    extlock_wake_all(&c->grant_waiters);
}

void extlock_locks_wake_grant_waiters(ExtlockClient *c)
{
    extlock_wake_all(&c->grant_waiters);
}

void extlock_locks_check_waiters(ExtlockClient *c, int64_t now)
{
    ExtlockRequest *req;
    int64_t limit = (int64_t)c->opts.wait_warning_ms * SCALE_MS;

    if (!c->opts.wait_warning_ms) {
        return;
    }
    QLIST_FOREACH(req, &c->waiting, next) {
        if (!req->warned && now - req->start_ns >= limit) {
            strList *blockers = NULL, **tail = &blockers;

            req->warned = true;
            for (guint i = 0; i < req->blocked_by->len; i++) {
                QAPI_LIST_APPEND(tail,
                    g_strdup(g_ptr_array_index(req->blocked_by, i)));
            }
            qapi_event_send_extent_lock_wait_timeout(
                c->node_name, req->offset, req->length,
                req->mode == EXTLOCK_MODE_EXCLUSIVE ?
                    EXTENT_LOCK_MODE_EXCLUSIVE : EXTENT_LOCK_MODE_SHARED,
                (now - req->start_ns) / SCALE_MS, blockers);
            qapi_free_strList(blockers);
        }
    }
}

GArray *extlock_locks_snapshot(ExtlockClient *c)
{
    GArray *a = g_array_new(false, true, sizeof(ExtlockReclaim));
    ExtlockITNode *n;
    ExtlockCachedLock *l;

    for (n = extlock_itree_first(&c->locks); n; n = extlock_itree_next(n)) {
        l = container_of(n, ExtlockCachedLock, ce.node);
        ExtlockReclaim r = {
            .old_id = l->lock_id,
            .offset = n->ext.start,
            .length = n->ext.end - n->ext.start,
            .mode = l->ce.mode,
            .token = l->token,
        };
        g_array_append_val(a, r);
    }
    /*
     * Stale locks that requests still use are reclaimed too, so that
     * nobody else is granted their extents before those requests are
     * done; they are given back then.
     */
    QLIST_FOREACH(l, &c->stale, stale_next) {
        if (l->give_back && l->session_gen == c->session_gen) {
            ExtlockReclaim r = {
                .old_id = l->lock_id,
                .offset = l->ce.node.ext.start,
                .length = l->ce.node.ext.end - l->ce.node.ext.start,
                .mode = l->ce.mode,
                .token = l->token,
                .stale = true,
            };
            g_array_append_val(a, r);
        }
    }
    return a;
}

/* The lock is gone at the coordinator: never use it again */
static void extlock_lock_lost(ExtlockClient *c, ExtlockCachedLock *l)
{
    if (l->users) {
        error_report("extlock: node '%s': lock [%" PRIu64 ", +%" PRIu64
                     ") was lost while %u requests used it", c->node_name,
                     l->ce.node.ext.start,
                     l->ce.node.ext.end - l->ce.node.ext.start,
                     l->users);
        extlock_lock_make_stale(c, l, false);
    } else {
        extlock_cache_drop(c, l);
    }
}

void extlock_locks_dropped(ExtlockClient *c, uint64_t lock_id)
{
    ExtlockCachedLock *l = g_hash_table_lookup(c->lock_ids, &lock_id);

    if (l) {
        extlock_lock_lost(c, l);
        /* Requests that wait for a lock of ours may ask again */
        extlock_locks_wake_usable(c);
    }
}

/* A lock the coordinator says we hold but we do not know: give it back */
static void extlock_unlock_unknown(ExtlockClient *c, uint64_t lock_id)
{
    extlock_send_unlock(c, lock_id);
}

/*
 * After reconnecting: honour revocations that were pending, and give back
 * what lock-cache=off kept only because the connection was down.
 */
static void extlock_locks_retry_revokes(ExtlockClient *c)
{
    g_autoptr(GPtrArray) revoking = g_ptr_array_new();
    g_autoptr(GPtrArray) release = g_ptr_array_new();
    GHashTableIter it;
    gpointer value;

    g_hash_table_iter_init(&it, c->lock_ids);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        ExtlockCachedLock *l = value;
        if (l->users) {
            continue;
        }
        if (l->ce.revoking) {
            g_ptr_array_add(revoking, l);
        } else if (!c->opts.cache) {
            g_ptr_array_add(release, l);
        }
    }
    for (guint i = 0; i < revoking->len; i++) {
        extlock_lock_try_revoke(c, g_ptr_array_index(revoking, i));
    }
    for (guint i = 0; i < release->len && c->fd >= 0; i++) {
        ExtlockCachedLock *l = g_ptr_array_index(release, i);
        extlock_lock_give_back(c, l, l->ce.node.ext);
    }
}

void extlock_locks_resumed(ExtlockClient *c, GArray *server_locks)
{
    g_autoptr(GHashTable) listed = g_hash_table_new(g_int64_hash,
                                                    g_int64_equal);
    g_autoptr(GPtrArray) lost = g_ptr_array_new();
    GHashTableIter it;
    gpointer value;

    g_autoptr(GHashTable) stale_listed = g_hash_table_new(NULL, NULL);
    ExtlockCachedLock *s;

    for (guint i = 0; server_locks && i < server_locks->len; i++) {
        ExtlockHeldLock *h = &g_array_index(server_locks, ExtlockHeldLock, i);
        ExtlockCachedLock *l = g_hash_table_lookup(c->lock_ids, &h->lock);

        s = l ? NULL : extlock_stale_find(c, h->lock);
        if (l) {
            g_hash_table_add(listed, &l->lock_id);
        } else if (s) {
            /* Still in use: given back when its last user is done */
            g_hash_table_add(stale_listed, s);
        } else {
            extlock_unlock_unknown(c, h->lock);
        }
    }
    QLIST_FOREACH(s, &c->stale, stale_next) {
        if (!g_hash_table_contains(stale_listed, s)) {
            s->give_back = false;
        }
    }
    g_hash_table_iter_init(&it, c->lock_ids);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        ExtlockCachedLock *l = value;
        if (!g_hash_table_contains(listed, &l->lock_id)) {
            g_ptr_array_add(lost, l);
        }
    }
    for (guint i = 0; i < lost->len; i++) {
        extlock_lock_lost(c, g_ptr_array_index(lost, i));
    }
    extlock_locks_retry_revokes(c);
}

void extlock_locks_reclaimed(ExtlockClient *c, GArray *reclaims)
{
    g_autoptr(GPtrArray) renumbered = g_ptr_array_new();

    /*
     * Two passes: a lock's new id may be the old id of another lock that
     * is still to be looked up, so take every renumbered lock out of the
     * table first and put them back under their new ids afterwards.
     */
    g_autoptr(GHashTable) stale_kept = g_hash_table_new(NULL, NULL);
    g_autoptr(GPtrArray) stale = g_ptr_array_new();
    ExtlockCachedLock *s;

    /*
     * Stale locks: look them all up before renumbering any.  A lock may
     * also have become stale (lease lost) while we were reclaiming it.
     */
    for (guint i = 0; i < reclaims->len; i++) {
        ExtlockReclaim *r = &g_array_index(reclaims, ExtlockReclaim, i);

        s = NULL;
        if (r->stale || !g_hash_table_lookup(c->lock_ids, &r->old_id)) {
            s = extlock_stale_find(c, r->old_id);
        }
        g_ptr_array_add(stale, s);
    }
    for (guint i = 0; i < reclaims->len; i++) {
        ExtlockReclaim *r = &g_array_index(reclaims, ExtlockReclaim, i);
        ExtlockCachedLock *l;

        s = g_ptr_array_index(stale, i);
        if (s) {
            if (r->ok) {
                /* Still in use: given back when its last user is done */
                g_hash_table_add(stale_kept, s);
                s->lock_id = r->new_id;
            }
            continue;
        }
        l = r->stale ? NULL : g_hash_table_lookup(c->lock_ids, &r->old_id);
        if (!r->ok) {
            if (l) {
                extlock_lock_lost(c, l);
            }
        } else if (!l) {
            /* Given up locally while we were reclaiming */
            extlock_unlock_unknown(c, r->new_id);
        } else {
            g_hash_table_remove(c->lock_ids, &l->lock_id);
            l->lock_id = r->new_id;
            g_ptr_array_add(renumbered, l);
        }
    }
    for (guint i = 0; i < renumbered->len; i++) {
        ExtlockCachedLock *l = g_ptr_array_index(renumbered, i);
        g_hash_table_insert(c->lock_ids, &l->lock_id, l);
    }
    QLIST_FOREACH(s, &c->stale, stale_next) {
        if (!g_hash_table_contains(stale_kept, s)) {
            s->give_back = false;
        }
    }
    extlock_locks_retry_revokes(c);
}

uint64_t extlock_locks_forget_all(ExtlockClient *c)
{
    g_autoptr(GPtrArray) all = g_ptr_array_new();
    GHashTableIter it;
    gpointer value;

    ExtlockCachedLock *s;

    g_hash_table_iter_init(&it, c->lock_ids);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        g_ptr_array_add(all, value);
    }
    for (guint i = 0; i < all->len; i++) {
        extlock_lock_lost(c, g_ptr_array_index(all, i));
    }
    /* The old session and its locks are gone for good */
    QLIST_FOREACH(s, &c->stale, stale_next) {
        s->give_back = false;
    }
    c->session_gen++;
    return all->len;
}

void extlock_locks_init(ExtlockClient *c)
{
    c->lock_ids = g_hash_table_new(g_int64_hash, g_int64_equal);
    QLIST_INIT(&c->waiting);
    QTAILQ_INIT(&c->idle);
    QLIST_INIT(&c->stale);
    c->grant_waiters = g_ptr_array_new();
    c->local_waiters = g_ptr_array_new();
    c->grants_grow = true;      /* until a grant shows otherwise */
    c->usable_waiters = g_ptr_array_new();
}

void extlock_locks_destroy(ExtlockClient *c)
{
    ExtlockITNode *n;

    assert(QLIST_EMPTY(&c->waiting));
    while ((n = extlock_itree_first(&c->locks))) {
        ExtlockCachedLock *l = container_of(n, ExtlockCachedLock, ce.node);
        assert(l->users == 0);
        extlock_cache_drop(c, l);
    }
    assert(QLIST_EMPTY(&c->stale));
    g_hash_table_destroy(c->lock_ids);
    assert(!c->grant_waiters->len && !c->usable_waiters->len);
    g_ptr_array_free(c->grant_waiters, true);
    g_ptr_array_free(c->usable_waiters, true);
    assert(!c->local_waiters->len && !c->active.count);
    g_ptr_array_free(c->local_waiters, true);
}

void extlock_locks_attach(ExtlockClient *c)
{
    c->cache_timer = aio_timer_new(c->ctx, QEMU_CLOCK_REALTIME, SCALE_NS,
                                   extlock_cache_timer_cb, c);
    /* Catch up on revocations and ageing that were due while detached */
    timer_mod(c->cache_timer, qemu_clock_get_ns(QEMU_CLOCK_REALTIME));
}

void extlock_locks_detach(ExtlockClient *c)
{
    if (c->cache_timer) {
        timer_free(c->cache_timer);
        c->cache_timer = NULL;
    }
}
