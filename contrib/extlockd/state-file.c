/*
 * extlockd: persistent state (the token epoch) in a small JSON file
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <glib.h>
#include <glib/gstdio.h>
#include <json-c/json.h>

#include "extlock/protocol.h"
#include "state-file.h"

/*
 * A state file lists at most a few thousand sessions of a few hundred
 * bytes each; anything much bigger is certainly corrupt
 */
#define STATE_FILE_MAX_SIZE (64 * 1024 * 1024)
#define STATE_MAX_NAME      256
/* The largest --fence-margin-ms (EXTLOCKD_MAX_FENCE_MS in server.h) */
#define STATE_MAX_FENCE_MS  (3600 * 1000)

void extlockd_state_session_free(gpointer p)
{
    ExtlockdStateSession *ss = p;

    if (ss) {
        g_free(ss->session);
        g_free(ss->client_id);
        g_free(ss->lock_space);
        g_free(ss->owner);
        g_free(ss->secret_sha256);
        g_free(ss);
    }
}

static bool make_parent_dir(const char *path, GError **errp)
{
    g_autofree char *dir = g_path_get_dirname(path);

    if (g_mkdir_with_parents(dir, 0755) < 0) {
        int err = errno;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "cannot create directory %s: %s", dir, g_strerror(err));
        return false;
    }
    return true;
}

int extlockd_state_lock(const char *path, GError **errp)
{
    g_autofree char *lock_path = g_strconcat(path, ".lock", NULL);
    int fd;

    if (!make_parent_dir(path, errp)) {
        return -1;
    }
    fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        int err = errno;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "cannot open %s: %s", lock_path, g_strerror(err));
        return -1;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
        int err = errno;
        if (err == EWOULDBLOCK) {
            g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_EXIST,
                        "state file %s is in use by another extlockd "
                        "(%s is locked)", path, lock_path);
        } else {
            g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                        "cannot lock %s: %s", lock_path, g_strerror(err));
        }
        close(fd);
        return -1;
    }
    return fd;
}

static bool corrupt(GError **errp, const char *path, const char *why)
{
    g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                "state file %s is corrupt: %s (expected "
                "{\"version\":%d,\"epoch\":N,\"sessions\":[...]}; refusing "
                "to start, because guessing the epoch could reuse fencing "
                "tokens)",
                path, why, EXTLOCKD_STATE_VERSION);
    return false;
}

static bool get_int_member(json_object *obj, const char *key,
                           int64_t *value)
{
    json_object *member;

    if (!json_object_object_get_ex(obj, key, &member) ||
        !json_object_is_type(member, json_type_int)) {
        return false;
    }
    errno = 0;
    *value = json_object_get_int64(member);
    /* json-c clamps values beyond the int64 range and sets errno */
    return errno == 0;
}

static bool name_ok(const char *s, size_t len)
{
    if (len == 0 || len > STATE_MAX_NAME) {
        return false;
    }
    for (size_t i = 0; i < len; i++) {
        unsigned char c = s[i];

        if (c < 0x20 || c == 0x7f) {
            return false;
        }
    }
    return true;
}

static bool session_id_ok(const char *s, size_t len)
{
    if (len != 32) {
        return false;
    }
    for (size_t i = 0; i < len; i++) {
        if (!g_ascii_isdigit(s[i]) && !(s[i] >= 'a' && s[i] <= 'f')) {
            return false;
        }
    }
    return true;
}

/* An owner identity: 1..1024 bytes without control characters */
static char *get_owner_member(json_object *obj)
{
    json_object *member;
    const char *s;
    size_t len;

    if (!json_object_object_get_ex(obj, "owner", &member) ||
        !json_object_is_type(member, json_type_string)) {
        return NULL;
    }
    s = json_object_get_string(member);
    len = json_object_get_string_len(member);
    if (len == 0 || len > 1024 || strlen(s) != len) {
        return NULL;
    }
    for (size_t i = 0; i < len; i++) {
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) {
            return NULL;
        }
    }
    return g_strndup(s, len);
}

