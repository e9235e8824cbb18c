#!/usr/bin/env python3
"""Summarises a scripts/gpu-bw.sh run: per figure and size, the median over runs of each run's
median GB/s, the coefficient of variation across runs, the largest within-run CV, wrong bytes,
and the torch figure beside the own-memory ones; then the kernel tier's store study (GB/s and SM
MHz per launch).

usage: bw-table.py OUTDIR
"""
import glob
import json
import os
import statistics
import sys


def main():
    out = sys.argv[1]
    figs, torch, study = {}, {}, {}
    for path in sorted(glob.glob(os.path.join(out, "*.jsonl"))):
        for line in open(path):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "study" in rec:
                study.setdefault(rec["study"], []).append(
                    f"{rec['gbps']:.0f}@{rec['sm_mhz'][0]}-{rec['sm_mhz'][1]}")
            elif rec.get("figure") == "torch-copy":
                torch.setdefault(rec["mib"], []).append(rec["gbps"])
            elif "gbps" in rec:
                key = (rec["figure"], rec["engine"], rec["mib"])
                figs.setdefault(key, []).append(rec)
            elif "latency_ns" in rec:
                figs.setdefault((rec["figure"], "sm", 0), []).append(rec)
    print(f"{'figure':<16}{'MiB':>5} {'median':>9} {'CV runs %':>10} {'max CV in run %':>16} {'wrong':>6} {'runs':>5}")
    for key in sorted(figs):
        recs = figs[key]
        field = "gbps" if "gbps" in recs[0] else "latency_ns"
        vals = [r[field] for r in recs]
        mean = statistics.fmean(vals)
        cv = 100 * statistics.pstdev(vals) / mean if mean else 0
        inrun = max((r.get("cv_pct", 0) for r in recs), default=0)
        bad = sum(r.get("wrong", 0) for r in recs) + sum(0 if r.get("end_ok", 1) else 1 for r in recs)
        unit = "GB/s" if field == "gbps" else "ns"
        print(f"{key[0] + '/' + key[1]:<16}{key[2]:>5} {statistics.median(vals):>9.1f} {cv:>10.2f} {inrun:>16.2f} {bad:>6} {len(vals):>5} {unit}")
    for mib, vals in sorted(torch.items()):
        mean = statistics.fmean(vals)
        own = [r["gbps"] for k, rs in figs.items() if k[0] == "own" and k[2] == mib for r in rs]
        line = f"torch copy_ {mib} MiB: median {statistics.median(vals):.1f} GB/s, CV {100 * statistics.pstdev(vals) / mean:.2f} %"
        for eng in ("ce", "sm"):
            o = [r["gbps"] for r in figs.get(("own", eng, mib), [])]
            if o:
                line += f"; own/{eng} {statistics.median(o):.1f} ({100 * (statistics.median(o) / statistics.median(vals) - 1):+.1f} %)"
        print(line)
    for name, launches in study.items():
        print(f"store study {name}: " + " ".join(launches))


if __name__ == "__main__":
    main()
