#!/usr/bin/env python3
"""Clustering thousands of sentences: forkserve's POST /cluster against sentence-transformers
in-process (`encode` + `util.community_detection`), at equal threads, side by side.

    target/bench-venv/bin/python bench/cluster.py                 # run by `make bench`
    target/bench-venv/bin/python bench/cluster.py --sizes 1000 5000 --threads 1

For each size n (1,000, 5,000 and 20,000 by default) and thread count, the same sentences
(scripts/make-cluster-reference.py's generator: templated sentences over 40 topics, with exact
and near duplicates) are clustered at threshold 0.75, min size 1, by:
- forkserve: one worker with `threads` = t, one POST /cluster (plain JSON), timed by the
  client; the worker's private memory (USS, /proc/PID/smaps_rollup) sampled every 20 ms: idle
  before, peak during, and 2 s after the answer;
- sentence-transformers in a fresh process with torch.set_num_threads(t), the model loaded
  first, then `encode(sentences)` + `community_detection` timed; its peak RSS above the RSS
  after loading (getrusage's ru_maxrss).
The two alternate, forkserve first; the communities of both must be the same (compared as
sets of sentences), or the run stops: a fast wrong answer is not a result.

Writes bench/results/cluster.json and bench/results/cluster.md.
"""
import argparse
import http.client
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BIN, MODEL, RESULTS, ROOT, free_port, machine, parse_smaps_rollup  # noqa: E402

spec = importlib.util.spec_from_file_location(
    "make_cluster_reference", os.path.join(ROOT, "scripts", "make-cluster-reference.py"))

THRESHOLD = 0.75

LIBRARY = r"""
import json, os, resource, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from sentence_transformers import SentenceTransformer, util
threads, model_dir, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(threads)
sentences = json.load(open(path))
model = SentenceTransformer(model_dir, device="cpu")
model.encode(["warm up"])
def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
base = rss_kib()
start = time.perf_counter()
embeddings = model.encode(sentences, convert_to_tensor=True)
communities = util.community_detection(embeddings, threshold=float(sys.argv[4]), min_community_size=1)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_above_loaded_kib": peak - base,
                  "communities": [[sentences[i] for i in c] for c in communities]}))
"""


def uss_kib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        m = parse_smaps_rollup(f.read())
    return m["Private_Clean"] + m["Private_Dirty"]


def as_sets(communities):
    return sorted(sorted(c) for c in communities)


def run_forkserve(sentences, threads):
    port = free_port()
    cmd = [BIN, "-c", "/dev/null", "-b", f"127.0.0.1:{port}", "-w", "1", "--threads", str(threads),
           "--model", MODEL, "--log-level", "warn", "--timeout", "120"]
    env = dict(os.environ, FORKSERVE_LOG_ACCESS_LOG="false")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        body = json.dumps({"sentences": ["warm up", "up warm"]})
        worker = None
        deadline = time.monotonic() + 60
        while worker is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("POST", "/cluster", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                worker = int(r.getheader("X-Worker-Pid"))
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        time.sleep(0.5)
        idle = uss_kib(worker)
        peak, stop = [idle], threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], uss_kib(worker))
                except OSError:
                    return
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        body = json.dumps({"sentences": sentences, "threshold": THRESHOLD, "min_cluster_size": 1})
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
        conn.request("POST", "/cluster", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        answer = json.loads(r.read())
        seconds = time.perf_counter() - start
        stop.set()
        sampler.join()
        if r.status != 200:
            raise RuntimeError(f"forkserve answered {r.status}: {answer}")
        time.sleep(2)
        after = uss_kib(worker)
        return {"seconds": seconds, "idle_kib": idle, "peak_kib": peak[0], "after_kib": after,
                "communities": answer["clusters"]}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def run_library(sentences, threads):
    path = os.path.join(ROOT, "target", f"bench-cluster-{len(sentences)}.json")
    with open(path, "w") as f:
        json.dump(sentences, f)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, "-c", LIBRARY, str(threads), MODEL, path, str(THRESHOLD)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)

    rows = []
    for threads in args.threads:
        for n in args.sizes:
            sentences = generator.make_sentences(n)
            ours = run_forkserve(sentences, threads)
            theirs = run_library(sentences, threads)
            same = as_sets(ours["communities"]) == as_sets(theirs["communities"])
            row = {
                "n": n, "threads": threads,
                "forkserve_s": round(ours["seconds"], 2),
                "library_s": round(theirs["seconds"], 2),
                "ratio": round(ours["seconds"] / theirs["seconds"], 2),
                "forkserve_idle_mib": round(ours["idle_kib"] / 1024, 1),
                "forkserve_peak_above_idle_mib": round((ours["peak_kib"] - ours["idle_kib"]) / 1024, 1),
                "forkserve_after_above_idle_mib": round((ours["after_kib"] - ours["idle_kib"]) / 1024, 1),
                "library_peak_above_loaded_mib": round(theirs["peak_above_loaded_kib"] / 1024, 1),
                "communities": len(ours["communities"]),
                "same_communities": same,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
            if not same:
                sys.exit(f"n={n}: forkserve's communities differ from sentence-transformers'")

    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "cluster.json"), "w") as f:
        json.dump({"machine": machine(), "threshold": THRESHOLD, "rows": rows}, f, indent=1)
    lines = [
        "# Clustering n sentences: forkserve vs sentence-transformers in-process",
        "",
        f"`target/bench-venv/bin/python bench/cluster.py` (threshold {THRESHOLD}, min size 1). "
        "forkserve: one worker, one POST /cluster, client-timed; memory is the worker's USS. "
        "sentence-transformers: `encode` + `community_detection` in a fresh process, "
        "torch.set_num_threads(threads); memory is peak RSS above the RSS after loading.",
        "",
        "| n | threads | forkserve s | sentence-transformers s | ratio | forkserve peak MiB above idle | 2 s after, MiB above idle | library peak MiB | communities | same |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['threads']} | {r['forkserve_s']} | {r['library_s']} | {r['ratio']} | "
            f"{r['forkserve_peak_above_idle_mib']} | {r['forkserve_after_above_idle_mib']} | "
            f"{r['library_peak_above_loaded_mib']} | {r['communities']} | "
            f"{'yes' if r['same_communities'] else 'NO'} |")
    with open(os.path.join(RESULTS, "cluster.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
