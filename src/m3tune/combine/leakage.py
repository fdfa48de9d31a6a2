"""The leakage guard: no training example may repeat an evaluation (gold) query or, on request, its passages.

A training query leaks a gold query, by the first of these kinds that holds:

- `same`: the same normalized text;
- `overlap`: token sets with Jaccard >= `overlap` (the same question re-worded);
- `containment`: one query holding >= `containment` of the other's normalized
  tokens (both at least two tokens): "تحريم الربا" inside "تحريم الربا في القرآن";
- `char_ngram`: character trigram sets (of the normalized text, spaces kept)
  with Jaccard >= `char_ngram`: the same words under other clitics or spellings
  ("والصبر" for "الصبر"), which token sets miss;
- `cross_language`: an Arabic and an English query sharing a positive passage
  where the Arabic one is a near-quote of the passage's text and the English one
  of its translation (each holds >= `cross_language` of its content words in
  them): the same query in the other language. It needs the passages' texts
  and translations (the run's ingest); without them it is not checked, and
  the stats say so.

Candidates come from inverted indexes on the gold queries, so a training row
costs a few set operations however large the gold set. The trigram index
holds only each gold query's prefix filter (its rarest trigrams, as many as a
match at the threshold must share), which finds every pair at or above the
threshold exactly, in less time than comparing with every gold query.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable

from m3tune.arabic import detect_language, normalize, tokens
from m3tune.records import GoldQuery

KINDS = ("same", "overlap", "containment", "char_ngram", "cross_language")


def trigrams(text: str) -> frozenset[str]:
    """Character trigrams of the normalized text, framed by spaces so that word edges count."""
    plain = f" {normalize(text)} "
    return frozenset(plain[i:i + 3] for i in range(len(plain) - 2))


def _content(text: str, language: str) -> frozenset[str]:
    # What a quote shares with its source beyond particles: Arabic words of 3+ letters (not في من لا),
    # English of 4+ (not the, and, you).
    return frozenset(t for t in tokens(text) if len(t) >= (3 if language == "ar" else 4))


class GoldGuard:
    def __init__(self, gold: list[GoldQuery], *, overlap: float, exclude_passages: bool,
                 containment: float = 0.8, char_ngram: float = 0.7, cross_language: float = 0.6,
                 texts: dict[str, tuple[str, str | None]] | None = None):
        """TEXTS: {passage id: (text_plain, translation_en)} of the gold's relevant passages, for the
        cross-language check (None: not checked)."""
        self.overlap, self.containment, self.char_ngram, self.cross_language = (
            overlap, containment, char_ngram, cross_language)
        self.ids = [g.id for g in gold]
        self.texts = {normalize(g.query): g.id for g in gold}
        self.token_sets = [frozenset(tokens(g.query)) for g in gold]
        self.by_token: dict[str, list[int]] = defaultdict(list)
        for i, toks in enumerate(self.token_sets):
            for t in toks:
                self.by_token[t].append(i)
        # Prefix filter: a row at Jaccard >= t with gold B shares >= ceil(t|B|) of B's trigrams, so it shares
        # at least one of B's |B| - ceil(t|B|) + 1 rarest.
        self.grams = [trigrams(g.query) for g in gold]
        frequency = Counter(t for grams in self.grams for t in grams)
        self.by_gram: dict[str, list[int]] = defaultdict(list)
        for i, grams in enumerate(self.grams):
            prefix = len(grams) - math.ceil(char_ngram * len(grams)) + 1
            for t in sorted(grams, key=lambda t: (frequency[t], t))[:prefix]:
                self.by_gram[t].append(i)
        self.languages = [g.language for g in gold]
        self.content = [_content(g.query, g.language) for g in gold]
        self.by_passage: dict[str, list[int]] = defaultdict(list)
        for i, g in enumerate(gold):
            for pid in g.relevant_ids:
                self.by_passage[pid].append(i)
        self.passage_texts = texts
        self.passages = {pid for g in gold for pid in g.relevant_ids} if exclude_passages else set()

    def __bool__(self) -> bool:
        return bool(self.ids)

    @property
    def checks_cross_language(self) -> bool:
        return self.passage_texts is not None

    def query_leak(self, query: str, pos_ids: Iterable[str] | None = None) -> tuple[str, str] | None:
        """(kind, gold id) of the first leak QUERY (with positives POS_IDS) makes, or None."""
        if not self.ids:
            return None
        hit = self.texts.get(normalize(query))
        if hit:
            return "same", hit
        toks = frozenset(tokens(query))
        candidates = {i for t in toks for i in self.by_token.get(t, ())}
        for i in sorted(candidates):
            gold = self.token_sets[i]
            shared = len(toks & gold)
            if shared / len(toks | gold) >= self.overlap:
                return "overlap", self.ids[i]
        for i in sorted(candidates):
            gold = self.token_sets[i]
            small = min(len(toks), len(gold))
            if small >= 2 and len(toks & gold) / small >= self.containment:
                return "containment", self.ids[i]
        grams = trigrams(query)
        for i in sorted({i for t in grams for i in self.by_gram.get(t, ())}):
            if len(grams & self.grams[i]) / len(grams | self.grams[i]) >= self.char_ngram:
                return "char_ngram", self.ids[i]
        if self.passage_texts is not None and pos_ids:
            return self._cross_language(query, list(pos_ids))
        return None

    def _cross_language(self, query: str, pos_ids: list[str]) -> tuple[str, str] | None:
        language = detect_language(query)
        mine = _content(query, language)
        if not mine:
            return None
        for pid in pos_ids:
            for i in self.by_passage.get(pid, ()):
                if self.languages[i] == language or pid not in self.passage_texts:
                    continue
                plain, english = self.passage_texts[pid]
                if not english:
                    continue
                theirs = self.content[i]
                ar_side, en_side = (mine, theirs) if language == "ar" else (theirs, mine)
                if (ar_side and en_side
                        and len(ar_side & frozenset(tokens(plain))) / len(ar_side) >= self.cross_language
                        and len(en_side & frozenset(tokens(english))) / len(en_side) >= self.cross_language):
                    return "cross_language", self.ids[i]
        return None

    def passage_leak(self, pos_ids: list[str] | None) -> bool:
        return bool(self.passages and pos_ids and not self.passages.isdisjoint(pos_ids))


def load_gold(uris: list[str], *, packaged: bool) -> list[GoldQuery]:
    """Every gold query of the files at URIS, and of the packaged gold set when PACKAGED."""
    from m3tune.evaluation.gold import load_gold as load_one

    return [g for uri in ([None] if packaged else []) + list(uris) for g in load_one(uri)]


def gold_passage_texts(passages: Iterable, gold: list[GoldQuery]) -> dict[str, tuple[str, str | None]]:
    """(text_plain, translation_en) of the gold's relevant passages among PASSAGES (for cross_language)."""
    wanted = {pid for g in gold for pid in g.relevant_ids}
    return {p.id: (p.text_plain, p.translation_en) for p in passages if p.id in wanted}
