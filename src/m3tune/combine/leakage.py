"""The leakage guard: no training example may repeat an evaluation (gold) query or, on request, its passages.

A training query leaks when its normalized text equals a gold query's, or
when their token sets overlap by Jaccard >= `overlap` (the same question
re-worded by a generator counts as seen). Candidates are found through an
inverted index on the gold queries' tokens, so each training row costs a
few set operations however many gold queries there are.
"""

from __future__ import annotations

from collections import defaultdict

from m3tune.arabic import normalize, tokens
from m3tune.records import GoldQuery


class GoldGuard:
    def __init__(self, gold: list[GoldQuery], *, overlap: float, exclude_passages: bool):
        self.overlap = overlap
        self.texts = {normalize(g.query): g.id for g in gold}
        self.token_sets = [(g.id, frozenset(tokens(g.query))) for g in gold]
        self.by_token: dict[str, list[int]] = defaultdict(list)
        for i, (_, toks) in enumerate(self.token_sets):
            for t in toks:
                self.by_token[t].append(i)
        self.passages = {pid for g in gold for pid in g.relevant_ids} if exclude_passages else set()

    def __bool__(self) -> bool:
        return bool(self.texts)

    def query_leak(self, query: str) -> str | None:
        """The id of the gold query QUERY repeats or nearly repeats, or None."""
        if not self.texts:
            return None
        hit = self.texts.get(normalize(query))
        if hit:
            return hit
        toks = frozenset(tokens(query))
        for i in {i for t in toks for i in self.by_token.get(t, ())}:
            gid, gold = self.token_sets[i]
            if len(toks & gold) / len(toks | gold) >= self.overlap:
                return gid
        return None

    def passage_leak(self, pos_ids: list[str] | None) -> bool:
        return bool(self.passages and pos_ids and not self.passages.isdisjoint(pos_ids))


def load_gold(uris: list[str], *, packaged: bool) -> list[GoldQuery]:
    """Every gold query of the files at URIS, and of the packaged gold set when PACKAGED."""
    from m3tune.evaluation.gold import load_gold as load_one

    return [g for uri in ([None] if packaged else []) + list(uris) for g in load_one(uri)]
