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


def test_answer_after_host_died_is_replied_by(monkeypatch):
    """A host killed with writes at the server: its side of the connection
    closes, the relay keeps the server side open and logs an answer that
    comes afterwards as "replied-by" (the server executed the call by
    then; nemesis seed 7, host2 killed 1 ms after its WRITE reached
    ganesha, whose answer the relay used to throw away).  A call the server
    never answers is logged without it once the server side closes, or
    after DRAIN_S."""
    monkeypatch.setattr(nfs_relay, "DRAIN_S", 60, raising=False)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(2)
    srv.settimeout(10)
    port = srv.getsockname()[1]
    relay = nfs_relay.NfsFaultPoint("h", "127.0.0.2", [port])
    n1 = len(write_call(1, 4096, 512))
    try:
        cli = socket.create_connection(("127.0.0.2", port), timeout=10)
        cli.sendall(write_call(1, 4096, 512) + write_call(2, 8192, 512))
        conn, _ = srv.accept()
        conn.settimeout(10)
        recv_exact(conn, 2 * n1)            # both reached the server
        wait_for(lambda: all(e.get("fwd") for c in relay._conns
                             for e in c.calls.values()), "fwd of both calls")
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cli.close()                         # the host is killed
        wait_for(lambda: any(e.get("event") == "disconnect" for e in relay.log),
                 "the relay seeing the host go")
        conn.sendall(reply(1))              # the server answers call 1 late
        wait_for(lambda: any(e.get("xid") == 1 for e in relay.log), "call 1 logged")
        e1 = next(e for e in relay.log if e.get("xid") == 1)
        assert e1["reply"] is None and e1["fwd"] <= e1["replied-by"]
        assert e1["status"] == 0
        assert not any(e.get("xid") == 2 for e in relay.log)    # still awaited
        conn.close()                        # the server gives up on it
        wait_for(lambda: any(e.get("xid") == 2 for e in relay.log), "call 2 logged")
        e2 = next(e for e in relay.log if e.get("xid") == 2)
        assert e2["fwd"] and e2["reply"] is None and "replied-by" not in e2
        assert relay._conns == []

        # bounded: a server that never answers nor closes
        monkeypatch.setattr(nfs_relay, "DRAIN_S", 0.3, raising=False)
        cli = socket.create_connection(("127.0.0.2", port), timeout=10)
        cli.sendall(write_call(3, 0, 512))
        conn2, _ = srv.accept()
        recv_exact(conn2, n1)
        wait_for(lambda: all(e.get("fwd") for c in relay._conns
                             for e in c.calls.values()), "fwd of call 3")
        cli.close()
        wait_for(lambda: any(e.get("xid") == 3 for e in relay.log), "call 3 logged")
        assert "replied-by" not in next(e for e in relay.log if e.get("xid") == 3)
        assert relay._conns == []
        conn2.close()
    finally:
        relay.close()
        srv.close()
