/*
 * extlockd: high availability through etcd (see ha.h)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Threads: the HA thread (lease, campaign, taking office), the monitor
 * thread (members and etcd health, for status), and the state writer's
 * thread calling extlockd_ha_write_state().  Each has its own EtcdClient.
 * The main loop only reads atomics and mutex-protected copies, so it never
 * waits for etcd (except extlockd_server's rare synchronous state writes).
 */
#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <json-c/json.h>

#include "etcd-client.h"
#include "event-log.h"
#include "ha.h"
#include "state-file.h"

/*
 * Keep-alives every TTL / 6: the leader's proof then never is older than
 * TTL / 6 when things work, which leaves TTL - margin - TTL / 6 (733 ms
 * with a 1 s TTL) to ride out an etcd leader election (etcd's election
 * timeout, 250 ms in tests/ha, plus the vote) without stepping down
 */
#define HA_KEEPALIVE_DIVISOR 6
/* How often a follower looks for a vacant leader key: TTL / 5 */
#define HA_POLL_DIVISOR     5
/* Health and members refresh for status */
#define HA_MONITOR_MS       1000

struct ExtlockdHa {
    char **endpoints;
    char *cluster, *member_id, *advertise;
    EtcdTls tls;
    char *cacert, *cert, *key;
    uint32_t ttl_ms;
    uint32_t margin_ms;
    char *event_log_path;
    char **argv;
    char *prefix, *leader_key, *state_key, *members_prefix, *member_key;

    EtcdClient *etcd;            /* HA thread */
    EtcdClient *writer_etcd;     /* state writer thread */
    EtcdClient *monitor_etcd;    /* monitor thread */
    GThread *thread, *monitor;
    ExtlockdHaElected *elected;
    void *elected_opaque;

    GMutex lock;                 /* protects the members below */
    GCond cond;
    bool quit;
    int64_t lease_id;
    int64_t leader_rev;          /* create_revision of our leader key */
    int64_t state_rev;           /* mod_revision of the state we wrote */
    uint64_t epoch;
    char *leader_id;             /* as last seen */
    char *leader_addr;
    json_object *health;         /* monitor's last view */

    _Atomic bool leading;
    _Atomic int64_t deadline_us; /* the leader's lease is alive until then */
    _Atomic int stepping_down;
    /*
     * Testing hook, UNSAFE: EXTLOCKD_TEST_HA_NO_STEP_DOWN=1 keeps a leader
     * serving after its etcd lease lapsed, so that tests/ha can show that
     * they catch exactly that
     */
    bool no_step_down;
};

typedef struct Elected {
    ExtlockdHa *ha;
    uint64_t epoch;
    GPtrArray *sessions;
    char *reservations;          /* JSON text, or NULL */
    char *maintenance;           /* JSON text, or NULL */
} Elected;

static void ha_event(ExtlockdHa *ha, const char *event, const char *msg)
{
    g_autoptr(GError) err = NULL;
    ExtlockdEventLog *log;
    ExtlockdEvent ev = { .event = event, .message = msg };

    if (!ha->event_log_path) {
        return;
    }
    /* Its own handle: lines are single O_APPEND writes */
    log = extlockd_event_log_open(ha->event_log_path, &err);
    if (log) {
        extlockd_event_log_write(log, &ev);
        extlockd_event_log_close(log);
    }
}

/*
 * Stop being anything at once: the process is replaced by a fresh
 * follower.  Whatever was queued for clients and not yet sent is lost,
 * which is the point.
 */
static void G_GNUC_NORETURN ha_step_down(ExtlockdHa *ha, const char *why)
{
    DIR *d;
    struct dirent *de;

    if (atomic_exchange(&ha->stepping_down, 1)) {
        for (;;) {
            g_usleep(G_USEC_PER_SEC);   /* the other caller execs */
        }
    }
    atomic_store(&ha->leading, false);
    ha_event(ha, "step-down", why);
    g_warning("stepping down (%s): restarting as a follower", why);
    d = opendir("/proc/self/fd");
    while (d && (de = readdir(d))) {
        int fd = atoi(de->d_name);

        if (fd > 2 && fd != dirfd(d)) {
            fcntl(fd, F_SETFD, FD_CLOEXEC);
        }
    }
    g_setenv(EXTLOCKD_HA_RESTART_ENV, "1", TRUE);
    execv("/proc/self/exe", ha->argv);
    g_critical("cannot re-execute extlockd after stepping down: %s",
               g_strerror(errno));
    _exit(75);
}

