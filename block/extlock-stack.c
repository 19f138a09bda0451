/*
 * extlock: is the stack below an extlock node safe to share?
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * extlock coordinates the *data* the guests write: every request holds a
 * lock on its byte range.  Nothing coordinates what the nodes below do
 * besides: a qcow2 driver that allocates a cluster, sets a zero flag,
 * frees a cluster on discard or rewrites its header does it with its own
 * cached copy of the metadata, and two hosts doing that corrupt the image.
 * A file on NFS opened through the host page cache makes completion and
 * freshness local to one host.  So the node refuses, at open, every stack
 * in which that can happen, and runs a qcow2 stack in "metadata frozen"
 * mode, in which no guest request can change qcow2 metadata:
 *
 * - every cluster of the image is allocated, uncompressed, without the
 *   zero flag and not shared with an internal snapshot (refcount 1: the
 *   COPIED flag of its L1 and L2 entries, checked when the image has
 *   snapshots), so a
 *   write to any guest offset is an overwrite of its data cluster in
 *   place (qcow2's handle_copied() path: no L2 or refcount update);
 * - write-zeroes becomes data writes of zeroes (qcow2 would set zero
 *   flags), requests that insist on a fast zero (BDRV_REQ_NO_FALLBACK)
 *   fail with ENOTSUP so that their caller writes zeroes itself;
 * - discard is ignored and counted (qcow2 would free clusters);
 * - images that QEMU writes at open or close are refused: persistent
 *   bitmaps (marked in use at open, stored at close), lazy refcounts (dirty
 *   bit set on allocation, repair at the next open), a dirty or corrupt
 *   image;
 * - detect-zeroes on a node above qcow2 would turn the zero data writes
 *   back into zero-flag writes: refused.
 *
 * The allocation check reads qcow2's block status of the whole image: one
 * answer per run of clusters of one kind that are contiguous in the file,
 * within one L2 slice (512 MiB with 64 KiB clusters), from the L2 tables,
 * so it reads about 1/8192 of the image's size (plus, for images with
 * metadata preallocation, the protocol's block status of the same runs).
 * docs/qcow2.rst has its measured cost.
 */

#include "qemu/osdep.h"
#include <sys/vfs.h>
#include "qapi/error.h"
#include "extlock-compat.h"
#include EXTLOCK_QBOOL_H
#include EXTLOCK_QDICT_H
#include EXTLOCK_QNUM_H
#include EXTLOCK_QSTRING_H
#include "qapi/util.h"
#include "qemu/cutils.h"
#include "qemu/memalign.h"
#include "qemu/timer.h"
#include "qemu/units.h"
#include "block/snapshot.h"
#include "extlock-stack.h"
#include "extlock-fstype.h"
#include "trace.h"

#define EXTLOCK_ZERO_BUF_MAX (1 * MiB)

static const char *extlock_stack_name(BlockDriverState *bs)
{
    return bs->filename[0] ? bs->filename : bdrv_get_node_name(bs);
}

/* The value of a boolean option of @bs as given ("on", true), or @def */
static bool extlock_stack_bool_opt(BlockDriverState *bs, const char *key,
                                   bool def)
{
    QObject *obj = bs->options ? qdict_get(bs->options, key) : NULL;
    QString *str;
    bool val;

    if (!obj) {
        return def;
    }
    if (qobject_type(obj) == QTYPE_QBOOL) {
        return qbool_get_bool(qobject_to(QBool, obj));
    }
    str = qobject_to(QString, obj);
    if (str && qapi_bool_parse(key, qstring_get_str(str), &val, NULL)) {
        return val;
    }
    /* qcow2 has parsed it already, so this is not reached; be safe */
    return true;
}

