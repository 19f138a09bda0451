/*
 * extlock: timestamp-ordered extent lock table (one per lock-space)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Layout: the granted ("held") locks and the waiting requests live in
 * separate interval trees.  Each of the two is split once more by mode,
 * so that a shared request looks only at the exclusive trees and never
 * walks over the (possibly many) compatible shared locks around it.
 * A hash table maps lock ids to locks.
 *
 * Every operation is O(log n) plus the number of overlapping locks it has
 * to look at; nothing scans the whole table except extlock_table_check(),
 * extlock_table_foreach() and extlock_table_free().  Besides the lock
 * itself the hot path allocates nothing: the candidate list used when
 * waking waiters is a scratch array owned by the table.
 *
 * Extent growth is computed when a lock is granted, from two more overlap
 * queries per conflicting tree, one on each side of the requested extent
 * and restricted to the (capped) limit.  Downgrade moves a lock from the
 * exclusive to the shared held tree and wakes the shared waiters it
 * overlaps.
 */
#include <errno.h>
#include <stddef.h>
#include "extlock/lock-table.h"

struct ExtlockTable {
    char *name;
    ExtlockGrantFn grant_cb;
    void *opaque;
    ExtlockITree held[2];        /* indexed by ExtlockMode */
    ExtlockITree waiting[2];     /* indexed by ExtlockMode */
    GHashTable *locks;           /* &lock->id -> lock */
    uint64_t next_id;
    uint64_t last_token;         /* last token given to _request() */
    bool have_token;
    bool debug_checks;
    ExtlockTableStats stats;
    GPtrArray *scratch;          /* waiters to re-examine / just granted */
};

static inline ExtlockLock *lock_of(ExtlockITNode *node)
{
    return (ExtlockLock *)((char *)node - offsetof(ExtlockLock, node));
}

static inline ExtlockITree *lock_tree(ExtlockTable *table, ExtlockLock *lock)
{
    return lock->state == EXTLOCK_LOCK_GRANTED ? &table->held[lock->mode]
                                               : &table->waiting[lock->mode];
}

ExtlockTable *extlock_table_new(const char *name, ExtlockGrantFn grant_cb,
                                void *opaque)
{
    ExtlockTable *table = g_new0(ExtlockTable, 1);

    table->name = g_strdup(name ? name : "");
    table->grant_cb = grant_cb;
    table->opaque = opaque;
    table->locks = g_hash_table_new(g_int64_hash, g_int64_equal);
    table->next_id = 1;
    table->scratch = g_ptr_array_new();
    return table;
}

void extlock_table_free(ExtlockTable *table)
{
    GHashTableIter iter;
    gpointer value;

    if (!table) {
        return;
    }
    g_hash_table_iter_init(&iter, table->locks);
    while (g_hash_table_iter_next(&iter, NULL, &value)) {
        g_free(value);
    }
    g_hash_table_destroy(table->locks);
    g_ptr_array_free(table->scratch, TRUE);
    g_free(table->name);
    g_free(table);
}

const char *extlock_table_name(ExtlockTable *table)
{
    return table->name;
}

void extlock_table_set_debug_checks(ExtlockTable *table, bool enable)
{
    table->debug_checks = enable;
}

static void table_debug_check(ExtlockTable *table, const char *op)
{
    g_autofree char *msg = NULL;

    if (!table->debug_checks) {
        return;
    }
    if (!extlock_table_check(table, &msg)) {
        g_error("extlock table '%s': invariant broken after %s: %s",
                table->name, op, msg);
    }
}

/*
 * Conflict searches.  A search visits the locks of one group (held or
 * waiting) that overlap an extent and conflict with a mode, skipping
 * @self and, if @earlier_only, every lock whose token is not below @token.
 */
typedef struct ConflictSearch {
    const ExtlockLock *self;
    bool earlier_only;
    uint64_t token;
    ExtlockLock *found;
} ConflictSearch;

static bool conflict_visit(ExtlockITNode *node, void *opaque)
{
    ConflictSearch *s = opaque;
    ExtlockLock *lock = lock_of(node);

    if (lock == s->self || (s->earlier_only && lock->token >= s->token)) {
        return true;
    }
    s->found = lock;
    return false;
}