static char *get_hash_member(json_object *obj)
{
    json_object *member;
    const char *s;

    if (!json_object_object_get_ex(obj, "secret-sha256", &member) ||
        !json_object_is_type(member, json_type_string) ||
        json_object_get_string_len(member) != 64) {
        return NULL;
    }
    s = json_object_get_string(member);
    for (size_t i = 0; i < 64; i++) {
        if (!g_ascii_isdigit(s[i]) && !(s[i] >= 'a' && s[i] <= 'f')) {
            return NULL;
        }
    }
    return g_strndup(s, 64);
}

static char *get_str_member(json_object *obj, const char *key, bool is_id)
{
    json_object *member;
    const char *s;
    size_t len;

    if (!json_object_object_get_ex(obj, key, &member) ||
        !json_object_is_type(member, json_type_string)) {
        return NULL;
    }
    s = json_object_get_string(member);
    len = json_object_get_string_len(member);
    if (strlen(s) != len ||
        !(is_id ? session_id_ok(s, len) : name_ok(s, len))) {
        return NULL;
    }
    return g_strndup(s, len);
}

/*
 * "sessions": an array of {"session","client-id","lock-space","lease-ms"}
 * objects ("lease-ms" is absent in files of older versions)
 */
static const char *parse_sessions(json_object *obj, GPtrArray *out)
{
    g_autoptr(GHashTable) seen = g_hash_table_new(g_str_hash, g_str_equal);
    json_object *arr;
    size_t n;

    if (!json_object_object_get_ex(obj, "sessions", &arr)) {
        return NULL;        /* a file from before sessions were recorded */
    }
    if (!json_object_is_type(arr, json_type_array)) {
        return "\"sessions\" is not an array";
    }
    n = json_object_array_length(arr);
    for (size_t i = 0; i < n; i++) {
        json_object *e = json_object_array_get_idx(arr, i);
        ExtlockdStateSession *ss;

        if (!json_object_is_type(e, json_type_object)) {
            return "an element of \"sessions\" is not an object";
        }
        ss = g_new0(ExtlockdStateSession, 1);
        g_ptr_array_add(out, ss);
        ss->session = get_str_member(e, "session", true);
        ss->client_id = get_str_member(e, "client-id", false);
        ss->lock_space = get_str_member(e, "lock-space", false);
        if (!ss->session) {
            return "a session has a missing or malformed \"session\"";
        }
        if (!ss->client_id || !ss->lock_space) {
            return "a session has a missing or malformed \"client-id\" "
                   "or \"lock-space\"";
        }
        /* Optional (older files): such sessions cannot be reclaimed */
        if (json_object_object_get_ex(e, "owner", NULL) ||
            json_object_object_get_ex(e, "secret-sha256", NULL)) {
            ss->owner = get_owner_member(e);
            ss->secret_sha256 = get_hash_member(e);
            if (!ss->owner || !ss->secret_sha256) {
                return "a session has a malformed \"owner\" or "
                       "\"secret-sha256\"";
            }
        }
        if (!g_hash_table_add(seen, ss->session)) {
            return "a session is listed twice";
        }
        if (json_object_object_get_ex(e, "lease-ms", NULL)) {
            int64_t lease;

            if (!get_int_member(e, "lease-ms", &lease) ||
                lease < EXTLOCK_MIN_LEASE_MS || lease > EXTLOCK_MAX_LEASE_MS) {
                return "a session has a malformed \"lease-ms\"";
            }
            ss->lease_ms = lease;
        }
        if (json_object_object_get_ex(e, "fence-margin-ms", NULL)) {
            int64_t margin;

            if (!get_int_member(e, "fence-margin-ms", &margin) ||
                margin < 1 || margin > STATE_MAX_FENCE_MS) {
                return "a session has a malformed \"fence-margin-ms\"";
            }
            ss->fence_margin_ms = margin;
        }
    }
    return NULL;
}

