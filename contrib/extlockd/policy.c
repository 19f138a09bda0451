/*
 * extlockd: identities and the authorization policy (see policy.h)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <limits.h>
#include <string.h>
#include <unistd.h>
#include <glib.h>

#include "policy.h"

#define GROUP_PREFIX "identity "

typedef struct PolicyEntry {
    char **lock_spaces;          /* glob patterns */
    char **client_ids;
    bool admin;
    unsigned actions;            /* EXTLOCKD_ACTION_* bits */
    unsigned max_registrations;
    unsigned max_lock_spaces;
} PolicyEntry;

static const char *const action_names[EXTLOCKD_ACTION__COUNT] = {
    [EXTLOCKD_ACTION_READ] = "read",
    [EXTLOCKD_ACTION_WRITE] = "write",
    [EXTLOCKD_ACTION_RESERVE] = "reserve",
    [EXTLOCKD_ACTION_FREEZE] = "freeze",
    [EXTLOCKD_ACTION_MAINTAIN] = "maintain",
};

const char *extlockd_action_name(ExtlockdAction a)
{
    return (unsigned)a < EXTLOCKD_ACTION__COUNT ? action_names[a] : "?";
}

static bool parse_actions(GKeyFile *kf, const char *group, const char *path,
                          unsigned *actions, GError **errp)
{
    g_autoptr(GError) err = NULL;
    g_auto(GStrv) list = g_key_file_get_string_list(kf, group, "allow", NULL,
                                                    &err);

    *actions = 0;
    if (!list) {
        g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                    "%s: [%s] allow: %s", path, group, err->message);
        return false;
    }
    for (char **a = list; *a; a++) {
        unsigned i;

        for (i = 0; i < EXTLOCKD_ACTION__COUNT; i++) {
            if (strcmp(*a, action_names[i]) == 0) {
                break;
            }
        }
        if (i == EXTLOCKD_ACTION__COUNT) {
            g_set_error(errp, G_KEY_FILE_ERROR,
                        G_KEY_FILE_ERROR_INVALID_VALUE,
                        "%s: [%s] allow: unknown action \"%s\" (expected "
                        "read, write, reserve, freeze, maintain)", path,
                        group, *a);
            return false;
        }
        *actions |= 1u << i;
    }
    return true;
}

struct ExtlockdPolicy {
    char *path;                  /* NULL: default policy */
    GHashTable *entries;         /* identity -> PolicyEntry */
    char *self_uid;              /* "uid:N" of the daemon */
};

static void entry_free(gpointer p)
{
    PolicyEntry *e = p;

    g_strfreev(e->lock_spaces);
    g_strfreev(e->client_ids);
    g_free(e);
}

static char **get_patterns(GKeyFile *kf, const char *group, const char *key,
                           const char *path, GError **errp)
{
    g_autoptr(GError) err = NULL;
    char **list = g_key_file_get_string_list(kf, group, key, NULL, &err);

    if (!list) {
        g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                    "%s: [%s] needs \"%s\", a ;-separated list of glob "
                    "patterns: %s", path, group, key, err->message);
        return NULL;
    }
    for (char **p = list; *p; p++) {
        if (!**p) {
            g_set_error(errp, G_KEY_FILE_ERROR,
                        G_KEY_FILE_ERROR_INVALID_VALUE,
                        "%s: [%s] %s has an empty pattern", path, group,
                        key);
            g_strfreev(list);
            return NULL;
        }
    }
    return list;
}

/* The number @key of @group, from 0 to @cap, into *@value if it is there */
static bool parse_count(GKeyFile *kf, const char *group, const char *key,
                        const char *path, unsigned cap, unsigned *value,
                        GError **errp)
{
    g_autofree char *v = NULL;
    guint64 n;

    if (!g_key_file_has_key(kf, group, key, NULL)) {
        return true;
    }
    v = g_key_file_get_value(kf, group, key, NULL);
    if (!v || !g_ascii_string_to_unsigned(v, 10, 0, cap, &n, NULL)) {
        g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE,
                    "%s: [%s] %s must be a number from 0 to %u, not \"%s\"",
                    path, group, key, cap, v ? v : "");
        return false;
    }
    *value = n;
    return true;
}

