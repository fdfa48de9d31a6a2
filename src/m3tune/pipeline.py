"""The pipeline, defined once: its steps, what each needs, and their order.

Both executors use this: the local executor (`m3tune run`, `m3tune step`)
and, later, the generated Argo WorkflowTemplate. A step is one function
`func(ctx, **config)` over its inputs and outputs; its config is a pydantic
model whose fields are the step's plain parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from m3tune.jsonl import JsonlWriter, Rejects, write_jsonl
from m3tune.storage import Store, WrittenFile


@dataclass
class StepContext:
    """What a running step sees: the run root, its own output folder, its shard."""

    root: Store
    name: str
    rank: int = 0
    world_size: int = 1
    outputs: dict[str, WrittenFile] = field(default_factory=dict)

    @property
    def out(self) -> Store:
        """The step's own folder, ROOT/NAME: the only place it writes."""
        return self.root.child(self.name)

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"m3tune.{self.name}")

    @contextmanager
    def write_jsonl(self, rel: str) -> Iterator[JsonlWriter]:
        """Publish REL atomically as JSONL and record it as an output."""
        with write_jsonl(self.out, rel) as w:
            yield w
        self.outputs[rel] = w.result  # type: ignore[attr-defined]
        self.log.info("wrote %s rows to %s", f"{w.rows:,}", self.out.uri_of(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.outputs[rel] = self.out.write_bytes(rel, data)

    def write_rejects(self, rejects: Rejects, rel: str = "rejects.jsonl") -> None:
        """Publish the invalid input lines, always, so a stale rejects file never survives a rerun."""
        with self.write_jsonl(rel) as w:
            w.write_all(rejects.rows)
        if len(rejects):
            self.log.warning("%d invalid input line(s) skipped; see %s", len(rejects), self.out.uri_of(rel))


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
        raise KeyError(f"unknown step {name!r}; steps: {', '.join(STEPS)}") from None
