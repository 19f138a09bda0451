"""A small synchronous QMP client over a UNIX socket.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

QMP (the QEMU Machine Protocol) is JSON objects over a stream socket.  The
server greets with {"QMP": {...}}; the client must send qmp_capabilities
before anything else.  Then every {"execute": ..., "id": N} gets exactly one
{"return": ...} or {"error": {"class": ..., "desc": ...}} with the same id,
and asynchronous {"event": ...} messages may arrive at any time in between.

    with QMPClient(path) as qmp:
        nodes = qmp.execute("query-named-block-nodes", flat=True)
        text = qmp.hmp("info extent-locks")
        ev = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=10)

Errors are raised as QMPError (with .error_class and .desc); protocol
trouble (closed socket, timeout) as QMPConnectionError / QMPTimeout.
"""

import json
import socket
import time


class QMPConnectionError(Exception):
    """The QMP socket could not be connected, or it was closed."""


class QMPTimeout(QMPConnectionError):
    """No (matching) answer arrived in time."""


class QMPError(Exception):
    """A QMP command returned an error."""

    def __init__(self, command, error):
        self.command = command
        self.error_class = error.get("class", "")
        self.desc = error.get("desc", "")
        super().__init__(f"{command}: {self.error_class}: {self.desc}")


class QMPClient:
    """Synchronous QMP client; events are queued in self.events."""

    def __init__(self, path, timeout=30.0, connect_timeout=10.0):
        self.path = str(path)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.sock = None
        self.greeting = None
        self.events = []
        self._buf = b""
        self._next_id = 1
        self._decoder = json.JSONDecoder()

    # ---- connection ------------------------------------------------------
    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc):
        self.close()

    def connect(self, alive=None):
        """Connect (retrying until the socket accepts), negotiate caps.

        `alive`, if given, is called while retrying; when it returns False
        (e.g. the QEMU process died) we give up at once.
        """
        deadline = time.monotonic() + self.connect_timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                break
            except OSError as e:
                s.close()
                if alive is not None and not alive():
                    raise QMPConnectionError(
                        f"QMP socket {self.path}: the process exited") from e
                if time.monotonic() > deadline:
                    raise QMPConnectionError(
                        f"cannot connect to QMP socket {self.path}: {e}") from e
                time.sleep(0.05)
        self.sock = s
        # QEMU can send an event before the greeting: a monitor whose
        # client has connected but whose "opened" handler (which sends the
        # greeting and starts capabilities negotiation) has not run yet is
        # not yet marked as negotiating, so monitor_qapi_event_emit()
        # writes events to it (seen: EXTENT_LOCK_RESERVATION_CHANGED of a
        # node subscribing at start, under load).  Keep such events.
        deadline = time.monotonic() + self.connect_timeout
        while True:
            msg = self._read_message(max(0.0, deadline - time.monotonic()))
            if "QMP" in msg:
                self.greeting = msg
                break
            if "event" not in msg:
                raise QMPConnectionError(f"unexpected QMP greeting: {msg}")
            self.events.append(msg)
        self.execute("qmp_capabilities")
        return self

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    # ---- low level -------------------------------------------------------
    def _read_message(self, timeout):
        """Return the next JSON object from the socket."""
        deadline = time.monotonic() + timeout
        while True:
            text = self._buf.lstrip()
            if text:
                try:
                    obj, end = self._decoder.raw_decode(text.decode("utf-8"))
                except ValueError:
                    obj = None          # incomplete: read more
                else:
                    self._buf = text.decode("utf-8")[end:].encode("utf-8")
                    return obj
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QMPTimeout(f"no QMP message within {timeout} s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout as e:
                raise QMPTimeout(f"no QMP message within {timeout} s") from e
            except OSError as e:
                raise QMPConnectionError(f"QMP socket error: {e}") from e
            if not chunk:
                raise QMPConnectionError("QMP connection closed by QEMU")
            self._buf += chunk

    def send(self, obj):
        if self.sock is None:
            raise QMPConnectionError("not connected")
        try:
            self.sock.sendall(json.dumps(obj).encode("utf-8") + b"\n")
        except OSError as e:
            raise QMPConnectionError(f"QMP send failed: {e}") from e

    # ---- commands ----------------------------------------------------------
    def execute(self, command, args=None, timeout=None, **kwargs):
        """Run a command; return its "return" value or raise QMPError.

        Arguments can be given as a dict (`args`) or as keyword arguments
        (use args= for names with '-' in them).
        """
        arguments = dict(args or {})
        arguments.update(kwargs)
        msg_id = self._next_id
        self._next_id += 1
        msg = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        self.send(msg)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read_message(max(0.0, deadline - time.monotonic()))
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != msg_id:
                continue                # a stale reply from a timed-out call
            if "error" in reply:
                raise QMPError(command, reply["error"])
            return reply.get("return")

    def execute_error(self, command, args=None, **kwargs):
        """Run a command that must fail; return the QMPError."""
        try:
            ret = self.execute(command, args, **kwargs)
        except QMPError as e:
            return e
        raise AssertionError(f"{command} succeeded unexpectedly: {ret!r}")

    def hmp(self, command_line, timeout=None):
        """Run an HMP command through human-monitor-command; return its text."""
        return self.execute("human-monitor-command",
                            {"command-line": command_line}, timeout=timeout)

    # ---- events ------------------------------------------------------------
    def poll_events(self, timeout=0.0):
        """Read whatever events are pending (waiting up to `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self._read_message(max(0.001, deadline - time.monotonic()))
            except QMPTimeout:
                return self.events
            if "event" in msg:
                self.events.append(msg)

    def wait_event(self, name, timeout=None, match=None):
        """Return (and remove from the queue) the first event `name` for which
        match(event) is true, waiting up to `timeout` seconds."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name and (match is None or match(ev)):
                    return self.events.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QMPTimeout(f"event {name} did not arrive")
            msg = self._read_message(remaining)
            if "event" in msg:
                self.events.append(msg)
