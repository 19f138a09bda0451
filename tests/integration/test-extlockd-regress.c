/*
 * extlock: extlockd regression tests for bugs found by the fuzz harnesses
 * (tests/fuzz), against the real daemon
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(
            test_broken_line_does_not_change_next_client, setup, teardown),
    };

    extlockd_bin = g_getenv("EXTLOCKD");
    if (!extlockd_bin) {
        fprintf(stderr, "EXTLOCKD must name the extlockd binary\n");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
