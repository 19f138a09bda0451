/*
 * extlock: block filter that holds coordinator extent locks around I/O
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Every read holds a shared lock and every write (also compressed),
 * write-zeroes and discard an exclusive lock on the range it touches
 * (rounded out to the node's lock alignment) while the request runs in the
 * child.  Locks come from extlockd, which grants conflicting requests in
 * timestamp order, so several processes on several hosts can share one
 * image.
 *
 * The file reads top-down: options, open and close, the request path, the
 * other callbacks, reopen, then the BlockDriver table.
 */

#include "qemu/osdep.h"
#include "qapi/error.h"
#include "extlock-compat.h"
#include EXTLOCK_QDICT_H
#include "block/qdict.h"
#include "qapi/clone-visitor.h"
#include "qapi/qobject-input-visitor.h"
#include "qapi/qapi-visit-block-core.h"
#include "qapi/qapi-visit-sockets.h"
#include "qemu/cutils.h"
#include "qemu/error-report.h"
#include "qemu/module.h"
#include "block/block_int.h"
#include "crypto/tlscredsx509.h"
#include "extlock-int.h"
#include "extlock-pr.h"
#include "trace.h"

/* Option names the code needs by name: the schema holds the rest */
#define EXTLOCK_OPT_TLS_HOST    "tls-hostname"
#define EXTLOCK_OPT_TLS_CREDS   "tls-creds"

/* Ranges the schema cannot say (the types give the other bounds) */
#define EXTLOCK_GRANULARITY_MIN     512
#define EXTLOCK_GRANULARITY_MAX     (1U << 30)
#define EXTLOCK_CACHE_SIZE_MAX      1000000
#define EXTLOCK_MIN_HOLD_MAX        (10 * 1000 * 1000)
#define EXTLOCK_LONG_HOLD_MAX       (24 * 3600 * 1000)

/* Defaults, as documented in BlockdevOptionsExtlock */
#define EXTLOCK_GRANULARITY_DEFAULT 4096
#define EXTLOCK_CACHE_SIZE_DEFAULT  1024
#define EXTLOCK_CACHE_IDLE_DEFAULT  60000
#define EXTLOCK_LOSS_TIME_DEFAULT   60000
#define EXTLOCK_WAIT_WARN_DEFAULT   10000

/*
 * Strong options change the node's data: which image (lock-space) under
 * which coordinator.  Everything else only tunes how locks are taken.
 */
static const char *const extlock_strong_runtime_opts[] = {
    "lock-space",
    "coordinator.",
    "coordinators.",
    NULL
};

/*
 * Options that blockdev-reopen may change, and reset to their default
 * when they are left out: the lock cache's tuning and the policies, all
 * of which are read afresh whenever they are used (see
 * extlock_reopen_prepare()).
 */
static const char *const extlock_mutable_opts[] = {
    "lock-cache-size",
    "lock-cache-idle-time",
    "lock-cache-contended",
    "min-hold-time",
    "on-lease-loss",
    "lease-loss-timeout",
    "wait-warning-time",
    "long-hold-time",
    "on-stuck-io",
    NULL
};

/* Check one coordinator address, the members of @addr */
static bool extlock_check_address(QDict *addr, const char *what,
                                  Error **errp)
{
    SocketAddress *saddr = NULL;
    Visitor *v;
    bool ok;

    v = qobject_input_visitor_new_flat_confused(addr, errp);
    if (!v) {
        return false;
    }
    ok = visit_type_SocketAddress(v, NULL, &saddr, errp);
    if (!ok) {
        error_prepend(errp, "Invalid %s address: ", what);
    }
    visit_free(v);
    qapi_free_SocketAddress(saddr);
    return ok;
}

/*
 * @coordinator or @coordinators, exactly one, and a non-empty list.  The
 * visitor names a bad member of a union inside a struct without its path
 * ("Parameter 'type' ..."): check each address first, to say which one.
 */
static bool extlock_check_coordinator(QDict *options, Error **errp)
{
    g_autoptr(QDict) copy = qdict_clone_shallow(options);
    g_autoptr(QDict) addr = NULL;
    g_autoptr(QDict) list = NULL;
    QObject *whole = qdict_get(options, "coordinators");
    bool has_list;
    unsigned i;

    qdict_extract_subqdict(copy, &addr, "coordinator.");
    qdict_extract_subqdict(copy, &list, "coordinators.");
    has_list = whole || qdict_size(list);
    if (qdict_size(addr) && has_list) {
        error_setg(errp, "'coordinator' and 'coordinators' are mutually "
                   "exclusive");
        return false;
    }
    if (qdict_size(addr)) {
        return extlock_check_address(addr, "coordinator", errp);
    }
    if (!has_list) {
        error_setg(errp, "Either 'coordinator' or 'coordinators' is "
                   "required");
        return false;
    }
    if (whole) {
        /* The options are flattened: only an empty list stays a list */
        if (qobject_type(whole) != QTYPE_QLIST) {
            error_setg(errp, "Invalid parameter type for 'coordinators', "
                       "expected: array");
            return false;
        }
        error_setg(errp, "'coordinators' must not be empty");
        return false;
    }
    for (i = 0; qdict_size(list); i++) {
        g_autoptr(QDict) one = NULL;
        g_autofree char *prefix = g_strdup_printf("%u.", i);
        g_autofree char *what = g_strdup_printf("coordinators[%u]", i);

        qdict_extract_subqdict(list, &one, prefix);
        if (!qdict_size(one)) {
            error_setg(errp, "Invalid 'coordinators': no element %u, but "
                       "a later one", i);
            return false;
        }
        if (!extlock_check_address(one, what, errp)) {
            return false;
        }
    }
    return true;
}

/*
 * Parse @options into the QAPI-generated BlockdevOptions, as
 * copy-before-write does: the schema (BlockdevOptionsExtlock) checks
 * names, types, enums and mandatory members.  @options is not changed.
 * The child is not ours to parse (bdrv_open_file_child() opens it, and on
 * reopen the block layer has taken "file.*" away already), so it is
 * visited as an empty reference.  Nor are the generic options, which are
 * in @options on reopen only, and which the block layer has checked in
 * its own (legacy) syntax.
 */
static BlockdevOptions *extlock_parse_options(QDict *options, Error **errp)
{
    static const char *const generic_opts[] = {
        "node-name", "read-only", "auto-read-only", "force-share",
        "detect-zeroes", "discard", NULL
    };
    g_autoptr(QDict) copy = qdict_clone_shallow(options);
    BlockdevOptions *opts = NULL;
    Visitor *v;
    int i;

    qdict_extract_subqdict(copy, NULL, "file.");
    qdict_extract_subqdict(copy, NULL, "cache.");
    for (i = 0; generic_opts[i]; i++) {
        qdict_del(copy, generic_opts[i]);
    }
    qdict_put_str(copy, "file", "");
    qdict_put_str(copy, "driver", "extlock");
    if (!extlock_check_coordinator(copy, errp)) {
        return NULL;
    }
    v = qobject_input_visitor_new_flat_confused(copy, errp);
    if (!v) {
        return NULL;
    }
    visit_type_BlockdevOptions(v, NULL, &opts, errp);
    visit_free(v);
    return opts;
}

