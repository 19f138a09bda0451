/*
 * extlock: unit tests for the timestamp-ordered lock table
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include <glib.h>
#include "extlock/lock-table.h"

#define SH EXTLOCK_MODE_SHARED
#define EX EXTLOCK_MODE_EXCLUSIVE

/* Per-test fixture: a table whose grant callback records a log */
typedef struct Fixture {
    ExtlockTable *table;
    GArray *log;                 /* ids granted through the callback */
    uint64_t token;
    uint64_t wait_us_sum;        /* sum of granted_us - queued_us seen */
    bool check_in_cb;
} Fixture;

static void grant_cb(ExtlockTable *table, ExtlockLock *lock, void *opaque)
{
    Fixture *f = opaque;
    g_autofree char *msg = NULL;

    assert_ptr_equal(table, f->table);
    assert_int_equal(lock->state, EXTLOCK_LOCK_GRANTED);
    assert_true(lock->granted_us >= lock->queued_us);
    assert_ptr_equal(extlock_table_lookup(table, lock->id), lock);
    f->wait_us_sum += (uint64_t)(lock->granted_us - lock->queued_us);
    g_array_append_val(f->log, lock->id);
    if (f->check_in_cb) {
        /* The table is consistent by the time callbacks run */
        if (!extlock_table_check(table, &msg)) {
            fail_msg("check in callback: %s", msg);
        }
    }
}

static int setup(void **state)
{
    Fixture *f = g_new0(Fixture, 1);

    f->table = extlock_table_new("test", grant_cb, f);
    f->log = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    f->check_in_cb = true;
    extlock_table_set_debug_checks(f->table, true);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    Fixture *f = *state;

    extlock_table_free(f->table);
    g_array_free(f->log, TRUE);
    g_free(f);
    return 0;
}

static ExtlockExtent ext(uint64_t start, uint64_t end)
{
    ExtlockExtent e = { start, end };

    return e;
}

static ExtlockLock *req_owner(Fixture *f, uint64_t start, uint64_t end,
                              ExtlockMode mode, void *owner)
{
    uint64_t token = ++f->token;
    ExtlockLock *l = extlock_table_request(f->table, ext(start, end), mode,
                                           token, owner, token * 10);

    assert_non_null(l);
    assert_int_equal(l->token, f->token);
    assert_int_equal(l->user_tag, f->token * 10);
    assert_ptr_equal(l->owner, owner);
    assert_int_equal(l->mode, mode);
    assert_int_equal(l->node.ext.start, start);
    assert_int_equal(l->node.ext.end, end);
    assert_int_equal(l->requested.start, start);
    assert_int_equal(l->requested.end, end);
    assert_int_equal(l->limit.start, start);
    assert_int_equal(l->limit.end, end);
    assert_ptr_equal(extlock_table_lookup(f->table, l->id), l);
    return l;
}

static ExtlockLock *req(Fixture *f, uint64_t start, uint64_t end,
                        ExtlockMode mode)
{
    return req_owner(f, start, end, mode, f);
}

/* A request that may grow into [lstart, lend) */
static ExtlockLock *req_grow(Fixture *f, uint64_t start, uint64_t end,
                             uint64_t lstart, uint64_t lend, ExtlockMode mode)
{
    uint64_t token = ++f->token;
    ExtlockLock *l = extlock_table_request_grow(f->table, ext(start, end),
                                                ext(lstart, lend), mode,
                                                token, f, token * 10);

    assert_non_null(l);
    assert_int_equal(l->token, token);
    assert_int_equal(l->user_tag, token * 10);
    assert_int_equal(l->mode, mode);
    assert_int_equal(l->requested.start, start);
    assert_int_equal(l->requested.end, end);
    assert_int_equal(l->limit.start, lstart);
    assert_int_equal(l->limit.end, lend);
    if (l->state == EXTLOCK_LOCK_WAITING) {
        assert_int_equal(l->node.ext.start, start);
        assert_int_equal(l->node.ext.end, end);
    }
    assert_ptr_equal(extlock_table_lookup(f->table, l->id), l);
    return l;
}

#define assert_extent(l, s, e) do { \
        assert_int_equal((l)->node.ext.start, (s)); \
        assert_int_equal((l)->node.ext.end, (e)); \
    } while (0)

static void assert_table_ok(ExtlockTable *table)
{
    g_autofree char *msg = NULL;

    if (!extlock_table_check(table, &msg)) {
        fail_msg("table check failed: %s", msg);
    }
}

/* Assert the grant log is exactly the given ids, then clear it */
static void expect_log(Fixture *f, size_t n, ...)
{
    va_list ap;
    size_t i;

    assert_int_equal(f->log->len, n);
    va_start(ap, n);
    for (i = 0; i < n; i++) {
        uint64_t id = va_arg(ap, ExtlockLock *)->id;

        assert_int_equal(g_array_index(f->log, uint64_t, i), id);
    }
    va_end(ap);
    g_array_set_size(f->log, 0);
}

#define GRANTED(l) ((l)->state == EXTLOCK_LOCK_GRANTED)

/* ------------------------------------------------------------------ */

static void test_mode_matrix(void **state)
{
    static const ExtlockMode modes[] = { SH, EX };
    size_t i, j;

    assert_false(extlock_modes_conflict(SH, SH));
    assert_true(extlock_modes_conflict(SH, EX));
    assert_true(extlock_modes_conflict(EX, SH));
    assert_true(extlock_modes_conflict(EX, EX));

    for (i = 0; i < 2; i++) {
        for (j = 0; j < 2; j++) {
            Fixture *f;
            ExtlockLock *a, *b, *c;

            setup((void **)&f);
            a = req(f, 0, 100, modes[i]);
            assert_true(GRANTED(a));
            b = req(f, 50, 150, modes[j]);
            assert_int_equal(GRANTED(b),
                             !extlock_modes_conflict(modes[i], modes[j]));
            /* Disjoint extents never conflict */
            c = req(f, 150, 200, EX);
            assert_true(GRANTED(c));
            /* Same owner conflicts like anybody else */
            c = req_owner(f, 1000, 1100, modes[i], f);
            assert_true(GRANTED(c));
            c = req_owner(f, 1099, 1200, modes[j], f);
            assert_int_equal(GRANTED(c),
                             !extlock_modes_conflict(modes[i], modes[j]));
            assert_table_ok(f->table);
            teardown((void **)&f);
        }
    }
}

static void test_ids_and_lookup(void **state)
{
    Fixture *f = *state;
    ExtlockLock *a, *b;

    assert_string_equal(extlock_table_name(f->table), "test");
    a = req(f, 0, 10, EX);
    b = req(f, 0, 10, EX);
    assert_int_equal(a->id, 1);
    assert_int_equal(b->id, 2);
    assert_true(GRANTED(a));
    assert_int_equal(a->granted_us, a->queued_us);
    assert_false(GRANTED(b));
    assert_int_equal(b->granted_us, 0);
    assert_null(extlock_table_lookup(f->table, 0));
    assert_null(extlock_table_lookup(f->table, 3));
    extlock_table_release(f->table, a);
    expect_log(f, 1, b);
    assert_null(extlock_table_lookup(f->table, 1));
    assert_ptr_equal(extlock_table_lookup(f->table, 2), b);
    a = req(f, 20, 30, SH);
    assert_int_equal(a->id, 3);
}

static void test_edge_overlaps(void **state)
{
    Fixture *f = *state;
    ExtlockLock *a, *b, *c, *d, *top, *all;

    a = req(f, 0, 4096, EX);
    b = req(f, 4096, 8192, EX);
    assert_true(GRANTED(a));
    assert_true(GRANTED(b));
    c = req(f, 4095, 4096, SH);          /* last byte of a */
    assert_false(GRANTED(c));
    d = req(f, 8192, 8193, EX);          /* touches b */
    assert_true(GRANTED(d));
    top = req(f, EXTLOCK_EXTENT_END_MAX - 1, EXTLOCK_EXTENT_END_MAX, EX);
    assert_true(GRANTED(top));
    all = req(f, 0, EXTLOCK_EXTENT_END_MAX, SH);
    assert_false(GRANTED(all));

    extlock_table_release(f->table, b);
    expect_log(f, 0);
    extlock_table_release(f->table, a);
    expect_log(f, 1, c);
    extlock_table_release(f->table, d);
    expect_log(f, 0);
    extlock_table_release(f->table, top);
    expect_log(f, 1, all);
}

/* ------------------------------------------------------------------ */

typedef struct Snapshot {
    GString *s;
} Snapshot;

static void snap_one(ExtlockLock *l, void *opaque)
{
    g_string_append_printf(opaque, "%" G_GUINT64_FORMAT ":%d:%d:%"
                           G_GUINT64_FORMAT "-%" G_GUINT64_FORMAT ":%"
                           G_GUINT64_FORMAT ":%" G_GUINT64_FORMAT "-%"
                           G_GUINT64_FORMAT ":%" G_GUINT64_FORMAT "-%"
                           G_GUINT64_FORMAT ";", l->id, l->state, l->mode,
                           l->node.ext.start, l->node.ext.end, l->token,
                           l->requested.start, l->requested.end,
                           l->limit.start, l->limit.end);
}

