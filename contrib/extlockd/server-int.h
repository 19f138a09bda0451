/*
 * extlockd: what the server's modules share (not a public API: see
 * server.h for that)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The server is split into one file per job:
 *   server.c      the server object: creation, teardown, settings, token
 *                 counter, state file, the one timer for every deadline
 *   listener.c    listening sockets: open, accept, identify the peer
 *   connection.c  one client socket: reading lines, buffered output,
 *                 TLS, back-pressure, the limits before hello, closing
 *   dispatch.c    one request line: parse it, check who may send it, and
 *                 call its handler
 *   session.c     sessions and their leases: hello/resume/bye, resume
 *                 secrets, expiry, fencing an expired session, restore
 *                 after a restart, welcomes that wait for the state file
 *   lockspace.c   lock-spaces: one lock table each, lock requests,
 *                 grants, revocation, waiting, the restart grace period
 *                 and reclaims
 *   status.c      the "status" request and its limits
 *
 * Data model:
 *   ExtlockdServer     listeners, all connections, all sessions,
 *                      lock-spaces
 *   ExtlockdConn       one client socket: line buffer in, GString out
 *   ExtlockdSession    created by "hello", bound to one lock-space,
 *                      attached to at most one connection; owns the locks
 *                      it holds and the requests it has waiting (both
 *                      live in the table)
 *   ExtlockdLockSpace  one ExtlockTable per lock-space name
 *
 * Everything runs in the thread of the default GMainContext.  Output
 * produced while handling one read (including grants sent to other
 * connections) is written out once, at the end of the callback
 * (conn_flush_all()).
 */
#ifndef EXTLOCKD_SERVER_INT_H
#define EXTLOCKD_SERVER_INT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <glib.h>

#include "extlock/lock-table.h"
#include "extlock/protocol.h"
#include "event-log.h"
#include "fence.h"
#include "metrics.h"
#include "policy.h"
#include "server.h"
#include "state-writer.h"
#include "tls.h"

#define READ_CHUNK          (64 * 1024)     /* bytes per read() */

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

/* Indexed by ExtlockdSessionState (session.c) */
extern const char *const session_state_names[];

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
    /* Maintenance: the image length its last owner announced, and count */
    bool has_maint_size;
    uint64_t maint_size;
    uint64_t maint_gen;
    uint64_t maint_epoch;        /* the server epoch of the last count */
    /*
     * A maintenance was asked for and may run (the state file says so,
     * and a restart counts one more: lockspace_maint_load)
     */
    bool maint_pending;
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
    /*
     * A maintenance waits for locks it holds: it must give them back
     * before this, or it is expired like a lapsed lease
     * (lockspace_check_maint); 0: none
     */
    int64_t maint_deadline_us;
    uint64_t maint_token;        /* ... of that maintenance */
    GHashTable *held;            /* set of granted ExtlockLock * */
    /* set of waiting ExtlockLock *, keyed by their user_tag (request id) */
    GHashTable *waiting;
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
    /* Persistent reservations (reservation.c) */
    bool pr_subscribed;          /* gets pr-update, pr-outs wait for it */
    uint64_t pr_acked;           /* last reservation seq it applied */
    /* subscribed at (ack timeouts count from then at the earliest) */
    int64_t pr_since_us;
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
    /*
     * The peer is gone (a write failed, or it hung up while input was
     * paused): only the releasing lines of what is left are applied
     * (dispatch_line()), and no output is sent
     */
    bool peer_gone;
    unsigned gone_applied;       /* ... lines applied since */
    unsigned gone_dropped;       /* ... lines dropped since */
    bool gone_dropped_reclaim;   /* ... a reclaim among them */
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