static bool extlock_check_name(const char *what, const char *name,
                               Error **errp)
{
    if (!*name) {
        error_setg(errp, "%s must not be empty", what);
        return false;
    }
    if (strlen(name) > EXTLOCK_MAX_NAME) {
        error_setg(errp, "%s must be at most %d bytes long", what,
                   EXTLOCK_MAX_NAME);
        return false;
    }
    return true;
}

static bool extlock_check_range(const char *what, uint64_t value,
                                uint64_t min, uint64_t max, const char *unit,
                                Error **errp)
{
    if (value >= min && value <= max) {
        return true;
    }
    if (min == 0) {
        error_setg(errp, "%s must be at most %" PRIu64 "%s", what, max, unit);
    } else {
        error_setg(errp, "%s must be between %" PRIu64 " and %" PRIu64 "%s",
                   what, min, max, unit);
    }
    return false;
}

/* What the schema cannot check: ranges, names, options that go together */
static bool extlock_check_options(BlockdevOptionsExtlock *o, Error **errp)
{
    if (!extlock_check_name("lock-space", o->lock_space, errp) ||
        (o->client_id && !extlock_check_name("client-id", o->client_id,
                                             errp))) {
        return false;
    }
    if (o->has_granularity &&
        (o->granularity < EXTLOCK_GRANULARITY_MIN ||
         o->granularity > EXTLOCK_GRANULARITY_MAX ||
         !is_power_of_2(o->granularity))) {
        error_setg(errp, "granularity must be a power of two between %d "
                   "and %u", EXTLOCK_GRANULARITY_MIN,
                   EXTLOCK_GRANULARITY_MAX);
        return false;
    }
    if ((o->has_lease_time &&
         !extlock_check_range("lease-time", o->lease_time,
                              EXTLOCK_MIN_LEASE_MS, EXTLOCK_MAX_LEASE_MS,
                              " ms", errp)) ||
        (o->has_lock_cache_size &&
         !extlock_check_range("lock-cache-size", o->lock_cache_size, 1,
                              EXTLOCK_CACHE_SIZE_MAX, "", errp)) ||
        (o->has_lock_cache_idle_time &&
         !extlock_check_range("lock-cache-idle-time",
                              o->lock_cache_idle_time, 1, UINT32_MAX, " ms",
                              errp)) ||
        (o->has_min_hold_time &&
         !extlock_check_range("min-hold-time", o->min_hold_time, 0,
                              EXTLOCK_MIN_HOLD_MAX, " us", errp)) ||
        (o->has_long_hold_time &&
         !extlock_check_range("long-hold-time", o->long_hold_time, 0,
                              EXTLOCK_LONG_HOLD_MAX, " ms", errp))) {
        return false;
    }
    if (o->tls_hostname && !o->tls_creds) {
        error_setg(errp, "'" EXTLOCK_OPT_TLS_HOST "' needs '"
                   EXTLOCK_OPT_TLS_CREDS "'");
        return false;
    }
    return true;
}

/* The tuning and policy options, with their defaults */
static void extlock_tuning_options(BlockdevOptionsExtlock *o,
                                   ExtlockClientOptions *co)
{
    co->cache_size = o->has_lock_cache_size ? o->lock_cache_size
                                            : EXTLOCK_CACHE_SIZE_DEFAULT;
    co->cache_idle_ms = o->has_lock_cache_idle_time
                        ? o->lock_cache_idle_time : EXTLOCK_CACHE_IDLE_DEFAULT;
    co->cache_contended = o->has_lock_cache_contended &&
                          o->lock_cache_contended;
    co->min_hold_us = o->has_min_hold_time ? o->min_hold_time : 0;
    co->lease_loss_error = o->has_on_lease_loss &&
        o->on_lease_loss == EXTENT_LOCK_LEASE_LOSS_POLICY_ERROR;
    co->lease_loss_timeout_ms = o->has_lease_loss_timeout
                                ? o->lease_loss_timeout
                                : EXTLOCK_LOSS_TIME_DEFAULT;
    co->wait_warning_ms = o->has_wait_warning_time ? o->wait_warning_time
                                                   : EXTLOCK_WAIT_WARN_DEFAULT;
    /* by default, a long hold is one a waiter would warn about */
    co->long_hold_ms = o->has_long_hold_time ? o->long_hold_time
                                             : co->wait_warning_ms;
    co->stuck_io_exit = !o->has_on_stuck_io ||
        o->on_stuck_io == EXTENT_LOCK_STUCK_IO_POLICY_EXIT;
}

/*
 * Remove from @options every option of ours (all but the child's), so
 * that the generic code does not report them as unsupported.
 */
static void extlock_consume_options(QDict *options)
{
    const QDictEntry *e, *next;

    for (e = qdict_first(options); e; e = next) {
        next = qdict_next(options, e);
        if (strcmp(e->key, "file") && !strstart(e->key, "file.", NULL)) {
            qdict_del(options, e->key);
        }
    }
}

/* The credentials object @id, which must be a TLS client's; not referenced */
static QCryptoTLSCreds *extlock_get_tls_creds(const char *id, Error **errp)
{
    Object *obj = object_resolve_path_component(object_get_objects_root(),
                                                id);
    QCryptoTLSCreds *creds;

    if (!obj) {
        error_setg(errp, "No TLS credentials with id '%s'", id);
        return NULL;
    }
    creds = (QCryptoTLSCreds *)object_dynamic_cast(obj,
                                                   TYPE_QCRYPTO_TLS_CREDS);
    if (!creds) {
        error_setg(errp, "Object with id '%s' is not TLS credentials", id);
        return NULL;
    }
    if (!qcrypto_tls_creds_check_endpoint(creds,
                                          QCRYPTO_TLS_CREDS_ENDPOINT_CLIENT,
                                          errp)) {
        error_prepend(errp, "TLS credentials '%s': ", id);
        return NULL;
    }
    return creds;
}

static bool extlock_all_inet(SocketAddressList *list)
{
    for (; list; list = list->next) {
        if (list->value->type != SOCKET_ADDRESS_TYPE_INET) {
            return false;
        }
    }
    return true;
}

