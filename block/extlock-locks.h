/*
 * extlock: the lock cache and request API of an extlock block node
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The layer between the driver (extlock.c) and the coordinator connection
 * (extlock-connection.h): it keeps the locks granted to the node (cached
 * after their requests with lock-cache=on), orders the node's own
 * requests, asks the coordinator for what the cache cannot serve, gives
 * locks back on revocation, and cuts waits on drain.  It calls the
 * connection only through its functions and hears from it through an
 * ExtlockConnOps table; the monitor reads it through
 * extlock_client_get_info() and the foreach functions below.
 */
#ifndef BLOCK_EXTLOCK_LOCKS_H
#define BLOCK_EXTLOCK_LOCKS_H

#include "qemu/coroutine.h"
#include "qemu/queue.h"
#include "qemu/timer.h"
#include "block/aio.h"
#include "extlock/protocol.h"
#include "extlock/interval-tree.h"
#include "extlock-cache.h"
#include "extlock-connection.h"

/*
 * A lock granted by the coordinator.  While requests use it, it is active;
 * afterwards it stays cached (with lock-cache=on) until the coordinator
 * revokes it, it ages out, or the cache is full.
 *
 * A lock that becomes invalid (lease lost, or the coordinator no longer
 * lists it) while requests still use it is stale: it leaves c->locks and
 * c->lock_ids for the list c->stale, so that no new request can find it
 * and its id cannot clash with the ids of a new session.  When its last
 * user is done it is freed, and given back first if the coordinator may
 * still hold it for this session (@give_back).
 */
typedef struct ExtlockCachedLock {
    ExtlockCacheEntry ce;       /* extent, mode, revoking, stale */
    uint64_t lock_id;
    uint64_t token;
    unsigned users;             /* requests in flight under this lock */
    bool give_back;             /* stale: unlock when the last user is done */
    uint64_t session_gen;       /* ExtlockClient.session_gen at the grant */
    QLIST_ENTRY(ExtlockCachedLock) stale_next;
    ExtlockMode revoke_mode;    /* mode the other request wants */
    ExtlockExtent revoke_ext;   /* extent the other request wants */
    int64_t revoke_ns;          /* when the first revoke arrived */
    uint64_t revoke_token;      /* token of the request that waits for it */
    bool revoke_by_other;       /* ... another host's: contention */
    bool hold_warned;           /* EXTENT_LOCK_LONG_HOLD sent (or left out) */
    ExtlockExtent used;         /* span requests used; empty if start==end */
    int64_t granted_ns;
    int64_t last_used_ns;
    QTAILQ_ENTRY(ExtlockCachedLock) lru; /* idle locks, oldest first */
    bool in_lru;
    QTAILQ_ENTRY(ExtlockCachedLock) linger; /* idle, contended: going back */
    bool in_linger;
} ExtlockCachedLock;

typedef struct ExtlockRequest {
    ExtlockLocalReq local;      /* in ExtlockClient.active: local order */

    /* set by the caller */
    uint64_t offset;
    uint64_t length;
    ExtlockMode mode;
    /*
     * A maintenance lock (extlock-maint.c): asked for without growth and
     * given back at unlock, never cached
     */
    bool maint;
    /* A drain does not cut its wait (the caller bounds it) */
    bool no_drain_cut;

    /* set on success: the lock the request runs under */
    ExtlockCachedLock *lock;

    /* private to the client */
    uint64_t id;                /* protocol request id */
    Coroutine *co;
    bool queued;                /* the coordinator answered "waiting" */
    bool warned;                /* EXTENT_LOCK_WAIT_TIMEOUT sent */
    bool done;                  /* final reply received */
    bool cancel_sent;           /* "cancel" sent for it (drain, cancel) */
    uint64_t cancel_gen;        /* ExtlockClient.cancel_gen at the start */
    int ret;
    uint64_t token;
    int64_t start_ns;           /* QEMU_CLOCK_REALTIME */
    int64_t child_ns;           /* filter cost: time in the child */
    bool waited;                /* not a plain cache hit: no cost taken */
    GPtrArray *blocked_by;      /* client ids (char *) from "waiting" */
    QLIST_ENTRY(ExtlockRequest) next;
} ExtlockRequest;

