#!/usr/bin/python3
"""End-to-end backup test: a consistent cut of two running guests' disk.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Two tiny guests (contrib/guest, as in tests/e2e/run-guests.py) run the
stamped workload extlock-stress on one raw image on the loopback NFS
export, through extlock nodes of one extlockd, with --op-log: each guest
prints, at the end, every write it completed and every read that saw a
whole write, with its own CLOCK_MONOTONIC times.  While they run, on the
host:

 1. ``extlockctl freeze -- qemu-img convert`` copies the image;
 2. ``extlockctl freeze -- slow copy``: a copier that reads the data area
    4 KiB at a time with pauses (about 2 s for the 4 MiB), so that the
    guests would write while it reads if the freeze did not hold them;
 3. the control: the same slow copy without the freeze;
 4. a freeze whose COMMAND outlives --timeout: exit status 124, the error
    names the timeout, the lock is gone from extlockd, the guests go on;
 5. a freeze whose COMMAND fails: exit status 1, the error names the
    command's status, the lock is gone, the guests go on.

After the guests have finished, every copy is checked as a cut:

* every extent holds one whole write (or is unwritten): no extent mixes
  two writes or a write and zeroes (contrib/guest/verify-image.py's
  extent check), and every write in the copy is one a guest logged;
* no write is missing that happened before a write in the copy: the
  happens-before order is built from the logs alone (no clock is shared
  between the guests) by two rules: an operation of a guest that ended
  before another of the same guest began is before it (one monotonic
  clock), and a write is before every read that saw it.  Every write that
  is before (transitively) a write shown in the copy must be in the copy,
  or its extent must show a write that is not before it: an extent that
  shows a write older than one that is "in" (before it, through the
  order), or that is empty, is a missing write.

Both freeze copies must pass; the control must be caught (torn extents or
missing writes: the slow copy reads each extent over ~100 ms while four
writers write 16 extents).  The cut token and time the freeze passes to
COMMAND (EXTLOCK_CUT_TOKEN, EXTLOCK_CUT_TIME) are recorded with each
copy and checked: tokens grow from freeze to freeze and the time lies
between the start and the end of the freeze.  Afterwards the guests must
have finished without I/O errors, torn reads or mixed extents, and the
final image must verify (nothing lost after the failed freezes).

    tests/e2e/run-backup.py [--seconds 40] [--keep] [--json FILE]

Exit status: 0 pass, 1 fail, 2 setup error.  Needs root (the NFS server):
run it inside scripts/isolate.sh unless the machine is yours.
"""

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "qemu"))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rg = _load("run_guests", HERE / "run-guests.py")
vi = _load("verify_image", REPO / "contrib" / "guest" / "verify-image.py")

from harness import procs  # noqa: E402
from harness.ganesha import NfsServer, NfsServerError, terminate_pid  # noqa: E402

OPW_RE = re.compile(r"EXTLOCK-STRESS-OPW (\d+) (\d+) (\d+) (\d+)")
OPR_RE = re.compile(r"EXTLOCK-STRESS-OPR (\d+) (\d+) (\d+) (\d+) (\d+)")
OPEND_RE = re.compile(r"EXTLOCK-STRESS-OPLOG-END dropped=(\d+)")


def log(msg):
    print(f"run-backup: {msg}", flush=True)


class Failure(Exception):
    pass


# ---------------------------------------------------------------------------
# the slow copier (run as COMMAND of the freeze, or alone for the control)

def slow_copy(src, dst, start, end, chunk, pause):
    """Copy @src to @dst: [start, end) @chunk bytes at a time with @pause
    seconds between chunks (workload shaping, not synchronisation: it
    widens the window in which an unfrozen copy sees writes), the rest at
    once."""
    with open(src, "rb") as f, open(dst, "wb") as g:
        size = os.fstat(f.fileno()).st_size
        g.truncate(size)
        f.seek(0)
        g.write(f.read(start))
        pos = start
        while pos < end:
            f.seek(pos)
            g.seek(pos)
            g.write(f.read(min(chunk, end - pos)))
            pos += chunk
            time.sleep(pause)
        f.seek(end)
        g.seek(end)
        g.write(f.read(size - end))


