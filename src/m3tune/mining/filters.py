"""The rules that keep false negatives out, shared by mining and filtering.

A candidate negative is dropped when it is:
- `positive`: one of the query's positives (all of `positive_ids`, and
  every passage with the same text as one of them);
- `positive_aware`: scored above `threshold` × the query's positive score
  (NV-Retriever's TopK-PercPos): so close to the answer it is probably
  another answer. NV-Retriever has one positive; with several, the
  reference is their median by default (`positive_reference`). The lowest
  is wrong for a theme's tens of positives: its weakest answer ranks
  thousands deep, so every candidate, random ones included, beats it and
  the query keeps no negative at all (measured in docs/benchmarks.md);
- `jaccard`: sharing at least `jaccard` of its `text_plain` tokens with a
  positive (Jaccard index): the same text with small differences.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from statistics import median

REFERENCES = ("lowest", "median", "highest")


def reference_score(scores: Sequence[float], how: str) -> float:
    """The positive score a candidate is compared with: the lowest, median or highest of SCORES."""
    if how not in REFERENCES:
        raise ValueError(f"positive_reference must be one of {', '.join(REFERENCES)}, not {how!r}")
    return min(scores) if how == "lowest" else max(scores) if how == "highest" else float(median(scores))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class FalseNegativeFilter:
    def __init__(self, *, threshold: float, jaccard: float, tokens: Callable[[str], frozenset[str]]):
        self.threshold, self.max_jaccard, self.tokens = threshold, jaccard, tokens
        self.dropped: Counter[str] = Counter()

    def reason(self, candidate: str, score: float, positives: set[str], positive_tokens: list[frozenset[str]],
               positive_score: float) -> str | None:
        """Why CANDIDATE (with SCORE for this query) may not be a negative, or None if it may."""
        if candidate in positives:
            return "positive"
        if score > self.threshold * positive_score:
            return "positive_aware"
        tokens = self.tokens(candidate)
        if any(jaccard(tokens, p) >= self.max_jaccard for p in positive_tokens):
            return "jaccard"
        return None

    def keep(self, candidates: Iterable[tuple[float, str]], positives: set[str],
             positive_tokens: list[frozenset[str]], positive_score: float) -> list[tuple[float, str]]:
        """CANDIDATES (score, id) that may be negatives, in order; the others counted by reason."""
        kept = []
        for score, pid in candidates:
            why = self.reason(pid, score, positives, positive_tokens, positive_score)
            if why is None:
                kept.append((score, pid))
            else:
                self.dropped[why] += 1
        return kept


def pick_mix(survivors: list[tuple[float, str]], *, hard: int, semi_hard: int) -> tuple[list, list]:
    """(hard, semi-hard) from the surviving window, best first: hard from its top, semi-hard from its middle."""
    hard_picks = survivors[:hard]
    rest = survivors[hard:]
    if not rest or semi_hard <= 0:
        return hard_picks, []
    middle = len(rest) // 2
    start = max(0, min(middle - semi_hard // 2, len(rest) - semi_hard))
    return hard_picks, rest[start:start + semi_hard]
