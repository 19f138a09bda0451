/*
 * extlockd: the server object
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Creation and teardown of the server, its settings (policy, TLS, event
 * log, fencer), the token counter, the state file, and the one timer
 * that serves every deadline (grace period, leases, hello timeouts,
 * closing connections): each module says, for its own deadlines, when
 * the timer must run next.  The other jobs are in the files listed in
 * server-int.h.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <string.h>
#include <glib.h>

#include "server-int.h"
#include "state-file.h"

#define REFUSAL_LOG_BURST   20  /* server_log_refusal() lines a second */

bool server_next_token(ExtlockdServer *server, uint64_t *token)
{
    if (server->counter >= EXTLOCKD_COUNTER_LIMIT) {
        g_autoptr(GError) err = NULL;
        uint64_t epoch = server->epoch + 1;

        if (!server_save_state(server, epoch, &err)) {
            g_warning("token counter of epoch %" PRIu64 " is exhausted and "
                      "the new epoch cannot be persisted: %s",
                      server->epoch, err->message);
            return false;
        }
        g_message("token counter of epoch %" PRIu64 " exhausted; "
                  "now in epoch %" PRIu64, server->epoch, epoch);
        server->epoch = epoch;
        server->counter = 1;
    }
    *token = (server->epoch << EXTLOCKD_COUNTER_BITS) | server->counter++;
    return true;
}

/*
 * A warning about a request or connection refused for who sent it: at
 * most REFUSAL_LOG_BURST lines a second, so that a peer cannot fill the
 * log (and spend the daemon's time on it) at the rate it sends lines; the
 * next line logged says how many were left out
 */
void G_GNUC_PRINTF(2, 3)
server_log_refusal(ExtlockdServer *server, const char *fmt, ...)
{
    int64_t now = g_get_monotonic_time();
    g_autofree char *text = NULL;
    va_list ap;

    if (now - server->refusal_window_us >= G_USEC_PER_SEC) {
        server->refusal_window_us = now;
        server->refusal_lines = 0;
    }
    if (server->refusal_lines >= REFUSAL_LOG_BURST) {
        server->refusals_unlogged++;
        return;
    }
    server->refusal_lines++;
    va_start(ap, fmt);
    text = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    if (server->refusals_unlogged) {
        g_warning("%s (%" PRIu64 " similar refusals not logged before "
                  "this one)", text, server->refusals_unlogged);
        server->refusals_unlogged = 0;
    } else {
        g_warning("%s", text);
    }
}

/* Record the current sessions in the state file, or complain */
void server_save_state_or_warn(ExtlockdServer *server)
{
    /* A session gone from the file only matters after a crash */
    server_save_state_async(server);
}

/*
 * Act on every deadline that has passed, then set the timer for the
 * earliest one left: the grace period (lockspace.c), leases and fence
 * margins (session.c), connections without hello and connections closing
 * (connection.c)
 */
void server_check_deadlines(ExtlockdServer *server)
{
    int64_t now = g_get_monotonic_time();
    int64_t next;

    next = lockspace_check_grace(server, now);
    next = MIN(next, session_check_leases(server, now));
    next = MIN(next, conn_check_timeouts(server, now));
    next = MIN(next, reservation_check_deadlines(server, now));
    reservation_check_all(server);
    if (next != INT64_MAX) {
        server_schedule(server, next);
    }
}

static gboolean server_on_timer(gpointer opaque)
{
    ExtlockdServer *server = opaque;

    server->timer = 0;
    server_check_deadlines(server);
    conn_flush_all(server);
    return G_SOURCE_REMOVE;
}

/* Make sure the timer runs no later than @when_us */
void server_schedule(ExtlockdServer *server, int64_t when_us)
{
    int64_t now, delay_ms;

    if (server->timer && server->timer_due_us <= when_us) {
        return;
    }
    if (server->timer) {
        g_source_remove(server->timer);
    }
    now = g_get_monotonic_time();
    delay_ms = when_us > now ? (when_us - now + 999) / 1000 : 0;
    server->timer = g_timeout_add((guint)MIN(delay_ms, (int64_t)G_MAXUINT),
                                  server_on_timer, server);
    server->timer_due_us = when_us;
}

