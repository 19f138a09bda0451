# extlockd --metrics-listen: the text format (promtool), a real Prometheus
# scraping it, garbage requests, and bad option values.
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (c) 2026 The extlock authors
import json
import os
import re
import shutil
import socket
import subprocess

import pytest

from conftest import (BENCH, EXTLOCKD, PROMETHEUS, REPO, Prometheus,
                      wait_for)

PROMTOOL = shutil.which("promtool")

REQUIRED = {
    "extlock_lock_wait_seconds": "histogram",
    "extlock_lock_hold_seconds": "histogram",
    "extlock_sessions": "gauge",
    "extlock_grants_total": "counter",
    "extlock_lease_expiries_total": "counter",
    "extlock_fence_events_total": "counter",
    "extlock_grace_active": "gauge",
}


def bench(d, pairs=300, space="mon"):
    subprocess.run([str(BENCH), "-c", d.address, "-n", "3", "-p", str(pairs),
                    "-r", "0.9", "--hot-extents", "2", "--lock-space", space],
                   check=True, capture_output=True, timeout=120)


def grants_in(text, space="mon"):
    m = re.search(r'^extlock_grants_total\{lock_space="%s"\} (\d+)$' % space,
                  text, re.M)
    return int(m.group(1)) if m else 0


@pytest.mark.skipif(not PROMTOOL, reason="promtool (Debian prometheus) missing")
def test_promtool_check_metrics(extlockd):
    d = extlockd("METRICS")
    bench(d)
    text = wait_for(lambda: (lambda t: t if grants_in(t) >= 300 else None)(
        d.scrape()), 10, "the scraped grants to reach 300")
    p = subprocess.run([PROMTOOL, "check", "metrics"], input=text,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    for name, kind in REQUIRED.items():
        assert f"# TYPE {name} {kind}\n" in text
        assert f"# HELP {name} " in text
    # histogram: cumulative buckets, +Inf == _count == grants
    buckets = [(le, int(v)) for le, v in re.findall(
        r'^extlock_lock_wait_seconds_bucket\{lock_space="mon",le="([^"]+)"\} (\d+)$',
        text, re.M)]
    assert len(buckets) == 33 and buckets[-1][0] == "+Inf"
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)
    count = int(re.search(r'^extlock_lock_wait_seconds_count\{lock_space="mon"\} (\d+)$',
                          text, re.M).group(1))
    assert counts[-1] == count == grants_in(text)
    assert [float(le) for le, _ in buckets[:-1]] == [2 ** k / 1e6 for k in range(32)]


@pytest.mark.skipif(not PROMETHEUS, reason="prometheus (Debian) missing")
def test_real_prometheus_scrapes(extlockd, tmp_path):
    """A real Prometheus scrapes extlockd; its query API sees the grants."""
    d = extlockd("METRICS")
    prom = Prometheus(tmp_path, f"""  - job_name: extlockd
    static_configs:
      - targets: ['127.0.0.1:{d.metrics_port}']
""")
    try:
        bench(d, pairs=500)
        s = prom.wait_series(
            "extlock_grants_total",
            lambda s: s["metric"].get("lock_space") == "mon" and
            float(s["value"][1]) > 0,
            90, "Prometheus to report extlock_grants_total > 0")
        assert s["metric"]["job"] == "extlockd"
        assert float(s["value"][1]) >= 500

        # Every query of the Grafana dashboard is valid PromQL and names
        # metrics extlockd serves
        dash = json.loads((REPO / "contrib/grafana/extlock.json").read_text())
        served = set(re.findall(r"^# TYPE (\w+) ", d.scrape(), re.M))
        exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
        assert len(exprs) >= 15
        for e in exprs:
            names = set(re.findall(r"\b(extlock_\w+)", e))
            assert names, e
            for n in names:
                assert re.sub(r"_(bucket|sum|count)$", "", n) in served, n
            q = (e.replace("$job", ".*").replace("$lock_space", ".*")
                 .replace("$__rate_interval", "1m"))
            assert prom.query(q) is not None, q
    finally:
        prom.stop()


