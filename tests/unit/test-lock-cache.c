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
    ExtlockITree locks = { 0 };
    ExtlockLocalSet active = { 0 };
    ExtlockCacheEntry *l = entry(&locks, 0, 64 * MiB, EXTLOCK_MODE_EXCLUSIVE);
    ExtlockLocalReq a = { .node.ext = ext(0, 64 * KiB), .seq = 1,
                          .mode = EXTLOCK_MODE_EXCLUSIVE };
    ExtlockLocalReq b = { .node.ext = ext(32 * KiB, 96 * KiB), .seq = 2,
                          .mode = EXTLOCK_MODE_SHARED };
    ExtlockLocalReq c = { .node.ext = ext(1 * MiB, 1 * MiB + 4 * KiB),
                          .seq = 3, .mode = EXTLOCK_MODE_EXCLUSIVE };

    (void)state;
    /* A is served by the cached lock */
    extlock_local_insert(&active, &a);
    assert_false(extlock_local_must_wait(&active, &a));
    assert_ptr_equal(extlock_cache_lookup(&locks, a.node.ext, a.mode), l);

    /* C (no overlap with A) is served before the revoke arrives */
    extlock_local_insert(&active, &c);
    assert_false(extlock_local_must_wait(&active, &c));
    assert_ptr_equal(extlock_cache_lookup(&locks, c.node.ext, c.mode), l);

    /* the revoke arrives; then B */
    l->revoking = true;
    extlock_local_insert(&active, &b);
    assert_true(extlock_local_must_wait(&active, &b));
    assert_null(extlock_cache_lookup(&locks, b.node.ext, b.mode));

    /* A is done: B no longer waits locally, but still asks the coordinator */
    extlock_local_remove(&active, &a);
    assert_false(extlock_local_must_wait(&active, &b));
    assert_null(extlock_cache_lookup(&locks, b.node.ext, b.mode));
    assert_null(extlock_cache_lookup(&locks, c.node.ext, c.mode));

    extlock_local_remove(&active, &b);
    extlock_local_remove(&active, &c);
    free_tree(&locks);
}

static void test_local_order(void **state)
{
    ExtlockLocalSet active = { 0 };
    ExtlockLocalReq r1 = { .node.ext = ext(0, 8 * KiB), .seq = 10,
                           .mode = EXTLOCK_MODE_SHARED };
    ExtlockLocalReq r2 = { .node.ext = ext(4 * KiB, 12 * KiB), .seq = 11,
                           .mode = EXTLOCK_MODE_SHARED };
    ExtlockLocalReq w3 = { .node.ext = ext(8 * KiB, 16 * KiB), .seq = 12,
                           .mode = EXTLOCK_MODE_EXCLUSIVE };
    ExtlockLocalReq w4 = { .node.ext = ext(16 * KiB, 20 * KiB), .seq = 13,
                           .mode = EXTLOCK_MODE_EXCLUSIVE };

    (void)state;
    extlock_local_insert(&active, &r1);
    extlock_local_insert(&active, &r2);
    extlock_local_insert(&active, &w3);
    extlock_local_insert(&active, &w4);
    assert_false(extlock_local_must_wait(&active, &r1));
    assert_false(extlock_local_must_wait(&active, &r2));  /* readers share */
    assert_true(extlock_local_must_wait(&active, &w3));   /* behind r2 */
    assert_false(extlock_local_must_wait(&active, &w4));  /* adjacent only */
    extlock_local_remove(&active, &r2);
    assert_false(extlock_local_must_wait(&active, &w3));
    /* a later request never holds up an earlier one */
    assert_false(extlock_local_must_wait(&active, &r1));
    extlock_local_remove(&active, &r1);
    extlock_local_remove(&active, &w3);
    extlock_local_remove(&active, &w4);
    assert_int_equal(extlock_local_count(&active), 0);
}

/*
 * The shortcuts of the check: a request alone never waits, nor does a
 * reader while no writer is active; but a reader behind the one active
 * writer does, and a writer behind readers.
 */
