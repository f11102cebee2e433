#!/usr/bin/env python3
"""Record sentence-transformers' `community_detection` on a set of thousands of sentences, as
test data for `POST /cluster` (tests/cluster_large.rs).

Runs with the bench venv (`make bench` installs it: torch + sentence-transformers, pinned in
bench/python/requirements.txt):

    target/bench-venv/bin/python scripts/make-cluster-reference.py MODEL_DIR OUT.json [--count 3000]

The sentences are made here, deterministically: templated sentences over many topics (the
members of a topic are near each other, topics are not), exact duplicates and near duplicates
(case, punctuation, a dropped word), shuffled. They are encoded with `SentenceTransformer.encode`
in one call, as users call it, and `util.community_detection` runs on the embeddings at three
thresholds and two `min_community_size` values.

Each threshold is moved (by at most 0.004) into the widest gap between the pair similarities
near it, and the margin (the closest pair similarity to the threshold) is recorded: a pair
within float32 rounding of the threshold could fall either side in another implementation,
which is noise, not a difference of algorithm. With the margin far above that rounding
(~1e-7), forkserve must return exactly the library's communities.
"""

import argparse
import importlib.util
import json
import os
import platform
import random
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import sentence_transformers  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer, util  # noqa: E402

# The weights' digest as make-reference.py records it (one definition for both fixtures).
_spec = importlib.util.spec_from_file_location(
    "make_reference", os.path.join(os.path.dirname(os.path.abspath(__file__)), "make-reference.py"))
_make_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_make_reference)
sha256 = _make_reference.sha256

TOPICS = [
    ("walking the dog", "dog walks", "your dog's daily walk"),
    ("public speaking", "giving a talk", "speaking in front of an audience"),
    ("baking bread", "sourdough baking", "making bread at home"),
    ("learning to swim", "swimming lessons", "getting comfortable in the pool"),
    ("saving money", "building a budget", "cutting monthly expenses"),
    ("growing tomatoes", "tomato plants", "a vegetable garden"),
    ("running a marathon", "marathon training", "long-distance running"),
    ("learning Spanish", "Spanish vocabulary", "practising a new language"),
    ("fixing a bicycle", "bike repairs", "a flat bicycle tyre"),
    ("sleeping better", "a bedtime routine", "insomnia"),
    ("job interviews", "interview questions", "preparing for an interview"),
    ("home coffee brewing", "espresso at home", "a pour-over coffee"),
    ("painting with watercolours", "watercolour technique", "painting landscapes"),
    ("moving house", "packing boxes for a move", "relocating to a new city"),
    ("writing a novel", "fiction writing", "plotting a story"),
    ("caring for houseplants", "watering indoor plants", "repotting a plant"),
    ("camping in the mountains", "pitching a tent", "a weekend hike"),
    ("learning the guitar", "guitar chords", "practising an instrument"),
    ("cleaning the kitchen", "kitchen hygiene", "scrubbing the oven"),
    ("remote work", "working from home", "a home office"),
    ("raising a puppy", "puppy training", "house-training a young dog"),
    ("investing in index funds", "stock market basics", "retirement savings"),
    ("meal planning", "cooking for the week", "healthy lunches"),
    ("car maintenance", "changing the oil", "checking tyre pressure"),
    ("photography", "taking better photos", "camera settings"),
    ("meditation", "mindfulness practice", "breathing exercises"),
    ("birdwatching", "identifying birds", "bird feeders"),
    ("chess openings", "playing chess", "chess strategy"),
    ("wedding planning", "organising a wedding", "choosing a venue"),
    ("first aid", "treating a burn", "CPR basics"),
    ("beekeeping", "keeping honeybees", "harvesting honey"),
    ("knitting", "knitting a scarf", "yarn and needles"),
    ("rock climbing", "bouldering", "climbing safety"),
    ("email etiquette", "writing professional emails", "an inbox routine"),
    ("home insulation", "heating bills", "draught-proofing windows"),
    ("teaching children to read", "early reading", "phonics"),
    ("composting", "a compost bin", "kitchen scraps"),
    ("time management", "staying productive", "to-do lists"),
    ("travelling on a budget", "cheap flights", "backpacking"),
    ("password security", "two-factor authentication", "phishing emails"),
]

