/*
 * extlock: coordinator wire protocol codec (JSON lines) and line buffer
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Parsing uses json-c with a per-thread tokener in strict mode (so no
 * comments, no trailing commas, no leading zeros, valid UTF-8 only) and then
 * validates every member the message type needs.  Formatting writes JSON
 * text directly into a GString without building json-c objects, except for
 * the free-form "status" object of a status reply.
 *
 * The code keeps no mutable global state apart from the thread-private
 * tokener, so it may be used from any number of threads.
 */
#ifdef EXTLOCK_IN_QEMU
#include "qemu/osdep.h"   /* first, as every QEMU file (block/meson.build) */
#endif
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <json-c/json.h>
#include "extlock/protocol.h"

/*
 * Appending to a GString without a library call when it has room (the
 * formatter is on the coordinator's hot path)
 */
static inline void out_append(GString *out, const char *s, size_t n)
{
    if (G_LIKELY(out->len + n < out->allocated_len)) {
        memcpy(out->str + out->len, s, n);
        out->len += n;
        out->str[out->len] = '\0';
    } else {
        g_string_append_len(out, s, n);
    }
}

static inline void out_putc(GString *out, char c)
{
    if (G_LIKELY(out->len + 1 < out->allocated_len)) {
        out->str[out->len++] = c;
        out->str[out->len] = '\0';
    } else {
        g_string_append_c(out, c);
    }
}

#define APPEND_LIT(out, lit) out_append((out), (lit), sizeof(lit) - 1)

static const char *const msg_type_names[EXTLOCK_MSG__MAX] = {
    [EXTLOCK_MSG_INVALID] = "invalid",
    [EXTLOCK_MSG_HELLO] = "hello",
    [EXTLOCK_MSG_LOCK] = "lock",
    [EXTLOCK_MSG_UNLOCK] = "unlock",
    [EXTLOCK_MSG_CANCEL] = "cancel",
    [EXTLOCK_MSG_RENEW] = "renew",
    [EXTLOCK_MSG_BYE] = "bye",
    [EXTLOCK_MSG_STATUS] = "status",
    [EXTLOCK_MSG_RECLAIM] = "reclaim",
    [EXTLOCK_MSG_DOWNGRADE] = "downgrade",
    [EXTLOCK_MSG_RECLAIM_DONE] = "reclaim-done",
    [EXTLOCK_MSG_WELCOME] = "welcome",
    [EXTLOCK_MSG_WAITING] = "waiting",
    [EXTLOCK_MSG_GRANTED] = "granted",
    [EXTLOCK_MSG_UNLOCKED] = "unlocked",
    [EXTLOCK_MSG_CANCELLED] = "cancelled",
    [EXTLOCK_MSG_RENEWED] = "renewed",
    [EXTLOCK_MSG_GOODBYE] = "goodbye",
    [EXTLOCK_MSG_STATUS_REPLY] = "status-reply",
    [EXTLOCK_MSG_DOWNGRADED] = "downgraded",
    [EXTLOCK_MSG_RECLAIM_COMPLETE] = "reclaim-complete",
    [EXTLOCK_MSG_ERROR] = "error",
    [EXTLOCK_MSG_REVOKE] = "revoke",
    [EXTLOCK_MSG_SESSION_EXPIRED] = "session-expired",
    [EXTLOCK_MSG_RELEASE_SESSION] = "release-session",
    [EXTLOCK_MSG_SESSION_RELEASED] = "session-released",
    [EXTLOCK_MSG_FENCE_STATUS] = "fence-status",
    [EXTLOCK_MSG_PR_OUT] = "pr-out",
    [EXTLOCK_MSG_PR_RESULT] = "pr-result",
    [EXTLOCK_MSG_PR_IN] = "pr-in",
    [EXTLOCK_MSG_PR_STATUS] = "pr-status",
    [EXTLOCK_MSG_PR_UPDATE] = "pr-update",
    [EXTLOCK_MSG_PR_ACK] = "pr-ack",
    [EXTLOCK_MSG_PR_ACKED] = "pr-acked",
};

static const char *const fence_result_names[EXTLOCK_FENCE__MAX] = {
    [EXTLOCK_FENCE_STARTED] = "started",
    [EXTLOCK_FENCE_SUCCEEDED] = "succeeded",
    [EXTLOCK_FENCE_FAILED] = "failed",
};

static const char *const error_code_names[EXTLOCK_ERR__MAX] = {
    [EXTLOCK_ERR_NONE] = "none",
    [EXTLOCK_ERR_PARSE] = "parse-error",
    [EXTLOCK_ERR_LINE_TOO_LONG] = "line-too-long",
    [EXTLOCK_ERR_UNKNOWN_TYPE] = "unknown-type",
    [EXTLOCK_ERR_INVALID] = "invalid-argument",
    [EXTLOCK_ERR_RANGE] = "invalid-range",
    [EXTLOCK_ERR_VERSION] = "unsupported-version",
    [EXTLOCK_ERR_STATE] = "bad-state",
    [EXTLOCK_ERR_NOT_FOUND] = "not-found",
    [EXTLOCK_ERR_LIMIT] = "limit-exceeded",
    [EXTLOCK_ERR_WOULD_BLOCK] = "would-block",
    [EXTLOCK_ERR_CANCELLED] = "cancelled",
    [EXTLOCK_ERR_EXPIRED] = "session-expired",
    [EXTLOCK_ERR_GRACE] = "in-grace",
    [EXTLOCK_ERR_INTERNAL] = "internal-error",
    [EXTLOCK_ERR_DENIED] = "permission-denied",
    [EXTLOCK_ERR_RECLAIM_CONFLICT] = "reclaim-conflict",
    [EXTLOCK_ERR_NOT_LEADER] = "not-leader",
};

const char *extlock_msg_type_name(ExtlockMsgType type)
{
    if ((unsigned)type >= EXTLOCK_MSG__MAX || !msg_type_names[type]) {
        return "invalid";
    }
    return msg_type_names[type];
}

const char *extlock_fence_result_name(ExtlockFenceResult result)
{
    if ((unsigned)result >= EXTLOCK_FENCE__MAX) {
        return "failed";
    }
    return fence_result_names[result];
}

const char *extlock_error_code_name(ExtlockErrorCode code)
{
    if ((unsigned)code >= EXTLOCK_ERR__MAX) {
        return "internal-error";
    }
    return error_code_names[code];
}

ExtlockErrorCode extlock_error_code_from_name(const char *name)
{
    int i;

    if (!name) {
        return EXTLOCK_ERR_NONE;
    }
    for (i = EXTLOCK_ERR_NONE + 1; i < EXTLOCK_ERR__MAX; i++) {
        if (strcmp(name, error_code_names[i]) == 0) {
            return i;
        }
    }
    return EXTLOCK_ERR_NONE;
}

static ExtlockMsgType msg_type_from_name(const char *name, size_t len)
{
    int i;

    for (i = EXTLOCK_MSG_INVALID + 1; i < EXTLOCK_MSG__MAX; i++) {
        const char *n = msg_type_names[i];

        if (n && n[0] == name[0] && strlen(n) == len &&
            memcmp(n, name, len) == 0) {
            return i;
        }
    }
    return EXTLOCK_MSG_INVALID;
}

static bool msg_type_is_notification(ExtlockMsgType type)
{
    return type == EXTLOCK_MSG_REVOKE ||
           type == EXTLOCK_MSG_SESSION_EXPIRED ||
           type == EXTLOCK_MSG_FENCE_STATUS ||
           type == EXTLOCK_MSG_PR_UPDATE;
}

/* Copying a constant compiles to a few vector stores, unlike memset */
static const ExtlockMsg msg_template = {
    .type = EXTLOCK_MSG_INVALID,
    .version = EXTLOCK_PROTOCOL_VERSION,
    .mode = EXTLOCK_MODE_SHARED,
    .wait = true,
};

void extlock_msg_init(ExtlockMsg *msg, ExtlockMsgType type)
{
    memcpy(msg, &msg_template, sizeof(*msg));
    msg->type = type;
}

void extlock_msg_clear(ExtlockMsg *msg)
{
    g_free(msg->client_id);
    g_free(msg->lock_space);
    g_free(msg->session);
    g_free(msg->resume_secret);
    g_free(msg->identity);
    g_free(msg->leader);
    g_free(msg->server);
    g_free(msg->message);
    g_free(msg->session_client);
    if (msg->pieces) {
        g_array_free(msg->pieces, true);
    }
    if (msg->blockers) {
        guint i;

        for (i = 0; i < msg->blockers->len; i++) {
            g_free(g_array_index(msg->blockers, ExtlockBlocker, i).client_id);
        }
        g_array_free(msg->blockers, true);
    }
    if (msg->locks) {
        g_array_free(msg->locks, true);
    }
    if (msg->body) {
        json_object_put(msg->body);
    }
    if (msg->pr) {
        extlock_pr_destroy(msg->pr);
        g_free(msg->pr);
    }
    extlock_msg_init(msg, EXTLOCK_MSG_INVALID);
}

/*
 * Parsing
 */

static bool G_GNUC_PRINTF(3, 4)
set_error(ExtlockProtoError *err, ExtlockErrorCode code, const char *fmt, ...)
{
    va_list ap;

    if (err) {
        err->code = code;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof(err->message), fmt, ap);
        va_end(ap);
    }
    return false;
}

static void tokener_free(gpointer tok)
{
    json_tokener_free(tok);
}

