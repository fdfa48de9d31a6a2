"""What both generation steps share: backend choice, validation bounds, reading the corpus, publishing."""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from m3tune.context import StepContext
from m3tune.generation.llm import LLMSettings, RunStats
from m3tune.generation.validate import QueryValidator
from m3tune.jsonl import read_records
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


def load_passages(ctx: StepContext) -> list[Passage]:
    return list(read_records(ctx.root.child("ingest"), "passages.jsonl", Passage))


def seeded_order(ids: list[str], seed: int) -> list[str]:
    """IDS in a fixed pseudo-random order: the same for the same seed on every machine."""
    return sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())


def validator(min_chars: int, max_words: int, max_copy_words: int) -> QueryValidator:
    return QueryValidator(min_chars=min_chars, max_words=max_words, max_copy_words=max_copy_words)


def publish(ctx: StepContext, queries: list[Query], rejects: list[dict[str, Any]], *,
            checks: QueryValidator, stats: RunStats | None, extra: dict[str, Any]) -> dict[str, Any]:
    """Write queries.jsonl and rejects.jsonl; return the manifest's counts and metrics."""
    with ctx.write_jsonl("queries.jsonl") as out:
        out.write_all(queries)
    with ctx.write_jsonl("rejects.jsonl") as out:
        out.write_all(rejects)
    counts: dict[str, Any] = {
        "queries": len(queries),
        "language": dict(Counter(q.language for q in queries)),
        "type": dict(Counter(q.type for q in queries)),
        "source": dict(Counter(q.source for q in queries)),
        "rejected_queries": dict(checks.rejected),
        **extra,
    }
    metrics: dict[str, Any] = {}
    if stats is not None:
        counts["llm"] = stats.as_dict()
        metrics = {"cost_usd": counts["llm"]["cost_usd"], "requests": stats.requests,
                   "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens}
    ctx.log.info("%s queries (%s); rejected: %s", f"{len(queries):,}",
                 ", ".join(f"{k} {v}" for k, v in counts["language"].items()), dict(checks.rejected) or "none")
    return {"counts": counts, "metrics": metrics}
