/*
 * Unit tests for the persistent reservation state machine
 * (util/extlock-reservation.c): every PERSISTENT RESERVE OUT service
 * action with its SPC-4 error cases, the PR generation, and the access
 * rules of the six reservation types; and the CDB checks and codecs that
 * scsi-hd uses (include/extlock/scsi-pr.h): the sense code of every bad
 * CDB, and READ KEYS' ADDITIONAL LENGTH.
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>
#include <stdio.h>
#include <string.h>
#include "extlock/reservation.h"
#include "extlock/scsi-pr.h"

#define A "hostA/disk0"
#define B "hostB/disk0"
#define C "hostC/disk0"

static ExtlockPrStatus out(ExtlockPrState *s, const char *nexus,
                           ExtlockPrAction action, ExtlockPrType type,
                           uint64_t key, uint64_t sa_key)
{
    ExtlockPrOut req = {
        .action = action, .type = type, .key = key, .sa_key = sa_key,
    };

    return extlock_pr_out(s, nexus, &req, NULL);
}

static uint64_t key_of(const ExtlockPrState *s, const char *nexus)
{
    const ExtlockPrRegistrant *r = extlock_pr_find(s, nexus);

    return r ? r->key : 0;
}

/*
 * Any failing command must leave the state exactly as it was: compare
 * against a copy taken before.
 */
static void assert_same(const ExtlockPrState *a, const ExtlockPrState *b)
{
    assert_int_equal(a->generation, b->generation);
    assert_int_equal(a->aptpl, b->aptpl);
    assert_int_equal(a->type, b->type);
    if (a->holder || b->holder) {
        assert_non_null(a->holder);
        assert_non_null(b->holder);
        assert_string_equal(a->holder, b->holder);
    }
    assert_int_equal(a->registrants->len, b->registrants->len);
    for (guint i = 0; i < a->registrants->len; i++) {
        const ExtlockPrRegistrant *x = g_ptr_array_index(a->registrants, i);
        const ExtlockPrRegistrant *y = g_ptr_array_index(b->registrants, i);

        assert_string_equal(x->nexus, y->nexus);
        assert_int_equal(x->key, y->key);
    }
}

static void expect_fail(ExtlockPrState *s, const char *nexus,
                        ExtlockPrAction action, ExtlockPrType type,
                        uint64_t key, uint64_t sa_key, ExtlockPrStatus want)
{
    ExtlockPrState before;

    extlock_pr_copy(&before, s);
    assert_int_equal(out(s, nexus, action, type, key, sa_key), want);
    assert_same(s, &before);
    extlock_pr_destroy(&before);
}

static void test_register(void **state)
{
    ExtlockPrState s;

    (void)state;
    extlock_pr_init(&s);
    /* Unregistered with a nonzero RESERVATION KEY: conflict */
    expect_fail(&s, A, EXTLOCK_PR_REGISTER, 0, 0x99, 0xa,
                EXTLOCK_PR_CONFLICT);
    /* Unregistered, SARK 0: GOOD, nothing happens */
    assert_int_equal(out(&s, A, EXTLOCK_PR_REGISTER, 0, 0, 0), EXTLOCK_PR_OK);
    assert_int_equal(s.generation, 0);
    assert_int_equal(s.registrants->len, 0);
    /* Register */
    assert_int_equal(out(&s, A, EXTLOCK_PR_REGISTER, 0, 0, 0xa),
                     EXTLOCK_PR_OK);
    assert_int_equal(s.generation, 1);
    assert_int_equal(key_of(&s, A), 0xa);
    /* Registered: the RESERVATION KEY must match */
    expect_fail(&s, A, EXTLOCK_PR_REGISTER, 0, 0xb, 0xc,
                EXTLOCK_PR_CONFLICT);
    expect_fail(&s, A, EXTLOCK_PR_REGISTER, 0, 0, 0xc, EXTLOCK_PR_CONFLICT);
    /* Change the key */
    assert_int_equal(out(&s, A, EXTLOCK_PR_REGISTER, 0, 0xa, 0xc),
                     EXTLOCK_PR_OK);
    assert_int_equal(s.generation, 2);
    assert_int_equal(key_of(&s, A), 0xc);
    /* Two nexuses may share a key */
    assert_int_equal(out(&s, B, EXTLOCK_PR_REGISTER, 0, 0, 0xc),
                     EXTLOCK_PR_OK);
    assert_int_equal(s.generation, 3);
    /* Unregister */
    assert_int_equal(out(&s, A, EXTLOCK_PR_REGISTER, 0, 0xc, 0),
                     EXTLOCK_PR_OK);
    assert_int_equal(s.generation, 4);
    assert_null(extlock_pr_find(&s, A));
    assert_int_equal(key_of(&s, B), 0xc);
    extlock_pr_destroy(&s);
}

