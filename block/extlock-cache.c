/*
 * extlock: the lock cache's decisions, without QEMU
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * No QEMU headers: this file is also built into tests/unit.
 */
#include <stddef.h>
#include <string.h>
#include "extlock-cache.h"

#define EXTLOCK_CACHE_CONTAINER(ptr, type, member) \
    ((type *)((char *)(ptr) - offsetof(type, member)))


typedef struct ExtlockCacheFind {
    ExtlockExtent ext;
    ExtlockMode mode;
    ExtlockCacheEntry *found;
} ExtlockCacheFind;

static bool extlock_cache_find_cb(ExtlockITNode *node, void *opaque)
{
    ExtlockCacheFind *f = opaque;
    ExtlockCacheEntry *e = EXTLOCK_CACHE_CONTAINER(node, ExtlockCacheEntry,
                                                   node);

    if (extlock_cache_entry_serves(e, f->ext, f->mode)) {
        f->found = e;
        return false;
    }
    return true;
}

ExtlockCacheEntry *extlock_cache_lookup(ExtlockITree *locks, ExtlockExtent ext,
                                        ExtlockMode mode)
{
    ExtlockCacheFind f = { .ext = ext, .mode = mode };

    extlock_itree_foreach_overlap(locks, ext, extlock_cache_find_cb, &f);
    return f.found;
}

ExtlockExtent extlock_cache_revoke_part(ExtlockExtent ext, ExtlockExtent want,
                                        ExtlockExtent used)
{
    if (want.start < ext.start) {
        want.start = ext.start;
    }
    if (want.end > ext.end) {
        want.end = ext.end;
    }
    if (want.start >= want.end || used.start >= used.end) {
        return ext;
    }
    /*
     * If the wanted part reaches the unused end of the lock already, the
     * waiter comes from that end: up to the used span.  A neighbour
     * writing sequentially into the part this lock grew over would
     * otherwise take it back piece by piece, one revoke per request of
     * its own (bench-qemu.py, many hosts).
     */
    if (used.end <= want.start && want.start > ext.start) {
        return (ExtlockExtent) {
            .start = want.end < ext.end ? want.start : used.end,
            .end = ext.end,
        };
    }
    if (used.start >= want.end && want.end < ext.end) {
        return (ExtlockExtent) {
            .start = ext.start,
            .end = want.start > ext.start ? want.end : used.start,
        };
    }
    return ext;
}

ExtlockExtent extlock_cache_grow_limit(ExtlockExtent want, ExtlockExtent limit,
                                       const ExtlockExtent *contended,
                                       size_t n)
{
    ExtlockExtent r = {
        .start = limit.start < want.start ? limit.start : want.start,
        .end = limit.end > want.end ? limit.end : want.end,
    };

    for (size_t i = 0; i < n; i++) {
        ExtlockExtent c = contended[i];

        if (c.start >= c.end) {
            continue;
        }
        if (c.end <= want.start) {
            r.start = c.end > r.start ? c.end : r.start;
        } else if (c.start >= want.end) {
            r.end = c.start < r.end ? c.start : r.end;
        } else {
            /* Overlaps @want: no growth past @want on its sides */
            if (c.start < want.start) {
                r.start = want.start;
            }
            if (c.end > want.end) {
                r.end = want.end;
            }
        }
    }
    return r;
}

bool extlock_cache_contended(ExtlockExtent ext, ExtlockMode mode,
                             const ExtlockExtent *contended,
                             const ExtlockMode *contended_modes, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        ExtlockExtent c = contended[i];

        if (c.start < c.end && c.start < ext.end && ext.start < c.end &&
            (mode == EXTLOCK_MODE_EXCLUSIVE ||
             contended_modes[i] == EXTLOCK_MODE_EXCLUSIVE)) {
            return true;
        }
    }
    return false;
}

typedef struct ExtlockLocalFind {
    const ExtlockLocalReq *req;
    bool found;
} ExtlockLocalFind;

static bool extlock_local_conflict_cb(ExtlockITNode *node, void *opaque)
{
    ExtlockLocalFind *f = opaque;
    ExtlockLocalReq *other = EXTLOCK_CACHE_CONTAINER(node, ExtlockLocalReq,
                                                     node);

    if (other->seq < f->req->seq &&
        extlock_modes_conflict(other->mode, f->req->mode)) {
        f->found = true;
        return false;
    }
    return true;
}

