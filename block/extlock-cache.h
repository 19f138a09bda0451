/*
 * extlock: the lock cache's decisions, without QEMU
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Pure functions over the node's locks and requests (interval trees of
 * extents), shared by the driver (extlock-locks.c) and the unit tests
 * (tests/unit/test-lock-cache.c): which cached lock serves a new request,
 * which part of a revoked lock to give back, and whether a request must
 * wait for an earlier conflicting request of the same node.
 */
#ifndef BLOCK_EXTLOCK_CACHE_H
#define BLOCK_EXTLOCK_CACHE_H

#include <stdbool.h>
#include <stdint.h>
#include "extlock/extent.h"
#include "extlock/interval-tree.h"

/* What the lookup needs to know of a lock granted to the node */
typedef struct ExtlockCacheEntry {
    ExtlockITNode node;         /* node.ext: the granted extent */
    ExtlockMode mode;
    bool revoking;              /* the coordinator asked for it back */
    bool stale;                 /* lost while in use: never use it again */
} ExtlockCacheEntry;

/* May @e serve a new request for @ext in @mode? */
static inline bool extlock_cache_entry_serves(const ExtlockCacheEntry *e,
                                              ExtlockExtent ext,
                                              ExtlockMode mode)
{
    return !e->revoking && !e->stale &&
           e->node.ext.start <= ext.start && ext.end <= e->node.ext.end &&
           (e->mode == EXTLOCK_MODE_EXCLUSIVE || mode == EXTLOCK_MODE_SHARED);
}

/*
 * A lock in @locks (a tree of ExtlockCacheEntry.node) that serves a new
 * request for @ext in @mode, or NULL: then the request asks the
 * coordinator.  Revoked and stale locks serve nobody.
 */
ExtlockCacheEntry *extlock_cache_lookup(ExtlockITree *locks, ExtlockExtent ext,
                                        ExtlockMode mode);

/*
 * Which part of a revoked lock @ext to give back: the part @want the
 * waiting request wants, widened to the end of the lock on the side the
 * node has not used or, if it reaches that end already, to the used span
 * (@used: the span its requests used since the grant, empty if
 * start >= end).
 * The whole lock if the used span touches the wanted part or lies on both
 * sides of it.  Always a head, a tail or all of @ext.
 */
ExtlockExtent extlock_cache_revoke_part(ExtlockExtent ext, ExtlockExtent want,
                                        ExtlockExtent used);

/*
 * How far a lock request for @want may grow: @limit (widened to cover
 * @want), cut at the nearest of the @n @contended extents (ranges other
 * hosts recently wanted of this node's locks) on each side of @want, so
 * that the lock grows into no contended range beyond @want itself.  Empty
 * contended extents are ignored.
 */
ExtlockExtent extlock_cache_grow_limit(ExtlockExtent want, ExtlockExtent limit,
                                       const ExtlockExtent *contended,
                                       size_t n);

/*
 * Is a lock over @ext in @mode contended: does it overlap one of the @n
 * @contended extents (ranges other hosts recently wanted of this node's
 * locks, in @contended_modes) in a conflicting mode?  Such a lock is
 * given back after use instead of being cached.  Empty contended extents
 * are ignored.
 */
bool extlock_cache_contended(ExtlockExtent ext, ExtlockMode mode,
                             const ExtlockExtent *contended,
                             const ExtlockMode *contended_modes, size_t n);

/* A request of the node between lock and unlock, for local order */
typedef struct ExtlockLocalReq {
    ExtlockITNode node;         /* node.ext: the locked range */
    uint64_t seq;               /* arrival order in the node */
    ExtlockMode mode;
    size_t slot;                /* private: index in ExtlockLocalSet.flat */
} ExtlockLocalReq;

/*
 * The node's active requests (ExtlockLocalReq), for local order.  Up to
 * EXTLOCK_LOCAL_FLAT_MAX of them live in a flat array of copies of their
 * extents, seqs and modes: insert and remove are O(1) (append, move the
 * last entry into the hole) and the conflict check is a linear scan over
 * contiguous memory, which at the usual queue depths is much cheaper than
 * rebalancing an interval tree whose nodes sit in the stacks of as many
 * coroutines.  When a request finds the array full, the set moves all of
 * them into an interval tree (O(log n) insert/remove, O(log n + k)
 * check) and stays there until it is empty again.  No allocation.
 */
#define EXTLOCK_LOCAL_FLAT_MAX 64

typedef struct ExtlockLocalSlot {
    ExtlockExtent ext;
    uint64_t seq;
    ExtlockMode mode;
    ExtlockLocalReq *req;
} ExtlockLocalSlot;

/*
 * A counting filter in front of the conflict check: the image is cut into
 * 64 KiB blocks, block b falls into bucket b % EXTLOCK_LOCAL_BUCKETS, and
 * each bucket counts the requests of the set that touch one of its
 * blocks; a request that touches EXTLOCK_LOCAL_BUCKETS blocks or more is
 * counted once in @nwide instead (it is in every bucket).  Two requests
 * that overlap share a block, so a request whose buckets hold nobody but
 * itself and with no wide request but itself overlaps nobody: the check
 * says "no" without a search.  At queue depth 32 with scattered writes
 * the search then runs for about one request in ten.
 */
#define EXTLOCK_LOCAL_BLOCK_SHIFT 16
#define EXTLOCK_LOCAL_BUCKETS 256

