"""Consistency check of generated queries (Promptagator / InPars style).

A generated query is kept only if one of its own positives ranks in the
top K under a judge; a vague query that retrieves anything but its passage
teaches the model nothing. The judge is the base encoder on a real run (the
index's own ranking), or BM25 over the corpus (`bm25s`) where the encoder is
the untrained tiny stand-in, which would reject everything: Arabic queries
are judged against `text_plain`, English ones against `translation_en`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from m3tune.arabic import tokens
from m3tune.records import Passage, Query

_EN_WORD = re.compile(r"[a-z0-9]+")


def _english(text: str) -> list[str]:
    return _EN_WORD.findall(text.lower())


def bm25_top_k(queries: Sequence[Query], passages: Sequence[Passage], k: int) -> list[list[str] | None]:
    """Per query, the ids of the K best passages by BM25 in its language.

    None when none of the query's positives has text in that language (an
    English query about a hadith, which has no translation): it cannot be
    judged, so it is not rejected.
    """
    import bm25s

    by_id = {p.id: p for p in passages}
    out: list[list[str] | None] = [None] * len(queries)
    for language, text_of, tokenize in (("ar", lambda p: p.text_plain, tokens),
                                        ("en", lambda p: p.translation_en, _english)):
        docs = [p for p in passages if text_of(p)]
        todo = [i for i, q in enumerate(queries) if q.language == language
                and any(text_of(by_id[pid]) for pid in q.positive_ids)]
        if not docs or not todo:
            continue
        retriever = bm25s.BM25()
        retriever.index([tokenize(text_of(p)) for p in docs], show_progress=False)
        vocab = retriever.vocab_dict
        for i in todo:
            words = [w for w in tokenize(queries[i].query) if w in vocab]
            if not words:
                out[i] = []
                continue
            found, _ = retriever.retrieve([words], k=min(k, len(docs)), show_progress=False)
            out[i] = [docs[j].id for j in found[0]]
    return out
