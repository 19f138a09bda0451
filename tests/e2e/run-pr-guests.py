#!/usr/bin/python3
"""End-to-end test: SCSI-3 persistent reservations sent by real guests.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Three tiny Linux guests (contrib/guest/build-guest.sh, init's xl.serve
mode) share one raw image on the loopback NFS export through

    virtio-scsi-pci -> scsi-hd (share-rw=on) -> extlock -> raw -> nfs

with one real extlockd.  Each guest boots once and then runs the commands
this script sends on its second serial port (ttyS1, a UNIX socket here),
one at a time, so the order of the steps across guests is fixed and every
wait is on a guest's answer, with a time limit.  The guests use sg_persist,
sg_turs and sg_raw from Debian's sg3-utils, with the commands fence_scsi
(fence-agents) runs: fence_scsi itself needs Python, which the guest does
not have (docs/guest-clusters.rst).

The sequence (guest 1 key 0x1, guest 2 key 0x2, guest 3 never registers):
  1. fence_scsi "on" (unfence) of guest 1, then guest 2: REGISTER AND
     IGNORE EXISTING KEY, READ KEYS, READ RESERVATION, and RESERVE Write
     Exclusive - Registrants Only (type 5) when nobody holds it;
  2. READ KEYS and READ RESERVATION from every guest: the same answers;
  3. guest 3's WRITE gets RESERVATION CONFLICT (sg_raw WRITE(10) and a
     direct write through the kernel's block layer); its read succeeds;
     guest 2's and guest 1's writes succeed and land in the image;
     guest 2's RESERVE while guest 1 holds it: RESERVATION CONFLICT;
  4. bad CDBs from guest 1 (sg_raw): invalid PR IN and PR OUT service
     actions and RESERVE with an invalid type get CHECK CONDITION, ILLEGAL
     REQUEST, INVALID FIELD IN CDB (24h/00h); a PR OUT parameter list
     length other than 24 gets PARAMETER LIST LENGTH ERROR (1Ah/00h);
  5. extlockd restarts: extlockctl shows the same registrations and
     reservation, every guest reads the same keys and reservation, the
     reservation is still enforced;
  6. fence_scsi "off" of guest 2, run on guest 1: PREEMPT AND ABORT
     (-K 0x1 -S 0x2 -T 5); guest 2's writes now conflict; every guest
     reads keys {0x1};
  7. guest 2 unfences again; guest 1's QEMU is killed with SIGKILL while
     it holds the reservation: the reservation stays (also after its
     session's lease lapsed, seen in extlockctl) until guest 2 preempts
     it with PREEMPT AND ABORT; then guest 2 holds it and guest 3 still
     cannot write.

The controls, in the same boots (each guest has a second scsi-hd, on SCSI
target 1, with the same chain without the extlock node, on its own
image): first the checks of step 1 (unfence), step 3 (guest 3's write
conflicts) and step 4 (the four bad CDBs) run against that disk, where
scsi-hd has no PR (ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE, 20h/00h)
and the unregistered write lands; at the end extlockd is restarted
without its state file, and the checks of step 5 run again.  The run
fails unless all those checks fail there: each is shown able to fail.

    tests/e2e/run-pr-guests.py [--lease-ms 6000] [--keep]

Exit status: 0 if every run passed, 1 if a check failed, 2 on setup
errors.  Needs root (the NFS server), the extlock build and the QEMU build
(as tests/e2e/run-guests.py).  See docs/guest-clusters.rst and
docs/testing.rst.
"""

import argparse
import importlib.util
import json
import os
import re
import select
import shutil
import socket
import subprocess
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("run_guests",
                                               HERE / "run-guests.py")
rg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rg)
procs = rg.procs
QMPClient = rg.QMPClient
NfsServer, NfsServerError, terminate_pid = (rg.NfsServer, rg.NfsServerError,
                                             rg.terminate_pid)

LOCK_SPACE = "pr-shared-disk"
BLOCK = 512
# PR types as sg_persist names them
WE_RO = "Write Exclusive, registrants only"


def log(msg):
    print(f"run-pr-guests: {msg}", flush=True)


class CheckFailed(Exception):
    pass


# ---------------------------------------------------------------------------
# one guest: QEMU, its console log and its command port

