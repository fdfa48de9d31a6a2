"""generate-exact: exact-quote spans, every passage containing a span as its positives, and their balance."""

from __future__ import annotations

import json
import random

import pytest

from m3tune.arabic import normalize
from m3tune.combine.step import CombineConfig
from m3tune.corpus.ingest import IngestConfig
from m3tune.corpus.passages import read_passages
from m3tune.arabic import CHAIN_WORDS as _CHAIN
from m3tune.gold.build import Rule, match
from m3tune.executor import run_step
from m3tune.generation.base import twins
from m3tune.generation.exact import GenerateExactConfig, PhraseIndex, contains, exact_queries
from m3tune.generation.validate import QueryValidator
from m3tune.jsonl import read_records
from m3tune.records import Passage, Query
from m3tune.runroot import open_root

RULES = dict(min_words=4, max_words=12, min_content_words=3, max_matches=20)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """300 verses and 300 hadith of the packaged corpus (al-Baqara's refrains, Bukhari's repeated reports)."""
    root = open_root(str(tmp_path_factory.mktemp("exact") / "run"))
    run_step(root, "ingest", IngestConfig(sources=["quran", "bukhari"], limit=300))
    return root, read_passages(root)


def passage(pid: str, text: str) -> Passage:
    source = "quran" if pid.startswith("quran:") else "hadith"
    return Passage(id=pid, source=source, collection=pid.split(":")[0], text=text, text_plain=normalize(text))


def generate(root, **config) -> tuple[list[Query], dict]:
    manifest, _ = run_step(root, "generate-exact", GenerateExactConfig(**config), force=True)
    return list(read_records(root.child("generate-exact"), "queries.jsonl", Query)), manifest.counts


def test_spans_are_4_to_12_words_of_their_passage(small):
    root, passages = small
    by_id = {p.id: p for p in passages}
    queries, counts = generate(root, pilot=0, spans_per_passage=2, held_out=None)
    assert len(queries) > 500 and counts["queries"] == len(queries)
    lengths = {len(normalize(q.query).split()) for q in queries}
    assert min(lengths) == 4 and max(lengths) == 12
    for q in queries:
        assert (q.type, q.language) == ("exact", "ar")
        assert q.id.startswith(q.positive_ids[0] + "/exact-")  # the source passage first
        assert contains(by_id[q.positive_ids[0]].text_plain, normalize(q.query))
    # a hadith's span is typed as a reader types it (hamza kept), a verse's is its text_plain
    assert any(q.query != normalize(q.query) for q in queries if q.source == "hadith")


def test_positives_are_every_passage_containing_the_span(small):
    root, passages = small
    queries, _ = generate(root, pilot=0, spans_per_passage=2, held_out=None)
    same = twins(passages)
    shared = 0
    for q in queries:
        # the gold's own matcher (a regex over every passage): what a gold exact query would count relevant
        brute = match(Rule(ar=(q.query,)), passages, same)
        assert sorted(q.positive_ids) == sorted(brute), q.query
        shared += len(brute) > 1
    assert shared >= 20  # refrains and repeated reports: the check is not only over one-passage spans


def test_contains_is_the_gold_s_whole_word_rule():
    texts = ["ومن غشنا فليس منا", "من غشنا فليس", "فمن غشنا", "امن غشنا فليس", "قال من غشناه", "كمن غشنا",
             "وومن غشنا", "قال ومن غشنا"]
    rng = random.Random(3)
    words = "من غشنا فليس منا قال و".split()
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) for _ in range(300)]
    for phrase in ("من غشنا", "غشنا فليس منا", "من", "قال و"):
        corpus = [passage(f"bukhari:{i + 1}", t) for i, t in enumerate(texts)]
        expected = match(Rule(ar=(phrase,)), corpus, {})
        assert PhraseIndex(corpus).find(phrase) == expected, phrase
        assert [p.id for p in corpus if contains(p.text_plain, normalize(phrase))] == expected


def test_the_same_seed_gives_the_same_queries_and_another_seed_others(small):
    _, passages = small
    one = exact_queries(passages, frozenset(), pilot=100, seed=5, sources=["quran", "hadith"], spans_per_passage=1,
                        **RULES)[0]
    again = exact_queries(passages, frozenset(), pilot=100, seed=5, sources=["quran", "hadith"],
                          spans_per_passage=1, **RULES)[0]
    other = exact_queries(passages, frozenset(), pilot=100, seed=6, sources=["quran", "hadith"],
                          spans_per_passage=1, **RULES)[0]
    assert [q.model_dump() for q in one] == [q.model_dump() for q in again] and len(one) > 50
    assert {q.query for q in one} != {q.query for q in other}