/* The state file text for @epoch and every session */
static char *server_state_snapshot(ExtlockdServer *server, uint64_t epoch,
                                   GError **errp)
{
    g_autoptr(GArray) list = g_array_sized_new(FALSE, FALSE,
                                               sizeof(ExtlockdStateSession),
                                               server->session_list.length);
    char *text;

    for (GList *l = server->session_list.head; l; l = l->next) {
        ExtlockdSession *session = l->data;
        ExtlockdStateSession ss = {
            .session = session->id,
            .client_id = session->client_id,
            .lock_space = session->space->name,
            .lease_ms = session->lease_ms,
            .fence_margin_ms = session->fence_margin_ms,
            .owner = session->owner,
            .secret_sha256 = session->secret_sha256[0] ?
                             session->secret_sha256 : NULL,
        };

        g_array_append_val(list, ss);
    }
    text = extlockd_state_format(epoch, (ExtlockdStateSession *)list->data,
                                 list->len, errp);
    if (text) {
        /* "...}\n": the maintenance counts go before the closing brace */
        GString *out = g_string_new(text);

        g_free(text);
        g_string_truncate(out, out->len - 2);
        lockspace_maint_append_state(server, out);
        g_string_append(out, "}\n");
        text = g_string_free(out, FALSE);
    }
    if (text && server->pr) {
        /* "...}\n": the reservations go before the closing brace */
        GString *out = g_string_new(text);

        g_free(text);
        g_string_truncate(out, out->len - 2);
        reservation_append_state(server, out);
        g_string_append(out, "}\n");
        text = g_string_free(out, FALSE);
    }
    return text;
}

/* Write @epoch and every session to the state file, now */
bool server_save_state(ExtlockdServer *server, uint64_t epoch, GError **errp)
{
    char *text = server_state_snapshot(server, epoch, errp);

    return text && extlockd_state_writer_write_now(server->writer, text, errp);
}

/* Queue the current state for the writer thread; its generation */
uint64_t server_save_state_async(ExtlockdServer *server)
{
    g_autoptr(GError) err = NULL;
    char *text = server_state_snapshot(server, server->epoch, &err);

    if (!text) {
        g_warning("cannot update the state file: %s", err->message);
        return 0;
    }
    return extlockd_state_writer_submit(server->writer, text);
}

void extlockd_server_set_event_log(ExtlockdServer *server,
                                   ExtlockdEventLog *log)
{
    extlockd_event_log_close(server->event_log);
    server->event_log = log;
}

void extlockd_server_set_ha(ExtlockdServer *server, ExtlockdHa *ha)
{
    server->ha = ha;
}

void extlockd_server_lead(ExtlockdServer *server, uint64_t epoch,
                          GPtrArray *sessions, uint32_t grace_ms)
{
    g_assert(server->ha && !server->leading &&
             !g_hash_table_size(server->sessions));
    server->epoch = epoch;
    server->boot_epoch = epoch;
    server->counter = server->cfg.first_counter ? server->cfg.first_counter
                                                : 1;
    server->cfg.grace_ms = grace_ms;
    extlockd_server_restore(server, sessions);
    server->leading = true;
}

void extlockd_server_set_fencer(ExtlockdServer *server, ExtlockdFencer *fencer)
{
    extlockd_fencer_free(server->fencer);
    server->fencer = fencer;
}

/* Load one member of the state file @path with @load (none: nothing) */
static bool server_load_member(ExtlockdServer *server, const char *path,
                               bool (*load)(ExtlockdServer *server,
                                            const char *data, size_t len,
                                            GError **errp),
                               GError **errp)
{
    g_autofree char *data = NULL;
    size_t len;

    if (!extlockd_state_read(path, &data, &len, errp)) {
        return false;
    }
    return !data || load(server, data, len, errp);
}

bool extlockd_server_load_reservations(ExtlockdServer *server,
                                       const char *path, GError **errp)
{
    return server_load_member(server, path, reservation_load, errp);
}

bool extlockd_server_load_maintenance(ExtlockdServer *server,
                                      const char *path, GError **errp)
{
    return server_load_member(server, path, lockspace_maint_load, errp);
}