class PrGuest:
    def __init__(self, index, workdir, key):
        self.index = index
        self.key = key                  # its reservation key, or None
        self.name = f"guest{index}"
        self.serial = Path(workdir) / f"console-{index}.log"
        self.stderr_path = Path(workdir) / f"qemu-{index}.stderr"
        self.qmp_path = Path(workdir) / f"qmp-{index}.sock"
        self.cmd_path = Path(workdir) / f"cmd-{index}.sock"
        self.transcript = Path(workdir) / f"commands-{index}.log"
        self.proc = None
        self.sock = None
        self.buf = b""
        self.seq = 0
        self.disks = {}                 # "extlock"/"control": (dev, sg)
        self.dev = self.sg = None       # the disk the commands use
        self.booted_s = None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def console(self):
        try:
            return self.serial.read_text(errors="replace").replace("\r", "")
        except OSError:
            return ""

    def use(self, disk):
        """Send the following commands to this disk ("extlock" or
        "control")."""
        self.dev, self.sg = self.disks[disk]

    def start(self, qemu, accel, args, kernel, initrd, blockdevs, top,
              control_top):
        # no_timer_check: on a loaded host, TCG can be too slow for the
        # kernel's IO-APIC timer check, which then panics
        append = ("console=ttyS0 quiet panic=-1 no_timer_check "
                  "8250.nr_uarts=2 xl.serve=ttyS1")
        argv = rg.qemu_base_argv(qemu, accel, args, kernel, initrd, append,
                                 self.serial, qmp_path=self.qmp_path,
                                 name=self.name)
        # the command port: the second serial port (ttyS1)
        argv += ["-chardev", f"socket,id=cmd0,path={self.cmd_path},"
                 "server=on,wait=off", "-serial", "chardev:cmd0"]
        for bd in blockdevs:
            argv += ["-blockdev", json.dumps(bd)]
        # target 0: the extlock disk; target 1: the control disk (the
        # same chain without the extlock node, on its own image)
        argv += ["-device", "virtio-scsi-pci,id=scsi0",
                 "-device", f"scsi-hd,bus=scsi0.0,scsi-id=0,drive={top},"
                 "share-rw=on",
                 "-device", f"scsi-hd,bus=scsi0.0,scsi-id=1,"
                 f"drive={control_top},share-rw=on"]
        for p in (self.serial, self.qmp_path, self.cmd_path):
            p.unlink(missing_ok=True)
        (self.serial.parent / f"qemu-{self.index}.argv").write_text(
            " ".join(argv) + "\n")
        self.t0 = time.monotonic()
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err)
        procs.wait_unix_socket(self.cmd_path, self.proc, 30.0,
                               f"{self.name}'s command port")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self.cmd_path))

    def wait_serving(self, deadline):
        """Wait for init's EXTLOCK-GUEST-SERVING line on the console, then
        find the disks of SCSI targets 0 and 1 and their sg devices."""
        while True:
            if "EXTLOCK-GUEST-SERVING" in self.console():
                self.booted_s = time.monotonic() - self.t0
                for disk, target in (("extlock", 0), ("control", 1)):
                    d = f"/sys/bus/scsi/devices/*:0:{target}:0"
                    rc, out = self.run(
                        f"n=0; until [ -d {d}/block ] && [ -d "
                        f"{d}/scsi_generic ]; do n=$((n + 1)); [ $n -le 200 ]"
                        f" || exit 1; usleep 50000; done; ls {d}/block "
                        f"{d}/scsi_generic")
                    names = out.split()
                    blk = [n for n in names if n.startswith("sd")]
                    sg = [n for n in names if n.startswith("sg")]
                    if rc != 0 or len(blk) != 1 or len(sg) != 1:
                        raise CheckFailed(f"{self.name}: no disk on SCSI "
                                          f"target {target}: {out}")
                    self.disks[disk] = (f"/dev/{blk[0]}", f"/dev/{sg[0]}")
                self.use("extlock")
                return
            if not self.alive():
                raise CheckFailed(f"{self.name}: QEMU exited "
                                  f"({self.proc.returncode}) before serving: "
                                  f"{self.console()[-800:]}"
                                  f"{self.stderr_path.read_text()[-800:]}")
            if "EXTLOCK-GUEST-ERROR" in self.console():
                raise CheckFailed(f"{self.name}: {self.console()[-800:]}")
            if time.monotonic() > deadline:
                raise CheckFailed(f"{self.name} did not boot in time: "
                                  f"{self.console()[-800:]}")
            time.sleep(0.1)

    def run(self, cmd, timeout=60.0):
        """Run a shell command in the guest: (exit status, output)."""
        self.seq += 1
        cid = str(self.seq)
        self.sock.sendall(f"EXTLOCK-CMD {cid} {cmd}\n".encode())
        out = []
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n", 1)
                line = raw.decode(errors="replace").rstrip("\r")
                if line.startswith(f"EXTLOCK-OUT {cid} "):
                    out.append(line[len(f"EXTLOCK-OUT {cid} "):])
                elif line == f"EXTLOCK-OUT {cid}":
                    out.append("")
                m = re.fullmatch(rf"EXTLOCK-DONE {cid} rc=(\d+)", line)
                if m:
                    text = "\n".join(out)
                    with open(self.transcript, "a") as f:
                        f.write(f"$ {cmd}\n{text}\n[rc={m.group(1)}]\n")
                    return int(m.group(1)), text
            left = deadline - time.monotonic()
            if left <= 0:
                raise CheckFailed(f"{self.name}: no answer to {cmd!r} within "
                                  f"{timeout:.0f} s (got {out!r})")
            r, _, _ = select.select([self.sock], [], [], min(left, 1.0))
            if r:
                data = self.sock.recv(65536)
                if not data:
                    raise CheckFailed(f"{self.name}: command port closed "
                                      f"during {cmd!r}")
                self.buf += data
            elif not self.alive():
                raise CheckFailed(f"{self.name}: QEMU exited during {cmd!r}")

    def exit(self, timeout=60.0):
        try:
            self.sock.sendall(b"EXTLOCK-CMD 0 exit\n")
            self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def stop(self):
        if self.sock is not None:
            self.sock.close()
        if self.alive():
            terminate_pid(self.proc.pid, self.proc, timeout=5.0)


