/*
 * extlockctl: show the state of an extlock coordinator (extlockd)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Sends one "status" request (allowed without hello) and prints the reply
 * as aligned tables, or as JSON with --json.  Exit status: 0 on success,
 * 1 if the coordinator cannot be reached or answers with an error, 2 for
 * bad usage.  "release-session --force SESSION" sends the admin request
 * of that name instead (dangerous: see docs/extlockd.rst).
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <json-c/json.h>
#include "extlock/client-sync.h"
#include "freeze.h"

#define DEFAULT_ADDRESS "unix:/run/extlock/extlockd.sock"
#define STATUS_TIMEOUT_MS (10 * 1000)

/*
 * Aligned text tables
 */
typedef struct Table {
    guint ncols;
    const char *const *headers;
    const char *align;          /* per column: 'l' or 'r' */
    GPtrArray *rows;            /* of char ** (ncols strings each) */
} Table;

static Table *table_new(const char *const *headers, const char *align)
{
    Table *t = g_new0(Table, 1);

    t->headers = headers;
    t->align = align;
    t->ncols = strlen(align);
    t->rows = g_ptr_array_new_with_free_func((GDestroyNotify)g_strfreev);
    return t;
}

/* Add a row of t->ncols strings; takes ownership of them */
static void table_add(Table *t, ...)
{
    char **row = g_new0(char *, t->ncols + 1);
    va_list ap;
    guint i;

    va_start(ap, t);
    for (i = 0; i < t->ncols; i++) {
        row[i] = va_arg(ap, char *);
    }
    va_end(ap);
    g_ptr_array_add(t->rows, row);
}

static void print_cell(const char *s, size_t width, char align, bool last)
{
    size_t len = g_utf8_strlen(s, -1);
    size_t pad = width > len ? width - len : 0;

    if (align == 'r') {
        printf("%*s%s", (int)pad, "", s);
    } else if (last) {
        printf("%s", s);
    } else {
        printf("%s%*s", s, (int)pad, "");
    }
}

static void table_print(Table *t, const char *title)
{
    size_t *width = g_new0(size_t, t->ncols);
    guint i, c;

    for (c = 0; c < t->ncols; c++) {
        width[c] = strlen(t->headers[c]);
    }
    for (i = 0; i < t->rows->len; i++) {
        char **row = g_ptr_array_index(t->rows, i);

        for (c = 0; c < t->ncols; c++) {
            width[c] = MAX(width[c], (size_t)g_utf8_strlen(row[c], -1));
        }
    }

    printf("%s (%u)\n", title, t->rows->len);
    if (t->rows->len == 0) {
        printf("  (none)\n");
        g_free(width);
        return;
    }
    printf("  ");
    for (c = 0; c < t->ncols; c++) {
        if (c) {
            printf("  ");
        }
        print_cell(t->headers[c], width[c], t->align[c], c == t->ncols - 1);
    }
    printf("\n");
    for (i = 0; i < t->rows->len; i++) {
        char **row = g_ptr_array_index(t->rows, i);

        printf("  ");
        for (c = 0; c < t->ncols; c++) {
            if (c) {
                printf("  ");
            }
            print_cell(row[c], width[c], t->align[c], c == t->ncols - 1);
        }
        printf("\n");
    }
    g_free(width);
}

static void table_free(Table *t)
{
    g_ptr_array_free(t->rows, true);
    g_free(t);
}

/*
 * Reading the status object; missing members read as 0 / "-" so that
 * newer or older servers still give useful output.
 */
static json_object *get(json_object *obj, const char *key)
{
    json_object *v = NULL;

    if (!obj || !json_object_object_get_ex(obj, key, &v)) {
        return NULL;
    }
    return v;
}

static int64_t get_int(json_object *obj, const char *key)
{
    json_object *v = get(obj, key);

    return v ? json_object_get_int64(v) : 0;
}

static char *fmt_int(json_object *obj, const char *key)
{
    json_object *v = get(obj, key);

    if (!v) {
        return g_strdup("-");
    }
    return g_strdup_printf("%" PRId64, json_object_get_int64(v));
}

static char *fmt_str(json_object *obj, const char *key)
{
    json_object *v = get(obj, key);

    if (!v || !json_object_is_type(v, json_type_string)) {
        return g_strdup("-");
    }
    return g_strdup(json_object_get_string(v));
}

static size_t array_len(json_object *obj, const char *key)
{
    json_object *v = get(obj, key);

    return json_object_is_type(v, json_type_array) ?
           json_object_array_length(v) : 0;
}

static json_object *array_at(json_object *obj, const char *key, size_t i)
{
    return json_object_array_get_idx(get(obj, key), i);
}

static char *fmt_duration(int64_t ms)
{
    int64_t s = ms / 1000;

    if (s < 60) {
        return g_strdup_printf("%" PRId64 ".%03" PRId64 "s", s, ms % 1000);
    }
    if (s < 3600) {
        return g_strdup_printf("%" PRId64 "m%02" PRId64 "s", s / 60, s % 60);
    }
    if (s < 86400) {
        return g_strdup_printf("%" PRId64 "h%02" PRId64 "m%02" PRId64 "s",
                               s / 3600, s / 60 % 60, s % 60);
    }
    return g_strdup_printf("%" PRId64 "d%02" PRId64 "h%02" PRId64 "m",
                           s / 86400, s / 3600 % 24, s / 60 % 60);
}

/* "blocked-by": ["a", "b"] -> "a, b" */
static char *fmt_list(json_object *obj, const char *key)
{
    json_object *arr = get(obj, key);
    GString *s = g_string_new(NULL);
    size_t i, n;

    n = json_object_is_type(arr, json_type_array) ?
        json_object_array_length(arr) : 0;
    for (i = 0; i < n; i++) {
        if (i) {
            g_string_append(s, ", ");
        }
        g_string_append(s, json_object_get_string(
                               json_object_array_get_idx(arr, i)));
    }
    if (!n) {
        g_string_append(s, "-");
    }
    return g_string_free(s, false);
}

static void print_header(json_object *st)
{
    json_object *c = get(st, "counters");
    g_autofree char *server = fmt_str(st, "server");
    g_autofree char *up = fmt_duration(get_int(st, "uptime-ms"));

    printf("Coordinator  %s, epoch %" PRId64 ", up %s\n", server,
           get_int(st, "epoch"), up);
    printf("Leases       default %" PRId64 " ms, fence margin %" PRId64
           " ms\n", get_int(st, "lease-ms"), get_int(st, "fence-margin-ms"));
    printf("Totals       %" PRId64 " connections, %" PRId64 " sessions, %"
           PRId64 " messages, %" PRId64 " errors\n",
           get_int(c, "connections"), get_int(c, "sessions"),
           get_int(c, "messages"), get_int(c, "errors"));
}

