/*
 * Unit tests for the driver's lease arithmetic (block/extlock-lease.c)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The safety argument (docs/design.rst): the coordinator re-grants a
 * lapsed session's locks no earlier than its receipt of the last renewal
 * + lease + fence margin, and receipt >= sending.  So the node must stop
 * starting I/O (its deadline) and give up on I/O still in flight (the
 * stuck bound) strictly before sent + lease + fence margin, for every
 * lease and fence margin the protocol allows.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>
#include "extlock-lease.h"

#define MS 1000000LL

static void test_margin(void **state)
{
    (void)state;
    assert_int_equal(extlock_lease_margin_ns(100), 10 * MS);
    assert_int_equal(extlock_lease_margin_ns(5000), 500 * MS);
    assert_int_equal(extlock_lease_margin_ns(10000), 1000 * MS);
    /* capped at 1 s */
    assert_int_equal(extlock_lease_margin_ns(3600000), 1000 * MS);
}

static void test_deadline(void **state)
{
    (void)state;
    assert_int_equal(extlock_lease_deadline(5000, 7 * MS),
                     7 * MS + 5000 * MS - 500 * MS);
    assert_int_equal(extlock_lease_deadline(60000, 0), 59000 * MS);
}

/* Deadline < stuck bound < the coordinator's earliest re-grant, always */
static void test_bounds_before_regrant(void **state)
{
    static const uint32_t leases[] = { 100, 101, 999, 1000, 5000, 9999,
                                       10000, 10001, 30000, 3600000 };
    static const uint32_t fences[] = { 0, 1, 10, 500, 1000, 30000 };
    const int64_t sent = 123456789;

    (void)state;
    for (size_t i = 0; i < sizeof(leases) / sizeof(leases[0]); i++) {
        for (size_t j = 0; j < sizeof(fences) / sizeof(fences[0]); j++) {
            int64_t d = extlock_lease_deadline(leases[i], sent);
            int64_t bound = extlock_lease_stuck_bound(d, leases[i],
                                                      fences[j]);
            int64_t regrant = sent + (int64_t)leases[i] * MS +
                              (int64_t)fences[j] * MS;

            assert_true(d < sent + (int64_t)leases[i] * MS);
            assert_true(d < bound);
            assert_true(bound < regrant);
            /* a tenth of both margins is left for exiting */
            assert_int_equal(regrant - bound,
                             (extlock_lease_margin_ns(leases[i]) +
                              (int64_t)fences[j] * MS) / 10);
        }
    }
}

static void test_renew(void **state)
{
    (void)state;
    /* three renewals per lease: two may be lost before the deadline */
    assert_int_equal(extlock_lease_renew_at(3000, 5 * MS), 1005 * MS);
    assert_true(extlock_lease_renew_at(5000, 0) * 2 <
                extlock_lease_deadline(5000, 0));
}

static void test_backoff(void **state)
{
    int64_t b = 0;

    (void)state;
    b = extlock_backoff_next_ms(b, 50, 2000);
    assert_int_equal(b, 50);
    b = extlock_backoff_next_ms(b, 50, 2000);
    assert_int_equal(b, 100);
    for (int i = 0; i < 10; i++) {
        b = extlock_backoff_next_ms(b, 50, 2000);
    }
    assert_int_equal(b, 2000);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_margin),
        cmocka_unit_test(test_deadline),
        cmocka_unit_test(test_bounds_before_regrant),
        cmocka_unit_test(test_renew),
        cmocka_unit_test(test_backoff),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
