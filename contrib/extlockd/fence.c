/*
 * extlockd: the fence hook (see fence.h)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * One ExtlockdFence runs the agent until it succeeds.  A run has three
 * sources: the child watch (its exit), the output watch (stdout+stderr on
 * one pipe) and the timeout.  The run ends in the child watch: whatever
 * output is still buffered in the pipe is read then, and the pipe is
 * closed (a grandchild keeping it open cannot hold the result back).
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>
#include <glib.h>
#include <glib-unix.h>

#include "fence.h"

struct ExtlockdFencer {
    char *agent;
    uint32_t timeout_ms;
    char **args;
};

struct ExtlockdFence {
    ExtlockdFencer *fr;
    char *plug;
    ExtlockdFenceFunc cb;
    void *opaque;
    ExtlockdFenceState state;
    unsigned attempts;
    unsigned failures;          /* consecutive */
    char *message;
    /* the current run */
    GPid pid;                   /* 0 when no agent runs */
    guint child_watch;
    int out_fd;
    guint out_watch;
    GString *output;
    guint timeout;
    bool timed_out;
    int64_t started_us;
    /* waiting to retry, or to report a failure to spawn */
    guint retry;
};

static void fence_run(ExtlockdFence *f);

bool extlockd_fence_arg_check(const char *arg, GError **errp)
{
    const char *eq = strchr(arg, '=');
    size_t klen;

    if (!eq || eq == arg) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "--fence-arg '%s': expected KEY=VALUE", arg);
        return false;
    }
    if (strlen(arg) > EXTLOCKD_FENCE_MAX_ARG) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "--fence-arg '%.32s...': longer than %d bytes", arg,
                    EXTLOCKD_FENCE_MAX_ARG);
        return false;
    }
    klen = eq - arg;
    for (size_t i = 0; i < klen; i++) {
        if (!g_ascii_isalnum(arg[i]) && arg[i] != '_' && arg[i] != '-') {
            g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                        "--fence-arg '%s': KEY may only hold letters, "
                        "digits, '_' and '-'", arg);
            return false;
        }
    }
    for (const char *p = eq + 1; *p; p++) {
        if ((unsigned char)*p < 0x20 || *p == 0x7f) {
            g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                        "--fence-arg '%.*s=...': VALUE must not contain "
                        "control characters", (int)klen, arg);
            return false;
        }
    }
    if ((klen == 6 && strncmp(arg, "action", 6) == 0) ||
        (klen == 4 && strncmp(arg, "plug", 4) == 0)) {
        g_set_error(errp, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "--fence-arg '%s': extlockd sets \"%.*s\" itself", arg,
                    (int)klen, arg);
        return false;
    }
    return true;
}

ExtlockdFencer *extlockd_fencer_new(const char *agent, uint32_t timeout_ms,
                                    const char *const *args)
{
    ExtlockdFencer *fr = g_new0(ExtlockdFencer, 1);

    fr->agent = g_strdup(agent);
    fr->timeout_ms = timeout_ms;
    fr->args = g_strdupv((char **)args);
    return fr;
}

void extlockd_fencer_free(ExtlockdFencer *fr)
{
    if (!fr) {
        return;
    }
    g_free(fr->agent);
    g_strfreev(fr->args);
    g_free(fr);
}

const char *extlockd_fencer_agent(ExtlockdFencer *fr)
{
    return fr->agent;
}

uint32_t extlockd_fencer_timeout_ms(ExtlockdFencer *fr)
{
    return fr->timeout_ms;
}

ExtlockdFenceState extlockd_fence_state(ExtlockdFence *f)
{
    return f->state;
}

unsigned extlockd_fence_attempts(ExtlockdFence *f)
{
    return f->attempts;
}

const char *extlockd_fence_message(ExtlockdFence *f)
{
    return f->message;
}

uint32_t extlockd_fence_retry_ms(ExtlockdFence *f)
{
    uint32_t cap = MAX(f->fr->timeout_ms, EXTLOCKD_FENCE_RETRY_MIN_MS);
    uint64_t delay = EXTLOCKD_FENCE_RETRY_MIN_MS;

    for (unsigned i = 1; i < f->failures && delay < cap; i++) {
        delay *= 2;
    }
    return MIN(delay, cap);
}

/* The agent's own process group, so that a kill reaches its children */
static void child_setup(gpointer opaque)
{
    setpgid(0, 0);
}

static void reap_only(GPid pid, gint status, gpointer opaque)
{
    g_spawn_close_pid(pid);
}

/*
 * What is left in the pipe after the agent's exit: at most
 * FENCE_DRAIN_READS reads, because a grandchild that inherited the pipe
 * may keep writing; the caller closes the pipe then
 */
