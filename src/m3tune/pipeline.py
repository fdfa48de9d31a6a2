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
    # Runs on GPU nodes (the CUDA image, `nvidia.com/gpu`, under `accelerate launch`, one node or many).
    gpu: bool = False
    # Reads an LLM / embeddings API key from the environment: only such steps' pods are given the key Secret.
    api_keys: bool = False
    # One process per GPU under `accelerate launch`, on one node or many (JobSet): the training step.
    distributed: bool = False
    # Writes to the production Qdrant: only such steps' pods are given the Qdrant Secret (URL and API key).
    qdrant: bool = False
    # Not run unless asked (`m3tune run --publish`; on Argo, the workflow parameter of the step's name).
    optional: bool = False

    def upstream(self, config: BaseModel) -> tuple[str, ...]:
        return self.needs_for(config) if self.needs_for else self.needs


def _steps() -> dict[str, Step]:
    from m3tune.analysis.analyze import AnalyzeConfig, analyze, analyze_inputs, show_report
    from m3tune.combine.step import CombineConfig, combine, combine_inputs, combine_needs, show_stats
    from m3tune.corpus.ingest import IngestConfig, ingest, ingest_inputs
    from m3tune.evaluation.step import EvaluateConfig, evaluate, evaluate_inputs, evaluate_needs, show_results
    from m3tune.generation.conceptual import GenerateConceptualConfig, generate_conceptual, generate_conceptual_inputs
    from m3tune.generation.exact import GenerateExactConfig, generate_exact, generate_exact_inputs, plan_exact
    from m3tune.generation.plan import plan_conceptual, plan_queries
    from m3tune.generation.queries import GenerateQueriesConfig, generate_queries, generate_queries_inputs
    from m3tune.index.step import IndexConfig, index
    from m3tune.mining.filter_existing import FilterConfig, filter_inputs, filter_negatives
    from m3tune.mining.mine import MineConfig, mine_negatives, plan_mining
    from m3tune.publish.step import PublishConfig, publish, publish_needs, show_published
    from m3tune.training.config import TrainConfig
    from m3tune.training.step import train

    steps = [
        Step("ingest", ingest, IngestConfig, "build passages.jsonl from the packaged Quran and hadith corpora and user files",
             external_inputs=ingest_inputs),
        Step("generate-queries", generate_queries, GenerateQueriesConfig,
             "native Arabic and English cross-lingual queries per passage (LLM or offline)",
             needs=("ingest",), external_inputs=generate_queries_inputs, plan=plan_queries, api_keys=True),
        Step("generate-conceptual", generate_conceptual, GenerateConceptualConfig,
             "thematic queries over a curated theme list, each with every passage assigned to it (LLM or offline)",
             needs=("ingest",), external_inputs=generate_conceptual_inputs, plan=plan_conceptual, api_keys=True),
        Step("generate-exact", generate_exact, GenerateExactConfig,
             "exact-quote queries (rule-based, no LLM): seeded spans of passages (a hadith's from its body, not "
             "its chain), each with every passage that contains it as positives; held-out passages never used",
             needs=("ingest",), external_inputs=generate_exact_inputs, plan=plan_exact),
        Step("index", index, IndexConfig, "encode the corpus and build its vector index (Qdrant or exact)",
             needs=("ingest",)),
        Step("mine-negatives", mine_negatives, MineConfig,
             "hard, semi-hard and random negatives per query, false negatives filtered out",
             needs=("ingest", "generate-queries", "generate-conceptual", "generate-exact", "index"), plan=plan_mining,
             shardable=True),
        Step("filter-negatives", filter_negatives, FilterConfig,
             "remove false negatives from an existing training file (FlagEmbedding format)",
             external_inputs=filter_inputs),
        Step("combine", combine, CombineConfig,
             "balance every example source to the share targets; grouped train / validation split; gold kept out",
             needs=("mine-negatives",), external_inputs=combine_inputs, needs_for=combine_needs, show=show_stats),
        # The gate before the GPU step: the combined training set against its targets.
        Step("analyze", analyze, AnalyzeConfig, "report shares by language, type and source against targets",
             needs=("combine",), external_inputs=analyze_inputs,
             needs_for=lambda config: () if config.inputs else ("combine",),
             show=show_report),
        Step("evaluate", evaluate, EvaluateConfig,
             "compare models on the gold standard: Recall@k, MRR, nDCG, MAP, breakdowns, significance, report",
             needs=("ingest", "train"), external_inputs=evaluate_inputs, needs_for=evaluate_needs, show=show_results,
             api_keys=True),  # API embedding models (`api:NAME`) read OPENAI_API_KEY
        Step("train", train, TrainConfig, "Matryoshka contrastive fine-tuning on Accelerate (DeepSpeed optional): "
             "model folder, checkpoints, validation metrics", needs=("combine", "analyze"), gpu=True, distributed=True,
             # analyze is the gate, not an input: train must not start before it passed (on Argo a task starts
             # as soon as its needs finish), but its report is not among train's input digests.
             needs_for=lambda config: ("combine", "ingest") if config.validation_corpus == "all" else ("combine",)),
        Step("publish", publish, PublishConfig, "put the evaluated model into production search: re-encode the "
             "corpus into a new Qdrant collection, verify it, pass the gate, move the alias atomically (optional)",
             needs=("evaluate",), needs_for=publish_needs, show=show_published, qdrant=True, optional=True),
    ]
    return {s.name: s for s in steps}


STEPS: dict[str, Step] = _steps()

# What `m3tune run` runs, in order.
PIPELINE: list[str] = ["ingest", "generate-queries", "generate-conceptual", "generate-exact", "index",
                       "mine-negatives", "combine", "analyze", "train", "evaluate"]
# Optional steps after it, run only when asked (`m3tune run --publish`, an Argo parameter).
OPTIONAL: list[str] = [name for name, step in STEPS.items() if step.optional]


def get_step(name: str) -> Step:
    try:
        return STEPS[name]
    except KeyError:
        raise ConfigError(f"unknown step {name!r}; steps: {', '.join(STEPS)}") from None
