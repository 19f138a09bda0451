/*
 * extlock: integration tests that run the real extlockd binary
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Every test starts its own daemon(s) in a fresh temporary directory
 * (binary from $EXTLOCKD, with --debug-checks and short leases) and talks
 * to it over UNIX and TCP sockets with the blocking client library; see
 * extlockd-harness.h.  The teardown kills whatever a test left running,
 * even after a failure.
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
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <linux/sockios.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include <glib.h>
#include <glib/gstdio.h>
#include <gio/gio.h>
#include <json-c/json.h>

#include "extlockd-harness.h"

/* ------------------------------------------------------------------ */
/* Tests                                                               */

/*
 * A holds X; B (TCP) asks exclusive and waits naming A; C (UNIX) asks
 * shared later and waits behind B; A unlocks -> only B; B unlocks -> C.
 */
static void test_timestamp_order(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "hostA/d0", LONG_LEASE_MS);
    ExtlockConn *b = client(d->tcp_addr, "hostB/d0", LONG_LEASE_MS);
    ExtlockConn *c = client(d->unix_addr, "hostC/d0", LONG_LEASE_MS);
    ExtlockMsg wb, wc;
    const ExtlockBlocker *blk;
    uint64_t rb, rc;
    Grant ga, gb, gc;

    extlock_msg_init(&wb, EXTLOCK_MSG_INVALID);
    extlock_msg_init(&wc, EXTLOCK_MSG_INVALID);

    ga = lock_now(a, 0, 65536, EXTLOCK_MODE_EXCLUSIVE);
    assert_int_equal(ga.token >> 40, 1);     /* first start: epoch 1 */

    rb = lock_waits(b, 4096, 4096, EXTLOCK_MODE_EXCLUSIVE, &wb);
    assert_int_equal(wb.blockers->len, 1);
    blk = find_blocker(&wb, "hostA/d0");
    assert_non_null(blk);
    assert_int_equal(blk->offset, 0);
    assert_int_equal(blk->length, 65536);
    assert_int_equal(blk->mode, EXTLOCK_MODE_EXCLUSIVE);
    assert_int_equal(blk->token, ga.token);
    assert_false(blk->waiting);
    assert_true(wb.token > ga.token);

    rc = lock_waits(c, 6000, 100, EXTLOCK_MODE_SHARED, &wc);
    assert_true(wc.token > wb.token);
    blk = find_blocker(&wc, "hostB/d0");
    assert_non_null(blk);
    assert_true(blk->waiting);
    assert_int_equal(blk->token, wb.token);
    blk = find_blocker(&wc, "hostA/d0");
    assert_non_null(blk);
    assert_false(blk->waiting);

    unlock_all(a, ga.lock);
    gb = expect_granted(b, rb, 4096, 4096, EXTLOCK_MODE_EXCLUSIVE);
    assert_int_equal(gb.token, wb.token);
    expect_quiet(c, QUIET_MS);

    unlock_all(b, gb.lock);
    gc = expect_granted(c, rc, 6000, 100, EXTLOCK_MODE_SHARED);
    assert_int_equal(gc.token, wc.token);
    expect_quiet(a, 20);
    expect_quiet(b, 20);

    extlock_msg_clear(&wb);
    extlock_msg_clear(&wc);
    daemon_stop(d);
}

/* Compatible shared requests queued behind one holder are granted together */
static void test_shared_together(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->tcp_addr, "B", LONG_LEASE_MS);
    ExtlockConn *c = client(d->unix_addr, "C", LONG_LEASE_MS);
    ExtlockConn *e = client(d->tcp_addr, "E", LONG_LEASE_MS);
    ExtlockMsg w;
    uint64_t rb, rc, re;
    Grant ga, gs1, gs2;

    extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
    /* Shared locks on overlapping extents are granted at once */
    gs1 = lock_now(b, 100000, 1000, EXTLOCK_MODE_SHARED);
    gs2 = lock_now(c, 100500, 1000, EXTLOCK_MODE_SHARED);
    assert_true(gs2.token > gs1.token);
    unlock_all(b, gs1.lock);
    unlock_all(c, gs2.lock);

    ga = lock_now(a, 0, 1000, EXTLOCK_MODE_EXCLUSIVE);
    rb = lock_waits(b, 0, 500, EXTLOCK_MODE_SHARED, &w);
    rc = lock_waits(c, 200, 800, EXTLOCK_MODE_SHARED, &w);
    /* E wants exclusive after them: it must stay behind both */
    re = lock_waits(e, 900, 10, EXTLOCK_MODE_EXCLUSIVE, &w);
    extlock_msg_clear(&w);

    unlock_all(a, ga.lock);
    gs1 = expect_granted(b, rb, 0, 500, EXTLOCK_MODE_SHARED);
    gs2 = expect_granted(c, rc, 200, 800, EXTLOCK_MODE_SHARED);
    expect_quiet(e, QUIET_MS);
    unlock_all(b, gs1.lock);
    expect_quiet(e, 50);
    unlock_all(c, gs2.lock);
    expect_granted(e, re, 900, 10, EXTLOCK_MODE_EXCLUSIVE);
    daemon_stop(d);
}

static void expect_piece(ExtlockMsg *r, guint i, uint64_t lock,
                         uint64_t offset, uint64_t length)
{
    ExtlockPiece *p;

    assert_true(i < r->pieces->len);
    p = &g_array_index(r->pieces, ExtlockPiece, i);
    if (lock) {
        assert_int_equal(p->lock, lock);
    }
    assert_int_equal(p->offset, offset);
    assert_int_equal(p->length, length);
}

static void test_partial_unlock(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->unix_addr, "B", LONG_LEASE_MS);
    ExtlockConn *mon = conn_open(d->unix_addr);
    ExtlockMsg r, w;
    g_autofree char *before = NULL, *after = NULL;
    json_object *st, *held;
    uint64_t upper, rb, id;
    Grant g, gb;

    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
    g = lock_now(a, 0, 65536, EXTLOCK_MODE_EXCLUSIVE);
    /* B waits for a part that A is about to release */
    rb = lock_waits(b, 5000, 1000, EXTLOCK_MODE_EXCLUSIVE, &w);

    /* Punch a hole: two pieces, the upper one a new lock, same token */
    unlock_part(a, g.lock, 4096, 4096, &r);
    assert_int_equal(r.pieces->len, 2);
    expect_piece(&r, 0, g.lock, 0, 4096);
    expect_piece(&r, 1, 0, 8192, 57344);
    upper = g_array_index(r.pieces, ExtlockPiece, 1).lock;
    assert_int_not_equal(upper, g.lock);
    gb = expect_granted(b, rb, 5000, 1000, EXTLOCK_MODE_EXCLUSIVE);

    st = status_get(mon);
    held = jget(first_space(st), "held");
    assert_int_equal(json_object_array_length(held), 3);
    for (size_t i = 0; i < 3; i++) {
        json_object *h = json_object_array_get_idx(held, i);

        if ((uint64_t)jint(h, "lock") == upper) {
            assert_int_equal(jint(h, "token"), g.token);
            assert_int_equal(jint(h, "offset"), 8192);
        }
    }
    json_object_put(st);

    /* The hole is free: B can take it without waiting; the rest is not */
    id = send_lock(b, 4096, 100, EXTLOCK_MODE_SHARED, false);
    expect_granted(b, id, 4096, 100, EXTLOCK_MODE_SHARED);
    id = send_lock(b, 4000, 100, EXTLOCK_MODE_SHARED, false);
    expect_error(b, true, id, EXTLOCK_ERR_WOULD_BLOCK);

    /* Trim the tail of the upper piece */
    extlock_msg_clear(&r);
    unlock_part(a, upper, 60000, 5536, &r);
    assert_int_equal(r.pieces->len, 1);
    expect_piece(&r, 0, upper, 8192, 51808);
    /* Trim the head of the upper piece */
    extlock_msg_clear(&r);
    unlock_part(a, upper, 8192, 8, &r);
    assert_int_equal(r.pieces->len, 1);
    expect_piece(&r, 0, upper, 8200, 51800);

    /* A part outside the lock is an error and changes nothing */
    before = status_stable(mon, NULL);
    extlock_msg_init(&w, EXTLOCK_MSG_UNLOCK);
    w.lock = upper;
    w.has_extent = true;
    w.offset = 0;
    w.length = 8300;
    send_msg(a, &w);
    expect_error(a, true, w.id, EXTLOCK_ERR_RANGE);
    after = status_stable(mon, NULL);
    assert_string_equal(before, after);

    /* Releasing exactly the whole remaining extent frees the lock */
    extlock_msg_clear(&r);
    unlock_part(a, g.lock, 0, 4096, &r);
    assert_int_equal(r.pieces->len, 0);
    extlock_msg_clear(&r);
    unlock_all(a, upper);
    unlock_all(b, gb.lock);

    /* Gone now */
    extlock_msg_init(&w, EXTLOCK_MSG_UNLOCK);
    w.lock = g.lock;
    send_msg(a, &w);
    expect_error(a, true, w.id, EXTLOCK_ERR_NOT_FOUND);

    st = status_get(mon);
    assert_int_equal(jint(jget(first_space(st), "counters"),
                          "partial-releases"), 3);
    json_object_put(st);
    daemon_stop(d);
}

