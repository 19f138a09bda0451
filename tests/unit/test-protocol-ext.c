/*
 * extlock: unit tests for the protocol extensions (caching, revocation,
 * recovery) in the wire codec
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Messages are built as structs, formatted, parsed back and compared field
 * by field; canonical lines survive parse + format unchanged; the fast
 * scanner and json-c agree on "limit"; and malformed extension members
 * are refused with the right error code, keeping the id when it is
 * readable.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>
#include <glib.h>
#include "extlock/protocol.h"

#define SESSION_ID "00112233445566778899aabbccddeeff"
#define T(epoch, counter) (((uint64_t)(epoch) << 40) | (counter))

static void parse_ok(const char *line, ExtlockMsg *msg)
{
    ExtlockProtoError err;

    if (!extlock_msg_parse(line, strlen(line), msg, &err)) {
        fail_msg("parse of %s failed: %s: %s", line,
                 extlock_error_code_name(err.code), err.message);
    }
}

static char *format_msg(const ExtlockMsg *msg)
{
    GString *out = g_string_new(NULL);

    extlock_msg_format(msg, out);
    return g_string_free(out, false);
}

/* Format @msg, parse the line back into @back (without the '\n') */
static char *reparse(const ExtlockMsg *msg, ExtlockMsg *back)
{
    char *line = format_msg(msg);
    size_t len = strlen(line);

    assert_true(len > 0 && line[len - 1] == '\n');
    line[len - 1] = '\0';
    parse_ok(line, back);
    return line;
}

/*
 * Canonical lines of the extensions, each formatted back exactly
 */
static const char *const canonical[] = {
    "{\"type\":\"lock\",\"id\":1,\"offset\":4096,\"length\":512,"
    "\"mode\":\"shared\",\"wait\":true,\"limit\":{\"offset\":4096,"
    "\"length\":512}}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":9223372036854775806,"
    "\"length\":1,\"mode\":\"exclusive\",\"wait\":false,\"limit\":{"
    "\"offset\":0,\"length\":9223372036854775807}}",
    "{\"type\":\"revoke\",\"lock\":9223372036854775807,\"offset\":0,"
    "\"length\":9223372036854775808,\"mode\":\"exclusive\","
    "\"token\":9223372036854775807}",
    "{\"type\":\"downgrade\",\"id\":9223372036854775807,\"lock\":0}",
    "{\"type\":\"downgraded\",\"id\":3,\"lock\":5,\"mode\":\"exclusive\"}",
    "{\"type\":\"reclaim\",\"id\":4,\"offset\":9223372036854775807,"
    "\"length\":1,\"mode\":\"exclusive\",\"token\":1099511627777}",
    "{\"type\":\"reclaim-done\",\"id\":0}",
    "{\"type\":\"reclaim-complete\",\"id\":9223372036854775807}",
    "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
    SESSION_ID "\",\"lease-ms\":100,\"epoch\":0,\"resumed\":true,"
    "\"locks\":[{\"lock\":1,\"offset\":0,\"length\":1,\"mode\":\"shared\","
    "\"token\":1}]}",
    "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
    SESSION_ID "\",\"lease-ms\":3600000,\"epoch\":8388607,"
    "\"server\":\"x\",\"reclaim\":true,"
    "\"grace-remaining-ms\":9223372036854775807}",
    "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
    SESSION_ID "\",\"lease-ms\":500,\"epoch\":2,\"grace-remaining-ms\":1}",
    "{\"type\":\"error\",\"id\":7,\"code\":\"in-grace\","
    "\"message\":\"wait\"}",
    /* fencing */
    "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
    SESSION_ID "\",\"lease-ms\":500,\"epoch\":2,\"fence-margin-ms\":0}",
    "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
    SESSION_ID "\",\"lease-ms\":500,\"epoch\":2,\"server\":\"x\","
    "\"reclaim\":true,\"grace-remaining-ms\":9,"
    "\"fence-margin-ms\":4294967295}",
    "{\"type\":\"fence-status\",\"lock-space\":\"d\",\"client-id\":\"B\","
    "\"result\":\"started\"}",
    "{\"type\":\"fence-status\",\"lock-space\":\"d\",\"client-id\":\"B\","
    "\"session-client\":\"B\",\"session\":\"" SESSION_ID "\","
    "\"result\":\"succeeded\",\"message\":\"ok\"}",
    "{\"type\":\"release-session\",\"id\":3,\"session\":\"" SESSION_ID
    "\",\"message\":\"host B is powered off\"}",
    "{\"type\":\"session-released\",\"id\":3,\"session\":\"" SESSION_ID
    "\",\"released\":0}",
};