typedef struct ExtlockLocalSet {
    size_t count;
    size_t nexcl;               /* how many of them are exclusive */
    size_t nwide;               /* how many are in every bucket */
    uint32_t buckets[EXTLOCK_LOCAL_BUCKETS];
    bool in_tree;               /* the requests are in @tree, not @flat */
    ExtlockITree tree;
    ExtlockLocalSlot flat[EXTLOCK_LOCAL_FLAT_MAX];
} ExtlockLocalSet;

/* An empty set (a zero-filled one is empty too) */
void extlock_local_init(ExtlockLocalSet *set);

/*
 * Insert, remove and the check run for every request of the node, so
 * their common cases (the flat array; a request within one 64 KiB block;
 * no search needed) are inline below, and the rest is in extlock-cache.c:
 */
/* Insert or remove @req while the set is in its tree (or moves there) */
void extlock_local_insert_slow(ExtlockLocalSet *set, ExtlockLocalReq *req);
void extlock_local_remove_slow(ExtlockLocalSet *set, ExtlockLocalReq *req);
/* The filter for @ext over several blocks or wide (see ExtlockLocalSet) */
void extlock_local_filter_span(ExtlockLocalSet *set, ExtlockExtent ext,
                               int delta);
/* extlock_local_must_wait() once the inline shortcuts did not answer */
bool extlock_local_search(ExtlockLocalSet *active, const ExtlockLocalReq *req);

/* Count @ext in the filter of @set (@delta +1) or stop counting it (-1) */
static inline void extlock_local_filter(ExtlockLocalSet *set,
                                        ExtlockExtent ext, int delta)
{
    uint64_t first = ext.start >> EXTLOCK_LOCAL_BLOCK_SHIFT;

    if ((ext.end - 1) >> EXTLOCK_LOCAL_BLOCK_SHIFT == first) {
        set->buckets[first % EXTLOCK_LOCAL_BUCKETS] += delta;
    } else {
        extlock_local_filter_span(set, ext, delta);
    }
}

/* Add @req, whose node.ext, seq and mode are set; they must not change */
static inline void extlock_local_insert(ExtlockLocalSet *set,
                                        ExtlockLocalReq *req)
{
    ExtlockLocalSlot *s;

    if (set->in_tree || set->count == EXTLOCK_LOCAL_FLAT_MAX) {
        extlock_local_insert_slow(set, req);
        return;
    }
    s = &set->flat[set->count];
    s->ext = req->node.ext;
    s->seq = req->seq;
    s->mode = req->mode;
    s->req = req;
    req->slot = set->count;
    set->count++;
    set->nexcl += req->mode == EXTLOCK_MODE_EXCLUSIVE;
    extlock_local_filter(set, req->node.ext, 1);
}

/* Remove @req, which is in @set */
static inline void extlock_local_remove(ExtlockLocalSet *set,
                                        ExtlockLocalReq *req)
{
    if (set->in_tree) {
        extlock_local_remove_slow(set, req);
        return;
    }
    set->nexcl -= req->mode == EXTLOCK_MODE_EXCLUSIVE;
    extlock_local_filter(set, req->node.ext, -1);
    set->count--;
    if (req->slot != set->count) {
        set->flat[req->slot] = set->flat[set->count];
        set->flat[req->slot].req->slot = req->slot;
    }
}

static inline size_t extlock_local_count(const ExtlockLocalSet *set)
{
    return set->count;
}

/*
 * Must @req (which is in @active) wait for an earlier request of the node
 * in @active that overlaps it in a conflicting mode?  No search when it
 * is alone, a reader while no writer is active, or when the filter of
 * @active says that nobody else touches its blocks.
 */
static inline bool extlock_local_must_wait(ExtlockLocalSet *active,
                                           const ExtlockLocalReq *req)
{
    uint64_t first = req->node.ext.start >> EXTLOCK_LOCAL_BLOCK_SHIFT;

    if (active->count <= 1 ||
        (req->mode == EXTLOCK_MODE_SHARED && active->nexcl == 0)) {
        return false;
    }
    /* Within one block, which no other request of @active touches */
    if (!active->nwide &&
        (req->node.ext.end - 1) >> EXTLOCK_LOCAL_BLOCK_SHIFT == first &&
        active->buckets[first % EXTLOCK_LOCAL_BUCKETS] <= 1) {
        return false;
    }
    return extlock_local_search(active, req);
}

/*
 * A log2 histogram of durations in microseconds, kept by the driver on
 * its I/O path (plain increments: everything of a node runs in its
 * AioContext).  Bucket 0 counts durations below 1 us, bucket i (1 <= i <
 * EXTLOCK_HIST_BUCKETS - 1) those in [2^(i-1), 2^i) us, and the last
 * bucket everything from 2^(EXTLOCK_HIST_BUCKETS - 2) us (about 36 min).
 */
#define EXTLOCK_HIST_BUCKETS 33

typedef struct ExtlockHist {
    uint64_t buckets[EXTLOCK_HIST_BUCKETS];
    uint64_t count;
    uint64_t sum_us;
    uint64_t max_us;
} ExtlockHist;

/* The bucket of a duration of @us microseconds */
unsigned extlock_hist_bucket(uint64_t us);

/* Count a duration of @us microseconds */
void extlock_hist_add(ExtlockHist *h, uint64_t us);

/*
 * Upper bound (exclusive, in us) of the bucket in which the @q-th quantile
 * (0 < @q <= 1) lies; 0 if @h is empty, UINT64_MAX for the last bucket
 */
uint64_t extlock_hist_quantile_bound(const ExtlockHist *h, double q);

#endif /* BLOCK_EXTLOCK_CACHE_H */
