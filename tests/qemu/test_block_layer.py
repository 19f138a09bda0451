"""What a QEMU block maintainer checks for any new block driver.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Real binaries only (qemu-storage-daemon, qemu-system-x86_64, qemu-io,
qemu-img) against a real extlockd:

* reopen (blockdev-reopen): the changes the driver allows (read-only, the
  cache tuning) take effect, the ones it refuses (lock-space, client-id,
  granularity, coordinator, ..., or leaving a fixed option out) fail with
  a message and change nothing;
* drain and blockdev-del while a request waits for a lock another host
  holds: the monitor stays responsive, the request is failed, no lock is
  left behind at the coordinator;
* the node in an iothread (NBD export with iothread=) under contention, and
  moved between AioContexts (x-blockdev-set-iothread), also while it is
  reconnecting to a restarted coordinator;
* block_resize: what the driver does, asserted;
* flush, write-zeroes and discard against a lock held by another process:
  write-zeroes and discard wait for it (exclusive), flush does not;
* requests beyond the end of the image and zero-length requests.
"""

import fcntl
import os
import subprocess
import threading
import time

import pytest

from harness import procs as hp
from harness.coordinator import CoordinatorClient, coordinator_status
from harness.faults import NbdClient, node_info
from harness.patterns import fill
from harness.procs import extlock_node, wait_until
from harness.qmp import QMPError

KiB = 1024
MiB = 1024 * KiB
IMAGE = 64 * MiB


def node_opts(image, extlockd, lock_space, name="xl0", client="host-a", **kw):
    return extlock_node(image.child, extlockd.coordinator(), lock_space,
                        node_name=name, client_id=client, **kw)


def sessions_of(extlockd, client):
    return [s for s in coordinator_status(extlockd.address)["sessions"]
            if s["client-id"] == client]


def space(extlockd, lock_space):
    for sp in coordinator_status(extlockd.address)["lock-spaces"]:
        if sp["name"] == lock_space:
            return sp
    return {"held": [], "waiting": []}


def waiting(qmp, node=None):
    return node_info(qmp, node)["waiting"]


# ---------------------------------------------------------------------------
# reopen

@pytest.mark.parametrize("change,value", [
    ("lock-space", "another-space"),
    ("client-id", "someone-else"),
    ("granularity", 65536),
    ("lease-time", 7000),
    ("lock-cache", False),
    ("coordinator", {"type": "unix", "path": "/nonexistent/extlockd.sock"}),
    ("tls-hostname", "coordinator.example"),
])
def test_reopen_refuses_option_change(change, value, local_image, extlockd, lock_space,
                                      procs, binaries):
    """blockdev-reopen with a changed extlock option fails with a message
    naming it; the node keeps its session and locks and still works."""
    binaries("qemu-storage-daemon")
    opts = node_opts(local_image, extlockd, lock_space, lock_cache=True)
    q = procs.storage_daemon(blockdevs=[opts], exports=[("disk", "xl0", True)])
    with NbdClient(q.nbd_path, "disk") as n:
        n.write(0, b"\x42" * 4096)
    before = node_info(q.qmp, "xl0")
    e = q.qmp.execute_error("blockdev-reopen", {"options": [dict(opts, **{change: value})]})
    assert change in e.desc, e.desc
    after = node_info(q.qmp, "xl0")
    assert after["session"] == before["session"] and after["state"] == "active"
    assert after["lock-space"] == lock_space and after["client-id"] == "host-a"
    assert [(h["offset"], h["length"], h["mode"], h["token"]) for h in after["held"]] == \
        [(h["offset"], h["length"], h["mode"], h["token"]) for h in before["held"]]
    with NbdClient(q.nbd_path, "disk") as n:
        n.write(4096, b"\x43" * 4096)
        assert n.read(0, 8192) == b"\x42" * 4096 + b"\x43" * 4096


def test_reopen_refuses_resetting_fixed_option(local_image, extlockd, lock_space,
                                               procs, binaries):
    """Leaving a fixed option out of blockdev-reopen would reset it to its
    default: refused, naming it; the node keeps its session."""
    binaries("qemu-storage-daemon")
    opts = node_opts(local_image, extlockd, lock_space, granularity=65536)
    q = procs.storage_daemon(blockdevs=[opts])
    session = node_info(q.qmp, "xl0")["session"]
    for key in ("client-id", "granularity"):
        e = q.qmp.execute_error("blockdev-reopen", {"options": [
            {k: v for k, v in opts.items() if k != key}]})
        assert f"Option '{key}' cannot be reset to its default value" in e.desc, e.desc
    info = node_info(q.qmp, "xl0")
    assert info["session"] == session and info["granularity"] == 65536
    assert info["client-id"] == "host-a"


def test_reopen_changes_cache_tuning(local_image, extlockd, lock_space, procs,
                                     binaries):
    """blockdev-reopen may change the cache tuning (here
    lock-cache-idle-time): the session and the cached locks stay, and the
    new value governs from the next time it is used: a lock that goes idle
    after the reopen is given back after the new, short idle time."""
    binaries("qemu-storage-daemon")
    idle_ms = 300
    opts = node_opts(local_image, extlockd, lock_space, lock_cache=True,
                     lock_cache_idle_time=600000, wait_warning_time=5000)
    q = procs.storage_daemon(blockdevs=[opts], exports=[("disk", "xl0", True)])
    with NbdClient(q.nbd_path, "disk") as n:
        n.write(0, b"\x42" * 4096)
    before = node_info(q.qmp, "xl0")
    assert before["held"], before
    # omitted wait-warning-time goes back to its default: allowed, too
    new = dict(opts, **{"lock-cache-idle-time": idle_ms})
    del new["wait-warning-time"]
    q.qmp.execute("blockdev-reopen", {"options": [new]})
    after = node_info(q.qmp, "xl0")
    assert after["session"] == before["session"] and after["state"] == "active"
    assert [h["token"] for h in after["held"]] == [h["token"] for h in before["held"]]
    with NbdClient(q.nbd_path, "disk") as n:
        n.write(8 * 1024 * 1024, b"\x43" * 4096)
    # the idle timer is armed with the new idle time when the lock goes
    # idle: bound = idle time + the coordinator round trip + slack
    wait_until(lambda: not node_info(q.qmp, "xl0")["held"], idle_ms / 1000 + 5,
               what="cached locks given back after the new idle time")
    wait_until(lambda: not space(extlockd, lock_space)["held"], 5,
               what="coordinator sees the locks given back")
    with NbdClient(q.nbd_path, "disk") as n:
        assert n.read(0, 4096) == b"\x42" * 4096
        assert n.read(8 * 1024 * 1024, 4096) == b"\x43" * 4096


