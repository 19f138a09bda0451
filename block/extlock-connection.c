/*
 * extlock: the coordinator connection: socket, session, lease, reconnection
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Lease arithmetic (docs/design.rst): the client's lease deadline is the
 * time it SENT the last acknowledged renewal (or hello) plus the lease,
 * minus a safety margin.  The coordinator received that message later, and
 * re-grants a lapsed session's locks only after its own deadline plus its
 * fence margin, so the node has stopped starting I/O well before anyone
 * else can be granted its extents.
 */

#include "qemu/osdep.h"
#include "qapi/error.h"
#include "qapi/clone-visitor.h"
#include "qapi/qapi-visit-sockets.h"
#include "qapi/qapi-events-block-extlock.h"
#include "qemu/error-report.h"
#include "qemu/sockets.h"
#include "qemu/main-loop.h"
#include "block/aio-wait.h"
#include "block/block_int-io.h"
#include "qemu/thread.h"
#include "io/channel-socket.h"
#include "io/channel-tls.h"
#include "crypto/tlssession.h"
#include "extlock-connection.h"
#include "extlock-lease.h"
#include "extlock-compat.h"
#include "trace.h"

/* How long connecting waits for each coordinator answer */
#define EXTLOCK_ANSWER_TIMEOUT_MS 10000
/* How long close waits to hand "bye" to the kernel */
#define EXTLOCK_BYE_TIMEOUT_MS    1000
/* Reconnection backoff */
#define EXTLOCK_RECONNECT_MIN_MS  50
#define EXTLOCK_RECONNECT_MAX_MS  2000
/*
 * ... after a round over several addresses (HA replicas): an election
 * takes about one etcd lease TTL, so look again often
 */
#define EXTLOCK_RECONNECT_HA_MAX_MS 500
/* "not-leader" answers followed in one round, beyond one per address */
#define EXTLOCK_LEADER_HOPS       2

struct ExtlockConnection {
    AioContext *ctx;
    BlockDriverState *bs;       /* counts the reconnection in flight */
    const ExtlockConnOps *ops;
    void *opaque;
    SocketAddressList *addrs;   /* configured, in order */
    char **addresses;           /* socket_uri() of each, for QMP */
    SocketAddress *addr;        /* in use, or last used: tried first */
    char *address;              /* socket_uri(@addr), for messages and QMP */
    char *client_id;
    char *lock_space;
    char *node_name;            /* for events and messages */
    QCryptoTLSCreds *tls_creds; /* NULL: plain connection */
    char *tls_hostname;         /* name to verify; NULL: CA only */
    uint32_t lease_ms_wanted;   /* 0: the coordinator's default */
    bool stuck_io_exit;

    /* session */
    ExtlockConnState state;
    int fd;                     /* -1 while disconnected */
    QIOChannelSocket *sioc;     /* the socket, for its fd */
    QIOChannel *ioc;            /* all I/O: the TLS channel or @sioc */
    char *session;
    char *resume_secret;        /* from our welcome; resumes need it */
    uint64_t epoch;
    uint32_t lease_ms;
    int64_t lease_deadline_ns;  /* QEMU_CLOCK_REALTIME, margin included */
    uint32_t fence_margin_ms;   /* the coordinator's, from "welcome" */
    bool closing;
    uint64_t reconnects;
    uint64_t lease_losses;

    /* wire */
    ExtlockLineBuf in;
    GString *out;
    size_t out_done;            /* bytes of @out already written */
    /*
     * What the fd handler registered in @ctx asks for; re-registered
     * only when that changes, not for every message sent
     */
    bool handlers_set;
    bool handlers_write;
    /*
     * > 0 while extlock_conn_read() runs: messages sent meanwhile (the
     * unlocks of revoked locks, the requests it wakes) are written
     * together in one write at its end
     */
    unsigned batch;
    uint64_t next_id;
    GHashTable *pending;        /* id -> lock request awaiting its reply */
    /*
     * Plain messages (extlock_conn_send()) sent minus replies without a
     * pending request that came: 0 when none is due (an estimate, for
     * io_poll only)
     */
    uint64_t replies_due;
    int64_t poll_peek_ns;       /* get_clock() of io_poll's last recv() */

    /* one-shot timers */
    QEMUTimer *renew_timer;
    uint64_t renew_id;          /* outstanding renew, 0 if none */
    int64_t renew_sent_ns;
    QEMUTimer *lease_timer;     /* at the lease deadline */

    /* reconnection */
    Coroutine *reconnect_co;    /* counted in flight of @bs */
    QemuCoSleep reconnect_sleep;
    struct ExtlockConnJob *connect_job; /* the connect @reconnect_co awaits */
    unsigned paused;            /* drained sections: no reconnection */

    /* requests forwarded to the child (in-flight bound, on-stuck-io) */
    uint64_t io_in_flight;
    QEMUTimer *stuck_timer;     /* one-shot, at the in-flight bound */
    bool stuck_reported;
};

static void extlock_conn_set_handlers(ExtlockConnection *c);
static void extlock_conn_disconnect(ExtlockConnection *c, const char *why);

/* The in-flight bound (extlock_lease_stuck_bound()) of the lease now */
static int64_t extlock_stuck_bound(ExtlockConnection *c)
{
    return extlock_lease_stuck_bound(c->lease_deadline_ns, c->lease_ms,
                                     c->fence_margin_ms);
}

static void extlock_conn_stuck_cb(void *opaque)
{
    ExtlockConnection *c = opaque;
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    int64_t bound = extlock_stuck_bound(c);

    if (!c->io_in_flight) {
        return;
    }
    if (now < bound) {
        /* The lease was renewed meanwhile */
        timer_mod(c->stuck_timer, bound);
        return;
    }
    if (c->stuck_io_exit) {
        error_report("extlock: node '%s': %" PRIu64 " requests still in "
                     "flight %" PRId64 " ms after the lease deadline, and "
                     "the coordinator may re-grant their locks from %"
                     PRId64 " ms after it (monotonic %" PRId64 " ns): "
                     "exiting (on-stuck-io=exit)", c->node_name,
                     c->io_in_flight, (now - c->lease_deadline_ns) / SCALE_MS,
                     (extlock_lease_margin_ns(c->lease_ms) +
                      (int64_t)c->fence_margin_ms * SCALE_MS) / SCALE_MS,
                     now);
        _exit(1);
    }
    if (!c->stuck_reported) {
        c->stuck_reported = true;
        error_report("extlock: node '%s': %" PRIu64 " requests still in "
                     "flight %" PRId64 " ms after the lease deadline: other "
                     "hosts may be granted their extents while they run "
                     "(on-stuck-io=report)", c->node_name, c->io_in_flight,
                     (now - c->lease_deadline_ns) / SCALE_MS);
    }
}

void extlock_conn_io_start(ExtlockConnection *c)
{
    c->io_in_flight++;
    if (c->stuck_timer && !c->stuck_reported &&
        !timer_pending(c->stuck_timer)) {
        timer_mod(c->stuck_timer, extlock_stuck_bound(c));
    }
}

void extlock_conn_io_done(ExtlockConnection *c)
{
    assert(c->io_in_flight > 0);
    if (!--c->io_in_flight) {
        /* The timer may stay armed: it finds nothing in flight */
        c->stuck_reported = false;
    }
}

static uint64_t extlock_conn_new_id(ExtlockConnection *c)
{
    return c->next_id++;
}

bool extlock_conn_connected(ExtlockConnection *c)
{
    return c->fd >= 0;
}

ExtlockConnState extlock_conn_state(ExtlockConnection *c)
{
    return c->state;
}

const char *extlock_conn_address(ExtlockConnection *c)
{
    return c->address;
}

static int64_t extlock_conn_lease_remaining_ms(ExtlockConnection *c)
{
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    return (c->lease_deadline_ns - now) / SCALE_MS;
}

bool extlock_conn_lease_valid_at(ExtlockConnection *c, int64_t now)
{
    return c->state != EXTLOCK_CONN_LEASE_LOST && now < c->lease_deadline_ns;
}

