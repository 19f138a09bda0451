#!/bin/bash
# extlock's test command: installs what it needs, builds, runs every test.
#
#   scripts/run-tests.sh [--no-qemu]
#
#  1. scripts/install-deps.sh            (apt-get; idempotent)
#  2. meson build of extlockd, tools and tests in build/
#  3. meson test: cmocka unit tests (lock table, interval tree, protocol)
#     and integration tests against the real extlockd
#  3a. the same meson tests built with clang, ASan and UBSan (build-asan/);
#     any sanitizer report fails the step
#  3b. pytest tests/monitoring: extlockd metrics, Prometheus endpoint
#     (promtool, a real Prometheus), extlockctl blockers/freeze
#  3c. fuzz smoke run: each libFuzzer harness of tests/fuzz for 25 s
#     (build-fuzz/, tests/fuzz/run-fuzz.sh)
#  3d. pytest tests/ha: the HA coordinator on a real 3-member etcd cluster
#     (3 extlockd replicas; kill -9, partition from etcd, etcd member and
#     quorum loss, rolling restart, bad configuration); its QEMU file
#     (test_qemu_failover.py: the driver's coordinator list, kill -9 of
#     the leader under stamped writes) runs after step 5 on QEMU 10.0
#  4. scripts/build-qemu.sh --qemu 10.0 and --qemu 7.2 (patched QEMUs,
#     incremental, one ccache); scripts/check-graph-lock.py: the driver's
#     graph-lock annotations under clang -Wthread-safety (one test)
#  5. pytest tests/qemu against QEMU 10.0 (the whole suite) and against 7.2
#     (EXTLOCK_QEMU72_TESTS, default: the safety and block-layer files;
#     EXTLOCK_QEMU72_TESTS=tests/qemu runs all of it), each counted on
#     its own: real qemu-io / qemu-img / qemu-storage-daemon /
#     qemu-system-x86_64 with the extlock driver, a real extlockd and a
#     real NFS server (nfs-ganesha on 127.0.0.1)
#  6. (6, 6a and 7 on QEMU 10.0)
#     tests/e2e/run-guests.py: two tiny Debian guests write and read one
#     raw image on NFS through extlock (checker: no torn or mixed extents),
#     and the same workload without extlock, which must be caught tearing
#     Then tests/e2e/run-pr-guests.py: three guests send SCSI persistent
#     reservations (sg_persist, fence_scsi's commands) through scsi-hd and
#     extlock; the control without extlock must fail the same checks
#     Then tests/e2e/run-pr-retry.py: one guest's PR OUTs are interrupted
#     by a lease loss and retried; each must be applied once
#  6b. tests/e2e/run-backup.py: extlockctl freeze backups of two running
#     guests checked as consistent cuts (control: the copy without the
#     freeze, caught), freeze timeout and failure, the guest agent inside
#     the guests (frozen during the cut, always thawed)
#  6a. pytest tests/libvirt: a private libvirtd 9.0 (with virtlockd; one
#     with sanlock from fetch-libvirt.sh --machine-sanlock) runs
#     two domains defined from extlock-virt's XML on one NFS disk, inside
#     scripts/isolate.sh (own network and mount namespaces)
#  7. scripts/nemesis.sh --suite: three hosts, randomized faults (partitions,
#     NFS delays, SIGSTOP, kill -9, coordinator restarts), history checker;
#     and the same without extlock, where violations must be reported
#
# Every run has a time limit (per pytest test: pytest-timeout; per suite:
# timeout(1)), so a hang is a counted failure, not a stuck CI job.  Counts:
# cmocka test cases (a test binary that crashed or timed out without its
# cmocka summary counts as one failure), pytest tests (xfail counts as
# skipped; a pytest run that crashed, was interrupted or timed out counts
# one failure more), the end-to-end run as one test.
# The last line is the summary, exactly: "N passed, N failed, N skipped".
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
WITH_QEMU=1
[ "${1:-}" = "--no-qemu" ] && WITH_QEMU=0