static int extlock_open(BlockDriverState *bs, QDict *options, int flags,
                        Error **errp)
{
    BDRVExtlockState *s = bs->opaque;
    g_autoptr(BlockdevOptions) full_opts = NULL;
    BlockdevOptionsExtlock *o;
    QCryptoTLSCreds *tls_creds = NULL;
    g_autoptr(SocketAddressList) coordinators = NULL;
    const char *tls_hostname;
    int64_t len;
    int ret;

    full_opts = extlock_parse_options(options, errp);
    if (!full_opts) {
        return -EINVAL;
    }
    assert(full_opts->driver == BLOCKDEV_DRIVER_EXTLOCK);
    o = &full_opts->u.extlock;
    if (!extlock_check_options(o, errp)) {
        return -EINVAL;
    }
    extlock_consume_options(options);
    if (o->coordinators) {
        coordinators = QAPI_CLONE(SocketAddressList, o->coordinators);
    } else {
        QAPI_LIST_PREPEND(coordinators,
                          QAPI_CLONE(SocketAddress, o->coordinator));
    }

    tls_hostname = o->tls_hostname;
    if (o->tls_creds) {
        tls_creds = extlock_get_tls_creds(o->tls_creds, errp);
        if (!tls_creds) {
            return -EINVAL;
        }
        /*
         * As nbd: an inet coordinator's host is the name to verify (the
         * connection takes each address's own host).  QEMU's x509 client
         * checks the name; say so now, not at connect.
         */
        if (!tls_hostname && !extlock_all_inet(coordinators) &&
            object_dynamic_cast(OBJECT(tls_creds),
                                TYPE_QCRYPTO_TLS_CREDS_X509)) {
            error_setg(errp, "x509 credentials need '" EXTLOCK_OPT_TLS_HOST
                       "' with a coordinator that is not inet");
            return -EINVAL;
        }
    }

    ret = bdrv_open_file_child(NULL, options, "file", bs, errp);
    if (ret < 0) {
        return ret;
    }
    bdrv_graph_rdlock_main_loop();
    if (!extlock_stack_check(bs->file->bs,
                             !o->has_allocation_check || o->allocation_check,
                             &s->stack, errp)) {
        bdrv_graph_rdunlock_main_loop();
        return -EINVAL;
    }
    bs->supported_write_flags = BDRV_REQ_WRITE_UNCHANGED |
        (BDRV_REQ_FUA & bs->file->bs->supported_write_flags);
    bs->supported_zero_flags = BDRV_REQ_WRITE_UNCHANGED |
        ((BDRV_REQ_FUA | BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK) &
         bs->file->bs->supported_zero_flags);
    if (s->stack.metadata_frozen) {
        /* Zeroes are written as data: never unmapped, never fast */
        bs->supported_zero_flags = BDRV_REQ_WRITE_UNCHANGED |
            (BDRV_REQ_FUA & bs->file->bs->supported_write_flags);
    }

    s->lock_space = g_strdup(o->lock_space);
    if (o->client_id) {
        s->client_id = g_strdup(o->client_id);
    } else {
        g_autofree char *host = g_strdup(g_get_host_name());
        s->client_id = g_strdup_printf("%s/%s", host, bdrv_get_node_name(bs));
    }
    s->granularity = o->has_granularity ? o->granularity
                                        : EXTLOCK_GRANULARITY_DEFAULT;
    s->lease_ms = o->has_lease_time ? o->lease_time : 0;
    s->cache_opts.cache = !o->has_lock_cache || o->lock_cache;
    extlock_tuning_options(o, &s->cache_opts);

    /* Granted extents may grow up to the end of the image */
    len = bdrv_getlength(bs->file->bs);
    bdrv_graph_rdunlock_main_loop();
    if (len < 0) {
        error_setg_errno(errp, -len, "Could not get the image length");
        ret = len;
        goto fail;
    }
    s->cache_opts.grow_limit = QEMU_ALIGN_UP((uint64_t)len, s->granularity);

    s->coordinators = g_steal_pointer(&coordinators);
    s->client = extlock_client_new(s->coordinators, s->client_id,
                                   s->lock_space, s->lease_ms,
                                   &s->cache_opts, tls_creds, tls_hostname,
                                   bdrv_get_node_name(bs), bs,
                                   bdrv_get_aio_context(bs), errp);
    if (!s->client) {
        ret = -EIO;
        goto fail;
    }
    s->tls_creds_id = g_strdup(o->tls_creds);
    s->tls_hostname = g_strdup(tls_hostname);
    extlock_maint_init(&s->maint, bs, s->client, s->stack.metadata_frozen);
    trace_extlock_open(bdrv_get_node_name(bs), s->lock_space, s->client_id,
                       s->granularity);
    return 0;

fail:
    qapi_free_SocketAddressList(s->coordinators);
    s->coordinators = NULL;
    g_free(s->lock_space);
    g_free(s->client_id);
    s->lock_space = s->client_id = NULL;
    return ret;
}

static void extlock_detach_aio_context(BlockDriverState *bs);

/* Not the backing file of another node (an external snapshot) */
static int GRAPH_RDLOCK
extlock_check_perm(BlockDriverState *bs, uint64_t perm, uint64_t shared,
                   Error **errp)
{
    BDRVExtlockState *s = bs->opaque;

    if (!s->maint.blocker) {
        return 0;               /* still opening */
    }
    return extlock_maint_refuse_backing(&s->maint, errp);
}

static void extlock_close(BlockDriverState *bs)
{
    BDRVExtlockState *s = bs->opaque;

    /* Drained: out of its AioContext in its thread first, as for a move */
    if (s->client) {
        extlock_detach_aio_context(bs);
    }
    extlock_client_free(s->client);
    s->client = NULL;
    extlock_maint_cleanup(&s->maint);
    qapi_free_SocketAddressList(s->coordinators);
    g_free(s->lock_space);
    g_free(s->client_id);
    g_free(s->tls_creds_id);
    g_free(s->tls_hostname);
}

typedef enum ExtlockIoKind {
    EXTLOCK_IO_READ,
    EXTLOCK_IO_WRITE,
    EXTLOCK_IO_WRITE_COMPRESSED,
    EXTLOCK_IO_ZERO,
    EXTLOCK_IO_DISCARD,
    EXTLOCK_IO_FLUSH,
} ExtlockIoKind;

static const char *const extlock_io_kind_names[] = {
    [EXTLOCK_IO_READ] = "read",
    [EXTLOCK_IO_WRITE] = "write",
    [EXTLOCK_IO_WRITE_COMPRESSED] = "write-compressed",
    [EXTLOCK_IO_ZERO] = "zero",
    [EXTLOCK_IO_DISCARD] = "discard",
    [EXTLOCK_IO_FLUSH] = "flush",
};

/*
 * Forward one request to the child: under @req's lock, or with @req NULL
 * under none (flush, zero-length requests).  Counted for the in-flight
 * bound and traced with the token it runs under.  Always inlined into its
 * callers: on a cached request its call and the spilling of eight
 * arguments were a tenth of the filter's instructions.
 */
