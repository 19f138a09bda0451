/*
 * extlockd: listeners, connections, sessions, leases and request dispatch
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The server runs entirely in the thread that runs the default GMainContext:
 * every socket is non-blocking and watched by the main loop, and one timer
 * handles lease deadlines.
 *
 * This is the server's public API, used by extlockd.c, the tests and the
 * fuzzers.  The implementation is one file per job (server.c, listener.c,
 * connection.c, dispatch.c, session.c, lockspace.c, status.c), which share
 * server-int.h.
 */
#ifndef EXTLOCKD_SERVER_H
#define EXTLOCKD_SERVER_H

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>

#ifndef EXTLOCKD_VERSION
#define EXTLOCKD_VERSION "0.0.0"
#endif
#define EXTLOCKD_SERVER_NAME "extlockd " EXTLOCKD_VERSION

#define EXTLOCKD_DEFAULT_LISTEN     "unix:/run/extlock/extlockd.sock"
#define EXTLOCKD_DEFAULT_STATE_FILE "/var/lib/extlock/extlockd.state"
#define EXTLOCKD_DEFAULT_LEASE_MS   10000
#define EXTLOCKD_DEFAULT_FENCE_MS   1000
#define EXTLOCKD_DEFAULT_PR_ACK_TIMEOUT_MS  30000
#define EXTLOCKD_MIN_FENCE_MS       100
#define EXTLOCKD_DEFAULT_MAX_LOCKS  16384
#define EXTLOCKD_DEFAULT_MAX_SESS   4096
#define EXTLOCKD_DEFAULT_MAX_SESS_PER_IDENTITY  256
#define EXTLOCKD_MAX_FENCE_MS       (3600 * 1000)
#define EXTLOCKD_MAX_GRACE_MS       (EXTLOCKD_MAX_FENCE_MS + 3600 * 1000)

/* A connection whose unsent output exceeds this is disconnected */
#define EXTLOCKD_MAX_OUTPUT         (16 * 1024 * 1024)

/* Connections that have not said hello yet (see docs/extlockd.rst) */
#define EXTLOCKD_DEFAULT_HELLO_TIMEOUT_MS   10000
#define EXTLOCKD_DEFAULT_MAX_UNAUTH         256
#define EXTLOCKD_DEFAULT_MAX_UNAUTH_PEER    32
/* "status" requests per connection and second (also the burst) */
#define EXTLOCKD_DEFAULT_STATUS_RATE        10
/*
 * Locks and requests one status reply lists at most (the rest is counted
 * in "truncated"): for non-admins, for admins, and server-wide per second
 * (a token bucket of one second's worth), so that building status replies
 * never keeps the daemon from answering renewals (docs/protocol.rst)
 */
#define EXTLOCKD_STATUS_MAX_ENTRIES         1024
#define EXTLOCKD_STATUS_MAX_ENTRIES_ADMIN   16384
#define EXTLOCKD_STATUS_ENTRIES_PER_SEC     32768

#ifndef EXTLOCKD_STATE_WRITE_FN_DEFINED
#define EXTLOCKD_STATE_WRITE_FN_DEFINED
typedef bool ExtlockdStateWriteFn(const char *text, void *opaque,
                                  GError **errp);
#endif

typedef struct ExtlockdConfig {
    char *state_file;            /* path, for epoch bumps at runtime */
    /*
     * HA mode: the state goes through this function (ha.h) instead of
     * the file (NULL: the file)
     */
    ExtlockdStateWriteFn *state_write;
    void *state_write_opaque;
    uint32_t lease_ms;           /* default lease (client may ask another) */
    uint32_t fence_margin_ms;    /* extra delay before re-granting */
    uint32_t max_locks_per_session;  /* held + waiting */
    uint32_t max_sessions;
    uint32_t max_sessions_per_identity;  /* 0: the default */
    /*
     * Restart grace period: how long sessions listed in the state file may
     * reclaim their locks before new requests are considered (0: no grace
     * period, listed sessions are dropped)
     */
    uint32_t grace_ms;
    bool debug_checks;           /* lock table invariants after each change */
    bool verbose;                /* per-connection and per-request logging */
    /*
     * Testing hook: the first token counter value (normally 1), so that
     * the wrap of the 40-bit counter into a new epoch can be exercised.
     */
    uint64_t first_counter;
    /* Security (docs/extlockd.rst "TLS and access control") */
    bool insecure;               /* TCP listeners without TLS allowed */
    uint32_t hello_timeout_ms;   /* close connections without hello */
    uint32_t max_unauth;         /* connections without hello, in total */
    uint32_t max_unauth_per_peer;    /* ... per IP address or uid */
    uint32_t status_rate;        /* status requests per second and conn */
    /* Log waits and holds longer than these (ms; 0: off), metrics.h */
    uint32_t long_wait_ms;
    uint32_t long_hold_ms;
    /*
     * A session that has not acknowledged a reservation change after this
     * (ms) is expired (reservation.c); 0 means the default
     */
    uint32_t pr_ack_timeout_ms;
} ExtlockdConfig;

typedef struct ExtlockdServer ExtlockdServer;
typedef struct ExtlockdEventLog ExtlockdEventLog;
typedef struct ExtlockdFencer ExtlockdFencer;
typedef struct ExtlockdPolicy ExtlockdPolicy;
typedef struct ExtlockdTlsCreds ExtlockdTlsCreds;
typedef struct ExtlockdHa ExtlockdHa;

/*
 * Create a server handing out tokens in @epoch, which the caller has
 * already made durable in cfg->state_file.  Nothing listens yet.
 */
