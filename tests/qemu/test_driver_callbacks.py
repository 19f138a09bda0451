"""The block driver callbacks a QEMU reviewer expects of a filter.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Real binaries (qemu-io, qemu-img, qemu-storage-daemon) against a real
extlockd:

* .bdrv_get_specific_stats: query-blockstats shows the node's counters
  (the same as query-extent-locks');
* .bdrv_refresh_limits: a request reaches the driver whole and runs under
  one lock, even when the child has an alignment and a transfer limit (the
  child pads and splits it under that lock; padding above the driver would
  be a read-modify-write under two locks);
* compressed writes pass through to a qcow2 child under an exclusive lock;
* errors: "once" is once per node;
* block status: with want_zero (NBD base:allocation) one "data" answer
  for the whole range (the NBD atomicity guarantee); without it (qemu-io
  map, bdrv_is_allocated) the child's allocation.
"""

import errno
import json
import os
import re
import signal

from harness import procs as hp
from harness.faults import NbdClient, node_info
from harness.procs import extlock_node

KiB = 1024
MiB = 1024 * KiB

REQUEST_RE = re.compile(r"extlock_request node (\S+) (\S+) offset (\d+) bytes (\d+) "
                        r"lock \[(\d+), \+(\d+)\)")
LOCK_RE = re.compile(r"extlock_client_lock node (\S+) request \d+ \[(\d+), \+(\d+)\) (\S+)")
IO_START_RE = re.compile(r"extlock_io_start node (\S+) (\S+) offset (\d+) bytes (\d+) "
                         r"lock \d+ token 0x([0-9a-f]+)")


def qcow2_image(workdir, size="4M"):
    path = workdir / "img.qcow2"
    r = hp.run_qemu_img("create", "-q", "-f", "qcow2", str(path), size)
    assert r.returncode == 0, r.stderr
    return path


def qcow2_child(path):
    return {"driver": "qcow2", "file": hp.file_child(path)}


def test_blockstats_driver_specific(local_image, extlockd, lock_space, procs, binaries):
    """query-blockstats (query-nodes) has an "extlock" driver-specific part
    with the node's counters, equal to query-extent-locks' counters."""
    binaries("qemu-storage-daemon")
    opts = extlock_node(local_image.child, extlockd.coordinator(), lock_space,
                        node_name="xl0", lock_cache=True)
    q = procs.storage_daemon(blockdevs=[opts], exports=[("disk", "xl0", True)])
    with NbdClient(q.nbd_path, "disk") as n:
        n.write(0, b"\x17" * 4096)
        assert n.read(0, 4096) == b"\x17" * 4096
    stats = q.qmp.execute("query-blockstats", {"query-nodes": True})
    mine = [s for s in stats if s.get("node-name") == "xl0"]
    assert len(mine) == 1, stats
    specific = mine[0].get("driver-specific")
    assert specific is not None, mine[0]
    assert specific.pop("driver") == "extlock"
    counters = node_info(q.qmp, "xl0")["counters"]
    assert specific == counters
    assert counters["requests"] >= 1 and counters["grants"] >= 1
    assert counters["cache-hits"] >= 1          # the read, under the cached lock
    # the child is not an extlock node: no extlock part there
    child = [s for s in stats if s.get("node-name") != "xl0"]
    assert all(s.get("driver-specific", {}).get("driver") != "extlock" for s in child)