static inline int coroutine_fn GRAPH_RDLOCK QEMU_ALWAYS_INLINE
extlock_forward(BlockDriverState *bs, ExtlockIoKind kind, int64_t offset,
                int64_t bytes, QEMUIOVector *qiov, size_t qiov_offset,
                BdrvRequestFlags flags, ExtlockRequest *req)
{
    BDRVExtlockState *s = bs->opaque;
    int64_t child_start = req && req->child_ns < 0 ?
                          qemu_clock_get_ns(QEMU_CLOCK_REALTIME) : 0;
    int ret;

    if (trace_event_get_state_backends(TRACE_EXTLOCK_IO_START)) {
        trace_extlock_io_start(bdrv_get_node_name(bs),
                               extlock_io_kind_names[kind], offset, bytes,
                               req ? req->lock->lock_id : 0,
                               req ? req->lock->token : 0,
                               qemu_clock_get_ns(QEMU_CLOCK_REALTIME));
    }
    extlock_client_io_start(s->client);
    switch (kind) {
    case EXTLOCK_IO_READ:
        ret = bdrv_co_preadv_part(bs->file, offset, bytes, qiov, qiov_offset,
                                  flags);
        break;
    case EXTLOCK_IO_WRITE:
        ret = bdrv_co_pwritev_part(bs->file, offset, bytes, qiov,
                                   qiov_offset, flags);
        break;
    case EXTLOCK_IO_WRITE_COMPRESSED:
        ret = bdrv_co_pwritev_part(bs->file, offset, bytes, qiov,
                                   qiov_offset,
                                   flags | BDRV_REQ_WRITE_COMPRESSED);
        break;
    case EXTLOCK_IO_ZERO:
        if (s->stack.metadata_frozen) {
            s->stack.zero_writes_as_data++;
            ret = extlock_stack_co_zero_as_data(bs->file, offset, bytes,
                                                flags);
            break;
        }
        ret = bdrv_co_pwrite_zeroes(bs->file, offset, bytes, flags);
        break;
    case EXTLOCK_IO_DISCARD:
        ret = bdrv_co_pdiscard(bs->file, offset, bytes);
        break;
    default:
        ret = bdrv_co_flush(bs->file->bs);
        break;
    }
    if (child_start) {
        req->child_ns = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) - child_start;
    }
    extlock_client_io_done(s->client);
    if (trace_event_get_state_backends(TRACE_EXTLOCK_IO_DONE)) {
        trace_extlock_io_done(bdrv_get_node_name(bs),
                              extlock_io_kind_names[kind], offset, bytes,
                              req ? req->lock->token : 0, ret,
                              qemu_clock_get_ns(QEMU_CLOCK_REALTIME));
    }
    return ret;
}

/*
 * Run a request under a lock on the range it touches, rounded out to
 * s->lock_alignment (see extlock_refresh_limits()), in @mode.  A
 * zero-length request touches nothing and needs no lock (the coordinator
 * has no empty locks).
 */
static int coroutine_fn GRAPH_RDLOCK
extlock_locked_io_here(BlockDriverState *bs, ExtlockIoKind kind,
                       ExtlockMode mode, int64_t offset, int64_t bytes,
                       QEMUIOVector *qiov, size_t qiov_offset,
                       BdrvRequestFlags flags)
{
    BDRVExtlockState *s = bs->opaque;
    const char *op = extlock_io_kind_names[kind];
    ExtlockRequest req = {};
    int64_t cost_start = 0;
    bool recheck;
    int ret;

    if (bytes == 0) {
        /* Not while the metadata is reread (extlock-maint.h) */
        ret = extlock_maint_enter(&s->maint, false);
        if (ret < 0) {
            return ret;
        }
        ret = extlock_forward(bs, kind, offset, bytes, qiov, qiov_offset,
                              flags, NULL);
        extlock_maint_exit(&s->maint);
        return ret;
    }
    /* Filter cost (trace extlock_filter_cost): child_ns < 0 asks for it */
    if (trace_event_get_state_backends(TRACE_EXTLOCK_FILTER_COST)) {
        cost_start = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
        req.child_ns = -1;
    }
    req.mode = mode;
    req.offset = QEMU_ALIGN_DOWN((uint64_t)offset, s->lock_alignment);
    req.length = QEMU_ALIGN_UP((uint64_t)offset + bytes, s->lock_alignment) -
                 req.offset;
    /* bdrv_get_node_name() is a call: not made while the event is off */
    if (trace_event_get_state_backends(TRACE_EXTLOCK_REQUEST)) {
        trace_extlock_request(bdrv_get_node_name(bs), op, offset, bytes,
                              req.offset, req.length);
    }
    ret = extlock_client_lock(s->client, &req);
    if (ret < 0) {
        trace_extlock_request_failed(bdrv_get_node_name(bs), op, offset,
                                     bytes, ret);
        return ret;
    }
    /*
     * A persistent reservation that excludes this node (extlock-pr.h).
     * Checked under the lock: its grant came after the reservation state
     * on the same connection, so the state is the current one.
     */
    if (!extlock_pr_io_start(s->client->pr, kind != EXTLOCK_IO_READ)) {
        extlock_client_unlock(s->client, &req);
        return -EBADE;
    }
    /*
     * After the grant: it may show a maintenance (extlock-maint.h).  A
     * plain cache hit with no maintenance busy or due does not yield
     * between extlock_client_lock(), which checked the lease and found
     * the lock valid, and the child: nothing can have changed, so the
     * check below (and its clock read) is left out.
     */
    recheck = req.waited || s->maint.busy || s->client->maint_reload;
    ret = extlock_maint_enter(&s->maint, true);
    if (ret == 0) {
        /*
         * The reread may have taken a while: the lease checked when the
         * lock was taken must still hold and the lock must still be this
         * session's, else other hosts may own the extent by now
         */
        if (!recheck || extlock_client_lock_valid_now(s->client, &req)) {
            ret = extlock_forward(bs, kind, offset, bytes, qiov, qiov_offset,
                                  flags, &req);
        } else {
            ret = -EIO;
        }
        extlock_maint_exit(&s->maint);
    }
    extlock_client_unlock(s->client, &req);
    if (kind != EXTLOCK_IO_READ) {
        /* A read counted nothing in extlock_pr_io_start() */
        extlock_pr_io_done(s->client->pr, true);
    }
    if (req.child_ns > 0 && !req.waited) {
        extlock_client_add_cost(s->client,
                                qemu_clock_get_ns(QEMU_CLOCK_REALTIME) -
                                cost_start - req.child_ns);
    }
    return ret;
}

