import json

import pytest

from m3tune.analysis.analyze import AnalyzeConfig, TargetsMissed, analyze_files
from m3tune.executor import run_step
from m3tune.jsonl import RecordError

GEN = {"backend": "offline", "model": "none", "prompt_version": "v1"}


def query(i, lang, typ, pid, text=None):
    return {"id": f"q{i}", "query": text or f"query {i}", "language": lang, "type": typ, "positive_ids": [pid],
            "source": "quran" if pid.startswith("quran:") else "hadith", "generator": GEN}


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


TARGETS = dict(arabic_target=0.5, conceptual_target=0.2, quran_target=0.25, tolerance=0.05)


def test_balanced_queries_meet_every_target(tmp_path):
    rows = []
    for i in range(20):  # 10 ar / 10 en; 4 conceptual; 5 quran
        rows.append(query(i, "ar" if i % 2 else "en", "conceptual" if i < 4 else "question",
                          f"quran:2:{i}" if i < 5 else f"bukhari:{i % 7}"))
    report = analyze_files([write(tmp_path / "q.jsonl", rows)], **TARGETS)
    assert report["kind"] == "queries" and report["rows"] == 20
    assert report["shares"]["language"] == {"en": 0.5, "ar": 0.5}
    assert [(t["name"], t["share"], t["met"]) for t in report["targets"]] == [
        ("arabic", 0.5, True), ("conceptual", 0.2, True), ("quran", 0.25, True)]
    assert report["ok"]
    assert report["per_passage"]["passages"] == 5 + 7
    assert report["per_passage"]["max"] == 3  # bukhari:k is the positive of up to 3 queries


def test_english_heavy_examples_miss_and_duplicates_are_counted(tmp_path):
    # FlagEmbedding rows without language/source: detected from script and positive ids
    rows = [{"query": "what is patience", "pos": ["الصبر"], "neg": ["a", "b"], "pos_ids": ["bukhari:1"],
             "neg_ids": ["bukhari:2", "bukhari:3"]} for _ in range(9)]
    rows.append({"query": "ما هو الصبر", "pos": ["الصبر"], "neg": [], "pos_ids": ["quran:2:153"], "neg_ids": []})
    report = analyze_files([write(tmp_path / "ex.jsonl", rows)], **TARGETS)
    assert report["kind"] == "examples"
    assert report["shares"]["language"] == {"en": 0.9, "ar": 0.1}
    assert report["shares"]["source"] == {"hadith": 0.9, "quran": 0.1}
    assert report["duplicates"]["rows"] == 8
    assert report["negatives"] == {"mean": 1.8, "min": 0, "max": 2, "without_negatives": 1}
    assert [t["met"] for t in report["targets"]] == [False, False, False]
    assert not report["ok"]


def test_analyze_step_publishes_report_then_fails_on_miss(local_root, tmp_path):
    rows = [query(i, "en", "question", "bukhari:1") for i in range(4)]
    path = write(tmp_path / "q.jsonl", rows)
    manifest, _ = run_step(local_root, "analyze", AnalyzeConfig(inputs=[path], fail_on_miss=False))
    assert manifest.metrics == {"arabic_share": 0.0, "conceptual_share": 0.0, "quran_share": 0.0}
    with pytest.raises(TargetsMissed, match=r"arabic 0.0% \(target 50%, at least 45%\)"):
        run_step(local_root, "analyze", AnalyzeConfig(inputs=[path], fail_on_miss=True))
    report = json.loads(local_root.child("analyze").read_bytes("report.json"))
    assert report["ok"] is False
    assert not local_root.child("analyze").exists("_manifest.json")  # a failed gate is not "done"


