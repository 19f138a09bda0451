/*
 * extlockd: a small etcd v3 client over etcd's HTTP/JSON gateway
 * (see etcd-client.h)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <inttypes.h>
#include <string.h>
#include <curl/curl.h>

#include "etcd-client.h"

/* The longest answer we accept (a state object is a few hundred KiB) */
#define ETCD_MAX_ANSWER (64 * 1024 * 1024)

struct EtcdClient {
    char **endpoints;
    guint n;
    guint current;
    unsigned timeout_ms;
    char *cacert, *cert, *key;
    CURL *curl;
    GString *answer;
};

/* G_DEFINE_QUARK(extlockd-etcd-error-quark, extlockd_etcd_error), spelt out */
GQuark extlockd_etcd_error_quark(void)
{
    static GQuark q;

    if (G_UNLIKELY(q == 0)) {
        q = g_quark_from_static_string("extlockd-etcd-error-quark");
    }
    return q;
}

void etcd_global_init(void)
{
    curl_global_init(CURL_GLOBAL_ALL);
}

void etcd_kv_free(gpointer p)
{
    EtcdKv *kv = p;

    if (kv) {
        g_free(kv->key);
        g_free(kv->value);
        g_free(kv);
    }
}

EtcdClient *etcd_client_new(const char *const *endpoints, const EtcdTls *tls,
                            unsigned timeout_ms)
{
    EtcdClient *c = g_new0(EtcdClient, 1);

    c->endpoints = g_strdupv((char **)endpoints);
    c->n = g_strv_length(c->endpoints);
    c->timeout_ms = timeout_ms;
    if (tls) {
        c->cacert = g_strdup(tls->cacert);
        c->cert = g_strdup(tls->cert);
        c->key = g_strdup(tls->key);
    }
    c->curl = curl_easy_init();
    c->answer = g_string_new(NULL);
    return c;
}

void etcd_client_free(EtcdClient *c)
{
    if (!c) {
        return;
    }
    curl_easy_cleanup(c->curl);
    g_string_free(c->answer, TRUE);
    g_strfreev(c->endpoints);
    g_free(c->cacert);
    g_free(c->cert);
    g_free(c->key);
    g_free(c);
}

const char *etcd_client_endpoint(EtcdClient *c)
{
    return c->n ? c->endpoints[c->current] : "";
}

static size_t collect(char *ptr, size_t size, size_t nmemb, void *opaque)
{
    GString *s = opaque;

    if (s->len + size * nmemb > ETCD_MAX_ANSWER) {
        return 0;
    }
    g_string_append_len(s, ptr, size * nmemb);
    return size * nmemb;
}

/*
 * One POST.  Returns the parsed answer, or NULL with *@retry telling
 * whether another endpoint may do better (transport errors, 5xx)
 */