static char *snapshot(ExtlockTable *t)
{
    GString *s = g_string_new(NULL);
    const ExtlockTableStats *st = extlock_table_stats(t);

    extlock_table_foreach(t, snap_one, s);
    g_string_append_printf(s, "|%" G_GUINT64_FORMAT ",%" G_GUINT64_FORMAT
                           ",%" G_GUINT64_FORMAT ",%" G_GUINT64_FORMAT
                           ",%" G_GUINT64_FORMAT ",%" G_GUINT64_FORMAT
                           ",%" G_GUINT64_FORMAT ",%" G_GUINT64_FORMAT
                           ",%" G_GUINT64_FORMAT ",%" G_GUINT64_FORMAT
                           ",%" G_GUINT64_FORMAT, st->requests,
                           st->immediate_grants, st->waits,
                           st->deferred_grants, st->releases,
                           st->partial_releases, st->cancels, st->held,
                           st->waiting, st->grown_grants, st->downgrades);
    return g_string_free(s, FALSE);
}

static void test_release_part(void **state)
{
    Fixture *f = *state;
    ExtlockLock *l, *out, *split, *upper, *w1, *w2, *w3;
    const ExtlockTableStats *st = extlock_table_stats(f->table);
    void *owner = &out;

    l = req_owner(f, 1000, 2000, EX, owner);
    assert_true(GRANTED(l));
    w1 = req(f, 1000, 1100, SH);         /* inside the head */
    w2 = req(f, 1500, 1600, SH);         /* inside the hole */
    w3 = req(f, 1950, 2500, EX);         /* reaches beyond the tail */
    assert_false(GRANTED(w1) || GRANTED(w2) || GRANTED(w3));

    /* Trim head */
    out = split = (ExtlockLock *)1;
    assert_int_equal(extlock_table_release_part(f->table, l, ext(1000, 1100),
                                                &out, &split), 0);
    assert_ptr_equal(out, l);
    assert_null(split);
    assert_int_equal(l->node.ext.start, 1100);
    assert_int_equal(l->node.ext.end, 2000);
    expect_log(f, 1, w1);
    assert_int_equal(st->partial_releases, 1);
    assert_int_equal(st->releases, 0);

    /* Trim tail: w3 still overlaps the rest of the lock */
    assert_int_equal(extlock_table_release_part(f->table, l, ext(1980, 2000),
                                                &out, &split), 0);
    assert_ptr_equal(out, l);
    assert_null(split);
    assert_int_equal(l->node.ext.end, 1980);
    expect_log(f, 0);

    /* Punch a hole */
    assert_int_equal(extlock_table_release_part(f->table, l, ext(1400, 1700),
                                                &out, &split), 0);
    assert_ptr_equal(out, l);
    assert_non_null(split);
    assert_int_equal(l->node.ext.start, 1100);
    assert_int_equal(l->node.ext.end, 1400);
    assert_int_equal(split->node.ext.start, 1700);
    assert_int_equal(split->node.ext.end, 1980);
    assert_true(split->id != l->id);
    assert_int_equal(split->id, w3->id + 1);
    assert_int_equal(split->token, l->token);
    assert_int_equal(split->mode, EX);
    assert_ptr_equal(split->owner, owner);
    assert_int_equal(split->user_tag, l->user_tag);
    assert_true(GRANTED(split));
    upper = split;
    assert_ptr_equal(extlock_table_lookup(f->table, split->id), split);
    assert_ptr_equal(extlock_table_lookup(f->table, l->id), l);
    expect_log(f, 1, w2);
    assert_int_equal(st->held, 4);       /* l, split, w1, w2 */
    assert_int_equal(st->waiting, 1);

    /* Invalid parts: nothing changes */
    {
        g_autofree char *before = snapshot(f->table);
        static const uint64_t bad[][2] = {
            { 1000, 1200 },              /* starts before the lock */
            { 1300, 1401 },              /* ends after it */
            { 1200, 1200 },              /* empty */
            { 1500, 1600 },              /* in the hole */
            { 0, EXTLOCK_EXTENT_END_MAX },
        };
        size_t i;

        for (i = 0; i < G_N_ELEMENTS(bad); i++) {
            g_autofree char *after = NULL;

            out = split = (ExtlockLock *)1;
            assert_int_equal(extlock_table_release_part(
                                 f->table, l, ext(bad[i][0], bad[i][1]),
                                 &out, &split), -EINVAL);
            after = snapshot(f->table);
            assert_string_equal(before, after);
        }
        /* A waiting lock cannot be partially released */
        assert_int_equal(extlock_table_release_part(f->table, w3,
                                                    ext(2000, 2100),
                                                    NULL, NULL), -EINVAL);
        {
            g_autofree char *after = snapshot(f->table);

            assert_string_equal(before, after);
        }
        expect_log(f, 0);
    }

    /* Whole extent: freed like a release */
    assert_int_equal(extlock_table_release_part(f->table, upper,
                                                ext(1700, 1980),
                                                &out, &split), 0);
    assert_null(out);
    assert_null(split);
    expect_log(f, 1, w3);
    assert_int_equal(st->releases, 1);
    assert_int_equal(st->partial_releases, 4);
    assert_int_equal(st->held, 4);
    assert_int_equal(st->waiting, 0);

    /* NULL out pointers are allowed */
    assert_int_equal(extlock_table_release_part(f->table, l, ext(1200, 1300),
                                                NULL, NULL), 0);
    assert_int_equal(st->held, 5);
}

/* ------------------------------------------------------------------ */

static void test_ordering(void **state)
{
    Fixture *f = *state;
    ExtlockLock *s1, *s2, *x, *s3, *s4, *s5, *far;

    s1 = req(f, 0, 100, SH);
    s2 = req(f, 50, 150, SH);
    assert_true(GRANTED(s1) && GRANTED(s2));
    x = req(f, 40, 60, EX);
    assert_false(GRANTED(x));
    /* Compatible with the shared holders, but an earlier EX waits */
    s3 = req(f, 0, 100, SH);
    assert_false(GRANTED(s3));
    s4 = req(f, 55, 56, SH);
    assert_false(GRANTED(s4));
    /* Not overlapping the waiting EX: granted alongside the holders */
    s5 = req(f, 0, 10, SH);
    assert_true(GRANTED(s5));
    far = req(f, 60, 200, SH);
    assert_true(GRANTED(far));

    extlock_table_release(f->table, s1);
    expect_log(f, 0);
    extlock_table_release(f->table, far);
    expect_log(f, 0);
    extlock_table_release(f->table, s2);
    expect_log(f, 1, x);                 /* EX first, shared still wait */
    assert_false(GRANTED(s3) || GRANTED(s4));
    extlock_table_release(f->table, x);
    expect_log(f, 2, s3, s4);            /* together, in token order */
    assert_int_equal(extlock_table_stats(f->table)->waiting, 0);
}

static void test_cancel_unblocks(void **state)
{
    Fixture *f = *state;
    ExtlockLock *s1, *x1, *x2, *s2, *s3;

    s1 = req(f, 0, 100, SH);
    x1 = req(f, 0, 10, EX);
    x2 = req(f, 90, 100, EX);
    s2 = req(f, 5, 95, SH);             /* behind x1 and x2 */
    s3 = req(f, 200, 300, SH);
    assert_true(GRANTED(s3));
    assert_false(GRANTED(x1) || GRANTED(x2) || GRANTED(s2));

    extlock_table_release(f->table, x1);
    expect_log(f, 0);                    /* x2 still in front of s2 */
    assert_false(GRANTED(s2));
    extlock_table_release(f->table, x2);
    expect_log(f, 1, s2);
    assert_int_equal(extlock_table_stats(f->table)->cancels, 2);
    assert_int_equal(extlock_table_stats(f->table)->deferred_grants, 1);

    /* Cancelling a waiter that blocks nobody grants nothing */
    x1 = req(f, 0, 100, EX);
    x2 = req(f, 0, 100, EX);
    extlock_table_release(f->table, x2);
    expect_log(f, 0);
    assert_false(GRANTED(x1));
    extlock_table_release(f->table, s1);
    expect_log(f, 0);
    extlock_table_release(f->table, s2);
    expect_log(f, 1, x1);
}

typedef struct BlockerList {
    ExtlockLock *l[16];
    size_t n;
} BlockerList;

static void blocker_cb(ExtlockLock *lock, void *opaque)
{
    BlockerList *b = opaque;

    assert_true(b->n < G_N_ELEMENTS(b->l));
    b->l[b->n++] = lock;
}

