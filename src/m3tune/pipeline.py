"""The pipeline, defined once: its steps, what each needs, and their order.

Both executors use this: the local executor (`m3tune run`, `m3tune step`)
and, later, the generated Argo WorkflowTemplate. A step is one function
`func(ctx, **config)` over its inputs and outputs; its config is a pydantic
model whose fields are the step's plain parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from m3tune.errors import ConfigError


@dataclass(frozen=True)
class Step:
    name: str
    func: Callable[..., dict[str, Any]]
    config: type[BaseModel]
    summary: str
    needs: tuple[str, ...] = ()
    # Digests of what the step reads from outside the run (user files, packaged data).
    external_inputs: Callable[[Any], dict[str, str]] = lambda config: {}
    # When given, the upstream steps this config actually reads (default: all of `needs`).
    needs_for: Callable[[Any], tuple[str, ...]] | None = None
    # `--dry-run`: (run root, config) -> what a run would do, calling and writing nothing.
    plan: Callable[[Any, Any], str] | None = None
    # What `m3tune step NAME` prints after the step, from the run root (a rich renderable).
    show: Callable[[Any], Any] | None = None
    # Can run as N shards (--rank R --world-size N), each on its block of the work, then be merged.
    shardable: bool = False

    def upstream(self, config: BaseModel) -> tuple[str, ...]:
        return self.needs_for(config) if self.needs_for else self.needs


def _steps() -> dict[str, Step]:
    from m3tune.analysis.analyze import AnalyzeConfig, analyze, analyze_inputs, show_report
    from m3tune.corpus.ingest import IngestConfig, ingest, ingest_inputs
    from m3tune.generation.conceptual import GenerateConceptualConfig, generate_conceptual, generate_conceptual_inputs
    from m3tune.generation.plan import plan_conceptual, plan_queries
    from m3tune.generation.queries import GenerateQueriesConfig, generate_queries, generate_queries_inputs
    from m3tune.index.step import IndexConfig, index
    from m3tune.mining.filter_existing import FilterConfig, filter_inputs, filter_negatives
    from m3tune.mining.mine import MineConfig, mine_negatives, plan_mining

    steps = [
        Step("ingest", ingest, IngestConfig, "build passages.jsonl from the packaged Quran and hadith corpora and user files",
             external_inputs=ingest_inputs),
        Step("generate-queries", generate_queries, GenerateQueriesConfig,
             "native Arabic and English cross-lingual queries per passage (LLM or offline)",
             needs=("ingest",), external_inputs=generate_queries_inputs, plan=plan_queries),
        Step("generate-conceptual", generate_conceptual, GenerateConceptualConfig,
             "thematic queries over a curated theme list, each with every passage assigned to it (LLM or offline)",
             needs=("ingest",), external_inputs=generate_conceptual_inputs, plan=plan_conceptual),
        Step("index", index, IndexConfig, "encode the corpus and build its vector index (Qdrant or exact)",
             needs=("ingest",)),
        Step("mine-negatives", mine_negatives, MineConfig,
             "hard, semi-hard and random negatives per query, false negatives filtered out",
             needs=("ingest", "generate-queries", "generate-conceptual", "index"), plan=plan_mining, shardable=True),
        Step("filter-negatives", filter_negatives, FilterConfig,
             "remove false negatives from an existing training file (FlagEmbedding format)",
             external_inputs=filter_inputs),
        # Until `combine` lands, analyze gates the generated queries.
        Step("analyze", analyze, AnalyzeConfig, "report shares by language, type and source against targets",
             needs=("generate-queries", "generate-conceptual"), external_inputs=analyze_inputs,
             needs_for=lambda config: () if config.inputs else ("generate-queries", "generate-conceptual"),
             show=show_report),
    ]
    return {s.name: s for s in steps}


STEPS: dict[str, Step] = _steps()

# What `m3tune run` runs, in order.
PIPELINE: list[str] = ["ingest", "generate-queries", "generate-conceptual", "analyze", "index", "mine-negatives"]


def get_step(name: str) -> Step:
    try:
        return STEPS[name]
    except KeyError:
        raise ConfigError(f"unknown step {name!r}; steps: {', '.join(STEPS)}") from None
