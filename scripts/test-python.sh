#!/usr/bin/env bash
# The Python package as a user gets it (CI; no GPU): build the wheel (cargo, then setup.py
# copies the library, the worker and the CLI into it), check that it is platform-tagged and
# carries them, install it into a fresh virtual environment, import it, run the pytest suite
# on the simulated driver (the Prometheus text parsed by prometheus-client), and validate the
# Kubernetes manifests of docs/fleet/ against Kubernetes' schemas (kubernetes-validate).
# Usage: scripts/test-python.sh [WORK_DIR]   (default: a temp folder, removed at the end)
set -euxo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
work="${1:-}"
if [ -z "$work" ]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
fi
# Ubuntu ships venv (and ensurepip) separately.
if ! python3 -m venv "$work/probe" >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq python3-venv >/dev/null
fi
rm -rf "$work/probe" "$work/build" "$work/venv" "$work/dist"

# The wheel, built in a venv of its own (pip's build isolation fetches setuptools and wheel).
python3 -m venv "$work/build"
"$work/build/bin/python" -m pip install -q --upgrade pip
"$work/build/bin/python" -m pip wheel -q --no-deps -w "$work/dist" "$repo"
wheel="$(ls "$work"/dist/p2pcheck-*.whl)"
case "$wheel" in
  *-none-any.whl) echo "the wheel is not platform-tagged: $wheel" >&2; exit 1 ;;
esac
"$work/build/bin/python" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for want in ["p2pcheck/_bin/libp2pcheck.so", "p2pcheck/_bin/p2pcheck-worker",
             "p2pcheck/_bin/p2pcheck", "p2pcheck/py.typed", "p2pcheck/__init__.py"]:
    assert want in names, f"{want} is not in the wheel: {names}"
print("wheel ok:", sys.argv[1])
PY

# A fresh environment with the wheel and the test tools; run from outside the source tree so
# that only the installed package can be imported.
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip install -q "$wheel" pytest prometheus-client kubernetes-validate
cd "$work"
"$work/venv/bin/python" -c "import p2pcheck; print(p2pcheck.check(simulate=4))"
"$work/venv/bin/p2pcheck" --simulate 2 --format nagios
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider "$repo/python/tests"
"$work/venv/bin/kubernetes-validate" --strict "$repo"/docs/fleet/*.yaml
# The JSON Schema of the check's --json and env --json validates their output.
"$work/venv/bin/python" -m pip install -q jsonschema
"$work/venv/bin/p2pcheck" --json --simulate 2 --fault '0->1:sm-only' > "$work/check.json" || test $? = 1
"$work/venv/bin/p2pcheck" env --json --simulate 2 --fault '0->1:drop-writes' > "$work/env.json"
"$work/venv/bin/python" - "$repo/docs/p2pcheck.schema.json" "$work/check.json" "$work/env.json" <<'PY'
import json, sys, jsonschema
schema = json.load(open(sys.argv[1]))
for path, name in [(sys.argv[2], "check"), (sys.argv[3], "env")]:
    jsonschema.validate(json.load(open(path)), {**schema, "$ref": f"#/$defs/{name}"})
    print("schema ok:", name)
PY