bool extlockd_state_parse(const char *path, const char *data, size_t len,
                          uint64_t *epoch, GPtrArray **sessions,
                          GError **errp)
{
    g_autoptr(GPtrArray) list =
        g_ptr_array_new_with_free_func(extlockd_state_session_free);
    json_tokener *tok;
    json_object *obj;
    enum json_tokener_error jerr;
    const char *why;
    size_t used;
    int64_t version, value;
    json_object *member;
    bool ok = false;

    if (len == 0) {
        return corrupt(errp, path, "the file is empty");
    }
    if (len > STATE_FILE_MAX_SIZE) {
        return corrupt(errp, path, "the file is too large");
    }
    if (strlen(data) != len) {
        return corrupt(errp, path, "the file contains NUL bytes");
    }

    tok = json_tokener_new();
    json_tokener_set_flags(tok, JSON_TOKENER_STRICT);
    obj = json_tokener_parse_ex(tok, data, (int)len);
    jerr = json_tokener_get_error(tok);
    used = json_tokener_get_parse_end(tok);
    json_tokener_free(tok);

    if (!obj || jerr != json_tokener_success) {
        corrupt(errp, path, "not valid JSON");
        goto out;
    }
    for (; used < len; used++) {
        if (!g_ascii_isspace(data[used])) {
            corrupt(errp, path, "trailing data after the JSON object");
            goto out;
        }
    }
    if (!json_object_is_type(obj, json_type_object)) {
        corrupt(errp, path, "not a JSON object");
        goto out;
    }
    if (!get_int_member(obj, "version", &version)) {
        corrupt(errp, path, "missing or non-integer \"version\"");
        goto out;
    }
    if (version != EXTLOCKD_STATE_VERSION) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "state file %s has unsupported version %" PRId64
                    " (this extlockd understands version %d); refusing "
                    "to start", path, version, EXTLOCKD_STATE_VERSION);
        goto out;
    }
    if (json_object_object_get_ex(obj, EXTLOCKD_STATE_MOVED_MEMBER,
                                  &member)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "state file %s was moved to the HA cluster '%s' "
                    "(--create-cluster-from): that cluster holds its "
                    "sessions, locks and reservations now, and a second "
                    "coordinator for them would grant the same extents "
                    "twice; refusing to start", path,
                    json_object_is_type(member, json_type_string) ?
                    json_object_get_string(member) : "?");
        goto out;
    }
    if (!get_int_member(obj, "epoch", &value)) {
        corrupt(errp, path, "missing or non-integer \"epoch\"");
        goto out;
    }
    if (value < 0 || (uint64_t)value >= EXTLOCKD_EPOCH_LIMIT) {
        corrupt(errp, path, "\"epoch\" out of range");
        goto out;
    }
    why = parse_sessions(obj, list);
    if (why) {
        corrupt(errp, path, why);
        goto out;
    }
    *epoch = (uint64_t)value;
    *sessions = g_steal_pointer(&list);
    ok = true;

out:
    json_object_put(obj);
    return ok;
}

bool extlockd_state_read(const char *path, char **data, size_t *len,
                         GError **errp)
{
    g_autoptr(GError) local_err = NULL;
    gsize n;

    *data = NULL;
    *len = 0;
    if (!g_file_get_contents(path, data, &n, &local_err)) {
        if (g_error_matches(local_err, G_FILE_ERROR, G_FILE_ERROR_NOENT)) {
            return true;
        }
        g_propagate_error(errp, g_steal_pointer(&local_err));
        return false;
    }
    *len = n;
    return true;
}

json_object *extlockd_state_member_array(const char *data, size_t len,
                                         const char *name, json_object **arr,
                                         GError **errp)
{
    json_tokener *tok = json_tokener_new();
    json_object *obj = json_tokener_parse_ex(tok, data, (int)len);

    json_tokener_free(tok);
    *arr = NULL;
    if (!obj || !json_object_is_type(obj, json_type_object)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "state: not a JSON object");
        json_object_put(obj);
        return NULL;
    }
    if (json_object_object_get_ex(obj, name, arr) &&
        !json_object_is_type(*arr, json_type_array)) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "state: \"%s\" is not an array", name);
        json_object_put(obj);
        *arr = NULL;
        return NULL;
    }
    return obj;
}