# ---------------------------------------------------------------------------
# what sg_persist and sg_raw print

def parse_keys(text):
    """READ KEYS (sg_persist -i -k): (generation, sorted keys)."""
    m = re.search(r"PR generation=0x([0-9a-f]+)", text)
    if not m:
        raise CheckFailed(f"READ KEYS: no generation in {text!r}")
    keys = sorted(int(k, 16) for k in
                  re.findall(r"^\s+0x([0-9a-f]+)\s*$", text, re.M))
    return int(m.group(1), 16), keys


def parse_reservation(text):
    """READ RESERVATION (sg_persist -i -r): (generation, key or None,
    type or None)."""
    m = re.search(r"PR generation=0x([0-9a-f]+)", text)
    if not m:
        raise CheckFailed(f"READ RESERVATION: no generation in {text!r}")
    k = re.search(r"Key=0x([0-9a-f]+)", text)
    t = re.search(r"type: (.+?)\s*$", text, re.M)
    return (int(m.group(1), 16), int(k.group(1), 16) if k else None,
            t.group(1) if t else None)


def cdb(*octets):
    return " ".join(f"{o:02x}" for o in octets)


def write10(lba, blocks=1):
    return cdb(0x2a, 0, *(lba >> s & 0xff for s in (24, 16, 8, 0)), 0, 0,
               blocks, 0)


class Checks:
    """Named checks; a failed one is recorded (the run goes on)."""

    def __init__(self):
        self.results = []           # (name, ok, detail)

    def check(self, name, ok, detail=""):
        self.results.append((name, bool(ok), detail))
        log(f"  {'ok  ' if ok else 'FAIL'} {name}"
            + ("" if ok else f": {detail}"))
        return ok

    def failed(self):
        return [n for n, ok, _ in self.results if not ok]


# ---------------------------------------------------------------------------
# the guest-side commands (fence_scsi's, see /usr/sbin/fence_scsi)

def dev(g):
    return g.dev


