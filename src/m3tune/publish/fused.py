"""Publishing a fused system (an evaluate `fusion:` model): the collection holds everything its recipe reads
(m3tune.publish.served), the recipe rides in the collection's record, and the alias moves only after the
gold queries, searched through the collection as `m3tune search` runs them, give evaluate's figures.

The same order as the dense publish (publish/step.py): what evaluate measured; production as it is; the gate
(on evaluate's per-query values of the fused system: the verification below proves the collection serves
them); the new collection, created or resumed; verification; the record; the switch; cleanup.
"""

from __future__ import annotations

from typing import Any

from m3tune.errors import BadInput, ConfigError, UserError


def members_of(entry: dict[str, Any], results: dict[str, Any]) -> list[dict[str, Any]]:
    """The results entries of the fusion ENTRY's members, in the recipe's order."""
    by_name = {m["name"]: m for m in results["models"]}
    names = entry["recipe"]["members"]
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UserError(f"publish: evaluate's results lack the fusion member {missing[0]!r}: rerun evaluate")
    return [by_name[n] for n in names]


def encoder_target(members: list[dict[str, Any]]) -> str | None:
    """The one model whose vectors the dense members read (None: BM25 alone)."""
    from m3tune.evaluation.models import DENSE_KINDS

    targets = {m["target"] for m in members if m["kind"] in DENSE_KINDS}
    if len(targets) > 1:
        raise ConfigError(f"publish: the fusion's dense members use {len(targets)} models ({', '.join(sorted(targets))}): "
                          "a collection serves one encoder's vectors")
    return next(iter(targets), None)


def named_vectors_config(vectors: tuple[str, ...], size: int):
    from qdrant_client import models

    from m3tune.publish.served import BM25_AR, BM25_EN

    dense = {v: models.VectorParams(size=size, distance=models.Distance.DOT) for v in vectors
             if v not in (BM25_AR, BM25_EN)}
    sparse = {v: models.SparseVectorParams(modifier=models.Modifier.IDF) for v in vectors if v in (BM25_AR, BM25_EN)}
    return dense, sparse


def shape_of(prod, name: str) -> dict[str, Any]:
    """NAME's vectors as {name: size or 'sparse'} ('' for one unnamed dense vector)."""
    params = prod.call(f"get_collection {name!r}", prod.client.get_collection, name).config.params
    vectors = params.vectors
    shape: dict[str, Any] = ({k: int(v.size) for k, v in vectors.items()} if isinstance(vectors, dict)
                             else {"": int(vectors.size)} if vectors is not None else {})
    shape.update({k: "sparse" for k in (params.sparse_vectors or {})})
    return shape


