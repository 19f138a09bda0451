/*
 * libFuzzer harness: extlockd's dispatch of whole connection byte streams
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Every input runs a real extlockd server object (server.c and its
 * modules, lock-table.c, state-file.c with a state file in /dev/shm) with
 * up to four client connections, each a socketpair whose server end is
 * served exactly as an accepted socket is: the default GMainContext
 * dispatches it.  The input
 * is a script, one command per line:
 *
 *   N:TEXT   client N (0-3) sends TEXT and '\n' (connects first if needed)
 *   N+TEXT   client N sends TEXT without '\n' (a partial line)
 *   N!       client N closes its socket
 *   T<ms>    the clock advances by <ms> milliseconds, the server's timer
 *            runs (leases expire, grace periods end, fencing delays pass)
 *   other    sent to client 0 as a line
 *
 * In TEXT, "@S" stands for the session id of the last "welcome" any
 * client received (so that sessions can be resumed).  A first line "#..."
 * sets options: 'R' starts the server as after a restart, with two
 * sessions in the state file (ids 0123456789abcdef0123456789abcdef and
 * fedcba9876543210fedcba9876543210, clients hostA/disk0 and hostB/disk0,
 * lock-space "disk") in their grace period; 'W' starts the token counter
 * just below its 40-bit limit, so that the epoch changes; 'P' loads a
 * policy file that gives the clients' identity ("uid:0") only the actions
 * read, write and reserve and at most 2 registrations per lock-space, in
 * at most 2 lock-spaces, so that freezes, the maintenance lock and
 * registrations beyond them are refused.
 *
 * After every command the main context runs until it is idle, every reply
 * is read and must decode (extlock_msg_parse) as a server-to-client
 * message, and the lock table invariant checker runs on every lock-space
 * (the server also runs it after every table change: debug checks on).
 * At the end all clients disconnect and the clock passes every lease,
 * fencing margin and grace period: no session may be left.
 *
 * The clock: this program defines g_get_monotonic_time(), which the
 * server's and the lock table's calls bind to (they are linked into this
 * executable), so no real time needs to pass.  GLib's own timeouts keep
 * the real clock; the harness runs the server's timer itself.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <glib.h>
#include <glib/gstdio.h>

#include "extlock/protocol.h"
#include "policy.h"
#include "server.h"
#include "state-file.h"

#define NCLIENTS        4
#define MAX_PUMP        10000       /* main context iterations per step */
#define MAX_ADVANCE_MS  (24LL * 3600 * 1000)
#define LEASE_MS        1000
#define FENCE_MS        200
#define GRACE_MS        1500
#define RESTORED_A      "0123456789abcdef0123456789abcdef"
#define RESTORED_B      "fedcba9876543210fedcba9876543210"

#define FAIL(...) \
    do { \
        fprintf(stderr, "fuzz-dispatch: " __VA_ARGS__); \
        fputc('\n', stderr); \
        abort(); \
    } while (0)

typedef struct Client {
    int fd;                     /* our end, -1 if not connected */
    ExtlockLineBuf lb;          /* replies */
} Client;

static gint64 fake_now_us;
static char *state_path;
static char *policy_path;
static Client clients[NCLIENTS];
static char last_session[33];

/* The server's clock (see the header comment) */
gint64 g_get_monotonic_time(void)
{
    return fake_now_us;
}

static GLogWriterOutput quiet_writer(GLogLevelFlags level,
                                     const GLogField *fields, gsize n,
                                     gpointer data)
{
    if (level & (G_LOG_LEVEL_ERROR | G_LOG_LEVEL_CRITICAL)) {
        g_log_writer_standard_streams(level, fields, n, data);
        abort();
    }
    return G_LOG_WRITER_HANDLED;
}

int LLVMFuzzerInitialize(int *argc, char ***argv);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *base = g_file_test("/dev/shm", G_FILE_TEST_IS_DIR) ?
                       "/dev/shm" : g_get_tmp_dir();
    char *dir = g_build_filename(base, "extlock-fuzz-XXXXXX", NULL);

    if (!g_mkdtemp(dir)) {
        FAIL("cannot create a directory in %s: %s", base, g_strerror(errno));
    }
    state_path = g_build_filename(dir, "extlockd.state", NULL);
    policy_path = g_build_filename(dir, "policy.conf", NULL);
    if (!g_file_set_contents(policy_path, "[identity uid:0]\n"
                             "lock-spaces=*\nclient-ids=*\n"
                             "allow=read;write;reserve\n"
                             "max-registrations=2\n"
                             "max-lock-spaces=2\n", -1, NULL)) {
        FAIL("cannot write %s", policy_path);
    }
    g_free(dir);
    g_log_set_writer_func(quiet_writer, NULL, NULL);
    for (int i = 0; i < NCLIENTS; i++) {
        clients[i].fd = -1;
    }
    return 0;
}