static void test_register_and_ignore(void **state)
{
    ExtlockPrState s;
    ExtlockPrOut req = {
        .action = EXTLOCK_PR_REGISTER_AND_IGNORE, .key = 0x77, .sa_key = 0xa,
        .aptpl = true,
    };

    (void)state;
    extlock_pr_init(&s);
    /* The RESERVATION KEY is ignored, registered or not */
    assert_int_equal(extlock_pr_out(&s, A, &req, NULL), EXTLOCK_PR_OK);
    assert_int_equal(key_of(&s, A), 0xa);
    assert_true(s.aptpl);
    req.sa_key = 0xb;
    req.aptpl = false;
    assert_int_equal(extlock_pr_out(&s, A, &req, NULL), EXTLOCK_PR_OK);
    assert_int_equal(key_of(&s, A), 0xb);
    assert_false(s.aptpl);
    assert_int_equal(s.generation, 2);
    /* SARK 0 unregisters */
    req.sa_key = 0;
    assert_int_equal(extlock_pr_out(&s, A, &req, NULL), EXTLOCK_PR_OK);
    assert_null(extlock_pr_find(&s, A));
    assert_int_equal(s.generation, 3);
    /* and is a no-op when not registered */
    assert_int_equal(extlock_pr_out(&s, A, &req, NULL), EXTLOCK_PR_OK);
    assert_int_equal(s.generation, 3);
    extlock_pr_destroy(&s);
}

static void test_register_resources(void **state)
{
    ExtlockPrState s;
    char name[32];

    (void)state;
    extlock_pr_init(&s);
    for (int i = 0; i < EXTLOCK_PR_MAX_REGISTRANTS; i++) {
        snprintf(name, sizeof(name), "n%d", i);
        assert_int_equal(out(&s, name, EXTLOCK_PR_REGISTER, 0, 0, i + 1),
                         EXTLOCK_PR_OK);
    }
    expect_fail(&s, "one-too-many", EXTLOCK_PR_REGISTER, 0, 0, 1,
                EXTLOCK_PR_NO_RESOURCES);
    /* A registered nexus can still change its key */
    assert_int_equal(out(&s, "n0", EXTLOCK_PR_REGISTER, 0, 1, 5),
                     EXTLOCK_PR_OK);
    extlock_pr_destroy(&s);
}

static void test_reserve(void **state)
{
    ExtlockPrState s;

    (void)state;
    extlock_pr_init(&s);
    /* Unregistered: conflict */
    expect_fail(&s, A, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_WE, 0, 0,
                EXTLOCK_PR_CONFLICT);
    out(&s, A, EXTLOCK_PR_REGISTER, 0, 0, 0xa);
    out(&s, B, EXTLOCK_PR_REGISTER, 0, 0, 0xb);
    /* Wrong key: conflict */
    expect_fail(&s, A, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_WE, 0xb, 0,
                EXTLOCK_PR_CONFLICT);
    /* Bad types: ILLEGAL REQUEST, INVALID FIELD IN CDB */
    for (unsigned t = 0; t < 16; t++) {
        if (!extlock_pr_type_valid(t)) {
            expect_fail(&s, A, EXTLOCK_PR_RESERVE, t, 0xa, 0,
                        EXTLOCK_PR_INVALID_FIELD_CDB);
        }
    }
    assert_int_equal(out(&s, A, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_WE_RO,
                         0xa, 0), EXTLOCK_PR_OK);
    assert_int_equal(s.type, EXTLOCK_PR_TYPE_WE_RO);
    assert_string_equal(s.holder, A);
    assert_int_equal(extlock_pr_reservation_key(&s), 0xa);
    /* RESERVE does not change the generation */
    assert_int_equal(s.generation, 2);
    /* Same type again by the holder: GOOD */
    assert_int_equal(out(&s, A, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_WE_RO,
                         0xa, 0), EXTLOCK_PR_OK);
    /* Another type by the holder: conflict */
    expect_fail(&s, A, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_EA, 0xa, 0,
                EXTLOCK_PR_CONFLICT);
    /* Another nexus, even with the same type: conflict */
    expect_fail(&s, B, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_WE_RO, 0xb, 0,
                EXTLOCK_PR_CONFLICT);
    extlock_pr_destroy(&s);
}