/* First lock of @trees (held or waiting) conflicting with ext/mode */
static ExtlockLock *find_conflict(ExtlockITree *trees, ExtlockExtent ext,
                                  ExtlockMode mode, const ExtlockLock *self,
                                  bool earlier_only, uint64_t token)
{
    ConflictSearch s = { self, earlier_only, token, NULL };

    extlock_itree_foreach_overlap(&trees[EXTLOCK_MODE_EXCLUSIVE], ext,
                                  conflict_visit, &s);
    if (!s.found && mode == EXTLOCK_MODE_EXCLUSIVE) {
        extlock_itree_foreach_overlap(&trees[EXTLOCK_MODE_SHARED], ext,
                                      conflict_visit, &s);
    }
    return s.found;
}

/* The ordering rule for a waiting request */
static bool waiter_grantable(ExtlockTable *table, ExtlockLock *w)
{
    return !find_conflict(table->held, w->node.ext, w->mode, w, false, 0) &&
           !find_conflict(table->waiting, w->node.ext, w->mode, w, true,
                          w->token);
}

static ExtlockLock *lock_new(ExtlockTable *table, ExtlockExtent ext,
                             ExtlockExtent limit, ExtlockMode mode,
                             uint64_t token, void *owner, uint64_t user_tag)
{
    ExtlockLock *lock = g_new0(ExtlockLock, 1);

    lock->node.ext = ext;
    lock->requested = ext;
    lock->limit = limit;
    lock->id = table->next_id++;
    lock->token = token;
    lock->mode = mode;
    lock->owner = owner;
    lock->user_tag = user_tag;
    lock->queued_us = g_get_monotonic_time();
    return lock;
}

static void lock_insert(ExtlockTable *table, ExtlockLock *lock)
{
    extlock_itree_insert(lock_tree(table, lock), &lock->node);
    g_hash_table_insert(table->locks, &lock->id, lock);
    if (lock->state == EXTLOCK_LOCK_GRANTED) {
        table->stats.held++;
    } else {
        table->stats.waiting++;
    }
}

/*
 * Extent growth.  One walk per side of the requested extent and per
 * conflicting tree, each restricted to what is still open on that side:
 * on the left the obstacle ending nearest to the request (ends clipped to
 * the request's start) and on the right the one starting nearest to it.
 */
typedef struct GrowWalk {
    const ExtlockLock *self;
    uint64_t edge;               /* requested start (left) / end (right) */
    uint64_t bound;              /* a (left) / b (right) found so far */
} GrowWalk;

static bool grow_left_visit(ExtlockITNode *node, void *opaque)
{
    GrowWalk *g = opaque;

    if (lock_of(node) == g->self) {
        return true;
    }
    /*
     * Ends are not sorted, and the walk's query is the window open when
     * it started: keep the largest clipped end, and go on unless nothing
     * is left to grow into.
     */
    g->bound = MAX(g->bound, MIN(node->ext.end, g->edge));
    return g->bound < g->edge;
}

static bool grow_right_visit(ExtlockITNode *node, void *opaque)
{
    GrowWalk *g = opaque;

    if (lock_of(node) == g->self) {
        return true;
    }
    /* Visited in ascending start order: the first one is the nearest */
    g->bound = MAX(node->ext.start, g->edge);
    return false;
}

/*
 * The extent @lock (in no tree at the moment) gets when it is granted
 * while the table holds @nlocks locks, this one included.
 */
