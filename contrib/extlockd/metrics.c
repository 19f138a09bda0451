/*
 * extlockd: lock metrics
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Wait-time and hold-time histograms per lock-space (log2 buckets of
 * microseconds), per-client counts, lease and fence counters, the
 * detection of long holders and waiters (--long-wait-ms, --long-hold-ms),
 * and the Prometheus text exposition format of all of it.  The hooks are
 * called from lockspace_log_lock(), session_log_event() and the places
 * that send "waiting" and "revoke" messages.
 */
#include <inttypes.h>
#include <string.h>
#include <glib.h>

#include "server-int.h"
#include "metrics.h"

ExtlockdMetrics *metrics_new(void)
{
    ExtlockdMetrics *m = g_new0(ExtlockdMetrics, 1);

    m->spaces = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
    m->clients = g_hash_table_new_full(g_str_hash, g_str_equal, g_free,
                                       g_free);
    g_mutex_init(&m->text_lock);
    m->text = g_string_new("");
    return m;
}

void metrics_free(ExtlockdMetrics *m)
{
    if (!m) {
        return;
    }
    /* The HTTP thread goes first: it reads m->text */
    metrics_http_stop(m->http);
    if (m->timer) {
        g_source_remove(m->timer);
    }
    g_hash_table_destroy(m->spaces);
    g_hash_table_destroy(m->clients);
    g_string_free(m->text, TRUE);
    g_mutex_clear(&m->text_lock);
    g_free(m);
}

unsigned metrics_bucket(uint64_t us)
{
    unsigned k;

    if (us <= 1) {
        return 0;
    }
    k = 64 - __builtin_clzll(us - 1);       /* smallest k: us <= 2^k */
    return MIN(k, METRICS_BUCKETS);
}

static void metrics_observe(MetricsHist *h, int64_t us)
{
    uint64_t v = us > 0 ? (uint64_t)us : 0;

    h->bucket[metrics_bucket(v)]++;
    h->count++;
    h->sum_us += v;
}

/* The entry of @name in @table (new if there is room, else "(other)") */
static gpointer metrics_entry(GHashTable *table, const char *name,
                              unsigned max, size_t size)
{
    gpointer e = g_hash_table_lookup(table, name);

    if (e) {
        return e;
    }
    if (g_hash_table_size(table) >= max) {
        name = METRICS_OTHER;
        e = g_hash_table_lookup(table, name);
        if (e) {
            return e;
        }
    }
    e = g_malloc0(size);
    g_hash_table_insert(table, g_strdup(name), e);
    return e;
}

static MetricsSpace *metrics_space(ExtlockdMetrics *m, const char *name)
{
    return metrics_entry(m->spaces, name, METRICS_MAX_SPACES,
                         sizeof(MetricsSpace));
}

static MetricsClient *metrics_client(ExtlockdMetrics *m, const char *name)
{
    return metrics_entry(m->clients, name, METRICS_MAX_CLIENTS,
                         sizeof(MetricsClient));
}

void metrics_lock_event(ExtlockdServer *server, const char *event,
                        ExtlockLock *lock, const ExtlockExtent *part)
{
    ExtlockdSession *session = lock->owner;
    ExtlockdMetrics *m = server->metrics;
    MetricsSpace *ms;

    if (!m) {
        return;
    }
    if (!strcmp(event, "grant")) {
        ms = metrics_space(m, session->space->name);
        ms->grants++;
        metrics_observe(&ms->wait, lock->granted_us - lock->queued_us);
        metrics_client(m, session->client_id)->grants++;
    } else if (!strcmp(event, "release") && !part) {
        /* A partly released lock goes on: its hold ends later */
        ms = metrics_space(m, session->space->name);
        metrics_observe(&ms->hold, g_get_monotonic_time() - lock->granted_us);
    }
}

void metrics_wait(ExtlockdServer *server, ExtlockLock *lock)
{
    ExtlockdSession *session = lock->owner;

    if (server->metrics) {
        metrics_space(server->metrics, session->space->name)->waits++;
        metrics_client(server->metrics, session->client_id)->waits++;
    }
}