void extlock_conn_get_info(ExtlockConnection *c, ExtlockConnInfo *info)
{
    info->address = c->address;
    info->addresses = (const char *const *)c->addresses;
    info->connected = c->fd >= 0;
    info->state = c->state;
    info->session = c->session;
    info->epoch = c->epoch;
    info->lease_ms = c->lease_ms;
    info->lease_remaining_ms = extlock_conn_lease_remaining_ms(c);
    info->reconnects = c->reconnects;
    info->lease_losses = c->lease_losses;
}

/*
 * ----------------------------------------------------------------------
 * Output
 */

static void extlock_conn_flush(ExtlockConnection *c)
{
    while (c->fd >= 0 && c->out_done < c->out->len) {
        Error *err = NULL;
        ssize_t n = qio_channel_write(c->ioc, c->out->str + c->out_done,
                                      c->out->len - c->out_done, &err);
        if (n == QIO_CHANNEL_ERR_BLOCK) {
            break;
        }
        if (n < 0) {
            extlock_conn_disconnect(c, error_get_pretty(err));
            error_free(err);
            return;
        }
        c->out_done += n;
    }
    if (c->out_done == c->out->len) {
        g_string_truncate(c->out, 0);
        c->out_done = 0;
    }
    extlock_conn_set_handlers(c);
}

static void extlock_conn_write_msg(ExtlockConnection *c, const ExtlockMsg *msg)
{
    if (c->fd < 0) {
        return;
    }
    extlock_msg_format(msg, c->out);
    if (!c->batch) {
        extlock_conn_flush(c);
    }
}

uint64_t extlock_conn_send(ExtlockConnection *c, ExtlockMsg *msg)
{
    if (c->fd < 0) {
        return 0;
    }
    msg->has_id = true;
    msg->id = extlock_conn_new_id(c);
    c->replies_due++;
    extlock_conn_write_msg(c, msg);
    return msg->id;
}

uint64_t extlock_conn_request(ExtlockConnection *c, ExtlockMsg *msg, void *req)
{
    uint64_t *key;

    if (c->fd < 0) {
        return 0;
    }
    msg->has_id = true;
    msg->id = extlock_conn_new_id(c);
    key = g_new(uint64_t, 1);
    *key = msg->id;
    g_hash_table_insert(c->pending, key, req);
    extlock_conn_write_msg(c, msg);
    return msg->id;
}

/*
 * ----------------------------------------------------------------------
 * Input
 */

static void extlock_conn_handle(ExtlockConnection *c, ExtlockMsg *msg)
{
    void *req = NULL;

    if (msg->has_id) {
        req = g_hash_table_lookup(c->pending, &msg->id);
        if (!req && msg->id != c->renew_id && c->replies_due) {
            c->replies_due--;
        }
    }

    switch (msg->type) {
    case EXTLOCK_MSG_RENEWED:
        if (msg->has_id && msg->id == c->renew_id) {
            c->lease_deadline_ns = extlock_lease_deadline(c->lease_ms,
                                                    c->renew_sent_ns);
            c->renew_id = 0;
            trace_extlock_client_renewed(c->node_name,
                                         extlock_conn_lease_remaining_ms(c));
        }
        if (c->ops->renewed) {
            c->ops->renewed(c->opaque, msg);
        }
        return;
    case EXTLOCK_MSG_UNLOCKED:
    case EXTLOCK_MSG_DOWNGRADED:
        return;
    case EXTLOCK_MSG_CANCELLED:
        c->ops->reply(c->opaque, msg);
        return;
    case EXTLOCK_MSG_SESSION_EXPIRED:
        extlock_conn_disconnect(c, msg->message ? msg->message
                                                  : "session expired");
        return;
    case EXTLOCK_MSG_ERROR:
        if (!req && !msg->has_id &&
            msg->error == EXTLOCK_ERR_RECLAIM_CONFLICT && msg->lock) {
            error_report("extlock: node '%s': coordinator %s dropped lock "
                         "%" PRIu64 ": %s", c->node_name, c->address,
                         msg->lock, msg->message ? msg->message : "");
            c->ops->lock_dropped(c->opaque, msg->lock);
            return;
        }
        if (!req && c->ops->reply(c->opaque, msg)) {
            return;
        }
        if (!req) {
            /* An error to an unlock, downgrade or renew */
            error_report("extlock: node '%s': coordinator %s: %s (%s)",
                         c->node_name, c->address,
                         msg->message ? msg->message : "",
                         extlock_error_code_name(msg->error));
            if (msg->has_id && msg->id == c->renew_id) {
                c->renew_id = 0;
            }
            return;
        }
        break;
    case EXTLOCK_MSG_WAITING:
    case EXTLOCK_MSG_GRANTED:
        break;
    case EXTLOCK_MSG_REVOKE:
        c->ops->revoke(c->opaque, msg);
        return;
    case EXTLOCK_MSG_FENCE_STATUS:
        if (!msg->lock_space || !strcmp(msg->lock_space, c->lock_space)) {
            trace_extlock_client_fence_status(c->node_name,
                msg->client_id ? msg->client_id : "",
                extlock_fence_result_name(msg->fence_result));
            c->ops->fence_status(c->opaque, msg);
        }
        return;
    case EXTLOCK_MSG_PR_UPDATE:
        c->ops->pr_update(c->opaque, msg);
        return;
    case EXTLOCK_MSG_PR_RESULT:
    case EXTLOCK_MSG_PR_STATUS:
    case EXTLOCK_MSG_PR_ACKED:
        if (!c->ops->reply(c->opaque, msg)) {
            trace_extlock_client_unexpected(c->node_name,
                                            extlock_msg_type_name(msg->type));
        }
        return;
    default:
        trace_extlock_client_unexpected(c->node_name,
                                        extlock_msg_type_name(msg->type));
        return;
    }
    if (!req) {
        return;                 /* a request we forgot (disconnected) */
    }
    if (msg->type != EXTLOCK_MSG_WAITING) {
        /* The final reply */
        g_hash_table_remove(c->pending, &msg->id);
    }
    c->ops->request_reply(c->opaque, req, msg);
}

/* Handle every complete line buffered; false if the connection broke */
static bool extlock_conn_parse(ExtlockConnection *c)
{
    for (;;) {
        const char *line;
        size_t len;
        ExtlockMsg msg;
        ExtlockProtoError err;
        ExtlockLineResult r = extlock_linebuf_next(&c->in, &line, &len);

        if (r == EXTLOCK_LINE_NONE) {
            return true;
        }
        if (r == EXTLOCK_LINE_TOO_LONG) {
            /* what the lines before queued (unlocks) leaves first */
            extlock_conn_flush(c);
            extlock_conn_disconnect(c, "oversized message from "
                                      "coordinator");
            return false;
        }
        extlock_msg_init(&msg, EXTLOCK_MSG_INVALID);
        if (!extlock_msg_parse(line, len, &msg, &err)) {
            g_autofree char *why =
                g_strdup_printf("bad message from coordinator: %s",
                                err.message);
            extlock_msg_clear(&msg);
            extlock_conn_flush(c);
            extlock_conn_disconnect(c, why);
            return false;
        }
        extlock_conn_handle(c, &msg);
        extlock_msg_clear(&msg);
        if (c->fd < 0) {
            return false;
        }
    }
}

