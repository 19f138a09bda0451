"""Self-test of the NFS relay's storage record (nfs_relay.py) against a
fake RPC server on loopback: no NFS server needed.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Run:
    /usr/bin/python3 -m pytest -q tests/nemesis/test_relay.py
"""

import array
import fcntl
import socket
import struct
import sys
import termios
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nfs_relay                    # noqa: E402

LAST = 0x80000000


def write_call(xid, offset, count):
    body = struct.pack(">6I", xid, 0, 2, nfs_relay.NFS_PROGRAM, 3,
                       nfs_relay.NFSPROC3_WRITE)
    body += struct.pack(">4I", 0, 0, 0, 0)          # credential, verifier
    body += struct.pack(">I", 4) + b"fh00"
    body += struct.pack(">QI", offset, count)
    return struct.pack(">I", LAST | len(body)) + body


def reply(xid):
    body = struct.pack(">7I", xid, 1, 0, 0, 0, 0, 0)
    return struct.pack(">I", LAST | len(body)) + body


def recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, "closed"
        data += chunk
    return data


def unread(s):
    buf = array.array("i", [0])
    fcntl.ioctl(s.fileno(), termios.FIONREAD, buf)
    return buf[0]


def wait_for(cond, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_reply_held_at_fence_is_replied_by():
    """A write the server answered while the host's path was held never
    gets its reply to the host; when the fence resets the path, the relay
    finds the answer in its socket and logs "replied-by": the server had
    executed it by then.  A write the server did not answer gets none."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(10)
    port = srv.getsockname()[1]
    relay = nfs_relay.NfsFaultPoint("h", "127.0.0.2", [port])
    try:
        cli = socket.create_connection(("127.0.0.2", port), timeout=10)
        cli.sendall(write_call(1, 4096, 512) + write_call(2, 8192, 512))
        conn, _ = srv.accept()
        conn.settimeout(10)
        n1 = len(write_call(1, 4096, 512))
        recv_exact(conn, 2 * n1)            # both reached the server
        wait_for(lambda: all(e.get("fwd") for c in relay._conns
                             for e in c.calls.values()), "fwd of both calls")
        relay.hold()
        conn.sendall(reply(1))              # answers call 1 only
        # ... and the answer waits in the relay's socket, unread (held)
        wait_for(lambda: all(unread(c.b) == len(reply(1)) for c in relay._conns),
                 "the reply in the relay's socket")
        relay.off()
        writes = {e["xid"]: e for e in relay.log if e.get("event") == "write"}
        assert set(writes) == {1, 2}
        assert writes[1]["reply"] is None and writes[1]["reset"]
        assert writes[1]["fwd"] <= writes[1]["replied-by"]
        assert "replied-by" not in writes[2]
    finally:
        relay.close()
        srv.close()
