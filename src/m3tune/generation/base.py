"""What both generation steps share: backend choice, validation bounds, reading the corpus, publishing."""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from m3tune.context import StepContext
from m3tune.errors import BadInput
from m3tune.generation.llm import LLMSettings
from m3tune.generation.validate import QueryValidator
from m3tune.records import Passage, Query

Backend = Literal["offline", "openai"]


class GenerationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Backend = Field(default="offline", description="'offline' (no network, deterministic, weaker) or "
                             "'openai' (any OpenAI-compatible endpoint; OpenRouter by default)")
    llm: LLMSettings = Field(default_factory=LLMSettings, description="endpoint settings, for backend 'openai'")
    min_chars: int = Field(default=4, ge=1, description="shortest accepted query, in characters")
    max_words: int = Field(default=24, ge=1, description="longest accepted query, in words")
    max_copy_words: int = Field(default=5, ge=1, description="reject a query that copies more consecutive words "
                                "of its passage than this (type 'exact' is exempt)")


def seeded_order(ids: list[str], seed: int) -> list[str]:
    """IDS in a fixed pseudo-random order: the same for the same seed on every machine."""
    return sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())


def twins(passages: list[Passage], kinds: tuple[str, ...] = ("twin", "matn")) -> dict[str, list[str]]:
    """For each passage, every passage of the same near-duplicate groups of KINDS (itself first).

    Hadith collections repeat reports word for word (`twin`), or the same body
    under another chain of narrators (`matn`); a query about one copy is
    answered by all of them, so all are its positives: none may later serve as
    its negative. The groups are the ingest's (m3tune.corpus.neardup, the same
    rule over the same passages). A verse quoted in a hadith is not an answer
    to a query about the hadith: `verse_quote` groups only guard negatives.
    """
    from m3tune.corpus.neardup import NearDuplicates, compute_groups

    near = NearDuplicates(compute_groups(passages, kinds))
    return {p.id: near.related(p.id, kinds) for p in passages}


def check_and_publish(ctx: StepContext, generated: list[tuple[Query, list[str]]], *, min_chars: int, max_words: int,
                      max_copy_words: int, outcome=None, extra_rejects: list[dict[str, Any]] = (),
                      extra: dict[str, Any]) -> tuple[dict[str, Any], list[Query]]:
    """Check every (query, texts it must not copy), write queries.jsonl and rejects.jsonl.

    Returns (the step's result for the manifest, the queries kept).

    OUTCOME is the LLM backend's (None offline): its rejects are listed and an
    unfinished run is reported incomplete, so a rerun asks for the rest.
    """
    checks = QueryValidator(min_chars=min_chars, max_words=max_words, max_copy_words=max_copy_words)
    rejects: list[dict[str, Any]] = [{"kind": "item", **r} for r in (outcome.rejects if outcome else [])]
    rejects += extra_rejects
    kept = []
    for query, texts in generated:
        why = checks.reason(query, texts)
        if why is None:
            kept.append(query)
        else:
            checks.rejected[why] += 1
            rejects.append({"kind": "query", "key": query.id, "reason": why, "query": query.query})
    with ctx.write_jsonl("queries.jsonl") as out:
        out.write_all(kept)
    with ctx.write_jsonl("rejects.jsonl") as out:
        out.write_all(rejects)
    counts: dict[str, Any] = {
        "queries": len(kept),
        "language": dict(Counter(q.language for q in kept)),
        "type": dict(Counter(q.type for q in kept)),
        "source": dict(Counter(q.source for q in kept)),
        "rejected_queries": dict(checks.rejected),
        **extra,
    }
    result: dict[str, Any] = {"counts": counts, "metrics": {}}
    if outcome is not None:
        stats = outcome.stats
        counts["llm"] = stats.as_dict()
        result["metrics"] = {"cost_usd": counts["llm"]["cost_usd"], "requests": stats.requests,
                             "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens}
        result["incomplete"] = stats.incomplete
    ctx.log.info("%s queries (%s); rejected: %s", f"{len(kept):,}",
                 ", ".join(f"{k} {v}" for k, v in counts["language"].items()) or "none",
                 dict(checks.rejected) or "none")
    if outcome is not None and not kept and rejects and not outcome.stats.incomplete:
        _nothing_accepted(ctx, rejects)
    return result, kept


def _nothing_accepted(ctx: StepContext, rejects: list[dict[str, Any]]) -> None:
    """Raise: an LLM run whose every answer (or every query in them) was rejected, and with nothing left to ask,
    generated nothing; a rerun reads the same answers from the journal, so it is bad input, not a success."""
    reasons = Counter(f"{r['kind']} {str(r.get('reason'))[:40]}" for r in rejects)
    listed = ", ".join(f"{k}: {v}" for k, v in reasons.most_common(5))
    raise BadInput(f"no query was accepted: every answer or query was rejected ({listed}); see "
                   f"{ctx.out.uri_of('rejects.jsonl')}; change the model, prompt or settings (the same requests "
                   "read the same answers from the journal), then rerun")
