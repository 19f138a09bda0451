"""EXTENT_LOCK_WAIT_TIMEOUT is rate-limited per node.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

A stuck holder makes every request behind it cross the node's
wait-warning-time; the node sends at most one event a second and the next
one counts those it left out (``left-out``).
"""

import time

from harness.coordinator import CoordinatorClient
from harness.faults import NbdClient, check_event, events_named
from harness.procs import extlock_node, wait_until

KiB = 1024
MiB = 1024 * KiB
WAIT_TIMEOUT = "EXTENT_LOCK_WAIT_TIMEOUT"
INTERVAL = 1.0          # the driver's EXTLOCK_WAIT_EVENT_INTERVAL_NS


def test_wait_timeout_events_rate_limited(local_image, extlockd, lock_space,
                                          procs, binaries):
    binaries("qemu-storage-daemon")
    q = procs.storage_daemon(
        name="qsd",
        blockdevs=[extlock_node(local_image.child, extlockd.coordinator(),
                                lock_space, node_name="xl",
                                client_id="host-a", lock_cache=False,
                                wait_warning_time=200)],
        exports=[("disk", "xl", True)])
    q.qmp.poll_events(0)
    q.qmp.events.clear()
    with CoordinatorClient(extlockd.address) as holder, \
            NbdClient(q.nbd_path, "disk") as n:
        holder.hello("stuck-holder", lock_space)
        g = holder.lock(0, MiB, "exclusive")
        # three writes behind the stuck holder cross the limit together
        handles = [n.send_write(i * 64 * KiB, bytes([i + 1]) * 4096)
                   for i in range(3)]
        wait_until(lambda: len(q.qmp.execute(
            "query-extent-locks")[0]["waiting"]) == 3, timeout=10,
            what="three writes waiting")
        first = q.qmp.wait_event(WAIT_TIMEOUT, timeout=10)
        t_first = time.monotonic()
        check_event(first, WAIT_TIMEOUT, node_name="xl", mode="exclusive",
                    blocked_by=["stuck-holder"])
        assert "left-out" not in first["data"]
        # the other two are left out (they crossed within the interval)
        assert events_named(q.qmp, WAIT_TIMEOUT, timeout=0.5) == []
        # a fourth write, sent once the interval has passed, is reported
        # and says how many were left out before it
        wait_until(lambda: time.monotonic() > t_first + INTERVAL,
                   timeout=INTERVAL + 1, interval=0.02,
                   what="the rate-limit interval to pass")
        handles.append(n.send_write(4 * 64 * KiB, b"\x04" * 4096))
        ev = q.qmp.wait_event(WAIT_TIMEOUT, timeout=10)
        check_event(ev, WAIT_TIMEOUT, node_name="xl", offset=4 * 64 * KiB,
                    length=4096, mode="exclusive",
                    blocked_by=["stuck-holder"])
        assert ev["data"]["left-out"] == 2, ev
        holder.unlock(g["lock"])
        for h in handles:
            err, _ = n.wait(h, timeout=10)
            assert err == 0
    assert events_named(q.qmp, WAIT_TIMEOUT, timeout=0.3) == []