static void extlock_conn_read(void *opaque)
{
    ExtlockConnection *c = opaque;
    char buf[16384];

    c->batch++;
    /*
     * Lines may be buffered already (read during the handshake).  With TLS,
     * GnuTLS hands out one record per read and may hold more records than
     * the socket shows as readable: read until the channel would block.
     */
    while (c->fd >= 0 && extlock_conn_parse(c)) {
        Error *err = NULL;
        ssize_t n = qio_channel_read(c->ioc, buf, sizeof(buf), &err);

        if (n == QIO_CHANNEL_ERR_BLOCK) {
            break;
        }
        if (n <= 0) {
            extlock_conn_disconnect(c, n == 0 ?
                                      "connection closed by coordinator" :
                                      error_get_pretty(err));
            error_free(err);
            break;
        }
        extlock_linebuf_append(&c->in, buf, n);
        if (!c->tls_creds && (size_t)n < sizeof(buf)) {
            /* The socket is drained: save a read that would block */
            extlock_conn_parse(c);
            break;
        }
    }

    /*
     * What handling the messages sent (the unlocks of revoked idle locks,
     * which other hosts wait for) leaves now, in one write, before the
     * woken requests run; also in a nested read (a woken request's
     * aio_poll), whose outer read may not come back soon.
     */
    extlock_conn_flush(c);
    /*
     * Requests are woken only now, so that what they do (send, unlock,
     * even lose the connection) cannot disturb the parsing above.  What
     * they send leaves in one write at the end.
     */
    c->ops->read_done(c->opaque);
    if (--c->batch == 0) {
        extlock_conn_flush(c);
    }
}

static void extlock_conn_write(void *opaque)
{
    extlock_conn_flush(opaque);
}

/*
 * io_poll: has the coordinator sent something?  Called over and over by
 * an AioContext that polls before it sleeps (an IOThread's poll-max-ns),
 * with its virtqueues' checks, so it must be cheap.  An error or EOF
 * counts as input so that extlock_conn_read() sees it.  With TLS the
 * socket's bytes may be a partial record that extlock_conn_read() cannot
 * consume, which would keep this true and the AioContext spinning: there
 * the fd handler alone reports input.
 *
 * Registering it matters even when nobody polls for the coordinator: a
 * fd handler without io_poll disables polling for its whole AioContext
 * (poll_disable_cnt), so an extlock node would turn off the polling of
 * the IOThread it runs in, for its virtqueues too.
 *
 * The recv(MSG_PEEK) is a syscall (1-2 us), and with epoll the handler
 * stays in the poll list for good: it peeks only when input is expected,
 * and at most once per EXTLOCK_POLL_PEEK_NS.  A revoke can arrive
 * whenever the node holds a lock (cached, or stale and given back
 * later); a grant, "waiting" or another answer only while a request,
 * renewal or plain message awaits its reply.  Anything else (a pr-update,
 * a fence status of another client) is rare and found by the fd handler.
 */
#define EXTLOCK_POLL_PEEK_NS 2000

static bool extlock_conn_expects_input(ExtlockConnection *c)
{
    return g_hash_table_size(c->pending) || c->renew_id || c->replies_due ||
           !c->ops->holds_locks || c->ops->holds_locks(c->opaque);
}

static bool extlock_conn_poll(void *opaque)
{
    ExtlockConnection *c = opaque;
    int64_t now;
    char byte;
    ssize_t n;

    if (c->fd < 0 || c->tls_creds || !extlock_conn_expects_input(c)) {
        return false;
    }
    now = get_clock();          /* vDSO clock_gettime(), no syscall */
    if (now - c->poll_peek_ns < EXTLOCK_POLL_PEEK_NS) {
        return false;
    }
    c->poll_peek_ns = now;
    n = recv(c->fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    return n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK &&
                      errno != EINTR);
}

static void extlock_conn_poll_ready(void *opaque)
{
    ExtlockConnection *c = opaque;

    trace_extlock_client_poll_ready(c->node_name, c->fd);
    extlock_conn_read(c);
}

static void extlock_conn_set_handlers(ExtlockConnection *c)
{
    bool want_write = c->out->len > c->out_done;

    if (c->fd < 0 || !c->ctx) {
        return;
    }
    /*
     * aio_set_fd_handler() replaces the handler node (allocation, epoll
     * update, RCU free): not for every message when nothing changes
     */
    if (c->handlers_set && c->handlers_write == want_write) {
        return;
    }
    c->handlers_set = true;
    c->handlers_write = want_write;
    extlock_set_fd_handler_poll(c->ctx, c->fd, extlock_conn_read,
                                c->out->len > c->out_done ?
                                extlock_conn_write : NULL,
                                extlock_conn_poll, extlock_conn_poll_ready,
                                c);
}

/*
 * ----------------------------------------------------------------------
 * Connecting: blocking, with timeouts; at open, or in a worker thread
 */

typedef struct ExtlockConnJob {
    /* in */
    SocketAddressList *addrs;   /* the configured list */
    SocketAddress *first;       /* the last leader: tried first */
    char *client_id;
    char *lock_space;
    char *old_session;          /* resume or reclaim this session */
    char *old_secret;           /* ... proving it is ours */
    uint32_t lease_ms;
    GArray *reclaims;           /* ExtlockReclaim: what we hold */
    uint64_t next_id;
    QCryptoTLSCreds *tls_creds;
    char *tls_hostname;

    /* out */
    SocketAddress *addr;        /* the coordinator that welcomed us */
    char *leader;               /* a follower's "not-leader": the leader */
    QIOChannelSocket *sioc;
    QIOChannel *ioc;            /* TLS over @sioc, or @sioc */
    bool got_bytes;             /* anything read from the coordinator */
    ExtlockLineBuf in;          /* bytes that came after the answers */
    char *session;
    char *resume_secret;        /* NULL: keep the one we had */
    uint64_t epoch;
    uint32_t granted_lease_ms;
    uint32_t fence_margin_ms;
    bool resumed;
    bool reclaim;
    GArray *server_locks;       /* ExtlockHeldLock, when resumed */
    int64_t hello_sent_ns;
    ExtlockErrorCode refused;   /* the coordinator's error to hello */
    Error *err;

    /* handoff between the connect thread and the waiting coroutine */
    QemuMutex lock;
    bool running;               /* the thread has not finished */
    bool abandoned;             /* nobody waits: the thread frees the job */
    Coroutine *wait_co;         /* woken when the thread finishes */
    int ret;
} ExtlockConnJob;

static ExtlockConnJob *extlock_job_new(ExtlockConnection *c)
{
    ExtlockConnJob *job = g_new0(ExtlockConnJob, 1);

    job->addrs = QAPI_CLONE(SocketAddressList, c->addrs);
    job->first = QAPI_CLONE(SocketAddress, c->addr);
    job->client_id = g_strdup(c->client_id);
    job->lock_space = g_strdup(c->lock_space);
    job->lease_ms = c->lease_ms_wanted;
    job->next_id = c->next_id;
    if (c->tls_creds) {
        job->tls_creds = c->tls_creds;
        object_ref(OBJECT(job->tls_creds));
        job->tls_hostname = g_strdup(c->tls_hostname);
    }
    extlock_linebuf_init_max(&job->in, EXTLOCK_MAX_REPLY_LINE);
    qemu_mutex_init(&job->lock);
    return job;
}

/* Forget what a failed attempt left, before trying the next address */
static void extlock_job_reset(ExtlockConnJob *job)
{
    if (job->ioc) {
        object_unref(OBJECT(job->ioc));
        job->ioc = NULL;
    }
    if (job->sioc) {
        object_unref(OBJECT(job->sioc));
        job->sioc = NULL;
    }
    job->got_bytes = false;
    extlock_linebuf_destroy(&job->in);
    extlock_linebuf_init_max(&job->in, EXTLOCK_MAX_REPLY_LINE);
    g_free(job->session);
    job->session = NULL;
    g_free(job->resume_secret);
    job->resume_secret = NULL;
    if (job->server_locks) {
        g_array_unref(job->server_locks);
        job->server_locks = NULL;
    }
    job->resumed = job->reclaim = false;
    job->refused = EXTLOCK_ERR_NONE;
    g_free(job->leader);
    job->leader = NULL;
}

static void extlock_job_free(ExtlockConnJob *job)
{
    qapi_free_SocketAddressList(job->addrs);
    qapi_free_SocketAddress(job->first);
    qapi_free_SocketAddress(job->addr);
    g_free(job->leader);
    g_free(job->client_id);
    g_free(job->lock_space);
    g_free(job->old_session);
    g_free(job->old_secret);
    if (job->reclaims) {
        g_array_unref(job->reclaims);
    }
    if (job->ioc) {
        object_unref(OBJECT(job->ioc));
    }
    if (job->sioc) {
        object_unref(OBJECT(job->sioc));
    }
    if (job->tls_creds) {
        object_unref(OBJECT(job->tls_creds));
    }
    g_free(job->tls_hostname);
    extlock_linebuf_destroy(&job->in);
    g_free(job->session);
    g_free(job->resume_secret);
    if (job->server_locks) {
        g_array_unref(job->server_locks);
    }
    error_free(job->err);
    qemu_mutex_destroy(&job->lock);
    g_free(job);
}

