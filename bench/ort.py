#!/usr/bin/env python3
"""forkserve against ONNX Runtime, the engine users pick for CPU embedding (what
text-embeddings-inference's ORT backend and fastembed run), and the concurrency table.

    target/bench-venv/bin/python bench/ort.py             # run by `make bench`
    target/bench-venv/bin/python bench/ort.py --quick     # fewer repeats, shorter wrk runs

1. Exports the model to ONNX itself (torch.onnx.export of the transformer, then ORT's
   transformer optimizer, as ORT's documentation recommends for BERT-like models), under
   target/bench-models/<model>-onnx/, once.
2. Checks ORT's embeddings against tests/data/reference/ (cos >= 0.9999) before timing
   anything: a fast wrong answer is not a result.
3. Latency, side by side: forkserve's POST /embed over HTTP (one worker, `threads` = 1 or 2)
   against ORT in-process (tokenize + run + mean pooling + normalize, intra-op threads = 1 or
   2), for 1, 8, 32 and 128 distinct short titles, alternating the two on every repeat;
   medians and their ratio. Beside them, forkserve's forward passes alone as the server times
   them (`forkserve_inference_duration_seconds` in /metrics), and the rest of each request.
4. Concurrency: one-sentence POST /embed and the seed POST /cluster at 1, 4 and 32 connections
   (wrk), forkserve against the Python stack, one worker each on one core (forkserve
   `threads = 1`, torch `OMP_NUM_THREADS=1`).
5. The CPU's clock, measured with a chain of dependent adds (one cycle each), and one core's
   f32 peak, measured with a loop of independent multiply-adds (AVX-512 or AVX2), so the share
   of peak assumes neither a nominal frequency nor a number of FMA pipes.

Writes bench/results/ort.json and bench/results/ort.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import http.client

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (  # noqa: E402
    MODEL, RESULTS, ROOT, Server, amx_bf16, forward_flops, machine, parse_wrk, token_lengths,
)

ONNX_DIR = os.path.join(ROOT, "target", "bench-models")
REFERENCE = os.path.join(ROOT, "tests", "data", "reference")
SIZES = [1, 8, 32, 128]
TITLE_WORDS = ("river garden morning quiet engineer music coffee market winter student ancient "
               "city bright forest paper window travel kitchen lesson ocean planet careful doctor "
               "evening story mountain simple yellow history museum bridge letter").split()


def titles(n, salt):
    """n distinct short titles (4-6 words), different for every `salt`: no cache can help."""
    out = []
    for i in range(n):
        k = salt * 1009 + i * 13
        words = [TITLE_WORDS[(k + j * 7) % len(TITLE_WORDS)] for j in range(4 + i % 3)]
        out.append(" ".join(words).capitalize() + f" {salt}-{i}")
    return out


# ---------------------------------------------------------------------------------------------
# The CPU clock


CLOCK_C = r"""
#include <stdio.h>
#include <stdint.h>
#include <time.h>
/* A chain of dependent integer adds retires one per cycle on every x86 core of the last
   decade; the compiler must not fold it, hence the empty asm that hides x's value. The addend
   is a register the compiler cannot know (argc, 1): Intel's recent cores fold adds of an
   immediate at renaming, several a cycle (an Intel Xeon with AMX here read 19.4 GHz with
   `add $1`; 4.1 GHz with a register, as a chain of 3-cycle imuls also gives). */
int main(int argc, char **argv) {
    (void)argv;
    const uint64_t n = 400000000ull;
    struct timespec a, b;
    uint64_t x = 0, one = (uint64_t)argc;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (uint64_t i = 0; i < n; i += 8) {
        __asm__ volatile("add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\t"
                         "add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0" : "+r"(x) : "r"(one));
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    printf("%.1f\n", (double)x / s / 1e6);
    return 0;
}
"""


# Independent fused multiply-adds on registers only: what one core's vector units can do, so
# the share of peak need not assume how many FMA pipes, or how wide, the core has. 12
# accumulators hide the FMA's latency and leave AVX2's 16 registers room for the two operands
# (with 16 they spilled: two thirds of the rate, 78.5 against 119.9 GFLOP/s here); VEC is 16 lanes (AVX-512) or 8 (AVX2), set at compile time. The printed
# sum depends on every accumulator, so the compiler cannot drop the work.
PEAK_C = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
#ifdef __AVX512F__
typedef __m512 v; enum { VEC = 16 };
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#else
typedef __m256 v; enum { VEC = 8 };
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#endif
int main(void) {
    const long n = 50000000;
    v a[12], b = SET1(0.999f), c = SET1(0.001f);
    for (int j = 0; j < 12; j++) a[j] = SET1((float)j);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++) {
#pragma GCC unroll 12
        for (int j = 0; j < 12; j++) a[j] = FMA(a[j], b, c);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    float sum = 0;
    for (int j = 0; j < 12; j++) sum += ((float *)&a[j])[0];
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("%.1f %f\n", n * 12.0 * VEC * 2 / s / 1e9, sum);
    return 0;
}
"""


def measured_peak_gflops(simd):
    """One core's f32 multiply-add peak in GFLOP/s, measured: the median of 5 runs of PEAK_C."""
    flags = ["-mavx512f"] if simd == "AVX-512" else ["-mavx2", "-mfma"]
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "peak.c"), os.path.join(d, "peak")
        with open(src, "w") as f:
            f.write(PEAK_C)
        subprocess.run(["gcc", "-O2", *flags, "-o", exe, src], check=True)
        return statistics.median(float(subprocess.run([exe], capture_output=True, text=True, check=True).stdout.split()[0])
                                 for _ in range(5))


