#!/usr/bin/env python3
"""Record sentence-transformers' own answers for a model directory, as test data.

Runs with the bench venv (`make bench` installs it: torch + sentence-transformers, pinned in
bench/python/requirements.txt):

    target/bench-venv/bin/python scripts/make-reference.py MODEL_DIR OUT.json \
        [--sentences tests/data/reference/sentences.json] [--thresholds 0.5 0.6 0.75] \
        [--fixture] [--many MANY.json]

What it writes (JSON): the versions it ran with, the model's weights sha256, the sentences, the
token ids the model sees (after truncation) and the untruncated token counts, what
`SentenceTransformer.encode` returns for them (all in one call, as users call it), whether one
sentence at a time gives the same, and `util.community_detection`'s communities at each
threshold (min_community_size 1, on the embeddings normalised, as it does itself). Floats keep
9 significant digits: enough for any float32, and a file that reads in a diff.

--fixture (what scripts/make-model-fixtures.py uses for tests/data/models/) adds what the loaded
model says about itself (dimension, max_seq_length, similarity_fn_name, prompts,
default_prompt_name, whether the last module is Normalize, the module classes), for models with
prompts the embeddings and token ids under each prompt and with none (prompt=""), and the
sentences on which the tokenizer.json file, run as saved by the `tokenizers` library, gives other
ids than the ones the transformer receives. --many FILE adds `many`: every 10th embedding of the
sentences in FILE, all encoded in one call.

Token ids are the ones the transformer's forward receives during `encode` (a hook checks it):
with the model's default prompt, if it has one.
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


# Dicts of matrices (--fixture): one key per line, one row per line.
NESTED = ("embeddings_by_prompt", "input_ids_by_prompt", "many")


def readable_json(obj):
    """One top-level key per line, and lists of items one item per line: a diff then shows
    which sentence or vector changed. The NESTED dicts have one key per line and, in their lists
    of lists, one item per line."""
    one = lambda v: json.dumps(v, ensure_ascii=False)
    lines = []
    for key, value in obj.items():
        if isinstance(value, list) and value and isinstance(value[0], (list, str)):
            body = ",\n".join("  " + one(v) for v in value)
            lines.append(f"{one(key)}: [\n{body}\n ]")
        elif key in NESTED and isinstance(value, dict):
            parts = []
            for k, v in value.items():
                if isinstance(v, list) and v and isinstance(v[0], list):
                    body = ",\n".join("   " + one(row) for row in v)
                    parts.append(f"  {one(k)}: [\n{body}\n  ]")
                else:
                    parts.append(f"  {one(k)}: {one(v)}")
            lines.append(f"{one(key)}: {{\n" + ",\n".join(parts) + "\n }")
        elif isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
            body = ",\n".join(f"  {one(k)}: {one(v)}" for k, v in value.items())
            lines.append(f"{one(key)}: {{\n{body}\n }}")
        else:
            lines.append(f"{one(key)}: {one(value)}")
    return "{\n " + ",\n ".join(lines) + "\n}\n"


def versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
    }


def transformer_dir(model_dir):
    """The directory of the model's Transformer module (the root, or modules.json's path)."""
    modules = os.path.join(model_dir, "modules.json")
    if os.path.exists(modules):
        with open(modules) as f:
            for m in json.load(f):
                if m["type"].rsplit(".", 1)[-1] == "Transformer":
                    return os.path.join(model_dir, m["path"])
    return model_dir


def default_prompt(model):
    name = model.default_prompt_name
    return model.prompts.get(name) if name is not None else None


class ForwardIds:
    """Collects the token ids the transformer's forward receives (padding stripped).
    sentence-transformers calls the model's `forward` method itself (no module hooks run), so
    the instance's `forward` is wrapped for the time of one encode."""

    def __init__(self, model):
        self.rows = []
        self.model = model[0].auto_model
        inner = self.model.forward

        def forward(*args, **kwargs):
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            mask = kwargs.get("attention_mask")
            for i in range(ids.shape[0]):
                row = ids[i] if mask is None else ids[i][mask[i].bool()]
                self.rows.append(tuple(row.tolist()))
            return inner(*args, **kwargs)

        self.model.forward = forward

    def close(self):
        del self.model.forward


def token_ids(model, sentences, prompt=None):
    """The ids the transformer sees (after truncation) and the untruncated counts."""
    untruncated = [len(model.tokenizer((prompt or "") + s)["input_ids"]) for s in sentences]
    features = [model.preprocess([s], prompt=prompt) for s in sentences]
    ids = [f["input_ids"][0][f["attention_mask"][0].bool()].tolist() for f in features]
    return untruncated, ids


def encode_checked(model, sentences, ids, **kwargs):
    """model.encode(sentences, **kwargs) in one call, checking that the transformer received
    exactly `ids` (as a multiset: encode sorts by length)."""
    hook = ForwardIds(model)
    try:
        embeddings = model.encode(sentences, batch_size=32, convert_to_numpy=True, **kwargs)
    finally:
        hook.close()
    if sorted(hook.rows) != sorted(tuple(i) for i in ids):
        raise SystemExit(f"{kwargs}: the transformer received other ids than preprocess gives")
    return embeddings


def tokenizer_json_mismatches(model, model_dir, sentences, ids, prompt=None):
    """Indices of the sentences whose ids, by tokenizer.json as saved (the `tokenizers` library,
    truncation at max_seq_length, no padding), differ from the ones the transformer received."""
    path = os.path.join(transformer_dir(model_dir), "tokenizer.json")
    if not os.path.exists(path):
        return None
    tok = tokenizers.Tokenizer.from_file(path)
    tok.no_padding()
    tok.enable_truncation(model.max_seq_length)
    return [i for i, s in enumerate(sentences) if tok.encode((prompt or "") + s).ids != ids[i]]


