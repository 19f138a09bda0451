#!/usr/bin/python3
"""extlock demo: two QEMU processes share one raw image on NFS, safely.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Run as root after the builds (scripts/demo.sh builds first, then runs this):

    /usr/bin/python3 scripts/demo.py

What it does, all on 127.0.0.1 and in a temporary directory:
  1. starts a userspace NFS server (nfs-ganesha) exporting a directory and
     the extlock coordinator (extlockd);
  2. creates a raw image on the export with qemu-img over NFS;
  3. starts two qemu-storage-daemon processes ("host-a" and "host-b"), each
     with an extlock node over the same NFS image, exported over NBD;
  4. scene 1: a third client takes an exclusive lock; reads through both
     hosts wait for it - query-extent-locks of both hosts and extlockctl
     show who waits for whom; the lock is released and both reads finish;
  5. scene 2: both hosts write the same 1 MiB extents with their own byte
     pattern at the same time, while we sample query-extent-locks live;
  6. verifies that every extent holds exactly one host's pattern (read
     locally and through both hosts), prints a summary, and stops every
     process it started.
Bounded: every step has a timeout; the whole run takes well under a minute.
"""

import argparse
import json
import sys
import tempfile
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "qemu"))

from harness import procs as hp                          # noqa: E402
from harness.coordinator import CoordinatorClient        # noqa: E402
from harness.ganesha import NfsServer, NfsServerError    # noqa: E402
from harness.patterns import check_uniform_extents       # noqa: E402

MiB = 1024 * 1024
IMAGE_SIZE = 64 * MiB
EXTENTS = 32                   # scene 2 writes extents 0..31 (1 MiB each)
ROUNDS = 16
PATTERNS = {"host-a": 0xaa, "host-b": 0xbb}
LOCK_SPACE = "demo-disk"
DEADLINE = 50.0                # seconds for the whole demo


def say(text=""):
    print(text, flush=True)


def title(text):
    say()
    say(f"=== {text} " + "=" * max(0, 70 - len(text)))


def extent(e):
    """'ex@3M' for an exclusive lock on the 1 MiB extent at 3 MiB."""
    return f"{e['mode'][:2]}@{e['offset'] / MiB:g}M"


def shorten(items, limit=4):
    text = " ".join(items[:limit])
    if len(items) > limit:
        text += f" +{len(items) - limit}"
    return text or "-"


def brief(node):
    """One line of a query-extent-locks entry."""
    held = shorten([extent(h) for h in node["held"]])
    # blocked-by is known once the coordinator has queued the request
    waiting = shorten([extent(w) + ("<" + ",".join(w["blocked-by"]) if w["blocked-by"]
                                    else "(sent)") for w in node["waiting"]])
    c = node["counters"]
    return (f"{node['client-id']}: held {held}; waiting {waiting}; "
            f"waits so far {c['waits']}")


FIELD_ORDER = ["node-name", "lock-space", "client-id", "coordinator", "connected",
               "session", "epoch", "granularity", "lease-time", "lease-remaining",
               "held", "waiting", "counters"]


def ordered(node):
    """A query-extent-locks entry with its members in schema order."""
    out = {k: node[k] for k in FIELD_ORDER if k in node}
    out.update({k: v for k, v in node.items() if k not in out})
    return out


