"""Self-tests of the nemesis history checker on hand-made histories.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Each anomaly the checker claims to find is built here by hand and must be
reported; the serial history next to it must not be.  Run:
    /usr/bin/python3 -m pytest -q tests/nemesis/test_checker.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import checker                      # noqa: E402
from workload import GARBAGE        # noqa: E402

# extent 0: sectors 0-3, extent 1: sectors 2-5 (overlap on 2-3)
EXT = {0: (0, 4), 1: (2, 4)}


def w(writer, seq, ext, start, end, status="ok", host="h1"):
    first, n = EXT[ext]
    return {"op": "write", "host": host, "writer": writer, "seq": seq, "ext": ext,
            "first": first, "n": n, "start": start, "end": end, "status": status}


def r(ext, start, end, seen, host="h2"):
    first, n = EXT[ext]
    return {"op": "read", "host": host, "writer": 99, "ext": ext, "first": first,
            "n": n, "start": start, "end": end, "status": "ok", "seen": seen}


def st(writer, seq, ext, sector):
    return (writer, seq, ext, sector - EXT[ext][0])


def image(*layers):
    """Final image of 8 sectors: apply (writer, seq, ext) writes in order."""
    img = [0] * 8
    for writer, seq, ext in layers:
        first, n = EXT[ext]
        for s in range(first, first + n):
            img[s] = st(writer, seq, ext, s)
    return img


def kinds(ops, final, failures=None, storage=None, incarnations=None):
    v = checker.check_all(ops, final, 0, failures or {}, storage or {},
                          incarnations or {})
    return checker.summarize(v)


def test_serial_history_is_clean():
    ops = [w(1, 1, 0, 0, 10), w(2, 1, 1, 20, 30),
           r(0, 40, 50, [st(1, 1, 0, 0), st(1, 1, 0, 1), st(2, 1, 1, 2), st(2, 1, 1, 3)])]
    assert kinds(ops, image((1, 1, 0), (2, 1, 1))) == {}


def test_concurrent_writes_either_order_is_clean():
    ops = [w(1, 1, 0, 0, 30), w(2, 1, 1, 10, 40)]
    assert kinds(ops, image((2, 1, 1), (1, 1, 0))) == {}
    assert kinds(ops, image((1, 1, 0), (2, 1, 1))) == {}


def test_lost_acknowledged_write():
    # w2 started after w1 was acknowledged, yet w1 is on top
    ops = [w(1, 1, 0, 0, 10), w(2, 1, 1, 20, 30)]
    # sectors 2 and 3, seen once per final extent (0 and 1)
    assert kinds(ops, image((2, 1, 1), (1, 1, 0))) == {"stale-read": 4}


def test_mixed_final_extent():
    ops = [w(1, 1, 0, 0, 30), w(2, 1, 1, 10, 40)]
    img = image((1, 1, 0), (2, 1, 1))
    img[2] = st(1, 1, 0, 2)            # sector 2 from w1, sector 3 from w2
    assert "mixed-extent" in kinds(ops, img)


def test_torn_read_of_running_write():
    ops = [w(1, 1, 0, 0, 100), r(0, 10, 20, [st(1, 1, 0, 0), st(1, 1, 0, 1), 0, 0])]
    assert kinds(ops, image((1, 1, 0))) == {"torn-read": 2}


def test_partial_write_of_killed_host_is_allowed_after_death():
    ops = [w(1, 1, 0, 0, None, status="lost"),
           r(0, 200, 210, [st(1, 1, 0, 0), st(1, 1, 0, 1), 0, 0])]
    img = image((1, 1, 0))
    img[2] = img[3] = 0
    assert kinds(ops, img, failures={"h1": [100]}) == {}
    # without the death, the same read is torn
    assert "torn-read" in kinds(ops, img)


def test_stale_read_and_future_read_and_garbage():
    ops = [w(1, 1, 0, 0, 10), w(1, 2, 0, 20, 30),
           r(0, 40, 50, [st(1, 1, 0, s) for s in range(4)]),
           r(0, 1, 2, [st(1, 2, 0, s) for s in range(4)])]
    got = kinds(ops, image((1, 1, 0), (1, 2, 0)))
    assert got["stale-read"] == 4 and got["future-read"] == 4
    got = kinds([w(1, 1, 0, 0, 10)], [GARBAGE] + image((1, 1, 0))[1:])
    assert got["garbage"] == 1


def test_late_write_of_dead_host_over_newer_write():
    # h1's write never completed; h1 died at 100; h2 wrote at 200-210;
    # h1's write landing afterwards shows up on top: stale
    ops = [w(1, 1, 0, 0, None, status="lost"), w(2, 1, 0, 200, 210, host="h2")]
    got = kinds(ops, image((2, 1, 0), (1, 1, 0)), failures={"h1": [100]})
    assert got.get("stale-read") == 4


def test_storage_write_after_death():
    storage = {"h1": [{"event": "connect", "conn": 1, "ts": 5},
                      {"event": "write", "conn": 1, "offset": 0, "count": 512,
                       "fwd": 150, "reply": 160}]}
    got = kinds([], [0] * 8, storage=storage, incarnations={"h1": [(1, 0, 100)]})
    assert got == {"stale-storage-write": 1}


def test_lock_violation_from_event_log():
    storage = {"h1": [{"event": "write", "conn": 1, "offset": 0, "count": 512,
                       "fwd": 150, "reply": 160}]}
    events = [{"ts": 100, "event": "grant", "client-id": "h2", "lock": 1,
               "offset": 0, "length": 4096, "mode": "exclusive"},
              {"ts": 200, "event": "release", "client-id": "h2", "lock": 1}]
    v = checker.check_all([], [0] * 8, 0, {}, storage, {}, events, 4096)
    assert checker.summarize(v) == {"lock-violation": 1}
    events[0]["ts"] = 170
    v = checker.check_all([], [0] * 8, 0, {}, storage, {}, events, 4096)
    assert v == []


TRACE = """\
123@1.000:extlock_io_start node xl write offset 0 bytes 4096 lock 1 token 0x10000000001 ts 100
123@1.000:extlock_io_done node xl write offset 0 bytes 4096 token 0x10000000001 ret 0 ts 200
"""


def test_trace_overlap_and_tokens():
    a = checker.parse_trace(TRACE.splitlines())
    b = checker.parse_trace(TRACE.replace("ts 100", "ts 150").replace("ts 200", "ts 250")
                            .replace("0x10000000001", "0x10000000002").splitlines())
    assert a == [("write", 0, 4096, 0x10000000001, 100, 200, 0)]
    got = checker.check_trace({("h1", 1): a, ("h2", 1): b})
    assert [v["kind"] for v in got] == ["trace-overlap"]
    later = [(k, o, n, t, s + 200, e + 200, r) for k, o, n, t, s, e, r in b]
    assert checker.check_trace({("h1", 1): a, ("h2", 1): later}) == []
    events = [{"ts": 90, "event": "grant", "client-id": "h1", "token": 0x10000000001},
              {"ts": 210, "event": "release", "client-id": "h1", "token": 0x10000000001},
              {"ts": 300, "event": "grant", "client-id": "h2", "token": 0x10000000002}]
    got = checker.check_trace({("h1", 1): a, ("h2", 1): later}, events)
    # h2's request started at 350 > 300: fine; h1's ran within [90, 210]
    assert got == []
    events[1]["ts"] = 150                   # released while in flight
    got = checker.check_trace({("h1", 1): a, ("h2", 1): later}, events)
    assert [v["kind"] for v in got] == ["trace-token"]


def test_trace_fenced_host():
    """A request of a host whose storage path was cut (fence-off) ends at
    the cut; one started while the path was cut is no I/O at all.  Without
    the cut both are overlaps."""
    a = [("write", 0, 4096, 0x10000000001, 100, None, None)]   # never done
    b = [("write", 0, 4096, 0x10000000002, 300, 400, 0)]
    death = {("h1", 1): 1000}
    got = checker.check_trace({("h1", 1): a, ("h2", 1): b}, death=death)
    assert [v["kind"] for v in got] == ["trace-overlap"]
    got = checker.check_trace({("h1", 1): a, ("h2", 1): b}, death=death,
                              fenced={"h1": [(200, 900)]})
    assert got == []
    late = [("write", 0, 4096, 0x10000000001, 350, 380, -5)]  # while cut
    got = checker.check_trace({("h1", 1): late, ("h2", 1): b})
    assert [v["kind"] for v in got] == ["trace-overlap"]
    got = checker.check_trace({("h1", 1): late, ("h2", 1): b},
                              fenced={"h1": [(200, 900)]})
    assert got == []


def test_unanswered_write_bounded_by_replied_by():
    """A write the server got but whose answer never reached its host is
    assumed to run up to max(1 s, 10x the slowest answer) after it was
    forwarded - unless the relay found the server's answer in its socket
    when the fence cut the path ("replied-by"): then it ended before that.
    The nemesis seed-7 run had such a write (host held, then fenced) 2.3 s
    before another host's grant."""
    fwd = 10**9
    storage = {"h1": [{"event": "write", "conn": 1, "offset": 0, "count": 512,
                       "fwd": fwd, "reply": None, "reset": True}]}
    events = [{"ts": fwd + 5 * 10**8, "event": "grant", "client-id": "h2", "lock": 1,
               "offset": 0, "length": 4096, "mode": "shared"},
              {"ts": fwd + 6 * 10**8, "event": "release", "client-id": "h2", "lock": 1}]
    v = checker.check_all([], [0] * 8, 0, {}, storage, {}, events, 4096)
    assert checker.summarize(v) == {"lock-violation": 1}
    storage["h1"][0]["replied-by"] = fwd + 4 * 10**8    # answered before the grant
    v = checker.check_all([], [0] * 8, 0, {}, storage, {}, events, 4096)
    assert v == []
    storage["h1"][0]["replied-by"] = fwd + 55 * 10**7   # answered during it
    v = checker.check_all([], [0] * 8, 0, {}, storage, {}, events, 4096)
    assert checker.summarize(v) == {"lock-violation": 1}