static ExtlockExtent grow_extent(ExtlockTable *table, const ExtlockLock *lock,
                                 uint64_t nlocks)
{
    ExtlockExtent req = lock->requested;
    ExtlockExtent lim = lock->limit;
    ExtlockITree *trees[4];
    ExtlockExtent grown;
    GrowWalk g = { .self = lock };
    size_t i, n = 0;

    if (nlocks > EXTLOCK_TABLE_GROW_CAP_LOCKS) {
        uint64_t lo = req.start & ~(EXTLOCK_TABLE_GROW_CAP_BYTES - 1);
        uint64_t hi = (req.end + EXTLOCK_TABLE_GROW_CAP_BYTES - 1) &
                      ~(EXTLOCK_TABLE_GROW_CAP_BYTES - 1);

        lim.start = MAX(lim.start, lo);
        lim.end = MIN(lim.end, hi);
    }

    trees[n++] = &table->held[EXTLOCK_MODE_EXCLUSIVE];
    trees[n++] = &table->waiting[EXTLOCK_MODE_EXCLUSIVE];
    if (lock->mode == EXTLOCK_MODE_EXCLUSIVE) {
        trees[n++] = &table->held[EXTLOCK_MODE_SHARED];
        trees[n++] = &table->waiting[EXTLOCK_MODE_SHARED];
    }

    g.edge = req.start;
    g.bound = lim.start;
    for (i = 0; i < n && g.bound < g.edge; i++) {
        ExtlockExtent q = { g.bound, g.edge };

        extlock_itree_foreach_overlap(trees[i], q, grow_left_visit, &g);
    }
    grown.start = g.bound;

    g.edge = req.end;
    g.bound = lim.end;
    for (i = 0; i < n && g.edge < g.bound; i++) {
        ExtlockExtent q = { g.edge, g.bound };

        extlock_itree_foreach_overlap(trees[i], q, grow_right_visit, &g);
    }
    grown.end = g.bound;
    return grown;
}

/*
 * @lock, which is in no tree, is being granted: let it grow.  @extra is 1
 * if it is not counted in the held/waiting counters yet.
 */
static void lock_grow(ExtlockTable *table, ExtlockLock *lock, uint64_t extra)
{
    ExtlockExtent req = lock->requested;

    if (lock->limit.start == req.start && lock->limit.end == req.end) {
        return;
    }
    lock->node.ext = grow_extent(table, lock, table->stats.held +
                                 table->stats.waiting + extra);
    if (lock->node.ext.start != req.start || lock->node.ext.end != req.end) {
        table->stats.grown_grants++;
    }
}

static ExtlockLock *table_request(ExtlockTable *table, ExtlockExtent ext,
                                  ExtlockExtent limit, ExtlockMode mode,
                                  uint64_t token, void *owner,
                                  uint64_t user_tag)
{
    ExtlockLock *lock;

    g_return_val_if_fail(ext.start < ext.end &&
                         ext.end <= EXTLOCK_EXTENT_END_MAX, NULL);
    g_return_val_if_fail(limit.start <= ext.start && ext.end <= limit.end &&
                         limit.end <= EXTLOCK_EXTENT_END_MAX, NULL);
    g_return_val_if_fail(!table->have_token || token > table->last_token,
                         NULL);
    table->have_token = true;
    table->last_token = token;

    lock = lock_new(table, ext, limit, mode, token, owner, user_tag);
    table->stats.requests++;

    /*
     * Tokens increase, so every waiting request is earlier than this one:
     * any conflicting overlapping waiter blocks it just like a holder.
     */
    if (!find_conflict(table->held, ext, mode, NULL, false, 0) &&
        !find_conflict(table->waiting, ext, mode, NULL, false, 0)) {
        lock->state = EXTLOCK_LOCK_GRANTED;
        lock->granted_us = lock->queued_us;
        table->stats.immediate_grants++;
        lock_grow(table, lock, 1);
    } else {
        lock->state = EXTLOCK_LOCK_WAITING;
        table->stats.waits++;
    }
    lock_insert(table, lock);
    table_debug_check(table, "request");
    return lock;
}

ExtlockLock *extlock_table_request(ExtlockTable *table, ExtlockExtent ext,
                                   ExtlockMode mode, uint64_t token,
                                   void *owner, uint64_t user_tag)
{
    return table_request(table, ext, ext, mode, token, owner, user_tag);
}

ExtlockLock *extlock_table_request_grow(ExtlockTable *table,
                                        ExtlockExtent ext,
                                        ExtlockExtent limit,
                                        ExtlockMode mode, uint64_t token,
                                        void *owner, uint64_t user_tag)
{
    return table_request(table, ext, limit, mode, token, owner, user_tag);
}