void extlockd_ha_assert_lease(ExtlockdHa *ha)
{
    if (!ha->no_step_down && atomic_load(&ha->leading) &&
        g_get_monotonic_time() >= atomic_load(&ha->deadline_us)) {
        ha_step_down(ha, "the etcd lease cannot be proven alive");
    }
}

bool extlockd_ha_leading(ExtlockdHa *ha)
{
    return atomic_load(&ha->leading);
}

char *extlockd_ha_leader_address(ExtlockdHa *ha)
{
    char *a;

    g_mutex_lock(&ha->lock);
    a = g_strdup(ha->leader_addr);
    g_mutex_unlock(&ha->lock);
    return a;
}

static bool cluster_name_ok(const char *s)
{
    if (!s || !*s || strlen(s) > 128) {
        return false;
    }
    for (; *s; s++) {
        if (!g_ascii_isalnum(*s) && !strchr("-_.", *s)) {
            return false;
        }
    }
    return true;
}

ExtlockdHa *extlockd_ha_new(const ExtlockdHaConfig *cfg, GError **errp)
{
    ExtlockdHa *ha;

    if (!cfg->endpoints || !cfg->endpoints[0]) {
        g_set_error(errp, EXTLOCKD_ETCD_ERROR, EXTLOCKD_ETCD_ERROR_CONFIG,
                    "--etcd-endpoints lists no endpoint");
        return NULL;
    }
    for (int i = 0; cfg->endpoints[i]; i++) {
        const char *e = cfg->endpoints[i];

        if ((!g_str_has_prefix(e, "http://") &&
             !g_str_has_prefix(e, "https://")) || strchr(e, ' ') ||
            g_str_has_suffix(e, "/")) {
            g_set_error(errp, EXTLOCKD_ETCD_ERROR, EXTLOCKD_ETCD_ERROR_CONFIG,
                        "--etcd-endpoints: '%s' is not http(s)://HOST:PORT",
                        e);
            return NULL;
        }
    }
    if (!cluster_name_ok(cfg->cluster)) {
        g_set_error(errp, EXTLOCKD_ETCD_ERROR, EXTLOCKD_ETCD_ERROR_CONFIG,
                    "--cluster '%s': 1..128 letters, digits, '-', '_', '.'",
                    cfg->cluster ? cfg->cluster : "");
        return NULL;
    }
    if (!cluster_name_ok(cfg->member_id)) {
        g_set_error(errp, EXTLOCKD_ETCD_ERROR, EXTLOCKD_ETCD_ERROR_CONFIG,
                    "--member-id '%s': 1..128 letters, digits, '-', '_', "
                    "'.'", cfg->member_id ? cfg->member_id : "");
        return NULL;
    }
    if (cfg->ttl_ms < EXTLOCKD_HA_MIN_TTL_MS ||
        cfg->ttl_ms > EXTLOCKD_HA_MAX_TTL_MS || cfg->ttl_ms % 1000) {
        g_set_error(errp, EXTLOCKD_ETCD_ERROR, EXTLOCKD_ETCD_ERROR_CONFIG,
                    "--etcd-lease-ttl-ms %u: a multiple of 1000 in [%d, %d] "
                    "(etcd counts lease TTLs in seconds)", cfg->ttl_ms,
                    EXTLOCKD_HA_MIN_TTL_MS, EXTLOCKD_HA_MAX_TTL_MS);
        return NULL;
    }
    if (!!cfg->cert != !!cfg->key) {
        g_set_error(errp, EXTLOCKD_ETCD_ERROR, EXTLOCKD_ETCD_ERROR_CONFIG,
                    "--etcd-cert and --etcd-key go together");
        return NULL;
    }
    ha = g_new0(ExtlockdHa, 1);
    ha->endpoints = g_strdupv(cfg->endpoints);
    ha->cluster = g_strdup(cfg->cluster);
    ha->member_id = g_strdup(cfg->member_id);
    ha->advertise = g_strdup(cfg->advertise);
    ha->cacert = g_strdup(cfg->cacert);
    ha->cert = g_strdup(cfg->cert);
    ha->key = g_strdup(cfg->key);
    ha->tls.cacert = ha->cacert;
    ha->tls.cert = ha->cert;
    ha->tls.key = ha->key;
    ha->ttl_ms = cfg->ttl_ms;
    /* etcd's clock and ours: rates agree to far better than 10 % */
    ha->margin_ms = MAX(cfg->ttl_ms / 10, 50);
    ha->event_log_path = g_strdup(cfg->event_log);
    ha->argv = g_strdupv(cfg->argv);
    ha->prefix = g_strdup_printf("/extlock/%s/", cfg->cluster);
    ha->leader_key = g_strconcat(ha->prefix, "leader", NULL);
    ha->state_key = g_strconcat(ha->prefix, "state", NULL);
    ha->members_prefix = g_strconcat(ha->prefix, "members/", NULL);
    ha->member_key = g_strconcat(ha->members_prefix, cfg->member_id, NULL);
    ha->etcd = etcd_client_new((const char *const *)ha->endpoints, &ha->tls,
                               2000);
    ha->writer_etcd = etcd_client_new((const char *const *)ha->endpoints,
                                      &ha->tls, 2000);
    ha->monitor_etcd = etcd_client_new((const char *const *)ha->endpoints,
                                       &ha->tls, 1000);
    g_mutex_init(&ha->lock);
    g_cond_init(&ha->cond);
    if (g_getenv("EXTLOCKD_TEST_HA_NO_STEP_DOWN")) {
        ha->no_step_down = true;
        g_warning("EXTLOCKD_TEST_HA_NO_STEP_DOWN: this leader keeps serving "
                  "after its etcd lease lapsed (UNSAFE, testing only)");
    }
    return ha;
}

