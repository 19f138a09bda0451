/*
 * extlock: file systems whose page cache is local to one host
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * A file on a network or cluster file system is shared between hosts, but
 * each host's page cache is its own: a buffered write completes into the
 * writer's cache and reaches the other hosts only on writeback, and a
 * buffered read may be served from a stale cached copy.  Lock order then
 * says nothing about what the other hosts see, so such a file must be
 * opened with O_DIRECT (cache.direct=on).  Kept free of QEMU headers so
 * that the unit tests (tests/unit/test-fstype.c) can include it.
 */
#ifndef BLOCK_EXTLOCK_FSTYPE_H
#define BLOCK_EXTLOCK_FSTYPE_H

#include <stdint.h>

/*
 * The name of the shared file system whose statfs() f_type is @f_type
 * (the values of <linux/magic.h> and of the file systems' own sources),
 * or NULL for a file system that only one host mounts.
 */
static inline const char *extlock_shared_fs_name(int64_t f_type)
{
    static const struct {
        uint32_t magic;
        const char *name;
    } shared_fs[] = {
        { 0x6969,     "nfs" },
        { 0x517B,     "smb" },
        { 0xFF534D42, "cifs" },
        { 0xFE534D42, "smb2" },
        { 0x01161970, "gfs2" },
        { 0x7461636f, "ocfs2" },
        { 0x00c36400, "ceph" },
        { 0x65735546, "fuse" },         /* glusterfs, sshfs, s3fs, ... */
        { 0x01021997, "9p" },
        { 0x5346414F, "afs" },
        { 0x6B414653, "kafs" },
        { 0x73757245, "coda" },
        { 0x0BD00BD0, "lustre" },
        { 0x47504653, "gpfs" },
        { 0x19830326, "beegfs" },
        { 0xAAD7AAEA, "panfs" },
        { 0x013111A8, "ibrix" },
    };
    uint32_t magic = (uint32_t)f_type;
    unsigned i;

    /* f_type is a signed long on some ABIs: compare the low 32 bits */
    for (i = 0; i < sizeof(shared_fs) / sizeof(shared_fs[0]); i++) {
        if (shared_fs[i].magic == magic) {
            return shared_fs[i].name;
        }
    }
    return NULL;
}

#endif /* BLOCK_EXTLOCK_FSTYPE_H */
