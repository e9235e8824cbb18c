#!/usr/bin/env bash
# Regenerates csrc/kernels.fatbin from csrc/kernels.cu: SASS for every architecture in ARCHS
# (so no GPU of those needs the driver's JIT, whose cache is empty in a fresh container) and PTX
# for compute_75 (the oldest target CUDA 13 accepts) as the fallback for newer GPUs. Uncompressed,
# so the PTX stays readable (`cuobjdump --dump-ptx`, or `strings`) and the simulated driver can
# find its kernels in it. nvcc output is deterministic: CI regenerates and compares.
# Needs nvcc (CUDA 13.0): $NVCC, /usr/local/cuda/bin, or the pip wheels nvidia-cuda-nvcc==13.0.88,
# nvidia-nvvm==13.0.88 and nvidia-cuda-crt==13.0.88 (their nvidia/cu13/bin/nvcc).
# --check: compare with the committed file instead of writing it (exit 1 on a difference).
set -euo pipefail
cd "$(dirname "$0")/.."
# The list src/cuda/fatbin.rs's SASS_ARCHS states, in the same order.
ARCHS="75 80 86 89 90 100 120"
NVCC=${NVCC:-nvcc}
gencode=()
for a in $ARCHS; do gencode+=(-gencode "arch=compute_$a,code=sm_$a"); done
gencode+=(-gencode arch=compute_75,code=compute_75)
out=csrc/kernels.fatbin
[ "${1:-}" = --check ] && out=$(mktemp)
"$NVCC" --fatbin --no-compress -O3 "${gencode[@]}" csrc/kernels.cu -o "$out"
if [ "${1:-}" = --check ]; then
  trap 'rm -f "$out"' EXIT
  cmp "$out" csrc/kernels.fatbin && echo "csrc/kernels.fatbin matches csrc/kernels.cu"
else
  echo "wrote $out with $("$NVCC" --version | tail -1)"
fi
