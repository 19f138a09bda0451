/*
 * extlock: shared helpers for the integration tests that run extlockd
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include <glib/gstdio.h>
#include <gio/gio.h>

#include "extlockd-harness.h"

const char *extlockd_bin;
const char *extlockctl_bin;
Fixture fx;

/* ------------------------------------------------------------------ */
/* Daemons                                                             */

void remove_tree(const char *path)
{
    GDir *dir = g_dir_open(path, 0, NULL);
    const char *name;

    if (dir) {
        while ((name = g_dir_read_name(dir)) != NULL) {
            g_autofree char *child = g_build_filename(path, name, NULL);

            if (g_file_test(child, G_FILE_TEST_IS_DIR) &&
                !g_file_test(child, G_FILE_TEST_IS_SYMLINK)) {
                remove_tree(child);
            } else {
                g_unlink(child);
            }
        }
        g_dir_close(dir);
    }
    g_rmdir(path);
}

int free_tcp_port(void)
{
    struct sockaddr_in sin = { .sin_family = AF_INET };
    socklen_t len = sizeof(sin);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int port;

    assert_true(fd >= 0);
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sin, &len), 0);
    port = ntohs(sin.sin_port);
    close(fd);
    return port;
}

void dump_log(Daemon *d)
{
    g_autofree char *text = NULL;

    if (g_file_get_contents(d->log, &text, NULL, NULL)) {
        fprintf(stderr, "---- %s ----\n%s---- end ----\n", d->log, text);
    }
}

/* Reap @d if it has exited; true if it is gone */
bool daemon_reap(Daemon *d, bool block)
{
    pid_t r;

    if (!d->pid) {
        return true;
    }
    do {
        r = waitpid(d->pid, &d->status, block ? 0 : WNOHANG);
    } while (r < 0 && errno == EINTR);
    if (r == d->pid) {
        d->pid = 0;
        return true;
    }
    return false;
}

/* Wait up to @ms for @d to exit; returns false on timeout */
bool daemon_wait_exit(Daemon *d, int ms)
{
    int64_t deadline = g_get_monotonic_time() + ms * 1000LL;

    while (!daemon_reap(d, false)) {
        if (g_get_monotonic_time() > deadline) {
            return false;
        }
        g_usleep(5000);
    }
    return true;
}

/*
 * Spawn extlockd with the test defaults plus @extra (NULL-terminated) and
 * the environment variables in @env ("NAME=VALUE", NULL-terminated).
 * Does not wait for it to be ready.
 */
static bool strv_has_prefix(const char *const *v, const char *prefix)
{
    for (int i = 0; v && v[i]; i++) {
        if (g_str_has_prefix(v[i], prefix)) {
            return true;
        }
    }
    return false;
}

