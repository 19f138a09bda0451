/*
 * extlock-stress: the guest workload of the end-to-end test
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 * Copyright (c) 2026 The extlock authors
 *
 * Runs inside each test guest (contrib/guest/init starts it) on the shared
 * virtio-blk disk, with O_DIRECT I/O from page-aligned buffers, and checks
 * that writes of whole extents are atomic with respect to the reads and
 * writes of every guest sharing the disk.
 *
 * The data area is a grid of extents that is the same in every guest, so
 * the extents of different guests overlap completely and deliberately.
 *
 * Writers pick an extent at random and write all of it with one pwrite.
 * Every 512-byte sector of the write carries a header (magic "XLSTRESS",
 * run id, guest id, sequence number, extent index, sector index, sectors
 * per extent) and a body that is a function of the header.  The pair
 * (guest, sequence) is the write's stamp: unique for each write of a run.
 *
 * Readers pick an extent at random, read all of it with one pread and
 * check it: every sector must be valid (header at the right place, body
 * matching), and either all sectors are zero (never written) or all carry
 * the same stamp.  A read that sees two stamps, or written and unwritten
 * sectors, is a torn read: it saw part of a write.
 *
 * The guests start together: each writes a "ready" sector into a control
 * area before the data area and waits until it has read the ready sectors
 * of all guests (a barrier through the shared disk itself).  After the
 * timed run a second barrier starts the final round, in which every writer
 * of every guest writes every extent once, in the same order, so that the
 * last writes of each extent collide.  After a third barrier every guest
 * reads every extent once more and counts the extents that do not hold
 * exactly one complete write (mixed extents).  The host verifies the image
 * file the same way (contrib/guest/verify-image.py).
 *
 * The result is one line on stdout (the guest's serial console):
 *
 *   EXTLOCK-STRESS-RESULT guest=1 writes=... reads=... torn_reads=... ...
 *
 * With --op-log 1 every thread also keeps a log of its completed
 * operations, printed before the result (the backup test,
 * tests/e2e/run-backup.py, checks a backup taken during the run with it):
 *
 *   EXTLOCK-STRESS-OPW seq extent t_start_us t_end_us        a write
 *   EXTLOCK-STRESS-OPR extent guest seq t_start_us t_end_us  a whole read
 *
 * (guest 0 in an OPR line: the extent was unwritten.)
 *
 * The times are this guest's CLOCK_MONOTONIC in microseconds, taken right
 * before the pwrite/pread and right after it returned.
 *
 * Exit status: 0 when the workload ran (whatever it counted), 1 on I/O
 * errors or a failed barrier, 2 on bad usage.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

#define SECTOR_SIZE 512
#define STAMP_MAGIC "XLSTRESS"
#define READY_MAGIC "XLREADY"
#define MAX_THREADS 64
#define MAX_GUESTS 64
#define MAX_TORN_REPORTS 3

/* The header at the start of every sector written by a writer. */
typedef struct StampHeader {
    char magic[8];          /* STAMP_MAGIC, not NUL-terminated */
    uint64_t run_id;
    uint64_t seq;           /* per guest, starts at 1 */
    uint32_t guest;         /* 1 .. guests */
    uint32_t extent;        /* index of the extent in the data area */
    uint32_t sector;        /* index of the sector in the extent */
    uint32_t nsectors;      /* sectors per extent */
} StampHeader;

#define BODY_WORDS ((SECTOR_SIZE - sizeof(StampHeader)) / sizeof(uint64_t))

/* A guest's sector in the control area (barriers). */
typedef struct ReadyRecord {
    char magic[8];          /* READY_MAGIC, NUL-terminated */
    uint64_t run_id;
    uint32_t guest;
    uint32_t phase;         /* 1: ready to start, 2: finished */
} ReadyRecord;

typedef struct Config {
    const char *dev;
    uint32_t guest;
    uint32_t guests;
    uint64_t run_id;
    unsigned writers;
    unsigned readers;
    unsigned seconds;
    uint64_t ops;               /* per thread; 0: unlimited */
    uint64_t extent_size;
    uint32_t extents;
    uint64_t data_offset;
    uint64_t control_offset;
    unsigned barrier_timeout;
    uint64_t seed;
    bool final_round;
    bool final_check;
    bool op_log;
} Config;

