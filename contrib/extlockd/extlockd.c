/*
 * extlockd: extent lock coordinator daemon (options, logging, signals)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <glib.h>
#include <glib-unix.h>

#include "extlock/protocol.h"
#include "event-log.h"
#include "etcd-client.h"
#include "fence.h"
#include "ha.h"
#include "policy.h"
#include "server.h"
#include "state-file.h"
#include "tls.h"

#define EXIT_USAGE 2

static bool opt_verbose;

/* Upper bound of --poll-us: a longer spin only burns a core */
#define EXTLOCKD_MAX_POLL_US 100000

static const char *level_name(GLogLevelFlags level)
{
    if (level & G_LOG_LEVEL_ERROR) {
        return "error";
    }
    if (level & G_LOG_LEVEL_CRITICAL) {
        return "critical";
    }
    if (level & G_LOG_LEVEL_WARNING) {
        return "warning";
    }
    if (level & G_LOG_LEVEL_MESSAGE) {
        return "notice";
    }
    if (level & G_LOG_LEVEL_INFO) {
        return "info";
    }
    return "debug";
}

/* One line per message on stderr: "DATE TIME.ms extlockd[PID]: LEVEL: text" */
static GLogWriterOutput log_writer(GLogLevelFlags level,
                                   const GLogField *fields, gsize n_fields,
                                   gpointer opaque)
{
    g_autoptr(GDateTime) now = g_date_time_new_now_local();
    g_autofree char *stamp = NULL;
    const char *message = "";

    if ((level & G_LOG_LEVEL_DEBUG) && !opt_verbose) {
        return G_LOG_WRITER_HANDLED;
    }
    for (gsize i = 0; i < n_fields; i++) {
        if (strcmp(fields[i].key, "MESSAGE") == 0 && fields[i].length < 0) {
            message = fields[i].value;
        }
    }
    stamp = g_date_time_format(now, "%Y-%m-%d %H:%M:%S");
    fprintf(stderr, "%s.%03d extlockd[%ld]: %s: %s\n", stamp,
            g_date_time_get_microsecond(now) / 1000, (long)getpid(),
            level_name(level), message);
    fflush(stderr);
    return G_LOG_WRITER_HANDLED;
}

typedef struct ReloadCtx {
    ExtlockdServer *server;
    const char *policy_file;
} ReloadCtx;

/* SIGHUP: read the policy file again; a bad one leaves the old in force */
static gboolean on_sighup(gpointer opaque)
{
    ReloadCtx *r = opaque;
    g_autoptr(GError) err = NULL;
    ExtlockdPolicy *p;

    if (!r->policy_file) {
        g_message("SIGHUP: no --policy file to reload");
        return G_SOURCE_CONTINUE;
    }
    p = extlockd_policy_load(r->policy_file, &err);
    if (!p) {
        g_warning("SIGHUP: policy not reloaded, the previous one stays in "
                  "force: %s", err->message);
        return G_SOURCE_CONTINUE;
    }
    g_message("SIGHUP: policy reloaded from %s (%u identities)",
              r->policy_file, extlockd_policy_size(p));
    extlockd_server_set_policy(r->server, p);
    return G_SOURCE_CONTINUE;
}

/*
 * --metrics-listen: serve the metrics (in HA mode as well).  Returns 0,
 * or the exit status after a message: EXIT_USAGE for a bad address or
 * credentials, 1 if the port cannot be bound.
 */
static int start_metrics(ExtlockdServer *server, const char *listen,
                         const char *tls_dir)
{
    g_autoptr(GError) err = NULL;

    if (!listen) {
        return 0;
    }
    if (!extlockd_server_metrics_listen(server, listen, tls_dir, &err)) {
        g_critical("%s", err->message);
        return err->code != G_FILE_ERROR_FAILED ? EXIT_USAGE : 1;
    }
    g_message("metrics at %s://%s/metrics%s", tls_dir ? "https" : "http",
              listen, tls_dir ? " (TLS)" : "");
    return 0;
}

static gboolean on_signal(gpointer opaque)
{
    GMainLoop *loop = opaque;

    g_message("received a termination signal, shutting down");
    g_main_loop_quit(loop);
    return G_SOURCE_CONTINUE;
}

/* HA: elected (ha.h); the grace period covers the sessions' leases */
typedef struct HaCtx {
    ExtlockdServer *server;
    uint32_t lease_ms;
    uint32_t fence_ms;
    int64_t grace_ms;            /* --grace-ms, or -1 */
} HaCtx;

static void on_elected(uint64_t epoch, GPtrArray *sessions,
                       const char *reservations, const char *maintenance,
                       void *opaque)
{
    HaCtx *h = opaque;
    g_autoptr(GError) err = NULL;
    int64_t cover = (int64_t)h->lease_ms + h->fence_ms;

    for (guint i = 0; i < sessions->len; i++) {
        const ExtlockdStateSession *ss = sessions->pdata[i];

        cover = MAX(cover, (int64_t)(ss->lease_ms ? ss->lease_ms
                                                  : EXTLOCK_MAX_LEASE_MS) +
                    MAX((int64_t)ss->fence_margin_ms, (int64_t)h->fence_ms));
    }
    cover = MAX(cover, h->grace_ms);
    g_message("elected: epoch %" PRIu64 ", %u session(s) of earlier leaders "
              "may reclaim for %" PRId64 " ms", epoch, sessions->len, cover);
    if (reservations &&
        !extlockd_server_load_reservations_json(h->server, reservations,
                                                &err)) {
        /* etcd holds what a leader wrote: corrupt means a bug */
        g_critical("%s", err->message);
        exit(1);
    }
    reservation_restore_owners(h->server, sessions);
    extlockd_server_lead(h->server, epoch, sessions, cover);
    g_ptr_array_unref(sessions);
    /*
     * The maintenance counts of the previous leaders: the same maint-gen
     * as before, or (one may have been running) a higher one in this epoch
     */
    if (maintenance) {
        if (!extlockd_server_load_maintenance_json(h->server, maintenance,
                                                   &err)) {
            g_critical("%s", err->message);
            exit(1);
        }
    }
}

