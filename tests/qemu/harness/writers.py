"""Stamped block writers through NBD, for the freeze/backup tests.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

A StampWriter thread writes whole 4 KiB blocks, each filled with its
stamp (writer id, sequence number), to random blocks of an NBD export,
and records every answered write as (wid, seq, block, t_sent, t_answered)
in CLOCK_MONOTONIC seconds.  The write in flight is ``inflight``
((seq, t_sent) or None), so a test can see a write held by a freeze.
"""

import random
import struct
import threading
import time

from harness.faults import NbdClient

BLK = 4096


def stamp_block(wid, seq, size=BLK):
    """A block whose every 16 bytes are the stamp (wid, seq)."""
    return struct.pack("<QQ", wid, seq) * (size // 16)


class StampWriter(threading.Thread):
    def __init__(self, nbd_path, wid, seed, blocks, export="disk",
                 timeout=120, max_writes=100000):
        super().__init__(daemon=True)
        self.nbd_path, self.wid, self.seed = nbd_path, wid, seed
        self.blocks, self.export = blocks, export
        self.timeout, self.max_writes = timeout, max_writes
        self.done = []              # (wid, seq, block, t_sent, t_answered)
        self.inflight = None        # (seq, t_sent) of the write in flight
        self.stop = threading.Event()
        self.error = None

    def run(self):
        rnd = random.Random(self.seed)
        try:
            with NbdClient(self.nbd_path, self.export) as c:
                for seq in range(1, self.max_writes + 1):       # bounded
                    if self.stop.is_set():
                        break
                    b = rnd.randrange(self.blocks)
                    t0 = time.monotonic()
                    self.inflight = (seq, t0)
                    c.write(b * BLK, stamp_block(self.wid, seq),
                            timeout=self.timeout)
                    self.done.append((self.wid, seq, b, t0, time.monotonic()))
                    self.inflight = None
        except Exception as e:                          # the test reports it
            self.error = e