/* One tokener per thread, created on first use and freed at thread exit */
static GPrivate tokener_key = G_PRIVATE_INIT(tokener_free);

static json_tokener *get_tokener(void)
{
    json_tokener *tok = g_private_get(&tokener_key);

    if (!tok) {
        tok = json_tokener_new();
        json_tokener_set_flags(tok, JSON_TOKENER_STRICT |
                                    JSON_TOKENER_VALIDATE_UTF8);
        g_private_set(&tokener_key, tok);
    } else {
        json_tokener_reset(tok);
    }
    return tok;
}

typedef enum IntClass {
    INT_OK,
    INT_NOT_INTEGER,
    INT_NEGATIVE,
    INT_TOO_BIG,            /* >= 2^63, including literals json-c clamped */
} IntClass;

/*
 * Classify a JSON value that should be an integer in [0, 2^63).
 * json-c stores literals in [2^63, 2^64) as uint64 and clamps bigger ones
 * to UINT64_MAX (and those below INT64_MIN to INT64_MIN), so anything the
 * int64 accessor saturates is out of range and never silently accepted.
 */
static IntClass classify_int(json_object *v, uint64_t *out)
{
    int64_t i;

    if (!json_object_is_type(v, json_type_int)) {
        return INT_NOT_INTEGER;
    }
    i = json_object_get_int64(v);
    if (i < 0) {
        return INT_NEGATIVE;
    }
    if (i == INT64_MAX && json_object_get_uint64(v) > (uint64_t)INT64_MAX) {
        return INT_TOO_BIG;
    }
    *out = (uint64_t)i;
    return INT_OK;
}

static json_object *member(json_object *obj, const char *key)
{
    json_object *v = NULL;

    if (!json_object_object_get_ex(obj, key, &v)) {
        return NULL;
    }
    return v;
}

/* An integer in [0, 2^63): ids, lock ids, tokens, epochs */
static bool get_u63(json_object *obj, const char *key, bool required,
                    uint64_t *out, ExtlockProtoError *err)
{
    json_object *v = member(obj, key);

    if (!v) {
        if (required) {
            return set_error(err, EXTLOCK_ERR_INVALID,
                             "missing member \"%s\"", key);
        }
        return true;
    }
    if (classify_int(v, out) != INT_OK) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"%s\" must be an integer in [0, 2^63)", key);
    }
    return true;
}

static bool get_u32(json_object *obj, const char *key, uint32_t *out,
                    ExtlockProtoError *err)
{
    json_object *v = member(obj, key);
    uint64_t val;

    if (!v) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "missing member \"%s\"", key);
    }
    if (classify_int(v, &val) != INT_OK || val > UINT32_MAX) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"%s\" must be an integer in [0, 2^32)", key);
    }
    *out = val;
    return true;
}

/* One of "offset"/"length": wrong JSON type is invalid-argument */
static bool get_extent_int(json_object *v, const char *key, uint64_t *out,
                           ExtlockProtoError *err)
{
    switch (classify_int(v, out)) {
    case INT_OK:
        return true;
    case INT_NOT_INTEGER:
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"%s\" must be an integer", key);
    case INT_NEGATIVE:
        return set_error(err, EXTLOCK_ERR_RANGE,
                         "\"%s\" must not be negative", key);
    case INT_TOO_BIG:
    default:
        /* a length may be exactly 2^63 (the whole address space) */
        if (json_object_get_uint64(v) == EXTLOCK_EXTENT_END_MAX) {
            *out = EXTLOCK_EXTENT_END_MAX;
            return true;
        }
        return set_error(err, EXTLOCK_ERR_RANGE,
                         "\"%s\" is out of range", key);
    }
}

/*
 * "offset" and "length", validated together.  With @required false both
 * may be absent (*present set to false), but not only one of them.
 */
static bool get_extent(json_object *obj, bool required, bool *present,
                       uint64_t *offset, uint64_t *length,
                       ExtlockProtoError *err)
{
    json_object *vo = member(obj, "offset");
    json_object *vl = member(obj, "length");

    if (!vo && !vl && !required) {
        *present = false;
        return true;
    }
    if (!vo) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "missing member \"offset\"");
    }
    if (!vl) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "missing member \"length\"");
    }
    if (!get_extent_int(vo, "offset", offset, err) ||
        !get_extent_int(vl, "length", length, err)) {
        return false;
    }
    if (*length == 0) {
        return set_error(err, EXTLOCK_ERR_RANGE, "\"length\" must not be 0");
    }
    if (!extlock_extent_valid(*offset, *length)) {
        return set_error(err, EXTLOCK_ERR_RANGE,
                         "offset + length exceeds 2^63");
    }
    *present = true;
    return true;
}

/*
 * lock "limit": {"offset":O,"length":N}, the range the granted extent may
 * grow into; it must contain the requested extent.
 */
static bool get_limit(json_object *obj, ExtlockMsg *msg,
                      ExtlockProtoError *err)
{
    json_object *v = member(obj, "limit");
    bool present;

    if (!v) {
        return true;
    }
    if (!json_object_is_type(v, json_type_object)) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"limit\" must be an object");
    }
    if (!get_extent(v, true, &present, &msg->limit_offset,
                    &msg->limit_length, err)) {
        return false;
    }
    if (msg->offset < msg->limit_offset ||
        msg->offset + msg->length >
        msg->limit_offset + msg->limit_length) {
        return set_error(err, EXTLOCK_ERR_RANGE,
                         "\"limit\" must contain the requested extent");
    }
    msg->has_limit = true;
    return true;
}

static bool get_mode(json_object *obj, const char *key, ExtlockMode *mode,
                     ExtlockProtoError *err)
{
    json_object *v = member(obj, key);

    if (!v) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "missing member \"%s\"", key);
    }
    if (!json_object_is_type(v, json_type_string) ||
        !extlock_mode_parse(json_object_get_string(v), mode)) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"%s\" must be \"shared\" or \"exclusive\"", key);
    }
    return true;
}

static bool get_bool(json_object *obj, const char *key, bool dflt,
                     bool *out, ExtlockProtoError *err)
{
    json_object *v = member(obj, key);

    if (!v) {
        *out = dflt;
        return true;
    }
    if (!json_object_is_type(v, json_type_boolean)) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"%s\" must be true or false", key);
    }
    *out = json_object_get_boolean(v);
    return true;
}

/* Names: 1..EXTLOCK_MAX_NAME bytes, no control characters */
static bool name_valid(const char *s, size_t len)
{
    size_t i;

    if (len == 0 || len > EXTLOCK_MAX_NAME) {
        return false;
    }
    for (i = 0; i < len; i++) {
        unsigned char c = s[i];
        if (c < 0x20 || c == 0x7f) {
            return false;
        }
    }
    return true;
}

static bool get_name(json_object *obj, const char *key, bool required,
                     char **out, ExtlockProtoError *err)
{
    json_object *v = member(obj, key);
    const char *s;
    size_t len;

    if (!v) {
        if (required) {
            return set_error(err, EXTLOCK_ERR_INVALID,
                             "missing member \"%s\"", key);
        }
        return true;
    }
    if (!json_object_is_type(v, json_type_string)) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"%s\" must be a string", key);
    }
    s = json_object_get_string(v);
    len = json_object_get_string_len(v);
    if (!name_valid(s, len)) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"%s\" must be 1..%d bytes without control "
                         "characters", key, EXTLOCK_MAX_NAME);
    }
    *out = g_strndup(s, len);
    return true;
}

/*
 * Version 2 "resume-secret": EXTLOCK_SECRET_LEN lowercase hex digits.
 * A hello that resumes a session must carry it, hence @required.
 */
static bool get_secret(json_object *obj, bool required, char **out,
                       ExtlockProtoError *err)
{
    json_object *v = member(obj, "resume-secret");
    const char *s;

    if (!v) {
        if (required) {
            return set_error(err, EXTLOCK_ERR_INVALID,
                             "\"session\" needs \"resume-secret\" (the "
                             "secret from that session's welcome)");
        }
        return true;
    }
    if (!json_object_is_type(v, json_type_string) ||
        json_object_get_string_len(v) != EXTLOCK_SECRET_LEN) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"resume-secret\" must be a string of %d hex "
                         "digits", EXTLOCK_SECRET_LEN);
    }
    s = json_object_get_string(v);
    for (int i = 0; i < EXTLOCK_SECRET_LEN; i++) {
        if (!g_ascii_isxdigit(s[i]) || g_ascii_isupper(s[i])) {
            return set_error(err, EXTLOCK_ERR_INVALID,
                             "\"resume-secret\" must be a string of %d "
                             "lowercase hex digits", EXTLOCK_SECRET_LEN);
        }
    }
    *out = g_strndup(s, EXTLOCK_SECRET_LEN);
    return true;
}

/* A free-form optional string (messages, server name) */
static bool get_text(json_object *obj, const char *key, char **out,
                     ExtlockProtoError *err)
{
    json_object *v = member(obj, key);

    if (!v) {
        return true;
    }
    if (!json_object_is_type(v, json_type_string)) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"%s\" must be a string", key);
    }
    *out = g_strndup(json_object_get_string(v),
                     json_object_get_string_len(v));
    return true;
}

