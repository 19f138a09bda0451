"""Persistent reservations enforced by the extlock driver in real QEMU.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

The reservation is made over the protocol by Python sessions that stand
for the other initiators (client-ids "host-a", "host-b"); the extlock
nodes in real qemu-io / qemu-storage-daemon processes, with images on the
loopback NFS export, must obey it: the I/O a reservation excludes fails
with EBADE ("Invalid exchange"), which scsi-hd reports to the guest as
RESERVATION CONFLICT (hw/scsi/scsi-disk-pr.c and the scsi-disk hunk of
the QEMU patch; the guest side is not tested here).  A live node gets
every change pushed and acknowledges it before the pr-out is answered.
"""

import socket

import pytest

from harness import procs as hp
from harness.coordinator import CoordinatorClient, coordinator_status
from harness.faults import TcpPartition
from harness.procs import extlock_node, run_qemu_io, wait_until

EBADE = "Invalid exchange"


class Initiator:
    """A Python session acting as one initiator (its client-id)."""

    def __init__(self, address, client_id, lock_space):
        self.c = CoordinatorClient(address)
        self.c.hello(client_id, lock_space, lease_ms=30000)
        self.state = self.c.call({"type": "pr-in"})

    def out(self, others, action, key=0, sa_key=0, pr_type=0):
        """A pr-out; the other subscribed Python initiators acknowledge
        the update (QEMU nodes do it themselves).  Returns the result."""
        rid = self.c.request({"type": "pr-out", "action": action,
                              "key": f"{key:x}", "sa-key": f"{sa_key:x}",
                              "pr-type": pr_type})
        for o in others:
            upd = o.next_update()
            o.c.call({"type": "pr-ack", "seq": upd["seq"]})
        r = self.c.reply(rid, timeout=20)
        assert r["type"] == "pr-result", r
        # our own copy of the update came before the result
        self.c.notifications = [n for n in self.c.notifications
                                if n.get("type") != "pr-update"]
        return r

    def next_update(self, timeout=10):
        while True:
            for i, n in enumerate(self.c.notifications):
                if n.get("type") == "pr-update":
                    return self.c.notifications.pop(i)
            msg = self.c._recv(timeout)
            if "id" in msg:
                self.c.pending.setdefault(msg["id"], []).append(msg)
            else:
                self.c.notifications.append(msg)

    def close(self):
        self.c.close()


def register_as(address, lock_space, client_id, key, others):
    """Register `key` for the I_T nexus `client_id` from a session of its
    own, which then ends (the registration stays)."""
    x = Initiator(address, client_id, lock_space)
    assert x.out(others, "register", sa_key=key)["result"] == "ok"
    x.c.bye()
    x.close()


class ResettingRelay(TcpPartition):
    """A TCP relay to the coordinator whose connections can be broken (both
    ends see them closed): the node behind it reconnects."""

    def reset(self):
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def session_of(extlockd, lock_space, client_id):
    for s in coordinator_status(extlockd.address)["sessions"]:
        if s["lock-space"] == lock_space and s["client-id"] == client_id:
            return s
    return None


def io(node, client_id, commands):
    node = dict(node, **{"client-id": client_id})
    r = run_qemu_io(node, commands)
    return r.stdout + r.stderr


@pytest.fixture
def pr_env(nfs_image, extlockd, lock_space, binaries):
    binaries("qemu-io")
    node = extlock_node(nfs_image.child, extlockd.coordinator(), lock_space,
                        node_name="xl0")
    a = Initiator(extlockd.address, "host-a", lock_space)
    b = Initiator(extlockd.address, "host-b", lock_space)
    yield node, a, b
    a.close()
    b.close()


def test_reservation_types_enforced(pr_env):
    """Write Exclusive, Exclusive Access and their Registrants Only
    variants: unregistered and registered nodes get what SPC-4 allows."""
    node, a, b = pr_env
    assert a.out([b], "register", sa_key=0xa)["result"] == "ok"
    assert b.out([a], "register", sa_key=0xb)["result"] == "ok"

    # no reservation: everybody reads and writes
    out = io(node, "host-c", ["write -P 0x11 0 4k", "read -P 0x11 0 4k"])
    assert "failed" not in out, out

    # Write Exclusive, held by host-a: others read, only the holder writes
    assert a.out([b], "reserve", key=0xa, pr_type=1)["result"] == "ok"
    out = io(node, "host-c", ["read -P 0x11 0 4k", "write -P 0x22 0 4k"])
    assert "read failed" not in out, out
    assert f"write failed: {EBADE}" in out, out
    out = io(node, "host-b", ["write -P 0x22 0 4k"])
    assert f"write failed: {EBADE}" in out, out
    out = io(node, "host-a", ["write -P 0x33 0 4k", "read -P 0x33 0 4k"])
    assert "failed" not in out, out

    # Write Exclusive - Registrants Only: registered host-b writes too
    assert a.out([b], "preempt", key=0xa, sa_key=0xa,
                 pr_type=5)["result"] == "ok"
    out = io(node, "host-b", ["write -P 0x44 0 4k", "read -P 0x44 0 4k"])
    assert "failed" not in out, out
    out = io(node, "host-c", ["read -P 0x44 0 4k", "write -P 0x55 0 4k"])
    assert "read failed" not in out, out
    assert f"write failed: {EBADE}" in out, out

    # Exclusive Access - Registrants Only: unregistered nodes cannot read
    assert a.out([b], "preempt", key=0xa, sa_key=0xa,
                 pr_type=6)["result"] == "ok"
    out = io(node, "host-c", ["read 0 4k"])
    assert f"read failed: {EBADE}" in out, out
    out = io(node, "host-b", ["read -P 0x44 0 4k"])
    assert "failed" not in out, out

    # CLEAR: everything allowed again
    assert b.out([a], "clear", key=0xb)["result"] == "ok"
    out = io(node, "host-c", ["write -P 0x66 0 4k", "read -P 0x66 0 4k"])
    assert "failed" not in out, out


