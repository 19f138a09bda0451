# SPDX-License-Identifier: GPL-2.0-or-later
"""A small extlock protocol client for the HA tests and scripts/bench-ha.sh.

It speaks the JSON-lines protocol of docs/protocol.rst over UNIX sockets,
knows several coordinator addresses, follows "not-leader", and on a lost
connection reconnects, resumes or reclaims its session and re-asserts the
locks it holds (the same path the QEMU driver takes after a coordinator
restart).

A Worker thread runs lock/hold/unlock rounds on a small set of hot extents
and records every hold as (start, end, offset, length, mode, token) on
time.monotonic_ns(), the clock of extlockd's event log (CLOCK_MONOTONIC),
so that tests can check that no two conflicting holds overlapped.  A lock
kept across a reconnect is held until it is reclaimed and unlocked, or
until the client's own lease deadline (time it sent its last acknowledged
renewal + lease), whichever comes first: that is what a driver does.
"""
import json
import random
import socket
import threading
import time


class ProtocolError(Exception):
    pass


class Lost(Exception):
    """The connection broke (or the coordinator closed it)."""


def now_ns():
    return time.monotonic_ns()


class HaClient:
    def __init__(self, addresses, client_id, lock_space, lease_ms=3000,
                 follow=True):
        self.addresses = list(addresses)
        self.client_id = client_id
        self.lock_space = lock_space
        self.lease_ms = lease_ms
        self.follow = follow
        self.sock = None
        self.buf = b""
        self.next_id = 1
        self.session = None
        self.secret = None
        self.address = None
        self.epoch = None
        self.deadline_ns = 0        # the client's own lease deadline
        self.held = {}              # lock id -> dict(offset, length, mode, token)
        self.reconnects = 0
        self.reclaimed = 0
        self.sessions_started = 0
        self.notifications = []

    # -- transport -------------------------------------------------------
    def _send(self, msg):
        if "id" not in msg:
            msg["id"] = self.next_id
            self.next_id += 1
        try:
            self.sock.sendall((json.dumps(msg) + "\n").encode())
        except OSError as e:
            raise Lost(str(e))
        return msg["id"]

    def _recv(self, timeout):
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from %s" % self.address)
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as e:
                raise Lost(str(e))
            if not data:
                raise Lost("connection closed by %s" % self.address)
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, msg, timeout=10.0):
        """Send a request, return its final reply (skipping interim ones)."""
        rid = self._send(msg)
        while True:
            r = self._recv(timeout)
            if "id" not in r or r.get("type") == "revoke":
                self.notifications.append(r)
                if r.get("type") == "session-expired":
                    raise Lost("session expired")
                continue
            if r["id"] != rid or r.get("type") == "waiting":
                continue
            return r

    def close(self):
        if self.sock:
            self.sock.close()
            self.sock = None

    # -- sessions ----------------------------------------------------------
    def _hello(self, addr):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2.0)
        s.connect(addr[5:] if addr.startswith("unix:") else addr)
        self.sock, self.buf, self.address = s, b"", addr
        msg = {"type": "hello", "version": 2, "client-id": self.client_id,
               "lock-space": self.lock_space, "lease-ms": self.lease_ms}
        if self.session:
            msg["session"] = self.session
            msg["resume-secret"] = self.secret
        sent = now_ns()
        return sent, self.call(msg, timeout=5.0)

    def connect(self, timeout=30.0):
        """Reach the leader; resume or reclaim the session.  Returns the
        address.  Raises TimeoutError if no leader answered in time."""
        end = time.monotonic() + timeout
        queue = []
        last = None
        while time.monotonic() < end:
            if not queue:
                queue = list(self.addresses)
                if last is not None:
                    time.sleep(0.02)
            addr = queue.pop(0)
            self.close()
            try:
                sent, r = self._hello(addr)
            except (OSError, Lost, TimeoutError) as e:
                last = "%s: %s" % (addr, e)
                self.close()
                continue
            if r.get("type") == "error" and r.get("code") == "not-leader":
                last = "%s: %s" % (addr, r.get("message"))
                self.close()
                if self.follow and r.get("leader") and r["leader"] != addr:
                    queue.insert(0, r["leader"])
                continue
            if r.get("type") != "welcome":
                raise ProtocolError("hello refused by %s: %s" % (addr, r))
            self._welcome(sent, r)
            return addr
        raise TimeoutError("no leader within %.1f s (last: %s)"
                           % (timeout, last))

    def _welcome(self, sent, r):
        if self.session and r["session"] == self.session:
            self.reconnects += 1
        else:
            self.sessions_started += 1
            # a new session: the old locks are gone
            for h in self.held.values():
                h["lost"] = True
            self.held.clear()
        self.session = r["session"]
        self.secret = r.get("resume-secret", self.secret)
        self.epoch = r.get("epoch")
        self.deadline_ns = max(self.deadline_ns,
                               sent + r["lease-ms"] * 1_000_000)
        if r.get("reclaim"):
            for lid, h in list(self.held.items()):
                g = self.call({"type": "reclaim", "offset": h["offset"],
                               "length": h["length"], "mode": h["mode"],
                               "token": h["token"]})
                del self.held[lid]
                if g.get("type") == "granted":
                    h["lock"] = g["lock"]
                    self.held[g["lock"]] = h
                    self.reclaimed += 1
                else:
                    h["lost"] = True
            self.call({"type": "reclaim-done"})
        elif r.get("resumed"):
            ids = {lk["lock"] for lk in r.get("locks", [])}
            for lid in list(self.held):
                if lid not in ids:
                    self.held.pop(lid)["lost"] = True

    def renew(self):
        sent = now_ns()
        r = self.call({"type": "renew"})
        if r.get("type") == "renewed":
            self.deadline_ns = max(self.deadline_ns,
                                   sent + r["lease-ms"] * 1_000_000)
        return r

    def lock(self, offset, length, mode, timeout=30.0):
        r = self.call({"type": "lock", "offset": offset, "length": length,
                       "mode": mode}, timeout=timeout)
        if r.get("type") != "granted":
            raise ProtocolError("lock refused: %s" % r)
        h = {"lock": r["lock"], "offset": r["offset"], "length": r["length"],
             "mode": mode, "token": r["token"]}
        self.held[r["lock"]] = h
        return h

    def unlock(self, lock_id):
        self.held.pop(lock_id, None)
        return self.call({"type": "unlock", "lock": lock_id})

    def bye(self):
        try:
            self.call({"type": "bye"}, timeout=2.0)
        except Exception:
            pass
        self.close()