bool extlockd_server_load_reservations_json(ExtlockdServer *server,
                                            const char *json, GError **errp)
{
    g_autofree char *obj = g_strdup_printf("{\"reservations\":%s}", json);

    return reservation_load(server, obj, strlen(obj), errp);
}

bool extlockd_server_load_maintenance_json(ExtlockdServer *server,
                                           const char *json, GError **errp)
{
    g_autofree char *obj = g_strdup_printf("{\"maintenance\":%s}", json);

    if (!lockspace_maint_load(server, obj, strlen(obj), errp)) {
        return false;
    }
    /*
     * A pending one was counted in this epoch: written in the background
     * (if this leader dies first, the next one counts it in its epoch, a
     * maint-gen no client has seen either)
     */
    server_save_state_async(server);
    return true;
}

bool extlockd_server_save_state(ExtlockdServer *server, GError **errp)
{
    return server_save_state(server, server->epoch, errp);
}

ExtlockdServer *extlockd_server_new(const ExtlockdConfig *cfg, uint64_t epoch)
{
    ExtlockdServer *server = g_new0(ExtlockdServer, 1);

    server->cfg = *cfg;
    server->cfg.state_file = g_strdup(cfg->state_file);
    server->epoch = epoch;
    server->boot_epoch = epoch;
    server->counter = cfg->first_counter ? cfg->first_counter : 1;
    server->start_us = g_get_monotonic_time();
    server->status_budget = EXTLOCKD_STATUS_ENTRIES_PER_SEC;
    server->status_budget_us = server->start_us;
    server->listeners = g_ptr_array_new_with_free_func(listener_free);
    server->spaces = g_hash_table_new(g_str_hash, g_str_equal);
    server->sessions = g_hash_table_new(g_str_hash, g_str_equal);
    server->identity_sessions = g_hash_table_new_full(g_str_hash, g_str_equal,
                                                      g_free, NULL);
    if (!server->cfg.max_sessions_per_identity) {
        server->cfg.max_sessions_per_identity =
            EXTLOCKD_DEFAULT_MAX_SESS_PER_IDENTITY;
    }
    g_queue_init(&server->session_list);
    g_queue_init(&server->grace_spaces);
    g_queue_init(&server->conns);
    g_queue_init(&server->dirty);
    server->rbuf = g_malloc(READ_CHUNK);
    server->metrics = metrics_new();
    metrics_start(server);
    server->pieces = g_array_new(FALSE, FALSE, sizeof(ExtlockPiece));
    server->blockers = g_array_new(FALSE, FALSE, sizeof(ExtlockBlocker));
    server->locks = g_array_new(FALSE, FALSE, sizeof(ExtlockLockInfo));
    server->policy = extlockd_policy_load(NULL, NULL);
    server->writer = cfg->state_write ?
        extlockd_state_writer_new_fn(cfg->state_write,
                                     cfg->state_write_opaque,
                                     session_state_written, server) :
        extlockd_state_writer_new(server->cfg.state_file,
                                  session_state_written, server);
    g_queue_init(&server->welcomes);
    reservation_init(server);
    g_queue_init(&server->unauth);
    server->unauth_per_peer = g_hash_table_new_full(g_str_hash, g_str_equal,
                                                    g_free, NULL);
    if (!server->cfg.hello_timeout_ms) {
        server->cfg.hello_timeout_ms = EXTLOCKD_DEFAULT_HELLO_TIMEOUT_MS;
    }
    if (!server->cfg.max_unauth) {
        server->cfg.max_unauth = EXTLOCKD_DEFAULT_MAX_UNAUTH;
    }
    if (!server->cfg.status_rate) {
        server->cfg.status_rate = EXTLOCKD_DEFAULT_STATUS_RATE;
    }
    if (!server->cfg.max_unauth_per_peer) {
        server->cfg.max_unauth_per_peer = EXTLOCKD_DEFAULT_MAX_UNAUTH_PEER;
    }
    return server;
}

void extlockd_server_set_policy(ExtlockdServer *server, ExtlockdPolicy *policy)
{
    extlockd_policy_free(server->policy);
    server->policy = policy;
}

