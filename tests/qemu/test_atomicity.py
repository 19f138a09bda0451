"""Deterministic atomicity checks, each with its control.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

A race that may or may not happen proves little either way, so these tests
*make* the dangerous interleaving happen, every time, and then look at the
result with the same checker twice: once with extlock nodes (the checker
must find nothing) and once without them (the control: the checker must
find the damage - otherwise it could not have found it with extlock
either).

How one write is made to land half: process A's image is a qcow2 whose
two 64 KiB clusters lie in the file in the opposite order of the guest's
(cluster 1 was allocated first), so a 128 KiB write at guest offset 0 is
two writes to the file, issued as two concurrent tasks by the qcow2 driver.
A blkdebug breakpoint on ``write_aio`` below qcow2 suspends the first one
(guest cluster 0); the second lands.  The test waits until it has landed
(it watches the file), and then process B writes or reads the same
128 KiB:

* without extlock B's write lands at once; when A's held half lands after
  it, guest cluster 0 holds A's data and cluster 1 B's: a mixed extent.
  B's read returns half old data and half A's: a torn read.
* with extlock A still holds its exclusive lock on [0, 128 KiB) - the
  write is not complete - so B waits (its query-extent-locks shows it,
  blocked by A); after A's write completes B's request runs, and the
  extent is entirely B's (write) or entirely A's (read).

The qcow2 clusters are allocated before the test, so neither process
changes qcow2 metadata (two qcow2 drivers on one file are safe then); the
file is opened with locking=off for the same reason (QEMU's image locking
would refuse a second writer of a qcow2 file).
"""

import importlib.util
import json
from pathlib import Path

import pytest

from harness import procs as hp
from harness.faults import NbdClient
from harness.patterns import extent_summary
from harness.procs import extlock_node, wait_until

KiB = 1024
CLUSTER = 64 * KiB
OLD, A_DATA, B_DATA = 0x11, 0xaa, 0xbb


def fragmented_qcow2(path, old=OLD, size="64M"):
    """A qcow2 image (64 KiB clusters) whose guest clusters 0 and 1 are
    allocated in reverse order in the file, filled with `old`.  Returns the
    host offsets (cluster 0, cluster 1)."""
    r = hp.run_qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}",
                        str(path), size)
    assert r.returncode == 0, r.stderr
    r = hp.run_qemu_io({"driver": "qcow2", "file": hp.file_child(path)},
                       [f"write -q -P {old:#x} {CLUSTER} {CLUSTER}",
                        f"write -q -P {old:#x} 0 {CLUSTER}"])
    assert r.returncode == 0, r.stdout + r.stderr
    r = hp.run_qemu_img("map", "--output=json", "-f", "qcow2", str(path))
    assert r.returncode == 0, r.stderr
    host = {}
    for m in json.loads(r.stdout):
        if m.get("data") and "offset" in m:
            for g in range(m["start"], m["start"] + m["length"], CLUSTER):
                host[g] = m["offset"] + g - m["start"]
    h0, h1 = host[0], host[CLUSTER]
    assert h1 != h0 + CLUSTER, host      # guest order is not file order
    return h0, h1


def guest_view(path, hosts):
    """The guest's [0, 128 KiB) as stored in the file."""
    with open(path, "rb") as f:
        out = b""
        for h in hosts:
            f.seek(h)
            out += f.read(CLUSTER)
    return out


def mixed(data):
    """The checker: a description of the extent if it is not uniformly one
    byte pattern (a write that was interleaved with another), else None."""
    s = extent_summary(data)
    if len(s) == 1:
        return None
    return ", ".join(f"{b:#04x} x {n}" for b, n in s.items())


def qcow2_node(path, blkdebug=False):
    f = {"driver": "file", "filename": str(path), "locking": "off"}
    if blkdebug:
        f = {"driver": "blkdebug", "image": f}
    return {"driver": "qcow2", "file": f}


