#!/bin/bash
# Randomized fault-injection ("nemesis") runs of extlock, see docs/testing.rst.
#
#   scripts/nemesis.sh [--minutes N | --seconds N] [--seed N] [--no-extlock] ...
#       one run (arguments as tests/nemesis/nemesis.py --help), inside
#       scripts/isolate.sh (private loopback and /run), nice'd and bounded
#   scripts/nemesis.sh --suite [--seed N]
#       what scripts/run-tests.sh runs (about 3 minutes): the checker's
#       self-tests, a short seeded run with extlock that must be clean, and
#       the same workload and faults without extlock that must be reported
#       (the control: the checker can see violations)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PY=/usr/bin/python3
NEM=tests/nemesis/nemesis.py

run() {     # run BOUND_SECONDS ARGS...: one nemesis.py run, isolated
    local bound=$1
    shift
    timeout --kill-after=30 "$bound" nice -n 10 scripts/isolate.sh "$PY" "$NEM" "$@"
}

if [ "${1:-}" = "--suite" ]; then
    shift
    seed=${NEMESIS_SEED:-7}
    [ "${1:-}" = "--seed" ] && seed=$2
    rc=0
    echo "--- nemesis checker self-tests"
    "$PY" -m pytest -q -p no:cacheprovider tests/nemesis/test_checker.py \
        tests/nemesis/test_relay.py || rc=1
    echo "--- nemesis run with extlock (seed $seed): must be clean"
    run 400 --seed "$seed" --seconds 90 --op-timeout 60 --expect clean || rc=1
    echo "--- nemesis control without extlock (seed $seed): violations must be found"
    run 300 --seed "$seed" --seconds 30 --op-timeout 60 --no-extlock --expect violations || rc=1
    exit $rc
fi

seconds=60
args=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) seconds=$(( ${2%.*} * 60 )); shift ;;
        --seconds) seconds=${2%.*}; shift ;;
    esac
    shift
done
run $(( seconds + 600 )) "${args[@]}"
