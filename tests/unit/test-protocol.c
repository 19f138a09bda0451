/*
 * extlock: unit tests for the wire protocol codec and the line buffer
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>
#include <errno.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <gio/gio.h>
#include <json-c/json.h>
#include "extlock/client-sync.h"
#include "extlock/protocol.h"

/* Parse @line (a C string) and expect success */
static void parse_ok(const char *line, ExtlockMsg *msg)
{
    ExtlockProtoError err;
    bool ok = extlock_msg_parse(line, strlen(line), msg, &err);

    if (!ok) {
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

/*
 * format(parse(x)) == x for canonical lines of every message type
 */
static const char *const canonical[] = {
    /* version 2: resume secret and identity */
    "{\"type\":\"hello\",\"id\":1,\"version\":2,\"client-id\":\"hostA/disk0\","
    "\"lock-space\":\"cluster-disk\","
    "\"session\":\"0123456789abcdef0123456789abcdef\",\"resume-secret\":"
    "\"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\"}",
    "{\"type\":\"welcome\",\"id\":1,\"version\":2,"
    "\"session\":\"0123456789abcdef0123456789abcdef\",\"lease-ms\":10000,"
    "\"epoch\":3,\"server\":\"extlockd 0.2.0\",\"resume-secret\":"
    "\"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\","
    "\"identity\":\"x509:host-a\"}",
    "{\"type\":\"hello\",\"id\":1,\"version\":1,\"client-id\":\"hostA/disk0\","
    "\"lock-space\":\"cluster-disk\"}",
    "{\"type\":\"hello\",\"id\":1,\"version\":1,\"client-id\":\"hostA/disk0\","
    "\"lock-space\":\"cluster-disk\",\"lease-ms\":10000,"
    "\"session\":\"0123456789abcdef0123456789abcdef\"}",
    "{\"type\":\"welcome\",\"id\":1,\"version\":1,"
    "\"session\":\"0123456789abcdef0123456789abcdef\",\"lease-ms\":10000,"
    "\"epoch\":3,\"server\":\"extlockd 0.1.0\"}",
    "{\"type\":\"welcome\",\"id\":1,\"version\":1,"
    "\"session\":\"0123456789abcdef0123456789abcdef\",\"lease-ms\":10000,"
    "\"epoch\":3,\"server\":\"extlockd 0.1.0\",\"locks\":[{\"lock\":17,"
    "\"offset\":0,\"length\":4096,\"mode\":\"shared\","
    "\"token\":3298534883329},{\"lock\":18,\"offset\":8192,\"length\":1,"
    "\"mode\":\"exclusive\",\"token\":3298534883330}]}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":0,\"length\":65536,"
    "\"mode\":\"exclusive\",\"wait\":true}",
    "{\"type\":\"lock\",\"id\":3,\"offset\":4096,\"length\":4096,"
    "\"mode\":\"exclusive\",\"wait\":true,\"limit\":{\"offset\":0,"
    "\"length\":33554432}}",
    "{\"type\":\"lock\",\"id\":3,\"offset\":0,\"length\":1,"
    "\"mode\":\"shared\",\"wait\":true,\"limit\":{\"offset\":0,"
    "\"length\":9223372036854775808}}",
    "{\"type\":\"downgrade\",\"id\":10,\"lock\":17}",
    "{\"type\":\"downgraded\",\"id\":10,\"lock\":17,\"mode\":\"shared\"}",
    "{\"type\":\"reclaim-done\",\"id\":11}",
    "{\"type\":\"reclaim-complete\",\"id\":11}",
    "{\"type\":\"welcome\",\"id\":1,\"version\":1,"
    "\"session\":\"0123456789abcdef0123456789abcdef\",\"lease-ms\":10000,"
    "\"epoch\":4,\"server\":\"extlockd 0.1.0\",\"reclaim\":true,"
    "\"grace-remaining-ms\":10500}",
    "{\"type\":\"welcome\",\"id\":1,\"version\":1,"
    "\"session\":\"0123456789abcdef0123456789abcdef\",\"lease-ms\":10000,"
    "\"epoch\":3,\"resumed\":true,\"locks\":[]}",
    "{\"type\":\"lock\",\"id\":9223372036854775807,"
    "\"offset\":9223372036854775806,\"length\":1,\"mode\":\"shared\","
    "\"wait\":false}",
    "{\"type\":\"waiting\",\"id\":2,\"token\":3298534883331,\"blockers\":[]}",
    "{\"type\":\"waiting\",\"id\":2,\"token\":3298534883331,\"blockers\":["
    "{\"client-id\":\"hostB/d0\",\"offset\":0,\"length\":4096,"
    "\"mode\":\"shared\",\"token\":3298534883300,\"waiting\":false},"
    "{\"client-id\":\"hostC/d0\",\"offset\":4096,\"length\":4096,"
    "\"mode\":\"exclusive\",\"token\":3298534883310,\"waiting\":true}]}",
    "{\"type\":\"granted\",\"id\":2,\"lock\":17,\"token\":3298534883331,"
    "\"offset\":0,\"length\":65536,\"mode\":\"exclusive\"}",
    "{\"type\":\"unlock\",\"id\":3,\"lock\":17}",
    "{\"type\":\"unlock\",\"id\":3,\"lock\":17,\"offset\":4096,"
    "\"length\":4096}",
    "{\"type\":\"unlock\",\"id\":3,\"lock\":17,"
    "\"maint-size\":1073741824}",
    "{\"type\":\"granted\",\"id\":2,\"lock\":17,\"token\":3298534883331,"
    "\"offset\":0,\"length\":9223372036854775808,\"mode\":\"exclusive\","
    "\"maint-gen\":3,\"maint-size\":1073741824}",
    "{\"type\":\"renewed\",\"id\":5,\"lease-ms\":1000,\"maint-gen\":7}",
    "{\"type\":\"unlocked\",\"id\":3,\"lock\":17,\"pieces\":[]}",
    "{\"type\":\"unlocked\",\"id\":3,\"lock\":17,\"pieces\":[{\"lock\":17,"
    "\"offset\":0,\"length\":4096},{\"lock\":18,\"offset\":8192,"
    "\"length\":57344}]}",
    "{\"type\":\"cancel\",\"id\":4,\"request\":2}",
    "{\"type\":\"cancelled\",\"id\":4,\"request\":2}",
    "{\"type\":\"renew\",\"id\":5}",
    "{\"type\":\"renewed\",\"id\":5,\"lease-ms\":10000}",
    "{\"type\":\"bye\",\"id\":6}",
    "{\"type\":\"goodbye\",\"id\":6}",
    "{\"type\":\"status\",\"id\":7}",
    "{\"type\":\"status-reply\",\"id\":7,\"status\":{\"server\":"
    "\"extlockd 0.1.0\",\"epoch\":3,\"counters\":{\"connections\":2},"
    "\"lock-spaces\":[{\"name\":\"d\",\"held\":[],\"waiting\":[]}],"
    "\"sessions\":[]}}",
    "{\"type\":\"error\",\"id\":2,\"code\":\"invalid-range\","
    "\"message\":\"offset + length exceeds 2^63\"}",
    "{\"type\":\"error\",\"code\":\"parse-error\",\"message\":\"bad\"}",
    "{\"type\":\"error\",\"id\":8,\"code\":\"cancelled\"}",
    "{\"type\":\"session-expired\","
    "\"session\":\"0123456789abcdef0123456789abcdef\","
    "\"message\":\"lease expired\"}",
    "{\"type\":\"revoke\",\"lock\":17,\"offset\":0,\"length\":4096,"
    "\"mode\":\"shared\",\"token\":3298534883340}",
    "{\"type\":\"reclaim\",\"id\":9,\"offset\":0,\"length\":4096,"
    "\"mode\":\"shared\",\"token\":3298534883329}",
    "{\"type\":\"release-session\",\"id\":12,"
    "\"session\":\"0123456789abcdef0123456789abcdef\"}",
    "{\"type\":\"session-released\",\"id\":12,"
    "\"session\":\"0123456789abcdef0123456789abcdef\",\"released\":3}",
    "{\"type\":\"fence-status\",\"lock-space\":\"d\","
    "\"client-id\":\"hostB/d0\",\"session-client\":\"hostB/d0\","
    "\"session\":\"0123456789abcdef0123456789abcdef\","
    "\"result\":\"failed\",\"message\":\"agent exited with status 1\"}",
    /* persistent reservations */
    "{\"type\":\"pr-out\",\"id\":13,\"action\":\"preempt-and-abort\","
    "\"pr-type\":5,\"key\":\"a\",\"sa-key\":\"fedcba9876543210\","
    "\"aptpl\":false}",
    "{\"type\":\"pr-result\",\"id\":13,\"result\":\"reservation-conflict\","
    "\"generation\":4,\"seq\":7}",
    "{\"type\":\"pr-in\",\"id\":14}",
    "{\"type\":\"pr-status\",\"id\":14,\"seq\":7,\"generation\":4,"
    "\"pr-type\":5,\"holder\":\"hostA/d0\",\"aptpl\":true,"
    "\"registrants\":[{\"client-id\":\"hostA/d0\",\"key\":\"a\"},"
    "{\"client-id\":\"hostB/d0\",\"key\":\"ffffffffffffffff\"}]}",
    "{\"type\":\"pr-update\",\"seq\":0,\"generation\":0,\"pr-type\":0,"
    "\"aptpl\":false,\"registrants\":[]}",
    "{\"type\":\"pr-update\",\"seq\":9,\"generation\":2,\"pr-type\":8,"
    "\"aptpl\":false,\"registrants\":[{\"client-id\":\"x\","
    "\"key\":\"1\"}]}",
    "{\"type\":\"pr-ack\",\"id\":15,\"seq\":7}",
    "{\"type\":\"pr-acked\",\"id\":15,\"seq\":7}",
};

static void test_roundtrip_all_types(void **state)
{
    bool seen[EXTLOCK_MSG__MAX] = { false };
    size_t i;
    int t;

    for (i = 0; i < G_N_ELEMENTS(canonical); i++) {
        ExtlockMsg msg;
        g_autofree char *expect = g_strconcat(canonical[i], "\n", NULL);
        g_autofree char *got = NULL;

        parse_ok(canonical[i], &msg);
        seen[msg.type] = true;
        got = format_msg(&msg);
        assert_string_equal(got, expect);
        extlock_msg_clear(&msg);
        assert_int_equal(msg.type, EXTLOCK_MSG_INVALID);
    }
    for (t = EXTLOCK_MSG_INVALID + 1; t < EXTLOCK_MSG__MAX; t++) {
        if (!seen[t]) {
            fail_msg("no round-trip case for \"%s\"",
                     extlock_msg_type_name(t));
        }
    }
}

/* format then parse gives the same fields, for messages built in code */
static void test_format_parse_fields(void **state)
{
    ExtlockMsg in, out;
    ExtlockBlocker b = { .client_id = g_strdup("h\"x\\y"), .offset = 5,
                         .length = 6, .mode = EXTLOCK_MODE_EXCLUSIVE,
                         .token = 77, .waiting = true };
    ExtlockPiece p = { .lock = 3, .offset = 1, .length = 2 };
    g_autofree char *s = NULL;

    extlock_msg_init(&in, EXTLOCK_MSG_WAITING);
    in.id = 42;
    in.token = (UINT64_C(7) << 40) | 9;
    in.blockers = g_array_new(false, false, sizeof(ExtlockBlocker));
    g_array_append_val(in.blockers, b);
    s = format_msg(&in);
    assert_true(g_str_has_suffix(s, "}\n"));
    parse_ok(s, &out);
    assert_int_equal(out.type, EXTLOCK_MSG_WAITING);
    assert_true(out.has_id);
    assert_int_equal(out.id, 42);
    assert_int_equal(out.token, (UINT64_C(7) << 40) | 9);
    assert_non_null(out.blockers);
    assert_int_equal(out.blockers->len, 1);
    {
        ExtlockBlocker *ob = &g_array_index(out.blockers, ExtlockBlocker, 0);
        assert_string_equal(ob->client_id, "h\"x\\y");
        assert_int_equal(ob->offset, 5);
        assert_int_equal(ob->length, 6);
        assert_int_equal(ob->mode, EXTLOCK_MODE_EXCLUSIVE);
        assert_int_equal(ob->token, 77);
        assert_true(ob->waiting);
    }
    extlock_msg_clear(&in);
    extlock_msg_clear(&out);
    g_free(s);

    extlock_msg_init(&in, EXTLOCK_MSG_UNLOCKED);
    in.id = 1;
    in.lock = 3;
    /* NULL pieces are formatted as an empty list */
    s = format_msg(&in);
    assert_string_equal(s, "{\"type\":\"unlocked\",\"id\":1,\"lock\":3,"
                        "\"pieces\":[]}\n");
    g_free(s);
    in.pieces = g_array_new(false, false, sizeof(ExtlockPiece));
    g_array_append_val(in.pieces, p);
    s = format_msg(&in);
    parse_ok(s, &out);
    assert_int_equal(out.pieces->len, 1);
    assert_int_equal(g_array_index(out.pieces, ExtlockPiece, 0).lock, 3);
    assert_int_equal(g_array_index(out.pieces, ExtlockPiece, 0).offset, 1);
    assert_int_equal(g_array_index(out.pieces, ExtlockPiece, 0).length, 2);
    extlock_msg_clear(&in);
    extlock_msg_clear(&out);
}

static void test_parse_fields(void **state)
{
    ExtlockMsg msg;
    json_object *v;

    /* hello: unknown members ignored, optional ones absent */
    parse_ok("{\"id\":1,\"type\":\"hello\",\"version\":1,\"future\":[1,{}],"
             "\"client-id\":\"a\",\"lock-space\":\"b\"}", &msg);
    assert_int_equal(msg.type, EXTLOCK_MSG_HELLO);
    assert_int_equal(msg.version, 1);
    assert_string_equal(msg.client_id, "a");
    assert_string_equal(msg.lock_space, "b");
    assert_null(msg.session);
    assert_int_equal(msg.lease_ms, 0);
    extlock_msg_clear(&msg);

    /* lease-ms boundaries */
    parse_ok("{\"type\":\"hello\",\"id\":1,\"version\":1,\"client-id\":\"a\","
             "\"lock-space\":\"b\",\"lease-ms\":100}", &msg);
    assert_int_equal(msg.lease_ms, 100);
    extlock_msg_clear(&msg);
    parse_ok("{\"type\":\"hello\",\"id\":1,\"version\":1,\"client-id\":\"a\","
             "\"lock-space\":\"b\",\"lease-ms\":3600000}", &msg);
    assert_int_equal(msg.lease_ms, 3600000);
    extlock_msg_clear(&msg);
    parse_ok("{\"type\":\"hello\",\"id\":1,\"version\":1,\"client-id\":\"a\","
             "\"lock-space\":\"b\",\"lease-ms\":0}", &msg);
    assert_int_equal(msg.lease_ms, 0);
    extlock_msg_clear(&msg);

    /* lock: wait defaults to true; whitespace and CR around are fine */
    parse_ok(" { \"type\" : \"lock\", \"id\" : 2, \"offset\" : 0, "
             "\"length\" : 9223372036854775808, \"mode\" : \"shared\" } \r",
             &msg);
    assert_int_equal(msg.type, EXTLOCK_MSG_LOCK);
    assert_true(msg.wait);
    assert_true(msg.has_extent);
    assert_int_equal(msg.offset, 0);
    assert_int_equal(msg.length, UINT64_C(1) << 63);
    assert_int_equal(msg.mode, EXTLOCK_MODE_SHARED);
    extlock_msg_clear(&msg);

    /* offset + length == 2^63 exactly is allowed */
    parse_ok("{\"type\":\"lock\",\"id\":2,\"offset\":9223372036854775807,"
             "\"length\":1,\"mode\":\"exclusive\",\"wait\":false}", &msg);
    assert_int_equal(msg.offset, INT64_MAX);
    assert_int_equal(msg.mode, EXTLOCK_MODE_EXCLUSIVE);
    assert_false(msg.wait);
    extlock_msg_clear(&msg);

    /* "-0" is the integer 0 */
    parse_ok("{\"type\":\"lock\",\"id\":-0,\"offset\":-0,\"length\":1,"
             "\"mode\":\"shared\"}", &msg);
    assert_true(msg.has_id);
    assert_int_equal(msg.id, 0);
    assert_int_equal(msg.offset, 0);
    extlock_msg_clear(&msg);

    /* lock with a growth limit */
    parse_ok("{\"type\":\"lock\",\"id\":2,\"offset\":4096,\"length\":4096,"
             "\"mode\":\"exclusive\",\"limit\":{\"offset\":0,"
             "\"length\":1048576}}", &msg);
    assert_true(msg.has_limit);
    assert_int_equal(msg.limit_offset, 0);
    assert_int_equal(msg.limit_length, 1048576);
    extlock_msg_clear(&msg);
    assert_false(msg.has_limit);
    parse_ok("{\"type\":\"lock\",\"id\":2,\"offset\":4096,\"length\":4096,"
             "\"mode\":\"exclusive\"}", &msg);
    assert_false(msg.has_limit);
    extlock_msg_clear(&msg);

    /* welcome after a restart: reclaim during grace */
    parse_ok("{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\"s\","
             "\"lease-ms\":500,\"epoch\":2,\"reclaim\":true,"
             "\"grace-remaining-ms\":700}", &msg);
    assert_true(msg.reclaim);
    assert_false(msg.resumed);
    assert_int_equal(msg.grace_remaining_ms, 700);
    assert_null(msg.locks);
    extlock_msg_clear(&msg);

    /* revoke carries the token of the waiting request */
    parse_ok("{\"type\":\"revoke\",\"lock\":4,\"offset\":0,\"length\":8,"
             "\"mode\":\"shared\",\"token\":77}", &msg);
    assert_false(msg.has_id);
    assert_int_equal(msg.lock, 4);
    assert_int_equal(msg.token, 77);
    assert_int_equal(msg.mode, EXTLOCK_MODE_SHARED);
    extlock_msg_clear(&msg);

    /* unlock without and with an extent */
    parse_ok("{\"type\":\"unlock\",\"id\":3,\"lock\":17}", &msg);
    assert_int_equal(msg.lock, 17);
    assert_false(msg.has_extent);
    extlock_msg_clear(&msg);
    parse_ok("{\"type\":\"unlock\",\"id\":3,\"lock\":17,\"offset\":1,"
             "\"length\":2}", &msg);
    assert_true(msg.has_extent);
    assert_int_equal(msg.offset, 1);
    assert_int_equal(msg.length, 2);
    assert_false(msg.has_maint_size);
    extlock_msg_clear(&msg);

    /* a maintenance's unlock announces the image length */
    parse_ok("{\"type\":\"unlock\",\"id\":3,\"lock\":17,"
             "\"maint-size\":0}", &msg);
    assert_true(msg.has_maint_size);
    assert_int_equal(msg.maint_size, 0);
    extlock_msg_clear(&msg);

    /* status-reply keeps the status object */
    parse_ok("{\"type\":\"status-reply\",\"id\":7,\"status\":{\"epoch\":5,"
             "\"sessions\":[{\"client-id\":\"x\"}]}}", &msg);
    assert_non_null(msg.body);
    assert_true(json_object_object_get_ex(msg.body, "epoch", &v));
    assert_int_equal(json_object_get_int64(v), 5);
    extlock_msg_clear(&msg);
    assert_null(msg.body);

    /* error: every code name maps back; an unknown code is internal */
    parse_ok("{\"type\":\"error\",\"id\":3,\"code\":\"would-block\"}", &msg);
    assert_int_equal(msg.error, EXTLOCK_ERR_WOULD_BLOCK);
    assert_null(msg.message);
    extlock_msg_clear(&msg);
    parse_ok("{\"type\":\"error\",\"code\":\"from-the-future\","
             "\"message\":\"m\"}", &msg);
    assert_false(msg.has_id);
    assert_int_equal(msg.error, EXTLOCK_ERR_INTERNAL);
    assert_string_equal(msg.message, "m");
    extlock_msg_clear(&msg);

    /* welcome with resumed locks */
    parse_ok("{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\"s\","
             "\"lease-ms\":500,\"epoch\":2,\"locks\":[{\"lock\":4,"
             "\"offset\":8,\"length\":16,\"mode\":\"exclusive\","
             "\"token\":99}]}", &msg);
    assert_int_equal(msg.epoch, 2);
    assert_null(msg.server);
    assert_int_equal(msg.locks->len, 1);
    assert_int_equal(g_array_index(msg.locks, ExtlockLockInfo, 0).lock, 4);
    assert_int_equal(g_array_index(msg.locks, ExtlockLockInfo, 0).offset, 8);
    assert_int_equal(g_array_index(msg.locks, ExtlockLockInfo, 0).length, 16);
    assert_int_equal(g_array_index(msg.locks, ExtlockLockInfo, 0).mode,
                     EXTLOCK_MODE_EXCLUSIVE);
    assert_int_equal(g_array_index(msg.locks, ExtlockLockInfo, 0).token, 99);
    extlock_msg_clear(&msg);

    /* the line need not be NUL-terminated */
    {
        const char buf[] = "{\"type\":\"renew\",\"id\":5}GARBAGE";
        ExtlockProtoError err;

        assert_true(extlock_msg_parse(buf, strlen(buf) - 7, &msg, &err));
        assert_int_equal(msg.type, EXTLOCK_MSG_RENEW);
        assert_int_equal(msg.id, 5);
        extlock_msg_clear(&msg);
    }
}

/*
 * Bad input: each class gets its own error code
 */
typedef struct BadCase {
    const char *line;
    ExtlockErrorCode code;
    bool has_id;
    uint64_t id;
} BadCase;

#define LOCK_PFX "{\"type\":\"lock\",\"id\":5,"
#define HELLO_PFX "{\"type\":\"hello\",\"id\":1,\"version\":1,"

static const BadCase bad_cases[] = {
    /* persistent reservations: bad keys, actions, types, states */
    { "{\"type\":\"pr-out\",\"id\":1,\"action\":\"register-and-move\"}",
      EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"pr-out\",\"id\":1}", EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"pr-out\",\"id\":1,\"action\":\"reserve\","
      "\"key\":\"AB\"}", EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"pr-out\",\"id\":1,\"action\":\"reserve\","
      "\"key\":\"\"}", EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"pr-out\",\"id\":1,\"action\":\"reserve\","
      "\"key\":\"10000000000000000\"}", EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"pr-out\",\"id\":1,\"action\":\"reserve\","
      "\"key\":12}", EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"pr-out\",\"id\":1,\"action\":\"reserve\","
      "\"pr-type\":16}", EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"pr-out\",\"id\":1,\"action\":\"register\","
      "\"aptpl\":1}", EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"pr-ack\",\"id\":1}", EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"pr-result\",\"id\":1,\"result\":\"bad\","
      "\"generation\":1,\"seq\":1}", EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"pr-status\",\"id\":1,\"seq\":1,\"generation\":1,"
      "\"pr-type\":2,\"registrants\":[]}", EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"pr-status\",\"id\":1,\"seq\":1,\"generation\":1,"
      "\"pr-type\":1,\"registrants\":[]}", EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"pr-status\",\"id\":1,\"seq\":1,\"generation\":1,"
      "\"pr-type\":7,\"holder\":\"a\",\"registrants\":[]}",
      EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"pr-status\",\"id\":1,\"seq\":1,\"generation\":1,"
      "\"registrants\":[{\"client-id\":\"a\",\"key\":\"1\"},"
      "{\"client-id\":\"a\",\"key\":\"2\"}]}", EXTLOCK_ERR_INVALID,
      true, 1 },
    { "{\"type\":\"pr-status\",\"id\":1,\"seq\":1,\"generation\":1,"
      "\"registrants\":[{\"client-id\":\"a\",\"key\":\"0\"}]}",
      EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"pr-status\",\"id\":1,\"seq\":1,\"generation\":1}",
      EXTLOCK_ERR_INVALID, true, 1 },
    /* resume-secret: 64 lowercase hex digits */
    { "{\"type\":\"hello\",\"id\":1,\"version\":2,\"client-id\":\"a\","
      "\"lock-space\":\"s\",\"session\":\"0123456789abcdef0123456789abcdef\","
      "\"resume-secret\":\"0011\"}", EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"hello\",\"id\":1,\"version\":2,\"client-id\":\"a\","
      "\"lock-space\":\"s\",\"resume-secret\":"
      "\"00112233445566778899AABBCCDDEEFF00112233445566778899aabbccddeeff\"}",
      EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"hello\",\"id\":1,\"version\":2,\"client-id\":\"a\","
      "\"lock-space\":\"s\",\"resume-secret\":7}", EXTLOCK_ERR_INVALID,
      true, 1 },
    /* parse-error */
    { "", EXTLOCK_ERR_PARSE },
    { "   ", EXTLOCK_ERR_PARSE },
    { "{", EXTLOCK_ERR_PARSE },
    { "{\"type\":\"renew\",\"id\":5", EXTLOCK_ERR_PARSE },
    { "not json", EXTLOCK_ERR_PARSE },
    { "{\"type\":\"renew\",\"id\":5,}", EXTLOCK_ERR_PARSE },
    { "{\"type\":\"renew\",\"id\":05}", EXTLOCK_ERR_PARSE },
    { "/* c */{\"type\":\"renew\",\"id\":5}", EXTLOCK_ERR_PARSE },
    { "[{\"type\":\"renew\",\"id\":5}]", EXTLOCK_ERR_PARSE },
    { "[]", EXTLOCK_ERR_PARSE },
    { "\"renew\"", EXTLOCK_ERR_PARSE },
    { "42", EXTLOCK_ERR_PARSE },
    { "null", EXTLOCK_ERR_PARSE },
    { "true", EXTLOCK_ERR_PARSE },
    { "{\"type\":\"renew\",\"id\":5} x", EXTLOCK_ERR_PARSE },
    { "{\"type\":\"renew\",\"id\":5}{}", EXTLOCK_ERR_PARSE },
    { "{\"type\":\"renew\",\"id\":5}}", EXTLOCK_ERR_PARSE },
    { "{\"type\":\"renew\",\"id\":5,\"x\":\"\xff\"}", EXTLOCK_ERR_PARSE },
    { "{\"type\":\"renew\",\"id\":5,\"x\":tRue}", EXTLOCK_ERR_PARSE },
    /* type */
    { "{}", EXTLOCK_ERR_INVALID },
    { "{\"id\":3}", EXTLOCK_ERR_INVALID, true, 3 },
    { "{\"type\":7,\"id\":3}", EXTLOCK_ERR_INVALID, true, 3 },
    { "{\"type\":null,\"id\":3}", EXTLOCK_ERR_INVALID, true, 3 },
    { "{\"type\":[\"lock\"],\"id\":3}", EXTLOCK_ERR_INVALID, true, 3 },
    { "{\"type\":\"frobnicate\",\"id\":3}", EXTLOCK_ERR_UNKNOWN_TYPE,
      true, 3 },
    { "{\"type\":\"\",\"id\":3}", EXTLOCK_ERR_UNKNOWN_TYPE, true, 3 },
    { "{\"type\":\"LOCK\",\"id\":3}", EXTLOCK_ERR_UNKNOWN_TYPE, true, 3 },
    { "{\"type\":\"frobnicate\"}", EXTLOCK_ERR_UNKNOWN_TYPE },
    /* id */
    { "{\"type\":\"renew\"}", EXTLOCK_ERR_INVALID },
    { "{\"type\":\"renew\",\"id\":-1}", EXTLOCK_ERR_INVALID },
    { "{\"type\":\"renew\",\"id\":1.0}", EXTLOCK_ERR_INVALID },
    { "{\"type\":\"renew\",\"id\":1e3}", EXTLOCK_ERR_INVALID },
    { "{\"type\":\"renew\",\"id\":\"1\"}", EXTLOCK_ERR_INVALID },
    { "{\"type\":\"renew\",\"id\":true}", EXTLOCK_ERR_INVALID },
    { "{\"type\":\"renew\",\"id\":null}", EXTLOCK_ERR_INVALID },
    { "{\"type\":\"renew\",\"id\":9223372036854775808}", EXTLOCK_ERR_INVALID },
    { "{\"type\":\"renew\",\"id\":18446744073709551615}",
      EXTLOCK_ERR_INVALID },
    { "{\"type\":\"renew\",\"id\":18446744073709551616}",
      EXTLOCK_ERR_INVALID },
    { "{\"type\":\"renew\",\"id\":-9223372036854775809}",
      EXTLOCK_ERR_INVALID },
    { "{\"type\":\"error\",\"id\":-4,\"code\":\"cancelled\"}",
      EXTLOCK_ERR_INVALID },
    /* offset / length */
    { LOCK_PFX "\"length\":1,\"mode\":\"shared\"}", EXTLOCK_ERR_INVALID,
      true, 5 },
    { LOCK_PFX "\"offset\":0,\"mode\":\"shared\"}", EXTLOCK_ERR_INVALID,
      true, 5 },
    { LOCK_PFX "\"offset\":-1,\"length\":1,\"mode\":\"shared\"}",
      EXTLOCK_ERR_RANGE, true, 5 },
    { LOCK_PFX "\"offset\":0,\"length\":0,\"mode\":\"shared\"}",
      EXTLOCK_ERR_RANGE, true, 5 },
    { LOCK_PFX "\"offset\":0,\"length\":-4096,\"mode\":\"shared\"}",
      EXTLOCK_ERR_RANGE, true, 5 },
    { LOCK_PFX "\"offset\":1,\"length\":9223372036854775807,"
      "\"mode\":\"shared\"}", EXTLOCK_ERR_NONE, true, 5 },
    { LOCK_PFX "\"offset\":9223372036854775807,\"length\":2,"
      "\"mode\":\"shared\"}", EXTLOCK_ERR_RANGE, true, 5 },
    { LOCK_PFX "\"offset\":1,\"length\":9223372036854775808,"
      "\"mode\":\"shared\"}", EXTLOCK_ERR_RANGE, true, 5 },
    { LOCK_PFX "\"offset\":0,\"length\":9223372036854775809,"
      "\"mode\":\"shared\"}", EXTLOCK_ERR_RANGE, true, 5 },
    { LOCK_PFX "\"offset\":9223372036854775808,\"length\":1,"
      "\"mode\":\"shared\"}", EXTLOCK_ERR_RANGE, true, 5 },
    { LOCK_PFX "\"offset\":18446744073709551615,\"length\":1,"
      "\"mode\":\"shared\"}", EXTLOCK_ERR_RANGE, true, 5 },
    { LOCK_PFX "\"offset\":18446744073709551616,\"length\":1,"
      "\"mode\":\"shared\"}", EXTLOCK_ERR_RANGE, true, 5 },
    { LOCK_PFX "\"offset\":0,\"length\":18446744073709551616,"
      "\"mode\":\"shared\"}", EXTLOCK_ERR_RANGE, true, 5 },
    { LOCK_PFX "\"offset\":0,\"length\":"
      "100000000000000000000000000000000000000000,"
      "\"mode\":\"shared\"}", EXTLOCK_ERR_RANGE, true, 5 },
    { LOCK_PFX "\"offset\":18446744073709551615,"
      "\"length\":18446744073709551615,\"mode\":\"shared\"}",
      EXTLOCK_ERR_RANGE, true, 5 },
    { LOCK_PFX "\"offset\":1e999,\"length\":1,\"mode\":\"shared\"}",
      EXTLOCK_ERR_INVALID, true, 5 },
    { LOCK_PFX "\"offset\":0,\"length\":1E400,\"mode\":\"shared\"}",
      EXTLOCK_ERR_INVALID, true, 5 },
    { LOCK_PFX "\"offset\":0,\"length\":4e3,\"mode\":\"shared\"}",
      EXTLOCK_ERR_INVALID, true, 5 },
    { LOCK_PFX "\"offset\":0.5,\"length\":1,\"mode\":\"shared\"}",
      EXTLOCK_ERR_INVALID, true, 5 },
    { LOCK_PFX "\"offset\":\"0\",\"length\":1,\"mode\":\"shared\"}",
      EXTLOCK_ERR_INVALID, true, 5 },
    { LOCK_PFX "\"offset\":0,\"length\":true,\"mode\":\"shared\"}",
      EXTLOCK_ERR_INVALID, true, 5 },
    { LOCK_PFX "\"offset\":0,\"length\":null,\"mode\":\"shared\"}",
      EXTLOCK_ERR_INVALID, true, 5 },
    /* mode, wait */
    { LOCK_PFX "\"offset\":0,\"length\":1}", EXTLOCK_ERR_INVALID, true, 5 },
    { LOCK_PFX "\"offset\":0,\"length\":1,\"mode\":\"write\"}",
      EXTLOCK_ERR_INVALID, true, 5 },
    { LOCK_PFX "\"offset\":0,\"length\":1,\"mode\":\"Shared\"}",
      EXTLOCK_ERR_INVALID, true, 5 },
    { LOCK_PFX "\"offset\":0,\"length\":1,\"mode\":1}",
      EXTLOCK_ERR_INVALID, true, 5 },
    { LOCK_PFX "\"offset\":0,\"length\":1,\"mode\":\"shared\","
      "\"wait\":1}", EXTLOCK_ERR_INVALID, true, 5 },
    { LOCK_PFX "\"offset\":0,\"length\":1,\"mode\":\"shared\","
      "\"wait\":\"true\"}", EXTLOCK_ERR_INVALID, true, 5 },
    /* lock "limit" */
    { LOCK_PFX "\"offset\":4096,\"length\":4096,\"mode\":\"shared\","
      "\"limit\":4}", EXTLOCK_ERR_INVALID, true, 5 },
    { LOCK_PFX "\"offset\":4096,\"length\":4096,\"mode\":\"shared\","
      "\"limit\":{}}", EXTLOCK_ERR_INVALID, true, 5 },
    { LOCK_PFX "\"offset\":4096,\"length\":4096,\"mode\":\"shared\","
      "\"limit\":{\"offset\":0}}", EXTLOCK_ERR_INVALID, true, 5 },
    { LOCK_PFX "\"offset\":4096,\"length\":4096,\"mode\":\"shared\","
      "\"limit\":{\"offset\":0,\"length\":1.5}}", EXTLOCK_ERR_INVALID,
      true, 5 },
    { LOCK_PFX "\"offset\":4096,\"length\":4096,\"mode\":\"shared\","
      "\"limit\":{\"offset\":0,\"length\":0}}", EXTLOCK_ERR_RANGE,
      true, 5 },
    { LOCK_PFX "\"offset\":4096,\"length\":4096,\"mode\":\"shared\","
      "\"limit\":{\"offset\":-1,\"length\":10000}}", EXTLOCK_ERR_RANGE,
      true, 5 },
    { LOCK_PFX "\"offset\":4096,\"length\":4096,\"mode\":\"shared\","
      "\"limit\":{\"offset\":1,\"length\":9223372036854775808}}",
      EXTLOCK_ERR_RANGE, true, 5 },
    { LOCK_PFX "\"offset\":4096,\"length\":4096,\"mode\":\"shared\","
      "\"limit\":{\"offset\":4097,\"length\":65536}}", EXTLOCK_ERR_RANGE,
      true, 5 },
    { LOCK_PFX "\"offset\":4096,\"length\":4096,\"mode\":\"shared\","
      "\"limit\":{\"offset\":0,\"length\":8191}}", EXTLOCK_ERR_RANGE,
      true, 5 },
    { LOCK_PFX "\"offset\":4096,\"length\":4096,\"mode\":\"shared\","
      "\"limit\":{\"offset\":4096,\"length\":4096}}", EXTLOCK_ERR_NONE,
      true, 5 },
    /* downgrade, revoke */
    { "{\"type\":\"downgrade\",\"id\":6}", EXTLOCK_ERR_INVALID, true, 6 },
    { "{\"type\":\"downgrade\",\"id\":6,\"lock\":-2}", EXTLOCK_ERR_INVALID,
      true, 6 },
    { "{\"type\":\"downgraded\",\"id\":6,\"lock\":2}", EXTLOCK_ERR_INVALID,
      true, 6 },
    { "{\"type\":\"reclaim-done\"}", EXTLOCK_ERR_INVALID },
    { "{\"type\":\"revoke\",\"lock\":1,\"offset\":0,\"length\":1,"
      "\"mode\":\"shared\"}", EXTLOCK_ERR_INVALID },
    { "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\"s\","
      "\"lease-ms\":500,\"epoch\":1,\"resumed\":1}", EXTLOCK_ERR_INVALID,
      true, 1 },
    { "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\"s\","
      "\"lease-ms\":500,\"epoch\":1,\"grace-remaining-ms\":-1}",
      EXTLOCK_ERR_INVALID, true, 1 },
    /* unlock needs both offset and length or neither */
    { "{\"type\":\"unlock\",\"id\":6,\"lock\":1,\"offset\":0}",
      EXTLOCK_ERR_INVALID, true, 6 },
    { "{\"type\":\"unlock\",\"id\":6,\"lock\":1,\"length\":1}",
      EXTLOCK_ERR_INVALID, true, 6 },
    { "{\"type\":\"unlock\",\"id\":6,\"lock\":1,\"offset\":0,\"length\":0}",
      EXTLOCK_ERR_RANGE, true, 6 },
    { "{\"type\":\"unlock\",\"id\":6}", EXTLOCK_ERR_INVALID, true, 6 },
    { "{\"type\":\"unlock\",\"id\":6,\"lock\":1,\"maint-size\":-1}",
      EXTLOCK_ERR_INVALID, true, 6 },
    { "{\"type\":\"unlock\",\"id\":6,\"lock\":1,\"maint-size\":\"1\"}",
      EXTLOCK_ERR_INVALID, true, 6 },
    { "{\"type\":\"unlock\",\"id\":6,\"lock\":-1}", EXTLOCK_ERR_INVALID,
      true, 6 },
    { "{\"type\":\"unlock\",\"id\":6,\"lock\":9223372036854775808}",
      EXTLOCK_ERR_INVALID, true, 6 },
    { "{\"type\":\"cancel\",\"id\":6}", EXTLOCK_ERR_INVALID, true, 6 },
    { "{\"type\":\"cancel\",\"id\":6,\"request\":\"2\"}",
      EXTLOCK_ERR_INVALID, true, 6 },
    /* names */
    { HELLO_PFX "\"lock-space\":\"b\"}", EXTLOCK_ERR_INVALID, true, 1 },
    { HELLO_PFX "\"client-id\":\"a\"}", EXTLOCK_ERR_INVALID, true, 1 },
    { HELLO_PFX "\"client-id\":\"\",\"lock-space\":\"b\"}",
      EXTLOCK_ERR_INVALID, true, 1 },
    { HELLO_PFX "\"client-id\":\"a\",\"lock-space\":\"\"}",
      EXTLOCK_ERR_INVALID, true, 1 },
    { HELLO_PFX "\"client-id\":\"a\\nb\",\"lock-space\":\"b\"}",
      EXTLOCK_ERR_INVALID, true, 1 },
    { HELLO_PFX "\"client-id\":\"a\\u0000b\",\"lock-space\":\"b\"}",
      EXTLOCK_ERR_INVALID, true, 1 },
    { HELLO_PFX "\"client-id\":\"a\\u007f\",\"lock-space\":\"b\"}",
      EXTLOCK_ERR_INVALID, true, 1 },
    { HELLO_PFX "\"client-id\":\"a\tb\",\"lock-space\":\"b\"}",
      EXTLOCK_ERR_INVALID, true, 1 },
    { HELLO_PFX "\"client-id\":\"a\",\"lock-space\":\"b\\u001f\"}",
      EXTLOCK_ERR_INVALID, true, 1 },
    { HELLO_PFX "\"client-id\":\"a\",\"lock-space\":\"b\","
      "\"session\":\"\"}", EXTLOCK_ERR_INVALID, true, 1 },
    { HELLO_PFX "\"client-id\":\"a\",\"lock-space\":\"b\","
      "\"session\":\"x\\ry\"}", EXTLOCK_ERR_INVALID, true, 1 },
    { HELLO_PFX "\"client-id\":5,\"lock-space\":\"b\"}",
      EXTLOCK_ERR_INVALID, true, 1 },
    /* lease-ms */
    { HELLO_PFX "\"client-id\":\"a\",\"lock-space\":\"b\",\"lease-ms\":99}",
      EXTLOCK_ERR_INVALID, true, 1 },
    { HELLO_PFX "\"client-id\":\"a\",\"lock-space\":\"b\","
      "\"lease-ms\":3600001}", EXTLOCK_ERR_INVALID, true, 1 },
    { HELLO_PFX "\"client-id\":\"a\",\"lock-space\":\"b\",\"lease-ms\":-1}",
      EXTLOCK_ERR_INVALID, true, 1 },
    { HELLO_PFX "\"client-id\":\"a\",\"lock-space\":\"b\","
      "\"lease-ms\":1000.5}", EXTLOCK_ERR_INVALID, true, 1 },
    { HELLO_PFX "\"client-id\":\"a\",\"lock-space\":\"b\","
      "\"lease-ms\":18446744073709551616}", EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"renewed\",\"id\":2,\"lease-ms\":0}", EXTLOCK_ERR_INVALID,
      true, 2 },
    /* version */
    { "{\"type\":\"hello\",\"id\":1,\"client-id\":\"a\","
      "\"lock-space\":\"b\"}", EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"hello\",\"id\":1,\"version\":4294967296,"
      "\"client-id\":\"a\",\"lock-space\":\"b\"}", EXTLOCK_ERR_INVALID,
      true, 1 },
    { "{\"type\":\"hello\",\"id\":1,\"version\":\"1\","
      "\"client-id\":\"a\",\"lock-space\":\"b\"}", EXTLOCK_ERR_INVALID,
      true, 1 },
    /* replies */
    { "{\"type\":\"granted\",\"id\":2,\"lock\":1,\"token\":2,\"offset\":0,"
      "\"length\":1}", EXTLOCK_ERR_INVALID, true, 2 },
    { "{\"type\":\"waiting\",\"id\":2,\"token\":2}", EXTLOCK_ERR_INVALID,
      true, 2 },
    { "{\"type\":\"waiting\",\"id\":2,\"token\":2,\"blockers\":{}}",
      EXTLOCK_ERR_INVALID, true, 2 },
    { "{\"type\":\"waiting\",\"id\":2,\"token\":2,\"blockers\":[1]}",
      EXTLOCK_ERR_INVALID, true, 2 },
    { "{\"type\":\"waiting\",\"id\":2,\"token\":2,\"blockers\":["
      "{\"client-id\":\"x\",\"offset\":0,\"length\":1,\"mode\":\"shared\","
      "\"token\":1,\"waiting\":false},{\"client-id\":\"\",\"offset\":0,"
      "\"length\":1,\"mode\":\"shared\",\"token\":1}]}",
      EXTLOCK_ERR_INVALID, true, 2 },
    { "{\"type\":\"waiting\",\"id\":2,\"token\":2,\"blockers\":["
      "{\"client-id\":\"x\",\"offset\":0,\"length\":0,\"mode\":\"shared\","
      "\"token\":1}]}", EXTLOCK_ERR_RANGE, true, 2 },
    { "{\"type\":\"unlocked\",\"id\":3,\"lock\":1}", EXTLOCK_ERR_INVALID,
      true, 3 },
    { "{\"type\":\"unlocked\",\"id\":3,\"lock\":1,\"pieces\":[{\"lock\":2,"
      "\"offset\":-5,\"length\":1}]}", EXTLOCK_ERR_RANGE, true, 3 },
    { "{\"type\":\"status-reply\",\"id\":7}", EXTLOCK_ERR_INVALID, true, 7 },
    { "{\"type\":\"status-reply\",\"id\":7,\"status\":[]}",
      EXTLOCK_ERR_INVALID, true, 7 },
    { "{\"type\":\"error\",\"id\":7}", EXTLOCK_ERR_INVALID, true, 7 },
    { "{\"type\":\"error\",\"id\":7,\"code\":3}", EXTLOCK_ERR_INVALID,
      true, 7 },
    { "{\"type\":\"error\",\"id\":7,\"code\":\"cancelled\",\"message\":1}",
      EXTLOCK_ERR_INVALID, true, 7 },
    { "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\"s\","
      "\"lease-ms\":500}", EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"welcome\",\"id\":1,\"version\":1,\"session\":\"s\","
      "\"lease-ms\":500,\"epoch\":1,\"locks\":[{\"lock\":1}]}",
      EXTLOCK_ERR_INVALID, true, 1 },
    { "{\"type\":\"session-expired\"}", EXTLOCK_ERR_INVALID },
    { "{\"type\":\"reclaim\",\"id\":4,\"offset\":0,\"length\":1,"
      "\"mode\":\"shared\"}", EXTLOCK_ERR_INVALID, true, 4 },
};

static void test_bad_input(void **state)
{
    size_t i;

    for (i = 0; i < G_N_ELEMENTS(bad_cases); i++) {
        const BadCase *c = &bad_cases[i];
        ExtlockMsg msg;
        ExtlockProtoError err = { .code = EXTLOCK_ERR_NONE };
        bool ok = extlock_msg_parse(c->line, strlen(c->line), &msg, &err);

        if (c->code == EXTLOCK_ERR_NONE) {
            /* a valid edge case mixed into the table */
            if (!ok) {
                fail_msg("case %zu (%s): unexpected %s: %s", i, c->line,
                         extlock_error_code_name(err.code), err.message);
            }
            extlock_msg_clear(&msg);
            continue;
        }
        if (ok) {
            fail_msg("case %zu (%s): accepted", i, c->line);
        }
        if (err.code != c->code) {
            fail_msg("case %zu (%s): got %s (%s), expected %s", i, c->line,
                     extlock_error_code_name(err.code), err.message,
                     extlock_error_code_name(c->code));
        }
        assert_true(err.message[0] != '\0');
        if (msg.has_id != c->has_id || (c->has_id && msg.id != c->id)) {
            fail_msg("case %zu (%s): has_id %d id %" PRIu64, i, c->line,
                     msg.has_id, msg.id);
        }
        /* nothing left to free on failure */
        assert_null(msg.client_id);
        assert_null(msg.lock_space);
        assert_null(msg.session);
        assert_null(msg.message);
        assert_null(msg.blockers);
        assert_null(msg.pieces);
        assert_null(msg.locks);
        assert_null(msg.body);
        assert_null(msg.pr);
    }
}

/*
 * The parser has a fast path for flat hot-path messages and falls back to
 * json-c for everything else.  Adding a nested unknown member forces the
 * json-c path without changing the meaning, so both must agree exactly.
 */
static const char *const diff_cases[] = {
    "{\"type\":\"lock\",\"id\":2,\"offset\":0,"
    "\"length\":1,\"mode\":\"shared\"}",
    "{\"mode\":\"exclusive\",\"length\":4096,\"offset\":8192,\"id\":77,"
    "\"type\":\"lock\",\"wait\":false}",
    "{ \"type\" : \"lock\" ,\t\"id\" : 3 , \"offset\" : 999999999999999999,"
    " \"length\" : 999999999999999999 , \"mode\" : \"shared\" , "
    "\"wait\" : true }\r",
    "{\"type\":\"lock\",\"id\":2,\"offset\":0,"
    "\"length\":0,\"mode\":\"shared\"}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":0,"
    "\"length\":1,\"mode\":\"Shared\"}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":0,\"length\":1,\"mode\":\"shared\","
    "\"wait\":null}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":0,\"length\":1,\"mode\":\"shared\","
    "\"wait\":1}",
    "{\"type\":\"lock\",\"id\":2,\"id\":3,\"offset\":0,\"length\":1,"
    "\"mode\":\"shared\"}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":1,\"length\":2,\"offset\":3,"
    "\"mode\":\"shared\"}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":9223372036854775807,"
    "\"length\":1,\"mode\":\"shared\"}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":9223372036854775807,"
    "\"length\":2,\"mode\":\"shared\"}",
    "{\"type\":\"lock\",\"id\":1000000000000000000,\"offset\":0,"
    "\"length\":1,\"mode\":\"shared\"}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":0,\"length\":1,"
    "\"mode\":\"shared\",\"note\":\"caf\\u00e9\",\"n\":-1,\"f\":1.5}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":00,\"length\":1,"
    "\"mode\":\"shared\"}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":0,\"length\":1,"
    "\"mode\":\"shared\"} x",
    "{\"type\":\"lock\",\"id\":2,\"offset\":0,\"length\":1,"
    "\"mode\":\"shared\"}}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":0,\"length\":1,"
    "\"mode\":\"shared\",}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":0,\"length\":1e2,"
    "\"mode\":\"shared\"}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":0,\"length\":1,"
    "\"mode\":\"shared\",\"lock\":\"x\",\"request\":[],\"token\":true}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":8,\"length\":8,"
    "\"mode\":\"shared\",\"limit\":{\"length\":64,\"offset\":0}}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":8,\"length\":8,"
    "\"mode\":\"shared\",\"limit\" : { \"offset\" : 8 , \"length\" : 8 } }",
    "{\"type\":\"lock\",\"id\":2,\"offset\":8,\"length\":8,"
    "\"mode\":\"shared\",\"limit\":{\"offset\":9,\"length\":64}}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":8,\"length\":8,"
    "\"mode\":\"shared\",\"limit\":{\"offset\":0,\"length\":64,"
    "\"x\":1}}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":8,\"length\":8,"
    "\"mode\":\"shared\",\"limit\":{\"offset\":0,\"offset\":0,"
    "\"length\":64}}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":8,\"length\":8,"
    "\"mode\":\"shared\",\"limit\":{\"offset\":0,\"length\":64},"
    "\"limit\":{\"offset\":8,\"length\":8}}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":8,\"length\":8,"
    "\"mode\":\"shared\",\"limit\":{}}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":8,\"length\":8,"
    "\"mode\":\"shared\",\"limit\":{\"offset\":0,\"length\":64}"
    ",\"offset\":9}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":8,\"length\":8,"
    "\"mode\":\"shared\",\"limit\":{\"offset\":0,\"length\":64,}}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":8,\"length\":8,"
    "\"mode\":\"shared\",\"limit\":{\"offset\":0,\"length\":64}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":8,\"length\":8,"
    "\"mode\":\"shared\",\"limit\":null}",
    "{\"type\":\"unlock\",\"id\":3,\"lock\":17,\"limit\":{\"offset\":0,"
    "\"length\":1}}",
    "{\"type\":\"unlock\",\"id\":3,\"lock\":17,\"maint-size\":5}",
    "{\"type\":\"unlock\",\"id\":3,\"lock\":17,\"maint-size\":-5}",
    "{\"type\":\"renewed\",\"id\":5,\"lease-ms\":1000,"
    "\"maint-gen\":4294967297}",
    "{\"type\":\"renewed\",\"id\":5,\"lease-ms\":1000,\"maint-gen\":true}",
    "{\"type\":\"lock\",\"id\":2,\"offset\":8,\"length\":8,"
    "\"mode\":\"shared\",\"maint-gen\":3}",
    "{\"type\":\"granted\",\"id\":2,\"lock\":1,\"token\":2,\"offset\":0,"
    "\"length\":1,\"mode\":\"shared\",\"maint-gen\":1,\"maint-size\":7}",
    "{\"type\":\"granted\",\"id\":2,\"lock\":1,\"token\":2,\"offset\":0,"
    "\"length\":1,\"mode\":\"shared\",\"maint-gen\":1}",
    "{\"type\":\"downgrade\",\"id\":3,\"lock\":17}",
    "{\"type\":\"downgrade\",\"id\":3}",
    "{\"type\":\"downgraded\",\"id\":3,\"lock\":17,\"mode\":\"shared\"}",
    "{\"type\":\"downgraded\",\"id\":3,\"lock\":17,\"mode\":\"x\"}",
    "{\"type\":\"reclaim-done\",\"id\":3}",
    "{\"type\":\"reclaim-complete\",\"id\":3}",
    "{\"type\":\"unlock\",\"id\":3,\"lock\":17}",
    "{\"type\":\"unlock\",\"id\":3,\"lock\":17,\"offset\":5,\"length\":6}",
    "{\"type\":\"unlock\",\"id\":3,\"lock\":17,\"offset\":5}",
    "{\"type\":\"unlock\",\"id\":3,\"lock\":\"17\"}",
    "{\"type\":\"granted\",\"id\":2,\"lock\":17,\"token\":3298534883331,"
    "\"offset\":0,\"length\":65536,\"mode\":\"exclusive\"}",
    "{\"type\":\"granted\",\"id\":2,\"lock\":17,\"offset\":0,"
    "\"length\":65536,\"mode\":\"exclusive\"}",
    "{\"type\":\"unlocked\",\"id\":3,\"lock\":17,\"pieces\":[]}",
    "{\"type\":\"unlocked\",\"id\":3,\"lock\":17,\"pieces\":[ ]}",
    "{\"type\":\"unlocked\",\"id\":3,\"lock\":17}",
    "{\"type\":\"unlocked\",\"id\":3,\"lock\":17,\"pieces\":[{\"lock\":17,"
    "\"offset\":0,\"length\":1}]}",
    "{\"type\":\"cancel\",\"id\":4,\"request\":2}",
    "{\"type\":\"cancelled\",\"id\":4,\"request\":2}",
    "{\"type\":\"cancel\",\"id\":4}",
    "{\"type\":\"renew\",\"id\":5}",
    "{\"type\":\"renewed\",\"id\":5,\"lease-ms\":99}",
    "{\"type\":\"renewed\",\"id\":5,\"lease-ms\":100}",
    "{\"type\":\"renewed\",\"id\":5,\"lease-ms\":3600001}",
    "{\"type\":\"bye\",\"id\":6}",
    "{\"type\":\"goodbye\",\"id\":6}",
    "{\"type\":\"status\",\"id\":7}",
    "{\"type\":\"status\"}",
    "{\"type\":\"statu\",\"id\":7}",
    "{\"type\":\"status-reply\",\"id\":7,\"status\":{}}",
    "{\"type\":\"renew\",\"id\":5,\"\":1}",
    "{\"type\":\"renew\",\"id\":5,\"x\":\"a\\\"b\"}",
    "{\"type\":\"renew\",\"id\":5,\"x\":\"\t\"}",
    "{\"type\":\"renew\",\"id\":5,\"x\":truex}",
    "{\"type\":\"renew\",\"id\":5,\"x\":fals}",
    "{\"type\":\"renew\",\"id\":5,\"x\":\"\xc3\xa9\"}",
    "{\"type\":\"renew\",\"id\":5\f}",
    "{\"type\":\"renew\",\"id\":5\v}",
    "{\"type\":\"renew\",\"id\":5 \"x\":1}",
    "{\"type\":\"renew\" \"id\":5}",
    "{\"type\":\"renew\",\"id\"5}",
};

static char *describe_parse(const char *line, size_t len)
{
    ExtlockMsg msg;
    ExtlockProtoError err;
    GString *out = g_string_new(NULL);

    if (extlock_msg_parse(line, len, &msg, &err)) {
        g_string_append(out, "ok ");
        extlock_msg_format(&msg, out);
    } else {
        g_string_append_printf(out, "error %s has_id=%d id=%" PRIu64,
                               extlock_error_code_name(err.code),
                               msg.has_id, msg.id);
    }
    extlock_msg_clear(&msg);
    return g_string_free(out, false);
}

static void test_fast_path_equivalence(void **state)
{
    size_t i;
    int checked = 0;

    for (i = 0; i < G_N_ELEMENTS(diff_cases) + G_N_ELEMENTS(canonical);
         i++) {
        const char *line = i < G_N_ELEMENTS(diff_cases) ? diff_cases[i] :
                           canonical[i - G_N_ELEMENTS(diff_cases)];
        const char *brace = strchr(line, '{');
        g_autofree char *slow = NULL;
        g_autofree char *a = NULL;
        g_autofree char *b = NULL;

        assert_non_null(brace);
        slow = g_strdup_printf("%.*s{\"zz\":[0],%s", (int)(brace - line),
                               line, brace + 1);
        a = describe_parse(line, strlen(line));
        b = describe_parse(slow, strlen(slow));
        if (strcmp(a, b) != 0) {
            fail_msg("case %zu %s:\n  fast: %s\n  slow: %s", i, line, a, b);
        }
        checked++;
    }
    assert_int_equal(checked, G_N_ELEMENTS(diff_cases) +
                     G_N_ELEMENTS(canonical));
}

/* Embedded NUL bytes are not JSON whitespace */
static void test_bad_embedded_nul(void **state)
{
    static const char line[] = "{\"type\":\"renew\",\"id\":5}\0";
    static const char line2[] = "{\"type\":\"renew\",\"id\":5,\"x\":\"\0\"}";
    ExtlockMsg msg;
    ExtlockProtoError err;

    assert_false(extlock_msg_parse(line, sizeof(line) - 1, &msg, &err));
    assert_int_equal(err.code, EXTLOCK_ERR_PARSE);
    assert_false(extlock_msg_parse(line2, sizeof(line2) - 1, &msg, &err));
    assert_int_equal(err.code, EXTLOCK_ERR_PARSE);
}

static void test_name_length(void **state)
{
    ExtlockMsg msg;
    ExtlockProtoError err;
    g_autofree char *n256 = g_strnfill(256, 'x');
    g_autofree char *n257 = g_strnfill(257, 'x');
    g_autofree char *ok_line = g_strdup_printf(
        HELLO_PFX "\"client-id\":\"%s\",\"lock-space\":\"%s\"}", n256, n256);
    g_autofree char *bad1 = g_strdup_printf(
        HELLO_PFX "\"client-id\":\"%s\",\"lock-space\":\"b\"}", n257);
    g_autofree char *bad2 = g_strdup_printf(
        HELLO_PFX "\"client-id\":\"a\",\"lock-space\":\"%s\"}", n257);
    /* 128 two-byte characters: 256 bytes, allowed; one more is too long */
    GString *u = g_string_new(NULL);
    int i;

    parse_ok(ok_line, &msg);
    assert_int_equal(strlen(msg.client_id), 256);
    extlock_msg_clear(&msg);
    assert_false(extlock_msg_parse(bad1, strlen(bad1), &msg, &err));
    assert_int_equal(err.code, EXTLOCK_ERR_INVALID);
    assert_true(msg.has_id);
    assert_false(extlock_msg_parse(bad2, strlen(bad2), &msg, &err));
    assert_int_equal(err.code, EXTLOCK_ERR_INVALID);

    for (i = 0; i < 128; i++) {
        g_string_append(u, "\xc3\xa9");
    }
    {
        g_autofree char *l = g_strdup_printf(
            HELLO_PFX "\"client-id\":\"%s\",\"lock-space\":\"b\"}", u->str);
        parse_ok(l, &msg);
        assert_int_equal(strlen(msg.client_id), 256);
        extlock_msg_clear(&msg);
    }
    g_string_append(u, "\xc3\xa9");
    {
        g_autofree char *l = g_strdup_printf(
            HELLO_PFX "\"client-id\":\"%s\",\"lock-space\":\"b\"}", u->str);
        assert_false(extlock_msg_parse(l, strlen(l), &msg, &err));
        assert_int_equal(err.code, EXTLOCK_ERR_INVALID);
    }
    g_string_free(u, true);
}

/*
 * String escaping
 */
static void test_escaping(void **state)
{
    static const char *const texts[] = {
        "plain",
        "quote \" and backslash \\ and slash /",
        "ctl \x01\x02\x1f \b\f\n\r\t end",
        "utf-8: \xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xe4\xb8\xad",
        "\x7f del",
        "",
    };
    size_t i;

    for (i = 0; i < G_N_ELEMENTS(texts); i++) {
        ExtlockMsg in, out;
        g_autofree char *s = NULL;
        g_autofree char *s2 = NULL;
        size_t j;

        extlock_msg_init(&in, EXTLOCK_MSG_ERROR);
        in.has_id = true;
        in.id = 1;
        in.error = EXTLOCK_ERR_STATE;
        in.message = (char *)texts[i];
        s = format_msg(&in);
        /* one line: no raw control characters in the output */
        for (j = 0; s[j + 1]; j++) {
            assert_true((unsigned char)s[j] >= 0x20);
        }
        assert_int_equal(s[j], '\n');
        parse_ok(s, &out);
        assert_string_equal(out.message, texts[i]);
        s2 = format_msg(&out);
        assert_string_equal(s, s2);
        extlock_msg_clear(&out);
    }

    /* exact escapes */
    {
        ExtlockMsg in;
        g_autofree char *s = NULL;

        extlock_msg_init(&in, EXTLOCK_MSG_SESSION_EXPIRED);
        in.session = (char *)"s";
        in.message = (char *)"a\"b\\c\nd\x01" "e\xc3\xa9";
        s = format_msg(&in);
        assert_string_equal(s, "{\"type\":\"session-expired\",\"session\":"
                            "\"s\",\"message\":\"a\\\"b\\\\c\\nd\\u0001"
                            "e\xc3\xa9\"}\n");
    }

    /* \u escapes in the input decode to UTF-8 */
    {
        ExtlockMsg msg;

        parse_ok("{\"type\":\"error\",\"code\":\"cancelled\",\"message\":"
                 "\"\\u00e9\\u20ac\\ud83d\\ude00\\/\"}", &msg);
        assert_string_equal(msg.message,
                            "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80/");
        extlock_msg_clear(&msg);
    }

    /* invalid UTF-8 in a string to format becomes U+FFFD */
    {
        ExtlockMsg in, out;
        g_autofree char *s = NULL;

        extlock_msg_init(&in, EXTLOCK_MSG_ERROR);
        in.error = EXTLOCK_ERR_INTERNAL;
        in.message = (char *)"x\xff" "y\xc3";
        s = format_msg(&in);
        parse_ok(s, &out);
        assert_string_equal(out.message, "x\xef\xbf\xbdy\xef\xbf\xbd");
        extlock_msg_clear(&out);
    }

    /* names with quotes round-trip through hello */
    {
        ExtlockMsg in, out;
        g_autofree char *s = NULL;

        extlock_msg_init(&in, EXTLOCK_MSG_HELLO);
        in.id = 3;
        in.client_id = (char *)"host \"A\"\\disk0 \xc3\xa9";
        in.lock_space = (char *)"/nfs/images/disk.qcow2";
        s = format_msg(&in);
        parse_ok(s, &out);
        assert_string_equal(out.client_id, in.client_id);
        assert_string_equal(out.lock_space, in.lock_space);
        extlock_msg_clear(&out);
    }
}

static void test_format_error(void **state)
{
    GString *out = g_string_new(NULL);
    ExtlockMsg msg;

    extlock_format_error(out, true, 12, EXTLOCK_ERR_RANGE, "bad %s %d",
                         "range", 7);
    assert_string_equal(out->str, "{\"type\":\"error\",\"id\":12,"
                        "\"code\":\"invalid-range\","
                        "\"message\":\"bad range 7\"}\n");
    g_string_truncate(out, 0);
    extlock_format_error(out, false, 12, EXTLOCK_ERR_PARSE, "x\"y");
    assert_string_equal(out->str, "{\"type\":\"error\","
                        "\"code\":\"parse-error\",\"message\":\"x\\\"y\"}\n");
    parse_ok(out->str, &msg);
    assert_false(msg.has_id);
    assert_int_equal(msg.error, EXTLOCK_ERR_PARSE);
    extlock_msg_clear(&msg);
    g_string_free(out, true);
}

static void test_names(void **state)
{
    int i;

    for (i = EXTLOCK_ERR_NONE + 1; i < EXTLOCK_ERR__MAX; i++) {
        const char *n = extlock_error_code_name(i);

        assert_non_null(n);
        assert_int_equal(extlock_error_code_from_name(n), i);
    }
    assert_string_equal(extlock_error_code_name(EXTLOCK_ERR_RANGE),
                        "invalid-range");
    assert_string_equal(extlock_error_code_name(EXTLOCK_ERR_LINE_TOO_LONG),
                        "line-too-long");
    assert_int_equal(extlock_error_code_from_name("nope"), EXTLOCK_ERR_NONE);
    assert_int_equal(extlock_error_code_from_name(NULL), EXTLOCK_ERR_NONE);
    assert_string_equal(extlock_msg_type_name(EXTLOCK_MSG_STATUS_REPLY),
                        "status-reply");
    assert_string_equal(extlock_msg_type_name(EXTLOCK_MSG_SESSION_EXPIRED),
                        "session-expired");
    assert_string_equal(extlock_msg_type_name(EXTLOCK_MSG__MAX), "invalid");
}

/*
 * Thread safety: each thread has its own tokener
 */
static gpointer parse_thread(gpointer data)
{
    int n = GPOINTER_TO_INT(data);
    GString *out = g_string_new(NULL);
    int i, bad = 0;

    for (i = 0; i < 20000; i++) {
        ExtlockMsg in, msg;
        ExtlockProtoError err;

        extlock_msg_init(&in, EXTLOCK_MSG_LOCK);
        in.id = i;
        in.offset = (uint64_t)n << 32 | i;
        in.length = 4096;
        g_string_truncate(out, 0);
        extlock_msg_format(&in, out);
        /* alternate with an invalid line to exercise tokener resets */
        if (extlock_msg_parse("{\"type\":", 8, &msg, &err) ||
            err.code != EXTLOCK_ERR_PARSE) {
            bad++;
        }
        if (!extlock_msg_parse(out->str, out->len - 1, &msg, &err) ||
            msg.id != (uint64_t)i || msg.offset != in.offset) {
            bad++;
        }
        extlock_msg_clear(&msg);
    }
    g_string_free(out, true);
    return GINT_TO_POINTER(bad);
}

static void test_threads(void **state)
{
    GThread *th[4];
    int i;

    for (i = 0; i < 4; i++) {
        th[i] = g_thread_new("parse", parse_thread, GINT_TO_POINTER(i + 1));
    }
    for (i = 0; i < 4; i++) {
        assert_int_equal(GPOINTER_TO_INT(g_thread_join(th[i])), 0);
    }
}

/*
 * Line buffer
 */
static ExtlockLineResult next_line(ExtlockLineBuf *lb, char **copy)
{
    const char *line = NULL;
    size_t len = 0;
    ExtlockLineResult r = extlock_linebuf_next(lb, &line, &len);

    *copy = r == EXTLOCK_LINE_OK ? g_strndup(line, len) : NULL;
    return r;
}

static void expect_line(ExtlockLineBuf *lb, const char *expect)
{
    char *got;

    assert_int_equal(next_line(lb, &got), EXTLOCK_LINE_OK);
    assert_string_equal(got, expect);
    g_free(got);
}

static void expect_result(ExtlockLineBuf *lb, ExtlockLineResult expect)
{
    char *got;

    assert_int_equal(next_line(lb, &got), expect);
    g_free(got);
}

/* Clients read longer replies: the limit is per buffer */
static void test_linebuf_max(void **state)
{
    ExtlockLineBuf lb;
    size_t big = EXTLOCK_MAX_LINE * 2;
    g_autofree char *line = g_malloc(big + 1);

    memset(line, 'x', big);
    line[big] = '\n';

    extlock_linebuf_init_max(&lb, big + 1);
    extlock_linebuf_append(&lb, line, big + 1);
    {
        const char *got;
        size_t len;

        assert_int_equal(extlock_linebuf_next(&lb, &got, &len),
                         EXTLOCK_LINE_OK);
        assert_int_equal(len, big);
    }
    expect_result(&lb, EXTLOCK_LINE_NONE);
    extlock_linebuf_destroy(&lb);

    extlock_linebuf_init_max(&lb, big);
    extlock_linebuf_append(&lb, line, big + 1);
    expect_result(&lb, EXTLOCK_LINE_TOO_LONG);
    extlock_linebuf_append(&lb, "ok\n", 3);
    expect_line(&lb, "ok");
    extlock_linebuf_destroy(&lb);
}

static void test_linebuf_split(void **state)
{
    ExtlockLineBuf lb;
    const char *text = "first\nsecond line\r\n\nthird\r\r\nlast";
    size_t i;

    /* all at once */
    extlock_linebuf_init(&lb);
    extlock_linebuf_append(&lb, text, strlen(text));
    expect_line(&lb, "first");
    expect_line(&lb, "second line");
    expect_line(&lb, "");
    expect_line(&lb, "third\r");   /* only one '\r' is stripped */
    expect_result(&lb, EXTLOCK_LINE_NONE);
    extlock_linebuf_append(&lb, "!\n", 2);
    expect_line(&lb, "last!");
    expect_result(&lb, EXTLOCK_LINE_NONE);
    extlock_linebuf_destroy(&lb);

    /* one byte at a time, taking lines as they complete */
    extlock_linebuf_init(&lb);
    {
        GPtrArray *lines = g_ptr_array_new_with_free_func(g_free);

        for (i = 0; text[i]; i++) {
            char *l;

            extlock_linebuf_append(&lb, &text[i], 1);
            while (next_line(&lb, &l) == EXTLOCK_LINE_OK) {
                g_ptr_array_add(lines, l);
            }
        }
        assert_int_equal(lines->len, 4);
        assert_string_equal(g_ptr_array_index(lines, 1), "second line");
        assert_string_equal(g_ptr_array_index(lines, 3), "third\r");
        g_ptr_array_free(lines, true);
    }
    /* the unterminated "last" is still buffered, nothing else */
    assert_int_equal(lb.buf->len - lb.pos, 4);
    extlock_linebuf_destroy(&lb);

    /* a line split across appends, with a CR right before the split */
    extlock_linebuf_init(&lb);
    extlock_linebuf_append(&lb, "{\"type\":", 8);
    expect_result(&lb, EXTLOCK_LINE_NONE);
    extlock_linebuf_append(&lb, "\"renew\",\"id\":1}\r", 16);
    expect_result(&lb, EXTLOCK_LINE_NONE);
    extlock_linebuf_append(&lb, "\n{", 2);
    {
        const char *line;
        size_t len;
        ExtlockMsg msg;
        ExtlockProtoError err;

        assert_int_equal(extlock_linebuf_next(&lb, &line, &len),
                         EXTLOCK_LINE_OK);
        assert_true(extlock_msg_parse(line, len, &msg, &err));
        assert_int_equal(msg.type, EXTLOCK_MSG_RENEW);
    }
    expect_result(&lb, EXTLOCK_LINE_NONE);
    extlock_linebuf_destroy(&lb);
}

static void test_linebuf_limit_exact(void **state)
{
    ExtlockLineBuf lb;
    g_autofree char *max = g_malloc(EXTLOCK_MAX_LINE + 2);
    char *got;

    /* EXTLOCK_MAX_LINE bytes including '\n' is fine */
    memset(max, 'a', EXTLOCK_MAX_LINE - 1);
    max[EXTLOCK_MAX_LINE - 1] = '\n';
    extlock_linebuf_init(&lb);
    extlock_linebuf_append(&lb, max, EXTLOCK_MAX_LINE);
    assert_int_equal(next_line(&lb, &got), EXTLOCK_LINE_OK);
    assert_int_equal(strlen(got), EXTLOCK_MAX_LINE - 1);
    g_free(got);
    expect_result(&lb, EXTLOCK_LINE_NONE);

    /* one more byte is too long, whether it arrives whole... */
    memset(max, 'b', EXTLOCK_MAX_LINE);
    max[EXTLOCK_MAX_LINE] = '\n';
    extlock_linebuf_append(&lb, max, EXTLOCK_MAX_LINE + 1);
    extlock_linebuf_append(&lb, "next\n", 5);
    expect_result(&lb, EXTLOCK_LINE_TOO_LONG);
    expect_line(&lb, "next");
    expect_result(&lb, EXTLOCK_LINE_NONE);

    /* ...or with the '\n' separately, after the report */
    extlock_linebuf_append(&lb, max, EXTLOCK_MAX_LINE);
    expect_result(&lb, EXTLOCK_LINE_TOO_LONG);
    expect_result(&lb, EXTLOCK_LINE_NONE);
    extlock_linebuf_append(&lb, "\nafter\n", 7);
    expect_line(&lb, "after");
    expect_result(&lb, EXTLOCK_LINE_NONE);

    /* a line of MAX_LINE - 1 bytes split in two is still fine */
    memset(max, 'c', EXTLOCK_MAX_LINE - 1);
    extlock_linebuf_append(&lb, max, 100);
    expect_result(&lb, EXTLOCK_LINE_NONE);
    extlock_linebuf_append(&lb, max, EXTLOCK_MAX_LINE - 1 - 100);
    expect_result(&lb, EXTLOCK_LINE_NONE);
    extlock_linebuf_append(&lb, "\n", 1);
    assert_int_equal(next_line(&lb, &got), EXTLOCK_LINE_OK);
    assert_int_equal(strlen(got), EXTLOCK_MAX_LINE - 1);
    g_free(got);
    extlock_linebuf_destroy(&lb);
}

static void test_linebuf_oversized(void **state)
{
    ExtlockLineBuf lb;
    char chunk[4096];
    size_t total = 0;
    size_t max_buffered = 0;
    int too_long = 0;
    char *got;
    ExtlockLineResult r;

    memset(chunk, 'x', sizeof(chunk));
    extlock_linebuf_init(&lb);
    extlock_linebuf_append(&lb, "before\n", 7);

    /* 10 MiB without a newline, in 4 KiB pieces */
    while (total < 10 * 1024 * 1024) {
        extlock_linebuf_append(&lb, chunk, sizeof(chunk));
        total += sizeof(chunk);
        max_buffered = MAX(max_buffered, lb.buf->len);
        while ((r = next_line(&lb, &got)) != EXTLOCK_LINE_NONE) {
            if (r == EXTLOCK_LINE_OK) {
                assert_string_equal(got, "before");
                g_free(got);
            } else {
                too_long++;
            }
        }
    }
    extlock_linebuf_append(&lb, "tail of it\n{\"type\":\"bye\",\"id\":2}\n",
                           33);
    while ((r = next_line(&lb, &got)) == EXTLOCK_LINE_TOO_LONG) {
        too_long++;
    }
    assert_int_equal(r, EXTLOCK_LINE_OK);
    assert_string_equal(got, "{\"type\":\"bye\",\"id\":2}");
    g_free(got);
    expect_result(&lb, EXTLOCK_LINE_NONE);
    assert_int_equal(too_long, 1);
    assert_true(max_buffered <= EXTLOCK_MAX_LINE + sizeof(chunk));
    extlock_linebuf_destroy(&lb);

    /* one huge append: only up to the limit is kept */
    {
        size_t big = 8 * 1024 * 1024;
        char *huge = g_malloc(big);

        memset(huge, 'y', big);
        extlock_linebuf_init(&lb);
        extlock_linebuf_append(&lb, "a\n", 2);
        extlock_linebuf_append(&lb, huge, big);
        assert_true(lb.buf->len <= EXTLOCK_MAX_LINE + 2);
        expect_line(&lb, "a");
        expect_result(&lb, EXTLOCK_LINE_TOO_LONG);
        expect_result(&lb, EXTLOCK_LINE_NONE);
        /* still discarding: more of the same line is dropped */
        extlock_linebuf_append(&lb, huge, big);
        assert_true(lb.buf->len <= EXTLOCK_MAX_LINE + 2);
        expect_result(&lb, EXTLOCK_LINE_NONE);
        huge[big - 3] = '\n';
        huge[big - 2] = 'o';
        huge[big - 1] = 'k';
        extlock_linebuf_append(&lb, huge, big);
        extlock_linebuf_append(&lb, "\n", 1);
        expect_line(&lb, "ok");
        expect_result(&lb, EXTLOCK_LINE_NONE);
        extlock_linebuf_destroy(&lb);

        /* oversized line followed by good lines in the same append */
        extlock_linebuf_init(&lb);
        memcpy(huge + big - 9, "\nl1\nl2\n", 7);
        huge[big - 2] = 'l';
        huge[big - 1] = '3';
        extlock_linebuf_append(&lb, huge, big);
        expect_result(&lb, EXTLOCK_LINE_TOO_LONG);
        expect_line(&lb, "l1");
        expect_line(&lb, "l2");
        expect_result(&lb, EXTLOCK_LINE_NONE);
        extlock_linebuf_append(&lb, "\n", 1);
        expect_line(&lb, "l3");
        extlock_linebuf_destroy(&lb);
        g_free(huge);
    }
}

/* Many short lines: consumed data does not accumulate */
static void test_linebuf_bounded(void **state)
{
    ExtlockLineBuf lb;
    const char *msg = "{\"type\":\"renew\",\"id\":1}\n{\"type\":";
    size_t i, max_len = 0;
    char *got;

    extlock_linebuf_init(&lb);
    for (i = 0; i < 100000; i++) {
        extlock_linebuf_append(&lb, msg, strlen(msg));
        extlock_linebuf_append(&lb, "\"renew\",\"id\":2}\n", 16);
        while (next_line(&lb, &got) == EXTLOCK_LINE_OK) {
            assert_true(g_str_has_prefix(got, "{\"type\":\"renew\""));
            g_free(got);
        }
        max_len = MAX(max_len, lb.buf->len);
    }
    assert_true(max_len < 128);
    extlock_linebuf_destroy(&lb);
}

/*
 * The blocking client, against a fake server in the same thread: replies
 * are written into the socket before the client waits for them.
 */
typedef struct FakeServer {
    char *dir;
    char *path;
    int listen_fd;
    int fd;                     /* accepted connection */
} FakeServer;

static void fake_listen_unix(FakeServer *fs)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };

    fs->dir = g_dir_make_tmp("extlock-test-XXXXXX", NULL);
    assert_non_null(fs->dir);
    fs->path = g_build_filename(fs->dir, "sock", NULL);
    strcpy(sa.sun_path, fs->path);
    fs->listen_fd = socket(AF_UNIX, SOCK_STREAM, 0);
    assert_true(fs->listen_fd >= 0);
    assert_int_equal(bind(fs->listen_fd, (struct sockaddr *)&sa,
                          sizeof(sa)), 0);
    assert_int_equal(listen(fs->listen_fd, 4), 0);
    fs->fd = -1;
}

