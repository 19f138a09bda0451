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

   The filter's own cost, measured so that the event loop does not count
   (--only fair, also part of --only cost): instructions per request
   (valgrind's callgrind, two request counts so that start-up cancels) of
   (a), (b), (c) and of extlock's own functions in (c), against the rest
   of (c)'s request; converted to ns with (c)'s CPU time per request, and
   perf's share of (c)'s samples in extlock's functions, also in ns.
   Also per request: what extlock's functions call in QEMU and libc
   (clock reads, timer calls), the block layer's cost of one more node
   (b - a less blkdebug's functions), and both against a null-co request
   as it runs in (c)'s event loop (c less all of that); and extlock's
   functions one by one.

2. Handoff latency.  Two qemu-io processes write the same 4 KiB extent of
   a null-co image in turn (each sleeps between its writes, offset by half
   a period, so the lock changes hands on almost every write).  qemu-io
   prints every write's latency; the same workload with one process gives
   the baseline.  The handoff latency is a write's latency under
   contention minus the baseline median.  Each handoff is also split into
   its parts from the driver's extlock_client_handoff trace events in both
   processes and extlockd's --event-log (all CLOCK_MONOTONIC), with an
   uncontended lock round trip (lock-cache=off, one process) as baseline,
   and against the floor of the same run: extlock-handoff --floor-only
   --gap-us (half the period), the same four messages between three plain
   processes that sleep between rounds as the two qemu-io processes do.

3. Many hosts.  4 and 8 qemu-img bench writers on one local file,
   neighbouring and overlapping 64 KiB extents, with extlock and without:
   aggregate IOPS ratio and fairness between the hosts.

   The hosts start together (a gate lock held until every host's first
   write waits); a host's rate runs from the gate to its last coordinator
   event.  Fairness is printed against the mean rate and against each
   host's max-min fair share of the layout's conflict graph, and per host
   the event log's figures: grants, waits, wait per grant, waits over
   1 ms, grants out of timestamp order, partial releases, granted size.

With --before DIR (a directory with another build's qemu-img and,
optionally, extlockd) the filter cost and the many-hosts runs are made
with both builds, interleaved, and printed side by side.

Usage: bench-qemu.py [--quick] [--no-nfs] [--repeat N] [--json FILE]
                     [--only throughput|cost|fair|handoff|hosts]
                     [--hosts 4,8]
                     [--before DIR]
"""

import argparse
import bisect
import json
import os
import re
import shutil
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
from harness.coordinator import CoordinatorClient  # noqa: E402

STEP = 4096 * 7919          # prime number of blocks: scattered offsets


def qemu_img_bench(image_opts, count, write, depth=32):
    argv = [procs.binary("qemu-img"), "bench", "--image-opts",
            "-c", str(count), "-d", str(depth), "-s", "4096", "-S", str(STEP)]
    if write:
        argv.append("-w")
    argv.append(image_opts)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    m = re.search(r"Run completed in ([0-9.]+) seconds", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"qemu-img bench failed: {out.stdout}{out.stderr}")
    return count / float(m.group(1))


COST_RE = re.compile(r"extlock_filter_cost node \S+ (\d+) requests (\d+) ns "
                     r"clock read (\d+) ns")


def filter_cost(image_opts, count, write, workdir, depth, binary=None):
    """
    The filter's own CPU time per request, from its extlock_filter_cost
    counters: each request's time in extlock minus the time in its child,
    less the two clock reads that the measurement adds to it.  On null-co
    the child never waits, so this is CPU time.
    """
    trace = Path(tempfile.mkstemp(prefix="cost-", dir=workdir)[1])
    argv = [binary or procs.binary("qemu-img"), "-T",
            f"enable=extlock_filter_cost,file={trace}", "bench",
            "--image-opts", "-c", str(count), "-d", str(depth), "-s", "4096",
            "-S", str(STEP)]
    if write:
        argv.append("-w")
    argv.append(image_opts)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    m = COST_RE.search(trace.read_text(errors="replace"))
    if out.returncode != 0 or not m:
        raise RuntimeError(f"qemu-img bench failed: {out.stdout}{out.stderr}")
    requests, ns, clock = (int(x) for x in m.groups())
    return max(0.0, ns / requests - 2 * clock), clock


def perf_share(image_opts, count, write, workdir, depth, binary=None):
    """
    Share of the CPU samples of `qemu-img bench` (perf record, user and
    kernel) in extlock's own functions (extlock_*, the interval tree), or
    None without a working perf.  No measurement code runs in the filter.
    """
    if not shutil.which("perf"):
        return None
    data = Path(tempfile.mkstemp(prefix="perf-", dir=workdir)[1])
    argv = ["perf", "record", "-q", "-F", "4999", "-o", str(data),
            binary or procs.binary("qemu-img"), "bench", "--image-opts",
            "-c", str(count), "-d", str(depth), "-s", "4096", "-S",
            str(STEP)]
    if write:
        argv.append("-w")
    argv.append(image_opts)
    if subprocess.run(argv, capture_output=True, timeout=600).returncode:
        return None
    rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio",
                          "--sort", "symbol"], capture_output=True,
                         text=True, timeout=600)
    total = ours = 0.0
    for m in re.finditer(r"^\s*([0-9.]+)%\s+\[[.k]\]\s+(\S+)", rep.stdout,
                         re.M):
        pct = float(m.group(1))
        total += pct
        if re.match(r"(extlock_|itree_)", m.group(2)):
            ours += pct
    return ours / total if total else None


OWN_SYMBOL = re.compile(r"(extlock_|itree_)")


def bench_argv(binary, image_opts, count, write, depth):
    argv = [binary or procs.binary("qemu-img"), "bench", "--image-opts",
            "-c", str(count), "-d", str(depth), "-s", "4096", "-S",
            str(STEP)]
    if write:
        argv.append("-w")
    argv.append(image_opts)
    return argv


# Callees of extlock's functions that are not extlock's cost: the child's
# I/O, and entering another coroutine (callgrind follows the switch, so
# such a call "includes" whatever that coroutine runs next: after the first
# grant, the rest of the whole benchmark)
NOT_CALLED_COST = re.compile(
    r"(bdrv_co_(preadv|pwritev|pwrite_zeroes|pdiscard|flush)|aio_co_|"
    r"qemu_coroutine_|qemu_aio_coroutine_|qemu_co_)")


def callgrind_parse(path):
    """
    From a callgrind output file (one event, Ir): (total instructions,
    {function: self instructions}, {function: instructions in what
    extlock's function calls outside extlock, the child's I/O left out}).
    The second dict holds, for every function of extlock that calls a
    QEMU or libc function (qemu_clock_get_ns, timer_mod, aio_co_wake...),
    the inclusive cost of those calls: work done on extlock's behalf that
    the self cost of its functions does not show.
    """
    names = {}
    selfc = {}
    calls_out = {}
    total = 0
    fn = cfn = None
    pending_call = False

    def name(spec):
        m = re.match(r"\((\d+)\)(?: (.*))?$", spec)
        if not m:
            return re.sub(r"'\d+$", "", spec)
        if m.group(2) is not None:
            names[m.group(1)] = re.sub(r"'\d+$", "", m.group(2))
        return names[m.group(1)]

    with open(path, errors="replace") as f:
        for line in f:
            c = line[:1]
            if c.isdigit() or c in "+-*":
                parts = line.split()
                n = int(parts[1]) if len(parts) > 1 else 0
                if pending_call:
                    pending_call = False
                    if (OWN_SYMBOL.match(fn) and
                            not OWN_SYMBOL.match(cfn) and
                            not NOT_CALLED_COST.match(cfn)):
                        calls_out[fn] = calls_out.get(fn, 0) + n
                else:
                    selfc[fn] = selfc.get(fn, 0) + n
            elif line.startswith("fn="):
                fn = name(line[3:].strip())
            elif line.startswith("cfn="):
                cfn = name(line[4:].strip())
            elif line.startswith("calls="):
                pending_call = True
            elif line.startswith(("totals:", "summary:")):
                total = int(line.split()[1])
    return total, selfc, calls_out


BLKDEBUG_SYMBOL = re.compile(r"blkdebug_")


def callgrind_counts(argv, workdir):
    """
    (instructions of the whole process, instructions in extlock's own
    functions, {own function: self instructions}, {own function:
    instructions of the QEMU/libc functions it calls, the child's I/O
    left out}) of one run of @argv under valgrind's callgrind: counted,
    not sampled, so they do not depend on the load of the machine.
    """
    out = Path(tempfile.mkstemp(prefix="cg-", dir=workdir)[1])
    r = subprocess.run(["valgrind", "--tool=callgrind",
                        f"--callgrind-out-file={out}"] + argv,
                       capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"callgrind failed: {r.stdout}{r.stderr}")
    total, selfc, calls_out = callgrind_parse(out)
    out.unlink()
    own_fns = {k: v for k, v in selfc.items() if OWN_SYMBOL.match(k)}
    # blkdebug's own functions, in chain (b): see fair_cost()
    own_fns["(blkdebug)"] = sum(v for k, v in selfc.items()
                                if BLKDEBUG_SYMBOL.match(k))
    return (total, sum(v for k, v in own_fns.items() if k != "(blkdebug)"),
            own_fns, calls_out)


def instructions_per_request(image_opts, counts, write, workdir, depth,
                             binary=None):
    """
    Instructions per request of one chain: callgrind runs with two request
    counts, so start-up and exit cancel out: (whole process, extlock's own
    functions, {own function: self}, {own function: its calls into QEMU
    and libc}) per request.
    """
    lo, hi = counts
    t0, o0, f0, k0 = callgrind_counts(bench_argv(binary, image_opts, lo,
                                                 write, depth), workdir)
    t1, o1, f1, k1 = callgrind_counts(bench_argv(binary, image_opts, hi,
                                                 write, depth), workdir)

    def per_request(d1, d0):
        return {k: (d1.get(k, 0) - d0.get(k, 0)) / (hi - lo)
                for k in set(d0) | set(d1)}
    fns = per_request(f1, f0)
    # Calls of functions that run per request only: a slower run under
    # callgrind renews its lease (or even reconnects) more often, which
    # is a cost per second, not per request
    calls = {k: v for k, v in per_request(k1, k0).items()
             if fns.get(k, 0) >= 0.5}
    return (t1 - t0) / (hi - lo), (o1 - o0) / (hi - lo), fns, calls


def cpu_ns_per_request(image_opts, count, write, depth, binary=None):
    """
    CPU time (user + system, from the kernel's accounting of the child)
    per request, start-up subtracted with a run of count / 20 requests.
    CPU time, not wall time: waiting for a core under load is not in it.
    """
    def cpu(n):
        p = subprocess.Popen(bench_argv(binary, image_opts, n, write, depth),
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            raise RuntimeError("qemu-img bench failed")
        return ru.ru_utime + ru.ru_stime
    small = max(1, count // 20)
    return (cpu(count) - cpu(small)) * 1e9 / (count - small)


def fair_cost(cfgs, bname, counts, cg_counts, write, workdir, depth,
              builds, repeat):
    """
    The filter's cost measured so that the event loop does not matter:
    instructions (callgrind) per request of chains (a), (b), (c) and the
    instructions in extlock's own functions per request, the CPU time per
    request of (c) and its perf profile's share in extlock's functions.
    Every figure is printed as a ratio to the baseline of the same run.
    """
    opts = {name: opts_str(o) for name, o in cfgs}
    a, b, c = (opts["a: no filter"], opts["b: blkdebug"],
               opts["c: extlock cache=on"])
    rows = []
    ir_a = instructions_per_request(a, cg_counts, write, workdir, depth)[0]
    ir_b, _, b_fns, _ = instructions_per_request(b, cg_counts, write,
                                                 workdir, depth,
                                                 builds[-1][1])
    # What the block layer spends on one more node in the graph, whatever
    # the node's driver does: (b) - (a) less blkdebug's own functions.
    # (a) and (b) run the same event-loop code (no fd handler in either).
    node = ir_b - ir_a - b_fns.get("(blkdebug)", 0)
    cpu = {label: [] for label, _, _ in builds}
    share = {label: [] for label, _, _ in builds}
    ir = {}
    for label, binary, _ in builds:
        ir[label] = instructions_per_request(c, cg_counts, write, workdir,
                                             depth, binary)
    for _ in range(repeat):
        for label, binary, _ in builds:
            cpu[label].append(cpu_ns_per_request(c, counts[bname], write,
                                                 depth, binary))
            s = perf_share(c, counts[bname], write, workdir, depth, binary)
            if s is not None:
                share[label].append(s)
    for label, _, _ in builds:
        ir_c, own, own_fns, calls_out = ir[label]
        own_fns.pop("(blkdebug)", None)
        called = sum(calls_out.values())
        # a null-co request as it runs in (c)'s event loop, without the
        # extlock node: (c) less extlock's work and the node's cost
        null_c = ir_c - own - called - node
        ns = statistics.median(cpu[label])
        ps = statistics.median(share[label]) if share[label] else None
        rows.append({
            "backend": bname, "op": "write" if write else "read",
            "depth": depth, "build": label,
            "instr_a": round(ir_a), "instr_b": round(ir_b),
            "instr_c": round(ir_c), "instr_own": round(own),
            # the rest of (c)'s request: same process, same event loop
            "own_vs_rest_of_c": round(own / (ir_c - own), 4),
            "own_vs_a": round(own / ir_a, 4),
            # what extlock's functions call outside extlock per request
            # (clock reads, timers, wake-ups; not the child's I/O): its
            # cost too, though not in its own functions
            "instr_called": round(called),
            "own_called_vs_rest_of_c": round(
                (own + called) / (ir_c - own - called), 4),
            # the block layer's cost of one more node (from b - a)
            "instr_node": round(node),
            "instr_null_in_c": round(null_c),
            # extlock's work against a null-co request in the same event
            # loop; and with the node's cost: the whole price of the filter
            "own_called_vs_null": round((own + called) / null_c, 4),
            "filter_vs_null": round((own + called + node) / null_c, 4),
            "own_fns": {k: round(v, 1) for k, v in sorted(
                own_fns.items(), key=lambda kv: -kv[1]) if v >= 0.5},
            "called_by_fn": {k: round(v, 1) for k, v in sorted(
                calls_out.items(), key=lambda kv: -kv[1]) if v >= 0.5},
            "b_vs_a": round(ir_b / ir_a, 3),
            "c_vs_a": round(ir_c / ir_a, 3),
            "cpu_ns_c": round(ns, 1),
            # CPU time of (c) in proportion to its instructions
            "own_ns_by_instr": round(ns * own / ir_c, 1),
            "perf_share": None if ps is None else round(ps, 4),
            "own_ns_by_perf": None if ps is None else round(ns * ps, 1),
        })
    return rows


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


def throughput(backends, coordinator, repeat, counts, workdir, builds,
               cost_only=False):
    results = []
    for bname, base in backends:
        for write in (False, True):
            cfgs = configs(base, coordinator)
            samples = {name: [] for name, _ in cfgs}
            for _ in range(0 if cost_only else repeat):
                for name, opts in cfgs:
                    count = counts[bname]
                    if "cache=off" in name:
                        count = max(2000, count // 10)
                    samples[name].append(
                        qemu_img_bench(opts_str(opts), count, write))
            for depth in (32, 1) if bname == "null-co" else ():
                # (c)'s own cost per request against (a)'s whole request,
                # with every build (interleaved)
                opts = dict(cfgs)["c: extlock cache=on"]
                cost = {label: [] for label, _, _ in builds}
                a = []
                for _ in range(repeat):
                    for label, binary, _ in builds:
                        cost[label].append(filter_cost(
                            opts_str(opts), counts[bname], write, workdir,
                            depth, binary))
                    a.append(qemu_img_bench(opts_str(cfgs[0][1]),
                                            counts[bname], write, depth))
                first_ns = None
                for label, binary, _ in builds:
                    ns = statistics.median(c[0] for c in cost[label])
                    first_ns = ns if first_ns is None else first_ns
                    share = perf_share(opts_str(opts), counts[bname], write,
                                       workdir, depth, binary)
                    results.append({"backend": bname,
                                    "op": "write" if write else "read",
                                    "config": "c: filter's own CPU",
                                    "build": label,
                                    "depth": depth,
                                    "ns_per_request": round(ns, 1),
                                    "vs_first_build": round(
                                        ns / first_ns, 3) if first_ns else
                                    None,
                                    "clock_read_ns": cost[label][0][1],
                                    "perf_share": share,
                                    "ratio": round(ns * statistics.median(a)
                                                   / 1e9, 4)})
            for name, _ in () if cost_only else cfgs:
                base_iops = statistics.median(samples[cfgs[0][0]])
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


TRACE_RE = re.compile(r"extlock_client_handoff node \S+ (\S+) (\d+) ts (\d+)")


def trace_steps(path):
    """[(ts_ns, step, id)] from a qemu-io trace file, in time order."""
    ev = []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ev
    for m in TRACE_RE.finditer(text):
        ev.append((int(m.group(3)), m.group(1), int(m.group(2))))
    ev.sort()
    return ev


def event_log(path, space):
    """The coordinator's grant and release lines of lock-space @space."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if space in (None, e.get("lock-space")) and e.get("event") in (
                "grant", "release"):
            out.append(e)
    return out


_STEP_INDEX = {}


def _step_index(events, step):
    """(times, events) of @step in @events (time-sorted), built once."""
    key = (id(events), step)
    idx = _STEP_INDEX.get(key)
    if idx is None or idx[0] is not events:
        sel = [e for e in events if e[1] == step]
        idx = (events, [e[0] for e in sel], sel)
        _STEP_INDEX[key] = idx
    return idx[1], idx[2]


def last_before(events, step, t, lock=None, after=None):
    """The last (ts, step, id) of @step at or before @t (and >= @after)."""
    times, sel = _step_index(events, step)
    for k in range(bisect.bisect_right(times, t) - 1, -1, -1):
        e = sel[k]
        if after is not None and e[0] < after:
            return None
        if lock is None or e[2] == lock:
            return e
    return None


HANDOFF_PARTS = ("revoke", "holder", "give-back", "grant", "wakeup",
                 "resume", "total")


def handoff_parts(traces, clients, log):
    """
    Split every handoff into its parts (lists of microseconds), from the
    driver's extlock_client_handoff trace events of both processes
    (@traces: client-id -> events) and the coordinator's event log:
      revoke     waiter's lock sent -> holder's driver has the revoke
      holder     revoke -> holder's unlock sent (it may wait for a user)
      give-back  unlock sent -> coordinator released the lock
      grant      release -> coordinator granted the waiter
      wakeup     grant -> waiter's driver has the "granted" message
      resume     granted -> the waiting request runs again
      total      lock sent -> request runs again
    A grant counts as a handoff when the lock it waited for was released
    by the other process after the lock request was sent.
    """
    parts = {k: [] for k in HANDOFF_PARTS}
    grants = {e["lock"]: e for e in log if e["event"] == "grant"}
    releases = sorted((e["ts"], e["client-id"], e["lock"])
                      for e in log if e["event"] == "release")
    rel_ts = [r[0] for r in releases]
    for w in clients:
        ev = traces[w]
        for i, (t5, step, lock) in enumerate(ev):
            if step != "grant-rx":
                continue
            g = grants.get(lock)
            lk = last_before(ev, "lock-tx", t5)
            wk = next((e for e in ev[i + 1:] if e[1] == "wakeup" and
                       e[2] == lock), None)
            if not g or g.get("client-id") != w or not lk or not wk:
                continue
            t4, t0, t6 = g["ts"], lk[0], wk[0]
            rel = [r for r in releases[bisect.bisect_left(rel_ts, t0):
                                       bisect.bisect_right(rel_ts, t4)]
                   if r[1] != w]
            if not rel:
                continue            # nothing was handed over
            t3, h, hlock = rel[-1]
            ul = last_before(traces[h], "unlock-tx", t3, hlock)
            rv = last_before(traces[h], "revoke-rx", t3, hlock, after=t0)
            if not ul or not rv:
                continue
            t1, t2 = rv[0], ul[0]
            if not t0 <= t1 <= t2 <= t3 <= t4 <= t5 <= t6:
                continue
            for k, v in zip(HANDOFF_PARTS, (t1 - t0, t2 - t1, t3 - t2,
                                            t4 - t3, t5 - t4, t6 - t5,
                                            t6 - t0)):
                parts[k].append(v / 1000.0)
    return parts


def handoff(workdir, group, writes, period_ms):
    # null-co below: a write completes at once, so what is measured is the
    # handoff, not a thread pool's wakeup on a busy machine
    evlog = workdir / "handoff-events.log"
    daemon = group.extlockd(name="extlockd-handoff", debug_checks=False,
                            extra_args=["--event-log", str(evlog)])
    coordinator = str(daemon.socket_path)

    def opts(client, space, cache, contended):
        return opts_str({"driver": "extlock", "lock-space": space,
                         "client-id": client, "min-hold-time": "0",
                         "lock-cache": cache,
                         "lock-cache-contended": contended,
                         "coordinator.type": "unix",
                         "coordinator.path": coordinator,
                         "file.driver": "null-co",
                         "file.size": str(1 << 20)})

    def cmds(pattern, delay_first):
        c = []
        if delay_first:
            c += ["-c", f"sleep {period_ms // 2}"]
        for _ in range(writes):
            c += ["-c", f"write -P {pattern} 0 4k", "-c", f"sleep {period_ms}"]
        return c

    def run(clients, space, cache="on", contended="off"):
        # Output to files, not pipes: a pipe read one process after the
        # other fills up (64 KiB, about 700 writes' lines) and blocks the
        # other qemu-io in write(): its event loop stops, it neither gives
        # back a revoked lock nor renews, and it loses its lease.  Every
        # handoff run had one such stall of 8-11 s until 2026-11-29.
        ps = []
        for i, name in enumerate(clients):
            trace = workdir / f"trace-{space}-{name}"
            out = workdir / f"out-{space}-{name}"
            with open(out, "w") as fo, open(f"{out}.err", "w") as fe:
                ps.append((name, trace, out, subprocess.Popen(
                    [procs.binary("qemu-io"), "--trace",
                     f"enable=extlock_client_handoff,file={trace}",
                     "--image-opts", opts(name, space, cache, contended)] +
                    cmds(i + 1, i == 1),
                    stdout=fo, stderr=fe, text=True)))
        lat = []
        traces = {}
        for name, trace, out, p in ps:
            p.wait(timeout=900)
            err = Path(f"{out}.err").read_text(errors="replace")
            if p.returncode != 0:
                raise RuntimeError(f"qemu-io failed: {err}")
            if "lease lost" in err:
                raise RuntimeError(f"qemu-io {name} lost its lease: {err}")
            # the first write is a cold start
            lat += write_latencies(out.read_text(errors="replace"))[1:]
            traces[name] = trace_steps(trace)
        return lat, traces

    alone, tr_alone = run(["alone"], "handoff")
    # Every lock cached, also over the contended extent: each write of the
    # other host is a revocation handoff, which the parts below split
    both, traces = run(["host-a", "host-b"], "handoff", contended="on")
    # The defaults: a lock over an extent revoked from the node in the
    # last second goes back after its write, so the other host's request
    # mostly finds it free (one uncontended round trip instead of revoke,
    # give-back and grant); one revocation a second starts it again
    both_release, tr_release = run(["host-a", "host-b"], "handoff-release")
    # The same ping-pong without the lock cache: every lock given back
    both_nocache, _ = run(["host-a", "host-b"], "handoff-nocache",
                          cache="off")

    def nrevokes(tr):
        return sum(1 for ev in tr.values() for e in ev if e[1] == "revoke-rx")
    # Baseline of the parts: one process, lock-cache=off, so that every
    # write is one uncontended coordinator round trip
    _, rt = run(["roundtrip"], "roundtrip", cache="off")
    roundtrip = []
    ev = rt["roundtrip"]
    for i, (t, step, rid) in enumerate(ev):
        if step == "lock-tx":
            nxt = next((e for e in ev[i + 1:] if e[1] == "wakeup"), None)
            if nxt:
                roundtrip.append((nxt[0] - t) / 1000.0)
    parts = handoff_parts(traces, ["host-a", "host-b"],
                          event_log(evlog, "handoff"))
    daemon.stop()
    floor = cold_floor(period_ms * 1000 // 2, writes)
    base = statistics.median(alone)
    hand = sorted(max(0.0, x - base) for x in both)
    rt_p50 = statistics.median(roundtrip) if roundtrip else float("nan")
    table = {}
    for k in ("uncontended", ) + HANDOFF_PARTS:
        v = sorted(roundtrip if k == "uncontended" else parts[k])
        if v:
            table[k] = {"p50": round(percentile(v, 50), 1),
                        "p99": round(percentile(v, 99), 1),
                        "ratio": round(percentile(v, 50) / rt_p50, 2)}
            hop = FLOOR_HOPS.get(k)
            if hop and floor.get(hop):
                table[k]["floor_p50"] = floor[hop]["p50-us"]
                table[k]["per_floor"] = round(
                    percentile(v, 50) / floor[hop]["p50-us"], 2)
    return {
        "writes_per_process": writes,
        "baseline_write_p50_us": round(base, 1),
        "contended_write_p50_us": round(statistics.median(both), 1),
        "contended_write_us": spread(both),
        "contended_write_release_us": spread(both_release),
        "contended_write_nocache_us": spread(both_nocache),
        "revocations_release": nrevokes(tr_release),
        "handoff_p50_us": round(percentile(hand, 50), 1),
        "handoff_p99_us": round(percentile(hand, 99), 1),
        "handoff_p50_ratio": round(percentile(hand, 50) / base, 2),
        "revocations_alone": nrevokes(tr_alone),
        "revocations_contended": nrevokes(traces),
        "handoffs_traced": len(parts["total"]),
        "parts_us": table,
        "floor_gap_us": period_ms * 1000 // 2,
        "floor_us": floor,
    }


def spread(v):
    """p50, p90, p99 and mean of @v (microseconds)."""
    v = sorted(v)
    return {"p50": round(percentile(v, 50), 1),
            "p90": round(percentile(v, 90), 1),
            "p99": round(percentile(v, 99), 1),
            "mean": round(statistics.mean(v), 1)}


# A handoff's parts and the floor's hops that carry the same messages
FLOOR_HOPS = {"revoke": "floor A->relay->B", "give-back": "floor B->relay",
              "wakeup": "floor relay->A", "total": "floor total"}


def cold_floor(gap_us, rounds):
    """
    The floor of the handoff as qemu-io runs it: extlock-handoff
    --floor-only, three plain processes passing the four messages of a
    handoff around, each round @gap_us after the one before (the two
    qemu-io processes write half a period apart and sleep in between, so
    every message of theirs wakes a process that slept: on a VM that
    costs more than back-to-back rounds).  {hop: {"p50-us", "p99-us"}};
    empty if extlock-handoff is not built.
    """
    try:
        binary = procs.binary("extlock-handoff")
    except procs.MissingBinary:
        return {}
    if gap_us > 1000000:
        return {}               # beyond extlock-handoff's --gap-us
    rounds = min(rounds, max(100, 300 * 1000000 // max(1, gap_us)))
    out = subprocess.run([binary, "--floor-only", "--gap-us", str(gap_us),
                          "-n", str(rounds), "--json"],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"extlock-handoff failed: {out.stderr}")
    return json.loads(out.stdout)["parts"]


def gate_wait(cl, space, n, timeout=60.0):
    """Wait (bounded) until @n requests wait in lock-space @space."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for sp in cl.status().get("lock-spaces", []):
            if sp.get("name") == space and len(sp.get("waiting", [])) >= n:
                return
        time.sleep(0.01)
    raise RuntimeError(f"{n} hosts did not queue in {space} in {timeout} s")


def window_of(layout, i):
    """Host @i's 64 KiB window in @layout: [start, end) in bytes."""
    off = {"neighbours": i * 65536, "overlapping": i * 32768,
           "same": 0}[layout]
    return off, off + 65536


PRIVATE_COST = 0.05


def maxmin_shares(windows):
    """
    Max-min fair shares of writers on @windows ([(start, end)], each host
    writing its window sequentially, so a fraction |seg| / |window| of its
    writes falls into each segment between window boundaries).  Model: a
    segment written by two or more hosts is a resource of capacity 1
    (handoff-limited writes per unit of time); a host is serial (queue
    depth 1), so its own limit is 1 / its mean cost per write, where a
    shared write costs one handoff and a private one PRIVATE_COST of a
    handoff (a write under a cached lock; the value matters only when
    hosts with and without shared segments mix, and does not change the
    shares of the three layouts here, which all come out equal).
    Progressive filling: raise all rates together, freeze the hosts of a
    segment that fills up or that reach their own limit.  Returns the
    shares normalised to a mean of 1.
    """
    cuts = sorted({x for w in windows for x in w})
    segs = []
    for a, b in zip(cuts, cuts[1:]):
        users = [i for i, (s, e) in enumerate(windows) if s <= a and b <= e]
        if len(users) > 1:
            segs.append([(i, (b - a) / (windows[i][1] - windows[i][0]))
                         for i in users])
    n = len(windows)
    cap = []
    for i in range(n):
        shared = sum(f for seg in segs for j, f in seg if j == i)
        cap.append(1.0 / (shared + PRIVATE_COST * (1.0 - shared)))
    rate = [0.0] * n
    frozen = [False] * n
    for _ in range(n + len(segs) + 1):      # each round freezes someone
        if all(frozen):
            break
        # the largest common step before a segment fills or a host caps
        step = min(cap[i] - rate[i] for i in range(n) if not frozen[i])
        for seg in segs:
            free = sum(f for i, f in seg if not frozen[i])
            if free > 0:
                used = sum(f * rate[i] for i, f in seg)
                step = min(step, (1.0 - used) / free)
        for i in range(n):
            if not frozen[i]:
                rate[i] += step
        for i in range(n):
            if not frozen[i] and rate[i] >= cap[i] - 1e-12:
                frozen[i] = True
        for seg in segs:
            if sum(f * rate[i] for i, f in seg) >= 1.0 - 1e-12:
                for i, _ in seg:
                    frozen[i] = True
    mean = statistics.mean(rate) if any(rate) else 1.0
    return [r / mean if mean else 1.0 for r in rate]


STALL_NS = 1000000


def host_figures(path, space, writers, t0_ns=0):
    """
    Per host, from the coordinator's event log of lock-space @space:
    grants; how many of them waited ("wait" event first) and the mean
    wait per grant (us, over all its grants); stalls: waits longer than
    STALL_NS (a handoff normally takes 0.1-0.3 ms); grants out of timestamp
    order (granted while an earlier-token request of another host for an
    overlapping extent was still waiting: must be 0); partial releases
    (a lock given back in pieces); the mean granted length (KiB) and the
    requested lengths seen.  A wait counts from @t0_ns at the earliest
    (the gate's release: the first request of every host waits for it).
    """
    ev = []
    for line in Path(path).read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("lock-space") == space and \
                e.get("client-id", "").startswith("host") and \
                e.get("event") in ("wait", "grant", "release"):
            ev.append(e)
    ev.sort(key=lambda e: e["ts"])
    f = [{"grants": 0, "waited": 0, "wait_us": 0.0, "stalls": 0,
          "out_of_order": 0,
          "partial_releases": 0, "granted_kib": 0.0, "requested": set()}
         for _ in range(writers)]
    waiting = {}            # lock -> (token, start, end, host, ts)
    extent = {}             # lock -> (start, end) held
    for e in ev:
        i = int(e["client-id"][4:])
        a, b = e["offset"], e["offset"] + e["length"]
        if e["event"] == "wait":
            waiting[e["lock"]] = (e["token"], a, b, i, max(e["ts"], t0_ns))
            f[i]["requested"].add(e["length"])
        elif e["event"] == "grant":
            w = waiting.pop(e["lock"], None)
            f[i]["grants"] += 1
            f[i]["granted_kib"] += e["length"] / 1024
            if w:
                f[i]["waited"] += 1
                f[i]["wait_us"] += (e["ts"] - w[4]) / 1000
                f[i]["stalls"] += e["ts"] - w[4] > STALL_NS
            for tok, wa, wb, h, _ in waiting.values():
                if h != i and tok < e["token"] and wa < b and a < wb:
                    f[i]["out_of_order"] += 1
                    break
            extent[e["lock"]] = (a, b)
        elif e["event"] == "release":
            held = extent.get(e["lock"])
            if held and held != (a, b):
                f[i]["partial_releases"] += 1
                extent[e["lock"]] = (b, held[1]) if a == held[0] \
                    else (held[0], a)
            else:
                extent.pop(e["lock"], None)
    for x in f:
        n = max(1, x["grants"])
        x["wait_us"] = round(x["wait_us"] / n, 1)
        x["granted_kib"] = round(x["granted_kib"] / n, 1)
        x["requested"] = sorted(x["requested"])
    return f


def many_hosts(workdir, group, writers, counts, builds, layouts=None):
    """
    @writers qemu-img bench processes ("hosts") writing 4 KiB requests
    (queue depth 1, sequentially, wrapping around in a 64 KiB window: a
    raw node with offset and size) into one local file:
      neighbours  host i writes the 64 KiB at i * 64 KiB (its own extent;
                  any sharing comes from lock growth),
      overlapping host i writes the 64 KiB at i * 32 KiB (each half is
                  shared with a neighbour; the hosts at the ends have one
                  neighbour, the others two, so their fair shares differ),
      same        every host writes the same 64 KiB (a fair share is
                  1 / writers),
    each through extlock (lock-cache on, the defaults) and, as the
    baseline of the same run, straight to the file.  @builds: [(label,
    qemu-img)], the extlock runs are made with each (interleaved).

    Start: with extlock, a gate client holds the whole file until every
    host's first write waits at the coordinator, then lets go (T0): so the
    hosts start together instead of hundreds of ms apart, and a host's
    rate is its requests / (its last coordinator event - T0), from the
    event log (CLOCK_MONOTONIC).  Unlocked: requests / its own run time.
    Aggregate: all requests / the group's wall time; fairness: the slowest
    host's rate / the mean rate; grants/host: grants logged per host and
    run (few: the hosts split the file once; many: they take ranges from
    each other); max-min: fairness against maxmin_shares() of the layout;
    per host: host_figures().  @layouts: a subset of the three.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"hosts{writers}-", dir=workdir))
    img = workdir / "hosts.raw"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    evlog = workdir / "events.log"
    daemons = {}
    for label, _, extlockd_dir in builds:
        # each build with its own coordinator (its extlockd if it has one)
        old = os.environ.get("EXTLOCK_BUILD")
        if extlockd_dir:
            os.environ["EXTLOCK_BUILD"] = extlockd_dir
        try:
            daemons[label] = group.extlockd(
                name=f"{workdir.name}/extlockd-{label}", debug_checks=False,
                extra_args=["--event-log", str(evlog)])
        finally:
            if old is None:
                os.environ.pop("EXTLOCK_BUILD", None)
            else:
                os.environ["EXTLOCK_BUILD"] = old
    results = []

    def run(layout, label, binary, count, run_no):
        ps = []
        space = f"hosts-{layout}-{writers}-{run_no}-{label}"
        coordinator = str(daemons[label].socket_path) if label else None
        gate = None
        if binary:
            gate = CoordinatorClient(f"unix:{coordinator}")
            gate.hello("gate", space)
            gate_lock = gate.lock(0, 64 << 20)["lock"]
        t0 = time.monotonic()
        for i in range(writers):
            # a raw node's offset/size: the host's 64 KiB window, which
            # qemu-img bench writes 4 KiB after 4 KiB, wrapping around
            off = window_of(layout, i)[0]
            f = {"driver": "file", "filename": str(img), "locking": "off"}
            if binary:
                f = {"driver": "extlock", "lock-space": space,
                     "client-id": f"host{i}", "coordinator.type": "unix",
                     "coordinator.path": coordinator,
                     "file.driver": "file", "file.filename": str(img),
                     "file.locking": "off"}
            o = {"driver": "raw", "offset": str(off), "size": "65536"}
            for k, v in f.items():
                o[f"file.{k}"] = v
            ps.append(subprocess.Popen(
                [binary or builds[-1][1], "bench", "--image-opts",
                 "-w", "-c", str(count), "-d", "1", "-s", "4096",
                 opts_str(o)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        if gate:
            try:
                gate_wait(gate, space, writers)
                t0 = time.monotonic()
                gate.unlock(gate_lock)
            finally:
                gate.close()
        rates = []
        for p in ps:
            out, err = p.communicate(timeout=900)
            m = re.search(r"Run completed in ([0-9.]+) seconds", out)
            if p.returncode != 0 or not m:
                raise RuntimeError(f"qemu-img bench failed: {out}{err}")
            rates.append(count / float(m.group(1)))
        wall = time.monotonic() - t0
        grants = [0] * writers
        figs = None
        if gate:
            figs = host_figures(evlog, space, writers, int(t0 * 1e9))
            last = [0] * writers
            for e in event_log(evlog, space):
                if e["client-id"].startswith("host"):
                    i = int(e["client-id"][4:])
                    last[i] = max(last[i], e["ts"])
                    grants[i] += e["event"] == "grant"
            rates = [count / max(1e-6, (t / 1e9 - t0)) for t in last]
        # aggregate over the wall time of the whole group
        return writers * count / wall, rates, grants, figs

    run_no = 0
    for layout in layouts or ("neighbours", "overlapping", "same"):
        shares = maxmin_shares([window_of(layout, i)
                                for i in range(writers)])
        count = counts[layout]
        base = []
        ext = {label: [] for label, _, _ in builds}
        for _ in range(2):                  # interleaved, twice
            run_no += 1
            base.append(run(layout, None, None, count, run_no))
            for label, binary, _ in builds:
                ext[label].append(run(layout, label, binary, count, run_no))
        b = statistics.median(r[0] for r in base)
        for label, _, _ in builds:
            e = statistics.median(r[0] for r in ext[label])
            fairs = [min(r[1]) / statistics.mean(r[1]) for r in ext[label]]
            # each host's rate against its max-min fair share
            mm = []
            for r in ext[label]:
                rel = [x / s for x, s in zip(r[1], shares)]
                mm.append(min(rel) / statistics.mean(rel))
            grants = sum(sum(r[2]) for r in ext[label])
            results.append({
                "writers": writers, "layout": layout, "requests": count,
                "build": label,
                "unlocked_iops": round(b), "extlock_iops": round(e),
                "ratio": round(e / b, 3),
                "fairness": round(statistics.median(fairs), 3),
                "fairness_runs": [round(x, 3) for x in fairs],
                "maxmin_shares": [round(x, 3) for x in shares],
                "fairness_maxmin": round(statistics.median(mm), 3),
                "host_figures": [r[3] for r in ext[label]],
                "host_rates": [[round(x) for x in r[1]] for r in ext[label]],
                "host_grants": [r[2] for r in ext[label]],
                "grants_per_host": round(grants / len(ext[label]) / writers,
                                         1),
            })
    for d in daemons.values():
        d.stop()
    return results


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
    ap.add_argument("--period-ms", type=int, default=4,
                    help="handoff: each process writes every this often")
    ap.add_argument("--hosts", default="4,8",
                    help="many hosts: numbers of writers (empty: skip)")
    ap.add_argument("--layouts", metavar="L1,L2",
                    help="many hosts: only these layouts (neighbours, "
                    "overlapping, same)")
    ap.add_argument("--only", choices=("throughput", "cost", "fair",
                                       "handoff", "hosts"),
                    help="run only one of the parts")
    ap.add_argument("--before", metavar="DIR",
                    help="a directory with the qemu-img (and, if there, "
                    "the extlockd) of the build to compare with: the "
                    "filter cost and many hosts run with both, "
                    "interleaved, and print both")
    args = ap.parse_args()

    load0 = " ".join(Path("/proc/loadavg").read_text().split()[:3])
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
        mh = []
        fair = []
        builds = [("this", procs.binary("qemu-img"), None)]
        if args.before:
            bdir = Path(args.before).resolve()
            builds.insert(0, ("before", str(bdir / "qemu-img"),
                              str(bdir) if (bdir / "extlockd").exists()
                              else None))
        if args.only in (None, "throughput", "cost"):
            tp = throughput(backends, coordinator, args.repeat, counts,
                            workdir, builds, args.only == "cost")
        if args.only in (None, "cost", "fair"):
            cg = (2000, 12000) if args.quick else (5000, 25000)
            cfgs = configs(backends[0][1], coordinator)
            for depth in (32, 1):
                for write in (False, True):
                    fair += fair_cost(cfgs, "null-co", counts, cg, write,
                                      workdir, depth, builds, args.repeat)
        if args.only in (None, "hosts"):
            for n in [int(x) for x in args.hosts.split(",") if x]:
                mh += many_hosts(workdir, group, n, {
                    "neighbours": 5000 if args.quick else 30000,
                    "overlapping": 500 if args.quick else 3000,
                    "same": 500 if args.quick else 3000}, builds,
                    args.layouts.split(",") if args.layouts else None)
        if args.only in (None, "handoff"):
            ho = handoff(workdir, group, 150 if args.quick else 1100,
                         args.period_ms)

        if tp:
            print("\nFilter cost (qemu-img bench, 4 KiB, QD32, scattered "
                  "offsets; median of %d)" % args.repeat)
            print("%-8s %-6s %-22s %10s %8s" % ("backend", "op", "chain",
                                                "IOPS", "vs (a)"))
            for r in tp:
                if "ns_per_request" in r:
                    continue
                print("%-8s %-6s %-22s %10d %8.3f" % (
                    r["backend"], r["op"], r["config"], r["iops"],
                    r["ratio"]))
            print("\nThe filter's own CPU time per request (extlock "
                  "cache=on, its extlock_filter_cost counters), as a "
                  "fraction of a whole request of (a) in the same run, and "
                  "against the first build")
            for r in tp:
                if "ns_per_request" in r:
                    print("%-8s %-6s QD%-3d %-6s %8.1f ns  %8.4f of (a)  "
                          "%6.3f of first  (clock read %d ns)  perf: %s of "
                          "(c)'s samples in extlock code" % (
                              r["backend"], r["op"], r["depth"], r["build"],
                              r["ns_per_request"], r["ratio"],
                              r["vs_first_build"],
                              r["clock_read_ns"],
                              "n/a" if r["perf_share"] is None else
                              "%.3f" % r["perf_share"]))
        if fair:
            print("\nThe filter's own cost, event loop left out (null-co, "
                  "4 KiB; instructions counted by callgrind; CPU time per "
                  "request of (c) from the kernel's accounting, median of "
                  "%d)" % args.repeat)
            print("  instr/request: a (no filter), b (blkdebug) and c "
                  "(extlock cache=on) with ratios to a; own: in extlock's "
                  "functions, as a ratio to the rest of (c)'s request "
                  "(same process, same event loop) and to a; own ns: (c)'s "
                  "CPU ns/request x own's share of its instructions, and "
                  "x perf's share of its samples")
            print("  %-5s QD %-6s %7s %7s %5s %7s %5s %6s %6s %6s %7s %7s "
                  "%7s %6s" % (
                      "op", "build", "a", "b", "b/a", "c", "c/a", "own",
                      "/rest", "/a", "cpu ns", "own ns", "perf", "ns"))
            for r in fair:
                print("  %-5s %2d %-6s %7d %7d %5.2f %7d %5.2f %6d %6.3f "
                      "%6.3f %7.0f %7.1f %7s %6s" % (
                          r["op"], r["depth"], r["build"], r["instr_a"],
                          r["instr_b"], r["b_vs_a"], r["instr_c"],
                          r["c_vs_a"], r["instr_own"],
                          r["own_vs_rest_of_c"], r["own_vs_a"],
                          r["cpu_ns_c"], r["own_ns_by_instr"],
                          "n/a" if r["perf_share"] is None else
                          "%.3f" % r["perf_share"],
                          "n/a" if r["own_ns_by_perf"] is None else
                          "%.0f" % r["own_ns_by_perf"]))
            print("  called: instructions per request in the QEMU and "
                  "libc functions that extlock's functions call (clock "
                  "reads, timers, wake-ups; not the child's I/O); "
                  "own+called as a ratio to the rest of (c)'s request; "
                  "then extlock's functions, self instructions per request "
                  "[+ what they call]")
            print("  node: the block layer's instructions for one more "
                  "node (b - a less blkdebug's functions); null: a null-co "
                  "request in (c)'s event loop (c - own - called - node); "
                  "(own+called)/null: extlock's work against it; "
                  "filter/null: with the node's cost, the whole filter")
            for r in fair:
                print("  %-5s %2d %-6s called %5d  (own+called)/rest %.3f  "
                      "node %5d  null %5d  (own+called)/null %.3f  "
                      "filter/null %.3f" % (
                          r["op"], r["depth"], r["build"], r["instr_called"],
                          r["own_called_vs_rest_of_c"], r["instr_node"],
                          r["instr_null_in_c"], r["own_called_vs_null"],
                          r["filter_vs_null"]))
                fns = sorted(set(r["own_fns"]) | set(r["called_by_fn"]),
                             key=lambda k: -(r["own_fns"].get(k, 0) +
                                             r["called_by_fn"].get(k, 0)))
                print("    " + ", ".join(
                    "%s %.0f%s" % (k, r["own_fns"].get(k, 0),
                                   " [+%.0f]" % r["called_by_fn"][k]
                                   if k in r["called_by_fn"] else "")
                    for k in fns))
            if len(builds) > 1:
                print("  %s -> %s, extlock's own instructions per request:"
                      % (builds[0][0], builds[-1][0]))
                for i in range(0, len(fair), len(builds)):
                    r0, r1 = fair[i], fair[i + len(builds) - 1]
                    print("  %-5s QD%-2d %6d -> %6d  (%.3f)" % (
                        r0["op"], r0["depth"], r0["instr_own"],
                        r1["instr_own"], r1["instr_own"] /
                        max(1, r0["instr_own"])))
        if ho:
            print("\nHandoff: two qemu-io processes writing one 4 KiB extent "
                  "in turn (%d writes each)" % ho["writes_per_process"])
            for k in ("baseline_write_p50_us", "contended_write_p50_us",
                      "handoff_p50_us", "handoff_p99_us", "handoff_p50_ratio",
                      "revocations_alone", "revocations_contended",
                      "revocations_release", "handoffs_traced"):
                print("  %-24s %s" % (k, ho[k]))
            print("  every write of the two processes (us), in the same run: "
                  "lock-cache-contended=on (every handoff a revocation; the "
                  "parts below), the defaults (a lock over a contended "
                  "extent given back after its write), lock-cache=off:")
            for k in ("contended_write_us", "contended_write_release_us",
                      "contended_write_nocache_us"):
                w = ho[k]
                print("    %-28s p50 %7.1f  p90 %7.1f  p99 %8.1f  mean "
                      "%7.1f  (mean / cache on: %.2f)" % (
                          k, w["p50"], w["p90"], w["p99"], w["mean"],
                          w["mean"] / ho["contended_write_us"]["mean"]))
            print("  %-12s %9s %9s %9s %9s   (us; ratio: p50 / uncontended "
                  "p50; /floor: p50 / the floor's p50)" % (
                      "part", "p50", "p99", "ratio", "/floor"))
            for k, v in ho["parts_us"].items():
                print("  %-12s %9.1f %9.1f %9.2f %9s" % (
                    k, v["p50"], v["p99"], v["ratio"],
                    "%.2f" % v["per_floor"] if "per_floor" in v else "-"))
            if ho.get("floor_us"):
                print("  floor: the same four messages between three plain "
                      "processes, every round %d us after the last "
                      "(extlock-handoff --floor-only --gap-us %d)" % (
                          ho["floor_gap_us"], ho["floor_gap_us"]))
                for k, v in ho["floor_us"].items():
                    print("  %-22s %9.1f %9.1f" % (k, v["p50-us"],
                                                   v["p99-us"]))
        if mh:
            print("\nMany hosts: qemu-img bench writers, 4 KiB QD1, one "
                  "local file; ratio: extlock / the same writers unlocked")
            print("  %-7s %-12s %-7s %10s %10s %7s %9s %7s %8s" % (
                "writers", "layout", "build", "unlocked", "extlock",
                "ratio", "fairness", "max-min", "grants/host"))
            for r in mh:
                print("  %-7d %-12s %-7s %10d %10d %7.3f %9.3f %7.3f %8.1f" % (
                    r["writers"], r["layout"], r["build"],
                    r["unlocked_iops"], r["extlock_iops"], r["ratio"],
                    r["fairness"], r["fairness_maxmin"],
                    r["grants_per_host"]))
            print("  fairness: slowest host's rate / the mean rate; max-min: "
                  "the same of each host's rate / its max-min fair share "
                  "(shares of the layout's conflict graph below)")
            print("  per host and run: its rate / the mean rate of the run; "
                  "its grants")
            for r in mh:
                for rates, grants in zip(r["host_rates"], r["host_grants"]):
                    mean = statistics.mean(rates)
                    print("  %d %-11s %-6s %s; %s" % (
                        r["writers"], r["layout"], r["build"],
                        " ".join("%.2f" % (x / mean) for x in rates),
                        " ".join(str(x) for x in grants)))
            print("  per host and run (event log): grants, waited, mean "
                  "wait us per grant, waits > 1 ms, out of timestamp order, "
                  "partial releases, mean granted KiB")
            for r in mh:
                print("  %d %-11s %-6s max-min shares %s" % (
                    r["writers"], r["layout"], r["build"],
                    " ".join("%.2f" % x for x in r["maxmin_shares"])))
                for figs in r["host_figures"]:
                    print("    " + " | ".join(
                        "%d %d %.0f %d %d %d %.0f" % (
                            x["grants"], x["waited"], x["wait_us"],
                            x["stalls"], x["out_of_order"],
                            x["partial_releases"],
                            x["granted_kib"]) for x in figs))
        print("\nLoad average at the start: %s" % load0)
        print("Load average during the run: %s" %
              " ".join(Path("/proc/loadavg").read_text().split()[:3]))
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"throughput": tp, "fair_cost": fair, "handoff": ho,
                 "hosts": mh}, indent=2))
    finally:
        group.stop_all()
        if nfs:
            nfs.stop()


if __name__ == "__main__":
    main()
