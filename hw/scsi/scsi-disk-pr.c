/*
 * SCSI persistent reservations for emulated disks (scsi-hd), passed to
 * the block node's bdrv_co_pr_* callbacks
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Installed into QEMU's tree as hw/scsi/scsi-disk-pr.c by
 * scripts/build-qemu.sh; patches/qemu-<version>-extlock.patch adds the
 * callbacks to BlockDriver, builds this file and makes scsi-hd send
 * PERSISTENT RESERVE IN (5Eh) and OUT (5Fh) here when the node below it
 * (or a filter's child, recursively) implements them.
 *
 * This file runs the CDB and parameter list checks and codecs of
 * include/extlock/scsi-pr.h (pure C, unit-tested in our tree) and passes
 * the commands to the node, which keeps the state.  Its callbacks return 0
 * or a negative errno, which becomes (scsi_disk_pr_complete()):
 *   -EBADE    RESERVATION CONFLICT status
 *   -EINVAL   ILLEGAL REQUEST, INVALID FIELD IN CDB
 *   -ERANGE   ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST
 *   -EPERM    ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION
 *   -ENOSPC   ILLEGAL REQUEST, INSUFFICIENT REGISTRATION RESOURCES
 *   -EBUSY    BUSY status (a drain interrupted the wait for the others)
 *   other     as scsi_sense_from_errno()
 * One target port, no SPEC_I_PT, ALL_TG_PT, REGISTER AND MOVE or READ
 * FULL STATUS (INVALID FIELD); every reservation persists (PTPL_A set).
 */
#include "qemu/osdep.h"
#include "qemu/coroutine.h"
#include "qemu/bswap.h"
#include "hw/scsi/scsi.h"
#include "hw/scsi/scsi-disk-pr.h"
#include "scsi/constants.h"
#include "scsi/utils.h"
#include "block/block_int.h"
#include "extlock/scsi-pr.h"
#if QEMU_VERSION_MAJOR >= 10
#include "system/block-backend.h"
#else
#include "sysemu/block-backend.h"

/* QEMU 7.2: no graph lock yet */
static inline void coroutine_fn bdrv_graph_co_rdlock(void)
{
}
static inline void coroutine_fn bdrv_graph_co_rdunlock(void)
{
}
#endif

#define PR_IN_MAX_KEYS                  64
#define PR_IN_BUF_SIZE                  (8 + 8 * PR_IN_MAX_KEYS)

static const SCSISense sense_invalid_release = {
    .key = ILLEGAL_REQUEST, .asc = 0x26, .ascq = 0x04
};
static const SCSISense sense_no_registration_resources = {
    .key = ILLEGAL_REQUEST, .asc = 0x55, .ascq = 0x04
};

typedef struct SCSIPrReq {
    SCSIRequest req;
    uint8_t buf[PR_IN_BUF_SIZE];
    uint32_t len;               /* bytes of buf to transfer */
    bool data_done;             /* the data phase is over */
} SCSIPrReq;

/* The node that implements persistent reservations for @blk, or NULL */
static BlockDriverState *scsi_disk_pr_node(BlockDriverState *bs)
{
    while (bs && bs->drv && !bs->drv->bdrv_co_pr_read_keys) {
        bs = bdrv_filter_bs(bs);
    }
    return bs && bs->drv ? bs : NULL;
}

/*
 * Does the node below @blk implement PR?  scsi_new_request() may run in
 * an iothread, outside coroutines: the graph is read without its lock,
 * as blk_get_max_transfer() reads the limits.  The request's coroutine
 * looks again under the lock.
 */
bool scsi_disk_pr_supported(BlockBackend *blk)
{
    BlockDriverState *bs = scsi_disk_pr_node(blk_bs(blk));

    return bs && bs->bl.pr_cap;
}

static void scsi_disk_pr_complete(SCSIPrReq *r, int ret)
{
    SCSISense sense;

    switch (ret) {
    case 0:
        scsi_req_complete(&r->req, GOOD);
        return;
    case -ENOTSUP:
        sense = SENSE_CODE(INVALID_OPCODE);
        break;
    case -EBADE:
        scsi_req_complete(&r->req, RESERVATION_CONFLICT);
        return;
    case -EBUSY:
        /* a drain interrupted it: the guest retries */
        scsi_req_complete(&r->req, BUSY);
        return;
    case -EINVAL:
        sense = SENSE_CODE(INVALID_FIELD);
        break;
    case -ERANGE:
        sense = SENSE_CODE(INVALID_PARAM);
        break;
    case -EPERM:
        sense = sense_invalid_release;
        break;
    case -ENOSPC:
        sense = sense_no_registration_resources;
        break;
    default: {
        int status = scsi_sense_from_errno(-ret, &sense);

        if (status == CHECK_CONDITION) {
            scsi_req_build_sense(&r->req, sense);
        }
        scsi_req_complete(&r->req, status);
        return;
    }
    }
    scsi_req_build_sense(&r->req, sense);
    scsi_req_complete(&r->req, CHECK_CONDITION);
}

