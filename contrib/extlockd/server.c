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
#include "ha.h"
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
#define REFUSAL_LOG_BURST   20          /* log_refusal() lines a second */

#define VERBOSE(s, ...) \
    do { \
        if ((s)->cfg.verbose) { \
            g_debug(__VA_ARGS__); \
        } \
    } while (0)

typedef struct ExtlockdSpace ExtlockdSpace;
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

struct ExtlockdSpace {
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
     * unknown, so nothing may be granted before (see space_end_grace)
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
    ExtlockdSpace *space;
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
    /* HA mode (ha.h): followers refuse hello; NULL in single mode */
    ExtlockdHa *ha;
    bool leading;                /* HA: elected, epoch durable in etcd */
    /* State file writes (state-writer.h) and the welcomes waiting on them */
    ExtlockdStateWriter *writer;
    GQueue welcomes;             /* DeferredWelcome, in generation order */
    /* log_refusal(): lines in the current second, and those left out */
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

static void conn_destroy(ExtlockdConn *c);
static void conn_close_after_flush(ExtlockdConn *c);
static void server_schedule(ExtlockdServer *s, int64_t when_us);
static bool save_state(ExtlockdServer *s, uint64_t epoch, GError **errp);
static void space_end_grace(ExtlockdSpace *space, bool timeout);
static uint64_t save_state_async(ExtlockdServer *s);

/* ------------------------------------------------------------------ */
/* Tokens                                                              */

static bool next_token(ExtlockdServer *s, uint64_t *token)
{
    if (s->counter >= EXTLOCKD_COUNTER_LIMIT) {
        g_autoptr(GError) err = NULL;
        uint64_t epoch = s->epoch + 1;

        if (!save_state(s, epoch, &err)) {
            g_warning("token counter of epoch %" PRIu64 " is exhausted and "
                      "the new epoch cannot be persisted: %s",
                      s->epoch, err->message);
            return false;
        }
        g_message("token counter of epoch %" PRIu64 " exhausted; "
                  "now in epoch %" PRIu64, s->epoch, epoch);
        s->epoch = epoch;
        s->counter = 1;
    }
    *token = (s->epoch << EXTLOCKD_COUNTER_BITS) | s->counter++;
    return true;
}

/* ------------------------------------------------------------------ */
/* Event log (event-log.h)                                             */

/* @event for @lock of its owner; @part: the released part, or NULL */
static void log_lock(ExtlockdServer *s, const char *event, ExtlockLock *lock,
                     const ExtlockExtent *part)
{
    ExtlockdSession *S = lock->owner;
    ExtlockdEvent ev = {
        .event = event,
        .lock_space = S->space->name,
        .client_id = S->client_id,
        .session = S->id,
        .has_lock = true,
        .lock = lock->id,
        .token = lock->token,
        .offset = part ? part->start : lock->node.ext.start,
        .length = part ? part->end - part->start
                       : lock->node.ext.end - lock->node.ext.start,
        .mode = lock->mode,
    };

    if (s->event_log) {
        extlockd_event_log_write(s->event_log, &ev);
    }
}

static void log_session(ExtlockdSession *S, const char *event,
                        const char *message)
{
    ExtlockdEvent ev = {
        .event = event,
        .lock_space = S->space->name,
        .client_id = S->client_id,
        .session = S->id,
        .message = message,
    };

    if (S->server->event_log) {
        extlockd_event_log_write(S->server->event_log, &ev);
    }
}

/* ------------------------------------------------------------------ */
/* Output                                                              */

static GString *conn_out(ExtlockdConn *c)
{
    if (!c->dirty) {
        c->dirty = true;
        g_queue_push_tail_link(&c->server->dirty, &c->dirty_link);
    }
    return c->out;
}

static void send_msg(ExtlockdConn *c, const ExtlockMsg *msg)
{
    /* HA: nothing leaves a leader that cannot prove its etcd lease */
    if (c->server->ha) {
        extlockd_ha_assert_lease(c->server->ha);
    }
    extlock_msg_format(msg, conn_out(c));
}

static void G_GNUC_PRINTF(5, 6)
send_error(ExtlockdConn *c, bool has_id, uint64_t id, ExtlockErrorCode code,
           const char *fmt, ...)
{
    g_autofree char *text = NULL;
    va_list ap;

    va_start(ap, fmt);
    text = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    if (c->server->ha) {
        extlockd_ha_assert_lease(c->server->ha);
    }
    c->server->nerrors++;
    VERBOSE(c->server, "%s: error %s: %s", c->peer,
            extlock_error_code_name(code), text);
    extlock_format_error(conn_out(c), has_id, id, code, "%s", text);
}

/*
 * A warning about a request or connection refused for who sent it: at
 * most REFUSAL_LOG_BURST lines a second, so that a peer cannot fill the
 * log (and spend the daemon's time on it) at the rate it sends lines; the
 * next line logged says how many were left out
 */
static void G_GNUC_PRINTF(2, 3)
log_refusal(ExtlockdServer *s, const char *fmt, ...)
{
    int64_t now = g_get_monotonic_time();
    g_autofree char *text = NULL;
    va_list ap;

    if (now - s->refusal_window_us >= G_USEC_PER_SEC) {
        s->refusal_window_us = now;
        s->refusal_lines = 0;
    }
    if (s->refusal_lines >= REFUSAL_LOG_BURST) {
        s->refusals_unlogged++;
        return;
    }
    s->refusal_lines++;
    va_start(ap, fmt);
    text = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    if (s->refusals_unlogged) {
        g_warning("%s (%" PRIu64 " similar refusals not logged before "
                  "this one)", text, s->refusals_unlogged);
        s->refusals_unlogged = 0;
    } else {
        g_warning("%s", text);
    }
}

static void conn_set_events(ExtlockdConn *c, GIOCondition events)
{
    if (c->events != events) {
        c->events = events;
        g_source_modify_unix_fd(c->source, c->tag, events);
    }
}

/* Plain or TLS I/O on the connection's non-blocking socket */
static ssize_t conn_sys_send(ExtlockdConn *c, const void *buf, size_t len)
{
    if (c->tls) {
        return extlockd_tls_send(c->tls, buf, len);
    }
    return send(c->fd, buf, len, MSG_NOSIGNAL);
}

static ssize_t conn_sys_recv(ExtlockdConn *c, void *buf, size_t len)
{
    if (c->tls) {
        return extlockd_tls_recv(c->tls, buf, len);
    }
    return recv(c->fd, buf, len, 0);
}

/*
 * Records GnuTLS has decrypted already are invisible to poll(): make the
 * source dispatch again if the connection wants input
 */
static void conn_kick_tls(ExtlockdConn *c)
{
    if (c->tls && !c->handshaking && (c->events & G_IO_IN) &&
        extlockd_tls_pending(c->tls)) {
        g_source_set_ready_time(c->source, 0);
    }
}

/* Returns false if the connection was destroyed */
static bool conn_flush(ExtlockdConn *c)
{
    size_t pending;
    GIOCondition events;

    while (c->out_pos < c->out->len) {
        ssize_t n = conn_sys_send(c, c->out->str + c->out_pos,
                                  c->out->len - c->out_pos);
        if (n > 0) {
            c->out_pos += n;
            continue;
        }
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        }
        VERBOSE(c->server, "%s: write failed: %s", c->peer,
                n < 0 ? (c->tls ? extlockd_tls_error(c->tls) :
                         g_strerror(errno)) : "no progress");
        conn_destroy(c);
        return false;
    }

    if (c->out_pos == c->out->len) {
        g_string_truncate(c->out, 0);
        c->out_pos = 0;
        c->out_allowance = 0;
        if (c->closing) {
            conn_destroy(c);
            return false;
        }
        if (!c->handshaking) {
            conn_set_events(c, c->awaiting_state ? 0 : G_IO_IN);
            conn_kick_tls(c);
        }
        return true;
    }

    pending = c->out->len - c->out_pos;
    if (pending > EXTLOCKD_MAX_OUTPUT + c->out_allowance) {
        g_warning("disconnecting %s: it does not read its replies "
                  "(%zu bytes pending)", c->peer, pending);
        conn_destroy(c);
        return false;
    }
    if (c->out_pos >= READ_CHUNK && c->out_pos >= c->out->len / 2) {
        g_string_erase(c->out, 0, c->out_pos);
        c->out_pos = 0;
    }
    events = G_IO_OUT;
    if (!c->closing && !c->awaiting_state &&
        pending < BACKPRESSURE_OUTPUT) {
        events |= G_IO_IN;
    }
    conn_set_events(c, events);
    conn_kick_tls(c);
    return true;
}

static void flush_all(ExtlockdServer *s)
{
    GList *link;

    while ((link = g_queue_pop_head_link(&s->dirty)) != NULL) {
        ExtlockdConn *c = link->data;

        c->dirty = false;
        conn_flush(c);
    }
}

/* ------------------------------------------------------------------ */
/* Lock-spaces                                                         */

static guint waiting_hash(gconstpointer p)
{
    uint64_t tag = ((const ExtlockLock *)p)->user_tag;

    return (guint)(tag ^ (tag >> 32));
}

static gboolean waiting_equal(gconstpointer a, gconstpointer b)
{
    return ((const ExtlockLock *)a)->user_tag ==
           ((const ExtlockLock *)b)->user_tag;
}

static ExtlockLock *session_find_waiting(ExtlockdSession *S, uint64_t req)
{
    ExtlockLock key;

    if (g_hash_table_size(S->waiting) == 0) {
        return NULL;
    }
    key.user_tag = req;
    return g_hash_table_lookup(S->waiting, &key);
}

static void format_granted(ExtlockdConn *c, ExtlockLock *lock)
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
    send_msg(c, &r);
}

/*
 * Revocation
 *
 * Every (held lock, conflicting waiting request) pair gets one revoke,
 * sent by whichever of the two events comes second: the request is
 * queued while the lock is held (revoke_holder_cb), or the lock is
 * granted while the request waits (revoke_waiter_cb).  A lock split off
 * by a partial unlock counts as newly granted; a resumed session gets
 * the revokes for its locks again, as they may have been lost with its
 * old connection.
 */

static bool session_wants_revokes(ExtlockdSession *S)
{
    return S->revocable && S->conn && !S->releasing;
}

static void session_set_revocable(ExtlockdSession *S)
{
    if (!S->revocable) {
        S->revocable = true;
        S->space->nrevocable++;
    }
}

/* Tell the holder of @held that @waiter waits for it */
static void send_revoke(ExtlockLock *held, ExtlockLock *waiter)
{
    ExtlockdSession *S = held->owner;
    ExtlockMsg r;

    extlock_msg_init(&r, EXTLOCK_MSG_REVOKE);
    r.lock = held->id;
    r.offset = MAX(held->node.ext.start, waiter->node.ext.start);
    r.length = MIN(held->node.ext.end, waiter->node.ext.end) - r.offset;
    r.mode = waiter->mode;
    r.token = waiter->token;
    send_msg(S->conn, &r);
    S->space->revokes_sent++;
}

/* foreach_conflict of a newly queued request @opaque */
static void revoke_holder_cb(ExtlockLock *other, void *opaque)
{
    if (other->state == EXTLOCK_LOCK_GRANTED &&
        session_wants_revokes(other->owner)) {
        send_revoke(other, opaque);
    }
}

/* foreach_conflict of a newly granted lock @opaque */
static void revoke_waiter_cb(ExtlockLock *other, void *opaque)
{
    ExtlockLock *held = opaque;

    if (other->state == EXTLOCK_LOCK_WAITING && other->token > held->token) {
        send_revoke(held, other);
    }
}

/* @lock was just granted (or split off): revoke it for later waiters */
static void revoke_new_lock(ExtlockTable *table, ExtlockLock *lock)
{
    if (session_wants_revokes(lock->owner)) {
        extlock_table_foreach_conflict(table, lock, revoke_waiter_cb, lock);
    }
}

/* Send again the revokes for every lock @S holds */
static void session_resend_revokes(ExtlockdSession *S)
{
    GHashTableIter iter;
    gpointer key;

    if (!session_wants_revokes(S)) {
        return;
    }
    g_hash_table_iter_init(&iter, S->held);
    while (g_hash_table_iter_next(&iter, &key, NULL)) {
        extlock_table_foreach_conflict(S->space->table, key,
                                       revoke_waiter_cb, key);
    }
}

/*
 * The table granted a request that had been waiting.  The table is
 * consistent again when this is called, and foreach_conflict only reads.
 */
static void space_grant_cb(ExtlockTable *table, ExtlockLock *lock,
                           void *opaque)
{
    ExtlockdSession *S = lock->owner;

    if (S->releasing) {
        /* The session is tearing down; this lock is released next */
        return;
    }
    g_hash_table_remove(S->waiting, lock);
    g_hash_table_add(S->held, lock);
    log_lock(S->server, "grant", lock, NULL);
    if (S->conn) {
        format_granted(S->conn, lock);
        revoke_new_lock(table, lock);
    }
}

static ExtlockdSpace *space_get(ExtlockdServer *s, const char *name)
{
    ExtlockdSpace *space = g_hash_table_lookup(s->spaces, name);

    if (!space) {
        space = g_new0(ExtlockdSpace, 1);
        space->server = s;
        space->name = g_strdup(name);
        space->table = extlock_table_new(name, space_grant_cb, space);
        extlock_table_set_debug_checks(space->table, s->cfg.debug_checks);
        g_hash_table_insert(s->spaces, space->name, space);
        VERBOSE(s, "lock-space %s created", name);
    }
    return space;
}

static void space_free(ExtlockdSpace *space)
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

static void space_unref(ExtlockdSpace *space)
{
    ExtlockdServer *s = space->server;

    g_assert(space->nsessions > 0);
    if (--space->nsessions == 0 && !s->shutting_down) {
        const ExtlockTableStats *st = extlock_table_stats(space->table);

        /* Every session releases everything before it goes away */
        g_assert(st->held == 0 && st->waiting == 0);
        g_assert(space->deferred.length == 0 && !space->in_grace);
        VERBOSE(s, "lock-space %s is unused, freeing it", space->name);
        g_hash_table_remove(s->spaces, space->name);
        space_free(space);
    }
}

/* ------------------------------------------------------------------ */
/* Sessions                                                            */

static void make_session_id(ExtlockdServer *s, char id[33])
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
    } while (g_hash_table_contains(s->sessions, id));
}