static void test_reserve_all_registrants(void **state)
{
    ExtlockPrState s;

    (void)state;
    extlock_pr_init(&s);
    out(&s, A, EXTLOCK_PR_REGISTER, 0, 0, 0xa);
    out(&s, B, EXTLOCK_PR_REGISTER, 0, 0, 0xb);
    assert_int_equal(out(&s, A, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_WE_AR,
                         0xa, 0), EXTLOCK_PR_OK);
    assert_null(s.holder);
    /* The reservation key of an all-registrants reservation is 0 */
    assert_int_equal(extlock_pr_reservation_key(&s), 0);
    /* Every registrant is a holder */
    assert_int_equal(out(&s, B, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_WE_AR,
                         0xb, 0), EXTLOCK_PR_OK);
    expect_fail(&s, B, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_EA_AR, 0xb, 0,
                EXTLOCK_PR_CONFLICT);
    /* It goes with the last registration, not before */
    out(&s, A, EXTLOCK_PR_REGISTER, 0, 0xa, 0);
    assert_int_equal(s.type, EXTLOCK_PR_TYPE_WE_AR);
    out(&s, B, EXTLOCK_PR_REGISTER, 0, 0xb, 0);
    assert_int_equal(s.type, EXTLOCK_PR_TYPE_NONE);
    extlock_pr_destroy(&s);
}

static void test_release(void **state)
{
    ExtlockPrState s;

    (void)state;
    extlock_pr_init(&s);
    out(&s, A, EXTLOCK_PR_REGISTER, 0, 0, 0xa);
    out(&s, B, EXTLOCK_PR_REGISTER, 0, 0, 0xb);
    /* No reservation: GOOD */
    assert_int_equal(out(&s, A, EXTLOCK_PR_RELEASE, EXTLOCK_PR_TYPE_WE, 0xa,
                         0), EXTLOCK_PR_OK);
    out(&s, A, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_EA, 0xa, 0);
    /* Unregistered or wrong key: conflict */
    expect_fail(&s, C, EXTLOCK_PR_RELEASE, EXTLOCK_PR_TYPE_EA, 0, 0,
                EXTLOCK_PR_CONFLICT);
    expect_fail(&s, A, EXTLOCK_PR_RELEASE, EXTLOCK_PR_TYPE_EA, 0xb, 0,
                EXTLOCK_PR_CONFLICT);
    /* By a registered non-holder: GOOD, and the reservation stays */
    expect_fail(&s, B, EXTLOCK_PR_RELEASE, EXTLOCK_PR_TYPE_EA, 0xb, 0,
                EXTLOCK_PR_OK);
    assert_int_equal(s.type, EXTLOCK_PR_TYPE_EA);
    /* By the holder with the wrong type: INVALID RELEASE */
    expect_fail(&s, A, EXTLOCK_PR_RELEASE, EXTLOCK_PR_TYPE_WE, 0xa, 0,
                EXTLOCK_PR_INVALID_RELEASE);
    /* Right: released, registrations and generation unchanged */
    assert_int_equal(out(&s, A, EXTLOCK_PR_RELEASE, EXTLOCK_PR_TYPE_EA, 0xa,
                         0), EXTLOCK_PR_OK);
    assert_int_equal(s.type, EXTLOCK_PR_TYPE_NONE);
    assert_null(s.holder);
    assert_int_equal(s.registrants->len, 2);
    assert_int_equal(s.generation, 2);
    /* The holder unregistering releases too */
    out(&s, A, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_WE, 0xa, 0);
    out(&s, A, EXTLOCK_PR_REGISTER, 0, 0xa, 0);
    assert_int_equal(s.type, EXTLOCK_PR_TYPE_NONE);
    /* An all-registrants reservation: any registrant releases it */
    out(&s, B, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_EA_AR, 0xb, 0);
    out(&s, C, EXTLOCK_PR_REGISTER, 0, 0, 0xc);
    assert_int_equal(out(&s, C, EXTLOCK_PR_RELEASE, EXTLOCK_PR_TYPE_EA_AR,
                         0xc, 0), EXTLOCK_PR_OK);
    assert_int_equal(s.type, EXTLOCK_PR_TYPE_NONE);
    extlock_pr_destroy(&s);
}

