#!/usr/bin/env bash
# One device call for everything the GPU machine must show, run from the repository root with
# carry [".carry"] (scripts/stage-carry.sh fills it; the wheel goes to .carry/wheels/):
#   the regression run (scripts/gpu-run.sh, steps $STEPS: GPU tests, verdicts and cache bytes
#   against vllm_style_reference.py, cold timings against the floor and the reference, trace,
#   error paths, the C++ program);
#   the Python package (scripts/gpu-python.sh on the wheel) — issue 20;
#   the cuMem transport (.carry/gpu-cumem.sh, when staged) — issue 21;
#   the bandwidth matrix (.carry/gpu-bandwidth.sh, when staged) — issue 18.
# Each part's log is under $OUT; the short table of each is printed last.
set -uo pipefail
OUT=${OUT:-/tmp/p2pcheck-out}
mkdir -p "$OUT"
ls .carry >"$OUT/carry.txt"
summary() { echo "=== $1: exit $2"; tail -n "${3:-12}" "$OUT/$1.log"; }
# PARTS chooses among run, python, cumem and bandwidth (default: all four).
PARTS=${PARTS:-run python cumem bandwidth}
part() { [[ " $PARTS " == *" $1 "* ]]; }
rc_run=skipped
if part run; then
  STEPS=${STEPS:-1 2 3 4 5 8} OUT="$OUT/run" bash scripts/gpu-run.sh >"$OUT/gpu-run.log" 2>&1
  rc_run=$?
fi
rc_py=skipped
if part python; then
  bash .carry/gpu-python.sh .carry/wheels .carry/vllm_style_reference.py >"$OUT/gpu-python.log" 2>&1
  rc_py=$?
fi
rc_cumem=skipped
if part cumem && [ -f .carry/gpu-cumem.sh ]; then
  OUT="$OUT/cumem" CARRY=.carry bash .carry/gpu-cumem.sh >"$OUT/gpu-cumem.log" 2>&1; rc_cumem=$?
fi
rc_bw=skipped
if part bandwidth && [ -f .carry/gpu-bandwidth.sh ]; then
  CARRY=.carry bash .carry/gpu-bandwidth.sh >"$OUT/gpu-bandwidth.log" 2>&1; rc_bw=$?
fi
[ "$rc_run" != skipped ] && { echo "=== gpu-run summary: exit $rc_run"; cat "$OUT/run/summary.txt"; }
# Every part's folder in one archive, the folders removed: the device tool returns few files.
(cd "$OUT" && tar -czf logs.tgz -- */ && rm -rf -- */)
[ "$rc_py" != skipped ] && summary gpu-python "$rc_py" 8
[ "$rc_cumem" != skipped ] && summary gpu-cumem "$rc_cumem" 20
[ "$rc_bw" != skipped ] && summary gpu-bandwidth "$rc_bw" 25
exit 0