def publish_fused(ctx, ev_config, entry: dict[str, Any], results: dict[str, Any], rows: list[dict[str, Any]], *,
                  alias: str, dim: int | None, started: str, production: tuple, payload_key: str, batch_size: int,
                  parallel: int, max_retries: int, retry_backoff: float, keep: int, gate_metric: str,
                  gate_min_delta: float, gate_max_p: float, current_model: str | None, force_gate: bool,
                  verify_tolerance: float) -> dict[str, Any]:
    import numpy as np
    from qdrant_client import models

    from m3tune.encoder.cache import EmbeddingCache
    from m3tune.evaluation import bm25 as lexical
    from m3tune.evaluation import metrics
    from m3tune.evaluation.fusion import Recipe
    from m3tune.evaluation.models import VIEWS, extra_views, load_dense, parse_model
    from m3tune.evaluation.step import options_of
    from m3tune.index.step import cache_store
    from m3tune.manifest import read_manifest
    from m3tune.evaluation.metrics import TESTED
    from m3tune.publish import payloads, served, upload, verify
    from m3tune.publish.step import _gate, _model_digest, corpus_and_gold, finish, go_live, open_production

    recipe = Recipe.from_json(entry["recipe"], where=f"evaluate's recipe of {entry['name']!r}")
    members = members_of(entry, results)
    bm25_members = [m for m in members if m["kind"] == "bm25"]
    if any(m["target"] != "arabic" for m in bm25_members):
        raise ConfigError("publish: a fused system serves the strong BM25 (bm25), not bm25-plain")
    vectors = served.vectors_of(recipe.kinds)
    passages, gold = corpus_and_gold(ctx, ev_config, results)
    options = options_of(ev_config.model_dump())
    target_model = encoder_target(members)
    encoder = None
    if target_model is not None:
        spec = next(parse_model(m["spec"], ev_config.base_model) for m in members if m["target"] == target_model)
        encoder = load_dense(spec, ctx.root, options)
        if dim not in (None, encoder.dim):
            raise UserError(f"publish: evaluate fused {entry['name']!r} at the encoder's {encoder.dim} dims; it is "
                            f"served at those, not at dim {dim}")
        dim = encoder.dim
    dim = dim or 0
    corpus_sha = read_manifest(ctx.root.child("ingest")).outputs["passages.jsonl"].sha256
    fingerprint = encoder.fingerprint if encoder is not None else "bm25"
    target = f"{alias}-fused-{fingerprint[:12]}-{corpus_sha[:12]}"
    expected = entry["overall"]
    size = dim or 1
    shape = {v: ("sparse" if v in (served.BM25_AR, served.BM25_EN) else size) for v in vectors}

    prod = open_production(*production)
    try:
        if prod.is_collection(alias):
            raise UserError(f"{alias!r} at {prod.where} is a collection, not an alias: the switch must be one "
                            "atomic alias change; point the application at an alias")
        current = prod.alias_target(alias)
        current_record = None
        if current is not None:
            theirs = shape_of(prod, current)
            if theirs != shape:
                raise UserError(f"alias {alias!r} points to {current!r}, whose vectors are {theirs}; this fused "
                                f"system serves {shape}: the application's queries would not fit. Publish it "
                                "under another alias; nothing changed")
            current_record = prod.record(current)
        held = {g.id for g in gold if g.held_out}
        if not held:
            raise BadInput("publish: the gold set has no held-out query (held_out: true): the gate measures on them")
        mine = {r["query_id"]: {m: float(r[m]) for m in TESTED} for r in rows if r["model"] == entry["name"]}
        if current == target and current_record is not None and current_record.get("gate"):
            verdict = current_record["gate"]
        else:
            verdict = _gate(current, current_record, rows, results, mine, held, model=entry["name"],
                            current_model=current_model, metric=gate_metric, min_delta=gate_min_delta,
                            max_p=gate_max_p, resamples=ev_config.significance_resamples)
        if not verdict["passed"]:
            from m3tune.publish import gate

            if not force_gate:
                raise gate.GateFailed(gate.explain(verdict) + ". Nothing in production changed "
                                      "(--force-gate publishes anyway, and is recorded)")
            ctx.log.warning("%s: published anyway (--force-gate)", gate.explain(verdict))

        # the lexical index exactly as evaluate built it: its terms, its k1 and b
        index = lexical.BM25(passages, "arabic") if bm25_members else None
        salt = served.collision_free_salt(t for part in (index.arabic.terms, index.english.terms)
                                          for doc in part for t in doc) if index else 0
        sparse: dict[str, dict[int, tuple]] = {}
        if index is not None:
            row = {p.id: i for i, p in enumerate(passages)}
            for name, part, k1, b in ((served.BM25_AR, index.arabic, lexical.K1, lexical.B),
                                      (served.BM25_EN, index.english, lexical.EN_K1, lexical.EN_B)):
                docs = served.bm25_documents(part.terms, k1=k1, b=b, salt=salt)
                sparse[name] = {row[pid]: d for pid, d in zip(part.ids, docs) if d[0]}
        dense: dict[str, Any] = {}
        if encoder is not None:
            cache = EmbeddingCache(cache_store(options.embeddings_cache), encoder.fingerprint)
            dense[served.DENSE] = cache.encode(encoder, [p.text for p in passages], desc="encode passages")
            views = [view for view, name in served.VIEW_VECTORS.items() if name in vectors]
            for view, found in extra_views(passages, views).items():  # the texts evaluate encoded
                got = cache.encode(encoder, [t for _, t in found], desc=f"encode {VIEWS[view]}")
                dense[served.VIEW_VECTORS[view]] = dict(zip((i for i, _ in found), got))
        identity = {"run_id": ctx.root.uri.rstrip("/").rsplit("/", 1)[-1], "root": ctx.root.uri,
                    "model": {"spec": entry["spec"], "name": entry["name"], "fingerprint": fingerprint,
                              "encoder": target_model, "sha256": _model_digest(ctx.root, target_model or "")},
                    "corpus_sha256": corpus_sha, "dim": dim}
        record = {"alias": alias, "state": "uploading", **identity, "created_at": started, "previous": current,
                  "forced": bool(force_gate and not verdict["passed"]), "gate": verdict,
                  "metrics": {k: round(v, 6) for k, v in expected.items() if k in metrics.HEADLINE},
                  "recipe": recipe.to_json(),
                  "served": {"vectors": shape, "salt": salt, "where": served.WHERE_FUSED,
                             # how `m3tune search` loads the encoder as evaluate did (its prompts and pooling)
                             "encoder": None if encoder is None else {
                                 "spec": spec.spec, "base_model": ev_config.base_model,
                                 "max_length": options.max_length, "dtype": options.dtype,
                                 "profiles": {k: v for k, v in options.profiles.items() if k == spec.name}},
                             "bm25": {"analyzer": "arabic", "k1": lexical.K1, "b": lexical.B, "en_k1": lexical.EN_K1,
                                      "en_b": lexical.EN_B}},
                  "gate_values": {"test_set_sha256": results["test_set"]["sha256"], "dim": dim,
                                  "per_query": {q: {m: round(v, 6) for m, v in mine[q].items()} for q in sorted(held)}}}
        if prod.is_collection(target):
            existing = prod.record(target)
            if existing is None or existing.get("alias") != alias:
                raise UserError(f"Qdrant collection {target!r} exists at {prod.where} and m3tune did not publish it "
                                f"for {alias!r}: refusing to write into it; nothing changed")
            if shape_of(prod, target) != shape or existing.get("recipe") != record["recipe"]:
                raise UserError(f"Qdrant collection {target!r} holds another system's vectors or recipe: delete it "
                                "and rerun; nothing changed")
            record = {**record, "created_at": existing.get("created_at", started),
                      "published_at": existing.get("published_at"),
                      "previous": existing.get("previous") if current == target else current}
        else:
            dense_config, sparse_config = named_vectors_config(vectors, size)
            prod.call(f"create_collection {target!r}", prod.client.create_collection, target,
                      vectors_config=dense_config, sparse_vectors_config=sparse_config,
                      metadata={"created_by": "m3tune", "m3tune": record})
        copied = payloads.production_payloads(prod, current, payload_key, {p.id for p in passages}) \
            if current is not None else {}
        body = payloads.payloads(passages, copied, payload_key)

        def points(batch: list[int]):
            out = []
            for i in batch:
                vec: dict[str, Any] = {}
                for name, rows_ in dense.items():
                    v = rows_[i] if name == served.DENSE else rows_.get(i)
                    if v is not None:
                        vec[name] = np.asarray(v, dtype=np.float32).tolist()
                for name, docs in sparse.items():
                    if i in docs:
                        vec[name] = models.SparseVector(indices=docs[i][0], values=docs[i][1])
                out.append(models.PointStruct(id=i, vector=vec, payload=body[i]))
            return out

        there = upload.present_ids(prod, target)
        stray = sorted(i for i in there if not 0 <= i < len(passages))
        if stray:
            raise UserError(f"Qdrant collection {target!r} holds point ids outside the corpus's 0..{len(passages) - 1} "
                            f"({stray[:3]}): not this corpus's; delete it and rerun")
        missing = [i for i in range(len(passages)) if i not in there]
        sent = upload.upload(prod, target, None, body, missing, batch_size=batch_size, parallel=parallel,
                             max_retries=max_retries, backoff=retry_backoff, points=points)

        # verify: the count, then the gold searched as `m3tune search` runs it gives evaluate's figures
        verify.check_count(prod, target, len(passages))
        cache = EmbeddingCache(cache_store(options.embeddings_cache), encoder.fingerprint) if encoder else None
        run = served.search(prod, target, record, encoder, [(g.id, g.query, g.language) for g in gold],
                            key=payload_key, cache=cache)
        checked = verify.check_metrics(metrics.mean(metrics.per_query(gold, run)), expected,
                                       tolerance=verify_tolerance, what=f"collection {target!r} (fused search)")
        previous = record["previous"]
        record, switch_seconds, deleted = go_live(ctx, prod, record, alias=alias, target=target, current=current,
                                                  keep=keep, verification={"points": len(passages),
                                                                           "metrics": checked})
    finally:
        prod.close()

    return finish(ctx, record, target=target, where=prod.where, sent=sent, there=len(there), missing=len(missing),
                  switch_seconds=switch_seconds, deleted=deleted, points=len(passages), dim=dim, previous=previous,
                  fingerprint=fingerprint, checked=checked, verdict=verdict, gate_metric=gate_metric)
