#!/usr/bin/env python3
"""Builds of forkserve side by side with ONNX Runtime: the A/B behind the "measured side by
side" figures of commit messages and code comments.

    target/bench-venv/bin/python bench/ab.py --bins target/release/forkserve,/tmp/other \\
        [--sizes 1,8,32,128] [--repeats 15] [--threads 1]

One server per build (one worker, `threads`), all started at once, and ORT in-process; for
each size, every repeat sends the same distinct short titles to each build and to ORT, the
order rotating from one repeat to the next, 50 ms apart (bench/ort.py's pacing). Prints, per
size, ORT's median time, and each build's median time, its ratio to ORT, and its forward
passes alone (`forkserve_inference_duration_seconds`). FORKSERVE_MODEL_PRECISION=f16 in the
environment measures f16 weights.
"""
import argparse
import http.client
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import ort  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bins", required=True, help="comma-separated forkserve binaries")
    parser.add_argument("--sizes", default="1,8,32,128")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    bins = args.bins.split(",")
    model_dir = os.path.join(bench.ROOT, "models", bench.MODEL)
    onnx = ort.export(model_dir)
    servers = []
    try:
        for path in bins:
            bench.BIN = path
            servers.append(bench.Server("forkserve", 1, threads=args.threads, model=model_dir))
        for server in servers:
            server.wait_first_ok()
        encoder = ort.OrtEncoder(onnx, model_dir, args.threads)
        conns = [http.client.HTTPConnection("127.0.0.1", s.port, timeout=300) for s in servers]
        for n in (int(x) for x in args.sizes.split(",")):
            times = {i: [] for i in range(len(bins) + 1)}  # the last one is ORT
            passes = {i: [] for i in range(len(bins))}
            for conn in conns:
                ort.embed(conn, ort.titles(n, 99))
            encoder.encode(ort.titles(n, 99))
            for rep in range(args.repeats):
                texts = ort.titles(n, rep * 7 + n)
                order = list(times)
                order = order[rep % len(order):] + order[:rep % len(order)]
                for i in order:
                    time.sleep(0.05)
                    if i == len(bins):
                        t = time.perf_counter()
                        encoder.encode(texts)
                        times[i].append((time.perf_counter() - t) * 1000)
                        continue
                    before = ort.pass_seconds(servers[i].port)
                    t = time.perf_counter()
                    ort.embed(conns[i], texts)
                    times[i].append((time.perf_counter() - t) * 1000)
                    passes[i].append((ort.pass_seconds(servers[i].port) - before) * 1000)
            base = statistics.median(times[len(bins)])
            line = f"{n:4} sentences, threads {args.threads}: ORT {base:7.2f} ms"
            for i, path in enumerate(bins):
                ms = statistics.median(times[i])
                line += (f" | {os.path.basename(path)} {ms:7.2f} ms ({ms / base:.2f}),"
                         f" passes {statistics.median(passes[i]):.2f}")
            print(line, flush=True)
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