# ---------------------------------------------------------------------------
# the cut check

class Op:
    __slots__ = ("guest", "write", "extent", "sg", "seq", "t0", "t1")

    def __init__(self, guest, write, extent, sg, seq, t0, t1):
        self.guest, self.write, self.extent = guest, write, extent
        self.sg, self.seq, self.t0, self.t1 = sg, seq, t0, t1


def parse_ops(guest, text):
    """The op log of one guest: (ops, complete?, dropped)."""
    ops = []
    done, dropped = False, 0
    for line in text.splitlines():
        m = OPW_RE.search(line)
        if m:
            seq, ext, t0, t1 = map(int, m.groups())
            ops.append(Op(guest, True, ext, guest, seq, t0, t1))
            continue
        m = OPR_RE.search(line)
        if m:
            ext, sg, seq, t0, t1 = map(int, m.groups())
            ops.append(Op(guest, False, ext, sg, seq, t0, t1))
            continue
        m = OPEND_RE.search(line)
        if m:
            done, dropped = True, int(m.group(1))
    return ops, done, dropped


def check_cut(image, layout, ops):
    """Check @image (a copy) as a consistent cut of the logged operations.
    Returns (problems, stats)."""
    problems = []
    writes = {(o.guest, o.seq): o for o in ops if o.write}
    guests = sorted({o.guest for o in ops})
    by_guest = {g: [o for o in ops if o.guest == g] for g in guests}
    reads_of = {}                   # write stamp -> reads that saw it
    for o in ops:
        if not o.write and o.sg:
            reads_of.setdefault((o.sg, o.seq), []).append(o)

    # what the copy shows
    shown = {}
    data = Path(image).read_bytes()
    for e in range(layout.extents):
        off = layout.data_offset + e * layout.extent_size
        r = vi.check_extent(layout, data[off:off + layout.extent_size], e)
        if r["kind"] == "unwritten":
            shown[e] = None
        elif r["kind"] == "complete":
            g, s = (int(x) for x in next(iter(r["stamps"])).split(":"))
            if (g, s) not in writes:
                problems.append(f"extent {e}: write {g}:{s} is in the copy "
                                "but no guest logged it as completed")
                shown[e] = None
            else:
                shown[e] = (g, s)
        else:
            problems.append(f"extent {e}: {r['kind']} (stamps "
                            f"{r['stamps']}, {r['zero_sectors']} zero "
                            "sectors): not one whole write")

    # backward: every op that is before some write shown.  Per guest, the
    # ops "in" are those ending before the latest start of an op "in" of
    # that guest, plus the writes seen by reads "in".
    latest = {g: -1 for g in guests}
    forced = set()                  # writes "in" by a read edge or shown
    for st in shown.values():
        if st:
            forced.add(st)
            w = writes[st]
            latest[w.guest] = max(latest[w.guest], w.t0)
    for _ in range(len(ops) + 1):                   # bounded fixpoint
        changed = False
        for g in guests:
            for o in by_guest[g]:
                inn = o.t1 < latest[g] or (o.write and (g, o.seq) in forced)
                if not inn:
                    continue
                if o.t0 > latest[g]:
                    latest[g] = o.t0
                    changed = True
                if not o.write and o.sg and (o.sg, o.seq) not in forced:
                    forced.add((o.sg, o.seq))
                    w = writes.get((o.sg, o.seq))
                    if w and w.t0 > latest[w.guest]:
                        latest[w.guest] = w.t0
                    changed = True
        if not changed:
            break
    must = [w for w in writes.values()
            if w.t1 < latest[w.guest] or (w.guest, w.seq) in forced]

    def reach_from(x):
        """Earliest end, per guest, of the ops after write @x: an op of
        guest g is after x iff it is x or begins after ends[g]."""
        ends = {g: float("inf") for g in guests}
        ends[x.guest] = x.t1
        after = {(x.guest, x.seq)}
        for _ in range(len(ops) + 1):               # bounded fixpoint
            changed = False
            for stamp, reads in reads_of.items():
                w = writes.get(stamp)
                if w is None:
                    continue
                if stamp not in after and w.t0 <= ends[w.guest]:
                    continue
                after.add(stamp)
                for r in reads:
                    if r.t1 < ends[r.guest]:
                        ends[r.guest] = r.t1
                        changed = True
            if not changed:
                break
        return lambda w: (w.guest, w.seq) == (x.guest, x.seq) or \
            w.t0 > ends[w.guest]

    missing = 0
    after_shown = {e: reach_from(writes[st]) for e, st in shown.items() if st}
    for w in must:
        st = shown.get(w.extent, "torn")
        if st == "torn" or st == (w.guest, w.seq):
            continue
        if st is None:
            why = "the extent is empty in the copy"
        elif after_shown[w.extent](w):
            why = f"the copy shows {st[0]}:{st[1]}, which is before it"
        else:
            continue
        missing += 1
        if missing <= 5:
            problems.append(f"extent {w.extent}: write {w.guest}:{w.seq} "
                            f"is missing although it is before a write in "
                            f"the copy ({why})")
    if missing > 5:
        problems.append(f"... {missing} missing writes in all")
    stats = {"shown": sum(1 for s in shown.values() if s),
             "writes_before_cut": len(must), "missing": missing,
             "logged_writes": len(writes),
             "logged_reads": sum(1 for o in ops if not o.write)}
    return problems, stats


