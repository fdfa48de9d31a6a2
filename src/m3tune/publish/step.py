"""The `publish` step: the fine-tuned model's collection behind the production alias, with zero downtime.

In order, and nothing in production changes before the switch:

1. read evaluate's results (the model's metrics, per query, the gold set's digest) and load the model
   as evaluate did (its recorded options);
2. check production: the alias's collection must hold vectors of the served size; rank the gold
   queries exactly with the model (evaluate's own code), which must give evaluate's metrics (else
   the model is not the one evaluated);
3. the gate (`gate.py`): against the published model on the held-out queries; `force_gate` overrides;
4. upload the corpus, encoded by the model at the served dim, into a collection named after the
   alias, the model's fingerprint, the corpus's digest and the dim, with the production payloads;
   a rerun finds the points already there and sends only the rest (`upload.py`);
5. verify it (`verify.py`), write m3tune's record into its metadata, and move the alias to it in one
   atomic call; then delete what m3tune published for the alias beyond `keep` earlier collections.

Dense only, at one Matryoshka dim: the sparse and multi-vector heads will follow with issue [6/7].
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from m3tune.context import StepContext
from m3tune.errors import BadInput, UserError
from m3tune.evaluation.metrics import TESTED
from m3tune.redact import key_env_validator

PUBLISHED = "publish.json"


class PublishConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alias: str = Field(default="m3tune", description="the production alias the search application queries "
                       "(e.g. quran-hadith); created when absent")
    model: str = Field(default="run:train", description="the model to publish: a name or spec among "
                       "evaluate's models (run:train: this run's fine-tuned model)")
    dim: int | None = Field(default=None, ge=1, description="dense dimensions served: the model's full size "
                            "(none) or a Matryoshka dim evaluate measured")
    qdrant_url: str | None = Field(default=None, description="production Qdrant server URL (none: the variable "
                                   "named by qdrant_url_env; neither: local mode in qdrant_path)")
    qdrant_url_env: str = Field(default="QDRANT_URL", description="variable holding the Qdrant URL (on "
                                "Kubernetes, from the Qdrant Secret)")
    qdrant_path: str | None = Field(default=None, description="local-mode Qdrant folder when no URL is given "
                                    "(default: the m3tune cache's qdrant/production)")
    qdrant_api_key_env: str = Field(default="QDRANT_API_KEY", description="variable holding the Qdrant API key, if any")
    _key_variable = key_env_validator("qdrant_api_key_env")
    payload_key: str = Field(default="passage_id", description="the payload field holding the passage id (the "
                             "production collection's payloads are matched to passages by it)")
    batch_size: int = Field(default=256, ge=1, description="points per upload request")
    parallel: int = Field(default=4, ge=1, description="upload requests in flight at once (a server; local "
                          "mode uploads in one thread)")
    max_retries: int = Field(default=5, ge=0, description="retries of an upload request on 5xx or timeout")
    retry_backoff: float = Field(default=1.0, ge=0, description="seconds before the first retry, doubled each time")
    timeout: float = Field(default=60.0, gt=0, description="seconds per Qdrant request")
    keep: int = Field(default=1, ge=0, description="earlier collections published for the alias kept for "
                      "rollback; older ones m3tune published are deleted (never any other)")
    gate_metric: Literal[TESTED] = Field(default="ndcg@10", description="the gate's metric (evaluate's "  # type: ignore[valid-type]
                                         "headline: ndcg@10)")
    gate_min_delta: float = Field(default=0.0, description="the new model must beat the published one by more "
                                  "than this on the held-out queries")
    gate_max_p: float = Field(default=0.05, ge=0, le=1, description="and with a paired test's p-value at most this")
    current_model: str | None = Field(default=None, description="the evaluate model production serves when its "
                                      "collection carries no m3tune record (default: evaluate's baseline)")
    force_gate: bool = Field(default=False, description="publish even if the gate fails (recorded in the "
                             "collection and the manifest)")
    verify_sample: int = Field(default=16, ge=1, description="points whose vectors are re-encoded and compared")
    verify_tolerance: float = Field(default=0.01, ge=0, description="how far the collection's gold metrics may "
                                    "be from evaluate's")


def publish_needs(config: PublishConfig) -> tuple[str, ...]:
    """ingest, evaluate, and the step whose model it publishes (run:train -> train)."""
    return ("ingest", "evaluate") + ((config.model[4:],) if config.model.startswith("run:") else ())


def open_production(url: str | None, url_env: str, path: str | None, key_env: str, timeout: float):
    from m3tune.encoder.tiny import cache_dir
    from m3tune.publish.production import Production

    url = url or os.environ.get(url_env) or None
    if not url and not path and os.environ.get("KUBERNETES_SERVICE_HOST"):
        # in a pod, the default local folder is its scratch disk: a publish there would reach no one
        raise UserError(f"no Qdrant URL: set qdrant_url or {url_env} (on Kubernetes, the Qdrant Secret's "
                        "QDRANT_URL); local mode in a pod would publish into its scratch disk")
    path = None if url else (path or str(cache_dir() / "qdrant" / "production"))
    return Production(url=url, path=path, api_key=os.environ.get(key_env) or None, timeout=timeout)


def _evaluated(root, model: str) -> tuple[Any, dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(evaluate's config, the model's entry in results.json, results.json, its per_query rows) or a clear error.
    A run:STEP model must be the one evaluate measured: STEP's outputs as evaluate's manifest recorded them."""
    from m3tune.evaluation.step import EvaluateConfig
    from m3tune.manifest import published, read_manifest

    manifest = published(root, "evaluate", what="publish needs the evaluate step's results")
    folder = root.child("evaluate")
    for name in ("results.json", "per_query.jsonl"):
        if name not in manifest.outputs:
            raise UserError(f"publish: evaluate's manifest in {root.uri} records no {name}: rerun evaluate")
    results = json.loads(folder.read_bytes("results.json"))
    entries = [m for m in results.get("models", []) if model in (m.get("name"), m.get("spec"))]
    if not entries:
        raise UserError(f"publish: evaluate's results have no model {model!r} (models: "
                        f"{', '.join(m.get('name', '?') for m in results.get('models', []))}): evaluate it first")
    entry = entries[0]
    step = str(entry.get("target", ""))[4:] if str(entry.get("target", "")).startswith("run:") else None
    if step:
        now = read_manifest(root.child(step))
        recorded = {k[len(step) + 1:]: v for k, v in manifest.inputs.items() if k.startswith(step + "/")}
        current = {k: "sha256:" + v.sha256 for k, v in (now.outputs.items() if now else ())}
        if recorded != current:
            raise UserError(f"publish: {step} changed since evaluate measured {model!r} (its model is not the one "
                            "evaluated): rerun evaluate")
    if entry.get("kind") not in ("dense", "fusion"):
        raise UserError(f"publish: model {model!r} is {entry.get('kind')}: publish serves a dense encoder or a "
                        "fusion: system evaluate measured")
    rows = [json.loads(line) for line in folder.read_bytes("per_query.jsonl").splitlines() if line.strip()]
    return EvaluateConfig.model_validate(manifest.config), entry, results, rows