def read_keys(g):
    rc, out = g.run(f"sg_turs {dev(g)}; sg_persist -n -i -k -d {dev(g)}")
    if rc != 0:
        raise CheckFailed(f"{g.name}: READ KEYS failed (rc {rc}): {out}")
    return parse_keys(out)


def read_reservation(g):
    rc, out = g.run(f"sg_persist -n -i -r -d {dev(g)}")
    if rc != 0:
        raise CheckFailed(f"{g.name}: READ RESERVATION failed (rc {rc}): "
                          f"{out}")
    return parse_reservation(out)


def unfence(g, c):
    """fence_scsi -o on: register (ignore existing key), check, and
    reserve Write Exclusive - Registrants Only if nobody holds it."""
    key = f"0x{g.key:x}"
    g.run(f"sg_turs {dev(g)}")
    rc, out = g.run(f"sg_persist -n -o -I -S {key} -d {dev(g)}")
    c.check(f"{g.name}: REGISTER AND IGNORE EXISTING KEY {key}", rc == 0,
            out)
    try:
        _, keys = read_keys(g)
    except CheckFailed as e:
        c.check(f"{g.name}: READ KEYS after registering", False, str(e))
        return
    c.check(f"{g.name}: READ KEYS lists its key {key}", g.key in keys, keys)
    _, holder, _ = read_reservation(g)
    if holder is None:
        rc, out = g.run(f"sg_persist -n -o -R -T 5 -K {key} -d {dev(g)}")
        c.check(f"{g.name}: RESERVE type 5 (WE-RO)", rc == 0, out)


def fence(g, victim, c):
    """fence_scsi -o off of victim, run on g: PREEMPT AND ABORT."""
    rc, out = g.run(f"sg_turs {dev(g)}; sg_persist -n -o -A -T 5 "
                    f"-K 0x{g.key:x} -S 0x{victim.key:x} -d {dev(g)}")
    c.check(f"{g.name}: PREEMPT AND ABORT of {victim.name}'s key "
            f"0x{victim.key:x}", rc == 0, out)
    _, keys = read_keys(g)
    c.check(f"{victim.name}'s key is gone", victim.key not in keys, keys)
    _, holder, _ = read_reservation(g)
    c.check("a reservation exists after the fence", holder is not None,
            holder)


def sg_write(g, lba, tag):
    """WRITE(10) of one block through sg_raw: (rc, output)."""
    return g.run(f"yes {tag} | head -c {BLOCK} >/tmp/blk; "
                 f"sg_raw -v -s {BLOCK} -i /tmp/blk {g.sg} {write10(lba)}")


def dd_write(g, lba, tag):
    """A direct write through the kernel's block layer (sd)."""
    return g.run(f"yes {tag} | head -c 4096 >/tmp/pg; dd if=/tmp/pg "
                 f"of={dev(g)} bs=4096 seek={lba // 8} count=1 "
                 f"oflag=direct conv=notrunc 2>&1")


def dd_read(g, lba):
    return g.run(f"dd if={dev(g)} of=/dev/null bs=4096 skip={lba // 8} "
                 f"count=1 iflag=direct 2>&1")


def is_conflict(rc, out):
    """sg_persist exits with 24 on RESERVATION CONFLICT; sg_raw prints the
    status (and, for a status other than GOOD, its exit status is not 0)."""
    return "reservation conflict" in out.lower()