/* The member @key of a state object as JSON text, or NULL */
static char *ha_state_member(const char *state, size_t len, const char *key)
{
    json_tokener *tok = json_tokener_new();
    json_object *obj = json_tokener_parse_ex(tok, state, (int)len);
    json_object *r;
    char *text = NULL;

    json_tokener_free(tok);
    if (obj && json_object_object_get_ex(obj, key, &r)) {
        text = g_strdup(json_object_to_json_string_ext(
            r, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
    }
    json_object_put(obj);
    return text;
}

/*
 * @text (a state object from extlockd_state_format(), g_free()d) with the
 * "maintenance" and "reservations" members of the state object @state
 * (@len bytes) appended as they are; their JSON texts (or NULL if absent)
 * in *@maintenance and *@reservations if these are not NULL
 */
static char *ha_state_carry(char *text, const char *state, size_t len,
                            char **maintenance, char **reservations)
{
    static const char *const keys[] = { "maintenance", "reservations" };
    char **out[] = { maintenance, reservations };

    for (size_t i = 0; i < G_N_ELEMENTS(keys); i++) {
        char *member = ha_state_member(state, len, keys[i]);

        if (member) {
            char *with = g_strdup_printf("%.*s,\"%s\":%s}\n",
                                         (int)strlen(text) - 2, text,
                                         keys[i], member);

            g_free(text);
            text = with;
        }
        if (out[i]) {
            *out[i] = member;
        } else {
            g_free(member);
        }
    }
    return text;
}

bool extlockd_ha_check(ExtlockdHa *ha, bool create, uint64_t create_epoch,
                       GPtrArray *create_sessions, const char *create_state,
                       size_t create_state_len, unsigned timeout_ms,
                       bool *created, GError **errp)
{
    int64_t deadline = g_get_monotonic_time() + timeout_ms * 1000LL;
    g_autoptr(GError) err = NULL;
    g_autoptr(GPtrArray) sessions = NULL;
    g_autofree char *endpoints = g_strjoinv(",", ha->endpoints);
    EtcdKv *kv = NULL;
    uint64_t epoch;

    if (created) {
        *created = false;
    }
    /* Wait for etcd: a cluster that is starting may need a moment */
    while (!etcd_get(ha->etcd, ha->state_key, &kv, deadline, &err)) {
        if (g_get_monotonic_time() + 100000 >= deadline) {
            g_set_error(errp, EXTLOCKD_ETCD_ERROR,
                        EXTLOCKD_ETCD_ERROR_TRANSPORT,
                        "etcd (%s) did not answer within %u ms: %s",
                        endpoints, timeout_ms, err->message);
            return false;
        }
        g_clear_error(&err);
        g_usleep(100000);
    }
    if (!kv && create) {
        g_autoptr(GArray) list = g_array_new(FALSE, FALSE,
                                             sizeof(ExtlockdStateSession));
        g_autofree char *text = NULL;
        g_autoptr(EtcdTxn) t = etcd_txn_new();
        bool ok;

        for (guint i = 0; create_sessions && i < create_sessions->len; i++) {
            g_array_append_val(list, *(ExtlockdStateSession *)
                               create_sessions->pdata[i]);
        }
        text = extlockd_state_format(create_epoch,
                                     (ExtlockdStateSession *)list->data,
                                     list->len, errp);

        if (!text) {
            return false;
        }
        if (create_state) {
            /* As a new leader carries them into its epoch bump */
            text = ha_state_carry(g_steal_pointer(&text), create_state,
                                  create_state_len, NULL, NULL);
        }
        etcd_txn_cmp_rev(t, ha->state_key, ETCD_CMP_CREATE, 0);
        etcd_txn_put(t, ha->state_key, text, 0);
        if (created) {
            *created = true;    /* if the commit fails: it may have */
        }
        if (!etcd_txn_commit(ha->etcd, t, &ok, NULL, NULL, deadline, errp)) {
            return false;
        }
        g_message("cluster %s %s in etcd (%s) with epoch %" PRIu64,
                  ha->cluster, ok ? "created" : "was created meanwhile",
                  endpoints, create_epoch);
        if (created) {
            *created = ok;
        }
        if (!etcd_get(ha->etcd, ha->state_key, &kv, deadline, errp)) {
            return false;
        }
    }
    if (!kv) {
        g_set_error(errp, EXTLOCKD_ETCD_ERROR, EXTLOCKD_ETCD_ERROR_CONFIG,
                    "cluster '%s' does not exist in etcd (%s): no key %s.  "
                    "Check --cluster; a new cluster is created once with "
                    "--create-cluster", ha->cluster, endpoints,
                    ha->state_key);
        return false;
    }
    if (!extlockd_state_parse(ha->state_key, kv->value, kv->value_len, &epoch,
                              &sessions, errp)) {
        etcd_kv_free(kv);
        return false;
    }
    g_message("cluster %s in etcd (%s): epoch %" PRIu64 ", %u session(s)",
              ha->cluster, endpoints, epoch, sessions->len);
    etcd_kv_free(kv);
    return true;
}

/* ------------------------------------------------------------------ */
/* The HA thread                                                       */

static bool ha_quit(ExtlockdHa *ha)
{
    bool q;

    g_mutex_lock(&ha->lock);
    q = ha->quit;
    g_mutex_unlock(&ha->lock);
    return q;
}

/* Wait until @when_us or quit; true if quitting */
static bool ha_wait(ExtlockdHa *ha, int64_t when_us)
{
    bool q;

    g_mutex_lock(&ha->lock);
    while (!ha->quit && g_get_monotonic_time() < when_us) {
        g_cond_wait_until(&ha->cond, &ha->lock, when_us);
    }
    q = ha->quit;
    g_mutex_unlock(&ha->lock);
    return q;
}

static char *member_value(ExtlockdHa *ha)
{
    json_object *o = json_object_new_object();
    char *s;

    json_object_object_add(o, "member-id",
                           json_object_new_string(ha->member_id));
    json_object_object_add(o, "address",
                           json_object_new_string(ha->advertise));
    s = g_strdup(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN));
    json_object_put(o);
    return s;
}

/* A lease and our member key on it; false if quitting */
static bool ha_join(ExtlockdHa *ha)
{
    g_autofree char *value = member_value(ha);
    bool warned = false;

    while (!ha_quit(ha)) {
        g_autoptr(GError) err = NULL;
        int64_t id, ttl_s;

        if (etcd_lease_grant(ha->etcd, ha->ttl_ms / 1000, &id, &ttl_s, 0,
                             &err) &&
            etcd_put(ha->etcd, ha->member_key, value, id, 0, &err)) {
            if (ttl_s * 1000 != ha->ttl_ms) {
                g_warning("etcd granted a lease of %" PRId64 " s, not the "
                          "%u ms asked for (etcd's minimum TTL is 3 x its "
                          "election timeout): using %" PRId64 " s", ttl_s,
                          ha->ttl_ms, ttl_s);
                ha->ttl_ms = ttl_s * 1000;
                ha->margin_ms = MAX(ha->ttl_ms / 10, 50);
            }
            g_mutex_lock(&ha->lock);
            ha->lease_id = id;
            g_mutex_unlock(&ha->lock);
            g_message("member %s joined cluster %s (etcd lease %" PRIx64
                      ", %" PRId64 " s)", ha->member_id, ha->cluster, id,
                      ttl_s);
            return true;
        }
        if (!warned) {
            g_warning("cannot join cluster %s in etcd (retrying): %s",
                      ha->cluster, err->message);
            warned = true;
        }
        ha_wait(ha, g_get_monotonic_time() + 200000);
    }
    return false;
}

static void ha_set_leader(ExtlockdHa *ha, const char *id)
{
    g_autofree char *addr = NULL;

    g_mutex_lock(&ha->lock);
    if (g_strcmp0(id, ha->leader_id) == 0 && (!id || ha->leader_addr)) {
        g_mutex_unlock(&ha->lock);
        return;
    }
    g_mutex_unlock(&ha->lock);
    if (id) {
        g_autofree char *key = g_strconcat(ha->members_prefix, id, NULL);
        EtcdKv *kv = NULL;

        if (etcd_get(ha->etcd, key, &kv, 0, NULL) && kv) {
            json_object *o = json_tokener_parse(kv->value), *v;

            if (o && json_object_object_get_ex(o, "address", &v)) {
                addr = g_strdup(json_object_get_string(v));
            }
            json_object_put(o);
        }
        etcd_kv_free(kv);
    }
    g_mutex_lock(&ha->lock);
    if (g_strcmp0(id, ha->leader_id) != 0) {
        g_message("cluster %s: leader is %s%s%s", ha->cluster,
                  id ? id : "(none)", addr ? " at " : "", addr ? addr : "");
    }
    g_free(ha->leader_id);
    ha->leader_id = g_strdup(id);
    g_free(ha->leader_addr);
    ha->leader_addr = g_steal_pointer(&addr);
    g_mutex_unlock(&ha->lock);
}

static gboolean elected_in_main(gpointer opaque)
{
    Elected *e = opaque;

    e->ha->elected(e->epoch, e->sessions, e->reservations, e->maintenance,
                   e->ha->elected_opaque);
    g_free(e->reservations);
    g_free(e->maintenance);
    g_free(e);
    return G_SOURCE_REMOVE;
}

/*
 * We hold the leader key (created at @rev): bump the epoch in the state,
 * CAS on its mod_revision and on our leader key, then tell the main loop
 */
static void ha_take_office(ExtlockdHa *ha, int64_t rev)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(GPtrArray) sessions = NULL;
    g_autoptr(GArray) list = NULL;
    g_autofree char *text = NULL;
    g_autofree char *why = NULL;
    g_autoptr(EtcdTxn) t = etcd_txn_new();
    int64_t deadline = atomic_load(&ha->deadline_us);
    EtcdKv *kv = NULL;
    uint64_t epoch;
    int64_t new_rev;
    bool ok;
    Elected *e;
    g_autofree char *reservations = NULL;
    g_autofree char *maintenance = NULL;

    if (!etcd_get(ha->etcd, ha->state_key, &kv, deadline, &err) || !kv) {
        why = g_strdup_printf("elected, but cannot read %s: %s",
                              ha->state_key, kv ? err->message : "absent");
        etcd_kv_free(kv);
        ha_step_down(ha, why);
    }
    if (!extlockd_state_parse(ha->state_key, kv->value, kv->value_len, &epoch,
                              &sessions, &err)) {
        g_critical("%s", err->message);
        _exit(1);
    }
    epoch++;
    list = g_array_new(FALSE, FALSE, sizeof(ExtlockdStateSession));
    for (guint i = 0; i < sessions->len; i++) {
        g_array_append_val(list, *(ExtlockdStateSession *)sessions->pdata[i]);
    }
    text = extlockd_state_format(epoch, (ExtlockdStateSession *)list->data,
                                 list->len, &err);
    if (!text) {
        g_critical("%s", err->message);
        _exit(1);
    }
    /*
     * The maintenance counts (a new leader must send the maint-gen the
     * old one sent, or a higher one: docs/protocol.rst "Maintenance") and
     * the persistent reservations stay with the new epoch, as they were:
     * the new leader loads them in elected_in_main(), so a leader that
     * dies before it writes the state again loses nothing either
     */
    text = ha_state_carry(g_steal_pointer(&text), kv->value, kv->value_len,
                          &maintenance, &reservations);
    etcd_txn_cmp_rev(t, ha->state_key, ETCD_CMP_MOD, kv->mod_revision);
    etcd_txn_cmp_rev(t, ha->leader_key, ETCD_CMP_CREATE, rev);
    etcd_txn_put(t, ha->state_key, text, 0);
    etcd_kv_free(kv);
    if (!etcd_txn_commit(ha->etcd, t, &ok, &new_rev, NULL, deadline, &err)) {
        why = g_strdup_printf("elected, but cannot write the new epoch: %s",
                              err->message);
        ha_step_down(ha, why);
    }
    if (!ok) {
        ha_step_down(ha, "elected, but the state or the leader key changed "
                     "meanwhile");
    }
    g_mutex_lock(&ha->lock);
    ha->leader_rev = rev;
    ha->state_rev = new_rev;
    ha->epoch = epoch;
    g_mutex_unlock(&ha->lock);
    atomic_store(&ha->leading, true);
    why = g_strdup_printf("member %s leads cluster %s in epoch %" PRIu64,
                          ha->member_id, ha->cluster, epoch);
    g_message("%s", why);
    ha_event(ha, "elected", why);
    e = g_new0(Elected, 1);
    e->ha = ha;
    e->epoch = epoch;
    e->sessions = g_steal_pointer(&sessions);
    e->reservations = g_steal_pointer(&reservations);
    e->maintenance = g_steal_pointer(&maintenance);
    g_idle_add_full(G_PRIORITY_HIGH, elected_in_main, e, NULL);
}

