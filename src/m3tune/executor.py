"""The local executor: runs steps in this process, skipping what is proven done.

`run_step` is what `m3tune step NAME` and each Argo task call; `run_pipeline`
is `m3tune run`, the DAG in order on one machine. Neither has step logic of
its own: both check the manifest, call the step function, publish the
manifest last.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Literal

from pydantic import BaseModel

from m3tune import __version__
from m3tune.manifest import (MANIFEST, Manifest, OutputInfo, Tampered, config_digest, read_manifest,
                             tampered_message, write_manifest)
from m3tune.context import StepContext
from m3tune.errors import ConfigError, UserError
from m3tune.pipeline import PIPELINE, STEPS, Step, get_step
from m3tune.runroot import verified
from m3tune.storage import StorageError, Store, file_digest

log = logging.getLogger("m3tune")

# tampered: a published output is not what its manifest recorded (stale is "inputs or config changed")
State = Literal["done", "stale", "missing", "tampered"]


class MissingInput(UserError):
    """A step's upstream step has not finished in this run."""


@dataclass
class StepStatus:
    step: str
    state: State
    reason: str
    manifest: Manifest | None


def current_inputs(root: Store, step: Step, config: BaseModel) -> dict[str, str]:
    """Digests of everything STEP would read now: upstream outputs and external inputs."""
    inputs: dict[str, str] = {}
    for need in step.upstream(config):
        upstream = read_manifest(root.child(need))
        if upstream is None:
            raise MissingInput(f"step '{step.name}' needs '{need}', which has not finished in {root.uri}")
        for name, info in upstream.outputs.items():
            inputs[f"{need}/{name}"] = "sha256:" + info.sha256
    inputs.update(step.external_inputs(config))
    return inputs


def _changed(old: dict[str, str], new: dict[str, str]) -> str:
    names = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def shard_folder(root: Store, name: str, rank: int, world_size: int) -> Store:
    return root.child(name).child(f"shards/{rank:05d}-of-{world_size:05d}")


def _output_problem(folder: Store, name: str, info: OutputInfo, *, verify: bool) -> StepStatus | None:
    """Why the published output NAME is not what the manifest recorded ('tampered': changed), or None. Sizes always; VERIFY: every byte (status), not only when a consumer reads it."""
    if not folder.exists(name):
        return None  # gone, not changed: stale (checked by the caller after config and inputs)
    size = folder.size(name)
    manifest_uri = folder.uri_of(MANIFEST)
    if size != info.bytes:
        return StepStatus("", "tampered", tampered_message(folder.uri_of(name), manifest_uri, info.sha256, "",
                                                           size, info.bytes), None)
    if verify:
        try:
            digest = file_digest(folder, name)  # through the root's Integrity: raises Tampered at the end
        except Tampered as e:
            return StepStatus("", "tampered", str(e), None)
        if digest != info.sha256:
            return StepStatus("", "tampered", tampered_message(folder.uri_of(name), manifest_uri, info.sha256,
                                                               digest, size, info.bytes), None)
    return None


def _check(root: Store, step: Step, config: BaseModel, folder: Store | None = None, *,
           verify: bool = False) -> tuple[StepStatus, dict[str, str] | None]:
    """(status of STEP in ROOT against CONFIG, the current input digests if they could be taken)."""
    folder = folder if folder is not None else root.child(step.name)
    try:
        manifest = read_manifest(folder)
    except StorageError as e:
        manifest, unreadable = None, str(e)
    else:
        unreadable = None
    try:
        inputs: dict[str, str] | None = current_inputs(root, step, config)
        input_problem = None
    except UserError as e:
        inputs, input_problem = None, str(e)
    if manifest is None:
        if unreadable:
            return StepStatus(step.name, "stale", f"manifest unreadable: {unreadable}", None), inputs
        reason = "started but not finished (no manifest)" if folder.list() else "not run"
        return StepStatus(step.name, "missing", reason, None), inputs
    # Tampering first: a changed published file matters whatever else changed (config, inputs).
    for name, info in manifest.outputs.items():
        problem = _output_problem(folder, name, info, verify=verify)
        if problem is not None and problem.state == "tampered":
            return StepStatus(step.name, "tampered", problem.reason, manifest), inputs
    if not manifest.complete:
        return StepStatus(step.name, "stale", f"incomplete: {manifest.incomplete_reason}", manifest), inputs
    if manifest.config_digest != config_digest(config):
        return StepStatus(step.name, "stale", "config changed", manifest), inputs
    if inputs is None:
        return StepStatus(step.name, "stale", f"inputs unavailable: {input_problem}", manifest), inputs
    if inputs != manifest.inputs:
        return StepStatus(step.name, "stale", f"inputs changed: {_changed(manifest.inputs, inputs)}", manifest), inputs
    for name in manifest.outputs:
        if not folder.exists(name):
            return StepStatus(step.name, "stale", f"output missing: {name}", manifest), inputs
    return StepStatus(step.name, "done", "up to date", manifest), inputs


