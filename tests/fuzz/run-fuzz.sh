#!/bin/bash
# Build the libFuzzer harnesses (tests/fuzz) and run each for a while.
#
#   tests/fuzz/run-fuzz.sh [--seconds N] [--runs N] [--max-len BYTES]
#                          [--work-dir DIR] [--build DIR] [HARNESS...]
#
# HARNESS: fuzz-protocol, fuzz-dispatch (default: both).  Each runs from a
# copy of its seed corpus (tests/fuzz/corpus/<harness>) in a work
# directory (default: a fresh one under /tmp, kept), for N seconds
# (default 25) or until N executions, whichever comes first.  An existing
# work directory is reused: its corpus grows from run to run.  A crash, leak or sanitizer report
# leaves the input as <workdir>/<harness>/crash-* and makes the script
# fail; reproduce with  <build>/tests/fuzz/<harness> <that file>.
# The last line is a summary: "fuzz: N harnesses, E executions, C crashes".
set -uo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=$REPO/build-fuzz
SECONDS_EACH=25
RUNS=
MAX_LEN=
WORK=
HARNESSES=()
while [ $# -gt 0 ]; do
    case "$1" in
    --seconds) SECONDS_EACH=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --max-len) MAX_LEN=$2; shift 2 ;;
    --work-dir) WORK=$2; shift 2 ;;
    --build) BUILD=$2; shift 2 ;;
    fuzz-*) HARNESSES+=("$1"); shift ;;
    *) echo "usage: $0 [--seconds N] [--runs N] [--max-len BYTES] [--work-dir DIR]" \
            "[--build DIR] [fuzz-protocol] [fuzz-dispatch]" >&2; exit 2 ;;
    esac
done
[ ${#HARNESSES[@]} -eq 0 ] && HARNESSES=(fuzz-protocol fuzz-dispatch)
[ -n "$WORK" ] || WORK=$(mktemp -d /tmp/extlock-fuzz-run-XXXXXX)
mkdir -p "$WORK"

if [ ! -f "$BUILD/build.ninja" ]; then
    CC=clang meson setup "$BUILD" "$REPO" -Dfuzzing=true -Dtests=disabled \
        -Db_sanitize=address,undefined -Db_lundef=false >/dev/null ||
        { echo "fuzz: meson setup failed"; exit 1; }
fi
ninja -C "$BUILD" tests/fuzz/fuzz-protocol tests/fuzz/fuzz-dispatch >/dev/null ||
    { echo "fuzz: build failed"; exit 1; }

# Sanitizer reports are fatal (the build also uses -fno-sanitize-recover)
export ASAN_OPTIONS=halt_on_error=1:abort_on_error=1:detect_leaks=1
export UBSAN_OPTIONS=halt_on_error=1:abort_on_error=1:print_stacktrace=1

total_execs=0
total_crashes=0
for h in "${HARNESSES[@]}"; do
    dir=$WORK/$h
    mkdir -p "$dir/corpus"
    cp -n "$REPO/tests/fuzz/corpus/$h/"* "$dir/corpus/"
    limit=(-max_total_time="$SECONDS_EACH")
    [ -n "$RUNS" ] && limit+=(-runs="$RUNS")
    [ -n "$MAX_LEN" ] && limit+=(-max_len="$MAX_LEN")
    start=$(date +%s)
    (cd "$dir" && "$BUILD/tests/fuzz/$h" "${limit[@]}" -print_final_stats=1 \
        -dict="$REPO/tests/fuzz/extlock.dict" -artifact_prefix="$dir/" \
        corpus > "$dir/log" 2>&1)
    rc=$?
    secs=$(( $(date +%s) - start ))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log")
    cov=$(grep -E '^#[0-9]+.*cov: ' "$dir/log" | tail -n1 |
          sed -n 's/.* cov: \([0-9]*\) ft: \([0-9]*\) corp: \([0-9]*\).*/\1 edges, \2 features, \3 inputs/p')
    crashes=$(find "$dir" -maxdepth 1 -name 'crash-*' -o -maxdepth 1 \
              -name 'leak-*' -o -maxdepth 1 -name 'timeout-*' \
              -o -maxdepth 1 -name 'oom-*' | wc -l)
    [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ] && crashes=1
    echo "fuzz: $h: ${execs:-?} executions in ${secs} s, ${crashes} crashes, coverage ${cov:-?} (log $dir/log)"
    if [ "$crashes" -ne 0 ]; then
        grep -E 'ERROR|runtime error|fuzz-(protocol|dispatch):|SUMMARY' "$dir/log" | head -n 20
    fi
    total_execs=$((total_execs + ${execs:-0}))
    total_crashes=$((total_crashes + crashes))
done
echo "fuzz: ${#HARNESSES[@]} harnesses, $total_execs executions, $total_crashes crashes"
[ "$total_crashes" -eq 0 ]
