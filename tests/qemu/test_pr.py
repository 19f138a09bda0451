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

import pytest

from harness.coordinator import CoordinatorClient
from harness.procs import extlock_node, run_qemu_io

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
