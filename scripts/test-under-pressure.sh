#!/usr/bin/env bash
# The README's test command, `cargo test` (with --no-fail-fast, so every test binary runs and
# every failure is listed), under CPU pressure: while it runs, a busy loop spins on every core
# and a second copy of the simulator tests (tests/sim.rs) runs again and again.
# A verdict or assertion that depends on how fast the host schedules fails here, not in a
# user's hands. CI (.ci/run) runs it; so can anyone, on any machine without a GPU.
#
# Usage: scripts/test-under-pressure.sh [RUNS] [-- ARGS for cargo test]
#   RUNS (default 1): the whole suite that many times in a row, each under fresh pressure.
# Environment:
#   PRESSURE_BUSY    busy loops (default: one per core, nproc)
#   PRESSURE_COPIES  concurrent copies of the simulator tests (default 1; 0: none)
# Exit status: 0 when every run of the suite and every copy passed, else 1. Logs of each run
# are under target/pressure/ (the suite's and each copy's); the last lines say what failed.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-1}
[[ $# -gt 0 ]] && shift
[[ ${1:-} == -- ]] && shift
busy=${PRESSURE_BUSY:-$(nproc)}
copies=${PRESSURE_COPIES:-1}
if ! [[ $runs =~ ^[1-9][0-9]*$ && $busy =~ ^[0-9]+$ && $copies =~ ^[0-9]+$ ]]; then
    echo "usage: $0 [RUNS] [-- ARGS for cargo test]; PRESSURE_BUSY and PRESSURE_COPIES are counts" >&2
    exit 2
fi

# Build first, without pressure (the build is not under test), and find the simulator tests'
# binary: the copies run it directly, so they never wait on cargo's lock of the build folder.
cargo test --no-run "$@"
# (the test target named sim: the bins built beside it are artifacts with executables too)
sim=$(cargo test --no-run --test sim --message-format=json "$@" 2>/dev/null |
    grep '"kind":\["test"\]' | grep '"name":"sim"' |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
if [[ ! -x $sim ]]; then
    echo "$0: cannot find the binary of tests/sim.rs" >&2
    exit 2
fi

logs=target/pressure
mkdir -p "$logs"
# Only what this script started is ended, by process id: the busy loops, and on an early exit
# the suite and the copies' loops (a test binary left running ends by its own deadlines).
busy_pids=()
copy_pids=()
suite_pid=
stop_pressure() {
    local pid
    [[ -n $suite_pid ]] && kill "$suite_pid" 2>/dev/null
    for pid in "${busy_pids[@]}" "${copy_pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${busy_pids[@]}" "${copy_pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    busy_pids=()
    copy_pids=()
}
trap stop_pressure EXIT
trap 'exit 130' INT TERM

failed=0
for run in $(seq "$runs"); do
    rm -f "$logs/run-$run".*
    stop=$logs/run-$run.stop
    for _ in $(seq "$busy"); do
        (while :; do :; done) &
        busy_pids+=($!)
    done
    for copy in $(seq "$copies"); do
        # Each copy runs the simulator tests until the suite has ended; a copy already under
        # way then finishes (its own deadlines bound it) and is counted. A copy that fails is
        # not run again in this run: its log is kept for reading.
        (
            # A command started with & ignores SIGINT and SIGQUIT unless told otherwise; the
            # tests send SIGINT to a CLI they start, which must get the default action.
            trap - INT QUIT
            n=0
            while [[ ! -e $stop ]]; do
                n=$((n + 1))
                log=$logs/run-$run.copy-$copy.$n.log
                if "$sim" >"$log" 2>&1; then
                    echo ok >>"$logs/run-$run.copies"
                    rm -f "$log"
                else
                    echo "FAILED $log" >>"$logs/run-$run.copies"
                    break
                fi
            done
        ) &
        copy_pids+=($!)
    done
    started=$SECONDS
    status=ok
    # In the background, so that INT or TERM ends the run at once (the EXIT trap ends it all),
    # with SIGINT and SIGQUIT at their defaults (see the copies).
    (
        trap - INT QUIT
        exec cargo test --no-fail-fast "$@" >"$logs/run-$run.suite.log" 2>&1
    ) &
    suite_pid=$!
    if ! wait "$suite_pid"; then
        status=FAILED
        failed=1
    fi
    suite_pid=
    took=$((SECONDS - started))
    touch "$stop"
    for pid in "${copy_pids[@]}"; do
        wait "$pid" || true
    done
    copy_pids=()
    stop_pressure
    passed=$(grep -c '^ok$' "$logs/run-$run.copies" 2>/dev/null || true)
    broken=$(grep -c '^FAILED' "$logs/run-$run.copies" 2>/dev/null || true)
    [[ $broken -gt 0 ]] && failed=1
    echo "run $run of $runs: cargo test $status in ${took} s under $busy busy loop(s) and" \
        "$copies copy(ies) of tests/sim.rs ($passed passed, $broken failed alongside)"
    if [[ $status == FAILED ]]; then
        grep -E '^(test .* FAILED|---- |failures:|thread .* panicked)' \
            "$logs/run-$run.suite.log" | head -n 40 || true
        echo "  log: $logs/run-$run.suite.log"
    fi
    grep '^FAILED' "$logs/run-$run.copies" 2>/dev/null | while read -r _ log; do
        echo "  copy FAILED: $log"
        grep -E '^(test .* FAILED|thread .* panicked|assertion|  left|  right)' "$log" |
            head -n 12 | sed 's/^/    /'
    done || true
done
exit "$failed"
