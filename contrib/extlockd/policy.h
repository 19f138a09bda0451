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
 * every client's details in "status" and send "status" before "hello";
 * "allow" (default: all of them) lists what its sessions may do (read,
 * write, reserve, freeze, maintain: ExtlockdAction below);
 * "max-registrations" (default 8) bounds its SCSI-3 registrations per
 * lock-space, "max-lock-spaces" (default 64) the lock-spaces in which it
 * holds any.
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
 * admin value that is not a boolean, an unknown action in allow,
 * max-registrations or max-lock-spaces out of range.
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
/*
 * What a session may do in its lock-space ("allow" in the policy file;
 * default: everything).  A lock request on the whole lock-space
 * [0, 2^63) is a freeze (shared) or the maintenance lock (exclusive);
 * any other is read (shared) or write (exclusive); reserve is pr-out
 * (pr-in and pr-ack, which only follow the state, are always allowed).
 */
typedef enum ExtlockdAction {
    EXTLOCKD_ACTION_READ,
    EXTLOCKD_ACTION_WRITE,
    EXTLOCKD_ACTION_RESERVE,
    EXTLOCKD_ACTION_FREEZE,
    EXTLOCKD_ACTION_MAINTAIN,
    EXTLOCKD_ACTION__COUNT
} ExtlockdAction;

#define EXTLOCKD_ACTIONS_ALL    ((1u << EXTLOCKD_ACTION__COUNT) - 1)

/*
 * Registrations (SCSI-3 PR) whose client-ids an identity's sessions
 * registered in one lock-space: "max-registrations" (default
 * EXTLOCKD_DEFAULT_MAX_REGISTRATIONS, at most the lock-space's 64).
 * Without a policy file, and for root and the daemon's uid without a
 * group, only the lock-space's limit applies.
 */
#define EXTLOCKD_DEFAULT_MAX_REGISTRATIONS  8
#define EXTLOCKD_MAX_REGISTRATIONS_CAP      64

/*
 * Lock-spaces in which an identity holds registrations (registrations
 * outlive sessions, so without this bound an identity allowed "scratch-*"
 * could leave reservation state in ever more lock-spaces, each kept in
 * memory and in every state file write): "max-lock-spaces" (default
 * EXTLOCKD_DEFAULT_MAX_LOCK_SPACES, at most EXTLOCKD_MAX_LOCK_SPACES_CAP).
 * Without a policy file, and for root and the daemon's uid without a
 * group, there is no such bound.
 */
#define EXTLOCKD_DEFAULT_MAX_LOCK_SPACES    64
#define EXTLOCKD_MAX_LOCK_SPACES_CAP        4096

const char *extlockd_action_name(ExtlockdAction a);

/*
 * May @identity do @action?  If not, returns false and sets *@why to a
 * text for the error reply (free it).
 */
bool extlockd_policy_may(const ExtlockdPolicy *p, const char *identity,
                         ExtlockdAction action, char **why);

/* How many registrations @identity may hold in one lock-space */
unsigned extlockd_policy_max_registrations(const ExtlockdPolicy *p,
                                           const char *identity);

/*
 * In how many lock-spaces @identity may hold registrations (UINT_MAX: no
 * bound)
 */
unsigned extlockd_policy_max_lock_spaces(const ExtlockdPolicy *p,
                                         const char *identity);

bool extlockd_policy_allows(const ExtlockdPolicy *p, const char *identity,
                            const char *lock_space, const char *client_id,
                            char **why);

#endif /* EXTLOCKD_POLICY_H */