static void test_clear(void **state)
{
    ExtlockPrState s;
    g_autoptr(GPtrArray) gone = g_ptr_array_new_with_free_func(g_free);
    ExtlockPrOut req = { .action = EXTLOCK_PR_CLEAR, .key = 0xb };

    (void)state;
    extlock_pr_init(&s);
    expect_fail(&s, A, EXTLOCK_PR_CLEAR, 0, 0, 0, EXTLOCK_PR_CONFLICT);
    out(&s, A, EXTLOCK_PR_REGISTER, 0, 0, 0xa);
    out(&s, B, EXTLOCK_PR_REGISTER, 0, 0, 0xb);
    out(&s, A, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_EA_RO, 0xa, 0);
    expect_fail(&s, B, EXTLOCK_PR_CLEAR, 0, 0xa, 0, EXTLOCK_PR_CONFLICT);
    expect_fail(&s, C, EXTLOCK_PR_CLEAR, 0, 0, 0, EXTLOCK_PR_CONFLICT);
    /* Any registrant may clear; everything goes */
    assert_int_equal(extlock_pr_out(&s, B, &req, gone), EXTLOCK_PR_OK);
    assert_int_equal(s.registrants->len, 0);
    assert_int_equal(s.type, EXTLOCK_PR_TYPE_NONE);
    assert_int_equal(s.generation, 3);
    assert_int_equal(gone->len, 1);
    assert_string_equal(g_ptr_array_index(gone, 0), A);
    extlock_pr_destroy(&s);
}

static void setup_three(ExtlockPrState *s, ExtlockPrType type)
{
    extlock_pr_init(s);
    out(s, A, EXTLOCK_PR_REGISTER, 0, 0, 0xa);
    out(s, B, EXTLOCK_PR_REGISTER, 0, 0, 0xb);
    out(s, C, EXTLOCK_PR_REGISTER, 0, 0, 0xc);
    if (type) {
        assert_int_equal(out(s, A, EXTLOCK_PR_RESERVE, type, 0xa, 0),
                         EXTLOCK_PR_OK);
    }
}