class Worker(threading.Thread):
    """Lock, hold for hold_ms, unlock, in a loop, on one of n_extents hot
    extents; reconnect on failure.  Records holds and grants."""

    EXTENT = 1 << 20

    def __init__(self, addresses, client_id, lock_space, lease_ms=3000,
                 hold_ms=(1, 5), n_extents=4, exclusive=0.7, seed=0,
                 follow=True):
        super().__init__(daemon=True)
        self.c = HaClient(addresses, client_id, lock_space, lease_ms,
                          follow=follow)
        self.hold_ms = hold_ms
        self.n_extents = n_extents
        self.exclusive = exclusive
        self.rng = random.Random(seed)
        self.stop_ev = threading.Event()
        self.holds = []            # (start, end, offset, length, mode, token)
        self.grants = []           # (time received, token, address)
        self.errors = []
        self.outages = []          # (lost at, welcome again at)
        self.lock = threading.Lock()

    def _renew_due(self, last_renew):
        return now_ns() - last_renew > self.c.lease_ms * 1_000_000 // 3

    def run(self):
        c = self.c
        try:
            c.connect()
        except Exception as e:
            self.errors.append("connect: %s" % e)
            return
        last_renew = now_ns()
        current = None              # (start, hold dict)
        while not self.stop_ev.is_set():
            try:
                if self._renew_due(last_renew):
                    c.renew()
                    last_renew = now_ns()
                if current is None:
                    ext = self.rng.randrange(self.n_extents) * self.EXTENT
                    mode = ("exclusive" if self.rng.random() < self.exclusive
                            else "shared")
                    h = c.lock(ext, self.EXTENT, mode)
                    t = now_ns()
                    with self.lock:
                        self.grants.append((t, h["token"], c.address))
                    current = (t, h)
                time.sleep(self.rng.uniform(*self.hold_ms) / 1000)
                start, h = current
                if h.get("lost"):
                    # gone in a reconnect: it was ours until our deadline
                    self._record(start, min(now_ns(), c.deadline_ns), h)
                    current = None
                    continue
                # done with it: the hold ends here even if the unlock is
                # lost with the connection (then it is not reclaimed)
                self._record(start, now_ns(), h)
                current = None
                c.unlock(h["lock"])
            except (Lost, TimeoutError, OSError) as e:
                lost_at = now_ns()
                try:
                    c.connect(timeout=60.0)
                    last_renew = now_ns()
                    self.outages.append((lost_at, now_ns()))
                except Exception as e2:
                    self.errors.append("reconnect after %s: %s" % (e, e2))
                    if current:
                        self._record(current[0], min(now_ns(), c.deadline_ns),
                                     current[1])
                    return
            except ProtocolError as e:
                self.errors.append(str(e))
                return
        if current:
            self._record(current[0], now_ns(), current[1])
            try:
                c.unlock(current[1]["lock"])
            except Exception:
                pass
        c.bye()

    def _record(self, start, end, h):
        with self.lock:
            self.holds.append((start, end, h["offset"], h["length"],
                               h["mode"], h["token"]))

    def stop(self, timeout=30):
        self.stop_ev.set()
        self.join(timeout)


def overlaps(workers):
    """Pairs of conflicting holds of different workers that overlapped."""
    holds = []
    for i, w in enumerate(workers):
        holds += [(i,) + h for h in w.holds]
    bad = []
    by_ext = {}
    for h in holds:
        by_ext.setdefault(h[3], []).append(h)
    for ext, hs in by_ext.items():
        hs.sort(key=lambda h: h[1])
        for a_i, a in enumerate(hs):
            for b in hs[a_i + 1:]:
                if b[1] >= a[2]:
                    break
                if a[0] != b[0] and "exclusive" in (a[5], b[5]):
                    bad.append((a, b))
    return bad
