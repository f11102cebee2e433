"""Hugging Face's InferenceClient (huggingface_hub, the official client of
text-embeddings-inference), unchanged, against forkserve: feature_extraction against the bare
URL (it POSTs to it, as to TEI) and against base_url; the vectors must equal
sentence-transformers' reference (cosine >= 0.9999).

    python hf_client.py BASE_URL REFERENCE_JSON [API_KEY]
"""
import json
import math
import sys

# No HF_HUB_OFFLINE: it would refuse the server's own URL too. A URL as the model means the
# client talks to it directly, never to the Hub.
import huggingface_hub
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError


def cosine(a, b):
    dot = sum(float(x) * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(float(x) ** 2 for x in a)) * math.sqrt(sum(y * y for y in b)))


def check(vectors, want, what):
    assert len(vectors) == len(want), (what, len(vectors))
    for i, (got, w) in enumerate(zip(vectors, want)):
        c = cosine(got, w)
        assert c >= 0.9999, f"{what}: sentence {i}: cosine {c}"


def main(base_url, reference_path, api_key=None):
    reference = json.load(open(reference_path))
    sentences, want = reference["sentences"], reference["embeddings"]
    if api_key:
        try:
            InferenceClient(model=base_url).feature_extraction("x")
            raise AssertionError("no API key was accepted")
        except HfHubHTTPError as e:
            assert e.response.status_code == 401, e.response.status_code
    bare = InferenceClient(model=base_url, token=api_key)
    check(bare.feature_extraction(sentences), want, "model=URL")
    one = bare.feature_extraction(sentences[3], normalize=True, truncate=True, truncation_direction="right")
    check(one, want[3:4], "one sentence")
    based = InferenceClient(base_url=base_url, api_key=api_key)
    check(based.feature_extraction(sentences[:5]), want[:5], "base_url")
    short = bare.feature_extraction(sentences[0], dimensions=64)
    assert short.shape == (1, 64), short.shape
    print(f"huggingface_hub {huggingface_hub.__version__}: InferenceClient feature_extraction matches "
          f"the reference ({len(sentences)} sentences{', with the API key' if api_key else ''})")


if __name__ == "__main__":
    main(*sys.argv[1:])
