/*
 * extlock: unit tests for the interval tree
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <cmocka.h>
#include <glib.h>
#include "extlock/interval-tree.h"

typedef struct Collect {
    ExtlockITNode *nodes[4096];
    size_t n;
    size_t limit;               /* stop after this many (0: no limit) */
} Collect;

static bool collect_visit(ExtlockITNode *node, void *opaque)
{
    Collect *c = opaque;

    assert_true(c->n < G_N_ELEMENTS(c->nodes));
    c->nodes[c->n++] = node;
    return c->limit == 0 || c->n < c->limit;
}

static void query(ExtlockITree *tree, uint64_t start, uint64_t end,
                  Collect *c)
{
    ExtlockExtent q = { start, end };

    c->n = 0;
    extlock_itree_foreach_overlap(tree, q, collect_visit, c);
}

static ExtlockITNode *mknode(ExtlockITNode *n, uint64_t start, uint64_t end)
{
    memset(n, 0, sizeof(*n));
    n->ext.start = start;
    n->ext.end = end;
    return n;
}

static void test_mode_names(void **state)
{
    ExtlockMode m = EXTLOCK_MODE_SHARED;

    assert_string_equal(extlock_mode_name(EXTLOCK_MODE_SHARED), "shared");
    assert_string_equal(extlock_mode_name(EXTLOCK_MODE_EXCLUSIVE),
                        "exclusive");
    assert_true(extlock_mode_parse("exclusive", &m));
    assert_int_equal(m, EXTLOCK_MODE_EXCLUSIVE);
    assert_true(extlock_mode_parse("shared", &m));
    assert_int_equal(m, EXTLOCK_MODE_SHARED);
    m = EXTLOCK_MODE_EXCLUSIVE;
    assert_false(extlock_mode_parse("Shared", &m));
    assert_false(extlock_mode_parse("", &m));
    assert_false(extlock_mode_parse("exclusive ", &m));
    assert_false(extlock_mode_parse(NULL, &m));
    assert_int_equal(m, EXTLOCK_MODE_EXCLUSIVE);

    assert_true(extlock_extent_valid(0, 1));
    assert_true(extlock_extent_valid(0, EXTLOCK_EXTENT_END_MAX));
    assert_true(extlock_extent_valid(EXTLOCK_EXTENT_END_MAX - 1, 1));
    assert_false(extlock_extent_valid(0, 0));
    assert_false(extlock_extent_valid(EXTLOCK_EXTENT_END_MAX, 1));
    assert_false(extlock_extent_valid(1, EXTLOCK_EXTENT_END_MAX));
    assert_false(extlock_extent_valid(UINT64_MAX, 2));
}

static void test_empty(void **state)
{
    ExtlockITree tree = EXTLOCK_ITREE_INIT;
    Collect c = { .limit = 0 };

    assert_true(extlock_itree_check(&tree));
    assert_null(extlock_itree_first(&tree));
    query(&tree, 0, EXTLOCK_EXTENT_END_MAX, &c);
    assert_int_equal(c.n, 0);
}

