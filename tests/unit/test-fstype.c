/*
 * Unit tests for the shared-file-system decision (block/extlock-fstype.h):
 * which statfs() f_type values make the extlock node require
 * cache.direct=on on a file child.
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <linux/magic.h>
#include <cmocka.h>
#include "extlock-fstype.h"

/* Not in every <linux/magic.h> */
#ifndef CIFS_SUPER_MAGIC
#define CIFS_SUPER_MAGIC 0xFF534D42
#endif
#ifndef SMB2_SUPER_MAGIC
#define SMB2_SUPER_MAGIC 0xFE534D42
#endif
#define GFS2_MAGIC_VALUE  0x01161970
#define OCFS2_MAGIC_VALUE 0x7461636f
#define FUSE_MAGIC_VALUE  0x65735546

static void test_network_and_cluster_fs(void **state)
{
    (void)state;
    assert_string_equal(extlock_shared_fs_name(NFS_SUPER_MAGIC), "nfs");
    assert_string_equal(extlock_shared_fs_name(SMB_SUPER_MAGIC), "smb");
    assert_string_equal(extlock_shared_fs_name(CIFS_SUPER_MAGIC), "cifs");
    assert_string_equal(extlock_shared_fs_name(SMB2_SUPER_MAGIC), "smb2");
    assert_string_equal(extlock_shared_fs_name(GFS2_MAGIC_VALUE), "gfs2");
    assert_string_equal(extlock_shared_fs_name(OCFS2_MAGIC_VALUE), "ocfs2");
    assert_string_equal(extlock_shared_fs_name(CEPH_SUPER_MAGIC), "ceph");
    assert_string_equal(extlock_shared_fs_name(FUSE_MAGIC_VALUE), "fuse");
    assert_string_equal(extlock_shared_fs_name(V9FS_MAGIC), "9p");
    assert_string_equal(extlock_shared_fs_name(AFS_SUPER_MAGIC), "afs");
    assert_string_equal(extlock_shared_fs_name(CODA_SUPER_MAGIC), "coda");
}

static void test_local_fs(void **state)
{
    (void)state;
    assert_null(extlock_shared_fs_name(EXT4_SUPER_MAGIC));
    assert_null(extlock_shared_fs_name(TMPFS_MAGIC));
    assert_null(extlock_shared_fs_name(XFS_SUPER_MAGIC));
    assert_null(extlock_shared_fs_name(BTRFS_SUPER_MAGIC));
    assert_null(extlock_shared_fs_name(OVERLAYFS_SUPER_MAGIC));
    assert_null(extlock_shared_fs_name(0));
}

/*
 * f_type is a signed long: a magic with the top bit set (CIFS) may come
 * sign-extended on a 32-bit ABI, and must still be recognised
 */
static void test_sign_extended_magic(void **state)
{
    int32_t cifs = (int32_t)0xFF534D42u;

    (void)state;
    assert_string_equal(extlock_shared_fs_name((int64_t)cifs), "cifs");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_network_and_cluster_fs),
        cmocka_unit_test(test_local_fs),
        cmocka_unit_test(test_sign_extended_magic),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