/* One campaign round: txn create_revision(leader) == 0 -> put */
static void ha_campaign(ExtlockdHa *ha)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(EtcdTxn) t = etcd_txn_new();
    EtcdKv *other = NULL;
    int64_t rev;
    bool ok;

    etcd_txn_cmp_rev(t, ha->leader_key, ETCD_CMP_CREATE, 0);
    etcd_txn_put(t, ha->leader_key, ha->member_id, ha->lease_id);
    etcd_txn_else_get(t, ha->leader_key);
    if (!etcd_txn_commit(ha->etcd, t, &ok, &rev, &other, 0, &err)) {
        return;
    }
    if (ok) {
        ha_set_leader(ha, ha->member_id);
        ha_take_office(ha, rev);
    } else {
        ha_set_leader(ha, other ? other->value : NULL);
        /* Our own key from before a restart of this process: wait it out */
    }
    etcd_kv_free(other);
}

static gpointer ha_thread(gpointer opaque)
{
    ExtlockdHa *ha = opaque;
    int64_t next_ka = 0, next_poll = 0;
    bool warned = false;

    if (!ha_join(ha)) {
        return NULL;
    }
    /* The lease was just granted: it lives at least this long */
    atomic_store(&ha->deadline_us, g_get_monotonic_time() +
                 (int64_t)(ha->ttl_ms - ha->margin_ms) * 1000);
    next_ka = g_get_monotonic_time() +
              ha->ttl_ms * 1000LL / HA_KEEPALIVE_DIVISOR;
    while (!ha_quit(ha)) {
        int64_t now = g_get_monotonic_time();
        int64_t wake;

        if (!atomic_load(&ha->leading) && now >= next_poll) {
            ha_campaign(ha);
            next_poll = g_get_monotonic_time() +
                        ha->ttl_ms * 1000LL / HA_POLL_DIVISOR;
        }
        now = g_get_monotonic_time();
        if (now >= next_ka) {
            g_autoptr(GError) err = NULL;
            int64_t sent = g_get_monotonic_time();
            int64_t ttl_s = 0;
            int64_t limit = atomic_load(&ha->leading) ?
                            atomic_load(&ha->deadline_us) :
                            sent + ha->ttl_ms * 1000LL;

            if (etcd_lease_keepalive(ha->etcd, ha->lease_id, &ttl_s,
                                     MAX(limit, sent + 50000), &err)) {
                if (ttl_s > 0) {
                    int64_t d = sent + (ttl_s * 1000 - ha->margin_ms) * 1000;

                    atomic_store(&ha->deadline_us, d);
                    next_ka = sent + ttl_s * 1000000 / HA_KEEPALIVE_DIVISOR;
                    if (warned) {
                        g_message("etcd lease keep-alive works again");
                        warned = false;
                    }
                } else if (atomic_load(&ha->leading) && !ha->no_step_down) {
                    ha_step_down(ha, "etcd says our lease has expired");
                } else {
                    g_warning("our etcd lease expired: joining again");
                    if (!ha_join(ha)) {
                        break;
                    }
                    next_ka = g_get_monotonic_time() +
                              ha->ttl_ms * 1000LL / HA_KEEPALIVE_DIVISOR;
                }
            } else {
                if (!warned) {
                    g_warning("etcd lease keep-alive failed (%s lease): %s",
                              atomic_load(&ha->leading) ? "leader" :
                              "follower", err->message);
                    warned = true;
                }
                next_ka = g_get_monotonic_time() + 50000;
            }
        }
        if (atomic_load(&ha->leading) && !ha->no_step_down &&
            g_get_monotonic_time() >= atomic_load(&ha->deadline_us)) {
            ha_step_down(ha, "the etcd lease cannot be proven alive");
        }
        wake = next_ka;
        if (atomic_load(&ha->leading) && !ha->no_step_down) {
            wake = MIN(wake, atomic_load(&ha->deadline_us));
        } else {
            wake = MIN(wake, next_poll);
        }
        ha_wait(ha, wake);
    }
    return NULL;
}