/* --poll-us: how long the main loop checks its fds before it sleeps */
static gint64 opt_poll_us;

/*
 * The main loop's poll function with --poll-us: check the fds without
 * sleeping for up to opt_poll_us (never longer than the loop's own
 * timeout), then block as usual.  A message that arrives meanwhile is
 * handled without the wake-up of a sleeping process; the price is a
 * core spent spinning for opt_poll_us after every turn of the loop that
 * found nothing to do.
 */
static gint spin_poll(GPollFD *fds, guint nfds, gint timeout)
{
    gint64 start = g_get_monotonic_time();
    gint64 spin = opt_poll_us;
    gint r;

    if (timeout >= 0 && (gint64)timeout * 1000 < spin) {
        spin = (gint64)timeout * 1000;
    }
    if (spin > 0) {
        do {
            r = g_poll(fds, nfds, 0);
            if (r != 0) {
                return r;
            }
        } while (g_get_monotonic_time() - start < spin);
        if (timeout > 0) {
            /* what is left of the timeout, rounded up */
            timeout -= (g_get_monotonic_time() - start) / 1000;
            timeout = MAX(timeout, 0);
        }
    }
    return g_poll(fds, nfds, timeout);
}

static bool check_range(const char *name, int64_t value, int64_t min,
                        int64_t max)
{
    if (value < min || value > max) {
        fprintf(stderr, "extlockd: %s must be in [%" PRId64 ", %" PRId64
                "], not %" PRId64 "\n", name, min, max, value);
        return false;
    }
    return true;
}

static bool env_flag(const char *name)
{
    const char *v = g_getenv(name);

    return v && *v && strcmp(v, "0") != 0;
}

/* The check server of create_from_read() writes nothing anywhere */
static bool create_from_no_write(const char *text, void *opaque,
                                 GError **errp)
{
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_PERM,
                "no state is written while --create-cluster-from checks");
    return false;
}

/*
 * --create-cluster-from: the text of the state file @path in *@data
 * (*@len bytes; g_free() it), once its persistent reservations and
 * maintenance counts have loaded, with the loaders a single coordinator
 * starts with, into a check server (@cfg's settings) that never listens
 * and writes nothing.  A missing file or a corrupt member stops the move
 * before anything is written to etcd: the cluster would start without
 * the reservations (a fenced guest could write again) or count
 * maintenances from 0 (a host could skip rereading the metadata).
 */
static bool create_from_read(const ExtlockdConfig *cfg, const char *path,
                             char **data, size_t *len, GError **errp)
{
    ExtlockdConfig check = *cfg;
    ExtlockdServer *server;
    bool ok;

    if (!extlockd_state_read(path, data, len, errp)) {
        return false;
    }
    if (!*data) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_NOENT,
                    "state file %s does not exist", path);
        return false;
    }
    check.state_file = (char *)"(--create-cluster-from check)";
    check.state_write = create_from_no_write;
    check.state_write_opaque = NULL;
    server = extlockd_server_new(&check, 0);
    ok = extlockd_server_load_reservations(server, path, errp) &&
         extlockd_server_load_maintenance(server, path, errp);
    extlockd_server_free(server);
    if (!ok) {
        g_prefix_error(errp, "state file %s: ", path);
        g_clear_pointer(data, g_free);
    }
    return ok;
}

/*
 * --create-cluster-from did not create the cluster: the state file
 * @path gets its text @state back, without the mark
 */
static void create_from_unmark(const char *path, const char *state)
{
    g_autoptr(GError) err = NULL;

    if (!extlockd_state_write_text(path, state, &err)) {
        g_critical("--create-cluster-from: state file %s stays marked as "
                   "moved (%s): remove its \"" EXTLOCKD_STATE_MOVED_MEMBER
                   "\" member to start a single coordinator on it", path,
                   err->message);
    }
}