/*
 * A new resume secret for @S: 256 bits from GnuTLS's key-grade generator,
 * in hex; only its SHA-256 is ever written to the state file
 */
static bool session_new_secret(ExtlockdSession *S)
{
    static const char hex[] = "0123456789abcdef";
    uint8_t raw[EXTLOCK_SECRET_LEN / 2];
    g_autofree char *sum = NULL;

    if (gnutls_rnd(GNUTLS_RND_KEY, raw, sizeof(raw)) < 0) {
        return false;
    }
    for (size_t i = 0; i < sizeof(raw); i++) {
        S->secret[2 * i] = hex[raw[i] >> 4];
        S->secret[2 * i + 1] = hex[raw[i] & 15];
    }
    S->secret[EXTLOCK_SECRET_LEN] = '\0';
    explicit_bzero(raw, sizeof(raw));
    sum = g_compute_checksum_for_string(G_CHECKSUM_SHA256, S->secret, -1);
    g_strlcpy(S->secret_sha256, sum, sizeof(S->secret_sha256));
    return true;
}

/* Does @secret (may be NULL) match @S's?  Compares hashes in constant time */
static bool session_secret_ok(ExtlockdSession *S, const char *secret)
{
    g_autofree char *sum = NULL;
    unsigned diff = 0;

    if (!secret || !S->secret_sha256[0]) {
        return false;
    }
    sum = g_compute_checksum_for_string(G_CHECKSUM_SHA256, secret, -1);
    for (size_t i = 0; i < 64; i++) {
        diff |= (unsigned char)sum[i] ^ (unsigned char)S->secret_sha256[i];
    }
    return diff == 0;
}

/* A session with id @id (NULL: a new random one), attached to nothing */
static ExtlockdSession *session_alloc(ExtlockdServer *s, const char *id,
                                      const char *client_id,
                                      const char *space_name,
                                      uint32_t lease_ms, int64_t now)
{
    ExtlockdSession *S = g_new0(ExtlockdSession, 1);

    S->server = s;
    if (id) {
        g_strlcpy(S->id, id, sizeof(S->id));
    } else {
        make_session_id(s, S->id);
    }
    S->client_id = g_strdup(client_id);
    S->space = space_get(s, space_name);
    S->space->nsessions++;
    S->held = g_hash_table_new(g_direct_hash, g_direct_equal);
    S->waiting = g_hash_table_new(waiting_hash, waiting_equal);
    S->state = SESSION_DISCONNECTED;
    S->lease_ms = lease_ms;
    S->fence_margin_ms = s->cfg.fence_margin_ms;
    S->deadline_us = now + (int64_t)lease_ms * 1000;
    S->link.data = S;
    S->reclaim_link.data = S;
    g_queue_push_tail_link(&s->session_list, &S->link);
    g_hash_table_insert(s->sessions, S->id, S);
    return S;
}

/*
 * Attach @S to @c with a fresh lease of @lease_ms.  A session that comes
 * back with a shorter lease than it had keeps its later deadline: its
 * client may still be writing under the lease it was given before.
 */
static void conn_unauth_done(ExtlockdConn *c);

static void session_attach(ExtlockdSession *S, ExtlockdConn *c,
                           uint32_t lease_ms, int64_t now)
{
    conn_unauth_done(c);
    S->conn = c;
    c->session = S;
    S->state = SESSION_ACTIVE;
    S->restored = false;
    S->lease_ms = lease_ms;
    S->deadline_us = MAX(S->deadline_us, now + (int64_t)lease_ms * 1000);
    server_schedule(S->server, S->deadline_us);
}

/* Sessions of @identity now (--max-sessions-per-identity) */
static unsigned identity_sessions(ExtlockdServer *s, const char *identity)
{
    return GPOINTER_TO_UINT(g_hash_table_lookup(s->identity_sessions,
                                                identity));
}

/* @S has its owner: count it */
static void identity_session_add(ExtlockdSession *S)
{
    ExtlockdServer *s = S->server;
    unsigned n;

    if (!S->owner) {
        return;
    }
    n = identity_sessions(s, S->owner);
    g_hash_table_insert(s->identity_sessions, g_strdup(S->owner),
                        GUINT_TO_POINTER(n + 1));
}

static void identity_session_remove(ExtlockdSession *S)
{
    ExtlockdServer *s = S->server;
    unsigned n;

    if (!S->owner) {
        return;
    }
    n = identity_sessions(s, S->owner);
    g_assert(n > 0);
    if (n == 1) {
        g_hash_table_remove(s->identity_sessions, S->owner);
    } else {
        g_hash_table_insert(s->identity_sessions, g_strdup(S->owner),
                            GUINT_TO_POINTER(n - 1));
    }
}

static void session_free(ExtlockdSession *S)
{
    g_hash_table_destroy(S->held);
    g_hash_table_destroy(S->waiting);
    g_free(S->owner);
    explicit_bzero(S->secret, sizeof(S->secret));
    g_free(S->client_id);
    g_free(S);
}

/*
 * @S will not reclaim any more (reclaim-done, bye, lease lapsed); the
 * grace period of its lock-space ends when nobody reclaims any more
 */
static void session_end_reclaim(ExtlockdSession *S)
{
    ExtlockdSpace *space = S->space;

    if (!S->reclaiming) {
        return;
    }
    S->reclaiming = false;
    g_queue_unlink(&space->reclaimers, &S->reclaim_link);
    if (space->in_grace && space->reclaimers.length == 0) {
        space_end_grace(space, false);
    }
}

/*
 * The session must not hold or wait for anything any more.  Does not
 * rewrite the state file: see session_destroy().
 */
static void session_destroy_nosave(ExtlockdSession *S)
{
    ExtlockdServer *s = S->server;

    g_assert(g_hash_table_size(S->held) == 0);
    g_assert(g_hash_table_size(S->waiting) == 0);
    session_end_reclaim(S);
    extlockd_fence_cancel(S->fence);
    S->fence = NULL;
    if (S->conn) {
        S->conn->session = NULL;
        S->conn = NULL;
    }
    if (S->revocable) {
        S->space->nrevocable--;
    }
    g_hash_table_remove(s->sessions, S->id);
    identity_session_remove(S);
    g_queue_unlink(&s->session_list, &S->link);
    space_unref(S->space);
    session_free(S);
}

/* Record the current sessions in the state file, or complain */
static void save_state_or_warn(ExtlockdServer *s)
{
    /* A session gone from the file only matters after a crash */
    save_state_async(s);
}

static void session_destroy(ExtlockdSession *S)
{
    ExtlockdServer *s = S->server;

    session_destroy_nosave(S);
    save_state_or_warn(s);
}

static GPtrArray *take_all(GHashTable *set, GPtrArray *into)
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

static bool lock_is_deferred(const ExtlockLock *lock)
{
    return lock->id == 0;
}

/* Cancel a waiting request (in the table or deferred) */
static void waiter_cancel(ExtlockdSpace *space, ExtlockLock *lock)
{
    if (lock_is_deferred(lock)) {
        DeferredReq *d = (DeferredReq *)lock;

        g_queue_unlink(&space->deferred, &d->link);
        g_free(d);
    } else {
        extlock_table_release(space->table, lock);
    }
}

/*
 * Cancel every waiting request of @S and, if @held too, release every lock
 * it holds.  Releases may grant other sessions' requests (grant_cb); while
 * @S is releasing, grants of its own requests are ignored, and such locks
 * are released later in the same loop because they are in the array.
 * Returns the number of granted locks released.
 */
static unsigned session_release(ExtlockdSession *S, bool held)
{
    ExtlockTable *table = S->space->table;
    g_autoptr(GPtrArray) waiters = g_ptr_array_new();
    g_autoptr(GPtrArray) locks = g_ptr_array_new();

    take_all(S->waiting, waiters);
    if (held) {
        take_all(S->held, locks);
    }
    if (waiters->len == 0 && locks->len == 0) {
        return 0;
    }
    S->releasing = true;
    for (guint i = 0; i < waiters->len; i++) {
        waiter_cancel(S->space, waiters->pdata[i]);
    }
    for (guint i = 0; i < locks->len; i++) {
        log_lock(S->server, "release", locks->pdata[i], NULL);
        extlock_table_release(table, locks->pdata[i]);
    }
    S->releasing = false;
    return locks->len;
}

/* The session's connection dropped without "bye" */
static void session_detach(ExtlockdSession *S)
{
    ExtlockdServer *s = S->server;
    int64_t now = g_get_monotonic_time();
    int64_t release_us = S->deadline_us + s->cfg.fence_margin_ms * 1000LL;

    g_assert(S->state == SESSION_ACTIVE);
    session_release(S, false);
    S->conn->session = NULL;
    S->conn = NULL;
    S->state = SESSION_DISCONNECTED;
    g_message("session %s (%s, lock-space %s) lost its connection; "
              "%u locks kept, released in %" PRId64 " ms unless resumed",
              S->id, S->client_id, S->space->name,
              g_hash_table_size(S->held),
              MAX(release_us - now, 0) / 1000);
    server_schedule(s, S->deadline_us);
}

/* ------------------------------------------------------------------ */
/* Fencing an expired session (fence.h)                                */

static void fence_waiter_cb(ExtlockLock *other, void *opaque)
{
    GHashTable *set = opaque;
    ExtlockdSession *W = other->owner;

    if (other->state == EXTLOCK_LOCK_WAITING && W->conn) {
        g_hash_table_add(set, W);
    }
}

/*
 * Tell every session with a request waiting behind a lock of the expired
 * session @S how its fencing goes (fence-status)
 */
static void fence_notify(ExtlockdSession *S, ExtlockFenceResult result,
                         const char *message)
{
    g_autoptr(GHashTable) waiters = g_hash_table_new(NULL, NULL);
    GHashTableIter iter;
    gpointer key;
    ExtlockMsg r;

    g_hash_table_iter_init(&iter, S->held);
    while (g_hash_table_iter_next(&iter, &key, NULL)) {
        extlock_table_foreach_conflict(S->space->table, key,
                                       fence_waiter_cb, waiters);
    }
    if (S->grace_fenced) {
        /* Its extents are unknown: everybody deferred waits for it */
        for (GList *l = S->space->deferred.head; l; l = l->next) {
            ExtlockdSession *W = ((DeferredReq *)l->data)->lock.owner;

            if (W->conn) {
                g_hash_table_add(waiters, W);
            }
        }
    }
    g_hash_table_remove(waiters, S);
    extlock_msg_init(&r, EXTLOCK_MSG_FENCE_STATUS);
    r.lock_space = S->space->name;
    r.client_id = S->client_id;
    r.session_client = S->client_id;
    r.session = S->id;
    r.fence_result = result;
    r.message = (char *)message;
    g_hash_table_iter_init(&iter, waiters);
    while (g_hash_table_iter_next(&iter, &key, NULL)) {
        send_msg(((ExtlockdSession *)key)->conn, &r);
    }
}

static void check_deadlines(ExtlockdServer *s);

static void session_fence_cb(ExtlockdFence *f, ExtlockdFenceState state,
                             const char *message, void *opaque)
{
    ExtlockdSession *S = opaque;
    ExtlockdServer *s = S->server;
    const char *agent = extlockd_fencer_agent(s->fencer);

    switch (state) {
    case EXTLOCKD_FENCE_RUNNING:
        g_message("fence agent %s started again for session %s (%s, "
                  "lock-space %s), attempt %u", agent, S->id, S->client_id,
                  S->space->name, extlockd_fence_attempts(f));
        log_session(S, "fence-start", NULL);
        fence_notify(S, EXTLOCK_FENCE_STARTED, NULL);
        break;
    case EXTLOCKD_FENCE_OK:
        g_message("session %s (%s, lock-space %s) fenced: %s", S->id,
                  S->client_id, S->space->name, message);
        S->fence_ok = true;
        log_session(S, "fence-ok", message);
        fence_notify(S, EXTLOCK_FENCE_SUCCEEDED, message);
        if (S->grace_fenced) {
            ExtlockdSpace *space = S->space;

            /* The last one fenced ends the grace period, freeing @f */
            if (--space->grace_fence_pending == 0) {
                space_end_grace(space, true);
            }
        }
        /* May release the locks now, which frees @f */
        check_deadlines(s);
        break;
    case EXTLOCKD_FENCE_FAILED:
        g_warning("FENCING FAILED for client %s (session %s, lock-space "
                  "%s), attempt %u: %s; its %u locks stay held, retrying "
                  "in %u ms (extlockctl release-session %s forces the "
                  "release)", S->client_id, S->id, S->space->name,
                  extlockd_fence_attempts(f), message,
                  g_hash_table_size(S->held), extlockd_fence_retry_ms(f),
                  S->id);
        log_session(S, "fence-failed", message);
        fence_notify(S, EXTLOCK_FENCE_FAILED, message);
        break;
    }
    flush_all(s);
}

static void session_fence_start(ExtlockdSession *S)
{
    ExtlockdServer *s = S->server;

    g_message("running fence agent %s for client %s (session %s, "
              "lock-space %s, %u locks held)",
              extlockd_fencer_agent(s->fencer), S->client_id, S->id,
              S->space->name, g_hash_table_size(S->held));
    S->fence = extlockd_fence_start(s->fencer, S->client_id,
                                    session_fence_cb, S);
    log_session(S, "fence-start", NULL);
    fence_notify(S, EXTLOCK_FENCE_STARTED, NULL);
}

/* The lease lapsed (now >= deadline) */
static void session_expire(ExtlockdSession *S)
{
    ExtlockdServer *s = S->server;
    ExtlockdConn *c = S->conn;

    if (S->state == SESSION_ACTIVE) {
        ExtlockMsg r;

        g_warning("session %s (%s, lock-space %s) expired: no renewal "
                  "within %u ms; its %u locks are released after the "
                  "%u ms fence margin", S->id, S->client_id,
                  S->space->name, S->lease_ms, g_hash_table_size(S->held),
                  s->cfg.fence_margin_ms);
        extlock_msg_init(&r, EXTLOCK_MSG_SESSION_EXPIRED);
        r.session = S->id;
        r.message = (char *)"lease expired without renewal";
        send_msg(c, &r);
        session_release(S, false);
        c->session = NULL;
        S->conn = NULL;
        conn_close_after_flush(c);
    } else {
        VERBOSE(s, "session %s: lease of disconnected session lapsed",
                S->id);
    }
    S->state = SESSION_EXPIRED;
    log_session(S, "expire", NULL);
    /* It cannot come back to finish reclaiming */
    session_end_reclaim(S);
    if (s->fencer && g_hash_table_size(S->held) > 0) {
        session_fence_start(S);
    }
}

