/*
 * Integration tests: persistent reservations in the real extlockd
 * (contrib/extlockd/reservation.c, docs/protocol.rst "Persistent
 * reservations"): every service action over the wire, the SPC-4 error
 * results, bad messages, the push to every subscribed session and the
 * acknowledgements a pr-out waits for, PREEMPT AND ABORT ending the
 * preempted session, and the state surviving a coordinator restart.
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <signal.h>
#include <cmocka.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <glib.h>

#include "extlockd-harness.h"

static void test_pr_push_and_ack(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->unix_addr, "B", LONG_LEASE_MS);
    ExtlockConn *c = client(d->tcp_addr, "C", LONG_LEASE_MS);
    ExtlockConn *bc[] = { b, c };
    ExtlockConn *ac[] = { a, c };
    ExtlockConn *other = client(d->unix_addr, "not-subscribed",
                                LONG_LEASE_MS);
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    uint64_t seq;

    pr_in(a, &m);
    assert_int_equal(m.pr_seq, 0);
    assert_int_equal(m.pr->generation, 0);
    assert_int_equal(m.pr->type, EXTLOCK_PR_TYPE_NONE);
    assert_int_equal(m.pr->registrants->len, 0);
    extlock_msg_clear(&m);
    pr_in(b, &m);
    extlock_msg_clear(&m);
    pr_in(c, &m);
    extlock_msg_clear(&m);

    seq = pr_change(a, bc, 2, EXTLOCK_PR_REGISTER, 0, 0, 0xaaaa, 1);
    assert_int_equal(seq, 1);
    pr_change(b, ac, 2, EXTLOCK_PR_REGISTER_AND_IGNORE, 0, 0x1234,
           0xbbbbbbbbbbbbbbbbULL, 2);
    pr_change(a, bc, 2, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_WE_RO, 0xaaaa, 0,
           2);
    /* A session that never subscribed gets nothing and is not waited for */
    expect_quiet(other, QUIET_MS);

    /* Everybody reads the same state */
    for (int i = 0; i < 3; i++) {
        ExtlockConn *x = i == 0 ? a : bc[i - 1];

        pr_in(x, &m);
        assert_int_equal(m.pr_seq, 3);
        assert_int_equal(m.pr->generation, 2);
        assert_int_equal(m.pr->type, EXTLOCK_PR_TYPE_WE_RO);
        assert_string_equal(m.pr->holder, "A");
        assert_int_equal(m.pr->registrants->len, 2);
        assert_int_equal(extlock_pr_find(m.pr, "A")->key, 0xaaaa);
        assert_int_equal(extlock_pr_find(m.pr, "B")->key,
                         0xbbbbbbbbbbbbbbbbULL);
        assert_true(extlock_pr_allows(m.pr, "B", true));
        assert_false(extlock_pr_allows(m.pr, "C", true));
        extlock_msg_clear(&m);
    }
    /* The status shows it */
    {
        json_object *st = status_get(other);
        json_object *r = jget(first_space(st), "reservation");

        assert_int_equal(jint(r, "generation"), 2);
        assert_int_equal(jint(r, "pr-type"), 5);
        assert_string_equal(jstr(r, "holder"), "A");
        json_object_put(st);
    }
    /* ... and extlockctl */
    {
        g_autofree char *out = ctl_output(d->unix_addr, "reservations", NULL);

        assert_non_null(strstr(out, "Persistent reservations"));
        assert_non_null(strstr(out, "A=0xaaaa B=0xbbbbbbbbbbbbbbbb"));
        g_free(out);
        out = ctl_output(d->unix_addr, "--json", "reservations");
        assert_non_null(strstr(out, "\"holder\": \"A\""));
    }
    daemon_stop(d);
}

