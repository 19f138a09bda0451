"""The QEMU driver on an HA coordinator: a coordinator list, not-leader
following, failover by kill -9 of the leader under stamped writes.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Real binaries: a 3-member etcd cluster and 3 extlockd replicas
(conftest.py), qemu-storage-daemon hosts with the extlock driver
(EXTLOCK_QEMU_BUILD, default build/qemu-10.0) whose node has
`coordinators` = the replicas' addresses, on-lease-loss=queue, and NBD
writers (qemuhosts.py).  Run inside scripts/isolate.sh like the other
QEMU tests; scripts/run-tests.sh runs this file after the QEMU builds.

Timing: etcd lease TTL T = HA_TTL_MS (2 s by default); a failover takes
about T (the dead leader's etcd lease must lapse) plus an election; the
nodes' coordinator lease is LEASE_MS = 20 s, far longer than a failover,
so the nodes normally keep their session and reclaim their locks at the
new leader (docs/design.rst, "High availability").  On a machine so
loaded that etcd itself loses its quorum for longer than that (seen with
a load average of 19), a node's lease may lapse: with on-lease-loss=queue
its requests still wait rather than fail, which is what the tests
assert; the session is then only required to be kept when the node
reported no lease loss.  Bounds below are derived
from T with generous slack for a loaded 2-core machine.
"""
import pytest

from conftest import HA_TTL_MS, wait_for
from qemuhosts import (MiB, KiB, NbdClient, ProcessGroup, Writer, binary,
                       check_image, current, ha_node, make_image, start_host)

TTL_S = HA_TTL_MS / 1000
# dead leader's etcd lease + election + reconnect round + reclaim, slack x4
FAILOVER_S = 4 * (TTL_S + 2)
IMAGE = 64 * MiB
LEASE_MS = 20000
EXT = 256 * KiB


@pytest.fixture
def procs(tmp_path):
    try:
        binary("qemu-storage-daemon")
    except Exception as e:                      # noqa: BLE001
        pytest.fail("QEMU build missing: %s" % e, pytrace=False)
    g = ProcessGroup(tmp_path)
    yield g
    g.stop_all()


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "shared.raw"
    make_image(p, IMAGE)
    return p


def on_leader(qmp, leader):
    i = current(qmp)
    return (i["state"] == "active" and i["connected"] and
            i["coordinator"] == leader.address) and i


def test_failover_kill9_leader_under_stamped_writes(ha, procs, image):
    """Two hosts write stamped extents - each its own and, in between,
    the same shared ones (locks move by revocation) - while the leader is
    killed with SIGKILL three times (the killed replica comes back as a
    follower each time).  Every write completes without an error, each
    node moves to the new leader with the same session (reclaimed, no
    lease loss), and no extent is torn or mixed.  Without the coordinator
    list (only the first address used) the nodes never reach the new
    leader and the writes stall (see the commit message)."""
    leader = ha.start(3)
    addrs = ha.addresses()
    hosts = {n: start_host(procs, n, image, addrs, "ls-failover",
                           lease_time=LEASE_MS, on_lease_loss="queue",
                           lease_loss_timeout=600000)
             for n in ("host-a", "host-b")}
    for q in hosts.values():
        i = wait_for(lambda q=q: on_leader(q.qmp, leader), 10, "on leader")
        assert i["coordinators"] == addrs, i
    sessions = {n: current(q.qmp)["session"] for n, q in hosts.items()}
    shared = [32 * MiB + i * EXT for i in range(8)]
    own = {"host-a": [i * EXT for i in range(8)],
           "host-b": [48 * MiB + i * EXT for i in range(8)]}
    ws = {n: Writer(q, base, [x for pair in zip(shared, own[n])
                               for x in pair], EXT)
          for (n, q), base in zip(hosts.items(), (0x10, 0x90))}
    for w in ws.values():
        w.start()
    try:
        for cycle in range(3):
            before = {n: w.done() for n, w in ws.items()}
            wait_for(lambda: all(w.done() >= before[n] + 8
                                 for n, w in ws.items()),
                     30, "writes before kill %d" % (cycle + 1))
            epoch = current(hosts["host-a"].qmp)["epoch"]
            t0 = leader.kill9()
            new = ha.wait_leader(timeout=FAILOVER_S, not_=leader)
            for n, q in hosts.items():
                i = wait_for(lambda q=q: on_leader(q.qmp, new), FAILOVER_S,
                             "%s on the new leader %s" % (n, new.name))
                assert (i["session"] == sessions[n] or
                        i["counters"]["lease-losses"] > 0), i
                assert i["epoch"] > epoch, i
                assert i["coordinators"] == addrs, i
            # I/O resumes: writes sent after the kill complete
            wait_for(lambda: all(w.first_sent_after(t0)
                                 for w in ws.values()),
                     FAILOVER_S, "writes after failover %d" % (cycle + 1))
            leader.start()
            leader = new
    finally:
        for w in ws.values():
            assert w.stop(), "writer hung"
    for n, w in ws.items():
        assert not w.errors, (n, w.errors)
        assert w.done() >= 24, (n, w.done())    # 8 per cycle, waited for
    for n, q in hosts.items():
        c = current(q.qmp)["counters"]
        assert c["errors"] == 0, (n, c)
        assert c["reconnects"] >= 3, (n, c)
        print("%s: %d writes, %d lease losses, %d reconnects"
              % (n, ws[n].done(), c["lease-losses"], c["reconnects"]))
        assert c["revocations"] > 0, (n, c)
    offs = shared + own["host-a"] + own["host-b"]
    problems = check_image(image, list(ws.values()), offs, EXT)
    assert not problems, problems[:5]