static json_object *post_once(EtcdClient *c, const char *endpoint,
                              const char *path, const char *body,
                              int64_t deadline_us, bool *retry,
                              GError **errp)
{
    g_autofree char *url = g_strconcat(endpoint, path, NULL);
    int64_t left_ms = (deadline_us - g_get_monotonic_time()) / 1000;
    struct curl_slist *hdr = NULL;
    json_object *obj, *v;
    long status = 0;
    CURLcode rc;

    *retry = true;
    if (left_ms <= 0) {
        g_set_error(errp, EXTLOCKD_ETCD_ERROR, EXTLOCKD_ETCD_ERROR_TRANSPORT,
                    "%s: no time left", url);
        return NULL;
    }
    g_string_truncate(c->answer, 0);
    curl_easy_reset(c->curl);
    hdr = curl_slist_append(hdr, "Content-Type: application/json");
    curl_easy_setopt(c->curl, CURLOPT_URL, url);
    curl_easy_setopt(c->curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c->curl, CURLOPT_POST, 1L);
    curl_easy_setopt(c->curl, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c->curl, CURLOPT_HTTPHEADER, hdr);
    curl_easy_setopt(c->curl, CURLOPT_TIMEOUT_MS, (long)left_ms);
    curl_easy_setopt(c->curl, CURLOPT_CONNECTTIMEOUT_MS, (long)left_ms);
    curl_easy_setopt(c->curl, CURLOPT_WRITEFUNCTION, collect);
    curl_easy_setopt(c->curl, CURLOPT_WRITEDATA, c->answer);
    curl_easy_setopt(c->curl, CURLOPT_PROTOCOLS_STR, "http,https");
    if (c->cacert) {
        curl_easy_setopt(c->curl, CURLOPT_CAINFO, c->cacert);
    }
    if (c->cert) {
        curl_easy_setopt(c->curl, CURLOPT_SSLCERT, c->cert);
        curl_easy_setopt(c->curl, CURLOPT_SSLKEY, c->key);
    }
    rc = curl_easy_perform(c->curl);
    curl_slist_free_all(hdr);
    if (rc != CURLE_OK) {
        g_set_error(errp, EXTLOCKD_ETCD_ERROR, EXTLOCKD_ETCD_ERROR_TRANSPORT,
                    "%s: %s", url, curl_easy_strerror(rc));
        return NULL;
    }
    curl_easy_getinfo(c->curl, CURLINFO_RESPONSE_CODE, &status);
    obj = json_tokener_parse(c->answer->str);
    if (status != 200) {
        const char *msg = NULL;

        if (obj && json_object_object_get_ex(obj, "error", &v)) {
            msg = json_object_get_string(v);
        } else if (obj && json_object_object_get_ex(obj, "message", &v)) {
            msg = json_object_get_string(v);
        }
        *retry = status >= 500 || status == 404;
        g_set_error(errp, EXTLOCKD_ETCD_ERROR, EXTLOCKD_ETCD_ERROR_SERVER,
                    "%s: HTTP %ld: %s", url, status,
                    msg ? msg : c->answer->str);
        json_object_put(obj);
        return NULL;
    }
    if (!obj || !json_object_is_type(obj, json_type_object)) {
        g_set_error(errp, EXTLOCKD_ETCD_ERROR, EXTLOCKD_ETCD_ERROR_PROTOCOL,
                    "%s: the answer is not a JSON object", url);
        json_object_put(obj);
        return NULL;
    }
    /* A streaming call (keep-alive) wraps its answer in "result" */
    if (json_object_object_get_ex(obj, "error", &v)) {
        g_set_error(errp, EXTLOCKD_ETCD_ERROR, EXTLOCKD_ETCD_ERROR_SERVER,
                    "%s: %s", url, json_object_to_json_string(v));
        *retry = true;
        json_object_put(obj);
        return NULL;
    }
    *retry = false;
    return obj;
}

static int64_t deadline_or_default(EtcdClient *c, int64_t deadline_us)
{
    return deadline_us ? deadline_us
                       : g_get_monotonic_time() + c->timeout_ms * 1000LL;
}

json_object *etcd_call_endpoint(EtcdClient *c, const char *endpoint,
                                const char *path, json_object *request,
                                int64_t deadline_us, GError **errp)
{
    bool retry;

    return post_once(c, endpoint, path, json_object_to_json_string_ext(
                         request, JSON_C_TO_STRING_PLAIN),
                     deadline_or_default(c, deadline_us), &retry, errp);
}

json_object *etcd_call(EtcdClient *c, const char *path, json_object *request,
                       int64_t deadline_us, GError **errp)
{
    const char *body = json_object_to_json_string_ext(request,
                                                      JSON_C_TO_STRING_PLAIN);
    g_autoptr(GString) errors = g_string_new(NULL);

    deadline_us = deadline_or_default(c, deadline_us);
    for (guint i = 0; i < c->n; i++) {
        g_autoptr(GError) err = NULL;
        bool retry;
        json_object *obj = post_once(c, c->endpoints[c->current], path, body,
                                     deadline_us, &retry, &err);

        if (obj) {
            return obj;
        }
        if (!retry) {
            g_propagate_error(errp, g_steal_pointer(&err));
            return NULL;
        }
        g_string_append_printf(errors, "%s%s", errors->len ? "; " : "",
                               err->message);
        c->current = (c->current + 1) % c->n;
        if (g_get_monotonic_time() >= deadline_us) {
            break;
        }
    }
    g_set_error(errp, EXTLOCKD_ETCD_ERROR, EXTLOCKD_ETCD_ERROR_TRANSPORT,
                "no etcd endpoint answered: %s", errors->str);
    return NULL;
}

