"""Cluster-wide maintenance: block_resize of a shared image while it is used.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

block_resize on any host's extlock node takes the maintenance lock (an
exclusive lock on [0, 2^63), granted in timestamp order once every other
host has given back its locks), resizes the image through that node and
announces the new length; every other host rereads the metadata when its
next grant or lease renewal shows the new maintenance count, and its node
(and the guest device above it) gets the new size (block/extlock-maint.h,
docs/design.rst "Metadata changes").  These tests run real
qemu-storage-daemons on the loopback NFS server (QEMU's nfs driver) with
the stamped atomicity checker of the qcow2 tests:

* a resize while two hosts write and read stamped extents: no torn read,
  both hosts see the new size, a write of one host in the new area is read
  back whole by the other, the extents end whole (mixed 0, corrupt 0),
  qemu-img check is clean and a new host can open the resized image (the
  new qcow2 clusters were preallocated: the allocation check passes);
  raw, and qcow2 with preallocation=metadata and full;
* bad arguments (shrink, unaligned size) fail with a clear error and change
  nothing (no maintenance counted);
* kill -9 of a host in the middle of a maintenance: the resize goes on once
  its lease and fence margin have passed;
* a host that keeps a lock while a maintenance waits (alive, renewing) is
  expired after its lease;
* the owner killed while it holds the maintenance lock (a protocol client:
  a QEMU owner holds it only for the duration of the truncate, too short
  to hit from outside reliably): the others wait until its lease lapses,
  then reread the metadata and go on;
* the QEMU owner killed -9 while it waits for the maintenance lock: the
  others go on, nothing changed.
"""

import errno
import json
import random
import time
import uuid
from pathlib import Path

import pytest

from harness import procs as hp
from harness.coordinator import (CoordinatorClient, CoordinatorError, coordinator_status,
                                 release_after_fresh_renewal)
from harness.faults import NbdClient, TcpPartition, check_coordinator, start_coordinator
from harness.procs import extlock_node, wait_until

from test_qcow2 import (CLUSTER, MiB, check_clean, create_qcow2, load_verify_image,
                        qemu_img)

LEASE_MS = 2000
OLD, NEW = 16 * MiB, 32 * MiB
MAINT_LENGTH = 1 << 63


# ---------------------------------------------------------------------------
# helpers

def make_image(nfs, kind, size=OLD):
    if kind == "raw":
        path = nfs.export_dir / f"r-{uuid.uuid4().hex[:10]}.raw"
        with open(path, "wb") as f:
            f.truncate(size)
        return path, {"driver": "raw", "file": hp.nfs_child(path)}
    prealloc = kind.split("-", 1)[1]
    path = nfs.export_dir / f"q-{uuid.uuid4().hex[:10]}.qcow2"
    create_qcow2(path, size, prealloc)
    return path, {"driver": "qcow2", "file": hp.nfs_child(path)}


def start_host(procs, child, extlockd, lock_space, n, lease=LEASE_MS, maint=False):
    """A host: node xl0 exported over NBD as "disk".  An NBD export does not
    let its node be resized (it unshares BLK_PERM_RESIZE), as a guest device
    does: with `maint`, the host also has node xm on the same image, without
    export, which runs block_resize (another session of the lock-space)."""
    nodes = [extlock_node(child, extlockd.coordinator(), lock_space, node_name="xl0",
                          client_id=f"host-{n}", lease_time=lease)]
    if maint:
        nodes.append(extlock_node(child, extlockd.coordinator(), lock_space,
                                  node_name="xm", client_id=f"host-{n}-maint",
                                  lease_time=lease))
    return procs.storage_daemon(name=f"host{n}-{uuid.uuid4().hex[:4]}",
                                blockdevs=nodes, exports=[("disk", "xl0", True)])


def node_size(qsd, node="xl0"):
    for n in qsd.qmp.execute("query-named-block-nodes"):
        if n["node-name"] == node:
            return n["image"]["virtual-size"]
    raise AssertionError(f"no node {node}")


def maint_info(qsd, node="xl0"):
    return qsd.qmp.execute("query-extent-locks", args={"node-name": node})[0]["maintenance"]


def space_status(extlockd, lock_space):
    for sp in coordinator_status(extlockd.address)["lock-spaces"]:
        if sp["name"] == lock_space:
            return sp
    return None


def maintenance_waiting(extlockd, lock_space):
    sp = space_status(extlockd, lock_space)
    return sp is not None and any(w["offset"] == 0 and w["length"] == MAINT_LENGTH
                                  for w in sp["waiting"])


def ctl_maintenance(extlockd, lock_space):
    """extlockctl --json maintenance: the entry of `lock_space`."""
    r = extlockd.ctl("--json", "maintenance")
    assert r.returncode == 0, r.stdout + r.stderr
    entries = [e for e in json.loads(r.stdout) if e["lock-space"] == lock_space]
    assert len(entries) == 1, r.stdout
    return entries[0]


def qmp_send(qsd, command, args):
    """Send a QMP command without waiting; return its id."""
    qsd.qmp._next_id += 1
    msg_id = qsd.qmp._next_id
    qsd.qmp.send({"execute": command, "id": msg_id, "arguments": args})
    return msg_id


def qmp_reply(qsd, msg_id, timeout):
    deadline = time.monotonic() + timeout
    while True:
        reply = qsd.qmp._read_message(max(0.0, deadline - time.monotonic()))
        if reply.get("id") == msg_id:
            return reply
        if "event" in reply:
            qsd.qmp.events.append(reply)


class Stamped:
    """Stamped extents of the checker over the image's data area; writes and
    reads through NBD clients, every read checked at once."""

    def __init__(self, extents):
        self.vi = load_verify_image()
        self.layout = self.vi.Layout(run_id=0x3a17e, guests=2, extent_size=MiB,
                                     extents=extents, data_offset=MiB, control_offset=0)
        self.seq = {1: 0, 2: 0}
        self.rng = random.Random(1212)
        self.torn = []
        self.reads = 0
        self.written = set()

    def offset(self, e):
        return MiB + e * MiB

    def data(self, g, e):
        self.seq[g] += 1
        return b"".join(self.vi.make_sector(self.layout, g, self.seq[g], e, i)
                        for i in range(self.layout.nsectors))

    def send_round(self, clients, extents):
        pending = []
        for g, nb in clients.items():
            for e in self.rng.sample(extents, 3):
                pending.append((nb, nb.send_write(self.offset(e), self.data(g, e)), None))
                self.written.add(e)
            for e in self.rng.sample(extents, 3):
                pending.append((nb, nb.send_read(self.offset(e), MiB), e))
        return pending

    def finish(self, pending, timeout=60):
        for nb, h, e in pending:
            err, data = nb.wait(h, timeout=timeout)
            assert err == 0, f"request failed with errno {err}"
            if e is not None:
                self.reads += 1
                r = self.vi.check_extent(self.layout, data, e)
                if r["kind"] not in ("complete", "unwritten"):
                    self.torn.append(r)

    def cross_check(self, writer, g, reader, e):
        """A write acknowledged on one host is read back whole on the other."""
        writer.write(self.offset(e), self.data(g, e))
        self.written.add(e)
        r = self.vi.check_extent(self.layout, reader.read(self.offset(e), MiB), e)
        assert r["kind"] == "complete" and f"{g}:{self.seq[g]}" in \
            "".join(r["stamps"]), f"extent {e} written by host {g}: {r}"

    def verify(self, raw_path):
        self.layout.max_seq = dict(self.seq)
        result = self.vi.verify(raw_path, self.layout)
        assert result["mixed"] == 0 and result["corrupt"] == 0, result
        assert result["complete"] == len(self.written), result
        return result