/*
 * The job's socket is non-blocking, so that every wait has a deadline:
 * wait until it is ready for @cond.  False (with @errp set) on timeout;
 * @what says what the coordinator did not do in time.
 */
static bool extlock_job_wait(ExtlockConnJob *job, GIOCondition cond,
                              int64_t deadline, const char *what,
                              Error **errp)
{
    GPollFD pfd = { .fd = job->sioc->fd, .events = cond };
    int64_t left = (deadline - g_get_monotonic_time()) / 1000;

    if (left <= 0) {
        error_setg(errp, "coordinator did not %s within %d ms", what,
                   EXTLOCK_ANSWER_TIMEOUT_MS);
        return false;
    }
    if (g_poll(&pfd, 1, left) < 0 && errno != EINTR) {
        error_setg_errno(errp, errno, "poll");
        return false;
    }
    return true;
}

static bool extlock_job_write_all(ExtlockConnJob *job, const char *buf,
                                   size_t len, Error **errp)
{
    int64_t deadline = g_get_monotonic_time() +
                       EXTLOCK_ANSWER_TIMEOUT_MS * 1000LL;

    while (len) {
        ssize_t n = qio_channel_write(job->ioc, buf, len, errp);

        if (n == QIO_CHANNEL_ERR_BLOCK) {
            if (!extlock_job_wait(job, G_IO_OUT, deadline,
                                   "take our message", errp)) {
                return false;
            }
            continue;
        }
        if (n < 0) {
            return false;
        }
        buf += n;
        len -= n;
    }
    return true;
}

static bool extlock_job_send(ExtlockConnJob *job, ExtlockMsg *msg,
                              Error **errp)
{
    g_autoptr(GString) out = g_string_new(NULL);

    msg->has_id = true;
    msg->id = job->next_id++;
    extlock_msg_format(msg, out);
    if (!extlock_job_write_all(job, out->str, out->len, errp)) {
        error_prepend(errp, "write to coordinator: ");
        return false;
    }
    return true;
}

/* Read the final answer to request @id (skipping anything else) */
static bool extlock_job_answer(ExtlockConnJob *job, uint64_t id,
                                ExtlockMsg *msg, Error **errp)
{
    int64_t deadline = g_get_monotonic_time() +
                       EXTLOCK_ANSWER_TIMEOUT_MS * 1000LL;

    for (;;) {
        const char *line;
        size_t len;
        ExtlockProtoError err;
        ExtlockLineResult r = extlock_linebuf_next(&job->in, &line, &len);
        char buf[4096];
        ssize_t n;

        if (r == EXTLOCK_LINE_OK) {
            extlock_msg_clear(msg);
            if (!extlock_msg_parse(line, len, msg, &err)) {
                error_setg(errp, "bad message from coordinator: %s",
                           err.message);
                return false;
            }
            if (msg->has_id && msg->id == id &&
                msg->type != EXTLOCK_MSG_WAITING) {
                return true;
            }
            continue;
        }
        if (r == EXTLOCK_LINE_TOO_LONG) {
            error_setg(errp, "oversized message from coordinator");
            return false;
        }
        /* Read first: GnuTLS may hold records the socket does not show */
        n = qio_channel_read(job->ioc, buf, sizeof(buf), errp);
        if (n == QIO_CHANNEL_ERR_BLOCK) {
            if (!extlock_job_wait(job, G_IO_IN, deadline, "answer", errp)) {
                return false;
            }
            continue;
        }
        if (n == 0) {
            error_setg(errp, "coordinator closed the connection");
            return false;
        }
        if (n < 0) {
            error_prepend(errp, "read from coordinator: ");
            return false;
        }
        if (!job->got_bytes && !job->tls_creds &&
            (buf[0] == 0x15 || buf[0] == 0x16)) {
            /* A TLS alert or handshake record, not a JSON line */
            error_setg(errp, "the coordinator speaks TLS; this node has no "
                       "tls-creds");
            return false;
        }
        job->got_bytes = true;
        extlock_linebuf_append(&job->in, buf, n);
    }
}

static bool extlock_job_hello(ExtlockConnJob *job, Error **errp)
{
    ExtlockMsg hello, reply;
    bool ok = false;

    extlock_msg_init(&hello, EXTLOCK_MSG_HELLO);
    hello.version = EXTLOCK_PROTOCOL_VERSION;
    hello.client_id = g_strdup(job->client_id);
    hello.lock_space = g_strdup(job->lock_space);
    hello.lease_ms = job->lease_ms;
    hello.session = g_strdup(job->old_session);
    hello.resume_secret = job->old_session ? g_strdup(job->old_secret)
                                           : NULL;
    job->hello_sent_ns = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    extlock_msg_init(&reply, EXTLOCK_MSG_INVALID);
    if (!extlock_job_send(job, &hello, errp) ||
        !extlock_job_answer(job, hello.id, &reply, errp)) {
        goto out;
    }
    if (reply.type == EXTLOCK_MSG_ERROR) {
        job->refused = reply.error;
        if (reply.error == EXTLOCK_ERR_NOT_LEADER && reply.leader) {
            job->leader = g_strdup(reply.leader);
        }
        error_setg(errp, "coordinator refused the session: %s (%s)",
                   reply.message ? reply.message : "",
                   extlock_error_code_name(reply.error));
        goto out;
    }
    if (reply.type != EXTLOCK_MSG_WELCOME ||
        reply.version != EXTLOCK_PROTOCOL_VERSION || !reply.session) {
        error_setg(errp, "unexpected answer to hello from coordinator: %s",
                   extlock_msg_type_name(reply.type));
        goto out;
    }
    job->session = g_strdup(reply.session);
    /* Only the owner's welcome carries it; after a restart it is empty */
    if (reply.resume_secret && reply.resume_secret[0]) {
        job->resume_secret = g_strdup(reply.resume_secret);
    }
    job->epoch = reply.epoch;
    job->granted_lease_ms = reply.lease_ms;
    /* Old coordinators do not say: assume none */
    job->fence_margin_ms = reply.has_fence_margin ? reply.fence_margin_ms : 0;
    job->resumed = reply.resumed;
    job->reclaim = reply.reclaim;
    /*
     * Take the array over: extlock_msg_clear() uses g_array_free(), which
     * on an array with another reference empties it (a g_array_ref()
     * here used to make every resumed session look as if it held none of
     * its locks, so they were dropped without being given back).
     */
    job->server_locks = reply.locks;
    reply.locks = NULL;
    ok = true;
out:
    extlock_msg_clear(&hello);
    extlock_msg_clear(&reply);
    return ok;
}

/* Re-assert our locks with their tokens after a coordinator restart */
static bool extlock_job_reclaim(ExtlockConnJob *job, Error **errp)
{
    ExtlockMsg msg, reply;
    bool ok = false;

    extlock_msg_init(&msg, EXTLOCK_MSG_INVALID);
    extlock_msg_init(&reply, EXTLOCK_MSG_INVALID);
    for (guint i = 0; job->reclaims && i < job->reclaims->len; i++) {
        ExtlockReclaim *r = &g_array_index(job->reclaims, ExtlockReclaim, i);

        extlock_msg_init(&msg, EXTLOCK_MSG_RECLAIM);
        msg.has_extent = true;
        msg.offset = r->offset;
        msg.length = r->length;
        msg.mode = r->mode;
        msg.token = r->token;
        if (!extlock_job_send(job, &msg, errp) ||
            !extlock_job_answer(job, msg.id, &reply, errp)) {
            goto out;
        }
        r->ok = reply.type == EXTLOCK_MSG_GRANTED;
        r->new_id = reply.lock;
        extlock_msg_clear(&msg);
    }
    extlock_msg_init(&msg, EXTLOCK_MSG_RECLAIM_DONE);
    if (!extlock_job_send(job, &msg, errp) ||
        !extlock_job_answer(job, msg.id, &reply, errp)) {
        goto out;
    }
    ok = true;
out:
    extlock_msg_clear(&msg);
    extlock_msg_clear(&reply);
    return ok;
}