def self_test():
    """The cut checker on synthetic logs: a consistent and two
    inconsistent copies must be told apart."""
    layout = vi.Layout(run_id=0x77, guests=2, extent_size=8 * vi.SECTOR,
                       extents=2, data_offset=4096, control_offset=0,
                       max_seq={1: 9, 2: 9})
    n = layout.nsectors

    def image(path, content):
        with open(path, "wb") as f:
            f.truncate(layout.data_end)
            for e, st in content.items():
                if st:
                    f.seek(layout.data_offset + e * layout.extent_size)
                    f.write(b"".join(vi.make_sector(layout, st[0], st[1], e, i)
                                     for i in range(n)))
    # guest 1 writes 1:1 on extent 0 then 1:2 on extent 1; guest 2 reads
    # 1:2 and then writes 2:1 on extent 0
    # (and then 1:3 on extent 0, 1:4 on extent 1)
    ops = [Op(1, True, 0, 1, 1, 0, 10), Op(1, True, 1, 1, 2, 20, 30),
           Op(2, False, 1, 1, 2, 500, 510), Op(2, True, 0, 2, 1, 520, 530),
           Op(1, True, 0, 1, 3, 40, 50), Op(1, True, 1, 1, 4, 60, 70)]
    cases = {"consistent": ({0: (1, 1), 1: (1, 2)}, 0),
             "older-shown": ({0: (1, 1), 1: (1, 4)}, 1),
             "later": ({0: (2, 1), 1: (1, 2)}, 0),
             "missing-same-guest": ({0: None, 1: (1, 2)}, 1),
             "missing-via-read": ({0: (2, 1), 1: None}, 1)}
    with tempfile.TemporaryDirectory() as d:
        for name, (content, want) in cases.items():
            p = Path(d) / f"{name}.raw"
            image(p, content)
            problems, _ = check_cut(p, layout, ops)
            if (len(problems) > 0) != (want > 0):
                print(f"run-backup: self-test {name} FAILED: {problems}")
                return False
    return True


# ---------------------------------------------------------------------------
# the guest agent

# COMMAND's view of the agents while the cut is held (argv: out-file,
# exit status, sockets...)
AGENT_STATUS = r"""
import json, os, socket, sys
out, rc, socks = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
seen = []
for path in socks:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(path)
    f = s.makefile("rb")
    s.sendall(b'{"execute": "guest-sync", "arguments": {"id": 4711}}\n')
    for _ in range(100):
        line = f.readline().strip(b"\xff \n")
        if line and json.loads(line).get("return") == 4711:
            break
    s.sendall(b'{"execute": "guest-fsfreeze-status"}\n')
    seen.append(json.loads(f.readline())["return"])
    s.close()
json.dump({"status": seen,
           "consistency": os.environ.get("EXTLOCK_CUT_CONSISTENCY"),
           "filesystems": os.environ.get("EXTLOCK_CUT_GUEST_FILESYSTEMS")},
          open(out, "w"))
sys.exit(rc)
"""


