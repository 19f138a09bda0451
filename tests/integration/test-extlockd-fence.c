/*
 * extlock: integration tests of extlockd's fence hook, event log and the
 * checks of its safety options
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The real daemon runs the real test fence agent
 * (contrib/fence-agents/fence_extlock_cut, $FENCE_AGENT_CUT), which talks
 * to a fault point's control socket <ctl-dir>/<plug>.ctl; here the test
 * plays the fault point (a thread answering "ok", "error ..." or nothing,
 * after a chosen delay) so that it knows when the storage path was cut.
 * One test uses Debian's fence_dummy (package fence-agents) if installed.
 *
 * Bounds: a waiter may get an expired client's lock no earlier than that
 * client's last renewal (sent by the test before the times it takes) +
 * lease + fence margin, and never before the agent reported success.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>
#include <glib.h>
#include <gio/gio.h>
#include <json-c/json.h>

#include "extlockd-harness.h"

#define KiB             (UINT64_C(1) << 10)
#define MS              INT64_C(1000000)    /* ns */
/* fence.h: the first retry of a failed agent comes after 500 ms */
#define EXTLOCKD_RETRY_MS 500

static const char *agent_bin;

/* ------------------------------------------------------------------ */
/* A fault point's control socket, played by the test                  */

typedef struct FaultPoint {
    char *path;
    int fd;
    GThread *thread;
    GMutex lock;
    /* guarded by lock */
    char *reply;                /* NULL: never answer */
    int delay_ms;
    GPtrArray *commands;
    int64_t last_reply_ns;
    unsigned silent_closed;     /* unanswered connections the peer closed */
    bool stop;
} FaultPoint;

static bool fp_stopping(FaultPoint *fp)
{
    bool stop;

    g_mutex_lock(&fp->lock);
    stop = fp->stop;
    g_mutex_unlock(&fp->lock);
    return stop;
}

static void fp_serve(FaultPoint *fp, int cfd)
{
    char line[256];
    size_t len = 0;
    g_autofree char *reply = NULL;
    int delay;

    /* One command line (bounded wait) */
    while (len < sizeof(line) - 1 && !memchr(line, '\n', len)) {
        struct pollfd p = { .fd = cfd, .events = POLLIN };
        ssize_t n;

        if (poll(&p, 1, 5000) <= 0) {
            return;
        }
        n = read(cfd, line + len, sizeof(line) - 1 - len);
        if (n <= 0) {
            return;
        }
        len += n;
    }
    line[len] = '\0';
    g_strchomp(line);
    g_mutex_lock(&fp->lock);
    g_ptr_array_add(fp->commands, g_strdup(line));
    reply = g_strdup(fp->reply);
    delay = fp->delay_ms;
    g_mutex_unlock(&fp->lock);

    if (!reply) {
        /* Silent: wait (bounded) for the agent to give up or be killed */
        for (int i = 0; i < 200 && !fp_stopping(fp); i++) {
            struct pollfd p = { .fd = cfd, .events = POLLIN };

            if (poll(&p, 1, 50) > 0) {
                char c;

                if (read(cfd, &c, 1) <= 0) {
                    g_mutex_lock(&fp->lock);
                    fp->silent_closed++;
                    g_mutex_unlock(&fp->lock);
                    return;
                }
            }
        }
        return;
    }
    if (delay) {
        /* The fault point is slow to cut the path (simulated work) */
        g_usleep(delay * 1000);
    }
    g_mutex_lock(&fp->lock);
    fp->last_reply_ns = now_ns();
    g_mutex_unlock(&fp->lock);
    if (write(cfd, reply, strlen(reply)) < 0 || write(cfd, "\n", 1) < 0) {
        return;
    }
}

static gpointer fp_thread(gpointer opaque)
{
    FaultPoint *fp = opaque;

    while (!fp_stopping(fp)) {
        struct pollfd p = { .fd = fp->fd, .events = POLLIN };
        int cfd;

        if (poll(&p, 1, 50) <= 0) {
            continue;
        }
        cfd = accept(fp->fd, NULL, NULL);
        if (cfd >= 0) {
            fp_serve(fp, cfd);
            close(cfd);
        }
    }
    return NULL;
}

static FaultPoint *fp_new(const char *dir, const char *plug,
                          const char *reply, int delay_ms)
{
    FaultPoint *fp = g_new0(FaultPoint, 1);
    struct sockaddr_un sun = { .sun_family = AF_UNIX };

    fp->path = g_strdup_printf("%s/%s.ctl", dir, plug);
    assert_true(strlen(fp->path) < sizeof(sun.sun_path));
    strcpy(sun.sun_path, fp->path);
    fp->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fp->fd >= 0);
    assert_int_equal(bind(fp->fd, (struct sockaddr *)&sun, sizeof(sun)), 0);
    assert_int_equal(listen(fp->fd, 8), 0);
    g_mutex_init(&fp->lock);
    fp->reply = g_strdup(reply);
    fp->delay_ms = delay_ms;
    fp->commands = g_ptr_array_new_with_free_func(g_free);
    fp->thread = g_thread_new("fault-point", fp_thread, fp);
    return fp;
}

static void fp_set(FaultPoint *fp, const char *reply, int delay_ms)
{
    g_mutex_lock(&fp->lock);
    g_free(fp->reply);
    fp->reply = g_strdup(reply);
    fp->delay_ms = delay_ms;
    g_mutex_unlock(&fp->lock);
}

static unsigned fp_count(FaultPoint *fp, const char *command)
{
    unsigned n = 0;

    g_mutex_lock(&fp->lock);
    for (guint i = 0; i < fp->commands->len; i++) {
        n += strcmp(fp->commands->pdata[i], command) == 0;
    }
    g_mutex_unlock(&fp->lock);
    return n;
}

