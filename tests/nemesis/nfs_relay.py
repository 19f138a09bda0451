"""A per-host fault point on the NFS path, with a fence control socket.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

QEMU 7.2's ``nfs`` driver (libnfs, NFSv3) first asks the portmapper on
port 111 of the server for the MOUNT and NFS ports and then connects to
those ports *of the same address*; its blockdev options have no port
settings.  So a relay on one port is not enough, and every host needs an
address of its own.  The whole 127.0.0.0/8 is loopback: host N names the
server 127.0.0.(10+N).  ganesha binds 127.0.0.1 only (harness/ganesha.py)
while rpcbind listens on the wildcard address, so

* port 111 of 127.0.0.(10+N) reaches rpcbind directly: it only says which
  ports to use (PMAP GETPORT replies carry a port, no address);
* ports 2049 (NFS) and the MOUNT port of 127.0.0.(10+N) are this relay,
  which forwards to the same ports of 127.0.0.1.

Every byte of a host's NFS traffic thus goes through its NfsFaultPoint:

``on``    forward.
``hold``  forward nothing in either direction: requests and replies wait in
          the socket buffers ("in flight"), as on a congested or
          partitioned storage network; release() delivers them in order.
``off``   fenced: every connection is reset at once (SO_LINGER 0) and
          whatever it had queued is dropped, never reaching the server;
          new connections are reset too.  Like a switch port shut by
          fence_ifmib, it stays off until it is turned on again.

The fence agent (contrib, on the daemon side) turns a host's port off by
connecting to the UNIX socket ``<ctl_dir>/<plug>.ctl`` (plug = the host's
extlock client-id) and writing ``off``, ``on`` or ``status`` + newline; it
reads one line back: ``ok`` (off/on done: when ``ok`` is sent for ``off``,
every connection is already gone), ``on``/``off`` (status) or
``error ...``.

The relay also *observes* the storage: it parses the ONC RPC record
marking of the NFSv3 stream and logs every READ (6) and WRITE (7) call
with its file offset and count, the CLOCK_MONOTONIC time at which its last
byte was handed to the server (``fwd``) and the time its reply came back
(``reply``), and every fence command.  The history checker compares these
storage-side times with host deaths and with the coordinator's lock grants.

When the host side of a connection goes away (the host was killed) while
calls it sent are at the server unanswered, the relay keeps the server side
open and reads on (for at most ``DRAIN_S``, and not while held or fenced):
an answer that comes is logged as ``replied-by`` - the server had executed
the call by then, although the host never saw it.  Without that the log
could not say when such a WRITE landed (nemesis seed 7, host2 killed 1 ms
after its WRITE reached ganesha: reported as a lock-violation on the
checker's fallback window).
"""

import json
import os
import select
import socket
import struct
import threading
import time

NFS_PROGRAM = 100003
NFSPROC3_READ = 6
NFSPROC3_WRITE = 7
LAST_FRAGMENT = 0x80000000
DRAIN_S = 30            # how long a dead host's unanswered calls are awaited


def mono_ns():
    return time.monotonic_ns()


def parse_call(record):
    """(xid, proc, offset, count) of an NFSv3 READ/WRITE call record, or
    (xid, proc, None, None) for other calls, or None if not an NFS call."""
    if len(record) < 24:
        return None
    xid, mtype, rpcvers, prog, vers, proc = struct.unpack_from(">6I", record, 0)
    if mtype != 0 or rpcvers != 2 or prog != NFS_PROGRAM or vers != 3:
        return (xid, None, None, None) if mtype == 0 else None
    pos = 24
    try:
        for _ in range(2):                      # credential, verifier
            _flavor, length = struct.unpack_from(">2I", record, pos)
            pos += 8 + ((length + 3) & ~3)
        if proc in (NFSPROC3_READ, NFSPROC3_WRITE):
            (fhlen,) = struct.unpack_from(">I", record, pos)
            pos += 4 + ((fhlen + 3) & ~3)
            offset, count = struct.unpack_from(">QI", record, pos)
            return xid, proc, offset, count
    except struct.error:
        return xid, proc, None, None
    return xid, proc, None, None


def parse_reply(record):
    """(xid, nfsstat) of a reply record (nfsstat None if not accepted)."""
    if len(record) < 8:
        return None
    xid, mtype = struct.unpack_from(">2I", record, 0)
    if mtype != 1:
        return None
    try:
        (reply_stat,) = struct.unpack_from(">I", record, 8)
        if reply_stat != 0:
            return xid, None
        _flavor, length = struct.unpack_from(">2I", record, 12)
        pos = 20 + ((length + 3) & ~3)
        accept_stat, status = struct.unpack_from(">2I", record, pos)
        return xid, (status if accept_stat == 0 else None)
    except struct.error:
        return xid, None