static void print_sessions(json_object *st)
{
    static const char *const hdr[] = {
        "SESSION", "CLIENT-ID", "LOCK-SPACE", "STATE", "LEASE-LEFT-MS",
        "LOCKS", "WAITING", "FENCE",
    };
    Table *t = table_new(hdr, "llllrrrl");
    size_t i, n = array_len(st, "sessions");

    for (i = 0; i < n; i++) {
        json_object *s = array_at(st, "sessions", i);

        table_add(t, fmt_str(s, "session"), fmt_str(s, "client-id"),
                  fmt_str(s, "lock-space"), fmt_str(s, "state"),
                  fmt_int(s, "lease-remaining-ms"), fmt_int(s, "locks-held"),
                  fmt_int(s, "requests-waiting"),
                  json_object_object_get_ex(s, "fence", NULL) ?
                  g_strdup_printf("%s (%" PRId64 ")", json_object_get_string(
                                  get(s, "fence")),
                                  get_int(s, "fence-attempts")) :
                  g_strdup("-"));
    }
    table_print(t, "Sessions");
    table_free(t);
}

static void print_spaces(json_object *st)
{
    static const char *const hdr[] = {
        "LOCK-SPACE", "HELD", "WAITING", "REQUESTS", "IMMEDIATE", "WAITS",
        "DEFERRED", "RELEASES", "PARTIAL", "CANCELS", "AVG-WAIT-US",
    };
    Table *t = table_new(hdr, "lrrrrrrrrrr");
    size_t i, n = array_len(st, "lock-spaces");

    for (i = 0; i < n; i++) {
        json_object *sp = array_at(st, "lock-spaces", i);
        json_object *c = get(sp, "counters");
        int64_t deferred = get_int(c, "deferred-grants");

        table_add(t, fmt_str(sp, "name"),
                  g_strdup_printf("%zu", array_len(sp, "held")),
                  g_strdup_printf("%zu", array_len(sp, "waiting")),
                  fmt_int(c, "requests"), fmt_int(c, "immediate-grants"),
                  fmt_int(c, "waits"), fmt_int(c, "deferred-grants"),
                  fmt_int(c, "releases"), fmt_int(c, "partial-releases"),
                  fmt_int(c, "cancels"),
                  deferred ? g_strdup_printf("%" PRId64,
                                             get_int(c, "total-wait-us") /
                                             deferred)
                           : g_strdup("-"));
    }
    table_print(t, "Lock spaces");
    table_free(t);
}

/* Persistent reservations (docs/guest-clusters.rst) of the lock-spaces */
static void print_reservations(json_object *st)
{
    static const char *const hdr[] = {
        "LOCK-SPACE", "GENERATION", "TYPE", "HOLDER", "APTPL",
        "REGISTRANTS",
    };
    Table *t = table_new(hdr, "lrrlll");
    size_t i, j, n = array_len(st, "lock-spaces");

    for (i = 0; i < n; i++) {
        json_object *sp = array_at(st, "lock-spaces", i);
        json_object *r = get(sp, "reservation");
        GString *regs = g_string_new(NULL);
        json_object *v;

        if (!r) {
            g_string_free(regs, true);
            continue;
        }
        for (j = 0; j < array_len(r, "registrants"); j++) {
            json_object *reg = array_at(r, "registrants", j);
            g_autofree char *cid = fmt_str(reg, "client-id");
            g_autofree char *key = fmt_str(reg, "key");

            g_string_append_printf(regs, "%s%s=0x%s", j ? " " : "", cid,
                                   key);
        }
        v = get(r, "aptpl");
        table_add(t, fmt_str(sp, "name"), fmt_int(r, "generation"),
                  fmt_int(r, "pr-type"), fmt_str(r, "holder"),
                  g_strdup(v && json_object_get_boolean(v) ? "yes" : "no"),
                  regs->len ? g_string_free(regs, false)
                            : (g_string_free(regs, true), g_strdup("-")));
    }
    table_print(t, "Persistent reservations");
    table_free(t);
}

static json_object *json_reservations(json_object *st)
{
    json_object *out = json_object_new_object();
    size_t i, n = array_len(st, "lock-spaces");

    for (i = 0; i < n; i++) {
        json_object *sp = array_at(st, "lock-spaces", i);
        json_object *r = get(sp, "reservation");
        json_object *name = get(sp, "name");

        if (r && name) {
            json_object_object_add(out, json_object_get_string(name),
                                   json_object_get(r));
        }
    }
    return out;
}

static void print_locks(json_object *st)
{
    static const char *const hdr[] = {
        "LOCK-SPACE", "LOCK", "CLIENT-ID", "MODE", "OFFSET", "LENGTH",
        "TOKEN", "HELD-MS",
    };
    Table *t = table_new(hdr, "lrllrrrr");
    size_t i, j, n = array_len(st, "lock-spaces");

    for (i = 0; i < n; i++) {
        json_object *sp = array_at(st, "lock-spaces", i);
        size_t m = array_len(sp, "held");

        for (j = 0; j < m; j++) {
            json_object *l = array_at(sp, "held", j);

            table_add(t, fmt_str(sp, "name"), fmt_int(l, "lock"),
                      fmt_str(l, "client-id"), fmt_str(l, "mode"),
                      fmt_int(l, "offset"), fmt_int(l, "length"),
                      fmt_int(l, "token"), fmt_int(l, "held-ms"));
        }
    }
    table_print(t, "Held locks");
    table_free(t);
}

static void print_waiters(json_object *st)
{
    static const char *const hdr[] = {
        "LOCK-SPACE", "REQUEST", "CLIENT-ID", "MODE", "OFFSET", "LENGTH",
        "TOKEN", "WAITED-MS", "BLOCKED-BY",
    };
    Table *t = table_new(hdr, "lrllrrrrl");
    size_t i, j, n = array_len(st, "lock-spaces");

    for (i = 0; i < n; i++) {
        json_object *sp = array_at(st, "lock-spaces", i);
        size_t m = array_len(sp, "waiting");

        for (j = 0; j < m; j++) {
            json_object *w = array_at(sp, "waiting", j);

            table_add(t, fmt_str(sp, "name"), fmt_int(w, "request"),
                      fmt_str(w, "client-id"), fmt_str(w, "mode"),
                      fmt_int(w, "offset"), fmt_int(w, "length"),
                      fmt_int(w, "token"), fmt_int(w, "waited-ms"),
                      fmt_list(w, "blocked-by"));
        }
    }
    table_print(t, "Waiting requests");
    table_free(t);
}

