#!/usr/bin/env python3
"""An independent figure for p2pcheck's own-memory copy bandwidth: torch `copy_` between two
buffers of one GPU, timed with torch.cuda events (warm-up, then SAMPLES samples of LOOPS copies
each, median and coefficient of variation), in GB/s of 1e9 bytes, the buffer's size counted once
per copy as p2pcheck and nvbandwidth count a device-local copy. One JSON line per size.
With "peer:MIB:LOOPS", the same for every ordered pair of distinct GPUs (src, tgt): a buffer on
tgt copied from one on src, on tgt's current stream (the data flows src -> tgt, as p2pcheck's
read figure of the pair src->tgt), one line per pair.

With "sm:MIB:LOOPS", an own-memory copy by an elementwise kernel (torch.bitwise_or(a, 0,
out=b): SM loads and stores) instead of copy_ (cudaMemcpy, the copy engines' figure).

usage: torch-copy-bw.py [[peer:|sm:]MIB:LOOPS...]   (default 64:4 256:2); SAMPLES=5 from the
environment
"""
import json
import os
import statistics
import sys

import torch


def figure(mib, loops, samples, src="cuda", tgt="cuda", sm=False):
    n = mib << 20
    a = torch.empty(n, dtype=torch.uint8, device=src).random_(0, 255)
    b = torch.empty(n, dtype=torch.uint8, device=tgt)
    with torch.cuda.device(b.device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        rates = []
        for s in range(samples + 1):
            start.record()
            for _ in range(loops):
                if sm:
                    # An elementwise kernel (SM loads and stores), not cudaMemcpy: the
                    # independent figure for p2pcheck's SM copies.
                    torch.bitwise_or(a, 0, out=b)
                else:
                    b.copy_(a)
            end.record()
            torch.cuda.synchronize()
            if s > 0:  # the first is the warm-up
                rates.append(n * loops / (start.elapsed_time(end) * 1e6))
    assert torch.equal(a.to(b.device), b), "torch copy_ gave wrong bytes"
    mean = statistics.fmean(rates)
    return {"figure": "torch-sm-copy" if sm else "torch-copy", "mib": mib, "loops": loops,
            "gbps": round(statistics.median(rates), 1),
            "cv_pct": round(100 * statistics.pstdev(rates) / mean, 2)}


def peers(mib, loops, samples):
    n = torch.cuda.device_count()
    for s in range(n):
        for t in range(n):
            if s != t:
                f = figure(mib, loops, samples, f"cuda:{s}", f"cuda:{t}")
                f.update(figure="torch-peer", src=s, tgt=t)
                yield f


def main():
    samples = int(os.environ.get("SAMPLES", "5"))
    for arg in sys.argv[1:] or ["64:4", "256:2"]:
        peer = arg.startswith("peer:")
        sm = arg.startswith("sm:")
        mib, loops = (int(x) for x in arg.removeprefix("peer:").removeprefix("sm:").split(":"))
        if peer:
            results = peers(mib, loops, samples)
        else:
            results = [figure(mib, loops, samples, sm=sm)]
        for f in results:
            print(json.dumps(f), flush=True)


if __name__ == "__main__":
    main()
