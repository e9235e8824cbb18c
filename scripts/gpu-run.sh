#!/usr/bin/env bash
# The GPU-machine run: GPU tests, verdicts and cache bytes against vllm_style_reference.py for
# several CUDA_VISIBLE_DEVICES forms, cold timings side by side (medians of 5), a trace, and the
# error paths. Run through the device tool from the repository root:
#     scripts/stage-carry.sh            # here: builds and fills .carry/
#     run: bash scripts/gpu-run.sh      # there, with carry [".carry"]
# Logs go under $OUT; a short table is printed last.
set -uo pipefail
C=${CARRY:-.carry}
OUT=${OUT:-/tmp/p2pcheck-out}
mkdir -p "$OUT"
export P2PCHECK_WORKER=$PWD/$C/p2pcheck-worker
P2P=$PWD/$C/p2pcheck
REF=$PWD/$C/vllm_style_reference.py
RUNS=${RUNS:-5}
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

nvidia-smi -L | tee "$OUT/gpus.txt"
N=$(nvidia-smi -L | grep -c '^GPU')
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
UUID0=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | head -1)
say "machine: $N GPU(s), driver $DRIVER, $(uname -r)"
"$P2P" --version | tee -a "$SUMMARY"

# 1. The GPU tests.
P2PCHECK_GPU_TESTS=1 "$C/gpu-tests" --test-threads=1 >"$OUT/gpu-tests.log" 2>&1
say "gpu tests: $(grep -E '^test result' "$OUT/gpu-tests.log" || echo 'no result line (see gpu-tests.log)')"

# 2. Verdicts and cache bytes, ours against the reference, per CUDA_VISIBLE_DEVICES form.
forms=("unset" "0" "$UUID0")
[ "$N" -ge 2 ] && forms+=("0,1" "1,0")
[ "$N" -ge 4 ] && forms+=("0,1,2,3" "2,0")
[ "$N" -ge 8 ] && forms+=("7,3,5,1")
seq_key() { local k=""; for ((i = 0; i < $1; i++)); do k+="${k:+,}$i"; done; echo "$k"; }
with_cvd() { local f=$1; shift; if [ "$f" = unset ]; then env -u CUDA_VISIBLE_DEVICES "$@"; else CUDA_VISIBLE_DEVICES="$f" "$@"; fi; }
i=0
for f in "${forms[@]}"; do
  i=$((i + 1)); T=$(mktemp -d)
  with_cvd "$f" python3 "$REF" "$T/ref.json" >"$T/ref.out" 2>&1
  with_cvd "$f" env VLLM_CACHE_ROOT="$T/ours" "$P2P" --write-vllm-cache >"$T/ours.out" 2>&1
  rc=$?
  if [ "$f" = unset ]; then key=$(seq_key "$N"); else key=$f; fi
  ours="$T/ours/gpu_p2p_access_cache_for_$key.json"
  if cmp -s "$T/ref.json" "$ours"; then same=identical; else same=DIFFERENT; fi
  cp "$T/ref.json" "$OUT/cache-ref-$i.json" 2>/dev/null; cp "$ours" "$OUT/cache-ours-$i.json" 2>/dev/null
  cat "$T/ours.out" >>"$OUT/forms.log"
  say "CVD=$f: p2pcheck exit $rc, cache bytes vs reference: $same ($(tr -d '\n ' <"$ours" 2>/dev/null | head -c 120))"
  rm -rf "$T"
done

# 3. Cold timings, side by side, interleaved.
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
: >"$OUT/timings.tsv"
for ((r = 1; r <= RUNS; r++)); do
  T=$(mktemp -d)
  s=$(date +%s.%N); python3 "$REF" "$T/r.json" >"$T/ref.out" 2>&1; e=$(date +%s.%N)
  echo -e "reference-wall\t$(awk -v s="$s" -v e="$e" "BEGIN {printf \"%.3f\", e - s}")" >>"$OUT/timings.tsv"
  echo -e "reference-cache\t$(sed -n 's/.*seconds=\([0-9.]*\).*/\1/p' "$T/ref.out")" >>"$OUT/timings.tsv"
  for mode in vllm full; do
    flag=(); [ $mode = vllm ] && flag=(--no-kernel-check)
    s=$(date +%s.%N); VLLM_CACHE_ROOT=$T "$P2P" "${flag[@]}" >/dev/null 2>&1; e=$(date +%s.%N)
    echo -e "p2pcheck-$mode\t$(awk -v s="$s" -v e="$e" "BEGIN {printf \"%.3f\", e - s}")" >>"$OUT/timings.tsv"
  done
  rm -rf "$T"
done
for k in reference-wall reference-cache p2pcheck-vllm p2pcheck-full; do
  vals=$(awk -v k=$k '$1 == k {print $2}' "$OUT/timings.tsv")
  say "timing $k: median $(echo "$vals" | median) s over $RUNS runs [$(echo $vals)]"
done

# 4. An audit trace of every CUDA call the workers make.
T=$(mktemp -d)
P2PCHECK_TRACE=1 VLLM_CACHE_ROOT=$T "$P2P" >"$OUT/trace-run.out" 2>"$OUT/trace.log"
say "trace: $(grep -c 'p2pcheck trace' "$OUT/trace.log") CUDA calls traced (trace.log)"
rm -rf "$T"

# 5. Error paths on a real machine.
P2PCHECK_LIBCUDA=/nonexistent "$P2P" >/dev/null 2>"$OUT/err-lib.log"; say "P2PCHECK_LIBCUDA=/nonexistent: exit $? ($(head -c 150 "$OUT/err-lib.log"))"
CUDA_VISIBLE_DEVICES= "$P2P" >/dev/null 2>"$OUT/err-empty.log"; say "CUDA_VISIBLE_DEVICES='': exit $? ($(head -c 150 "$OUT/err-empty.log"))"
"$P2P" --json >"$OUT/json.out" 2>&1; say "--json: exit $?, $(python3 -c "import json,sys; d=json.load(open('$OUT/json.out')); print('all_ok', d['all_ok'], 'pairs', len(d['pairs']))")"
sleep 0.5; say "leftover workers: $(pgrep -xc p2pcheck-worker || true)"

echo "================ summary"
cat "$SUMMARY"