/* The fence margin after the deadline has passed: let the locks go */
static void session_reap(ExtlockdSession *S)
{
    unsigned n = session_release(S, true);

    g_message("session %s (%s, lock-space %s) ended: lease lapsed, "
              "released %u locks", S->id, S->client_id, S->space->name, n);
    session_destroy(S);
}

/* ------------------------------------------------------------------ */
/* Lock requests and the grace period                                  */

static void waiting_blocker_cb(ExtlockLock *blocker, void *opaque)
{
    GArray *blockers = opaque;
    ExtlockdSession *S = blocker->owner;
    ExtlockBlocker b;

    if (blockers->len >= MAX_BLOCKERS) {
        return;
    }
    b.client_id = S->client_id;
    b.offset = blocker->node.ext.start;
    b.length = blocker->node.ext.end - blocker->node.ext.start;
    b.mode = blocker->mode;
    b.token = blocker->token;
    b.waiting = blocker->state == EXTLOCK_LOCK_WAITING;
    g_array_append_val(blockers, b);
}

static void send_waiting(ExtlockdConn *c, uint64_t id, uint64_t token,
                         GArray *blockers)
{
    ExtlockMsg r;

    extlock_msg_init(&r, EXTLOCK_MSG_WAITING);
    r.has_id = true;
    r.id = id;
    r.token = token;
    r.blockers = blockers;
    send_msg(c, &r);
}

/*
 * Put the lock request @req (extent, limit, mode, token, request id in
 * user_tag; not in any table or set) of @S into the table and answer it
 * on @c: "granted", or "waiting" if @say_waiting (a deferred request was
 * told so already).  The holders it waits for get a revoke.
 */
static void space_submit(ExtlockdSpace *space, ExtlockdSession *S,
                         ExtlockdConn *c, const ExtlockLock *req,
                         bool say_waiting)
{
    ExtlockdServer *s = space->server;
    ExtlockTable *table = space->table;
    ExtlockLock *lock;

    lock = extlock_table_request_grow(table, req->requested, req->limit,
                                      req->mode, req->token, S,
                                      req->user_tag);
    if (lock->state == EXTLOCK_LOCK_GRANTED) {
        g_hash_table_add(S->held, lock);
        log_lock(s, "grant", lock, NULL);
        if (c) {
            format_granted(c, lock);
        }
        return;
    }
    g_hash_table_add(S->waiting, lock);
    if (c && say_waiting) {
        g_array_set_size(s->blockers, 0);
        extlock_table_foreach_blocker(table, lock, waiting_blocker_cb,
                                      s->blockers);
        send_waiting(c, lock->user_tag, lock->token, s->blockers);
    }
    if (space->nrevocable) {
        extlock_table_foreach_conflict(table, lock, revoke_holder_cb, lock);
    }
}

/* A lock request during the grace period: queue it outside the table */
static void space_defer(ExtlockdSpace *space, ExtlockdSession *S,
                        ExtlockdConn *c, const ExtlockLock *req)
{
    DeferredReq *d = g_new0(DeferredReq, 1);

    d->lock = *req;
    d->lock.id = 0;
    d->lock.node.ext = req->requested;
    d->lock.state = EXTLOCK_LOCK_WAITING;
    d->lock.owner = S;
    d->lock.queued_us = g_get_monotonic_time();
    d->link.data = d;
    g_queue_push_tail_link(&space->deferred, &d->link);
    g_hash_table_add(S->waiting, &d->lock);
    g_array_set_size(space->server->blockers, 0);
    send_waiting(c, req->user_tag, req->token, space->server->blockers);
}

static int64_t grace_remaining_ms(ExtlockdSpace *space, int64_t now)
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
static bool space_fence_absent(ExtlockdSpace *space)
{
    ExtlockdServer *s = space->server;
    int64_t margin_us = s->cfg.fence_margin_ms * 1000LL;
    GList *l, *next;

    for (l = space->reclaimers.head; l; l = next) {
        ExtlockdSession *S = l->data;

        next = l->next;
        if (!S->restored) {
            continue;
        }
        g_queue_unlink(&space->reclaimers, &S->reclaim_link);
        S->reclaiming = false;
        S->state = SESSION_EXPIRED;
        /* Its lease (<= the grace period) ended before the timeout */
        S->deadline_us = s->grace_end_us - margin_us;
        S->grace_fenced = true;
        g_queue_push_tail_link(&space->grace_fenced, &S->reclaim_link);
        space->grace_fence_pending++;
        g_message("session %s (%s, lock-space %s) did not come back during "
                  "the grace period: fencing it before the grace period "
                  "ends", S->id, S->client_id, space->name);
        log_session(S, "expire", NULL);
        session_fence_start(S);
    }
    if (space->grace_linked) {
        g_queue_unlink(&s->grace_spaces, &space->grace_link);
        space->grace_linked = false;
    }
    return space->grace_fence_pending > 0;
}

static gboolean space_dispute_cb(gpointer opaque)
{
    ExtlockdSpace *space = opaque;

    space->dispute_timer = 0;
    /*
     * Only if the grace period would have ended by now: else it ends as
     * usual, when every session is done reclaiming or at its timeout
     */
    if (space->in_grace &&
        (space->grace_timed_out || space->reclaimers.length == 0)) {
        space_end_grace(space, space->grace_timed_out);
    }
    space_unref(space);
    return G_SOURCE_REMOVE;
}

/*
 * A reclaim conflict is pending in @space: the grace period may not end
 * before it is over.  Returns true if the end was postponed (a timer
 * comes back).
 */
static bool space_dispute_postpone(ExtlockdSpace *space, bool timeout)
{
    ExtlockdServer *s = space->server;
    int64_t now = g_get_monotonic_time();

    if (space->dispute_until_us <= now) {
        return false;
    }
    space->grace_timed_out |= timeout;
    if (timeout && space->grace_linked) {
        /* server_end_grace() would come back to it at once */
        g_queue_unlink(&s->grace_spaces, &space->grace_link);
        space->grace_linked = false;
    }
    if (!space->dispute_timer) {
        space->nsessions++;
        space->dispute_timer = g_timeout_add(
            (guint)((space->dispute_until_us - now + 999) / 1000),
            space_dispute_cb, space);
    }
    return true;
}

static void space_end_grace(ExtlockdSpace *space, bool timeout)
{
    ExtlockdServer *s = space->server;
    g_autoptr(GPtrArray) drop = g_ptr_array_new();
    unsigned nlate = 0, ndeferred = space->deferred.length;
    GList *l;

    g_assert(space->in_grace);
    if (space_dispute_postpone(space, timeout)) {
        return;
    }
    if (space->grace_fence_pending ||
        (timeout && s->fencer && space_fence_absent(space))) {
        /* Waits for the fence agent: session_fence_cb comes back */
        return;
    }
    space->in_grace = false;
    if (space->grace_linked) {
        g_queue_unlink(&s->grace_spaces, &space->grace_link);
        space->grace_linked = false;
    }
    if (space->disputed) {
        g_array_set_size(space->disputed, 0);
    }
    space->nsessions++;         /* keep @space while sessions go away */
    while ((l = g_queue_pop_head_link(&space->grace_fenced)) != NULL) {
        ExtlockdSession *S = l->data;

        S->grace_fenced = false;
        g_ptr_array_add(drop, S);
    }

    while ((l = g_queue_pop_head_link(&space->reclaimers)) != NULL) {
        ExtlockdSession *S = l->data;

        S->reclaiming = false;
        if (S->restored) {
            g_ptr_array_add(drop, S);
        } else {
            /* Its client may still be busy reclaiming: see reclaim-done */
            S->resend_revokes = true;
            nlate++;
        }
    }

    while ((l = g_queue_pop_head_link(&space->deferred)) != NULL) {
        DeferredReq *d = l->data;
        ExtlockdSession *S = d->lock.owner;

        g_hash_table_remove(S->waiting, &d->lock);
        space_submit(space, S, S->conn, &d->lock, false);
        g_free(d);
    }

    g_message("grace period of lock-space %s ended%s: %u session(s) that "
              "did not come back dropped, %u still reclaiming, %u deferred "
              "request(s) queued", space->name,
              timeout ? " (timeout)" : ", every session reclaimed",
              drop->len, nlate, ndeferred);
    for (guint i = 0; i < drop->len; i++) {
        ExtlockdSession *S = drop->pdata[i];

        g_message("session %s (%s, lock-space %s) dropped: it did not "
                  "come back during the grace period", S->id,
                  S->client_id, S->space->name);
        session_destroy_nosave(S);
    }
    if (drop->len) {
        save_state_or_warn(s);
    }
    space_unref(space);
}

/* The grace period timer ran out (called from the lease timer) */
static void server_end_grace(ExtlockdServer *s)
{
    GList *l;

    while ((l = s->grace_spaces.head) != NULL) {
        space_end_grace(l->data, true);
    }
}

void extlockd_server_restore(ExtlockdServer *s, GPtrArray *sessions)
{
    int64_t now = g_get_monotonic_time();

    if (!sessions || sessions->len == 0) {
        return;
    }
    if (s->cfg.grace_ms == 0) {
        g_message("no grace period: the %u session(s) of the previous run "
                  "are dropped", sessions->len);
        return;
    }
    s->grace_end_us = now + (int64_t)s->cfg.grace_ms * 1000;
    for (guint i = 0; i < sessions->len; i++) {
        const ExtlockdStateSession *ss = sessions->pdata[i];
        ExtlockdSession *S;

        if (g_hash_table_contains(s->sessions, ss->session)) {
            continue;
        }
        /* Unknown (old file): the longest a client may have had */
        S = session_alloc(s, ss->session, ss->client_id, ss->lock_space,
                          ss->lease_ms ? ss->lease_ms : EXTLOCK_MAX_LEASE_MS,
                          now);
        S->owner = g_strdup(ss->owner);
        identity_session_add(S);
        if (ss->fence_margin_ms) {
            S->fence_margin_ms = ss->fence_margin_ms;
        }
        if (ss->secret_sha256) {
            g_strlcpy(S->secret_sha256, ss->secret_sha256,
                      sizeof(S->secret_sha256));
        }
        /* It ends with the grace period unless its client comes back */
        S->deadline_us = s->grace_end_us;
        S->restored = true;
        S->reclaiming = true;
        g_queue_push_tail_link(&S->space->reclaimers, &S->reclaim_link);
        if (!S->space->in_grace) {
            S->space->in_grace = true;
            S->space->grace_link.data = S->space;
            g_queue_push_tail_link(&s->grace_spaces, &S->space->grace_link);
            S->space->grace_linked = true;
        }
    }
    g_message("grace period of %u ms: %u session(s) in %u lock-space(s) "
              "may reclaim their locks", s->cfg.grace_ms, sessions->len,
              s->grace_spaces.length);
    server_schedule(s, s->grace_end_us);
}

/* ------------------------------------------------------------------ */
/* Lease timer                                                         */

static void check_deadlines(ExtlockdServer *s)
{
    int64_t now = g_get_monotonic_time();
    int64_t margin_us = s->cfg.fence_margin_ms * 1000LL;
    int64_t next = INT64_MAX;
    GList *l, *lnext;

    if (s->grace_spaces.length) {
        if (now >= s->grace_end_us) {
            server_end_grace(s);
        } else {
            next = s->grace_end_us;
        }
    }
    for (l = s->session_list.head; l; l = lnext) {
        ExtlockdSession *S = l->data;

        lnext = l->next;
        if (S->state != SESSION_EXPIRED && now >= S->deadline_us) {
            session_expire(S);
        }
        if (S->grace_fenced) {
            /* Dropped when the grace period of its lock-space ends */
            continue;
        }
        if (S->state == SESSION_EXPIRED) {
            if (S->fence && !S->fence_ok) {
                /* Waits for the agent: session_fence_cb comes back */
                continue;
            }
            if (now >= S->deadline_us + margin_us) {
                session_reap(S);
                continue;
            }
            next = MIN(next, S->deadline_us + margin_us);
        } else {
            next = MIN(next, S->deadline_us);
        }
    }
    /* Connections that never said hello, oldest first */
    while ((l = s->unauth.head) != NULL) {
        ExtlockdConn *c = l->data;
        int64_t due = c->accepted_us + s->cfg.hello_timeout_ms * 1000LL;

        if (now < due) {
            next = MIN(next, due);
            break;
        }
        g_message("%s: closed: no hello within %u ms%s", c->peer,
                  s->cfg.hello_timeout_ms,
                  c->handshaking ? " (TLS handshake unfinished)" : "");
        conn_unauth_done(c);
        if (c->handshaking) {
            conn_destroy(c);
            continue;
        }
        send_error(c, false, 0, EXTLOCK_ERR_STATE,
                   "no hello within %u ms: closing", s->cfg.hello_timeout_ms);
        conn_close_after_flush(c);
        next = MIN(next, c->closing_since_us + CLOSE_TIMEOUT_US);
    }
    for (l = s->conns.head; l; l = lnext) {
        ExtlockdConn *c = l->data;

        lnext = l->next;
        if (!c->closing) {
            continue;
        }
        if (now - c->closing_since_us >= CLOSE_TIMEOUT_US) {
            VERBOSE(s, "%s: closing without flushing", c->peer);
            conn_destroy(c);
            continue;
        }
        next = MIN(next, c->closing_since_us + CLOSE_TIMEOUT_US);
    }
    if (next != INT64_MAX) {
        server_schedule(s, next);
    }
}

static gboolean on_timer(gpointer opaque)
{
    ExtlockdServer *s = opaque;

    s->timer = 0;
    check_deadlines(s);
    flush_all(s);
    return G_SOURCE_REMOVE;
}

/* Make sure the timer runs no later than @when_us */
static void server_schedule(ExtlockdServer *s, int64_t when_us)
{
    int64_t now, delay_ms;

    if (s->timer && s->timer_due_us <= when_us) {
        return;
    }
    if (s->timer) {
        g_source_remove(s->timer);
    }
    now = g_get_monotonic_time();
    delay_ms = when_us > now ? (when_us - now + 999) / 1000 : 0;
    s->timer = g_timeout_add((guint)MIN(delay_ms, (int64_t)G_MAXUINT),
                             on_timer, s);
    s->timer_due_us = when_us;
}

