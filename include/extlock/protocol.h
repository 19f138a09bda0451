/*
 * extlock: the coordinator wire protocol (JSON lines) - codec and limits
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * One JSON object per line, '\n' terminated, UTF-8.  Every message has a
 * "type".  Requests (client -> server) carry an "id" (unsigned integer
 * chosen by the client); each request gets exactly one final reply with the
 * same "id" (a "lock" may get a "waiting" message first).  Notifications
 * (server -> client) carry no "id".  docs/protocol.rst is the reference.
 *
 * This file is used by extlockd, extlockctl, the benchmark and the QEMU
 * block driver, so it depends on glib and json-c only.
 */
#ifndef EXTLOCK_PROTOCOL_H
#define EXTLOCK_PROTOCOL_H

#include <glib.h>
#include "extlock/extent.h"
#include "extlock/reservation.h"

/*
 * Version 2: "welcome" hands out a "resume-secret" that "hello" must
 * present to resume a session; sessions belong to the authenticated
 * identity of the connection that created them (docs/protocol.rst)
 */
#define EXTLOCK_PROTOCOL_VERSION 2

/* Limits (documented in docs/protocol.rst) */
#define EXTLOCK_MAX_LINE        (64 * 1024) /* one message incl. '\n' */
#define EXTLOCK_MAX_REPLY_LINE  (16 * 1024 * 1024) /* ... sent to a client */
#define EXTLOCK_MAX_NAME        256         /* client-id, lock-space, session */
#define EXTLOCK_MAX_ID          INT64_MAX   /* ids and tokens are < 2^63 */
#define EXTLOCK_MIN_LEASE_MS    100
#define EXTLOCK_MAX_LEASE_MS    (3600 * 1000)
#define EXTLOCK_SECRET_LEN      64          /* resume secret: hex digits */

/*
 * A maintenance (docs/design.rst, "Metadata changes"): an exclusive lock
 * on the whole range [0, 2^63), which no data request asks for
 */
#define EXTLOCK_MAINT_OFFSET    0
#define EXTLOCK_MAINT_LENGTH    (1ULL << 63)

typedef enum ExtlockMsgType {
    EXTLOCK_MSG_INVALID = 0,
    /* client -> server requests */
    EXTLOCK_MSG_HELLO,
    EXTLOCK_MSG_LOCK,
    EXTLOCK_MSG_UNLOCK,
    EXTLOCK_MSG_CANCEL,
    EXTLOCK_MSG_RENEW,
    EXTLOCK_MSG_BYE,
    EXTLOCK_MSG_STATUS,
    EXTLOCK_MSG_RECLAIM,        /* lock reclaim after a restart */
    EXTLOCK_MSG_DOWNGRADE,      /* exclusive -> shared */
    EXTLOCK_MSG_RECLAIM_DONE,
    /* server -> client replies (carry the request's id) */
    EXTLOCK_MSG_WELCOME,
    EXTLOCK_MSG_WAITING,        /* interim reply to "lock" */
    EXTLOCK_MSG_GRANTED,
    EXTLOCK_MSG_UNLOCKED,
    EXTLOCK_MSG_CANCELLED,
    EXTLOCK_MSG_RENEWED,
    EXTLOCK_MSG_GOODBYE,
    EXTLOCK_MSG_STATUS_REPLY,
    EXTLOCK_MSG_DOWNGRADED,
    EXTLOCK_MSG_RECLAIM_COMPLETE,
    EXTLOCK_MSG_ERROR,
    /* server -> client notifications (no id) */
    EXTLOCK_MSG_REVOKE,         /* reserved: "please release this extent" */
    EXTLOCK_MSG_SESSION_EXPIRED,
    /* fencing (docs/protocol.rst, "Fencing") */
    EXTLOCK_MSG_RELEASE_SESSION,    /* admin request: force release */
    EXTLOCK_MSG_SESSION_RELEASED,   /* its reply */
    EXTLOCK_MSG_FENCE_STATUS,       /* notification to waiters */
    /* persistent reservations (docs/protocol.rst, "Persistent reservations") */
    EXTLOCK_MSG_PR_OUT,             /* request: a PERSISTENT RESERVE OUT */
    EXTLOCK_MSG_PR_RESULT,          /* its reply */
    EXTLOCK_MSG_PR_IN,              /* request: the reservation state */
    EXTLOCK_MSG_PR_STATUS,          /* its reply */
    EXTLOCK_MSG_PR_UPDATE,          /* notification: the state changed */
    EXTLOCK_MSG_PR_ACK,             /* request: update applied */
    EXTLOCK_MSG_PR_ACKED,           /* its reply */
    EXTLOCK_MSG__MAX,
} ExtlockMsgType;

