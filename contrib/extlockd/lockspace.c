/*
 * extlockd: lock-spaces
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * One ExtlockTable per lock-space name, and the requests on it: "lock"
 * (granted at once, waiting, or deferred during the grace period),
 * "unlock" (whole or in part), "cancel", "downgrade", "reclaim" and
 * "reclaim-done"; grants of waiting requests; revocation of cached
 * locks; and the restart grace period with its reclaim disputes.
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
#include <inttypes.h>
#include <string.h>
#include <glib.h>
#include <json-c/json.h>

#include "server-int.h"
#include "state-file.h"

#define MAX_BLOCKERS        64          /* listed in a "waiting" reply */

/* @event for @lock of its owner; @part: the released part, or NULL */
void lockspace_log_lock(ExtlockdServer *server, const char *event,
                        ExtlockLock *lock, const ExtlockExtent *part)
{
    ExtlockdSession *session = lock->owner;
    ExtlockdEvent ev = {
        .event = event,
        .lock_space = session->space->name,
        .client_id = session->client_id,
        .session = session->id,
        .has_lock = true,
        .lock = lock->id,
        .token = lock->token,
        .offset = part ? part->start : lock->node.ext.start,
        .length = part ? part->end - part->start
                       : lock->node.ext.end - lock->node.ext.start,
        .mode = lock->mode,
    };

    metrics_lock_event(server, event, lock, part);
    if (server->event_log) {
        extlockd_event_log_write(server->event_log, &ev);
    }
}

/*
 * What was asked for, as dispatch_permitted() classifies it: a lock that
 * grew into the whole space (its limit allowed it) is no maintenance
 */
bool lockspace_is_maint(const ExtlockLock *lock)
{
    return lock->mode == EXTLOCK_MODE_EXCLUSIVE &&
           lock->requested.start == EXTLOCK_MAINT_OFFSET &&
           lock->requested.end - lock->requested.start ==
           EXTLOCK_MAINT_LENGTH;
}

static void lockspace_send_granted(ExtlockdConn *conn, ExtlockLock *lock)
{
    ExtlockdLockSpace *space = ((ExtlockdSession *)lock->owner)->space;
    ExtlockMsg r;

    extlock_msg_init(&r, EXTLOCK_MSG_GRANTED);
    r.has_id = true;
    r.id = lock->user_tag;
    r.lock = lock->id;
    r.token = lock->token;
    r.offset = lock->node.ext.start;
    r.length = lock->node.ext.end - lock->node.ext.start;
    r.mode = lock->mode;
    if (space->maint_gen) {
        /* A client that sees it change rereads the image's metadata */
        r.has_maint_gen = true;
        r.maint_gen = lockspace_maint_gen(space);
        r.has_maint_size = space->has_maint_size;
        r.maint_size = space->maint_size;
    }
    conn_send_msg(conn, &r);
}

/*
 * Maintenance (docs/design.rst, "Metadata changes"): an exclusive lock on
 * the whole range, so it waits until every other host has given back its
 * locks, which it does once the requests using them are done (that is
 * the quiesce); and no later request is granted before it is over.  A
 * host that keeps a lock longer than its lease while a maintenance waits
 * cannot be trusted to have stopped: it is expired like a host whose
 * lease lapsed, so its locks go after the fence agent or its lease plus
 * fence margin.
 */
static void lockspace_maint_holder_cb(ExtlockLock *other, void *opaque)
{
    ExtlockLock *maint = opaque;
    ExtlockdSession *session = other->owner;
    int64_t deadline;

    if (other->state != EXTLOCK_LOCK_GRANTED ||
        session->state != SESSION_ACTIVE || session->maint_deadline_us) {
        return;
    }
    deadline = g_get_monotonic_time() + (int64_t)session->lease_ms * 1000;
    session->maint_deadline_us = deadline;
    session->maint_token = maint->token;
    server_schedule(session->server, deadline);
}

typedef struct MaintWaiters {
    uint64_t token;             /* the maintenance the deadline was for */
    bool same;                  /* ... still waits for a lock we hold */
    ExtlockLock *other;         /* another maintenance waiting for one */
} MaintWaiters;

static void lockspace_maint_waiter_cb(ExtlockLock *other, void *opaque)
{
    MaintWaiters *w = opaque;

    if (other->state == EXTLOCK_LOCK_WAITING && lockspace_is_maint(other)) {
        if (other->token == w->token) {
            w->same = true;
        } else if (!w->other || other->token < w->other->token) {
            w->other = other;
        }
    }
}

void lockspace_check_maint(ExtlockdSession *session, int64_t now)
{
    ExtlockTable *table = session->space->table;
    MaintWaiters w = { .token = session->maint_token };
    GHashTableIter it;
    gpointer key;

    if (!session->maint_deadline_us || now < session->maint_deadline_us) {
        return;
    }
    session->maint_deadline_us = 0;
    if (session->state != SESSION_ACTIVE) {
        return;     /* expired already: the lease rule applies */
    }
    g_hash_table_iter_init(&it, session->held);
    while (!w.same && g_hash_table_iter_next(&it, &key, NULL)) {
        extlock_table_foreach_conflict_state(table, key, EXTLOCK_LOCK_WAITING,
                                             lockspace_maint_waiter_cb, &w);
    }
    if (!w.same) {
        if (w.other) {
            /* That maintenance is over; the next one gets its own time */
            session->maint_deadline_us = now +
                                         (int64_t)session->lease_ms * 1000;
            session->maint_token = w.other->token;
            server_schedule(session->server, session->maint_deadline_us);
        }
        return;
    }
    g_warning("session %s (%s, lock-space %s) kept its locks for %u ms (its "
              "lease) while a maintenance waited for them: expiring it",
              session->id, session->client_id, session->space->name,
              session->lease_ms);
    session_log_event(session, "maintenance-timeout", NULL);
    session_expire(session);
}

/*
 * The maintenance count as clients see it: with the epoch in which it was
 * last counted.  The count and that epoch are kept in the state file, so
 * that a restart changes neither and no host rereads for nothing; a
 * maintenance that may have been running when the coordinator stopped is
 * counted at the next start, in the new epoch (lockspace_maint_load), a
 * value no host has seen.
 */
uint64_t lockspace_maint_gen(ExtlockdLockSpace *space)
{
    return ((space->maint_epoch & 0x7fffffff) << 32) |
           (space->maint_gen & 0xffffffff);
}

/*
 * A maintenance lock is about to be granted: its owner may change the
 * metadata from then on.  The state file must say so before the grant is
 * sent, so that a restart before the count is written counts it anyway
 * (lockspace_maint_load).  False, with nothing changed, if the state file
 * cannot record it (disk full, I/O error): the lock must not be granted.
 */
