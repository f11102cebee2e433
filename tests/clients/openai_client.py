"""The official openai client, unchanged, against forkserve's /v1/embeddings: the vectors must
equal sentence-transformers' reference embeddings (cosine >= 0.9999); token ids as input (what
LangChain's OpenAIEmbeddings sends), models.list(), the error codes; and, with an API key set on
the server, AuthenticationError without it.

    python openai_client.py BASE_URL REFERENCE_JSON [API_KEY]
"""
import json
import math
import sys

import openai


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def main(base_url, reference_path, api_key=None):
    reference = json.load(open(reference_path))
    sentences, want = reference["sentences"], reference["embeddings"]
    if api_key:
        unauthenticated = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong-key", max_retries=0)
        try:
            unauthenticated.embeddings.create(model="all-MiniLM-L6-v2", input="x")
            raise AssertionError("a wrong API key was accepted")
        except openai.AuthenticationError as e:
            assert e.status_code == 401 and e.code == "invalid_api_key", (e.status_code, e.code)
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key or "not-needed", max_retries=0)
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
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e.code
    # Token ids: the model's own (as /tokenize gives them) embed like the text they spell.
    ids = reference["input_ids_truncated"][3]
    by_ids = client.embeddings.create(model="all-MiniLM-L6-v2", input=[ids], encoding_format="float")
    assert cosine(by_ids.data[0].embedding, want[3]) >= 0.9999
    batch = client.embeddings.create(model="all-MiniLM-L6-v2", input=ids, encoding_format="float")
    assert len(batch.data) == 1 and batch.usage.prompt_tokens == len(ids)
    try:
        client.embeddings.create(model="all-MiniLM-L6-v2", input=[[1, 10**7]])
        raise AssertionError("a token id outside the vocabulary was accepted")
    except openai.BadRequestError as e:
        assert e.param == "input[0][1]" and "10000000" in str(e), (e.param, str(e))
    models = client.models.list()
    assert [m.id for m in models.data] == ["all-MiniLM-L6-v2"], models
    assert client.models.retrieve("sentence-transformers/all-MiniLM-L6-v2").id == "all-MiniLM-L6-v2"
    try:
        client.models.retrieve("gpt-4o")
        raise AssertionError("an unknown model was found")
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e.code
    print(f"openai {openai.__version__}: {len(sentences)} sentences match the reference; token ids, "
          f"models, errors{' and the API key' if api_key else ''} as OpenAI's")


if __name__ == "__main__":
    main(*sys.argv[1:])