static void test_local_shortcuts(void **state)
{
    ExtlockLocalSet set = { 0 };
    ExtlockLocalReq r0 = { .node.ext = ext(0, 8 * KiB), .seq = 1,
                           .mode = EXTLOCK_MODE_SHARED };
    ExtlockLocalReq w = { .node.ext = ext(0, 8 * KiB), .seq = 2,
                          .mode = EXTLOCK_MODE_EXCLUSIVE };
    ExtlockLocalReq r1 = { .node.ext = ext(4 * KiB, 12 * KiB), .seq = 3,
                           .mode = EXTLOCK_MODE_SHARED };

    (void)state;
    extlock_local_insert(&set, &w);
    assert_false(extlock_local_must_wait(&set, &w));     /* alone */
    extlock_local_insert(&set, &r1);
    assert_int_equal(set.nexcl, 1);
    assert_true(extlock_local_must_wait(&set, &r1));     /* behind w */
    extlock_local_remove(&set, &w);
    assert_int_equal(set.nexcl, 0);
    assert_false(extlock_local_must_wait(&set, &r1));
    extlock_local_insert(&set, &r0);     /* an earlier reader, for the test */
    assert_false(extlock_local_must_wait(&set, &r1));    /* readers only */
    extlock_local_insert(&set, &w);
    assert_true(extlock_local_must_wait(&set, &w));      /* behind r0 */
    assert_false(extlock_local_must_wait(&set, &r0));
    extlock_local_remove(&set, &r0);
    extlock_local_remove(&set, &r1);
    extlock_local_remove(&set, &w);
    assert_int_equal(extlock_local_count(&set), 0);
    assert_int_equal(set.nexcl, 0);
}

/* The answer of extlock_local_must_wait(), by brute force */
static bool oracle_must_wait(ExtlockLocalReq **reqs, size_t n,
                             const ExtlockLocalReq *req)
{
    for (size_t i = 0; i < n; i++) {
        const ExtlockLocalReq *o = reqs[i];

        if (o->seq < req->seq &&
            extlock_extents_overlap(o->node.ext, req->node.ext) &&
            extlock_modes_conflict(o->mode, req->mode)) {
            return true;
        }
    }
    return false;
}

static void check_all(ExtlockLocalSet *set, ExtlockLocalReq **reqs, size_t n)
{
    size_t nexcl = 0;

    for (size_t i = 0; i < n; i++) {
        nexcl += reqs[i]->mode == EXTLOCK_MODE_EXCLUSIVE;
    }
    assert_int_equal(set->nexcl, nexcl);
    assert_int_equal(extlock_local_count(set), n);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(extlock_local_must_wait(set, reqs[i]),
                         oracle_must_wait(reqs, n, reqs[i]));
    }
}

/*
 * The local set against brute force: random requests (small extents in a
 * small range, so that they overlap often; both modes) come and go in
 * random order, the queue depth sweeping from empty to beyond the flat
 * array (the set moves into its tree) and back to empty (the set returns
 * to the array), several times.  After every step every active request
 * gets the oracle's answer.
 */
static void test_local_set_vs_oracle(void **state)
{
    enum { MAXQ = 3 * EXTLOCK_LOCAL_FLAT_MAX };
    ExtlockLocalSet set;
    ExtlockLocalReq pool[MAXQ];
    ExtlockLocalReq *act[MAXQ];
    size_t n = 0;
    uint64_t seq = 1;
    bool saw_tree = false, back_to_flat = false;
    GRand *rng = g_rand_new_with_seed(16);

    (void)state;
    extlock_local_init(&set);
    for (int round = 0; round < 6; round++) {
        /* up to a depth below, at or above the flat array's size */
        size_t top = (size_t[]){ 8, EXTLOCK_LOCAL_FLAT_MAX,
                                 EXTLOCK_LOCAL_FLAT_MAX + 1, MAXQ,
                                 EXTLOCK_LOCAL_FLAT_MAX / 2, MAXQ }[round];

        while (n < top) {
            ExtlockLocalReq *r = NULL;
            uint64_t start = g_rand_int_range(rng, 0, 256) * 4 * KiB;

            /* a free slot of the pool */
            for (size_t i = 0; i < MAXQ && !r; i++) {
                bool used = false;

                for (size_t j = 0; j < n && !used; j++) {
                    used = act[j] == &pool[i];
                }
                r = used ? NULL : &pool[i];
            }
            assert_non_null(r);
            memset(r, 0, sizeof(*r));
            r->node.ext = ext(start, start +
                              g_rand_int_range(rng, 1, 5) * 4 * KiB);
            r->seq = seq++;
            /* rounds 0 and 4 mostly readers: writers come and go alone */
            r->mode = g_rand_int_range(rng, 0, round % 4 ? 2 : 16) == 0
                      ? EXTLOCK_MODE_EXCLUSIVE : EXTLOCK_MODE_SHARED;
            extlock_local_insert(&set, r);
            act[n++] = r;
            saw_tree |= set.in_tree;
            check_all(&set, act, n);
        }
        assert_int_equal(set.in_tree, n > EXTLOCK_LOCAL_FLAT_MAX);
        /* remove in random order down to nothing */
        while (n > 0) {
            size_t k = g_rand_int_range(rng, 0, n);

            extlock_local_remove(&set, act[k]);
            act[k] = act[--n];
            check_all(&set, act, n);
        }
        /* the tree is empty and the set works from its array again */
        back_to_flat |= saw_tree && !set.in_tree;
        assert_false(set.in_tree);
        assert_null(set.tree.root);
    }
    assert_true(saw_tree);
    assert_true(back_to_flat);
    g_rand_free(rng);
}

