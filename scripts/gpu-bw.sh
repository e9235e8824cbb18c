#!/usr/bin/env bash
# The bandwidth method on the 1-GPU machine (issue 18): 5 cold runs of scripts/bw-probe.c (own
# memory and the same-GPU pair through the IPC mapping: copy engine and SM, write, read, both
# ways, latency; the kernel tier's SM-store figure with the SM clock beside each launch) at two
# sizes, torch copy_ in the same run as the independent figure, then a table: per figure the
# median over runs of each run's median and the coefficient of variation across the 5 runs.
# Staged by scripts/stage-bw.sh into $C (default .carry-bw); logs under $OUT.
set -uo pipefail
ls "${CARRY:-.carry-bw}"
C=${CARRY:-.carry-bw}
OUT=${OUT:-/tmp/p2pcheck-bw}
mkdir -p "$OUT"
RUNS=${RUNS:-5}
nvidia-smi --query-gpu=name,uuid,driver_version,persistence_mode,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv | tee "$OUT/gpu.csv"
nvidia-smi -q -d PERFORMANCE,CLOCK >"$OUT/clocks-before.txt" 2>&1
for r in $(seq 1 "$RUNS"); do
  for size in "64 4" "256 2"; do
    set -- $size
    "$C/bw-probe" "$C/kernels.fatbin" "$1" "$2" 5 >"$OUT/probe-$1-run$r.jsonl" 2>"$OUT/probe-$1-run$r.err" ||
      echo "probe $1 MiB run $r failed: $(tail -2 "$OUT/probe-$1-run$r.err")"
  done
  python3 "$C/torch-copy-bw.py" 64:4 256:2 >"$OUT/torch-run$r.jsonl" 2>"$OUT/torch-run$r.err"
done
nvidia-smi -q -d PERFORMANCE,CLOCK >"$OUT/clocks-after.txt" 2>&1
python3 "$C/bw-table.py" "$OUT" | tee "$OUT/table.txt"