/* Whether option @key of @bs is given with a value other than 0 */
static bool extlock_stack_opt_nonzero(BlockDriverState *bs, const char *key)
{
    QObject *obj = bs->options ? qdict_get(bs->options, key) : NULL;
    QString *str;
    QNum *num;
    uint64_t val;

    if (!obj) {
        return false;
    }
    num = qobject_to(QNum, obj);
    if (num) {
        return !qnum_get_try_uint(num, &val) || val != 0;
    }
    str = qobject_to(QString, obj);
    return !str || qemu_strtou64(qstring_get_str(str), NULL, 0, &val) ||
           val != 0;
}

/* qcow2's on-disk format (docs/interop/qcow2.txt in QEMU) */
#define EXTLOCK_QCOW2_COPIED        (1ULL << 63)
#define EXTLOCK_QCOW2_COMPRESSED    (1ULL << 62)
#define EXTLOCK_QCOW2_OFFSET_MASK   0x00fffffffffffe00ULL
#define EXTLOCK_QCOW2_EXTENDED_L2   (1ULL << 4)     /* incompatible bit */
#define EXTLOCK_QCOW2_MAX_L1_BYTES  (32 * MiB)      /* as qcow2 limits it */

/*
 * An image with internal snapshots can be shared if none of its clusters
 * is shared with a snapshot: every L1 entry and every allocated L2 entry
 * has the COPIED flag (reference count 1), as after a snapshot taken
 * through extlock (extlock-maint.c copies the image out of it).  Read
 * from the file: the header, the L1 table and each L2 table once (as much
 * as the allocation scan reads).
 */
static bool GRAPH_RDLOCK
extlock_stack_check_unshared(BlockDriverState *bs, int nb_sn, Error **errp)
{
    const char *name = extlock_stack_name(bs);
    BdrvChild *file = bs->file;
    g_autofree uint64_t *l1 = NULL;
    uint8_t hdr[80] = { 0 };
    uint8_t *l2 = NULL;
    uint32_t cluster_bits, l1_size, i, j, per_l2;
    uint64_t l1_offset, incompat = 0, cluster_size;
    unsigned entry;
    bool ok = false;
    int ret;

    ret = bdrv_pread(file, 0, sizeof(hdr), hdr, 0);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "qcow2 image '%s': could not read its "
                         "header", name);
        return false;
    }
    cluster_bits = ldl_be_p(hdr + 20);
    l1_size = ldl_be_p(hdr + 36);
    l1_offset = ldq_be_p(hdr + 40);
    if (ldl_be_p(hdr + 4) >= 3) {
        incompat = ldq_be_p(hdr + 72);
    }
    if (cluster_bits < 9 || cluster_bits > 21 ||
        (uint64_t)l1_size * 8 > EXTLOCK_QCOW2_MAX_L1_BYTES) {
        error_setg(errp, "qcow2 image '%s': unexpected header", name);
        return false;
    }
    cluster_size = 1ULL << cluster_bits;
    entry = incompat & EXTLOCK_QCOW2_EXTENDED_L2 ? 16 : 8;
    per_l2 = cluster_size / entry;
    l1 = g_try_malloc((size_t)l1_size * 8 + 1);
    l2 = qemu_try_blockalign(file->bs, cluster_size);
    if (!l1 || !l2) {
        error_setg(errp, "qcow2 image '%s': out of memory for its L1 and L2 "
                   "tables", name);
        goto out;
    }
    ret = bdrv_pread(file, l1_offset, (int64_t)l1_size * 8, l1, 0);
    if (ret < 0) {
        error_setg_errno(errp, -ret, "qcow2 image '%s': could not read its "
                         "L1 table", name);
        goto out;
    }
    for (i = 0; i < l1_size; i++) {
        uint64_t l1e = be64_to_cpu(l1[i]);
        uint64_t guest = 0;
        bool shared = false;

        if (!(l1e & EXTLOCK_QCOW2_OFFSET_MASK)) {
            continue;
        }
        if (!(l1e & EXTLOCK_QCOW2_COPIED)) {
            guest = (uint64_t)i * per_l2 << cluster_bits;
            shared = true;
        } else {
            ret = bdrv_pread(file, l1e & EXTLOCK_QCOW2_OFFSET_MASK,
                             cluster_size, l2, 0);
            if (ret < 0) {
                error_setg_errno(errp, -ret, "qcow2 image '%s': could not "
                                 "read an L2 table", name);
                goto out;
            }
            for (j = 0; j < per_l2 && !shared; j++) {
                uint64_t l2e = ldq_be_p(l2 + j * entry);

                if ((l2e & EXTLOCK_QCOW2_COMPRESSED) ||
                    !(l2e & EXTLOCK_QCOW2_OFFSET_MASK)) {
                    continue;   /* the allocation scan refuses these */
                }
                if (!(l2e & EXTLOCK_QCOW2_COPIED)) {
                    guest = ((uint64_t)i * per_l2 + j) << cluster_bits;
                    shared = true;
                }
            }
        }
        if (shared) {
            error_setg(errp, "qcow2 image '%s' has %d internal snapshot(s) "
                       "that share the cluster at guest offset %" PRIu64
                       " with the image: writing it would copy it (an "
                       "allocation); take snapshots of a shared image "
                       "through extlock (blockdev-snapshot-internal-sync on "
                       "the extlock node), or delete them ('qemu-img "
                       "snapshot -d') before sharing it", name, nb_sn, guest);
            goto out;
        }
    }
    ok = true;
