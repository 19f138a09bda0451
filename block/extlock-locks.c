/*
 * extlock: the lock cache, revocation and the request API
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * On top of the connection (extlock-connection.h): this file calls it only
 * through its functions, and it calls back through extlock_conn_ops.
 */

#include "qemu/osdep.h"
#include "qemu/error-report.h"
#include "qemu/main-loop.h"
#include "qapi/qapi-events-block-extlock.h"
#include "qapi/error.h"
#include "qemu/sockets.h"
#include "extlock-locks.h"
#include "extlock-pr.h"
#include "extlock-compat.h"
#include "trace.h"

static void extlock_cache_timer_cb(void *opaque);

/* Connected to the coordinator (messages sent now reach it)? */
static bool extlock_online(ExtlockClient *c)
{
    return c->conn && extlock_conn_connected(c->conn);
}
static void extlock_wait_timer_arm(ExtlockClient *c, int64_t when);

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

static void extlock_wake_all_of(GPtrArray **list)
{
    GPtrArray *woken = *list;

    *list = g_ptr_array_new();
    for (guint i = 0; i < woken->len; i++) {
        aio_co_wake(g_ptr_array_index(woken, i));
    }
    g_ptr_array_free(woken, true);
}

/* Inline: every request wakes the (mostly empty) local waiters */
static inline void extlock_wake_all(GPtrArray **list)
{
    if ((*list)->len) {
        extlock_wake_all_of(list);
    }
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
    if (l->in_linger) {
        QTAILQ_REMOVE(&c->lingering, l, linger);
        l->in_linger = false;
        c->n_lingering--;
    }
}

/* @l leaves c->locks (or changes its extent): no longer the last hit */
static void extlock_cache_forget_hit(ExtlockClient *c, ExtlockCachedLock *l)
{
    if (c->last_hit == l) {
        c->last_hit = NULL;
    }
}

/* The lock stops being ours: count how long it was held */
static void extlock_lock_count_hold(ExtlockClient *c, ExtlockCachedLock *l)
{
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);

    extlock_hist_add(&c->stats.hold_hist,
                     now > l->granted_ns ? (now - l->granted_ns) / 1000 : 0);
}

static void extlock_cache_drop(ExtlockClient *c, ExtlockCachedLock *l)
{
    assert(!l->ce.stale);
    extlock_lock_count_hold(c, l);
    extlock_cache_idle_del(c, l);
    extlock_cache_forget_hit(c, l);
    extlock_itree_remove(&c->locks, &l->ce.node);
    g_hash_table_remove(c->lock_ids, &l->lock_id);
    g_free(l);
}

/*
 * Handoff timing for contrib/extlock-bench/bench-qemu.py: one trace event
 * per step, stamped with QEMU_CLOCK_REALTIME (CLOCK_MONOTONIC, the clock
 * of extlockd's event log).  The clock is read only while it is enabled.
 */
static void extlock_trace_handoff(ExtlockClient *c, const char *step,
                                  uint64_t id, int64_t now)
{
    if (trace_event_get_state_backends(TRACE_EXTLOCK_CLIENT_HANDOFF)) {
        trace_extlock_client_handoff(c->node_name, step, id, now ? now :
                                     qemu_clock_get_ns(QEMU_CLOCK_REALTIME));
    }
}

/* The time to stamp a message about to be sent with, if traced */
static int64_t extlock_trace_handoff_now(void)
{
    return trace_event_get_state_backends(TRACE_EXTLOCK_CLIENT_HANDOFF) ?
           qemu_clock_get_ns(QEMU_CLOCK_REALTIME) : 0;
}

