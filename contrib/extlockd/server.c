/*
 * extlockd: listeners, connections, sessions, leases and request dispatch
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Data model:
 *   ExtlockdServer   listeners, all connections, all sessions, lock-spaces
 *   ExtlockdConn     one client socket: line buffer in, GString out
 *   ExtlockdSession  created by "hello", bound to one lock-space, attached
 *                    to at most one connection; owns the locks it holds and
 *                    the requests it has waiting (both live in the table)
 *   ExtlockdSpace    one ExtlockTable per lock-space name
 *
 * The hot path (lock/unlock) parses with the codec, touches the table and
 * two small hash tables, and formats the reply straight into the output
 * buffer.  Output produced while handling one read (including grants sent
 * to other connections) is written out once, at the end of the callback.
 *
 * Lock caching: a lock requested with a "limit" may be granted grown
 * (extlock_table_request_grow).  Sessions that cache locks (they used
 * "limit", "reclaim" or "downgrade") get a "revoke" notification for each
 * pair (held lock, conflicting waiting request): when the request is
 * queued behind the lock, or when the lock is granted while the request
 * waits.  No per-lock state is needed for that, and sessions that never
 * cache (nrevocable == 0 in their lock-space) cost nothing.
 *
 * Recovery: the state file lists the sessions.  After a restart they are
 * recreated as "restored" sessions that may reconnect and reclaim their
 * locks during a grace period; lock-spaces with such sessions are in
 * grace, and new lock requests there are deferred (DeferredReq, outside
 * the table) until the grace period of the lock-space ends.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <glib.h>
#include <glib-unix.h>
#include <gio/gio.h>
#include <gnutls/gnutls.h>
#include <gnutls/crypto.h>
#include <json-c/json.h>

#include "extlock/lock-table.h"
#include "extlock/protocol.h"
#include "event-log.h"
#include "fence.h"
#include "policy.h"
#include "server.h"
#include "state-file.h"
#include "state-writer.h"
#include "tls.h"

#define READ_CHUNK          (64 * 1024)
#define READ_ROUNDS         4           /* reads per callback at most */
#define BACKPRESSURE_OUTPUT (1024 * 1024) /* stop reading above this */
#define CLOSE_TIMEOUT_US    (5 * G_USEC_PER_SEC)
#define MAX_BLOCKERS        64          /* listed in a "waiting" reply */
/* overlapping locks looked at per waiter for "blocked-by" in status */
#define STATUS_BLOCKER_VISITS   256
#define LISTEN_PAUSE_MS     100         /* after EMFILE and friends */
#define REFUSAL_LOG_BURST   20  /* server_log_refusal() lines a second */

#define VERBOSE(server, ...) \
    do { \
        if ((server)->cfg.verbose) { \
            g_debug(__VA_ARGS__); \
        } \
    } while (0)

typedef struct ExtlockdLockSpace ExtlockdLockSpace;
typedef struct ExtlockdSession ExtlockdSession;
typedef struct ExtlockdConn ExtlockdConn;
typedef struct ExtlockdListener ExtlockdListener;

typedef enum ExtlockdSessionState {
    SESSION_ACTIVE,              /* attached to a connection */
    SESSION_DISCONNECTED,        /* connection dropped, may be resumed */
    SESSION_EXPIRED,             /* lease lapsed; locks kept until fence */
} ExtlockdSessionState;

static const char *const session_state_names[] = {
    [SESSION_ACTIVE] = "active",
    [SESSION_DISCONNECTED] = "disconnected",
    [SESSION_EXPIRED] = "expired",
};

struct ExtlockdLockSpace {
    ExtlockdServer *server;
    char *name;
    ExtlockTable *table;
    unsigned nsessions;          /* sessions bound to it, in any state */
    unsigned nrevocable;         /* ... of which get revoke notifications */
    /*
     * "wait": false requests granted through extlock_table_reclaim(),
     * which the table does not count as requests or immediate grants
     */
    uint64_t nowait_grants;
    uint64_t revokes_sent;
    uint64_t reclaims;           /* locks reclaimed after a restart */
    /* Restart grace period */
    bool in_grace;
    GList grace_link;            /* in server->grace_spaces */
    bool grace_linked;           /* grace_link is in server->grace_spaces */
    /*
     * With a fence agent, the grace period ends only once the listed
     * sessions whose client never came back are fenced: their extents are
     * unknown, so nothing may be granted before (see lockspace_end_grace)
     */
    GQueue grace_fenced;         /* such sessions, via their reclaim_link */
    unsigned grace_fence_pending;    /* ... not fenced yet */
    GQueue reclaimers;           /* sessions still reclaiming */
    GQueue deferred;             /* DeferredReq, in token order */
    /*
     * Extents that two sessions reclaimed in conflict (ExtlockExtent):
     * nobody may reclaim them, and the grace period (so every grant in
     * the lock-space) lasts until @dispute_until_us, when both claimants
     * have had their lease and fence margin to stop writing
     */
    GArray *disputed;
    int64_t dispute_until_us;
    guint dispute_timer;         /* holds a reference (nsessions) */
    bool grace_timed_out;        /* the grace end waiting for it timed out */
};

/*
 * A lock request that arrived during the grace period of its lock-space.
 * It is in its session's waiting set (like a waiting lock, found by its
 * request id) but not in the table: lock.id is 0, which the table never
 * uses.  It enters the table when the grace period ends.
 */
typedef struct DeferredReq {
    ExtlockLock lock;
    GList link;                  /* in space->deferred */
} DeferredReq;

struct ExtlockdSession {
    ExtlockdServer *server;
    GList link;                  /* in server->session_list */
    char id[33];
    char *client_id;
    ExtlockdLockSpace *space;
    ExtlockdConn *conn;          /* NULL unless SESSION_ACTIVE */
    ExtlockdSessionState state;
    uint32_t lease_ms;
    /*
     * The largest fence margin its client was told in a welcome (its
     * driver's I/O deadline depends on it): recorded in the state file so
     * that the grace period after a restart with a smaller
     * --fence-margin-ms still covers it
     */
    uint32_t fence_margin_ms;
    int64_t deadline_us;         /* last renewal + lease */
    GHashTable *held;            /* set of granted ExtlockLock * */
    GHashTable *waiting;         /* set of waiting ExtlockLock *, keyed by
                                  * their user_tag (the request id) */
    bool releasing;              /* mass release in progress */
    bool revocable;              /* caches locks: send it revokes */
    /*
     * Listed in the state file at start-up: may reclaim its locks until it
     * sends reclaim-done or the grace period ends (then in
     * space->reclaimers).  @restored: its client has not come back yet.
     */
    bool reclaiming;
    bool restored;
    bool resend_revokes;         /* grace ended while it was reclaiming */
    GList reclaim_link;
    /*
     * Expired holding locks with a fence agent configured: the agent
     * run(s) (fence.h); the locks go only once @fence_ok
     */
    ExtlockdFence *fence;
    bool fence_ok;
    bool grace_fenced;           /* in space->grace_fenced */

    /*
     * The identity that created it, and the SHA-256 (hex) of the resume
     * secret given in its welcome: resuming or reclaiming it needs both.
     * NULL owner: restored from an old state file, cannot be reclaimed.
     */
    char *owner;
    char secret_sha256[65];
    char secret[EXTLOCK_SECRET_LEN + 1];    /* "" after a restart */
};

struct ExtlockdConn {
    ExtlockdServer *server;
    GList link;                  /* in server->conns */
    GList dirty_link;            /* in server->dirty while dirty */
    bool dirty;
    uint64_t serial;
    char *peer;
    int fd;
    GSource *source;
    gpointer tag;
    GIOCondition events;
    ExtlockLineBuf lb;
    GString *out;
    size_t out_pos;              /* bytes of out already sent */
    size_t out_allowance;        /* big replies in out (status) */
    ExtlockdSession *session;
    bool closing;                /* close once out is flushed */
    int64_t closing_since_us;
    /* Who it is (policy.h); NULL during the TLS handshake */
    char *identity;
    ExtlockdTls *tls;            /* TLS listener: the TLS session */
    bool handshaking;
    /* Before hello: counted per peer (IP address or uid) and in total */
    char *peer_key;
    bool unauth;
    GList unauth_link;           /* in server->unauth, accept order */
    int64_t accepted_us;
    /* hello: input paused until the new session is in the state file */
    bool awaiting_state;
    /* status rate limit: tokens, refilled every STATUS_INTERVAL */
    unsigned status_tokens;
    int64_t status_refill_us;
};

typedef struct ConnSource {
    GSource source;
    ExtlockdConn *conn;
} ConnSource;

struct ExtlockdListener {
    ExtlockdServer *server;
    char *address;
    int fd;
    bool is_tcp;
    guint watch;
    guint resume_timer;
    char *unix_path;             /* unlinked at exit if still ours */
    dev_t dev;
    ino_t ino;
    bool tls;                    /* TCP with TLS */
};

struct ExtlockdServer {
    ExtlockdConfig cfg;
    uint64_t epoch;
    uint64_t boot_epoch;         /* epoch at start: reclaimed tokens are
                                  * from earlier ones */
    int64_t grace_end_us;
    GQueue grace_spaces;         /* lock-spaces in their grace period */
    uint64_t counter;            /* next token counter value */
    int64_t start_us;
    GPtrArray *listeners;
    GHashTable *spaces;          /* name -> ExtlockdSpace */
    GHashTable *sessions;        /* id -> ExtlockdSession */
    GQueue session_list;         /* creation order */
    GQueue conns;
    GQueue dirty;                /* connections with output to flush */
    guint timer;
    int64_t timer_due_us;
    uint64_t next_serial;
    uint64_t nmessages;
    uint64_t nerrors;
    bool shutting_down;
    char *rbuf;
    ExtlockdEventLog *event_log;  /* --event-log, or NULL */
    ExtlockdFencer *fencer;       /* --fence-agent, or NULL */
    /* scratch arrays for formatting replies */
    GArray *pieces;
    GArray *blockers;
    GArray *locks;
    /* Security */
    ExtlockdPolicy *policy;
    ExtlockdTlsCreds *tls;
    GQueue unauth;               /* connections without hello */
    GHashTable *unauth_per_peer; /* peer key -> count (GUINT_TO_POINTER) */
    uint64_t refused;            /* connections refused by the caps */
    /* sessions per owner identity (char * -> count), for the limit */
    GHashTable *identity_sessions;
    /* server-wide status budget: entries, refilled continuously */
    uint64_t status_budget;
    int64_t status_budget_us;
    int64_t refused_logged_us;
    uint64_t refused_logged;
    /* State file writes (state-writer.h) and the welcomes waiting on them */
    ExtlockdStateWriter *writer;
    GQueue welcomes;             /* DeferredWelcome, in generation order */
    /* server_log_refusal(): lines in the current second, and those left out */
    int64_t refusal_window_us;
    unsigned refusal_lines;
    uint64_t refusals_unlogged;
};

/*
 * A welcome sent once the state file has what it promises: a new session,
 * or (reclaim after a restart) a session's new resume secret
 */
typedef struct DeferredWelcome {
    uint64_t gen;
    uint64_t conn_serial;
    char session[33];
    bool has_id;
    uint64_t id;
    bool reclaim;
    char old_sha256[65];         /* reclaim: restored if the write fails */
} DeferredWelcome;

static void conn_destroy(ExtlockdConn *conn);
static void conn_close_after_flush(ExtlockdConn *conn);
static void server_schedule(ExtlockdServer *server, int64_t when_us);
static bool server_save_state(ExtlockdServer *server, uint64_t epoch,
                              GError **errp);
static void lockspace_end_grace(ExtlockdLockSpace *space, bool timeout);
static uint64_t server_save_state_async(ExtlockdServer *server);

/* ------------------------------------------------------------------ */
/* Tokens                                                              */

static bool server_next_token(ExtlockdServer *server, uint64_t *token)
{
    if (server->counter >= EXTLOCKD_COUNTER_LIMIT) {
        g_autoptr(GError) err = NULL;
        uint64_t epoch = server->epoch + 1;

        if (!server_save_state(server, epoch, &err)) {
            g_warning("token counter of epoch %" PRIu64 " is exhausted and "
                      "the new epoch cannot be persisted: %s",
                      server->epoch, err->message);
            return false;
        }
        g_message("token counter of epoch %" PRIu64 " exhausted; "
                  "now in epoch %" PRIu64, server->epoch, epoch);
        server->epoch = epoch;
        server->counter = 1;
    }
    *token = (server->epoch << EXTLOCKD_COUNTER_BITS) | server->counter++;
    return true;
}

/* ------------------------------------------------------------------ */
/* Event log (event-log.h)                                             */

/* @event for @lock of its owner; @part: the released part, or NULL */
static void lockspace_log_lock(ExtlockdServer *server, const char *event,
                               ExtlockLock *lock,
                               const ExtlockExtent *part)
{
    ExtlockdSession *session = lock->owner;
    ExtlockdEvent ev = {
        .event = event,
        .lock_space = session->space->name,
        .client_id = session->client_id,
        .session = session->id,
        .has_lock = true,
        .lock = lock->id,
        .token = lock->token,
        .offset = part ? part->start : lock->node.ext.start,
        .length = part ? part->end - part->start
                       : lock->node.ext.end - lock->node.ext.start,
        .mode = lock->mode,
    };

    if (server->event_log) {
        extlockd_event_log_write(server->event_log, &ev);
    }
}

static void session_log_event(ExtlockdSession *session, const char *event,
                              const char *message)
{
    ExtlockdEvent ev = {
        .event = event,
        .lock_space = session->space->name,
        .client_id = session->client_id,
        .session = session->id,
        .message = message,
    };

    if (session->server->event_log) {
        extlockd_event_log_write(session->server->event_log, &ev);
    }
}

/* ------------------------------------------------------------------ */
/* Output                                                              */

static GString *conn_out(ExtlockdConn *conn)
{
    if (!conn->dirty) {
        conn->dirty = true;
        g_queue_push_tail_link(&conn->server->dirty, &conn->dirty_link);
    }
    return conn->out;
}

static void conn_send_msg(ExtlockdConn *conn, const ExtlockMsg *msg)
{
    extlock_msg_format(msg, conn_out(conn));
}

static void G_GNUC_PRINTF(5, 6)
conn_send_error(ExtlockdConn *conn, bool has_id, uint64_t id,
                ExtlockErrorCode code,
                const char *fmt, ...)
{
    g_autofree char *text = NULL;
    va_list ap;

    va_start(ap, fmt);
    text = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    conn->server->nerrors++;
    VERBOSE(conn->server, "%s: error %s: %s", conn->peer,
            extlock_error_code_name(code), text);
    extlock_format_error(conn_out(conn), has_id, id, code, "%s", text);
}

/*
 * A warning about a request or connection refused for who sent it: at
 * most REFUSAL_LOG_BURST lines a second, so that a peer cannot fill the
 * log (and spend the daemon's time on it) at the rate it sends lines; the
 * next line logged says how many were left out
 */
static void G_GNUC_PRINTF(2, 3)
server_log_refusal(ExtlockdServer *server, const char *fmt, ...)
{
    int64_t now = g_get_monotonic_time();
    g_autofree char *text = NULL;
    va_list ap;

    if (now - server->refusal_window_us >= G_USEC_PER_SEC) {
        server->refusal_window_us = now;
        server->refusal_lines = 0;
    }
    if (server->refusal_lines >= REFUSAL_LOG_BURST) {
        server->refusals_unlogged++;
        return;
    }
    server->refusal_lines++;
    va_start(ap, fmt);
    text = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    if (server->refusals_unlogged) {
        g_warning("%s (%" PRIu64 " similar refusals not logged before "
                  "this one)", text, server->refusals_unlogged);
        server->refusals_unlogged = 0;
    } else {
        g_warning("%s", text);
    }
}

static void conn_set_events(ExtlockdConn *conn, GIOCondition events)
{
    if (conn->events != events) {
        conn->events = events;
        g_source_modify_unix_fd(conn->source, conn->tag, events);
    }
}

/* Plain or TLS I/O on the connection's non-blocking socket */
static ssize_t conn_sys_send(ExtlockdConn *conn, const void *buf, size_t len)
{
    if (conn->tls) {
        return extlockd_tls_send(conn->tls, buf, len);
    }
    return send(conn->fd, buf, len, MSG_NOSIGNAL);
}

static ssize_t conn_sys_recv(ExtlockdConn *conn, void *buf, size_t len)
{
    if (conn->tls) {
        return extlockd_tls_recv(conn->tls, buf, len);
    }
    return recv(conn->fd, buf, len, 0);
}

/*
 * Records GnuTLS has decrypted already are invisible to poll(): make the
 * source dispatch again if the connection wants input
 */
static void conn_kick_tls(ExtlockdConn *conn)
{
    if (conn->tls && !conn->handshaking && (conn->events & G_IO_IN) &&
        extlockd_tls_pending(conn->tls)) {
        g_source_set_ready_time(conn->source, 0);
    }
}