/*
 * The node's AioContext.  The lock client and its connection live there:
 * their fd handler, timers and wait lists are touched by that thread only,
 * and a reply wakes a request with aio_co_wake(), which enters it at once
 * in that thread.  QEMU 10.0's block layer runs a request in the
 * AioContext of the thread that submitted it (the main loop's for HMP
 * qemu-io or a job, any iothread with multiqueue), not the node's: such
 * a request moves into the node's AioContext for as long as it uses the
 * client, and back.  (Left in its own thread, it raced the node's thread
 * on the client's lists, and a grant read there before the request had
 * yielded for it was a wake-up it consumed later, in the middle of its
 * write to the child: that write returned -EINPROGRESS and the thread
 * pool then woke a finished coroutine.)  In QEMU 7.2 a request always
 * runs in the node's AioContext and nothing moves.
 */
static AioContext *coroutine_fn extlock_co_enter_node(BlockDriverState *bs)
{
    if (qemu_get_current_aio_context() == bdrv_get_aio_context(bs)) {
        return NULL;
    }
    return bdrv_co_enter(bs);
}

static void coroutine_fn extlock_co_leave_node(BlockDriverState *bs,
                                               AioContext *home)
{
    if (home) {
        bdrv_co_leave(bs, home);
    }
}

static int coroutine_fn GRAPH_RDLOCK
extlock_locked_io(BlockDriverState *bs, ExtlockIoKind kind, ExtlockMode mode,
                  int64_t offset, int64_t bytes, QEMUIOVector *qiov,
                  size_t qiov_offset, BdrvRequestFlags flags)
{
    AioContext *home = extlock_co_enter_node(bs);
    int ret;

    ret = extlock_locked_io_here(bs, kind, mode, offset, bytes, qiov,
                                 qiov_offset, flags);
    extlock_co_leave_node(bs, home);
    return ret;
}

static int coroutine_fn GRAPH_RDLOCK
extlock_co_preadv_part(BlockDriverState *bs, int64_t offset, int64_t bytes,
                       QEMUIOVector *qiov, size_t qiov_offset,
                       BdrvRequestFlags flags)
{
    return extlock_locked_io(bs, EXTLOCK_IO_READ, EXTLOCK_MODE_SHARED,
                             offset, bytes, qiov, qiov_offset, flags);
}

static int coroutine_fn GRAPH_RDLOCK
extlock_co_pwritev_part(BlockDriverState *bs, int64_t offset, int64_t bytes,
                        QEMUIOVector *qiov, size_t qiov_offset,
                        BdrvRequestFlags flags)
{
    return extlock_locked_io(bs, EXTLOCK_IO_WRITE, EXTLOCK_MODE_EXCLUSIVE,
                             offset, bytes, qiov, qiov_offset, flags);
}

/*
 * A compressed write is a write (the format node below compresses it),
 * so it is as safe as one under the same exclusive lock.  The block layer
 * offers compressed writes through a filter only if the node below
 * supports them (bdrv_supports_compressed_writes()).
 */
static int coroutine_fn GRAPH_RDLOCK extlock_co_pwritev_compressed_part(
    BlockDriverState *bs, int64_t offset, int64_t bytes, QEMUIOVector *qiov,
    size_t qiov_offset)
{
    BDRVExtlockState *s = bs->opaque;

    if (s->stack.metadata_frozen) {
        /* A compressed cluster is a new allocation: qcow2 metadata */
        return -ENOTSUP;
    }
    return extlock_locked_io(bs, EXTLOCK_IO_WRITE_COMPRESSED,
                             EXTLOCK_MODE_EXCLUSIVE, offset, bytes, qiov,
                             qiov_offset, 0);
}

static int coroutine_fn GRAPH_RDLOCK
extlock_co_pwrite_zeroes(BlockDriverState *bs, int64_t offset, int64_t bytes,
                         BdrvRequestFlags flags)
{
    return extlock_locked_io(bs, EXTLOCK_IO_ZERO, EXTLOCK_MODE_EXCLUSIVE,
                             offset, bytes, NULL, 0, flags);
}

static int coroutine_fn GRAPH_RDLOCK
extlock_co_pdiscard(BlockDriverState *bs, int64_t offset, int64_t bytes)
{
    BDRVExtlockState *s = bs->opaque;

    if (s->stack.metadata_frozen) {
        /* qcow2 would free clusters: a discard is only a hint, drop it */
        s->stack.discards_ignored++;
        return 0;
    }
    return extlock_locked_io(bs, EXTLOCK_IO_DISCARD, EXTLOCK_MODE_EXCLUSIVE,
                             offset, bytes, NULL, 0, 0);
}

/*
 * Block status.
 *
 * With @want_zero, the caller wants to know which parts read as zeroes,
 * and may act on the answer piece by piece.  An NBD server with
 * structured replies (libnbd's and QEMU's client default) does so for
 * every read: it asks block status first, then reads each data piece and
 * sends each zero piece as a hole (nbd_co_send_sparse_read() in
 * nbd/server.c).  Anything but one answer covering the whole request
 * would split the read into several requests, each under its own lock,
 * and another host's write could land between them.  So the answer is
 * "data" for the whole range, which is always correct: the server reads
 * the range in one request under one shared lock.  What it costs is
 * sparseness (qemu-img map, sparse copies).
 *
 * Without @want_zero, the caller only asks what is allocated where
 * (bdrv_is_allocated(): block jobs, copy-on-read, qemu-io map, NBD's
 * qemu:allocation-depth) and reads nothing on the strength of the answer,
 * so the child answers, as for any filter.  (qemu-img map skips filters
 * altogether.)
 *
 * No lock either way: neither answer reads the image under us (the
 * child's allocation is as racy as any block status of a shared image).
 */
static int coroutine_fn GRAPH_RDLOCK
extlock_co_block_status(BlockDriverState *bs, bool want_zero, int64_t offset,
                        int64_t bytes, int64_t *pnum, int64_t *map,
                        BlockDriverState **file)
{
    *pnum = bytes;
    *map = offset;
    *file = bs->file->bs;
    if (!want_zero) {
        return BDRV_BLOCK_RAW | BDRV_BLOCK_OFFSET_VALID;
    }
    return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID;
}

static int coroutine_fn GRAPH_RDLOCK
extlock_co_flush(BlockDriverState *bs)
{
    BDRVExtlockState *s = bs->opaque;
    AioContext *home = extlock_co_enter_node(bs);
    int ret;

    /* A flush orders nothing between hosts: no lock; not in a reread */
    ret = extlock_maint_enter(&s->maint, false);
    if (ret == 0) {
        ret = extlock_forward(bs, EXTLOCK_IO_FLUSH, 0, 0, NULL, 0, 0, NULL);
        extlock_maint_exit(&s->maint);
    }
    extlock_co_leave_node(bs, home);
    return ret;
}

