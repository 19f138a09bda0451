"""History and final-image checker of the nemesis run.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

Input (all times CLOCK_MONOTONIC ns):
  ops        the client history (workload.py): writes and reads with start,
             end and status; reads carry what each sector showed
  final      the decoded sectors of the image region after the run
  failures   per host: times after which a host could no longer complete
             I/O (its process was killed or its NFS path fenced)
  storage    the NFS fault points' logs: every READ/WRITE RPC with the time
             it was handed to the server and the reply time, connections,
             fence events (nfs_relay.py)
  incarnations  per host: [(generation, start, death)] of its processes
  events     extlockd's --event-log (grant/release/expire/fence-*), if any

Violations (each a dict with "kind" and a description):

garbage          a sector that is neither zero nor a valid stamp, or a stamp
                 of a write that never existed / does not cover the sector
future-read      a read saw a write that started after the read ended
stale-read       a read (or the final image) shows an older value although an
                 acknowledged write of that sector finished before the read
                 started and after the shown write had finished (also: shows
                 zero although such a write exists) - an acknowledged write
                 lost or a read of stale data
torn-read        a read saw part of a write but not all of it, while that
                 write could still complete (atomicity), or the writes it saw
                 cannot be put in any order (a cycle)
mixed-extent     the same for the final image: an acknowledged write only
                 partly visible, or a cycle between the writes visible in one
                 extent
stale-storage-write  the storage received a WRITE from a host process
                 later than late_ns after that process had died (with extlock:
                 lease + fence margin, after which the coordinator may have
                 granted the host's locks to others)
lock-violation   (with the coordinator event log) a READ/WRITE RPC was at the
                 storage while another client held a conflicting lock, or a
                 WRITE at the storage outside an exclusive lock of its client

Writes that did not complete (status lost/error) may have reached the
storage partially; once the host had failed (killed, fenced, error reply)
partial visibility of such a write is not counted as a violation.
"""

import bisect
import re
import json
from collections import defaultdict

from workload import GARBAGE, SECTOR

INF = float("inf")


class History:
    def __init__(self, ops, failures=None):
        self.ops = ops
        self.writes = {}
        for op in ops:
            if op["op"] == "write":
                self.writes[(op["writer"], op["seq"])] = op
        self.failures = failures or {}          # host -> sorted [t]
        # per sector: acked writes sorted by end, with prefix max of start
        by_sector = defaultdict(list)
        for w in self.writes.values():
            if w["status"] == "ok":
                for s in range(w["first"], w["first"] + w["n"]):
                    by_sector[s].append((w["end"], w["start"], w))
        self.sector_acked = {}
        for s, lst in by_sector.items():
            lst.sort(key=lambda x: x[0])
            ends = [e for e, _, _ in lst]
            pmax, best = [], None
            for e, st, w in lst:
                if best is None or st > best[0]:
                    best = (st, w)
                pmax.append(best)
            self.sector_acked[s] = (ends, pmax)

    def fail_time(self, w):
        """When the write's outcome was settled without success: its error
        reply, or the first failure of its host (kill, fence) after it
        started; INF for acknowledged or still-running writes."""
        if w["status"] == "ok":
            return INF
        t = w["end"] if w.get("end") is not None else INF
        for f in self.failures.get(w["host"], ()):
            if f >= w["start"]:
                t = min(t, f)
                break
        return t

    def latest_acked_between(self, s, after, before):
        """An acknowledged write of sector s that started after `after` and
        ended before `before`, or None."""
        entry = self.sector_acked.get(s)
        if not entry:
            return None
        ends, pmax = entry
        i = bisect.bisect_left(ends, before)
        if i == 0:
            return None
        st, w = pmax[i - 1]
        return w if st > after else None


