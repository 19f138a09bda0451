"""Two QEMU processes writing the same extents at the same time.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Each writer (a qemu-io process with its own extlock node) writes the same
set of whole extents, each writer with its own byte pattern, many times
over and with many requests in flight (aio_write), while the other does
the same in another order.  With extlock each write holds an exclusive lock
on its range for as long as it runs in the child, so

* afterwards every extent is uniformly one writer's pattern (whichever
  came last), never half one writer's and half the other's;
* a third client that follows the protocol (shared lock, read, unlock)
  never sees an extent half written while the writers run.

Without extlock both do go wrong on this machine (local files opened with
O_DIRECT; large writes split into several NFS WRITE RPCs, see NFS_MAX_IO in
conftest.py), and the controls at the end of this file assert it: the same
workloads without the extlock nodes, checked by the same checkers, must
show the damage (docs/testing.rst).

The final-state tests drive both writers in lock step (run_lockstep): the
test submits the two writers' requests for the same extent right after
each other, so that they are in flight together; with each writer in its
own background qemu-io the two would mostly write different extents at any
moment, and the final state would tear only by luck.
"""

import os
import time

import pytest

from harness.coordinator import CoordinatorClient, coordinator_status
from harness.patterns import check_uniform_extents, extent_summary, fill
from harness.procs import QemuIOError, extlock_node, run_qemu_io, start_qemu_io

MiB = 1024 * 1024
PATTERNS = (0xa1, 0xb2)

LAYOUTS = {
    # 24 extents of 1 MiB, each written 6 times by each writer
    "aligned-1M": dict(extents=24, extent_size=MiB, rounds=6),
    # 4 MiB writes: several NFS WRITE RPCs per request
    "aligned-4M": dict(extents=8, extent_size=4 * MiB, rounds=4),
    # few large extents, each written twice at once per round by each writer
    "aligned-8M-deep": dict(extents=4, extent_size=8 * MiB, rounds=4, depth=2),
    "aligned-2M-deep": dict(extents=8, extent_size=2 * MiB, rounds=8, depth=8),
    # ranges not aligned to the lock granularity (locks get rounded out)
    "unaligned": dict(extents=12, extent_size=MiB + 4096 * 3 + 777, rounds=5,
                      offset=12345),
}


# ---------------------------------------------------------------------------
# workload helpers

def copy_pattern(pattern, k):
    """The pattern of a writer's k-th concurrent copy of an extent: every
    write in flight at the same time has its own, so that even two copies
    of one writer interleaving show up as a mixed extent."""
    return pattern + k


def all_patterns(layout):
    return {copy_pattern(p, k) for p in PATTERNS for k in range(layout.get("depth", 1))}


def writer_commands(pattern, extents, extent_size, rounds, reverse, offset=0,
                    depth=1):
    """qemu-io commands: `rounds` rounds; in each, every extent is written
    `depth` times (all in flight at once, each copy with its own pattern),
    then aio_flush."""
    cmds = []
    order = list(range(extents))
    for r in range(rounds):
        # vary the order per round and per writer so that the two collide
        seq = order[::-1] if (r % 2 == 0) == reverse else order
        for i in seq:
            cmds += [f"aio_write -q -P {copy_pattern(pattern, k):#x} "
                     f"{offset + i * extent_size} {extent_size}" for k in range(depth)]
        cmds.append("aio_flush")
    return cmds


def writer_child(image):
    """The image's blockdev options for the writers.  Local files are
    opened with O_DIRECT: buffered writes to one file are serialised by the
    kernel anyway, direct overwrites are not."""
    if image.kind == "local":
        return dict(image.child, cache={"direct": True})
    return image.child


def start_writers(image, workdir, layout, coordinator=None, lock_space=None,
                  granularity=None, lock_cache=None):
    """Start one qemu-io writer per pattern at (almost) the same time; with
    an extlock node each if `coordinator` is given, else on the bare image."""
    procs = []
    for n, pattern in enumerate(PATTERNS):
        node = writer_child(image)
        if coordinator is not None:
            node = extlock_node(node, coordinator, lock_space,
                                client_id=f"writer-{n}", granularity=granularity,
                                lock_cache=lock_cache)
        cmds = writer_commands(pattern, reverse=bool(n), **layout)
        procs.append(start_qemu_io(node, cmds, workdir / f"w{n}.out",
                                   workdir / f"w{n}.err"))
    return procs


