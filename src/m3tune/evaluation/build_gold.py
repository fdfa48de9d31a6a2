"""Build the packaged gold standard (`data/gold_standard_v2.jsonl` and its README) from the real corpus.

    python -m m3tune.evaluation.build_gold --corpus runs/demo/ingest/passages.jsonl

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
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from m3tune.arabic import normalize
from m3tune.records import GoldQuery, Passage

DATA = Path(__file__).resolve().parent / "data"
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


def build(passages: list[Passage]) -> list[GoldQuery]:
    from m3tune.arabic import detect_language
    from m3tune.errors import UserError
    from m3tune.generation.base import twins

    known = {p.id for p in passages}
    same = twins(passages)
    gold = []
    for e in ENTRIES:
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
                              language=detect_language(e.query), source=source, difficulty=e.difficulty))
    return gold


README_HEAD = """# Gold standard v2

`gold_standard_v2.jsonl`: {n} evaluation queries over the Quran (6,236 verses) and
Sahih al-Bukhari and Sahih Muslim (14,940 hadith), the corpus `m3tune step ingest`
builds. One JSON object a line: `id`, `query`, `relevant_ids`, `category`,
`language`, `source` (of the relevant passages: quran, hadith or mixed), `difficulty`.

| category | queries | what it tests |
|---|---|---|
| exact | {exact} | an Arabic phrase as written in the text (Uthmani or vocalized forms meet it after normalization) |
| thematic | {thematic} | an Arabic topic; many relevant passages |
| cross_lingual | {cross_lingual} | an English query for Arabic passages (hadith have no English text here) |
| paraphrase | {paraphrase} | an Arabic question sharing few words with its answer |

## How relevance is decided

Nothing below is typed in by hand except the paraphrase answers marked
hand-picked: `python -m m3tune.evaluation.build_gold --corpus PASSAGES_JSONL`
rebuilds this file from the corpus, and a test checks that it is unchanged.

- Normalized Arabic phrase («…»): every passage whose `text_plain`
  (m3tune.arabic.normalize) contains it as whole words, the first of which
  may carry a one-letter proclitic (و ف ب ل ك: «ومن غشنا» holds «من غشنا»). An exact query's
  phrase is the query itself, normalized.
- English phrase ("…"): every Quran verse whose `translation_en` (Sahih
  International) contains it as whole words, case-insensitive.
- Hand-picked: the cited passages, plus any passage with word-for-word the
  same normalized text.

Difficulty: exact queries are easy, medium for short phrases (2-3 words,
several matches) and hard for a 2-word imperative found in several stories;
thematic ones medium, hard where the rule's wording is far from the query;
cross-lingual ones easy when the query is close to the translation, medium
when reworded, hard for hadith (the English must meet Arabic-only text);
paraphrases are hard.

## Queries and rules

| id | query | rule | relevant |
|---|---|---|---|
"""


def readme(gold: list[GoldQuery]) -> str:
    from collections import Counter

    by_cat = Counter(g.category for g in gold)
    text = README_HEAD.format(n=len(gold), **{c: by_cat[c] for c in ("exact", "thematic", "cross_lingual", "paraphrase")})
    entries = {e.id: e for e in ENTRIES}
    for g in gold:
        e = entries[g.id]
        rule = e.rule.describe() + (f" — {e.note}" if e.note else "")
        shown = ", ".join(g.relevant_ids[:6]) + (f" … ({len(g.relevant_ids)})" if len(g.relevant_ids) > 6 else "")
        text += f"| {g.id} | {g.query} | {rule} | {shown} |\n"
    return text


def main() -> None:
    from m3tune.jsonl import read_jsonl

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True, help="passages.jsonl of a full ingest (all sources)")
    parser.add_argument("--out", default=str(DATA), help="folder to write gold_standard_v2.jsonl and README.md to")
    args = parser.parse_args()
    with open(args.corpus, "rb") as f:
        passages = list(read_jsonl(f, Passage, name=args.corpus))
    gold = build(passages)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gold_standard_v2.jsonl").write_text(
        "".join(g.model_dump_json() + "\n" for g in gold), encoding="utf-8")
    (out / "README.md").write_text(readme(gold), encoding="utf-8")
    print(f"{len(gold)} gold queries -> {out}")


if __name__ == "__main__":
    main()