static bool blockers_are(Fixture *f, ExtlockLock *w, size_t n, ...)
{
    BlockerList b = { .n = 0 };
    va_list ap;
    size_t i, j;
    bool ok = true;

    extlock_table_foreach_blocker(f->table, w, blocker_cb, &b);
    if (b.n != n) {
        return false;
    }
    va_start(ap, n);
    for (i = 0; i < n; i++) {
        ExtlockLock *want = va_arg(ap, ExtlockLock *);
        bool found = false;

        for (j = 0; j < b.n; j++) {
            found |= b.l[j] == want;
        }
        ok &= found;
    }
    va_end(ap);
    return ok;
}

static void test_blockers(void **state)
{
    Fixture *f = *state;
    ExtlockLock *h1, *h2, *h3, *x3, *s4, *x5, *s6;

    h1 = req(f, 0, 10, SH);
    h2 = req(f, 20, 30, SH);
    h3 = req(f, 40, 50, EX);
    x3 = req(f, 0, 30, EX);
    s4 = req(f, 5, 45, SH);
    x5 = req(f, 0, 100, EX);
    s6 = req(f, 200, 300, SH);
    assert_true(GRANTED(h1) && GRANTED(h2) && GRANTED(h3) && GRANTED(s6));

    assert_true(blockers_are(f, x3, 2, h1, h2));
    assert_true(blockers_are(f, s4, 2, h3, x3));
    assert_true(blockers_are(f, x5, 5, h1, h2, h3, x3, s4));
    /* Granted locks have no blockers */
    assert_true(blockers_are(f, h1, 0));

    extlock_table_release(f->table, h3);
    expect_log(f, 0);
    assert_true(blockers_are(f, s4, 1, x3));
    assert_true(blockers_are(f, x5, 4, h1, h2, x3, s4));
}

static void test_reclaim(void **state)
{
    Fixture *f = *state;
    ExtlockLock *r1, *r2, *w, *r;
    const ExtlockTableStats *st = extlock_table_stats(f->table);
    g_autofree char *before = NULL;
    g_autofree char *after = NULL;

    r1 = extlock_table_reclaim(f->table, ext(0, 100), SH, 7, f, 70);
    assert_non_null(r1);
    assert_true(GRANTED(r1));
    assert_int_equal(r1->token, 7);
    assert_int_equal(r1->user_tag, 70);
    r2 = extlock_table_reclaim(f->table, ext(50, 150), SH, 3, f, 30);
    assert_non_null(r2);
    assert_int_equal(st->held, 2);
    assert_int_equal(st->requests, 0);

    f->token = 100;
    w = req(f, 140, 200, EX);
    assert_false(GRANTED(w));

    before = snapshot(f->table);
    /* Conflicts with a holder */
    assert_null(extlock_table_reclaim(f->table, ext(99, 100), EX, 5, f, 0));
    /* Conflicts with a waiter only */
    assert_null(extlock_table_reclaim(f->table, ext(180, 190), SH, 5, f, 0));
    after = snapshot(f->table);
    assert_string_equal(before, after);

    /* Compatible / disjoint reclaims are fine */
    r = extlock_table_reclaim(f->table, ext(0, 10), SH, 9, f, 0);
    assert_non_null(r);
    r = extlock_table_reclaim(f->table, ext(200, 210), EX, 8, f, 0);
    assert_non_null(r);
    assert_int_equal(st->held, 4);

    extlock_table_release(f->table, r2);
    expect_log(f, 1, w);
}

static void test_stats(void **state)
{
    Fixture *f = *state;
    const ExtlockTableStats *st = extlock_table_stats(f->table);
    ExtlockLock *a, *b, *c, *d, *e;

    a = req(f, 0, 100, EX);
    b = req(f, 0, 10, SH);
    c = req(f, 20, 30, SH);
    d = req(f, 500, 600, SH);
    e = req(f, 40, 50, EX);
    g_usleep(3000);
    extlock_table_release(f->table, e);  /* cancel */
    extlock_table_release(f->table, a);
    expect_log(f, 2, b, c);
    assert_int_equal(extlock_table_release_part(f->table, d, ext(550, 560),
                                                NULL, NULL), 0);
    extlock_table_release(f->table, b);

    assert_int_equal(st->requests, 5);
    assert_int_equal(st->immediate_grants, 2);
    assert_int_equal(st->waits, 3);
    assert_int_equal(st->deferred_grants, 2);
    assert_int_equal(st->releases, 2);
    assert_int_equal(st->partial_releases, 1);
    assert_int_equal(st->cancels, 1);
    assert_int_equal(st->held, 3);      /* c, d and its split piece */
    assert_int_equal(st->waiting, 0);
    assert_true(st->total_wait_us >= 2 * 3000);
    assert_int_equal(st->total_wait_us, f->wait_us_sum);
    /* Plain requests never grow */
    assert_int_equal(st->grown_grants, 0);
    assert_int_equal(st->downgrades, 0);
}

/*
 * An exclusive waiter behind shared holders gets the lock once those
 * holders are gone, however many shared requests keep arriving.
 */
static void test_starvation(void **state)
{
    Fixture *f = *state;
    ExtlockLock *holders[4], *x;
    GPtrArray *late = g_ptr_array_new();
    guint i;

    for (i = 0; i < 4; i++) {
        holders[i] = req(f, i * 10, i * 10 + 50, SH);
        assert_true(GRANTED(holders[i]));
    }
    x = req(f, 0, 100, EX);
    assert_false(GRANTED(x));
    for (i = 0; i < 4; i++) {
        ExtlockLock *s = req(f, i * 5, i * 5 + 30, SH);

        assert_false(GRANTED(s));
        g_ptr_array_add(late, s);
        extlock_table_release(f->table, holders[i]);
        if (i < 3) {
            expect_log(f, 0);
            assert_false(GRANTED(x));
        }
    }
    expect_log(f, 1, x);
    for (i = 0; i < late->len; i++) {
        assert_false(GRANTED((ExtlockLock *)late->pdata[i]));
    }
    extlock_table_release(f->table, x);
    /* All the late shared requests are granted together */
    assert_int_equal(f->log->len, late->len);
    for (i = 0; i < late->len; i++) {
        ExtlockLock *s = late->pdata[i];

        assert_true(GRANTED(s));
        assert_int_equal(g_array_index(f->log, uint64_t, i), s->id);
    }
    g_ptr_array_free(late, TRUE);
}

typedef struct Order {
    ExtlockLock *l[32];
    size_t n;
    ExtlockTable *release_from;
} Order;

static void order_cb(ExtlockLock *lock, void *opaque)
{
    Order *o = opaque;

    o->l[o->n++] = lock;
    if (o->release_from) {
        extlock_table_release(o->release_from, lock);
    }
}

static void test_foreach(void **state)
{
    Fixture *f = *state;
    ExtlockLock *a, *b, *c, *d, *e, *g;
    Order o = { .n = 0 };

    a = req(f, 300, 400, EX);
    b = req(f, 100, 200, SH);
    c = req(f, 150, 160, EX);           /* waits */
    d = req(f, 0, 50, EX);
    e = req(f, 350, 360, SH);           /* waits */
    g = req(f, 120, 155, SH);           /* waits behind c */
    extlock_table_foreach(f->table, order_cb, &o);
    assert_int_equal(o.n, 6);
    assert_ptr_equal(o.l[0], d);
    assert_ptr_equal(o.l[1], b);
    assert_ptr_equal(o.l[2], a);
    assert_ptr_equal(o.l[3], g);
    assert_ptr_equal(o.l[4], c);
    assert_ptr_equal(o.l[5], e);

    /* The callback may release what it is handed */
    o.n = 0;
    o.release_from = f->table;
    extlock_table_foreach(f->table, order_cb, &o);
    assert_int_equal(extlock_table_stats(f->table)->held, 0);
    assert_int_equal(extlock_table_stats(f->table)->waiting, 0);
    g_array_set_size(f->log, 0);
}

/* ------------------------------------------------------------------ */

static void expect_check_fails(ExtlockTable *t, const char *substr)
{
    g_autofree char *msg = NULL;

    assert_false(extlock_table_check(t, &msg));
    assert_non_null(msg);
    if (!strstr(msg, substr)) {
        fail_msg("expected '%s' in '%s'", substr, msg);
    }
}

