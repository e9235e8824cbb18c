#!/usr/bin/env python3
"""SM-store bandwidth through the CUDA IPC mapping, from a p2pcheck audit trace.

usage: sm-bandwidth.py TRACE.jsonl

Reads the JSON-lines trace of a check run with `--level kernel` (or higher) and prints, per pair
of two different GPUs, the consumer's p2pc_pattern_store launches of 16-byte stores (the kernel
tier's widest part, through the peer's memory): bytes / duration (launch to synchronise, so a
lower bound on the bandwidth), in GB/s (1e9 bytes). Same-GPU pairs and other widths are left out.
"""
import json
import sys


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    rates = {}
    with open(sys.argv[1]) as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except ValueError:
                sys.exit(f"line {n}: not JSON")
            job = rec.get("job") or {}
            args = rec.get("args") or {}
            if (rec.get("call") != "p2pc_pattern_store" or rec.get("via")
                    or job.get("role") != "consumer" or job.get("src") == job.get("tgt")
                    or args.get("width") != 16 or not rec.get("dur_us")):
                continue
            key = f"{job['src']}->{job['tgt']}"
            rates.setdefault(key, []).append(args["bytes"] / (rec["dur_us"] * 1e-6) / 1e9)
    if not rates:
        sys.exit("no consumer 16-byte pattern stores between two GPUs in the trace")
    print(" ".join(f"{k} {max(v):.1f}" for k, v in sorted(rates.items())))


if __name__ == "__main__":
    main()