ExtlockLock *extlock_table_reclaim(ExtlockTable *table, ExtlockExtent ext,
                                   ExtlockMode mode, uint64_t token,
                                   void *owner, uint64_t user_tag)
{
    ExtlockLock *lock;

    g_return_val_if_fail(ext.start < ext.end &&
                         ext.end <= EXTLOCK_EXTENT_END_MAX, NULL);

    if (find_conflict(table->held, ext, mode, NULL, false, 0) ||
        find_conflict(table->waiting, ext, mode, NULL, false, 0)) {
        return NULL;
    }
    lock = lock_new(table, ext, ext, mode, token, owner, user_tag);
    lock->state = EXTLOCK_LOCK_GRANTED;
    lock->granted_us = lock->queued_us;
    lock_insert(table, lock);
    table_debug_check(table, "reclaim");
    return lock;
}

static bool collect_visit(ExtlockITNode *node, void *opaque)
{
    g_ptr_array_add(opaque, lock_of(node));
    return true;
}

static gint cmp_token(gconstpointer a, gconstpointer b)
{
    const ExtlockLock *la = *(ExtlockLock * const *)a;
    const ExtlockLock *lb = *(ExtlockLock * const *)b;

    if (la->token != lb->token) {
        return la->token < lb->token ? -1 : 1;
    }
    return la->id < lb->id ? -1 : (la->id > lb->id);
}

/*
 * A lock (held or waiting) covering @freed has just been removed, or
 * downgraded; grant, in token order, every waiter that this made
 * grantable.  Only waiters that conflicted with the lock's old mode (and
 * no longer conflict with its new one) are candidates: exclusive waiters
 * if @excl, shared waiters if @shared.
 *
 * Why one pass over the waiters overlapping @freed suffices: a waiter W is
 * blocked by the set of overlapping conflicting holders and earlier
 * overlapping conflicting waiters.  Before the removal no waiter was
 * grantable (table invariant).  Removing the lock can only shrink the
 * blocking sets of waiters that overlap @freed and conflict with @mode,
 * so those are the only candidates.  Granting a candidate moves it from
 * the waiting to the held tree; since "conflicting held lock" and
 * "conflicting earlier waiter" use the same relation (overlap + mode
 * conflict), and a grantee was earlier than every waiter it blocked, it
 * keeps blocking exactly the waiters it blocked before.  So a grant never
 * unblocks anybody, and no candidate found blocked while walking in token
 * order can become grantable later in the same pass.  Walking in token
 * order also makes each decision see the final state of all earlier
 * candidates, so compatible shared waiters are granted together while a
 * later waiter behind a still-waiting conflicting one stays queued.
 *
 * Growth does not change this: a grantee grows only over ranges that no
 * conflicting lock, held or waiting, overlaps, so the grown part blocks
 * no existing waiter, and the candidates after it are judged on the final
 * extents of the earlier ones (growth is first come, first served).
 */
static void table_wake(ExtlockTable *table, ExtlockExtent freed, bool excl,
                       bool shared)
{
    GPtrArray *cand = table->scratch;
    guint i, ngranted = 0;
    int64_t now;

    g_ptr_array_set_size(cand, 0);
    if (excl) {
        extlock_itree_foreach_overlap(
            &table->waiting[EXTLOCK_MODE_EXCLUSIVE], freed, collect_visit,
            cand);
    }
    if (shared) {
        extlock_itree_foreach_overlap(&table->waiting[EXTLOCK_MODE_SHARED],
                                      freed, collect_visit, cand);
    }
    if (cand->len == 0) {
        return;
    }
    if (cand->len > 1) {
        g_ptr_array_sort(cand, cmp_token);
    }

    now = g_get_monotonic_time();
    for (i = 0; i < cand->len; i++) {
        ExtlockLock *w = g_ptr_array_index(cand, i);

        if (!waiter_grantable(table, w)) {
            continue;
        }
        extlock_itree_remove(&table->waiting[w->mode], &w->node);
        w->state = EXTLOCK_LOCK_GRANTED;
        w->granted_us = now > w->queued_us ? now : w->queued_us;
        lock_grow(table, w, 0);
        extlock_itree_insert(&table->held[w->mode], &w->node);
        table->stats.waiting--;
        table->stats.held++;
        table->stats.deferred_grants++;
        table->stats.total_wait_us += (uint64_t)(w->granted_us - w->queued_us);
        g_ptr_array_index(cand, ngranted++) = w;
    }
    g_ptr_array_set_size(cand, ngranted);

    /* Callbacks only once the table is consistent again */
    if (table->grant_cb) {
        for (i = 0; i < cand->len; i++) {
            table->grant_cb(table, g_ptr_array_index(cand, i), table->opaque);
        }
    }
    g_ptr_array_set_size(cand, 0);
}