/* extlock_table_check() must notice broken invariants */
static void test_check_detects(void **state)
{
    Fixture *f = *state;
    ExtlockLock *a, *b, *w;
    ExtlockTableStats *st =
        (ExtlockTableStats *)extlock_table_stats(f->table);

    extlock_table_set_debug_checks(f->table, false);
    a = req(f, 0, 10, EX);
    b = req(f, 20, 30, SH);
    w = req(f, 5, 25, SH);
    assert_table_ok(f->table);

    /* Overlapping conflicting grants (single-node trees stay valid) */
    a->node.ext.end = 25;
    a->node.subtree_max_end = 25;
    expect_check_fails(f->table, "overlapping conflicting grants");
    a->node.ext.end = 10;
    a->node.subtree_max_end = 10;
    assert_table_ok(f->table);

    /* A holder with a later token than a conflicting waiter */
    a->token = w->token + 1;
    expect_check_fails(f->table, "overtook");
    a->token = 1;

    /* A waiter that could be granted */
    a->node.ext.end = 5;
    a->node.subtree_max_end = 5;
    expect_check_fails(f->table, "grantable");
    a->node.ext.end = 10;
    a->node.subtree_max_end = 10;

    b->mode = EX;
    expect_check_fails(f->table, "wrong tree");
    b->mode = SH;

    st->held++;
    expect_check_fails(f->table, "counters");
    st->held--;
    b->node.subtree_max_end = 31;
    expect_check_fails(f->table, "tree");
    b->node.subtree_max_end = 30;
    assert_table_ok(f->table);
}

/* With debug checks on, a broken table aborts at the next mutation */
static void test_debug_checks_abort(void **state)
{
    Fixture *f = *state;
    ExtlockLock *a;
    pid_t pid;
    int status;

    a = req(f, 0, 10, EX);
    req(f, 5, 15, SH);
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open("/dev/null", O_WRONLY);

        /* cmocka traps SIGABRT; the child must really die of it */
        signal(SIGABRT, SIG_DFL);
        signal(SIGTRAP, SIG_DFL);
        dup2(fd, 2);
        a->token = 1000;             /* overtakes the waiter */
        req(f, 100, 200, SH);
        _exit(0);
    }
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFSIGNALED(status));
    assert_true(WTERMSIG(status) == SIGABRT || WTERMSIG(status) == SIGTRAP);
}

/* ------------------------------------------------------------------ */
/*
 * Extent growth, downgrade, conflicts for revocation
 */

#define MiB (UINT64_C(1) << 20)
#define END EXTLOCK_EXTENT_END_MAX

static void test_grow_alone(void **state)
{
    Fixture *f = *state;
    const ExtlockTableStats *st = extlock_table_stats(f->table);
    ExtlockLock *a, *b;

    /* Alone: the whole limit, whatever the mode */
    a = req_grow(f, 100, 200, 0, 1000, EX);
    assert_true(GRANTED(a));
    assert_extent(a, 0, 1000);
    assert_int_equal(a->granted_us, a->queued_us);
    assert_int_equal(st->grown_grants, 1);
    assert_int_equal(st->immediate_grants, 1);
    extlock_table_release(f->table, a);

    a = req_grow(f, 4096, 8192, 0, END, SH);
    assert_true(GRANTED(a));
    assert_extent(a, 0, END);
    assert_int_equal(st->grown_grants, 2);
    extlock_table_release(f->table, a);

    /* One-sided limits */
    a = req_grow(f, 10, 20, 10, 30, EX);
    assert_extent(a, 10, 30);
    b = req_grow(f, 40, 50, 35, 50, EX);
    assert_extent(b, 35, 50);
    assert_int_equal(st->grown_grants, 4);
    extlock_table_release(f->table, a);
    extlock_table_release(f->table, b);

    /* limit == ext: no growth, not counted */
    a = req_grow(f, 10, 20, 10, 20, EX);
    assert_true(GRANTED(a));
    assert_extent(a, 10, 20);
    assert_int_equal(st->grown_grants, 4);
    extlock_table_release(f->table, a);

    /* The whole release of a grown lock frees the grown extent */
    a = req_grow(f, 100, 200, 0, 1000, EX);
    b = req(f, 900, 950, SH);
    assert_false(GRANTED(b));
    assert_int_equal(extlock_table_release_part(f->table, a, ext(0, 200),
                                                &a, NULL), 0);
    expect_log(f, 0);
    assert_extent(a, 200, 1000);
    /* requested/limit keep describing the request */
    assert_int_equal(a->requested.start, 100);
    assert_int_equal(a->limit.end, 1000);
    extlock_table_release(f->table, a);
    expect_log(f, 1, b);
    assert_extent(b, 900, 950);
    assert_int_equal(st->grown_grants, 5);
}

static void test_grow_stops(void **state)
{
    Fixture *f = *state;
    const ExtlockTableStats *st = extlock_table_stats(f->table);
    ExtlockLock *h1, *h2, *w1, *w2, *g, *hl, *wl, *hr, *wr, *s1, *s2, *x1;
    ExtlockLock *sw, *sg, *xg;

    /* Nearest on the left a waiter, on the right a holder */
    h1 = req(f, 100, 200, SH);
    h2 = req(f, 800, 900, EX);
    w1 = req(f, 850, 950, SH);           /* waits behind h2 */
    w2 = req(f, 150, 250, EX);           /* waits behind h1 */
    assert_true(GRANTED(h1) && GRANTED(h2));
    assert_false(GRANTED(w1) || GRANTED(w2));
    g = req_grow(f, 400, 500, 0, 2000, EX);
    assert_true(GRANTED(g));
    assert_extent(g, 250, 800);

    /* Mirrored: on the left a holder, on the right a waiter */
    hl = req(f, 20000, 20300, EX);
    wl = req(f, 20100, 20200, SH);       /* behind hl, ends before it */
    hr = req(f, 20800, 20900, SH);
    wr = req(f, 20600, 20850, EX);       /* behind hr, starts before it */
    assert_true(GRANTED(hl) && GRANTED(hr));
    assert_false(GRANTED(wl) || GRANTED(wr));
    g = req_grow(f, 20400, 20500, 19000, 22000, EX);
    assert_true(GRANTED(g));
    assert_extent(g, 20300, 20600);

    /* Obstacle flush with the request: no growth on that side */
    g = req_grow(f, 20900, 21000, 20000, 21500, EX);
    assert_true(GRANTED(g));
    assert_extent(g, 20900, 21500);

    /* Shared next to shared (held or waiting) is no obstacle */
    s1 = req(f, 10100, 10200, SH);
    s2 = req(f, 10600, 10700, SH);
    x1 = req(f, 10900, 11000, EX);
    sw = req(f, 10950, 11100, SH);       /* waits behind x1 */
    assert_true(GRANTED(s1) && GRANTED(s2) && GRANTED(x1));
    assert_false(GRANTED(sw));
    sg = req_grow(f, 10400, 10500, 10000, 12000, SH);
    assert_true(GRANTED(sg));
    assert_extent(sg, 10000, 10900);
    /* ... but a shared lock is one for an exclusive request */
    xg = req_grow(f, 11200, 11300, 11050, 11400, EX);
    assert_true(GRANTED(xg));
    assert_extent(xg, 11100, 11400);

    /* Nearest is the largest end, not the last start */
    s1 = req(f, 40000, 40300, SH);
    s2 = req(f, 40100, 40200, SH);
    x1 = req(f, 40250, 40260, SH);
    g = req_grow(f, 40400, 40500, 39000, 41000, EX);
    assert_true(GRANTED(g));
    assert_extent(g, 40300, 41000);

    /* Obstacles outside the limit do not matter */
    g = req_grow(f, 30000, 30010, 29990, 30020, EX);
    assert_extent(g, 29990, 30020);

    /* A limit with nothing to gain on either side is not counted */
    assert_int_equal(st->grown_grants, 7);
    g = req_grow(f, 30020, 30030, 30010, 30030, SH);
    assert_true(GRANTED(g));
    assert_extent(g, 30020, 30030);
    assert_int_equal(st->grown_grants, 7);
    assert_table_ok(f->table);
}

static void test_grow_deferred(void **state)
{
    Fixture *f = *state;
    const ExtlockTableStats *st = extlock_table_stats(f->table);
    ExtlockLock *h, *y, *x, *g, *wleft, *wl;

    h = req(f, 1000, 2000, EX);
    y = req(f, 300, 400, SH);            /* no obstacle to g, one to wleft */
    x = req(f, 5000, 6000, EX);
    assert_true(GRANTED(h) && GRANTED(y) && GRANTED(x));
    g = req_grow(f, 1500, 1600, 0, 10000, SH);
    assert_false(GRANTED(g));
    assert_extent(g, 1500, 1600);
    /* Later waiters: one left of g, one overlapping g itself */
    wleft = req_grow(f, 800, 1200, 0, 1500, EX);
    wl = req(f, 1550, 1700, EX);
    assert_false(GRANTED(wleft) || GRANTED(wl));
    assert_int_equal(st->grown_grants, 0);

    extlock_table_release(f->table, h);
    /* Token order: g first, it stops at wleft; wleft then stops at g */
    expect_log(f, 2, g, wleft);
    assert_extent(g, 1200, 1600);
    assert_extent(wleft, 400, 1200);
    assert_false(GRANTED(wl));
    assert_int_equal(st->grown_grants, 2);
    assert_int_equal(st->deferred_grants, 2);

    /* wl overlaps g (it is later): g keeps its extent, wl waits */
    extlock_table_release(f->table, g);
    expect_log(f, 1, wl);
    assert_extent(wl, 1550, 1700);
    assert_int_equal(st->grown_grants, 2);
}

