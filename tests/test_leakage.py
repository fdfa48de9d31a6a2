"""What keeps the test set out of training: the held-out partition and the leakage guard's every kind."""

from __future__ import annotations

import json

import pytest

from m3tune.combine.leakage import GoldGuard
from m3tune.combine.step import CombineConfig
from m3tune.corpus import heldout
from m3tune.executor import run_step
from m3tune.records import GoldQuery
from m3tune.runroot import open_root


def gold(i: str, query: str, relevant: list[str], language: str = "ar") -> GoldQuery:
    return GoldQuery(id=i, query=query, relevant_ids=relevant, category="exact", language=language,
                     source="quran", difficulty="easy")


GOLD = [
    gold("g-same", "إنما الأعمال بالنيات", ["bukhari:1"]),
    gold("g-overlap", "فضل الصبر على البلاء والمصائب في الدنيا", ["quran:2:155"]),
    gold("g-contained", "تحريم الربا في القرآن", ["quran:2:275"]),
    gold("g-grams", "الصبر والصلاة", ["quran:2:45"]),
    gold("g-english", "Allah does not charge a soul except with that within its capacity", ["quran:2:286"], "en"),
]
TEXTS = {"quran:2:286": ("لا يكلف الله نفسا الا وسعها لها ما كسبت وعليها ما اكتسبت",
                         "Allah does not charge a soul except [with that within] its capacity.")}
PLANTED = {  # a training query of each kind, and the gold query it leaks
    "same": ("إنَّما الأعمالُ بالنيّات", None, "g-same"),  # marks and hamza forms: the same normalized text
    "overlap": ("فضل الصبر على البلاء والمصائب في الحياة الدنيا", None, "g-overlap"),  # Jaccard 7/8
    "containment": ("تحريم الربا", None, "g-contained"),  # the example: Jaccard 0.5, contained 100%
    "char_ngram": ("والصبر والصلاة", None, "g-grams"),  # a clitic more: tokens 1 of 3 shared, trigrams 11 of 12
    "cross_language": ("لا يكلف الله نفسا الا وسعها", ["quran:2:286"], "g-english"),  # the verse, quoted in Arabic
}
CLEAN = [  # near the gold queries, but not them
    ("الأعمال الصالحة في رمضان", None),
    ("آيات عن الصبر", None),
    ("ما حكم البيع بالتقسيط", None),
    ("هل يحاسب الإنسان على ما لا يطيق", ["quran:2:286"]),  # shares the positive, not the words: a paraphrase
    ("charity in secret", ["quran:2:271"]),
]


def test_every_planted_leak_kind_is_caught_and_named():
    guard = GoldGuard(GOLD, overlap=0.8, exclude_passages=False, texts=TEXTS)
    for kind, (query, pos, gid) in PLANTED.items():
        assert guard.query_leak(query, pos) == (kind, gid), kind
    for query, pos in CLEAN:
        assert guard.query_leak(query, pos) is None, query


def test_cross_language_needs_the_texts_and_a_shared_positive():
    query, pos, _ = PLANTED["cross_language"]
    assert GoldGuard(GOLD, overlap=0.8, exclude_passages=False, texts=None).query_leak(query, pos) is None
    guard = GoldGuard(GOLD, overlap=0.8, exclude_passages=False, texts=TEXTS)
    assert guard.query_leak(query, ["quran:2:285"]) is None  # same words, another passage: not this gold query


def test_the_trigram_prefix_filter_finds_every_pair_a_full_comparison_finds():
    """The index holds only each gold query's rarest trigrams; check it against comparing with every one."""
    import random

    from m3tune.combine.leakage import trigrams

    words = ["الصبر", "والصبر", "الصلاة", "بالصلاة", "الزكاة", "الصيام", "وللصيام", "الحج", "فالحج", "العلم"]
    rng = random.Random(3)
    golds = [gold(f"g{i}", " ".join(rng.sample(words, rng.randint(1, 4))), ["quran:1:1"]) for i in range(60)]
    guard = GoldGuard(golds, overlap=1.01, exclude_passages=False, containment=1.01, char_ngram=0.7)
    for _ in range(300):
        query = " ".join(rng.sample(words, rng.randint(1, 4)))
        grams = trigrams(query)
        full = any(len(grams & trigrams(g.query)) / len(grams | trigrams(g.query)) >= 0.7 for g in golds
                   if g.query != query)
        found = guard.query_leak(query)
        assert (found is not None) == (full or query in {g.query for g in golds}), query


def _example(query: str, pos: list[str], neg: list[str]) -> dict:
    return {"query": query, "pos": [f"نص {p}" for p in pos], "neg": [f"نص {n}" for n in neg], "pos_ids": pos,
            "neg_ids": neg, "language": "ar", "type": "question", "source": "quran"}


