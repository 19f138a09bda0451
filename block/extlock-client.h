/*
 * extlock: non-blocking coordinator client for the extlock block filter
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * One client (one coordinator connection and session) per extlock node.
 * Everything runs in the node's AioContext: the socket is served by an
 * AioContext fd handler, requests wait in coroutines, and the lease is
 * renewed by an AioContext timer.  Nothing here blocks the I/O thread,
 * except connecting and the handshake at open time.
 */
#ifndef BLOCK_EXTLOCK_CLIENT_H
#define BLOCK_EXTLOCK_CLIENT_H

#include "qapi/qapi-types-sockets.h"
#include "io/channel-socket.h"
#include "qemu/coroutine.h"
#include "qemu/queue.h"
#include "qemu/timer.h"
#include "block/aio.h"
#include "extlock/protocol.h"

typedef struct ExtlockRequest {
    /* set by the caller */
    uint64_t offset;
    uint64_t length;
    ExtlockMode mode;

    /* private to the client */
    uint64_t id;                /* protocol request id */
    Coroutine *co;
    bool queued;                /* the coordinator answered "waiting" */
    bool done;                  /* final reply received */
    bool granted;
    int ret;
    uint64_t lock_id;
    uint64_t token;
    int64_t start_ns;           /* QEMU_CLOCK_REALTIME */
    int64_t grant_ns;
    GPtrArray *blocked_by;      /* client ids (char *) from "waiting" */
    QLIST_ENTRY(ExtlockRequest) next;
} ExtlockRequest;

typedef struct ExtlockClientStats {
    uint64_t requests;
    uint64_t grants;
    uint64_t waits;
    uint64_t total_wait_us;
    uint64_t errors;
} ExtlockClientStats;

typedef struct ExtlockClient {
    AioContext *ctx;
    char *address;              /* for messages: "unix:/path" */
    char *client_id;
    char *lock_space;
    const char *node_name;      /* for trace/error messages */

    int fd;                     /* -1 once the connection is gone */
    QIOChannelSocket *sioc;
    char *session;
    uint64_t epoch;
    uint32_t lease_ms;

    ExtlockLineBuf in;
    GString *out;
    size_t out_done;            /* bytes of @out already written */

    uint64_t next_id;
    GHashTable *pending;        /* id -> ExtlockRequest awaiting a reply */
    QLIST_HEAD(, ExtlockRequest) requests; /* waiting or holding */

    QEMUTimer *renew_timer;
    uint64_t renew_id;          /* outstanding renew, 0 if none */
    int64_t renew_sent_ns;
    int64_t lease_deadline_ns;  /* QEMU_CLOCK_REALTIME */

    ExtlockClientStats stats;
} ExtlockClient;

/*
 * Connect to @addr, say hello and start the session.  @lease_ms == 0 asks
 * for the coordinator's default lease.  Blocks (bounded) during open only.
 */
ExtlockClient *extlock_client_new(const SocketAddress *addr,
                                  const char *client_id,
                                  const char *lock_space, uint32_t lease_ms,
                                  const char *node_name, AioContext *ctx,
                                  Error **errp);
/* Say bye (releases the session's locks at once) and free. No I/O in flight. */
void extlock_client_free(ExtlockClient *c);

void extlock_client_detach_aio_context(ExtlockClient *c);
void extlock_client_attach_aio_context(ExtlockClient *c, AioContext *ctx);

bool extlock_client_connected(ExtlockClient *c);
/* Milliseconds until the lease deadline (negative once past) */
int64_t extlock_client_lease_remaining_ms(ExtlockClient *c);

/*
 * Take the lock described by req->offset/length/mode, waiting as long as
 * the coordinator queues it.  Returns 0 (then extlock_client_unlock() must
 * follow) or -EIO if the coordinator refused or is unreachable, or the
 * lease has expired.
 */
int coroutine_fn extlock_client_lock(ExtlockClient *c, ExtlockRequest *req);
void extlock_client_unlock(ExtlockClient *c, ExtlockRequest *req);

#endif /* BLOCK_EXTLOCK_CLIENT_H */