/* ------------------------------------------------------------------ */
/* Status                                                              */

typedef struct StatusCtx {
    ExtlockdSpace *space;
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

static void json_add_int(json_object *obj, const char *key, int64_t v)
{
    json_object_object_add(obj, key, json_object_new_int64(v));
}

static void json_add_str(json_object *obj, const char *key, const char *v)
{
    json_object_object_add(obj, key, json_object_new_string(v));
}

static void status_blocker_cb(ExtlockLock *blocker, void *opaque)
{
    StatusCtx *ctx = opaque;
    ExtlockdSession *S = blocker->owner;
    char *name = S->client_id;

    if (ctx->self && S != ctx->self) {
        name = (char *)"(other client)";
    }
    if (g_hash_table_add(ctx->seen, name)) {
        json_object_array_add(ctx->blocked_by, json_object_new_string(name));
    }
}

static void status_lock_cb(ExtlockLock *lock, void *opaque)
{
    StatusCtx *ctx = opaque;
    ExtlockdSession *S = lock->owner;
    json_object *o;

    if (ctx->listed >= ctx->limit) {
        ctx->truncated++;
        return;
    }
    ctx->listed++;
    o = json_object_new_object();
    if (lock->state == EXTLOCK_LOCK_GRANTED) {
        json_add_int(o, "lock", lock->id);
    } else {
        json_add_int(o, "request", lock->user_tag);
    }
    if (!ctx->self || S == ctx->self) {
        json_add_str(o, "session", S->id);
        json_add_str(o, "client-id", S->client_id);
    }
    json_add_int(o, "offset", lock->node.ext.start);
    json_add_int(o, "length", lock->node.ext.end - lock->node.ext.start);
    json_add_str(o, "mode", extlock_mode_name(lock->mode));
    json_add_int(o, "token", lock->token);
    if (lock_is_deferred(lock)) {
        /* Queued outside the table until the grace period ends */
        json_add_int(o, "waited-ms", (ctx->now - lock->queued_us) / 1000);
        json_object_object_add(o, "blocked-by", json_object_new_array());
        json_object_object_add(o, "deferred", json_object_new_boolean(1));
        json_object_array_add(ctx->waiting, o);
    } else if (lock->state == EXTLOCK_LOCK_GRANTED) {
        json_add_int(o, "held-ms", (ctx->now - lock->granted_us) / 1000);
        if (lock->limit.start != lock->requested.start ||
            lock->limit.end != lock->requested.end) {
            /* It may have grown: what was asked for */
            json_add_int(o, "requested-offset", lock->requested.start);
            json_add_int(o, "requested-length",
                         lock->requested.end - lock->requested.start);
        }
        json_object_array_add(ctx->held, o);
    } else {
        json_add_int(o, "waited-ms", (ctx->now - lock->queued_us) / 1000);
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

static int compare_strings(gconstpointer a, gconstpointer b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/*
 * The status of @space; it lists at most *@limit locks and requests and
 * takes those it lists off *@limit
 */
static json_object *space_status(ExtlockdSpace *space, int64_t now,
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

    json_add_str(o, "name", space->name);
    json_add_int(counters, "requests", st->requests + space->nowait_grants);
    json_add_int(counters, "immediate-grants",
                 st->immediate_grants + space->nowait_grants);
    json_add_int(counters, "waits", st->waits);
    json_add_int(counters, "deferred-grants", st->deferred_grants);
    json_add_int(counters, "releases", st->releases);
    json_add_int(counters, "partial-releases", st->partial_releases);
    json_add_int(counters, "cancels", st->cancels);
    json_add_int(counters, "total-wait-us", st->total_wait_us);
    json_add_int(counters, "grown-grants", st->grown_grants);
    json_add_int(counters, "revokes-sent", space->revokes_sent);
    json_add_int(counters, "downgrades", st->downgrades);
    json_add_int(counters, "reclaims", space->reclaims);
    json_object_object_add(o, "counters", counters);
    json_add_int(o, "grace-remaining-ms", grace_remaining_ms(space, now));
    extlock_table_foreach(space->table, status_lock_cb, &ctx);
    for (GList *l = space->deferred.head; l; l = l->next) {
        status_lock_cb(&((DeferredReq *)l->data)->lock, &ctx);
    }
    json_object_object_add(o, "held", ctx.held);
    json_object_object_add(o, "waiting", ctx.waiting);
    if (ctx.truncated) {
        json_add_int(o, "truncated", ctx.truncated);
    }
    *limit -= ctx.listed;
    return o;
}

static json_object *session_status(ExtlockdSession *S, int64_t now)
{
    json_object *o = json_object_new_object();
    int64_t remaining = 0;

    if (S->state != SESSION_EXPIRED && S->deadline_us > now) {
        remaining = (S->deadline_us - now) / 1000;
    }
    json_add_str(o, "session", S->id);
    json_add_str(o, "client-id", S->client_id);
    json_add_str(o, "lock-space", S->space->name);
    json_add_str(o, "owner", S->owner ? S->owner : "(unknown)");
    json_add_str(o, "state", session_state_names[S->state]);
    json_add_int(o, "lease-remaining-ms", remaining);
    json_add_int(o, "locks-held", g_hash_table_size(S->held));
    json_add_int(o, "requests-waiting", g_hash_table_size(S->waiting));
    json_object_object_add(o, "reclaiming",
                           json_object_new_boolean(S->reclaiming));
    if (S->fence) {
        static const char *const names[] = {
            [EXTLOCKD_FENCE_RUNNING] = "running",
            [EXTLOCKD_FENCE_OK] = "succeeded",
            [EXTLOCKD_FENCE_FAILED] = "failed",
        };
        const char *msg = extlockd_fence_message(S->fence);

        json_add_str(o, "fence", names[extlockd_fence_state(S->fence)]);
        json_add_int(o, "fence-attempts",
                     extlockd_fence_attempts(S->fence));
        if (msg) {
            json_add_str(o, "fence-message", msg);
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
static json_object *server_status(ExtlockdServer *s, ExtlockdConn *viewer,
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

    json_add_str(root, "server", EXTLOCKD_SERVER_NAME);
    json_add_int(root, "epoch", s->epoch);
    json_add_int(root, "uptime-ms", (now - s->start_us) / 1000);
    json_add_int(root, "lease-ms", s->cfg.lease_ms);
    json_add_int(root, "fence-margin-ms", s->cfg.fence_margin_ms);
    json_add_int(root, "grace-ms", s->cfg.grace_ms);
    json_add_int(root, "start-ns", s->start_us * 1000);
    if (s->fencer) {
        json_add_str(root, "fence-agent", extlockd_fencer_agent(s->fencer));
        json_add_int(root, "fence-timeout-ms",
                     extlockd_fencer_timeout_ms(s->fencer));
    }
    json_add_int(root, "grace-remaining-ms",
                 s->grace_spaces.length && s->grace_end_us > now ?
                 (s->grace_end_us - now + 999) / 1000 : 0);
    json_add_int(counters, "connections", s->conns.length);
    json_add_int(counters, "sessions", g_hash_table_size(s->sessions));
    json_add_int(counters, "messages", s->nmessages);
    json_add_int(counters, "errors", s->nerrors);
    json_add_int(counters, "refused-connections", s->refused);
    json_object_object_add(root, "counters", counters);
    if (s->ha) {
        json_object_object_add(root, "cluster", extlockd_ha_status(s->ha));
    }
    if (viewer->identity) {
        json_add_str(root, "identity", viewer->identity);
    }
    if (!extlockd_policy_is_admin(s->policy, viewer->identity)) {
        self = viewer->session;
        g_assert(self);
        json_object_array_add(spaces, space_status(self->space, now, self,
                                                       limit));
        json_object_object_add(root, "lock-spaces", spaces);
        json_object_array_add(sessions, session_status(self, now));
        json_object_object_add(root, "sessions", sessions);
        return root;
    }

    g_hash_table_iter_init(&iter, s->spaces);
    while (g_hash_table_iter_next(&iter, &key, NULL)) {
        g_ptr_array_add(names, key);
    }
    g_ptr_array_sort(names, compare_strings);
    for (guint i = 0; i < names->len; i++) {
        ExtlockdSpace *space = g_hash_table_lookup(s->spaces,
                                                   names->pdata[i]);
        json_object_array_add(spaces, space_status(space, now, NULL, limit));
    }
    json_object_object_add(root, "lock-spaces", spaces);

    for (GList *l = s->session_list.head; l; l = l->next) {
        json_object_array_add(sessions, session_status(l->data, now));
    }
    json_object_object_add(root, "sessions", sessions);
    return root;
}

/* ------------------------------------------------------------------ */
/* Requests                                                            */

/* A token bucket: status_rate per second, as many at once */
static bool status_rate_ok(ExtlockdConn *c)
{
    uint32_t rate = c->server->cfg.status_rate;
    int64_t now = g_get_monotonic_time();
    int64_t interval = G_USEC_PER_SEC / rate;

    if (now >= c->status_refill_us) {
        int64_t n = (now - c->status_refill_us) / interval + 1;

        c->status_tokens = MIN(c->status_tokens + n, rate);
        c->status_refill_us += n * interval;
    }
    if (c->status_tokens == 0) {
        return false;
    }
    c->status_tokens--;
    return true;
}

/*
 * How many locks and requests a status for @admin may list now: the
 * per-reply cap, or less when the server-wide budget is low
 */
static uint64_t status_budget_take(ExtlockdServer *s, bool admin)
{
    int64_t now = g_get_monotonic_time();
    uint64_t refill;

    refill = (uint64_t)(now - s->status_budget_us) *
             EXTLOCKD_STATUS_ENTRIES_PER_SEC / G_USEC_PER_SEC;
    if (refill) {
        s->status_budget = MIN(s->status_budget + refill,
                               EXTLOCKD_STATUS_ENTRIES_PER_SEC);
        s->status_budget_us = now;
    }
    return MIN(s->status_budget, admin ? EXTLOCKD_STATUS_MAX_ENTRIES_ADMIN
                                       : EXTLOCKD_STATUS_MAX_ENTRIES);
}

static void handle_status(ExtlockdConn *c, ExtlockMsg *m)
{
    ExtlockdServer *s = c->server;
    bool admin = extlockd_policy_is_admin(s->policy, c->identity);
    bool idle = c->out_pos == c->out->len;
    ExtlockMsg r;
    size_t before;
    uint64_t limit, granted;

    if (!c->session && !admin) {
        log_refusal(s, "%s: status refused: identity %s is not an admin "
                    "and has not said hello", c->peer, c->identity);
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_DENIED,
                   "status before hello needs an admin identity (this "
                   "connection is %s)", c->identity);
        return;
    }
    /* Root and the daemon's uid on the UNIX socket are not limited */
    if (!(admin && g_str_has_prefix(c->identity, "uid:")) &&
        !status_rate_ok(c)) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_LIMIT,
                   "too many status requests (limit %u per second, "
                   "--status-rate)", s->cfg.status_rate);
        return;
    }
    extlock_msg_init(&r, EXTLOCK_MSG_STATUS_REPLY);
    r.has_id = m->has_id;
    r.id = m->id;
    limit = granted = status_budget_take(s, admin);
    r.body = server_status(s, c, &limit);
    s->status_budget -= granted - limit;
    before = c->out->len;
    send_msg(c, &r);
    json_object_put(r.body);
    /*
     * A status bigger than the output limit is not a sign of a client
     * that does not read, but only when it had read everything before:
     * statuses piling up unread count against the limit
     */
    if (idle) {
        c->out_allowance += c->out->len - before;
    }
}

static int compare_lock_info(gconstpointer a, gconstpointer b)
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

static void send_welcome(ExtlockdConn *c, ExtlockMsg *m, ExtlockdSession *S,
                         WelcomeKind kind)
{
    ExtlockdServer *s = c->server;
    ExtlockMsg r;

    extlock_msg_init(&r, EXTLOCK_MSG_WELCOME);
    r.has_id = m->has_id;
    r.id = m->id;
    r.version = EXTLOCK_PROTOCOL_VERSION;
    r.session = S->id;
    r.lease_ms = S->lease_ms;
    r.epoch = s->epoch;
    r.server = (char *)EXTLOCKD_SERVER_NAME;
    r.grace_remaining_ms = grace_remaining_ms(S->space,
                                              g_get_monotonic_time());
    r.reclaim = kind == WELCOME_RECLAIM;
    r.resumed = kind == WELCOME_RESUMED;
    r.has_fence_margin = true;
    r.fence_margin_ms = s->cfg.fence_margin_ms;
    /* Only ever sent to the owner, on its own connection */
    r.resume_secret = S->secret;
    r.identity = c->identity;
    if (kind == WELCOME_RESUMED) {
        GHashTableIter iter;
        gpointer key;

        g_array_set_size(s->locks, 0);
        g_hash_table_iter_init(&iter, S->held);
        while (g_hash_table_iter_next(&iter, &key, NULL)) {
            ExtlockLock *lock = key;
            ExtlockLockInfo info = {
                .lock = lock->id,
                .offset = lock->node.ext.start,
                .length = lock->node.ext.end - lock->node.ext.start,
                .mode = lock->mode,
                .token = lock->token,
            };
            g_array_append_val(s->locks, info);
        }
        g_array_sort(s->locks, compare_lock_info);
        r.locks = s->locks;
    }
    send_msg(c, &r);
}

/*
 * @S is taken over by @c: the old connection may be dead without us
 * having noticed yet (e.g. TCP after a network failure).  The client has
 * proven it owns the session, so the session moves to the new
 * connection.  Requests still waiting on the old connection are
 * cancelled, exactly as if it had dropped.
 */
static void session_take_over(ExtlockdSession *S)
{
    ExtlockdConn *old = S->conn;

    g_message("session %s (%s) taken over by a new connection; "
              "closing the old one", S->id, S->client_id);
    session_release(S, false);
    old->session = NULL;
    S->conn = NULL;
    conn_close_after_flush(old);
}

/* hello with "session" of a live session */
static void handle_resume(ExtlockdConn *c, ExtlockMsg *m, ExtlockdSession *S,
                          uint32_t lease_ms, int64_t now)
{
    if (S->conn) {
        session_take_over(S);
    }
    session_attach(S, c, lease_ms, now);
    g_message("session %s (%s, lock-space %s) resumed on %s with %u locks",
              S->id, S->client_id, S->space->name, c->peer,
              g_hash_table_size(S->held));
    send_welcome(c, m, S, WELCOME_RESUMED);
    /* Revokes sent while it was away are lost: send them again */
    session_resend_revokes(S);
}

/*
 * Send the welcome for @S once the state writer has written what it says
 * (@old_sha256: a reclaim, with the previous secret's hash).  Until then
 * the connection's input waits too: requests after hello need the welcome
 * first.
 */
static void defer_welcome(ExtlockdConn *c, ExtlockMsg *m, ExtlockdSession *S,
                          const char *old_sha256)
{
    ExtlockdServer *s = c->server;
    DeferredWelcome *dw = g_new0(DeferredWelcome, 1);

    dw->gen = save_state_async(s);
    dw->conn_serial = c->serial;
    g_strlcpy(dw->session, S->id, sizeof(dw->session));
    dw->has_id = m->has_id;
    dw->id = m->id;
    if (old_sha256) {
        dw->reclaim = true;
        g_strlcpy(dw->old_sha256, old_sha256, sizeof(dw->old_sha256));
    }
    g_queue_push_tail(&s->welcomes, dw);
    c->awaiting_state = true;
    conn_set_events(c, c->events & ~G_IO_IN);
}

/* hello with "session" of a session listed in the state file, in grace */
static void handle_reclaim_hello(ExtlockdConn *c, ExtlockMsg *m,
                                 ExtlockdSession *S, uint32_t lease_ms,
                                 int64_t now)
{
    char old_sha256[sizeof(S->secret_sha256)];
    unsigned n;

    /*
     * Only the hash of the old secret survived the restart: hand out a
     * new one, durable before the client learns it (the welcome waits for
     * the state writer), and with it this run's fence margin if it is
     * larger than the one recorded
     */
    memcpy(old_sha256, S->secret_sha256, sizeof(old_sha256));
    S->fence_margin_ms = MAX(S->fence_margin_ms,
                             c->server->cfg.fence_margin_ms);
    if (!session_new_secret(S)) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_INTERNAL,
                   "cannot generate a resume secret");
        return;
    }
    if (S->conn) {
        session_take_over(S);
    }
    /*
     * It came back before, reclaimed some locks and lost its connection
     * again: it reclaims everything anew.  Nothing waits in the table of
     * a lock-space in grace, so releasing grants nothing.
     */
    n = session_release(S, true);
    session_attach(S, c, lease_ms, now);
    g_message("session %s (%s, lock-space %s) is back on %s after the "
              "restart and may reclaim its locks for %" PRId64 " ms%s",
              S->id, S->client_id, S->space->name, c->peer,
              grace_remaining_ms(S->space, now),
              n ? " (locks it had reclaimed already were dropped)" : "");
    defer_welcome(c, m, S, old_sha256);
}

/* HA follower (or a leader still taking office): name the leader */
static void send_not_leader(ExtlockdConn *c, ExtlockMsg *m)
{
    g_autofree char *leader = extlockd_ha_leader_address(c->server->ha);
    ExtlockMsg r;

    c->server->nerrors++;
    extlock_msg_init(&r, EXTLOCK_MSG_ERROR);
    r.has_id = m->has_id;
    r.id = m->id;
    r.error = EXTLOCK_ERR_NOT_LEADER;
    r.leader = leader && !extlockd_ha_leading(c->server->ha) ? leader : NULL;
    r.message = r.leader ? g_strdup_printf("this coordinator is not the "
                                           "leader; the leader is at %s",
                                           r.leader)
                         : g_strdup("this coordinator is not the leader, "
                                    "and no leader is known yet: try the "
                                    "others, or again");
    send_msg(c, &r);
    g_free(r.message);
}

static void handle_hello(ExtlockdConn *c, ExtlockMsg *m)
{
    ExtlockdServer *s = c->server;
    ExtlockdSession *S;
    int64_t now = g_get_monotonic_time();
    g_autofree char *why = NULL;
    uint32_t lease_ms;

    if (c->session) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_STATE,
                   "this connection already has session %s",
                   c->session->id);
        return;
    }
    if (m->version != EXTLOCK_PROTOCOL_VERSION) {
        log_refusal(s, "%s: hello with protocol version %u refused (this "
                    "server speaks version %d)", c->peer, m->version,
                    EXTLOCK_PROTOCOL_VERSION);
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_VERSION,
                   "protocol version %u is not supported: this server "
                   "speaks version %d only (version 2 sessions are resumed "
                   "with the resume-secret of their welcome); upgrade the "
                   "client", m->version, EXTLOCK_PROTOCOL_VERSION);
        return;
    }
    if (!m->client_id || !m->lock_space) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_INVALID,
                   "hello needs \"client-id\" and \"lock-space\"");
        return;
    }
    if (s->ha && !s->leading) {
        send_not_leader(c, m);
        return;
    }
    lease_ms = m->lease_ms ? m->lease_ms : s->cfg.lease_ms;
    if (lease_ms < EXTLOCK_MIN_LEASE_MS || lease_ms > EXTLOCK_MAX_LEASE_MS) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_INVALID,
                   "lease-ms %u is outside [%d, %d]", lease_ms,
                   EXTLOCK_MIN_LEASE_MS, EXTLOCK_MAX_LEASE_MS);
        return;
    }
    if (!extlockd_policy_allows(s->policy, c->identity, m->lock_space,
                                m->client_id, &why)) {
        log_refusal(s, "%s: hello refused: %s", c->peer, why);
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_DENIED, "%s", why);
        return;
    }
    if (m->session) {
        S = g_hash_table_lookup(s->sessions, m->session);
        if (S && (!S->owner || strcmp(S->owner, c->identity) != 0 ||
                  !session_secret_ok(S, m->resume_secret))) {
            /* Nothing changes for the owner: no take-over, no reclaim */
            log_refusal(s, "%s: identity %s may not resume session %s "
                        "(%s): %s", c->peer, c->identity, S->id,
                        S->client_id,
                        !S->owner ? "it has no recorded owner" :
                        strcmp(S->owner, c->identity) != 0 ?
                        "it belongs to another identity" :
                        "wrong or missing resume-secret");
            send_error(c, m->has_id, m->id, EXTLOCK_ERR_DENIED,
                       "session %s cannot be resumed by this identity (%s) "
                       "with %s resume-secret", m->session, c->identity,
                       m->resume_secret ? "this" : "no");
            return;
        }
        if (S && (strcmp(S->client_id, m->client_id) != 0 ||
                  strcmp(S->space->name, m->lock_space) != 0)) {
            send_error(c, m->has_id, m->id, EXTLOCK_ERR_NOT_FOUND,
                       "session %s does not belong to client-id %s in "
                       "lock-space %s", m->session, m->client_id,
                       m->lock_space);
            return;
        }
        if (S && (S->reclaiming ||
                  (S->state != SESSION_EXPIRED && now < S->deadline_us)) &&
            lease_ms > S->lease_ms) {
            /*
             * A longer lease must be in the state file before it is in
             * force: a restarted coordinator's grace period covers it
             */
            g_autoptr(GError) err = NULL;
            uint32_t old = S->lease_ms;

            S->lease_ms = lease_ms;
            if (!save_state(s, s->epoch, &err)) {
                S->lease_ms = old;
                g_warning("cannot record the longer lease of session %s in "
                          "the state file: %s", S->id, err->message);
                send_error(c, m->has_id, m->id, EXTLOCK_ERR_INTERNAL,
                           "cannot record the lease in the state file");
                return;
            }
        }
        if (S && S->reclaiming) {
            handle_reclaim_hello(c, m, S, lease_ms, now);
            return;
        }
        if (S && S->state != SESSION_EXPIRED && now < S->deadline_us) {
            handle_resume(c, m, S, lease_ms, now);
            return;
        }
        /* Unknown or expired: its locks are gone, start afresh */
    }
    if (g_hash_table_size(s->sessions) >= s->cfg.max_sessions) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_LIMIT,
                   "too many sessions (limit %u)", s->cfg.max_sessions);
        return;
    }
    if (identity_sessions(s, c->identity) >=
        s->cfg.max_sessions_per_identity) {
        log_refusal(s, "%s: hello refused: identity %s has %u sessions "
                    "(--max-sessions-per-identity)", c->peer, c->identity,
                    identity_sessions(s, c->identity));
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_LIMIT,
                   "too many sessions of identity %s (limit %u per "
                   "identity, --max-sessions-per-identity): end some with "
                   "bye, or let them expire", c->identity,
                   s->cfg.max_sessions_per_identity);
        return;
    }
    S = session_alloc(s, NULL, m->client_id, m->lock_space, lease_ms, now);
    S->owner = g_strdup(c->identity);
    identity_session_add(S);
    if (!session_new_secret(S)) {
        session_destroy_nosave(S);
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_INTERNAL,
                   "cannot generate a resume secret");
        return;
    }
    session_attach(S, c, lease_ms, now);
    /* The session is durable before the client learns about it */
    defer_welcome(c, m, S, NULL);
    if (m->session) {
        g_message("session %s (%s, lock-space %s) started on %s, lease %u "
                  "ms, replacing session %s, which is unknown or expired",
                  S->id, S->client_id, S->space->name, c->peer, lease_ms,
                  m->session);
    } else {
        g_message("session %s (%s, lock-space %s) started on %s by %s, "
                  "lease %u ms", S->id, S->client_id, S->space->name,
                  c->peer, c->identity, lease_ms);
    }
}