/* PERSISTENT RESERVE IN: the reply in r->buf, its length, or -errno */
static int coroutine_fn scsi_disk_pr_in(SCSIPrReq *r, BlockDriverState *bs)
{
    uint8_t *p = r->buf;
    uint32_t generation = 0;
    uint64_t keys[PR_IN_MAX_KEYS];
    uint64_t key = 0;
    BlockPrType type = 0;
    int n;

    switch (r->req.cmd.buf[1] & 0x1f) {
    case EXTLOCK_SCSI_PR_IN_READ_KEYS:
        /* returns the number of keys registered, @keys gets the first */
        n = bs->drv->bdrv_co_pr_read_keys(bs, &generation, PR_IN_MAX_KEYS,
                                          keys);
        if (n < 0) {
            return n;
        }
        return extlock_scsi_pr_read_keys(p, sizeof(r->buf), sizeof(r->buf),
                                         generation, keys,
                                         MIN(n, PR_IN_MAX_KEYS), n);
    case EXTLOCK_SCSI_PR_IN_READ_RESERVATION:
        n = bs->drv->bdrv_co_pr_read_reservation(bs, &generation, &key,
                                                 &type);
        if (n < 0) {
            return n;
        }
        memset(p, 0, 24);
        stl_be_p(p, generation);
        if (!type) {
            return 8;
        }
        stl_be_p(p + 4, 16);
        stq_be_p(p + 8, key);
        p[21] = type & 0x0f;        /* scope 0: LU_SCOPE */
        return 24;
    case EXTLOCK_SCSI_PR_IN_REPORT_CAPABILITIES:
        memset(p, 0, 8);
        stw_be_p(p, 8);
        p[2] = 0x01;                /* PTPL_C */
        p[3] = 0x81;                /* TMV, PTPL_A */
        p[4] = 0xea;                /* WR_EX_AR EX_AC_RO WR_EX_RO EX_AC WR_EX */
        p[5] = 0x01;                /* EX_AC_AR */
        return 8;
    default:
        return -EINVAL;
    }
}

/* PERSISTENT RESERVE OUT with its 24-byte parameter list in r->buf */
static int coroutine_fn scsi_disk_pr_out(SCSIPrReq *r, BlockDriverState *bs)
{
    ExtlockScsiPrOut o;

    /* the CDB was checked by scsi_disk_pr_send_command() */
    if (extlock_scsi_pr_out_decode(r->req.cmd.buf, r->buf, &o) !=
        EXTLOCK_SCSI_PR_CHECK_OK) {
        return -ERANGE;
    }
    switch (o.service_action) {
    case EXTLOCK_SCSI_PR_OUT_REGISTER:
    case EXTLOCK_SCSI_PR_OUT_REGISTER_AND_IGNORE:
        return bs->drv->bdrv_co_pr_register(
            bs, o.key, o.sa_key, o.type, o.aptpl,
            o.service_action == EXTLOCK_SCSI_PR_OUT_REGISTER_AND_IGNORE);
    case EXTLOCK_SCSI_PR_OUT_RESERVE:
        return bs->drv->bdrv_co_pr_reserve(bs, o.key, o.type);
    case EXTLOCK_SCSI_PR_OUT_RELEASE:
        return bs->drv->bdrv_co_pr_release(bs, o.key, o.type);
    case EXTLOCK_SCSI_PR_OUT_CLEAR:
        return bs->drv->bdrv_co_pr_clear(bs, o.key);
    case EXTLOCK_SCSI_PR_OUT_PREEMPT:
    case EXTLOCK_SCSI_PR_OUT_PREEMPT_AND_ABORT:
        return bs->drv->bdrv_co_pr_preempt(
            bs, o.key, o.sa_key, o.type,
            o.service_action == EXTLOCK_SCSI_PR_OUT_PREEMPT_AND_ABORT);
    default:
        return -EINVAL;
    }
}