class Demo:
    def __init__(self, lock_cache):
        self.lock_cache = lock_cache
        self.start = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="extlock-demo-"))
        self.group = hp.ProcessGroup(self.tmp)
        self.nfs = None
        self.hosts = {}
        self.background = []

    def remaining(self):
        return max(1.0, DEADLINE - (time.monotonic() - self.start))

    # -- set-up --------------------------------------------------------------
    def setup(self):
        for name in ("extlockd", "extlockctl", "qemu-img", "qemu-io",
                     "qemu-storage-daemon"):
            hp.binary(name)            # fail early with a build hint

        title("1. NFS server (nfs-ganesha on 127.0.0.1) and coordinator")
        self.nfs = NfsServer(workdir=self.tmp / "nfs").start()
        say(f"NFS export:   {self.nfs.url()}")
        self.extlockd = self.group.extlockd(lease_ms=5000)
        say(f"extlockd:     {self.extlockd.address} (pid {self.extlockd.proc.pid})")

        title("2. raw image on the export, created over NFS")
        self.image = self.nfs.export_dir / "shared.raw"
        r = hp.run_qemu_img("create", "-f", "raw", self.nfs.url("shared.raw"),
                            str(IMAGE_SIZE))
        if r.returncode != 0:
            raise RuntimeError(f"qemu-img create failed: {r.stderr}")
        say(f"$ qemu-img create -f raw {self.nfs.url('shared.raw')} 64M")
        say(r.stdout.strip())

        title("3. two qemu-storage-daemon processes, one extlock node each "
              f"(lock-cache {'on' if self.lock_cache else 'off'})")
        for host in PATTERNS:
            node = hp.extlock_node(hp.nfs_child(self.image),
                                   self.extlockd.coordinator(), LOCK_SPACE,
                                   node_name="shared0", client_id=host,
                                   lock_cache=self.lock_cache)
            self.hosts[host] = self.group.storage_daemon(
                name=host, blockdevs=[node], exports=[("disk", "shared0", True)])
            say(f"{host}: qemu-storage-daemon pid {self.hosts[host].proc.pid}, "
                f"--blockdev '{json.dumps(node)}'")

    def query(self, host):
        return self.hosts[host].qmp.execute("query-extent-locks")[0]

    def io(self, host, cmds, tag):
        """Start a qemu-io NBD client of `host` in the background."""
        out, err = self.tmp / f"{tag}.out", self.tmp / f"{tag}.err"
        p = hp.start_qemu_io(self.hosts[host].nbd_opts("disk"), cmds, out, err)
        self.background.append(p)
        return p, out, err

    def wait_io(self, job, what):
        p, out, err = job
        rc = p.wait(timeout=self.remaining())
        text = out.read_text(errors="replace") + err.read_text(errors="replace")
        if rc != 0 or "failed" in text:
            raise RuntimeError(f"{what} failed (exit {rc}): {text}")
        return text

    # -- scene 1 -------------------------------------------------------------
    def scene_waiting(self):
        title("4. a third client holds [0, 1M) exclusively; both hosts read it")
        with CoordinatorClient(self.extlockd.address) as tool:
            tool.hello("maintenance-tool", LOCK_SPACE)
            grant = tool.lock(0, MiB, "exclusive")
            say(f"maintenance-tool holds lock {grant['lock']} "
                f"(token {grant['token']}) on [0, 1M)")
            jobs = {h: self.io(h, ["read -P 0 0 64k"], f"read-{h}") for h in self.hosts}
            deadline = time.monotonic() + 15
            while not all(self.query(h)["waiting"] for h in self.hosts):
                if time.monotonic() > deadline:
                    raise RuntimeError("the reads did not wait for the lock")
                time.sleep(0.05)
            time.sleep(0.3)
            for host in self.hosts:
                say(f"\n{host}$ query-extent-locks")
                say(json.dumps(ordered(self.query(host)), indent=2))
            say(f"\n$ extlockctl -c {self.extlockd.address} status")
            ctl = self.extlockd.ctl("status")
            say(ctl.stdout.rstrip() or ctl.stderr.rstrip())
            say("\nmaintenance-tool releases its lock ...")
            tool.unlock(grant["lock"])
            for host, job in jobs.items():
                self.wait_io(job, f"read through {host}")
                say(f"{host}: read finished after the release")
            tool.bye()

    # -- scene 2 -------------------------------------------------------------
    def scene_writes(self):
        title(f"5. both hosts write the same {EXTENTS} x 1 MiB extents, "
              f"{ROUNDS} rounds each")
        jobs = {}
        for n, (host, pattern) in enumerate(PATTERNS.items()):
            cmds = []
            for r in range(ROUNDS):
                order = range(EXTENTS) if (r + n) % 2 == 0 else reversed(range(EXTENTS))
                cmds += [f"aio_write -q -P {pattern:#x} {i * MiB} {MiB}" for i in order]
                cmds.append("aio_flush")
            jobs[host] = self.io(host, cmds, f"write-{host}")
            say(f"{host}: writing pattern {pattern:#04x}")
        samples, shown = 0, 0
        while any(j[0].poll() is None for j in jobs.values()):
            if time.monotonic() - self.start > DEADLINE:
                raise RuntimeError("the writers did not finish in time")
            nodes = [self.query(h) for h in self.hosts]
            samples += 1
            if shown < 8 and any(n["held"] or n["waiting"] for n in nodes):
                shown += 1
                say(f"  live {time.monotonic() - self.start:5.1f}s | "
                    + " | ".join(brief(n) for n in nodes))
            if shown == 3:
                say(f"\n$ extlockctl -c {self.extlockd.address} status   (while writing)")
                ctl = self.extlockd.ctl("status")
                say(ctl.stdout.rstrip() or ctl.stderr.rstrip())
                say()
                shown += 1
            time.sleep(0.1)
        for host, job in jobs.items():
            self.wait_io(job, f"writes through {host}")
        say(f"both writers done ({samples} live samples taken)")

    # -- verification --------------------------------------------------------
    def verify(self):
        title("6. verification")
        found, problems = check_uniform_extents(self.image, MiB, EXTENTS,
                                                set(PATTERNS.values()))
        names = {v: k for k, v in PATTERNS.items()}
        say("extent owners: " + " ".join(
            names[p][-1] if p in names else "?" for p in found))
        for host in self.hosts:      # read back through each host, too
            cmds = [f"read -q -P {p:#x} {i * MiB} {MiB}" for i, p in enumerate(found)
                    if p is not None]
            r = hp.run_qemu_io(self.hosts[host].nbd_opts("disk"), cmds,
                               timeout=self.remaining())
            if r.returncode != 0:
                problems.append(f"read-back through {host} failed: {r.stdout}{r.stderr}")
        title("summary")
        for host in self.hosts:
            c = self.query(host)["counters"]
            say(f"{host}: {c['requests']} lock requests, {c['grants']} grants, "
                f"{c['waits']} had to wait ({c['total-wait-us'] / 1000:.1f} ms "
                f"in total), {c['errors']} errors"
                + (f"; {c['cache-hits']} served from cached locks, "
                   f"{c['revocations']} revoked, {c['downgrades']} downgraded"
                   if self.lock_cache else ""))
        if problems:
            say("FAILED: " + "; ".join(problems))
            return False
        counts = {h: sum(1 for p in found if p == v) for h, v in PATTERNS.items()}
        say(f"OK: all {EXTENTS} extents are whole writes "
            f"({', '.join(f'{h}: {n}' for h, n in counts.items())}); "
            f"no torn writes; demo took {time.monotonic() - self.start:.1f} s")
        return True

    # -- teardown ------------------------------------------------------------
    def cleanup(self):
        for p in self.background:
            if p.poll() is None:
                p.kill()
                p.wait()
        try:
            self.group.stop_all()
        finally:
            if self.nfs is not None:
                self.nfs.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock-cache", choices=("on", "off"), default="on",
                        help="the extlock nodes' lock-cache option (default: on)")
    args = parser.parse_args()
    demo = Demo(lock_cache=args.lock_cache == "on")
    ok = False
    try:
        demo.setup()
        demo.scene_waiting()
        demo.scene_writes()
        ok = demo.verify()
    except (hp.MissingBinary, NfsServerError, RuntimeError) as e:
        say(f"\ndemo failed: {e}")
    except Exception as e:                 # QMP errors, timeouts, ...
        say(f"\ndemo failed: {type(e).__name__}: {e}")
    finally:
        demo.cleanup()
        say("cleaned up: NFS server, extlockd and QEMU processes stopped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