static int64_t fp_last_reply(FaultPoint *fp)
{
    int64_t t;

    g_mutex_lock(&fp->lock);
    t = fp->last_reply_ns;
    g_mutex_unlock(&fp->lock);
    return t;
}

static void fp_free(FaultPoint *fp)
{
    g_mutex_lock(&fp->lock);
    fp->stop = true;
    g_mutex_unlock(&fp->lock);
    g_thread_join(fp->thread);
    close(fp->fd);
    unlink(fp->path);
    g_ptr_array_free(fp->commands, TRUE);
    g_mutex_clear(&fp->lock);
    g_free(fp->reply);
    g_free(fp->path);
    g_free(fp);
}

/* ------------------------------------------------------------------ */
/* Helpers                                                             */

/* extlockd options for the fence agent and the event log */
static const char **fence_opts(const char *ctl_dir, int timeout_ms,
                               const char *evlog)
{
    const char **o = g_new0(const char *, 6);

    o[0] = g_strdup_printf("--fence-agent=%s", agent_bin);
    o[1] = g_strdup_printf("--fence-arg=ctl-dir=%s", ctl_dir);
    o[2] = g_strdup("--fence-arg=timeout=20");
    o[3] = g_strdup_printf("--fence-timeout-ms=%d", timeout_ms);
    o[4] = g_strdup_printf("--event-log=%s", evlog);
    return o;
}

/* The next message on @c is fence-status for @client with @result */
static char *expect_fence(ExtlockConn *c, const char *client,
                          ExtlockFenceResult result, int timeout_ms)
{
    ExtlockMsg m;
    char *text;

    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    recv_msg(c, &m, timeout_ms);
    if (m.type != EXTLOCK_MSG_FENCE_STATUS) {
        fail_msg("expected fence-status %s, got %s",
                 extlock_fence_result_name(result),
                 extlock_msg_type_name(m.type));
    }
    assert_false(m.has_id);
    assert_string_equal(m.lock_space, "disk");
    assert_string_equal(m.client_id, client);
    assert_string_equal(m.session_client, client);
    assert_non_null(m.session);
    if (m.fence_result != result) {
        fail_msg("fence-status %s (%s), expected %s",
                 extlock_fence_result_name(m.fence_result),
                 m.message ? m.message : "",
                 extlock_fence_result_name(result));
    }
    text = g_strdup(m.message ? m.message : "");
    extlock_msg_clear(&m);
    return text;
}

/*
 * A failed agent is run again after EXTLOCKD_FENCE_RETRY_MIN_MS (then
 * doubling): a test that takes longer than that between two steps (ASan,
 * a loaded machine) sees the retries' fence-status messages.  Read what
 * is queued on @c for up to @ms: every message must be a retry of
 * @client's fence (started or failed) - anything else, a grant above all,
 * fails the test.
 */
static void skip_fence_retries(ExtlockConn *c, const char *client, int ms)
{
    for (;;) {
        GError *err = NULL;
        ExtlockMsg m;

        extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
        if (!extlock_conn_recv(c, &m, ms, &err)) {
            assert_true(g_error_matches(err, G_IO_ERROR,
                                        G_IO_ERROR_TIMED_OUT));
            g_error_free(err);
            return;
        }
        if (m.type != EXTLOCK_MSG_FENCE_STATUS ||
            strcmp(m.client_id, client) != 0 ||
            (m.fence_result != EXTLOCK_FENCE_STARTED &&
             m.fence_result != EXTLOCK_FENCE_FAILED)) {
            fail_msg("expected nothing but fence retries for %s, got %s "
                     "(id %" PRIu64 ")", client,
                     extlock_msg_type_name(m.type), m.id);
        }
        extlock_msg_clear(&m);
    }
}

/* The next message other than @client's fence retries is grant @id */
static void expect_granted_after_retries(ExtlockConn *c, const char *client,
                                         uint64_t id, uint64_t offset,
                                         uint64_t length, ExtlockMode mode)
{
    ExtlockMsg m;

    for (;;) {
        extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
        recv_msg(c, &m, RECV_MS);
        if (m.type != EXTLOCK_MSG_FENCE_STATUS) {
            break;
        }
        assert_string_equal(m.client_id, client);
        extlock_msg_clear(&m);
    }
    if (m.type != EXTLOCK_MSG_GRANTED) {
        fail_msg("expected granted for request %" PRIu64 ", got %s", id,
                 extlock_msg_type_name(m.type));
    }
    assert_int_equal(m.id, id);
    assert_int_equal(m.offset, offset);
    assert_int_equal(m.length, length);
    assert_int_equal(m.mode, mode);
    extlock_msg_clear(&m);
}

static json_object *session_of(json_object *st, const char *client)
{
    json_object *arr = jget(st, "sessions");

    for (size_t i = 0; i < json_object_array_length(arr); i++) {
        json_object *s = json_object_array_get_idx(arr, i);

        if (strcmp(jstr(s, "client-id"), client) == 0) {
            return s;
        }
    }
    return NULL;
}

static bool log_has(Daemon *d, const char *needle)
{
    g_autofree char *log = NULL;

    return g_file_get_contents(d->log, &log, NULL, NULL) &&
           strstr(log, needle) != NULL;
}

/* Events of @client named @event, in log order */
static GPtrArray *events_of(json_object *events, const char *event,
                            const char *client)
{
    GPtrArray *out = g_ptr_array_new();

    for (size_t i = 0; i < json_object_array_length(events); i++) {
        json_object *ev = json_object_array_get_idx(events, i);

        if (strcmp(jstr(ev, "event"), event) == 0 &&
            strcmp(jstr(ev, "client-id"), client) == 0) {
            g_ptr_array_add(out, ev);
        }
    }
    return out;
}

