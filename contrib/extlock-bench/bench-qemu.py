#!/usr/bin/python3
"""Benchmark of the extlock block filter inside QEMU.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Everything is measured in one run, so the ratios compare like with like on
a noisy machine:

1. Filter cost.  `qemu-img bench` (4 KiB requests, queue depth 32, offsets
   scattered over the image by a large prime step, reads and writes) against
     (a) the image node alone,
     (b) a QEMU passthrough node with no work to do: blkdebug without
         rules.  QEMU's cheapest filter, throttle, cannot stand here:
         QEMU 7.2's qemu-img bench has no --object and throttle needs a
         throttle-group object; copy-on-read needs write permission, which
         qemu-img bench does not give when it reads,
     (c) extlock with lock-cache=on (the default),
     (d) extlock with lock-cache=off (one coordinator round trip per
         request),
   on null-co (which magnifies filter cost) and on a raw image on a
   loopback NFS export (nfs-ganesha).  Runs are interleaved and repeated;
   the median is reported with its ratio to (a).

2. Handoff latency.  Two qemu-io processes write the same 4 KiB extent in
   turn (each sleeps between its writes, offset by half a period, so the
   lock changes hands on almost every write).  qemu-io prints every write's
   latency; the same workload with one process gives the baseline.  The
   handoff latency is a write's latency under contention minus the
   baseline median.  The coordinator's revocation count confirms the
   handoffs happened.

Usage: bench-qemu.py [--quick] [--no-nfs] [--repeat N] [--json FILE]
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "qemu"))

from harness import procs                       # noqa: E402
from harness.ganesha import NfsServer           # noqa: E402
from harness.coordinator import (CoordinatorClient,  # noqa: E402
                                 coordinator_status)

STEP = 4096 * 7919          # prime number of blocks: scattered offsets


def qemu_img_bench(image_opts, count, write):
    argv = [procs.binary("qemu-img"), "bench", "--image-opts",
            "-c", str(count), "-d", "32", "-s", "4096", "-S", str(STEP)]
    if write:
        argv.append("-w")
    argv.append(image_opts)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    m = re.search(r"Run completed in ([0-9.]+) seconds", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"qemu-img bench failed: {out.stdout}{out.stderr}")
    return count / float(m.group(1))


def opts_str(opts):
    return ",".join(f"{k}={v}" for k, v in opts.items())


def configs(base, coordinator):
    """The four chains over the image node options @base (a dict)."""
    def under(prefix, extra):
        d = dict(extra)
        for k, v in base.items():
            d[f"{prefix}.{k}"] = v
        return d

    ext = {"driver": "extlock", "lock-space": "bench",
           "coordinator.type": "unix", "coordinator.path": coordinator}
    return [
        ("a: no filter", dict(base)),
        ("b: blkdebug", under("image", {"driver": "blkdebug"})),
        ("c: extlock cache=on", under("file", ext)),
        ("d: extlock cache=off", under("file", dict(ext, **{
            "lock-cache": "off"}))),
    ]


def throughput(backends, coordinator, repeat, counts):
    results = []
    for bname, base in backends:
        for write in (False, True):
            cfgs = configs(base, coordinator)
            samples = {name: [] for name, _ in cfgs}
            for _ in range(repeat):
                for name, opts in cfgs:
                    count = counts[bname]
                    if "cache=off" in name:
                        count = max(2000, count // 10)
                    samples[name].append(
                        qemu_img_bench(opts_str(opts), count, write))
            base_iops = statistics.median(samples[cfgs[0][0]])
            for name, _ in cfgs:
                iops = statistics.median(samples[name])
                results.append({"backend": bname,
                                "op": "write" if write else "read",
                                "config": name, "iops": round(iops),
                                "ratio": round(iops / base_iops, 3)})
    return results


def write_latencies(stdout):
    """Per-write latency in microseconds from qemu-io's output lines."""
    lat = []
    for m in re.finditer(r"and ([0-9.]+) ops/sec\)", stdout):
        lat.append(1e6 / float(m.group(1)))
    return lat