def image_has(image, lba, tag, length=4096):
    with open(image, "rb") as f:
        f.seek(lba * BLOCK)
        data = f.read(length)
    want = (tag.encode() + b"\n") * (length // (len(tag) + 1) + 1)
    return data == want[:length]


def check_write_conflicts(g, c, lba, what):
    rc, out = sg_write(g, lba, f"{g.name}-sg")
    c.check(f"{what}: {g.name}'s WRITE(10) gets RESERVATION CONFLICT",
            is_conflict(rc, out), out)
    rc, out = dd_write(g, lba, f"{g.name}-dd")
    c.check(f"{what}: {g.name}'s direct write through sd fails", rc != 0, out)


def check_write_succeeds(g, c, image, lba, what, tag):
    rc, out = dd_write(g, lba, tag)
    ok = rc == 0
    c.check(f"{what}: {g.name}'s direct write succeeds", ok, out)
    c.check(f"{what}: {g.name}'s write is in the image", image_has(
        image, lba, tag), f"image at LBA {lba} lacks {tag!r}")


def raw_sense(text):
    """(sense key, ASC, ASCQ) from the raw fixed-format sense bytes that
    sg_raw -v prints, or None."""
    m = re.search(r"Raw sense data \(in hex\)[^\n]*\n((?:\s+[0-9a-f]{2}"
                  r"(?: +[0-9a-f]{2})*\s*\n?)+)", text)
    if not m:
        return None
    b = [int(x, 16) for x in m.group(1).split()]
    if len(b) < 14 or (b[0] & 0x7f) not in (0x70, 0x71):
        return None
    return b[2] & 0x0f, b[12], b[13]


ILLEGAL_REQUEST = 0x05


def sense_check(g, c, name, cdb_text, data, want_asc, want_ascq):
    """sg_raw with a bad CDB (data: bytes of the parameter list as a
    printf format, or None for a data-in command): CHECK CONDITION,
    ILLEGAL REQUEST with the given ASC/ASCQ in the sense bytes."""
    if data is not None:
        cmd = (f"printf '{data}' >/tmp/par; sg_raw -v -s "
               f"$(wc -c </tmp/par) -i /tmp/par {g.sg} {cdb_text}")
    else:
        cmd = f"sg_raw -v -r 512 {g.sg} {cdb_text}"
    rc, out = g.run(cmd)
    sense = raw_sense(out)
    c.check(f"{name}: CHECK CONDITION, ILLEGAL REQUEST, "
            f"{want_asc:02X}h/{want_ascq:02X}h",
            "check condition" in out.lower() and
            sense == (ILLEGAL_REQUEST, want_asc, want_ascq),
            f"sense {sense}: {out}")


def param_list(key=0, length=24):
    """A PR OUT parameter list with RESERVATION KEY key, as printf
    escapes."""
    b = key.to_bytes(8, "big") + bytes(length - 8)
    return "".join(f"\\{x:03o}" for x in b)


def bad_cdbs(g, c):
    # INVALID FIELD IN CDB (24h/00h): unknown service actions, a type
    # that SPC-4 does not define (2, obsolete) in RESERVE by the holder
    sense_check(g, c, "PR IN, service action 1Fh",
                cdb(0x5e, 0x1f, 0, 0, 0, 0, 0, 0x02, 0, 0), None, 0x24, 0)
    sense_check(g, c, "PR OUT, service action 1Fh",
                cdb(0x5f, 0x1f, 0x05, 0, 0, 0, 0, 0, 24, 0),
                param_list(g.key), 0x24, 0)
    sense_check(g, c, "PR OUT RESERVE, type 2",
                cdb(0x5f, 0x01, 0x02, 0, 0, 0, 0, 0, 24, 0),
                param_list(g.key), 0x24, 0)
    # PARAMETER LIST LENGTH ERROR (1Ah/00h): PR OUT's list is 24 bytes
    sense_check(g, c, "PR OUT REGISTER, parameter list length 16",
                cdb(0x5f, 0x00, 0, 0, 0, 0, 0, 0, 16, 0),
                param_list(0, 16), 0x1a, 0)


def consistent_view(guests, c, what, want_keys, want_holder, want_type):
    views = {}
    for g in guests:
        gen, keys = read_keys(g)
        rgen, holder, rtype = read_reservation(g)
        views[g.name] = (gen, keys, rgen, holder, rtype)
    first = next(iter(views.values()))
    c.check(f"{what}: READ KEYS and READ RESERVATION agree on every guest",
            all(v == first for v in views.values()), views)
    c.check(f"{what}: keys {[hex(k) for k in want_keys]}",
            first[1] == sorted(want_keys), first)
    c.check(f"{what}: reservation held by "
            f"{hex(want_holder) if want_holder else None}, {want_type}",
            first[3] == want_holder and first[4] == want_type, first)
    return first


def wait_for(what, fn, timeout):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout:.0f} s waiting for "
                              f"{what}")
        time.sleep(0.2)


def nodes_connected(guests):
    """Every live guest's extlock node is connected to the coordinator."""
    for g in guests:
        q = QMPClient(g.qmp_path, timeout=5.0, connect_timeout=2.0)
        try:
            q.connect(alive=g.alive)
            info = q.execute("query-extent-locks", timeout=5.0)
        except Exception:
            return False
        finally:
            q.close()
        if not info or not all(n.get("connected") for n in info):
            return False
    return True