static bool lockspace_maint_record(ExtlockdLockSpace *space, GError **errp)
{
    bool was_pending = space->maint_pending;

    space->maint_pending = true;
    if (!server_save_state(space->server, space->server->epoch, errp)) {
        space->maint_pending = was_pending;
        return false;
    }
    return true;
}

static void lockspace_maint_refuse(ExtlockdConn *conn, uint64_t id,
                                   const char *space, const GError *err)
{
    conn_send_error(conn, true, id, EXTLOCK_ERR_INTERNAL,
                    "lock-space %s: cannot record the maintenance in the "
                    "state file (%s): not granted", space, err->message);
}

typedef struct MaintUnrecorded {
    char *space;
    uint64_t lock;
    char *error;
} MaintUnrecorded;

static void maint_unrecorded_free(MaintUnrecorded *u)
{
    g_free(u->space);
    g_free(u->error);
    g_free(u);
}

/*
 * Release the maintenance locks granted by the table that the state file
 * could not record, and tell their owners (no longer held: it was never
 * announced, nor logged as granted).  Called after each request
 * (dispatch_line), so the table never shows such a lock to the next one,
 * and from a high-priority idle source for grants made by timers.
 */
void lockspace_maint_undo(ExtlockdServer *server)
{
    MaintUnrecorded *u;

    g_clear_handle_id(&server->maint_unrecorded_src, g_source_remove);
    while ((u = g_queue_pop_head(&server->maint_unrecorded)) != NULL) {
        ExtlockdLockSpace *space = g_hash_table_lookup(server->spaces,
                                                       u->space);
        ExtlockLock *lock = space ? extlock_table_lookup(space->table,
                                                         u->lock) : NULL;

        if (lock && lock->state == EXTLOCK_LOCK_GRANTED &&
            lockspace_is_maint(lock)) {
            ExtlockdSession *session = lock->owner;

            if (session->conn) {
                conn_send_error(session->conn, true, lock->user_tag,
                                EXTLOCK_ERR_INTERNAL,
                                "lock-space %s: cannot record the "
                                "maintenance in the state file (%s): not "
                                "granted", space->name, u->error);
            }
            g_hash_table_remove(session->held, lock);
            extlock_table_release(space->table, lock);
        }
        maint_unrecorded_free(u);
    }
}

static gboolean lockspace_maint_unrecorded_cb(gpointer opaque)
{
    ExtlockdServer *server = opaque;

    server->maint_unrecorded_src = 0;
    lockspace_maint_undo(server);
    conn_flush_all(server);     /* the end of a main loop callback */
    return G_SOURCE_REMOVE;
}

/* The table granted a maintenance lock that cannot be recorded: undo it */
static void lockspace_maint_unrecorded(ExtlockdLockSpace *space,
                                       ExtlockLock *lock, const GError *err)
{
    ExtlockdServer *server = space->server;
    MaintUnrecorded *u = g_new0(MaintUnrecorded, 1);

    g_warning("lock-space %s: a maintenance lock cannot be recorded in the "
              "state file (%s): not granted", space->name, err->message);
    u->space = g_strdup(space->name);
    u->lock = lock->id;
    u->error = g_strdup(err->message);
    g_queue_push_tail(&server->maint_unrecorded, u);
    if (!server->maint_unrecorded_src) {
        /* Before any socket is served again (not starved by them) */
        server->maint_unrecorded_src =
            g_idle_add_full(G_PRIORITY_HIGH, lockspace_maint_unrecorded_cb,
                            server, NULL);
    }
}

void lockspace_maint_unrecorded_free(ExtlockdServer *server)
{
    if (server->maint_unrecorded_src) {
        g_source_remove(server->maint_unrecorded_src);
        server->maint_unrecorded_src = 0;
    }
    g_queue_clear_full(&server->maint_unrecorded,
                       (GDestroyNotify)maint_unrecorded_free);
}

/* A maintenance lock is gone: every host rereads the metadata */
void lockspace_maint_done(ExtlockdLockSpace *space, bool has_size,
                          uint64_t size)
{
    space->maint_gen++;
    space->maint_epoch = space->server->epoch;
    space->maint_pending = false;
    if (has_size) {
        space->has_maint_size = true;
        space->maint_size = size;
    }
    server_save_state_async(space->server);
}

/* A lock-space's maintenance count from the state file */
typedef struct ExtlockdMaintSaved {
    uint64_t gen;
    uint64_t epoch;
    bool has_size;
    uint64_t size;
} ExtlockdMaintSaved;

static void lockspace_maint_append_one(GString *out, bool *first,
                                       const char *name, uint64_t gen,
                                       uint64_t epoch, bool has_size,
                                       uint64_t size, bool pending)
{
    json_object *jname = json_object_new_string(name);

    g_string_append(out, *first ? ",\"maintenance\":[" : ",");
    *first = false;
    g_string_append_printf(out, "{\"lock-space\":%s,\"count\":%" PRIu64
                           ",\"epoch\":%" PRIu64,
                           json_object_to_json_string_ext(
                               jname, JSON_C_TO_STRING_PLAIN |
                               JSON_C_TO_STRING_NOSLASHESCAPE),
                           gen, epoch);
    json_object_put(jname);
    if (has_size) {
        g_string_append_printf(out, ",\"size\":%" PRIu64, size);
    }
    if (pending) {
        g_string_append(out, ",\"pending\":true");
    }
    g_string_append_c(out, '}');
}

void lockspace_maint_append_state(ExtlockdServer *server, GString *out)
{
    GHashTableIter iter;
    gpointer key, value;
    bool first = true;

    g_hash_table_iter_init(&iter, server->spaces);
    while (g_hash_table_iter_next(&iter, &key, &value)) {
        ExtlockdLockSpace *space = value;

        if (space->maint_gen || space->maint_pending) {
            lockspace_maint_append_one(out, &first, space->name,
                                       space->maint_gen, space->maint_epoch,
                                       space->has_maint_size,
                                       space->maint_size,
                                       space->maint_pending);
        }
    }
    if (server->maint_saved) {
        g_hash_table_iter_init(&iter, server->maint_saved);
        while (g_hash_table_iter_next(&iter, &key, &value)) {
            ExtlockdMaintSaved *ms = value;

            lockspace_maint_append_one(out, &first, key, ms->gen, ms->epoch,
                                       ms->has_size, ms->size, false);
        }
    }
    if (!first) {
        g_string_append_c(out, ']');
    }
}

