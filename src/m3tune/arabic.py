"""Arabic text: normalization for lexical matching, and script detection.

`normalize` maps Uthmani Quran script, vocalized hadith text and what a user
types to one plain form, so that `ٱلصَّلَوٰةِ` (Uthmani) and `الصلاة` (what a
reader types) meet. It is what `text_plain`, BM25 and Jaccard overlap use.

The character knowledge (which code points are tashkeel, Quranic marks, alef
forms) comes from pyarabic. The replacement itself is one `str.translate`
table plus a few regexes rather than pyarabic's `strip_*` helpers, because
those loop `str.replace` once per character class and ingest calls this on
every passage; the table is built once from pyarabic's own constants.
"""

from __future__ import annotations

import re
import unicodedata
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
_MARKS = {ord(c): None for c in _DROP}
_LETTERS = {ord(c): ALEF for c in (araby.ALEF_MADDA, araby.ALEF_HAMZA_ABOVE,
                                   araby.ALEF_HAMZA_BELOW, araby.ALEF_WASLA)}
_LETTERS.update({
    ord(araby.ALEF_MAKSURA): YEH,  # ى → ي
    ord(araby.TEH_MARBUTA): HEH,  # ة → ه
    ord(araby.WAW_HAMZA): WAW,  # ؤ → و
    ord(araby.YEH_HAMZA): YEH,  # ئ → ي
    ord(SMALL_HIGH_YEH): YEH,
    ord(HAMZA_ABOVE): None,
    ord("\u0640"): None,  # tatweel
    ord("\u06cc"): YEH,  # Farsi yeh
    ord("\u06a9"): "\u0643",  # keheh → kaf
})
_LETTERS.update({ord(d): str(i) for i, d in enumerate("\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669")})

_M = "[\u064b-\u0653\u0655-\u065f\u06d6-\u06ed]*"  # any run of marks, but not hamza above
_SEAT_BY_VOWEL = {araby.FATHA: araby.ALEF_HAMZA_ABOVE, araby.KASRA: araby.YEH_HAMZA,
                  araby.DAMMA: araby.WAW_HAMZA}


def _hamza_on_tatweel(m: re.Match) -> str:
    # Standard spelling seats the hamza by its neighbours: after a yeh, or
    # with a kasra, on a yeh (شيـٔا → شيئا); with a fatha on an alef
    # (يسـَٔلون → يسألون); with a damma on a waw.
    before, vowels = m.group(1), m.group(2) + m.group(3)
    if before == YEH:
        return before + araby.YEH_HAMZA
    for vowel, seat in _SEAT_BY_VOWEL.items():
        if vowel in vowels:
            return before + seat
    return before + araby.YEH_HAMZA


_UTHMANI_RULES = [
    # a waw with no vowel of its own carrying a dagger alef is a seat for ā:
    # صلوٰة → صلاة, ربوٰا → ربا (but أموَٰل, whose waw is voweled, keeps it)
    (re.compile(f"{WAW}{DAGGER_ALEF}(?:[\u0653\u06df]*{ALEF}[\u06df]?)?"), ALEF),
    # alef maqsura with a dagger alef inside a word is an alef (أدرىٰك → أدراك),
    # at the end it is just the maqsura (موسىٰ → موسى)
    (re.compile(f"{araby.ALEF_MAKSURA}{DAGGER_ALEF}(?={_M}[\u0621-\u064a])"), ALEF),
    (re.compile(f"{araby.ALEF_MAKSURA}{DAGGER_ALEF}"), araby.ALEF_MAKSURA),
    # hamza on a tatweel seat before an alef is an alef madda: بـَٔايات → بآيات
    (re.compile(f"\u0640{araby.FATHA}?{HAMZA_ABOVE}{araby.FATHA}?{ALEF}"), araby.ALEF_MADDA),
    # any other hamza on a tatweel seat
    (re.compile(f"([\u0621-\u064a]?){_M}\u0640({_M}){HAMZA_ABOVE}({_M})"), _hamza_on_tatweel),
    # hamza before alef is an alef madda: ءامنوا → آمنوا, القرءان → القرآن
    (re.compile(f"{HAMZA}{_M}{ALEF}"), araby.ALEF_MADDA),
    # any other dagger alef is a full alef: ٱلۡكِتَٰبُ → الكتاب, ءَايَٰت → آيات
    (re.compile(DAGGER_ALEF), ALEF),
]
# Words that standard spelling writes without the alef a dagger stands for
# (after normalization), looked up with and without one or two proclitics.
_DAGGER_EXCEPTIONS = {
    "الرحمان": "الرحمن", "رحمان": "رحمن", "للرحمان": "للرحمن", "هاذا": "هذا",
    "هاذه": "هذه", "هاذان": "هذان", "هاولاء": "هولاء", "ذالك": "ذلك", "ذالكم": "ذلكم",
    "لاكن": "لكن", "لاكنا": "لكنا", "الاه": "اله", "الاها": "الها", "الاهكم": "الهكم",
    "الاهنا": "الهنا", "الاهين": "الهين", "اولايك": "اوليك", "اليل": "الليل",
    "داود": "داوود", "طاه": "طه",
}
_PROCLITICS = "وفبلك"
_TOKEN = re.compile(r"[\w\u0600-\u06ff]+")
_PUNCT = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")


@lru_cache(maxsize=1 << 16)
def _fix_word(word: str) -> str:
    for cut in range(3):
        if cut and (len(word) - cut < 3 or word[cut - 1] not in _PROCLITICS):
            break
        fixed = _DAGGER_EXCEPTIONS.get(word[cut:])
        if fixed:
            return word[:cut] + fixed
    return word


def normalize(text: str) -> str:
    """The plain, searchable form of Arabic (or mixed) text.

    Strips tashkeel and Quranic marks, unifies alef forms (أ إ آ ٱ → ا), alef
    maqsura (ى → ي), ta marbuta (ة → ه), hamza seats (ؤ → و, ئ → ي), removes
    tatweel and punctuation, lower-cases Latin text and collapses spaces.
    """
    text = unicodedata.normalize("NFC", text)
    for pattern, replacement in _UTHMANI_RULES:
        text = pattern.sub(replacement, text)
    text = araby.normalize_ligature(text.translate(_MARKS)).translate(_LETTERS)
    text = _PUNCT.sub(" ", text).casefold()
    return " ".join(_fix_word(w) for w in _SPACES.split(text) if w)


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
