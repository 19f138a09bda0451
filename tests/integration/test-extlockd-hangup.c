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
 *
 * The same rule holds when the coordinator learns of the hangup because a
 * write to the client fails, on plain TCP and with TLS (the tests of a
 * revoked client that is gone, at the end).
 *
 * The rule (docs/extlockd.rst, "Clients that hang up"): at the hangup the
 * pause ends, what is left in the socket is read once, the requests that
 * release something (bye, unlock, ...) are applied and the others
 * dropped, and the session is detached: its lease runs as after any
 * disconnect, however long the pause would have lasted.
 */
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <setjmp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/sockios.h>
#include <cmocka.h>
#include <glib.h>
#include <json-c/json.h>

#include "extlockd-harness.h"

#define DELAY_MS 1000
/*
 * A state write that outlasts the lease, the fence margin and the slack
 * of a session: its pause does not end before the session must be gone,
 * even if the client takes up to 2.5 s (a loaded machine, the sanitizers)
 * from its hello to its hangup
 */
#define PAUSE_MS (LEASE_MS + MARGIN_MS + SLACK_MS + 2500)

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

/* The status counter of requests dropped because their client was gone */
static int64_t dropped_after_hangup(ExtlockConn *mon)
{
    json_object *st = status_get(mon);
    int64_t n = jint(jget(st, "counters"), "dropped-after-hangup");

    json_object_put(st);
    return n;
}

/* The status entry of the session of @client_id in @st, or NULL */
static json_object *session_of(json_object *st, const char *client_id)
{
    json_object *sessions = jget(st, "sessions");

    for (size_t i = 0; i < json_object_array_length(sessions); i++) {
        json_object *s = json_object_array_get_idx(sessions, i);

        if (strcmp(jstr(s, "client-id"), client_id) == 0) {
            return s;
        }
    }
    return NULL;
}

/*
 * Send @text on a new connection (TCP if @tcp, else UNIX), wait until its
 * session is listed
 */
static ExtlockConn *send_until_session_on(Daemon *d, ExtlockConn *mon,
                                          const char *client_id,
                                          const char *text, bool tcp)
{
    ExtlockConn *h = conn_open(tcp ? d->tcp_addr : d->unix_addr);
    int64_t deadline;

    send_raw(h, text);
    /* The session exists (paused, its welcome waits for the state file) */
    deadline = now_ms() + RECV_MS;
    while (sessions_of(mon, client_id) == 0) {
        if (now_ms() > deadline) {
            dump_log(d);
            fail_msg("the session of the hello never appeared");
        }
        g_usleep(5000);
    }
    return h;
}

static ExtlockConn *send_until_session(Daemon *d, ExtlockConn *mon,
                                       const char *client_id,
                                       const char *text)
{
    return send_until_session_on(d, mon, client_id, text, false);
}

/*
 * A client sends hello, a lock request and bye in one go and closes its
 * socket while the coordinator waits for the state write of the hello
 * (input paused).  The bye must still be applied: the session ends at
 * once and the extent is free.  Before the fix the hangup destroyed the
 * connection with the two requests unread: the session stayed until its
 * lease (LONG_LEASE_MS) ran out.
 */
