/*
 * Unit tests for the driver's lock-cache decisions (block/extlock-cache.c)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <cmocka.h>
#include <glib.h>
#include "extlock-cache.h"

#define KiB 1024ULL
#define MiB (1024 * KiB)

static ExtlockExtent ext(uint64_t start, uint64_t end)
{
    return (ExtlockExtent) { .start = start, .end = end };
}

static ExtlockCacheEntry *entry(ExtlockITree *t, uint64_t start, uint64_t end,
                                ExtlockMode mode)
{
    ExtlockCacheEntry *e = g_new0(ExtlockCacheEntry, 1);

    e->node.ext = ext(start, end);
    e->mode = mode;
    extlock_itree_insert(t, &e->node);
    return e;
}

static void free_tree(ExtlockITree *t)
{
    ExtlockITNode *n;

    while ((n = extlock_itree_first(t))) {
        extlock_itree_remove(t, n);
        g_free(n);          /* node is the first member */
    }
}

static void test_lookup_modes(void **state)
{
    ExtlockITree t = { 0 };
    ExtlockCacheEntry *x = entry(&t, 0, 1 * MiB, EXTLOCK_MODE_EXCLUSIVE);
    ExtlockCacheEntry *s = entry(&t, 2 * MiB, 4 * MiB, EXTLOCK_MODE_SHARED);

    (void)state;
    /* exclusive serves reads and writes inside it */
    assert_ptr_equal(extlock_cache_lookup(&t, ext(0, 4 * KiB),
                                          EXTLOCK_MODE_EXCLUSIVE), x);
    assert_ptr_equal(extlock_cache_lookup(&t, ext(1 * MiB - 4 * KiB, 1 * MiB),
                                          EXTLOCK_MODE_SHARED), x);
    /* shared serves reads only */
    assert_ptr_equal(extlock_cache_lookup(&t, ext(2 * MiB, 3 * MiB),
                                          EXTLOCK_MODE_SHARED), s);
    assert_null(extlock_cache_lookup(&t, ext(2 * MiB, 3 * MiB),
                                     EXTLOCK_MODE_EXCLUSIVE));
    /* not across the end of a lock, nor in a gap */
    assert_null(extlock_cache_lookup(&t, ext(1 * MiB - 4 * KiB, 1 * MiB + 4 * KiB),
                                     EXTLOCK_MODE_SHARED));
    assert_null(extlock_cache_lookup(&t, ext(1 * MiB, 2 * MiB),
                                     EXTLOCK_MODE_SHARED));
    free_tree(&t);
}

/* A stale lock never serves, even where it is the only one */
static void test_lookup_skips_stale(void **state)
{
    ExtlockITree t = { 0 };
    ExtlockCacheEntry *old = entry(&t, 0, 64 * MiB, EXTLOCK_MODE_EXCLUSIVE);
    ExtlockCacheEntry *fresh;

    (void)state;
    old->stale = true;
    assert_false(extlock_cache_entry_serves(old, ext(0, 4 * KiB),
                                            EXTLOCK_MODE_SHARED));
    assert_null(extlock_cache_lookup(&t, ext(16 * MiB, 16 * MiB + 64 * KiB),
                                     EXTLOCK_MODE_SHARED));
    /* a valid lock granted later over the same range is found */
    fresh = entry(&t, 16 * MiB, 32 * MiB, EXTLOCK_MODE_SHARED);
    assert_ptr_equal(extlock_cache_lookup(&t, ext(16 * MiB, 16 * MiB + 64 * KiB),
                                          EXTLOCK_MODE_SHARED), fresh);
    assert_null(extlock_cache_lookup(&t, ext(16 * MiB, 16 * MiB + 64 * KiB),
                                     EXTLOCK_MODE_EXCLUSIVE));
    free_tree(&t);
}

/*
 * A new local request racing a revoke: request A runs under a cached
 * exclusive lock when the revoke arrives; request B, which arrived after
 * A and overlaps it, must first wait for A (local order), and then may not
 * use the revoked lock but must ask the coordinator, where it queues
 * behind the request that caused the revoke.  A request that arrived
 * before the revoke and does not conflict with A was served already.
 */
