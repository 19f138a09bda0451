/*
 * extlockctl freeze: a consistent cut of one lock-space
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * extlockctl freeze LOCK-SPACE [OPTIONS] -- COMMAND [ARG]...
 *
 * A session of its own asks for a shared lock on the whole lock-space
 * ([0, 2^63) unless --offset/--length say otherwise).  The coordinator
 * grants it in timestamp order: when it is granted, every exclusive lock
 * (every write) requested before it has been released, and every one
 * requested after it waits.  COMMAND runs then, with EXTLOCK_CUT_TOKEN
 * (the lock's fencing token: its place in the lock order),
 * EXTLOCK_CUT_EPOCH, EXTLOCK_CUT_TIME (UTC, ISO 8601) and
 * EXTLOCK_CUT_LOCK_SPACE in its environment; the lock is released when it
 * exits.  The lease is renewed meanwhile.
 *
 * --timeout S bounds the whole freeze (waiting for the grant and
 * COMMAND): past it, the request is cancelled or COMMAND is killed (its
 * process group: SIGTERM, SIGKILL 5 s later), and the lock released.  If
 * the session is lost while COMMAND runs (connection closed, lease
 * expired), COMMAND is killed too: the cut is no longer guaranteed.  If
 * extlockctl itself dies, COMMAND gets SIGKILL (PR_SET_PDEATHSIG) and the
 * coordinator releases the lock when the session's lease runs out.
 *
 * --guest-agent SOCKET[,SOCKET]... pairs the cut with the guests' own
 * filesystem freeze: before the freeze lock is asked for, every guest
 * agent (the unix socket of the host side of its channel) is sent
 * guest-fsfreeze-freeze (guest-fsfreeze-freeze-list of --guest-fs
 * MOUNTPOINT[,MOUNTPOINT]... if given: each guest freezes those it has,
 * at least one), which flushes the guests' filesystems and holds their
 * writes; after COMMAND, and on every error
 * or timeout once any of them was sent, every agent is sent
 * guest-fsfreeze-thaw.  If a guest cannot be frozen, those frozen are
 * thawed and COMMAND does not run.  COMMAND then sees
 * EXTLOCK_CUT_CONSISTENCY=filesystem (else crash) and
 * EXTLOCK_CUT_GUEST_FILESYSTEMS (how many were frozen).
 *
 * Exit status: 0 COMMAND succeeded; 1 an error (coordinator, permission,
 * unknown lock-space, COMMAND failed or was killed, session lost);
 * 2 bad usage; 124 the timeout.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <gio/gio.h>
#include <json-c/json.h>
#include "extlock/client-sync.h"
#include "freeze.h"
#include "guest-agent.h"

/* How long to look for a leader among several coordinators */
#define FREEZE_CONNECT_MS 10000

#define FREEZE_CALL_TIMEOUT_MS  (10 * 1000)
#define FREEZE_KILL_GRACE_MS    5000
#define FREEZE_EXIT_TIMEOUT     124
#define FREEZE_GA_TIMEOUT_MS    (60 * 1000)
#define WHOLE_SPACE             ((uint64_t)1 << 63)

typedef struct Freeze {
    const char *address;
    const char *space;
    ExtlockConn *conn;
    uint64_t lock_req;           /* id of the lock request */
    uint64_t lock_id;            /* 0 until granted */
    uint64_t token;
    bool lost;                   /* session lost: no cut any more */
    char *lost_why;
    pid_t child;
    int pidfd;
    int status;                  /* of the child, once it exited */
    bool exited;
    char **agents;               /* --guest-agent sockets */
    char **guest_fs;             /* --guest-fs mountpoints */
    bool agents_frozen;          /* a freeze was sent: thaw them all */
    int64_t guest_filesystems;   /* frozen, in all guests */
} Freeze;

static int freeze_usage(const char *fmt, const char *arg)
{
    fprintf(stderr, "extlockctl freeze: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\nUsage: extlockctl [-c ADDR] freeze LOCK-SPACE "
            "[--timeout S] [--client-id ID] [--lease-ms MS] [--offset N "
            "--length N] [--allow-unused] [--guest-agent SOCKET[,SOCKET]... "
            "[--guest-fs MOUNTPOINT[,MOUNTPOINT]...]] -- COMMAND [ARG]...\n");
    return 2;
}

