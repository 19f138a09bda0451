"""extlock driven by a real libvirtd (Debian bookworm's libvirt 9.0).

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Domains are defined from XML made by extlock-virt: a normal <disk> with
<shareable/> and an NFS source (the loopback nfs-ganesha export), the
extlock node in <qemu:commandline>, the device moved onto it by
<qemu:override>, <emulator> the patched QEMU.  libvirtd runs with
lock_manager="lockd" (virtlockd) throughout.  The guests are the tiny test
guests of tests/e2e, running the stamped workload with its atomicity
checker (docs/e2e.rst).  Timing bounds come from the coordinator's event
log (CLOCK_MONOTONIC, the clock of time.monotonic_ns()).

Run as root inside scripts/isolate.sh; see docs/libvirt.rst.
"""

import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO
from harness import procs as procs_mod

spec = importlib.util.spec_from_file_location(
    "run_guests", REPO / "tests" / "e2e" / "run-guests.py")
run_guests = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_guests)

VERIFY_IMAGE = REPO / "contrib" / "guest" / "verify-image.py"
FIRMWARE_DIRS = ["/usr/share/seabios", "/usr/share/qemu"]
LEASE_MS = 3000
FENCE_MARGIN_MS = 1000
# scheduling slack on a loaded 2-core machine (coordinator timers, TCG)
SLACK_MS = 2000
IMAGE_SIZE = 64 << 20
EXTENT = 256 * 1024
EXTENTS = 16
DATA_OFFSET = 1 << 20
# TCG boots take 5 s on an idle machine and 60-160 s on the loaded test
# machine (a bound, not a sleep)
BOOT_TIMEOUT = 300


def qemu_binary():
    return procs_mod.binary("qemu-system-x86_64")


T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:7.1f}] {msg}", flush=True)


def wait_for(what, cond, timeout, interval=0.2):
    log(f"waiting for {what}")
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            log(f"done: {what}")
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------
# domains

def base_xml(name, kernel, initrd, append, console, disks,
             on_reboot="destroy"):
    """An ordinary domain: what an operator has before extlock-virt.

    no_timer_check: under TCG on a loaded machine the guest kernel's check
    of the IO-APIC timer can fail and panic the boot ("IO-APIC + timer
    doesn't work!", seen once in ~40 boots here); virtual machines skip it."""
    fw = "".join(f"<qemu:arg value='-L'/><qemu:arg value='{d}'/>"
                 for d in FIRMWARE_DIRS)
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>192</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{append} no_timer_check</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>{on_reboot}</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{qemu_binary()}</emulator>
    {disks}
    <serial type='file'><source path='{console}' append='on'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>{fw}</qemu:commandline>
