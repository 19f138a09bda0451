/*
 * extlock: integration tests of lock caching (growth, revocation,
 * downgrade) and recovery (state file, grace period, reclaim) in extlockd
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Like test-extlockd.c, every test runs the real daemon (with
 * --debug-checks, so a grant that overlaps a conflicting lock aborts it)
 * in a fresh directory; see extlockd-harness.h.  Daemons are killed with
 * SIGKILL to simulate crashes and restarted on the same state file.
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include <glib.h>
#include <gio/gio.h>
#include <json-c/json.h>

#include "extlockd-harness.h"

#define KiB             (UINT64_C(1) << 10)
#define MiB             (UINT64_C(1) << 20)
#define GiB             (UINT64_C(1) << 30)

/* ------------------------------------------------------------------ */
/* Helpers                                                             */

/* The next message is "waiting" for @id; returns its token */
static uint64_t expect_waiting(ExtlockConn *c, uint64_t id,
                               guint nblockers)
{
    ExtlockMsg w;
    uint64_t token;

    extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
    expect_msg(c, &w, EXTLOCK_MSG_WAITING, id);
    assert_non_null(w.blockers);
    assert_int_equal(w.blockers->len, nblockers);
    token = w.token;
    extlock_msg_clear(&w);
    return token;
}

/* The next message is a revoke of @lock for [offset, +length) */
static void expect_revoke(ExtlockConn *c, uint64_t lock, uint64_t offset,
                          uint64_t length, ExtlockMode mode, uint64_t token)
{
    ExtlockMsg m;

    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    recv_msg(c, &m, 3000);
    if (m.type != EXTLOCK_MSG_REVOKE) {
        fail_msg("expected a revoke of lock %" PRIu64 ", got %s",
                 lock, extlock_msg_type_name(m.type));
    }
    assert_false(m.has_id);
    assert_int_equal(m.lock, lock);
    assert_int_equal(m.offset, offset);
    assert_int_equal(m.length, length);
    assert_int_equal(m.mode, mode);
    assert_int_equal(m.token, token);
    extlock_msg_clear(&m);
}

/* hello with "session"; the welcome is left in @w */
static void hello_session(ExtlockConn *c, const char *client_id,
                          const char *session, ExtlockMsg *w)
{
    ExtlockMsg m;

    extlock_msg_init(&m, EXTLOCK_MSG_HELLO);
    m.client_id = (char *)client_id;
    m.lock_space = (char *)"disk";
    m.session = (char *)session;
    m.resume_secret = secret_of(session);
    m.lease_ms = LONG_LEASE_MS;
    send_msg(c, &m);
    extlock_msg_init(w, EXTLOCK_MSG_INVALID);
    expect_msg(c, w, EXTLOCK_MSG_WELCOME, m.id);
    assert_int_equal(w->lease_ms, LONG_LEASE_MS);
}

/* Connect and come back as @session, which must be told to reclaim */
static ExtlockConn *reclaimer(Daemon *d, const char *client_id,
                              const char *session, uint64_t epoch)
{
    ExtlockConn *c = conn_open(session_home(d, session));
    ExtlockMsg w;

    hello_session(c, client_id, session, &w);
    assert_string_equal(w.session, session);
    assert_true(w.reclaim);
    assert_false(w.resumed);
    assert_null(w.locks);
    assert_int_equal(w.epoch, epoch);
    assert_true(w.grace_remaining_ms > 0);
    extlock_msg_clear(&w);
    return c;
}

static uint64_t send_reclaim(ExtlockConn *c, uint64_t offset,
                             uint64_t length, ExtlockMode mode,
                             uint64_t token)
{
    ExtlockMsg m;

    extlock_msg_init(&m, EXTLOCK_MSG_RECLAIM);
    m.offset = offset;
    m.length = length;
    m.mode = mode;
    m.token = token;
    send_msg(c, &m);
    return m.id;
}

/* reclaim that must succeed: a new lock with the old token */
static Grant reclaim_ok(ExtlockConn *c, uint64_t offset, uint64_t length,
                        ExtlockMode mode, uint64_t token)
{
    uint64_t id = send_reclaim(c, offset, length, mode, token);
    Grant g = expect_granted(c, id, offset, length, mode);

    assert_int_equal(g.token, token);
    return g;
}

static void reclaim_fails(ExtlockConn *c, uint64_t offset, uint64_t length,
                          ExtlockMode mode, uint64_t token,
                          ExtlockErrorCode code)
{
    uint64_t id = send_reclaim(c, offset, length, mode, token);

    expect_error(c, true, id, code);
}

static void reclaim_done(ExtlockConn *c)
{
    uint64_t id = send_simple(c, EXTLOCK_MSG_RECLAIM_DONE);
    ExtlockMsg r;

    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    expect_msg(c, &r, EXTLOCK_MSG_RECLAIM_COMPLETE, id);
    extlock_msg_clear(&r);
}

static void downgrade(ExtlockConn *c, uint64_t lock)
{
    ExtlockMsg m, r;

    extlock_msg_init(&m, EXTLOCK_MSG_DOWNGRADE);
    m.lock = lock;
    send_msg(c, &m);
    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    expect_msg(c, &r, EXTLOCK_MSG_DOWNGRADED, m.id);
    assert_int_equal(r.lock, lock);
    assert_int_equal(r.mode, EXTLOCK_MODE_SHARED);
    extlock_msg_clear(&r);
}

static void crash(Daemon *d)
{
    assert_int_equal(kill(d->pid, SIGKILL), 0);
    assert_true(daemon_wait_exit(d, 5000));
    assert_true(WIFSIGNALED(d->status));
}

static json_object *space_counters(json_object *st)
{
    return jget(first_space(st), "counters");
}

static bool jbool(json_object *obj, const char *key)
{
    json_object *v = jget(obj, key);

    assert_true(json_object_is_type(v, json_type_boolean));
    return json_object_get_boolean(v);
}

/*
 * The status without what changes by itself (times, message counters) or
 * with the grace period running, as a string
 */
static char *status_fixed(ExtlockConn *mon)
{
    json_object *st = status_get(mon);
    json_object *spaces = jget(st, "lock-spaces");
    char *text;

    json_object_object_del(st, "uptime-ms");
    json_object_object_del(st, "grace-remaining-ms");
    json_object_object_del(jget(st, "counters"), "messages");
    json_object_object_del(jget(st, "counters"), "errors");
    for (size_t i = 0; i < json_object_array_length(spaces); i++) {
        json_object *sp = json_object_array_get_idx(spaces, i);

        json_object_object_del(sp, "grace-remaining-ms");
        del_each(jget(sp, "held"), "held-ms");
        del_each(jget(sp, "waiting"), "waited-ms");
    }
    del_each(jget(st, "sessions"), "lease-remaining-ms");
    text = g_strdup(json_object_to_json_string_ext(st,
                                                   JSON_C_TO_STRING_PLAIN));
    json_object_put(st);
    return text;
}