def lockstep_commands(pattern, extents, extent_size, rounds, offset=0, depth=1,
                      reverse=False):
    """Per round: every extent `depth` times (each copy its own pattern),
    in the same order for every writer (forward in even rounds, backward in
    odd ones), then aio_flush.  Returned as a list of rounds."""
    out = []
    for r in range(rounds):
        seq = range(extents) if r % 2 == 0 else reversed(range(extents))
        out.append([f"aio_write -q -P {copy_pattern(pattern, k):#x} "
                    f"{offset + i * extent_size} {extent_size}"
                    for i in seq for k in range(depth)])
    return out


def run_lockstep(procs, image, layout, coordinator=None, lock_space=None,
                 granularity=None, lock_cache=None, extlockd=None):
    """The writers' workload, driven in lock step: one interactive qemu-io
    per writer (with an extlock node each if `coordinator` is given, else
    on the bare image); the test submits the writers' requests for the same
    extent right after each other (aio_write returns as soon as the request
    is in flight), so that those writes really are in flight at the same
    time - without extlock they interleave, with it they must not.  Each
    round ends with aio_flush in every writer.  Returns each writer's
    output (asserted free of errors by the caller)."""
    writers = []
    for n, pattern in enumerate(PATTERNS):
        node = writer_child(image)
        if coordinator is not None:
            node = extlock_node(node, coordinator, lock_space,
                                client_id=f"writer-{n}", granularity=granularity,
                                lock_cache=lock_cache)
        writers.append(procs.qemu_io(node, name=f"w{n}"))
    plans = [lockstep_commands(p, **layout) for p in PATTERNS]
    outs = ["" for _ in writers]
    for r in range(len(plans[0])):
        for i in range(len(plans[0][r])):
            for n, w in enumerate(writers):
                outs[n] += w.cmd(plans[n][r][i])
        for n, w in enumerate(writers):
            try:
                outs[n] += w.cmd("aio_flush", timeout=STALL_MS / 1000 * 4)
            except QemuIOError as e:
                why = stalled_request(extlockd.address, lock_space) if extlockd else None
                pytest.fail(f"writer {n} did not finish round {r}: {e}; {why}",
                            pytrace=False)
    for n, w in enumerate(writers):
        assert w.quit() == 0, w.stderr()
        outs[n] += w.stderr()
    return outs


STALL_MS = 15000     # normal contention waits are milliseconds


def stalled_request(address, lock_space):
    """A description of a lock request in `lock_space` that has waited
    longer than STALL_MS at the coordinator (the writers are deadlocked),
    or None."""
    try:
        status = coordinator_status(address, timeout=5)
    except (OSError, TimeoutError) as e:
        return f"coordinator status failed: {e}"
    for space in status["lock-spaces"]:
        if space["name"] != lock_space:
            continue
        for w in space["waiting"]:
            if w["waited-ms"] > STALL_MS:
                return (f"{w['client-id']}'s {w['mode']} lock request on "
                        f"[{w['offset']}, +{w['length']}) has waited "
                        f"{w['waited-ms']} ms, blocked by {w['blocked-by']}")
    return None


def wait_writers(procs, workdir, timeout=90, extlockd=None, lock_space=None):
    """Wait for the writers; [(exit status, stdout, stderr)].

    A writer still running at the deadline, or after one has reported a
    lost lease, or (given the coordinator) while a lock request of theirs
    has been waiting longer than STALL_MS - the writers deadlocked - is
    killed and reported with exit status None; the others are killed too,
    so nothing outlives the test."""
    deadline = time.monotonic() + timeout
    errs = [workdir / f"w{n}.err" for n in range(len(procs))]
    stuck = None
    next_check = time.monotonic() + 1
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                stuck = f"still running after {timeout} s"
                break
            if any("lease lost" in e.read_text(errors="replace") for e in errs):
                stuck = "a writer lost its lease"
                break
            if extlockd is not None and time.monotonic() > next_check:
                next_check = time.monotonic() + 1
                stuck = stalled_request(extlockd.address, lock_space)
                if stuck:
                    break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for n, p in enumerate(procs):
        err = errs[n].read_text(errors="replace")
        if stuck:
            err = f"[killed by the test: {stuck}]\n{err}"
        results.append((None if stuck else p.returncode,
                        (workdir / f"w{n}.out").read_text(errors="replace"), err))
    return results


def read_while_writing(writers, path, extents, size, allowed, lock=None,
                       timeout=120):
    """Read every extent of a local file over and over until the writers
    have exited (plus one last pass), each read under a shared lock from
    the CoordinatorClient `lock` if given.  Returns a dict: reads,
    reads_during (while writers ran), torn (descriptions of extents that
    were not uniformly one allowed pattern), seen (byte values seen)."""
    stats = {"reads": 0, "reads_during": 0, "torn": [], "seen": set()}
    deadline = time.monotonic() + timeout
    running = True
    with open(path, "rb") as f:
        while running and time.monotonic() < deadline:
            running = any(p.poll() is None for p in writers)
            for i in range(extents):
                grant = lock.lock(i * size, size, "shared") if lock else None
                data = os.pread(f.fileno(), size, i * size)
                if grant:
                    lock.unlock(grant["lock"])
                stats["reads"] += 1
                stats["reads_during"] += running
                summary = extent_summary(data)
                if len(summary) > 1 or not set(summary) <= allowed:
                    stats["torn"].append(
                        f"read {stats['reads']}, extent {i}: " + ", ".join(
                            f"{b:#04x} x {n}" for b, n in summary.items()))
                stats["seen"] |= set(summary)
    return stats