static void test_pr_errors(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->unix_addr, "B", LONG_LEASE_MS);
    ExtlockConn *ba[] = { b };
    ExtlockConn *ab[] = { a };
    ExtlockConn *pre = conn_open(d->unix_addr);
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    uint64_t id;

    pr_in(b, &m);
    extlock_msg_clear(&m);
    pr_change(a, ba, 1, EXTLOCK_PR_REGISTER, 0, 0, 0xa, 1);
    pr_change(a, ba, 1, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_EA, 0xa, 0, 1);

    /* SPC-4 errors: answered at once, nothing pushed, nothing changes */
    id = pr_out(b, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_EA, 0xb, 0);
    pr_expect_result(b, id, EXTLOCK_PR_CONFLICT, 1);    /* unregistered */
    id = pr_out(a, EXTLOCK_PR_REGISTER, 0, 0xbad, 0xc);
    pr_expect_result(a, id, EXTLOCK_PR_CONFLICT, 1);           /* wrong key */
    id = pr_out(a, EXTLOCK_PR_RESERVE, 2, 0xa, 0);
    pr_expect_result(a, id, EXTLOCK_PR_INVALID_FIELD_CDB, 1);  /* bad type */
    id = pr_out(a, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_WE, 0xa, 0);
    pr_expect_result(a, id, EXTLOCK_PR_CONFLICT, 1);           /* other type */
    id = pr_out(a, EXTLOCK_PR_RELEASE, EXTLOCK_PR_TYPE_WE, 0xa, 0);
    pr_expect_result(a, id, EXTLOCK_PR_INVALID_RELEASE, 1);    /* wrong type */
    id = pr_out(a, EXTLOCK_PR_PREEMPT, EXTLOCK_PR_TYPE_EA, 0xa, 0);
    pr_expect_result(a, id, EXTLOCK_PR_INVALID_FIELD_PARAM, 1); /* SARK 0 */
    expect_quiet(b, QUIET_MS);

    /* RELEASE by a registered non-holder: GOOD, the reservation stays */
    pr_change(b, ab, 1, EXTLOCK_PR_REGISTER, 0, 0, 0xb, 2);
    pr_out(b, EXTLOCK_PR_RELEASE, EXTLOCK_PR_TYPE_EA, 0xb, 0);
    /* (it still pushes and waits: "seq" counts every successful pr-out) */
    {
        uint64_t seq = pr_expect_update(b, &m);

        extlock_msg_clear(&m);
        assert_int_equal(pr_expect_update(a, &m), seq);
        assert_int_equal(m.pr->type, EXTLOCK_PR_TYPE_EA);
        assert_string_equal(m.pr->holder, "A");
        extlock_msg_clear(&m);
        pr_ack(a, seq);
        recv_msg(b, &m, RECV_MS);
        assert_int_equal(m.type, EXTLOCK_MSG_PR_RESULT);
        assert_int_equal(m.pr_result, EXTLOCK_PR_OK);
        extlock_msg_clear(&m);
    }

    /* Bad messages: protocol errors, no state change */
    send_raw(a, "{\"type\":\"pr-out\",\"id\":50,\"action\":"
                "\"register-and-move\",\"key\":\"a\"}\n");
    expect_error(a, true, 50, EXTLOCK_ERR_INVALID);
    send_raw(a, "{\"type\":\"pr-out\",\"id\":51,\"action\":\"register\","
                "\"key\":\"A\",\"sa-key\":\"1\"}\n");
    expect_error(a, true, 51, EXTLOCK_ERR_INVALID);
    send_raw(a, "{\"type\":\"pr-out\",\"id\":52,\"action\":\"register\","
                "\"key\":\"a\",\"sa-key\":\"11112222333344445\"}\n");
    expect_error(a, true, 52, EXTLOCK_ERR_INVALID);
    send_raw(a, "{\"type\":\"pr-out\",\"id\":53,\"action\":\"reserve\","
                "\"key\":\"a\",\"pr-type\":16}\n");
    expect_error(a, true, 53, EXTLOCK_ERR_INVALID);
    send_raw(a, "{\"type\":\"pr-out\",\"id\":54,\"action\":\"reserve\","
                "\"key\":10}\n");
    expect_error(a, true, 54, EXTLOCK_ERR_INVALID);
    send_raw(a, "{\"type\":\"pr-ack\",\"id\":55,\"seq\":1000}\n");
    expect_error(a, true, 55, EXTLOCK_ERR_INVALID);
    send_raw(pre, "{\"type\":\"pr-out\",\"id\":56,\"action\":\"register\","
                  "\"sa-key\":\"1\"}\n");
    expect_error(pre, true, 56, EXTLOCK_ERR_STATE);
    send_raw(pre, "{\"type\":\"pr-in\",\"id\":57}\n");
    expect_error(pre, true, 57, EXTLOCK_ERR_STATE);
    pr_in(b, &m);
    assert_int_equal(m.pr->generation, 2);
    assert_int_equal(m.pr->registrants->len, 2);
    assert_int_equal(m.pr->type, EXTLOCK_PR_TYPE_EA);
    extlock_msg_clear(&m);
    daemon_stop(d);
}