static void coroutine_fn scsi_disk_pr_co(void *opaque)
{
    SCSIPrReq *r = opaque;
    BlockBackend *blk = r->req.dev->conf.blk;
    BlockDriverState *bs;
    int ret;

    bdrv_graph_co_rdlock();
    bs = scsi_disk_pr_node(blk_bs(blk));
    if (!bs || !bs->bl.pr_cap) {
        ret = -ENOTSUP;
    } else if (r->req.cmd.buf[0] == PERSISTENT_RESERVE_IN) {
        ret = scsi_disk_pr_in(r, bs);
    } else {
        ret = scsi_disk_pr_out(r, bs);
    }
    bdrv_graph_co_rdunlock();

    if (r->req.io_canceled) {
        /*
         * Already completed: without an aiocb, scsi_req_cancel() and
         * scsi_req_cancel_async() call scsi_req_cancel_complete() at once
         */
    } else if (r->req.cmd.buf[0] == PERSISTENT_RESERVE_IN && ret >= 0) {
        r->len = MIN((uint32_t)ret, r->req.cmd.xfer);
        r->data_done = true;
        scsi_req_data(&r->req, r->len);
    } else {
        scsi_disk_pr_complete(r, ret < 0 ? ret : 0);
    }
    blk_dec_in_flight(blk);
    scsi_req_unref(&r->req);
}

static void scsi_disk_pr_start(SCSIPrReq *r)
{
    BlockBackend *blk = r->req.dev->conf.blk;
    Coroutine *co = qemu_coroutine_create(scsi_disk_pr_co, r);

    scsi_req_ref(&r->req);
    blk_inc_in_flight(blk);
    aio_co_enter(blk_get_aio_context(blk), co);
}

/* Complete @req with the sense data of @check, if it is an error */
static bool scsi_disk_pr_check_failed(SCSIRequest *req,
                                      ExtlockScsiPrCheck check)
{
    SCSISense sense;

    switch (check) {
    case EXTLOCK_SCSI_PR_CHECK_OK:
        return false;
    case EXTLOCK_SCSI_PR_CHECK_INVALID_FIELD_CDB:
        sense = SENSE_CODE(INVALID_FIELD);
        break;
    case EXTLOCK_SCSI_PR_CHECK_INVALID_FIELD_PARAM:
        sense = SENSE_CODE(INVALID_PARAM);
        break;
    case EXTLOCK_SCSI_PR_CHECK_PARAM_LIST_LENGTH:
    default:
        sense = SENSE_CODE(INVALID_PARAM_LEN);
        break;
    }
    scsi_req_build_sense(req, sense);
    scsi_req_complete(req, CHECK_CONDITION);
    return true;
}

static int32_t scsi_disk_pr_send_command(SCSIRequest *req, uint8_t *buf)
{
    SCSIPrReq *r = DO_UPCAST(SCSIPrReq, req, req);

    if (buf[0] == PERSISTENT_RESERVE_IN) {
        if (scsi_disk_pr_check_failed(req, extlock_scsi_pr_in_check(buf))) {
            return 0;
        }
        if (req->cmd.xfer == 0) {
            scsi_req_complete(req, GOOD);
            return 0;
        }
        return MIN(req->cmd.xfer, PR_IN_BUF_SIZE);
    }
    if (scsi_disk_pr_check_failed(req,
                                  extlock_scsi_pr_out_check(buf,
                                                            req->cmd.xfer))) {
        return 0;
    }
    r->len = EXTLOCK_SCSI_PR_OUT_PARAM_LEN;
    return -EXTLOCK_SCSI_PR_OUT_PARAM_LEN;
}

static void scsi_disk_pr_read_data(SCSIRequest *req)
{
    SCSIPrReq *r = DO_UPCAST(SCSIPrReq, req, req);

    if (r->data_done) {
        scsi_req_complete(req, GOOD);
    } else {
        scsi_disk_pr_start(r);
    }
}

static void scsi_disk_pr_write_data(SCSIRequest *req)
{
    SCSIPrReq *r = DO_UPCAST(SCSIPrReq, req, req);

    if (!r->data_done) {
        /* ask for the parameter list, then run the command */
        r->data_done = true;
        scsi_req_data(req, r->len);
        return;
    }
    scsi_disk_pr_start(r);
}

static uint8_t *scsi_disk_pr_get_buf(SCSIRequest *req)
{
    SCSIPrReq *r = DO_UPCAST(SCSIPrReq, req, req);

    return r->buf;
}

const SCSIReqOps scsi_disk_pr_reqops = {
    .size         = sizeof(SCSIPrReq),
    .send_command = scsi_disk_pr_send_command,
    .read_data    = scsi_disk_pr_read_data,
    .write_data   = scsi_disk_pr_write_data,
    .get_buf      = scsi_disk_pr_get_buf,
};