static void test_cancel(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->tcp_addr, "B", LONG_LEASE_MS);
    ExtlockMsg w, m, r;
    json_object *st, *sp;
    uint64_t rb, id;
    Grant ga, gb;

    extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    ga = lock_now(a, 0, 100, EXTLOCK_MODE_SHARED);
    rb = lock_waits(b, 50, 100, EXTLOCK_MODE_EXCLUSIVE, &w);

    extlock_msg_init(&m, EXTLOCK_MSG_CANCEL);
    m.request = rb;
    send_msg(b, &m);
    expect_msg(b, &r, EXTLOCK_MSG_CANCELLED, m.id);
    assert_int_equal(r.request, rb);
    expect_error(b, true, rb, EXTLOCK_ERR_CANCELLED);

    st = status_get(b);
    sp = first_space(st);
    assert_int_equal(json_object_array_length(jget(sp, "waiting")), 0);
    assert_int_equal(jint(jget(sp, "counters"), "cancels"), 1);
    json_object_put(st);

    /* Cancelling again, or something unknown, is not-found */
    send_msg(b, &m);
    expect_error(b, true, m.id, EXTLOCK_ERR_NOT_FOUND);
    /* A granted request cannot be cancelled */
    gb = lock_now(b, 1000, 10, EXTLOCK_MODE_EXCLUSIVE);
    extlock_msg_init(&m, EXTLOCK_MSG_CANCEL);
    m.request = gb.id;
    send_msg(b, &m);
    expect_error(b, true, m.id, EXTLOCK_ERR_NOT_FOUND);
    /* A's request ids are not B's to cancel */
    id = lock_waits(a, 1000, 10, EXTLOCK_MODE_SHARED, &w);
    extlock_msg_init(&m, EXTLOCK_MSG_CANCEL);
    m.request = id;
    m.has_id = true;
    m.id = id + 1000;
    send_msg(b, &m);
    expect_error(b, true, id + 1000, EXTLOCK_ERR_NOT_FOUND);

    /* The cancelled request is never granted */
    unlock_all(a, ga.lock);
    expect_quiet(b, QUIET_MS);
    unlock_all(b, gb.lock);
    expect_granted(a, id, 1000, 10, EXTLOCK_MODE_SHARED);
    extlock_msg_clear(&w);
    extlock_msg_clear(&r);
    daemon_stop(d);
}

static void test_would_block(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->unix_addr, "B", LONG_LEASE_MS);
    ExtlockConn *c = client(d->tcp_addr, "C", LONG_LEASE_MS);
    ExtlockConn *mon = conn_open(d->unix_addr);
    g_autofree char *before = NULL, *after = NULL;
    ExtlockMsg w;
    uint64_t id, rc;
    Grant ga, gb;
    int64_t err0, err1;

    extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
    ga = lock_now(a, 0, 100, EXTLOCK_MODE_SHARED);
    id = send_lock(b, 50, 100, EXTLOCK_MODE_SHARED, false);
    gb = expect_granted(b, id, 50, 100, EXTLOCK_MODE_SHARED);

    before = status_stable(mon, &err0);
    id = send_lock(b, 0, 10, EXTLOCK_MODE_EXCLUSIVE, false);
    expect_error(b, true, id, EXTLOCK_ERR_WOULD_BLOCK);
    after = status_stable(mon, &err1);
    assert_string_equal(before, after);
    assert_int_equal(err1, err0 + 1);

    /* An earlier waiter blocks a compatible no-wait request, too */
    rc = lock_waits(c, 90, 20, EXTLOCK_MODE_EXCLUSIVE, &w);
    id = send_lock(b, 200, 10, EXTLOCK_MODE_SHARED, false);
    expect_granted(b, id, 200, 10, EXTLOCK_MODE_SHARED);
    id = send_lock(b, 95, 1, EXTLOCK_MODE_SHARED, false);
    expect_error(b, true, id, EXTLOCK_ERR_WOULD_BLOCK);

    unlock_all(a, ga.lock);
    expect_quiet(c, 50);
    unlock_all(b, gb.lock);
    expect_granted(c, rc, 90, 20, EXTLOCK_MODE_EXCLUSIVE);
    extlock_msg_clear(&w);
    daemon_stop(d);
}

/*
 * A holder whose connection drops keeps its locks until its lease plus
 * the fence margin, counted from its last renewal; its waiting requests
 * are cancelled at once.
 */