def test_combine_counts_each_kind_and_removes_the_held_out_partition(tmp_path):
    held = sorted(heldout.load())
    partition = set(held)
    quran_held = [p for p in held if p.startswith("quran:12:")]
    free = [f"quran:{s}:{a}" for s in (2, 3, 4) for a in range(2, 200) if f"quran:{s}:{a}" not in partition]
    rows = [_example(f"سؤال رقم {i} عن الآية", [free[i]], [free[300], quran_held[i % 5]]) for i in range(199)]
    rows += [_example(f"قصة يوسف {i}", [quran_held[i]], [free[301]]) for i in range(10)]  # positives held out
    rows += [_example(f"سؤالان {i}", [free[310 + i], quran_held[20 + i]], []) for i in range(5)]  # one of two
    rows += [_example(q, pos or [free[320]], []) for q, pos, _ in PLANTED.values()]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    gold_file = tmp_path / "gold.jsonl"
    gold_file.write_text("".join(g.model_dump_json() + "\n" for g in GOLD), encoding="utf-8")
    root = open_root(str(tmp_path / "run"))
    config = CombineConfig(mined=False, inputs=[str(src)], exclude_gold=[str(gold_file)], exclude_packaged_gold=False,
                           arabic_target=1.0, conceptual_target=0.0, quran_target=1.0, validation_split=0.1)
    manifest, _ = run_step(root, "combine", config, force=True)
    stats = json.loads(root.child("combine").read_bytes("stats.json"))["input"]
    # no ingest in this run: the cross-language kind cannot be checked, and the stats say so
    assert stats["cross_language_checked"] is False and "cross_language" not in stats["gold_query_leaks_by_kind"]
    assert stats["gold_query_leaks_by_kind"] == {"same": 1, "overlap": 1, "containment": 1, "char_ngram": 1}
    assert stats["held_out"]["examples"] == 10 and stats["held_out"]["positives"] == 15
    assert stats["held_out"]["negatives"] == 199
    out = [json.loads(line) for name in ("train.jsonl", "validation.jsonl")
           for line in root.child("combine").read_bytes(name).splitlines()]
    assert len(out) == 199 + 5 + 1  # the cross-language query stays: nothing to check it with
    for r in out:
        assert partition.isdisjoint(r["pos_ids"] + r["neg_ids"]), r["query"]
        assert len(r["pos"]) == len(r["pos_ids"]) and len(r["neg"]) == len(r["neg_ids"])  # kept parallel
    assert manifest.counts["held_out_examples"] == 10


def test_the_held_out_partition_never_reaches_train_or_validation(full_run):
    """The demo pipeline on the packaged corpus: every id of train and validation checked."""
    from m3tune.corpus.neardup import read_groups

    root, _ = full_run
    # the packaged list, widened by ingest's near-duplicate groups (a body under another chain, a quoted verse)
    listed = heldout.load()
    partition = read_groups(root).closure(listed)
    folder = root.child("combine")
    seen = 0
    for name in ("train.jsonl", "validation.jsonl"):
        for line in folder.read_bytes(name).splitlines():
            r = json.loads(line)
            ids = (r.get("pos_ids") or []) + (r.get("neg_ids") or [])
            assert ids and partition.isdisjoint(ids), r["query"]
            assert not {heldout.split_of(i) for i in ids} - {None}, r["query"]  # neither dev nor test
            seen += len(ids)
    stats = json.loads(folder.read_bytes("stats.json"))["input"]
    assert seen > 100 and stats["held_out"]["passages"] == len(partition)
    assert stats["held_out"]["near_duplicates_added"] == len(partition) - len(listed) > 0
    # the demo's generators do draw from the partition: combine is what keeps it out
    assert stats["held_out"]["examples"] + stats["held_out"]["examples_trimmed"] > 0
    assert stats["cross_language_checked"] is True


def test_the_packaged_partition_is_what_its_definition_computes(full_ingest):
    from m3tune.corpus.passages import read_passages

    root, _ = full_ingest
    passages = read_passages(root)
    ids = heldout.resolve(passages)
    assert frozenset(ids) == heldout.load()
    share = len(ids) / len(passages)
    assert 0.08 < share < 0.11, share  # "about 9%", as the module documents
    units = {p.id for p in passages if heldout.in_units(p)}
    assert units < set(ids)  # twins join their units: quran:2:1 (الم) is 3:1's twin, and so on
    assert {"quran:12:4", "quran:18:10", "bukhari:5678", "muslim:5385"} <= units
    # its two parts: held-out-test by whole surahs and books with their near-duplicates, the rest held-out-dev
    test = heldout.resolve_test(passages, heldout.load())
    assert frozenset(test) == heldout.load_test() < heldout.load()
    assert {"quran:12:4", "quran:36:1", "bukhari:5373", "muslim:5274"} <= set(test)
    assert {"quran:19:16", "quran:27:18", "quran:31:13", "bukhari:5678"}.isdisjoint(test)
    assert {heldout.split_of(i) for i in ("quran:12:4", "quran:19:16", "quran:1:1")} == {
        heldout.TEST, heldout.DEV, None}


def test_a_bad_held_out_list_names_file_and_line(tmp_path):
    from m3tune.errors import UserError

    path = tmp_path / "held.txt"
    path.write_text("# mine\nquran:1:1\nnot an id\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"held.txt:3: expected one passage id"):
        heldout.load(str(path))
    with pytest.raises(UserError, match="held-out list not found"):
        heldout.load(str(tmp_path / "absent.txt"))


def test_held_out_themes_are_never_generated_and_the_gold_s_held_out_topics_use_them():
    from m3tune.gold.build import HELD_THEMATIC
    from m3tune.generation.offline import load_themes

    _, generated = load_themes()
    _, every = load_themes(held_out=True)
    held = {t.id for t in every if t.held_out}
    assert len(held) >= 8 and not held & {t.id for t in generated}
    assert {e.theme for e in HELD_THEMATIC} <= held