/*
 * The filter in front of the conflict check (EXTLOCK_LOCAL_BUCKETS
 * buckets of 64 KiB blocks).  Each case is one the filter must not
 * answer "nobody else" for, or one where it must still search:
 *  - two writes 16 MiB apart fall into the same bucket but share no
 *    block: the search runs and finds no conflict;
 *  - an earlier write over 32 MiB is in every bucket (nwide): a later
 *    write inside it must wait, though its own bucket counts only itself;
 *  - a write over two blocks whose second block is shared with an
 *    earlier write must wait (every block of a request is looked at);
 *  - the counts return to zero when the set is empty.
 */
static void test_local_filter(void **state)
{
    const uint64_t span = EXTLOCK_LOCAL_BUCKETS *
                          (1ULL << EXTLOCK_LOCAL_BLOCK_SHIFT);
    ExtlockLocalSet set;
    ExtlockLocalReq a = { .node.ext = ext(0, 4 * KiB), .seq = 1,
                          .mode = EXTLOCK_MODE_EXCLUSIVE };
    ExtlockLocalReq b = { .node.ext = ext(span, span + 4 * KiB), .seq = 2,
                          .mode = EXTLOCK_MODE_EXCLUSIVE };
    ExtlockLocalReq wide = { .node.ext = ext(64 * MiB, 96 * MiB), .seq = 3,
                             .mode = EXTLOCK_MODE_EXCLUSIVE };
    ExtlockLocalReq in = { .node.ext = ext(81 * MiB + 4 * KiB,
                                           81 * MiB + 8 * KiB), .seq = 4,
                           .mode = EXTLOCK_MODE_EXCLUSIVE };
    ExtlockLocalReq two = { .node.ext = ext(60 * KiB, 68 * KiB), .seq = 5,
                            .mode = EXTLOCK_MODE_EXCLUSIVE };
    ExtlockLocalReq next = { .node.ext = ext(64 * KiB, 72 * KiB), .seq = 0,
                             .mode = EXTLOCK_MODE_EXCLUSIVE };

    (void)state;
    extlock_local_init(&set);
    extlock_local_insert(&set, &a);
    extlock_local_insert(&set, &b);
    assert_int_equal(set.buckets[0], 2);    /* same bucket ... */
    assert_false(extlock_local_must_wait(&set, &b));  /* ... no overlap */

    extlock_local_insert(&set, &wide);
    assert_int_equal(set.nwide, 1);
    extlock_local_insert(&set, &in);
    /* @in's own bucket holds only @in: the wide write is what it waits for */
    assert_int_equal(set.buckets[(81 * MiB >> EXTLOCK_LOCAL_BLOCK_SHIFT) %
                                 EXTLOCK_LOCAL_BUCKETS], 1);
    assert_true(extlock_local_must_wait(&set, &in));
    extlock_local_remove(&set, &wide);
    assert_false(extlock_local_must_wait(&set, &in));

    /* @next (earlier, seq 0) shares only @two's second block */
    extlock_local_remove(&set, &a);
    extlock_local_remove(&set, &b);
    extlock_local_insert(&set, &next);
    extlock_local_insert(&set, &two);
    assert_true(extlock_local_must_wait(&set, &two));

    extlock_local_remove(&set, &in);
    extlock_local_remove(&set, &two);
    extlock_local_remove(&set, &next);
    assert_int_equal(set.nwide, 0);
    for (size_t i = 0; i < EXTLOCK_LOCAL_BUCKETS; i++) {
        assert_int_equal(set.buckets[i], 0);
    }
}

/*
 * The filter against brute force: requests scattered over 64 MiB (so
 * that blocks share buckets), some of them wide (over 16-24 MiB), both
 * modes, coming and going in random order up to beyond the flat array.
 */