struct ExtlockdServer {
    ExtlockdConfig cfg;
    uint64_t epoch;
    /* the epoch at start: reclaimed tokens are from earlier ones */
    uint64_t boot_epoch;
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
    /* lines a client sent before it was gone, not applied (peer_gone) */
    uint64_t gone_dropped;
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
    /*
     * Maintenance locks the table granted while the state file could not
     * record them: released (with an error to their owner) from an idle
     * callback, outside the table's grant loop (MaintUnrecorded)
     */
    GQueue maint_unrecorded;
    guint maint_unrecorded_src;
    /* server_log_refusal(): lines in the current second, and those left out */
    int64_t refusal_window_us;
    unsigned refusal_lines;
    uint64_t refusals_unlogged;
    ExtlockdMetrics *metrics;    /* metrics.h */
    struct ExtlockdPrTable *pr;  /* persistent reservations (reservation.c) */
    /*
     * Maintenance counts read from the state file for lock-spaces that
     * do not exist yet: name -> ExtlockdMaintSaved (lockspace.c)
     */
    GHashTable *maint_saved;
};

/* ------------------------------------------------------------------ */
/* server.c                                                           */

/**
 * server_next_token:
 * @server: the server
 * @token: where to put the token
 *
 * Hand out the next fencing token of the current epoch.  When the 40-bit
 * counter is exhausted, the next epoch is written to the state file
 * first (synchronously) and counting starts again at 1.
 *
 * Returns: true, or false if the new epoch cannot be persisted (no
 * token is handed out then).
 */
bool server_next_token(ExtlockdServer *server, uint64_t *token);

/**
 * server_log_refusal:
 * @server: the server
 * @fmt: printf-style format of the warning
 *
 * Log a request or connection that was refused for who sent it, at most
 * REFUSAL_LOG_BURST lines a second; the next line logged says how many
 * were left out.  A peer cannot fill the log at the rate it sends lines.
 */
void G_GNUC_PRINTF(2, 3)
server_log_refusal(ExtlockdServer *server, const char *fmt, ...);

/**
 * server_save_state:
 * @server: the server
 * @epoch: the epoch to record (the current one, or the next)
 * @errp: where to put an error
 *
 * Write @epoch and every session to the state file now, in the calling
 * thread, and wait until it is durable.
 *
 * Returns: true on success, false with @errp set otherwise.
 */
bool server_save_state(ExtlockdServer *server, uint64_t epoch, GError **errp);

/**
 * server_save_state_async:
 * @server: the server
 *
 * Hand a snapshot of the current epoch and sessions to the state writer
 * thread (state-writer.h).  session_state_written() is called when it is
 * written.
 *
 * Returns: the generation of the snapshot, or 0 if no snapshot could be
 * made (a warning is logged).
 */
uint64_t server_save_state_async(ExtlockdServer *server);

/**
 * server_save_state_or_warn:
 * @server: the server
 *
 * The same, for changes nobody waits for (a session gone from the file
 * matters only after a crash).
 */
void server_save_state_or_warn(ExtlockdServer *server);

/**
 * server_schedule:
 * @server: the server
 * @when_us: a g_get_monotonic_time() value
 *
 * Make sure the one server timer runs no later than @when_us; it calls
 * server_check_deadlines().
 */
void server_schedule(ExtlockdServer *server, int64_t when_us);

/**
 * server_check_deadlines:
 * @server: the server
 *
 * Act on every deadline that has passed, in this order: the grace period
 * (lockspace_check_grace()), leases and fence margins
 * (session_check_leases()), connections without hello and connections
 * closing (conn_check_timeouts()); then set the timer for the earliest
 * deadline left.
 */
void server_check_deadlines(ExtlockdServer *server);

/* ------------------------------------------------------------------ */
/* listener.c                                                         */

/**
 * listener_free:
 * @p: an ExtlockdListener
 *
 * Stop listening, unlink the UNIX socket if it is still the one this
 * listener created, and free it.  The GDestroyNotify of
 * server->listeners.
 */
void listener_free(gpointer p);

/* ------------------------------------------------------------------ */
/* connection.c                                                       */

