#!/usr/bin/env bash
# The GPU-machine run: GPU tests, verdicts and cache bytes of both engines against
# vllm_style_reference.py for several CUDA_VISIBLE_DEVICES forms, cold timings against the floor
# and the reference (scripts/bench.py gpu, medians of $RUNS), a trace, and the error paths. Run
# through the device tool from the repository root:
#     scripts/stage-carry.sh            # here: builds and fills .carry/
#     run: bash scripts/gpu-run.sh      # there, with carry [".carry"]
# Logs go under $OUT; a short summary is printed last. STEPS="2 3" runs only those steps, and
# BENCH_ARGS passes options to bench.py (the reference takes about a minute per run at 8 GPUs:
# all steps do not fit one 10-minute command there).
set -uo pipefail
C=${CARRY:-.carry}
OUT=${OUT:-/tmp/p2pcheck-out}
mkdir -p "$OUT"
export P2PCHECK_WORKER=$PWD/$C/p2pcheck-worker
P2P=$PWD/$C/p2pcheck
REF=$PWD/$C/vllm_style_reference.py
RUNS=${RUNS:-5}
STEPS=${STEPS:-1 2 3 4 5 6 7 8}
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }

nvidia-smi -L | tee "$OUT/gpus.txt"
N=$(nvidia-smi -L | grep -c '^GPU')
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
UUID0=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | sed -n 1p)
UUID1=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | sed -n 2p)
say "machine: $N GPU(s), driver $DRIVER, $(uname -r)"
"$P2P" --version | tee -a "$SUMMARY"

# 1. The GPU tests.
if want 1; then
  P2PCHECK_GPU_TESTS=1 "$C/gpu-tests" --ignored --test-threads=1 >"$OUT/gpu-tests.log" 2>&1
  say "gpu tests: $(grep -E '^test result' "$OUT/gpu-tests.log" || echo 'no result line (see gpu-tests.log)')"
fi

# 2. Verdicts and cache bytes, both engines against the reference, per CUDA_VISIBLE_DEVICES form.
forms=("unset" "0" "$UUID0")
[ "$N" -ge 2 ] && forms+=("0,1" "1,0" "$UUID0,$UUID1")
[ "$N" -ge 4 ] && forms+=("0,1,2,3" "2,0")
[ "$N" -ge 8 ] && forms+=("7,3,5,1")
seq_key() { local k=""; for ((i = 0; i < $1; i++)); do k+="${k:+,}$i"; done; echo "$k"; }
with_cvd() { local f=$1; shift; if [ "$f" = unset ]; then env -u CUDA_VISIBLE_DEVICES "$@"; else CUDA_VISIBLE_DEVICES="$f" "$@"; fi; }
if want 2; then
  i=0
  for f in "${forms[@]}"; do
    i=$((i + 1)); T=$(mktemp -d)
    with_cvd "$f" timeout 300 python3 "$REF" "$T/ref.json" >"$T/ref.out" 2>&1
    if [ "$f" = unset ]; then key=$(seq_key "$N"); else key=$f; fi
    line="CVD=$f:"
    for engine in default all vllm; do
      flag=(); [ $engine = vllm ] && flag=(--engine vllm); [ $engine = all ] && flag=(--visibility all)
      with_cvd "$f" env VLLM_CACHE_ROOT="$T/$engine" "$P2P" --write-vllm-cache "${flag[@]}" >"$T/$engine.out" 2>&1
      rc=$?
      ours="$T/$engine/gpu_p2p_access_cache_for_$key.json"
      if cmp -s "$T/ref.json" "$ours"; then same=identical; else same=DIFFERENT; fi
      cp "$ours" "$OUT/cache-$engine-$i.json" 2>/dev/null
      { echo "== CVD=$f engine=$engine exit $rc"; cat "$T/$engine.out"; } >>"$OUT/forms.log"
      line+=" $engine engine exit $rc, cache bytes vs reference $same;"
    done
    cp "$T/ref.json" "$OUT/cache-ref-$i.json" 2>/dev/null
    say "$line ($(tr -d '\n ' <"$T/ref.json" 2>/dev/null | head -c 120))"
    rm -rf "$T"
  done
fi

# 3. Cold timings: the floor, both engines, the reference, a warm lookup (scripts/bench.py).
if want 3; then
  # BENCH_ARGS: more options, e.g. "--budget 400 --variants floor-one,p2pcheck,reference".
  # shellcheck disable=SC2086
  OUT="$OUT" python3 scripts/bench.py gpu --runs "$RUNS" --carry "$C" ${BENCH_ARGS:-} | tee -a "$SUMMARY"