/* Unlink and free @lock, then wake whoever it was blocking */
static void table_remove(ExtlockTable *table, ExtlockLock *lock)
{
    ExtlockExtent ext = lock->node.ext;
    ExtlockMode mode = lock->mode;

    extlock_itree_remove(lock_tree(table, lock), &lock->node);
    g_hash_table_remove(table->locks, &lock->id);
    if (lock->state == EXTLOCK_LOCK_GRANTED) {
        table->stats.held--;
        table->stats.releases++;
    } else {
        table->stats.waiting--;
        table->stats.cancels++;
    }
    g_free(lock);
    table_wake(table, ext, true, mode == EXTLOCK_MODE_EXCLUSIVE);
}

void extlock_table_release(ExtlockTable *table, ExtlockLock *lock)
{
    g_return_if_fail(lock != NULL);

    table_remove(table, lock);
    table_debug_check(table, "release");
}

int extlock_table_release_part(ExtlockTable *table, ExtlockLock *lock,
                               ExtlockExtent part, ExtlockLock **lock_out,
                               ExtlockLock **split_out)
{
    ExtlockExtent ext;
    ExtlockLock *split = NULL;
    ExtlockITree *tree;

    if (!lock || lock->state != EXTLOCK_LOCK_GRANTED ||
        part.start >= part.end) {
        return -EINVAL;
    }
    ext = lock->node.ext;
    if (part.start < ext.start || part.end > ext.end) {
        return -EINVAL;
    }

    table->stats.partial_releases++;
    if (part.start == ext.start && part.end == ext.end) {
        /* Whole extent: same as extlock_table_release() */
        table_remove(table, lock);
        lock = NULL;
    } else {
        tree = &table->held[lock->mode];
        extlock_itree_remove(tree, &lock->node);
        if (part.start == ext.start) {
            lock->node.ext.start = part.end;
        } else {
            lock->node.ext.end = part.start;
            if (part.end < ext.end) {
                /* A hole: the upper piece becomes a lock of its own */
                split = g_new(ExtlockLock, 1);
                *split = *lock;
                split->id = table->next_id++;
                split->node.ext.start = part.end;
                split->node.ext.end = ext.end;
                lock_insert(table, split);
            }
        }
        extlock_itree_insert(tree, &lock->node);
        table_wake(table, part, true, lock->mode == EXTLOCK_MODE_EXCLUSIVE);
    }

    if (lock_out) {
        *lock_out = lock;
    }
    if (split_out) {
        *split_out = split;
    }
    table_debug_check(table, "release_part");
    return 0;
}

/*
 * Only shared waiters overlapping the lock can be unblocked: exclusive
 * ones still conflict with it, and nobody else's blockers changed.
 */
int extlock_table_downgrade(ExtlockTable *table, ExtlockLock *lock)
{
    if (!lock || lock->state != EXTLOCK_LOCK_GRANTED) {
        return -EINVAL;
    }
    if (lock->mode == EXTLOCK_MODE_SHARED) {
        return 0;
    }
    extlock_itree_remove(&table->held[EXTLOCK_MODE_EXCLUSIVE], &lock->node);
    lock->mode = EXTLOCK_MODE_SHARED;
    extlock_itree_insert(&table->held[EXTLOCK_MODE_SHARED], &lock->node);
    table->stats.downgrades++;
    table_wake(table, lock->node.ext, false, true);
    table_debug_check(table, "downgrade");
    return 0;
}

ExtlockLock *extlock_table_lookup(ExtlockTable *table, uint64_t lock_id)
{
    return g_hash_table_lookup(table->locks, &lock_id);
}

typedef struct BlockerWalk {
    const ExtlockLock *self;
    bool earlier_only;
    ExtlockLockFn fn;
    void *opaque;
    bool limited;               /* at most @left more visits */
    unsigned left;
    bool calls_limited;         /* at most @calls_left more calls of @fn */
    unsigned calls_left;
} BlockerWalk;