def flat_raw(path, kind, workdir):
    if kind == "raw":
        return path
    raw = workdir / "flat.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(path), str(raw))
    return raw


# ---------------------------------------------------------------------------
# resize while in use

@pytest.mark.parametrize("kind", ["raw", "qcow2-metadata", "qcow2-full"])
def test_resize_during_io(kind, nfs, extlockd, lock_space, procs, workdir, binaries):
    """Two hosts write and read stamped 1 MiB extents; host 1 runs
    block_resize 16 -> 32 MiB while both have requests in flight."""
    binaries("qemu-img", "qemu-storage-daemon")
    path, child = make_image(nfs, kind)
    old_extents = list(range(12))                  # 1 MiB .. 13 MiB
    all_extents = list(range(28))                  # 1 MiB .. 29 MiB
    st = Stamped(len(all_extents))
    hosts = [start_host(procs, child, extlockd, lock_space, n, maint=n == 1)
             for n in (1, 2)]
    clients = {g: NbdClient(h.nbd_path, "disk") for g, h in zip((1, 2), hosts)}
    try:
        for _ in range(3):
            st.finish(st.send_round(clients, old_extents))
        # the resize while both hosts have requests in flight
        pending = st.send_round(clients, old_extents)
        hosts[0].qmp.execute("block_resize", args={"node-name": "xm", "size": NEW},
                             timeout=60)
        st.finish(pending)
        for _ in range(3):
            st.finish(st.send_round(clients, old_extents))
        # every node sees the new size
        assert node_size(hosts[0], "xm") == NEW
        for h in hosts:
            wait_until(lambda: node_size(h) == NEW, LEASE_MS / 1000 + 10,
                       what="the hosts to see the new size")
        m1, m2 = maint_info(hosts[0], "xm"), maint_info(hosts[1])
        assert m1["owned"] == 1 and m1["running"] is False, m1
        assert m2["reloads"] >= 1 and m2["generation"] != 0, (m1, m2)
        sp = space_status(extlockd, lock_space)
        assert sp["maintenance"]["generation"] == 1, sp
        assert ctl_maintenance(extlockd, lock_space) == {
            "lock-space": lock_space, "generation": 1,
            "size": sp["maintenance"]["size"]}
        for n in (1, 2):
            hosts[n - 1].qmp.execute("block-export-add", args={
                "type": "nbd", "id": "big", "node-name": "xl0", "name": "big",
                "writable": True})
    finally:
        for nb in clients.values():
            nb.close()
    big = {g: NbdClient(h.nbd_path, "big") for g, h in zip((1, 2), hosts)}
    try:
        # the new area: one host's write is the other's read
        st.cross_check(big[1], 1, big[2], 20)
        st.cross_check(big[2], 2, big[1], 26)
        for _ in range(4):
            st.finish(st.send_round(big, all_extents))
        for nb in big.values():
            err, _ = nb.wait(nb.send_flush(), timeout=60)
            assert err == 0
    finally:
        for nb in big.values():
            nb.close()
    assert not st.torn, f"{len(st.torn)} of {st.reads} reads torn: {st.torn[:3]}"
    # a third host opens the resized image: for qcow2 the allocation check
    # passes (the new clusters were preallocated), and it sees the new size
    third = start_host(procs, child, extlockd, lock_space, 3)
    assert node_size(third) == NEW
    for h in hosts + [third]:
        assert h.stop() == 0, h.stderr()
    if kind != "raw":
        check_clean(path)
    info = qemu_img("info", "--output=json", str(path))
    assert f'"virtual-size": {NEW}' in info, info
    st.verify(flat_raw(path, kind, workdir))
    path.unlink()


def test_resize_bad_arguments(nfs, extlockd, lock_space, procs, binaries):
    """Shrinking and an unaligned size fail with a clear error; nothing
    changes: same size, no maintenance counted, the image still works."""
    binaries("qemu-img", "qemu-storage-daemon")
    path, child = make_image(nfs, "qcow2-metadata")
    h = start_host(procs, child, extlockd, lock_space, 1, maint=True)
    with NbdClient(h.nbd_path, "disk") as nb:
        nb.write(MiB, b"\x5a" * CLUSTER)
    e = h.qmp.execute_error("block_resize", args={"node-name": "xm", "size": 8 * MiB})
    assert "cannot shrink the shared image" in e.desc and "only growing" in e.desc, e.desc
    e = h.qmp.execute_error("block_resize", args={"node-name": "xm", "size": OLD + 100})
    assert "multiple of 512" in e.desc, e.desc
    assert node_size(h) == OLD and node_size(h, "xm") == OLD
    assert maint_info(h, "xm")["owned"] == 0
    assert "maintenance" not in space_status(extlockd, lock_space)
    with NbdClient(h.nbd_path, "disk") as nb:
        assert nb.read(MiB, CLUSTER) == b"\x5a" * CLUSTER
    assert h.stop() == 0, h.stderr()
    check_clean(path)
    path.unlink()


# ---------------------------------------------------------------------------
# hosts that do not stop, or die

def test_resize_goes_on_after_killed_host(nfs, extlockd, lock_space, procs, binaries):
    """Host 2 is stopped (SIGSTOP) with its locks cached, so it cannot give
    them back; host 1's block_resize waits for it.  kill -9 of host 2: the
    resize completes once host 2's lease and the fence margin have passed,
    the image is consistent, and a new host sees the new size."""
    binaries("qemu-img", "qemu-storage-daemon")
    path, child = make_image(nfs, "qcow2-metadata")
    h1 = start_host(procs, child, extlockd, lock_space, 1, maint=True)
    h2 = start_host(procs, child, extlockd, lock_space, 2)
    for n, h in enumerate((h1, h2)):
        with NbdClient(h.nbd_path, "disk") as nb:
            nb.write((n + 1) * MiB, bytes([0x41 + n]) * MiB)
    h2.proc.send_signal(19)                     # SIGSTOP: holds its locks
    msg_id = qmp_send(h1, "block_resize", {"node-name": "xm", "size": NEW})
    wait_until(lambda: maintenance_waiting(extlockd, lock_space), 10,
               what="the maintenance to wait for host 2")
    assert ctl_maintenance(extlockd, lock_space) == {
        "lock-space": lock_space, "generation": 0, "state": "waiting",
        "client-id": "host-1-maint"}
    killed = time.monotonic()
    h2.kill()
    bound = (LEASE_MS + 1000) / 1000 + 15       # lease + default fence margin + slack
    reply = qmp_reply(h1, msg_id, bound)
    assert "error" not in reply, reply
    assert time.monotonic() - killed < bound
    assert node_size(h1, "xm") == NEW
    wait_until(lambda: node_size(h1) == NEW, LEASE_MS / 1000 + 10,
               what="host 1's disk node to see the new size")
    with NbdClient(h1.nbd_path, "disk") as nb:
        assert nb.read(MiB, MiB) == b"\x41" * MiB
        assert nb.read(2 * MiB, MiB) == b"\x42" * MiB
    h3 = start_host(procs, child, extlockd, lock_space, 3)
    assert node_size(h3) == NEW
    for h in (h1, h3):
        assert h.stop() == 0, h.stderr()
    check_clean(path)
    path.unlink()