/* lease-ms: 0 (server default, only if @allow_zero) or 100..3600000 */
static bool get_lease(json_object *obj, bool required, bool allow_zero,
                      uint32_t *out, ExtlockProtoError *err)
{
    json_object *v = member(obj, "lease-ms");
    uint64_t val;

    if (!v) {
        if (required) {
            return set_error(err, EXTLOCK_ERR_INVALID,
                             "missing member \"lease-ms\"");
        }
        *out = 0;
        return true;
    }
    if (classify_int(v, &val) != INT_OK ||
        (val == 0 && !allow_zero) ||
        (val != 0 && (val < EXTLOCK_MIN_LEASE_MS ||
                      val > EXTLOCK_MAX_LEASE_MS))) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"lease-ms\" must be %san integer in %d..%d",
                         allow_zero ? "0 or " : "",
                         EXTLOCK_MIN_LEASE_MS, EXTLOCK_MAX_LEASE_MS);
    }
    *out = val;
    return true;
}

static json_object *get_array(json_object *obj, const char *key,
                              bool required, bool *ok,
                              ExtlockProtoError *err)
{
    json_object *v = member(obj, key);

    *ok = true;
    if (!v) {
        if (required) {
            *ok = set_error(err, EXTLOCK_ERR_INVALID,
                            "missing member \"%s\"", key);
        }
        return NULL;
    }
    if (!json_object_is_type(v, json_type_array)) {
        *ok = set_error(err, EXTLOCK_ERR_INVALID,
                        "\"%s\" must be an array", key);
        return NULL;
    }
    return v;
}

static json_object *array_object(json_object *arr, size_t i,
                                 const char *key, ExtlockProtoError *err)
{
    json_object *e = json_object_array_get_idx(arr, i);

    if (!json_object_is_type(e, json_type_object)) {
        set_error(err, EXTLOCK_ERR_INVALID,
                  "elements of \"%s\" must be objects", key);
        return NULL;
    }
    return e;
}

static bool parse_pieces(json_object *obj, ExtlockMsg *msg,
                         ExtlockProtoError *err)
{
    bool ok;
    json_object *arr = get_array(obj, "pieces", true, &ok, err);
    size_t i, n;
    bool present;

    if (!arr) {
        return false;
    }
    n = json_object_array_length(arr);
    msg->pieces = g_array_sized_new(false, false, sizeof(ExtlockPiece), n);
    for (i = 0; i < n; i++) {
        ExtlockPiece p;
        json_object *e = array_object(arr, i, "pieces", err);

        if (!e || !get_u63(e, "lock", true, &p.lock, err) ||
            !get_extent(e, true, &present, &p.offset, &p.length, err)) {
            return false;
        }
        g_array_append_val(msg->pieces, p);
    }
    return true;
}

static bool parse_blockers(json_object *obj, ExtlockMsg *msg,
                           ExtlockProtoError *err)
{
    bool ok;
    json_object *arr = get_array(obj, "blockers", true, &ok, err);
    size_t i, n;
    bool present;

    if (!arr) {
        return false;
    }
    n = json_object_array_length(arr);
    msg->blockers = g_array_sized_new(false, false, sizeof(ExtlockBlocker),
                                      n);
    for (i = 0; i < n; i++) {
        ExtlockBlocker b = { 0 };
        json_object *e = array_object(arr, i, "blockers", err);

        if (!e || !get_name(e, "client-id", true, &b.client_id, err)) {
            return false;
        }
        /* From here on, msg owns the client-id */
        g_array_append_val(msg->blockers, b);
        if (!get_extent(e, true, &present, &b.offset, &b.length, err) ||
            !get_mode(e, "mode", &b.mode, err) ||
            !get_u63(e, "token", true, &b.token, err) ||
            !get_bool(e, "waiting", false, &b.waiting, err)) {
            return false;
        }
        g_array_index(msg->blockers, ExtlockBlocker, i) = b;
    }
    return true;
}

static bool parse_locks(json_object *obj, ExtlockMsg *msg,
                        ExtlockProtoError *err)
{
    bool ok;
    json_object *arr = get_array(obj, "locks", false, &ok, err);
    size_t i, n;
    bool present;

    if (!arr) {
        return ok;
    }
    n = json_object_array_length(arr);
    msg->locks = g_array_sized_new(false, false, sizeof(ExtlockLockInfo), n);
    for (i = 0; i < n; i++) {
        ExtlockLockInfo l;
        json_object *e = array_object(arr, i, "locks", err);

        if (!e || !get_u63(e, "lock", true, &l.lock, err) ||
            !get_extent(e, true, &present, &l.offset, &l.length, err) ||
            !get_mode(e, "mode", &l.mode, err) ||
            !get_u63(e, "token", true, &l.token, err)) {
            return false;
        }
        g_array_append_val(msg->locks, l);
    }
    return true;
}

static bool parse_error_reply(json_object *obj, ExtlockMsg *msg,
                              ExtlockProtoError *err)
{
    json_object *v = member(obj, "code");

    if (!v) {
        return set_error(err, EXTLOCK_ERR_INVALID, "missing member \"code\"");
    }
    if (!json_object_is_type(v, json_type_string)) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"code\" must be a string");
    }
    msg->error = extlock_error_code_from_name(json_object_get_string(v));
    if (msg->error == EXTLOCK_ERR_NONE) {
        /* A code from a newer server: treat it as an internal error */
        msg->error = EXTLOCK_ERR_INTERNAL;
    }
    /* "lock": the lock a notification (no "id") is about, e.g. dropped */
    return get_u63(obj, "lock", false, &msg->lock, err) &&
           get_text(obj, "message", &msg->message, err) &&
           get_text(obj, "leader", &msg->leader, err);
}

static bool get_fence_result(json_object *obj, ExtlockFenceResult *out,
                             ExtlockProtoError *err)
{
    json_object *v = member(obj, "result");
    int i;

    if (!v) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "missing member \"result\"");
    }
    if (json_object_is_type(v, json_type_string)) {
        for (i = 0; i < EXTLOCK_FENCE__MAX; i++) {
            if (strcmp(json_object_get_string(v),
                       fence_result_names[i]) == 0) {
                *out = i;
                return true;
            }
        }
    }
    return set_error(err, EXTLOCK_ERR_INVALID,
                     "\"result\" must be \"started\", \"succeeded\" or "
                     "\"failed\"");
}

/* welcome "fence-margin-ms": optional, an integer in [0, 2^32) */
static bool get_fence_margin(json_object *obj, ExtlockMsg *msg,
                             ExtlockProtoError *err)
{
    if (!member(obj, "fence-margin-ms")) {
        return true;
    }
    msg->has_fence_margin = true;
    return get_u32(obj, "fence-margin-ms", &msg->fence_margin_ms, err);
}

/* A reservation key: a string of 1..16 lowercase hex digits */
static bool get_pr_key(json_object *obj, const char *key, bool required,
                       uint64_t *out, ExtlockProtoError *err)
{
    json_object *v = member(obj, key);
    const char *s;
    size_t len;
    uint64_t val = 0;

    if (!v) {
        *out = 0;
        return !required ||
               set_error(err, EXTLOCK_ERR_INVALID, "missing member \"%s\"",
                         key);
    }
    if (!json_object_is_type(v, json_type_string)) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"%s\" must be a string", key);
    }
    s = json_object_get_string(v);
    len = json_object_get_string_len(v);
    if (len == 0 || len > 16) {
        goto bad;
    }
    for (size_t i = 0; i < len; i++) {
        int d = g_ascii_xdigit_value(s[i]);

        if (d < 0 || g_ascii_isupper(s[i])) {
            goto bad;
        }
        val = val << 4 | (uint64_t)d;
    }
    *out = val;
    return true;
bad:
    return set_error(err, EXTLOCK_ERR_INVALID,
                     "\"%s\" must be 1..16 lowercase hex digits", key);
}

static bool get_pr_action(json_object *obj, ExtlockMsg *msg,
                          ExtlockProtoError *err)
{
    json_object *v = member(obj, "action");

    if (!v || !json_object_is_type(v, json_type_string) ||
        !extlock_pr_action_parse(json_object_get_string(v),
                                 &msg->pr_action)) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"action\" must be a PERSISTENT RESERVE OUT "
                         "service action name");
    }
    return true;
}

static bool get_pr_result(json_object *obj, ExtlockMsg *msg,
                          ExtlockProtoError *err)
{
    json_object *v = member(obj, "result");

    if (!v || !json_object_is_type(v, json_type_string) ||
        !extlock_pr_status_parse(json_object_get_string(v),
                                 &msg->pr_result)) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"result\" must be a reservation result name");
    }
    return true;
}

/* "pr-type": 0..15 (the 4-bit TYPE field of the CDB) */
static bool get_pr_type(json_object *obj, uint32_t *out,
                        ExtlockProtoError *err)
{
    if (!member(obj, "pr-type")) {
        *out = 0;
        return true;
    }
    if (!get_u32(obj, "pr-type", out, err)) {
        return false;
    }
    if (*out > 15) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"pr-type\" must be an integer in 0..15");
    }
    return true;
}