/* ------------------------------------------------------------------ */
/* The monitor thread: members and etcd health, for status             */

static gpointer ha_monitor(gpointer opaque)
{
    ExtlockdHa *ha = opaque;
    bool quorum_reported = true;

    while (!ha_quit(ha)) {
        int64_t deadline = g_get_monotonic_time() + 800000;
        json_object *h = json_object_new_object();
        json_object *eps = json_object_new_array();
        json_object *members = json_object_new_array();
        g_autoptr(GPtrArray) kvs = NULL;
        unsigned healthy = 0, with_leader = 0;

        for (int i = 0; ha->endpoints[i]; i++) {
            g_autoptr(GError) err = NULL;
            json_object *e = json_object_new_object();
            EtcdStatus st;

            json_object_object_add(e, "endpoint",
                                   json_object_new_string(ha->endpoints[i]));
            if (etcd_endpoint_status(ha->monitor_etcd, ha->endpoints[i], &st,
                                     deadline, &err)) {
                char buf[24];

                healthy++;
                with_leader += st.leader != 0;
                json_object_object_add(e, "healthy",
                                       json_object_new_boolean(st.leader));
                json_object_object_add(e, "version",
                                       json_object_new_string(st.version ?
                                                              st.version :
                                                              ""));
                snprintf(buf, sizeof(buf), "%" PRIx64, st.member_id);
                json_object_object_add(e, "member", json_object_new_string(
                                           buf));
                snprintf(buf, sizeof(buf), "%" PRIx64, st.leader);
                json_object_object_add(e, "leader", json_object_new_string(
                                           buf));
                json_object_object_add(e, "raft-term",
                                       json_object_new_int64(st.raft_term));
                etcd_status_clear(&st);
            } else {
                json_object_object_add(e, "healthy",
                                       json_object_new_boolean(false));
                json_object_object_add(e, "error",
                                       json_object_new_string(err->message));
            }
            json_object_array_add(eps, e);
        }
        kvs = etcd_get_prefix(ha->monitor_etcd, ha->members_prefix,
                              deadline + 500000, NULL);
        for (guint i = 0; kvs && i < kvs->len; i++) {
            EtcdKv *kv = kvs->pdata[i];
            json_object *o = json_tokener_parse(kv->value);

            if (o) {
                json_object_array_add(members, o);
            }
        }
        /* The epoch as etcd has it (a follower's status shows it) */
        {
            EtcdKv *kv = NULL;

            if (etcd_get(ha->monitor_etcd, ha->state_key, &kv,
                         deadline + 500000, NULL) && kv) {
                g_autoptr(GPtrArray) ss = NULL;
                uint64_t epoch;

                if (extlockd_state_parse(ha->state_key, kv->value,
                                         kv->value_len, &epoch, &ss, NULL)) {
                    json_object_object_add(h, "cluster-epoch",
                                           json_object_new_int64(epoch));
                    json_object_object_add(h, "cluster-sessions",
                                           json_object_new_int64(ss->len));
                }
            }
            etcd_kv_free(kv);
        }
        /* A quorum answers reads; "leader" set on the members we reach */
        json_object_object_add(h, "endpoints", eps);
        json_object_object_add(h, "quorum", json_object_new_boolean(
                                   kvs != NULL && with_leader > 0));
        json_object_object_add(h, "members", members);
        if ((kvs != NULL && with_leader > 0) != quorum_reported) {
            quorum_reported = !quorum_reported;
            if (quorum_reported) {
                g_message("etcd: quorum is back (%u of %u endpoints "
                          "answer)", healthy, g_strv_length(ha->endpoints));
            } else {
                g_warning("etcd: NO QUORUM (%u of %u endpoints answer, %u "
                          "with a leader): no new leader can be elected "
                          "and the leader steps down when its lease lapses",
                          healthy, g_strv_length(ha->endpoints),
                          with_leader);
            }
        }
        g_mutex_lock(&ha->lock);
        json_object_put(ha->health);
        ha->health = h;
        g_mutex_unlock(&ha->lock);
        ha_wait(ha, g_get_monotonic_time() + HA_MONITOR_MS * 1000);
    }
    return NULL;
}

