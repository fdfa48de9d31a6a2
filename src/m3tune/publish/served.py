"""A fused system served from one Qdrant collection: what it holds, and how a query runs against it.

The collection holds, per passage (point i = passage i of the corpus):

    dense      the encoder's vector of the passage's text (named dense vector, dot product on unit vectors)
    dense-en   the encoder's vector of its English translation, where it has one (bilingual: members)
    dense-body the encoder's vector of a hadith's body alone, where the rule finds one (bilingual-body: members;
               m3tune.corpus.neardup.hadith_body)
    bm25-ar    the strong BM25's Arabic terms (m3tune.evaluation.bm25.arabic_terms) as a sparse vector whose
               values are BM25's term-frequency part, tf / (tf + k1 (1 − b + b·dl/avgdl)), with Qdrant's IDF
               modifier, so the engine multiplies each query term by ln(1 + (N − df + 0.5)/(df + 0.5)): bm25s's
               Lucene BM25, computed by Qdrant, its IDF kept current as points change
    bm25-en    the same over the English translation's terms (the English index), where it has one

Term ids are a salted 32-bit hash of the term; the salt is the first one under which the corpus's terms
have no collision, recorded in the collection. (A query term absent from the corpus could still collide
with one, one chance in about 2^32 / vocabulary ≈ 40,000 per such term; bm25s would ignore it.)

A query runs the recipe's lists as Qdrant Query API requests, all lists of a batch of queries in one
`query_batch_points` call: the dense one, the translation one and the body one (a passage keeps the best of
its scores: the union of the top-DEPTH lists holds the top DEPTH passages by that maximum), and the BM25
one of the query's language. The convex combination runs client-side (m3tune.evaluation.fusion, the code
evaluate measured): Qdrant's server-side fusions are RRF and DBSF, neither weighted, and a formula query
cannot see a list's per-query minimum and maximum, which the normalization needs.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from m3tune.errors import ConfigError, UserError
from m3tune.evaluation.models import VIEWS_OF

DENSE, DENSE_EN, DENSE_BODY, BM25_AR, BM25_EN = "dense", "dense-en", "dense-body", "bm25-ar", "bm25-en"
VIEW_VECTORS = {"translation": DENSE_EN, "body": DENSE_BODY}  # the named vector of each of extra_views' views
# the named vectors each kind of member reads: a dense kind its text's and its views'
READS = {"bm25": (BM25_AR, BM25_EN),
         **{kind: (DENSE, *(VIEW_VECTORS[v] for v in views)) for kind, views in VIEWS_OF.items()}}
SERVED_KINDS = tuple(READS)
WHERE_FUSED = ("lists: Qdrant Query API (one query_batch_points call per batch of queries); fusion: client-side "
               "(m3tune.evaluation.fusion), as Qdrant's RRF and DBSF are unweighted and a formula query cannot "
               "see a list's per-query minimum and maximum")
MAX_SALT = 1000


def term_id(term: str, salt: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{salt}\x1f{term}".encode(), digest_size=4).digest(), "little")


def collision_free_salt(vocabulary: Iterable[str]) -> int:
    """The first salt under which the VOCABULARY's terms get distinct ids."""
    terms = sorted(set(vocabulary))
    for salt in range(MAX_SALT):
        if len({term_id(t, salt) for t in terms}) == len(terms):
            return salt
    raise UserError(f"no collision-free term hash among {MAX_SALT} salts for {len(terms):,} terms")


def vectors_of(kinds: Sequence[str]) -> tuple[str, ...]:
    """The named vectors a recipe of members of KINDS reads."""
    unknown = [k for k in kinds if k not in SERVED_KINDS]
    if unknown:
        raise ConfigError(f"a fused system with a {unknown[0]} member cannot be served (served: "
                          f"{', '.join(SERVED_KINDS)})")
    return tuple(dict.fromkeys(name for kind in kinds for name in READS[kind]))


def bm25_documents(terms: Sequence[Sequence[str]], *, k1: float, b: float, salt: int) -> list[tuple[list, list]]:
    """Each document's (indices, values): BM25's term-frequency part per distinct term (bm25s's Lucene
    variant; Qdrant's IDF modifier supplies the rest)."""
    lengths = [len(t) for t in terms]
    avg = sum(lengths) / len(lengths) if lengths else 1.0
    out = []
    for doc, length in zip(terms, lengths):
        norm = k1 * ((1 - b) + b * length / avg)
        counts = Counter(doc)
        ids = [term_id(t, salt) for t in counts]
        out.append((ids, [tf / (tf + norm) for tf in counts.values()]))
    return out


