#!/bin/bash
# extlock benchmarks, one command (builds what is missing first):
#  1. the coordinator alone: extlock-bench, 16 clients over a UNIX socket,
#     conflict ratio 0 and 0.1 - lock+unlock pairs/s, grant latency;
#  2. the filter in QEMU: contrib/extlock-bench/bench-qemu.py - qemu-img
#     bench IOPS of (a) no filter, (b) blkdebug, (c) extlock lock-cache=on,
#     (d) lock-cache=off on null-co and on loopback NFS, ratios to (a) in
#     the same run; handoff latency between two qemu-io processes.
# Options are passed to bench-qemu.py (e.g. --quick, --no-nfs).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
bash scripts/install-deps.sh
[ -f build/build.ninja ] || meson setup build
ninja -C build
bash scripts/build-qemu.sh

work=$(mktemp -d)
trap 'kill $(cat "$work/pid" 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT
build/contrib/extlockd/extlockd --listen "unix:$work/sock" \
    --state-file "$work/state" 2>"$work/log" &
echo $! > "$work/pid"
for _ in $(seq 50); do [ -S "$work/sock" ] && break; sleep 0.1; done

echo "== coordinator: extlock-bench, 16 clients, UNIX socket =="
for ratio in 0 0.1; do
    echo "-- conflict ratio $ratio"
    build/contrib/extlock-bench/extlock-bench -c "unix:$work/sock" \
        --clients 16 --window 4 --duration 5 --conflict-ratio "$ratio"
done
kill "$(cat "$work/pid")"

echo
echo "== the filter in QEMU =="
/usr/bin/python3 contrib/extlock-bench/bench-qemu.py "$@"
