"""Fault injection and measurement helpers for the caching and recovery tests.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Additive helpers used by tests/qemu/test_caching.py and
tests/qemu/test_recovery.py:

  NbdClient       a minimal NBD client (fixed newstyle, simple replies) so
                  that a test can send reads and writes to an export of an
                  extlock node itself, keep the connection open while the
                  server is stopped, and time each request precisely
  TcpPartition    a TCP relay on 127.0.0.1 between a QEMU process and the
                  coordinator that can cut the link (nothing is forwarded,
                  new connections are refused) and heal it
  schema_events() the EXTENT_LOCK_* events and their fields, read from
                  qapi/block-extlock.json; check_event() compares an event
                  received on QMP with it
  node_info(), fresh_lease(), suspend()/resume() of a process, and
  start_coordinator()/check_coordinator() for extlockd instances with
  extra options (fence margin, grace period).

Everything runs on loopback or UNIX sockets.  Times are taken with
time.monotonic() (CLOCK_MONOTONIC), the clock QEMU_CLOCK_REALTIME and
extlockd use for leases.
"""

import ast
import os
import re
import select
import signal
import socket
import struct
import threading
import time
from pathlib import Path

from .procs import REPO_ROOT

# ---------------------------------------------------------------------------
# QMP events as documented in the schema

SCHEMA = REPO_ROOT / "qapi" / "block-extlock.json"


def _schema_exprs(path=SCHEMA):
    """The QAPI expressions of a schema file (comments stripped)."""
    text = "\n".join(line.split("#", 1)[0] if not line.lstrip().startswith("#")
                     else "" for line in Path(path).read_text().splitlines())
    exprs, depth, start = [], 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                # JSON's true/false (e.g. 'coroutine': true) as Python's
                expr = re.sub(r"\btrue\b", "True", text[start:i + 1])
                expr = re.sub(r"\bfalse\b", "False", expr)
                exprs.append(ast.literal_eval(expr))
    return exprs


def schema_events():
    """{event name: {field: (type, optional)}} from qapi/block-extlock.json."""
    events = {}
    for e in _schema_exprs():
        if "event" in e:
            events[e["event"]] = {k.lstrip("*"): (t, k.startswith("*"))
                                  for k, t in e.get("data", {}).items()}
    return events


def schema_enum(name):
    for e in _schema_exprs():
        if e.get("enum") == name:
            return list(e["data"])
    raise KeyError(name)


def _type_ok(value, qtype):
    if isinstance(qtype, list):
        return isinstance(value, list) and all(_type_ok(v, qtype[0]) for v in value)
    if qtype == "str":
        return isinstance(value, str)
    if qtype == "bool":
        return isinstance(value, bool)
    if qtype in ("int", "int64"):
        return isinstance(value, int) and not isinstance(value, bool)
    if qtype.startswith("uint"):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    # an enum of the schema
    return isinstance(value, str) and value in schema_enum(qtype)


def check_event(ev, name, **expect):
    """Assert that `ev` is event `name` with exactly the documented fields
    (required ones present, none undocumented), each of its documented
    type, a QMP timestamp, and the values given in `expect` (field names
    with '_' for '-')."""
    fields = schema_events()[name]
    assert ev["event"] == name, ev
    data = ev.get("data", {})
    required = {k for k, (_, opt) in fields.items() if not opt}
    assert required <= set(data), f"{name}: fields missing: {required - set(data)}: {ev}"
    extra = set(data) - set(fields)
    assert not extra, f"{name}: undocumented fields: {extra}: {ev}"
    for k, v in data.items():
        assert _type_ok(v, fields[k][0]), f"{name}: {k}={v!r} is not a {fields[k][0]}: {ev}"
    ts = ev.get("timestamp", {})
    assert isinstance(ts.get("seconds"), int) and isinstance(ts.get("microseconds"), int), ev
    for k, v in expect.items():
        key = k.replace("_", "-")
        assert data.get(key) == v, f"{name}: {key} is {data.get(key)!r}, expected {v!r}: {ev}"
    return data


