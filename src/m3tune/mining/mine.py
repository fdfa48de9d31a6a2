"""The `mine-negatives` step: for each generated query, a pool of hard, semi-hard and random negatives.

For each query (both generation steps' `queries.jsonl`), the index is
searched to rank `end_rank`; the candidates at ranks [start_rank, end_rank)
that pass the false-negative rules (`mining/filters.py`) form the window.
Hard negatives come from its top, semi-hard ones from its middle, random
ones from the corpus (the query's source), all passing the same rules. The
top `start_rank` ranks are skipped: that is where unlabelled answers sit.
The three together are the query's negative POOL (`hard + semi_hard +
random`, 30 by default), each labelled in `neg_kinds`; training draws its
few negatives per example from the pool anew each epoch (FlagEmbedding's
practice), with configurable shares of the three kinds.

Positives are never cut: every positive id and text is written. The false-
negative rules guard the positives and every near-duplicate of them (the
ingest's groups, m3tune.corpus.neardup); the near-duplicates that are not
positives are written as `related_ids`, which training masks too.
Output: Example records (FlagEmbedding's query/pos/neg, plus ids, scores,
kinds, related ids, query id, language, type, source), one per query.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from m3tune.context import StepContext
from m3tune.errors import UserError
from m3tune.records import Example, Passage, Query
from m3tune.redact import key_env_validator

QUERY_FILES = (("generate-queries", "queries.jsonl"), ("generate-conceptual", "queries.jsonl"),
               ("generate-exact", "queries.jsonl"))


class MineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start_rank: int = Field(default=10, ge=0, description="first rank of the candidate window")
    end_rank: int = Field(default=200, ge=1, description="end of the candidate window (exclusive)")
    threshold: float = Field(default=0.95, gt=0, description="drop a candidate scored above this × the query's "
                             "positive score (see positive_reference)")
    positive_reference: Literal["lowest", "median", "highest"] = Field(
        default="median", description="with several positives, which of their scores the threshold multiplies")
    jaccard: float = Field(default=0.6, gt=0, le=1, description="drop a candidate sharing this share of tokens "
                           "(Jaccard) with a positive")
    hard: int = Field(default=16, ge=0, description="hard negatives in each query's pool (top of the window)")
    semi_hard: int = Field(default=8, ge=0, description="semi-hard negatives in each query's pool (middle of the "
                           "window)")
    random: int = Field(default=6, ge=0, description="random negatives in each query's pool (corpus, same source)")
    source: Literal["quran", "hadith", "all"] = Field(default="all", description="mine for these queries only")
    seed: int = Field(default=13, description="seed of the random negatives")
    consistency_k: int | None = Field(default=20, ge=1, description="drop a generated query none of whose "
                                      "positives ranks in this top k under the judge (none: no check)")
    consistency_judge: Literal["encoder", "bm25"] = Field(default="encoder", description="encoder (the index's "
                                                          "ranking; a real run) or bm25 (offline, tiny encoder)")
    min_negatives: int = Field(default=1, ge=0, description="drop examples with fewer negatives (0: keep all)")
    # Where the index step's collection lives and where queries are cached: given here, never taken from
    # index.json, which anyone who can write the run root can edit (a URL of theirs would receive the key).
    qdrant_url: str | None = Field(default=None, description="the Qdrant server the index step built its "
                                   "collection on (its qdrant_url; none: embedded or exact)")
    qdrant_api_key_env: str = Field(default="QDRANT_API_KEY", description="variable holding that server's API "
                                    "key, if any")
    embeddings_cache: str | None = Field(default=None, description="where encoded queries are cached (path or "
                                         "URI; default: the local m3tune cache folder)")

    # the rule of every API key variable (an *_API_KEY one, never AWS_*): its value goes out as the api-key header
    _key_variable = key_env_validator("qdrant_api_key_env")

    @field_validator("embeddings_cache")
    @classmethod
    def _cache_location(cls, where: str | None) -> str | None:
        from m3tune.names import safe_location

        return None if where is None else safe_location(where, "embeddings_cache")

    @model_validator(mode="after")
    def _window(self) -> "MineConfig":
        if self.end_rank <= self.start_rank:
            raise ValueError(f"end_rank ({self.end_rank}) must be above start_rank ({self.start_rank})")
        if self.consistency_judge == "encoder" and self.consistency_k and self.consistency_k > self.end_rank:
            raise ValueError(f"consistency_k ({self.consistency_k}) must not exceed end_rank ({self.end_rank})")
        pool = self.hard + self.semi_hard + self.random
        if pool < self.min_negatives:  # not one example could keep its negatives: 0 examples, exit 0 before
            raise ValueError(f"hard + semi_hard + random = {pool} negatives a query, but min_negatives is "
                             f"{self.min_negatives}: every example would be dropped; ask for at least "
                             "min_negatives (or min_negatives 0: in-batch negatives only)")
        return self


def load_queries(root) -> list[Query]:
    """The generated queries of the run at ROOT, in the order of QUERY_FILES."""
    from m3tune.jsonl import read_records

    out: list[Query] = []
    for step, name in QUERY_FILES:
        if root.child(step).exists(name):
            out += read_records(root.child(step), name, Query)
    return out


def check_server(info: dict[str, Any], qdrant_url: str | None, where: str) -> None:
    """The index's server must be the one mining's own config names: a URL read from index.json (WHERE) is
    never opened with a key, and a qdrant_url the index did not use is not silently ignored."""
    theirs = info.get("qdrant_url") if info["backend"] == "qdrant" else None
    if (theirs or None) != (qdrant_url or None):
        raise UserError(f"{where}: field qdrant_url is {theirs!r} but mine-negatives' qdrant_url is {qdrant_url!r}: "
                        "give mine-negatives the server the index step built on (--qdrant-url; a URL read from "
                        "the run root is never sent a key)")


def _search(info: dict[str, Any], vectors, ids: list[str], query_vectors, k: int, dry_run: bool = False, *,
            qdrant_url: str | None = None, qdrant_api_key_env: str = "QDRANT_API_KEY"):
    from m3tune.index.search import ExactIndex

    if info["backend"] == "exact" or (dry_run and not info.get("existing") and not qdrant_url):
        # a dry run does not build a local collection: exact search returns the same top k
        return ExactIndex(vectors, ids).search(query_vectors, k)
    from m3tune.index.step import edge_settings, local_edge_path, open_qdrant

    exact = info.get("qdrant_exact", True)
    ef = info.get("hnsw_ef")
    if not qdrant_url and not info.get("existing"):
        from m3tune.index.search import EdgeIndex

        # the embedded shard lives on this machine's disk: rebuilt from the published vectors where missing
        # (another machine, a cleared cache) or built otherwise (other rows, other graph settings)
        edge = EdgeIndex(local_edge_path(info["collection"]))
        settings = edge_settings(info)
        if not edge.matches(vectors, ids, **settings):
            edge.build(vectors, ids, **settings)
        return edge.search(query_vectors, k, ids, exact=exact, ef=ef or k)
    qdrant = open_qdrant(info["collection"], qdrant_url, qdrant_api_key_env)
    try:
        return qdrant.search(query_vectors, k, exact=exact, ef=ef)
    finally:
        qdrant.close()


def mine(root, queries: list[Query], passages: list[Passage], *, start_rank: int, end_rank: int, threshold: float,
         positive_reference: str = "median", jaccard: float, hard: int, semi_hard: int, random: int, source: str,
         seed: int, consistency_k: int | None = None, consistency_judge: str = "encoder", min_negatives: int = 0,
         qdrant_url: str | None = None, qdrant_api_key_env: str = "QDRANT_API_KEY",
         embeddings_cache: str | None = None,
         dry_run: bool = False) -> tuple[list[Example], dict[str, Any], list[dict[str, Any]]]:
    """(examples, counts, rejects) for QUERIES against the index published in ROOT/index."""
    from m3tune.arabic import tokens
    from m3tune.encoder.cache import EmbeddingCache
    from m3tune.encoder.model import load_encoder
    from m3tune.corpus.neardup import body, read_groups
    from m3tune.index.step import cache_store, read_index
    from m3tune.mining.filters import FalseNegativeFilter, pick_mix, reference_score

    info, vectors, ids = read_index(root.child("index"))
    check_server(info, qdrant_url, root.child("index").uri_of("index.json"))
    row_of = {pid: i for i, pid in enumerate(ids)}
    by_id = {p.id: p for p in passages}
    if set(by_id) != set(row_of):
        raise UserError("the index does not match the corpus (rerun the index step)")

    rejects: list[dict[str, Any]] = []
    kept_queries = []
    for q in queries:
        if source != "all" and q.source != source:
            continue
        unknown = [pid for pid in q.positive_ids if pid not in by_id]
        if unknown:
            rejects.append({"query_id": q.id, "reason": "unknown_positive", "ids": unknown})
            continue
        kept_queries.append(q)
    counts: Counter[str] = Counter(queries=len(kept_queries))
    counts["rejected_unknown_positive"] = len(rejects)
    if not kept_queries:
        return [], dict(counts), rejects

    encoder = load_encoder(info["model"], pooling=info["pooling"], query_prompt=info["query_prompt"],
                           passage_prompt=info["passage_prompt"], max_length=info["max_length"],
                           batch_size=info["batch_size"], dtype=info["dtype"], strip_marks=info["strip_marks"])
    if encoder.fingerprint != info["fingerprint"]:
        raise UserError(f"the encoder {info['model']!r} is not the one that built the index (fingerprint "
                        f"{encoder.fingerprint} != {info['fingerprint']}): rerun the index step")
    # the cache of mining's own config: index.json's embeddings_cache could name any folder
    query_vectors = EmbeddingCache(cache_store(embeddings_cache), encoder.fingerprint).encode(
        encoder, [q.query for q in kept_queries], queries=True, desc="encode queries")
    hits = _search(info, vectors, ids, query_vectors, end_rank, dry_run, qdrant_url=qdrant_url,
                   qdrant_api_key_env=qdrant_api_key_env)
    near = read_groups(root)
    if consistency_k:
        if consistency_judge == "bm25":
            from m3tune.mining.consistency import bm25_top_k

            judged = bm25_top_k(kept_queries, passages, consistency_k)
        else:
            judged = [[pid for _, pid in ranked[:consistency_k]] for ranked in hits]
        consistent = []
        for q, top in zip(kept_queries, judged):
            answers = near.closure(q.positive_ids, ("twin", "matn"))  # a twin found is the answer found
            if q.type == "conceptual":
                # a theme's tens of positives need not reach a top k: thematic queries are not judged this way
                counts["consistency_exempt_conceptual"] += 1
            elif q.generator.backend == "reference":
                # words people wrote about the passage (al-Muyassar's paraphrase of a verse), not a generator's
                # guess: the round trip checks generators, and BM25 would drop most paraphrases for sharing few
                # words (447 of 757 on the quality benchmark's corpus)
                counts["consistency_exempt_reference"] += 1
            elif top is None:
                counts["consistency_unjudged"] += 1
            elif not answers & set(top):
                counts["rejected_inconsistent"] += 1
                rejects.append({"query_id": q.id, "reason": "inconsistent", "query": q.query,
                                "judge": consistency_judge, "k": consistency_k})
                continue
            consistent.append(q)
        keep = {q.id for q in consistent}
        hits = [h for q, h in zip(kept_queries, hits) if q.id in keep]
        query_vectors = query_vectors[[i for i, q in enumerate(kept_queries) if q.id in keep]]
        kept_queries = consistent
        counts["queries"] = len(kept_queries)

    token_sets: dict[str, frozenset[str]] = {}

    def toks(pid: str) -> frozenset[str]:
        if pid not in token_sets:
            # a hadith's body without its chain: unrelated reports sharing a long chain are not near-duplicates
            token_sets[pid] = frozenset(tokens(body(by_id[pid])))
        return token_sets[pid]

    rules = FalseNegativeFilter(threshold=threshold, jaccard=jaccard, tokens=toks)
    pool = {s: [p.id for p in passages if p.source == s] for s in ("quran", "hadith")}
    pool["mixed"] = ids
    examples: list[Example] = []
    for q, qv, ranked in zip(kept_queries, query_vectors, hits):
        positives = near.closure(q.positive_ids)
        pos_rows = [row_of[pid] for pid in q.positive_ids]
        pos_scores = vectors[pos_rows] @ qv
        min_pos = float(pos_scores.min())
        ref = reference_score([float(s) for s in pos_scores], positive_reference)
        pos_tokens = [toks(pid) for pid in q.positive_ids]
        window = ranked[start_rank:end_rank]
        counts["candidates"] += len(window)
        if len(window) != len(known := [(s, p) for s, p in window if p in by_id]):
            counts["candidates_not_in_corpus"] += len(window) - len(known)  # an existing collection may hold more
            window = known
        survivors = rules.keep(window, positives, pos_tokens, ref)
        hard_picks, semi_picks = pick_mix(survivors, hard=hard, semi_hard=semi_hard)
        chosen = {pid for _, pid in hard_picks + semi_picks}
        top_ranks = {pid for _, pid in ranked[:start_rank]}  # where unlabelled answers sit: not even at random
        rng = random_for(seed, q.id)
        random_picks: list[tuple[float, str]] = []
        candidates = pool.get(q.source, ids)
        for _ in range(random * 20):
            if len(random_picks) >= random:
                break
            pid = candidates[rng.randrange(len(candidates))]
            if pid in chosen:
                continue
            if pid in top_ranks:
                counts["random_dropped_top_ranks"] += 1
                continue
            score = float(vectors[row_of[pid]] @ qv)
            why = rules.reason(pid, score, positives, pos_tokens, ref)
            if why is None:
                random_picks.append((score, pid))
                chosen.add(pid)
            else:
                counts[f"random_dropped_{why}"] += 1
        negatives = hard_picks + semi_picks + random_picks
        if len(negatives) < min_negatives:
            counts["examples_dropped_too_few_negatives"] += 1
            continue
        counts["hard"] += len(hard_picks)
        counts["semi_hard"] += len(semi_picks)
        counts["random"] += len(random_picks)
        if len(negatives) < hard + semi_hard + random:
            counts["examples_short_of_negatives"] += 1
        kinds = ["hard"] * len(hard_picks) + ["semi_hard"] * len(semi_picks) + ["random"] * len(random_picks)
        related = sorted(positives - set(q.positive_ids), key=row_of.__getitem__)
        counts["positives"] += len(q.positive_ids)
        counts["related"] += len(related)
        examples.append(Example(
            query=q.query, pos=[by_id[p].text for p in q.positive_ids], neg=[by_id[p].text for _, p in negatives],
            pos_ids=list(q.positive_ids), neg_ids=[p for _, p in negatives], neg_kinds=kinds,
            related_ids=related or None,
            pos_scores=[round(float(s), 6) for s in pos_scores],
            neg_scores=[round(s, 6) for s, _ in negatives], query_id=q.id, language=q.language, type=q.type,
            source=q.source, min_pos_score=round(min_pos, 6)))
    result = dict(counts)
    result["examples"] = len(examples)
    result["dropped"] = dict(rules.dropped)
    return examples, result, rejects


def random_for(seed: int, key: str) -> random.Random:
    """A generator of its own per query: the same negatives whatever the order or sharding of queries."""
    return random.Random(int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16))


def mine_negatives(ctx: StepContext, **config: Any) -> dict[str, Any]:
    from m3tune.corpus.passages import read_passages

    passages = read_passages(ctx.root)
    queries = ctx.my_share(load_queries(ctx.root))  # a shard mines its block of the queries
    examples, counts, rejects = mine(ctx.root, queries, passages, **config)
    with ctx.write_jsonl("examples.jsonl") as out:
        out.write_all(examples)
    with ctx.write_jsonl("rejects.jsonl") as out:
        out.write_all(rejects)
    ctx.log.info("%s examples; negatives: %s hard, %s semi-hard, %s random; dropped: %s", f"{len(examples):,}",
                 counts.get("hard", 0), counts.get("semi_hard", 0), counts.get("random", 0), counts.get("dropped"))
    return {"counts": counts, "metrics": {}}


def plan_mining(root, config: MineConfig) -> str:
    """`--dry-run`: the counts a run would give, nothing written."""
    from m3tune.corpus.passages import read_passages

    passages = read_passages(root)
    _, counts, _ = mine(root, load_queries(root), passages, **config.model_dump(), dry_run=True)
    return "mine-negatives (dry run, nothing published):\n" + json.dumps(counts, indent=2)