static void print_counters(json_object *st)
{
    static const char *const hdr[] = { "SCOPE", "COUNTER", "VALUE" };
    Table *t = table_new(hdr, "llr");
    json_object *sc = get(st, "counters");
    size_t i, n = array_len(st, "lock-spaces");

    if (json_object_is_type(sc, json_type_object)) {
        json_object_object_foreach(sc, k, v) {
            table_add(t, g_strdup("server"), g_strdup(k),
                      g_strdup(json_object_get_string(v)));
        }
    }
    for (i = 0; i < n; i++) {
        json_object *sp = array_at(st, "lock-spaces", i);
        json_object *c = get(sp, "counters");

        if (!json_object_is_type(c, json_type_object)) {
            continue;
        }
        json_object_object_foreach(c, k2, v2) {
            table_add(t, fmt_str(sp, "name"), g_strdup(k2),
                      g_strdup(json_object_get_string(v2)));
        }
    }
    table_print(t, "Counters");
    table_free(t);
}

/*
 * metrics: the "metrics" member (admins): per lock-space histograms of
 * wait and hold times, per-client counts
 */

/* The upper bound (us) of the bucket holding quantile @q of @h, or -1 */
static int64_t hist_quantile(json_object *h, double q)
{
    json_object *b = get(h, "buckets");
    int64_t count = get_int(h, "count"), seen = 0;
    size_t i, n;

    if (!count || !json_object_is_type(b, json_type_array)) {
        return -1;
    }
    n = json_object_array_length(b);
    for (i = 0; i < n; i++) {
        json_object *pair = json_object_array_get_idx(b, i);

        seen += json_object_get_int64(json_object_array_get_idx(pair, 1));
        if (seen >= q * count) {
            return json_object_get_int64(json_object_array_get_idx(pair, 0));
        }
    }
    return -1;
}

static char *fmt_quantile(json_object *h, double q)
{
    int64_t us = hist_quantile(h, q);

    if (us < 0) {
        return g_strdup(get_int(h, "count") ? ">2147s" : "-");
    }
    return g_strdup_printf("<=%" PRId64, us);
}

static void print_metrics(json_object *st)
{
    static const char *const shdr[] = {
        "LOCK-SPACE", "GRANTS", "WAITS", "REVOKES", "LONG-WAITS",
        "LONG-HOLDS", "WAIT-P50-US", "WAIT-P99-US", "HOLD-P50-US",
        "HOLD-P99-US",
    };
    static const char *const chdr[] = {
        "CLIENT-ID", "GRANTS", "WAITS", "REVOKES",
    };
    json_object *m = get(st, "metrics");
    Table *t;

    if (!json_object_is_type(m, json_type_object)) {
        printf("Metrics: not shown (needs an admin identity, or a newer "
               "extlockd)\n");
        return;
    }
    t = table_new(shdr, "lrrrrrrrrr");
    if (json_object_is_type(get(m, "lock-spaces"), json_type_object)) {
        json_object_object_foreach(get(m, "lock-spaces"), name, sp) {
            json_object *w = get(sp, "wait-us"), *h = get(sp, "hold-us");

            table_add(t, g_strdup(name), fmt_int(sp, "grants"),
                      fmt_int(sp, "waits"), fmt_int(sp, "revokes"),
                      fmt_int(sp, "long-waits"), fmt_int(sp, "long-holds"),
                      fmt_quantile(w, 0.5), fmt_quantile(w, 0.99),
                      fmt_quantile(h, 0.5), fmt_quantile(h, 0.99));
        }
    }
    table_print(t, "Lock-space metrics (log2 buckets: quantiles are "
                "bucket upper bounds)");
    table_free(t);
    printf("\n");
    t = table_new(chdr, "lrrr");
    if (json_object_is_type(get(m, "clients"), json_type_object)) {
        json_object_object_foreach(get(m, "clients"), name, c) {
            table_add(t, g_strdup(name), fmt_int(c, "grants"),
                      fmt_int(c, "waits"), fmt_int(c, "revokes"));
        }
    }
    table_print(t, "Client metrics");
    table_free(t);
    printf("\nLease expiries %" PRId64 ", fence runs %" PRId64 " (ok %" PRId64
           ", failed %" PRId64 "); long-wait threshold %" PRId64 " ms, "
           "long-hold threshold %" PRId64 " ms (0: off)\n",
           get_int(m, "lease-expiries"), get_int(m, "fence-started"),
           get_int(m, "fence-ok"), get_int(m, "fence-failed"),
           get_int(m, "long-wait-ms"), get_int(m, "long-hold-ms"));
}

/*
 * blockers: the longest holders and waiters, and for the longest waiters
 * the chain of clients that blocks them: A waits for B, which waits for
 * C, which holds.  Built from "blocked-by" (client ids) of each waiting
 * request; the first blocker is followed, a client seen twice ends the
 * chain.  Clients that wait in a cycle only (each waits for the next: not
 * possible for one request each, as grants follow timestamp order, but
 * possible with several requests per client) are not listed.
 */
#define BLOCKERS_TOP 10

typedef struct Entry {
    json_object *obj;
    const char *space;
    int64_t ms;
} Entry;

static int entry_compare(gconstpointer a, gconstpointer b)
{
    const Entry *x = a, *y = b;

    return x->ms < y->ms ? 1 : x->ms > y->ms ? -1 : 0;
}

/* Every held lock (@member "held") or waiting request, longest first */
static GArray *collect(json_object *st, const char *member, const char *age)
{
    GArray *out = g_array_new(false, false, sizeof(Entry));
    size_t i, j, n = array_len(st, "lock-spaces");

    for (i = 0; i < n; i++) {
        json_object *sp = array_at(st, "lock-spaces", i);
        size_t m = array_len(sp, member);

        for (j = 0; j < m; j++) {
            Entry e = {
                .obj = array_at(sp, member, j),
                .space = json_object_get_string(get(sp, "name")),
            };

            e.ms = get_int(e.obj, age);
            g_array_append_val(out, e);
        }
    }
    g_array_sort(out, entry_compare);
    return out;
}

