/*
 * extlockd: state file writes off the event loop
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * A new session must be in the state file before its client learns about
 * it, which costs a write and two fsyncs.  Done in the event loop, a storm
 * of hellos would stall every renewal behind those fsyncs.  The writer
 * thread takes snapshots (complete state texts) and writes only the newest
 * one it has: any number of submissions while a write is in flight cost
 * one more write.  Each submission gets a generation number; the done
 * callback runs in the main loop with the newest generation that is
 * durable, so the server can then send the welcomes that waited for it.
 *
 * Synchronous writes (the epoch, which must be durable before a token of
 * it is handed out) go through the same writer, in order: a snapshot older
 * than what is on disk is never written.
 */
#ifndef EXTLOCKD_STATE_WRITER_H
#define EXTLOCKD_STATE_WRITER_H

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct ExtlockdStateWriter ExtlockdStateWriter;

/*
 * Called in the main context after a write: every generation up to @gen
 * is durable (@ok) or the write of @gen failed (!@ok, @error says why;
 * the state on disk is the previous one)
 */
typedef void ExtlockdStateDone(uint64_t gen, bool ok, const char *error,
                               void *opaque);

ExtlockdStateWriter *extlockd_state_writer_new(const char *path,
                                               ExtlockdStateDone *done,
                                               void *opaque);
/*
 * A writer that hands each text to @write_fn (in the writer thread)
 * instead of writing a file: the HA coordinator stores it in etcd (ha.h)
 */
#ifndef EXTLOCKD_STATE_WRITE_FN_DEFINED
#define EXTLOCKD_STATE_WRITE_FN_DEFINED
typedef bool ExtlockdStateWriteFn(const char *text, void *opaque,
                                  GError **errp);
#endif
ExtlockdStateWriter *extlockd_state_writer_new_fn(ExtlockdStateWriteFn *fn,
                                                  void *fn_opaque,
                                                  ExtlockdStateDone *done,
                                                  void *opaque);
/* Queue @text (taken over) for writing; returns its generation */
uint64_t extlockd_state_writer_submit(ExtlockdStateWriter *w, char *text);
/* Write @text (taken over) now, waiting for a write in flight first */
bool extlockd_state_writer_write_now(ExtlockdStateWriter *w, char *text,
                                     GError **errp);
/* Write what is queued, stop the thread, free */
void extlockd_state_writer_free(ExtlockdStateWriter *w);

#endif /* EXTLOCKD_STATE_WRITER_H */
