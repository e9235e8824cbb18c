#!/usr/bin/env bash
# Regenerates csrc/kernels.ptx from csrc/kernels.cu. Needs nvcc (CUDA 13): /usr/local/cuda/bin,
# or the pip wheels nvidia-cuda-nvcc==13.0.88 + nvidia-nvvm==13.0.88 unpacked with their include/.
# compute_75 is the oldest target CUDA 13 accepts; the driver JIT-compiles it for the real GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
"$NVCC" --ptx -arch=compute_75 -O3 csrc/kernels.cu -o csrc/kernels.ptx
echo "wrote csrc/kernels.ptx with $("$NVCC" --version | tail -1)"