static void test_edges(void **state)
{
    ExtlockITree tree = EXTLOCK_ITREE_INIT;
    ExtlockITNode a, b, big, top;
    Collect c = { .limit = 0 };

    extlock_itree_insert(&tree, mknode(&a, 0, 4096));
    extlock_itree_insert(&tree, mknode(&b, 4096, 8192));
    assert_true(extlock_itree_check(&tree));
    assert_int_equal(tree.count, 2);

    /* Touching extents do not overlap */
    query(&tree, 4096, 8192, &c);
    assert_int_equal(c.n, 1);
    assert_ptr_equal(c.nodes[0], &b);
    query(&tree, 0, 4096, &c);
    assert_int_equal(c.n, 1);
    assert_ptr_equal(c.nodes[0], &a);
    query(&tree, 8192, 9000, &c);
    assert_int_equal(c.n, 0);

    /* One byte of overlap does */
    query(&tree, 4095, 4097, &c);
    assert_int_equal(c.n, 2);
    assert_ptr_equal(c.nodes[0], &a);
    assert_ptr_equal(c.nodes[1], &b);
    query(&tree, 8191, 8192, &c);
    assert_int_equal(c.n, 1);
    assert_ptr_equal(c.nodes[0], &b);
    query(&tree, 4095, 4096, &c);
    assert_int_equal(c.n, 1);
    assert_ptr_equal(c.nodes[0], &a);

    /* Empty query extent overlaps nothing */
    query(&tree, 100, 100, &c);
    assert_int_equal(c.n, 0);

    /* Huge extents up to 2^63 */
    extlock_itree_insert(&tree, mknode(&big, 0, EXTLOCK_EXTENT_END_MAX));
    extlock_itree_insert(&tree, mknode(&top, EXTLOCK_EXTENT_END_MAX - 1,
                                       EXTLOCK_EXTENT_END_MAX));
    assert_true(extlock_itree_check(&tree));
    assert_int_equal(tree.root->subtree_max_end, EXTLOCK_EXTENT_END_MAX);
    query(&tree, EXTLOCK_EXTENT_END_MAX - 1, EXTLOCK_EXTENT_END_MAX, &c);
    assert_int_equal(c.n, 2);
    assert_ptr_equal(c.nodes[0], &big);
    assert_ptr_equal(c.nodes[1], &top);
    query(&tree, 10000, EXTLOCK_EXTENT_END_MAX - 1, &c);
    assert_int_equal(c.n, 1);
    assert_ptr_equal(c.nodes[0], &big);

    /* Early stop */
    c.limit = 2;
    query(&tree, 0, EXTLOCK_EXTENT_END_MAX, &c);
    assert_int_equal(c.n, 2);
    c.limit = 0;
    query(&tree, 0, EXTLOCK_EXTENT_END_MAX, &c);
    assert_int_equal(c.n, 4);

    extlock_itree_remove(&tree, &big);
    assert_true(extlock_itree_check(&tree));
    assert_int_equal(tree.root->subtree_max_end, EXTLOCK_EXTENT_END_MAX);
    extlock_itree_remove(&tree, &top);
    assert_true(extlock_itree_check(&tree));
    assert_int_equal(tree.root->subtree_max_end, 8192);
    query(&tree, 10000, EXTLOCK_EXTENT_END_MAX, &c);
    assert_int_equal(c.n, 0);
    extlock_itree_remove(&tree, &a);
    extlock_itree_remove(&tree, &b);
    assert_true(extlock_itree_check(&tree));
    assert_null(tree.root);
    assert_int_equal(tree.count, 0);
}

static void test_duplicates(void **state)
{
    ExtlockITree tree = EXTLOCK_ITREE_INIT;
    ExtlockITNode n[64];
    ExtlockITNode *it;
    Collect c = { .limit = 0 };
    size_t i, seen;

    for (i = 0; i < G_N_ELEMENTS(n); i++) {
        extlock_itree_insert(&tree, mknode(&n[i], 100, 200));
        assert_true(extlock_itree_check(&tree));
    }
    query(&tree, 150, 151, &c);
    assert_int_equal(c.n, G_N_ELEMENTS(n));
    /* Ties are ordered by node address, i.e. array order */
    for (i = 0; i < c.n; i++) {
        assert_ptr_equal(c.nodes[i], &n[i]);
    }
    seen = 0;
    for (it = extlock_itree_first(&tree); it; it = extlock_itree_next(it)) {
        assert_ptr_equal(it, &n[seen]);
        seen++;
    }
    assert_int_equal(seen, G_N_ELEMENTS(n));

    /* Remove every other one, then the rest */
    for (i = 0; i < G_N_ELEMENTS(n); i += 2) {
        extlock_itree_remove(&tree, &n[i]);
        assert_true(extlock_itree_check(&tree));
    }
    query(&tree, 0, 1000, &c);
    assert_int_equal(c.n, G_N_ELEMENTS(n) / 2);
    for (i = 0; i < c.n; i++) {
        assert_ptr_equal(c.nodes[i], &n[2 * i + 1]);
    }
    for (i = 1; i < G_N_ELEMENTS(n); i += 2) {
        extlock_itree_remove(&tree, &n[i]);
        assert_true(extlock_itree_check(&tree));
    }
    assert_int_equal(tree.count, 0);
}