/* ------------------------------------------------------------------ */
/* JSON helpers: base64 and int64-as-string                            */

static json_object *b64(const char *s, size_t len)
{
    g_autofree char *e = g_base64_encode((const guchar *)s, len);

    return json_object_new_string(e);
}

static json_object *b64s(const char *s)
{
    return b64(s, strlen(s));
}

static json_object *i64(int64_t v)
{
    char buf[24];

    snprintf(buf, sizeof(buf), "%" PRId64, v);
    return json_object_new_string(buf);
}

/* An int64 member, string or number; absent (the zero value) is 0 */
static int64_t get_i64(json_object *obj, const char *name)
{
    json_object *v;

    if (!obj || !json_object_object_get_ex(obj, name, &v)) {
        return 0;
    }
    if (json_object_is_type(v, json_type_string)) {
        return g_ascii_strtoll(json_object_get_string(v), NULL, 10);
    }
    return json_object_get_int64(v);
}

static uint64_t get_u64(json_object *obj, const char *name)
{
    json_object *v;

    if (!obj || !json_object_object_get_ex(obj, name, &v)) {
        return 0;
    }
    if (json_object_is_type(v, json_type_string)) {
        return g_ascii_strtoull(json_object_get_string(v), NULL, 10);
    }
    return json_object_get_uint64(v);
}

static char *unb64(json_object *obj, const char *name, size_t *len)
{
    json_object *v;
    gsize n = 0;
    guchar *raw;
    char *out;

    if (!json_object_object_get_ex(obj, name, &v)) {
        *len = 0;
        return g_strdup("");
    }
    raw = g_base64_decode(json_object_get_string(v), &n);
    out = g_malloc(n + 1);
    memcpy(out, raw, n);
    out[n] = '\0';
    g_free(raw);
    *len = n;
    return out;
}

static EtcdKv *kv_from_json(json_object *o)
{
    EtcdKv *kv = g_new0(EtcdKv, 1);
    size_t klen;

    kv->key = unb64(o, "key", &klen);
    kv->value = unb64(o, "value", &kv->value_len);
    kv->create_revision = get_i64(o, "create_revision");
    kv->mod_revision = get_i64(o, "mod_revision");
    kv->lease = get_i64(o, "lease");
    return kv;
}

static json_object *header_of(json_object *obj)
{
    json_object *h = NULL;

    json_object_object_get_ex(obj, "header", &h);
    return h;
}

/* ------------------------------------------------------------------ */
/* KV                                                                  */

static GPtrArray *range(EtcdClient *c, const char *key, bool prefix,
                        int64_t deadline_us, GError **errp)
{
    json_object *req = json_object_new_object();
    json_object *ans, *kvs;
    GPtrArray *out;

    json_object_object_add(req, "key", b64s(key));
    if (prefix) {
        /* range_end: the prefix with its last byte incremented */
        g_autofree char *end = g_strdup(key);
        size_t n = strlen(end);

        g_assert(n > 0 && (guchar)end[n - 1] < 0xff);
        end[n - 1]++;
        json_object_object_add(req, "range_end", b64s(end));
    }
    ans = etcd_call(c, "/v3/kv/range", req, deadline_us, errp);
    json_object_put(req);
    if (!ans) {
        return NULL;
    }
    out = g_ptr_array_new_with_free_func(etcd_kv_free);
    if (json_object_object_get_ex(ans, "kvs", &kvs) &&
        json_object_is_type(kvs, json_type_array)) {
        for (size_t i = 0; i < json_object_array_length(kvs); i++) {
            g_ptr_array_add(out,
                            kv_from_json(json_object_array_get_idx(kvs, i)));
        }
    }
    json_object_put(ans);
    return out;
}

bool etcd_get(EtcdClient *c, const char *key, EtcdKv **kv,
              int64_t deadline_us, GError **errp)
{
    g_autoptr(GPtrArray) kvs = range(c, key, false, deadline_us, errp);

    *kv = NULL;
    if (!kvs) {
        return false;
    }
    if (kvs->len) {
        *kv = g_ptr_array_steal_index(kvs, 0);
    }
    return true;
}