static void handle_lock(ExtlockdConn *c, ExtlockdSession *S, ExtlockMsg *m)
{
    ExtlockdServer *s = c->server;
    ExtlockdSpace *space = S->space;
    ExtlockLock req;
    ExtlockLock *lock;
    uint64_t token;
    unsigned count;

    if (!extlock_extent_valid(m->offset, m->length)) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_RANGE,
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
            send_error(c, m->has_id, m->id, EXTLOCK_ERR_RANGE,
                       "limit [%" PRIu64 ", +%" PRIu64 ") does not contain "
                       "the requested extent", m->limit_offset,
                       m->limit_length);
            return;
        }
        req.limit.start = m->limit_offset;
        req.limit.end = m->limit_offset + m->limit_length;
    }
    count = g_hash_table_size(S->held) + g_hash_table_size(S->waiting);
    if (count >= s->cfg.max_locks_per_session) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_LIMIT,
                   "session has %u locks and waiting requests (limit %u)",
                   count, s->cfg.max_locks_per_session);
        return;
    }
    if (session_find_waiting(S, m->id)) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_INVALID,
                   "request %" PRIu64 " is already waiting", m->id);
        return;
    }
    if (G_UNLIKELY(space->in_grace) && !m->wait) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_GRACE,
                   "lock-space %s is in its restart grace period for "
                   "another %" PRId64 " ms", space->name,
                   grace_remaining_ms(space, g_get_monotonic_time()));
        return;
    }
    if (!next_token(s, &token)) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_INTERNAL,
                   "cannot persist a new token epoch");
        return;
    }
    req.mode = m->mode;
    req.token = token;
    req.user_tag = m->id;

    if (m->wait) {
        if (m->has_limit) {
            /* It caches locks: it wants to know when to give them back */
            session_set_revocable(S);
        }
        if (G_UNLIKELY(space->in_grace)) {
            space_defer(space, S, c, &req);
        } else {
            space_submit(space, S, c, &req, true);
        }
        return;
    }
    /*
     * A request is granted at once exactly when nothing held or waiting
     * conflicts with it, which is what reclaim checks; on a conflict it
     * changes nothing.  Such a lock does not grow.
     */
    lock = extlock_table_reclaim(space->table, req.requested, m->mode, token,
                                 S, m->id);
    if (!lock) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_WOULD_BLOCK,
                   "[%" PRIu64 ", +%" PRIu64 ") %s conflicts with "
                   "a held or waiting lock", m->offset, m->length,
                   extlock_mode_name(m->mode));
        return;
    }
    space->nowait_grants++;
    if (m->has_limit) {
        session_set_revocable(S);
    }
    g_hash_table_add(S->held, lock);
    log_lock(s, "grant", lock, NULL);
    format_granted(c, lock);
}

static void handle_unlock(ExtlockdConn *c, ExtlockdSession *S,
                          ExtlockMsg *m)
{
    ExtlockdServer *s = c->server;
    ExtlockTable *table = S->space->table;
    ExtlockLock *lock = extlock_table_lookup(table, m->lock);
    ExtlockLock *split = NULL;
    ExtlockMsg r;

    if (!lock || lock->owner != S || lock->state != EXTLOCK_LOCK_GRANTED) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_NOT_FOUND,
                   "lock %" PRIu64 " is not held by this session",
                   m->lock);
        return;
    }
    g_array_set_size(s->pieces, 0);
    if (m->has_extent) {
        ExtlockExtent ext = lock->node.ext;
        ExtlockExtent part;

        if (!extlock_extent_valid(m->offset, m->length)) {
            send_error(c, m->has_id, m->id, EXTLOCK_ERR_RANGE,
                       "invalid extent offset %" PRIu64 " length %" PRIu64,
                       m->offset, m->length);
            return;
        }
        part.start = m->offset;
        part.end = m->offset + m->length;
        if (part.start < ext.start || part.end > ext.end) {
            send_error(c, m->has_id, m->id, EXTLOCK_ERR_RANGE,
                       "[%" PRIu64 ", %" PRIu64 ") is not inside lock %"
                       PRIu64 " [%" PRIu64 ", %" PRIu64 ")", part.start,
                       part.end, lock->id, ext.start, ext.end);
            return;
        }
        if (part.start != ext.start || part.end != ext.end) {
            ExtlockLock *rest = NULL;
            int ret;

            /* Logged first: the release may grant the part to others */
            log_lock(s, "release", lock, &part);
            ret = extlock_table_release_part(table, lock, part, &rest,
                                             &split);
            if (ret < 0) {
                send_error(c, m->has_id, m->id, EXTLOCK_ERR_INTERNAL,
                           "partial release failed: %s", g_strerror(-ret));
                return;
            }
            if (rest) {
                ExtlockPiece p = {
                    .lock = rest->id,
                    .offset = rest->node.ext.start,
                    .length = rest->node.ext.end - rest->node.ext.start,
                };
                g_array_append_val(s->pieces, p);
            }
            if (split) {
                ExtlockPiece p = {
                    .lock = split->id,
                    .offset = split->node.ext.start,
                    .length = split->node.ext.end - split->node.ext.start,
                };
                g_hash_table_add(S->held, split);
                g_array_append_val(s->pieces, p);
            }
            goto reply;
        }
    }
    g_hash_table_remove(S->held, lock);
    log_lock(s, "release", lock, NULL);
    extlock_table_release(table, lock);