/* The chain from @client: next hops from @waits (client -> its entry) */
static json_object *blocker_chain(GHashTable *waits, const char *client)
{
    json_object *chain = json_object_new_array();
    g_autoptr(GHashTable) seen = g_hash_table_new(g_str_hash, g_str_equal);

    while (client && g_hash_table_add(seen, (gpointer)client)) {
        Entry *e = g_hash_table_lookup(waits, client);
        json_object *hop = json_object_new_object();

        json_object_object_add(hop, "client-id",
                               json_object_new_string(client));
        if (e) {
            json_object *by = get(e->obj, "blocked-by");

            json_object_object_add(hop, "waited-ms",
                                   json_object_new_int64(e->ms));
            json_object_object_add(hop, "lock-space",
                                   json_object_new_string(e->space));
            client = json_object_is_type(by, json_type_array) &&
                     json_object_array_length(by) ?
                     json_object_get_string(json_object_array_get_idx(by, 0)) :
                     NULL;
        } else {
            client = NULL;
        }
        json_object_array_add(chain, hop);
    }
    if (client) {
        /* back to a client already in the chain */
        json_object *hop = json_object_new_object();

        json_object_object_add(hop, "client-id",
                               json_object_new_string(client));
        json_object_object_add(hop, "cycle", json_object_new_boolean(1));
        json_object_array_add(chain, hop);
    }
    return chain;
}

static json_object *json_blockers(json_object *st)
{
    json_object *out = json_object_new_object();
    json_object *holders = json_object_new_array();
    json_object *waiters = json_object_new_array();
    json_object *chains = json_object_new_array();
    g_autoptr(GArray) held = collect(st, "held", "held-ms");
    g_autoptr(GArray) waiting = collect(st, "waiting", "waited-ms");
    /* client id -> its longest waiting request (waiting is sorted) */
    g_autoptr(GHashTable) waits = g_hash_table_new(g_str_hash, g_str_equal);
    g_autoptr(GHashTable) done = g_hash_table_new(g_str_hash, g_str_equal);
    guint i;

    for (i = 0; i < held->len && i < BLOCKERS_TOP; i++) {
        Entry *e = &g_array_index(held, Entry, i);
        json_object *copy = NULL;

        json_object_deep_copy(e->obj, &copy, NULL);
        json_object_object_add(copy, "lock-space",
                               json_object_new_string(e->space));
        json_object_array_add(holders, copy);
    }
    for (i = 0; i < waiting->len; i++) {
        Entry *e = &g_array_index(waiting, Entry, i);
        const char *client = json_object_get_string(get(e->obj, "client-id"));

        if (i < BLOCKERS_TOP) {
            json_object *copy = NULL;

            json_object_deep_copy(e->obj, &copy, NULL);
            json_object_object_add(copy, "lock-space",
                                   json_object_new_string(e->space));
            json_object_array_add(waiters, copy);
        }
        if (client && !g_hash_table_contains(waits, client)) {
            g_hash_table_insert(waits, (gpointer)client, e);
        }
    }
    /*
     * A chain starts at a waiter nobody waits for (its chain is not part
     * of a longer one); @done starts with the clients others wait for
     */
    for (i = 0; i < waiting->len; i++) {
        json_object *by = get(g_array_index(waiting, Entry, i).obj,
                              "blocked-by");

        if (json_object_is_type(by, json_type_array) &&
            json_object_array_length(by)) {
            g_hash_table_add(done, (gpointer)json_object_get_string(
                                 json_object_array_get_idx(by, 0)));
        }
    }
    for (i = 0; i < waiting->len &&
         json_object_array_length(chains) < BLOCKERS_TOP; i++) {
        Entry *e = &g_array_index(waiting, Entry, i);
        const char *client = json_object_get_string(get(e->obj, "client-id"));

        if (client && g_hash_table_add(done, (gpointer)client)) {
            json_object_array_add(chains, blocker_chain(waits, client));
        }
    }
    json_object_object_add(out, "holders", holders);
    json_object_object_add(out, "waiters", waiters);
    json_object_object_add(out, "chains", chains);
    return out;
}

static void print_blockers(json_object *st)
{
    static const char *const hdr[] = {
        "LOCK-SPACE", "CLIENT-ID", "MODE", "OFFSET", "LENGTH", "MS",
    };
    json_object *b = json_blockers(st);
    const char *titles[] = { "Longest holders (HELD MS)",
                             "Longest waiters (WAITED MS)" };
    const char *members[] = { "holders", "waiters" };
    const char *ages[] = { "held-ms", "waited-ms" };
    size_t i, k, n;

    for (k = 0; k < 2; k++) {
        Table *t = table_new(hdr, "lllrrr");

        n = array_len(b, members[k]);
        for (i = 0; i < n; i++) {
            json_object *e = array_at(b, members[k], i);

            table_add(t, fmt_str(e, "lock-space"), fmt_str(e, "client-id"),
                      fmt_str(e, "mode"), fmt_int(e, "offset"),
                      fmt_int(e, "length"), fmt_int(e, ages[k]));
        }
        table_print(t, titles[k]);
        table_free(t);
        printf("\n");
    }
    printf("Who blocks whom (waiter -> what it waits for -> ...):\n");
    n = array_len(b, "chains");
    if (!n) {
        printf("  (nobody waits)\n");
    }
    for (i = 0; i < n; i++) {
        json_object *chain = array_at(b, "chains", i);
        size_t j, m = json_object_array_length(chain);

        printf(" ");
        for (j = 0; j < m; j++) {
            json_object *hop = json_object_array_get_idx(chain, j);

            printf("%s %s", j ? " ->" : "",
                   json_object_get_string(get(hop, "client-id")));
            if (get(hop, "cycle")) {
                printf(" (again)");
            } else if (get(hop, "waited-ms")) {
                printf(" (waits %" PRId64 " ms)", get_int(hop, "waited-ms"));
            } else {
                printf(" (holds)");
            }
        }
        printf("\n");
    }
    json_object_put(b);
}

/*
 * top: a live view, one frame per status (every --interval seconds):
 * lock-spaces with their rates since the previous frame, then the
 * blockers view.  @prev: "space/member" -> last counter value.
 */
typedef struct TopState {
    GHashTable *prev;
    int64_t prev_us;
} TopState;

static char *top_rate(TopState *ts, const char *space, const char *member,
                      int64_t value, double dt)
{
    g_autofree char *key = g_strdup_printf("%s/%s", space, member);
    gpointer old;
    bool had = g_hash_table_lookup_extended(ts->prev, key, NULL, &old);
    char *out;

    out = had && dt > 0 ?
          g_strdup_printf("%.1f", (value - GPOINTER_TO_SIZE(old)) / dt) :
          g_strdup("-");
    g_hash_table_replace(ts->prev, g_steal_pointer(&key),
                         GSIZE_TO_POINTER((gsize)value));
    return out;
}

