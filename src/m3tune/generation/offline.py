"""The offline generator: queries from the real corpus, deterministically, with no network.

It is much weaker than an LLM — its "questions" are templates filled with
salient words, its English exists only where a passage has a translation
(the Quran), and its themes are matched by a lexicon, not understood — but
it produces real, checkable training data from the real corpus, so the whole
pipeline runs end to end on a laptop or in CI.

Salient words are ranked by TF-IDF over the corpus. The weights are computed
here (a document-frequency table and a log) rather than with a library: what
is needed is a per-passage ranking of its own words, not a retrieval index.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib.resources import files
from pathlib import Path

from m3tune.arabic import normalize, strip_marks
from m3tune.errors import ConfigError
from m3tune.names import safe_name
from m3tune.records import Generator, Passage, Query

OFFLINE_VERSION = "offline-v1"
GENERATOR = Generator(backend="offline", model="tfidf-lexicon", prompt_version=OFFLINE_VERSION)

_EN_WORD = re.compile(r"[a-z][a-z'-]+")
_AR_WORD = re.compile(r"[\u0621-\u064a]+")
# Where a hadith's chain of narrators gives way to its text: the last
# narration verb, then the first "said"/"that" after it (normalized forms).
_ISNAD_MARKERS = {"حدثنا", "حدثني", "اخبرنا", "اخبرني", "انبانا", "سمعت", "عن", "حدثه", "اخبره"}
_MATN_OPENERS = {"قال", "يقول", "قالت", "ان", "انه", "انها", "فقال", "يقال"}
_BLESSING = "صلي الله عليه وسلم"


# Longest first: (prefix written, what replaces it). "بال" + X is "ال" + X; "لل" + X is "ال" + X.
_PREFIXES = (("وبال", "ال"), ("فبال", "ال"), ("وال", "ال"), ("فال", "ال"), ("بال", "ال"), ("كال", "ال"),
             ("لل", "ال"), ("و", ""), ("ف", ""), ("ب", ""), ("ل", ""), ("ك", ""))


def _bare_form(word: str, vocab: set[str]) -> tuple[int, str] | None:
    """(length of the particle, what replaces it) when WORD is a particle on a word VOCAB knows."""
    for prefix, replacement in _PREFIXES:
        if word.startswith(prefix) and len(word) - len(prefix) >= 3 and replacement + word[len(prefix):] in vocab:
            return len(prefix), replacement
    return None


def stable_pick(key: str, options: Sequence[str]) -> str:
    """The same option for the same key, on every machine and run."""
    return options[int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % len(options)]


def matn(text_plain: str) -> str:
    """The body of a hadith without its chain of narrators (heuristic; whole text if unsure)."""
    words = text_plain.split()
    limit = int(len(words) * 0.8)
    last = max((i for i, w in enumerate(words[:limit]) if w in _ISNAD_MARKERS), default=-1)
    if last < 0:
        return text_plain
    start = next((i + 1 for i in range(last + 1, len(words)) if words[i] in _MATN_OPENERS), last + 1)
    body = " ".join(words[start:]).replace(_BLESSING, " ")
    return body if len(body.split()) >= 5 else text_plain


def _stopwords() -> tuple[frozenset[str], frozenset[str]]:
    from stop_words import get_stop_words

    own = files("m3tune.generation").joinpath("data/stopwords_ar.txt").read_text(encoding="utf-8")
    ar = {normalize(w) for w in own.splitlines() if w and not w.startswith("#")}
    ar |= {normalize(w) for w in get_stop_words("arabic")}
    en = {w.lower() for w in get_stop_words("english")} | {"o", "ye", "thee", "thou", "thy", "indeed", "verily"}
    return frozenset(ar), frozenset(en)


@dataclass
class Doc:
    passage: Passage
    ar_words: list[str]  # normalized Arabic words of the searchable part (matn for hadith)
    en_words: list[str]  # lower-case words of the English translation, if any


class Corpus:
    """Passages with the document frequencies TF-IDF needs."""

    def __init__(self, passages: Iterable[Passage]):
        self.docs: list[Doc] = []
        for p in passages:
            body = matn(p.text_plain) if p.source == "hadith" else p.text_plain
            en = _EN_WORD.findall(p.translation_en.lower()) if p.translation_en else []
            self.docs.append(Doc(p, body.split(), en))
        # Particles written onto a word (والصبر, فاصبر, بالحج, للسائلين) are not
        # part of what a reader searches for: fold such a word onto its bare
        # form when the corpus has that form too.
        vocab = {w for d in self.docs for w in d.ar_words}
        self.particles = {w: cut for w in vocab if (cut := _bare_form(w, vocab))}
        self.bare = {w: r + w[n:] for w, (n, r) in self.particles.items()}
        for d in self.docs:
            d.ar_words = [self.bare.get(w, w) for w in d.ar_words]
        self.by_id = {d.passage.id: d for d in self.docs}
        self.ar_df = Counter(w for d in self.docs for w in set(d.ar_words))
        self.en_df = Counter(w for d in self.docs for w in set(d.en_words))
        self.n = len(self.docs)

    @cached_property
    def stopwords(self) -> tuple[frozenset[str], frozenset[str]]:
        return _stopwords()

    def salient(self, doc: Doc, language: str, k: int) -> list[str]:
        """The K words of DOC with the highest TF-IDF, best first (ties: first occurrence)."""
        words, df = (doc.ar_words, self.ar_df) if language == "ar" else (doc.en_words, self.en_df)
        stop = self.stopwords[0] if language == "ar" else self.stopwords[1]
        tf = Counter(words)
        first = {}
        for i, w in enumerate(words):
            first.setdefault(w, i)
        candidates = [w for w in tf if len(w) >= 3 and w not in stop and not w.isdigit()]
        # A word in (nearly) every passage says nothing; a word seen once is
        # often a name or a spelling accident: both rank low.
        candidates.sort(key=lambda w: (-(1 + math.log(tf[w])) * math.log(self.n / df[w]) * min(1.0, df[w] / 2),
                                       first[w]))
        return candidates[:k]


def _surface(passage: Passage, words: list[str], particles: dict[str, tuple[int, str]]) -> list[str]:
    """The written forms (ة, أ, ى kept) of normalized WORDS, as they appear in the passage."""
    forms: dict[str, str] = {}
    for token in _AR_WORD.findall(strip_marks(passage.text)):
        key = normalize(token)
        forms.setdefault(key, token)
        if key in particles and len(key) == len(token):  # letters align one to one: cut the particle off the written form
            n, replacement = particles[key]
            forms.setdefault(replacement + key[n:], replacement + token[n:])
    return [forms.get(w, w) for w in words]


AR_QUESTIONS = {
    "quran": ("ما الآية التي تذكر {a} و{b}؟", "أين ورد ذكر {a} في القرآن؟", "ماذا قال الله تعالى عن {a} و{b}؟",
              "ما الآية التي تتحدث عن {a}؟"),
    "hadith": ("ما الحديث الذي يذكر {a} و{b}؟", "ماذا قال النبي عن {a}؟", "هل ورد حديث في {a} و{b}؟",
               "ما حكم {a} في السنة؟"),
}
EN_QUESTIONS = ("Which verse mentions {a} and {b}?", "What does the Quran say about {a}?",
                "Where does the Quran speak of {a} and {b}?", "Which verse talks about {a}?")


# backend "reference": the words come from a reference work people wrote, not from a generator; mining does not
# round-trip-check them (m3tune.mining.mine)
TAFSIR_GENERATOR = Generator(backend="reference", model="al-muyassar", prompt_version="tafsir-v1")


def passage_queries(corpus: Corpus, doc: Doc, *, ar: int, en: int, types: Sequence[str],
                    paraphrases: Sequence[str] = ()) -> list[Query]:
    """Up to AR Arabic and EN English queries for one passage, cycling through TYPES. PARAPHRASES (a verse's
    al-Muyassar clauses, m3tune.corpus.tafsir) fill the Arabic question slots, in order, before the template:
    a sentence a person wrote about the verse, sharing few of its words, as users ask."""
    p = doc.passage
    out: list[Query] = []
    written = list(paraphrases)
    for language, count in (("ar", ar), ("en", en)):
        if count <= 0:
            continue
        words = corpus.salient(doc, language, 6)
        if language == "ar":
            words = _surface(p, words, corpus.particles)
        if len(words) < 2:
            continue
        for n in range(count):
            qtype = types[n % len(types)]
            shift = n // len(types)  # a second query of the same type uses the next salient words
            picked = words[shift:shift + 3] if len(words) > shift + 1 else words[:3]
            generator = GENERATOR
            if qtype == "keyword":
                text = " ".join(picked)
            elif language == "ar" and written:
                text, generator = written.pop(0), TAFSIR_GENERATOR
            else:
                templates = AR_QUESTIONS[p.source] if language == "ar" else EN_QUESTIONS
                b = picked[1][1:] if language == "ar" and picked[1].startswith("وال") else picked[1]  # no "و" twice
                text = stable_pick(f"{p.id}/{language}/{n}", templates).format(a=picked[0], b=b)
            out.append(Query(id=f"{p.id}/{language}-{qtype}-{n}", query=text, language=language, type=qtype,
                             positive_ids=[p.id], source=p.source, generator=generator))
    return out


# --- themes -------------------------------------------------------------------------------------

AR_THEME_TEMPLATES = {
    "quran": ("آيات عن {t}", "ما ورد في القرآن عن {t}", "{t} في القرآن الكريم"),
    "hadith": ("أحاديث عن {t}", "ما قاله النبي عن {t}", "{t} في السنة النبوية"),
    "mixed": ("{t} في الإسلام", "فضل {t}", "الحث على {t}"),
}
EN_THEME_TEMPLATES = {
    "quran": ("verses about {t}", "what the Quran says about {t}"),
    "hadith": ("hadith about {t}", "what the Prophet said about {t}"),
    "mixed": ("{t} in Islam",),
}
_PROCLITICS = ("", "و", "ف", "ب", "ل", "ك", "وب", "ول", "فب", "فل", "وك")


@dataclass
class Theme:
    id: str
    ar: list[str]
    en: list[str]
    lexicon: list[str]
    held_out: bool = False
    verses: tuple[str, ...] = ()  # a story's passages, given by verse range: they are its positives, not the lexicon

    @cached_property
    def words(self) -> frozenset[str]:
        single = [normalize(w) for w in self.lexicon if " " not in w.strip()]
        return frozenset(pre + w for w in single for pre in _PROCLITICS)

    @cached_property
    def phrases(self) -> tuple[str, ...]:
        return tuple(normalize(w) for w in self.lexicon if " " in w.strip())

    def hits(self, words: list[str]) -> int:
        n = sum(1 for w in words if w in self.words)
        if self.phrases:
            text = " " + " ".join(words) + " "
            n += sum(text.count(f" {p} ") for p in self.phrases)
        return n


# Verses per surah (Hafs numbering, as the packaged corpus): 6,236 in all.
SURAH_VERSES = (7, 286, 200, 176, 120, 165, 206, 75, 129, 109, 123, 111, 43, 52, 99, 128, 111, 110, 98, 135, 112, 78,
                118, 64, 77, 227, 93, 88, 69, 60, 34, 30, 73, 54, 45, 83, 182, 88, 75, 85, 54, 53, 89, 59, 37, 35, 38,
                29, 18, 45, 60, 49, 62, 55, 78, 96, 29, 22, 24, 13, 14, 11, 11, 18, 12, 12, 30, 52, 52, 44, 28, 28,
                20, 56, 40, 31, 50, 40, 46, 42, 29, 19, 36, 25, 22, 17, 19, 26, 30, 20, 15, 21, 11, 8, 8, 19, 5, 8,
                8, 11, 11, 8, 3, 9, 5, 4, 7, 3, 6, 3, 5, 4, 5, 6)


def load_themes(path: str | None = None, *, held_out: bool = False) -> tuple[str, list[Theme]]:
    """(version, themes) from PATH or the packaged curated list.

    The themes marked `held_out` (the topics of the held-out partition, m3tune.corpus.heldout) are left
    out, so that no generator ever sees them, unless HELD_OUT asks for them too (the gold builder).
    """
    from m3tune.yamlfile import load_yaml, read_yaml

    where = path or "themes.yaml"
    # the strict reader: a malformed file is one line naming file, line and column (exit 4), not a traceback
    data = read_yaml(Path(path)) if path else \
        load_yaml(files("m3tune.generation").joinpath("data/themes.yaml").read_text(encoding="utf-8"), where)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with version and themes")
    try:
        themes = [Theme(id=t["id"], ar=list(t["ar"]), en=list(t["en"]),
                        lexicon=list(t.get("lexicon") or []) if "verses" in t else list(t["lexicon"]),
                        held_out=bool(t.get("held_out", False)),
                        verses=tuple(v for r in t.get("verses") or () for v in _verse_range(r, where, t["id"])))
                  for t in data["themes"]]
        version = str(data["version"])
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{where}: each theme needs id, ar, en, lexicon (or verses) and the file a version "
                          f"({e})") from None
    if len({t.id for t in themes}) != len(themes):
        raise ConfigError(f"{where}: theme ids must be unique")
    for t in themes:  # an id names the theme's work item, journal entry and query ids: a plain name, as any
        safe_name(t.id, "theme id", where)
    for t in themes:
        if not t.verses and not any(normalize(w).strip() for w in t.lexicon):
            # a theme that can match no passage would be dropped from the queries without a word
            raise ConfigError(f"{where}: theme {t.id!r}: field 'lexicon' is empty: give its words (or its verses)")
    return version, [t for t in themes if held_out or not t.held_out]


def _verse_range(spec: object, where: str, theme: str) -> list[str]:
    """'S:A-B' (or 'S:A') as passage ids quran:S:A .. quran:S:B."""
    m = re.fullmatch(r"(\d+):(\d+)(?:-(\d+))?", str(spec).strip())
    if not m or (m[3] and int(m[3]) < int(m[2])):
        raise ConfigError(f"{where}: theme {theme!r}: verses entry {spec!r} is not SURAH:FIRST-LAST (e.g. 2:67-73)")
    surah, first, last = int(m[1]), int(m[2]), int(m[3] or m[2])
    # a verse the Quran does not have would be left out of the story's positives without a word
    if not 1 <= surah <= len(SURAH_VERSES) or first < 1 or last > SURAH_VERSES[surah - 1]:
        have = f"surah {surah} has {SURAH_VERSES[surah - 1]} verses" if 1 <= surah <= len(SURAH_VERSES) \
            else f"there are {len(SURAH_VERSES)} surahs"
        raise ConfigError(f"{where}: theme {theme!r}: field 'verses': {spec!r} is out of range ({have})")
    return [f"quran:{surah}:{v}" for v in range(first, int(m[3] or first) + 1)]


def theme_candidates(corpus: Corpus, theme: Theme, source: str, *, limit: int, min_hits: int) -> list[str]:
    """Passage ids of SOURCE most about THEME: most lexicon hits first, then the shorter (more focused). A story
    (a theme with verses) is its verses, in order: a narrative's verses need not name it."""
    if theme.verses:  # a story holds verses only; those the corpus lacks (an ingest --limit) are left out
        return [pid for pid in theme.verses if pid in corpus.by_id][:limit] if source == "quran" else []
    scored = [(theme.hits(d.ar_words), len(d.ar_words), i, d.passage.id) for i, d in enumerate(corpus.docs)
              if d.passage.source == source]
    scored = [s for s in scored if s[0] >= min_hits]
    scored.sort(key=lambda s: (-s[0], s[1], s[2]))
    return [s[3] for s in scored[:limit]]