static void test_preempt(void **state)
{
    for (int abort = 0; abort < 2; abort++) {
        ExtlockPrAction act = abort ? EXTLOCK_PR_PREEMPT_AND_ABORT
                                    : EXTLOCK_PR_PREEMPT;
        ExtlockPrState s;
        g_autoptr(GPtrArray) gone = g_ptr_array_new_with_free_func(g_free);
        ExtlockPrOut req = {
            .action = act, .type = EXTLOCK_PR_TYPE_EA, .key = 0xb,
            .sa_key = 0xa,
        };

        (void)state;
        setup_three(&s, EXTLOCK_PR_TYPE_WE_RO);
        /* Unregistered or wrong key: conflict */
        expect_fail(&s, "hostD", act, EXTLOCK_PR_TYPE_EA, 0, 0xa,
                    EXTLOCK_PR_CONFLICT);
        expect_fail(&s, B, act, EXTLOCK_PR_TYPE_EA, 0xc, 0xa,
                    EXTLOCK_PR_CONFLICT);
        /* Holder's key with a bad type */
        expect_fail(&s, B, act, 2, 0xb, 0xa, EXTLOCK_PR_INVALID_FIELD_CDB);
        /* SARK 0 when it is not the holder's key */
        expect_fail(&s, B, act, EXTLOCK_PR_TYPE_EA, 0xb, 0,
                    EXTLOCK_PR_INVALID_FIELD_PARAM);
        /* A key nobody has: conflict */
        expect_fail(&s, B, act, EXTLOCK_PR_TYPE_EA, 0xb, 0x55,
                    EXTLOCK_PR_CONFLICT);

        /* Preempt a non-holder: only its registration goes */
        assert_int_equal(out(&s, B, act, EXTLOCK_PR_TYPE_EA, 0xb, 0xc),
                         EXTLOCK_PR_OK);
        assert_null(extlock_pr_find(&s, C));
        assert_int_equal(s.type, EXTLOCK_PR_TYPE_WE_RO);
        assert_string_equal(s.holder, A);
        assert_int_equal(s.generation, 4);

        /* Preempt the holder: B holds, with the new type */
        assert_int_equal(extlock_pr_out(&s, B, &req, gone), EXTLOCK_PR_OK);
        assert_null(extlock_pr_find(&s, A));
        assert_int_equal(s.type, EXTLOCK_PR_TYPE_EA);
        assert_string_equal(s.holder, B);
        assert_int_equal(s.generation, 5);
        assert_int_equal(gone->len, 1);
        assert_string_equal(g_ptr_array_index(gone, 0), A);
        /* A is out: everything it does conflicts */
        expect_fail(&s, A, EXTLOCK_PR_RESERVE, EXTLOCK_PR_TYPE_EA, 0xa, 0,
                    EXTLOCK_PR_CONFLICT);
        assert_false(extlock_pr_allows(&s, A, false));
        assert_true(extlock_pr_allows(&s, B, true));
        extlock_pr_destroy(&s);
    }
}

static void test_preempt_no_reservation(void **state)
{
    ExtlockPrState s;

    (void)state;
    setup_three(&s, EXTLOCK_PR_TYPE_NONE);
    out(&s, C, EXTLOCK_PR_REGISTER, 0, 0xc, 0xa);  /* A and C share 0xa */
    expect_fail(&s, B, EXTLOCK_PR_PREEMPT, 0, 0xb, 0,
                EXTLOCK_PR_INVALID_FIELD_PARAM);
    /* The type is not looked at without a reservation */
    assert_int_equal(out(&s, B, EXTLOCK_PR_PREEMPT, 0, 0xb, 0xa),
                     EXTLOCK_PR_OK);
    assert_int_equal(s.registrants->len, 1);
    assert_int_equal(s.type, EXTLOCK_PR_TYPE_NONE);
    extlock_pr_destroy(&s);
}

static void test_preempt_self(void **state)
{
    ExtlockPrState s;

    (void)state;
    /* The holder preempting itself changes the type, keeps registrations */
    setup_three(&s, EXTLOCK_PR_TYPE_WE);
    assert_int_equal(out(&s, A, EXTLOCK_PR_PREEMPT, EXTLOCK_PR_TYPE_EA_RO,
                         0xa, 0xa), EXTLOCK_PR_OK);
    assert_int_equal(s.type, EXTLOCK_PR_TYPE_EA_RO);
    assert_string_equal(s.holder, A);
    assert_int_equal(s.registrants->len, 3);
    extlock_pr_destroy(&s);
}

static void test_preempt_all_registrants(void **state)
{
    ExtlockPrState s;
    g_autoptr(GPtrArray) gone = g_ptr_array_new_with_free_func(g_free);
    ExtlockPrOut req = {
        .action = EXTLOCK_PR_PREEMPT_AND_ABORT, .type = EXTLOCK_PR_TYPE_WE,
        .key = 0xb, .sa_key = 0,
    };

    (void)state;
    /* Nonzero SARK: only those registrations go, the reservation stays */
    setup_three(&s, EXTLOCK_PR_TYPE_WE_AR);
    assert_int_equal(out(&s, B, EXTLOCK_PR_PREEMPT, EXTLOCK_PR_TYPE_WE, 0xb,
                         0xc), EXTLOCK_PR_OK);
    assert_null(extlock_pr_find(&s, C));
    assert_int_equal(s.type, EXTLOCK_PR_TYPE_WE_AR);
    /* SARK 0: everyone else goes, B holds the new reservation */
    assert_int_equal(extlock_pr_out(&s, B, &req, gone), EXTLOCK_PR_OK);
    assert_int_equal(s.registrants->len, 1);
    assert_int_equal(s.type, EXTLOCK_PR_TYPE_WE);
    assert_string_equal(s.holder, B);
    assert_int_equal(gone->len, 1);
    assert_string_equal(g_ptr_array_index(gone, 0), A);
    extlock_pr_destroy(&s);
}