/* A subscriber that never acknowledges holds a pr-out until its lease ends */
static void test_pr_waits_for_lease(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *silent = client(d->unix_addr, "S", LEASE_MS);
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    uint64_t id;

    pr_in(silent, &m);
    extlock_msg_clear(&m);
    id = pr_out(a, EXTLOCK_PR_REGISTER, 0, 0, 0xa);
    pr_expect_update(a, &m);
    extlock_msg_clear(&m);
    /* S neither acks nor renews: the reply waits for its lease to lapse */
    expect_quiet(a, QUIET_MS);
    recv_msg(a, &m, LEASE_MS + SLACK_MS + RECV_MS);
    assert_int_equal(m.type, EXTLOCK_MSG_PR_RESULT);
    assert_int_equal(m.id, id);
    assert_int_equal(m.pr_result, EXTLOCK_PR_OK);
    extlock_msg_clear(&m);
    /* by then S has been told that its session expired */
    recv_msg(silent, &m, RECV_MS);
    assert_int_equal(m.type, EXTLOCK_MSG_PR_UPDATE);
    extlock_msg_clear(&m);
    recv_msg(silent, &m, RECV_MS);
    assert_int_equal(m.type, EXTLOCK_MSG_SESSION_EXPIRED);
    extlock_msg_clear(&m);
    daemon_stop(d);
}

static void test_pr_preempt_and_abort(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->unix_addr, "B", LONG_LEASE_MS);
    ExtlockConn *ab[2] = { a, b };
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    uint64_t id, seq, lid;
    Grant g;

    pr_in(a, &m);
    extlock_msg_clear(&m);
    pr_in(b, &m);
    extlock_msg_clear(&m);
    pr_change(a, &ab[1], 1, EXTLOCK_PR_REGISTER, 0, 0, 0xa, 1);
    pr_change(b, &ab[0], 1, EXTLOCK_PR_REGISTER, 0, 0, 0xb, 2);
    pr_change(a, &ab[1], 1, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_WE_RO, 0xa, 0,
           2);
    /* A holds an exclusive lock that B waits for */
    g = lock_now(a, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    (void)g;
    lid = lock_waits(b, 0, 4096, EXTLOCK_MODE_EXCLUSIVE, &m);
    extlock_msg_clear(&m);

    id = pr_out(b, EXTLOCK_PR_PREEMPT_AND_ABORT, EXTLOCK_PR_TYPE_EA_RO, 0xb,
                0xa);
    /* A may get a revoke for its lock first */
    do {
        recv_msg(a, &m, RECV_MS);
        if (m.type == EXTLOCK_MSG_PR_UPDATE) {
            break;
        }
        assert_int_equal(m.type, EXTLOCK_MSG_REVOKE);
        extlock_msg_clear(&m);
    } while (true);
    seq = m.pr_seq;
    assert_null(extlock_pr_find(m.pr, "A"));
    assert_string_equal(m.pr->holder, "B");
    extlock_msg_clear(&m);
    /* B: its update, then nothing until A applied it */
    assert_int_equal(pr_expect_update(b, &m), seq);
    extlock_msg_clear(&m);
    expect_quiet(b, QUIET_MS);
    pr_ack(a, seq);
    /* A's session ends, its lock goes to B, then B's pr-out is answered */
    recv_msg(a, &m, RECV_MS);
    assert_int_equal(m.type, EXTLOCK_MSG_SESSION_EXPIRED);
    extlock_msg_clear(&m);
    expect_eof(a);
    expect_granted(b, lid, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    pr_expect_result(b, id, EXTLOCK_PR_OK, 3);
    daemon_stop(d);
}

static void test_pr_restart(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    g_autofree char *state_file = g_strdup(d->state);
    ExtlockConn *a = client(d->unix_addr, "host\"A", LONG_LEASE_MS);
    g_autofree char *text = NULL;
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };

    pr_change(a, NULL, 0, EXTLOCK_PR_REGISTER, 0, 0, 0xfedcba9876543210ULL, 1);
    pr_change(a, NULL, 0, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_EA,
           0xfedcba9876543210ULL, 0, 1);
    bye(a);
    daemon_stop(d);
    assert_true(g_file_get_contents(state_file, &text, NULL, NULL));
    assert_non_null(strstr(text, "\"reservations\":[{\"lock-space\":\"disk\""));

    d = daemon_start(state_file, NULL, NULL);
    a = client(d->unix_addr, "other", LONG_LEASE_MS);
    pr_in(a, &m);
    assert_int_equal(m.pr_seq, 2);
    assert_int_equal(m.pr->generation, 1);
    assert_int_equal(m.pr->type, EXTLOCK_PR_TYPE_EA);
    assert_string_equal(m.pr->holder, "host\"A");
    assert_int_equal(extlock_pr_find(m.pr, "host\"A")->key,
                     0xfedcba9876543210ULL);
    extlock_msg_clear(&m);
    /* The holder is gone, its reservation stays until preempted */
    pr_change(a, NULL, 0, EXTLOCK_PR_REGISTER, 0, 0, 0x1, 2);
    pr_change(a, NULL, 0, EXTLOCK_PR_PREEMPT, EXTLOCK_PR_TYPE_WE, 0x1,
           0xfedcba9876543210ULL, 3);
    pr_in(a, &m);
    assert_string_equal(m.pr->holder, "other");
    assert_int_equal(m.pr->type, EXTLOCK_PR_TYPE_WE);
    extlock_msg_clear(&m);
    daemon_stop(d);

    /* A corrupt reservation keeps the daemon from starting */
    {
        g_autofree char *bad = g_strdup(
            "{\"version\":1,\"epoch\":3,\"reservations\":[{\"lock-space\":"
            "\"disk\",\"seq\":1,\"generation\":1,\"pr-type\":5,"
            "\"registrants\":[]}]}\n");

        assert_true(g_file_set_contents(state_file, bad, -1, NULL));
        daemon_refused(state_file, NULL, 1, "reservation of disk");
    }
}

