#!/bin/bash
# extlock's test command: installs what it needs, builds, runs every test.
#
#   scripts/run-tests.sh [--no-qemu]
#
#  1. scripts/install-deps.sh            (apt-get; idempotent)
#  2. meson build of extlockd, tools and tests in build/
#  3. meson test: cmocka unit tests (lock table, interval tree, protocol)
#     and integration tests against the real extlockd
#  4. scripts/build-qemu.sh              (patched QEMU 7.2, incremental)
#  5. pytest tests/qemu: real qemu-io / qemu-img / qemu-storage-daemon /
#     qemu-system-x86_64 with the extlock driver, a real extlockd and a
#     real NFS server (nfs-ganesha on 127.0.0.1)
#  6. tests/e2e/run-guests.py: two tiny Debian guests write and read one
#     raw image on NFS through extlock (checker: no torn or mixed extents),
#     and the same workload without extlock for comparison
#  7. scripts/nemesis.sh --suite: three hosts, randomized faults (partitions,
#     NFS delays, SIGSTOP, kill -9, coordinator restarts), history checker;
#     and the same without extlock, where violations must be reported
# The last line is a summary: "N passed, N failed".
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
WITH_QEMU=1
[ "${1:-}" = "--no-qemu" ] && WITH_QEMU=0

passed=0
failed=0
step() { echo; echo "=== $* ==="; }

step "installing dependencies"
bash scripts/install-deps.sh || { echo "dependency installation failed"; echo "0 passed, 1 failed"; exit 1; }

step "building extlockd, tools and tests"
if [ ! -f build/build.ninja ]; then
    meson setup build || { echo "0 passed, 1 failed"; exit 1; }
fi
ninja -C build || { echo "0 passed, 1 failed"; exit 1; }

step "unit and coordinator integration tests (meson test)"
meson test -C build --print-errorlogs --num-processes 2 | tee build/meson-test.out
rc=${PIPESTATUS[0]}
# Count cmocka test cases, not binaries: each binary prints its summary
log=build/meson-logs/testlog.txt
ok=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test(s)\./\1/p' "$log" | awk '{s += $1} END {print s + 0}')
bad=$(sed -n 's/^\[  FAILED  \] \([0-9]*\) test(s), listed below:/\1/p' "$log" | awk '{s += $1} END {print s + 0}')
to=$(sed -n 's/^Timeout:[[:space:]]*\([0-9]*\).*/\1/p' build/meson-test.out | tail -n1)
crashed=$(sed -n 's/^Fail:[[:space:]]*\([0-9]*\).*/\1/p' build/meson-test.out | tail -n1)
passed=$((passed + ${ok:-0}))
failed=$((failed + ${bad:-0} + ${to:-0}))
# a test binary that failed without a cmocka summary (crash) counts too
[ "$rc" -ne 0 ] && [ "${bad:-0}" -eq 0 ] && failed=$((failed + ${crashed:-1}))
echo "cmocka: ${ok:-0} passed, ${bad:-0} failed"

if [ "$WITH_QEMU" = 1 ]; then
    step "building QEMU 7.2 with the extlock driver"
    if bash scripts/build-qemu.sh; then
        step "QEMU-level tests (pytest tests/qemu)"
        /usr/bin/python3 -m pytest -v -p no:cacheprovider tests/qemu \
            | tee build/pytest.out
        rc=${PIPESTATUS[0]}
        line=$(grep -E '^=+ .*(passed|failed|error).* in [0-9.]+s' build/pytest.out | tail -n1)
        p=$(echo "$line" | sed -n 's/.* \([0-9]*\) passed.*/\1/p')
        f=$(echo "$line" | sed -n 's/.* \([0-9]*\) failed.*/\1/p')
        e=$(echo "$line" | sed -n 's/.* \([0-9]*\) error.*/\1/p')
        passed=$((passed + ${p:-0}))
        failed=$((failed + ${f:-0} + ${e:-0}))
        [ "$rc" -ne 0 ] && [ -z "$f$e" ] && failed=$((failed + 1))

        step "end-to-end: two guests share one disk on NFS (short run)"
        if /usr/bin/python3 tests/e2e/run-guests.py --seconds 10; then
            passed=$((passed + 1))
        else
            echo "end-to-end run FAILED"
            failed=$((failed + 1))
        fi

        step "nemesis: randomized faults against three hosts (seeded run + control)"
        if bash scripts/nemesis.sh --suite; then
            passed=$((passed + 1))
        else
            echo "nemesis run FAILED"
            failed=$((failed + 1))
        fi
    else
        echo "QEMU build failed"
        failed=$((failed + 1))
    fi
fi

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