static void test_disconnect_fencing(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = conn_open(d->unix_addr);
    ExtlockConn *b = client(d->tcp_addr, "B", LONG_LEASE_MS);
    ExtlockConn *c = client(d->unix_addr, "C", LONG_LEASE_MS);
    ExtlockConn *mon = conn_open(d->unix_addr);
    g_autofree char *sa = hello_full(a, "A", "disk", LEASE_MS, NULL);
    json_object *st, *s, *sp;
    ExtlockMsg w;
    uint64_t rb;
    Grant gc, gb;
    int64_t t_renew, t_granted;

    extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
    lock_now(a, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    gc = lock_now(c, 8192, 4096, EXTLOCK_MODE_EXCLUSIVE);
    /* A also waits for C's extent */
    lock_waits(a, 8192, 10, EXTLOCK_MODE_SHARED, &w);
    rb = lock_waits(b, 0, 10, EXTLOCK_MODE_SHARED, &w);
    extlock_msg_clear(&w);

    t_renew = now_ms();     /* the server renews after this instant */
    renew(a);
    conn_drop(a);

    st = wait_session_state(mon, sa, "disconnected");
    s = find_session(st, sa);
    assert_int_equal(jint(s, "locks-held"), 1);
    assert_int_equal(jint(s, "requests-waiting"), 0);
    sp = first_space(st);
    assert_int_equal(json_object_array_length(jget(sp, "waiting")), 1);
    assert_int_equal(jint(jget(sp, "counters"), "cancels"), 1);
    json_object_put(st);

    gb = expect_granted(b, rb, 0, 10, EXTLOCK_MODE_SHARED);
    t_granted = now_ms();
    assert_true(t_granted - t_renew >= LEASE_MS + MARGIN_MS);
    assert_true(t_granted - t_renew <= LEASE_MS + MARGIN_MS + SLACK_MS);

    /* The session is gone for good */
    st = status_get(mon);
    assert_null(find_session(st, sa));
    json_object_put(st);
    unlock_all(b, gb.lock);
    unlock_all(c, gc.lock);
    daemon_stop(d);
}

static void test_bye_releases(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->tcp_addr, "B", LONG_LEASE_MS);
    ExtlockConn *c = client(d->tcp_addr, "C", LONG_LEASE_MS);
    ExtlockMsg w;
    json_object *st;
    uint64_t rb;
    int64_t t0;

    extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
    lock_now(a, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    lock_now(a, 10000, 10, EXTLOCK_MODE_SHARED);
    lock_now(c, 20000, 10, EXTLOCK_MODE_SHARED);
    lock_waits(a, 20000, 10, EXTLOCK_MODE_EXCLUSIVE, &w);
    rb = lock_waits(b, 100, 10, EXTLOCK_MODE_EXCLUSIVE, &w);
    extlock_msg_clear(&w);

    t0 = now_ms();
    bye(a);
    expect_granted(b, rb, 100, 10, EXTLOCK_MODE_EXCLUSIVE);
    /*
     * At once: through expiry, A's locks would go only after its lease
     * plus the fence margin (LONG_LEASE_MS + MARGIN_MS)
     */
    assert_true(now_ms() - t0 < RECV_MS);
    assert_true(RECV_MS < LONG_LEASE_MS + MARGIN_MS);

    st = status_get(b);
    assert_int_equal(jint(jget(st, "counters"), "sessions"), 2);
    assert_int_equal(json_object_array_length(
                         jget(first_space(st), "waiting")), 0);
    assert_int_equal(json_object_array_length(
                         jget(first_space(st), "held")), 2);
    json_object_put(st);
    bye(b);
    bye(c);

    /* The empty lock-space is freed */
    c = conn_open(d->unix_addr);
    st = status_get(c);
    assert_int_equal(json_object_array_length(jget(st, "lock-spaces")), 0);
    assert_int_equal(json_object_array_length(jget(st, "sessions")), 0);
    json_object_put(st);
    /* Requests the dispatcher refuses before hello, word for word */
    {
        static const struct {
            const char *line;
            ExtlockErrorCode code;
            const char *message;
        } refusals[] = {
            { "{\"type\":\"renew\",\"id\":5}\n", EXTLOCK_ERR_STATE,
              "renew before hello" },
            { "{\"type\":\"reclaim-done\",\"id\":6}\n",
              EXTLOCK_ERR_STATE, "reclaim-done before hello" },
            { "{\"type\":\"welcome\",\"id\":7,\"version\":2,"
              "\"session\":\"x\",\"lease-ms\":1000,\"epoch\":1}\n",
              EXTLOCK_ERR_UNKNOWN_TYPE, "\"welcome\" is not a request" },
        };

        for (size_t i = 0; i < G_N_ELEMENTS(refusals); i++) {
            ExtlockMsg r;

            send_raw(c, refusals[i].line);
            extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
            recv_msg(c, &r, 5000);
            assert_int_equal(r.type, EXTLOCK_MSG_ERROR);
            assert_int_equal(r.error, refusals[i].code);
            assert_int_equal(r.id, 5 + i);
            assert_string_equal(r.message, refusals[i].message);
            extlock_msg_clear(&r);
        }
    }
    /* bye before hello just says goodbye */
    bye(c);
    daemon_stop(d);
}

/* A connected session that does not renew is expired and fenced */
static void lease_expiry(const char *const *extra)
{
    Daemon *d = daemon_start(NULL, extra, NULL);
    ExtlockConn *a = conn_open(d->unix_addr);
    ExtlockConn *b = client(d->tcp_addr, "B", LONG_LEASE_MS);
    ExtlockConn *mon = conn_open(d->unix_addr);
    g_autofree char *sa = NULL;
    ExtlockMsg m;
    json_object *st;
    uint64_t rb;
    int64_t t_hello, t_expired, t_granted;
    const uint32_t lease = 300;

    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    t_hello = now_ms();
    sa = hello_full(a, "A", "disk", lease, NULL);
    lock_now(a, 0, 100, EXTLOCK_MODE_EXCLUSIVE);
    rb = lock_waits(b, 0, 100, EXTLOCK_MODE_EXCLUSIVE, &m);

    recv_msg(a, &m, RECV_MS);
    t_expired = now_ms();
    assert_int_equal(m.type, EXTLOCK_MSG_SESSION_EXPIRED);
    assert_false(m.has_id);
    assert_string_equal(m.session, sa);
    assert_true(t_expired - t_hello >= lease);
    assert_true(t_expired - t_hello <= lease + SLACK_MS);
    expect_eof(a);

    /* Expired, but the locks stay until the fence margin has passed */
    st = status_get(mon);
    if (now_ms() - t_hello < lease + MARGIN_MS) {
        json_object *s = find_session(st, sa);

        assert_non_null(s);
        assert_string_equal(jstr(s, "state"), "expired");
        assert_int_equal(jint(s, "locks-held"), 1);
        assert_int_equal(jint(s, "lease-remaining-ms"), 0);
    }
    json_object_put(st);

    expect_granted(b, rb, 0, 100, EXTLOCK_MODE_EXCLUSIVE);
    t_granted = now_ms();
    assert_true(t_granted - t_hello >= lease + MARGIN_MS);
    assert_true(t_granted - t_hello <= lease + MARGIN_MS + SLACK_MS);
    extlock_msg_clear(&m);
    daemon_stop(d);
}

static void test_lease_expiry(void **state)
{
    lease_expiry(NULL);
}

/*
 * --poll-us: the main loop checks its sockets for a while before it
 * sleeps.  Requests are still granted in timestamp order, and the loop's
 * timers still fire on time (the spin never outlasts the loop's
 * timeout): the lease expiry above, with the same bounds.
 */
static void test_poll_us(void **state)
{
    static const char *const poll[] = { "--poll-us=1000", NULL };
    Daemon *d = daemon_start(NULL, poll, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->unix_addr, "B", LONG_LEASE_MS);
    ExtlockConn *c = client(d->tcp_addr, "C", LONG_LEASE_MS);
    ExtlockMsg w;
    uint64_t rb, rc;
    Grant ga, gb;

    extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
    ga = lock_now(a, 0, 1000, EXTLOCK_MODE_EXCLUSIVE);
    rb = lock_waits(b, 500, 1000, EXTLOCK_MODE_EXCLUSIVE, &w);
    rc = lock_waits(c, 0, 2000, EXTLOCK_MODE_SHARED, &w);
    extlock_msg_clear(&w);
    unlock_all(a, ga.lock);
    gb = expect_granted(b, rb, 500, 1000, EXTLOCK_MODE_EXCLUSIVE);
    expect_quiet(c, QUIET_MS);
    unlock_all(b, gb.lock);
    expect_granted(c, rc, 0, 2000, EXTLOCK_MODE_SHARED);
    daemon_stop(d);

    lease_expiry(poll);
}

static void send_resume(ExtlockConn *c, const char *client_id,
                        const char *session, uint64_t *id)
{
    ExtlockMsg m;

    extlock_msg_init(&m, EXTLOCK_MSG_HELLO);
    m.client_id = (char *)client_id;
    m.lock_space = (char *)"disk";
    m.session = (char *)session;
    m.resume_secret = secret_of(session);
    m.lease_ms = 600;
    send_msg(c, &m);
    *id = m.id;
}

static void test_resume(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = conn_open(d->unix_addr);
    ExtlockConn *b = client(d->tcp_addr, "B", LONG_LEASE_MS);
    ExtlockConn *x;
    g_autofree char *sa = hello_full(a, "A", "disk", 600, NULL);
    /* A's first deadline is no later than this + 600 ms */
    int64_t t_welcome = now_ms(), target;
    static const char unknown[] = "0123456789abcdef0123456789abcdef";
    ExtlockMsg w;
    ExtlockLockInfo *li;
    uint64_t id, rb;
    Grant g1, g2;

    extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
    g1 = lock_now(a, 0, 100, EXTLOCK_MODE_EXCLUSIVE);
    g2 = lock_now(a, 500, 100, EXTLOCK_MODE_SHARED);
    rb = lock_waits(b, 0, 10, EXTLOCK_MODE_SHARED, &w);
    conn_drop(a);

    /* Wrong client-id: not-found, nothing changes */
    x = conn_open(d->unix_addr);
    send_resume(x, "intruder", sa, &id);
    expect_error(x, true, id, EXTLOCK_ERR_NOT_FOUND);

    /* An unknown session: a new one, which has no locks */
    x = conn_open(d->unix_addr);
    send_resume(x, "A", unknown, &id);
    extlock_msg_clear(&w);
    expect_msg(x, &w, EXTLOCK_MSG_WELCOME, id);
    assert_int_equal(strlen(w.session), 32);
    assert_string_not_equal(w.session, unknown);
    assert_string_not_equal(w.session, sa);
    assert_false(w.resumed);
    assert_false(w.reclaim);
    assert_null(w.locks);
    bye(x);

    /* The right client resumes and finds its locks */
    x = conn_open(d->unix_addr);
    send_resume(x, "A", sa, &id);
    extlock_msg_clear(&w);
    expect_msg(x, &w, EXTLOCK_MSG_WELCOME, id);
    assert_string_equal(w.session, sa);
    assert_int_equal(w.lease_ms, 600);
    assert_true(w.resumed);
    assert_false(w.reclaim);
    assert_non_null(w.locks);
    assert_int_equal(w.locks->len, 2);
    li = &g_array_index(w.locks, ExtlockLockInfo, 0);
    assert_int_equal(li->lock, g1.lock);
    assert_int_equal(li->offset, 0);
    assert_int_equal(li->length, 100);
    assert_int_equal(li->mode, EXTLOCK_MODE_EXCLUSIVE);
    assert_int_equal(li->token, g1.token);
    li = &g_array_index(w.locks, ExtlockLockInfo, 1);
    assert_int_equal(li->lock, g2.lock);
    assert_int_equal(li->token, g2.token);
    extlock_msg_clear(&w);

    /*
     * Past the deadline and fence margin of the original hello: the
     * resumed (and renewed) session still holds its locks.
     */
    target = t_welcome + 600 + MARGIN_MS + QUIET_MS;
    while (now_ms() < target) {
        /* every third of the lease, like the driver */
        renew(x);
        g_usleep(MAX(MIN(200, target - now_ms()), 1) * 1000);
    }
    renew(x);
    expect_quiet(b, 10);
    unlock_all(x, g1.lock);
    expect_granted(b, rb, 0, 10, EXTLOCK_MODE_SHARED);
    unlock_all(x, g2.lock);

    /* A session whose lease ran out cannot be resumed: a new one */
    conn_drop(x);
    /* (status shows other clients' sessions to admins: the UNIX socket) */
    x = conn_open(d->unix_addr);
    json_object_put(wait_session_state(x, sa, "expired"));
    conn_drop(x);
    x = conn_open(d->unix_addr);
    send_resume(x, "A", sa, &id);
    expect_msg(x, &w, EXTLOCK_MSG_WELCOME, id);
    assert_string_not_equal(w.session, sa);
    assert_false(w.resumed);
    assert_false(w.reclaim);
    assert_null(w.locks);
    extlock_msg_clear(&w);
    daemon_stop(d);
}

static char *read_state(const char *path)
{
    char *text = NULL;

    assert_true(g_file_get_contents(path, &text, NULL, NULL));
    return g_strstrip(text);
}

static void test_epoch_restart(void **state)
{
    g_autofree char *sha_sa = NULL;
    g_autofree char *path = g_build_filename(fx.dir, "var", "st", NULL);
    g_autofree char *text = NULL, *expect = NULL;
    g_autofree char *counter = g_strdup_printf(
        "EXTLOCKD_TEST_FIRST_COUNTER=%" PRIu64, (UINT64_C(1) << 40) - 2);
    const char *env[] = { counter, NULL };
    Daemon *d;
    ExtlockConn *a;
    g_autofree char *sa = NULL;
    uint64_t e1, e2, e3;
    Grant g1, g2, g3, g4, g5;

    /*
     * The state file lists the live sessions (so that they can reclaim
     * their locks after a crash); a session that says bye is removed.
     */
    d = daemon_start(path, NULL, NULL);
    a = conn_open(d->unix_addr);
    sa = hello_full(a, "A", "disk", LONG_LEASE_MS, &e1);
    sha_sa = secret_sha256(sa);
    assert_int_equal(e1, 1);
    text = read_state(path);
    expect = g_strdup_printf("{\"version\":1,\"epoch\":1,\"sessions\":"
                             "[{\"session\":\"%s\",\"client-id\":\"A\","
                             "\"lock-space\":\"disk\",\"lease-ms\":%d,"
                             "\"fence-margin-ms\":%d,"
                             "\"owner\":\"uid:%u\",\"secret-sha256\":\"%s\"}]}",
                             sa, LONG_LEASE_MS, MARGIN_MS, (unsigned)getuid(),
                             sha_sa);
    assert_string_equal(text, expect);
    g1 = lock_now(a, 0, 10, EXTLOCK_MODE_SHARED);
    assert_int_equal(g1.token, (e1 << 40) | 1);
    g2 = lock_now(a, 0, 10, EXTLOCK_MODE_SHARED);
    assert_int_equal(g2.token, g1.token + 1);
    bye(a);
    daemon_stop(d);
    g_free(text);
    text = read_state(path);
    assert_string_equal(text, "{\"version\":1,\"epoch\":1}");

    d = daemon_start(path, NULL, NULL);
    a = conn_open(d->tcp_addr);
    g_free(hello_full(a, "A", "disk", LONG_LEASE_MS, &e2));
    assert_int_equal(e2, e1 + 1);
    g3 = lock_now(a, 0, 10, EXTLOCK_MODE_EXCLUSIVE);
    assert_true(g3.token > g2.token);
    assert_int_equal(g3.token >> 40, e2);
    bye(a);
    daemon_stop(d);

    /* The 40-bit counter wraps into a new, persisted epoch */
    d = daemon_start(path, NULL, env);
    a = conn_open(d->unix_addr);
    g_free(sa);
    sa = hello_full(a, "A", "disk", LONG_LEASE_MS, &e3);
    g_free(sha_sa);
    sha_sa = secret_sha256(sa);
    assert_int_equal(e3, e2 + 1);
    g3 = lock_now(a, 0, 10, EXTLOCK_MODE_SHARED);
    assert_int_equal(g3.token, (e3 << 40) | ((UINT64_C(1) << 40) - 2));
    g4 = lock_now(a, 0, 10, EXTLOCK_MODE_SHARED);
    assert_int_equal(g4.token, (e3 << 40) | ((UINT64_C(1) << 40) - 1));
    g5 = lock_now(a, 0, 10, EXTLOCK_MODE_SHARED);
    assert_int_equal(g5.token, ((e3 + 1) << 40) | 1);
    g_free(text);
    text = read_state(path);
    g_free(expect);
    expect = g_strdup_printf("{\"version\":1,\"epoch\":%" PRIu64
                             ",\"sessions\":[{\"session\":\"%s\","
                             "\"client-id\":\"A\",\"lock-space\":"
                             "\"disk\",\"lease-ms\":%d,"
                             "\"fence-margin-ms\":%d,\"owner\":\"uid:%u\","
                             "\"secret-sha256\":\"%s\"}]}", e3 + 1, sa,
                             LONG_LEASE_MS, MARGIN_MS, (unsigned)getuid(),
                             sha_sa);
    assert_string_equal(text, expect);
    bye(a);
    daemon_stop(d);

    d = daemon_start(path, NULL, NULL);
    a = conn_open(d->unix_addr);
    g_free(hello_full(a, "A", "disk", LONG_LEASE_MS, &e1));
    assert_int_equal(e1, e3 + 2);
    g1 = lock_now(a, 0, 10, EXTLOCK_MODE_SHARED);
    assert_true(g1.token > g5.token);
    daemon_stop(d);
}

/* The daemon exits with @status and never creates its socket */
static void expect_refusal(const char *state_path, const char *const *extra,
                           int status, const char *log_needle)
{
    Daemon *d = daemon_spawn(state_path, extra, NULL);
    g_autofree char *log = NULL;

    if (!daemon_wait_exit(d, 5000)) {
        dump_log(d);
        fail_msg("extlockd did not refuse to start");
    }
    assert_true(WIFEXITED(d->status));
    if (WEXITSTATUS(d->status) != status) {
        dump_log(d);
        fail_msg("exit status %d, expected %d", WEXITSTATUS(d->status),
                 status);
    }
    assert_false(g_file_test(d->sock, G_FILE_TEST_EXISTS));
    assert_true(g_file_get_contents(d->log, &log, NULL, NULL));
    if (!strstr(log, log_needle)) {
        dump_log(d);
        fail_msg("log does not mention \"%s\"", log_needle);
    }
}

static void test_corrupt_state(void **state)
{
    g_autofree char *path = g_build_filename(fx.dir, "corrupt.state", NULL);
    static const char *const bad[] = {
        "garbage",
        "",
        "{\"version\":1}",
        "{\"version\":1,\"epoch\":-1}",
        "{\"version\":1,\"epoch\":\"7\"}",
        "{\"version\":1,\"epoch\":7} trailing",
        "[1]",
    };
    g_autofree char *text = NULL;

    for (size_t i = 0; i < G_N_ELEMENTS(bad); i++) {
        assert_true(g_file_set_contents(path, bad[i], -1, NULL));
        expect_refusal(path, NULL, 1, "corrupt");
        /* The file is left alone for the administrator to inspect */
        g_free(text);
        assert_true(g_file_get_contents(path, &text, NULL, NULL));
        assert_string_equal(text, bad[i]);
    }
    assert_true(g_file_set_contents(path, "{\"version\":2,\"epoch\":7}", -1,
                                    NULL));
    expect_refusal(path, NULL, 1, "version");
    /* The last epoch: no room for another start */
    assert_true(g_file_set_contents(path, "{\"version\":1,\"epoch\":8388607}",
                                    -1, NULL));
    expect_refusal(path, NULL, 1, "exhausted");
    /* A good one starts */
    assert_true(g_file_set_contents(path, "{\"version\":1,\"epoch\":41}\n",
                                    -1, NULL));
    daemon_stop(daemon_start(path, NULL, NULL));
    g_free(text);
    text = read_state(path);
    assert_string_equal(text, "{\"version\":1,\"epoch\":42}");
}

static void test_bad_options(void **state)
{
    static const char *const o1[] = { "--lease-ms=5", NULL };
    static const char *const o2[] = { "--bogus", NULL };
    static const char *const o3[] = { "--listen", "ftp:x", NULL };
    static const char *const o4[] = { "--max-sessions=abc", NULL };
    static const char *const o5[] = { "--fence-margin-ms=-1", NULL };
    static const char *const o6[] = { "extra-argument", NULL };
    static const char *const o7[] = { "--poll-us=-1", NULL };
    static const char *const o8[] = { "--poll-us=100001", NULL };

    expect_refusal(NULL, o1, 2, "--lease-ms");
    expect_refusal(NULL, o2, 2, "bogus");
    expect_refusal(NULL, o3, 2, "ftp:x");
    expect_refusal(NULL, o4, 2, "abc");
    expect_refusal(NULL, o5, 2, "--fence-margin-ms");
    expect_refusal(NULL, o6, 2, "extra-argument");
    expect_refusal(NULL, o7, 2, "--poll-us");
    expect_refusal(NULL, o8, 2, "--poll-us");
}

static void test_sockets_and_state_lock(void **state)
{
    Daemon *d1, *d2;
    ExtlockConn *c;
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    g_autofree char *extra_addr = NULL;
    const char *extra[3] = { "--listen", NULL, NULL };
    int fd;

    /* A stale socket file (nobody listening) is replaced */
    d1 = daemon_start(NULL, NULL, NULL);
    daemon_stop(d1);
    g_strlcpy(sun.sun_path, d1->sock, sizeof(sun.sun_path));
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&sun, sizeof(sun)), 0);
    close(fd);
    assert_true(g_file_test(d1->sock, G_FILE_TEST_EXISTS));
    extra_addr = g_strdup_printf("unix:%s", d1->sock);
    extra[1] = extra_addr;
    d2 = daemon_start(NULL, extra, NULL);
    c = conn_open(extra_addr);
    /*
     * A's session must outlive the two refused daemons started below:
     * each start (under ASan, on a loaded machine) can take longer than
     * the default LEASE_MS, and an expired session is closed, which is
     * not what this test is about.  LONG_LEASE_MS cannot run out here.
     */
    g_free(hello_full(c, "A", "disk", LONG_LEASE_MS, NULL));
    renew(c);

    /* A live socket is not stolen; a state file in use is refused */
    expect_refusal(NULL, extra, 1, "listening");
    expect_refusal(d2->state, NULL, 1, "in use");
    renew(c);

    daemon_stop_with(d2, SIGINT);
    assert_false(g_file_test(d1->sock, G_FILE_TEST_EXISTS));
    expect_eof(c);
}