def step_status(root: Store, step: Step, config: BaseModel | None = None, *, verify: bool = True) -> StepStatus:
    """Whether STEP is done in ROOT for CONFIG (default: the step's defaults, as `m3tune run` would use).

    VERIFY reads every published output once to find same-size edits ('tampered'); without it only sizes
    are compared (as a skip decision does: consumers verify what they read)."""
    return _check(verified(root), step, config if config is not None else step.config(), verify=verify)[0]


def _remove_unpublished(folder: Store, published, name: str) -> None:
    """Files an earlier run published that this one did not (a rejects file from a run with
    --skip-invalid, say) would sit beside the new outputs as if current: remove them.
    Sub-folders (a step's journal, its shards) are its own."""
    for old in folder.list():
        if "/" not in old and old != MANIFEST and old not in published:
            folder.delete(old)
            log.info("%s: removed %s, left by an earlier run and not produced by this one", name, old)


def run_step(root: Store, name: str, config: BaseModel | None = None, *, force: bool = False,
             shard: tuple[int, int] | None = None) -> tuple[Manifest, bool]:
    """Run step NAME in ROOT unless it is done; return (manifest, ran).

    SHARD (rank, world size) runs one block of a shardable step into its own
    folder ROOT/NAME/shards/R-of-N, with its own manifest; `merge_shards`
    then publishes the step's outputs from all of them.
    """
    step = get_step(name)
    config = config if config is not None else step.config()
    if not isinstance(config, step.config):
        raise TypeError(f"step {name!r} takes a {step.config.__name__}, got {type(config).__name__}")
    rank, world_size = shard or (0, 1)
    if shard is not None:
        if not step.shardable:
            raise ConfigError(f"step {name!r} cannot be sharded")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in 0..{world_size - 1}")
    root = verified(root)  # every read the step makes of a published file is verified
    folder = shard_folder(root, name, rank, world_size) if shard else root.child(name)
    status, inputs = _check(root, step, config, folder)
    if status.state == "done" and not force:
        log.info("%s: done, skipped (%s)", name, folder.uri_of(MANIFEST))
        assert status.manifest is not None
        return status.manifest, False
    if status.state == "tampered" and not force:
        raise Tampered(f"{name}: {status.reason}")
    if inputs is None:  # fail early, before any write: an upstream step or an input is missing
        inputs = current_inputs(root, step, config)

    # The old manifest goes before the first change to the step's folder: a rerun that dies half-way must
    # not leave a manifest vouching for outputs it did not write, and one that fails before writing
    # anything (a mistyped --model) must not unpublish a good result. This assumes one writer per step
    # folder at a time (sharded steps write per-rank names).
    plain = folder.with_integrity(None)
    if status.reason.startswith("manifest unreadable"):
        plain.delete(MANIFEST)  # it vouches for nothing
    root._integrity.guard(folder._rel, lambda: plain.delete(MANIFEST))  # type: ignore[union-attr]
    cleaned = folder.clean_temporaries()
    if cleaned:
        log.info("%s: removed %d temporary file(s) left by an interrupted run", name, cleaned)
    why = "forced" if status.state == "done" else status.reason
    log.info("%s: running (%s) -> %s", name, why, folder.uri)

    ctx = StepContext(root=root, name=name, needs=step.upstream(config), rank=rank, world_size=world_size,
                      folder=folder if shard else None)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    result = step.func(ctx, **config.model_dump()) or {}
    seconds = time.perf_counter() - t0
    _remove_unpublished(folder, ctx.outputs, name)
    manifest = Manifest(
        step=name,
        m3tune_version=__version__,
        config=config.model_dump(mode="json"),
        config_digest=config_digest(config),
        inputs=inputs,
        outputs={k: OutputInfo(sha256=v.sha256, bytes=v.bytes, rows=getattr(v, "rows", None))
                 for k, v in ctx.outputs.items()},
        counts=result.get("counts", {}),
        metrics=result.get("metrics", {}),
        started_at=started.isoformat(timespec="seconds"),
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=round(seconds, 3),
        complete=not result.get("incomplete"),
        incomplete_reason=result.get("incomplete"),
    )
    write_manifest(folder, manifest)
    log.info("%s: finished in %.1fs -> %s", name, seconds, folder.uri_of(MANIFEST))
    if not manifest.complete:
        log.warning("%s: incomplete (%s); its outputs are published, and a rerun does the rest", name,
                    manifest.incomplete_reason)
    return manifest, True


