/*
 * extlockd: the event log, a history of lock grants and releases
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * With --event-log=FILE, extlockd appends one JSON object per line to
 * FILE for every change of who holds what, so that a checker can compare
 * the coordinator's history with the I/O the clients did (the nemesis
 * tests do).  Each line is written with one write(2) on a file opened with
 * O_APPEND, so it is complete in the file (and visible to readers) when
 * the call returns:
 *
 *   {"ts":<CLOCK_MONOTONIC ns>,"event":E,"lock-space":S,"client-id":C,
 *    "session":ID,"lock":L,"token":T,"offset":O,"length":N,"mode":M,
 *    "message":TEXT}
 *
 * E is one of wait, grant, release, downgrade, reclaim (a lock), expire,
 * fence-start, fence-ok, fence-failed (a session); members that do not
 * apply are left out.  docs/extlockd.rst describes when each is written.
 */
#ifndef EXTLOCKD_EVENT_LOG_H
#define EXTLOCKD_EVENT_LOG_H

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>

#include "extlock/extent.h"

typedef struct ExtlockdEventLog ExtlockdEventLog;

/* One event; strings may be NULL (left out), has_lock covers lock..mode */
typedef struct ExtlockdEvent {
    const char *event;
    const char *lock_space;
    const char *client_id;
    const char *session;
    bool has_lock;
    uint64_t lock;
    uint64_t token;
    uint64_t offset;
    uint64_t length;
    ExtlockMode mode;
    const char *message;
} ExtlockdEvent;

/* Open (create, append to) @path; NULL with @errp set on failure */
ExtlockdEventLog *extlockd_event_log_open(const char *path, GError **errp);

/* Close the file; NULL is allowed */
void extlockd_event_log_close(ExtlockdEventLog *log);

/*
 * Append @ev stamped with the current CLOCK_MONOTONIC time.  Does nothing
 * if @log is NULL.  A failed write is reported once with g_warning (the
 * coordinator goes on: the log is a diagnostic, not part of the state).
 */
void extlockd_event_log_write(ExtlockdEventLog *log, const ExtlockdEvent *ev);

/* The current CLOCK_MONOTONIC time in nanoseconds, as used in the log */
int64_t extlockd_event_log_now_ns(void);

#endif /* EXTLOCKD_EVENT_LOG_H */
