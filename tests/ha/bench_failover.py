#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Failover and throughput numbers for the HA coordinator (scripts/bench-ha.sh).

One run, on loopback: a 3-member etcd cluster (heartbeat 25 ms, election
250 ms), 3 extlockd replicas (etcd lease TTL 1 s), 3 clients doing lock
traffic (tests/ha/haclient.py: reconnect, follow not-leader, reclaim),
and (unless --no-qemu) 2 qemu-storage-daemon hosts whose extlock node has
the replicas as `coordinators` (lock-cache=off, so that every write needs
a lock from the coordinator; on-lease-loss=queue) with stamped writers on
shared and own extents (tests/ha/qemuhosts.py).

1. --failovers N times: kill -9 the leader, measure (CLOCK_MONOTONIC)
   - kill -> first grant by the new leader (its event log), and
   - kill -> every client has a lock again ("I/O resumes": the latest of
     the clients' first grants after the kill),
   - kill -> QEMU I/O resumed: for each host, the completion of its first
     write sent after the kill (the writers are synchronous, so this is
     the moment I/O flows again plus one write), the later of the two,
   then restart the killed replica as a follower.
2. extlock-bench for --seconds against a single-mode extlockd (state file)
   and against the HA leader (through the replicas' address list), same
   options: pairs/s and the ratio.
Prints a JSON summary on the last line; afterwards the image is checked:
no torn or mixed extent, and no QEMU write failed.
"""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import BUILD, EXTLOCKD, Etcd, HaCluster, wait_for  # noqa: E402
from haclient import Worker, overlaps  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
QEXT = 256 * KiB

BENCH = BUILD / "contrib/extlock-bench/extlock-bench"


def bench(address, seconds, clients):
    r = subprocess.run([str(BENCH), "-c", address, "-n", str(clients),
                        "-d", str(seconds), "--json"],
                       capture_output=True, text=True, timeout=seconds + 60)
    if r.returncode != 0:
        raise RuntimeError("extlock-bench: " + r.stderr)
    j = json.loads(r.stdout)
    if r.stderr.strip():
        print("extlock-bench (%s): %s" % (address, r.stderr.strip()[-500:]),
              flush=True)
    return j


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--failovers", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ttl-ms", type=int, default=1000,
                    help="etcd lease TTL of the replicas (default 1000)")
    ap.add_argument("--no-qemu", action="store_true",
                    help="no qemu-storage-daemon hosts (no QEMU build)")
    o = ap.parse_args()
    if not o.no_qemu:
        import qemuhosts

    tmp = Path(tempfile.mkdtemp(prefix="bha-"))
    etcd = Etcd(tmp / "etcd", ttl_ms=o.ttl_ms)
    (tmp / "etcd").mkdir()
    ha = HaCluster(etcd, tmp, "bench")
    single = None
    ws = []
    qws = []
    procs = None
    try:
        etcd.start_all()
        ha.start(3)
        ws = [Worker(ha.addresses(), "host%d" % i, "ls", lease_ms=2000,
                     seed=i) for i in range(3)]
        for w in ws:
            w.start()
        wait_for(lambda: all(w.grants for w in ws), 20, "traffic")
        if not o.no_qemu:
            image = tmp / "shared.raw"
            qemuhosts.make_image(image, 64 * MiB)
            procs = qemuhosts.ProcessGroup(tmp / "qemu")
            shared = [32 * MiB + i * QEXT for i in range(8)]
            qoffs = list(shared)
            for i in range(2):
                q = qemuhosts.start_host(procs, "qhost%d" % i, image,
                                         ha.addresses(), "ls-qemu",
                                         lock_cache=False,
                                         on_lease_loss="queue",
                                         lease_loss_timeout=600000)
                own = [i * 16 * MiB + k * QEXT for k in range(8)]
                qoffs += own
                qws.append(qemuhosts.Writer(
                    q, 0x10 + 0x80 * i,
                    [x for pair in zip(shared, own) for x in pair], QEXT))
            for w in qws:
                w.start()
        first_grant, resumed, qemu_resumed = [], [], []
        for n in range(o.failovers):
            leader = ha.wait_leader(timeout=30)
            wait_for(lambda: all(w.grants for w in ws), 30, "traffic")
            qdone = [w.done() for w in qws]
            wait_for(lambda: all(w.done() > d + 4
                                 for w, d in zip(qws, qdone)), 30,
                     "QEMU writes")
            old_epoch = leader.status()["epoch"]
            t0 = leader.kill9()
            others = [r for r in ha.replicas if r is not leader]

            def new_grant():
                ts = [e["ts"] for r in others for e in r.events("grant")
                      if e["ts"] > t0]
                return min(ts) if ts else None
            g = wait_for(new_grant, 30, "a grant by a new leader")
            # grants of the new epoch: a grant the dead leader sent just
            # before the kill may still arrive after it

            def resumed_at(w):
                ts = [x[0] for x in list(w.grants) if x[1] >> 40 > old_epoch]
                return min(ts) if ts else None
            wait_for(lambda: all(resumed_at(w) for w in ws), 60,
                     "every client resumed")
            r = max(resumed_at(w) for w in ws)
            first_grant.append((g - t0) / 1e6)
            resumed.append((r - t0) / 1e6)
            qtxt = ""
            if qws:
                wait_for(lambda: all(w.first_sent_after(t0) for w in qws),
                         60, "QEMU I/O resumed")
                qr = max(w.first_sent_after(t0) for w in qws)
                qemu_resumed.append((qr - t0) / 1e6)
                qtxt = ", QEMU I/O resumed %.0f ms" % qemu_resumed[-1]
            print("failover %d: first new grant %.0f ms, all clients "
                  "resumed %.0f ms%s" % (n + 1, first_grant[-1], resumed[-1],
                                         qtxt), flush=True)
            leader.start()
        for w in ws:
            w.stop()
        bad = overlaps(ws)
        errors = [e for w in ws for e in w.errors]
        ws = []
        qemu_problems = []
        if qws:
            for w in qws:
                if not w.stop():
                    errors.append("QEMU writer hung")
                errors += ["QEMU: " + e for e in w.errors]
            qemu_problems = qemuhosts.check_image(image, qws, qoffs, QEXT)
            qemu_writes = sum(w.done() for w in qws)
            qws = []
            procs.stop_all()
            procs = None

        # throughput: single mode against HA, same options (no event log,
        # no debug checks), interleaved rounds, on a fresh HA cluster
        ha.close()
        ha = HaCluster(etcd, tmp, "bench-tp")
        for i in range(3):
            ha.add("y%d" % i, lean=True)
        ha.replicas[0].extra_args.append("--create-cluster")
        for r in ha.replicas:
            r.start()
        ha.wait_leader(timeout=30)
        sdir = tmp / "single"
        sdir.mkdir()
        single = subprocess.Popen(
            [str(EXTLOCKD), "--state-file", str(sdir / "state"),
             "--listen", "unix:" + str(sdir / "s.sock"),
             "--fence-margin-ms", "200"],
            stdout=open(sdir / "log", "w"), stderr=subprocess.STDOUT)
        wait_for(lambda: (sdir / "s.sock").exists(), 10, "single extlockd")
        ha_rate, single_rate = [], []
        for _ in range(o.rounds):  # interleaved
            single_rate.append(bench("unix:" + str(sdir / "s.sock"),
                                     o.seconds, o.clients)["pairs-per-sec"])
            ha_rate.append(bench(",".join(ha.addresses()), o.seconds,
                                 o.clients)["pairs-per-sec"])
        summary = {
            "failovers": o.failovers,
            "first-grant-ms": {"median": statistics.median(first_grant),
                               "max": max(first_grant),
                               "min": min(first_grant)},
            "clients-resumed-ms": {"median": statistics.median(resumed),
                                   "max": max(resumed)},
            "qemu-io-resumed-ms": ({"median":
                                    statistics.median(qemu_resumed),
                                    "max": max(qemu_resumed),
                                    "min": min(qemu_resumed)}
                                   if qemu_resumed else None),
            "single-pairs-per-sec": single_rate,
            "ha-pairs-per-sec": ha_rate,
            "ha-over-single": (statistics.median(ha_rate) /
                               statistics.median(single_rate)),
            "step-downs-during-throughput": sum(
                r.log().count("stepping down") for r in ha.replicas),
            "overlapping-holds": len(bad),
            "client-errors": errors,
            "qemu-writes": None if o.no_qemu else qemu_writes,
            "qemu-torn-or-mixed-extents": qemu_problems,
        }
        print(json.dumps(summary))
        return 0 if not bad and not errors and not qemu_problems else 1
    finally:
        for w in ws:
            w.stop(5)
        for w in qws:
            w.stop(5)
        if procs:
            procs.stop_all()
        if single:
            single.terminate()
            single.wait()
        ha.close()
        etcd.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