def _values(rows: list[dict[str, Any]], name: str, ids: set[str]) -> dict[str, dict[str, float]]:
    return {r["query_id"]: {m: float(r[m]) for m in TESTED} for r in rows if r["model"] == name and r["query_id"] in ids}


def _model_digest(root, target: str) -> str | None:
    """sha256 over the model folder's files as the step's manifest records them (run:STEP models)."""
    from m3tune.manifest import read_manifest

    if not target.startswith("run:"):
        return None
    manifest = read_manifest(root.child(target[4:]))
    files = sorted((k, v.sha256) for k, v in (manifest.outputs.items() if manifest else ()) if k.startswith("model/"))
    return "sha256:" + hashlib.sha256(json.dumps(files).encode()).hexdigest() if files else None


def publish(ctx: StepContext, *, alias: str, model: str, dim: int | None, qdrant_url: str | None,
            qdrant_url_env: str, qdrant_path: str | None, qdrant_api_key_env: str, payload_key: str,
            batch_size: int, parallel: int, max_retries: int, retry_backoff: float, timeout: float, keep: int,
            gate_metric: str, gate_min_delta: float, gate_max_p: float, current_model: str | None,
            force_gate: bool, verify_sample: int, verify_tolerance: float) -> dict[str, Any]:
    import numpy as np

    from m3tune.encoder.cache import EmbeddingCache
    from m3tune.evaluation import metrics
    from m3tune.evaluation.models import _truncate, dense_rank, load_dense, parse_model
    from m3tune.evaluation.step import options_of
    from m3tune.index.step import cache_store
    from m3tune.manifest import read_manifest
    from m3tune.publish import gate, payloads, upload, verify
    from m3tune.publish.production import check_alias

    check_alias(alias)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    # 1. what evaluate measured, and the model as evaluate loaded it
    ev_config, entry, results, rows = _evaluated(ctx.root, model)
    if entry["kind"] == "fusion":
        from m3tune.publish.fused import publish_fused

        return publish_fused(ctx, ev_config, entry, results, rows, alias=alias, dim=dim, started=started,
                             production=(qdrant_url, qdrant_url_env, qdrant_path, qdrant_api_key_env, timeout),
                             payload_key=payload_key, batch_size=batch_size, parallel=parallel,
                             max_retries=max_retries, retry_backoff=retry_backoff, keep=keep, gate_metric=gate_metric,
                             gate_min_delta=gate_min_delta, gate_max_p=gate_max_p, current_model=current_model,
                             force_gate=force_gate, verify_tolerance=verify_tolerance)
    passages, gold = corpus_and_gold(ctx, ev_config, results)
    spec = parse_model(entry["spec"], ev_config.base_model)
    options = options_of(ev_config.model_dump())
    encoder = load_dense(spec, ctx.root, options)
    full = encoder.dim
    dim = dim or full
    if dim > full:
        raise UserError(f"publish: model {model!r} makes {full}-d vectors; dim {dim} is larger")
    expected = entry["overall"] if dim == full else (entry.get("dims") or {}).get(str(dim))
    if expected is None:
        raise UserError(f"publish: evaluate did not measure {model!r} at dim {dim} (dims: "
                        f"{', '.join(sorted(entry.get('dims') or {}, key=int, reverse=True)) or 'none'}): add it to "
                        "evaluate's dims, so the gate and the verification have its metrics")
    corpus_sha = read_manifest(ctx.root.child("ingest")).outputs["passages.jsonl"].sha256
    target = f"{alias}-{encoder.fingerprint[:12]}-{corpus_sha[:12]}-d{dim}"

    # 2. production as it is; the model's gold metrics at DIM (evaluate's ranking code) against evaluate's
    prod = open_production(qdrant_url, qdrant_url_env, qdrant_path, qdrant_api_key_env, timeout)
    try:
        if prod.is_collection(alias):
            raise UserError(f"{alias!r} at {prod.where} is a collection, not an alias: the switch must be one "
                            f"atomic alias change; create an alias over it first (e.g. {alias}-v1 renamed, alias "
                            f"{alias} -> it) and point the application at the alias")
        current = prod.alias_target(alias)
        current_record = None
        if current is not None:
            size = prod.vector_size(current)
            if size != dim:
                raise UserError(f"alias {alias!r} points to {current!r}, of {size}-d vectors; this publish serves "
                                f"{dim}-d ones: the application's queries would not fit. Publish at dim {size} "
                                "or move the application first; nothing changed")
            current_record = prod.record(current)
        ranked = dense_rank(encoder, gold, passages, k=results["k"], dims=[dim] if dim < full else [],
                            cache_uri=options.embeddings_cache)
        mine = metrics.per_query(gold, ranked.runs[dim if dim < full else None])
        verify.check_metrics(metrics.mean(mine), expected, tolerance=verify_tolerance,
                             what=f"{model!r} ranking the gold queries now")

        # 3. the gate
        held = {g.id for g in gold if g.held_out}
        if not held:
            raise BadInput("publish: the gold set has no held-out query (held_out: true): the gate measures on them")
        if current == target and current_record is not None and current_record.get("gate"):
            verdict = current_record["gate"]  # a rerun after the switch: this model is the published one
        else:
            verdict = _gate(current, current_record, rows, results, mine, held, model=entry["name"],
                            current_model=current_model, metric=gate_metric, min_delta=gate_min_delta,
                            max_p=gate_max_p, resamples=ev_config.significance_resamples)
        if not verdict["passed"]:
            if not force_gate:
                raise gate.GateFailed(gate.explain(verdict) + ". Nothing in production changed "
                                      "(--force-gate publishes anyway, and is recorded)")
            ctx.log.warning("%s: published anyway (--force-gate)", gate.explain(verdict))

        # 4. the new collection: created or resumed, then the points it lacks
        identity = {"run_id": ctx.root.uri.rstrip("/").rsplit("/", 1)[-1], "root": ctx.root.uri,
                    "model": {"spec": entry["spec"], "name": entry["name"], "fingerprint": encoder.fingerprint,
                              "sha256": _model_digest(ctx.root, spec.target)},
                    "corpus_sha256": corpus_sha, "dim": dim}
        record = {"alias": alias, "state": "uploading", **identity, "created_at": started, "previous": current,
                  "forced": bool(force_gate and not verdict["passed"]), "gate": verdict,
                  "metrics": {k: round(v, 6) for k, v in metrics.mean(mine).items() if k in metrics.HEADLINE},
                  "gate_values": {"test_set_sha256": results["test_set"]["sha256"], "dim": dim,
                                  "per_query": {q: {m: round(v, 6) for m, v in mine[q].items() if m in TESTED}
                                                for q in sorted(held)}}}
        if prod.is_collection(target):
            existing = prod.record(target)
            if existing is None or existing.get("alias") != alias:
                raise UserError(f"Qdrant collection {target!r} exists at {prod.where} and m3tune did not publish it "
                                f"for {alias!r}: refusing to write into it; nothing changed")
            size = prod.vector_size(target)
            if size != dim:
                raise UserError(f"Qdrant collection {target!r} holds {size}-d vectors; model {model!r} at dim "
                                f"{dim} makes {dim}-d ones: delete it or publish at dim {size}; nothing changed")
            record = {**record, "created_at": existing.get("created_at", started),
                      "published_at": existing.get("published_at"),
                      "previous": existing.get("previous") if current == target else current}
        copied = payloads.production_payloads(prod, current, payload_key, {p.id for p in passages}) \
            if current is not None else {}
        vectors = EmbeddingCache(cache_store(options.embeddings_cache), encoder.fingerprint).encode(
            encoder, [p.text for p in passages], desc="encode passages")
        vectors = np.ascontiguousarray(_truncate(vectors, dim) if dim < full else vectors, dtype=np.float32)
        if not prod.is_collection(target):
            prod.create(target, size=dim, record=record)
        there = upload.present_ids(prod, target)
        stray = sorted(i for i in there if not 0 <= i < len(passages))
        if stray:
            raise UserError(f"Qdrant collection {target!r} holds point ids outside the corpus's 0..{len(passages) - 1} "
                            f"({stray[:3]}): not this corpus's; delete it and rerun")
        missing = [i for i in range(len(passages)) if i not in there]
        if there:
            ctx.log.info("%s: %s of %s points already there (an earlier run); uploading the other %s", target,
                         f"{len(there):,}", f"{len(passages):,}", f"{len(missing):,}")
        sent = upload.upload(prod, target, vectors, payloads.payloads(passages, copied, payload_key), missing,
                             batch_size=batch_size, parallel=parallel, max_retries=max_retries, backoff=retry_backoff)

        # 5. verify, record, switch, clean up
        verify.check_count(prod, target, len(passages))
        rows_ = sorted({int(i) for i in np.linspace(0, len(passages) - 1, num=min(verify_sample, len(passages)))})
        fresh = encoder.encode([passages[i].text for i in rows_], desc="re-encode a sample")
        fresh = _truncate(fresh, dim) if dim < full else fresh
        sample = verify.check_sample(prod, target, passages, fresh, rows_, key=payload_key)
        qvecs = EmbeddingCache(cache_store(options.embeddings_cache), encoder.fingerprint).encode(
            encoder, [g.query for g in gold], queries=True, desc="encode queries")
        qvecs = _truncate(qvecs, dim) if dim < full else qvecs
        found = metrics.per_query(gold, verify.search(prod, target, [g.id for g in gold], qvecs, k=results["k"],
                                                       key=payload_key))
        checked = verify.check_metrics(metrics.mean(found), expected, tolerance=verify_tolerance,
                                       what=f"collection {target!r}")
        previous = record["previous"]
        record, switch_seconds, deleted = go_live(ctx, prod, record, alias=alias, target=target, current=current,
                                                  keep=keep, verification={"points": len(passages), **sample,
                                                                           "metrics": checked})
    finally:
        prod.close()

    return finish(ctx, record, target=target, where=prod.where, sent=sent, there=len(there), missing=len(missing),
                  switch_seconds=switch_seconds, deleted=deleted, points=len(passages), dim=dim, previous=previous,
                  fingerprint=encoder.fingerprint, checked=checked, verdict=verdict, gate_metric=gate_metric)