static void print_top(json_object *st, TopState *ts, bool tty)
{
    static const char *const hdr[] = {
        "LOCK-SPACE", "SESSIONS", "HELD", "WAITING", "GRANTS/S", "WAITS/S",
        "REVOKES/S", "WAIT-P99-US", "HOLD-P99-US", "LONG-WAITS",
    };
    json_object *c = get(st, "counters");
    json_object *ms = get(get(st, "metrics"), "lock-spaces");
    int64_t now = g_get_monotonic_time();
    double dt = ts->prev_us ? (now - ts->prev_us) / 1e6 : 0;
    g_autoptr(GDateTime) t = g_date_time_new_now_local();
    g_autofree char *clock = g_date_time_format(t, "%H:%M:%S");
    g_autofree char *server = fmt_str(st, "server");
    g_autofree char *up = fmt_duration(get_int(st, "uptime-ms"));
    Table *tab = table_new(hdr, "lrrrrrrrrr");
    size_t i, n = array_len(st, "lock-spaces");

    if (tty) {
        printf("\033[H\033[2J");
    }
    printf("%s  %s, epoch %" PRId64 ", up %s; %" PRId64 " connections, %"
           PRId64 " sessions\n\n", clock, server, get_int(st, "epoch"), up,
           get_int(c, "connections"), get_int(c, "sessions"));
    for (i = 0; i < n; i++) {
        json_object *sp = array_at(st, "lock-spaces", i);
        const char *name = json_object_get_string(get(sp, "name"));
        json_object *m = get(ms, name);

        table_add(tab, g_strdup(name), fmt_int(sp, "sessions"),
                  g_strdup_printf("%zu", array_len(sp, "held")),
                  g_strdup_printf("%zu", array_len(sp, "waiting")),
                  m ? top_rate(ts, name, "grants", get_int(m, "grants"), dt)
                    : g_strdup("-"),
                  m ? top_rate(ts, name, "waits", get_int(m, "waits"), dt)
                    : g_strdup("-"),
                  m ? top_rate(ts, name, "revokes", get_int(m, "revokes"), dt)
                    : g_strdup("-"),
                  m ? fmt_quantile(get(m, "wait-us"), 0.99) : g_strdup("-"),
                  m ? fmt_quantile(get(m, "hold-us"), 0.99) : g_strdup("-"),
                  m ? fmt_int(m, "long-waits") : g_strdup("-"));
    }
    table_print(tab, "Lock-spaces (rates since the last frame)");
    table_free(tab);
    printf("\n");
    print_blockers(st);
    ts->prev_us = now;
}

/*
 * --json: the relevant part of the status object
 */
static json_object *json_flatten(json_object *st, const char *member)
{
    json_object *out = json_object_new_array();
    size_t i, j, n = array_len(st, "lock-spaces");

    for (i = 0; i < n; i++) {
        json_object *sp = array_at(st, "lock-spaces", i);
        size_t m = array_len(sp, member);

        for (j = 0; j < m; j++) {
            json_object *copy = NULL;

            if (json_object_deep_copy(array_at(sp, member, j), &copy,
                                      NULL) < 0 ||
                !json_object_is_type(copy, json_type_object)) {
                json_object_put(copy);
                continue;
            }
            json_object_object_add(copy, "lock-space",
                                   json_object_get(get(sp, "name")));
            json_object_array_add(out, copy);
        }
    }
    return out;
}

static json_object *json_counters(json_object *st)
{
    json_object *out = json_object_new_object();
    json_object *spaces = json_object_new_object();
    size_t i, n = array_len(st, "lock-spaces");

    json_object_object_add(out, "server",
                           json_object_get(get(st, "counters")));
    for (i = 0; i < n; i++) {
        json_object *sp = array_at(st, "lock-spaces", i);
        g_autofree char *name = fmt_str(sp, "name");

        json_object_object_add(spaces, name,
                               json_object_get(get(sp, "counters")));
    }
    json_object_object_add(out, "lock-spaces", spaces);
    return out;
}

/* HA (docs/extlockd.rst "High availability"): the "cluster" member */
static void print_cluster(json_object *st)
{
    json_object *cl = get(st, "cluster");
    const char *leader;
    Table *t;

    if (!cl) {
        printf("Not an HA coordinator (no --etcd-endpoints): a single "
               "coordinator, epoch %" PRId64 "\n", get_int(st, "epoch"));
        return;
    }
    leader = json_object_get_string(get(cl, "leader"));
    printf("Cluster      %s, epoch %" PRId64 "\n",
           json_object_get_string(get(cl, "cluster")),
           get_int(cl, "epoch") ? get_int(cl, "epoch") :
           get_int(cl, "cluster-epoch"));
    printf("Leader       %s%s%s\n", leader ? leader : "(none)",
           get(cl, "leader-address") ? " at " : "",
           get(cl, "leader-address") ?
           json_object_get_string(get(cl, "leader-address")) : "");
    printf("Answered by  %s (%s), etcd lease %" PRId64 " ms\n",
           json_object_get_string(get(cl, "member-id")),
           json_object_get_string(get(cl, "role")),
           get_int(cl, "etcd-lease-ttl-ms"));
    printf("etcd quorum  %s\n\n",
           !get(cl, "quorum") ? "unknown yet" :
           json_object_get_boolean(get(cl, "quorum")) ? "yes" :
           "NO: no leader can be elected, the leader steps down");
    t = table_new((const char *const[]) { "MEMBER", "ADDRESS", "ROLE",
                                           NULL }, "lll");
    for (size_t i = 0; i < array_len(cl, "members"); i++) {
        json_object *m = array_at(cl, "members", i);
        const char *id = json_object_get_string(get(m, "member-id"));

        table_add(t, g_strdup(id), fmt_str(m, "address"),
                  g_strdup(leader && g_strcmp0(id, leader) == 0 ? "leader"
                                                                : "follower"));
    }
    table_print(t, "Members");
    table_free(t);
    printf("\n");
    t = table_new((const char *const[]) { "ENDPOINT", "HEALTHY", "VERSION",
                                           "LEADER", "TERM", "ERROR", NULL },
                  "llllrl");
    for (size_t i = 0; i < array_len(cl, "endpoints"); i++) {
        json_object *e = array_at(cl, "endpoints", i);

        table_add(t, fmt_str(e, "endpoint"),
                  g_strdup(json_object_get_boolean(get(e, "healthy")) ?
                           "yes" : "no"),
                  fmt_str(e, "version"), fmt_str(e, "leader"),
                  get(e, "raft-term") ? fmt_int(e, "raft-term") : g_strdup(""),
                  fmt_str(e, "error"));
    }
    table_print(t, "etcd endpoints");
    table_free(t);
}

/*
 * "maintenance": per lock-space, the maintenance count and the image
 * length the last one announced (status "maintenance"), and the
 * maintenance lock held or waited for (exclusive on [0, 2^63))
 */
