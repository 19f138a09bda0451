#!/usr/bin/python3
"""Handoff between two guests: where the time of a lock handoff goes.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Runs tests/e2e/run-guests.py (two tiny Linux guests whose virtio-blk disks
are extlock nodes over one image, each running extlock-stress on the same
extents) with extlock only, through two wrappers made for the run: one
starts qemu-system-x86_64 with the driver's extlock_client_handoff trace
events on (one trace file per guest, named after its client-id), the other
starts extlockd with --event-log.  Afterwards every handoff is split into
its parts as bench-qemu.py does for two qemu-io processes (revoke, holder,
give-back, grant, wakeup, resume; all CLOCK_MONOTONIC), and printed with
its ratio to the baseline of the same run: the lock round trip (lock sent
-> granted read, in the driver) of the requests no other guest had to
give anything back for.

Not run by the test suite or CI (two TCG guests take minutes).  Needs what
run-guests.py needs (the guest kernel and initrd of
contrib/guest/build-guest.sh, root); with --storage nfs run it inside
scripts/isolate.sh.

    contrib/extlock-bench/bench-guests.py [--seconds 20] [--storage file]
"""

import argparse
import bisect
import importlib.util
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "bench_qemu", REPO / "contrib" / "extlock-bench" / "bench-qemu.py")
bq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bq)

QEMU_WRAPPER = """#!%(python)s
# qemu-system-x86_64 with the handoff trace events on, one file per guest
import json, os, re, sys
args = sys.argv[1:]
if %(contended)r:
    # every extlock node with lock-cache-contended=on
    for i in range(1, len(args)):
        if args[i - 1] == "-blockdev" and args[i].startswith("{"):
            bd = json.loads(args[i])
            if bd.get("driver") == "extlock":
                bd["lock-cache-contended"] = True
                args[i] = json.dumps(bd)
m = re.search(r'client-id["=:\\s]+"?([A-Za-z0-9_.-]+)', " ".join(args))
name = (m.group(1) if m else "none") + "-%%d" %% os.getpid()
iothread = %(iothread)r
if iothread is not None:
    # the disk (and so its extlock node) in an IOThread of its own
    args = [a + ",iothread=extlock-io" if a.startswith("virtio-blk-pci,")
            else a for a in args]
    args += ["-object", "iothread,id=extlock-io" + iothread]
os.execv(%(qemu)r, [%(qemu)r, "-trace",
         "enable=extlock_client_handoff,file=%(tdir)s/" + name] + args)
"""


def uncontended_round_trips(traces, log):
    """lock-tx -> grant-rx of the grants no other client released for."""
    grants = {e["lock"]: e for e in log if e["event"] == "grant"}
    releases = sorted((e["ts"], e["client-id"])
                      for e in log if e["event"] == "release")
    rel_ts = [t for t, _ in releases]
    out = []
    for cid, ev in traces.items():
        for t5, step, lock in ev:
            if step != "grant-rx":
                continue
            g = grants.get(lock)
            lk = bq.last_before(ev, "lock-tx", t5)
            if not g or g.get("client-id") != cid or not lk:
                continue
            lo = bisect.bisect_left(rel_ts, lk[0])
            hi = bisect.bisect_right(rel_ts, g["ts"])
            if any(c != cid for _, c in releases[lo:hi]):
                continue
            out.append((t5 - lk[0]) / 1000.0)
    return out


def lock_waits(traces):
    """lock-tx -> grant-rx of every lock request, in us"""
    out = []
    for ev in traces.values():
        for t5, step, lock in ev:
            if step == "grant-rx":
                lk = bq.last_before(ev, "lock-tx", t5)
                if lk:
                    out.append((t5 - lk[0]) / 1000.0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--storage", choices=("file", "nfs"), default="file")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--iothread", action="store_true",
                    help="each guest's disk in an IOThread (not the main "
                         "loop, which shares the BQL with the vCPU's I/O "
                         "emulation)")
    ap.add_argument("--poll-max-ns", type=int, default=None,
                    help="with --iothread: its poll-max-ns (QEMU's "
                         "default: 32768)")
    ap.add_argument("--extlockd-poll-us", type=int, default=0,
                    help="extlockd --poll-us")
    ap.add_argument("--lock-cache-contended", action="store_true",
                    help="the guests' extlock nodes with "
                         "lock-cache-contended=on (every handoff a "
                         "revocation)")
    ap.add_argument("--compare-contended", action="store_true",
                    help="run twice, with the defaults and with "
                         "lock-cache-contended=on, and print the ratios")
    args = ap.parse_args()
    if args.poll_max_ns is not None and not args.iothread:
        ap.error("--poll-max-ns needs --iothread")
    iothread = None
    if args.iothread:
        iothread = ("" if args.poll_max_ns is None
                    else ",poll-max-ns=%d" % args.poll_max_ns)
    runs = [False, True] if args.compare_contended else \
        [args.lock_cache_contended]
    results = [one_run(args, iothread, contended) for contended in runs]
    if len(results) == 2:
        a, b = results
        print("\nSame invocation, defaults against lock-cache-contended=on "
              "(ratio: defaults / on):")
        for k in ("ops_per_s", "lock_wait_p50_us", "lock_wait_p99_us"):
            print("  %-18s %10.1f %10.1f   %.2f" % (
                k, a[k], b[k], a[k] / b[k] if b[k] else float("nan")))
    if args.json:
        Path(args.json).write_text(json.dumps(
            results if len(results) > 1 else results[0], indent=2))


