#!/usr/bin/env bash
# Issue 23 on the GPU machine: which image the driver takes for the kernels (from the trace), how
# long cuModuleLoadData takes with the compute cache off, and 5 interleaved cold runs of the
# default check with the cache warm, with it off (CUDA_CACHE_DISABLE=1), and at --level copy,
# against the floor. Builds nothing: scripts/stage-carry.sh fills .carry/ first.
#     run: bash scripts/gpu-jit.sh      (carry [".carry"])
set -uo pipefail
C=${CARRY:-.carry}
OUT=${OUT:-/tmp/p2pcheck-out}
mkdir -p "$OUT"
export P2PCHECK_WORKER=$PWD/$C/p2pcheck-worker
nvidia-smi -L | tee "$OUT/gpus.txt"
for cache in warm off; do
  env=(); [ $cache = off ] && env=(CUDA_CACHE_DISABLE=1)
  env "${env[@]}" "$C/p2pcheck" --trace "$OUT/trace-$cache.jsonl" >"$OUT/check-$cache.txt" 2>&1
  echo "cache $cache: exit $?"
  python3 - "$OUT/trace-$cache.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l)
    if d["call"] == "cuModuleLoadData":
        print("  pid %d cuModuleLoadData %.1f ms" % (d["pid"], d["dur_us"] / 1000))
    if "image_taken" in d.get("out", {}):
        print("  pid %d image taken: %s" % (d["pid"], d["out"]["image_taken"]))
PY
done
python3 "$C/bench.py" gpu --carry "$C" --runs "${RUNS:-5}" \
  --variants floor-one,p2pcheck,p2pcheck-nocache,p2pcheck-copy 2>"$OUT/bench-progress.log"