def agent_call(sock, command, timeout=10.0):
    """One command to a guest agent, after resynchronising the channel."""
    import socket as so
    s = so.socket(so.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(str(sock))
        f = s.makefile("rb")
        sync = random.getrandbits(31)
        s.sendall(json.dumps({"execute": "guest-sync",
                              "arguments": {"id": sync}}).encode() + b"\n")
        for _ in range(100):                            # bounded
            line = f.readline()
            if not line:
                raise OSError("agent channel closed")
            line = line.strip(b"\xff \n")
            try:
                if line and json.loads(line).get("return") == sync:
                    break
            except ValueError:      # what a previous client left
                continue
        s.sendall(json.dumps({"execute": command}).encode() + b"\n")
        reply = json.loads(f.readline())
    finally:
        s.close()
    if "return" not in reply:
        raise OSError(f"agent {sock}: {command}: {reply}")
    return reply["return"]


# ---------------------------------------------------------------------------
# the run

def start_guest(g, qemu, accel, gargs, kernel, initrd, blockdevs, top,
                append, extra):
    """run-guests.py's start_guest, with @extra arguments after the
    shared disk (so that it stays /dev/vda)."""
    argv = rg.qemu_base_argv(qemu, accel, gargs, kernel, initrd, append,
                             g.serial, qmp_path=g.qmp_path,
                             name=f"guest{g.index}")
    for bd in blockdevs:
        argv += ["-blockdev", json.dumps(bd)]
    argv += ["-device", f"virtio-blk-pci,drive={top},share-rw=on"]
    argv += extra
    g.serial.unlink(missing_ok=True)
    g.qmp_path.unlink(missing_ok=True)
    with open(g.stderr_path, "wb") as err:
        g.started = time.monotonic()
        g.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err,
                                  stderr=err)
    (g.serial.parent / f"qemu-{g.index}.argv").write_text(
        " ".join(argv) + "\n")


def node_requests(g):
    """Requests of the guest's extlock node: those that asked the
    coordinator and those served by a cached lock (None if unknown)."""
    rg.poll_lock_info(g)
    if not g.lock_info:
        return None
    c = g.lock_info[0]["counters"]
    return c["requests"] + c["cache-hits"]


def wait_progress(guests, n, timeout, what):
    """Wait until each guest's node has served @n more requests."""
    base = {g.index: node_requests(g) or 0 for g in guests}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(not g.alive() for g in guests):
            raise Failure(f"{what}: a guest is no longer running")
        if all((node_requests(g) or 0) >= base[g.index] + n for g in guests):
            return
        time.sleep(0.1)
    raise Failure(f"{what}: the guests did not make {n} requests each "
                  f"within {timeout:.0f} s")


def freeze_held(daemon, space):
    """The coordinator's view: a lock of a freeze (client id freeze/...)
    still held or waiting in @space."""
    from harness.coordinator import coordinator_status
    st = coordinator_status(daemon.address)
    for sp in st.get("lock-spaces", []):
        if sp.get("name") != space:
            continue
        for x in sp.get("held", []) + sp.get("waiting", []):
            if str(x.get("client-id", "")).startswith("freeze/"):
                return True
    return False