/* A non-negative integer member @key of @obj into *@val; false if bad */
static bool lockspace_maint_uint(json_object *obj, const char *key,
                                 bool required, uint64_t *val)
{
    json_object *v;
    int64_t i;

    if (!json_object_object_get_ex(obj, key, &v)) {
        return !required;
    }
    if (!json_object_is_type(v, json_type_int)) {
        return false;
    }
    i = json_object_get_int64(v);
    if (i < 0) {
        return false;
    }
    *val = (uint64_t)i;
    return true;
}

/* Restore @space's count */
static void lockspace_maint_restore(ExtlockdLockSpace *space,
                                    const ExtlockdMaintSaved *ms)
{
    space->maint_gen = ms->gen;
    space->maint_epoch = ms->epoch;
    space->has_maint_size = ms->has_size;
    space->maint_size = ms->size;
}

bool lockspace_maint_load(ExtlockdServer *server, const char *data,
                          size_t len, GError **errp)
{
    g_autoptr(GHashTable) saved =
        g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
    GHashTableIter iter;
    gpointer key, value;
    json_object *arr;
    json_object *obj = extlockd_state_member_array(data, len, "maintenance",
                                                   &arr, errp);
    bool ok = false;

    if (!obj) {
        return false;
    }
    if (!arr) {
        ok = true;
        goto out;
    }
    for (size_t i = 0; i < json_object_array_length(arr); i++) {
        json_object *e = json_object_array_get_idx(arr, i);
        ExtlockdMaintSaved ms = { 0 };
        json_object *name, *pending;
        const char *n;

        if (!json_object_is_type(e, json_type_object) ||
            !json_object_object_get_ex(e, "lock-space", &name) ||
            !json_object_is_type(name, json_type_string) ||
            g_hash_table_contains(saved, json_object_get_string(name))) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "state: maintenance %zu has no or a duplicate "
                        "\"lock-space\"", i);
            goto out;
        }
        n = json_object_get_string(name);
        ms.has_size = json_object_object_get_ex(e, "size", NULL);
        if (!lockspace_maint_uint(e, "count", true, &ms.gen) ||
            ms.gen >= UINT32_MAX ||
            !lockspace_maint_uint(e, "epoch", true, &ms.epoch) ||
            ms.epoch >= EXTLOCKD_EPOCH_LIMIT ||
            !lockspace_maint_uint(e, "size", false, &ms.size)) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                        "state: maintenance of lock-space %s: \"count\", "
                        "\"epoch\" and \"size\" must be integers in range",
                        n);
            goto out;
        }
        if (json_object_object_get_ex(e, "pending", &pending)) {
            if (!json_object_is_type(pending, json_type_boolean)) {
                g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                            "state: maintenance of lock-space %s: "
                            "\"pending\" must be a boolean", n);
                goto out;
            }
            if (json_object_get_boolean(pending)) {
                /* It may have changed the image: a count nobody has seen */
                ms.gen++;
                ms.epoch = server->epoch;
                g_message("lock-space %s: a maintenance may have been "
                          "running when extlockd stopped: counted, every "
                          "host rereads the metadata", n);
            }
        }
        g_hash_table_insert(saved, g_strdup(n), g_memdup2(&ms, sizeof(ms)));
    }
    /* Lock-spaces restored with their sessions take theirs now */
    g_hash_table_iter_init(&iter, saved);
    while (g_hash_table_iter_next(&iter, &key, &value)) {
        ExtlockdLockSpace *space = g_hash_table_lookup(server->spaces, key);

        if (space) {
            lockspace_maint_restore(space, value);
            g_hash_table_iter_remove(&iter);
        }
    }
    if (server->maint_saved) {
        g_hash_table_destroy(server->maint_saved);
    }
    server->maint_saved = g_steal_pointer(&saved);
    ok = true;
out:
    json_object_put(obj);
    return ok;
}

/*
 * Revocation
 *
 * Every (held lock, conflicting waiting request) pair gets one revoke,
 * sent by whichever of the two events comes second: the request is
 * queued while the lock is held (lockspace_revoke_holder_cb), or the
 * lock is granted while the request waits (lockspace_revoke_waiter_cb).
 * A lock split off by a partial unlock counts as newly granted; a resumed
 * session gets the revokes for its locks again, as they may have been
 * lost with its old connection.
 */

/* Tell the holder of @held that @waiter waits for it */
static void lockspace_send_revoke(ExtlockLock *held, ExtlockLock *waiter)
{
    ExtlockdSession *session = held->owner;
    ExtlockMsg r;

    extlock_msg_init(&r, EXTLOCK_MSG_REVOKE);
    r.lock = held->id;
    r.offset = MAX(held->node.ext.start, waiter->node.ext.start);
    r.length = MIN(held->node.ext.end, waiter->node.ext.end) - r.offset;
    r.mode = waiter->mode;
    r.token = waiter->token;
    conn_send_msg(session->conn, &r);
    conn_urgent(session->conn);
    session->space->revokes_sent++;
    metrics_revoke(session->server, held);
}

/* foreach_conflict of a newly queued request @opaque */
static void lockspace_revoke_holder_cb(ExtlockLock *other, void *opaque)
{
    if (other->state == EXTLOCK_LOCK_GRANTED &&
        session_wants_revokes(other->owner)) {
        lockspace_send_revoke(other, opaque);
    }
}

/* foreach_conflict of a newly granted lock @opaque */
static void lockspace_revoke_waiter_cb(ExtlockLock *other, void *opaque)
{
    ExtlockLock *held = opaque;

    if (other->state == EXTLOCK_LOCK_WAITING && other->token > held->token) {
        lockspace_send_revoke(held, other);
    }
}

/* @lock was just granted (or split off): revoke it for later waiters */
static void lockspace_revoke_new_lock(ExtlockTable *table, ExtlockLock *lock)
{
    if (session_wants_revokes(lock->owner)) {
        extlock_table_foreach_conflict_state(table, lock, EXTLOCK_LOCK_WAITING,
                                             lockspace_revoke_waiter_cb, lock);
    }
}

/* Send again the revokes for every lock @session holds */
void lockspace_resend_revokes(ExtlockdSession *session)
{
    GHashTableIter iter;
    gpointer key;

    if (!session_wants_revokes(session)) {
        return;
    }
    g_hash_table_iter_init(&iter, session->held);
    while (g_hash_table_iter_next(&iter, &key, NULL)) {
        extlock_table_foreach_conflict_state(session->space->table, key,
                                             EXTLOCK_LOCK_WAITING,
                                             lockspace_revoke_waiter_cb, key);
    }
}

/*
 * The table granted a request that had been waiting.  The table is
 * consistent again when this is called, and foreach_conflict only reads.
 */
