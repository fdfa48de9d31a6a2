"""The packaged gold standard: its size and shape, relevance recomputed from the real corpus, and clear errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from m3tune.corpus.passages import read_passages
from m3tune.evaluation.build_gold import build
from m3tune.evaluation.gold import PACKAGED, load_gold
from m3tune.jsonl import RecordError


@pytest.fixture(scope="module")
def corpus(full_ingest):
    root, _ = full_ingest
    return read_passages(root)


def test_packaged_set_has_the_issue_s_queries_all_found_in_the_corpus(corpus):
    gold = load_gold(None, {p.id for p in corpus})
    by = Counter((g.category, g.language) for g in gold)
    assert by[("exact", "ar")] >= 25
    assert by[("thematic", "ar")] >= 15
    assert by[("cross_lingual", "en")] >= 15
    assert by[("paraphrase", "ar")] >= 10
    sources = Counter(g.source for g in gold)
    assert sources["quran"] >= 20 and sources["hadith"] >= 20
    assert len({g.id for g in gold}) == len(gold)


def test_packaged_set_is_what_its_rules_compute_on_the_corpus(corpus):
    """Relevance is computed, not typed: rebuilding from the corpus gives the packaged file exactly."""
    rebuilt = [g.model_dump() for g in build(corpus)]
    packaged = [json.loads(line) for line in PACKAGED.read_text(encoding="utf-8").splitlines()]
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
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(RecordError) as err:
            load_gold(str(path), {"quran:1:1", "bukhari:1"})
        message = str(err.value)
        assert str(path) in message and any(e in message for e in expected.split("|")), message