# time limits (seconds); see docs/testing.rst for the measured durations
PYTEST_TEST_TIMEOUT=${EXTLOCK_PYTEST_TEST_TIMEOUT:-300}
# tests/qemu took 1007 s (287 tests) at a load of 10-28 and has grown to
# 307; single files take twice as long at a load of 30-34
# (test_maintenance.py 109 -> 226 s): 1800 s was too close
PYTEST_SUITE_TIMEOUT=${EXTLOCK_PYTEST_SUITE_TIMEOUT:-3000}
E2E_TIMEOUT=${EXTLOCK_E2E_TIMEOUT:-600}
E2E_PR_TIMEOUT=${EXTLOCK_E2E_PR_TIMEOUT:-900}
BACKUP_TIMEOUT=${EXTLOCK_BACKUP_TIMEOUT:-600}
LIBVIRT_TIMEOUT=${EXTLOCK_LIBVIRT_TIMEOUT:-2100}
LIBVIRT_TEST_TIMEOUT=${EXTLOCK_LIBVIRT_TEST_TIMEOUT:-600}
NEMESIS_TIMEOUT=${EXTLOCK_NEMESIS_TIMEOUT:-900}
MESON_TIMEOUT=${EXTLOCK_MESON_TIMEOUT:-600}
# the sanitizer build runs each test with 3 x its meson timeout: under
# a load of 25-30 test-lock-table took 154-162 s of its 300 s there (h1-h3
# of 4cfcb03; 36 s in f1), test-extlockd-security 65 s of 120
MESON_ASAN_TIMEOUT=${EXTLOCK_MESON_ASAN_TIMEOUT:-1800}
FUZZ_TIMEOUT=${EXTLOCK_FUZZ_TIMEOUT:-900}
HA_TIMEOUT=${EXTLOCK_HA_TIMEOUT:-600}
MONITORING_TIMEOUT=${EXTLOCK_MONITORING_TIMEOUT:-600}
# the QEMU 7.2 run: pytest arguments (docs/testing.rst, "What runs where")
QEMU72_TESTS=${EXTLOCK_QEMU72_TESTS:-tests/qemu/test_fault_safety.py tests/qemu/test_inflight_lease_loss.py tests/qemu/test_atomicity.py tests/qemu/test_block_layer.py tests/qemu/test_maintenance.py}

passed=0
failed=0
skipped=0
step() { echo; echo "=== $* ==="; }
summary() { echo; echo "$passed passed, $failed failed, $skipped skipped"; }
give_up() { echo "$*"; failed=$((failed + 1)); summary; exit 1; }

# One pytest run, counted: xfail as skipped, xpass as failed, and a run
# that did not finish normally (crash, interrupt, timeout) as one failure
# more.  Never counts an older run's output.
#   run_pytest LABEL OUT SUITE_TIMEOUT TEST_TIMEOUT [WRAPPER...] -- ARGS...
run_pytest() {
    local label=$1 out=$2 suite_to=$3 test_to=$4 rc line p f e s xf xp
    local wrapper=()
    shift 4
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do wrapper+=("$1"); shift; done
    shift
    rm -f "$out"
    # --timeout-method=signal: the test fails with an exception, so its
    # fixtures still stop the processes it started; unbuffered, so a run
    # that is killed has printed every result it had
    PYTHONUNBUFFERED=1 timeout -k 60 "$suite_to" "${wrapper[@]}" /usr/bin/python3 -m pytest -v -rfEsxX \
        -p no:cacheprovider --timeout="$test_to" \
        --timeout-method=signal "$@" | tee "$out"
    rc=${PIPESTATUS[0]}
    line=$(grep -E '^=+ .*(passed|failed|error|skipped|xfailed|xpassed|no tests ran).* in [0-9.]+s' \
           "$out" | tail -n1)
    count() { echo "$line" | sed -n "s/.*[ =]\([0-9][0-9]*\) $1.*/\1/p"; }
    if [ -n "$line" ]; then
        p=$(count passed); f=$(count failed); e=$(count error)
        s=$(count skipped); xf=$(count xfailed); xp=$(count xpassed)
    else
        # no closing line (crashed, killed): the results pytest -v printed
        # per test until then still count
        vcount() { grep -cE "^[^ ]+::[^ ]+ $1( |\$)" "$out"; }
        p=$(vcount PASSED); f=$(vcount FAILED); e=$(vcount ERROR)
        s=$(vcount SKIPPED); xf=$(vcount XFAIL); xp=$(vcount XPASS)
    fi
    passed=$((passed + ${p:-0}))
    failed=$((failed + ${f:-0} + ${e:-0} + ${xp:-0}))
    skipped=$((skipped + ${s:-0} + ${xf:-0}))
    echo "$label: ${p:-0} passed, $(( ${f:-0} + ${e:-0} + ${xp:-0} )) failed, $(( ${s:-0} + ${xf:-0} )) skipped (exit status $rc)"
    # 0: all passed; 1: some tests failed (counted above); anything else
    # (interrupted, internal error, timeout, killed) is one more failure
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ]; then
        echo "$label did not finish normally (exit status $rc): counted as one failure"
        failed=$((failed + 1))
    fi
}