/*
 * TLS client handshake on the job's non-blocking socket, bounded like the
 * answers.  Driven here rather than by qio_channel_tls_handshake(), which
 * would wait for a slow coordinator in a GMainContext watch.
 */
static bool extlock_job_tls(ExtlockConnJob *job, const char *hostname,
                            Error **errp)
{
    ERRP_GUARD();
    int64_t deadline = g_get_monotonic_time() +
                       EXTLOCK_ANSWER_TIMEOUT_MS * 1000LL;
    QIOChannelTLS *tioc;

    tioc = qio_channel_tls_new_client(QIO_CHANNEL(job->sioc), job->tls_creds,
                                      hostname, errp);
    if (!tioc) {
        error_prepend(errp, "TLS: ");
        return false;
    }
    qio_channel_set_name(QIO_CHANNEL(tioc), "extlock-coordinator-tls");
    object_unref(OBJECT(job->ioc));
    job->ioc = QIO_CHANNEL(tioc);

    for (;;) {
        int status = extlock_tls_handshake_step(tioc->session, errp);

        if (status < 0) {
            /* GnuTLS does not say which alert: name the usual causes */
            error_append_hint(errp, "The coordinator may refuse these "
                              "credentials, or not speak TLS there.\n");
            return false;
        }
        if (status == QCRYPTO_TLS_HANDSHAKE_COMPLETE) {
            break;
        }
        if (!extlock_job_wait(job, status == QCRYPTO_TLS_HANDSHAKE_SENDING ?
                               G_IO_OUT : G_IO_IN, deadline,
                               "complete the TLS handshake", errp)) {
            return false;
        }
    }
    /* x509: the CA, validity, and the name */
    if (qcrypto_tls_session_check_credentials(tioc->session, errp) < 0) {
        error_prepend(errp, "TLS: the coordinator's certificate: ");
        return false;
    }
    return true;
}

/* Connect to @addr, say hello (and reclaim): 0, or -1 with @errp set */
static int extlock_job_try(ExtlockConnJob *job, SocketAddress *addr,
                           Error **errp)
{
    g_autofree char *address = socket_uri(addr);

    job->sioc = qio_channel_socket_new();
    qio_channel_set_name(QIO_CHANNEL(job->sioc), "extlock-coordinator");
    if (qio_channel_socket_connect_sync(job->sioc, addr, errp) < 0) {
        error_prepend(errp, "Failed to connect to extlock coordinator at "
                      "%s: ", address);
        return -1;
    }
    if (addr->type == SOCKET_ADDRESS_TYPE_INET) {
        socket_set_nodelay(job->sioc->fd);
    }
    if (qio_channel_set_blocking(QIO_CHANNEL(job->sioc), false, errp) < 0) {
        return -1;
    }
    job->ioc = QIO_CHANNEL(job->sioc);
    object_ref(OBJECT(job->ioc));
    if (job->tls_creds) {
        /* No name given: each inet address's own host, as nbd */
        const char *hostname = job->tls_hostname;

        if (!hostname && addr->type == SOCKET_ADDRESS_TYPE_INET) {
            hostname = addr->u.inet.host;
        }
        if (!extlock_job_tls(job, hostname, errp)) {
            error_prepend(errp, "extlock coordinator at %s: ", address);
            return -1;
        }
    }
    if (!extlock_job_hello(job, errp) && job->old_session &&
        job->refused == EXTLOCK_ERR_NOT_FOUND) {
        /* The old session is gone for good: start a new one */
        error_free(*errp);
        *errp = NULL;
        g_free(job->old_session);
        job->old_session = NULL;
        g_free(job->old_secret);
        job->old_secret = NULL;
        job->refused = EXTLOCK_ERR_NONE;
        extlock_job_hello(job, errp);
    }
    if (*errp || (job->reclaim && !extlock_job_reclaim(job, errp))) {
        error_prepend(errp, "extlock coordinator at %s: ", address);
        return -1;
    }
    return 0;
}

/* Did the coordinator refuse the session for a reason of ours? */
static bool extlock_job_refused(ExtlockConnJob *job)
{
    return job->refused != EXTLOCK_ERR_NONE &&
           job->refused != EXTLOCK_ERR_NOT_LEADER &&
           job->refused != EXTLOCK_ERR_INTERNAL;
}

static bool extlock_addr_listed(GPtrArray *order, const char *uri)
{
    for (guint i = 0; i < order->len; i++) {
        g_autofree char *u = socket_uri(g_ptr_array_index(order, i));

        if (!strcmp(u, uri)) {
            return true;
        }
    }
    return false;
}

/*
 * The leader named by the follower at @follower, or NULL if it is not an
 * address of the same kind (an inet follower names an inet leader, a UNIX
 * one a UNIX leader).  The name comes from the coordinator, which is not
 * trusted with more than locks: "fd:N" would make socket_connect() take
 * over (or close, if it is no socket) whatever file descriptor N of this
 * process is, and "vsock:" reaches another kind of peer altogether.
 */
static SocketAddress *extlock_leader_parse(SocketAddress *follower,
                                           const char *name)
{
    SocketAddress *leader = socket_parse(name, NULL);

    if (leader && (leader->type != follower->type ||
                   (leader->type != SOCKET_ADDRESS_TYPE_INET &&
                    leader->type != SOCKET_ADDRESS_TYPE_UNIX))) {
        g_autofree char *uri = socket_uri(follower);

        trace_extlock_client_leader_refused(uri, name);
        qapi_free_SocketAddress(leader);
        leader = NULL;
    }
    return leader;
}

/*
 * One round: the last leader, then every configured address in order,
 * each at most once; a follower's "not-leader" answer naming the leader
 * puts the leader next (a bounded number of times).  A dead member costs
 * a refused connect (or the answer timeout if it hangs).
 */
static int extlock_job_run(void *opaque)
{
    ExtlockConnJob *job = opaque;
    g_autoptr(GPtrArray) order =
        g_ptr_array_new_with_free_func((GDestroyNotify)
                                       qapi_free_SocketAddress);
    g_autoptr(GString) tried = g_string_new(NULL);
    unsigned hops = 0;
    guint n_listed;

    g_ptr_array_add(order, QAPI_CLONE(SocketAddress, job->first));
    for (SocketAddressList *l = job->addrs; l; l = l->next) {
        g_autofree char *uri = socket_uri(l->value);

        if (!extlock_addr_listed(order, uri)) {
            g_ptr_array_add(order, QAPI_CLONE(SocketAddress, l->value));
        }
    }
    n_listed = order->len;
    for (guint i = 0; i < order->len; i++) {
        SocketAddress *addr = g_ptr_array_index(order, i);
        g_autofree char *uri = socket_uri(addr);
        SocketAddress *leader = NULL;

        if (job->err) {
            /* The previous attempt's, for the message if all fail */
            error_free(job->err);
            job->err = NULL;
        }
        extlock_job_reset(job);
        if (extlock_job_try(job, addr, &job->err) == 0) {
            job->addr = QAPI_CLONE(SocketAddress, addr);
            return 0;
        }
        g_string_append_printf(tried, "%s%s", tried->len ? ", " : "", uri);
        trace_extlock_client_connect_failed(uri,
                                            error_get_pretty(job->err));
        if (extlock_job_refused(job)) {
            /* The coordinator said no: another replica would too */
            return -1;
        }
        if (job->leader && strcmp(job->leader, uri) &&
            hops < n_listed + EXTLOCK_LEADER_HOPS) {
            leader = extlock_leader_parse(addr, job->leader);
        }
        if (leader) {
            hops++;
            trace_extlock_client_follow_leader(uri, job->leader);
            g_ptr_array_insert(order, i + 1, leader);
        }
    }
    if (order->len > 1) {
        error_append_hint(&job->err, "No leader among the extlock "
                          "coordinators tried: %s\n", tried->str);
    }
    return -1;
}