out:
    qemu_vfree(l2);
    return ok;
}

/*
 * Every guest byte of @bs must live in a data cluster of its own: scan
 * qcow2's block status over the whole image.
 */
static bool GRAPH_RDLOCK extlock_stack_scan(BlockDriverState *bs,
                                            ExtlockStack *st, Error **errp)
{
    int64_t len = bdrv_getlength(bs);
    int64_t start_ns = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    int64_t offset, pnum = 0;
    uint64_t calls = 0;
    const char *why = NULL;
    int ret;

    if (len < 0) {
        error_setg_errno(errp, -len, "Could not get the length of '%s'",
                         extlock_stack_name(bs));
        return false;
    }
    for (offset = 0; offset < len; offset += pnum) {
        ret = bdrv_block_status(bs, offset, len - offset, &pnum, NULL, NULL);
        calls++;
        if (ret < 0) {
            error_setg_errno(errp, -ret, "Could not read the allocation "
                             "status of qcow2 image '%s'",
                             extlock_stack_name(bs));
            return false;
        }
        if (!(ret & BDRV_BLOCK_ALLOCATED)) {
            why = bdrv_cow_bs(bs) ?
                "unallocated: its data comes from the backing file" :
                "unallocated";
        } else if (!(ret & BDRV_BLOCK_DATA)) {
            /* DATA|ZERO: a data cluster whose host range reads as zeroes */
            why = "a zero cluster (writing it changes its L2 entry)";
        } else if (!(ret & BDRV_BLOCK_OFFSET_VALID)) {
            why = "a compressed cluster";
        }
        if (why) {
            break;
        }
        assert(pnum > 0);
    }
    st->scanned_bytes += offset;
    st->scan_us += (qemu_clock_get_ns(QEMU_CLOCK_REALTIME) - start_ns) /
                   SCALE_US;
    trace_extlock_stack_scan(extlock_stack_name(bs), offset, calls,
                             st->scan_us);
    if (why) {
        error_setg(errp, "qcow2 image '%s' is not fully allocated (the "
                   "cluster at guest offset %" PRId64 " is %s); a qcow2 "
                   "image shared through extlock must have every cluster "
                   "allocated: create it with 'qemu-img create -f qcow2 -o "
                   "preallocation=metadata|falloc|full' (or copy it with "
                   "'qemu-img convert -O qcow2 -o preallocation=...'), or "
                   "use raw", extlock_stack_name(bs), offset, why);
        return false;
    }
    return true;
}