typedef struct ExtlockClientStats {
    uint64_t requests;          /* lock requests sent to the coordinator */
    uint64_t grants;
    uint64_t waits;
    uint64_t total_wait_us;
    uint64_t errors;
    uint64_t cache_hits;        /* requests served by a cached lock */
    uint64_t revocations;       /* revoke messages acted on */
    uint64_t revocation_us;     /* revoke received -> lock given back */
    uint64_t revocation_max_us;
    uint64_t downgrades;
    uint64_t cache_evictions;   /* idle locks dropped for age or space */
    uint64_t contended_releases; /* given back after use, not cached */
    ExtlockHist wait_hist;      /* lock request sent -> granted */
    ExtlockHist hold_hist;      /* granted -> given back or lost */
} ExtlockClientStats;

typedef struct ExtlockClientOptions {
    bool cache;                 /* keep locks after requests complete */
    bool cache_contended;       /* ... even over recently contended ranges */
    uint32_t cache_size;        /* max idle cached locks */
    uint32_t cache_idle_ms;     /* drop idle locks unused this long */
    uint32_t min_hold_us;       /* keep a new lock at least this long */
    uint64_t grow_limit;        /* end of the range locks may grow into */
    bool lease_loss_error;      /* on-lease-loss=error (else queue) */
    bool stuck_io_exit;         /* on-stuck-io=exit (else report) */
    uint32_t lease_loss_timeout_ms;
    uint32_t wait_warning_ms;   /* 0: no EXTENT_LOCK_WAIT_TIMEOUT */
    uint32_t long_hold_ms;      /* 0: no EXTENT_LOCK_LONG_HOLD */
} ExtlockClientOptions;

/*
 * Lock growth avoids ranges other hosts wanted of this node's locks in
 * the last EXTLOCK_CONTENDED_NS (the last EXTLOCK_CONTENDED_MAX of them),
 * so that neighbours split a range once instead of taking it from each
 * other whenever one of them is between locks.  And unless
 * lock-cache-contended is set, a lock over such a range in a conflicting
 * mode is given back soon after its last request is done, so that the
 * host that wants it next needs no revocation.
 */
#define EXTLOCK_CONTENDED_MAX 8
#define EXTLOCK_CONTENDED_NS  (1000 * SCALE_MS)
/*
 * Such a lock goes back once it has been idle this long, so that the
 * requests of a burst (a sequential pass, a journal) share it.
 */
#define EXTLOCK_CONTENDED_LINGER_NS (1 * SCALE_MS)
/*
 * ... but at most this many locks after each revocation by another host,
 * so that a host writing a range now and then does not turn every request
 * of a busy host there into a coordinator round trip: a revocation costs
 * the busy host at most this many more requests, then it caches again.
 * A lingering lock holds one of them until it goes back or is used again.
 */
#define EXTLOCK_CONTENDED_RELEASES 8

