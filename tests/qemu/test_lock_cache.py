"""The extlock node's lock cache (lock-cache=on, the default).

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

With the lock cache a node keeps a lock after the requests that needed it
complete, so that later requests on the same range need no coordinator
round trip.  Another client that wants a conflicting lock makes the
coordinator revoke it (or downgrade an exclusive lock to shared for a
reader); the node gives it back once its requests on it are done.  These
tests check that the cache saves round trips, shows up correctly in
query-extent-locks and the coordinator, and that another process is never
starved by or served stale data because of a cached lock.
"""

import time

from harness import procs as hp
from harness.coordinator import coordinator_status
from harness.procs import extlock_node, wait_until

KiB = 1024


def qsd_with_node(procs, image, extlockd, lock_space, client_id, name, **kw):
    return procs.storage_daemon(
        name=name,
        blockdevs=[extlock_node(image.child, extlockd.coordinator(), lock_space,
                                node_name="xl0", client_id=client_id, **kw)],
        exports=[("disk", "xl0", True)])


def held_in_coordinator(extlockd, lock_space, client_id):
    for space in coordinator_status(extlockd.address)["lock-spaces"]:
        if space["name"] == lock_space:
            return [h for h in space["held"] if h["client-id"] == client_id]
    return []


def test_cached_locks_single_process(nfs_image, extlockd, lock_space, procs,
                                     binaries):
    """Repeated I/O on the same range is served from cached locks; the
    cached locks are listed with state "cached" and no request in flight,
    the coordinator holds them for the client, and closing the node gives
    them all back."""
    binaries("qemu-io", "qemu-storage-daemon")
    qsd = qsd_with_node(procs, nfs_image, extlockd, lock_space, "cacher", "a")
    cmds = []
    for _ in range(4):
        cmds += [f"write -P 0x61 {i * 64 * KiB} 64k" for i in range(8)]
        cmds += [f"read -P 0x61 {i * 64 * KiB} 64k" for i in range(8)]
    r = hp.run_qemu_io(qsd.nbd_opts("disk"), cmds)
    assert r.returncode == 0, r.stdout + r.stderr

    info = qsd.qmp.execute("query-extent-locks")[0]
    assert info["lock-cache"] is True
    c = info["counters"]
    assert c["cache-hits"] > 0, c
    assert c["requests"] + c["cache-hits"] >= len(cmds), c
    assert c["requests"] < len(cmds), c       # round trips were saved
    assert info["held"], "nothing cached"
    for h in info["held"]:
        assert h["state"] == "cached" and h["in-flight"] == 0, h
    # everything written is covered by the cached locks
    covered = sorted((h["offset"], h["offset"] + h["length"]) for h in info["held"])
    pos = 0
    for start, end in covered:
        if start <= pos:
            pos = max(pos, end)
    assert pos >= 512 * KiB, covered
    assert any(h["mode"] == "exclusive" for h in info["held"])

    coord = held_in_coordinator(extlockd, lock_space, "cacher")
    assert sorted((h["offset"], h["length"], h["mode"]) for h in coord) == \
        sorted((h["offset"], h["length"], h["mode"]) for h in info["held"])

    qsd.stop()                                   # closes the node: bye
    wait_until(lambda: not held_in_coordinator(extlockd, lock_space, "cacher"),
               timeout=5, what="the cached locks to be released at close")


def test_cached_lock_revoked_for_another_process(nfs_image, extlockd, lock_space,
                                                procs, binaries):
    """A writes a range and keeps its exclusive lock cached.  B reading it
    must not wait for A's cache to expire: the coordinator revokes (or
    downgrades) A's lock, B gets A's data.  Then A writes again: B's cached
    shared lock is revoked in turn and B reads the new data."""
    binaries("qemu-io", "qemu-storage-daemon")
    a = qsd_with_node(procs, nfs_image, extlockd, lock_space, "host-a", "a")
    b = qsd_with_node(procs, nfs_image, extlockd, lock_space, "host-b", "b")

    r = hp.run_qemu_io(a.nbd_opts("disk"), ["write -P 0xaa 0 64k"])
    assert r.returncode == 0, r.stdout + r.stderr
    held_a = a.qmp.execute("query-extent-locks")[0]["held"]
    assert any(h["mode"] == "exclusive" and h["offset"] == 0 for h in held_a), held_a

    t0 = time.monotonic()
    r = hp.run_qemu_io(b.nbd_opts("disk"), ["read -P 0xaa 0 64k"], timeout=30)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert took < 10, f"B waited {took:.1f} s for A's cached lock"
    ca = a.qmp.execute("query-extent-locks")[0]["counters"]
    assert ca["revocations"] + ca["downgrades"] >= 1, ca
    # A no longer holds [0, 64k) exclusively
    for h in a.qmp.execute("query-extent-locks")[0]["held"]:
        assert not (h["mode"] == "exclusive" and h["offset"] < 64 * KiB), h

    r = hp.run_qemu_io(a.nbd_opts("disk"), ["write -P 0xbb 0 64k"], timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    r = hp.run_qemu_io(b.nbd_opts("disk"), ["read -P 0xbb 0 64k"], timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert nfs_image.path.read_bytes()[:64 * KiB] == b"\xbb" * (64 * KiB)
    for q in (a, b):
        c = q.qmp.execute("query-extent-locks")[0]["counters"]
        assert c["errors"] == 0 and c["lease-losses"] == 0, c