/**
 * conn_new:
 * @server: the server
 * @fd: a connected, non-blocking socket, owned by the connection from now
 * @peer: how to name the peer in log lines
 * @key: what the per-peer limit of connections without hello counts (the
 *       uid, or the IP address)
 * @identity: the peer's identity (policy.h), or NULL until the TLS
 *            handshake tells it
 * @tls: speak TLS with the server's credentials
 *
 * Serve @fd.  Unless @identity is an admin's, the connection counts as
 * one without hello (conn_admit()) until it says hello or closes.
 */
void conn_new(ExtlockdServer *server, int fd, const char *peer,
              const char *key, const char *identity, bool tls);

/**
 * conn_admit:
 * @server: the server
 * @key: the per-peer key of the new connection (see conn_new())
 * @peer: how to name the peer in the log
 *
 * Returns: whether one more connection without hello may come from @key
 * (--max-unauth-per-peer, --max-unauth); refusals are counted and logged
 * once a second at most.
 */
bool conn_admit(ExtlockdServer *server, const char *key, const char *peer);

/**
 * conn_destroy:
 * @conn: the connection
 *
 * Close and free @conn now, without sending what is pending.  Its
 * session, if any, is detached (session_detach()), unless the server is
 * shutting down.
 */
void conn_destroy(ExtlockdConn *conn);

/**
 * conn_close_after_flush:
 * @conn: the connection
 *
 * Stop reading from @conn and close it once its output is sent, or after
 * CLOSE_TIMEOUT_US at most (conn_check_timeouts()).
 */
void conn_close_after_flush(ExtlockdConn *conn);

/**
 * conn_unauth_done:
 * @conn: the connection
 *
 * @conn no longer counts as a connection without hello (it said hello,
 * it is an admin's, or it closes).  Does nothing if it did not count.
 */
void conn_unauth_done(ExtlockdConn *conn);

/**
 * conn_set_events:
 * @conn: the connection
 * @events: G_IO_IN, G_IO_OUT, both or none
 *
 * Watch the socket of @conn for @events (the main loop source is changed
 * only if they differ from the current ones).
 */
void conn_set_events(ExtlockdConn *conn, GIOCondition events);

/**
 * conn_out:
 * @conn: the connection
 *
 * Returns: the output buffer of @conn, to append to; the connection is
 * queued for conn_flush_all() at the end of the main loop callback.
 */
GString *conn_out(ExtlockdConn *conn);

/**
 * conn_send_msg:
 * @conn: the connection
 * @msg: a reply or notification
 *
 * Format @msg onto the output of @conn.
 */
void conn_send_msg(ExtlockdConn *conn, const ExtlockMsg *msg);

/**
 * conn_urgent:
 * @conn: a connection with output queued
 *
 * Write the output of @conn first at the end of this main loop callback,
 * before the other connections': a revoke to a holder or a grant to a
 * waiter, which another host waits for, goes out before replies that
 * nobody waits for (the waiter's "waiting", the holder's "unlocked"), so
 * that the process that matters is woken first.  The order of the
 * messages on each connection does not change.
 */
void conn_urgent(ExtlockdConn *conn);

/**
 * conn_send_error:
 * @conn: the connection
 * @has_id: whether the error answers a request with an id
 * @id: that id
 * @code: the error code
 * @fmt: printf-style format of the message
 *
 * Queue an error reply on @conn; it counts in the "errors" counter of
 * the status.
 */
void G_GNUC_PRINTF(5, 6)
conn_send_error(ExtlockdConn *conn, bool has_id, uint64_t id,
                ExtlockErrorCode code, const char *fmt, ...);

/**
 * conn_sys_send:
 * @conn: the connection
 * @buf: the bytes
 * @len: how many
 *
 * Send on the non-blocking socket of @conn, through TLS if it speaks TLS.
 *
 * Returns: as send(2): the bytes sent, or -1 with errno set.
 */
ssize_t conn_sys_send(ExtlockdConn *conn, const void *buf, size_t len);

/**
 * conn_process_lines:
 * @conn: the connection
 *
 * Hand every complete line received on @conn to dispatch_line(), until
 * none is left or input is paused (closing, or waiting for the state
 * file after hello).
 */
void conn_process_lines(ExtlockdConn *conn);

