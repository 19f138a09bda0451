"""extlockctl freeze with real QEMU writers: a backup taken with
``qemu-img convert`` during the freeze is a consistent cut.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Two qemu-storage-daemons open the same raw image (on the loopback NFS
export, and as a local file) through extlock nodes
(lock cache on: the freeze's request makes the coordinator revoke their
cached exclusive locks) and export it over NBD; two writer threads stamp
4 KiB blocks through them, each write recorded with the CLOCK_MONOTONIC
times it was sent and answered.  ``extlockctl freeze`` runs a COMMAND that
notes the time, waits 0.5 s (writes keep coming, from both sides) and
copies the image with ``qemu-img convert``.  In the copy every block must
be one whole write, no write sent after the COMMAND started may be there,
and no block may hold a write that was answered before another write of
that block was sent which was itself answered before the freeze started
(that one landed later and must be in the copy).  The control moves the freeze lock off the written blocks:
the same checker must then find writes from after the cut.
"""

import struct
import subprocess
import sys
import threading
import time

from harness import procs as hp
from harness.faults import NbdClient
from harness.procs import extlock_node, wait_until
from test_tls import pki, tls_extlockd  # noqa: F401 (fixtures)
from harness.writers import StampWriter

BLK = 4096
NBLK = 16


def Writer(nbd_path, wid, seed):
    """A stamped-block writer over the first NBLK blocks."""
    return StampWriter(nbd_path, wid, seed, NBLK, timeout=60)


