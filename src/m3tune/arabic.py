"""Arabic text: normalization for lexical matching, and script detection.

`normalize` maps Uthmani Quran script, vocalized hadith text and what a user
types to one plain form, so that `ٱلصَّلَوٰةِ` (Uthmani) and `الصلاة` (what a
reader types) meet. It is what `text_plain`, BM25 and Jaccard overlap use.

The character knowledge (which code points are tashkeel, Quranic marks, alef
forms) comes from pyarabic's constants. pyarabic's own helpers cannot do the
job alone: they strip the dagger alef that Uthmani script writes for a long
ā (so ٱلۡكِتَٰبُ would become كتب, not كتاب) and know no Uthmani spelling
rules; the rules below run first, on the vocalized text, because the marks
are what tell the cases apart. For speed (ingest normalizes every passage)
marks go in one regex pass and letters by a few `str.replace` calls, each
skipped when its character is absent (see benchmarks/bench_io.py).
"""

from __future__ import annotations

import re
from functools import lru_cache

import pyarabic.araby as araby

ALEF = araby.ALEF  # ا
YEH = araby.YEH  # ي
WAW = araby.WAW  # و
HEH = araby.HEH  # ه
DAGGER_ALEF = araby.MINI_ALEF  # U+0670, the superscript ("dagger") alef
SMALL_HIGH_YEH = "\u06e7"  # ۧ  in إِبۡرَٰهِـۧمَ, ٱلنَّبِيِّـۧنَ: a real yeh that standard spelling writes
SUBSCRIPT_ALEF = "\u0656"

# Marks that carry no letter in standard spelling: harakat, shadda, sukun
# (including the Uthmani round-head sukun U+06E1), Quranic annotation signs,
# waqf marks, rub el hizb, sajdah place, and bidi controls hadith texts carry.
_DROP = set(araby.DIACRITICS) | set(araby.TASHKEEL) | {
    "\u06d6", "\u06d7", "\u06d8", "\u06d9", "\u06da", "\u06db", "\u06dc",
    "\u06dd", "\u06de", "\u06df", "\u06e0", "\u06e1", "\u06e2", "\u06e3",
    "\u06e4", "\u06e5", "\u06e6", "\u06e8", "\u06e9", "\u06ea", "\u06eb",
    "\u06ec", "\u06ed",
    "\u200c", "\u200d", "\u200e", "\u200f", "\u061c", "\ufeff",
}
HAMZA_ABOVE = araby.HAMZA_ABOVE  # U+0654, combining hamza (on a tatweel seat in Uthmani)
HAMZA = araby.HAMZA  # ء
_DROP -= {DAGGER_ALEF, SMALL_HIGH_YEH, HAMZA_ABOVE}  # handled by the rules below

# The Uthmani rules run first, on the vocalized text, because the marks are
# what tell the cases apart; then the marks go, then letters are unified.
_MARKS = tuple(sorted(_DROP))
_LETTERS = {c: ALEF for c in (araby.ALEF_MADDA, araby.ALEF_HAMZA_ABOVE, araby.ALEF_HAMZA_BELOW, araby.ALEF_WASLA)}
_LETTERS.update({
    araby.ALEF_MAKSURA: YEH,  # ى → ي
    araby.TEH_MARBUTA: HEH,  # ة → ه
    araby.WAW_HAMZA: WAW,  # ؤ → و
    araby.YEH_HAMZA: YEH,  # ئ → ي
    SMALL_HIGH_YEH: YEH,
    HAMZA_ABOVE: "",  # what is left of it after the rules: its seat letter stays
    "\u0640": "",  # tatweel
    "\u06cc": YEH,  # Farsi yeh
    "\u06a9": "\u0643",  # keheh → kaf
})
_LETTERS.update({d: str(i) for i, d in enumerate("\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669")})
# Not letters a writer chooses: alef wasla is a plain alef, tatweel is
# stretching, a leftover combining hamza already has its seat letter.
_SEAT_MARKS = ((araby.ALEF_WASLA, ALEF), ("\u0640", ""), (HAMZA_ABOVE, ""))
_LETTER_ITEMS = tuple((k, v) for k, v in _LETTERS.items() if k not in dict(_SEAT_MARKS))
_LIGATURES = tuple(araby.LIGUATURES)