def ctl_json(daemon, what):
    res = daemon.ctl("--json", what, timeout=10.0)
    if res.returncode != 0:
        raise CheckFailed(f"extlockctl --json {what}: {res.stderr}")
    return json.loads(res.stdout)


# ---------------------------------------------------------------------------
# the runs

def start_guests(guests, nfs, image, control_image, coordinator, qemu, accel,
                 args, kernel, initrd):
    for g in guests:
        blockdevs, top = rg.disk_blockdevs("extlock", "nfs", image,
                                           coordinator, g.index)
        # the lock-space is this test's
        blockdevs[-1]["lock-space"] = LOCK_SPACE
        ctl, control_top = rg.disk_blockdevs("no-extlock", "nfs",
                                             control_image, None,
                                             g.index + 100)
        g.start(qemu, accel, args, kernel, initrd, blockdevs + ctl, top,
                control_top)
    deadline = time.monotonic() + args.boot_timeout
    for g in guests:
        g.wait_serving(deadline)
        log(f"  {g.name} serving after {g.booted_s:.1f} s (extlock disk "
            f"{g.disks['extlock']}, control disk {g.disks['control']})")


def control_disk(g1, g3, c, control_image):
    """The control: the checks of unfencing, write conflicts and bad CDBs
    on the disk without the extlock node must fail (each of them can).
    Returns [(what, failed as it must)]."""
    expected = []
    log("control: the same checks on the disk without the extlock node")
    g1.use("control")
    g3.use("control")
    try:
        before = len(c.failed())
        unfence(g1, c)
        expected.append(("unfence", len(c.failed()) > before))
        rc, out = g1.run(f"sg_persist -n -o -I -S 0x1 -d {dev(g1)}")
        c.check("control: REGISTER gets INVALID COMMAND OPERATION CODE",
                "invalid opcode" in out.lower() or
                "not supported" in out.lower(), out)
        before = len(c.failed())
        check_write_conflicts(g3, c, 2048, "control, unregistered")
        expected.append(("write conflict", len(c.failed()) - before == 2))
        c.check("control: guest3's write is in the control image",
                image_has(control_image, 2048, "guest3-dd"), "")
        before = len(c.failed())
        bad_cdbs(g1, c)
        expected.append(("bad CDB sense", len(c.failed()) - before == 4))
    finally:
        g1.use("extlock")
        g3.use("extlock")
    return expected


