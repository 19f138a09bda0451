/*
 * extlockd: the fence hook - running a fence agent for an expired client
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * With --fence-agent=PATH, when a session's lease lapses while it holds
 * locks, extlockd runs PATH to cut that client off the storage before any
 * of its locks is given to someone else.  The agent speaks the stdin
 * interface of the fence-agents project (fence_dummy, fence_ifmib, ...):
 * it gets no arguments and reads
 *
 *   action=off
 *   plug=<client-id>
 *   KEY=VALUE          (one line per --fence-arg, in order)
 *
 * on its stdin, which is then closed.  Exit status 0 means the client is
 * fenced.  Anything else (another status, a signal, or no exit within
 * --fence-timeout-ms, after which the agent and its process group are
 * killed) is a failure, and the agent is run again after a back-off that
 * starts at EXTLOCKD_FENCE_RETRY_MIN_MS and doubles up to the fence
 * timeout, until it succeeds or the fencing is cancelled.
 *
 * Nothing here blocks the main loop: the agent is spawned, its exit is
 * watched with a child watch, its output (stdout and stderr together,
 * the first EXTLOCKD_FENCE_MAX_OUTPUT bytes kept) with an fd watch, and
 * the timeout and the back-off are timeout sources.
 */
#ifndef EXTLOCKD_FENCE_H
#define EXTLOCKD_FENCE_H

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>

#define EXTLOCKD_DEFAULT_FENCE_TIMEOUT_MS 30000
#define EXTLOCKD_MAX_FENCE_TIMEOUT_MS     (3600 * 1000)
#define EXTLOCKD_FENCE_RETRY_MIN_MS       500
#define EXTLOCKD_FENCE_MAX_OUTPUT         4096
#define EXTLOCKD_FENCE_MAX_ARG            1024  /* one KEY=VALUE */
#define EXTLOCKD_FENCE_MAX_ARGS           64

typedef struct ExtlockdFencer ExtlockdFencer;
typedef struct ExtlockdFence ExtlockdFence;

typedef enum ExtlockdFenceState {
    EXTLOCKD_FENCE_RUNNING,      /* the agent runs */
    EXTLOCKD_FENCE_OK,           /* it exited with status 0 */
    EXTLOCKD_FENCE_FAILED,       /* last run failed; a retry is scheduled */
} ExtlockdFenceState;

/*
 * Called when a retry starts (EXTLOCKD_FENCE_RUNNING; the first run is
 * started by extlockd_fence_start(), which does not call it), when the
 * agent succeeded (EXTLOCKD_FENCE_OK) or failed (EXTLOCKD_FENCE_FAILED).
 * @message says what happened (with the agent's output).  The callback
 * may call extlockd_fence_cancel() on @f.
 */
typedef void (*ExtlockdFenceFunc)(ExtlockdFence *f, ExtlockdFenceState state,
                                  const char *message, void *opaque);

/*
 * Check one --fence-arg: KEY=VALUE with a non-empty KEY of letters,
 * digits, '_' and '-', no control characters, at most
 * EXTLOCKD_FENCE_MAX_ARG bytes, and KEY not "action" or "plug" (set by
 * extlockd).  Returns false with @errp set.
 */
bool extlockd_fence_arg_check(const char *arg, GError **errp);

/* A fencer for @agent (an executable path), @args: NULL-terminated */
ExtlockdFencer *extlockd_fencer_new(const char *agent, uint32_t timeout_ms,
                                    const char *const *args);
void extlockd_fencer_free(ExtlockdFencer *fr);
const char *extlockd_fencer_agent(ExtlockdFencer *fr);
uint32_t extlockd_fencer_timeout_ms(ExtlockdFencer *fr);

/* Start fencing @plug (the client-id): runs the agent at once */
ExtlockdFence *extlockd_fence_start(ExtlockdFencer *fr, const char *plug,
                                    ExtlockdFenceFunc cb, void *opaque);

ExtlockdFenceState extlockd_fence_state(ExtlockdFence *f);
/* Runs started so far (1 for the first) */
unsigned extlockd_fence_attempts(ExtlockdFence *f);
/* What the last finished run said, or NULL */
const char *extlockd_fence_message(ExtlockdFence *f);
/* Delay before the next retry after the failure just reported */
uint32_t extlockd_fence_retry_ms(ExtlockdFence *f);

/*
 * Stop: a running agent is killed (and reaped in the background), no
 * retry happens, the callback is never called again, @f is freed.
 * NULL is allowed.
 */
void extlockd_fence_cancel(ExtlockdFence *f);

#endif /* EXTLOCKD_FENCE_H */