/* pr-update, pr-status: the whole reservation state of the lock-space */
static bool parse_pr_state(json_object *obj, ExtlockMsg *msg,
                           ExtlockProtoError *err)
{
    json_object *arr;
    uint32_t type;
    bool ok;

    msg->pr = g_new0(ExtlockPrState, 1);
    extlock_pr_init(msg->pr);
    if (!get_u63(obj, "seq", true, &msg->pr_seq, err) ||
        !get_u32(obj, "generation", &msg->pr->generation, err) ||
        !get_pr_type(obj, &type, err) ||
        !get_name(obj, "holder", false, &msg->pr->holder, err) ||
        !get_bool(obj, "aptpl", false, &msg->pr->aptpl, err)) {
        return false;
    }
    if (type != EXTLOCK_PR_TYPE_NONE && !extlock_pr_type_valid(type)) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"pr-type\" %u is not a reservation type", type);
    }
    msg->pr->type = type;
    if ((type != EXTLOCK_PR_TYPE_NONE &&
         !extlock_pr_type_all_registrants(type)) != !!msg->pr->holder) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "\"holder\" must be given exactly for a "
                         "reservation of one holder");
    }
    arr = get_array(obj, "registrants", true, &ok, err);
    if (!ok) {
        return false;
    }
    if (json_object_array_length(arr) > EXTLOCK_PR_MAX_REGISTRANTS) {
        return set_error(err, EXTLOCK_ERR_INVALID,
                         "more than %d \"registrants\"",
                         EXTLOCK_PR_MAX_REGISTRANTS);
    }
    for (size_t i = 0; i < json_object_array_length(arr); i++) {
        json_object *e = array_object(arr, i, "registrants", err);
        ExtlockPrRegistrant *r;

        if (!e) {
            return false;
        }
        r = g_new0(ExtlockPrRegistrant, 1);
        g_ptr_array_add(msg->pr->registrants, r);
        if (!get_name(e, "client-id", true, &r->nexus, err) ||
            !get_pr_key(e, "key", true, &r->key, err)) {
            return false;
        }
        if (r->key == 0) {
            return set_error(err, EXTLOCK_ERR_INVALID,
                             "a registered \"key\" is never 0");
        }
        for (size_t j = 0; j < i; j++) {
            ExtlockPrRegistrant *o = g_ptr_array_index(msg->pr->registrants,
                                                       j);

            if (strcmp(o->nexus, r->nexus) == 0) {
                return set_error(err, EXTLOCK_ERR_INVALID,
                                 "\"registrants\" lists %s twice", r->nexus);
            }
        }
    }
    return true;
}

/* unlock, granted "maint-size" and granted "maint-gen": optional, < 2^63 */
static bool get_maint_size(json_object *obj, ExtlockMsg *msg,
                           ExtlockProtoError *err)
{
    if (member(obj, "maint-gen")) {
        msg->has_maint_gen = true;
        if (!get_u63(obj, "maint-gen", true, &msg->maint_gen, err)) {
            return false;
        }
    }
    if (!member(obj, "maint-size")) {
        return true;
    }
    msg->has_maint_size = true;
    return get_u63(obj, "maint-size", true, &msg->maint_size, err);
}

/* Validate and decode the members that @msg->type requires */
static bool parse_members(json_object *obj, ExtlockMsg *msg,
                          ExtlockProtoError *err)
{
    bool present;

    switch (msg->type) {
    case EXTLOCK_MSG_HELLO:
        return get_u32(obj, "version", &msg->version, err) &&
               get_name(obj, "client-id", true, &msg->client_id, err) &&
               get_name(obj, "lock-space", true, &msg->lock_space, err) &&
               get_lease(obj, false, true, &msg->lease_ms, err) &&
               get_name(obj, "session", false, &msg->session, err) &&
               get_secret(obj, false, &msg->resume_secret, err);
    case EXTLOCK_MSG_WELCOME:
        return get_u32(obj, "version", &msg->version, err) &&
               get_name(obj, "session", true, &msg->session, err) &&
               get_lease(obj, true, false, &msg->lease_ms, err) &&
               get_u63(obj, "epoch", true, &msg->epoch, err) &&
               get_text(obj, "server", &msg->server, err) &&
               get_bool(obj, "resumed", false, &msg->resumed, err) &&
               get_bool(obj, "reclaim", false, &msg->reclaim, err) &&
               get_u63(obj, "grace-remaining-ms", false,
                       &msg->grace_remaining_ms, err) &&
               get_fence_margin(obj, msg, err) &&
               get_secret(obj, false, &msg->resume_secret, err) &&
               get_text(obj, "identity", &msg->identity, err) &&
               parse_locks(obj, msg, err);
    case EXTLOCK_MSG_LOCK:
        msg->has_extent = true;
        return get_extent(obj, true, &present, &msg->offset, &msg->length,
                          err) &&
               get_mode(obj, "mode", &msg->mode, err) &&
               get_bool(obj, "wait", true, &msg->wait, err) &&
               get_limit(obj, msg, err);
    case EXTLOCK_MSG_DOWNGRADE:
        return get_u63(obj, "lock", true, &msg->lock, err);
    case EXTLOCK_MSG_DOWNGRADED:
        return get_u63(obj, "lock", true, &msg->lock, err) &&
               get_mode(obj, "mode", &msg->mode, err);
    case EXTLOCK_MSG_WAITING:
        return get_u63(obj, "token", true, &msg->token, err) &&
               parse_blockers(obj, msg, err);
    case EXTLOCK_MSG_GRANTED:
        msg->has_extent = true;
        return get_u63(obj, "lock", true, &msg->lock, err) &&
               get_u63(obj, "token", true, &msg->token, err) &&
               get_extent(obj, true, &present, &msg->offset, &msg->length,
                          err) &&
               get_mode(obj, "mode", &msg->mode, err) &&
               get_maint_size(obj, msg, err);
    case EXTLOCK_MSG_UNLOCK:
        return get_u63(obj, "lock", true, &msg->lock, err) &&
               get_extent(obj, false, &msg->has_extent, &msg->offset,
                          &msg->length, err) &&
               get_maint_size(obj, msg, err);
    case EXTLOCK_MSG_UNLOCKED:
        return get_u63(obj, "lock", true, &msg->lock, err) &&
               parse_pieces(obj, msg, err);
    case EXTLOCK_MSG_CANCEL:
    case EXTLOCK_MSG_CANCELLED:
        return get_u63(obj, "request", true, &msg->request, err);
    case EXTLOCK_MSG_RENEWED:
        return get_lease(obj, true, false, &msg->lease_ms, err) &&
               get_maint_size(obj, msg, err);
    case EXTLOCK_MSG_RENEW:
    case EXTLOCK_MSG_BYE:
    case EXTLOCK_MSG_GOODBYE:
    case EXTLOCK_MSG_STATUS:
    case EXTLOCK_MSG_RECLAIM_DONE:
    case EXTLOCK_MSG_RECLAIM_COMPLETE:
        return true;
    case EXTLOCK_MSG_STATUS_REPLY: {
        json_object *v = member(obj, "status");

        if (!v) {
            return set_error(err, EXTLOCK_ERR_INVALID,
                             "missing member \"status\"");
        }
        if (!json_object_is_type(v, json_type_object)) {
            return set_error(err, EXTLOCK_ERR_INVALID,
                             "\"status\" must be an object");
        }
        msg->body = json_object_get(v);
        return true;
    }
    case EXTLOCK_MSG_ERROR:
        return parse_error_reply(obj, msg, err);
    case EXTLOCK_MSG_REVOKE:
        msg->has_extent = true;
        return get_u63(obj, "lock", true, &msg->lock, err) &&
               get_extent(obj, true, &present, &msg->offset, &msg->length,
                          err) &&
               get_mode(obj, "mode", &msg->mode, err) &&
               get_u63(obj, "token", true, &msg->token, err);
    case EXTLOCK_MSG_RECLAIM:
        msg->has_extent = true;
        return get_extent(obj, true, &present, &msg->offset, &msg->length,
                          err) &&
               get_mode(obj, "mode", &msg->mode, err) &&
               get_u63(obj, "token", true, &msg->token, err);
    case EXTLOCK_MSG_SESSION_EXPIRED:
        return get_name(obj, "session", true, &msg->session, err) &&
               get_text(obj, "message", &msg->message, err);
    case EXTLOCK_MSG_RELEASE_SESSION:
        return get_name(obj, "session", true, &msg->session, err) &&
               get_text(obj, "message", &msg->message, err);
    case EXTLOCK_MSG_SESSION_RELEASED:
        return get_name(obj, "session", true, &msg->session, err) &&
               get_u63(obj, "released", true, &msg->released, err);
    case EXTLOCK_MSG_FENCE_STATUS:
        return get_name(obj, "lock-space", true, &msg->lock_space, err) &&
               get_name(obj, "client-id", true, &msg->client_id, err) &&
               get_name(obj, "session-client", false, &msg->session_client,
                        err) &&
               get_name(obj, "session", false, &msg->session, err) &&
               get_fence_result(obj, &msg->fence_result, err) &&
               get_text(obj, "message", &msg->message, err);
    case EXTLOCK_MSG_PR_OUT:
        return get_pr_action(obj, msg, err) &&
               get_pr_type(obj, &msg->pr_type, err) &&
               get_pr_key(obj, "key", false, &msg->pr_key, err) &&
               get_pr_key(obj, "sa-key", false, &msg->pr_sa_key, err) &&
               get_bool(obj, "aptpl", false, &msg->aptpl, err) &&
               get_u63(obj, "request", false, &msg->pr_request, err);
    case EXTLOCK_MSG_PR_RESULT:
        return get_pr_result(obj, msg, err) &&
               get_u32(obj, "generation", &msg->pr_generation, err) &&
               get_u63(obj, "seq", true, &msg->pr_seq, err);
    case EXTLOCK_MSG_PR_IN:
        return true;
    case EXTLOCK_MSG_PR_STATUS:
    case EXTLOCK_MSG_PR_UPDATE:
        return parse_pr_state(obj, msg, err);
    case EXTLOCK_MSG_PR_ACK:
    case EXTLOCK_MSG_PR_ACKED:
        return get_u63(obj, "seq", true, &msg->pr_seq, err);
    default:
        return set_error(err, EXTLOCK_ERR_INTERNAL, "unhandled type");
    }
}