void extlock_local_filter_span(ExtlockLocalSet *set, ExtlockExtent ext,
                               int delta)
{
    uint64_t first = ext.start >> EXTLOCK_LOCAL_BLOCK_SHIFT;
    uint64_t last = (ext.end - 1) >> EXTLOCK_LOCAL_BLOCK_SHIFT;

    if (last - first >= EXTLOCK_LOCAL_BUCKETS - 1) {
        set->nwide += delta;
        return;
    }
    for (uint64_t b = first; b <= last; b++) {
        set->buckets[b % EXTLOCK_LOCAL_BUCKETS] += delta;
    }
}

/*
 * May another request of @set than @req (which is in it) touch one of
 * @req's blocks?  False means that none overlaps @req.
 */
static bool extlock_local_maybe_shared(const ExtlockLocalSet *set,
                                       const ExtlockLocalReq *req)
{
    ExtlockExtent ext = req->node.ext;
    uint64_t first = ext.start >> EXTLOCK_LOCAL_BLOCK_SHIFT;
    uint64_t last = (ext.end - 1) >> EXTLOCK_LOCAL_BLOCK_SHIFT;

    if (last - first >= EXTLOCK_LOCAL_BUCKETS - 1) {
        return true;            /* wide itself: it touches every bucket */
    }
    if (set->nwide) {
        return true;
    }
    /* @req's blocks are in distinct buckets, each counting @req once */
    for (uint64_t b = first; b <= last; b++) {
        if (set->buckets[b % EXTLOCK_LOCAL_BUCKETS] > 1) {
            return true;
        }
    }
    return false;
}

void extlock_local_init(ExtlockLocalSet *set)
{
    set->count = 0;
    set->nexcl = 0;
    set->nwide = 0;
    memset(set->buckets, 0, sizeof(set->buckets));
    set->in_tree = false;
    set->tree = (ExtlockITree)EXTLOCK_ITREE_INIT;
}

void extlock_local_insert_slow(ExtlockLocalSet *set, ExtlockLocalReq *req)
{
    if (!set->in_tree) {
        /* Full: from now on (until empty) everything is in the tree */
        for (size_t i = 0; i < set->count; i++) {
            extlock_itree_insert(&set->tree, &set->flat[i].req->node);
        }
        set->in_tree = true;
    }
    extlock_itree_insert(&set->tree, &req->node);
    set->count++;
    set->nexcl += req->mode == EXTLOCK_MODE_EXCLUSIVE;
    extlock_local_filter(set, req->node.ext, 1);
}

void extlock_local_remove_slow(ExtlockLocalSet *set, ExtlockLocalReq *req)
{
    set->nexcl -= req->mode == EXTLOCK_MODE_EXCLUSIVE;
    extlock_local_filter(set, req->node.ext, -1);
    extlock_itree_remove(&set->tree, &req->node);
    if (--set->count == 0) {
        set->in_tree = false;
    }
}

bool extlock_local_search(ExtlockLocalSet *active, const ExtlockLocalReq *req)
{
    ExtlockLocalFind f = { .req = req };

    if (active->count <= 1 ||
        (req->mode == EXTLOCK_MODE_SHARED && active->nexcl == 0) ||
        !extlock_local_maybe_shared(active, req)) {
        return false;
    }
    if (!active->in_tree) {
        ExtlockExtent ext = req->node.ext;

        for (size_t i = 0; i < active->count; i++) {
            const ExtlockLocalSlot *s = &active->flat[i];

            if (s->seq < req->seq && s->ext.start < ext.end &&
                ext.start < s->ext.end &&
                extlock_modes_conflict(s->mode, req->mode)) {
                return true;
            }
        }
        return false;
    }
    extlock_itree_foreach_overlap(&active->tree, req->node.ext,
                                  extlock_local_conflict_cb, &f);
    return f.found;
}

unsigned extlock_hist_bucket(uint64_t us)
{
    unsigned b = 0;

    while (us && b < EXTLOCK_HIST_BUCKETS - 1) {
        us >>= 1;
        b++;
    }
    return b;
}

void extlock_hist_add(ExtlockHist *h, uint64_t us)
{
    h->buckets[extlock_hist_bucket(us)]++;
    h->count++;
    h->sum_us += us;
    if (us > h->max_us) {
        h->max_us = us;
    }
}

uint64_t extlock_hist_quantile_bound(const ExtlockHist *h, double q)
{
    uint64_t want, seen = 0;

    if (!h->count) {
        return 0;
    }
    want = (uint64_t)(q * (double)h->count);
    if (want < 1) {
        want = 1;
    }
    for (unsigned b = 0; b < EXTLOCK_HIST_BUCKETS; b++) {
        seen += h->buckets[b];
        if (seen >= want) {
            return b == EXTLOCK_HIST_BUCKETS - 1 ? UINT64_MAX
                                                 : (uint64_t)1 << b;
        }
    }
    return UINT64_MAX;
}