static void fake_accept(FakeServer *fs)
{
    fs->fd = accept(fs->listen_fd, NULL, NULL);
    assert_true(fs->fd >= 0);
}

static void fake_write(FakeServer *fs, const char *text)
{
    size_t len = strlen(text);

    assert_int_equal(write(fs->fd, text, len), (ssize_t)len);
}

/* Read what the client sent so far (it is small) */
static char *fake_read(FakeServer *fs)
{
    char buf[4096];
    ssize_t n = recv(fs->fd, buf, sizeof(buf) - 1, MSG_DONTWAIT);

    assert_true(n > 0);
    buf[n] = '\0';
    return g_strdup(buf);
}

static void fake_close(FakeServer *fs)
{
    if (fs->fd >= 0) {
        close(fs->fd);
        fs->fd = -1;
    }
    if (fs->listen_fd >= 0) {
        close(fs->listen_fd);
        fs->listen_fd = -1;
    }
    if (fs->path) {
        unlink(fs->path);
        rmdir(fs->dir);
    }
    g_free(fs->path);
    g_free(fs->dir);
    fs->path = fs->dir = NULL;
}

static void test_client_call(void **state)
{
    FakeServer fs;
    g_autofree char *addr = NULL;
    g_autofree char *sent = NULL;
    g_autoptr(GError) err = NULL;
    ExtlockConn *conn;
    ExtlockMsg req, reply;

    fake_listen_unix(&fs);
    addr = g_strdup_printf("unix:%s", fs.path);
    conn = extlock_conn_connect(addr, &err);
    assert_non_null(conn);
    assert_null(err);
    fake_accept(&fs);
    assert_int_equal(extlock_conn_next_id(conn), 1);

    /* interim reply, notification and another request's reply first */
    fake_write(&fs,
        "{\"type\":\"waiting\",\"id\":1,\"token\":5,\"blockers\":[]}\n"
        "{\"type\":\"revoke\",\"lock\":3,\"offset\":0,\"length\":1,"
        "\"mode\":\"shared\",\"token\":5}\r\n"
        "{\"type\":\"granted\",\"id\":9,\"lock\":2,\"token\":4,\"offset\":0,"
        "\"length\":1,\"mode\":\"shared\"}\n"
        "{\"type\":\"granted\",\"id\":1,\"lock\":7,\"token\":5,\"offset\":0,"
        "\"length\":4096,\"mode\":\"exclusive\"}\n"
        "{\"type\":\"renewed\",\"id\":2,\"lease-ms\":1000}\n");
    extlock_msg_init(&req, EXTLOCK_MSG_LOCK);
    req.length = 4096;
    req.mode = EXTLOCK_MODE_EXCLUSIVE;
    extlock_msg_init(&reply, EXTLOCK_MSG_INVALID);
    assert_true(extlock_conn_call(conn, &req, &reply, 5000, &err));
    assert_true(req.has_id);
    assert_int_equal(req.id, 1);
    assert_int_equal(reply.type, EXTLOCK_MSG_GRANTED);
    assert_int_equal(reply.id, 1);
    assert_int_equal(reply.lock, 7);
    assert_int_equal(extlock_conn_next_id(conn), 2);
    sent = fake_read(&fs);
    assert_string_equal(sent, "{\"type\":\"lock\",\"id\":1,\"offset\":0,"
                        "\"length\":4096,\"mode\":\"exclusive\","
                        "\"wait\":true}\n");

    /* the next reply is already buffered */
    assert_true(extlock_conn_has_buffered(conn));
    assert_true(extlock_conn_recv(conn, &reply, 0, &err));
    assert_int_equal(reply.type, EXTLOCK_MSG_RENEWED);
    assert_false(extlock_conn_has_buffered(conn));

    /* an explicit id moves the counter on */
    extlock_msg_clear(&req);
    extlock_msg_init(&req, EXTLOCK_MSG_RENEW);
    req.has_id = true;
    req.id = 41;
    assert_true(extlock_conn_send(conn, &req, &err));
    assert_int_equal(extlock_conn_next_id(conn), 42);
    g_free(sent);
    sent = fake_read(&fs);
    assert_string_equal(sent, "{\"type\":\"renew\",\"id\":41}\n");

    extlock_msg_clear(&reply);
    extlock_conn_close(conn);
    fake_close(&fs);
}