static bool is_json_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/*
 * Fast path for the flat messages on the hot path (lock, unlock, granted,
 * unlocked without pieces, cancel, renew, bye, status and their simple
 * replies).  It accepts only a subset of JSON: ASCII strings without
 * escapes, non-negative integers of at most 18 digits, true/false, and
 * "pieces":[].  It succeeds only if the message is completely valid;
 * anything else (errors included) makes it return false, and the caller
 * then parses the line with json-c, which is the reference: the fast path
 * never accepts a line that the json-c path would reject or decode
 * differently (tests/unit/test-protocol.c checks this).
 */
typedef enum FastKey {
    FK_TYPE,
    FK_ID,
    FK_OFFSET,
    FK_LENGTH,
    FK_MODE,
    FK_WAIT,
    FK_LOCK,
    FK_REQUEST,
    FK_TOKEN,
    FK_LEASE,
    FK_PIECES,
    FK_LIMIT,
    FK_LIMIT_OFFSET,            /* members of "limit" */
    FK_LIMIT_LENGTH,
    FK_MAINT_GEN,
    FK_MAINT_SIZE,
    FK__MAX,
    FK_UNKNOWN = FK__MAX,
} FastKey;

typedef struct FastVal {
    char kind;                  /* 0 absent, 's', 'n', 't', 'f', '[' */
    const char *str;
    size_t len;
    uint64_t num;
} FastVal;

#define KEY_IS(p, n, lit) ((n) == sizeof(lit) - 1 && !memcmp(p, lit, n))

static FastKey fast_key(const char *p, size_t n)
{
    switch (p[0]) {
    case 't':
        return KEY_IS(p, n, "type") ? FK_TYPE :
               KEY_IS(p, n, "token") ? FK_TOKEN : FK_UNKNOWN;
    case 'i':
        return KEY_IS(p, n, "id") ? FK_ID : FK_UNKNOWN;
    case 'o':
        return KEY_IS(p, n, "offset") ? FK_OFFSET : FK_UNKNOWN;
    case 'l':
        return KEY_IS(p, n, "length") ? FK_LENGTH :
               KEY_IS(p, n, "lock") ? FK_LOCK :
               KEY_IS(p, n, "limit") ? FK_LIMIT :
               KEY_IS(p, n, "lease-ms") ? FK_LEASE : FK_UNKNOWN;
    case 'm':
        return KEY_IS(p, n, "mode") ? FK_MODE :
               KEY_IS(p, n, "maint-size") ? FK_MAINT_SIZE :
               KEY_IS(p, n, "maint-gen") ? FK_MAINT_GEN : FK_UNKNOWN;
    case 'w':
        return KEY_IS(p, n, "wait") ? FK_WAIT : FK_UNKNOWN;
    case 'r':
        return KEY_IS(p, n, "request") ? FK_REQUEST : FK_UNKNOWN;
    case 'p':
        return KEY_IS(p, n, "pieces") ? FK_PIECES : FK_UNKNOWN;
    default:
        return FK_UNKNOWN;
    }
}

static inline const char *fast_ws(const char *p, const char *end)
{
    while (p < end && is_json_space(*p)) {
        p++;
    }
    return p;
}

/* A string without escapes, control characters or non-ASCII bytes */
static inline const char *fast_str(const char *p, const char *end,
                                   const char **s, size_t *n)
{
    const char *start = ++p;

    while (p < end) {
        unsigned char c = *p;

        if (c == '"') {
            *s = start;
            *n = p - start;
            return p + 1;
        }
        if (c < 0x20 || c >= 0x80 || c == '\\') {
            return NULL;
        }
        p++;
    }
    return NULL;
}

/*
 * Scan a flat object into @vals.  @nested: scanning the "limit" object,
 * whose only members may be "offset" and "length" (stored as
 * FK_LIMIT_OFFSET and FK_LIMIT_LENGTH).  Returns the position after the
 * closing brace, or NULL.
 */
static const char *fast_object(const char *p, const char *end,
                               FastVal *vals, bool nested)
{
    p = fast_ws(p + 1, end);
    for (;;) {
        const char *k;
        size_t kn;
        FastKey key;
        FastVal v = { 0 };

        if (p == end || *p != '"') {
            return NULL;
        }
        p = fast_str(p, end, &k, &kn);
        if (!p || kn == 0) {
            return NULL;
        }
        key = fast_key(k, kn);
        if (nested) {
            if (key == FK_OFFSET) {
                key = FK_LIMIT_OFFSET;
            } else if (key == FK_LENGTH) {
                key = FK_LIMIT_LENGTH;
            } else {
                return NULL;
            }
        }
        p = fast_ws(p, end);
        if (p == end || *p != ':') {
            return NULL;
        }
        p = fast_ws(p + 1, end);
        if (p == end) {
            return NULL;
        }
        switch (*p) {
        case '"':
            v.kind = 's';
            p = fast_str(p, end, &v.str, &v.len);
            if (!p) {
                return NULL;
            }
            break;
        case '0' ... '9': {
            const char *start = p;

            if (*p == '0' && p + 1 < end && *(p + 1) >= '0' &&
                *(p + 1) <= '9') {
                return NULL;
            }
            while (p < end && *p >= '0' && *p <= '9') {
                v.num = v.num * 10 + (*p - '0');
                p++;
            }
            if (p - start > 18 ||
                (p < end && (*p == '.' || *p == 'e' || *p == 'E'))) {
                return NULL;
            }
            v.kind = 'n';
            break;
        }
        case 't':
            if (end - p < 4 || memcmp(p, "true", 4)) {
                return NULL;
            }
            v.kind = 't';
            p += 4;
            break;
        case 'f':
            if (end - p < 5 || memcmp(p, "false", 5)) {
                return NULL;
            }
            v.kind = 'f';
            p += 5;
            break;
        case '[':
            p = fast_ws(p + 1, end);
            if (p == end || *p != ']') {
                return NULL;
            }
            v.kind = '[';
            p++;
            break;
        case '{':
            if (nested || key != FK_LIMIT || vals[FK_LIMIT].kind) {
                return NULL;
            }
            p = fast_object(p, end, vals, true);
            if (!p) {
                return NULL;
            }
            v.kind = '{';
            break;
        default:
            return NULL;
        }
        if (key != FK_UNKNOWN) {
            if (vals[key].kind) {
                return NULL;       /* duplicate: leave it to json-c */
            }
            vals[key] = v;
        }
        p = fast_ws(p, end);
        if (p == end) {
            return NULL;
        }
        if (*p == '}') {
            return p + 1;
        }
        if (*p != ',') {
            return NULL;
        }
        p = fast_ws(p + 1, end);
    }
}

static bool fast_scan(const char *p, const char *end, FastVal *vals)
{
    p = fast_ws(p, end);
    if (p == end || *p != '{') {
        return false;
    }
    p = fast_object(p, end, vals, false);
    return p && fast_ws(p, end) == end;
}

static inline bool fast_u63(const FastVal *v, uint64_t *out)
{
    if (v->kind != 'n') {
        return false;
    }
    *out = v->num;
    return true;
}

/* The optional "maint-gen" and "maint-size" of unlock, granted, renewed */
static bool fast_maint(const FastVal *vals, ExtlockMsg *msg)
{
    if (vals[FK_MAINT_GEN].kind) {
        if (!fast_u63(&vals[FK_MAINT_GEN], &msg->maint_gen)) {
            return false;
        }
        msg->has_maint_gen = true;
    }
    if (vals[FK_MAINT_SIZE].kind) {
        if (!fast_u63(&vals[FK_MAINT_SIZE], &msg->maint_size)) {
            return false;
        }
        msg->has_maint_size = true;
    }
    return true;
}

static bool fast_extent(const FastVal *vals, ExtlockMsg *msg)
{
    return fast_u63(&vals[FK_OFFSET], &msg->offset) &&
           fast_u63(&vals[FK_LENGTH], &msg->length) &&
           extlock_extent_valid(msg->offset, msg->length);
}

static bool fast_mode(const FastVal *v, ExtlockMode *mode)
{
    if (v->kind != 's') {
        return false;
    }
    if (KEY_IS(v->str, v->len, "exclusive")) {
        *mode = EXTLOCK_MODE_EXCLUSIVE;
        return true;
    }
    if (KEY_IS(v->str, v->len, "shared")) {
        *mode = EXTLOCK_MODE_SHARED;
        return true;
    }
    return false;
}

