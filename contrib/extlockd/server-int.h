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
    ExtlockdMetrics *metrics;    /* metrics.h */
};

/* ------------------------------------------------------------------ */
/* server.c                                                           */

/* The next fencing token; false if a new epoch cannot be persisted */
bool server_next_token(ExtlockdServer *server, uint64_t *token);

/*
 * Log a refused request or connection, at most REFUSAL_LOG_BURST lines
 * a second
 */
void G_GNUC_PRINTF(2, 3)
server_log_refusal(ExtlockdServer *server, const char *fmt, ...);

/* Write @epoch and every session to the state file, now */
bool server_save_state(ExtlockdServer *server, uint64_t epoch, GError **errp);

/* Queue the current state for the writer thread; its generation */
uint64_t server_save_state_async(ExtlockdServer *server);

/* The same, when nothing waits for the write */
void server_save_state_or_warn(ExtlockdServer *server);

/* Make sure the timer runs no later than @when_us */
void server_schedule(ExtlockdServer *server, int64_t when_us);

/* Act on every deadline that has passed, and set the timer */
void server_check_deadlines(ExtlockdServer *server);

/* ------------------------------------------------------------------ */
/* listener.c                                                         */

/* Close and free a listener (GDestroyNotify of server->listeners) */
void listener_free(gpointer p);

/* ------------------------------------------------------------------ */
/* connection.c                                                       */

/*
 * Serve the accepted socket @fd (the connection owns it).  @key: what the
 * per-peer cap counts; @identity: NULL until a TLS handshake tells it
 */
void conn_new(ExtlockdServer *server, int fd, const char *peer,
              const char *key, const char *identity, bool tls);

/* May one more connection without hello come from @key? */
bool conn_admit(ExtlockdServer *server, const char *key, const char *peer);

/* Close and free @conn now; its session, if any, is detached */
void conn_destroy(ExtlockdConn *conn);

/* Close @conn once its output is out (at most CLOSE_TIMEOUT_US) */
void conn_close_after_flush(ExtlockdConn *conn);

/* @conn is no longer counted as a connection without hello */
void conn_unauth_done(ExtlockdConn *conn);

/* Watch @conn for @events */
void conn_set_events(ExtlockdConn *conn, GIOCondition events);

/*
 * The output buffer of @conn; marks it for conn_flush_all() at the end
 * of the callback
 */
GString *conn_out(ExtlockdConn *conn);

/* Queue @msg on @conn */
void conn_send_msg(ExtlockdConn *conn, const ExtlockMsg *msg);

/* Queue an error reply on @conn (counted in "errors") */
void G_GNUC_PRINTF(5, 6)
conn_send_error(ExtlockdConn *conn, bool has_id, uint64_t id,
         ExtlockErrorCode code,
         const char *fmt, ...);

/* Plain or TLS send on the non-blocking socket */
ssize_t conn_sys_send(ExtlockdConn *conn, const void *buf, size_t len);

/* Handle the complete lines received, unless input is paused */
void conn_process_lines(ExtlockdConn *conn);

/* Write out the output of every connection that has some */
void conn_flush_all(ExtlockdServer *server);

/* The lease timer: hello timeouts and closing connections */
int64_t conn_check_timeouts(ExtlockdServer *server, int64_t now);

/* ------------------------------------------------------------------ */
/* dispatch.c                                                         */

/* Handle one request line received on @conn */
void dispatch_line(ExtlockdConn *conn, const char *line, size_t len);

/* ------------------------------------------------------------------ */
/* session.c                                                          */

/* Requests: "hello", "renew", "bye" and (admins) "release-session" */
void session_handle_hello(ExtlockdConn *conn, ExtlockdSession *attached,
                          ExtlockMsg *m);
void session_handle_renew(ExtlockdConn *conn, ExtlockdSession *session,
                          ExtlockMsg *m);
void session_handle_bye(ExtlockdConn *conn, ExtlockdSession *session,
                        ExtlockMsg *m);
void session_handle_release(ExtlockdConn *conn, ExtlockdSession *attached,
                            ExtlockMsg *m);

/* The connection of @session dropped without "bye" */
void session_detach(ExtlockdSession *session);

/* The lease of @session lapsed */
void session_expire(ExtlockdSession *session);

/* Run the fence agent for the expired @session */
void session_fence_start(ExtlockdSession *session);

/* @session will not reclaim any more */
void session_end_reclaim(ExtlockdSession *session);

/*
 * End @session, which holds and waits for nothing, without rewriting the
 * state file
 */
void session_destroy_nosave(ExtlockdSession *session);

/* Free @session (server teardown) */
void session_free(ExtlockdSession *session);

/* The waiting request @req of @session, or NULL */
ExtlockLock *session_find_waiting(ExtlockdSession *session, uint64_t req);

/* Does @session cache locks, and can it be told to give them back? */
bool session_wants_revokes(ExtlockdSession *session);

/* @session caches locks: send it revokes from now on */
void session_set_revocable(ExtlockdSession *session);

/* Write @event about @session to the event log, if any */
void session_log_event(ExtlockdSession *session, const char *event,
                       const char *message);

/*
 * The state writer is done with a generation: send the welcomes that
 * waited for it
 */
void session_state_written(uint64_t gen, bool ok, const char *error,
                           void *opaque);

/* The lease timer: expiry and fence margins */
int64_t session_check_leases(ExtlockdServer *server, int64_t now);

/* ------------------------------------------------------------------ */
/* lockspace.c                                                        */

/*
 * Requests: "lock", "unlock", "cancel", "downgrade", "reclaim" and
 * "reclaim-done" (all need a session)
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
void lockspace_handle_reclaim_done(ExtlockdConn *conn, ExtlockdSession *session,
                                   ExtlockMsg *m);

/* The lock-space @name, created if needed */
ExtlockdLockSpace *lockspace_get(ExtlockdServer *server, const char *name);

/* A session of @space went away: the last one frees it */
void lockspace_unref(ExtlockdLockSpace *space);

/* Free @space and every lock in it (server teardown) */
void lockspace_free(ExtlockdLockSpace *space);

/* Is @lock a request deferred until the grace period ends? */
bool lockspace_lock_is_deferred(const ExtlockLock *lock);

/* Cancel a waiting request (in the table or deferred) */
void lockspace_cancel_waiter(ExtlockdLockSpace *space, ExtlockLock *lock);

/* Send again the revokes for every lock @session holds */
void lockspace_resend_revokes(ExtlockdSession *session);

/* How long the grace period of @space still lasts (0: over) */
int64_t lockspace_grace_remaining_ms(ExtlockdLockSpace *space, int64_t now);

/* End the grace period of @space, or postpone the end */
void lockspace_end_grace(ExtlockdLockSpace *space, bool timeout);

/* The grace period timed out: end it everywhere */
void lockspace_end_grace_all(ExtlockdServer *server);

/*
 * Write @event about @lock (@part: the part released, or NULL) to the
 * event log, if any
 */
void lockspace_log_lock(ExtlockdServer *server, const char *event,
                        ExtlockLock *lock, const ExtlockExtent *part);

/* The lease timer: the end of the grace period */
int64_t lockspace_check_grace(ExtlockdServer *server, int64_t now);

/* ------------------------------------------------------------------ */
/* status.c                                                           */

/* Request: "status" */
void status_handle(ExtlockdConn *conn, ExtlockdSession *session, ExtlockMsg *m);

#endif /* EXTLOCKD_SERVER_INT_H */