Daemon *daemon_spawn(const char *state, const char *const *extra,
                     const char *const *env)
{
    Daemon *d = g_new0(Daemon, 1);
    g_autoptr(GPtrArray) argv = g_ptr_array_new_with_free_func(g_free);
    unsigned n = ++fx.ndaemons;
    int port = free_tcp_port();

    d->sock = g_strdup_printf("%s/extlockd-%u.sock", fx.dir, n);
    d->unix_addr = g_strdup_printf("unix:%s", d->sock);
    d->tcp_addr = g_strdup_printf("tcp:127.0.0.1:%d", port);
    d->state = state ? g_strdup(state)
                     : g_strdup_printf("%s/state-%u/extlockd.state",
                                       fx.dir, n);
    d->log = g_strdup_printf("%s/extlockd-%u.log", fx.dir, n);

    g_ptr_array_add(argv, g_strdup(extlockd_bin));
    g_ptr_array_add(argv, g_strdup("--listen"));
    g_ptr_array_add(argv, g_strdup(d->unix_addr));
    g_ptr_array_add(argv, g_strdup("--listen"));
    g_ptr_array_add(argv, g_strdup(d->tcp_addr));
    g_ptr_array_add(argv, g_strdup("--state-file"));
    g_ptr_array_add(argv, g_strdup(d->state));
    g_ptr_array_add(argv, g_strdup_printf("--lease-ms=%d", LEASE_MS));
    g_ptr_array_add(argv, g_strdup_printf("--fence-margin-ms=%d",
                                          MARGIN_MS));
    /* "--no-debug-checks" in @extra (not passed on): timing tests */
    if (!strv_has_prefix(extra, "--no-debug-checks")) {
        g_ptr_array_add(argv, g_strdup("--debug-checks"));
    }
    /* The tests poll status in loops; test_status_flood checks the limit */
    g_ptr_array_add(argv, g_strdup("--status-rate=100000"));
    /* Plain TCP unless the test sets up TLS */
    if (!strv_has_prefix(extra, "--tls-creds-dir")) {
        g_ptr_array_add(argv, g_strdup("--insecure"));
    }
    for (int i = 0; extra && extra[i]; i++) {
        if (strcmp(extra[i], "--no-debug-checks") != 0) {
            g_ptr_array_add(argv, g_strdup(extra[i]));
        }
    }
    g_ptr_array_add(argv, NULL);

    d->pid = fork();
    assert_true(d->pid >= 0);
    if (d->pid == 0) {
        int fd = open(d->log, O_WRONLY | O_CREAT | O_APPEND, 0644);

        /* Never outlive the test, even if it crashes */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (fd >= 0) {
            dup2(fd, STDOUT_FILENO);
            dup2(fd, STDERR_FILENO);
        }
        for (int i = 0; env && env[i]; i++) {
            putenv((char *)env[i]);
        }
        execv(extlockd_bin, (char **)argv->pdata);
        _exit(127);
    }
    g_ptr_array_add(fx.daemons, d);
    return d;
}

/* Wait until @address accepts connections from the daemon @d */
void daemon_wait_address(Daemon *d, const char *address)
{
    int64_t deadline = g_get_monotonic_time() + 10 * G_USEC_PER_SEC;

    for (;;) {
        ExtlockConn *c = extlock_conn_connect(address, NULL);

        if (c) {
            extlock_conn_close(c);
            return;
        }
        if (daemon_reap(d, false)) {
            dump_log(d);
            fail_msg("extlockd exited during start-up (status 0x%x)",
                     d->status);
        }
        if (g_get_monotonic_time() > deadline) {
            dump_log(d);
            fail_msg("extlockd did not start listening");
        }
        g_usleep(2000);
    }
}

/*
 * SIGSTOP @d and wait (bounded) until it is stopped: kill() returns before
 * the signal is acted on, and a daemon still running would read what is
 * sent next at once
 */
void daemon_pause(Daemon *d)
{
    g_autofree char *path = g_strdup_printf("/proc/%d/stat", (int)d->pid);
    int64_t deadline = now_ms() + RECV_MS;

    assert_int_equal(kill(d->pid, SIGSTOP), 0);
    for (;;) {
        g_autofree char *text = NULL;
        const char *p;

        assert_true(g_file_get_contents(path, &text, NULL, NULL));
        p = strrchr(text, ')');
        if (p && p[1] == ' ' && p[2] == 'T') {
            return;
        }
        if (now_ms() > deadline) {
            fail_msg("extlockd did not stop on SIGSTOP");
        }
        g_usleep(1000);
    }
}

/* Spawn and wait until the daemon accepts connections everywhere */
Daemon *daemon_start(const char *state, const char *const *extra,
                     const char *const *env)
{
    Daemon *d = daemon_spawn(state, extra, env);

    daemon_wait_address(d, d->unix_addr);
    daemon_wait_address(d, d->tcp_addr);
    for (int i = 0; extra && extra[i]; i++) {
        if (strcmp(extra[i], "--listen") == 0 && extra[i + 1]) {
            daemon_wait_address(d, extra[i + 1]);
        }
    }
    return d;
}