/* The qcow2 node @bs: may its metadata stay frozen while it is shared? */
static bool GRAPH_RDLOCK
extlock_stack_check_qcow2(BlockDriverState *bs, ExtlockStack *st, Error **errp)
{
    const char *name = extlock_stack_name(bs);
    g_autoptr(ImageInfoSpecific) spec = NULL;
    ImageInfoSpecificQCow2 *q;
    QEMUSnapshotInfo *sn = NULL;
    BlockDriverInfo bdi = {};
    Error *local_err = NULL;
    int nb_sn;

    spec = bdrv_get_specific_info(bs, &local_err);
    if (!spec) {
        error_propagate_prepend(errp, local_err, "qcow2 image '%s': ", name);
        return false;
    }
    assert(spec->type == IMAGE_INFO_SPECIFIC_KIND_QCOW2);
    q = spec->u.qcow2.data;

    if (q->has_corrupt && q->corrupt) {
        error_setg(errp, "qcow2 image '%s' is marked corrupt: repair it "
                   "with 'qemu-img check -r all' before sharing it", name);
        return false;
    }
    if (bdrv_get_info(bs, &bdi) == 0 && bdi.is_dirty) {
        error_setg(errp, "qcow2 image '%s' is dirty (lazy refcounts after a "
                   "crash): the next read-write open repairs it, changing "
                   "metadata; run 'qemu-img check -r all' while no host "
                   "uses it", name);
        return false;
    }
    if (extlock_stack_bool_opt(bs, "lazy-refcounts",
                               q->has_lazy_refcounts && q->lazy_refcounts)) {
        error_setg(errp, "qcow2 image '%s' uses lazy refcounts, which set "
                   "the dirty flag in the header: turn them off with "
                   "'qemu-img amend -o lazy_refcounts=off' (or open it with "
                   "lazy-refcounts=off)", name);
        return false;
    }
    if (q->bitmaps) {
        error_setg(errp, "qcow2 image '%s' has persistent dirty bitmaps: "
                   "QEMU marks them in use when it opens the image "
                   "read-write and stores them when it closes it; remove "
                   "them ('qemu-img bitmap --remove') before sharing it",
                   name);
        return false;
    }
    if (q->encrypt) {
        error_setg(errp, "qcow2 image '%s' is encrypted, which extlock "
                   "cannot check for full allocation: use a luks image "
                   "(or luks on raw) instead", name);
        return false;
    }
    nb_sn = bdrv_snapshot_list(bs, &sn);
    g_free(sn);
    if (nb_sn > 0 && st->allocation_check &&
        !extlock_stack_check_unshared(bs, nb_sn, errp)) {
        return false;
    }
    if (st->allocation_check && !extlock_stack_scan(bs, st, errp)) {
        return false;
    }
    st->metadata_frozen = true;
    return true;
}

/* A file or block device: the host page cache must not be in the way */
static bool extlock_stack_check_posix(BlockDriverState *bs, Error **errp)
{
    const char *fs = NULL;
    struct statfs sfs;

    if (bs->open_flags & BDRV_O_NOCACHE) {
        return true;
    }
    if (strcmp(bs->drv->format_name, "file")) {
        error_setg(errp, "block device '%s' is opened through the host page "
                   "cache, which is local to this host: open it with "
                   "cache.direct=on to share it", bs->filename);
        return false;
    }
    if (statfs(bs->filename, &sfs) < 0) {
        error_setg_errno(errp, errno, "Could not find the file system of "
                         "'%s'", bs->filename);
        return false;
    }
    fs = extlock_shared_fs_name(sfs.f_type);
    if (fs) {
        error_setg(errp, "'%s' is on a shared file system (%s) but opened "
                   "through the host page cache, which is local to this "
                   "host: open it with cache.direct=on (or use QEMU's nfs "
                   "driver for NFS)", bs->filename, fs);
        return false;
    }
    return true;
}

/*
 * Check @bs and what is below it.  *@qcow2_below is set when a qcow2 node
 * is at or below @bs.
 */