static bool parse_group(ExtlockdPolicy *p, GKeyFile *kf, const char *group,
                        GError **errp)
{
    const char *identity = group + strlen(GROUP_PREFIX);
    g_auto(GStrv) keys = NULL;
    PolicyEntry *e;

    if (!g_str_has_prefix(group, GROUP_PREFIX) || !identity[0]) {
        g_set_error(errp, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_GROUP_NOT_FOUND,
                    "%s: unknown group [%s] (expected [identity NAME], e.g. "
                    "[identity x509:host-a] or [identity uid:1000])",
                    p->path, group);
        return false;
    }
    keys = g_key_file_get_keys(kf, group, NULL, NULL);
    for (char **k = keys; k && *k; k++) {
        if (strcmp(*k, "lock-spaces") != 0 && strcmp(*k, "client-ids") != 0 &&
            strcmp(*k, "admin") != 0 && strcmp(*k, "allow") != 0 &&
            strcmp(*k, "max-registrations") != 0 &&
            strcmp(*k, "max-lock-spaces") != 0) {
            g_set_error(errp, G_KEY_FILE_ERROR,
                        G_KEY_FILE_ERROR_KEY_NOT_FOUND,
                        "%s: [%s]: unknown key \"%s\" (expected lock-spaces, "
                        "client-ids, admin, allow, max-registrations, "
                        "max-lock-spaces)", p->path, group, *k);
            return false;
        }
    }
    e = g_new0(PolicyEntry, 1);
    e->actions = EXTLOCKD_ACTIONS_ALL;
    e->max_registrations = EXTLOCKD_DEFAULT_MAX_REGISTRATIONS;
    e->max_lock_spaces = EXTLOCKD_DEFAULT_MAX_LOCK_SPACES;
    g_hash_table_insert(p->entries, g_strdup(identity), e);
    e->lock_spaces = get_patterns(kf, group, "lock-spaces", p->path, errp);
    if (!e->lock_spaces) {
        return false;
    }
    e->client_ids = get_patterns(kf, group, "client-ids", p->path, errp);
    if (!e->client_ids) {
        return false;
    }
    if (g_key_file_has_key(kf, group, "admin", NULL)) {
        g_autoptr(GError) err = NULL;

        e->admin = g_key_file_get_boolean(kf, group, "admin", &err);
        if (err) {
            g_set_error(errp, G_KEY_FILE_ERROR,
                        G_KEY_FILE_ERROR_INVALID_VALUE,
                        "%s: [%s] admin must be true or false", p->path,
                        group);
            return false;
        }
    }
    if (g_key_file_has_key(kf, group, "allow", NULL) &&
        !parse_actions(kf, group, p->path, &e->actions, errp)) {
        return false;
    }
    if (!parse_count(kf, group, "max-registrations", p->path,
                     EXTLOCKD_MAX_REGISTRATIONS_CAP, &e->max_registrations,
                     errp) ||
        !parse_count(kf, group, "max-lock-spaces", p->path,
                     EXTLOCKD_MAX_LOCK_SPACES_CAP, &e->max_lock_spaces,
                     errp)) {
        return false;
    }
    return true;
}

ExtlockdPolicy *extlockd_policy_load(const char *path, GError **errp)
{
    ExtlockdPolicy *p = g_new0(ExtlockdPolicy, 1);
    g_autoptr(GKeyFile) kf = NULL;
    g_auto(GStrv) groups = NULL;

    p->entries = g_hash_table_new_full(g_str_hash, g_str_equal, g_free,
                                       entry_free);
    p->self_uid = g_strdup_printf("uid:%u", (unsigned)getuid());
    if (!path) {
        return p;
    }
    p->path = g_strdup(path);
    kf = g_key_file_new();
    if (!g_key_file_load_from_file(kf, path, G_KEY_FILE_NONE, errp)) {
        g_prefix_error(errp, "policy file %s: ", path);
        extlockd_policy_free(p);
        return NULL;
    }
    groups = g_key_file_get_groups(kf, NULL);
    for (char **g = groups; *g; g++) {
        if (!parse_group(p, kf, *g, errp)) {
            extlockd_policy_free(p);
            return NULL;
        }
    }
    return p;
}