def event_time(ev):
    """The QMP timestamp of an event (wall clock, seconds)."""
    ts = ev["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


def events_named(qmp, name, timeout=0.0):
    """Read pending events (up to `timeout`) and return (and remove) all
    queued events called `name`."""
    qmp.poll_events(timeout)
    got = [e for e in qmp.events if e["event"] == name]
    qmp.events[:] = [e for e in qmp.events if e["event"] != name]
    return got


# ---------------------------------------------------------------------------
# query-extent-locks

def node_info(qmp, node=None):
    """query-extent-locks of one node (the only one, or `node`)."""
    infos = qmp.execute("query-extent-locks", **({"node-name": node} if node else {}))
    assert len(infos) == 1, infos
    return infos[0]


def counters(qmp, node=None):
    return node_info(qmp, node)["counters"]


def fresh_lease(qmp, lease_ms, node=None, tolerance_ms=None, timeout=None):
    """Wait until the node has just renewed its lease and return
    (t, remaining_ms): at time.monotonic() t the node's own deadline was
    remaining_ms ahead.  "Just renewed" means the remaining lease is within
    `tolerance_ms` of its maximum, lease - margin (margin: a tenth of the
    lease, at most 1 s; docs/qemu-driver.rst).  The node renews three times
    per lease, so this takes at most about a third of the lease."""
    margin = min(lease_ms / 10, 1000)
    tolerance_ms = tolerance_ms if tolerance_ms is not None else max(40, lease_ms / 40)
    deadline = time.monotonic() + (timeout or lease_ms / 1000 + 5)
    while True:
        t0 = time.monotonic()
        info = node_info(qmp, node)
        t1 = time.monotonic()
        rem = info["lease-remaining"]
        # QEMU read its clock between t0 and t1 and truncated to whole ms,
        # so the node's deadline D is in [t0 + rem, t1 + rem + 1 ms]; the
        # callers use the lower end, and t1 - t0 is kept small
        if rem >= lease_ms - margin - tolerance_ms and t1 - t0 < 0.02:
            return t0, rem
        if time.monotonic() > deadline:
            raise TimeoutError(f"no fresh lease renewal seen (last {rem} ms)")
        time.sleep(0.003)


# ---------------------------------------------------------------------------
# processes

def suspend(proc):
    """SIGSTOP a managed process; returns time.monotonic() just after."""
    os.kill(proc.proc.pid, signal.SIGSTOP)
    return time.monotonic()


def resume(proc):
    """SIGCONT; returns time.monotonic() just before."""
    t = time.monotonic()
    os.kill(proc.proc.pid, signal.SIGCONT)
    return t


class Resumer:
    """Context manager: whatever happens, SIGCONT the processes it was
    given on exit, so that teardown can stop them normally."""

    def __init__(self, *procs):
        self.procs = list(procs)

    def add(self, proc):
        self.procs.append(proc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.proc is not None and p.proc.poll() is None:
                try:
                    os.kill(p.proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass


def start_coordinator(procs, name="extlockd", fence_margin_ms=None, grace_ms=None,
                      lease_ms=None, extra_args=()):
    """An extlockd (UNIX + TCP, --debug-checks) with extra options."""
    args = list(extra_args)
    if fence_margin_ms is not None:
        args += ["--fence-margin-ms", str(fence_margin_ms)]
    if grace_ms is not None:
        args += ["--grace-ms", str(grace_ms)]
    return procs.extlockd(name=name, tcp=True, lease_ms=lease_ms, extra_args=args)


def check_coordinator(daemon):
    """The coordinator is still running (unless the test killed it), its
    invariant checker never fired, and it exits cleanly on SIGTERM."""
    text = daemon.stderr()
    assert "invariant broken" not in text, text
    if daemon.killed and not daemon.alive():
        return
    assert daemon.alive(), f"extlockd died:\n{text}"
    status = daemon.stop()
    assert status == 0, f"extlockd exited with {status}:\n{daemon.stderr()}"
    assert "invariant broken" not in daemon.stderr(), daemon.stderr()


# ---------------------------------------------------------------------------
# NBD

NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_OPT_EXPORT_NAME = 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1
NBD_FLAG_C_NO_ZEROES = 2
NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_DISC = 0, 1, 2
NBD_CMD_FLUSH, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES = 3, 4, 6


class NbdError(Exception):
    pass


class NbdClient:
    """A minimal NBD client on a UNIX socket (what qemu-storage-daemon's
    --nbd-server addr.type=unix serves).  Requests can be sent and their
    replies collected separately, so several may be in flight and a
    request can be sent while the server is stopped."""

    def __init__(self, path, export, timeout=30.0):
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._handle = 0
        self.replies = {}           # handle -> (error, data)
        self._pending = {}          # handle -> (cmd, length)
        self._handshake(export)

    def _recv_exact(self, n, timeout=None):
        buf = b""
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"NBD: no data within {timeout or self.timeout} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(n - len(buf))
            except socket.timeout as e:
                raise TimeoutError("NBD: no reply in time") from e
            if not chunk:
                raise NbdError("NBD server closed the connection")
            buf += chunk
        return buf

    def _handshake(self, export):
        magic, opt_magic, _flags = struct.unpack(">8sQH", self._recv_exact(18))
        if magic != b"NBDMAGIC" or opt_magic != 0x49484156454F5054:
            raise NbdError("not a newstyle NBD server")
        self.sock.sendall(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE |
                                      NBD_FLAG_C_NO_ZEROES))
        name = export.encode()
        self.sock.sendall(struct.pack(">QII", 0x49484156454F5054,
                                      NBD_OPT_EXPORT_NAME, len(name)) + name)
        self.size, self.flags = struct.unpack(">QH", self._recv_exact(10))

    def send(self, cmd, offset, length, data=b""):
        self._handle += 1
        h = self._handle
        self.sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, cmd, h,
                                      offset, length) + data)
        self._pending[h] = (cmd, length)
        return h

    def send_write(self, offset, data):
        return self.send(NBD_CMD_WRITE, offset, len(data), data)

    def send_read(self, offset, length):
        return self.send(NBD_CMD_READ, offset, length)

    def send_trim(self, offset, length):
        """A discard (NBD_CMD_TRIM)."""
        return self.send(NBD_CMD_TRIM, offset, length)

    def send_write_zeroes(self, offset, length):
        return self.send(NBD_CMD_WRITE_ZEROES, offset, length)

    def send_flush(self):
        return self.send(NBD_CMD_FLUSH, 0, 0)

    def wait(self, handle, timeout=None):
        """Wait for the reply to `handle`; returns (errno, data)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while handle not in self.replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"NBD: no reply to request {handle}")
            magic, err, h = struct.unpack(">IIQ", self._recv_exact(16, left))
            if magic != NBD_SIMPLE_REPLY_MAGIC or h not in self._pending:
                raise NbdError(f"unexpected NBD reply {magic:#x} for {h}")
            cmd, length = self._pending.pop(h)
            data = b""
            if cmd == NBD_CMD_READ and err == 0:
                data = self._recv_exact(length, left)
            self.replies[h] = (err, data)
        return self.replies.pop(handle)

    def replied(self, handle, timeout=0.0):
        """Whether the reply to `handle` has arrived (within `timeout`)."""
        if handle in self.replies:
            return True
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return False
        try:
            self.replies[handle] = self.wait(handle, timeout=max(timeout, 5.0))
        except TimeoutError:
            return False
        return True

    def read(self, offset, length, timeout=None):
        err, data = self.wait(self.send_read(offset, length), timeout)
        if err:
            raise NbdError(f"read {offset}+{length} failed: errno {err}")
        return data

    def write(self, offset, data, timeout=None):
        err, _ = self.wait(self.send_write(offset, data), timeout)
        if err:
            raise NbdError(f"write {offset}+{len(data)} failed: errno {err}")

    def close(self):
        if self.sock is None:
            return
        try:
            self.sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0,
                                          NBD_CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()
        self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------
# a network partition between one client and the coordinator

class TcpPartition:
    """A TCP relay 127.0.0.1:port -> 127.0.0.1:target_port that can cut the
    link between a client and the coordinator and heal it again.

    While cut(), nothing is forwarded in either direction: bytes (and a
    connection close) wait in the socket buffers, as TCP segments wait for
    retransmission during a real partition, and are delivered in order
    after heal() unless the endpoint gave up on the connection by then.
    New connections are closed at once while cut (the client sees its
    connection attempt fail quickly, like an ICMP "host unreachable",
    instead of hanging in SYN retries).  One thread per direction, all
    daemonic and stopped by close()."""

    def __init__(self, target_port):
        self.target = ("127.0.0.1", int(target_port))
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._socks = []
        self._lock = threading.Lock()
        self.connections = 0
        self.refused = 0
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    def coordinator(self):
        """The driver's coordinator option for a client behind the relay."""
        return {"type": "inet", "host": "127.0.0.1", "port": str(self.port)}

    def cut(self):
        self._cut.set()
        return time.monotonic()

    def heal(self):
        t = time.monotonic()
        self._cut.clear()
        return t

    def _accept_loop(self):
        while not self._stop.is_set():
            r, _, _ = select.select([self.listener], [], [], 0.05)
            if not r:
                continue
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            if self._cut.is_set():
                self.refused += 1
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self.connections += 1
            with self._lock:
                self._socks += [client, server]
            for a, b in ((client, server), (server, client)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src, dst):
        while not self._stop.is_set():
            if self._cut.is_set():
                time.sleep(0.005)       # the network holds everything
                continue
            try:
                r, _, _ = select.select([src], [], [], 0.02)
            except (OSError, ValueError):
                return
            if not r or self._cut.is_set():
                continue
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        try:
            self.listener.close()
        except OSError:
            pass
        with self._lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass
            self._socks.clear()