static int compare_str_ptrs(gconstpointer a, gconstpointer b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The sessions listed in the state file at @path, as a sorted string */
static char *state_sessions(const char *path, uint64_t *epoch)
{
    g_autofree char *text = NULL;
    g_autoptr(GPtrArray) ids = g_ptr_array_new_with_free_func(g_free);
    json_object *st, *arr;
    char *joined;

    assert_true(g_file_get_contents(path, &text, NULL, NULL));
    st = json_tokener_parse(text);
    assert_non_null(st);
    assert_int_equal(jint(st, "version"), 1);
    if (epoch) {
        *epoch = jint(st, "epoch");
    }
    if (json_object_object_get_ex(st, "sessions", &arr)) {
        assert_true(json_object_array_length(arr) > 0);
        for (size_t i = 0; i < json_object_array_length(arr); i++) {
            json_object *e = json_object_array_get_idx(arr, i);

            assert_string_equal(jstr(e, "lock-space"), "disk");
            g_ptr_array_add(ids, g_strdup_printf("%s=%s",
                                                 jstr(e, "client-id"),
                                                 jstr(e, "session")));
        }
    }
    g_ptr_array_sort(ids, compare_str_ptrs);
    g_ptr_array_add(ids, NULL);
    joined = g_strjoinv(",", (char **)ids->pdata);
    json_object_put(st);
    return joined;
}

/* ------------------------------------------------------------------ */
/* Growth and revocation                                               */

/*
 * A lone client's lock with limit [0, 1 GiB) is granted whole; another
 * client's conflicting request makes it get a revoke with the waiter's
 * extent, mode and token; A gives back the tail, and B is granted grown
 * up to A's remaining lock.
 */
static void test_growth_revoke(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->tcp_addr, "B", LONG_LEASE_MS);
    ExtlockConn *mon = conn_open(d->unix_addr);
    json_object *st, *held;
    ExtlockMsg r;
    uint64_t ra, rb, tb;
    Grant ga, gb;

    ra = send_lock_limit(a, 4 * KiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE,
                         0, GiB);
    ga = expect_granted(a, ra, 0, GiB, EXTLOCK_MODE_EXCLUSIVE);

    st = status_get(mon);
    held = json_object_array_get_idx(jget(first_space(st), "held"), 0);
    assert_int_equal(jint(held, "offset"), 0);
    assert_int_equal(jint(held, "length"), GiB);
    assert_int_equal(jint(held, "requested-offset"), 4 * KiB);
    assert_int_equal(jint(held, "requested-length"), 4 * KiB);
    assert_int_equal(jint(space_counters(st), "grown-grants"), 1);
    assert_int_equal(jint(space_counters(st), "revokes-sent"), 0);
    json_object_put(st);

    /* B wants something in the middle: A is asked to give it back */
    rb = send_lock_limit(b, 512 * MiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE,
                         0, GiB);
    tb = expect_waiting(b, rb, 1);
    expect_revoke(a, ga.lock, 512 * MiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE,
                  tb);
    expect_quiet(a, QUIET_MS);
    expect_quiet(b, 10);

    /* A keeps the head it uses and returns the rest */
    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    unlock_part(a, ga.lock, 256 * MiB, 768 * MiB, &r);
    assert_int_equal(r.pieces->len, 1);
    assert_int_equal(g_array_index(r.pieces, ExtlockPiece, 0).lock,
                     ga.lock);
    assert_int_equal(g_array_index(r.pieces, ExtlockPiece, 0).length,
                     256 * MiB);
    extlock_msg_clear(&r);

    /* B grows from its request up to A's remaining lock */
    gb = expect_granted(b, rb, 256 * MiB, 768 * MiB,
                        EXTLOCK_MODE_EXCLUSIVE);
    assert_int_equal(gb.token, tb);
    expect_quiet(a, QUIET_MS);

    st = status_get(mon);
    assert_int_equal(jint(space_counters(st), "grown-grants"), 2);
    assert_int_equal(jint(space_counters(st), "revokes-sent"), 1);
    assert_int_equal(jint(space_counters(st), "partial-releases"), 1);
    json_object_put(st);

    unlock_all(a, ga.lock);
    unlock_all(b, gb.lock);
    daemon_stop(d);
}

/*
 * A waiting reader makes an exclusive holder get a shared revoke; the
 * holder downgrades and the reader is granted (grown over the now shared
 * lock).  A later writer then gets revokes sent to both readers.
 */
static void test_downgrade(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->tcp_addr, "B", LONG_LEASE_MS);
    ExtlockConn *c = client(d->unix_addr, "C", LONG_LEASE_MS);
    ExtlockConn *mon = conn_open(d->unix_addr);
    json_object *st;
    ExtlockMsg m;
    uint64_t ra, rb, rc, tb, tc;
    Grant ga, gb, gc;

    ra = send_lock_limit(a, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, 0, MiB);
    ga = expect_granted(a, ra, 0, MiB, EXTLOCK_MODE_EXCLUSIVE);

    rb = send_lock_limit(b, 64 * KiB, 4 * KiB, EXTLOCK_MODE_SHARED, 0, MiB);
    tb = expect_waiting(b, rb, 1);
    expect_revoke(a, ga.lock, 64 * KiB, 4 * KiB, EXTLOCK_MODE_SHARED, tb);

    /* Downgrading someone else's lock or an unknown one: not-found */
    extlock_msg_init(&m, EXTLOCK_MSG_DOWNGRADE);
    m.lock = ga.lock;
    send_msg(c, &m);
    expect_error(c, true, m.id, EXTLOCK_ERR_NOT_FOUND);
    extlock_msg_init(&m, EXTLOCK_MSG_DOWNGRADE);
    m.lock = 987654;
    send_msg(a, &m);
    expect_error(a, true, m.id, EXTLOCK_ERR_NOT_FOUND);
    expect_quiet(b, 10);

    downgrade(a, ga.lock);
    gb = expect_granted(b, rb, 0, MiB, EXTLOCK_MODE_SHARED);
    assert_int_equal(gb.token, tb);
    /* A shared lock downgrades to itself */
    downgrade(a, ga.lock);

    /* A writer in the middle: both readers are asked, once each */
    rc = send_lock_limit(c, 128 * KiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE,
                         0, MiB);
    tc = expect_waiting(c, rc, 2);
    expect_revoke(a, ga.lock, 128 * KiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE,
                  tc);
    expect_revoke(b, gb.lock, 128 * KiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE,
                  tc);
    unlock_all(a, ga.lock);
    expect_quiet(c, QUIET_MS);
    unlock_all(b, gb.lock);
    gc = expect_granted(c, rc, 0, MiB, EXTLOCK_MODE_EXCLUSIVE);
    assert_int_equal(gc.token, tc);
    expect_quiet(a, 10);
    expect_quiet(b, 10);

    st = status_get(mon);
    assert_int_equal(jint(space_counters(st), "downgrades"), 1);
    assert_int_equal(jint(space_counters(st), "revokes-sent"), 3);
    json_object_put(st);
    daemon_stop(d);
}

/*
 * A session's own cached lock blocks its next request: it gets the revoke
 * itself, after the "waiting" reply.  Another waiter gets one more revoke
 * for the same lock, and nobody gets duplicates.
 */
