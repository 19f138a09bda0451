/*
 * extlock: block filter that holds coordinator extent locks around I/O
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Every read holds a shared lock and every write, write-zeroes and discard
 * an exclusive lock on the range it touches (rounded out to the node's
 * granularity) while the request runs in the child.  Locks come from
 * extlockd, which grants conflicting requests in timestamp order, so
 * several processes on several hosts can share one image.
 */

#include "qemu/osdep.h"
#include "qapi/error.h"
#include "qapi/qmp/qdict.h"
#include "block/qdict.h"
#include "qapi/qmp/qerror.h"
#include "qapi/qobject-input-visitor.h"
#include "qapi/qapi-visit-sockets.h"
#include "qemu/cutils.h"
#include "qemu/units.h"
#include "qapi/util.h"
#include "qapi/qapi-types-block-core.h"
#include "qemu/module.h"
#include "qemu/option.h"
#include "block/block_int.h"
#include "crypto/tlscredsx509.h"
#include "extlock-int.h"
#include "trace.h"

#define EXTLOCK_OPT_LOCK_SPACE  "lock-space"
#define EXTLOCK_OPT_CLIENT_ID   "client-id"
#define EXTLOCK_OPT_GRANULARITY "granularity"
#define EXTLOCK_OPT_LEASE_TIME  "lease-time"
#define EXTLOCK_OPT_CACHE       "lock-cache"
#define EXTLOCK_OPT_CACHE_SIZE  "lock-cache-size"
#define EXTLOCK_OPT_CACHE_IDLE  "lock-cache-idle-time"
#define EXTLOCK_OPT_MIN_HOLD    "min-hold-time"
#define EXTLOCK_OPT_ON_LOSS     "on-lease-loss"
#define EXTLOCK_OPT_LOSS_TIME   "lease-loss-timeout"
#define EXTLOCK_OPT_WAIT_WARN   "wait-warning-time"
#define EXTLOCK_OPT_ON_STUCK_IO "on-stuck-io"
#define EXTLOCK_OPT_TLS_CREDS   "tls-creds"
#define EXTLOCK_OPT_TLS_HOST    "tls-hostname"
#define EXTLOCK_OPT_ALLOC_CHECK "allocation-check"

#define EXTLOCK_GRANULARITY_MIN     512
#define EXTLOCK_GRANULARITY_MAX     (1U << 30)
#define EXTLOCK_GRANULARITY_DEFAULT 4096
#define EXTLOCK_CACHE_SIZE_DEFAULT  1024
#define EXTLOCK_CACHE_IDLE_DEFAULT  60000
#define EXTLOCK_MIN_HOLD_MAX        (10 * 1000 * 1000)

