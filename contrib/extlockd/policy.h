/*
 * extlockd: identities and the authorization policy
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Every connection has one authenticated identity, a string:
 *   "uid:N"          a peer on a UNIX socket (SO_PEERCRED)
 *   "x509:CN"        a TLS peer with a verified client certificate (its
 *                    subject's common name; the whole DN if it has none)
 *   "psk:NAME"       a TLS peer that used the pre-shared key of NAME
 *   "anonymous"      a peer on a TCP listener without TLS (--insecure) or
 *                    a TLS peer without a verified certificate
 *                    (--tls-verify-peer=no)
 *
 * The policy file (--policy FILE) is a GKeyFile with one group per
 * identity:
 *
 *   [identity x509:host-a.example.com]
 *   lock-spaces=cluster-disk;scratch-*
 *   client-ids=host-a/shared0;host-a/disk?
 *   admin=false
 *
 * "lock-spaces" and "client-ids" are lists of glob patterns (* and ?) that
 * the identity may use in "hello"; "admin" (default false) lets it see
 * every client's details in "status" and send "status" before "hello".
 * An identity without a group may not say hello.
 *
 * Without a policy file every identity may use every lock-space and
 * client-id.  Always (with or without a file), "uid:0" and the uid the
 * daemon runs as are admins on the UNIX socket: they can read the state
 * file and signal the daemon anyway.
 *
 * Whatever the policy, a session belongs to the identity that created it:
 * only that identity, presenting the session's resume secret, may resume
 * or reclaim it.
 */
#ifndef EXTLOCKD_POLICY_H
#define EXTLOCKD_POLICY_H

#include <glib.h>
#include <stdbool.h>

#define EXTLOCKD_IDENTITY_ANONYMOUS "anonymous"

typedef struct ExtlockdPolicy ExtlockdPolicy;

/*
 * Parse @path (NULL: the built-in default policy described above).
 * Returns NULL with @errp set on any error: unreadable file, syntax, an
 * unknown group or key, a group without lock-spaces or client-ids, an
 * admin value that is not a boolean.
 */
ExtlockdPolicy *extlockd_policy_load(const char *path, GError **errp);
void extlockd_policy_free(ExtlockdPolicy *p);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(ExtlockdPolicy, extlockd_policy_free)

/* The file it was loaded from, or NULL for the default policy */
const char *extlockd_policy_path(const ExtlockdPolicy *p);
/* Number of identities listed in the file */
unsigned extlockd_policy_size(const ExtlockdPolicy *p);

bool extlockd_policy_is_admin(const ExtlockdPolicy *p, const char *identity);

/*
 * May @identity open a session as @client_id in @lock_space?  If not,
 * returns false and sets *@why to a text for the error reply (free it).
 */
bool extlockd_policy_allows(const ExtlockdPolicy *p, const char *identity,
                            const char *lock_space, const char *client_id,
                            char **why);

#endif /* EXTLOCKD_POLICY_H */
