"""Safety under faults: no lock is used after it may have been re-granted.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

docs/qemu-driver.rst, "Leases and fencing" and "Requests in flight".  The
tests hold a request below an extlock node with a blkdebug breakpoint
(qemu-system-x86_64 -M none, HMP qemu-io), so that it is in flight under
its lock for as long as the test wants, and then break the node's lease or
session around it:

* a lock that was lost while requests used it is "stale": it serves no new
  request (not after a resumed session, not after a new one), and its id
  is not confused with the ids of a new session's locks;
* a stale lock the coordinator still holds (the session was resumed, or
  its locks reclaimed) is given back only after its last request is done;
* with lock-cache=off, a lock whose request finished while the
  connection was down is given back on reconnection, not parked;
* zero-length requests need no lock;
* a read through an NBD export is one request under one lock, with
  structured replies too;
* a request still in flight when the coordinator may re-grant its locks
  makes the process exit (on-stuck-io=exit) before that time, or is only
  reported (report).

All times are CLOCK_MONOTONIC (time.monotonic(), QEMU_CLOCK_REALTIME and
extlockd's clock).
"""

import os
import socket
import threading
import time

import pytest

from harness import procs as hp
from harness.coordinator import CoordinatorClient, coordinator_status
from harness.faults import (NbdClient, TcpPartition, check_coordinator,
                            check_event, counters, diagnose, fresh_lease, node_info,
                            start_coordinator)
from harness.procs import extlock_node, wait_until

KiB = 1024
MiB = 1024 * KiB
IMAGE = 64 * MiB

LOST = "EXTENT_LOCK_COORDINATOR_LOST"
RESTORED = "EXTENT_LOCK_COORDINATOR_RESTORED"
LEASE_LOST = "EXTENT_LOCK_LEASE_LOST"

# The holders keep a request in flight past their lease on purpose: they
# must only report it.  Set EXTLOCK_TEST_NO_STUCK_OPTION=1 to run the
# tests against a driver that predates on-stuck-io (to show them failing).
REPORT = ({} if os.environ.get("EXTLOCK_TEST_NO_STUCK_OPTION")
          else {"on_stuck_io": "report"})


@pytest.fixture
def coord(procs, binaries):
    binaries("extlockd", "qemu-io")
    made = []

    def start(**kw):
        d = start_coordinator(procs, name=f"extlockd{len(made)}", **kw)
        made.append(d)
        return d
    yield start
    for d in made:
        check_coordinator(d)


class Holder:
    """qemu-system-x86_64 -M none with an extlock node over raw -> blkdebug
    -> image; HMP qemu-io drives I/O (aio_* return at once) and blkdebug
    breakpoints suspend requests below the extlock node."""

    def __init__(self, procs, name, image, coordinator, lock_space, client_id,
                 **opts):
        self.node = f"xl{name}"
        self.drive = f"drv{name}"
        drive = hp.dotted(extlock_node(hp.blkdebug_child(image.child), coordinator,
                                       lock_space, node_name=self.node,
                                       client_id=client_id, **opts))
        self.vm = procs.qemu_system(name=name,
                                    extra_args=["-drive", f"if=none,id={self.drive},{drive}"])
        self.qmp = self.vm.qmp

    def io(self, cmd):
        out = self.qmp.hmp(f'qemu-io {self.drive} "{cmd}"')
        assert "error" not in out.lower() and "failed" not in out.lower(), out
        return out

    def hold(self, cmd, tag="hold", event="write_aio"):
        """Start `cmd` (an aio_* command) and suspend it below the node."""
        self.io(f"break {event} {tag}")
        self.io(cmd)
        self.io(f"wait_break {tag}")

    def held(self):
        return [(h["offset"], h["length"], h["mode"], h["state"], h["in-flight"])
                for h in node_info(self.qmp)["held"]]


def qsd(procs, name, child, coordinator, lock_space, client_id, node="xl0", **opts):
    return procs.storage_daemon(
        name=name,
        blockdevs=[extlock_node(child, coordinator, lock_space, node_name=node,
                                client_id=client_id, **opts)],
        exports=[("disk", node, True)])


