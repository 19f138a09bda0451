# extlockctl freeze --guest-agent against a real qemu-ga and a real
# extlockd: the guest's filesystems are frozen before the cut and thawed
# after COMMAND, also when something fails.
#
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (c) 2026 The extlock authors
#
# No guest here: Debian's qemu-ga runs on the host, listening on a unix
# socket (-m unix-listen) as the host side of a guest's channel would.
# It must never freeze the host's filesystems: it runs in a private mount
# namespace (unshare -m) with an ext4 image mounted on a loop device,
# extlockctl is always given that mountpoint (--guest-fs: the agent's
# guest-fsfreeze-freeze-list), and the agent refuses the whole-system
# guest-fsfreeze-freeze (--block-rpcs).  So the real FIFREEZE/FITHAW
# ioctls run, on a filesystem only the test sees.
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXTLOCKCTL, CoordinatorClient, wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-ga") is None or shutil.which("unshare") is None or
    not Path("/dev/loop-control").exists(),
    reason="needs qemu-ga (qemu-guest-agent), unshare and loop devices")

# COMMAND's view: the agent's freeze state while the cut is held
STATUS = r"""
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(b'{"execute": "guest-fsfreeze-status"}\n')
f = s.makefile("rb")
reply = json.loads(f.readline())
open(sys.argv[2], "w").write(json.dumps({
    "status": reply["return"],
    "consistency": os.environ.get("EXTLOCK_CUT_CONSISTENCY"),
    "filesystems": os.environ.get("EXTLOCK_CUT_GUEST_FILESYSTEMS"),
    "token": os.environ.get("EXTLOCK_CUT_TOKEN")}))
sys.exit(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
"""


class Agent:
    """qemu-ga in a private mount namespace with a loop-mounted ext4."""

    def __init__(self, workdir):
        self.dir = workdir
        workdir.mkdir()
        self.sock = workdir / "ga.sock"
        self.mnt = workdir / "fs"
        self.mnt.mkdir()
        img = workdir / "fs.img"
        with open(img, "wb") as f:
            f.truncate(16 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True,
                       timeout=60)
        (workdir / "state").mkdir()
        script = (f"mount -o loop {img} {self.mnt} && "
                  f"exec qemu-ga -m unix-listen -p {self.sock} "
                  f"-t {workdir / 'state'} -l {workdir / 'ga.log'} "
                  "--block-rpcs guest-fsfreeze-freeze")
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation",
                                      "private", "sh", "-c", script])
        wait_for(lambda: self.sock.exists() or self.proc.poll() is not None,
                 20, "qemu-ga's socket")
        assert self.proc.poll() is None, "qemu-ga did not start"

    def call(self, command):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(self.sock))
        s.sendall(json.dumps({"execute": command}).encode() + b"\n")
        reply = json.loads(s.makefile("rb").readline())
        s.close()
        return reply["return"]

    def status(self):
        return self.call("guest-fsfreeze-status")

    def stop(self):
        if self.proc.poll() is None:
            try:
                if self.status() == "frozen":     # never leave it frozen
                    self.call("guest-fsfreeze-thaw")
            finally:
                self.proc.terminate()
                self.proc.wait(10)


@pytest.fixture
def agents(tmp_path):
    started = []

    def start():
        a = Agent(tmp_path / f"ga{len(started)}")
        started.append(a)
        return a
    yield start
    for a in started:
        a.stop()


def space_locks(d, space):
    sp = [s for s in d.status()["lock-spaces"] if s["name"] == space]
    return (sp[0]["held"], sp[0]["waiting"]) if sp else ([], [])


def holder(d, space="fz"):
    c = CoordinatorClient(d.address)
    c.hello("holder", space)
    return c


def freeze(d, agents, mounts, *args, timeout=60):
    return subprocess.run(
        [str(EXTLOCKCTL), "-c", d.address, "freeze", "fz",
         "--guest-agent", ",".join(str(a) for a in agents),
         "--guest-fs", ",".join(str(m) for m in mounts), *args],
        capture_output=True, text=True, timeout=timeout)


