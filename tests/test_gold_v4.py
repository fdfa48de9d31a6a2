"""Gold v4: held-out-dev and held-out-test apart, independence tags that agree with the generators' code,
selection that refuses the test set, cluster intervals, and clear errors on bad input."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from m3tune.corpus import heldout
from m3tune.gold import build_v4 as v4
from m3tune.evaluation.gold import V4_DEV, V4_TEST, gold_location, load_for_selection, load_gold
from m3tune.evaluation.metrics import cluster_bootstrap, p_text
from m3tune.jsonl import RecordError
from m3tune.records import GoldQuery

SRC = Path(__file__).resolve().parents[1] / "src" / "m3tune"


def _rows(name: str) -> list[GoldQuery]:
    store, file, _ = gold_location(name)
    return [GoldQuery.model_validate_json(line) for line in store.read_bytes(file).splitlines()]


@pytest.fixture(scope="module")
def corpus(full_ingest):
    from m3tune.corpus.passages import read_passages

    root, _ = full_ingest
    return read_passages(root)


def test_the_test_set_is_large_enough_to_decide_and_every_row_is_tagged():
    test, dev = _rows(V4_TEST), _rows(V4_DEV)
    assert all(g.split == "held-out-test" and g.held_out for g in test)
    assert all(g.split == "held-out-dev" and g.held_out for g in dev)
    independent = [g for g in test if g.independent]
    assert len(independent) >= 200
    assert min(Counter(g.category for g in independent).values()) >= 40
    assert set(Counter(g.category for g in independent)) == {"exact", "thematic", "paraphrase", "cross_lingual"}
    assert all(g.origin.startswith("hand-") for g in independent)
    assert all(not g.independent and g.shares for g in test if not g.origin.startswith("hand-"))
    assert {g.id for g in test}.isdisjoint(g.id for g in dev)


def test_every_relevant_passage_lies_in_its_query_s_part():
    partition, test_ids = heldout.load(), heldout.load_test()
    for g in _rows(V4_TEST):
        assert set(g.relevant_ids) <= test_ids, g.id
    for g in _rows(V4_DEV):
        assert set(g.relevant_ids) <= partition - test_ids, g.id
    # and load_gold checks the tags against the packaged partition
    assert len(load_gold(V4_TEST, held_out=partition)) == len(_rows(V4_TEST))


def test_the_v4_files_are_what_their_sources_compute_on_the_corpus(corpus):
    built = v4.build(corpus, sorted(v4.SOURCES.glob("*.jsonl")))
    assert [g.model_dump() for g in built["held-out-test"]] == [g.model_dump() for g in _rows(V4_TEST)]
    assert [g.model_dump() for g in built["held-out-dev"]] == [g.model_dump() for g in _rows(V4_DEV)]


def test_independent_tags_agree_with_a_check_of_the_generators(corpus):
    """An independent row copies no run of the texts the generators write from; a rule-shared row names a rule
    that the generator's source really holds."""
    from m3tune.corpus.tafsir import explanations

    by_id = {p.id: p for p in corpus}
    tafsir = explanations()
    for g in _rows(V4_TEST) + _rows(V4_DEV):
        found = v4.copies(g.query, g.language, g.category, [by_id[i] for i in g.relevant_ids], tafsir)
        if g.origin not in v4.RULE_SHARES:  # written by hand (v4's, or v3's topics kept in dev)
            assert g.independent is (not found) and g.shares == found, g.id
        else:
            reason, module, name = v4.RULE_SHARES[g.origin]
            source = Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8")
            assert name in source, (g.origin, module, name)
            assert g.shares == [reason] and g.independent is False


def test_the_copy_checks_fire_on_copies():
    from m3tune.records import Passage

    verse = Passage(id="quran:12:4", source="quran", collection="quran", text="إِذۡ قَالَ يُوسُفُ",
                    text_plain="اذ قال يوسف لابيه يا ابت اني رايت احد عشر كوكبا", meta={},
                    translation_en="[Of these stories mention] when Joseph said to his father, O my father")
    assert v4.copies("when Joseph said to his father in a dream", "en", "cross_lingual", [verse], {})
    assert not v4.copies("Joseph's dream of eleven stars", "en", "cross_lingual", [verse], {})
    tafsir = {"quran:12:4": "اذكر ايها الرسول قول يوسف لابيه حين راى الرؤيا"}
    assert v4.copies("قول يوسف لابيه حين راى", "ar", "thematic", [verse], tafsir)[0].startswith("tafsir-copy")
    assert not v4.copies("رؤيا يوسف والكواكب", "ar", "thematic", [verse], tafsir)
    assert v4.copies("يا ابت اني رايت احد عشر", "ar", "paraphrase", [verse], {})[0].startswith("passage-copy")
    assert not v4.copies("يا ابت اني رايت احد عشر", "ar", "exact", [verse], {})  # a quote is meant to copy