static void test_canonical(void **state)
{
    for (size_t i = 0; i < G_N_ELEMENTS(canonical); i++) {
        g_autofree char *expect = g_strconcat(canonical[i], "\n", NULL);
        g_autofree char *got = NULL;
        ExtlockMsg msg;

        parse_ok(canonical[i], &msg);
        got = format_msg(&msg);
        assert_string_equal(got, expect);
        extlock_msg_clear(&msg);
    }
}

/* lock with "limit": struct -> line -> struct */
static void test_lock_limit(void **state)
{
    ExtlockMsg m, b;
    g_autofree char *line = NULL;

    extlock_msg_init(&m, EXTLOCK_MSG_LOCK);
    m.has_id = true;
    m.id = 42;
    m.offset = 1 << 20;
    m.length = 4096;
    m.mode = EXTLOCK_MODE_EXCLUSIVE;
    m.has_limit = true;
    m.limit_offset = 0;
    m.limit_length = UINT64_C(1) << 30;
    line = reparse(&m, &b);
    assert_int_equal(b.type, EXTLOCK_MSG_LOCK);
    assert_true(b.has_id);
    assert_int_equal(b.id, 42);
    assert_true(b.has_extent);
    assert_int_equal(b.offset, 1 << 20);
    assert_int_equal(b.length, 4096);
    assert_int_equal(b.mode, EXTLOCK_MODE_EXCLUSIVE);
    assert_true(b.wait);
    assert_true(b.has_limit);
    assert_int_equal(b.limit_offset, 0);
    assert_int_equal(b.limit_length, UINT64_C(1) << 30);
    extlock_msg_clear(&b);

    /* Without a limit, none is reported */
    m.has_limit = false;
    g_free(line);
    line = reparse(&m, &b);
    assert_null(strstr(line, "limit"));
    assert_false(b.has_limit);
    extlock_msg_clear(&b);

    /* The limit may be exactly the request, and reach 2^63 */
    m.has_limit = true;
    m.offset = (UINT64_C(1) << 63) - 4096;
    m.limit_offset = m.offset;
    m.limit_length = 4096;
    g_free(line);
    line = reparse(&m, &b);
    assert_int_equal(b.limit_offset, m.offset);
    assert_int_equal(b.limit_length, 4096);
    extlock_msg_clear(&b);
}

static void test_revoke(void **state)
{
    ExtlockMsg m, b;
    g_autofree char *line = NULL;

    extlock_msg_init(&m, EXTLOCK_MSG_REVOKE);
    m.has_id = true;            /* notifications never carry one */
    m.id = 99;
    m.lock = 17;
    m.offset = 8192;
    m.length = 512;
    m.mode = EXTLOCK_MODE_SHARED;
    m.token = T(3, 12345);
    line = reparse(&m, &b);
    assert_null(strstr(line, "\"id\""));
    assert_int_equal(b.type, EXTLOCK_MSG_REVOKE);
    assert_false(b.has_id);
    assert_int_equal(b.lock, 17);
    assert_true(b.has_extent);
    assert_int_equal(b.offset, 8192);
    assert_int_equal(b.length, 512);
    assert_int_equal(b.mode, EXTLOCK_MODE_SHARED);
    assert_int_equal(b.token, T(3, 12345));
    extlock_msg_clear(&b);
}