static int run_ctl(const char *const *args, char **out)
{
    g_autoptr(GPtrArray) argv = g_ptr_array_new();
    g_autofree char *err = NULL;
    int status;

    g_ptr_array_add(argv, (char *)extlockctl_bin);
    for (int i = 0; args[i]; i++) {
        g_ptr_array_add(argv, (char *)args[i]);
    }
    g_ptr_array_add(argv, NULL);
    assert_true(g_spawn_sync(NULL, (char **)argv->pdata, NULL,
                             G_SPAWN_DEFAULT, NULL, NULL, out, &err,
                             &status, NULL));
    if (out && err) {
        char *both = g_strconcat(*out, err, NULL);

        g_free(*out);
        *out = both;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* ------------------------------------------------------------------ */
/* Tests                                                               */

/*
 * B holds a lock and stops renewing; C waits for it.  The agent cuts B
 * (the fault point receives "off"); C hears started/succeeded and gets
 * the lock only after the agent succeeded and after B's last renewal +
 * lease + fence margin.  Round 1: the agent is quick, so the fence
 * margin is what C waits for.  Round 2: the fault point takes twice the
 * lease + margin to cut, and C waits for it.
 */
static void fence_round(Daemon *d, const char *evlog, FaultPoint *fp,
                        const char *plug, uint64_t offset, int delay_ms)
{
    g_autofree char *cname = g_strdup_printf("%s-waiter", plug);
    g_autofree char *msg = NULL;
    ExtlockConn *b, *c, *mon;
    json_object *events, *ev_grant, *ev_ok, *ev_rel, *ev_exp, *ev_start;
    json_object *st;
    Grant gb, gc;
    uint64_t rc;
    int64_t t_renew_ns, fp_ns;
    unsigned offs_before = fp_count(fp, "off");

    /*
     * C first: its hello waits for a state file write, which on a loaded
     * machine can take longer than B's lease - C must be waiting before
     * B's lease runs out
     */
    c = client(d->tcp_addr, cname, LONG_LEASE_MS);
    b = conn_open(d->unix_addr);
    g_free(hello_full(b, plug, "disk", LEASE_MS, NULL));
    gb = lock_now(b, offset, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    t_renew_ns = now_ns();
    renew(b);
    /* B stops renewing now: its lease ends LEASE_MS after that renew */
    rc = send_lock(c, offset, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, true);
    {
        ExtlockMsg w;

        extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
        expect_msg(c, &w, EXTLOCK_MSG_WAITING, rc);
        extlock_msg_clear(&w);
    }

    g_free(expect_fence(c, plug, EXTLOCK_FENCE_STARTED,
                        LEASE_MS + SLACK_MS + RECV_MS));
    msg = expect_fence(c, plug, EXTLOCK_FENCE_SUCCEEDED,
                       delay_ms + RECV_MS);
    /* The agent's own output is passed on */
    if (!strstr(msg, "is off")) {
        fail_msg("fence-status message without the agent's output: %s", msg);
    }
    gc = expect_granted(c, rc, offset, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    fp_ns = fp_last_reply(fp);
    assert_int_equal(fp_count(fp, "off"), offs_before + 1);

    ev_grant = event_wait(evlog, "grant", cname, gc.token, RECV_MS, &events);
    ev_exp = event_find(events, "expire", plug, -1);
    ev_start = event_find(events, "fence-start", plug, -1);
    ev_ok = event_find(events, "fence-ok", plug, -1);
    ev_rel = event_find(events, "release", plug, gb.token);
    assert_non_null(ev_exp);
    assert_non_null(ev_start);
    assert_non_null(ev_ok);
    assert_non_null(ev_rel);
    assert_string_equal(jstr(ev_exp, "session"), jstr(ev_ok, "session"));
    /* expire -> fence-start -> (cut) -> fence-ok -> release -> grant */
    assert_true(jint(ev_exp, "ts") <= jint(ev_start, "ts"));
    assert_true(jint(ev_start, "ts") < fp_ns);
    assert_true(fp_ns < jint(ev_ok, "ts"));
    assert_true(jint(ev_ok, "ts") <= jint(ev_rel, "ts"));
    assert_true(jint(ev_rel, "ts") <= jint(ev_grant, "ts"));
    /* ... and never before B's last renewal + lease + fence margin */
    if (jint(ev_rel, "ts") < t_renew_ns + (LEASE_MS + MARGIN_MS) * MS) {
        fail_msg("B's lock released %" PRId64 " ms after its last renewal "
                 "was sent, before lease + fence margin = %d ms",
                 (jint(ev_rel, "ts") - t_renew_ns) / MS,
                 LEASE_MS + MARGIN_MS);
    }
    assert_int_equal(jint(ev_rel, "offset"), offset);
    assert_int_equal(jint(ev_rel, "length"), 4 * KiB);
    json_object_put(ev_grant);
    json_object_put(events);

    mon = conn_open(d->unix_addr);
    st = status_get(mon);
    assert_null(session_of(st, plug));
    json_object_put(st);
    conn_drop(mon);
    unlock_all(c, gc.lock);
    bye(c);
}

static void test_fence_success(void **state)
{
    g_autofree char *evlog = g_build_filename(fx.dir, "events", NULL);
    g_autofree const char **opts = fence_opts(fx.dir, 10000, evlog);
    FaultPoint *fp1 = fp_new(fx.dir, "B1", "ok", 0);
    FaultPoint *fp2 = fp_new(fx.dir, "B2", "ok",
                             2 * (LEASE_MS + MARGIN_MS));
    Daemon *d = daemon_start(NULL, opts, NULL);
    ExtlockConn *mon = conn_open(d->unix_addr);
    json_object *st = status_get(mon);

    assert_string_equal(jstr(st, "fence-agent"), agent_bin);
    assert_int_equal(jint(st, "fence-timeout-ms"), 10000);
    json_object_put(st);

    fence_round(d, evlog, fp1, "B1", 0, 0);
    fence_round(d, evlog, fp2, "B2", 1024 * KiB, 2 * (LEASE_MS + MARGIN_MS));

    /* bye is not an expiry: no agent */
    {
        ExtlockConn *b = client(d->unix_addr, "B1", LEASE_MS);

        lock_now(b, 0, 1, EXTLOCK_MODE_SHARED);
        bye(b);
        assert_int_equal(fp_count(fp1, "off"), 1);
    }
    daemon_stop(d);
    for (int i = 0; opts[i]; i++) {
        g_free((char *)opts[i]);
    }
    fp_free(fp1);
    fp_free(fp2);
}

/*
 * The fault point refuses: the agent fails, B's lock stays, C is told
 * "failed" (with the agent's output), status says "failed", the log
 * warns loudly; the agent is retried with back-off; once the fault point
 * cuts, the lock moves to C, only after fence-ok.
 */
static void test_fence_failure_then_success(void **state)
{
    g_autofree char *evlog = g_build_filename(fx.dir, "events", NULL);
    g_autofree const char **opts = fence_opts(fx.dir, 10000, evlog);
    FaultPoint *fp = fp_new(fx.dir, "B", "error storage switch busy", 0);
    Daemon *d = daemon_start(NULL, opts, NULL);
    ExtlockConn *b, *c, *mon;
    g_autofree char *msg = NULL;
    json_object *st, *s, *events;
    g_autoptr(GPtrArray) failed = NULL;
    g_autoptr(GPtrArray) oks = NULL;
    json_object *ev_rel, *ev_grant;
    ExtlockMsg m;
    Grant gb, gc;
    uint64_t rc;
    bool succeeded = false;
    int64_t deadline;

    b = client(d->unix_addr, "B", LEASE_MS);
    gb = lock_now(b, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    c = client(d->tcp_addr, "C", LONG_LEASE_MS);
    rc = send_lock(c, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, true);
    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    expect_msg(c, &m, EXTLOCK_MSG_WAITING, rc);
    extlock_msg_clear(&m);

    g_free(expect_fence(c, "B", EXTLOCK_FENCE_STARTED,
                        LEASE_MS + SLACK_MS + RECV_MS));
    msg = expect_fence(c, "B", EXTLOCK_FENCE_FAILED, RECV_MS);
    if (!strstr(msg, "storage switch busy") ||
        !strstr(msg, "exited with code 1")) {
        fail_msg("fence-status failed without the reason: %s", msg);
    }
    mon = conn_open(d->unix_addr);
    st = status_get(mon);
    s = session_of(st, "B");
    assert_non_null(s);
    assert_string_equal(jstr(s, "state"), "expired");
    assert_string_equal(jstr(s, "fence"), "failed");
    assert_int_equal(jint(s, "locks-held"), 1);
    assert_non_null(strstr(jstr(s, "fence-message"), "storage switch busy"));
    json_object_put(st);
    assert_true(log_has(d, "FENCING FAILED for client B"));
    assert_true(log_has(d, "storage switch busy"));

    /* Retried: started and failed again, the lock still B's */
    g_free(expect_fence(c, "B", EXTLOCK_FENCE_STARTED,
                        EXTLOCKD_RETRY_MS + RECV_MS));
    g_free(expect_fence(c, "B", EXTLOCK_FENCE_FAILED, RECV_MS));
    assert_true(fp_count(fp, "off") >= 2);

    /* The fault point works again: the next retry cuts B */
    fp_set(fp, "ok", 0);
    deadline = now_ms() + 4 * EXTLOCKD_RETRY_MS + RECV_MS;
    for (;;) {
        extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
        recv_msg(c, &m, (int)MAX(deadline - now_ms(), 1));
        if (m.type == EXTLOCK_MSG_GRANTED) {
            assert_true(succeeded);
            assert_int_equal(m.id, rc);
            gc.lock = m.lock;
            gc.token = m.token;
            extlock_msg_clear(&m);
            break;
        }
        assert_int_equal(m.type, EXTLOCK_MSG_FENCE_STATUS);
        assert_false(succeeded);
        succeeded = m.fence_result == EXTLOCK_FENCE_SUCCEEDED;
        extlock_msg_clear(&m);
    }

    ev_grant = event_wait(evlog, "grant", "C", gc.token, RECV_MS, &events);
    failed = events_of(events, "fence-failed", "B");
    oks = events_of(events, "fence-ok", "B");
    assert_true(failed->len >= 2);
    assert_int_equal(oks->len, 1);
    ev_rel = event_find(events, "release", "B", gb.token);
    assert_non_null(ev_rel);
    assert_true(jint(g_ptr_array_index(failed, failed->len - 1), "ts") <
                jint(oks->pdata[0], "ts"));
    assert_true(jint(oks->pdata[0], "ts") <= jint(ev_rel, "ts"));
    assert_true(jint(ev_rel, "ts") <= jint(ev_grant, "ts"));
    json_object_put(ev_grant);
    json_object_put(events);
    daemon_stop(d);
    for (int i = 0; opts[i]; i++) {
        g_free((char *)opts[i]);
    }
    fp_free(fp);
}

/*
 * The fault point never answers: the agent is killed at the fence
 * timeout, which counts as a failure.  An administrator forces the
 * release with extlockctl (refused without --force, for a live session
 * and for an unknown one).
 */
static void test_fence_timeout_force_release(void **state)
{
    g_autofree char *evlog = g_build_filename(fx.dir, "events", NULL);
    g_autofree const char **opts = fence_opts(fx.dir, 1000, evlog);
    FaultPoint *fp = fp_new(fx.dir, "B", NULL, 0);
    Daemon *d = daemon_start(NULL, opts, NULL);
    ExtlockConn *b, *c, *mon;
    g_autofree char *msg = NULL, *out = NULL, *sb = NULL, *sc = NULL;
    json_object *st, *s, *events, *ev;
    ExtlockMsg m;
    Grant gb;
    uint64_t rc;
    int64_t deadline;

    b = conn_open(d->unix_addr);
    sb = hello_full(b, "B", "disk", LEASE_MS, NULL);
    gb = lock_now(b, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    c = conn_open(d->tcp_addr);
    sc = hello_full(c, "C", "disk", LONG_LEASE_MS, NULL);
    rc = send_lock(c, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, true);
    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    expect_msg(c, &m, EXTLOCK_MSG_WAITING, rc);
    extlock_msg_clear(&m);

    g_free(expect_fence(c, "B", EXTLOCK_FENCE_STARTED,
                        LEASE_MS + SLACK_MS + RECV_MS));
    msg = expect_fence(c, "B", EXTLOCK_FENCE_FAILED, 1000 + RECV_MS);
    if (!strstr(msg, "timed out after 1000 ms")) {
        fail_msg("fence-status failed without the timeout: %s", msg);
    }
    /* The agent was killed: the fault point sees its connection close */
    deadline = now_ms() + RECV_MS;
    for (;;) {
        unsigned n;

        g_mutex_lock(&fp->lock);
        n = fp->silent_closed;
        g_mutex_unlock(&fp->lock);
        if (n >= 1) {
            break;
        }
        assert_true(now_ms() < deadline);
        g_usleep(10000);
    }
    /*
     * B's fence failed and is retried (running or failed again, depending
     * on how long this took): B keeps its lock, C keeps waiting.
     */
    mon = conn_open(d->unix_addr);
    st = status_get(mon);
    s = session_of(st, "B");
    assert_string_not_equal(jstr(s, "fence"), "succeeded");
    assert_true(jint(s, "fence-attempts") >= 1);
    assert_int_equal(jint(s, "locks-held"), 1);
    assert_int_equal(jint(session_of(st, "C"), "requests-waiting"), 1);
    json_object_put(st);
    assert_true(log_has(d, "FENCING FAILED for client B"));

    /* extlockctl: the dangerous command needs --force */
    {
        const char *no_force[] = { "-c", d->unix_addr, "release-session",
                                   sb, NULL };
        const char *live[] = { "-c", d->unix_addr, "release-session",
                               "--force", sc, NULL };
        const char *unknown[] = { "-c", d->unix_addr, "release-session",
                                  "--force",
                                  "00000000000000000000000000000000", NULL };
        const char *ok[] = { "-c", d->unix_addr, "release-session",
                             "--force", sb, "--reason", "host B is off",
                             NULL };
        const char *show[] = { "-c", d->unix_addr, "sessions", NULL };

        assert_int_equal(run_ctl(show, &out), 0);
        assert_true(strstr(out, "failed (") || strstr(out, "running ("));
        g_free(out);
        assert_int_equal(run_ctl(no_force, &out), 2);
        assert_non_null(strstr(out, "dangerous"));
        g_free(out);
        assert_int_equal(run_ctl(live, &out), 1);
        assert_non_null(strstr(out, "bad-state"));
        g_free(out);
        assert_int_equal(run_ctl(unknown, &out), 1);
        assert_non_null(strstr(out, "not-found"));
        g_free(out);
        /* Not granted by any of that: only B's fence retries came */
        skip_fence_retries(c, "B", 10);
        assert_int_equal(run_ctl(ok, &out), 0);
        assert_non_null(strstr(out, "released: 1 locks"));
    }
    expect_granted_after_retries(c, "B", rc, 0, 4 * KiB,
                                 EXTLOCK_MODE_EXCLUSIVE);
    assert_true(log_has(d, "FORCE-RELEASED"));
    assert_true(log_has(d, "host B is off"));
    st = status_get(mon);
    assert_null(session_of(st, "B"));
    json_object_put(st);
    ev = event_wait(evlog, "release", "B", gb.token, RECV_MS, &events);
    assert_null(event_find(events, "fence-ok", "B", -1));
    json_object_put(ev);
    json_object_put(events);
    daemon_stop(d);
    for (int i = 0; opts[i]; i++) {
        g_free((char *)opts[i]);
    }
    fp_free(fp);
}

/*
 * A client of the previous run that does not come back after a crash:
 * with a fence agent, the grace period ends only once it is fenced (its
 * extents are unknown, so every deferred request waits); a failed agent
 * keeps the grace period going, and the deferred waiters hear about it.
 * Before, the deferred requests were granted at the grace timeout.
 */
static void test_fence_after_restart(void **state)
{
    g_autofree char *path = g_build_filename(fx.dir, "state", NULL);
    g_autofree char *evlog = g_build_filename(fx.dir, "events", NULL);
    g_autofree const char **opts = fence_opts(fx.dir, 10000, evlog);
    FaultPoint *fp = fp_new(fx.dir, "B", "error not yet", 0);
    ExtlockConn *b, *c, *mon;
    g_autofree char *sb = NULL, *msg = NULL;
    json_object *st, *s, *events, *ev_grant, *ev_ok;
    ExtlockMsg m;
    Daemon *d;
    Grant gc;
    uint64_t rc;
    int64_t deadline;
    bool succeeded = false;

    d = daemon_start(path, opts, NULL);
    b = conn_open(d->unix_addr);
    sb = hello_full(b, "B", "disk", LEASE_MS, NULL);
    lock_now(b, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    assert_int_equal(kill(d->pid, SIGKILL), 0);
    assert_true(daemon_wait_exit(d, 5000));

    d = daemon_start(path, opts, NULL);
    c = client(d->tcp_addr, "C", LONG_LEASE_MS);
    rc = send_lock(c, 0, 4 * KiB, EXTLOCK_MODE_EXCLUSIVE, true);
    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    expect_msg(c, &m, EXTLOCK_MSG_WAITING, rc);
    extlock_msg_clear(&m);

    /* The grace period times out: B is fenced, which fails */
    g_free(expect_fence(c, "B", EXTLOCK_FENCE_STARTED,
                        LEASE_MS + MARGIN_MS + SLACK_MS + RECV_MS));
    msg = expect_fence(c, "B", EXTLOCK_FENCE_FAILED, RECV_MS);
    assert_non_null(strstr(msg, "not yet"));
    mon = conn_open(d->unix_addr);
    st = status_get(mon);
    s = session_of(st, "B");
    assert_non_null(s);
    assert_string_equal(jstr(s, "session"), sb);
    assert_string_equal(jstr(s, "fence"), "failed");
    assert_false(json_object_get_boolean(jget(s, "reclaiming")));
    json_object_put(st);

    /* It works at a retry: the grace period ends, C is granted */
    fp_set(fp, "ok", 0);
    deadline = now_ms() + 4 * EXTLOCKD_RETRY_MS + RECV_MS;
    for (;;) {
        extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
        recv_msg(c, &m, (int)MAX(deadline - now_ms(), 1));
        if (m.type == EXTLOCK_MSG_GRANTED) {
            assert_true(succeeded);
            assert_int_equal(m.id, rc);
            gc.token = m.token;
            extlock_msg_clear(&m);
            break;
        }
        assert_int_equal(m.type, EXTLOCK_MSG_FENCE_STATUS);
        assert_false(succeeded);
        succeeded = m.fence_result == EXTLOCK_FENCE_SUCCEEDED;
        extlock_msg_clear(&m);
    }
    ev_grant = event_wait(evlog, "grant", "C", gc.token, RECV_MS, &events);
    ev_ok = event_find(events, "fence-ok", "B", -1);
    assert_non_null(ev_ok);
    assert_true(jint(ev_ok, "ts") < jint(ev_grant, "ts"));
    json_object_put(ev_grant);
    json_object_put(events);
    st = status_get(mon);
    assert_null(session_of(st, "B"));
    assert_int_equal(jint(st, "grace-remaining-ms"), 0);
    json_object_put(st);
    daemon_stop(d);
    for (int i = 0; opts[i]; i++) {
        g_free((char *)opts[i]);
    }
    fp_free(fp);
}

/* The real fence_dummy of fence-agents, with its status file */
static void test_fence_dummy(void **state)
{
    static const char dummy[] = "/usr/sbin/fence_dummy";
    g_autofree char *status = g_build_filename(fx.dir, "dummy.status", NULL);
    g_autofree char *a1 = g_strdup_printf("--fence-agent=%s", dummy);
    g_autofree char *a2 = g_strdup_printf("--fence-arg=status_file=%s",
                                          status);
    const char *const opts[] = { a1, "--fence-arg=type=file", a2, NULL };
    g_autofree char *text = NULL, *msg = NULL;
    ExtlockConn *b, *c;
    ExtlockMsg m;
    Daemon *d;
    uint64_t rc;

    if (!g_file_test(dummy, G_FILE_TEST_IS_EXECUTABLE)) {
        skip();
    }
    assert_true(g_file_set_contents(status, "on", -1, NULL));
    d = daemon_start(NULL, opts, NULL);
    b = client(d->unix_addr, "B", LEASE_MS);
    lock_now(b, 0, 1, EXTLOCK_MODE_EXCLUSIVE);
    c = client(d->tcp_addr, "C", LONG_LEASE_MS);
    rc = send_lock(c, 0, 1, EXTLOCK_MODE_SHARED, true);
    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    expect_msg(c, &m, EXTLOCK_MSG_WAITING, rc);
    extlock_msg_clear(&m);
    g_free(expect_fence(c, "B", EXTLOCK_FENCE_STARTED,
                        LEASE_MS + SLACK_MS + RECV_MS));
    msg = expect_fence(c, "B", EXTLOCK_FENCE_SUCCEEDED, 10000);
    expect_granted(c, rc, 0, 1, EXTLOCK_MODE_SHARED);
    assert_true(g_file_get_contents(status, &text, NULL, NULL));
    assert_string_equal(g_strstrip(text), "off");
    daemon_stop(d);
}

/*
 * An agent that leaves grandchildren writing to its output forever: the
 * daemon reads what is left after the agent's exit in bounded reads, then
 * closes the pipe, so the fence completes and the daemon stays responsive.
 * Without the bound, extlockd read the pipe until it was empty, i.e.
 * forever: no fence-status "succeeded", no renewals answered.
 */
static void test_fence_agent_output_flood(void **state)
{
    g_autofree char *agent = g_build_filename(fx.dir, "flood-agent", NULL);
    g_autofree char *a1 = g_strdup_printf("--fence-agent=%s", agent);
    const char *const opts[] = { a1, NULL };
    ExtlockConn *b, *c;
    ExtlockMsg m;
    Daemon *d;
    uint64_t rc;

    assert_true(g_file_set_contents(agent,
                                    "#!/bin/sh\n"
                                    "for i in 1 2 3 4 5 6 7 8; do\n"
                                    "    yes flood-from-a-grandchild &\n"
                                    "done\n"
                                    "exit 0\n", -1, NULL));
    assert_int_equal(chmod(agent, 0755), 0);
    d = daemon_start(NULL, opts, NULL);
    b = client(d->unix_addr, "B", LEASE_MS);
    lock_now(b, 0, 1, EXTLOCK_MODE_EXCLUSIVE);
    c = client(d->tcp_addr, "C", LONG_LEASE_MS);
    rc = send_lock(c, 0, 1, EXTLOCK_MODE_SHARED, true);
    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    expect_msg(c, &m, EXTLOCK_MSG_WAITING, rc);
    extlock_msg_clear(&m);
    g_free(expect_fence(c, "B", EXTLOCK_FENCE_STARTED,
                        LEASE_MS + SLACK_MS + RECV_MS));
    g_free(expect_fence(c, "B", EXTLOCK_FENCE_SUCCEEDED, RECV_MS));
    expect_granted(c, rc, 0, 1, EXTLOCK_MODE_SHARED);
    renew(c);
    daemon_stop(d);
}

/* Run the agent with --key=value arguments; returns its exit status */
static int run_agent(const char *const *args, char **out)
{
    g_autoptr(GPtrArray) argv = g_ptr_array_new();
    g_autofree char *err = NULL;
    int status;

    g_ptr_array_add(argv, (char *)agent_bin);
    for (int i = 0; args[i]; i++) {
        g_ptr_array_add(argv, (char *)args[i]);
    }
    g_ptr_array_add(argv, NULL);
    assert_true(g_spawn_sync(NULL, (char **)argv->pdata, NULL,
                             G_SPAWN_DEFAULT, NULL, NULL, out, &err,
                             &status, NULL));
    if (err && *err) {
        char *both = g_strconcat(*out, err, NULL);

        g_free(*out);
        *out = both;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/*
 * The test agent's other actions and errors, against a fault point
 * (extlockd only ever uses "off", through stdin)
 */
static void test_agent_actions(void **state)
{
    g_autofree char *dir = g_strdup_printf("--ctl-dir=%s", fx.dir);
    FaultPoint *fp = fp_new(fx.dir, "hostA", "on", 0);
    const char *status[] = { "--action=status", "--plug=hostA", dir, NULL };
    const char *on[] = { "--action=on", "--port=hostA", dir, NULL };
    const char *monitor[] = { "--action=monitor", dir, NULL };
    const char *meta[] = { "--action=metadata", NULL };
    const char *reboot[] = { "--action=reboot", "--plug=hostA", dir, NULL };
    const char *other[] = { "--action=off", "--plug=hostB", dir, NULL };
    const char *slash[] = { "--action=off", "--plug=a/b", dir, NULL };
    const char *nodir[] = { "--action=off", "--plug=hostA", NULL };
    char *out = NULL;

    assert_int_equal(run_agent(status, &out), 0);
    assert_non_null(strstr(out, "Status: ON"));
    g_free(out);
    fp_set(fp, "off", 0);
    assert_int_equal(run_agent(status, &out), 2);
    assert_non_null(strstr(out, "Status: OFF"));
    g_free(out);
    fp_set(fp, "ok", 0);
    assert_int_equal(run_agent(on, &out), 0);
    assert_int_equal(fp_count(fp, "on"), 1);
    assert_int_equal(fp_count(fp, "status"), 2);
    g_free(out);
    assert_int_equal(run_agent(monitor, &out), 0);
    g_free(out);
    assert_int_equal(run_agent(meta, &out), 0);
    assert_non_null(strstr(out, "<resource-agent name=\"fence_extlock_cut\""));
    g_free(out);
    assert_int_equal(run_agent(reboot, &out), 1);
    assert_non_null(strstr(out, "unsupported action"));
    g_free(out);
    assert_int_equal(run_agent(other, &out), 1);
    assert_non_null(strstr(out, "hostB.ctl"));
    g_free(out);
    assert_int_equal(run_agent(slash, &out), 1);
    assert_non_null(strstr(out, "cannot name a control socket"));
    g_free(out);
    assert_int_equal(run_agent(nodir, &out), 1);
    assert_non_null(strstr(out, "ctl-dir is required"));
    g_free(out);
    assert_int_equal(fp_count(fp, "off"), 0);
    fp_free(fp);
}

/* Bad options: refused at start with a clear message, nothing listens */
static void test_fence_options(void **state)
{
    g_autofree char *agent = g_strdup_printf("--fence-agent=%s", agent_bin);
    g_autofree char *notexec = g_build_filename(fx.dir, "notexec", NULL);
    g_autofree char *notexec_opt = g_strdup_printf("--fence-agent=%s",
                                                   notexec);
    g_autofree char *big = g_strdup_printf("--fence-arg=k=%0*d", 1100, 0);
    struct {
        const char *opts[4];
        int status;
        const char *needle;
    } cases[] = {
        { { "--fence-margin-ms=0" }, 2, "--fence-margin-ms must be in" },
        { { "--fence-margin-ms=99" }, 2, "--fence-margin-ms must be in" },
        { { "--grace-ms=0" }, 2, "--grace-ms 0 is unsafe" },
        { { "--grace-ms=699" }, 2, "--grace-ms 699 is unsafe" },
        { { agent, "--fence-timeout-ms=0" }, 2,
          "--fence-timeout-ms must be in" },
        { { "--fence-agent=fence_extlock_cut" }, 2,
          "must be an absolute path" },
        { { "--fence-agent=/nonexistent/agent" }, 2,
          "is not an executable file" },
        { { notexec_opt }, 2, "is not an executable file" },
        { { "--fence-arg=ctl-dir=/x" }, 2, "--fence-arg needs --fence-agent" },
        { { agent, "--fence-arg=novalue" }, 2, "expected KEY=VALUE" },
        { { agent, "--fence-arg==v" }, 2, "expected KEY=VALUE" },
        { { agent, "--fence-arg=action=on" }, 2, "sets \"action\" itself" },
        { { agent, "--fence-arg=plug=x" }, 2, "sets \"plug\" itself" },
        { { agent, "--fence-arg=a b=c" }, 2, "KEY may only hold" },
        { { agent, "--fence-arg=k=a\tb" }, 2, "control characters" },
        { { agent, big }, 2, "longer than 1024 bytes" },
        { { "--event-log=" }, 2, "--event-log must not be empty" },
        { { "--event-log=/nonexistent/dir/events" }, 1,
          "cannot open event log" },
    };

    assert_true(g_file_set_contents(notexec, "#!/bin/sh\n", -1, NULL));
    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        daemon_refused(NULL, cases[i].opts, cases[i].status,
                       cases[i].needle);
    }
}

/*
 * The event log: grant, partial release (the released part), a request
 * that waits (its requested extent and token), downgrade, waiter granted,
 * bye releases; every line complete, times increasing
 */
static void test_event_log(void **state)
{
    g_autofree char *evlog = g_build_filename(fx.dir, "events", NULL);
    g_autofree char *opt = g_strdup_printf("--event-log=%s", evlog);
    const char *const opts[] = { opt, NULL };
    Daemon *d = daemon_start(NULL, opts, NULL);
    ExtlockConn *a, *c;
    ExtlockMsg r;
    json_object *events, *ev;
    Grant ga, gc;
    uint64_t id, rc;
    int64_t last = 0;
    static const char *const expect[][3] = {
        { "grant", "A", "exclusive" },
        { "release", "A", "exclusive" },
        { "wait", "C", "shared" },
        { "downgrade", "A", "shared" },
        { "grant", "C", "shared" },
        { "release", "A", "shared" },
        { "release", "C", "shared" },
    };

    a = client(d->unix_addr, "A", LONG_LEASE_MS);
    c = client(d->tcp_addr, "C", LONG_LEASE_MS);
    ga = lock_now(a, 0, 8 * KiB, EXTLOCK_MODE_EXCLUSIVE);
    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    unlock_part(a, ga.lock, 0, 4 * KiB, &r);
    extlock_msg_clear(&r);
    rc = send_lock(c, 4 * KiB, 1, EXTLOCK_MODE_SHARED, true);
    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    expect_msg(c, &r, EXTLOCK_MSG_WAITING, rc);
    extlock_msg_clear(&r);
    extlock_msg_init(&r, EXTLOCK_MSG_DOWNGRADE);
    r.lock = ga.lock;
    send_msg(a, &r);
    id = r.id;
    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    expect_msg(a, &r, EXTLOCK_MSG_DOWNGRADED, id);
    extlock_msg_clear(&r);
    bye(a);
    gc = expect_granted(c, rc, 4 * KiB, 1, EXTLOCK_MODE_SHARED);
    bye(c);
    json_object_put(event_wait(evlog, "release", "C", gc.token, RECV_MS,
                               &events));
    (void)ga;
    if (json_object_array_length(events) != G_N_ELEMENTS(expect)) {
        fail_msg("%zu events: %s", json_object_array_length(events),
                 json_object_to_json_string(events));
    }
    for (size_t i = 0; i < G_N_ELEMENTS(expect); i++) {
        ev = json_object_array_get_idx(events, i);
        assert_string_equal(jstr(ev, "event"), expect[i][0]);
        assert_string_equal(jstr(ev, "client-id"), expect[i][1]);
        assert_string_equal(jstr(ev, "mode"), expect[i][2]);
        assert_string_equal(jstr(ev, "lock-space"), "disk");
        assert_int_equal(strlen(jstr(ev, "session")), 32);
        assert_true(jint(ev, "ts") >= last);
        last = jint(ev, "ts");
    }
    /* the partial release names the released part */
    ev = json_object_array_get_idx(events, 1);
    assert_int_equal(jint(ev, "offset"), 0);
    assert_int_equal(jint(ev, "length"), 4 * KiB);
    assert_int_equal(jint(ev, "token"), ga.token);
    /* the wait names the request as asked, and the lock it is granted as */
    ev = json_object_array_get_idx(events, 2);
    assert_int_equal(jint(ev, "offset"), 4 * KiB);
    assert_int_equal(jint(ev, "length"), 1);
    assert_int_equal(jint(ev, "token"), gc.token);
    assert_int_equal(jint(ev, "lock"),
                     jint(json_object_array_get_idx(events, 4), "lock"));
    ev = json_object_array_get_idx(events, 5);
    assert_int_equal(jint(ev, "offset"), 4 * KiB);
    assert_int_equal(jint(ev, "length"), 4 * KiB);
    json_object_put(events);
    daemon_stop(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_fence_success, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fence_failure_then_success,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_fence_timeout_force_release,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_fence_after_restart, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_fence_dummy, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fence_agent_output_flood, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_agent_actions, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_fence_options, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_event_log, setup, teardown),
    };

    extlockd_bin = g_getenv("EXTLOCKD");
    extlockctl_bin = g_getenv("EXTLOCKCTL");
    agent_bin = g_getenv("FENCE_AGENT_CUT");
    if (!extlockd_bin || !extlockctl_bin || !agent_bin) {
        fprintf(stderr, "EXTLOCKD, EXTLOCKCTL and FENCE_AGENT_CUT must name "
                "extlockd, extlockctl and fence_extlock_cut\n");
        return 1;
    }
    if (g_getenv("EXTLOCKD_TEST_FILTER")) {
        cmocka_set_test_filter(g_getenv("EXTLOCKD_TEST_FILTER"));
    }
    signal(SIGPIPE, SIG_IGN);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
