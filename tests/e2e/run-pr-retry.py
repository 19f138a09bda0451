#!/usr/bin/python3
"""End-to-end test: several interrupted PR OUTs of one guest are each
answered once, not applied twice, when the guest retries them.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

One tiny Linux guest (contrib/guest, as tests/e2e/run-pr-guests.py) has a
scsi-hd on an extlock node whose connection to the real extlockd goes
through a TCP relay that can be cut.  A Python protocol session of the
same lock-space subscribes to the reservation state and holds its
acknowledgements back, so the guest's PR OUTs wait for it:

  1. the guest sends REGISTER (key 0 -> 0x1), then RESERVE type 5 with
     key 0x1, each in the background; the coordinator applies both (the
     session sees both pr-updates) and answers neither;
  2. the relay is cut until the node's lease is lost: both commands fail
     in the guest (the node cannot know whether they were applied);
  3. the relay heals, the node gets a session again;
  4. the guest retries both commands, in the same order; the Python
     session acknowledges; both retries must succeed, READ KEYS must show
     the one key 0x1 and READ RESERVATION the guest's type 5 reservation.

A REGISTER applied twice gets RESERVATION CONFLICT (the node is already
registered with 0x1, the command says key 0).  Before the fix the node
remembered only the last interrupted PR OUT (the RESERVE), so the retried
REGISTER got a new request number and was applied again.

The control: the guest's second disk (SCSI target 1) has the same chain
without the extlock node; the same REGISTER twice there gets ILLEGAL
REQUEST (scsi-hd without PR), so step 4's check of the retry's status
can fail.

    tests/e2e/run-pr-retry.py [--lease-ms 3000] [--keep]

Exit status: 0 if passed, 1 if a check failed, 2 on setup errors.  Needs
the extlock build and the QEMU build (as tests/e2e/run-guests.py); the
images are local files, so it needs no NFS server (run it inside
scripts/isolate.sh anyway, like the other end-to-end runs).
"""

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name, file):
    spec = importlib.util.spec_from_file_location(name, HERE / file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rg = _load("run_guests", "run-guests.py")
rpg = _load("run_pr_guests", "run-pr-guests.py")
procs = rg.procs

from harness.coordinator import CoordinatorClient  # noqa: E402
from harness.faults import TcpPartition  # noqa: E402
from harness.qmp import QMPClient  # noqa: E402

LOCK_SPACE = "pr-retry-disk"


def log(msg):
    print(f"run-pr-retry: {msg}", flush=True)


class Holdout:
    """A protocol session that subscribes to the reservation state and
    acknowledges only when told to."""

    def __init__(self, address):
        self.c = CoordinatorClient(address)
        self.c.hello("holdout", LOCK_SPACE, lease_ms=60000)
        self.c.call({"type": "pr-in"})

    def next_update(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while True:
            for i, n in enumerate(self.c.notifications):
                if n.get("type") == "pr-update":
                    return self.c.notifications.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise rpg.CheckFailed("no pr-update came")
            msg = self.c._recv(left)
            if "id" in msg:
                self.c.pending.setdefault(msg["id"], []).append(msg)
            else:
                self.c.notifications.append(msg)

    def ack(self, seq):
        r = self.c.call({"type": "pr-ack", "seq": seq})
        if r.get("type") != "pr-acked":
            raise rpg.CheckFailed(f"pr-ack: {r}")


def background(g, name, cmd):
    """Start `cmd` in the guest; its status and output go to /tmp/<name>."""
    rc, out = g.run(f"( {cmd} >/tmp/{name}.out 2>&1; echo rc=$? "
                    f">/tmp/{name}.rc ) </dev/null >/dev/null 2>&1 &")
    if rc != 0:
        raise rpg.CheckFailed(f"starting {name}: {out}")


def wait_background(g, name, timeout):
    """Wait (bounded) for a background command: (status, output)."""
    rc, out = g.run(f"n=0; until [ -s /tmp/{name}.rc ]; do n=$((n + 1)); "
                    f"[ $n -le {int(timeout * 10)} ] || exit 1; usleep 100000;"
                    f" done; cat /tmp/{name}.rc; cat /tmp/{name}.out",
                    timeout=timeout + 30)
    if rc != 0:
        raise rpg.CheckFailed(f"{g.name}: {name} did not finish within "
                              f"{timeout:.0f} s")
    first, _, rest = out.partition("\n")
    return int(first.split("=", 1)[1]), rest


def run(args, qemu, accel, kernel, initrd, workdir):
    pg = procs.ProcessGroup(workdir)
    c = rpg.Checks()
    image = workdir / "pr.raw"
    control_image = workdir / "pr-control.raw"
    for path in (image, control_image):
        with open(path, "wb") as f:
            f.truncate(16 << 20)
    g = rpg.PrGuest(1, workdir, 0x1)
    relay = None
    try:
        daemon = pg.extlockd(lease_ms=args.lease_ms, tcp=True)
        relay = TcpPartition(daemon.tcp_port)
        blockdevs, top = rg.disk_blockdevs("extlock", "file", image,
                                           relay.coordinator(), 1)
        blockdevs[-1]["lock-space"] = LOCK_SPACE
        ctl, control_top = rg.disk_blockdevs("no-extlock", "file",
                                             control_image, None, 101)
        g.start(qemu, accel, args, kernel, initrd, blockdevs + ctl, top,
                control_top)
        g.wait_serving(time.monotonic() + args.boot_timeout)
        log(f"guest serving after {g.booted_s:.1f} s ({accel})")
        qmp = QMPClient(str(g.qmp_path))
        qmp.connect()
        dev = g.dev
        register = f"sg_persist -n -o -G -S 0x1 -d {dev}"
        reserve = f"sg_persist -n -o -R -T 5 -K 0x1 -d {dev}"

        # the control: the check of the retried REGISTER's status can fail
        g.use("control")
        rc, out = g.run(register.replace(dev, g.dev))
        c.check("control: REGISTER fails without the extlock node", rc != 0,
                out)
        control_ok = rc != 0
        g.use("extlock")

        log("step 1: REGISTER and RESERVE wait for the holdout session")
        holdout = Holdout(daemon.address)
        background(g, "register1", register)
        s1 = holdout.next_update()["seq"]
        background(g, "reserve1", reserve)
        s2 = holdout.next_update()["seq"]
        c.check("both were applied by the coordinator", s2 > s1, (s1, s2))

        log("step 2: cut the node off until its lease is lost")
        relay.cut()
        qmp.wait_event("EXTENT_LOCK_LEASE_LOST",
                       timeout=args.lease_ms / 1000 * 4 + 30)
        rc1, out1 = wait_background(g, "register1", 60)
        rc2, out2 = wait_background(g, "reserve1", 60)
        c.check("the first REGISTER failed unanswered", rc1 != 0, out1)
        c.check("the first RESERVE failed unanswered", rc2 != 0, out2)

        log("step 3: heal; the node gets a session again")
        relay.heal()
        qmp.wait_event("EXTENT_LOCK_LEASE_RESTORED",
                       timeout=args.lease_ms / 1000 * 4 + 30)

        log("step 4: the guest retries both; the holdout acknowledges")
        background(g, "register2", register)
        background(g, "reserve2", reserve)
        # a retry of a change still waiting is answered with it: no new
        # pr-update; a command applied again is (and gets its answer at
        # once if it conflicts)
        holdout.ack(s2)
        rc1, out1 = wait_background(g, "register2", 60)
        rc2, out2 = wait_background(g, "reserve2", 60)
        c.check("the retried REGISTER succeeds (answered, not applied "
                "again)", rc1 == 0, out1)
        c.check("the retried RESERVE succeeds", rc2 == 0, out2)
        _, keys = rpg.read_keys(g)
        c.check("READ KEYS shows the one key 0x1", keys == [0x1], keys)
        _, holder, rtype = rpg.read_reservation(g)
        c.check("READ RESERVATION shows the guest's type 5 reservation",
                holder == 0x1 and rtype == rpg.WE_RO, (holder, rtype))
        qmp.close()
        return c, control_ok
    finally:
        g.stop()
        if relay is not None:
            relay.close()
        pg.stop_all()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lease-ms", type=int, default=3000,
                   help="extlockd --lease-ms (default 3000)")
    rpg.add_guest_options(p)
    args = p.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="xlprr-"))
    ok = False
    t0 = time.monotonic()
    try:
        qemu = rg.find_qemu(args.qemu)
        rg.find_extlockd(args.extlockd)
        kernel, initrd = rg.build_guest()
        accel, why = rg.choose_accel(qemu, args, kernel, initrd, workdir)
        log(f"accelerator: {accel} ({why})")
        c, control_ok = run(args, qemu, accel, kernel, initrd, workdir)
        ok = bool(c.results) and not c.failed() and control_ok
        for n in c.failed():
            log(f"FAILED: {n}")
    except rpg.CheckFailed as e:
        log(f"FAILED: {e}")
        return 1
    except (rg.SetupError, procs.MissingBinary, RuntimeError) as e:
        log(f"error: {e}")
        return 2
    finally:
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"work directory kept: {workdir}")
    log(f"{'PASS' if ok else 'FAIL'} ({time.monotonic() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