static void test_local_filter_vs_oracle(void **state)
{
    enum { MAXQ = 2 * EXTLOCK_LOCAL_FLAT_MAX };
    ExtlockLocalSet set;
    ExtlockLocalReq pool[MAXQ];
    ExtlockLocalReq *act[MAXQ];
    ExtlockLocalReq *free_list[MAXQ];
    size_t n = 0, nfree = MAXQ;
    uint64_t seq = 1;
    GRand *rng = g_rand_new_with_seed(1603);

    (void)state;
    extlock_local_init(&set);
    for (size_t i = 0; i < MAXQ; i++) {
        free_list[i] = &pool[i];
    }
    for (int step = 0; step < 4000; step++) {
        bool add = n == 0 || (n < MAXQ && g_rand_int_range(rng, 0, 2));

        if (add) {
            ExtlockLocalReq *r = free_list[--nfree];
            uint64_t start = g_rand_int_range(rng, 0, 16384) * 4 * KiB;
            uint64_t len = g_rand_int_range(rng, 0, 20) == 0
                           ? g_rand_int_range(rng, 16, 25) * MiB
                           : g_rand_int_range(rng, 1, 33) * 4 * KiB;

            memset(r, 0, sizeof(*r));
            r->node.ext = ext(start, start + len);
            r->seq = seq++;
            r->mode = g_rand_int_range(rng, 0, 3) == 0
                      ? EXTLOCK_MODE_SHARED : EXTLOCK_MODE_EXCLUSIVE;
            extlock_local_insert(&set, r);
            act[n++] = r;
        } else {
            size_t k = g_rand_int_range(rng, 0, n);

            extlock_local_remove(&set, act[k]);
            free_list[nfree++] = act[k];
            act[k] = act[--n];
        }
        check_all(&set, act, n);
    }
    g_rand_free(rng);
}

/*
 * Moving into the tree keeps every request's answer, and removing a
 * request from the middle of the flat array moves the last one into its
 * slot without losing it.
 */
