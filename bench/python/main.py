"""The stack forkserve replaces, written the way its users write it: FastAPI, the
sentence-transformers model loaded as a module global before the app exists (so gunicorn's
--preload loads it once in the master), `.eval()` and `.share_memory()`, a plain (non-async)
handler, `util.community_detection`. Served by gunicorn with uvicorn workers
(gunicorn.conf.py). Used only by the benchmark.
"""
import os
from typing import List, Union

import torch
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer, util

MODEL_DIR = os.environ.get("MODEL_DIR", "models/all-MiniLM-L6-v2")

model = SentenceTransformer(MODEL_DIR, device="cpu")
model.eval()
model.share_memory()

app = FastAPI()


class ClusterRequest(BaseModel):
    sentences: List[str]
    threshold: float = 0.5
    min_cluster_size: int = 1


@app.post("/cluster")
def cluster(request: ClusterRequest):
    with torch.no_grad():
        embeddings = model.encode(request.sentences, convert_to_tensor=True, normalize_embeddings=True)
    communities = util.community_detection(
        embeddings, threshold=request.threshold, min_community_size=request.min_cluster_size
    )
    return {"clusters": [[request.sentences[i] for i in c] for c in communities], "indices": communities}


class EmbedRequest(BaseModel):
    inputs: Union[str, List[str]]
    normalize: bool = True


@app.post("/embed")
def embed(request: EmbedRequest):
    """text-embeddings-inference's shape, for the one-sentence concurrency benchmark."""
    texts = [request.inputs] if isinstance(request.inputs, str) else request.inputs
    with torch.no_grad():
        vectors = model.encode(texts, normalize_embeddings=request.normalize)
    return vectors.tolist()


@app.get("/health")
def health():
    return {"status": "ok"}