def test_hadith_spans_come_from_the_body_not_the_chain_of_narrators(small):
    root, passages = small
    by_id = {p.id: p for p in passages}
    queries, _ = generate(root, pilot=0, spans_per_passage=3, sources=["hadith"], held_out=None)
    assert len(queries) > 200 and all(q.positive_ids[0].startswith("bukhari:") for q in queries)
    for q in queries:
        words = by_id[q.positive_ids[0]].text_plain.split()
        span = normalize(q.query).split()
        assert _CHAIN.isdisjoint(span), q.query
        body = " ".join(words[2 * len(words) // 3:])  # the gold's exact spans' rule: the last third
        assert contains(body, " ".join(span)), (q.id, q.query)
    chain = "حدثنا الحميدي عبد الله بن الزبير قال حدثنا سفيان"  # bukhari:1's chain, never quoted
    assert not any(set(normalize(q.query).split()) & {"حدثنا", "الحميدي", "سفيان"} for q in queries), chain


def test_held_out_passages_are_never_a_source_nor_a_positive(tmp_path):
    shared = ("انما الاعمال بالنيات وانما لكل امري ما نوي فمن كانت هجرته الي دنيا يصيبها او الي امراه ينكحها "
              "فهجرته الي ما هاجر اليه")
    corpus = [passage("bukhari:1", f"حدثنا فلان عن فلان قال {shared}"),  # held out
              passage("bukhari:2", f"حدثنا علان عن علان قال {shared}"),  # its body is the held-out one's
              passage("bukhari:3", "حدثنا زيد عن عمرو قال من كان يؤمن بالله واليوم الاخر فليقل خيرا او ليصمت"),
              passage("quran:2:286", "لا يكلف الله نفسا الا وسعها لها ما كسبت وعليها ما اكتسبت")]
    held = frozenset({"bukhari:1"})
    queries, selected, rejected = exact_queries(corpus, held, pilot=0, seed=1, sources=["quran", "hadith"],
                                                spans_per_passage=2, **RULES)
    assert "bukhari:1" not in {p.id for p in selected}
    assert all("bukhari:1" not in q.positive_ids for q in queries)
    assert rejected["matches_held_out"] > 0  # bukhari:2's body is found in the held-out passage
    assert {q.positive_ids[0] for q in queries} == {"bukhari:3", "quran:2:286"}
    # the step reads the partition from a list like combine's
    root = open_root(str(tmp_path / "run"))
    users = tmp_path / "corpus.jsonl"
    users.write_text("".join(p.model_dump_json() + "\n" for p in corpus), encoding="utf-8")
    run_step(root, "ingest", IngestConfig(sources=[], user_files=[str(users)]))
    (tmp_path / "held.txt").write_text("# held\nbukhari:1\n", encoding="utf-8")
    got, counts = generate(root, pilot=0, spans_per_passage=2, held_out=str(tmp_path / "held.txt"))
    assert got and all("bukhari:1" not in q.positive_ids for q in got)
    assert counts["rejected_spans"]["matches_held_out"] > 0


def test_a_span_found_in_too_many_passages_is_dropped():
    refrain = "فباي الاء ربكما تكذبان"  # 31 verses of ar-Rahman
    corpus = [passage(f"quran:55:{i}", refrain) for i in range(1, 7)]
    corpus.append(passage("quran:55:26", "كل من عليها فان ويبقي وجه ربك ذو الجلال والاكرام"))
    capped = dict(RULES, max_matches=5)
    queries, _, rejected = exact_queries(corpus, frozenset(), pilot=0, seed=1, sources=["quran"],
                                         spans_per_passage=1, **capped)
    assert rejected["too_common"] > 0 and [q.positive_ids for q in queries] == [["quran:55:26"]]
    queries, _, _ = exact_queries(corpus, frozenset(), pilot=0, seed=1, sources=["quran"], spans_per_passage=1,
                                  **dict(RULES, max_matches=6))
    assert sorted(len(q.positive_ids) for q in queries) == [1, 6]  # the refrain once (duplicates dropped)


def test_the_copy_rule_does_not_reject_exact_queries(small):
    root, passages = small
    queries, counts = generate(root, pilot=50, held_out=None)
    assert queries and counts["rejected_queries"] == {}  # the step checks each span against its passage
    by_id = {p.id: p for p in passages}
    q = queries[0]
    text = [by_id[q.positive_ids[0]].text]
    assert QueryValidator(max_copy_words=1).reason(q, text) is None
    assert QueryValidator(max_copy_words=1).reason(q.model_copy(update={"type": "question"}), text) == "copies_passage"


def test_no_span_at_all_is_a_clear_error_and_rules_are_checked(tmp_path):
    from m3tune.errors import UserError

    users = tmp_path / "corpus.jsonl"
    users.write_text(passage("quran:112:1", "قل هو الله احد").model_dump_json() + "\n", encoding="utf-8")
    root = open_root(str(tmp_path / "run"))
    run_step(root, "ingest", IngestConfig(sources=[], user_files=[str(users)]))
    with pytest.raises(UserError, match="no span of the 1 passages drawn passes the rules"):
        generate(root, held_out=None)
    assert not root.child("generate-exact").exists("queries.jsonl")  # nothing half-made published
    with pytest.raises(ValueError, match="max_words"):
        GenerateExactConfig(min_words=6, max_words=5)


# combine: the exact type balanced like the others, and the gold guard still catching a quote of a gold query.


def example(i: int, *, arabic: bool, qtype: str, quran: bool) -> dict:
    pos = [f"quran:{1 + i % 114}:{1 + i}" if quran else f"bukhari:{1 + i}"]
    words = ("صبر", "صلاه", "زكاه", "صيام", "حج", "رحمه", "توبه", "جنه") if arabic else (
        "patience", "prayer", "charity", "fasting", "pilgrimage", "mercy", "repentance", "paradise")
    query = " ".join(words[(i >> (3 * k)) % 8] for k in range(3)) + f" {i}"
    return {"query": query, "pos": [f"نص {p}" for p in pos], "neg": ["نص آخر"], "pos_ids": pos,
            "neg_ids": ["muslim:1"], "query_id": f"q{i}", "language": "ar" if arabic else "en", "type": qtype,
            "source": "quran" if quran else "hadith"}


def run_combine(tmp_path, rows, **config):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    root = open_root(str(tmp_path / "run"))
    config.setdefault("held_out", None)
    run_step(root, "combine", CombineConfig(mined=False, inputs=[str(path)], **config), force=True)
    out = root.child("combine")
    rows = [json.loads(line) for name in ("train.jsonl", "validation.jsonl")
            for line in out.read_bytes(name).splitlines()]
    return rows, json.loads(out.read_bytes("stats.json"))


def test_combine_balances_exact_queries(tmp_path):
    # 40% exact (all Arabic): far above the 15% target; the other shares balanceable.
    rows = []
    for i in range(2000):
        kind = "exact" if i % 5 < 2 else "conceptual" if i % 5 == 2 else "question"
        rows.append(example(i, arabic=kind == "exact" or i % 10 < 5, qtype=kind, quran=i % 3 == 0))
    out, stats = run_combine(tmp_path, rows)
    exact = sum(r["type"] == "exact" for r in out) / len(out)
    assert 0.10 <= exact <= 0.20 and len(out) > 500
    target = {t["name"]: t for t in stats["targets"]}["exact"]
    assert target["met"] and target["input_share"] == pytest.approx(0.4, abs=0.01)
    # another target moves the output with it
    out, _ = run_combine(tmp_path / "b", rows, exact_target=0.3)
    assert 0.25 <= sum(r["type"] == "exact" for r in out) / len(out) <= 0.35
    # data without a single exact quote (outside files) is not held to the target; null turns it off
    plain = [r for r in rows if r["type"] != "exact"]
    out, stats = run_combine(tmp_path / "c", plain)
    assert "exact" not in {t["name"] for t in stats["targets"]} and len(out) > 500
    out, stats = run_combine(tmp_path / "d", rows, exact_target=None, arabic_target=0.6)
    assert "exact" not in {t["name"] for t in stats["targets"]}


def test_a_training_span_quoting_a_gold_exact_query_is_caught(tmp_path):
    rows = [example(i, arabic=i % 2 == 0, qtype="exact" if i % 6 == 0 else "question", quran=i % 4 == 0)
            for i in range(400)]
    planted = [
        # exact-03 «لا يكلف الله نفسا إلا وسعها» inside a longer span of 2:286, as generate-exact draws it
        dict(example(9001, arabic=True, qtype="exact", quran=True), query="لا يكلف الله نفسا إلا وسعها لها ما كسبت",
             pos_ids=["quran:2:286"], pos=["نص"]),
        # exact-01 «إنما الأعمال بالنيات», word for word, from the body of bukhari:1
        dict(example(9002, arabic=True, qtype="exact", quran=False), query="إنما الأعمال بالنيات",
             pos_ids=["bukhari:1"], pos=["نص"]),
    ]
    out, stats = run_combine(tmp_path, rows + planted, exact_target=None, arabic_target=0.5, conceptual_target=0.0,
                             quran_target=0.25)
    queries = {normalize(r["query"]) for r in out}
    assert not queries & {normalize(p["query"]) for p in planted}
    kinds = stats["input"]["gold_query_leaks_by_kind"]
    assert stats["input"]["gold_query_leaks"] >= 2 and kinds["containment"] >= 1 and kinds["same"] >= 1
