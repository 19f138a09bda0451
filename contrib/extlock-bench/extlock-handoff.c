/*
 * extlock-handoff: where the time of a lock handoff between two hosts goes
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Two processes (forked, each its own session in one lock-space) pass one
 * exclusive 64 KiB lock back and forth N times.  In every round the
 * waiter sends "lock" (t0); the coordinator queues it and sends "revoke"
 * to the holder, which reads it (t1) and sends "unlock" at once (t2); the
 * coordinator releases the lock (t3) and grants it to the waiter (t4),
 * which reads "granted" (t5).  The waiter then hands a token through a
 * pipe to the other process, which becomes the next waiter: rounds never
 * overlap, and the pipe is outside every measured interval.  Both
 * processes block in poll() between messages, as an idle QEMU does.
 *
 * t0, t1, t2 and t5 are CLOCK_MONOTONIC stamps taken by the two
 * processes; t3 and t4 come from extlockd's event log (--event-log,
 * "release" and "grant" lines, the same clock).  Parts printed:
 *   revoke     t1 - t0   lock message, coordinator queues and revokes,
 *                        holder wakes up and reads the revoke
 *   holder     t2 - t1   holder decides to give back (here: nothing)
 *   give-back  t3 - t2   unlock message, coordinator reads and releases
 *   grant      t4 - t3   coordinator grants the queued request
 *   wakeup     t5 - t4   grant message, waiter wakes up and reads it
 *   total      t5 - t0
 * Without the event log, give-back + grant + wakeup print as one part.
 * The baseline, measured first in the same run: an uncontended lock's
 * round trip (lock sent -> granted read) by one of the two processes.
 *
 * The floor, measured in the same run (half before the handoffs, half
 * after): what the machine's wake-ups cost right now.  Three plain
 * processes pass a message of a handoff message's size around over
 * UNIX stream sockets, each blocking in poll() between messages: A ->
 * relay -> B -> relay -> A, the four messages and four wake-ups of a
 * handoff (lock, revoke, unlock, granted) with a relay that does nothing
 * in place of the coordinator.  Every handoff part is printed with its
 * ratio to the floor's matching hops (revoke: A -> relay -> B; give-back:
 * B -> relay; wakeup: relay -> A; total: all four).
 *
 * --poll-us N: both processes check the socket without sleeping for up
 * to N us before they block in poll() (the floor does not: it stays the
 * cost of plain wake-ups).
 *
 * --gap-us N: every round (baseline, handoff and floor) starts N us after
 * the one before, with every process asleep in between, as two hosts
 * whose writes are apart: then each message wakes a process that slept
 * for N us, which on a VM costs more than back-to-back rounds (an idle
 * vCPU has halted).  bench-qemu.py's two qemu-io processes write 2 ms
 * apart: --gap-us 2000 is their floor.  --floor-only measures only the
 * floor (no coordinator needed).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <poll.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <json-c/json.h>
#include "extlock/client-sync.h"
#include "bench-util.h"

#define EXTENT 65536
#define RECV_TIMEOUT_MS 10000
#define LEASE_MS 600000

typedef struct Round {
    int64_t t_lock_tx;          /* waiter */
    int64_t t_revoke_rx;        /* holder */
    int64_t t_unlock_tx;        /* holder */
    int64_t t_release;          /* coordinator, event log */
    int64_t t_grant;            /* coordinator, event log */
    int64_t t_grant_rx;         /* waiter */
    uint64_t holder_lock;
    uint64_t waiter_lock;
    int waiter;
} Round;

/* One round of the floor: stamps of the four hops A -> R -> B -> R -> A */
typedef struct FloorRound {
    int64_t a_tx;               /* A sends ("lock") */
    int64_t r_rx1;              /* relay has read it, sends to B */
    int64_t b_rx;               /* B has read it ("revoke"), answers */
    int64_t r_rx2;              /* relay has read B's answer, sends to A */
    int64_t a_rx;               /* A has read it ("granted") */
} FloorRound;

