"""The Arabic-analyzed BM25: what its analyzer makes of Arabic and English, and that it finds what the plain one misses."""

from __future__ import annotations

import pytest

from m3tune.evaluation.bm25 import BM25, arabic_query_terms, arabic_terms, english_terms
from m3tune.records import GoldQuery, Passage


def _passage(pid, text, en=None):
    from m3tune.arabic import normalize

    return Passage(id=pid, source="quran" if pid.startswith("quran:") else "hadith", collection="test", text=text,
                   text_plain=normalize(text), translation_en=en)


def _query(qid, text, language="ar"):
    return GoldQuery(id=qid, query=text, relevant_ids=["quran:1:1"], category="exact", language=language,
                     source="quran", difficulty="easy")


def test_clitic_forms_share_a_stem_and_stop_words_only_leave_the_single_words():
    with_clitics, bare = set(arabic_terms("وبالوالدين إحسانا")), set(arabic_terms("الوالدين"))
    assert not {t for t in with_clitics if t.startswith("w:")} & bare  # as words they differ...
    assert {t for t in with_clitics if t.startswith("s:")} & bare  # ...their stems meet
    terms = arabic_terms("لا تغضب")
    assert "w:تغضب" in terms and "w:لا" not in terms  # a stop-word is no single term
    assert "p:لا_تغضب" in terms  # but the quote keeps it as a phrase
    assert arabic_terms("إِنَّمَا الْأَعْمَالُ بِالنِّيَّاتِ") == arabic_terms("انما الاعمال بالنيات")  # marks do not count


def test_two_derivations_of_one_root_meet_only_through_the_root():
    # a tafsir paraphrase rewords a verse with other derivations of its roots: مكتوب for كاتب, يكتب
    written, writer = set(arabic_terms("مكتوب")), set(arabic_terms("كاتب"))
    assert written & writer == {"r:كتب"}  # not as words, not as Snowball stems
    passages = [_passage("quran:1:1", "وَلَا يَأْبَ كَاتِبٌ أَنْ يَكْتُبَ"), _passage("quran:1:2", "قال الرجل للنبي خيرا")]
    query = [_query("q", "المكتوب")]
    assert list(BM25(passages).rank(query, 10)["q"]) == ["quran:1:1"]
    assert BM25(passages, "plain").rank(query, 10)["q"] == {}


def test_english_terms_are_stemmed_without_stop_words():
    assert english_terms("The Mercies of the Lord") == english_terms("mercy lord")


def test_a_clitic_form_is_found_only_through_its_stem():
    passages = [_passage("quran:1:1", "وَبِالْوَالِدَيْنِ إِحْسَانًا"), _passage("quran:1:2", "قال الرجل للنبي خيرا")]
    query = [_query("q", "الوالدين")]
    assert list(BM25(passages).rank(query, 10)["q"]) == ["quran:1:1"]
    assert BM25(passages, "plain").rank(query, 10)["q"] == {}


def test_english_queries_search_the_translations_and_the_plain_one_returns_nothing():
    passages = [_passage("quran:1:1", "إن الله مع الصابرين", "Indeed, Allah is with the patient"),
                _passage("quran:1:2", "والله يحب المحسنين", "And Allah loves the doers of good"),
                _passage("bukhari:1", "إنما الأعمال بالنيات")]  # no translation: never an English hit
    query = [_query("q", "Allah is with those who are patient", language="en")]
    assert list(BM25(passages).rank(query, 10)["q"])[0] == "quran:1:1"
    assert "bukhari:1" not in BM25(passages).rank(query, 10)["q"]
    assert BM25(passages, "plain").rank(query, 10)["q"] == {}
    assert BM25(passages[2:]).rank(query, 10)["q"] == {}  # a corpus with no translation at all


def test_tafsir_boilerplate_leaves_a_query_words_stems_and_roots_but_not_its_pairs():
    terms = arabic_query_terms("قال سبحانه وتعالى الكتاب")
    assert "w:الكتاب" in terms and "p:سبحانه_وتعالي" in terms  # the phrase still matches a quote
    assert not {t for t in terms if t.startswith(("w:", "s:")) and t[2:] in ("سبحانه", "وتعالي", "تعالي")}
    assert [t for t in terms if t.startswith("r:")] == ["r:كتب"]  # no root of سبحانه or وتعالى either
    passages = [_passage("quran:1:1", "ذلك الكتاب لا ريب فيه"), _passage("quran:1:2", "سبحانه عما يشركون سبحانه"),
                _passage("quran:1:3", "والشمس وضحاها")]
    ranked = BM25(passages).rank([_query("q", "قال سبحانه الكتاب")], 10)["q"]
    assert list(ranked) == ["quran:1:1"]  # the honorific no longer pulls in the passage that repeats it


def test_an_unknown_analyzer_is_refused():
    with pytest.raises(ValueError, match="unknown BM25 analyzer"):
        BM25([], "stemmed")
