/*
 * extlock: after a restart, a listed session may reclaim extents it never
 * held (review finding, NOT in meson: it fails on trial, and a fix needs
 * the coordinator to know the locks of the previous run - see the report
 * of the h-review branch)
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
 * Run: add 'test-extlockd-review-reclaim' to tests/integration/meson.build,
 * then meson test -C build test-extlockd-review-reclaim
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
    m.lease_ms = LONG_LEASE_MS;
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

static void test_reclaim_foreign_extent(void **state)
{
    g_autofree char *path = g_build_filename(fx.dir, "state", NULL);
    g_autofree char *sa = NULL, *sb = NULL;
    ExtlockConn *a, *b;
    ExtlockErrorCode code;
    Daemon *d;
    Grant gb;
    ExtlockMsg w;

    /* A (uid on the UNIX socket) and B (anonymous TCP) share "disk" */
    d = daemon_start(path, NULL, NULL);
    a = conn_open(d->unix_addr);
    sa = hello_full(a, "A", "disk", LONG_LEASE_MS, NULL);
    b = conn_open(d->tcp_addr);
    sb = hello_full(b, "B", "disk", LONG_LEASE_MS, NULL);
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
    /* B, which did hold it and may be writing under it, must get it */
    b = conn_open(d->tcp_addr);
    hello_back(b, "B", sb, &w);
    extlock_msg_clear(&w);
    if (!reclaim(b, 0, 4096, EXTLOCK_MODE_EXCLUSIVE, gb.token, &code)) {
        fail_msg("B's reclaim of its own exclusive lock was refused (%s): "
                 "another identity holds its extent now",
                 extlock_error_code_name(code));
    }
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