def run_extlock(nfs, qemu, accel, args, kernel, initrd, workdir):
    """The whole sequence; returns (checks, control expectations)."""
    mdir = Path(workdir) / "extlock"
    mdir.mkdir(parents=True, exist_ok=True)
    image = nfs.export_dir / "pr.raw"
    control_image = nfs.export_dir / "pr-control.raw"
    for path in (image, control_image):
        with open(path, "wb") as f:
            f.truncate(args.image_size)
    pg = procs.ProcessGroup(mdir)
    c = Checks()
    expected = []
    g1, g2, g3 = guests = [PrGuest(1, mdir, 0x1), PrGuest(2, mdir, 0x2),
                           PrGuest(3, mdir, None)]
    t0 = time.monotonic()
    try:
        daemon = pg.extlockd(lease_ms=args.lease_ms)
        log(f"3 guests ({accel}), image {nfs.url(image.name)}, control "
            f"image {nfs.url(control_image.name)}, lease {args.lease_ms} ms")
        start_guests(guests, nfs, image, control_image, daemon.coordinator(),
                     qemu, accel, args, kernel, initrd)
        t_booted = time.monotonic()

        # the control first (in the same boots)
        controls = Checks()
        expected += control_disk(g1, g3, controls, control_image)

        log("step 1: unfence guest 1 and guest 2 (fence_scsi on)")
        unfence(g1, c)
        unfence(g2, c)
        log("step 2: every guest reads the same keys and reservation")
        consistent_view(guests, c, "after unfencing", [1, 2], 1, WE_RO)

        log("step 3: writes under Write Exclusive - Registrants Only")
        check_write_conflicts(g3, c, 2048, "unregistered")
        rc, out = dd_read(g3, 2048)
        c.check("unregistered: guest3's read succeeds", rc == 0, out)
        check_write_succeeds(g2, c, image, 2056, "registered",
                             "PR-GUEST2-A")
        check_write_succeeds(g1, c, image, 2064, "holder", "PR-GUEST1-A")
        rc, out = g2.run(f"sg_persist -n -o -R -T 5 -K 0x2 -d {dev(g2)}")
        c.check("guest2's RESERVE while guest1 holds it: RESERVATION "
                "CONFLICT", is_conflict(rc, out), out)

        log("step 4: bad CDBs get CHECK CONDITION with the right sense")
        bad_cdbs(g1, c)
        view_before = consistent_view(guests, c, "after the bad CDBs",
                                      [1, 2], 1, WE_RO)

        log("step 5: restart the coordinator")
        daemon.restart()
        wait_for("every extlock node to reconnect",
                 lambda: nodes_connected(guests) and {
                     s.get("client-id") for s in ctl_json(daemon, "sessions")
                 } >= {g.name for g in guests}, args.lease_ms / 1000 + 30)
        check_coordinator_state(daemon, c, "after the restart",
                                {"guest1": 1, "guest2": 2}, "guest1")
        view_after = consistent_view(guests, c, "after the restart", [1, 2],
                                     1, WE_RO)
        c.check("the restart kept the generation", view_after[0] ==
                view_before[0], (view_before, view_after))
        check_write_conflicts(g3, c, 2072, "after the restart, unregistered")
        check_write_succeeds(g2, c, image, 2080, "after the restart",
                             "PR-GUEST2-B")

        log("step 6: guest 1 fences guest 2 (fence_scsi off)")
        fence(g1, g2, c)
        check_write_conflicts(g2, c, 2088, "preempted")
        consistent_view(guests, c, "after the fence", [1], 1, WE_RO)

        log("step 7: kill -9 the holder; the reservation stays until "
            "preempted")
        unfence(g2, c)
        consistent_view(guests, c, "guest2 unfenced again", [1, 2], 1,
                        WE_RO)
        g1.proc.kill()
        g1.proc.wait(10)
        t_kill = time.monotonic()
        survivors = [g2, g3]
        consistent_view(survivors, c, "guest1 killed", [1, 2], 1, WE_RO)
        # wait for the coordinator to drop the dead session (its lease)
        wait_for("guest1's session to expire", lambda: not any(
            s.get("client-id") == "guest1"
            for s in ctl_json(daemon, "sessions")),
            args.lease_ms / 1000 * 3 + 30)
        log(f"  guest1's session gone {time.monotonic() - t_kill:.1f} s "
            f"after the kill")
        consistent_view(survivors, c, "guest1's lease lapsed", [1, 2], 1,
                        WE_RO)
        check_coordinator_state(daemon, c, "guest1's lease lapsed",
                                {"guest1": 1, "guest2": 2}, "guest1")
        check_write_conflicts(g3, c, 2096, "holder dead, unregistered")
        fence(g2, g1, c)
        consistent_view(survivors, c, "guest2 preempted guest1", [2], 2,
                        WE_RO)
        check_write_conflicts(g3, c, 2104, "guest2 holds, unregistered")
        check_write_succeeds(g2, c, image, 2112, "guest2 holds",
                             "PR-GUEST2-C")
        log(f"sequence took {time.monotonic() - t_booted:.1f} s after boot")

        # the control of step 5: a coordinator restarted without its state
        # file has no registrations, and the same checks see that
        log("control: extlockd restarted without its state file")
        daemon.stop()
        daemon.state_file.unlink()
        daemon.start()
        wait_for("the extlock nodes to reconnect",
                 lambda: nodes_connected(survivors) and {
                     s.get("client-id") for s in ctl_json(daemon, "sessions")
                 } >= {"guest2", "guest3"}, args.lease_ms / 1000 + 30)
        before = set(controls.failed())
        what = "control: state file removed"
        check_coordinator_state(daemon, controls, what, {"guest2": 2},
                                "guest2")
        consistent_view(survivors, controls, what, [2], 2, WE_RO)
        new = set(controls.failed()) - before
        expected.append((
            "restart", f"{what}: extlockctl shows the registrations "
            f"{{'guest2': 2}}" in new))
        # the nodes take the state of the coordinator they subscribe to,
        # also when its seq started again below theirs: the guests no
        # longer read (and the nodes no longer enforce) the old keys
        expected.append((
            "restart guest view", f"{what}: keys ['0x2']" in new))
        for g in survivors:
            g.exit()
        c.check("extlockd still running", daemon.alive(),
                daemon.stderr()[-500:])
    except CheckFailed as e:
        c.check("the sequence ran to its end", False, str(e))
    finally:
        for g in guests:
            g.stop()
        pg.stop_all()
    log(f"{len(c.results) - len(c.failed())} of {len(c.results)} checks "
        f"passed in {time.monotonic() - t0:.1f} s")
    return c, expected