/* The daemon must exit with status 0 within @ms and remove its socket */
void daemon_stop_within(Daemon *d, int sig, int ms)
{
    assert_int_not_equal(d->pid, 0);
    assert_int_equal(kill(d->pid, sig), 0);
    if (!daemon_wait_exit(d, ms)) {
        dump_log(d);
        fail_msg("extlockd did not exit after signal %d", sig);
    }
    if (!WIFEXITED(d->status) || WEXITSTATUS(d->status) != 0) {
        dump_log(d);
        fail_msg("extlockd exit status 0x%x after signal %d", d->status,
                 sig);
    }
    assert_false(g_file_test(d->sock, G_FILE_TEST_EXISTS));
}

void daemon_stop_with(Daemon *d, int sig)
{
    daemon_stop_within(d, sig, 5000);
}

void daemon_stop(Daemon *d)
{
    daemon_stop_with(d, SIGTERM);
}

void daemon_free(gpointer p)
{
    Daemon *d = p;

    if (d->pid) {
        kill(d->pid, SIGKILL);
        daemon_reap(d, true);
    }
    g_free(d->sock);
    g_free(d->unix_addr);
    g_free(d->tcp_addr);
    g_free(d->state);
    g_free(d->log);
    g_free(d);
}

int setup(void **state)
{
    GError *err = NULL;

    fx.dir = g_dir_make_tmp("extlockd-test-XXXXXX", &err);
    if (!fx.dir) {
        fprintf(stderr, "cannot create temp dir: %s\n", err->message);
        g_error_free(err);
        return -1;
    }
    fx.daemons = g_ptr_array_new_with_free_func(daemon_free);
    fx.conns = g_ptr_array_new();
    fx.ndaemons = 0;
    return 0;
}