reply:
    extlock_msg_init(&r, EXTLOCK_MSG_UNLOCKED);
    r.has_id = m->has_id;
    r.id = m->id;
    r.lock = m->lock;
    r.pieces = s->pieces;
    send_msg(c, &r);
    if (split) {
        /* A new lock id, which the client knows only from the reply */
        revoke_new_lock(table, split);
    }
}

static void handle_cancel(ExtlockdConn *c, ExtlockdSession *S,
                          ExtlockMsg *m)
{
    ExtlockLock *lock = session_find_waiting(S, m->request);
    ExtlockMsg r;

    if (!lock) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_NOT_FOUND,
                   "request %" PRIu64 " is not waiting", m->request);
        return;
    }
    g_hash_table_remove(S->waiting, lock);
    waiter_cancel(S->space, lock);

    extlock_msg_init(&r, EXTLOCK_MSG_CANCELLED);
    r.has_id = m->has_id;
    r.id = m->id;
    r.request = m->request;
    send_msg(c, &r);
    extlock_format_error(conn_out(c), true, m->request,
                         EXTLOCK_ERR_CANCELLED,
                         "lock request cancelled by request %" PRIu64,
                         m->id);
}

static void handle_renew(ExtlockdConn *c, ExtlockdSession *S,
                         ExtlockMsg *m)
{
    ExtlockMsg r;

    S->deadline_us = g_get_monotonic_time() + (int64_t)S->lease_ms * 1000;
    extlock_msg_init(&r, EXTLOCK_MSG_RENEWED);
    r.has_id = m->has_id;
    r.id = m->id;
    r.lease_ms = S->lease_ms;
    send_msg(c, &r);
}

static void handle_downgrade(ExtlockdConn *c, ExtlockdSession *S,
                             ExtlockMsg *m)
{
    ExtlockTable *table = S->space->table;
    ExtlockLock *lock = extlock_table_lookup(table, m->lock);
    ExtlockMsg r;

    if (!lock || lock->owner != S || lock->state != EXTLOCK_LOCK_GRANTED) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_NOT_FOUND,
                   "lock %" PRIu64 " is not held by this session",
                   m->lock);
        return;
    }
    session_set_revocable(S);
    if (lock->mode == EXTLOCK_MODE_EXCLUSIVE) {
        ExtlockLock shared = *lock;

        shared.mode = EXTLOCK_MODE_SHARED;
        log_lock(c->server, "downgrade", &shared, NULL);
    }
    /* Shared waiters it unblocks are granted (space_grant_cb) */
    extlock_table_downgrade(table, lock);
    extlock_msg_init(&r, EXTLOCK_MSG_DOWNGRADED);
    r.has_id = m->has_id;
    r.id = m->id;
    r.lock = lock->id;
    r.mode = lock->mode;
    send_msg(c, &r);
}

static void reclaim_conflict_cb(ExtlockLock *lock, void *opaque)
{
    g_ptr_array_add(opaque, lock);
}

static bool extent_disputed(ExtlockdSpace *space, ExtlockExtent ext)
{
    for (guint i = 0; space->disputed && i < space->disputed->len; i++) {
        ExtlockExtent *d = &g_array_index(space->disputed, ExtlockExtent, i);

        if (d->start < ext.end && ext.start < d->end) {
            return true;
        }
    }
    return false;
}

static void space_add_dispute(ExtlockdSpace *space, ExtlockExtent ext,
                              ExtlockdSession *S, int64_t now)
{
    int64_t until = now + ((int64_t)S->lease_ms + S->fence_margin_ms) * 1000;

    if (!space->disputed) {
        space->disputed = g_array_new(FALSE, FALSE, sizeof(ExtlockExtent));
    }
    g_array_append_val(space->disputed, ext);
    space->dispute_until_us = MAX(space->dispute_until_us, until);
}

/*
 * Session @S reclaims @ext in @mode, which conflicts with locks that
 * other sessions reclaimed before (@others).  The coordinator cannot tell
 * which claim is true (locks are not persisted), so nobody gets the
 * extent: the earlier reclaims are dropped and their sessions told, the
 * extent is disputed (no more reclaims of it) and nothing in the
 * lock-space is granted before every claimant has had its lease and fence
 * margin to stop writing (the grace period is extended).
 */
static void reclaim_dispute(ExtlockdSession *S, ExtlockExtent ext,
                            ExtlockMode mode, GPtrArray *others)
{
    ExtlockdServer *s = S->server;
    ExtlockdSpace *space = S->space;
    int64_t now = g_get_monotonic_time();

    space_add_dispute(space, ext, S, now);
    for (guint i = 0; i < others->len; i++) {
        ExtlockLock *lock = others->pdata[i];
        ExtlockdSession *S2 = lock->owner;
        ExtlockExtent e = lock->node.ext;

        g_warning("RECLAIM CONFLICT in lock-space %s: session %s (%s, "
                  "identity %s) reclaims [%" PRIu64 ", +%" PRIu64 ") %s, "
                  "which session %s (%s, identity %s) reclaimed as lock %"
                  PRIu64 " [%" PRIu64 ", +%" PRIu64 ") %s: at most one "
                  "of them held it before the restart; neither keeps it, "
                  "and nothing is granted in the lock-space for the next "
                  "%" PRId64 " ms", space->name, S->id, S->client_id,
                  S->owner ? S->owner : "(unknown)", ext.start,
                  ext.end - ext.start, extlock_mode_name(mode), S2->id,
                  S2->client_id, S2->owner ? S2->owner : "(unknown)",
                  lock->id, e.start, e.end - e.start,
                  extlock_mode_name(lock->mode),
                  (MAX(space->dispute_until_us,
                       now + ((int64_t)S2->lease_ms + S2->fence_margin_ms) *
                       1000) - now) / 1000);
        space_add_dispute(space, e, S2, now);
        if (S2->conn) {
            ExtlockMsg n;

            /* A notification naming the lock, so the client drops it */
            extlock_msg_init(&n, EXTLOCK_MSG_ERROR);
            n.error = EXTLOCK_ERR_RECLAIM_CONFLICT;
            n.lock = lock->id;
            n.message = g_strdup_printf("lock %" PRIu64 " [%" PRIu64 ", +%"
                                        PRIu64 ") that you reclaimed is "
                                        "dropped: session %s (%s) reclaimed "
                                        "a conflicting lock", lock->id,
                                        e.start, e.end - e.start, S->id,
                                        S->client_id);
            s->nerrors++;
            extlock_msg_format(&n, conn_out(S2->conn));
            extlock_msg_clear(&n);
        }
        g_hash_table_remove(S2->held, lock);
        log_lock(s, "release", lock, NULL);
        extlock_table_release(space->table, lock);
    }
}

/* Re-assert a lock held before the restart, with its original token */
static void handle_reclaim(ExtlockdConn *c, ExtlockdSession *S,
                           ExtlockMsg *m)
{
    ExtlockdServer *s = c->server;
    ExtlockdSpace *space = S->space;
    uint64_t epoch = m->token >> EXTLOCKD_COUNTER_BITS;
    ExtlockExtent ext;
    ExtlockLock *lock;
    unsigned count;

    if (!S->reclaiming) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_STATE,
                   "session %s cannot reclaim locks: %s", S->id,
                   space->in_grace ? "it is not listed in the state file "
                   "or has sent reclaim-done"
                   : "its lock-space has no restart grace period");
        return;
    }
    if (!extlock_extent_valid(m->offset, m->length)) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_RANGE,
                   "invalid extent offset %" PRIu64 " length %" PRIu64,
                   m->offset, m->length);
        return;
    }
    if (epoch == 0 || epoch >= s->boot_epoch ||
        (m->token & (EXTLOCKD_COUNTER_LIMIT - 1)) == 0) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_INVALID,
                   "token %" PRIu64 " (epoch %" PRIu64 ") was not handed "
                   "out before this coordinator started in epoch %" PRIu64,
                   m->token, epoch, s->boot_epoch);
        return;
    }
    count = g_hash_table_size(S->held) + g_hash_table_size(S->waiting);
    if (count >= s->cfg.max_locks_per_session) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_LIMIT,
                   "session has %u locks and waiting requests (limit %u)",
                   count, s->cfg.max_locks_per_session);
        return;
    }
    ext.start = m->offset;
    ext.end = m->offset + m->length;
    if (extent_disputed(space, ext)) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_RECLAIM_CONFLICT,
                   "[%" PRIu64 ", +%" PRIu64 ") is disputed: two sessions "
                   "reclaimed it in conflict; request it anew after the "
                   "grace period", m->offset, m->length);
        return;
    }
    lock = extlock_table_reclaim(space->table, ext, m->mode, m->token, S,
                                 m->id);
    if (!lock) {
        g_autoptr(GPtrArray) others = g_ptr_array_new();
        g_autoptr(GPtrArray) all = g_ptr_array_new();
        ExtlockLock probe = { .mode = m->mode, .token = m->token };

        probe.node.ext = ext;
        extlock_table_foreach_conflict(space->table, &probe,
                                       reclaim_conflict_cb, all);
        for (guint i = 0; i < all->len; i++) {
            if (((ExtlockLock *)all->pdata[i])->owner != S) {
                g_ptr_array_add(others, all->pdata[i]);
            }
        }
        if (others->len) {
            reclaim_dispute(S, ext, m->mode, others);
            send_error(c, m->has_id, m->id, EXTLOCK_ERR_RECLAIM_CONFLICT,
                       "[%" PRIu64 ", +%" PRIu64 ") %s conflicts with a "
                       "lock reclaimed by another session: the extent is "
                       "disputed, neither session keeps it; request it "
                       "anew after the grace period", m->offset,
                       m->length, extlock_mode_name(m->mode));
            return;
        }
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_STATE,
                   "[%" PRIu64 ", +%" PRIu64 ") %s conflicts with a lock "
                   "this session reclaimed", m->offset, m->length,
                   extlock_mode_name(m->mode));
        return;
    }
    session_set_revocable(S);
    space->reclaims++;
    g_hash_table_add(S->held, lock);
    log_lock(s, "reclaim", lock, NULL);
    format_granted(c, lock);
}

static void handle_reclaim_done(ExtlockdConn *c, ExtlockdSession *S,
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
    send_msg(c, &r);
    if (S->reclaiming) {
        g_message("session %s (%s, lock-space %s) reclaimed %u locks",
                  S->id, S->client_id, S->space->name,
                  g_hash_table_size(S->held));
        session_end_reclaim(S);
    }
    if (S->resend_revokes) {
        S->resend_revokes = false;
        session_resend_revokes(S);
    }
}

static void handle_bye(ExtlockdConn *c, ExtlockMsg *m)
{
    ExtlockdSession *S = c->session;
    ExtlockMsg r;

    if (S) {
        unsigned n = session_release(S, true);

        g_message("session %s (%s, lock-space %s) said bye, released %u "
                  "locks", S->id, S->client_id, S->space->name, n);
        session_destroy(S);
    }
    extlock_msg_init(&r, EXTLOCK_MSG_GOODBYE);
    r.has_id = m->has_id;
    r.id = m->id;
    send_msg(c, &r);
    conn_close_after_flush(c);
}

/*
 * Admin: release the locks of an expired session now, without waiting
 * for its fence agent (dangerous: see docs/extlockd.rst)
 */
static void handle_release_session(ExtlockdConn *c, ExtlockMsg *m)
{
    ExtlockdServer *s = c->server;
    ExtlockdSession *S = g_hash_table_lookup(s->sessions, m->session);
    g_autofree char *fence = NULL;
    ExtlockMsg r;
    unsigned n;

    /*
     * It gives up the fencing guarantee for somebody else's locks: only
     * admins may, and the refusal changes nothing (the session is not
     * even looked up, so its existence is not revealed either)
     */
    if (!c->identity || !extlockd_policy_is_admin(s->policy, c->identity)) {
        log_refusal(s, "%s: release-session of %s refused: identity %s "
                    "is not an admin", c->peer, m->session,
                    c->identity ? c->identity : "(none)");
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_DENIED,
                   "release-session needs an admin identity (this "
                   "connection is %s)",
                   c->identity ? c->identity : "unidentified");
        return;
    }
    if (!S) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_NOT_FOUND,
                   "no session %s", m->session);
        return;
    }
    if (S->state != SESSION_EXPIRED) {
        send_error(c, m->has_id, m->id, EXTLOCK_ERR_STATE,
                   "session %s (%s) is %s, not expired: its lease still "
                   "runs", S->id, S->client_id,
                   session_state_names[S->state]);
        return;
    }
    if (S->fence) {
        fence = g_strdup_printf("fence agent: %s after %u attempt(s)%s%s",
                                extlockd_fence_state(S->fence) ==
                                EXTLOCKD_FENCE_OK ? "succeeded" :
                                extlockd_fence_state(S->fence) ==
                                EXTLOCKD_FENCE_FAILED ? "failed" : "running",
                                extlockd_fence_attempts(S->fence),
                                extlockd_fence_message(S->fence) ? ": " : "",
                                extlockd_fence_message(S->fence) ?: "");
    }
    g_warning("session %s (%s, lock-space %s) FORCE-RELEASED by an "
              "administrator on %s (reason: %s; %s): %u locks released "
              "without waiting for fencing", S->id, S->client_id,
              S->space->name, c->peer, m->message ? m->message : "none given",
              fence ? fence : "no fence agent", g_hash_table_size(S->held));
    extlockd_fence_cancel(S->fence);
    S->fence = NULL;
    n = session_release(S, true);
    if (S->grace_fenced) {
        ExtlockdSpace *space = S->space;

        g_queue_unlink(&space->grace_fenced, &S->reclaim_link);
        S->grace_fenced = false;
        if (!S->fence_ok) {
            space->grace_fence_pending--;
        }
        space->nsessions++;     /* keep @space until its grace ends */
        session_destroy(S);
        if (space->in_grace && space->grace_fence_pending == 0) {
            space_end_grace(space, true);
        }
        space_unref(space);
    } else {
        session_destroy(S);
    }

    extlock_msg_init(&r, EXTLOCK_MSG_SESSION_RELEASED);
    r.has_id = m->has_id;
    r.id = m->id;
    r.session = m->session;
    r.released = n;
    send_msg(c, &r);
}