def test_long_hold_event(local_image, extlockd, lock_space, procs, binaries):
    """The node keeps a lock the coordinator asked back (min-hold-time 3 s)
    longer than wait-warning-time (300 ms): EXTENT_LOCK_LONG_HOLD names the
    held extent, its token, how long it was held and asked back, and the
    waiting request's token; the waiter is granted once the node lets go."""
    binaries("qemu-storage-daemon")
    q = procs.storage_daemon(
        name="qsd",
        blockdevs=[extlock_node(local_image.child, extlockd.coordinator(),
                                lock_space, node_name="xl",
                                client_id="host-a", wait_warning_time=300,
                                min_hold_time=3000000)],
        exports=[("disk", "xl", True)])
    with CoordinatorClient(extlockd.address) as other, \
            NbdClient(q.nbd_path, "disk") as n:
        other.hello("other", lock_space)
        n.write(0, b"\x01" * 4096, timeout=10)
        held = q.qmp.execute("query-extent-locks")[0]["held"]
        assert len(held) == 1 and held[0]["mode"] == "exclusive", held
        q.qmp.poll_events(0)
        q.qmp.events.clear()
        t0 = time.monotonic()
        rid = other.request({"type": "lock", "offset": 0, "length": 4096,
                             "mode": "exclusive", "wait": True})
        waiting = other.reply(rid, accept_waiting=True)
        assert waiting["type"] == "waiting", waiting
        ev = q.qmp.wait_event("EXTENT_LOCK_LONG_HOLD", timeout=10)
        check_event(ev, "EXTENT_LOCK_LONG_HOLD", node_name="xl",
                    offset=held[0]["offset"], length=held[0]["length"],
                    mode="exclusive", token=held[0]["token"], in_flight=0)
        assert "left-out" not in ev["data"]
        assert ev["data"]["revoked-ms"] >= 300
        assert ev["data"]["held-ms"] >= ev["data"]["revoked-ms"]
        assert ev["data"]["waiter-token"] > held[0]["token"]
        if "token" in waiting:
            assert ev["data"]["waiter-token"] == waiting["token"]
        g = other.reply(rid, timeout=15)
        assert g["type"] == "granted"
        # min-hold-time (3 s from the node's grant) passed first
        assert time.monotonic() - t0 < 15
        assert ev["data"]["waiter-token"] == g["token"]
    # once per revocation
    assert events_named(q.qmp, "EXTENT_LOCK_LONG_HOLD", timeout=0.3) == []


def _long_hold_node(local_image, extlockd, lock_space, procs, **opts):
    """A node over @local_image exported over NBD, with its first write's
    lock kept 3 s (min-hold-time) so that a second client waits for it."""
    return procs.storage_daemon(
        name="qsd",
        blockdevs=[extlock_node(local_image.child, extlockd.coordinator(),
                                lock_space, node_name="xl",
                                client_id="host-a", min_hold_time=3000000,
                                **opts)],
        exports=[("disk", "xl", True)])


def _ask_back(q, extlockd, lock_space, other_id="other"):
    """Write once through @q, then make another client wait for that
    lock; return (held lock, seconds until the other client got it,
    events seen meanwhile)."""
    with CoordinatorClient(extlockd.address) as other, \
            NbdClient(q.nbd_path, "disk") as n:
        other.hello(other_id, lock_space)
        n.write(0, b"\x01" * 4096, timeout=10)
        held = q.qmp.execute("query-extent-locks")[0]["held"]
        assert len(held) == 1 and held[0]["mode"] == "exclusive", held
        q.qmp.poll_events(0)
        q.qmp.events.clear()
        t0 = time.monotonic()
        rid = other.request({"type": "lock", "offset": 0, "length": 4096,
                             "mode": "exclusive", "wait": True})
        assert other.reply(rid, accept_waiting=True)["type"] == "waiting"
        g = other.reply(rid, timeout=15)
        assert g["type"] == "granted"
        waited = time.monotonic() - t0
        other.unlock(g["lock"])
    q.qmp.poll_events(0)
    return held[0], waited, list(q.qmp.events)


def test_long_hold_time_own_threshold(local_image, extlockd, lock_space,
                                      procs, binaries):
    """long-hold-time is the threshold of EXTENT_LOCK_LONG_HOLD, apart from
    wait-warning-time: with the wait events off (wait-warning-time=0) the
    long hold is still reported after 300 ms."""
    binaries("qemu-storage-daemon")
    q = _long_hold_node(local_image, extlockd, lock_space, procs,
                        wait_warning_time=0, long_hold_time=300)
    held, waited, events = _ask_back(q, extlockd, lock_space)
    holds = [e for e in events if e["event"] == "EXTENT_LOCK_LONG_HOLD"]
    assert len(holds) == 1, events
    check_event(holds[0], "EXTENT_LOCK_LONG_HOLD", node_name="xl",
                offset=held["offset"], length=held["length"],
                mode="exclusive", token=held["token"], in_flight=0)
    assert 300 <= holds[0]["data"]["revoked-ms"] < waited * 1000
    assert [e for e in events if e["event"] == WAIT_TIMEOUT] == []