typedef struct ExtlockClient {
    AioContext *ctx;
    ExtlockConnection *conn;
    char *node_name;            /* for events and messages */
    char *lock_space;
    ExtlockClientOptions opts;
    bool closing;

    /* drain and cancel: no wait for other hosts, the connection, the lease */
    /*
     * Drained sections asked for (atomic: QEMU 10.0 calls the drain
     * callbacks in the main loop whatever the node's AioContext), and
     * whether the node acts drained, which only @ctx's thread changes
     * (extlock_drain_sync(), run there by @drain_bh).
     */
    unsigned drain_target;
    bool cancel_asked;          /* extlock_client_cancel_waits() (atomic) */
    QEMUBH *drain_bh;
    bool drained;
    bool drain_cut;             /* drained, and its grace is over */
    int64_t drain_deadline_ns;  /* end of the grace of this drain */
    QEMUTimer *drain_timer;     /* one-shot, at @drain_deadline_ns */
    bool conn_paused;           /* extlock_conn_pause() is ours */
    uint64_t cancel_gen;        /* bumped by extlock_client_cancel_waits() */
    GHashTable *cancel_ids;     /* ids of "cancel" messages in flight */

    /* requests */
    QLIST_HEAD(, ExtlockRequest) waiting; /* sent, not granted yet */
    GPtrArray *wake;            /* requests a read completed */
    bool no_lease_io_reported;  /* "failing I/O" said since the lease loss */
    GPtrArray *grant_waiters;   /* coroutines waiting for our own grants */
    ExtlockLocalSet active;     /* requests between lock and unlock */
    uint64_t next_seq;
    GPtrArray *local_waiters;   /* ... waiting for an earlier local one */
    bool grants_grow;           /* the last grant was larger than asked */
    /* the filter's own time, while trace extlock_filter_cost is on */
    uint64_t cost_requests;
    uint64_t cost_ns;
    /* what other hosts recently wanted of our locks: growth stops there */
    ExtlockExtent contended[EXTLOCK_CONTENDED_MAX];
    int64_t contended_ns[EXTLOCK_CONTENDED_MAX]; /* 0: slot unused */
    ExtlockMode contended_mode[EXTLOCK_CONTENDED_MAX]; /* what they wanted */
    int64_t contended_until_ns; /* no entry is recent from then on */
    unsigned contended_budget;  /* early give-backs left */
    unsigned n_lingering;       /* locks on @lingering (each may use one) */
    unsigned contended_next;    /* ring position of the next entry */
    GPtrArray *usable_waiters;  /* ... waiting for lease or connection */
    QEMUTimer *wait_timer;      /* one-shot: wait warning, loss timeout */
    int64_t wait_event_ns;      /* last EXTENT_LOCK_WAIT_TIMEOUT sent */
    uint64_t wait_events_left_out; /* since then: rate-limited */
    int64_t hold_event_ns;      /* last EXTENT_LOCK_LONG_HOLD sent */
    uint64_t hold_events_left_out;

    /* locks */
    uint64_t session_gen;       /* bumped whenever a new session starts */
    ExtlockITree locks;         /* ExtlockCachedLock by extent */
    /*
     * The lock that served the last cache hit, tried before the tree
     * (NULL once it leaves @locks): sequential and repeated requests, and
     * a lone process whose first lock grew over the image, hit it.
     */
    struct ExtlockCachedLock *last_hit;
    GHashTable *lock_ids;       /* lock id -> ExtlockCachedLock */
    QLIST_HEAD(, ExtlockCachedLock) stale; /* stale locks still in use */
    QTAILQ_HEAD(, ExtlockCachedLock) idle; /* LRU of unused locks */
    /* the contended ones among them, to give back after their linger */
    QTAILQ_HEAD(, ExtlockCachedLock) lingering;
    unsigned n_idle;
    QEMUTimer *cache_timer;     /* one-shot: min hold, linger, idle ageing */
    bool revokes_deferred;      /* a revoked idle lock waits: the timer scans */
    /*
     * When @cache_timer is due, INT64_MAX while it is not pending: a copy
     * kept where the timer is set, so that an unlock need not ask the
     * timer list (two calls) whether it must move the timer
     */
    int64_t cache_timer_at;
    /* clock at the last request: one clock read per cache hit is enough */
    int64_t last_now_ns;

    ExtlockClientStats stats;
    struct ExtlockPr *pr;       /* persistent reservations (extlock-pr.h) */

    /*
     * Maintenance (extlock-maint.c), from the grants: how many the
     * lock-space has had, the image length the last one announced, and
     * whether one ran since this node last read the metadata
     */
    bool maint_gen_known;
    uint64_t maint_gen;
    bool has_maint_size;
    uint64_t maint_size;
    bool maint_reload;
    /* A renewal showed a maintenance: reread without waiting for I/O */
    void (*maint_kick)(void *opaque);
    void *maint_opaque;
} ExtlockClient;

/*
 * May @req, which holds its lock and then waited (a metadata reread),
 * still use it?  A lapsed lease, or a lock lost with the old session
 * (even if a new session has a valid lease by now), means other hosts
 * may own its extent, so it must not reach the image (counted as an
 * error).
 */
bool extlock_client_lock_valid_now(ExtlockClient *c, ExtlockRequest *req);

/*
 * Connect to the leader among @addrs (tried in order, "not-leader" answers
 * followed), say hello and start the session (extlock_conn_new(): blocks,
 * bounded, at open only), with an empty lock cache.  @lease_ms ==
 * 0 asks for the coordinator's default lease.  With @tls_creds (client
 * endpoint; referenced) every connection is TLS, the coordinator's
 * certificate checked against @tls_hostname if not NULL, else against
 * the host of an inet address.  @bs counts the
 * reconnection in flight.
 */
ExtlockClient *extlock_client_new(const SocketAddressList *addrs,
                                  const char *client_id,
                                  const char *lock_space, uint32_t lease_ms,
                                  const ExtlockClientOptions *opts,
                                  QCryptoTLSCreds *tls_creds,
                                  const char *tls_hostname,
                                  const char *node_name,
                                  BlockDriverState *bs, AioContext *ctx,
                                  Error **errp);
/* Say bye (releases the session's locks at once) and free; no I/O in flight */
/*
 * The filter's own time for one request (its whole time minus the
 * child's), measured while the trace event extlock_filter_cost is on, for
 * plain cache hits only (a request that waited would count its wait), and
 * traced as a total when the client is freed.
 */
