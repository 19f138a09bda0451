#!/bin/bash
# extlock benchmarks, one command (builds what is missing first).  Every
# figure is printed with its ratio to a baseline measured in the same run,
# and the load average is printed with it (the machine may be shared):
#  1. the coordinator alone: extlock-bench, 16 clients over a UNIX socket,
#     conflict ratio 0 (the baseline) and 0.1 - lock+unlock pairs/s and
#     grant latency;
#  2. handoff at the protocol level: extlock-handoff, two processes pass
#     one lock 2000 times; the parts of a handoff (revoke, holder,
#     give-back, grant, wakeup) against an uncontended lock round trip
#     and against the floor (a plain ping-pong of the same four messages
#     between three processes, same run); with extlockd --poll-us 0 and
#     50, interleaved, twice; then cold (--gap-us 2000: every round 2 ms
#     after the last, all processes asleep in between, as two hosts whose
#     writes are apart; the floor likewise), twice;
#  3. the filter in QEMU: contrib/extlock-bench/bench-qemu.py - qemu-img
#     bench IOPS of (a) no filter (the baseline), (b) blkdebug, (c) extlock
#     lock-cache=on, (d) lock-cache=off on null-co and on loopback NFS; the
#     filter's own CPU time per request against a request of (a); handoff
#     between two qemu-io processes and its parts; 4 and 8 writers with and
#     without extlock (aggregate IOPS ratio, fairness: each host's rate
#     against the mean rate of its run, the hosts started together, and
#     against its max-min fair share of the layout; per host from the
#     event log: grants, waits, wait per grant, waits > 1 ms, grants out
#     of timestamp order, partial releases, granted size).
# Options are passed to bench-qemu.py (e.g. --quick, --no-nfs, --only).
# --before DIR (a directory with the qemu-img and extlockd of another
# build, e.g. main's) runs the filter cost and the many-hosts part with
# both builds, interleaved, and prints both: a before/after in one run.
# The handoff between two guests is contrib/extlock-bench/bench-guests.py
# (not run here: two TCG guests take minutes).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
bash scripts/install-deps.sh
[ -f build/build.ninja ] || meson setup build
ninja -C build
bash scripts/build-qemu.sh

work=$(mktemp -d)
trap 'kill $(cat "$work/pid" 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT

# xd_start NAME BINARY [OPTION...]: a fresh extlockd on $work/NAME.sock
# (state NAME.state, stderr NAME.log), its pid in $work/pid; xd_stop
xd_start() {
    local name=$1 bin=$2
    shift 2
    rm -f "$work/$name.sock" "$work/$name.state" "$work/$name.events"
    "$bin" --listen "unix:$work/$name.sock" --state-file "$work/$name.state" \
        "$@" 2>"$work/$name.log" &
    echo $! > "$work/pid"
    for _ in $(seq 50); do [ -S "$work/$name.sock" ] && break; sleep 0.1; done
}
xd_stop() {
    kill "$(cat "$work/pid")"
    wait "$(cat "$work/pid")" 2>/dev/null || true
}

xd_start c build/contrib/extlockd/extlockd --event-log "$work/c.events"

echo "== coordinator: extlock-bench, 16 clients, UNIX socket" \
     "(load average $(cut -d' ' -f1-3 /proc/loadavg)) =="
for ratio in 0 0.1; do
    build/contrib/extlock-bench/extlock-bench -c "unix:$work/c.sock" \
        --clients 16 --window 4 --duration 5 --conflict-ratio "$ratio" \
        --lock-space "bench-$ratio" --json > "$work/bench-$ratio.json"
done
/usr/bin/python3 - "$work/bench-0.json" "$work/bench-0.1.json" <<'PY'
import json, sys
base, other = (json.load(open(p)) for p in sys.argv[1:])
b = base["grant-latency-us"]
print("%-15s %10s %7s %8s %8s %8s" % ("conflict ratio", "pairs/s", "ratio",
                                      "p50 us", "p99 us", "p99/p50(0)"))