def queued(qmp):
    return [w for w in node_info(qmp)["waiting"] if "token" in w]


def session_of(daemon, client_id):
    for s in coordinator_status(daemon.address)["sessions"]:
        if s["client-id"] == client_id and s["state"] != "expired":
            return s
    return None


def pattern(data, length):
    return bytes([data]) * length


class ResettableRelay(TcpPartition):
    """TcpPartition that can also break the connections it carries (both
    ends see the connection closed), as a reset would."""

    def reset(self):
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def lose_lease_to_restarted_coordinator(d, holder, lease):
    """Kill the coordinator, wait until the holder's lease is lost, and
    start the coordinator afresh (no state: the holder's session is gone,
    lock ids start again at 1).  Returns when the holder has a new
    session."""
    old = node_info(holder.qmp)["session"]
    d.kill()
    wait_until(lambda: node_info(holder.qmp)["state"] == "lease-lost",
               timeout=lease / 1000 + 5, what="the holder to lose its lease")
    d.state_file.unlink(missing_ok=True)
    d.start()
    ev = holder.qmp.wait_event(RESTORED, timeout=15)
    r = check_event(ev, RESTORED, node_name=holder.node, resumed=False)
    assert r["session"] != old
    wait_until(lambda: node_info(holder.qmp)["state"] == "active", timeout=5,
               what="the holder's new session")


# ---------------------------------------------------------------------------
# 1. stale locks are never served from the cache

def test_stale_lock_not_served_after_new_session(local_image, coord, lock_space, procs):
    """A's read is suspended under its (grown, shared) lock when A loses its
    lease: the coordinator dies and comes back without state, so A gets a
    new session and its old lock means nothing any more.  B then holds
    the whole image.  A's next read, inside A's old lock, must get a lock
    from the coordinator (B's lock is revoked for it), not be served from
    the old lock."""
    lease = 2000
    d = coord()
    a = Holder(procs, "a", local_image, d.coordinator(), lock_space, "host-a",
               lease_time=lease, **REPORT)
    a.hold("aio_read 0 64k", event="read_aio")
    assert a.held() == [(0, IMAGE, "shared", "active", 1)]

    lose_lease_to_restarted_coordinator(d, a, lease)

    b = qsd(procs, "b", local_image.child, d.coordinator(), lock_space, "host-b")
    with NbdClient(b.nbd_path, "disk") as nb:
        nb.write(32 * MiB, pattern(0xbb, 64 * KiB))
    assert [(h["offset"], h["length"], h["mode"]) for h in node_info(b.qmp)["held"]] == \
        [(0, IMAGE, "exclusive")]

    before = counters(a.qmp)
    a.io("aio_read 16M 64k")
    after = wait_until(lambda: (lambda c: c if c["grants"] > before["grants"] else None)(
        counters(a.qmp)), timeout=10,
        what="A's read to get a lock of its own (not the stale one)")
    assert after["cache-hits"] == before["cache-hits"], (before, after)
    assert counters(b.qmp)["revocations"] >= 1
    # the old lock is still listed, as stale, with the suspended read
    assert (0, IMAGE, "shared", "stale", 1) in a.held(), a.held()
    a.io("resume hold")
    wait_until(lambda: all(h[3] != "stale" for h in a.held()), timeout=10,
               what="the stale lock to be forgotten")


# ---------------------------------------------------------------------------
# 4. a stale lock's id does not clash with a new session's lock ids