static void test_local_set_edges(void **state)
{
    ExtlockLocalSet set = { 0 };
    ExtlockLocalReq r[EXTLOCK_LOCAL_FLAT_MAX + 1];
    ExtlockLocalReq late = { .node.ext = ext(0, 4 * KiB), .seq = 1000,
                             .mode = EXTLOCK_MODE_SHARED };

    (void)state;
    /* disjoint readers; the last one overlaps the first */
    for (size_t i = 0; i < EXTLOCK_LOCAL_FLAT_MAX; i++) {
        r[i] = (ExtlockLocalReq) { .node.ext = ext(i * 8 * KiB,
                                                   i * 8 * KiB + 4 * KiB),
                                   .seq = i + 1,
                                   .mode = EXTLOCK_MODE_SHARED };
        extlock_local_insert(&set, &r[i]);
    }
    r[0].mode = EXTLOCK_MODE_SHARED;
    /* a writer over the last reader waits; the middle one is removed */
    extlock_local_remove(&set, &r[1]);
    assert_int_equal(extlock_local_count(&set), EXTLOCK_LOCAL_FLAT_MAX - 1);
    assert_ptr_equal(set.flat[1].req, &r[EXTLOCK_LOCAL_FLAT_MAX - 1]);
    extlock_local_insert(&set, &r[1]);          /* back, full again */
    assert_false(set.in_tree);
    r[EXTLOCK_LOCAL_FLAT_MAX] = (ExtlockLocalReq) {
        .node.ext = ext((EXTLOCK_LOCAL_FLAT_MAX - 1) * 8 * KiB,
                        (EXTLOCK_LOCAL_FLAT_MAX - 1) * 8 * KiB + 4 * KiB),
        .seq = EXTLOCK_LOCAL_FLAT_MAX + 1, .mode = EXTLOCK_MODE_EXCLUSIVE };
    assert_false(set.in_tree);
    extlock_local_insert(&set, &r[EXTLOCK_LOCAL_FLAT_MAX]);
    assert_true(set.in_tree);
    assert_int_equal(set.tree.count, EXTLOCK_LOCAL_FLAT_MAX + 1);
    assert_true(extlock_local_must_wait(&set, &r[EXTLOCK_LOCAL_FLAT_MAX]));
    /* a reader arriving late over r[0] does not wait for readers */
    extlock_local_insert(&set, &late);
    assert_false(extlock_local_must_wait(&set, &late));
    extlock_local_remove(&set, &late);
    extlock_local_remove(&set, &r[EXTLOCK_LOCAL_FLAT_MAX - 1]);
    assert_false(extlock_local_must_wait(&set, &r[EXTLOCK_LOCAL_FLAT_MAX]));
    for (size_t i = 0; i <= EXTLOCK_LOCAL_FLAT_MAX; i++) {
        if (i != EXTLOCK_LOCAL_FLAT_MAX - 1) {
            extlock_local_remove(&set, &r[i]);
        }
    }
    assert_int_equal(extlock_local_count(&set), 0);
    assert_false(set.in_tree);
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
        /*
         * the wanted part reaches the unused end: a neighbour writing
         * sequentially into the head this lock grew over gets all of the
         * head up to the used span at once, not 4 KiB per revoke
         */
        { { 4 * KiB, 128 * KiB }, { 4 * KiB, 8 * KiB },
          { 64 * KiB, 68 * KiB }, { 4 * KiB, 64 * KiB } },
        { { 0, 128 * KiB }, { 124 * KiB, 128 * KiB }, { 0, 64 * KiB },
          { 64 * KiB, 128 * KiB } },
        /* used touches the wanted part: all of it */
        { { 0, 64 * MiB }, { 1 * MiB, 2 * MiB }, { 1 * MiB, 3 * MiB },
          { 0, 64 * MiB } },
        /* used on both sides: all of it */
        { { 0, 64 * MiB }, { 8 * MiB, 9 * MiB }, { 0, 16 * MiB },
          { 0, 64 * MiB } },
        /* nothing used: all of it */
        { { 0, 64 * MiB }, { 8 * MiB, 9 * MiB }, { 0, 0 },
          { 0, 64 * MiB } },
        /* wanted part reaches beyond the lock: clipped, up to the used */
        { { 4 * MiB, 8 * MiB }, { 6 * MiB, 12 * MiB }, { 4 * MiB, 5 * MiB },
          { 5 * MiB, 8 * MiB } },
        /* wanted part starts at the lock's start: up to the used span */
        { { 4 * MiB, 8 * MiB }, { 0, 5 * MiB }, { 7 * MiB, 8 * MiB },
          { 4 * MiB, 7 * MiB } },
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

/* A lock over a range another host recently wanted goes back after use */
static void test_contended(void **state)
{
    const uint64_t K = 64 * 1024;
    const ExtlockMode X = EXTLOCK_MODE_EXCLUSIVE, S = EXTLOCK_MODE_SHARED;
    /* a writer took [K, 2K) from us, a reader [4K, 5K); one slot unused */
    const ExtlockExtent c[] = { { K, 2 * K }, { 4 * K, 5 * K }, { 0, 0 } };
    const ExtlockMode m[] = { X, S, X };

    (void)state;
    /* nothing recent: cache it */
    assert_false(extlock_cache_contended((ExtlockExtent) { 0, 8 * K }, X,
                                         c, m, 0));
    /* overlapping the writer's range, in either mode */
    assert_true(extlock_cache_contended((ExtlockExtent) { 0, K + 1 }, X,
                                        c, m, 3));
    assert_true(extlock_cache_contended((ExtlockExtent) { 2 * K - 1, 3 * K },
                                        S, c, m, 3));
    /* touching is not overlapping (extents are half-open) */
    assert_false(extlock_cache_contended((ExtlockExtent) { 0, K }, X,
                                         c, m, 3));
    assert_false(extlock_cache_contended((ExtlockExtent) { 2 * K, 4 * K }, X,
                                         c, m, 3));
    /* the reader's range: only an exclusive lock conflicts with it */
    assert_true(extlock_cache_contended((ExtlockExtent) { 4 * K, 5 * K }, X,
                                        c, m, 3));
    assert_false(extlock_cache_contended((ExtlockExtent) { 4 * K, 5 * K }, S,
                                         c, m, 3));
    /* the empty slot matches nothing, even with an exclusive mode */
    assert_false(extlock_cache_contended((ExtlockExtent) { 0, K }, X,
                                         c + 2, m + 2, 1));
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
        cmocka_unit_test(test_local_shortcuts),
        cmocka_unit_test(test_local_set_vs_oracle),
        cmocka_unit_test(test_local_set_edges),
        cmocka_unit_test(test_local_filter),
        cmocka_unit_test(test_local_filter_vs_oracle),
        cmocka_unit_test(test_revoke_part),
        cmocka_unit_test(test_grow_limit),
        cmocka_unit_test(test_contended),
        cmocka_unit_test(test_histogram),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