/* Returns false if the connection was destroyed */
static bool conn_flush(ExtlockdConn *conn)
{
    size_t pending;
    GIOCondition events;

    while (conn->out_pos < conn->out->len) {
        ssize_t n = conn_sys_send(conn, conn->out->str + conn->out_pos,
                                  conn->out->len - conn->out_pos);
        if (n > 0) {
            conn->out_pos += n;
            continue;
        }
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        }
        VERBOSE(conn->server, "%s: write failed: %s", conn->peer,
                n < 0 ? (conn->tls ? extlockd_tls_error(conn->tls) :
                         g_strerror(errno)) : "no progress");
        conn_destroy(conn);
        return false;
    }

    if (conn->out_pos == conn->out->len) {
        g_string_truncate(conn->out, 0);
        conn->out_pos = 0;
        conn->out_allowance = 0;
        if (conn->closing) {
            conn_destroy(conn);
            return false;
        }
        if (!conn->handshaking) {
            conn_set_events(conn, conn->awaiting_state ? 0 : G_IO_IN);
            conn_kick_tls(conn);
        }
        return true;
    }

    pending = conn->out->len - conn->out_pos;
    if (pending > EXTLOCKD_MAX_OUTPUT + conn->out_allowance) {
        g_warning("disconnecting %s: it does not read its replies "
                  "(%zu bytes pending)", conn->peer, pending);
        conn_destroy(conn);
        return false;
    }
    if (conn->out_pos >= READ_CHUNK && conn->out_pos >= conn->out->len / 2) {
        g_string_erase(conn->out, 0, conn->out_pos);
        conn->out_pos = 0;
    }
    events = G_IO_OUT;
    if (!conn->closing && !conn->awaiting_state &&
        pending < BACKPRESSURE_OUTPUT) {
        events |= G_IO_IN;
    }
    conn_set_events(conn, events);
    conn_kick_tls(conn);
    return true;
}

static void conn_flush_all(ExtlockdServer *server)
{
    GList *link;

    while ((link = g_queue_pop_head_link(&server->dirty)) != NULL) {
        ExtlockdConn *conn = link->data;

        conn->dirty = false;
        conn_flush(conn);
    }
}

/* ------------------------------------------------------------------ */
/* Lock-spaces                                                         */

static guint session_waiting_hash(gconstpointer p)
{
    uint64_t tag = ((const ExtlockLock *)p)->user_tag;

    return (guint)(tag ^ (tag >> 32));
}

static gboolean session_waiting_equal(gconstpointer a, gconstpointer b)
{
    return ((const ExtlockLock *)a)->user_tag ==
           ((const ExtlockLock *)b)->user_tag;
}

static ExtlockLock *session_find_waiting(ExtlockdSession *session, uint64_t req)
{
    ExtlockLock key;

    if (g_hash_table_size(session->waiting) == 0) {
        return NULL;
    }
    key.user_tag = req;
    return g_hash_table_lookup(session->waiting, &key);
}

static void lockspace_send_granted(ExtlockdConn *conn, ExtlockLock *lock)
{
    ExtlockMsg r;

    extlock_msg_init(&r, EXTLOCK_MSG_GRANTED);
    r.has_id = true;
    r.id = lock->user_tag;
    r.lock = lock->id;
    r.token = lock->token;
    r.offset = lock->node.ext.start;
    r.length = lock->node.ext.end - lock->node.ext.start;
    r.mode = lock->mode;
    conn_send_msg(conn, &r);
}

/*
 * Revocation
 *
 * Every (held lock, conflicting waiting request) pair gets one revoke,
 * sent by whichever of the two events comes second: the request is
 * queued while the lock is held (lockspace_revoke_holder_cb), or the
 * lock is granted while the request waits (lockspace_revoke_waiter_cb).
 * A lock split off by a partial unlock counts as newly granted; a resumed
 * session gets the revokes for its locks again, as they may have been
 * lost with its old connection.
 */

static bool session_wants_revokes(ExtlockdSession *session)
{
    return session->revocable && session->conn && !session->releasing;
}

static void session_set_revocable(ExtlockdSession *session)
{
    if (!session->revocable) {
        session->revocable = true;
        session->space->nrevocable++;
    }
}

/* Tell the holder of @held that @waiter waits for it */
static void lockspace_send_revoke(ExtlockLock *held, ExtlockLock *waiter)
{
    ExtlockdSession *session = held->owner;
    ExtlockMsg r;

    extlock_msg_init(&r, EXTLOCK_MSG_REVOKE);
    r.lock = held->id;
    r.offset = MAX(held->node.ext.start, waiter->node.ext.start);
    r.length = MIN(held->node.ext.end, waiter->node.ext.end) - r.offset;
    r.mode = waiter->mode;
    r.token = waiter->token;
    conn_send_msg(session->conn, &r);
    session->space->revokes_sent++;
}

/* foreach_conflict of a newly queued request @opaque */
static void lockspace_revoke_holder_cb(ExtlockLock *other, void *opaque)
{
    if (other->state == EXTLOCK_LOCK_GRANTED &&
        session_wants_revokes(other->owner)) {
        lockspace_send_revoke(other, opaque);
    }
}

/* foreach_conflict of a newly granted lock @opaque */
static void lockspace_revoke_waiter_cb(ExtlockLock *other, void *opaque)
{
    ExtlockLock *held = opaque;

    if (other->state == EXTLOCK_LOCK_WAITING && other->token > held->token) {
        lockspace_send_revoke(held, other);
    }
}

/* @lock was just granted (or split off): revoke it for later waiters */
static void lockspace_revoke_new_lock(ExtlockTable *table, ExtlockLock *lock)
{
    if (session_wants_revokes(lock->owner)) {
        extlock_table_foreach_conflict(table, lock, lockspace_revoke_waiter_cb,
                                       lock);
    }
}

/* Send again the revokes for every lock @session holds */
static void lockspace_resend_revokes(ExtlockdSession *session)
{
    GHashTableIter iter;
    gpointer key;

    if (!session_wants_revokes(session)) {
        return;
    }
    g_hash_table_iter_init(&iter, session->held);
    while (g_hash_table_iter_next(&iter, &key, NULL)) {
        extlock_table_foreach_conflict(session->space->table, key,
                                       lockspace_revoke_waiter_cb, key);
    }
}

/*
 * The table granted a request that had been waiting.  The table is
 * consistent again when this is called, and foreach_conflict only reads.
 */
static void lockspace_grant_cb(ExtlockTable *table, ExtlockLock *lock,
                               void *opaque)
{
    ExtlockdSession *session = lock->owner;

    if (session->releasing) {
        /* The session is tearing down; this lock is released next */
        return;
    }
    g_hash_table_remove(session->waiting, lock);
    g_hash_table_add(session->held, lock);
    lockspace_log_lock(session->server, "grant", lock, NULL);
    if (session->conn) {
        lockspace_send_granted(session->conn, lock);
        lockspace_revoke_new_lock(table, lock);
    }
}

static ExtlockdLockSpace *lockspace_get(ExtlockdServer *server,
                                        const char *name)
{
    ExtlockdLockSpace *space = g_hash_table_lookup(server->spaces, name);

    if (!space) {
        space = g_new0(ExtlockdLockSpace, 1);
        space->server = server;
        space->name = g_strdup(name);
        space->table = extlock_table_new(name, lockspace_grant_cb, space);
        extlock_table_set_debug_checks(space->table, server->cfg.debug_checks);
        g_hash_table_insert(server->spaces, space->name, space);
        VERBOSE(server, "lock-space %s created", name);
    }
    return space;
}

static void lockspace_free(ExtlockdLockSpace *space)
{
    GList *l;

    while ((l = g_queue_pop_head_link(&space->deferred)) != NULL) {
        g_free(l->data);
    }
    if (space->dispute_timer) {
        g_source_remove(space->dispute_timer);
    }
    if (space->disputed) {
        g_array_free(space->disputed, TRUE);
    }
    extlock_table_free(space->table);
    g_free(space->name);
    g_free(space);
}

static void lockspace_unref(ExtlockdLockSpace *space)
{
    ExtlockdServer *server = space->server;

    g_assert(space->nsessions > 0);
    if (--space->nsessions == 0 && !server->shutting_down) {
        const ExtlockTableStats *st = extlock_table_stats(space->table);

        /* Every session releases everything before it goes away */
        g_assert(st->held == 0 && st->waiting == 0);
        g_assert(space->deferred.length == 0 && !space->in_grace);
        VERBOSE(server, "lock-space %s is unused, freeing it", space->name);
        g_hash_table_remove(server->spaces, space->name);
        lockspace_free(space);
    }
}

/* ------------------------------------------------------------------ */
/* Sessions                                                            */

static void session_make_id(ExtlockdServer *server, char id[33])
{
    static const char hex[] = "0123456789abcdef";
    uint8_t raw[16];

    do {
        if (getrandom(raw, sizeof(raw), 0) != sizeof(raw)) {
            for (size_t i = 0; i < sizeof(raw); i += 4) {
                guint32 v = g_random_int();
                memcpy(raw + i, &v, 4);
            }
        }
        for (size_t i = 0; i < sizeof(raw); i++) {
            id[2 * i] = hex[raw[i] >> 4];
            id[2 * i + 1] = hex[raw[i] & 15];
        }
        id[32] = '\0';
    } while (g_hash_table_contains(server->sessions, id));
}

/*
 * A new resume secret for @session: 256 bits from GnuTLS's key-grade generator,
 * in hex; only its SHA-256 is ever written to the state file
 */
static bool session_new_secret(ExtlockdSession *session)
{
    static const char hex[] = "0123456789abcdef";
    uint8_t raw[EXTLOCK_SECRET_LEN / 2];
    g_autofree char *sum = NULL;

    if (gnutls_rnd(GNUTLS_RND_KEY, raw, sizeof(raw)) < 0) {
        return false;
    }
    for (size_t i = 0; i < sizeof(raw); i++) {
        session->secret[2 * i] = hex[raw[i] >> 4];
        session->secret[2 * i + 1] = hex[raw[i] & 15];
    }
    session->secret[EXTLOCK_SECRET_LEN] = '\0';
    explicit_bzero(raw, sizeof(raw));
    sum = g_compute_checksum_for_string(G_CHECKSUM_SHA256, session->secret, -1);
    g_strlcpy(session->secret_sha256, sum, sizeof(session->secret_sha256));
    return true;
}

/*
 * Does @secret (may be NULL) match @session's?  Compares hashes in constant
 * time
 */
static bool session_secret_ok(ExtlockdSession *session, const char *secret)
{
    g_autofree char *sum = NULL;
    unsigned diff = 0;

    if (!secret || !session->secret_sha256[0]) {
        return false;
    }
    sum = g_compute_checksum_for_string(G_CHECKSUM_SHA256, secret, -1);
    for (size_t i = 0; i < 64; i++) {
        diff |= (unsigned char)sum[i] ^
                (unsigned char)session->secret_sha256[i];
    }
    return diff == 0;
}

/* A session with id @id (NULL: a new random one), attached to nothing */
static ExtlockdSession *session_alloc(ExtlockdServer *server, const char *id,
                                      const char *client_id,
                                      const char *space_name,
                                      uint32_t lease_ms, int64_t now)
{
    ExtlockdSession *session = g_new0(ExtlockdSession, 1);

    session->server = server;
    if (id) {
        g_strlcpy(session->id, id, sizeof(session->id));
    } else {
        session_make_id(server, session->id);
    }
    session->client_id = g_strdup(client_id);
    session->space = lockspace_get(server, space_name);
    session->space->nsessions++;
    session->held = g_hash_table_new(g_direct_hash, g_direct_equal);
    session->waiting = g_hash_table_new(session_waiting_hash,
                                        session_waiting_equal);
    session->state = SESSION_DISCONNECTED;
    session->lease_ms = lease_ms;
    session->fence_margin_ms = server->cfg.fence_margin_ms;
    session->deadline_us = now + (int64_t)lease_ms * 1000;
    session->link.data = session;
    session->reclaim_link.data = session;
    g_queue_push_tail_link(&server->session_list, &session->link);
    g_hash_table_insert(server->sessions, session->id, session);
    return session;
}

/*
 * Attach @session to @conn with a fresh lease of @lease_ms.  A session that
 * comes back with a shorter lease than it had keeps its later deadline: its
 * client may still be writing under the lease it was given before.
 */
static void conn_unauth_done(ExtlockdConn *conn);

static void session_attach(ExtlockdSession *session, ExtlockdConn *conn,
                           uint32_t lease_ms, int64_t now)
{
    conn_unauth_done(conn);
    session->conn = conn;
    conn->session = session;
    session->state = SESSION_ACTIVE;
    session->restored = false;
    session->lease_ms = lease_ms;
    session->deadline_us = MAX(session->deadline_us,
                               now + (int64_t)lease_ms * 1000);
    server_schedule(session->server, session->deadline_us);
}

/* Sessions of @identity now (--max-sessions-per-identity) */
static unsigned session_count_identity(ExtlockdServer *server,
                                       const char *identity)
{
    return GPOINTER_TO_UINT(g_hash_table_lookup(server->identity_sessions,
                                                identity));
}

/* @session has its owner: count it */
static void session_identity_add(ExtlockdSession *session)
{
    ExtlockdServer *server = session->server;
    unsigned n;

    if (!session->owner) {
        return;
    }
    n = session_count_identity(server, session->owner);
    g_hash_table_insert(server->identity_sessions, g_strdup(session->owner),
                        GUINT_TO_POINTER(n + 1));
}

static void session_identity_remove(ExtlockdSession *session)
{
    ExtlockdServer *server = session->server;
    unsigned n;

    if (!session->owner) {
        return;
    }
    n = session_count_identity(server, session->owner);
    g_assert(n > 0);
    if (n == 1) {
        g_hash_table_remove(server->identity_sessions, session->owner);
    } else {
        g_hash_table_insert(server->identity_sessions, g_strdup(session->owner),
                            GUINT_TO_POINTER(n - 1));
    }
}

static void session_free(ExtlockdSession *session)
{
    g_hash_table_destroy(session->held);
    g_hash_table_destroy(session->waiting);
    g_free(session->owner);
    explicit_bzero(session->secret, sizeof(session->secret));
    g_free(session->client_id);
    g_free(session);
}

/*
 * @session will not reclaim any more (reclaim-done, bye, lease lapsed); the
 * grace period of its lock-space ends when nobody reclaims any more
 */
static void session_end_reclaim(ExtlockdSession *session)
{
    ExtlockdLockSpace *space = session->space;

    if (!session->reclaiming) {
        return;
    }
    session->reclaiming = false;
    g_queue_unlink(&space->reclaimers, &session->reclaim_link);
    if (space->in_grace && space->reclaimers.length == 0) {
        lockspace_end_grace(space, false);
    }
}

/*
 * The session must not hold or wait for anything any more.  Does not
 * rewrite the state file: see session_destroy().
 */
static void session_destroy_nosave(ExtlockdSession *session)
{
    ExtlockdServer *server = session->server;

    g_assert(g_hash_table_size(session->held) == 0);
    g_assert(g_hash_table_size(session->waiting) == 0);
    session_end_reclaim(session);
    extlockd_fence_cancel(session->fence);
    session->fence = NULL;
    if (session->conn) {
        session->conn->session = NULL;
        session->conn = NULL;
    }
    if (session->revocable) {
        session->space->nrevocable--;
    }
    g_hash_table_remove(server->sessions, session->id);
    session_identity_remove(session);
    g_queue_unlink(&server->session_list, &session->link);
    lockspace_unref(session->space);
    session_free(session);
}

/* Record the current sessions in the state file, or complain */
static void server_save_state_or_warn(ExtlockdServer *server)
{
    /* A session gone from the file only matters after a crash */
    server_save_state_async(server);
}

static void session_destroy(ExtlockdSession *session)
{
    ExtlockdServer *server = session->server;

    session_destroy_nosave(session);
    server_save_state_or_warn(server);
}

static GPtrArray *session_take_all(GHashTable *set, GPtrArray *into)
{
    GHashTableIter iter;
    gpointer key;

    g_hash_table_iter_init(&iter, set);
    while (g_hash_table_iter_next(&iter, &key, NULL)) {
        g_ptr_array_add(into, key);
    }
    g_hash_table_remove_all(set);
    return into;
}

static bool lockspace_lock_is_deferred(const ExtlockLock *lock)
{
    return lock->id == 0;
}

/* Cancel a waiting request (in the table or deferred) */
static void lockspace_cancel_waiter(ExtlockdLockSpace *space, ExtlockLock *lock)
{
    if (lockspace_lock_is_deferred(lock)) {
        DeferredReq *d = (DeferredReq *)lock;

        g_queue_unlink(&space->deferred, &d->link);
        g_free(d);
    } else {
        extlock_table_release(space->table, lock);
    }
}

/*
 * Cancel every waiting request of @session and, if @held too, release every
 * lock it holds.  Releases may grant other sessions' requests (grant_cb);
 * while @session is releasing, grants of its own requests are ignored, and
 * such locks are released later in the same loop because they are in the
 * array. Returns the number of granted locks released.
 */
static unsigned session_release(ExtlockdSession *session, bool held)
{
    ExtlockTable *table = session->space->table;
    g_autoptr(GPtrArray) waiters = g_ptr_array_new();
    g_autoptr(GPtrArray) locks = g_ptr_array_new();

    session_take_all(session->waiting, waiters);
    if (held) {
        session_take_all(session->held, locks);
    }
    if (waiters->len == 0 && locks->len == 0) {
        return 0;
    }
    session->releasing = true;
    for (guint i = 0; i < waiters->len; i++) {
        lockspace_cancel_waiter(session->space, waiters->pdata[i]);
    }
    for (guint i = 0; i < locks->len; i++) {
        lockspace_log_lock(session->server, "release", locks->pdata[i], NULL);
        extlock_table_release(table, locks->pdata[i]);
    }
    session->releasing = false;
    return locks->len;
}

