"""Would half-precision weights keep sentence-transformers' answers? Measured with the library itself.

    target/bench-venv/bin/python bench/precision.py [MODEL_DIR]

The encoder layers' weight matrices of the bundled model are rounded to f16 and to bf16 (round to
nearest, as forkserve's `model.precision` rounds) and put back as f32, so the library computes
exactly what f32 arithmetic on rounded weights gives. For each rounding it prints the minimum
cosine to the unrounded model on the reference sentences and on the 3,000 sentences of
`tests/data/reference/clusters-3000.json`, and whether `community_detection` still returns the
reference set's clusters (at each recorded threshold) and the six recorded clusterings of the
3,000. The bar a precision must clear to be offered (issue 15): min cosine >= 0.9995 and the
reference clusterings identical; forkserve also asks that the 3,000 sentences' six stay the same.

Then bf16 *arithmetic*, which is where AVX512_BF16 and AMX would buy speed: the whole model in
bf16 (weights and activations, products summed in f32), as PyTorch runs it on this CPU. Its
fidelity by the same measures, and its speed against f32 in the same library on one thread
(medians of alternated runs): what a bf16 kernel could gain, and what it would cost.

Then the same question of forkserve itself (the release binary, `make build`): its vectors with
`model.precision = "f32"` and `"f16"`, against sentence-transformers' recorded ones on the
reference sentences, and f16 against f32 on the 3,000 sentences; where the CPU has AMX, the
same for `"bf16"` (the linear layers' inputs and weights in bf16, the rest in f32), with its
clusterings.
"""

import http.client
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from sentence_transformers import SentenceTransformer, util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "tests", "data", "reference")
sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench import Server, amx_bf16  # noqa: E402


def as_sets(communities):
    return sorted(sorted(c) for c in communities)


def min_cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def bf16_arithmetic(model, encode, reference, big_texts, base_ref, base_big, clusterings_kept):
    """The whole model in bf16, against f32: fidelity, then speed on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batches = {n: big_texts[:n] for n in (32, 128)}
        timings = {(dtype, n): [] for dtype in ("f32", "bf16") for n in batches}
        for _ in range(7):
            for dtype in ("f32", "bf16"):
                model.to(torch.float32 if dtype == "f32" else torch.bfloat16)
                for n, texts in batches.items():
                    started = time.perf_counter()
                    encode(texts)
                    timings[(dtype, n)].append(time.perf_counter() - started)
        model.to(torch.bfloat16)
        ref, big = encode(reference).float(), encode(big_texts).float()
    finally:
        model.to(torch.float32)
        torch.set_num_threads(threads)
    cos = torch.nn.functional.cosine_similarity
    print(f"bf16 arithmetic (weights and activations): min cos: reference "
          f"{cos(ref, base_ref).min().item():.7f}, 3,000 sentences "
          f"{cos(big, base_big).min().item():.7f}; {clusterings_kept(ref, big)}", flush=True)
    for n in batches:
        f32 = statistics.median(timings[("f32", n)])
        bf16 = statistics.median(timings[("bf16", n)])
        print(f"  PyTorch {torch.__version__}, 1 thread, {n} sentences: f32 {f32 * 1e3:.1f} ms, "
              f"bf16 {bf16 * 1e3:.1f} ms ({f32 / bf16:.2f}x the speed; medians of 7, alternated)",
              flush=True)


def forkserve_vectors(model_dir, precision, batches):
    """forkserve's /embed for each list of sentences, with `model.precision` = `precision`."""
    os.environ["FORKSERVE_MODEL_PRECISION"] = precision
    try:
        server = Server("forkserve", 1, model=model_dir)
    finally:
        del os.environ["FORKSERVE_MODEL_PRECISION"]
    try:
        server.wait_first_ok()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
        out = []
        for texts in batches:
            vectors = []
            for i in range(0, len(texts), 500):
                conn.request("POST", "/embed", json.dumps({"inputs": texts[i:i + 500]}),
                             {"Content-Type": "application/json"})
                vectors += json.loads(conn.getresponse().read())
            out.append(np.array(vectors, dtype=np.float64))
        return out
    finally:
        server.stop()


def main():
    model_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "models", "all-MiniLM-L6-v2")
    with open(os.path.join(REFERENCE, "all-MiniLM-L6-v2.json")) as f:
        recorded = json.load(f)
    reference = recorded["sentences"]
    with open(os.path.join(REFERENCE, "clusters-3000.json")) as f:
        clusters = json.load(f)
    model = SentenceTransformer(model_dir, device="cpu")
    unrounded = {k: v.clone() for k, v in model.state_dict().items()}

    def encode(texts):
        return model.encode(texts, batch_size=64, convert_to_tensor=True)

    def clusterings_kept(ref, big):
        """How many of the reference set's and of the 3,000 sentences' recorded clusterings
        `community_detection` still returns from these vectors."""
        small = [
            as_sets(util.community_detection(ref, threshold=float(t), min_community_size=1))
            == as_sets(c)
            for t, c in recorded["community_detection"].items()
        ]
        large = [
            as_sets(util.community_detection(big, threshold=case["threshold"],
                                             min_community_size=case["min_community_size"]))
            == as_sets(case["communities"])
            for case in clusters["results"]
        ]
        return (f"reference clusterings identical: {sum(small)} of {len(small)}; "
                f"3,000 sentences' clusterings identical: {sum(large)} of {len(large)}")

    cos = torch.nn.functional.cosine_similarity
    base_ref, base_big = encode(reference), encode(clusters["sentences"])
    # The check itself: the library's own f32 vectors must give every recorded clustering.
    print(f"f32 as recorded: {clusterings_kept(base_ref, base_big)}", flush=True)
    for dtype in (torch.float16, torch.bfloat16):
        model.load_state_dict(unrounded)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "encoder.layer" in name and name.endswith("weight") and p.dim() == 2:
                    p.copy_(p.to(dtype).to(torch.float32))
        ref, big = encode(reference), encode(clusters["sentences"])
        print(f"{str(dtype).removeprefix('torch.')} weights, f32 arithmetic: min cos: reference "
              f"{cos(ref, base_ref).min().item():.7f}, 3,000 sentences "
              f"{cos(big, base_big).min().item():.7f}; {clusterings_kept(ref, big)}", flush=True)
    model.load_state_dict(unrounded)
    bf16_arithmetic(model, encode, reference, clusters["sentences"], base_ref, base_big,
                    clusterings_kept)

    library = np.array(recorded["embeddings"], dtype=np.float64)
    f32_ref, f32_big = forkserve_vectors(model_dir, "f32", [reference, clusters["sentences"]])
    f16_ref, f16_big = forkserve_vectors(model_dir, "f16", [reference, clusters["sentences"]])
    print(f"forkserve min cos to sentence-transformers on the reference: f32 {min_cos(f32_ref, library):.7f}, "
          f"f16 {min_cos(f16_ref, library):.7f}; f16 to f32 on 3,000 sentences {min_cos(f16_big, f32_big):.7f}",
          flush=True)
    if amx_bf16():
        bf16_ref, bf16_big = forkserve_vectors(model_dir, "bf16", [reference, clusters["sentences"]])
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
        print(f"forkserve bf16 (AMX): min cos to sentence-transformers on the reference {min_cos(bf16_ref, library):.7f}, "
              f"to f32 on 3,000 sentences {min_cos(bf16_big, f32_big):.7f}; "
              f"{clusterings_kept(as_tensor(bf16_ref), as_tensor(bf16_big))}", flush=True)
    else:
        print("forkserve bf16: not measured (this CPU has no AMX-BF16)", flush=True)


if __name__ == "__main__":
    main()