static void test_hangup_while_paused_keeps_input(void **state)
{
    g_autofree char *delay =
        g_strdup_printf("EXTLOCKD_TEST_STATE_DELAY_MS=%d", DELAY_MS);
    const char *env[] = { delay, NULL };
    Daemon *d = daemon_start(NULL, NULL, env);
    ExtlockConn *mon = conn_open(d->unix_addr);
    ExtlockConn *h;
    g_autofree char *text = g_strdup_printf(
        "{\"type\":\"hello\",\"id\":1,\"version\":%d,\"client-id\":\"hup\","
        "\"lock-space\":\"disk\",\"lease-ms\":%d}\n"
        "{\"type\":\"lock\",\"id\":2,\"offset\":0,\"length\":4096,"
        "\"mode\":\"exclusive\"}\n"
        "{\"type\":\"bye\",\"id\":3}\n",
        EXTLOCK_PROTOCOL_VERSION, LONG_LEASE_MS);
    ExtlockConn *w;
    int64_t deadline;

    h = send_until_session(d, mon, "hup", text);
    conn_drop(h);
    /*
     * The bye ends the session at the hangup (at the latest when the
     * hello's write is done, as the first fix had it: DELAY_MS per write,
     * two writes at most); its lease is LONG_LEASE_MS, so only the bye
     * can end it this soon
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
    /* The lock request was dropped (its client was gone), the bye not */
    assert_int_equal(dropped_after_hangup(mon), 1);
    /* Its lock went with it: another client gets the extent at once */
    w = client(d->unix_addr, "w", LONG_LEASE_MS);
    lock_now(w, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    bye(w);
    daemon_stop(d);
}

/*
 * The same hangup without bye: hello and an exclusive lock request.  The
 * lock request is dropped (its client is gone: a grant would be held for
 * nobody until its lease ran out), the session is detached at the hangup
 * holding nothing, and another client gets the extent at once.  Control:
 * with the reverted first fix (171fbb2), which applied every line once
 * the hello's write was done, the lock was granted to the gone client and
 * the other client waited for its lease.
 */
static void hangup_drops_lock_request(bool tcp)
{
    g_autofree char *delay =
        g_strdup_printf("EXTLOCKD_TEST_STATE_DELAY_MS=%d", DELAY_MS);
    const char *env[] = { delay, NULL };
    Daemon *d = daemon_start(NULL, NULL, env);
    ExtlockConn *mon = conn_open(d->unix_addr);
    g_autofree char *text = g_strdup_printf(
        "{\"type\":\"hello\",\"id\":1,\"version\":%d,\"client-id\":\"hup\","
        "\"lock-space\":\"disk\",\"lease-ms\":%d}\n"
        "{\"type\":\"lock\",\"id\":2,\"offset\":0,\"length\":4096,"
        "\"mode\":\"exclusive\"}\n",
        EXTLOCK_PROTOCOL_VERSION, LONG_LEASE_MS);
    ExtlockConn *w;
    json_object *st, *s;

    conn_drop(send_until_session_on(d, mon, "hup", text, tcp));
    /* Its welcome is after the hung-up hello's write: that one is done */
    w = client(d->unix_addr, "w", LONG_LEASE_MS);
    lock_now(w, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    /* The gone client's session is detached, holds nothing, waits */
    st = status_get(mon);
    s = session_of(st, "hup");
    if (!s) {
        fail_msg("the session of the gone client ended early");
    }
    assert_string_equal(jstr(s, "state"), "disconnected");
    assert_int_equal(jint(s, "locks-held"), 0);
    json_object_put(st);
    assert_int_equal(dropped_after_hangup(mon), 1);
    bye(w);
    daemon_stop(d);
}

static void test_hangup_drops_lock_request(void **state)
{
    hangup_drops_lock_request(false);
}

/*
 * The same over TCP.  poll() reports no POLLHUP when a TCP peer closes (only
 * POLLRDHUP, and POLLIN, which a paused connection does not ask for), so
 * the hangup went unnoticed until the hello's write was done; then the lock
 * was granted to the gone client and the other client waited for its
 * lease ("expected granted for request 2, got waiting", h-hup7 2d6426a).
 */
static void test_hangup_tcp_drops_lock_request(void **state)
{
    hangup_drops_lock_request(true);
}

/*
 * The pause outlasts the lease: the state write of the hello takes
 * PAUSE_MS, longer than lease + fence margin + slack.  A client sends
 * hello (lease LEASE_MS) and a lock request and hangs up inside that
 * write.  Its session must be gone within LEASE_MS + MARGIN_MS of the
 * hangup (SLACK_MS allowed for the timer), before the write is done: a
 * hung-up connection must not keep its session longer than a plain
 * disconnect would.  Control: with the reverted first fix (171fbb2) the
 * connection stayed, paused, until the write was done, and its session
 * with it (the lease of a session whose welcome waits starts again at
 * the welcome): the fuzz seed epoch-wrap left it for ever.
 */
static void hangup_pause_outlasts_lease(bool tcp)
{
    g_autofree char *delay =
        g_strdup_printf("EXTLOCKD_TEST_STATE_DELAY_MS=%d", PAUSE_MS);
    const char *env[] = { delay, NULL };
    Daemon *d = daemon_start(NULL, NULL, env);
    ExtlockConn *mon = conn_open(d->unix_addr);
    g_autofree char *text = g_strdup_printf(
        "{\"type\":\"hello\",\"id\":1,\"version\":%d,\"client-id\":\"late\","
        "\"lock-space\":\"disk\",\"lease-ms\":%d}\n"
        "{\"type\":\"lock\",\"id\":2,\"offset\":0,\"length\":4096,"
        "\"mode\":\"exclusive\"}\n",
        EXTLOCK_PROTOCOL_VERSION, LEASE_MS);
    int64_t sent = now_ms(), hangup, deadline;

    conn_drop(send_until_session_on(d, mon, "late", text, tcp));
    hangup = now_ms();
    deadline = hangup + LEASE_MS + MARGIN_MS + SLACK_MS;
    assert_true(deadline < sent + PAUSE_MS);
    while (sessions_of(mon, "late") != 0) {
        if (now_ms() > deadline) {
            dump_log(d);
            fail_msg("the session of a client that hung up %" PRId64 " ms "
                     "ago is still there (lease %d ms, fence margin %d "
                     "ms): its paused connection kept it",
                     now_ms() - hangup, LEASE_MS, MARGIN_MS);
        }
        g_usleep(5000);
    }
    /* Its last state write takes PAUSE_MS too: more than daemon_stop()'s */
    daemon_stop_within(d, SIGTERM, PAUSE_MS + 5000);
}

static void test_hangup_pause_outlasts_lease(void **state)
{
    hangup_pause_outlasts_lease(false);
}

/*
 * The same over TCP: the session stayed for the whole write and then got a
 * new lease with its welcome ("... hung up 1506 ms ago is still there",
 * h-hup7 2d6426a)
 */
static void test_hangup_tcp_pause_outlasts_lease(void **state)
{
    hangup_pause_outlasts_lease(true);
}

/*
 * After a restart, a listed session comes back: its reclaim hello waits for
 * the state file (input paused), and behind it the client has sent, in the
 * same write, the reclaim of the extent it held exclusively and
 * reclaim-done, and hangs up.  The reclaim is dropped (a grant to nobody),
 * so the reclaim-done behind it must be dropped too: applied, it would tell
 * the coordinator that the session holds nothing, end the grace period at
 * once and let another client have the extent, while the gone client,
 * which had it before the restart and meant to keep it, may still be
 * writing under it within its lease (only a bye promises that it stopped).
 * The other client must wait (grace period, LONG_LEASE_MS at least).
 * Control: with reclaim-done always applied after a hangup (h-hup7,
 * 2d6426a) the extent was granted at once.
 */
static void test_hangup_reclaim_done_after_dropped_reclaim(void **state)
{
    g_autofree char *path = g_build_filename(fx.dir, "state", NULL);
    g_autofree char *delay =
        g_strdup_printf("EXTLOCKD_TEST_STATE_DELAY_MS=%d", DELAY_MS);
    const char *env[] = { delay, NULL };
    g_autofree char *sa = NULL, *secret = NULL, *text = NULL;
    ExtlockConn *a, *h, *mon, *w;
    ExtlockMsg r;
    uint64_t id;
    Daemon *d;
    Grant ga;

    d = daemon_start(path, NULL, NULL);
    a = conn_open(d->unix_addr);
    sa = hello_full(a, "A", "disk", LONG_LEASE_MS, NULL);
    ga = lock_now(a, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    assert_int_equal(kill(d->pid, SIGKILL), 0);
    assert_true(daemon_wait_exit(d, 5000));

    d = daemon_start(path, NULL, env);
    mon = conn_open(d->unix_addr);
    secret = secret_of(sa);
    assert_non_null(secret);
    text = g_strdup_printf(
        "{\"type\":\"hello\",\"id\":1,\"version\":%d,\"client-id\":\"A\","
        "\"lock-space\":\"disk\",\"lease-ms\":%d,\"session\":\"%s\","
        "\"resume-secret\":\"%s\"}\n"
        "{\"type\":\"reclaim\",\"id\":2,\"offset\":0,\"length\":4096,"
        "\"mode\":\"exclusive\",\"token\":%" PRIu64 "}\n"
        "{\"type\":\"reclaim-done\",\"id\":3}\n",
        EXTLOCK_PROTOCOL_VERSION, LONG_LEASE_MS, sa, secret, ga.token);
    h = conn_open(d->unix_addr);
    send_raw(h, text);
    /* Attached: its reclaim hello waits for the state file */
    json_object_put(wait_session_state(mon, sa, "active"));
    conn_drop(h);
    json_object_put(wait_session_state(mon, sa, "disconnected"));

    /* The grace period goes on: the extent is not granted to another */
    w = client(d->unix_addr, "w", LONG_LEASE_MS);
    id = send_lock(w, 0, 4096, EXTLOCK_MODE_EXCLUSIVE, true);
    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    recv_msg(w, &r, RECV_MS);
    assert_true(r.has_id && r.id == id);
    if (r.type == EXTLOCK_MSG_GRANTED) {
        dump_log(d);
        fail_msg("the extent A reclaimed before it hung up was granted to "
                 "another client at once: its reclaim-done ended the grace "
                 "period although its reclaim had been dropped");
    }
    assert_int_equal(r.type, EXTLOCK_MSG_WAITING);
    extlock_msg_clear(&r);
    daemon_stop(d);
}

/*
 * The bye is still in the socket at the hangup: hello and a lock request
 * in one write, then, once the session is listed (its hello waits for the
 * state file, so input is paused and nothing more is read), bye in a
 * second write, and the hangup; over TCP, whose hangup is only a
 * POLLRDHUP.  The bye must be read at the hangup and end the session at
 * once (lease LONG_LEASE_MS).  Control: without the read in
 * conn_hangup_paused() the bye was lost ("... still there").
 */
static void test_hangup_tcp_bye_in_socket(void **state)
{
    g_autofree char *delay =
        g_strdup_printf("EXTLOCKD_TEST_STATE_DELAY_MS=%d", DELAY_MS);
    const char *env[] = { delay, NULL };
    Daemon *d = daemon_start(NULL, NULL, env);
    ExtlockConn *mon = conn_open(d->unix_addr);
    ExtlockConn *h, *w;
    g_autofree char *text = g_strdup_printf(
        "{\"type\":\"hello\",\"id\":1,\"version\":%d,\"client-id\":\"hup\","
        "\"lock-space\":\"disk\",\"lease-ms\":%d}\n"
        "{\"type\":\"lock\",\"id\":2,\"offset\":0,\"length\":4096,"
        "\"mode\":\"exclusive\"}\n",
        EXTLOCK_PROTOCOL_VERSION, LONG_LEASE_MS);
    int64_t deadline;

    h = send_until_session_on(d, mon, "hup", text, true);
    send_raw(h, "{\"type\":\"bye\",\"id\":3}\n");
    conn_drop(h);
    /* Within the hello's write at the latest, long before the lease */
    deadline = now_ms() + DELAY_MS + SLACK_MS + RECV_MS;
    while (sessions_of(mon, "hup") != 0) {
        if (now_ms() > deadline) {
            dump_log(d);
            fail_msg("the session that said bye before hanging up is still "
                     "there: the bye in the socket was not read");
        }
        g_usleep(5000);
    }
    assert_int_equal(dropped_after_hangup(mon), 1);
    w = client(d->unix_addr, "w", LONG_LEASE_MS);
    lock_now(w, 0, 4096, EXTLOCK_MODE_EXCLUSIVE);
    bye(w);
    daemon_stop(d);
}

/* A PSK credential directory (keys.psk) for a TLS daemon and its clients */
#define PSK_USER "alice"

static char *psk_dir(void)
{
    char *dir = g_build_filename(fx.dir, "psk", NULL);
    g_autofree char *keys = g_build_filename(dir, "keys.psk", NULL);

    assert_int_equal(g_mkdir_with_parents(dir, 0700), 0);
    assert_true(g_file_set_contents(keys, PSK_USER ":"
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
        -1, NULL));
    return dir;
}

/*
 * Close the TCP connection @c with a reset, as a client that exits with
 * replies unread does: the daemon's next write to it fails at once (after
 * a plain close the first write would succeed and only draw the reset).
 * What @c sent is acknowledged first: a reset drops what is unsent.
 */
static void conn_abort(ExtlockConn *c)
{
    int fd = extlock_conn_fd(c);
    struct linger lg = { .l_onoff = 1, .l_linger = 0 };
    int64_t deadline = now_ms() + RECV_MS;
    int unacked;

    for (;;) {
        assert_int_equal(ioctl(fd, SIOCOUTQ, &unacked), 0);
        if (unacked == 0) {
            break;
        }
        if (now_ms() > deadline) {
            fail_msg("%d bytes sent to the daemon never acknowledged",
                     unacked);
        }
        g_usleep(1000);
    }
    assert_int_equal(setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)),
                     0);
    conn_drop(c);
}

/* Wait (bounded) until the log of @d contains @needle */
static void wait_log_line(Daemon *d, const char *needle)
{
    int64_t deadline = now_ms() + RECV_MS;

    for (;;) {
        g_autofree char *text = NULL;

        if (g_file_get_contents(d->log, &text, NULL, NULL) &&
            strstr(text, needle)) {
            return;
        }
        if (now_ms() > deadline) {
            dump_log(d);
            fail_msg("no log line \"%s\"", needle);
        }
        g_usleep(5000);
    }
}

/*
 * Host A (a caching client: its lock has a limit, so it gets revokes)
 * holds a lock over TCP, with TLS if @tls.  While the daemon is stopped
 * (so that everything below is in its sockets when it runs again), A
 * sends "unlock" of that lock (and "bye" if @say_bye) and aborts its
 * connection without reading (a reset); then host B, connected earlier
 * (its source comes first in the main loop), asks for the extent.  The
 * daemon handles B first, sends A a revoke, and the write fails because A
 * is gone.  What A sent before must still be read and applied: B is
 * granted at once, long before A's lease (LONG_LEASE_MS) could run out,
 * and A's session holds nothing (is gone after a bye).  Control: with TLS
 * the daemon destroyed the connection at the failed write, A's unlock and
 * bye unread, and B waited for A's lease ("B not granted 3016 ms after A
 * unlocked and hung up"); also when only the TLS exclusion was removed,
 * since GnuTLS 3.7 reports the reset as GNUTLS_E_PREMATURE_TERMINATION,
 * not as a push error ("write failed: The TLS connection was
 * non-properly terminated").
 */
static void revoked_client_gone(bool tls, bool say_bye)
{
    g_autofree char *dir = tls ? psk_dir() : NULL;
    const char *extra[] = { "--tls-creds-dir", dir, NULL };
    Daemon *d = daemon_start(NULL, tls ? extra : NULL, NULL);
    ExtlockConn *mon = conn_open(d->unix_addr);
    ExtlockConn *b = client(d->unix_addr, "B", LONG_LEASE_MS);
    g_autofree char *sa = NULL, *line = NULL;
    ExtlockConn *a;
    ExtlockMsg m;
    Grant ga;
    uint64_t id;
    int64_t start, deadline;
    bool granted = false;

    if (tls) {
        ExtlockTlsOptions o = {
            .creds_dir = dir,
            .psk_username = PSK_USER,
        };
        GError *err = NULL;

        a = extlock_conn_connect_tls(d->tcp_addr, &o, &err);
        if (!a) {
            fail_msg("TLS connect %s: %s", d->tcp_addr, err->message);
        }
        g_ptr_array_add(fx.conns, a);
    } else {
        a = conn_open(d->tcp_addr);
    }
    sa = hello_full(a, "A", "disk", LONG_LEASE_MS, NULL);
    id = send_lock_limit(a, 0, 4096, EXTLOCK_MODE_EXCLUSIVE, 0, 65536);
    ga = expect_granted(a, id, 0, 65536, EXTLOCK_MODE_EXCLUSIVE);

    daemon_pause(d);
    extlock_msg_init(&m, EXTLOCK_MSG_UNLOCK);
    m.lock = ga.lock;
    send_msg(a, &m);
    if (say_bye) {
        send_simple(a, EXTLOCK_MSG_BYE);
    }
    conn_abort(a);
    id = send_lock(b, 0, 4096, EXTLOCK_MODE_EXCLUSIVE, true);
    start = now_ms();
    assert_int_equal(kill(d->pid, SIGCONT), 0);

    /*
     * "waiting" (A holds the extent when B's request is handled), then
     * "granted", long before A's lease could run out
     */
    for (int i = 0; i < 2 && !granted; i++) {
        extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
        if (!extlock_conn_recv(b, &m, RECV_MS, NULL)) {
            dump_log(d);
            fail_msg("B not granted %" PRId64 " ms after A unlocked and "
                     "hung up (A's lease is %d ms): A's unlock was not "
                     "read", now_ms() - start, LONG_LEASE_MS);
        }
        assert_true(m.has_id && m.id == id);
        assert_true(m.type == EXTLOCK_MSG_WAITING ||
                    m.type == EXTLOCK_MSG_GRANTED);
        granted = m.type == EXTLOCK_MSG_GRANTED;
        extlock_msg_clear(&m);
    }
    assert_true(granted);

    /* The write to A failed and what A sent was applied after it */
    line = g_strdup_printf("gone: of the requests it sent last, %d applied "
                           "and 0 dropped", say_bye ? 2 : 1);
    wait_log_line(d, line);
    assert_int_equal(dropped_after_hangup(mon), 0);
    if (say_bye) {
        deadline = now_ms() + RECV_MS;
        while (sessions_of(mon, "A") != 0) {
            if (now_ms() > deadline) {
                dump_log(d);
                fail_msg("the session of A, which said bye, is still there");
            }
            g_usleep(5000);
        }
    } else {
        json_object *st = wait_session_state(mon, sa, "disconnected");

        assert_int_equal(jint(find_session(st, sa), "locks-held"), 0);
        json_object_put(st);
    }
    daemon_stop(d);
}

static void test_revoked_tls_client_gone_unlock(void **state)
{
    revoked_client_gone(true, false);
}

static void test_revoked_tls_client_gone_bye(void **state)
{
    revoked_client_gone(true, true);
}

/* The same on plain TCP (the write fails with ECONNRESET) */
static void test_revoked_tcp_client_gone_unlock(void **state)
{
    revoked_client_gone(false, false);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_hangup_while_paused_keeps_input,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_hangup_drops_lock_request,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_hangup_pause_outlasts_lease,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(
            test_hangup_reclaim_done_after_dropped_reclaim, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hangup_tcp_drops_lock_request,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_hangup_tcp_pause_outlasts_lease,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_hangup_tcp_bye_in_socket,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_revoked_tls_client_gone_unlock,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_revoked_tls_client_gone_bye,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_revoked_tcp_client_gone_unlock,
                                        setup, teardown),
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