static void test_downgrade(void **state)
{
    ExtlockMsg m, b;
    g_autofree char *l1 = NULL, *l2 = NULL;

    extlock_msg_init(&m, EXTLOCK_MSG_DOWNGRADE);
    m.has_id = true;
    m.id = 5;
    m.lock = 77;
    l1 = reparse(&m, &b);
    assert_string_equal(l1, "{\"type\":\"downgrade\",\"id\":5,\"lock\":77}");
    assert_int_equal(b.type, EXTLOCK_MSG_DOWNGRADE);
    assert_int_equal(b.id, 5);
    assert_int_equal(b.lock, 77);
    extlock_msg_clear(&b);

    extlock_msg_init(&m, EXTLOCK_MSG_DOWNGRADED);
    m.has_id = true;
    m.id = 5;
    m.lock = 77;
    m.mode = EXTLOCK_MODE_SHARED;
    l2 = reparse(&m, &b);
    assert_int_equal(b.type, EXTLOCK_MSG_DOWNGRADED);
    assert_int_equal(b.id, 5);
    assert_int_equal(b.lock, 77);
    assert_int_equal(b.mode, EXTLOCK_MODE_SHARED);
    extlock_msg_clear(&b);
}

static void test_reclaim(void **state)
{
    ExtlockMsg m, b;
    g_autofree char *line = NULL;

    extlock_msg_init(&m, EXTLOCK_MSG_RECLAIM);
    m.has_id = true;
    m.id = 6;
    m.offset = 0;
    m.length = UINT64_C(1) << 63;
    m.mode = EXTLOCK_MODE_EXCLUSIVE;
    m.token = T(7, 1);
    line = reparse(&m, &b);
    assert_int_equal(b.type, EXTLOCK_MSG_RECLAIM);
    assert_int_equal(b.id, 6);
    assert_true(b.has_extent);
    assert_int_equal(b.offset, 0);
    assert_int_equal(b.length, UINT64_C(1) << 63);
    assert_int_equal(b.mode, EXTLOCK_MODE_EXCLUSIVE);
    assert_int_equal(b.token, T(7, 1));
    extlock_msg_clear(&b);

    /* The reply is an ordinary "granted" with the old token */
    parse_ok("{\"type\":\"granted\",\"id\":6,\"lock\":1,\"token\":"
             "7696581394433,\"offset\":0,\"length\":4096,"
             "\"mode\":\"exclusive\"}", &b);
    assert_int_equal(b.type, EXTLOCK_MSG_GRANTED);
    assert_int_equal(b.token, T(7, 1));
    extlock_msg_clear(&b);

    extlock_msg_init(&m, EXTLOCK_MSG_RECLAIM_DONE);
    m.has_id = true;
    m.id = 8;
    g_free(line);
    line = reparse(&m, &b);
    assert_string_equal(line, "{\"type\":\"reclaim-done\",\"id\":8}");
    assert_int_equal(b.type, EXTLOCK_MSG_RECLAIM_DONE);
    assert_int_equal(b.id, 8);
    extlock_msg_clear(&b);

    extlock_msg_init(&m, EXTLOCK_MSG_RECLAIM_COMPLETE);
    m.has_id = true;
    m.id = 8;
    g_free(line);
    line = reparse(&m, &b);
    assert_string_equal(line, "{\"type\":\"reclaim-complete\",\"id\":8}");
    assert_int_equal(b.type, EXTLOCK_MSG_RECLAIM_COMPLETE);
    extlock_msg_clear(&b);
}