class _Conn:
    """One relayed TCP connection: host side `a`, server side `b`."""

    def __init__(self, cid, a, b, port):
        self.cid = cid
        self.a = a
        self.b = b
        self.port = port
        self.buf = {a: b"", b: b""}         # bytes read, not yet parsed
        self.out = {a: b"", b: b""}         # bytes to write to this socket
        self.calls = {}                     # xid -> log entry
        self.closing = False
        self.drain_until = None             # host gone: wait for answers until

    def peer(self, s):
        return self.b if s is self.a else self.a


class NfsFaultPoint:
    """The NFS path of one host (see the module documentation)."""

    def __init__(self, name, listen_host, ports, target_host="127.0.0.1",
                 ctl_dir=None, log_path=None, observe=True):
        self.name = name
        self.listen_host = listen_host
        self.target_host = target_host
        self.state = "on"
        self.observe = observe              # parse ONC RPC (False: any TCP)
        self.log = []                       # storage-side I/O and fence events
        self.log_path = log_path
        self._log_file = open(log_path, "a", encoding="utf-8") if log_path else None
        self._lock = threading.RLock()
        self._conns = []
        self._next_cid = 1
        self._stop = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._listeners = []
        for port in ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((listen_host, port))
            s.listen(16)
            s.setblocking(False)
            self._listeners.append((s, port))
        self.ctl_path = None
        self._ctl = None
        if ctl_dir is not None:
            self.ctl_path = os.path.join(str(ctl_dir), f"{name}.ctl")
            try:
                os.unlink(self.ctl_path)
            except FileNotFoundError:
                pass
            self._ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._ctl.bind(self.ctl_path)
            self._ctl.listen(8)
            self._ctl.setblocking(False)
        self._ctl_clients = {}              # socket -> pending input
        self.counts = {"connections": 0, "reset": 0, "write": 0, "read": 0,
                       "dropped-bytes": 0}
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"nfs-relay-{name}")
        self._thread.start()

    # ---- control ---------------------------------------------------------
    def _event(self, entry):
        entry.setdefault("host", self.name)
        self.log.append(entry)
        if self._log_file:
            self._log_file.write(json.dumps(entry) + "\n")
            self._log_file.flush()

    def _wake(self):
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def hold(self):
        with self._lock:
            if self.state == "on":
                self.state = "hold"
            self._event({"event": "hold", "ts": mono_ns()})
        self._wake()

    def release(self):
        with self._lock:
            if self.state == "hold":
                self.state = "on"
            self._event({"event": "release", "ts": mono_ns()})
        self._wake()

    def off(self, by="nemesis"):
        """Fence: reset every connection, dropping what is queued."""
        with self._lock:
            self.state = "off"
            for c in list(self._conns):
                self._reset(c)
            self._event({"event": "fence-off", "by": by, "ts": mono_ns()})
        self._wake()

    def on(self, by="nemesis"):
        with self._lock:
            self.state = "on"
            self._event({"event": "fence-on", "by": by, "ts": mono_ns()})
        self._wake()

    def close(self):
        with self._lock:
            self._stop = True
        self._wake()
        self._thread.join(timeout=5)
        with self._lock:
            for c in list(self._conns):
                self._reset(c)
            for s, _ in self._listeners:
                s.close()
            if self._ctl is not None:
                self._ctl.close()
                for s in self._ctl_clients:
                    s.close()
                try:
                    os.unlink(self.ctl_path)
                except OSError:
                    pass
            if self._log_file:
                self._log_file.close()
                self._log_file = None
        self._wake_r.close()
        self._wake_w.close()

    # ---- the loop ----------------------------------------------------------
    def _answered_before_reset(self, c):
        """Replies the server has already sent into our socket (a held
        path: nobody read them) are evidence that it executed those calls
        before the reset: log them as "replied-by" (now), not as "reply"
        (they never reach the host)."""
        now = mono_ns()
        for _ in range(64):                 # bounded: at most 16 MiB
            try:
                data = c.b.recv(262144, socket.MSG_DONTWAIT)
            except OSError:
                break
            if not data:
                break
            c.buf[c.b] += data
        for _raw, payload in self._records(c, c.b):
            rep = parse_reply(payload)
            if rep is not None and rep[0] in c.calls:
                entry = c.calls[rep[0]]
                if entry.get("fwd") is not None:
                    entry["replied-by"] = now
                    entry["status"] = rep[1]

    def _reset(self, c):
        """Close both sides with RST; queued data is dropped (caller locks)."""
        if c not in self._conns:
            return
        self._conns.remove(c)
        if self.observe:
            self._answered_before_reset(c)
        dropped = sum(len(v) for v in c.buf.values()) + sum(len(v) for v in c.out.values())
        for s in (c.a, c.b):
            try:
                # unread data in the kernel buffers is dropped with the RST
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                             struct.pack("ii", 1, 0))
            except OSError:
                pass
            s.close()
        self.counts["reset"] += 1
        self.counts["dropped-bytes"] += dropped
        for entry in c.calls.values():
            entry.pop("_pending", None)
            if entry.get("fwd") is not None:
                entry["reset"] = True
                self._event(entry)          # reached the server, no reply

    def _accept(self, lsock, port):
        try:
            a, _ = lsock.accept()
        except OSError:
            return
        if self.state == "off":
            a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            a.close()
            self.counts["reset"] += 1
            return
        try:
            b = socket.create_connection((self.target_host, port), timeout=5)
        except OSError:
            a.close()
            return
        a.setblocking(False)
        b.setblocking(False)
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = _Conn(self._next_cid, a, b, port)
        self._next_cid += 1
        self._conns.append(c)
        self.counts["connections"] += 1
        self._event({"event": "connect", "conn": c.cid, "port": port, "ts": mono_ns()})

    def _records(self, c, s):
        """Split complete RPC records off c.buf[s]; returns [bytes]."""
        out = []
        buf = c.buf[s]
        pos = 0
        # a record may have several fragments; we only look at whole ones
        while True:
            frag_pos = pos
            payload = b""
            complete = False
            while len(buf) - frag_pos >= 4:
                (hdr,) = struct.unpack_from(">I", buf, frag_pos)
                length = hdr & ~LAST_FRAGMENT
                if len(buf) - frag_pos - 4 < length:
                    break
                payload += buf[frag_pos + 4:frag_pos + 4 + length]
                frag_pos += 4 + length
                if hdr & LAST_FRAGMENT:
                    complete = True
                    break
            if not complete:
                break
            out.append((buf[pos:frag_pos], payload))
            pos = frag_pos
        c.buf[s] = buf[pos:]
        return out

    def _from_host(self, c, data):
        if not self.observe:
            c.out[c.b] += data
            return
        c.buf[c.a] += data
        for raw, payload in self._records(c, c.a):
            call = parse_call(payload)
            entry = None
            if call is not None and call[1] in (NFSPROC3_READ, NFSPROC3_WRITE):
                xid, proc, offset, count = call
                kind = "write" if proc == NFSPROC3_WRITE else "read"
                entry = {"event": kind, "conn": c.cid, "xid": xid, "offset": offset,
                         "count": count, "fwd": None, "reply": None}
                c.calls[xid] = entry
                self.counts[kind] += 1
            c.out[c.b] += raw
            if entry is not None:
                entry["_pending"] = len(c.out[c.b])

    def _from_server(self, c, data):
        if not self.observe:
            c.out[c.a] += data
            return
        c.buf[c.b] += data
        now = mono_ns()
        for raw, payload in self._records(c, c.b):
            rep = parse_reply(payload)
            if rep is not None and rep[0] in c.calls:
                entry = c.calls.pop(rep[0])
                if c.drain_until is not None:
                    # the host is gone: the server executed it, nobody saw it
                    entry["replied-by"] = now
                else:
                    entry["reply"] = now
                entry["status"] = rep[1]
                entry.pop("_pending", None)
                self._event(entry)
            if c.drain_until is None:
                c.out[c.a] += raw

    def _flush(self, c, s):
        if not c.out[s]:
            return True
        try:
            n = s.send(c.out[s])
        except BlockingIOError:
            return True
        except OSError:
            return False
        c.out[s] = c.out[s][n:]
        if s is c.b and n:
            self._sent_to_server(c, n)
        return True

    def _sent_to_server(self, c, n):
        """n more bytes of c.out[c.b] were handed to the server: the calls
        whose last byte was among them are forwarded now."""
        now = mono_ns()
        for entry in c.calls.values():
            if entry.get("_pending") is not None:
                entry["_pending"] -= n
                if entry["_pending"] <= 0 and entry["fwd"] is None:
                    entry["fwd"] = now

    def _ctl_accept(self):
        try:
            s, _ = self._ctl.accept()
        except OSError:
            return
        s.setblocking(False)
        self._ctl_clients[s] = b""

    def _ctl_input(self, s):
        try:
            data = s.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            s.close()
            del self._ctl_clients[s]
            return
        self._ctl_clients[s] += data
        while b"\n" in self._ctl_clients[s]:
            line, rest = self._ctl_clients[s].split(b"\n", 1)
            self._ctl_clients[s] = rest
            cmd = line.decode(errors="replace").strip()
            if cmd == "off":
                self.off(by="agent")
                reply = "ok"
            elif cmd == "on":
                self.on(by="agent")
                reply = "ok"
            elif cmd == "status":
                reply = "off" if self.state == "off" else "on"
            else:
                reply = f"error unknown command {cmd!r}"
            try:
                s.setblocking(True)
                s.settimeout(2)
                s.sendall(reply.encode() + b"\n")
                s.setblocking(False)
            except OSError:
                pass

    def _loop(self):
        while True:
            with self._lock:
                if self._stop:
                    return
                rlist = [self._wake_r] + [s for s, _ in self._listeners]
                if self._ctl is not None:
                    rlist.append(self._ctl)
                    rlist += list(self._ctl_clients)
                wlist = []
                if self.state == "on":
                    for c in self._conns:
                        # a draining connection has no host side any more
                        sides = (c.b,) if c.drain_until is not None else (c.a, c.b)
                        rlist += list(sides)
                        wlist += [s for s in sides if c.out[s]]
            try:
                r, w, _ = select.select(rlist, wlist, [], 0.2)
            except (OSError, ValueError):
                continue                        # a socket was closed meanwhile
            with self._lock:
                if self._stop:
                    return
                if self._wake_r in r:
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                for s, port in self._listeners:
                    if s in r:
                        self._accept(s, port)
                if self._ctl is not None and self._ctl in r:
                    self._ctl_accept()
                for s in list(self._ctl_clients):
                    if s in r:
                        self._ctl_input(s)
                if self.state != "on":
                    continue
                for c in list(self._conns):
                    if c not in self._conns:
                        continue
                    if c.drain_until is not None:
                        self._drain(c, c.b in r)
                        continue
                    gone = None                 # the side that closed
                    for s in (c.a, c.b):
                        if s in r:
                            try:
                                data = s.recv(262144)
                            except BlockingIOError:
                                continue
                            except OSError:
                                data = b""
                            if not data:
                                gone = s
                                break
                            if s is c.a:
                                self._from_host(c, data)
                            else:
                                self._from_server(c, data)
                    if gone is None:
                        for s in (c.a, c.b):
                            if not self._flush(c, s):
                                gone = s
                                break
                    if gone is c.a:
                        self._host_gone(c)
                    elif gone is not None:
                        self._close_conn(c)

    def _host_gone(self, c):
        """The host closed its side (it was killed): what it sent is still
        delivered, and calls at the server without an answer are awaited
        on the server side (``replied-by``), for at most DRAIN_S."""
        try:
            c.a.close()
        except OSError:
            pass
        c.out[c.a] = b""
        self._event({"event": "disconnect", "conn": c.cid, "ts": mono_ns()})
        c.drain_until = mono_ns() + DRAIN_S * 10**9
        self._drain(c, False)

    def _drain(self, c, readable):
        """One round for a connection whose host is gone (caller locks)."""
        ok = True
        if readable:
            try:
                data = c.b.recv(262144)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                ok = False
            elif data:
                self._from_server(c, data)
        if ok and not self._flush(c, c.b):
            ok = False
        waiting = any(e.get("fwd") is not None or e.get("_pending") is not None
                      for e in c.calls.values())
        if ok and waiting and mono_ns() < c.drain_until:
            return
        c.b.close()
        if c in self._conns:
            self._conns.remove(c)
        for entry in c.calls.values():
            entry.pop("_pending", None)
            if entry.get("fwd") is not None:
                self._event(entry)          # forwarded, no answer seen

    def _close_conn(self, c):
        """One side closed: deliver what is left to the other, then close."""
        for s in (c.a, c.b):
            if c.out[s]:
                try:
                    s.setblocking(True)
                    s.settimeout(1)
                    s.sendall(c.out[s])
                    if s is c.b:
                        self._sent_to_server(c, len(c.out[s]))
                except OSError:
                    pass
        for s in (c.a, c.b):
            s.close()
        if c in self._conns:
            self._conns.remove(c)
        self._event({"event": "disconnect", "conn": c.cid, "ts": mono_ns()})
        for entry in c.calls.values():
            entry.pop("_pending", None)
            if entry.get("fwd") is not None:
                self._event(entry)          # forwarded, no reply seen

def portmap_ports(host="127.0.0.1"):
    """{program name: port} of the TCP services registered with rpcbind."""
    import subprocess
    out = subprocess.run(["rpcinfo", "-p", host], capture_output=True, text=True,
                         timeout=10)
    ports = {}
    for line in out.stdout.splitlines()[1:]:
        f = line.split()
        if len(f) >= 5 and f[2] == "tcp":
            ports[f[4]] = int(f[3])
    return ports


__all__ = ["NfsFaultPoint", "portmap_ports", "parse_call", "parse_reply"]
