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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_surrogate_state_does_not_leak),
        cmocka_unit_test(test_linebuf_empty),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