static void test_new_request_racing_revoke(void **state)
{
    ExtlockITree locks = { 0 }, active = { 0 };
    ExtlockCacheEntry *l = entry(&locks, 0, 64 * MiB, EXTLOCK_MODE_EXCLUSIVE);
    ExtlockLocalReq a = { .node.ext = ext(0, 64 * KiB), .seq = 1,
                          .mode = EXTLOCK_MODE_EXCLUSIVE };
    ExtlockLocalReq b = { .node.ext = ext(32 * KiB, 96 * KiB), .seq = 2,
                          .mode = EXTLOCK_MODE_SHARED };
    ExtlockLocalReq c = { .node.ext = ext(1 * MiB, 1 * MiB + 4 * KiB),
                          .seq = 3, .mode = EXTLOCK_MODE_EXCLUSIVE };

    (void)state;
    /* A is served by the cached lock */
    extlock_itree_insert(&active, &a.node);
    assert_false(extlock_local_must_wait(&active, &a));
    assert_ptr_equal(extlock_cache_lookup(&locks, a.node.ext, a.mode), l);

    /* C (no overlap with A) is served before the revoke arrives */
    extlock_itree_insert(&active, &c.node);
    assert_false(extlock_local_must_wait(&active, &c));
    assert_ptr_equal(extlock_cache_lookup(&locks, c.node.ext, c.mode), l);

    /* the revoke arrives; then B */
    l->revoking = true;
    extlock_itree_insert(&active, &b.node);
    assert_true(extlock_local_must_wait(&active, &b));
    assert_null(extlock_cache_lookup(&locks, b.node.ext, b.mode));

    /* A is done: B no longer waits locally, but still asks the coordinator */
    extlock_itree_remove(&active, &a.node);
    assert_false(extlock_local_must_wait(&active, &b));
    assert_null(extlock_cache_lookup(&locks, b.node.ext, b.mode));
    assert_null(extlock_cache_lookup(&locks, c.node.ext, c.mode));

    extlock_itree_remove(&active, &b.node);
    extlock_itree_remove(&active, &c.node);
    free_tree(&locks);
}

static void test_local_order(void **state)
{
    ExtlockITree active = { 0 };
    ExtlockLocalReq r1 = { .node.ext = ext(0, 8 * KiB), .seq = 10,
                           .mode = EXTLOCK_MODE_SHARED };
    ExtlockLocalReq r2 = { .node.ext = ext(4 * KiB, 12 * KiB), .seq = 11,
                           .mode = EXTLOCK_MODE_SHARED };
    ExtlockLocalReq w3 = { .node.ext = ext(8 * KiB, 16 * KiB), .seq = 12,
                           .mode = EXTLOCK_MODE_EXCLUSIVE };
    ExtlockLocalReq w4 = { .node.ext = ext(16 * KiB, 20 * KiB), .seq = 13,
                           .mode = EXTLOCK_MODE_EXCLUSIVE };

    (void)state;
    extlock_itree_insert(&active, &r1.node);
    extlock_itree_insert(&active, &r2.node);
    extlock_itree_insert(&active, &w3.node);
    extlock_itree_insert(&active, &w4.node);
    assert_false(extlock_local_must_wait(&active, &r1));
    assert_false(extlock_local_must_wait(&active, &r2));  /* readers share */
    assert_true(extlock_local_must_wait(&active, &w3));   /* behind r2 */
    assert_false(extlock_local_must_wait(&active, &w4));  /* adjacent only */
    extlock_itree_remove(&active, &r2.node);
    assert_false(extlock_local_must_wait(&active, &w3));
    /* a later request never holds up an earlier one */
    assert_false(extlock_local_must_wait(&active, &r1));
    extlock_itree_remove(&active, &r1.node);
    extlock_itree_remove(&active, &w3.node);
    extlock_itree_remove(&active, &w4.node);
}

static void test_revoke_part(void **state)
{
    static const struct {
        ExtlockExtent lock, want, used, part;
    } cases[] = {
        /* used on the left of the wanted part: give back want.start.. */
        { { 0, 64 * MiB }, { 32 * MiB, 33 * MiB }, { 0, 1 * MiB },
          { 32 * MiB, 64 * MiB } },
        /* used on the right: give back ..want.end */
        { { 0, 64 * MiB }, { 1 * MiB, 2 * MiB }, { 40 * MiB, 41 * MiB },
          { 0, 2 * MiB } },
        /* used touches the wanted part: all of it */
        { { 0, 64 * MiB }, { 1 * MiB, 2 * MiB }, { 1 * MiB, 3 * MiB },
          { 0, 64 * MiB } },
        /* used on both sides: all of it */
        { { 0, 64 * MiB }, { 8 * MiB, 9 * MiB }, { 0, 16 * MiB },
          { 0, 64 * MiB } },
        /* nothing used: all of it */
        { { 0, 64 * MiB }, { 8 * MiB, 9 * MiB }, { 0, 0 },
          { 0, 64 * MiB } },
        /* wanted part reaches beyond the lock: clipped */
        { { 4 * MiB, 8 * MiB }, { 6 * MiB, 12 * MiB }, { 4 * MiB, 5 * MiB },
          { 6 * MiB, 8 * MiB } },
        /* wanted part starts at the lock's start: no head to keep */
        { { 4 * MiB, 8 * MiB }, { 0, 5 * MiB }, { 7 * MiB, 8 * MiB },
          { 4 * MiB, 5 * MiB } },
        /* wanted part outside the lock (stale revoke): all of it */
        { { 4 * MiB, 8 * MiB }, { 9 * MiB, 10 * MiB }, { 4 * MiB, 5 * MiB },
          { 4 * MiB, 8 * MiB } },
    };

    (void)state;
    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        ExtlockExtent p = extlock_cache_revoke_part(cases[i].lock,
                                                    cases[i].want,
                                                    cases[i].used);
        if (p.start != cases[i].part.start || p.end != cases[i].part.end) {
            fail_msg("case %zu: got [%" PRIu64 ", %" PRIu64 ")", i, p.start,
                     p.end);
        }
        /* always a head, a tail or all: the rest stays one extent */
        assert_true(p.start == cases[i].lock.start ||
                    p.end == cases[i].lock.end);
    }
}

