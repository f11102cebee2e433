#!/usr/bin/env python3
"""Memory and start-up of forkserve alone, measured from /proc: PSS / USS of the master and
each worker after N requests, for several worker counts, plus the time from exec to the first
200 on POST /cluster. Standard library only; servers and /proc readers come from bench.py.

    python3 bench/memory.py                    # workers 1,2,4 after 200 requests
    python3 bench/memory.py --long 10000       # also: 2 workers after 10,000 requests
"""
import argparse
import json
import os
import statistics
import sys

from bench import BIN, ROOT, Server, memory, total_pss


def mib(kib):
    return kib / 1024.0


def uss(m):
    return m["Private_Clean"] + m["Private_Dirty"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--starts", type=int, default=3, help="starts per worker count for the start-up median")
    ap.add_argument("--long", type=int, default=0, help="also run 2 workers for this many requests")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "memory.json"))
    args = ap.parse_args()
    if not os.path.exists(BIN):
        raise SystemExit(f"{BIN} missing: run `cargo build --release` (or `make build`)")

    results = {"machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()}, "runs": []}
    for workers in [int(w) for w in args.workers.split(",")]:
        ready = []
        for i in range(args.starts):
            s = Server("forkserve", workers)
            ready.append(s.wait_first_ok())
            if i < args.starts - 1:
                s.stop()
        # The last start stays up for the memory measurement.
        s.wait_all_workers()
        after_ready = memory(s.pid)
        failed = s.load(args.requests)
        after = memory(s.pid)
        s.stop()
        results["runs"].append({
            "workers": workers, "requests": args.requests, "failed": failed,
            "exec_to_first_200_s": ready, "exec_to_first_200_median_s": statistics.median(ready),
            "after_ready": after_ready, "after_requests": after, "total_pss_kib": total_pss(after),
        })

    runs = results["runs"]
    print(f"\nforkserve memory after {args.requests} requests (PSS from /proc/PID/smaps_rollup)\n")
    print("| workers | total PSS MiB | master PSS MiB | worker PSS MiB (each) | worker USS MiB (each) | exec to first 200 (median) |")
    print("|---:|---:|---:|---|---|---:|")
    for r in runs:
        m = r["after_requests"]
        wp = ", ".join(f"{mib(w['Pss']):.1f}" for w in m["workers"])
        wu = ", ".join(f"{mib(uss(w)):.1f}" for w in m["workers"])
        print(f"| {r['workers']} | {mib(r['total_pss_kib']):.1f} | {mib(m['master']['Pss']):.1f} | {wp} | {wu} | {r['exec_to_first_200_median_s']:.3f} s |")
    if len(runs) > 1:
        first, last = runs[0], runs[-1]
        marginal = (last["total_pss_kib"] - first["total_pss_kib"]) / (last["workers"] - first["workers"])
        results["marginal_pss_per_worker_kib"] = marginal
        print(f"\nmarginal PSS per extra worker ({first['workers']} -> {last['workers']} workers): {mib(marginal):.2f} MiB (target <= 8 MiB)")

    if args.long:
        s = Server("forkserve", 2)
        s.wait_first_ok()
        s.load(1000)
        early = memory(s.pid)
        failed = s.load(args.long - 1000)
        late = memory(s.pid)
        s.stop()
        results["long"] = {"workers": 2, "requests": args.long, "failed": failed,
                           "after_1000": early, f"after_{args.long}": late}
        print(f"\n2 workers, PSS / USS per worker after 1,000 and after {args.long:,} requests ({failed} failed):")
        for a, b in zip(early["workers"], late["workers"]):
            print(f"  PSS {mib(a['Pss']):.1f} -> {mib(b['Pss']):.1f} MiB, USS {mib(uss(a)):.1f} -> {mib(uss(b)):.1f} MiB")
        print(f"  total PSS {mib(total_pss(early)):.1f} -> {mib(total_pss(late)):.1f} MiB")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nraw figures: {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