/* welcome: resumed with locks, reclaim with grace, neither */
static void test_welcome(void **state)
{
    static const ExtlockHeldLock held[] = {
        { 3, 0, 4096, EXTLOCK_MODE_SHARED, T(2, 5) },
        { 9, 1 << 20, 1 << 20, EXTLOCK_MODE_EXCLUSIVE, T(2, 6) },
        { 10, (UINT64_C(1) << 63) - 1, 1, EXTLOCK_MODE_SHARED, T(2, 6) },
    };
    ExtlockMsg m, b;
    g_autofree char *line = NULL;

    extlock_msg_init(&m, EXTLOCK_MSG_WELCOME);
    m.has_id = true;
    m.id = 1;
    m.session = (char *)SESSION_ID;
    m.lease_ms = 10000;
    m.epoch = 2;
    m.server = (char *)"extlockd 0.1.0";
    m.resumed = true;
    m.locks = g_array_new(false, false, sizeof(ExtlockHeldLock));
    g_array_append_vals(m.locks, held, G_N_ELEMENTS(held));
    line = reparse(&m, &b);
    g_array_free(m.locks, true);
    assert_int_equal(b.type, EXTLOCK_MSG_WELCOME);
    assert_string_equal(b.session, SESSION_ID);
    assert_true(b.resumed);
    assert_false(b.reclaim);
    assert_int_equal(b.grace_remaining_ms, 0);
    assert_non_null(b.locks);
    assert_int_equal(b.locks->len, G_N_ELEMENTS(held));
    for (guint i = 0; i < b.locks->len; i++) {
        ExtlockHeldLock *l = &g_array_index(b.locks, ExtlockHeldLock, i);

        assert_int_equal(l->lock, held[i].lock);
        assert_int_equal(l->offset, held[i].offset);
        assert_int_equal(l->length, held[i].length);
        assert_int_equal(l->mode, held[i].mode);
        assert_int_equal(l->token, held[i].token);
    }
    /* Clearing frees the locks and resets everything */
    extlock_msg_clear(&b);
    assert_null(b.locks);
    assert_null(b.session);
    assert_false(b.resumed);
    extlock_msg_clear(&b);

    extlock_msg_init(&m, EXTLOCK_MSG_WELCOME);
    m.has_id = true;
    m.id = 1;
    m.session = (char *)SESSION_ID;
    m.lease_ms = 10000;
    m.epoch = 3;
    m.reclaim = true;
    m.grace_remaining_ms = 10999;
    g_free(line);
    line = reparse(&m, &b);
    assert_null(strstr(line, "locks"));
    assert_null(strstr(line, "resumed"));
    assert_true(b.reclaim);
    assert_false(b.resumed);
    assert_int_equal(b.grace_remaining_ms, 10999);
    assert_null(b.locks);
    extlock_msg_clear(&b);

    /* A plain welcome: none of the members */
    m.reclaim = false;
    m.grace_remaining_ms = 0;
    g_free(line);
    line = reparse(&m, &b);
    assert_null(strstr(line, "reclaim"));
    assert_null(strstr(line, "grace"));
    assert_false(b.reclaim);
    assert_false(b.resumed);
    extlock_msg_clear(&b);

    /* Explicit false is the same as absent */
    parse_ok("{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
             SESSION_ID "\",\"lease-ms\":100,\"epoch\":1,"
             "\"resumed\":false,\"reclaim\":false,"
             "\"grace-remaining-ms\":0}", &b);
    assert_false(b.resumed);
    assert_false(b.reclaim);
    assert_int_equal(b.grace_remaining_ms, 0);
    extlock_msg_clear(&b);
}

/*
 * The fast scanner and json-c must agree on "limit": each line is parsed
 * as is (fast path when it can) and with the type written with a JSON
 * escape, which only json-c accepts.
 */
typedef struct LimitCase {
    const char *members;        /* after "mode":"shared", */
    ExtlockErrorCode code;      /* EXTLOCK_ERR_NONE: must parse */
} LimitCase;