bool extlockd_state_load_sessions(const char *path, uint64_t *epoch,
                                  GPtrArray **sessions, GError **errp)
{
    g_autofree char *data = NULL;
    g_autoptr(GError) local_err = NULL;
    size_t len;

    if (!extlockd_state_read(path, &data, &len, &local_err)) {
        g_propagate_prefixed_error(errp, g_steal_pointer(&local_err),
                                   "cannot read state file: ");
        return false;
    }
    if (!data) {
        *epoch = 0;
        *sessions = g_ptr_array_new_with_free_func(
            extlockd_state_session_free);
        return true;
    }
    return extlockd_state_parse(path, data, len, epoch, sessions, errp);
}

bool extlockd_state_load(const char *path, uint64_t *epoch, GError **errp)
{
    GPtrArray *sessions = NULL;

    if (!extlockd_state_load_sessions(path, epoch, &sessions, errp)) {
        return false;
    }
    g_ptr_array_unref(sessions);
    return true;
}

static bool write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return false;
        }
        buf += n;
        len -= n;
    }
    return true;
}

/* Append @s as a JSON string (names never contain control characters) */
static void append_json_str(GString *out, const char *s)
{
    g_string_append_c(out, '"');
    for (; *s; s++) {
        unsigned char c = *s;

        if (c == '"' || c == '\\') {
            g_string_append_c(out, '\\');
            g_string_append_c(out, c);
        } else if (c < 0x20 || c == 0x7f) {
            g_string_append_printf(out, "\\u%04x", c);
        } else {
            g_string_append_c(out, c);
        }
    }
    g_string_append_c(out, '"');
}

static char *state_text(uint64_t epoch, const ExtlockdStateSession *sessions,
                        size_t n)
{
    GString *out = g_string_sized_new(64 + n * 128);

    g_string_append_printf(out, "{\"version\":%d,\"epoch\":%" PRIu64,
                           EXTLOCKD_STATE_VERSION, epoch);
    if (n) {
        g_string_append(out, ",\"sessions\":[");
        for (size_t i = 0; i < n; i++) {
            if (i) {
                g_string_append_c(out, ',');
            }
            g_string_append(out, "{\"session\":");
            append_json_str(out, sessions[i].session);
            g_string_append(out, ",\"client-id\":");
            append_json_str(out, sessions[i].client_id);
            g_string_append(out, ",\"lock-space\":");
            append_json_str(out, sessions[i].lock_space);
            if (sessions[i].lease_ms) {
                g_string_append_printf(out, ",\"lease-ms\":%u",
                                       sessions[i].lease_ms);
            }
            if (sessions[i].fence_margin_ms) {
                g_string_append_printf(out, ",\"fence-margin-ms\":%u",
                                       sessions[i].fence_margin_ms);
            }
            if (sessions[i].owner && sessions[i].secret_sha256) {
                g_string_append(out, ",\"owner\":");
                append_json_str(out, sessions[i].owner);
                g_string_append(out, ",\"secret-sha256\":");
                append_json_str(out, sessions[i].secret_sha256);
            }
            g_string_append_c(out, '}');
        }
        g_string_append_c(out, ']');
    }
    g_string_append(out, "}\n");
    return g_string_free(out, FALSE);
}

bool extlockd_state_save(const char *path, uint64_t epoch, GError **errp)
{
    return extlockd_state_save_sessions(path, epoch, NULL, 0, errp);
}

char *extlockd_state_format(uint64_t epoch,
                            const ExtlockdStateSession *sessions, size_t n,
                            GError **errp)
{
    if (epoch >= EXTLOCKD_EPOCH_LIMIT) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "epoch %" PRIu64 " exceeds the maximum %" PRIu64
                    "; the token space of this state file is exhausted",
                    epoch, EXTLOCKD_EPOCH_LIMIT - 1);
        return NULL;
    }
    return state_text(epoch, sessions, n);
}

