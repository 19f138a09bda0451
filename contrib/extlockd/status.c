/*
 * extlockd: status
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The "status" request: counters, lock-spaces with their locks and
 * waiting requests, and sessions, as JSON; what non-admins may see; and
 * the limits that keep big status replies from delaying renewals (a rate
 * per connection, entries per reply, and a server-wide budget).
 */
#include <string.h>
#include <glib.h>
#include <json-c/json.h>

#include "ha.h"
#include "server-int.h"

/* overlapping locks looked at per waiter for "blocked-by" in status */
#define STATUS_BLOCKER_VISITS   256

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
    /* 2^63 for a maintenance lock (the whole range) */
    json_object_object_add(o, "length", json_object_new_uint64(
                               lock->node.ext.end - lock->node.ext.start));
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
    status_add_int(o, "sessions", space->nsessions);
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
    if (space->maint_gen) {
        json_object *maint = json_object_new_object();

        status_add_int(maint, "generation", space->maint_gen);
        status_add_int(maint, "size", space->maint_size);
        json_object_object_add(o, "maintenance", maint);
    }
    status_add_int(o, "grace-remaining-ms", lockspace_grace_remaining_ms(space,
                                                                         now));
    reservation_status(space->server, space->name, o);
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
    if (session->pr_subscribed) {
        /* the last persistent reservation change it acknowledged */
        status_add_int(o, "pr-acked", session->pr_acked);
    }
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
    status_add_int(counters, "lock-spaces", g_hash_table_size(server->spaces));
    status_add_int(counters, "reservation-states", reservation_count(server));
    status_add_int(counters, "dropped-after-hangup", server->gone_dropped);
    json_object_object_add(root, "counters", counters);
    if (server->ha) {
        json_object_object_add(root, "cluster", extlockd_ha_status(server->ha));
    }
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
    /* Histograms and per-client counts (metrics.c): admins only */
    json_object_object_add(root, "metrics", metrics_status_json(server));
    return root;
}

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
    return MIN(server->status_budget,
               admin ? EXTLOCKD_STATUS_MAX_ENTRIES_ADMIN
                     : EXTLOCKD_STATUS_MAX_ENTRIES);
}

void status_handle(ExtlockdConn *conn, ExtlockdSession *session, ExtlockMsg *m)
{
    ExtlockdServer *server = conn->server;
    bool admin = extlockd_policy_is_admin(server->policy, conn->identity);
    bool idle = conn->out_pos == conn->out->len;
    ExtlockMsg r;
    size_t before;
    uint64_t limit, granted;

    /* dispatch.c: @session is not NULL unless @conn is an admin's */
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