/*
 * block_resize: a cluster-wide maintenance (extlock-maint.h).  Every
 * other host stops and rereads the metadata, so all of them see the new
 * size.  Only growing: a shrink would drop data that other hosts may hold
 * locks on or have cached.
 */
static int coroutine_fn GRAPH_RDLOCK
extlock_co_truncate(BlockDriverState *bs, int64_t offset, bool exact,
                    PreallocMode prealloc, BdrvRequestFlags flags,
                    Error **errp)
{
    BDRVExtlockState *s = bs->opaque;
    int64_t len = extlock_co_child_getlength(bs->file->bs);
    AioContext *home;
    int ret;

    if (len < 0) {
        error_setg_errno(errp, -len, "extlock: could not get the length of "
                         "node '%s'", bdrv_get_node_name(bs->file->bs));
        return len;
    }
    /* Checked before the maintenance starts: a bad size changes nothing */
    if (!QEMU_IS_ALIGNED(offset, BDRV_SECTOR_SIZE)) {
        error_setg(errp, "extlock: node '%s': the new size must be a "
                   "multiple of 512 bytes", bdrv_get_node_name(bs));
        return -EINVAL;
    }
    if (offset < len) {
        error_setg(errp, "extlock: node '%s': cannot shrink the shared image "
                   "from %" PRId64 " to %" PRId64 " bytes (other hosts may "
                   "use the end); only growing is supported",
                   bdrv_get_node_name(bs), len, offset);
        return -ENOTSUP;
    }
    if (offset == len) {
        return 0;
    }
    /* Its maintenance lock would wait behind the freeze (to its timeout) */
    if (!extlock_freeze_check_resize(bdrv_get_node_name(bs), s->lock_space,
                                     errp)) {
        return -EBUSY;
    }
    if (s->stack.metadata_frozen && prealloc == PREALLOC_MODE_OFF) {
        /* Allocate every new cluster now: guest writes never allocate */
        prealloc = PREALLOC_MODE_METADATA;
    }
    /* Its lock requests run in the node's context, as I/O requests do */
    home = extlock_co_enter_node(bs);
    ret = extlock_maint_truncate(&s->maint, offset, exact, prealloc, flags,
                                 errp);
    extlock_co_leave_node(bs, home);
    return ret;
}

/*
 * Internal snapshots (blockdev-snapshot-internal-sync and -delete- on this
 * node): cluster-wide maintenances, extlock-maint.h.  These callbacks have
 * no Error to return, so the reason of a failure is reported here.
 */
static int GRAPH_RDLOCK
extlock_snapshot_create(BlockDriverState *bs, QEMUSnapshotInfo *sn)
{
    BDRVExtlockState *s = bs->opaque;
    Error *err = NULL;
    int ret;

    if (sn->vm_state_size) {
        /* Not reached: extlock_save_vmstate() refuses the state first */
        error_report("extlock: node '%s': a snapshot with VM state cannot "
                     "be stored in a shared image", bdrv_get_node_name(bs));
        return -ENOTSUP;
    }
    if (!bdrv_can_snapshot(bs->file->bs)) {
        return -ENOTSUP;
    }
    ret = extlock_maint_snapshot(&s->maint, sn, NULL, NULL, &err);
    if (ret < 0) {
        error_report_err(err);
    }
    return ret;
}

static int GRAPH_RDLOCK
extlock_snapshot_delete(BlockDriverState *bs, const char *snapshot_id,
                        const char *name, Error **errp)
{
    BDRVExtlockState *s = bs->opaque;

    return extlock_maint_snapshot(&s->maint, NULL, snapshot_id, name, errp);
}

/*
 * Going back to a snapshot would replace every host's disk under its
 * running guest, and share every cluster with the snapshot again
 */
static int GRAPH_UNLOCKED
extlock_snapshot_goto(BlockDriverState *bs, const char *snapshot_id)
{
    error_report("extlock: node '%s' is a shared image: going back to "
                 "snapshot '%s' under running guests is not supported; stop "
                 "every host and use 'qemu-img snapshot -a'",
                 bdrv_get_node_name(bs), snapshot_id);
    return -ENOTSUP;
}

/*
 * savevm/snapshot-save would write the VM state into the image (qcow2
 * allocates clusters for it) outside a maintenance
 */
static int coroutine_fn GRAPH_RDLOCK
extlock_save_vmstate(BlockDriverState *bs, QEMUIOVector *qiov, int64_t pos)
{
    error_report("extlock: node '%s' is a shared image: it cannot hold VM "
                 "state; take a disk-only snapshot with "
                 "blockdev-snapshot-internal-sync, or store the VM state on "
                 "another node (snapshot-save's vmstate)",
                 bdrv_get_node_name(bs));
    return -ENOTSUP;
}

/*
 * A persistent dirty bitmap is stored in qcow2's metadata when the image
 * closes, by each host on its own: refused
 */
static bool coroutine_fn GRAPH_RDLOCK
extlock_co_can_store_new_dirty_bitmap(BlockDriverState *bs, const char *name,
                                      uint32_t granularity, Error **errp)
{
    error_setg(errp, "extlock: node '%s' is a shared image: persistent dirty "
               "bitmaps are stored in its metadata by every host on its own "
               "and are not supported; add bitmap '%s' with "
               "persistent=false", bdrv_get_node_name(bs), name);
    return false;
}

static int64_t coroutine_fn GRAPH_RDLOCK
extlock_co_getlength(BlockDriverState *bs)
{
    return extlock_co_child_getlength(bs->file->bs);
}

/*
 * Limits.  The generic code starts from the child's (all but its request
 * alignment); every limit that would make the block layer split or pad a
 * request *above* us is taken away, so that the whole request reaches us
 * and runs under one lock, and the child splits or pads it under that
 * lock instead:
 *
 * - no max_transfer, max_pwrite_zeroes or max_pdiscard, and no zero or
 *   discard alignment: split above us, one guest request would take
 *   several locks, and another host's request could land between the
 *   pieces;
 * - request_alignment 1 (the generic default for us, said explicitly):
 *   padding an unaligned write above us would be a read under a shared
 *   lock, then a write under an exclusive one, and another host could
 *   write the padding in between (a lost update).
 *
 * The child pads an unaligned request to its own request_alignment with a
 * read-modify-write, under our lock: so locks are rounded out to at least
 * that alignment (s->lock_alignment), or the padding would be unlocked.
 *
 * Called by the generic code with the node drained (open, reopen, child
 * changes), so no request runs while s->lock_alignment changes.
 */
