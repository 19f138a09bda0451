"""Lock caching, extent growth and revocation.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

docs/qemu-driver.rst, "Lock caching": with lock-cache=on (the default) a
node keeps its locks after use, lock requests may grow to the end of the
image, and the coordinator revokes cached locks that others wait for; the
node gives back the part the other request needs (widened to the side it
has not used), or downgrades an exclusive lock for a reader.  These tests
check the promises made there, from the outside:

* a lone writer does one coordinator round trip for a whole sequential
  pass over the image;
* two writers on disjoint halves split the image once and then stop
  talking to the coordinator;
* two writers on the same extents hand the locks back and forth with
  correct data (every read through an extlock node sees whole writes) and
  the coordinator's invariant checker (--debug-checks) stays quiet;
* a revoked lock is given back only after the requests in flight under it
  are done, and only then is the waiter granted;
* lock-cache=off makes every request a round trip; a reader on another
  host makes a cached exclusive lock be downgraded, not dropped.

The images are local files (the NFS export is covered by the other test
files, and only one NFS server can run on a machine at a time).  I/O goes
through NBD exports of qemu-storage-daemon processes, with qemu-io or
with harness.faults.NbdClient where a test needs to time or pipeline
requests itself.  Counters and lock state come from query-extent-locks
and from the coordinator's status.
"""

import threading
import time

import pytest

from harness import procs as hp
from harness.coordinator import coordinator_status
from harness.faults import (NbdClient, check_coordinator, counters, diagnose,
                            node_info, start_coordinator)
from harness.patterns import check_uniform_extents, extent_summary
from harness.procs import extlock_node, wait_until

KiB = 1024
MiB = 1024 * KiB
IMAGE = 64 * MiB            # conftest's image size


# ---------------------------------------------------------------------------
# helpers

@pytest.fixture
def coord(procs, binaries):
    """Start coordinators (--debug-checks) with extra options; after the
    test each must still run, exit cleanly and never have tripped its
    invariant checker."""
    binaries("extlockd", "qemu-storage-daemon")
    made = []

    def start(**kw):
        d = start_coordinator(procs, name=f"extlockd{len(made)}", **kw)
        made.append(d)
        return d
    yield start
    for d in made:
        check_coordinator(d)


def direct(image):
    """The image opened with O_DIRECT: overlapping writes to a local file
    are then not serialised by the page cache, so torn writes would show."""
    return dict(image.child, cache={"direct": True})


def qsd(procs, name, child, coordinator, lock_space, client_id, **opts):
    """A qemu-storage-daemon with extlock node "xl0" exported as "disk"."""
    return procs.storage_daemon(
        name=name,
        blockdevs=[extlock_node(child, coordinator, lock_space, node_name="xl0",
                                client_id=client_id, **opts)],
        exports=[("disk", "xl0", True)])


def space_status(daemon, lock_space):
    for sp in coordinator_status(daemon.address)["lock-spaces"]:
        if sp["name"] == lock_space:
            return sp
    return None


def coordinator_held(daemon, lock_space):
    sp = space_status(daemon, lock_space)
    return sorted((h["client-id"], h["offset"], h["length"], h["mode"])
                  for h in (sp["held"] if sp else []))


def held_summary(qmp):
    return [(h["offset"], h["length"], h["mode"], h["state"], h["in-flight"])
            for h in node_info(qmp)["held"]]


# ---------------------------------------------------------------------------
# a lone writer