def test_follower_first_ends_on_leader(ha, procs, image):
    """A node whose list names only followers (the leader is not in it)
    reaches the leader through the followers' not-leader answers, and
    query-extent-locks shows the configured list and the leader."""
    leader = ha.start(3)
    followers = [r.address for r in ha.replicas if r is not leader]
    q = start_host(procs, "host-f", image, followers, "ls-follow")
    i = wait_for(lambda: on_leader(q.qmp, leader), 10, "on the leader")
    assert i["coordinators"] == followers, i
    # and its I/O goes through the leader
    w = Writer(q, 0x40, [0, EXT], EXT)
    w.start()
    wait_for(lambda: w.done() >= 4, 20, "writes")
    assert w.stop() and not w.errors, w.errors
    st = leader.status()
    assert any(s["client-id"] == "host-f" for s in st["sessions"]), st


def test_whole_list_dead_waits_and_reconnects(ha, procs, image):
    """Every replica killed: a write that needs a new lock waits (no
    error, on-lease-loss=queue); when one replica comes back it becomes
    the leader, the node reconnects to it and the write completes."""
    leader = ha.start(3)
    # lock-cache=off: every write needs a grant (a cached lock may have
    # grown over the whole image)
    q = start_host(procs, "host-w", image, ha.addresses(), "ls-dead",
                   lease_time=LEASE_MS, lock_cache=False,
                   on_lease_loss="queue", lease_loss_timeout=600000)
    wait_for(lambda: on_leader(q.qmp, leader), 10, "on the leader")
    with NbdClient(q.nbd_path, "disk", timeout=120) as n:
        err, _ = n.wait(n.send_write(0, b"\x11" * EXT), timeout=20)
        assert err == 0
        for r in ha.replicas:
            r.kill9()
        wait_for(lambda: current(q.qmp)["state"] != "active" or
                 not current(q.qmp)["connected"], 10, "the node to notice")
        # it needs a lock from the coordinator
        h = n.send_write(16 * MiB, b"\x22" * EXT)
        assert not n.replied(h, timeout=1.0), "a write completed " \
            "while every coordinator was dead"
        back = ha.replicas[1]
        back.start()
        wait_for(lambda: back.role() == "leader", FAILOVER_S,
                 "the restarted replica to lead")
        err, _ = n.wait(h, timeout=FAILOVER_S + 10)
        assert err == 0, err
    i = wait_for(lambda: on_leader(q.qmp, back), FAILOVER_S, "reconnected")
    assert i["counters"]["errors"] == 0, i
    with open(image, "rb") as f:
        f.seek(16 * MiB)
        assert f.read(EXT) == b"\x22" * EXT


def test_reopen_keeps_the_list(ha, procs, image):
    """blockdev-reopen of a node with `coordinators`: the same list with a
    changed tuning option is accepted; another list, or the single
    `coordinator` instead, is refused naming the option, and the node
    keeps its session and its list."""
    leader = ha.start(3)
    addrs = ha.addresses()
    opts = ha_node(image, addrs, "ls-reopen", "host-r")
    q = procs.storage_daemon(name="host-r", blockdevs=[opts],
                             exports=[("disk", "xl0", True)])
    before = wait_for(lambda: on_leader(q.qmp, leader), 10, "on the leader")
    q.qmp.execute("blockdev-reopen", {"options": [
        dict(opts, **{"lock-cache-size": 10})]})
    changed = [dict(opts, coordinators=list(reversed(opts["coordinators"])))]
    single = {k: v for k, v in opts.items() if k != "coordinators"}
    single["coordinator"] = opts["coordinators"][0]
    for new in (changed, [single]):
        e = q.qmp.execute_error("blockdev-reopen", {"options": new})
        assert "coordinator" in e.desc, e.desc
    after = current(q.qmp)
    assert after["session"] == before["session"], after
    assert after["coordinators"] == addrs and after["state"] == "active"