def test_reopen_read_only_and_back(local_image, extlockd, lock_space, procs, binaries):
    """blockdev-reopen to read-only=on is allowed: writes through the node
    then fail, reads still take their locks and work; reopening read-write
    makes writes work again.  The coordinator session survives both."""
    binaries("qemu-system-x86_64")
    fill(local_image.path, 0, MiB, 0x5a)
    opts = node_opts(local_image, extlockd, lock_space, lock_cache=False)
    opts["file"]["node-name"] = "img0"
    vm = procs.qemu_system(blockdevs=[opts])
    session = node_info(vm.qmp, "xl0")["session"]
    vm.qmp.execute("blockdev-reopen", {"options": [dict(opts, **{"read-only": True})]})
    out = vm.qmp.hmp('qemu-io xl0 "write -P 0x11 0 4k"')
    assert "failed" in out.lower() or "read-only" in out.lower(), out
    out = vm.qmp.hmp('qemu-io xl0 "read -P 0x5a 0 4k"')
    assert "error" not in out.lower() and "failed" not in out.lower(), out
    vm.qmp.execute("blockdev-reopen", {"options": [dict(opts, **{"read-only": False})]})
    out = vm.qmp.hmp('qemu-io xl0 "write -P 0x11 0 4k"')
    assert "error" not in out.lower() and "failed" not in out.lower(), out
    info = node_info(vm.qmp, "xl0")
    assert info["session"] == session and info["state"] == "active"
    assert local_image.path.read_bytes()[:4096] == b"\x11" * 4096
    vm.stop()
    log = vm.stderr()               # QEMU's stdout: qemu-io's own output
    assert "read 4096/4096 bytes at offset 0" in log, log
    assert "Pattern verification failed" not in log, log


# ---------------------------------------------------------------------------
# drain / blockdev-del with a request waiting for another host

# The other host keeps its lock this long (then lets go, so that a hang
# ends); a drain or delete must be done before.  What is checked is that
# order, not speed: a drain that waited for the holder returns after HOLD,
# one that did not returns after a few of the node's round trips, which on
# 2 cores at a load of 25-30 (a TCG guest, ASan builds and compiles beside
# the test) can take seconds.  So the bound is HOLD less an explicit
# 5 s margin for the holder's timer (it starts before t0), not a speed
# goal; HOLD only costs time when the test fails (the timer is cancelled).
HOLD = 20
BOUND = HOLD - 5


def host_a_left_nothing(extlockd, lock_space):
    """host-a neither holds nor waits for anything at the coordinator."""
    sp = space(extlockd, lock_space)
    return [h for h in sp["held"] if h["client-id"] == "host-a"] == [] and \
        [w for w in sp["waiting"] if w["client-id"] == "host-a"] == []


def test_blockdev_del_while_waiting_for_remote_holder(local_image, extlockd, lock_space,
                                                      procs, workdir, binaries):
    """A backup job copies into the extlock node; its write to the first
    cluster waits for a lock a third client holds.  Cancelling the job
    cuts that wait (.bdrv_cancel_in_flight: the queued lock request is
    cancelled at the coordinator and fails), so the job ends and
    blockdev-del deletes the node long before the holder lets go; the
    coordinator ends the session and keeps no request or lock of it, and
    nothing was written under the holder's lock."""
    binaries("qemu-storage-daemon")
    src = workdir / "src.raw"
    with open(src, "wb") as f:
        f.truncate(IMAGE)
    fill(src, 0, MiB, 0x77)
    q = procs.storage_daemon(blockdevs=[
        node_opts(local_image, extlockd, lock_space),
        {"driver": "file", "filename": str(src), "node-name": "src"}])
    with CoordinatorClient(extlockd.address) as holder:
        holder.hello("py-holder", lock_space, lease_ms=60000)
        g = holder.lock(0, 64 * KiB, "exclusive")
        # the holder gives up after HOLD s whatever happens, so that a hang
        # ends and is measured instead of blocking the test
        fired = threading.Event()

        def give_up():
            holder.unlock(g["lock"])
            fired.set()
        let_go = threading.Timer(HOLD, give_up)
        try:
            q.qmp.execute("blockdev-backup", {"job-id": "bk", "device": "src",
                                              "target": "xl0", "sync": "full"})
            wait_until(lambda: coordinator_waiter(extlockd, lock_space, "host-a"),
                       timeout=10, what="the backup's write to wait for the holder")
            let_go.start()
            t0 = time.monotonic()
            q.qmp.execute("job-cancel", {"id": "bk"}, timeout=HOLD + 20)
            q.qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=HOLD + 20)
            wait_until(lambda: q.qmp.execute("query-jobs") == [], timeout=HOLD + 20,
                       what="the job to go away")
            q.qmp.execute("blockdev-del", {"node-name": "xl0"}, timeout=HOLD + 20)
            took = time.monotonic() - t0
        finally:
            let_go.cancel()
            let_go.join()
        assert took < BOUND, f"deleting the node waited {took:.1f} s for the remote holder"
        # the holder still holds its lock, nothing of host-a is left
        wait_until(lambda: not [s for s in sessions_of(extlockd, "host-a")
                                if s["state"] == "active"],
                   timeout=10, what="host-a's session to end")
        sp = space(extlockd, lock_space)
        assert [h["client-id"] for h in sp["held"]] == ["py-holder"], sp
        assert host_a_left_nothing(extlockd, lock_space), sp
        assert not fired.is_set(), "the holder let go before the node was deleted"
        holder.unlock(g["lock"])
        holder.bye()
    assert local_image.path.read_bytes()[:64 * KiB] == bytes(64 * KiB)
    assert q.alive()
    assert q.qmp.execute("query-extent-locks") == []