def test_stuck_host_expired(nfs, extlockd, lock_space, procs, binaries):
    """A client that keeps its lock while a maintenance waits - alive, its
    lease renewed - is expired after its lease: the coordinator tells it
    (session-expired) and the resize goes on after its lease and fence
    margin.  Without the maintenance deadline the resize would wait for as
    long as the client lives."""
    binaries("qemu-img", "qemu-storage-daemon")
    path, child = make_image(nfs, "raw")
    h1 = start_host(procs, child, extlockd, lock_space, 1, maint=True)
    stuck = CoordinatorClient(extlockd.address)
    stuck.hello("stuck", lock_space, lease_ms=1000)
    stuck.lock(0, 4096, mode="shared")
    msg_id = qmp_send(h1, "block_resize", {"node-name": "xm", "size": NEW})
    wait_until(lambda: maintenance_waiting(extlockd, lock_space), 10,
               what="the maintenance to wait for the stuck client")
    start = time.monotonic()
    expired = False
    try:
        # renew (bounded), as a live host does, until the coordinator gives up
        next_renew = 0.0
        while time.monotonic() - start < 20 and not expired:
            if time.monotonic() >= next_renew:
                next_renew = time.monotonic() + 0.2
                try:
                    stuck.request({"type": "renew"})
                except OSError:
                    pass
            try:
                msg = stuck._recv(0.2)
            except TimeoutError:
                continue
            except (ConnectionError, OSError):
                break
            expired = msg.get("type") == "session-expired"
        assert expired, "the stuck client was not expired"
        elapsed = time.monotonic() - start
        assert elapsed < 1.0 + 10, elapsed
        reply = qmp_reply(h1, msg_id, (1000 + 1000) / 1000 + 15)
        assert "error" not in reply, reply
    finally:
        stuck.close()
    assert node_size(h1, "xm") == NEW
    assert "while a maintenance waited" in extlockd.stderr()
    assert h1.stop() == 0, h1.stderr()
    path.unlink()


def test_owner_killed_holding_maintenance(nfs, extlockd, lock_space, procs, binaries):
    """A maintenance owner that dies holding the lock (a protocol client
    here, so that it holds it for sure): host 2's request waits until the
    owner's lease and fence margin have passed, then host 2 rereads the
    metadata (a new maintenance count) and its data is intact."""
    binaries("qemu-img", "qemu-storage-daemon")
    path, child = make_image(nfs, "qcow2-metadata")
    h2 = start_host(procs, child, extlockd, lock_space, 2)
    with NbdClient(h2.nbd_path, "disk") as nb:
        nb.write(3 * MiB, b"\x33" * MiB)
    gen_before = maint_info(h2)["generation"]
    owner = CoordinatorClient(extlockd.address)
    owner.hello("owner", lock_space, lease_ms=1000)
    owner.lock(0, MAINT_LENGTH, mode="exclusive", timeout=30)   # host 2 gave back
    nb = NbdClient(h2.nbd_path, "disk")
    try:
        h = nb.send_write(4 * MiB, b"\x44" * MiB)
        wait_until(lambda: any(w["client-id"] == "host-2" for w in
                               space_status(extlockd, lock_space)["waiting"]), 10,
                   what="host 2's write to wait behind the maintenance")
        owner.sock.close()                      # dies: no unlock, no bye
        err, _ = nb.wait(h, timeout=(1000 + 1000) / 1000 + 15)
        assert err == 0
        assert nb.read(3 * MiB, MiB) == b"\x33" * MiB
        assert nb.read(4 * MiB, MiB) == b"\x44" * MiB
    finally:
        nb.close()
    m = maint_info(h2)
    assert m["generation"] != gen_before and m["reloads"] == 1, m
    assert h2.stop() == 0, h2.stderr()
    check_clean(path)
    path.unlink()


def test_owner_killed_waiting_for_maintenance(nfs, extlockd, lock_space, procs, binaries):
    """The QEMU owner killed -9 while its block_resize waits for the
    maintenance lock (a protocol client holds a lock, within its lease),
    with host 2's write queued behind it: once the holder lets go, host 2's
    write completes within host 1's lease and fence margin, no maintenance
    is counted, nothing changed (size, data, qemu-img check)."""
    binaries("qemu-img", "qemu-storage-daemon")
    path, child = make_image(nfs, "qcow2-metadata")
    h1 = start_host(procs, child, extlockd, lock_space, 1, maint=True)
    h2 = start_host(procs, child, extlockd, lock_space, 2)
    with NbdClient(h2.nbd_path, "disk") as nb:
        nb.write(3 * MiB, b"\x33" * MiB)
    holder = CoordinatorClient(extlockd.address)
    holder.hello("holder", lock_space, lease_ms=60000)
    lock = holder.lock(0, 4096, mode="shared")
    qmp_send(h1, "block_resize", {"node-name": "xm", "size": NEW})
    wait_until(lambda: maintenance_waiting(extlockd, lock_space), 10,
               what="the maintenance to wait for the holder")
    nb = NbdClient(h2.nbd_path, "disk")
    try:
        h = nb.send_write(4 * MiB, b"\x44" * MiB)
        wait_until(lambda: any(w["client-id"] == "host-2" for w in
                               space_status(extlockd, lock_space)["waiting"]), 10,
                   what="host 2's write to wait behind the maintenance")
        h1.kill()
        holder.unlock(lock["lock"])
        holder.close()
        err, _ = nb.wait(h, timeout=(LEASE_MS + 1000) / 1000 + 15)
        assert err == 0
        assert nb.read(3 * MiB, MiB) == b"\x33" * MiB
        assert nb.read(4 * MiB, MiB) == b"\x44" * MiB
    finally:
        nb.close()
    assert "maintenance" not in space_status(extlockd, lock_space)
    assert node_size(h2) == OLD and maint_info(h2)["reloads"] == 0
    assert h2.stop() == 0, h2.stderr()
    check_clean(path)
    info = qemu_img("info", "--output=json", str(path))
    assert f'"virtual-size": {OLD}' in info, info
    path.unlink()


# ---------------------------------------------------------------------------
# internal snapshots as a cut; what is refused