def half_landed_write(procs, workdir, extlockd, lock_space, protected):
    """Set the scene: A's 128 KiB write of A_DATA has landed in guest
    cluster 1 while the part for cluster 0 is held by a blkdebug breakpoint.
    Returns (A, B, host offsets, path); B is a storage daemon over the same
    image exporting it over NBD ("disk")."""
    path = workdir / "frag.qcow2"
    # two clusters, both allocated: the extlock node refuses a qcow2 image
    # that is not fully allocated (docs/qcow2.rst)
    hosts = fragmented_qcow2(path, size=str(2 * CLUSTER))

    def node(client, blkdebug):
        n = qcow2_node(path, blkdebug)
        if protected:
            n = extlock_node(n, extlockd.coordinator(), lock_space, node_name=f"xl{client}",
                             client_id=f"host-{client}", lock_cache=False)
        else:
            n["node-name"] = f"xl{client}"
        return n

    a = procs.qemu_io(node("a", True), name="a")
    assert a.cmd("break write_aio hold").strip() == ""
    a.cmd(f"aio_write -P {A_DATA:#x} 0 {2 * CLUSTER}")
    a.cmd("wait_break hold", timeout=20)
    # the other half lands (the file shows it), the held one does not
    wait_until(lambda: guest_view(path, hosts)[CLUSTER:] == bytes([A_DATA]) * CLUSTER,
               timeout=20, what="the unheld half of A's write to land")
    assert guest_view(path, hosts)[:CLUSTER] == bytes([OLD]) * CLUSTER
    b = procs.storage_daemon(name="b", blockdevs=[node("b", False)],
                             exports=[("disk", "xlb", True)])
    return a, b, hosts, path


def b_waits_for_a(b, req, nb):
    """With extlock: B's request is queued behind A's exclusive lock."""
    # listed from the moment it is sent; queued (a token, its blockers)
    # once the coordinator answered
    w = wait_until(lambda: [x for n in b.qmp.execute("query-extent-locks")
                            for x in n["waiting"] if "token" in x],
                   timeout=15, what="B's request to wait for A's lock")
    assert w[0]["blocked-by"] == ["host-a"], w
    assert not nb.replied(req), "B's request completed while A's write was half done"


@pytest.mark.parametrize("protected", [True, False], ids=["extlock", "control-no-extlock"])
def test_write_racing_half_landed_write(protected, extlockd, lock_space, procs, workdir,
                                        binaries):
    """B writes the extent A's write has half written.  With extlock the
    final extent is uniformly B's; without it the checker finds it mixed."""
    binaries("qemu-io", "qemu-img", "qemu-storage-daemon")
    a, b, hosts, path = half_landed_write(procs, workdir, extlockd, lock_space, protected)
    with NbdClient(b.nbd_path, "disk") as nb:
        req = nb.send_write(0, bytes([B_DATA]) * 2 * CLUSTER)
        if protected:
            b_waits_for_a(b, req, nb)
            a.cmd("resume hold")
            a.cmd("aio_flush", timeout=30)
            err, _ = nb.wait(req, timeout=30)
        else:
            err, _ = nb.wait(req, timeout=20)
            a.cmd("resume hold")
            a.cmd("aio_flush", timeout=30)
        assert err == 0
    assert a.quit() == 0
    final = guest_view(path, hosts)
    problem = mixed(final)
    if protected:
        assert problem is None, f"A's and B's writes interleaved: {problem}"
        assert final == bytes([B_DATA]) * 2 * CLUSTER       # B waited, B last
    else:
        # the control: the same checker catches the interleaving
        assert problem is not None, "without extlock the extent should be mixed"
        assert final == bytes([A_DATA]) * CLUSTER + bytes([B_DATA]) * CLUSTER


@pytest.mark.parametrize("protected", [True, False], ids=["extlock", "control-no-extlock"])
def test_read_racing_half_landed_write(protected, extlockd, lock_space, procs, workdir,
                                       binaries):
    """B reads the extent A's write has half written.  With extlock the
    read waits and returns A's whole write; without it it returns half old
    and half new data, which the checker reports."""
    binaries("qemu-io", "qemu-img", "qemu-storage-daemon")
    a, b, hosts, path = half_landed_write(procs, workdir, extlockd, lock_space, protected)
    with NbdClient(b.nbd_path, "disk") as nb:
        req = nb.send_read(0, 2 * CLUSTER)
        if protected:
            b_waits_for_a(b, req, nb)
            a.cmd("resume hold")
            a.cmd("aio_flush", timeout=30)
            err, data = nb.wait(req, timeout=30)
        else:
            err, data = nb.wait(req, timeout=20)
            a.cmd("resume hold")
            a.cmd("aio_flush", timeout=30)
        assert err == 0
    assert a.quit() == 0
    problem = mixed(data)
    if protected:
        assert problem is None, f"B read A's write half done: {problem}"
        assert data == bytes([A_DATA]) * 2 * CLUSTER
    else:
        assert problem is not None, "without extlock the read should be torn"
        assert data == bytes([OLD]) * CLUSTER + bytes([A_DATA]) * CLUSTER