def corpus_and_gold(ctx, ev_config, results: dict[str, Any]) -> tuple[list, list]:
    """The corpus to publish and the gold its collection is verified on: the gold evaluate measured, unchanged."""
    from m3tune.corpus import heldout
    from m3tune.corpus.passages import read_passages
    from m3tune.evaluation.gold import gold_digest, load_gold

    passages = read_passages(ctx.root)
    if not passages:
        raise UserError("the corpus is empty: nothing to publish")
    if gold_digest(ev_config.test_set) != results["test_set"]["sha256"]:
        raise UserError(f"publish: the gold set {results['test_set']['path']} changed since evaluate measured it: "
                        "rerun evaluate")
    gold = load_gold(ev_config.test_set, {p.id for p in passages},
                     held_out=heldout.load(ev_config.held_out) if ev_config.held_out is not None else None)
    return passages, gold


def go_live(ctx, prod, record: dict[str, Any], *, alias: str, target: str, current: str | None, keep: int,
            verification: dict[str, Any]) -> tuple[dict[str, Any], float, list[str]]:
    """A verified collection goes live: its record says ready (with what was verified), the alias moves to it
    (unless it is already there), and collections older than the KEEP newest are deleted."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = {**record, "state": "ready", "published_at": record.get("published_at") or now,
              "verification": verification}
    prod.set_record(target, record)
    switch_seconds = prod.switch(alias, target, expected=current) if current != target else 0.0
    ctx.log.info("alias %s: %s -> %s (%.3fs)", alias, current, target, switch_seconds)
    return record, switch_seconds, prod.delete_old(alias, keep=keep, current=target)


def finish(ctx, record: dict[str, Any], *, target: str, where: str, sent: dict[str, Any], there: int, missing: int,
           switch_seconds: float, deleted: list[str], points: int, dim: int, previous: str | None, fingerprint: str,
           checked: dict[str, Any], verdict: dict[str, Any], gate_metric: str) -> dict[str, Any]:
    """Write publish.json (the record without its per-query gate values, and what the upload did); the
    manifest's counts and metrics."""
    out = {**{k: v for k, v in record.items() if k != "gate_values"}, "collection": target, "where": where,
           "upload": {**sent, "already_there": there}, "switch_seconds": round(switch_seconds, 6),
           "deleted": deleted}
    ctx.write_bytes(PUBLISHED, json.dumps(out, ensure_ascii=False, indent=2).encode() + b"\n")
    return {"counts": {"points": points, "uploaded": missing, "already_there": there,
                       "deleted": len(deleted), "dim": dim,
                       "published": {"alias": record["alias"], "collection": target, "previous": previous or "none",
                                     "forced": record["forced"], "run_id": record["run_id"],
                                     "model_fingerprint": fingerprint}},
            "metrics": {**{f"collection/{k}": v["found"] for k, v in checked.items()},
                        f"gate/{gate_metric}/delta": round(verdict["delta"], 6),
                        f"gate/{gate_metric}/p_value": round(verdict["p_value"], 6),
                        "upload/points_per_second": sent["points_per_second"],
                        "switch_seconds": round(switch_seconds, 6)}}