def handoff(workdir, coordinator, writes, period_ms):
    img = workdir / "handoff.raw"
    with open(img, "wb") as f:
        f.truncate(1 << 20)

    def opts(client):
        return opts_str({"driver": "extlock", "lock-space": "handoff",
                         "client-id": client, "min-hold-time": "0",
                         "coordinator.type": "unix",
                         "coordinator.path": coordinator,
                         "file.driver": "file",
                         "file.filename": str(img)})

    def cmds(pattern, delay_first):
        c = []
        if delay_first:
            c += ["-c", f"sleep {period_ms // 2}"]
        for _ in range(writes):
            c += ["-c", f"write -P {pattern} 0 4k", "-c", f"sleep {period_ms}"]
        return c

    def run(clients):
        ps = [subprocess.Popen([procs.binary("qemu-io"), "--image-opts",
                                opts(name)] + cmds(i + 1, i == 1),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
              for i, name in enumerate(clients)]
        lat = []
        for p in ps:
            out, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"qemu-io failed: {err}")
            lat += write_latencies(out)[1:]     # the first is a cold start
        return lat

    # An idle session keeps the lock-space, and so its counters, alive
    with CoordinatorClient(f"unix:{coordinator}") as observer:
        observer.hello("bench-observer", "handoff")
        before = revokes(coordinator, "handoff")
        alone = run(["alone"])
        mid = revokes(coordinator, "handoff")
        both = run(["host-a", "host-b"])
        after = revokes(coordinator, "handoff")
    base = statistics.median(alone)
    hand = sorted(max(0.0, x - base) for x in both)
    return {
        "writes_per_process": writes,
        "baseline_write_p50_us": round(base, 1),
        "contended_write_p50_us": round(statistics.median(both), 1),
        "handoff_p50_us": round(percentile(hand, 50), 1),
        "handoff_p99_us": round(percentile(hand, 99), 1),
        "revocations_alone": mid - before,
        "revocations_contended": after - mid,
    }


def revokes(coordinator, space):
    st = coordinator_status(f"unix:{coordinator}")
    total = 0
    for ls in st.get("lock-spaces", []):
        if ls.get("name") == space:
            total += ls.get("counters", {}).get("revokes-sent", 0)
    return total


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests")
    ap.add_argument("--no-nfs", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--only", choices=("throughput", "handoff"),
                    help="run only one of the two parts")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="extlock-bench-"))
    group = procs.ProcessGroup(workdir)
    nfs = None
    try:
        daemon = group.extlockd(debug_checks=False)
        coordinator = str(daemon.socket_path)
        backends = [("null-co", {"driver": "null-co", "size": str(1 << 30)})]
        counts = {"null-co": 100000 if args.quick else 400000}
        if not args.no_nfs:
            nfs = NfsServer(workdir=workdir / "nfs")
            nfs.start()
            img = Path(nfs.export_dir) / "bench.raw"
            with open(img, "wb") as f:
                f.truncate(256 << 20)
            backends.append(("nfs raw", {
                "driver": "raw", "file.driver": "nfs",
                "file.server.type": "inet", "file.server.host": "127.0.0.1",
                "file.path": f"{nfs.nfs_path}/bench.raw"}))
            counts["nfs raw"] = 10000 if args.quick else 40000

        tp = ho = None
        if args.only != "handoff":
            tp = throughput(backends, coordinator, args.repeat, counts)
        if args.only != "throughput":
            ho = handoff(workdir, coordinator, 100 if args.quick else 400, 4)

        if tp:
            print("\nFilter cost (qemu-img bench, 4 KiB, QD32, scattered "
                  "offsets; median of %d)" % args.repeat)
            print("%-8s %-6s %-22s %10s %8s" % ("backend", "op", "chain",
                                                "IOPS", "vs (a)"))
            for r in tp:
                print("%-8s %-6s %-22s %10d %8.3f" % (
                    r["backend"], r["op"], r["config"], r["iops"],
                    r["ratio"]))
        if ho:
            print("\nHandoff: two qemu-io processes writing one 4 KiB extent "
                  "in turn (%d writes each)" % ho["writes_per_process"])
            for k in ("baseline_write_p50_us", "contended_write_p50_us",
                      "handoff_p50_us", "handoff_p99_us",
                      "revocations_alone", "revocations_contended"):
                print("  %-24s %s" % (k, ho[k]))
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"throughput": tp, "handoff": ho}, indent=2))
    finally:
        group.stop_all()
        if nfs:
            nfs.stop()


if __name__ == "__main__":
    main()