typedef struct Shared {
    int64_t *baseline;          /* uncontended round trips, ns */
    Round *rounds;
    FloorRound *floor;
} Shared;

static const char *opt_address = "unix:/run/extlock/extlockd.sock";
static const char *opt_event_log;
static const char *opt_lock_space = "extlock-handoff";
static long opt_rounds = 2000;
static long opt_poll_us;
static long opt_gap_us;
static bool opt_floor_only;
static bool opt_json;

static G_NORETURN void die(int who, const char *what, GError *err)
{
    fprintf(stderr, "extlock-handoff: process %d: %s%s%s\n", who, what,
            err ? ": " : "", err ? err->message : "");
    exit(1);
}

/* Send @m (and clear it), or end the process; returns its id */
static uint64_t send_or_die(ExtlockConn *conn, int who, ExtlockMsg *m,
                            const char *what)
{
    g_autoptr(GError) err = NULL;
    uint64_t id;

    if (!extlock_conn_send(conn, m, &err)) {
        die(who, what, err);
    }
    id = m->id;
    extlock_msg_clear(m);
    return id;
}

/* Send "lock" for [off, +EXTENT) exclusive; returns its id */
static uint64_t send_lock(ExtlockConn *conn, int who, uint64_t off)
{
    ExtlockMsg m;

    extlock_msg_init(&m, EXTLOCK_MSG_LOCK);
    m.has_extent = true;
    m.offset = off;
    m.length = EXTENT;
    m.mode = EXTLOCK_MODE_EXCLUSIVE;
    m.wait = true;
    /* A limit marks a caching client, which gets revokes; no growth */
    m.has_limit = true;
    m.limit_offset = off;
    m.limit_length = EXTENT;
    return send_or_die(conn, who, &m, "send lock");
}

static void send_unlock(ExtlockConn *conn, int who, uint64_t lock)
{
    ExtlockMsg m;

    extlock_msg_init(&m, EXTLOCK_MSG_UNLOCK);
    m.lock = lock;
    send_or_die(conn, who, &m, "send unlock");
}

/*
 * --poll-us: check for input without sleeping for up to opt_poll_us
 * before the caller blocks in poll(); returns early once input is there
 */
static void spin_for_input(ExtlockConn *conn)
{
    struct pollfd pfd = { .fd = extlock_conn_fd(conn), .events = POLLIN };
    int64_t end = now_ns() + opt_poll_us * 1000;

    do {
        if (extlock_conn_has_buffered(conn) || poll(&pfd, 1, 0) != 0) {
            return;
        }
    } while (now_ns() < end);
}

/*
 * Read messages until @type arrives (for request @id if it is not 0);
 * the others ("waiting", "unlocked") are skipped.  Returns its lock.
 */
static uint64_t wait_for(ExtlockConn *conn, int who, ExtlockMsgType type,
                         uint64_t id, int64_t *t)
{
    for (;;) {
        g_autoptr(GError) err = NULL;
        ExtlockMsg m;
        uint64_t lock;

        extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
        if (opt_poll_us) {
            spin_for_input(conn);
        }
        if (!extlock_conn_recv(conn, &m, RECV_TIMEOUT_MS, &err)) {
            die(who, "receive", err);
        }
        *t = now_ns();
        if (m.type == EXTLOCK_MSG_ERROR) {
            die(who, m.message ? m.message : "error from the coordinator",
                NULL);
        }
        lock = m.lock;
        if (m.type == type && (!id || (m.has_id && m.id == id))) {
            extlock_msg_clear(&m);
            return lock;
        }
        extlock_msg_clear(&m);
    }
}

/* --gap-us: sleep before a round starts (the other processes sleep too) */
static void gap(void)
{
    if (opt_gap_us) {
        struct timespec ts = { .tv_sec = opt_gap_us / 1000000,
                               .tv_nsec = opt_gap_us % 1000000 * 1000 };

        while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
            /* the rest of it */
        }
    }
}

static void put_byte(int fd, int who)
{
    char b = 't';

    while (write(fd, &b, 1) != 1) {
        if (errno != EINTR) {
            die(who, "pipe write", NULL);
        }
    }
}

