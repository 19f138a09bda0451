/*
 * extlock: one driver source for QEMU 7.2 and QEMU 10.0
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The driver is written against QEMU 10.0's block layer.  This header
 * supplies what 10.0 has and 7.2 lacks, and wraps the few calls whose
 * signature changed between the two, so that no .c file needs a version
 * test.  QEMU_VERSION_MAJOR comes from config-host.h, which qemu/osdep.h
 * includes first in every QEMU source file; the QEMU patches need no
 * define of their own.  Dropping 7.2 means deleting the 7.2 branches here.
 *
 * What changed between 7.2 and 10.0, and how the driver copes:
 *
 * - Graph locking (8.0): callbacks that touch the node's children are
 *   GRAPH_RDLOCK and the main-loop code that reads bs->file outside a
 *   callback takes bdrv_graph_rdlock_main_loop().  The annotations are
 *   clang thread-safety attributes (empty with gcc); on 7.2 they and the
 *   main-loop lock are empty.
 * - .bdrv_getlength became the coroutine callback .bdrv_co_getlength
 *   (8.0): EXTLOCK_DRV_GETLENGTH() names the right member,
 *   extlock_co_child_getlength() the right call.  On 7.2 the callback is
 *   also called outside coroutines, like every 7.2 .bdrv_getlength.
 * - The AioContext lock is gone (9.0): code in the main loop that reads a
 *   node's state owned by the node's AioContext runs it there with
 *   extlock_run_in_aio_context(); on 7.2 it holds the AioContext lock.
 * - the drain callbacks are no longer coroutines (8.0): .bdrv_drain_begin
 *   and .bdrv_drain_end (EXTLOCK_DRV_DRAIN_BEGIN/END); the driver's do
 *   not yield, so one function serves both, coroutine_fn on 7.2 only
 *   (EXTLOCK_DRAIN_FN).
 * - aio_set_fd_handler() lost is_external (8.1): extlock_set_fd_handler(),
 *   extlock_set_fd_handler_poll().
 * - QAPI dropped the has_ flag of optional pointer members (8.0); absent
 *   means NULL on both.  Test such members by their pointer; declare and
 *   set them with EXTLOCK_QAPI_OPT_PARAM() and EXTLOCK_QAPI_SET_HAS();
 *   call the two generated functions with one by
 *   extlock_query_extent_locks() and extlock_event_send_fence().  Scalars
 *   keep their has_ flag on both.
 * - include/qapi/qmp/ moved to include/qobject/ (10.0): include
 *   EXTLOCK_QDICT_H, EXTLOCK_QBOOL_H, EXTLOCK_QNUM_H, EXTLOCK_QSTRING_H.
 * - qcrypto_tls_session_handshake() returns the handshake status (9.2):
 *   extlock_tls_handshake_step().
 * - refresh_total_sectors() became bdrv_refresh_total_sectors() (8.0):
 *   extlock_refresh_total_sectors(); the main loop holds the node's
 *   AioContext lock around them on 7.2 only
 *   (extlock_aio_context_acquire()).
 */

#ifndef BLOCK_EXTLOCK_COMPAT_H
#define BLOCK_EXTLOCK_COMPAT_H

#include "block/aio.h"
#include "block/aio-wait.h"
#include "block/block_int.h"
#include "block/block-io.h"     /* 10.0's block_int.h lacks it */
#include "crypto/tlssession.h"

#if QEMU_VERSION_MAJOR >= 10

#define EXTLOCK_QEMU_10 1
#include "block/graph-lock.h"

#define EXTLOCK_QDICT_H "qobject/qdict.h"
#define EXTLOCK_QBOOL_H "qobject/qbool.h"
#define EXTLOCK_QNUM_H "qobject/qnum.h"
#define EXTLOCK_QSTRING_H "qobject/qstring.h"

#define EXTLOCK_DRV_GETLENGTH(fn) .bdrv_co_getlength = (fn)
#define EXTLOCK_DRV_SAVE_VMSTATE(fn) .bdrv_co_save_vmstate = (fn)

#define EXTLOCK_DRAIN_FN
#define EXTLOCK_DRV_DRAIN_BEGIN(fn) .bdrv_drain_begin = (fn)
#define EXTLOCK_DRV_DRAIN_END(fn) .bdrv_drain_end = (fn)

static inline int64_t coroutine_fn GRAPH_RDLOCK
extlock_co_child_getlength(BlockDriverState *bs)
{
    return bdrv_co_getlength(bs);
}

static inline void extlock_set_fd_handler(AioContext *ctx, int fd,
                                          IOHandler *io_read,
                                          IOHandler *io_write,
                                          void *opaque)
{
    aio_set_fd_handler(ctx, fd, io_read, io_write, NULL, NULL, opaque);
}

/* The same with an io_poll check for an AioContext that polls */
static inline void extlock_set_fd_handler_poll(AioContext *ctx, int fd,
                                               IOHandler *io_read,
                                               IOHandler *io_write,
                                               AioPollFn *io_poll,
                                               IOHandler *io_poll_ready,
                                               void *opaque)
{
    aio_set_fd_handler(ctx, fd, io_read, io_write, io_poll, io_poll_ready,
                       opaque);
}

/*
 * Run @fn(@opaque) in @ctx's thread and wait for it (from the main loop,
 * outside coroutines): nothing else runs in @ctx meanwhile.
 */