static bool is_maint_lock(json_object *l)
{
    json_object *len = get(l, "length");

    return get_int(l, "offset") == 0 && len &&
           (uint64_t)json_object_get_uint64(len) == (1ULL << 63) &&
           g_strcmp0(json_object_get_string(get(l, "mode")), "exclusive") == 0;
}

static json_object *json_maintenance(json_object *st)
{
    json_object *out = json_object_new_array();
    size_t i, j, n = array_len(st, "lock-spaces");

    for (i = 0; i < n; i++) {
        json_object *sp = array_at(st, "lock-spaces", i);
        json_object *m = get(sp, "maintenance");
        json_object *o = json_object_new_object();
        const char *lists[] = { "held", "waiting" };
        const char *states[] = { "running", "waiting" };

        json_object_object_add(o, "lock-space",
                               json_object_get(get(sp, "name")));
        json_object_object_add(o, "generation", json_object_new_int64(
                                   m ? get_int(m, "generation") : 0));
        if (m && get(m, "size")) {
            json_object_object_add(o, "size",
                                   json_object_get(get(m, "size")));
        }
        for (int k = 0; k < 2; k++) {
            size_t c = array_len(sp, lists[k]);

            for (j = 0; j < c; j++) {
                json_object *l = array_at(sp, lists[k], j);

                if (is_maint_lock(l) && !get(o, "state")) {
                    json_object_object_add(o, "state",
                                           json_object_new_string(states[k]));
                    if (get(l, "client-id")) {
                        json_object_object_add(
                            o, "client-id",
                            json_object_get(get(l, "client-id")));
                    }
                }
            }
        }
        json_object_array_add(out, o);
    }
    return out;
}

static void print_maintenance(json_object *st)
{
    static const char *const hdr[] = {
        "LOCK-SPACE", "GENERATION", "SIZE", "STATE", "CLIENT-ID",
    };
    Table *t = table_new(hdr, "lrrll");
    json_object *all = json_maintenance(st);
    size_t i, n = json_object_array_length(all);

    for (i = 0; i < n; i++) {
        json_object *o = json_object_array_get_idx(all, i);

        table_add(t, fmt_str(o, "lock-space"), fmt_int(o, "generation"),
                  get(o, "size") ? fmt_int(o, "size") : g_strdup("-"),
                  get(o, "state") ? fmt_str(o, "state") : g_strdup("-"),
                  get(o, "client-id") ? fmt_str(o, "client-id")
                                      : g_strdup("-"));
    }
    table_print(t, "Maintenance");
    table_free(t);
    json_object_put(all);
}

static void print_json(json_object *st, const char *command)
{
    json_object *out;

    if (g_str_equal(command, "status")) {
        out = json_object_get(st);
    } else if (g_str_equal(command, "sessions")) {
        out = json_object_get(get(st, "sessions"));
    } else if (g_str_equal(command, "spaces")) {
        out = json_object_get(get(st, "lock-spaces"));
    } else if (g_str_equal(command, "locks")) {
        out = json_flatten(st, "held");
    } else if (g_str_equal(command, "waiters")) {
        out = json_flatten(st, "waiting");
    } else if (g_str_equal(command, "cluster")) {
        out = get(st, "cluster") ? json_object_get(get(st, "cluster"))
                                 : json_object_new_object();
    } else if (g_str_equal(command, "metrics")) {
        out = json_object_get(get(st, "metrics"));
    } else if (g_str_equal(command, "blockers")) {
        out = json_blockers(st);
    } else if (g_str_equal(command, "reservations")) {
        out = json_reservations(st);
    } else if (g_str_equal(command, "maintenance")) {
        out = json_maintenance(st);
    } else {
        out = json_counters(st);
    }
    printf("%s\n", json_object_to_json_string_ext(
               out, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
                    JSON_C_TO_STRING_NOSLASHESCAPE));
    json_object_put(out);
}

static void print_text(json_object *st, const char *command)
{
    if (g_str_equal(command, "status")) {
        print_header(st);
        printf("\n");
        print_spaces(st);
        printf("\n");
        print_sessions(st);
        printf("\n");
        print_locks(st);
        printf("\n");
        print_waiters(st);
        if (get(st, "metrics")) {
            printf("\n");
            print_metrics(st);
        }
    } else if (g_str_equal(command, "sessions")) {
        print_sessions(st);
    } else if (g_str_equal(command, "spaces")) {
        print_spaces(st);
    } else if (g_str_equal(command, "locks")) {
        print_locks(st);
    } else if (g_str_equal(command, "waiters")) {
        print_waiters(st);
    } else if (g_str_equal(command, "cluster")) {
        print_cluster(st);
    } else if (g_str_equal(command, "metrics")) {
        print_metrics(st);
    } else if (g_str_equal(command, "blockers")) {
        print_blockers(st);
    } else if (g_str_equal(command, "reservations")) {
        print_reservations(st);
    } else if (g_str_equal(command, "maintenance")) {
        print_maintenance(st);
    } else {
        print_counters(st);
    }
}

static const char *const commands[] = {
    "status", "spaces", "sessions", "locks", "waiters", "counters",
    "cluster",
    "metrics", "blockers", "maintenance", "top", "reservations", NULL,
};