static bool parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *v)
{
    char *end;

    if (!s || !g_ascii_isdigit(s[0])) {
        return false;
    }
    errno = 0;
    *v = g_ascii_strtoull(s, &end, 10);
    return !*end && !errno && *v >= min && *v <= max;
}

static int64_t now_ms(void)
{
    return g_get_monotonic_time() / 1000;
}

/* Send @msg (an id is assigned); false and f->lost on failure */
static bool freeze_send(Freeze *f, ExtlockMsg *msg)
{
    g_autoptr(GError) err = NULL;

    if (!extlock_conn_send(f->conn, msg, &err)) {
        f->lost = true;
        f->lost_why = g_strdup_printf("cannot send to %s: %s", f->address,
                                      err->message);
        return false;
    }
    return true;
}

/* One message from the coordinator; false on a fatal one */
static bool freeze_handle(Freeze *f, ExtlockMsg *m)
{
    switch (m->type) {
    case EXTLOCK_MSG_GRANTED:
        if (m->has_id && m->id == f->lock_req) {
            f->lock_id = m->lock;
            f->token = m->token;
        }
        return true;
    case EXTLOCK_MSG_WAITING:
    case EXTLOCK_MSG_RENEWED:
    case EXTLOCK_MSG_REVOKE:
    case EXTLOCK_MSG_FENCE_STATUS:
    case EXTLOCK_MSG_CANCELLED:
        return true;
    case EXTLOCK_MSG_SESSION_EXPIRED:
        f->lost = true;
        f->lost_why = g_strdup("the coordinator expired the session "
                               "(lease not renewed in time)");
        return false;
    case EXTLOCK_MSG_ERROR:
        f->lost = true;
        f->lost_why = g_strdup_printf("%s: %s",
                                      extlock_error_code_name(m->error),
                                      m->message ? m->message : "");
        return false;
    default:
        return true;
    }
}

/* Read what is there (waiting at most @timeout_ms for the first message) */
static bool freeze_read(Freeze *f, int timeout_ms)
{
    do {
        g_autoptr(GError) err = NULL;
        ExtlockMsg m;
        bool ok;

        extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
        if (!extlock_conn_recv(f->conn, &m, timeout_ms, &err)) {
            extlock_msg_clear(&m);
            if (g_error_matches(err, G_IO_ERROR, G_IO_ERROR_TIMED_OUT)) {
                return true;
            }
            f->lost = true;
            f->lost_why = g_strdup_printf("connection to %s lost: %s",
                                          f->address, err->message);
            return false;
        }
        ok = freeze_handle(f, &m);
        extlock_msg_clear(&m);
        if (!ok) {
            return false;
        }
        timeout_ms = 0;
    } while (extlock_conn_has_buffered(f->conn) ||
             extlock_conn_tls_pending(f->conn));
    return true;
}

static bool freeze_child_reap(Freeze *f)
{
    if (!f->exited && f->child > 0 &&
        waitpid(f->child, &f->status, WNOHANG) == f->child) {
        f->exited = true;
    }
    return f->exited;
}

/* SIGTERM to COMMAND's process group, SIGKILL after FREEZE_KILL_GRACE_MS */
static void freeze_kill(Freeze *f)
{
    int64_t until = now_ms() + FREEZE_KILL_GRACE_MS;

    if (f->child <= 0 || freeze_child_reap(f)) {
        return;
    }
    kill(-f->child, SIGTERM);
    while (!freeze_child_reap(f) && now_ms() < until) {
        struct pollfd p = { .fd = f->pidfd, .events = POLLIN };

        if (f->pidfd >= 0) {
            poll(&p, 1, (int)(until - now_ms()));
        } else {
            g_usleep(10 * 1000);
        }
    }
    if (!f->exited) {
        kill(-f->child, SIGKILL);
        waitpid(f->child, &f->status, 0);
        f->exited = true;
    }
}

