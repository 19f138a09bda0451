/*
 * extlockd: lock metrics (histograms, per-client counts), long holders
 * and waiters, and the Prometheus text rendering
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Everything here runs in the main loop thread, except the HTTP handler of
 * metrics-http.c, which only copies the text the main loop rendered last
 * (under ExtlockdMetrics.text_lock).  See docs/monitoring.rst.
 */
#ifndef EXTLOCKD_METRICS_H
#define EXTLOCKD_METRICS_H

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>
#include <json-c/json.h>

#include "extlock/lock-table.h"

/*
 * log2 buckets of microseconds: bucket k counts values <= 2^k us (and
 * above 2^(k-1) us); the last one everything above 2^(METRICS_BUCKETS-1)
 * us (about 36 minutes)
 */
#define METRICS_BUCKETS         32

/* Lock-spaces and clients tracked by name; the rest count as "(other)" */
#define METRICS_MAX_SPACES      1024
#define METRICS_MAX_CLIENTS     4096
#define METRICS_OTHER           "(other)"

/* Long holder / waiter log lines per check (one a second) */
#define METRICS_LONG_LOG_BURST  10

typedef struct ExtlockdServer ExtlockdServer;
typedef struct ExtlockdMetrics ExtlockdMetrics;
typedef struct ExtlockdHttp ExtlockdHttp;

typedef struct MetricsHist {
    uint64_t bucket[METRICS_BUCKETS + 1];    /* not cumulative; last: +Inf */
    uint64_t count;
    uint64_t sum_us;
} MetricsHist;

typedef struct MetricsSpace {
    MetricsHist wait;            /* queued -> granted, every grant */
    MetricsHist hold;            /* granted -> released (whole locks) */
    uint64_t grants;
    uint64_t waits;              /* requests that had to wait */
    uint64_t revokes;
    uint64_t long_waits;         /* waits that crossed --long-wait-ms */
    uint64_t long_holds;         /* holds that crossed --long-hold-ms */
} MetricsSpace;

typedef struct MetricsClient {
    uint64_t grants;
    uint64_t waits;
    uint64_t revokes;            /* revokes sent to it (it holds) */
} MetricsClient;

struct ExtlockdMetrics {
    /* name -> MetricsSpace, kept after the lock-space goes (no resets) */
    GHashTable *spaces;
    GHashTable *clients;         /* client id -> MetricsClient */
    uint64_t lease_expiries;
    uint64_t fence_started;
    uint64_t fence_ok;
    uint64_t fence_failed;
    uint64_t long_log_suppressed;    /* log lines left out (rate limit) */
    /* long holder / waiter detection (0: off) */
    uint32_t long_wait_ms;
    uint32_t long_hold_ms;
    int64_t last_check_us;
    guint timer;
    /* The Prometheus text, rendered each second by the main loop */
    GMutex text_lock;
    GString *text;
    ExtlockdHttp *http;
};

ExtlockdMetrics *metrics_new(void);
void metrics_free(ExtlockdMetrics *m);

/* Hooks, called where the server logs the event */
void metrics_lock_event(ExtlockdServer *server, const char *event,
                        ExtlockLock *lock, const ExtlockExtent *part);
void metrics_wait(ExtlockdServer *server, ExtlockLock *lock);
void metrics_revoke(ExtlockdServer *server, ExtlockLock *held);
void metrics_session_event(ExtlockdServer *server, const char *event);

/* The bucket of @us */
unsigned metrics_bucket(uint64_t us);

/* The "metrics" member of the status reply (admins) */
json_object *metrics_status_json(ExtlockdServer *server);

/*
 * Look for waits and holds that crossed their threshold since the last
 * check; log and event-log them.  Called each second by the timer.
 */
void metrics_check_long(ExtlockdServer *server, int64_t now);

/* Prometheus text exposition format 0.0.4 of everything */
GString *metrics_render(ExtlockdServer *server);

/*
 * Start the timer (long checks, text rendering) if anything needs it;
 * called once the options are set
 */
void metrics_start(ExtlockdServer *server);

/*
 * metrics-http.c: is @addr a valid --metrics-listen value, are the
 * credentials in @tls_dir (may be NULL) usable, and is there
 * libmicrohttpd?  Checked before anything else happens at start-up.
 */
bool metrics_http_check(const char *addr, const char *tls_dir,
                        GError **errp);

/*
 * metrics-http.c: serve m->text at http://@addr/metrics, or with @tls_dir
 * (server-cert.pem, server-key.pem, optional ca-cert.pem for client
 * certificates) at https://@addr/metrics
 */
ExtlockdHttp *metrics_http_start(ExtlockdMetrics *m, const char *addr,
                                 const char *tls_dir, GError **errp);
void metrics_http_stop(ExtlockdHttp *http);

#endif /* EXTLOCKD_METRICS_H */