static const char usage_text[] =
    "Usage: extlockctl [-c|--connect ADDR] [--json] [COMMAND]\n"
    "\n"
    "Show the state of an extlock coordinator (extlockd).\n"
    "\n"
    "Commands:\n"
    "  status     everything below (default)\n"
    "  spaces     lock-spaces with their counters\n"
    "  sessions   client sessions and their remaining lease\n"
    "  locks      held locks: holder, mode, extent, token, age\n"
    "  waiters    waiting lock requests and who blocks them\n"
    "  counters   server and per lock-space counters\n"
    "  cluster    HA: members, leader, epoch and etcd health\n"
    "  metrics    wait/hold-time histograms per lock-space, per-client\n"
    "             counts, lease expiries, fence runs (admins)\n"
    "  blockers   the longest holders and waiters, and who blocks whom\n"
    "             as chains (waiter -> blocker -> ... -> holder)\n"
    "  reservations  SCSI persistent reservations of the lock-spaces\n"
    "  maintenance  per lock-space: maintenances so far, the image length\n"
    "             the last one announced, and the one running or waiting\n"
    "  top [--interval S] [--iterations N]\n"
    "             live view, refreshed every S seconds (default 1): lock-\n"
    "             spaces with rates, holders, waiters, chains; N frames\n"
    "             (default 0: until interrupted)\n"
    "  freeze LOCK-SPACE [--timeout S] [--client-id ID] [--lease-ms MS]\n"
    "         [--offset N --length N] [--allow-unused]\n"
    "         [--guest-agent SOCKET[,SOCKET]... [--guest-fs MOUNTPOINT[,...]]]\n"
    "         -- COMMAND [ARG]...\n"
    "             consistent cut: take a shared lock on the whole\n"
    "             lock-space in timestamp order, run COMMAND with\n"
    "             EXTLOCK_CUT_TOKEN, EXTLOCK_CUT_EPOCH, EXTLOCK_CUT_TIME and\n"
    "             EXTLOCK_CUT_LOCK_SPACE set, release the lock.  Exit 124:\n"
    "             timed out (COMMAND killed); 1: error or COMMAND failed.\n"
    "             --guest-agent: guest-fsfreeze-freeze through each guest\n"
    "             agent socket before the cut, guest-fsfreeze-thaw after\n"
    "             COMMAND and on any error (filesystem-consistent cut)\n"
    "  release-session --force SESSION [--reason TEXT]\n"
    "             DANGEROUS: release every lock of the expired SESSION now,\n"
    "             without waiting for its fence agent.  If its client is in\n"
    "             fact still writing, the data under those locks can be\n"
    "             corrupted.  Only for a host known to be dead or cut off.\n"
    "\n"
    "Options:\n"
    "  -c, --connect ADDR  coordinator address: unix:PATH, tcp:HOST:PORT\n"
    "                      or a comma-separated list of them (HA: the\n"
    "                      first that answers; with a list, a\n"
    "                      follower's view is replaced by the leader's)\n"
    "                      or a socket path (default: $EXTLOCK_COORDINATOR,\n"
    "                      else " DEFAULT_ADDRESS ")\n"
    "  -j, --json          print the status (or the selected part) as JSON\n"
    "  --tls-creds-dir DIR TLS to a tcp: address, credentials in DIR like\n"
    "                      QEMU's: ca-cert.pem, client-cert.pem,\n"
    "                      client-key.pem (or keys.psk with --tls-psk-user)\n"
    "  --tls-psk-user NAME use the pre-shared key of NAME from keys.psk\n"
    "  --tls-hostname NAME name expected in the server certificate\n"
    "                      (default: the host of the address)\n"
    "  --tls-verify-peer yes|no  verify the server certificate (default yes)\n"
    "  -h, --help          show this help\n"
    "\n"
    "Before hello the coordinator answers status only to admin identities\n"
    "(root or its own uid on the UNIX socket, admins of the --policy).\n"
    "\n"
    "Exit status: 0 success, 1 coordinator unreachable or error, "
    "2 bad usage.\n";

/* The admin request release-session; returns the exit status */
static int release_session(ExtlockConn *conn, const char *address,
                           const char *session, const char *reason)
{
    g_autoptr(GError) err = NULL;
    ExtlockMsg req, reply;
    int ret = 1;

    extlock_msg_init(&req, EXTLOCK_MSG_RELEASE_SESSION);
    req.session = (char *)session;
    req.message = (char *)reason;
    extlock_msg_init(&reply, EXTLOCK_MSG_INVALID);
    if (!extlock_conn_call(conn, &req, &reply, STATUS_TIMEOUT_MS, &err)) {
        fprintf(stderr, "extlockctl: no answer from %s: %s\n", address,
                err->message);
    } else if (reply.type == EXTLOCK_MSG_ERROR) {
        fprintf(stderr, "extlockctl: %s refused to release session %s: "
                "%s: %s\n", address, session,
                extlock_error_code_name(reply.error),
                reply.message ? reply.message : "");
    } else if (reply.type != EXTLOCK_MSG_SESSION_RELEASED) {
        fprintf(stderr, "extlockctl: unexpected reply \"%s\" from %s\n",
                extlock_msg_type_name(reply.type), address);
    } else {
        printf("session %s released: %" PRIu64 " locks\n", session,
               reply.released);
        ret = fflush(stdout) == 0 ? 0 : 1;
    }
    extlock_msg_clear(&reply);
    return ret;
}

/*
 * An HA follower knows no sessions or locks: if *@conn is one and names
 * a leader, replace *@conn by a connection to the leader.  True if it did.
 */
static bool follow_leader(ExtlockConn **conn, const ExtlockTlsOptions *tls)
{
    ExtlockMsg req, reply;
    ExtlockConn *leader = NULL;
    json_object *cl;
    const char *addr = NULL;

    extlock_msg_init(&req, EXTLOCK_MSG_STATUS);
    extlock_msg_init(&reply, EXTLOCK_MSG_INVALID);
    if (extlock_conn_call(*conn, &req, &reply, STATUS_TIMEOUT_MS, NULL) &&
        reply.type == EXTLOCK_MSG_STATUS_REPLY && reply.body) {
        cl = get(reply.body, "cluster");
        if (cl &&
            g_strcmp0(json_object_get_string(get(cl, "role")),
                      "leader") != 0 &&
            get(cl, "leader-address")) {
            addr = json_object_get_string(get(cl, "leader-address"));
            leader = extlock_conn_connect_tls(addr, tls, NULL);
        }
    }
    extlock_msg_clear(&reply);
    if (!leader) {
        return false;
    }
    extlock_conn_close(*conn);
    *conn = leader;
    return true;
}

static int usage_error(const char *fmt, const char *arg)
{
    fprintf(stderr, "extlockctl: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\nTry 'extlockctl --help' for more information.\n");
    return 2;
}