static const LimitCase limit_cases[] = {
    { "\"limit\":{\"offset\":0,\"length\":8192}", EXTLOCK_ERR_NONE },
    { "\"limit\":{\"length\":8192,\"offset\":0}", EXTLOCK_ERR_NONE },
    { "\"limit\" : { \"offset\" : 4096 , \"length\" : 4096 }",
      EXTLOCK_ERR_NONE },
    { "\"limit\":{\"offset\":0,\"length\":9223372036854775808}",
      EXTLOCK_ERR_NONE },
    { "\"limit\":{\"offset\":0,\"length\":8192,\"x\":1}", EXTLOCK_ERR_NONE },
    { "\"limit\":{\"offset\":4097,\"length\":8192}", EXTLOCK_ERR_RANGE },
    { "\"limit\":{\"offset\":0,\"length\":8191}", EXTLOCK_ERR_RANGE },
    { "\"limit\":{\"offset\":0,\"length\":0}", EXTLOCK_ERR_RANGE },
    { "\"limit\":{\"offset\":-1,\"length\":8192}", EXTLOCK_ERR_RANGE },
    { "\"limit\":{\"offset\":1,\"length\":9223372036854775808}",
      EXTLOCK_ERR_RANGE },
    { "\"limit\":{\"offset\":0,\"length\":99999999999999999999}",
      EXTLOCK_ERR_RANGE },
    { "\"limit\":{\"offset\":0}", EXTLOCK_ERR_INVALID },
    { "\"limit\":{\"length\":8192}", EXTLOCK_ERR_INVALID },
    { "\"limit\":{}", EXTLOCK_ERR_INVALID },
    { "\"limit\":[0,8192]", EXTLOCK_ERR_INVALID },
    { "\"limit\":{\"offset\":\"0\",\"length\":8192}", EXTLOCK_ERR_INVALID },
    { "\"limit\":{\"offset\":0,\"length\":8192.0}", EXTLOCK_ERR_INVALID },
};

static void check_limit_line(const char *type, const LimitCase *lc,
                             ExtlockMsg *out)
{
    g_autofree char *line = g_strdup_printf(
        "{\"type\":\"%s\",\"id\":3,\"offset\":4096,\"length\":4096,"
        "\"mode\":\"shared\",%s}", type, lc->members);
    ExtlockProtoError err;
    bool ok = extlock_msg_parse(line, strlen(line), out, &err);

    if (lc->code == EXTLOCK_ERR_NONE) {
        if (!ok) {
            fail_msg("%s: %s", line, err.message);
        }
        assert_int_equal(out->type, EXTLOCK_MSG_LOCK);
        assert_true(out->has_limit);
        assert_true(out->limit_offset <= out->offset);
        assert_true(out->offset + out->length <=
                    out->limit_offset + out->limit_length);
    } else {
        if (ok) {
            fail_msg("%s was accepted", line);
        }
        if (err.code != lc->code) {
            fail_msg("%s: %s instead of %s (%s)", line,
                     extlock_error_code_name(err.code),
                     extlock_error_code_name(lc->code), err.message);
        }
        /* The error reply can carry the id */
        assert_true(out->has_id);
        assert_int_equal(out->id, 3);
        assert_false(out->has_limit);
    }
}

static void test_limit_paths_agree(void **state)
{
    ExtlockMsg m;

    for (size_t i = 0; i < G_N_ELEMENTS(limit_cases); i++) {
        ExtlockMsg fast, slow;

        check_limit_line("lock", &limit_cases[i], &fast);
        check_limit_line("lo\\u0063k", &limit_cases[i], &slow);
        assert_int_equal(fast.has_limit, slow.has_limit);
        assert_int_equal(fast.limit_offset, slow.limit_offset);
        assert_int_equal(fast.limit_length, slow.limit_length);
        assert_int_equal(fast.offset, slow.offset);
        assert_int_equal(fast.length, slow.length);
        assert_int_equal(fast.mode, slow.mode);
        extlock_msg_clear(&fast);
        extlock_msg_clear(&slow);
    }

    /* null is the same as absent, as for every optional member */
    parse_ok("{\"type\":\"lock\",\"id\":3,\"offset\":0,\"length\":1,"
             "\"mode\":\"shared\",\"limit\":null}", &m);
    assert_false(m.has_limit);
    extlock_msg_clear(&m);
}

/* Malformed extension messages */
typedef struct BadCase {
    const char *line;
    ExtlockErrorCode code;
    bool has_id;
} BadCase;