/* The checker must notice corruption, or the other tests prove nothing */
static void test_check_detects_corruption(void **state)
{
    ExtlockITree tree = EXTLOCK_ITREE_INIT;
    ExtlockITNode n[16];
    ExtlockITNode *leaf;
    uint64_t saved;
    size_t i;

    for (i = 0; i < G_N_ELEMENTS(n); i++) {
        extlock_itree_insert(&tree, mknode(&n[i], i * 10, i * 10 + 5));
    }
    assert_true(extlock_itree_check(&tree));

    saved = tree.root->subtree_max_end;
    tree.root->subtree_max_end = saved + 1;
    assert_false(extlock_itree_check(&tree));
    tree.root->subtree_max_end = saved;
    assert_true(extlock_itree_check(&tree));

    tree.root->red = true;
    assert_false(extlock_itree_check(&tree));
    tree.root->red = false;

    tree.count++;
    assert_false(extlock_itree_check(&tree));
    tree.count--;

    leaf = extlock_itree_first(&tree);
    leaf->red = !leaf->red;
    assert_false(extlock_itree_check(&tree));
    leaf->red = !leaf->red;
    assert_true(extlock_itree_check(&tree));

    /* Break the BST order without touching the augmentation */
    saved = leaf->ext.start;
    leaf->ext.start = 1000;
    leaf->ext.end = 1001;
    assert_false(extlock_itree_check(&tree));
    leaf->ext.start = saved;
    leaf->ext.end = saved + 5;
    assert_true(extlock_itree_check(&tree));
}

/* Reference: nodes overlapping q sorted by (start, address) */
static int cmp_node(const void *a, const void *b)
{
    const ExtlockITNode *x = *(ExtlockITNode * const *)a;
    const ExtlockITNode *y = *(ExtlockITNode * const *)b;

    if (x->ext.start != y->ext.start) {
        return x->ext.start < y->ext.start ? -1 : 1;
    }
    if (x == y) {
        return 0;
    }
    return (uintptr_t)x < (uintptr_t)y ? -1 : 1;
}

static void check_against_reference(ExtlockITree *tree, ExtlockITNode *pool,
                                    const bool *in, size_t npool,
                                    ExtlockExtent q, Collect *c)
{
    static ExtlockITNode *ref[4096];
    size_t nref = 0, i;

    for (i = 0; i < npool; i++) {
        if (in[i] && extlock_extents_overlap(pool[i].ext, q)) {
            ref[nref++] = &pool[i];
        }
    }
    qsort(ref, nref, sizeof(ref[0]), cmp_node);
    query(tree, q.start, q.end, c);
    assert_int_equal(c->n, nref);
    for (i = 0; i < nref; i++) {
        assert_ptr_equal(c->nodes[i], ref[i]);
    }
}

static ExtlockExtent random_extent(GRand *r, uint64_t range, uint64_t maxlen)
{
    ExtlockExtent e;

    if (g_rand_int_range(r, 0, 50) == 0) {
        /* Occasionally something huge near the top of the address space */
        e.start = EXTLOCK_EXTENT_END_MAX - 1 -
                  (uint64_t)g_rand_int_range(r, 0, 1000);
        e.end = EXTLOCK_EXTENT_END_MAX -
                (uint64_t)g_rand_int_range(r, 0, 2);
        if (g_rand_boolean(r)) {
            e.start = (uint64_t)g_rand_int_range(r, 0, (gint32)range);
        }
        if (e.end <= e.start) {
            e.end = e.start + 1;
        }
        return e;
    }
    e.start = (uint64_t)g_rand_int_range(r, 0, (gint32)range);
    e.end = e.start + 1 + (uint64_t)g_rand_int_range(r, 0, (gint32)maxlen);
    return e;
}

