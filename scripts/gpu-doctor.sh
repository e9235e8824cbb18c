#!/usr/bin/env bash
# `p2pcheck doctor` on the GPU machine, and the facts to confirm it against: nvidia-smi (-q:
# persistence, MIG, compute mode, fabric; topo -m; topo -p2p; nvlink -s), lspci (-tv, and the
# ACSCtl line of every bridge above a GPU), /proc/cmdline, the GPUs' IOMMU group types, this
# process's namespaces. It also records the sysfs and /proc files the doctor read, as a fixture
# tree (tests/fixtures/doctor/<case>/root) for CI. Run through the device tool from the
# repository root:
#     scripts/stage-carry.sh             # here: builds and fills .carry/
#     run: bash scripts/gpu-doctor.sh    # there, with carry [".carry"]
# Logs go under $OUT; the comparison, one line per fact (agrees / DIFFERS / not compared), is
# printed last and kept in $OUT/doctor-summary.txt.
set -uo pipefail
C=${CARRY:-.carry}
OUT=${OUT:-/tmp/p2pcheck-out}
mkdir -p "$OUT"
P2P=$PWD/$C/p2pcheck

"$P2P" doctor >"$OUT/doctor.txt" 2>"$OUT/doctor.stderr"
echo "p2pcheck doctor: exit $?" >"$OUT/doctor.exit"
"$P2P" doctor --json >"$OUT/doctor.json" 2>>"$OUT/doctor.stderr"
cat "$OUT/doctor.txt"

