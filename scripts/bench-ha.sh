#!/bin/bash
# HA coordinator numbers (docs/benchmarks.rst "HA coordinator"): time from
# kill -9 of the leader to the first new grant and to every client locking
# again and to QEMU I/O resuming (2 qemu-storage-daemon hosts with the
# replicas as their extlock node's coordinators), over N failovers
# (median, max), and extlock-bench throughput of the HA leader against a
# single-mode extlockd, in one run.
#
#   scripts/bench-ha.sh [--failovers N] [--seconds S] [--clients C] [--no-qemu]
#
# Needs build/, etcd (scripts/install-deps.sh) and, unless --no-qemu, the
# patched QEMU (EXTLOCK_QEMU_BUILD, default build/qemu-10.0).  Loopback
# only; ports are chosen free at start.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
[ -x build/contrib/extlockd/extlockd ] || ninja -C build
exec /usr/bin/python3 tests/ha/bench_failover.py "$@"