/* Resume @session of @client_id on a new connection to @addr */
static ExtlockConn *resume(const char *addr, const char *client_id,
                           const char *session)
{
    ExtlockConn *c = conn_open(addr);
    ExtlockMsg m, w = { .type = EXTLOCK_MSG_INVALID };

    extlock_msg_init(&m, EXTLOCK_MSG_HELLO);
    m.client_id = (char *)client_id;
    m.lock_space = (char *)"disk";
    m.session = (char *)session;
    m.resume_secret = secret_of(session);
    m.lease_ms = LONG_LEASE_MS;
    send_msg(c, &m);
    expect_msg(c, &w, EXTLOCK_MSG_WELCOME, m.id);
    assert_string_equal(w.session, session);
    extlock_msg_clear(&w);
    return c;
}

/*
 * Only pr-ack acknowledges: a session that reconnects before it acked (its
 * client still drains writes the change forbids) and asks for the state
 * with pr-in is still waited for.  Before the fix the pr-status counted as
 * the acknowledgement and A's pr-out completed at B's pr-in.
 */
static void test_pr_reconnect_needs_ack(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = conn_open(d->unix_addr);
    g_autofree char *sb = hello_full(b, "B", "disk", LONG_LEASE_MS, NULL);
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    uint64_t id, seq;

    pr_in(b, &m);
    extlock_msg_clear(&m);
    id = pr_out(a, EXTLOCK_PR_REGISTER, 0, 0, 0xa);
    seq = pr_expect_update(a, &m);
    extlock_msg_clear(&m);
    assert_int_equal(pr_expect_update(b, &m), seq);
    extlock_msg_clear(&m);

    /* B's connection drops before it acknowledged; it resumes */
    conn_drop(b);
    b = resume(d->unix_addr, "B", sb);
    /* the state comes right after the welcome, and on pr-in */
    assert_int_equal(pr_expect_update(b, &m), seq);
    extlock_msg_clear(&m);
    pr_in(b, &m);
    assert_int_equal(m.pr_seq, seq);
    extlock_msg_clear(&m);
    expect_quiet(a, QUIET_MS);
    pr_in(b, &m);
    extlock_msg_clear(&m);
    expect_quiet(a, QUIET_MS);
    /* an older acknowledgement is not this one */
    pr_ack(b, seq - 1);
    expect_quiet(a, QUIET_MS);
    pr_ack(b, seq);
    pr_expect_result(a, id, EXTLOCK_PR_OK, 1);
    daemon_stop(d);
}

#define ACK_TIMEOUT_MS  500
#define S_LEASE_MS      2000