def assert_outputs_ok(outs):
    for n, out in enumerate(outs):
        low = out.lower()
        assert "error" not in low and "failed" not in low and "lease lost" not in low, \
            f"writer {n}: {out}"


def assert_writers_ok(results):
    for n, (rc, out, err) in enumerate(results):
        assert rc == 0, f"writer {n} failed: {out}\n{err}"
        assert "error" not in (out + err).lower(), f"writer {n}: {out}\n{err}"


# ---------------------------------------------------------------------------
# tests

LOCK_CACHE = pytest.mark.parametrize("lock_cache", [False, True],
                                     ids=["nocache", "cache"])


@LOCK_CACHE
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_overlapping_writers_leave_uniform_extents(layout, lock_cache, image,
                                                   extlockd, lock_space, procs,
                                                   binaries):
    binaries("qemu-io")
    spec = LAYOUTS[layout]
    outs = run_lockstep(procs, image, spec, extlockd.coordinator(), lock_space,
                        lock_cache=lock_cache, extlockd=extlockd)
    assert_outputs_ok(outs)

    start = spec.get("offset", 0)
    found, problems = check_uniform_extents(
        image.path, spec["extent_size"], spec["extents"], all_patterns(spec), offset=start)
    assert not problems, "torn writes:\n" + "\n".join(problems)

    # the bytes around the written ranges are untouched
    data = image.path.read_bytes()
    end = start + spec["extents"] * spec["extent_size"]
    assert data[:start] == bytes(start)
    assert data[end:end + MiB] == bytes(min(MiB, len(data) - end))

    # and a third extlock process reads exactly what is in the file
    check = extlock_node(image.child, extlockd.coordinator(), lock_space,
                         client_id="checker")
    cmds = [f"read -q -P {p:#x} {start + i * spec['extent_size']} {spec['extent_size']}"
            for i, p in enumerate(found)]
    r = run_qemu_io(check, cmds)
    assert r.returncode == 0, r.stdout + r.stderr


# 384 KiB writes (two NFS RPCs each) at 128 KiB + n * 384 KiB: under a
# 1 MiB lock granularity most of them share a granule with a neighbour and
# many straddle two granules
COARSE = dict(extents=40, extent_size=384 * 1024, rounds=4, offset=128 * 1024)


@LOCK_CACHE
def test_overlapping_writers_coarse_granularity(lock_cache, nfs_image, extlockd,
                                                lock_space, procs, binaries):
    """Same with a 1 MiB lock granularity and 384 KiB writes not aligned to
    it: writes of the two processes into the same granule exclude each
    other too, including writes that straddle two granules."""
    binaries("qemu-io")
    assert_outputs_ok(run_lockstep(procs, nfs_image, COARSE, extlockd.coordinator(),
                                   lock_space, granularity=MiB, lock_cache=lock_cache,
                                   extlockd=extlockd))
    _, problems = check_uniform_extents(nfs_image.path, COARSE["extent_size"],
                                        COARSE["extents"], all_patterns(COARSE),
                                        offset=COARSE["offset"])
    assert not problems, "torn writes:\n" + "\n".join(problems)


@LOCK_CACHE
@pytest.mark.parametrize("layout", ["aligned-1M", "aligned-4M"])
def test_locked_reader_never_sees_a_write_in_progress(layout, lock_cache, image,
                                                      extlockd, lock_space,
                                                      workdir, binaries):
    """While the two QEMU writers run, a third client that follows the
    protocol (this test: shared lock on an extent, read it from the file
    the NFS server writes to, unlock) must never see an extent half
    written.  That holds only if every QEMU write keeps its exclusive lock
    until the write has completed in the child."""
    binaries("qemu-io")
    spec = dict(LAYOUTS[layout], rounds=LAYOUTS[layout]["rounds"] * 3)
    size, extents = spec["extent_size"], spec["extents"]
    fill(image.path, 0, size * extents, 0x01)        # before QEMU opens it
    writers = start_writers(image, workdir, spec, extlockd.coordinator(), lock_space,
                            lock_cache=lock_cache)
    try:
        with CoordinatorClient(extlockd.address, timeout=20) as reader:
            # a lease longer than any wait: this client does not renew
            reader.hello("python-reader", lock_space, lease_ms=60000)
            try:
                stats = read_while_writing(writers, image.path, extents, size,
                                           {0x01, *all_patterns(spec)}, lock=reader)
            except TimeoutError:
                pytest.fail("the reader's shared lock was not granted within 20 s: "
                            + str(stalled_request(extlockd.address, lock_space)),
                            pytrace=False)
            reader.bye()
    finally:
        results = wait_writers(writers, workdir, extlockd=extlockd,
                               lock_space=lock_space)
    assert_writers_ok(results)
    assert not stats["torn"], ("the reader saw writes in progress:\n"
                               + "\n".join(stats["torn"][:20]))
    assert stats["reads_during"] >= extents, "the reader did not overlap the writers"
    assert stats["seen"] & all_patterns(spec), "the reader never saw the writers' data"