json_object *extlockd_ha_status(ExtlockdHa *ha)
{
    json_object *o = json_object_new_object();
    int64_t now = g_get_monotonic_time();
    bool leading = atomic_load(&ha->leading);

    g_mutex_lock(&ha->lock);
    json_object_object_add(o, "cluster", json_object_new_string(ha->cluster));
    json_object_object_add(o, "member-id",
                           json_object_new_string(ha->member_id));
    json_object_object_add(o, "address",
                           json_object_new_string(ha->advertise));
    json_object_object_add(o, "role", json_object_new_string(
                               leading ? "leader" : "follower"));
    if (ha->leader_id) {
        json_object_object_add(o, "leader",
                               json_object_new_string(ha->leader_id));
    }
    if (ha->leader_addr) {
        json_object_object_add(o, "leader-address",
                               json_object_new_string(ha->leader_addr));
    }
    json_object_object_add(o, "etcd-lease-ttl-ms",
                           json_object_new_int64(ha->ttl_ms));
    if (leading) {
        json_object_object_add(o, "epoch", json_object_new_int64(ha->epoch));
        json_object_object_add(o, "lease-proven-ms", json_object_new_int64(
                                   MAX(0, (atomic_load(&ha->deadline_us) -
                                           now) / 1000)));
    }
    if (ha->health) {
        json_object_object_foreach(ha->health, k, v) {
            json_object_object_add(o, k, json_object_get(v));
        }
    }
    g_mutex_unlock(&ha->lock);
    return o;
}