void extlockd_server_set_tls(ExtlockdServer *server, ExtlockdTlsCreds *creds)
{
    extlockd_tls_creds_free(server->tls);
    server->tls = creds;
}

void extlockd_server_free(ExtlockdServer *server)
{
    GHashTableIter iter;
    gpointer value;
    GList *l;

    server->shutting_down = true;
    lockspace_maint_unrecorded_free(server);
    metrics_free(server->metrics);
    server->metrics = NULL;
    extlockd_server_stop_listening(server);
    g_ptr_array_free(server->listeners, TRUE);

    while ((l = server->conns.head) != NULL) {
        ExtlockdConn *conn = l->data;

        /* Best effort: deliver replies already produced */
        if (conn->out->len > conn->out_pos) {
            ssize_t n = conn->handshaking ? 0 :
                        conn_sys_send(conn, conn->out->str + conn->out_pos,
                                      conn->out->len - conn->out_pos);
            (void)n;
        }
        conn_destroy(conn);
    }
    while ((l = g_queue_pop_head_link(&server->session_list)) != NULL) {
        ExtlockdSession *session = l->data;

        /* The tables are freed with all their locks below */
        extlockd_fence_cancel(session->fence);
        session_free(session);
    }
    g_hash_table_iter_init(&iter, server->spaces);
    while (g_hash_table_iter_next(&iter, NULL, &value)) {
        lockspace_free(value);
    }
    g_hash_table_destroy(server->spaces);
    if (server->maint_saved) {
        g_hash_table_destroy(server->maint_saved);
    }
    g_hash_table_destroy(server->sessions);
    g_hash_table_destroy(server->identity_sessions);
    if (server->timer) {
        g_source_remove(server->timer);
    }
    g_array_free(server->pieces, TRUE);
    g_array_free(server->blockers, TRUE);
    g_array_free(server->locks, TRUE);
    g_free(server->rbuf);
    g_free(server->cfg.state_file);
    extlockd_event_log_close(server->event_log);
    extlockd_fencer_free(server->fencer);
    extlockd_policy_free(server->policy);
    extlockd_tls_creds_free(server->tls);
    extlockd_state_writer_free(server->writer);
    g_queue_clear_full(&server->welcomes, g_free);
    reservation_fini(server);
    g_hash_table_destroy(server->unauth_per_peer);
    g_free(server);
}

bool extlockd_metrics_listen_check(const char *addr, const char *tls_dir,
                                   GError **errp)
{
    return metrics_http_check(addr, tls_dir, errp);
}

bool extlockd_server_metrics_listen(ExtlockdServer *server, const char *addr,
                                    const char *tls_dir, GError **errp)
{
    ExtlockdMetrics *m = server->metrics;

    g_return_val_if_fail(!m->http, false);
    m->http = metrics_http_start(m, addr, tls_dir, errp);
    if (!m->http) {
        return false;
    }
    metrics_start(server);
    return true;
}

/* ------------------------------------------------------------------ */
/* Testing seam (tests/fuzz)                                           */

void extlockd_server_add_connection(ExtlockdServer *server, int fd,
                                    const char *peer)
{
    /* An admin on the UNIX socket: every request type is reachable */
    conn_new(server, fd, peer, peer, "uid:0", false);
}

void extlockd_server_run_timer(ExtlockdServer *server)
{
    if (server->timer) {
        g_source_remove(server->timer);
    }
    server_on_timer(server);
}

bool extlockd_server_check(ExtlockdServer *server, unsigned *nsessions,
                           char **errmsg)
{
    GHashTableIter iter;
    gpointer value;

    g_hash_table_iter_init(&iter, server->spaces);
    while (g_hash_table_iter_next(&iter, NULL, &value)) {
        ExtlockdLockSpace *space = value;
        g_autofree char *msg = NULL;

        if (!extlock_table_check(space->table, &msg)) {
            *errmsg = g_strdup_printf("lock-space '%s': %s", space->name,
                                      msg);
            return false;
        }
    }
    *nsessions = g_hash_table_size(server->sessions);
    return true;
}
