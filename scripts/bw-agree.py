#!/usr/bin/env python3
"""The short table of scripts/gpu-bandwidth.sh: reads DIR/bw-run*.json (`p2pcheck --bandwidth
--json`), DIR/base-run*.json (the plain check) and DIR/torch.jsonl (scripts/torch-copy-bw.py),
and prints, per pair, each figure's median over the runs (GB/s), its CV across the runs (%),
the largest CV within a run, the latency, the link, floor and slow verdicts, then the agreement
with torch (own memory: GPU 0's same-GPU pair's copy-engine write against torch's device-local copy;
two GPUs: the pair's copy-engine read against torch's copy from src into tgt), and the time the
measurement adds to the check (median answer time, with and without --bandwidth).

usage: bw-agree.py DIR
"""
import glob
import json
import os
import statistics
import sys

FIGURES = ["ce_write", "ce_read", "ce_both", "sm_write", "sm_read", "sm_both"]


def load(pattern):
    runs = []
    for path in sorted(glob.glob(pattern)):
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as e:
            print(f"{os.path.basename(path)}: unreadable ({e})")
    return runs


def cv_pct(values):
    mean = statistics.fmean(values)
    return 100 * statistics.pstdev(values) / mean if mean > 0 else 0.0


def main(d):
    runs, base = load(f"{d}/bw-run*.json"), load(f"{d}/base-run*.json")
    torch = []
    if os.path.exists(f"{d}/torch.jsonl"):
        with open(f"{d}/torch.jsonl") as f:
            torch = [json.loads(line) for line in f if line.strip()]
    if not runs:
        print("no --bandwidth run to read")
        return 1
    per_pair = {}
    for run in runs:
        for p in run["pairs"]:
            per_pair.setdefault((p["src"], p["tgt"]), []).append(p.get("bandwidth"))
    worst_cv = 0.0
    print(f"{len(runs)} runs; GB/s median over runs (CV across runs %, largest CV within a run %)")
    header = "pair   " + "".join(f"{f:>22}" for f in FIGURES) + "  latency ns  link / floor / slow"
    print(header)
    medians = {}
    for (s, t), bws in sorted(per_pair.items()):
        measured = [b for b in bws if b and b.get("figures")]
        failed = [b.get("error") for b in bws if b and b.get("error")]
        if not measured:
            print(f"{s}->{t}  not measured: {failed[:1] or 'no bandwidth field'}")
            continue
        cells = []
        for f in FIGURES:
            g = [b["figures"][f]["gbps"] for b in measured]
            within = max(b["figures"][f]["cv"] for b in measured) * 100
            across = cv_pct(g)
            worst_cv = max(worst_cv, across)
            medians[(s, t, f)] = statistics.median(g)
            cells.append(f"{statistics.median(g):9.1f} ({across:4.2f},{within:4.2f})")
        lat = statistics.median(b["latency_ns"] for b in measured)
        slow = sum(1 for b in measured if b["slow"])
        b0 = measured[0]
        floor = b0["floor_gbps"]
        floor = "none" if floor is None else f"{floor:.0f}"
        note = f"; {len(failed)} failed: {failed[0]}" if failed else ""
        print(f"{s}->{t}  " + " ".join(cells) + f"  {lat:10.0f}  {b0['link']} / {floor} / "
              f"slow {slow} of {len(measured)}{note}")
    print(f"largest CV across runs: {worst_cv:.2f} % (target under 3 %)")
    for t in torch:
        if t["figure"] in ("torch-copy", "torch-sm-copy", "triton-sm-copy"):
            # copy_ is cudaMemcpy (the copy engines' figures); the elementwise kernel is SM work.
            mine = ("ce_write", "ce_read") if t["figure"] == "torch-copy" else ("sm_write", "sm_read")
            for (s, tg, f), g in sorted(medians.items()):
                # torch's copy runs on its current device, GPU 0.
                if s == tg == 0 and f in mine:
                    print(f"own memory GPU {s}: p2pcheck {f} {g:.1f} vs {t['figure']} "
                          f"{t['gbps']:.1f} ({t['mib']} MiB): {100 * (g / t['gbps'] - 1):+.1f} %")
        elif t["figure"] == "torch-peer":
            g = medians.get((t["src"], t["tgt"], "ce_read"))
            if g is not None:
                print(f"{t['src']}->{t['tgt']}: p2pcheck ce_read {g:.1f} vs torch copy_ "
                      f"{t['gbps']:.1f}: {100 * (g / t['gbps'] - 1):+.1f} %")
    if base:
        a = statistics.median(r["answer_s"] for r in runs)
        b = statistics.median(r["answer_s"] for r in base)
        print(f"answer time: {b:.2f} s plain, {a:.2f} s with --bandwidth: +{a - b:.2f} s "
              f"(budget 10 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