def check_backup(data, writes, t_freeze, t_cmd):
    by_stamp = {(w, s): (b, t0, t1) for w, s, b, t0, t1 in writes}
    problems = []
    for b in range(NBLK):
        blk = data[b * BLK:(b + 1) * BLK]
        if blk != blk[:16] * (BLK // 16):
            problems.append(f"block {b}: not one whole write")
            continue
        stamp = struct.unpack("<QQ", blk[:16])
        answered_before = [x for x in writes if x[2] == b and x[4] < t_freeze]
        last = max(answered_before, key=lambda x: x[4]) if answered_before \
            else None
        if stamp == (0, 0):
            if last:
                problems.append(f"block {b}: empty, but {last[:2]} was "
                                "answered before the freeze")
            continue
        if stamp not in by_stamp:
            problems.append(f"block {b}: unknown stamp {stamp}")
            continue
        _, t0, t1 = by_stamp[stamp]
        if t0 > t_cmd:
            problems.append(f"block {b}: {stamp} was sent after the cut")
        # a write answered before the freeze, and sent after the one in
        # the copy was answered, landed after it: the copy misses it.
        # (Answer times alone do not order two writes: a client may read
        # its answer late; a write sent after another was answered is
        # ordered after it.)
        newer = [x for x in answered_before if x[3] > t1]
        if newer:
            problems.append(f"block {b}: {stamp} was answered before "
                            f"{newer[0][:2]} was sent, which was answered "
                            "before the freeze")
    return problems


def freeze_backup(image, extlockd, lock_space, procs, workdir,
                  freeze_args, control=False):
    """Two hosts write; extlockctl freeze copies the image.  With
    @control, the command waits (bounded) until each host has answered
    2 * NBLK writes sent after the cut before it copies, so that a freeze
    which stops nothing leaves such writes in the copy whatever the load;
    else it copies after 0.5 s."""
    daemons = [procs.storage_daemon(
        name=f"qsd{i}",
        blockdevs=[extlock_node(image.child, extlockd.coordinator(),
                                lock_space, node_name="xl",
                                client_id=f"host-{i}")],
        exports=[("disk", "xl", True)]) for i in range(2)]
    writers = [Writer(d.nbd_path, i + 1, i) for i, d in enumerate(daemons)]
    for w in writers:
        w.start()
    # each host has written before the cut (observed, whatever the load)
    wait_until(lambda: all(len(w.done) >= 20 for w in writers), timeout=60,
               what="20 writes of each host")
    backup = workdir / "backup.raw"
    tcmd = workdir / "t_cmd"
    go = workdir / "go"
    if control:
        hold = (f"{sys.executable} -c 'import os, time, sys; "
                f"d = time.monotonic() + 60\n"
                f"while not os.path.exists(\"{go}\") and "
                f"time.monotonic() < d: time.sleep(0.02)'")
    else:
        hold = f"{sys.executable} -c 'import time; time.sleep(0.5)'"
    script = (f"{sys.executable} -c 'import time; print(time.monotonic())' "
              f"> {tcmd}.new && mv {tcmd}.new {tcmd} && {hold}"
              f" && {hp.binary('qemu-img')} convert -U -f raw -O raw "
              f"{image.path} {backup}")
    t_freeze = time.monotonic()
    proc = subprocess.Popen([hp.binary("extlockctl"), "-c", extlockd.address,
                             "freeze", lock_space, "--timeout", "60",
                             *freeze_args, "--", "sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if control:
        wait_until(lambda: tcmd.exists() or proc.poll() is not None,
                   timeout=60, what="the freeze command to start")
        if tcmd.exists():
            t = float(tcmd.read_text())
            wait_until(lambda: all(sum(1 for x in list(w.done) if x[3] > t)
                                   >= 2 * NBLK for w in writers),
                       timeout=60, what="writes of each host after the cut")
        go.touch()
    out, err = proc.communicate(timeout=120)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    t_cmd = float(tcmd.read_text())
    # each host writes after the cut too (the freeze has ended)
    wait_until(lambda: all(sum(1 for x in list(w.done) if x[3] > t_cmd)
                           >= 20 for w in writers),
               timeout=60, what="20 writes of each host after the cut")
    for w in writers:
        w.stop.set()
    for w in writers:
        w.join(60)
        assert w.error is None, w.error
    assert p.returncode == 0, p.stderr
    writes = [x for w in writers for x in w.done]
    # writes from both hosts were sent before and after the cut
    for wid in (1, 2):
        assert any(x[0] == wid and x[3] < t_freeze for x in writes)
        assert any(x[0] == wid and x[3] > t_cmd for x in writes)
    size = NBLK * BLK
    return p, check_backup(backup.read_bytes()[:size], writes, t_freeze, t_cmd)


def test_backup_during_freeze_is_a_consistent_cut(image, extlockd,
                                                  lock_space, procs, workdir,
                                                  binaries):
    binaries("qemu-storage-daemon", "qemu-img", "extlockctl")
    p, problems = freeze_backup(image, extlockd, lock_space, procs,
                                workdir, [])
    assert problems == [], problems
    assert "cut token" in p.stderr and "COMMAND succeeded" in p.stderr


def test_backup_without_freeze_lock_is_caught(image, extlockd,
                                              lock_space, procs, workdir,
                                              binaries):
    """Control: the freeze lock far from the written blocks stops nothing,
    and the checker finds writes sent after the cut in the copy."""
    binaries("qemu-storage-daemon", "qemu-img", "extlockctl")
    _, problems = freeze_backup(image, extlockd, lock_space, procs,
                                workdir, ["--offset", str(1 << 40),
                                          "--length", str(BLK)],
                                control=True)
    assert any("sent after the cut" in x for x in problems), problems


# ---------------------------------------------------------------------------
# extent-lock-freeze / extent-lock-thaw: the freeze as a QMP command

def TrackedWriter(nbd_path, wid, seed):
    """A Writer that waits longer for a write held by a freeze (its
    ``inflight`` shows the write in flight)."""
    return StampWriter(nbd_path, wid, seed, NBLK, timeout=120)


def two_hosts(image, extlockd, lock_space, procs, lease_time=None):
    daemons = [procs.storage_daemon(
        name=f"qsd{i}",
        blockdevs=[extlock_node(image.child, extlockd.coordinator(),
                                lock_space, node_name="xl",
                                client_id=f"host-{i}", lease_time=lease_time)],
        exports=[("disk", "xl", True)]) for i in range(2)]
    writers = [TrackedWriter(d.nbd_path, i + 1, i)
               for i, d in enumerate(daemons)]
    for w in writers:
        w.start()
    wait_until(lambda: all(len(w.done) >= 20 for w in writers), timeout=60,
               what="20 writes of each host")
    return daemons, writers


def stop_writers(writers):
    for w in writers:
        w.stop.set()
    for w in writers:
        w.join(120)
        assert not w.is_alive()
        assert w.error is None, w.error


def copy_image(image, workdir):
    backup = workdir / "backup.raw"
    subprocess.run([hp.binary("qemu-img"), "convert", "-U", "-f", "raw",
                    "-O", "raw", str(image.path), str(backup)], check=True,
                   timeout=120)
    return backup.read_bytes()[:NBLK * BLK]


def waiting(daemon):
    """The extlock node of @daemon has a request waiting for its lock."""
    return daemon.qmp.execute("query-extent-locks",
                              {"node-name": "xl"})[0]["waiting"] != []


def test_qmp_freeze_backup_is_a_consistent_cut(image, extlockd, lock_space,
                                               procs, workdir, binaries):
    """extent-lock-freeze on one host while both write: once it returns,
    writes of both hosts wait; the copy taken then is a consistent cut;
    after extent-lock-thaw they go on.  The node's histograms count the
    waits and the holds the freeze ended."""
    binaries("qemu-storage-daemon", "qemu-img")
    daemons, writers = two_hosts(image, extlockd, lock_space, procs)
    qmp = daemons[0].qmp
    t_freeze = time.monotonic()
    cut = qmp.execute("extent-lock-freeze",
                      {"node-name": "xl", "timeout": 120}, timeout=130)
    t_cmd = time.monotonic()
    assert cut["node-name"] == "xl" and cut["lock-space"] == lock_space
    assert cut["client-id"] == "host-0/freeze"
    assert cut["epoch"] == cut["token"] >> 40 and cut["waited-ms"] >= 0
    assert cut["time"].endswith("Z") or "+00" in cut["time"]
    # the writers of both hosts are stopped by the freeze: a write of
    # each waits for its lock (observed, not slept on)
    wait_until(lambda: all(waiting(d) for d in daemons), timeout=60,
               what="a write of each host waiting behind the freeze")
    data = copy_image(image, workdir)
    n = sum(len(w.done) for w in writers)
    thawed = qmp.execute("extent-lock-thaw", {"node-name": "xl"})
    assert thawed["token"] == cut["token"] and thawed["frozen-ms"] >= 0
    wait_until(lambda: sum(len(w.done) for w in writers) >= n + 40,
               timeout=60, what="40 writes after the thaw")
    stop_writers(writers)
    writes = [x for w in writers for x in w.done]
    for wid in (1, 2):
        assert any(x[0] == wid and x[3] > t_cmd for x in writes)
    assert check_backup(data, writes, t_freeze, t_cmd) == []
    e = qmp.execute_error("extent-lock-thaw", {"node-name": "xl"})
    assert "Node 'xl' is not frozen" in e.desc

    # histograms: log2 buckets, consistent with their counts
    for d in daemons:
        info = d.qmp.execute("query-extent-locks")[0]
        for name in ("wait-histogram", "hold-histogram"):
            h = info[name]
            assert len(h["buckets"]) == 33, name
            assert sum(h["buckets"]) == h["count"] > 0, (name, h)
            assert h["max-us"] < 2 ** len(h["buckets"])
            assert h["sum-us"] >= h["max-us"]
        assert info["wait-histogram"]["count"] >= \
            info["counters"]["grants"]


def test_copy_without_freeze_is_caught(local_image, extlockd, lock_space,
                                       procs, workdir, binaries):
    """Control: the same copy without extent-lock-freeze.  Writes sent
    after the would-be cut complete before the copy reads their blocks,
    and the checker finds them."""
    binaries("qemu-storage-daemon", "qemu-img")
    daemons, writers = two_hosts(local_image, extlockd, lock_space, procs)
    t_freeze = t_cmd = time.monotonic()
    n = {w: len(w.done) for w in writers}
    # more writes than blocks after the would-be cut, from each host
    wait_until(lambda: all(len(w.done) >= n[w] + 2 * NBLK for w in writers),
               timeout=60, what="writes after the would-be cut")
    data = copy_image(local_image, workdir)
    stop_writers(writers)
    writes = [x for w in writers for x in w.done]
    problems = check_backup(data, writes, t_freeze, t_cmd)
    assert any("sent after the cut" in x for x in problems), problems


def test_qmp_freeze_timeout_thaws(local_image, extlockd, lock_space, procs,
                                  binaries):
    """A freeze that outlives its timeout ends by itself: the event says
    so, and the writers go on."""
    binaries("qemu-storage-daemon")
    daemons, writers = two_hosts(local_image, extlockd, lock_space, procs)
    qmp = daemons[1].qmp
    t0 = time.monotonic()
    cut = qmp.execute("extent-lock-freeze", {"node-name": "xl", "timeout": 2})
    ev = qmp.wait_event("EXTENT_LOCK_THAWED", timeout=30)
    assert time.monotonic() - t0 >= 2
    assert ev["data"]["reason"] == "timeout"
    assert ev["data"]["token"] == cut["token"]
    assert ev["data"]["node-name"] == "xl"
    assert ev["data"]["lock-space"] == lock_space
    n = sum(len(w.done) for w in writers)
    wait_until(lambda: sum(len(w.done) for w in writers) >= n + 20,
               timeout=60, what="writes after the timeout")
    e = qmp.execute_error("extent-lock-thaw", {"node-name": "xl"})
    assert "is not frozen" in e.desc
    stop_writers(writers)


def test_qmp_freeze_timeout_while_waiting(local_image, extlockd, lock_space,
                                          procs, binaries):
    """Another client holds an exclusive lock: the freeze is not granted
    within its timeout, fails with a clear error and leaves nothing in the
    coordinator."""
    from harness.coordinator import CoordinatorClient
    binaries("qemu-storage-daemon")
    d = procs.storage_daemon(
        name="qsd",
        blockdevs=[extlock_node(local_image.child, extlockd.coordinator(),
                                lock_space, node_name="xl",
                                client_id="host-0")])
    with CoordinatorClient(extlockd.address) as h:
        h.hello("stubborn", lock_space)
        h.lock(0, BLK, "exclusive")
        t0 = time.monotonic()
        e = d.qmp.execute_error("extent-lock-freeze",
                                {"node-name": "xl", "timeout": 1})
        assert time.monotonic() - t0 >= 1
        assert "not granted within 1 s; request cancelled" in e.desc, e.desc

        def freeze_gone():
            st = h.status()
            sp = [s for s in st["lock-spaces"] if s["name"] == lock_space]
            held = sp[0]["held"] if sp else []
            waiting = sp[0]["waiting"] if sp else []
            return waiting == [] and \
                [x["client-id"] for x in held] == ["stubborn"]
        wait_until(freeze_gone, timeout=10, what="the freeze request gone")
        e = d.qmp.execute_error("extent-lock-thaw", {"node-name": "xl"})
        assert "is not frozen" in e.desc


def test_qmp_freeze_host_killed(local_image, extlockd, lock_space, procs,
                                binaries):
    """The host that froze is killed (SIGKILL) during the freeze: the
    coordinator releases the freeze lock when its session's lease runs
    out, and the other host's writes go on."""
    binaries("qemu-storage-daemon")
    lease = 2000
    daemons, writers = two_hosts(local_image, extlockd, lock_space, procs,
                                 lease_time=lease)
    daemons[0].qmp.execute("extent-lock-freeze",
                           {"node-name": "xl", "timeout": 600})
    wait_until(lambda: waiting(daemons[1]), timeout=30,
               what="host 1's writer waiting behind the freeze")
    writers[0].stop.set()
    daemons[0].kill()
    n = len(writers[1].done)
    # lease (2 s) + the coordinator's margins, with ample slack
    wait_until(lambda: len(writers[1].done) >= n + 20, timeout=60,
               what="host 1's writes after the freezing host died")
    writers[1].stop.set()
    writers[1].join(120)
    assert writers[1].error is None, writers[1].error


def test_qmp_freeze_bad_arguments(local_image, extlockd, lock_space, procs,
                                  binaries):
    """Bad arguments give clear errors and change nothing: no freeze, no
    session in the coordinator, writes go on."""
    from harness.coordinator import coordinator_status
    binaries("qemu-storage-daemon")
    d = procs.storage_daemon(
        name="qsd",
        blockdevs=[{"driver": "null-co", "node-name": "plain"},
                   extlock_node(local_image.child, extlockd.coordinator(),
                                lock_space, node_name="xl",
                                client_id="host-0")])

    def sessions():
        st = coordinator_status(extlockd.address)
        return sorted(c["client-id"] for c in st.get("sessions", []))
    before = sessions()
    for args, msg in [
        ({"node-name": "nope", "timeout": 10}, "Cannot find node 'nope'"),
        ({"node-name": "plain", "timeout": 10},
         "Node 'plain' is not an extlock node"),
        ({"node-name": "xl", "timeout": -1},
         "Parameter 'timeout' must be between 1 and 604800 seconds, not -1"),
        ({"node-name": "xl", "timeout": 0}, "not 0"),
        ({"node-name": "xl", "timeout": 10 ** 9}, "must be between"),
        ({"node-name": "xl"}, "timeout"),
        ({"timeout": 10}, "node-name"),
    ]:
        e = d.qmp.execute_error("extent-lock-freeze", args)
        assert msg in e.desc, (args, e.desc)
    e = d.qmp.execute_error("extent-lock-thaw", {"node-name": "nope"})
    assert "Node 'nope' is not frozen" in e.desc
    assert sessions() == before
    # the node still works, and a good freeze still can be taken
    cut = d.qmp.execute("extent-lock-freeze",
                        {"node-name": "xl", "timeout": 30})
    e = d.qmp.execute_error("extent-lock-freeze",
                            {"node-name": "xl", "timeout": 30})
    assert f"Node 'xl' is frozen already (token {cut['token']})" in e.desc
    assert d.qmp.execute("extent-lock-thaw",
                         {"node-name": "xl"})["token"] == cut["token"]


def test_qmp_freeze_in_qemu_system_and_hmp_histograms(local_image, extlockd,
                                                      lock_space, procs,
                                                      binaries):
    """The freeze from qemu-system-x86_64 on its own node (lock cache off:
    every lock is released after its request, so each write is one wait
    and one hold): a write during the freeze waits, goes on after the
    thaw, and HMP info extent-locks shows both histograms."""
    binaries("qemu-system-x86_64")
    # a -drive: HMP qemu-io on a bare node would use a temporary
    # BlockBackend, whose removal drains (and cancels) the aio_write
    drive = hp.dotted(extlock_node(local_image.child, extlockd.coordinator(),
                                   lock_space, node_name="xl",
                                   client_id="vm-a", lock_cache=False))
    vm = procs.qemu_system(extra_args=["-drive", f"if=none,id=drv0,{drive}"])

    def info():
        return vm.qmp.execute("query-extent-locks")[0]
    out = vm.qmp.hmp('qemu-io drv0 "write -P 0x11 0 4k"')
    assert "error" not in out.lower(), out
    assert info()["wait-histogram"]["count"] == 1
    wait_until(lambda: info()["hold-histogram"]["count"] == 1, timeout=15,
               what="the write's lock to be released")
    cut = vm.qmp.execute("extent-lock-freeze",
                         {"node-name": "xl", "timeout": 60})
    assert cut["client-id"] == "vm-a/freeze"
    # a write now waits behind the freeze (HMP qemu-io's aio_write does
    # not block the monitor)
    out = vm.qmp.hmp('qemu-io drv0 "aio_write -P 0x22 0 4k"')
    assert "error" not in out.lower(), out
    wait_until(lambda: info()["waiting"], timeout=15,
               what="the write to wait behind the freeze")
    # the write began waiting before we saw it waiting, and cannot be
    # granted before the thaw is sent: its wait is at least this gap
    seen = time.monotonic()
    time.sleep(0.05)
    gap_us = (time.monotonic() - seen) * 1e6
    vm.qmp.execute("extent-lock-thaw", {"node-name": "xl"})
    wait_until(lambda: info()["hold-histogram"]["count"] == 2, timeout=15,
               what="the write to go on after the thaw")
    i = info()
    assert i["wait-histogram"]["count"] == 2
    assert sum(i["wait-histogram"]["buckets"]) == 2
    assert i["wait-histogram"]["max-us"] >= int(gap_us), (i, gap_us)
    text = vm.qmp.hmp("info extent-locks")
    assert "  wait times: 2, p50 < " in text, text
    assert "  hold times: 2, p50 < " in text, text
    assert "p99 < " in text and "max " in text, text


# ---------------------------------------------------------------------------
# the freeze's own session: set up without stalling the main loop; TLS

class Hmp:
    """A plain HMP monitor (-mon mode=readline) on a UNIX socket: served by
    the main loop itself, not by the QMP dispatcher, so it shows whether
    the main loop runs."""

    def __init__(self, path, timeout=30):
        import socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        wait_until(lambda: path.exists(), timeout=timeout, what="HMP socket")
        self.sock.connect(str(path))
        self.buf = b""
        self._until_prompt()

    def _until_prompt(self):
        while not self.buf.endswith(b"(qemu) "):
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError("HMP closed")
            self.buf += chunk
        out, self.buf = self.buf, b""
        return out.decode(errors="replace")

    def cmd(self, line):
        self.sock.sendall(line.encode() + b"\n")
        return self._until_prompt()

    def close(self):
        self.sock.close()


def backlog(path):
    """Connections waiting to be accepted on the listening UNIX socket
    @path (ss's Recv-Q of a listener)."""
    out = subprocess.run(["ss", "-x", "-l", "-n"], capture_output=True,
                         text=True, check=True).stdout
    for line in out.splitlines():
        f = line.split()
        if len(f) > 4 and f[1] == "LISTEN" and f[4] == str(path):
            return int(f[2])
    raise AssertionError(f"{path} is not listening:\n{out}")


def test_qmp_freeze_hung_coordinator_does_not_stall_main_loop(
        local_image, extlockd, lock_space, procs, binaries, tmp_path):
    """The coordinator accepts connections but never answers (SIGSTOPped;
    the node's own session has a 60 s lease, so it is not affected).
    extent-lock-freeze with a 2 s timeout: while it waits for its session,
    the main loop runs - an HMP monitor answers "info status" before the
    freeze's reply comes; the freeze then fails at its own timeout (not at
    the connection's 10 s answer timeout) with a clear error, QMP answers
    query-status, and once the coordinator runs again a freeze works and
    nothing of the failed one is left at the coordinator."""
    from harness.coordinator import coordinator_status
    from harness.faults import Resumer, resume, suspend
    binaries("qemu-system-x86_64")
    hmp_path = tmp_path / "hmp.sock"
    drive = hp.dotted(extlock_node(local_image.child, extlockd.coordinator(),
                                   lock_space, node_name="xl",
                                   client_id="vm-a", lease_time=60000))
    vm = procs.qemu_system(extra_args=[
        "-drive", f"if=none,id=drv0,{drive}",
        "-chardev", f"socket,id=hmp0,path={hmp_path},server=on,wait=off",
        "-mon", "chardev=hmp0,mode=readline"])
    hmp = Hmp(hmp_path)
    result = {}
    with Resumer(extlockd):
        suspend(extlockd)

        def freeze():
            t0 = time.monotonic()
            try:
                result["ret"] = vm.qmp.execute(
                    "extent-lock-freeze", {"node-name": "xl", "timeout": 2},
                    timeout=60)
            except Exception as e:              # the test looks at it
                result["error"] = e
            result["took"] = time.monotonic() - t0
        t = threading.Thread(target=freeze)
        t.start()
        try:
            wait_until(lambda: backlog(extlockd.socket_path) > 0, timeout=30,
                       what="the freeze's connection to the stopped coordinator")
            out = hmp.cmd("info status")
            pending = t.is_alive()
            assert "VM status" in out, out
            assert pending, ("the main loop answered HMP only after the freeze "
                             f"returned: {result}")
        finally:
            t.join(60)
        assert not t.is_alive()
        e = result.get("error")
        assert e is not None, result
        assert "Cannot freeze node 'xl'" in e.desc and "within 2 s" in e.desc, e.desc
        assert "did not start a session in time" in e.desc, e.desc
        # at its own timeout, not at the 10 s answer timeout of a connect step
        assert 2 <= result["took"] < 10, result
        assert "status" in vm.qmp.execute("query-status")
        resume(extlockd)
    # the coordinator runs again: the node still freezes and thaws
    cut = vm.qmp.execute("extent-lock-freeze", {"node-name": "xl", "timeout": 30})
    vm.qmp.execute("extent-lock-thaw", {"node-name": "xl"})
    assert cut["client-id"] == "vm-a/freeze"

    def freeze_sessions():
        return [s["client-id"] for s in coordinator_status(extlockd.address)["sessions"]
                if s["client-id"] == "vm-a/freeze"]
    # the abandoned connect says bye when it gets its answer after all
    wait_until(lambda: freeze_sessions() == [], timeout=30,
               what="no freeze session left at the coordinator")
    hmp.close()


def test_qmp_freeze_over_tls(local_image, lock_space, procs, binaries, pki,
                             tls_extlockd):
    """A node that reaches its coordinator over TLS (tls-creds-x509): the
    freeze's own session uses the node's tls-creds too (the coordinator
    sees the client certificate's identity on it), the cut is taken, and
    the thaw ends that session."""
    from harness.coordinator import coordinator_status
    from test_tls import tls_node, x509_object
    binaries("qemu-storage-daemon")
    d = procs.storage_daemon(
        name="qsd", objects=[x509_object(pki)],
        blockdevs=[tls_node(local_image, tls_extlockd, lock_space, "host-a",
                            node_name="xl")],
        exports=[("disk", "xl", True)])
    with NbdClient(d.nbd_path, "disk") as c:
        c.write(0, b"\x5a" * BLK)

    def sessions():
        return sorted((s["client-id"], s["owner"])
                      for s in coordinator_status(tls_extlockd.address)["sessions"]
                      if s["lock-space"] == lock_space)
    cut = d.qmp.execute("extent-lock-freeze", {"node-name": "xl", "timeout": 30})
    assert cut["client-id"] == "host-a/freeze"
    assert sessions() == [("host-a", "x509:host-a"),
                          ("host-a/freeze", "x509:host-a")], sessions()
    # writes wait behind the freeze, over TLS as well
    with NbdClient(d.nbd_path, "disk") as c:
        h = c.send_write(0, b"\x6b" * BLK)
        wait_until(lambda: waiting(d), timeout=30,
                   what="the write to wait behind the freeze")
        d.qmp.execute("extent-lock-thaw", {"node-name": "xl"})
        assert c.wait(h, timeout=60)[0] == 0
    wait_until(lambda: sessions() == [("host-a", "x509:host-a")], timeout=30,
               what="the freeze session to end at the thaw")


def test_block_resize_under_freeze_refused_node_in_iothread(
        local_image, extlockd, lock_space, procs, binaries, tmp_path):
    """The node is in iothread io0.  While this process freezes its
    lock-space, block_resize is refused at once with an error naming the
    freeze - held (QMP) and pending (HMP, while the QMP freeze waits for a
    holder) - instead of waiting behind the freeze for its timeout; the
    check runs in io0 (block_resize runs the truncate in the node's
    context).  After the thaw the resize works."""
    from harness.coordinator import CoordinatorClient, coordinator_status
    from harness.qmp import QMPError
    binaries("qemu-system-x86_64")
    size = local_image.path.stat().st_size
    hmp_path = tmp_path / "hmp.sock"
    # a -drive: HMP block_resize takes a device name
    drive = hp.dotted(extlock_node(local_image.child, extlockd.coordinator(),
                                   lock_space, node_name="xl",
                                   client_id="vm-a"))
    vm = procs.qemu_system(
        extra_args=["-drive", f"if=none,id=drv0,{drive}",
                    "-object", "iothread,id=io0",
                    "-chardev", f"socket,id=hmp0,path={hmp_path},server=on,wait=off",
                    "-mon", "chardev=hmp0,mode=readline"])
    # no device uses drv0: moving it is safe
    vm.qmp.execute("x-blockdev-set-iothread", {"node-name": "xl", "iothread": "io0",
                                               "force": True})
    hmp = Hmp(hmp_path)

    def info():
        return vm.qmp.execute("query-extent-locks", {"node-name": "xl"})[0]

    # the node (in io0) caches an exclusive lock, which the freeze revokes
    out = vm.qmp.hmp('qemu-io drv0 "write -P 0x11 0 4k"')
    assert "error" not in out.lower(), out
    assert [h["mode"] for h in info()["held"]] == ["exclusive"], info()
    # held: refused at once (not after the freeze's 120 s)
    cut = vm.qmp.execute("extent-lock-freeze", {"node-name": "xl", "timeout": 120})
    c = info()["counters"]
    assert c["revocations"] >= 1 and c["downgrades"] >= 1, c
    try:
        vm.qmp.execute("block_resize", {"node-name": "xl", "size": 2 * size},
                       timeout=60)
        raise AssertionError("block_resize went through a freeze")
    except QMPError as e:
        assert (f"lock-space {lock_space} is frozen by extent-lock-freeze on "
                f"node 'xl' (token {cut['token']})") in e.desc, e.desc
        assert "extent-lock-thaw it first" in e.desc, e.desc
    assert local_image.path.stat().st_size == size
    # (after the refusal: block_resize drains the node, which fails a
    # request that waits longer than the drain's grace; docs/monitoring.rst)
    # a write waits behind the freeze, in io0; HMP shows the node's state
    out = vm.qmp.hmp('qemu-io drv0 "aio_write -P 0x22 0 4k"')
    assert "error" not in out.lower(), out
    wait_until(lambda: info()["waiting"], timeout=30,
               what="the write to wait behind the freeze")
    text = hmp.cmd("info extent-locks xl")
    waits = [x for x in text.splitlines() if "exclusive [0, +4096) for" in x]
    assert len(waits) == 1 and "vm-a/freeze" in waits[0].split("blocked by")[1], text
    assert vm.qmp.execute("extent-lock-thaw", {"node-name": "xl"})["token"] == cut["token"]
    wait_until(lambda: not info()["waiting"], timeout=30,
               what="the write to go on after the thaw")
    wait_until(lambda: local_image.path.read_bytes()[:BLK] == b"\x22" * BLK,
               timeout=30, what="the write after the thaw to land")

    # pending: the freeze waits for another client's lock
    with CoordinatorClient(extlockd.address) as h:
        h.hello("stubborn", lock_space)
        g = h.lock(0, BLK, "exclusive")
        result = {}
        t = threading.Thread(target=lambda: result.update(cut=vm.qmp.execute(
            "extent-lock-freeze", {"node-name": "xl", "timeout": 120}, timeout=130)))
        t.start()
        try:
            def freeze_waits():
                for sp in coordinator_status(extlockd.address)["lock-spaces"]:
                    if sp["name"] == lock_space:
                        return [w for w in sp["waiting"]
                                if w["client-id"] == "vm-a/freeze"]
                return []
            wait_until(freeze_waits, timeout=30, what="the freeze to wait")
            out = hmp.cmd(f"block_resize drv0 {2 * size}")
            assert f"extent-lock-freeze of lock-space {lock_space} on node 'xl' " \
                "is pending" in out, out
            assert t.is_alive()
            h.unlock(g["lock"])
        finally:
            t.join(130)
        h.bye()
    assert "cut" in result, result
    vm.qmp.execute("extent-lock-thaw", {"node-name": "xl"})
    assert local_image.path.stat().st_size == size
    vm.qmp.execute("block_resize", {"node-name": "xl", "size": 2 * size})
    assert local_image.path.stat().st_size == 2 * size
    hmp.close()


def test_check_backup_missing_write_rule():
    """The checker itself: a copy that holds a write answered before
    another write of the block was sent (answered before the freeze) is
    flagged; two overlapping writes whose answers came in the other order
    than their landing are not."""
    def image(stamps):
        return b"".join(struct.pack("<QQ", *st) * (BLK // 16) for st in stamps)
    others = [(9, s, b, 0.1, 0.2) for s, b in enumerate(range(1, NBLK), 1)]
    stamps = [(1, 1)] + [(9, s) for s in range(1, NBLK)]
    # (1, 1) answered at 1.0; (2, 1) sent at 2.0, answered 3.0; freeze at 4
    missing = [(1, 1, 0, 0.5, 1.0), (2, 1, 0, 2.0, 3.0)] + others
    problems = check_backup(image(stamps), missing, 4.0, 4.5)
    assert problems and "was answered before (2, 1) was sent" in problems[0]
    # (2, 1) sent before (1, 1) was answered: either may land last
    overlapping = [(1, 1, 0, 0.5, 1.0), (2, 1, 0, 0.9, 3.0)] + others
    assert check_backup(image(stamps), overlapping, 4.0, 4.5) == []