static const BadCase bad_cases[] = {
    /* revoke */
    { "{\"type\":\"revoke\",\"offset\":0,\"length\":1,\"mode\":\"shared\","
      "\"token\":1}", EXTLOCK_ERR_INVALID, false },
    { "{\"type\":\"revoke\",\"lock\":1,\"offset\":0,\"length\":1,"
      "\"mode\":\"shared\"}", EXTLOCK_ERR_INVALID, false },
    { "{\"type\":\"revoke\",\"lock\":1,\"offset\":0,\"length\":1,"
      "\"token\":1}", EXTLOCK_ERR_INVALID, false },
    { "{\"type\":\"revoke\",\"lock\":1,\"offset\":0,\"length\":1,"
      "\"mode\":\"read\",\"token\":1}", EXTLOCK_ERR_INVALID, false },
    { "{\"type\":\"revoke\",\"lock\":1,\"offset\":0,\"length\":0,"
      "\"mode\":\"shared\",\"token\":1}", EXTLOCK_ERR_RANGE, false },
    { "{\"type\":\"revoke\",\"lock\":1,\"offset\":0,\"length\":1,"
      "\"mode\":\"shared\",\"token\":-1}", EXTLOCK_ERR_INVALID, false },
    { "{\"type\":\"revoke\",\"lock\":1,\"length\":1,"
      "\"mode\":\"shared\",\"token\":1}", EXTLOCK_ERR_INVALID, false },
    /* downgrade / downgraded */
    { "{\"type\":\"downgrade\",\"id\":4}", EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"downgrade\",\"id\":4,\"lock\":-3}", EXTLOCK_ERR_INVALID,
      true },
    { "{\"type\":\"downgrade\",\"id\":4,\"lock\":\"3\"}",
      EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"downgrade\",\"id\":4,\"lock\":9223372036854775808}",
      EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"downgrade\",\"lock\":3}", EXTLOCK_ERR_INVALID, false },
    { "{\"type\":\"downgraded\",\"id\":4,\"lock\":3}", EXTLOCK_ERR_INVALID,
      true },
    { "{\"type\":\"downgraded\",\"id\":4,\"mode\":\"shared\"}",
      EXTLOCK_ERR_INVALID, true },
    /* reclaim */
    { "{\"type\":\"reclaim\",\"id\":5,\"offset\":0,\"length\":1,"
      "\"mode\":\"shared\"}", EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"reclaim\",\"id\":5,\"offset\":0,\"length\":1,"
      "\"mode\":\"shared\",\"token\":9223372036854775808}",
      EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"reclaim\",\"id\":5,\"offset\":0,\"length\":1,"
      "\"mode\":\"shared\",\"token\":1.5}", EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"reclaim\",\"id\":5,\"offset\":0,\"length\":0,"
      "\"mode\":\"shared\",\"token\":1}", EXTLOCK_ERR_RANGE, true },
    { "{\"type\":\"reclaim\",\"id\":5,\"offset\":9223372036854775807,"
      "\"length\":2,\"mode\":\"shared\",\"token\":1}", EXTLOCK_ERR_RANGE,
      true },
    { "{\"type\":\"reclaim\",\"id\":5,\"length\":1,\"mode\":\"shared\","
      "\"token\":1}", EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"reclaim\",\"id\":5,\"offset\":0,\"length\":1,"
      "\"mode\":true,\"token\":1}", EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"reclaim\",\"offset\":0,\"length\":1,"
      "\"mode\":\"shared\",\"token\":1}", EXTLOCK_ERR_INVALID, false },
    /* reclaim-done / reclaim-complete need an id */
    { "{\"type\":\"reclaim-done\"}", EXTLOCK_ERR_INVALID, false },
    { "{\"type\":\"reclaim-done\",\"id\":-1}", EXTLOCK_ERR_INVALID, false },
    { "{\"type\":\"reclaim-complete\"}", EXTLOCK_ERR_INVALID, false },
    /* welcome extension members */
    { "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
      SESSION_ID "\",\"lease-ms\":100,\"epoch\":1,\"resumed\":1}",
      EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
      SESSION_ID "\",\"lease-ms\":100,\"epoch\":1,\"reclaim\":\"yes\"}",
      EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
      SESSION_ID "\",\"lease-ms\":100,\"epoch\":1,"
      "\"grace-remaining-ms\":-5}", EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
      SESSION_ID "\",\"lease-ms\":100,\"epoch\":1,"
      "\"grace-remaining-ms\":\"5\"}", EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
      SESSION_ID "\",\"lease-ms\":100,\"epoch\":1,\"locks\":{}}",
      EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
      SESSION_ID "\",\"lease-ms\":100,\"epoch\":1,\"locks\":[1]}",
      EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
      SESSION_ID "\",\"lease-ms\":100,\"epoch\":1,\"locks\":[{\"lock\":1,"
      "\"offset\":0,\"length\":1,\"mode\":\"shared\"}]}",
      EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
      SESSION_ID "\",\"lease-ms\":100,\"epoch\":1,\"locks\":[{\"lock\":1,"
      "\"offset\":0,\"length\":1,\"mode\":\"shared\",\"token\":1},"
      "{\"lock\":2,\"offset\":0,\"length\":0,\"mode\":\"shared\","
      "\"token\":1}]}", EXTLOCK_ERR_RANGE, true },
    { "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
      SESSION_ID "\",\"lease-ms\":100,\"epoch\":1,\"locks\":[{"
      "\"offset\":0,\"length\":1,\"mode\":\"shared\",\"token\":1}]}",
      EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
      SESSION_ID "\",\"lease-ms\":100,\"epoch\":1,\"locks\":[{\"lock\":1,"
      "\"offset\":0,\"length\":1,\"mode\":\"both\",\"token\":1}]}",
      EXTLOCK_ERR_INVALID, true },
    /* fencing */
    { "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
      SESSION_ID "\",\"lease-ms\":100,\"epoch\":1,"
      "\"fence-margin-ms\":-1}", EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
      SESSION_ID "\",\"lease-ms\":100,\"epoch\":1,"
      "\"fence-margin-ms\":4294967296}", EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
      SESSION_ID "\",\"lease-ms\":100,\"epoch\":1,"
      "\"fence-margin-ms\":\"1000\"}", EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"fence-status\",\"lock-space\":\"d\",\"client-id\":\"B\","
      "\"result\":\"ok\"}", EXTLOCK_ERR_INVALID, false },
    { "{\"type\":\"fence-status\",\"lock-space\":\"d\",\"client-id\":\"B\"}",
      EXTLOCK_ERR_INVALID, false },
    { "{\"type\":\"fence-status\",\"client-id\":\"B\","
      "\"result\":\"failed\"}", EXTLOCK_ERR_INVALID, false },
    { "{\"type\":\"fence-status\",\"lock-space\":\"d\","
      "\"result\":\"failed\"}", EXTLOCK_ERR_INVALID, false },
    { "{\"type\":\"fence-status\",\"lock-space\":\"d\",\"client-id\":\"B\","
      "\"result\":1}", EXTLOCK_ERR_INVALID, false },
    { "{\"type\":\"release-session\",\"id\":1}", EXTLOCK_ERR_INVALID,
      true },
    { "{\"type\":\"release-session\",\"session\":\"" SESSION_ID "\"}",
      EXTLOCK_ERR_INVALID, false },
    { "{\"type\":\"release-session\",\"id\":1,\"session\":\"\"}",
      EXTLOCK_ERR_INVALID, true },
    { "{\"type\":\"session-released\",\"id\":1,\"session\":\""
      SESSION_ID "\"}", EXTLOCK_ERR_INVALID, true },
};