static pid_t freeze_spawn(Freeze *f, char **argv, const char *cut_time)
{
    g_autofree char *token = g_strdup_printf("%" PRIu64, f->token);
    g_autofree char *epoch = g_strdup_printf("%" PRIu64, f->token >> 40);
    pid_t pid = fork();

    if (pid == 0) {
        /*
         * If extlockctl dies, its session and then the lock go: COMMAND
         * must not go on copying a thawed image as if it were a cut
         */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() == 1) {
            _exit(127);
        }
        setpgid(0, 0);
        setenv("EXTLOCK_CUT_TOKEN", token, 1);
        setenv("EXTLOCK_CUT_EPOCH", epoch, 1);
        setenv("EXTLOCK_CUT_TIME", cut_time, 1);
        setenv("EXTLOCK_CUT_LOCK_SPACE", f->space, 1);
        setenv("EXTLOCK_CUT_CONSISTENCY", f->agents ? "filesystem" : "crash",
               1);
        if (f->agents) {
            g_autofree char *n = g_strdup_printf("%" PRId64,
                                                 f->guest_filesystems);

            setenv("EXTLOCK_CUT_GUEST_FILESYSTEMS", n, 1);
        }
        execvp(argv[0], argv);
        fprintf(stderr, "extlockctl freeze: cannot run %s: %s\n", argv[0],
                g_strerror(errno));
        _exit(127);
    }
    if (pid > 0) {
        setpgid(pid, pid);       /* also here: no race with kill(-pid) */
#ifdef SYS_pidfd_open
        f->pidfd = syscall(SYS_pidfd_open, pid, 0);
#else
        f->pidfd = -1;
#endif
    }
    return pid;
}

/* Per guest-agent call: what is left of the freeze's time, within bounds */
static int freeze_ga_timeout(int64_t deadline)
{
    int64_t left = deadline ? deadline - now_ms() : FREEZE_GA_TIMEOUT_MS;

    return (int)CLAMP(left, 1, FREEZE_GA_TIMEOUT_MS);
}

/* guest-fsfreeze-freeze on every agent; false (all thawed) on a failure */
static bool freeze_guests(Freeze *f, int64_t deadline)
{
    for (char **a = f->agents; a && *a; a++) {
        g_autofree char *err = NULL;
        int64_t n = 0;

        f->agents_frozen = true;
        if (!guest_agent_freeze(*a, f->guest_fs, freeze_ga_timeout(deadline),
                                &n, &err)) {
            fprintf(stderr, "extlockctl freeze: lock-space %s: cannot freeze "
                    "the guest's filesystems: %s\n", f->space, err);
            return false;
        }
        f->guest_filesystems += n;
        fprintf(stderr, "extlockctl freeze: lock-space %s: guest agent %s: "
                "%" PRId64 " filesystem(s) frozen\n", f->space, *a, n);
        if (f->guest_fs && n < 1) {
            /* The agent skips the mountpoints its guest does not have */
            fprintf(stderr, "extlockctl freeze: lock-space %s: guest agent "
                    "%s froze none of the filesystems of --guest-fs\n",
                    f->space, *a);
            return false;
        }
    }
    return true;
}

/*
 * guest-fsfreeze-thaw on every agent (also those whose freeze failed or
 * was not sent: thawing a thawed guest is harmless); false if one failed
 */
static bool freeze_thaw_guests(Freeze *f)
{
    bool ok = true;

    if (!f->agents_frozen) {
        return true;
    }
    f->agents_frozen = false;
    for (char **a = f->agents; *a; a++) {
        g_autofree char *err = NULL;
        int64_t n = 0;

        if (guest_agent_thaw(*a, FREEZE_GA_TIMEOUT_MS, &n, &err)) {
            fprintf(stderr, "extlockctl freeze: lock-space %s: guest agent "
                    "%s: %" PRId64 " filesystem(s) thawed\n", f->space, *a,
                    n);
        } else {
            fprintf(stderr, "extlockctl freeze: lock-space %s: THAW FAILED: "
                    "%s; the guest's filesystems may still be frozen "
                    "(guest-fsfreeze-thaw through its agent)\n", f->space,
                    err);
            ok = false;
        }
    }
    return ok;
}

/* "A,B" appended to @list (NULL-terminated); false on an empty item */
static bool freeze_split_list(GPtrArray *list, const char *arg)
{
    g_auto(GStrv) items = g_strsplit(arg, ",", -1);

    for (char **i = items; *i; i++) {
        if (!**i) {
            return false;
        }
        g_ptr_array_add(list, g_strdup(*i));
    }
    return items[0] != NULL;
}

/*
 * Is @space in use by another session?  Asked through "status" after our
 * hello (a non-admin sees its own lock-space); true if it cannot tell.
 */