fi

# 4. The audit trace of a whole check, for both engines, summarised; and vLLM's procedure at
# level copy compared with SPEC section 2, pair by pair (trace-summary --spec).
if want 4; then
  for engine in default vllm vllm-copy; do
    flag=(); [ $engine = vllm ] && flag=(--engine vllm); [ $engine = vllm-copy ] && flag=(--engine vllm --level copy)
    T=$(mktemp -d)
    VLLM_CACHE_ROOT=$T "$P2P" "${flag[@]}" --trace "$OUT/trace-$engine.jsonl" >"$OUT/trace-run-$engine.out" 2>&1
    rc=$?
    "$P2P" trace-summary "$OUT/trace-$engine.jsonl" >"$OUT/trace-summary-$engine.txt" 2>&1
    say "trace ($engine, exit $rc): $(wc -l <"$OUT/trace-$engine.jsonl") lines, $(grep -c '"call":"cudaDeviceReset"' "$OUT/trace-$engine.jsonl") cudaDeviceReset; $(head -1 "$OUT/trace-summary-$engine.txt")"
    rm -rf "$T"
  done
  "$P2P" trace-summary --spec "$OUT/trace-vllm-copy.jsonl" >"$OUT/trace-spec.txt" 2>&1
  say "trace-summary --spec (vllm engine, level copy): exit $? ($(grep -c 'as SPEC section 2' "$OUT/trace-spec.txt") pairs as SPEC, $(grep -c 'DIFFERS' "$OUT/trace-spec.txt") differ)"
fi

# 5. Error paths on a real machine.
if want 5; then
  P2PCHECK_LIBCUDA=/nonexistent "$P2P" >/dev/null 2>"$OUT/err-lib.log"; say "P2PCHECK_LIBCUDA=/nonexistent: exit $? ($(head -c 150 "$OUT/err-lib.log"))"
  CUDA_VISIBLE_DEVICES= "$P2P" >/dev/null 2>"$OUT/err-empty.log"; say "CUDA_VISIBLE_DEVICES='': exit $? ($(head -c 150 "$OUT/err-empty.log"))"
  T=$(mktemp -d)
  VLLM_CACHE_ROOT=$T "$C/access_check" >"$OUT/access-check.out" 2>&1
  say "library gpu_p2p_access_check (examples/access_check), exit $?: $(head -1 "$OUT/access-check.out"); $(tail -1 "$OUT/access-check.out")"
  rm -rf "$T"
  "$P2P" --json >"$OUT/json.out" 2>&1; say "--json: exit $?, $(python3 -c "import json,sys; d=json.load(open('$OUT/json.out')); print('all_ok', d['all_ok'], 'pairs', len(d['pairs']))")"
fi
# 6. compute-sanitizer over a whole check (every worker process): memcheck and racecheck. Its
# instrumentation slows kernels down, so the deadlines are wider; the verdicts must not change.
if want 6; then
  for tool in memcheck racecheck; do
    T=$(mktemp -d)
    VLLM_CACHE_ROOT=$T timeout 500 compute-sanitizer --target-processes all --tool "$tool" \
      "$P2P" --timeout 120 --startup-timeout 300 >"$OUT/sanitizer-$tool.log" 2>&1
    rc=$?
    say "compute-sanitizer $tool: exit $rc; $(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitizer-$tool.log") processes with 0 errors, $(grep 'ERROR SUMMARY' "$OUT/sanitizer-$tool.log" | grep -vc ' 0 errors') with errors; $(grep -m1 'src\\tgt' -A3 "$OUT/sanitizer-$tool.log" | tr -s ' ' | tr '\n' '|')"
    rm -rf "$T"
  done
fi
# 8. The C ABI: a C++ program linked statically against libp2pcheck.a gives the CLI's verdicts.
if want 8; then
  "$C/verdicts-cpp" >"$OUT/verdicts-cpp.txt" 2>&1; rc=$?
  "$P2P" --json | python3 -c "import json,sys; [print(f\"{p['src']}->{p['tgt']}: {p['verdict']}\") for p in json.load(sys.stdin)['pairs']]" >"$OUT/verdicts-cli.txt"
  if cmp -s "$OUT/verdicts-cpp.txt" "$OUT/verdicts-cli.txt"; then same=same; else same=DIFFERENT; fi
  say "C++ program on libp2pcheck.a: exit $rc, verdicts vs the CLI: $same ($(tr '\n' ' ' <"$OUT/verdicts-cpp.txt"))"