/*
 * ----------------------------------------------------------------------
 * Session state
 */

static void extlock_conn_renew(void *opaque)
{
    ExtlockConnection *c = opaque;
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);

    if (c->fd < 0) {
        return;
    }
    if (!c->renew_id) {
        ExtlockMsg msg;
        extlock_msg_init(&msg, EXTLOCK_MSG_RENEW);
        msg.has_id = true;
        msg.id = c->renew_id = extlock_conn_new_id(c);
        c->renew_sent_ns = now;
        extlock_conn_write_msg(c, &msg);
        extlock_msg_clear(&msg);
    }
    /* Three renewals per lease: one slow reply does not lose the lease */
    if (c->renew_timer) {
        timer_mod(c->renew_timer, extlock_lease_renew_at(c->lease_ms, now));
    }
}

static void extlock_conn_lease_lost(ExtlockConnection *c, const char *reason)
{
    if (c->state == EXTLOCK_CONN_LEASE_LOST) {
        return;
    }
    error_report("extlock: node '%s': lease lost: %s; no I/O until the "
                 "session is back", c->node_name, reason);
    trace_extlock_client_lease_lost(c->node_name, reason);
    c->state = EXTLOCK_CONN_LEASE_LOST;
    c->lease_losses++;
    qapi_event_send_extent_lock_lease_lost(c->node_name, reason);
    c->ops->lease_lost(c->opaque);
    c->ops->state_changed(c->opaque);
    if (c->fd >= 0) {
        /* The coordinator stopped answering: start a fresh session */
        extlock_conn_disconnect(c, "lease expired");
    }
}

/* One-shot at the lease deadline; a renewal moves the deadline on */
static void extlock_conn_lease_timer_cb(void *opaque)
{
    ExtlockConnection *c = opaque;
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);

    if (c->state == EXTLOCK_CONN_LEASE_LOST) {
        return;
    }
    if (now < c->lease_deadline_ns) {
        timer_mod(c->lease_timer, c->lease_deadline_ns);
        return;
    }
    extlock_conn_lease_lost(c, c->fd >= 0 ?
                              "no lease renewal acknowledged in time" :
                              "coordinator unreachable for the lease");
}

static void extlock_conn_arm_lease_timer(ExtlockConnection *c)
{
    if (c->lease_timer && c->state != EXTLOCK_CONN_LEASE_LOST) {
        timer_mod(c->lease_timer, c->lease_deadline_ns);
    }
}

static void coroutine_fn extlock_reconnect_co(void *opaque);
static void extlock_conn_reconnect_start(ExtlockConnection *c);

/* The connection broke: no reply will come to the requests pending */
static void extlock_conn_fail_pending(ExtlockConnection *c)
{
    g_autoptr(GHashTable) pending = c->pending;
    GHashTableIter it;
    gpointer value;

    c->pending = g_hash_table_new_full(g_int64_hash, g_int64_equal,
                                       g_free, NULL);
    g_hash_table_iter_init(&it, pending);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        c->ops->request_lost(c->opaque, value);
    }
}

static void extlock_conn_disconnect(ExtlockConnection *c, const char *why)
{
    if (c->fd < 0) {
        return;
    }
    warn_report("extlock: node '%s': lost coordinator %s: %s",
                 c->node_name, c->address, why);
    trace_extlock_client_disconnected(c->node_name, why);
    qapi_event_send_extent_lock_coordinator_lost(c->node_name, c->address,
                                                 why);
    if (c->ctx) {
        extlock_set_fd_handler(c->ctx, c->fd, NULL, NULL, NULL);
    }
    c->handlers_set = false;
    c->fd = -1;
    qio_channel_close(c->ioc, NULL);
    object_unref(OBJECT(c->ioc));
    c->ioc = NULL;
    object_unref(OBJECT(c->sioc));
    c->sioc = NULL;
    g_string_truncate(c->out, 0);
    c->out_done = 0;
    extlock_linebuf_destroy(&c->in);
    extlock_linebuf_init_max(&c->in, EXTLOCK_MAX_REPLY_LINE);
    if (c->renew_timer) {
        timer_del(c->renew_timer);
    }
    c->renew_id = 0;
    c->replies_due = 0;
    if (c->state != EXTLOCK_CONN_LEASE_LOST) {
        c->state = EXTLOCK_CONN_RECONNECTING;
    }
    /* Requests waiting at the coordinator ask again once reconnected */
    extlock_conn_fail_pending(c);
    extlock_conn_reconnect_start(c);
}

/* Take over the connection a job has established */
static void extlock_conn_adopt(ExtlockConnection *c, ExtlockConnJob *job)
{
    bool was_lost = c->state == EXTLOCK_CONN_LEASE_LOST;
    bool first = !c->session;
    bool same_session = c->session && !strcmp(c->session, job->session);
    uint64_t reclaimed = 0, lost = 0;

    if (job->addr) {
        qapi_free_SocketAddress(c->addr);
        c->addr = g_steal_pointer(&job->addr);
        g_free(c->address);
        c->address = socket_uri(c->addr);
    }
    c->sioc = job->sioc;
    job->sioc = NULL;
    c->ioc = job->ioc;
    job->ioc = NULL;
    c->fd = c->sioc->fd;
    extlock_linebuf_destroy(&c->in);
    c->in = job->in;
    extlock_linebuf_init_max(&job->in, EXTLOCK_MAX_REPLY_LINE);
    g_free(c->session);
    c->session = g_strdup(job->session);
    if (job->resume_secret) {
        g_free(c->resume_secret);
        c->resume_secret = g_strdup(job->resume_secret);
    } else if (!same_session) {
        g_free(c->resume_secret);
        c->resume_secret = NULL;
    }
    c->epoch = job->epoch;
    c->lease_ms = job->granted_lease_ms;
    c->fence_margin_ms = job->fence_margin_ms;
    c->next_id = MAX(c->next_id, job->next_id);
    c->lease_deadline_ns = extlock_lease_deadline(c->lease_ms,
                                                  job->hello_sent_ns);
    c->state = EXTLOCK_CONN_ACTIVE;

    if (!first) {
        if (job->resumed && same_session) {
            c->ops->session_resumed(c->opaque, job->server_locks);
        } else if (job->reclaim && same_session) {
            for (guint i = 0; job->reclaims && i < job->reclaims->len; i++) {
                reclaimed += g_array_index(job->reclaims, ExtlockReclaim,
                                           i).ok;
            }
            c->ops->session_reclaimed(c->opaque, job->reclaims);
        } else {
            lost = c->ops->session_new(c->opaque);
        }
    }
    trace_extlock_client_connected(c->node_name, c->address, c->session,
                                   c->epoch, c->lease_ms, job->resumed,
                                   reclaimed, lost);
    if (!first) {
        c->reconnects++;
        info_report("extlock: node '%s': reconnected to coordinator %s, "
                     "session %s%s, %" PRIu64 " locks reclaimed, %" PRIu64
                     " lost", c->node_name, c->address, c->session,
                     job->resumed ? " (resumed)" : "", reclaimed, lost);
        qapi_event_send_extent_lock_coordinator_restored(
            c->node_name, c->address, c->session, job->resumed && same_session,
            reclaimed, lost);
        if (was_lost) {
            qapi_event_send_extent_lock_lease_restored(c->node_name,
                                                       c->session);
        }
    }
    if (c->ctx) {
        extlock_conn_set_handlers(c);
        timer_mod(c->renew_timer,
                  extlock_lease_renew_at(c->lease_ms,
                      qemu_clock_get_ns(QEMU_CLOCK_REALTIME)));
        extlock_conn_arm_lease_timer(c);
        c->ops->state_changed(c->opaque);
        /* Replies may already be buffered */
        extlock_conn_read(c);
    }
}