def node_snapshots(qsd, node="xl0"):
    for n in qsd.qmp.execute("query-named-block-nodes"):
        if n["node-name"] == node:
            return [s["name"] for s in n["image"].get("snapshots", [])]
    raise AssertionError(f"no node {node}")


def test_internal_snapshot_during_io(nfs, extlockd, lock_space, procs, workdir, binaries):
    """Two hosts write and read stamped 1 MiB extents; host 1 takes an
    internal snapshot (blockdev-snapshot-internal-sync on its extlock node)
    while both have requests in flight.  Every host sees the snapshot, the
    hosts go on writing in place (the image was copied out of the snapshot:
    a third host's allocation check accepts it), the snapshot holds every
    extent whole and no write made after the snapshot returned (a cut),
    qemu-img check is clean; deleting the snapshot through extlock is seen
    by every host too."""
    binaries("qemu-img", "qemu-storage-daemon")
    path, child = make_image(nfs, "qcow2-metadata")
    extents = list(range(12))
    st = Stamped(len(extents))
    hosts = [start_host(procs, child, extlockd, lock_space, n, maint=n == 1)
             for n in (1, 2)]
    clients = {g: NbdClient(h.nbd_path, "disk") for g, h in zip((1, 2), hosts)}
    try:
        for _ in range(3):
            st.finish(st.send_round(clients, extents))
        written_before = set(st.written)
        pending = st.send_round(clients, extents)
        at_snapshot = dict(st.seq)
        # QMP's transaction drains every node of the host first: the NBD
        # replies must be read meanwhile
        msg_id = qmp_send(hosts[0], "blockdev-snapshot-internal-sync",
                          {"device": "xm", "name": "cut1"})
        st.finish(pending)
        reply = qmp_reply(hosts[0], msg_id, 120)
        assert "error" not in reply, reply
        for _ in range(4):
            st.finish(st.send_round(clients, extents))
        assert node_snapshots(hosts[0], "xm") == ["cut1"]
        for h in hosts:
            wait_until(lambda: node_snapshots(h) == ["cut1"], LEASE_MS / 1000 + 10,
                       what="the hosts to see the snapshot")
        m1, m2 = maint_info(hosts[0], "xm"), maint_info(hosts[1])
        assert m1["owned"] == 1 and m1["running"] is False, m1
        assert m2["reloads"] >= 1, m2
        assert space_status(extlockd, lock_space)["maintenance"]["generation"] == 1
        # a new host: nothing shared with the snapshot, so it is accepted
        third = start_host(procs, child, extlockd, lock_space, 3)
        assert node_snapshots(third) == ["cut1"]
        with NbdClient(third.nbd_path, "disk") as nb:
            st.cross_check(nb, 1, clients[2], 5)
        for _ in range(2):
            st.finish(st.send_round(clients, extents))
    finally:
        for nb in clients.values():
            nb.close()
    assert not st.torn, f"{len(st.torn)} of {st.reads} reads torn: {st.torn[:3]}"
    assert third.stop() == 0, third.stderr()
    # the snapshot is a cut: every extent whole, every one written before
    # it there, no write made after it returned
    snap = workdir / "cut.raw"
    qemu_img("convert", "-U", "-f", "qcow2", "-O", "raw", "-l", "snapshot.name=cut1",
             str(path), str(snap))
    st.layout.max_seq = at_snapshot
    r = st.vi.verify(snap, st.layout)
    assert r["mixed"] == 0 and r["corrupt"] == 0, r
    assert r["complete"] >= len(written_before), (r, len(written_before))
    # deleting it is a maintenance too, seen by the other host
    hosts[0].qmp.execute("blockdev-snapshot-delete-internal-sync",
                         args={"device": "xm", "name": "cut1"}, timeout=120)
    with NbdClient(hosts[1].nbd_path, "disk") as nb:
        nb.read(MiB, MiB)
    wait_until(lambda: node_snapshots(hosts[1]) == [], LEASE_MS / 1000 + 10,
               what="host 2 to see the snapshot deleted")
    assert space_status(extlockd, lock_space)["maintenance"]["generation"] == 2
    for h in hosts:
        assert h.stop() == 0, h.stderr()
    check_clean(path)
    assert "cut1" not in qemu_img("snapshot", "-l", str(path))
    st.verify(flat_raw(path, "qcow2-metadata", workdir))
    path.unlink()


def test_snapshot_refusals(nfs, extlockd, lock_space, procs, workdir, binaries):
    """What a shared node refuses, with a clear error, changing nothing:
    external snapshots (blockdev-snapshot-sync, and blockdev-add of an
    overlay + blockdev-snapshot), persistent dirty bitmaps; an image whose
    clusters are shared with a snapshot taken outside extlock (qemu-img
    snapshot -c) is refused at open."""
    binaries("qemu-img", "qemu-storage-daemon")
    path, child = make_image(nfs, "qcow2-metadata")
    h = start_host(procs, child, extlockd, lock_space, 1, maint=True)
    with NbdClient(h.nbd_path, "disk") as nb:
        nb.write(MiB, b"\x5a" * CLUSTER)
    overlay = workdir / "overlay.qcow2"
    e = h.qmp.execute_error("blockdev-snapshot-sync", args={
        "node-name": "xm", "snapshot-file": str(overlay), "snapshot-node-name": "ov0",
        "format": "qcow2"})
    assert "is a shared image: an external snapshot" in e.desc, e.desc
    overlay = workdir / "overlay2.qcow2"
    create_qcow2(overlay, OLD)
    h.qmp.execute("blockdev-add", args={
        "driver": "qcow2", "node-name": "ov", "backing": None,
        "file": {"driver": "file", "filename": str(overlay)}})
    e = h.qmp.execute_error("blockdev-snapshot", args={"node": "xm", "overlay": "ov"})
    assert "is a shared image: an external snapshot" in e.desc, e.desc
    # nor between the extlock node and its qcow2 node
    below = [n["node-name"] for n in h.qmp.execute("query-named-block-nodes")
             if n["drv"] == "qcow2" and n["node-name"] != "ov"]
    assert len(below) == 2, below
    e = h.qmp.execute_error("blockdev-snapshot", args={"node": below[0], "overlay": "ov"})
    assert "is a shared image: an external snapshot" in e.desc, e.desc
    h.qmp.execute("blockdev-del", args={"node-name": "ov"})
    e = h.qmp.execute_error("block-dirty-bitmap-add", args={
        "node": "xm", "name": "b0", "persistent": True})
    assert "persistent dirty bitmaps" in e.desc and "persistent=false" in e.desc, e.desc
    # a bitmap that stays in memory is fine
    h.qmp.execute("block-dirty-bitmap-add", args={"node": "xm", "name": "b1"})
    assert maint_info(h, "xm")["owned"] == 0
    assert "maintenance" not in space_status(extlockd, lock_space)
    with NbdClient(h.nbd_path, "disk") as nb:
        assert nb.read(MiB, CLUSTER) == b"\x5a" * CLUSTER
    assert h.stop() == 0, h.stderr()
    check_clean(path)
    assert qemu_img("snapshot", "-l", str(path)).strip() == ""
    # a snapshot taken behind extlock's back shares every cluster: refused
    qemu_img("snapshot", "-c", "outside", str(path))
    r = hp.run_qemu_io(extlock_node(child, extlockd.coordinator(), lock_space),
                       ["read 0 512"])
    assert r.returncode != 0 and "has 1 internal snapshot(s) that share the cluster " \
        "at guest offset 0" in r.stdout + r.stderr, r.stdout + r.stderr
    path.unlink()