_M = "[\u064b-\u0653\u0655-\u065f\u06d6-\u06ed]*"  # any run of marks, but not hamza above
_SEAT_BY_VOWEL = {araby.FATHA: araby.ALEF_HAMZA_ABOVE, araby.KASRA: araby.YEH_HAMZA,
                  araby.DAMMA: araby.WAW_HAMZA}


def _hamza_on_tatweel(m: re.Match) -> str:
    # Standard spelling seats the hamza by its neighbours: after a yeh, or
    # with a kasra, on a yeh (شيـٔا → شيئا); with a fatha on an alef
    # (يسـَٔلون → يسألون); with a damma on a waw.
    before, vowels = m.group(1) or "", m.group(2) + m.group(3)
    if before == YEH:
        return before + araby.YEH_HAMZA
    for vowel, seat in _SEAT_BY_VOWEL.items():
        if vowel in vowels:
            return before + seat
    return before + araby.YEH_HAMZA


# (trigger, pattern, replacement): a rule can only match where its trigger
# character occurs, so most hadith and all typed text skip the regexes.
_UTHMANI_RULES = [
    # a waw with no vowel of its own carrying a dagger alef is a seat for ā:
    # صلوٰة → صلاة, ربوٰا → ربا (but أموَٰل, whose waw is voweled, keeps it)
    (DAGGER_ALEF, re.compile(f"{WAW}{DAGGER_ALEF}(?:[\u0653\u06df]*{ALEF}[\u06df]?)?"), ALEF),
    # alef maqsura with a dagger alef inside a word is an alef (أدرىٰك → أدراك),
    # at the end it is just the maqsura (موسىٰ → موسى)
    (DAGGER_ALEF, re.compile(f"{araby.ALEF_MAKSURA}{DAGGER_ALEF}(?={_M}[\u0621-\u064a])"), ALEF),
    (DAGGER_ALEF, re.compile(f"{araby.ALEF_MAKSURA}{DAGGER_ALEF}"), araby.ALEF_MAKSURA),
    # hamza on a tatweel seat before an alef is an alef madda: بـَٔايات → بآيات
    (HAMZA_ABOVE, re.compile(f"\u0640{araby.FATHA}?{HAMZA_ABOVE}{araby.FATHA}?{ALEF}"), araby.ALEF_MADDA),
    # any other hamza on a tatweel seat
    (HAMZA_ABOVE, re.compile(f"([\u0621-\u064a])?{_M}\u0640({_M}){HAMZA_ABOVE}({_M})"), _hamza_on_tatweel),
    # hamza before alef is an alef madda: ءامنوا → آمنوا, القرءان → القرآن
    (HAMZA, re.compile(f"{HAMZA}{_M}{ALEF}"), araby.ALEF_MADDA),
    # any other dagger alef is a full alef: ٱلۡكِتَٰبُ → الكتاب, ءَايَٰت → آيات
    (DAGGER_ALEF, re.compile(DAGGER_ALEF), ALEF),
]
# Words that standard spelling writes without the alef a dagger stands for
# (after normalization), looked up with and without one or two proclitics.
_DAGGER_EXCEPTIONS = {
    "الرحمان": "الرحمن", "رحمان": "رحمن", "للرحمان": "للرحمن", "هاذا": "هذا",
    "هاذه": "هذه", "هاذان": "هذان", "هاولاء": "هولاء", "ذالك": "ذلك", "ذالكم": "ذلكم",
    "لاكن": "لكن", "لاكنا": "لكنا", "الاه": "اله", "الاها": "الها", "الاهكم": "الهكم",
    "الاهنا": "الهنا", "الاهين": "الهين", "اولايك": "اوليك", "اليل": "الليل",
    "داود": "داوود", "طاه": "طه",
    # Uthmani joins the vocative يا to its noun; standard spelling separates it.
    "ياايها": "يا ايها", "ياايتها": "يا ايتها", "ياقوم": "يا قوم", "يابني": "يا بني",
    "ياعباد": "يا عباد", "يااهل": "يا اهل", "ياادم": "يا ادم", "ياموسي": "يا موسي",
    "ياابانا": "يا ابانا", "ياابت": "يا ابت", "ياويلتنا": "يا ويلتنا",
}
_PROCLITICS = "وفبلك"
_EXCEPTION_FORMS = {p1 + p2 + word: p1 + p2 + fixed for word, fixed in _DAGGER_EXCEPTIONS.items()
                    for p1 in ("", *_PROCLITICS) for p2 in ("", *_PROCLITICS) if p1 or not p2}