/**
 * conn_flush_all:
 * @server: the server
 *
 * Write out the output of every connection that has some (as much as
 * the sockets take; the rest when they become writable).  Called at the
 * end of every main loop callback.  May destroy connections.
 */
void conn_flush_all(ExtlockdServer *server);

/**
 * conn_check_timeouts:
 * @server: the server
 * @now: the current g_get_monotonic_time()
 *
 * For the server timer: close the connections that said no hello within
 * --hello-timeout-ms, and those that have been closing for
 * CLOSE_TIMEOUT_US.
 *
 * Returns: the next such deadline, or INT64_MAX if there is none.
 */
int64_t conn_check_timeouts(ExtlockdServer *server, int64_t now);

/* ------------------------------------------------------------------ */
/* dispatch.c                                                         */

/**
 * dispatch_line:
 * @conn: the connection
 * @line: the request, without its newline
 * @len: its length
 *
 * Parse one request line, check that @conn may send it (dispatch_table
 * in dispatch.c), and call its handler.  Bad lines and refused requests
 * get an error reply and change nothing.  Once the peer of @conn is gone
 * (conn->peer_gone), only requests that give something up are applied
 * (dispatch_after_gone() in dispatch.c); the others are dropped and
 * counted.
 */
void dispatch_line(ExtlockdConn *conn, const char *line, size_t len);

/* ------------------------------------------------------------------ */
/* session.c                                                          */

/*
 * Request handlers (dispatch_table): @conn sent @m; @session (or
 * @attached) is the session of @conn, NULL before hello.  Each answers
 * on @conn, an error included.
 *
 * session_handle_hello: a new session, or the resume of a live one (with
 * its resume secret), or the reclaim of one listed in the state file
 * after a restart.  Input on @conn pauses until the state file has the
 * session (the welcome waits for session_state_written()).
 * session_handle_renew: a fresh lease.
 * session_handle_bye: release everything, end the session, close.
 * session_handle_release: (admins) release the locks of an expired
 * session now, without waiting for its fence agent.
 */
void session_handle_hello(ExtlockdConn *conn, ExtlockdSession *attached,
                          ExtlockMsg *m);
void session_handle_renew(ExtlockdConn *conn, ExtlockdSession *session,
                          ExtlockMsg *m);
void session_handle_bye(ExtlockdConn *conn, ExtlockdSession *session,
                        ExtlockMsg *m);
void session_handle_release(ExtlockdConn *conn, ExtlockdSession *attached,
                            ExtlockMsg *m);

/**
 * session_detach:
 * @session: an active session
 *
 * Its connection dropped without "bye": cancel its waiting requests and
 * keep its locks until the lease and the fence margin have passed,
 * unless it is resumed before.
 */
void session_detach(ExtlockdSession *session);

/**
 * session_peer_gone:
 * @session: an active session
 *
 * The peer of its connection is gone, and only the releasing lines it
 * sent are still applied (dispatch_line()): cancel its waiting requests,
 * so that none of them can be granted to nobody.
 */
void session_peer_gone(ExtlockdSession *session);

/**
 * session_expire:
 * @session: a session whose lease has lapsed
 *
 * Tell its client (if connected, which is then closed), cancel its
 * waiting requests, stop its reclaiming, and run the fence agent if one
 * is configured and it holds locks.  Its locks go when
 * session_check_leases() sees the fence margin pass (and the agent
 * succeed).
 */
void session_expire(ExtlockdSession *session);
/* The same, telling the client @why (session_expire: the lease lapsed) */
void session_expire_because(ExtlockdSession *session, const char *why);

/**
 * session_fence_start:
 * @session: an expired session
 *
 * Run the fence agent (fence.h) for its client and tell the sessions
 * waiting behind its locks (fence-status).
 */
void session_fence_start(ExtlockdSession *session);

/**
 * session_end_reclaim:
 * @session: the session
 *
 * @session will not reclaim any more (reclaim-done, bye, lease lapsed);
 * the grace period of its lock-space ends when nobody reclaims any more.
 * Does nothing if it was not reclaiming.
 */