def test_guest_frozen_during_the_cut_and_thawed_after(extlockd, agents,
                                                      tmp_path):
    d = extlockd()
    h = holder(d)
    a, b = agents(), agents()
    seen = tmp_path / "seen"
    p = freeze(d, [a.sock, b.sock], [a.mnt, b.mnt], "--timeout", "30", "--",
               sys.executable, "-c", STATUS, str(a.sock), str(seen))
    assert p.returncode == 0, p.stderr
    got = json.loads(seen.read_text())
    # COMMAND ran with the guest frozen, and was told so
    assert got["status"] == "frozen"
    assert got["consistency"] == "filesystem"
    assert got["filesystems"] == "2"            # one ext4 per agent
    assert a.status() == "thawed" and b.status() == "thawed"
    # the order: guests frozen, then the cut, then COMMAND, then thawed,
    # then the lock released
    err = p.stderr
    order = [err.index(f"guest agent {a.sock}: 1 filesystem(s) frozen"),
             err.index(f"guest agent {b.sock}: 1 filesystem(s) frozen"),
             err.index(f"cut token {got['token']}"),
             err.index("COMMAND succeeded"),
             err.index(f"guest agent {a.sock}: 1 filesystem(s) thawed"),
             err.index(f"guest agent {b.sock}: 1 filesystem(s) thawed")]
    assert order == sorted(order), err
    assert space_locks(d, "fz") == ([], [])
    h.close()


def test_crash_consistent_without_agents(extlockd, tmp_path):
    d = extlockd()
    h = holder(d)
    seen = tmp_path / "seen"
    p = subprocess.run(
        [str(EXTLOCKCTL), "-c", d.address, "freeze", "fz", "--", "sh", "-c",
         f"echo $EXTLOCK_CUT_CONSISTENCY > {seen}"],
        capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert seen.read_text().strip() == "crash"
    h.close()


def test_guest_thawed_when_command_fails(extlockd, agents, tmp_path):
    d = extlockd()
    h = holder(d)
    a = agents()
    seen = tmp_path / "seen"
    p = freeze(d, [a.sock], [a.mnt], "--", sys.executable, "-c", STATUS,
               str(a.sock), str(seen), "3")
    assert p.returncode == 1
    assert "COMMAND failed with exit status 3" in p.stderr
    assert json.loads(seen.read_text())["status"] == "frozen"
    assert a.status() == "thawed"
    assert space_locks(d, "fz") == ([], [])
    h.close()


def test_guest_thawed_on_timeout(extlockd, agents, tmp_path):
    d = extlockd()
    h = holder(d)
    a = agents()
    # COMMAND outlives the timeout
    p = freeze(d, [a.sock], [a.mnt], "--timeout", "2", "--", "sleep", "60")
    assert p.returncode == 124, p.stderr
    assert a.status() == "thawed"
    assert "1 filesystem(s) thawed" in p.stderr
    # the freeze lock never granted: a writer holds the whole space
    g = h.lock(0, 1 << 20, "exclusive", timeout=10)
    assert g["type"] == "granted"
    marker = tmp_path / "ran"
    p = freeze(d, [a.sock], [a.mnt], "--timeout", "2", "--", "touch",
               str(marker))
    assert p.returncode == 124, p.stderr
    assert "request cancelled, COMMAND not run" in p.stderr
    assert not marker.exists()
    assert a.status() == "thawed"
    held, waiting = space_locks(d, "fz")
    assert waiting == [] and [x["client-id"] for x in held] == ["holder"]
    h.close()


def test_unreachable_agent_thaws_the_others(extlockd, agents, tmp_path):
    """The second agent cannot be reached: the first, already frozen, is
    thawed, COMMAND does not run, no lock is taken."""
    d = extlockd()
    h = holder(d)
    a = agents()
    marker = tmp_path / "ran"
    t0 = time.monotonic()
    p = freeze(d, [a.sock, tmp_path / "no-such.sock"], [a.mnt], "--",
               "touch", str(marker))
    assert p.returncode == 1
    assert "cannot freeze the guest's filesystems" in p.stderr
    assert "no-such.sock: connect: No such file or directory" in p.stderr
    assert "COMMAND not run" in p.stderr
    assert time.monotonic() - t0 < 30
    assert not marker.exists()
    assert a.status() == "thawed"
    assert "1 filesystem(s) frozen" in p.stderr
    assert space_locks(d, "fz") == ([], [])
    # a mountpoint the guest does not have: the agent's error, nothing run
    p = freeze(d, [a.sock], ["/no/such/mountpoint"], "--", "touch",
               str(marker))
    assert p.returncode == 1
    assert "froze none of the filesystems of --guest-fs" in p.stderr
    assert not marker.exists() and a.status() == "thawed"
    h.close()


def test_guest_agent_bad_usage(extlockd):
    d = extlockd()
    for args, msg in [
        (["--guest-fs", "/x", "--", "true"], "--guest-fs needs --guest-agent"),
        (["--guest-agent", "a,,b", "--", "true"], "empty item"),
        (["--guest-agent"], "needs a value"),
    ]:
        p = subprocess.run([str(EXTLOCKCTL), "-c", d.address, "freeze", "fz",
                            *args], capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, (args, p.stderr)
        assert msg in p.stderr, (args, p.stderr)