static bool fast_parse(const char *line, size_t len, ExtlockMsg *msg)
{
    FastVal vals[FK__MAX] = { { 0 } };
    const FastVal *t = &vals[FK_TYPE];

    if (!fast_scan(line, line + len, vals) || t->kind != 's' ||
        !fast_u63(&vals[FK_ID], &msg->id)) {
        return false;
    }
    msg->has_id = true;

    if (KEY_IS(t->str, t->len, "lock")) {
        msg->type = EXTLOCK_MSG_LOCK;
        msg->has_extent = true;
        if (vals[FK_WAIT].kind == 'f') {
            msg->wait = false;
        } else if (vals[FK_WAIT].kind && vals[FK_WAIT].kind != 't') {
            return false;
        }
        if (!fast_extent(vals, msg) || !fast_mode(&vals[FK_MODE],
                                                  &msg->mode)) {
            return false;
        }
        if (!vals[FK_LIMIT].kind) {
            return true;
        }
        msg->has_limit = true;
        return vals[FK_LIMIT].kind == '{' &&
               fast_u63(&vals[FK_LIMIT_OFFSET], &msg->limit_offset) &&
               fast_u63(&vals[FK_LIMIT_LENGTH], &msg->limit_length) &&
               extlock_extent_valid(msg->limit_offset, msg->limit_length) &&
               msg->limit_offset <= msg->offset &&
               msg->offset + msg->length <=
               msg->limit_offset + msg->limit_length;
    }
    if (KEY_IS(t->str, t->len, "downgrade")) {
        msg->type = EXTLOCK_MSG_DOWNGRADE;
        return fast_u63(&vals[FK_LOCK], &msg->lock);
    }
    if (KEY_IS(t->str, t->len, "downgraded")) {
        msg->type = EXTLOCK_MSG_DOWNGRADED;
        return fast_u63(&vals[FK_LOCK], &msg->lock) &&
               fast_mode(&vals[FK_MODE], &msg->mode);
    }
    if (KEY_IS(t->str, t->len, "reclaim-done")) {
        msg->type = EXTLOCK_MSG_RECLAIM_DONE;
        return true;
    }
    if (KEY_IS(t->str, t->len, "reclaim-complete")) {
        msg->type = EXTLOCK_MSG_RECLAIM_COMPLETE;
        return true;
    }
    if (KEY_IS(t->str, t->len, "unlock")) {
        msg->type = EXTLOCK_MSG_UNLOCK;
        if (!fast_u63(&vals[FK_LOCK], &msg->lock) || !fast_maint(vals, msg)) {
            return false;
        }
        if (!vals[FK_OFFSET].kind && !vals[FK_LENGTH].kind) {
            return true;
        }
        msg->has_extent = true;
        return fast_extent(vals, msg);
    }
    if (KEY_IS(t->str, t->len, "granted")) {
        msg->type = EXTLOCK_MSG_GRANTED;
        msg->has_extent = true;
        return fast_u63(&vals[FK_LOCK], &msg->lock) &&
               fast_u63(&vals[FK_TOKEN], &msg->token) &&
               fast_extent(vals, msg) &&
               fast_mode(&vals[FK_MODE], &msg->mode) &&
               fast_maint(vals, msg);
    }
    if (KEY_IS(t->str, t->len, "unlocked")) {
        msg->type = EXTLOCK_MSG_UNLOCKED;
        if (vals[FK_PIECES].kind != '[') {
            return false;
        }
        msg->pieces = g_array_new(false, false, sizeof(ExtlockPiece));
        return fast_u63(&vals[FK_LOCK], &msg->lock);
    }
    if (KEY_IS(t->str, t->len, "cancel")) {
        msg->type = EXTLOCK_MSG_CANCEL;
        return fast_u63(&vals[FK_REQUEST], &msg->request);
    }
    if (KEY_IS(t->str, t->len, "cancelled")) {
        msg->type = EXTLOCK_MSG_CANCELLED;
        return fast_u63(&vals[FK_REQUEST], &msg->request);
    }
    if (KEY_IS(t->str, t->len, "renewed")) {
        uint64_t lease;

        msg->type = EXTLOCK_MSG_RENEWED;
        if (!fast_u63(&vals[FK_LEASE], &lease) ||
            lease < EXTLOCK_MIN_LEASE_MS || lease > EXTLOCK_MAX_LEASE_MS) {
            return false;
        }
        msg->lease_ms = lease;
        return fast_maint(vals, msg);
    }
    if (KEY_IS(t->str, t->len, "renew")) {
        msg->type = EXTLOCK_MSG_RENEW;
        return true;
    }
    if (KEY_IS(t->str, t->len, "bye")) {
        msg->type = EXTLOCK_MSG_BYE;
        return true;
    }
    if (KEY_IS(t->str, t->len, "goodbye")) {
        msg->type = EXTLOCK_MSG_GOODBYE;
        return true;
    }
    if (KEY_IS(t->str, t->len, "status")) {
        msg->type = EXTLOCK_MSG_STATUS;
        return true;
    }
    return false;
}

bool extlock_msg_parse(const char *line, size_t len, ExtlockMsg *msg,
                       ExtlockProtoError *err)
{
    json_tokener *tok;
    json_object *obj, *v;
    size_t end;
    bool id_bad = false;
    bool ok;

    extlock_msg_init(msg, EXTLOCK_MSG_INVALID);
    if (err) {
        err->code = EXTLOCK_ERR_NONE;
        err->message[0] = '\0';
    }
    if (len > INT32_MAX) {
        return set_error(err, EXTLOCK_ERR_LINE_TOO_LONG, "line too long");
    }
    if (len <= EXTLOCK_MAX_LINE && fast_parse(line, len, msg)) {
        return true;
    }
    extlock_msg_clear(msg);

    tok = get_tokener();
    obj = json_tokener_parse_ex(tok, line, len);
    if (!obj) {
        enum json_tokener_error jerr = json_tokener_get_error(tok);
        size_t jend = json_tokener_get_parse_end(tok);

        /*
         * json_tokener_reset() does not clear everything: a line that
         * ends inside a \uXXXX surrogate pair left the high surrogate
         * pending, and the next line decoded by this thread (any
         * connection's) got U+FFFD before its first \u escape.  Start
         * the next parse with a new tokener.
         */
        g_private_replace(&tokener_key, NULL);

        if (jerr == json_tokener_continue || jerr == json_tokener_success) {
            return set_error(err, EXTLOCK_ERR_PARSE, "incomplete JSON");
        }
        return set_error(err, EXTLOCK_ERR_PARSE, "invalid JSON: %s at %zu",
                         json_tokener_error_desc(jerr), jend);
    }
    for (end = json_tokener_get_parse_end(tok); end < len; end++) {
        if (!is_json_space(line[end])) {
            json_object_put(obj);
            return set_error(err, EXTLOCK_ERR_PARSE,
                             "trailing characters after the JSON object");
        }
    }
    if (!json_object_is_type(obj, json_type_object)) {
        json_object_put(obj);
        return set_error(err, EXTLOCK_ERR_PARSE,
                         "message is not a JSON object");
    }

    /* Read the id first, so that any error reply can carry it */
    v = member(obj, "id");
    if (v) {
        if (classify_int(v, &msg->id) == INT_OK) {
            msg->has_id = true;
        } else {
            msg->id = 0;
            id_bad = true;
        }
    }

    v = member(obj, "type");
    if (!v) {
        ok = set_error(err, EXTLOCK_ERR_INVALID, "missing member \"type\"");
        goto out;
    }
    if (!json_object_is_type(v, json_type_string)) {
        ok = set_error(err, EXTLOCK_ERR_INVALID, "\"type\" must be a string");
        goto out;
    }
    msg->type = msg_type_from_name(json_object_get_string(v),
                                   json_object_get_string_len(v));
    if (msg->type == EXTLOCK_MSG_INVALID) {
        ok = set_error(err, EXTLOCK_ERR_UNKNOWN_TYPE,
                       "unknown message type \"%.64s\"",
                       json_object_get_string(v));
        goto out;
    }

    if (msg_type_is_notification(msg->type)) {
        /*
         * Notifications carry no id: one that is there is ignored, so
         * that it cannot be mistaken for a reply (and the message encodes
         * back to what it decoded to)
         */
        msg->has_id = false;
        msg->id = 0;
        id_bad = false;
    }
    if (id_bad) {
        ok = set_error(err, EXTLOCK_ERR_INVALID,
                       "\"id\" must be an integer in [0, 2^63)");
        goto out;
    }
    if (!msg->has_id && !msg_type_is_notification(msg->type) &&
        msg->type != EXTLOCK_MSG_ERROR) {
        ok = set_error(err, EXTLOCK_ERR_INVALID, "missing member \"id\"");
        goto out;
    }

    ok = parse_members(obj, msg, err);

out:
    json_object_put(obj);
    if (!ok) {
        bool has_id = msg->has_id;
        uint64_t id = msg->id;
        ExtlockMsgType type = msg->type;

        extlock_msg_clear(msg);
        msg->type = type;
        msg->has_id = has_id;
        msg->id = id;
    }
    return ok;
}

/*
 * Formatting
 */

static inline void put_u64(GString *out, uint64_t v)
{
    char buf[20];
    int i = sizeof(buf);

    do {
        buf[--i] = '0' + v % 10;
        v /= 10;
    } while (v);
    out_append(out, buf + i, sizeof(buf) - i);
}

static const char hex_digits[] = "0123456789abcdef";

/*
 * Append @s as a JSON string: quotes, backslashes and control characters
 * are escaped, valid UTF-8 is copied as is, and bytes that are not valid
 * UTF-8 become U+FFFD so that the output is always valid JSON.
 */