def test_stale_lock_id_not_confused_with_new_lock(local_image, coord, lock_space, procs):
    """As above, A's read is suspended under lock 1 of the old coordinator
    when A's session is lost.  In the new session A writes: the restarted
    coordinator numbers locks from 1 again, so A's new (exclusive) lock
    has the stale lock's id.  When the suspended read completes and the
    stale lock is dropped, the new lock must stay known: B's write, for
    which the coordinator revokes A's new lock, must get through."""
    lease = 2000
    d = coord()
    a = Holder(procs, "a", local_image, d.coordinator(), lock_space, "host-a",
               lease_time=lease, **REPORT)
    a.hold("aio_read 0 64k", event="read_aio")
    lose_lease_to_restarted_coordinator(d, a, lease)

    before = counters(a.qmp)["grants"]
    a.io("aio_write -P 0xa1 16M 64k")
    wait_until(lambda: counters(a.qmp)["grants"] > before, timeout=10,
               what="A's write to get a new lock")
    wait_until(lambda: local_image.path.read_bytes()[16 * MiB:16 * MiB + 64 * KiB] ==
               pattern(0xa1, 64 * KiB), timeout=10, what="A's write to land")
    a.io("resume hold")
    wait_until(lambda: all(h[3] != "stale" for h in a.held()), timeout=10,
               what="the stale lock to be forgotten")
    assert [(h[0], h[1], h[2]) for h in a.held()] == [(0, IMAGE, "exclusive")]

    b = qsd(procs, "b", local_image.child, d.coordinator(), lock_space, "host-b")
    with NbdClient(b.nbd_path, "disk") as nb:
        h = nb.send_write(16 * MiB, pattern(0xbb, 64 * KiB))
        try:
            err, _ = nb.wait(h, timeout=10)
        except TimeoutError:
            pytest.fail("B starved: A ignored the revocation of its new lock\n" +
                        diagnose(d, lock_space, {"a": a.vm, "b": b}))
        assert err == 0
    assert counters(a.qmp)["revocations"] >= 1
    assert local_image.path.read_bytes()[16 * MiB:16 * MiB + 64 * KiB] == \
        pattern(0xbb, 64 * KiB)


# ---------------------------------------------------------------------------
# 2. (and 1) a resumed session gives a stale lock back only when it is unused

def test_resumed_session_keeps_lock_until_request_done(local_image, coord, lock_space,
                                                       procs):
    """A's write is suspended under its (grown, exclusive) lock; B's write
    to the same range waits behind it.  A's link to the coordinator is cut
    right after a renewal until A's own lease deadline has passed (A
    reports LEASE_LOST; its lock is stale), then healed before the
    coordinator's deadline for the session (A's deadline + m), so A resumes
    its session, which still holds the lock.  The coordinator must not
    re-grant the range while A's write is in flight: A gives the lock back
    only when the write is done, and B's write lands after A's.  A's new
    requests in the meantime are not served by the stale lock: they queue
    at the coordinator."""
    # the coordinator resumes a session only before its own deadline for
    # it, at least the client margin m (1 s here) after A's deadline
    lease = 10000
    d = coord()
    link = TcpPartition(d.tcp_port)
    try:
        a = Holder(procs, "a", local_image, link.coordinator(), lock_space, "host-a",
                   lease_time=lease, **REPORT)
        a.hold("aio_write -P 0xaa 0 64k")
        assert a.held() == [(0, IMAGE, "exclusive", "active", 1)]
        session = node_info(a.qmp)["session"]
        b = qsd(procs, "b", local_image.child, d.coordinator(), lock_space, "host-b")
        with NbdClient(b.nbd_path, "disk") as nb:
            hb = nb.send_write(0, pattern(0xbb, 64 * KiB))
            w = wait_until(lambda: queued(b.qmp), timeout=10, what="B's write to queue")
            assert w[0]["blocked-by"] == ["host-a"], w

            a.qmp.poll_events(0)
            a.qmp.events.clear()
            fresh_lease(a.qmp, lease)
            link.cut()
            a.qmp.wait_event(LEASE_LOST, timeout=lease / 1000 + 2)
            link.heal()
            ev = a.qmp.wait_event(RESTORED, timeout=5)
            check_event(ev, RESTORED, node_name=a.node, resumed=True, session=session)
            assert not nb.replied(hb, timeout=0.5), \
                "B was granted while A's write was in flight under the resumed lock"

            # A's new write inside the stale lock asks the coordinator
            a.io("aio_write -P 0xa1 1M 64k")
            wait_until(lambda: [x for x in queued(a.qmp) if x["offset"] == 1 * MiB],
                       timeout=10, what="A's new write to queue at the coordinator")
            assert a.held() == [(0, IMAGE, "exclusive", "stale", 1)], a.held()
            assert not nb.replied(hb, timeout=0.2), \
                "B was granted while A's write was in flight under the resumed lock"
            assert local_image.path.read_bytes()[:64 * KiB] == bytes(64 * KiB)

            a.io("resume hold")
            err, _ = nb.wait(hb, timeout=10)
            assert err == 0
        wait_until(lambda: local_image.path.read_bytes()[1 * MiB:1 * MiB + 64 * KiB] ==
                   pattern(0xa1, 64 * KiB), timeout=10, what="A's new write to land")
        assert local_image.path.read_bytes()[:64 * KiB] == pattern(0xbb, 64 * KiB)
        assert all(h[3] != "stale" for h in a.held()), a.held()
    finally:
        link.close()