static void GRAPH_RDLOCK
extlock_refresh_limits(BlockDriverState *bs, Error **errp)
{
    BDRVExtlockState *s = bs->opaque;

    s->lock_alignment = MAX(s->granularity,
                            bs->file->bs->bl.request_alignment);
    bs->bl.request_alignment = 1;
    bs->bl.max_transfer = 0;
    bs->bl.pwrite_zeroes_alignment = 0;
    bs->bl.max_pwrite_zeroes = 0;
    bs->bl.pdiscard_alignment = 0;
    bs->bl.max_pdiscard = 0;
    bs->bl.pr_cap = 1;          /* persistent reservations: extlock-pr.c */
    trace_extlock_refresh_limits(bdrv_get_node_name(bs), s->lock_alignment);
}

static void GRAPH_RDLOCK
extlock_child_perm(BlockDriverState *bs, BdrvChild *c, BdrvChildRole role,
                   BlockReopenQueue *reopen_queue, uint64_t perm,
                   uint64_t shared, uint64_t *nperm, uint64_t *nshared)
{
    bdrv_default_perms(bs, c, role, reopen_queue, perm, shared,
                       nperm, nshared);
    /*
     * Writers on other nodes and hosts are exactly what we coordinate:
     * let them write (and read consistently) through their own extlock
     * nodes.  Resizing stays exclusive.
     */
    *nshared |= BLK_PERM_WRITE | BLK_PERM_WRITE_UNCHANGED |
                BLK_PERM_CONSISTENT_READ;
    if (((BDRVExtlockState *)bs->opaque)->maint.copying) {
        /* A snapshot's copy writes through the child (extlock-maint.c) */
        *nperm |= BLK_PERM_WRITE;
    }
}

/*
 * AioContext changes.  The generic code calls these in the main loop with
 * the node drained, but a drained node's connection still works in its
 * AioContext: the lease is renewed, replies and revocations are read.  In
 * QEMU 10.0 that AioContext runs in its iothread without any lock, so the
 * fd handler and the timers are taken out and put in from that thread
 * (extlock_run_in_aio_context()), never while one of them runs there.
 */
typedef struct ExtlockCtxJob {
    ExtlockClient *client;
    AioContext *ctx;
} ExtlockCtxJob;

static void extlock_detach_job(void *opaque)
{
    ExtlockCtxJob *job = opaque;

    extlock_client_detach_aio_context(job->client);
}

static void extlock_attach_job(void *opaque)
{
    ExtlockCtxJob *job = opaque;

    extlock_client_attach_aio_context(job->client, job->ctx);
}

static void extlock_detach_aio_context(BlockDriverState *bs)
{
    BDRVExtlockState *s = bs->opaque;
    ExtlockCtxJob job = { .client = s->client };

    /* Still the old AioContext */
    extlock_run_in_aio_context(bdrv_get_aio_context(bs), extlock_detach_job,
                               &job);
}

static void extlock_attach_aio_context(BlockDriverState *bs,
                                       AioContext *new_context)
{
    BDRVExtlockState *s = bs->opaque;
    ExtlockCtxJob job = { .client = s->client, .ctx = new_context };

    extlock_run_in_aio_context(new_context, extlock_attach_job, &job);
}

/* Drain: see extlock_client_drain_begin() and docs/qemu-driver.rst */
static void EXTLOCK_DRAIN_FN extlock_co_drain_begin(BlockDriverState *bs)
{
    BDRVExtlockState *s = bs->opaque;
    extlock_client_drain_begin(s->client);
}

static void EXTLOCK_DRAIN_FN extlock_co_drain_end(BlockDriverState *bs)
{
    BDRVExtlockState *s = bs->opaque;
    extlock_client_drain_end(s->client);
}

/* Requests waiting for another host, the connection or the lease fail */
static void extlock_cancel_in_flight(BlockDriverState *bs)
{
    BDRVExtlockState *s = bs->opaque;
    extlock_client_cancel_waits(s->client);
}

/*
 * Reopen.
 *
 * What may change is the lock cache's tuning and the policies
 * (extlock_mutable_opts): the lock code reads them from the client's
 * options whenever it uses them, so new values take effect from the next
 * request, revocation or timer armed (a timer already armed keeps its
 * deadline).  Nothing has to be undone, so prepare only parses and
 * checks, commit copies the values in, and abort drops them.
 *
 * Everything else stays, and the generic code refuses a change ("Cannot
 * change the option") because prepare leaves those options in
 * reopen_state->options for it to compare:
 * - lock-space and coordinator (or coordinators) name the data (strong
 *   options);
 * - client-id, lease-time, tls-creds and tls-hostname belong to the
 *   coordinator session: changing them means a new session, which drops
 *   every lock the node holds (blockdev-del and blockdev-add do that);
 * - lock-cache: turning it off would have to give back every cached lock,
 *   coordinator I/O that commit, which may not fail, cannot do;
 * - granularity: held locks are aligned to it, and nothing needs to change
 *   it on a live node.
 * read-only may change: the locks do not depend on it.
 */
static int extlock_reopen_prepare(BDRVReopenState *reopen_state,
                                  BlockReopenQueue *queue, Error **errp)
{
    BDRVExtlockState *s = reopen_state->bs->opaque;
    g_autoptr(BlockdevOptions) full_opts = NULL;
    ExtlockClientOptions *opts;
    int i;

    full_opts = extlock_parse_options(reopen_state->options, errp);
    if (!full_opts) {
        return -EINVAL;
    }
    if (!extlock_check_options(&full_opts->u.extlock, errp)) {
        return -EINVAL;
    }
    opts = g_new(ExtlockClientOptions, 1);
    *opts = s->cache_opts;
    extlock_tuning_options(&full_opts->u.extlock, opts);
    reopen_state->opaque = opts;

    /* These are ours now; the rest is compared with the old values */
    for (i = 0; extlock_mutable_opts[i]; i++) {
        qdict_del(reopen_state->options, extlock_mutable_opts[i]);
    }
    return 0;
}

static void extlock_reopen_commit(BDRVReopenState *reopen_state)
{
    BDRVExtlockState *s = reopen_state->bs->opaque;
    ExtlockClientOptions *opts = reopen_state->opaque;

    s->cache_opts = *opts;
    extlock_client_set_options(s->client, opts);
    trace_extlock_reopen(bdrv_get_node_name(reopen_state->bs));
    g_free(opts);
    reopen_state->opaque = NULL;
}

static void extlock_reopen_abort(BDRVReopenState *reopen_state)
{
    g_free(reopen_state->opaque);
    reopen_state->opaque = NULL;
}