def check_observation(hist, sectors, first, seen, r_start, r_end, what, kind_torn,
                      r_exec=None):
    """Check one read (or the final image): sectors first..first+len(seen)."""
    out = []
    by_write = {}
    for i, v in enumerate(seen):
        s = first + i
        if v == GARBAGE:
            out.append({"kind": "garbage", "what": what, "sector": s})
            continue
        if v == 0:
            w_y = hist.latest_acked_between(s, -INF, r_start)
            if w_y is not None:
                out.append({"kind": "stale-read", "what": what, "sector": s,
                            "shown": None, "lost": [w_y["writer"], w_y["seq"]]})
            continue
        writer, seq, ext, idx = v
        w = hist.writes.get((writer, seq))
        if w is None or w["ext"] != ext or w["first"] + idx != s:
            out.append({"kind": "garbage", "what": what, "sector": s,
                        "stamp": list(v)})
            continue
        by_write.setdefault((writer, seq), []).append(s)
        if w["start"] > r_end:
            out.append({"kind": "future-read", "what": what, "sector": s,
                        "shown": [writer, seq]})
            continue
        # when the shown write was last able to reach the storage: its
        # acknowledgement, or the failure of its host (kill, fence) or its
        # error reply; a write shown over a newer acknowledged one that ran
        # entirely after that moment landed late (stale)
        w_end = w["end"] if w["status"] == "ok" else hist.fail_time(w)
        w_y = None if w_end == INF else hist.latest_acked_between(s, w_end, r_start)
        if w_y is not None and w_y is not w:
            out.append({"kind": "stale-read", "what": what, "sector": s,
                        "shown": [writer, seq], "lost": [w_y["writer"], w_y["seq"]]})
    # atomicity: each write seen must be wholly visible in the observed
    # range, except where a later write covers it; writes seen must be
    # orderable (no cycle)
    lo, hi = first, first + len(seen)
    shown = {first + i: (v[0], v[1]) if isinstance(v, tuple) else v
             for i, v in enumerate(seen)}
    edges = defaultdict(set)
    torn = []
    for key, secs in by_write.items():
        w = hist.writes[key]
        # a write of a host that failed (died or was fenced) before the read
        # reached the storage may be partly there: storage is not atomic
        # across a crash.  r_exec: when the read's first READ reached the
        # storage (it may have waited long for its lock), else its start.
        partial_ok = hist.fail_time(w) < (r_exec if r_exec is not None else r_start)
        for s in range(max(lo, w["first"]), min(hi, w["first"] + w["n"])):
            v = shown[s]
            if v == key:
                continue
            if v == 0 or v == GARBAGE or v not in hist.writes:
                if not partial_ok:
                    torn.append((key, s, v))
                continue
            if not partial_ok:
                edges[key].add(v)               # v overwrote w at s
        # the writes covering a sector that shows `key` came before it
        for s in secs:
            for other in by_write:
                if other == key:
                    continue
                o = hist.writes[other]
                if o["first"] <= s < o["first"] + o["n"] and \
                        hist.fail_time(o) >= (r_exec if r_exec is not None else r_start):
                    edges[other].add(key)
    for key, s, v in torn:
        out.append({"kind": kind_torn, "what": what, "sector": s,
                    "write": list(key), "shown": v if v in (0, GARBAGE) else list(v)})
    cyc = find_cycle(edges)
    if cyc:
        out.append({"kind": kind_torn, "what": what, "cycle": [list(k) for k in cyc]})
    return out


def find_cycle(edges):
    """One cycle of the directed graph, or None (iterative DFS)."""
    color = {}
    for root in list(edges):
        if color.get(root):
            continue
        stack = [(root, iter(edges.get(root, ())))]
        color[root] = 1
        path = [root]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = 2
                stack.pop()
                path.pop()
                continue
            c = color.get(nxt)
            if c == 1:
                return path[path.index(nxt):]
            if c is None:
                color[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(edges.get(nxt, ()))))
    return None