/* The session's connection dropped without "bye" */
static void session_detach(ExtlockdSession *session)
{
    ExtlockdServer *server = session->server;
    int64_t now = g_get_monotonic_time();
    int64_t release_us = session->deadline_us +
                         server->cfg.fence_margin_ms * 1000LL;

    g_assert(session->state == SESSION_ACTIVE);
    session_release(session, false);
    session->conn->session = NULL;
    session->conn = NULL;
    session->state = SESSION_DISCONNECTED;
    g_message("session %s (%s, lock-space %s) lost its connection; "
              "%u locks kept, released in %" PRId64 " ms unless resumed",
              session->id, session->client_id, session->space->name,
              g_hash_table_size(session->held),
              MAX(release_us - now, 0) / 1000);
    server_schedule(server, session->deadline_us);
}

/* ------------------------------------------------------------------ */
/* Fencing an expired session (fence.h)                                */

static void session_fence_waiter_cb(ExtlockLock *other, void *opaque)
{
    GHashTable *set = opaque;
    ExtlockdSession *waiter = other->owner;

    if (other->state == EXTLOCK_LOCK_WAITING && waiter->conn) {
        g_hash_table_add(set, waiter);
    }
}

/*
 * Tell every session with a request waiting behind a lock of the expired
 * session @session how its fencing goes (fence-status)
 */
static void session_fence_notify(ExtlockdSession *session,
                                 ExtlockFenceResult result,
                                 const char *message)
{
    g_autoptr(GHashTable) waiters = g_hash_table_new(NULL, NULL);
    GHashTableIter iter;
    gpointer key;
    ExtlockMsg r;

    g_hash_table_iter_init(&iter, session->held);
    while (g_hash_table_iter_next(&iter, &key, NULL)) {
        extlock_table_foreach_conflict(session->space->table, key,
                                       session_fence_waiter_cb, waiters);
    }
    if (session->grace_fenced) {
        /* Its extents are unknown: everybody deferred waits for it */
        for (GList *l = session->space->deferred.head; l; l = l->next) {
            ExtlockdSession *waiter = ((DeferredReq *)l->data)->lock.owner;

            if (waiter->conn) {
                g_hash_table_add(waiters, waiter);
            }
        }
    }
    g_hash_table_remove(waiters, session);
    extlock_msg_init(&r, EXTLOCK_MSG_FENCE_STATUS);
    r.lock_space = session->space->name;
    r.client_id = session->client_id;
    r.session_client = session->client_id;
    r.session = session->id;
    r.fence_result = result;
    r.message = (char *)message;
    g_hash_table_iter_init(&iter, waiters);
    while (g_hash_table_iter_next(&iter, &key, NULL)) {
        conn_send_msg(((ExtlockdSession *)key)->conn, &r);
    }
}

static void server_check_deadlines(ExtlockdServer *server);

static void session_fence_cb(ExtlockdFence *f, ExtlockdFenceState state,
                             const char *message, void *opaque)
{
    ExtlockdSession *session = opaque;
    ExtlockdServer *server = session->server;
    const char *agent = extlockd_fencer_agent(server->fencer);

    switch (state) {
    case EXTLOCKD_FENCE_RUNNING:
        g_message("fence agent %s started again for session %s (%s, "
                  "lock-space %s), attempt %u", agent, session->id,
                  session->client_id,
                  session->space->name, extlockd_fence_attempts(f));
        session_log_event(session, "fence-start", NULL);
        session_fence_notify(session, EXTLOCK_FENCE_STARTED, NULL);
        break;
    case EXTLOCKD_FENCE_OK:
        g_message("session %s (%s, lock-space %s) fenced: %s", session->id,
                  session->client_id, session->space->name, message);
        session->fence_ok = true;
        session_log_event(session, "fence-ok", message);
        session_fence_notify(session, EXTLOCK_FENCE_SUCCEEDED, message);
        if (session->grace_fenced) {
            ExtlockdLockSpace *space = session->space;

            /* The last one fenced ends the grace period, freeing @f */
            if (--space->grace_fence_pending == 0) {
                lockspace_end_grace(space, true);
            }
        }
        /* May release the locks now, which frees @f */
        server_check_deadlines(server);
        break;
    case EXTLOCKD_FENCE_FAILED:
        g_warning("FENCING FAILED for client %s (session %s, lock-space "
                  "%s), attempt %u: %s; its %u locks stay held, retrying "
                  "in %u ms (extlockctl release-session %s forces the "
                  "release)", session->client_id, session->id,
                  session->space->name,
                  extlockd_fence_attempts(f), message,
                  g_hash_table_size(session->held), extlockd_fence_retry_ms(f),
                  session->id);
        session_log_event(session, "fence-failed", message);
        session_fence_notify(session, EXTLOCK_FENCE_FAILED, message);
        break;
    }
    conn_flush_all(server);
}

static void session_fence_start(ExtlockdSession *session)
{
    ExtlockdServer *server = session->server;

    g_message("running fence agent %s for client %s (session %s, "
              "lock-space %s, %u locks held)",
              extlockd_fencer_agent(server->fencer), session->client_id,
              session->id,
              session->space->name, g_hash_table_size(session->held));
    session->fence = extlockd_fence_start(server->fencer, session->client_id,
                                          session_fence_cb, session);
    session_log_event(session, "fence-start", NULL);
    session_fence_notify(session, EXTLOCK_FENCE_STARTED, NULL);
}

/* The lease lapsed (now >= deadline) */
static void session_expire(ExtlockdSession *session)
{
    ExtlockdServer *server = session->server;
    ExtlockdConn *conn = session->conn;

    if (session->state == SESSION_ACTIVE) {
        ExtlockMsg r;

        g_warning("session %s (%s, lock-space %s) expired: no renewal "
                  "within %u ms; its %u locks are released after the "
                  "%u ms fence margin", session->id, session->client_id,
                  session->space->name, session->lease_ms,
                  g_hash_table_size(session->held),
                  server->cfg.fence_margin_ms);
        extlock_msg_init(&r, EXTLOCK_MSG_SESSION_EXPIRED);
        r.session = session->id;
        r.message = (char *)"lease expired without renewal";
        conn_send_msg(conn, &r);
        session_release(session, false);
        conn->session = NULL;
        session->conn = NULL;
        conn_close_after_flush(conn);
    } else {
        VERBOSE(server, "session %s: lease of disconnected session lapsed",
                session->id);
    }
    session->state = SESSION_EXPIRED;
    session_log_event(session, "expire", NULL);
    /* It cannot come back to finish reclaiming */
    session_end_reclaim(session);
    if (server->fencer && g_hash_table_size(session->held) > 0) {
        session_fence_start(session);
    }
}

/* The fence margin after the deadline has passed: let the locks go */
static void session_reap(ExtlockdSession *session)
{
    unsigned n = session_release(session, true);

    g_message("session %s (%s, lock-space %s) ended: lease lapsed, "
              "released %u locks", session->id, session->client_id,
              session->space->name, n);
    session_destroy(session);
}

/* ------------------------------------------------------------------ */
/* Lock requests and the grace period                                  */

static void lockspace_waiting_blocker_cb(ExtlockLock *blocker, void *opaque)
{
    GArray *blockers = opaque;
    ExtlockdSession *session = blocker->owner;
    ExtlockBlocker b;

    if (blockers->len >= MAX_BLOCKERS) {
        return;
    }
    b.client_id = session->client_id;
    b.offset = blocker->node.ext.start;
    b.length = blocker->node.ext.end - blocker->node.ext.start;
    b.mode = blocker->mode;
    b.token = blocker->token;
    b.waiting = blocker->state == EXTLOCK_LOCK_WAITING;
    g_array_append_val(blockers, b);
}

static void lockspace_send_waiting(ExtlockdConn *conn, uint64_t id,
                                   uint64_t token,
                                   GArray *blockers)
{
    ExtlockMsg r;

    extlock_msg_init(&r, EXTLOCK_MSG_WAITING);
    r.has_id = true;
    r.id = id;
    r.token = token;
    r.blockers = blockers;
    conn_send_msg(conn, &r);
}

/*
 * Put the lock request @req (extent, limit, mode, token, request id in
 * user_tag; not in any table or set) of @session into the table and answer it
 * on @conn: "granted", or "waiting" if @say_waiting (a deferred request was
 * told so already).  The holders it waits for get a revoke.
 */
static void lockspace_submit(ExtlockdLockSpace *space, ExtlockdSession *session,
                             ExtlockdConn *conn, const ExtlockLock *req,
                             bool say_waiting)
{
    ExtlockdServer *server = space->server;
    ExtlockTable *table = space->table;
    ExtlockLock *lock;

    lock = extlock_table_request_grow(table, req->requested, req->limit,
                                      req->mode, req->token, session,
                                      req->user_tag);
    if (lock->state == EXTLOCK_LOCK_GRANTED) {
        g_hash_table_add(session->held, lock);
        lockspace_log_lock(server, "grant", lock, NULL);
        if (conn) {
            lockspace_send_granted(conn, lock);
        }
        return;
    }
    g_hash_table_add(session->waiting, lock);
    if (conn && say_waiting) {
        g_array_set_size(server->blockers, 0);
        extlock_table_foreach_blocker(table, lock, lockspace_waiting_blocker_cb,
                                      server->blockers);
        lockspace_send_waiting(conn, lock->user_tag, lock->token,
                               server->blockers);
    }
    if (space->nrevocable) {
        extlock_table_foreach_conflict(table, lock, lockspace_revoke_holder_cb,
                                       lock);
    }
}

/* A lock request during the grace period: queue it outside the table */
static void lockspace_defer(ExtlockdLockSpace *space, ExtlockdSession *session,
                            ExtlockdConn *conn, const ExtlockLock *req)
{
    DeferredReq *d = g_new0(DeferredReq, 1);

    d->lock = *req;
    d->lock.id = 0;
    d->lock.node.ext = req->requested;
    d->lock.state = EXTLOCK_LOCK_WAITING;
    d->lock.owner = session;
    d->lock.queued_us = g_get_monotonic_time();
    d->link.data = d;
    g_queue_push_tail_link(&space->deferred, &d->link);
    g_hash_table_add(session->waiting, &d->lock);
    g_array_set_size(space->server->blockers, 0);
    lockspace_send_waiting(conn, req->user_tag, req->token,
                           space->server->blockers);
}

static int64_t lockspace_grace_remaining_ms(ExtlockdLockSpace *space,
                                            int64_t now)
{
    /* A reclaim conflict may make it last longer */
    int64_t end = MAX(space->server->grace_end_us, space->dispute_until_us);

    if (!space->in_grace || end <= now) {
        return 0;
    }
    return (end - now + 999) / 1000;
}

/*
 * The grace period of @space ends, because every listed session is done
 * reclaiming or (@timeout) because its time is up.  Sessions still
 * reclaiming stop doing so; those whose client never came back are
 * dropped (they hold nothing).  Then the deferred requests enter the
 * table in token order, as if they were arriving now.
 */
/*
 * The grace period of @space timed out with a fence agent configured:
 * fence the listed sessions whose client never came back (they become
 * expired sessions without locks, fenced like any other, and the grace
 * period waits for them).  Returns true if there are any.
 */
static bool lockspace_fence_absent(ExtlockdLockSpace *space)
{
    ExtlockdServer *server = space->server;
    int64_t margin_us = server->cfg.fence_margin_ms * 1000LL;
    GList *l, *next;

    for (l = space->reclaimers.head; l; l = next) {
        ExtlockdSession *session = l->data;

        next = l->next;
        if (!session->restored) {
            continue;
        }
        g_queue_unlink(&space->reclaimers, &session->reclaim_link);
        session->reclaiming = false;
        session->state = SESSION_EXPIRED;
        /* Its lease (<= the grace period) ended before the timeout */
        session->deadline_us = server->grace_end_us - margin_us;
        session->grace_fenced = true;
        g_queue_push_tail_link(&space->grace_fenced, &session->reclaim_link);
        space->grace_fence_pending++;
        g_message("session %s (%s, lock-space %s) did not come back during "
                  "the grace period: fencing it before the grace period "
                  "ends", session->id, session->client_id, space->name);
        session_log_event(session, "expire", NULL);
        session_fence_start(session);
    }
    if (space->grace_linked) {
        g_queue_unlink(&server->grace_spaces, &space->grace_link);
        space->grace_linked = false;
    }
    return space->grace_fence_pending > 0;
}

static gboolean lockspace_dispute_cb(gpointer opaque)
{
    ExtlockdLockSpace *space = opaque;

    space->dispute_timer = 0;
    /*
     * Only if the grace period would have ended by now: else it ends as
     * usual, when every session is done reclaiming or at its timeout
     */
    if (space->in_grace &&
        (space->grace_timed_out || space->reclaimers.length == 0)) {
        lockspace_end_grace(space, space->grace_timed_out);
    }
    lockspace_unref(space);
    return G_SOURCE_REMOVE;
}

/*
 * A reclaim conflict is pending in @space: the grace period may not end
 * before it is over.  Returns true if the end was postponed (a timer
 * comes back).
 */
static bool lockspace_dispute_postpone(ExtlockdLockSpace *space, bool timeout)
{
    ExtlockdServer *server = space->server;
    int64_t now = g_get_monotonic_time();

    if (space->dispute_until_us <= now) {
        return false;
    }
    space->grace_timed_out |= timeout;
    if (timeout && space->grace_linked) {
        /* lockspace_end_grace_all() would come back to it at once */
        g_queue_unlink(&server->grace_spaces, &space->grace_link);
        space->grace_linked = false;
    }
    if (!space->dispute_timer) {
        space->nsessions++;
        space->dispute_timer = g_timeout_add(
            (guint)((space->dispute_until_us - now + 999) / 1000),
            lockspace_dispute_cb, space);
    }
    return true;
}

static void lockspace_end_grace(ExtlockdLockSpace *space, bool timeout)
{
    ExtlockdServer *server = space->server;
    g_autoptr(GPtrArray) drop = g_ptr_array_new();
    unsigned nlate = 0, ndeferred = space->deferred.length;
    GList *l;

    g_assert(space->in_grace);
    if (lockspace_dispute_postpone(space, timeout)) {
        return;
    }
    if (space->grace_fence_pending ||
        (timeout && server->fencer && lockspace_fence_absent(space))) {
        /* Waits for the fence agent: session_fence_cb comes back */
        return;
    }
    space->in_grace = false;
    if (space->grace_linked) {
        g_queue_unlink(&server->grace_spaces, &space->grace_link);
        space->grace_linked = false;
    }
    if (space->disputed) {
        g_array_set_size(space->disputed, 0);
    }
    space->nsessions++;         /* keep @space while sessions go away */
    while ((l = g_queue_pop_head_link(&space->grace_fenced)) != NULL) {
        ExtlockdSession *session = l->data;

        session->grace_fenced = false;
        g_ptr_array_add(drop, session);
    }

    while ((l = g_queue_pop_head_link(&space->reclaimers)) != NULL) {
        ExtlockdSession *session = l->data;

        session->reclaiming = false;
        if (session->restored) {
            g_ptr_array_add(drop, session);
        } else {
            /* Its client may still be busy reclaiming: see reclaim-done */
            session->resend_revokes = true;
            nlate++;
        }
    }

    while ((l = g_queue_pop_head_link(&space->deferred)) != NULL) {
        DeferredReq *d = l->data;
        ExtlockdSession *session = d->lock.owner;

        g_hash_table_remove(session->waiting, &d->lock);
        lockspace_submit(space, session, session->conn, &d->lock, false);
        g_free(d);
    }

    g_message("grace period of lock-space %s ended%s: %u session(s) that "
              "did not come back dropped, %u still reclaiming, %u deferred "
              "request(s) queued", space->name,
              timeout ? " (timeout)" : ", every session reclaimed",
              drop->len, nlate, ndeferred);
    for (guint i = 0; i < drop->len; i++) {
        ExtlockdSession *session = drop->pdata[i];

        g_message("session %s (%s, lock-space %s) dropped: it did not "
                  "come back during the grace period", session->id,
                  session->client_id, session->space->name);
        session_destroy_nosave(session);
    }
    if (drop->len) {
        server_save_state_or_warn(server);
    }
    lockspace_unref(space);
}

/* The grace period timer ran out (called from the lease timer) */
static void lockspace_end_grace_all(ExtlockdServer *server)
{
    GList *l;

    while ((l = server->grace_spaces.head) != NULL) {
        lockspace_end_grace(l->data, true);
    }
}