void metrics_revoke(ExtlockdServer *server, ExtlockLock *held)
{
    ExtlockdSession *session = held->owner;

    if (server->metrics) {
        metrics_space(server->metrics, session->space->name)->revokes++;
        metrics_client(server->metrics, session->client_id)->revokes++;
    }
}

void metrics_session_event(ExtlockdServer *server, const char *event)
{
    ExtlockdMetrics *m = server->metrics;

    if (!m) {
        return;
    }
    if (!strcmp(event, "expire")) {
        m->lease_expiries++;
    } else if (!strcmp(event, "fence-start")) {
        m->fence_started++;
    } else if (!strcmp(event, "fence-ok")) {
        m->fence_ok++;
    } else if (!strcmp(event, "fence-failed")) {
        m->fence_failed++;
    }
}

/* ------------------------------------------------------------------ */
/* status                                                             */

static json_object *metrics_hist_json(const MetricsHist *h)
{
    json_object *o = json_object_new_object();
    json_object *b = json_object_new_array();
    unsigned k;

    json_object_object_add(o, "count", json_object_new_int64(h->count));
    json_object_object_add(o, "sum-us", json_object_new_int64(h->sum_us));
    /* [upper bound in us (-1: none), count]; empty buckets left out */
    for (k = 0; k <= METRICS_BUCKETS; k++) {
        json_object *pair;

        if (!h->bucket[k]) {
            continue;
        }
        pair = json_object_new_array();
        json_object_array_add(pair, json_object_new_int64(
                                  k < METRICS_BUCKETS ? (int64_t)1 << k : -1));
        json_object_array_add(pair, json_object_new_int64(h->bucket[k]));
        json_object_array_add(b, pair);
    }
    json_object_object_add(o, "buckets", b);
    return o;
}

static int metrics_compare_keys(gconstpointer a, gconstpointer b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The keys of @table, sorted (the array holds no copies) */
static GPtrArray *metrics_sorted_keys(GHashTable *table)
{
    GPtrArray *keys = g_ptr_array_new();
    GHashTableIter iter;
    gpointer key;

    g_hash_table_iter_init(&iter, table);
    while (g_hash_table_iter_next(&iter, &key, NULL)) {
        g_ptr_array_add(keys, key);
    }
    g_ptr_array_sort(keys, metrics_compare_keys);
    return keys;
}

json_object *metrics_status_json(ExtlockdServer *server)
{
    ExtlockdMetrics *m = server->metrics;
    json_object *o = json_object_new_object();
    json_object *spaces = json_object_new_object();
    json_object *clients = json_object_new_object();
    g_autoptr(GPtrArray) skeys = metrics_sorted_keys(m->spaces);
    g_autoptr(GPtrArray) ckeys = metrics_sorted_keys(m->clients);
    guint i;

    for (i = 0; i < skeys->len; i++) {
        MetricsSpace *ms = g_hash_table_lookup(m->spaces, skeys->pdata[i]);
        json_object *s = json_object_new_object();

        json_object_object_add(s, "grants", json_object_new_int64(ms->grants));
        json_object_object_add(s, "waits", json_object_new_int64(ms->waits));
        json_object_object_add(s, "revokes",
                               json_object_new_int64(ms->revokes));
        json_object_object_add(s, "long-waits",
                               json_object_new_int64(ms->long_waits));
        json_object_object_add(s, "long-holds",
                               json_object_new_int64(ms->long_holds));
        json_object_object_add(s, "wait-us", metrics_hist_json(&ms->wait));
        json_object_object_add(s, "hold-us", metrics_hist_json(&ms->hold));
        json_object_object_add(spaces, skeys->pdata[i], s);
    }
    for (i = 0; i < ckeys->len; i++) {
        MetricsClient *mc = g_hash_table_lookup(m->clients, ckeys->pdata[i]);
        json_object *c = json_object_new_object();

        json_object_object_add(c, "grants", json_object_new_int64(mc->grants));
        json_object_object_add(c, "waits", json_object_new_int64(mc->waits));
        json_object_object_add(c, "revokes",
                               json_object_new_int64(mc->revokes));
        json_object_object_add(clients, ckeys->pdata[i], c);
    }
    json_object_object_add(o, "lock-spaces", spaces);
    json_object_object_add(o, "clients", clients);
    json_object_object_add(o, "lease-expiries",
                           json_object_new_int64(m->lease_expiries));
    json_object_object_add(o, "fence-started",
                           json_object_new_int64(m->fence_started));
    json_object_object_add(o, "fence-ok", json_object_new_int64(m->fence_ok));
    json_object_object_add(o, "fence-failed",
                           json_object_new_int64(m->fence_failed));
    json_object_object_add(o, "long-wait-ms",
                           json_object_new_int64(m->long_wait_ms));
    json_object_object_add(o, "long-hold-ms",
                           json_object_new_int64(m->long_hold_ms));
    return o;
}

/* ------------------------------------------------------------------ */
/* long holders and waiters                                           */

typedef struct LongCtx {
    ExtlockdServer *server;
    int64_t now;
    int64_t since;               /* the previous check */
    unsigned logged;
    ExtlockLock *holder;         /* first granted blocker found */
} LongCtx;

static bool metrics_log_allowed(LongCtx *ctx)
{
    if (ctx->logged >= METRICS_LONG_LOG_BURST) {
        ctx->server->metrics->long_log_suppressed++;
        return false;
    }
    ctx->logged++;
    return true;
}

static void metrics_long_event(ExtlockdServer *server, const char *event,
                               ExtlockLock *lock, const char *message)
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
        .offset = lock->node.ext.start,
        .length = lock->node.ext.end - lock->node.ext.start,
        .mode = lock->mode,
        .message = message,
    };

    if (server->event_log) {
        extlockd_event_log_write(server->event_log, &ev);
    }
}