/* Fill the table with @n shared locks far away from everything else */
static void fill(Fixture *f, GPtrArray *arr, guint n)
{
    guint i;

    for (i = 0; i < n; i++) {
        uint64_t s = 1000 * MiB + arr->len * 4096;

        g_ptr_array_add(arr, req(f, s, s + 4096, SH));
    }
}

static void test_grow_cap(void **state)
{
    Fixture *f = *state;
    g_autoptr(GPtrArray) fillers = g_ptr_array_new();
    ExtlockLock *a, *h, *g, *ob;

    /* 31 others + this one = 32 locks: not capped */
    fill(f, fillers, 31);
    a = req_grow(f, 40 * MiB + 100, 40 * MiB + 200, 0, 900 * MiB, EX);
    assert_extent(a, 0, 900 * MiB);
    extlock_table_release(f->table, a);

    /* 33 locks: clipped to the aligned 32 MiB window */
    fill(f, fillers, 1);
    a = req_grow(f, 40 * MiB + 100, 40 * MiB + 200, 0, 900 * MiB, EX);
    assert_extent(a, 32 * MiB, 64 * MiB);
    extlock_table_release(f->table, a);

    /* Aligned request: exactly its window (so it did not grow) */
    a = req_grow(f, 64 * MiB, 96 * MiB, 0, 900 * MiB, SH);
    assert_extent(a, 64 * MiB, 96 * MiB);
    assert_int_equal(extlock_table_stats(f->table)->grown_grants, 2);
    extlock_table_release(f->table, a);

    /* Across a boundary: both windows */
    a = req_grow(f, 64 * MiB - 10, 64 * MiB + 10, 0, 900 * MiB, EX);
    assert_extent(a, 32 * MiB, 96 * MiB);
    extlock_table_release(f->table, a);

    /* Larger than the window: never shorter than the request */
    a = req_grow(f, 10, 100 * MiB, 0, 900 * MiB, EX);
    assert_extent(a, 0, 128 * MiB);
    extlock_table_release(f->table, a);

    /* The limit still applies inside the window, and obstacles too */
    ob = req(f, 50 * MiB, 51 * MiB, SH);
    a = req_grow(f, 40 * MiB, 41 * MiB, 35 * MiB, 900 * MiB, EX);
    assert_extent(a, 35 * MiB, 50 * MiB);
    extlock_table_release(f->table, a);
    extlock_table_release(f->table, ob);

    /* Counted at grant time: 31 fillers + h + g = 33, capped ... */
    extlock_table_release(f->table, g_ptr_array_steal_index(fillers, 0));
    h = req(f, 40 * MiB, 41 * MiB, SH);
    g = req_grow(f, 40 * MiB, 41 * MiB, 0, 900 * MiB, EX);
    assert_false(GRANTED(g));
    /* ... but at the grant, h is gone: 32 locks, not capped */
    extlock_table_release(f->table, h);
    expect_log(f, 1, g);
    assert_extent(g, 0, 900 * MiB);
    extlock_table_release(f->table, g);

    /* One more filler: 33 at the grant, capped */
    fill(f, fillers, 1);
    h = req(f, 40 * MiB, 41 * MiB, SH);
    g = req_grow(f, 40 * MiB, 41 * MiB, 0, 900 * MiB, EX);
    assert_false(GRANTED(g));
    extlock_table_release(f->table, h);
    expect_log(f, 1, g);
    assert_extent(g, 32 * MiB, 64 * MiB);
    assert_int_equal(extlock_table_stats(f->table)->grown_grants, 7);
}

static void test_downgrade(void **state)
{
    Fixture *f = *state;
    const ExtlockTableStats *st = extlock_table_stats(f->table);
    ExtlockLock *x, *s1, *w, *s2, *s3, *g, *gs;
    uint64_t id, token;

    x = req(f, 0, 100, EX);
    s1 = req(f, 10, 20, SH);
    w = req(f, 50, 60, EX);
    s2 = req(f, 55, 58, SH);             /* behind w */
    s3 = req(f, 90, 200, SH);
    assert_true(GRANTED(x));
    assert_false(GRANTED(s1) || GRANTED(w) || GRANTED(s2) || GRANTED(s3));

    id = x->id;
    token = x->token;
    assert_int_equal(extlock_table_downgrade(f->table, x), 0);
    expect_log(f, 2, s1, s3);            /* readers, not the writer */
    assert_int_equal(x->mode, SH);
    assert_true(GRANTED(x));
    assert_int_equal(x->id, id);
    assert_int_equal(x->token, token);
    assert_extent(x, 0, 100);
    assert_ptr_equal(extlock_table_lookup(f->table, id), x);
    assert_false(GRANTED(w) || GRANTED(s2));
    assert_true(blockers_are(f, w, 1, x));
    assert_int_equal(st->downgrades, 1);
    assert_int_equal(st->deferred_grants, 2);

    /* Shared already: success, nothing changes */
    {
        g_autofree char *before = snapshot(f->table);
        g_autofree char *after1 = NULL;
        g_autofree char *after2 = NULL;
        g_autofree char *after3 = NULL;

        assert_int_equal(extlock_table_downgrade(f->table, x), 0);
        after1 = snapshot(f->table);
        assert_string_equal(before, after1);
        /* Not granted / no lock: -EINVAL, nothing changes */
        assert_int_equal(extlock_table_downgrade(f->table, w), -EINVAL);
        after2 = snapshot(f->table);
        assert_string_equal(before, after2);
        assert_int_equal(w->mode, EX);
        assert_int_equal(extlock_table_downgrade(f->table, NULL), -EINVAL);
        after3 = snapshot(f->table);
        assert_string_equal(before, after3);
        expect_log(f, 0);
    }

    extlock_table_release(f->table, x);
    expect_log(f, 1, w);
    assert_false(GRANTED(s2));
    /* Downgrading w lets s2, which waited behind it, in */
    assert_int_equal(extlock_table_downgrade(f->table, w), 0);
    expect_log(f, 1, s2);
    assert_int_equal(st->downgrades, 2);
    assert_int_equal(st->waiting, 0);

    /* A grown lock keeps its grown extent; waiters it covers get in */
    g = req_grow(f, 1000, 1100, 500, 3000, EX);
    assert_extent(g, 500, 3000);
    gs = req_grow(f, 2000, 2100, 0, 5000, SH);
    assert_false(GRANTED(gs));
    assert_int_equal(extlock_table_downgrade(f->table, g), 0);
    expect_log(f, 1, gs);
    assert_extent(g, 500, 3000);
    /* No exclusive lock is left: gs grows over everything */
    assert_extent(gs, 0, 5000);
    assert_int_equal(st->grown_grants, 2);
    assert_int_equal(st->downgrades, 3);
}

typedef struct ConflictList {
    ExtlockLock *l[32];
    size_t n;
} ConflictList;

static void conflict_cb(ExtlockLock *lock, void *opaque)
{
    ConflictList *c = opaque;

    assert_true(c->n < G_N_ELEMENTS(c->l));
    c->l[c->n++] = lock;
}

/* Conflicts of @l are exactly the @n given locks, granted ones first */
static void expect_conflicts(Fixture *f, ExtlockLock *l, size_t n, ...)
{
    ConflictList c = { .n = 0 };
    va_list ap;
    size_t i, j;

    extlock_table_foreach_conflict(f->table, l, conflict_cb, &c);
    assert_int_equal(c.n, n);
    va_start(ap, n);
    for (i = 0; i < n; i++) {
        ExtlockLock *want = va_arg(ap, ExtlockLock *);
        size_t found = 0;

        for (j = 0; j < c.n; j++) {
            found += c.l[j] == want;
        }
        assert_int_equal(found, 1);
    }
    va_end(ap);
    for (i = 1; i < c.n; i++) {
        assert_false(GRANTED(c.l[i]) && !GRANTED(c.l[i - 1]));
    }
}

static void test_foreach_conflict(void **state)
{
    Fixture *f = *state;
    ExtlockLock *a, *b, *c, *x, *d, *e, *fl, *g;

    a = req(f, 0, 100, SH);
    b = req(f, 50, 150, SH);
    c = req(f, 200, 300, EX);
    x = req(f, 60, 250, EX);             /* waits for a, b, c */
    d = req(f, 240, 260, SH);            /* waits for c, x */
    e = req(f, 0, 10, SH);
    fl = req(f, 140, 145, EX);           /* waits for b, x */
    g = req(f, 1000, 1100, EX);
    assert_true(GRANTED(a) && GRANTED(b) && GRANTED(c) && GRANTED(e) &&
                GRANTED(g));
    assert_false(GRANTED(x) || GRANTED(d) || GRANTED(fl));

    expect_conflicts(f, x, 5, a, b, c, d, fl);
    expect_conflicts(f, d, 2, c, x);
    expect_conflicts(f, fl, 2, b, x);
    /* Granted locks: later conflicting waiters */
    expect_conflicts(f, a, 1, x);
    expect_conflicts(f, b, 2, x, fl);
    expect_conflicts(f, c, 2, x, d);
    expect_conflicts(f, e, 0);
    expect_conflicts(f, g, 0);

    /* After a deferred grant: the waiters behind the new holder */
    extlock_table_release(f->table, a);
    extlock_table_release(f->table, b);
    extlock_table_release(f->table, e);
    expect_log(f, 0);
    extlock_table_release(f->table, c);
    expect_log(f, 1, x);
    expect_conflicts(f, x, 2, d, fl);
    expect_conflicts(f, d, 1, x);
    assert_int_equal(extlock_table_downgrade(f->table, x), 0);
    expect_log(f, 1, d);
    expect_conflicts(f, x, 1, fl);
    expect_conflicts(f, d, 0);
    expect_conflicts(f, fl, 1, x);
}