int main(int argc, char **argv)
{
    const char *address = NULL;
    const char *command = NULL;
    const char *session = NULL, *reason = NULL;
    bool json = false, force = false;
    uint64_t interval_s = 1, iterations = 0, frame;
    bool top_opts = false;
    TopState top = { 0 };
    ExtlockTlsOptions tls = { 0 };
    g_autoptr(GError) err = NULL;
    ExtlockConn *conn;
    ExtlockMsg req, reply;
    int i, ret = 1;
    int freeze_argc = 0;
    char **freeze_argv = NULL;

    for (i = 1; i < argc; i++) {
        const char *a = argv[i];

        if (g_str_equal(a, "-h") || g_str_equal(a, "--help")) {
            fputs(usage_text, stdout);
            return 0;
        } else if (g_str_equal(a, "-j") || g_str_equal(a, "--json")) {
            json = true;
        } else if (g_str_equal(a, "-c") || g_str_equal(a, "--connect")) {
            if (i + 1 >= argc) {
                return usage_error("option '%s' needs an address", a);
            }
            address = argv[++i];
        } else if (g_str_has_prefix(a, "--connect=")) {
            address = a + strlen("--connect=");
        } else if (g_str_equal(a, "--interval") ||
                   g_str_equal(a, "--iterations")) {
            char *end;
            uint64_t v;

            if (i + 1 >= argc) {
                return usage_error("option '%s' needs a value", a);
            }
            v = g_ascii_strtoull(argv[++i], &end, 10);
            if (!g_ascii_isdigit(argv[i][0]) || *end ||
                (g_str_equal(a, "--interval") ? v < 1 || v > 3600
                                              : v > 1000000)) {
                return usage_error("bad value '%s' (--interval: 1..3600 "
                                   "seconds, --iterations: 0..1000000)",
                                   argv[i]);
            }
            *(g_str_equal(a, "--interval") ? &interval_s : &iterations) = v;
            top_opts = true;
        } else if (g_str_equal(a, "--force")) {
            force = true;
        } else if (g_str_equal(a, "--reason")) {
            if (i + 1 >= argc) {
                return usage_error("option '%s' needs a text", a);
            }
            reason = argv[++i];
        } else if (g_str_has_prefix(a, "--tls-")) {
            static const char *const names[] = {
                "--tls-creds-dir", "--tls-psk-user", "--tls-hostname",
                "--tls-verify-peer", NULL,
            };
            const char *eq = strchr(a, '=');
            g_autofree char *name = eq ? g_strndup(a, eq - a) : g_strdup(a);
            const char *val;

            if (!g_strv_contains(names, name)) {
                return usage_error("unknown option '%s'", a);
            }
            if (eq) {
                val = eq + 1;
            } else if (i + 1 < argc) {
                val = argv[++i];
            } else {
                return usage_error("option '%s' needs a value", a);
            }
            if (g_str_equal(name, "--tls-creds-dir")) {
                tls.creds_dir = val;
            } else if (g_str_equal(name, "--tls-psk-user")) {
                tls.psk_username = val;
            } else if (g_str_equal(name, "--tls-hostname")) {
                tls.hostname = val;
            } else if (g_str_equal(val, "yes") || g_str_equal(val, "no")) {
                tls.no_verify_peer = g_str_equal(val, "no");
            } else {
                return usage_error("--tls-verify-peer takes yes or no, "
                                   "not '%s'", val);
            }
        } else if (a[0] == '-' && a[1]) {
            return usage_error("unknown option '%s'", a);
        } else if (!command && g_str_equal(a, "freeze")) {
            /* The rest is freeze's (freeze.c), COMMAND included */
            freeze_argc = argc - i - 1;
            freeze_argv = argv + i + 1;
            command = a;
            break;
        } else if (command && g_str_equal(command, "release-session") &&
                   !session) {
            session = a;
        } else if (!command && g_str_equal(a, "release-session")) {
            command = a;
        } else if (command) {
            return usage_error("unexpected argument '%s'", a);
        } else if (!g_strv_contains(commands, a)) {
            return usage_error("unknown command '%s'", a);
        } else {
            command = a;
        }
    }
    if (!command) {
        command = "status";
    }
    if (g_str_equal(command, "release-session")) {
        if (!session) {
            return usage_error("%s needs a session id", command);
        }
        if (!force) {
            return usage_error("%s is dangerous: if the session's client is "
                               "still writing, data can be corrupted; add "
                               "--force if its host is known to be dead or "
                               "cut off from the storage", command);
        }
    } else if (top_opts && !g_str_equal(command, "top")) {
        return usage_error("%s", "--interval and --iterations go with top");
    } else if (force || reason) {
        return usage_error("--force and --reason only go with "
                           "release-session%s", "");
    }
    if (!address) {
        address = g_getenv("EXTLOCK_COORDINATOR");
    }
    if (!address || !address[0]) {
        address = DEFAULT_ADDRESS;
    }

    if ((tls.psk_username || tls.hostname || tls.no_verify_peer) &&
        !tls.creds_dir) {
        return usage_error("%s", "the --tls-* options need --tls-creds-dir");
    }
    if (json && g_str_equal(command, "top")) {
        return usage_error("%s", "--json does not go with top");
    }
    if (freeze_argv) {
        if (json) {
            return usage_error("%s", "--json does not go with freeze");
        }
        return freeze_main(address, &tls, freeze_argc, freeze_argv);
    }
    {
        /* HA: the first address that answers, then the leader it names */
        g_auto(GStrv) list = g_strsplit(address, ",", -1);
        g_autoptr(GString) errors = g_string_new(NULL);

        conn = NULL;
        for (int i = 0; list[i] && !conn; i++) {
            g_clear_error(&err);
            conn = extlock_conn_connect_tls(list[i], &tls, &err);
            if (!conn) {
                g_string_append_printf(errors, "\n  %s", err->message);
            } else {
                address = extlock_conn_address(conn);
            }
        }
        if (!conn) {
            fprintf(stderr, "extlockctl: no coordinator answered:%s\n",
                    errors->str);
            return 1;
        }
        /* One address: that replica's own view (followers included) */
        if (list[0] && list[1] && follow_leader(&conn, &tls)) {
            address = extlock_conn_address(conn);
        }
    }

    if (session) {
        ret = release_session(conn, address, session, reason);
        extlock_conn_close(conn);
        return ret;
    }

    top.prev = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
    extlock_msg_init(&reply, EXTLOCK_MSG_INVALID);
    for (frame = 1; ; frame++) {
        extlock_msg_init(&req, EXTLOCK_MSG_STATUS);
        extlock_msg_clear(&reply);
        if (!extlock_conn_call(conn, &req, &reply, STATUS_TIMEOUT_MS, &err)) {
            fprintf(stderr, "extlockctl: no status from %s: %s\n", address,
                    err->message);
            goto out;
        }
        if (reply.type == EXTLOCK_MSG_ERROR) {
            fprintf(stderr, "extlockctl: %s refused the status request: "
                    "%s: %s\n", address, extlock_error_code_name(reply.error),
                    reply.message ? reply.message : "");
            goto out;
        }
        if (reply.type != EXTLOCK_MSG_STATUS_REPLY || !reply.body) {
            fprintf(stderr, "extlockctl: unexpected reply \"%s\" from %s\n",
                    extlock_msg_type_name(reply.type), address);
            goto out;
        }

        if (g_str_equal(command, "top")) {
            print_top(reply.body, &top, isatty(STDOUT_FILENO));
        } else if (json) {
            print_json(reply.body, command);
        } else {
            print_text(reply.body, command);
        }
        ret = fflush(stdout) == 0 ? 0 : 1;
        if (ret || !g_str_equal(command, "top") ||
            (iterations && frame >= iterations)) {
            break;
        }
        g_usleep(interval_s * G_USEC_PER_SEC);      /* the refresh rate */
    }

out:
    if (top.prev) {
        g_hash_table_destroy(top.prev);
    }
    extlock_msg_clear(&reply);
    extlock_conn_close(conn);
    return ret;
}