/* welcome with and without the fence margin; fence-status fields */
static void test_fence_messages(void **state)
{
    g_autofree char *line = NULL;
    ExtlockMsg m, b;

    parse_ok("{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
             SESSION_ID "\",\"lease-ms\":100,\"epoch\":1}", &m);
    assert_false(m.has_fence_margin);
    assert_int_equal(m.fence_margin_ms, 0);
    extlock_msg_clear(&m);

    extlock_msg_init(&m, EXTLOCK_MSG_FENCE_STATUS);
    m.has_id = true;            /* a notification: never carries one */
    m.id = 5;
    m.lock_space = (char *)"disk";
    m.client_id = (char *)"hostB";
    m.session_client = (char *)"hostB";
    m.fence_result = EXTLOCK_FENCE_FAILED;
    m.message = (char *)"timed out\n";
    line = reparse(&m, &b);
    assert_null(strstr(line, "\"id\""));
    assert_int_equal(b.type, EXTLOCK_MSG_FENCE_STATUS);
    assert_false(b.has_id);
    assert_string_equal(b.lock_space, "disk");
    assert_string_equal(b.client_id, "hostB");
    assert_string_equal(b.session_client, "hostB");
    assert_null(b.session);
    assert_int_equal(b.fence_result, EXTLOCK_FENCE_FAILED);
    assert_string_equal(b.message, "timed out\n");
    extlock_msg_clear(&b);

    for (int i = 0; i < EXTLOCK_FENCE__MAX; i++) {
        g_autofree char *text = g_strdup_printf(
            "{\"type\":\"fence-status\",\"lock-space\":\"d\","
            "\"client-id\":\"B\",\"result\":\"%s\"}",
            extlock_fence_result_name(i));

        parse_ok(text, &b);
        assert_int_equal(b.fence_result, i);
        assert_null(b.session_client);
        extlock_msg_clear(&b);
    }
    assert_string_equal(extlock_fence_result_name(EXTLOCK_FENCE__MAX),
                        "failed");
    parse_ok("{\"type\":\"session-released\",\"id\":2,\"session\":\""
             SESSION_ID "\",\"released\":9223372036854775807}", &b);
    assert_int_equal(b.released, INT64_MAX);
    extlock_msg_clear(&b);
}