/* One bad message: its error, no state change, everybody else fine */
typedef struct BadCase {
    const char *line;
    bool has_id;
    uint64_t id;
    ExtlockErrorCode code;
} BadCase;

static void check_bad(ExtlockConn *bad, ExtlockConn *other,
                      ExtlockConn *mon, const char *line, bool has_id,
                      uint64_t id, ExtlockErrorCode code)
{
    g_autofree char *before = NULL, *after = NULL;
    int64_t err0, err1;

    before = status_stable(mon, &err0);
    send_raw(bad, line);
    expect_error(bad, has_id, id, code);
    after = status_stable(mon, &err1);
    if (strcmp(before, after) != 0) {
        fail_msg("status changed by %s\nbefore: %s\nafter:  %s", line,
                 before, after);
    }
    assert_int_equal(err1, err0 + 1);
    renew(other);
}

static void test_bad_input(void **state)
{
    static const BadCase cases[] = {
        { "{\"type\":\"lock\",\n", false, 0, EXTLOCK_ERR_PARSE },
        { "not json at all\n", false, 0, EXTLOCK_ERR_PARSE },
        { "[1,2,3]\n", false, 0, EXTLOCK_ERR_PARSE },
        { "\"lock\"\n", false, 0, EXTLOCK_ERR_PARSE },
        { "{\"type\":\"renew\",\"id\":3} {}\n", false, 0,
          EXTLOCK_ERR_PARSE },
        { "\n", false, 0, EXTLOCK_ERR_PARSE },
        { "{\"type\":\"frobnicate\",\"id\":11}\n", true, 11,
          EXTLOCK_ERR_UNKNOWN_TYPE },
        { "{\"type\":\"welcome\",\"id\":12,\"version\":2,\"session\":\"x\","
          "\"lease-ms\":1000,\"epoch\":1}\n", true, 12,
          EXTLOCK_ERR_UNKNOWN_TYPE },
        { "{\"id\":13}\n", true, 13, EXTLOCK_ERR_INVALID },
        { "{\"type\":7,\"id\":14}\n", true, 14, EXTLOCK_ERR_INVALID },
        { "{\"type\":\"lock\",\"id\":15,\"offset\":\"0\",\"length\":10,"
          "\"mode\":\"shared\"}\n", true, 15, EXTLOCK_ERR_INVALID },
        { "{\"type\":\"lock\",\"id\":16,\"offset\":0,\"length\":10,"
          "\"mode\":\"rw\"}\n", true, 16, EXTLOCK_ERR_INVALID },
        { "{\"type\":\"lock\",\"id\":17,\"offset\":0,\"length\":10.5,"
          "\"mode\":\"shared\"}\n", true, 17, EXTLOCK_ERR_INVALID },
        { "{\"type\":\"lock\",\"id\":18,\"offset\":0,\"mode\":\"shared\"}\n",
          true, 18, EXTLOCK_ERR_INVALID },
        { "{\"type\":\"lock\",\"id\":19,\"offset\":0,\"length\":10,"
          "\"mode\":\"shared\",\"wait\":\"yes\"}\n", true, 19,
          EXTLOCK_ERR_INVALID },
        { "{\"type\":\"unlock\",\"id\":20,\"lock\":\"1\"}\n", true, 20,
          EXTLOCK_ERR_INVALID },
        { "{\"type\":\"cancel\",\"id\":21}\n", true, 21,
          EXTLOCK_ERR_INVALID },
        { "{\"type\":\"lock\",\"id\":-22,\"offset\":0,\"length\":1,"
          "\"mode\":\"shared\"}\n", false, 0, EXTLOCK_ERR_INVALID },
        { "{\"type\":\"lock\",\"id\":23,\"offset\":-1,\"length\":10,"
          "\"mode\":\"shared\"}\n", true, 23, EXTLOCK_ERR_RANGE },
        { "{\"type\":\"lock\",\"id\":24,\"offset\":0,\"length\":0,"
          "\"mode\":\"shared\"}\n", true, 24, EXTLOCK_ERR_RANGE },
        { "{\"type\":\"lock\",\"id\":25,\"offset\":0,\"length\":-5,"
          "\"mode\":\"shared\"}\n", true, 25, EXTLOCK_ERR_RANGE },
        { "{\"type\":\"lock\",\"id\":26,\"offset\":9223372036854775807,"
          "\"length\":2,\"mode\":\"shared\"}\n", true, 26,
          EXTLOCK_ERR_RANGE },
        { "{\"type\":\"lock\",\"id\":27,\"offset\":18446744073709551615,"
          "\"length\":1,\"mode\":\"exclusive\"}\n", true, 27,
          EXTLOCK_ERR_RANGE },
        { "{\"type\":\"lock\",\"id\":28,\"offset\":1,"
          "\"length\":99999999999999999999999,\"mode\":\"shared\"}\n",
          true, 28, EXTLOCK_ERR_RANGE },
        { "{\"type\":\"unlock\",\"id\":29,\"lock\":1,\"offset\":5,"
          "\"length\":0}\n", true, 29, EXTLOCK_ERR_RANGE },
        { "{\"type\":\"hello\",\"id\":30,\"version\":2,\"client-id\":\"A\","
          "\"lock-space\":\"disk\"}\n", true, 30, EXTLOCK_ERR_STATE },
        { "{\"type\":\"unlock\",\"id\":31,\"lock\":987654}\n", true, 31,
          EXTLOCK_ERR_NOT_FOUND },
        { "{\"type\":\"cancel\",\"id\":32,\"request\":777}\n", true, 32,
          EXTLOCK_ERR_NOT_FOUND },
        { "{\"type\":\"reclaim\",\"id\":33,\"offset\":0,\"length\":1,"
          "\"mode\":\"shared\",\"token\":5}\n", true, 33,
          EXTLOCK_ERR_STATE },
    };
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->tcp_addr, "B", LONG_LEASE_MS);
    ExtlockConn *n = conn_open(d->unix_addr);
    ExtlockConn *mon = conn_open(d->unix_addr);
    g_autofree char *line = NULL, *huge = NULL;
    ExtlockMsg w;
    uint64_t rb;
    Grant ga, gb;

    /* Some state worth comparing: held and waiting locks */
    extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
    ga = lock_now(a, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    gb = lock_now(b, 8192, 4096, EXTLOCK_MODE_SHARED);
    rb = lock_waits(b, 0, 4096, EXTLOCK_MODE_SHARED, &w);
    extlock_msg_clear(&w);

    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        check_bad(a, b, mon, cases[i].line, cases[i].has_id, cases[i].id,
                  cases[i].code);
    }

    /* Another session's lock is not found, and stays B's */
    line = g_strdup_printf("{\"type\":\"unlock\",\"id\":40,\"lock\":%"
                           PRIu64 "}\n", gb.lock);
    check_bad(a, b, mon, line, true, 40, EXTLOCK_ERR_NOT_FOUND);
    g_free(line);
    line = g_strdup_printf("{\"type\":\"cancel\",\"id\":41,\"request\":%"
                           PRIu64 "}\n", rb);
    check_bad(a, b, mon, line, true, 41, EXTLOCK_ERR_NOT_FOUND);

    /* Oversized line: error, and the connection keeps working */
    huge = g_malloc(EXTLOCK_MAX_LINE + 4096 + 2);
    memset(huge, ' ', EXTLOCK_MAX_LINE + 4096);
    g_free(line);
    line = g_strdup("{\"type\":\"renew\",\"id\":42,\"pad\":\"");
    memcpy(huge, line, strlen(line));
    strcpy(huge + EXTLOCK_MAX_LINE + 4096 - 3, "\"}\n");
    check_bad(a, b, mon, huge, false, 0, EXTLOCK_ERR_LINE_TOO_LONG);
    renew(a);

    /* A connection without a session */
    check_bad(n, b, mon, "{\"type\":\"lock\",\"id\":1,\"offset\":0,"
              "\"length\":1,\"mode\":\"shared\"}\n", true, 1,
              EXTLOCK_ERR_STATE);
    check_bad(n, b, mon, "{\"type\":\"unlock\",\"id\":2,\"lock\":1}\n",
              true, 2, EXTLOCK_ERR_STATE);
    check_bad(n, b, mon, "{\"type\":\"cancel\",\"id\":3,\"request\":1}\n",
              true, 3, EXTLOCK_ERR_STATE);
    check_bad(n, b, mon, "{\"type\":\"renew\",\"id\":4}\n", true, 4,
              EXTLOCK_ERR_STATE);
    check_bad(n, b, mon, "{\"type\":\"hello\",\"id\":5,\"version\":3,"
              "\"client-id\":\"N\",\"lock-space\":\"disk\"}\n", true, 5,
              EXTLOCK_ERR_VERSION);
    check_bad(n, b, mon, "{\"type\":\"hello\",\"id\":10,\"version\":1,"
              "\"client-id\":\"N\",\"lock-space\":\"disk\"}\n", true, 10,
              EXTLOCK_ERR_VERSION);
    check_bad(n, b, mon, "{\"type\":\"hello\",\"id\":6,\"version\":2,"
              "\"client-id\":\"N\",\"lock-space\":\"disk\","
              "\"lease-ms\":50}\n", true, 6, EXTLOCK_ERR_INVALID);
    check_bad(n, b, mon, "{\"type\":\"hello\",\"id\":7,\"version\":2,"
              "\"client-id\":\"N\\u0001\",\"lock-space\":\"disk\"}\n",
              true, 7, EXTLOCK_ERR_INVALID);
    check_bad(n, b, mon, "{\"type\":\"hello\",\"id\":8,\"version\":2,"
              "\"client-id\":\"\",\"lock-space\":\"disk\"}\n", true, 8,
              EXTLOCK_ERR_INVALID);
    check_bad(n, b, mon, "{\"type\":\"hello\",\"id\":9,\"version\":2,"
              "\"lock-space\":\"disk\"}\n", true, 9, EXTLOCK_ERR_INVALID);
    /* ... which can still say hello properly afterwards */
    g_free(hello_full(n, "N", "disk", LONG_LEASE_MS, NULL));
    lock_now(n, 100000, 1, EXTLOCK_MODE_SHARED);

    /* Nobody got anything unexpected, and the queue still works */
    expect_quiet(b, 20);
    unlock_all(a, ga.lock);
    expect_granted(b, rb, 0, 4096, EXTLOCK_MODE_SHARED);
    daemon_stop(d);
}