static void lockspace_grant_cb(ExtlockTable *table, ExtlockLock *lock,
                               void *opaque)
{
    ExtlockdSession *session = lock->owner;

    if (session->releasing) {
        /* The session is tearing down; this lock is released next */
        return;
    }
    g_hash_table_remove(session->waiting, lock);
    g_hash_table_add(session->held, lock);
    if (lockspace_is_maint(lock)) {
        g_autoptr(GError) err = NULL;

        if (!lockspace_maint_record(session->space, &err)) {
            /* Not sent; released outside the table's grant loop */
            lockspace_maint_unrecorded(session->space, lock, err);
            return;
        }
    }
    /* Logged only once it is granted for good (a maintenance recorded) */
    lockspace_log_lock(session->server, "grant", lock, NULL);
    if (session->conn) {
        lockspace_send_granted(session->conn, lock);
        conn_urgent(session->conn);
        lockspace_revoke_new_lock(table, lock);
    }
}

ExtlockdLockSpace *lockspace_get(ExtlockdServer *server, const char *name)
{
    ExtlockdLockSpace *space = g_hash_table_lookup(server->spaces, name);

    if (!space) {
        space = g_new0(ExtlockdLockSpace, 1);
        space->server = server;
        space->name = g_strdup(name);
        space->table = extlock_table_new(name, lockspace_grant_cb, space);
        extlock_table_set_debug_checks(space->table, server->cfg.debug_checks);
        g_hash_table_insert(server->spaces, space->name, space);
        if (server->maint_saved &&
            g_hash_table_contains(server->maint_saved, name)) {
            /* Its maintenance count from the state file */
            lockspace_maint_restore(space,
                                    g_hash_table_lookup(server->maint_saved,
                                                        name));
            g_hash_table_remove(server->maint_saved, name);
        }
        VERBOSE(server, "lock-space %s created", name);
    }
    return space;
}

void lockspace_free(ExtlockdLockSpace *space)
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

/*
 * @space is about to be freed: keep its maintenance count with those of
 * the state file, for the lock-space of that name created later.  Without
 * it, that lock-space would count from 0 again in the same epoch, and a
 * host whose node stayed open (its session lapsed meanwhile) could be
 * told a maint-gen it has seen before, after a maintenance it has not:
 * it would not reread the metadata.
 */
static void lockspace_maint_keep(ExtlockdLockSpace *space)
{
    ExtlockdServer *server = space->server;
    ExtlockdMaintSaved ms = {
        .gen = space->maint_gen,
        .epoch = space->maint_epoch,
        .has_size = space->has_maint_size,
        .size = space->maint_size,
    };

    if (!space->maint_gen && !space->maint_pending) {
        return;
    }
    if (space->maint_pending) {
        /* As at a start with "pending": a count nobody has seen */
        ms.gen++;
        ms.epoch = server->epoch;
    }
    if (!server->maint_saved) {
        server->maint_saved = g_hash_table_new_full(g_str_hash, g_str_equal,
                                                    g_free, g_free);
    }
    g_hash_table_replace(server->maint_saved, g_strdup(space->name),
                         g_memdup2(&ms, sizeof(ms)));
}

void lockspace_unref(ExtlockdLockSpace *space)
{
    ExtlockdServer *server = space->server;

    g_assert(space->nsessions > 0);
    if (--space->nsessions == 0 && !server->shutting_down) {
        const ExtlockTableStats *st = extlock_table_stats(space->table);

        /* Every session releases everything before it goes away */
        g_assert(st->held == 0 && st->waiting == 0);
        g_assert(space->deferred.length == 0 && !space->in_grace);
        VERBOSE(server, "lock-space %s is unused, freeing it", space->name);
        lockspace_maint_keep(space);
        reservation_space_unused(server, space->name);
        g_hash_table_remove(server->spaces, space->name);
        lockspace_free(space);
    }
}

bool lockspace_lock_is_deferred(const ExtlockLock *lock)
{
    return lock->id == 0;
}

/* Cancel a waiting request (in the table or deferred) */
void lockspace_cancel_waiter(ExtlockdLockSpace *space, ExtlockLock *lock)
{
    if (lockspace_lock_is_deferred(lock)) {
        DeferredReq *d = (DeferredReq *)lock;

        g_queue_unlink(&space->deferred, &d->link);
        g_free(d);
    } else {
        extlock_table_release(space->table, lock);
    }
}

/* ------------------------------------------------------------------ */
/* Lock requests and the grace period                                  */

static void lockspace_waiting_blocker_cb(ExtlockLock *blocker, void *opaque)
{
    GArray *blockers = opaque;
    ExtlockdSession *session = blocker->owner;
    ExtlockBlocker b;

    if (blockers->len >= MAX_BLOCKERS) {
        return;
    }
    b.client_id = session->client_id;
    b.offset = blocker->node.ext.start;
    b.length = blocker->node.ext.end - blocker->node.ext.start;
    b.mode = blocker->mode;
    b.token = blocker->token;
    b.waiting = blocker->state == EXTLOCK_LOCK_WAITING;
    g_array_append_val(blockers, b);
}

static void lockspace_send_waiting(ExtlockdConn *conn, uint64_t id,
                                   uint64_t token, GArray *blockers)
{
    ExtlockMsg r;

    extlock_msg_init(&r, EXTLOCK_MSG_WAITING);
    r.has_id = true;
    r.id = id;
    r.token = token;
    r.blockers = blockers;
    conn_send_msg(conn, &r);
}

/*
 * Put the lock request @req (extent, limit, mode, token, request id in
 * user_tag; not in any table or set) of @session into the table and answer it
 * on @conn: "granted", or "waiting" if @say_waiting (a deferred request was
 * told so already).  The holders it waits for get a revoke.
 */