# ---------------------------------------------------------------------------
# the maintenance count across a coordinator restart

def protocol_maintenance(extlockd, lock_space, size, finish=True):
    """A maintenance by a protocol client that changes nothing; with
    `finish`, announces `size` and leaves; else returns the client, which
    holds the maintenance lock."""
    owner = CoordinatorClient(extlockd.address)
    owner.hello(f"owner-{uuid.uuid4().hex[:6]}", lock_space, lease_ms=1000)
    g = owner.lock(0, MAINT_LENGTH, mode="exclusive", timeout=30)
    if not finish:
        return owner
    owner.call({"type": "unlock", "lock": g["lock"], "maint-size": size})
    owner.bye()
    owner.close()
    return None


def fresh_grant_io(extlockd, lock_space, h, offset, byte):
    """A write and read on host `h` under a lock the restarted coordinator
    grants: a protocol client takes (and gives back) the extent first, so
    the host's cached lock on it is revoked."""
    with CoordinatorClient(extlockd.address) as rev:
        # its lease outlasts a restart's grace period (lease + fence margin)
        rev.hello(f"rev-{uuid.uuid4().hex[:6]}", lock_space, lease_ms=30000)
        g = rev.lock(0, NEW, mode="exclusive", timeout=30)
        rev.unlock(g["lock"])
        rev.bye()
    with NbdClient(h.nbd_path, "disk") as nb:
        nb.write(offset, bytes([byte]) * MiB)
        assert nb.read(offset, MiB) == bytes([byte]) * MiB


def test_maint_count_survives_restart(nfs, extlockd, lock_space, procs, binaries):
    """The maintenance count is in extlockd's state file: after a restart
    the coordinator sends the same maint-gen, so a host that has reread
    once does not reread again (it did before the count was kept).  A
    coordinator killed while a maintenance lock is held counts that
    maintenance when it starts again ("pending" in the state file), in its
    new epoch: the host rereads."""
    binaries("qemu-img", "qemu-storage-daemon")
    path, child = make_image(nfs, "qcow2-metadata")
    h = start_host(procs, child, extlockd, lock_space, 1)
    with NbdClient(h.nbd_path, "disk") as nb:
        nb.write(MiB, b"\x11" * MiB)
    size = path.stat().st_size
    protocol_maintenance(extlockd, lock_space, size)
    fresh_grant_io(extlockd, lock_space, h, 2 * MiB, 0x22)
    m = maint_info(h)
    assert m["reloads"] == 1 and m["generation"] != 0, m
    gen = m["generation"]
    # the end of a maintenance is written to the state file in the
    # background (lockspace_maint_done: server_save_state_async), so the
    # file may still be the one written at the grant: wait, bounded
    expect = [{"lock-space": lock_space, "count": 1, "epoch": gen >> 32,
               "size": size}]
    saved = wait_until(
        lambda: (lambda v: v if v == expect else None)(
            json.loads(extlockd.state_file.read_text()).get("maintenance")),
        timeout=10, what="the finished maintenance in the state file")
    assert saved == expect, saved

    extlockd.restart()
    fresh_grant_io(extlockd, lock_space, h, 3 * MiB, 0x33)
    m = maint_info(h)
    assert m["generation"] == gen and m["reloads"] == 1, (gen, m)
    assert space_status(extlockd, lock_space)["maintenance"]["generation"] == 1

    # killed while a maintenance lock is held: counted at the next start
    owner = protocol_maintenance(extlockd, lock_space, size, finish=False)
    saved = json.loads(extlockd.state_file.read_text())["maintenance"]
    assert saved[0]["pending"] is True, saved
    extlockd.kill()
    owner.close()
    extlockd.start()
    assert "a maintenance may have been running" in extlockd.stderr()
    fresh_grant_io(extlockd, lock_space, h, 4 * MiB, 0x44)
    m = maint_info(h)
    assert m["generation"] not in (0, gen) and m["reloads"] == 2, (gen, m)
    assert space_status(extlockd, lock_space)["maintenance"]["generation"] == 2
    with NbdClient(h.nbd_path, "disk") as nb:
        for n in (1, 2, 3, 4):
            assert nb.read(n * MiB, MiB) == bytes([0x11 * n]) * MiB
    assert h.stop() == 0, h.stderr()
    check_clean(path)
    path.unlink()


def test_maint_count_survives_unused_lock_space(extlockd, lock_space):
    """The maintenance count outlives the lock-space in memory: when the
    last session of a lock-space goes, extlockd frees it, and the one
    created for the next hello must go on from the same count.  Before,
    it started from 0 again in the same epoch: the first maintenance after
    that got the maint-gen of the first one before, so a host whose node
    stayed open through both (its session lapsed meanwhile) would have
    taken the new maintenance for the one it had reread after."""
    protocol_maintenance(extlockd, lock_space, OLD)
    # the owner was the lock-space's only session: it is freed
    wait_until(lambda: space_status(extlockd, lock_space) is None,
               timeout=10, what="the unused lock-space to be freed")

    def grant_gen():
        with CoordinatorClient(extlockd.address) as c:
            c.hello(f"probe-{uuid.uuid4().hex[:6]}", lock_space,
                    lease_ms=LEASE_MS)
            g = c.lock(0, MiB, mode="shared", timeout=30)
            st = space_status(extlockd, lock_space)
            c.unlock(g["lock"])
            c.bye()
        return g, st
    g, st = grant_gen()
    gen1 = g.get("maint-gen")
    assert gen1 and g.get("maint-size") == OLD, \
        "a lock-space created again forgot its maintenance count: %r" % g
    assert st["maintenance"]["generation"] == 1, st
    wait_until(lambda: space_status(extlockd, lock_space) is None,
               timeout=10, what="the unused lock-space to be freed again")
    # the next maintenance is one no host has seen
    protocol_maintenance(extlockd, lock_space, NEW)
    g, st = grant_gen()
    assert g.get("maint-gen") not in (None, gen1), (gen1, g)
    assert g.get("maint-size") == NEW, g
    assert st["maintenance"]["generation"] == 2, st


def generation_seen_by(client, lock_space):
    for sp in client.status().get("lock-spaces", []):
        if sp.get("name") == lock_space:
            return sp.get("maintenance", {}).get("generation", 0)
    return None


