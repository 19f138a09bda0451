/*
 * Unit tests of the state writer (contrib/extlockd/state-writer.c)
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
#include <glib.h>
#include <glib/gstdio.h>

#include "state-writer.h"

#define ROUNDS 50

typedef struct Done {
    uint64_t gen;               /* newest generation reported durable */
    unsigned failures;
} Done;

static void on_done(uint64_t gen, bool ok, const char *error, void *opaque)
{
    Done *d = opaque;

    if (ok) {
        d->gen = MAX(d->gen, gen);
    } else {
        d->failures++;
    }
}

/*
 * A snapshot queued for the writer thread, then a synchronous write
 * (the server saves a new epoch or a longer lease right after a hello
 * deferred its welcome): the synchronous write holds everything the
 * queued snapshot did, so the writer thread rightly skips the older
 * snapshot - but the generation of the queued snapshot must still be
 * reported durable, or the welcome waiting for it is never sent.
 *
 * Whether the writer thread takes the snapshot before write_now() does is
 * up to the scheduler; ROUNDS rounds make the losing order (write_now
 * first) happen.  Before the fix, write_now() reported nothing and the
 * writer thread reported nothing for a skipped snapshot: the rounds that
 * took that order never saw their generation reported (on this machine
 * the first round or so, every run).  The wait for the report is bounded
 * only as a hang guard: there is no later write that could report it.
 */
static void test_skipped_generation_reported(void **state)
{
    g_autofree char *dir = g_dir_make_tmp("test-state-writer-XXXXXX", NULL);
    g_autofree char *path = g_build_filename(dir, "state", NULL);
    Done d = { 0 };
    ExtlockdStateWriter *w = extlockd_state_writer_new(path, on_done, &d);
    unsigned lost = 0;

    for (unsigned i = 0; i < ROUNDS; i++) {
        GError *err = NULL;
        uint64_t gen = extlockd_state_writer_submit(
            w, g_strdup_printf("{\"round\":%u,\"async\":true}\n", i));
        gint64 deadline;

        assert_true(extlockd_state_writer_write_now(
            w, g_strdup_printf("{\"round\":%u}\n", i), &err));
        /* Everything the writer reports arrives in the main context */
        deadline = g_get_monotonic_time() + 10 * G_USEC_PER_SEC;
        while (d.gen < gen && g_get_monotonic_time() < deadline) {
            g_main_context_iteration(NULL, FALSE);
            g_usleep(1000);
        }
        if (d.gen < gen) {
            lost++;
            print_message("round %u: generation %" G_GUINT64_FORMAT
                          " never reported (newest %" G_GUINT64_FORMAT ")\n",
                          i, gen, d.gen);
            break;
        }
    }
    assert_int_equal(lost, 0);
    assert_int_equal(d.failures, 0);
    extlockd_state_writer_free(w);
    g_unlink(path);
    g_rmdir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_skipped_generation_reported),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
