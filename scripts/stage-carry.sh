#!/usr/bin/env bash
# Builds release binaries and the GPU test binary here and copies them, with the vLLM-style
# reference, the floor (scripts/floor.c, a bare CUDA process), scripts/bench.py and the
# bandwidth matrix's scripts (scripts/gpu-bandwidth.sh and its two helpers), into .carry/
# (git-ignored) for the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --lib --bins --example access_check
test_bin=$(cargo test --release --no-run --test gpu --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="gpu" and m.get("executable"): print(m["executable"])')
rm -rf .carry && mkdir -p .carry
cp target/release/p2pcheck target/release/p2pcheck-worker target/release/examples/access_check .carry/
cp "$test_bin" .carry/gpu-tests
cp ../shared/bench/vllm_style_reference.py .carry/
gcc -O2 -Wall -Wextra -Werror -o .carry/floor scripts/floor.c -ldl
cp scripts/bench.py .carry/
# The bandwidth matrix (issue 18), which scripts/gpu-all.sh runs when it is staged.
cp scripts/gpu-bandwidth.sh scripts/torch-copy-bw.py scripts/bw-agree.py .carry/
# The cuMem transport's GPU run (issue 21), which scripts/gpu-all.sh runs when it is here.
cp scripts/gpu-cumem.sh .carry/
# The Python package (issue 20): the wheel of these very binaries, and its GPU comparison.
cp scripts/gpu-python.sh .carry/
P2PCHECK_PREBUILT="$PWD/target/release" python3 -m pip wheel -q --no-deps -w .carry/wheels .
# The C ABI from C++, linked statically with exactly the system libraries the README names.
g++ -std=c++17 -O2 -Iinclude -x c++ examples/cmake/main.c -x none target/release/libp2pcheck_capi.a \
  -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc -o .carry/verdicts-cpp
ls -la .carry