static void lockspace_submit(ExtlockdLockSpace *space, ExtlockdSession *session,
                             ExtlockdConn *conn, const ExtlockLock *req,
                             bool say_waiting)
{
    ExtlockdServer *server = space->server;
    ExtlockTable *table = space->table;
    ExtlockLock *lock;

    lock = extlock_table_request_grow(table, req->requested, req->limit,
                                      req->mode, req->token, session,
                                      req->user_tag);
    if (lock->state == EXTLOCK_LOCK_GRANTED) {
        if (lockspace_is_maint(lock)) {
            g_autoptr(GError) err = NULL;

            if (!lockspace_maint_record(space, &err)) {
                /* Granted at once: nothing waits behind it yet */
                extlock_table_release(table, lock);
                if (conn) {
                    lockspace_maint_refuse(conn, req->user_tag, space->name,
                                           err);
                }
                return;
            }
        }
        g_hash_table_add(session->held, lock);
        lockspace_log_lock(server, "grant", lock, NULL);
        if (conn) {
            lockspace_send_granted(conn, lock);
        }
        return;
    }
    g_hash_table_add(session->waiting, lock);
    /* The requested extent and the token: when and what it asked for */
    lockspace_log_lock(server, "wait", lock, NULL);
    if (say_waiting) {
        metrics_wait(server, lock);
    }
    if (conn && say_waiting) {
        g_array_set_size(server->blockers, 0);
        /* The first MAX_BLOCKERS only: cheap however many there are */
        extlock_table_foreach_blocker_first(table, lock, MAX_BLOCKERS,
                                            lockspace_waiting_blocker_cb,
                                            server->blockers);
        lockspace_send_waiting(conn, lock->user_tag, lock->token,
                               server->blockers);
    }
    if (space->nrevocable) {
        /* Only the holders: not every request waiting for the extent */
        extlock_table_foreach_conflict_state(table, lock, EXTLOCK_LOCK_GRANTED,
                                             lockspace_revoke_holder_cb, lock);
    }
    if (lockspace_is_maint(lock)) {
        extlock_table_foreach_conflict_state(table, lock, EXTLOCK_LOCK_GRANTED,
                                             lockspace_maint_holder_cb, lock);
    }
}

/* A lock request during the grace period: queue it outside the table */
static void lockspace_defer(ExtlockdLockSpace *space, ExtlockdSession *session,
                            ExtlockdConn *conn, const ExtlockLock *req)
{
    DeferredReq *d = g_new0(DeferredReq, 1);

    d->lock = *req;
    d->lock.id = 0;
    d->lock.node.ext = req->requested;
    d->lock.state = EXTLOCK_LOCK_WAITING;
    d->lock.owner = session;
    d->lock.queued_us = g_get_monotonic_time();
    d->link.data = d;
    g_queue_push_tail_link(&space->deferred, &d->link);
    g_hash_table_add(session->waiting, &d->lock);
    metrics_wait(space->server, &d->lock);
    g_array_set_size(space->server->blockers, 0);
    lockspace_send_waiting(conn, req->user_tag, req->token,
                           space->server->blockers);
}

int64_t lockspace_grace_remaining_ms(ExtlockdLockSpace *space, int64_t now)
{
    /* A reclaim conflict may make it last longer */
    int64_t end = MAX(space->server->grace_end_us, space->dispute_until_us);

    if (!space->in_grace || end <= now) {
        return 0;
    }
    return (end - now + 999) / 1000;
}

/*
 * The grace period of @space timed out with a fence agent configured:
 * fence the listed sessions whose client never came back (they become
 * expired sessions without locks, fenced like any other, and the grace
 * period waits for them).  Returns true if there are any.
 */
static bool lockspace_fence_absent(ExtlockdLockSpace *space)
{
    ExtlockdServer *server = space->server;
    int64_t margin_us = server->cfg.fence_margin_ms * 1000LL;
    GList *l, *next;

    for (l = space->reclaimers.head; l; l = next) {
        ExtlockdSession *session = l->data;

        next = l->next;
        if (!session->restored) {
            continue;
        }
        g_queue_unlink(&space->reclaimers, &session->reclaim_link);
        session->reclaiming = false;
        session->state = SESSION_EXPIRED;
        /* Its lease (<= the grace period) ended before the timeout */
        session->deadline_us = server->grace_end_us - margin_us;
        session->grace_fenced = true;
        g_queue_push_tail_link(&space->grace_fenced, &session->reclaim_link);
        space->grace_fence_pending++;
        g_message("session %s (%s, lock-space %s) did not come back during "
                  "the grace period: fencing it before the grace period "
                  "ends", session->id, session->client_id, space->name);
        session_log_event(session, "expire", NULL);
        session_fence_start(session);
    }
    if (space->grace_linked) {
        g_queue_unlink(&server->grace_spaces, &space->grace_link);
        space->grace_linked = false;
    }
    return space->grace_fence_pending > 0;
}

static gboolean lockspace_dispute_cb(gpointer opaque)
{
    ExtlockdLockSpace *space = opaque;

    space->dispute_timer = 0;
    /*
     * Only if the grace period would have ended by now: else it ends as
     * usual, when every session is done reclaiming or at its timeout
     */
    if (space->in_grace &&
        (space->grace_timed_out || space->reclaimers.length == 0)) {
        lockspace_end_grace(space, space->grace_timed_out);
    }
    lockspace_unref(space);
    return G_SOURCE_REMOVE;
}

/*
 * A reclaim conflict is pending in @space: the grace period may not end
 * before it is over.  Returns true if the end was postponed (a timer
 * comes back).
 */
static bool lockspace_dispute_postpone(ExtlockdLockSpace *space, bool timeout)
{
    ExtlockdServer *server = space->server;
    int64_t now = g_get_monotonic_time();

    if (space->dispute_until_us <= now) {
        return false;
    }
    space->grace_timed_out |= timeout;
    if (timeout && space->grace_linked) {
        /* lockspace_end_grace_all() would come back to it at once */
        g_queue_unlink(&server->grace_spaces, &space->grace_link);
        space->grace_linked = false;
    }
    if (!space->dispute_timer) {
        space->nsessions++;
        space->dispute_timer = g_timeout_add(
            (guint)((space->dispute_until_us - now + 999) / 1000),
            lockspace_dispute_cb, space);
    }
    return true;
}

/*
 * The grace period of @space ends, because every listed session is done
 * reclaiming or (@timeout) because its time is up.  Sessions still
 * reclaiming stop doing so; those whose client never came back are
 * dropped (they hold nothing).  Then the deferred requests enter the
 * table in token order, as if they were arriving now.
 *
 * The end waits while a reclaim dispute lasts (lockspace_dispute_postpone)
 * and, with a fence agent, until the absent sessions are fenced
 * (lockspace_fence_absent).
 */