# ---------------------------------------------------------------------------
# a resumed session keeps its cached locks (and answers their revocations)

def test_resumed_session_keeps_cached_locks(local_image, coord, lock_space, procs):
    """A caches a lock when its coordinator connection breaks (a reset, no
    lease trouble); it resumes its session, whose welcome lists the lock.
    A must still know the lock: use it without asking the coordinator, and
    give it back when B's write makes the coordinator revoke it."""
    d = coord()
    link = ResettableRelay(d.tcp_port)
    try:
        a = qsd(procs, "a", local_image.child, link.coordinator(), lock_space,
                "host-a", node="xla")
        with NbdClient(a.nbd_path, "disk") as na:
            na.write(0, pattern(0xaa, 64 * KiB))
            token = node_info(a.qmp)["held"][0]["token"]
            session = node_info(a.qmp)["session"]
            a.qmp.poll_events(0)
            a.qmp.events.clear()
            link.reset()
            ev = a.qmp.wait_event(RESTORED, timeout=15)
            check_event(ev, RESTORED, node_name="xla", resumed=True, session=session)
            info = node_info(a.qmp)
            assert [(h["offset"], h["length"], h["token"], h["state"])
                    for h in info["held"]] == [(0, IMAGE, token, "cached")], info
            req = info["counters"]["requests"]
            na.write(64 * KiB, pattern(0xa1, 64 * KiB))
            assert counters(a.qmp)["requests"] == req

        b = qsd(procs, "b", local_image.child, d.coordinator(), lock_space, "host-b")
        with NbdClient(b.nbd_path, "disk") as nb:
            try:
                nb.write(0, pattern(0xbb, 64 * KiB), timeout=10)
            except TimeoutError:
                pytest.fail("B starved: A ignored the revocation of its resumed lock\n" +
                            diagnose(d, lock_space, {"a": a, "b": b}))
        assert counters(a.qmp)["revocations"] >= 1
        assert local_image.path.read_bytes()[:128 * KiB] == \
            pattern(0xbb, 64 * KiB) + pattern(0xa1, 64 * KiB)
    finally:
        link.close()


# ---------------------------------------------------------------------------
# 5. lock-cache=off: a lock released while disconnected is given back

def test_cache_off_lock_given_back_after_reconnect(local_image, coord, lock_space, procs):
    """A (lock-cache=off) has a write suspended under its lock when its
    coordinator connection breaks; the write completes while A cannot
    reconnect.  Once A has resumed its session it must give the lock back
    at once (the coordinator sends no revocations to a node that does not
    cache): B's write to the range gets through without waiting for A's
    lock-cache-idle-time (60 s)."""
    d = coord()
    link = ResettableRelay(d.tcp_port)
    try:
        a = Holder(procs, "a", local_image, link.coordinator(), lock_space, "host-a",
                   lock_cache=False, **REPORT)
        a.hold("aio_write -P 0xaa 0 64k")
        assert a.held() == [(0, 64 * KiB, "exclusive", "active", 1)]
        a.qmp.poll_events(0)
        a.qmp.events.clear()
        link.cut()
        link.reset()
        a.qmp.wait_event(LOST, timeout=10)
        a.io("resume hold")
        wait_until(lambda: local_image.path.read_bytes()[:64 * KiB] ==
                   pattern(0xaa, 64 * KiB), timeout=10, what="A's write to land")
        wait_until(lambda: all(h[4] == 0 for h in a.held()), timeout=5,
                   what="A's write to complete")
        link.heal()
        ev = a.qmp.wait_event(RESTORED, timeout=15)
        check_event(ev, RESTORED, node_name=a.node, resumed=True)
        wait_until(lambda: a.held() == [], timeout=5,
                   what="A to give its lock back after reconnecting")

        b = qsd(procs, "b", local_image.child, d.coordinator(), lock_space, "host-b")
        with NbdClient(b.nbd_path, "disk") as nb:
            nb.write(0, pattern(0xbb, 64 * KiB), timeout=10)
        assert counters(b.qmp)["waits"] == 0
        assert local_image.path.read_bytes()[:64 * KiB] == pattern(0xbb, 64 * KiB)
    finally:
        link.close()