static void get_byte(int fd, int who)
{
    char b;
    ssize_t n;

    while ((n = read(fd, &b, 1)) != 1) {
        if (n == 0 || errno != EINTR) {
            die(who, "pipe read", NULL);
        }
    }
}

/*
 * One of the two processes.  @who 0 starts as the holder.  @in: tokens
 * for us; @out: tokens for the other; @ready: to the parent.
 */
static void run_child(int who, Shared *sh, int in, int out, int ready)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *cid = g_strdup_printf("handoff/%d", who);
    ExtlockConn *conn = extlock_conn_connect(opt_address, &err);
    ExtlockMsg welcome;
    uint64_t held = 0;
    int64_t t;
    long k;

    if (!conn) {
        die(who, "connect", err);
    }
    extlock_msg_init(&welcome, EXTLOCK_MSG_INVALID);
    if (!extlock_conn_hello(conn, cid, opt_lock_space, LEASE_MS, &welcome,
                            &err)) {
        die(who, "hello", err);
    }
    extlock_msg_clear(&welcome);

    if (who == 0) {
        /* The baseline: uncontended round trips, on an extent of our own */
        for (k = 0; k < opt_rounds; k++) {
            int64_t t0;
            uint64_t id, lock;

            gap();
            t0 = now_ns();
            id = send_lock(conn, who, 16 * EXTENT);
            lock = wait_for(conn, who, EXTLOCK_MSG_GRANTED, id, &t);

            sh->baseline[k] = t - t0;
            send_unlock(conn, who, lock);
            wait_for(conn, who, EXTLOCK_MSG_UNLOCKED, 0, &t);
        }
        held = wait_for(conn, who, EXTLOCK_MSG_GRANTED,
                        send_lock(conn, who, 0), &t);
    }
    put_byte(ready, who);

    for (k = 0; k < opt_rounds; k++) {
        Round *r = &sh->rounds[k];

        if (held) {
            /* The holder of round k */
            r->holder_lock = held;
            while (wait_for(conn, who, EXTLOCK_MSG_REVOKE, 0,
                            &r->t_revoke_rx) != held) {
                /* a revoke of a lock given back already */
            }
            /* before the send: the coordinator may release it first */
            r->t_unlock_tx = now_ns();
            send_unlock(conn, who, held);
            held = 0;
        } else {
            /* The waiter of round k */
            uint64_t id;

            get_byte(in, who);
            gap();
            r->waiter = who;
            r->t_lock_tx = now_ns();
            id = send_lock(conn, who, 0);
            held = wait_for(conn, who, EXTLOCK_MSG_GRANTED, id,
                            &r->t_grant_rx);
            r->waiter_lock = held;
            put_byte(out, who);
        }
    }
    extlock_conn_close(conn);
    exit(0);
}

/* The floor's message: the size of a typical handoff message */
#define FLOOR_MSG 96

static void floor_io(int fd, bool out, int who)
{
    char buf[FLOOR_MSG];
    size_t done = 0;

    memset(buf, 'x', sizeof(buf));
    while (done < sizeof(buf)) {
        ssize_t n = out ? write(fd, buf + done, sizeof(buf) - done)
                        : read(fd, buf + done, sizeof(buf) - done);

        if (n > 0) {
            done += n;
        } else if (n == 0 || errno != EINTR) {
            die(who, out ? "floor write" : "floor read", NULL);
        }
    }
}

/* Block in poll() on @fd, as the handoff processes do, then read */
static int64_t floor_recv(int fd, int who)
{
    struct pollfd pfd = { .fd = fd, .events = POLLIN };

    while (poll(&pfd, 1, RECV_TIMEOUT_MS) != 1) {
        if (errno != EINTR) {
            die(who, "floor poll", NULL);
        }
    }
    floor_io(fd, false, who);
    return now_ns();
}

/*
 * Floor rounds [@from, @to): three processes (A, relay, B) pass one
 * message around A -> relay -> B -> relay -> A.  The relay polls both
 * of its sockets, as extlockd's main loop polls its connections.
 */