typedef struct BigWrite {
    int fd;
    const char *text;
} BigWrite;

static gpointer big_write_thread(gpointer opaque)
{
    BigWrite *bw = opaque;
    size_t len = strlen(bw->text), done = 0;

    while (done < len) {
        ssize_t n = write(bw->fd, bw->text + done, len - done);

        if (n <= 0) {
            return GINT_TO_POINTER(1);
        }
        done += n;
    }
    return GINT_TO_POINTER(0);
}

static void test_client_recv_errors(void **state)
{
    FakeServer fs;
    g_autoptr(GError) err = NULL;
    ExtlockConn *conn;
    ExtlockMsg msg;
    gint64 t0;
    GString *big = g_string_new(NULL);
    json_object *v;

    fake_listen_unix(&fs);
    /* a plain path is a UNIX socket */
    conn = extlock_conn_connect(fs.path, &err);
    assert_non_null(conn);
    fake_accept(&fs);
    extlock_msg_init(&msg, EXTLOCK_MSG_INVALID);

    /* timeout */
    t0 = g_get_monotonic_time();
    assert_false(extlock_conn_recv(conn, &msg, 50, &err));
    assert_true(g_error_matches(err, G_IO_ERROR, G_IO_ERROR_TIMED_OUT));
    assert_true(g_get_monotonic_time() - t0 >= 50 * 1000);
    g_clear_error(&err);

    /* a reply much longer than EXTLOCK_MAX_LINE, in pieces */
    g_string_append(big, "{\"type\":\"status-reply\",\"id\":3,\"status\":{"
                    "\"pad\":\"");
    while (big->len < 5 * EXTLOCK_MAX_LINE) {
        g_string_append(big, "0123456789abcdef");
    }
    g_string_append(big, "\",\"epoch\":12}}\n");
    {
        /* more than the socket buffer: written while the client reads */
        BigWrite bw = { .fd = fs.fd, .text = big->str };
        GThread *th = g_thread_new("writer", big_write_thread, &bw);

        assert_true(extlock_conn_recv(conn, &msg, 5000, &err));
        assert_int_equal(GPOINTER_TO_INT(g_thread_join(th)), 0);
    }
    assert_int_equal(msg.type, EXTLOCK_MSG_STATUS_REPLY);
    assert_true(json_object_object_get_ex(msg.body, "epoch", &v));
    assert_int_equal(json_object_get_int(v), 12);
    g_string_free(big, true);

    /* garbage is an error, and the next line is still read */
    fake_write(&fs, "garbage\n{\"type\":\"goodbye\",\"id\":4}\n");
    assert_false(extlock_conn_recv(conn, &msg, 5000, &err));
    assert_true(g_error_matches(err, G_IO_ERROR, G_IO_ERROR_INVALID_DATA));
    assert_non_null(strstr(err->message, "parse-error"));
    g_clear_error(&err);
    assert_true(extlock_conn_recv(conn, &msg, 5000, &err));
    assert_int_equal(msg.type, EXTLOCK_MSG_GOODBYE);

    /* end of stream */
    close(fs.fd);
    fs.fd = -1;
    assert_false(extlock_conn_recv(conn, &msg, 5000, &err));
    assert_true(g_error_matches(err, G_IO_ERROR, G_IO_ERROR_CLOSED));
    g_clear_error(&err);
    assert_false(extlock_conn_fill(conn, &err));
    g_clear_error(&err);

    extlock_msg_clear(&msg);
    extlock_conn_close(conn);
    fake_close(&fs);
}

