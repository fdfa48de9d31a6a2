"""What a running step sees: the run root, its own output folder, its shard."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

from m3tune.jsonl import JsonlWriter, Rejects, write_jsonl
from m3tune.storage import Store, WrittenFile


@dataclass
class StepContext:
    """What a running step sees: the run root, its own output folder, its shard."""

    root: Store
    name: str
    needs: tuple[str, ...] = ()
    rank: int = 0
    world_size: int = 1
    folder: Store | None = None  # a shard's own folder; None: ROOT/NAME
    outputs: dict[str, WrittenFile] = field(default_factory=dict)

    @property
    def out(self) -> Store:
        """The step's own folder, ROOT/NAME (a shard's: ROOT/NAME/shards/R-of-N): the only place it writes."""
        return self.folder if self.folder is not None else self.root.child(self.name)

    def my_share(self, items: list) -> list:
        """This shard's contiguous block of ITEMS (all of them unsharded): blocks in rank order rebuild the list."""
        n = len(items)
        return items[self.rank * n // self.world_size:(self.rank + 1) * n // self.world_size]

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

    @contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        """Publish REL atomically from what the block writes to a binary stream (no copy of it held in memory)
        and record it as an output."""
        with self.out.open_write(rel) as w:
            yield w
        self.outputs[rel] = w.result  # type: ignore[attr-defined]

    def write_rejects(self, rejects: Rejects, rel: str = "rejects.jsonl") -> None:
        """Publish the invalid input lines (with file, line, field and reason) as REL."""
        with self.write_jsonl(rel) as w:
            w.write_all(rejects.rows)
        if len(rejects):
            self.log.warning("%d invalid input line(s) skipped; see %s", len(rejects), self.out.uri_of(rel))
