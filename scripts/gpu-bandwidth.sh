#!/usr/bin/env bash
# The bandwidth matrix on the GPU machine (issue 18): `p2pcheck --bandwidth --json` $RUNS times
# cold (each a fresh set of processes), a plain check before each for the time the measurement
# adds, and torch's copies in the same run as the independent figures (own memory, and every
# ordered pair of distinct GPUs); then a short table (scripts/bw-agree.py): each figure's median
# over the runs, its CV across them, slow verdicts, agreement with torch, the time added.
# Binaries from scripts/stage-carry.sh in $CARRY (default .carry); logs under $OUT. Run from the
# repository root, alone or through scripts/gpu-all.sh.
set -uo pipefail
C=${CARRY:-.carry}
OUT=${OUT:-/tmp/p2pcheck-out}/bandwidth
RUNS=${RUNS:-5}
# The transfer size, in MiB, of p2pcheck's measurement and of torch's copies alike.
BW_MIB=${BW_MIB:-64}
mkdir -p "$OUT"
export P2PCHECK_WORKER="$C/p2pcheck-worker"
nvidia-smi --query-gpu=index,name,uuid,driver_version,clocks.sm,clocks.max.sm --format=csv |
  tee "$OUT/gpu.csv"
nvidia-smi topo -m >"$OUT/topo.txt" 2>&1
for r in $(seq 1 "$RUNS"); do
  "$C/p2pcheck" --json >"$OUT/base-run$r.json" 2>"$OUT/base-run$r.err"
  echo "run $r: plain check exit $?"
  "$C/p2pcheck" --json --bandwidth --bandwidth-bytes $((BW_MIB << 20)) >"$OUT/bw-run$r.json" \
    2>"$OUT/bw-run$r.err"
  echo "run $r: --bandwidth exit $?"
done
n=$(nvidia-smi -L | wc -l)
torch_args="$BW_MIB:4 sm:$BW_MIB:4 triton:$BW_MIB:4"
[ "$n" -gt 1 ] && torch_args="$BW_MIB:4 peer:$BW_MIB:4"
python3 "$C/torch-copy-bw.py" $torch_args >"$OUT/torch.jsonl" 2>"$OUT/torch.err" ||
  echo "torch failed: $(tail -2 "$OUT/torch.err")"
python3 "$C/bw-agree.py" "$OUT" | tee "$OUT/table.txt"
