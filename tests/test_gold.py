"""The packaged gold standard: its size and shape, relevance recomputed from the real corpus, and clear errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from m3tune.corpus.passages import read_passages
from m3tune.gold.build import build
from m3tune.evaluation.gold import PACKAGED, load_gold
from m3tune.jsonl import RecordError
from m3tune.records import GoldQuery


@pytest.fixture(scope="module")
def corpus(full_ingest):
    root, _ = full_ingest
    return read_passages(root)


def test_packaged_set_has_the_issue_s_queries_all_found_in_the_corpus(corpus):
    from m3tune.corpus import heldout

    gold = load_gold(None, {p.id for p in corpus}, held_out=heldout.load())  # every held_out tag checked too
    assert len(gold) >= 300
    by = Counter((g.category, g.language) for g in gold)
    assert by[("exact", "ar")] >= 60
    assert by[("thematic", "ar")] >= 60
    assert by[("cross_lingual", "en")] >= 60
    assert by[("paraphrase", "ar")] >= 60
    sources = Counter(g.source for g in gold)
    assert sources["quran"] >= 20 and sources["hadith"] >= 20
    assert len({g.id for g in gold}) == len(gold)
    # both parts, every category in the held-out one; v2's 85 hand-checked queries kept and tagged
    held = Counter(g.category for g in gold if g.held_out)
    assert all(held[c] >= 25 for c in ("exact", "thematic", "cross_lingual", "paraphrase")), held
    assert sum(not g.held_out for g in gold) >= 100
    assert sum(g.origin == "v2" for g in gold) == 85
    v2_ids = {g.id for g in gold if g.origin == "v2"}
    assert {"exact-01", "theme-02", "en-22", "para-15"} <= v2_ids


def test_packaged_set_is_what_its_rules_compute_on_the_corpus(corpus):
    """Relevance is computed, not typed: rebuilding from the corpus gives the packaged file exactly."""
    rebuilt = [g.model_dump() for g in build(corpus)]
    packaged = [GoldQuery.model_validate_json(line).model_dump()
                for line in PACKAGED.read_text(encoding="utf-8").splitlines()]
    assert rebuilt == packaged


def test_exact_queries_are_relevant_exactly_where_the_phrase_is(corpus):
    from m3tune.arabic import normalize

    by_id = {p.id: p for p in corpus}
    for g in load_gold(None):
        if g.category == "exact":
            phrase = normalize(g.query)
            assert all(phrase in by_id[pid].text_plain for pid in g.relevant_ids), g.id
    # «ومن غشنا فليس منا» holds the phrase behind a proclitic waw: found
    assert "muslim:283" in next(g for g in load_gold(None) if g.query == "من غشنا فليس منا").relevant_ids


def test_bad_gold_files_name_file_line_and_field(tmp_path):
    good = PACKAGED.read_text(encoding="utf-8").splitlines()
    cases = {
        "missing.jsonl": (good[0] + "\n" + json.dumps({"id": "x", "query": "q"}) + "\n", "line 2|:2: field"),
        "dup.jsonl": (good[0] + "\n" + good[0] + "\n", ":2: field 'id': duplicate"),
        "notjson.jsonl": ("{oops\n", ":1: invalid JSON"),
        "unknown.jsonl": (good[0].replace('"bukhari:1"', '"bukhari:999999"') + "\n",
                          ":1: field 'relevant_ids': bukhari:999999 not in the corpus"),
        "none.jsonl": (json.dumps({**json.loads(good[0]), "relevant_ids": []}) + "\n",
                       ":1: field 'relevant_ids'"),
        # tagged held out, but bukhari:1 is not in the partition; tagged seen, but 12:4 is all it has
        "held.jsonl": (json.dumps({**json.loads(good[0]), "held_out": True}) + "\n",
                       ":1: field 'held_out': query 'exact-01' is tagged held out, but 1 of its"),
        "seen.jsonl": (json.dumps({**json.loads(good[0]), "relevant_ids": ["quran:12:4"]}) + "\n",
                       ":1: field 'held_out': query 'exact-01' is tagged seen, but every relevant passage"),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(RecordError) as err:
            load_gold(str(path), {"quran:1:1", "bukhari:1", "quran:12:4"}, held_out=frozenset({"quran:12:4"}))
        message = str(err.value)
        assert str(path) in message and any(e in message for e in expected.split("|")), message
    # an untagged query, or no partition to check against, is not checked
    path = tmp_path / "untagged.jsonl"
    path.write_text(json.dumps({**json.loads(good[0]), "held_out": None}) + "\n", encoding="utf-8")
    assert load_gold(str(path), {"bukhari:1"}, held_out=frozenset())[0].held_out is None


def test_the_development_set_is_rebuilt_by_its_rules_and_stays_apart_from_the_test_set(corpus):
    """BM25's k1 and b are chosen on it (benchmarks/tune_bm25.py): no query of it may be a test query, or be
    drawn from a passage a test query was drawn from or names by hand."""
    from m3tune.arabic import normalize
    from m3tune.corpus import heldout
    from m3tune.gold.build import all_entries, dev_entries

    partition = heldout.load()
    dev = load_gold(str(PACKAGED.parent / "gold_dev_v3.jsonl"), {p.id for p in corpus}, held_out=partition)
    test = all_entries(corpus, partition)
    assert len(dev) >= 100 and not any(g.held_out for g in dev)
    assert not {normalize(g.query) for g in dev} & {normalize(e.query) for e in test}
    test_sources = {e.note.removeprefix("from ") for e in test if e.note.startswith("from ")}
    dev_sources = {e.note.removeprefix("from ") for e in dev_entries(corpus, partition, test)}
    assert not dev_sources & (test_sources | {pid for e in test for pid in e.rule.ids})
    rebuilt = [g.model_dump() for g in build(corpus, entries=dev_entries(corpus, partition, test))]
    assert rebuilt == [g.model_dump() for g in dev]


def test_the_confirmation_set_is_held_out_rebuilt_by_its_rules_and_apart_from_test_and_development(corpus):
    """It checks once a choice made on the test set: every query held out (so load_gold's check of the tags
    against the partition passes), none a test or development query, none drawn from a passage either drew from,
    every category there, and the file what its rules build."""
    from m3tune.arabic import normalize
    from m3tune.corpus import heldout
    from m3tune.gold.build import all_entries, confirm_entries, dev_entries

    partition = heldout.load()
    confirm = load_gold(str(PACKAGED.parent / "gold_confirm_v3.jsonl"), {p.id for p in corpus}, held_out=partition)
    assert all(g.held_out for g in confirm)
    by = Counter(g.category for g in confirm)
    assert all(by[c] >= 25 for c in ("exact", "thematic", "cross_lingual", "paraphrase")), by
    test = all_entries(corpus, partition)
    dev = dev_entries(corpus, partition, test)
    earlier = test + dev
    assert not {normalize(g.query) for g in confirm} & {normalize(e.query) for e in earlier}
    entries = confirm_entries(corpus, partition, test, dev)
    earlier_sources = {e.note.removeprefix("from ") for e in earlier if e.note.startswith("from ")}
    sources = {e.note.removeprefix("from ") for e in entries if e.note.startswith("from ")}
    assert len(sources) >= 100 and not sources & (earlier_sources | {pid for e in earlier for pid in e.rule.ids})
    assert [g.model_dump() for g in build(corpus, entries=entries)] == [g.model_dump() for g in confirm]
