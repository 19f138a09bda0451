/*
 * extlockd: a small etcd v3 client over etcd's HTTP/JSON gateway
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * etcd serves its v3 API (gRPC) also as JSON over HTTP ("grpc-gateway",
 * POST /v3/kv/range etc.; keys and values base64, 64-bit integers as
 * strings).  This client speaks that with libcurl and json-c.  Why not
 * gRPC: docs/design.rst "High availability".
 *
 * Calls are blocking, with a deadline, and meant for worker threads (the
 * HA thread and the state writer thread, ha.c): one EtcdClient belongs to
 * one thread at a time.  A client knows several endpoints and sticks to
 * the one that answered last; a transport error or an HTTP 5xx moves it to
 * the next one, each endpoint being tried at most once per call.
 */
#ifndef EXTLOCKD_ETCD_CLIENT_H
#define EXTLOCKD_ETCD_CLIENT_H

#include <glib.h>
#include <json-c/json.h>
#include <stdbool.h>
#include <stdint.h>

#define EXTLOCKD_ETCD_ERROR (extlockd_etcd_error_quark())
GQuark extlockd_etcd_error_quark(void);

typedef enum {
    EXTLOCKD_ETCD_ERROR_TRANSPORT,   /* no endpoint answered */
    EXTLOCKD_ETCD_ERROR_SERVER,      /* etcd answered with an error */
    EXTLOCKD_ETCD_ERROR_PROTOCOL,    /* an answer we do not understand */
    EXTLOCKD_ETCD_ERROR_CONFIG,      /* bad options, missing cluster */
} ExtlockdEtcdErrorCode;

typedef struct EtcdTls {
    const char *cacert;          /* CA of the etcd servers, or NULL */
    const char *cert;            /* client certificate, or NULL */
    const char *key;             /* its key */
} EtcdTls;

typedef struct EtcdClient EtcdClient;

/* A key-value pair as etcd returns it */
typedef struct EtcdKv {
    char *key;
    char *value;                 /* NUL-terminated copy of the bytes */
    size_t value_len;
    int64_t create_revision;
    int64_t mod_revision;
    int64_t lease;
} EtcdKv;

void etcd_kv_free(gpointer kv);

/* Call once from main() before any thread is started */
void etcd_global_init(void);

/*
 * @endpoints: "http://HOST:PORT" or "https://HOST:PORT" (NULL-terminated,
 * copied); @timeout_ms: the longest a call waits when the caller gives no
 * earlier deadline.
 */
EtcdClient *etcd_client_new(const char *const *endpoints, const EtcdTls *tls,
                            unsigned timeout_ms);
void etcd_client_free(EtcdClient *c);
/* The endpoint the next call goes to first */
const char *etcd_client_endpoint(EtcdClient *c);

/*
 * POST @request to @path ("/v3/kv/range") and return the parsed answer.
 * @deadline_us (g_get_monotonic_time() scale, 0: now + the client's
 * timeout) bounds the whole call, failover included.
 */
json_object *etcd_call(EtcdClient *c, const char *path, json_object *request,
                       int64_t deadline_us, GError **errp);
/* The same on one endpoint only (no failover), e.g. for health checks */
json_object *etcd_call_endpoint(EtcdClient *c, const char *endpoint,
                                const char *path, json_object *request,
                                int64_t deadline_us, GError **errp);

/* Range of one key: *@kv is NULL if the key does not exist */
bool etcd_get(EtcdClient *c, const char *key, EtcdKv **kv,
              int64_t deadline_us, GError **errp);
/* Every key under @prefix: a GPtrArray of EtcdKv */
GPtrArray *etcd_get_prefix(EtcdClient *c, const char *prefix,
                           int64_t deadline_us, GError **errp);
bool etcd_put(EtcdClient *c, const char *key, const char *value,
              int64_t lease, int64_t deadline_us, GError **errp);
bool etcd_delete(EtcdClient *c, const char *key, int64_t deadline_us,
                 GError **errp);

/*
 * A transaction: compares, then puts on success and ranges on failure.
 * Build it with the etcd_txn_* calls, run it with etcd_txn_commit().
 */
typedef struct EtcdTxn EtcdTxn;

typedef enum {
    ETCD_CMP_CREATE,             /* create_revision */
    ETCD_CMP_MOD,                /* mod_revision */
    ETCD_CMP_VALUE,
} EtcdCmpTarget;

EtcdTxn *etcd_txn_new(void);
void etcd_txn_free(EtcdTxn *t);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(EtcdTxn, etcd_txn_free)
/* key's TARGET == @rev (ETCD_CMP_CREATE / ETCD_CMP_MOD) */
void etcd_txn_cmp_rev(EtcdTxn *t, const char *key, EtcdCmpTarget target,
                      int64_t rev);
void etcd_txn_cmp_value(EtcdTxn *t, const char *key, const char *value);
void etcd_txn_put(EtcdTxn *t, const char *key, const char *value,
                  int64_t lease);
void etcd_txn_else_get(EtcdTxn *t, const char *key);
/*
 * Run it.  *@succeeded: the compares held; *@revision: the store's
 * revision after it (the revision of the puts if it succeeded);
 * *@else_kv (may be NULL): on failure, the first key ranged by
 * etcd_txn_else_get() (NULL if absent)
 */
bool etcd_txn_commit(EtcdClient *c, EtcdTxn *t, bool *succeeded,
                     int64_t *revision, EtcdKv **else_kv,
                     int64_t deadline_us, GError **errp);

/* Leases (TTL in seconds, as etcd counts them) */
bool etcd_lease_grant(EtcdClient *c, int64_t ttl_s, int64_t *id,
                      int64_t *granted_ttl_s, int64_t deadline_us,
                      GError **errp);
/* One keep-alive: *@ttl_s is 0 if the lease has expired */
bool etcd_lease_keepalive(EtcdClient *c, int64_t id, int64_t *ttl_s,
                          int64_t deadline_us, GError **errp);
bool etcd_lease_revoke(EtcdClient *c, int64_t id, int64_t deadline_us,
                       GError **errp);

/* /v3/maintenance/status of one endpoint */
typedef struct EtcdStatus {
    char *version;
    uint64_t member_id;
    uint64_t leader;             /* 0: the member knows no leader */
    uint64_t raft_term;
    int64_t db_size;
} EtcdStatus;

bool etcd_endpoint_status(EtcdClient *c, const char *endpoint,
                          EtcdStatus *st, int64_t deadline_us,
                          GError **errp);
void etcd_status_clear(EtcdStatus *st);

#endif /* EXTLOCKD_ETCD_CLIENT_H */