def check_storage(storage, incarnations, late_ns=0):
    """WRITE RPCs that reached the server more than late_ns after their host
    process died."""
    out = []
    # connection -> incarnation by accept time
    for host, log in storage.items():
        incs = incarnations.get(host, [])
        conn_inc = {}
        for e in log:
            if e.get("event") == "connect":
                for gen, start, death in incs:
                    if start <= e["ts"] and (death is None or e["ts"] <= death):
                        conn_inc[e["conn"]] = (gen, death)
        for e in log:
            if e.get("event") != "write" or e.get("fwd") is None:
                continue
            gen, death = conn_inc.get(e["conn"], (None, None))
            if death is not None and e["fwd"] > death + late_ns:
                out.append({"kind": "stale-storage-write", "host": host, "gen": gen,
                            "offset": e["offset"], "count": e["count"],
                            "late-ms": (e["fwd"] - death) / 1e6})
    return out


def lock_intervals(events):
    """[(grant ts, end ts or None, offset, length, mode, client)] from the
    coordinator's event log.  A lock is tracked per (session, lock id) as
    segments; a release or downgrade of a part ends the affected segments
    and continues the rest (and the downgraded part, shared) from then."""
    live = defaultdict(list)        # (session, lock) -> [[start, off, len, mode, client]]
    done = []

    def close(seg, ts):
        done.append((seg[0], ts, seg[1], seg[2], seg[3], seg[4]))

    for e in sorted(events, key=lambda e: e["ts"]):
        ev = e.get("event")
        key = (e.get("session"), e.get("client-id"), e.get("lock"))
        ts = e["ts"]
        if ev in ("grant", "reclaim"):
            live[key].append([ts, e["offset"], e["length"], e["mode"], e.get("client-id")])
            continue
        if ev == "coordinator-killed":
            # every lock ends with the coordinator; reclaims open new ones
            for segs in live.values():
                for seg in segs:
                    close(seg, ts)
            live.clear()
            continue
        if ev not in ("release", "downgrade") or key not in live:
            continue
        segs = live.pop(key)
        lo = e.get("offset")
        hi = lo + e["length"] if lo is not None and "length" in e else None
        keep = []
        for seg in segs:
            s0, s1 = seg[1], seg[1] + seg[2]
            if lo is None:
                a, b = s0, s1
            else:
                a, b = max(s0, lo), min(s1, hi)
            if a >= b or (ev == "downgrade" and seg[3] == "shared"):
                keep.append(seg)
                continue
            close(seg, ts)
            if s0 < a:
                keep.append([ts, s0, a - s0, seg[3], seg[4]])
            if b < s1:
                keep.append([ts, b, s1 - b, seg[3], seg[4]])
            if ev == "downgrade":
                keep.append([ts, a, b - a, "shared", seg[4]])
        if keep:
            live[key] = keep
    for segs in live.values():
        for seg in segs:
            close(seg, None)
    return done


