"""Near-duplicate groups (m3tune.corpus.neardup): a hadith body under two chains, a verse quoted in a hadith,
word-for-word twins; the Jaccard filter on bodies without the chain; the published file is checked."""

from __future__ import annotations

import pytest

from m3tune.arabic import normalize, tokens
from m3tune.corpus.neardup import MIN_VERSE_WORDS, NearDuplicates, body, compute_groups, group_counts
from m3tune.mining.filters import FalseNegativeFilter
from m3tune.records import Passage

VERSE = "إِنَّ اللَّهَ يَأْمُرُ بِالْعَدْلِ وَالْإِحْسَانِ وَإِيتَاءِ ذِي الْقُرْبَى"
CHAIN_A = "حَدَّثَنَا عَبْدُ اللَّهِ بْنُ يُوسُفَ، قَالَ أَخْبَرَنَا مَالِكٌ، عَنْ نَافِعٍ، عَنِ ابْنِ عُمَرَ، أَنَّ رَسُولَ اللَّهِ صلى الله عليه وسلم قَالَ"
CHAIN_B = "حَدَّثَنَا قُتَيْبَةُ بْنُ سَعِيدٍ، حَدَّثَنَا لَيْثٌ، عَنْ سَعِيدٍ، عَنْ أَبِي هُرَيْرَةَ، عَنِ النَّبِيِّ صلى الله عليه وسلم قَالَ"
BODY = "الْمُسْلِمُ مَنْ سَلِمَ الْمُسْلِمُونَ مِنْ لِسَانِهِ وَيَدِهِ وَالْمُهَاجِرُ مَنْ هَجَرَ مَا نَهَى اللَّهُ عَنْهُ"
OTHER = "إِذَا قَامَ أَحَدُكُمْ إِلَى الصَّلاَةِ فَلْيَسْتَقْبِلِ الْقِبْلَةَ ثُمَّ لْيُكَبِّرْ وَلْيَقْرَأْ مَا تَيَسَّرَ مَعَهُ"


def passage(pid: str, text: str) -> Passage:
    source = "quran" if pid.startswith("quran:") else "hadith"
    return Passage(id=pid, source=source, collection=pid.split(":")[0], text=text, text_plain=normalize(text))


def corpus() -> list[Passage]:
    return [
        passage("quran:16:90", VERSE),
        passage("quran:1:2", "الْحَمْدُ لِلَّهِ رَبِّ الْعَالَمِينَ"),  # 4 words: a phrase, not a quotation
        passage("bukhari:10", f'{CHAIN_A} "{BODY}"'),
        passage("muslim:40", f'{CHAIN_B} "{BODY}"'),  # the same body, another chain
        passage("bukhari:11", f'{CHAIN_A} "{OTHER}"'),  # the same chain, another body
        passage("bukhari:12", f'{CHAIN_B} قَرَأَ رَسُولُ اللَّهِ {VERSE} ثُمَّ سَكَتَ'),  # quotes the verse
        passage("bukhari:13", f'{CHAIN_B} قَالَ الْحَمْدُ لِلَّهِ رَبِّ الْعَالَمِينَ فِي كُلِّ حَالٍ وَبَعْدُ'),
        passage("muslim:41", f'{CHAIN_A} "{OTHER}"'),  # word for word bukhari:11
    ]


def test_the_same_body_under_two_chains_is_grouped():
    groups = compute_groups(corpus())
    assert {"kind": "matn", "ids": ["bukhari:10", "muslim:40"]} in groups
    assert body(corpus()[2]) == body(corpus()[3]) == normalize(BODY)


def test_a_verse_quoted_inside_a_hadith_is_a_near_duplicate():
    groups = compute_groups(corpus())
    assert {"kind": "verse_quote", "ids": ["quran:16:90", "bukhari:12"]} in groups
    # a verse shorter than MIN_VERSE_WORDS is a common phrase: no group, though bukhari:13 contains it
    assert len("الحمد لله رب العالمين".split()) < MIN_VERSE_WORDS
    assert not any("quran:1:2" in g["ids"] for g in groups)
    near = NearDuplicates(groups)
    assert near.related("bukhari:12") == ["bukhari:12", "quran:16:90"]


def test_word_for_word_twins_and_counts_by_kind():
    groups = compute_groups(corpus())
    twin = [g for g in groups if g["kind"] == "twin"]
    assert twin == [{"kind": "twin", "ids": ["bukhari:11", "muslim:41"]}]
    # bukhari:11 and muslim:41 have the same body too, but they are one twin group already: no matn duplicate
    assert not any(g["kind"] == "matn" and "bukhari:11" in g["ids"] for g in groups)
    assert group_counts(groups) == {"twin": {"groups": 1, "members": 2}, "matn": {"groups": 1, "members": 2},
                                    "verse_quote": {"groups": 1, "members": 2}}
    assert compute_groups(list(reversed(corpus()))) != [] and compute_groups(corpus()) == groups  # deterministic


def test_the_jaccard_rule_compares_bodies_without_the_chain():
    by_id = {p.id: p for p in corpus()}
    rule = FalseNegativeFilter(threshold=10.0, jaccard=0.6, tokens=lambda pid: frozenset(tokens(body(by_id[pid]))))
    positive = [rule.tokens("bukhari:10")]
    # same chain, unrelated body: a fine negative; on full texts the long shared chain made it look like a copy
    assert rule.reason("bukhari:11", 0.0, {"bukhari:10"}, positive, 1.0) is None
    full = lambda pid: frozenset(tokens(by_id[pid].text_plain))  # noqa: E731
    from m3tune.mining.filters import jaccard
    assert jaccard(full("bukhari:10"), full("bukhari:11")) > jaccard(rule.tokens("bukhari:10"), rule.tokens("bukhari:11"))
    # the same body under another chain is caught
    assert rule.reason("muslim:40", 0.0, {"bukhari:10"}, positive, 1.0) == "jaccard"


def test_ingest_publishes_groups_and_a_bad_groups_file_is_refused(tmp_path):
    from m3tune.corpus.ingest import IngestConfig
    from m3tune.corpus.neardup import read_groups
    from m3tune.errors import UserError
    from m3tune.executor import run_step
    from m3tune.runroot import open_root

    user = tmp_path / "p.jsonl"
    import json

    user.write_text("".join(json.dumps({"id": p.id, "source": p.source, "text": p.text}, ensure_ascii=False) + "\n"
                            for p in corpus()), encoding="utf-8")
    root = open_root(str(tmp_path / "run"))
    manifest, _ = run_step(root, "ingest", IngestConfig(sources=[], user_files=[str(user)]))
    assert manifest.counts["near_duplicates"]["verse_quote"] == {"groups": 1, "members": 2}
    near = read_groups(root)
    assert near.closure(["bukhari:10"]) == {"bukhari:10", "muslim:40"}
    # a tampered or foreign groups file is not trusted: the integrity check or the content check refuses it
    folder = root.child("ingest")
    folder.write_bytes("groups.jsonl", b'{"kind": "twin", "ids": ["bukhari:10", "nowhere:1"]}\n')
    from m3tune.corpus import neardup

    neardup._READ.clear()
    with pytest.raises(UserError):
        read_groups(root)
