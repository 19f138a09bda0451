/*
 * extlock: timestamp-ordered extent lock table (one per lock-space)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The table knows nothing about sockets or sessions: an owner is an opaque
 * pointer, and timestamps (fencing tokens) are handed in by the caller.
 *
 * Ordering rule: a request R is granted only when no lock overlapping R
 * with a conflicting mode is held, and no request overlapping R with a
 * conflicting mode and an earlier token is still waiting.  Requests are
 * submitted in increasing token order.  Compatible shared requests are
 * granted together.  Every lock covers one contiguous extent and is
 * granted as a whole.
 *
 * Locks of the same owner conflict with each other like anybody else's.
 *
 * Extent growth (lock caching): extlock_table_request_grow() takes, besides
 * the requested extent, a @limit the lock may grow into.  When the request
 * is granted (at once or later, when it is woken) its extent becomes the
 * largest [a, b) with limit.start <= a <= start and end <= b <= limit.end
 * such that no other conflicting lock, held or waiting and whatever its
 * token, overlaps the added pieces [a, start) and [end, b).  So growth
 * never covers what a conflicting waiter wants nor overlaps a conflicting
 * holder; the requested extent itself is granted by the ordering rule
 * above, even if later conflicting waiters overlap it.  While the table
 * holds more than EXTLOCK_TABLE_GROW_CAP_LOCKS locks (held + waiting,
 * counting the one being granted), the grown extent is also clipped to
 * the requested extent rounded outwards to EXTLOCK_TABLE_GROW_CAP_BYTES
 * boundaries.  Growth happens only at grant time; a granted lock never
 * grows or shrinks by itself afterwards.
 *
 * Downgrade: a granted exclusive lock can become shared in place (same
 * id, token and extent); shared waiters that this unblocks are granted
 * as after a release.  Together with extlock_table_foreach_conflict() this
 * is what the coordinator needs to revoke cached locks.
 */
#ifndef EXTLOCK_LOCK_TABLE_H
#define EXTLOCK_LOCK_TABLE_H

#include <glib.h>
#include "extlock/extent.h"
#include "extlock/interval-tree.h"

typedef enum ExtlockLockState {
    EXTLOCK_LOCK_WAITING,
    EXTLOCK_LOCK_GRANTED,
} ExtlockLockState;

typedef struct ExtlockTable ExtlockTable;

typedef struct ExtlockLock {
    ExtlockITNode node;          /* node.ext is the extent; private linkage */
    uint64_t id;                 /* unique in the table, assigned by it */
    uint64_t token;              /* timestamp == fencing token */
    ExtlockMode mode;
    ExtlockLockState state;
    void *owner;                 /* opaque, e.g. the session */
    uint64_t user_tag;           /* opaque to the table (e.g. request id) */
    int64_t queued_us;           /* g_get_monotonic_time() at request */
    int64_t granted_us;          /* ... at grant, 0 while waiting */
    /*
     * The extent asked for and the range it may grow into (limit ==
     * requested: no growth).  Set at request time and never updated, not
     * even by extlock_table_release_part() (pieces split off inherit
     * them).  Invariants: requested lies inside limit, and so does the
     * current extent; a waiting lock's extent is exactly requested.
     */
    ExtlockExtent requested;
    ExtlockExtent limit;
} ExtlockLock;

typedef struct ExtlockTableStats {
    uint64_t requests;           /* extlock_table_request() calls */
    uint64_t immediate_grants;   /* granted without waiting */
    uint64_t waits;              /* requests that had to wait */
    uint64_t deferred_grants;    /* waiting requests granted later */
    uint64_t releases;           /* granted locks released (whole) */
    uint64_t partial_releases;   /* release_part() calls */
    uint64_t cancels;            /* waiting requests cancelled */
    uint64_t total_wait_us;      /* sum of queued->granted for waiters */
    uint64_t held;               /* current number of granted locks */
    uint64_t waiting;            /* current number of waiting requests */
    /* grants (immediate or deferred) whose extent grew beyond the request */
    uint64_t grown_grants;
    uint64_t downgrades;         /* exclusive locks downgraded to shared */
} ExtlockTableStats;