void extlockd_ha_start(ExtlockdHa *ha, ExtlockdHaElected *elected,
                       void *opaque)
{
    ha->elected = elected;
    ha->elected_opaque = opaque;
    ha->thread = g_thread_new("extlockd-ha", ha_thread, ha);
    ha->monitor = g_thread_new("extlockd-ha-mon", ha_monitor, ha);
}

/* ------------------------------------------------------------------ */
/* Durable state                                                       */

bool extlockd_ha_write_state(const char *text, void *opaque, GError **errp)
{
    ExtlockdHa *ha = opaque;
    g_autoptr(EtcdTxn) t = etcd_txn_new();
    int64_t state_rev, leader_rev, rev;
    bool ok;

    g_mutex_lock(&ha->lock);
    state_rev = ha->state_rev;
    leader_rev = ha->leader_rev;
    g_mutex_unlock(&ha->lock);
    if (!atomic_load(&ha->leading)) {
        g_set_error(errp, EXTLOCKD_ETCD_ERROR, EXTLOCKD_ETCD_ERROR_SERVER,
                    "not the leader: the state is not written");
        return false;
    }
    etcd_txn_cmp_rev(t, ha->state_key, ETCD_CMP_MOD, state_rev);
    etcd_txn_cmp_rev(t, ha->leader_key, ETCD_CMP_CREATE, leader_rev);
    etcd_txn_put(t, ha->state_key, text, 0);
    if (!etcd_txn_commit(ha->writer_etcd, t, &ok, &rev, NULL,
                         atomic_load(&ha->deadline_us), errp)) {
        return false;
    }
    if (!ok) {
        ha_step_down(ha, "the state in etcd or the leader key changed under "
                     "us: another leader");
    }
    g_mutex_lock(&ha->lock);
    ha->state_rev = rev;
    g_mutex_unlock(&ha->lock);
    return true;
}