void extlockd_server_restore(ExtlockdServer *server, GPtrArray *sessions)
{
    int64_t now = g_get_monotonic_time();

    if (!sessions || sessions->len == 0) {
        return;
    }
    if (server->cfg.grace_ms == 0) {
        g_message("no grace period: the %u session(s) of the previous run "
                  "are dropped", sessions->len);
        return;
    }
    server->grace_end_us = now + (int64_t)server->cfg.grace_ms * 1000;
    for (guint i = 0; i < sessions->len; i++) {
        const ExtlockdStateSession *ss = sessions->pdata[i];
        ExtlockdSession *session;

        if (g_hash_table_contains(server->sessions, ss->session)) {
            continue;
        }
        /* Unknown (old file): the longest a client may have had */
        session = session_alloc(server, ss->session, ss->client_id,
                                ss->lock_space,
                                ss->lease_ms ? ss->lease_ms
                                             : EXTLOCK_MAX_LEASE_MS,
                                now);
        session->owner = g_strdup(ss->owner);
        session_identity_add(session);
        if (ss->fence_margin_ms) {
            session->fence_margin_ms = ss->fence_margin_ms;
        }
        if (ss->secret_sha256) {
            g_strlcpy(session->secret_sha256, ss->secret_sha256,
                      sizeof(session->secret_sha256));
        }
        /* It ends with the grace period unless its client comes back */
        session->deadline_us = server->grace_end_us;
        session->restored = true;
        session->reclaiming = true;
        g_queue_push_tail_link(&session->space->reclaimers,
                               &session->reclaim_link);
        if (!session->space->in_grace) {
            session->space->in_grace = true;
            session->space->grace_link.data = session->space;
            g_queue_push_tail_link(&server->grace_spaces,
                                   &session->space->grace_link);
            session->space->grace_linked = true;
        }
    }
    g_message("grace period of %u ms: %u session(s) in %u lock-space(s) "
              "may reclaim their locks", server->cfg.grace_ms, sessions->len,
              server->grace_spaces.length);
    server_schedule(server, server->grace_end_us);
}

/* ------------------------------------------------------------------ */
/* Lease timer                                                         */

static void server_check_deadlines(ExtlockdServer *server)
{
    int64_t now = g_get_monotonic_time();
    int64_t margin_us = server->cfg.fence_margin_ms * 1000LL;
    int64_t next = INT64_MAX;
    GList *l, *lnext;

    if (server->grace_spaces.length) {
        if (now >= server->grace_end_us) {
            lockspace_end_grace_all(server);
        } else {
            next = server->grace_end_us;
        }
    }
    for (l = server->session_list.head; l; l = lnext) {
        ExtlockdSession *session = l->data;

        lnext = l->next;
        if (session->state != SESSION_EXPIRED && now >= session->deadline_us) {
            session_expire(session);
        }
        if (session->grace_fenced) {
            /* Dropped when the grace period of its lock-space ends */
            continue;
        }
        if (session->state == SESSION_EXPIRED) {
            if (session->fence && !session->fence_ok) {
                /* Waits for the agent: session_fence_cb comes back */
                continue;
            }
            if (now >= session->deadline_us + margin_us) {
                session_reap(session);
                continue;
            }
            next = MIN(next, session->deadline_us + margin_us);
        } else {
            next = MIN(next, session->deadline_us);
        }
    }
    /* Connections that never said hello, oldest first */
    while ((l = server->unauth.head) != NULL) {
        ExtlockdConn *conn = l->data;
        int64_t due = conn->accepted_us + server->cfg.hello_timeout_ms * 1000LL;

        if (now < due) {
            next = MIN(next, due);
            break;
        }
        g_message("%s: closed: no hello within %u ms%s", conn->peer,
                  server->cfg.hello_timeout_ms,
                  conn->handshaking ? " (TLS handshake unfinished)" : "");
        conn_unauth_done(conn);
        if (conn->handshaking) {
            conn_destroy(conn);
            continue;
        }
        conn_send_error(conn, false, 0, EXTLOCK_ERR_STATE,
                        "no hello within %u ms: closing",
                        server->cfg.hello_timeout_ms);
        conn_close_after_flush(conn);
        next = MIN(next, conn->closing_since_us + CLOSE_TIMEOUT_US);
    }
    for (l = server->conns.head; l; l = lnext) {
        ExtlockdConn *conn = l->data;

        lnext = l->next;
        if (!conn->closing) {
            continue;
        }
        if (now - conn->closing_since_us >= CLOSE_TIMEOUT_US) {
            VERBOSE(server, "%s: closing without flushing", conn->peer);
            conn_destroy(conn);
            continue;
        }
        next = MIN(next, conn->closing_since_us + CLOSE_TIMEOUT_US);
    }
    if (next != INT64_MAX) {
        server_schedule(server, next);
    }
}

static gboolean server_on_timer(gpointer opaque)
{
    ExtlockdServer *server = opaque;

    server->timer = 0;
    server_check_deadlines(server);
    conn_flush_all(server);
    return G_SOURCE_REMOVE;
}

/* Make sure the timer runs no later than @when_us */
static void server_schedule(ExtlockdServer *server, int64_t when_us)
{
    int64_t now, delay_ms;

    if (server->timer && server->timer_due_us <= when_us) {
        return;
    }
    if (server->timer) {
        g_source_remove(server->timer);
    }
    now = g_get_monotonic_time();
    delay_ms = when_us > now ? (when_us - now + 999) / 1000 : 0;
    server->timer = g_timeout_add((guint)MIN(delay_ms, (int64_t)G_MAXUINT),
                                  server_on_timer, server);
    server->timer_due_us = when_us;
}

/* ------------------------------------------------------------------ */
/* Status                                                              */

typedef struct StatusCtx {
    ExtlockdLockSpace *space;
    ExtlockdSession *self;       /* non-admin viewer: only it is named */
    int64_t now;
    json_object *held;
    json_object *waiting;
    json_object *blocked_by;
    GHashTable *seen;
    uint64_t limit;              /* entries this reply may still list */
    uint64_t listed;
    uint64_t truncated;          /* left out: over the limit */
} StatusCtx;

static void status_add_int(json_object *obj, const char *key, int64_t v)
{
    json_object_object_add(obj, key, json_object_new_int64(v));
}

static void status_add_str(json_object *obj, const char *key, const char *v)
{
    json_object_object_add(obj, key, json_object_new_string(v));
}

static void status_blocker_cb(ExtlockLock *blocker, void *opaque)
{
    StatusCtx *ctx = opaque;
    ExtlockdSession *session = blocker->owner;
    char *name = session->client_id;

    if (ctx->self && session != ctx->self) {
        name = (char *)"(other client)";
    }
    if (g_hash_table_add(ctx->seen, name)) {
        json_object_array_add(ctx->blocked_by, json_object_new_string(name));
    }
}

static void status_lock_cb(ExtlockLock *lock, void *opaque)
{
    StatusCtx *ctx = opaque;
    ExtlockdSession *session = lock->owner;
    json_object *o;

    if (ctx->listed >= ctx->limit) {
        ctx->truncated++;
        return;
    }
    ctx->listed++;
    o = json_object_new_object();
    if (lock->state == EXTLOCK_LOCK_GRANTED) {
        status_add_int(o, "lock", lock->id);
    } else {
        status_add_int(o, "request", lock->user_tag);
    }
    if (!ctx->self || session == ctx->self) {
        status_add_str(o, "session", session->id);
        status_add_str(o, "client-id", session->client_id);
    }
    status_add_int(o, "offset", lock->node.ext.start);
    status_add_int(o, "length", lock->node.ext.end - lock->node.ext.start);
    status_add_str(o, "mode", extlock_mode_name(lock->mode));
    status_add_int(o, "token", lock->token);
    if (lockspace_lock_is_deferred(lock)) {
        /* Queued outside the table until the grace period ends */
        status_add_int(o, "waited-ms", (ctx->now - lock->queued_us) / 1000);
        json_object_object_add(o, "blocked-by", json_object_new_array());
        json_object_object_add(o, "deferred", json_object_new_boolean(1));
        json_object_array_add(ctx->waiting, o);
    } else if (lock->state == EXTLOCK_LOCK_GRANTED) {
        status_add_int(o, "held-ms", (ctx->now - lock->granted_us) / 1000);
        if (lock->limit.start != lock->requested.start ||
            lock->limit.end != lock->requested.end) {
            /* It may have grown: what was asked for */
            status_add_int(o, "requested-offset", lock->requested.start);
            status_add_int(o, "requested-length",
                           lock->requested.end - lock->requested.start);
        }
        json_object_array_add(ctx->held, o);
    } else {
        status_add_int(o, "waited-ms", (ctx->now - lock->queued_us) / 1000);
        ctx->blocked_by = json_object_new_array();
        ctx->seen = g_hash_table_new(g_str_hash, g_str_equal);
        /* Cheap however many locks overlap: some may be left out */
        extlock_table_foreach_blocker_max(ctx->space->table, lock,
                                          STATUS_BLOCKER_VISITS,
                                          status_blocker_cb, ctx);
        g_hash_table_destroy(ctx->seen);
        json_object_object_add(o, "blocked-by", ctx->blocked_by);
        json_object_array_add(ctx->waiting, o);
    }
}

static int status_compare_names(gconstpointer a, gconstpointer b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/*
 * The status of @space; it lists at most *@limit locks and requests and
 * takes those it lists off *@limit
 */
static json_object *status_lockspace(ExtlockdLockSpace *space, int64_t now,
                                     ExtlockdSession *self, uint64_t *limit)
{
    const ExtlockTableStats *st = extlock_table_stats(space->table);
    json_object *o = json_object_new_object();
    json_object *counters = json_object_new_object();
    StatusCtx ctx = {
        .space = space,
        .self = self,
        .now = now,
        .held = json_object_new_array(),
        .waiting = json_object_new_array(),
        .limit = *limit,
    };

    status_add_str(o, "name", space->name);
    status_add_int(counters, "requests", st->requests + space->nowait_grants);
    status_add_int(counters, "immediate-grants",
                   st->immediate_grants + space->nowait_grants);
    status_add_int(counters, "waits", st->waits);
    status_add_int(counters, "deferred-grants", st->deferred_grants);
    status_add_int(counters, "releases", st->releases);
    status_add_int(counters, "partial-releases", st->partial_releases);
    status_add_int(counters, "cancels", st->cancels);
    status_add_int(counters, "total-wait-us", st->total_wait_us);
    status_add_int(counters, "grown-grants", st->grown_grants);
    status_add_int(counters, "revokes-sent", space->revokes_sent);
    status_add_int(counters, "downgrades", st->downgrades);
    status_add_int(counters, "reclaims", space->reclaims);
    json_object_object_add(o, "counters", counters);
    status_add_int(o, "grace-remaining-ms", lockspace_grace_remaining_ms(space,
                                                                         now));
    extlock_table_foreach(space->table, status_lock_cb, &ctx);
    for (GList *l = space->deferred.head; l; l = l->next) {
        status_lock_cb(&((DeferredReq *)l->data)->lock, &ctx);
    }
    json_object_object_add(o, "held", ctx.held);
    json_object_object_add(o, "waiting", ctx.waiting);
    if (ctx.truncated) {
        status_add_int(o, "truncated", ctx.truncated);
    }
    *limit -= ctx.listed;
    return o;
}

static json_object *status_session(ExtlockdSession *session, int64_t now)
{
    json_object *o = json_object_new_object();
    int64_t remaining = 0;

    if (session->state != SESSION_EXPIRED && session->deadline_us > now) {
        remaining = (session->deadline_us - now) / 1000;
    }
    status_add_str(o, "session", session->id);
    status_add_str(o, "client-id", session->client_id);
    status_add_str(o, "lock-space", session->space->name);
    status_add_str(o, "owner", session->owner ? session->owner : "(unknown)");
    status_add_str(o, "state", session_state_names[session->state]);
    status_add_int(o, "lease-remaining-ms", remaining);
    status_add_int(o, "locks-held", g_hash_table_size(session->held));
    status_add_int(o, "requests-waiting", g_hash_table_size(session->waiting));
    json_object_object_add(o, "reclaiming",
                           json_object_new_boolean(session->reclaiming));
    if (session->fence) {
        static const char *const names[] = {
            [EXTLOCKD_FENCE_RUNNING] = "running",
            [EXTLOCKD_FENCE_OK] = "succeeded",
            [EXTLOCKD_FENCE_FAILED] = "failed",
        };
        const char *msg = extlockd_fence_message(session->fence);

        status_add_str(o, "fence", names[extlockd_fence_state(session->fence)]);
        status_add_int(o, "fence-attempts",
                       extlockd_fence_attempts(session->fence));
        if (msg) {
            status_add_str(o, "fence-message", msg);
        }
    }
    return o;
}

/*
 * The status as seen by @viewer: admins see everything; others see the
 * counters, their own session and their own lock-space, where the locks of
 * other clients are listed without session or client-id.  Resume secrets
 * are never shown.
 */
static json_object *status_server(ExtlockdServer *server, ExtlockdConn *viewer,
                                  uint64_t *limit)
{
    ExtlockdSession *self = NULL;
    int64_t now = g_get_monotonic_time();
    json_object *root = json_object_new_object();
    json_object *counters = json_object_new_object();
    json_object *spaces = json_object_new_array();
    json_object *sessions = json_object_new_array();
    g_autoptr(GPtrArray) names = g_ptr_array_new();
    GHashTableIter iter;
    gpointer key;

    status_add_str(root, "server", EXTLOCKD_SERVER_NAME);
    status_add_int(root, "epoch", server->epoch);
    status_add_int(root, "uptime-ms", (now - server->start_us) / 1000);
    status_add_int(root, "lease-ms", server->cfg.lease_ms);
    status_add_int(root, "fence-margin-ms", server->cfg.fence_margin_ms);
    status_add_int(root, "grace-ms", server->cfg.grace_ms);
    status_add_int(root, "start-ns", server->start_us * 1000);
    if (server->fencer) {
        status_add_str(root, "fence-agent",
                       extlockd_fencer_agent(server->fencer));
        status_add_int(root, "fence-timeout-ms",
                       extlockd_fencer_timeout_ms(server->fencer));
    }
    status_add_int(root, "grace-remaining-ms",
                   server->grace_spaces.length && server->grace_end_us > now ?
                   (server->grace_end_us - now + 999) / 1000 : 0);
    status_add_int(counters, "connections", server->conns.length);
    status_add_int(counters, "sessions", g_hash_table_size(server->sessions));
    status_add_int(counters, "messages", server->nmessages);
    status_add_int(counters, "errors", server->nerrors);
    status_add_int(counters, "refused-connections", server->refused);
    json_object_object_add(root, "counters", counters);
    if (viewer->identity) {
        status_add_str(root, "identity", viewer->identity);
    }
    if (!extlockd_policy_is_admin(server->policy, viewer->identity)) {
        self = viewer->session;
        g_assert(self);
        json_object_array_add(spaces, status_lockspace(self->space, now, self,
                                                       limit));
        json_object_object_add(root, "lock-spaces", spaces);
        json_object_array_add(sessions, status_session(self, now));
        json_object_object_add(root, "sessions", sessions);
        return root;
    }

    g_hash_table_iter_init(&iter, server->spaces);
    while (g_hash_table_iter_next(&iter, &key, NULL)) {
        g_ptr_array_add(names, key);
    }
    g_ptr_array_sort(names, status_compare_names);
    for (guint i = 0; i < names->len; i++) {
        ExtlockdLockSpace *space = g_hash_table_lookup(server->spaces,
                                                       names->pdata[i]);
        json_object_array_add(spaces, status_lockspace(space, now, NULL,
                                                       limit));
    }
    json_object_object_add(root, "lock-spaces", spaces);

    for (GList *l = server->session_list.head; l; l = l->next) {
        json_object_array_add(sessions, status_session(l->data, now));
    }
    json_object_object_add(root, "sessions", sessions);
    return root;
}

/* ------------------------------------------------------------------ */
/* Requests                                                            */

/* A token bucket: status_rate per second, as many at once */
static bool status_rate_ok(ExtlockdConn *conn)
{
    uint32_t rate = conn->server->cfg.status_rate;
    int64_t now = g_get_monotonic_time();
    int64_t interval = G_USEC_PER_SEC / rate;

    if (now >= conn->status_refill_us) {
        int64_t n = (now - conn->status_refill_us) / interval + 1;

        conn->status_tokens = MIN(conn->status_tokens + n, rate);
        conn->status_refill_us += n * interval;
    }
    if (conn->status_tokens == 0) {
        return false;
    }
    conn->status_tokens--;
    return true;
}

/*
 * How many locks and requests a status for @admin may list now: the
 * per-reply cap, or less when the server-wide budget is low
 */
static uint64_t status_budget_take(ExtlockdServer *server, bool admin)
{
    int64_t now = g_get_monotonic_time();
    uint64_t refill;

    refill = (uint64_t)(now - server->status_budget_us) *
             EXTLOCKD_STATUS_ENTRIES_PER_SEC / G_USEC_PER_SEC;
    if (refill) {
        server->status_budget = MIN(server->status_budget + refill,
                                    EXTLOCKD_STATUS_ENTRIES_PER_SEC);
        server->status_budget_us = now;
    }
    return MIN(server->status_budget, admin ? EXTLOCKD_STATUS_MAX_ENTRIES_ADMIN
                                       : EXTLOCKD_STATUS_MAX_ENTRIES);
}

static void status_handle(ExtlockdConn *conn, ExtlockMsg *m)
{
    ExtlockdServer *server = conn->server;
    bool admin = extlockd_policy_is_admin(server->policy, conn->identity);
    bool idle = conn->out_pos == conn->out->len;
    ExtlockMsg r;
    size_t before;
    uint64_t limit, granted;

    if (!conn->session && !admin) {
        server_log_refusal(server,
                           "%s: status refused: identity %s is not an admin "
                           "and has not said hello", conn->peer,
                           conn->identity);
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_DENIED,
                        "status before hello needs an admin identity (this "
                        "connection is %s)", conn->identity);
        return;
    }
    /* Root and the daemon's uid on the UNIX socket are not limited */
    if (!(admin && g_str_has_prefix(conn->identity, "uid:")) &&
        !status_rate_ok(conn)) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_LIMIT,
                        "too many status requests (limit %u per second, "
                        "--status-rate)", server->cfg.status_rate);
        return;
    }
    extlock_msg_init(&r, EXTLOCK_MSG_STATUS_REPLY);
    r.has_id = m->has_id;
    r.id = m->id;
    limit = granted = status_budget_take(server, admin);
    r.body = status_server(server, conn, &limit);
    server->status_budget -= granted - limit;
    before = conn->out->len;
    conn_send_msg(conn, &r);
    json_object_put(r.body);
    /*
     * A status bigger than the output limit is not a sign of a client
     * that does not read, but only when it had read everything before:
     * statuses piling up unread count against the limit
     */
    if (idle) {
        conn->out_allowance += conn->out->len - before;
    }
}