static void run_random(guint32 seed, size_t npool, int steps,
                       uint64_t range, uint64_t maxlen)
{
    g_autoptr(GRand) r = g_rand_new_with_seed(seed);
    ExtlockITree tree = EXTLOCK_ITREE_INIT;
    g_autofree ExtlockITNode *pool = g_new0(ExtlockITNode, npool);
    g_autofree bool *in = g_new0(bool, npool);
    Collect *c = g_new0(Collect, 1);
    size_t count = 0;
    int step, k;

    for (step = 0; step < steps; step++) {
        size_t i = (size_t)g_rand_int_range(r, 0, (gint32)npool);

        if (in[i]) {
            extlock_itree_remove(&tree, &pool[i]);
            in[i] = false;
            count--;
        } else {
            pool[i].ext = random_extent(r, range, maxlen);
            extlock_itree_insert(&tree, &pool[i]);
            in[i] = true;
            count++;
        }
        assert_true(extlock_itree_check(&tree));
        assert_int_equal(tree.count, count);

        for (k = 0; k < 3; k++) {
            ExtlockExtent q = random_extent(r, range + maxlen, maxlen * 2);

            check_against_reference(&tree, pool, in, npool, q, c);
        }
        if (step % 64 == 0) {
            ExtlockITNode *it, *prev = NULL;
            size_t seen = 0;

            for (it = extlock_itree_first(&tree); it;
                 it = extlock_itree_next(it)) {
                assert_true(in[it - pool]);
                if (prev) {
                    assert_true(cmp_node(&prev, &it) < 0);
                }
                prev = it;
                seen++;
            }
            assert_int_equal(seen, count);
        }
    }

    /* Drain in random order */
    while (count > 0) {
        size_t i = (size_t)g_rand_int_range(r, 0, (gint32)npool);

        if (in[i]) {
            extlock_itree_remove(&tree, &pool[i]);
            in[i] = false;
            count--;
            assert_true(extlock_itree_check(&tree));
            check_against_reference(&tree, pool, in, npool,
                                    random_extent(r, range, maxlen), c);
        }
    }
    assert_null(tree.root);
    g_free(c);
}

static void test_random_small(void **state)
{
    guint32 seed;

    for (seed = 1; seed <= 200; seed++) {
        run_random(seed, 24, 400, 64, 16);
    }
}

static void test_random_large(void **state)
{
    guint32 seed;

    for (seed = 1000; seed < 1010; seed++) {
        run_random(seed, 1000, 6000, 1u << 20, 1u << 12);
    }
}

/* Sequential keys exercise the rebalancing paths heavily */
static void test_sequential(void **state)
{
    ExtlockITree tree = EXTLOCK_ITREE_INIT;
    g_autofree ExtlockITNode *n = g_new0(ExtlockITNode, 2048);
    Collect c = { .limit = 0 };
    size_t i;

    for (i = 0; i < 2048; i++) {
        extlock_itree_insert(&tree, mknode(&n[i], i * 4096,
                                           (i + 1) * 4096));
        assert_true(extlock_itree_check(&tree));
    }
    query(&tree, 4096 * 100 + 1, 4096 * 103, &c);
    assert_int_equal(c.n, 3);
    assert_ptr_equal(c.nodes[0], &n[100]);
    assert_ptr_equal(c.nodes[2], &n[102]);
    for (i = 2048; i-- > 0;) {
        extlock_itree_remove(&tree, &n[i]);
        assert_true(extlock_itree_check(&tree));
        if (i > 0) {
            assert_int_equal(tree.root->subtree_max_end, i * 4096);
        }
    }
    assert_int_equal(tree.count, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mode_names),
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_edges),
        cmocka_unit_test(test_duplicates),
        cmocka_unit_test(test_check_detects_corruption),
        cmocka_unit_test(test_sequential),
        cmocka_unit_test(test_random_small),
        cmocka_unit_test(test_random_large),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