def diagnose(daemon, lock_space, nodes):
    """Lock state of some nodes ({name: process with .qmp}) and of the
    coordinator, as text for failure messages."""
    from .coordinator import coordinator_status
    lines = []
    for name, q in nodes.items():
        try:
            i = node_info(q.qmp)
            held = [(h["offset"], h["length"], h["mode"], h["token"], h["state"],
                     h["in-flight"]) for h in i["held"]]
            waiting = [(w["offset"], w["length"], w["mode"], w.get("token"),
                        w["blocked-by"]) for w in i["waiting"]]
            lines.append(f"{name}: state={i['state']} connected={i['connected']} "
                         f"held={held} waiting={waiting} counters={i['counters']}")
        except Exception as e:                  # noqa: BLE001 - diagnostics only
            lines.append(f"{name}: query failed: {e}")
    try:
        st = coordinator_status(daemon.address, timeout=2)
        for sp in st["lock-spaces"]:
            if sp["name"] != lock_space:
                continue
            lines.append("coordinator held: " + str(
                [(h["client-id"], h["lock"], h["offset"], h["length"], h["mode"], h["token"])
                 for h in sp["held"]]))
            lines.append("coordinator waiting: " + str(
                [(w["client-id"], w["request"], w["offset"], w["length"], w["mode"],
                  w["token"], w["blocked-by"]) for w in sp["waiting"]]))
            lines.append(f"coordinator counters: {sp['counters']}")
    except Exception as e:                      # noqa: BLE001
        lines.append(f"coordinator status failed: {e}")
    return "\n".join(lines)


__all__ = ["NbdClient", "NbdError", "TcpPartition", "schema_events", "check_event",
           "event_time", "events_named", "node_info", "counters", "fresh_lease",
           "suspend", "resume", "Resumer", "start_coordinator", "check_coordinator",
           "diagnose"]