static int session_compare_lock_info(gconstpointer a, gconstpointer b)
{
    const ExtlockLockInfo *x = a, *y = b;

    if (x->offset != y->offset) {
        return x->offset < y->offset ? -1 : 1;
    }
    return x->lock < y->lock ? -1 : x->lock > y->lock;
}

typedef enum WelcomeKind {
    WELCOME_NEW,
    WELCOME_RESUMED,            /* "resumed": true and the held locks */
    WELCOME_RECLAIM,            /* "reclaim": true */
} WelcomeKind;

static void session_send_welcome(ExtlockdConn *conn, ExtlockMsg *m,
                                 ExtlockdSession *session,
                                 WelcomeKind kind)
{
    ExtlockdServer *server = conn->server;
    ExtlockMsg r;

    extlock_msg_init(&r, EXTLOCK_MSG_WELCOME);
    r.has_id = m->has_id;
    r.id = m->id;
    r.version = EXTLOCK_PROTOCOL_VERSION;
    r.session = session->id;
    r.lease_ms = session->lease_ms;
    r.epoch = server->epoch;
    r.server = (char *)EXTLOCKD_SERVER_NAME;
    r.grace_remaining_ms = lockspace_grace_remaining_ms(session->space,
                                                        g_get_monotonic_time());
    r.reclaim = kind == WELCOME_RECLAIM;
    r.resumed = kind == WELCOME_RESUMED;
    r.has_fence_margin = true;
    r.fence_margin_ms = server->cfg.fence_margin_ms;
    /* Only ever sent to the owner, on its own connection */
    r.resume_secret = session->secret;
    r.identity = conn->identity;
    if (kind == WELCOME_RESUMED) {
        GHashTableIter iter;
        gpointer key;

        g_array_set_size(server->locks, 0);
        g_hash_table_iter_init(&iter, session->held);
        while (g_hash_table_iter_next(&iter, &key, NULL)) {
            ExtlockLock *lock = key;
            ExtlockLockInfo info = {
                .lock = lock->id,
                .offset = lock->node.ext.start,
                .length = lock->node.ext.end - lock->node.ext.start,
                .mode = lock->mode,
                .token = lock->token,
            };
            g_array_append_val(server->locks, info);
        }
        g_array_sort(server->locks, session_compare_lock_info);
        r.locks = server->locks;
    }
    conn_send_msg(conn, &r);
}

/*
 * @session is taken over by @conn: the old connection may be dead without us
 * having noticed yet (e.g. TCP after a network failure).  The client has
 * proven it owns the session, so the session moves to the new
 * connection.  Requests still waiting on the old connection are
 * cancelled, exactly as if it had dropped.
 */
static void session_take_over(ExtlockdSession *session)
{
    ExtlockdConn *old = session->conn;

    g_message("session %s (%s) taken over by a new connection; "
              "closing the old one", session->id, session->client_id);
    session_release(session, false);
    old->session = NULL;
    session->conn = NULL;
    conn_close_after_flush(old);
}

/* hello with "session" of a live session */
static void session_handle_resume(ExtlockdConn *conn, ExtlockMsg *m,
                                  ExtlockdSession *session,
                                  uint32_t lease_ms, int64_t now)
{
    if (session->conn) {
        session_take_over(session);
    }
    session_attach(session, conn, lease_ms, now);
    g_message("session %s (%s, lock-space %s) resumed on %s with %u locks",
              session->id, session->client_id, session->space->name, conn->peer,
              g_hash_table_size(session->held));
    session_send_welcome(conn, m, session, WELCOME_RESUMED);
    /* Revokes sent while it was away are lost: send them again */
    lockspace_resend_revokes(session);
}

/*
 * Send the welcome for @session once the state writer has written what it says
 * (@old_sha256: a reclaim, with the previous secret's hash).  Until then
 * the connection's input waits too: requests after hello need the welcome
 * first.
 */
static void session_defer_welcome(ExtlockdConn *conn, ExtlockMsg *m,
                                  ExtlockdSession *session,
                                  const char *old_sha256)
{
    ExtlockdServer *server = conn->server;
    DeferredWelcome *dw = g_new0(DeferredWelcome, 1);

    dw->gen = server_save_state_async(server);
    dw->conn_serial = conn->serial;
    g_strlcpy(dw->session, session->id, sizeof(dw->session));
    dw->has_id = m->has_id;
    dw->id = m->id;
    if (old_sha256) {
        dw->reclaim = true;
        g_strlcpy(dw->old_sha256, old_sha256, sizeof(dw->old_sha256));
    }
    g_queue_push_tail(&server->welcomes, dw);
    conn->awaiting_state = true;
    conn_set_events(conn, conn->events & ~G_IO_IN);
}

/* hello with "session" of a session listed in the state file, in grace */
static void session_handle_reclaim_hello(ExtlockdConn *conn, ExtlockMsg *m,
                                         ExtlockdSession *session,
                                         uint32_t lease_ms,
                                         int64_t now)
{
    char old_sha256[sizeof(session->secret_sha256)];
    unsigned n;

    /*
     * Only the hash of the old secret survived the restart: hand out a
     * new one, durable before the client learns it (the welcome waits for
     * the state writer), and with it this run's fence margin if it is
     * larger than the one recorded
     */
    memcpy(old_sha256, session->secret_sha256, sizeof(old_sha256));
    session->fence_margin_ms = MAX(session->fence_margin_ms,
                                   conn->server->cfg.fence_margin_ms);
    if (!session_new_secret(session)) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_INTERNAL,
                        "cannot generate a resume secret");
        return;
    }
    if (session->conn) {
        session_take_over(session);
    }
    /*
     * It came back before, reclaimed some locks and lost its connection
     * again: it reclaims everything anew.  Nothing waits in the table of
     * a lock-space in grace, so releasing grants nothing.
     */
    n = session_release(session, true);
    session_attach(session, conn, lease_ms, now);
    g_message("session %s (%s, lock-space %s) is back on %s after the "
              "restart and may reclaim its locks for %" PRId64 " ms%s",
              session->id, session->client_id, session->space->name, conn->peer,
              lockspace_grace_remaining_ms(session->space, now),
              n ? " (locks it had reclaimed already were dropped)" : "");
    session_defer_welcome(conn, m, session, old_sha256);
}

static void session_handle_hello(ExtlockdConn *conn, ExtlockMsg *m)
{
    ExtlockdServer *server = conn->server;
    ExtlockdSession *session;
    int64_t now = g_get_monotonic_time();
    g_autofree char *why = NULL;
    uint32_t lease_ms;

    if (conn->session) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_STATE,
                        "this connection already has session %s",
                        conn->session->id);
        return;
    }
    if (m->version != EXTLOCK_PROTOCOL_VERSION) {
        server_log_refusal(server,
                           "%s: hello with protocol version %u refused (this "
                           "server speaks version %d)", conn->peer, m->version,
                           EXTLOCK_PROTOCOL_VERSION);
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_VERSION,
                        "protocol version %u is not supported: this "
                        "server speaks version %d only (version 2 sessions "
                        "are resumed with the resume-secret of their "
                        "welcome); upgrade the client", m->version,
                        EXTLOCK_PROTOCOL_VERSION);
        return;
    }
    if (!m->client_id || !m->lock_space) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_INVALID,
                        "hello needs \"client-id\" and \"lock-space\"");
        return;
    }
    lease_ms = m->lease_ms ? m->lease_ms : server->cfg.lease_ms;
    if (lease_ms < EXTLOCK_MIN_LEASE_MS || lease_ms > EXTLOCK_MAX_LEASE_MS) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_INVALID,
                        "lease-ms %u is outside [%d, %d]", lease_ms,
                        EXTLOCK_MIN_LEASE_MS, EXTLOCK_MAX_LEASE_MS);
        return;
    }
    if (!extlockd_policy_allows(server->policy, conn->identity, m->lock_space,
                                m->client_id, &why)) {
        server_log_refusal(server, "%s: hello refused: %s", conn->peer, why);
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_DENIED, "%s", why);
        return;
    }
    if (m->session) {
        session = g_hash_table_lookup(server->sessions, m->session);
        if (session && (!session->owner || strcmp(session->owner,
                                                  conn->identity) != 0 ||
                        !session_secret_ok(session, m->resume_secret))) {
            /* Nothing changes for the owner: no take-over, no reclaim */
            server_log_refusal(server,
                               "%s: identity %s may not resume session %s "
                               "(%s): %s", conn->peer, conn->identity,
                               session->id,
                               session->client_id,
                               !session->owner ? "it has no recorded owner" :
                               strcmp(session->owner, conn->identity) != 0 ?
                               "it belongs to another identity" :
                               "wrong or missing resume-secret");
            conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_DENIED,
                            "session %s cannot be resumed by this identity "
                            "(%s) with %s resume-secret", m->session,
                            conn->identity, m->resume_secret ? "this" : "no");
            return;
        }
        if (session && (strcmp(session->client_id, m->client_id) != 0 ||
                        strcmp(session->space->name, m->lock_space) != 0)) {
            conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_NOT_FOUND,
                            "session %s does not belong to client-id %s in "
                            "lock-space %s", m->session, m->client_id,
                            m->lock_space);
            return;
        }
        if (session && (session->reclaiming ||
                        (session->state != SESSION_EXPIRED &&
                         now < session->deadline_us)) &&
            lease_ms > session->lease_ms) {
            /*
             * A longer lease must be in the state file before it is in
             * force: a restarted coordinator's grace period covers it
             */
            g_autoptr(GError) err = NULL;
            uint32_t old = session->lease_ms;

            session->lease_ms = lease_ms;
            if (!server_save_state(server, server->epoch, &err)) {
                session->lease_ms = old;
                g_warning("cannot record the longer lease of session %s in "
                          "the state file: %s", session->id, err->message);
                conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_INTERNAL,
                                "cannot record the lease in the state file");
                return;
            }
        }
        if (session && session->reclaiming) {
            session_handle_reclaim_hello(conn, m, session, lease_ms, now);
            return;
        }
        if (session && session->state != SESSION_EXPIRED &&
            now < session->deadline_us) {
            session_handle_resume(conn, m, session, lease_ms, now);
            return;
        }
        /* Unknown or expired: its locks are gone, start afresh */
    }
    if (g_hash_table_size(server->sessions) >= server->cfg.max_sessions) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_LIMIT,
                        "too many sessions (limit %u)",
                        server->cfg.max_sessions);
        return;
    }
    if (session_count_identity(server, conn->identity) >=
        server->cfg.max_sessions_per_identity) {
        server_log_refusal(server,
                           "%s: hello refused: identity %s has %u sessions "
                           "(--max-sessions-per-identity)", conn->peer,
                           conn->identity,
                           session_count_identity(server, conn->identity));
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_LIMIT,
                        "too many sessions of identity %s (limit %u per "
                        "identity, --max-sessions-per-identity): end some with "
                        "bye, or let them expire", conn->identity,
                        server->cfg.max_sessions_per_identity);
        return;
    }
    session = session_alloc(server, NULL, m->client_id, m->lock_space, lease_ms,
                            now);
    session->owner = g_strdup(conn->identity);
    session_identity_add(session);
    if (!session_new_secret(session)) {
        session_destroy_nosave(session);
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_INTERNAL,
                        "cannot generate a resume secret");
        return;
    }
    session_attach(session, conn, lease_ms, now);
    /* The session is durable before the client learns about it */
    session_defer_welcome(conn, m, session, NULL);
    if (m->session) {
        g_message("session %s (%s, lock-space %s) started on %s, lease %u "
                  "ms, replacing session %s, which is unknown or expired",
                  session->id, session->client_id, session->space->name,
                  conn->peer, lease_ms,
                  m->session);
    } else {
        g_message("session %s (%s, lock-space %s) started on %s by %s, "
                  "lease %u ms", session->id, session->client_id,
                  session->space->name,
                  conn->peer, conn->identity, lease_ms);
    }
}

static void lockspace_handle_lock(ExtlockdConn *conn, ExtlockdSession *session,
                                  ExtlockMsg *m)
{
    ExtlockdServer *server = conn->server;
    ExtlockdLockSpace *space = session->space;
    ExtlockLock req;
    ExtlockLock *lock;
    uint64_t token;
    unsigned count;

    if (!extlock_extent_valid(m->offset, m->length)) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_RANGE,
                        "invalid extent offset %" PRIu64 " length %" PRIu64,
                        m->offset, m->length);
        return;
    }
    memset(&req, 0, sizeof(req));
    req.requested.start = m->offset;
    req.requested.end = m->offset + m->length;
    req.limit = req.requested;
    if (m->has_limit) {
        if (!extlock_extent_valid(m->limit_offset, m->limit_length) ||
            m->limit_offset > m->offset ||
            m->limit_offset + m->limit_length < m->offset + m->length) {
            conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_RANGE,
                            "limit [%" PRIu64 ", +%" PRIu64 ") does not "
                            "contain the requested extent", m->limit_offset,
                            m->limit_length);
            return;
        }
        req.limit.start = m->limit_offset;
        req.limit.end = m->limit_offset + m->limit_length;
    }
    count = g_hash_table_size(session->held) +
            g_hash_table_size(session->waiting);
    if (count >= server->cfg.max_locks_per_session) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_LIMIT,
                        "session has %u locks and waiting requests (limit %u)",
                        count, server->cfg.max_locks_per_session);
        return;
    }
    if (session_find_waiting(session, m->id)) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_INVALID,
                        "request %" PRIu64 " is already waiting", m->id);
        return;
    }
    if (G_UNLIKELY(space->in_grace) && !m->wait) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_GRACE,
                        "lock-space %s is in its restart grace period for "
                        "another %" PRId64 " ms", space->name,
                        lockspace_grace_remaining_ms(space,
                                                     g_get_monotonic_time()));
        return;
    }
    if (!server_next_token(server, &token)) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_INTERNAL,
                        "cannot persist a new token epoch");
        return;
    }
    req.mode = m->mode;
    req.token = token;
    req.user_tag = m->id;

    if (m->wait) {
        if (m->has_limit) {
            /* It caches locks: it wants to know when to give them back */
            session_set_revocable(session);
        }
        if (G_UNLIKELY(space->in_grace)) {
            lockspace_defer(space, session, conn, &req);
        } else {
            lockspace_submit(space, session, conn, &req, true);
        }
        return;
    }
    /*
     * A request is granted at once exactly when nothing held or waiting
     * conflicts with it, which is what reclaim checks; on a conflict it
     * changes nothing.  Such a lock does not grow.
     */
    lock = extlock_table_reclaim(space->table, req.requested, m->mode, token,
                                 session, m->id);
    if (!lock) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_WOULD_BLOCK,
                        "[%" PRIu64 ", +%" PRIu64 ") %s conflicts with "
                        "a held or waiting lock", m->offset, m->length,
                        extlock_mode_name(m->mode));
        return;
    }
    space->nowait_grants++;
    if (m->has_limit) {
        session_set_revocable(session);
    }
    g_hash_table_add(session->held, lock);
    lockspace_log_lock(server, "grant", lock, NULL);
    lockspace_send_granted(conn, lock);
}