step "installing dependencies"
bash scripts/install-deps.sh || give_up "dependency installation failed"

step "building extlockd, tools and tests"
if [ ! -f build/build.ninja ]; then
    meson setup build || give_up "meson setup failed"
fi
ninja -C build || give_up "build failed"

step "unit and coordinator integration tests (meson test)"
# never count a previous run's results
rm -f build/meson-logs/testlog.txt build/meson-logs/testlog.json build/meson-test.out
timeout -k 30 "$MESON_TIMEOUT" meson test -C build --print-errorlogs --num-processes 2 \
    | tee build/meson-test.out
rc=${PIPESTATUS[0]}
log=build/meson-logs/testlog.txt
if [ -f "$log" ]; then
    # one block per test binary: cmocka's own counts, or the binary's
    # meson result when it has no cmocka summary (crash, timeout, not cmocka)
    read -r ok bad skp <<<"$(awk '
        function flush() {
            if (!inblk) return
            if (res ~ /SKIP|skipped/) { s += 1 }
            else if (havesum) {
                p += np; f += nf; s += ns
                if (res !~ /exit status 0/ && nf == 0) f += 1
            } else if (res ~ /exit status 0/) { p += 1 }
            else { f += 1 }
        }
        /^=+ [0-9]+\/[0-9]+ =+$/ { flush(); inblk = 1; res = ""; havesum = 0; np = nf = ns = 0; next }
        /^result:/ { res = $0 }
        /^\[  PASSED  \] [0-9]+ test/ { np += $4; havesum = 1 }
        /^\[  FAILED  \] [0-9]+ test/ { nf += $4; havesum = 1 }
        /^\[  SKIPPED \] [0-9]+ test/ { ns += $4; havesum = 1 }
        END { flush(); print p + 0, f + 0, s + 0 }' "$log")"
    passed=$((passed + ok)); failed=$((failed + bad)); skipped=$((skipped + skp))
    echo "meson test: $ok passed, $bad failed, $skp skipped"
    # 1: some tests failed (counted above); anything else (timeout(1)
    # killed it, meson crashed) is one failure more, even after failures
    if [ "$rc" -ne 0 ] && { [ "$bad" -eq 0 ] || [ "$rc" -ne 1 ]; }; then
        echo "meson test exited with $rc: counted as one failure more"
        failed=$((failed + 1))
    fi
else
    echo "meson test wrote no log (exit status $rc): counted as one failure"
    failed=$((failed + 1))
fi

step "unit and integration tests under ASan+UBSan (build-asan, clang)"
# Every binary (extlockd started by the integration tests too) writes
# sanitizer reports to build-asan/sanitizer/; any report fails the step.
# A leak that tests/lsan-fixtures.supp suppresses is no report: without
# print_suppressions=0, LeakSanitizer writes its "Suppressions used" table
# to that directory, which would count as one.
san_dir=$REPO/build-asan/sanitizer
if { [ -f build-asan/build.ninja ] ||
     CC=clang meson setup build-asan -Db_sanitize=address,undefined \
         -Db_lundef=false >/dev/null; } && ninja -C build-asan >/dev/null; then
    rm -rf "$san_dir"; mkdir -p "$san_dir"
    ASAN_OPTIONS=halt_on_error=1:abort_on_error=1:detect_leaks=1:fast_unwind_on_malloc=0:log_path=$san_dir/asan \
    LSAN_OPTIONS=suppressions=$REPO/tests/lsan-fixtures.supp:print_suppressions=0 \
    EXTLOCK_UNDER_SANITIZER=1 \
    UBSAN_OPTIONS=halt_on_error=1:abort_on_error=1:print_stacktrace=1:log_path=$san_dir/ubsan \
        timeout -k 30 "$MESON_ASAN_TIMEOUT" \
        meson test -C build-asan --print-errorlogs --num-processes 2 \
        --timeout-multiplier 3 > build-asan/meson-test.out 2>&1
    rc=$?
    sok=$(sed -n 's/^Ok:[[:space:]]*\([0-9]*\).*/\1/p' build-asan/meson-test.out | tail -n1)
    sbad=$(sed -n 's/^\(Fail\|Timeout\|Unexpected Pass\):[[:space:]]*\([0-9]*\).*/\2/p' \
           build-asan/meson-test.out | awk '{s += $1} END {print s + 0}')
    sskip=$(sed -n 's/^Skipped:[[:space:]]*\([0-9]*\).*/\1/p' build-asan/meson-test.out | tail -n1)
    reports=$(find "$san_dir" -type f | wc -l)
    # 1 with failures counted: as counted; 1 without (a sanitizer report
    # in a passing binary) or anything else (timeout(1), meson crashed,
    # no summary written): one failure more
    if [ "$rc" -ne 0 ] && { [ "${sbad:-0}" -eq 0 ] || [ "$rc" -ne 1 ]; }; then
        echo "meson test (ASan) exited with $rc: counted as one failure more"
        sbad=$((${sbad:-0} + 1))
    fi
    [ "$reports" -gt 0 ] && [ "${sbad:-0}" -eq 0 ] && sbad=1
    grep -E '^ *[0-9]+/[0-9]+ ' build-asan/meson-test.out
    for f in $(find "$san_dir" -type f | head -n 5); do
        echo "--- $f"; head -n 20 "$f"
    done
    echo "asan/ubsan: ${sok:-0} test binaries passed, ${sbad:-0} failed, ${sskip:-0} skipped, $reports sanitizer report(s)"
    passed=$((passed + ${sok:-0}))
    failed=$((failed + ${sbad:-0}))
    skipped=$((skipped + ${sskip:-0}))