static void metrics_holder_cb(ExtlockLock *blocker, void *opaque)
{
    LongCtx *ctx = opaque;

    if (!ctx->holder && blocker->state == EXTLOCK_LOCK_GRANTED) {
        ctx->holder = blocker;
    }
}

static void metrics_check_waiter(LongCtx *ctx, ExtlockLock *lock)
{
    ExtlockdServer *server = ctx->server;
    ExtlockdSession *session = lock->owner;
    int64_t cross = lock->queued_us +
                    (int64_t)server->metrics->long_wait_ms * 1000;
    g_autofree char *msg = NULL;

    if (cross <= ctx->since || cross > ctx->now) {
        return;                  /* not crossed in this period */
    }
    metrics_space(server->metrics, session->space->name)->long_waits++;
    ctx->holder = NULL;
    if (!lockspace_lock_is_deferred(lock)) {
        extlock_table_foreach_blocker_max(session->space->table, lock, 64,
                                          metrics_holder_cb, ctx);
    }
    if (ctx->holder) {
        ExtlockdSession *hs = ctx->holder->owner;

        msg = g_strdup_printf("%s (session %s) waits %" PRId64 " ms for "
                              "[%" PRIu64 ", +%" PRIu64 ") %s; held by %s "
                              "(session %s) for %" PRId64 " ms, lock %" PRIu64
                              " [%" PRIu64 ", +%" PRIu64 ") %s",
                              session->client_id, session->id,
                              (ctx->now - lock->queued_us) / 1000,
                              lock->node.ext.start,
                              lock->node.ext.end - lock->node.ext.start,
                              extlock_mode_name(lock->mode), hs->client_id,
                              hs->id,
                              (ctx->now - ctx->holder->granted_us) / 1000,
                              ctx->holder->id, ctx->holder->node.ext.start,
                              ctx->holder->node.ext.end -
                              ctx->holder->node.ext.start,
                              extlock_mode_name(ctx->holder->mode));
    } else {
        msg = g_strdup_printf("%s (session %s) waits %" PRId64 " ms for "
                              "[%" PRIu64 ", +%" PRIu64 ") %s; behind "
                              "earlier waiters or the grace period",
                              session->client_id, session->id,
                              (ctx->now - lock->queued_us) / 1000,
                              lock->node.ext.start,
                              lock->node.ext.end - lock->node.ext.start,
                              extlock_mode_name(lock->mode));
    }
    if (metrics_log_allowed(ctx)) {
        g_message("long wait in lock-space %s: %s", session->space->name,
                  msg);
    }
    metrics_long_event(server, "long-wait", lock, msg);
}