static void test_limits(void **state)
{
    static const char *const extra[] = {
        "--max-locks-per-session=3", "--max-sessions=3", NULL
    };
    Daemon *d = daemon_start(NULL, extra, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->tcp_addr, "B", LONG_LEASE_MS);
    ExtlockConn *mon = conn_open(d->unix_addr);
    ExtlockConn *c, *x;
    ExtlockMsg w;
    uint64_t ra, id;
    Grant g1, gb;

    extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
    gb = lock_now(b, 1000, 10, EXTLOCK_MODE_EXCLUSIVE);
    g1 = lock_now(a, 0, 10, EXTLOCK_MODE_SHARED);
    lock_now(a, 20, 10, EXTLOCK_MODE_SHARED);
    ra = lock_waits(a, 1000, 10, EXTLOCK_MODE_SHARED, &w);
    extlock_msg_clear(&w);

    /* Two held plus one waiting is the limit of 3 */
    check_bad(a, b, mon, "{\"type\":\"lock\",\"id\":100,\"offset\":50,"
              "\"length\":1,\"mode\":\"shared\"}\n", true, 100,
              EXTLOCK_ERR_LIMIT);
    check_bad(a, b, mon, "{\"type\":\"lock\",\"id\":101,\"offset\":50,"
              "\"length\":1,\"mode\":\"shared\",\"wait\":false}\n", true,
              101, EXTLOCK_ERR_LIMIT);
    /* Releasing one makes room again */
    unlock_all(a, g1.lock);
    id = send_lock(a, 50, 1, EXTLOCK_MODE_SHARED, true);
    expect_granted(a, id, 50, 1, EXTLOCK_MODE_SHARED);

    /* Sessions: A, B and C fit, a fourth does not */
    c = client(d->unix_addr, "C", LONG_LEASE_MS);
    x = conn_open(d->tcp_addr);
    check_bad(x, b, mon, "{\"type\":\"hello\",\"id\":1,\"version\":2,"
              "\"client-id\":\"X\",\"lock-space\":\"other\"}\n", true, 1,
              EXTLOCK_ERR_LIMIT);
    bye(c);
    g_free(hello_full(x, "X", "other", LONG_LEASE_MS, NULL));

    unlock_all(b, gb.lock);
    expect_granted(a, ra, 1000, 10, EXTLOCK_MODE_SHARED);
    daemon_stop(d);
}

