"""The lexical baselines: BM25 (bm25s) as a user tuning it for Arabic would run it, and the plain one.

    bm25        Arabic queries: every normalized word but stop-words, every pair of adjacent words (a quote
                matches as a phrase, function words included), and Snowball's Arabic stem of every word but
                stop-words (ال, ب, ل and suffix forms meet: الوالدين, بالوالدين, وبالوالدين; Snowball leaves
                a و or ف before ال on, so والكتاب does not yet meet الكتاب), three vocabularies side by side
                in one index.
                English queries: BM25 over the English translations (Quran verses only; a hadith has none),
                Snowball English stems, English stop-words.
    bm25-plain  the previous baseline: normalized words only, Arabic text only, so an English query gets
                an empty ranking.

Stemmer: PyStemmer (the Snowball algorithms, maintained, C); stop-words: stopwordsiso (the ISO lists),
both normalized as the text is. Snowball's Arabic stemmer reads letters m3tune.arabic.normalize would
fold (ة to ه looks like a suffix to it), so it stems the marks-stripped text and its stems are normalized
after. bm25s's defaults (k1 1.5, b 0.75) are kept: there is no development split to choose them on yet,
and choosing them on the gold would tune the baseline on the test.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache

from m3tune.records import GoldQuery, Passage

Run = dict[str, dict[str, float]]
_ENGLISH = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@lru_cache(maxsize=1)
def _arabic_tools():
    import Stemmer
    import stopwordsiso

    from m3tune.arabic import normalize

    return Stemmer.Stemmer("arabic"), frozenset(normalize(w) for w in stopwordsiso.stopwords("ar"))


@lru_cache(maxsize=1)
def _english_tools():
    import Stemmer
    import stopwordsiso

    return Stemmer.Stemmer("english"), frozenset(stopwordsiso.stopwords("en"))


@lru_cache(maxsize=200_000)
def _normalized_stem(stem: str) -> str:
    # a corpus has far fewer distinct stems than stem occurrences: normalizing each once halves the indexing
    from m3tune.arabic import normalize

    return normalize(stem)


def arabic_terms(text: str) -> list[str]:
    """The strong analyzer's terms of Arabic TEXT: words (w:), adjacent pairs (p:), stems (s:)."""
    from m3tune.arabic import _TOKEN, strip_marks, tokens

    stemmer, stop = _arabic_tools()
    words = tokens(text)
    stems = [_normalized_stem(s) for s in stemmer.stemWords(_TOKEN.findall(strip_marks(text)))]
    return ([f"w:{w}" for w in words if w not in stop] + [f"p:{a}_{b}" for a, b in zip(words, words[1:])]
            + [f"s:{s}" for s in stems if s and s not in stop])


def english_terms(text: str) -> list[str]:
    stemmer, stop = _english_tools()
    return stemmer.stemWords([w for w in _ENGLISH.findall(text.lower()) if w not in stop])


def plain_terms(text: str) -> list[str]:
    from m3tune.arabic import tokens

    return tokens(text)


class _Index:
    """One bm25s index over DOCS (id, text) with ANALYZE as its tokenizer (none when DOCS is empty)."""

    def __init__(self, docs: Sequence[tuple[str, str]], analyze: Callable[[str], list[str]]):
        import bm25s

        self.ids, self.analyze, self.retriever = [d for d, _ in docs], analyze, None
        terms = [analyze(text) for _, text in docs]
        if any(terms):  # bm25s cannot index nothing (a corpus without translations has no English index)
            self.retriever = bm25s.BM25()
            self.retriever.index(terms, show_progress=False)

    def rank(self, query: str, k: int) -> dict[str, float]:
        if self.retriever is None:
            return {}
        vocab = self.retriever.vocab_dict
        terms = [t for t in self.analyze(query) if t in vocab]
        if not terms:
            return {}
        found, scores = self.retriever.retrieve([terms], k=min(k, len(self.ids)), show_progress=False)
        return {self.ids[j]: float(s) for j, s in zip(found[0], scores[0]) if s > 0}


class BM25:
    """BM25 over PASSAGES, built once per corpus; ANALYZER strong ("arabic", the `bm25` model) or "plain"."""

    def __init__(self, passages: Sequence[Passage], analyzer: str = "arabic"):
        if analyzer not in ("arabic", "plain"):
            raise ValueError(f"unknown BM25 analyzer {analyzer!r}")
        self.analyzer = analyzer
        if analyzer == "plain":
            self.arabic = _Index([(p.id, p.text_plain) for p in passages], plain_terms)
            self.english = None
        else:
            self.arabic = _Index([(p.id, p.text) for p in passages], arabic_terms)
            self.english = _Index([(p.id, p.translation_en) for p in passages if p.translation_en], english_terms)

    def rank(self, queries: Sequence[GoldQuery], k: int) -> Run:
        """Each query's top K: English ones over the translations (strong analyzer), the rest over Arabic."""
        return {q.id: (self.english if self.english is not None and q.language == "en" else self.arabic)
                .rank(q.query, k) for q in queries}
