#!/usr/bin/env python3
"""Record sentence-transformers' own answers for a model directory, as test data.

Runs with the bench venv (`make bench` installs it: torch + sentence-transformers, pinned in
bench/python/requirements.txt):

    target/bench-venv/bin/python scripts/make-reference.py MODEL_DIR OUT.json \
        [--sentences tests/data/reference/sentences.json] [--thresholds 0.5 0.6 0.75]

What it writes (JSON): the versions it ran with, the model's weights sha256, the sentences, the
token ids the model sees (after truncation) and the untruncated token counts, what
`SentenceTransformer.encode` returns for them (all in one call, as users call it), whether one
sentence at a time gives the same, and `util.community_detection`'s communities at each
threshold (min_community_size 1, on the embeddings normalised, as it does itself). Floats keep
9 significant digits: enough for any float32, and a file that reads in a diff.
"""

import argparse
import hashlib
import json
import os
import platform
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import sentence_transformers  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from sentence_transformers import SentenceTransformer, util  # noqa: E402


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rounded(values):
    return [float(f"{v:.9g}") for v in values]


def readable_json(obj):
    """One top-level key per line, and lists of items one item per line: a diff then shows
    which sentence or vector changed."""
    one = lambda v: json.dumps(v, ensure_ascii=False)
    lines = []
    for key, value in obj.items():
        if isinstance(value, list) and value and isinstance(value[0], (list, str)):
            body = ",\n".join("  " + one(v) for v in value)
            lines.append(f"{one(key)}: [\n{body}\n ]")
        elif isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
            body = ",\n".join(f"  {one(k)}: {one(v)}" for k, v in value.items())
            lines.append(f"{one(key)}: {{\n{body}\n }}")
        else:
            lines.append(f"{one(key)}: {one(value)}")
    return "{\n " + ",\n ".join(lines) + "\n}\n"


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument(
        "--sentences",
        default=os.path.join(here, "..", "tests", "data", "reference", "sentences.json"),
    )
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.5, 0.6, 0.75])
    parser.add_argument("--name", help="the model's name in the output (default: the directory's)")
    args = parser.parse_args()

    torch.manual_seed(0)
    with open(args.sentences) as f:
        sentences = json.load(f)
    model = SentenceTransformer(args.model_dir, device="cpu")
    max_len = model.max_seq_length

    # Token ids as the model sees them, and the counts before truncation.
    untruncated = [len(model.tokenizer(s)["input_ids"]) for s in sentences]
    features = [model.tokenize([s]) for s in sentences]
    ids = [f["input_ids"][0][f["attention_mask"][0].bool()].tolist() for f in features]

    embeddings = model.encode(sentences, batch_size=32, convert_to_numpy=True)
    single = np.stack([model.encode([s], convert_to_numpy=True)[0] for s in sentences])
    diff = float(np.abs(embeddings - single).max())

    communities = {}
    normalized = torch.nn.functional.normalize(torch.from_numpy(embeddings), dim=1)
    for t in args.thresholds:
        found = util.community_detection(normalized, threshold=t, min_community_size=1)
        communities[f"{t:g}"] = [[int(i) for i in c] for c in found]

    weights = os.path.join(args.model_dir, "model.safetensors")
    out = {
        "model": args.name or os.path.basename(os.path.normpath(args.model_dir)),
        "model_safetensors_sha256": sha256(weights) if os.path.exists(weights) else None,
        "made_by": "scripts/make-reference.py",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
        },
        "encode_args": {
            "batch_size": 32,
            "device": "cpu",
            "max_seq_length": max_len,
            "note": "all sentences in one model.encode call; embeddings are what encode returns",
        },
        "n": len(sentences),
        "sentences": sentences,
        "token_counts": untruncated,
        "input_ids_truncated": ids,
        "embeddings": [rounded(v) for v in embeddings.tolist()],
        "max_abs_diff_single_vs_batched": diff,
        "community_detection_args": {
            "min_community_size": 1,
            "note": "util.community_detection on the normalized embeddings; first index of each community is its centre",
        },
        "community_detection": communities,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(readable_json(out))
    print(
        f"{args.out}: {len(sentences)} sentences, dimension {embeddings.shape[1]}, "
        f"single vs batched max |diff| {diff:.2e}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