static void put_str(GString *out, const char *s)
{
    const unsigned char *p = (const unsigned char *)(s ? s : "");
    const unsigned char *run = p;

    out_putc(out, '"');
    while (*p) {
        unsigned char c = *p;
        char esc[6];

        if (c >= 0x20 && c != '"' && c != '\\' && c < 0x80) {
            p++;
            continue;
        }
        if (c >= 0x80) {
            gunichar u = g_utf8_get_char_validated((const char *)p, -1);

            if (u != (gunichar)-1 && u != (gunichar)-2) {
                p = (const unsigned char *)g_utf8_next_char(p);
                continue;
            }
        }
        out_append(out, (const char *)run, p - run);
        switch (c) {
        case '"':
            APPEND_LIT(out, "\\\"");
            break;
        case '\\':
            APPEND_LIT(out, "\\\\");
            break;
        case '\b':
            APPEND_LIT(out, "\\b");
            break;
        case '\f':
            APPEND_LIT(out, "\\f");
            break;
        case '\n':
            APPEND_LIT(out, "\\n");
            break;
        case '\r':
            APPEND_LIT(out, "\\r");
            break;
        case '\t':
            APPEND_LIT(out, "\\t");
            break;
        default:
            if (c >= 0x80) {
                APPEND_LIT(out, "\xef\xbf\xbd");
            } else {
                esc[0] = '\\';
                esc[1] = 'u';
                esc[2] = '0';
                esc[3] = '0';
                esc[4] = hex_digits[c >> 4];
                esc[5] = hex_digits[c & 15];
                out_append(out, esc, 6);
            }
            break;
        }
        p++;
        run = p;
    }
    out_append(out, (const char *)run, p - run);
    out_putc(out, '"');
}

/* ,"key":<uint> ; @key_lit is the literal ,"key": */
#define PUT_U64(out, key_lit, v) \
    do { \
        APPEND_LIT(out, key_lit); \
        put_u64(out, v); \
    } while (0)

#define PUT_STR(out, key_lit, s) \
    do { \
        APPEND_LIT(out, key_lit); \
        put_str(out, s); \
    } while (0)

static void put_mode(GString *out, ExtlockMode mode)
{
    if (mode == EXTLOCK_MODE_EXCLUSIVE) {
        APPEND_LIT(out, ",\"mode\":\"exclusive\"");
    } else {
        APPEND_LIT(out, ",\"mode\":\"shared\"");
    }
}

static void put_bool(GString *out, bool v)
{
    if (v) {
        APPEND_LIT(out, "true");
    } else {
        APPEND_LIT(out, "false");
    }
}

static void put_extent(GString *out, uint64_t offset, uint64_t length)
{
    PUT_U64(out, ",\"offset\":", offset);
    PUT_U64(out, ",\"length\":", length);
}

static void put_pieces(GString *out, const GArray *pieces)
{
    guint i;

    APPEND_LIT(out, ",\"pieces\":[");
    for (i = 0; pieces && i < pieces->len; i++) {
        const ExtlockPiece *p = &g_array_index(pieces, ExtlockPiece, i);

        if (i) {
            out_putc(out, ',');
        }
        PUT_U64(out, "{\"lock\":", p->lock);
        put_extent(out, p->offset, p->length);
        out_putc(out, '}');
    }
    out_putc(out, ']');
}

static void put_blockers(GString *out, const GArray *blockers)
{
    guint i;

    APPEND_LIT(out, ",\"blockers\":[");
    for (i = 0; blockers && i < blockers->len; i++) {
        const ExtlockBlocker *b = &g_array_index(blockers, ExtlockBlocker, i);

        if (i) {
            out_putc(out, ',');
        }
        PUT_STR(out, "{\"client-id\":", b->client_id);
        put_extent(out, b->offset, b->length);
        put_mode(out, b->mode);
        PUT_U64(out, ",\"token\":", b->token);
        APPEND_LIT(out, ",\"waiting\":");
        put_bool(out, b->waiting);
        out_putc(out, '}');
    }
    out_putc(out, ']');
}

static void put_locks(GString *out, const GArray *locks)
{
    guint i;

    APPEND_LIT(out, ",\"locks\":[");
    for (i = 0; i < locks->len; i++) {
        const ExtlockLockInfo *l = &g_array_index(locks, ExtlockLockInfo, i);

        if (i) {
            out_putc(out, ',');
        }
        PUT_U64(out, "{\"lock\":", l->lock);
        put_extent(out, l->offset, l->length);
        put_mode(out, l->mode);
        PUT_U64(out, ",\"token\":", l->token);
        out_putc(out, '}');
    }
    out_putc(out, ']');
}

static void put_json(GString *out, json_object *obj)
{
    size_t len = 0;
    const char *s;

    if (!obj) {
        APPEND_LIT(out, "{}");
        return;
    }
    s = json_object_to_json_string_length(obj, JSON_C_TO_STRING_PLAIN |
                                          JSON_C_TO_STRING_NOSLASHESCAPE,
                                          &len);
    out_append(out, s, len);
}

static void put_pr_key(GString *out, const char *key_lit, uint64_t key)
{
    g_string_append(out, key_lit);
    g_string_append_printf(out, "\"%" PRIx64 "\"", key);
}

static void put_pr_state(GString *out, uint64_t seq, const ExtlockPrState *pr)
{
    PUT_U64(out, ",\"seq\":", seq);
    PUT_U64(out, ",\"generation\":", pr->generation);
    PUT_U64(out, ",\"pr-type\":", pr->type);
    if (pr->holder) {
        PUT_STR(out, ",\"holder\":", pr->holder);
    }
    APPEND_LIT(out, ",\"aptpl\":");
    put_bool(out, pr->aptpl);
    APPEND_LIT(out, ",\"registrants\":[");
    for (guint i = 0; i < pr->registrants->len; i++) {
        const ExtlockPrRegistrant *r = g_ptr_array_index(pr->registrants, i);

        if (i) {
            out_putc(out, ',');
        }
        PUT_STR(out, "{\"client-id\":", r->nexus);
        put_pr_key(out, ",\"key\":", r->key);
        out_putc(out, '}');
    }
    out_putc(out, ']');
}

