/*
 * SCSI persistent reservations for emulated disks (scsi-hd), passed to
 * the block node's bdrv_co_pr_* callbacks (hw/scsi/scsi-disk-pr.c)
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Installed into QEMU's tree as include/hw/scsi/scsi-disk-pr.h by
 * scripts/build-qemu.sh.
 */
#ifndef HW_SCSI_SCSI_DISK_PR_H
#define HW_SCSI_SCSI_DISK_PR_H

#include "hw/scsi/scsi.h"

/* PERSISTENT RESERVE IN (5Eh) and OUT (5Fh) of scsi-hd */
extern const SCSIReqOps scsi_disk_pr_reqops;

/* Does the node below @blk (through filters) implement them? */
bool scsi_disk_pr_supported(BlockBackend *blk);

#endif