static void run_floor(Shared *sh, long from, long to)
{
    int ar[2], br[2];
    pid_t pid[2];
    long k;
    int i;

    if (socketpair(AF_UNIX, SOCK_STREAM, 0, ar) ||
        socketpair(AF_UNIX, SOCK_STREAM, 0, br)) {
        die(-1, "socketpair", NULL);
    }
    for (i = 0; i < 2; i++) {
        pid[i] = fork();
        if (pid[i] < 0) {
            die(-1, "fork", NULL);
        }
        if (pid[i] == 0 && i == 0) {
            /* the relay */
            close(ar[0]);
            close(br[0]);
            for (k = from; k < to; k++) {
                FloorRound *f = &sh->floor[k];
                struct pollfd p[2] = { { .fd = ar[1], .events = POLLIN },
                                       { .fd = br[1], .events = POLLIN } };

                for (int step = 0; step < 2; step++) {
                    int other;

                    while (poll(p, 2, RECV_TIMEOUT_MS) < 1) {
                        if (errno != EINTR) {
                            die(2, "floor poll", NULL);
                        }
                    }
                    other = (p[0].revents & POLLIN) ? 0 : 1;
                    floor_io(p[other].fd, false, 2);
                    if (other == 0) {
                        f->r_rx1 = now_ns();
                    } else {
                        f->r_rx2 = now_ns();
                    }
                    floor_io(p[!other].fd, true, 2);
                }
            }
            exit(0);
        }
        if (pid[i] == 0) {
            /* B */
            close(ar[0]);
            close(ar[1]);
            close(br[1]);
            for (k = from; k < to; k++) {
                sh->floor[k].b_rx = floor_recv(br[0], 1);
                floor_io(br[0], true, 1);
            }
            exit(0);
        }
    }
    /* A */
    close(ar[1]);
    close(br[0]);
    close(br[1]);
    for (k = from; k < to; k++) {
        FloorRound *f = &sh->floor[k];

        gap();
        f->a_tx = now_ns();
        floor_io(ar[0], true, 0);
        f->a_rx = floor_recv(ar[0], 0);
    }
    close(ar[0]);
    for (i = 0; i < 2; i++) {
        int status;

        if (waitpid(pid[i], &status, 0) < 0 || !WIFEXITED(status) ||
            WEXITSTATUS(status) != 0) {
            die(-1, "a floor process failed", NULL);
        }
    }
}

/* t3 and t4 of every round from the event log; false if it had none */
static bool read_event_log(Round *rounds, long n)
{
    g_autoptr(GHashTable) release = g_hash_table_new(g_int64_hash,
                                                     g_int64_equal);
    g_autoptr(GHashTable) grant = g_hash_table_new(g_int64_hash,
                                                   g_int64_equal);
    g_autofree char *text = NULL;
    g_auto(GStrv) lines = NULL;
    g_autoptr(GError) err = NULL;
    long found = 0, k;

    if (!g_file_get_contents(opt_event_log, &text, NULL, &err)) {
        fprintf(stderr, "extlock-handoff: %s\n", err->message);
        return false;
    }
    lines = g_strsplit(text, "\n", -1);
    /*
     * Keyed by lock id (ids are per lock-space in extlockd).  Timestamps
     * are kept in a side array indexed by line number.
     */
    for (char **l = lines; *l; l++) {
        json_object *j = json_tokener_parse(*l), *v;
        const char *ev, *space;
        int64_t *rec;

        if (!j) {
            continue;
        }
        ev = json_object_object_get_ex(j, "event", &v) ?
             json_object_get_string(v) : NULL;
        space = json_object_object_get_ex(j, "lock-space", &v) ?
                json_object_get_string(v) : NULL;
        if (!ev || !space || strcmp(space, opt_lock_space) != 0 ||
            (strcmp(ev, "grant") != 0 && strcmp(ev, "release") != 0) ||
            !json_object_object_get_ex(j, "lock", &v)) {
            json_object_put(j);
            continue;
        }
        rec = g_new(int64_t, 2);
        rec[0] = json_object_get_int64(v);
        json_object_object_get_ex(j, "ts", &v);
        rec[1] = json_object_get_int64(v);
        g_hash_table_replace(ev[0] == 'g' ? grant : release, &rec[0], rec);
        json_object_put(j);
    }
    for (k = 0; k < n; k++) {
        int64_t hl = rounds[k].holder_lock, wl = rounds[k].waiter_lock;
        int64_t *rel = g_hash_table_lookup(release, &hl);
        int64_t *gr = g_hash_table_lookup(grant, &wl);

        if (rel && gr) {
            rounds[k].t_release = rel[1];
            rounds[k].t_grant = gr[1];
            found++;
        }
    }
    /* the records are leaked with the tables' keys: a one-shot tool */
    return found == n;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

    return x < y ? -1 : x > y;
}