def _gate(current: str | None, current_record: dict[str, Any] | None, rows: list[dict[str, Any]],
          results: dict[str, Any], mine, held: set[str], *, model: str, current_model: str | None, metric: str,
          min_delta: float, max_p: float, resamples: int) -> dict[str, Any]:
    """The gate's verdict for MINE (the new model's per-query values) against what production serves."""
    from m3tune.publish.gate import judge

    new = {q: mine[q] for q in held}
    if current_record is not None:
        values = current_record.get("gate_values") or {}
        if values.get("test_set_sha256") != results["test_set"]["sha256"]:
            raise BadInput(f"gate: the published {current!r} was measured on another gold set "
                           f"(sha256 {str(values.get('test_set_sha256'))[:12]}, this evaluate's "
                           f"{results['test_set']['sha256'][:12]}): the paired test needs the same queries "
                           "(--force-gate publishes anyway, recorded)")
        theirs = {q: {m: float(v) for m, v in d.items()} for q, d in (values.get("per_query") or {}).items()}
        name = f"{current} ({current_record.get('model', {}).get('name')} of run {current_record.get('run_id')})"
    else:
        name = current_model or results["baseline"]
        if name == model:
            raise BadInput(f"gate: {model!r} is evaluate's baseline: it must be compared with what production "
                           "serves; name that model with current_model")
        if name not in {m["name"] for m in results["models"]}:
            raise BadInput(f"gate: current_model {name!r} is not among evaluate's models")
        theirs = _values(rows, name, held)
        name = f"{name} (evaluate's{' baseline' if current_model is None else ''} model, serving "\
               f"{current or 'nothing yet'})"
    return judge(new, theirs, new_name=model, current_name=name, metric=metric, min_delta=min_delta,
                 max_p=max_p, resamples=resamples)


def show_published(root) -> Any:
    """What `m3tune step publish` prints: alias, collection, previous, gate."""
    from rich.table import Table

    from rich.markup import escape

    rec = json.loads(root.child("publish").read_bytes(PUBLISHED))
    table = Table(title="published", title_justify="left", show_header=False)
    gate_ = rec["gate"]
    for key, value in (("alias", rec["alias"]), ("collection", rec["collection"]), ("previous", rec["previous"]),
                       ("model", f"{rec['model']['name']} ({rec['model']['fingerprint']}) at {rec['dim']} dims"),
                       ("gate", f"{gate_['metric']} {gate_['new']:.4f} vs {gate_['current']:.4f} (Δ {gate_['delta']:+.4f},"
                                f" p {gate_['p_value']:.3g}){' FORCED' if rec['forced'] else ''}"),
                       ("upload", f"{rec['upload']['points']:,} points sent, {rec['upload']['already_there']:,} "
                                  f"already there, {rec['upload']['points_per_second']:,} points/s"),
                       ("switch", f"{rec['switch_seconds'] * 1000:.1f} ms"), ("deleted", ", ".join(rec["deleted"]) or "none")):
        table.add_row(key, escape(str(value)))  # names and URLs are text, not markup
    return table