static bool GRAPH_RDLOCK
extlock_stack_walk(BlockDriverState *bs, ExtlockStack *st, bool *qcow2_below,
                   Error **errp)
{
    const char *drv = bs->drv->format_name;
    bool below = false;
    BdrvChild *c;

    QLIST_FOREACH(c, &bs->children, next) {
        /* A backing file is never written (and, allocated, never read) */
        if (c->role & BDRV_CHILD_COW) {
            continue;
        }
        if (!extlock_stack_walk(c->bs, st, &below, errp)) {
            return false;
        }
    }

    if (bs->drv->protocol_name) {
        if (!strcmp(drv, "file") || !strcmp(drv, "host_device") ||
            !strcmp(drv, "host_cdrom")) {
            if (!extlock_stack_check_posix(bs, errp)) {
                return false;
            }
        }
        if (!strcmp(drv, "nfs") &&
            (extlock_stack_opt_nonzero(bs, "readahead-size") ||
             extlock_stack_opt_nonzero(bs, "page-cache-size"))) {
            error_setg(errp, "nfs node '%s' uses libnfs's readahead or page "
                       "cache, which is local to this host: leave "
                       "readahead-size and page-cache-size unset to share "
                       "the image", bdrv_get_node_name(bs));
            return false;
        }
    } else if (bs->drv->is_filter) {
        if (!strcmp(drv, "compress") || !strcmp(drv, "preallocate")) {
            error_setg(errp, "the %s filter (node '%s') changes the image's "
                       "allocation and cannot be used below extlock", drv,
                       bdrv_get_node_name(bs));
            return false;
        }
    } else if (!strcmp(drv, "qcow2")) {
        if (!extlock_stack_check_qcow2(bs, st, errp)) {
            return false;
        }
        below = true;
    } else if (strcmp(drv, "raw") && strcmp(drv, "luks")) {
        error_setg(errp, "image format %s (node '%s') cannot be shared "
                   "through extlock: use raw, or qcow2 with every cluster "
                   "allocated", drv, bdrv_get_node_name(bs));
        return false;
    }

    if (below && bs->detect_zeroes != BLOCKDEV_DETECT_ZEROES_OPTIONS_OFF) {
        error_setg(errp, "node '%s' has detect-zeroes, which turns writes "
                   "of zeroes into qcow2 zero clusters (a metadata change): "
                   "use detect-zeroes=off below extlock (on the extlock "
                   "node itself it is fine)", bdrv_get_node_name(bs));
        return false;
    }
    *qcow2_below |= below;
    return true;
}

bool GRAPH_RDLOCK extlock_stack_check(BlockDriverState *child,
                                      bool allocation_check,
                                      ExtlockStack *st, Error **errp)
{
    bool qcow2_below = false;

    st->allocation_check = allocation_check;
    st->metadata_frozen = false;
    return extlock_stack_walk(child, st, &qcow2_below, errp);
}

int coroutine_fn GRAPH_RDLOCK
extlock_stack_co_zero_as_data(BdrvChild *child, int64_t offset, int64_t bytes,
                              BdrvRequestFlags flags)
{
    BlockDriverState *bs = child->bs;
    int64_t chunk = MIN(bytes, EXTLOCK_ZERO_BUF_MAX);
    void *buf;
    int ret = 0;

    if (bs->bl.max_transfer) {
        chunk = MIN(chunk, bs->bl.max_transfer);
    }
    buf = qemu_try_blockalign0(bs, chunk);
    if (!buf) {
        return -ENOMEM;
    }
    while (bytes > 0) {
        int64_t n = MIN(bytes, chunk);

        ret = bdrv_co_pwrite(child, offset, n, buf, flags & BDRV_REQ_FUA);
        if (ret < 0) {
            break;
        }
        offset += n;
        bytes -= n;
    }
    qemu_vfree(buf);
    return ret < 0 ? ret : 0;
}

ExtentLockStackInfo *extlock_stack_info(const ExtlockStack *st)
{
    ExtentLockStackInfo *info = g_new0(ExtentLockStackInfo, 1);

    info->metadata_frozen = st->metadata_frozen;
    info->allocation_check = st->allocation_check;
    info->discards_ignored = st->discards_ignored;
    info->zero_writes_as_data = st->zero_writes_as_data;
    return info;
}