def measured_mhz():
    """The core's clock under load, in MHz: the median of 5 runs of the add chain (gcc)."""
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "clock.c"), os.path.join(d, "clock")
        with open(src, "w") as f:
            f.write(CLOCK_C)
        subprocess.run(["gcc", "-O1", "-o", exe, src], check=True)
        return statistics.median(float(subprocess.run([exe], capture_output=True, text=True, check=True).stdout)
                                 for _ in range(5))


# ---------------------------------------------------------------------------------------------
# ONNX Runtime


def export(model_dir):
    """The model's transformer as ONNX, optimized by ORT's transformer optimizer; built once."""
    name = os.path.basename(os.path.normpath(model_dir))
    out_dir = os.path.join(ONNX_DIR, f"{name}-onnx")
    optimized = os.path.join(out_dir, "model.optimized.onnx")
    if os.path.exists(optimized):
        return optimized
    os.makedirs(out_dir, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel
    from onnxruntime.transformers import optimizer

    class Transformer(torch.nn.Module):
        """The encoder with named inputs and one output: transformers' positional order varies."""

        def __init__(self):
            super().__init__()
            # Eager attention: the pattern ORT's optimizer fuses into its Attention operator.
            self.inner = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    model = Transformer().eval()
    ids = torch.ones((2, 8), dtype=torch.long)
    mask = torch.ones((2, 8), dtype=torch.long)
    types = torch.zeros((2, 8), dtype=torch.long)
    raw = os.path.join(out_dir, "model.onnx")
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "token_type_ids": {0: "batch", 1: "seq"}, "last_hidden_state": {0: "batch", 1: "seq"}}
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask, types), raw, dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state"], dynamic_axes=axes)
    cfg = model.inner.config
    opt = optimizer.optimize_model(raw, model_type="bert", num_heads=cfg.num_attention_heads,
                                   hidden_size=cfg.hidden_size)
    opt.save_model_to_file(optimized)
    return optimized


class OrtEncoder:
    """What an ORT user runs: the model's own tokenizer, the session, mean pooling, normalize."""

    def __init__(self, onnx_path, model_dir, threads):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        with open(os.path.join(model_dir, "sentence_bert_config.json")) as f:
            max_len = json.load(f).get("max_seq_length", 256)
        self.tokenizer.enable_truncation(max_length=max_len)
        self.tokenizer.enable_padding()

    def encode(self, texts):
        import numpy as np

        enc = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(None, feed)[0]
        m = mask[..., None].astype(np.float32)
        pooled = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
        return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


def check_fidelity(encoder, model_name):
    """Minimum cosine of ORT's embeddings against sentence-transformers' recorded ones."""
    import numpy as np

    with open(os.path.join(REFERENCE, f"{model_name}.json")) as f:
        recorded = json.load(f)
    texts = recorded["sentences"]
    ref = np.array(recorded["embeddings"], dtype=np.float32)
    got = encoder.encode(texts)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    return float((got * ref).sum(1).min())


# ---------------------------------------------------------------------------------------------
# The sections


def embed(conn, texts):
    conn.request("POST", "/embed", json.dumps({"inputs": texts}), {"Content-Type": "application/json"})
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        raise RuntimeError(f"/embed answered {r.status}: {body[:200]!r}")


