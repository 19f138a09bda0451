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

#include "state-file.h"

/* A valid state file is tiny; anything bigger is certainly corrupt */
#define STATE_FILE_MAX_SIZE 4096

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
                "{\"version\":%d,\"epoch\":N}; refusing to start, because "
                "guessing the epoch could reuse fencing tokens)",
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

bool extlockd_state_load(const char *path, uint64_t *epoch, GError **errp)
{
    g_autofree char *data = NULL;
    g_autoptr(GError) local_err = NULL;
    json_tokener *tok;
    json_object *obj;
    enum json_tokener_error jerr;
    gsize len;
    size_t used;
    int64_t version, value;
    bool ok = false;

    if (!g_file_get_contents(path, &data, &len, &local_err)) {
        if (g_error_matches(local_err, G_FILE_ERROR, G_FILE_ERROR_NOENT)) {
            *epoch = 0;
            return true;
        }
        g_set_error(errp, G_FILE_ERROR, local_err->code,
                    "cannot read state file: %s", local_err->message);
        return false;
    }
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
    if (!get_int_member(obj, "epoch", &value)) {
        corrupt(errp, path, "missing or non-integer \"epoch\"");
        goto out;
    }
    if (value < 0 || (uint64_t)value >= EXTLOCKD_EPOCH_LIMIT) {
        corrupt(errp, path, "\"epoch\" out of range");
        goto out;
    }
    *epoch = (uint64_t)value;
    ok = true;

out:
    json_object_put(obj);
    return ok;
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

bool extlockd_state_save(const char *path, uint64_t epoch, GError **errp)
{
    g_autofree char *dir = g_path_get_dirname(path);
    g_autofree char *tmp = g_strdup_printf("%s.tmp.%ld", path,
                                           (long)getpid());
    g_autofree char *text = NULL;
    const char *what;
    int fd, dfd, err;

    if (epoch >= EXTLOCKD_EPOCH_LIMIT) {
        g_set_error(errp, G_FILE_ERROR, G_FILE_ERROR_INVAL,
                    "epoch %" PRIu64 " exceeds the maximum %" PRIu64
                    "; the token space of this state file is exhausted",
                    epoch, EXTLOCKD_EPOCH_LIMIT - 1);
        return false;
    }
    if (!make_parent_dir(path, errp)) {
        return false;
    }
    text = g_strdup_printf("{\"version\":%d,\"epoch\":%" PRIu64 "}\n",
                           EXTLOCKD_STATE_VERSION, epoch);

    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
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