#define FENCE_DRAIN_READS   64

static void read_output(ExtlockdFence *f)
{
    char buf[1024];

    for (unsigned reads = 0; reads < FENCE_DRAIN_READS; reads++) {
        ssize_t n = read(f->out_fd, buf, sizeof(buf));

        if (n > 0) {
            size_t keep = MIN((size_t)n, EXTLOCKD_FENCE_MAX_OUTPUT -
                              MIN(f->output->len, EXTLOCKD_FENCE_MAX_OUTPUT));
            g_string_append_len(f->output, buf, keep);
            continue;
        }
        if (n < 0 && errno == EINTR) {
            continue;
        }
        return;                 /* EOF, EAGAIN or an error */
    }
}

static gboolean on_output(gint fd, GIOCondition cond, gpointer opaque)
{
    ExtlockdFence *f = opaque;
    char buf[1024];
    ssize_t n;

    n = read(fd, buf, sizeof(buf));
    if (n > 0) {
        size_t keep = MIN((size_t)n, EXTLOCKD_FENCE_MAX_OUTPUT -
                          MIN(f->output->len, EXTLOCKD_FENCE_MAX_OUTPUT));
        g_string_append_len(f->output, buf, keep);
        return G_SOURCE_CONTINUE;
    }
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
        return G_SOURCE_CONTINUE;
    }
    /* EOF: the exit is still to come */
    f->out_watch = 0;
    return G_SOURCE_REMOVE;
}

static void close_output(ExtlockdFence *f)
{
    if (f->out_watch) {
        g_source_remove(f->out_watch);
        f->out_watch = 0;
    }
    if (f->out_fd >= 0) {
        close(f->out_fd);
        f->out_fd = -1;
    }
}

static void kill_agent(ExtlockdFence *f)
{
    if (f->pid > 0) {
        kill(-f->pid, SIGKILL);
        kill(f->pid, SIGKILL);
    }
}

/*
 * The agent's output as one line of valid UTF-8 (it ends up in JSON):
 * newlines become " | ", other control characters spaces
 */
static char *output_summary(ExtlockdFence *f)
{
    g_autofree char *text = g_strstrip(g_utf8_make_valid(
        f->output ? f->output->str : "", f->output ? f->output->len : 0));
    g_auto(GStrv) lines = NULL;

    if (!*text) {
        return g_strdup("no output");
    }
    for (char *p = text; *p; p++) {
        if ((unsigned char)*p < 0x20 && *p != '\n') {
            *p = ' ';
        }
    }
    lines = g_strsplit(text, "\n", -1);
    return g_strjoinv(" | ", lines);
}

/* Report a failure of the current run and schedule the retry */
static gboolean on_retry(gpointer opaque);

static void fence_failed(ExtlockdFence *f, char *message)
{
    g_free(f->message);
    f->message = message;
    f->state = EXTLOCKD_FENCE_FAILED;
    f->failures++;
    f->retry = g_timeout_add(extlockd_fence_retry_ms(f), on_retry, f);
    /* Last: the callback may cancel @f */
    f->cb(f, EXTLOCKD_FENCE_FAILED, f->message, f->opaque);
}

static void on_agent_exit(GPid pid, gint status, gpointer opaque)
{
    ExtlockdFence *f = opaque;
    g_autoptr(GError) err = NULL;
    g_autofree char *out = NULL;
    int64_t ms = (g_get_monotonic_time() - f->started_us) / 1000;

    g_spawn_close_pid(pid);
    f->pid = 0;
    f->child_watch = 0;
    if (f->timeout) {
        g_source_remove(f->timeout);
        f->timeout = 0;
    }
    if (f->out_fd >= 0) {
        read_output(f);
    }
    close_output(f);
    out = output_summary(f);

    if (f->timed_out) {
        fence_failed(f, g_strdup_printf("agent %s timed out after %u ms "
                                        "and was killed (output: %s)",
                                        f->fr->agent, f->fr->timeout_ms,
                                        out));
        return;
    }
    if (!g_spawn_check_wait_status(status, &err)) {
        fence_failed(f, g_strdup_printf("agent %s failed after %"
                                        G_GINT64_FORMAT " ms: %s (output: %s)",
                                        f->fr->agent, ms, err->message,
                                        out));
        return;
    }
    g_free(f->message);
    f->message = g_strdup_printf("agent %s succeeded after %" G_GINT64_FORMAT
                                 " ms (output: %s)", f->fr->agent, ms, out);
    f->state = EXTLOCKD_FENCE_OK;
    f->failures = 0;
    f->cb(f, EXTLOCKD_FENCE_OK, f->message, f->opaque);
}