typedef enum ExtlockErrorCode {
    EXTLOCK_ERR_NONE = 0,
    EXTLOCK_ERR_PARSE,          /* "parse-error": not JSON / not an object */
    EXTLOCK_ERR_LINE_TOO_LONG,  /* "line-too-long" */
    EXTLOCK_ERR_UNKNOWN_TYPE,   /* "unknown-type" */
    EXTLOCK_ERR_INVALID,        /* "invalid-argument": missing/wrong fields */
    EXTLOCK_ERR_RANGE,          /* "invalid-range": bad offset/length */
    EXTLOCK_ERR_VERSION,        /* "unsupported-version" */
    EXTLOCK_ERR_STATE,          /* "bad-state": e.g. lock before hello */
    EXTLOCK_ERR_NOT_FOUND,      /* "not-found": unknown lock/request/session */
    EXTLOCK_ERR_LIMIT,          /* "limit-exceeded": too many locks etc. */
    EXTLOCK_ERR_WOULD_BLOCK,    /* "would-block": lock with "wait": false */
    EXTLOCK_ERR_CANCELLED,      /* "cancelled": waiting lock was cancelled */
    EXTLOCK_ERR_EXPIRED,        /* "session-expired" */
    EXTLOCK_ERR_GRACE,          /* "in-grace": reserved for restart grace */
    EXTLOCK_ERR_INTERNAL,       /* "internal-error" */
    EXTLOCK_ERR_DENIED,         /* "permission-denied": identity/policy */
    EXTLOCK_ERR_RECLAIM_CONFLICT,   /* "reclaim-conflict": disputed extent */
    EXTLOCK_ERR_NOT_LEADER,     /* "not-leader": HA follower, see "leader" */
    EXTLOCK_ERR__MAX,
} ExtlockErrorCode;

/* "result" of a fence-status notification */
typedef enum ExtlockFenceResult {
    EXTLOCK_FENCE_STARTED,
    EXTLOCK_FENCE_SUCCEEDED,
    EXTLOCK_FENCE_FAILED,
    EXTLOCK_FENCE__MAX,
} ExtlockFenceResult;

/* One remaining piece after a partial unlock */
typedef struct ExtlockPiece {
    uint64_t lock;
    uint64_t offset;
    uint64_t length;
} ExtlockPiece;

/* Who keeps a waiting request from being granted */
typedef struct ExtlockBlocker {
    char *client_id;
    uint64_t offset;
    uint64_t length;
    ExtlockMode mode;
    uint64_t token;
    bool waiting;               /* an earlier waiter, not a holder */
} ExtlockBlocker;

/* A lock of a resumed session, listed in "welcome" */
typedef struct ExtlockLockInfo {
    uint64_t lock;
    uint64_t offset;
    uint64_t length;
    ExtlockMode mode;
    uint64_t token;
} ExtlockLockInfo;

/*
 * A decoded message.  Which fields are meaningful depends on @type (see
 * docs/protocol.rst); the codec validates exactly those.
 */
typedef struct ExtlockMsg {
    ExtlockMsgType type;
    bool has_id;
    uint64_t id;

    /* hello, welcome */
    uint32_t version;
    char *client_id;
    char *lock_space;
    char *session;              /* hello: optional, resume this session */
    uint32_t lease_ms;          /* hello: optional (0 = server default) */
    uint64_t epoch;             /* welcome */
    char *server;               /* welcome: software name and version */

    /* lock, granted, waiting, unlock (optional extent), reclaim, revoke */
    bool has_extent;
    uint64_t offset;
    uint64_t length;
    ExtlockMode mode;
    bool wait;                  /* lock: default true */
    uint64_t lock;              /* lock id */
    uint64_t token;             /* fencing token */
    uint64_t request;           /* cancel: id of the lock request */

    GArray *pieces;             /* unlocked: ExtlockPiece, may be NULL */
    GArray *blockers;           /* waiting: ExtlockBlocker, may be NULL */
    GArray *locks;              /* welcome: ExtlockLockInfo, may be NULL */

    /* error */
    ExtlockErrorCode error;
    char *message;

    /* status reply: the whole object, owned (json_object *) */
    void *body;

    /* lock: optional range the granted extent may grow into */
    bool has_limit;
    uint64_t limit_offset;
    uint64_t limit_length;

    /* welcome after hello with "session" (see docs/protocol.rst) */
    bool resumed;               /* same session, locks intact */
    bool reclaim;               /* coordinator restarted: reclaim locks */
    uint64_t grace_remaining_ms;
    /* welcome "locks": see the "locks" member above */

    /*
     * welcome: the coordinator's fence margin; old coordinators omit it
     * (has_fence_margin false, and a client then assumes 0)
     */
    bool has_fence_margin;
    uint32_t fence_margin_ms;

    /*
     * fence-status: "lock-space", "client-id" (the expired session's
     * client), "session-client" (the same client, optional), "session"
     * (its id, optional), "result", "message" (optional)
     */
    char *session_client;
    ExtlockFenceResult fence_result;

    /*
     * release-session: "session" (and optional "message" as the reason);
     * session-released: "session" and "released" (locks released)
     */
    uint64_t released;

    /*
     * Version 2.  welcome: the session's resume secret (EXTLOCK_SECRET_LEN
     * hex digits) and the identity the coordinator authenticated; hello
     * with "session": the secret from that session's welcome.
     */
    char *resume_secret;
    char *identity;

    /* error "not-leader": the leader's client address, optional */
    char *leader;

    /*
     * Persistent reservations.  pr-out: "action" (pr_action), "pr-type"
     * (the CDB's TYPE field, 0..15), "key", "sa-key" (16 hex digits at
     * most), "aptpl", "request" (pr_request, optional, 0: none; a
     * retry with the same one is answered, not applied again).
     * pr-result: "result" (pr_result), "generation", "seq".
     * pr-update, pr-status: "seq" and the state in *pr (owned).
     * pr-ack, pr-acked: "seq".
     */
    ExtlockPrAction pr_action;
    uint32_t pr_type;
    uint64_t pr_key;
    uint64_t pr_sa_key;
    bool aptpl;
    uint64_t pr_request;
    ExtlockPrStatus pr_result;
    uint32_t pr_generation;
    uint64_t pr_seq;
    ExtlockPrState *pr;

    /*
     * unlock of a maintenance lock: the image file's new length, announced
     * to the other hosts.  granted, once the lock-space has had a
     * maintenance: how many it has had, and the length last announced.
     * Optional.
     */
    bool has_maint_size;
    uint64_t maint_size;
    bool has_maint_gen;
    uint64_t maint_gen;
} ExtlockMsg;

