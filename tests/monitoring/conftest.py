# Fixtures for the monitoring tests (tests/monitoring): a real extlockd
# from the meson build, started on a private UNIX socket and (optionally)
# a loopback metrics port.
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (c) 2026 The extlock authors
import os
import json
import signal
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("EXTLOCK_BUILD", REPO / "build"))
EXTLOCKD = BUILD / "contrib/extlockd/extlockd"
EXTLOCKCTL = BUILD / "contrib/extlockctl/extlockctl"
BENCH = BUILD / "contrib/extlock-bench/extlock-bench"

sys.path.insert(0, str(REPO / "tests/qemu"))
from harness.coordinator import CoordinatorClient  # noqa: E402,F401


def wait_for(cond, timeout, what, interval=0.05):
    """Poll cond() until it returns something true; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, workdir, args):
        self.workdir = Path(workdir)
        self.sock = self.workdir / "extlockd.sock"
        self.address = f"unix:{self.sock}"
        self.log = self.workdir / "extlockd.log"
        self.event_log = self.workdir / "events.jsonl"
        self.metrics_port = None
        argv = [str(EXTLOCKD), "-l", self.address,
                "-s", str(self.workdir / "state"),
                "--event-log", str(self.event_log)]
        for a in args:
            if a == "METRICS":
                self.metrics_port = free_port()
                a = f"--metrics-listen=127.0.0.1:{self.metrics_port}"
            argv.append(a)
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "w"))
        # the socket file exists from bind(), before listen(): wait until
        # a connection is accepted
        wait_for(lambda: self._accepts() or self.proc.poll() is not None,
                 10, "extlockd to accept connections")
        assert self.proc.poll() is None, self.log.read_text()
        if self.metrics_port:
            wait_for(lambda: "metrics at http" in self.log.read_text() or
                     self.proc.poll() is not None, 10, "metrics endpoint")
            assert self.proc.poll() is None, self.log.read_text()

    def _accepts(self):
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.sock))
            return True
        except OSError:
            return False

    def alive(self):
        return self.proc.poll() is None

    def client(self, client_id, space="mon"):
        c = CoordinatorClient(self.address)
        c.hello(client_id, space)
        return c

    def status(self):
        with CoordinatorClient(self.address) as c:
            return c.status()

    def metrics_url(self, path="/metrics"):
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def scrape(self):
        with urllib.request.urlopen(self.metrics_url(), timeout=10) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return r.read().decode()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def extlockd(tmp_path):
    """extlockd(*args): start a daemon (the token METRICS becomes
    --metrics-listen on a free loopback port)."""
    daemons = []

    def start(*args):
        workdir = tmp_path / f"d{len(daemons)}"
        workdir.mkdir()
        d = Daemon(workdir, list(args))
        daemons.append(d)
        return d

    yield start
    for d in daemons:
        d.stop()


PROMETHEUS = shutil.which("prometheus")


class Prometheus:
    """A real Prometheus (Debian's), scraping every second with the
    scrape_configs text @scrape (YAML, indented as a list item under
    scrape_configs); stopped by stop()."""

    def __init__(self, workdir, scrape):
        self.port = free_port()
        cfg = workdir / "prometheus.yml"
        cfg.write_text("global:\n  scrape_interval: 1s\n"
                       "  scrape_timeout: 1s\nscrape_configs:\n" + scrape)
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}",
             f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, expr, timeout=10):
        """The query API's result list for @expr (None while it does not
        answer yet)."""
        q = urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/api/v1/query?{q}",
                    timeout=timeout) as r:
                res = json.load(r)
        except (urllib.error.URLError, ConnectionError):
            return None
        assert res["status"] == "success", (expr, res)
        return res["data"]["result"]

    def wait_series(self, expr, pred, timeout, what):
        """Wait (bounded) for a series of @expr for which pred(series)."""
        def found():
            for s in self.query(expr) or []:
                if pred(s):
                    return s
            return None
        return wait_for(found, timeout, what, interval=0.5)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()