def record(model_dir, sentences, thresholds=(0.5, 0.6, 0.75), name=None, fixture=False, many=None):
    """The reference as a dict (see the module's doc). `many`: (sentences_file, sentences)."""
    torch.manual_seed(0)
    model = SentenceTransformer(model_dir, device="cpu")
    max_len = model.max_seq_length
    prompt = default_prompt(model)

    # Token ids as the model sees them, and the counts before truncation.
    untruncated, ids = token_ids(model, sentences, prompt)

    if fixture:
        embeddings = encode_checked(model, sentences, ids)
    else:
        embeddings = model.encode(sentences, batch_size=32, convert_to_numpy=True)
    single = np.stack([model.encode([s], convert_to_numpy=True)[0] for s in sentences])
    diff = float(np.abs(embeddings - single).max())

    communities = {}
    normalized = torch.nn.functional.normalize(torch.from_numpy(embeddings), dim=1)
    for t in thresholds:
        found = util.community_detection(normalized, threshold=t, min_community_size=1)
        communities[f"{t:g}"] = [[int(i) for i in c] for c in found]

    weights = os.path.join(weights_dir(model_dir, fixture), "model.safetensors")
    out = {
        "model": name or os.path.basename(os.path.normpath(model_dir)),
        "model_safetensors_sha256": sha256(weights) if os.path.exists(weights) else None,
        "made_by": "scripts/make-reference.py",
        "versions": versions(),
        "encode_args": {
            "batch_size": 32,
            "device": "cpu",
            "max_seq_length": max_len,
            "note": "all sentences in one model.encode call; embeddings are what encode returns",
        },
    }
    if fixture:
        out.update(
            {
                "dimension": int(embeddings.shape[1]),
                "max_seq_length": max_len,
                "similarity_fn_name": model.similarity_fn_name,
                "prompts": model.prompts,
                "default_prompt_name": model.default_prompt_name,
                "normalized": type(model[-1]).__name__ == "Normalize",
                "modules": [type(m).__name__ for m in model],
            }
        )
    out.update(
        {
            "n": len(sentences),
            "sentences": sentences,
            "token_counts": untruncated,
            "input_ids_truncated": ids,
            "embeddings": [rounded(v) for v in embeddings.tolist()],
        }
    )
    if fixture:
        named = {k: v for k, v in model.prompts.items() if v}
        if named:
            by_prompt, ids_by_prompt = {}, {}
            for prompt_name, text in named.items():
                _, p_ids = token_ids(model, sentences, text)
                e = encode_checked(model, sentences, p_ids, prompt_name=prompt_name)
                by_prompt[prompt_name] = [rounded(v) for v in e.tolist()]
                ids_by_prompt[prompt_name] = p_ids
            counts0, ids0 = token_ids(model, sentences, None)
            e0 = encode_checked(model, sentences, ids0, prompt="")
            out["embeddings_by_prompt"] = by_prompt
            out["embeddings_no_prompt"] = [rounded(v) for v in e0.tolist()]
            out["input_ids_by_prompt"] = ids_by_prompt
            out["input_ids_no_prompt"] = ids0
            out["token_counts_no_prompt"] = counts0
        out["tokenizer_json_mismatch"] = tokenizer_json_mismatches(model, model_dir, sentences, ids, prompt)
    out.update(
        {
            "max_abs_diff_single_vs_batched": diff,
            "community_detection_args": {
                "min_community_size": 1,
                "note": "util.community_detection on the normalized embeddings; first index of each community is its centre",
            },
            "community_detection": communities,
        }
    )
    if many is not None:
        many_file, many_sentences = many
        counts, many_ids = token_ids(model, many_sentences, prompt)
        e = encode_checked(model, many_sentences, many_ids)
        indices = list(range(0, len(many_sentences), 10))
        out["many"] = {
            "sentences_file": many_file,
            "n": len(many_sentences),
            "note": "all n sentences in one model.encode call (batch_size 32); every 10th kept",
            "indices": indices,
            "token_counts": [counts[i] for i in indices],
            "embeddings": [rounded(e[i].tolist()) for i in indices],
        }
    return out, embeddings, diff


def weights_dir(model_dir, fixture):
    # The plain mode keeps its historical meaning (the root's model.safetensors, or null).
    return transformer_dir(model_dir) if fixture else model_dir


def write(out, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(readable_json(out))


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
    parser.add_argument("--fixture", action="store_true", help="add the model-fixture fields")
    parser.add_argument("--many", help="a JSON list of sentences to encode in one call (every 10th kept)")
    args = parser.parse_args()

    with open(args.sentences) as f:
        sentences = json.load(f)
    many = None
    if args.many:
        with open(args.many) as f:
            many_sentences = json.load(f)
        rel = os.path.relpath(os.path.abspath(args.many), os.path.dirname(os.path.abspath(args.out)))
        many = (rel, many_sentences)
    out, embeddings, diff = record(
        args.model_dir, sentences, args.thresholds, args.name, fixture=args.fixture, many=many
    )
    write(out, args.out)
    print(
        f"{args.out}: {len(sentences)} sentences, dimension {embeddings.shape[1]}, "
        f"single vs batched max |diff| {diff:.2e}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