typedef enum ExtentKind {
    EXTENT_UNWRITTEN,       /* all sectors zero */
    EXTENT_WHOLE,           /* all sectors one stamp */
    EXTENT_TORN,            /* several stamps, or written and zero sectors */
    EXTENT_CORRUPT,         /* a sector that is neither zero nor valid */
} ExtentKind;

/* What one read of an extent saw. */
typedef struct ExtentCheck {
    ExtentKind kind;
    uint32_t guest;         /* the (first) stamp seen */
    uint64_t seq;
    unsigned zero_sectors;
    unsigned corrupt_sectors;
    unsigned stamps;        /* distinct stamps seen, counted up to 8 */
    uint32_t stamp_guest[8];
    uint64_t stamp_seq[8];
    unsigned stamp_count[8];
} ExtentCheck;

typedef struct Counters {
    uint64_t writes;
    uint64_t write_errors;
    uint64_t reads;
    uint64_t read_errors;
    uint64_t torn_reads;
    uint64_t corrupt_reads;
    uint64_t unwritten_reads;
    uint64_t foreign_reads;     /* whole reads of another guest's write */
    uint64_t bytes;
} Counters;

/* One completed operation of --op-log */
typedef struct OpRecord {
    uint64_t seq;           /* the write's, or the stamp a read saw */
    uint64_t t0_us, t1_us;
    uint32_t extent;
    uint32_t guest;         /* reads: the stamp's guest, 0: unwritten */
    bool write;
} OpRecord;

#define OP_LOG_MAX 200000   /* records per thread; more are counted only */

typedef struct Worker {
    pthread_t thread;
    OpRecord *ops;
    size_t nops;
    uint64_t ops_dropped;
    unsigned index;
    bool writer;
    uint64_t rng;
    uint8_t *buf;
    Counters c;
} Worker;

static Config cfg = {
    .dev = "/dev/vda",
    .guest = 0,
    .guests = 2,
    .run_id = 0,
    .writers = 2,
    .readers = 2,
    .seconds = 20,
    .ops = 0,
    .extent_size = 256 * 1024,
    .extents = 16,
    .data_offset = 1024 * 1024,
    .control_offset = 0,
    .barrier_timeout = 120,
    .seed = 1,
    .final_round = true,
    .final_check = true,
    .op_log = false,
};

static int disk_fd = -1;
/* main sets it to stop the workers; accessed with the __atomic builtins */
static volatile int stop_flag;
static uint64_t next_seq;           /* atomic */
static unsigned torn_reports;       /* atomic */
static int first_errno;             /* atomic, first I/O error seen */