def bm25_query(terms: Sequence[str], salt: int) -> tuple[list, list]:
    """A query's (indices, values): each distinct term's count, as bm25s sums a repeated query term."""
    counts = Counter(terms)
    return [term_id(t, salt) for t in counts], [float(n) for n in counts.values()]


def check_served(record: dict[str, Any], vectors: dict[str, Any], *, where: str) -> None:
    """The recipe in RECORD reads only vectors the collection has (VECTORS: name -> its params), else a clear
    error before any query runs."""
    from m3tune.evaluation.fusion import Recipe

    recipe = Recipe.from_json(record.get("recipe") or {}, where=f"{where}'s recipe")
    missing = [v for v in vectors_of(recipe.kinds) if v not in vectors]
    if missing:
        raise UserError(f"{where}: the fusion recipe reads the vector(s) {', '.join(missing)}, which the "
                        f"collection lacks (it has: {', '.join(sorted(vectors)) or 'none'}); nothing was searched")


def language_of(text: str) -> str:
    """'ar' when TEXT has Arabic letters, else 'en' (the recipe's weights and BM25's index are per language)."""
    return "ar" if any("\u0600" <= c <= "\u06ff" for c in text) else "en"


def search(prod, collection: str, record: dict[str, Any], encoder, queries: Sequence[tuple[str, str, str]], *,
           key: str = "passage_id", batch: int = 32, cache=None) -> dict[str, dict[str, float]]:
    """Each query's fused top DEPTH from COLLECTION (or an alias): QUERIES are (id, text, language)."""
    import numpy as np
    from qdrant_client import models

    from m3tune.evaluation import bm25 as lexical
    from m3tune.evaluation.fusion import Recipe, fuse_one, lexical_only, routed

    recipe = Recipe.from_json(record["recipe"], where=f"collection {collection!r}'s recipe")
    salt, dim = int(record["served"]["salt"]), int(record["dim"])
    params = models.SearchParams(exact=True) if prod.remote else None
    dense_needed = any(k != "bm25" for k in recipe.kinds)
    out: dict[str, dict[str, float]] = {}
    for start in range(0, len(queries), batch):
        chunk = queries[start:start + batch]
        qvecs = None
        if dense_needed:
            texts = [t for _, t, _ in chunk]
            qvecs = cache.encode(encoder, texts, queries=True) if cache is not None else encoder.encode(
                texts, queries=True)
            qvecs = qvecs[:, :dim] / np.maximum(np.linalg.norm(qvecs[:, :dim], axis=1, keepdims=True), 1e-12)
        requests, slots = [], []  # slots[i]: (query index, member index, kind of list)
        for qi, (_, text, lang) in enumerate(chunk):
            for mi, kind in enumerate(recipe.kinds):
                if kind == "bm25":
                    terms = lexical.english_terms(text) if lang == "en" else lexical.arabic_query_terms(text)
                    if not terms:
                        continue  # bm25s finds nothing for a query without an indexed term
                    ids, values = bm25_query(terms, salt)
                    requests.append(models.QueryRequest(query=models.SparseVector(indices=ids, values=values),
                                                        using=BM25_EN if lang == "en" else BM25_AR,
                                                        limit=recipe.depth, with_payload=[key], params=params))
                    slots.append((qi, mi))
                else:
                    for name in READS[kind]:
                        requests.append(models.QueryRequest(query=qvecs[qi].tolist(), using=name, limit=recipe.depth,
                                                            with_payload=[key], params=params))
                        slots.append((qi, mi))
        responses = prod.call(f"query {collection!r}", prod.client.query_batch_points, collection,
                              requests=requests) if requests else []
        lists: list[list[dict[str, float]]] = [[{} for _ in recipe.kinds] for _ in chunk]
        lexical_points: dict[int, list] = {}  # query index -> its BM25 list's points, best first
        for (qi, mi), response in zip(slots, responses):
            if recipe.kinds[mi] == "bm25":
                lexical_points[qi] = list(response.points)
            merged = lists[qi][mi]
            for p in response.points:
                pid = str((p.payload or {}).get(key))
                score = float(p.score)
                if kind_positive(recipe.kinds[mi], score) and (pid not in merged or score > merged[pid]):
                    merged[pid] = score  # bilingual(-body): a passage's best vector
        for qi, (qid, text, lang) in enumerate(chunk):
            quote = recipe.quote_share is not None and lang != "en" and routed(
                recipe, _quote_share(prod, collection, text, salt, lexical_points.get(qi, [])))
            out[qid] = fuse_one(lists[qi], lexical_only(recipe) if quote else recipe.weights_for(lang),
                                normalization=recipe.normalization, kinds=recipe.kinds, depth=recipe.depth)
    return out