static void test_bad_input(void **state)
{
    for (size_t i = 0; i < G_N_ELEMENTS(bad_cases); i++) {
        const BadCase *bc = &bad_cases[i];
        ExtlockProtoError err;
        ExtlockMsg m;

        if (extlock_msg_parse(bc->line, strlen(bc->line), &m, &err)) {
            fail_msg("accepted: %s", bc->line);
        }
        if (err.code != bc->code) {
            fail_msg("%s: %s instead of %s (%s)", bc->line,
                     extlock_error_code_name(err.code),
                     extlock_error_code_name(bc->code), err.message);
        }
        assert_true(err.message[0] != '\0');
        assert_int_equal(m.has_id, bc->has_id);
        /* Nothing is left to free, and clearing is harmless */
        assert_null(m.locks);
        assert_null(m.session);
        extlock_msg_clear(&m);
    }
}

/*
 * Unknown members in the extension messages are ignored (forward
 * compatibility), and the error code of the grace period has its name.
 */
static void test_forward_compat(void **state)
{
    ExtlockMsg m;

    parse_ok("{\"type\":\"revoke\",\"lock\":1,\"offset\":0,\"length\":1,"
             "\"mode\":\"shared\",\"token\":1,\"reason\":{\"x\":[1]}}", &m);
    assert_int_equal(m.type, EXTLOCK_MSG_REVOKE);
    extlock_msg_clear(&m);
    parse_ok("{\"type\":\"reclaim-done\",\"id\":2,\"count\":3}", &m);
    assert_int_equal(m.type, EXTLOCK_MSG_RECLAIM_DONE);
    extlock_msg_clear(&m);
    parse_ok("{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\""
             SESSION_ID "\",\"lease-ms\":100,\"epoch\":1,\"locks\":[{"
             "\"lock\":1,\"offset\":0,\"length\":1,\"mode\":\"shared\","
             "\"token\":1,\"requested-offset\":0}]}", &m);
    assert_int_equal(m.locks->len, 1);
    extlock_msg_clear(&m);

    assert_string_equal(extlock_error_code_name(EXTLOCK_ERR_GRACE),
                        "in-grace");
    assert_int_equal(extlock_error_code_from_name("in-grace"),
                     EXTLOCK_ERR_GRACE);
    assert_string_equal(extlock_msg_type_name(EXTLOCK_MSG_RECLAIM_DONE),
                        "reclaim-done");
    assert_string_equal(extlock_msg_type_name(EXTLOCK_MSG_DOWNGRADED),
                        "downgraded");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_canonical),
        cmocka_unit_test(test_lock_limit),
        cmocka_unit_test(test_revoke),
        cmocka_unit_test(test_downgrade),
        cmocka_unit_test(test_reclaim),
        cmocka_unit_test(test_welcome),
        cmocka_unit_test(test_limit_paths_agree),
        cmocka_unit_test(test_fence_messages),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_forward_compat),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