def test_live_node_applies_pushed_state(pr_env, procs, nfs_image, extlockd,
                                        lock_space, binaries):
    """A running node (qemu-storage-daemon, client-id host-c) subscribes,
    gets each change pushed and acknowledges it before the pr-out that
    made it completes; its I/O obeys the new state at once."""
    node, a, b = pr_env
    binaries("qemu-storage-daemon")
    qsd = procs.storage_daemon(
        blockdevs=[dict(node, **{"client-id": "host-c"})],
        exports=[("disk", "xl0", True)])
    nbd = qsd.nbd_opts("disk")

    out = run_qemu_io(nbd, ["write -P 0x11 0 4k"])
    assert out.returncode == 0 and "failed" not in out.stdout, out

    # host-c's node is subscribed: a's pr-out completes only after it acked
    # (b acks in out(); if the node did not, the reply would not come
    # before its 30 s lease lapsed and out() times out after 20 s)
    assert a.out([b], "register", sa_key=0xa)["result"] == "ok"
    assert a.out([b], "reserve", key=0xa, pr_type=1)["result"] == "ok"
    r = run_qemu_io(nbd, ["read -P 0x11 0 4k", "write -P 0x22 0 4k"])
    text = r.stdout + r.stderr
    assert "read failed" not in text, text
    assert "write failed" in text, text

    assert a.out([b], "release", key=0xa, pr_type=1)["result"] == "ok"
    r = run_qemu_io(nbd, ["write -P 0x22 0 4k", "read -P 0x22 0 4k"])
    assert "failed" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_ack_waits_for_write_in_flight(pr_env, procs, nfs_image, extlockd,
                                       lock_space):
    """A node that loses write access acknowledges the change only once its
    writes in flight completed: a write of host-c suspended below its
    extlock node (blkdebug) keeps host-a's RESERVE from completing until
    it is resumed; host-c's next write conflicts."""
    from harness import procs as hp

    node, a, b = pr_env
    assert a.out([b], "register", sa_key=0xa)["result"] == "ok"
    c = procs.qemu_io(extlock_node(hp.blkdebug_child(nfs_image.child),
                                   extlockd.coordinator(), lock_space,
                                   node_name="xlc", client_id="host-c",
                                   lock_cache=False), name="host-c")
    assert c.cmd("break write_aio hold").strip() == ""
    c.cmd("aio_write -P 0x5a 0 4k")
    c.cmd("wait_break hold", timeout=20)

    rid = a.c.request({"type": "pr-out", "action": "reserve", "key": "a",
                       "pr-type": 1})
    upd = b.next_update()
    b.c.call({"type": "pr-ack", "seq": upd["seq"]})
    # host-c has applied the state but still has the write in flight
    with pytest.raises(TimeoutError):
        a.c.reply(rid, timeout=1.5)
    c.cmd("resume hold")
    r = a.c.reply(rid, timeout=20)
    assert r["type"] == "pr-result" and r["result"] == "ok", r
    out = c.cmd("aio_flush")
    assert "failed" not in out, out
    out = c.cmd("write -P 0x5b 0 4k")
    assert f"write failed: {EBADE}" in out, out
    c.quit()


