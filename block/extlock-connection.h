/*
 * extlock: the coordinator connection of an extlock block node
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The connection layer owns the socket (a QIOChannel), the requests
 * awaiting a reply, the session, its lease and the reconnection.  It knows
 * nothing of locks: the lock cache (extlock-locks.c) sits on top, calls
 * down through the functions below, and is told what happens through an
 * ExtlockConnOps table (replies to its requests, revocations, the lease
 * lost, a session resumed or new, ...).  Layers (docs/qemu-driver.rst):
 *
 *   extlock.c (BlockDriver)  ->  extlock-locks.c (lock cache, requests)
 *     ->  extlock-connection.c (this)  ->  util/extlock-protocol.c
 *
 * Everything runs in the node's AioContext: the socket is served by an
 * AioContext fd handler, one-shot timers renew the lease and watch its
 * deadline.  Connecting runs in a detached thread, so neither close nor a
 * drain ever waits for a connect; only the connect at open blocks.
 */
#ifndef BLOCK_EXTLOCK_CONNECTION_H
#define BLOCK_EXTLOCK_CONNECTION_H

#include "qapi/qapi-types-sockets.h"
#include "crypto/tlscreds.h"
#include "block/aio.h"
#include "extlock/protocol.h"

typedef struct ExtlockConnection ExtlockConnection;

/* The state machine of the connection (extlock-connection.c) */
typedef enum ExtlockConnState {
    EXTLOCK_CONN_ACTIVE,        /* connected, session and lease valid */
    EXTLOCK_CONN_RECONNECTING,  /* connection lost; the lease may still hold */
    EXTLOCK_CONN_LEASE_LOST,    /* no I/O until a session is back */
} ExtlockConnState;

/* Reconnection: a lock the node holds, to resume or reclaim */
typedef struct ExtlockReclaim {
    uint64_t old_id;
    uint64_t offset;
    uint64_t length;
    ExtlockMode mode;
    uint64_t token;
    uint64_t new_id;            /* set by the reclaim */
    bool ok;
    bool stale;                 /* a stale lock still in use */
} ExtlockReclaim;

/*
 * What the connection tells the layer above.  Every callback runs in the
 * node's AioContext, outside coroutines, and may send.
 */
typedef struct ExtlockConnOps {
    /*
     * A reply to lock request @req (see extlock_conn_request()): "waiting",
     * or the final "granted" or "error" (then the connection forgets @req).
     */
    void (*request_reply)(void *opaque, void *req, ExtlockMsg *msg);
    /* The connection broke before @req's final reply */
    void (*request_lost)(void *opaque, void *req);
    /* The last message of a read is handled: wake what it completed */
    void (*read_done)(void *opaque);
    /* Revocation of one of the node's locks */
    void (*revoke)(void *opaque, ExtlockMsg *msg);
    /*
     * A reply to a plain message (extlock_conn_send()) other than renewals:
     * true if the layer above expected it (then it is not reported).
     */
    bool (*reply)(void *opaque, ExtlockMsg *msg);
    /* The coordinator dropped lock @lock_id (a disputed reclaim) */
    void (*lock_dropped)(void *opaque, uint64_t lock_id);
    /* The coordinator fences a client the node's requests wait behind */
    void (*fence_status)(void *opaque, ExtlockMsg *msg);
    /* The lease is lost: no lock may be used again */
    void (*lease_lost)(void *opaque);
    /* The state changed: waiters for the connection or lease look again */
    void (*state_changed)(void *opaque);
    /* Reconnecting: the locks the node holds (GArray of ExtlockReclaim) */
    GArray *(*held_locks)(void *opaque);
    /*
     * Optional, cheap (called while an IOThread polls): true if the node
     * holds a lock that may be revoked.  NULL: as if always true.
     */
    bool (*holds_locks)(void *opaque);
    /* Reconnected to the same session, which still lists @server_locks */
    void (*session_resumed)(void *opaque, GArray *server_locks);
    /* Reconnected to a restarted coordinator: @reclaims says what is kept */
    void (*session_reclaimed)(void *opaque, GArray *reclaims);
    /* Reconnected with a new session: every lock is gone; how many */
    uint64_t (*session_new)(void *opaque);
    /* The persistent reservation state changed (extlock-pr.h) */
    void (*pr_update)(void *opaque, ExtlockMsg *msg);
    /* A renewal reply: it says how many maintenances the lock-space had */
    void (*renewed)(void *opaque, ExtlockMsg *msg);
} ExtlockConnOps;