def test_drain_while_waiting_for_remote_holder(local_image, extlockd, lock_space, procs,
                                               binaries):
    """blockdev-reopen drains the node.  A drain while a request waits for
    a lock another host holds must not keep the monitor (and the whole main
    loop) hanging for as long as that host keeps its lock: the drain
    cancels the queued request at the coordinator and fails it (it had
    touched nothing), the reopen returns within a bounded time, and the
    node keeps its session and works again once the holder is gone."""
    binaries("qemu-storage-daemon")
    opts = node_opts(local_image, extlockd, lock_space)
    q = procs.storage_daemon(blockdevs=[opts], exports=[("disk", "xl0", True)])
    session = node_info(q.qmp, "xl0")["session"]
    with CoordinatorClient(extlockd.address) as holder, NbdClient(q.nbd_path, "disk") as n:
        holder.hello("py-holder", lock_space, lease_ms=60000)
        g = holder.lock(0, 64 * KiB, "exclusive")
        fired = threading.Event()

        def give_up():
            holder.unlock(g["lock"])
            fired.set()
        let_go = threading.Timer(HOLD, give_up)
        try:
            h = n.send_write(0, b"\x77" * 4096)
            wait_until(lambda: waiting(q.qmp, "xl0"), timeout=10,
                       what="the write to wait for the holder")
            let_go.start()
            t0 = time.monotonic()
            q.qmp.execute("blockdev-reopen", {"options": [opts]}, timeout=HOLD + 20)
            took = time.monotonic() - t0
            err, _ = n.wait(h, timeout=HOLD + 20)
        finally:
            let_go.cancel()
            let_go.join()
        assert took < BOUND, f"the drain waited {took:.1f} s for the remote holder"
        assert err != 0, "the write waiting through the drain did not fail"
        assert not fired.is_set(), "the holder let go before the drain ended"
        wait_until(lambda: host_a_left_nothing(extlockd, lock_space), timeout=10,
                   what="the cancelled request to leave the coordinator's queue")
        assert local_image.path.read_bytes()[:4096] == bytes(4096)
        holder.unlock(g["lock"])
        holder.bye()
        err, _ = n.wait(n.send_write(0, b"\x78" * 4096), timeout=10)
        assert err == 0
    info = node_info(q.qmp, "xl0")
    assert info["state"] == "active" and info["session"] == session, info
    assert local_image.path.read_bytes()[:4096] == b"\x78" * 4096


def test_drain_lets_a_released_wait_complete(local_image, extlockd, lock_space, procs,
                                            binaries):
    """Drains are also QEMU's "wait until all I/O is done" (VM stop,
    qemu-io aio_flush): a request waiting for a lock that its holder gives
    back while the node is drained, within the drain's grace, completes
    instead of failing.  The holder lets go as soon as the node's drain
    has begun (its extlock_client_drain trace event)."""
    binaries("qemu-storage-daemon")
    opts = node_opts(local_image, extlockd, lock_space)
    q = procs.storage_daemon(blockdevs=[opts], exports=[("disk", "xl0", True)],
                             extra_args=["--trace", "extlock_client_drain*"])
    with CoordinatorClient(extlockd.address) as holder, NbdClient(q.nbd_path, "disk") as n:
        holder.hello("py-holder", lock_space, lease_ms=60000)
        g = holder.lock(0, 64 * KiB, "exclusive")
        h = n.send_write(0, b"\x79" * 4096)
        wait_until(lambda: waiting(q.qmp, "xl0"), timeout=10,
                   what="the write to wait for the holder")
        result = {}
        t = threading.Thread(target=lambda: result.update(
            ret=q.qmp.execute("blockdev-reopen", {"options": [opts]}, timeout=30)))
        t.start()
        try:
            wait_until(lambda: "extlock_client_drain node xl0 begin 1" in q.stderr(),
                       timeout=10, what="the node's drain to begin")
            holder.unlock(g["lock"])
        finally:
            t.join(timeout=30)
        assert "ret" in result, "blockdev-reopen did not return"
        err, _ = n.wait(h, timeout=10)
        assert err == 0, "a write whose holder let go within the drain's grace failed"
        holder.bye()
    assert "extlock_client_drain_cut" not in q.stderr()
    assert local_image.path.read_bytes()[:4096] == b"\x79" * 4096
    assert node_info(q.qmp, "xl0")["counters"]["errors"] == 0


# ---------------------------------------------------------------------------
# iothreads

# QEMU 7.2's NBD server asserts when a client of an export in an iothread
# disconnects (blockdev-nbd.c: nbd_blockdev_client_closed), so these tests
# drive the node with HMP qemu-io (it runs the command in the node's
# AioContext) in a qemu-system-x86_64 -M none.

def hmp_io(vm, node, cmd, timeout=30):
    out = vm.qmp.hmp(f'qemu-io {node} "{cmd}"', timeout=timeout)
    assert "error" not in out.lower() and "failed" not in out.lower(), out
    return out


def coordinator_waiter(extlockd, lock_space, client):
    sp = space(extlockd, lock_space)
    return [w for w in sp["waiting"] if w["client-id"] == client]