static void lockspace_handle_unlock(ExtlockdConn *conn,
                                    ExtlockdSession *session,
                                    ExtlockMsg *m)
{
    ExtlockdServer *server = conn->server;
    ExtlockTable *table = session->space->table;
    ExtlockLock *lock = extlock_table_lookup(table, m->lock);
    ExtlockLock *split = NULL;
    ExtlockMsg r;

    if (!lock || lock->owner != session ||
        lock->state != EXTLOCK_LOCK_GRANTED) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_NOT_FOUND,
                        "lock %" PRIu64 " is not held by this session",
                        m->lock);
        return;
    }
    g_array_set_size(server->pieces, 0);
    if (m->has_extent) {
        ExtlockExtent ext = lock->node.ext;
        ExtlockExtent part;

        if (!extlock_extent_valid(m->offset, m->length)) {
            conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_RANGE,
                            "invalid extent offset %" PRIu64 " length %" PRIu64,
                            m->offset, m->length);
            return;
        }
        part.start = m->offset;
        part.end = m->offset + m->length;
        if (part.start < ext.start || part.end > ext.end) {
            conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_RANGE,
                            "[%" PRIu64 ", %" PRIu64 ") is not inside lock %"
                            PRIu64 " [%" PRIu64 ", %" PRIu64 ")", part.start,
                            part.end, lock->id, ext.start, ext.end);
            return;
        }
        if (part.start != ext.start || part.end != ext.end) {
            ExtlockLock *rest = NULL;
            int ret;

            /* Logged first: the release may grant the part to others */
            lockspace_log_lock(server, "release", lock, &part);
            ret = extlock_table_release_part(table, lock, part, &rest,
                                             &split);
            if (ret < 0) {
                conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_INTERNAL,
                                "partial release failed: %s", g_strerror(-ret));
                return;
            }
            if (rest) {
                ExtlockPiece p = {
                    .lock = rest->id,
                    .offset = rest->node.ext.start,
                    .length = rest->node.ext.end - rest->node.ext.start,
                };
                g_array_append_val(server->pieces, p);
            }
            if (split) {
                ExtlockPiece p = {
                    .lock = split->id,
                    .offset = split->node.ext.start,
                    .length = split->node.ext.end - split->node.ext.start,
                };
                g_hash_table_add(session->held, split);
                g_array_append_val(server->pieces, p);
            }
            goto reply;
        }
    }
    g_hash_table_remove(session->held, lock);
    lockspace_log_lock(server, "release", lock, NULL);
    extlock_table_release(table, lock);

reply:
    extlock_msg_init(&r, EXTLOCK_MSG_UNLOCKED);
    r.has_id = m->has_id;
    r.id = m->id;
    r.lock = m->lock;
    r.pieces = server->pieces;
    conn_send_msg(conn, &r);
    if (split) {
        /* A new lock id, which the client knows only from the reply */
        lockspace_revoke_new_lock(table, split);
    }
}

static void lockspace_handle_cancel(ExtlockdConn *conn,
                                    ExtlockdSession *session,
                                    ExtlockMsg *m)
{
    ExtlockLock *lock = session_find_waiting(session, m->request);
    ExtlockMsg r;

    if (!lock) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_NOT_FOUND,
                        "request %" PRIu64 " is not waiting", m->request);
        return;
    }
    g_hash_table_remove(session->waiting, lock);
    lockspace_cancel_waiter(session->space, lock);

    extlock_msg_init(&r, EXTLOCK_MSG_CANCELLED);
    r.has_id = m->has_id;
    r.id = m->id;
    r.request = m->request;
    conn_send_msg(conn, &r);
    extlock_format_error(conn_out(conn), true, m->request,
                         EXTLOCK_ERR_CANCELLED,
                         "lock request cancelled by request %" PRIu64,
                         m->id);
}

static void session_handle_renew(ExtlockdConn *conn, ExtlockdSession *session,
                                 ExtlockMsg *m)
{
    ExtlockMsg r;

    session->deadline_us = g_get_monotonic_time() +
                           (int64_t)session->lease_ms * 1000;
    extlock_msg_init(&r, EXTLOCK_MSG_RENEWED);
    r.has_id = m->has_id;
    r.id = m->id;
    r.lease_ms = session->lease_ms;
    conn_send_msg(conn, &r);
}

static void lockspace_handle_downgrade(ExtlockdConn *conn,
                                       ExtlockdSession *session,
                                       ExtlockMsg *m)
{
    ExtlockTable *table = session->space->table;
    ExtlockLock *lock = extlock_table_lookup(table, m->lock);
    ExtlockMsg r;

    if (!lock || lock->owner != session ||
        lock->state != EXTLOCK_LOCK_GRANTED) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_NOT_FOUND,
                        "lock %" PRIu64 " is not held by this session",
                        m->lock);
        return;
    }
    session_set_revocable(session);
    if (lock->mode == EXTLOCK_MODE_EXCLUSIVE) {
        ExtlockLock shared = *lock;

        shared.mode = EXTLOCK_MODE_SHARED;
        lockspace_log_lock(conn->server, "downgrade", &shared, NULL);
    }
    /* Shared waiters it unblocks are granted (lockspace_grant_cb) */
    extlock_table_downgrade(table, lock);
    extlock_msg_init(&r, EXTLOCK_MSG_DOWNGRADED);
    r.has_id = m->has_id;
    r.id = m->id;
    r.lock = lock->id;
    r.mode = lock->mode;
    conn_send_msg(conn, &r);
}

static void lockspace_reclaim_conflict_cb(ExtlockLock *lock, void *opaque)
{
    g_ptr_array_add(opaque, lock);
}

static bool lockspace_extent_disputed(ExtlockdLockSpace *space,
                                      ExtlockExtent ext)
{
    for (guint i = 0; space->disputed && i < space->disputed->len; i++) {
        ExtlockExtent *d = &g_array_index(space->disputed, ExtlockExtent, i);

        if (d->start < ext.end && ext.start < d->end) {
            return true;
        }
    }
    return false;
}

static void lockspace_add_dispute(ExtlockdLockSpace *space, ExtlockExtent ext,
                                  ExtlockdSession *session, int64_t now)
{
    int64_t until = now + ((int64_t)session->lease_ms +
                           session->fence_margin_ms) * 1000;

    if (!space->disputed) {
        space->disputed = g_array_new(FALSE, FALSE, sizeof(ExtlockExtent));
    }
    g_array_append_val(space->disputed, ext);
    space->dispute_until_us = MAX(space->dispute_until_us, until);
}

/*
 * Session @session reclaims @ext in @mode, which conflicts with locks that
 * other sessions reclaimed before (@others).  The coordinator cannot tell
 * which claim is true (locks are not persisted), so nobody gets the
 * extent: the earlier reclaims are dropped and their sessions told, the
 * extent is disputed (no more reclaims of it) and nothing in the
 * lock-space is granted before every claimant has had its lease and fence
 * margin to stop writing (the grace period is extended).
 */
static void lockspace_reclaim_dispute(ExtlockdSession *session,
                                      ExtlockExtent ext,
                                      ExtlockMode mode, GPtrArray *others)
{
    ExtlockdServer *server = session->server;
    ExtlockdLockSpace *space = session->space;
    int64_t now = g_get_monotonic_time();

    lockspace_add_dispute(space, ext, session, now);
    for (guint i = 0; i < others->len; i++) {
        ExtlockLock *lock = others->pdata[i];
        ExtlockdSession *other = lock->owner;
        ExtlockExtent e = lock->node.ext;

        g_warning("RECLAIM CONFLICT in lock-space %s: session %s (%s, "
                  "identity %s) reclaims [%" PRIu64 ", +%" PRIu64 ") %s, "
                  "which session %s (%s, identity %s) reclaimed as lock %"
                  PRIu64 " [%" PRIu64 ", +%" PRIu64 ") %s: at most one "
                  "of them held it before the restart; neither keeps it, "
                  "and nothing is granted in the lock-space for the next "
                  "%" PRId64 " ms", space->name, session->id,
                  session->client_id,
                  session->owner ? session->owner : "(unknown)", ext.start,
                  ext.end - ext.start, extlock_mode_name(mode), other->id,
                  other->client_id, other->owner ? other->owner : "(unknown)",
                  lock->id, e.start, e.end - e.start,
                  extlock_mode_name(lock->mode),
                  (MAX(space->dispute_until_us,
                       now + ((int64_t)other->lease_ms +
                              other->fence_margin_ms) * 1000) - now) / 1000);
        lockspace_add_dispute(space, e, other, now);
        if (other->conn) {
            ExtlockMsg n;

            /* A notification naming the lock, so the client drops it */
            extlock_msg_init(&n, EXTLOCK_MSG_ERROR);
            n.error = EXTLOCK_ERR_RECLAIM_CONFLICT;
            n.lock = lock->id;
            n.message = g_strdup_printf("lock %" PRIu64 " [%" PRIu64 ", +%"
                                        PRIu64 ") that you reclaimed is "
                                        "dropped: session %s (%s) reclaimed "
                                        "a conflicting lock", lock->id,
                                        e.start, e.end - e.start, session->id,
                                        session->client_id);
            server->nerrors++;
            extlock_msg_format(&n, conn_out(other->conn));
            extlock_msg_clear(&n);
        }
        g_hash_table_remove(other->held, lock);
        lockspace_log_lock(server, "release", lock, NULL);
        extlock_table_release(space->table, lock);
    }
}

/* Re-assert a lock held before the restart, with its original token */
static void lockspace_handle_reclaim(ExtlockdConn *conn,
                                     ExtlockdSession *session,
                                     ExtlockMsg *m)
{
    ExtlockdServer *server = conn->server;
    ExtlockdLockSpace *space = session->space;
    uint64_t epoch = m->token >> EXTLOCKD_COUNTER_BITS;
    ExtlockExtent ext;
    ExtlockLock *lock;
    unsigned count;

    if (!session->reclaiming) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_STATE,
                        "session %s cannot reclaim locks: %s", session->id,
                        space->in_grace ? "it is not listed in the state file "
                        "or has sent reclaim-done"
                        : "its lock-space has no restart grace period");
        return;
    }
    if (!extlock_extent_valid(m->offset, m->length)) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_RANGE,
                        "invalid extent offset %" PRIu64 " length %" PRIu64,
                        m->offset, m->length);
        return;
    }
    if (epoch == 0 || epoch >= server->boot_epoch ||
        (m->token & (EXTLOCKD_COUNTER_LIMIT - 1)) == 0) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_INVALID,
                        "token %" PRIu64 " (epoch %" PRIu64 ") was not handed "
                        "out before this coordinator started in epoch %" PRIu64,
                        m->token, epoch, server->boot_epoch);
        return;
    }
    count = g_hash_table_size(session->held) +
            g_hash_table_size(session->waiting);
    if (count >= server->cfg.max_locks_per_session) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_LIMIT,
                        "session has %u locks and waiting requests (limit %u)",
                        count, server->cfg.max_locks_per_session);
        return;
    }
    ext.start = m->offset;
    ext.end = m->offset + m->length;
    if (lockspace_extent_disputed(space, ext)) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_RECLAIM_CONFLICT,
                        "[%" PRIu64 ", +%" PRIu64 ") is disputed: two sessions "
                        "reclaimed it in conflict; request it anew after the "
                        "grace period", m->offset, m->length);
        return;
    }
    lock = extlock_table_reclaim(space->table, ext, m->mode, m->token, session,
                                 m->id);
    if (!lock) {
        g_autoptr(GPtrArray) others = g_ptr_array_new();
        g_autoptr(GPtrArray) all = g_ptr_array_new();
        ExtlockLock probe = { .mode = m->mode, .token = m->token };

        probe.node.ext = ext;
        extlock_table_foreach_conflict(space->table, &probe,
                                       lockspace_reclaim_conflict_cb, all);
        for (guint i = 0; i < all->len; i++) {
            if (((ExtlockLock *)all->pdata[i])->owner != session) {
                g_ptr_array_add(others, all->pdata[i]);
            }
        }
        if (others->len) {
            lockspace_reclaim_dispute(session, ext, m->mode, others);
            conn_send_error(conn, m->has_id, m->id,
                            EXTLOCK_ERR_RECLAIM_CONFLICT,
                            "[%" PRIu64 ", +%" PRIu64 ") %s conflicts with a "
                            "lock reclaimed by another session: the extent is "
                            "disputed, neither session keeps it; request it "
                            "anew after the grace period", m->offset,
                            m->length, extlock_mode_name(m->mode));
            return;
        }
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_STATE,
                        "[%" PRIu64 ", +%" PRIu64 ") %s conflicts with a lock "
                        "this session reclaimed", m->offset, m->length,
                        extlock_mode_name(m->mode));
        return;
    }
    session_set_revocable(session);
    space->reclaims++;
    g_hash_table_add(session->held, lock);
    lockspace_log_lock(server, "reclaim", lock, NULL);
    lockspace_send_granted(conn, lock);
}

static void lockspace_handle_reclaim_done(ExtlockdConn *conn,
                                          ExtlockdSession *session,
                                          ExtlockMsg *m)
{
    ExtlockMsg r;

    /*
     * The reply goes first: the client reads nothing else until it has
     * it, and the end of the grace period may send it revokes
     */
    extlock_msg_init(&r, EXTLOCK_MSG_RECLAIM_COMPLETE);
    r.has_id = m->has_id;
    r.id = m->id;
    conn_send_msg(conn, &r);
    if (session->reclaiming) {
        g_message("session %s (%s, lock-space %s) reclaimed %u locks",
                  session->id, session->client_id, session->space->name,
                  g_hash_table_size(session->held));
        session_end_reclaim(session);
    }
    if (session->resend_revokes) {
        session->resend_revokes = false;
        lockspace_resend_revokes(session);
    }
}

static void session_handle_bye(ExtlockdConn *conn, ExtlockMsg *m)
{
    ExtlockdSession *session = conn->session;
    ExtlockMsg r;

    if (session) {
        unsigned n = session_release(session, true);

        g_message("session %s (%s, lock-space %s) said bye, released %u "
                  "locks", session->id, session->client_id,
                  session->space->name, n);
        session_destroy(session);
    }
    extlock_msg_init(&r, EXTLOCK_MSG_GOODBYE);
    r.has_id = m->has_id;
    r.id = m->id;
    conn_send_msg(conn, &r);
    conn_close_after_flush(conn);
}

/*
 * Admin: release the locks of an expired session now, without waiting
 * for its fence agent (dangerous: see docs/extlockd.rst)
 */
static void session_handle_release(ExtlockdConn *conn, ExtlockMsg *m)
{
    ExtlockdServer *server = conn->server;
    ExtlockdSession *session = g_hash_table_lookup(server->sessions,
                                                   m->session);
    g_autofree char *fence = NULL;
    ExtlockMsg r;
    unsigned n;

    /*
     * It gives up the fencing guarantee for somebody else's locks: only
     * admins may, and the refusal changes nothing (the session is not
     * even looked up, so its existence is not revealed either)
     */
    if (!conn->identity || !extlockd_policy_is_admin(server->policy,
                                                     conn->identity)) {
        server_log_refusal(server,
                           "%s: release-session of %s refused: identity %s "
                           "is not an admin", conn->peer, m->session,
                           conn->identity ? conn->identity : "(none)");
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_DENIED,
                        "release-session needs an admin identity (this "
                        "connection is %s)",
                        conn->identity ? conn->identity : "unidentified");
        return;
    }
    if (!session) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_NOT_FOUND,
                        "no session %s", m->session);
        return;
    }
    if (session->state != SESSION_EXPIRED) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_STATE,
                        "session %s (%s) is %s, not expired: its lease still "
                        "runs", session->id, session->client_id,
                        session_state_names[session->state]);
        return;
    }
    if (session->fence) {
        fence = g_strdup_printf("fence agent: %s after %u attempt(s)%s%s",
                                extlockd_fence_state(session->fence) ==
                                EXTLOCKD_FENCE_OK ? "succeeded" :
                                extlockd_fence_state(session->fence) ==
                                EXTLOCKD_FENCE_FAILED ? "failed" : "running",
                                extlockd_fence_attempts(session->fence),
                                extlockd_fence_message(session->fence) ?
                                ": " : "",
                                extlockd_fence_message(session->fence) ?: "");
    }
    g_warning("session %s (%s, lock-space %s) FORCE-RELEASED by an "
              "administrator on %s (reason: %s; %s): %u locks released "
              "without waiting for fencing", session->id, session->client_id,
              session->space->name, conn->peer,
              m->message ? m->message : "none given",
              fence ? fence : "no fence agent",
              g_hash_table_size(session->held));
    extlockd_fence_cancel(session->fence);
    session->fence = NULL;
    n = session_release(session, true);
    if (session->grace_fenced) {
        ExtlockdLockSpace *space = session->space;

        g_queue_unlink(&space->grace_fenced, &session->reclaim_link);
        session->grace_fenced = false;
        if (!session->fence_ok) {
            space->grace_fence_pending--;
        }
        space->nsessions++;     /* keep @space until its grace ends */
        session_destroy(session);
        if (space->in_grace && space->grace_fence_pending == 0) {
            lockspace_end_grace(space, true);
        }
        lockspace_unref(space);
    } else {
        session_destroy(session);
    }

    extlock_msg_init(&r, EXTLOCK_MSG_SESSION_RELEASED);
    r.has_id = m->has_id;
    r.id = m->id;
    r.session = m->session;
    r.released = n;
    conn_send_msg(conn, &r);
}

