/*
 * extlock: after a restart, a listed session may reclaim extents it never
 * held (review finding): a conflicting reclaim makes the extent disputed
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The daemon does not persist locks; during the grace period it believes
 * every reclaim of a listed session that does not conflict with an earlier
 * reclaim, with any token of an older epoch.  A client of another identity
 * that merely had a session in the same lock-space before the crash
 * reclaims, first, the extent another client holds exclusively: that
 * client's own reclaim is then refused (bad-state) although it held the
 * lock before the crash and may still be writing under it (its lease from
 * the previous run is running), while the first one now holds it too.
 *
 * The coordinator cannot tell which claim is true (locks are not
 * persisted), so the rule is now (docs/design.rst): a reclaim that
 * conflicts with another session's reclaim gets "reclaim-conflict", the
 * earlier reclaim is dropped and its session told so, the extent cannot be
 * reclaimed any more, and nothing in the lock-space is granted before both
 * claimants have had their lease and fence margin to stop writing.
 */
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <unistd.h>
#include <cmocka.h>
#include <glib.h>
#include <json-c/json.h>

#include "extlockd-harness.h"

#define CLAIM_LEASE_MS  2000    /* the claimants' lease, before and after */

/* hello with "session" and its secret; the reply (welcome) in @w */
static void hello_back(ExtlockConn *c, const char *client_id,
                       const char *session, ExtlockMsg *w)
{
    ExtlockMsg m;

    extlock_msg_init(&m, EXTLOCK_MSG_HELLO);
    m.client_id = (char *)client_id;
    m.lock_space = (char *)"disk";
    m.session = (char *)session;
    m.resume_secret = secret_of(session);
    m.lease_ms = CLAIM_LEASE_MS;
    send_msg(c, &m);
    extlock_msg_init(w, EXTLOCK_MSG_INVALID);
    expect_msg(c, w, EXTLOCK_MSG_WELCOME, m.id);
    assert_true(w->reclaim);
}

/* The reply to a reclaim: granted, or an error (its code in @code) */
static bool reclaim(ExtlockConn *c, uint64_t offset, uint64_t length,
                    ExtlockMode mode, uint64_t token, ExtlockErrorCode *code)
{
    ExtlockMsg m, r;
    bool ok;

    extlock_msg_init(&m, EXTLOCK_MSG_RECLAIM);
    m.offset = offset;
    m.length = length;
    m.mode = mode;
    m.token = token;
    send_msg(c, &m);
    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    recv_msg(c, &r, RECV_MS);
    ok = r.type == EXTLOCK_MSG_GRANTED;
    *code = r.type == EXTLOCK_MSG_ERROR ? r.error : EXTLOCK_ERR_NONE;
    extlock_msg_clear(&r);
    return ok;
}

static void reclaim_done(ExtlockConn *c)
{
    uint64_t id = send_simple(c, EXTLOCK_MSG_RECLAIM_DONE);
    ExtlockMsg r;

    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    expect_msg(c, &r, EXTLOCK_MSG_RECLAIM_COMPLETE, id);
    extlock_msg_clear(&r);
}

static void test_reclaim_foreign_extent(void **state)
{
    g_autofree char *path = g_build_filename(fx.dir, "state", NULL);
    g_autofree char *sa = NULL, *sb = NULL;
    ExtlockConn *a, *b, *c, *mon;
    json_object *st;
    ExtlockErrorCode code;
    int64_t t0, waited;
    bool granted = false;
    uint64_t id;
    Daemon *d;
    Grant gb;
    ExtlockMsg w;

    /* A (uid on the UNIX socket) and B (anonymous TCP) share "disk" */
    d = daemon_start(path, NULL, NULL);
    a = conn_open(d->unix_addr);
    sa = hello_full(a, "A", "disk", CLAIM_LEASE_MS, NULL);
    b = conn_open(d->tcp_addr);
    sb = hello_full(b, "B", "disk", CLAIM_LEASE_MS, NULL);
    gb = lock_now(b, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    assert_int_equal(kill(d->pid, SIGKILL), 0);
    assert_true(daemon_wait_exit(d, 5000));

    d = daemon_start(path, NULL, NULL);
    /* A comes back first and "reclaims" B's extent with a made-up token */
    a = conn_open(d->unix_addr);
    hello_back(a, "A", sa, &w);
    extlock_msg_clear(&w);
    if (reclaim(a, 0, 4096, EXTLOCK_MODE_EXCLUSIVE, gb.token + 100, &code)) {
        g_test_message("A reclaimed [0, 4096) exclusive, which it never "
                       "held");
    }
    /*
     * B, which did hold it and may be writing under it: its reclaim
     * conflicts, nobody keeps the extent, A is told its reclaim is dropped
     */
    b = conn_open(d->tcp_addr);
    hello_back(b, "B", sb, &w);
    extlock_msg_clear(&w);
    t0 = now_ms();
    assert_false(reclaim(b, 0, 4096, EXTLOCK_MODE_EXCLUSIVE, gb.token,
                         &code));
    assert_int_equal(code, EXTLOCK_ERR_RECLAIM_CONFLICT);
    expect_error(a, false, 0, EXTLOCK_ERR_RECLAIM_CONFLICT);
    /* Neither may reclaim any part of the disputed extent again */
    assert_false(reclaim(a, 1024, 512, EXTLOCK_MODE_SHARED, gb.token + 100,
                         &code));
    assert_int_equal(code, EXTLOCK_ERR_RECLAIM_CONFLICT);
    assert_false(reclaim(b, 0, 4096, EXTLOCK_MODE_EXCLUSIVE, gb.token,
                         &code));
    assert_int_equal(code, EXTLOCK_ERR_RECLAIM_CONFLICT);
    /* Every listed session is done: the grace period would end now */
    reclaim_done(a);
    reclaim_done(b);
    /* ... but the dispute keeps it going, and status says so */
    mon = conn_open(d->unix_addr);
    st = status_get(mon);
    assert_true(jint(first_space(st), "grace-remaining-ms") >
                CLAIM_LEASE_MS / 2);
    json_object_put(st);
    /*
     * A new client's request for the extent is granted only once both
     * claimants' lease (CLAIM_LEASE_MS) and fence margin are over
     */
    c = client(d->tcp_addr, "C", LONG_LEASE_MS);
    id = send_lock(c, 0, 4096, EXTLOCK_MODE_EXCLUSIVE, true);
    for (int n = 0; n < 8; n++) {          /* a "waiting" comes first */
        ExtlockMsg r;

        extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
        recv_msg(c, &r, RECV_MS);
        assert_true(r.has_id && r.id == id);
        granted = r.type == EXTLOCK_MSG_GRANTED;
        assert_true(granted || r.type == EXTLOCK_MSG_WAITING);
        extlock_msg_clear(&r);
        if (granted) {
            break;
        }
    }
    assert_true(granted);
    waited = now_ms() - t0;
    g_test_message("granted to C %" PRId64 " ms after the conflict",
                   waited);
    assert_true(waited >= CLAIM_LEASE_MS + MARGIN_MS);
    assert_true(waited < CLAIM_LEASE_MS + MARGIN_MS + SLACK_MS + RECV_MS);
    daemon_stop(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_reclaim_foreign_extent, setup,
                                        teardown),
    };

    extlockd_bin = g_getenv("EXTLOCKD");
    extlockctl_bin = g_getenv("EXTLOCKCTL");
    if (!extlockd_bin || !extlockctl_bin) {
        fprintf(stderr, "set EXTLOCKD and EXTLOCKCTL\n");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