void extlockd_policy_free(ExtlockdPolicy *p)
{
    if (p) {
        g_hash_table_destroy(p->entries);
        g_free(p->self_uid);
        g_free(p->path);
        g_free(p);
    }
}

const char *extlockd_policy_path(const ExtlockdPolicy *p)
{
    return p->path;
}

unsigned extlockd_policy_size(const ExtlockdPolicy *p)
{
    return g_hash_table_size(p->entries);
}

bool extlockd_policy_is_admin(const ExtlockdPolicy *p, const char *identity)
{
    PolicyEntry *e;

    if (strcmp(identity, "uid:0") == 0 ||
        strcmp(identity, p->self_uid) == 0) {
        return true;
    }
    e = g_hash_table_lookup(p->entries, identity);
    return e && e->admin;
}

static bool match_any(char **patterns, const char *s)
{
    for (char **q = patterns; *q; q++) {
        if (g_pattern_match_simple(*q, s)) {
            return true;
        }
    }
    return false;
}

bool extlockd_policy_allows(const ExtlockdPolicy *p, const char *identity,
                            const char *lock_space, const char *client_id,
                            char **why)
{
    PolicyEntry *e;

    if (!p->path) {
        return true;
    }
    e = g_hash_table_lookup(p->entries, identity);
    if (!e) {
        if (strcmp(identity, "uid:0") == 0 ||
            strcmp(identity, p->self_uid) == 0) {
            return true;
        }
        *why = g_strdup_printf("identity %s is not in the policy", identity);
        return false;
    }
    if (!match_any(e->lock_spaces, lock_space)) {
        *why = g_strdup_printf("identity %s may not use lock-space %s",
                               identity, lock_space);
        return false;
    }
    if (!match_any(e->client_ids, client_id)) {
        *why = g_strdup_printf("identity %s may not use client-id %s",
                               identity, client_id);
        return false;
    }
    return true;
}

/* The built-in ones: root and the daemon's uid, without a group */
static bool is_builtin(const ExtlockdPolicy *p, const char *identity)
{
    return strcmp(identity, "uid:0") == 0 ||
           strcmp(identity, p->self_uid) == 0;
}

bool extlockd_policy_may(const ExtlockdPolicy *p, const char *identity,
                         ExtlockdAction action, char **why)
{
    PolicyEntry *e;

    if (!p->path || !identity) {
        return true;
    }
    e = g_hash_table_lookup(p->entries, identity);
    if (!e) {
        if (is_builtin(p, identity)) {
            return true;
        }
        /* Removed from the file by a reload: nothing new */
        *why = g_strdup_printf("identity %s is not in the policy", identity);
        return false;
    }
    if (!(e->actions & (1u << action))) {
        *why = g_strdup_printf("identity %s may not %s (policy: allow)",
                               identity,
                               action == EXTLOCKD_ACTION_READ ?
                               "take shared locks (read)" :
                               action == EXTLOCKD_ACTION_WRITE ?
                               "take exclusive locks (write)" :
                               action == EXTLOCKD_ACTION_RESERVE ?
                               "change persistent reservations (reserve)" :
                               action == EXTLOCKD_ACTION_FREEZE ?
                               "freeze the lock-space (freeze)" :
                               "take the maintenance lock (maintain)");
        return false;
    }
    return true;
}

unsigned extlockd_policy_max_registrations(const ExtlockdPolicy *p,
                                           const char *identity)
{
    PolicyEntry *e;

    if (!p->path || !identity) {
        return EXTLOCKD_MAX_REGISTRATIONS_CAP;
    }
    e = g_hash_table_lookup(p->entries, identity);
    if (!e) {
        return is_builtin(p, identity) ? EXTLOCKD_MAX_REGISTRATIONS_CAP : 0;
    }
    return e->max_registrations;
}

unsigned extlockd_policy_max_lock_spaces(const ExtlockdPolicy *p,
                                         const char *identity)
{
    PolicyEntry *e;

    if (!p->path || !identity) {
        return UINT_MAX;
    }
    e = g_hash_table_lookup(p->entries, identity);
    if (!e) {
        return is_builtin(p, identity) ? UINT_MAX : 0;
    }
    return e->max_lock_spaces;
}