typedef struct Part {
    const char *name;
    double p50, p99, max;
    double floor_p50;           /* the floor's matching hops; 0: none */
} Part;

static Part part(const char *name, int64_t *v, long n)
{
    Part p = { .name = name };

    qsort(v, n, sizeof(*v), cmp_i64);
    p.p50 = v[(n - 1) / 2] / 1000.0;
    p.p99 = v[(long)((n - 1) * 0.99)] / 1000.0;
    p.max = v[n - 1] / 1000.0;
    return p;
}

/* The floor's hops, in @floors[5]; returns 5 */
static int floor_parts(Shared *sh, long n, Part *floors)
{
    g_autofree int64_t *v = g_new(int64_t, n);
    int nf = 0;
    long k;

#define FLOOR(name, expr) do { \
        for (k = 0; k < n; k++) { \
            FloorRound *f = &sh->floor[k]; \
            v[k] = (expr); \
        } \
        floors[nf++] = part(name, v, n); \
    } while (0)
    FLOOR("floor A->relay->B", f->b_rx - f->a_tx);
    FLOOR("floor B->relay", f->r_rx2 - f->b_rx);
    FLOOR("floor relay->A", f->a_rx - f->r_rx2);
    FLOOR("floor B->relay->A", f->a_rx - f->b_rx);
    FLOOR("floor total", f->a_rx - f->a_tx);
#undef FLOOR
    return nf;
}

/* --floor-only: the floor's hops, as text or JSON */
static int print_floor_only(Shared *sh, long n)
{
    Part floors[5];
    int nf = floor_parts(sh, n, floors), i;

    if (opt_json) {
        json_object *j = json_object_new_object();
        json_object *jp = json_object_new_object();

        json_object_object_add(j, "rounds", json_object_new_int64(n));
        json_object_object_add(j, "gap-us", json_object_new_int64(opt_gap_us));
        for (i = 0; i < nf; i++) {
            json_object *o = json_object_new_object();

            json_object_object_add(o, "p50-us",
                                   json_object_new_double(floors[i].p50));
            json_object_object_add(o, "p99-us",
                                   json_object_new_double(floors[i].p99));
            json_object_object_add(o, "max-us",
                                   json_object_new_double(floors[i].max));
            json_object_object_add(jp, floors[i].name, o);
        }
        json_object_object_add(j, "parts", jp);
        printf("%s\n", json_object_to_json_string_ext(
                   j, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED));
        json_object_put(j);
        return 0;
    }
    printf("extlock-handoff: floor only, %ld rounds, gap-us %ld\n", n,
           opt_gap_us);
    printf("%-24s %9s %9s %9s\n", "part (us)", "p50", "p99", "max");
    for (i = 0; i < nf; i++) {
        printf("%-24s %9.1f %9.1f %9.1f\n", floors[i].name, floors[i].p50,
               floors[i].p99, floors[i].max);
    }
    return 0;
}

