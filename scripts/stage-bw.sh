#!/usr/bin/env bash
# Fills $1 (default ../main/.carry-bw: the session checkout the device tool copies, git-ignored)
# with what scripts/gpu-bw.sh needs: bw-probe built here, the kernels' fat binary, the torch
# figure and the table script.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-../main/.carry-bw}
mkdir -p "$dest"
gcc -O2 -Wall -Wextra -Werror -Icsrc scripts/bw-probe.c csrc/shim.c -ldl -lm -o "$dest/bw-probe"
cp csrc/kernels.fatbin scripts/gpu-bw.sh scripts/torch-copy-bw.py scripts/bw-table.py "$dest/"
ls -la "$dest"