GPtrArray *etcd_get_prefix(EtcdClient *c, const char *prefix,
                           int64_t deadline_us, GError **errp)
{
    return range(c, prefix, true, deadline_us, errp);
}

static json_object *put_request(const char *key, const char *value,
                                int64_t lease)
{
    json_object *req = json_object_new_object();

    json_object_object_add(req, "key", b64s(key));
    json_object_object_add(req, "value", b64s(value));
    if (lease) {
        json_object_object_add(req, "lease", i64(lease));
    }
    return req;
}

bool etcd_put(EtcdClient *c, const char *key, const char *value,
              int64_t lease, int64_t deadline_us, GError **errp)
{
    json_object *req = put_request(key, value, lease);
    json_object *ans = etcd_call(c, "/v3/kv/put", req, deadline_us, errp);

    json_object_put(req);
    json_object_put(ans);
    return ans != NULL;
}

bool etcd_delete(EtcdClient *c, const char *key, int64_t deadline_us,
                 GError **errp)
{
    json_object *req = json_object_new_object();
    json_object *ans;

    json_object_object_add(req, "key", b64s(key));
    ans = etcd_call(c, "/v3/kv/deleterange", req, deadline_us, errp);
    json_object_put(req);
    json_object_put(ans);
    return ans != NULL;
}

/* ------------------------------------------------------------------ */
/* Transactions                                                        */

struct EtcdTxn {
    json_object *compare;
    json_object *success;
    json_object *failure;
};

EtcdTxn *etcd_txn_new(void)
{
    EtcdTxn *t = g_new0(EtcdTxn, 1);

    t->compare = json_object_new_array();
    t->success = json_object_new_array();
    t->failure = json_object_new_array();
    return t;
}

void etcd_txn_free(EtcdTxn *t)
{
    if (t) {
        json_object_put(t->compare);
        json_object_put(t->success);
        json_object_put(t->failure);
        g_free(t);
    }
}

void etcd_txn_cmp_rev(EtcdTxn *t, const char *key, EtcdCmpTarget target,
                      int64_t rev)
{
    json_object *cmp = json_object_new_object();

    g_assert(target == ETCD_CMP_CREATE || target == ETCD_CMP_MOD);
    json_object_object_add(cmp, "result", json_object_new_string("EQUAL"));
    json_object_object_add(cmp, "target", json_object_new_string(
                               target == ETCD_CMP_CREATE ? "CREATE" : "MOD"));
    json_object_object_add(cmp, "key", b64s(key));
    json_object_object_add(cmp, target == ETCD_CMP_CREATE ? "create_revision"
                                                         : "mod_revision",
                           i64(rev));
    json_object_array_add(t->compare, cmp);
}

void etcd_txn_cmp_value(EtcdTxn *t, const char *key, const char *value)
{
    json_object *cmp = json_object_new_object();

    json_object_object_add(cmp, "result", json_object_new_string("EQUAL"));
    json_object_object_add(cmp, "target", json_object_new_string("VALUE"));
    json_object_object_add(cmp, "key", b64s(key));
    json_object_object_add(cmp, "value", b64s(value));
    json_object_array_add(t->compare, cmp);
}

void etcd_txn_put(EtcdTxn *t, const char *key, const char *value,
                  int64_t lease)
{
    json_object *op = json_object_new_object();

    json_object_object_add(op, "request_put", put_request(key, value, lease));
    json_object_array_add(t->success, op);
}

void etcd_txn_else_get(EtcdTxn *t, const char *key)
{
    json_object *op = json_object_new_object();
    json_object *r = json_object_new_object();

    json_object_object_add(r, "key", b64s(key));
    json_object_object_add(op, "request_range", r);
    json_object_array_add(t->failure, op);
}