for r in (base, other):
    lat = r["grant-latency-us"]
    print("%-15s %10.0f %7.3f %8.1f %8.1f %8.2f" % (
        r["conflict-ratio"], r["pairs-per-sec"],
        r["pairs-per-sec"] / base["pairs-per-sec"], lat["p50"], lat["p99"],
        lat["p99"] / b["p50"]))
PY
xd_stop

# --before DIR with an extlockd in it: the coordinator of both builds,
# interleaved, three rounds (no event log: what a plain coordinator does)
before_dir=""
prev=""
for arg in "$@"; do
    [ "$prev" = --before ] && before_dir=$arg
    prev=$arg
done
if [ -n "$before_dir" ] && [ -x "$before_dir/extlockd" ]; then
    echo
    echo "== coordinator, this build against $before_dir/extlockd:" \
         "extlock-bench, 16 clients, conflict ratio 0, 3 rounds interleaved" \
         "(load average $(cut -d' ' -f1-3 /proc/loadavg)) =="
    for round in 1 2 3; do
        for which in before this; do
            bin=build/contrib/extlockd/extlockd
            [ "$which" = before ] && bin=$before_dir/extlockd
            xd_start b "$bin"
            build/contrib/extlock-bench/extlock-bench -c "unix:$work/b.sock" \
                --clients 16 --window 4 --duration 4 --conflict-ratio 0 \
                --lock-space bench --json > "$work/c-$which-$round.json"
            xd_stop
        done
    done
    /usr/bin/python3 - "$work" <<'PY'
import json, sys
w = sys.argv[1]
print("%-6s %12s %12s %7s %10s %10s" % ("round", "before p/s", "this p/s",
                                        "ratio", "before p50", "this p50"))
for k in (1, 2, 3):
    b, t = (json.load(open("%s/c-%s-%d.json" % (w, x, k)))
            for x in ("before", "this"))
    print("%-6d %12.0f %12.0f %7.3f %10.1f %10.1f" % (
        k, b["pairs-per-sec"], t["pairs-per-sec"],
        t["pairs-per-sec"] / b["pairs-per-sec"],
        b["grant-latency-us"]["p50"], t["grant-latency-us"]["p50"]))
PY
fi

# The handoff runs against a coordinator that sleeps in poll() (the
# default) and one that polls for 50 us first (--poll-us 50), twice each,
# interleaved; each run prints the floor (a plain ping-pong of the same
# four messages) measured in the same run.
for round in 1 2; do
    for poll in 0 50; do
        xd_start h build/contrib/extlockd/extlockd \
            --event-log "$work/h.events" --poll-us "$poll"
        echo
        echo "== handoff between two processes, protocol level:" \
             "extlock-handoff, extlockd --poll-us $poll, round $round" \
             "(load average $(cut -d' ' -f1-3 /proc/loadavg)) =="
        build/contrib/extlock-bench/extlock-handoff -c "unix:$work/h.sock" \
            -n 2000 --event-log "$work/h.events"
        xd_stop
    done
done

# Cold: the processes sleep 2 ms between rounds, as the two qemu-io
# processes of bench-qemu.py's handoff do; on a VM a process woken after
# a sleep costs more than one woken back to back
for round in 1 2; do
    xd_start h build/contrib/extlockd/extlockd --event-log "$work/h.events"
    echo
    echo "== handoff between two processes, protocol level, cold:" \
         "extlock-handoff --gap-us 2000, round $round" \
         "(load average $(cut -d' ' -f1-3 /proc/loadavg)) =="
    build/contrib/extlock-bench/extlock-handoff -c "unix:$work/h.sock" \
        -n 1000 --gap-us 2000 --event-log "$work/h.events"
    xd_stop
done

echo
echo "== the filter in QEMU =="
/usr/bin/python3 contrib/extlock-bench/bench-qemu.py "$@"