static void test_own_session_revoke(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->tcp_addr, "B", LONG_LEASE_MS);
    ExtlockMsg m, r;
    uint64_t r1, r2, rb, t2, tb;
    Grant g1, g2, gb;

    r1 = send_lock_limit(a, 0, 4 * KiB, EXTLOCK_MODE_SHARED, 0, 64 * KiB);
    g1 = expect_granted(a, r1, 0, 64 * KiB, EXTLOCK_MODE_SHARED);

    r2 = send_lock_limit(a, 8 * KiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE,
                         0, 64 * KiB);
    t2 = expect_waiting(a, r2, 1);
    expect_revoke(a, g1.lock, 8 * KiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, t2);

    /*
     * A later reader inside A's lock and A's waiting writer waits behind
     * the writer; A's lock is shared, so it is no reason for a revoke
     */
    rb = send_lock(b, 9 * KiB, 1, EXTLOCK_MODE_SHARED, true);
    tb = expect_waiting(b, rb, 1);
    expect_quiet(a, QUIET_MS);

    /*
     * A returns the tail from its request on: its request is granted
     * (before the reply to the unlock that caused it).  It grows to the
     * end of the limit (the later reader inside it does not stop the
     * request itself), and as it is granted while that reader waits, A
     * gets a revoke for it at once.
     */
    extlock_msg_init(&m, EXTLOCK_MSG_UNLOCK);
    m.lock = g1.lock;
    m.has_extent = true;
    m.offset = 8 * KiB;
    m.length = 56 * KiB;
    send_msg(a, &m);
    g2 = expect_granted(a, r2, 8 * KiB, 56 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    assert_int_equal(g2.token, t2);
    expect_revoke(a, g2.lock, 9 * KiB, 1, EXTLOCK_MODE_SHARED, tb);
    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    expect_msg(a, &r, EXTLOCK_MSG_UNLOCKED, m.id);
    assert_int_equal(r.pieces->len, 1);
    extlock_msg_clear(&r);
    expect_quiet(a, QUIET_MS);
    expect_quiet(b, 10);
    downgrade(a, g2.lock);
    gb = expect_granted(b, rb, 9 * KiB, 1, EXTLOCK_MODE_SHARED);
    assert_int_equal(gb.token, tb);
    unlock_all(a, g1.lock);
    unlock_all(a, g2.lock);
    unlock_all(b, gb.lock);
    expect_quiet(a, 10);
    daemon_stop(d);
}

/*
 * When a waiting request is granted while a later conflicting request
 * waits, the new holder gets a revoke right away; so does the holder of a
 * piece split off by a partial unlock (after the reply that names it).
 */
