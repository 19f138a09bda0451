"""The stamped workload of the nemesis run.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

A fixed, seeded set of overlapping extents (whole 512-byte sectors at
offsets that are not aligned to the lock granularity).  A write of extent E
by writer W with sequence number S stamps every sector i of E with
(W, S, E, i) - a 24-byte header repeated over the sector - so that any
sector of the image or of a read tells exactly which write put it there,
and a sector torn inside itself is not a valid stamp.  Sector content is
decoded as 0 (never written), a (writer, seq) pair, or GARBAGE.

Each client thread owns one NBD connection to its host's export and issues
one request at a time; every operation is recorded with its
CLOCK_MONOTONIC start and end (time.monotonic_ns(), the clock QEMU and
extlockd use) and its outcome:

  ok      the request was acknowledged (a write: NBD reply without error)
  error   the server replied with an error (counted as a client error)
  lost    the connection broke (host killed): the outcome is unknown
  timeout no reply within the operation timeout (a hang; outcome unknown)
"""

import random
import struct
import threading
import time

SECTOR = 512
MAGIC = b"XLNEMES1"
HDR = struct.Struct(">8sIIII")
GARBAGE = "garbage"


def stamp(writer, seq, ext, idx):
    hdr = HDR.pack(MAGIC, writer, seq, ext, idx)
    return (hdr * (SECTOR // len(hdr) + 1))[:SECTOR]


def decode(sector):
    """0, (writer, seq, ext, idx) or GARBAGE."""
    if sector.count(0) == SECTOR:
        return 0
    try:
        magic, writer, seq, ext, idx = HDR.unpack_from(sector)
    except struct.error:
        return GARBAGE
    if magic != MAGIC or sector != stamp(writer, seq, ext, idx):
        return GARBAGE
    return (writer, seq, ext, idx)


def make_extents(seed, count, region_sectors, max_sectors):
    """[(first sector, sector count)]: random, overlapping, unaligned."""
    rnd = random.Random(seed * 7919 + 17)
    extents = []
    for _ in range(count):
        n = rnd.randint(1, max_sectors)
        first = rnd.randrange(0, region_sectors - n)
        extents.append((first, n))
    return extents


class Client(threading.Thread):
    """One writer/reader thread bound to one host."""

    def __init__(self, host, writer_id, extents, history, seed, stop,
                 write_ratio=0.6, op_timeout=120.0, pace=0.01):
        super().__init__(daemon=True, name=f"client-{writer_id}")
        self.host = host
        self.writer = writer_id
        self.extents = extents
        self.history = history
        self.rnd = random.Random(seed)
        self.stop_event = stop
        self.write_ratio = write_ratio
        self.op_timeout = op_timeout
        self.pace = pace
        self.seq = 0
        self.conn = None
        self.conn_gen = None
        self.failure = None

    def _connect(self):
        """(Re)connect to the host's current incarnation; bounded wait."""
        deadline = time.monotonic() + 120
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            gen = self.host.generation
            if self.host.serving():
                try:
                    self.conn = self.host.nbd_client(timeout=self.op_timeout)
                    self.conn_gen = gen
                    return True
                except Exception:               # noqa: BLE001 - retried
                    self.conn = None
            self.stop_event.wait(0.1)
        return False

    def run(self):
        try:
            self._run()
        except Exception as e:                  # noqa: BLE001 - reported
            self.failure = repr(e)

    def _run(self):
        while not self.stop_event.is_set():
            if self.conn is None and not self._connect():
                return
            ext = self.rnd.randrange(len(self.extents))
            first, n = self.extents[ext]
            if self.rnd.random() < self.write_ratio:
                self.seq += 1
                data = b"".join(stamp(self.writer, self.seq, ext, i) for i in range(n))
                op = {"op": "write", "host": self.host.name, "writer": self.writer,
                      "seq": self.seq, "ext": ext, "first": first, "n": n,
                      "gen": self.conn_gen}
                op["start"] = time.monotonic_ns()
                try:
                    err, _ = self.conn.wait(self.conn.send_write(first * SECTOR, data),
                                            timeout=self.op_timeout)
                    op["end"] = time.monotonic_ns()
                    op["status"] = "ok" if err == 0 else "error"
                    if err:
                        op["errno"] = err
                except Exception as e:          # noqa: BLE001 - connection lost
                    self._failed(op, e)
            else:
                op = {"op": "read", "host": self.host.name, "writer": self.writer,
                      "ext": ext, "first": first, "n": n, "gen": self.conn_gen}
                op["start"] = time.monotonic_ns()
                try:
                    err, data = self.conn.wait(self.conn.send_read(first * SECTOR,
                                                                   n * SECTOR),
                                               timeout=self.op_timeout)
                    op["end"] = time.monotonic_ns()
                    if err:
                        op["status"] = "error"
                        op["errno"] = err
                    else:
                        op["status"] = "ok"
                        op["seen"] = [decode(data[i * SECTOR:(i + 1) * SECTOR])
                                      for i in range(n)]
                except Exception as e:          # noqa: BLE001
                    self._failed(op, e)
            self.history.append(op)
            if self.pace:
                self.stop_event.wait(self.rnd.uniform(0, self.pace))

    def _failed(self, op, exc):
        op["end"] = None
        op["status"] = "timeout" if isinstance(exc, TimeoutError) else "lost"
        op["why"] = repr(exc)[:200]
        self._drop()

    def _drop(self):
        try:
            self.conn.sock.close()
        except Exception:                       # noqa: BLE001
            pass
        self.conn = None
