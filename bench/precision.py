"""Would half-precision weights keep sentence-transformers' answers? Measured with the library itself.

    target/bench-venv/bin/python bench/precision.py [MODEL_DIR]

The encoder layers' weight matrices of the bundled model are rounded to f16 and to bf16 (round to
nearest, as forkserve's `model.precision` rounds) and put back as f32, so the library computes
exactly what f32 arithmetic on rounded weights gives. For each rounding it prints the minimum
cosine to the unrounded model on the reference sentences and on the 3,000 sentences of
`tests/data/reference/clusters-3000.json`, and whether `community_detection` still returns the six
recorded clusterings. The bar a precision must clear to be offered (issue 15): min cosine >= 0.9995
and the reference clusterings identical.

Then the same question of forkserve itself (the release binary, `make build`): its vectors with
`model.precision = "f32"` and `"f16"`, against sentence-transformers' recorded ones on the
reference sentences, and f16 against f32 on the 3,000 sentences.
"""

import http.client
import json
import os
import sys

import numpy as np
import torch
from sentence_transformers import SentenceTransformer, util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "tests", "data", "reference")
sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench import Server  # noqa: E402


def as_sets(communities):
    return sorted(sorted(c) for c in communities)


def min_cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


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

    base_ref, base_big = encode(reference), encode(clusters["sentences"])
    for dtype in (torch.float16, torch.bfloat16):
        model.load_state_dict(unrounded)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "encoder.layer" in name and name.endswith("weight") and p.dim() == 2:
                    p.copy_(p.to(dtype).to(torch.float32))
        ref, big = encode(reference), encode(clusters["sentences"])
        cos = torch.nn.functional.cosine_similarity
        same = [
            as_sets(util.community_detection(big, threshold=case["threshold"],
                                             min_community_size=case["min_community_size"]))
            == as_sets(case["communities"])
            for case in clusters["results"]
        ]
        print(f"{str(dtype).removeprefix('torch.'):9} min cos: reference {cos(ref, base_ref).min().item():.7f}, "
              f"3,000 sentences {cos(big, base_big).min().item():.7f}; "
              f"clusterings identical: {sum(same)} of {len(same)}", flush=True)

    library = np.array(recorded["embeddings"], dtype=np.float64)
    f32_ref, f32_big = forkserve_vectors(model_dir, "f32", [reference, clusters["sentences"]])
    f16_ref, f16_big = forkserve_vectors(model_dir, "f16", [reference, clusters["sentences"]])
    print(f"forkserve min cos to sentence-transformers on the reference: f32 {min_cos(f32_ref, library):.7f}, "
          f"f16 {min_cos(f16_ref, library):.7f}; f16 to f32 on 3,000 sentences {min_cos(f16_big, f32_big):.7f}",
          flush=True)


if __name__ == "__main__":
    main()
