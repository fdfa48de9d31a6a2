"""The lexical baselines: BM25 (bm25s) as a user tuning it for Arabic would run it, and the plain one.

    bm25        Arabic queries: every normalized word but stop-words, every pair of adjacent words (a quote
                matches as a phrase, function words included), and Snowball's Arabic stem of every word but
                stop-words (ال, ب, ل and suffix forms meet: الوالدين, بالوالدين, وبالوالدين; Snowball leaves
                a و or ف before ال on, so والكتاب meets الكتاب only through their root),
                and ISRI's root of every word but stop-words (nltk's ISRIStemmer: يكتبون, الكتاب, مكتوب,
                كاتب all give كتب), so a tafsir paraphrase that rewords a verse with other derivations of
                its roots still meets it; four vocabularies side by side in one index. A query's words,
                stems and roots also drop tafsir boilerplate (QUERY_STOP: the honorifics and vocatives a
                tafsir clause wraps around its paraphrase), never its pairs.
                English queries: BM25 over the English translations (Quran verses only; a hadith has none),
                Snowball English stems, English stop-words.
    bm25-plain  the previous baseline: normalized words only, Arabic text only, so an English query gets
                an empty ranking.

Stemmer: PyStemmer (the Snowball algorithms, maintained, C); roots: nltk's ISRI stemmer; stop-words:
stopwordsiso (the ISO lists), all normalized as the text is. The Snowball and ISRI stemmers read letters
m3tune.arabic.normalize would fold (ة to ه looks like a suffix to them), so they stem the marks-stripped
words and their output is normalized after (ISRI's roots of the normalized words measured worse on the
development paraphrases).

k1 and b were chosen on the development queries (`data/gold_dev_v3.jsonl`: rule-built queries from
passages no test query uses), never on the test set, by `benchmarks/tune_bm25.py`: the Arabic index's
(K1, B) on the Arabic development queries, the English index's (EN_K1, EN_B) on the English ones, as
each index only ever ranks its own language's queries. The grids and figures are in docs/benchmarks.md.
bm25-plain keeps bm25s's defaults (k1 1.5, b 0.75): it is the untuned baseline the strong one is
measured against.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache

from m3tune.records import GoldQuery, Passage

Run = dict[str, dict[str, float]]
DEFAULT_K1, DEFAULT_B = 1.5, 0.75  # bm25s's
# The strong analyzer's, each index's chosen on its own language's development queries (docs/benchmarks.md):
# the Arabic grid's best is bm25s's defaults; the English translations (short, one verse each) want less.
K1, B = 1.5, 0.75
EN_K1, EN_B = 0.3, 0.5
_ENGLISH = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Tafsir boilerplate: al-Muyassar wraps its paraphrases in "سبحانه وتعالى", "صلى الله عليه وسلم", "يا أيها"; as
# query words they match the many passages that say them rather than the verse paraphrased. Chosen on the
# development queries (docs/benchmarks.md); dropped from a query's words, stems and roots, so a quoted phrase
# still matches through its pairs. الله stays: it is content in a verse.
QUERY_STOP_WORDS = ("سبحانه", "تعالى", "وتعالى", "صلى", "وسلم", "أيها", "يا")


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


@lru_cache(maxsize=1)
def _isri():
    from nltk.stem.isri import ISRIStemmer

    return ISRIStemmer()


@lru_cache(maxsize=200_000)
def _root(word: str) -> str:
    # ISRI is pure Python: a corpus has far fewer distinct words than words, so each is rooted once
    return _normalized_stem(_isri().stem(word))


@lru_cache(maxsize=200_000)
def _normalized_stem(stem: str) -> str:
    # a corpus has far fewer distinct stems than stem occurrences: normalizing each once halves the indexing
    from m3tune.arabic import normalize

    return normalize(stem)


def arabic_terms(text: str, drop: frozenset[str] = frozenset()) -> list[str]:
    """The strong analyzer's terms of Arabic TEXT: words (w:), adjacent pairs (p:), stems (s:), roots (r:).
    DROP: normalized words that give no root besides the stop-words (a query's boilerplate)."""
    from m3tune.arabic import _TOKEN, strip_marks, tokens

    stemmer, stop = _arabic_tools()
    words, raw = tokens(text), _TOKEN.findall(strip_marks(text))
    stems = [_normalized_stem(s) for s in stemmer.stemWords(raw)]
    roots = [_root(w) for w in raw if _normalized_stem(w) not in stop and _normalized_stem(w) not in drop]
    return ([f"w:{w}" for w in words if w not in stop] + [f"p:{a}_{b}" for a, b in zip(words, words[1:])]
            + [f"s:{s}" for s in stems if s and s not in stop] + [f"r:{r}" for r in roots if r])


@lru_cache(maxsize=1)
def _query_stop() -> frozenset[str]:
    from m3tune.arabic import normalize

    return frozenset(normalize(w) for w in QUERY_STOP_WORDS)


def arabic_query_terms(text: str) -> list[str]:
    """The strong analyzer's terms of an Arabic query: arabic_terms less QUERY_STOP's words, stems, roots."""
    stop = _query_stop()
    return [t for t in arabic_terms(text, stop) if t[0] in "pr" or t[2:] not in stop]


def english_terms(text: str) -> list[str]:
    stemmer, stop = _english_tools()
    return stemmer.stemWords([w for w in _ENGLISH.findall(text.lower()) if w not in stop])


def plain_terms(text: str) -> list[str]:
    from m3tune.arabic import tokens

    return tokens(text)


class _Index:
    """One bm25s index over DOCS (id, text) with ANALYZE as its tokenizer (none when DOCS is empty); queries
    go through ANALYZE_QUERY (default: ANALYZE)."""

    def __init__(self, docs: Sequence[tuple[str, str]], analyze: Callable[[str], list[str]], *,
                 k1: float = DEFAULT_K1, b: float = DEFAULT_B, terms: list[list[str]] | None = None,
                 analyze_query: Callable[[str], list[str]] | None = None):
        import bm25s

        self.ids, self.retriever = [d for d, _ in docs], None
        self.analyze = analyze_query or analyze
        self.terms = [analyze(text) for _, text in docs] if terms is None else terms  # TERMS: analyzed already
        if any(self.terms):  # bm25s cannot index nothing (a corpus without translations has no English index)
            self.retriever = bm25s.BM25(k1=k1, b=b)
            self.retriever.index(self.terms, show_progress=False)

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

    def __init__(self, passages: Sequence[Passage], analyzer: str = "arabic", *, k1: float | None = None,
                 b: float | None = None, like: "BM25 | None" = None):
        """K1, B: None for the analyzer's own (K1, B and EN_K1, EN_B for the strong one, bm25s's for plain),
        else both indices'. LIKE: an index of
        the same passages and analyzer whose analyzed terms to reuse (only the weighting changes)."""
        if analyzer not in ("arabic", "plain"):
            raise ValueError(f"unknown BM25 analyzer {analyzer!r}")
        self.analyzer = analyzer
        own = (K1, B) if analyzer == "arabic" else (DEFAULT_K1, DEFAULT_B)
        weights = {"k1": own[0] if k1 is None else k1, "b": own[1] if b is None else b}
        english = {"k1": EN_K1 if k1 is None else k1, "b": EN_B if b is None else b}
        reuse = like is not None and like.analyzer == analyzer
        if analyzer == "plain":
            self.arabic = _Index([(p.id, p.text_plain) for p in passages], plain_terms, **weights,
                                 terms=like.arabic.terms if reuse else None)
            self.english = None
        else:
            self.arabic = _Index([(p.id, p.text) for p in passages], arabic_terms, **weights,
                                 terms=like.arabic.terms if reuse else None, analyze_query=arabic_query_terms)
            self.english = _Index([(p.id, p.translation_en) for p in passages if p.translation_en], english_terms,
                                  **english, terms=like.english.terms if reuse else None)

    def pair_terms(self, pid: str) -> set[str]:
        """The adjacent-word-pair terms (p:) of passage PID's Arabic text (the strong analyzer's)."""
        if getattr(self, "_pairs", None) is None:
            self._pairs = {i: {t for t in terms if t.startswith("p:")}
                           for i, terms in zip(self.arabic.ids, self.arabic.terms)}
        return self._pairs.get(pid, set())

    def rank(self, queries: Sequence[GoldQuery], k: int) -> Run:
        """Each query's top K: English ones over the translations (strong analyzer), the rest over Arabic."""
        return {q.id: (self.english if self.english is not None and q.language == "en" else self.arabic)
                .rank(q.query, k) for q in queries}