def test_trace_token_partial_release():
    """A token whose lock was given back in part still covers the bytes
    not given back (the seed-7 run: host1 read [113152, +3072) under a
    shared lock [110592, +53248) of which three other parts had been
    released).  A request on a released part, or one that ends after its
    bytes were released, is still reported."""
    tok = 0x10000000001
    events = [{"ts": 90, "event": "grant", "client-id": "h1", "token": tok,
               "offset": 0, "length": 8192, "mode": "shared"},
              {"ts": 150, "event": "release", "client-id": "h1", "token": tok,
               "offset": 4096, "length": 4096, "mode": "shared"}]
    kept = [("read", 0, 4096, tok, 200, 250, 0)]
    gone = [("read", 4096, 512, tok, 200, 250, 0)]
    across = [("read", 0, 4096, tok, 100, 160, 0), ("read", 3584, 1024, tok, 100, 160, 0)]
    assert checker.check_trace({("h1", 1): kept}, events) == []
    got = checker.check_trace({("h1", 1): gone}, events)
    assert [v["kind"] for v in got] == ["trace-token"]
    got = checker.check_trace({("h1", 1): across}, events)
    assert [(v["kind"], v["offset"]) for v in got] == [("trace-token", 3584)]
    events.append({"ts": 240, "event": "release", "client-id": "h1", "token": tok,
                   "offset": 0, "length": 4096, "mode": "shared"})
    got = checker.check_trace({("h1", 1): kept}, events)
    assert [v["kind"] for v in got] == ["trace-token"]


