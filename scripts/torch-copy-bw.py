#!/usr/bin/env python3
"""An independent figure for p2pcheck's own-memory copy bandwidth: torch `copy_` between two
buffers of one GPU, timed with torch.cuda events (warm-up, then SAMPLES samples of LOOPS copies
each, median and coefficient of variation), in GB/s of 1e9 bytes, the buffer's size counted once
per copy as p2pcheck and nvbandwidth count a device-local copy. One JSON line per size.

usage: torch-copy-bw.py [MIB:LOOPS...]   (default 64:4 256:2); SAMPLES=5 from the environment
"""
import json
import os
import statistics
import sys

import torch


def figure(mib, loops, samples):
    n = mib << 20
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rates = []
    for s in range(samples + 1):
        start.record()
        for _ in range(loops):
            b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        if s > 0:  # the first is the warm-up
            rates.append(n * loops / (start.elapsed_time(end) * 1e6))
    assert torch.equal(a, b), "torch copy_ gave wrong bytes"
    mean = statistics.fmean(rates)
    return {"figure": "torch-copy", "mib": mib, "loops": loops,
            "gbps": round(statistics.median(rates), 1),
            "cv_pct": round(100 * statistics.pstdev(rates) / mean, 2)}


def main():
    samples = int(os.environ.get("SAMPLES", "5"))
    for arg in sys.argv[1:] or ["64:4", "256:2"]:
        mib, loops = (int(x) for x in arg.split(":"))
        print(json.dumps(figure(mib, loops, samples)), flush=True)


if __name__ == "__main__":
    main()
