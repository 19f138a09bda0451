"""extlockctl freeze with real QEMU writers: a backup taken with
``qemu-img convert`` during the freeze is a consistent cut.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Two qemu-storage-daemons open the same raw image (on the loopback NFS
export, and as a local file) through extlock nodes
(lock cache on: the freeze's request makes the coordinator revoke their
cached exclusive locks) and export it over NBD; two writer threads stamp
4 KiB blocks through them, each write recorded with the CLOCK_MONOTONIC
times it was sent and answered.  ``extlockctl freeze`` runs a COMMAND that
notes the time, waits 0.5 s (writes keep coming, from both sides) and
copies the image with ``qemu-img convert``.  In the copy every block must
be one whole write, no write sent after the COMMAND started may be there,
and no block may be older than the last write answered before the freeze
was started.  The control moves the freeze lock off the written blocks:
the same checker must then find writes from after the cut.
"""

import struct
import subprocess
import sys
import threading
import time

from harness import procs as hp
from harness.faults import NbdClient
from harness.procs import extlock_node, wait_until

BLK = 4096
NBLK = 16


class Writer(threading.Thread):
    def __init__(self, nbd_path, wid, seed):
        super().__init__(daemon=True)
        self.nbd_path, self.wid, self.seed = nbd_path, wid, seed
        self.done = []              # (wid, seq, block, t_sent, t_answered)
        self.stop = threading.Event()
        self.error = None

    def run(self):
        import random
        rnd = random.Random(self.seed)
        try:
            with NbdClient(self.nbd_path, "disk") as c:
                for seq in range(1, 100000):            # bounded
                    if self.stop.is_set():
                        break
                    b = rnd.randrange(NBLK)
                    data = struct.pack("<QQ", self.wid, seq) * (BLK // 16)
                    t0 = time.monotonic()
                    c.write(b * BLK, data, timeout=60)
                    self.done.append((self.wid, seq, b, t0, time.monotonic()))
        except Exception as e:                          # the test reports it
            self.error = e


def check_backup(data, writes, t_freeze, t_cmd):
    by_stamp = {(w, s): (b, t0, t1) for w, s, b, t0, t1 in writes}
    problems = []
    for b in range(NBLK):
        blk = data[b * BLK:(b + 1) * BLK]
        if blk != blk[:16] * (BLK // 16):
            problems.append(f"block {b}: not one whole write")
            continue
        stamp = struct.unpack("<QQ", blk[:16])
        answered_before = [x for x in writes if x[2] == b and x[4] < t_freeze]
        last = max(answered_before, key=lambda x: x[4]) if answered_before \
            else None
        if stamp == (0, 0):
            if last:
                problems.append(f"block {b}: empty, but {last[:2]} was "
                                "answered before the freeze")
            continue
        if stamp not in by_stamp:
            problems.append(f"block {b}: unknown stamp {stamp}")
            continue
        _, t0, t1 = by_stamp[stamp]
        if t0 > t_cmd:
            problems.append(f"block {b}: {stamp} was sent after the cut")
        if last and t1 < last[4]:
            problems.append(f"block {b}: {stamp} is older than {last[:2]}, "
                            "answered before the freeze")
    return problems


def freeze_backup(image, extlockd, lock_space, procs, workdir,
                  freeze_args):
    daemons = [procs.storage_daemon(
        name=f"qsd{i}",
        blockdevs=[extlock_node(image.child, extlockd.coordinator(),
                                lock_space, node_name="xl",
                                client_id=f"host-{i}")],
        exports=[("disk", "xl", True)]) for i in range(2)]
    writers = [Writer(d.nbd_path, i + 1, i) for i, d in enumerate(daemons)]
    for w in writers:
        w.start()
    total = lambda: sum(len(w.done) for w in writers)      # noqa: E731
    wait_until(lambda: total() >= 40, timeout=60, what="40 writes")
    backup = workdir / "backup.raw"
    tcmd = workdir / "t_cmd"
    script = (f"{sys.executable} -c 'import time; print(time.monotonic())' "
              f"> {tcmd} && {sys.executable} -c 'import time; time.sleep(0.5)'"
              f" && {hp.binary('qemu-img')} convert -U -f raw -O raw "
              f"{image.path} {backup}")
    t_freeze = time.monotonic()
    p = subprocess.run([hp.binary("extlockctl"), "-c", extlockd.address,
                        "freeze", lock_space, "--timeout", "60", *freeze_args,
                        "--", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120)
    n = total()
    wait_until(lambda: total() >= n + 40, timeout=60, what="40 more writes")
    for w in writers:
        w.stop.set()
    for w in writers:
        w.join(60)
        assert w.error is None, w.error
    assert p.returncode == 0, p.stderr
    t_cmd = float(tcmd.read_text())
    writes = [x for w in writers for x in w.done]
    # writes from both hosts were sent before and after the cut
    for wid in (1, 2):
        assert any(x[0] == wid and x[3] < t_freeze for x in writes)
        assert any(x[0] == wid and x[3] > t_cmd for x in writes)
    size = NBLK * BLK
    return p, check_backup(backup.read_bytes()[:size], writes, t_freeze, t_cmd)


def test_backup_during_freeze_is_a_consistent_cut(image, extlockd,
                                                  lock_space, procs, workdir,
                                                  binaries):
    binaries("qemu-storage-daemon", "qemu-img", "extlockctl")
    p, problems = freeze_backup(image, extlockd, lock_space, procs,
                                workdir, [])
    assert problems == [], problems
    assert "cut token" in p.stderr and "COMMAND succeeded" in p.stderr


def test_backup_without_freeze_lock_is_caught(image, extlockd,
                                              lock_space, procs, workdir,
                                              binaries):
    """Control: the freeze lock far from the written blocks stops nothing,
    and the checker finds writes sent after the cut in the copy."""
    binaries("qemu-storage-daemon", "qemu-img", "extlockctl")
    _, problems = freeze_backup(image, extlockd, lock_space, procs,
                                workdir, ["--offset", str(1 << 40),
                                          "--length", str(BLK)])
    assert any("sent after the cut" in x for x in problems), problems