/* Send "unlock" for the whole of lock @lock_id */
static void extlock_send_unlock(ExtlockClient *c, uint64_t lock_id)
{
    ExtlockMsg msg;

    extlock_msg_init(&msg, EXTLOCK_MSG_UNLOCK);
    msg.lock = lock_id;
    extlock_conn_send(c->conn, &msg);
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
    extlock_lock_count_hold(c, l);
    extlock_cache_idle_del(c, l);
    extlock_cache_forget_hit(c, l);
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
    if (l->give_back && extlock_online(c) && l->session_gen == c->session_gen) {
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
    int64_t sent_ns;
    ExtlockMsg msg;

    assert(l->users == 0 && extlock_online(c));
    extlock_msg_init(&msg, EXTLOCK_MSG_UNLOCK);
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
    sent_ns = extlock_trace_handoff_now();
    extlock_conn_send(c->conn, &msg);
    extlock_msg_clear(&msg);
    extlock_trace_handoff(c, "unlock-tx", l->lock_id, sent_ns);

    if (whole) {
        extlock_cache_drop(c, l);
        return false;
    }
    extlock_cache_forget_hit(c, l);
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
 * since the lock was granted (if the wanted part reaches that end, up to
 * the span it used).  So two hosts working on disjoint ranges split a
 * grown lock between them once and then stop talking.  If the used span
 * touches the wanted part or lies on both sides, the whole lock.
 */
static ExtlockExtent extlock_revoke_part(ExtlockCachedLock *l)
{
    return extlock_cache_revoke_part(l->ce.node.ext, l->revoke_ext, l->used);
}

/* Make the cache timer fire at @when at the latest */
static void extlock_cache_arm_timer(ExtlockClient *c, int64_t when)
{
    if (c->cache_timer && c->cache_timer_at > when) {
        c->cache_timer_at = when;
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
    if (!extlock_online(c)) {
        /* Give it back once reconnected (the revoke is re-sent then) */
        c->revokes_deferred = true;
        return;
    }
    if (now < hold_until) {
        c->revokes_deferred = true;
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
        msg.lock = l->lock_id;
        trace_extlock_client_downgrade(c->node_name, l->lock_id);
        extlock_conn_send(c->conn, &msg);
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
    while (c->n_idle > c->opts.cache_size && extlock_online(c)) {
        ExtlockCachedLock *l = QTAILQ_FIRST(&c->idle);
        c->stats.cache_evictions++;
        extlock_cache_idle_del(c, l);
        extlock_lock_give_back(c, l, l->ce.node.ext);
    }
}

/* Give back the contended lock @l, idle and out of the cache lists */
static void extlock_lock_release_contended(ExtlockClient *c,
                                           ExtlockCachedLock *l)
{
    trace_extlock_client_release_contended(c->node_name, l->lock_id);
    c->stats.contended_releases++;
    if (c->contended_budget) {
        c->contended_budget--;
    }
    extlock_lock_give_back(c, l, l->ce.node.ext);
}

/*
 * Timer: minimum hold times that ran out, contended locks idle for their
 * linger, idle locks that aged out
 */
static void extlock_cache_timer_cb(void *opaque)
{
    ExtlockClient *c = opaque;
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    int64_t idle_ns = (int64_t)c->opts.cache_idle_ms * SCALE_MS;
    g_autoptr(GPtrArray) revoking = g_ptr_array_new();
    GHashTableIter it;
    gpointer value;
    ExtlockCachedLock *l;

    c->cache_timer_at = INT64_MAX;      /* fired: no longer pending */
    /*
     * Revoked idle locks that waited for their minimum hold time or the
     * connection: only if one did (the timer fires every millisecond
     * while contended locks linger, and there may be many locks).
     * extlock_lock_try_revoke() sets the flag again for those that must
     * wait on.
     */
    if (c->revokes_deferred) {
        c->revokes_deferred = false;
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
    }

    while (extlock_online(c) && (l = QTAILQ_FIRST(&c->lingering)) &&
           l->last_used_ns + EXTLOCK_CONTENDED_LINGER_NS <= now) {
        extlock_cache_idle_del(c, l);
        extlock_lock_release_contended(c, l);
    }
    while (extlock_online(c) && (l = QTAILQ_FIRST(&c->idle)) &&
           l->last_used_ns + idle_ns <= now) {
        c->stats.cache_evictions++;
        extlock_cache_idle_del(c, l);
        extlock_lock_give_back(c, l, l->ce.node.ext);
    }
    /*
     * Offline, the head cannot be given back, and its time may be past: a
     * timer armed in the past would run again at once, for ever
     * (timerlist_run_timers() reads the clock once).  The timer is armed
     * again when the session comes back (extlock_locks_retry_revokes()).
     */
    l = QTAILQ_FIRST(&c->idle);
    if (l && extlock_online(c)) {
        extlock_cache_arm_timer(c, l->last_used_ns + idle_ns);
    }
    l = QTAILQ_FIRST(&c->lingering);
    if (l && extlock_online(c)) {
        extlock_cache_arm_timer(c, l->last_used_ns +
                                EXTLOCK_CONTENDED_LINGER_NS);
    }
}

/*
 * A cached lock that serves @ext in @mode (never a revoked or stale one).
 * The last one that served is tried first, without a search: any lock
 * that serves will do (each is valid and covers @ext in a mode that
 * allows @mode), the tree's first is not preferred.
 */
static ExtlockCachedLock *extlock_cache_find(ExtlockClient *c,
                                             ExtlockExtent ext,
                                             ExtlockMode mode)
{
    ExtlockCacheEntry *e;

    if (c->last_hit &&
        extlock_cache_entry_serves(&c->last_hit->ce, ext, mode)) {
        return c->last_hit;
    }
    e = extlock_cache_lookup(&c->locks, ext, mode);
    if (!e) {
        return NULL;
    }
    c->last_hit = container_of(e, ExtlockCachedLock, ce);
    return c->last_hit;
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

/*
 * A grant or a renewal says how many maintenances the lock-space had
 * (none without "maint-gen"): has one run since the node last looked?
 * Before the first answer the node cannot tell whether one ran between
 * its open and now: if the lock-space ever had one, it rereads once.
 */
static bool extlock_note_maint(ExtlockClient *c, ExtlockMsg *msg)
{
    bool changed = c->maint_gen_known ? msg->maint_gen != c->maint_gen
                                      : msg->maint_gen != 0;

    if (changed) {
        c->maint_reload = true;
    }
    c->maint_gen_known = true;
    c->maint_gen = msg->maint_gen;
    if (msg->type == EXTLOCK_MSG_GRANTED) {
        c->has_maint_size = msg->has_maint_size;
        c->maint_size = msg->maint_size;
    }
    return changed;
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
    /* Before any request uses the lock: extlock_maint_enter() */
    extlock_note_maint(c, msg);
    if (!req->maint) {
        c->grants_grow = msg->length > req->length;
        c->stats.grants++;
        extlock_hist_add(&c->stats.wait_hist,
                         now > req->start_ns ? (now - req->start_ns) / 1000
                                             : 0);
    }
    if (req->queued) {
        c->stats.total_wait_us += (now - req->start_ns) / 1000;
    }
    trace_extlock_client_granted(c->node_name, req->id, msg->lock,
                                 msg->offset, msg->length, msg->token);
    extlock_trace_handoff(c, "grant-rx", msg->lock, now);
}

/*
 * Does the request with token @token, for which the coordinator revokes a
 * lock of ours, belong to this node (an upgrade from shared to exclusive,
 * or a request over a lock under revocation)?  Its "waiting" reply, which
 * carries the token, came before the revoke on the same connection.
 */
static bool extlock_token_is_ours(ExtlockClient *c, uint64_t token)
{
    ExtlockRequest *r;

    QLIST_FOREACH(r, &c->waiting, next) {
        if (r->queued && r->token == token) {
            return true;
        }
    }
    return false;
}

/*
 * A revoke, handled right in the fd handler (or its io_poll_ready): no
 * coroutine hop, no timer unless min-hold-time or long-hold-ms asks for
 * one.  Safe because the handler runs in the node's AioContext thread,
 * where the requests' coroutines run only between their yields: a
 * request either holds a reference (users > 0, and the lock goes back
 * when the last one is done) or has not found the lock yet, and then
 * never will (a revoking lock serves nobody): it asks the coordinator and
 * queues behind the request that caused the revoke.
 */
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
        l->revoke_token = msg->token;
        l->hold_warned = false;
        extlock_cache_idle_del(c, l);
        l->revoke_by_other = false;
        extlock_trace_handoff(c, "revoke-rx", msg->lock, l->revoke_ns);
        if (c->opts.long_hold_ms) {
            extlock_wait_timer_arm(c, l->revoke_ns +
                                   (int64_t)c->opts.long_hold_ms * SCALE_MS);
        }
    } else {
        if (msg->mode == EXTLOCK_MODE_EXCLUSIVE) {
            l->revoke_mode = EXTLOCK_MODE_EXCLUSIVE;
        }
        l->revoke_ext.start = MIN(l->revoke_ext.start, want.start);
        l->revoke_ext.end = MAX(l->revoke_ext.end, want.end);
    }
    /* Contention is another host's want, not our own upgrade */
    if (!l->revoke_by_other && !extlock_token_is_ours(c, msg->token)) {
        l->revoke_by_other = true;
        c->contended[c->contended_next] = want;
        c->contended_ns[c->contended_next] = l->revoke_ns;
        c->contended_mode[c->contended_next] = msg->mode;
        c->contended_next = (c->contended_next + 1) % EXTLOCK_CONTENDED_MAX;
        c->contended_until_ns = l->revoke_ns + EXTLOCK_CONTENDED_NS;
        c->contended_budget = EXTLOCK_CONTENDED_RELEASES;
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

/*
 * The ranges other hosts wanted of our locks in the last
 * EXTLOCK_CONTENDED_NS before @now, into @recent and @modes (room for
 * EXTLOCK_CONTENDED_MAX); returns how many
 */
static size_t extlock_recent_contended(ExtlockClient *c, int64_t now,
                                       ExtlockExtent *recent,
                                       ExtlockMode *modes)
{
    size_t n = 0;

    for (unsigned i = 0; i < EXTLOCK_CONTENDED_MAX; i++) {
        if (c->contended_ns[i] &&
            now - c->contended_ns[i] < EXTLOCK_CONTENDED_NS) {
            modes[n] = c->contended_mode[i];
            recent[n++] = c->contended[i];
        }
    }
    return n;
}

/* The range a lock request for @ext may grow into */
static ExtlockExtent extlock_grow_limit(ExtlockClient *c, ExtlockExtent ext)
{
    ExtlockExtent recent[EXTLOCK_CONTENDED_MAX];
    ExtlockMode modes[EXTLOCK_CONTENDED_MAX];
    size_t n;

    n = extlock_recent_contended(c, qemu_clock_get_ns(QEMU_CLOCK_REALTIME),
                                 recent, modes);
    return extlock_cache_grow_limit(ext, extlock_ext(0, MAX(c->opts.grow_limit,
                                                        ext.end)),
                                    recent, n);
}

/*
 * Should the idle lock @l go back soon rather than stay in the cache:
 * another host wanted part of it, in a conflicting mode, in the last
 * EXTLOCK_CONTENDED_NS (as Lustre does for contended resources).  Then it
 * goes back once idle for EXTLOCK_CONTENDED_LINGER_NS, and the host that
 * asks next is granted at once instead of waiting for a revocation to
 * reach us and for our answer.  A host working alone again caches again
 * once the contention is that old, and a busy host after
 * EXTLOCK_CONTENDED_RELEASES such give-backs (until the next revocation).
 * Not before min-hold-time has passed since the grant.  Sets *@now_out to
 * the time it decided on (when it read the clock).
 */
static bool extlock_lock_contended(ExtlockClient *c, ExtlockCachedLock *l,
                                   int64_t *now_out)
{
    ExtlockExtent recent[EXTLOCK_CONTENDED_MAX];
    ExtlockMode modes[EXTLOCK_CONTENDED_MAX];
    int64_t now;
    size_t n;

    /* The usual case, a cheap test: the last request started after it */
    if (c->opts.cache_contended || c->last_now_ns >= c->contended_until_ns ||
        c->contended_budget <= c->n_lingering) {
        return false;
    }
    now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    if (now < l->granted_ns + (int64_t)c->opts.min_hold_us * 1000) {
        return false;   /* kept as asked; a revocation waits for it */
    }
    n = extlock_recent_contended(c, now, recent, modes);
    *now_out = now;
    return extlock_cache_contended(l->ce.node.ext, l->ce.mode, recent, modes,
                                   n);
}

/* Send the lock request and wait for its final reply */
static int coroutine_fn extlock_request_send(ExtlockClient *c,
                                             ExtlockRequest *req)
{
    ExtlockExtent ext = extlock_ext(req->offset, req->length);
    int64_t sent_ns;
    ExtlockMsg msg;

    req->co = qemu_coroutine_self();
    req->queued = req->done = req->warned = false;
    req->ret = 0;
    req->token = 0;
    req->blocked_by = g_ptr_array_new_with_free_func(g_free);
    req->cancel_sent = false;
    QLIST_INSERT_HEAD(&c->waiting, req, next);
    if (c->opts.wait_warning_ms) {
        extlock_wait_timer_arm(c, req->start_ns +
                               (int64_t)c->opts.wait_warning_ms * SCALE_MS);
    }

    extlock_msg_init(&msg, EXTLOCK_MSG_LOCK);
    msg.has_id = true;
    msg.id = req->id;
    msg.has_extent = true;
    msg.offset = req->offset;
    msg.length = req->length;
    msg.mode = req->mode;
    msg.wait = true;
    if (req->maint) {
        /* No growth */
        msg.has_limit = true;
        msg.limit_offset = ext.start;
        msg.limit_length = ext.end - ext.start;
    } else if (c->opts.cache && c->opts.grow_limit) {
        ExtlockExtent lim = extlock_grow_limit(c, ext);

        msg.has_limit = true;
        msg.limit_offset = lim.start;
        msg.limit_length = lim.end - lim.start;
    }
    if (!req->maint) {
        c->stats.requests++;
    }
    sent_ns = extlock_trace_handoff_now();
    req->id = extlock_conn_request(c->conn, &msg, req);
    extlock_msg_clear(&msg);
    trace_extlock_client_lock(c->node_name, req->id, req->offset,
                              req->length, extlock_mode_name(req->mode));
    extlock_trace_handoff(c, "lock-tx", req->id, sent_ns);
    if (!req->id) {
        /* Disconnected meanwhile: ask again */
        req->done = true;
        req->ret = -EAGAIN;
    }

    while (!req->done) {
        qemu_coroutine_yield();
    }
    req->co = NULL;
    if (req->lock) {
        extlock_trace_handoff(c, "wakeup", req->lock->lock_id, 0);
    }
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
    extlock_local_remove(&c->active, &req->local);
    extlock_wake_all(&c->local_waiters);
}

static int coroutine_fn extlock_client_lock_cached(ExtlockClient *c,
                                                   ExtlockRequest *req);

/*
 * May @req no longer wait for anybody: the node is drained, or
 * extlock_client_cancel_waits() ran since it started?
 */
static bool extlock_req_cut(ExtlockClient *c, ExtlockRequest *req)
{
    return (c->drain_cut && !req->no_drain_cut) ||
           req->cancel_gen != c->cancel_gen;
}

/*
 * @req was given no lock, so it touched nothing and may fail: the caller
 * sees an I/O error (with werror/rerror=stop a guest's device stops and
 * retries it when resumed).
 */
static int extlock_req_fail_cut(ExtlockClient *c, ExtlockRequest *req)
{
    c->stats.errors++;
    trace_extlock_client_wait_cut(c->node_name, req->offset, req->length,
                                  c->drain_cut);
    return -EIO;
}

/* Ask the coordinator to give up queued request @req */
static void extlock_send_cancel(ExtlockClient *c, ExtlockRequest *req)
{
    ExtlockMsg msg;

    if (req->cancel_sent || !extlock_online(c)) {
        return;
    }
    req->cancel_sent = true;
    extlock_msg_init(&msg, EXTLOCK_MSG_CANCEL);
    msg.request = req->id;
    trace_extlock_client_cancel(c->node_name, req->id, req->offset,
                                req->length);
    if (extlock_conn_send(c->conn, &msg)) {
        g_hash_table_add(c->cancel_ids, g_memdup2(&msg.id, sizeof(msg.id)));
    }
    extlock_msg_clear(&msg);
}

int coroutine_fn extlock_client_lock(ExtlockClient *c, ExtlockRequest *req)
{
    int ret;

    req->cancel_gen = c->cancel_gen;
    req->local.seq = c->next_seq++;
    req->local.mode = req->mode;
    req->local.node.ext = extlock_ext(req->offset, req->length);
    extlock_local_insert(&c->active, &req->local);
    while (extlock_local_must_wait(&c->active, &req->local)) {
        req->waited = true;
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
        if (!extlock_conn_lease_valid_at(c->conn, now)) {
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
            if (extlock_req_cut(c, req)) {
                return extlock_req_fail_cut(c, req);
            }
            extlock_wait_timer_arm(c, start_ns +
                                   (int64_t)c->opts.lease_loss_timeout_ms *
                                   SCALE_MS);
            req->waited = true;
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
            if (extlock_online(c) && c->grants_grow &&
                !extlock_req_cut(c, req) &&
                extlock_grant_in_flight(c, req->mode)) {
                req->waited = true;
                extlock_wait_on(&c->grant_waiters);
                continue;
            }
        }
        if (!extlock_online(c) ||
            extlock_conn_state(c->conn) != EXTLOCK_CONN_ACTIVE) {
            if (extlock_req_cut(c, req)) {
                return extlock_req_fail_cut(c, req);
            }
            /* Reconnecting: woken when connected or the lease is lost */
            req->waited = true;
            extlock_wait_on(&c->usable_waiters);
            continue;
        }

        req->waited = true;
        ret = extlock_request_send(c, req);
        if (ret == -EAGAIN) {
            /* The connection dropped before the grant: ask again */
            continue;
        }
        if (ret == 0) {
            /* Ours, whatever a drain may have asked meanwhile */
            return 0;
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
    } else if (req->maint && extlock_online(c)) {
        extlock_lock_give_back(c, l, l->ce.node.ext);
    } else if (!c->opts.cache) {
        /*
         * No caching: give it back now, or right after reconnecting
         * (extlock_locks_retry_revokes()).  Never park it in the idle
         * list: the coordinator sends no revocations to a node that does
         * not cache, so others would wait for lock-cache-idle-time.
         */
        if (extlock_online(c)) {
            extlock_lock_give_back(c, l, l->ce.node.ext);
        }
    } else if (l->ce.revoking) {
        extlock_lock_try_revoke(c, l);
    } else {
        int64_t now, deadline;

        if (extlock_online(c) && extlock_lock_contended(c, l, &now)) {
            /*
             * Cached a little longer, for the rest of a burst.  Idle from
             * now: c->last_now_ns is when the last request started, and a
             * request that took longer than the linger would find it over.
             */
            l->last_used_ns = now;
            QTAILQ_INSERT_TAIL(&c->lingering, l, linger);
            l->in_linger = true;
            c->n_lingering++;
            deadline = now + EXTLOCK_CONTENDED_LINGER_NS;
        } else {
            deadline = l->last_used_ns +
                       (int64_t)c->opts.cache_idle_ms * SCALE_MS;
        }
        extlock_cache_idle_add(c, l);
        extlock_cache_evict(c);
        extlock_cache_arm_timer(c, deadline);
    }
}

void extlock_client_unlock_announce(ExtlockClient *c, ExtlockRequest *req,
                                    uint64_t size)
{
    ExtlockCachedLock *l = req->lock;
    ExtlockMsg msg;

    assert(req->maint && l && l->users == 1);
    if (l->ce.stale || !extlock_online(c)) {
        /* Lost meanwhile: nothing to announce through */
        extlock_client_unlock(c, req);
        return;
    }
    req->lock = NULL;
    extlock_local_done(c, req);
    l->users--;
    extlock_msg_init(&msg, EXTLOCK_MSG_UNLOCK);
    msg.lock = l->lock_id;
    msg.has_maint_size = true;
    msg.maint_size = size;
    trace_extlock_client_unlock(c->node_name, l->lock_id,
                                l->ce.node.ext.start,
                                l->ce.node.ext.end - l->ce.node.ext.start);
    extlock_conn_send(c->conn, &msg);
    extlock_msg_clear(&msg);
    extlock_cache_drop(c, l);
}

static void extlock_lock_info(ExtlockClient *c, ExtlockCachedLock *l,
                              int64_t now, ExtlockHeldInfo *info)
{
    info->offset = l->ce.node.ext.start;
    info->length = l->ce.node.ext.end - l->ce.node.ext.start;
    info->mode = l->ce.mode;
    info->token = l->token;
    info->held_ms = (now - l->granted_ns) / SCALE_MS;
    info->state = l->ce.stale ? EXTLOCK_LOCK_STALE :
                  l->ce.revoking ? EXTLOCK_LOCK_REVOKING :
                  l->users ? EXTLOCK_LOCK_ACTIVE : EXTLOCK_LOCK_CACHED;
    info->users = l->users;
}

/* For the monitor: every lock this node holds */
void extlock_client_foreach_lock(ExtlockClient *c,
                                 void (*fn)(const ExtlockHeldInfo *, void *),
                                 void *opaque)
{
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    ExtlockHeldInfo info;
    ExtlockITNode *n;
    ExtlockCachedLock *l;

    for (n = extlock_itree_first(&c->locks); n; n = extlock_itree_next(n)) {
        extlock_lock_info(c, container_of(n, ExtlockCachedLock, ce.node),
                          now, &info);
        fn(&info, opaque);
    }
    QLIST_FOREACH(l, &c->stale, stale_next) {
        extlock_lock_info(c, l, now, &info);
        fn(&info, opaque);
    }
}

/* For the monitor: every request waiting for the coordinator */
void extlock_client_foreach_waiter(ExtlockClient *c,
                                   void (*fn)(const ExtlockWaiterInfo *,
                                              void *),
                                   void *opaque)
{
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    ExtlockRequest *req;

    QLIST_FOREACH(req, &c->waiting, next) {
        ExtlockWaiterInfo info = {
            .offset = req->offset,
            .length = req->length,
            .mode = req->mode,
            .queued = req->queued,
            .token = req->token,
            .waited_ms = (now - req->start_ns) / SCALE_MS,
            .blocked_by = req->blocked_by,
        };
        fn(&info, opaque);
    }
}

const ExtlockClientStats *extlock_client_stats(ExtlockClient *c)
{
    return &c->stats;
}

void extlock_client_set_options(ExtlockClient *c,
                                const ExtlockClientOptions *opts)
{
    c->opts = *opts;
    extlock_conn_set_stuck_io_exit(c->conn, opts->stuck_io_exit);
}

ExtlockConnection *extlock_client_conn(ExtlockClient *c)
{
    return c->conn;
}

/*
 * ----------------------------------------------------------------------
 * What the connection tells us (ExtlockConnOps)
 */

static void extlock_request_finish(ExtlockRequest *req, int ret)
{
    req->done = true;
    req->ret = ret;
}

static void extlock_locks_request_reply(void *opaque, void *request,
                                        ExtlockMsg *msg)
{
    ExtlockClient *c = opaque;
    ExtlockRequest *req = request;

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
            if (extlock_req_cut(c, req)) {
                extlock_send_cancel(c, req);
            }
        }
        break;
    case EXTLOCK_MSG_GRANTED:
        if (req) {
            extlock_handle_granted(c, req, msg);
            extlock_request_finish(req, 0);
            g_ptr_array_add(c->wake, req);
        }
        break;
    case EXTLOCK_MSG_ERROR:
        if (req) {
            if (msg->error == EXTLOCK_ERR_CANCELLED && req->cancel_sent) {
                trace_extlock_client_wait_cut(c->node_name, req->offset,
                                              req->length, c->drain_cut);
            } else {
                error_report("extlock: node '%s': coordinator %s refused "
                             "lock [%" PRIu64 ", +%" PRIu64 "): %s (%s)",
                             c->node_name, extlock_conn_address(c->conn),
                             req->offset, req->length,
                             msg->message ? msg->message : "",
                             extlock_error_code_name(msg->error));
            }
            c->stats.errors++;
            extlock_request_finish(req, -EIO);
            g_ptr_array_add(c->wake, req);
        }
        break;
    default:
        break;
    }
}

static void extlock_locks_revoke(void *opaque, ExtlockMsg *msg)
{
    extlock_handle_revoke(opaque, msg);
}

/* The connection is gone: the request asks again once reconnected */
static void extlock_locks_request_lost(void *opaque, void *request)
{
    ExtlockClient *c = opaque;
    ExtlockRequest *req = request;

    extlock_request_finish(req, -EAGAIN);
    /* The request that is failing us right now just sees req->done */
    if (!(qemu_in_coroutine() && req->co == qemu_coroutine_self())) {
        aio_co_schedule(c->ctx ? c->ctx : qemu_get_aio_context(), req->co);
    }
}

/* The lease is lost: no cached lock may be used again */
static void extlock_locks_lease_lost(void *opaque)
{
    ExtlockClient *c = opaque;
    GHashTableIter it;
    gpointer value;
    g_autoptr(GPtrArray) drop = g_ptr_array_new();

    /* "failing I/O" is said once per node and lease loss */
    c->no_lease_io_reported = false;

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

static void extlock_locks_wake_usable(ExtlockClient *c)
{
    extlock_wake_all(&c->usable_waiters);
    extlock_wake_all(&c->grant_waiters);
}

/* The connection or the lease changed: requests waiting for it look again */
static void extlock_locks_state_changed(void *opaque)
{
    ExtlockClient *c = opaque;

    if (extlock_conn_state(c->conn) == EXTLOCK_CONN_ACTIVE) {
        /* A new connection: no reply comes to the old one's cancels */
        g_hash_table_remove_all(c->cancel_ids);
    }
    extlock_pr_conn_changed(c->pr, extlock_conn_state(c->conn));
    extlock_locks_wake_usable(c);
}

/* A read is handled: wake the requests it completed */
static void extlock_locks_read_done(void *opaque)
{
    ExtlockClient *c = opaque;
    g_autoptr(GPtrArray) wake = c->wake;

    c->wake = g_ptr_array_new();
    for (guint i = 0; i < wake->len; i++) {
        ExtlockRequest *req = g_ptr_array_index(wake, i);
        if (req->co) {
            aio_co_wake(req->co);
        }
    }
    /* A grant or a "waiting" may let requests waiting for ours go ahead */
    extlock_wake_all(&c->grant_waiters);
}

/* The coordinator fences a session that our requests wait behind */
static void extlock_locks_fence_status(void *opaque, ExtlockMsg *msg)
{
    ExtlockClient *c = opaque;
    ExtentLockFenceResult result;

    switch (msg->fence_result) {
    case EXTLOCK_FENCE_STARTED:
        result = EXTENT_LOCK_FENCE_RESULT_STARTED;
        break;
    case EXTLOCK_FENCE_SUCCEEDED:
        result = EXTENT_LOCK_FENCE_RESULT_SUCCEEDED;
        break;
    default:
        result = EXTENT_LOCK_FENCE_RESULT_FAILED;
        break;
    }
    extlock_event_send_fence(c->node_name,
                             msg->client_id ? msg->client_id : "", result,
                             msg->message);
}

/* At most one EXTENT_LOCK_WAIT_TIMEOUT a second per node */
#define EXTLOCK_WAIT_EVENT_INTERVAL_NS NANOSECONDS_PER_SECOND

/* EXTENT_LOCK_WAIT_TIMEOUT for slow requests; arm for the next one */
static void extlock_locks_check_waiters(ExtlockClient *c, int64_t now)
{
    ExtlockRequest *req;
    int64_t limit = (int64_t)c->opts.wait_warning_ms * SCALE_MS;

    if (!c->opts.wait_warning_ms) {
        return;
    }
    QLIST_FOREACH(req, &c->waiting, next) {
        if (!req->warned && now - req->start_ns < limit) {
            extlock_wait_timer_arm(c, req->start_ns + limit);
        } else if (!req->warned) {
            strList *blockers = NULL, **tail = &blockers;

            req->warned = true;
            /*
             * Rate-limited, as QEMU throttles events that can flood: a
             * stuck holder makes every request behind it cross the limit
             */
            if (c->wait_event_ns &&
                now - c->wait_event_ns < EXTLOCK_WAIT_EVENT_INTERVAL_NS) {
                c->wait_events_left_out++;
                continue;
            }
            for (guint i = 0; i < req->blocked_by->len; i++) {
                QAPI_LIST_APPEND(tail,
                    g_strdup(g_ptr_array_index(req->blocked_by, i)));
            }
            qapi_event_send_extent_lock_wait_timeout(
                c->node_name, req->offset, req->length,
                req->mode == EXTLOCK_MODE_EXCLUSIVE ?
                    EXTENT_LOCK_MODE_EXCLUSIVE : EXTENT_LOCK_MODE_SHARED,
                (now - req->start_ns) / SCALE_MS, blockers,
                c->wait_events_left_out > 0, c->wait_events_left_out);
            qapi_free_strList(blockers);
            c->wait_event_ns = now;
            c->wait_events_left_out = 0;
        }
    }
}

static void extlock_wait_timer_arm(ExtlockClient *c, int64_t when)
{
    if (c->wait_timer &&
        (!timer_pending(c->wait_timer) ||
         timer_expire_time_ns(c->wait_timer) > when)) {
        timer_mod(c->wait_timer, when);
    }
}

/*
 * One-shot, at the earliest wait warning or lease-loss timeout due: the
 * waiters look again, and those still waiting arm it for their own time.
 */
/*
 * EXTENT_LOCK_LONG_HOLD for locks the coordinator asked back longer than
 * long-hold-time ago: another client has waited that long for this
 * node (its requests still run under the lock, or it is kept for
 * min-hold-time or until reconnected).  Rate-limited like the waits.
 */
static void extlock_locks_check_holders(ExtlockClient *c, int64_t now)
{
    int64_t limit = (int64_t)c->opts.long_hold_ms * SCALE_MS;
    GHashTableIter it;
    gpointer value;

    if (!c->opts.long_hold_ms) {
        return;
    }
    g_hash_table_iter_init(&it, c->lock_ids);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        ExtlockCachedLock *l = value;

        if (!l->ce.revoking || l->hold_warned) {
            continue;
        }
        if (now - l->revoke_ns < limit) {
            extlock_wait_timer_arm(c, l->revoke_ns + limit);
            continue;
        }
        l->hold_warned = true;
        if (c->hold_event_ns &&
            now - c->hold_event_ns < EXTLOCK_WAIT_EVENT_INTERVAL_NS) {
            c->hold_events_left_out++;
            continue;
        }
        qapi_event_send_extent_lock_long_hold(
            c->node_name, l->ce.node.ext.start,
            l->ce.node.ext.end - l->ce.node.ext.start,
            l->ce.mode == EXTLOCK_MODE_EXCLUSIVE ?
                EXTENT_LOCK_MODE_EXCLUSIVE : EXTENT_LOCK_MODE_SHARED,
            l->token, (now - l->granted_ns) / SCALE_MS,
            (now - l->revoke_ns) / SCALE_MS, l->revoke_token, l->users,
            c->hold_events_left_out > 0, c->hold_events_left_out);
        c->hold_event_ns = now;
        c->hold_events_left_out = 0;
    }
}

static void extlock_wait_timer_cb(void *opaque)
{
    ExtlockClient *c = opaque;

    extlock_locks_check_holders(c, qemu_clock_get_ns(QEMU_CLOCK_REALTIME));
    extlock_locks_check_waiters(c, qemu_clock_get_ns(QEMU_CLOCK_REALTIME));
    extlock_wake_all(&c->usable_waiters);
}

static bool extlock_locks_reply(void *opaque, ExtlockMsg *msg)
{
    ExtlockClient *c = opaque;

    if (extlock_pr_reply(c->pr, msg)) {
        return true;
    }

    /*
     * "cancelled", or "not-found" when the grant crossed the cancel (the
     * request then runs under its lock).
     */
    return msg->has_id && g_hash_table_remove(c->cancel_ids, &msg->id);
}

static void extlock_drain_kick(ExtlockClient *c);

/* In c->ctx */
static void extlock_cancel_waits_here(ExtlockClient *c)
{
    ExtlockRequest *req;

    c->cancel_gen++;
    QLIST_FOREACH(req, &c->waiting, next) {
        if (req->queued) {
            extlock_send_cancel(c, req);
        }
    }
    /* Those waiting for the connection, the lease or our grants */
    extlock_locks_wake_usable(c);
}

void extlock_client_cancel_waits(ExtlockClient *c)
{
    if (!c) {
        return;
    }
    /* The drain bottom half cancels in c->ctx (or at once if we run there) */
    qatomic_set(&c->cancel_asked, true);
    extlock_drain_kick(c);
}

static void extlock_pause_reconnect(ExtlockClient *c)
{
    if (!c->conn_paused) {
        c->conn_paused = true;
        extlock_conn_pause(c->conn);
    }
}

/* The drain's grace is over: cut every wait, stop reconnecting */
static void extlock_drain_cut(ExtlockClient *c)
{
    ExtlockRequest *req;

    if (!c->drained || c->drain_cut) {
        return;
    }
    trace_extlock_client_drain_cut(c->node_name);
    c->drain_cut = true;
    /* As extlock_client_cancel_waits(), but a maintenance keeps waiting */
    QLIST_FOREACH(req, &c->waiting, next) {
        if (req->queued && !req->no_drain_cut) {
            extlock_send_cancel(c, req);
        }
    }
    extlock_locks_wake_usable(c);
    extlock_pr_drain_cut(c->pr);
    extlock_pause_reconnect(c);
}

static void extlock_drain_timer_cb(void *opaque)
{
    extlock_drain_cut(opaque);
}

/* The node becomes drained (in c->ctx) */
static void extlock_drain_start(ExtlockClient *c)
{
    c->drained = true;
    c->drain_deadline_ns = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) +
                           EXTLOCK_DRAIN_GRACE_MS * SCALE_MS;
    if (c->drain_timer) {
        timer_mod(c->drain_timer, c->drain_deadline_ns);
    }
    if (!c->usable_waiters->len) {
        /* Nobody waits for the connection: stop reconnecting at once */
        extlock_pause_reconnect(c);
    }
}

/* The last drained section ended (in c->ctx) */
static void extlock_drain_stop(ExtlockClient *c)
{
    c->drained = false;
    if (c->drain_timer) {
        timer_del(c->drain_timer);
    }
    c->drain_cut = false;
    if (c->pr) {
        c->pr->drain_cut = false;
    }
    if (c->conn_paused) {
        c->conn_paused = false;
        extlock_conn_resume(c->conn);
    }
}

/*
 * Act drained or not as the drained sections now ask, and cancel the
 * waits if extlock_client_cancel_waits() asked.  Idempotent: the
 * bottom half may run once for several begins and ends, and after the
 * state it was scheduled for changed back.
 */
static void extlock_drain_sync(ExtlockClient *c)
{
    bool want = qatomic_read(&c->drain_target) > 0;

    if (want && !c->drained) {
        extlock_drain_start(c);
    } else if (!want && c->drained) {
        extlock_drain_stop(c);
    }
    if (qatomic_xchg(&c->cancel_asked, false)) {
        extlock_cancel_waits_here(c);
    }
}

static void extlock_drain_bh(void *opaque)
{
    extlock_drain_sync(opaque);
}

/*
 * The drained sections changed.  Apply that in the node's AioContext: at
 * once if we run there (QEMU 7.2, or a node in the main loop), else in
 * its thread, which a polling drain waits for (a reconnection is counted
 * in flight).  c->ctx and c->drain_bh change only in that thread while
 * the main loop waits for it (extlock.c), never under us.  Detached, the
 * attach applies it.
 */
static void extlock_drain_kick(ExtlockClient *c)
{
    if (!c->ctx) {
        return;
    }
    if (c->ctx == qemu_get_current_aio_context()) {
        extlock_drain_sync(c);
    } else {
        qemu_bh_schedule(c->drain_bh);
    }
}

void extlock_client_drain_begin(ExtlockClient *c)
{
    unsigned old;

    if (!c) {
        return;
    }
    old = qatomic_fetch_inc(&c->drain_target);
    trace_extlock_client_drain(c->node_name, true, old);
    if (old == 0) {
        extlock_drain_kick(c);
    }
}

void extlock_client_drain_end(ExtlockClient *c)
{
    unsigned old;

    if (!c) {
        return;
    }
    old = qatomic_fetch_dec(&c->drain_target);
    assert(old > 0);
    trace_extlock_client_drain(c->node_name, false, old);
    if (old == 1) {
        extlock_drain_kick(c);
    }
}

/* May a revoke come?  (io_poll of the connection) */
static bool extlock_locks_holds_locks(void *opaque)
{
    ExtlockClient *c = opaque;

    return g_hash_table_size(c->lock_ids) || !QLIST_EMPTY(&c->stale);
}

/* Reconnecting: what the node holds, to resume or reclaim */
static GArray *extlock_locks_held(void *opaque)
{
    ExtlockClient *c = opaque;
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

/*
 * The coordinator dropped @lock_id (a reclaim of another session disputed
 * it): never use it again (requests in flight under it finish, bounded by
 * on-stuck-io)
 */
static void extlock_locks_dropped(void *opaque, uint64_t lock_id)
{
    ExtlockClient *c = opaque;

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
    for (guint i = 0; i < release->len && extlock_online(c); i++) {
        ExtlockCachedLock *l = g_ptr_array_index(release, i);
        extlock_lock_give_back(c, l, l->ce.node.ext);
    }
    /* Idle locks that aged while the connection was down */
    extlock_cache_arm_timer(c, qemu_clock_get_ns(QEMU_CLOCK_REALTIME));
}

/* Resumed session: keep what the coordinator still lists, drop the rest */
static void extlock_locks_resumed(void *opaque, GArray *server_locks)
{
    ExtlockClient *c = opaque;

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

/* Restarted coordinator: adopt the new ids of reclaimed locks */
static void extlock_locks_reclaimed(void *opaque, GArray *reclaims)
{
    ExtlockClient *c = opaque;

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

/* New session: every lock is gone; returns how many */
static uint64_t extlock_locks_forget_all(void *opaque)
{
    ExtlockClient *c = opaque;

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

static void extlock_locks_pr_update(void *opaque, ExtlockMsg *msg)
{
    ExtlockClient *c = opaque;

    extlock_pr_update(c->pr, msg);
}

/* An idle node learns of a maintenance from its lease renewals */
static void extlock_locks_renewed(void *opaque, ExtlockMsg *msg)
{
    ExtlockClient *c = opaque;

    if (extlock_note_maint(c, msg) && c->maint_kick) {
        c->maint_kick(c->maint_opaque);
    }
}

static const ExtlockConnOps extlock_conn_ops = {
    .request_reply      = extlock_locks_request_reply,
    .request_lost       = extlock_locks_request_lost,
    .read_done          = extlock_locks_read_done,
    .revoke             = extlock_locks_revoke,
    .reply              = extlock_locks_reply,
    .lock_dropped       = extlock_locks_dropped,
    .fence_status       = extlock_locks_fence_status,
    .lease_lost         = extlock_locks_lease_lost,
    .state_changed      = extlock_locks_state_changed,
    .held_locks         = extlock_locks_held,
    .holds_locks        = extlock_locks_holds_locks,
    .session_resumed    = extlock_locks_resumed,
    .session_reclaimed  = extlock_locks_reclaimed,
    .session_new        = extlock_locks_forget_all,
    .pr_update          = extlock_locks_pr_update,
    .renewed            = extlock_locks_renewed,
};

/*
 * ----------------------------------------------------------------------
 * Life cycle
 */

static void extlock_locks_attach(ExtlockClient *c, AioContext *ctx)
{
    c->ctx = ctx;
    c->drain_bh = aio_bh_new(ctx, extlock_drain_bh, c);
    c->cache_timer = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS,
                                   extlock_cache_timer_cb, c);
    c->wait_timer = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS,
                                  extlock_wait_timer_cb, c);
    c->drain_timer = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS,
                                   extlock_drain_timer_cb, c);
    if (c->drained && !c->drain_cut) {
        timer_mod(c->drain_timer, c->drain_deadline_ns);
    }
    /* Catch up on revocations and ageing that were due while detached */
    c->cache_timer_at = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    timer_mod(c->cache_timer, c->cache_timer_at);
    /* And on drained sections begun or ended meanwhile */
    extlock_drain_sync(c);
}

static void extlock_locks_detach(ExtlockClient *c)
{
    if (!c->ctx) {
        return;
    }
    /* What the drained sections asked, before the bottom half goes */
    extlock_drain_sync(c);
    qemu_bh_delete(c->drain_bh);
    c->drain_bh = NULL;
    /* Drained: nobody waits for a lock, nobody holds one */
    assert(QLIST_EMPTY(&c->waiting) && !extlock_local_count(&c->active));
    assert(!c->usable_waiters->len && !c->local_waiters->len &&
           !c->grant_waiters->len && !c->wake->len);
    timer_free(c->wait_timer);
    c->wait_timer = NULL;
    timer_free(c->drain_timer);
    c->drain_timer = NULL;
    timer_free(c->cache_timer);
    c->cache_timer = NULL;
    c->cache_timer_at = INT64_MAX;
    c->ctx = NULL;
}

ExtlockClient *extlock_client_new(const SocketAddressList *addrs,
                                  const char *client_id,
                                  const char *lock_space, uint32_t lease_ms,
                                  const ExtlockClientOptions *opts,
                                  QCryptoTLSCreds *tls_creds,
                                  const char *tls_hostname,
                                  const char *node_name,
                                  BlockDriverState *bs, AioContext *ctx,
                                  Error **errp)
{
    ExtlockClient *c = g_new0(ExtlockClient, 1);
    ExtlockConnConfig cfg = {
        .addrs = addrs,
        .client_id = client_id,
        .lock_space = lock_space,
        .lease_ms = lease_ms,
        .tls_creds = tls_creds,
        .tls_hostname = tls_hostname,
        .node_name = node_name,
        .stuck_io_exit = opts->stuck_io_exit,
        .bs = bs,
    };

    c->node_name = g_strdup(node_name);
    c->lock_space = g_strdup(lock_space);
    c->opts = *opts;
    c->cancel_ids = g_hash_table_new_full(g_int64_hash, g_int64_equal,
                                          g_free, NULL);
    c->lock_ids = g_hash_table_new(g_int64_hash, g_int64_equal);
    QLIST_INIT(&c->waiting);
    QTAILQ_INIT(&c->idle);
    QTAILQ_INIT(&c->lingering);
    QLIST_INIT(&c->stale);
    c->wake = g_ptr_array_new();
    c->grant_waiters = g_ptr_array_new();
    c->local_waiters = g_ptr_array_new();
    c->grants_grow = true;      /* until a grant shows otherwise */
    c->usable_waiters = g_ptr_array_new();
    extlock_locks_attach(c, ctx);

    c->conn = extlock_conn_new(&cfg, &extlock_conn_ops, c, ctx, errp);
    if (!c->conn) {
        extlock_client_free(c);
        return NULL;
    }
    c->pr = extlock_pr_new(c->conn, client_id, c->node_name);
    extlock_pr_subscribe(c->pr);
    return c;
}

bool extlock_client_lock_valid_now(ExtlockClient *c, ExtlockRequest *req)
{
    ExtlockCachedLock *l = req->lock;
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);

    /*
     * The lease must hold now, and the lock must still belong to this
     * session: a stale lock was kept by the coordinator only if the
     * session was resumed or reclaimed with it (give_back in the current
     * session generation).  After a new session the lease is valid again,
     * but the old session's locks are gone and others may hold them.
     */
    if (extlock_conn_lease_valid_at(c->conn, now) &&
        (!l->ce.stale ||
         (l->give_back && l->session_gen == c->session_gen))) {
        return true;
    }
    if (!c->no_lease_io_reported) {
        c->no_lease_io_reported = true;
        error_report("extlock: node '%s': lease or lock lost while a "
                     "request waited for a metadata reread, failing I/O",
                     c->node_name);
    }
    c->stats.errors++;
    return false;
}

void extlock_client_add_cost(ExtlockClient *c, int64_t ns)
{
    c->cost_requests++;
    c->cost_ns += ns;
}

/* What one clock read costs, for extlock_filter_cost: the median of 9 */
static uint64_t extlock_clock_read_ns(void)
{
    int64_t m[9];

    for (int i = 0; i < 9; i++) {
        int64_t t0 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);

        for (int k = 0; k < 999; k++) {
            qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
        }
        m[i] = (qemu_clock_get_ns(QEMU_CLOCK_REALTIME) - t0) / 1000;
        for (int k = i; k > 0 && m[k - 1] > m[k]; k--) {
            int64_t t = m[k];
            m[k] = m[k - 1];
            m[k - 1] = t;
        }
    }
    return m[4];
}

void extlock_client_free(ExtlockClient *c)
{
    ExtlockITNode *n;

    if (!c) {
        return;
    }
    if (c->cost_requests &&
        trace_event_get_state_backends(TRACE_EXTLOCK_FILTER_COST)) {
        trace_extlock_filter_cost(c->node_name, c->cost_requests, c->cost_ns,
                                  extlock_clock_read_ns());
    }
    c->closing = true;
    extlock_locks_detach(c);
    /* Says bye: the coordinator drops our locks */
    extlock_conn_free(c->conn);
    extlock_pr_free(c->pr);
    assert(QLIST_EMPTY(&c->waiting));
    while ((n = extlock_itree_first(&c->locks))) {
        ExtlockCachedLock *l = container_of(n, ExtlockCachedLock, ce.node);
        assert(l->users == 0);
        extlock_cache_drop(c, l);
    }
    assert(QLIST_EMPTY(&c->stale));
    g_hash_table_destroy(c->lock_ids);
    g_hash_table_destroy(c->cancel_ids);
    assert(!c->grant_waiters->len && !c->usable_waiters->len);
    g_ptr_array_free(c->grant_waiters, true);
    g_ptr_array_free(c->usable_waiters, true);
    assert(!c->local_waiters->len && !extlock_local_count(&c->active));
    g_ptr_array_free(c->local_waiters, true);
    g_ptr_array_free(c->wake, true);
    g_free(c->node_name);
    g_free(c->lock_space);
    g_free(c);
}

void extlock_client_detach_aio_context(ExtlockClient *c)
{
    extlock_locks_detach(c);
    extlock_conn_detach_aio_context(c->conn);
}

void extlock_client_attach_aio_context(ExtlockClient *c, AioContext *ctx)
{
    extlock_locks_attach(c, ctx);
    extlock_conn_attach_aio_context(c->conn, ctx);
}

void extlock_client_io_start(ExtlockClient *c)
{
    extlock_conn_io_start(c->conn);
}

void extlock_client_io_done(ExtlockClient *c)
{
    extlock_conn_io_done(c->conn);
}