/* Growth cap: see the comment at the top of this file */
#define EXTLOCK_TABLE_GROW_CAP_LOCKS 32
#define EXTLOCK_TABLE_GROW_CAP_BYTES (UINT64_C(32) << 20)

/*
 * Called when a waiting request becomes granted as a consequence of
 * extlock_table_release(), _release_part() or a cancellation.  Never
 * called for a request that is granted directly by extlock_table_request().
 * The callback must not modify the table.
 */
typedef void (*ExtlockGrantFn)(ExtlockTable *table, ExtlockLock *lock,
                               void *opaque);

ExtlockTable *extlock_table_new(const char *name, ExtlockGrantFn grant_cb,
                                void *opaque);
/* Frees the table and every lock still in it, without callbacks */
void extlock_table_free(ExtlockTable *table);
const char *extlock_table_name(ExtlockTable *table);

/*
 * Debug mode: verify extlock_table_check() after every state change and
 * abort() with a message if it fails.
 */
void extlock_table_set_debug_checks(ExtlockTable *table, bool enable);

/*
 * Queue a request for @ext in @mode.  @token must be greater than every
 * token previously passed to this function on this table.  Returns the new
 * lock, already GRANTED or WAITING.  @ext must be valid (start < end <= 2^63).
 */
ExtlockLock *extlock_table_request(ExtlockTable *table, ExtlockExtent ext,
                                   ExtlockMode mode, uint64_t token,
                                   void *owner, uint64_t user_tag);

/*
 * Like extlock_table_request(), but the lock may grow into @limit, which
 * must contain @ext, when it is granted (see "Extent growth" above): at
 * grant time its extent becomes [a, b) where
 *   a = max(limit.start, max of min(X.end, ext.start) over every other
 *           conflicting lock X, held or waiting, with X.start < ext.start)
 *   b = min(limit.end, min of max(X.start, ext.end) over every other
 *           conflicting lock X, held or waiting, with X.end > ext.end)
 * and [a, b) is then intersected with [ALIGN_DOWN(ext.start, CAP_BYTES),
 * ALIGN_UP(ext.end, CAP_BYTES)) if the table holds more than CAP_LOCKS
 * locks, this one included.  lock->requested is @ext and lock->limit is
 * @limit; lock->node.ext is the granted extent once GRANTED (and @ext
 * while WAITING).  Costs O(log n + k), k being the number of conflicting
 * locks overlapping the (capped) limit.
 */
ExtlockLock *extlock_table_request_grow(ExtlockTable *table,
                                        ExtlockExtent ext,
                                        ExtlockExtent limit,
                                        ExtlockMode mode, uint64_t token,
                                        void *owner, uint64_t user_tag);

/*
 * Insert an already-granted lock with an old token (lock reclaim after a
 * coordinator restart).  Fails, returning NULL and changing nothing, if it
 * conflicts with a lock that is held or waiting.
 */
ExtlockLock *extlock_table_reclaim(ExtlockTable *table, ExtlockExtent ext,
                                   ExtlockMode mode, uint64_t token,
                                   void *owner, uint64_t user_tag);

/*
 * Release a granted lock or cancel a waiting request; frees @lock.
 * Waiters that become grantable are granted (grant_cb) in token order.
 */
void extlock_table_release(ExtlockTable *table, ExtlockLock *lock);

/*
 * Release the part @part of a granted lock.  @part must lie inside the
 * lock's extent, otherwise -EINVAL is returned and nothing changes.
 * Releasing the whole extent is the same as extlock_table_release() (the
 * lock is freed and *@lock_out set to NULL).  Otherwise the lock keeps the
 * lower remaining piece (or the only one); if the release punches a hole,
 * the upper piece becomes a new lock with a new id and the same token,
 * mode, owner and user_tag, returned in *@split_out (else NULL).
 * Either out pointer may be NULL if the caller does not care.
 */