def test_downgraded_maintenance_is_counted(extlockd, lock_space):
    """A maintenance lock downgraded to shared ends the maintenance: the
    shared requests it lets in (a reader of the metadata the owner may
    have changed) must get a maint-gen they have not seen.  Before, a
    downgrade was no release of a maintenance lock: the readers were
    granted with no maint-gen, and the shared lock left behind was no
    maintenance lock any more, so its unlock counted nothing either."""
    owner = CoordinatorClient(extlockd.address)
    owner.hello(f"owner-{uuid.uuid4().hex[:6]}", lock_space, lease_ms=LEASE_MS)
    g = owner.lock(0, MAINT_LENGTH, mode="exclusive", timeout=10)
    reader = CoordinatorClient(extlockd.address)
    reader.hello(f"reader-{uuid.uuid4().hex[:6]}", lock_space,
                 lease_ms=LEASE_MS)
    rid = reader.request({"type": "lock", "offset": 0, "length": MiB,
                          "mode": "shared", "wait": True})
    w = reader.reply(rid, timeout=10, accept_waiting=True)
    assert w["type"] == "waiting", w
    owner.call({"type": "downgrade", "lock": g["lock"]})
    granted = reader.reply(rid, timeout=10)
    assert granted["type"] == "granted", granted
    assert granted.get("maint-gen"), \
        "a reader let in by a downgraded maintenance lock was not told " \
        "of the maintenance: %r" % granted
    reader.unlock(granted["lock"])
    owner.unlock(g["lock"])
    assert generation_seen_by(reader, lock_space) == 1
    reader.bye()
    owner.bye()
    reader.close()
    owner.close()


def maint_entry(d, lock_space):
    state = json.loads(d.state_file.read_text())
    for e in state.get("maintenance", []):
        if e["lock-space"] == lock_space:
            return e
    return None


def test_reclaimed_maintenance_lock_stays_pending(extlockd, lock_space):
    """A maintenance lock reclaimed after a restart is a maintenance that
    goes on: the state file must say "pending" again, as it did before
    the grant.  Else a second restart, after which its owner does not
    come back, releases the lock without counting what the owner changed
    since the first: the maint-gen stays the one the first restart
    counted, which the hosts have seen (and reread for) already."""
    d = extlockd
    cid = f"owner-{uuid.uuid4().hex[:6]}"
    owner = CoordinatorClient(d.address)
    w = owner.hello(cid, lock_space, lease_ms=LEASE_MS)
    g = owner.lock(0, MAINT_LENGTH, mode="exclusive", timeout=10)
    assert maint_entry(d, lock_space).get("pending") is True
    owner.close()
    d.kill()
    d.start()
    e1 = maint_entry(d, lock_space)
    assert e1 and e1["count"] == 1 and not e1.get("pending"), e1
    with CoordinatorClient(d.address) as owner:
        w2 = owner.call({"type": "hello", "version": 2, "client-id": cid,
                         "lock-space": lock_space, "lease-ms": LEASE_MS,
                         "session": w["session"],
                         "resume-secret": w["resume-secret"]})
        assert w2.get("reclaim") is True, w2
        owner.call({"type": "reclaim", "offset": 0, "length": MAINT_LENGTH,
                    "mode": "exclusive", "token": g["token"]})
        owner.call({"type": "reclaim-done"})
        # the reclaim is applied; the state it leads to is written
        owner.status()
        wait_until(lambda: maint_entry(d, lock_space).get("pending") is True,
                   timeout=5,
                   what="the reclaimed maintenance to be written as pending")
        e2 = maint_entry(d, lock_space)
        assert e2["count"] == 1, e2
        owner.bye()


def test_qemu_owner_killed_mid_truncate(nfs, extlockd, lock_space, procs, binaries):
    """A QEMU owner (qemu-io, truncate through its extlock node) held by a
    blkdebug breakpoint on qcow2's L2 table writes in the middle of its
    preallocating truncate (after it allocated clusters) and killed -9
    there.  Host 2's write queued behind the maintenance waits at least
    the fence margin after the kill (the owner's lock is released only
    after its lease and fence margin), then host 2 rereads the metadata
    (the dead owner's maintenance is counted) before it uses it; its data
    is intact and qemu-img check finds no error (leaked clusters allowed:
    the allocation was cut short)."""
    binaries("qemu-img", "qemu-io", "qemu-storage-daemon")
    fence_margin_s = 1.0                        # extlockd's default
    path, child = make_image(nfs, "qcow2-metadata")
    h2 = start_host(procs, child, extlockd, lock_space, 2)
    with NbdClient(h2.nbd_path, "disk") as nb:
        nb.write(3 * MiB, b"\x33" * MiB)
    gen_before = maint_info(h2)["generation"]
    owner_child = {"driver": "qcow2",
                   "file": {"driver": "blkdebug", "image": hp.nfs_child(path)}}
    owner = procs.qemu_io(extlock_node(owner_child, extlockd.coordinator(), lock_space,
                                       node_name="xo", client_id="owner",
                                       lease_time=1000), name="owner",
                         extra_args=["--trace", "qcow2_cache_entry_flush"])
    assert owner.cmd("break l2_update hold").strip() == ""
    # truncate does not return while held: no prompt to wait for.  qcow2
    # traces its L2 table writes, and the breakpoint holds one (blkdebug's
    # own message goes to a buffered stdout); the test only needs the
    # owner to be inside its truncate, holding the maintenance lock
    owner.proc.stdin.write(f"truncate {NEW}\n".encode())
    owner.proc.stdin.flush()
    wait_until(lambda: "is_l2_cache 1" in owner.stderr(), 30,
               what="the owner's truncate to reach its L2 table write")
    held = space_status(extlockd, lock_space)["held"]
    assert any(lk["client-id"] == "owner" and lk["length"] == MAINT_LENGTH
               for lk in held), held
    nb = NbdClient(h2.nbd_path, "disk")
    try:
        h = nb.send_write(4 * MiB, b"\x44" * MiB)
        wait_until(lambda: any(w["client-id"] == "host-2" for w in
                               space_status(extlockd, lock_space)["waiting"]), 10,
                   what="host 2's write to wait behind the maintenance")
        killed = time.monotonic()
        owner.kill()
        err, _ = nb.wait(h, timeout=(1000 + 1000) / 1000 + 15)
        waited = time.monotonic() - killed
        assert err == 0
        assert waited >= fence_margin_s - 0.05, waited
        assert nb.read(3 * MiB, MiB) == b"\x33" * MiB
        assert nb.read(4 * MiB, MiB) == b"\x44" * MiB
    finally:
        nb.close()
    m = maint_info(h2)
    assert m["generation"] != gen_before and m["reloads"] == 1, m
    assert h2.stop() == 0, h2.stderr()
    r = hp.run_qemu_img("check", "-f", "qcow2", str(path))
    assert r.returncode in (0, 3) and "ERROR" not in r.stdout, r.stdout + r.stderr
    path.unlink()


