/*
 * extlock: extlockd regression tests for bugs found by the fuzz harnesses
 * (tests/fuzz) and by the benchmarks, against the real daemon
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <setjmp.h>
#include <cmocka.h>
#include <glib.h>
#include "extlockd-harness.h"

/*
 * fuzz-protocol, corpus regress-tokener-surrogate: one client's line that
 * ends inside a \u surrogate pair changed how the daemon decoded the next
 * line, another client's: its hello with "lock-space":"\u0064isk" joined
 * lock-space "\ufffddisk", so its exclusive lock did not exclude the
 * clients of "disk".
 */
static void test_broken_line_does_not_change_next_client(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *x = conn_open(d->unix_addr);
    ExtlockConn *y = conn_open(d->unix_addr);
    ExtlockConn *b;
    ExtlockMsg m;
    uint64_t id;

    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    send_raw(x, "{\"type\":\"status\",\"id\":1,\"x\":\"\\ud800\n");
    expect_error(x, false, 0, EXTLOCK_ERR_PARSE);

    send_raw(y, "{\"type\":\"hello\",\"id\":1,\"version\":2,"
                "\"client-id\":\"Y\",\"lock-space\":\"\\u0064isk\","
                "\"lease-ms\":30000}\n");
    expect_msg(y, &m, EXTLOCK_MSG_WELCOME, 1);
    extlock_msg_clear(&m);
    lock_now(y, 0, 100, EXTLOCK_MODE_EXCLUSIVE);

    /* Same lock-space "disk": the extent is taken */
    b = client(d->unix_addr, "B", LONG_LEASE_MS);
    id = send_lock(b, 0, 10, EXTLOCK_MODE_EXCLUSIVE, false);
    expect_error(b, true, id, EXTLOCK_ERR_WOULD_BLOCK);
    daemon_stop(d);
}

/*
 * Host A (a caching client: its lock has a limit, so it gets revokes)
 * holds a lock, says "bye" and closes its socket; host B asks for the
 * lock.  The daemon (stopped meanwhile, so that both are in its sockets
 * when it runs again) handles B's request first (B connected first, so
 * its connection's source comes first in the main loop), sends A a revoke
 * and finds A's socket closed.  It must still read A's "bye" and release
 * A's lock at once.  Before the fix it dropped the connection with the
 * unread "bye", and B waited for A's lease (LONG_LEASE_MS) to run out:
 * the 10 s stalls of bench-qemu.py's many-hosts runs, where hosts exit
 * while their neighbours take their locks away piece by piece.
 */
static void test_bye_while_revoked_releases_at_once(void **state)
{
    Daemon *d = daemon_start(NULL, NULL, NULL);
    ExtlockConn *b = client(d->unix_addr, "B", LONG_LEASE_MS);
    ExtlockConn *a = client(d->unix_addr, "A", LONG_LEASE_MS);
    uint64_t id;
    bool granted = false;

    (void)state;
    id = send_lock_limit(a, 0, 4096, EXTLOCK_MODE_EXCLUSIVE, 0, 65536);
    expect_granted(a, id, 0, 65536, EXTLOCK_MODE_EXCLUSIVE);

    daemon_pause(d);
    send_simple(a, EXTLOCK_MSG_BYE);
    conn_drop(a);
    id = send_lock(b, 0, 4096, EXTLOCK_MODE_EXCLUSIVE, true);
    assert_int_equal(kill(d->pid, SIGCONT), 0);

    /*
     * "waiting" (if B's request came first) and then "granted", long
     * before A's lease could run out (RECV_MS << LONG_LEASE_MS)
     */
    for (int i = 0; i < 2 && !granted; i++) {
        ExtlockMsg m;

        extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
        recv_msg(b, &m, RECV_MS);
        assert_true(m.has_id && m.id == id);
        assert_true(m.type == EXTLOCK_MSG_WAITING ||
                    m.type == EXTLOCK_MSG_GRANTED);
        granted = m.type == EXTLOCK_MSG_GRANTED;
        extlock_msg_clear(&m);
    }
    assert_true(granted);
    daemon_stop(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(
            test_broken_line_does_not_change_next_client, setup, teardown),
        cmocka_unit_test_setup_teardown(
            test_bye_while_revoked_releases_at_once, setup, teardown),
    };

    extlockd_bin = g_getenv("EXTLOCKD");
    if (!extlockd_bin) {
        fprintf(stderr, "EXTLOCKD must name the extlockd binary\n");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