static void handle_line(ExtlockdConn *c, const char *line, size_t len)
{
    ExtlockdServer *s = c->server;
    ExtlockdSession *S = c->session;
    ExtlockProtoError err;
    ExtlockMsg m;

    extlock_msg_init(&m, EXTLOCK_MSG_INVALID);
    if (!extlock_msg_parse(line, len, &m, &err)) {
        send_error(c, m.has_id, m.id, err.code, "%s", err.message);
        return;
    }
    VERBOSE(s, "%s: %s request %" PRIu64, c->peer,
            extlock_msg_type_name(m.type), m.id);

    switch (m.type) {
    case EXTLOCK_MSG_HELLO:
        handle_hello(c, &m);
        break;
    case EXTLOCK_MSG_STATUS:
        handle_status(c, &m);
        break;
    case EXTLOCK_MSG_BYE:
        handle_bye(c, &m);
        break;
    case EXTLOCK_MSG_RELEASE_SESSION:
        handle_release_session(c, &m);
        break;
    case EXTLOCK_MSG_LOCK:
    case EXTLOCK_MSG_UNLOCK:
    case EXTLOCK_MSG_CANCEL:
    case EXTLOCK_MSG_RENEW:
    case EXTLOCK_MSG_DOWNGRADE:
    case EXTLOCK_MSG_RECLAIM:
    case EXTLOCK_MSG_RECLAIM_DONE:
        if (!S) {
            send_error(c, m.has_id, m.id, EXTLOCK_ERR_STATE,
                       "%s before hello", extlock_msg_type_name(m.type));
        } else if (m.type == EXTLOCK_MSG_LOCK) {
            handle_lock(c, S, &m);
        } else if (m.type == EXTLOCK_MSG_UNLOCK) {
            handle_unlock(c, S, &m);
        } else if (m.type == EXTLOCK_MSG_CANCEL) {
            handle_cancel(c, S, &m);
        } else if (m.type == EXTLOCK_MSG_RENEW) {
            handle_renew(c, S, &m);
        } else if (m.type == EXTLOCK_MSG_DOWNGRADE) {
            handle_downgrade(c, S, &m);
        } else if (m.type == EXTLOCK_MSG_RECLAIM) {
            handle_reclaim(c, S, &m);
        } else {
            handle_reclaim_done(c, S, &m);
        }
        break;
    default:
        send_error(c, m.has_id, m.id, EXTLOCK_ERR_UNKNOWN_TYPE,
                   "\"%s\" is not a request", extlock_msg_type_name(m.type));
        break;
    }
    extlock_msg_clear(&m);
}

/* ------------------------------------------------------------------ */
/* Connections                                                         */

static void conn_close_after_flush(ExtlockdConn *c)
{
    if (c->closing) {
        return;
    }
    c->closing = true;
    c->closing_since_us = g_get_monotonic_time();
    conn_out(c);        /* the flush closes it once the output is out */
    server_schedule(c->server, c->closing_since_us + CLOSE_TIMEOUT_US);
}

static void conn_process_lines(ExtlockdConn *c)
{
    ExtlockdServer *s = c->server;
    const char *line;
    size_t len;

    while (!c->closing && !c->awaiting_state) {
        ExtlockLineResult r = extlock_linebuf_next(&c->lb, &line, &len);

        if (r == EXTLOCK_LINE_NONE) {
            break;
        }
        s->nmessages++;
        if (r == EXTLOCK_LINE_TOO_LONG) {
            send_error(c, false, 0, EXTLOCK_ERR_LINE_TOO_LONG,
                       "message longer than %d bytes dropped",
                       EXTLOCK_MAX_LINE);
            continue;
        }
        handle_line(c, line, len);
    }
}