static void dispatch_line(ExtlockdConn *conn, const char *line, size_t len)
{
    ExtlockdServer *server = conn->server;
    ExtlockdSession *session = conn->session;
    ExtlockProtoError err;
    ExtlockMsg m;

    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    if (!extlock_msg_parse(line, len, &m, &err)) {
        conn_send_error(conn, m.has_id, m.id, err.code, "%s", err.message);
        return;
    }
    VERBOSE(server, "%s: %s request %" PRIu64, conn->peer,
            extlock_msg_type_name(m.type), m.id);

    switch (m.type) {
    case EXTLOCK_MSG_HELLO:
        session_handle_hello(conn, &m);
        break;
    case EXTLOCK_MSG_STATUS:
        status_handle(conn, &m);
        break;
    case EXTLOCK_MSG_BYE:
        session_handle_bye(conn, &m);
        break;
    case EXTLOCK_MSG_RELEASE_SESSION:
        session_handle_release(conn, &m);
        break;
    case EXTLOCK_MSG_LOCK:
    case EXTLOCK_MSG_UNLOCK:
    case EXTLOCK_MSG_CANCEL:
    case EXTLOCK_MSG_RENEW:
    case EXTLOCK_MSG_DOWNGRADE:
    case EXTLOCK_MSG_RECLAIM:
    case EXTLOCK_MSG_RECLAIM_DONE:
        if (!session) {
            conn_send_error(conn, m.has_id, m.id, EXTLOCK_ERR_STATE,
                            "%s before hello", extlock_msg_type_name(m.type));
        } else if (m.type == EXTLOCK_MSG_LOCK) {
            lockspace_handle_lock(conn, session, &m);
        } else if (m.type == EXTLOCK_MSG_UNLOCK) {
            lockspace_handle_unlock(conn, session, &m);
        } else if (m.type == EXTLOCK_MSG_CANCEL) {
            lockspace_handle_cancel(conn, session, &m);
        } else if (m.type == EXTLOCK_MSG_RENEW) {
            session_handle_renew(conn, session, &m);
        } else if (m.type == EXTLOCK_MSG_DOWNGRADE) {
            lockspace_handle_downgrade(conn, session, &m);
        } else if (m.type == EXTLOCK_MSG_RECLAIM) {
            lockspace_handle_reclaim(conn, session, &m);
        } else {
            lockspace_handle_reclaim_done(conn, session, &m);
        }
        break;
    default:
        conn_send_error(conn, m.has_id, m.id, EXTLOCK_ERR_UNKNOWN_TYPE,
                        "\"%s\" is not a request",
                        extlock_msg_type_name(m.type));
        break;
    }
    extlock_msg_clear(&m);
}

/* ------------------------------------------------------------------ */
/* Connections                                                         */

static void conn_close_after_flush(ExtlockdConn *conn)
{
    if (conn->closing) {
        return;
    }
    conn->closing = true;
    conn->closing_since_us = g_get_monotonic_time();
    conn_out(conn);        /* the flush closes it once the output is out */
    server_schedule(conn->server, conn->closing_since_us + CLOSE_TIMEOUT_US);
}

static void conn_process_lines(ExtlockdConn *conn)
{
    ExtlockdServer *server = conn->server;
    const char *line;
    size_t len;

    while (!conn->closing && !conn->awaiting_state) {
        ExtlockLineResult r = extlock_linebuf_next(&conn->lb, &line, &len);

        if (r == EXTLOCK_LINE_NONE) {
            break;
        }
        server->nmessages++;
        if (r == EXTLOCK_LINE_TOO_LONG) {
            conn_send_error(conn, false, 0, EXTLOCK_ERR_LINE_TOO_LONG,
                            "message longer than %d bytes dropped",
                            EXTLOCK_MAX_LINE);
            continue;
        }
        dispatch_line(conn, line, len);
    }
}

/* Returns false if the connection was destroyed */
static bool conn_read(ExtlockdConn *conn)
{
    ExtlockdServer *server = conn->server;
    ExtlockdSession *session = conn->session;

    if (session && g_get_monotonic_time() >= session->deadline_us) {
        /* Too late: nothing it sends now may extend the lease */
        session_expire(session);
        return true;
    }
    for (int round = 0; round < READ_ROUNDS && !conn->closing; round++) {
        ssize_t n = conn_sys_recv(conn, server->rbuf, READ_CHUNK);

        if (n > 0) {
            extlock_linebuf_append(&conn->lb, server->rbuf, n);
            conn_process_lines(conn);
            if (n < READ_CHUNK &&
                !(conn->tls && extlockd_tls_pending(conn->tls))) {
                break;
            }
            continue;
        }
        if (n < 0 && errno == EINTR) {
            round--;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        }
        VERBOSE(server, "%s: %s", conn->peer,
                n == 0 ? "end of input" :
                conn->tls ? extlockd_tls_error(conn->tls) : g_strerror(errno));
        /* Try to deliver what is pending (e.g. replies before EOF) */
        if (conn->dirty) {
            g_queue_unlink(&server->dirty, &conn->dirty_link);
            conn->dirty = false;
            if (!conn_flush(conn)) {
                return false;
            }
        }
        conn_destroy(conn);
        return false;
    }
    /* conn_flush() stops reading while much output is pending */
    conn_kick_tls(conn);
    return true;
}

/* Returns false if the connection was destroyed or is still shaking hands */
static bool conn_tls_handshake(ExtlockdConn *conn)
{
    ExtlockdServer *server = conn->server;
    g_autoptr(GError) err = NULL;
    int r = extlockd_tls_handshake(conn->tls, &err);

    if (r < 0) {
        server_log_refusal(server, "%s: connection refused: %s", conn->peer,
                           err->message);
        conn_destroy(conn);
        return false;
    }
    if (r == 0) {
        conn_set_events(conn, extlockd_tls_events(conn->tls));
        return false;
    }
    conn->handshaking = false;
    conn->identity = g_strdup(extlockd_tls_identity(conn->tls));
    g_message("%s: TLS identity %s", conn->peer, conn->identity);
    if (extlockd_policy_is_admin(server->policy, conn->identity)) {
        conn_unauth_done(conn);
    }
    conn_set_events(conn, G_IO_IN);
    return true;
}

static gboolean conn_source_dispatch(GSource *source, GSourceFunc cb,
                                     gpointer data)
{
    ConnSource *cs = (ConnSource *)source;
    ExtlockdConn *conn = cs->conn;
    ExtlockdServer *server = conn->server;
    GIOCondition rev = g_source_query_unix_fd(source, conn->tag);

    g_source_set_ready_time(source, -1);
    if (conn->handshaking) {
        if (!conn_tls_handshake(conn)) {
            conn_flush_all(server);
            return G_SOURCE_CONTINUE;
        }
        rev |= G_IO_IN;         /* application data may be buffered */
    } else if (conn->tls && extlockd_tls_pending(conn->tls)) {
        rev |= G_IO_IN;
    }
    if (rev & G_IO_OUT) {
        conn_out(conn);
    }
    if ((rev & (G_IO_IN | G_IO_HUP | G_IO_ERR)) && (conn->events & G_IO_IN)) {
        conn_read(conn);
    } else if ((rev & (G_IO_HUP | G_IO_ERR)) && !(rev & G_IO_OUT)) {
        conn_destroy(conn);
    }
    conn_flush_all(server);
    return G_SOURCE_CONTINUE;
}

static GSourceFuncs conn_source_funcs = {
    .dispatch = conn_source_dispatch,
};

/*
 * Connections without hello: in server->unauth (accept order, hence
 * deadline order) and counted per peer, until they say hello or close
 */
static void conn_unauth_done(ExtlockdConn *conn)
{
    ExtlockdServer *server = conn->server;
    guint n;

    if (!conn->unauth) {
        return;
    }
    conn->unauth = false;
    g_queue_unlink(&server->unauth, &conn->unauth_link);
    n = GPOINTER_TO_UINT(g_hash_table_lookup(server->unauth_per_peer,
                                             conn->peer_key));
    if (n <= 1) {
        g_hash_table_remove(server->unauth_per_peer, conn->peer_key);
    } else {
        g_hash_table_insert(server->unauth_per_peer, g_strdup(conn->peer_key),
                            GUINT_TO_POINTER(n - 1));
    }
}

/* May one more connection without hello come from @key? */
static bool conn_admit(ExtlockdServer *server, const char *key,
                       const char *peer)
{
    guint n = GPOINTER_TO_UINT(g_hash_table_lookup(server->unauth_per_peer,
                                                   key));
    int64_t now;

    if (server->unauth.length < server->cfg.max_unauth &&
        n < server->cfg.max_unauth_per_peer) {
        return true;
    }
    server->refused++;
    now = g_get_monotonic_time();
    /* One line per second at most: the refusals are a flood themselves */
    if (now - server->refused_logged_us >= G_USEC_PER_SEC) {
        g_warning("refusing connection from %s: %u connections without "
                  "hello from it, %u in total (limits %u per peer, %u in "
                  "total; --max-unauth-per-peer, --max-unauth); %" PRIu64
                  " refused since the last report", peer, n,
                  server->unauth.length, server->cfg.max_unauth_per_peer,
                  server->cfg.max_unauth,
                  server->refused - server->refused_logged);
        server->refused_logged_us = now;
        server->refused_logged = server->refused;
    }
    return false;
}

static void conn_new(ExtlockdServer *server, int fd, const char *peer,
                     const char *key, const char *identity, bool tls)
{
    ExtlockdConn *conn = g_new0(ExtlockdConn, 1);
    g_autoptr(GError) err = NULL;
    ConnSource *cs;

    if (tls) {
        conn->tls = extlockd_tls_new(server->tls, fd, &err);
        if (!conn->tls) {
            g_warning("%s: %s", peer, err->message);
            close(fd);
            g_free(conn);
            return;
        }
        conn->handshaking = true;
    }
    conn->identity = g_strdup(identity);
    conn->peer_key = g_strdup(key);
    conn->accepted_us = g_get_monotonic_time();
    conn->status_tokens = server->cfg.status_rate;
    conn->status_refill_us = conn->accepted_us +
                          G_USEC_PER_SEC / server->cfg.status_rate;
    conn->server = server;
    /*
     * Admin identities on the UNIX socket (extlockctl) are authenticated
     * by the kernel and need no hello; all others are limited until hello
     */
    if (!identity || !extlockd_policy_is_admin(server->policy, identity)) {
        conn->unauth = true;
        conn->unauth_link.data = conn;
        g_queue_push_tail_link(&server->unauth, &conn->unauth_link);
        g_hash_table_insert(server->unauth_per_peer, g_strdup(key),
                            GUINT_TO_POINTER(GPOINTER_TO_UINT(
                                g_hash_table_lookup(server->unauth_per_peer,
                                                    key)) + 1));
        server_schedule(server, conn->accepted_us +
                        server->cfg.hello_timeout_ms * 1000LL);
    }
    conn->serial = ++server->next_serial;
    conn->peer = g_strdup_printf("#%" PRIu64 " (%s)", conn->serial, peer);
    conn->fd = fd;
    conn->out = g_string_sized_new(4096);
    extlock_linebuf_init(&conn->lb);
    conn->link.data = conn;
    conn->dirty_link.data = conn;
    g_queue_push_tail_link(&server->conns, &conn->link);

    conn->source = g_source_new(&conn_source_funcs, sizeof(ConnSource));
    cs = (ConnSource *)conn->source;
    cs->conn = conn;
    conn->events = G_IO_IN;
    conn->tag = g_source_add_unix_fd(conn->source, fd, conn->events);
    g_source_attach(conn->source, NULL);
    VERBOSE(server, "connection %s accepted", conn->peer);
}

static void conn_destroy(ExtlockdConn *conn)
{
    ExtlockdServer *server = conn->server;

    VERBOSE(server, "connection %s closed", conn->peer);
    conn_unauth_done(conn);
    if (conn->session) {
        if (server->shutting_down) {
            conn->session->conn = NULL;
            conn->session = NULL;
        } else {
            session_detach(conn->session);
        }
    }
    if (conn->dirty) {
        g_queue_unlink(&server->dirty, &conn->dirty_link);
        conn->dirty = false;
    }
    g_queue_unlink(&server->conns, &conn->link);
    g_source_destroy(conn->source);
    g_source_unref(conn->source);
    extlockd_tls_free(conn->tls);
    close(conn->fd);
    extlock_linebuf_destroy(&conn->lb);
    g_string_free(conn->out, TRUE);
    g_free(conn->identity);
    g_free(conn->peer_key);
    g_free(conn->peer);
    g_free(conn);
}

/* ------------------------------------------------------------------ */
/* Listeners                                                           */

static gboolean listener_accept(int fd, GIOCondition cond, gpointer opaque);

static gboolean listener_resume(gpointer opaque)
{
    ExtlockdListener *listener = opaque;

    listener->resume_timer = 0;
    listener->watch = g_unix_fd_add(listener->fd, G_IO_IN, listener_accept,
                                    listener);
    return G_SOURCE_REMOVE;
}

static void listener_describe_peer(ExtlockdListener *listener,
                                   struct sockaddr *sa,
                                   socklen_t len, char *buf, size_t size)
{
    char host[NI_MAXHOST], serv[NI_MAXSERV];

    if (!listener->is_tcp ||
        getnameinfo(sa, len, host, sizeof(host), serv, sizeof(serv),
                    NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
        g_strlcpy(buf, listener->address, size);
        return;
    }
    if (sa->sa_family == AF_INET6) {
        g_snprintf(buf, size, "[%s]:%s", host, serv);
    } else {
        g_snprintf(buf, size, "%s:%s", host, serv);
    }
}

/*
 * Who is @fd?  UNIX: "uid:N" from SO_PEERCRED (and the pid, in @peer);
 * TCP with TLS: known after the handshake; TCP without: "anonymous".
 * @key: what the per-peer cap counts (the uid, or the IP address).
 */
static bool listener_identify_peer(ExtlockdListener *listener, int fd,
                                   struct sockaddr *sa,
                                   socklen_t len, char *peer, size_t peer_size,
                                   char *key, size_t key_size, char *identity,
                                   size_t identity_size)
{
    identity[0] = '\0';
    if (!listener->is_tcp) {
        struct ucred cred;
        socklen_t clen = sizeof(cred);
        size_t used = strlen(peer);

        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) < 0) {
            g_warning("%s: cannot get the peer's credentials: %s; closing",
                      listener->address, g_strerror(errno));
            return false;
        }
        g_snprintf(peer + used, peer_size - used, " uid %u pid %ld",
                   (unsigned)cred.uid, (long)cred.pid);
        g_snprintf(identity, identity_size, "uid:%u", (unsigned)cred.uid);
        g_strlcpy(key, identity, key_size);
        return true;
    }
    if (getnameinfo(sa, len, key, key_size, NULL, 0, NI_NUMERICHOST) != 0) {
        g_strlcpy(key, "?", key_size);
    }
    if (!listener->tls) {
        g_strlcpy(identity, EXTLOCKD_IDENTITY_ANONYMOUS, identity_size);
    }
    return true;
}

static gboolean listener_accept(int fd, GIOCondition cond, gpointer opaque)
{
    ExtlockdListener *listener = opaque;
    ExtlockdServer *server = listener->server;

    for (int i = 0; i < 64; i++) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        char peer[NI_MAXHOST + NI_MAXSERV + 64];
        char key[NI_MAXHOST + 8], identity[32];
        int cfd;

        cfd = accept4(fd, (struct sockaddr *)&ss, &len,
                      SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) {
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                break;
            }
            g_warning("accept on %s failed: %s; pausing for %d ms",
                      listener->address, g_strerror(errno), LISTEN_PAUSE_MS);
            listener->watch = 0;
            listener->resume_timer = g_timeout_add(LISTEN_PAUSE_MS,
                                                   listener_resume, listener);
            return G_SOURCE_REMOVE;
        }
        if (listener->is_tcp) {
            int one = 1;
            setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        }
        listener_describe_peer(listener, (struct sockaddr *)&ss, len, peer,
                               sizeof(peer));
        if (!listener_identify_peer(listener, cfd, (struct sockaddr *)&ss, len,
                                    peer,
                                    sizeof(peer), key, sizeof(key), identity,
                                    sizeof(identity))) {
            close(cfd);
            continue;
        }
        if (!(identity[0] && extlockd_policy_is_admin(server->policy,
                                                      identity)) &&
            !conn_admit(server, key, peer)) {
            if (!listener->tls) {
                /* Best effort: say why (TLS peers get no plaintext) */
                static const char why[] =
                    "{\"type\":\"error\",\"code\":\"limit-exceeded\","
                    "\"message\":\"too many connections without hello; "
                    "try again later\"}\n";
                ssize_t n = send(cfd, why, sizeof(why) - 1,
                                 MSG_DONTWAIT | MSG_NOSIGNAL);
                (void)n;
            }
            close(cfd);
            continue;
        }
        conn_new(server, cfd, peer, key, identity[0] ? identity : NULL,
                 listener->tls);
    }
    return G_SOURCE_CONTINUE;
}

static void listener_close(ExtlockdListener *listener)
{
    if (listener->watch) {
        g_source_remove(listener->watch);
        listener->watch = 0;
    }
    if (listener->resume_timer) {
        g_source_remove(listener->resume_timer);
        listener->resume_timer = 0;
    }
    if (listener->fd >= 0) {
        close(listener->fd);
        listener->fd = -1;
    }
    if (listener->unix_path) {
        struct stat st;

        /* Only remove the socket if it is still the one we created */
        if (lstat(listener->unix_path,
                  &st) == 0 && st.st_dev == listener->dev &&
            st.st_ino == listener->ino) {
            unlink(listener->unix_path);
        }
        g_free(listener->unix_path);
        listener->unix_path = NULL;
    }
}