def section_latency(onnx_path, model_dir, threads_list, sizes, repeats, precision="f32"):
    rows = []
    for threads in threads_list:
        # model.precision through the environment the server inherits.
        os.environ["FORKSERVE_MODEL_PRECISION"] = precision
        try:
            server = Server("forkserve", 1, threads=threads, model=model_dir)
        finally:
            del os.environ["FORKSERVE_MODEL_PRECISION"]
        try:
            server.wait_first_ok()
            ort_enc = OrtEncoder(onnx_path, model_dir, threads)
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
            for n in sizes:
                warm = titles(n, 10_000 + n)
                embed(conn, warm)
                ort_enc.encode(warm)
                fs, ort_ms, pass_ms = [], [], []
                # Read after each request, not just before the next: a request right before
                # the timed one would wake the server that the pause let go idle.
                pass_seconds_so_far = pass_seconds(server.port)
                for rep in range(repeats):
                    texts = titles(n, rep * 7 + n)
                    # Alternate which goes first so drift on a shared machine hits both.
                    order = ["fs", "ort"] if rep % 2 == 0 else ["ort", "fs"]
                    for who in order:
                        # ORT's idle intra-op threads spin for a while after each run; a pause
                        # keeps them off the core forkserve's second thread needs, and the
                        # other way round.
                        time.sleep(0.05)
                        t = time.perf_counter()
                        if who == "fs":
                            embed(conn, texts)
                            fs.append((time.perf_counter() - t) * 1000)
                            before, pass_seconds_so_far = pass_seconds_so_far, pass_seconds(server.port)
                            pass_ms.append(1000 * (pass_seconds_so_far - before))
                        else:
                            ort_enc.encode(texts)
                            ort_ms.append((time.perf_counter() - t) * 1000)
                lengths = token_lengths(server.port, titles(n, 0))
                row = {"threads": threads, "precision": precision, "sentences": n, "tokens": sum(lengths),
                       "gflop": forward_flops(lengths, model_dir) / 1e9,
                       "forkserve_ms": statistics.median(fs), "ort_ms": statistics.median(ort_ms),
                       "forkserve_runs_ms": fs, "ort_runs_ms": ort_ms}
                row["ratio"] = row["forkserve_ms"] / row["ort_ms"]
                # The request's forward passes alone, as the server timed them: the rest of its
                # time is HTTP, JSON, tokenizing and the wake-ups between threads and processes.
                row["pass_ms"] = statistics.median(pass_ms)
                row["pass_ratio"] = row["pass_ms"] / row["ort_ms"]
                row["outside_pass_ms"] = statistics.median(f - p for f, p in zip(fs, pass_ms))
                rows.append(row)
                print(f"  threads {threads}, {precision}, {n:4} sentences: forkserve {row['forkserve_ms']:8.2f} ms, "
                      f"ORT {row['ort_ms']:8.2f} ms, ratio {row['ratio']:.2f}", flush=True)
            conn.close()
        finally:
            server.stop()
    return rows


def wrk(server, script, path, connections, seconds):
    cmd = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency",
           "--timeout", "30s", "-s", os.path.join(ROOT, "bench", "wrk", script),
           f"http://127.0.0.1:{server.port}{path}"]
    return parse_wrk(subprocess.run(cmd, capture_output=True, text=True).stdout)


def section_concurrency(model_dir, connections, seconds):
    """One worker on one core per stack; requests/s and p50/p99 under wrk. Where the CPU has
    AMX, forkserve with `model.precision = "bf16"` too."""
    rows = []
    kinds = ["forkserve", "python"] + (["forkserve_bf16"] if amx_bf16() else [])
    os.environ["OMP_NUM_THREADS"] = "1"  # the Python stack's worker: one core, like forkserve's
    servers = {}
    try:
        for kind in kinds:
            if kind == "forkserve_bf16":
                os.environ["FORKSERVE_MODEL_PRECISION"] = "bf16"
            try:
                servers[kind] = Server(kind.removesuffix("_bf16"), 1, threads=1, model=model_dir)
            finally:
                os.environ.pop("FORKSERVE_MODEL_PRECISION", None)
            servers[kind].wait_first_ok()
        for request, script, path in [("one sentence /embed", "embed_one.lua", "/embed"),
                                      ("seed /cluster (9 titles)", "cluster.lua", "/cluster")]:
            for c in connections:
                row = {"request": request, "connections": c}
                for kind in kinds:
                    row[kind] = wrk(servers[kind], script, path, c, seconds)
                rows.append(row)
                print(f"  {request}, {c:2} connections: " + ", ".join(
                    f"{k} {row[k]['requests_per_s']} req/s (p50 {row[k]['latency_ms'].get('p50')} ms)"
                    for k in kinds), flush=True)
        rows.append({"metrics": metrics_batches(servers["forkserve"].port)})
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        for s in servers.values():
            s.stop()
    return rows