void session_end_reclaim(ExtlockdSession *session);

/**
 * session_destroy_nosave:
 * @session: a session that holds and waits for nothing
 *
 * End and free @session, without rewriting the state file (the caller
 * does, or the session was never in it).
 */
void session_destroy_nosave(ExtlockdSession *session);

/**
 * session_free:
 * @session: the session
 *
 * Free @session only: for the server teardown, which frees the tables
 * with their locks.
 */
void session_free(ExtlockdSession *session);

/**
 * session_find_waiting:
 * @session: the session
 * @req: a request id
 *
 * Returns: the waiting lock request @req of @session (in the table or
 * deferred), or NULL.
 */
ExtlockLock *session_find_waiting(ExtlockdSession *session, uint64_t req);

/**
 * session_wants_revokes:
 * @session: the session
 *
 * Returns: whether @session caches locks and can be told now to give
 * them back (it is connected and not releasing everything).
 */
bool session_wants_revokes(ExtlockdSession *session);

/**
 * session_set_revocable:
 * @session: the session
 *
 * @session caches locks ("limit", "reclaim" or "downgrade"): send it
 * revokes from now on.
 */
void session_set_revocable(ExtlockdSession *session);

/**
 * session_log_event:
 * @session: the session
 * @event: the event name (event-log.h)
 * @message: a message, or NULL
 *
 * Write @event about @session to the event log, if there is one.
 */
void session_log_event(ExtlockdSession *session, const char *event,
                       const char *message);

/**
 * session_state_written:
 * @gen: the generation written (or not)
 * @ok: whether it was written
 * @error: why not
 * @opaque: the server
 *
 * The state writer's callback: send the welcomes that waited for
 * generation @gen or earlier, or refuse those sessions (and close their
 * connections) if the write failed; then handle the requests that
 * arrived after their hello.
 */
void session_state_written(uint64_t gen, bool ok, const char *error,
                           void *opaque);

/**
 * session_check_leases:
 * @server: the server
 * @now: the current g_get_monotonic_time()
 *
 * For the server timer: expire the sessions whose lease lapsed
 * (session_expire()), and end those whose fence margin has passed too
 * (and whose fence agent, if any, succeeded), releasing their locks.
 *
 * Returns: the next such deadline, or INT64_MAX if there is none.
 */
int64_t session_check_leases(ExtlockdServer *server, int64_t now);

/* ------------------------------------------------------------------ */
/* lockspace.c                                                        */

/*
 * Request handlers (dispatch_table), all after hello: @conn sent @m for
 * its @session.  Each answers on @conn, an error included; grants and
 * revokes for other sessions go to their connections.
 *
 * lockspace_handle_lock: granted at once, waiting, or deferred until the
 * grace period ends ("wait": false: granted at once or refused).
 * lockspace_handle_unlock: release a lock, or a part of it.
 * lockspace_handle_cancel: cancel a waiting request.
 * lockspace_handle_downgrade: make an exclusive lock shared.
 * lockspace_handle_reclaim: re-assert a lock held before a restart, with
 * its original token, during the grace period.
 * lockspace_handle_reclaim_done: the session has reclaimed everything.
 */
void lockspace_handle_lock(ExtlockdConn *conn, ExtlockdSession *session,
                           ExtlockMsg *m);
void lockspace_handle_unlock(ExtlockdConn *conn, ExtlockdSession *session,
                             ExtlockMsg *m);
void lockspace_handle_cancel(ExtlockdConn *conn, ExtlockdSession *session,
                             ExtlockMsg *m);
void lockspace_handle_downgrade(ExtlockdConn *conn, ExtlockdSession *session,
                                ExtlockMsg *m);
void lockspace_handle_reclaim(ExtlockdConn *conn, ExtlockdSession *session,
                              ExtlockMsg *m);
void lockspace_handle_reclaim_done(ExtlockdConn *conn,
                                   ExtlockdSession *session, ExtlockMsg *m);