/* Lock growth stops at ranges other hosts recently wanted of ours */
static void test_grow_limit(void **state)
{
    const uint64_t K = 64 * 1024;
    static const ExtlockExtent none[1] = { { 0, 0 } };
    /* neighbours 0 and 2 of a host writing extent 1 took theirs from us */
    const ExtlockExtent nb[] = { { 0, K }, { 2 * K, 3 * K } };
    /* one far away on each side, one near, in no particular order */
    const ExtlockExtent mixed[] = { { 100 * K, 101 * K }, { 1 * K, 2 * K },
                                    { 40 * K, 41 * K }, { 12 * K, 13 * K } };
    /* one overlapping the request, sticking out on both sides */
    const ExtlockExtent over[] = { { 5 * K, 9 * K } };
    ExtlockExtent r;

    (void)state;
    /* nothing contended: the whole limit, as before */
    r = extlock_cache_grow_limit((ExtlockExtent) { K, 2 * K },
                                 (ExtlockExtent) { 0, 1024 * K }, none, 0);
    assert_int_equal(r.start, 0);
    assert_int_equal(r.end, 1024 * K);
    /* empty contended extents are ignored */
    r = extlock_cache_grow_limit((ExtlockExtent) { K, 2 * K },
                                 (ExtlockExtent) { 0, 1024 * K }, none, 1);
    assert_int_equal(r.start, 0);
    assert_int_equal(r.end, 1024 * K);
    /* between two contended neighbours: exactly our extent */
    r = extlock_cache_grow_limit((ExtlockExtent) { K, 2 * K },
                                 (ExtlockExtent) { 0, 1024 * K }, nb, 2);
    assert_int_equal(r.start, K);
    assert_int_equal(r.end, 2 * K);
    /* the nearest contended extent on each side wins */
    r = extlock_cache_grow_limit((ExtlockExtent) { 20 * K, 21 * K },
                                 (ExtlockExtent) { 0, 1024 * K }, mixed, 4);
    assert_int_equal(r.start, 13 * K);
    assert_int_equal(r.end, 40 * K);
    /* overlapping the request: no growth on either side */
    r = extlock_cache_grow_limit((ExtlockExtent) { 6 * K, 8 * K },
                                 (ExtlockExtent) { 0, 1024 * K }, over, 1);
    assert_int_equal(r.start, 6 * K);
    assert_int_equal(r.end, 8 * K);
    /* the result always covers the request, even outside the limit */
    r = extlock_cache_grow_limit((ExtlockExtent) { 2000 * K, 2001 * K },
                                 (ExtlockExtent) { 0, 1024 * K }, nb, 2);
    assert_int_equal(r.start, 2 * K + K);
    assert_int_equal(r.end, 2001 * K);
}

/* log2 buckets: 0 us, [1, 2), [2, 4), ... and an open last bucket */
static void test_histogram(void **state)
{
    ExtlockHist h = { 0 };

    (void)state;
    assert_int_equal(extlock_hist_bucket(0), 0);
    assert_int_equal(extlock_hist_bucket(1), 1);
    assert_int_equal(extlock_hist_bucket(2), 2);
    assert_int_equal(extlock_hist_bucket(3), 2);
    assert_int_equal(extlock_hist_bucket(4), 3);
    assert_int_equal(extlock_hist_bucket(1023), 10);
    assert_int_equal(extlock_hist_bucket(1024), 11);
    assert_int_equal(extlock_hist_bucket((1ULL << 31) - 1), 31);
    assert_int_equal(extlock_hist_bucket(1ULL << 31), 32);
    assert_int_equal(extlock_hist_bucket(UINT64_MAX), EXTLOCK_HIST_BUCKETS - 1);

    assert_int_equal(extlock_hist_quantile_bound(&h, 0.5), 0);
    for (int i = 0; i < 99; i++) {
        extlock_hist_add(&h, 100);          /* bucket 7: [64, 128) */
    }
    extlock_hist_add(&h, 5000000);          /* bucket 23 */
    assert_int_equal(h.count, 100);
    assert_int_equal(h.sum_us, 99 * 100 + 5000000);
    assert_int_equal(h.max_us, 5000000);
    assert_int_equal(h.buckets[7], 99);
    assert_int_equal(h.buckets[23], 1);
    assert_int_equal(extlock_hist_quantile_bound(&h, 0.5), 128);
    assert_int_equal(extlock_hist_quantile_bound(&h, 0.99), 128);
    assert_int_equal(extlock_hist_quantile_bound(&h, 1.0), 1 << 23);
    extlock_hist_add(&h, UINT64_MAX / 2);
    assert_true(extlock_hist_quantile_bound(&h, 1.0) == UINT64_MAX);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lookup_modes),
        cmocka_unit_test(test_lookup_skips_stale),
        cmocka_unit_test(test_new_request_racing_revoke),
        cmocka_unit_test(test_local_order),
        cmocka_unit_test(test_revoke_part),
        cmocka_unit_test(test_grow_limit),
        cmocka_unit_test(test_histogram),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