/*
 * A client that floods requests without reading its replies is throttled
 * (the daemon stops reading from it), others are served meanwhile, and
 * once it reads, every reply is there.
 *
 * "Served meanwhile" is checked as order, not as a wall-clock bound: Y's
 * requests are all answered while the daemon has still not processed X's
 * whole flood (its "messages" counter, which counts every request read,
 * has not advanced by as many as X has written).  Y is not queued behind
 * X.  How fast Y is served is a benchmark figure (scripts/bench.sh).
 */
static void test_flood(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *x = client(d->unix_addr, "X", LONG_LEASE_MS);
    ExtlockConn *y = client(d->tcp_addr, "Y", LONG_LEASE_MS);
    ExtlockConn *mon = conn_open(d->unix_addr);
    json_object *st;
    int64_t msgs0, msgs1;
    uint64_t written;
    int unread;
    g_autoptr(GString) batch = g_string_new(NULL);
    uint64_t first = extlock_conn_next_id(x);
    uint64_t sent = 0, got = 0;
    size_t pos = 0;
    int fd = extlock_conn_fd(x);
    int64_t t0;
    ExtlockMsg m;

    st = status_get(mon);
    msgs0 = jint(jget(st, "counters"), "messages");
    json_object_put(st);
    for (int i = 0; i < 4096; i++) {
        g_string_append_printf(batch, "{\"type\":\"renew\",\"id\":%" PRIu64
                               "}\n", first + i);
    }
    /* Write whole batches until the daemon stops taking them */
    for (;;) {
        ssize_t n = send(fd, batch->str + pos, batch->len - pos,
                         MSG_DONTWAIT | MSG_NOSIGNAL);

        if (n < 0) {
            struct pollfd pfd = { .fd = fd, .events = POLLOUT };

            assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
            /*
             * Full.  A daemon that is only slow (ASan, a loaded machine)
             * reads on, and X writes on; one that throttles X reads
             * nothing more.  RECV_MS without reading at all is taken as
             * throttled - if it was not, the check below fails, it cannot
             * pass by luck.
             */
            if (poll(&pfd, 1, RECV_MS) == 0) {
                break;
            }
            continue;
        }
        pos += n;
        if (pos == batch->len) {
            sent += 4096;
            pos = 0;
            assert_true(sent < 10 * 1000 * 1000);
            g_string_truncate(batch, 0);
            for (int i = 0; i < 4096; i++) {
                g_string_append_printf(batch, "{\"type\":\"renew\",\"id\":%"
                                       PRIu64 "}\n", first + sent + i);
            }
        }
    }
    assert_true(sent > 0);

    /* Y is served meanwhile, before X's flood is processed */
    for (int i = 0; i < 20; i++) {
        Grant g = lock_now(y, i * 10, 10, EXTLOCK_MODE_EXCLUSIVE);

        unlock_all(y, g.lock);
    }
    /*
     * X's flood still waits, unread, in its socket (SIOCOUTQ: what X wrote
     * that the daemon has not read) while Y got all its answers.  A daemon
     * that did not throttle X would have read the rest of it while it
     * served Y's 40 requests (it reads every readable connection each
     * round).  Also: everything the daemon read since msgs0 (X's
     * renewals, Y's requests, this status) is fewer than what X wrote.
     */
    assert_int_equal(ioctl(fd, SIOCOUTQ, &unread), 0);
    st = status_get(mon);
    msgs1 = jint(jget(st, "counters"), "messages");
    json_object_put(st);
    written = sent;
    for (size_t i = 0; i < pos; i++) {
        written += batch->str[i] == '\n';
    }
    g_test_message("X wrote %" PRIu64 " renewals (%d bytes not read by the "
                   "daemon); the daemon read %" PRId64 " requests in all "
                   "while Y was served", written, unread, msgs1 - msgs0);
    assert_true(unread > 0);
    assert_true(msgs1 - msgs0 < (int64_t)written);

    /*
     * Read every reply, in order, while sending the rest of the current
     * batch (the daemon reads more only as X drains its replies).
     */
    sent += 4096;
    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    t0 = now_ms();
    while (got < sent) {
        GError *err = NULL;

        if (pos < batch->len) {
            ssize_t n = send(fd, batch->str + pos, batch->len - pos,
                             MSG_DONTWAIT | MSG_NOSIGNAL);
            if (n > 0) {
                pos += n;
            } else {
                assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
            }
        }
        if (extlock_conn_recv(x, &m, 20, &err)) {
            assert_int_equal(m.type, EXTLOCK_MSG_RENEWED);
            assert_int_equal(m.id, first + got);
            got++;
        } else {
            assert_true(g_error_matches(err, G_IO_ERROR,
                                        G_IO_ERROR_TIMED_OUT));
            g_error_free(err);
        }
        assert_true(now_ms() - t0 < 20000);
    }
    extlock_msg_clear(&m);
    expect_quiet(x, 20);
    renew(x);
    daemon_stop(d);
}