TEMPLATES = [
    "{} for beginners",
    "10 simple steps to {}",
    "The ultimate guide to {}",
    "Common mistakes people make with {}",
    "Why {} matters more than you think",
    "How I got better at {} in a month",
    "Everything you need to know about {}",
    "A quick introduction to {}",
    "What experts say about {}",
    "Tips and tricks for {}",
    "Is {} worth the effort?",
    "Questions to ask before you start {}",
]


def make_sentences(count, seed=17):
    rng = random.Random(seed)
    unique = []
    for topic in TOPICS:
        for phrase in topic:
            for template in TEMPLATES:
                unique.append(template.format(phrase))
    rng.shuffle(unique)
    sentences = []
    while len(sentences) < count:
        roll = rng.random()
        if roll < 0.7 or not sentences:
            sentences.append(unique[len(sentences) % len(unique)] if len(sentences) < len(unique)
                             else rng.choice(unique))
        elif roll < 0.85:
            sentences.append(rng.choice(sentences))  # an exact duplicate
        else:
            s = rng.choice(sentences)  # a near duplicate
            kind = rng.randrange(4)
            if kind == 0:
                s = s.lower()
            elif kind == 1:
                s = s.rstrip("?.!") + rng.choice(["!", ".", "?", "..."])
            elif kind == 2 and len(s.split()) > 3:
                words = s.split()
                del words[rng.randrange(1, len(words))]
                s = " ".join(words)
            else:
                s = s.upper()
            sentences.append(s)
    rng.shuffle(sentences)
    return sentences


def widest_gap(similarities, target, reach=0.004):
    """The threshold within `reach` of `target` farthest from every pair similarity, and
    that distance."""
    near = np.sort(similarities[np.abs(similarities - target) <= reach])
    bounds = np.concatenate(([target - reach], near, [target + reach]))
    gaps = np.diff(bounds)
    i = int(np.argmax(gaps))
    threshold = float(np.float32((bounds[i] + bounds[i + 1]) / 2))
    return threshold, float(gaps[i] / 2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.6, 0.75, 0.9])
    parser.add_argument("--min-sizes", type=int, nargs="+", default=[1, 5])
    args = parser.parse_args()

    torch.manual_seed(0)
    sentences = make_sentences(args.count)
    model = SentenceTransformer(args.model, device="cpu")
    embeddings = model.encode(sentences, convert_to_tensor=True, batch_size=64)
    unit = util.normalize_embeddings(embeddings)
    scores = (unit @ unit.T).numpy()
    upper = scores[np.triu_indices(len(sentences), k=1)]

    results = []
    for target in args.thresholds:
        threshold, margin = widest_gap(upper, target)
        for min_size in args.min_sizes:
            communities = util.community_detection(
                embeddings, threshold=threshold, min_community_size=min_size
            )
            results.append({
                "threshold": threshold,
                "margin": margin,
                "min_community_size": min_size,
                "communities": [[int(i) for i in c] for c in communities],
            })
            print(f"threshold {threshold} (margin {margin:.2e}), min size {min_size}: "
                  f"{len(communities)} communities", file=sys.stderr)

    weights = os.path.join(args.model, "model.safetensors")
    out = {
        "versions": {
            "sentence_transformers": sentence_transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "model": os.path.basename(os.path.normpath(args.model)),
        "weights_sha256": sha256(weights) if os.path.exists(weights) else None,
        "sentences": sentences,
        "results": results,
    }
    with open(args.out, "w") as f:
        f.write("{\n")
        keys = list(out)
        for n, key in enumerate(keys):
            value = out[key]
            tail = "," if n + 1 < len(keys) else ""
            if isinstance(value, list):
                body = ",\n".join("  " + json.dumps(v, ensure_ascii=False) for v in value)
                f.write(f"{json.dumps(key)}: [\n{body}\n ]{tail}\n")
            else:
                f.write(f"{json.dumps(key)}: {json.dumps(value)}{tail}\n")
        f.write("}\n")


if __name__ == "__main__":
    main()