static bool blocker_visit(ExtlockITNode *node, void *opaque)
{
    BlockerWalk *b = opaque;
    ExtlockLock *lock = lock_of(node);

    if (b->limited) {
        if (b->left == 0) {
            return false;
        }
        b->left--;
    }
    if (b->calls_limited && b->calls_left == 0) {
        return false;
    }
    if (lock != b->self &&
        (!b->earlier_only || lock->token < b->self->token)) {
        b->fn(lock, b->opaque);
        if (b->calls_limited) {
            b->calls_left--;
        }
    }
    return true;
}

static void foreach_conflicting(ExtlockITree *trees, BlockerWalk *b)
{
    extlock_itree_foreach_overlap(&trees[EXTLOCK_MODE_SHARED],
                                  b->self->node.ext, blocker_visit, b);
    extlock_itree_foreach_overlap(&trees[EXTLOCK_MODE_EXCLUSIVE],
                                  b->self->node.ext, blocker_visit, b);
}

static void foreach_blocker(ExtlockTable *table, ExtlockLock *lock,
                            BlockerWalk b)
{
    if (lock->state != EXTLOCK_LOCK_WAITING) {
        return;
    }
    if (lock->mode == EXTLOCK_MODE_EXCLUSIVE) {
        foreach_conflicting(table->held, &b);
        b.earlier_only = true;
        foreach_conflicting(table->waiting, &b);
    } else {
        extlock_itree_foreach_overlap(&table->held[EXTLOCK_MODE_EXCLUSIVE],
                                      lock->node.ext, blocker_visit, &b);
        b.earlier_only = true;
        extlock_itree_foreach_overlap(
            &table->waiting[EXTLOCK_MODE_EXCLUSIVE], lock->node.ext,
            blocker_visit, &b);
    }
}

void extlock_table_foreach_blocker(ExtlockTable *table, ExtlockLock *lock,
                                   ExtlockLockFn fn, void *opaque)
{
    BlockerWalk b = { lock, false, fn, opaque, false, 0 };

    foreach_blocker(table, lock, b);
}

void extlock_table_foreach_blocker_max(ExtlockTable *table,
                                       ExtlockLock *lock,
                                       unsigned max_visits,
                                       ExtlockLockFn fn, void *opaque)
{
    BlockerWalk b = { lock, false, fn, opaque, true, max_visits };

    foreach_blocker(table, lock, b);
}

void extlock_table_foreach_blocker_first(ExtlockTable *table,
                                         ExtlockLock *lock, unsigned max,
                                         ExtlockLockFn fn, void *opaque)
{
    BlockerWalk b = { lock, false, fn, opaque, false, 0, true, max };

    foreach_blocker(table, lock, b);
}

/* The conflicting locks of @lock in the trees @trees (held or waiting) */
static void foreach_conflict_in(ExtlockITree *trees, ExtlockLock *lock,
                                BlockerWalk *b)
{
    if (lock->mode == EXTLOCK_MODE_EXCLUSIVE) {
        foreach_conflicting(trees, b);
    } else {
        extlock_itree_foreach_overlap(&trees[EXTLOCK_MODE_EXCLUSIVE],
                                      lock->node.ext, blocker_visit, b);
    }
}

void extlock_table_foreach_conflict(ExtlockTable *table, ExtlockLock *lock,
                                    ExtlockLockFn fn, void *opaque)
{
    BlockerWalk b = { lock, false, fn, opaque };

    foreach_conflict_in(table->held, lock, &b);
    foreach_conflict_in(table->waiting, lock, &b);
}

void extlock_table_foreach_conflict_state(ExtlockTable *table,
                                          ExtlockLock *lock,
                                          ExtlockLockState state,
                                          ExtlockLockFn fn, void *opaque)
{
    BlockerWalk b = { lock, false, fn, opaque };

    foreach_conflict_in(state == EXTLOCK_LOCK_GRANTED ? table->held
                                                      : table->waiting,
                        lock, &b);
}

/* Append the locks of two trees, merged in ascending (offset, id) order */
static void append_merged(GArray *ids, ExtlockITree *pair)
{
    ExtlockITNode *a = extlock_itree_first(&pair[0]);
    ExtlockITNode *b = extlock_itree_first(&pair[1]);

    while (a || b) {
        ExtlockITNode **pick;

        if (!b) {
            pick = &a;
        } else if (!a) {
            pick = &b;
        } else if (a->ext.start != b->ext.start) {
            pick = a->ext.start < b->ext.start ? &a : &b;
        } else {
            pick = lock_of(a)->id < lock_of(b)->id ? &a : &b;
        }
        g_array_append_val(ids, lock_of(*pick)->id);
        *pick = extlock_itree_next(*pick);
    }
}