static void test_unsupported(void **state)
{
    ExtlockPrState s;

    (void)state;
    setup_three(&s, EXTLOCK_PR_TYPE_WE);
    expect_fail(&s, A, EXTLOCK_PR_REGISTER_AND_MOVE, EXTLOCK_PR_TYPE_WE, 0xa,
                0xb, EXTLOCK_PR_INVALID_FIELD_CDB);
    expect_fail(&s, A, EXTLOCK_PR_REPLACE_LOST, EXTLOCK_PR_TYPE_WE, 0xa, 0,
                EXTLOCK_PR_INVALID_FIELD_CDB);
    expect_fail(&s, A, 0x1f, EXTLOCK_PR_TYPE_WE, 0xa, 0,
                EXTLOCK_PR_INVALID_FIELD_CDB);
    extlock_pr_destroy(&s);
}

/* SPC-4 table 45 (commands allowed in the presence of reservations) */
static void test_access(void **state)
{
    static const struct {
        ExtlockPrType type;
        /* read, write for: holder, registered non-holder, unregistered */
        bool r[3], w[3];
    } t[] = {
        { EXTLOCK_PR_TYPE_NONE,  { 1, 1, 1 }, { 1, 1, 1 } },
        { EXTLOCK_PR_TYPE_WE,    { 1, 1, 1 }, { 1, 0, 0 } },
        { EXTLOCK_PR_TYPE_EA,    { 1, 0, 0 }, { 1, 0, 0 } },
        { EXTLOCK_PR_TYPE_WE_RO, { 1, 1, 1 }, { 1, 1, 0 } },
        { EXTLOCK_PR_TYPE_EA_RO, { 1, 1, 0 }, { 1, 1, 0 } },
        { EXTLOCK_PR_TYPE_WE_AR, { 1, 1, 1 }, { 1, 1, 0 } },
        { EXTLOCK_PR_TYPE_EA_AR, { 1, 1, 0 }, { 1, 1, 0 } },
    };

    (void)state;
    for (size_t i = 0; i < G_N_ELEMENTS(t); i++) {
        ExtlockPrState s;
        const char *who[3] = { A, B, C };

        setup_three(&s, t[i].type);
        out(&s, C, EXTLOCK_PR_REGISTER, 0, 0xc, 0);     /* C unregistered */
        for (int j = 0; j < 3; j++) {
            assert_int_equal(extlock_pr_allows(&s, who[j], false), t[i].r[j]);
            assert_int_equal(extlock_pr_allows(&s, who[j], true), t[i].w[j]);
        }
        extlock_pr_destroy(&s);
    }
}

static void test_names(void **state)
{
    ExtlockPrType type;
    ExtlockPrAction action;
    ExtlockPrStatus status;

    (void)state;
    for (unsigned t = 0; t < 16; t++) {
        if (extlock_pr_type_valid(t)) {
            assert_true(extlock_pr_type_parse(extlock_pr_type_name(t),
                                              &type));
            assert_int_equal(type, t);
        }
    }
    assert_false(extlock_pr_type_parse("invalid", &type));
    assert_false(extlock_pr_type_parse(NULL, &type));
    for (unsigned a = 0; a <= EXTLOCK_PR_REGISTER_AND_IGNORE; a++) {
        assert_true(extlock_pr_action_parse(extlock_pr_action_name(a),
                                            &action));
        assert_int_equal(action, a);
    }
    assert_false(extlock_pr_action_parse("register-and-move", &action));
    for (unsigned v = 0; v <= EXTLOCK_PR_NO_RESOURCES; v++) {
        assert_true(extlock_pr_status_parse(extlock_pr_status_name(v),
                                            &status));
        assert_int_equal(status, v);
    }
}