/*
 * The connect thread.  Detached: nobody joins it.  If the coroutine that
 * started it gave up waiting (drain, close, detach), the thread frees the
 * job itself, so neither close nor a drain ever waits for a connect.
 */
static void *extlock_job_thread(void *opaque)
{
    ExtlockConnJob *job = opaque;
    int ret = extlock_job_run(job);
    Coroutine *co;
    bool abandoned;

    qemu_mutex_lock(&job->lock);
    job->ret = ret;
    job->running = false;
    abandoned = job->abandoned;
    co = job->wait_co;
    job->wait_co = NULL;
    qemu_mutex_unlock(&job->lock);
    if (abandoned) {
        if (ret == 0 && !job->old_session) {
            /*
             * A new session nobody wants (it holds nothing): end it now,
             * not at its lease.  A resumed or reclaimed one is left to
             * the next attempt, which resumes it again.
             */
            ExtlockMsg bye;

            extlock_msg_init(&bye, EXTLOCK_MSG_BYE);
            extlock_job_send(job, &bye, NULL);
            extlock_msg_clear(&bye);
        }
        extlock_job_free(job);
    } else if (co) {
        aio_co_wake(co);
    }
    return NULL;
}

/*
 * Run @job in a detached thread and wait for it.  -ECANCELED if the wait
 * was cut (extlock_conn_pause()): then the job belongs to the
 * thread, which frees it.
 */
static int coroutine_fn extlock_job_run_co(ExtlockConnection *c,
                                            ExtlockConnJob *job)
{
    QemuThread thread;
    bool abandoned = false;

    job->running = true;
    qemu_thread_create(&thread, "extlock-connect", extlock_job_thread, job,
                       QEMU_THREAD_DETACHED);
    qemu_mutex_lock(&job->lock);
    if (job->running) {
        job->wait_co = qemu_coroutine_self();
        c->connect_job = job;
        qemu_mutex_unlock(&job->lock);
        qemu_coroutine_yield();
        qemu_mutex_lock(&job->lock);
        c->connect_job = NULL;
        if (job->running) {
            job->abandoned = abandoned = true;
        }
    }
    qemu_mutex_unlock(&job->lock);
    return abandoned ? -ECANCELED : job->ret;
}

/* Should the reconnection stop (close) or pause (drain, detach)? */
static bool extlock_reconnect_stop(ExtlockConnection *c)
{
    return c->closing || c->paused || !c->ctx;
}

/*
 * Reconnection, counted in flight of the node so that drains and
 * AioContext changes wait for it, and cut short by them: a drain wakes it
 * from its backoff sleep or from waiting for a connect (which it leaves
 * to its thread), and it ends.  The end of the drain starts it again.
 */
static void coroutine_fn extlock_reconnect_co(void *opaque)
{
    ExtlockConnection *c = opaque;
    int64_t backoff_ms = EXTLOCK_RECONNECT_MIN_MS;
    g_autofree char *last_error = NULL;

    while (!extlock_reconnect_stop(c) && c->fd < 0) {
        ExtlockConnJob *job = extlock_job_new(c);
        int ret;

        job->old_session = g_strdup(c->session);
        job->old_secret = g_strdup(c->resume_secret);
        job->reclaims = c->ops->held_locks(c->opaque);
        ret = extlock_job_run_co(c, job);
        if (ret == -ECANCELED) {
            trace_extlock_client_reconnect_paused(c->node_name);
            break;
        }
        if (ret == 0 && !c->closing) {
            extlock_conn_adopt(c, job);
            extlock_job_free(job);
            break;
        }
        if (job->err) {
            const char *msg = error_get_pretty(job->err);
            trace_extlock_client_reconnect_failed(c->node_name, msg);
            if (!last_error || strcmp(last_error, msg)) {
                /* Say it once, not every backoff step */
                warn_report("extlock: node '%s': reconnecting: %s",
                             c->node_name, msg);
                g_free(last_error);
                last_error = g_strdup(msg);
            }
        }
        extlock_job_free(job);
        if (extlock_reconnect_stop(c)) {
            break;
        }
        qemu_co_sleep_ns_wakeable(&c->reconnect_sleep, QEMU_CLOCK_REALTIME,
                                  backoff_ms * SCALE_MS);
        backoff_ms = extlock_backoff_next_ms(backoff_ms,
                                             EXTLOCK_RECONNECT_MIN_MS,
                                             c->addrs->next ?
                                             EXTLOCK_RECONNECT_HA_MAX_MS :
                                             EXTLOCK_RECONNECT_MAX_MS);
    }
    c->reconnect_co = NULL;
    if (c->bs) {
        bdrv_dec_in_flight(c->bs);
    }
    aio_wait_kick();
}

/* Start reconnecting if the connection is down and nothing stops it */
static void extlock_conn_reconnect_start(ExtlockConnection *c)
{
    if (c->fd >= 0 || c->reconnect_co || extlock_reconnect_stop(c)) {
        return;
    }
    if (c->bs) {
        bdrv_inc_in_flight(c->bs);
    }
    c->reconnect_co = qemu_coroutine_create(extlock_reconnect_co, c);
    aio_co_schedule(c->ctx, c->reconnect_co);
}

/*
 * Cut the reconnection's waits (backoff, connect); it sees
 * extlock_reconnect_stop() and ends.  Callers set what stops it first.
 */
static void extlock_conn_reconnect_cut(ExtlockConnection *c)
{
    ExtlockConnJob *job = c->connect_job;
    Coroutine *co = NULL;

    if (!c->reconnect_co) {
        return;
    }
    qemu_co_sleep_wake(&c->reconnect_sleep);
    if (job) {
        qemu_mutex_lock(&job->lock);
        co = job->wait_co;
        job->wait_co = NULL;
        qemu_mutex_unlock(&job->lock);
        if (co) {
            aio_co_wake(co);
        }
    }
}

/*
 * ----------------------------------------------------------------------
 * Life cycle
 */

/* A connection that is not connected yet */
static ExtlockConnection *extlock_conn_alloc(const ExtlockConnConfig *cfg,
                                             const ExtlockConnOps *ops,
                                             void *opaque)
{
    ExtlockConnection *c = g_new0(ExtlockConnection, 1);
    struct sigaction sa;
    size_t i = 0;

    /*
     * A write to a connection the coordinator closed must fail with EPIPE,
     * not kill the process: QIOChannel's sendmsg() has no MSG_NOSIGNAL,
     * and qemu-img and qemu-storage-daemon keep SIGPIPE's default.
     */
    if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) {
        signal(SIGPIPE, SIG_IGN);
    }

    c->ops = ops;
    c->opaque = opaque;
    c->addrs = QAPI_CLONE(SocketAddressList, cfg->addrs);
    for (SocketAddressList *l = c->addrs; l; l = l->next) {
        i++;
    }
    c->addresses = g_new0(char *, i + 1);
    i = 0;
    for (SocketAddressList *l = c->addrs; l; l = l->next) {
        c->addresses[i++] = socket_uri(l->value);
    }
    c->addr = QAPI_CLONE(SocketAddress, c->addrs->value);
    c->address = socket_uri(c->addr);
    c->client_id = g_strdup(cfg->client_id);
    c->lock_space = g_strdup(cfg->lock_space);
    c->node_name = g_strdup(cfg->node_name);
    c->bs = cfg->bs;
    if (cfg->tls_creds) {
        c->tls_creds = cfg->tls_creds;
        object_ref(OBJECT(c->tls_creds));
        c->tls_hostname = g_strdup(cfg->tls_hostname);
    }
    c->lease_ms_wanted = cfg->lease_ms;
    c->stuck_io_exit = cfg->stuck_io_exit;
    c->fd = -1;
    c->next_id = 1;
    c->out = g_string_sized_new(4096);
    c->pending = g_hash_table_new_full(g_int64_hash, g_int64_equal,
                                       g_free, NULL);
    extlock_linebuf_init_max(&c->in, EXTLOCK_MAX_REPLY_LINE);
    return c;
}

