# extlockd's lock metrics, long holder/waiter detection and extlockctl
# metrics/blockers, against a real extlockd.
# SPDX-License-Identifier: GPL-2.0-or-later
# Copyright (c) 2026 The extlock authors
import json
import subprocess

from conftest import EXTLOCKCTL, wait_for

BLK = 4096


def whole_events(d):
    """The event log's events; the daemon may be writing a line right now
    (one write(2) per line, which a reader can see half done): only whole
    lines count."""
    lines = d.event_log.read_text().splitlines(keepends=True)
    return [json.loads(x) for x in lines if x.endswith("\n") and x.strip()]


def request_waiting(c, offset, length, mode="exclusive"):
    """Send a lock request that must wait; return its id once the
    coordinator said "waiting"."""
    rid = c.request({"type": "lock", "offset": offset, "length": length,
                     "mode": mode, "wait": True})
    r = c.reply(rid, accept_waiting=True)
    assert r["type"] == "waiting", r
    return rid


def ctl(d, *args):
    p = subprocess.run([str(EXTLOCKCTL), "-c", d.address, *args],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_histograms_and_client_counts(extlockd):
    """A wait and two holds land in the right lock-space histograms and
    per-client counts, in status and in extlockctl."""
    d = extlockd()
    a, b = d.client("mon-a"), d.client("mon-b")
    ga = a.lock(0, BLK)
    rid = request_waiting(b, 0, BLK)
    # b waited at least as long as this status shows
    waited = wait_for(lambda: [w for s in d.status()["lock-spaces"]
                               for w in s["waiting"]
                               if w.get("waited-ms", 0) >= 20],
                      10, "b's wait to reach 20 ms")
    a.unlock(ga["lock"])
    gb = b.reply(rid)
    assert gb["type"] == "granted"
    b.unlock(gb["lock"])

    m = d.status()["metrics"]
    sp = m["lock-spaces"]["mon"]
    assert sp["grants"] == 2 and sp["waits"] == 1
    for h in (sp["wait-us"], sp["hold-us"]):
        assert h["count"] == 2
        assert sum(n for _, n in h["buckets"]) == 2
    # b's wait (>= 20 ms) is in a bucket whose bound is >= 20000 us, and
    # the sum covers it
    assert max(ub for ub, _ in sp["wait-us"]["buckets"]) >= 20000
    assert sp["wait-us"]["sum-us"] >= 20000
    # log2 bounds: every bucket bound is a power of two
    assert all(ub & (ub - 1) == 0 for ub, _ in sp["wait-us"]["buckets"])
    assert m["clients"]["mon-a"] == {"grants": 1, "waits": 0, "revokes": 0}
    assert m["clients"]["mon-b"] == {"grants": 1, "waits": 1, "revokes": 0}

    out = ctl(d, "metrics")
    assert "mon-a" in out and "mon-b" in out and "Lock-space metrics" in out
    j = json.loads(ctl(d, "--json", "metrics"))
    assert j["lock-spaces"]["mon"]["grants"] == 2
    assert "Client metrics" in ctl(d, "status")
    a.close()
    b.close()


def test_long_wait_and_hold_logged_and_blocker_chain(extlockd):
    """--long-wait-ms/--long-hold-ms: a log line naming waiter, holder,
    extent and durations, event-log entries, counters; extlockctl blockers
    shows the chain c -> b -> a."""
    d = extlockd("--long-wait-ms", "300", "--long-hold-ms", "600")
    a, b, c = d.client("hold-a"), d.client("mid-b"), d.client("wait-c")
    a.lock(0, BLK)
    b.lock(8 * BLK, BLK)
    request_waiting(b, 0, BLK)              # b waits for a
    request_waiting(c, 8 * BLK, BLK)        # c waits for b

    wait_for(lambda: "long wait in lock-space mon: wait-c" in d.log.read_text(),
             10, "the long-wait line of wait-c")
    log = d.log.read_text()
    line = [x for x in log.splitlines()
            if "long wait in lock-space mon: wait-c" in x][0]
    assert f"[{8 * BLK}, +{BLK}) exclusive" in line
    assert "held by mid-b" in line and " ms" in line
    line = [x for x in log.splitlines()
            if "long wait in lock-space mon: mid-b" in x][0]
    assert f"[0, +{BLK}) exclusive" in line and "held by hold-a" in line
    wait_for(lambda: "long hold in lock-space mon: hold-a" in d.log.read_text(),
             10, "the long-hold line of hold-a")
    # two more checks (one a second) after the crossing: no repeats
    wait_for(lambda: [w for sp in d.status()["lock-spaces"]
                      for w in sp["waiting"]
                      if w.get("client-id") == "wait-c" and
                      w.get("waited-ms", 0) >= 300 + 2200],
             10, "wait-c's wait to pass 2.5 s")
    events = whole_events(d)
    kinds = [(e["event"], e.get("client-id")) for e in events]
    assert ("long-wait", "wait-c") in kinds and ("long-wait", "mid-b") in kinds
    assert ("long-hold", "hold-a") in kinds
    # each crossing is reported once
    assert kinds.count(("long-wait", "wait-c")) == 1
    sp = d.status()["metrics"]["lock-spaces"]["mon"]
    assert sp["long-waits"] == 2 and sp["long-holds"] >= 1

    j = json.loads(ctl(d, "--json", "blockers"))
    chain = [h["client-id"] for h in j["chains"][0]]
    assert chain == ["wait-c", "mid-b", "hold-a"], j["chains"]
    assert "waited-ms" not in j["chains"][0][-1]       # the holder
    assert j["holders"][0]["client-id"] == "hold-a"     # held longest
    out = ctl(d, "blockers")
    assert "wait-c (waits" in out and "-> mid-b (waits" in out
    assert "-> hold-a (holds)" in out
    for x in (a, b, c):
        x.close()


def test_blockers_nobody_waits(extlockd):
    d = extlockd()
    assert "(nobody waits)" in ctl(d, "blockers")


def test_top_frames_and_rates(extlockd):
    """extlockctl top: one frame per interval; the second shows the grant
    rate of the traffic between the frames, and the waiter's chain."""
    import threading
    d = extlockd()
    a, b = d.client("top-a"), d.client("top-b")
    a.lock(0, BLK)
    request_waiting(b, 0, BLK)
    c = d.client("top-c")
    stop = threading.Event()

    def traffic():
        for _ in range(100000):                     # bounded
            if stop.is_set():
                break
            g = c.lock(BLK * 4, BLK)
            c.unlock(g["lock"])
    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        out = ctl(d, "top", "--interval", "1", "--iterations", "2")
    finally:
        stop.set()
        t.join(30)
    frames = out.split("Lock-spaces (rates since the last frame)")
    assert len(frames) == 3, out
    first = [x for x in frames[1].splitlines() if x.strip().startswith("mon ")]
    second = [x for x in frames[2].splitlines() if x.strip().startswith("mon ")]
    assert first[0].split()[4] == "-"               # no rate in frame 1
    assert float(second[0].split()[4]) > 0, second  # GRANTS/S
    assert "top-b (waits" in frames[2] and "-> top-a (holds)" in frames[2]
    for args in (["top", "--interval", "0"], ["top", "--iterations", "x"],
                 ["status", "--interval", "2"], ["--json", "top"]):
        p = subprocess.run([str(EXTLOCKCTL), "-c", d.address, *args],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, (args, p.stderr)
    for x in (a, b, c):
        x.close()


def test_long_wait_log_is_rate_limited(extlockd):
    """25 requests crossing --long-wait-ms within a few ms (in one check,
    or two if a check falls in between): at most 10 log lines per check
    and a summary of the rest; all 25 in the event log and the counter."""
    d = extlockd("--long-wait-ms", "200")
    a = d.client("rl-holder")
    a.lock(0, BLK)
    waiters = [d.client(f"rl-w{i}") for i in range(25)]
    for w in waiters:
        w.request({"type": "lock", "offset": 0, "length": BLK,
                   "mode": "exclusive", "wait": True})
    wait_for(lambda: "more long waits/holds not logged" in d.log.read_text(),
             10, "the summary line")
    lines = [x for x in d.log.read_text().splitlines()
             if "long wait in lock-space mon:" in x]
    wait_for(lambda: sum(e["event"] == "long-wait"
                         for e in whole_events(d)) == 25,
             10, "25 long-wait events")
    lines = [x for x in d.log.read_text().splitlines()
             if "long wait in lock-space mon:" in x]
    assert 10 <= len(lines) <= 20, lines
    summary = [x for x in d.log.read_text().splitlines()
               if "more long waits/holds not logged" in x]
    assert sum(int(x.split(": ", 2)[-1].split()[0]) for x in summary) + \
        len(lines) == 25, summary
    events = whole_events(d)
    assert sum(e["event"] == "long-wait" for e in events) == 25
    assert d.status()["metrics"]["lock-spaces"]["mon"]["long-waits"] == 25
    for x in [a, *waiters]:
        x.close()