def raw(port, data, read=True):
    """Send @data; the reply, or what came before the server closed (a
    server may close on an over-long request: that is fine)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        out = b""
        try:
            if data:
                s.sendall(data)
            if not read:
                return b""
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            while len(out) < 1 << 20:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except OSError:
            pass
        return out


def test_garbage_requests(extlockd):
    """Junk, other paths and methods get errors or a closed socket; the
    daemon keeps serving both the endpoint and its clients."""
    d = extlockd("METRICS")
    port = d.metrics_port
    assert raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
        b"HTTP/1.1 404")
    assert raw(port, b"GET /metricsX HTTP/1.0\r\n\r\n").startswith(
        b"HTTP/1.0 404") or raw(port, b"GET /metricsX HTTP/1.0\r\n\r\n") \
        .startswith(b"HTTP/1.1 404")
    r = raw(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5"
                  b"\r\n\r\nhello")
    assert r.startswith(b"HTTP/1.1 405") and b"Allow: GET" in r
    r = raw(port, b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.startswith(b"HTTP/1.1 405")
    # (request, whether a 200 is a fine answer: a GET /metrics whose
    # body is broken may be answered before the body is read)
    junk = [
        (os.urandom(4096), False),
        (b"\x00" * 1000 + b"\r\n\r\n", False),
        (b"GET\r\n\r\n", False),
        (b"GET /metrics HTTP/9.9\r\n\r\n", False),
        (b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"a" * 200000 +
         b"\r\n\r\n", False),
        (b"GET /metrics HTTP/1.1\r\n" + b"H: v\r\n" * 20000 + b"\r\n",
         False),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
         True),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
         b"\r\n\r\nzz\r\n", True),
        (b"GET /%00%ff/../metrics HTTP/1.1\r\nHost: x\r\n\r\n", False),
        (b"GET /metrics", False),           # never finished
    ]
    for j, ok in junk:
        r = raw(port, j)
        assert r == b"" or r.startswith(b"HTTP/1."), (j[:40], r[:80])
        if not ok:
            assert not r.startswith(b"HTTP/1.1 200"), j[:40]
        assert d.alive(), d.log.read_text()
    for _ in range(40):                     # connections opened and dropped
        raw(port, b"GET /met", read=False)
    assert d.alive()
    text = d.scrape()
    assert "# TYPE extlock_grants_total counter" in text
    assert d.status()["counters"]["errors"] == 0


@pytest.mark.parametrize("args, message", [
    (["--metrics-listen=nonsense"], "expected IPv4-ADDRESS:PORT"),
    (["--metrics-listen=127.0.0.1"], "expected IPv4-ADDRESS:PORT"),
    (["--metrics-listen=127.0.0.1:"], "expected IPv4-ADDRESS:PORT"),
    (["--metrics-listen=127.0.0.1:99999"], "bad port"),
    (["--metrics-listen=127.0.0.1:-5"], "bad port"),
    (["--metrics-listen=127.0.0.1:80x"], "bad port"),
    (["--metrics-listen=1.2.3.4.5:80"], "expected IPv4-ADDRESS:PORT"),
    (["--metrics-listen=[::1:80"], "expected IPv4-ADDRESS:PORT"),
    (["--metrics-listen=localhost:80"], "expected IPv4-ADDRESS:PORT"),
    (["--long-wait-ms=-1"], "--long-wait-ms"),
    (["--long-hold-ms=abc"], "long-hold-ms"),
    (["--long-hold-ms=99999999999"], "--long-hold-ms"),
])
def test_bad_options(tmp_path, args, message):
    p = subprocess.run([str(EXTLOCKD), "-l", f"unix:{tmp_path}/s",
                        "-s", str(tmp_path / "state"), *args],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert message in p.stderr, p.stderr
    # refused before anything happened: no socket, no state file
    assert not (tmp_path / "s").exists()
    assert not (tmp_path / "state").exists()


def test_metrics_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([str(EXTLOCKD), "-l", f"unix:{tmp_path}/s",
                            "-s", str(tmp_path / "state"),
                            f"--metrics-listen=127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=30)
    assert p.returncode == 1, p.stderr
    assert f"--metrics-listen '127.0.0.1:{port}': cannot listen" in p.stderr