else
    echo "ASan+UBSan build failed"
    failed=$((failed + 1))
fi

step "monitoring tests (pytest tests/monitoring: metrics, Prometheus, freeze)"
run_pytest "pytest tests/monitoring" build/pytest-monitoring.out \
    "$MONITORING_TIMEOUT" "$PYTEST_TEST_TIMEOUT" -- tests/monitoring

step "fuzz smoke run (tests/fuzz, 25 s per harness)"
fz_out=$(mktemp)
rm -rf build-fuzz/smoke
timeout -k 30 "$FUZZ_TIMEOUT" \
    bash tests/fuzz/run-fuzz.sh --seconds 25 --work-dir "$REPO/build-fuzz/smoke" |
    tee "$fz_out"
rc=${PIPESTATUS[0]}
fz=$(sed -n 's/^fuzz: \(fuzz-[a-z]*\): .*executions.* \([0-9]*\) crashes.*/\1 \2/p' "$fz_out")
if [ -z "$fz" ]; then
    echo "fuzz smoke run reported no harness (exit status $rc): counted as one failure"
    failed=$((failed + 1))
else
    passed=$((passed + $(echo "$fz" | awk '$2 == 0' | wc -l)))
    failed=$((failed + $(echo "$fz" | awk '$2 != 0' | wc -l)))
    # killed (timeout(1)) or crashed before its closing line: the
    # harness that was running reported nothing, so one failure more
    if ! grep -q '^fuzz: [0-9]* harnesses' "$fz_out"; then
        echo "fuzz smoke run did not finish (exit status $rc): counted as one failure"
        failed=$((failed + 1))
    fi
fi
rm -f "$fz_out"

step "HA coordinator on etcd (pytest tests/ha: 3 etcd members, 3 replicas)"
# (test_qemu_failover.py needs QEMU: it runs after the QEMU builds)
run_pytest "pytest tests/ha" build/pytest-ha.out "$HA_TIMEOUT" 120 -- tests/ha \
    --ignore=tests/ha/test_qemu_failover.py