# ---------------------------------------------------------------------------
# 6. zero-length requests

@pytest.mark.parametrize("lock_cache", [True, False])
def test_zero_length_requests(lock_cache, local_image, coord, lock_space, procs):
    """Zero-length reads, writes, write-zeroes and discards touch nothing:
    they complete without a lock (the coordinator has no empty locks and
    would refuse one, which used to fail them with EIO)."""
    d = coord()
    node = extlock_node(local_image.child, d.coordinator(), lock_space,
                        node_name="xl0", client_id="host-a", lock_cache=lock_cache)
    cmds = ["write 0 0", "read 0 0", "write -z 0 0", "discard 0 0",
            "write 64k 0", "aio_write 4k 0", "aio_read 8k 0", "aio_flush",
            "write -P 0x5a 0 4k", "read -P 0x5a 0 4k"]
    r = hp.run_qemu_io(node, cmds, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "error" not in out.lower() and "failed" not in out.lower(), out
    assert local_image.path.read_bytes()[:4 * KiB] == pattern(0x5a, 4 * KiB)


# ---------------------------------------------------------------------------
# trace events around every forwarded request (INTERFACES.md)

def test_io_trace_events(local_image, coord, lock_space):
    """extlock_io_start/extlock_io_done surround every request forwarded to
    the child, with its kind, range and the token of the lock it runs
    under (the token granted by the coordinator; 0 for flushes and
    zero-length requests), and CLOCK_MONOTONIC timestamps."""
    d = coord()
    node = extlock_node(local_image.child, d.coordinator(), lock_space,
                        node_name="xl0", client_id="host-a", lock_cache=False)
    cmds = ["write -P 0x11 0 64k", "read -P 0x11 0 64k", "write -z 64k 64k",
            "discard 128k 64k", "flush", "write 1M 0"]
    t0 = time.monotonic_ns()
    r = hp.run_qemu_io(node, cmds, timeout=60,
                       extra_args=["-d", "unmap", "-T", "extlock_io_*",
                                   "-T", "extlock_client_granted"])
    t1 = time.monotonic_ns()
    assert r.returncode == 0, r.stdout + r.stderr
    starts, dones, granted = [], [], []
    for line in r.stderr.splitlines():
        f = line.split()
        if "extlock_io_start" in line:
            i = f.index("node")
            starts.append((f[i + 2], int(f[i + 4]), int(f[i + 6]), int(f[i + 8]),
                           int(f[i + 10], 16), int(f[i + 12])))
        elif "extlock_io_done" in line:
            i = f.index("node")
            dones.append((f[i + 2], int(f[i + 4]), int(f[i + 6]), int(f[i + 8], 16),
                          int(f[i + 10]), int(f[i + 12])))
        elif "extlock_client_granted" in line:
            granted.append(int(f[-1], 16))
    kinds = [s[0] for s in starts]
    # (qemu-io also flushes after each command and at the end)
    assert [k for k in kinds if k != "flush"] == \
        ["write", "read", "zero", "discard", "write"], r.stderr
    assert "flush" in kinds, r.stderr
    assert len(dones) == len(starts), r.stderr
    # lock-cache=off: one grant per request with data, in order
    assert len(granted) == 4 and all(granted), granted
    expect = iter(granted)
    for s, dn in zip(starts, dones):
        kind, off, nbytes, lock_id, token, ts = s
        tok = next(expect) if kind != "flush" and nbytes else 0
        assert (dn[0], dn[1], dn[2], dn[3]) == (kind, off, nbytes, token), (s, dn)
        assert dn[4] == 0, dn
        assert token == tok, (s, granted)
        assert (lock_id != 0) == (token != 0), s
        assert t0 <= ts <= dn[5] <= t1, (t0, s, dn, t1)


# ---------------------------------------------------------------------------
# 7. a read through an NBD export is atomic

@pytest.mark.parametrize("replies", ["structured", "simple"])
def test_nbd_read_is_atomic(replies, local_image, coord, lock_space, procs, workdir):
    """B exports its extlock node over NBD; a client reads [0, 2M) while
    A writes the same 2 MiB.  The read is suspended (blkdebug, below B's
    node) before A's write reaches the coordinator, so A's write must wait
    for the whole read and the read must return only old data.  With
    structured replies (QEMU's and libnbd's default) the NBD server serves
    a read from block status: it must not split the read into several
    requests under several locks, between which A's write could land."""
    d = coord()
    with open(local_image.path, "r+b") as f:
        f.write(pattern(0xaa, 2 * MiB))
    b = Holder(procs, "b", local_image, d.coordinator(), lock_space, "host-b")
    nbd_path = workdir / "b-nbd.sock"
    b.qmp.execute("nbd-server-start",
                  addr={"type": "unix", "data": {"path": str(nbd_path)}})
    b.qmp.execute("block-export-add", type="nbd", id="disk", args={
        "node-name": b.node, "name": "disk", "writable": True})
    a = qsd(procs, "a", local_image.child, d.coordinator(), lock_space, "host-a")

    b.io("break read_aio r")
    if replies == "structured":
        reader = hp.start_qemu_io(
            {"driver": "nbd", "export": "disk",
             "server": {"type": "unix", "path": str(nbd_path)}},
            ["read -P 0xaa 0 2M"], workdir / "reader.out", workdir / "reader.err")
        simple = None
    else:
        reader = None
        simple = NbdClient(nbd_path, "disk")
        hr = simple.send_read(0, 2 * MiB)
    try:
        # not HMP wait_break: it polls only B's block AioContext, and the NBD
        # server accepts connections from the main loop
        wait_until(lambda: "Suspended request 'r'" in b.vm.stderr(), timeout=20,
                   what="B's read to reach the breakpoint")
        with NbdClient(a.nbd_path, "disk") as na:
            ha = na.send_write(0, pattern(0xbb, 2 * MiB))
            wait_until(lambda: queued(a.qmp), timeout=10, what="A's write to queue")
            b.io("resume r")
            if reader is not None:
                reader.wait(timeout=30)
                out = (workdir / "reader.out").read_text()
                assert reader.returncode == 0, out
                assert "Pattern verification failed" not in out, \
                    "the NBD read saw part of A's write:\n" + out
            else:
                err, data = simple.wait(hr, timeout=30)
                assert err == 0
                assert data == pattern(0xaa, 2 * MiB), "the NBD read saw part of A's write"
            err, _ = na.wait(ha, timeout=30)
            assert err == 0
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait()
        if simple is not None:
            simple.close()
    assert local_image.path.read_bytes()[:2 * MiB] == pattern(0xbb, 2 * MiB)


# ---------------------------------------------------------------------------
# the in-flight bound: on-stuck-io

@pytest.mark.parametrize("policy", ["exit", "report"])
def test_stuck_request_past_lease(policy, local_image, coord, lock_space, procs):
    """A's write is suspended below its node when A's link to the
    coordinator is cut, right after a renewal.  The coordinator may give
    A's locks to B from its own deadline for A's session plus its fence
    margin on (lower bound R from its status: lease-remaining-ms of A's
    session, read after the cut, plus fence-margin-ms).  With
    on-stuck-io=exit, A must have exited before R; with report it keeps
    running and says so."""
    lease, fence = 4000, 2000
    d = coord(fence_margin_ms=fence)
    link = TcpPartition(d.tcp_port)
    try:
        opts = {} if policy == "exit" else REPORT
        a = Holder(procs, "a", local_image, link.coordinator(), lock_space, "host-a",
                   lease_time=lease, **opts)
        a.hold("aio_write -P 0xaa 0 64k")
        b = qsd(procs, "b", local_image.child, d.coordinator(), lock_space, "host-b")
        exited = {}

        def watch():
            a.vm.proc.wait()
            exited["t"] = time.monotonic()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()

        with NbdClient(b.nbd_path, "disk") as nb:
            hb = nb.send_write(0, pattern(0xbb, 64 * KiB))
            wait_until(lambda: queued(b.qmp), timeout=10, what="B's write to queue")
            t_q, remaining = fresh_lease(a.qmp, lease)
            link.cut()
            t_s = time.monotonic()
            st = coordinator_status(d.address)
            sess = [s for s in st["sessions"] if s["client-id"] == "host-a"][0]
            release = t_s + sess["lease-remaining-ms"] / 1000 + st["fence-margin-ms"] / 1000
            own_deadline = t_q + remaining / 1000

            err, _ = nb.wait(hb, timeout=(lease + fence) / 1000 + 10)
            t_b = time.monotonic()
            assert err == 0
            assert t_b >= release
            if policy == "exit":
                watcher.join(timeout=5)
                assert "t" in exited, "A did not exit with its write stuck past the lease"
                assert exited["t"] < release, (exited["t"] - release)
                assert exited["t"] >= own_deadline
                assert a.vm.proc.returncode == 1
                assert "exiting (on-stuck-io=exit)" in a.vm.stderr()
                a.vm.killed = True
            else:
                assert a.vm.alive(), a.vm.stderr()
                assert "on-stuck-io=report" in a.vm.stderr()
                a.io("resume hold")
        if policy == "exit":
            # the suspended write never reached the image
            assert local_image.path.read_bytes()[:64 * KiB] == pattern(0xbb, 64 * KiB)
    finally:
        link.close()


# ---------------------------------------------------------------------------
# fence-status notifications become EXTENT_LOCK_FENCE (needs an extlockd
# with --fence-agent, from the daemon work of the same issue)

FENCE = "EXTENT_LOCK_FENCE"


@pytest.mark.parametrize("agent_ok", [True, False])
def test_fence_status_event(agent_ok, local_image, coord, lock_space, procs, workdir):
    """A protocol client holds an exclusive lock and disappears without
    "bye"; B's write waits behind it.  When the session expires the
    coordinator runs its fence agent and tells B how it goes: B's node
    emits EXTENT_LOCK_FENCE (started, then succeeded or failed, with the
    expired client's id).  A successful agent releases the lock: B's
    write completes; a failing one keeps it held."""
    agent = workdir / "agent.sh"
    agent.write_text("#!/bin/sh\ncat > /dev/null\n" +
                     ("exit 0\n" if agent_ok else "echo no power switch >&2\nexit 1\n"))
    agent.chmod(0o755)
    d = coord(fence_margin_ms=200,
              extra_args=["--fence-agent", str(agent), "--fence-timeout-ms", "5000"])
    holder = CoordinatorClient(d.address)
    # the holder never renews: its lease must outlast B's start and queued
    # write (at 1 s it lapsed before B's request reached the coordinator
    # once under load, and B saw only "failed"), then end after close()
    holder.hello("python-holder", lock_space, lease_ms=5000)
    holder.lock(0, 64 * KiB, "exclusive")
    b = qsd(procs, "b", local_image.child, d.coordinator(), lock_space, "host-b")
    with NbdClient(b.nbd_path, "disk") as nb:
        h = nb.send_write(0, pattern(0xbb, 64 * KiB))
        wait_until(lambda: queued(b.qmp), timeout=10, what="B's write to queue")
        holder.close()                      # gone without bye
        ev = b.qmp.wait_event(FENCE, timeout=15)
        check_event(ev, FENCE, node_name="xl0", client_id="python-holder",
                    result="started")
        ev = b.qmp.wait_event(FENCE, timeout=15)
        data = check_event(ev, FENCE, node_name="xl0", client_id="python-holder",
                           result="succeeded" if agent_ok else "failed")
        if agent_ok:
            err, _ = nb.wait(h, timeout=10)
            assert err == 0
        else:
            assert data.get("message"), ev
            assert not nb.replied(h, timeout=0.5), "granted although fencing failed"