static bool run_ctl(const char *addr, const char *const *args, char **out)
{
    g_autoptr(GPtrArray) argv = g_ptr_array_new();
    GError *err = NULL;
    int status;

    g_ptr_array_add(argv, (char *)extlockctl_bin);
    g_ptr_array_add(argv, (char *)"-c");
    g_ptr_array_add(argv, (char *)addr);
    for (int i = 0; args[i]; i++) {
        g_ptr_array_add(argv, (char *)args[i]);
    }
    g_ptr_array_add(argv, NULL);
    if (!g_spawn_sync(NULL, (char **)argv->pdata, NULL, G_SPAWN_DEFAULT,
                      NULL, NULL, out, NULL, &status, &err)) {
        fail_msg("cannot run extlockctl: %s", err->message);
    }
    return g_spawn_check_wait_status(status, NULL);
}

static void test_extlockctl(void **state)
{
    Daemon *d;
    ExtlockConn *a, *b;
    g_autofree char *sa = NULL, *sb = NULL;
    g_autofree char *out = NULL, *tok = NULL;
    ExtlockMsg w;
    json_object *st, *sp;
    Grant ga;
    static const char *const a_status[] = { "status", NULL };
    static const char *const a_json[] = { "--json", "status", NULL };
    static const char *const a_sessions[] = { "sessions", NULL };
    static const char *const a_locks[] = { "locks", NULL };
    static const char *const a_waiters[] = { "waiters", NULL };
    static const char *const a_counters[] = { "--json", "counters", NULL };

    if (!extlockctl_bin) {
        skip();     /* EXTLOCKCTL not set: run outside meson */
    }
    assert_true(g_file_test(extlockctl_bin, G_FILE_TEST_IS_EXECUTABLE));
    d = daemon_start(NULL, NULL, NULL);
    a = conn_open(d->unix_addr);
    b = conn_open(d->tcp_addr);
    sa = hello_full(a, "hostA/disk0", "cluster-disk", LONG_LEASE_MS, NULL);
    sb = hello_full(b, "hostB/disk0", "cluster-disk", LONG_LEASE_MS, NULL);
    extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
    ga = lock_now(a, 0, 65536, EXTLOCK_MODE_EXCLUSIVE);
    lock_waits(b, 4096, 512, EXTLOCK_MODE_SHARED, &w);
    extlock_msg_clear(&w);

    assert_true(run_ctl(d->unix_addr, a_status, &out));
    assert_non_null(strstr(out, "hostA/disk0"));
    assert_non_null(strstr(out, "hostB/disk0"));
    assert_non_null(strstr(out, "cluster-disk"));
    g_free(out);

    assert_true(run_ctl(d->unix_addr, a_sessions, &out));
    assert_non_null(strstr(out, sa));
    assert_non_null(strstr(out, sb));
    g_free(out);
    /* Not an admin identity ("anonymous" over plain TCP): refused */
    assert_false(run_ctl(d->tcp_addr, a_sessions, &out));
    g_free(out);

    tok = g_strdup_printf("%" PRIu64, ga.token);
    assert_true(run_ctl(d->unix_addr, a_locks, &out));
    assert_non_null(strstr(out, "hostA/disk0"));
    assert_non_null(strstr(out, tok));
    assert_non_null(strstr(out, "65536"));
    g_free(out);

    assert_true(run_ctl(d->unix_addr, a_waiters, &out));
    assert_non_null(strstr(out, "hostB/disk0"));
    assert_non_null(strstr(out, "hostA/disk0"));  /* blocked by */
    g_free(out);

    assert_true(run_ctl(d->unix_addr, a_json, &out));
    st = json_tokener_parse(out);
    assert_non_null(st);
    assert_int_equal(json_object_array_length(jget(st, "sessions")), 2);
    sp = first_space(st);
    assert_string_equal(jstr(sp, "name"), "cluster-disk");
    assert_int_equal(json_object_array_length(jget(sp, "held")), 1);
    assert_int_equal(json_object_array_length(jget(sp, "waiting")), 1);
    assert_string_equal(jstr(json_object_array_get_idx(
                                 jget(sp, "waiting"), 0), "client-id"),
                        "hostB/disk0");
    json_object_put(st);
    g_free(out);

    assert_true(run_ctl(d->unix_addr, a_counters, &out));
    st = json_tokener_parse(out);
    assert_non_null(st);
    assert_int_equal(jint(jget(st, "server"), "sessions"), 2);
    assert_int_equal(jint(jget(jget(st, "lock-spaces"), "cluster-disk"),
                          "waits"), 1);
    json_object_put(st);
    g_free(out);

    /* Unreachable coordinator: failure exit status */
    daemon_stop(d);
    assert_false(run_ctl(d->unix_addr, a_status, &out));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_timestamp_order, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_shared_together, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_partial_unlock, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_cancel, setup, teardown),
        cmocka_unit_test_setup_teardown(test_would_block, setup, teardown),
        cmocka_unit_test_setup_teardown(test_disconnect_fencing, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_bye_releases, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_lease_expiry, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_poll_us, setup, teardown),
        cmocka_unit_test_setup_teardown(test_resume, setup, teardown),
        cmocka_unit_test_setup_teardown(test_epoch_restart, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_corrupt_state, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_bad_options, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sockets_and_state_lock, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_bad_input, setup, teardown),
        cmocka_unit_test_setup_teardown(test_limits, setup, teardown),
        cmocka_unit_test_setup_teardown(test_flood, setup, teardown),
        cmocka_unit_test_setup_teardown(test_extlockctl, setup, teardown),
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