/* extlock_table_check() must notice broken growth bookkeeping */
static void test_check_detects_growth(void **state)
{
    Fixture *f = *state;
    ExtlockLock *a, *w;

    extlock_table_set_debug_checks(f->table, false);
    a = req_grow(f, 100, 200, 0, 1000, EX);
    w = req_grow(f, 150, 160, 100, 300, SH);
    assert_extent(a, 0, 1000);
    assert_table_ok(f->table);

    a->limit = ext(0, 999);
    expect_check_fails(f->table, "extent outside its limit");
    a->limit = ext(0, 1000);
    a->requested = ext(0, 1001);
    expect_check_fails(f->table, "request outside its limit");
    a->requested = ext(100, 200);
    assert_table_ok(f->table);

    w->requested = ext(150, 170);
    expect_check_fails(f->table, "differs from its request");
    w->requested = ext(150, 160);
    assert_table_ok(f->table);
}

/* ------------------------------------------------------------------ */
/*
 * Randomized workloads against a brute-force model of the ordering rule.
 */

typedef struct MLock {
    uint64_t id;
    uint64_t token;
    ExtlockExtent ext;
    ExtlockExtent requested;
    ExtlockExtent limit;
    ExtlockMode mode;
    bool granted;
    void *owner;
    uint64_t user_tag;
    ExtlockLock *lock;
} MLock;

typedef struct MGrant {
    uint64_t token;
    uint64_t id;
} MGrant;

static void add_id(GHashTable *set, uint64_t id)
{
    g_hash_table_add(set, g_memdup2(&id, sizeof(id)));
}

typedef struct Model {
    GPtrArray *locks;            /* MLock *, live ones */
    ExtlockTableStats st;
    uint64_t next_id;
    GHashTable *ever_granted;    /* ids */
    GHashTable *cancelled;       /* ids */
    GArray *newly;               /* MGrant, granted by the last settle */
} Model;

static bool m_conflict(const MLock *a, const MLock *b)
{
    return a != b && extlock_extents_overlap(a->ext, b->ext) &&
           extlock_modes_conflict(a->mode, b->mode);
}

/* The rule, straight from the header, evaluated over every lock */
static bool m_grantable(Model *m, const MLock *w)
{
    guint i;

    for (i = 0; i < m->locks->len; i++) {
        const MLock *o = m->locks->pdata[i];

        if (m_conflict(o, w) && (o->granted || o->token < w->token)) {
            return false;
        }
    }
    return true;
}

/*
 * The extent @w gets when granted while the model holds @nlocks locks:
 * the formula of extlock_table_request_grow(), over every lock.
 */
static ExtlockExtent m_grow(Model *m, const MLock *w, guint nlocks)
{
    const uint64_t cap = EXTLOCK_TABLE_GROW_CAP_BYTES;
    ExtlockExtent r = w->requested, g = w->limit;
    guint i;

    for (i = 0; i < m->locks->len; i++) {
        const MLock *o = m->locks->pdata[i];

        if (o == w || !extlock_modes_conflict(o->mode, w->mode)) {
            continue;
        }
        if (o->ext.start < r.start) {
            g.start = MAX(g.start, MIN(o->ext.end, r.start));
        }
        if (o->ext.end > r.end) {
            g.end = MIN(g.end, MAX(o->ext.start, r.end));
        }
    }
    if (nlocks > EXTLOCK_TABLE_GROW_CAP_LOCKS) {
        g.start = MAX(g.start, r.start / cap * cap);
        g.end = MIN(g.end, (r.end + cap - 1) / cap * cap);
    }
    if (g.start != r.start || g.end != r.end) {
        m->st.grown_grants++;
    }
    return g;
}

/*
 * Grant waiters until nothing is grantable any more, always the grantable
 * one with the smallest token first (growth is first come, first served).
 * What was granted is recorded in m->newly, in grant order.
 */
static void m_settle(Model *m)
{
    guint i;

    g_array_set_size(m->newly, 0);
    for (;;) {
        MLock *best = NULL;

        for (i = 0; i < m->locks->len; i++) {
            MLock *w = m->locks->pdata[i];

            if (!w->granted && (!best || w->token < best->token) &&
                m_grantable(m, w)) {
                best = w;
            }
        }
        if (!best) {
            break;
        }
        best->granted = true;
        best->ext = m_grow(m, best, m->locks->len);
        {
            MGrant g = { best->token, best->id };

            g_array_append_val(m->newly, g);
        }
        add_id(m->ever_granted, best->id);
        m->st.deferred_grants++;
        m->st.waiting--;
        m->st.held++;
    }
}

static void m_remove(Model *m, MLock *ml)
{
    g_ptr_array_remove(m->locks, ml);
    if (ml->granted) {
        m->st.held--;
        m->st.releases++;
    } else {
        m->st.waiting--;
        m->st.cancels++;
        add_id(m->cancelled, ml->id);
    }
    g_free(ml);
}

static void m_conflict_cb(ExtlockLock *lock, void *opaque)
{
    g_ptr_array_add(opaque, lock);
}

/*
 * foreach_conflict_state() gives the granted part and the waiting part of
 * foreach_conflict()'s answer @all, in the same order; and
 * foreach_blocker_first() a prefix of foreach_blocker()'s
 */
static void compare_conflict_parts(Fixture *f, ExtlockLock *lock,
                                   GPtrArray *all)
{
    g_autoptr(GPtrArray) held = g_ptr_array_new();
    g_autoptr(GPtrArray) waiting = g_ptr_array_new();
    g_autoptr(GPtrArray) blockers = g_ptr_array_new();
    g_autoptr(GPtrArray) first = g_ptr_array_new();
    guint maxes[3];
    guint j;

    extlock_table_foreach_conflict_state(f->table, lock,
                                         EXTLOCK_LOCK_GRANTED,
                                         m_conflict_cb, held);
    extlock_table_foreach_conflict_state(f->table, lock,
                                         EXTLOCK_LOCK_WAITING,
                                         m_conflict_cb, waiting);
    assert_int_equal(held->len + waiting->len, all->len);
    for (j = 0; j < all->len; j++) {
        assert_ptr_equal(all->pdata[j],
                         j < held->len ? held->pdata[j]
                                       : waiting->pdata[j - held->len]);
    }
    for (j = 0; j < held->len; j++) {
        assert_true(GRANTED((ExtlockLock *)held->pdata[j]));
    }

    extlock_table_foreach_blocker(f->table, lock, m_conflict_cb, blockers);
    /* None, a cut in the middle, all of them */
    maxes[0] = 0;
    maxes[1] = blockers->len / 2 + 1;
    maxes[2] = blockers->len + 1;
    for (guint k = 0; k < G_N_ELEMENTS(maxes); k++) {
        g_ptr_array_set_size(first, 0);
        extlock_table_foreach_blocker_first(f->table, lock, maxes[k],
                                            m_conflict_cb, first);
        assert_int_equal(first->len, MIN(maxes[k], blockers->len));
        for (j = 0; j < first->len; j++) {
            assert_ptr_equal(first->pdata[j], blockers->pdata[j]);
        }
    }
}

/* foreach_conflict() on @ml against the brute-force answer */
static void compare_conflicts(Fixture *f, Model *m, MLock *ml)
{
    g_autoptr(GPtrArray) got = g_ptr_array_new();
    guint i, j, want = 0;

    extlock_table_foreach_conflict(f->table, ml->lock, m_conflict_cb, got);
    for (i = 0; i < m->locks->len; i++) {
        MLock *o = m->locks->pdata[i];
        guint found = 0;

        for (j = 0; j < got->len; j++) {
            found += got->pdata[j] == o->lock;
        }
        assert_int_equal(found, m_conflict(o, ml));
        want += found;
    }
    assert_int_equal(got->len, want);
    for (j = 1; j < got->len; j++) {
        assert_false(GRANTED((ExtlockLock *)got->pdata[j]) &&
                     !GRANTED((ExtlockLock *)got->pdata[j - 1]));
    }
    /* Every fourth lock: they cost as much again as the above */
    if (ml->id % 4 == 0) {
        compare_conflict_parts(f, ml->lock, got);
    }
}

