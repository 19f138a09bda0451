/*
 * extlockd: what a client sent before it hung up is processed, even when
 * the coordinator had paused reading its input at that moment.
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The coordinator pauses reading a connection while a new session waits
 * for the state file (hello: the welcome goes out once the session is on
 * disk).  EXTLOCKD_TEST_STATE_DELAY_MS makes that wait long enough for a
 * client to send more and hang up inside it, deterministically.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <setjmp.h>
#include <cmocka.h>
#include <glib.h>
#include <json-c/json.h>

#include "extlockd-harness.h"

#define DELAY_MS 1000

/* The sessions of @client_id in @mon's status */
static int sessions_of(ExtlockConn *mon, const char *client_id)
{
    json_object *st = status_get(mon);
    json_object *sessions = jget(st, "sessions");
    int n = 0;

    for (size_t i = 0; i < json_object_array_length(sessions); i++) {
        json_object *s = json_object_array_get_idx(sessions, i);

        if (strcmp(jstr(s, "client-id"), client_id) == 0) {
            n++;
        }
    }
    json_object_put(st);
    return n;
}

/*
 * A client sends hello, a lock request and bye in one go and closes its
 * socket while the coordinator waits for the state write of the hello
 * (input paused).  The lock and the bye must still be processed once the
 * session is written: the session ends at once and the extent is free.
 * Before the fix the hangup destroyed the connection with the two
 * requests unread: the session and its (never granted) request stayed
 * until its lease (LONG_LEASE_MS) ran out.
 */
static void test_hangup_while_paused_keeps_input(void **state)
{
    g_autofree char *delay =
        g_strdup_printf("EXTLOCKD_TEST_STATE_DELAY_MS=%d", DELAY_MS);
    const char *env[] = { delay, NULL };
    Daemon *d = daemon_start(NULL, NULL, env);
    ExtlockConn *mon = conn_open(d->unix_addr);
    ExtlockConn *h = conn_open(d->unix_addr);
    g_autofree char *text = g_strdup_printf(
        "{\"type\":\"hello\",\"id\":1,\"version\":%d,\"client-id\":\"hup\","
        "\"lock-space\":\"disk\",\"lease-ms\":%d}\n"
        "{\"type\":\"lock\",\"id\":2,\"offset\":0,\"length\":4096,"
        "\"mode\":\"exclusive\"}\n"
        "{\"type\":\"bye\",\"id\":3}\n",
        EXTLOCK_PROTOCOL_VERSION, LONG_LEASE_MS);
    ExtlockConn *w;
    int64_t deadline;

    send_raw(h, text);
    /* The session exists (paused, its welcome waits for the state file) */
    deadline = now_ms() + RECV_MS;
    while (sessions_of(mon, "hup") == 0) {
        if (now_ms() > deadline) {
            fail_msg("the session of the hello never appeared");
        }
        g_usleep(5000);
    }
    conn_drop(h);
    /*
     * Once the write is done (DELAY_MS per write, two writes at most: the
     * hello's and the bye's), the bye ends the session; its lease is
     * LONG_LEASE_MS, so only the bye can end it this soon
     */
    deadline = now_ms() + 2 * DELAY_MS + SLACK_MS + RECV_MS;
    while (sessions_of(mon, "hup") != 0) {
        if (now_ms() > deadline) {
            dump_log(d);
            fail_msg("the session that said bye before hanging up is still "
                     "there: its input was dropped");
        }
        g_usleep(5000);
    }
    /* Its lock went with it: another client gets the extent at once */
    w = client(d->unix_addr, "w", LONG_LEASE_MS);
    lock_now(w, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    bye(w);
    daemon_stop(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_hangup_while_paused_keeps_input,
                                        setup, teardown),
    };

    extlockd_bin = g_getenv("EXTLOCKD");
    extlockctl_bin = g_getenv("EXTLOCKCTL");
    if (!extlockd_bin || !extlockctl_bin) {
        fprintf(stderr, "set EXTLOCKD and EXTLOCKCTL\n");
        return 1;
    }
    return cmocka_run_group_tests(tests, NULL, NULL);
}