static void check_reply(const char *line, size_t len)
{
    ExtlockMsg m;
    ExtlockProtoError err;

    if (!extlock_msg_parse(line, len, &m, &err)) {
        FAIL("server sent a line that does not decode (%s): %.*s",
             err.message, (int)MIN(len, 4096), line);
    }
    if (m.type < EXTLOCK_MSG_WELCOME) {
        FAIL("server sent a request: %.*s", (int)MIN(len, 4096), line);
    }
    if (m.type == EXTLOCK_MSG_WELCOME) {
        g_strlcpy(last_session, m.session, sizeof(last_session));
    }
    extlock_msg_clear(&m);
}

static void client_close(Client *c)
{
    close(c->fd);
    c->fd = -1;
    extlock_linebuf_destroy(&c->lb);
}

/* Read and check what the server sent; returns true if anything came */
static bool client_drain(Client *c)
{
    char buf[16384];
    bool any = false;

    while (c->fd >= 0) {
        ssize_t n = recv(c->fd, buf, sizeof(buf), 0);
        const char *line;
        size_t len;
        ExtlockLineResult r;

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        }
        if (n <= 0) {
            /* The server closed it (bye, or a dropped connection) */
            client_close(c);
            return true;
        }
        any = true;
        extlock_linebuf_append(&c->lb, buf, n);
        while ((r = extlock_linebuf_next(&c->lb, &line, &len)) !=
               EXTLOCK_LINE_NONE) {
            if (r == EXTLOCK_LINE_TOO_LONG) {
                FAIL("server sent a line longer than %d bytes",
                     EXTLOCK_MAX_REPLY_LINE);
            }
            check_reply(line, len);
        }
    }
    return any;
}

/* Run the main context and read replies until nothing happens any more */
static void pump(void)
{
    for (int i = 0; i < MAX_PUMP; i++) {
        bool busy = g_main_context_iteration(NULL, FALSE);

        for (int k = 0; k < NCLIENTS; k++) {
            busy |= client_drain(&clients[k]);
        }
        if (!busy) {
            return;
        }
    }
    FAIL("the server is still busy after %d main loop iterations",
         MAX_PUMP);
}

static void check_server(ExtlockdServer *s, unsigned *nsessions)
{
    g_autofree char *msg = NULL;
    unsigned n;

    if (!extlockd_server_check(s, &n, &msg)) {
        FAIL("%s", msg);
    }
    if (nsessions) {
        *nsessions = n;
    }
}

static void client_connect(ExtlockdServer *s, Client *c, int idx)
{
    int sv[2];
    char peer[32];

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0,
                   sv) < 0) {
        FAIL("socketpair: %s", g_strerror(errno));
    }
    snprintf(peer, sizeof(peer), "fuzz client %d", idx);
    extlockd_server_add_connection(s, sv[1], peer);
    c->fd = sv[0];
    extlock_linebuf_init_max(&c->lb, EXTLOCK_MAX_REPLY_LINE);
}

static void client_send(ExtlockdServer *s, int idx, const char *p,
                        size_t len, bool newline)
{
    Client *c = &clients[idx];
    GString *text = g_string_new_len(p, len);

    if (last_session[0]) {
        g_string_replace(text, "@S", last_session, 0);
    }
    if (newline) {
        g_string_append_c(text, '\n');
    }
    if (c->fd < 0) {
        client_connect(s, c, idx);
    }
    for (size_t off = 0; off < text->len && c->fd >= 0;) {
        ssize_t n = send(c->fd, text->str + off, text->len - off,
                         MSG_NOSIGNAL);

        if (n > 0) {
            off += n;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            pump();             /* let the server read */
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            client_close(c);    /* the server closed it */
        }
    }
    g_string_free(text, TRUE);
}