bool etcd_txn_commit(EtcdClient *c, EtcdTxn *t, bool *succeeded,
                     int64_t *revision, EtcdKv **else_kv,
                     int64_t deadline_us, GError **errp)
{
    json_object *req = json_object_new_object();
    json_object *ans, *v, *resps;

    json_object_object_add(req, "compare", json_object_get(t->compare));
    json_object_object_add(req, "success", json_object_get(t->success));
    json_object_object_add(req, "failure", json_object_get(t->failure));
    ans = etcd_call(c, "/v3/kv/txn", req, deadline_us, errp);
    json_object_put(req);
    if (else_kv) {
        *else_kv = NULL;
    }
    if (!ans) {
        return false;
    }
    *succeeded = json_object_object_get_ex(ans, "succeeded", &v) &&
                 json_object_get_boolean(v);
    if (revision) {
        *revision = get_i64(header_of(ans), "revision");
    }
    if (!*succeeded && else_kv &&
        json_object_object_get_ex(ans, "responses", &resps) &&
        json_object_is_type(resps, json_type_array) &&
        json_object_array_length(resps) > 0) {
        json_object *r = json_object_array_get_idx(resps, 0);
        json_object *rr, *kvs;

        if (json_object_object_get_ex(r, "response_range", &rr) &&
            json_object_object_get_ex(rr, "kvs", &kvs) &&
            json_object_array_length(kvs) > 0) {
            *else_kv = kv_from_json(json_object_array_get_idx(kvs, 0));
        }
    }
    json_object_put(ans);
    return true;
}

/* ------------------------------------------------------------------ */
/* Leases                                                              */

bool etcd_lease_grant(EtcdClient *c, int64_t ttl_s, int64_t *id,
                      int64_t *granted_ttl_s, int64_t deadline_us,
                      GError **errp)
{
    json_object *req = json_object_new_object();
    json_object *ans;

    json_object_object_add(req, "TTL", i64(ttl_s));
    ans = etcd_call(c, "/v3/lease/grant", req, deadline_us, errp);
    json_object_put(req);
    if (!ans) {
        return false;
    }
    *id = get_i64(ans, "ID");
    *granted_ttl_s = get_i64(ans, "TTL");
    json_object_put(ans);
    if (!*id || *granted_ttl_s <= 0) {
        g_set_error(errp, EXTLOCKD_ETCD_ERROR, EXTLOCKD_ETCD_ERROR_PROTOCOL,
                    "lease grant answered without an ID or TTL");
        return false;
    }
    return true;
}

bool etcd_lease_keepalive(EtcdClient *c, int64_t id, int64_t *ttl_s,
                          int64_t deadline_us, GError **errp)
{
    json_object *req = json_object_new_object();
    json_object *ans, *res;

    json_object_object_add(req, "ID", i64(id));
    ans = etcd_call(c, "/v3/lease/keepalive", req, deadline_us, errp);
    json_object_put(req);
    if (!ans) {
        return false;
    }
    if (!json_object_object_get_ex(ans, "result", &res)) {
        res = ans;
    }
    /* An expired lease comes back with TTL 0, which JSON leaves out */
    *ttl_s = get_i64(res, "TTL");
    json_object_put(ans);
    return true;
}

bool etcd_lease_revoke(EtcdClient *c, int64_t id, int64_t deadline_us,
                       GError **errp)
{
    json_object *req = json_object_new_object();
    json_object *ans;

    json_object_object_add(req, "ID", i64(id));
    ans = etcd_call(c, "/v3/lease/revoke", req, deadline_us, errp);
    json_object_put(req);
    json_object_put(ans);
    return ans != NULL;
}

/* ------------------------------------------------------------------ */
/* Maintenance                                                         */

bool etcd_endpoint_status(EtcdClient *c, const char *endpoint,
                          EtcdStatus *st, int64_t deadline_us,
                          GError **errp)
{
    json_object *req = json_object_new_object();
    json_object *ans, *v;

    memset(st, 0, sizeof(*st));
    ans = etcd_call_endpoint(c, endpoint, "/v3/maintenance/status", req,
                             deadline_us, errp);
    json_object_put(req);
    if (!ans) {
        return false;
    }
    if (json_object_object_get_ex(ans, "version", &v)) {
        st->version = g_strdup(json_object_get_string(v));
    }
    st->member_id = get_u64(header_of(ans), "member_id");
    st->leader = get_u64(ans, "leader");
    st->raft_term = get_u64(ans, "raftTerm");
    st->db_size = get_i64(ans, "dbSize");
    json_object_put(ans);
    return true;
}

void etcd_status_clear(EtcdStatus *st)
{
    g_free(st->version);
    st->version = NULL;
}