/*
 * Several addresses are the replicas of an HA coordinator: connecting
 * tries the last leader first, then the list in order; a follower's
 * "not-leader" answer naming the leader is followed at once.
 */
typedef struct ExtlockConnConfig {
    const SocketAddressList *addrs;     /* at least one */
    const char *client_id;
    const char *lock_space;
    uint32_t lease_ms;          /* 0: the coordinator's default */
    QCryptoTLSCreds *tls_creds; /* NULL: plain; else referenced */
    /* name to verify; NULL: an inet address's host, else CA only */
    const char *tls_hostname;
    const char *node_name;      /* for events and messages */
    bool stuck_io_exit;         /* on-stuck-io=exit (else report) */
    BlockDriverState *bs;       /* counts the reconnection in flight */
} ExtlockConnConfig;

/* What QMP shows of the connection */
typedef struct ExtlockConnInfo {
    /* socket_uri() of the coordinator in use (or last used) */
    const char *address;
    const char *const *addresses; /* socket_uri() of each configured one */
    bool connected;
    ExtlockConnState state;
    const char *session;        /* NULL until the first welcome */
    uint64_t epoch;
    uint32_t lease_ms;
    int64_t lease_remaining_ms; /* negative once past the deadline */
    uint64_t reconnects;
    uint64_t lease_losses;
} ExtlockConnInfo;

/*
 * Connect, say hello and start the session (blocking, bounded: at open
 * only).  @ops and @opaque receive what happens from then on.
 */
ExtlockConnection *extlock_conn_new(const ExtlockConnConfig *cfg,
                                    const ExtlockConnOps *ops, void *opaque,
                                    AioContext *ctx, Error **errp);
/*
 * The same from a coroutine, without blocking its thread: the connect
 * runs in a detached thread (one round over the addresses, each step
 * bounded by the answer timeout) while the coroutine yields.  At
 * @deadline_ns (QEMU_CLOCK_REALTIME) it stops waiting and fails (the
 * thread finishes alone and closes what it opened).
 */
ExtlockConnection *coroutine_fn
extlock_conn_new_co(const ExtlockConnConfig *cfg, const ExtlockConnOps *ops,
                    void *opaque, AioContext *ctx, int64_t deadline_ns,
                    Error **errp);
/* Say bye (releases the session's locks at once) and free */
void extlock_conn_free(ExtlockConnection *conn);

/* Only while drained (asserts that the reconnection is paused) */
void extlock_conn_detach_aio_context(ExtlockConnection *conn);
void extlock_conn_attach_aio_context(ExtlockConnection *conn,
                                     AioContext *ctx);
/*
 * Drained sections: pause cuts the reconnection's waits (its connect is
 * left to the detached thread) and stops it; resume starts it again.
 * Nested: the reconnection runs when every pause is resumed.
 */
void extlock_conn_pause(ExtlockConnection *conn);
void extlock_conn_resume(ExtlockConnection *conn);

/* on-stuck-io changed (reopen): used from the next stuck request on */
void extlock_conn_set_stuck_io_exit(ExtlockConnection *conn, bool exit);

bool extlock_conn_connected(ExtlockConnection *conn);
ExtlockConnState extlock_conn_state(ExtlockConnection *conn);
/* May the node touch the image at @now (lease valid)? */
bool extlock_conn_lease_valid_at(ExtlockConnection *conn, int64_t now);
const char *extlock_conn_address(ExtlockConnection *conn);
void extlock_conn_get_info(ExtlockConnection *conn, ExtlockConnInfo *info);

/*
 * Send @msg with a fresh id (set in @msg and returned); nothing and 0 if
 * disconnected.  With extlock_conn_request() the replies go to
 * ops->request_reply(@req) until the final one, or ops->request_lost().
 */
uint64_t extlock_conn_send(ExtlockConnection *conn, ExtlockMsg *msg);
uint64_t extlock_conn_request(ExtlockConnection *conn, ExtlockMsg *msg,
                              void *req);

/*
 * Requests forwarded to the child: call io_start before and io_done after.
 * A request still in flight when the coordinator may re-grant its locks
 * (lease deadline + client margin + fence margin, less 10 %) makes the
 * process exit (on-stuck-io=exit) or is reported (report).
 */
void extlock_conn_io_start(ExtlockConnection *conn);
void extlock_conn_io_done(ExtlockConnection *conn);

#endif /* BLOCK_EXTLOCK_CONNECTION_H */