void lockspace_end_grace(ExtlockdLockSpace *space, bool timeout)
{
    ExtlockdServer *server = space->server;
    g_autoptr(GPtrArray) drop = g_ptr_array_new();
    unsigned nlate = 0, ndeferred = space->deferred.length;
    GList *l;

    g_assert(space->in_grace);
    if (lockspace_dispute_postpone(space, timeout)) {
        return;
    }
    if (space->grace_fence_pending ||
        (timeout && server->fencer && lockspace_fence_absent(space))) {
        /* Waits for the fence agent: session_fence_cb comes back */
        return;
    }
    space->in_grace = false;
    if (space->grace_linked) {
        g_queue_unlink(&server->grace_spaces, &space->grace_link);
        space->grace_linked = false;
    }
    if (space->disputed) {
        g_array_set_size(space->disputed, 0);
    }
    space->nsessions++;         /* keep @space while sessions go away */
    while ((l = g_queue_pop_head_link(&space->grace_fenced)) != NULL) {
        ExtlockdSession *session = l->data;

        session->grace_fenced = false;
        g_ptr_array_add(drop, session);
    }

    while ((l = g_queue_pop_head_link(&space->reclaimers)) != NULL) {
        ExtlockdSession *session = l->data;

        session->reclaiming = false;
        if (session->restored) {
            g_ptr_array_add(drop, session);
        } else {
            /* Its client may still be busy reclaiming: see reclaim-done */
            session->resend_revokes = true;
            nlate++;
        }
    }

    while ((l = g_queue_pop_head_link(&space->deferred)) != NULL) {
        DeferredReq *d = l->data;
        ExtlockdSession *session = d->lock.owner;

        g_hash_table_remove(session->waiting, &d->lock);
        lockspace_submit(space, session, session->conn, &d->lock, false);
        g_free(d);
    }

    g_message("grace period of lock-space %s ended%s: %u session(s) that "
              "did not come back dropped, %u still reclaiming, %u deferred "
              "request(s) queued", space->name,
              timeout ? " (timeout)" : ", every session reclaimed",
              drop->len, nlate, ndeferred);
    for (guint i = 0; i < drop->len; i++) {
        ExtlockdSession *session = drop->pdata[i];

        g_message("session %s (%s, lock-space %s) dropped: it did not "
                  "come back during the grace period", session->id,
                  session->client_id, session->space->name);
        session_destroy_nosave(session);
    }
    if (drop->len) {
        server_save_state_or_warn(server);
    }
    lockspace_unref(space);
}

/* The grace period timer ran out (called from the lease timer) */
void lockspace_end_grace_all(ExtlockdServer *server)
{
    GList *l;

    while ((l = server->grace_spaces.head) != NULL) {
        lockspace_end_grace(l->data, true);
    }
}

/*
 * The lease timer: end the grace period if its time is up.  Returns when
 * it ends otherwise (INT64_MAX: no lock-space is in grace).
 */
int64_t lockspace_check_grace(ExtlockdServer *server, int64_t now)
{
    int64_t next = INT64_MAX;

    if (server->grace_spaces.length) {
        if (now >= server->grace_end_us) {
            lockspace_end_grace_all(server);
        } else {
            next = server->grace_end_us;
        }
    }
    return next;
}

void lockspace_handle_lock(ExtlockdConn *conn, ExtlockdSession *session,
                           ExtlockMsg *m)
{
    ExtlockdServer *server = conn->server;
    ExtlockdLockSpace *space = session->space;
    ExtlockLock req;
    ExtlockLock *lock;
    uint64_t token;
    unsigned count;

    if (!extlock_extent_valid(m->offset, m->length)) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_RANGE,
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
            conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_RANGE,
                            "limit [%" PRIu64 ", +%" PRIu64 ") does not "
                            "contain the requested extent", m->limit_offset,
                            m->limit_length);
            return;
        }
        req.limit.start = m->limit_offset;
        req.limit.end = m->limit_offset + m->limit_length;
    }
    count = g_hash_table_size(session->held) +
            g_hash_table_size(session->waiting);
    if (count >= server->cfg.max_locks_per_session) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_LIMIT,
                        "session has %u locks and waiting requests (limit %u)",
                        count, server->cfg.max_locks_per_session);
        return;
    }
    if (session_find_waiting(session, m->id)) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_INVALID,
                        "request %" PRIu64 " is already waiting", m->id);
        return;
    }
    if (G_UNLIKELY(space->in_grace) && !m->wait) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_GRACE,
                        "lock-space %s is in its restart grace period for "
                        "another %" PRId64 " ms", space->name,
                        lockspace_grace_remaining_ms(space,
                                                     g_get_monotonic_time()));
        return;
    }
    if (!server_next_token(server, &token)) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_INTERNAL,
                        "cannot persist a new token epoch");
        return;
    }
    req.mode = m->mode;
    req.node.ext = req.requested;
    if (lockspace_is_maint(&req)) {
        g_autoptr(GError) err = NULL;

        /* Its grant must be recorded (lockspace_maint_granted): can it? */
        if (!server_save_state(server, server->epoch, &err)) {
            conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_INTERNAL,
                            "cannot record the maintenance in the state "
                            "file: %s", err->message);
            return;
        }
    }
    req.token = token;
    req.user_tag = m->id;

    if (m->wait) {
        if (m->has_limit) {
            /* It caches locks: it wants to know when to give them back */
            session_set_revocable(session);
        }
        if (G_UNLIKELY(space->in_grace)) {
            lockspace_defer(space, session, conn, &req);
        } else {
            lockspace_submit(space, session, conn, &req, true);
        }
        return;
    }
    /*
     * A request is granted at once exactly when nothing held or waiting
     * conflicts with it, which is what reclaim checks; on a conflict it
     * changes nothing.  Such a lock does not grow.
     */
    lock = extlock_table_reclaim(space->table, req.requested, m->mode, token,
                                 session, m->id);
    if (!lock) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_WOULD_BLOCK,
                        "[%" PRIu64 ", +%" PRIu64 ") %s conflicts with "
                        "a held or waiting lock", m->offset, m->length,
                        extlock_mode_name(m->mode));
        return;
    }
    if (lockspace_is_maint(lock)) {
        g_autoptr(GError) err = NULL;

        if (!lockspace_maint_record(space, &err)) {
            /* Nothing conflicted with it: nothing waits behind it */
            extlock_table_release(space->table, lock);
            lockspace_maint_refuse(conn, m->id, space->name, err);
            return;
        }
    }
    space->nowait_grants++;
    if (m->has_limit) {
        session_set_revocable(session);
    }
    g_hash_table_add(session->held, lock);
    lockspace_log_lock(server, "grant", lock, NULL);
    lockspace_send_granted(conn, lock);
}