fi

# 7. Both visibility modes give the same verdicts at every level; SM-store bandwidth through the
# IPC mapping (the kernel tier's 16-byte stores over a 1 GiB area, from the audit trace) in both.
if want 7; then
  verdicts() { python3 -c "import json,sys; d=json.load(sys.stdin); print(' '.join(f\"{p['src']}->{p['tgt']}:{p['verdict']}\" for p in d['pairs']))"; }
  for level in copy kernel handshake; do
    one=$("$P2P" --json --level $level --visibility one 2>>"$OUT/levels.log" | verdicts)
    all=$("$P2P" --json --level $level --visibility all 2>>"$OUT/levels.log" | verdicts)
    if [ "$one" = "$all" ] && [ -n "$one" ]; then same=same; else same=DIFFERENT; fi
    say "level $level: visibility one [$one] vs all [$all]: $same"
  done
  for vis in one all; do
    for r in 1 2 3; do
      T=$(mktemp -d)
      "$P2P" --level kernel --kernel-bytes 1073741824 --visibility $vis --trace "$T/trace.jsonl" >/dev/null 2>&1
      python3 scripts/sm-bandwidth.py "$T/trace.jsonl" | sed "s/^/visibility $vis run $r: /" | tee -a "$OUT/bandwidth.txt" >/dev/null
      rm -rf "$T"
    done
  done
  say "SM stores through the mapping (GB/s, 16-byte stores, 256 MiB each, per pair):"
  sort "$OUT/bandwidth.txt" | tee -a "$SUMMARY"
fi
# 9. Trust under stress (issue 15): with a busy torch kernel on every GPU, the verdicts equal
# those without load (5 checks, both engines); nothing reaches vLLM's cache from a run whose
# workers were killed (every worker SIGKILLed as it appears), nor from a CLI killed mid-run.
if want 9; then
  verdicts() { python3 -c "import json,sys; d=json.load(sys.stdin); print(' '.join(f\"{p['src']}->{p['tgt']}:{p['verdict']}\" for p in d['pairs']))" 2>/dev/null; }
  base=$("$P2P" --json 2>>"$OUT/load.log" | verdicts)
  base_vllm=$("$P2P" --json --engine vllm 2>>"$OUT/load.log" | verdicts)
  say "no load: [$base] vllm engine [$base_vllm]"
  python3 - "$N" >"$OUT/load-torch.log" 2>&1 <<'PY' &
import sys, time, torch
n = int(sys.argv[1]); end = time.time() + 120
xs = [torch.randn(8192, 8192, device=f"cuda:{i}", dtype=torch.bfloat16) for i in range(n)]
print("load started", flush=True)
while time.time() < end:
    for x in xs:
        for _ in range(8):
            x @ x
    for i in range(n):
        torch.cuda.synchronize(i)