static void listener_free(gpointer p)
{
    ExtlockdListener *listener = p;

    listener_close(listener);
    g_free(listener->address);
    g_free(listener);
}

static void listener_add(ExtlockdServer *server, const char *address, int fd,
                         bool is_tcp, const char *unix_path)
{
    ExtlockdListener *listener = g_new0(ExtlockdListener, 1);

    listener->tls = is_tcp && server->tls;
    listener->server = server;
    listener->address = g_strdup(address);
    listener->fd = fd;
    listener->is_tcp = is_tcp;
    if (unix_path) {
        struct stat st;

        listener->unix_path = g_strdup(unix_path);
        if (lstat(unix_path, &st) == 0) {
            listener->dev = st.st_dev;
            listener->ino = st.st_ino;
        }
    }
    listener->watch = g_unix_fd_add(fd, G_IO_IN, listener_accept, listener);
    g_ptr_array_add(server->listeners, listener);
}

static bool listener_remove_stale_socket(const char *path, GError **errp)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    struct stat st;
    int fd, ret, err;

    if (lstat(path, &st) < 0) {
        if (errno == ENOENT) {
            return true;
        }
        err = errno;
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(err),
                    "cannot stat %s: %s", path, g_strerror(err));
        return false;
    }
    if (!S_ISSOCK(st.st_mode)) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_EXISTS,
                    "%s exists and is not a socket", path);
        return false;
    }
    g_strlcpy(sun.sun_path, path, sizeof(sun.sun_path));
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        err = errno;
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(err),
                    "socket: %s", g_strerror(err));
        return false;
    }
    ret = connect(fd, (struct sockaddr *)&sun, sizeof(sun));
    err = errno;
    close(fd);
    if (ret == 0) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_ADDRESS_IN_USE,
                    "another server is listening on %s", path);
        return false;
    }
    if (err != ECONNREFUSED && err != ENOENT) {
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(err),
                    "cannot probe %s: %s", path, g_strerror(err));
        return false;
    }
    g_message("removing stale socket %s", path);
    if (unlink(path) < 0 && errno != ENOENT) {
        err = errno;
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(err),
                    "cannot remove stale socket %s: %s", path,
                    g_strerror(err));
        return false;
    }
    return true;
}

static bool listener_open_unix(ExtlockdServer *server, const char *address,
                               const char *path, GError **errp)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    g_autofree char *dir = NULL;
    int fd, err;

    if (!path[0]) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "%s: empty socket path", address);
        return false;
    }
    if (strlen(path) >= sizeof(sun.sun_path)) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "%s: socket path longer than %zu bytes", address,
                    sizeof(sun.sun_path) - 1);
        return false;
    }
    dir = g_path_get_dirname(path);
    if (g_mkdir_with_parents(dir, 0755) < 0) {
        err = errno;
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(err),
                    "cannot create directory %s: %s", dir, g_strerror(err));
        return false;
    }
    if (!listener_remove_stale_socket(path, errp)) {
        return false;
    }
    memcpy(sun.sun_path, path, strlen(path) + 1);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 ||
        bind(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0 ||
        listen(fd, SOMAXCONN) < 0) {
        err = errno;
        if (fd >= 0) {
            close(fd);
        }
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(err),
                    "cannot listen on %s: %s", address, g_strerror(err));
        return false;
    }
    listener_add(server, address, fd, false, path);
    g_message("listening on unix:%s", path);
    return true;
}

static bool listener_open_tcp(ExtlockdServer *server, const char *address,
                              const char *hostport, GError **errp)
{
    const char *colon = strrchr(hostport, ':');
    g_autofree char *host = NULL;
    struct addrinfo hints = {
        .ai_flags = AI_PASSIVE | AI_NUMERICSERV,
        .ai_socktype = SOCK_STREAM,
    };
    struct addrinfo *res, *ai;
    int ret, err = 0, count = 0;

    if (!colon || !colon[1]) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "%s: expected tcp:HOST:PORT", address);
        return false;
    }
    if (!server->tls && !server->cfg.insecure) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED,
                    "%s: TCP without TLS lets anybody who can reach the "
                    "port take locks; give --tls-creds-dir DIR (or "
                    "--insecure to accept that)", address);
        return false;
    }
    host = g_strndup(hostport, colon - hostport);
    if (host[0] == '[' && host[strlen(host) - 1] == ']') {
        memmove(host, host + 1, strlen(host) - 2);
        host[strlen(host) - 2] = '\0';
    }
    ret = getaddrinfo(host[0] ? host : NULL, colon + 1, &hints, &res);
    if (ret != 0) {
        g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "%s: %s", address, gai_strerror(ret));
        return false;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        char desc[NI_MAXHOST], serv[NI_MAXSERV];
        struct sockaddr_storage bound;
        socklen_t bound_len;
        int one = 1;
        int fd = socket(ai->ai_family,
                        ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                        ai->ai_protocol);

        if (fd < 0) {
            err = errno;
            continue;
        }
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (ai->ai_family == AF_INET6) {
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
        }
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 ||
            listen(fd, SOMAXCONN) < 0) {
            err = errno;
            close(fd);
            continue;
        }
        listener_add(server, address, fd, true, NULL);
        bound_len = sizeof(bound);
        if (getsockname(fd, (struct sockaddr *)&bound, &bound_len) < 0 ||
            getnameinfo((struct sockaddr *)&bound, bound_len, desc,
                        NI_MAXHOST, serv, sizeof(serv),
                        NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
            g_strlcpy(desc, "?", sizeof(desc));
            g_strlcpy(serv, colon + 1, sizeof(serv));
        }
        g_message("listening on tcp:%s%s%s:%s (%s)",
                  ai->ai_family == AF_INET6 ? "[" : "", desc,
                  ai->ai_family == AF_INET6 ? "]" : "", serv,
                  server->tls ? extlockd_tls_creds_kinds(server->tls) :
                  "NO TLS, NO AUTHENTICATION");
        count++;
    }
    freeaddrinfo(res);
    if (count == 0) {
        g_set_error(errp, G_IO_ERROR, g_io_error_from_errno(err),
                    "cannot listen on %s: %s", address, g_strerror(err));
        return false;
    }
    return true;
}

bool extlockd_server_listen(ExtlockdServer *server, const char *address,
                            GError **errp)
{
    if (g_str_has_prefix(address, "unix:")) {
        return listener_open_unix(server, address, address + 5, errp);
    }
    if (address[0] == '/') {
        return listener_open_unix(server, address, address, errp);
    }
    if (g_str_has_prefix(address, "tcp:")) {
        return listener_open_tcp(server, address, address + 4, errp);
    }
    g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                "unsupported address %s (use unix:PATH or tcp:HOST:PORT)",
                address);
    return false;
}

void extlockd_server_stop_listening(ExtlockdServer *server)
{
    for (guint i = 0; i < server->listeners->len; i++) {
        listener_close(server->listeners->pdata[i]);
    }
}

/* ------------------------------------------------------------------ */
/* Server                                                              */

/* The state file text for @epoch and every session */
static char *server_state_snapshot(ExtlockdServer *server, uint64_t epoch,
                                   GError **errp)
{
    g_autoptr(GArray) list = g_array_sized_new(FALSE, FALSE,
                                               sizeof(ExtlockdStateSession),
                                               server->session_list.length);

    for (GList *l = server->session_list.head; l; l = l->next) {
        ExtlockdSession *session = l->data;
        ExtlockdStateSession ss = {
            .session = session->id,
            .client_id = session->client_id,
            .lock_space = session->space->name,
            .lease_ms = session->lease_ms,
            .fence_margin_ms = session->fence_margin_ms,
            .owner = session->owner,
            .secret_sha256 = session->secret_sha256[0] ?
                             session->secret_sha256 : NULL,
        };

        g_array_append_val(list, ss);
    }
    return extlockd_state_format(epoch, (ExtlockdStateSession *)list->data,
                                 list->len, errp);
}

/* Write @epoch and every session to the state file, now */
static bool server_save_state(ExtlockdServer *server, uint64_t epoch,
                              GError **errp)
{
    char *text = server_state_snapshot(server, epoch, errp);

    return text && extlockd_state_writer_write_now(server->writer, text, errp);
}

/* Queue the current state for the writer thread; its generation */
static uint64_t server_save_state_async(ExtlockdServer *server)
{
    g_autoptr(GError) err = NULL;
    char *text = server_state_snapshot(server, server->epoch, &err);

    if (!text) {
        g_warning("cannot update the state file: %s", err->message);
        return 0;
    }
    return extlockd_state_writer_submit(server->writer, text);
}

/* The writer is done with generation @gen: send the waiting welcomes */
static void session_state_written(uint64_t gen, bool ok, const char *error,
                                  void *opaque)
{
    ExtlockdServer *server = opaque;
    DeferredWelcome *dw;

    if (!ok) {
        g_warning("cannot update the state file: %s", error);
    }
    while ((dw = g_queue_peek_head(&server->welcomes)) && dw->gen <= gen) {
        ExtlockdSession *session = g_hash_table_lookup(server->sessions,
                                                       dw->session);
        ExtlockdConn *conn = session ? session->conn : NULL;
        ExtlockMsg m;

        g_queue_pop_head(&server->welcomes);
        if (!conn || conn->serial != dw->conn_serial) {
            g_free(dw);         /* gone meanwhile: it never learnt of it */
            continue;
        }
        conn->awaiting_state = false;
        extlock_msg_init(&m, EXTLOCK_MSG_HELLO);
        m.has_id = dw->has_id;
        m.id = dw->id;
        if (ok) {
            session_send_welcome(conn, &m, session,
                                 dw->reclaim ? WELCOME_RECLAIM
                                               : WELCOME_NEW);
        } else if (dw->reclaim) {
            /* It may come back and try again with its old secret */
            g_warning("session %s of %s cannot reclaim now: its new "
                      "resume secret is not in the state file", session->id,
                      session->client_id);
            memcpy(session->secret_sha256, dw->old_sha256,
                   sizeof(session->secret_sha256));
            session->secret[0] = '\0';
            conn_send_error(conn, m.has_id, m.id, EXTLOCK_ERR_INTERNAL,
                            "cannot record a new resume secret for session %s",
                            session->id);
            conn_close_after_flush(conn);
        } else {
            g_warning("session %s of %s dropped: it is not in the state "
                      "file", session->id, session->client_id);
            session_destroy_nosave(session);
            conn_send_error(conn, m.has_id, m.id, EXTLOCK_ERR_INTERNAL,
                            "cannot record the session in the state file");
            /*
             * It was attached, so no longer counted as without hello:
             * close it rather than leave it outside --max-unauth
             */
            conn_close_after_flush(conn);
        }
        g_free(dw);
        /* Requests that arrived after hello */
        conn_process_lines(conn);
    }
    conn_flush_all(server);
}

void extlockd_server_set_event_log(ExtlockdServer *server,
                                   ExtlockdEventLog *log)
{
    extlockd_event_log_close(server->event_log);
    server->event_log = log;
}

void extlockd_server_set_fencer(ExtlockdServer *server, ExtlockdFencer *fencer)
{
    extlockd_fencer_free(server->fencer);
    server->fencer = fencer;
}

bool extlockd_server_save_state(ExtlockdServer *server, GError **errp)
{
    return server_save_state(server, server->epoch, errp);
}

ExtlockdServer *extlockd_server_new(const ExtlockdConfig *cfg,
                                    uint64_t epoch)
{
    ExtlockdServer *server = g_new0(ExtlockdServer, 1);

    server->cfg = *cfg;
    server->cfg.state_file = g_strdup(cfg->state_file);
    server->epoch = epoch;
    server->boot_epoch = epoch;
    server->counter = cfg->first_counter ? cfg->first_counter : 1;
    server->start_us = g_get_monotonic_time();
    server->status_budget = EXTLOCKD_STATUS_ENTRIES_PER_SEC;
    server->status_budget_us = server->start_us;
    server->listeners = g_ptr_array_new_with_free_func(listener_free);
    server->spaces = g_hash_table_new(g_str_hash, g_str_equal);
    server->sessions = g_hash_table_new(g_str_hash, g_str_equal);
    server->identity_sessions = g_hash_table_new_full(g_str_hash, g_str_equal,
                                                      g_free, NULL);
    if (!server->cfg.max_sessions_per_identity) {
        server->cfg.max_sessions_per_identity =
            EXTLOCKD_DEFAULT_MAX_SESS_PER_IDENTITY;
    }
    g_queue_init(&server->session_list);
    g_queue_init(&server->grace_spaces);
    g_queue_init(&server->conns);
    g_queue_init(&server->dirty);
    server->rbuf = g_malloc(READ_CHUNK);
    server->pieces = g_array_new(FALSE, FALSE, sizeof(ExtlockPiece));
    server->blockers = g_array_new(FALSE, FALSE, sizeof(ExtlockBlocker));
    server->locks = g_array_new(FALSE, FALSE, sizeof(ExtlockLockInfo));
    server->policy = extlockd_policy_load(NULL, NULL);
    server->writer = extlockd_state_writer_new(server->cfg.state_file,
                                               session_state_written,
                                               server);
    g_queue_init(&server->welcomes);
    g_queue_init(&server->unauth);
    server->unauth_per_peer = g_hash_table_new_full(g_str_hash, g_str_equal,
                                                    g_free, NULL);
    if (!server->cfg.hello_timeout_ms) {
        server->cfg.hello_timeout_ms = EXTLOCKD_DEFAULT_HELLO_TIMEOUT_MS;
    }
    if (!server->cfg.max_unauth) {
        server->cfg.max_unauth = EXTLOCKD_DEFAULT_MAX_UNAUTH;
    }
    if (!server->cfg.status_rate) {
        server->cfg.status_rate = EXTLOCKD_DEFAULT_STATUS_RATE;
    }
    if (!server->cfg.max_unauth_per_peer) {
        server->cfg.max_unauth_per_peer = EXTLOCKD_DEFAULT_MAX_UNAUTH_PEER;
    }
    return server;
}

void extlockd_server_set_policy(ExtlockdServer *server, ExtlockdPolicy *policy)
{
    extlockd_policy_free(server->policy);
    server->policy = policy;
}

void extlockd_server_set_tls(ExtlockdServer *server, ExtlockdTlsCreds *creds)
{
    extlockd_tls_creds_free(server->tls);
    server->tls = creds;
}

void extlockd_server_free(ExtlockdServer *server)
{
    GHashTableIter iter;
    gpointer value;
    GList *l;

    server->shutting_down = true;
    extlockd_server_stop_listening(server);
    g_ptr_array_free(server->listeners, TRUE);

    while ((l = server->conns.head) != NULL) {
        ExtlockdConn *conn = l->data;

        /* Best effort: deliver replies already produced */
        if (conn->out->len > conn->out_pos) {
            ssize_t n = conn->handshaking ? 0 :
                        conn_sys_send(conn, conn->out->str + conn->out_pos,
                                      conn->out->len - conn->out_pos);
            (void)n;
        }
        conn_destroy(conn);
    }
    while ((l = g_queue_pop_head_link(&server->session_list)) != NULL) {
        ExtlockdSession *session = l->data;

        /* The tables are freed with all their locks below */
        extlockd_fence_cancel(session->fence);
        session_free(session);
    }
    g_hash_table_iter_init(&iter, server->spaces);
    while (g_hash_table_iter_next(&iter, NULL, &value)) {
        lockspace_free(value);
    }
    g_hash_table_destroy(server->spaces);
    g_hash_table_destroy(server->sessions);
    g_hash_table_destroy(server->identity_sessions);
    if (server->timer) {
        g_source_remove(server->timer);
    }
    g_array_free(server->pieces, TRUE);
    g_array_free(server->blockers, TRUE);
    g_array_free(server->locks, TRUE);
    g_free(server->rbuf);
    g_free(server->cfg.state_file);
    extlockd_event_log_close(server->event_log);
    extlockd_fencer_free(server->fencer);
    extlockd_policy_free(server->policy);
    extlockd_tls_creds_free(server->tls);
    extlockd_state_writer_free(server->writer);
    g_queue_clear_full(&server->welcomes, g_free);
    g_hash_table_destroy(server->unauth_per_peer);
    g_free(server);
}

/* ------------------------------------------------------------------ */
/* Testing seam (tests/fuzz)                                           */

void extlockd_server_add_connection(ExtlockdServer *server, int fd,
                                    const char *peer)
{
    /* An admin on the UNIX socket: every request type is reachable */
    conn_new(server, fd, peer, peer, "uid:0", false);
}

void extlockd_server_run_timer(ExtlockdServer *server)
{
    if (server->timer) {
        g_source_remove(server->timer);
    }
    server_on_timer(server);
}

bool extlockd_server_check(ExtlockdServer *server, unsigned *nsessions,
                           char **errmsg)
{
    GHashTableIter iter;
    gpointer value;

    g_hash_table_iter_init(&iter, server->spaces);
    while (g_hash_table_iter_next(&iter, NULL, &value)) {
        ExtlockdLockSpace *space = value;
        g_autofree char *msg = NULL;

        if (!extlock_table_check(space->table, &msg)) {
            *errmsg = g_strdup_printf("lock-space '%s': %s", space->name,
                                      msg);
            return false;
        }
    }
    *nsessions = g_hash_table_size(server->sessions);
    return true;
}
