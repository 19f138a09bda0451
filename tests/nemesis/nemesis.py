#!/usr/bin/python3
"""Jepsen-style randomized fault injection ("nemesis") run of extlock.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Three hosts - qemu-storage-daemon processes, each with an extlock node over
QEMU's nfs driver - share one raw image on the loopback nfs-ganesha.  Each
host's NFS traffic goes through its own fault point (nfs_relay.py, on
127.0.0.1N) and its coordinator traffic through a TCP relay
(harness/faults.py TcpPartition).  Client threads drive a stamped workload
through each host's NBD export (workload.py) while a seeded schedule
injects faults one after the other:

  partition-short   coordinator link of one host cut for less than a lease
  partition-long    ... cut for longer than lease + fence margin
  nfs-delay         one host's NFS path held (requests in flight) for longer
                    than lease + fence margin, then released
  pause             SIGSTOP of one host beyond its lease, then SIGCONT
  kill-host         kill -9 of one host, restarted later
  kill-extlockd     kill -9 of the coordinator, restarted (grace period)
  restart-in-grace  the coordinator killed again during its grace period

When extlockd has --fence-agent, it fences an expired host through
fence_agent.py, which shuts that host's NFS fault point (dropping queued
data); the nemesis then "reboots" the host (kill -9, port back on, new
process), as a cluster manager would.  After the run checker.py checks the
history and the final image.  --no-extlock runs the same workload and
faults with the hosts opening the image directly (the control: the checker
must report violations there).

Must run inside scripts/isolate.sh (private loopback); see
scripts/nemesis.sh.  Prints a JSON summary and writes everything to --out.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "qemu"))

from harness import procs as P                         # noqa: E402
from harness.faults import NbdClient                   # noqa: E402
from harness.coordinator import coordinator_status     # noqa: E402
from harness import ganesha as ganesha_mod            # noqa: E402
from harness.ganesha import (NfsServer, NfsServerError,  # noqa: E402
                             tcp_port_open)
from nfs_relay import NfsFaultPoint, portmap_ports     # noqa: E402
import checker                                         # noqa: E402
import workload                                        # noqa: E402

IMAGE_SIZE = 4 * 1024 * 1024
FENCE_ONLY = ["nfs-delay-crash", "nfs-delay-partition"]
FENCE_AGENT = P.REPO_ROOT / "contrib" / "fence-agents" / "fence_extlock_cut"
REGION_SECTORS = 512            # the workload uses the first 256 KiB
LOCK_SPACE = "nemesis"


class IsolatedNfsServer(NfsServer):
    """The harness's ganesha, checking only its own network namespace for a
    server already there: scripts/isolate.sh gives us a private loopback,
    but /proc still shows the ganesha processes of other namespaces."""

    def _check_no_other_server(self):
        if tcp_port_open("127.0.0.1", 2049):
            raise NfsServerError("something already listens on 127.0.0.1:2049 "
                                 "in this network namespace")

    def _ensure_rpcbind(self):
        # the same, without the look at other namespaces' rpcbind processes
        saved = ganesha_mod.find_processes
        ganesha_mod.find_processes = lambda name: []
        try:
            super()._ensure_rpcbind()
        finally:
            ganesha_mod.find_processes = saved


def log(msg):
    print(f"[nemesis {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def binary_supports(path, needle):
    try:
        with open(path, "rb") as f:
            return needle.encode() in f.read()
    except OSError:
        return False


def extlockd_supports(option):
    try:
        out = subprocess.run([P.binary("extlockd"), "--help"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return option in out.stdout + out.stderr


class Host:
    def __init__(self, index, run):
        self.index = index
        self.name = f"host{index}"
        self.addr = f"127.0.0.{10 + index}"
        self.run = run
        self.qsd = None
        self.generation = 0
        self.incarnations = []          # [gen, start, death]
        self.deaths = []
        self.stopped = False
        self.relay = NfsFaultPoint(self.name, self.addr, run.nfs_ports,
                                   ctl_dir=run.ctl_dir,
                                   log_path=run.out / f"storage-{self.name}.jsonl")
        # the coordinator link: the same kind of relay, without RPC parsing
        # (one thread for all its connections); hold() is a partition
        self.partition = None
        if run.extlockd is not None:
            self.partition = NfsFaultPoint(f"{self.name}-coord", self.addr,
                                           [run.extlockd.tcp_port], observe=False)

    def blockdev(self):
        child = {"driver": "nfs", "server": {"type": "inet", "host": self.addr},
                 "path": str(self.run.image_path)}
        if self.run.no_extlock:
            child["node-name"] = "xl"
            return child
        coord = {"type": "inet", "host": self.addr,
                 "port": str(self.run.extlockd.tcp_port)}
        opts = P.extlock_node(child, coord, LOCK_SPACE,
                              node_name="xl", client_id=self.name,
                              granularity=self.run.granularity,
                              lease_time=self.run.lease_ms,
                              on_lease_loss="queue",
                              lease_loss_timeout=self.run.lease_loss_timeout_ms)
        opts.update(self.run.driver_opts)
        return opts

    def start(self, attempts=3):
        """Start a new process; a failed start is recorded and retried."""
        for attempt in range(attempts):
            # the coordinator may have fenced this host's client id after
            # the old process was killed (e.g. the session of a generation
            # rebooted earlier expired meanwhile): the old process is gone,
            # so this is the reboot after the fence - a new process on a
            # cut path could not even mount the share
            if self.relay.state == "off" and not self.alive():
                self.relay.on(by="nemesis-after-reboot")
            try:
                return self._start()
            except RuntimeError as e:
                self.run.start_failures.append({"host": self.name,
                                                "ts": time.monotonic_ns(),
                                                "error": str(e)[-400:]})
                log(f"{self.name}: start failed ({str(e)[-200:]})")
                if attempt == attempts - 1:
                    raise
        return None

    def _start(self):
        gen = len(self.incarnations) + len(
            [f for f in self.run.start_failures if f["host"] == self.name]) + 1
        wd = self.run.out / self.name / f"gen{gen}"
        extra = []
        if self.run.trace_io:
            wd.mkdir(parents=True, exist_ok=True)
            extra = ["--trace", f"enable=extlock_io_*,file={wd / 'trace.log'}"]
        qsd = P.StorageDaemon(wd, blockdevs=[self.blockdev()],
                              exports=[("exp", "xl", True)], start_timeout=60,
                              extra_args=extra)
        t = time.monotonic_ns()
        qsd.start()
        self.qsd = qsd
        self.incarnations.append([gen, t, None])
        self.generation = gen
        self.stopped = False

    def alive(self):
        return self.qsd is not None and self.qsd.alive()

    def serving(self):
        return self.alive() and not self.stopped

    def nbd_client(self, timeout):
        return NbdClient(self.qsd.nbd_path, "exp", timeout=timeout)

    def _record_death(self):
        t = time.monotonic_ns()
        if self.incarnations and self.incarnations[-1][2] is None:
            self.incarnations[-1][2] = t
            self.deaths.append(t)

    def kill(self):
        if self.qsd is None:
            return
        if self.qsd.proc.poll() is None:
            os.kill(self.qsd.proc.pid, signal.SIGKILL)
        if self.stopped:
            os.kill(self.qsd.proc.pid, signal.SIGCONT)
        self.qsd.proc.wait()
        self._record_death()
        if self.qsd.qmp:
            self.qsd.qmp.close()
            self.qsd.qmp = None
        self.stopped = False

    def reap_if_dead(self):
        """A host that exited by itself (on-stuck-io=exit): record it."""
        if self.qsd is not None and self.qsd.proc.poll() is not None and \
                self.incarnations and self.incarnations[-1][2] is None:
            self._record_death()
            self.run.self_exits.append({"host": self.name, "gen": self.generation,
                                        "status": self.qsd.proc.returncode,
                                        "ts": time.monotonic_ns()})
            return True
        return False

    def stop(self):
        if self.qsd is not None:
            if self.stopped:
                os.kill(self.qsd.proc.pid, signal.SIGCONT)
                self.stopped = False
            self.qsd.stop(timeout=20)
            self._record_death()

    def close(self):
        self.relay.close()
        if self.partition:
            self.partition.close()


class Run:
    def __init__(self, args):
        self.args = args
        self.seed = args.seed
        self.no_extlock = args.no_extlock
        self.lease_ms = args.lease_ms
        self.fence_margin_ms = args.fence_margin_ms
        self.granularity = 4096
        self.lease_loss_timeout_ms = 120000
        self.out = Path(args.out or tempfile.mkdtemp(prefix="xl-nemesis-"))
        self.out.mkdir(parents=True, exist_ok=True)
        self.ctl_dir = self.out / "ctl"
        self.ctl_dir.mkdir(exist_ok=True)
        self.rnd = random.Random(self.seed)
        self.history = []
        self.faults = []
        self.self_exits = []
        self.reboots = 0
        self.extlockd = None
        self.driver_opts = {}
        self.fencing = False
        self.coordinator_kills = []    # monotonic ns of each kill -9
        self.event_log = None
        self.excluded = []
        self.fence_agent = None
        self.coordinator_status = None
        self.trace_io = False
        self.start_failures = []

    # ---- setup ----------------------------------------------------------
    def setup(self):
        self.nfs = IsolatedNfsServer(workdir=self.out / "nfs", max_io=8192)
        self.nfs.start()
        ports = portmap_ports()
        self.nfs_ports = sorted({ports["nfs"], ports["mountd"]})
        self.image_path = self.nfs.export_dir / f"nemesis-{self.seed}.raw"
        with open(self.image_path, "wb") as f:
            f.truncate(IMAGE_SIZE)
        if not self.no_extlock:
            extra = ["--fence-margin-ms", str(self.fence_margin_ms),
                     "--lease-ms", str(self.lease_ms)]
            if extlockd_supports("--fence-agent") and not self.args.no_fence:
                self.fencing = True
                agent = self.args.fence_agent or FENCE_AGENT
                if not os.access(agent, os.X_OK):
                    agent = HERE / "fence_agent.py"
                self.fence_agent = str(agent)
                extra += ["--fence-agent", str(agent),
                          "--fence-arg", f"ctl-dir={self.ctl_dir}",
                          "--fence-timeout-ms", "10000"]
            if extlockd_supports("--event-log"):
                self.event_log = self.out / "events.jsonl"
                extra += ["--event-log", str(self.event_log)]
            self.extlockd = P.Extlockd(self.out / "extlockd", tcp=True,
                                       extra_args=extra)
            self.extlockd.start()
            qsd_bin = P.binary("qemu-storage-daemon")
            if binary_supports(qsd_bin, "on-stuck-io"):
                self.driver_opts["on-stuck-io"] = "exit"
            self.trace_io = binary_supports(qsd_bin, "extlock_io_start")
        self.hosts = [Host(i, self) for i in (1, 2, 3)]
        for h in self.hosts:
            h.start()
        self.extents = workload.make_extents(self.seed, self.args.extents,
                                             REGION_SECTORS, 48)
        self.stop_clients = threading.Event()
        self.clients = []
        for h in self.hosts:
            for t in range(self.args.clients_per_host):
                wid = h.index * 16 + t
                c = workload.Client(h, wid, self.extents, self.history,
                                    self.seed * 1000 + wid, self.stop_clients,
                                    op_timeout=self.args.op_timeout)
                self.clients.append(c)

    # ---- faults ---------------------------------------------------------
    def L(self, lo, hi):
        """A random duration in [lo, hi] leases (+ fence margin), seconds."""
        return self.rnd.uniform(lo, hi) * self.lease_ms / 1000

    def beyond(self):
        return self.L(1.5, 2.5) + self.fence_margin_ms / 1000

    def fault_kinds(self):
        kinds = ["nfs-delay", "pause", "kill-host"] + FENCE_ONLY
        if not self.no_extlock:
            kinds += ["partition-short", "partition-long", "kill-extlockd",
                      "restart-in-grace"]
        if self.args.faults:
            kinds = [k for k in kinds if k in self.args.faults.split(",")]
        elif not self.fencing and not self.no_extlock:
            # writes held in the network while the host loses its locks land
            # after the locks were granted to others unless the coordinator
            # fences the host's storage path first: without a fence agent
            # these faults break extlock by construction (--faults to see it)
            self.excluded = [k for k in kinds if k in FENCE_ONLY]
            kinds = [k for k in kinds if k not in FENCE_ONLY]
        return kinds

    def inject(self, kind):
        h = self.rnd.choice(self.hosts)
        rec = {"kind": kind, "host": h.name, "start": time.monotonic_ns()}
        if kind == "partition-short":
            h.partition.hold()
            time.sleep(self.L(0.2, 0.5))
            h.partition.release()
        elif kind == "partition-long":
            h.partition.hold()
            time.sleep(self.beyond())
            h.partition.release()
        elif kind == "nfs-delay":
            h.relay.hold()
            time.sleep(self.beyond())
            h.relay.release()
        elif kind == "nfs-delay-crash":
            # the host dies with requests in the network; they are released
            # long after its lease ended (unless its port was fenced)
            h.relay.hold()
            time.sleep(self.L(0.1, 0.3))
            h.kill()
            time.sleep(self.beyond())
            h.relay.release()
        elif kind == "nfs-delay-partition":
            # storage and coordinator paths both stall: the lease runs out
            # while writes are in flight
            h.relay.hold()
            if h.partition:
                h.partition.hold()
            time.sleep(self.beyond())
            if h.partition:
                h.partition.release()
            h.relay.release()
        elif kind == "pause":
            if h.alive():
                os.kill(h.qsd.proc.pid, signal.SIGSTOP)
                h.stopped = True
                time.sleep(self.beyond())
                if h.alive():
                    os.kill(h.qsd.proc.pid, signal.SIGCONT)
                h.stopped = False
        elif kind == "kill-host":
            h.kill()
            time.sleep(self.L(0.2, 1.0))
            h.start()
            self.reboots += 1
        elif kind in ("kill-extlockd", "restart-in-grace"):
            rec.pop("host")
            # The kill's time is taken once the process is reaped: every
            # event it logged is earlier.  Taken before the kill, a grant
            # logged between the two was read as outliving its coordinator
            # (448 false lock-violations in a loaded run)
            self.extlockd.kill()
            self.coordinator_kills.append(time.monotonic_ns())
            time.sleep(self.L(0.1, 0.5))
            self.extlockd.start()
            if kind == "restart-in-grace":
                grace = (self.lease_ms + self.fence_margin_ms) / 1000
                time.sleep(self.rnd.uniform(0.1, 0.5) * grace)
                self.extlockd.kill()
                self.coordinator_kills.append(time.monotonic_ns())
                time.sleep(self.L(0.1, 0.3))
                self.extlockd.start()
        rec["end"] = time.monotonic_ns()
        self.faults.append(rec)
        log(f"fault {kind} {rec.get('host', '')} "
            f"{(rec['end'] - rec['start']) / 1e9:.1f}s")

    def recover(self):
        """Reboot fenced hosts and restart hosts that are gone."""
        for h in self.hosts:
            fenced = h.relay.state == "off"
            died = h.reap_if_dead() or not h.alive()
            if fenced or died:
                if h.alive():
                    h.kill()
                if fenced:
                    h.relay.on(by="nemesis-after-reboot")
                h.start()
                self.reboots += 1
                log(f"rebooted {h.name} ({'fenced' if fenced else 'exited'})")

    # ---- the run ----------------------------------------------------------
    def execute(self):
        t_end = time.monotonic() + self.args.seconds
        for c in self.clients:
            c.start()
        time.sleep(self.L(0.5, 1.0))
        kinds = self.fault_kinds()
        while time.monotonic() < t_end:
            self.recover()
            if kinds:
                self.inject(self.rnd.choice(kinds))
            self.recover()
            # quiet time between faults, watching for fenced hosts
            quiet_end = time.monotonic() + self.L(0.5, 1.5)
            while time.monotonic() < quiet_end:
                time.sleep(0.1)
                self.recover()
        # settle: everything healed, fenced hosts rebooted
        self.recover()
        time.sleep(self.L(1.0, 1.0))
        self.recover()
        self.stop_clients.set()
        for c in self.clients:
            c.join(timeout=self.args.op_timeout + 30)
        stuck = [c.name for c in self.clients if c.is_alive()]
        if self.extlockd is not None:
            try:
                self.coordinator_status = coordinator_status(self.extlockd.address)
            except Exception as e:                      # noqa: BLE001
                self.coordinator_status = {"error": repr(e)}
        for h in self.hosts:
            h.stop()
        return stuck

    def final_image(self):
        with open(self.image_path, "rb") as f:
            data = f.read(REGION_SECTORS * workload.SECTOR)
        return [workload.decode(data[i * 512:(i + 1) * 512])
                for i in range(REGION_SECTORS)]

    def teardown(self):
        for h in getattr(self, "hosts", []):
            try:
                if h.alive():
                    h.kill()
            except Exception:                           # noqa: BLE001
                pass
            h.close()
        if self.extlockd is not None:
            self.extlockd.stop()
        self.nfs.stop()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--minutes", type=float)
    ap.add_argument("--no-extlock", action="store_true",
                    help="control: hosts open the image directly")
    ap.add_argument("--no-fence", action="store_true",
                    help="do not give extlockd the fence agent")
    ap.add_argument("--fence-agent", help="fence agent for extlockd (default "
                    "contrib/fence-agents/fence_extlock_cut, else "
                    "tests/nemesis/fence_agent.py)")
    ap.add_argument("--faults", help="comma-separated fault kinds to use")
    ap.add_argument("--lease-ms", type=int, default=2000)
    ap.add_argument("--fence-margin-ms", type=int, default=500)
    ap.add_argument("--extents", type=int, default=24)
    ap.add_argument("--clients-per-host", type=int, default=2)
    ap.add_argument("--op-timeout", type=float, default=120,
                    help="seconds an NBD request may take before it counts as "
                    "hung (default 120)")
    ap.add_argument("--out", help="directory for logs and results")
    ap.add_argument("--expect", choices=("clean", "violations", "any"), default="any",
                    help="exit status: clean = no violation, no stuck client; "
                    "violations = the checker found at least one")
    args = ap.parse_args(argv)
    if args.minutes:
        args.seconds = args.minutes * 60

    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _terminate)
    run = Run(args)
    t0 = time.monotonic()
    log(f"seed {args.seed}, {args.seconds:.0f} s, "
        f"{'WITHOUT extlock (control)' if args.no_extlock else 'with extlock'}, "
        f"out {run.out}")
    try:
        run.setup()
        log(f"fencing: {run.fencing}, event log: {bool(run.event_log)}, "
            f"I/O trace events: {run.trace_io}, driver options: {run.driver_opts}")
        stuck = run.execute()
        final = run.final_image()
    finally:
        run.teardown()
    storage = {h.name: h.relay.log for h in run.hosts}
    failures = {}
    for h in run.hosts:
        ts = list(h.deaths) + [e["ts"] for e in h.relay.log
                               if e.get("event") == "fence-off"]
        failures[h.name] = sorted(ts)
    incarnations = {h.name: [tuple(i) for i in h.incarnations] for h in run.hosts}
    events = checker.load_jsonl(run.event_log) if run.event_log else []
    # A killed coordinator's locks end with it (the next one knows only
    # what its clients reclaim, logged as "reclaim"): the log cannot say so
    if events:
        events += [{"ts": t, "event": "coordinator-killed"}
                   for t in run.coordinator_kills]
    # a write that reaches the storage later than death + lease + fence
    # margin certainly arrived after the coordinator was free to grant its
    # locks to others (the host's last renewal was before its death)
    late_ns = 0 if args.no_extlock else (args.lease_ms + args.fence_margin_ms) * 10**6
    violations = checker.check_all(run.history, final, 0, failures, storage,
                                   incarnations, events, run.granularity,
                                   late_ns=late_ns)
    traced = 0
    if run.trace_io:
        traces, death = {}, {}
        for h in run.hosts:
            for gen, _start, end in h.incarnations:
                path = run.out / h.name / f"gen{gen}" / "trace.log"
                try:
                    with open(path, errors="replace") as f:
                        traces[(h.name, gen)] = checker.parse_trace(f)
                except OSError:
                    continue
                death[(h.name, gen)] = end
        traced = sum(len(v) for v in traces.values())
        # (off, on) intervals of each host's storage path being cut
        fenced = {}
        for h in run.hosts:
            cuts, off = [], None
            for e in sorted((e for e in h.relay.log
                             if e.get("event") in ("fence-off", "fence-on")),
                            key=lambda e: e["ts"]):
                if e["event"] == "fence-off" and off is None:
                    off = e["ts"]
                elif e["event"] == "fence-on" and off is not None:
                    cuts.append((off, e["ts"]))
                    off = None
            if off is not None:
                cuts.append((off, checker.INF))
            fenced[h.name] = cuts
        violations += checker.check_trace(traces, events, death, fenced)
    ops = run.history
    summary = {
        "seed": args.seed, "seconds": round(time.monotonic() - t0, 1),
        "extlock": not args.no_extlock, "fencing": run.fencing,
        "event-log": bool(run.event_log), "driver-options": run.driver_opts,
        "fence-agent": run.fence_agent,
        "coordinator-events": len(events),
        "traced-requests": traced,
        "ops": len(ops),
        "writes": sum(o["op"] == "write" for o in ops),
        "reads": sum(o["op"] == "read" for o in ops),
        "acked": sum(o["status"] == "ok" for o in ops),
        "client-errors": sum(o["status"] == "error" for o in ops),
        "lost-with-host": sum(o["status"] == "lost" for o in ops),
        "client-timeouts": sum(o["status"] == "timeout" for o in ops),
        "faults": len(run.faults),
        "excluded-faults": run.excluded,
        "faults-by-kind": {k: sum(f["kind"] == k for f in run.faults)
                           for k in sorted({f["kind"] for f in run.faults})},
        "fence-offs": sum(1 for h in run.hosts for e in h.relay.log
                          if e.get("event") == "fence-off"),
        "reboots": run.reboots, "self-exits": len(run.self_exits),
        "host-start-failures": len(run.start_failures),
        "storage-writes": sum(1 for h in run.hosts for e in h.relay.log
                              if e.get("event") == "write"),
        "stuck-clients": stuck,
        "client-failures": [c.failure for c in run.clients if c.failure],
        "violations": len(violations),
        "violations-by-kind": checker.summarize(violations),
        "examples": violations[:8],
        "out": str(run.out),
    }
    with open(run.out / "history.jsonl", "w") as f:
        for o in ops:
            f.write(json.dumps(o) + "\n")
    with open(run.out / "faults.json", "w") as f:
        json.dump({"faults": run.faults, "self-exits": run.self_exits,
                   "start-failures": run.start_failures,
                   "incarnations": incarnations}, f)
    with open(run.out / "coordinator-status.json", "w") as f:
        json.dump(run.coordinator_status, f, indent=1)
    with open(run.out / "violations.json", "w") as f:
        json.dump(violations, f)
    with open(run.out / "result.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    if run.extlockd is not None and "invariant broken" in run.extlockd.stderr():
        print("extlockd: invariant broken", file=sys.stderr)
        return 1
    if args.expect == "clean":
        ok = not violations and not stuck and not summary["client-failures"] \
            and not summary["client-timeouts"]
    elif args.expect == "violations":
        ok = bool(violations)
    else:
        ok = True
    log(f"{'PASS' if ok else 'FAIL'}: {len(violations)} violations "
        f"{summary['violations-by-kind']}, {summary['ops']} ops, "
        f"{summary['faults']} faults (expected {args.expect})")
    if ok and not args.out and args.expect != "any":
        shutil.rmtree(run.out, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
