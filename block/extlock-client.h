/*
 * extlock: the coordinator client of an extlock block node
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * One client (one coordinator connection and session) per extlock node.
 * Everything runs in the node's AioContext: the socket is served by an
 * AioContext fd handler, requests wait in coroutines, timers renew the
 * lease and age the lock cache.  Reconnecting (connect, hello, lock
 * reclaim) runs in a thread pool worker, so nothing blocks the I/O thread
 * except connecting at open time.
 *
 * extlock-client.c: connection, session, lease, reconnection, events.
 * extlock-locks.c:  the lock cache, revocation and the request API.
 */
#ifndef BLOCK_EXTLOCK_CLIENT_H
#define BLOCK_EXTLOCK_CLIENT_H

#include "qapi/qapi-types-sockets.h"
#include "io/channel-socket.h"
#include "crypto/tlscreds.h"
#include "qemu/coroutine.h"
#include "qemu/queue.h"
#include "qemu/timer.h"
#include "block/aio.h"
#include "extlock/protocol.h"
#include "extlock/interval-tree.h"
#include "extlock-cache.h"

/*
 * A lock granted by the coordinator.  While requests use it, it is active;
 * afterwards it stays cached (with lock-cache=on) until the coordinator
 * revokes it, it ages out, or the cache is full.
 *
 * A lock that becomes invalid (lease lost, or the coordinator no longer
 * lists it) while requests still use it is stale: it leaves c->locks and
 * c->lock_ids for the list c->stale, so that no new request can find it
 * and its id cannot clash with the ids of a new session.  When its last
 * user is done it is freed, and given back first if the coordinator may
 * still hold it for this session (@give_back).
 */
typedef struct ExtlockCachedLock {
    ExtlockCacheEntry ce;       /* extent, mode, revoking, stale */
    uint64_t lock_id;
    uint64_t token;
    unsigned users;             /* requests in flight under this lock */
    bool give_back;             /* stale: unlock when the last user is done */
    uint64_t session_gen;       /* ExtlockClient.session_gen at the grant */
    QLIST_ENTRY(ExtlockCachedLock) stale_next;
    ExtlockMode revoke_mode;    /* mode the other request wants */
    ExtlockExtent revoke_ext;   /* extent the other request wants */
    int64_t revoke_ns;          /* when the first revoke arrived */
    ExtlockExtent used;         /* span requests used; empty if start==end */
    int64_t granted_ns;
    int64_t last_used_ns;
    QTAILQ_ENTRY(ExtlockCachedLock) lru; /* idle locks, oldest first */
    bool in_lru;
} ExtlockCachedLock;

typedef struct ExtlockRequest {
    ExtlockLocalReq local;      /* in ExtlockClient.active: local order */

    /* set by the caller */
    uint64_t offset;
    uint64_t length;
    ExtlockMode mode;

    /* set on success: the lock the request runs under */
    ExtlockCachedLock *lock;

    /* private to the client */
    uint64_t id;                /* protocol request id */
    Coroutine *co;
    bool queued;                /* the coordinator answered "waiting" */
    bool warned;                /* EXTENT_LOCK_WAIT_TIMEOUT sent */
    bool done;                  /* final reply received */
    int ret;
    uint64_t token;
    int64_t start_ns;           /* QEMU_CLOCK_REALTIME */
    GPtrArray *blocked_by;      /* client ids (char *) from "waiting" */
    QLIST_ENTRY(ExtlockRequest) next;
} ExtlockRequest;

typedef struct ExtlockClientStats {
    uint64_t requests;          /* lock requests sent to the coordinator */
    uint64_t grants;
    uint64_t waits;
    uint64_t total_wait_us;
    uint64_t errors;
    uint64_t cache_hits;        /* requests served by a cached lock */
    uint64_t revocations;       /* revoke messages acted on */
    uint64_t revocation_us;     /* revoke received -> lock given back */
    uint64_t revocation_max_us;
    uint64_t downgrades;
    uint64_t cache_evictions;   /* idle locks dropped for age or space */
    uint64_t reconnects;
    uint64_t lease_losses;
} ExtlockClientStats;

typedef enum ExtlockSessionState {
    EXTLOCK_SESSION_ACTIVE,
    EXTLOCK_SESSION_RECONNECTING,
    EXTLOCK_SESSION_RECLAIMING,
    EXTLOCK_SESSION_LEASE_LOST,
} ExtlockSessionState;