def one_run(args, iothread, contended):
    work = Path(tempfile.mkdtemp(prefix="bench-guests-"))
    tdir = work / "traces"
    tdir.mkdir()
    evlog = work / "events.log"
    qemu = bq.procs.binary("qemu-system-x86_64")
    extlockd = bq.procs.binary("extlockd")
    wq = work / "qemu-system-x86_64"
    wq.write_text(QEMU_WRAPPER % {"python": sys.executable, "qemu": qemu,
                                  "tdir": tdir, "iothread": iothread,
                                  "contended": contended})
    (work / "xd").mkdir()
    wx = work / "xd" / "extlockd"
    wx.write_text('#!/bin/sh\nexec %s --event-log %s --poll-us %d "$@"\n' %
                  (extlockd, evlog, args.extlockd_poll_us))
    for w in (wq, wx):
        w.chmod(0o755)

    load0 = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    run = subprocess.run(
        [sys.executable, str(REPO / "tests" / "e2e" / "run-guests.py"),
         "--extlock-only", "--guests", "2", "--seconds", str(args.seconds),
         "--storage", args.storage, "--qemu", str(wq), "--extlockd",
         str(wx), "--json", str(work / "run-guests.json")],
        capture_output=True, text=True, timeout=1800)
    load1 = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    if run.returncode != 0:
        sys.stderr.write(run.stdout + run.stderr)
        sys.exit(f"run-guests.py failed (exit {run.returncode}); kept {work}")

    traces = {}
    for f in sorted(tdir.iterdir()):
        cid = re.sub(r"-\d+$", "", f.name)
        if cid != "none":
            traces.setdefault(cid, []).extend(bq.trace_steps(f))
    for ev in traces.values():
        ev.sort()
    log = bq.event_log(evlog, None)
    parts = bq.handoff_parts(traces, list(traces), log)
    base = sorted(uncontended_round_trips(traces, log))
    if len(traces) < 2 or not parts["total"] or not base:
        sys.exit(f"no handoffs or no baseline in the traces; kept {work}")
    b50 = statistics.median(base)
    # every lock request of both guests: sent -> granted, whatever it waited for
    waits = sorted(lock_waits(traces))
    reports = json.loads((work / "run-guests.json").read_text())
    rep = reports[0] if isinstance(reports, list) else reports
    ops = rep["totals"]["writes"] + rep["totals"]["reads"]
    res = {"guests": sorted(traces), "seconds": args.seconds,
           "storage": args.storage, "iothread": iothread,
           "lock_cache_contended": contended,
           "ops_per_s": round(ops / args.seconds, 1),
           "lock_requests": len(waits),
           "lock_wait_p50_us": round(statistics.median(waits), 1),
           "lock_wait_p99_us": round(bq.percentile(waits, 99), 1),
           "extlockd_poll_us": args.extlockd_poll_us,
           "load_start": load0, "load_end": load1,
           "handoffs": len(parts["total"]), "uncontended": len(base),
           "grants": sum(1 for e in log if e["event"] == "grant"),
           "parts_us": {}}
    rows = [("uncontended", base)] + [(k, sorted(v))
                                      for k, v in parts.items()]
    print("Handoff between two guests (run-guests.py, %d s, %s storage): "
          "%d handoffs, %d uncontended lock round trips, %d grants" % (
              args.seconds, args.storage, res["handoffs"], len(base),
              res["grants"]))
    print("disk in an IOThread: %s; extlockd --poll-us %d; "
          "lock-cache-contended=%s" % (
              "no" if iothread is None else "yes" + iothread,
              args.extlockd_poll_us, "on" if contended else "off"))
    print("guest reads+writes: %.1f/s; lock requests: %d, sent -> granted "
          "p50 %.1f us, p99 %.1f us" % (
              res["ops_per_s"], res["lock_requests"],
              res["lock_wait_p50_us"], res["lock_wait_p99_us"]))
    print("load average: %s at the start, %s at the end" % (load0, load1))
    print("  %-12s %9s %9s %9s   (us; ratio: p50 / uncontended p50)" % (
        "part", "p50", "p99", "ratio"))
    for k, v in rows:
        p50 = statistics.median(v)
        p99 = bq.percentile(v, 99)
        res["parts_us"][k] = {"p50": round(p50, 1), "p99": round(p99, 1),
                              "ratio": round(p50 / b50, 2)}
        print("  %-12s %9.1f %9.1f %9.2f" % (k, p50, p99, p50 / b50))
    print("work directory: %s" % work)
    return res


if __name__ == "__main__":
    main()