void lockspace_handle_unlock(ExtlockdConn *conn, ExtlockdSession *session,
                             ExtlockMsg *m)
{
    ExtlockdServer *server = conn->server;
    ExtlockTable *table = session->space->table;
    ExtlockLock *lock = extlock_table_lookup(table, m->lock);
    ExtlockLock *split = NULL;
    ExtlockMsg r;

    if (!lock || lock->owner != session ||
        lock->state != EXTLOCK_LOCK_GRANTED) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_NOT_FOUND,
                        "lock %" PRIu64 " is not held by this session",
                        m->lock);
        return;
    }
    g_array_set_size(server->pieces, 0);
    if (m->has_extent) {
        ExtlockExtent ext = lock->node.ext;
        ExtlockExtent part;

        if (!extlock_extent_valid(m->offset, m->length)) {
            conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_RANGE,
                            "invalid extent offset %" PRIu64 " length %" PRIu64,
                            m->offset, m->length);
            return;
        }
        part.start = m->offset;
        part.end = m->offset + m->length;
        if (part.start < ext.start || part.end > ext.end) {
            conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_RANGE,
                            "[%" PRIu64 ", %" PRIu64 ") is not inside lock %"
                            PRIu64 " [%" PRIu64 ", %" PRIu64 ")", part.start,
                            part.end, lock->id, ext.start, ext.end);
            return;
        }
        if (part.start != ext.start || part.end != ext.end) {
            ExtlockLock *rest = NULL;
            int ret;

            /* Logged first: the release may grant the part to others */
            lockspace_log_lock(server, "release", lock, &part);
            ret = extlock_table_release_part(table, lock, part, &rest, &split);
            if (ret < 0) {
                conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_INTERNAL,
                                "partial release failed: %s", g_strerror(-ret));
                return;
            }
            if (rest) {
                ExtlockPiece p = {
                    .lock = rest->id,
                    .offset = rest->node.ext.start,
                    .length = rest->node.ext.end - rest->node.ext.start,
                };
                g_array_append_val(server->pieces, p);
            }
            if (split) {
                ExtlockPiece p = {
                    .lock = split->id,
                    .offset = split->node.ext.start,
                    .length = split->node.ext.end - split->node.ext.start,
                };
                g_hash_table_add(session->held, split);
                g_array_append_val(server->pieces, p);
            }
            goto reply;
        }
    }
    if (lockspace_is_maint(lock)) {
        /* Its owner announces the image's new length */
        lockspace_maint_done(session->space, m->has_maint_size,
                             m->maint_size);
        session_log_event(session, "maintenance-done", NULL);
    }
    g_hash_table_remove(session->held, lock);
    lockspace_log_lock(server, "release", lock, NULL);
    extlock_table_release(table, lock);

reply:
    extlock_msg_init(&r, EXTLOCK_MSG_UNLOCKED);
    r.has_id = m->has_id;
    r.id = m->id;
    r.lock = m->lock;
    r.pieces = server->pieces;
    conn_send_msg(conn, &r);
    if (split) {
        /* A new lock id, which the client knows only from the reply */
        lockspace_revoke_new_lock(table, split);
    }
}

void lockspace_handle_cancel(ExtlockdConn *conn, ExtlockdSession *session,
                             ExtlockMsg *m)
{
    ExtlockLock *lock = session_find_waiting(session, m->request);
    ExtlockMsg r;

    if (!lock) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_NOT_FOUND,
                        "request %" PRIu64 " is not waiting", m->request);
        return;
    }
    g_hash_table_remove(session->waiting, lock);
    lockspace_cancel_waiter(session->space, lock);

    extlock_msg_init(&r, EXTLOCK_MSG_CANCELLED);
    r.has_id = m->has_id;
    r.id = m->id;
    r.request = m->request;
    conn_send_msg(conn, &r);
    extlock_format_error(conn_out(conn), true, m->request,
                         EXTLOCK_ERR_CANCELLED,
                         "lock request cancelled by request %" PRIu64,
                         m->id);
}

void lockspace_handle_downgrade(ExtlockdConn *conn, ExtlockdSession *session,
                                ExtlockMsg *m)
{
    ExtlockTable *table = session->space->table;
    ExtlockLock *lock = extlock_table_lookup(table, m->lock);
    ExtlockMsg r;

    if (!lock || lock->owner != session ||
        lock->state != EXTLOCK_LOCK_GRANTED) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_NOT_FOUND,
                        "lock %" PRIu64 " is not held by this session",
                        m->lock);
        return;
    }
    session_set_revocable(session);
    if (lockspace_is_maint(lock)) {
        /*
         * The maintenance ends here: the shared requests it lets in must
         * see a count they have not seen, and the shared lock left is no
         * maintenance lock, so its unlock counts nothing
         */
        lockspace_maint_done(session->space, false, 0);
        session_log_event(session, "maintenance-done", NULL);
    }
    if (lock->mode == EXTLOCK_MODE_EXCLUSIVE) {
        ExtlockLock shared = *lock;

        shared.mode = EXTLOCK_MODE_SHARED;
        lockspace_log_lock(conn->server, "downgrade", &shared, NULL);
    }
    /* Shared waiters it unblocks are granted (lockspace_grant_cb) */
    extlock_table_downgrade(table, lock);
    extlock_msg_init(&r, EXTLOCK_MSG_DOWNGRADED);
    r.has_id = m->has_id;
    r.id = m->id;
    r.lock = lock->id;
    r.mode = lock->mode;
    conn_send_msg(conn, &r);
}

static void lockspace_reclaim_conflict_cb(ExtlockLock *lock, void *opaque)
{
    g_ptr_array_add(opaque, lock);
}

static bool lockspace_extent_disputed(ExtlockdLockSpace *space,
                                      ExtlockExtent ext)
{
    for (guint i = 0; space->disputed && i < space->disputed->len; i++) {
        ExtlockExtent *d = &g_array_index(space->disputed, ExtlockExtent, i);

        if (d->start < ext.end && ext.start < d->end) {
            return true;
        }
    }
    return false;
}

static void lockspace_add_dispute(ExtlockdLockSpace *space, ExtlockExtent ext,
                                  ExtlockdSession *session, int64_t now)
{
    int64_t until = now + ((int64_t)session->lease_ms +
                           session->fence_margin_ms) * 1000;

    if (!space->disputed) {
        space->disputed = g_array_new(FALSE, FALSE, sizeof(ExtlockExtent));
    }
    g_array_append_val(space->disputed, ext);
    space->dispute_until_us = MAX(space->dispute_until_us, until);
}

/*
 * Session @session reclaims @ext in @mode, which conflicts with locks that
 * other sessions reclaimed before (@others).  The coordinator cannot tell
 * which claim is true (locks are not persisted), so nobody gets the
 * extent: the earlier reclaims are dropped and their sessions told, the
 * extent is disputed (no more reclaims of it) and nothing in the
 * lock-space is granted before every claimant has had its lease and fence
 * margin to stop writing (the grace period is extended).
 */