typedef struct ExtlockClientOptions {
    bool cache;                 /* keep locks after requests complete */
    uint32_t cache_size;        /* max idle cached locks */
    uint32_t cache_idle_ms;     /* drop idle locks unused this long */
    uint32_t min_hold_us;       /* keep a new lock at least this long */
    uint64_t grow_limit;        /* end of the range locks may grow into */
    bool lease_loss_error;      /* on-lease-loss=error (else queue) */
    bool stuck_io_exit;         /* on-stuck-io=exit (else report) */
    uint32_t lease_loss_timeout_ms;
    uint32_t wait_warning_ms;   /* 0: no EXTENT_LOCK_WAIT_TIMEOUT */
} ExtlockClientOptions;

typedef struct ExtlockClient {
    AioContext *ctx;
    SocketAddress *addr;
    char *address;              /* for messages: "unix:/path" */
    char *client_id;
    char *lock_space;
    char *node_name;            /* for events and messages */
    QCryptoTLSCreds *tls_creds; /* NULL: plain connection */
    char *tls_hostname;         /* name to verify; NULL: CA only */
    uint32_t lease_ms_wanted;   /* 0: the coordinator's default */
    ExtlockClientOptions opts;

    /* session */
    ExtlockSessionState state;
    int fd;                     /* -1 while disconnected */
    QIOChannelSocket *sioc;     /* the socket, for its fd */
    QIOChannel *ioc;            /* all I/O: the TLS channel or @sioc */
    char *session;
    char *resume_secret;        /* from our welcome; resumes need it */
    uint64_t epoch;
    uint32_t lease_ms;
    int64_t lease_deadline_ns;  /* QEMU_CLOCK_REALTIME, margin included */
    uint32_t fence_margin_ms;   /* the coordinator's, from "welcome" */
    uint64_t session_gen;       /* bumped whenever a new session starts */
    bool closing;

    /* wire */
    ExtlockLineBuf in;
    GString *out;
    size_t out_done;            /* bytes of @out already written */
    uint64_t next_id;
    GHashTable *pending;        /* id -> ExtlockRequest awaiting a reply */

    /* timers and background work */
    QEMUTimer *renew_timer;
    uint64_t renew_id;          /* outstanding renew, 0 if none */
    int64_t renew_sent_ns;
    QEMUTimer *tick_timer;      /* lease deadline, slow waiters */
    Coroutine *reconnect_co;
    QemuCoSleep reconnect_sleep;

    /* requests forwarded to the child (in-flight bound, on-stuck-io) */
    uint64_t io_in_flight;
    QEMUTimer *stuck_timer;     /* one-shot, at the in-flight bound */
    bool stuck_reported;
    bool no_lease_io_reported;  /* "failing I/O" said since the lease loss */

    /* requests and locks (extlock-locks.c) */
    QLIST_HEAD(, ExtlockRequest) waiting; /* requests not granted yet */
    GPtrArray *grant_waiters;   /* coroutines waiting for our own grants */
    ExtlockITree active;        /* requests between lock and unlock */
    uint64_t next_seq;
    GPtrArray *local_waiters;   /* ... waiting for an earlier local one */
    bool grants_grow;           /* the last grant was larger than asked */
    GPtrArray *usable_waiters;  /* ... waiting for lease or connection */
    ExtlockITree locks;         /* ExtlockCachedLock by extent */
    GHashTable *lock_ids;       /* lock id -> ExtlockCachedLock */
    QLIST_HEAD(, ExtlockCachedLock) stale; /* stale locks still in use */
    QTAILQ_HEAD(, ExtlockCachedLock) idle; /* LRU of unused locks */
    unsigned n_idle;
    QEMUTimer *cache_timer;     /* min hold time and idle ageing */
    /* clock at the last request: one clock read per cache hit is enough */
    int64_t last_now_ns;

    ExtlockClientStats stats;
} ExtlockClient;

/*
 * Connect to @addr, say hello and start the session.  @lease_ms == 0 asks
 * for the coordinator's default lease.  With @tls_creds (client endpoint;
 * the client takes a reference) every connection is TLS, the coordinator's
 * certificate checked against @tls_hostname if not NULL.  Blocks (bounded)
 * during open only.
 */
