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


def _steps() -> dict[str, Step]:
    from m3tune.analysis.analyze import AnalyzeConfig, analyze, analyze_inputs
    from m3tune.corpus.ingest import IngestConfig, ingest, ingest_inputs

    steps = [
        Step("ingest", ingest, IngestConfig, "build passages.jsonl from the packaged Quran and hadith corpora and user files",
             external_inputs=ingest_inputs),
        Step("analyze", analyze, AnalyzeConfig, "report shares by language, type and source against targets",
             external_inputs=analyze_inputs),
    ]
    return {s.name: s for s in steps}


STEPS: dict[str, Step] = _steps()

# What `m3tune run` runs, in order. `analyze` joins once `combine` exists to feed it.
PIPELINE: list[str] = ["ingest"]


def get_step(name: str) -> Step:
    try:
        return STEPS[name]
    except KeyError:
        raise ConfigError(f"unknown step {name!r}; steps: {', '.join(STEPS)}") from None