static void out(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* One line on stdout, written at once (threads print too). */
static void out(const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
    va_end(ap);
    if (n < 0) {
        return;
    }
    if ((size_t)n > sizeof(line) - 2) {
        n = sizeof(line) - 2;
    }
    line[n++] = '\n';
    if (write(STDOUT_FILENO, line, n) < 0) {
        /* nothing sensible to do */
    }
}

static uint64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void op_log(Worker *w, bool write, uint32_t extent, uint32_t guest,
                   uint64_t seq, uint64_t t0, uint64_t t1)
{
    OpRecord *r;

    if (!cfg.op_log) {
        return;
    }
    if (!w->ops) {
        w->ops = calloc(OP_LOG_MAX, sizeof(*w->ops));
    }
    if (!w->ops || w->nops >= OP_LOG_MAX) {
        w->ops_dropped++;
        return;
    }
    r = &w->ops[w->nops++];
    r->write = write;
    r->extent = extent;
    r->guest = guest;
    r->seq = seq;
    r->t0_us = t0;
    r->t1_us = t1;
}

static uint64_t splitmix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/*
 * The word that fills the body of a sector.  verify-image.py computes the
 * same: keep them in sync.
 */
static uint64_t body_word(uint64_t run_id, uint32_t guest, uint64_t seq,
                          uint32_t extent, uint32_t sector)
{
    uint64_t x = splitmix64(run_id ^ guest);

    x = splitmix64(x ^ seq);
    return splitmix64(x ^ ((uint64_t)extent << 32 | sector));
}

static uint64_t rng_next(uint64_t *state)
{
    /* xorshift64* */
    uint64_t x = *state;

    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545f4914f6cdd1dULL;
}

static uint32_t nsectors(void)
{
    return cfg.extent_size / SECTOR_SIZE;
}

static off_t extent_offset(uint32_t extent)
{
    return cfg.data_offset + (uint64_t)extent * cfg.extent_size;
}

static void note_errno(int err)
{
    int zero = 0;

    __atomic_compare_exchange_n(&first_errno, &zero, err, false,
                                __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static void fill_extent(uint8_t *buf, uint32_t extent, uint64_t seq)
{
    uint32_t n = nsectors();

    for (uint32_t s = 0; s < n; s++) {
        StampHeader *h = (StampHeader *)(buf + (size_t)s * SECTOR_SIZE);
        uint64_t *body = (uint64_t *)(h + 1);
        uint64_t w = body_word(cfg.run_id, cfg.guest, seq, extent, s);

        memcpy(h->magic, STAMP_MAGIC, sizeof(h->magic));
        h->run_id = cfg.run_id;
        h->seq = seq;
        h->guest = cfg.guest;
        h->extent = extent;
        h->sector = s;
        h->nsectors = n;
        for (size_t i = 0; i < BODY_WORDS; i++) {
            body[i] = w;
        }
    }
}

static bool sector_is_zero(const uint8_t *p)
{
    const uint64_t *w = (const uint64_t *)p;

    for (size_t i = 0; i < SECTOR_SIZE / sizeof(uint64_t); i++) {
        if (w[i]) {
            return false;
        }
    }
    return true;
}

static bool sector_is_valid(const uint8_t *p, uint32_t extent, uint32_t s)
{
    const StampHeader *h = (const StampHeader *)p;
    const uint64_t *body = (const uint64_t *)(h + 1);
    uint64_t w;

    if (memcmp(h->magic, STAMP_MAGIC, sizeof(h->magic)) != 0 ||
        h->run_id != cfg.run_id || h->guest < 1 || h->guest > cfg.guests ||
        h->seq < 1 || h->extent != extent || h->sector != s ||
        h->nsectors != nsectors()) {
        return false;
    }
    w = body_word(h->run_id, h->guest, h->seq, extent, s);
    for (size_t i = 0; i < BODY_WORDS; i++) {
        if (body[i] != w) {
            return false;
        }
    }
    return true;
}

static void check_extent(const uint8_t *buf, uint32_t extent, ExtentCheck *r)
{
    uint32_t n = nsectors();

    memset(r, 0, sizeof(*r));
    for (uint32_t s = 0; s < n; s++) {
        const uint8_t *p = buf + (size_t)s * SECTOR_SIZE;
        const StampHeader *h = (const StampHeader *)p;
        unsigned i;

        if (!sector_is_valid(p, extent, s)) {
            if (sector_is_zero(p)) {
                r->zero_sectors++;
            } else {
                r->corrupt_sectors++;
            }
            continue;
        }
        for (i = 0; i < r->stamps; i++) {
            if (r->stamp_guest[i] == h->guest && r->stamp_seq[i] == h->seq) {
                r->stamp_count[i]++;
                break;
            }
        }
        if (i == r->stamps && r->stamps < 8) {
            r->stamp_guest[i] = h->guest;
            r->stamp_seq[i] = h->seq;
            r->stamp_count[i] = 1;
            r->stamps++;
        }
    }
    if (r->stamps) {
        r->guest = r->stamp_guest[0];
        r->seq = r->stamp_seq[0];
    }
    if (r->corrupt_sectors) {
        r->kind = EXTENT_CORRUPT;
    } else if (r->zero_sectors == n) {
        r->kind = EXTENT_UNWRITTEN;
    } else if (r->zero_sectors == 0 && r->stamps == 1) {
        r->kind = EXTENT_WHOLE;
    } else {
        r->kind = EXTENT_TORN;
    }
}

static void describe(const char *what, uint32_t extent, const ExtentCheck *r)
{
    char stamps[512];
    size_t len = 0;

    stamps[0] = '\0';
    for (unsigned i = 0; i < r->stamps && len < sizeof(stamps) - 64; i++) {
        len += snprintf(stamps + len, sizeof(stamps) - len,
                        "%s%" PRIu32 ":%" PRIu64 "x%u", i ? "," : "",
                        r->stamp_guest[i], r->stamp_seq[i], r->stamp_count[i]);
    }
    out("EXTLOCK-STRESS-%s guest=%" PRIu32 " extent=%" PRIu32
        " stamps=%s zero_sectors=%u corrupt_sectors=%u",
        what, cfg.guest, extent, r->stamps ? stamps : "-", r->zero_sectors,
        r->corrupt_sectors);
}

static bool io_full(bool write_op, uint8_t *buf, size_t len, off_t off)
{
    size_t done = 0;

    /* One call for the whole extent; a short transfer is an error. */
    ssize_t ret = write_op ? pwrite(disk_fd, buf, len, off)
                           : pread(disk_fd, buf, len, off);
    if (ret < 0) {
        note_errno(errno);
        return false;
    }
    done = ret;
    if (done != len) {
        note_errno(EIO);
        return false;
    }
    return true;
}

static void write_extent(Worker *w, uint32_t extent)
{
    uint64_t seq = __atomic_add_fetch(&next_seq, 1, __ATOMIC_SEQ_CST);
    uint64_t t0;

    fill_extent(w->buf, extent, seq);
    t0 = now_us();
    if (io_full(true, w->buf, cfg.extent_size, extent_offset(extent))) {
        op_log(w, true, extent, cfg.guest, seq, t0, now_us());
        w->c.writes++;
        w->c.bytes += cfg.extent_size;
    } else {
        w->c.write_errors++;
    }
}

static void do_write(Worker *w)
{
    write_extent(w, rng_next(&w->rng) % cfg.extents);
}

static void do_read(Worker *w)
{
    uint32_t extent = rng_next(&w->rng) % cfg.extents;
    ExtentCheck r;
    uint64_t t0 = now_us(), t1;

    if (!io_full(false, w->buf, cfg.extent_size, extent_offset(extent))) {
        w->c.read_errors++;
        return;
    }
    t1 = now_us();
    w->c.reads++;
    w->c.bytes += cfg.extent_size;
    check_extent(w->buf, extent, &r);
    switch (r.kind) {
    case EXTENT_UNWRITTEN:
        w->c.unwritten_reads++;
        op_log(w, false, extent, 0, 0, t0, t1);
        break;
    case EXTENT_WHOLE:
        op_log(w, false, extent, r.guest, r.seq, t0, t1);
        if (r.guest != cfg.guest) {
            w->c.foreign_reads++;
        }
        break;
    case EXTENT_TORN:
        w->c.torn_reads++;
        if (__atomic_fetch_add(&torn_reports, 1, __ATOMIC_SEQ_CST) <
            MAX_TORN_REPORTS) {
            describe("TORN", extent, &r);
        }
        break;
    case EXTENT_CORRUPT:
        w->c.corrupt_reads++;
        if (__atomic_fetch_add(&torn_reports, 1, __ATOMIC_SEQ_CST) <
            MAX_TORN_REPORTS) {
            describe("CORRUPT", extent, &r);
        }
        break;
    }
}

/*
 * The final round: every writer of every guest writes every extent once,
 * all in the same order, started together by a barrier.  Before each
 * extent the writers of this guest wait for each other (final_barrier), so
 * that their writes of that extent are issued together and are in flight
 * at the same time (with one vCPU: the first writer blocks in its pwrite,
 * the next one issues its own).  So the last writes of each extent come
 * from several writers at the same time, and the final image shows whether
 * they were serialised.
 */
static pthread_barrier_t final_barrier;

static void *final_round_main(void *opaque)
{
    Worker *w = opaque;

    for (uint32_t e = 0; e < cfg.extents; e++) {
        pthread_barrier_wait(&final_barrier);
        write_extent(w, e);
    }
    return NULL;
}

static void *worker_main(void *opaque)
{
    Worker *w = opaque;
    uint64_t done = 0;

    while (!__atomic_load_n(&stop_flag, __ATOMIC_RELAXED)) {
        if (cfg.ops && done >= cfg.ops) {
            break;
        }
        if (w->writer) {
            do_write(w);
        } else {
            do_read(w);
        }
        done++;
    }
    return NULL;
}

/* Control area: sector `guest` of it is that guest's ready record. */
static bool barrier(uint32_t phase, unsigned timeout_s)
{
    size_t len = (size_t)(cfg.guests + 1) * SECTOR_SIZE;
    uint8_t *buf;
    ReadyRecord *me;
    uint64_t deadline = now_ms() + (uint64_t)timeout_s * 1000;
    bool ok = false;

    if (posix_memalign((void **)&buf, 4096, len < 4096 ? 4096 : len)) {
        out("EXTLOCK-STRESS-ERROR out of memory");
        return false;
    }
    memset(buf, 0, SECTOR_SIZE);
    me = (ReadyRecord *)buf;
    memcpy(me->magic, READY_MAGIC, sizeof(READY_MAGIC));
    me->run_id = cfg.run_id;
    me->guest = cfg.guest;
    me->phase = phase;
    if (!io_full(true, buf, SECTOR_SIZE,
                 cfg.control_offset + (off_t)cfg.guest * SECTOR_SIZE)) {
        out("EXTLOCK-STRESS-ERROR barrier %" PRIu32 ": writing the ready "
            "record failed: %s", phase, strerror(first_errno));
        goto outfree;
    }
    for (;;) {
        uint32_t present = 0;

        if (!io_full(false, buf, len, cfg.control_offset)) {
            out("EXTLOCK-STRESS-ERROR barrier %" PRIu32 ": reading the "
                "control area failed: %s", phase, strerror(first_errno));
            goto outfree;
        }
        for (uint32_t g = 1; g <= cfg.guests; g++) {
            ReadyRecord *r = (ReadyRecord *)(buf + (size_t)g * SECTOR_SIZE);

            if (memcmp(r->magic, READY_MAGIC, sizeof(READY_MAGIC)) == 0 &&
                r->run_id == cfg.run_id && r->guest == g &&
                r->phase >= phase) {
                present++;
            }
        }
        if (present == cfg.guests) {
            ok = true;
            break;
        }
        if (now_ms() > deadline) {
            out("EXTLOCK-STRESS-ERROR barrier %" PRIu32 ": only %" PRIu32
                " of %" PRIu32 " guests arrived within %u s", phase,
                present, cfg.guests, timeout_s);
            break;
        }
        /* poll often: the guests' start skew is this interval */
        usleep(2 * 1000);
    }
outfree:
    free(buf);
    return ok;
}

/* After all guests have finished: read every extent once more. */
static bool final_check(uint64_t *mixed, uint64_t *unwritten,
                        uint64_t *corrupt)
{
    uint8_t *buf;
    ExtentCheck r;
    unsigned reported = 0;

    if (posix_memalign((void **)&buf, 4096, cfg.extent_size)) {
        return false;
    }
    for (uint32_t e = 0; e < cfg.extents; e++) {
        if (!io_full(false, buf, cfg.extent_size, extent_offset(e))) {
            free(buf);
            return false;
        }
        check_extent(buf, e, &r);
        if (r.kind == EXTENT_UNWRITTEN) {
            (*unwritten)++;
        } else if (r.kind == EXTENT_TORN) {
            (*mixed)++;
        } else if (r.kind == EXTENT_CORRUPT) {
            (*corrupt)++;
        }
        if (r.kind >= EXTENT_TORN && reported++ < MAX_TORN_REPORTS) {
            describe(r.kind == EXTENT_TORN ? "MIXED" : "FINAL-CORRUPT", e, &r);
        }
    }
    free(buf);
    return true;
}

/* The guest's block queue must pass an extent on as one request. */
static bool check_queue_limits(void)
{
    const char *base = strrchr(cfg.dev, '/');
    char path[PATH_MAX];
    unsigned long max_kb = 0, segs = 0;
    FILE *f;

    base = base ? base + 1 : cfg.dev;
    snprintf(path, sizeof(path), "/sys/block/%s/queue/max_sectors_kb", base);
    f = fopen(path, "r");
    if (f) {
        if (fscanf(f, "%lu", &max_kb) != 1) {
            max_kb = 0;
        }
        fclose(f);
    }
    snprintf(path, sizeof(path), "/sys/block/%s/queue/max_segments", base);
    f = fopen(path, "r");
    if (f) {
        if (fscanf(f, "%lu", &segs) != 1) {
            segs = 0;
        }
        fclose(f);
    }
    out("EXTLOCK-STRESS-QUEUE dev=%s max_sectors_kb=%lu max_segments=%lu",
        cfg.dev, max_kb, segs);
    if (max_kb && cfg.extent_size > (uint64_t)max_kb * 1024) {
        out("EXTLOCK-STRESS-ERROR extent of %" PRIu64 " bytes exceeds the "
            "queue's max_sectors_kb=%lu: each write would become several "
            "requests", cfg.extent_size, max_kb);
        return false;
    }
    if (segs && cfg.extent_size / 4096 > segs) {
        out("EXTLOCK-STRESS-ERROR extent of %" PRIu64 " bytes may need more "
            "than max_segments=%lu segments", cfg.extent_size, segs);
        return false;
    }
    return true;
}

static uint64_t parse_size(const char *name, const char *s)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno || end == s) {
        goto bad;
    }
    switch (*end) {
    case 'k': case 'K':
        v <<= 10;
        end++;
        break;
    case 'm': case 'M':
        v <<= 20;
        end++;
        break;
    case 'g': case 'G':
        v <<= 30;
        end++;
        break;
    }
    if (*end) {
        goto bad;
    }
    return v;
bad:
    fprintf(stderr, "extlock-stress: bad value for --%s: %s\n", name, s);
    exit(2);
}

static void usage(FILE *f)
{
    fprintf(f,
        "usage: extlock-stress --guest N [options]\n"
        "  --dev PATH             shared disk (default /dev/vda)\n"
        "  --guest N              this guest's id, 1..guests (required)\n"
        "  --guests N             guests sharing the disk (default 2)\n"
        "  --run-id N             identifies the run's stamps (default 0)\n"
        "  --writers N            writer threads (default 2)\n"
        "  --readers N            reader threads (default 2)\n"
        "  --seconds N            run time after the start barrier (20)\n"
        "  --ops N                operations per thread, 0: no limit (0)\n"
        "  --extent-size SIZE     bytes per extent, multiple of 4096 (256K)\n"
        "  --extents N            extents in the data area (16)\n"
        "  --data-offset SIZE     start of the data area (1M)\n"
        "  --control-offset SIZE  start of the control area (0)\n"
        "  --barrier-timeout N    seconds to wait for the others (120)\n"
        "  --seed N               random seed (1)\n"
        "  --final-round 0|1      all writers write all extents at the end (1)\n"
        "  --final-check 0|1      read all extents at the end (1)\n"
        "  --op-log 0|1           print every completed operation (0)\n");
}

static void parse_args(int argc, char **argv)
{
    static const struct option opts[] = {
        { "dev", required_argument, NULL, 'd' },
        { "guest", required_argument, NULL, 'g' },
        { "guests", required_argument, NULL, 'G' },
        { "run-id", required_argument, NULL, 'i' },
        { "writers", required_argument, NULL, 'w' },
        { "readers", required_argument, NULL, 'r' },
        { "seconds", required_argument, NULL, 's' },
        { "ops", required_argument, NULL, 'o' },
        { "extent-size", required_argument, NULL, 'e' },
        { "extents", required_argument, NULL, 'n' },
        { "data-offset", required_argument, NULL, 'D' },
        { "control-offset", required_argument, NULL, 'C' },
        { "barrier-timeout", required_argument, NULL, 'b' },
        { "seed", required_argument, NULL, 'S' },
        { "final-round", required_argument, NULL, 'F' },
        { "final-check", required_argument, NULL, 'f' },
        { "op-log", required_argument, NULL, 'L' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int c;

    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        const char *name = NULL;

        for (const struct option *o = opts; o->name; o++) {
            if (o->val == c) {
                name = o->name;
            }
        }
        switch (c) {
        case 'd':
            cfg.dev = optarg;
            break;
        case 'g':
            cfg.guest = parse_size(name, optarg);
            break;
        case 'G':
            cfg.guests = parse_size(name, optarg);
            break;
        case 'i':
            cfg.run_id = parse_size(name, optarg);
            break;
        case 'w':
            cfg.writers = parse_size(name, optarg);
            break;
        case 'r':
            cfg.readers = parse_size(name, optarg);
            break;
        case 's':
            cfg.seconds = parse_size(name, optarg);
            break;
        case 'o':
            cfg.ops = parse_size(name, optarg);
            break;
        case 'e':
            cfg.extent_size = parse_size(name, optarg);
            break;
        case 'n':
            cfg.extents = parse_size(name, optarg);
            break;
        case 'D':
            cfg.data_offset = parse_size(name, optarg);
            break;
        case 'C':
            cfg.control_offset = parse_size(name, optarg);
            break;
        case 'b':
            cfg.barrier_timeout = parse_size(name, optarg);
            break;
        case 'S':
            cfg.seed = parse_size(name, optarg);
            break;
        case 'F':
            cfg.final_round = parse_size(name, optarg) != 0;
            break;
        case 'f':
            cfg.final_check = parse_size(name, optarg) != 0;
            break;
        case 'L':
            cfg.op_log = parse_size(name, optarg) != 0;
            break;
        case 'h':
            usage(stdout);
            exit(0);
        default:
            usage(stderr);
            exit(2);
        }
    }
    if (optind != argc) {
        usage(stderr);
        exit(2);
    }
#define REQUIRE(cond, msg) \
    do { \
        if (!(cond)) { \
            out("EXTLOCK-STRESS-ERROR bad parameters: %s", msg); \
            exit(2); \
        } \
    } while (0)
    REQUIRE(cfg.guests >= 1 && cfg.guests <= MAX_GUESTS,
            "--guests must be 1..64");
    REQUIRE(cfg.guest >= 1 && cfg.guest <= cfg.guests,
            "--guest must be 1..guests");
    REQUIRE(cfg.writers + cfg.readers >= 1 &&
            cfg.writers + cfg.readers <= MAX_THREADS,
            "1..64 threads (--writers + --readers)");
    REQUIRE(cfg.seconds || cfg.ops, "--seconds or --ops must be set");
    REQUIRE(cfg.extent_size >= 4096 && cfg.extent_size % 4096 == 0 &&
            cfg.extent_size <= 64 * 1024 * 1024,
            "--extent-size must be a multiple of 4096, at most 64M");
    REQUIRE(cfg.extents >= 1, "--extents must be at least 1");
    REQUIRE(cfg.data_offset % SECTOR_SIZE == 0 &&
            cfg.control_offset % SECTOR_SIZE == 0,
            "offsets must be multiples of 512");
    REQUIRE(cfg.control_offset + (uint64_t)(cfg.guests + 1) * SECTOR_SIZE <=
            cfg.data_offset ||
            cfg.data_offset + cfg.extents * cfg.extent_size <=
            cfg.control_offset,
            "the control area overlaps the data area");
#undef REQUIRE
}

int main(int argc, char **argv)
{
    Worker workers[MAX_THREADS];
    unsigned nworkers;
    Counters sum = { 0 };
    uint64_t disk_size = 0, start_ms, elapsed_ms;
    uint64_t final_mixed = 0, final_unwritten = 0, final_corrupt = 0;
    bool final_done = false, ok = true;

    parse_args(argc, argv);

    disk_fd = open(cfg.dev, O_RDWR | O_DIRECT);
    if (disk_fd < 0) {
        out("EXTLOCK-STRESS-ERROR cannot open %s with O_DIRECT: %s", cfg.dev,
            strerror(errno));
        return 1;
    }
    if (ioctl(disk_fd, BLKGETSIZE64, &disk_size) < 0) {
        struct stat st;

        if (fstat(disk_fd, &st) == 0) {
            disk_size = st.st_size;
        }
    }
    if (cfg.data_offset + cfg.extents * cfg.extent_size > disk_size) {
        out("EXTLOCK-STRESS-ERROR %s has %" PRIu64 " bytes, the data area "
            "needs %" PRIu64, cfg.dev, disk_size,
            cfg.data_offset + cfg.extents * cfg.extent_size);
        return 2;
    }
    if (!check_queue_limits()) {
        return 2;
    }

    out("EXTLOCK-STRESS-READY guest=%" PRIu32 " guests=%" PRIu32
        " writers=%u readers=%u extent_size=%" PRIu64 " extents=%" PRIu32
        " seconds=%u ops=%" PRIu64, cfg.guest, cfg.guests, cfg.writers,
        cfg.readers, cfg.extent_size, cfg.extents, cfg.seconds, cfg.ops);
    if (!barrier(1, cfg.barrier_timeout)) {
        return 1;
    }

    nworkers = cfg.writers + cfg.readers;
    for (unsigned i = 0; i < nworkers; i++) {
        Worker *w = &workers[i];

        memset(w, 0, sizeof(*w));
        w->index = i;
        w->writer = i < cfg.writers;
        w->rng = splitmix64(cfg.seed ^ ((uint64_t)cfg.guest << 32) ^ i) | 1;
        if (posix_memalign((void **)&w->buf, 4096, cfg.extent_size)) {
            out("EXTLOCK-STRESS-ERROR out of memory");
            return 1;
        }
    }
    start_ms = now_ms();
    out("EXTLOCK-STRESS-START guest=%" PRIu32, cfg.guest);
    for (unsigned i = 0; i < nworkers; i++) {
        int err = pthread_create(&workers[i].thread, NULL, worker_main,
                                 &workers[i]);
        if (err) {
            out("EXTLOCK-STRESS-ERROR pthread_create: %s", strerror(err));
            return 1;
        }
    }
    if (cfg.seconds) {
        uint64_t end = start_ms + (uint64_t)cfg.seconds * 1000;

        while (now_ms() < end) {
            usleep(50 * 1000);
        }
        __atomic_store_n(&stop_flag, 1, __ATOMIC_SEQ_CST);
    }
    for (unsigned i = 0; i < nworkers; i++) {
        pthread_join(workers[i].thread, NULL);
    }
    elapsed_ms = now_ms() - start_ms;

    if (cfg.final_round && cfg.writers) {
        if (!barrier(2, cfg.barrier_timeout)) {
            return 1;
        }
        pthread_barrier_init(&final_barrier, NULL, cfg.writers);
        for (unsigned i = 0; i < cfg.writers; i++) {
            int err = pthread_create(&workers[i].thread, NULL,
                                     final_round_main, &workers[i]);
            if (err) {
                out("EXTLOCK-STRESS-ERROR pthread_create: %s", strerror(err));
                return 1;
            }
        }
        for (unsigned i = 0; i < cfg.writers; i++) {
            pthread_join(workers[i].thread, NULL);
        }
        pthread_barrier_destroy(&final_barrier);
    }

    for (unsigned i = 0; i < nworkers; i++) {
        Counters *c = &workers[i].c;

        sum.writes += c->writes;
        sum.write_errors += c->write_errors;
        sum.reads += c->reads;
        sum.read_errors += c->read_errors;
        sum.torn_reads += c->torn_reads;
        sum.corrupt_reads += c->corrupt_reads;
        sum.unwritten_reads += c->unwritten_reads;
        sum.foreign_reads += c->foreign_reads;
        sum.bytes += c->bytes;
        free(workers[i].buf);
    }
    if (cfg.op_log) {
        uint64_t dropped = 0;

        for (unsigned i = 0; i < nworkers; i++) {
            Worker *w = &workers[i];

            for (size_t k = 0; k < w->nops; k++) {
                OpRecord *r = &w->ops[k];

                if (r->write) {
                    out("EXTLOCK-STRESS-OPW %" PRIu64 " %" PRIu32 " %" PRIu64
                        " %" PRIu64, r->seq, r->extent, r->t0_us, r->t1_us);
                } else {
                    out("EXTLOCK-STRESS-OPR %" PRIu32 " %" PRIu32 " %" PRIu64
                        " %" PRIu64 " %" PRIu64, r->extent, r->guest, r->seq,
                        r->t0_us, r->t1_us);
                }
            }
            dropped += w->ops_dropped;
            free(w->ops);
        }
        out("EXTLOCK-STRESS-OPLOG-END dropped=%" PRIu64, dropped);
    }

    if (cfg.final_check) {
        if (barrier(3, cfg.barrier_timeout)) {
            final_done = final_check(&final_mixed, &final_unwritten,
                                     &final_corrupt);
            if (!final_done) {
                out("EXTLOCK-STRESS-ERROR final check: read failed: %s",
                    strerror(first_errno));
            }
        }
        ok = final_done;
    }
    if (sum.write_errors || sum.read_errors) {
        out("EXTLOCK-STRESS-ERROR %" PRIu64 " write and %" PRIu64
            " read errors, the first: %s", sum.write_errors, sum.read_errors,
            strerror(first_errno));
        ok = false;
    }

    out("EXTLOCK-STRESS-RESULT guest=%" PRIu32 " writes=%" PRIu64
        " write_errors=%" PRIu64 " reads=%" PRIu64 " read_errors=%" PRIu64
        " torn_reads=%" PRIu64 " corrupt_reads=%" PRIu64
        " unwritten_reads=%" PRIu64 " foreign_reads=%" PRIu64
        " max_seq=%" PRIu64 " bytes=%" PRIu64 " elapsed_ms=%" PRIu64
        " final_check=%d final_mixed=%" PRIu64 " final_unwritten=%" PRIu64
        " final_corrupt=%" PRIu64,
        cfg.guest, sum.writes, sum.write_errors, sum.reads, sum.read_errors,
        sum.torn_reads, sum.corrupt_reads, sum.unwritten_reads,
        sum.foreign_reads, __atomic_load_n(&next_seq, __ATOMIC_SEQ_CST),
        sum.bytes, elapsed_ms, final_done ? 1 : 0, final_mixed,
        final_unwritten, final_corrupt);
    close(disk_fd);
    return ok ? 0 : 1;
}