def section_head_of_line(model_dir):
    """A one-word /embed sent 0.5 s into a /cluster of 400 sentences of ~250 tokens (0.5 MB),
    one worker, threads = 1, default max_batch_tokens: its latency, against the time of one
    full pass (a lone /embed of as many of those sentences as fill max_batch_tokens)."""
    import threading

    words = TITLE_WORDS
    long_text = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(240)) + f" {i}." for i in range(400)]
    server = Server("forkserve", 1, threads=1, model=model_dir)
    try:
        server.wait_first_ok()
        port = server.port
        per_pass = max(1, 8192 // max(token_lengths(port, long_text[:1])))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        embed(conn, long_text[:per_pass])  # warm
        passes = []
        for i in range(3):
            t = time.perf_counter()
            embed(conn, long_text[per_pass * (i + 1):per_pass * (i + 2)])
            passes.append((time.perf_counter() - t) * 1000)
        big = {}

        def run_big():
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            t = time.perf_counter()
            c.request("POST", "/cluster", json.dumps({"sentences": long_text}), {"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            big["status"], big["ms"] = r.status, (time.perf_counter() - t) * 1000

        th = threading.Thread(target=run_big)
        th.start()
        time.sleep(0.5)
        t = time.perf_counter()
        embed(conn, ["coffee"])
        small_ms = (time.perf_counter() - t) * 1000
        th.join()
        conn.close()
        row = {"pass_sentences": per_pass, "pass_ms": statistics.median(passes), "small_ms": small_ms,
               "big_ms": big.get("ms"), "big_status": big.get("status")}
        row["small_in_passes"] = small_ms / row["pass_ms"]
        print(f"  head of line: one word answered in {small_ms:.0f} ms = {row['small_in_passes']:.2f} passes "
              f"of {row['pass_ms']:.0f} ms, while the 400-sentence /cluster took {row['big_ms']:.0f} ms", flush=True)
        return row
    finally:
        server.stop()


def metrics_lines(port, prefix):
    """The lines of forkserve's /metrics that start with `prefix`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return [line for line in text.splitlines() if line.startswith(prefix)]


def pass_seconds(port):
    """Seconds forkserve has spent in forward passes so far (`forkserve_inference_duration_seconds`)."""
    lines = metrics_lines(port, "forkserve_inference_duration_seconds_sum ")
    return float(lines[0].split()[1]) if lines else 0.0


def metrics_batches(port):
    """forkserve's histogram of requests per forward pass, from /metrics, after the runs."""
    return metrics_lines(port, "forkserve_inference_batch_requests")


def report(result):
    m = result["machine"]
    out = [f"# forkserve vs ONNX Runtime ({result['model']})", "",
           f"Machine: {m['cpus']} × {m['cpu_model']}, {m['simd']}, clock measured {result['mhz']:.0f} MHz "
           f"(dependent-add chain); one core's f32 peak measured by a loop of independent {m['simd']} "
           f"multiply-adds: {result['peak_gflops']:.1f} GFLOP/s ({result['peak_gflops'] * 1000 / result['mhz']:.1f} "
           f"flop/cycle at that clock; the nominal {m['flop_per_cycle']} would make it "
           f"{result['mhz'] / 1000 * m['flop_per_cycle']:.1f}). Shares of peak below are of the measured one. ORT {result['ort_version']}, embeddings checked first: "
           f"min cos {result['ort_min_cos']:.6f} against sentence-transformers.", "",
           "## Latency: forkserve POST /embed over HTTP vs ORT in-process (median)", "",
           "| threads | forkserve weights | sentences | tokens | forkserve | ORT | forkserve / ORT | forkserve share of peak "
           "| forkserve's passes alone | passes / ORT | the rest of a request |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["latency"]:
        share = r["gflop"] / (r["forkserve_ms"] / 1000) / (result["peak_gflops"] * r["threads"])
        out.append(f"| {r['threads']} | {r.get('precision', 'f32')} | {r['sentences']} | {r['tokens']} | {r['forkserve_ms']:.2f} ms | "
                   f"{r['ort_ms']:.2f} ms | {r['ratio']:.2f} | {share:.0%} | "
                   + (f"{r['pass_ms']:.2f} ms | {r['pass_ratio']:.2f} | {r['outside_pass_ms']:.2f} ms |" if "pass_ms" in r else "| | |"))
    out += ["", "Ratio below 1: forkserve is faster (its time includes HTTP and JSON; ORT's does not). "
            "\"Passes alone\" is the server's own timing of each request's forward passes "
            "(`forkserve_inference_duration_seconds` in `/metrics`, read before and after every request, outside the "
            "timing; tokens to pooled vectors); \"the rest\" is each request's time minus its passes: HTTP over "
            "loopback, JSON, tokenizing and the wake-ups of the threads and processes involved, which ORT in-process does "
            "not have. "
            "ORT's weights are f32 in every row; \"f16\" rows are forkserve with `model.precision = \"f16\"`, "
            "\"bf16\" rows with `model.precision = \"bf16\"` (inputs and weights of the linear layers in bfloat16 on "
            "AMX tiles: their share is of the f32 peak, which AMX exceeds).", "",
            "## Concurrency: one worker on one core per stack (wrk, req/s, p50 / p99 ms)", ""]
    bf16 = any("forkserve_bf16" in r for r in result["concurrency"])
    out += ["| request | connections | forkserve | Python stack | forkserve / Python |"
            + (" forkserve, bf16 |" if bf16 else ""),
            "| --- | ---: | ---: | ---: | ---: |" + (" ---: |" if bf16 else "")]
    for r in result["concurrency"]:
        if "request" not in r:
            continue
        f, p = r["forkserve"], r["python"]

        def cell(x):
            lat = x["latency_ms"]
            return f"{x['requests_per_s'] or 0:.0f} ({lat.get('p50', 0):.0f} / {lat.get('p99', 0):.0f})"
        ratio = (f["requests_per_s"] or 0) / (p["requests_per_s"] or float("nan"))
        out.append(f"| {r['request']} | {r['connections']} | {cell(f)} | {cell(p)} | {ratio:.2f} |"
                   + (f" {cell(r['forkserve_bf16'])} |" if "forkserve_bf16" in r else ""))
    batches = [r["metrics"] for r in result["concurrency"] if "metrics" in r]
    if batches:
        out += ["", "forkserve's requests per forward pass over these runs (`/metrics`):", "", "```"]
        out += batches[0] + ["```"]
    h = result.get("head_of_line")
    if h:
        out += ["", "## A small request behind a large one (one worker, threads = 1, max_batch_tokens 8192)", "",
                f"A one-word POST /embed sent 0.5 s into a POST /cluster of 400 sentences of ~250 tokens: "
                f"answered in {h['small_ms']:.0f} ms, {h['small_in_passes']:.2f}× one full pass "
                f"({h['pass_sentences']} of those sentences: {h['pass_ms']:.0f} ms), while the /cluster took "
                f"{h['big_ms']:.0f} ms in all."]
    out += ["", f"Reproduce: `{result['command']}`"]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="ort")
    args = ap.parse_args()
    import onnxruntime

    model_name = os.path.basename(os.path.normpath(args.model))
    onnx_path = export(args.model)
    min_cos = check_fidelity(OrtEncoder(onnx_path, args.model, 1), model_name)
    print(f"ORT {onnxruntime.__version__}: min cos {min_cos:.6f} against the reference", flush=True)
    if min_cos < 0.9999:
        sys.exit(f"ORT's export of {model_name} disagrees with sentence-transformers (min cos {min_cos}); not timing it")
    mhz = measured_mhz()
    m = machine()
    result = {"model": model_name, "machine": m, "mhz": mhz, "peak_gflops": measured_peak_gflops(m["simd"]),
              "ort_version": onnxruntime.__version__, "ort_min_cos": min_cos,
              "command": "target/bench-venv/bin/python bench/ort.py" + (" --quick" if args.quick else "")}
    print(f"clock {mhz:.0f} MHz measured; peak {result['peak_gflops']:.1f} GFLOP/s per core", flush=True)
    repeats = 7 if args.quick else 21
    result["latency"] = section_latency(onnx_path, args.model, [1, 2], SIZES, repeats)
    # model.precision = "f16" (weights rounded to half precision, computed in f32).
    result["latency"] += section_latency(onnx_path, args.model, [1], SIZES, repeats, precision="f16")
    # model.precision = "bf16" (AMX tiles), where the CPU has them.
    if amx_bf16():
        result["latency"] += section_latency(onnx_path, args.model, [1], SIZES, repeats, precision="bf16")
    result["concurrency"] = section_concurrency(args.model, [1, 4, 32], 5 if args.quick else 15)
    result["head_of_line"] = section_head_of_line(args.model)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.out}.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = report(result)
    with open(os.path.join(RESULTS, f"{args.out}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