void extlock_client_add_cost(ExtlockClient *c, int64_t ns);

void extlock_client_free(ExtlockClient *c);

/* New tuning options (reopen); used from the next time each is needed */
void extlock_client_set_options(ExtlockClient *c,
                                const ExtlockClientOptions *opts);

/*
 * Detach only in a drained section: asserts that no request and no
 * reconnection is in flight.
 */
void extlock_client_detach_aio_context(ExtlockClient *c);
void extlock_client_attach_aio_context(ExtlockClient *c, AioContext *ctx);

/*
 * How long a drain lets requests wait for another host, the connection or
 * the lease.  Drains are also used as "wait until all I/O is done" (VM
 * stop, qemu-io aio_flush, job completion): a lock held by another host is
 * usually given back within a revocation round trip, and those requests
 * should complete rather than fail.  A drain must not hang on a host that
 * keeps its lock, though: after the grace the waits are cut.
 */
#define EXTLOCK_DRAIN_GRACE_MS 2000

/*
 * Drained sections (docs/qemu-driver.rst, "Drain"): once the node has been
 * drained for EXTLOCK_DRAIN_GRACE_MS, no request waits for another host,
 * the connection or the lease any more: requests queued at the coordinator
 * are cancelled there and fail with -EIO, as do new ones that would wait;
 * the reconnection pauses (at once if no request waits for it).  A request
 * that waits for nobody still runs.  Not coroutine_fn: QEMU 7.2 calls the
 * drain callbacks in a coroutine, later QEMUs outside.
 */
void extlock_client_drain_begin(ExtlockClient *c);
void extlock_client_drain_end(ExtlockClient *c);
/*
 * Fail every request that waits now (as a drain would), without a drain;
 * called in another thread than the node's (QEMU 10.0's main loop), it
 * happens there, soon after.
 */
void extlock_client_cancel_waits(ExtlockClient *c);

/*
 * Get a lock covering req->offset/length in req->mode (or stronger): a
 * cached one if possible, else from the coordinator, waiting as long as it
 * queues the request.  Returns 0 with req->lock set (then
 * extlock_client_unlock() must follow), or -EIO if the coordinator refused
 * the request, the lease is lost (per the on-lease-loss policy), or the
 * wait was cut (drain, cancel).
 */
int coroutine_fn extlock_client_lock(ExtlockClient *c, ExtlockRequest *req);
void extlock_client_unlock(ExtlockClient *c, ExtlockRequest *req);
/*
 * Unlock a maintenance lock (req->maint), announcing @size (the image
 * file's new length) to the hosts that get the maintenance extent next
 */
void extlock_client_unlock_announce(ExtlockClient *c, ExtlockRequest *req,
                                    uint64_t size);

/* Requests forwarded to the child (see extlock_conn_io_start()) */
void extlock_client_io_start(ExtlockClient *c);
void extlock_client_io_done(ExtlockClient *c);

/* For the monitor: a lock the node holds */
typedef enum ExtlockLockState {
    EXTLOCK_LOCK_ACTIVE,        /* requests run under it */
    EXTLOCK_LOCK_CACHED,        /* idle, kept for the next request */
    EXTLOCK_LOCK_REVOKING,      /* the coordinator asked for it back */
    EXTLOCK_LOCK_STALE,         /* lost while in use, never used again */
} ExtlockLockState;

typedef struct ExtlockHeldInfo {
    uint64_t offset;
    uint64_t length;
    ExtlockMode mode;
    uint64_t token;
    int64_t held_ms;
    ExtlockLockState state;
    unsigned users;
} ExtlockHeldInfo;

/* For the monitor: a request waiting for the coordinator */
typedef struct ExtlockWaiterInfo {
    uint64_t offset;
    uint64_t length;
    ExtlockMode mode;
    bool queued;                /* the coordinator answered "waiting" */
    uint64_t token;             /* if queued */
    int64_t waited_ms;
    GPtrArray *blocked_by;      /* client ids (char *); may be NULL */
} ExtlockWaiterInfo;

void extlock_client_foreach_lock(ExtlockClient *c,
                                 void (*fn)(const ExtlockHeldInfo *, void *),
                                 void *opaque);
void extlock_client_foreach_waiter(ExtlockClient *c,
                                   void (*fn)(const ExtlockWaiterInfo *,
                                              void *),
                                   void *opaque);
const ExtlockClientStats *extlock_client_stats(ExtlockClient *c);
ExtlockConnection *extlock_client_conn(ExtlockClient *c);

#endif /* BLOCK_EXTLOCK_LOCKS_H */