def test_stuck_maintenance_io_is_fenced(nfs, procs, lock_space, binaries):
    """The owner's truncate is I/O in flight for on-stuck-io: a QEMU owner
    (qemu-io, on-stuck-io=exit) whose truncate the storage holds (a
    blkdebug breakpoint on its L2 table writes) loses its coordinator
    (the link cut right after a renewal).  It exits before the coordinator
    gives the maintenance lock's range to anybody else (after its lease
    and fence margin), so the held metadata write can never land after
    another host was let in."""
    binaries("qemu-img", "qemu-io", "extlockd")
    d = start_coordinator(procs, fence_margin_ms=1000)
    link = TcpPartition(d.tcp_port)
    try:
        path, child = make_image(nfs, "qcow2-metadata")
        owner_child = {"driver": "qcow2",
                       "file": {"driver": "blkdebug", "image": hp.nfs_child(path)}}
        owner = procs.qemu_io(extlock_node(owner_child, link.coordinator(), lock_space,
                                           node_name="xo", client_id="owner",
                                           lease_time=1000, on_stuck_io="exit"),
                              name="owner", extra_args=["--trace", "qcow2_cache_entry_flush"])
        assert owner.cmd("break l2_update hold").strip() == ""
        owner.proc.stdin.write(f"truncate {NEW}\n".encode())
        owner.proc.stdin.flush()
        wait_until(lambda: "is_l2_cache 1" in owner.stderr(), 30,
                   what="the owner's truncate to reach its L2 table write")
        release = release_after_fresh_renewal(d.address, "owner", 1000)
        link.cut()
        with CoordinatorClient(d.address, timeout=(1000 + 1000) / 1000 + 15) as b:
            b.hello("host-b", lock_space, lease_ms=60000)
            g = b.lock(0, MiB, "exclusive")     # after the owner's expiry
            t_grant = time.monotonic()
            owner_gone = not owner.alive()
            assert t_grant >= release, f"granted {release - t_grant:.3f} s early"
            assert owner_gone, "the owner still ran when host-b was let in:\n" + \
                owner.stderr()
            assert "on-stuck-io=exit" in owner.stderr(), owner.stderr()
            b.unlock(g["lock"])
            b.bye()
    finally:
        link.close()
    check_coordinator(d)
    path.unlink()


def test_maintenance_in_iothread(nfs, extlockd, lock_space, procs, workdir, binaries):
    """Maintenances with the nodes in an iothread (x-blockdev-set-iothread
    io0): host 1's node xm, in the iothread, runs block_resize and then an
    internal snapshot while both hosts' exported nodes (main loop) have
    stamped requests in flight; host 2's second node xr, idle in its
    iothread, rereads after each (a renewal kicks the reread there).  No
    torn read, every node sees the new size and the snapshot, the
    snapshot and the image verify (mixed 0, corrupt 0), qemu-img check
    clean."""
    binaries("qemu-img", "qemu-storage-daemon")
    path, child = make_image(nfs, "qcow2-metadata")
    extents = list(range(12))
    st = Stamped(len(extents))
    hosts = []
    for n, extra in ((1, "xm"), (2, "xr")):
        nodes = [extlock_node(child, extlockd.coordinator(), lock_space, node_name=name,
                              client_id=f"host-{n}-{name}", lease_time=LEASE_MS)
                 for name in ("xl0", extra)]
        h = procs.storage_daemon(name=f"io{n}-{uuid.uuid4().hex[:4]}", blockdevs=nodes,
                                 exports=[("disk", "xl0", True)],
                                 objects=["iothread,id=io0"])
        if h.qmp.execute("query-version")["qemu"]["major"] < 10:
            pytest.skip("QEMU 7.2: after block_resize of a node in an iothread, "
                        "qemu-storage-daemon aborts at exit (qemu_mutex_destroy: an "
                        "AioContext lock left held); open, docs/qcow2.rst")
        h.qmp.execute("x-blockdev-set-iothread", args={"node-name": extra,
                                                        "iothread": "io0"})
        hosts.append(h)
    clients = {g: NbdClient(h.nbd_path, "disk") for g, h in zip((1, 2), hosts)}
    try:
        for _ in range(2):
            st.finish(st.send_round(clients, extents))
        pending = st.send_round(clients, extents)
        hosts[0].qmp.execute("block_resize", args={"node-name": "xm", "size": NEW},
                             timeout=60)
        st.finish(pending)
        wait_until(lambda: node_size(hosts[1], "xr") == NEW, LEASE_MS / 1000 + 10,
                   what="host 2's idle node in the iothread to see the new size")
        pending = st.send_round(clients, extents)
        at_snapshot = dict(st.seq)
        msg_id = qmp_send(hosts[0], "blockdev-snapshot-internal-sync",
                          {"device": "xm", "name": "io-cut"})
        st.finish(pending)
        reply = qmp_reply(hosts[0], msg_id, 120)
        assert "error" not in reply, reply
        for _ in range(2):
            st.finish(st.send_round(clients, extents))
        wait_until(lambda: node_snapshots(hosts[1], "xr") == ["io-cut"],
                   LEASE_MS / 1000 + 10, what="host 2's xr to see the snapshot")
        for h in hosts:
            wait_until(lambda: node_size(h) == NEW, LEASE_MS / 1000 + 10,
                       what="the exported nodes to see the new size")
        assert maint_info(hosts[1], "xr")["reloads"] >= 2
        assert maint_info(hosts[0], "xm")["owned"] == 2
    finally:
        for nb in clients.values():
            nb.close()
    assert not st.torn, f"{len(st.torn)} of {st.reads} reads torn: {st.torn[:3]}"
    for h in hosts:
        assert h.stop() == 0, h.stderr()
    check_clean(path)
    snap = workdir / "io-cut.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", "-l", "snapshot.name=io-cut",
             str(path), str(snap))
    st.layout.max_seq = at_snapshot
    r = st.vi.verify(snap, st.layout)
    assert r["mixed"] == 0 and r["corrupt"] == 0, r
    st.verify(flat_raw(path, "qcow2-metadata", workdir))
    path.unlink()