def test_exact_quotes_are_reported_and_checked_only_where_the_data_has_them(local_root, tmp_path):
    rows = [query(i, "ar" if i % 2 else "en", "exact" if i % 10 < 2 else "conceptual" if i % 10 < 4 else "question",
                  "quran:2:1" if i % 4 == 0 else "bukhari:1") for i in range(40)]
    report = analyze_files([write(tmp_path / "q.jsonl", rows)], **TARGETS, exact_target=0.15)
    assert report["shares"]["type"]["exact"] == 0.2
    assert [(t["name"], t["share"], t["met"]) for t in report["targets"]] == [
        ("arabic", 0.5, True), ("conceptual", 0.2, True), ("exact", 0.2, True), ("quran", 0.25, True)]
    missed = analyze_files([write(tmp_path / "q.jsonl", rows)], **TARGETS, exact_target=0.3)
    assert not missed["ok"] and [t["name"] for t in missed["targets"] if not t["met"]] == ["exact"]
    # the pipeline's gate: the step's default target, and its metric
    manifest, _ = run_step(local_root, "analyze", AnalyzeConfig(inputs=[write(tmp_path / "q.jsonl", rows)]))
    assert manifest.metrics["exact_share"] == 0.2
    # data without a single exact quote (outside files) is not held to it, and the report says so
    plain = [r for r in rows if r["type"] != "exact"]
    report = analyze_files([write(tmp_path / "p.jsonl", plain)], **TARGETS, exact_target=0.15)
    assert "exact" not in [t["name"] for t in report["targets"]] and report["not_checked"] == {
        "exact": "no exact-quote row"}
    assert "exact" not in [t["name"] for t in analyze_files([write(tmp_path / "q.jsonl", rows)], **TARGETS,
                                                            exact_target=None)["targets"]]
    # the CLI takes the same target: the file is 20% exact, a floor of 30% (± 5%) is missed, exit 3
    from typer.testing import CliRunner

    from m3tune.cli import app

    cli = ["analyze", str(tmp_path / "q.jsonl"), "--fail-on-miss"]
    assert CliRunner().invoke(app, cli).exit_code == 0
    assert CliRunner().invoke(app, [*cli, "--exact-target", "0.3"]).exit_code == 3


def test_bad_line_is_named(tmp_path):
    path = write(tmp_path / "q.jsonl", [query(1, "ar", "question", "quran:1:1"), {**query(2, "fr", "question", "quran:1:1")}])
    with pytest.raises(RecordError) as info:
        analyze_files([path], **TARGETS)
    assert (info.value.line, info.value.field) == (2, "language")


def test_targets_are_floors_and_overshoot_is_reported(tmp_path):
    rows = [query(i, "ar", "conceptual", "quran:1:1") for i in range(3)]
    report = analyze_files([write(tmp_path / "q.jsonl", rows)], **TARGETS)
    assert [(t["met"], t["above"]) for t in report["targets"]] == [(True, True)] * 3
    assert report["ok"]


def test_several_files_and_kinds_in_one_report(tmp_path):
    queries = write(tmp_path / "q.jsonl", [query(1, "ar", "question", "quran:1:1")])
    examples = write(tmp_path / "e.jsonl", [{"query": "verses about patience", "pos": ["x"], "pos_ids": ["bukhari:1"]}])
    report = analyze_files([queries, examples], **TARGETS)
    assert (report["rows"], report["kind"]) == (2, "examples+queries")
    assert report["shares"]["language"] == {"ar": 0.5, "en": 0.5}


def test_bad_first_line_does_not_hide_valid_examples(local_root, tmp_path):
    path = tmp_path / "ex.jsonl"
    path.write_bytes(b"\xff not json\n" + json.dumps({"query": "q", "pos": ["p"], "pos_ids": ["quran:1:1"]}).encode()
                     + b"\n")
    manifest, _ = run_step(local_root, "analyze", AnalyzeConfig(inputs=[str(path)], skip_invalid=True,
                                                                fail_on_miss=False))
    report = json.loads(local_root.child("analyze").read_bytes("report.json"))
    assert (report["kind"], report["rows"], report["rejected"]) == ("examples", 1, 1)


def test_rejects_are_written_even_when_nothing_valid_is_left(local_root, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"{oops\n[1]\n")
    with pytest.raises(Exception, match="no valid rows"):
        run_step(local_root, "analyze", AnalyzeConfig(inputs=[str(path)], skip_invalid=True))
    rejects = local_root.child("analyze").read_bytes("rejects.jsonl").splitlines()
    assert [json.loads(r)["line"] for r in rejects] == [1, 2]