bool extlockd_state_save_sessions(const char *path, uint64_t epoch,
                                  const ExtlockdStateSession *sessions,
                                  size_t n, GError **errp)
{
    g_autofree char *text = extlockd_state_format(epoch, sessions, n, errp);

    return text && extlockd_state_write_text(path, text, errp);
}

/* @data as a JSON object, or NULL */
static json_object *state_object(const char *data, size_t len)
{
    json_tokener *tok;
    json_object *obj;

    if (len == 0 || len > STATE_FILE_MAX_SIZE) {
        return NULL;
    }
    tok = json_tokener_new();
    json_tokener_set_flags(tok, JSON_TOKENER_STRICT);
    obj = json_tokener_parse_ex(tok, data, (int)len);
    json_tokener_free(tok);
    if (obj && !json_object_is_type(obj, json_type_object)) {
        json_object_put(obj);
        obj = NULL;
    }
    return obj;
}

char *extlockd_state_moved_to(const char *data, size_t len)
{
    json_object *obj = state_object(data, len);
    json_object *member;
    char *name = NULL;

    if (obj && json_object_object_get_ex(obj, EXTLOCKD_STATE_MOVED_MEMBER,
                                         &member)) {
        name = g_strdup(json_object_is_type(member, json_type_string) ?
                        json_object_get_string(member) : "");
    }
    json_object_put(obj);
    return name;
}

char *extlockd_state_mark_moved(const char *path, const char *data,
                                size_t len, const char *cluster,
                                GError **errp)
{
    json_object *obj = state_object(data, len);
    char *text;

    if (!obj) {
        corrupt(errp, path, "not a JSON object");
        return NULL;
    }
    json_object_object_add(obj, EXTLOCKD_STATE_MOVED_MEMBER,
                           json_object_new_string(cluster));
    text = g_strdup_printf("%s\n", json_object_to_json_string_ext(
                               obj, JSON_C_TO_STRING_PLAIN));
    json_object_put(obj);
    return text;
}

bool extlockd_state_write_text(const char *path, const char *text,
                               GError **errp)
{
    g_autofree char *dir = g_path_get_dirname(path);
    g_autofree char *tmp = g_strdup_printf("%s.tmp.%ld", path,
                                           (long)getpid());
    const char *what;
    int fd, dfd, err;

    if (!make_parent_dir(path, errp)) {
        return false;
    }

    /*
     * A stale temporary file (a crash between create and rename) or
     * anything planted at its name is removed, and the file is created
     * anew: never opened through a symlink, never shared
     */
    if (unlink(tmp) < 0 && errno != ENOENT) {
        err = errno;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "cannot remove stale %s: %s", tmp, g_strerror(err));
        return false;
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
              0600);
    if (fd < 0) {
        err = errno;
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "cannot create %s: %s", tmp, g_strerror(err));
        return false;
    }
    what = "write";
    if (!write_all(fd, text, strlen(text))) {
        goto fail;
    }
    what = "fsync";
    if (fsync(fd) < 0) {
        goto fail;
    }
    what = "close";
    err = close(fd);
    fd = -1;
    if (err < 0) {
        goto fail;
    }
    if (rename(tmp, path) < 0) {
        err = errno;
        unlink(tmp);
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "cannot rename %s to %s: %s", tmp, path,
                    g_strerror(err));
        return false;
    }

    dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0 || fsync(dfd) < 0) {
        err = errno;
        if (dfd >= 0) {
            close(dfd);
        }
        g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                    "cannot fsync directory %s: %s", dir, g_strerror(err));
        return false;
    }
    close(dfd);
    return true;

fail:
    err = errno;
    if (fd >= 0) {
        close(fd);
    }
    unlink(tmp);
    g_set_error(errp, G_FILE_ERROR, g_file_error_from_errno(err),
                "cannot %s %s: %s", what, tmp, g_strerror(err));
    return false;
}
