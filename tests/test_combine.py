"""combine: balanced shares, grouped split, gold leakage guard, clear errors, determinism."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m3tune.arabic import normalize
from m3tune.combine.step import CombineConfig
from m3tune.errors import UserError
from m3tune.executor import run_step
from m3tune.runroot import open_root

AR_WORDS = ["الصلاة", "الزكاة", "الصيام", "الحج", "الصبر", "الرحمة", "التوبة", "الجنة", "النار", "العلم",
            "الصدق", "الوالدين", "اليتيم", "الجهاد", "الدعاء", "الذكر"]
EN_WORDS = ["prayer", "charity", "fasting", "pilgrimage", "patience", "mercy", "repentance", "paradise", "fire",
            "knowledge", "truth", "parents", "orphan", "striving", "supplication", "remembrance"]


def example(i: int, *, arabic: bool, conceptual: bool, quran: bool, pos: list[str] | None = None) -> dict:
    words = AR_WORDS if arabic else EN_WORDS
    query = " ".join(words[(i >> (4 * k)) % 16] for k in range(3)) + f" {'سؤال' if arabic else 'question'} {i}"
    pos_ids = pos or [f"quran:{1 + i % 114}:{1 + i}" if quran else f"bukhari:{1 + i}"]
    return {"query": query, "pos": [f"نص {p}" for p in pos_ids], "neg": ["نص آخر"], "pos_ids": pos_ids,
            "neg_ids": ["muslim:1"], "query_id": f"q{i}", "language": "ar" if arabic else "en",
            "type": "conceptual" if conceptual else "question", "source": "quran" if quran else "hadith"}


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def combine(root, **config):
    # The synthetic ids are arbitrary: the held-out partition (tested in test_leakage.py) is off unless given.
    config.setdefault("held_out", None)
    manifest, _ = run_step(root, "combine", CombineConfig(mined=False, **config), force=True)
    out = root.child("combine")
    read = lambda name: [json.loads(line) for line in out.read_bytes(name).splitlines()]  # noqa: E731
    return manifest, read("train.jsonl"), read("validation.jsonl"), json.loads(out.read_bytes("stats.json"))


def share(rows, test) -> float:
    return sum(1 for r in rows if test(r)) / len(rows)


SHARES = {"arabic": lambda r: r["language"] == "ar", "conceptual": lambda r: r["type"] == "conceptual",
          "quran": lambda r: r["source"] == "quran"}


def mixed(n: int, seed: int = 0) -> list[dict]:
    """N examples, 80% Arabic, 10% conceptual, 60% Quran: far from the targets, but balanceable."""
    return [example(i, arabic=(i * 7 + seed) % 10 < 8, conceptual=(i * 3 + seed) % 10 == 0,
                    quran=(i * 9 + seed) % 10 < 6) for i in range(n)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(core=st.integers(20, 60), extra=st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), max_size=80),
       seed=st.integers(0, 10_000), split=st.sampled_from([0.0, 0.05, 0.2]))
def test_shares_are_within_tolerance_whenever_the_input_allows(tmp_path_factory, core, extra, seed, split):
    # A core that meets the targets exactly (50% Arabic, 20% conceptual, 25% Quran, independently spread)
    # proves the input balanceable; random extra rows on top may push the input shares anywhere.
    rows = []
    for i in range(core * 20):  # 20 = lcm of 2, 5, 4: every share exact
        rows.append(example(i, arabic=i % 2 == 0, conceptual=i % 5 == 0, quran=i % 4 == 1))
    for j, (a, c, q) in enumerate(extra):
        rows.append(example(100_000 + j, arabic=a, conceptual=c, quran=q))
    tmp = tmp_path_factory.mktemp("prop")
    root = open_root(str(tmp / "run"))
    _, train, validation, stats = combine(root, inputs=[write(tmp / "in.jsonl", rows)], seed=seed,
                                          validation_split=split)
    out = train + validation
    assert len(out) >= core * 20 * 0.8  # the largest output: at least most of the balanced core
    for name, test in SHARES.items():
        target = {"arabic": 0.5, "conceptual": 0.2, "quran": 0.25}[name]
        assert abs(share(out, test) - target) <= 0.05 + 1e-9, name
        assert abs(share(train, test) - target) <= 0.05 + 1e-9, name
    assert all(t["met"] for t in stats["targets"])
    # grouped split: no positive, no query on both sides
    assert not {p for r in train for p in r["pos_ids"]} & {p for r in validation for p in r["pos_ids"]}
    assert not {normalize(r["query"]) for r in train} & {normalize(r["query"]) for r in validation}
    if split:
        assert validation, "a split was asked for and the groups are small"


def test_same_seed_same_bytes_and_another_seed_another_sample(tmp_path):
    path = write(tmp_path / "in.jsonl", mixed(3000))
    outputs = []
    for run, seed in (("a", 7), ("b", 7), ("c", 8)):
        root = open_root(str(tmp_path / run))
        combine(root, inputs=[path], seed=seed)
        outputs.append(tuple(root.child("combine").read_bytes(n) for n in ("train.jsonl", "validation.jsonl",
                                                                            "stats.json")))
    assert outputs[0] == outputs[1]
    assert outputs[0][0] != outputs[2][0]


def test_duplicates_are_dropped_and_gold_queries_never_leak(tmp_path):
    rows = mixed(1000)
    dupes = [dict(r, query=r["query"] + "  ") for r in rows[:50]]  # same normalized query + positives
    gold = [{"id": f"g{i}", "query": rows[i]["query"], "relevant_ids": ["quran:2:255"], "category": "exact",
             "language": rows[i]["language"], "source": "quran", "difficulty": "easy"} for i in range(100, 140)]
    # a near-duplicate of a gold query: one more word (token Jaccard 5/6)
    near = dict(rows[200], query=rows[100]["query"] + " الكريم")
    leak_passage = example(5000, arabic=True, conceptual=False, quran=True, pos=["quran:2:255"])
    path = write(tmp_path / "in.jsonl", rows + dupes + [near, leak_passage])
    gold_path = write(tmp_path / "gold.jsonl", gold)
    # The synthetic queries differ by a number only, so containment and trigrams would call most of them
    # leaks of each other: this test is about same, overlap and passages (planted kinds: test_leakage.py).
    manifest, train, validation, stats = combine(open_root(str(tmp_path / "r")), inputs=[path],
                                                 exclude_gold=[gold_path], exclude_gold_passages=True,
                                                 exclude_packaged_gold=False, gold_containment=1.0,
                                                 gold_char_ngram=1.0)
    out = train + validation
    gold_texts = {normalize(g["query"]) for g in gold}
    assert not gold_texts & {normalize(r["query"]) for r in out}
    assert normalize(near["query"]) not in {normalize(r["query"]) for r in out}
    assert all("quran:2:255" not in r["pos_ids"] for r in out)
    assert stats["input"]["gold_query_leaks"] == 40 + 1  # the 40 gold queries and the near-duplicate
    assert stats["input"]["duplicates"] == 50
    assert stats["input"]["gold_passage_leaks"] == 1
    assert len({(normalize(r["query"]), tuple(r["pos_ids"])) for r in out}) == len(out)
    assert manifest.counts["gold_query_leaks"] == stats["input"]["gold_query_leaks"]


def test_an_input_too_small_for_the_targets_says_what_is_missing(tmp_path):
    # 200 Arabic examples and 20 English ones: at most 20 / 0.55 ~ 36 rows can be 50% ± 5% Arabic
    rows = [example(i, arabic=i >= 20, conceptual=i % 5 == 0, quran=i % 4 == 0) for i in range(220)]
    path = write(tmp_path / "in.jsonl", rows)
    with pytest.raises(UserError) as e:
        combine(open_root(str(tmp_path / "r")), inputs=[path], min_examples=100)
    message = str(e.value)  # English is what runs out: every English example is used
    assert message.startswith("only ") and "need 100" in message and "English" in message
    assert "Arabic" not in message.split("let the output grow:")[1]
    assert not open_root(str(tmp_path / "r")).child("combine").exists("train.jsonl")  # nothing skewed published
    only_arabic = write(tmp_path / "ar.jsonl", [example(i, arabic=True, conceptual=i % 5 == 0, quran=i % 4 == 0)
                                                for i in range(100)])
    with pytest.raises(UserError, match="no output meets the targets.*100.0% arabic.*not arabic"):
        combine(open_root(str(tmp_path / "r2")), inputs=[only_arabic])


def test_malformed_input_names_file_line_and_field(tmp_path):
    rows = [json.dumps(r, ensure_ascii=False) for r in mixed(40)]
    rows[6] = json.dumps({"query": "ما هو الصبر", "pos": []})  # line 7: no positive
    rows[9] = "{not json"
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl:7: field 'pos'"):
        combine(open_root(str(tmp_path / "r")), inputs=[str(path)], arabic_target=0.8, conceptual_target=0.1,
                quran_target=0.6)
    root = open_root(str(tmp_path / "r2"))
    manifest, train, validation, stats = combine(root, inputs=[str(path)], skip_invalid=True, arabic_target=0.8,
                                                 conceptual_target=0.1, quran_target=0.6, validation_split=0)
    assert stats["input"]["invalid"] == 2 and len(train) == 38
    rejects = [json.loads(line) for line in root.child("combine").read_bytes("rejects.jsonl").splitlines()]
    assert [r["line"] for r in rejects] == [7, 10]


def test_flagembedding_rows_without_metadata_are_inferred(tmp_path):
    # FlagEmbedding's own format: query, pos, neg only
    rows = [{"query": r["query"], "pos": r["pos"], "neg": r["neg"]} for r in mixed(200)]
    _, train, validation, stats = combine(open_root(str(tmp_path / "r")), inputs=[write(tmp_path / "fe.jsonl", rows)],
                                          conceptual_target=0.0, quran_target=0.0, validation_split=0.1)
    assert {r["language"] for r in train} == {"ar", "en"}
    assert stats["targets"][0]["met"] and abs(share(train + validation, SHARES["arabic"]) - 0.5) <= 0.05
    # grouped by positive text when there are no ids
    assert not {t for r in train for t in r["pos"]} & {t for r in validation for t in r["pos"]}


def test_in_the_pipeline_combine_feeds_analyze(full_run):
    from m3tune.manifest import read_manifest

    root, ran = full_run
    assert ran.index("mine-negatives") < ran.index("combine") < ran.index("analyze")
    stats = json.loads(root.child("combine").read_bytes("stats.json"))
    assert all(t["met"] for t in stats["targets"])
    assert read_manifest(root.child("analyze")).inputs  # analyze read combine's output
    report = json.loads(root.child("analyze").read_bytes("report.json"))
    assert report["input"] == "combine/train.jsonl" and report["ok"]
    # the packaged gold set (the evaluate step's test set) is kept out by default
    from m3tune.evaluation.gold import load_gold

    gold = {normalize(g.query) for g in load_gold(None)}
    out = [json.loads(line) for name in ("train.jsonl", "validation.jsonl")
           for line in root.child("combine").read_bytes(name).splitlines()]
    assert out and not gold & {normalize(r["query"]) for r in out}


def test_an_empty_source_is_skipped_and_an_impossible_split_is_a_clear_error(tmp_path):
    from m3tune.errors import BadInput

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rows = write(tmp_path / "in.jsonl", mixed(400))
    _, train, validation, _ = combine(open_root(str(tmp_path / "r")), inputs=[str(empty), rows])
    assert train and validation
    # every example shares one positive: one group, which validation cannot take without taking everything
    one_group = [example(i, arabic=i % 2 == 0, conceptual=i % 5 == 0, quran=i % 4 == 0, pos=["quran:2:255"])
                 for i in range(200)]
    with pytest.raises(BadInput, match="no validation split possible"):
        combine(open_root(str(tmp_path / "r2")), inputs=[write(tmp_path / "one.jsonl", one_group)],
                exclude_packaged_gold=False)
    assert not open_root(str(tmp_path / "r2")).child("combine").exists("train.jsonl")


def test_ids_not_in_the_run_s_corpus_are_an_error_naming_file_line_and_field(full_ingest, tmp_path):
    from m3tune.corpus.passages import read_passages
    from m3tune.jsonl import RecordError

    src, _ = full_ingest
    root = open_root(str(tmp_path / "run"))
    for name in src.child("ingest").list():  # this run's corpus: the full ingest, as published
        root.child("ingest").write_bytes(name, src.child("ingest").read_bytes(name))
    known = {p.id for p in read_passages(src)}
    rows = [example(i, arabic=i % 2 == 0, conceptual=i % 5 == 0, quran=i % 4 == 1,
                    pos=[f"quran:2:{2 + i % 280}" if i % 4 == 1 else f"bukhari:{i}"]) for i in range(1, 400)]
    rows = [dict(r, neg_ids=["quran:3:5"]) for r in rows]
    assert all(set(r["pos_ids"] + r["neg_ids"]) <= known for r in rows)
    rows[1] = dict(rows[1], neg_ids=["muslim:99999"])  # line 2: a negative the corpus does not have
    path = write(tmp_path / "in.jsonl", rows)
    with pytest.raises(RecordError, match=r"in.jsonl:2: field 'neg_ids': muslim:99999 is not in the run's corpus"):
        combine(root, inputs=[path], min_examples=1, arabic_target=0.5, conceptual_target=0.2, quran_target=0.25,
                tolerance=0.5, validation_split=0.0)
    _, train, _, stats = combine(root, inputs=[path], skip_invalid=True, tolerance=0.5, validation_split=0.0)
    assert stats["input"]["invalid"] >= 1 and all("muslim:99999" not in r["neg_ids"] for r in train)
    rejects = [json.loads(line) for line in root.child("combine").read_bytes("rejects.jsonl").splitlines()]
    assert {"line": 2, "field": "neg_ids"}.items() <= next(r for r in rejects if r["line"] == 2).items()