{
  echo "== id -u: $(id -u)"
  echo "== /proc/cmdline"; cat /proc/cmdline
  echo "== namespaces"; readlink /proc/self/ns/pid /proc/self/ns/ipc
  echo "== /sys/class/iommu"; ls /sys/class/iommu 2>&1
  echo "== iommu group types"
  for g in /sys/kernel/iommu_groups/*; do echo "$g: $(cat "$g/type" 2>&1)"; done
} >"$OUT/host-facts.txt" 2>&1
nvidia-smi -q >"$OUT/nvidia-smi-q.txt" 2>&1
nvidia-smi topo -m >"$OUT/topo-m.txt" 2>&1
for cap in r w a n; do nvidia-smi topo -p2p $cap >"$OUT/topo-p2p-$cap.txt" 2>&1; done
nvidia-smi nvlink -s >"$OUT/nvlink-s.txt" 2>&1
nvidia-smi --query-gpu=index,pci.bus_id,driver_version,persistence_mode,compute_mode,mig.mode.current \
  --format=csv,noheader >"$OUT/query-gpu.csv" 2>&1
if command -v lspci >/dev/null; then
  lspci -tv >"$OUT/lspci-tv.txt" 2>&1
else
  echo "lspci is not installed" >"$OUT/lspci-tv.txt"
fi

python3 - "$OUT" <<'EOF'
import json, os, re, shutil, subprocess, sys

out = sys.argv[1]
summary = []
def say(line):
    summary.append(line)

def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"<{e}>"

def cat(path):
    try:
        return open(path).read().strip()
    except OSError as e:
        return f"<{e.strerror}>"

def bus(b):
    """nvidia-smi's 00000000:18:00.0 as sysfs writes it: 0000:18:00.0."""
    d, rest = b.strip().lower().split(":", 1)
    return f"{int(d, 16):04x}:{rest}"

try:
    doc = json.load(open(os.path.join(out, "doctor.json")))
except Exception as e:
    print(f"doctor.json unreadable: {e}")
    sys.exit(0)
gpus = {g["bus_id"]: g for g in doc["gpus"]}
say(f"doctor: {len(gpus)} GPU(s), numbering {doc['numbering']}, "
    f"{len(doc['findings'])} finding(s): " +
    ", ".join(f"{f['rank']}. {f['kind']} ({f['severity']})" for f in doc["findings"]))
def compare(what, ours, theirs):
    verdict = "agrees" if ours == theirs else "DIFFERS"
    say(f"{verdict}: {what}: doctor {ours!r}, system {theirs!r}")

# nvidia-smi --query-gpu: driver, persistence, compute mode, MIG.
index_bus = {}
for line in open(os.path.join(out, "query-gpu.csv")):
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 6:
        continue
    idx, b, driver, pers, compute, mig = parts
    b = bus(b)
    index_bus[int(idx)] = b
    g = gpus.get(b)
    if g is None:
        say(f"not compared: GPU {b} of nvidia-smi is not in the doctor's list")
        continue
    n = g["nvml"] or {}
    if len(index_bus) == 1:
        compare("driver version", (doc["nvml"] or {}).get("driver_version"), driver)
    compare(f"GPU {b} persistence", {True: "Enabled", False: "Disabled"}.get(n.get("persistence")), pers)
    compare(f"GPU {b} compute mode", (n.get("compute_mode") or "").replace("_", " "), compute.replace("_", " "))
    ours_mig = n.get("mig")
    compare(f"GPU {b} MIG", "Enabled" if ours_mig and ours_mig["current"] else ("[N/A]" if ours_mig is None else "Disabled"), mig)

# nvidia-smi -q: the fabric state and status per GPU.
q = open(os.path.join(out, "nvidia-smi-q.txt")).read()
for block in re.split(r"\n(?=GPU [0-9A-Fa-f]{8}:)", q)[1:]:
    b = bus(block.split()[1])
    m = re.search(r"\n\s+Fabric\s*\n\s+State\s+:\s*(.+)\n\s+Status\s+:\s*(.+)", block)
    g = gpus.get(b)
    if not g or not m:
        say(f"not compared: fabric of {b} (no Fabric section)")
        continue
    fab = (g["nvml"] or {}).get("fabric")
    ours = "N/A" if fab is None else fab["state"]
    compare(f"GPU {b} fabric state", ours.lower(), m.group(1).strip().lower())

# nvidia-smi nvlink -s: links and inactive links per GPU.
text = open(os.path.join(out, "nvlink-s.txt")).read()
for block in re.split(r"\n(?=GPU \d+:)", "\n" + text):
    m = re.match(r"\s*GPU (\d+):", block)
    if not m:
        continue
    b = index_bus.get(int(m.group(1)))
    links = re.findall(r"Link \d+: (.+)", block)
    up = sum(1 for l in links if "inactive" not in l)
    g = gpus.get(b)
    if g and g["nvml"] is not None:
        ours = g["nvml"]["nvlinks"]
        compare(f"GPU {b} NVLink links up/total", f"{sum(ours)}/{len(ours)}", f"{up}/{len(links)}")

# nvidia-smi topo -m and topo -p2p: each pair's path and the driver's P2P status.
def matrix(name):
    rows = [l.split() for l in open(os.path.join(out, name)).read().splitlines()]
    cells = {}
    for r in rows:
        if r and re.fullmatch(r"GPU\d+", r[0]):
            i = int(r[0][3:])
            for j, c in enumerate(r[1:1 + len(index_bus)]):
                cells[(i, j)] = c
    return cells
topo = matrix("topo-m.txt")
p2p = {cap: matrix(f"topo-p2p-{cap}.txt") for cap in "rwan"}
by_bus = {b: i for i, b in index_bus.items()}
for p in doc["pairs"]:
    a, b = (doc["gpus"][k]["bus_id"] for k in p["gpus"])
    i, j = by_bus.get(a), by_bus.get(b)
    if i is None or j is None:
        continue
    cell = topo.get((i, j), "?")
    ours = "NV" if p["nvlink"] else p["path"]
    compare(f"pair {a}-{b} topology", ours, "NV" if cell.startswith("NV") else cell)
    if p["nvml_p2p"]:
        for cap, key in zip("rwan", ["read", "write", "atomics", "nvlink"]):
            theirs = p2p[cap].get((i, j), "?")
            compare(f"pair {a}-{b} P2P {key}", "OK" if p["nvml_p2p"][key] == 0 else "not OK",
                    "OK" if theirs == "OK" else "not OK")

# The IOMMU group type of each GPU, and the kernel command line.
for g in doc["gpus"]:
    if g["iommu_group"] is not None:
        t = cat(f"/sys/kernel/iommu_groups/{g['iommu_group']}/type")
        compare(f"GPU {g['bus_id']} IOMMU group {g['iommu_group']} type", g["iommu_type"], t)
    else:
        has = os.path.exists(f"/sys/bus/pci/devices/{g['bus_id']}/iommu_group")
        compare(f"GPU {g['bus_id']} has an IOMMU group", False, has)
words = cat("/proc/cmdline").split()
theirs = [w for w in words if "iommu" in w.split("=")[0] or w.split("=")[0] == "pci" or "acs" in w.split("=")[0]]
compare("kernel command line IOMMU/ACS settings", doc["iommu"]["cmdline"], theirs)
for ns in doc["host"]["namespaces"]:
    try:
        theirs = os.readlink(f"/proc/self/ns/{ns['kind']}")
    except OSError as e:
        theirs = f"<{e.strerror}>"
    compare(f"{ns['kind']} namespace", ns["this"], theirs)

# lspci -vvv's ACSCtl line of each bridge above a GPU.
acs_log = []
for br in doc["bridges"]:
    text = run("lspci", "-vvv", "-s", br["bus_id"]) if shutil.which("lspci") else ""
    acs_log.append(f"== {br['bus_id']}\n{text}")
    line = next((l.strip() for l in text.splitlines() if "ACSCtl" in l), None)
    acs = br["acs"]
    if not shutil.which("lspci"):
        say(f"not compared: ACS of {br['bus_id']} (lspci is not installed)")
    elif acs["state"] == "unreadable":
        say(f"not compared: ACS of {br['bus_id']}: the doctor could not read it ({acs['why']})")
    elif line is None:
        compare(f"bridge {br['bus_id']} has ACS", acs["state"] == "present", False)
    else:
        names = ["SrcValid", "TransBlk", "ReqRedir", "CmpltRedir", "UpstreamFwd", "EgressCtrl", "DirectTrans"]
        keys = ["source_validation", "translation_blocking", "p2p_request_redirect",
                "p2p_completion_redirect", "upstream_forwarding", "p2p_egress_control",
                "direct_translated"]
        bits = acs["control_bits"] or {}
        ours = " ".join(n + ("+" if bits.get(k) else "-") for n, k in zip(names, keys))
        theirs = " ".join(w for w in line.split()[1:] if w.rstrip("+-") in names)
        compare(f"bridge {br['bus_id']} ACSCtl", ours, theirs)
open(os.path.join(out, "lspci-acs.txt"), "w").write("\n".join(acs_log))

# The files the doctor read, as a fixture tree.
root = os.path.join(out, "fixture", "root")
shutil.rmtree(os.path.dirname(root), ignore_errors=True)
def keep(path):
    """Copies `path` (a file, or a link as a link) into the tree."""
    dst = root + path
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        if os.path.islink(path):
            os.symlink(os.readlink(path), dst)
        elif os.path.isfile(path):
            with open(path, "rb") as f:
                data = f.read(65536)
            with open(dst, "wb") as f:
                f.write(data)
    except OSError as e:
        say(f"fixture: {path} not recorded: {e}")
for p in ["/proc/cmdline", "/proc/sys/kernel/random/boot_id", "/proc/driver/nvidia/version",
          "/proc/self/cgroup", "/proc/self/ns/pid", "/proc/self/ns/ipc"]:
    keep(p)
for g in doc["gpus"]:
    b = g["bus_id"]
    keep(f"/proc/driver/nvidia/gpus/{b}/information")
    for dev in [b] + g["upstream"]:
        link = f"/sys/bus/pci/devices/{dev}"
        keep(link)
        real = os.path.realpath(link)
        for f in ["config", "numa_node", "iommu_group"]:
            keep(f"{real}/{f}")
    keep(f"/sys/bus/pci/drivers/nvidia/{b}")
    if g["iommu_group"] is not None:
        keep(f"/sys/kernel/iommu_groups/{g['iommu_group']}/type")
for u in os.listdir("/sys/class/iommu") if os.path.isdir("/sys/class/iommu") else []:
    os.makedirs(os.path.join(root, "sys/class/iommu", u), exist_ok=True)

open(os.path.join(out, "doctor-summary.txt"), "w").write("\n".join(summary) + "\n")
print("\n".join(summary))
EOF