def seed7_host2_killed(write):
    """The nemesis seed-7 CI run (clean clone, load ~15-20 on 2 cores),
    times in ns as logged: host2 (gen1) held an exclusive lock on
    [81920, +28672); its 8 KiB WRITE at 83968 was handed to ganesha at
    `fwd`; the nemesis killed host2 1 ms later, the relay saw the host side
    close 5.3 ms after `fwd`; the coordinator expired host2's session
    (25749706977578), fenced it (fence-start 25749711799954, the relay's
    fence-off 25750392640225, fence-ok 25750465082436), released its
    locks and granted host1 a shared lock on [69632, +49152) at
    25750465176363, 2.65 s after the WRITE reached ganesha, released
    17.6 ms later.  The slowest answer of the run (418.5 ms) makes the
    checker's window for an unanswered request 4.185 s."""
    fwd = 25747816227597
    storage = {
        "host2": [{"event": "connect", "conn": 2, "port": 2049, "ts": 25746295541413},
                  {"event": "disconnect", "conn": 2, "ts": 25747821543058},
                  dict({"event": "write", "conn": 2, "xid": 28761239, "offset": 83968,
                        "count": 8192, "fwd": fwd, "reply": None}, **write),
                  {"event": "fence-off", "by": "agent", "ts": 25750392640225}],
        "host3": [{"event": "write", "conn": 1, "offset": 45568, "count": 8192,
                   "fwd": 25834376982404, "reply": 25834376982404 + 418511419}]}
    s2, s1 = "7005e2aa", "f04ee31b"
    events = [{"ts": 25747700000000, "event": "grant", "client-id": "host2",
               "session": s2, "lock": 346, "offset": 81920, "length": 28672,
               "mode": "exclusive"},
              {"ts": 25749706977578, "event": "expire", "client-id": "host2", "session": s2},
              {"ts": 25749711799954, "event": "fence-start", "client-id": "host2",
               "session": s2},
              {"ts": 25750465082436, "event": "fence-ok", "client-id": "host2",
               "session": s2},
              {"ts": 25750465168999, "event": "release", "client-id": "host2",
               "session": s2, "lock": 346, "offset": 81920, "length": 28672,
               "mode": "exclusive"},
              {"ts": 25750465176363, "event": "grant", "client-id": "host1",
               "session": s1, "lock": 348, "offset": 69632, "length": 49152,
               "mode": "shared"},
              {"ts": 25750482799501, "event": "release", "client-id": "host1",
               "session": s1, "lock": 348, "offset": 69632, "length": 49152,
               "mode": "shared"}]
    incarnations = {"host2": [(1, 25746238073781, 25747821441136)]}
    v = checker.check_all([], [0] * 8, 0, {"host2": [25747821441136]}, storage,
                          incarnations, events, 4096, late_ns=25 * 10**8)
    return v