/* A lock listed in "welcome" when a session is resumed */
typedef ExtlockLockInfo ExtlockHeldLock;

typedef struct ExtlockProtoError {
    ExtlockErrorCode code;
    char message[256];
} ExtlockProtoError;

const char *extlock_msg_type_name(ExtlockMsgType type);
const char *extlock_fence_result_name(ExtlockFenceResult result);
const char *extlock_error_code_name(ExtlockErrorCode code);
ExtlockErrorCode extlock_error_code_from_name(const char *name);

void extlock_msg_init(ExtlockMsg *msg, ExtlockMsgType type);
/* Free everything the message owns and reset it to EXTLOCK_MSG_INVALID */
void extlock_msg_clear(ExtlockMsg *msg);

/*
 * Decode and validate one line (without its '\n', @len bytes, need not be
 * NUL-terminated).  On failure returns false, fills @err, and leaves
 * msg->has_id/msg->id set if the id could be read, so that the error reply
 * can carry it; msg holds nothing else to free.
 */
bool extlock_msg_parse(const char *line, size_t len, ExtlockMsg *msg,
                       ExtlockProtoError *err);

/* Append @msg as one JSON line (with '\n') to @out */
void extlock_msg_format(const ExtlockMsg *msg, GString *out);

/* Convenience: append an error reply */
void extlock_format_error(GString *out, bool has_id, uint64_t id,
                          ExtlockErrorCode code, const char *fmt, ...)
    G_GNUC_PRINTF(5, 6);

/*
 * Splitting a byte stream into lines with a bounded line length.
 * Feed bytes with extlock_linebuf_append(), then take lines with
 * extlock_linebuf_next() until it returns EXTLOCK_LINE_NONE.
 */
typedef struct ExtlockLineBuf {
    GByteArray *buf;
    size_t pos;                 /* start of the unconsumed data */
    bool discarding;            /* skipping the rest of an oversized line */
    size_t max_line;            /* longest line accepted, incl. '\n' */
} ExtlockLineBuf;

typedef enum ExtlockLineResult {
    EXTLOCK_LINE_NONE,          /* no complete line buffered */
    EXTLOCK_LINE_OK,            /* *line, *len is a line (without '\n') */
    EXTLOCK_LINE_TOO_LONG,      /* a line over the limit was dropped */
} ExtlockLineResult;

/* Lines up to EXTLOCK_MAX_LINE: what the coordinator accepts */
void extlock_linebuf_init(ExtlockLineBuf *lb);
/*
 * Lines up to @max_line bytes: clients reading the coordinator's replies
 * use EXTLOCK_MAX_REPLY_LINE (a resumed session's welcome lists its locks)
 */
void extlock_linebuf_init_max(ExtlockLineBuf *lb, size_t max_line);
void extlock_linebuf_destroy(ExtlockLineBuf *lb);
void extlock_linebuf_append(ExtlockLineBuf *lb, const void *data, size_t len);
/* The returned line stays valid until the next append */
ExtlockLineResult extlock_linebuf_next(ExtlockLineBuf *lb, const char **line,
                                       size_t *len);

#endif /* EXTLOCK_PROTOCOL_H */
