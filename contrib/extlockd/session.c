/*
 * extlockd: sessions and leases
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The session table: "hello" (new sessions, resume with the resume
 * secret, reclaim after a restart), "renew", "bye" and the admin's
 * "release-session"; resume secrets (only their SHA-256 reaches the
 * state file); welcomes that wait until the state file has the session;
 * detaching from a dropped connection; lease expiry and the fence margin
 * (session_check_leases() for the timer); handing an expired session
 * holding locks to the fence agent (fence.h); and recreating the
 * sessions of the state file after a restart.
 */
#include <inttypes.h>
#include <string.h>
#include <sys/random.h>
#include <glib.h>
#include <gnutls/gnutls.h>
#include <gnutls/crypto.h>

#include "ha.h"
#include "server-int.h"
#include "state-file.h"

const char *const session_state_names[] = {
    [SESSION_ACTIVE] = "active",
    [SESSION_DISCONNECTED] = "disconnected",
    [SESSION_EXPIRED] = "expired",
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

void session_log_event(ExtlockdSession *session, const char *event,
                       const char *message)
{
    ExtlockdEvent ev = {
        .event = event,
        .lock_space = session->space->name,
        .client_id = session->client_id,
        .session = session->id,
        .message = message,
    };

    metrics_session_event(session->server, event);
    if (session->server->event_log) {
        extlockd_event_log_write(session->server->event_log, &ev);
    }
}

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

ExtlockLock *session_find_waiting(ExtlockdSession *session, uint64_t req)
{
    ExtlockLock key;

    if (g_hash_table_size(session->waiting) == 0) {
        return NULL;
    }
    key.user_tag = req;
    return g_hash_table_lookup(session->waiting, &key);
}

bool session_wants_revokes(ExtlockdSession *session)
{
    return session->revocable && session->conn && !session->releasing;
}

void session_set_revocable(ExtlockdSession *session)
{
    if (!session->revocable) {
        session->revocable = true;
        session->space->nrevocable++;
    }
}

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

void session_free(ExtlockdSession *session)
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
void session_end_reclaim(ExtlockdSession *session)
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
void session_destroy_nosave(ExtlockdSession *session)
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
    reservation_check_later(server);
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
        if (lockspace_is_maint(locks->pdata[i])) {
            /* Its owner died during it: the others reread what is there */
            lockspace_maint_done(session->space, false, 0);
        }
        extlock_table_release(table, locks->pdata[i]);
    }
    session->releasing = false;
    return locks->len;
}

/*
 * The peer of the session's connection is gone (a hangup while its input
 * was paused, or a write that failed): its waiting requests are cancelled
 * now, before the lines it sent last are applied, so that a release among
 * them cannot grant one of them to nobody.  It is detached when the
 * connection is destroyed, at the end of those lines.
 */
void session_peer_gone(ExtlockdSession *session)
{
    session_release(session, false);
}

/* The session's connection dropped without "bye" */
void session_detach(ExtlockdSession *session)
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
                                 ExtlockFenceResult result, const char *message)
{
    g_autoptr(GHashTable) waiters = g_hash_table_new(NULL, NULL);
    GHashTableIter iter;
    gpointer key;
    ExtlockMsg r;

    g_hash_table_iter_init(&iter, session->held);
    while (g_hash_table_iter_next(&iter, &key, NULL)) {
        extlock_table_foreach_conflict_state(session->space->table, key,
                                             EXTLOCK_LOCK_WAITING,
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
                  session->space->name, extlockd_fence_attempts(f), message,
                  g_hash_table_size(session->held), extlockd_fence_retry_ms(f),
                  session->id);
        session_log_event(session, "fence-failed", message);
        session_fence_notify(session, EXTLOCK_FENCE_FAILED, message);
        break;
    }
    conn_flush_all(server);
}

void session_fence_start(ExtlockdSession *session)
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
void session_expire(ExtlockdSession *session)
{
    session_expire_because(session, "lease expired without renewal");
}

