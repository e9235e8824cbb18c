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

With "triton:MIB:LOOPS", the same copy by a Triton kernel (16-byte accesses), a second
independent SM figure.

usage: torch-copy-bw.py [[peer:|sm:|triton:]MIB:LOOPS...]   (default 64:4 256:2); SAMPLES=5 from the
environment
"""
import json
import os
import statistics
import sys

import torch


def triton_copy():
    """A Triton kernel copying int32 words (16-byte vector accesses): an SM copy compiled by
    another compiler from another source than p2pcheck's p2pc_copy."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)

    def run(a, b):
        x, y = a.view(torch.int32), b.view(torch.int32)
        block = 4096
        copy_kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), BLOCK=block, num_warps=8)

    return run


def figure(mib, loops, samples, src="cuda", tgt="cuda", sm=False, kernel=None):
    n = mib << 20
    a = torch.empty(n, dtype=torch.uint8, device=src).random_(0, 255)
    b = torch.empty(n, dtype=torch.uint8, device=tgt)
    with torch.cuda.device(b.device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        rates = []
        for s in range(samples + 1):
            start.record()
            for _ in range(loops):
                if kernel is not None:
                    kernel(a, b)
                elif sm:
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
    name = "triton-sm-copy" if kernel is not None else "torch-sm-copy" if sm else "torch-copy"
    return {"figure": name, "mib": mib, "loops": loops,
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
        kind = arg.split(":")[0] if arg.count(":") == 2 else ""
        mib, loops = (int(x) for x in arg.split(":")[-2:])
        if kind == "peer":
            results = peers(mib, loops, samples)
        elif kind == "triton":
            try:
                results = [figure(mib, loops, samples, kernel=triton_copy())]
            except Exception as e:  # no Triton here: say so, measure the rest
                print(f"triton copy not measured: {e}", file=sys.stderr)
                results = []
        else:
            results = [figure(mib, loops, samples, sm=kind == "sm")]
        for f in results:
            print(json.dumps(f), flush=True)


if __name__ == "__main__":
    main()
