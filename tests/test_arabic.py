import collections
import sqlite3

import pytest

from m3tune.arabic import detect_language, normalize, tokens
from m3tune.corpus.packaged import _tanzil_simple_clean, package_dir


def test_uthmani_salah_meets_standard_spelling():
    assert normalize("ٱلصَّلَوٰةِ") == normalize("الصلاة") == "الصلاه"


@pytest.mark.parametrize("uthmani, typed", [
    ("ٱلزَّكَوٰةَ", "الزكاة"),             # waw seat for ā
    ("ٱلۡحَيَوٰةِ", "الحياة"),
    ("ٱلۡكِتَٰبُ", "الكتاب"),              # dagger alef
    ("ٱلۡعَٰلَمِينَ", "العالمين"),
    ("ٱلرَّحۡمَٰنِ", "الرحمن"),            # dagger alef standard spelling omits
    ("ذَٰلِكَ", "ذلك"),
    ("وَكَذَٰلِكَ", "وكذلك"),               # ... also behind proclitics
    ("أُوْلَٰٓئِكَ", "أولئك"),
    ("مُوسَىٰ", "موسى"),                    # alef maqsura + dagger
    ("أَدۡرَىٰكَ", "أدراك"),
    ("ءَامَنُواْ", "آمنوا"),                # hamza + alef = madda; silent-alef mark
    ("ٱلۡقُرۡءَانُ", "القرآن"),
    ("شَيۡـٔٗا", "شيئا"),                   # hamza on a tatweel seat
    ("يَسۡـَٔلُونَكَ", "يسألونك"),
    ("بِـَٔايَٰتِنَا", "بآياتنا"),
    ("إِبۡرَٰهِـۧمَ", "إبراهيم"),           # small high yeh
    ("ٱلسَّمَٰوَٰتِ", "السماوات"),          # voweled waw keeps its place
    ("أَمۡوَٰلَهُمۡ", "أموالهم"),
])
def test_uthmani_words(uthmani, typed):
    assert normalize(uthmani) == normalize(typed)


def test_letter_forms_unified():
    assert normalize("إِلَى مَدْرَسَةٍ أَوْ آخِرِ رُؤْيَا ـــ شَاطِئ") == "الي مدرسه او اخر رويا شاطي"
    assert normalize("Verses about PATIENCE!") == "verses about patience"
    assert tokens("«آيات عن الصبر»") == ["ايات", "عن", "الصبر"]


def _uthmani_verses() -> dict[tuple[int, int], str]:
    db = package_dir("pyislamsdk_quran") / "dbs" / "quran.db"
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return {(s, v): t for s, v, t in conn.execute("select surah_number, number, text_ar from verses")}
    finally:
        conn.close()


def test_whole_quran_uthmani_meets_tanzil_simple_clean():
    """Every verse of the Uthmani mushaf, normalized, against Tanzil's standard spelling.

    Measured: 99.0% of tokens and 90.3% of verses agree exactly; the rest are
    spellings no character rule can settle (إسرائيل, يستهزئون, ...).
    """
    uthmani, clean = _uthmani_verses(), _tanzil_simple_clean()
    assert uthmani.keys() == clean.keys() and len(clean) == 6236
    same = total = exact = 0
    for key, text in uthmani.items():
        a, b = normalize(text).split(), normalize(clean[key]).split()
        exact += a == b
        same += sum((collections.Counter(a) & collections.Counter(b)).values())
        total += max(len(a), len(b))
    assert same / total >= 0.985
    assert exact / len(clean) >= 0.90
    # The verse the issue names, in full: al-Baqara 2:153 and 2:3
    assert normalize(uthmani[(2, 153)]) == normalize(clean[(2, 153)])
    assert normalize(uthmani[(2, 3)]) == normalize(clean[(2, 3)])


def test_hadith_marks_and_bidi_controls_stripped():
    text = 'قَالَ \u200f "\u200f نَعَمْ \u200f"\u200f'
    assert normalize(text) == "قال نعم"


@pytest.mark.parametrize("query, lang", [
    ("آيات عن الصبر", "ar"),
    ("ما حكم الربا؟", "ar"),
    ("verses about patience", "en"),
    ("What does the Quran say about ٱلصَّلَوٰة and zakat?", "en"),
    ("الصلاة prayer", "ar"),
    ("2:153", "en"),
])
def test_detect_language(query, lang):
    assert detect_language(query) == lang
