/*
 * extlockd: persistent state (the token epoch) in a small JSON file
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The file holds {"version":1,"epoch":N,"sessions":[...]}.  The daemon
 * bumps the epoch on every start and whenever the 40-bit token counter
 * wraps, and writes it back atomically (temporary file, fsync, rename,
 * fsync of the directory) before it hands out a single token of the new
 * epoch.  "sessions" lists the sessions that existed when the file was
 * last written (it is rewritten whenever a session is created or
 * destroyed), so that after a crash their clients can reclaim their locks
 * during a grace period.  It is left out when there are none; files
 * written before sessions were recorded have no "sessions" member.
 * Each session records its "lease-ms" (the grace period must cover the
 * longest of them); files written before that lack it.
 * Each session also records its owner identity and a hash of its resume
 * secret (never the secret itself); the file is created with mode 0600.
 */
#ifndef EXTLOCKD_STATE_FILE_H
#define EXTLOCKD_STATE_FILE_H

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>

#define EXTLOCKD_STATE_VERSION  1

/* token = (epoch << 40) | counter; tokens must stay below 2^63 */
#define EXTLOCKD_COUNTER_BITS   40
#define EXTLOCKD_COUNTER_LIMIT  (UINT64_C(1) << EXTLOCKD_COUNTER_BITS)
#define EXTLOCKD_EPOCH_LIMIT    (UINT64_C(1) << 23)

/* A session recorded in the state file */
typedef struct ExtlockdStateSession {
    char *session;               /* 32 lowercase hex digits */
    char *client_id;
    char *lock_space;
    /*
     * The session's lease.  0 when the file does not record it (written
     * by an extlockd from before leases were recorded): the reader must
     * then assume the longest lease a client may ask for.
     */
    uint32_t lease_ms;
    /*
     * The largest fence margin its client was told (welcome
     * "fence-margin-ms"), which its driver's I/O deadline depends on; 0
     * when the file does not record it (older extlockd): the reader then
     * assumes its own --fence-margin-ms.
     */
    uint32_t fence_margin_ms;

    /*
     * The identity that owns the session (see policy.h) and the SHA-256
     * of its resume secret (64 hex digits).  Only such a session may be
     * reclaimed after a restart, and only by that identity presenting the
     * secret.  Both are NULL for sessions of files written before owners
     * were recorded.
     */
    char *owner;
    char *secret_sha256;
} ExtlockdStateSession;

/* Frees the strings and the struct (a GDestroyNotify) */
void extlockd_state_session_free(gpointer p);

/*
 * Take an exclusive advisory lock (flock) on "@path.lock" so that two
 * daemons never share one state file.  Creates the directory of @path if
 * needed.  Returns the lock file descriptor (keep it open for the life of
 * the process), or -1 with @errp set.
 */
int extlockd_state_lock(const char *path, GError **errp);

/*
 * Read the epoch from @path.  A missing file yields epoch 0.  A file that
 * cannot be read or does not hold a valid state object fails with @errp set.
 * Any sessions listed are validated but not returned.
 */
bool extlockd_state_load(const char *path, uint64_t *epoch, GError **errp);

/*
 * Like extlockd_state_load(), and also return the sessions listed in the
 * file in *@sessions (a new GPtrArray of ExtlockdStateSession that frees
 * its elements; empty if the file lists none or is missing).  Session ids
 * must be 32 lowercase hex digits and unique, names 1..256 bytes without
 * control characters, "lease-ms" (optional) an integer in
 * [EXTLOCK_MIN_LEASE_MS, EXTLOCK_MAX_LEASE_MS]; anything else makes the
 * file corrupt.
 */
bool extlockd_state_load_sessions(const char *path, uint64_t *epoch,
                                  GPtrArray **sessions, GError **errp);

/*
 * Read the whole state file @path: its text in *@data (g_free() it) and
 * *@len, or *@data NULL if the file does not exist.  False with @errp set
 * on any other error.
 */
bool extlockd_state_read(const char *path, char **data, size_t *len,
                         GError **errp);

/*
 * Parse @data (@len bytes) as a state object and find its member @name,
 * an array: for the loaders of one member each (maintenance counts,
 * reservations).  Returns the object (json_object_put() it), with *@arr
 * the member or NULL if there is none; NULL with @errp set if @data is
 * not a JSON object or the member is not an array.
 */
struct json_object;
struct json_object *extlockd_state_member_array(const char *data, size_t len,
                                                const char *name,
                                                struct json_object **arr,
                                                GError **errp);

/*
 * The same on the text @data (@len bytes) of a state object; @path names
 * it in error messages (the HA coordinator keeps the text in etcd)
 */
bool extlockd_state_parse(const char *path, const char *data, size_t len,
                          uint64_t *epoch, GPtrArray **sessions,
                          GError **errp);

/*
 * Atomically replace @path with a state object holding @epoch and no
 * sessions, and make it durable.  Creates the directory if needed.
 */
bool extlockd_state_save(const char *path, uint64_t epoch, GError **errp);

/*
 * The same with the @n sessions in @sessions (may be NULL if @n is 0).
 */
bool extlockd_state_save_sessions(const char *path, uint64_t epoch,
                                  const ExtlockdStateSession *sessions,
                                  size_t n, GError **errp);

/*
 * The two halves of extlockd_state_save_sessions(): the text of a state
 * object (NULL with @errp set if @epoch is out of range), and the atomic,
 * durable replacement of @path with @text (see state-writer.h)
 */
char *extlockd_state_format(uint64_t epoch,
                            const ExtlockdStateSession *sessions, size_t n,
                            GError **errp);
bool extlockd_state_write_text(const char *path, const char *text,
                               GError **errp);

/*
 * A state file that --create-cluster-from moved into an HA cluster keeps
 * its content and gains "moved-to-cluster": the cluster's name.  A
 * single coordinator refuses to start on it (extlockd_state_parse()
 * fails): the cluster holds its sessions, locks and reservations now,
 * and two coordinators granting the same extents would break every
 * guarantee.  extlockd_state_moved_to() returns the name (g_free() it),
 * or NULL for a file that was not moved or is not a JSON object;
 * extlockd_state_mark_moved() returns @data with the member added, or
 * NULL with @errp set.
 */
#define EXTLOCKD_STATE_MOVED_MEMBER "moved-to-cluster"
char *extlockd_state_moved_to(const char *data, size_t len);
char *extlockd_state_mark_moved(const char *path, const char *data,
                                size_t len, const char *cluster,
                                GError **errp);

#endif /* EXTLOCKD_STATE_FILE_H */
