"""A minimal Python client of the extlockd wire protocol, for tests.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

The protocol is one JSON object per line (docs/protocol.rst).  The QEMU
tests use this client to look at the coordinator from outside (the "status"
request, allowed before "hello") and to play a third party that holds a lock
so that a QEMU process has to wait for it.  It is deliberately simple and
synchronous: requests are answered in order except that a "lock" may first
be answered with "waiting"; replies for other ids and notifications are
queued in self.pending / self.notifications.
"""

import json
import socket
import time


class CoordinatorError(Exception):
    """An "error" reply: .code and .message as sent by extlockd."""

    def __init__(self, reply):
        self.reply = reply
        self.code = reply.get("code", "")
        self.message = reply.get("message", "")
        super().__init__(f"{self.code}: {self.message}")


def parse_address(address):
    """'unix:/path' or 'tcp:HOST:PORT' -> (family, sockaddr)."""
    if address.startswith("unix:"):
        return socket.AF_UNIX, address[5:]
    if address.startswith("tcp:"):
        host, _, port = address[4:].rpartition(":")
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError(f"tests only talk to loopback, not {host}")
        return socket.AF_INET, ("127.0.0.1", int(port))
    raise ValueError(f"bad coordinator address {address!r}")


class CoordinatorClient:
    """One connection to extlockd."""

    def __init__(self, address, timeout=10.0):
        family, sockaddr = parse_address(address)
        self.timeout = timeout
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(sockaddr)
        self._buf = b""
        self._next_id = 1
        self.pending = {}           # id -> [replies not yet consumed]
        self.notifications = []
        self.session = None
        self.welcome = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # ---- framing -----------------------------------------------------------
    def _send(self, msg):
        self.sock.sendall(json.dumps(msg).encode("utf-8") + b"\n")

    def _recv(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message from the coordinator")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout as e:
                raise TimeoutError("no message from the coordinator") from e
            if not chunk:
                raise ConnectionError("the coordinator closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def request(self, msg):
        """Send a request (an "id" is added); return its id."""
        msg = dict(msg)
        msg["id"] = self._next_id
        self._next_id += 1
        self._send(msg)
        return msg["id"]

    def reply(self, req_id, timeout=None, accept_waiting=False):
        """Next reply for `req_id`; "error" replies raise CoordinatorError.

        A "waiting" interim reply is returned only if accept_waiting is true
        (and skipped otherwise)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            queue = self.pending.get(req_id)
            while queue:
                r = queue.pop(0)
                if r.get("type") == "waiting" and not accept_waiting:
                    continue
                if r.get("type") == "error":
                    raise CoordinatorError(r)
                return r
            msg = self._recv(max(0.0, deadline - time.monotonic()))
            if "id" in msg:
                self.pending.setdefault(msg["id"], []).append(msg)
            else:
                self.notifications.append(msg)

    def call(self, msg, timeout=None):
        return self.reply(self.request(msg), timeout)

    # ---- protocol verbs ------------------------------------------------------
    def hello(self, client_id, lock_space, lease_ms=None):
        msg = {"type": "hello", "version": 2, "client-id": client_id,
               "lock-space": lock_space}
        if lease_ms:
            msg["lease-ms"] = lease_ms
        self.welcome = self.call(msg)
        self.session = self.welcome.get("session")
        return self.welcome

    def lock(self, offset, length, mode="exclusive", wait=True, timeout=None):
        """Request a lock and wait for the grant; return the "granted" reply."""
        return self.call({"type": "lock", "offset": offset, "length": length,
                          "mode": mode, "wait": wait}, timeout)

    def unlock(self, lock_id):
        return self.call({"type": "unlock", "lock": lock_id})

    def status(self):
        return self.call({"type": "status"})["status"]

    def bye(self):
        return self.call({"type": "bye"})


def coordinator_status(address, timeout=10.0):
    """The "status" object of the coordinator at `address`."""
    with CoordinatorClient(address, timeout) as c:
        return c.status()


def release_after_fresh_renewal(address, client_id, lease_ms, timeout=None):
    """Wait until the coordinator has just renewed `client_id`'s lease (its
    status shows "lease-remaining-ms" within a few percent of the lease),
    and return the coordinator's own earliest time (time.monotonic(),
    CLOCK_MONOTONIC like extlockd's clock) at which it may hand that
    session's locks to someone else if the session renews no more: its
    lease deadline plus its "fence-margin-ms".

    Act right after this returns (kill the client, cut its link): the next
    renewal is a third of a lease away, so none is on its way and the
    deadline read here is final.  The deadline is at least t0 + remaining
    (t0 taken before the status request, whose round trip is kept below
    20 ms), so the value returned is the true earliest release minus at
    most that round trip and the truncation to whole ms."""
    deadline = time.monotonic() + (timeout or lease_ms / 1000 + 5)
    tolerance = max(50, lease_ms / 20)
    last = None
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        st = coordinator_status(address)
        t1 = time.monotonic()
        sess = [s for s in st["sessions"]
                if s["client-id"] == client_id and s["state"] == "active"]
        if len(sess) == 1:
            last = sess[0]["lease-remaining-ms"]
            if last >= lease_ms - tolerance and t1 - t0 < 0.02:
                return t0 + last / 1000 + st["fence-margin-ms"] / 1000
        time.sleep(0.003)
    raise TimeoutError(f"no fresh renewal of {client_id} seen at the coordinator "
                       f"(last remaining: {last} ms)")