static void advance(ExtlockdServer *s, gint64 ms)
{
    fake_now_us += MIN(ms, MAX_ADVANCE_MS) * 1000;
    extlockd_server_run_timer(s);
}

static ExtlockdServer *server_start(bool restart, bool wrap)
{
    ExtlockdConfig cfg = {
        .state_file = state_path,
        .lease_ms = LEASE_MS,
        .fence_margin_ms = FENCE_MS,
        .max_locks_per_session = 16,
        .max_sessions = 8,
        .grace_ms = restart ? GRACE_MS : 0,
        .debug_checks = true,
        .first_counter = wrap ? EXTLOCKD_COUNTER_LIMIT - 3 : 0,
    };
    ExtlockdStateSession listed[] = {
        { RESTORED_A, "hostA/disk0", "disk" },
        { RESTORED_B, "hostB/disk0", "disk" },
    };
    g_autoptr(GError) err = NULL;
    GPtrArray *sessions = NULL;
    ExtlockdServer *s;
    uint64_t epoch;

    if (!extlockd_state_save_sessions(state_path, 5, listed,
                                      restart ? G_N_ELEMENTS(listed) : 0,
                                      &err) ||
        !extlockd_state_load_sessions(state_path, &epoch, &sessions, &err)) {
        FAIL("state file: %s", err->message);
    }
    s = extlockd_server_new(&cfg, epoch + 1);
    extlockd_server_restore(s, sessions);
    if (sessions) {
        g_ptr_array_unref(sessions);
    }
    if (!extlockd_server_save_state(s, &err)) {
        FAIL("state file: %s", err->message);
    }
    return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *p = (const char *)data, *end = p + size;
    bool restart = false, wrap = false, policy = false;
    ExtlockdServer *s;
    unsigned nsessions;

    fake_now_us = 1000 * G_USEC_PER_SEC;
    last_session[0] = '\0';

    if (p < end && *p == '#') {
        const char *nl = memchr(p, '\n', end - p);
        const char *oe = nl ? nl : end;

        restart = memchr(p, 'R', oe - p) != NULL;
        wrap = memchr(p, 'W', oe - p) != NULL;
        policy = memchr(p, 'P', oe - p) != NULL;
        p = nl ? nl + 1 : end;
    }
    s = server_start(restart, wrap);
    if (policy) {
        g_autoptr(GError) err = NULL;
        ExtlockdPolicy *pol = extlockd_policy_load(policy_path, &err);

        if (!pol) {
            FAIL("policy: %s", err->message);
        }
        extlockd_server_set_policy(s, pol);
    }

    while (p < end) {
        const char *nl = memchr(p, '\n', end - p);
        const char *le = nl ? nl : end;
        size_t len = le - p;

        if (len >= 2 && p[0] >= '0' && p[0] < '0' + NCLIENTS &&
            (p[1] == ':' || p[1] == '+')) {
            client_send(s, p[0] - '0', p + 2, len - 2, p[1] == ':');
        } else if (len == 2 && p[0] >= '0' && p[0] < '0' + NCLIENTS &&
                   p[1] == '!') {
            if (clients[p[0] - '0'].fd >= 0) {
                client_close(&clients[p[0] - '0']);
            }
        } else if (len >= 1 && p[0] == 'T') {
            gint64 ms = 0;

            for (size_t i = 1; i < len && i < 12 && g_ascii_isdigit(p[i]);
                 i++) {
                ms = ms * 10 + (p[i] - '0');
            }
            advance(s, ms);
        } else {
            client_send(s, 0, p, len, true);
        }
        pump();
        check_server(s, NULL);
        p = nl ? nl + 1 : end;
    }

    /* Everybody leaves; every lease, margin and grace period passes */
    for (int i = 0; i < NCLIENTS; i++) {
        if (clients[i].fd >= 0) {
            client_close(&clients[i]);
        }
    }
    pump();
    for (int round = 0; round < 3; round++) {
        advance(s, EXTLOCK_MAX_LEASE_MS + FENCE_MS + GRACE_MS + 10000);
        pump();
    }
    check_server(s, &nsessions);
    if (nsessions) {
        FAIL("%u session(s) left after every client left and every lease "
             "expired", nsessions);
    }
    extlockd_server_free(s);
    while (g_main_context_iteration(NULL, FALSE)) {
    }
    return 0;
}