def test_no_generation_module_imports_the_gold_builder():
    """The training rules and the test rules stay two things: generation/ imports nothing of evaluation/."""
    for path in (SRC / "generation").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("m3tune.evaluation") for n in names), (path, names)


def test_selection_refuses_the_test_set_and_untagged_files():
    assert len(load_for_selection(V4_DEV)) == len(_rows(V4_DEV))
    with pytest.raises(RecordError) as e:
        load_for_selection(V4_TEST)
    assert "gold_v4_test.jsonl:1" in str(e.value) and "split" in str(e.value) and "held-out-test" in str(e.value)
    with pytest.raises(RecordError, match="untagged"):
        load_for_selection(None)  # gold v3: no split tags, so nothing can be chosen on it


def test_the_bm25_tuning_script_refuses_the_test_set(tmp_path):
    corpus = tmp_path / "passages.jsonl"
    corpus.write_text("", encoding="utf-8")
    out = subprocess.run([sys.executable, "benchmarks/tune_bm25.py", "--corpus", str(corpus), "--dev", V4_TEST],
                         capture_output=True, text=True, cwd=SRC.parents[1])
    assert out.returncode != 0
    assert "gold_v4_test.jsonl:1" in out.stderr and "held-out-dev" in out.stderr, out.stderr[-500:]


def test_a_test_row_whose_passage_lies_outside_held_out_test_is_named(tmp_path):
    good = _rows(V4_TEST)[0]
    bad = good.model_copy(update={"id": "moved", "relevant_ids": ["quran:19:16"]})  # a held-out-dev verse
    path = tmp_path / "gold.jsonl"
    path.write_text(good.model_dump_json() + "\n" + bad.model_dump_json() + "\n", encoding="utf-8")
    with pytest.raises(RecordError) as e:
        load_gold(str(path), held_out=heldout.load())
    assert f"{path}:2" in str(e.value) and "split" in str(e.value) and "quran:19:16" in str(e.value)