/* A PERSISTENT RESERVE IN/OUT CDB (10 bytes) */
static void cdb(uint8_t *c, uint8_t op, uint8_t sa, uint8_t scope_type,
                uint32_t len)
{
    memset(c, 0, 10);
    c[0] = op;
    c[1] = sa;
    c[2] = scope_type;
    extlock_scsi_st32(c + 5, len);
}

static void test_scsi_pr_in_cdb(void **state)
{
    uint8_t c[10];

    for (uint8_t sa = 0; sa < 0x20; sa++) {
        cdb(c, EXTLOCK_SCSI_PR_IN, sa, 0, 100);
        /* READ FULL STATUS (3) and everything else: INVALID FIELD */
        assert_int_equal(extlock_scsi_pr_in_check(c),
                         sa <= 2 ? EXTLOCK_SCSI_PR_CHECK_OK :
                         EXTLOCK_SCSI_PR_CHECK_INVALID_FIELD_CDB);
    }
    /* the upper bits of byte 1 are not the service action */
    cdb(c, EXTLOCK_SCSI_PR_IN, 0xe0 | 1, 0, 100);
    assert_int_equal(extlock_scsi_pr_in_check(c), EXTLOCK_SCSI_PR_CHECK_OK);
}

static void test_scsi_pr_out_cdb(void **state)
{
    uint8_t c[10];

    for (uint8_t sa = 0; sa < 0x20; sa++) {
        cdb(c, EXTLOCK_SCSI_PR_OUT, sa, 0x05, 24);
        /* REGISTER AND MOVE (7), REPLACE LOST RESERVATION (8), others */
        assert_int_equal(extlock_scsi_pr_out_check(c, 24),
                         sa <= 6 ? EXTLOCK_SCSI_PR_CHECK_OK :
                         EXTLOCK_SCSI_PR_CHECK_INVALID_FIELD_CDB);
    }
    /* a scope other than LU_SCOPE where it matters: INVALID FIELD IN CDB */
    for (uint8_t sa = 0; sa <= 6; sa++) {
        bool ignored = sa == EXTLOCK_SCSI_PR_OUT_REGISTER ||
                       sa == EXTLOCK_SCSI_PR_OUT_REGISTER_AND_IGNORE ||
                       sa == EXTLOCK_SCSI_PR_OUT_CLEAR;

        cdb(c, EXTLOCK_SCSI_PR_OUT, sa, 0x25, 24);    /* ELEMENT_SCOPE */
        assert_int_equal(extlock_scsi_pr_out_check(c, 24),
                         ignored ? EXTLOCK_SCSI_PR_CHECK_OK :
                         EXTLOCK_SCSI_PR_CHECK_INVALID_FIELD_CDB);
    }
    /* PARAMETER LIST LENGTH other than 24: PARAMETER LIST LENGTH ERROR */
    {
        static const uint32_t lens[] = { 0, 8, 23, 25, 32, 4096 };

        for (size_t i = 0; i < G_N_ELEMENTS(lens); i++) {
            cdb(c, EXTLOCK_SCSI_PR_OUT, EXTLOCK_SCSI_PR_OUT_REGISTER, 0,
                lens[i]);
            assert_int_equal(extlock_scsi_pr_out_check(c, lens[i]),
                             EXTLOCK_SCSI_PR_CHECK_PARAM_LIST_LENGTH);
        }
    }
    /* a bad service action is reported before a bad length */
    cdb(c, EXTLOCK_SCSI_PR_OUT, 7, 0, 30);
    assert_int_equal(extlock_scsi_pr_out_check(c, 30),
                     EXTLOCK_SCSI_PR_CHECK_INVALID_FIELD_CDB);
}