ExtlockdServer *extlockd_server_new(const ExtlockdConfig *cfg,
                                    uint64_t epoch);

/*
 * Recreate the sessions listed in the state file (GPtrArray of
 * ExtlockdStateSession, see state-file.h) and start the grace period in
 * which they may reclaim their locks.  Call once, before listening.  With
 * cfg->grace_ms == 0 (or no sessions) nothing is recreated.
 */
void extlockd_server_restore(ExtlockdServer *server, GPtrArray *sessions);

/*
 * Hand the server an event log (event-log.h) and a fencer (fence.h); it
 * owns and frees them.  Call before extlockd_server_restore().
 */
void extlockd_server_set_event_log(ExtlockdServer *server,
                                   ExtlockdEventLog *log);
void extlockd_server_set_fencer(ExtlockdServer *server,
                                ExtlockdFencer *fencer);

/*
 * HA mode (ha.h, not owned): until extlockd_server_lead(), every hello is
 * answered with "not-leader" naming the leader, and every message the
 * server sends first checks that a leader's etcd lease is provably alive
 * (stepping down otherwise).  extlockd_server_lead(): elected, @epoch is
 * durable in etcd; restore @sessions (as extlockd_server_restore()) with
 * a grace period of @grace_ms, then serve.
 */
void extlockd_server_set_ha(ExtlockdServer *server, ExtlockdHa *ha);
void extlockd_server_lead(ExtlockdServer *server, uint64_t epoch,
                          GPtrArray *sessions, uint32_t grace_ms);

/*
 * Write the state file: the current epoch and every session.  The daemon
 * calls this before it listens, and it is done again whenever a session
 * is created or destroyed and when the epoch changes.
 */
bool extlockd_server_save_state(ExtlockdServer *server, GError **errp);

/*
 * Read the persistent reservations ("reservations") from the state file
 * @path; a missing file or member means none.  Fails on a corrupt one.
 */
bool extlockd_server_load_reservations(ExtlockdServer *server,
                                       const char *path, GError **errp);
/*
 * Read the maintenance counts ("maintenance") from the state file @path;
 * a missing file or member means none.  Fails on a corrupt one.  After
 * extlockd_server_restore() and before the state is written again.
 */
bool extlockd_server_load_maintenance(ExtlockdServer *server,
                                      const char *path, GError **errp);
/* The same from the JSON text of the "reservations" member (HA) */
bool extlockd_server_load_reservations_json(ExtlockdServer *server,
                                            const char *json, GError **errp);
/*
 * The same for the JSON text of the "maintenance" member (HA): after
 * extlockd_server_lead(), so that a maintenance that may have been running
 * when the previous leader stopped is counted in the new epoch; queues a
 * state write
 */
bool extlockd_server_load_maintenance_json(ExtlockdServer *server,
                                           const char *json, GError **errp);
/*
 * After loading the reservations: each registration belongs to the
 * "owner" of a saved session (@sessions of ExtlockdStateSession) of its
 * client-id in its lock-space (max-registrations)
 */
void reservation_restore_owners(ExtlockdServer *server, GPtrArray *sessions);

/*
 * Start listening on @address ("unix:PATH", "tcp:HOST:PORT" or an
 * absolute path).  A stale UNIX socket file nobody listens on is removed
 * first; a live one is an error.
 */
bool extlockd_server_listen(ExtlockdServer *server, const char *address,
                            GError **errp);

/*
 * Use @policy from now on (the server owns it and frees the previous one);
 * sessions already open are not re-checked.  Call once before listening
 * and again on SIGHUP.
 */
void extlockd_server_set_policy(ExtlockdServer *server,
                                ExtlockdPolicy *policy);

/*
 * TCP listeners opened after this speak TLS with @creds (owned by the
 * server).  Without it, TCP listeners need cfg->insecure.
 */
void extlockd_server_set_tls(ExtlockdServer *server, ExtlockdTlsCreds *creds);

/*
 * Serve Prometheus metrics at http://@addr/metrics (--metrics-listen,
 * "IPv4:PORT" or "[IPv6]:PORT"), or over HTTPS with the credentials in
 * @tls_dir (--metrics-tls-creds-dir, may be NULL); false with @errp set if
 * it cannot, also when built without libmicrohttpd
 */
bool extlockd_server_metrics_listen(ExtlockdServer *server, const char *addr,
                                    const char *tls_dir, GError **errp);

/*
 * Are @addr and @tls_dir (may be NULL) valid for
 * extlockd_server_metrics_listen()? (option checking)
 */
bool extlockd_metrics_listen_check(const char *addr, const char *tls_dir,
                                   GError **errp);

/* Stop accepting new connections (listening sockets are closed) */
void extlockd_server_stop_listening(ExtlockdServer *server);

/*
 * Close every connection and listener, unlink the UNIX sockets this server
 * created, and free everything.
 */
void extlockd_server_free(ExtlockdServer *server);

/*
 * Testing seam for tests/fuzz (not used by the daemon):
 * extlockd_server_add_connection() serves a connected socket @fd as if it
 * had been accepted (the server owns and closes it);
 * extlockd_server_run_timer() runs the lease/grace/close timer now, as if
 * it had fired (the harness controls the clock);
 * extlockd_server_check() runs the lock table invariant checker on every
 * lock-space and returns the number of sessions.
 */
void extlockd_server_add_connection(ExtlockdServer *server, int fd,
                                    const char *peer);
void extlockd_server_run_timer(ExtlockdServer *server);
bool extlockd_server_check(ExtlockdServer *server, unsigned *nsessions,
                           char **errmsg);

#endif /* EXTLOCKD_SERVER_H */