def test_lone_writer_one_round_trip(local_image, coord, lock_space, procs, binaries):
    """64 MiB of sequential 64 KiB writes from one host: the first request
    is granted grown to the whole image, every later one is a cache hit.
    The qemu-io NBD client issues exactly these 1024 writes (no reads, no
    block status), so requests == 1 and cache-hits == 1023 exactly."""
    binaries("qemu-io", "extlockctl")
    d = coord()
    q = qsd(procs, "lone", local_image.child, d.coordinator(), lock_space, "lone")
    n = IMAGE // (64 * KiB)
    cmds = [f"write -q -P 0x5c {i * 64 * KiB} 64k" for i in range(n)]
    r = hp.run_qemu_io(q.nbd_opts("disk"), cmds, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr

    info = node_info(q.qmp)
    c = info["counters"]
    assert c["requests"] == 1, c
    assert c["grants"] == 1, c
    assert c["cache-hits"] == n - 1, c
    assert c["waits"] == 0 and c["revocations"] == 0 and c["errors"] == 0, c
    assert [(h["offset"], h["length"], h["mode"], h["state"], h["in-flight"])
            for h in info["held"]] == [(0, IMAGE, "exclusive", "cached", 0)]

    # the coordinator agrees: one lock over the whole image, one request,
    # grown from the 64 KiB that was asked for
    sp = space_status(d, lock_space)
    assert [(h["client-id"], h["offset"], h["length"], h["mode"], h["token"])
            for h in sp["held"]] == [("lone", 0, IMAGE, "exclusive",
                                      info["held"][0]["token"])]
    assert sp["counters"]["requests"] == 1, sp["counters"]
    assert sp["counters"]["grown-grants"] == 1, sp["counters"]
    assert sp["waiting"] == []
    ctl = d.ctl("locks")
    assert ctl.returncode == 0, ctl.stdout + ctl.stderr
    rows = [line.split() for line in ctl.stdout.splitlines() if lock_space in line.split()]
    assert len(rows) == 1 and "lone" in rows[0] and "exclusive" in rows[0] \
        and str(IMAGE) in rows[0], ctl.stdout

    data = local_image.path.read_bytes()
    assert data == b"\x5c" * IMAGE


# ---------------------------------------------------------------------------
# two writers on disjoint halves

def test_disjoint_halves_stop_talking(local_image, coord, lock_space, procs, binaries):
    """A writes only the first half, B only the second, in alternating
    rounds (A's first round first, so A holds the whole image when B
    starts).  B's first request revokes A's lock; A has used only the
    first half, so it gives back [32M, 64M) and keeps [0, 32M); B is
    granted [32M, 64M).  From then on neither node needs the coordinator:
    more rounds change neither node's 'requests' nor 'revocations'."""
    d = coord()
    a = qsd(procs, "a", direct(local_image), d.coordinator(), lock_space, "host-a")
    b = qsd(procs, "b", direct(local_image), d.coordinator(), lock_space, "host-b")
    half = IMAGE // 2
    nodes = {"host-a": (a, 0), "host-b": (b, half)}
    last = {}
    rounds, warmup, per_round = 6, 2, 16
    history = []
    with NbdClient(a.nbd_path, "disk") as na, NbdClient(b.nbd_path, "disk") as nb:
        conns = {"host-a": na, "host-b": nb}
        for rnd in range(rounds):
            for cid, (q, base) in nodes.items():
                pattern = (0x40 if cid == "host-a" else 0x80) + rnd
                for i in range(per_round):
                    # spread over the whole half, different places each round
                    off = base + i * (half // per_round) + rnd * 64 * KiB
                    try:
                        conns[cid].write(off, bytes([pattern]) * (64 * KiB), timeout=15)
                    except TimeoutError:
                        pytest.fail(f"round {rnd}: {cid}'s write at {off:#x} did not "
                                    f"complete in 15 s\n"
                                    + diagnose(d, lock_space, {"a": a, "b": b}))
                    last[off] = pattern
            history.append({cid: dict(counters(q.qmp)) for cid, (q, _) in nodes.items()})

    after_warmup = history[warmup - 1]
    for cid in nodes:
        final = history[-1][cid]
        for key in ("requests", "revocations", "grants", "waits"):
            assert final[key] == after_warmup[cid][key], \
                (f"{cid}: {key} went from {after_warmup[cid][key]} after round "
                 f"{warmup} to {final[key]} after round {rounds}:\n"
                 + "\n".join(str(h[cid]) for h in history))
        assert final["errors"] == 0, final
    # the split happened once: A revoked once, each asked the coordinator
    # for its half once
    assert history[-1]["host-a"]["revocations"] == 1, history[-1]
    assert history[-1]["host-b"]["revocations"] == 0, history[-1]
    assert history[-1]["host-a"]["requests"] == 1, history[-1]
    assert history[-1]["host-b"]["requests"] == 1, history[-1]
    assert coordinator_held(d, lock_space) == [("host-a", 0, half, "exclusive"),
                                               ("host-b", half, half, "exclusive")]
    data = local_image.path.read_bytes()
    for off, pattern in last.items():
        assert extent_summary(data[off:off + 64 * KiB]) == {pattern: 64 * KiB}, hex(off)


# ---------------------------------------------------------------------------
# two writers on the same extents

def test_same_extents_alternating_writers(local_image, coord, lock_space, procs,
                                          binaries):
    """A and B write their own patterns over the same 8 extents, many
    rounds, several writes in flight each (pipelined over NBD), while a
    reader on each host reads the extents through its extlock node.  Every
    read must be uniformly one pattern (a write seen half done would show
    two); afterwards every extent is uniformly the last pattern of one of
    the writers.  The locks move between the hosts by revocation, so both
    count revocations, and the coordinator (--debug-checks) never aborts."""
    d = coord()
    a = qsd(procs, "a", direct(local_image), d.coordinator(), lock_space, "host-a")
    b = qsd(procs, "b", direct(local_image), d.coordinator(), lock_space, "host-b")
    extents, size, rounds = 8, 256 * KiB, 30
    base = 8 * MiB + 12288          # not aligned to the extent size
    patterns = {"host-a": [0x40 + r for r in range(rounds)],
                "host-b": [0x80 + r for r in range(rounds)]}
    written = {p for ps in patterns.values() for p in ps}
    errors, reads = [], []
    stop = threading.Event()

    def writer(q, cid):
        try:
            with NbdClient(q.nbd_path, "disk") as n:
                for r in range(rounds):
                    order = list(range(extents))
                    if (r % 2 == 0) == (cid == "host-b"):
                        order.reverse()
                    handles = [n.send_write(base + i * size, bytes([patterns[cid][r]]) * size)
                               for i in order]
                    for h in handles:
                        err, _ = n.wait(h, timeout=30)
                        if err:
                            errors.append(f"{cid} round {r}: write failed, errno {err}")
        except Exception as e:                      # noqa: BLE001
            errors.append(f"{cid}: {e!r}")

    def reader(q, cid):
        try:
            with NbdClient(q.nbd_path, "disk") as n:
                while not stop.is_set():
                    for i in range(extents):
                        data = n.read(base + i * size, size, timeout=30)
                        s = extent_summary(data)
                        reads.append((cid, i, s))
        except Exception as e:                      # noqa: BLE001
            errors.append(f"reader {cid}: {e!r}")

    writers = [threading.Thread(target=writer, args=(q, cid))
               for q, cid in ((a, "host-a"), (b, "host-b"))]
    readers = [threading.Thread(target=reader, args=(q, cid))
               for q, cid in ((a, "host-a"), (b, "host-b"))]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(timeout=120)
    stop.set()
    for t in readers:
        t.join(timeout=60)
    hung = [t for t in writers + readers if t.is_alive()]
    assert not hung and not errors, \
        f"I/O failed or did not complete: {errors}\n" \
        + diagnose(d, lock_space, {"a": a, "b": b})

    torn = [(cid, i, s) for cid, i, s in reads
            if len(s) != 1 or next(iter(s)) not in written | {0}]
    assert not torn, f"{len(torn)} of {len(reads)} reads not one whole write: {torn[:5]}"
    assert len(reads) >= 2 * extents, reads     # the readers did read

    finals = {patterns["host-a"][-1], patterns["host-b"][-1]}
    got, problems = check_uniform_extents(local_image.path, size, extents, finals,
                                          offset=base)
    assert not problems, problems
    # nothing outside the extents was touched
    data = local_image.path.read_bytes()
    assert data[:base] == bytes(base)
    end = base + extents * size
    assert data[end:end + MiB] == bytes(MiB)

    ca, cb = counters(a.qmp), counters(b.qmp)
    assert ca["revocations"] > 0 and cb["revocations"] > 0, (ca, cb)
    assert ca["errors"] == 0 and cb["errors"] == 0, (ca, cb)
    sp = space_status(d, lock_space)
    assert sp["counters"]["revokes-sent"] > 0, sp["counters"]
    assert d.alive(), d.stderr()


# ---------------------------------------------------------------------------
# revocation while a request is in flight under the revoked lock

def test_revocation_waits_for_request_in_flight(local_image, coord, lock_space,
                                                procs, binaries):
    """A (qemu-system-x86_64, HMP qemu-io) writes [0, 64k) with a blkdebug
    breakpoint below its extlock node: the write is suspended while A
    holds its (grown, exclusive) lock.  B then writes [32k, 96k): B waits,
    A's lock is 'revoking' with one request in flight.  Only when A's write
    is resumed and completes does A give the lock back and B get it, so
    B's write lands after A's: [0, 32k) is A's, [32k, 96k) is B's."""
    binaries("qemu-system-x86_64")
    d = coord()
    drive = hp.dotted(extlock_node(hp.blkdebug_child(local_image.child),
                                   d.coordinator(), lock_space, node_name="xla",
                                   client_id="host-a"))
    vm = procs.qemu_system(name="a", extra_args=["-drive", f"if=none,id=drva,{drive}"])

    def io(cmd):
        out = vm.qmp.hmp(f'qemu-io drva "{cmd}"')
        assert "error" not in out.lower() and "failed" not in out.lower(), out
        return out

    io("break write_aio hold")
    io("aio_write -P 0xaa 0 64k")
    io("wait_break hold")
    held = node_info(vm.qmp)["held"]
    assert [(h["offset"], h["length"], h["mode"], h["state"], h["in-flight"])
            for h in held] == [(0, IMAGE, "exclusive", "active", 1)], held

    b = qsd(procs, "b", local_image.child, d.coordinator(), lock_space, "host-b")
    with NbdClient(b.nbd_path, "disk") as nb:
        t_sent = time.monotonic()
        h = nb.send_write(32 * KiB, b"\xbb" * (64 * KiB))
        # listed from the moment it is sent; queued once the coordinator
        # answered "waiting" (then it has a token and its blockers)
        w = wait_until(lambda: [x for x in node_info(b.qmp)["waiting"] if "token" in x],
                       timeout=10, what="B's write to be queued")
        assert [(x["offset"], x["length"], x["mode"], x["blocked-by"]) for x in w] == \
            [(32 * KiB, 64 * KiB, "exclusive", ["host-a"])]
        revoking = wait_until(
            lambda: [x for x in node_info(vm.qmp)["held"] if x["state"] == "revoking"],
            timeout=10, what="A's lock to be revoked")
        assert [(x["offset"], x["length"], x["mode"], x["in-flight"]) for x in revoking] == \
            [(0, IMAGE, "exclusive", 1)]
        # B stays queued while A's write is suspended: watch B's own wait
        # clock pass 500 ms (observable state, not a sleep)
        def waited_500ms():
            assert not nb.replied(h), "B's write completed while A's write held the lock"
            q = [x for x in node_info(b.qmp)["waiting"] if "token" in x]
            assert q, "B's write left the queue while A's write held the lock"
            return q[0]["waited-ms"] >= 500
        wait_until(waited_500ms, timeout=15, what="B's wait to reach 500 ms")
        assert not nb.replied(h), "B's write completed while A's write held the lock"
        assert node_info(vm.qmp)["held"][0]["state"] == "revoking"
        assert local_image.path.read_bytes()[:96 * KiB] == bytes(96 * KiB)

        t_resume = time.monotonic()
        io("resume hold")
        err, _ = nb.wait(h, timeout=20)
        t_done = time.monotonic()
        assert err == 0
    assert t_done > t_resume
    data = local_image.path.read_bytes()
    assert data[:32 * KiB] == b"\xaa" * (32 * KiB)
    assert data[32 * KiB:96 * KiB] == b"\xbb" * (64 * KiB)

    ca, cb = counters(vm.qmp), counters(b.qmp)
    assert ca["revocations"] == 1, ca
    # the revocation waited for the suspended write: at least the 0.5 s above
    assert ca["revocation-max-us"] >= 500000, ca
    assert cb["waits"] == 1 and cb["total-wait-us"] >= (t_resume - t_sent) * 1e6 * 0.9, cb
    # A used [0, 64k), B wanted [32k, 96k): A gave the whole lock back
    assert node_info(vm.qmp)["held"] == []
    assert coordinator_held(d, lock_space) == [("host-b", 0, IMAGE, "exclusive")]


# ---------------------------------------------------------------------------
# lock-cache=off, and downgrades

def test_lock_cache_off_round_trip_per_request(local_image, coord, lock_space, procs,
                                               binaries):
    """Without the lock cache every request is one coordinator round trip
    for exactly the request's range, given back when it completes."""
    d = coord()
    q = qsd(procs, "a", local_image.child, d.coordinator(), lock_space, "host-a",
            lock_cache=False)
    writes, reads = 40, 40
    with NbdClient(q.nbd_path, "disk") as n:
        for i in range(writes):
            n.write(i * 64 * KiB, bytes([0x10 + i]) * (64 * KiB))
        for i in range(reads):
            assert n.read(i * 64 * KiB, 64 * KiB) == bytes([0x10 + i]) * (64 * KiB)
    info = node_info(q.qmp)
    c = info["counters"]
    assert info["lock-cache"] is False
    assert c["requests"] == writes + reads, c
    assert c["grants"] == writes + reads, c
    assert c["cache-hits"] == 0, c
    assert info["held"] == []
    sp = space_status(d, lock_space)
    assert sp["counters"]["requests"] == writes + reads, sp["counters"]
    assert sp["counters"]["grown-grants"] == 0, sp["counters"]
    assert sp["counters"]["releases"] == writes + reads, sp["counters"]
    assert sp["held"] == []


def test_reader_downgrades_cached_exclusive(local_image, coord, lock_space, procs,
                                            binaries):
    """A writes and keeps an exclusive lock over the whole image.  A read
    by B makes A downgrade it to shared (same lock, same token): B reads
    A's data, and A keeps reading from its cache.  A's next write needs
    the exclusive lock back: B's shared lock is revoked and B then reads
    A's new data (a second downgrade).  A keeps locks over ranges B took
    from it (lock-cache-contended=on): by default it would give its new
    exclusive lock back after the write, B having read there less than a
    second before, and B's read would need no downgrade (that give-back is
    test_lock_cache.py's test_contended_lock_given_back_after_use)."""
    d = coord()
    a = qsd(procs, "a", local_image.child, d.coordinator(), lock_space, "host-a",
            lock_cache_contended=True)
    b = qsd(procs, "b", local_image.child, d.coordinator(), lock_space, "host-b")
    with NbdClient(a.nbd_path, "disk") as na, NbdClient(b.nbd_path, "disk") as nb:
        na.write(0, b"\x61" * MiB)
        before = node_info(a.qmp)["held"]
        assert [(h["offset"], h["length"], h["mode"]) for h in before] == \
            [(0, IMAGE, "exclusive")]

        assert nb.read(64 * KiB, 64 * KiB, timeout=15) == b"\x61" * (64 * KiB)
        ia = node_info(a.qmp)
        assert ia["counters"]["downgrades"] == 1, ia["counters"]
        assert [(h["offset"], h["length"], h["mode"], h["token"], h["state"])
                for h in ia["held"]] == \
            [(0, IMAGE, "shared", before[0]["token"], "cached")]
        assert [h[2] for h in held_summary(b.qmp)] == ["shared"]
        assert sorted(x[3] for x in coordinator_held(d, lock_space)) == ["shared", "shared"]

        # A reads under its shared lock: no round trip
        req = ia["counters"]["requests"]
        assert na.read(0, 64 * KiB) == b"\x61" * (64 * KiB)
        assert counters(a.qmp)["requests"] == req

        # A writes again: exclusive needed, B's shared lock goes
        try:
            na.write(64 * KiB, b"\x62" * (64 * KiB), timeout=15)
        except TimeoutError:
            pytest.fail("A's write after the downgrade did not complete:\n"
                        + diagnose(d, lock_space, {"a": a, "b": b}))
        cb = counters(b.qmp)
        assert cb["revocations"] >= 1, cb
        assert nb.read(64 * KiB, 64 * KiB, timeout=15) == b"\x62" * (64 * KiB)
        ca = counters(a.qmp)
        assert ca["downgrades"] == 2, ca
        assert ca["errors"] == 0 and cb["errors"] == 0
