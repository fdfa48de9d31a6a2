"""The `_manifest.json` a step publishes last: proof of what it did, from what.

A step whose manifest records the same config digest and input digests as
the ones it would run with now, and whose outputs all exist, is done and is
skipped. Input digests are taken from the upstream steps' manifests (the
sha256 of each file they published) and, for inputs outside the run, from
the files themselves (streamed through sha256 on every check: a user file is
read once more than the step needs) or the versions of the packages they come
from. Upstream data itself is never re-read to decide a skip.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from m3tune.storage import Store, StorageError

MANIFEST = "_manifest.json"


class OutputInfo(BaseModel):
    sha256: str
    bytes: int
    rows: int | None = None


class Manifest(BaseModel):
    step: str
    m3tune_version: str
    config: dict[str, Any]
    config_digest: str
    inputs: dict[str, str] = Field(description="input name -> digest, for the up-to-date check")
    outputs: dict[str, OutputInfo]
    counts: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    started_at: str
    finished_at: str
    seconds: float
    complete: bool = Field(default=True, description="false: outputs published, but a rerun has work left")
    incomplete_reason: str | None = None


def config_digest(config: BaseModel) -> str:
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def read_manifest(step_store: Store) -> Manifest | None:
    """The manifest in a step's folder, or None if the step has not finished there."""
    if not step_store.exists(MANIFEST):
        return None
    try:
        return Manifest.model_validate_json(step_store.read_bytes(MANIFEST))
    except ValidationError as e:
        raise StorageError(f"{step_store.uri_of(MANIFEST)} is not a valid manifest: {e}") from None


def write_manifest(step_store: Store, manifest: Manifest) -> None:
    step_store.write_bytes(MANIFEST, manifest.model_dump_json(indent=2).encode() + b"\n")