static void lockspace_reclaim_dispute(ExtlockdSession *session,
                                      ExtlockExtent ext,
                                      ExtlockMode mode, GPtrArray *others)
{
    ExtlockdServer *server = session->server;
    ExtlockdLockSpace *space = session->space;
    int64_t now = g_get_monotonic_time();

    lockspace_add_dispute(space, ext, session, now);
    for (guint i = 0; i < others->len; i++) {
        ExtlockLock *lock = others->pdata[i];
        ExtlockdSession *other = lock->owner;
        ExtlockExtent e = lock->node.ext;

        g_warning("RECLAIM CONFLICT in lock-space %s: session %s (%s, "
                  "identity %s) reclaims [%" PRIu64 ", +%" PRIu64 ") %s, "
                  "which session %s (%s, identity %s) reclaimed as lock %"
                  PRIu64 " [%" PRIu64 ", +%" PRIu64 ") %s: at most one "
                  "of them held it before the restart; neither keeps it, "
                  "and nothing is granted in the lock-space for the next "
                  "%" PRId64 " ms", space->name, session->id,
                  session->client_id,
                  session->owner ? session->owner : "(unknown)", ext.start,
                  ext.end - ext.start, extlock_mode_name(mode), other->id,
                  other->client_id, other->owner ? other->owner : "(unknown)",
                  lock->id, e.start, e.end - e.start,
                  extlock_mode_name(lock->mode),
                  (MAX(space->dispute_until_us,
                       now + ((int64_t)other->lease_ms +
                              other->fence_margin_ms) * 1000) - now) / 1000);
        lockspace_add_dispute(space, e, other, now);
        if (other->conn) {
            ExtlockMsg n;

            /* A notification naming the lock, so the client drops it */
            extlock_msg_init(&n, EXTLOCK_MSG_ERROR);
            n.error = EXTLOCK_ERR_RECLAIM_CONFLICT;
            n.lock = lock->id;
            n.message = g_strdup_printf("lock %" PRIu64 " [%" PRIu64 ", +%"
                                        PRIu64 ") that you reclaimed is "
                                        "dropped: session %s (%s) reclaimed "
                                        "a conflicting lock", lock->id,
                                        e.start, e.end - e.start, session->id,
                                        session->client_id);
            server->nerrors++;
            extlock_msg_format(&n, conn_out(other->conn));
            extlock_msg_clear(&n);
        }
        g_hash_table_remove(other->held, lock);
        lockspace_log_lock(server, "release", lock, NULL);
        extlock_table_release(space->table, lock);
    }
}

/* Re-assert a lock held before the restart, with its original token */
void lockspace_handle_reclaim(ExtlockdConn *conn, ExtlockdSession *session,
                              ExtlockMsg *m)
{
    ExtlockdServer *server = conn->server;
    ExtlockdLockSpace *space = session->space;
    uint64_t epoch = m->token >> EXTLOCKD_COUNTER_BITS;
    ExtlockExtent ext;
    ExtlockLock *lock;
    unsigned count;

    if (!session->reclaiming) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_STATE,
                        "session %s cannot reclaim locks: %s", session->id,
                        space->in_grace ? "it is not listed in the state file "
                        "or has sent reclaim-done"
                        : "its lock-space has no restart grace period");
        return;
    }
    if (!extlock_extent_valid(m->offset, m->length)) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_RANGE,
                        "invalid extent offset %" PRIu64 " length %" PRIu64,
                        m->offset, m->length);
        return;
    }
    if (epoch == 0 || epoch >= server->boot_epoch ||
        (m->token & (EXTLOCKD_COUNTER_LIMIT - 1)) == 0) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_INVALID,
                        "token %" PRIu64 " (epoch %" PRIu64 ") was not handed "
                        "out before this coordinator started in epoch %" PRIu64,
                        m->token, epoch, server->boot_epoch);
        return;
    }
    count = g_hash_table_size(session->held) +
            g_hash_table_size(session->waiting);
    if (count >= server->cfg.max_locks_per_session) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_LIMIT,
                        "session has %u locks and waiting requests (limit %u)",
                        count, server->cfg.max_locks_per_session);
        return;
    }
    ext.start = m->offset;
    ext.end = m->offset + m->length;
    if (lockspace_extent_disputed(space, ext)) {
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_RECLAIM_CONFLICT,
                        "[%" PRIu64 ", +%" PRIu64 ") is disputed: two sessions "
                        "reclaimed it in conflict; request it anew after the "
                        "grace period", m->offset, m->length);
        return;
    }
    lock = extlock_table_reclaim(space->table, ext, m->mode, m->token, session,
                                 m->id);
    if (!lock) {
        g_autoptr(GPtrArray) others = g_ptr_array_new();
        g_autoptr(GPtrArray) all = g_ptr_array_new();
        ExtlockLock probe = { .mode = m->mode, .token = m->token };

        probe.node.ext = ext;
        extlock_table_foreach_conflict(space->table, &probe,
                                       lockspace_reclaim_conflict_cb, all);
        for (guint i = 0; i < all->len; i++) {
            if (((ExtlockLock *)all->pdata[i])->owner != session) {
                g_ptr_array_add(others, all->pdata[i]);
            }
        }
        if (others->len) {
            lockspace_reclaim_dispute(session, ext, m->mode, others);
            conn_send_error(conn, m->has_id, m->id,
                            EXTLOCK_ERR_RECLAIM_CONFLICT,
                            "[%" PRIu64 ", +%" PRIu64 ") %s conflicts with a "
                            "lock reclaimed by another session: the extent is "
                            "disputed, neither session keeps it; request it "
                            "anew after the grace period", m->offset,
                            m->length, extlock_mode_name(m->mode));
            return;
        }
        conn_send_error(conn, m->has_id, m->id, EXTLOCK_ERR_STATE,
                        "[%" PRIu64 ", +%" PRIu64 ") %s conflicts with a lock "
                        "this session reclaimed", m->offset, m->length,
                        extlock_mode_name(m->mode));
        return;
    }
    if (lockspace_is_maint(lock)) {
        g_autoptr(GError) err = NULL;

        /*
         * The maintenance goes on: "pending" again in the state file, as
         * before its grant, so that a restart before its release counts
         * it (its owner may not come back to reclaim it again)
         */
        if (!lockspace_maint_record(space, &err)) {
            /* Nothing waits behind it during the grace period */
            extlock_table_release(space->table, lock);
            lockspace_maint_refuse(conn, m->id, space->name, err);
            return;
        }
    }
    session_set_revocable(session);
    space->reclaims++;
    g_hash_table_add(session->held, lock);
    lockspace_log_lock(server, "reclaim", lock, NULL);
    lockspace_send_granted(conn, lock);
}

void lockspace_handle_reclaim_done(ExtlockdConn *conn, ExtlockdSession *session,
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
    conn_send_msg(conn, &r);
    if (session->reclaiming) {
        g_message("session %s (%s, lock-space %s) reclaimed %u locks",
                  session->id, session->client_id, session->space->name,
                  g_hash_table_size(session->held));
        session_end_reclaim(session);
    }
    if (session->resend_revokes) {
        session->resend_revokes = false;
        lockspace_resend_revokes(session);
    }
}
