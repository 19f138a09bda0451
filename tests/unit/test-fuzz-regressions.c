/*
 * extlock: regression tests for bugs the fuzz harnesses (tests/fuzz) found
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Each test names the harness and the corpus file that reproduces the bug
 * (tests/fuzz/corpus/<harness>/regress-*).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>
#include <glib.h>
#include "extlock/protocol.h"

static bool parse(const char *line, ExtlockMsg *msg)
{
    ExtlockProtoError err;

    return extlock_msg_parse(line, strlen(line), msg, &err);
}

/*
 * fuzz-protocol, regress-tokener-surrogate: a line that ends inside a
 * \uXXXX surrogate pair left json-c's tokener (shared by every line the
 * thread decodes) with a pending high surrogate, and the next line - in
 * extlockd possibly another client's - decoded with U+FFFD in front of
 * its first \u escape: "\u0064isk" became "\ufffddisk", another
 * lock-space.
 */
static void test_surrogate_state_does_not_leak(void **state)
{
    static const char *const broken[] = {
        "{\"type\":\"status\",\"id\":1,\"x\":\"\\ud800",
        "{\"type\":\"status\",\"id\":1,\"x\":\"\\udbff\\",
        "{\"type\":\"status\",\"id\":1,\"x\":\"\\ud800\\u00",
        "{\"type\":\"status\",\"id\":1,\"x\":\"\\ud800\" 7",
    };
    static const char hello[] =
        "{\"type\":\"hello\",\"id\":2,\"version\":1,\"client-id\":"
        "\"\\u0041/disk0\",\"lock-space\":\"\\u0064isk\"}";

    for (size_t i = 0; i < G_N_ELEMENTS(broken); i++) {
        ExtlockMsg m;

        assert_false(parse(broken[i], &m));
        assert_true(parse(hello, &m));
        assert_string_equal(m.client_id, "A/disk0");
        assert_string_equal(m.lock_space, "disk");
        extlock_msg_clear(&m);
    }
}

/*
 * fuzz-protocol, every seed under clang's UBSan: the line buffer did
 * arithmetic on the NULL data pointer of its empty GByteArray ("applying
 * zero offset to null pointer").  Only a UBSan build (scripts/run-tests.sh,
 * build-asan) can fail here; elsewhere this checks the empty-buffer paths.
 */
static void test_linebuf_empty(void **state)
{
    ExtlockLineBuf lb;
    const char *line;
    size_t len;

    extlock_linebuf_init_max(&lb, 8);
    assert_int_equal(extlock_linebuf_next(&lb, &line, &len),
                     EXTLOCK_LINE_NONE);
    extlock_linebuf_append(&lb, "ab", 2);
    assert_int_equal(extlock_linebuf_next(&lb, &line, &len),
                     EXTLOCK_LINE_NONE);
    extlock_linebuf_append(&lb, "\n", 1);
    assert_int_equal(extlock_linebuf_next(&lb, &line, &len),
                     EXTLOCK_LINE_OK);
    assert_int_equal(len, 2);
    assert_memory_equal(line, "ab", 2);
    assert_int_equal(extlock_linebuf_next(&lb, &line, &len),
                     EXTLOCK_LINE_NONE);
    extlock_linebuf_destroy(&lb);
}

/*
 * fuzz-protocol, regress-notification-id: a notification with an "id"
 * decoded with has_id set, which the encoder drops (notifications carry
 * no id), so the round trip changed the message; and a client looking up
 * its pending requests by id could take a "revoke" for a reply.
 */
static void test_notification_id_ignored(void **state)
{
    static const char *const lines[] = {
        "{\"type\":\"session-expired\",\"session\":\"s1\",\"id\":0}",
        "{\"type\":\"revoke\",\"id\":7,\"lock\":1,\"offset\":0,"
        "\"length\":4096,\"mode\":\"shared\",\"token\":5}",
        "{\"type\":\"revoke\",\"id\":-1,\"lock\":1,\"offset\":0,"
        "\"length\":4096,\"mode\":\"shared\",\"token\":5}",
    };

    for (size_t i = 0; i < G_N_ELEMENTS(lines); i++) {
        ExtlockMsg m, m2;
        GString *enc = g_string_new(NULL);

        assert_true(parse(lines[i], &m));
        assert_false(m.has_id);
        extlock_msg_format(&m, enc);
        assert_null(strstr(enc->str, "\"id\""));
        g_string_truncate(enc, enc->len - 1);
        assert_true(parse(enc->str, &m2));
        assert_int_equal(m2.type, m.type);
        assert_false(m2.has_id);
        extlock_msg_clear(&m);
        extlock_msg_clear(&m2);
        g_string_free(enc, TRUE);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_surrogate_state_does_not_leak),
        cmocka_unit_test(test_linebuf_empty),
        cmocka_unit_test(test_notification_id_ignored),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