/* @text as a number in [@min, @max] into *@out, or false after a message */
static bool number_arg(const char *opt, const char *text, long min,
                       long max, long *out)
{
    gint64 v;

    if (!g_ascii_string_to_signed(text, 10, min, max, &v, NULL)) {
        fprintf(stderr, "extlock-handoff: bad %s '%s' (%ld-%ld)\n", opt,
                text, min, max);
        return false;
    }
    *out = v;
    return true;
}

static void usage(FILE *f)
{
    fprintf(f,
        "Usage: extlock-handoff [-c ADDR] [-n ROUNDS] [--event-log FILE] "
        "[--poll-us N] [--gap-us N]\n"
        "                       [--floor-only] [--json]\n"
        "\n"
        "Two processes pass one exclusive lock back and forth ROUNDS times\n"
        "(default 2000) and print where a handoff's time goes.  FILE is\n"
        "the coordinator's --event-log: with it the coordinator's part is\n"
        "split out.  The baseline is an uncontended lock round trip; the\n"
        "floor is a plain ping-pong of four messages between three\n"
        "processes (the messages and wake-ups of a handoff), measured in\n"
        "the same run.  --poll-us N: check the socket without sleeping\n"
        "for up to N us (0-1000000, default 0) before blocking.\n"
        "--gap-us N: start every round N us (0-1000000, default 0) after\n"
        "the one before, every process asleep in between (hosts whose\n"
        "writes are apart).  --floor-only: measure only the floor.\n");
}