static void test_scsi_pr_out_param(void **state)
{
    uint8_t c[10], p[24];
    ExtlockScsiPrOut o;

    memset(p, 0, sizeof(p));
    extlock_scsi_st64(p, 0x0123456789abcdefULL);
    extlock_scsi_st64(p + 8, 0xfedcba9876543210ULL);
    p[20] = 0x01;                                   /* APTPL */
    cdb(c, EXTLOCK_SCSI_PR_OUT, EXTLOCK_SCSI_PR_OUT_PREEMPT_AND_ABORT, 0x06,
        24);
    assert_int_equal(extlock_scsi_pr_out_decode(c, p, &o),
                     EXTLOCK_SCSI_PR_CHECK_OK);
    assert_int_equal(o.service_action, EXTLOCK_SCSI_PR_OUT_PREEMPT_AND_ABORT);
    assert_int_equal(o.type, 6);
    assert_int_equal(o.key, 0x0123456789abcdefULL);
    assert_int_equal(o.sa_key, 0xfedcba9876543210ULL);
    assert_true(o.aptpl);
    /* SPEC_I_PT, ALL_TG_PT: INVALID FIELD IN PARAMETER LIST */
    p[20] = 0x08;
    assert_int_equal(extlock_scsi_pr_out_decode(c, p, &o),
                     EXTLOCK_SCSI_PR_CHECK_INVALID_FIELD_PARAM);
    p[20] = 0x04;
    assert_int_equal(extlock_scsi_pr_out_decode(c, p, &o),
                     EXTLOCK_SCSI_PR_CHECK_INVALID_FIELD_PARAM);
}

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3];
}

/*
 * READ KEYS: ADDITIONAL LENGTH is the length of all keys, whatever the
 * buffer and the ALLOCATION LENGTH let through (SPC-4 6.15.2).  Before the
 * fix it counted only the keys returned, at most 64.
 */
static void test_scsi_pr_read_keys(void **state)
{
    uint64_t keys[100];
    uint8_t buf[8 + 8 * 64];
    uint32_t len;

    for (int i = 0; i < 100; i++) {
        keys[i] = 0x1000 + i;
    }
    /* three keys, room for all */
    len = extlock_scsi_pr_read_keys(buf, sizeof(buf), 1000, 7, keys, 3, 3);
    assert_int_equal(len, 32);
    assert_int_equal(be32(buf), 7);
    assert_int_equal(be32(buf + 4), 24);
    assert_int_equal(extlock_scsi_ld64(buf + 8), 0x1000);
    assert_int_equal(extlock_scsi_ld64(buf + 24), 0x1002);
    /* ALLOCATION LENGTH 8: the header only, with the true length */
    len = extlock_scsi_pr_read_keys(buf, sizeof(buf), 8, 7, keys, 3, 3);
    assert_int_equal(len, 8);
    assert_int_equal(be32(buf + 4), 24);
    /* ... 20: truncated in the middle of a key */
    len = extlock_scsi_pr_read_keys(buf, sizeof(buf), 20, 7, keys, 3, 3);
    assert_int_equal(len, 20);
    /* 100 keys registered, 64 fit: all 800 bytes announced */
    len = extlock_scsi_pr_read_keys(buf, sizeof(buf), 0xffff, 9, keys, 64,
                                    100);
    assert_int_equal(len, 8 + 8 * 64);
    assert_int_equal(be32(buf + 4), 800);
    assert_int_equal(extlock_scsi_ld64(buf + 8 + 8 * 63), 0x1000 + 63);
    /* no keys */
    len = extlock_scsi_pr_read_keys(buf, sizeof(buf), 0xffff, 1, keys, 0, 0);
    assert_int_equal(len, 8);
    assert_int_equal(be32(buf + 4), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_register),
        cmocka_unit_test(test_register_and_ignore),
        cmocka_unit_test(test_register_resources),
        cmocka_unit_test(test_reserve),
        cmocka_unit_test(test_reserve_all_registrants),
        cmocka_unit_test(test_release),
        cmocka_unit_test(test_clear),
        cmocka_unit_test(test_preempt),
        cmocka_unit_test(test_preempt_no_reservation),
        cmocka_unit_test(test_preempt_self),
        cmocka_unit_test(test_preempt_all_registrants),
        cmocka_unit_test(test_unsupported),
        cmocka_unit_test(test_access),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_scsi_pr_in_cdb),
        cmocka_unit_test(test_scsi_pr_out_cdb),
        cmocka_unit_test(test_scsi_pr_out_param),
        cmocka_unit_test(test_scsi_pr_read_keys),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