static QemuOptsList extlock_runtime_opts = {
    .name = "extlock",
    .head = QTAILQ_HEAD_INITIALIZER(extlock_runtime_opts.head),
    .desc = {
        {
            .name = EXTLOCK_OPT_LOCK_SPACE,
            .type = QEMU_OPT_STRING,
            .help = "name of the shared image in the coordinator",
        },
        {
            .name = EXTLOCK_OPT_CLIENT_ID,
            .type = QEMU_OPT_STRING,
            .help = "this client's name (default: <host name>/<node name>)",
        },
        {
            .name = EXTLOCK_OPT_GRANULARITY,
            .type = QEMU_OPT_SIZE,
            .help = "lock alignment in bytes (default: 4096)",
        },
        {
            .name = EXTLOCK_OPT_LEASE_TIME,
            .type = QEMU_OPT_NUMBER,
            .help = "session lease in milliseconds (default: coordinator's)",
        },
        {
            .name = EXTLOCK_OPT_CACHE,
            .type = QEMU_OPT_BOOL,
            .help = "keep locks after requests complete (default: on)",
        },
        {
            .name = EXTLOCK_OPT_CACHE_SIZE,
            .type = QEMU_OPT_NUMBER,
            .help = "most idle cached locks (default: 1024)",
        },
        {
            .name = EXTLOCK_OPT_CACHE_IDLE,
            .type = QEMU_OPT_NUMBER,
            .help = "give back locks idle this many ms (default: 60000)",
        },
        {
            .name = EXTLOCK_OPT_MIN_HOLD,
            .type = QEMU_OPT_NUMBER,
            .help = "keep a lock at least this many us (default: 0)",
        },
        {
            .name = EXTLOCK_OPT_ON_LOSS,
            .type = QEMU_OPT_STRING,
            .help = "without a lease: queue or error (default: queue)",
        },
        {
            .name = EXTLOCK_OPT_LOSS_TIME,
            .type = QEMU_OPT_NUMBER,
            .help = "fail queued requests after this many ms (default: 60000)",
        },
        {
            .name = EXTLOCK_OPT_WAIT_WARN,
            .type = QEMU_OPT_NUMBER,
            .help = "event when a request waits this many ms (default: 10000)",
        },
        {
            .name = EXTLOCK_OPT_ON_STUCK_IO,
            .type = QEMU_OPT_STRING,
            .help = "request running past the lease: exit or report "
                    "(default: exit)",
        },
        {
            .name = EXTLOCK_OPT_TLS_CREDS,
            .type = QEMU_OPT_STRING,
            .help = "id of the TLS credentials object (default: no TLS)",
        },
        {
            .name = EXTLOCK_OPT_TLS_HOST,
            .type = QEMU_OPT_STRING,
            .help = "name in the coordinator's certificate "
                    "(default: the inet host)",
        },
        {
            .name = EXTLOCK_OPT_ALLOC_CHECK,
            .type = QEMU_OPT_BOOL,
            .help = "check that a qcow2 image below is fully allocated "
                    "(default: on; off is unsafe)",
        },
        { /* end of list */ }
    },
};

/* Options that may not change on reopen */
static const char *const extlock_strong_runtime_opts[] = {
    EXTLOCK_OPT_LOCK_SPACE,
    EXTLOCK_OPT_CLIENT_ID,
    EXTLOCK_OPT_GRANULARITY,
    EXTLOCK_OPT_LEASE_TIME,
    EXTLOCK_OPT_CACHE,
    EXTLOCK_OPT_CACHE_SIZE,
    EXTLOCK_OPT_CACHE_IDLE,
    EXTLOCK_OPT_MIN_HOLD,
    EXTLOCK_OPT_ON_LOSS,
    EXTLOCK_OPT_LOSS_TIME,
    EXTLOCK_OPT_WAIT_WARN,
    EXTLOCK_OPT_ON_STUCK_IO,
    EXTLOCK_OPT_TLS_CREDS,
    EXTLOCK_OPT_TLS_HOST,
    EXTLOCK_OPT_ALLOC_CHECK,
    "coordinator.",
    NULL
};

static SocketAddress *extlock_parse_coordinator(QDict *options,
                                                Error **errp)
{
    SocketAddress *saddr = NULL;
    QDict *addr = NULL;
    Visitor *v;

    qdict_extract_subqdict(options, &addr, "coordinator.");
    if (!qdict_size(addr)) {
        error_setg(errp, QERR_MISSING_PARAMETER, "coordinator");
        goto out;
    }
    v = qobject_input_visitor_new_flat_confused(addr, errp);
    if (!v) {
        goto out;
    }
    if (!visit_type_SocketAddress(v, NULL, &saddr, errp)) {
        error_prepend(errp, "Invalid coordinator address: ");
    }
    visit_free(v);
out:
    qobject_unref(addr);
    return saddr;
}