void extlock_get_counters(ExtlockClient *c, ExtentLockCounters *out)
{
    const ExtlockClientStats *st = extlock_client_stats(c);
    ExtlockConnInfo conn;

    extlock_conn_get_info(extlock_client_conn(c), &conn);
    *out = (ExtentLockCounters) {
        .requests = st->requests,
        .cache_hits = st->cache_hits,
        .grants = st->grants,
        .waits = st->waits,
        .total_wait_us = st->total_wait_us,
        .errors = st->errors,
        .revocations = st->revocations,
        .revocation_wait_us = st->revocation_us,
        .revocation_max_us = st->revocation_max_us,
        .downgrades = st->downgrades,
        .cache_evictions = st->cache_evictions,
        .contended_releases = st->contended_releases,
        .reconnects = conn.reconnects,
        .lease_losses = conn.lease_losses,
    };
}

/* The node's counters: query-blockstats' driver-specific part */
static BlockStatsSpecific *extlock_get_specific_stats(BlockDriverState *bs)
{
    BDRVExtlockState *s = bs->opaque;
    BlockStatsSpecific *stats = g_new0(BlockStatsSpecific, 1);

    stats->driver = BLOCKDEV_DRIVER_EXTLOCK;
    extlock_get_counters(s->client, &stats->u.extlock);
    return stats;
}

/*
 * Persistent reservations: scsi-hd's PERSISTENT RESERVE IN/OUT (see
 * extlock-pr.h; the node's I_T nexus is its client-id)
 */
static int coroutine_fn GRAPH_RDLOCK
extlock_co_pr_read_keys(BlockDriverState *bs, uint32_t *generation,
                        uint32_t num_keys, uint64_t *keys)
{
    BDRVExtlockState *s = bs->opaque;

    return extlock_pr_read_keys(s->client->pr, generation, num_keys, keys);
}

static int coroutine_fn GRAPH_RDLOCK
extlock_co_pr_read_reservation(BlockDriverState *bs, uint32_t *generation,
                               uint64_t *key, BlockPrType *type)
{
    BDRVExtlockState *s = bs->opaque;

    return extlock_pr_read_reservation(s->client->pr, generation, key, type);
}

static int coroutine_fn GRAPH_RDLOCK
extlock_co_pr_register(BlockDriverState *bs, uint64_t old_key,
                       uint64_t new_key, BlockPrType type, bool ptpl,
                       bool ignore_key)
{
    BDRVExtlockState *s = bs->opaque;

    return extlock_pr_co_out(s->client->pr,
                             ignore_key ? EXTLOCK_PR_REGISTER_AND_IGNORE
                                        : EXTLOCK_PR_REGISTER,
                             type, old_key, new_key, ptpl);
}

static int coroutine_fn GRAPH_RDLOCK
extlock_co_pr_reserve(BlockDriverState *bs, uint64_t key, BlockPrType type)
{
    BDRVExtlockState *s = bs->opaque;

    return extlock_pr_co_out(s->client->pr, EXTLOCK_PR_RESERVE, type, key, 0,
                             false);
}

static int coroutine_fn GRAPH_RDLOCK
extlock_co_pr_release(BlockDriverState *bs, uint64_t key, BlockPrType type)
{
    BDRVExtlockState *s = bs->opaque;

    return extlock_pr_co_out(s->client->pr, EXTLOCK_PR_RELEASE, type, key, 0,
                             false);
}

static int coroutine_fn GRAPH_RDLOCK
extlock_co_pr_clear(BlockDriverState *bs, uint64_t key)
{
    BDRVExtlockState *s = bs->opaque;

    return extlock_pr_co_out(s->client->pr, EXTLOCK_PR_CLEAR, 0, key, 0,
                             false);
}

static int coroutine_fn GRAPH_RDLOCK
extlock_co_pr_preempt(BlockDriverState *bs, uint64_t old_key,
                      uint64_t new_key, BlockPrType type, bool abort)
{
    BDRVExtlockState *s = bs->opaque;

    return extlock_pr_co_out(s->client->pr,
                             abort ? EXTLOCK_PR_PREEMPT_AND_ABORT
                                   : EXTLOCK_PR_PREEMPT,
                             type, old_key, new_key, false);
}

BlockDriver bdrv_extlock = {
    .format_name                = "extlock",
    .instance_size              = sizeof(BDRVExtlockState),
    .is_filter                  = true,

    .bdrv_open                  = extlock_open,
    .bdrv_close                 = extlock_close,
    .bdrv_child_perm            = extlock_child_perm,
    .bdrv_check_perm            = extlock_check_perm,

    EXTLOCK_DRV_GETLENGTH(extlock_co_getlength),
    .bdrv_co_truncate           = extlock_co_truncate,
    .bdrv_refresh_limits        = extlock_refresh_limits,

    .bdrv_co_preadv_part        = extlock_co_preadv_part,
    .bdrv_co_pwritev_part       = extlock_co_pwritev_part,
    .bdrv_co_pwritev_compressed_part = extlock_co_pwritev_compressed_part,
    .bdrv_co_pwrite_zeroes      = extlock_co_pwrite_zeroes,
    .bdrv_co_pdiscard           = extlock_co_pdiscard,
    .bdrv_co_pr_read_keys       = extlock_co_pr_read_keys,
    .bdrv_co_pr_read_reservation = extlock_co_pr_read_reservation,
    .bdrv_co_pr_register        = extlock_co_pr_register,
    .bdrv_co_pr_reserve         = extlock_co_pr_reserve,
    .bdrv_co_pr_release         = extlock_co_pr_release,
    .bdrv_co_pr_clear           = extlock_co_pr_clear,
    .bdrv_co_pr_preempt         = extlock_co_pr_preempt,
    .bdrv_co_flush              = extlock_co_flush,
    .bdrv_co_block_status       = extlock_co_block_status,

    .bdrv_attach_aio_context    = extlock_attach_aio_context,
    .bdrv_detach_aio_context    = extlock_detach_aio_context,
    EXTLOCK_DRV_DRAIN_BEGIN(extlock_co_drain_begin),
    EXTLOCK_DRV_DRAIN_END(extlock_co_drain_end),
    .bdrv_cancel_in_flight      = extlock_cancel_in_flight,

    .bdrv_reopen_prepare        = extlock_reopen_prepare,
    .bdrv_reopen_commit         = extlock_reopen_commit,
    .bdrv_reopen_abort          = extlock_reopen_abort,

    .bdrv_get_specific_stats    = extlock_get_specific_stats,

    .bdrv_snapshot_create       = extlock_snapshot_create,
    .bdrv_snapshot_delete       = extlock_snapshot_delete,
    .bdrv_snapshot_goto         = extlock_snapshot_goto,
    EXTLOCK_DRV_SAVE_VMSTATE(extlock_save_vmstate),
    .bdrv_co_can_store_new_dirty_bitmap = extlock_co_can_store_new_dirty_bitmap,

    .strong_runtime_opts        = extlock_strong_runtime_opts,
    .mutable_opts               = extlock_mutable_opts,
};

static void bdrv_extlock_init(void)
{
    bdrv_register(&bdrv_extlock);
}

block_init(bdrv_extlock_init);