def iso_time(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def run(args, workdir, report, cleanup):
    qemu = rg.find_qemu(args.qemu)
    rg.find_extlockd(args.extlockd)
    extlockctl = procs.binary("extlockctl")
    qemu_img = procs.binary("qemu-img")
    if args.agent and not (shutil.which("qemu-ga") and
                           shutil.which("mkfs.ext4")):
        raise rg.SetupError("the guest agent steps need qemu-ga "
                            "(qemu-guest-agent, copied into the guest) and "
                            "mkfs.ext4 (e2fsprogs); --no-agent skips them")
    kernel, initrd = rg.build_guest()
    if not self_test():
        raise rg.SetupError("the cut checker fails its self-test")
    gargs = argparse.Namespace(memory=192, smp=1, cpu=None,
                               kvm_probe_timeout=20.0, accel="auto")
    accel, why = rg.choose_accel(qemu, gargs, kernel, initrd, workdir)
    log(f"accelerator: {accel} ({why})")
    report["accel"] = accel

    nfs = NfsServer(workdir=workdir / "nfs", max_io=64 * 1024)
    nfs.start()
    cleanup.append(nfs.stop)
    pg = procs.ProcessGroup(workdir)
    guests = [rg.Guest(i, workdir) for i in (1, 2)]
    try:
        image = nfs.export_dir / "shared.raw"
        with open(image, "wb") as f:
            f.truncate(args.image_size)
        daemon = pg.extlockd()
        coordinator = daemon.coordinator()
        run_id = random.getrandbits(62) | 1
        layout = vi.Layout(run_id, 2, args.extent_size, args.extents,
                           args.data_offset, 0)
        append = (f"{rg.BASE_APPEND} xl.guests=2 xl.run-id={run_id} "
                  f"xl.writers=2 xl.readers=2 xl.seconds={args.seconds} "
                  f"xl.extent-size={args.extent_size} "
                  f"xl.extents={args.extents} "
                  f"xl.data-offset={args.data_offset} "
                  f"xl.barrier-timeout=120 xl.op-log=1")
        ga_socks = {}
        for g in guests:
            blockdevs, top = rg.disk_blockdevs("extlock", "nfs", image,
                                               coordinator, g.index)
            extra, gappend = [], ""
            if args.agent:
                # a second, private disk with ext4 for the agent to freeze
                # and the agent's virtio-serial channel
                fsimg = workdir / f"gafs-{g.index}.img"
                with open(fsimg, "wb") as f:
                    f.truncate(16 << 20)
                subprocess.run(["mkfs.ext4", "-q", "-F", str(fsimg)],
                               check=True, timeout=60)
                sock = workdir / f"ga-{g.index}.sock"
                ga_socks[g.index] = sock
                extra = ["-blockdev", json.dumps(
                    {"driver": "file", "filename": str(fsimg),
                     "node-name": "gafs"}),
                    "-device", "virtio-blk-pci,drive=gafs",
                    "-chardev", f"socket,id=ga0,path={sock},server=on,"
                    "wait=off",
                    "-device", "virtio-serial-pci",
                    "-device", "virtserialport,chardev=ga0,"
                    "name=org.qemu.guest_agent.0"]
                gappend = " xl.dev=/dev/vda xl.ga=/dev/vdb"
            start_guest(g, qemu, accel, gargs, kernel, initrd, blockdevs,
                        top, f"{append} xl.guest={g.index} "
                        f"xl.seed={random.getrandbits(31)}{gappend}", extra)
        deadline = time.monotonic() + args.boot_timeout
        while not all("EXTLOCK-STRESS-START" in g.console() for g in guests):
            if time.monotonic() > deadline or \
                    any(not g.alive() for g in guests):
                raise Failure("the guests did not start their workload: "
                              + "; ".join(g.console()[-300:] for g in guests))
            time.sleep(0.2)
        if args.agent:
            procs.wait_until(lambda: all("EXTLOCK-GUEST-AGENT" in g.console()
                                         for g in guests), timeout=30,
                             what="the guest agents")

            def pingable():
                try:
                    for s in ga_socks.values():
                        agent_call(s, "guest-ping", timeout=3.0)
                    return True
                except (OSError, ValueError):
                    return False
            procs.wait_until(pingable, timeout=60, interval=0.5,
                             what="the guest agents to answer")
        t_started = time.monotonic()
        log(f"workload running in both guests (run id {run_id:#x})")
        wait_progress(guests, 20, 60, "before the first copy")

        data_end = args.data_offset + args.extents * args.extent_size
        pace = [sys.executable, str(Path(__file__).resolve()), "--slow-copy",
                str(image), "DST", str(args.data_offset), str(data_end),
                "4096", str(args.pause_ms / 1000.0)]
        copies = []
        last_token = 0

        def freeze(name, command, timeout=60, expect_rc=0, extra=()):
            nonlocal last_token
            cutf = workdir / f"{name}.cut"
            wrapped = ["sh", "-c", 'printf "%s %s\\n" "$EXTLOCK_CUT_TOKEN" '
                       f'"$EXTLOCK_CUT_TIME" > {cutf} && exec "$@"', "sh",
                       *command]
            before = datetime.now(timezone.utc)
            t0 = time.monotonic()
            res = subprocess.run([extlockctl, "-c", daemon.address, "freeze",
                                  rg.LOCK_SPACE, "--timeout", str(timeout),
                                  *extra, "--", *wrapped],
                                 capture_output=True,
                                 text=True, timeout=timeout + 60)
            took = time.monotonic() - t0
            after = datetime.now(timezone.utc)
            info = {"name": name, "rc": res.returncode,
                    "stderr": res.stderr.strip()[-800:],
                    "seconds": round(took, 2)}
            log(f"[{name}] extlockctl freeze: exit {res.returncode} after "
                f"{took:.1f} s: {res.stderr.strip().splitlines()[-1:]}")
            if res.returncode != expect_rc:
                raise Failure(f"{name}: extlockctl freeze exited "
                              f"{res.returncode}, expected {expect_rc}: "
                              f"{res.stderr}")
            token, cut_time = cutf.read_text().split()
            token = int(token)
            info.update(token=token, cut_time=cut_time)
            if token <= last_token:
                raise Failure(f"{name}: cut token {token} not after the "
                              f"previous one {last_token}")
            last_token = token
            if not before <= iso_time(cut_time) <= after:
                # the cut time has whole seconds or more: allow its rounding
                if abs((iso_time(cut_time) - before).total_seconds()) > 1.0:
                    raise Failure(f"{name}: cut time {cut_time} outside the "
                                  f"freeze ({before} .. {after})")
            return info

        # 1. qemu-img convert under the freeze
        dst = workdir / "backup-convert.raw"
        info = freeze("convert", [qemu_img, "convert", "-U", "-f", "raw",
                                  "-O", "raw", str(image), str(dst)])
        copies.append((info, dst, "frozen"))
        wait_progress(guests, 10, 60, "after the convert")

        # 2. the slow copy under the freeze
        dst = workdir / "backup-slow-frozen.raw"
        info = freeze("slow-frozen", [x if x != "DST" else str(dst)
                                      for x in pace])
        copies.append((info, dst, "frozen"))
        wait_progress(guests, 10, 60, "after the frozen slow copy")

        # 3. the control: the same slow copy without the freeze
        dst = workdir / "backup-slow-unfrozen.raw"
        before = {g.index: node_requests(g) for g in guests}
        t0 = time.monotonic()
        subprocess.run([x if x != "DST" else str(dst) for x in pace],
                       check=True, timeout=120)
        after = {g.index: node_requests(g) for g in guests}
        info = {"name": "slow-unfrozen", "seconds":
                round(time.monotonic() - t0, 2),
                "requests_during": {i: after[i] - before[i] for i in after}}
        log(f"[slow-unfrozen] copied in {info['seconds']} s while the guests "
            f"made {info['requests_during']} requests")
        copies.append((info, dst, "control"))

        # 4. a COMMAND that outlives the timeout
        wait_progress(guests, 10, 60, "before the timeout")
        t0 = time.monotonic()
        info = freeze("timeout", [sys.executable, "-c",
                                  "import time; time.sleep(600)"],
                      timeout=3, expect_rc=124)
        if "timeout (3 s): COMMAND still running; killing it" not in \
                info["stderr"]:
            raise Failure(f"timeout: the error does not say so: "
                          f"{info['stderr']}")
        procs.wait_until(lambda: not freeze_held(daemon, rg.LOCK_SPACE),
                         timeout=30, what="the freeze gone from extlockd")
        wait_progress(guests, 10, 60, "after the timed-out freeze")
        report["after_timeout_s"] = round(time.monotonic() - t0, 2)

        # 5. a COMMAND that fails
        info2 = freeze("failing", ["sh", "-c", "exit 3"], expect_rc=1)
        if "COMMAND failed with exit status 3; releasing the lock" not in \
                info2["stderr"]:
            raise Failure(f"failing: the error does not name the status: "
                          f"{info2['stderr']}")
        procs.wait_until(lambda: not freeze_held(daemon, rg.LOCK_SPACE),
                         timeout=30, what="the freeze gone from extlockd")
        wait_progress(guests, 10, 60, "after the failed freeze")
        report["steps"] = [c[0] for c in copies] + [info, info2]

        # 6, 7. file-system-consistent: the guests' agents freeze /mnt/ga
        # before the cut and thaw it after, also when COMMAND fails
        if args.agent:
            socks = [str(ga_socks[g.index]) for g in guests]
            ga = ["--guest-agent", ",".join(socks), "--guest-fs", "/mnt/ga"]

            def agents_status():
                return [agent_call(s, "guest-fsfreeze-status") for s in socks]
            # up, and thawed, before
            if agents_status() != ["thawed", "thawed"]:
                raise Failure(f"agents not thawed before: {agents_status()}")
            seen = workdir / "agent-seen.json"
            dst = workdir / "backup-agent.raw"
            info = freeze("agent", ["sh", "-c", f'{sys.executable} -c '
                                    f'"$0" {seen} 0 "$@" && exec '
                                    f'{qemu_img} convert -U -f raw -O raw '
                                    f'{image} {dst}', AGENT_STATUS, *socks],
                          extra=ga)
            info["seen"] = json.loads(seen.read_text())
            if info["seen"] != {"status": ["frozen", "frozen"],
                                "consistency": "filesystem",
                                "filesystems": "2"}:
                raise Failure(f"agent: COMMAND saw {info['seen']}")
            if agents_status() != ["thawed", "thawed"]:
                raise Failure(f"agent: not thawed after: {agents_status()}")
            copies.append((info, dst, "frozen"))
            report["steps"].append(info)
            wait_progress(guests, 10, 60, "after the agent freeze")
            seen.unlink()
            info = freeze("agent-failing", [sys.executable, "-c",
                                            AGENT_STATUS, str(seen), "5",
                                            *socks],
                          expect_rc=1, extra=ga)
            info["seen"] = json.loads(seen.read_text())
            if info["seen"]["status"] != ["frozen", "frozen"] or \
                    "COMMAND failed with exit status 5" not in info["stderr"]:
                raise Failure(f"agent-failing: {info}")
            if agents_status() != ["thawed", "thawed"]:
                raise Failure(f"agent-failing: not thawed after the failed "
                              f"COMMAND: {agents_status()}")
            report["steps"].append(info)
            wait_progress(guests, 10, 60, "after the failed agent freeze")
        t_steps = time.monotonic() - t_started
        report["steps_seconds"] = round(t_steps, 1)
        if t_steps > args.seconds:
            raise Failure(f"the steps took {t_steps:.0f} s, longer than the "
                          f"workload ({args.seconds} s): raise --seconds")

        # the guests finish by themselves
        deadline = time.monotonic() + args.seconds + args.finish_timeout
        while any(g.alive() for g in guests):
            if time.monotonic() > deadline:
                raise Failure("the guests did not finish in time")
            time.sleep(0.5)
        for g in guests:
            if g.qmp is not None:
                g.qmp.close()
                g.qmp = None
    finally:
        for g in guests:
            if g.alive():
                terminate_pid(g.proc.pid, g.proc, timeout=5.0)
        pg.stop_all()

    # what the guests said
    ops = []
    max_seq = {}
    for g in guests:
        text = g.console()
        c = rg.parse_console(text)
        if c["errors"] or c["io_error_lines"] or c["exit_rc"] != 0 or \
                not c["result"]:
            raise Failure(f"guest {g.index}: errors {c['errors'][:3]}, I/O "
                          f"errors {c['io_error_lines'][:3]}, exit "
                          f"{c['exit_rc']}, result {c['result']}")
        r = c["result"]
        for key in ("torn_reads", "corrupt_reads", "final_mixed",
                    "final_corrupt"):
            if r.get(key):
                raise Failure(f"guest {g.index}: {key} = {r[key]}")
        gops, complete, dropped = parse_ops(g.index, text)
        if not complete or dropped:
            raise Failure(f"guest {g.index}: op log incomplete (end line "
                          f"{complete}, dropped {dropped})")
        ops += gops
        max_seq[g.index] = r["max_seq"]
        report.setdefault("guests", []).append(
            {"guest": g.index, "writes": r["writes"], "reads": r["reads"],
             "foreign_reads": r["foreign_reads"], "logged": len(gops)})
    layout.max_seq = max_seq

    # nothing lost: the final image holds one whole write in every extent
    final = vi.verify(image, layout)
    report["final_image"] = {k: final[k] for k in
                             ("complete", "unwritten", "mixed", "corrupt",
                              "stray_sectors")}
    if not final["ok"] or final["unwritten"]:
        raise Failure(f"final image: {report['final_image']}")

    failures = []
    for info, path, kind in copies:
        problems, stats = check_cut(path, layout, ops)
        info["check"] = stats
        info["problems"] = problems
        log(f"[{info['name']}] {stats['shown']} writes shown, "
            f"{stats['writes_before_cut']} before them, "
            f"{stats['missing']} missing; {len(problems)} problems")
        for p in problems[:4]:
            log(f"    {p}")
        if kind == "frozen" and problems:
            failures.append(f"{info['name']}: the frozen copy is not a "
                            f"consistent cut: {problems[:3]}")
        if kind == "control" and not problems:
            failures.append(f"{info['name']}: the control (no freeze) was "
                            "not caught by the checker")
        if kind == "control" and min(info["requests_during"].values()) < 1:
            failures.append(f"{info['name']}: a guest made no request "
                            "during the unfrozen copy")
    if failures:
        raise Failure("; ".join(failures))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--slow-copy"]:
        src, dst, start, end, chunk, pause = argv[1:7]
        slow_copy(src, dst, int(start), int(end), int(chunk), float(pause))
        return 0
    if argv == ["--self-test"]:
        return 0 if self_test() else 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=40,
                   help="workload time in each guest (default 40)")
    p.add_argument("--extent-size", type=rg.size_arg, default=256 * 1024)
    p.add_argument("--extents", type=int, default=16)
    p.add_argument("--data-offset", type=rg.size_arg, default=1 << 20)
    p.add_argument("--image-size", type=rg.size_arg, default=64 << 20)
    p.add_argument("--pause-ms", type=float, default=2.0,
                   help="pause of the slow copy after each 4 KiB (2)")
    p.add_argument("--boot-timeout", type=float, default=300.0)
    p.add_argument("--finish-timeout", type=float, default=120.0)
    p.add_argument("--no-agent", dest="agent", action="store_false",
                   help="no guest agent (skip the file-system-consistent "
                        "freezes)")
    p.add_argument("--qemu")
    p.add_argument("--extlockd")
    p.add_argument("--json")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        log("error: must run as root (the NFS server)")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="xlb-"))
    report = {"ok": False}
    rc = 1
    t0 = time.monotonic()
    cleanup = []
    try:
        run(args, workdir, report, cleanup)
        report["ok"] = True
        rc = 0
    except (rg.SetupError, NfsServerError, procs.MissingBinary) as e:
        log(f"error: {e}")
        report["error"] = str(e)
        rc = 2
    except (Failure, subprocess.SubprocessError, TimeoutError, OSError,
            ValueError) as e:
        log(f"FAILURE: {e}")
        report["failure"] = str(e)
        rc = 1
    finally:
        for fn in cleanup:
            fn()
        report["wall_s"] = round(time.monotonic() - t0, 1)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        (workdir / "report.json").write_text(json.dumps(report, indent=2,
                                                        default=str) + "\n")
        if rc == 0 and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"work directory kept: {workdir}")
    log(f"{'PASS' if rc == 0 else 'FAIL'} in {report['wall_s']} s")
    return rc


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    # timeout(1) in scripts/run-tests.sh ends a hung run with SIGTERM:
    # unwind like Ctrl-C, so the finally blocks stop the NFS server (its
    # own session: the signal to the process group misses it), extlockd
    # and the guests, and the next step finds 127.0.0.1:2049 free
    signal.signal(signal.SIGTERM, _sigterm)
    sys.exit(main())
