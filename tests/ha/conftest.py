"""pytest fixtures for the HA coordinator tests (extlockd on etcd).

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

  etcd       a real 3-member etcd 3.4 cluster on loopback ports chosen at
             start, data dirs under the test's tmp dir, heartbeat TTL/40
             and election timeout TTL/4 (etcd's minimum lease TTL is 3 x
             its election timeout, rounded up to a second)

The replicas' etcd lease TTL is HA_TTL_MS: 2000 unless EXTLOCK_HA_TTL_MS
says otherwise.  2 s rather than the 1 s of the failover benchmark
(scripts/bench-ha.sh): the test command runs on two cores shared with
other jobs, where etcd itself (25 ms heartbeats) and the keep-alives can
be starved long enough for a 1 s lease to cost a spurious failover.
  ha         an HaCluster: starts extlockd replicas (each behind its own
             TCP relay to every etcd member, so a test can cut one replica
             off etcd while its clients still reach it), reads their event
             logs and status, stops everything at teardown

Run from the repository root:  /usr/bin/python3 -m pytest -v tests/ha
Needs build/ (extlockd, extlockctl) and etcd (scripts/install-deps.sh).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

HA_TTL_MS = int(os.environ.get("EXTLOCK_HA_TTL_MS", "2000"))
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD = Path(os.environ.get("EXTLOCK_BUILD", REPO / "build"))
EXTLOCKD = BUILD / "contrib/extlockd/extlockd"
EXTLOCKCTL = BUILD / "contrib/extlockctl/extlockctl"
sys.path.insert(0, str(HERE))


def _terminate_gracefully(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    signal.signal(signal.SIGTERM, _terminate_gracefully)


def wait_for(pred, timeout, what, interval=0.02):
    """Poll pred() until it returns a true value; bounded."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError("timed out after %.1f s waiting for %s"
                                 % (timeout, what))
        time.sleep(interval)


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def etcd_post(url, path, body, timeout=1.0):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class Etcd:
    """A 3-member etcd cluster on loopback."""

    def __init__(self, tmp, n=3, ttl_ms=None):
        self.tmp = Path(tmp)
        self.ttl_ms = ttl_ms or HA_TTL_MS
        self.n = n
        ports = free_ports(2 * n)
        self.client_ports = ports[:n]
        self.peer_ports = ports[n:]
        self.names = ["e%d" % i for i in range(n)]
        self.procs = [None] * n
        self.initial = ",".join("%s=http://127.0.0.1:%d" % (nm, p) for nm, p
                                in zip(self.names, self.peer_ports))

    def url(self, i):
        return "http://127.0.0.1:%d" % self.client_ports[i]

    @property
    def urls(self):
        return [self.url(i) for i in range(self.n)]

    def start(self, i, state="new"):
        d = self.tmp / ("etcd-%s" % self.names[i])
        log = open(self.tmp / ("etcd-%s.log" % self.names[i]), "a")
        self.procs[i] = subprocess.Popen(
            ["etcd", "--name", self.names[i], "--data-dir", str(d),
             "--listen-client-urls", self.url(i),
             "--advertise-client-urls", self.url(i),
             "--listen-peer-urls", "http://127.0.0.1:%d" % self.peer_ports[i],
             "--initial-advertise-peer-urls",
             "http://127.0.0.1:%d" % self.peer_ports[i],
             "--initial-cluster", self.initial,
             "--initial-cluster-state", state,
             "--initial-cluster-token", "extlock-ha-test",
             "--heartbeat-interval", str(self.ttl_ms // 40),
             "--election-timeout", str(self.ttl_ms // 4)],
            stdout=log, stderr=subprocess.STDOUT)

    def start_all(self):
        for i in range(self.n):
            self.start(i)
        wait_for(self.healthy, 30, "etcd cluster health")

    def status(self, i):
        try:
            return etcd_post(self.url(i), "/v3/maintenance/status", {}, 0.5)
        except Exception:
            return None

    def healthy(self):
        sts = [self.status(i) for i in range(self.n)]
        return all(st and st.get("leader") for st in sts)

    def leader_index(self):
        for i in range(self.n):
            st = self.status(i)
            if st and st.get("leader") == st["header"]["member_id"]:
                return i
        return None

    def kill(self, i):
        p = self.procs[i]
        if p and p.poll() is None:
            p.kill()
            p.wait()
        self.procs[i] = None

    def stop_all(self):
        for i in range(self.n):
            self.kill(i)


class Relay:
    """A TCP relay from a local port to an etcd member: cut() drops every
    connection and black-holes new ones (a partition), heal() restores."""

    def __init__(self, target_port):
        self.target = target_port
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.cut_ev = threading.Event()
        self.closed = False
        self.conns = []
        self.mu = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            if self.cut_ev.is_set():
                with self.mu:
                    self.conns.append(c)      # held, never answered
                continue
            try:
                u = socket.create_connection(("127.0.0.1", self.target), 1)
            except OSError:
                c.close()
                continue
            with self.mu:
                self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b),
                                 daemon=True).start()

    def _pipe(self, a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data or self.cut_ev.is_set():
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        self.cut_ev.set()
        with self.mu:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def heal(self):
        self.cut_ev.clear()

    def close(self):
        self.closed = True
        self.cut()
        self.lsock.close()


class Replica:
    def __init__(self, cluster, name, extra_args=(), env=None, lean=False,
                 ttl_ms=None):
        self.lean = lean            # no event log, no debug checks
        # the replica's etcd lease TTL (default: the etcd cluster's, from
        # which etcd's own election timeout is derived)
        self.ttl_ms = ttl_ms or cluster.etcd.ttl_ms
        self.cl = cluster
        self.name = name
        self.sock = str(cluster.dir / ("%s.sock" % name))
        self.address = "unix:" + self.sock
        self.event_log = cluster.dir / ("%s.events" % name)
        self.log_path = cluster.dir / ("%s.log" % name)
        self.relays = [Relay(p) for p in cluster.etcd.client_ports]
        self.extra_args = list(extra_args)
        self.env = env
        self.proc = None

    def endpoints(self):
        return ",".join("http://127.0.0.1:%d" % r.port for r in self.relays)

    def args(self):
        a = [str(EXTLOCKD), "--etcd-endpoints=" + self.endpoints(),
             "--cluster", self.cl.name, "--member-id", self.name,
             "--listen", self.address,
             "--etcd-lease-ttl-ms", str(self.ttl_ms),
             "--fence-margin-ms", "200"]
        if not self.lean:
            a += ["--event-log", str(self.event_log), "--debug-checks"]
        return a + self.extra_args

    def start(self):
        env = dict(os.environ)
        env.update(self.env or {})
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.args(), stdout=log,
                                     stderr=subprocess.STDOUT, env=env)
        wait_for(lambda: os.path.exists(self.sock) or
                 self.proc.poll() is not None, 10, "%s listening" % self.name)
        assert self.proc.poll() is None, self.log()

    def kill9(self):
        t = time.monotonic_ns()
        self.proc.kill()
        self.proc.wait()
        return t

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def partition(self):
        t = time.monotonic_ns()
        for r in self.relays:
            r.cut()
        return t

    def heal(self):
        for r in self.relays:
            r.heal()

    def log(self):
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def events(self, kind=None):
        out = []
        try:
            text = self.event_log.read_text()
        except OSError:
            return out
        # the daemon may be writing a line right now: only whole lines count
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()
        for ln in lines:
            if not ln.strip():
                continue
            ev = json.loads(ln)
            if kind is None or ev["event"] == kind:
                out.append(ev)
        return out

    def status(self, timeout=5):
        r = subprocess.run([str(EXTLOCKCTL), "-c", self.address, "--json",
                            "status"], capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            return None
        return json.loads(r.stdout)

    def role(self):
        st = self.status()
        return st and st["cluster"]["role"]

    def close(self):
        self.stop()
        for r in self.relays:
            r.close()


class HaCluster:
    def __init__(self, etcd, directory, name):
        self.etcd = etcd
        self.dir = Path(directory)
        self.name = name
        self.replicas = []

    def add(self, name, **kw):
        r = Replica(self, name, **kw)
        self.replicas.append(r)
        return r

    def start(self, n=3, **kw):
        for i in range(n):
            self.add("x%d" % i, **kw)
        self.replicas[0].extra_args.append("--create-cluster")
        for r in self.replicas:
            r.start()
        return self.wait_leader()

    def leader(self):
        for r in self.replicas:
            if r.proc and r.proc.poll() is None:
                try:
                    if r.role() == "leader":
                        return r
                except Exception:
                    pass
        return None

    def wait_leader(self, timeout=20, not_=None):
        return wait_for(lambda: (lambda l: l if l and l is not not_ else None)
                        (self.leader()), timeout, "an elected leader")

    def addresses(self):
        return [r.address for r in self.replicas]

    def close(self):
        for r in self.replicas:
            r.close()


def _etcd_cluster(tmp_path_factory, ttl_ms=None):
    if not shutil.which("etcd"):
        pytest.skip("etcd is not installed (scripts/install-deps.sh)")
    e = Etcd(tmp_path_factory.mktemp("etcd"), ttl_ms=ttl_ms)
    e.start_all()
    return e


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    e = _etcd_cluster(tmp_path_factory)
    yield e
    e.stop_all()


def _ha_cluster(etcd, request):
    # a short dir: UNIX socket paths must stay below 108 bytes
    d = Path(os.environ.get("TMPDIR", "/tmp")) / ("ha-%d-%s" % (
        os.getpid(), request.node.name[:20].replace("[", "_")))
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    name = "t%d-%s" % (os.getpid(), request.node.name[:40].replace(
        "[", "_").replace("]", "").replace("_", "-"))
    c = HaCluster(etcd, d, name)
    yield c
    c.close()
    if not getattr(request.node, "rep_call", None) or \
            request.node.rep_call.passed:
        shutil.rmtree(d, ignore_errors=True)
    else:
        print("kept", d)


@pytest.fixture
def ha(etcd, request):
    yield from _ha_cluster(etcd, request)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
