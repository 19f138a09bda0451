# extlockctl freeze against a real extlockd: a consistent cut of a file
# written by two clients under exclusive locks, timeouts, failing commands,
# unknown lock-spaces and refused ones.
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (c) 2026 The extlock authors
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

from conftest import EXTLOCKCTL, CoordinatorClient, wait_for

BLK = 4096
NBLK = 16

# COMMAND for the freeze: record the cut token, then copy the image block
# by block, slowly (20 ms a block), so that writes racing with the copy
# would show in the backup
COPY = r"""
import os, sys, time
src, dst, cut = sys.argv[1:4]
open(cut, "w").write(os.environ["EXTLOCK_CUT_TOKEN"] + " " +
                     os.environ["EXTLOCK_CUT_TIME"] + "\n")
with open(src, "rb") as s, open(dst, "wb") as d:
    for i in range(%d):
        d.write(os.pread(s.fileno(), %d, i * %d))
        time.sleep(0.02)
""" % (NBLK, BLK, BLK)


class Writer(threading.Thread):
    """Writes its token into random blocks of @image, each under an
    exclusive lock of that block; records (token, block) once written."""

    def __init__(self, address, name, image, seed):
        super().__init__(daemon=True)
        self.c = CoordinatorClient(address)
        self.c.hello(name, "cut")
        self.image = image
        self.seed = seed
        self.done = []
        self.stop = threading.Event()
        self.error = None

    def run(self):
        import random
        rnd = random.Random(self.seed)
        fd = os.open(self.image, os.O_RDWR)
        try:
            for _ in range(100000):            # bounded
                if self.stop.is_set():
                    break
                b = rnd.randrange(NBLK)
                g = self.c.lock(b * BLK, BLK, "exclusive", timeout=60)
                data = struct.pack("<QQ", g["token"], b) * (BLK // 16)
                os.pwrite(fd, data, b * BLK)
                self.done.append((g["token"], b))
                self.c.unlock(g["lock"])
        except Exception as e:                  # reported by the test
            self.error = e
        finally:
            os.close(fd)
            self.c.close()


def check_cut(backup, cut, writes):
    """Every block of @backup holds the last write (by token: writes to a
    block are ordered by their exclusive locks) with a token below @cut;
    returns the list of problems."""
    data = Path(backup).read_bytes()
    problems = []
    for b in range(NBLK):
        blk = data[b * BLK:(b + 1) * BLK]
        tok, blk_no = struct.unpack_from("<QQ", blk)
        if blk != blk[:16] * (BLK // 16):
            problems.append(f"block {b}: torn")
            continue
        before = [t for t, x in writes if x == b and t < cut]
        want = max(before) if before else 0
        if tok != want:
            problems.append(f"block {b}: token {tok}, want {want} "
                            f"(cut {cut})")
    return problems


def run_freeze(d, *args, timeout=120):
    return subprocess.run([str(EXTLOCKCTL), "-c", d.address, "freeze", *args],
                          capture_output=True, text=True, timeout=timeout)


def cut_run(d, tmp_path, freeze_args):
    image = tmp_path / "image"
    image.write_bytes(bytes(NBLK * BLK))
    writers = [Writer(d.address, f"writer-{i}", image, i) for i in range(2)]
    for w in writers:
        w.start()
    wait_for(lambda: sum(len(w.done) for w in writers) >= 50, 60,
             "50 writes before the freeze")
    p = run_freeze(d, *freeze_args, "--", sys.executable, "-c", COPY,
                   str(image), str(tmp_path / "backup"), str(tmp_path / "cut"))
    n = sum(len(w.done) for w in writers)
    wait_for(lambda: sum(len(w.done) for w in writers) >= n + 50, 60,
             "50 writes after the freeze")
    for w in writers:
        w.stop.set()
    for w in writers:
        w.join(60)
        assert w.error is None, w.error
    assert p.returncode == 0, p.stderr
    cut = int((tmp_path / "cut").read_text().split()[0])
    writes = [x for w in writers for x in w.done]
    # the freeze really happened in the middle of the traffic
    assert any(t < cut for t, _ in writes) and any(t > cut for t, _ in writes)
    return p, cut, check_cut(tmp_path / "backup", cut, writes)


def test_freeze_is_a_consistent_cut(extlockd, tmp_path):
    d = extlockd()
    p, cut, problems = cut_run(d, tmp_path, ["cut"])
    assert problems == []
    assert f"cut token {cut}" in p.stderr and "COMMAND succeeded" in p.stderr
    # the freeze's grant and release are in the event log with that token
    assert f'"token":{cut}' in d.event_log.read_text().replace(" ", "")
    st = d.status()
    sp = [s for s in st["lock-spaces"] if s["name"] == "cut"][0]
    assert sp["held"] == [] and sp["waiting"] == []


def test_cut_without_the_whole_space_lock_is_caught(extlockd, tmp_path):
    """Control: a freeze lock that covers none of the written blocks does
    not stop the writers, and the checker sees the copy is no cut."""
    d = extlockd()
    _, _, problems = cut_run(d, tmp_path,
                             ["cut", "--offset", str(1 << 40), "--length",
                              str(BLK)])
    assert problems, "the checker missed writes racing with the copy"


def holder(d, space="fz", client="holder"):
    c = CoordinatorClient(d.address)
    c.hello(client, space)
    return c


def space_locks(d, space):
    sp = [s for s in d.status()["lock-spaces"] if s["name"] == space]
    return (sp[0]["held"], sp[0]["waiting"]) if sp else ([], [])


def test_freeze_timeout_kills_command_and_releases(extlockd, tmp_path):
    d = extlockd()
    h = holder(d)
    pidfile = tmp_path / "pid"
    p = run_freeze(d, "fz", "--timeout", "1", "--", "sh", "-c",
                   f"echo $$ > {pidfile}; exec sleep 60")
    assert p.returncode == 124, p.stderr
    assert "timeout (1 s): COMMAND still running; killing it" in p.stderr
    pid = int(pidfile.read_text())
    assert gone(pid)
    assert space_locks(d, "fz") == ([], [])
    g = h.lock(0, BLK, "exclusive", timeout=10)     # nothing left behind
    assert g["type"] == "granted"
    h.close()


def test_freeze_timeout_while_waiting_for_the_lock(extlockd, tmp_path):
    d = extlockd()
    h = holder(d)
    h.lock(0, BLK, "exclusive")                     # held throughout
    marker = tmp_path / "ran"
    p = run_freeze(d, "fz", "--timeout", "1", "--", "touch", str(marker))
    assert p.returncode == 124, p.stderr
    assert "waiting for the freeze lock; request cancelled" in p.stderr
    assert not marker.exists()
    held, waiting = space_locks(d, "fz")
    assert waiting == [] and [x["client-id"] for x in held] == ["holder"]
    h.close()


def test_freeze_failing_command(extlockd):
    d = extlockd()
    h = holder(d)
    p = run_freeze(d, "fz", "--", "sh", "-c", "exit 3")
    assert p.returncode == 1
    assert "COMMAND failed with exit status 3; releasing the lock" in p.stderr
    assert space_locks(d, "fz") == ([], [])
    p = run_freeze(d, "fz", "--", "/nonexistent/command")
    assert p.returncode == 1 and "cannot run /nonexistent/command" in p.stderr
    assert space_locks(d, "fz") == ([], [])
    h.close()


def test_freeze_unknown_lock_space(extlockd):
    d = extlockd()
    h = holder(d)
    p = run_freeze(d, "no-such-space", "--", "true")
    assert p.returncode == 1
    assert "lock-space no-such-space is unknown" in p.stderr
    assert "--allow-unused" in p.stderr
    assert space_locks(d, "no-such-space") == ([], [])
    h.close()


def test_freeze_lock_space_not_permitted(extlockd, tmp_path):
    policy = tmp_path / "policy"
    policy.write_text(f"[identity uid:{os.getuid()}]\nlock-spaces=allowed-*\n"
                      "client-ids=*\nadmin=true\n")
    d = extlockd("--policy", str(policy))
    marker = tmp_path / "ran"
    p = run_freeze(d, "secret", "--allow-unused", "--", "touch", str(marker))
    assert p.returncode == 1
    assert "permission-denied" in p.stderr and "lock-space secret" in p.stderr
    assert not marker.exists()
    p = run_freeze(d, "allowed-1", "--allow-unused", "--", "touch",
                   str(marker))
    assert p.returncode == 0 and marker.exists()


def test_freeze_bad_usage(extlockd):
    d = extlockd()
    for args, msg in [
        (["fz"], "no COMMAND after --"),
        (["fz", "--"], "no COMMAND after --"),
        (["--", "true"], "which LOCK-SPACE?"),
        (["fz", "--timeout", "0", "--", "true"], "--timeout '0'"),
        (["fz", "--timeout", "x", "--", "true"], "--timeout 'x'"),
        (["fz", "--lease-ms", "5", "--", "true"], "--lease-ms '5'"),
        (["fz", "--offset", "1", "--", "true"], "--offset needs --length"),
        (["fz", "--bogus", "--", "true"], "unknown option '--bogus'"),
        (["fz", "extra", "--", "true"], "unexpected argument 'extra'"),
    ]:
        p = run_freeze(d, *args)
        assert p.returncode == 2, (args, p.stderr)
        assert msg in p.stderr, (args, p.stderr)


def gone(pid):
    """The process is gone or a zombie (reading /proc races with its
    exit: ENOENT or ESRCH)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_freeze_killed_releases_with_the_lease(extlockd, tmp_path):
    """extlockctl killed during the freeze (its host dies): COMMAND dies
    with it, and the coordinator releases the freeze lock when the lease
    runs out; then writers get their locks."""
    import signal
    d = extlockd("--fence-margin-ms", "100")
    h = holder(d)
    pidfile = tmp_path / "pid"
    p = subprocess.Popen([str(EXTLOCKCTL), "-c", d.address, "freeze", "fz",
                          "--lease-ms", "1000", "--", "sh", "-c",
                          f"echo $$ > {pidfile}; exec sleep 60"],
                         stderr=subprocess.PIPE, text=True)
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10,
             "COMMAND to start")
    cmd_pid = int(pidfile.read_text())
    held, _ = space_locks(d, "fz")
    assert [x["mode"] for x in held] == ["shared"]
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    wait_for(lambda: gone(cmd_pid), 10, "COMMAND to die with extlockctl")
    # lease 1000 ms + fence margin 100 ms, with slack
    wait_for(lambda: space_locks(d, "fz")[0] == [], 10,
             "the freeze lock to go with the lease")
    g = h.lock(0, BLK, "exclusive", timeout=10)
    assert g["type"] == "granted"
    assert d.status()["metrics"]["lease-expiries"] == 1
    h.close()
