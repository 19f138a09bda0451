#!/bin/bash
# HA coordinator numbers (docs/benchmarks.rst "HA coordinator"): time from
# kill -9 of the leader to the first new grant and to every client locking
# again, over N failovers (median, max), and extlock-bench throughput of
# the HA leader against a single-mode extlockd, in one run.
#
#   scripts/bench-ha.sh [--failovers N] [--seconds S] [--clients C]
#
# Needs build/ and etcd (scripts/install-deps.sh).  Loopback only; ports
# are chosen free at start.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
[ -x build/contrib/extlockd/extlockd ] || ninja -C build
exec /usr/bin/python3 tests/ha/bench_failover.py "$@"