static void test_client_hello(void **state)
{
    FakeServer fs;
    g_autoptr(GError) err = NULL;
    g_autofree char *sent = NULL;
    ExtlockConn *conn;
    ExtlockMsg welcome;

    fake_listen_unix(&fs);
    conn = extlock_conn_connect(fs.path, &err);
    assert_non_null(conn);
    fake_accept(&fs);
    extlock_msg_init(&welcome, EXTLOCK_MSG_INVALID);

    fake_write(&fs, "{\"type\":\"error\",\"id\":1,\"code\":"
               "\"unsupported-version\",\"message\":\"nope\"}\n");
    assert_false(extlock_conn_hello(conn, "c", "s", 0, &welcome, &err));
    assert_non_null(strstr(err->message, "unsupported-version"));
    assert_non_null(strstr(err->message, "nope"));
    g_clear_error(&err);
    sent = fake_read(&fs);
    assert_string_equal(sent, "{\"type\":\"hello\",\"id\":1,\"version\":2,"
                        "\"client-id\":\"c\",\"lock-space\":\"s\"}\n");

    fake_write(&fs, "{\"type\":\"welcome\",\"id\":2,\"version\":1,"
               "\"session\":\"abc\",\"lease-ms\":500,\"epoch\":7}\n");
    assert_true(extlock_conn_hello(conn, "c", "s", 500, &welcome, &err));
    assert_int_equal(welcome.type, EXTLOCK_MSG_WELCOME);
    assert_string_equal(welcome.session, "abc");
    assert_int_equal(welcome.epoch, 7);
    extlock_msg_clear(&welcome);

    extlock_conn_close(conn);
    fake_close(&fs);
}

