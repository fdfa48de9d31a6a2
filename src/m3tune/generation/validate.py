"""Checks every generated query must pass, whichever backend wrote it.

A query is rejected, with its reason counted for the manifest, when its
script does not match its declared language, when it is too short or too
long, when it copies more than N consecutive words of its passage (a query
that quotes the answer teaches the model nothing; type `exact` is exempt),
or when it repeats an earlier query, or when it is longer than MAX_QUERY_CHARS.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from m3tune.arabic import detect_language, normalize
from m3tune.records import MAX_QUERY_CHARS as RECORD_MAX_QUERY_CHARS
from m3tune.records import Query

# A query is what a person types into a search box: a question or a few keywords. max_words (24) of long words
# fits in some 300 characters; past 400 it is an answer, a passage or padding pasted into the query (an
# endpoint once answered 23,000 characters in one "word", which max_words let through), and it would cost the
# encoder, the rejects file and every later step for nothing.
MAX_QUERY_CHARS = 400


def record_text(text: str) -> str:
    """An answer's query as a Query record can hold it: stripped, and cut to the record's own bound. A text
    that long is far past MAX_QUERY_CHARS, so the check rejects it as too_long (and rejects.jsonl keeps its
    start) instead of the record refusing it with a traceback."""
    return text.strip()[:RECORD_MAX_QUERY_CHARS]


def longest_shared_run(query_tokens: list[str], passage_tokens: list[str]) -> int:
    """Length of the longest run of consecutive tokens the query shares with the passage."""
    if not query_tokens or not passage_tokens:
        return 0
    positions: dict[str, list[int]] = {}
    for i, tok in enumerate(passage_tokens):
        positions.setdefault(tok, []).append(i)
    best = 0
    prev: dict[int, int] = {}  # passage index -> run length ending there, for the previous query token
    for tok in query_tokens:
        cur = {i: prev.get(i - 1, 0) + 1 for i in positions.get(tok, ())}
        if cur:
            best = max(best, max(cur.values()))
        prev = cur
    return best


class QueryValidator:
    """Stateful: remembers accepted queries to drop duplicates; counts rejections by reason."""

    def __init__(self, *, min_chars: int = 4, max_words: int = 24, max_copy_words: int = 5):
        self.min_chars, self.max_words, self.max_copy_words = min_chars, max_words, max_copy_words
        self.rejected: Counter[str] = Counter()
        self._seen: set[str] = set()

    def reason(self, query: Query, passage_texts: Iterable[str] = ()) -> str | None:
        """Why QUERY is rejected, or None if it passes (and is remembered)."""
        text = query.query.strip()
        if len(text) > MAX_QUERY_CHARS:  # first: no language detection over a huge text
            return "too_long"
        if detect_language(text) != query.language:
            return f"language_mismatch_{query.language}"
        plain = normalize(text)
        words = plain.split()
        if len(plain) < self.min_chars:
            return "too_short"
        if len(words) > self.max_words:
            return "too_long"
        if query.type != "exact":
            for passage in passage_texts:
                if longest_shared_run(words, normalize(passage).split()) > self.max_copy_words:
                    return "copies_passage"
        if plain in self._seen:
            return "duplicate"
        self._seen.add(plain)
        return None