static gboolean on_timeout(gpointer opaque)
{
    ExtlockdFence *f = opaque;

    f->timeout = 0;
    f->timed_out = true;
    kill_agent(f);
    /* on_agent_exit reports it */
    return G_SOURCE_REMOVE;
}

static gboolean on_spawn_error(gpointer opaque)
{
    ExtlockdFence *f = opaque;
    char *message = f->message;

    f->retry = 0;
    f->message = NULL;
    fence_failed(f, message);
    return G_SOURCE_REMOVE;
}

static gboolean on_retry(gpointer opaque)
{
    ExtlockdFence *f = opaque;

    f->retry = 0;
    fence_run(f);
    if (f->state == EXTLOCKD_FENCE_RUNNING) {
        f->cb(f, EXTLOCKD_FENCE_RUNNING, NULL, f->opaque);
    }
    return G_SOURCE_REMOVE;
}

static char *stdin_text(ExtlockdFence *f)
{
    GString *in = g_string_new(NULL);

    g_string_append_printf(in, "action=off\nplug=%s\n", f->plug);
    for (int i = 0; f->fr->args && f->fr->args[i]; i++) {
        g_string_append_printf(in, "%s\n", f->fr->args[i]);
    }
    return g_string_free(in, FALSE);
}

/* Start one run; a failure to start is reported from an idle source */
static void fence_run(ExtlockdFence *f)
{
    const char *argv[] = { f->fr->agent, NULL };
    g_autoptr(GError) err = NULL;
    g_autofree char *text = stdin_text(f);
    int out[2];
    int in_fd = -1;
    size_t done = 0;

    f->attempts++;
    f->state = EXTLOCKD_FENCE_RUNNING;
    f->timed_out = false;
    f->started_us = g_get_monotonic_time();
    if (f->output) {
        g_string_truncate(f->output, 0);
    } else {
        f->output = g_string_new(NULL);
    }
    if (!g_unix_open_pipe(out, FD_CLOEXEC, &err)) {
        goto fail;
    }
    if (!g_spawn_async_with_pipes_and_fds(NULL, argv, NULL,
                                          G_SPAWN_DO_NOT_REAP_CHILD,
                                          child_setup, NULL, -1, out[1],
                                          out[1], NULL, NULL, 0, &f->pid,
                                          &in_fd, NULL, NULL, &err)) {
        close(out[0]);
        close(out[1]);
        goto fail;
    }
    close(out[1]);
    f->out_fd = out[0];
    g_unix_set_fd_nonblocking(f->out_fd, TRUE, NULL);
    f->out_watch = g_unix_fd_add(f->out_fd, G_IO_IN | G_IO_HUP | G_IO_ERR,
                                 on_output, f);
    f->child_watch = g_child_watch_add(f->pid, on_agent_exit, f);
    f->timeout = g_timeout_add(f->fr->timeout_ms, on_timeout, f);

    /*
     * A few hundred bytes into an empty pipe: written at once.  The pipe
     * is non-blocking, so an agent that does not read cannot stall us.
     */
    g_unix_set_fd_nonblocking(in_fd, TRUE, NULL);
    while (done < strlen(text)) {
        ssize_t n = write(in_fd, text + done, strlen(text) - done);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            break;              /* it exited or does not read: its choice */
        }
        done += n;
    }
    close(in_fd);
    return;

fail:
    g_free(f->message);
    f->message = g_strdup_printf("cannot run agent %s: %s", f->fr->agent,
                                 err->message);
    f->retry = g_idle_add(on_spawn_error, f);
}

ExtlockdFence *extlockd_fence_start(ExtlockdFencer *fr, const char *plug,
                                    ExtlockdFenceFunc cb, void *opaque)
{
    ExtlockdFence *f = g_new0(ExtlockdFence, 1);

    f->fr = fr;
    f->plug = g_strdup(plug);
    f->cb = cb;
    f->opaque = opaque;
    f->out_fd = -1;
    fence_run(f);
    return f;
}

void extlockd_fence_cancel(ExtlockdFence *f)
{
    if (!f) {
        return;
    }
    if (f->pid > 0) {
        kill_agent(f);
        g_source_remove(f->child_watch);
        /* Nobody waits for the result, but the zombie is reaped */
        g_child_watch_add(f->pid, reap_only, NULL);
    }
    if (f->timeout) {
        g_source_remove(f->timeout);
    }
    if (f->retry) {
        g_source_remove(f->retry);
    }
    close_output(f);
    if (f->output) {
        g_string_free(f->output, TRUE);
    }
    g_free(f->message);
    g_free(f->plug);
    g_free(f);
}