# ---------------------------------------------------------------------------
# controls: the same workloads without extlock must be caught tearing

# A race is not certain in one run; a control tries up to this many runs,
# stops at the first that shows the damage, and fails if none does.
# Measured tearing rates of every layout are in docs/testing.rst (each
# control tore in its first run in the large majority of measurements on
# a quiet machine).  Beside other clean-clone runs the scheduler can keep
# the writers apart for longer: aligned-8M-deep (4 extents a run) once did
# not tear in 12 runs (session 5, g2), unaligned on a local file once not
# in 5 (session 6, j3); a run takes a few seconds, so every control gets
# up to 30.
CONTROL_ATTEMPTS = 30


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_control_overlapping_writers_tear_without_extlock(layout, image, procs,
                                                          binaries):
    """The control of test_overlapping_writers_leave_uniform_extents: the
    same writers on the bare image (no extlock node) leave mixed extents,
    and the same checker reports them."""
    binaries("qemu-io")
    spec = LAYOUTS[layout]
    attempts = CONTROL_ATTEMPTS
    for attempt in range(attempts):
        assert_outputs_ok(run_lockstep(procs, image, spec))
        _, problems = check_uniform_extents(
            image.path, spec["extent_size"], spec["extents"], all_patterns(spec),
            offset=spec.get("offset", 0))
        if problems:
            print(f"\n{layout}/{image.kind}: torn in run {attempt + 1}: {problems[0]}")
            return
    pytest.fail(f"without extlock, {layout} on {image.kind} left every extent uniform "
                f"in {attempts} runs: the check cannot detect tearing here")


@pytest.mark.parametrize("layout", ["aligned-1M", "aligned-4M"])
def test_control_unlocked_reader_sees_writes_in_progress(layout, image, workdir, binaries):
    """The control of test_locked_reader_never_sees_a_write_in_progress:
    without extlock and without the reader's shared locks, the same reader
    sees extents half written."""
    binaries("qemu-io")
    spec = dict(LAYOUTS[layout], rounds=LAYOUTS[layout]["rounds"] * 3)
    size, extents = spec["extent_size"], spec["extents"]
    fill(image.path, 0, size * extents, 0x01)
    for attempt in range(CONTROL_ATTEMPTS):
        wd = workdir / f"run{attempt}"
        wd.mkdir()
        writers = start_writers(image, wd, spec)
        try:
            stats = read_while_writing(writers, image.path, extents, size,
                                       {0x01, *all_patterns(spec)})
        finally:
            results = wait_writers(writers, wd)
        assert_writers_ok(results)
        if stats["torn"]:
            print(f"\n{layout}/{image.kind}: {len(stats['torn'])} of {stats['reads']} "
                  f"unlocked reads torn in run {attempt + 1}")
            return
    pytest.fail(f"without extlock no unlocked read of {layout} on {image.kind} was torn "
                f"in {CONTROL_ATTEMPTS} runs: the check cannot detect tearing here")


def test_control_coarse_layout_tears_without_extlock(nfs_image, procs, binaries):
    """The control of test_overlapping_writers_coarse_granularity."""
    binaries("qemu-io")
    for attempt in range(CONTROL_ATTEMPTS):
        assert_outputs_ok(run_lockstep(procs, nfs_image, COARSE))
        _, problems = check_uniform_extents(nfs_image.path, COARSE["extent_size"],
                                            COARSE["extents"], all_patterns(COARSE),
                                            offset=COARSE["offset"])
        if problems:
            print(f"\ncoarse/nfs: torn in run {attempt + 1}: {problems[0]}")
            return
    pytest.fail(f"without extlock the coarse layout left every extent uniform in "
                f"{CONTROL_ATTEMPTS} runs: the check cannot detect tearing here")