/*
 * Many requests wait for one extent: the partial walks give what the
 * full ones give, cut where they should be (the daemon lists the first 64
 * blockers of a new request, and revokes only for holders)
 */
static void test_conflict_parts_many(void **state)
{
    Fixture *f = *state;
    g_autoptr(GPtrArray) all = g_ptr_array_new();
    g_autoptr(GPtrArray) first = g_ptr_array_new();
    ExtlockLock *held, *last = NULL, *shared;

    held = req(f, 0, 100, EX);
    for (int i = 0; i < 200; i++) {
        last = req(f, i % 50, 100, EX);
    }
    shared = req(f, 10, 20, SH);
    assert_true(GRANTED(held));
    assert_false(GRANTED(last) || GRANTED(shared));

    extlock_table_foreach_conflict(f->table, last, m_conflict_cb, all);
    assert_int_equal(all->len, 200);       /* @shared does not overlap */
    compare_conflict_parts(f, last, all);
    g_ptr_array_set_size(all, 0);
    extlock_table_foreach_conflict(f->table, shared, m_conflict_cb, all);
    compare_conflict_parts(f, shared, all);
    g_ptr_array_set_size(all, 0);
    extlock_table_foreach_conflict(f->table, held, m_conflict_cb, all);
    assert_int_equal(all->len, 201);
    compare_conflict_parts(f, held, all);

    /* 200 blockers (the holder first), 64 of them asked for */
    extlock_table_foreach_blocker_first(f->table, last, 64, m_conflict_cb,
                                        first);
    assert_int_equal(first->len, 64);
    assert_ptr_equal(first->pdata[0], held);
}

static void compare(Fixture *f, Model *m)
{
    const ExtlockTableStats *st = extlock_table_stats(f->table);
    guint i;

    /* Grants happened exactly as the reference says, in token order */
    assert_int_equal(f->log->len, m->newly->len);
    for (i = 0; i < m->newly->len; i++) {
        assert_int_equal(g_array_index(f->log, uint64_t, i),
                         g_array_index(m->newly, MGrant, i).id);
    }
    g_array_set_size(f->log, 0);
    g_array_set_size(m->newly, 0);

    for (i = 0; i < m->locks->len; i++) {
        MLock *ml = m->locks->pdata[i];
        ExtlockLock *l = extlock_table_lookup(f->table, ml->id);

        assert_ptr_equal(l, ml->lock);
        assert_int_equal(l->id, ml->id);
        assert_int_equal(l->token, ml->token);
        assert_int_equal(l->mode, ml->mode);
        assert_int_equal(l->node.ext.start, ml->ext.start);
        assert_int_equal(l->node.ext.end, ml->ext.end);
        assert_int_equal(l->requested.start, ml->requested.start);
        assert_int_equal(l->requested.end, ml->requested.end);
        assert_int_equal(l->limit.start, ml->limit.start);
        assert_int_equal(l->limit.end, ml->limit.end);
        assert_int_equal(GRANTED(l), ml->granted);
        assert_ptr_equal(l->owner, ml->owner);
        assert_int_equal(l->user_tag, ml->user_tag);
    }
    assert_int_equal(st->requests, m->st.requests);
    assert_int_equal(st->immediate_grants, m->st.immediate_grants);
    assert_int_equal(st->waits, m->st.waits);
    assert_int_equal(st->deferred_grants, m->st.deferred_grants);
    assert_int_equal(st->releases, m->st.releases);
    assert_int_equal(st->partial_releases, m->st.partial_releases);
    assert_int_equal(st->cancels, m->st.cancels);
    assert_int_equal(st->held, m->st.held);
    assert_int_equal(st->waiting, m->st.waiting);
    assert_int_equal(st->grown_grants, m->st.grown_grants);
    assert_int_equal(st->downgrades, m->st.downgrades);
    assert_int_equal(st->total_wait_us, f->wait_us_sum);
}

static MLock *m_pick(Model *m, GRand *r, bool granted)
{
    guint n = 0, i, k;

    for (i = 0; i < m->locks->len; i++) {
        n += ((MLock *)m->locks->pdata[i])->granted == granted;
    }
    if (n == 0) {
        return NULL;
    }
    k = (guint)g_rand_int_range(r, 0, (gint32)n);
    for (i = 0; i < m->locks->len; i++) {
        MLock *ml = m->locks->pdata[i];

        if (ml->granted == granted && k-- == 0) {
            return ml;
        }
    }
    g_assert_not_reached();
}

typedef struct Workload {
    guint32 seed;
    int ops;
    guint max_live;
    uint64_t range;              /* extents lie in [0, range) units */
    uint64_t max_len;
    uint64_t unit;
    int excl_pct;
    int grow_pct;                /* requests with a limit beyond the ext */
} Workload;

/* A random limit around @e: aligned to units or not, up to everything */
static ExtlockExtent pick_limit(GRand *r, const Workload *wl, ExtlockExtent e)
{
    uint64_t top = wl->range * wl->unit;
    ExtlockExtent l = e;

    switch (g_rand_int_range(r, 0, 5)) {
    case 0:
        l = ext(0, EXTLOCK_EXTENT_END_MAX);
        break;
    case 1:
        /* Unit boundaries */
        l.start -= (uint64_t)g_rand_int_range(
            r, 0, (gint32)(e.start / wl->unit) + 1) * wl->unit;
        l.end += (uint64_t)g_rand_int_range(
            r, 0, (gint32)((top - e.end) / wl->unit) + 1) * wl->unit;
        break;
    case 2:
        /* Any byte */
        l.start -= (uint64_t)g_rand_double_range(r, 0, e.start + 1.0);
        l.end += (uint64_t)g_rand_double_range(r, 0, top - e.end + 1.0);
        l.start = MIN(l.start, e.start);
        l.end = MIN(MAX(l.end, e.end), top);
        break;
    case 3:
        l.start = 0;
        break;
    default:
        l.end = EXTLOCK_EXTENT_END_MAX;
        break;
    }
    return l;
}

static void op_request(Fixture *f, Model *m, GRand *r, const Workload *wl)
{
    static char owners[4];
    MLock *ml = g_new0(MLock, 1);
    uint64_t s = (uint64_t)g_rand_int_range(r, 0, (gint32)wl->range);
    uint64_t len = 1 + (uint64_t)g_rand_int_range(r, 0, (gint32)wl->max_len);

    if (s + len > wl->range) {
        len = wl->range - s;
    }
    ml->ext = ext(s * wl->unit, (s + len) * wl->unit);
    ml->requested = ml->limit = ml->ext;
    if (g_rand_int_range(r, 0, 100) < wl->grow_pct) {
        ml->limit = pick_limit(r, wl, ml->ext);
    }
    ml->mode = g_rand_int_range(r, 0, 100) < wl->excl_pct ? EX : SH;
    ml->token = ++f->token;
    ml->owner = &owners[g_rand_int_range(r, 0, 4)];
    ml->user_tag = g_rand_int(r);
    ml->id = m->next_id++;
    ml->granted = m_grantable(m, ml);
    /* At request time every waiter is earlier: no conflict at all */
    {
        guint i;

        for (i = 0; i < m->locks->len; i++) {
            if (m_conflict(m->locks->pdata[i], ml)) {
                assert_false(ml->granted);
            }
        }
    }
    if (ml->granted) {
        ml->ext = m_grow(m, ml, m->locks->len + 1);
    }
    if (ml->limit.start == ml->requested.start &&
        ml->limit.end == ml->requested.end && g_rand_boolean(r)) {
        ml->lock = extlock_table_request(f->table, ml->requested, ml->mode,
                                         ml->token, ml->owner, ml->user_tag);
    } else {
        ml->lock = extlock_table_request_grow(f->table, ml->requested,
                                              ml->limit, ml->mode, ml->token,
                                              ml->owner, ml->user_tag);
    }
    assert_non_null(ml->lock);
    g_ptr_array_add(m->locks, ml);
    m->st.requests++;
    if (ml->granted) {
        m->st.immediate_grants++;
        m->st.held++;
        add_id(m->ever_granted, ml->id);
    } else {
        m->st.waits++;
        m->st.waiting++;
    }
}

static void op_downgrade(Fixture *f, Model *m, MLock *ml)
{
    assert_int_equal(extlock_table_downgrade(f->table, ml->lock), 0);
    if (ml->mode == EX) {
        ml->mode = SH;
        m->st.downgrades++;
    }
    m_settle(m);
}

static void op_release(Fixture *f, Model *m, MLock *ml)
{
    extlock_table_release(f->table, ml->lock);
    m_remove(m, ml);
    m_settle(m);
}

/* Uniform enough in [0, n) for any n >= 1 (grown extents reach 2^63) */
static uint64_t rand_below(GRand *r, uint64_t n)
{
    uint64_t x = (uint64_t)g_rand_int(r) << 32 | g_rand_int(r);

    return x % n;
}