void session_expire_because(ExtlockdSession *session, const char *why)
{
    ExtlockdServer *server = session->server;
    ExtlockdConn *conn = session->conn;

    if (session->state == SESSION_ACTIVE) {
        ExtlockMsg r;

        g_warning("session %s (%s, lock-space %s) expired (%s, lease "
                  "%u ms); its %u locks are released after the "
                  "%u ms fence margin", session->id, session->client_id,
                  session->space->name, why, session->lease_ms,
                  g_hash_table_size(session->held),
                  server->cfg.fence_margin_ms);
        extlock_msg_init(&r, EXTLOCK_MSG_SESSION_EXPIRED);
        r.session = session->id;
        r.message = (char *)why;
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
    /* pr-outs waiting for its acknowledgement go on */
    reservation_check_later(server);
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

/*
 * The lease timer: expire the sessions whose lease lapsed and end those
 * whose fence margin has passed too.  Returns the next such deadline
 * (INT64_MAX: none).
 */
int64_t session_check_leases(ExtlockdServer *server, int64_t now)
{
    int64_t margin_us = server->cfg.fence_margin_ms * 1000LL;
    int64_t next = INT64_MAX;
    GList *l, *lnext;

    for (l = server->session_list.head; l; l = lnext) {
        ExtlockdSession *session = l->data;

        lnext = l->next;
        if (session->state != SESSION_EXPIRED && session->conn &&
            session->conn->awaiting_state && !session->reclaiming &&
            g_hash_table_size(session->held) == 0) {
            /*
             * A new session whose welcome waits for the state file holds
             * nothing, and its client could not renew yet: its lease
             * starts again at the welcome (session_state_written).  The
             * client counts from its hello, earlier: still safe.
             */
            continue;
        }
        if (session->maint_deadline_us) {
            lockspace_check_maint(session, now);
            if (session->maint_deadline_us) {
                next = MIN(next, session->maint_deadline_us);
            }
        }
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
    return next;
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
                                 ExtlockdSession *session, WelcomeKind kind)
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
    reservation_welcomed(session);
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
                                         uint32_t lease_ms, int64_t now)
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

/* HA follower (or a leader still taking office): name the leader */
static void session_send_not_leader(ExtlockdConn *conn, ExtlockMsg *m)
{
    g_autofree char *leader = extlockd_ha_leader_address(conn->server->ha);
    ExtlockMsg r;

    conn->server->nerrors++;
    extlock_msg_init(&r, EXTLOCK_MSG_ERROR);
    r.has_id = m->has_id;
    r.id = m->id;
    r.error = EXTLOCK_ERR_NOT_LEADER;
    r.leader = leader && !extlockd_ha_leading(conn->server->ha) ? leader
                                                                : NULL;
    r.message = r.leader ? g_strdup_printf("this coordinator is not the "
                                           "leader; the leader is at %s",
                                           r.leader)
                         : g_strdup("this coordinator is not the leader, "
                                    "and no leader is known yet: try the "
                                    "others, or again");
    conn_send_msg(conn, &r);
    g_free(r.message);
}

void session_handle_hello(ExtlockdConn *conn, ExtlockdSession *attached,
                          ExtlockMsg *m)
{
    ExtlockdServer *server = conn->server;
    ExtlockdSession *session;
    int64_t now = g_get_monotonic_time();
    g_autofree char *why = NULL;
    uint32_t lease_ms;

    if (attached) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_STATE,
                        "this connection already has session %s",
                        attached->id);
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
    if (server->ha && !server->leading) {
        session_send_not_leader(conn, m);
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
                               session->id, session->client_id,
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
                  conn->peer, lease_ms, m->session);
    } else {
        g_message("session %s (%s, lock-space %s) started on %s by %s, "
                  "lease %u ms", session->id, session->client_id,
                  session->space->name, conn->peer, conn->identity, lease_ms);
    }
}

void session_handle_renew(ExtlockdConn *conn, ExtlockdSession *session,
                          ExtlockMsg *m)
{
    ExtlockMsg r;

    session->deadline_us = g_get_monotonic_time() +
                           (int64_t)session->lease_ms * 1000;
    extlock_msg_init(&r, EXTLOCK_MSG_RENEWED);
    r.has_id = m->has_id;
    r.id = m->id;
    r.lease_ms = session->lease_ms;
    if (session->space->maint_gen) {
        /* An idle client learns of a maintenance within a renewal */
        r.has_maint_gen = true;
        r.maint_gen = lockspace_maint_gen(session->space);
    }
    conn_send_msg(conn, &r);
}

void session_handle_bye(ExtlockdConn *conn, ExtlockdSession *session,
                        ExtlockMsg *m)
{
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
void session_handle_release(ExtlockdConn *conn, ExtlockdSession *attached,
                            ExtlockMsg *m)
{
    ExtlockdServer *server = conn->server;
    ExtlockdSession *session = g_hash_table_lookup(server->sessions,
                                                   m->session);
    g_autofree char *fence = NULL;
    ExtlockMsg r;
    unsigned n;

    /* Only admins get here (dispatch.c) */
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

void session_abort(ExtlockdSession *session, const char *why)
{
    ExtlockdConn *conn = session->conn;
    unsigned n;

    if (conn) {
        ExtlockMsg r;

        extlock_msg_init(&r, EXTLOCK_MSG_SESSION_EXPIRED);
        r.session = session->id;
        r.message = (char *)why;
        conn_send_msg(conn, &r);
        conn->session = NULL;
        session->conn = NULL;
        conn_close_after_flush(conn);
    }
    session->state = SESSION_EXPIRED;
    session_log_event(session, "abort", why);
    extlockd_fence_cancel(session->fence);
    session->fence = NULL;
    n = session_release(session, true);
    g_warning("session %s (%s, lock-space %s) ended: %s; released %u locks",
              session->id, session->client_id, session->space->name, why, n);
    session_destroy(session);
}

/* The writer is done with generation @gen: send the waiting welcomes */
void session_state_written(uint64_t gen, bool ok, const char *error,
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
        if (!conn || conn->serial != dw->conn_serial || conn->peer_gone) {
            /*
             * Gone meanwhile (or its peer is: no new lease for a client
             * that cannot use it): it never learnt of it.  A reclaim whose
             * new secret was not saved keeps the old one, which is.
             */
            if (session && !ok && dw->reclaim) {
                memcpy(session->secret_sha256, dw->old_sha256,
                       sizeof(session->secret_sha256));
                session->secret[0] = '\0';
            }
            g_free(dw);
            continue;
        }
        conn->awaiting_state = false;
        extlock_msg_init(&m, EXTLOCK_MSG_HELLO);
        m.has_id = dw->has_id;
        m.id = dw->id;
        if (ok) {
            if (!dw->reclaim) {
                /* Its lease starts now at the latest (see the lease timer) */
                session->deadline_us = MAX(session->deadline_us,
                                           g_get_monotonic_time() +
                                           session->lease_ms * 1000LL);
                server_schedule(server, session->deadline_us);
            }
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
    reservation_state_written(server, gen, ok);
    conn_flush_all(server);
}
