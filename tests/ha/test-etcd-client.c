/*
 * The etcd v3 client of extlockd (contrib/extlockd/etcd-client.c) against
 * a real etcd: ETCD_ENDPOINTS=URL[,URL...] (tests/ha/test_ha.py runs it
 * against its 3-member cluster; without the variable it is skipped, 77).
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include <glib.h>

#include "etcd-client.h"

static char **endpoints;
static char *prefix;

static char *key(const char *name)
{
    return g_strconcat(prefix, name, NULL);
}

static void test_put_get_delete(void **state)
{
    EtcdClient *c = etcd_client_new((const char *const *)endpoints, NULL,
                                    2000);
    g_autofree char *k = key("kv");
    g_autoptr(GError) err = NULL;
    EtcdKv *kv = NULL;

    assert_true(etcd_get(c, k, &kv, 0, &err));
    assert_null(kv);
    /* bytes that need base64: quotes, newline, UTF-8 */
    assert_true(etcd_put(c, k, "a\"b\n\xc3\xa9", 0, 0, &err));
    assert_true(etcd_get(c, k, &kv, 0, &err));
    assert_non_null(kv);
    assert_string_equal(kv->value, "a\"b\n\xc3\xa9");
    assert_string_equal(kv->key, k);
    assert_true(kv->create_revision > 0);
    assert_int_equal(kv->create_revision, kv->mod_revision);
    etcd_kv_free(kv);
    assert_true(etcd_delete(c, k, 0, &err));
    assert_true(etcd_get(c, k, &kv, 0, &err));
    assert_null(kv);
    etcd_client_free(c);
}

static void test_txn_create_and_cas(void **state)
{
    EtcdClient *c = etcd_client_new((const char *const *)endpoints, NULL,
                                    2000);
    g_autofree char *k = key("txn");
    g_autoptr(GError) err = NULL;
    EtcdKv *other = NULL;
    int64_t rev, rev2;
    bool ok;
    EtcdTxn *t;

    /* create if absent: succeeds once */
    t = etcd_txn_new();
    etcd_txn_cmp_rev(t, k, ETCD_CMP_CREATE, 0);
    etcd_txn_put(t, k, "first", 0);
    etcd_txn_else_get(t, k);
    assert_true(etcd_txn_commit(c, t, &ok, &rev, &other, 0, &err));
    assert_true(ok);
    assert_null(other);
    etcd_txn_free(t);

    t = etcd_txn_new();
    etcd_txn_cmp_rev(t, k, ETCD_CMP_CREATE, 0);
    etcd_txn_put(t, k, "second", 0);
    etcd_txn_else_get(t, k);
    assert_true(etcd_txn_commit(c, t, &ok, &rev2, &other, 0, &err));
    assert_false(ok);
    assert_non_null(other);
    assert_string_equal(other->value, "first");
    assert_int_equal(other->create_revision, rev);
    etcd_kv_free(other);
    etcd_txn_free(t);

    /* compare-and-swap on mod_revision: the stale one fails */
    t = etcd_txn_new();
    etcd_txn_cmp_rev(t, k, ETCD_CMP_MOD, rev);
    etcd_txn_put(t, k, "cas1", 0);
    assert_true(etcd_txn_commit(c, t, &ok, &rev2, NULL, 0, &err));
    assert_true(ok);
    assert_true(rev2 > rev);
    etcd_txn_free(t);
    t = etcd_txn_new();
    etcd_txn_cmp_rev(t, k, ETCD_CMP_MOD, rev);
    etcd_txn_put(t, k, "cas2", 0);
    assert_true(etcd_txn_commit(c, t, &ok, NULL, NULL, 0, &err));
    assert_false(ok);
    etcd_txn_free(t);
    /* value compare */
    t = etcd_txn_new();
    etcd_txn_cmp_value(t, k, "cas1");
    etcd_txn_put(t, k, "cas3", 0);
    assert_true(etcd_txn_commit(c, t, &ok, NULL, NULL, 0, &err));
    assert_true(ok);
    etcd_txn_free(t);
    assert_true(etcd_delete(c, k, 0, &err));
    etcd_client_free(c);
}