def test_iothread_under_contention(local_image, extlockd, lock_space, procs, binaries):
    """The node runs in an iothread (x-blockdev-set-iothread): a write that
    conflicts with a lock another client holds waits (the coordinator shows
    it, blocked by that client) and completes once the lock is released; a
    revocation of the lock the node then caches is honoured."""
    binaries("qemu-system-x86_64")
    vm = procs.qemu_system(
        blockdevs=[node_opts(local_image, extlockd, lock_space, lock_cache=True)],
        extra_args=["-object", "iothread,id=io0"])
    vm.qmp.execute("x-blockdev-set-iothread", {"node-name": "xl0", "iothread": "io0"})
    with CoordinatorClient(extlockd.address) as holder:
        holder.hello("py-holder", lock_space, lease_ms=60000)
        g = holder.lock(MiB, 64 * KiB, "exclusive")
        result = {}
        # HMP qemu-io blocks the monitor until the write is done: run it in
        # a thread and watch the coordinator meanwhile
        t = threading.Thread(target=lambda: result.update(
            out=vm.qmp.hmp(f'qemu-io xl0 "write -P 0x31 {MiB} 4k"', timeout=30)))
        t.start()
        try:
            w = wait_until(lambda: coordinator_waiter(extlockd, lock_space, "host-a"),
                           timeout=10, what="the node's write to wait at the coordinator")
            assert w[0]["blocked-by"] == ["py-holder"], w
            assert t.is_alive(), "the write completed while the holder held the range"
            assert local_image.path.read_bytes()[MiB:MiB + 4096] == bytes(4096)
            holder.unlock(g["lock"])
        finally:
            t.join(timeout=30)
        assert "error" not in result["out"].lower(), result
        # the node caches a lock now; the holder's request revokes it
        g = holder.lock(MiB, 4096, "exclusive", timeout=15)
        holder.unlock(g["lock"])
        hmp_io(vm, "xl0", f"write -P 0x32 {MiB + 4096} 4k")
        holder.bye()
    c = node_info(vm.qmp, "xl0")["counters"]
    assert c["waits"] >= 1 and c["revocations"] >= 1 and c["errors"] == 0, c
    data = local_image.path.read_bytes()[MiB:MiB + 8192]
    assert data == b"\x31" * 4096 + b"\x32" * 4096


def test_iothread_polling_finds_revoke(local_image, extlockd, lock_space, procs, binaries,
                                       tmp_path):
    """The node runs in an iothread that polls (poll-max-ns): the
    coordinator connection has an io_poll check, so the iothread's
    polling stays enabled and finds a revoke without sleeping
    (extlock_client_poll_ready); the revoke is honoured as from the fd
    handler (the holder gets the range, no error, the data is right).
    Without the io_poll check the fd handler disables the iothread's
    polling (poll_disable_cnt) and the trace event never fires.  An NBD
    export fixed in the iothread (no client connects) keeps the node
    there: without it, removing HMP qemu-io's temporary BlockBackend
    moves the node back to the main loop (bdrv_root_unref_child)."""
    binaries("qemu-system-x86_64")
    vm = procs.qemu_system(
        blockdevs=[node_opts(local_image, extlockd, lock_space, lock_cache=True)],
        extra_args=["-object", "iothread,id=io0,poll-max-ns=200000000,poll-grow=1000",
                    "-trace", "extlock_client_poll_ready"])
    vm.qmp.execute("nbd-server-start", {"addr": {"type": "unix",
                                                 "data": {"path": str(tmp_path / "nbd.sock")}}})
    vm.qmp.execute("block-export-add", {"type": "nbd", "id": "e0", "name": "e0",
                                        "node-name": "xl0", "writable": True,
                                        "iothread": "io0", "fixed-iothread": True})
    found = False
    with CoordinatorClient(extlockd.address) as holder:
        holder.hello("py-holder", lock_space, lease_ms=60000)
        # adaptive polling grows its window with every message that comes
        # soon enough: bounded rounds until a revoke is found by polling
        for i in range(40):
            hmp_io(vm, "xl0", f"write -P {0x40 + i} {MiB} 4k")
            g = holder.lock(MiB, 4096, "exclusive", timeout=15)
            holder.unlock(g["lock"])
            if "extlock_client_poll_ready" in vm.stderr():
                found = True
                break
        holder.bye()
    assert found, "the iothread never found the coordinator's input by polling"
    c = node_info(vm.qmp, "xl0")["counters"]
    assert c["revocations"] >= i + 1 and c["errors"] == 0, c
    assert local_image.path.read_bytes()[MiB:MiB + 4096] == bytes([0x40 + i]) * 4096


def test_move_between_aio_contexts(local_image, extlockd, lock_space, procs, binaries):
    """x-blockdev-set-iothread moves the node into an iothread and back
    (once while its coordinator is down and the node reconnecting); the
    connection follows: lock requests, renewals and the reconnection work
    in the new context."""
    binaries("qemu-system-x86_64")
    vm = procs.qemu_system(
        blockdevs=[node_opts(local_image, extlockd, lock_space, lock_cache=False,
                             lease_time=5000)],
        extra_args=["-object", "iothread,id=io0"])

    def move(iothread):
        vm.qmp.execute("x-blockdev-set-iothread", {"node-name": "xl0", "iothread": iothread})

    hmp_io(vm, "xl0", "write -P 0x01 0 4k")
    move("io0")
    hmp_io(vm, "xl0", "write -P 0x02 4k 4k")
    move(None)
    hmp_io(vm, "xl0", "write -P 0x03 8k 4k")
    # into the iothread while the coordinator is down
    extlockd.kill()
    vm.qmp.wait_event("EXTENT_LOCK_COORDINATOR_LOST", timeout=10)
    move("io0")
    extlockd.start()
    vm.qmp.wait_event("EXTENT_LOCK_COORDINATOR_RESTORED", timeout=20)
    hmp_io(vm, "xl0", "write -P 0x04 12k 4k")
    # and back while it renews its lease
    move(None)
    hmp_io(vm, "xl0", "write -P 0x05 16k 4k")
    info = node_info(vm.qmp, "xl0")
    assert info["state"] == "active" and info["connected"], info
    assert info["counters"]["errors"] == 0 and info["counters"]["lease-losses"] == 0
    data = local_image.path.read_bytes()[:5 * 4096]
    assert data == b"".join(bytes([p]) * 4096 for p in range(1, 6))


# QEMU 10.0 runs a request in the AioContext of the thread that submits
# it: HMP qemu-io's in the main loop even when the node is in an iothread.
# The node's connection reads the coordinator's replies in the node's
# iothread.  A grant read there before the main loop's request had
# yielded for it was a wake-up the request consumed later, in the middle
# of its write to the child: the write failed with -EINPROGRESS, then the
# thread pool woke the finished coroutine and QEMU died (CI, load 20).
# The window (between sending the lock request and waiting for the reply)
# is held open at will: the request traces extlock_client_lock in it, and
# the trace goes to a FIFO of one page that the test keeps full, so the
# thread that runs the request blocks writing the trace line until the
# test reads the FIFO.  If that is the main loop, the test first waits
# until the iothread has read the grant (QEMU's coordinator socket has
# nothing left to read); if it is the node's iothread (the fix), the
# grant cannot be read before, and the test waits only for the
# coordinator to have granted.
TRACE_BLOCKED_WRITES = 5
F_SETPIPE_SZ = 1031
SYS_WRITE = 1                   # x86_64