ExtlockClient *extlock_client_new(const SocketAddress *addr,
                                  const char *client_id,
                                  const char *lock_space, uint32_t lease_ms,
                                  const ExtlockClientOptions *opts,
                                  QCryptoTLSCreds *tls_creds,
                                  const char *tls_hostname,
                                  const char *node_name, AioContext *ctx,
                                  Error **errp);
/* Say bye (releases the session's locks at once) and free; no I/O in flight */
void extlock_client_free(ExtlockClient *c);

/* New tuning options (reopen); used from the next time each is needed */
void extlock_client_set_options(ExtlockClient *c,
                                const ExtlockClientOptions *opts);

void extlock_client_detach_aio_context(ExtlockClient *c);
void extlock_client_attach_aio_context(ExtlockClient *c, AioContext *ctx);

bool extlock_client_connected(ExtlockClient *c);
/* Milliseconds until the lease deadline (negative once past) */
int64_t extlock_client_lease_remaining_ms(ExtlockClient *c);
/* May the node touch the image now (lease valid, not reclaiming)? */
bool extlock_client_lease_valid(ExtlockClient *c);
bool extlock_client_lease_valid_at(ExtlockClient *c, int64_t now);

/*
 * Get a lock covering req->offset/length in req->mode (or stronger): a
 * cached one if possible, else from the coordinator, waiting as long as it
 * queues the request.  Returns 0 with req->lock set (then
 * extlock_client_unlock() must follow), or -EIO if the coordinator refused
 * the request, or the lease is lost (per the on-lease-loss policy).
 */
int coroutine_fn extlock_client_lock(ExtlockClient *c, ExtlockRequest *req);
void extlock_client_unlock(ExtlockClient *c, ExtlockRequest *req);

/*
 * Requests forwarded to the child: call io_start before and io_done after.
 * A request still in flight when the coordinator may re-grant its locks
 * (lease deadline + client margin + fence margin, less 10 %) makes the
 * process exit (on-stuck-io=exit) or is reported (report).
 */
void extlock_client_io_start(ExtlockClient *c);
void extlock_client_io_done(ExtlockClient *c);

/* Call @fn for every lock the node holds (active, cached or stale) */
void extlock_client_foreach_lock(ExtlockClient *c,
                                 void (*fn)(ExtlockCachedLock *l, void *),
                                 void *opaque);

/*
 * Internal interface between extlock-client.c and extlock-locks.c
 */
void extlock_client_send(ExtlockClient *c, const ExtlockMsg *msg);
uint64_t extlock_client_new_id(ExtlockClient *c);

void extlock_locks_init(ExtlockClient *c);
void extlock_locks_destroy(ExtlockClient *c);
void extlock_locks_attach(ExtlockClient *c);
void extlock_locks_detach(ExtlockClient *c);
/* Messages for requests and locks; adds requests to wake to @wake */
void extlock_locks_handle(ExtlockClient *c, ExtlockRequest *req,
                          ExtlockMsg *msg, GPtrArray *wake);
/* The connection is gone: requests waiting at the coordinator retry */
void extlock_locks_disconnected(ExtlockClient *c);
/* The lease is lost: no cached lock may be used again */
void extlock_locks_lease_lost(ExtlockClient *c);
/* Session or connection state changed: let queued requests look again */
void extlock_locks_wake_usable(ExtlockClient *c);
/* A grant or "waiting" arrived: requests waiting for ours look again */
void extlock_locks_wake_grant_waiters(ExtlockClient *c);
/* Periodic: emit EXTENT_LOCK_WAIT_TIMEOUT for slow requests */
void extlock_locks_check_waiters(ExtlockClient *c, int64_t now);

/* Reconnection: what the node holds, to resume or reclaim */
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

GArray *extlock_locks_snapshot(ExtlockClient *c);
/* Resumed session: keep what the coordinator still lists, drop the rest */
void extlock_locks_resumed(ExtlockClient *c, GArray *server_locks);
/* Restarted coordinator: adopt the new ids of reclaimed locks */
void extlock_locks_reclaimed(ExtlockClient *c, GArray *reclaims);
/*
 * The coordinator dropped @lock_id (a reclaim of another session disputed
 * it): never use it again (requests in flight under it finish, bounded by
 * on-stuck-io)
 */
void extlock_locks_dropped(ExtlockClient *c, uint64_t lock_id);
/* New session: every lock is gone; returns how many */
uint64_t extlock_locks_forget_all(ExtlockClient *c);

#endif /* BLOCK_EXTLOCK_CLIENT_H */
