#!/usr/bin/env python3
"""A worker's memory while it embeds long sentences: the forward pass's activations at their
bound (`max_batch_tokens`, 8192 tokens by default), which short titles never reach.

    target/bench-venv/bin/python bench/long_sentences_memory.py
    target/bench-venv/bin/python bench/long_sentences_memory.py --sentences 512 --words 120 --bin OTHER

One worker, `threads` = 1, one POST /cluster of n sentences of `words` random words each (with
a number per word, so ~2 tokens a word: 120 words reach the model's 256-token truncation).
Prints the time, and the worker's private memory (USS, sampled every 20 ms): idle before, the
peak during, and 2 s after the answer (bench/cluster.py's `run_forkserve`).
"""
import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import cluster  # noqa: E402

WORDS = ("the a model server worker memory request sentence cluster vector weight token batch "
         "pass layer attention kernel cache thread process signal socket config timeout fork "
         "shared page").split()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--words", type=int, default=120)
    parser.add_argument("--bin", default=bench.BIN, help="the forkserve binary to measure")
    args = parser.parse_args()
    rng = random.Random(7)
    sentences = [" ".join(f"{rng.choice(WORDS)}{rng.randint(0, 99)}" for _ in range(args.words))
                 for _ in range(args.sentences)]
    cluster.BIN = args.bin
    r = cluster.run_forkserve(sentences, threads=1)
    print(f"{args.sentences} sentences of {args.words} words: {r['seconds']:.1f} s; worker USS "
          f"idle {r['idle_kib'] / 1024:.1f} MiB, peak {r['peak_kib'] / 1024:.1f} MiB, "
          f"2 s after {r['after_kib'] / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