static void test_client_tcp(void **state)
{
    struct sockaddr_in sa = { .sin_family = AF_INET };
    socklen_t salen = sizeof(sa);
    g_autoptr(GError) err = NULL;
    g_autofree char *addr = NULL;
    int lfd, one = 0;
    socklen_t olen = sizeof(one);
    ExtlockConn *conn;

    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    lfd = socket(AF_INET, SOCK_STREAM, 0);
    assert_int_equal(bind(lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(lfd, 4), 0);
    assert_int_equal(getsockname(lfd, (struct sockaddr *)&sa, &salen), 0);

    addr = g_strdup_printf("tcp:127.0.0.1:%d", ntohs(sa.sin_port));
    conn = extlock_conn_connect(addr, &err);
    assert_non_null(conn);
    assert_int_equal(getsockopt(extlock_conn_fd(conn), IPPROTO_TCP,
                                TCP_NODELAY, &one, &olen), 0);
    assert_int_equal(one, 1);
    extlock_conn_close(conn);
    g_free(addr);

    addr = g_strdup_printf("tcp:[::1]:%d", ntohs(sa.sin_port));
    conn = extlock_conn_connect(addr, &err);
    /* nothing listens on ::1 (or there is no IPv6): refused */
    assert_null(conn);
    assert_non_null(strstr(err->message, "cannot connect to tcp:[::1]:"));
    g_clear_error(&err);
    close(lfd);
}

static void test_client_connect_errors(void **state)
{
    static const struct {
        const char *addr;
        const char *message;
    } cases[] = {
        { "unix:/nonexistent-extlock/x.sock",
          "cannot connect to unix:/nonexistent-extlock/x.sock: "
          "No such file or directory" },
        { "/nonexistent-extlock/y.sock",
          "cannot connect to /nonexistent-extlock/y.sock: "
          "No such file or directory" },
        { "tcp:localhost", "cannot connect to tcp:localhost: expected "
          "tcp:HOST:PORT" },
        { "tcp::80", "cannot connect to tcp::80: expected tcp:HOST:PORT" },
        { "tcp:[::1:80", "cannot connect to tcp:[::1:80: expected "
          "tcp:HOST:PORT" },
        { "", "empty coordinator address" },
    };
    size_t i;

    for (i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_autoptr(GError) err = NULL;
        ExtlockConn *conn = extlock_conn_connect(cases[i].addr, &err);

        assert_null(conn);
        assert_non_null(err);
        assert_string_equal(err->message, cases[i].message);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_all_types),
        cmocka_unit_test(test_format_parse_fields),
        cmocka_unit_test(test_parse_fields),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_fast_path_equivalence),
        cmocka_unit_test(test_bad_embedded_nul),
        cmocka_unit_test(test_name_length),
        cmocka_unit_test(test_escaping),
        cmocka_unit_test(test_format_error),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_linebuf_split),
        cmocka_unit_test(test_linebuf_limit_exact),
        cmocka_unit_test(test_linebuf_oversized),
        cmocka_unit_test(test_linebuf_max),
        cmocka_unit_test(test_linebuf_bounded),
        cmocka_unit_test(test_client_call),
        cmocka_unit_test(test_client_recv_errors),
        cmocka_unit_test(test_client_hello),
        cmocka_unit_test(test_client_tcp),
        cmocka_unit_test(test_client_connect_errors),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