/*
 * A session that renews its lease but never acknowledges is expired after
 * --pr-ack-timeout-ms, and the change completes when the lease it had
 * ends (not before: its client may write until then).  Before the fix,
 * A's pr-out waited for as long as S renewed.
 */
static void test_pr_ack_timeout(void **state)
{
    const char *extra[] = { "--pr-ack-timeout-ms=" G_STRINGIFY(ACK_TIMEOUT_MS),
                            NULL };
    Daemon *d = daemon_start(NULL, extra, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *s = client(d->unix_addr, "S", S_LEASE_MS);
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    int64_t t_out, t_renewed = 0, t_expired = 0, t_result;
    /* when each renew was sent; the n-th "renewed" answers the n-th */
    int64_t sent[256], t_renew_sent = 0;
    guint nsent = 0, nrenewed = 0;
    bool updated = false;
    uint64_t id;

    pr_in(s, &m);
    extlock_msg_clear(&m);
    /*
     * Taken before sending: the coordinator starts the change's ack
     * timeout when it reads the pr-out, which can come before this thread
     * runs again after the send
     */
    t_out = now_ms();
    id = pr_out(a, EXTLOCK_PR_REGISTER, 0, 0, 0xa);
    pr_expect_update(a, &m);
    extlock_msg_clear(&m);
    /*
     * S renews whenever it got nothing for 100 ms and never acks; A gets
     * nothing meanwhile
     */
    for (int i = 0; i < 200 && !t_expired; i++) {
        g_autoptr(GError) err = NULL;

        if (!extlock_conn_recv(s, &m, 100, &err)) {
            expect_quiet(a, 10);
            extlock_msg_init(&m, EXTLOCK_MSG_RENEW);
            /* may find the connection closed: the expiry is read next */
            g_clear_error(&err);
            assert_true(nsent < G_N_ELEMENTS(sent));
            sent[nsent++] = now_ms();
            extlock_conn_send(s, &m, &err);
            continue;
        }
        if (m.type == EXTLOCK_MSG_PR_UPDATE) {
            assert_false(updated);
            updated = true;
        } else if (m.type == EXTLOCK_MSG_SESSION_EXPIRED) {
            t_expired = now_ms();
            assert_non_null(strstr(m.message, "reservation"));
        } else {
            assert_int_equal(m.type, EXTLOCK_MSG_RENEWED);
            t_renewed = now_ms();
            assert_true(nrenewed < nsent);
            t_renew_sent = sent[nrenewed++];
        }
        extlock_msg_clear(&m);
    }
    assert_true(updated);
    assert_true(t_expired);
    /* both in whole ms: one may lose almost 1 ms to the truncation */
    assert_true(t_expired - t_out >= ACK_TIMEOUT_MS - 1);
    assert_true(t_expired - t_out <= ACK_TIMEOUT_MS + SLACK_MS);
    /* the result: once the lease S had ends, not before */
    recv_msg(a, &m, S_LEASE_MS + SLACK_MS + RECV_MS);
    t_result = now_ms();
    assert_int_equal(m.type, EXTLOCK_MSG_PR_RESULT);
    assert_int_equal(m.id, id);
    assert_int_equal(m.pr_result, EXTLOCK_PR_OK);
    extlock_msg_clear(&m);
    assert_true(t_renewed > 0);
    /*
     * Not before the lease ends, exactly: the coordinator renewed S's
     * lease when it read the last renew it answered, which was after that
     * renew was sent (the time it was answered can be any time later on
     * a loaded machine, so it was no lower bound: it allowed 50 ms)
     */
    assert_true(t_result >= t_renew_sent + S_LEASE_MS - 1);
    assert_true(t_result <= t_renewed + S_LEASE_MS + SLACK_MS);
    daemon_stop(d);

    /* bad values are refused */
    {
        const char *zero[] = { "--pr-ack-timeout-ms=0", NULL };
        const char *big[] = { "--pr-ack-timeout-ms=3600001", NULL };

        daemon_refused(NULL, zero, 2, "--pr-ack-timeout-ms must be in");
        daemon_refused(NULL, big, 2, "--pr-ack-timeout-ms must be in");
    }
}

/*
 * A session that subscribes while a change is pending, after that
 * change's ack timeout passed, gets the whole timeout from its
 * subscription to acknowledge the state of its pr-in.  Before the fix it
 * was expired at the next deadline check (here T's lease lapsing 400 ms
 * after N subscribed), a healthy host losing its lease for nothing.
 */
static void test_pr_ack_timeout_late_subscriber(void **state)
{
    const char *extra[] = { "--pr-ack-timeout-ms=" G_STRINGIFY(ACK_TIMEOUT_MS),
                            NULL };
    Daemon *d = daemon_start(NULL, extra, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *s = client(d->unix_addr, "S", S_LEASE_MS);
    ExtlockConn *n, *t;
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    int64_t t_sub, t_expired;
    uint64_t id;

    pr_in(s, &m);
    extlock_msg_clear(&m);
    id = pr_out(a, EXTLOCK_PR_REGISTER, 0, 0, 0xa);
    pr_expect_update(a, &m);
    extlock_msg_clear(&m);
    pr_expect_update(s, &m);
    extlock_msg_clear(&m);
    /* S never acknowledges: expired after the timeout, A still waits */
    recv_msg(s, &m, ACK_TIMEOUT_MS + SLACK_MS);
    assert_int_equal(m.type, EXTLOCK_MSG_SESSION_EXPIRED);
    extlock_msg_clear(&m);
    expect_quiet(a, 10);
    /* N subscribes now and takes its time; T's lease lapses meanwhile */
    n = client(d->unix_addr, "N", S_LEASE_MS);
    /*
     * Taken before sending: N's ack timeout starts when the coordinator
     * reads the pr-in, and its answer can reach this thread any time later
     */
    t_sub = now_ms();
    pr_in(n, &m);
    assert_int_equal(m.pr->registrants->len, 1);
    extlock_msg_clear(&m);
    t = client(d->unix_addr, "T", LEASE_MS);
    (void)t;
    recv_msg(n, &m, ACK_TIMEOUT_MS + SLACK_MS);
    t_expired = now_ms();
    assert_int_equal(m.type, EXTLOCK_MSG_SESSION_EXPIRED);
    assert_non_null(strstr(m.message, "reservation"));
    extlock_msg_clear(&m);
    /* both in whole ms: one may lose almost 1 ms to the truncation */
    assert_true(t_expired - t_sub >= ACK_TIMEOUT_MS - 1);
    /* the change completes when the leases of S and N end */
    recv_msg(a, &m, S_LEASE_MS + SLACK_MS + RECV_MS);
    assert_int_equal(m.type, EXTLOCK_MSG_PR_RESULT);
    assert_int_equal(m.id, id);
    assert_int_equal(m.pr_result, EXTLOCK_PR_OK);
    extlock_msg_clear(&m);
    daemon_stop(d);
}

/*
 * A pr-out with a request number is applied once: the client retrying it
 * (its connection dropped before the result; here from a new session of
 * the same client-id) gets the result of the first, while it waits and
 * after.  Before the fix the retried REGISTER got RESERVATION CONFLICT.
 */
static void test_pr_retry_idempotent(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->unix_addr, "B", LONG_LEASE_MS);
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    uint64_t id, seq;

    pr_in(b, &m);
    extlock_msg_clear(&m);
    pr_out_request(a, EXTLOCK_PR_REGISTER, 0, 0, 0xa, 77);
    seq = pr_expect_update(a, &m);
    extlock_msg_clear(&m);
    assert_int_equal(pr_expect_update(b, &m), seq);
    extlock_msg_clear(&m);
    /* A's connection drops before the result; A retries */
    conn_drop(a);
    a = client(d->unix_addr, "A", LONG_LEASE_MS);
    id = pr_out_request(a, EXTLOCK_PR_REGISTER, 0, 0, 0xa, 77);
    expect_quiet(a, QUIET_MS);          /* B has not acknowledged yet */
    expect_quiet(b, QUIET_MS);          /* ... and gets no second change */
    pr_ack(b, seq);
    pr_expect_result(a, id, EXTLOCK_PR_OK, 1);
    /* after the result: the same answer at once, nothing changes */
    id = pr_out_request(a, EXTLOCK_PR_REGISTER, 0, 0, 0xa, 77);
    pr_expect_result(a, id, EXTLOCK_PR_OK, 1);
    expect_quiet(b, QUIET_MS);
    /* a new request number is a new command: A is registered now */
    id = pr_out_request(a, EXTLOCK_PR_REGISTER, 0, 0, 0xa, 78);
    pr_expect_result(a, id, EXTLOCK_PR_CONFLICT, 1);
    /* ... and so is a numbered request of another client-id */
    id = pr_out_request(b, EXTLOCK_PR_REGISTER, 0, 0xb, 0xb, 77);
    pr_expect_result(b, id, EXTLOCK_PR_CONFLICT, 1);
    pr_in(b, &m);
    assert_int_equal(m.pr_seq, seq);
    assert_int_equal(m.pr->registrants->len, 1);
    extlock_msg_clear(&m);
    daemon_stop(d);
}

/*
 * A numbered REGISTER answered, then the coordinator restarts (SIGKILL:
 * no orderly shutdown) before the guest saw the answer; the guest
 * retries the same request.  It must get the first answer again, not
 * have the command applied a second time (REGISTER with a service key 0
 * of an already registered I_T nexus is a RESERVATION CONFLICT).  Before
 * the request numbers were in the state file, the retry got
 * RESERVATION CONFLICT.
 */
static void test_pr_retry_after_restart(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    g_autofree char *state_file = g_strdup(d->state);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    uint64_t id, seq;

    pr_in(a, &m);
    extlock_msg_clear(&m);
    id = pr_out_request(a, EXTLOCK_PR_REGISTER, 0, 0, 0xa, 77);
    seq = pr_expect_update(a, &m);
    extlock_msg_clear(&m);
    pr_ack(a, seq);
    pr_expect_result(a, id, EXTLOCK_PR_OK, 1);
    assert_int_equal(kill(d->pid, SIGKILL), 0);
    assert_true(daemon_wait_exit(d, 5000));

    d = daemon_start(state_file, NULL, NULL);
    a = client(d->unix_addr, "A", LONG_LEASE_MS);
    id = pr_out_request(a, EXTLOCK_PR_REGISTER, 0, 0, 0xa, 77);
    pr_expect_result(a, id, EXTLOCK_PR_OK, 1);
    /* a new number is a new command: A is registered */
    id = pr_out_request(a, EXTLOCK_PR_REGISTER, 0, 0, 0xa, 78);
    pr_expect_result(a, id, EXTLOCK_PR_CONFLICT, 1);
    pr_in(a, &m);
    assert_int_equal(m.pr_seq, seq);
    assert_int_equal(m.pr->registrants->len, 1);
    extlock_msg_clear(&m);
    daemon_stop(d);

    /* A bad request record keeps the daemon from starting */
    {
        g_autofree char *bad = g_strdup(
            "{\"version\":1,\"epoch\":3,\"reservations\":[{\"lock-space\":"
            "\"disk\",\"seq\":1,\"generation\":1,\"registrants\":[],"
            "\"requests\":[{\"client-id\":\"A\",\"request\":77,"
            "\"result\":\"no-such-result\",\"generation\":1,"
            "\"seq\":1}]}]}\n");

        assert_true(g_file_set_contents(state_file, bad, -1, NULL));
        daemon_refused(state_file, NULL, 1, "\"requests\" must be");
    }
}

/*
 * Two numbered pr-outs of A in flight when its connection drops: each
 * retry gets its own first result.  Before the fix only the last request
 * number of a client-id was remembered: the retry of the first REGISTER
 * was applied again and got RESERVATION CONFLICT (A is registered).
 */
static void test_pr_retry_two_in_flight(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->unix_addr, "B", LONG_LEASE_MS);
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    uint64_t id1, id2, seq1, seq2;

    pr_in(b, &m);
    extlock_msg_clear(&m);
    pr_out_request(a, EXTLOCK_PR_REGISTER, 0, 0, 0xa, 77);
    pr_out_request(a, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_WE, 0xa, 0, 78);
    seq1 = pr_expect_update(a, &m);
    extlock_msg_clear(&m);
    seq2 = pr_expect_update(a, &m);
    extlock_msg_clear(&m);
    assert_int_equal(seq2, seq1 + 1);
    assert_int_equal(pr_expect_update(b, &m), seq1);
    extlock_msg_clear(&m);
    assert_int_equal(pr_expect_update(b, &m), seq2);
    extlock_msg_clear(&m);
    /* A's connection drops before the results; A retries both */
    conn_drop(a);
    a = client(d->unix_addr, "A", LONG_LEASE_MS);
    id1 = pr_out_request(a, EXTLOCK_PR_REGISTER, 0, 0, 0xa, 77);
    id2 = pr_out_request(a, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_WE, 0xa, 0,
                         78);
    expect_quiet(a, QUIET_MS);          /* B has not acknowledged yet */
    expect_quiet(b, QUIET_MS);          /* ... and gets no third change */
    pr_ack(b, seq2);
    pr_expect_result(a, id1, EXTLOCK_PR_OK, 1);
    pr_expect_result(a, id2, EXTLOCK_PR_OK, 1);
    /* after the results: the first one again, the same answer */
    id1 = pr_out_request(a, EXTLOCK_PR_REGISTER, 0, 0, 0xa, 77);
    pr_expect_result(a, id1, EXTLOCK_PR_OK, 1);
    expect_quiet(b, QUIET_MS);
    pr_in(b, &m);
    assert_int_equal(m.pr_seq, seq2);
    assert_int_equal(m.pr->registrants->len, 1);
    assert_string_equal(m.pr->holder, "A");
    extlock_msg_clear(&m);
    daemon_stop(d);
}