int main(int argc, char **argv)
{
    int ret;
    g_auto(GStrv) listen_addrs = NULL;
    g_autofree char *state_file = NULL;
    gint64 lease_ms = EXTLOCKD_DEFAULT_LEASE_MS;
    gint64 fence_ms = EXTLOCKD_DEFAULT_FENCE_MS;
    gint64 max_locks = EXTLOCKD_DEFAULT_MAX_LOCKS;
    gint64 max_sessions = EXTLOCKD_DEFAULT_MAX_SESS;
    gint64 max_sessions_per_id = EXTLOCKD_DEFAULT_MAX_SESS_PER_IDENTITY;
    gint64 grace_ms = -1;
    gint64 fence_timeout_ms = EXTLOCKD_DEFAULT_FENCE_TIMEOUT_MS;
    g_autofree char *fence_agent = NULL;
    g_auto(GStrv) fence_args = NULL;
    g_autofree char *event_log_path = NULL;
    ExtlockdEventLog *event_log = NULL;
    uint32_t longest_lease = 0;
    int64_t longest_cover = 0;
    unsigned unknown_leases = 0;
    gboolean debug_checks = FALSE, verbose = FALSE, version = FALSE;
    g_autofree char *tls_dir = NULL, *tls_verify = NULL, *policy_file = NULL;
    gboolean insecure = FALSE;
    gint64 hello_timeout = EXTLOCKD_DEFAULT_HELLO_TIMEOUT_MS;
    gint64 max_unauth = EXTLOCKD_DEFAULT_MAX_UNAUTH;
    gint64 max_unauth_peer = EXTLOCKD_DEFAULT_MAX_UNAUTH_PEER;
    gint64 status_rate = EXTLOCKD_DEFAULT_STATUS_RATE;
    gint64 long_wait_ms = 0, long_hold_ms = 0;
    gint64 poll_us = 0;
    gint64 pr_ack_timeout_ms = EXTLOCKD_DEFAULT_PR_ACK_TIMEOUT_MS;
    g_autofree char *metrics_listen = NULL, *metrics_tls_dir = NULL;
    g_autoptr(ExtlockdPolicy) policy = NULL;
    unsigned policy_size;
    ExtlockdTlsCreds *tls = NULL;
    ReloadCtx reload = { 0 };
    bool has_tcp = false;
    g_autofree char *etcd_endpoints = NULL, *cluster = NULL;
    g_autofree char *member_id = NULL, *advertise = NULL;
    g_autofree char *etcd_cacert = NULL, *etcd_cert = NULL, *etcd_key = NULL;
    gint64 etcd_ttl_ms = EXTLOCKD_HA_DEFAULT_TTL_MS;
    gint64 etcd_wait_ms = 5000;
    gboolean create_cluster = FALSE;
    g_autofree char *create_from = NULL;
    ExtlockdHa *ha = NULL;
    HaCtx ha_ctx = { 0 };
    g_auto(GStrv) saved_argv = g_strdupv(argv);
    GOptionEntry entries[] = {
        { "listen", 'l', 0, G_OPTION_ARG_STRING_ARRAY, &listen_addrs,
          "Listen on ADDR: unix:PATH or tcp:HOST:PORT (repeatable; "
          "default " EXTLOCKD_DEFAULT_LISTEN ")", "ADDR" },
        { "state-file", 's', 0, G_OPTION_ARG_FILENAME, &state_file,
          "Keep the token epoch in PATH (default "
          EXTLOCKD_DEFAULT_STATE_FILE ")", "PATH" },
        { "lease-ms", 0, 0, G_OPTION_ARG_INT64, &lease_ms,
          "Lease for clients that do not ask for one (default 10000; "
          "clients may ask for 100..3600000)", "N" },
        { "fence-margin-ms", 0, 0, G_OPTION_ARG_INT64, &fence_ms,
          "Extra delay after a lease lapses before its locks are "
          "granted to others (default 1000)", "N" },
        { "grace-ms", 0, 0, G_OPTION_ARG_INT64, &grace_ms,
          "After a restart, how long the sessions of the previous run may "
          "reclaim their locks before new requests are served (default "
          "and minimum: the longest lease of those sessions + "
          "fence-margin-ms)", "N" },
        { "fence-agent", 0, 0, G_OPTION_ARG_FILENAME, &fence_agent,
          "Run PATH (fence-agents stdin interface) to cut an expired "
          "client off the storage before its locks are released", "PATH" },
        { "fence-timeout-ms", 0, 0, G_OPTION_ARG_INT64, &fence_timeout_ms,
          "Kill the fence agent and count it as failed after N ms "
          "(default 30000)", "N" },
        { "fence-arg", 0, 0, G_OPTION_ARG_STRING_ARRAY, &fence_args,
          "Pass KEY=VALUE to the fence agent on its stdin (repeatable)",
          "KEY=VALUE" },
        { "event-log", 0, 0, G_OPTION_ARG_FILENAME, &event_log_path,
          "Append a JSON line to FILE for every grant, release, expiry "
          "and fencing step", "FILE" },
        { "max-locks-per-session", 0, 0, G_OPTION_ARG_INT64, &max_locks,
          "Held plus waiting locks per session (default 16384)", "N" },
        { "max-sessions", 0, 0, G_OPTION_ARG_INT64, &max_sessions,
          "Sessions in all lock-spaces (default 4096)", "N" },
        { "max-sessions-per-identity", 0, 0, G_OPTION_ARG_INT64,
          &max_sessions_per_id,
          "Sessions one identity may create (default 256)", "N" },
        { "tls-creds-dir", 0, 0, G_OPTION_ARG_FILENAME, &tls_dir,
          "TLS on TCP listeners, with the credentials in DIR (QEMU's "
          "layout: ca-cert.pem, server-cert.pem, server-key.pem and/or "
          "keys.psk)", "DIR" },
        { "tls-verify-peer", 0, 0, G_OPTION_ARG_STRING, &tls_verify,
          "Require x509 clients to present a certificate signed by "
          "ca-cert.pem (default yes)", "yes|no" },
        { "insecure", 0, 0, G_OPTION_ARG_NONE, &insecure,
          "Allow TCP listeners without TLS: anybody who reaches the port "
          "can take locks (testing only)", NULL },
        { "policy", 0, 0, G_OPTION_ARG_FILENAME, &policy_file,
          "Authorization policy (identities, lock-spaces, client-ids, "
          "admins); reloaded on SIGHUP", "FILE" },
        { "hello-timeout-ms", 0, 0, G_OPTION_ARG_INT64, &hello_timeout,
          "Close connections that have not said hello after N ms "
          "(default 10000)", "N" },
        { "max-unauth", 0, 0, G_OPTION_ARG_INT64, &max_unauth,
          "Connections without hello, in total (default 256)", "N" },
        { "max-unauth-per-peer", 0, 0, G_OPTION_ARG_INT64, &max_unauth_peer,
          "Connections without hello per IP address or uid (default 32)",
          "N" },
        { "status-rate", 0, 0, G_OPTION_ARG_INT64, &status_rate,
          "status requests per second and connection (default 10)", "N" },
        { "etcd-endpoints", 0, 0, G_OPTION_ARG_STRING, &etcd_endpoints,
          "HA mode: elect a leader and keep the state in etcd at "
          "URL[,URL...] (http(s)://HOST:PORT) instead of --state-file",
          "URLS" },
        { "cluster", 0, 0, G_OPTION_ARG_STRING, &cluster,
          "HA: the cluster's name (keys /extlock/NAME/...)", "NAME" },
        { "member-id", 0, 0, G_OPTION_ARG_STRING, &member_id,
          "HA: this replica's name (default: the host name)", "ID" },
        { "advertise", 0, 0, G_OPTION_ARG_STRING, &advertise,
          "HA: the address followers give clients for this replica when "
          "it leads (default: the first --listen)", "ADDR" },
        { "etcd-lease-ttl-ms", 0, 0, G_OPTION_ARG_INT64, &etcd_ttl_ms,
          "HA: the leader's etcd lease, whole seconds (default 1000)", "N" },
        { "etcd-wait-ms", 0, 0, G_OPTION_ARG_INT64, &etcd_wait_ms,
          "HA: at start, fail if etcd does not answer within N ms "
          "(default 5000)", "N" },
        { "create-cluster", 0, 0, G_OPTION_ARG_NONE, &create_cluster,
          "HA: create the cluster in etcd if it does not exist (once)",
          NULL },
        { "create-cluster-from", 0, 0, G_OPTION_ARG_FILENAME, &create_from,
          "HA: like --create-cluster, with the epoch and sessions of a "
          "single coordinator's state file (stopped)", "STATEFILE" },
        { "etcd-cacert", 0, 0, G_OPTION_ARG_FILENAME, &etcd_cacert,
          "HA: verify etcd's https endpoints with this CA", "FILE" },
        { "etcd-cert", 0, 0, G_OPTION_ARG_FILENAME, &etcd_cert,
          "HA: client certificate for etcd", "FILE" },
        { "etcd-key", 0, 0, G_OPTION_ARG_FILENAME, &etcd_key,
          "HA: key of --etcd-cert", "FILE" },
        { "long-wait-ms", 0, 0, G_OPTION_ARG_INT64, &long_wait_ms,
          "Log (and event-log) lock requests waiting longer than MS "
          "(default 0: off)", "MS" },
        { "long-hold-ms", 0, 0, G_OPTION_ARG_INT64, &long_hold_ms,
          "Log (and event-log) locks held longer than MS (default 0: off)",
          "MS" },
        { "pr-ack-timeout-ms", 0, 0, G_OPTION_ARG_INT64, &pr_ack_timeout_ms,
          "Expire a session that has not acknowledged a persistent "
          "reservation change after MS (default 30000)", "MS" },
        { "poll-us", 0, 0, G_OPTION_ARG_INT64, &poll_us,
          "Check the sockets without sleeping for up to US microseconds "
          "before the main loop blocks (default 0: off; costs CPU)", "US" },
        { "metrics-listen", 0, 0, G_OPTION_ARG_STRING, &metrics_listen,
          "Serve Prometheus metrics at http://ADDR:PORT/metrics (IPv4 or "
          "[IPv6] address)", "ADDR:PORT" },
        { "metrics-tls-creds-dir", 0, 0, G_OPTION_ARG_FILENAME,
          &metrics_tls_dir,
          "Serve the metrics over HTTPS only, with server-cert.pem and "
          "server-key.pem in DIR; with ca-cert.pem there, only to clients "
          "with a certificate signed by it", "DIR" },
        { "debug-checks", 0, 0, G_OPTION_ARG_NONE, &debug_checks,
          "Check the lock table invariants after every change (also "
          "EXTLOCKD_DEBUG_CHECKS=1)", NULL },
        { "verbose", 'v', 0, G_OPTION_ARG_NONE, &verbose,
          "Log connections and requests", NULL },
        { "version", 'V', 0, G_OPTION_ARG_NONE, &version,
          "Print the version and exit", NULL },
        { NULL }
    };
    g_autoptr(GOptionContext) ctx = NULL;
    g_autoptr(GError) err = NULL;
    g_autoptr(GMainLoop) loop = NULL;
    ExtlockdConfig cfg = { 0 };
    ExtlockdServer *server;
    g_autoptr(GPtrArray) sessions = NULL;
    const char *default_listen[] = { EXTLOCKD_DEFAULT_LISTEN, NULL };
    const char *const *addrs;
    const char *first_counter;
    uint64_t epoch;
    int lock_fd = -1;

    signal(SIGPIPE, SIG_IGN);

    ctx = g_option_context_new("- extent lock coordinator");
    g_option_context_set_summary(ctx,
        "Grants byte-range locks, in strict timestamp order, to QEMU\n"
        "processes sharing disk images.  See docs/extlockd.rst.");
    g_option_context_add_main_entries(ctx, entries, NULL);
    if (!g_option_context_parse(ctx, &argc, &argv, &err)) {
        fprintf(stderr, "extlockd: %s\nTry 'extlockd --help'.\n",
                err->message);
        return EXIT_USAGE;
    }
    if (version) {
        printf("%s\n", EXTLOCKD_SERVER_NAME);
        return 0;
    }
    if (argc > 1) {
        fprintf(stderr, "extlockd: unexpected argument '%s'\n"
                "Try 'extlockd --help'.\n", argv[1]);
        return EXIT_USAGE;
    }
    if (!check_range("--lease-ms", lease_ms, EXTLOCK_MIN_LEASE_MS,
                     EXTLOCK_MAX_LEASE_MS) ||
        !check_range("--fence-margin-ms", fence_ms, EXTLOCKD_MIN_FENCE_MS,
                     EXTLOCKD_MAX_FENCE_MS) ||
        !check_range("--fence-timeout-ms", fence_timeout_ms, 1,
                     EXTLOCKD_MAX_FENCE_TIMEOUT_MS) ||
        !check_range("--max-locks-per-session", max_locks, 1, G_MAXUINT32) ||
        !check_range("--max-sessions", max_sessions, 1, G_MAXUINT32) ||
        !check_range("--max-sessions-per-identity", max_sessions_per_id, 1,
                     G_MAXUINT32) ||
        (grace_ms != -1 &&
         !check_range("--grace-ms", grace_ms, 0, EXTLOCKD_MAX_GRACE_MS)) ||
        !check_range("--hello-timeout-ms", hello_timeout, 100,
                     EXTLOCK_MAX_LEASE_MS) ||
        !check_range("--max-unauth", max_unauth, 1, 1000000) ||
        !check_range("--max-unauth-per-peer", max_unauth_peer, 1,
                     1000000) ||
        !check_range("--status-rate", status_rate, 1, 1000000) ||
        !check_range("--long-wait-ms", long_wait_ms, 0, 24 * 3600 * 1000) ||
        !check_range("--long-hold-ms", long_hold_ms, 0, 24 * 3600 * 1000) ||
        !check_range("--poll-us", poll_us, 0, EXTLOCKD_MAX_POLL_US) ||
        !check_range("--pr-ack-timeout-ms", pr_ack_timeout_ms, 100,
                     EXTLOCK_MAX_LEASE_MS)) {
        return EXIT_USAGE;
    }
    if (tls_verify && strcmp(tls_verify, "yes") != 0 &&
        strcmp(tls_verify, "no") != 0) {
        fprintf(stderr, "extlockd: --tls-verify-peer must be yes or no, "
                "not '%s'\n", tls_verify);
        return EXIT_USAGE;
    }
    if (tls_verify && !tls_dir) {
        fprintf(stderr, "extlockd: --tls-verify-peer needs "
                "--tls-creds-dir\n");
        return EXIT_USAGE;
    }
    if (grace_ms != -1 && grace_ms < lease_ms + fence_ms) {
        fprintf(stderr, "extlockd: --grace-ms %" PRId64 " is unsafe: after "
                "a restart, a client of the previous run may still use its "
                "locks for its whole lease plus the fence margin, so the "
                "grace period must be at least --lease-ms + "
                "--fence-margin-ms = %" PRId64 " (and at least the longest "
                "lease of the sessions in the state file + "
                "--fence-margin-ms)\n", grace_ms, lease_ms + fence_ms);
        return EXIT_USAGE;
    }
    if (fence_agent) {
        if (!fence_agent[0] || !g_path_is_absolute(fence_agent)) {
            fprintf(stderr, "extlockd: --fence-agent '%s' must be an "
                    "absolute path\n", fence_agent);
            return EXIT_USAGE;
        }
        if (!g_file_test(fence_agent, G_FILE_TEST_IS_REGULAR) ||
            access(fence_agent, X_OK) != 0) {
            fprintf(stderr, "extlockd: --fence-agent %s is not an "
                    "executable file\n", fence_agent);
            return EXIT_USAGE;
        }
    }
    if (fence_args) {
        if (!fence_agent) {
            fprintf(stderr, "extlockd: --fence-arg needs --fence-agent\n");
            return EXIT_USAGE;
        }
        if (g_strv_length(fence_args) > EXTLOCKD_FENCE_MAX_ARGS) {
            fprintf(stderr, "extlockd: more than %d --fence-arg\n",
                    EXTLOCKD_FENCE_MAX_ARGS);
            return EXIT_USAGE;
        }
        for (int i = 0; fence_args[i]; i++) {
            if (!extlockd_fence_arg_check(fence_args[i], &err)) {
                fprintf(stderr, "extlockd: %s\n", err->message);
                return EXIT_USAGE;
            }
        }
    }
    if (metrics_tls_dir && !metrics_listen) {
        fprintf(stderr, "extlockd: --metrics-tls-creds-dir needs "
                "--metrics-listen\n");
        return EXIT_USAGE;
    }
    if (metrics_tls_dir &&
        !g_file_test(metrics_tls_dir, G_FILE_TEST_IS_DIR)) {
        fprintf(stderr, "extlockd: --metrics-tls-creds-dir %s: not a "
                "directory\n", metrics_tls_dir);
        return EXIT_USAGE;
    }
    if (metrics_listen &&
        !extlockd_metrics_listen_check(metrics_listen, metrics_tls_dir,
                                       &err)) {
        fprintf(stderr, "extlockd: %s\n", err->message);
        return EXIT_USAGE;
    }
    if (event_log_path && !event_log_path[0]) {
        fprintf(stderr, "extlockd: --event-log must not be empty\n");
        return EXIT_USAGE;
    }
    if (state_file && !state_file[0]) {
        fprintf(stderr, "extlockd: --state-file must not be empty\n");
        return EXIT_USAGE;
    }
    if (etcd_endpoints && state_file) {
        fprintf(stderr, "extlockd: --state-file (single coordinator) and "
                "--etcd-endpoints (HA: the state is in etcd) exclude each "
                "other; give one of them\n");
        return EXIT_USAGE;
    }
    if (!etcd_endpoints && (cluster || member_id || advertise ||
                            create_cluster || create_from || etcd_cacert ||
                            etcd_cert || etcd_key)) {
        fprintf(stderr, "extlockd: --cluster, --member-id, --advertise, "
                "--create-cluster(-from) and --etcd-* need "
                "--etcd-endpoints\n");
        return EXIT_USAGE;
    }
    if (etcd_endpoints && !cluster) {
        fprintf(stderr, "extlockd: --etcd-endpoints needs --cluster NAME\n");
        return EXIT_USAGE;
    }
    if (etcd_endpoints &&
        !check_range("--etcd-wait-ms", etcd_wait_ms, 100, 600000)) {
        return EXIT_USAGE;
    }
    addrs = listen_addrs ? (const char *const *)listen_addrs
                         : default_listen;
    for (int i = 0; addrs[i]; i++) {
        if (!g_str_has_prefix(addrs[i], "unix:") &&
            !g_str_has_prefix(addrs[i], "tcp:") && addrs[i][0] != '/') {
            fprintf(stderr, "extlockd: --listen %s: expected unix:PATH or "
                    "tcp:HOST:PORT\n", addrs[i]);
            return EXIT_USAGE;
        }
        has_tcp |= g_str_has_prefix(addrs[i], "tcp:");
    }
    if (has_tcp && !tls_dir && !insecure) {
        fprintf(stderr, "extlockd: a TCP listener without TLS lets anybody "
                "who can reach the port take and release locks.\n"
                "Give --tls-creds-dir DIR (see docs/extlockd.rst), or "
                "--insecure if that is really what you want.\n");
        return EXIT_USAGE;
    }

    opt_verbose = verbose;
    g_log_set_writer_func(log_writer, NULL, NULL);

    cfg.state_file = state_file ? state_file : EXTLOCKD_DEFAULT_STATE_FILE;
    cfg.lease_ms = lease_ms;
    cfg.fence_margin_ms = fence_ms;
    cfg.max_locks_per_session = max_locks;
    cfg.max_sessions = max_sessions;
    cfg.max_sessions_per_identity = max_sessions_per_id;
    cfg.debug_checks = debug_checks || env_flag("EXTLOCKD_DEBUG_CHECKS");
    cfg.verbose = verbose;
    cfg.insecure = insecure;
    cfg.hello_timeout_ms = hello_timeout;
    cfg.max_unauth = max_unauth;
    cfg.max_unauth_per_peer = max_unauth_peer;
    cfg.status_rate = status_rate;
    cfg.long_wait_ms = long_wait_ms;
    cfg.long_hold_ms = long_hold_ms;
    cfg.pr_ack_timeout_ms = pr_ack_timeout_ms;
    first_counter = g_getenv("EXTLOCKD_TEST_FIRST_COUNTER");
    if (first_counter) {
        guint64 v;

        if (!g_ascii_string_to_unsigned(first_counter, 10, 1,
                                        EXTLOCKD_COUNTER_LIMIT - 1, &v,
                                        NULL)) {
            fprintf(stderr, "extlockd: bad EXTLOCKD_TEST_FIRST_COUNTER\n");
            return EXIT_USAGE;
        }
        cfg.first_counter = v;
    }

    /*
     * Catch termination signals from now on: one that arrives during
     * start-up makes the main loop quit as soon as it runs, so the
     * sockets are still cleaned up.
     */
    loop = g_main_loop_new(NULL, FALSE);
    if (poll_us > 0) {
        opt_poll_us = poll_us;
        g_main_context_set_poll_func(g_main_context_default(), spin_poll);
    }
    g_unix_signal_add(SIGTERM, on_signal, loop);
    g_unix_signal_add(SIGINT, on_signal, loop);

    /*
     * The epoch, and the sessions that may reclaim their locks, are
     * durable before anybody can connect
     */
    policy = extlockd_policy_load(policy_file, &err);
    if (!policy) {
        g_critical("%s", err->message);
        return 1;
    }
    if (tls_dir) {
        tls = extlockd_tls_creds_load(tls_dir,
                                      !tls_verify ||
                                      strcmp(tls_verify, "yes") == 0, &err);
        if (!tls) {
            g_critical("%s", err->message);
            return 1;
        }
    }

    if (etcd_endpoints) {
        g_auto(GStrv) eps = g_strsplit(etcd_endpoints, ",", -1);
        ExtlockdHaConfig hc = {
            .endpoints = eps,
            .cluster = cluster,
            .member_id = member_id ? member_id : g_get_host_name(),
            .advertise = advertise ? advertise : addrs[0],
            .ttl_ms = etcd_ttl_ms,
            .cacert = etcd_cacert,
            .cert = etcd_cert,
            .key = etcd_key,
            .event_log = event_log_path,
            .argv = saved_argv,
        };
        bool restarted = env_flag(EXTLOCKD_HA_RESTART_ENV);
        g_autoptr(GPtrArray) old_sessions = NULL;
        uint64_t old_epoch = 0;
        g_autofree char *old_state = NULL;
        size_t old_state_len = 0;
        g_autofree char *moved = NULL;
        bool created = false;

        if (etcd_ttl_ms < 0 || etcd_ttl_ms > G_MAXUINT32) {
            hc.ttl_ms = 1;
        }
        etcd_global_init();
        ha = extlockd_ha_new(&hc, &err);
        if (!ha) {
            fprintf(stderr, "extlockd: %s\n", err->message);
            return EXIT_USAGE;
        }
        /*
         * After a step-down the process waits for etcd as long as it
         * takes (the HA thread retries); at a first start, a wrong
         * endpoint or cluster name is an error
         */
        g_unsetenv(EXTLOCKD_HA_RESTART_ENV);
        if (create_from && !restarted) {
            /*
             * The single coordinator must be stopped: take its lock (not
             * for a mistyped path: that would create its directory)
             */
            if (!g_file_test(create_from, G_FILE_TEST_EXISTS)) {
                g_critical("--create-cluster-from: state file %s does not "
                           "exist", create_from);
                extlockd_ha_free(ha);
                return 1;
            }
            lock_fd = extlockd_state_lock(create_from, &err);
            if (lock_fd < 0 ||
                !extlockd_state_read(create_from, &old_state, &old_state_len,
                                     &err)) {
                g_critical("--create-cluster-from: %s", err->message);
                extlockd_ha_free(ha);
                return 1;
            }
            if (old_state) {
                moved = extlockd_state_moved_to(old_state, old_state_len);
            }
            g_clear_pointer(&old_state, g_free);
            if (moved && strcmp(moved, cluster) != 0) {
                g_critical("--create-cluster-from: state file %s was moved "
                           "to the HA cluster '%s', not '%s'", create_from,
                           moved, cluster);
                extlockd_ha_free(ha);
                return 1;
            }
            /*
             * Moved into this cluster before: a replica started again
             * with its first command line, which joins the cluster
             */
            if (!moved &&
                (!extlockd_state_load_sessions(create_from, &old_epoch,
                                               &old_sessions, &err) ||
                 !create_from_read(&cfg, create_from, &old_state,
                                   &old_state_len, &err))) {
                g_critical("--create-cluster-from: %s", err->message);
                extlockd_ha_free(ha);
                return 1;
            }
        }
        if (old_state) {
            /*
             * Marked before the cluster is created, under the lock: from
             * now on a single coordinator refuses the file, however this
             * process ends.  Marked after, a crash or an etcd error
             * between the two would leave a cluster in etcd and a file a
             * single coordinator starts on, both granting its extents.
             */
            g_autofree char *text =
                extlockd_state_mark_moved(create_from, old_state,
                                          old_state_len, cluster, &err);

            if (!text || !extlockd_state_write_text(create_from, text,
                                                    &err)) {
                g_critical("--create-cluster-from: state file %s could "
                           "not be marked as moved (%s); nothing was "
                           "written to etcd", create_from, err->message);
                extlockd_ha_free(ha);
                return 1;
            }
        }
        if (!restarted &&
            !extlockd_ha_check(ha, create_cluster || (create_from && !moved),
                               old_epoch, old_sessions, old_state,
                               old_state_len, etcd_wait_ms, &created,
                               &err)) {
            g_critical("%s", err->message);
            if (old_state && created) {
                g_critical("--create-cluster-from: the cluster may have "
                           "been created in etcd, so state file %s stays "
                           "marked as moved to it: if it does not exist, "
                           "remove the \"" EXTLOCKD_STATE_MOVED_MEMBER "\" "
                           "member to start from the file again",
                           create_from);
            } else if (old_state) {
                create_from_unmark(create_from, old_state);
            } else if (moved) {
                g_critical("--create-cluster-from: state file %s is marked "
                           "as moved to '%s': if that cluster does not "
                           "exist in etcd, an earlier move ended before it "
                           "was created; remove the \""
                           EXTLOCKD_STATE_MOVED_MEMBER "\" member to move "
                           "it again", create_from, cluster);
            }
            extlockd_ha_free(ha);
            return 1;
        }
        if (old_state && !created) {
            /*
             * The cluster was there already: the file was not copied
             * into it, and the mark would hide its state for good
             */
            g_critical("--create-cluster-from: the HA cluster '%s' exists "
                       "in etcd already, so state file %s was not copied "
                       "into it; start with --cluster alone to join it",
                       cluster, create_from);
            create_from_unmark(create_from, old_state);
            extlockd_ha_free(ha);
            return 1;
        }
        if (old_state) {
            g_message("state file %s marked as moved to the HA cluster "
                      "'%s'", create_from, cluster);
        }
        if (lock_fd >= 0) {
            close(lock_fd);
            lock_fd = -1;
        }
        if (event_log_path) {
            event_log = extlockd_event_log_open(event_log_path, &err);
            if (!event_log) {
                g_critical("%s", err->message);
                return 1;
            }
        }
        cfg.state_file = (char *)"(etcd)";
        cfg.state_write = extlockd_ha_write_state;
        cfg.state_write_opaque = ha;
        cfg.grace_ms = 0;
        server = extlockd_server_new(&cfg, 0);
        extlockd_server_set_ha(server, ha);
        extlockd_server_set_event_log(server, event_log);
        if (fence_agent) {
            extlockd_server_set_fencer(server,
                extlockd_fencer_new(fence_agent, fence_timeout_ms,
                                    (const char *const *)fence_args));
        }
        extlockd_server_set_policy(server, g_steal_pointer(&policy));
        extlockd_server_set_tls(server, tls);
        reload.server = server;
        reload.policy_file = policy_file;
        g_unix_signal_add(SIGHUP, on_sighup, &reload);
        ret = start_metrics(server, metrics_listen, metrics_tls_dir);
        if (ret) {
            extlockd_server_free(server);
            extlockd_ha_free(ha);
            return ret;
        }
        for (int i = 0; addrs[i]; i++) {
            if (!extlockd_server_listen(server, addrs[i], &err)) {
                g_critical("%s", err->message);
                extlockd_server_free(server);
                extlockd_ha_free(ha);
                return 1;
            }
        }
        ha_ctx.server = server;
        ha_ctx.lease_ms = lease_ms;
        ha_ctx.fence_ms = fence_ms;
        ha_ctx.grace_ms = grace_ms;
        g_message("%s starting in HA mode: cluster %s, member %s (clients "
                  "use %s), etcd %s, etcd lease %" PRId64 " ms, lease %u "
                  "ms, fence margin %u ms%s", EXTLOCKD_SERVER_NAME, cluster,
                  hc.member_id, hc.advertise, etcd_endpoints, etcd_ttl_ms,
                  cfg.lease_ms, cfg.fence_margin_ms,
                  restarted ? " (after stepping down)" : "");
        extlockd_ha_start(ha, on_elected, &ha_ctx);
        g_main_loop_run(loop);
        extlockd_server_stop_listening(server);
        extlockd_server_free(server);
        extlockd_ha_free(ha);
        g_message("stopped");
        return 0;
    }

    lock_fd = extlockd_state_lock(cfg.state_file, &err);
    if (lock_fd < 0) {
        g_critical("%s", err->message);
        return 1;
    }
    if (!extlockd_state_load_sessions(cfg.state_file, &epoch, &sessions,
                                      &err)) {
        g_critical("%s", err->message);
        return 1;
    }
    /*
     * The grace period must outlast every listed session's lease (plus
     * the fence margin): until then its client may still use its locks.
     * A file from before leases were recorded: assume the longest lease.
     */
    for (guint i = 0; i < sessions->len; i++) {
        const ExtlockdStateSession *ss = sessions->pdata[i];

        if (!ss->lease_ms) {
            unknown_leases++;
        }
        longest_lease = MAX(longest_lease, ss->lease_ms ? ss->lease_ms
                                                        : EXTLOCK_MAX_LEASE_MS);
        /*
         * Its client's I/O deadline uses the fence margin it was told,
         * which may be larger than ours if we were restarted with a
         * smaller one (not recorded by older versions: ours)
         */
        longest_cover = MAX(longest_cover,
                            (int64_t)(ss->lease_ms ? ss->lease_ms
                                                   : EXTLOCK_MAX_LEASE_MS) +
                            MAX((int64_t)ss->fence_margin_ms, fence_ms));
    }
    if (grace_ms == -1) {
        grace_ms = MAX(lease_ms + fence_ms, longest_cover);
    } else if (grace_ms < longest_cover) {
        g_critical("--grace-ms %" PRId64 " is unsafe: the state file %s "
                   "lists %u session(s) whose longest lease is %u ms%s, so "
                   "the grace period must be at least %" PRId64 " ms "
                   "(the longest lease + fence margin of a listed session, "
                   "with the larger of --fence-margin-ms and the margin "
                   "its client was told); leave --grace-ms out to get it",
                   grace_ms, cfg.state_file, sessions->len,
                   longest_lease, unknown_leases ?
                   " (sessions without a recorded lease count as the "
                   "longest lease a client may ask for)" : "",
                   longest_cover);
        return EXIT_USAGE;
    }
    cfg.grace_ms = grace_ms;
    if (unknown_leases) {
        g_message("%u session(s) in the state file have no recorded lease "
                  "(written by an older extlockd): assuming %d ms",
                  unknown_leases, EXTLOCK_MAX_LEASE_MS);
    }
    if (event_log_path) {
        event_log = extlockd_event_log_open(event_log_path, &err);
        if (!event_log) {
            g_critical("%s", err->message);
            return 1;
        }
    }
    epoch++;
    server = extlockd_server_new(&cfg, epoch);
    extlockd_server_set_event_log(server, event_log);
    if (fence_agent) {
        extlockd_server_set_fencer(server,
            extlockd_fencer_new(fence_agent, fence_timeout_ms,
                                (const char *const *)fence_args));
    }
    policy_size = extlockd_policy_size(policy);
    extlockd_server_set_policy(server, g_steal_pointer(&policy));
    extlockd_server_set_tls(server, tls);
    reload.server = server;
    reload.policy_file = policy_file;
    g_unix_signal_add(SIGHUP, on_sighup, &reload);
    if (policy_file) {
        g_message("policy %s: %u identities", policy_file,
                  policy_size);
    } else {
        g_message("no --policy: every identity may use every lock-space "
                  "and client-id; admins: uid:0 and uid:%u on the UNIX "
                  "socket", (unsigned)getuid());
        if (fence_agent) {
            /* The agent fences the plug named by a client-chosen name */
            g_warning("--fence-agent without --policy: any client may use "
                      "any client-id, so it can get another host fenced "
                      "(plug=<client-id>) by taking a lock under that host's "
                      "client-id and letting its lease lapse; bind the "
                      "client-ids to identities with --policy");
        }
    }
    if (has_tcp && !tls_dir) {
        g_warning("INSECURE: TCP listeners without TLS (--insecure): "
                  "anybody who can reach them can take and release locks "
                  "of the lock-spaces the policy allows \"anonymous\"");
    }
    extlockd_server_restore(server, sessions);
    if (!extlockd_server_load_reservations(server, cfg.state_file, &err) ||
        !extlockd_server_load_maintenance(server, cfg.state_file, &err)) {
        g_critical("%s", err->message);
        extlockd_server_free(server);
        return 1;
    }
    reservation_restore_owners(server, sessions);
    if (!extlockd_server_save_state(server, &err)) {
        g_critical("%s", err->message);
        extlockd_server_free(server);
        return 1;
    }
    g_message("%s starting: epoch %" PRIu64 " (state file %s), lease %u ms, "
              "fence margin %u ms, grace period %u ms%s%s%s%s%s",
              EXTLOCKD_SERVER_NAME, epoch, cfg.state_file, cfg.lease_ms,
              cfg.fence_margin_ms, cfg.grace_ms,
              cfg.debug_checks ? ", debug checks on" : "",
              fence_agent ? ", fence agent " : ", no fence agent",
              fence_agent ? fence_agent : "",
              event_log_path ? ", event log " : "",
              event_log_path ? event_log_path : "");

    /*
     * The metrics endpoint first: once the coordinator's sockets accept,
     * everything is up (tests and service managers wait for the socket)
     */
    ret = start_metrics(server, metrics_listen, metrics_tls_dir);
    if (ret) {
        extlockd_server_free(server);
        return ret;
    }

    for (int i = 0; addrs[i]; i++) {
        if (!extlockd_server_listen(server, addrs[i], &err)) {
            g_critical("%s", err->message);
            extlockd_server_free(server);
            return 1;
        }
    }

    g_main_loop_run(loop);

    extlockd_server_stop_listening(server);
    extlockd_server_free(server);
    close(lock_fd);
    g_message("stopped");
    return 0;
}