static void op_release_part(Fixture *f, Model *m, GRand *r, MLock *ml,
                            const Workload *wl)
{
    uint64_t s = ml->ext.start, e = ml->ext.end, ps, pe;
    ExtlockLock *out = NULL, *split = NULL;
    int ret;

    if (g_rand_int_range(r, 0, 8) == 0) {
        /* Invalid: sticks out of the lock or is empty */
        switch (g_rand_int_range(r, 0, 3)) {
        case 0:
            ps = s > 0 ? s - 1 : s;
            pe = ps == s ? e + 1 : e;
            break;
        case 1:
            ps = s;
            pe = e + 1 + (uint64_t)g_rand_int_range(r, 0, 4);
            break;
        default:
            ps = pe = s + rand_below(r, e - s);
            break;
        }
        ret = extlock_table_release_part(f->table, ml->lock, ext(ps, pe),
                                         &out, &split);
        assert_int_equal(ret, -EINVAL);
        return;
    }

    /* Valid, biased towards unit boundaries to hit every shape */
    if (g_rand_boolean(r)) {
        ps = s + rand_below(r, e - s);
        pe = ps + 1 + rand_below(r, e - ps);
    } else if ((e - s) / wl->unit > 0) {
        uint64_t units = (e - s) / wl->unit;
        uint64_t a = rand_below(r, units);
        uint64_t b = a + 1 + rand_below(r, units - a);

        ps = s + a * wl->unit;
        pe = s + b * wl->unit;
    } else {
        ps = s;
        pe = e;
    }
    if (pe > e) {
        pe = e;
    }
    ret = extlock_table_release_part(f->table, ml->lock, ext(ps, pe),
                                     &out, &split);
    assert_int_equal(ret, 0);
    m->st.partial_releases++;
    if (ps == s && pe == e) {
        assert_null(out);
        assert_null(split);
        m_remove(m, ml);
    } else if (ps == s || pe == e) {
        assert_ptr_equal(out, ml->lock);
        assert_null(split);
        ml->ext = ps == s ? ext(pe, e) : ext(s, ps);
    } else {
        MLock *up = g_new0(MLock, 1);

        assert_ptr_equal(out, ml->lock);
        assert_non_null(split);
        *up = *ml;
        up->id = m->next_id++;
        up->ext = ext(pe, e);
        up->lock = split;
        ml->ext = ext(s, ps);
        g_ptr_array_add(m->locks, up);
        m->st.held++;
        add_id(m->ever_granted, up->id);
    }
    m_settle(m);
}

static void run_workload(const Workload *wl)
{
    Fixture *f;
    Model m = { 0 };
    g_autoptr(GRand) r = g_rand_new_with_seed(wl->seed);
    uint64_t id;
    int op;

    setup((void **)&f);
    f->check_in_cb = false;             /* debug checks already cover it */
    m.locks = g_ptr_array_new();
    m.next_id = 1;
    m.ever_granted = g_hash_table_new_full(g_int64_hash, g_int64_equal,
                                           g_free, NULL);
    m.cancelled = g_hash_table_new_full(g_int64_hash, g_int64_equal,
                                        g_free, NULL);
    m.newly = g_array_new(FALSE, FALSE, sizeof(MGrant));

    for (op = 0; op < wl->ops; op++) {
        int dice = g_rand_int_range(r, 0, 100);
        MLock *ml;

        if (dice < 45 && m.locks->len < wl->max_live) {
            op_request(f, &m, r, wl);
        } else if (dice < 70 && (ml = m_pick(&m, r, true))) {
            op_release(f, &m, ml);
        } else if (dice < 82 && (ml = m_pick(&m, r, true))) {
            op_release_part(f, &m, r, ml, wl);
        } else if (dice < 90 && (ml = m_pick(&m, r, true))) {
            op_downgrade(f, &m, ml);
        } else if ((ml = m_pick(&m, r, false))) {
            switch (g_rand_int_range(r, 0, 8)) {
            case 0:
            case 1:
                /* A waiting lock cannot be partially released */
                assert_int_equal(extlock_table_release_part(
                                     f->table, ml->lock, ml->ext,
                                     NULL, NULL), -EINVAL);
                break;
            case 2:
                /* ... nor downgraded */
                assert_int_equal(extlock_table_downgrade(f->table,
                                                         ml->lock),
                                 -EINVAL);
                break;
            default:
                op_release(f, &m, ml);   /* cancel */
                break;
            }
        }
        compare(f, &m);
        if (m.locks->len > 0) {
            compare_conflicts(f, &m, m.locks->pdata[
                g_rand_int_range(r, 0, (gint32)m.locks->len)]);
        }
    }

    /*
     * Drain: releasing holders must eventually grant every waiter.  While
     * anything is left, something must be granted (else waiters would
     * wait for each other forever).
     */
    while (m.locks->len > 0) {
        MLock *ml = m_pick(&m, r, true);

        assert_non_null(ml);
        op_release(f, &m, ml);
        compare(f, &m);
    }
    assert_int_equal(extlock_table_stats(f->table)->held, 0);
    assert_int_equal(extlock_table_stats(f->table)->waiting, 0);
    for (id = 1; id < m.next_id; id++) {
        assert_true(g_hash_table_contains(m.ever_granted, &id) ||
                    g_hash_table_contains(m.cancelled, &id));
    }
    /* Every request that waited was either granted or cancelled */
    assert_int_equal(m.st.waits, m.st.deferred_grants + m.st.cancels);
    assert_int_equal(g_hash_table_size(m.cancelled), m.st.cancels);

    g_hash_table_destroy(m.ever_granted);
    g_hash_table_destroy(m.cancelled);
    g_array_free(m.newly, TRUE);
    g_ptr_array_free(m.locks, TRUE);
    teardown((void **)&f);
}

static void test_random_small(void **state)
{
    Workload wl = {
        .ops = 2000, .max_live = 24, .range = 32, .max_len = 8,
        .unit = 4096,
    };
    guint32 seed;

    for (seed = 1; seed <= 200; seed++) {
        wl.seed = seed;
        wl.excl_pct = (int)(seed % 5) * 20 + 10;   /* 10% .. 90% */
        wl.max_len = seed % 3 == 0 ? 32 : 8;
        wl.grow_pct = (int)(seed % 4) * 25;        /* 0% .. 75% */
        run_workload(&wl);
    }
}

static void test_random_large(void **state)
{
    Workload wl = {
        .ops = 3000, .max_live = 120, .range = 2048, .max_len = 64,
        .unit = 512, .excl_pct = 30, .grow_pct = 20,
    };
    guint32 seed;

    for (seed = 500; seed < 504; seed++) {
        wl.seed = seed;
        run_workload(&wl);
    }
}

/* Lighter contention: many locks granted side by side */
static void test_random_sparse(void **state)
{
    Workload wl = {
        .ops = 2000, .max_live = 48, .range = 256, .max_len = 16,
        .unit = 1, .excl_pct = 50, .grow_pct = 30,
    };
    guint32 seed;

    for (seed = 2000; seed < 2050; seed++) {
        wl.seed = seed;
        run_workload(&wl);
    }
}

/*
 * Units of a few MiB, not aligned to the cap's 32 MiB, and often more
 * than 32 locks: growth is capped about half of the time.
 */
static void test_random_cap(void **state)
{
    Workload wl = {
        .ops = 2000, .max_live = 64, .range = 160, .max_len = 12,
        .unit = 3 * (UINT64_C(1) << 20) + 4096, .excl_pct = 40,
        .grow_pct = 70,
    };
    guint32 seed;

    for (seed = 3000; seed < 3020; seed++) {
        wl.seed = seed;
        run_workload(&wl);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mode_matrix),
        cmocka_unit_test_setup_teardown(test_ids_and_lookup, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_edge_overlaps, setup, teardown),
        cmocka_unit_test_setup_teardown(test_release_part, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ordering, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel_unblocks, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_blockers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reclaim, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stats, setup, teardown),
        cmocka_unit_test_setup_teardown(test_starvation, setup, teardown),
        cmocka_unit_test_setup_teardown(test_foreach, setup, teardown),
        cmocka_unit_test_setup_teardown(test_check_detects, setup, teardown),
        cmocka_unit_test_setup_teardown(test_debug_checks_abort, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_grow_alone, setup, teardown),
        cmocka_unit_test_setup_teardown(test_grow_stops, setup, teardown),
        cmocka_unit_test_setup_teardown(test_grow_deferred, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_grow_cap, setup, teardown),
        cmocka_unit_test_setup_teardown(test_downgrade, setup, teardown),
        cmocka_unit_test_setup_teardown(test_conflict_parts_many, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_foreach_conflict, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_check_detects_growth, setup,
                                        teardown),
        cmocka_unit_test(test_random_small),
        cmocka_unit_test(test_random_sparse),
        cmocka_unit_test(test_random_large),
        cmocka_unit_test(test_random_cap),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
