"""Serving what was measured: a fused system (BM25 + a bilingual dense model, its recipe chosen on
held-out-dev) published into Qdrant and searched through it gives evaluate's figures, in local mode and
through the client over HTTP (tests/qdrant_server.py); a recipe naming a vector the collection lacks, and a
search with another model, are clear errors before any query runs.

The run: gold v4's Quran-only test and dev queries, their passages and every 40th verse; the tiny XLM-R as
the encoder (no training: the fused system's members are the base model and BM25).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from m3tune.errors import UserError
from m3tune.runroot import open_root

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qdrant_server import QdrantRestServer  # noqa: E402

ALIAS = "quran-fused"
LENIENT = {"gate_min_delta": -1.0, "gate_max_p": 1.0}
MODELS = ["base", "bm25", "bilingual:base", "fused=fusion:bm25,bilingual:base"]


def _evaluated_run(base: Path, models: list[str], *, hadith: int = 0):
    """A run over gold v4's Quran-only test and dev queries, their passages, every 40th verse and the first
    HADITH hadith of Bukhari (distractors with bodies), evaluated with MODELS."""
    from m3tune.corpus.ingest import IngestConfig
    from m3tune.corpus.packaged import hadith_passages
    from m3tune.corpus.passages import read_passages
    from m3tune.evaluation.gold import PACKAGED
    from m3tune.evaluation.step import EvaluateConfig
    from m3tune.executor import run_step

    scratch = open_root(str(base / "runs" / "quran"))
    run_step(scratch, "ingest", IngestConfig(sources=["quran"]))
    quran = read_passages(scratch)
    ids = {p.id for p in quran}
    sets = {}
    for part in ("test", "dev"):
        rows = [json.loads(line) for line in (PACKAGED.parent / f"gold_v4_{part}.jsonl").read_text(
            encoding="utf-8").splitlines()]
        sets[part] = [g for g in rows if all(r in ids for r in g["relevant_ids"])]
        (base / f"{part}.jsonl").write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in sets[part]),
                                            encoding="utf-8")
    wanted = {r for rows in sets.values() for g in rows for r in g["relevant_ids"]}
    corpus = [p for i, p in enumerate(quran) if p.id in wanted or i % 40 == 0]
    corpus += list(hadith_passages("bukhari", hadith)) if hadith else []
    (base / "passages.jsonl").write_text("".join(p.model_dump_json() + "\n" for p in corpus), encoding="utf-8")
    root = open_root(str(base / "runs" / "run-1"))
    run_step(root, "ingest", IngestConfig(sources=[], user_files=[str(base / "passages.jsonl")]))
    ev = EvaluateConfig(test_set=str(base / "test.jsonl"), dev_set=str(base / "dev.jsonl"),
                        base_model="local:tiny-xlmr", models=models, dims=[], k=100, max_length=128, batch_size=64,
                        significance_resamples=200, fusion_step=0.1)
    run_step(root, "evaluate", ev)
    return root, ev, base


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _evaluated_run(tmp_path_factory.mktemp("fused"), MODELS)


def _config(**kw):
    from m3tune.publish.step import PublishConfig

    return PublishConfig(**{"alias": ALIAS, "model": "fused", "batch_size": 64, **LENIENT, **kw})


def _evaluated(root) -> tuple[dict, dict]:
    results = json.loads(root.child("evaluate").read_bytes("results.json"))
    rows = [json.loads(line) for line in root.child("evaluate").read_bytes("per_query.jsonl").splitlines()]
    return next(m for m in results["models"] if m["name"] == "fused"), {
        r["query_id"]: r["top10"] for r in rows if r["model"] == "fused"}


def _same_up_to_ties(got: dict, expected: dict, depth: int = 10, tol: float = 1e-5) -> bool:
    """The same top DEPTH, where passages whose fused scores differ by float noise may swap: identical verses
    (2:5 and 31:5) are encoded in different batches, so their dense scores differ in the last bits."""
    top = list(got.items())[:depth]
    return all(abs(a - b) <= tol for (_, a), (_, b) in zip(top, list(expected.items())[:depth])) and all(
        pid in expected and abs(score - expected[pid]) <= tol for pid, score in top)


def test_the_recipe_is_chosen_on_dev_and_recorded(run):
    root, ev, base = run
    entry, _ = _evaluated(root)
    recipe = entry["recipe"]
    assert recipe["members"] == ["bm25", "bilingual:base"] and recipe["normalization"] in ("minmax", "zscore", "tmm")
    assert recipe["chosen_on"]["path"] == str(base / "dev.jsonl") and recipe["chosen_on"]["queries"] > 20
    sweep = json.loads(root.child("evaluate").read_bytes("fusion.json"))["fused"]["sweep"]
    routes = [f" + quote route at {share:.1f}" for share in (1.0, 0.8, 0.6)]
    assert set(sweep["normalizations"]) == {n + r for n in ("minmax", "zscore", "tmm") for r in ["", *routes]}
    assert len(sweep["normalizations"]["minmax"]["grid"]) == 11


@pytest.mark.parametrize("where", ["local", "server"])
def test_publish_then_search_gives_evaluates_figures(run, tmp_path, where):

    from m3tune.cli import app
    from m3tune.executor import run_step
    from m3tune.publish.served import search_alias
    from m3tune.publish.step import open_production

    root, ev, _ = run
    entry, top10 = _evaluated(root)
    server = QdrantRestServer() if where == "server" else None
    try:
        if server:
            server.__enter__()
        place = {"qdrant_url": server.url} if server else {"qdrant_path": str(tmp_path / "qdrant")}
        manifest, ran = run_step(root, "publish", _config(**place), force=True)
        assert ran
        for metric in ("ndcg@10", "recall@10", "mrr@10"):
            assert manifest.metrics[f"collection/{metric}"] == pytest.approx(entry["overall"][metric], abs=0.01)
        prod = open_production(place.get("qdrant_url"), "QDRANT_URL", place.get("qdrant_path"), "QDRANT_API_KEY", 60)
        try:
            gold = [json.loads(line) for line in Path(ev.test_set).read_text(encoding="utf-8").splitlines()]
            same = 0
            for g in gold[:12]:
                hits = search_alias(prod, ALIAS, g["query"], k=10, language=g["language"])
                same += [pid for pid, _, _ in hits] == top10[g["id"]]
                assert all(p.get("passage_id") == pid for pid, _, p in hits)
            assert same >= 11  # the same ranking, up to a float tie
            record = prod.record(prod.alias_target(ALIAS))
            assert record["recipe"] == entry["recipe"] and "client-side" in record["served"]["where"]
            client = prod.client
            info = client.get_collection(prod.alias_target(ALIAS)).config.params
            assert set(info.vectors) == {"dense", "dense-en"} and set(info.sparse_vectors) == {"bm25-ar", "bm25-en"}
        finally:
            prod.close()
        out = CliRunner().invoke(app, ["search", gold[0]["query"], "--alias", ALIAS, "--json", "--k", "3",
                                       *(["--qdrant-url", server.url] if server else
                                         ["--qdrant-path", place["qdrant_path"]])])
        assert out.exit_code == 0, out.output
        assert [h["passage_id"] for h in json.loads(out.output)] == top10[gold[0]["id"]][:3]
    finally:
        if server:
            server.__exit__(None, None, None)


def test_a_recipe_naming_a_missing_vector_or_another_model_is_a_clear_error(run, tmp_path):
    from qdrant_client import models

    from m3tune.executor import run_step
    from m3tune.publish.served import search_alias
    from m3tune.publish.step import open_production

    root, ev, _ = run
    path = str(tmp_path / "qdrant")
    run_step(root, "publish", _config(qdrant_path=path), force=True)
    prod = open_production(None, "QDRANT_URL", path, "QDRANT_API_KEY", 60)
    try:
        record = prod.record(prod.alias_target(ALIAS))
        # a collection whose record's recipe reads dense-en, which it lacks
        prod.client.create_collection("broken", vectors_config={"dense": models.VectorParams(
            size=32, distance=models.Distance.DOT)}, metadata={"created_by": "m3tune", "m3tune": {
                **record, "alias": "broken-alias"}})
        prod.client.update_collection_aliases(change_aliases_operations=[models.CreateAliasOperation(
            create_alias=models.CreateAlias(collection_name="broken", alias_name="broken-alias"))])
        with pytest.raises(UserError, match="reads the vector.*bm25-ar, bm25-en, dense-en.*lacks"):
            search_alias(prod, "broken-alias", "الصلاة")
        # the published run's encoder is the tiny base; another folder is another model
        other = tmp_path / "other-model"
        other.mkdir()
        from m3tune.encoder.model import load_encoder

        load_encoder("local:tiny-xlmr")  # the tiny model's folder is built on first use
        from m3tune.encoder.tiny import cache_dir

        tiny = next(p for p in (cache_dir()).rglob("config.json") if "tiny" in str(p)).parent
        import shutil

        shutil.copytree(tiny, other, dirs_exist_ok=True)
        (other / "README.md").write_text("another model\n")
        with pytest.raises(UserError, match="is another .*fingerprint"):
            search_alias(prod, ALIAS, "الصلاة", model=str(other))
        with pytest.raises(UserError, match="language 'fr'"):
            search_alias(prod, ALIAS, "الصلاة", language="fr")
    finally:
        prod.close()


def test_the_quote_route_is_served_as_evaluate_computes_it(run, tmp_path):
    """A recipe with the quote route on: the collection's search (pairs checked against the bm25-ar vectors of
    BM25's top passages) ranks every gold query as evaluate's fusion does (pairs checked in the BM25 index)."""
    from m3tune.corpus.passages import read_passages
    from m3tune.evaluation import fusion
    from m3tune.evaluation.bm25 import BM25
    from m3tune.evaluation.gold import load_gold
    from m3tune.evaluation.models import parse_models, rank_model
    from m3tune.evaluation.step import options_of, quote_shares
    from m3tune.executor import run_step
    from m3tune.publish import served
    from m3tune.publish.step import open_production

    root, ev, _ = run
    path = str(tmp_path / "qdrant")
    run_step(root, "publish", _config(qdrant_path=path), force=True)
    passages = read_passages(root)
    gold = load_gold(ev.test_set, {p.id for p in passages})
    specs = {s.name: s for s in parse_models(MODELS, ev.base_model)}
    lexical = {"arabic": BM25(passages, "arabic")}
    runs_of = {n: (specs[n], rank_model(specs[n], gold, passages, k=100, dims=(), options=options_of(ev.model_dump()),
                                         bm25=lexical).runs[None]) for n in ("bm25", "bilingual:base")}
    shares = quote_shares(gold, runs_of, ["bm25", "bilingual:base"], ["bm25", "bilingual"], lexical["arabic"])
    quotes = {q for q, share in shares.items() if share >= 0.6}
    assert 5 <= len(quotes) < len(gold)  # the gold's Arabic quotes, and not every query
    prod = open_production(None, "QDRANT_URL", path, "QDRANT_API_KEY", 60)
    try:
        collection = prod.alias_target(ALIAS)
        record = prod.record(collection)
        record = {**record, "recipe": {**record["recipe"], "quote_share": 0.6,
                                       "weights": {"default": [0.0, 1.0]}}}  # quotes alone keep BM25's order
        recipe = fusion.Recipe.from_json(record["recipe"])
        expected = fusion.fuse(recipe, [runs_of["bm25"][1], runs_of["bilingual:base"][1]],
                               {g.id: g.language for g in gold}, shares)
        got = served.search(prod, collection, record, served.served_encoder(record),
                            [(g.id, g.query, g.language) for g in gold])
    finally:
        prod.close()
    differ = [g.id for g in gold if not _same_up_to_ties(got[g.id], expected[g.id])]
    assert not differ, differ
    for q in quotes:  # a routed quote is BM25's ranking (passages with equal BM25 scores may swap)
        lexical = runs_of["bm25"][1][q]
        # above the list's floor (its lowest score, which every passage BM25 missed takes too); BM25 may match
        # fewer than five passages
        top = [score for score in list(lexical.values())[:5] if score > min(lexical.values())]
        assert [lexical.get(pid) for pid in list(got[q])[:len(top)]] == pytest.approx(top, rel=1e-5)


def test_a_fused_system_reading_hadith_bodies_is_served_as_evaluated(tmp_path_factory):
    """bilingual-body: the collection holds a dense-body vector for each hadith with a body (and only those),
    and searching it gives evaluate's fused figures and rankings: the body vectors are read on both sides."""
    from m3tune.corpus.neardup import hadith_body
    from m3tune.corpus.passages import read_passages
    from m3tune.executor import run_step
    from m3tune.publish.served import search_alias
    from m3tune.publish.step import open_production

    base = tmp_path_factory.mktemp("fused-body")
    root, ev, _ = _evaluated_run(base, ["bm25", "bilingual-body:base", "fused=fusion:bm25,bilingual-body:base"],
                                 hadith=120)
    entry, top10 = _evaluated(root)
    assert entry["recipe"]["kinds"] == ["bm25", "bilingual-body"]
    place = {"qdrant_path": str(base / "qdrant")}
    manifest, ran = run_step(root, "publish", _config(**place), force=True)
    assert ran and manifest.metrics["collection/ndcg@10"] == pytest.approx(entry["overall"]["ndcg@10"], abs=0.01)
    passages = read_passages(root)
    told = {i for i, p in enumerate(passages) if hadith_body(p) is not None}
    assert 0 < len(told) < 120
    prod = open_production(None, "QDRANT_URL", place["qdrant_path"], "QDRANT_API_KEY", 60)
    try:
        target = prod.alias_target(ALIAS)
        assert set(prod.client.get_collection(target).config.params.vectors) == {"dense", "dense-en", "dense-body"}
        points, _ = prod.client.scroll(target, limit=len(passages), with_vectors=["dense-body"])
        assert {int(p.id) for p in points if (p.vector or {}).get("dense-body")} == told
        gold = [json.loads(line) for line in Path(ev.test_set).read_text(encoding="utf-8").splitlines()]
        same = sum([pid for pid, _, _ in search_alias(prod, ALIAS, g["query"], k=10, language=g["language"])]
                   == top10[g["id"]] for g in gold[:12])
        assert same >= 11  # the same ranking, up to a float tie
    finally:
        prod.close()