def test_long_hold_time_zero_turns_it_off(local_image, extlockd, lock_space,
                                          procs, binaries):
    """long-hold-time=0: no EXTENT_LOCK_LONG_HOLD although the lock is kept
    3 s after it was asked back and wait-warning-time (200 ms) would have
    reported it before the option existed."""
    binaries("qemu-storage-daemon")
    q = _long_hold_node(local_image, extlockd, lock_space, procs,
                        wait_warning_time=200, long_hold_time=0)
    _, waited, events = _ask_back(q, extlockd, lock_space)
    assert waited >= 1.0, waited        # the hold was long (min-hold-time)
    assert [e for e in events
            if e["event"] == "EXTENT_LOCK_LONG_HOLD"] == [], events


def test_long_hold_time_defaults_to_wait_warning_time(local_image, extlockd,
                                                      lock_space, procs,
                                                      binaries):
    """Without long-hold-time the threshold stays wait-warning-time, as
    before the option (test_long_hold_event covers the event's members);
    blockdev-reopen changes it like the other tuning options."""
    binaries("qemu-storage-daemon")
    q = _long_hold_node(local_image, extlockd, lock_space, procs,
                        wait_warning_time=300)
    _, _, events = _ask_back(q, extlockd, lock_space)
    assert len([e for e in events
                if e["event"] == "EXTENT_LOCK_LONG_HOLD"]) == 1, events
    node = extlock_node(local_image.child, extlockd.coordinator(), lock_space,
                        node_name="xl", client_id="host-a",
                        min_hold_time=3000000, wait_warning_time=300,
                        long_hold_time=0)
    q.qmp.execute("blockdev-reopen", {"options": [node]})
    _, waited, events = _ask_back(q, extlockd, lock_space, "other-2")
    assert waited >= 1.0, waited
    assert [e for e in events
            if e["event"] == "EXTENT_LOCK_LONG_HOLD"] == [], events


def test_long_hold_time_bad_values(local_image, extlockd, lock_space, procs,
                                   binaries):
    """Bad values are refused at open (and at reopen) with a clear error,
    and leave no node (and no coordinator session) behind."""
    from harness.coordinator import coordinator_status
    binaries("qemu-storage-daemon")
    q = procs.storage_daemon(name="qsd", blockdevs=[])

    def sessions():
        st = coordinator_status(extlockd.address)
        return sorted(c["client-id"] for c in st.get("sessions", []))
    before = sessions()
    for value, msg in [
            (86400001, "long-hold-time must be at most 86400000 ms"),
            (-1, "long-hold-time"),
            (1 << 32, "long-hold-time"),
            ("soon", "long-hold-time")]:
        node = extlock_node(local_image.child, extlockd.coordinator(),
                            lock_space, node_name="bad0",
                            long_hold_time=value)
        e = q.qmp.execute_error("blockdev-add", node)
        assert msg in e.desc, (value, e.desc)
        assert [n["node-name"] for n in q.qmp.execute(
            "query-named-block-nodes", {"flat": True})
            if n["node-name"] == "bad0"] == []
    assert sessions() == before
    # the largest value is fine; a bad one at reopen changes nothing
    node = extlock_node(local_image.child, extlockd.coordinator(), lock_space,
                        node_name="ok0", long_hold_time=86400000)
    q.qmp.execute("blockdev-add", node)
    node["long-hold-time"] = 86400001
    e = q.qmp.execute_error("blockdev-reopen", {"options": [node]})
    assert "long-hold-time must be at most 86400000 ms" in e.desc, e.desc
