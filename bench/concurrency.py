#!/usr/bin/env python3
"""Batching across requests, alone and repeated: one worker (`threads` = 1), one-sentence
POST /embed under wrk at 1 and at 32 connections, alternated for several rounds, so that the
32-connection rate's ratio to the 1-connection rate (issue 15's target: >= 2.0) comes with
its run-to-run spread. bench/ort.py's concurrency table is one round of this beside the Python
stack.

    target/bench-venv/bin/python bench/concurrency.py [--rounds 3] [--seconds 10] [--bin PATH]
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import ort  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--bin", default=bench.BIN, help="the forkserve binary to measure")
    args = parser.parse_args()
    bench.BIN = args.bin
    server = bench.Server("forkserve", 1, threads=1, model=os.path.join(bench.ROOT, "models", bench.MODEL))
    try:
        server.wait_first_ok()
        rates = {1: [], 32: []}
        for _ in range(args.rounds):
            for connections in rates:
                run = ort.wrk(server, "embed_one.lua", "/embed", connections, args.seconds)
                rates[connections].append(run["requests_per_s"])
        for connections, r in rates.items():
            print(f"{connections:2} connections: {', '.join(f'{x:.0f}' for x in r)} req/s, "
                  f"median {statistics.median(r):.0f}")
        ratios = [b / a for a, b in zip(rates[1], rates[32])]
        print(f"32 / 1 connections by round: {', '.join(f'{x:.2f}' for x in ratios)}; "
              f"of the medians: {statistics.median(rates[32]) / statistics.median(rates[1]):.2f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