/* Returns false if the connection was destroyed */
static bool conn_read(ExtlockdConn *c)
{
    ExtlockdServer *s = c->server;
    ExtlockdSession *S = c->session;

    if (S && g_get_monotonic_time() >= S->deadline_us) {
        /* Too late: nothing it sends now may extend the lease */
        session_expire(S);
        return true;
    }
    for (int round = 0; round < READ_ROUNDS && !c->closing; round++) {
        ssize_t n = conn_sys_recv(c, s->rbuf, READ_CHUNK);

        if (n > 0) {
            extlock_linebuf_append(&c->lb, s->rbuf, n);
            conn_process_lines(c);
            if (n < READ_CHUNK &&
                !(c->tls && extlockd_tls_pending(c->tls))) {
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
        VERBOSE(s, "%s: %s", c->peer,
                n == 0 ? "end of input" :
                c->tls ? extlockd_tls_error(c->tls) : g_strerror(errno));
        /* Try to deliver what is pending (e.g. replies before EOF) */
        if (c->dirty) {
            g_queue_unlink(&s->dirty, &c->dirty_link);
            c->dirty = false;
            if (!conn_flush(c)) {
                return false;
            }
        }
        conn_destroy(c);
        return false;
    }
    /* conn_flush() stops reading while much output is pending */
    conn_kick_tls(c);
    return true;
}

/* Returns false if the connection was destroyed or is still shaking hands */
static bool conn_tls_handshake(ExtlockdConn *c)
{
    ExtlockdServer *s = c->server;
    g_autoptr(GError) err = NULL;
    int r = extlockd_tls_handshake(c->tls, &err);

    if (r < 0) {
        log_refusal(s, "%s: connection refused: %s", c->peer,
                    err->message);
        conn_destroy(c);
        return false;
    }
    if (r == 0) {
        conn_set_events(c, extlockd_tls_events(c->tls));
        return false;
    }
    c->handshaking = false;
    c->identity = g_strdup(extlockd_tls_identity(c->tls));
    g_message("%s: TLS identity %s", c->peer, c->identity);
    if (extlockd_policy_is_admin(s->policy, c->identity)) {
        conn_unauth_done(c);
    }
    conn_set_events(c, G_IO_IN);
    return true;
}

static gboolean conn_dispatch(GSource *source, GSourceFunc cb,
                              gpointer data)
{
    ConnSource *cs = (ConnSource *)source;
    ExtlockdConn *c = cs->conn;
    ExtlockdServer *s = c->server;
    GIOCondition rev = g_source_query_unix_fd(source, c->tag);

    g_source_set_ready_time(source, -1);
    if (c->handshaking) {
        if (!conn_tls_handshake(c)) {
            flush_all(s);
            return G_SOURCE_CONTINUE;
        }
        rev |= G_IO_IN;         /* application data may be buffered */
    } else if (c->tls && extlockd_tls_pending(c->tls)) {
        rev |= G_IO_IN;
    }
    if (rev & G_IO_OUT) {
        conn_out(c);
    }
    if ((rev & (G_IO_IN | G_IO_HUP | G_IO_ERR)) && (c->events & G_IO_IN)) {
        conn_read(c);
    } else if ((rev & (G_IO_HUP | G_IO_ERR)) && !(rev & G_IO_OUT)) {
        conn_destroy(c);
    }
    flush_all(s);
    return G_SOURCE_CONTINUE;
}

static GSourceFuncs conn_source_funcs = {
    .dispatch = conn_dispatch,
};

/*
 * Connections without hello: in server->unauth (accept order, hence
 * deadline order) and counted per peer, until they say hello or close
 */
static void conn_unauth_done(ExtlockdConn *c)
{
    ExtlockdServer *s = c->server;
    guint n;

    if (!c->unauth) {
        return;
    }
    c->unauth = false;
    g_queue_unlink(&s->unauth, &c->unauth_link);
    n = GPOINTER_TO_UINT(g_hash_table_lookup(s->unauth_per_peer,
                                             c->peer_key));
    if (n <= 1) {
        g_hash_table_remove(s->unauth_per_peer, c->peer_key);
    } else {
        g_hash_table_insert(s->unauth_per_peer, g_strdup(c->peer_key),
                            GUINT_TO_POINTER(n - 1));
    }
}

/* May one more connection without hello come from @key? */
static bool conn_admit(ExtlockdServer *s, const char *key, const char *peer)
{
    guint n = GPOINTER_TO_UINT(g_hash_table_lookup(s->unauth_per_peer, key));
    int64_t now;

    if (s->unauth.length < s->cfg.max_unauth &&
        n < s->cfg.max_unauth_per_peer) {
        return true;
    }
    s->refused++;
    now = g_get_monotonic_time();
    /* One line per second at most: the refusals are a flood themselves */
    if (now - s->refused_logged_us >= G_USEC_PER_SEC) {
        g_warning("refusing connection from %s: %u connections without "
                  "hello from it, %u in total (limits %u per peer, %u in "
                  "total; --max-unauth-per-peer, --max-unauth); %" PRIu64
                  " refused since the last report", peer, n,
                  s->unauth.length, s->cfg.max_unauth_per_peer,
                  s->cfg.max_unauth, s->refused - s->refused_logged);
        s->refused_logged_us = now;
        s->refused_logged = s->refused;
    }
    return false;
}

static void conn_new(ExtlockdServer *s, int fd, const char *peer,
                     const char *key, const char *identity, bool tls)
{
    ExtlockdConn *c = g_new0(ExtlockdConn, 1);
    g_autoptr(GError) err = NULL;
    ConnSource *cs;

    if (tls) {
        c->tls = extlockd_tls_new(s->tls, fd, &err);
        if (!c->tls) {
            g_warning("%s: %s", peer, err->message);
            close(fd);
            g_free(c);
            return;
        }
        c->handshaking = true;
    }
    c->identity = g_strdup(identity);
    c->peer_key = g_strdup(key);
    c->accepted_us = g_get_monotonic_time();
    c->status_tokens = s->cfg.status_rate;
    c->status_refill_us = c->accepted_us +
                          G_USEC_PER_SEC / s->cfg.status_rate;
    c->server = s;
    /*
     * Admin identities on the UNIX socket (extlockctl) are authenticated
     * by the kernel and need no hello; all others are limited until hello
     */
    if (!identity || !extlockd_policy_is_admin(s->policy, identity)) {
        c->unauth = true;
        c->unauth_link.data = c;
        g_queue_push_tail_link(&s->unauth, &c->unauth_link);
        g_hash_table_insert(s->unauth_per_peer, g_strdup(key),
                            GUINT_TO_POINTER(GPOINTER_TO_UINT(
                                g_hash_table_lookup(s->unauth_per_peer,
                                                    key)) + 1));
        server_schedule(s, c->accepted_us +
                        s->cfg.hello_timeout_ms * 1000LL);
    }
    c->serial = ++s->next_serial;
    c->peer = g_strdup_printf("#%" PRIu64 " (%s)", c->serial, peer);
    c->fd = fd;
    c->out = g_string_sized_new(4096);
    extlock_linebuf_init(&c->lb);
    c->link.data = c;
    c->dirty_link.data = c;
    g_queue_push_tail_link(&s->conns, &c->link);

    c->source = g_source_new(&conn_source_funcs, sizeof(ConnSource));
    cs = (ConnSource *)c->source;
    cs->conn = c;
    c->events = G_IO_IN;
    c->tag = g_source_add_unix_fd(c->source, fd, c->events);
    g_source_attach(c->source, NULL);
    VERBOSE(s, "connection %s accepted", c->peer);
}

static void conn_destroy(ExtlockdConn *c)
{
    ExtlockdServer *s = c->server;

    VERBOSE(s, "connection %s closed", c->peer);
    conn_unauth_done(c);
    if (c->session) {
        if (s->shutting_down) {
            c->session->conn = NULL;
            c->session = NULL;
        } else {
            session_detach(c->session);
        }
    }
    if (c->dirty) {
        g_queue_unlink(&s->dirty, &c->dirty_link);
        c->dirty = false;
    }
    g_queue_unlink(&s->conns, &c->link);
    g_source_destroy(c->source);
    g_source_unref(c->source);
    extlockd_tls_free(c->tls);
    close(c->fd);
    extlock_linebuf_destroy(&c->lb);
    g_string_free(c->out, TRUE);
    g_free(c->identity);
    g_free(c->peer_key);
    g_free(c->peer);
    g_free(c);
}

/* ------------------------------------------------------------------ */
/* Listeners                                                           */

static gboolean listener_accept(int fd, GIOCondition cond, gpointer opaque);

static gboolean listener_resume(gpointer opaque)
{
    ExtlockdListener *l = opaque;

    l->resume_timer = 0;
    l->watch = g_unix_fd_add(l->fd, G_IO_IN, listener_accept, l);
    return G_SOURCE_REMOVE;
}

static void describe_peer(ExtlockdListener *l, struct sockaddr *sa,
                          socklen_t len, char *buf, size_t size)
{
    char host[NI_MAXHOST], serv[NI_MAXSERV];

    if (!l->is_tcp ||
        getnameinfo(sa, len, host, sizeof(host), serv, sizeof(serv),
                    NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
        g_strlcpy(buf, l->address, size);
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
static bool conn_identify(ExtlockdListener *l, int fd, struct sockaddr *sa,
                          socklen_t len, char *peer, size_t peer_size,
                          char *key, size_t key_size, char *identity,
                          size_t identity_size)
{
    identity[0] = '\0';
    if (!l->is_tcp) {
        struct ucred cred;
        socklen_t clen = sizeof(cred);
        size_t used = strlen(peer);

        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) < 0) {
            g_warning("%s: cannot get the peer's credentials: %s; closing",
                      l->address, g_strerror(errno));
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
    if (!l->tls) {
        g_strlcpy(identity, EXTLOCKD_IDENTITY_ANONYMOUS, identity_size);
    }
    return true;
}

static gboolean listener_accept(int fd, GIOCondition cond, gpointer opaque)
{
    ExtlockdListener *l = opaque;
    ExtlockdServer *s = l->server;

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
                      l->address, g_strerror(errno), LISTEN_PAUSE_MS);
            l->watch = 0;
            l->resume_timer = g_timeout_add(LISTEN_PAUSE_MS,
                                            listener_resume, l);
            return G_SOURCE_REMOVE;
        }
        if (l->is_tcp) {
            int one = 1;
            setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        }
        describe_peer(l, (struct sockaddr *)&ss, len, peer, sizeof(peer));
        if (!conn_identify(l, cfd, (struct sockaddr *)&ss, len, peer,
                           sizeof(peer), key, sizeof(key), identity,
                           sizeof(identity))) {
            close(cfd);
            continue;
        }
        if (!(identity[0] && extlockd_policy_is_admin(s->policy, identity)) &&
            !conn_admit(s, key, peer)) {
            if (!l->tls) {
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
        conn_new(s, cfd, peer, key, identity[0] ? identity : NULL, l->tls);
    }
    return G_SOURCE_CONTINUE;
}

static void listener_close(ExtlockdListener *l)
{
    if (l->watch) {
        g_source_remove(l->watch);
        l->watch = 0;
    }
    if (l->resume_timer) {
        g_source_remove(l->resume_timer);
        l->resume_timer = 0;
    }
    if (l->fd >= 0) {
        close(l->fd);
        l->fd = -1;
    }
    if (l->unix_path) {
        struct stat st;

        /* Only remove the socket if it is still the one we created */
        if (lstat(l->unix_path, &st) == 0 && st.st_dev == l->dev &&
            st.st_ino == l->ino) {
            unlink(l->unix_path);
        }
        g_free(l->unix_path);
        l->unix_path = NULL;
    }
}

static void listener_free(gpointer p)
{
    ExtlockdListener *l = p;

    listener_close(l);
    g_free(l->address);
    g_free(l);
}

static void add_listener(ExtlockdServer *s, const char *address, int fd,
                         bool is_tcp, const char *unix_path)
{
    ExtlockdListener *l = g_new0(ExtlockdListener, 1);

    l->tls = is_tcp && s->tls;
    l->server = s;
    l->address = g_strdup(address);
    l->fd = fd;
    l->is_tcp = is_tcp;
    if (unix_path) {
        struct stat st;

        l->unix_path = g_strdup(unix_path);
        if (lstat(unix_path, &st) == 0) {
            l->dev = st.st_dev;
            l->ino = st.st_ino;
        }
    }
    l->watch = g_unix_fd_add(fd, G_IO_IN, listener_accept, l);
    g_ptr_array_add(s->listeners, l);
}

static bool remove_stale_socket(const char *path, GError **errp)
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

static bool listen_unix(ExtlockdServer *s, const char *address,
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
    if (!remove_stale_socket(path, errp)) {
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
    add_listener(s, address, fd, false, path);
    g_message("listening on unix:%s", path);
    return true;
}

static bool listen_tcp(ExtlockdServer *s, const char *address,
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
    if (!s->tls && !s->cfg.insecure) {
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
        add_listener(s, address, fd, true, NULL);
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
                  s->tls ? extlockd_tls_creds_kinds(s->tls) :
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

bool extlockd_server_listen(ExtlockdServer *s, const char *address,
                            GError **errp)
{
    if (g_str_has_prefix(address, "unix:")) {
        return listen_unix(s, address, address + 5, errp);
    }
    if (address[0] == '/') {
        return listen_unix(s, address, address, errp);
    }
    if (g_str_has_prefix(address, "tcp:")) {
        return listen_tcp(s, address, address + 4, errp);
    }
    g_set_error(errp, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                "unsupported address %s (use unix:PATH or tcp:HOST:PORT)",
                address);
    return false;
}

void extlockd_server_stop_listening(ExtlockdServer *s)
{
    for (guint i = 0; i < s->listeners->len; i++) {
        listener_close(s->listeners->pdata[i]);
    }
}

/* ------------------------------------------------------------------ */
/* Server                                                              */

/* The state file text for @epoch and every session */
static char *state_snapshot(ExtlockdServer *s, uint64_t epoch, GError **errp)
{
    g_autoptr(GArray) list = g_array_sized_new(FALSE, FALSE,
                                               sizeof(ExtlockdStateSession),
                                               s->session_list.length);

    for (GList *l = s->session_list.head; l; l = l->next) {
        ExtlockdSession *S = l->data;
        ExtlockdStateSession ss = {
            .session = S->id,
            .client_id = S->client_id,
            .lock_space = S->space->name,
            .lease_ms = S->lease_ms,
            .fence_margin_ms = S->fence_margin_ms,
            .owner = S->owner,
            .secret_sha256 = S->secret_sha256[0] ? S->secret_sha256 : NULL,
        };

        g_array_append_val(list, ss);
    }
    return extlockd_state_format(epoch, (ExtlockdStateSession *)list->data,
                                 list->len, errp);
}

/* Write @epoch and every session to the state file, now */
static bool save_state(ExtlockdServer *s, uint64_t epoch, GError **errp)
{
    char *text = state_snapshot(s, epoch, errp);

    return text && extlockd_state_writer_write_now(s->writer, text, errp);
}

/* Queue the current state for the writer thread; its generation */
static uint64_t save_state_async(ExtlockdServer *s)
{
    g_autoptr(GError) err = NULL;
    char *text = state_snapshot(s, s->epoch, &err);

    if (!text) {
        g_warning("cannot update the state file: %s", err->message);
        return 0;
    }
    return extlockd_state_writer_submit(s->writer, text);
}

/* The writer is done with generation @gen: send the waiting welcomes */
static void state_written(uint64_t gen, bool ok, const char *error,
                          void *opaque)
{
    ExtlockdServer *s = opaque;
    DeferredWelcome *dw;

    if (!ok) {
        g_warning("cannot update the state file: %s", error);
    }
    while ((dw = g_queue_peek_head(&s->welcomes)) && dw->gen <= gen) {
        ExtlockdSession *S = g_hash_table_lookup(s->sessions, dw->session);
        ExtlockdConn *c = S ? S->conn : NULL;
        ExtlockMsg m;

        g_queue_pop_head(&s->welcomes);
        if (!c || c->serial != dw->conn_serial) {
            g_free(dw);         /* gone meanwhile: it never learnt of it */
            continue;
        }
        c->awaiting_state = false;
        extlock_msg_init(&m, EXTLOCK_MSG_HELLO);
        m.has_id = dw->has_id;
        m.id = dw->id;
        if (ok) {
            send_welcome(c, &m, S, dw->reclaim ? WELCOME_RECLAIM
                                               : WELCOME_NEW);
        } else if (dw->reclaim) {
            /* It may come back and try again with its old secret */
            g_warning("session %s of %s cannot reclaim now: its new "
                      "resume secret is not in the state file", S->id,
                      S->client_id);
            memcpy(S->secret_sha256, dw->old_sha256,
                   sizeof(S->secret_sha256));
            S->secret[0] = '\0';
            send_error(c, m.has_id, m.id, EXTLOCK_ERR_INTERNAL,
                       "cannot record a new resume secret for session %s",
                       S->id);
            conn_close_after_flush(c);
        } else {
            g_warning("session %s of %s dropped: it is not in the state "
                      "file", S->id, S->client_id);
            session_destroy_nosave(S);
            send_error(c, m.has_id, m.id, EXTLOCK_ERR_INTERNAL,
                       "cannot record the session in the state file");
            /*
             * It was attached, so no longer counted as without hello:
             * close it rather than leave it outside --max-unauth
             */
            conn_close_after_flush(c);
        }
        g_free(dw);
        /* Requests that arrived after hello */
        conn_process_lines(c);
    }
    flush_all(s);
}

void extlockd_server_set_event_log(ExtlockdServer *s, ExtlockdEventLog *log)
{
    extlockd_event_log_close(s->event_log);
    s->event_log = log;
}

void extlockd_server_set_ha(ExtlockdServer *s, ExtlockdHa *ha)
{
    s->ha = ha;
}

void extlockd_server_lead(ExtlockdServer *s, uint64_t epoch,
                          GPtrArray *sessions, uint32_t grace_ms)
{
    g_assert(s->ha && !s->leading && !g_hash_table_size(s->sessions));
    s->epoch = epoch;
    s->boot_epoch = epoch;
    s->counter = s->cfg.first_counter ? s->cfg.first_counter : 1;
    s->cfg.grace_ms = grace_ms;
    extlockd_server_restore(s, sessions);
    s->leading = true;
}

void extlockd_server_set_fencer(ExtlockdServer *s, ExtlockdFencer *fencer)
{
    extlockd_fencer_free(s->fencer);
    s->fencer = fencer;
}

bool extlockd_server_save_state(ExtlockdServer *s, GError **errp)
{
    return save_state(s, s->epoch, errp);
}

ExtlockdServer *extlockd_server_new(const ExtlockdConfig *cfg,
                                    uint64_t epoch)
{
    ExtlockdServer *s = g_new0(ExtlockdServer, 1);

    s->cfg = *cfg;
    s->cfg.state_file = g_strdup(cfg->state_file);
    s->epoch = epoch;
    s->boot_epoch = epoch;
    s->counter = cfg->first_counter ? cfg->first_counter : 1;
    s->start_us = g_get_monotonic_time();
    s->status_budget = EXTLOCKD_STATUS_ENTRIES_PER_SEC;
    s->status_budget_us = s->start_us;
    s->listeners = g_ptr_array_new_with_free_func(listener_free);
    s->spaces = g_hash_table_new(g_str_hash, g_str_equal);
    s->sessions = g_hash_table_new(g_str_hash, g_str_equal);
    s->identity_sessions = g_hash_table_new_full(g_str_hash, g_str_equal,
                                                 g_free, NULL);
    if (!s->cfg.max_sessions_per_identity) {
        s->cfg.max_sessions_per_identity =
            EXTLOCKD_DEFAULT_MAX_SESS_PER_IDENTITY;
    }
    g_queue_init(&s->session_list);
    g_queue_init(&s->grace_spaces);
    g_queue_init(&s->conns);
    g_queue_init(&s->dirty);
    s->rbuf = g_malloc(READ_CHUNK);
    s->pieces = g_array_new(FALSE, FALSE, sizeof(ExtlockPiece));
    s->blockers = g_array_new(FALSE, FALSE, sizeof(ExtlockBlocker));
    s->locks = g_array_new(FALSE, FALSE, sizeof(ExtlockLockInfo));
    s->policy = extlockd_policy_load(NULL, NULL);
    s->writer = cfg->state_write ?
                extlockd_state_writer_new_fn(cfg->state_write,
                                             cfg->state_write_opaque,
                                             state_written, s) :
                extlockd_state_writer_new(s->cfg.state_file, state_written,
                                          s);
    g_queue_init(&s->welcomes);
    g_queue_init(&s->unauth);
    s->unauth_per_peer = g_hash_table_new_full(g_str_hash, g_str_equal,
                                               g_free, NULL);
    if (!s->cfg.hello_timeout_ms) {
        s->cfg.hello_timeout_ms = EXTLOCKD_DEFAULT_HELLO_TIMEOUT_MS;
    }
    if (!s->cfg.max_unauth) {
        s->cfg.max_unauth = EXTLOCKD_DEFAULT_MAX_UNAUTH;
    }
    if (!s->cfg.status_rate) {
        s->cfg.status_rate = EXTLOCKD_DEFAULT_STATUS_RATE;
    }
    if (!s->cfg.max_unauth_per_peer) {
        s->cfg.max_unauth_per_peer = EXTLOCKD_DEFAULT_MAX_UNAUTH_PEER;
    }
    return s;
}

void extlockd_server_set_policy(ExtlockdServer *s, ExtlockdPolicy *policy)
{
    extlockd_policy_free(s->policy);
    s->policy = policy;
}

void extlockd_server_set_tls(ExtlockdServer *s, ExtlockdTlsCreds *creds)
{
    extlockd_tls_creds_free(s->tls);
    s->tls = creds;
}

void extlockd_server_free(ExtlockdServer *s)
{
    GHashTableIter iter;
    gpointer value;
    GList *l;

    s->shutting_down = true;
    extlockd_server_stop_listening(s);
    g_ptr_array_free(s->listeners, TRUE);

    while ((l = s->conns.head) != NULL) {
        ExtlockdConn *c = l->data;

        /* Best effort: deliver replies already produced */
        if (c->out->len > c->out_pos) {
            ssize_t n = c->handshaking ? 0 :
                        conn_sys_send(c, c->out->str + c->out_pos,
                                      c->out->len - c->out_pos);
            (void)n;
        }
        conn_destroy(c);
    }
    while ((l = g_queue_pop_head_link(&s->session_list)) != NULL) {
        ExtlockdSession *S = l->data;

        /* The tables are freed with all their locks below */
        extlockd_fence_cancel(S->fence);
        session_free(S);
    }
    g_hash_table_iter_init(&iter, s->spaces);
    while (g_hash_table_iter_next(&iter, NULL, &value)) {
        space_free(value);
    }
    g_hash_table_destroy(s->spaces);
    g_hash_table_destroy(s->sessions);
    g_hash_table_destroy(s->identity_sessions);
    if (s->timer) {
        g_source_remove(s->timer);
    }
    g_array_free(s->pieces, TRUE);
    g_array_free(s->blockers, TRUE);
    g_array_free(s->locks, TRUE);
    g_free(s->rbuf);
    g_free(s->cfg.state_file);
    extlockd_event_log_close(s->event_log);
    extlockd_fencer_free(s->fencer);
    extlockd_policy_free(s->policy);
    extlockd_tls_creds_free(s->tls);
    extlockd_state_writer_free(s->writer);
    g_queue_clear_full(&s->welcomes, g_free);
    g_hash_table_destroy(s->unauth_per_peer);
    g_free(s);
}

/* ------------------------------------------------------------------ */
/* Testing seam (tests/fuzz)                                           */

void extlockd_server_add_connection(ExtlockdServer *s, int fd,
                                    const char *peer)
{
    /* An admin on the UNIX socket: every request type is reachable */
    conn_new(s, fd, peer, peer, "uid:0", false);
}

void extlockd_server_run_timer(ExtlockdServer *s)
{
    if (s->timer) {
        g_source_remove(s->timer);
    }
    on_timer(s);
}

bool extlockd_server_check(ExtlockdServer *s, unsigned *nsessions,
                           char **errmsg)
{
    GHashTableIter iter;
    gpointer value;

    g_hash_table_iter_init(&iter, s->spaces);
    while (g_hash_table_iter_next(&iter, NULL, &value)) {
        ExtlockdSpace *space = value;
        g_autofree char *msg = NULL;

        if (!extlock_table_check(space->table, &msg)) {
            *errmsg = g_strdup_printf("lock-space '%s': %s", space->name,
                                      msg);
            return false;
        }
    }
    *nsessions = g_hash_table_size(s->sessions);
    return true;
}