static bool freeze_space_in_use(Freeze *f)
{
    g_autoptr(GError) err = NULL;
    ExtlockMsg req, reply;
    bool used = true;

    extlock_msg_init(&req, EXTLOCK_MSG_STATUS);
    extlock_msg_init(&reply, EXTLOCK_MSG_INVALID);
    if (extlock_conn_call(f->conn, &req, &reply, FREEZE_CALL_TIMEOUT_MS,
                          &err) &&
        reply.type == EXTLOCK_MSG_STATUS_REPLY && reply.body) {
        json_object *spaces = NULL, *n = NULL;

        if (json_object_object_get_ex(reply.body, "lock-spaces", &spaces) &&
            json_object_is_type(spaces, json_type_array)) {
            for (size_t i = 0; i < json_object_array_length(spaces); i++) {
                json_object *sp = json_object_array_get_idx(spaces, i);
                json_object *name = NULL;

                if (json_object_object_get_ex(sp, "name", &name) &&
                    g_str_equal(json_object_get_string(name), f->space) &&
                    json_object_object_get_ex(sp, "sessions", &n)) {
                    used = json_object_get_int64(n) > 1;
                }
            }
        }
    }
    extlock_msg_clear(&reply);
    return used;
}

int freeze_main(const char *address, const ExtlockTlsOptions *tls,
                int argc, char **argv)
{
    Freeze f = { .address = address, .pidfd = -1 };
    const char *client_id = NULL;
    uint64_t timeout_s = 0, lease_ms = 0, offset = 0, length = WHOLE_SPACE;
    bool has_offset = false, has_length = false, allow_unused = false;
    g_autofree char *default_id = NULL;
    g_autofree char *cmdline = NULL;
    g_autoptr(GError) err = NULL;
    char **cmd = NULL;
    g_autoptr(GPtrArray) agents = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) guest_fs = g_ptr_array_new_with_free_func(g_free);
    int64_t start, deadline = 0, next_renew, renew_every;
    ExtlockMsg welcome, req;
    int ret = 1, i;

    for (i = 0; i < argc; i++) {
        const char *a = argv[i];
        uint64_t *target = NULL, min = 0, max = 0;

        if (g_str_equal(a, "--")) {
            cmd = argv + i + 1;
            break;
        } else if (g_str_equal(a, "--allow-unused")) {
            allow_unused = true;
            continue;
        } else if (g_str_equal(a, "--guest-agent") ||
                   g_str_equal(a, "--guest-fs")) {
            if (i + 1 >= argc) {
                return freeze_usage("option '%s' needs a value", a);
            }
            if (!freeze_split_list(g_str_equal(a, "--guest-fs") ? guest_fs
                                                                : agents,
                                   argv[++i])) {
                return freeze_usage("option '%s': empty item", a);
            }
            continue;
        } else if (g_str_equal(a, "--client-id")) {
            if (i + 1 >= argc) {
                return freeze_usage("option '%s' needs a value", a);
            }
            client_id = argv[++i];
            continue;
        } else if (g_str_equal(a, "--timeout")) {
            target = &timeout_s, min = 1, max = 7 * 24 * 3600;
        } else if (g_str_equal(a, "--lease-ms")) {
            target = &lease_ms, min = 100, max = 3600 * 1000;
        } else if (g_str_equal(a, "--offset")) {
            target = &offset, min = 0, max = WHOLE_SPACE - 1;
            has_offset = true;
        } else if (g_str_equal(a, "--length")) {
            target = &length, min = 1, max = WHOLE_SPACE;
            has_length = true;
        } else if (a[0] == '-') {
            return freeze_usage("unknown option '%s'", a);
        } else if (!f.space) {
            f.space = a;
            continue;
        } else {
            return freeze_usage("unexpected argument '%s' (COMMAND goes "
                                "after --)", a);
        }
        if (i + 1 >= argc) {
            return freeze_usage("option '%s' needs a value", a);
        }
        if (!parse_u64(argv[i + 1], min, max, target)) {
            fprintf(stderr, "extlockctl freeze: %s '%s': expected an "
                    "integer in %" PRIu64 "..%" PRIu64 "\n", a, argv[i + 1],
                    min, max);
            return 2;
        }
        i++;
    }
    if (!f.space) {
        return freeze_usage("%s", "which LOCK-SPACE?");
    }
    if (!cmd || !cmd[0]) {
        return freeze_usage("%s", "no COMMAND after --");
    }
    if (has_offset != has_length && has_offset) {
        return freeze_usage("%s", "--offset needs --length");
    }
    if (length > WHOLE_SPACE - offset) {
        return freeze_usage("%s", "--offset + --length is beyond 2^63");
    }
    if (guest_fs->len && !agents->len) {
        return freeze_usage("%s", "--guest-fs needs --guest-agent");
    }
    if (agents->len) {
        g_ptr_array_add(agents, NULL);
        f.agents = (char **)agents->pdata;
    }
    if (guest_fs->len) {
        g_ptr_array_add(guest_fs, NULL);
        f.guest_fs = (char **)guest_fs->pdata;
    }
    if (!client_id) {
        default_id = g_strdup_printf("freeze/%s/%d", g_get_host_name(),
                                     (int)getpid());
        client_id = default_id;
    }
    cmdline = g_strjoinv(" ", cmd);

    /* One address or an HA list: the leader's session, not-leader followed */
    extlock_msg_init(&welcome, EXTLOCK_MSG_INVALID);
    f.conn = extlock_conn_connect_leader(address,
                                         tls->creds_dir ? tls : NULL,
                                         client_id, f.space, lease_ms,
                                         &welcome, FREEZE_CONNECT_MS, &err);
    if (!f.conn) {
        fprintf(stderr, "extlockctl freeze: lock-space %s: %s\n", f.space,
                err->message);
        return 1;
    }
    lease_ms = welcome.lease_ms ? welcome.lease_ms : 10000;
    extlock_msg_clear(&welcome);
    if (!allow_unused && !freeze_space_in_use(&f)) {
        fprintf(stderr, "extlockctl freeze: lock-space %s is unknown to %s "
                "(no other client uses it; --allow-unused freezes it "
                "anyway)\n", f.space, address);
        goto bye;
    }

    start = now_ms();
    deadline = timeout_s ? start + (int64_t)timeout_s * 1000 : 0;
    renew_every = MAX(lease_ms / 3, 1);
    next_renew = start + renew_every;
    /*
     * The guests first: their filesystems flush (writes that complete
     * before the cut) and then write nothing until thawed
     */
    if (f.agents && !freeze_guests(&f, deadline)) {
        fprintf(stderr, "extlockctl freeze: lock-space %s: COMMAND not run\n",
                f.space);
        goto bye;
    }
    extlock_msg_init(&req, EXTLOCK_MSG_LOCK);
    req.has_extent = true;
    req.offset = offset;
    req.length = length;
    req.mode = EXTLOCK_MODE_SHARED;
    req.wait = true;
    if (!freeze_send(&f, &req)) {
        goto lost;
    }
    f.lock_req = req.id;
    fprintf(stderr, "extlockctl freeze: lock-space %s: waiting for a shared "
            "lock on [%" PRIu64 ", +%" PRIu64 ")\n", f.space, offset, length);

    /* Until granted: renew, read */
    while (!f.lock_id) {
        int64_t now = now_ms();
        int wait_ms;

        if (deadline && now >= deadline) {
            ExtlockMsg c;

            extlock_msg_init(&c, EXTLOCK_MSG_CANCEL);
            c.request = f.lock_req;
            freeze_send(&f, &c);
            fprintf(stderr, "extlockctl freeze: lock-space %s: timed out "
                    "after %" PRIu64 " s waiting for the freeze lock; "
                    "request cancelled, COMMAND not run\n", f.space,
                    timeout_s);
            ret = FREEZE_EXIT_TIMEOUT;
            goto bye;
        }
        if (now >= next_renew) {
            ExtlockMsg r;

            extlock_msg_init(&r, EXTLOCK_MSG_RENEW);
            if (!freeze_send(&f, &r)) {
                goto lost;
            }
            next_renew += renew_every;
        }
        wait_ms = (int)MIN(next_renew - now, 1000);
        if (deadline) {
            wait_ms = (int)MIN(wait_ms, deadline - now);
        }
        if (!freeze_read(&f, MAX(wait_ms, 0))) {
            goto lost;
        }
    }

    {
        g_autoptr(GDateTime) t = g_date_time_new_now_utc();
        g_autofree char *cut_time = g_date_time_format_iso8601(t);

        fprintf(stderr, "extlockctl freeze: lock-space %s frozen: cut token "
                "%" PRIu64 " (epoch %" PRIu64 ") at %s after %" PRId64
                " ms; running: %s\n", f.space, f.token, f.token >> 40,
                cut_time, now_ms() - start, cmdline);
        f.child = freeze_spawn(&f, cmd, cut_time);
        if (f.child < 0) {
            fprintf(stderr, "extlockctl freeze: fork: %s\n",
                    g_strerror(errno));
            goto release;
        }
    }

    /* COMMAND runs: renew, read, watch it and the deadline */
    while (!freeze_child_reap(&f)) {
        int64_t now = now_ms();
        int wait_ms = (int)MIN(next_renew - now, 1000);
        struct pollfd p[2];
        bool buffered;
        int n = 0;

        if (deadline && now >= deadline) {
            fprintf(stderr, "extlockctl freeze: lock-space %s: timeout "
                    "(%" PRIu64 " s): COMMAND still running; killing it "
                    "(pid %d) and releasing the lock\n", f.space, timeout_s,
                    (int)f.child);
            freeze_kill(&f);
            ret = FREEZE_EXIT_TIMEOUT;
            goto release;
        }
        if (now >= next_renew) {
            ExtlockMsg r;

            extlock_msg_init(&r, EXTLOCK_MSG_RENEW);
            if (!freeze_send(&f, &r)) {
                goto lost;
            }
            next_renew += renew_every;
            continue;
        }
        if (deadline) {
            wait_ms = (int)MIN(wait_ms, deadline - now);
        }
        buffered = extlock_conn_has_buffered(f.conn) ||
                   extlock_conn_tls_pending(f.conn);
        if (buffered) {
            wait_ms = 0;
        }
        p[n++] = (struct pollfd) { .fd = extlock_conn_fd(f.conn),
                                   .events = POLLIN };
        if (f.pidfd >= 0) {
            p[n++] = (struct pollfd) { .fd = f.pidfd, .events = POLLIN };
        } else {
            wait_ms = MIN(wait_ms, 50);      /* no pidfd: look again soon */
        }
        if ((poll(p, n, MAX(wait_ms, 0)) > 0 && p[0].revents) || buffered) {
            if (!freeze_read(&f, 0)) {
                goto lost;
            }
        }
    }
    if (WIFEXITED(f.status) && WEXITSTATUS(f.status) == 0) {
        fprintf(stderr, "extlockctl freeze: lock-space %s: COMMAND "
                "succeeded; releasing the lock (frozen %" PRId64 " ms)\n",
                f.space, now_ms() - start);
        ret = 0;
    } else if (WIFEXITED(f.status)) {
        fprintf(stderr, "extlockctl freeze: lock-space %s: COMMAND failed "
                "with exit status %d; releasing the lock\n", f.space,
                WEXITSTATUS(f.status));
    } else {
        fprintf(stderr, "extlockctl freeze: lock-space %s: COMMAND killed by "
                "signal %d; releasing the lock\n", f.space,
                WTERMSIG(f.status));
    }