void extlockd_ha_free(ExtlockdHa *ha)
{
    if (!ha) {
        return;
    }
    g_mutex_lock(&ha->lock);
    ha->quit = true;
    g_cond_broadcast(&ha->cond);
    g_mutex_unlock(&ha->lock);
    if (ha->thread) {
        g_thread_join(ha->thread);
    }
    if (ha->monitor) {
        g_thread_join(ha->monitor);
    }
    atomic_store(&ha->leading, false);
    if (ha->lease_id) {
        g_autoptr(GError) err = NULL;

        /* The leader key and our member key go with it: fast failover */
        if (!etcd_lease_revoke(ha->etcd, ha->lease_id, 0, &err)) {
            g_warning("cannot revoke the etcd lease (the next leader waits "
                      "for it to expire): %s", err->message);
        }
    }
    etcd_client_free(ha->etcd);
    etcd_client_free(ha->writer_etcd);
    etcd_client_free(ha->monitor_etcd);
    json_object_put(ha->health);
    g_strfreev(ha->endpoints);
    g_strfreev(ha->argv);
    g_free(ha->cluster);
    g_free(ha->member_id);
    g_free(ha->advertise);
    g_free(ha->cacert);
    g_free(ha->cert);
    g_free(ha->key);
    g_free(ha->event_log_path);
    g_free(ha->prefix);
    g_free(ha->leader_key);
    g_free(ha->state_key);
    g_free(ha->members_prefix);
    g_free(ha->member_key);
    g_free(ha->leader_id);
    g_free(ha->leader_addr);
    g_mutex_clear(&ha->lock);
    g_cond_clear(&ha->cond);
    g_free(ha);
}