/**
 * lockspace_get:
 * @server: the server
 * @name: a lock-space name
 *
 * Returns: the lock-space @name, created (with an empty table) if it
 * does not exist.  The caller counts its session in space->nsessions.
 */
ExtlockdLockSpace *lockspace_get(ExtlockdServer *server, const char *name);

/**
 * lockspace_unref:
 * @space: the lock-space
 *
 * A session of @space (or another reference) went away; the last one
 * frees it, which must by then hold and queue nothing.
 */
void lockspace_unref(ExtlockdLockSpace *space);

/**
 * lockspace_free:
 * @space: the lock-space
 *
 * Free @space with every lock and deferred request in it, without
 * callbacks (server teardown).
 */
void lockspace_free(ExtlockdLockSpace *space);

/**
 * lockspace_lock_is_deferred:
 * @lock: a waiting request of a session
 *
 * Returns: whether @lock is a request deferred until the grace period
 * ends (a DeferredReq, not in the table).
 */
bool lockspace_lock_is_deferred(const ExtlockLock *lock);

/**
 * lockspace_cancel_waiter:
 * @space: its lock-space
 * @lock: a waiting request (in the table or deferred), already removed
 *        from its session's waiting set
 *
 * Cancel and free the request; requests it held back may be granted.
 */
void lockspace_cancel_waiter(ExtlockdLockSpace *space, ExtlockLock *lock);

/**
 * lockspace_resend_revokes:
 * @session: the session
 *
 * Send again a revoke for every (lock @session holds, later conflicting
 * waiter) pair: revokes sent while it was away or reclaiming may be lost.
 */
void lockspace_resend_revokes(ExtlockdSession *session);

/**
 * lockspace_grace_remaining_ms:
 * @space: the lock-space
 * @now: the current g_get_monotonic_time()
 *
 * Returns: how long the grace period of @space still lasts at most (a
 * reclaim dispute may extend it), in ms, or 0 if it is not in grace.
 */
int64_t lockspace_grace_remaining_ms(ExtlockdLockSpace *space, int64_t now);

/*
 * lockspace_check_maint:
 * @session's maintenance deadline passed: if it still holds its lock on
 * the maintenance extent while a maintenance waits for it, it did not
 * quiesce in time, and it is expired (and fenced) like a lapsed lease.
 */
void lockspace_check_maint(ExtlockdSession *session, int64_t now);

/* "maint-gen" of grants and renewals; only if space->maint_gen */
uint64_t lockspace_maint_gen(ExtlockdLockSpace *space);

/*
 * The maintenance counts for the state file: ',"maintenance":[...]'
 * appended to @out, or nothing if no lock-space has had one
 */
void lockspace_maint_append_state(ExtlockdServer *server, GString *out);

/*
 * Read "maintenance" of the state text @data (@len bytes; a missing
 * member means none).  A lock-space whose maintenance may have been
 * running when the state was written counts one more, in the current
 * epoch, so that every host rereads.  Fails on a malformed member.
 */
bool lockspace_maint_load(ExtlockdServer *server, const char *data,
                          size_t len, GError **errp);

/* Is @lock a maintenance: exclusive on [0, 2^63)? */
bool lockspace_is_maint(const ExtlockLock *lock);
/* Drop the maintenance grants still to be undone (the server goes) */
void lockspace_maint_unrecorded_free(ExtlockdServer *server);
void lockspace_maint_undo(ExtlockdServer *server);

/*
 * lockspace_maint_done:
 * A maintenance lock was released (by its owner, with the image's new
 * length if @has_size, or with its expired session): the next grants
 * carry the new maintenance generation.
 */
void lockspace_maint_done(ExtlockdLockSpace *space, bool has_size,
                          uint64_t size);

/**
 * lockspace_end_grace:
 * @space: a lock-space in its grace period
 * @timeout: whether the grace period timed out (else every listed
 *           session is done reclaiming)
 *
 * End the grace period of @space: drop the listed sessions whose client
 * never came back and queue the deferred requests in token order.  The
 * end is postponed while a reclaim dispute lasts and, with a fence agent,
 * until those absent sessions are fenced.
 */