_TOKEN = re.compile(r"[\w\u0600-\u06ff]+")
_PUNCT = re.compile(r"[^\w\s]")


def strip_marks(text: str) -> str:
    """Arabic as a reader types it: no tashkeel, Quranic marks or tatweel, Uthmani spelling made standard.

    Letters are kept as written (ة, أ, ى stay), so this is the form to show
    or to build queries from; `normalize` goes further for matching.
    """
    # No Unicode NFC pass: the only compositions it makes in Arabic (alef,
    # waw, yeh + hamza or madda) end up as the bare letter below either way.
    for trigger, pattern, replacement in _UTHMANI_RULES:
        if trigger in text:
            text = pattern.sub(replacement, text)
    for mark in _MARKS:  # measured here: 2x faster than one regex, 2.5x faster than str.translate
        if mark in text:
            text = text.replace(mark, "")
    if any(c in text for c in _LIGATURES):
        text = araby.normalize_ligature(text)
    for mark, plain in _SEAT_MARKS:
        if mark in text:
            text = text.replace(mark, plain)
    return text


def normalize(text: str) -> str:
    """The plain, searchable form of Arabic (or mixed) text.

    Strips tashkeel and Quranic marks, unifies alef forms (أ إ آ ٱ → ا), alef
    maqsura (ى → ي), ta marbuta (ة → ه), hamza seats (ؤ → و, ئ → ي), removes
    tatweel and punctuation, lower-cases Latin text and collapses spaces.
    """
    text = strip_marks(text)
    for letter, plain in _LETTER_ITEMS:
        if letter in text:
            text = text.replace(letter, plain)
    words = _PUNCT.sub(" ", text).casefold().split()
    if not _EXCEPTION_FORMS.keys().isdisjoint(words):
        words = [_EXCEPTION_FORMS.get(w, w) for w in words]
    return " ".join(words)


def tokens(text: str) -> list[str]:
    """Tokens of the normalized text (what Jaccard overlap and BM25 count)."""
    return _TOKEN.findall(normalize(text))


def is_arabic_char(ch: str) -> bool:
    return "\u0600" <= ch <= "\u06ff" or "\u0750" <= ch <= "\u077f" or "\ufb50" <= ch <= "\ufdff" or "\ufe70" <= ch <= "\ufeff"


def detect_language(text: str) -> str:
    """'ar' when Arabic-script letters are at least half of the letters, else 'en'.

    This is script detection, not language identification: the pipeline only
    needs to tell Arabic queries from English ones, and a letter count does
    that exactly, with no model to ship. Text with no letters at all is 'en'.
    """
    arabic = latin = 0
    for ch in text:
        if ch.isalpha():
            if is_arabic_char(ch):
                arabic += 1
            else:
                latin += 1
    return "ar" if arabic and arabic >= latin else "en"


# Word rules that query generation and the gold builder both use. They live here, below both, so that no
# generator imports the gold's builder (the training rules and the test rules must stay two things).
WORD = re.compile(r"\w+")
# Words of a chain of narrators or of a blessing formula: a span holding one is not what anyone quotes.
CHAIN_WORDS = frozenset(normalize(w) for w in (
    "عن", "بن", "ابن", "ابي", "أبو", "بنت", "حدثنا", "حدثني", "حدثه", "أخبرنا", "أخبرني", "أخبره", "سمعت", "سمع",
    "صلى", "وسلم", "رضي", "عنه", "عنها", "عنهما", "يعني", "وحدثنا", "وحدثني"))


@lru_cache(maxsize=1)
def stop_words_ar() -> frozenset[str]:
    """stopwords-iso's Arabic list, normalized."""
    import stopwordsiso

    return frozenset(normalize(w) for w in stopwordsiso.stopwords("ar"))


@lru_cache(maxsize=1)
def stop_words_en() -> frozenset[str]:
    import stopwordsiso

    return frozenset(stopwordsiso.stopwords("en"))


def content_words(words: list[str], stop: frozenset[str]) -> list[str]:
    """WORDS that carry meaning: three letters or more, and not a stop-word."""
    return [w for w in words if len(w) >= 3 and w not in stop]