def test_ack_after_reconnect_waits_for_write(pr_env, procs, nfs_image,
                                             extlockd, lock_space):
    """PREEMPT AND ABORT of host-c while a write of host-c is suspended
    below its extlock node (blkdebug): host-c's connection to the
    coordinator breaks and it resumes its session.  Asking for the state
    again (pr-in) is not an acknowledgement: host-a's command does not
    complete until the write was resumed and drained; then host-c's
    session is ended and its writes conflict.  (Before the fix the
    coordinator took host-c's pr-in after the reconnection as its
    acknowledgement, and the preemption completed with the write still
    in flight.)"""
    node, a, b = pr_env
    assert a.out([b], "register", sa_key=0xa)["result"] == "ok"
    assert b.out([a], "register", sa_key=0xb)["result"] == "ok"
    register_as(extlockd.address, lock_space, "host-c", 0xc, [a, b])
    assert a.out([b], "reserve", key=0xa, pr_type=5)["result"] == "ok"

    relay = ResettingRelay(extlockd.tcp_port)
    try:
        c = procs.qemu_io(extlock_node(hp.blkdebug_child(nfs_image.child),
                                       relay.coordinator(), lock_space,
                                       node_name="xlc", client_id="host-c",
                                       lock_cache=False), name="host-c")
        # registered under Write Exclusive - Registrants Only: it writes
        out = c.cmd("write -P 0x11 0 4k")
        assert "failed" not in out, out
        assert c.cmd("break write_aio hold").strip() == ""
        c.cmd("aio_write -P 0x5a 0 4k")
        c.cmd("wait_break hold", timeout=20)

        rid = a.c.request({"type": "pr-out", "action": "preempt-and-abort",
                           "key": "a", "sa-key": "c", "pr-type": 5})
        upd = b.next_update()
        b.c.call({"type": "pr-ack", "seq": upd["seq"]})
        seq = upd["seq"]
        # host-c applied it but holds its ack back: the write is in flight
        with pytest.raises(TimeoutError):
            a.c.reply(rid, timeout=1.0)

        before = relay.connections
        relay.reset()
        wait_until(lambda: relay.connections > before, timeout=20,
                   what="host-c to reconnect")
        wait_until(lambda: (session_of(extlockd, lock_space, "host-c") or
                            {}).get("state") == "active",
                   timeout=20, what="host-c's session to resume")
        # it got the state again (welcome push, pr-in) and still has the
        # write in flight: no acknowledgement, no result
        with pytest.raises(TimeoutError):
            a.c.reply(rid, timeout=2.0)
        assert session_of(extlockd, lock_space, "host-c")["pr-acked"] < seq

        c.cmd("resume hold")
        r = a.c.reply(rid, timeout=20)
        assert r["type"] == "pr-result" and r["result"] == "ok", r
        out = c.cmd("aio_flush")
        assert "failed" not in out, out
        # preempted: no longer registered, its writes conflict
        out = c.cmd("write -P 0x5b 0 4k")
        assert "write failed" in out, out
        c.quit()
    finally:
        relay.close()


def test_qmp_reservation_view_and_events(pr_env, procs, extlockd,
                                         lock_space, binaries):
    """query-extent-locks shows the reservation the node applied, and
    every change it applies is an EXTENT_LOCK_RESERVATION_CHANGED event."""
    node, a, b = pr_env
    binaries("qemu-storage-daemon")
    qsd = procs.storage_daemon(
        blockdevs=[dict(node, **{"client-id": "host-c"})],
        exports=[("disk", "xl0", True)])

    def view():
        return qsd.qmp.execute("query-extent-locks",
                               {"node-name": "xl0"})[0]["reservation"]

    def event(seq):
        ev = qsd.qmp.wait_event(
            "EXTENT_LOCK_RESERVATION_CHANGED", timeout=20,
            match=lambda e: e["data"]["reservation"]["seq"] == seq)
        assert ev["data"]["node-name"] == "xl0"
        return ev["data"]["reservation"]

    r = wait_until(lambda: (lambda v: v if v else None)(
        qsd.qmp.execute("query-extent-locks",
                        {"node-name": "xl0"})[0].get("reservation")),
        timeout=10, what="the node to get the reservation state")
    assert r == {"seq": 0, "generation": 0, "type": 0,
                 "registered-keys": 0, "may-read": True, "may-write": True,
                 "conflicts": 0}, r

    seq = a.out([b], "register", sa_key=0xa)["seq"]
    r = event(seq)
    assert r["generation"] == 1 and r["registered-keys"] == 1, r
    assert "key" not in r and "holder" not in r, r

    seq = a.out([b], "reserve", key=0xa, pr_type=1)["seq"]
    r = event(seq)
    assert (r["type"], r["holder"], r["may-read"], r["may-write"]) == \
        (1, "host-a", True, False), r
    assert view() == r

    # the node's own registration shows its key
    register_as(extlockd.address, lock_space, "host-c", 0xfedcba9876543210,
                [a, b])
    r = wait_until(lambda: (lambda v: v if "key" in v else None)(view()),
                   timeout=10, what="host-c's key in the view")
    assert r["key"] == 0xfedcba9876543210 and r["registered-keys"] == 2, r
    assert r["may-write"] is False, r       # Write Exclusive: holder only

    # a refused write is counted
    nbd = qsd.nbd_opts("disk")
    out = run_qemu_io(nbd, ["write -P 0x22 0 4k"])
    assert "write failed" in out.stdout + out.stderr
    assert view()["conflicts"] >= 1

    seq = a.out([b], "clear", key=0xa)["seq"]
    r = event(seq)
    assert (r["type"], r["registered-keys"], r["may-write"]) == \
        (0, 0, True), r
    assert "key" not in r and "holder" not in r, r