void lockspace_end_grace(ExtlockdLockSpace *space, bool timeout);

/**
 * lockspace_end_grace_all:
 * @server: the server
 *
 * The grace period timed out: end it (lockspace_end_grace()) in every
 * lock-space still in it.
 */
void lockspace_end_grace_all(ExtlockdServer *server);

/**
 * lockspace_log_lock:
 * @server: the server
 * @event: the event name (event-log.h)
 * @lock: the lock
 * @part: the part released, or NULL for the whole lock
 *
 * Write @event about @lock and its owner to the event log, if there is
 * one.
 */
void lockspace_log_lock(ExtlockdServer *server, const char *event,
                        ExtlockLock *lock, const ExtlockExtent *part);

/**
 * lockspace_check_grace:
 * @server: the server
 * @now: the current g_get_monotonic_time()
 *
 * For the server timer: end the grace period if its time is up.
 *
 * Returns: when it ends otherwise, or INT64_MAX if no lock-space is in
 * its grace period.
 */
int64_t lockspace_check_grace(ExtlockdServer *server, int64_t now);

/* ------------------------------------------------------------------ */
/* status.c                                                           */

/**
 * status_handle:
 * @conn: the connection
 * @session: its session, or NULL (then @conn is an admin's)
 * @m: the request
 *
 * The "status" request handler (dispatch_table): the status as @conn
 * may see it (admins everything, others their own session and
 * lock-space), within the per-connection rate and the entry budgets.
 */
void status_handle(ExtlockdConn *conn, ExtlockdSession *session,
                   ExtlockMsg *m);

/* ------------------------------------------------------------------ */
/* reservation.c: SCSI-3 persistent reservations per lock-space       */

void reservation_init(ExtlockdServer *server);
void reservation_fini(ExtlockdServer *server);
/* Requests pr-out, pr-in, pr-ack */
void reservation_handle_out(ExtlockdConn *conn, ExtlockdSession *session,
                            ExtlockMsg *m);
void reservation_handle_in(ExtlockdConn *conn, ExtlockdSession *session,
                           ExtlockMsg *m);
void reservation_handle_ack(ExtlockdConn *conn, ExtlockdSession *session,
                            ExtlockMsg *m);
/* A welcome went out: a subscribed session gets the current state */
void reservation_welcomed(ExtlockdSession *session);
/*
 * Sessions expired or ended, or the state file was written: answer the
 * pr-outs that waited for them
 */
void reservation_check_all(ExtlockdServer *server);
/* The same from the main loop (for callers that walk the sessions) */
void reservation_check_later(ExtlockdServer *server);
/*
 * The last session of lock-space @space went away: its reservation state
 * is forgotten soon (from the main loop) if it is empty
 */
void reservation_space_unused(ExtlockdServer *server, const char *space);
/* Lock-spaces with a reservation state in memory (status) */
unsigned reservation_count(ExtlockdServer *server);
/* Ack timeouts: expire late sessions; the next deadline (INT64_MAX: none) */
int64_t reservation_check_deadlines(ExtlockdServer *server, int64_t now);
void reservation_state_written(ExtlockdServer *server, uint64_t gen, bool ok);
/*
 * The state file's "reservations" member: write (appended to @out, which
 * holds the members of the state object so far), and read
 */
void reservation_append_state(ExtlockdServer *server, GString *out);
bool reservation_load(ExtlockdServer *server, const char *data, size_t len,
                      GError **errp);
/* status: the "reservation" member of a lock-space, if it has one */
void reservation_status(ExtlockdServer *server, const char *space,
                        struct json_object *into);

/**
 * session_abort:
 * @session: a session of a client preempted by PREEMPT AND ABORT
 * @why: the reason, for the log and the session-expired notification
 *
 * End @session now: its connection gets session-expired and is closed,
 * its waiting requests are cancelled and its locks released.
 */
void session_abort(ExtlockdSession *session, const char *why);

#endif /* EXTLOCKD_SERVER_INT_H */