def test_seed7_killed_host_write_judged_by_relay_answer():
    """The case above.  As that run logged it (the relay closed its server
    side when host2's side closed, so no answer was seen) nothing bounds
    the WRITE: still reported, marked as resting on the window.  With the
    answer the relay now awaits after its host is gone ("replied-by"),
    here ganesha's 15 ms (the slowest answer of the other requests handed
    to it within 80 ms of this one), the WRITE had landed 2.6 s before
    host1's grant: clean.  An answer after the grant, or the WRITE handed
    to ganesha during host1's lock, is reported."""
    v = seed7_host2_killed({})
    assert checker.summarize(v) == {"lock-violation": 1}
    assert v[0]["holder"] == "host1" and v[0]["lock"] == [69632, 49152, "shared"]
    assert v[0]["end-by"].startswith("assumed")
    v = seed7_host2_killed({"replied-by": 25747816227597 + 15 * 10**6, "status": 0})
    assert v == []
    # answered only after host1's grant: may have landed under its lock
    v = seed7_host2_killed({"replied-by": 25750470000000, "status": 0})
    assert checker.summarize(v) == {"lock-violation": 1}
    assert v[0]["end-by"] == "replied-by"
    # the same WRITE handed to ganesha (and answered) during host1's lock:
    # it did reach the storage after the grant (and after host2's death +
    # lease + fence margin: a stale storage write too)
    v = seed7_host2_killed({"fwd": 25750470000000, "reply": 25750471000000,
                               "status": 0})
    assert checker.summarize(v) == {"lock-violation": 1, "stale-storage-write": 1}
    assert v[-1]["end-by"] == "reply"
