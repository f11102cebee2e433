#!/usr/bin/env python3
"""Memory and start-up of forkserve, measured from /proc: PSS / USS of the master and each
worker after N requests, for several worker counts, plus the time from exec to the first 200 on
POST /cluster. Standard library only.

    python3 bench/memory.py                    # workers 1,2,4 after 200 requests
    python3 bench/memory.py --long 10000       # also: 2 workers after 10,000 requests
"""
import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "forkserve")
MODEL = os.path.join(ROOT, "models", "all-MiniLM-L6-v2")
SEED = [
    "Dog Walking: 10 Simple Steps", "The Secrets of Dog Walking", "Why You Need To Dog Walking",
    "The Art of Dog Walking", "The Joy of Dog Walking", "Public Speaking For The Modern Age",
    "Learn The Art of Public Speaking", "Master The Art of Public Speaking",
    "The Best Way To Public Speaking",
]
BODY = json.dumps({"sentences": SEED}).encode()


from bench import children, parse_smaps_rollup  # noqa: E402  (same folder)


def smaps(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        m = parse_smaps_rollup(f.read())
    return {
        "rss_kib": m["Rss"],
        "pss_kib": m["Pss"],
        "private_clean_kib": m["Private_Clean"],
        "private_dirty_kib": m["Private_Dirty"],
        "shared_clean_kib": m["Shared_Clean"],
        "shared_dirty_kib": m["Shared_Dirty"],
    }


class Server:
    def __init__(self, workers, extra=()):
        self.log = tempfile.NamedTemporaryFile(prefix="forkserve-bench-", suffix=".log", delete=False)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [BIN, "-c", "/dev/null", "-b", "127.0.0.1:0", "-w", str(workers), "--model", MODEL, *extra],
            stdout=subprocess.DEVNULL, stderr=self.log, cwd=ROOT)
        self.port = None
        deadline = time.monotonic() + 60
        while self.port is None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("server did not start:\n" + open(self.log.name).read())
            m = re.search(r"listening at: http://127\.0\.0\.1:(\d+)", open(self.log.name).read())
            if m:
                self.port = int(m.group(1))
            else:
                time.sleep(0.002)

    def first_ok(self):
        """Seconds from exec to the first 200 on POST /cluster."""
        while True:
            try:
                if self.post() == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.005)

    def post(self, conn=None):
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", "/cluster", BODY, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        if own:
            conn.close()
        return r.status

    def load(self, n, clients=4):
        """n requests from `clients` keep-alive connections; returns the count of non-200."""
        left = [n]
        lock = threading.Lock()
        failed = [0]

        def client():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            while True:
                with lock:
                    if left[0] == 0:
                        break
                    left[0] -= 1
                try:
                    if self.post(conn) != 200:
                        failed[0] += 1
                except (OSError, http.client.HTTPException):
                    failed[0] += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            conn.close()

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return failed[0]

    def memory(self):
        master = self.proc.pid
        return {"master": smaps(master), "workers": [smaps(p) for p in children(master)]}

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        os.unlink(self.log.name)


def total_pss(mem):
    return mem["master"]["pss_kib"] + sum(w["pss_kib"] for w in mem["workers"])


def mib(kib):
    return kib / 1024.0


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
            s = Server(workers)
            ready.append(s.first_ok())
            if i < args.starts - 1:
                s.stop()
        # The last start stays up for the memory measurement.
        after_ready = s.memory()
        failed = s.load(args.requests)
        after = s.memory()
        s.stop()
        results["runs"].append({
            "workers": workers, "requests": args.requests, "failed": failed,
            "exec_to_first_200_s": ready, "exec_to_first_200_median_s": statistics.median(ready),
            "after_ready": after_ready, "after_requests": after,
            "total_pss_kib": total_pss(after),
        })

    runs = results["runs"]
    print(f"\nforkserve memory after {args.requests} requests (PSS from /proc/PID/smaps_rollup)\n")
    print("| workers | total PSS MiB | master PSS MiB | worker PSS MiB (each) | worker USS MiB (each) | exec to first 200 (median) |")
    print("|---:|---:|---:|---|---|---:|")
    for r in runs:
        m = r["after_requests"]
        wp = ", ".join(f"{mib(w['pss_kib']):.1f}" for w in m["workers"])
        wu = ", ".join(f"{mib(w['private_clean_kib'] + w['private_dirty_kib']):.1f}" for w in m["workers"])
        print(f"| {r['workers']} | {mib(r['total_pss_kib']):.1f} | {mib(m['master']['pss_kib']):.1f} | {wp} | {wu} | {r['exec_to_first_200_median_s']:.3f} s |")
    if len(runs) > 1:
        first, last = runs[0], runs[-1]
        marginal = (last["total_pss_kib"] - first["total_pss_kib"]) / (last["workers"] - first["workers"])
        results["marginal_pss_per_worker_kib"] = marginal
        print(f"\nmarginal PSS per extra worker ({first['workers']} -> {last['workers']} workers): {mib(marginal):.2f} MiB (target <= 8 MiB)")

    if args.long:
        s = Server(2)
        s.first_ok()
        s.load(1000)
        early = s.memory()
        failed = s.load(args.long - 1000)
        late = s.memory()
        s.stop()
        results["long"] = {"workers": 2, "requests": args.long, "failed": failed,
                           "after_1000": early, f"after_{args.long}": late}
        print(f"\n2 workers, PSS / USS per worker after 1,000 and after {args.long:,} requests ({failed} failed):")
        for a, b in zip(early["workers"], late["workers"]):
            ua = a["private_clean_kib"] + a["private_dirty_kib"]
            ub = b["private_clean_kib"] + b["private_dirty_kib"]
            print(f"  PSS {mib(a['pss_kib']):.1f} -> {mib(b['pss_kib']):.1f} MiB, USS {mib(ua):.1f} -> {mib(ub):.1f} MiB")
        print(f"  total PSS {mib(total_pss(early)):.1f} -> {mib(total_pss(late)):.1f} MiB")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nraw figures: {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
