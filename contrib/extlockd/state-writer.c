/*
 * extlockd: state file writes off the event loop (see state-writer.h)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <inttypes.h>
#include <stdlib.h>
#include <glib.h>

#include "state-file.h"
#include "state-writer.h"

struct ExtlockdStateWriter {
    char *path;
    ExtlockdStateWriteFn *write_fn;  /* instead of the file, or NULL */
    void *write_opaque;
    ExtlockdStateDone *done;
    void *opaque;
    GThread *thread;
    GMutex lock;                 /* protects everything below */
    GCond cond;
    char *pending;               /* newest snapshot not written yet */
    uint64_t pending_gen;
    uint64_t next_gen;
    uint64_t written_gen;        /* newest generation on disk */
    bool writing;                /* the file is being replaced */
    bool quit;
    GList *calls;                /* DoneCall not dispatched yet */
    /* Testing hook: EXTLOCKD_TEST_STATE_DELAY_MS, a slow disk */
    unsigned delay_ms;
};

typedef struct DoneCall {
    ExtlockdStateWriter *w;
    /* our reference: freeing the writer destroys sources not dispatched yet */
    GSource *source;
    uint64_t gen;
    bool ok;
    char *error;
} DoneCall;

static void done_call_free(DoneCall *d)
{
    g_source_unref(d->source);
    g_free(d->error);
    g_free(d);
}

static gboolean done_in_main(gpointer opaque)
{
    DoneCall *d = opaque;
    ExtlockdStateWriter *w = d->w;

    g_mutex_lock(&w->lock);
    w->calls = g_list_remove(w->calls, d);
    g_mutex_unlock(&w->lock);
    w->done(d->gen, d->ok, d->error, w->opaque);
    done_call_free(d);
    return G_SOURCE_REMOVE;
}

/*
 * With w->lock held: have the done callback run in the main context for
 * @gen (@error taken over)
 */
static void post_done(ExtlockdStateWriter *w, uint64_t gen, bool ok,
                      char *error)
{
    DoneCall *d = g_new0(DoneCall, 1);

    d->w = w;
    d->gen = gen;
    d->ok = ok;
    d->error = error;
    /* Not idle priority: a busy loop must not starve welcomes */
    d->source = g_idle_source_new();
    g_source_set_priority(d->source, G_PRIORITY_DEFAULT);
    g_source_set_callback(d->source, done_in_main, d, NULL);
    w->calls = g_list_prepend(w->calls, d);
    g_source_attach(d->source, NULL);
}

/* With w->lock held and w->writing set: write @text without the lock */
static bool write_unlocked(ExtlockdStateWriter *w, const char *text,
                           GError **errp)
{
    bool ok;

    g_mutex_unlock(&w->lock);
    if (w->delay_ms) {
        g_usleep(w->delay_ms * 1000);
    }
    ok = w->write_fn ? w->write_fn(text, w->write_opaque, errp)
                     : extlockd_state_write_text(w->path, text, errp);
    g_mutex_lock(&w->lock);
    return ok;
}

static gpointer writer_thread(gpointer opaque)
{
    ExtlockdStateWriter *w = opaque;

    g_mutex_lock(&w->lock);
    for (;;) {
        g_autoptr(GError) err = NULL;
        g_autofree char *text = NULL;
        uint64_t gen;
        bool ok;

        while ((!w->pending && !w->quit) || w->writing) {
            g_cond_wait(&w->cond, &w->lock);
        }
        if (!w->pending) {
            break;
        }
        text = w->pending;
        gen = w->pending_gen;
        w->pending = NULL;
        if (gen <= w->written_gen) {
            /*
             * A synchronous write was newer: it holds this snapshot's
             * content, and write_now() reported its generation (which
             * covers this one) done
             */
            continue;
        }
        w->writing = true;
        ok = write_unlocked(w, text, &err);
        w->writing = false;
        if (ok) {
            w->written_gen = MAX(w->written_gen, gen);
        }
        g_cond_broadcast(&w->cond);
        if (!w->quit) {
            post_done(w, gen, ok, ok ? NULL : g_strdup(err->message));
        }
    }
    g_mutex_unlock(&w->lock);
    return NULL;
}

ExtlockdStateWriter *extlockd_state_writer_new(const char *path,
                                               ExtlockdStateDone *done,
                                               void *opaque)
{
    ExtlockdStateWriter *w = g_new0(ExtlockdStateWriter, 1);
    const char *delay = g_getenv("EXTLOCKD_TEST_STATE_DELAY_MS");

    w->path = g_strdup(path);
    w->done = done;
    w->opaque = opaque;
    w->next_gen = 1;
    if (delay) {
        w->delay_ms = (unsigned)strtoul(delay, NULL, 10);
    }
    g_mutex_init(&w->lock);
    g_cond_init(&w->cond);
    w->thread = g_thread_new("extlockd-state", writer_thread, w);
    return w;
}

ExtlockdStateWriter *extlockd_state_writer_new_fn(ExtlockdStateWriteFn *fn,
                                                  void *fn_opaque,
                                                  ExtlockdStateDone *done,
                                                  void *opaque)
{
    ExtlockdStateWriter *w;

    /* The thread starts in _new(), but reads write_fn only under w->lock */
    w = extlockd_state_writer_new("(etcd)", done, opaque);
    g_mutex_lock(&w->lock);
    w->write_fn = fn;
    w->write_opaque = fn_opaque;
    g_mutex_unlock(&w->lock);
    return w;
}

uint64_t extlockd_state_writer_submit(ExtlockdStateWriter *w, char *text)
{
    uint64_t gen;

    g_mutex_lock(&w->lock);
    gen = w->next_gen++;
    g_free(w->pending);         /* never written: this one is newer */
    w->pending = text;
    w->pending_gen = gen;
    g_cond_broadcast(&w->cond);
    g_mutex_unlock(&w->lock);
    return gen;
}

bool extlockd_state_writer_write_now(ExtlockdStateWriter *w, char *text,
                                     GError **errp)
{
    uint64_t gen;
    bool ok;

    g_mutex_lock(&w->lock);
    gen = w->next_gen++;
    while (w->writing) {
        g_cond_wait(&w->cond, &w->lock);
    }
    w->writing = true;
    ok = write_unlocked(w, text, errp);
    w->writing = false;
    if (ok) {
        w->written_gen = MAX(w->written_gen, gen);
        /*
         * Every generation before @gen is durable too, a snapshot still
         * queued among them (the writer thread skips it, as older than
         * what is on disk): report it, or the welcomes that wait for those
         * generations wait for some later write
         */
        post_done(w, gen, true, NULL);
    }
    g_cond_broadcast(&w->cond);
    g_mutex_unlock(&w->lock);
    g_free(text);
    return ok;
}

void extlockd_state_writer_free(ExtlockdStateWriter *w)
{
    if (!w) {
        return;
    }
    g_mutex_lock(&w->lock);
    w->quit = true;
    g_cond_broadcast(&w->cond);
    g_mutex_unlock(&w->lock);
    g_thread_join(w->thread);
    /*
     * Completions not dispatched yet would run after we are gone (found by
     * fuzz-dispatch, which frees a server per input): cancel them.  Both
     * this and their dispatch run in the main thread.
     */
    while (w->calls) {
        DoneCall *d = w->calls->data;

        w->calls = g_list_delete_link(w->calls, w->calls);
        g_source_destroy(d->source);
        done_call_free(d);
    }
    g_free(w->pending);
    g_mutex_clear(&w->lock);
    g_cond_clear(&w->cond);
    g_free(w->path);
    g_free(w);
}
