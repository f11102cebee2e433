"""The official openai client, unchanged, against forkserve's /v1/embeddings: the vectors must
equal sentence-transformers' reference embeddings (cosine >= 0.9999).

    python openai_client.py BASE_URL REFERENCE_JSON
"""
import json
import math
import sys

import openai


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def main(base_url, reference_path):
    reference = json.load(open(reference_path))
    sentences, want = reference["sentences"], reference["embeddings"]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-needed")
    # The client's default asks for base64 and decodes it; float is checked too.
    for kwargs in ({}, {"encoding_format": "float"}):
        result = client.embeddings.create(model="all-MiniLM-L6-v2", input=sentences, **kwargs)
        assert len(result.data) == len(sentences), len(result.data)
        for i, item in enumerate(result.data):
            assert item.index == i
            assert len(item.embedding) == 384, len(item.embedding)
            c = cosine(item.embedding, want[i])
            assert c >= 0.9999, f"sentence {i}: cosine {c} ({kwargs})"
        assert result.usage.prompt_tokens == sum(map(len, reference["input_ids_truncated"])), result.usage
    single = client.embeddings.create(model="all-MiniLM-L6-v2", input="The Art of Dog Walking")
    assert cosine(single.data[0].embedding, want[3]) >= 0.9999
    try:
        client.embeddings.create(model="text-embedding-3-small", input="x")
        raise AssertionError("a model this server does not serve was accepted")
    except openai.NotFoundError:
        pass
    print(f"openai {openai.__version__}: {len(sentences)} sentences match the reference")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