/* Validate the scalar options into @s; nothing to undo on failure */
static bool extlock_parse_options(BlockDriverState *bs, BDRVExtlockState *s,
                                  QemuOpts *opts, Error **errp)
{
    const char *lock_space = qemu_opt_get(opts, EXTLOCK_OPT_LOCK_SPACE);
    const char *client_id = qemu_opt_get(opts, EXTLOCK_OPT_CLIENT_ID);
    uint64_t granularity = qemu_opt_get_size(opts, EXTLOCK_OPT_GRANULARITY,
                                             EXTLOCK_GRANULARITY_DEFAULT);
    uint64_t lease = qemu_opt_get_number(opts, EXTLOCK_OPT_LEASE_TIME, 0);
    uint64_t cache_size = qemu_opt_get_number(opts, EXTLOCK_OPT_CACHE_SIZE,
                                              EXTLOCK_CACHE_SIZE_DEFAULT);
    uint64_t cache_idle = qemu_opt_get_number(opts, EXTLOCK_OPT_CACHE_IDLE,
                                              EXTLOCK_CACHE_IDLE_DEFAULT);
    uint64_t min_hold = qemu_opt_get_number(opts, EXTLOCK_OPT_MIN_HOLD, 0);
    uint64_t loss_timeout = qemu_opt_get_number(opts, EXTLOCK_OPT_LOSS_TIME,
                                                60000);
    uint64_t wait_warn = qemu_opt_get_number(opts, EXTLOCK_OPT_WAIT_WARN,
                                             10000);
    Error *local_err = NULL;
    int policy, stuck_policy;

    if (!lock_space) {
        error_setg(errp, QERR_MISSING_PARAMETER, EXTLOCK_OPT_LOCK_SPACE);
        return false;
    }
    if (!*lock_space) {
        error_setg(errp, "lock-space must not be empty");
        return false;
    }
    if (strlen(lock_space) > EXTLOCK_MAX_NAME) {
        error_setg(errp, "lock-space must be at most %d bytes long",
                   EXTLOCK_MAX_NAME);
        return false;
    }
    if (client_id && !*client_id) {
        error_setg(errp, "client-id must not be empty");
        return false;
    }
    if (client_id && strlen(client_id) > EXTLOCK_MAX_NAME) {
        error_setg(errp, "client-id must be at most %d bytes long",
                   EXTLOCK_MAX_NAME);
        return false;
    }
    if (granularity < EXTLOCK_GRANULARITY_MIN ||
        granularity > EXTLOCK_GRANULARITY_MAX || !is_power_of_2(granularity)) {
        error_setg(errp, "granularity must be a power of two between %d "
                   "and %u", EXTLOCK_GRANULARITY_MIN,
                   EXTLOCK_GRANULARITY_MAX);
        return false;
    }
    if (qemu_opt_find(opts, EXTLOCK_OPT_LEASE_TIME) &&
        (lease < EXTLOCK_MIN_LEASE_MS || lease > EXTLOCK_MAX_LEASE_MS)) {
        error_setg(errp, "lease-time must be between %d and %d ms",
                   EXTLOCK_MIN_LEASE_MS, EXTLOCK_MAX_LEASE_MS);
        return false;
    }

    if (cache_size < 1 || cache_size > 1000000) {
        error_setg(errp, "lock-cache-size must be between 1 and 1000000");
        return false;
    }
    if (cache_idle < 1 || cache_idle > UINT32_MAX) {
        error_setg(errp, "lock-cache-idle-time must be between 1 and %u ms",
                   UINT32_MAX);
        return false;
    }
    if (min_hold > EXTLOCK_MIN_HOLD_MAX) {
        error_setg(errp, "min-hold-time must be at most %d us",
                   EXTLOCK_MIN_HOLD_MAX);
        return false;
    }

    policy = qapi_enum_parse(&ExtlockLeaseLossPolicy_lookup,
                             qemu_opt_get(opts, EXTLOCK_OPT_ON_LOSS),
                             EXTLOCK_LEASE_LOSS_POLICY_QUEUE, &local_err);
    if (local_err) {
        error_propagate_prepend(errp, local_err,
                                "on-lease-loss must be 'queue' or 'error': ");
        return false;
    }
    stuck_policy = qapi_enum_parse(&ExtlockStuckIoPolicy_lookup,
                                   qemu_opt_get(opts, EXTLOCK_OPT_ON_STUCK_IO),
                                   EXTLOCK_STUCK_IO_POLICY_EXIT, &local_err);
    if (local_err) {
        error_propagate_prepend(errp, local_err,
                                "on-stuck-io must be 'exit' or 'report': ");
        return false;
    }
    if (loss_timeout > UINT32_MAX) {
        error_setg(errp, "lease-loss-timeout must be at most %u ms",
                   UINT32_MAX);
        return false;
    }
    if (wait_warn > UINT32_MAX) {
        error_setg(errp, "wait-warning-time must be at most %u ms",
                   UINT32_MAX);
        return false;
    }

    s->cache_opts.lease_loss_error = policy == EXTLOCK_LEASE_LOSS_POLICY_ERROR;
    s->cache_opts.stuck_io_exit = stuck_policy == EXTLOCK_STUCK_IO_POLICY_EXIT;
    s->cache_opts.lease_loss_timeout_ms = loss_timeout;
    s->cache_opts.wait_warning_ms = wait_warn;
    s->cache_opts.cache = qemu_opt_get_bool(opts, EXTLOCK_OPT_CACHE, true);
    s->cache_opts.cache_size = cache_size;
    s->cache_opts.cache_idle_ms = cache_idle;
    s->cache_opts.min_hold_us = min_hold;
    s->lock_space = g_strdup(lock_space);
    if (client_id) {
        s->client_id = g_strdup(client_id);
    } else {
        g_autofree char *host = g_strdup(g_get_host_name());
        s->client_id = g_strdup_printf("%s/%s", host, bdrv_get_node_name(bs));
    }
    s->granularity = granularity;
    s->lease_ms = lease;
    return true;
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

static int extlock_open(BlockDriverState *bs, QDict *options, int flags,
                        Error **errp)
{
    BDRVExtlockState *s = bs->opaque;
    QemuOpts *opts;
    QCryptoTLSCreds *tls_creds = NULL;
    const char *tls_creds_id, *tls_hostname;
    int64_t len;
    int ret;

    opts = qemu_opts_create(&extlock_runtime_opts, NULL, 0, &error_abort);
    if (!qemu_opts_absorb_qdict(opts, options, errp)) {
        ret = -EINVAL;
        goto out;
    }
    if (!extlock_parse_options(bs, s, opts, errp)) {
        ret = -EINVAL;
        goto out;
    }
    s->coordinator = extlock_parse_coordinator(options, errp);
    if (!s->coordinator) {
        ret = -EINVAL;
        goto out;
    }
    tls_creds_id = qemu_opt_get(opts, EXTLOCK_OPT_TLS_CREDS);
    tls_hostname = qemu_opt_get(opts, EXTLOCK_OPT_TLS_HOST);
    if (tls_creds_id) {
        tls_creds = extlock_get_tls_creds(tls_creds_id, errp);
        if (!tls_creds) {
            ret = -EINVAL;
            goto out;
        }
        /* As nbd: an inet coordinator's host is the name to verify */
        if (!tls_hostname &&
            s->coordinator->type == SOCKET_ADDRESS_TYPE_INET) {
            tls_hostname = s->coordinator->u.inet.host;
        }
        /* QEMU's x509 client checks the name; say so now, not at connect */
        if (!tls_hostname && object_dynamic_cast(OBJECT(tls_creds),
                                                 TYPE_QCRYPTO_TLS_CREDS_X509)) {
            error_setg(errp, "x509 credentials need '" EXTLOCK_OPT_TLS_HOST
                       "' with a coordinator that is not inet");
            ret = -EINVAL;
            goto out;
        }
    } else if (tls_hostname) {
        error_setg(errp, "'" EXTLOCK_OPT_TLS_HOST "' needs '"
                   EXTLOCK_OPT_TLS_CREDS "'");
        ret = -EINVAL;
        goto out;
    }

    ret = bdrv_open_file_child(NULL, options, "file", bs, errp);
    if (ret < 0) {
        goto out;
    }
    if (!extlock_stack_check(bs->file->bs,
                             qemu_opt_get_bool(opts, EXTLOCK_OPT_ALLOC_CHECK,
                                               true),
                             &s->stack, errp)) {
        ret = -EINVAL;
        goto out;
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

    /* Granted extents may grow up to the end of the image */
    len = bdrv_getlength(bs->file->bs);
    if (len < 0) {
        error_setg_errno(errp, -len, "Could not get the image length");
        ret = len;
        goto out;
    }
    s->cache_opts.grow_limit = QEMU_ALIGN_UP((uint64_t)len, s->granularity);

    s->client = extlock_client_new(s->coordinator, s->client_id,
                                   s->lock_space, s->lease_ms,
                                   &s->cache_opts, tls_creds, tls_hostname,
                                   bdrv_get_node_name(bs),
                                   bdrv_get_aio_context(bs), errp);
    if (!s->client) {
        ret = -EIO;
        goto out;
    }
    trace_extlock_open(bdrv_get_node_name(bs), s->lock_space, s->client_id,
                       s->granularity);
    ret = 0;

out:
    qemu_opts_del(opts);
    if (ret < 0) {
        qapi_free_SocketAddress(s->coordinator);
        s->coordinator = NULL;
        g_free(s->lock_space);
        g_free(s->client_id);
        s->lock_space = s->client_id = NULL;
    }
    return ret;
}

static void extlock_close(BlockDriverState *bs)
{
    BDRVExtlockState *s = bs->opaque;

    extlock_client_free(s->client);
    s->client = NULL;
    qapi_free_SocketAddress(s->coordinator);
    g_free(s->lock_space);
    g_free(s->client_id);
}

typedef enum ExtlockIoKind {
    EXTLOCK_IO_READ,
    EXTLOCK_IO_WRITE,
    EXTLOCK_IO_ZERO,
    EXTLOCK_IO_DISCARD,
    EXTLOCK_IO_FLUSH,
} ExtlockIoKind;

static const char *const extlock_io_kind_names[] = {
    [EXTLOCK_IO_READ] = "read",
    [EXTLOCK_IO_WRITE] = "write",
    [EXTLOCK_IO_ZERO] = "zero",
    [EXTLOCK_IO_DISCARD] = "discard",
    [EXTLOCK_IO_FLUSH] = "flush",
};

/*
 * Forward one request to the child: under @req's lock, or with @req NULL
 * under none (flush, zero-length requests).  Counted for the in-flight
 * bound and traced with the token it runs under.
 */
static int coroutine_fn extlock_forward(BlockDriverState *bs,
                                        ExtlockIoKind kind, int64_t offset,
                                        int64_t bytes, QEMUIOVector *qiov,
                                        BdrvRequestFlags flags,
                                        ExtlockRequest *req)
{
    BDRVExtlockState *s = bs->opaque;
    uint64_t token = req ? req->lock->token : 0;
    int ret;

    if (trace_event_get_state_backends(TRACE_EXTLOCK_IO_START)) {
        trace_extlock_io_start(bdrv_get_node_name(bs),
                               extlock_io_kind_names[kind], offset, bytes,
                               req ? req->lock->lock_id : 0, token,
                               qemu_clock_get_ns(QEMU_CLOCK_REALTIME));
    }
    extlock_client_io_start(s->client);
    switch (kind) {
    case EXTLOCK_IO_READ:
        ret = bdrv_co_preadv(bs->file, offset, bytes, qiov, flags);
        break;
    case EXTLOCK_IO_WRITE:
        ret = bdrv_co_pwritev(bs->file, offset, bytes, qiov, flags);
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
    extlock_client_io_done(s->client);
    if (trace_event_get_state_backends(TRACE_EXTLOCK_IO_DONE)) {
        trace_extlock_io_done(bdrv_get_node_name(bs),
                              extlock_io_kind_names[kind], offset, bytes,
                              token, ret,
                              qemu_clock_get_ns(QEMU_CLOCK_REALTIME));
    }
    return ret;
}

/*
 * Run a request under a lock on the range it touches, rounded out to the
 * granularity, in @mode.  A zero-length request touches nothing and
 * needs no lock (the coordinator has no empty locks).
 */
static int coroutine_fn extlock_locked_io(BlockDriverState *bs,
                                          ExtlockIoKind kind,
                                          ExtlockMode mode, int64_t offset,
                                          int64_t bytes, QEMUIOVector *qiov,
                                          BdrvRequestFlags flags)
{
    BDRVExtlockState *s = bs->opaque;
    const char *op = extlock_io_kind_names[kind];
    ExtlockRequest req = {};
    int ret;

    if (bytes == 0) {
        return extlock_forward(bs, kind, offset, bytes, qiov, flags, NULL);
    }
    req.mode = mode;
    req.offset = QEMU_ALIGN_DOWN((uint64_t)offset, s->granularity);
    req.length = QEMU_ALIGN_UP((uint64_t)offset + bytes, s->granularity) -
                 req.offset;
    trace_extlock_request(bdrv_get_node_name(bs), op, offset, bytes,
                          req.offset, req.length);
    ret = extlock_client_lock(s->client, &req);
    if (ret < 0) {
        trace_extlock_request_failed(bdrv_get_node_name(bs), op, offset,
                                     bytes, ret);
        return ret;
    }
    ret = extlock_forward(bs, kind, offset, bytes, qiov, flags, &req);
    extlock_client_unlock(s->client, &req);
    return ret;
}

static int coroutine_fn extlock_co_preadv(BlockDriverState *bs,
                                          int64_t offset, int64_t bytes,
                                          QEMUIOVector *qiov,
                                          BdrvRequestFlags flags)
{
    return extlock_locked_io(bs, EXTLOCK_IO_READ, EXTLOCK_MODE_SHARED,
                             offset, bytes, qiov, flags);
}

static int coroutine_fn extlock_co_pwritev(BlockDriverState *bs,
                                           int64_t offset, int64_t bytes,
                                           QEMUIOVector *qiov,
                                           BdrvRequestFlags flags)
{
    return extlock_locked_io(bs, EXTLOCK_IO_WRITE, EXTLOCK_MODE_EXCLUSIVE,
                             offset, bytes, qiov, flags);
}

static int coroutine_fn extlock_co_pwrite_zeroes(BlockDriverState *bs,
                                                 int64_t offset,
                                                 int64_t bytes,
                                                 BdrvRequestFlags flags)
{
    return extlock_locked_io(bs, EXTLOCK_IO_ZERO, EXTLOCK_MODE_EXCLUSIVE,
                             offset, bytes, NULL, flags);
}

static int coroutine_fn extlock_co_pdiscard(BlockDriverState *bs,
                                            int64_t offset, int64_t bytes)
{
    BDRVExtlockState *s = bs->opaque;

    if (s->stack.metadata_frozen) {
        /* qcow2 would free clusters: a discard is only a hint, drop it */
        s->stack.discards_ignored++;
        return 0;
    }
    return extlock_locked_io(bs, EXTLOCK_IO_DISCARD, EXTLOCK_MODE_EXCLUSIVE,
                             offset, bytes, NULL, 0);
}

/*
 * Block status: everything is data, in one answer for the whole range.
 *
 * The status of a range is the image's content too, and it changes under
 * other hosts' writes.  An NBD server with structured replies (libnbd's
 * and QEMU's client default) serves a read by asking block status first
 * and then reads each data piece and sends each zero piece as a hole,
 * piece by piece (nbd_co_send_sparse_read() in nbd/server.c): anything
 * but one answer covering the whole request would split the read into
 * several requests, each under its own lock, and another host's write
 * could land between them.  "Data" (never "zero") makes the server read
 * the whole range in one request under one shared lock, and is always a
 * correct answer; what it costs is sparseness (qemu-img map, sparse
 * copies).  No lock: the answer does not depend on the image.
 */
static int coroutine_fn extlock_co_block_status(BlockDriverState *bs,
                                                bool want_zero,
                                                int64_t offset,
                                                int64_t bytes,
                                                int64_t *pnum,
                                                int64_t *map,
                                                BlockDriverState **file)
{
    *pnum = bytes;
    *map = offset;
    *file = bs->file->bs;
    return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID;
}

static int coroutine_fn extlock_co_flush(BlockDriverState *bs)
{
    /* A flush orders nothing between hosts: no lock needed */
    return extlock_forward(bs, EXTLOCK_IO_FLUSH, 0, 0, NULL, 0, NULL);
}

/*
 * Other hosts' nodes would keep the old size (nothing tells them), and a
 * shrink would drop data they may hold locks on: refuse, rather than let
 * the generic filter code pass the resize to the image.
 */
static int coroutine_fn extlock_co_truncate(BlockDriverState *bs,
                                            int64_t offset, bool exact,
                                            PreallocMode prealloc,
                                            BdrvRequestFlags flags,
                                            Error **errp)
{
    error_setg(errp, "extlock: cannot resize the shared image through node "
               "'%s': the other hosts sharing it would not see the new "
               "size; stop every host using it, then resize the image",
               bdrv_get_node_name(bs));
    return -ENOTSUP;
}

static int64_t extlock_getlength(BlockDriverState *bs)
{
    return bdrv_getlength(bs->file->bs);
}

static void extlock_refresh_limits(BlockDriverState *bs, Error **errp)
{
    /*
     * The child's limits are inherited by the generic code; a request
     * larger than the coordinator could lock does not exist (2^63).
     */
}

static void extlock_child_perm(BlockDriverState *bs, BdrvChild *c,
                               BdrvChildRole role,
                               BlockReopenQueue *reopen_queue,
                               uint64_t perm, uint64_t shared,
                               uint64_t *nperm, uint64_t *nshared)
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
}

static void extlock_detach_aio_context(BlockDriverState *bs)
{
    BDRVExtlockState *s = bs->opaque;
    extlock_client_detach_aio_context(s->client);
}

static void extlock_attach_aio_context(BlockDriverState *bs,
                                       AioContext *new_context)
{
    BDRVExtlockState *s = bs->opaque;
    extlock_client_attach_aio_context(s->client, new_context);
}

static int extlock_reopen_prepare(BDRVReopenState *reopen_state,
                                  BlockReopenQueue *queue, Error **errp)
{
    /*
     * Every option is a strong runtime option, so the generic code has
     * already refused changes; only read-only flags may change.
     */
    return 0;
}

BlockDriver bdrv_extlock = {
    .format_name                = "extlock",
    .instance_size              = sizeof(BDRVExtlockState),
    .is_filter                  = true,

    .bdrv_open                  = extlock_open,
    .bdrv_close                 = extlock_close,
    .bdrv_child_perm            = extlock_child_perm,

    .bdrv_getlength             = extlock_getlength,
    .bdrv_co_truncate           = extlock_co_truncate,
    .bdrv_refresh_limits        = extlock_refresh_limits,

    .bdrv_co_preadv             = extlock_co_preadv,
    .bdrv_co_pwritev            = extlock_co_pwritev,
    .bdrv_co_pwrite_zeroes      = extlock_co_pwrite_zeroes,
    .bdrv_co_pdiscard           = extlock_co_pdiscard,
    .bdrv_co_flush              = extlock_co_flush,
    .bdrv_co_block_status       = extlock_co_block_status,

    .bdrv_attach_aio_context    = extlock_attach_aio_context,
    .bdrv_detach_aio_context    = extlock_detach_aio_context,

    .bdrv_reopen_prepare        = extlock_reopen_prepare,

    .strong_runtime_opts        = extlock_strong_runtime_opts,
};

static void bdrv_extlock_init(void)
{
    bdrv_register(&bdrv_extlock);
}

block_init(bdrv_extlock_init);