void extlock_msg_format(const ExtlockMsg *msg, GString *out)
{
    APPEND_LIT(out, "{\"type\":\"");
    {
        const char *tn = extlock_msg_type_name(msg->type);

        out_append(out, tn, strlen(tn));
    }
    out_putc(out, '"');
    if (msg_type_is_notification(msg->type)) {
        /* no id */
    } else if (msg->type != EXTLOCK_MSG_ERROR || msg->has_id) {
        PUT_U64(out, ",\"id\":", msg->id);
    }

    switch (msg->type) {
    case EXTLOCK_MSG_HELLO:
        PUT_U64(out, ",\"version\":", msg->version);
        PUT_STR(out, ",\"client-id\":", msg->client_id);
        PUT_STR(out, ",\"lock-space\":", msg->lock_space);
        if (msg->lease_ms) {
            PUT_U64(out, ",\"lease-ms\":", msg->lease_ms);
        }
        if (msg->session) {
            PUT_STR(out, ",\"session\":", msg->session);
        }
        if (msg->resume_secret) {
            PUT_STR(out, ",\"resume-secret\":", msg->resume_secret);
        }
        break;
    case EXTLOCK_MSG_WELCOME:
        PUT_U64(out, ",\"version\":", msg->version);
        PUT_STR(out, ",\"session\":", msg->session);
        PUT_U64(out, ",\"lease-ms\":", msg->lease_ms);
        PUT_U64(out, ",\"epoch\":", msg->epoch);
        if (msg->server) {
            PUT_STR(out, ",\"server\":", msg->server);
        }
        if (msg->resumed) {
            APPEND_LIT(out, ",\"resumed\":true");
        }
        if (msg->reclaim) {
            APPEND_LIT(out, ",\"reclaim\":true");
        }
        if (msg->grace_remaining_ms) {
            PUT_U64(out, ",\"grace-remaining-ms\":", msg->grace_remaining_ms);
        }
        if (msg->has_fence_margin) {
            PUT_U64(out, ",\"fence-margin-ms\":", msg->fence_margin_ms);
        }
        if (msg->resume_secret) {
            PUT_STR(out, ",\"resume-secret\":", msg->resume_secret);
        }
        if (msg->identity) {
            PUT_STR(out, ",\"identity\":", msg->identity);
        }
        if (msg->locks) {
            put_locks(out, msg->locks);
        }
        break;
    case EXTLOCK_MSG_LOCK:
        put_extent(out, msg->offset, msg->length);
        put_mode(out, msg->mode);
        APPEND_LIT(out, ",\"wait\":");
        put_bool(out, msg->wait);
        if (msg->has_limit) {
            PUT_U64(out, ",\"limit\":{\"offset\":", msg->limit_offset);
            PUT_U64(out, ",\"length\":", msg->limit_length);
            out_putc(out, '}');
        }
        break;
    case EXTLOCK_MSG_DOWNGRADE:
        PUT_U64(out, ",\"lock\":", msg->lock);
        break;
    case EXTLOCK_MSG_DOWNGRADED:
        PUT_U64(out, ",\"lock\":", msg->lock);
        put_mode(out, msg->mode);
        break;
    case EXTLOCK_MSG_WAITING:
        PUT_U64(out, ",\"token\":", msg->token);
        put_blockers(out, msg->blockers);
        break;
    case EXTLOCK_MSG_GRANTED:
        PUT_U64(out, ",\"lock\":", msg->lock);
        PUT_U64(out, ",\"token\":", msg->token);
        put_extent(out, msg->offset, msg->length);
        put_mode(out, msg->mode);
        if (msg->has_maint_gen) {
            PUT_U64(out, ",\"maint-gen\":", msg->maint_gen);
        }
        if (msg->has_maint_size) {
            PUT_U64(out, ",\"maint-size\":", msg->maint_size);
        }
        break;
    case EXTLOCK_MSG_UNLOCK:
        PUT_U64(out, ",\"lock\":", msg->lock);
        if (msg->has_extent) {
            put_extent(out, msg->offset, msg->length);
        }
        if (msg->has_maint_size) {
            PUT_U64(out, ",\"maint-size\":", msg->maint_size);
        }
        break;
    case EXTLOCK_MSG_UNLOCKED:
        PUT_U64(out, ",\"lock\":", msg->lock);
        put_pieces(out, msg->pieces);
        break;
    case EXTLOCK_MSG_CANCEL:
    case EXTLOCK_MSG_CANCELLED:
        PUT_U64(out, ",\"request\":", msg->request);
        break;
    case EXTLOCK_MSG_RENEWED:
        PUT_U64(out, ",\"lease-ms\":", msg->lease_ms);
        if (msg->has_maint_gen) {
            PUT_U64(out, ",\"maint-gen\":", msg->maint_gen);
        }
        break;
    case EXTLOCK_MSG_STATUS_REPLY:
        APPEND_LIT(out, ",\"status\":");
        put_json(out, msg->body);
        break;
    case EXTLOCK_MSG_ERROR:
        APPEND_LIT(out, ",\"code\":\"");
        g_string_append(out, extlock_error_code_name(msg->error));
        out_putc(out, '"');
        if (msg->lock) {
            PUT_U64(out, ",\"lock\":", msg->lock);
        }
        if (msg->message) {
            PUT_STR(out, ",\"message\":", msg->message);
        }
        if (msg->leader) {
            PUT_STR(out, ",\"leader\":", msg->leader);
        }
        break;
    case EXTLOCK_MSG_REVOKE:
        PUT_U64(out, ",\"lock\":", msg->lock);
        put_extent(out, msg->offset, msg->length);
        put_mode(out, msg->mode);
        PUT_U64(out, ",\"token\":", msg->token);
        break;
    case EXTLOCK_MSG_RECLAIM:
        put_extent(out, msg->offset, msg->length);
        put_mode(out, msg->mode);
        PUT_U64(out, ",\"token\":", msg->token);
        break;
    case EXTLOCK_MSG_SESSION_EXPIRED:
    case EXTLOCK_MSG_RELEASE_SESSION:
        PUT_STR(out, ",\"session\":", msg->session);
        if (msg->message) {
            PUT_STR(out, ",\"message\":", msg->message);
        }
        break;
    case EXTLOCK_MSG_SESSION_RELEASED:
        PUT_STR(out, ",\"session\":", msg->session);
        PUT_U64(out, ",\"released\":", msg->released);
        break;
    case EXTLOCK_MSG_FENCE_STATUS:
        PUT_STR(out, ",\"lock-space\":", msg->lock_space);
        PUT_STR(out, ",\"client-id\":", msg->client_id);
        if (msg->session_client) {
            PUT_STR(out, ",\"session-client\":", msg->session_client);
        }
        if (msg->session) {
            PUT_STR(out, ",\"session\":", msg->session);
        }
        APPEND_LIT(out, ",\"result\":\"");
        g_string_append(out, extlock_fence_result_name(msg->fence_result));
        out_putc(out, '"');
        if (msg->message) {
            PUT_STR(out, ",\"message\":", msg->message);
        }
        break;
    case EXTLOCK_MSG_PR_OUT:
        APPEND_LIT(out, ",\"action\":\"");
        g_string_append(out, extlock_pr_action_name(msg->pr_action));
        out_putc(out, '"');
        PUT_U64(out, ",\"pr-type\":", msg->pr_type);
        put_pr_key(out, ",\"key\":", msg->pr_key);
        put_pr_key(out, ",\"sa-key\":", msg->pr_sa_key);
        APPEND_LIT(out, ",\"aptpl\":");
        put_bool(out, msg->aptpl);
        if (msg->pr_request) {
            PUT_U64(out, ",\"request\":", msg->pr_request);
        }
        break;
    case EXTLOCK_MSG_PR_RESULT:
        APPEND_LIT(out, ",\"result\":\"");
        g_string_append(out, extlock_pr_status_name(msg->pr_result));
        out_putc(out, '"');
        PUT_U64(out, ",\"generation\":", msg->pr_generation);
        PUT_U64(out, ",\"seq\":", msg->pr_seq);
        break;
    case EXTLOCK_MSG_PR_STATUS:
    case EXTLOCK_MSG_PR_UPDATE:
        put_pr_state(out, msg->pr_seq, msg->pr);
        break;
    case EXTLOCK_MSG_PR_ACK:
    case EXTLOCK_MSG_PR_ACKED:
        PUT_U64(out, ",\"seq\":", msg->pr_seq);
        break;
    default:
        break;
    }
    APPEND_LIT(out, "}\n");
}

void extlock_format_error(GString *out, bool has_id, uint64_t id,
                          ExtlockErrorCode code, const char *fmt, ...)
{
    ExtlockMsg msg;
    va_list ap;

    extlock_msg_init(&msg, EXTLOCK_MSG_ERROR);
    msg.has_id = has_id;
    msg.id = id;
    msg.error = code;
    va_start(ap, fmt);
    msg.message = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    extlock_msg_format(&msg, out);
    g_free(msg.message);
}

/*
 * Line buffer
 *
 * Invariant: an unterminated line at the end of the buffer is stored with
 * at most lb->max_line bytes (EXTLOCK_MAX_LINE unless initialised with
 * extlock_linebuf_init_max()).  A stored partial line of that size can
 * only be part of an oversized line (its '\n' would make it longer than
 * the limit), so the rest of it is not stored; extlock_linebuf_next()
 * reports it once and then discards input up to and including its '\n'.
 */

void extlock_linebuf_init(ExtlockLineBuf *lb)
{
    extlock_linebuf_init_max(lb, EXTLOCK_MAX_LINE);
}

void extlock_linebuf_init_max(ExtlockLineBuf *lb, size_t max_line)
{
    lb->buf = g_byte_array_new();
    lb->pos = 0;
    lb->discarding = false;
    lb->max_line = max_line;
}

void extlock_linebuf_destroy(ExtlockLineBuf *lb)
{
    if (lb->buf) {
        g_byte_array_free(lb->buf, true);
        lb->buf = NULL;
    }
    lb->pos = 0;
    lb->discarding = false;
}

/* Length of the unterminated line at the end of the buffered data */
static size_t linebuf_tail(ExtlockLineBuf *lb)
{
    size_t n = lb->buf->len - lb->pos;
    const guint8 *start, *nl;

    if (!n) {
        return 0;       /* buf->data may be NULL: no arithmetic on it */
    }
    start = lb->buf->data + lb->pos;
    nl = memrchr(start, '\n', n);
    return nl ? (size_t)(start + n - (nl + 1)) : n;
}

void extlock_linebuf_append(ExtlockLineBuf *lb, const void *data, size_t len)
{
    const char *p = data;
    const char *last_nl;
    size_t tail, keep;

    if (lb->discarding) {
        const char *nl = memchr(p, '\n', len);

        if (!nl) {
            return;
        }
        lb->discarding = false;
        len -= nl + 1 - p;
        p = nl + 1;
    }

    /* Drop consumed lines; what is left is usually a short partial line */
    if (lb->pos) {
        size_t rest = lb->buf->len - lb->pos;

        if (rest) {
            memmove(lb->buf->data, lb->buf->data + lb->pos, rest);
        }
        g_byte_array_set_size(lb->buf, rest);
        lb->pos = 0;
    }
    if (!len) {
        return;
    }

    tail = linebuf_tail(lb);
    if (tail >= lb->max_line) {
        /* The stored partial line is already oversized: skip to its end */
        const char *nl = memchr(p, '\n', len);

        if (!nl) {
            return;
        }
        len -= nl - p;
        p = nl;
        tail = 0;
    }

    last_nl = memrchr(p, '\n', len);
    if (last_nl) {
        size_t head = last_nl + 1 - p;

        g_byte_array_append(lb->buf, (const guint8 *)p, head);
        p += head;
        len -= head;
        tail = 0;
    }
    keep = MIN(len, lb->max_line - tail);
    if (keep) {
        g_byte_array_append(lb->buf, (const guint8 *)p, keep);
    }
}

ExtlockLineResult extlock_linebuf_next(ExtlockLineBuf *lb, const char **line,
                                       size_t *len)
{
    size_t avail = lb->buf->len - lb->pos;
    const char *start, *nl;
    size_t n;

    if (!avail) {
        return EXTLOCK_LINE_NONE;   /* buf->data may be NULL */
    }
    start = (const char *)lb->buf->data + lb->pos;
    nl = memchr(start, '\n', avail);
    if (!nl) {
        if (avail >= lb->max_line) {
            /* Can only grow beyond the limit: report now, drop the rest */
            g_byte_array_set_size(lb->buf, lb->pos);
            lb->discarding = true;
            return EXTLOCK_LINE_TOO_LONG;
        }
        return EXTLOCK_LINE_NONE;
    }
    n = nl - start;
    lb->pos += n + 1;
    if (n + 1 > lb->max_line) {
        return EXTLOCK_LINE_TOO_LONG;
    }
    if (n && start[n - 1] == '\r') {
        n--;
    }
    *line = start;
    *len = n;
    return EXTLOCK_LINE_OK;
}