def test_a_hand_written_source_whose_relevance_leaves_its_part_is_named(tmp_path, corpus):
    from m3tune.generation.base import twins

    path = tmp_path / "src.jsonl"
    path.write_text(json.dumps({"id": "x", "query": "الصلاة", "category": "thematic", "kind": "topic",
                                "relevant": {"verses": ["12:4", "2:3"]}}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    sources = [(str(path), 1, s) for s in v4.read_sources(path)]
    with pytest.raises(RecordError) as e:
        v4.resolve(sources, corpus, twins(corpus), heldout.load(), heldout.load_test(), {})
    assert f"{path}:1" in str(e.value) and "relevant" in str(e.value) and "quran:2:3" in str(e.value)
    path.write_text('{"id": "x", "query": "q", "category": "thematic", "kind": "topic", '
                    '"relevant": {"verses": ["12"]}}\n', encoding="utf-8")
    with pytest.raises(RecordError, match="verses"):
        v4.read_sources(path)


def test_the_cluster_bootstrap_matches_a_hand_computed_case():
    """Two clusters, A = [1, 1] and B = [0]: a resample is AA (mean 1), AB or BA (2/3) or BB (0), each pair
    with probability 1/4. So the 95% interval is [0, 1], P(mean <= 0) = 1/4 and the two-sided p is 1/2."""
    got = cluster_bootstrap([1, 1, 0], ["A", "A", "B"], resamples=40_000)
    assert got["mean"] == pytest.approx(2 / 3) and got["ci95"] == [0.0, 1.0] and got["clusters"] == 2
    assert got["p_value"] == pytest.approx(0.5, abs=0.02)
    # one cluster always positive: every resample is above 0, so p sits at the floor 1/(R+1)
    floor = cluster_bootstrap([0.2, 0.4, 0.1], ["A", "B", "C"], resamples=999)
    assert floor["p_floor"] and floor["p_value"] == pytest.approx(1 / 1000)
    assert p_text(floor["p_value"], 999, sides=1) == "p ≤ 1/1000" and p_text(0.0312, 999) == "p = 0.0312"
    assert p_text(2 / 10_001, 10_000) == "p ≤ 2/10001"  # a two-sided randomization test's floor
    # clusters widen the interval: the same values, one cluster per value vs one cluster per half
    values = [1.0] * 10 + [0.0] * 10
    apart = cluster_bootstrap(values, [str(i) for i in range(20)], resamples=5000)
    halves = cluster_bootstrap(values, ["a"] * 10 + ["b"] * 10, resamples=5000)
    assert halves["ci95"][1] - halves["ci95"][0] > apart["ci95"][1] - apart["ci95"][0]


def test_a_judgment_of_a_passage_outside_the_pool_is_named(tmp_path):
    pools = v4.read_pools(v4.POOL)
    qid, pool = next(iter(pools.items()))
    assert pool.depth == 10 and len(pool.systems) >= 4  # the depth and the systems the README states
    outside = next(f"quran:2:{v}" for v in range(1, 287) if f"quran:2:{v}" not in pool.pooled)
    path = tmp_path / "judgments.jsonl"
    rows = [{"query_id": qid, "passage_id": pool.pooled[0], "relevant": True, "note": "answers it"},
            {"query_id": qid, "passage_id": outside, "relevant": False}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(RecordError) as e:
        v4.read_judgments(path, pools)
    assert f"{path}:2" in str(e.value) and "passage_id" in str(e.value) and "not in the pool" in str(e.value)
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[0], "relevant": False}) + "\n", encoding="utf-8")
    with pytest.raises(RecordError, match="judged twice"):
        v4.read_judgments(path, pools)
    path.write_text(json.dumps({**rows[0], "query_id": "no-such-query"}) + "\n", encoding="utf-8")
    with pytest.raises(RecordError, match="has no pool"):
        v4.read_judgments(path, pools)


def test_a_query_that_judged_passages_take_out_of_its_part_is_dropped(corpus):
    """A pooled passage outside held-out-test judged relevant means the query is not held out after all."""
    from m3tune.generation.base import twins

    source = v4.Source(id="tq-x", query="قصة اصحاب الكهف", category="thematic", kind="topic",
                       relevant=v4.Relevant(verses=["18:9-12"]))
    args = ([("f", 1, source)], corpus, twins(corpus), heldout.load(), heldout.load_test(), {})
    (kept,) = v4.resolve(*args, judged={"tq-x": {"quran:18:13": True, "quran:18:30": False}})
    assert kept.relevant_ids == [f"quran:18:{v}" for v in range(9, 14)] and kept.split == "held-out-test"
    dropped: list[dict] = []
    assert v4.resolve(*args, judged={"tq-x": {"quran:2:3": True}}, dropped=dropped) == []
    assert dropped == [{"id": "tq-x", "query": "قصة اصحاب الكهف", "part": "held-out-test", "outside": ["quran:2:3"]}]
    with pytest.raises(RecordError, match="outside held-out-test"):
        v4.resolve(*args, judged={"tq-x": {"quran:2:3": True}})


def test_a_query_s_cluster_is_its_held_out_unit_not_a_twin_elsewhere():
    from m3tune.errors import UserError
    from m3tune.evaluation.metrics import query_clusters

    g = GoldQuery(id="q", query="q", relevant_ids=["quran:10:48", "quran:36:48", "bukhari:9"], category="exact",
                  language="ar", source="mixed", difficulty="easy")
    units = {"quran:10:48": "quran:10", "quran:36:48": "quran:36", "bukhari:9": None}
    assert query_clusters([g], units) == {"q": "quran:10"}  # a tie: the unit named first
    assert query_clusters([g], units, frozenset({"quran:36:48"})) == {"q": "quran:36"}  # the held-out unit wins
    with pytest.raises(UserError, match="quran:36:48 is not in the corpus"):
        query_clusters([g], {"quran:10:48": "quran:10", "bukhari:9": None})
