#!/usr/bin/env bash
# The cuMem transport on the GPU machine (issue 21): `--transport all` on every pair at every
# level, the time it adds to the default check (5 interleaved cold runs of each, medians;
# target: under 50 ms per GPU), and compute-sanitizer memcheck over a whole check with
# `--transport all` (following the workers: --target-processes all). No cargo there: the
# binaries come from .carry/ (scripts/stage-carry.sh here, then the device tool with carry
# [".carry"]):
#     run: bash scripts/gpu-cumem.sh
# Logs go under $OUT; a short table is printed last. RUNS sets the timing runs (default 5).
set -uo pipefail
C=${CARRY:-.carry}
OUT=${OUT:-/tmp/p2pcheck-cumem}
mkdir -p "$OUT"
export P2PCHECK_WORKER=$PWD/$C/p2pcheck-worker
P2P=$PWD/$C/p2pcheck
RUNS=${RUNS:-5}
ROWS=()
row() { ROWS+=("$(printf '%-44s %s' "$1" "$2")"); }

nvidia-smi -L | tee "$OUT/gpus.txt"
N=$(nvidia-smi -L | grep -c '^GPU')
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
"$P2P" --version | tee "$OUT/version.txt"
row "machine" "$N GPU(s), driver $DRIVER"

# A field of a --json line: python3 reads it (the check prints one object on one line).
field() { python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())[sys.argv[1]])' "$1"; }
# "ok/total" of one transport's pairs, and the classes of those not ok.
tally() {
  python3 -c '
import json, sys
r = json.loads(sys.stdin.readline())
for t in ("ipc", "cumem"):
    ps = [p for p in r["pairs"] if p["transport"] == t]
    ok = sum(1 for p in ps if p["ok"])
    bad = sorted({(p["diagnosis"] or {}).get("class", p["verdict"]) for p in ps if not p["ok"]})
    print("%s %d/%d%s" % (t, ok, len(ps), " (" + ",".join(bad) + ")" if bad else ""), end="; ")
'
}

# 1. Every pair over both transports, at every level.
for level in copy kernel handshake; do
  "$P2P" --json --transport all --level "$level" >"$OUT/all-$level.json" 2>"$OUT/all-$level.err"
  rc=$?
  row "--transport all --level $level" "exit $rc: $(tally <"$OUT/all-$level.json" 2>/dev/null || echo 'no JSON (see the .err)')"
done
"$P2P" --transport all >"$OUT/all-table.txt" 2>&1

# 2. What --transport all adds to the default check: cold processes, interleaved, medians of
#    the time to answer (answer_s) and of the whole process (wall).
median() { sort -n | awk '{a[NR]=$1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
: >"$OUT/timing.txt"
"$P2P" --json >/dev/null 2>&1 # warm-up: the driver's first start-up is not the check's
for ((i = 1; i <= RUNS; i++)); do
  for variant in default all; do
    flags=(); [ $variant = all ] && flags=(--transport all)
    start=$(date +%s.%N)
    line=$("$P2P" --json "${flags[@]}" 2>>"$OUT/timing.err")
    end=$(date +%s.%N)
    answer=$(echo "$line" | field answer_s 2>/dev/null || echo nan)
    echo "$variant $i answer_s=$answer wall_s=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.4f", b - a}')" >>"$OUT/timing.txt"
  done
done
for variant in default all; do
  a=$(grep "^$variant " "$OUT/timing.txt" | sed 's/.*answer_s=\([^ ]*\).*/\1/' | median)
  w=$(grep "^$variant " "$OUT/timing.txt" | sed 's/.*wall_s=\([^ ]*\).*/\1/' | median)
  eval "A_$variant=$a W_$variant=$w"
done
# awk, not bc: the GPU machine has no bc.
added_ms=$(awk -v a="$A_all" -v d="$A_default" 'BEGIN {printf "%.1f", (a - d) * 1000}')
per_gpu=$(awk -v m="$added_ms" -v n="$N" 'BEGIN {printf "%.1f", m / n}')
verdict=$(awk -v p="$per_gpu" 'BEGIN {print (p < 50) ? "within the 50 ms target" : "OVER the 50 ms target"}')
row "time to answer, default / all (median $RUNS)" "$(printf '%.3f / %.3f s' "$A_default" "$A_all")"
row "whole process, default / all" "$(printf '%.3f / %.3f s' "$W_default" "$W_all")"
row "added by --transport all" "$(printf '%.1f ms, %.1f ms per GPU: %s' "$added_ms" "$per_gpu" "$verdict")"

# 3. compute-sanitizer memcheck over a whole check with --transport all, every worker followed.
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$CS" ]; then
  # The workers' step deadline must allow for the sanitizer's slowdown.
  timeout 540 "$CS" --tool memcheck --target-processes all --error-exitcode 0 \
    "$P2P" --transport all --timeout 120 --startup-timeout 300 >"$OUT/memcheck.log" 2>&1
  rc=$?
  errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+' "$OUT/memcheck.log" | awk '{s += $3} END {print s + 0}')
  # One summary for the whole tree of processes it followed (the parent and every worker).
  verdicts=$(grep -c ' ok$' "$OUT/memcheck.log")
  row "compute-sanitizer memcheck, --transport all" "exit $rc, $errors error(s) (whole process tree), $verdicts ok cell(s)"
else
  row "compute-sanitizer memcheck" "not found (not on PATH nor in /usr/local/cuda*/bin)"
fi

# 4. The trace of one check with --transport all: the cuMem calls, and no multicast.
"$P2P" --transport all --level copy --trace "$OUT/trace.jsonl" >/dev/null 2>&1
"$P2P" trace-summary "$OUT/trace.jsonl" >"$OUT/trace-summary.txt" 2>&1
row "trace: cuMem calls / cuMulticast calls" \
  "$(grep -c '"call":"cuMem' "$OUT/trace.jsonl") / $(grep -c 'cuMulticast' "$OUT/trace.jsonl")"

echo
echo "== gpu-cumem summary (logs in $OUT)"
printf '%s\n' "${ROWS[@]}" | tee "$OUT/summary.txt"