/*
 * PREEMPT AND ABORT of a session that never acknowledged (here its lease
 * lapses; the ack timeout expires it the same way) completes when its
 * lease ends, but its locks stay until the fence margin after that, as
 * for any expired session: its writes may still be in flight.  Before the
 * fix the abort released them at once, at the lease deadline, and C was
 * granted B's extent at the time A got its result.
 */
static void test_pr_abort_expired_keeps_locks(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    ExtlockConn *b = client(d->unix_addr, "B", S_LEASE_MS);
    ExtlockConn *c = client(d->unix_addr, "C", LONG_LEASE_MS);
    ExtlockConn *ab[2] = { a, b };
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    int64_t t_result, t_grant;
    uint64_t id, seq, lid;

    pr_in(a, &m);
    extlock_msg_clear(&m);
    pr_in(b, &m);
    extlock_msg_clear(&m);
    pr_change(a, &ab[1], 1, EXTLOCK_PR_REGISTER, 0, 0, 0xa, 1);
    pr_change(b, &ab[0], 1, EXTLOCK_PR_REGISTER, 0, 0, 0xb, 2);
    pr_change(b, &ab[0], 1, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_WE_RO, 0xb, 0,
              2);
    /* B writes under an exclusive lock, then goes silent */
    lock_now(b, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    renew(b);

    id = pr_out(a, EXTLOCK_PR_PREEMPT_AND_ABORT, EXTLOCK_PR_TYPE_EA_RO, 0xa,
                0xb);
    seq = pr_expect_update(a, &m);
    extlock_msg_clear(&m);
    assert_int_equal(pr_expect_update(b, &m), seq);
    extlock_msg_clear(&m);
    /* B never acknowledges: the result comes when its lease has ended */
    recv_msg(a, &m, S_LEASE_MS + SLACK_MS + RECV_MS);
    t_result = now_ms();
    assert_int_equal(m.type, EXTLOCK_MSG_PR_RESULT);
    assert_int_equal(m.id, id);
    assert_int_equal(m.pr_result, EXTLOCK_PR_OK);
    extlock_msg_clear(&m);
    /* B's lock is still held: C waits for it until the fence margin ends */
    lid = lock_waits(c, 0, 4096, EXTLOCK_MODE_EXCLUSIVE, &m);
    assert_non_null(find_blocker(&m, "B"));
    extlock_msg_clear(&m);
    expect_granted(c, lid, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    t_grant = now_ms();
    assert_true(t_grant - t_result <= MARGIN_MS + SLACK_MS);
    daemon_stop(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_pr_push_and_ack, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_pr_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pr_waits_for_lease, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_pr_preempt_and_abort, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_pr_restart, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pr_reconnect_needs_ack, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_pr_ack_timeout, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_pr_ack_timeout_late_subscriber,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_pr_retry_idempotent, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_pr_retry_two_in_flight, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_pr_retry_after_restart, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_pr_abort_expired_keeps_locks,
                                        setup, teardown),
    };

    extlockd_bin = g_getenv("EXTLOCKD");
    extlockctl_bin = g_getenv("EXTLOCKCTL");
    if (!extlockd_bin || !extlockctl_bin) {
        fprintf(stderr, "EXTLOCKD and EXTLOCKCTL must name extlockd and "
                "extlockctl\n");
        return 1;
    }
    if (g_getenv("EXTLOCKD_TEST_FILTER")) {
        cmocka_set_test_filter(g_getenv("EXTLOCKD_TEST_FILTER"));
    }
    return cmocka_run_group_tests(tests, NULL, NULL);
}