def _quote_share(prod, collection: str, text: str, salt: int, points: list) -> float:
    """fusion.quote_share, served: the query's word-pair term ids against the bm25-ar vectors of BM25's top
    passages (fetched from the collection)."""
    from m3tune.evaluation import bm25 as lexical
    from m3tune.evaluation.fusion import QUOTE_DEPTH, QUOTE_MIN_PAIRS, quote_share

    pairs = {term_id(t, salt) for t in lexical.arabic_query_terms(text) if t.startswith("p:")}
    if len(pairs) < QUOTE_MIN_PAIRS or not points:
        return 0.0
    top = [p.id for p in points[:QUOTE_DEPTH]]
    got = prod.call(f"retrieve {collection!r}", prod.client.retrieve, collection, ids=top, with_vectors=[BM25_AR])
    vectors = {p.id: set((p.vector or {}).get(BM25_AR).indices) for p in got if (p.vector or {}).get(BM25_AR)}
    return quote_share(sorted(pairs), [vectors.get(i, set()) for i in top])


def kind_positive(kind: str, score: float) -> bool:
    """bm25s returns only passages scoring above 0; Qdrant's sparse search returns only matching ones."""
    return score > 0 if kind == "bm25" else True


def open_served(prod, alias: str) -> tuple[str, dict[str, Any]]:
    """(collection, m3tune's record) behind ALIAS, checked: a fused system whose recipe reads only vectors
    the collection has."""
    from m3tune.publish.fused import shape_of

    collection = prod.alias_target(alias)
    if collection is None:
        raise UserError(f"alias {alias!r} does not exist at {prod.where}")
    record = prod.record(collection)
    if record is None or "recipe" not in record:
        raise UserError(f"alias {alias!r} points to {collection!r}, which holds no fused system m3tune published "
                        "(publish a fusion: model of evaluate); nothing was searched")
    check_served(record, shape_of(prod, collection), where=f"collection {collection!r}")
    return collection, record


def served_encoder(record: dict[str, Any], model: str | None = None):
    """The encoder RECORD's system reads (None: BM25 alone), loaded as evaluate loaded it. MODEL (a folder or
    hub id) replaces where it is read from; its fingerprint must be the published one."""
    from m3tune.evaluation.models import EncodeOptions, load_dense, parse_model
    from m3tune.runroot import open_root

    how = (record.get("served") or {}).get("encoder")
    if how is None:
        if model is not None:
            raise UserError("this alias's system reads no encoder (BM25 alone): --model has nothing to replace")
        return None
    spec = parse_model(how["spec"], how["base_model"])
    if model is not None:
        spec = spec.__class__(spec.name, spec.kind, model, spec.spec)
    root = open_root(record["root"]) if spec.target.startswith("run:") else None
    options = EncodeOptions(max_length=how.get("max_length"), dtype=how.get("dtype", "auto"),
                            profiles=how.get("profiles") or {})
    encoder = load_dense(spec, root, options)
    published = record["model"]["fingerprint"]
    if encoder.fingerprint != published:
        raise UserError(f"the alias serves model {record['model'].get('encoder')} (fingerprint {published[:12]}); "
                        f"{model or spec.target} is another (fingerprint {encoder.fingerprint[:12]}): its query "
                        "vectors would not match the collection's; nothing was searched")
    return encoder


def search_alias(prod, alias: str, query: str, *, k: int = 10, language: str | None = None,
                 model: str | None = None) -> list[tuple[str, float, dict[str, Any]]]:
    """The documented Python call: QUERY's top K (passage id, fused score, payload) from the fused system
    behind ALIAS, run by its recorded recipe (LANGUAGE: 'ar' or 'en'; None: from the query's script)."""
    if language not in (None, "ar", "en"):
        raise UserError(f"language {language!r}: ar, en, or none (from the query's script)")
    collection, record = open_served(prod, alias)
    encoder = served_encoder(record, model)
    lang = language or language_of(query)
    run = search(prod, collection, record, encoder, [("q", query, lang)])
    top = list(run["q"].items())[:k]
    points = prod.call(f"retrieve {collection!r}", prod.client.scroll, collection, limit=len(top) or 1,
                       scroll_filter=_ids_filter([pid for pid, _ in top]), with_payload=True)[0] if top else []
    payload = {str((p.payload or {}).get("passage_id")): dict(p.payload or {}) for p in points}
    return [(pid, score, payload.get(pid, {})) for pid, score in top]


def _ids_filter(ids: list[str]):
    from qdrant_client import models

    return models.Filter(must=[models.FieldCondition(key="passage_id", match=models.MatchAny(any=ids))])