/*
 * Not a hot path: the ids are taken first, so @fn may release locks
 * (e.g. to drop everything a session holds) without upsetting the walk.
 * Locks that are gone by the time their turn comes are skipped.
 */
void extlock_table_foreach(ExtlockTable *table, ExtlockLockFn fn,
                           void *opaque)
{
    g_autoptr(GArray) ids = g_array_sized_new(FALSE, FALSE, sizeof(uint64_t),
                                             g_hash_table_size(table->locks));
    guint i;

    append_merged(ids, table->held);
    append_merged(ids, table->waiting);
    for (i = 0; i < ids->len; i++) {
        ExtlockLock *lock = extlock_table_lookup(table,
                                                 g_array_index(ids, uint64_t,
                                                               i));
        if (lock) {
            fn(lock, opaque);
        }
    }
}

const ExtlockTableStats *extlock_table_stats(ExtlockTable *table)
{
    return &table->stats;
}

/* Overlapping conflicting pairs found while checking */
typedef struct CheckWalk {
    const ExtlockLock *self;
    const ExtlockLock *bad;
    bool held;                   /* walking held locks */
} CheckWalk;

static bool check_visit(ExtlockITNode *node, void *opaque)
{
    CheckWalk *c = opaque;
    ExtlockLock *lock = lock_of(node);

    if (lock == c->self) {
        return true;
    }
    if (c->held && c->self->state == EXTLOCK_LOCK_GRANTED) {
        /* Two overlapping conflicting grants */
        c->bad = lock;
        return false;
    }
    if (c->held && lock->token > c->self->token) {
        /* A holder that overtook the waiter c->self */
        c->bad = lock;
        return false;
    }
    return true;
}

static void check_conflicting(ExtlockITree *trees, const ExtlockLock *self,
                              CheckWalk *c)
{
    c->self = self;
    c->bad = NULL;
    extlock_itree_foreach_overlap(&trees[EXTLOCK_MODE_EXCLUSIVE],
                                  self->node.ext, check_visit, c);
    if (!c->bad && self->mode == EXTLOCK_MODE_EXCLUSIVE) {
        extlock_itree_foreach_overlap(&trees[EXTLOCK_MODE_SHARED],
                                      self->node.ext, check_visit, c);
    }
}

static char *describe(const ExtlockLock *lock)
{
    return g_strdup_printf("lock %" G_GUINT64_FORMAT " (%s %s [%"
                           G_GUINT64_FORMAT ", %" G_GUINT64_FORMAT
                           ") token %" G_GUINT64_FORMAT ")",
                           lock->id,
                           lock->state == EXTLOCK_LOCK_GRANTED ? "granted"
                                                               : "waiting",
                           extlock_mode_name(lock->mode),
                           lock->node.ext.start, lock->node.ext.end,
                           lock->token);
}

static bool extent_inside(ExtlockExtent inner, ExtlockExtent outer)
{
    return outer.start <= inner.start && inner.end <= outer.end;
}

static bool check_fail(char **errmsg, const char *what,
                       const ExtlockLock *a, const ExtlockLock *b)
{
    if (errmsg) {
        g_autofree char *da = a ? describe(a) : NULL;
        g_autofree char *db = b ? describe(b) : NULL;

        *errmsg = g_strdup_printf("%s%s%s%s%s", what,
                                  da ? ": " : "", da ? da : "",
                                  db ? " vs " : "", db ? db : "");
    }
    return false;
}

