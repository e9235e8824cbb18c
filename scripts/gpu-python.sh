#!/usr/bin/env bash
# The Python package on a GPU machine (python3 with torch, no network, no cargo): installs the
# prebuilt wheel from WHEEL_DIR into this machine's Python, then compares
# p2pcheck.gpu_p2p_access_check(0, 0) and the cache it writes with vLLM's procedure as vLLM
# runs it (vllm_style_reference.py: the answer and the cache bytes), and SGLang's cache
# (p2pcheck.sglang.prepare) with the same reference; prints a table; exit 1 on a difference.
# Usage: scripts/gpu-python.sh WHEEL_DIR [REFERENCE_SCRIPT]
#   REFERENCE_SCRIPT default: shared/bench/vllm_style_reference.py, else
#   /work/shared/bench/vllm_style_reference.py. Honours CUDA_VISIBLE_DEVICES.
set -euo pipefail
wheels="${1:?usage: gpu-python.sh WHEEL_DIR [REFERENCE_SCRIPT]}"
cd "$(dirname "$0")/.."
ref="${2:-}"
for candidate in "$ref" shared/bench/vllm_style_reference.py /work/shared/bench/vllm_style_reference.py; do
  if [ -n "$candidate" ] && [ -f "$candidate" ]; then ref="$candidate"; break; fi
done
[ -f "$ref" ] || { echo "no vllm_style_reference.py found" >&2; exit 2; }
ref="$(realpath "$ref")"

pip_install() { python3 -m pip install -q --no-index --find-links "$wheels" --force-reinstall "$@" p2pcheck; }
pip_install || pip_install --break-system-packages
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work" # only the installed package can be imported from here

python3 "$ref" "$work/reference.json"
mkdir -p "$work/vllm" "$work/home"
VLLM_CACHE_ROOT="$work/vllm" python3 -c \
  'import p2pcheck; print("ANSWER", p2pcheck.gpu_p2p_access_check(0, 0))' | tee "$work/answer.txt"
HOME="$work/home" python3 -c \
  'import p2pcheck; p = p2pcheck.sglang.prepare(); print("SGLANG", p.path)' | tee "$work/sglang.txt"
python3 -c 'import p2pcheck; r = p2pcheck.check(); print(r); [print(" ", p) for p in r.pairs if not p.ok]'
python3 -c 'import p2pcheck; a = p2pcheck.env(); print("env:", a.environ() or "nothing to change", a.flags("vllm"))'

python3 - "$work" <<'PY'
import glob, json, os, sys
work = sys.argv[1]
ref = open(os.path.join(work, "reference.json"), "rb").read()
ref_answer = json.loads(ref)["0->0"]
answer = open(os.path.join(work, "answer.txt")).read().split()[-1] == "True"
vllm = glob.glob(os.path.join(work, "vllm", "gpu_p2p_access_cache_for_*.json"))
sglang = glob.glob(os.path.join(work, "home", ".cache", "sglang", "gpu_p2p_access_cache_for_*.json"))
rows = [
    ("gpu_p2p_access_check(0, 0)", str(answer), str(ref_answer), answer == ref_answer),
    ("vLLM cache bytes", os.path.basename(vllm[0]) if vllm else "missing", "reference.json",
     bool(vllm) and open(vllm[0], "rb").read() == ref),
    ("SGLang cache bytes", os.path.basename(sglang[0]) if sglang else "missing", "reference.json",
     bool(sglang) and open(sglang[0], "rb").read() == ref),
]
print(f"{'check':30} {'p2pcheck':45} {'reference':16} same")
for name, mine, theirs, same in rows:
    print(f"{name:30} {mine:45} {theirs:16} {'yes' if same else 'NO'}")
sys.exit(0 if all(r[3] for r in rows) else 1)
PY