int teardown(void **state)
{
    for (guint i = 0; i < fx.conns->len; i++) {
        extlock_conn_close(fx.conns->pdata[i]);
    }
    g_ptr_array_free(fx.conns, TRUE);
    g_ptr_array_free(fx.daemons, TRUE);     /* kills leftovers */
    if (!g_getenv("EXTLOCKD_TEST_KEEP")) {
        remove_tree(fx.dir);
    } else {
        fprintf(stderr, "kept %s\n", fx.dir);
    }
    g_free(fx.dir);
    fx.dir = NULL;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Client helpers                                                      */

ExtlockConn *conn_open(const char *address)
{
    GError *err = NULL;
    ExtlockConn *c = extlock_conn_connect(address, &err);

    if (!c) {
        fail_msg("connect %s: %s", address, err->message);
    }
    g_ptr_array_add(fx.conns, c);
    return c;
}

void conn_drop(ExtlockConn *c)
{
    assert_true(g_ptr_array_remove(fx.conns, c));
    extlock_conn_close(c);
}

void send_msg(ExtlockConn *c, ExtlockMsg *m)
{
    GError *err = NULL;

    if (!extlock_conn_send(c, m, &err)) {
        fail_msg("send: %s", err->message);
    }
}

void send_raw(ExtlockConn *c, const char *text)
{
    GError *err = NULL;

    if (!extlock_conn_send_raw(c, text, strlen(text), &err)) {
        fail_msg("send: %s", err->message);
    }
}

/* Receive one message (fails the test on timeout, EOF or garbage) */
void recv_msg(ExtlockConn *c, ExtlockMsg *m, int timeout_ms)
{
    GError *err = NULL;

    if (!extlock_conn_recv(c, m, timeout_ms, &err)) {
        fail_msg("recv: %s", err->message);
    }
}

/* Receive one message of @type for request @id */
/* Resume secrets of the sessions seen in welcomes: session id -> secret */
static GHashTable *secrets;
/* ... and whether they were made over TCP: session id -> "tcp"/"unix" */
static GHashTable *transports;

static void transport_remember(const char *session, ExtlockConn *c)
{
    if (!transports) {
        transports = g_hash_table_new_full(g_str_hash, g_str_equal, g_free,
                                           NULL);
    }
    g_hash_table_insert(transports, g_strdup(session),
                        g_str_has_prefix(extlock_conn_address(c), "tcp:") ?
                        "tcp" : "unix");
}

const char *session_home(Daemon *d, const char *session)
{
    const char *t = transports ? g_hash_table_lookup(transports, session)
                               : NULL;

    return t && strcmp(t, "tcp") == 0 ? d->tcp_addr : d->unix_addr;
}

void secret_remember(const char *session, const char *secret)
{
    if (!secrets) {
        secrets = g_hash_table_new_full(g_str_hash, g_str_equal, g_free,
                                        g_free);
    }
    g_hash_table_insert(secrets, g_strdup(session), g_strdup(secret));
}

char *secret_of(const char *session)
{
    return secrets ? g_hash_table_lookup(secrets, session) : NULL;
}

/* What the state file records of @session's secret (g_free it) */
char *secret_sha256(const char *session)
{
    const char *secret = secret_of(session);

    assert_non_null(secret);
    return g_compute_checksum_for_string(G_CHECKSUM_SHA256, secret, -1);
}

void expect_msg(ExtlockConn *c, ExtlockMsg *m, ExtlockMsgType type,
                uint64_t id)
{
    recv_msg(c, m, RECV_MS);
    if (m->type != type) {
        fail_msg("expected %s for request %" PRIu64 ", got %s (%s: %s)",
                 extlock_msg_type_name(type), id,
                 extlock_msg_type_name(m->type),
                 extlock_error_code_name(m->error),
                 m->message ? m->message : "");
    }
    assert_true(m->has_id);
    assert_int_equal(m->id, id);
    if (type == EXTLOCK_MSG_WELCOME) {
        assert_non_null(m->resume_secret);
        assert_int_equal(strlen(m->resume_secret), EXTLOCK_SECRET_LEN);
        secret_remember(m->session, m->resume_secret);
        transport_remember(m->session, c);
    }
}

/* The next message is an error with @code (and @id if has_id) */
void expect_error(ExtlockConn *c, bool has_id, uint64_t id,
                  ExtlockErrorCode code)
{
    ExtlockMsg m;

    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    recv_msg(c, &m, RECV_MS);
    if (m.type != EXTLOCK_MSG_ERROR) {
        fail_msg("expected error %s, got %s",
                 extlock_error_code_name(code),
                 extlock_msg_type_name(m.type));
    }
    if (m.error != code) {
        fail_msg("expected error %s, got %s (%s)",
                 extlock_error_code_name(code),
                 extlock_error_code_name(m.error),
                 m.message ? m.message : "");
    }
    assert_int_equal(m.has_id, has_id);
    if (has_id) {
        assert_int_equal(m.id, id);
    }
    assert_non_null(m.message);
    extlock_msg_clear(&m);
}

/* Nothing arrives within @ms */
void expect_quiet(ExtlockConn *c, int ms)
{
    GError *err = NULL;
    ExtlockMsg m;
    bool got;

    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    got = extlock_conn_recv(c, &m, ms, &err);
    if (got) {
        fail_msg("unexpected %s message (id %" PRIu64 ")",
                 extlock_msg_type_name(m.type), m.id);
    }
    assert_true(g_error_matches(err, G_IO_ERROR, G_IO_ERROR_TIMED_OUT));
    g_error_free(err);
}

/* The server closes the connection (after any messages in @skip_ok) */
void expect_eof(ExtlockConn *c)
{
    GError *err = NULL;
    ExtlockMsg m;

    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    if (extlock_conn_recv(c, &m, RECV_MS, &err)) {
        fail_msg("expected EOF, got %s", extlock_msg_type_name(m.type));
    }
    assert_true(g_error_matches(err, G_IO_ERROR, G_IO_ERROR_CLOSED));
    g_error_free(err);
}

/* hello; returns the session id (g_free it) and the epoch */
char *hello_full(ExtlockConn *c, const char *client,
                 const char *space, uint32_t lease_ms,
                 uint64_t *epoch)
{
    GError *err = NULL;
    ExtlockMsg w;
    char *session;

    extlock_msg_init(&w, EXTLOCK_MSG_INVALID);
    if (!extlock_conn_hello(c, client, space, lease_ms, &w, &err)) {
        fail_msg("hello: %s", err->message);
    }
    assert_int_equal(w.type, EXTLOCK_MSG_WELCOME);
    assert_int_equal(w.version, EXTLOCK_PROTOCOL_VERSION);
    assert_non_null(w.resume_secret);
    assert_int_equal(strlen(w.resume_secret), EXTLOCK_SECRET_LEN);
    secret_remember(w.session, w.resume_secret);
    transport_remember(w.session, c);
    assert_non_null(w.session);
    assert_int_equal(strlen(w.session), 32);
    assert_int_equal(w.lease_ms, lease_ms ? lease_ms : LEASE_MS);
    assert_null(w.locks);
    if (epoch) {
        *epoch = w.epoch;
    }
    session = g_strdup(w.session);
    extlock_msg_clear(&w);
    return session;
}

ExtlockConn *client(const char *address, const char *client_id,
                    uint32_t lease_ms)
{
    ExtlockConn *c = conn_open(address);

    g_free(hello_full(c, client_id, "disk", lease_ms, NULL));
    return c;
}

static uint64_t send_lock_msg(ExtlockConn *c, uint64_t offset,
                              uint64_t length, ExtlockMode mode, bool wait,
                              bool has_limit, uint64_t limit_offset,
                              uint64_t limit_length)
{
    ExtlockMsg m;

    extlock_msg_init(&m, EXTLOCK_MSG_LOCK);
    m.offset = offset;
    m.length = length;
    m.mode = mode;
    m.wait = wait;
    m.has_limit = has_limit;
    m.limit_offset = limit_offset;
    m.limit_length = limit_length;
    send_msg(c, &m);
    return m.id;
}

uint64_t send_lock(ExtlockConn *c, uint64_t offset, uint64_t length,
                   ExtlockMode mode, bool wait)
{
    return send_lock_msg(c, offset, length, mode, wait, false, 0, 0);
}

uint64_t send_lock_limit(ExtlockConn *c, uint64_t offset, uint64_t length,
                         ExtlockMode mode, uint64_t limit_offset,
                         uint64_t limit_length)
{
    return send_lock_msg(c, offset, length, mode, true, true, limit_offset,
                         limit_length);
}

/* The next message grants request @id over [offset, +length) */
Grant expect_granted(ExtlockConn *c, uint64_t id, uint64_t offset,
                     uint64_t length, ExtlockMode mode)
{
    ExtlockMsg m;
    Grant g = { .id = id };

    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    expect_msg(c, &m, EXTLOCK_MSG_GRANTED, id);
    assert_int_equal(m.offset, offset);
    assert_int_equal(m.length, length);
    assert_int_equal(m.mode, mode);
    assert_true(m.token > 0);
    g.lock = m.lock;
    g.token = m.token;
    extlock_msg_clear(&m);
    return g;
}

Grant lock_now(ExtlockConn *c, uint64_t offset, uint64_t length,
               ExtlockMode mode)
{
    uint64_t id = send_lock(c, offset, length, mode, true);

    return expect_granted(c, id, offset, length, mode);
}

/* Send a lock that must wait; returns its "waiting" message */
uint64_t lock_waits(ExtlockConn *c, uint64_t offset, uint64_t length,
                    ExtlockMode mode, ExtlockMsg *waiting)
{
    uint64_t id = send_lock(c, offset, length, mode, true);

    expect_msg(c, waiting, EXTLOCK_MSG_WAITING, id);
    assert_true(waiting->token > 0);
    assert_non_null(waiting->blockers);
    assert_true(waiting->blockers->len > 0);
    return id;
}

const ExtlockBlocker *find_blocker(ExtlockMsg *waiting,
                                   const char *client_id)
{
    for (guint i = 0; i < waiting->blockers->len; i++) {
        ExtlockBlocker *b = &g_array_index(waiting->blockers,
                                           ExtlockBlocker, i);
        if (strcmp(b->client_id, client_id) == 0) {
            return b;
        }
    }
    return NULL;
}

/* unlock (whole if length == 0); returns the "unlocked" reply */
void unlock_part(ExtlockConn *c, uint64_t lock, uint64_t offset,
                 uint64_t length, ExtlockMsg *reply)
{
    ExtlockMsg m;

    extlock_msg_init(&m, EXTLOCK_MSG_UNLOCK);
    m.lock = lock;
    if (length) {
        m.has_extent = true;
        m.offset = offset;
        m.length = length;
    }
    send_msg(c, &m);
    expect_msg(c, reply, EXTLOCK_MSG_UNLOCKED, m.id);
    assert_int_equal(reply->lock, lock);
    assert_non_null(reply->pieces);
}

void unlock_all(ExtlockConn *c, uint64_t lock)
{
    ExtlockMsg r;

    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    unlock_part(c, lock, 0, 0, &r);
    assert_int_equal(r.pieces->len, 0);
    extlock_msg_clear(&r);
}

uint64_t send_simple(ExtlockConn *c, ExtlockMsgType type)
{
    ExtlockMsg m;

    extlock_msg_init(&m, type);
    send_msg(c, &m);
    return m.id;
}

void renew(ExtlockConn *c)
{
    uint64_t id = send_simple(c, EXTLOCK_MSG_RENEW);
    ExtlockMsg r;

    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    expect_msg(c, &r, EXTLOCK_MSG_RENEWED, id);
    assert_true(r.lease_ms >= EXTLOCK_MIN_LEASE_MS);
    extlock_msg_clear(&r);
}

void bye(ExtlockConn *c)
{
    uint64_t id = send_simple(c, EXTLOCK_MSG_BYE);
    ExtlockMsg r;

    extlock_msg_init(&r, EXTLOCK_MSG_INVALID);
    expect_msg(c, &r, EXTLOCK_MSG_GOODBYE, id);
    extlock_msg_clear(&r);
    expect_eof(c);
}

int64_t now_ms(void)
{
    return g_get_monotonic_time() / 1000;
}

/* ------------------------------------------------------------------ */
/* Status helpers                                                      */

json_object *status_get(ExtlockConn *c)
{
    GError *err = NULL;
    ExtlockMsg req, reply;
    json_object *body;

    extlock_msg_init(&req, EXTLOCK_MSG_STATUS);
    extlock_msg_init(&reply, EXTLOCK_MSG_INVALID);
    if (!extlock_conn_call(c, &req, &reply, HANG_MS, &err)) {
        fail_msg("status: %s", err->message);
    }
    assert_int_equal(reply.type, EXTLOCK_MSG_STATUS_REPLY);
    assert_non_null(reply.body);
    body = json_object_get(reply.body);
    extlock_msg_clear(&reply);
    return body;
}

json_object *jget(json_object *obj, const char *key)
{
    json_object *v = NULL;

    if (!json_object_object_get_ex(obj, key, &v)) {
        fail_msg("status has no member \"%s\"", key);
    }
    return v;
}

int64_t jint(json_object *obj, const char *key)
{
    json_object *v = jget(obj, key);

    assert_true(json_object_is_type(v, json_type_int));
    return json_object_get_int64(v);
}

const char *jstr(json_object *obj, const char *key)
{
    json_object *v = jget(obj, key);

    assert_true(json_object_is_type(v, json_type_string));
    return json_object_get_string(v);
}

void del_each(json_object *arr, const char *key)
{
    for (size_t i = 0; i < json_object_array_length(arr); i++) {
        json_object_object_del(json_object_array_get_idx(arr, i), key);
    }
}

/* The status without members that change by themselves or per message */
char *status_stable(ExtlockConn *c, int64_t *errors)
{
    json_object *st = status_get(c);
    json_object *spaces = jget(st, "lock-spaces");
    char *text;

    if (errors) {
        *errors = jint(jget(st, "counters"), "errors");
    }
    json_object_object_del(st, "uptime-ms");
    json_object_object_del(jget(st, "counters"), "messages");
    json_object_object_del(jget(st, "counters"), "errors");
    for (size_t i = 0; i < json_object_array_length(spaces); i++) {
        json_object *sp = json_object_array_get_idx(spaces, i);

        del_each(jget(sp, "held"), "held-ms");
        del_each(jget(sp, "waiting"), "waited-ms");
    }
    del_each(jget(st, "sessions"), "lease-remaining-ms");
    text = g_strdup(json_object_to_json_string_ext(st,
                                                   JSON_C_TO_STRING_PLAIN));
    json_object_put(st);
    return text;
}

json_object *find_session(json_object *st, const char *id)
{
    json_object *sessions = jget(st, "sessions");

    for (size_t i = 0; i < json_object_array_length(sessions); i++) {
        json_object *s = json_object_array_get_idx(sessions, i);

        if (strcmp(jstr(s, "session"), id) == 0) {
            return s;
        }
    }
    return NULL;
}

json_object *first_space(json_object *st)
{
    json_object *spaces = jget(st, "lock-spaces");

    assert_int_equal(json_object_array_length(spaces), 1);
    return json_object_array_get_idx(spaces, 0);
}

/* Poll the status until session @id is in @state (or fail after 2 s) */
json_object *wait_session_state(ExtlockConn *mon, const char *id,
                                const char *state)
{
    int64_t deadline = now_ms() + 2000;

    for (;;) {
        json_object *st = status_get(mon);
        json_object *s = find_session(st, id);

        if (s && strcmp(jstr(s, "state"), state) == 0) {
            return st;
        }
        json_object_put(st);
        if (now_ms() > deadline) {
            fail_msg("session %s never became %s", id, state);
        }
        g_usleep(5000);
    }
}

/* ------------------------------------------------------------------ */
/* Refused starts and the event log                                    */

void daemon_refused(const char *state_path, const char *const *extra,
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

int64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

json_object *event_log_read(const char *path)
{
    g_autofree char *text = NULL;
    g_auto(GStrv) lines = NULL;
    json_object *arr = json_object_new_array();

    if (!g_file_get_contents(path, &text, NULL, NULL)) {
        return arr;
    }
    /* Every line is complete: the daemon writes each with one write() */
    assert_true(text[0] == '\0' || g_str_has_suffix(text, "\n"));
    lines = g_strsplit(text, "\n", -1);
    for (int i = 0; lines[i] && lines[i][0]; i++) {
        json_object *ev = json_tokener_parse(lines[i]);

        if (!ev || !json_object_is_type(ev, json_type_object)) {
            fail_msg("event log line %d is not a JSON object: %s", i + 1,
                     lines[i]);
        }
        assert_true(jint(ev, "ts") > 0);
        jstr(ev, "event");
        json_object_array_add(arr, ev);
    }
    return arr;
}

json_object *event_find(json_object *events, const char *event,
                        const char *client_id, int64_t token)
{
    for (size_t i = 0; i < json_object_array_length(events); i++) {
        json_object *ev = json_object_array_get_idx(events, i);
        json_object *v;

        if (strcmp(jstr(ev, "event"), event) != 0) {
            continue;
        }
        if (client_id && strcmp(jstr(ev, "client-id"), client_id) != 0) {
            continue;
        }
        if (token >= 0 && (!json_object_object_get_ex(ev, "token", &v) ||
                           json_object_get_int64(v) != token)) {
            continue;
        }
        return ev;
    }
    return NULL;
}

json_object *event_wait(const char *path, const char *event,
                        const char *client_id, int64_t token, int ms,
                        json_object **all)
{
    int64_t deadline = now_ms() + ms;

    for (;;) {
        json_object *events = event_log_read(path);
        json_object *ev = event_find(events, event, client_id, token);

        if (ev) {
            json_object_get(ev);
            if (all) {
                *all = events;
            } else {
                json_object_put(events);
            }
            return ev;
        }
        json_object_put(events);
        if (now_ms() > deadline) {
            fail_msg("no \"%s\" event of %s in %s within %d ms", event,
                     client_id ? client_id : "anyone", path, ms);
        }
        g_usleep(5000);
    }
}

/* ------------------------------------------------------------------ */
/* Persistent reservations (test-extlockd-pr.c)                        */

uint64_t pr_out_request(ExtlockConn *c, ExtlockPrAction action,
                        unsigned type, uint64_t key, uint64_t sa_key,
                        uint64_t request)
{
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };

    extlock_msg_init(&m, EXTLOCK_MSG_PR_OUT);
    m.pr_action = action;
    m.pr_type = type;
    m.pr_key = key;
    m.pr_sa_key = sa_key;
    m.pr_request = request;
    send_msg(c, &m);
    return m.id;
}

uint64_t pr_out(ExtlockConn *c, ExtlockPrAction action, unsigned type,
                uint64_t key, uint64_t sa_key)
{
    return pr_out_request(c, action, type, key, sa_key, 0);
}

/* The next message on @c is a pr-update; its seq */
uint64_t pr_expect_update(ExtlockConn *c, ExtlockMsg *m)
{
    recv_msg(c, m, RECV_MS);
    if (m->type != EXTLOCK_MSG_PR_UPDATE) {
        fail_msg("expected pr-update, got %s", extlock_msg_type_name(m->type));
    }
    assert_non_null(m->pr);
    return m->pr_seq;
}

void pr_ack(ExtlockConn *c, uint64_t seq)
{
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };
    uint64_t id;

    extlock_msg_init(&m, EXTLOCK_MSG_PR_ACK);
    m.pr_seq = seq;
    send_msg(c, &m);
    id = m.id;
    expect_msg(c, &m, EXTLOCK_MSG_PR_ACKED, id);
    assert_int_equal(m.pr_seq, seq);
    extlock_msg_clear(&m);
}