def check_coordinator_state(daemon, c, what, registrants, holder):
    """What extlockd itself (extlockctl) says of the reservation."""
    res = ctl_json(daemon, "reservations").get(LOCK_SPACE) or {}
    regs = {r.get("client-id"): int(r.get("key", "0"), 16)
            for r in res.get("registrants", [])}
    c.check(f"{what}: extlockctl shows the registrations {registrants}",
            regs == registrants, res)
    c.check(f"{what}: extlockctl shows {holder} holding type 5",
            res.get("holder") == holder and res.get("pr-type") == 5, res)


def add_guest_options(p):
    """The options of the guests' QEMU (also tests/e2e/run-pr-retry.py)."""
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--cpu", default=None)
    p.add_argument("--smp", type=int, default=1)
    p.add_argument("--memory", type=int, default=192)
    p.add_argument("--boot-timeout", type=float, default=420.0)
    p.add_argument("--kvm-probe-timeout", type=float, default=20.0)
    p.add_argument("--qemu", help="qemu-system-x86_64 to use")
    p.add_argument("--extlockd", help="extlockd to use")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (kept anyway on failure)")


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Guests send SCSI persistent reservations through "
                    "extlock (docs/guest-clusters.rst).")
    p.add_argument("--lease-ms", type=int, default=6000,
                   help="extlockd --lease-ms (default 6000)")
    p.add_argument("--image-size", type=rg.size_arg, default=16 << 20)
    add_guest_options(p)
    args = p.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="xlpr-"))
    nfs = None
    ok = False
    t0 = time.monotonic()
    try:
        qemu = rg.find_qemu(args.qemu)
        rg.find_extlockd(args.extlockd)
        kernel, initrd = rg.build_guest()
        if os.geteuid() != 0:
            raise rg.SetupError("must run as root (the NFS server needs it)")
        accel, why = rg.choose_accel(qemu, args, kernel, initrd, workdir)
        log(f"accelerator: {accel} ({why})")
        nfs = NfsServer(workdir=workdir / "nfs")
        nfs.start()
        c, expected = run_extlock(nfs, qemu, accel, args, kernel, initrd,
                                  workdir)
        ok = bool(c.results) and not c.failed()
        for n in c.failed():
            log(f"FAILED: {n}")
        for what, failed_there in expected:
            log(f"control: the {what} checks "
                + ("fail without the protection, as they must"
                   if failed_there else
                   "did NOT fail without the protection"))
            ok = ok and failed_there
        if len(expected) != 5:
            log(f"control: {len(expected)} of 5 controls ran")
            ok = False
    except (rg.SetupError, NfsServerError, procs.MissingBinary,
            RuntimeError) as e:
        log(f"error: {e}")
        ok = False
        return 2
    finally:
        if nfs is not None:
            nfs.stop()
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"work directory kept: {workdir}")
    log(f"{'PASS' if ok else 'FAIL'} ({time.monotonic() - t0:.0f} s)")
    return 0 if ok else 1


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    # timeout(1) in scripts/run-tests.sh ends a hung run with SIGTERM:
    # unwind like Ctrl-C, so the finally blocks stop the NFS server (its
    # own session: the signal to the process group misses it), extlockd
    # and the guests, and the next step finds 127.0.0.1:2049 free
    signal.signal(signal.SIGTERM, _sigterm)
    sys.exit(main())