static void metrics_check_holder(LongCtx *ctx, ExtlockLock *lock)
{
    ExtlockdServer *server = ctx->server;
    ExtlockdSession *session = lock->owner;
    int64_t cross = lock->granted_us +
                    (int64_t)server->metrics->long_hold_ms * 1000;
    g_autofree char *msg = NULL;

    if (cross <= ctx->since || cross > ctx->now) {
        return;
    }
    metrics_space(server->metrics, session->space->name)->long_holds++;
    msg = g_strdup_printf("%s (session %s) holds lock %" PRIu64 " [%" PRIu64
                          ", +%" PRIu64 ") %s for %" PRId64 " ms",
                          session->client_id, session->id, lock->id,
                          lock->node.ext.start,
                          lock->node.ext.end - lock->node.ext.start,
                          extlock_mode_name(lock->mode),
                          (ctx->now - lock->granted_us) / 1000);
    if (metrics_log_allowed(ctx)) {
        g_message("long hold in lock-space %s: %s", session->space->name,
                  msg);
    }
    metrics_long_event(server, "long-hold", lock, msg);
}

void metrics_check_long(ExtlockdServer *server, int64_t now)
{
    ExtlockdMetrics *m = server->metrics;
    LongCtx ctx = {
        .server = server,
        .now = now,
        .since = m->last_check_us,
    };
    uint64_t suppressed = m->long_log_suppressed;
    GList *l;

    m->last_check_us = now;
    if (!m->long_wait_ms && !m->long_hold_ms) {
        return;
    }
    for (l = server->session_list.head; l; l = l->next) {
        ExtlockdSession *session = l->data;
        GHashTableIter iter;
        gpointer key;

        if (m->long_wait_ms) {
            g_hash_table_iter_init(&iter, session->waiting);
            while (g_hash_table_iter_next(&iter, &key, NULL)) {
                metrics_check_waiter(&ctx, key);
            }
        }
        if (m->long_hold_ms) {
            g_hash_table_iter_init(&iter, session->held);
            while (g_hash_table_iter_next(&iter, &key, NULL)) {
                metrics_check_holder(&ctx, key);
            }
        }
    }
    if (m->long_log_suppressed > suppressed) {
        g_message("%" PRIu64 " more long waits/holds not logged (at most %d "
                  "lines a second; all are in the event log and counters)",
                  m->long_log_suppressed - suppressed,
                  METRICS_LONG_LOG_BURST);
    }
}

/* ------------------------------------------------------------------ */
/* Prometheus text exposition format 0.0.4                            */

/* @s with \, " and newline escaped, as a label value needs */
static void metrics_append_label(GString *out, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"') {
            g_string_append_c(out, '\\');
            g_string_append_c(out, *s);
        } else if (*s == '\n') {
            g_string_append(out, "\\n");
        } else {
            g_string_append_c(out, *s);
        }
    }
}

static void metrics_header(GString *out, const char *name, const char *type,
                           const char *help)
{
    g_string_append_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help,
                           name, type);
}

static void metrics_sample(GString *out, const char *name, const char *label,
                           const char *value, uint64_t v)
{
    g_string_append(out, name);
    if (label) {
        g_string_append_printf(out, "{%s=\"", label);
        metrics_append_label(out, value);
        g_string_append(out, "\"}");
    }
    g_string_append_printf(out, " %" PRIu64 "\n", v);
}

static void metrics_hist_text(GString *out, const char *name,
                              const char *space, const MetricsHist *h)
{
    uint64_t cum = 0;
    unsigned k;

    for (k = 0; k <= METRICS_BUCKETS; k++) {
        cum += h->bucket[k];
        g_string_append_printf(out, "%s_bucket{lock_space=\"", name);
        metrics_append_label(out, space);
        if (k < METRICS_BUCKETS) {
            g_string_append_printf(out, "\",le=\"%.12g\"} %" PRIu64 "\n",
                                   (double)((uint64_t)1 << k) / 1e6, cum);
        } else {
            g_string_append_printf(out, "\",le=\"+Inf\"} %" PRIu64 "\n", cum);
        }
    }
    g_string_append_printf(out, "%s_sum{lock_space=\"", name);
    metrics_append_label(out, space);
    g_string_append_printf(out, "\"} %.6f\n", (double)h->sum_us / 1e6);
    g_string_append_printf(out, "%s_count{lock_space=\"", name);
    metrics_append_label(out, space);
    g_string_append_printf(out, "\"} %" PRIu64 "\n", h->count);
}