static void test_revoke_on_grant_and_split(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->tcp_addr, "B", LONG_LEASE_MS);
    ExtlockConn *c = client(d->unix_addr, "C", LONG_LEASE_MS);
    ExtlockMsg r;
    ExtlockPiece *p;
    uint64_t ra, rb, rc, tb, tc, td, split;
    Grant ga, gb, gc;

    ra = send_lock_limit(a, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, 0, 64 * KiB);
    ga = expect_granted(a, ra, 0, 64 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    rb = send_lock_limit(b, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, 0, 64 * KiB);
    tb = expect_waiting(b, rb, 1);
    expect_revoke(a, ga.lock, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, tb);
    rc = send_lock(c, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, true);
    tc = expect_waiting(c, rc, 2);
    expect_revoke(a, ga.lock, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, tc);
    expect_quiet(b, QUIET_MS);

    /* A punches a hole that B does not need: no grant yet */
    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    unlock_part(a, ga.lock, 16 * KiB, 16 * KiB, &r);
    assert_int_equal(r.pieces->len, 2);
    p = &g_array_index(r.pieces, ExtlockPiece, 1);
    split = p->lock;
    assert_int_not_equal(split, ga.lock);
    assert_int_equal(p->offset, 32 * KiB);
    extlock_msg_clear(&r);
    expect_quiet(b, 10);
    /* The split piece conflicts with nobody waiting: no revoke */
    expect_quiet(a, QUIET_MS);

    /* A gives back its lower piece: B is granted, and revoked for C */
    unlock_all(a, ga.lock);
    gb = expect_granted(b, rb, 0, 32 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    expect_revoke(b, gb.lock, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, tc);
    expect_quiet(b, QUIET_MS);

    /*
     * B keeps 0..8K (so C still waits), punches a hole at 16K..24K:
     * the split piece [24K, 32K) overlaps no waiter, and C's extent
     * stays in the lower piece, which was revoked already
     */
    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    unlock_part(b, gb.lock, 16 * KiB, 8 * KiB, &r);
    assert_int_equal(r.pieces->len, 2);
    extlock_msg_clear(&r);
    expect_quiet(b, QUIET_MS);

    /* A new waiter in the piece A split off earlier: A is asked */
    ra = send_lock(c, 40 * KiB, 1, EXTLOCK_MODE_SHARED, true);
    td = expect_waiting(c, ra, 1);
    expect_revoke(a, split, 40 * KiB, 1, EXTLOCK_MODE_SHARED, td);
    expect_quiet(a, QUIET_MS);
    unlock_all(a, split);
    ga = expect_granted(c, ra, 40 * KiB, 1, EXTLOCK_MODE_SHARED);
    unlock_all(c, ga.lock);

    unlock_all(b, gb.lock);
    gc = expect_granted(c, rc, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    assert_int_equal(gc.token, tc);
    daemon_stop(d);
}

/*
 * A hole punched into a revoked lock whose waiter wants the upper part:
 * the new upper piece is revoked for that waiter.
 */
static void test_split_revoke(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->tcp_addr, "B", LONG_LEASE_MS);
    ExtlockMsg r;
    uint64_t ra, rb, tb, split;
    Grant ga, gb;

    ra = send_lock_limit(a, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, 0, 64 * KiB);
    ga = expect_granted(a, ra, 0, 64 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    rb = send_lock(b, 40 * KiB, 4 * KiB, EXTLOCK_MODE_SHARED, true);
    tb = expect_waiting(b, rb, 1);
    expect_revoke(a, ga.lock, 40 * KiB, 4 * KiB, EXTLOCK_MODE_SHARED, tb);

    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    unlock_part(a, ga.lock, 8 * KiB, 8 * KiB, &r);
    assert_int_equal(r.pieces->len, 2);
    split = g_array_index(r.pieces, ExtlockPiece, 1).lock;
    extlock_msg_clear(&r);
    expect_revoke(a, split, 40 * KiB, 4 * KiB, EXTLOCK_MODE_SHARED, tb);
    expect_quiet(a, QUIET_MS);

    downgrade(a, split);
    gb = expect_granted(b, rb, 40 * KiB, 4 * KiB, EXTLOCK_MODE_SHARED);
    unlock_all(b, gb.lock);
    unlock_all(a, ga.lock);
    unlock_all(a, split);
    daemon_stop(d);
}

/*
 * Clients that never use "limit", "reclaim" or "downgrade" (plain per-I/O
 * lockers) get no revokes; a resumed caching session gets again the
 * revokes it may have missed while it was away.
 */
static void test_revoke_opt_in_and_resume(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = conn_open(d->unix_addr);
    ExtlockConn *b = client(d->tcp_addr, "B", LONG_LEASE_MS);
    ExtlockConn *c = client(d->unix_addr, "C", LONG_LEASE_MS);
    ExtlockConn *mon = conn_open(d->unix_addr);
    g_autofree char *sa = hello_full(a, "A", "disk", LONG_LEASE_MS, NULL);
    json_object *st;
    ExtlockLockInfo *li;
    ExtlockMsg w;
    uint64_t ra, rb, rc, tb, tc;
    Grant ga, gc;

    /* Plain holder, plain waiter: nothing but the usual replies */
    gc = lock_now(c, 1 * MiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    rb = send_lock(b, 1 * MiB, 1, EXTLOCK_MODE_SHARED, true);
    expect_waiting(b, rb, 1);
    expect_quiet(c, QUIET_MS);
    unlock_all(c, gc.lock);
    gc = expect_granted(b, rb, 1 * MiB, 1, EXTLOCK_MODE_SHARED);
    unlock_all(b, gc.lock);

    /* A caches a lock and loses its connection */
    ra = send_lock_limit(a, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, 0, 64 * KiB);
    ga = expect_granted(a, ra, 0, 64 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    conn_drop(a);
    json_object_put(wait_session_state(mon, sa, "disconnected"));

    /* Requests queued meanwhile cannot reach A */
    rb = send_lock(b, 8 * KiB, 4 * KiB, EXTLOCK_MODE_SHARED, true);
    tb = expect_waiting(b, rb, 1);
    rc = send_lock(c, 16 * KiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, true);
    tc = expect_waiting(c, rc, 1);
    st = status_get(mon);
    assert_int_equal(jint(space_counters(st), "revokes-sent"), 0);
    json_object_put(st);

    /* A resumes: its lock is listed, and the revokes come again */
    a = conn_open(session_home(d, sa));
    hello_session(a, "A", sa, &w);
    assert_string_equal(w.session, sa);
    assert_true(w.resumed);
    assert_false(w.reclaim);
    assert_non_null(w.locks);
    assert_int_equal(w.locks->len, 1);
    li = &g_array_index(w.locks, ExtlockLockInfo, 0);
    assert_int_equal(li->lock, ga.lock);
    assert_int_equal(li->offset, 0);
    assert_int_equal(li->length, 64 * KiB);
    assert_int_equal(li->mode, EXTLOCK_MODE_EXCLUSIVE);
    assert_int_equal(li->token, ga.token);
    extlock_msg_clear(&w);
    expect_revoke(a, ga.lock, 8 * KiB, 4 * KiB, EXTLOCK_MODE_SHARED, tb);
    expect_revoke(a, ga.lock, 16 * KiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE,
                  tc);
    expect_quiet(a, QUIET_MS);

    unlock_all(a, ga.lock);
    expect_granted(b, rb, 8 * KiB, 4 * KiB, EXTLOCK_MODE_SHARED);
    expect_granted(c, rc, 16 * KiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    daemon_stop(d);
}

/* ------------------------------------------------------------------ */
/* Sessions and the state file                                         */

/*
 * hello with an unknown session starts a new session; with a session of
 * another client or lock-space it fails with not-found and changes
 * nothing.
 */
static void test_unknown_session(void **state)
{
    static const char unknown[] = "ffffffffffffffffffffffffffffffff";
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = conn_open(d->unix_addr);
    ExtlockConn *x = conn_open(d->unix_addr);
    ExtlockConn *mon = conn_open(d->unix_addr);
    g_autofree char *sa = hello_full(a, "A", "disk", LONG_LEASE_MS, NULL);
    g_autofree char *before = NULL, *after = NULL;
    ExtlockMsg w, m;
    json_object *st;

    lock_now(a, 0, 1, EXTLOCK_MODE_EXCLUSIVE);

    before = status_stable(mon, NULL);
    extlock_msg_init(&m, EXTLOCK_MSG_HELLO);
    m.client_id = (char *)"A";
    m.lock_space = (char *)"elsewhere";
    m.session = sa;
    m.resume_secret = secret_of(sa);
    send_msg(x, &m);
    expect_error(x, true, m.id, EXTLOCK_ERR_NOT_FOUND);
    extlock_msg_init(&m, EXTLOCK_MSG_HELLO);
    m.client_id = (char *)"X";
    m.lock_space = (char *)"disk";
    m.session = sa;
    m.resume_secret = secret_of(sa);
    send_msg(x, &m);
    expect_error(x, true, m.id, EXTLOCK_ERR_NOT_FOUND);
    after = status_stable(mon, NULL);
    assert_string_equal(before, after);

    hello_session(x, "X", unknown, &w);
    assert_int_equal(strlen(w.session), 32);
    assert_string_not_equal(w.session, unknown);
    assert_string_not_equal(w.session, sa);
    assert_false(w.resumed);
    assert_false(w.reclaim);
    assert_null(w.locks);
    assert_int_equal(w.grace_remaining_ms, 0);
    /* It is a working session */
    lock_now(x, 10, 1, EXTLOCK_MODE_EXCLUSIVE);
    st = status_get(mon);
    assert_non_null(find_session(st, w.session));
    assert_null(find_session(st, unknown));
    assert_false(jbool(find_session(st, w.session), "reclaiming"));
    assert_int_equal(jint(st, "grace-remaining-ms"), 0);
    json_object_put(st);
    extlock_msg_clear(&w);
    daemon_stop(d);
}

/*
 * The state file lists the sessions while they exist; bye removes them.
 * Files without "sessions" load; malformed sessions are refused.
 * Each session's lease is recorded, and the default grace period covers
 * the longest; --grace-ms=0 (which used to drop the sessions of the
 * previous run at once, while their clients could still use their
 * locks) is refused, and so is any grace period shorter than a listed
 * lease + fence margin, also for sessions of old files, which have no
 * recorded lease (the longest lease a client may ask for is assumed).
 */
static void test_state_file(void **state)
{
    static const char *const bad[] = {
        "{\"version\":1,\"epoch\":3,\"sessions\":{}}",
        "{\"version\":1,\"epoch\":3,\"sessions\":[1]}",
        "{\"version\":1,\"epoch\":3,\"sessions\":[{\"session\":\"xyz\","
        "\"client-id\":\"A\",\"lock-space\":\"disk\"}]}",
        "{\"version\":1,\"epoch\":3,\"sessions\":[{\"session\":"
        "\"0123456789ABCDEF0123456789abcdef\",\"client-id\":\"A\","
        "\"lock-space\":\"disk\"}]}",
        "{\"version\":1,\"epoch\":3,\"sessions\":[{\"session\":"
        "\"0123456789abcdef0123456789abcdef\",\"lock-space\":\"disk\"}]}",
        "{\"version\":1,\"epoch\":3,\"sessions\":[{\"session\":"
        "\"0123456789abcdef0123456789abcdef\",\"client-id\":\"\","
        "\"lock-space\":\"disk\"}]}",
        "{\"version\":1,\"epoch\":3,\"sessions\":[{\"session\":"
        "\"0123456789abcdef0123456789abcdef\",\"client-id\":\"A\","
        "\"lock-space\":\"disk\"},{\"session\":"
        "\"0123456789abcdef0123456789abcdef\",\"client-id\":\"B\","
        "\"lock-space\":\"disk\"}]}",
        "{\"version\":1,\"epoch\":3,\"sessions\":[{\"session\":"
        "\"0123456789abcdef0123456789abcdef\",\"client-id\":\"A\","
        "\"lock-space\":\"disk\",\"lease-ms\":99}]}",
        "{\"version\":1,\"epoch\":3,\"sessions\":[{\"session\":"
        "\"0123456789abcdef0123456789abcdef\",\"client-id\":\"A\","
        "\"lock-space\":\"disk\",\"lease-ms\":\"1000\"}]}",
        "{\"version\":1,\"epoch\":3,\"sessions\":[{\"session\":"
        "\"0123456789abcdef0123456789abcdef\",\"client-id\":\"A\","
        "\"lock-space\":\"disk\",\"lease-ms\":3600001}]}",
        "{\"version\":1,\"epoch\":3,\"sessions\":[{\"session\":"
        "\"0123456789abcdef0123456789abcdef\",\"client-id\":\"A\","
        "\"lock-space\":\"disk\",\"lease-ms\":1000,"
        "\"fence-margin-ms\":0}]}",
    };
    static const char old_listed[] =
        "{\"version\":1,\"epoch\":9,\"sessions\":[{\"session\":"
        "\"0123456789abcdef0123456789abcdef\",\"client-id\":\"A\","
        "\"lock-space\":\"disk\"}]}";
    static const char *const grace_5s[] = { "--grace-ms=5000", NULL };
    static const char *const no_grace[] = { "--grace-ms=0", NULL };
    g_autofree char *path = g_build_filename(fx.dir, "st", "state", NULL);
    g_autofree char *list = NULL, *expect = NULL, *text = NULL;
    g_autofree char *sa = NULL, *sb = NULL;
    ExtlockConn *a, *b, *mon;
    json_object *st;
    Daemon *d;
    uint64_t epoch;
    ExtlockMsg w;
    int64_t t0;

    d = daemon_start(path, NULL, NULL);
    a = conn_open(d->unix_addr);
    b = conn_open(d->tcp_addr);
    sa = hello_full(a, "A", "disk", LONG_LEASE_MS, NULL);
    sb = hello_full(b, "B", "disk", LONG_LEASE_MS, NULL);
    list = state_sessions(path, &epoch);
    expect = g_strdup_printf("A=%s,B=%s", sa, sb);
    assert_string_equal(list, expect);
    assert_int_equal(epoch, 1);
    bye(b);
    g_free(list);
    g_free(expect);
    /* Removals are written in the background (state-writer.h) */
    expect = g_strdup_printf("A=%s", sa);
    t0 = now_ms();
    while (list = state_sessions(path, NULL), strcmp(list, expect) != 0) {
        assert_true(now_ms() - t0 < RECV_MS);
        g_free(list);
        g_usleep(10 * 1000);
    }

    /* A clean stop keeps the sessions: they may reclaim after a restart */
    lock_now(a, 0, 10, EXTLOCK_MODE_EXCLUSIVE);
    daemon_stop(d);
    g_free(list);
    list = state_sessions(path, &epoch);
    assert_string_equal(list, expect);
    assert_int_equal(epoch, 1);

    /* No grace period at all is unsafe: refused, the file is unchanged */
    daemon_refused(path, no_grace, 2, "--grace-ms 0 is unsafe");
    g_free(list);
    list = state_sessions(path, &epoch);
    assert_string_equal(list, expect);
    assert_int_equal(epoch, 1);

    /* The default grace period covers A's recorded lease */
    d = daemon_start(path, NULL, NULL);
    mon = conn_open(d->unix_addr);
    st = status_get(mon);
    assert_int_equal(jint(st, "grace-ms"), LONG_LEASE_MS + MARGIN_MS);
    assert_true(jint(st, "grace-remaining-ms") > 0);
    json_object_put(st);
    a = reclaimer(d, "A", sa, 2);
    /* bye instead of reclaiming ends the session and the grace period */
    bye(a);
    /* Removals are written in the background (state-writer.h) */
    t0 = now_ms();
    for (;;) {
        g_free(list);
        list = state_sessions(path, &epoch);
        if (!list[0] || now_ms() - t0 >= RECV_MS) {
            break;
        }
        g_usleep(10 * 1000);
    }
    assert_string_equal(list, "");
    assert_int_equal(epoch, 2);
    st = status_get(mon);
    assert_int_equal(jint(st, "grace-remaining-ms"), 0);
    assert_int_equal(json_object_array_length(jget(st, "sessions")), 0);
    json_object_put(st);
    a = conn_open(d->unix_addr);
    hello_session(a, "A", sa, &w);
    assert_string_not_equal(w.session, sa);
    assert_false(w.reclaim);
    extlock_msg_clear(&w);
    /*
     * Not deferred: lock_now fails on the "waiting" message a request
     * deferred by a grace period gets (test_crash_reclaim), whatever the
     * load; a time bound (it was < lease + fence margin, 700 ms) is not
     * needed and fails when an ASan build is starved
     */
    lock_now(a, 0, 10, EXTLOCK_MODE_EXCLUSIVE);
    bye(a);
    daemon_stop(d);
    text = NULL;
    assert_true(g_file_get_contents(path, &text, NULL, NULL));
    assert_string_equal(text, "{\"version\":1,\"epoch\":2}\n");

    /* A session of an old file, without a recorded lease */
    assert_true(g_file_set_contents(path, old_listed, -1, NULL));
    daemon_refused(path, grace_5s, 2, "longest lease is 3600000 ms");
    d = daemon_start(path, NULL, NULL);
    mon = conn_open(d->unix_addr);
    st = status_get(mon);
    assert_int_equal(jint(st, "grace-ms"), 3600000 + MARGIN_MS);
    json_object_put(st);
    /*
     * It records no owner identity and no resume secret: nobody can
     * reclaim it (security), yet its locks stay protected for the grace
     */
    a = conn_open(d->unix_addr);
    {
        ExtlockMsg m;

        extlock_msg_init(&m, EXTLOCK_MSG_HELLO);
        m.client_id = (char *)"A";
        m.lock_space = (char *)"disk";
        m.session = (char *)"0123456789abcdef0123456789abcdef";
        m.lease_ms = LONG_LEASE_MS;
        send_msg(a, &m);
        expect_error(a, true, m.id, EXTLOCK_ERR_DENIED);
    }
    conn_drop(a);
    daemon_stop(d);

    /* An old file without sessions: no grace period */
    g_free(text);
    text = NULL;
    assert_true(g_file_set_contents(path, "{\"version\":1,\"epoch\":7}",
                                    -1, NULL));
    d = daemon_start(path, NULL, NULL);
    mon = conn_open(d->unix_addr);
    st = status_get(mon);
    assert_int_equal(jint(st, "grace-remaining-ms"), 0);
    json_object_put(st);
    a = client(d->unix_addr, "A", LONG_LEASE_MS);
    /* Not deferred: no "waiting" before the grant (see above) */
    lock_now(a, 0, 10, EXTLOCK_MODE_EXCLUSIVE);
    daemon_stop(d);

    for (size_t i = 0; i < G_N_ELEMENTS(bad); i++) {
        g_autofree char *log = NULL;

        assert_true(g_file_set_contents(path, bad[i], -1, NULL));
        d = daemon_spawn(path, NULL, NULL);
        if (!daemon_wait_exit(d, 5000)) {
            fail_msg("extlockd started with %s", bad[i]);
        }
        assert_true(WIFEXITED(d->status));
        assert_int_equal(WEXITSTATUS(d->status), 1);
        assert_true(g_file_get_contents(d->log, &log, NULL, NULL));
        if (!strstr(log, "corrupt")) {
            dump_log(d);
            fail_msg("no complaint about %s", bad[i]);
        }
        /* Left alone for the administrator */
        g_free(text);
        assert_true(g_file_get_contents(path, &text, NULL, NULL));
        assert_string_equal(text, bad[i]);
    }
}

/* ------------------------------------------------------------------ */
/* Crash, grace period, reclaim                                        */

/*
 * Two clients hold locks, the daemon is killed and restarted on the same
 * state file.  Both reclaim with their tokens; a third client's request
 * made during the grace period waits, and enters the table as soon as
 * both are done (long before the timeout), behind the reclaimed lock it
 * conflicts with.  Bad reclaims are refused without changing anything.
 */
static void test_crash_reclaim(void **state)
{
    static const char *const grace[] = { "--grace-ms=40000", NULL };
    g_autofree char *path = g_build_filename(fx.dir, "st", "state", NULL);
    g_autofree char *sa = NULL, *sb = NULL, *list = NULL, *expect = NULL;
    g_autofree char *before = NULL, *after = NULL;
    ExtlockConn *a, *b, *c, *mon;
    json_object *st, *s, *wt;
    Daemon *d;
    ExtlockMsg r;
    uint64_t e1, e2, rc, tc, id;
    Grant ga, ga2, gb, gc, na, na2, nb;
    int64_t t0;

    d = daemon_start(path, NULL, NULL);
    a = conn_open(d->unix_addr);
    b = conn_open(d->tcp_addr);
    sa = hello_full(a, "A", "disk", LONG_LEASE_MS, &e1);
    sb = hello_full(b, "B", "disk", LONG_LEASE_MS, NULL);
    ga = lock_now(a, 0, 64 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    gb = lock_now(b, 1 * MiB, 4 * KiB, EXTLOCK_MODE_SHARED);
    /* A hole: two locks with one token */
    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    unlock_part(a, ga.lock, 16 * KiB, 16 * KiB, &r);
    ga2.lock = g_array_index(r.pieces, ExtlockPiece, 1).lock;
    ga2.token = ga.token;
    extlock_msg_clear(&r);
    crash(d);

    list = state_sessions(path, NULL);
    expect = g_strdup_printf("A=%s,B=%s", sa, sb);
    assert_string_equal(list, expect);

    t0 = now_ms();
    d = daemon_start(path, grace, NULL);
    mon = conn_open(d->unix_addr);
    g_free(list);
    list = state_sessions(path, &e2);
    assert_string_equal(list, expect);
    assert_int_equal(e2, e1 + 1);

    /* A new client in grace: accepted, told to wait, nobody to blame */
    c = conn_open(d->tcp_addr);
    g_free(hello_full(c, "C", "disk", LONG_LEASE_MS, NULL));
    rc = send_lock(c, 0, 8 * KiB, EXTLOCK_MODE_EXCLUSIVE, true);
    tc = expect_waiting(c, rc, 0);
    assert_int_equal(tc >> 40, e2);
    id = send_lock(c, 100 * MiB, 1, EXTLOCK_MODE_SHARED, false);
    expect_error(c, true, id, EXTLOCK_ERR_GRACE);

    st = status_get(mon);
    assert_true(jint(st, "grace-remaining-ms") > 0);
    assert_true(jint(st, "grace-remaining-ms") <= 40000);
    s = find_session(st, sa);
    assert_non_null(s);
    assert_true(jbool(s, "reclaiming"));
    assert_string_equal(jstr(s, "state"), "disconnected");
    assert_true(jbool(find_session(st, sb), "reclaiming"));
    wt = jget(first_space(st), "waiting");
    assert_int_equal(json_object_array_length(wt), 1);
    assert_true(jbool(json_object_array_get_idx(wt, 0), "deferred"));
    assert_int_equal(jint(json_object_array_get_idx(wt, 0), "token"), tc);
    json_object_put(st);

    /* A comes back and reclaims its two pieces */
    a = reclaimer(d, "A", sa, e2);
    na = reclaim_ok(a, 0, 16 * KiB, EXTLOCK_MODE_EXCLUSIVE, ga.token);
    na2 = reclaim_ok(a, 32 * KiB, 32 * KiB, EXTLOCK_MODE_EXCLUSIVE,
                     ga2.token);

    /* Refused, and nothing changes: */
    before = status_fixed(mon);
    /* a token of this epoch */
    reclaim_fails(a, 20 * MiB, 1, EXTLOCK_MODE_SHARED, tc,
                  EXTLOCK_ERR_INVALID);
    /* a token that was never handed out */
    reclaim_fails(a, 20 * MiB, 1, EXTLOCK_MODE_SHARED, 0,
                  EXTLOCK_ERR_INVALID);
    reclaim_fails(a, 20 * MiB, 1, EXTLOCK_MODE_SHARED, e2 << 40,
                  EXTLOCK_ERR_INVALID);
    /* a conflict with a reclaimed lock (of its own, here) */
    reclaim_fails(a, 8 * KiB, 1, EXTLOCK_MODE_SHARED, ga.token,
                  EXTLOCK_ERR_STATE);
    /* from a session that is not reclaiming */
    reclaim_fails(c, 20 * MiB, 1, EXTLOCK_MODE_SHARED, ga.token,
                  EXTLOCK_ERR_STATE);
    after = status_fixed(mon);
    assert_string_equal(before, after);

    reclaim_done(a);
    expect_quiet(c, QUIET_MS);

    /* B comes back: once it is done, the grace period is over */
    b = reclaimer(d, "B", sb, e2);
    nb = reclaim_ok(b, 1 * MiB, 4 * KiB, EXTLOCK_MODE_SHARED, gb.token);
    /*
     * (A reclaim of B's conflicting with what A reclaimed would make the
     * extent disputed: test-extlockd-review-reclaim.c)
     */
    reclaim_done(b);

    /* C's request is now queued behind A's reclaimed lock: A is asked */
    expect_revoke(a, na.lock, 0, 8 * KiB, EXTLOCK_MODE_EXCLUSIVE, tc);
    assert_true(now_ms() - t0 < 10000);
    st = status_get(mon);
    assert_int_equal(jint(st, "grace-remaining-ms"), 0);
    assert_false(jbool(find_session(st, sa), "reclaiming"));
    assert_false(jbool(find_session(st, sb), "reclaiming"));
    assert_string_equal(jstr(find_session(st, sa), "state"), "active");
    assert_int_equal(jint(space_counters(st), "reclaims"), 3);
    wt = jget(first_space(st), "waiting");
    assert_int_equal(json_object_array_length(wt), 1);
    assert_false(json_object_object_get_ex(json_object_array_get_idx(wt, 0),
                                           "deferred", NULL));
    json_object_put(st);
    expect_quiet(c, QUIET_MS);

    /* Too late to reclaim; reclaim-done is harmless */
    reclaim_fails(a, 20 * MiB, 1, EXTLOCK_MODE_SHARED, ga.token,
                  EXTLOCK_ERR_STATE);
    reclaim_done(a);

    unlock_all(a, na.lock);
    gc = expect_granted(c, rc, 0, 8 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    assert_int_equal(gc.token, tc);
    assert_true(gc.token > ga.token);

    /* The reclaimed sessions go on normally */
    renew(a);
    renew(b);
    unlock_all(a, na2.lock);
    unlock_all(b, nb.lock);
    lock_now(b, 1 * MiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    daemon_stop(d);
}

/*
 * One of two clients never comes back: the grace period runs out, its
 * session is dropped, and the request waiting for its old extent is
 * granted only then; a request conflicting with the lock reclaimed by
 * the other client keeps waiting for it.  The absent client, back after
 * the grace period, gets a new session and cannot reclaim.
 *
 * Safety (issue "no lock is ever used after it may have been
 * re-granted", defect 3): the absent client B may still be using its
 * lock until its own lease (B_LEASE_MS, longer than the daemon's default
 * lease) runs out, so the grace period must cover B's lease plus the
 * fence margin.  A --grace-ms shorter than that is refused, and with the
 * default, C is granted B's extent no earlier than the coordinator's
 * start + B's lease + fence margin (the coordinator's own timestamps:
 * "start-ns" in status and "ts" of the grant in the event log), which is
 * also after B's last renewal + B's lease + fence margin.
 * Before the fix the grace period was --lease-ms + --fence-margin-ms
 * (700 ms here) whatever the clients' leases, --grace-ms=1000 was
 * accepted, and C got B's extent about 2.6 s too early.
 */
#define A_LEASE_MS 2000
#define B_LEASE_MS 3000

static void test_grace_timeout(void **state)
{
    static const char *const short_grace[] = { "--grace-ms=1000", NULL };
    g_autofree char *path = g_build_filename(fx.dir, "st", "state", NULL);
    g_autofree char *evlog = g_build_filename(fx.dir, "events", NULL);
    g_autofree char *evopt = g_strdup_printf("--event-log=%s", evlog);
    g_autofree char *almost = g_strdup_printf("--grace-ms=%d",
                                              B_LEASE_MS + MARGIN_MS - 1);
    const char *const almost_grace[] = { almost, NULL };
    const char *const with_log[] = { evopt, NULL };
    g_autofree char *sa = NULL, *sb = NULL, *list = NULL;
    g_autofree char *before = NULL, *after = NULL;
    ExtlockConn *a, *b, *c, *mon;
    json_object *st, *ev;
    Daemon *d;
    ExtlockMsg w;
    uint64_t e1, e2, rc, rc2, tc, tc2, id;
    Grant ga, gb, na, gc;
    int64_t t_renewed, t_granted, start_ns, t0;

    d = daemon_start(path, NULL, NULL);
    a = conn_open(d->unix_addr);
    b = conn_open(d->tcp_addr);
    sa = hello_full(a, "A", "disk", A_LEASE_MS, &e1);
    sb = hello_full(b, "B", "disk", B_LEASE_MS, NULL);
    ga = lock_now(a, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    gb = lock_now(b, 1 * MiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    renew(b);
    /* The daemon received B's last renewal before this */
    t_renewed = now_ms();
    crash(d);

    /* The state file records B's lease: a short grace period is refused */
    g_free(list);
    list = state_sessions(path, NULL);
    assert_true(g_file_get_contents(path, &before, NULL, NULL));
    assert_non_null(strstr(before, "\"lease-ms\":3000"));
    daemon_refused(path, short_grace, 2, "--grace-ms 1000 is unsafe");
    daemon_refused(path, almost_grace, 2, "longest lease is 3000 ms");
    assert_true(g_file_get_contents(path, &after, NULL, NULL));
    assert_string_equal(before, after);

    d = daemon_start(path, with_log, NULL);
    mon = conn_open(d->unix_addr);
    st = status_get(mon);
    assert_int_equal(jint(st, "grace-ms"), B_LEASE_MS + MARGIN_MS);
    start_ns = jint(st, "start-ns");
    json_object_put(st);
    a = reclaimer(d, "A", sa, e1 + 1);
    e2 = e1 + 1;
    na = reclaim_ok(a, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, ga.token);
    reclaim_done(a);

    c = client(d->tcp_addr, "C", LONG_LEASE_MS);
    rc = send_lock(c, 1 * MiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, true);
    tc = expect_waiting(c, rc, 0);
    rc2 = send_lock(c, 0, 1, EXTLOCK_MODE_SHARED, true);
    tc2 = expect_waiting(c, rc2, 0);
    assert_true(tc2 > tc);
    assert_int_equal(tc >> 40, e2);

    /* Still in grace: B's old extent is protected */
    st = status_get(mon);
    assert_true(jint(st, "grace-remaining-ms") > 0);
    assert_true(jbool(find_session(st, sb), "reclaiming"));
    json_object_put(st);

    /* Granted only when the grace period covering B's lease is over */
    extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
    recv_msg(c, &w, B_LEASE_MS + MARGIN_MS + SLACK_MS + RECV_MS);
    assert_int_equal(w.type, EXTLOCK_MSG_GRANTED);
    assert_int_equal(w.id, rc);
    assert_int_equal(w.offset, 1 * MiB);
    assert_int_equal(w.length, 4 * KiB);
    gc.lock = w.lock;
    gc.token = w.token;
    extlock_msg_clear(&w);
    t_granted = now_ms();
    assert_int_equal(gc.token, tc);
    assert_true(t_granted - t_renewed >= B_LEASE_MS + MARGIN_MS);
    ev = event_wait(evlog, "grant", "C", tc, RECV_MS, NULL);
    if (jint(ev, "ts") < start_ns + (int64_t)(B_LEASE_MS + MARGIN_MS) *
                                   1000000) {
        fail_msg("C granted B's extent %" PRId64 " ms after the start, "
                 "before B's lease + fence margin (%d ms)",
                 (jint(ev, "ts") - start_ns) / 1000000,
                 B_LEASE_MS + MARGIN_MS);
    }
    assert_int_equal(jint(ev, "offset"), 1 * MiB);
    assert_string_equal(jstr(ev, "mode"), "exclusive");
    json_object_put(ev);
    /* The reader waits for A, which is asked to give way */
    expect_revoke(a, na.lock, 0, 1, EXTLOCK_MODE_SHARED, tc2);
    expect_quiet(c, 10);

    /* B's session is gone, also from the state file */
    st = status_get(mon);
    assert_int_equal(jint(st, "grace-remaining-ms"), 0);
    assert_null(find_session(st, sb));
    json_object_put(st);
    /* Removals are written in the background (state-writer.h) */
    t0 = now_ms();
    g_free(list);
    while (list = state_sessions(path, NULL), strstr(list, sb) != NULL) {
        assert_true(now_ms() - t0 < RECV_MS);
        g_free(list);
        g_usleep(10 * 1000);
    }
    assert_non_null(strstr(list, sa));

    /* B is back too late: a new session, and nothing to reclaim */
    b = conn_open(d->unix_addr);
    hello_session(b, "B", sb, &w);
    assert_string_not_equal(w.session, sb);
    assert_false(w.reclaim);
    assert_false(w.resumed);
    assert_true(w.has_fence_margin);
    assert_int_equal(w.fence_margin_ms, MARGIN_MS);
    extlock_msg_clear(&w);
    reclaim_fails(b, 1 * MiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, gb.token,
                  EXTLOCK_ERR_STATE);
    id = send_lock(b, 1 * MiB, 4 * KiB, EXTLOCK_MODE_SHARED, true);
    expect_waiting(b, id, 1);

    unlock_all(a, na.lock);
    expect_granted(c, rc2, 0, 1, EXTLOCK_MODE_SHARED);
    unlock_all(c, gc.lock);
    expect_granted(b, id, 1 * MiB, 4 * KiB, EXTLOCK_MODE_SHARED);
    daemon_stop(d);
}

/*
 * A reclaiming client that loses its connection and comes back during
 * the grace period reclaims everything again (its earlier reclaims are
 * dropped, so they cannot conflict with themselves).  Deferred requests
 * can be cancelled and go away with their connection.  bye counts as
 * done.  A crash during the grace period keeps the sessions listed.
 */
static void test_reclaim_again(void **state)
{
    static const char *const grace[] = { "--grace-ms=40000", NULL };
    g_autofree char *path = g_build_filename(fx.dir, "st", "state", NULL);
    g_autofree char *sa = NULL, *sb = NULL, *list = NULL, *expect = NULL;
    ExtlockConn *a, *b, *c, *mon;
    json_object *st;
    Daemon *d;
    ExtlockMsg m, r;
    uint64_t e1, rc, rc2, tc2;
    Grant ga, gb, na;
    int64_t t0;

    d = daemon_start(path, NULL, NULL);
    a = conn_open(d->unix_addr);
    b = conn_open(d->tcp_addr);
    sa = hello_full(a, "A", "disk", LONG_LEASE_MS, &e1);
    sb = hello_full(b, "B", "disk", LONG_LEASE_MS, NULL);
    ga = lock_now(a, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    gb = lock_now(b, 8 * KiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    crash(d);

    /* Crash again during the grace period: still listed, next epoch */
    d = daemon_start(path, grace, NULL);
    a = reclaimer(d, "A", sa, e1 + 1);
    reclaim_ok(a, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, ga.token);
    crash(d);
    expect = g_strdup_printf("A=%s,B=%s", sa, sb);
    list = state_sessions(path, NULL);
    assert_string_equal(list, expect);

    t0 = now_ms();
    d = daemon_start(path, grace, NULL);
    mon = conn_open(d->unix_addr);
    a = reclaimer(d, "A", sa, e1 + 2);
    reclaim_ok(a, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, ga.token);

    c = client(d->tcp_addr, "C", LONG_LEASE_MS);
    rc = send_lock(c, 0, 4 * KiB, EXTLOCK_MODE_SHARED, true);
    expect_waiting(c, rc, 0);
    rc2 = send_lock(c, 8 * KiB, 1, EXTLOCK_MODE_SHARED, true);
    tc2 = expect_waiting(c, rc2, 0);

    /* A deferred request can be cancelled */
    extlock_msg_init(&m, EXTLOCK_MSG_CANCEL);
    m.request = rc;
    send_msg(c, &m);
    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    expect_msg(c, &r, EXTLOCK_MSG_CANCELLED, m.id);
    extlock_msg_clear(&r);
    expect_error(c, true, rc, EXTLOCK_ERR_CANCELLED);

    /* A loses its connection and comes back: it reclaims anew */
    conn_drop(a);
    json_object_put(wait_session_state(mon, sa, "disconnected"));
    a = reclaimer(d, "A", sa, e1 + 2);
    na = reclaim_ok(a, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, ga.token);
    st = status_get(mon);
    assert_int_equal(json_object_array_length(
                         jget(first_space(st), "held")), 1);
    assert_true(jbool(find_session(st, sa), "reclaiming"));
    json_object_put(st);
    reclaim_done(a);
    expect_quiet(c, QUIET_MS);

    /* B says bye instead of reclaiming: that ends the grace period */
    b = reclaimer(d, "B", sb, e1 + 2);
    bye(b);
    expect_granted(c, rc2, 8 * KiB, 1, EXTLOCK_MODE_SHARED);
    assert_true(now_ms() - t0 < 10000);
    assert_int_equal(tc2 >> 40, e1 + 2);
    (void)gb;

    /* A deferred request goes away with its connection */
    unlock_all(a, na.lock);
    daemon_stop(d);
}

/*
 * During the grace period of one lock-space, another lock-space is
 * served normally.  A connection that drops takes its deferred requests
 * along.
 */
static void test_grace_per_space(void **state)
{
    static const char *const grace[] = { "--grace-ms=40000", NULL };
    g_autofree char *path = g_build_filename(fx.dir, "st", "state", NULL);
    g_autofree char *sa = NULL;
    ExtlockConn *a, *c, *o, *mon;
    json_object *st, *spaces;
    Daemon *d;
    ExtlockMsg w;
    uint64_t rc;

    d = daemon_start(path, NULL, NULL);
    a = conn_open(d->unix_addr);
    sa = hello_full(a, "A", "disk", LONG_LEASE_MS, NULL);
    lock_now(a, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    crash(d);

    d = daemon_start(path, grace, NULL);
    mon = conn_open(d->unix_addr);
    o = conn_open(d->tcp_addr);
    g_free(hello_full(o, "O", "other-disk", LONG_LEASE_MS, NULL));
    lock_now(o, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE);

    c = client(d->unix_addr, "C", LONG_LEASE_MS);
    rc = send_lock(c, 64 * KiB, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, true);
    expect_waiting(c, rc, 0);
    conn_drop(c);

    st = status_get(mon);
    spaces = jget(st, "lock-spaces");
    assert_int_equal(json_object_array_length(spaces), 2);
    for (size_t i = 0; i < 2; i++) {
        json_object *sp = json_object_array_get_idx(spaces, i);

        if (strcmp(jstr(sp, "name"), "disk") == 0) {
            assert_true(jint(sp, "grace-remaining-ms") > 0);
        } else {
            assert_int_equal(jint(sp, "grace-remaining-ms"), 0);
        }
    }
    json_object_put(st);
    json_object_put(wait_session_state(mon, sa, "disconnected"));

    /* A comes back and is done: nothing deferred is left */
    a = conn_open(d->unix_addr);
    hello_session(a, "A", sa, &w);
    assert_true(w.reclaim);
    extlock_msg_clear(&w);
    reclaim_done(a);
    st = status_get(mon);
    assert_int_equal(jint(st, "grace-remaining-ms"), 0);
    json_object_put(st);
    lock_now(a, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    daemon_stop(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_growth_revoke, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_downgrade, setup, teardown),
        cmocka_unit_test_setup_teardown(test_own_session_revoke, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_revoke_on_grant_and_split,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_split_revoke, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_revoke_opt_in_and_resume,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_unknown_session, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_state_file, setup, teardown),
        cmocka_unit_test_setup_teardown(test_crash_reclaim, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_grace_timeout, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_reclaim_again, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_grace_per_space, setup,
                                        teardown),
    };

    extlockd_bin = g_getenv("EXTLOCKD");
    extlockctl_bin = g_getenv("EXTLOCKCTL");
    if (!extlockd_bin) {
        fprintf(stderr, "EXTLOCKD must name the extlockd binary\n");
        return 1;
    }
    if (g_getenv("EXTLOCKD_TEST_FILTER")) {
        cmocka_set_test_filter(g_getenv("EXTLOCKD_TEST_FILTER"));
    }
    signal(SIGPIPE, SIG_IGN);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