def drain_fifo(fd):
    """Read what @fd holds (non-blocking)."""
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def fd_of(pid, path):
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return int(fd)
        except OSError:
            pass
    raise AssertionError(f"process {pid} has no fd for {path}")


def threads_writing(pid, fd):
    """Names of the threads of @pid blocked in write(@fd)."""
    names = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return names
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                sc = f.read().split()
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if len(sc) > 1 and sc[0] == str(SYS_WRITE) and int(sc[1], 16) == fd:
            names.append(comm)
    return names


def coordinator_unread(pid):
    """Bytes waiting in QEMU's connection to the coordinator (its only
    connected UNIX socket without an address of its own)."""
    out = subprocess.run(["ss", "-x", "-n", "-p"], capture_output=True,
                         text=True, check=True).stdout
    for line in out.splitlines():
        f = line.split()
        if (len(f) > 5 and f[0] == "u_str" and f[1] == "ESTAB" and
                f[4] == "*" and f"pid={pid}," in line):
            return int(f[2])
    raise AssertionError(f"no coordinator connection of {pid} in:\n{out}")


def test_main_loop_write_granted_before_it_waits(local_image, extlockd, lock_space,
                                                 procs, binaries, tmp_path):
    """The node is moved into iothread io0 and a write comes from the main
    loop (HMP qemu-io), five times; each is held right after it sent its lock request until the
    coordinator has granted it and QEMU has read the grant: each write
    completes (no -EINPROGRESS), QEMU stays up, the data lands."""
    binaries("qemu-system-x86_64")
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    wfd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        fcntl.fcntl(rfd, F_SETPIPE_SZ, 4096)
        vm = procs.qemu_system(
            blockdevs=[node_opts(local_image, extlockd, lock_space, lock_cache=False)],
            extra_args=["-object", "iothread,id=io0", "-name", "vm,debug-threads=on",
                        "-trace", "extlock_client_lock", "-D", str(fifo)])
        qfd = fd_of(vm.proc.pid, fifo)
        for i in range(TRACE_BLOCKED_WRITES):
            # HMP qemu-io's BlockBackend, going, takes the node back to
            # the main context (bdrv_root_unref_child()): move it each time
            vm.qmp.execute("x-blockdev-set-iothread",
                           {"node-name": "xl0", "iothread": "io0"})
            drain_fifo(rfd)
            # the page is full: the next trace line waits for the reader
            os.write(wfd, b"#" * 4095 + b"\n")
            result = {}
            t = threading.Thread(target=lambda: result.update(
                out=vm.qmp.hmp(f'qemu-io xl0 "write -P {i + 1} {i * 4}k 4k"',
                               timeout=30)))
            t.start()
            try:
                # stop waiting as soon as QEMU died or the write ended
                def over():
                    return not vm.alive() or not t.is_alive()

                who = wait_until(lambda: threads_writing(vm.proc.pid, qfd) or over(),
                                 timeout=10, what="the write to block on its trace line")
                wait_until(lambda: space(extlockd, lock_space)["held"] or over(),
                           timeout=10, what="the coordinator to grant the write's lock")
                if who is not True and "IO io0" not in who:
                    wait_until(lambda: over() or coordinator_unread(vm.proc.pid) == 0,
                               timeout=10, what="QEMU to read the grant")
            finally:
                drain_fifo(rfd)
                t.join(timeout=30)
            assert vm.alive(), f"QEMU died at write {i}:\n{vm.stderr()}"
            assert "out" in result, f"write {i} got no answer:\n{vm.stderr()}"
            assert "failed" not in result["out"].lower(), result["out"]
        assert "Operation now in progress" not in vm.stderr()
        data = local_image.path.read_bytes()[:TRACE_BLOCKED_WRITES * 4096]
        assert data == b"".join(bytes([i + 1]) * 4096
                                for i in range(TRACE_BLOCKED_WRITES))
        info = node_info(vm.qmp, "xl0")
        assert info["counters"]["errors"] == 0, info
    finally:
        os.close(wfd)
        os.close(rfd)