ExtlockConnection *extlock_conn_new(const ExtlockConnConfig *cfg,
                                    const ExtlockConnOps *ops, void *opaque,
                                    AioContext *ctx, Error **errp)
{
    ExtlockConnection *c = extlock_conn_alloc(cfg, ops, opaque);
    ExtlockConnJob *job;
    int64_t open_deadline = g_get_monotonic_time() +
                            EXTLOCK_ANSWER_TIMEOUT_MS * 1000LL;
    int64_t backoff_ms = EXTLOCK_RECONNECT_MIN_MS;

    job = extlock_job_new(c);
    while (extlock_job_run(job) < 0) {
        /*
         * HA replicas in an election (none leads yet, or the leader
         * stepped down under us): look again for a bounded time
         */
        if (c->addrs->next && !extlock_job_refused(job) &&
            g_get_monotonic_time() < open_deadline) {
            extlock_job_free(job);
            g_usleep(backoff_ms * 1000);
            backoff_ms = extlock_backoff_next_ms(backoff_ms,
                                                 EXTLOCK_RECONNECT_MIN_MS,
                                                 EXTLOCK_RECONNECT_HA_MAX_MS);
            job = extlock_job_new(c);
            continue;
        }
        error_propagate(errp, job->err);
        job->err = NULL;
        extlock_job_free(job);
        extlock_conn_free(c);
        return NULL;
    }
    extlock_conn_adopt(c, job);
    extlock_job_free(job);
    extlock_conn_attach_aio_context(c, ctx);
    return c;
}

/* The connect deadline of extlock_conn_new_co(): stop waiting for the job */
static void extlock_conn_connect_deadline_cb(void *opaque)
{
    ExtlockConnJob *job = opaque;
    Coroutine *co;

    qemu_mutex_lock(&job->lock);
    co = job->wait_co;
    job->wait_co = NULL;
    qemu_mutex_unlock(&job->lock);
    if (co) {
        aio_co_wake(co);
    }
}

ExtlockConnection *coroutine_fn
extlock_conn_new_co(const ExtlockConnConfig *cfg, const ExtlockConnOps *ops,
                    void *opaque, AioContext *ctx, int64_t deadline_ns,
                    Error **errp)
{
    ExtlockConnection *c = extlock_conn_alloc(cfg, ops, opaque);
    ExtlockConnJob *job = extlock_job_new(c);
    QEMUTimer *timer;
    int ret;

    /* In the waiting coroutine's context: the callback only wakes it */
    timer = aio_timer_new(qemu_get_current_aio_context(), QEMU_CLOCK_REALTIME,
                          SCALE_NS, extlock_conn_connect_deadline_cb, job);
    timer_mod(timer, deadline_ns);
    ret = extlock_job_run_co(c, job);
    timer_free(timer);
    if (ret == -ECANCELED) {
        /* The job belongs to its thread now, which frees it */
        error_setg(errp, "extlock coordinator at %s did not start a session "
                   "in time", c->address);
        extlock_conn_free(c);
        return NULL;
    }
    if (ret < 0) {
        error_propagate(errp, job->err);
        job->err = NULL;
        extlock_job_free(job);
        extlock_conn_free(c);
        return NULL;
    }
    extlock_conn_adopt(c, job);
    extlock_job_free(job);
    extlock_conn_attach_aio_context(c, ctx);
    return c;
}

static void extlock_conn_say_bye(ExtlockConnection *c)
{
    ExtlockMsg bye;
    GPollFD pfd = { .fd = c->fd, .events = G_IO_OUT };
    int64_t deadline = g_get_monotonic_time() +
                       EXTLOCK_BYE_TIMEOUT_MS * 1000LL;

    extlock_msg_init(&bye, EXTLOCK_MSG_BYE);
    bye.has_id = true;
    bye.id = extlock_conn_new_id(c);
    extlock_msg_format(&bye, c->out);
    extlock_msg_clear(&bye);
    while (c->out_done < c->out->len && g_get_monotonic_time() < deadline) {
        ssize_t n = qio_channel_write(c->ioc, c->out->str + c->out_done,
                                      c->out->len - c->out_done, NULL);
        if (n > 0) {
            c->out_done += n;
        } else if (n == QIO_CHANNEL_ERR_BLOCK) {
            g_poll(&pfd, 1, 10);
        } else {
            break;
        }
    }
    trace_extlock_client_bye(c->node_name);
}

void extlock_conn_free(ExtlockConnection *c)
{
    if (!c) {
        return;
    }
    c->closing = true;
    if (c->reconnect_co) {
        /* Only outside a drain (a failed open); never waits for a connect */
        extlock_conn_reconnect_cut(c);
        AIO_WAIT_WHILE(c->ctx, c->reconnect_co != NULL);
    }
    extlock_conn_detach_aio_context(c);
    if (c->fd >= 0) {
        /*
         * Tell the coordinator we stopped I/O, so that it releases our
         * locks now instead of after the lease.  Best effort, bounded.
         */
        extlock_conn_say_bye(c);
    }
    if (c->ioc) {
        qio_channel_close(c->ioc, NULL);
        object_unref(OBJECT(c->ioc));
    }
    if (c->sioc) {
        object_unref(OBJECT(c->sioc));
    }
    if (c->tls_creds) {
        object_unref(OBJECT(c->tls_creds));
    }
    g_free(c->tls_hostname);
    assert(!g_hash_table_size(c->pending));
    extlock_linebuf_destroy(&c->in);
    g_string_free(c->out, true);
    g_hash_table_destroy(c->pending);
    qapi_free_SocketAddress(c->addr);
    qapi_free_SocketAddressList(c->addrs);
    g_strfreev(c->addresses);
    g_free(c->session);
    g_free(c->resume_secret);
    g_free(c->address);
    g_free(c->client_id);
    g_free(c->lock_space);
    g_free(c->node_name);
    g_free(c);
}

void extlock_conn_detach_aio_context(ExtlockConnection *c)
{
    if (!c->ctx) {
        return;
    }
    /*
     * The node is drained: no request is in flight (waiting for a lock or
     * in the child), and the reconnection paused.  Only the fd handler and
     * the timers are left to move.
     */
    assert(!c->reconnect_co && !c->connect_job);
    assert(!c->io_in_flight && !g_hash_table_size(c->pending));
    if (c->fd >= 0) {
        extlock_set_fd_handler(c->ctx, c->fd, NULL, NULL, NULL);
    }
    c->handlers_set = false;
    timer_free(c->renew_timer);
    c->renew_timer = NULL;
    timer_free(c->lease_timer);
    c->lease_timer = NULL;
    timer_free(c->stuck_timer);
    c->stuck_timer = NULL;
    c->ctx = NULL;
}

void extlock_conn_attach_aio_context(ExtlockConnection *c, AioContext *ctx)
{
    int64_t now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);

    c->ctx = ctx;
    c->renew_timer = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS,
                                   extlock_conn_renew, c);
    c->lease_timer = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS,
                                   extlock_conn_lease_timer_cb, c);
    /* Past the deadline already: it fires at once */
    extlock_conn_arm_lease_timer(c);
    c->stuck_timer = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS,
                                   extlock_conn_stuck_cb, c);
    if (c->fd >= 0) {
        timer_mod(c->renew_timer, extlock_lease_renew_at(c->lease_ms, now));
        extlock_conn_set_handlers(c);
        /* Replies may have arrived while detached */
        extlock_conn_read(c);
    } else {
        /* Not while drained: the end of the drain starts it */
        extlock_conn_reconnect_start(c);
    }
}

void extlock_conn_pause(ExtlockConnection *c)
{
    if (c->paused++ == 0) {
        extlock_conn_reconnect_cut(c);
    }
}

void extlock_conn_resume(ExtlockConnection *c)
{
    assert(c->paused > 0);
    if (--c->paused == 0) {
        extlock_conn_reconnect_start(c);
    }
}

void extlock_conn_set_stuck_io_exit(ExtlockConnection *c, bool exit)
{
    c->stuck_io_exit = exit;
}