void pr_expect_result(ExtlockConn *c, uint64_t id, ExtlockPrStatus want,
                      uint32_t generation)
{
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };

    expect_msg(c, &m, EXTLOCK_MSG_PR_RESULT, id);
    if (m.pr_result != want) {
        fail_msg("pr-out %" PRIu64 ": %s, expected %s", id,
                 extlock_pr_status_name(m.pr_result),
                 extlock_pr_status_name(want));
    }
    assert_int_equal(m.pr_generation, generation);
    extlock_msg_clear(&m);
}

/* pr-in: subscribe and get the state (the caller clears @m) */
void pr_in(ExtlockConn *c, ExtlockMsg *m)
{
    uint64_t id = send_simple(c, EXTLOCK_MSG_PR_IN);

    expect_msg(c, m, EXTLOCK_MSG_PR_STATUS, id);
    assert_non_null(m->pr);
}

/*
 * A change by @from that every one of @others must acknowledge: the
 * reply comes only after the last ack.  Returns the new seq.
 */
uint64_t pr_change(ExtlockConn *from, ExtlockConn **others, int n,
                   ExtlockPrAction action, unsigned type, uint64_t key,
                   uint64_t sa_key, uint32_t generation)
{
    uint64_t id = pr_out(from, action, type, key, sa_key);
    uint64_t seq;
    ExtlockMsg m = { .type = EXTLOCK_MSG_INVALID };

    seq = pr_expect_update(from, &m);
    extlock_msg_clear(&m);
    for (int i = 0; i < n; i++) {
        assert_int_equal(pr_expect_update(others[i], &m), seq);
        extlock_msg_clear(&m);
        /* Not answered while somebody has not applied it */
        expect_quiet(from, QUIET_MS);
        pr_ack(others[i], seq);
    }
    pr_expect_result(from, id, EXTLOCK_PR_OK, generation);
    return seq;
}

/* extlockctl -c ADDR ARGS...: its stdout (g_free), exit status 0 checked */
char *ctl_output(const char *addr, const char *a1, const char *a2)
{
    const char *argv[] = { extlockctl_bin, "-c", addr, a1, a2, NULL };
    g_autoptr(GError) err = NULL;
    char *out = NULL;
    int status;

    assert_true(g_spawn_sync(NULL, (char **)argv, NULL,
                             G_SPAWN_STDERR_TO_DEV_NULL, NULL, NULL, &out,
                             NULL, &status, &err));
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    return out;
}