PY
  LOAD=$!
  for _ in $(seq 1 60); do grep -q "load started" "$OUT/load-torch.log" && break; sleep 0.5; done
  sleep 2
  say "GPU utilisation under load: $(nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader | tr '\n' ' ')"
  same=0; total=0
  for r in 1 2 3 4 5; do
    for engine in default vllm; do
      flag=(); [ $engine = vllm ] && flag=(--engine vllm)
      line=$("$P2P" --json "${flag[@]}" 2>>"$OUT/load.log")
      echo "$line" >>"$OUT/load-json.log"
      got=$(echo "$line" | verdicts)
      want=$base; [ $engine = vllm ] && want=$base_vllm
      total=$((total + 1)); [ "$got" = "$want" ] && same=$((same + 1))
      [ "$got" = "$want" ] || say "under load, run $r, $engine: [$got] differs from [$want]"
      echo "run $r $engine answer_s $(echo "$line" | python3 -c 'import json,sys; print(json.load(sys.stdin)["answer_s"])' 2>/dev/null)" >>"$OUT/load-times.log"
    done
  done
  kill "$LOAD" 2>/dev/null; wait "$LOAD" 2>/dev/null
  say "under load: $same of $total checks gave the unloaded verdicts ($(awk '{print $5}' "$OUT/load-times.log" | sort -n | tr '\n' ' ')s to answer)"
  # Every worker killed as it appears, for the whole run.
  T=$(mktemp -d)
  VLLM_CACHE_ROOT=$T timeout 150 "$P2P" --write-vllm-cache --json >"$OUT/killed.json" 2>"$OUT/killed.err" &
  P=$!
  kills=0; t_end=$((SECONDS + 120))
  while kill -0 "$P" 2>/dev/null && [ $SECONDS -lt $t_end ]; do
    if pkill -KILL -x p2pcheck-worker; then kills=$((kills + 1)); fi
    sleep 0.01
  done
  wait "$P"; rc=$?
  say "workers killed as they appear ($kills kill rounds): exit $rc; files in the cache folder: [$(ls -A "$T" | tr '\n' ' ')]; $(head -c 300 "$OUT/killed.err" | tr '\n' ' ')"
  rm -rf "$T"
  # The first workers killed once, 0.3 s in (during start-up or the pairs): the retry decides.
  T=$(mktemp -d)
  VLLM_CACHE_ROOT=$T timeout 150 "$P2P" --write-vllm-cache --json >"$OUT/killed-once.json" 2>"$OUT/killed-once.err" &
  P=$!; sleep 0.3; pkill -KILL -x p2pcheck-worker; wait "$P"; rc=$?
  say "workers killed once at 0.3 s: exit $rc; cache files [$(ls -A "$T" | tr '\n' ' ')]; $(python3 -c "import json,sys; d=json.load(open('$OUT/killed-once.json')); print(' '.join(f\"{p['src']}->{p['tgt']}:{p['verdict']}/attempts {p['attempts']}\" for p in d['pairs']))" 2>/dev/null) $(head -c 200 "$OUT/killed-once.err" | tr '\n' ' ')"
  rm -rf "$T"
  # Every worker killed at its first cudaIpcOpenMemHandle (start-up done; a 1 GiB kernel tier, the most
  # keeps the pair under way for a while):
  # the retry on fresh workers passes, the verdict is not a fact, nothing is written.
  T=$(mktemp -d)
  VLLM_CACHE_ROOT=$T timeout 150 "$P2P" --write-vllm-cache --json --kernel-bytes 1073741824 --trace "$T/trace.jsonl" >"$OUT/killed-mid.json" 2>"$OUT/killed-mid.err" &
  P=$!
  python3 - "$T/trace.jsonl" "$P" <<'PY' >>"$OUT/killed-mid.err" 2>&1
import os, signal, sys, time
path, parent = sys.argv[1], int(sys.argv[2])
end = time.time() + 60
while time.time() < end:
    try:
        text = open(path).read()
    except OSError:
        text = ""
    if '"call":"cudaIpcOpenMemHandle"' in text:
        pids = set()
        for l in text.splitlines():
            if '"role":"worker"' in l:
                pids.add(int(l.split('"pid":', 1)[1].split(",", 1)[0]))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        print("killed workers", sorted(pids), "at their first cudaIpcOpenMemHandle")
        break
    time.sleep(0.0005)
PY
  wait "$P"; rc=$?
  say "workers killed mid-pair: exit $rc; cache files [$(ls -A "$T" | grep -v trace.jsonl | tr '\n' ' ')]; $(python3 -c "import json,sys; d=json.load(open('$OUT/killed-mid.json')); print(' '.join(f\"{p['src']}->{p['tgt']}:{p['verdict']}/{p['evidence']}/persistable {p['persistable']}/attempts {p['attempts']}\" for p in d['pairs']), 'vllm_cache written', (d.get('vllm_cache') or {}).get('written'))" 2>/dev/null) $(grep -h 'killed workers' "$OUT/killed-mid.err")"
  rm -rf "$T"
  # The CLI itself killed mid-run: no cache file, no temporary file left.
  T=$(mktemp -d)
  VLLM_CACHE_ROOT=$T "$P2P" --write-vllm-cache >/dev/null 2>&1 &
  P=$!; sleep 0.25; kill -KILL "$P"; wait "$P" 2>/dev/null; sleep 1
  say "CLI killed at 0.25 s: files in the cache folder: [$(ls -A "$T" | tr '\n' ' ')]; workers left after 1 s: $(pgrep -xc p2pcheck-worker || true)"
  rm -rf "$T"
fi
sleep 0.5; say "leftover workers: $(pgrep -xc p2pcheck-worker || true)"

echo "================ summary"
cat "$SUMMARY"