class SilentCoordinator:
    """Listens where the coordinator did, accepts connections and never
    answers: a node's connect then waits for the hello's answer (up to its
    10 s answer timeout) in its connect thread."""

    def __init__(self, path):
        import socket
        self.path = path
        path.unlink(missing_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self.conns = []

    def accepted(self, timeout):
        import select
        r, _, _ = select.select([self.listener], [], [], timeout)
        if r:
            self.conns.append(self.listener.accept()[0])
        return len(self.conns)

    def close(self):
        for c in self.conns:
            c.close()
        self.listener.close()
        self.path.unlink(missing_ok=True)


# A move drains the node: it must cut a pending connect, not wait for the
# coordinator's answer (EXTLOCK_ANSWER_TIMEOUT_MS, 10 s, counted from the
# connect, which the test sees up to a poll and a scheduling delay before
# t0).  The bound is that timeout less a 4 s margin for that delay: a move
# that waited for the connect cannot pass it, and one that did not has
# seconds of slack for a starved QEMU (it was 3 s, a few scheduling rounds
# on an idle machine).
ANSWER_TIMEOUT = 10
MOVE_BOUND = ANSWER_TIMEOUT - 4


def test_move_while_connect_hangs(local_image, extlockd, lock_space, procs, binaries):
    """The coordinator is gone and something that never answers listens in
    its place: the node's reconnection waits for a hello answer in its
    connect thread.  Moving the node between AioContexts (each move drains
    it and detaches/attaches it) cuts that wait at once, leaving the
    connect to its detached thread, and the reconnection goes on in the
    new context: when the real coordinator is back the node reconnects
    there, and I/O works in the iothread.  Without the pause the detach
    finds the reconnection in flight and asserts."""
    binaries("qemu-system-x86_64")
    vm = procs.qemu_system(
        blockdevs=[node_opts(local_image, extlockd, lock_space, lock_cache=True,
                             lease_time=60000)],
        extra_args=["-object", "iothread,id=io0", "-object", "iothread,id=io1"])

    def move(iothread):
        vm.qmp.execute("x-blockdev-set-iothread",
                       {"node-name": "xl0", "iothread": iothread}, timeout=30)

    hmp_io(vm, "xl0", "write -P 0x01 0 4k")
    extlockd.kill()
    vm.qmp.wait_event("EXTENT_LOCK_COORDINATOR_LOST", timeout=10)
    silent = SilentCoordinator(extlockd.socket_path)
    try:
        for target in ("io0", "io1", None, "io0"):
            # the node is (again) waiting in a connect that gets no answer
            n = len(silent.conns)
            wait_until(lambda: silent.accepted(0.2) > n, timeout=15,
                       what="the node to connect to the silent coordinator")
            t0 = time.monotonic()
            move(target)
            took = time.monotonic() - t0
            assert took < MOVE_BOUND, f"moving the node waited {took:.1f} s for a connect"
            assert vm.alive()
    finally:
        silent.close()
    extlockd.start()
    vm.qmp.wait_event("EXTENT_LOCK_COORDINATOR_RESTORED", timeout=30)
    hmp_io(vm, "xl0", "write -P 0x02 4k 4k")
    hmp_io(vm, "xl0", "read -P 0x01 0 4k")
    info = node_info(vm.qmp, "xl0")
    assert info["state"] == "active" and info["connected"], info
    assert info["counters"]["lease-losses"] == 0, info["counters"]
    data = local_image.path.read_bytes()[:8192]
    assert data == b"\x01" * 4096 + b"\x02" * 4096
    # still safe in the iothread: another client's exclusive lock revokes
    # what the node caches, and the node then reads that client's write
    with CoordinatorClient(extlockd.address) as other:
        other.hello("py-other", lock_space, lease_ms=60000)
        g = other.lock(0, 4096, "exclusive", timeout=30)
        fill(local_image.path, 0, 4096, 0x03)
        other.unlock(g["lock"])
        other.bye()
    hmp_io(vm, "xl0", "read -P 0x03 0 4k")
    assert node_info(vm.qmp, "xl0")["counters"]["revocations"] >= 1
    vm.qmp.execute("x-blockdev-set-iothread", {"node-name": "xl0", "iothread": None})
    vm.stop()
    log = vm.stderr()               # with QEMU's stdout: qemu-io's output
    assert "Assertion" not in log, log
    assert "Pattern verification failed" not in log, log
    assert log.count("read 4096/4096 bytes at offset 0") == 2, log


def test_blockdev_del_while_connect_hangs(local_image, extlockd, lock_space, procs,
                                         binaries):
    """Closing the node never waits for a connect: while its reconnection
    waits for a coordinator that accepted the connection and never
    answers, blockdev-del returns at once (the connect is left to its
    detached thread, which frees itself when it gives up), and the daemon
    stays healthy."""
    binaries("qemu-storage-daemon")
    q = procs.storage_daemon(blockdevs=[node_opts(local_image, extlockd, lock_space)])
    extlockd.kill()
    q.qmp.wait_event("EXTENT_LOCK_COORDINATOR_LOST", timeout=10)
    silent = SilentCoordinator(extlockd.socket_path)
    try:
        wait_until(lambda: silent.accepted(0.2) > 0, timeout=15,
                   what="the node to connect to the silent coordinator")
        t0 = time.monotonic()
        q.qmp.execute("blockdev-del", {"node-name": "xl0"}, timeout=30)
        took = time.monotonic() - t0
    finally:
        silent.close()
    assert took < MOVE_BOUND, f"deleting the node waited {took:.1f} s for a connect"
    assert q.alive()
    assert q.qmp.execute("query-extent-locks") == []
    nodes = q.qmp.execute("query-named-block-nodes", {"flat": True})
    assert "xl0" not in [n["node-name"] for n in nodes], nodes


# ---------------------------------------------------------------------------
# resize

def test_block_resize(local_image, extlockd, lock_space, procs, binaries):
    """block_resize through an extlock node is a cluster-wide maintenance
    (tests/qemu/test_maintenance.py): growing works; shrinking, which
    would cut off data other hosts may hold locks on, is refused with a
    clear error and the image keeps its size."""
    binaries("qemu-storage-daemon")
    q = procs.storage_daemon(blockdevs=[node_opts(local_image, extlockd, lock_space)])
    with pytest.raises(QMPError) as e:
        q.qmp.execute("block_resize", {"node-name": "xl0", "size": IMAGE // 2})
    assert "cannot shrink the shared image" in e.value.desc, e.value
    assert local_image.path.stat().st_size == IMAGE
    q.qmp.execute("block_resize", {"node-name": "xl0", "size": 2 * IMAGE})
    assert local_image.path.stat().st_size == 2 * IMAGE
    assert node_info(q.qmp, "xl0")["state"] == "active"
    assert node_info(q.qmp, "xl0")["maintenance"]["owned"] == 1


# ---------------------------------------------------------------------------
# flush, write-zeroes, discard against another process's lock

@pytest.mark.parametrize("kind", ["write-zeroes", "discard"])
def test_zeroes_and_discard_wait_for_shared_holder(kind, local_image, extlockd,
                                                   lock_space, procs, binaries):
    """A reader in another process holds a shared lock: write-zeroes and
    discard (they change data) wait for it with an exclusive request; a
    flush meanwhile does not wait.  After the release the request
    completes (write-zeroes: the range reads as zeroes)."""
    binaries("qemu-storage-daemon")
    fill(local_image.path, 0, MiB, 0x5a)
    opts = node_opts(local_image, extlockd, lock_space, lock_cache=False)
    opts["discard"] = "unmap"          # else the block layer drops discards
    q = procs.storage_daemon(blockdevs=[opts], exports=[("disk", "xl0", True)])
    with CoordinatorClient(extlockd.address) as reader, NbdClient(q.nbd_path, "disk") as n:
        reader.hello("py-reader", lock_space, lease_ms=60000)
        g = reader.lock(0, 64 * KiB, "shared")
        h = (n.send_write_zeroes if kind == "write-zeroes" else n.send_trim)(0, 64 * KiB)
        w = wait_until(lambda: [x for x in waiting(q.qmp, "xl0") if "token" in x],
                       timeout=10, what=f"the {kind} to wait")
        assert (w[0]["mode"], w[0]["blocked-by"]) == ("exclusive", ["py-reader"]), w
        err, _ = n.wait(n.send_flush(), timeout=10)
        assert err == 0
        assert not n.replied(h), f"the {kind} completed while the reader held its lock"
        assert waiting(q.qmp, "xl0"), "the flush should not have touched the waiter"
        assert local_image.path.read_bytes()[:64 * KiB] == b"\x5a" * 64 * KiB
        reader.unlock(g["lock"])
        err, _ = n.wait(h, timeout=10)
        assert err == 0
        reader.bye()
        if kind == "write-zeroes":
            assert n.read(0, 64 * KiB) == bytes(64 * KiB)
    if kind == "write-zeroes":
        assert local_image.path.read_bytes()[:64 * KiB] == bytes(64 * KiB)
    assert node_info(q.qmp, "xl0")["counters"]["errors"] == 0


def test_two_processes_write_zero_discard_flush(local_image, extlockd, lock_space, procs,
                                                workdir, binaries):
    """Two qemu-io processes mix writes, write-zeroes, discards and flushes on
    the same extents: both finish without errors and every extent ends up
    uniformly one of the writers' patterns or zeroes."""
    binaries("qemu-io")
    ext, n = 256 * KiB, 16
    cmds = {}
    for w, pat in enumerate((0xa1, 0xb2)):
        c = []
        for r in range(6):
            for i in (range(n) if (r + w) % 2 else reversed(range(n))):
                op = (i + r + w) % 3
                off = i * ext
                c.append(f"aio_write -q -P {pat:#x} {off} {ext}" if op == 0 else
                         f"aio_write -q -z {off} {ext}" if op == 1 else
                         f"discard -q {off} {ext}")
            c.append("aio_flush")
        cmds[w] = c
    procs_ = []
    for w in cmds:
        node = node_opts(local_image, extlockd, lock_space, name=f"xl{w}",
                         client=f"w{w}")
        node["file"] = dict(local_image.child, cache={"direct": True})
        procs_.append(hp.start_qemu_io(node, cmds[w], workdir / f"w{w}.out",
                                       workdir / f"w{w}.err"))
    for w, p in enumerate(procs_):
        try:
            rc = p.wait(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        out = (workdir / f"w{w}.out").read_text() + (workdir / f"w{w}.err").read_text()
        assert rc == 0 and "error" not in out.lower() and "failed" not in out.lower(), out
    data = local_image.path.read_bytes()
    for i in range(n):
        chunk = data[i * ext:(i + 1) * ext]
        assert len(set(chunk)) == 1 and chunk[0] in (0, 0xa1, 0xb2), \
            f"extent {i} is mixed: {sorted(set(chunk))}"


# ---------------------------------------------------------------------------
# beyond the end, zero length

@pytest.mark.parametrize("cmd", ["read 64M 4k", "write -P 0x11 64M 4k",
                                 "read 65532k 8k", "write -P 0x11 65532k 8k",
                                 "write -z 64M 4k", "discard 64M 4k"])
def test_request_beyond_eof(cmd, local_image, extlockd, lock_space, binaries):
    """Requests that start or end beyond the image fail (as on any node),
    take no lock, and leave the image unchanged."""
    binaries("qemu-io")
    node = node_opts(local_image, extlockd, lock_space, lock_cache=False)
    r = hp.run_qemu_io(node, [cmd], timeout=60)
    out = r.stdout + r.stderr
    assert "failed" in out.lower() or "out of range" in out.lower(), out
    assert local_image.path.stat().st_size == IMAGE
    assert local_image.path.read_bytes()[-8 * KiB:] == bytes(8 * KiB)


@pytest.mark.parametrize("cmd", ["read 0 0", "write -P 0x11 0 0", "write -z 0 0",
                                 "discard 0 0", "read 64M 0", "write -P 0x11 64M 0"])
def test_zero_length_request(cmd, local_image, extlockd, lock_space, procs, binaries):
    """A zero-length request succeeds at once, changes nothing and needs
    no lock (the coordinator has no such thing as an empty extent)."""
    binaries("qemu-system-x86_64")
    drive = hp.dotted(node_opts(local_image, extlockd, lock_space, lock_cache=False))
    vm = procs.qemu_system(extra_args=["-drive", f"if=none,id=drv0,{drive}"])
    before = node_info(vm.qmp, "xl0")["counters"]["requests"]
    out = vm.qmp.hmp(f'qemu-io drv0 "{cmd}"', timeout=20)
    assert "failed" not in out.lower() and "error" not in out.lower(), out
    info = node_info(vm.qmp, "xl0")
    assert info["state"] == "active" and info["held"] == [] and info["waiting"] == []
    assert info["counters"]["requests"] == before, info["counters"]
    assert info["counters"]["errors"] == 0
    assert vm.alive()


# ---------------------------------------------------------------------------
# a request that has its lock and waits for this host's metadata reread

REREAD_LEASE, REREAD_FENCE = 2000, 1000


@pytest.mark.parametrize("stuck_io", ["report", "exit"])
def test_request_waiting_for_reread_never_lands_after_regrant(
        local_image, lock_space, procs, binaries, tmp_path, stuck_io):
    """Host A (qemu-storage-daemon, node in iothread io0, NBD export in
    io0) learns of host B's block_resize from a lease renewal and rereads
    its metadata; that reread runs in the main loop, which is held there
    (its trace line extlock_maint_reloaded goes to a full FIFO).  A write
    comes in over NBD (served in io0): it gets its lock, then waits in
    extlock_maint_enter() for the reread.  A's link to the coordinator is
    cut past its lease plus the fence margin; host C is granted the
    extent and writes it; the link heals and A starts a new session (in
    io0, while the main loop is still held).  Then the reread ends.

    Safety: the held write must not reach the image: C holds the extent.
    It fails with EIO (its lock went stale with the old session).  Without
    any recheck, or with a recheck of the lease alone (valid again in
    A's new session), it lands on C's data.

    The reread counts as I/O in flight: with on-stuck-io=exit (the
    default) A exits before the coordinator may re-grant (it fenced
    itself, and the write never lands); with on-stuck-io=report A stays
    and the lock recheck is what keeps the write off C's extent."""
    from harness.faults import TcpPartition, check_coordinator, start_coordinator
    from harness.coordinator import release_after_fresh_renewal
    binaries("extlockd", "qemu-storage-daemon")
    version = subprocess.run([hp.binary("qemu-storage-daemon"), "--version"],
                             capture_output=True, text=True, check=True).stdout
    if "version 7." in version:
        # 7.2's main loop holds the node's AioContext lock across the
        # reread (extlock_aio_context_acquire()): io0 stands still with it,
        # no session can change meanwhile, and the recheck sees the lapsed
        # lease itself
        pytest.skip("QEMU 7.2: the node's iothread stops during the reread")
    d = start_coordinator(procs, fence_margin_ms=REREAD_FENCE)
    link = TcpPartition(d.tcp_port)
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    wfd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    nbd_path = tmp_path / "a-nbd.sock"
    off = 1 * MiB
    try:
        fcntl.fcntl(rfd, F_SETPIPE_SZ, 4096)
        a = procs.storage_daemon(
            name="a", objects=["iothread,id=io0"],
            # no file lock: A's NBD export does not share "resize", which
            # would keep B from resizing (on NFS no such lock crosses hosts)
            blockdevs=[extlock_node(dict(local_image.child, locking="off"),
                                    link.coordinator(), lock_space,
                                    node_name="xla", client_id="host-a",
                                    lease_time=REREAD_LEASE, lock_cache=False,
                                    on_stuck_io=stuck_io)],
            extra_args=["--nbd-server", f"addr.type=unix,addr.path={nbd_path}",
                        "--export", "type=nbd,id=disk,node-name=xla,name=disk,"
                        "writable=on,iothread=io0",
                        "--trace", f"enable=extlock_maint_reloaded,file={fifo}"])
        wait_until(nbd_path.exists, timeout=20, what="A's NBD server")
        b = procs.storage_daemon(
            name="b", blockdevs=[extlock_node(local_image.child, d.coordinator(),
                                              lock_space, node_name="xlb",
                                              client_id="host-b")])
        qfd = fd_of(a.proc.pid, fifo)
        with NbdClient(nbd_path, "disk") as n:
            n.write(off, b"\x11" * 4096)        # A works; its lock is given back
            wait_until(lambda: not space(d, lock_space)["held"], timeout=15,
                       what="A's lock given back (lock-cache off)")
            drain_fifo(rfd)
            # the page is full: the reread's trace line waits for the reader
            os.write(wfd, b"#" * 4095 + b"\n")
            b.qmp.execute("block_resize", {"node-name": "xlb", "size": 2 * IMAGE})
            # A's next renewal shows B's maintenance: A rereads, held
            wait_until(lambda: threads_writing(a.proc.pid, qfd), timeout=30,
                       what="A's reread to block on its trace line")
            h = n.send_write(off, b"\xaa" * 4096)

            def a_holds():
                return [x for x in space(d, lock_space)["held"]
                        if x["client-id"] == "host-a" and x["offset"] <= off
                        and x["offset"] + x["length"] >= off + 4096
                        and x["mode"] == "exclusive"]
            wait_until(a_holds, timeout=15, what="A's write to get its lock")
            assert not n.replied(h), "the write went on while the reread was held"
            release = release_after_fresh_renewal(d.address, "host-a", REREAD_LEASE)
            link.cut()
            with CoordinatorClient(d.address,
                                   timeout=(REREAD_LEASE + REREAD_FENCE) / 1000 + 15) as c:
                c.hello("host-c", lock_space, lease_ms=60000)
                g = c.lock(off, 4096, "exclusive")      # waits for A's expiry
                t_grant = time.monotonic()
                assert t_grant >= release, \
                    f"C was granted {release - t_grant:.3f} s before A's lease + margin"
                with open(local_image.path, "r+b") as f:
                    f.seek(off)
                    f.write(b"\xcc" * 4096)
                link.heal()
                if stuck_io == "exit":
                    # A fenced itself before C's grant: nothing of A's lands
                    wait_until(lambda: not a.alive(), timeout=30,
                               what="A to exit (on-stuck-io=exit)")
                    assert "exiting (on-stuck-io=exit)" in a.stderr(), a.stderr()
                    with open(local_image.path, "rb") as f:
                        f.seek(off)
                        assert f.read(4096) == b"\xcc" * 4096
                    c.unlock(g["lock"])
                    c.bye()
                    return
                # A starts a new session in io0 (its main loop is still
                # held) and has a valid lease again: it says so once it has
                # taken the session over
                wait_until(lambda: "node 'xla': reconnected to coordinator" in a.stderr(),
                           timeout=30, what="A's new session after the heal")
                assert threads_writing(a.proc.pid, qfd), "the reread was not held"
                assert not n.replied(h)
                # the reread ends
                drain_fifo(rfd)
                fcntl.fcntl(rfd, F_SETPIPE_SZ, 1024 * 1024)
                drain_fifo(rfd)
                err, _ = n.wait(h, timeout=30)
                with open(local_image.path, "rb") as f:
                    f.seek(off)
                    data = f.read(4096)
                assert data == b"\xcc" * 4096, \
                    "A's held write landed on the extent C was granted"
                assert err != 0, "A's held write succeeded after C's grant"
                c.unlock(g["lock"])
                c.bye()
            assert a.alive(), a.stderr()
            assert "waited for a metadata reread" in a.stderr(), a.stderr()
    finally:
        os.close(wfd)
        os.close(rfd)
        link.close()
    check_coordinator(d)