if [ "$WITH_QEMU" = 1 ]; then
    step "building QEMU 10.0 with the extlock driver"
    qemu10=0
    if bash scripts/build-qemu.sh --qemu 10.0; then
        qemu10=1
        step "graph-lock annotations: clang -Wthread-safety on block/ (QEMU 10.0)"
        if /usr/bin/python3 scripts/check-graph-lock.py build/qemu-10.0; then
            passed=$((passed + 1))
        else
            failed=$((failed + 1))
        fi
    else
        echo "QEMU 10.0 build failed"
        failed=$((failed + 1))
    fi
    step "building QEMU 7.2 with the extlock driver"
    qemu72=0
    if bash scripts/build-qemu.sh --qemu 7.2; then
        qemu72=1
    else
        echo "QEMU 7.2 build failed"
        failed=$((failed + 1))
    fi

    if [ "$qemu10" = 1 ]; then
        step "QEMU-level tests on QEMU 10.0 (pytest tests/qemu, build/qemu-10.0)"
        run_pytest "pytest tests/qemu on QEMU 10.0" build/pytest-qemu-10.0.out \
            "$PYTEST_SUITE_TIMEOUT" "$PYTEST_TEST_TIMEOUT" \
            env EXTLOCK_QEMU_BUILD="$REPO/build/qemu-10.0" -- tests/qemu
        step "QEMU driver on the HA coordinator (pytest tests/ha/test_qemu_failover.py, QEMU 10.0)"
        run_pytest "pytest tests/ha/test_qemu_failover.py" build/pytest-ha-qemu.out \
            "$HA_TIMEOUT" 300 \
            env EXTLOCK_QEMU_BUILD="$REPO/build/qemu-10.0" -- tests/ha/test_qemu_failover.py
    fi
    if [ "$qemu72" = 1 ]; then
        step "QEMU-level tests on QEMU 7.2 (pytest $QEMU72_TESTS, build/qemu)"
        # shellcheck disable=SC2086 # a list of files / pytest arguments
        run_pytest "pytest tests/qemu on QEMU 7.2" build/pytest-qemu-7.2.out \
            "$PYTEST_SUITE_TIMEOUT" "$PYTEST_TEST_TIMEOUT" \
            env EXTLOCK_QEMU_BUILD="$REPO/build/qemu" -- $QEMU72_TESTS
    fi

    # The end-to-end runs use the default QEMU, 10.0
    if [ "$qemu10" = 1 ]; then
        step "end-to-end: two guests share one disk on NFS (short run, QEMU 10.0)"
        timeout -k 30 "$E2E_TIMEOUT" /usr/bin/python3 tests/e2e/run-guests.py --seconds 10
        rc=$?
        if [ "$rc" -eq 0 ]; then
            passed=$((passed + 1))
        else
            echo "end-to-end run FAILED (exit status $rc)"
            failed=$((failed + 1))
        fi

        step "end-to-end: guests send SCSI persistent reservations (sg_persist, QEMU 10.0)"
        timeout -k 30 "$E2E_PR_TIMEOUT" /usr/bin/python3 tests/e2e/run-pr-guests.py
        rc=$?
        if [ "$rc" -eq 0 ]; then
            passed=$((passed + 1))
        else
            echo "persistent-reservation guest run FAILED (exit status $rc)"
            failed=$((failed + 1))
        fi

        step "end-to-end: interrupted PR OUTs of a guest are retried once each (QEMU 10.0)"
        timeout -k 30 "$E2E_PR_TIMEOUT" /usr/bin/python3 tests/e2e/run-pr-retry.py
        rc=$?
        if [ "$rc" -eq 0 ]; then
            passed=$((passed + 1))
        else
            echo "PR retry guest run FAILED (exit status $rc)"
            failed=$((failed + 1))
        fi

        step "end-to-end backup: freeze backups of two running guests (QEMU 10.0)"
        # the steps must end within the guests' workload (the run checks
        # it): 14 s idle, 24.5 s at a load of 24, so 60 s, not the 40 s
        # default
        timeout -k 30 "$BACKUP_TIMEOUT" /usr/bin/python3 tests/e2e/run-backup.py \
            --seconds 60
        rc=$?
        if [ "$rc" -eq 0 ]; then
            passed=$((passed + 1))
        else
            echo "end-to-end backup run FAILED (exit status $rc)"
            failed=$((failed + 1))
        fi

        step "libvirt: domains with extlock disks under a real libvirtd (tests/libvirt)"
        # the sanlock plugin of the machine's libvirt, unpacked (not
        # installed) into the cache, here: scripts/isolate.sh has no network
        bash tests/libvirt/fetch-libvirt.sh --machine-sanlock ||
            echo "fetch-libvirt.sh --machine-sanlock failed: test_sanlock_coexistence will fail"
        run_pytest "pytest tests/libvirt" build/pytest-libvirt.out \
            "$LIBVIRT_TIMEOUT" "$LIBVIRT_TEST_TIMEOUT" scripts/isolate.sh \
            -- tests/libvirt/test_libvirt.py

        step "nemesis: randomized faults against three hosts (seeded run + control, QEMU 10.0)"
        if timeout -k 30 "$NEMESIS_TIMEOUT" bash scripts/nemesis.sh --suite; then
            passed=$((passed + 1))
        else
            echo "nemesis run FAILED"
            failed=$((failed + 1))
        fi
    fi
fi

summary
[ "$failed" -eq 0 ]