static inline void extlock_run_in_aio_context(AioContext *ctx,
                                              void (*fn)(void *opaque),
                                              void *opaque)
{
    if (ctx == qemu_get_current_aio_context()) {
        fn(opaque);
    } else {
        aio_wait_bh_oneshot(ctx, fn, opaque);
    }
}

/*
 * Maintenance (extlock-maint.c), in the main loop: a node's total length
 * after its driver reread its metadata; @hint is used by drivers that
 * cannot tell (nfs).  No AioContext lock to take around the reread.
 */
static inline int GRAPH_RDLOCK
extlock_refresh_total_sectors(BlockDriverState *bs, int64_t hint)
{
    return bdrv_refresh_total_sectors(bs, hint);
}

static inline void extlock_aio_context_acquire(AioContext *ctx)
{
}

static inline void extlock_aio_context_release(AioContext *ctx)
{
}

#define EXTLOCK_QAPI_OPT_PARAM(type, name) type name
#define extlock_query_extent_locks(node_name, errp) \
    qmp_query_extent_locks(node_name, errp)
#define extlock_event_send_fence(node_name, client_id, result, message) \
    qapi_event_send_extent_lock_fence(node_name, client_id, result, message)
#define EXTLOCK_QAPI_SET_HAS(obj, member) ((void)0)

/*
 * One step of a TLS handshake on a non-blocking channel: -1 with @errp
 * set, or a QCryptoTLSSessionHandshakeStatus
 */
static inline int extlock_tls_handshake_step(QCryptoTLSSession *sess,
                                             Error **errp)
{
    return qcrypto_tls_session_handshake(sess, errp);
}

#elif QEMU_VERSION_MAJOR == 7

#define EXTLOCK_QDICT_H "qapi/qmp/qdict.h"
#define EXTLOCK_QBOOL_H "qapi/qmp/qbool.h"
#define EXTLOCK_QNUM_H "qapi/qmp/qnum.h"
#define EXTLOCK_QSTRING_H "qapi/qmp/qstring.h"

#define GRAPH_RDLOCK
#define GRAPH_UNLOCKED

static inline void bdrv_graph_rdlock_main_loop(void)
{
}

static inline void bdrv_graph_rdunlock_main_loop(void)
{
}

#define EXTLOCK_DRV_GETLENGTH(fn) .bdrv_getlength = (fn)
#define EXTLOCK_DRV_SAVE_VMSTATE(fn) .bdrv_save_vmstate = (fn)

#define EXTLOCK_DRAIN_FN coroutine_fn
#define EXTLOCK_DRV_DRAIN_BEGIN(fn) .bdrv_co_drain_begin = (fn)
#define EXTLOCK_DRV_DRAIN_END(fn) .bdrv_co_drain_end = (fn)

static inline int64_t extlock_co_child_getlength(BlockDriverState *bs)
{
    return bdrv_getlength(bs);
}

static inline void extlock_set_fd_handler(AioContext *ctx, int fd,
                                          IOHandler *io_read,
                                          IOHandler *io_write,
                                          void *opaque)
{
    aio_set_fd_handler(ctx, fd, false, io_read, io_write, NULL, NULL,
                       opaque);
}

static inline void extlock_set_fd_handler_poll(AioContext *ctx, int fd,
                                               IOHandler *io_read,
                                               IOHandler *io_write,
                                               AioPollFn *io_poll,
                                               IOHandler *io_poll_ready,
                                               void *opaque)
{
    aio_set_fd_handler(ctx, fd, false, io_read, io_write, io_poll,
                       io_poll_ready, opaque);
}

static inline void extlock_run_in_aio_context(AioContext *ctx,
                                              void (*fn)(void *opaque),
                                              void *opaque)
{
    aio_context_acquire(ctx);
    fn(opaque);
    aio_context_release(ctx);
}

static inline int
extlock_refresh_total_sectors(BlockDriverState *bs, int64_t hint)
{
    return refresh_total_sectors(bs, hint);
}

static inline void extlock_aio_context_acquire(AioContext *ctx)
{
    aio_context_acquire(ctx);
}

static inline void extlock_aio_context_release(AioContext *ctx)
{
    aio_context_release(ctx);
}

static inline void coroutine_fn bdrv_graph_co_rdlock(void)
{
}

static inline void coroutine_fn bdrv_graph_co_rdunlock(void)
{
}

#define EXTLOCK_QAPI_OPT_PARAM(type, name) bool has_##name, type name
#define extlock_query_extent_locks(node_name, errp) \
    qmp_query_extent_locks((node_name) != NULL, node_name, errp)
#define extlock_event_send_fence(node_name, client_id, result, message) \
    qapi_event_send_extent_lock_fence(node_name, client_id, result, \
                                      (message) != NULL, message)
#define EXTLOCK_QAPI_SET_HAS(obj, member) ((obj)->has_##member = true)

static inline int extlock_tls_handshake_step(QCryptoTLSSession *sess,
                                             Error **errp)
{
    if (qcrypto_tls_session_handshake(sess, errp) < 0) {
        return -1;
    }
    return qcrypto_tls_session_get_handshake_status(sess);
}

#else
#error "extlock builds into QEMU 7.2 and QEMU 10.0 only"
#endif

#endif /* BLOCK_EXTLOCK_COMPAT_H */