def theme_scopes(quran: list[str], hadith: list[str]) -> dict[str, list[str]]:
    """A theme's positives per query scope. 'mixed' (only when both sources have some) takes the two lists in
    turn, so that it stays best first as each is (training's positive_pool reads the first N)."""
    from itertools import chain, zip_longest

    mixed = [pid for pid in chain.from_iterable(zip_longest(quran, hadith)) if pid is not None]
    return {"quran": quran, "hadith": hadith, "mixed": mixed if quran and hadith else []}


EPISODE_GENERATOR = Generator(backend="reference", model="al-muyassar", prompt_version="episode-v1")


def _ranges(verses: Sequence[str]) -> list[list[str]]:
    """VERSES (passage ids quran:S:V, in order) split where the next is not the following verse of the same surah:
    a story told in two places (Yunus in 37:139-148 and 21:87-88) is two runs of text, not one."""
    out: list[list[str]] = []
    previous = None
    for pid in verses:
        surah, verse = (int(x) for x in pid.split(":")[1:])
        if previous != (surah, verse - 1):
            out.append([])
        out[-1].append(pid)
        previous = (surah, verse)
    return out


def episode_queries(theme: Theme, present: set[str], size: int, stop: frozenset[str],
                    with_twins=lambda ids: ids) -> list[Query]:
    """One Arabic query for each SIZE consecutive verses of a story (a window starting at each verse of each of
    its ranges that leaves room for SIZE; verses the corpus lacks, PRESENT being its ids, end a range): what
    al-Muyassar's explanations of them tell (m3tune.corpus.tafsir.episode_summary), with the verses (first) and
    their twins as positives. A story's name finds the whole story; a user more often asks for one episode of
    it, a few verses long (the gold's held-out topics)."""
    from m3tune.corpus.tafsir import episode_summary

    out = []
    for verses in _ranges([pid for pid in theme.verses if pid in present]):
        for start in range(len(verses) - size + 1):
            run = verses[start:start + size]
            text = episode_summary(run, stop)
            if text:
                positives = list(dict.fromkeys(run + with_twins(run)))  # the run first: positive_pool reads it so
                out.append(Query(id=f"episode:{theme.id}/{run[0].split(':', 1)[1]}+{size}", query=text,
                                 language="ar", type="conceptual", positive_ids=positives, source="quran",
                                 generator=EPISODE_GENERATOR))
    return out


def theme_queries(theme: Theme, positives: dict[str, list[str]], generator: Generator = GENERATOR,
                  ar_templates=AR_THEME_TEMPLATES, en_templates=EN_THEME_TEMPLATES) -> list[Query]:
    """Thematic queries for THEME; POSITIVES maps 'quran'/'hadith' to the passage ids assigned to it."""
    out: list[Query] = []
    for scope, ids in theme_scopes(positives.get("quran", []), positives.get("hadith", [])).items():
        if not ids:
            continue
        for language, names, templates in (("ar", theme.ar, ar_templates), ("en", theme.en, en_templates)):
            for n, (name, template) in enumerate((nm, tp) for nm in names for tp in templates[scope]):
                out.append(Query(id=f"theme:{theme.id}/{scope}/{language}-{n}", query=template.format(t=name),
                                 language=language, type="conceptual", positive_ids=list(ids), source=scope,
                                 generator=generator))
    return out