def _sum_counts(parts: list[Any]) -> Any:
    """Shard counts added up: numbers summed, dicts merged key by key, anything else from the first shard."""
    first = parts[0]
    if isinstance(first, bool) or not isinstance(first, (int, float, dict)):
        return first
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for p in parts if isinstance(p, dict) for k in p))
        return {k: _sum_counts([p[k] for p in parts if isinstance(p, dict) and k in p]) for k in keys}
    return sum(p for p in parts if isinstance(p, (int, float)) and not isinstance(p, bool))


def merge_shards(root: Store, name: str, config: BaseModel | None = None, *, world_size: int,
                 force: bool = False) -> tuple[Manifest, bool]:
    """Publish step NAME's outputs from its WORLD_SIZE finished shards: JSONL outputs concatenated in rank order."""
    if world_size < 1:  # zero shards would withdraw the manifest and then have nothing to publish
        raise ConfigError(f"{name}: merge of {world_size} shards: the number of shards is 1 or more")
    step = get_step(name)
    config = config if config is not None else step.config()
    root = verified(root)  # the shards' outputs are read against the shards' manifests
    inputs = current_inputs(root, step, config)
    digest = config_digest(config)
    manifests = [read_manifest(shard_folder(root, name, r, world_size)) for r in range(world_size)]
    unfinished = [r for r, m in enumerate(manifests)
                  if m is None or not m.complete or m.config_digest != digest or m.inputs != inputs]
    if unfinished:
        raise MissingInput(f"{name}: shard(s) {', '.join(map(str, unfinished))} of {world_size} not finished with "
                           f"this config and these inputs; run them first (--rank R --world-size {world_size})")
    status, _ = _check(root, step, config)
    if status.state == "done" and not force and status.manifest.counts.get("shards") == world_size:
        log.info("%s: merged already, skipped", name)
        return status.manifest, False
    folder = root.child(name)
    folder.delete(MANIFEST)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    outputs = {}
    for out in manifests[0].outputs:
        with folder.open_write(out) as w:
            for r in range(world_size):
                with shard_folder(root, name, r, world_size).open_read(out) as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        w.write(chunk)
        outputs[out] = OutputInfo(sha256=w.result.sha256, bytes=w.result.bytes,
                                  rows=sum(m.outputs[out].rows or 0 for m in manifests)
                                  if manifests[0].outputs[out].rows is not None else None)
    _remove_unpublished(folder, outputs, name)
    manifest = Manifest(step=name, m3tune_version=__version__, config=config.model_dump(mode="json"),
                        config_digest=digest, inputs=inputs, outputs=outputs,
                        counts={**_sum_counts([m.counts for m in manifests]), "shards": world_size},
                        metrics=_sum_counts([m.metrics for m in manifests]) if manifests[0].metrics else {},
                        started_at=started.isoformat(timespec="seconds"),
                        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        seconds=round(time.perf_counter() - t0, 3))
    write_manifest(folder, manifest)
    log.info("%s: merged %d shards -> %s", name, world_size, folder.uri_of(MANIFEST))
    return manifest, True


def run_pipeline(root: Store, configs: dict[str, BaseModel], *, force: set[str] = frozenset(),
                 until: str | None = None,
                 guard: Callable[[str], AbstractContextManager] | None = None) -> list[tuple[str, bool]]:
    """Run the pipeline's steps in order, resuming: finished steps are skipped. GUARD(NAME) is held around
    each step (`m3tune run`: the step's lock, runlock.RunHold.step), the skip decision included."""
    if until is not None and until not in PIPELINE:
        raise ConfigError(f"--until {until!r} is not a pipeline step; steps: {', '.join(PIPELINE)}")
    ran: list[tuple[str, bool]] = []
    for name in PIPELINE:
        with guard(name) if guard is not None else nullcontext():
            _, did_run = run_step(root, name, configs.get(name), force=name in force)
        ran.append((name, did_run))
        if name == until:
            break
    return ran


def pipeline_status(root: Store, configs: dict[str, BaseModel] | None = None, *,
                    verify: bool = True) -> list[StepStatus]:
    """Status of the pipeline's steps against CONFIGS (else defaults), as `m3tune run` would see them,
    and of any other step that has run in ROOT (against the config it recorded). VERIFY: hash every
    published file (see step_status)."""
    statuses = []
    for name in PIPELINE + [n for n in STEPS if n not in PIPELINE]:
        step = STEPS[name]
        config = (configs or {}).get(name)
        if name not in PIPELINE:
            if not root.child(name).list():
                continue
            if config is None:
                try:
                    recorded = read_manifest(root.child(name))
                    config = step.config.model_validate(recorded.config) if recorded else None
                except (StorageError, ValueError):
                    config = None
        statuses.append(step_status(root, step, config, verify=verify))
    return statuses
