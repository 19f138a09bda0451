"""QEMU hosts on an HA coordinator: qemu-storage-daemon processes with an
extlock node given the replicas' address list, and stamped writers.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Shared by tests/ha/test_qemu_failover.py and tests/ha/bench_failover.py.
The QEMU side comes from tests/qemu/harness (binaries found through
EXTLOCK_QEMU_BUILD, default build/qemu-10.0; processes in a ProcessGroup;
NbdClient; the extent checker of harness.patterns).

A host exports its extlock node over NBD (a UNIX socket); a Writer thread
writes whole extents, each write filled with one byte that names the host
and the round ("stamped"), and records when each write was sent and when
it completed.  With correct locking every extent ends up uniformly one
writer's stamp (harness.patterns.check_uniform_extents); a torn or mixed
extent means two writers overlapped.
"""
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "qemu"))

from harness.faults import NbdClient, node_info  # noqa: E402
from harness.patterns import check_uniform_extents  # noqa: E402
from harness.procs import (ProcessGroup, binary, extlock_node,  # noqa: E402,F401
                           file_child)

KiB = 1024
MiB = 1024 * KiB


def coordinator_addr(address):
    """A replica's "unix:PATH" as a QAPI SocketAddress."""
    assert address.startswith("unix:"), address
    return {"type": "unix", "path": address[len("unix:"):]}


def ha_node(image_path, addresses, lock_space, client_id, node="xl0",
            **opts):
    """Blockdev options of an extlock node with @coordinators."""
    o = extlock_node(file_child(image_path), None, lock_space,
                     node_name=node, client_id=client_id, **opts)
    del o["coordinator"]
    o["coordinators"] = [coordinator_addr(a) for a in addresses]
    o["file"] = dict(o["file"], cache={"direct": True})
    return o


def start_host(procs, name, image_path, addresses, lock_space, **opts):
    return procs.storage_daemon(
        name=name,
        blockdevs=[ha_node(image_path, addresses, lock_space, name, **opts)],
        exports=[("disk", "xl0", True)])


def make_image(path, size):
    with open(path, "wb") as f:
        f.truncate(size)


class Writer(threading.Thread):
    """Stamped writes through one host's NBD export, forever until stop():
    each round writes `per_round` extents (of `ext` bytes) taken in turn
    from `offsets`, all with the byte base + round % 64.  Records
    (sent_ns, done_ns, offset, stamp, errno) per write (CLOCK_MONOTONIC),
    and the last stamp that completed at each offset."""

    def __init__(self, host, base, offsets, ext, per_round=2, timeout=120):
        super().__init__(daemon=True)
        self.host = host
        self.base = base
        self.offsets = list(offsets)
        self.ext = ext
        self.per_round = per_round
        self.timeout = timeout
        self.log = []
        self.last = {}
        self.errors = []
        self.stop_ev = threading.Event()

    def run(self):
        try:
            with NbdClient(self.host.nbd_path, "disk",
                           timeout=self.timeout) as n:
                r = 0
                k = 0
                while not self.stop_ev.is_set():
                    stamp = self.base + r % 64
                    data = bytes([stamp]) * self.ext
                    for _ in range(self.per_round):
                        off = self.offsets[k % len(self.offsets)]
                        k += 1
                        sent = time.monotonic_ns()
                        err, _ = n.wait(n.send_write(off, data),
                                        timeout=self.timeout)
                        done = time.monotonic_ns()
                        self.log.append((sent, done, off, stamp, err))
                        if err:
                            self.errors.append("write at %#x: errno %d"
                                               % (off, err))
                        else:
                            self.last[off] = stamp
                    r += 1
        except Exception as e:                  # noqa: BLE001
            self.errors.append(repr(e))

    def done(self):
        return sum(1 for x in self.log if not x[4])

    def first_sent_after(self, t_ns):
        """Completion time of the first write sent after t_ns, or None."""
        for sent, done, _, _, err in list(self.log):
            if sent > t_ns and not err:
                return done
        return None

    def stop(self, timeout=150):
        self.stop_ev.set()
        self.join(timeout)
        return not self.is_alive()


def check_image(path, writers, offsets, ext):
    """Every written extent is uniformly one writer's stamp, and one of
    the last stamps written there (no torn or mixed extent).  Returns a
    list of problems."""
    problems = []
    stamps = set()
    for w in writers:
        stamps |= {x[3] for x in w.log if not x[4]}
    for off in sorted(set(offsets)):
        pats, probs = check_uniform_extents(path, ext, 1, stamps | {0},
                                            offset=off)
        problems += probs
        allowed = {w.last.get(off) for w in writers} - {None}
        if allowed and pats[0] not in allowed:
            problems.append("extent at %#x holds %r, not one of the last "
                            "stamps written there %r" % (off, pats[0],
                                                         allowed))
    return problems


def current(qmp):
    return node_info(qmp)