def test_request_reaches_driver_whole(local_image, extlockd, lock_space, binaries):
    """Child with a 4 KiB request alignment and a 64 KiB transfer limit
    (blkdebug): an unaligned 1 MiB write through an extlock node with
    granularity 512 is ONE request to the driver, under one exclusive lock
    rounded out to the child's alignment, and no read (a read-modify-write
    above the driver would read under a shared lock first)."""
    binaries("qemu-io")
    child = {"driver": "blkdebug", "align": 4096, "max-transfer": 64 * KiB,
             "image": local_image.child}
    node = extlock_node(child, extlockd.coordinator(), lock_space,
                        node_name="xl0", granularity=512, lock_cache=False)
    r = hp.run_qemu_io(node, ["write -P 0x5c 512 1M", "read -P 0x5c 512 1M"],
                       extra_args=["-T", "extlock_request", "-T", "extlock_refresh_limits"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Pattern verification failed" not in r.stdout, r.stdout
    requests = [(m[1], int(m[2]), int(m[3]), int(m[4]), int(m[5]))
                for m in REQUEST_RE.findall(r.stderr)]
    assert requests == [("write", 512, MiB, 0, MiB + 4096),
                        ("read", 512, MiB, 0, MiB + 4096)], r.stderr
    assert re.search(r"extlock_refresh_limits node xl0 lock alignment 4096", r.stderr), \
        r.stderr
    data = local_image.path.read_bytes()
    assert data[512:512 + MiB] == b"\x5c" * MiB
    assert data[:512] == b"\0" * 512 and data[512 + MiB:MiB + 4096] == b"\0" * (4096 - 512)


def test_compressed_write_refused_on_shared_qcow2(workdir, extlockd, lock_space, binaries):
    """qemu-io write -c through an extlock node over a (fully allocated)
    qcow2: a compressed cluster is a new allocation, qcow2 metadata that
    other hosts do not see (docs/qcow2.rst), so the node refuses it with
    ENOTSUP before it takes a lock, and the image keeps no compressed
    cluster.  (Before the qcow2 refusals, compressed writes passed through
    under an exclusive lock; the only formats that take compressed writes
    keep allocation metadata, so that case no longer exists below extlock.)"""
    binaries("qemu-io", "qemu-img")
    path = workdir / "img.qcow2"
    r = hp.run_qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata",
                        str(path), "4M")
    assert r.returncode == 0, r.stderr
    node = extlock_node(qcow2_child(path), extlockd.coordinator(), lock_space,
                        node_name="xl0", lock_cache=False)
    r = hp.run_qemu_io(node, ["write -c -P 0x3d 0 64k"],
                       extra_args=["-T", "extlock_client_lock", "-T", "extlock_io_start"])
    assert "Operation not supported" in r.stdout + r.stderr, r.stdout + r.stderr
    assert not [m for m in IO_START_RE.findall(r.stderr) if m[1] != "flush"], r.stderr
    r = hp.run_qemu_img("check", "--output=json", "-f", "qcow2", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout).get("compressed-clusters", 0) == 0, r.stdout


def test_block_status_want_zero_and_allocation(workdir, extlockd, lock_space, procs,
                                               binaries):
    """A qcow2 image with only its first 64 KiB allocated.  Exported over
    NBD through an extlock node, a client's block status (base:allocation,
    which the server answers with want_zero) sees one data extent for the
    whole image: the answer NBD's sparse reads rely on.  qemu-io map
    through the node (allocation only, want_zero off) sees the child's
    allocation."""
    binaries("qemu-io", "qemu-img", "qemu-storage-daemon")
    path = qcow2_image(workdir)
    r = hp.run_qemu_io(qcow2_child(path), ["write -P 0x21 0 64k"])
    assert r.returncode == 0, r.stdout + r.stderr
    r = hp.run_qemu_img("map", "--output=json", "-f", "qcow2", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert [e["data"] for e in json.loads(r.stdout)] == [True, False], r.stdout
    # A thin image on purpose (what block status reports is the point):
    # allocation-check=off is the explicit way past the refusal
    node = extlock_node(qcow2_child(path), extlockd.coordinator(), lock_space,
                        node_name="xl0", lock_cache=False, allocation_check=False)

    r = hp.run_qemu_io(node, ["map"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"64 KiB \(0x10000\) bytes\s+allocated at offset 0 bytes", r.stdout), \
        r.stdout
    assert re.search(r"bytes not allocated at offset 64 KiB \(0x10000\)", r.stdout), r.stdout

    q = procs.storage_daemon(blockdevs=[node], exports=[("disk", "xl0", False)])
    r = hp.run_qemu_img("map", "--output=json", "-f", "raw",
                        f"nbd+unix:///disk?socket={q.nbd_path}")
    assert r.returncode == 0, r.stdout + r.stderr
    extents = json.loads(r.stdout)
    assert [(e["start"], e["length"], e["data"], e["zero"]) for e in extents] == \
        [(0, 4 * MiB, True, False)], extents


def test_no_lease_error_reported_once_per_node(local_image, extlockd, lock_space, procs,
                                               binaries):
    """Two nodes in one process lose their lease (the coordinator is
    stopped) with on-lease-loss=error: each node's failed requests are
    reported once for that node ("once" is per node, not per process as
    error_report_once would make it), and fail with EIO."""
    binaries("qemu-storage-daemon")
    lease = 500
    nodes = [extlock_node(local_image.child, extlockd.coordinator(), f"{lock_space}-{i}",
                          node_name=f"xl{i}", client_id=f"host-{i}", lease_time=lease,
                          on_lease_loss="error", lock_cache=False)
             for i in range(2)]
    q = procs.storage_daemon(blockdevs=nodes,
                             exports=[("d0", "xl0", True), ("d1", "xl1", True)])
    os.kill(extlockd.proc.pid, signal.SIGSTOP)
    try:
        # no renewal answered: the lease runs out after `lease` ms plus the
        # client's margin; bound: twice the lease plus scheduling slack
        hp.wait_until(lambda: all(node_info(q.qmp, f"xl{i}")["state"] == "lease-lost"
                                  for i in range(2)),
                      2 * lease / 1000 + 5, what="both leases lost")
        for export in ("d0", "d1"):
            with NbdClient(q.nbd_path, export) as n:
                for _ in range(2):
                    h = n.send_write(0, b"\x01" * 4096)
                    err, _ = n.wait(h, timeout=5)
                    assert err == errno.EIO, err
    finally:
        os.kill(extlockd.proc.pid, signal.SIGCONT)
    log = q.stderr()
    for i in range(2):
        assert log.count(f"node 'xl{i}': no valid lease, failing I/O") == 1, log