int extlock_table_release_part(ExtlockTable *table, ExtlockLock *lock,
                               ExtlockExtent part, ExtlockLock **lock_out,
                               ExtlockLock **split_out);

/*
 * Downgrade the GRANTED exclusive @lock to shared, keeping its id, token,
 * extent, owner and user_tag.  Waiters that become grantable are granted
 * (grant_cb) in token order, as after a release.  Returns 0 (also, with
 * no change, if @lock is shared already), or -EINVAL with no change if
 * @lock is NULL or not granted.
 */
int extlock_table_downgrade(ExtlockTable *table, ExtlockLock *lock);

ExtlockLock *extlock_table_lookup(ExtlockTable *table, uint64_t lock_id);

/*
 * Call @fn for every lock that currently keeps the WAITING @lock from
 * being granted: conflicting granted locks and conflicting earlier waiters.
 */
typedef void (*ExtlockLockFn)(ExtlockLock *lock, void *opaque);
void extlock_table_foreach_blocker(ExtlockTable *table, ExtlockLock *lock,
                                   ExtlockLockFn fn, void *opaque);
/*
 * The same, but looking at no more than @max_visits overlapping locks
 * (blockers or not), so that a listing stays cheap however many locks
 * overlap: some blockers may be left out
 */
void extlock_table_foreach_blocker_max(ExtlockTable *table,
                                       ExtlockLock *lock,
                                       unsigned max_visits,
                                       ExtlockLockFn fn, void *opaque);
/*
 * The first @max blockers that extlock_table_foreach_blocker() would
 * report, in the same order; the walk stops there, so it costs
 * O(log n + @max + the overlapping locks that are not blockers, e.g.
 * later waiters) instead of visiting every blocker
 */
void extlock_table_foreach_blocker_first(ExtlockTable *table,
                                         ExtlockLock *lock, unsigned max,
                                         ExtlockLockFn fn, void *opaque);

/*
 * Call @fn for every lock other than @lock, granted or waiting and
 * whatever its token, whose extent overlaps @lock's and whose mode
 * conflicts with @lock's: first all the granted ones, then all the
 * waiting ones.  @lock itself may be granted or waiting.  @fn must not
 * modify the table.  Used to find the holders of cached locks that need
 * a revoke: the conflicting holders when a request is queued, and the
 * later conflicting waiters when a waiting lock is granted.
 */
void extlock_table_foreach_conflict(ExtlockTable *table, ExtlockLock *lock,
                                    ExtlockLockFn fn, void *opaque);
/*
 * The part of extlock_table_foreach_conflict() in @state only (granted
 * or waiting locks), in the same order, without looking at the others:
 * finding the holders to revoke for a new request does not walk every
 * request waiting for the same extent
 */
void extlock_table_foreach_conflict_state(ExtlockTable *table,
                                          ExtlockLock *lock,
                                          ExtlockLockState state,
                                          ExtlockLockFn fn, void *opaque);

/* Every lock, granted ones first, each group in ascending offset order */
void extlock_table_foreach(ExtlockTable *table, ExtlockLockFn fn,
                           void *opaque);

const ExtlockTableStats *extlock_table_stats(ExtlockTable *table);

/*
 * Verify the table's invariants: no two overlapping conflicting grants;
 * no granted lock overtook an earlier conflicting waiter; no waiter is
 * grantable (nobody waits needlessly); tree and counters consistent;
 * every extent inside its lock's limit, and a waiting lock's extent equal
 * to its request.
 * Returns true if all hold, otherwise false and a message in *@errmsg
 * (g_free it) if @errmsg is not NULL.
 */
bool extlock_table_check(ExtlockTable *table, char **errmsg);

#endif /* EXTLOCK_LOCK_TABLE_H */