class TmpfsStateExtlockd(hp.Extlockd):
    """An extlockd whose state file is on a tiny tmpfs of its own (its own
    mount namespace): the test fills that file system from outside
    (/proc/PID/root) to make the coordinator's state writes fail."""

    def __init__(self, workdir, **kwargs):
        super().__init__(workdir, **kwargs)
        self.state_dir = self.workdir / "state"
        self.state_dir.mkdir(exist_ok=True)
        self.state_file = self.state_dir / "extlockd.state"

    def argv(self):
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f"mount -t tmpfs -o size=64k extlockd-state {self.state_dir}"
                ' && exec "$@"', "sh"] + super().argv()

    def in_ns(self, path):
        """`path` (in the state directory) as the daemon sees it."""
        return Path(f"/proc/{self.proc.pid}/root") / Path(path).relative_to("/")

    def fill(self):
        """Take every free block of the tmpfs."""
        with open(self.in_ns(self.state_dir / "fill"), "wb",
                  buffering=0) as f:
            try:
                for _ in range(1024):           # 64 KiB at most
                    f.write(b"\xff" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                return
        raise AssertionError("the state tmpfs did not fill up")

    def unfill(self):
        self.in_ns(self.state_dir / "fill").unlink()

    def saved(self):
        return json.loads(self.in_ns(self.state_file).read_text())


def test_maintenance_not_granted_unless_recorded(procs, lock_space, binaries):
    """A maintenance lock that waited is granted only if the state file
    records it first (the count a restart must take up): when the state
    file system is full at the moment of the grant, the owner gets an
    error instead of the grant, the lock is not held (another request gets
    the range), the maintenance count and the state file are unchanged;
    once there is room again, the maintenance is granted and counted.
    Before the fix the coordinator logged a warning and granted it."""
    daemon, holder, held, owner, rid = _unrecorded_maintenance_setup(
        procs, lock_space, binaries, fill=False)
    before = daemon.saved()
    gen_before = space_status(daemon, lock_space).get("maintenance")

    daemon.fill()
    holder.unlock(held["lock"])
    with pytest.raises(CoordinatorError) as e:
        owner.reply(rid, timeout=10)
    assert "cannot record the maintenance" in str(e.value), e.value
    # not held: the range is free for anyone; nothing counted or saved
    other = holder.lock(0, 4096, wait=False)
    holder.unlock(other["lock"])
    sp = space_status(daemon, lock_space)
    assert sp.get("maintenance") == gen_before, sp
    assert daemon.saved() == before
    assert "not granted" in daemon.stderr()

    daemon.unfill()
    g = owner.lock(0, MAINT_LENGTH, timeout=10)
    assert daemon.saved()["maintenance"][0]["pending"] is True
    owner.call({"type": "unlock", "lock": g["lock"], "maint-size": OLD})
    assert space_status(daemon, lock_space)["maintenance"]["generation"] == 1
    owner.close()
    holder.close()
    assert daemon.alive(), daemon.stderr()
    assert daemon.stop() == 0, daemon.stderr()


def _unrecorded_maintenance_setup(procs, lock_space, binaries, fill=True,
                                  **kwargs):
    """A coordinator whose state tmpfs is full (unless not @fill) when a
    waiting maintenance request's turn comes: (daemon, holder, its lock,
    owner, request id)."""
    binaries("extlockd")
    daemon = procs.add(TmpfsStateExtlockd(procs.workdir / "extlockd-tmpfs",
                                          **kwargs))
    daemon.start()
    holder = CoordinatorClient(daemon.address)
    holder.hello("holder", lock_space, lease_ms=30000)
    held = holder.lock(0, 4096)
    owner = CoordinatorClient(daemon.address)
    owner.hello("maint-owner", lock_space, lease_ms=30000)
    rid = owner.request({"type": "lock", "offset": 0, "length": MAINT_LENGTH,
                         "mode": "exclusive", "wait": True})
    assert owner.reply(rid, timeout=10, accept_waiting=True)["type"] == \
        "waiting"
    if fill:
        daemon.fill()
    return daemon, holder, held, owner, rid


def test_unrecorded_maintenance_undone_before_next_request(procs, lock_space,
                                                           binaries):
    """A waited maintenance grant that the state file cannot record is
    undone before the coordinator serves the next request: a status sent
    in the same write as the unlock that let the table grant it shows the
    range free.  Before, it was undone from a default-idle source, which
    busy sockets starve: meanwhile the table held an exclusive lock over
    the whole space."""
    daemon, holder, held, owner, rid = _unrecorded_maintenance_setup(
        procs, lock_space, binaries)
    # one write: the unlock and a status, served in one read
    holder.sock.sendall(
        json.dumps({"type": "unlock", "lock": held["lock"],
                    "id": 1001}).encode() + b"\n" +
        json.dumps({"type": "status", "id": 1002}).encode() + b"\n")
    assert holder.reply(1001)["type"] == "unlocked"
    st = holder.reply(1002)["status"]
    sp = [s for s in st["lock-spaces"] if s["name"] == lock_space]
    held_now = sp[0]["held"] if sp else []
    assert not [h for h in held_now if h["length"] == MAINT_LENGTH], held_now
    with pytest.raises(CoordinatorError) as e:
        owner.reply(rid, timeout=10)
    assert "cannot record the maintenance" in str(e.value), e.value
    owner.close()
    holder.close()
    assert daemon.alive(), daemon.stderr()
    assert daemon.stop() == 0, daemon.stderr()


def test_unrecorded_maintenance_not_in_event_log(procs, lock_space, binaries):
    """The event log shows no grant (and so no release) of a maintenance
    lock that was refused because the state file could not record it
    (docs/protocol.rst, Maintenance: the lock is not held).  Before, the
    grant was logged before the state write was tried, then a release."""
    events = procs.workdir / "events.jsonl"
    daemon, holder, held, owner, rid = _unrecorded_maintenance_setup(
        procs, lock_space, binaries,
        extra_args=["--event-log", str(events)])
    holder.unlock(held["lock"])
    with pytest.raises(CoordinatorError) as e:
        owner.reply(rid, timeout=10)
    assert "cannot record the maintenance" in str(e.value), e.value
    # the range is free again (so the undo is done and logged, if at all)
    other = holder.lock(0, 4096, wait=False)
    holder.unlock(other["lock"])
    log = [json.loads(line) for line in events.read_text().splitlines()]
    mine = [ev["event"] for ev in log if ev.get("client-id") == "maint-owner"]
    assert "wait" in mine, log
    assert "grant" not in mine and "release" not in mine, mine
    owner.close()
    holder.close()
    assert daemon.alive(), daemon.stderr()
    assert daemon.stop() == 0, daemon.stderr()


@pytest.mark.parametrize("wait", [False, True])
def test_maintenance_refused_at_once_unless_recorded(procs, lock_space,
                                                     binaries, wait):
    """A maintenance request that nothing blocks is granted at once only if
    the state file records it: with the state file system full, a lock of
    the whole space (wait false or true) fails with 'cannot record the
    maintenance', the range stays free, the count and the state file are
    unchanged.  The waited path is test_maintenance_not_granted_unless_recorded."""
    binaries("extlockd")
    daemon = procs.add(TmpfsStateExtlockd(procs.workdir / "extlockd-tmpfs"))
    daemon.start()
    owner = CoordinatorClient(daemon.address)
    owner.hello("maint-owner", lock_space, lease_ms=30000)
    other = CoordinatorClient(daemon.address)
    other.hello("other", lock_space, lease_ms=30000)
    before = daemon.saved()
    gen_before = space_status(daemon, lock_space).get("maintenance")
    daemon.fill()
    with pytest.raises(CoordinatorError) as e:
        owner.lock(0, MAINT_LENGTH, wait=wait, timeout=10)
    assert "cannot record the maintenance" in str(e.value), e.value
    sp = space_status(daemon, lock_space)
    assert sp["held"] == [] and sp["waiting"] == [], sp
    assert sp.get("maintenance") == gen_before, sp
    g = other.lock(0, 4096, wait=False)
    other.unlock(g["lock"])
    daemon.unfill()
    assert daemon.saved() == before
    owner.close()
    other.close()
    assert daemon.alive(), daemon.stderr()
    assert daemon.stop() == 0, daemon.stderr()