def load_verify_image():
    """contrib/guest/verify-image.py, the end-to-end test's image checker."""
    path = Path(__file__).resolve().parents[2] / "contrib" / "guest" / "verify-image.py"
    spec = importlib.util.spec_from_file_location("verify_image", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_image_checker_catches_real_mixed_extent(procs, workdir, binaries):
    """The end-to-end test's image checker (contrib/guest/verify-image.py)
    on an extent that two real QEMU processes wrote, without extlock,
    interleaved: the same scene as above (A's write of the extent half
    landed and half held by a breakpoint, B's write of it in between), with
    the data of extlock-stress's stamped writes (guest 1 write 1, guest 2
    write 1).  The checker must call the extent mixed - its self-test only
    shows it on synthetic images."""
    binaries("qemu-system-x86_64", "qemu-storage-daemon", "qemu-img", "qemu-io")
    vi = load_verify_image()
    layout = vi.Layout(run_id=0x5eed, guests=2, extent_size=2 * CLUSTER, extents=1,
                       data_offset=0, control_offset=1024 * KiB, max_seq={1: 1, 2: 1})

    def stamped(guest):
        return b"".join(vi.make_sector(layout, guest, 1, 0, i)
                        for i in range(layout.nsectors))
    path = workdir / "stamped.qcow2"
    hosts = fragmented_qcow2(path, old=0, size="4M")

    # A: qemu-system, blkdebug below qcow2, written through an NBD export
    a_node = dict(qcow2_node(path, blkdebug=True), **{"node-name": "xla"})
    vm = procs.qemu_system(name="a", extra_args=["-drive", "if=none,id=drva,"
                                                 + hp.dotted(a_node)])
    a_sock = workdir / "a-nbd.sock"
    vm.qmp.execute("nbd-server-start", {"addr": {"type": "unix",
                                                 "data": {"path": str(a_sock)}}})
    vm.qmp.execute("block-export-add", {"type": "nbd", "id": "a", "name": "a",
                                        "node-name": "xla", "writable": True})
    assert "error" not in vm.qmp.hmp('qemu-io drva "break write_aio hold"').lower()
    b = procs.storage_daemon(name="b",
                             blockdevs=[dict(qcow2_node(path), **{"node-name": "xlb"})],
                             exports=[("disk", "xlb", True)])
    with NbdClient(a_sock, "a") as na, NbdClient(b.nbd_path, "disk") as nb:
        ha = na.send_write(0, stamped(1))
        out = vm.qmp.hmp('qemu-io drva "wait_break hold"', timeout=20)
        assert "error" not in out.lower(), out
        wait_until(lambda: guest_view(path, hosts)[CLUSTER:] == stamped(1)[CLUSTER:],
                   timeout=20, what="the unheld half of A's write to land")
        nb.write(0, stamped(2), timeout=20)               # no extlock: at once
        vm.qmp.hmp('qemu-io drva "resume hold"')
        err, _ = na.wait(ha, timeout=20)
        assert err == 0
    raw = workdir / "stamped.raw"
    r = hp.run_qemu_img("convert", "-f", "qcow2", "-O", "raw", str(path), str(raw))
    assert r.returncode == 0, r.stderr
    result = vi.verify(raw, layout)
    assert result["mixed"] == 1 and not result["ok"], result
    detail = result["details"][0]
    assert detail["kind"] == "mixed", detail
    assert detail["stamps"] == {"1:1": layout.nsectors // 2, "2:1": layout.nsectors // 2}, \
        detail
