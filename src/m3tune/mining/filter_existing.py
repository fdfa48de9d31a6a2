"""The `filter-negatives` step: remove false negatives from an existing training file.

Reads a FlagEmbedding-style JSONL (query, pos, neg; scores and ids optional,
extra fields kept), rescores every query against its positives and negatives
with the encoder, and drops each negative that the rules of
`mining/filters.py` reject: the same passage as a positive (same id, or same
normalized text), scored above `threshold` × the positives' score (their
median by default, `positive_reference`), or
sharing `jaccard` of its tokens with a positive. Positives are never
touched. An example left with fewer than `min_negatives` negatives is
dropped (0 keeps them all). Counts per reason go to the manifest; the guide
expects about 70% of an old file's hard negatives to go.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from m3tune.context import StepContext
from m3tune.errors import UserError
from m3tune.records import Example
from m3tune.index.step import EncoderSettings
from m3tune.storage import absolute_uri


class FilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | None = Field(default=None, description="training JSONL to filter (FlagEmbedding format: query, "
                              "pos, neg; path or URI)")
    encoder: EncoderSettings = Field(default_factory=EncoderSettings, description="the encoder that rescores")
    threshold: float = Field(default=0.95, gt=0, description="drop a negative scored above this × the "
                             "positives' score (see positive_reference)")
    positive_reference: Literal["lowest", "median", "highest"] = Field(
        default="median", description="with several positives, which of their scores the threshold multiplies")
    jaccard: float = Field(default=0.6, gt=0, le=1, description="drop a negative sharing this share of tokens "
                           "(Jaccard) with a positive")
    min_negatives: int = Field(default=1, ge=0, description="drop examples left with fewer negatives (0: keep all)")
    embeddings_cache: str | None = Field(default=None, description="where encoded texts are cached (path or URI; "
                                         "default: the local m3tune cache folder)")
    skip_invalid: bool = Field(default=False, description="skip invalid lines (to rejects.jsonl) instead of failing")

    @field_validator("input")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return absolute_uri(value) if value else value

    @field_validator("embeddings_cache")
    @classmethod
    def _cache_location(cls, where: str | None) -> str | None:
        from m3tune.names import safe_location

        return None if where is None else safe_location(where, "embeddings_cache")


def filter_inputs(config: FilterConfig) -> dict[str, str]:
    from m3tune.storage import file_digest, split_uri

    if not config.input:
        return {}
    store, name = split_uri(config.input)
    return {f"input:{config.input}": "sha256:" + file_digest(store, name)}


class OldExample(Example):
    """A line of the file to filter. A positive id among the negatives is refused everywhere else (records.py);
    here it is the false negative this step exists to remove, so the line is read and repaired, not lost."""

    @field_validator("neg_ids")
    @classmethod
    def _no_positive_negative(cls, values: list | None, info: ValidationInfo) -> list | None:
        return values


def filter_negatives(ctx: StepContext, *, input: str | None, encoder: dict[str, Any], threshold: float,
                     positive_reference: str = "median", jaccard: float, min_negatives: int, skip_invalid: bool,
                     embeddings_cache: str | None) -> dict[str, Any]:
    from m3tune.arabic import normalize, tokens
    from m3tune.encoder.cache import EmbeddingCache
    from m3tune.index.step import cache_store
    from m3tune.jsonl import Rejects, read_jsonl
    from m3tune.mining.filters import FalseNegativeFilter, reference_score
    from m3tune.storage import split_uri

    if not input:
        raise UserError("filter-negatives needs --input: the training JSONL to filter")
    rejects = Rejects() if skip_invalid else None
    store, name = split_uri(input)
    with store.open_read(name) as f:
        examples = list(read_jsonl(f, OldExample, name=input, rejects=rejects))
    settings = EncoderSettings.model_validate(encoder)
    model = settings.load()
    cache = EmbeddingCache(cache_store(embeddings_cache), model.fingerprint)
    queries = cache.encode(model, [e.query for e in examples], queries=True, desc="encode queries")
    texts = sorted({t for e in examples for t in (*e.pos, *e.neg)})
    row = {t: i for i, t in enumerate(texts)}
    vectors = cache.encode(model, texts, desc="encode passages")
    plain = {t: normalize(t) for t in texts}
    word_sets = {t: frozenset(tokens(plain[t])) for t in texts}
    rules = FalseNegativeFilter(threshold=threshold, jaccard=jaccard, tokens=lambda t: word_sets[t])
    counts: Counter[str] = Counter()
    kept_examples = []
    for ex, qv in zip(examples, queries):
        pos_scores = [float(vectors[row[t]] @ qv) for t in ex.pos]
        same = {t for t in ex.neg if plain[t] in {plain[p] for p in ex.pos}}
        if ex.pos_ids and ex.neg_ids:
            same |= {t for t, nid in zip(ex.neg, ex.neg_ids) if nid in set(ex.pos_ids)}
        # the rules look at texts here (ids are optional in this format): a negative equal to a positive is "positive"
        keep = []
        for i, t in enumerate(ex.neg):
            score = float(vectors[row[t]] @ qv)
            why = rules.reason(t, score, same, [word_sets[p] for p in ex.pos],
                               reference_score(pos_scores, positive_reference))
            counts["negatives_in"] += 1
            if why is None:
                keep.append(i)
            else:
                rules.dropped[why] += 1
        if len(keep) < min_negatives:
            counts["examples_dropped_too_few_negatives"] += 1
            continue
        update: dict[str, Any] = {"neg": [ex.neg[i] for i in keep], "pos_scores": [round(s, 6) for s in pos_scores],
                                  "neg_scores": [round(float(vectors[row[ex.neg[i]]] @ qv), 6) for i in keep]}
        if ex.neg_ids is not None:
            update["neg_ids"] = [ex.neg_ids[i] for i in keep]
        kept_examples.append(ex.model_copy(update=update))
    with ctx.write_jsonl("examples.jsonl") as out:
        out.write_all(kept_examples)
    if rejects is not None:
        ctx.write_rejects(rejects)
    removed = sum(rules.dropped.values())
    share = removed / counts["negatives_in"] if counts["negatives_in"] else 0.0
    ctx.log.info("removed %s of %s negatives (%.1f%%): %s; %s examples kept of %s", f"{removed:,}",
                 f"{counts['negatives_in']:,}", 100 * share, dict(rules.dropped), f"{len(kept_examples):,}",
                 f"{len(examples):,}")
    return {"counts": {"examples_in": len(examples), "examples_out": len(kept_examples), **counts,
                       "removed": dict(rules.dropped), "rejected_lines": len(rejects) if rejects else 0},
            "metrics": {"removed_share": round(share, 4)}}