/* One counter or gauge per lock-space: the member at @offset */
static void metrics_space_family(GString *out, GPtrArray *keys,
                                 GHashTable *table, const char *name,
                                 const char *type, const char *help,
                                 size_t offset)
{
    guint i;

    metrics_header(out, name, type, help);
    for (i = 0; i < keys->len; i++) {
        const char *key = keys->pdata[i];
        const char *e = g_hash_table_lookup(table, key);

        metrics_sample(out, name, "lock_space", key,
                       *(const uint64_t *)(e + offset));
    }
}

static void metrics_client_family(GString *out, GPtrArray *keys,
                                  GHashTable *table, const char *name,
                                  const char *help, size_t offset)
{
    guint i;

    metrics_header(out, name, "counter", help);
    for (i = 0; i < keys->len; i++) {
        const char *key = keys->pdata[i];
        const char *e = g_hash_table_lookup(table, key);

        metrics_sample(out, name, "client_id", key,
                       *(const uint64_t *)(e + offset));
    }
}

GString *metrics_render(ExtlockdServer *server)
{
    ExtlockdMetrics *m = server->metrics;
    GString *out = g_string_sized_new(4096);
    g_autoptr(GPtrArray) skeys = metrics_sorted_keys(m->spaces);
    g_autoptr(GPtrArray) ckeys = metrics_sorted_keys(m->clients);
    GHashTableIter iter;
    gpointer value;
    uint64_t held = 0, waiting = 0, grace = 0;
    guint i;

    g_hash_table_iter_init(&iter, server->spaces);
    while (g_hash_table_iter_next(&iter, NULL, &value)) {
        grace += ((ExtlockdLockSpace *)value)->in_grace;
    }
    /* Deferred requests (grace period) are in the waiting sets too */
    g_hash_table_iter_init(&iter, server->sessions);
    while (g_hash_table_iter_next(&iter, NULL, &value)) {
        ExtlockdSession *session = value;

        held += g_hash_table_size(session->held);
        waiting += g_hash_table_size(session->waiting);
    }

    metrics_header(out, "extlock_lock_wait_seconds", "histogram",
                   "Time from lock request to grant.");
    for (i = 0; i < skeys->len; i++) {
        MetricsSpace *ms = g_hash_table_lookup(m->spaces, skeys->pdata[i]);

        metrics_hist_text(out, "extlock_lock_wait_seconds", skeys->pdata[i],
                          &ms->wait);
    }
    metrics_header(out, "extlock_lock_hold_seconds", "histogram",
                   "Time from grant to release of whole locks.");
    for (i = 0; i < skeys->len; i++) {
        MetricsSpace *ms = g_hash_table_lookup(m->spaces, skeys->pdata[i]);

        metrics_hist_text(out, "extlock_lock_hold_seconds", skeys->pdata[i],
                          &ms->hold);
    }
    metrics_space_family(out, skeys, m->spaces, "extlock_grants_total",
                         "counter", "Locks granted.",
                         G_STRUCT_OFFSET(MetricsSpace, grants));
    metrics_space_family(out, skeys, m->spaces, "extlock_waits_total",
                         "counter", "Lock requests that had to wait.",
                         G_STRUCT_OFFSET(MetricsSpace, waits));
    metrics_space_family(out, skeys, m->spaces, "extlock_revokes_total",
                         "counter", "Revoke messages sent to lock holders.",
                         G_STRUCT_OFFSET(MetricsSpace, revokes));
    metrics_space_family(out, skeys, m->spaces, "extlock_long_waits_total",
                         "counter", "Waits that outlasted --long-wait-ms.",
                         G_STRUCT_OFFSET(MetricsSpace, long_waits));
    metrics_space_family(out, skeys, m->spaces, "extlock_long_holds_total",
                         "counter", "Holds that outlasted --long-hold-ms.",
                         G_STRUCT_OFFSET(MetricsSpace, long_holds));
    metrics_client_family(out, ckeys, m->clients,
                          "extlock_client_grants_total",
                          "Locks granted, per client id.",
                          G_STRUCT_OFFSET(MetricsClient, grants));
    metrics_client_family(out, ckeys, m->clients,
                          "extlock_client_waits_total",
                          "Lock requests that had to wait, per client id.",
                          G_STRUCT_OFFSET(MetricsClient, waits));
    metrics_client_family(out, ckeys, m->clients,
                          "extlock_client_revokes_total",
                          "Revokes sent to the client, per client id.",
                          G_STRUCT_OFFSET(MetricsClient, revokes));

    metrics_header(out, "extlock_sessions", "gauge", "Sessions, by state.");
    {
        uint64_t n[3] = { 0 };

        g_hash_table_iter_init(&iter, server->sessions);
        while (g_hash_table_iter_next(&iter, NULL, &value)) {
            n[((ExtlockdSession *)value)->state]++;
        }
        for (i = 0; i < 3; i++) {
            metrics_sample(out, "extlock_sessions", "state",
                           session_state_names[i], n[i]);
        }
    }
    metrics_header(out, "extlock_connections", "gauge", "Client connections.");
    metrics_sample(out, "extlock_connections", NULL, NULL,
                   server->conns.length);
    metrics_header(out, "extlock_locks_held", "gauge", "Locks held.");
    metrics_sample(out, "extlock_locks_held", NULL, NULL, held);
    metrics_header(out, "extlock_requests_waiting", "gauge",
                   "Lock requests waiting.");
    metrics_sample(out, "extlock_requests_waiting", NULL, NULL, waiting);
    metrics_header(out, "extlock_lease_expiries_total", "counter",
                   "Sessions whose lease expired.");
    metrics_sample(out, "extlock_lease_expiries_total", NULL, NULL,
                   m->lease_expiries);
    metrics_header(out, "extlock_fence_events_total", "counter",
                   "Fence agent runs started and their outcomes.");
    metrics_sample(out, "extlock_fence_events_total", "result", "started",
                   m->fence_started);
    metrics_sample(out, "extlock_fence_events_total", "result", "ok",
                   m->fence_ok);
    metrics_sample(out, "extlock_fence_events_total", "result", "failed",
                   m->fence_failed);
    metrics_header(out, "extlock_grace_active", "gauge",
                   "Lock-spaces in their restart grace period.");
    metrics_sample(out, "extlock_grace_active", NULL, NULL, grace);
    metrics_header(out, "extlock_epoch", "gauge", "Current token epoch.");
    metrics_sample(out, "extlock_epoch", NULL, NULL, server->epoch);
    metrics_header(out, "extlock_messages_total", "counter",
                   "Protocol messages received.");
    metrics_sample(out, "extlock_messages_total", NULL, NULL,
                   server->nmessages);
    metrics_header(out, "extlock_errors_total", "counter",
                   "Error replies sent.");
    metrics_sample(out, "extlock_errors_total", NULL, NULL, server->nerrors);
    metrics_header(out, "extlock_uptime_seconds", "gauge",
                   "Seconds since extlockd started.");
    g_string_append_printf(out, "extlock_uptime_seconds %.3f\n",
                           (g_get_monotonic_time() - server->start_us) / 1e6);
    return out;
}

/* Once a second: long holders and waiters, and the text for scrapes */
static gboolean metrics_tick(gpointer opaque)
{
    ExtlockdServer *server = opaque;
    ExtlockdMetrics *m = server->metrics;

    metrics_check_long(server, g_get_monotonic_time());
    if (m->http) {
        GString *text = metrics_render(server);

        g_mutex_lock(&m->text_lock);
        g_string_free(m->text, TRUE);
        m->text = text;
        g_mutex_unlock(&m->text_lock);
    }
    return G_SOURCE_CONTINUE;
}

void metrics_start(ExtlockdServer *server)
{
    ExtlockdMetrics *m = server->metrics;

    m->long_wait_ms = server->cfg.long_wait_ms;
    m->long_hold_ms = server->cfg.long_hold_ms;
    m->last_check_us = g_get_monotonic_time();
    if (!m->timer && (m->long_wait_ms || m->long_hold_ms || m->http)) {
        metrics_tick(server);
        m->timer = g_timeout_add(1000, metrics_tick, server);
    }
}