int main(int argc, char **argv)
{
    Shared sh;
    int tok[2][2], ready[2];
    pid_t pid[2];
    long n, k;
    bool have_log = false;
    int64_t *v;
    Part parts[8], floors[5], base;
    int np = 0, nf = 0, i;

    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--json")) {
            opt_json = true;
        } else if (i + 1 < argc && !strcmp(argv[i], "-c")) {
            opt_address = argv[++i];
        } else if (i + 1 < argc && !strcmp(argv[i], "--event-log")) {
            opt_event_log = argv[++i];
        } else if (i + 1 < argc && !strcmp(argv[i], "--lock-space")) {
            opt_lock_space = argv[++i];
        } else if (i + 1 < argc && !strcmp(argv[i], "-n")) {
            if (!number_arg("-n", argv[++i], 1, 10000000, &opt_rounds)) {
                return 2;
            }
        } else if (i + 1 < argc && !strcmp(argv[i], "--poll-us")) {
            if (!number_arg("--poll-us", argv[++i], 0, 1000000,
                            &opt_poll_us)) {
                return 2;
            }
        } else if (i + 1 < argc && !strcmp(argv[i], "--gap-us")) {
            if (!number_arg("--gap-us", argv[++i], 0, 1000000,
                            &opt_gap_us)) {
                return 2;
            }
        } else if (!strcmp(argv[i], "--floor-only")) {
            opt_floor_only = true;
        } else {
            usage(stderr);
            return 2;
        }
    }
    n = opt_rounds;

    sh.baseline = mmap(NULL, n * sizeof(int64_t), PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    sh.rounds = mmap(NULL, n * sizeof(Round), PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    sh.floor = mmap(NULL, n * sizeof(FloorRound), PROT_READ | PROT_WRITE,
                    MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh.baseline == MAP_FAILED || sh.rounds == MAP_FAILED ||
        sh.floor == MAP_FAILED ||
        pipe(tok[0]) || pipe(tok[1]) || pipe(ready)) {
        perror("extlock-handoff");
        return 1;
    }
    if (opt_floor_only) {
        run_floor(&sh, 0, n);
        return print_floor_only(&sh, n);
    }
    /* first half of the floor before the handoffs, the rest after */
    run_floor(&sh, 0, n / 2);
    for (i = 0; i < 2; i++) {
        pid[i] = fork();
        if (pid[i] < 0) {
            perror("extlock-handoff: fork");
            return 1;
        }
        if (pid[i] == 0) {
            run_child(i, &sh, tok[i][0], tok[!i][1], ready[1]);
        }
    }
    get_byte(ready[0], -1);
    get_byte(ready[0], -1);
    put_byte(tok[1][1], -1);        /* process 1 is the first waiter */
    for (i = 0; i < 2; i++) {
        int status;

        if (waitpid(pid[i], &status, 0) < 0 || !WIFEXITED(status) ||
            WEXITSTATUS(status) != 0) {
            fprintf(stderr, "extlock-handoff: process %d failed\n", i);
            return 1;
        }
    }
    run_floor(&sh, n / 2, n);
    if (opt_event_log) {
        have_log = read_event_log(sh.rounds, n);
        if (!have_log) {
            fprintf(stderr, "extlock-handoff: the event log lacks some "
                    "rounds' grant or release: coordinator part not "
                    "split\n");
        }
    }

    v = g_new(int64_t, n);
    base = part("uncontended", sh.baseline, n);
    nf = floor_parts(&sh, n, floors);
#define PART(name, expr) do { \
        for (k = 0; k < n; k++) { \
            Round *r = &sh.rounds[k]; \
            v[k] = (expr); \
        } \
        parts[np++] = part(name, v, n); \
    } while (0)
    PART("revoke", r->t_revoke_rx - r->t_lock_tx);
    parts[np - 1].floor_p50 = floors[0].p50;
    PART("holder", r->t_unlock_tx - r->t_revoke_rx);
    if (have_log) {
        PART("give-back", r->t_release - r->t_unlock_tx);
        parts[np - 1].floor_p50 = floors[1].p50;
        PART("grant", r->t_grant - r->t_release);
        PART("wakeup", r->t_grant_rx - r->t_grant);
        parts[np - 1].floor_p50 = floors[2].p50;
    } else {
        PART("give-back+grant+wakeup", r->t_grant_rx - r->t_unlock_tx);
        parts[np - 1].floor_p50 = floors[3].p50;
    }
    PART("total", r->t_grant_rx - r->t_lock_tx);
    parts[np - 1].floor_p50 = floors[4].p50;
#undef PART

    if (opt_json) {
        json_object *j = json_object_new_object();
        json_object *jp = json_object_new_object();

        json_object_object_add(j, "handoffs", json_object_new_int64(n));
        json_object_object_add(j, "poll-us",
                               json_object_new_int64(opt_poll_us));
        json_object_object_add(j, "gap-us",
                               json_object_new_int64(opt_gap_us));
        for (i = -1; i < np + nf; i++) {
            Part *p = i < 0 ? &base : i < np ? &parts[i] : &floors[i - np];
            json_object *o = json_object_new_object();

            json_object_object_add(o, "p50-us", json_object_new_double(p->p50));
            json_object_object_add(o, "p99-us", json_object_new_double(p->p99));
            json_object_object_add(o, "max-us", json_object_new_double(p->max));
            if (p->floor_p50 > 0) {
                json_object_object_add(o, "p50-per-floor",
                    json_object_new_double(p->p50 / p->floor_p50));
            }
            json_object_object_add(jp, p->name, o);
        }
        json_object_object_add(j, "parts", jp);
        printf("%s\n", json_object_to_json_string_ext(
                   j, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED));
        json_object_put(j);
    } else {
        printf("extlock-handoff: %ld handoffs between two processes, %s, "
               "poll-us %ld, gap-us %ld\n", n, opt_address, opt_poll_us,
               opt_gap_us);
        printf("%-24s %9s %9s %9s %9s %9s\n", "part (us)", "p50", "p99",
               "max", "p50/base", "p50/floor");
        for (i = -1; i < np + nf; i++) {
            Part *p = i < 0 ? &base : i < np ? &parts[i] : &floors[i - np];

            if (i == np) {
                printf("floor: plain ping-pong, 4 messages, 3 processes, "
                       "same run\n");
            }
            printf("%-24s %9.1f %9.1f %9.1f %9.2f ", p->name, p->p50,
                   p->p99, p->max, base.p50 > 0 ? p->p50 / base.p50 : 0);
            if (p->floor_p50 > 0) {
                printf("%9.2f\n", p->p50 / p->floor_p50);
            } else {
                printf("%9s\n", "-");
            }
        }
    }
    g_free(v);
    return 0;
}