release:
    if (!freeze_thaw_guests(&f)) {
        ret = ret ? ret : 1;
    }
    {
        ExtlockMsg u, reply;

        extlock_msg_init(&u, EXTLOCK_MSG_UNLOCK);
        u.lock = f.lock_id;
        extlock_msg_init(&reply, EXTLOCK_MSG_INVALID);
        g_clear_error(&err);
        if (!extlock_conn_call(f.conn, &u, &reply, FREEZE_CALL_TIMEOUT_MS,
                               &err) || reply.type != EXTLOCK_MSG_UNLOCKED) {
            fprintf(stderr, "extlockctl freeze: lock-space %s: unlock of "
                    "lock %" PRIu64 " failed (%s); it goes with the session "
                    "(bye, or the lease)\n", f.space, f.lock_id,
                    err ? err->message :
                    reply.message ? reply.message : "unexpected reply");
            ret = ret ? ret : 1;
        }
        extlock_msg_clear(&reply);
    }
    goto bye;

lost:
    fprintf(stderr, "extlockctl freeze: lock-space %s: session lost: %s%s\n",
            f.space, f.lost_why ? f.lost_why : "?",
            f.child > 0 ? "; killing COMMAND: the cut is not guaranteed" : "");
    freeze_kill(&f);
    ret = 1;

bye:
    if (!freeze_thaw_guests(&f)) {
        ret = ret ? ret : 1;
    }
    if (!f.lost) {
        ExtlockMsg b, reply;

        extlock_msg_init(&b, EXTLOCK_MSG_BYE);
        extlock_msg_init(&reply, EXTLOCK_MSG_INVALID);
        g_clear_error(&err);
        extlock_conn_call(f.conn, &b, &reply, FREEZE_CALL_TIMEOUT_MS, &err);
        extlock_msg_clear(&reply);
    }
    if (f.pidfd >= 0) {
        close(f.pidfd);
    }
    g_free(f.lost_why);
    extlock_conn_close(f.conn);
    return ret;
}