static void test_lease(void **state)
{
    EtcdClient *c = etcd_client_new((const char *const *)endpoints, NULL,
                                    2000);
    g_autofree char *k = key("leased");
    g_autoptr(GError) err = NULL;
    int64_t id, ttl, left;
    EtcdKv *kv = NULL;

    assert_true(etcd_lease_grant(c, 1, &id, &ttl, 0, &err));
    assert_true(id != 0);
    assert_true(ttl >= 1);
    assert_true(etcd_put(c, k, "x", id, 0, &err));
    assert_true(etcd_get(c, k, &kv, 0, &err));
    assert_non_null(kv);
    assert_int_equal(kv->lease, id);
    etcd_kv_free(kv);
    assert_true(etcd_lease_keepalive(c, id, &left, 0, &err));
    assert_int_equal(left, ttl);
    /* revoked: the key goes with it, keep-alive says TTL 0 */
    assert_true(etcd_lease_revoke(c, id, 0, &err));
    assert_true(etcd_get(c, k, &kv, 0, &err));
    assert_null(kv);
    assert_true(etcd_lease_keepalive(c, id, &left, 0, &err));
    assert_int_equal(left, 0);
    etcd_client_free(c);
}

static void test_prefix_and_status(void **state)
{
    EtcdClient *c = etcd_client_new((const char *const *)endpoints, NULL,
                                    2000);
    g_autofree char *p = key("dir/");
    g_autoptr(GError) err = NULL;
    g_autoptr(GPtrArray) kvs = NULL;
    EtcdStatus st;

    for (int i = 0; i < 3; i++) {
        g_autofree char *k = g_strdup_printf("%s%d", p, i);

        assert_true(etcd_put(c, k, "v", 0, 0, &err));
    }
    kvs = etcd_get_prefix(c, p, 0, &err);
    assert_non_null(kvs);
    assert_int_equal(kvs->len, 3);
    for (int i = 0; endpoints[i]; i++) {
        assert_true(etcd_endpoint_status(c, endpoints[i], &st, 0, &err));
        assert_non_null(st.version);
        assert_true(g_str_has_prefix(st.version, "3."));
        assert_true(st.leader != 0);
        assert_true(st.member_id != 0);
        etcd_status_clear(&st);
    }
    etcd_client_free(c);
}

/* A dead endpoint first: the call goes to the next one */
static void test_failover(void **state)
{
    g_autoptr(GPtrArray) list = g_ptr_array_new();
    g_autoptr(GError) err = NULL;
    const char *dead[] = { "http://127.0.0.1:9", NULL };
    EtcdClient *c;
    EtcdKv *kv = NULL;
    int64_t t0;

    g_ptr_array_add(list, (char *)"http://127.0.0.1:9");
    for (int i = 0; endpoints[i]; i++) {
        g_ptr_array_add(list, endpoints[i]);
    }
    g_ptr_array_add(list, NULL);
    c = etcd_client_new((const char *const *)list->pdata, NULL, 2000);
    assert_true(etcd_get(c, "/nothing", &kv, 0, &err));
    assert_string_equal(etcd_client_endpoint(c), endpoints[0]);
    etcd_client_free(c);

    /* nothing answers: an error within the deadline */
    c = etcd_client_new(dead, NULL, 300);
    t0 = g_get_monotonic_time();
    assert_false(etcd_get(c, "/nothing", &kv, 0, &err));
    assert_true(g_error_matches(err, EXTLOCKD_ETCD_ERROR,
                                EXTLOCKD_ETCD_ERROR_TRANSPORT));
    assert_true(g_get_monotonic_time() - t0 < 2 * G_USEC_PER_SEC);
    etcd_client_free(c);
}

int main(void)
{
    const char *eps = g_getenv("ETCD_ENDPOINTS");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_put_get_delete),
        cmocka_unit_test(test_txn_create_and_cas),
        cmocka_unit_test(test_lease),
        cmocka_unit_test(test_prefix_and_status),
        cmocka_unit_test(test_failover),
    };

    if (!eps || !*eps) {
        fprintf(stderr, "ETCD_ENDPOINTS not set: skipped\n");
        return 77;
    }
    etcd_global_init();
    endpoints = g_strsplit(eps, ",", -1);
    prefix = g_strdup_printf("/extlock-test/%d/", (int)getpid());
    return cmocka_run_group_tests(tests, NULL, NULL);
}