/* Structure of one tree: RB shape, its locks' state/mode, id lookup */
static bool check_tree(ExtlockTable *table, ExtlockITree *tree,
                       ExtlockLockState state, ExtlockMode mode,
                       char **errmsg)
{
    ExtlockITNode *n;

    if (!extlock_itree_check(tree)) {
        return check_fail(errmsg, "interval tree invariant broken",
                          NULL, NULL);
    }
    for (n = extlock_itree_first(tree); n; n = extlock_itree_next(n)) {
        ExtlockLock *lock = lock_of(n);

        if (lock->state != state || lock->mode != mode) {
            return check_fail(errmsg, "lock in the wrong tree", lock, NULL);
        }
        if (extlock_table_lookup(table, lock->id) != lock) {
            return check_fail(errmsg, "lock id not indexed", lock, NULL);
        }
        if (lock->node.ext.end > EXTLOCK_EXTENT_END_MAX) {
            return check_fail(errmsg, "extent beyond 2^63", lock, NULL);
        }
        if (lock->id >= table->next_id) {
            return check_fail(errmsg, "id not yet assigned", lock, NULL);
        }
        if ((state == EXTLOCK_LOCK_GRANTED) != (lock->granted_us != 0)) {
            return check_fail(errmsg, "bad granted_us", lock, NULL);
        }
    }
    return true;
}

bool extlock_table_check(ExtlockTable *table, char **errmsg)
{
    static const ExtlockMode modes[] = {
        EXTLOCK_MODE_SHARED, EXTLOCK_MODE_EXCLUSIVE
    };
    CheckWalk c = { 0 };
    ExtlockITNode *n;
    guint i;

    if (errmsg) {
        *errmsg = NULL;
    }
    for (i = 0; i < G_N_ELEMENTS(modes); i++) {
        if (!check_tree(table, &table->held[modes[i]], EXTLOCK_LOCK_GRANTED,
                        modes[i], errmsg) ||
            !check_tree(table, &table->waiting[modes[i]],
                        EXTLOCK_LOCK_WAITING, modes[i], errmsg)) {
            return false;
        }
    }
    if (table->stats.held != table->held[0].count + table->held[1].count ||
        table->stats.waiting !=
            table->waiting[0].count + table->waiting[1].count) {
        return check_fail(errmsg, "held/waiting counters out of sync",
                          NULL, NULL);
    }
    if (g_hash_table_size(table->locks) !=
        table->stats.held + table->stats.waiting) {
        return check_fail(errmsg, "id index out of sync", NULL, NULL);
    }

    /*
     * Granted exclusive locks against all grants (shared-shared pairs are
     * compatible).  Each overlap found is a violation, so the cost is
     * O(n log n).
     */
    c.held = true;
    for (n = extlock_itree_first(&table->held[EXTLOCK_MODE_EXCLUSIVE]); n;
         n = extlock_itree_next(n)) {
        check_conflicting(table->held, lock_of(n), &c);
        if (c.bad) {
            return check_fail(errmsg, "overlapping conflicting grants",
                              lock_of(n), c.bad);
        }
    }

    for (i = 0; i < G_N_ELEMENTS(modes); i++) {
        for (n = extlock_itree_first(&table->waiting[modes[i]]); n;
             n = extlock_itree_next(n)) {
            ExtlockLock *w = lock_of(n);

            check_conflicting(table->held, w, &c);
            if (c.bad) {
                return check_fail(errmsg, "grant overtook an earlier "
                                  "conflicting waiter", c.bad, w);
            }
            if (waiter_grantable(table, w)) {
                return check_fail(errmsg, "waiter is grantable", w, NULL);
            }
        }
    }

    /*
     * Growth bookkeeping.  Checked last, so that a broken extent is
     * reported as the conflict it causes, if any.
     */
    for (i = 0; i < 4; i++) {
        ExtlockITree *tree = i < 2 ? &table->held[modes[i]]
                                   : &table->waiting[modes[i - 2]];

        for (n = extlock_itree_first(tree); n; n = extlock_itree_next(n)) {
            ExtlockLock *lock = lock_of(n);

            if (lock->requested.start >= lock->requested.end ||
                !extent_inside(lock->requested, lock->limit)) {
                return check_fail(errmsg, "request outside its limit",
                                  lock, NULL);
            }
            if (!extent_inside(n->ext, lock->limit)) {
                return check_fail(errmsg, "extent outside its limit",
                                  lock, NULL);
            }
            if (lock->state == EXTLOCK_LOCK_WAITING &&
                (n->ext.start != lock->requested.start ||
                 n->ext.end != lock->requested.end)) {
                return check_fail(errmsg, "waiting extent differs from "
                                  "its request", lock, NULL);
            }
        }
    }
    return true;
}