def check_locks(storage, events, granularity):
    """Storage I/O against the coordinator's grant/release log."""
    if not events:
        return []
    intervals = lock_intervals(events)
    # index the intervals by time bucket (1 s) so that each I/O looks only
    # at the locks that existed around it
    bucket_ns = 10**9
    last = max([e["ts"] for e in events] +
               [e.get("reply") or e.get("fwd") or 0 for log in storage.values()
                for e in log])
    buckets = defaultdict(list)
    for iv in intervals:
        g, r = iv[0], iv[1] if iv[1] is not None else last + 1
        for b in range(g // bucket_ns, r // bucket_ns + 1):
            buckets[b].append(iv)
    # A request the server got but whose answer never came back to its
    # host (the host was killed, or its path held and then cut by the
    # fence).  If the relay found the server's answer in its socket when
    # it cut the path, or got it on the server side it keeps open after
    # the host's side closed ("replied-by", see nfs_relay.py), the server
    # had executed it by then: that time is its end.  Otherwise nothing bounds
    # it from the storage side; it is assumed executed like the others,
    # within ten times the slowest answer seen in the run, at least 1 s
    # (an assumption, not evidence: see docs/testing.rst)
    answered = [e["reply"] - e["fwd"] for log in storage.values() for e in log
                if e.get("event") in ("read", "write") and e.get("fwd") is not None
                and e.get("reply") is not None]
    unanswered_ns = max([10**9] + [10 * t for t in answered])
    out = []
    for host, log in storage.items():
        for e in log:
            if e.get("event") not in ("read", "write") or e.get("fwd") is None:
                continue
            if e["event"] == "read" and e.get("reply") is None:
                continue        # its data never reached the host: no harm
            t0 = e["fwd"]
            t1 = e.get("reply") or e.get("replied-by") or t0 + unanswered_ns
            end_by = ("reply" if e.get("reply") else "replied-by" if e.get("replied-by")
                      else f"assumed: no answer seen, {unanswered_ns / 1e6:.0f} ms window")
            o0, o1 = e["offset"], e["offset"] + e["count"]
            b1 = (t1 if t1 != INF else last) // bucket_ns
            seen = set()
            found = None
            for b in range(t0 // bucket_ns, b1 + 1):
                for iv in buckets.get(b, ()):
                    if id(iv) in seen:
                        continue
                    seen.add(id(iv))
                    g, r, off, ln, mode, client = iv
                    if client == host or off >= o1 or off + ln <= o0:
                        continue
                    if e["event"] == "read" and mode == "shared":
                        continue
                    if g < t1 and (r is None or r > t0):
                        found = iv
                        break
                if found:
                    break
            if found:
                g, r, off, ln, mode, client = found
                out.append({"kind": "lock-violation", "host": host,
                            "io": e["event"], "offset": o0, "count": e["count"],
                            "fwd": t0, "reply": e.get("reply"),
                            "replied-by": e.get("replied-by"), "end-by": end_by,
                            "holder": client,
                            "lock": [off, ln, mode], "granted": g, "released": r,
                            "overlap-ms": (min(t1, r or INF) - max(t0, g)) / 1e6})
    return out


def check_all(ops, final_seen, region_first, failures, storage, incarnations,
              events=None, granularity=4096, late_ns=0):
    hist = History(ops, failures)
    violations = []
    # READ RPCs of each host by the time they reached the storage
    reads_at = {}
    for host, log in (storage or {}).items():
        rs = sorted((e["fwd"], e["offset"], e["count"]) for e in log
                    if e.get("event") == "read" and e.get("fwd") is not None)
        reads_at[host] = ([r[0] for r in rs], rs)

    def reached_storage(op):
        keys, rs = reads_at.get(op.get("host"), ([], []))
        lo, hi = op["first"] * 512, (op["first"] + op["n"]) * 512
        for i in range(bisect.bisect_left(keys, op["start"]), len(rs)):
            fwd, off, cnt = rs[i]
            if fwd > op["end"]:
                break
            if off < hi and off + cnt > lo:
                return fwd
        return None

    for op in ops:
        if op["op"] == "read" and op["status"] == "ok":
            violations += check_observation(
                hist, None, op["first"], op["seen"], op["start"], op["end"],
                f"read by {op['writer']} of extent {op['ext']}", "torn-read",
                r_exec=reached_storage(op))
    # the final image, extent by extent (each extent as one observation)
    extents = sorted({(op["ext"], op["first"], op["n"]) for op in ops})
    for ext, first, n in extents:
        seen = final_seen[first - region_first:first - region_first + n]
        violations += check_observation(hist, None, first, seen, INF, INF,
                                         f"final image, extent {ext}", "mixed-extent")
    violations += check_storage(storage, incarnations, late_ns)
    violations += check_locks(storage, events or [], granularity)
    return violations


def summarize(violations):
    counts = defaultdict(int)
    for v in violations:
        counts[v["kind"]] += 1
    return dict(sorted(counts.items()))


def load_jsonl(path):
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    except FileNotFoundError:
        pass
    return out


__all__ = ["check_all", "summarize", "load_jsonl", "SECTOR"]


# ---------------------------------------------------------------------------
# driver trace events (extlock_io_start / extlock_io_done, log backend)

TRACE_RE = re.compile(
    r"extlock_io_(start|done) node (\S+) (\S+) offset (\d+) bytes (\d+)"
    r"(?: lock (\d+))? token 0x([0-9a-fA-F]+)(?: ret (-?\d+))? ts (-?\d+)")
WRITE_KINDS = ("write", "zero", "discard")


def parse_trace(lines):
    """[(kind, offset, bytes, token, start ns, done ns or None, ret)] of one
    process's trace log: each done is paired with the oldest open start of
    the same kind, range and token."""
    open_ = defaultdict(list)
    out = []
    for line in lines:
        m = TRACE_RE.search(line)
        if not m:
            continue
        phase, _node, kind, off, nbytes, _lock, token, ret, ts = m.groups()
        key = (kind, int(off), int(nbytes), int(token, 16))
        if phase == "start":
            rec = [kind, int(off), int(nbytes), int(token, 16), int(ts), None, None]
            open_[key].append(rec)
            out.append(rec)
        elif open_[key]:
            rec = open_[key].pop(0)
            rec[5] = int(ts)
            rec[6] = int(ret)
    return [tuple(r) for r in out]


def check_trace(traces, events=None, death=None, fenced=None):
    """traces: {(host, gen): [io]} from parse_trace; death: {(host, gen): ns}.

    trace-overlap: two hosts' requests on overlapping bytes, at least one a
    write, were both forwarded to the storage at the same time (an I/O with
    no done event lasts until its process died).  trace-token (with the
    event log): a request ran under a token the coordinator never granted
    to that client, or outside [grant, last release] of that token.
    fenced: {host: [(off ns, on ns)]} while the host's storage path was cut
    (fence-off .. fence-on): nothing of it reaches the storage then, so a
    request in flight at the cut ends there, and one started while cut
    (a process stopped between its lease check and the request, then
    continued) is not I/O at all; the storage-level checks see what really
    landed."""
    out = []
    death = death or {}
    fenced = fenced or {}
    ios = []
    for (host, gen), lst in traces.items():
        for kind, off, n, token, t0, t1, ret in lst:
            if kind == "flush" or n == 0:
                continue
            end = t1 if t1 is not None else death.get((host, gen), INF)
            cuts = fenced.get(host, ())
            if any(off <= t0 < on for off, on in cuts):
                continue
            cut = [off for off, on in cuts if t0 <= off < end]
            if cut:
                end = min(cut)
            ios.append((t0, end, host, gen, kind, off, n, token))
    ios.sort()
    active = []
    for io in ios:
        t0, end, host, gen, kind, off, n, token = io
        active = [a for a in active if a[1] > t0]
        for a in active:
            if a[2] == host:
                continue
            if a[5] >= off + n or a[5] + a[6] <= off:
                continue
            if kind not in WRITE_KINDS and a[4] not in WRITE_KINDS:
                continue
            out.append({"kind": "trace-overlap", "a": [a[2], a[4], a[5], a[6], hex(a[7])],
                        "b": [host, kind, off, n, hex(token)],
                        "overlap-ms": (min(end, a[1]) - t0) / 1e6})
        active.append(io)
    if events:
        # A token's lock can be given back in parts (the driver splits a
        # cached lock when another host needs a piece of it): a request
        # is covered as long as no release of ITS bytes came before it
        # ended - not only until the token's first or last release.
        grants = {}
        releases = defaultdict(list)        # token -> [(ts, offset, end)]
        for e in events:
            if e.get("event") in ("grant", "reclaim") and "token" in e:
                g = grants.setdefault(e["token"], [e.get("client-id"), e["ts"], None])
                g[1] = min(g[1], e["ts"])
            elif e.get("event") == "release" and "token" in e and e["token"] in grants:
                g = grants[e["token"]]
                g[2] = max(g[2] or 0, e["ts"])
                lo = e.get("offset")
                hi = lo + e["length"] if lo is not None and "length" in e else None
                releases[e["token"]].append((e["ts"], lo, hi))
        for t0, end, host, gen, kind, off, n, token in ios:
            g = grants.get(token)
            released = [r for r in releases.get(token, ())
                        if r[0] < end and (r[1] is None or (r[1] < off + n and off < r[2]))]
            if g is None or g[0] != host or t0 < g[1] or released:
                out.append({"kind": "trace-token", "host": host, "io": kind,
                            "offset": off, "bytes": n, "token": hex(token),
                            "grant": g, "released": released[:3]})
    return out