</domain>
"""


def nfs_disk(nfs, image, dev="vdb"):
    return f"""<disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='nfs' name='{nfs.nfs_path}/{image}'>
        <host name='127.0.0.1'/>
      </source>
      <target dev='{dev}' bus='virtio'/>
      <shareable/>
    </disk>"""


def file_disk(path, dev, shareable):
    return f"""<disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{path}'/>
      <target dev='{dev}' bus='virtio'/>
      {'<shareable/>' if shareable else ''}
    </disk>"""


class Domain:
    def __init__(self, libvirtd, name, workdir):
        self.libvirtd = libvirtd
        self.name = name
        self.console_path = Path(workdir) / f"console-{name}.log"

    def virsh(self, *args, **kw):
        return self.libvirtd.virsh(*args, **kw)

    def console(self):
        try:
            return self.console_path.read_text(errors="replace").replace("\r", "")
        except OSError:
            return ""

    def state(self):
        return self.libvirtd.state(self.name)

    def qmp(self, command, **arguments):
        cmd = {"execute": command}
        if arguments:
            cmd["arguments"] = arguments
        res = self.virsh("qemu-monitor-command", self.name, json.dumps(cmd))
        return json.loads(res.stdout)["return"]

    def locks(self):
        (node,) = self.qmp("query-extent-locks")
        return node

    def wait_booted(self, count=1, timeout=BOOT_TIMEOUT):
        wait_for(f"{self.name} to boot",
                 lambda: self.console().count("EXTLOCK-GUEST-BOOTED") >= count or
                 self._dead(), timeout)
        assert self.console().count("EXTLOCK-GUEST-BOOTED") >= count, \
            f"{self.name} stopped before booting:\n{self.console()[-2000:]}"

    def _dead(self):
        return self.state() != "running" and self.state() != "paused"

    def wait_shut_off(self, timeout):
        wait_for(f"{self.name} to power off", lambda: self.state() == "shut off",
                 timeout, interval=0.5)


def define(libvirtd, extlock_virt, workdir, name, xml, *convert_args):
    """Write the base XML, convert it with extlock-virt, define the result."""
    base = Path(workdir) / f"{name}.base.xml"
    out = Path(workdir) / f"{name}.xml"
    base.write_text(xml)
    if convert_args:
        # the node names depend on libvirt's version (docs/libvirt.rst)
        res = subprocess.run([extlock_virt, *convert_args, "--libvirt-version",
                              libvirtd.version(), "--output", str(out),
                              str(base)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    else:
        out.write_text(xml)
    libvirtd.virsh("define", str(out))
    return Domain(libvirtd, name, workdir)


def workload_append(run_id, guest, guests, seconds):
    return (f"{run_guests.BASE_APPEND} xl.guests={guests} xl.run-id={run_id} "
            f"xl.writers=2 xl.readers=2 xl.seconds={seconds} "
            f"xl.extent-size={EXTENT} xl.extents={EXTENTS} "
            f"xl.data-offset={DATA_OFFSET} xl.barrier-timeout={BOOT_TIMEOUT} "
            f"xl.guest={guest} xl.seed={random.getrandbits(31)}")


def new_image(nfs, name):
    path = Path(nfs.export_dir) / name
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


def convert_args(daemon, lock_space, client_id, *extra):
    return ["--disk", "vdb", "--lock-space", lock_space,
            "--coordinator", daemon.address, "--client-id", client_id,
            "--lease-time", str(LEASE_MS), *extra]


def start_shared_pair(lv, extlock_virt, daemon, nfs, workdir, guest,
                      image_name, tag, names, seconds, extra_append="",
                      wait_workload=True, **xml_kw):
    """Define and start two domains NAMES that share a new raw image on the
    NFS server through extlock, each running the stamped workload for
    SECONDS; wait until both have booted and (with WAIT_WORKLOAD) both
    workloads passed their start barrier.  Returns (domains, lock space,
    image path, run id)."""
    kernel, initrd = guest
    image = new_image(nfs, image_name)
    run_id = random.getrandbits(62) | 1
    lock_space = f"{tag}-{run_id:x}"
    doms = []
    for g, name in enumerate(names, 1):
        xml = base_xml(name, kernel, initrd,
                       workload_append(run_id, g, len(names), seconds)
                       + extra_append,
                       Path(workdir) / f"console-{name}.log",
                       nfs_disk(nfs, image.name), **xml_kw)
        doms.append(define(lv, extlock_virt, workdir, name, xml,
                           *convert_args(daemon, lock_space, f"{name}/vdb")))
    for dom in doms:
        dom.virsh("start", dom.name)
    for dom in doms:
        dom.wait_booted()
    if wait_workload:
        for dom in doms:
            wait_for(f"{dom.name}'s workload to start",
                     lambda: "EXTLOCK-STRESS-START" in dom.console(),
                     BOOT_TIMEOUT)
    return doms, lock_space, image, run_id


@pytest.fixture
def extlockd(procs, workdir):
    daemon = procs.extlockd(extra_args=[
        "--event-log", str(workdir / "events.jsonl"),
        "--fence-margin-ms", str(FENCE_MARGIN_MS)])
    daemon.events_path = workdir / "events.jsonl"
    yield daemon
    if not daemon.killed:
        assert daemon.alive(), f"extlockd died:\n{daemon.stderr()}"
        assert "invariant broken" not in daemon.stderr()


@pytest.fixture
def clean_domains(libvirtd):
    yield
    libvirtd.cleanup_domains()


def events(daemon):
    out = []
    try:
        text = daemon.events_path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def overlaps(a, b):
    return a["offset"] < b["offset"] + b["length"] and \
        b["offset"] < a["offset"] + a["length"]


# ---------------------------------------------------------------------------
# the recipe works at all: libvirt numbers its nodes as extlock-virt thinks

def test_node_names_match_libvirt(libvirtd, extlock_virt, workdir, guest,
                                  clean_domains):
    """extlock-virt computes libvirt's node name of the shared disk from
    the XML; libvirt's own command line (domxml-to-native, what it runs at
    start) must agree for every disk layout extlock-virt accepts."""
    kernel, initrd = guest
    files = {d: workdir / f"{d}.raw" for d in ("vda", "vdb", "vdc", "sda", "hdc")}
    for f in files.values():
        f.write_bytes(b"")
    layouts = {
        "only": [file_disk(files["vdb"], "vdb", True)],
        "before vdc": [file_disk(files["vda"], "vda", False),
                       file_disk(files["vdb"], "vdb", True),
                       file_disk(files["vdc"], "vdc", False)],
        "unsorted": [file_disk(files["vdc"], "vdc", False),
                     file_disk(files["vdb"], "vdb", True),
                     file_disk(files["vda"], "vda", False)],
        "scsi and cdrom": [
            file_disk(files["sda"], "sda", False).replace("bus='virtio'", "bus='scsi'"),
            file_disk(files["vdb"], "vdb", True),
            "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
            "<target dev='hdc' bus='ide'/><readonly/></disk>"],
    }
    for i, (label, disks) in enumerate(layouts.items()):
        name = f"nn{i}"
        xml = base_xml(name, kernel, initrd, "quiet", workdir / "c.log",
                       "\n".join(disks))
        define(libvirtd, extlock_virt, workdir, name, xml,
               "--disk", "vdb", "--lock-space", "x", "--coordinator",
               "unix:/nonexistent")
        argv = libvirtd.virsh("domxml-to-native", "qemu-argv", "--domain",
                              name).stdout
        ours = re.search(r'"driver":"extlock","node-name":"xl-vdb","file":"([^"]+)"',
                         argv.replace("\\", ""))
        theirs = re.search(r'"filename":"' + re.escape(str(files["vdb"])) +
                           r'","node-name":"(libvirt-\d+)-storage"', argv)
        assert ours and theirs, argv
        # libvirt 9.0 puts a raw format node on the storage node, 11.3 not
        # (extlock-virt --libvirt-version): the node must exist either way
        top = theirs.group(1) + "-format"
        if f'"node-name":"{top}"' not in argv.replace("\\", ""):
            top = theirs.group(1) + "-storage"
        assert ours.group(1) == top, (label, argv)
        assert '"drive":"xl-vdb"' in argv, (label, argv)
        libvirtd.virsh("undefine", name)


# ---------------------------------------------------------------------------
# two domains, one disk: the workload, status, events, managedsave

def test_two_domains_share_one_disk(libvirtd, extlock_virt, extlockd, nfs,
                                    workdir, guest, clean_domains):
    # long enough that the status, event and managedsave steps all happen
    # while the workload runs, also on an idle machine (5 s boots)
    seconds = 60
    doms, lock_space, image, run_id = start_shared_pair(
        libvirtd, extlock_virt, extlockd, nfs, workdir, guest,
        "libvirt-shared.raw", "libvirt", ("xla", "xlb"), seconds,
        wait_workload=False)
    a, b = doms

    # the device is on the extlock node, the extlock node on libvirt's disk
    for d in doms:
        blocks = d.qmp("query-block")
        (dev,) = [x for x in blocks if "ua-extlock-vdb" in (x.get("qdev") or "")]
        assert dev["inserted"]["node-name"] == "xl-vdb"
        assert dev["inserted"]["drv"] == "extlock"
        nodes = {n["node-name"]: n for n in
                 d.qmp("query-named-block-nodes", flat=True)}
        # libvirt 9.0: a raw format node on the storage node; from 9.10
        # on the device is attached to the storage node itself
        if "libvirt-1-format" in nodes:
            assert nodes["libvirt-1-format"]["drv"] == "raw"
        else:
            assert not d.libvirtd.version().startswith("9.0"), nodes.keys()
        assert nodes["libvirt-1-storage"]["drv"] == "nfs"
        assert image.name in nodes["libvirt-1-storage"]["file"]

    # status through libvirt: QMP and HMP
    node = wait_for("lock activity in xla",
                    lambda: (lambda n: n if n["counters"]["requests"] else None)(
                        a.locks()), 60)
    assert node["node-name"] == "xl-vdb"
    assert node["lock-space"] == lock_space
    assert node["client-id"] == "xla/vdb"
    pretty = a.virsh("qemu-monitor-command", "xla", "--pretty",
                     '{"execute":"query-extent-locks"}').stdout
    assert '"node-name": "xl-vdb"' in pretty
    hmp = a.virsh("qemu-monitor-command", "xla", "--hmp", "info extent-locks").stdout
    assert "xl-vdb" in hmp and lock_space in hmp, hmp

    # events through libvirt: a listener, proven live with a STOP event
    # (virsh suspend), then the coordinator goes away and comes back
    listener = libvirtd.virsh_popen(
        "qemu-monitor-event", "xla", "--loop", "--timeout", "120",
        "--regex", "^(STOP|EXTENT_LOCK_.*)$")
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(listener.stdout),
                              daemon=True)
    reader.start()
    try:
        def read_events():
            return list(seen)

        def saw(name):
            return any(line.startswith(f"event {name} ") for line in read_events())

        def suspend_resume():
            a.virsh("suspend", "xla")
            a.virsh("resume", "xla")
            return saw("STOP")
        wait_for("virsh qemu-monitor-event to report STOP", suspend_resume, 30,
                 interval=1.0)
        extlockd.stop()
        wait_for("EXTENT_LOCK_COORDINATOR_LOST through virsh",
                 lambda: saw("EXTENT_LOCK_COORDINATOR_LOST"), 30)
        extlockd.start()
        wait_for("EXTENT_LOCK_COORDINATOR_RESTORED through virsh",
                 lambda: saw("EXTENT_LOCK_COORDINATOR_RESTORED"), 60)
    finally:
        listener.kill()
        listener.wait()
    lost = [line for line in seen if "EXTENT_LOCK_COORDINATOR_LOST" in line]
    assert '"node-name":"xl-vdb"' in lost[0].replace(" ", ""), lost

    # managedsave of one domain while the other works on, then restore
    assert "EXTLOCK-STRESS-RESULT" not in b.console(), \
        "xlb's workload ended before the managedsave: make it longer"
    b.virsh("managedsave", "xlb")
    assert b.state() == "shut off"
    assert "Managed save:   yes" in b.virsh("dominfo", "xlb").stdout
    assert "xlb/vdb" not in [s["client-id"] for s in
                              json.loads(extlockd.ctl("--json").stdout)
                              .get("sessions", []) if s.get("state") == "active"]
    b.virsh("start", "xlb")
    assert b.state() == "running"
    assert "Managed save:   no" in b.virsh("dominfo", "xlb").stdout
    wait_for("xlb's extlock node to work again after the restore",
             lambda: b.locks()["state"] == "active", 30)

    for d in doms:
        d.wait_shut_off(timeout=seconds + 240)

    # what the guests saw, and what the image holds
    max_seq = {}
    totals = {"writes": 0, "reads": 0, "foreign_reads": 0}
    for g, d in enumerate(doms, 1):
        c = run_guests.parse_console(d.console())
        assert c["result"], f"{d.name}: no result:\n{d.console()[-3000:]}"
        assert not c["errors"], c["errors"]
        assert not c["io_error_lines"], c["io_error_lines"]
        assert c["exit_rc"] == 0
        r = c["result"]
        for key in ("torn_reads", "corrupt_reads", "final_mixed", "final_corrupt",
                    "write_errors", "read_errors"):
            assert r.get(key, 0) == 0, (d.name, key, r)
        assert r["writes"] > 0 and r["reads"] > 0, r
        for key in totals:
            totals[key] += r.get(key, 0)
        max_seq[g] = r["max_seq"]
    assert totals["foreign_reads"] > 0, "the disk was not really shared"
    res = subprocess.run(
        [sys.executable, str(VERIFY_IMAGE), str(image), f"--run-id={run_id}",
         "--guests=2", f"--extent-size={EXTENT}", f"--extents={EXTENTS}",
         f"--data-offset={DATA_OFFSET}", "--json"] +
        [f"--max-seq={g}={s}" for g, s in max_seq.items()],
        capture_output=True, text=True)
    verdict = json.loads(res.stdout)
    assert res.returncode == 0, verdict
    assert verdict["mixed"] == 0 and verdict["corrupt"] == 0
    assert verdict["stray_sectors"] == 0
    print(f"\nCHECKER libvirt writes={totals['writes']} reads={totals['reads']} "
          f"foreign={totals['foreign_reads']} torn_reads=0 mixed_extents=0 "
          f"complete={verdict['complete']}")


# ---------------------------------------------------------------------------
# destroy, crash (kill -9) and restart: the other domain gets the extents

def held_by(daemon, client_id, since_ns, until_ns=None):
    """Locks of client_id granted and not released, from the event log
    (as they were just before until_ns, if given).

    A "downgrade" makes a lock shared; a "release" of a part (a lock given
    back in part logs the part) leaves the rest held, so each lock is a
    list of pieces."""
    held = {}
    for ev in events(daemon):
        if ev.get("client-id") != client_id:
            continue
        if until_ns is not None and ev["ts"] >= until_ns:
            break
        key = (ev.get("session"), ev.get("lock"))
        if ev["event"] in ("grant", "reclaim"):
            held[key] = [dict(ev)]
        elif ev["event"] == "downgrade" and key in held:
            held[key] = [dict(p, mode="shared") for p in held[key]]
        elif ev["event"] == "release" and key in held:
            start, end = ev["offset"], ev["offset"] + ev["length"]
            rest = []
            for p in held[key]:
                p_end = p["offset"] + p["length"]
                if p["offset"] < start:
                    rest.append(dict(p, length=min(p_end, start) - p["offset"]))
                if p_end > end:
                    lo = max(p["offset"], end)
                    rest.append(dict(p, offset=lo, length=p_end - lo))
            if rest:
                held[key] = rest
            else:
                del held[key]
    return [p for pieces in held.values() for p in pieces]


def test_destroy_crash_restart(libvirtd, extlock_virt, extlockd, nfs, workdir,
                               guest, clean_domains):
    # both workloads past their start barrier (which waits for the other)
    doms, lock_space, image, run_id = start_shared_pair(
        libvirtd, extlock_virt, extlockd, nfs, workdir, guest,
        "libvirt-crash.raw", "libvirt-crash", ("xlc", "xld"), 600)
    c, d = doms

    def requests(dom):
        counters = dom.locks()["counters"]
        return counters["requests"] + counters["cache-hits"]

    def c_holds():
        return held_by(extlockd, "xlc/vdb", 0)

    # 1. virsh destroy: QEMU gets SIGTERM, the node says bye, the locks
    # go at once - at the latest at lease + fence margin
    wait_for("xlc to hold locks", c_holds, 60)
    t0 = time.monotonic_ns()
    c.virsh("destroy", "xlc")
    wait_for("xlc's locks to be released", lambda: not c_holds(),
             (LEASE_MS + FENCE_MARGIN_MS + SLACK_MS) / 1000)
    rel = [ev["ts"] for ev in events(extlockd) if ev["event"] == "release"
           and ev.get("client-id") == "xlc/vdb" and ev["ts"] >= t0]
    assert rel and max(rel) - t0 <= (LEASE_MS + FENCE_MARGIN_MS) * 1_000_000
    before = requests(d)
    wait_for("xld to go on", lambda: requests(d) > before + 10, 60)

    # 2. start it again: a new session, the workload goes on
    c.virsh("start", "xlc")
    c.wait_booted(count=2)
    # ...on data extents, not only the control area (the start barrier at
    # offset 0): xld touches the control area again only at its final
    # barrier, so locks held there alone would never be asked for below
    wait_for("xlc to hold data extents again",
             lambda: [h for h in c_holds()
                      if h["offset"] + h["length"] > DATA_OFFSET], 90)

    # 3. a host crash: kill -9 of QEMU.  Its locks stay until its lease
    # has lapsed plus the fence margin, and not a moment less; then xld
    # gets what it was waiting for.
    pid = libvirtd.qemu_pid("xlc")
    held = c_holds()
    t_kill = time.monotonic_ns()
    os.kill(pid, signal.SIGKILL)
    wait_for("libvirt to see xlc die", lambda: c.state() == "shut off", 30)
    bound_ns = (LEASE_MS + FENCE_MARGIN_MS + SLACK_MS) * 1_000_000
    wait_for("xlc's session to expire and its locks to go", lambda: not c_holds(),
             bound_ns / 1e9 + 5)
    evs = events(extlockd)
    expire = [ev["ts"] for ev in evs if ev["event"] == "expire"
              and ev.get("client-id") == "xlc/vdb" and ev["ts"] >= t_kill]
    releases = [ev for ev in evs if ev["event"] == "release"
                and ev.get("client-id") == "xlc/vdb" and ev["ts"] >= t_kill]
    assert expire, "xlc's session did not expire (was it ended by bye?)"
    t_rel = max(ev["ts"] for ev in releases)
    # the lease ran from the last renewal before the kill
    assert expire[0] - t_kill <= (LEASE_MS + SLACK_MS) * 1_000_000
    assert t_rel - expire[0] >= (FENCE_MARGIN_MS - 50) * 1_000_000
    assert t_rel - t_kill <= bound_ns
    # nobody got a conflicting extent of xlc before its release: xlc's
    # locks as the coordinator's log has them at each grant (not the
    # snapshot taken before the kill: a lock may be downgraded or given
    # back between the two, as CI saw once)
    for ev in evs:
        if ev["event"] in ("grant",) and ev.get("client-id") == "xld/vdb" and \
                t_kill <= ev["ts"] < min(r["ts"] for r in releases):
            for h in held_by(extlockd, "xlc/vdb", 0, until_ns=ev["ts"]):
                if overlaps(ev, h):
                    assert ev["mode"] == "shared" and h["mode"] == "shared", \
                        (ev, h)
    # ...and xld did get extents xlc had held, once they were free
    def d_got_them():
        return [ev for ev in events(extlockd) if ev["event"] == "grant" and
                ev.get("client-id") == "xld/vdb" and ev["ts"] >= t_rel and
                any(overlaps(ev, h) for h in held)]
    got = wait_for("xld to be granted extents xlc held", d_got_them, 60)
    print(f"\nkill -9 -> expire {(expire[0] - t_kill) / 1e6:.0f} ms, "
          f"release {(t_rel - t_kill) / 1e6:.0f} ms, xld granted "
          f"{(got[0]['ts'] - t_kill) / 1e6:.0f} ms after the kill "
          f"(lease {LEASE_MS} ms + fence margin {FENCE_MARGIN_MS} ms)")

    # 4. restart after the crash
    c.virsh("start", "xlc")
    c.wait_booted(count=3)
    wait_for("xlc's node to be active after the restart",
             lambda: c.locks()["state"] == "active", 30)


# ---------------------------------------------------------------------------
# virsh reboot and virsh shutdown (ACPI in the guest)

def test_reboot_shutdown(libvirtd, extlock_virt, extlockd, nfs, workdir,
                               guest, clean_domains):
    """`virsh shutdown` and `virsh reboot` (mode acpi, the default for QEMU
    without a guest agent) press the ACPI power button; the guest acts on
    it only if something in it listens: here busybox acpid (xl.acpi=1 in
    contrib/guest/init), which powers the guest off.

    reboot:   libvirt's "fake reboot": the guest powers off, QEMU stays
              (same process, same extlock session), libvirt resets and
              resumes it.  The other domain goes on meanwhile: the locks
              of the rebooting domain are revoked on demand as always.
    (virsh reset, a hard reset without the guest, keeps the process and
    the session the same way; not run here, to save a TCG boot.)
    shutdown: the guest powers off, QEMU exits cleanly: its extlock node
              says bye, its locks are released at once (no session expiry)
              and the other domain is granted them."""
    doms, lock_space, image, run_id = start_shared_pair(
        libvirtd, extlock_virt, extlockd, nfs, workdir, guest,
        "libvirt-reboot.raw", "libvirt-reboot", ("xlg", "xlh"), 600,
        extra_append=" xl.acpi=1", on_reboot="restart")
    g_dom, h_dom = doms

    def g_holds():
        return held_by(extlockd, "xlg/vdb", 0)

    def g_sessions(since_ns):
        return {ev.get("session") for ev in events(extlockd)
                if ev.get("client-id") == "xlg/vdb" and ev["ts"] >= since_ns}

    def g_expired(since_ns):
        return [ev for ev in events(extlockd) if ev["event"] == "expire" and
                ev.get("client-id") == "xlg/vdb" and ev["ts"] >= since_ns]

    def h_granted_what_g_held(held, since_ns):
        return [ev for ev in events(extlockd) if ev["event"] == "grant" and
                ev.get("client-id") == "xlh/vdb" and ev["ts"] >= since_ns and
                any(overlaps(ev, h) for h in held)]

    def power_buttons():
        return g_dom.console().count("EXTLOCK-GUEST-POWER-BUTTON")

    t_start = 0
    pid = libvirtd.qemu_pid("xlg")
    session = g_sessions(t_start) - {None}
    assert len(session) == 1, session

    # 1. virsh reboot: the guest goes down and up again in the same QEMU
    held = wait_for("xlg to hold locks", g_holds, 60)
    t0 = time.monotonic_ns()
    g_dom.virsh("reboot", "--mode", "acpi", "xlg")
    wait_for("xlg's guest to act on the power button",
             lambda: power_buttons() >= 1, 60)
    g_dom.wait_booted(count=2)
    assert libvirtd.qemu_pid("xlg") == pid, "reboot started a new QEMU"
    assert g_dom.state() == "running"
    assert g_dom.locks()["state"] == "active"
    wait_for("xlh to be granted extents xlg held before its reboot",
             lambda: h_granted_what_g_held(held, t0), 90)
    wait_for("xlg's workload to run again after the reboot",
             lambda: g_dom.console().count("EXTLOCK-STRESS-START") >= 2,
             BOOT_TIMEOUT)
    wait_for("xlg to take locks again", lambda: g_sessions(t0) - {None}, 60)
    assert g_sessions(t_start) - {None} == session, \
        "the reboot changed xlg's extlock session"
    assert not g_expired(t_start)

    # 2. virsh shutdown: QEMU exits, the locks go at once (bye, no expiry)
    held = wait_for("xlg to hold locks", g_holds, 60)
    buttons = power_buttons()
    t2 = time.monotonic_ns()
    g_dom.virsh("shutdown", "--mode", "acpi", "xlg")
    wait_for("xlg's guest to act on the power button",
             lambda: power_buttons() > buttons, 60)
    g_dom.wait_shut_off(60)
    t_off = time.monotonic_ns()
    wait_for("xlg's locks to be released", lambda: not g_holds(),
             (LEASE_MS + FENCE_MARGIN_MS + SLACK_MS) / 1000)
    rel = [ev["ts"] for ev in events(extlockd) if ev["event"] == "release"
           and ev.get("client-id") == "xlg/vdb" and ev["ts"] >= t2]
    assert rel, "xlg's locks went without a release"
    assert not g_expired(t2), "xlg's session expired instead of saying bye"
    # released by the bye when QEMU closed the node, before any lease ran out
    assert max(rel) - t_off <= (LEASE_MS * 1_000_000) // 2, \
        f"release {(max(rel) - t_off) / 1e6:.0f} ms after libvirt saw xlg off"
    got = wait_for("xlh to be granted extents xlg held",
                   lambda: h_granted_what_g_held(held, max(rel)), 60)
    assert h_dom.state() == "running"
    print(f"\nshutdown: xlg's locks released {(max(rel) - t2) / 1e6:.0f} ms "
          f"after virsh shutdown, xlh granted them "
          f"{(got[0]['ts'] - max(rel)) / 1e6:.0f} ms later")


# ---------------------------------------------------------------------------
# virtlockd: the shareable disk is not blocked, other disks stay protected

def test_virtlockd_coexistence(libvirtd, extlock_virt, extlockd, workdir,
                               guest, clean_domains):
    """With lock_manager="lockd", two domains share the <shareable/>
    extlock disk (here a file, which virtlockd does lock - shared), while a
    second domain with the same non-shareable disk is refused."""
    kernel, initrd = guest
    shared = workdir / "shared.raw"
    private = workdir / "private.raw"
    for f in (shared, private):
        with open(f, "wb") as fh:
            fh.truncate(16 << 20)
    doms = []
    for name in ("xle", "xlf"):
        disks = file_disk(private, "vda", False) + file_disk(shared, "vdb", True)
        xml = base_xml(name, kernel, initrd, "quiet", workdir / f"{name}.log", disks)
        doms.append(define(libvirtd, extlock_virt, workdir, name, xml,
                           *convert_args(extlockd, "lockd-test", f"{name}/vdb")))
    e, f = doms
    e.virsh("start", "--paused", "xle")
    res = f.virsh("start", "--paused", "xlf", check=False)
    assert res.returncode != 0
    assert "resource busy" in res.stderr.lower() or "lock" in res.stderr.lower(), \
        res.stderr
    assert str(private) in res.stderr or "Failed to acquire lock" in res.stderr, \
        res.stderr
    assert f.state() == "shut off"
    # without the private disk, the second domain starts beside the first:
    # the shareable extlock disk is not blocked
    f.virsh("undefine", "xlf")
    xml = base_xml("xlf", kernel, initrd, "quiet", workdir / "xlf.log",
                   file_disk(shared, "vdb", True))
    f = define(libvirtd, extlock_virt, workdir, "xlf", xml,
               *convert_args(extlockd, "lockd-test", "xlf/vdb"))
    f.virsh("start", "--paused", "xlf")
    assert e.state() == "paused" and f.state() == "paused"
    for dom in (e, f):
        assert dom.locks()["state"] == "active"


# ---------------------------------------------------------------------------
# sanlock: the same, with libvirt's other lock manager

@pytest.fixture
def sanlock_libvirtd():
    """A second private libvirtd with lock_manager="sanlock" (and the
    sanlock daemon, without watchdog): its own prefix, see
    libvirt_harness.sanlock_prefix()."""
    import shutil
    import tempfile
    from libvirt_harness import Libvirtd, LibvirtError, sanlock_prefix
    try:
        prefix = sanlock_prefix()
    except LibvirtError as e:
        pytest.fail(f"no sanlock plugin: {e}", pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="xlv-sanlock-", dir="/tmp"))
    daemon = Libvirtd(root, lock_manager="sanlock", prefix=prefix)
    try:
        daemon.start()
    except LibvirtError as e:
        daemon.stop()
        pytest.fail(f"cannot start libvirtd with sanlock: {e}", pytrace=False)
    log(f"libvirtd {daemon.version()} with sanlock from {prefix}")
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def sanlock_resources(lv):
    """The resource leases the sanlock daemon holds: (name, shared, pid)."""
    res = subprocess.run([lv.prefix + "/usr/sbin/sanlock", "client", "status"],
                         capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, LD_LIBRARY_PATH=lv.prefix +
                                  "/usr/lib/x86_64-linux-gnu"))
    log(f"sanlock client status:\n{res.stdout}")
    out = []
    for line in res.stdout.splitlines():
        # r LOCKSPACE:NAME:PATH:OFFSET[:lver][:SH] p PID
        words = line.split()
        if words and words[0] == "r":
            out.append((words[1].split(":")[1], words[1].endswith(":SH"),
                        int(words[-1]) if words[-2] == "p" else None))
    return out


def test_sanlock_coexistence(sanlock_libvirtd, extlock_virt, extlockd,
                             workdir, guest):
    """With lock_manager="sanlock" (auto_disk_leases: one lease per disk
    path in disk_lease_dir), a domain holds an exclusive lease on its
    non-shareable disk and a shared lease on the <shareable/> extlock disk;
    a second domain with the same shareable disk gets a second shared lease
    and runs; one with the same non-shareable disk is refused.  libvirt
    takes the leases when the domain runs (a paused start only registers
    the process), so the domains are resumed; their guests get no workload
    and stay in a shell (xl.shell=1) instead of powering off."""
    lv = sanlock_libvirtd
    kernel, initrd = guest
    shared = workdir / "shared.raw"
    private = workdir / "private.raw"
    for f in (shared, private):
        with open(f, "wb") as fh:
            fh.truncate(16 << 20)

    def domain(name, disks):
        xml = base_xml(name, kernel, initrd, "quiet xl.shell=1",
                       workdir / f"{name}.log", disks)
        return define(lv, extlock_virt, workdir, name, xml,
                      *convert_args(extlockd, "sanlock-test", f"{name}/vdb"))

    both = file_disk(private, "vda", False) + file_disk(shared, "vdb", True)
    s = domain("xls", both)
    s.virsh("start", "--paused", "xls")
    s.virsh("resume", "xls")
    s_pid = lv.qemu_pid("xls")
    leases = wait_for("xls's two sanlock leases",
                      lambda: len(sanlock_resources(lv)) == 2 and
                      sanlock_resources(lv), 30)
    assert sorted(sh for _, sh, _ in leases) == [False, True], leases
    assert {pid for _, _, pid in leases} == {s_pid}, leases
    shared_lease = [name for name, sh, _ in leases if sh][0]
    private_lease = [name for name, sh, _ in leases if not sh][0]
    # sanlock itself refuses another holder of the exclusive lease (what
    # stops a domain on another host), and grants one of the shared lease
    for name, expect_ok in ((private_lease, False), (shared_lease, True)):
        spec = (f"__LIBVIRT__DISKS__:{name}:/var/lib/libvirt/sanlock/{name}:0"
                + (":SH" if expect_ok else ""))
        res = subprocess.run(
            [lv.prefix + "/usr/sbin/sanlock", "client", "command", "-r", spec,
             "-c", "/bin/true"], capture_output=True, text=True, timeout=60,
            env=dict(os.environ, LD_LIBRARY_PATH=lv.prefix +
                     "/usr/lib/x86_64-linux-gnu"))
        log(f"sanlock client command -r {spec}: rc {res.returncode} "
            f"{res.stdout.strip()} {res.stderr.strip()}")
        assert (res.returncode == 0) == expect_ok, res

    t = domain("xlt", both)
    res = t.virsh("start", "--paused", "xlt", check=False)
    if res.returncode == 0:
        res = t.virsh("resume", "xlt", check=False)
    log(f"second domain with the private disk: rc {res.returncode} "
        f"{res.stderr.strip()}")
    assert res.returncode != 0
    # on one host QEMU's own image locking refuses the second writer
    # before sanlock is asked; across hosts, sanlock's exclusive lease does
    assert "lock" in res.stderr.lower() or "lease" in res.stderr.lower(), \
        res.stderr
    assert str(private) in res.stderr or "sanlock" in res.stderr.lower(), \
        res.stderr
    assert t.state() != "running"
    t.virsh("destroy", "xlt", check=False)
    t.virsh("undefine", "xlt")

    # the shareable extlock disk alone: a second shared lease, not blocked
    t = domain("xlt", file_disk(shared, "vdb", True))
    t.virsh("start", "--paused", "xlt")
    t.virsh("resume", "xlt")
    t_pid = lv.qemu_pid("xlt")
    leases = wait_for("xlt's shared sanlock lease",
                      lambda: len(sanlock_resources(lv)) == 3 and
                      sanlock_resources(lv), 30)
    on_shared = [(sh, pid) for name, sh, pid in leases if name == shared_lease]
    assert sorted(on_shared) == sorted([(True, s_pid), (True, t_pid)]), leases
    assert s.state() == "running" and t.state() == "running"
    for dom in (s, t):
        assert dom.locks()["state"] == "active"
    for dom in (s, t):
        dom.virsh("destroy", dom.name)
        dom.virsh("undefine", dom.name)


# ---------------------------------------------------------------------------
# live migration to a second libvirtd, while the other domain works on

def test_live_migration(libvirtd, extlock_virt, extlockd, nfs, workdir, guest,
                        clean_domains):
    """Two libvirtds on this machine (different host UUIDs) stand for two
    hosts.  xlb migrates live from the first to the second in the middle
    of the workload that it shares with xla: the source inactivates its
    image, the destination's extlock node opens its own session and takes
    the locks when its guest asks; the checker must still see nothing
    torn."""
    import shutil
    import tempfile
    import uuid
    from libvirt_harness import Libvirtd, LibvirtError

    seconds = 20
    root2 = Path(tempfile.mkdtemp(prefix="xlv-libvirt2-", dir="/tmp"))
    dest = Libvirtd(root2, host_uuid=str(uuid.uuid4()))
    dest.start()
    try:
        doms, lock_space, image, run_id = start_shared_pair(
            libvirtd, extlock_virt, extlockd, nfs, workdir, guest,
            "libvirt-migrate.raw", "libvirt-mig", ("xla", "xlb"), seconds)
        a, b = doms
        t_mig = time.monotonic_ns()
        res = libvirtd.virsh("migrate", "--live", "--verbose", "xlb", dest.uri,
                             "--migrateuri", "tcp://127.0.0.1", check=False,
                             timeout=300)
        log(f"virsh migrate: rc {res.returncode} {res.stdout.strip()[-200:]} "
            f"{res.stderr.strip()}")
        assert res.returncode == 0, res.stderr
        # the source keeps the (persistent) definition, shut off
        assert libvirtd.state("xlb") == "shut off"
        assert dest.state("xlb") == "running"
        b2 = Domain(dest, "xlb", workdir)
        wait_for("xlb's extlock node on the destination to be active",
                 lambda: b2.locks()["state"] == "active", 30)
        # the source's session ended (bye) after the destination's began
        evs = [ev for ev in events(extlockd) if ev.get("client-id") == "xlb/vdb"
               and ev["ts"] >= t_mig]
        log(f"xlb events after the migration started: "
            f"{sorted(set(ev['event'] for ev in evs))}")
        wait_for("xla to power off", lambda: a.state() == "shut off",
                 seconds + 300, interval=0.5)
        def xlb_off_on_dest():
            # A migrated domain is transient on the destination: when it
            # powers off it is gone, also between domains() and state()
            try:
                return "xlb" not in dest.domains() or \
                    dest.state("xlb") == "shut off"
            except LibvirtError as e:
                # 9.0: "failed to get domain", 11.3: "Domain not found"
                if "failed to get domain" in str(e) or \
                        "domain not found" in str(e).lower():
                    return True
                raise

        wait_for("xlb to power off on the destination", xlb_off_on_dest,
                 seconds + 300, interval=0.5)
    finally:
        dest.stop()
        shutil.rmtree(root2, ignore_errors=True)

    max_seq = {}
    for g, d in enumerate(doms, 1):
        c = run_guests.parse_console(d.console())
        assert c["result"], f"{d.name}: no result:\n{d.console()[-3000:]}"
        assert not c["errors"], c["errors"]
        assert not c["io_error_lines"], c["io_error_lines"]
        r = c["result"]
        for key in ("torn_reads", "corrupt_reads", "final_mixed", "final_corrupt",
                    "write_errors", "read_errors"):
            assert r.get(key, 0) == 0, (d.name, key, r)
        max_seq[g] = r["max_seq"]
    res = subprocess.run(
        [sys.executable, str(VERIFY_IMAGE), str(image), f"--run-id={run_id}",
         "--guests=2", f"--extent-size={EXTENT}", f"--extents={EXTENTS}",
         f"--data-offset={DATA_OFFSET}", "--json"] +
        [f"--max-seq={g}={s}" for g, s in max_seq.items()],
        capture_output=True, text=True)
    verdict = json.loads(res.stdout)
    assert res.returncode == 0, verdict
    print(f"\nCHECKER libvirt-migration torn_reads=0 mixed_extents="
          f"{verdict['mixed']} complete={verdict['complete']}")
