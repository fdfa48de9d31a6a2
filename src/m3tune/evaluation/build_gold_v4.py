"""Build gold v4 (`data/gold_v4_test.jsonl`, `data/gold_v4_dev.jsonl`) from hand-written sources and the corpus.

    python -m m3tune.evaluation.build_gold_v4 build --corpus runs/full/ingest/passages.jsonl
    python -m m3tune.evaluation.build_gold_v4 check gold/v4/test-quran.jsonl --corpus ...   (a writer's check)

Gold v4 answers issue [1/6]: a test no training rule can game.

- **Two held-out parts.** Every query lies wholly in held-out-dev or wholly in held-out-test
  (m3tune.corpus.heldout): choices are made on dev; test is read once per reported result.
- **Independence.** Every query says whether a training generator shares its construction rule, its lexicon
  or the text it was cut from (`independent`, with the reasons in `shares`). The hand-written queries of
  `gold/v4/*.jsonl` are independent unless a check below finds a copy; the rule-built ones (v3's rules with
  a fresh seed) share their rule with a generator by construction and are kept, labelled, as a "learns the
  task" figure. held-out-dev also takes v3's queries that lie wholly in it (ids `v3-*`); v3's queries in
  held-out-test were looked at while choosing [3/7]'s config, so none of them is in v4's test file.
- **Relevance.** A hand-written query names its relevant passages (verses, hadith ids: `ids`, `verses`) or
  gives a verbatim phrase rule (`ar`: every passage holding the phrase); build_gold.match resolves both, twins
  included. Where judgments from a pool exist (`gold/v4/judgments.jsonl`), the passages judged relevant are
  added and the pool is recorded.

The checks that decide `independent` (each a reason in `shares` when it fires):

- `translation-copy`: an English query holding SHARED_RUN consecutive words of the Sahih International
  translation of a relevant verse: that is the text the offline generator writes its English queries from and
  the text BM25 indexes for English.
- `tafsir-copy`: an Arabic query holding SHARED_RUN consecutive words of al-Tafsir al-Muyassar's explanation
  of a relevant verse: the text `generate-queries --tafsir` writes its Arabic questions from.
- `passage-copy`: a question, paraphrase or topic holding SHARED_RUN consecutive words of a relevant passage:
  a quote, the rule of `generate-exact`, not a question.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from m3tune.arabic import normalize
from m3tune.errors import UserError
from m3tune.records import GoldQuery, Passage, PassageId, Text, source_of

REPO = Path(__file__).resolve().parents[3]
SOURCES = REPO / "gold" / "v4"
DATA = Path(__file__).resolve().parent / "data"
SHARED_RUN = 4  # consecutive words: a run this long is a copy, not a shared name ("the people of the cave")
MAX_RELEVANT = 60
SEED = "gold-v4"
# The v3 rules with a fresh seed, held-out-test only: rule-shared rows, reported apart from the headline.
RULE_QUOTAS = {"exact-span": (30, 0), "english-span": (8, 0), "tafsir-paraphrase": (30, 0)}  # what v3 left

# What each rule-built origin shares with a training generator: (the reason, the module holding the shared
# rule, a name in that module's source that the rule is). tests/test_gold_v4.py reads each module's source and
# checks that the name is there, so a tag cannot outlive the sharing it states, or miss a new one.
RULE_SHARES = {
    "exact-span": ("rule: generate-exact cuts spans of the passage (m3tune.generation.exact)",
                   "m3tune.generation.exact", "candidate_spans"),
    "english-span": ("text: the offline generator writes English queries from translation_en "
                     "(m3tune.generation.offline)", "m3tune.generation.offline", "translation_en"),
    "tafsir-paraphrase": ("rule and text: generate-queries --tafsir writes al-Muyassar's clauses "
                          "(m3tune.generation.queries)", "m3tune.generation.queries", "paraphrases"),
}


class Relevant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[PassageId] = Field(default_factory=list)
    verses: list[str] = Field(default_factory=list, description="Quran ranges, 'S:A-B' or 'S:A'")
    ar: list[Text] = Field(default_factory=list, description="Arabic phrases found verbatim (normalized)")
    source: Literal["quran", "hadith"] | None = None

    @field_validator("verses")
    @classmethod
    def _ranges(cls, value: list[str]) -> list[str]:
        for v in value:
            if not re.fullmatch(r"\d{1,3}:\d{1,3}(-\d{1,3})?", v):
                raise ValueError(f"verse range {v!r}: expected S:A or S:A-B")
        return value

    def verse_ids(self) -> tuple[str, ...]:
        out = []
        for v in self.verses:
            surah, _, span = v.partition(":")
            first, _, last = span.partition("-")
            out += [f"quran:{surah}:{a}" for a in range(int(first), int(last or first) + 1)]
        return tuple(out)


class Source(BaseModel):
    """One hand-written query of gold/v4/*.jsonl."""

    model_config = ConfigDict(extra="forbid")

    id: Text
    query: Text
    category: Literal["exact", "thematic", "paraphrase", "cross_lingual"]
    kind: Literal["quote", "topic", "question", "paraphrase", "english"]
    relevant: Relevant
    difficulty: Literal["easy", "medium", "hard"] = "medium"
    note: str = ""


def read_sources(path: Path) -> list[Source]:
    from m3tune.jsonl import read_jsonl

    with open(path, "rb") as f:
        return list(read_jsonl(f, Source, name=str(path)))


def _runs(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _en_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower().replace("’", "'"))


def copies(query: str, language: str, category: str, relevant: list[Passage], tafsir: dict[str, str]) -> list[str]:
    """The `shares` reasons the checks in the module docstring find for a hand-written QUERY."""
    out = []
    if language == "en":
        q = _runs(_en_words(query), SHARED_RUN)
        hit = [p.id for p in relevant if p.translation_en and q & _runs(_en_words(p.translation_en), SHARED_RUN)]
        if hit:
            out.append(f"translation-copy: {SHARED_RUN} words of the translation of {hit[0]}")
        return out
    q = _runs(normalize(query).split(), SHARED_RUN)
    hit = [p.id for p in relevant if p.id in tafsir and q & _runs(normalize(tafsir[p.id]).split(), SHARED_RUN)]
    if hit:
        out.append(f"tafsir-copy: {SHARED_RUN} words of al-Muyassar on {hit[0]}")
    if category != "exact":
        hit = [p.id for p in relevant if q & _runs(p.text_plain.split(), SHARED_RUN)]
        if hit:
            out.append(f"passage-copy: {SHARED_RUN} words of {hit[0]}")
    return out


def split_of(ids: list[str], test: frozenset[str], partition: frozenset[str]) -> str:
    from m3tune.corpus.heldout import DEV, TEST

    if all(i in test for i in ids):
        return TEST
    if all(i in partition and i not in test for i in ids):
        return DEV
    return "seen" if not all(i in partition for i in ids) else "mixed"


def resolve(sources: list[tuple[str, int, Source]], passages: list[Passage], same: dict[str, list[str]],
            partition: frozenset[str], test: frozenset[str], tafsir: dict[str, str]) -> list[GoldQuery]:
    """GoldQuery rows for SOURCES ((file, line, source)); a query whose passages leave its part is an error."""
    from m3tune.arabic import detect_language
    from m3tune.evaluation.build_gold import Rule, match
    from m3tune.jsonl import RecordError

    by_id = {p.id: p for p in passages}
    out = []
    for shown, line, s in sources:
        named = [*s.relevant.ids, *s.relevant.verse_ids()]
        if missing := [i for i in named if i not in by_id]:
            raise RecordError(shown, line, "relevant", f"{missing[:3]} are not in the corpus")
        ids = match(Rule(ar=tuple(s.relevant.ar), ids=tuple(named), source=s.relevant.source), passages, same)
        if not 1 <= len(ids) <= MAX_RELEVANT:
            raise RecordError(shown, line, "relevant", f"query {s.id!r} finds {len(ids)} passages "
                              f"(expected 1 to {MAX_RELEVANT})")
        part = split_of(ids, test, partition)
        if part not in ("held-out-dev", "held-out-test"):
            outside = [i for i in ids if i not in partition] or ids
            raise RecordError(shown, line, "relevant", f"query {s.id!r} is {part}: its relevant passages must lie "
                              f"in one held-out part ({', '.join(outside[:3])} do not)")
        language = detect_language(s.query)
        if (language == "en") != (s.category == "cross_lingual"):
            raise RecordError(shown, line, "category", f"query {s.id!r} is {language}, category {s.category}")
        shares = copies(s.query, language, s.category, [by_id[i] for i in ids], tafsir)
        out.append(GoldQuery(id=s.id, query=s.query, relevant_ids=ids, category=s.category, language=language,
                             source=source_of(ids), difficulty=s.difficulty, held_out=True,
                             origin=f"hand-{s.kind}", split=part, independent=not shares, shares=shares))
    return out


def rule_built(passages: list[Passage], same: dict[str, list[str]], test: frozenset[str], taken: set[str],
               explanations: dict[str, str], used: set[str]) -> list[GoldQuery]:
    """v3's rules with SEED over held-out-test passages no earlier gold query used: rule-shared rows."""
    from m3tune.arabic import detect_language
    from m3tune.evaluation.build_gold import _rule_built, match

    entries = _rule_built(passages, test, same, explanations, taken, seed=f"{SEED}-test", quotas=RULE_QUOTAS,
                          id_prefix="v4-test-", sources_taken=used)
    out = []
    for e in entries:
        ids = match(e.rule, passages, same)
        out.append(GoldQuery(id=e.id, query=e.query, relevant_ids=ids, category=e.category,
                             language=detect_language(e.query), source=source_of(ids), difficulty=e.difficulty,
                             held_out=True, origin=e.origin, split="held-out-test", independent=False,
                             shares=[RULE_SHARES[e.origin][0]]))
    return out


def _v3_used() -> tuple[set[str], set[str]]:
    """(normalized queries, passages named or drawn from) of every v3 file: v4 repeats none of them."""
    from m3tune.jsonl import read_jsonl

    queries, used = set(), set()
    for name in ("gold_standard_v3.jsonl", "gold_dev_v3.jsonl", "gold_confirm_v3.jsonl"):
        with open(DATA / name, "rb") as f:
            for g in read_jsonl(f, GoldQuery, name=name):
                queries.add(normalize(g.query))
                used.update(g.relevant_ids)
    return queries, used


def v3_dev_rows(passages: list[Passage], tafsir: dict[str, str], dev: frozenset[str]) -> list[GoldQuery]:
    """v3's queries (test and confirmation sets) whose relevant passages all lie in held-out-dev: choices may be
    made on them (they were looked at before; the test part of v3 is retired, not reused). The hand-written
    topics are independent unless a copy check fires; the rule-built ones share their rule."""
    from m3tune.jsonl import read_jsonl

    by_id = {p.id: p for p in passages}
    out = []
    for name in ("gold_standard_v3.jsonl", "gold_confirm_v3.jsonl"):
        with open(DATA / name, "rb") as f:
            for g in read_jsonl(f, GoldQuery, name=name):
                if not set(g.relevant_ids) <= dev:
                    continue
                if g.origin in RULE_SHARES:
                    shares = [RULE_SHARES[g.origin][0]]
                else:
                    shares = copies(g.query, g.language, g.category, [by_id[i] for i in g.relevant_ids], tafsir)
                out.append(g.model_copy(update={"id": f"v3-{g.id}", "split": "held-out-dev",
                                                "independent": not shares, "shares": shares}))
    return out


def build(passages: list[Passage], source_files: list[Path]) -> dict[str, list[GoldQuery]]:
    """{'held-out-test': rows, 'held-out-dev': rows} over PASSAGES."""
    from m3tune.corpus import heldout
    from m3tune.corpus.tafsir import explanations
    from m3tune.generation.base import twins

    partition, test = heldout.load(), heldout.load_test()
    same = twins(passages)
    tafsir = explanations()
    sources = []
    for path in source_files:
        sources += [(str(path), n, s) for n, s in enumerate(read_sources(path), start=1)]
    seen_ids: dict[str, str] = {}
    for shown, line, s in sources:
        if s.id in seen_ids:
            raise UserError(f"{shown}:{line}: id: duplicate query id {s.id!r} (also in {seen_ids[s.id]})")
        seen_ids[s.id] = f"{shown}:{line}"
    hand = resolve(sources, passages, same, partition, test, tafsir)
    taken, used = _v3_used()
    taken |= {normalize(g.query) for g in hand}
    rows = hand + rule_built(passages, same, test, taken, tafsir, used) + v3_dev_rows(passages, tafsir,
                                                                                     partition - test)
    return {part: [g for g in rows if g.split == part] for part in ("held-out-test", "held-out-dev")}


def _passages(corpus: str) -> list[Passage]:
    from m3tune.jsonl import read_jsonl

    with open(corpus, "rb") as f:
        return list(read_jsonl(f, Passage, name=corpus))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write data/gold_v4_test.jsonl and data/gold_v4_dev.jsonl")
    b.add_argument("--corpus", required=True, help="passages.jsonl of a full ingest (all sources)")
    b.add_argument("--out", default=str(DATA))
    c = sub.add_parser("check", help="resolve and check hand-written source files, one line a query")
    c.add_argument("files", nargs="+")
    c.add_argument("--corpus", required=True)
    args = parser.parse_args()
    passages = _passages(args.corpus)
    if args.command == "check":
        from m3tune.corpus import heldout
        from m3tune.corpus.tafsir import explanations
        from m3tune.generation.base import twins

        same, tafsir = twins(passages), explanations()
        for path in args.files:
            for n, s in enumerate(read_sources(Path(path)), start=1):
                try:
                    (g,) = resolve([(path, n, s)], passages, same, heldout.load(), heldout.load_test(), tafsir)
                except UserError as e:
                    print(f"ERROR {e}")
                    continue
                flag = "ok " if g.independent else "DEP"
                print(f"{flag} {g.id} [{g.split}] {len(g.relevant_ids)} rel {g.relevant_ids[:4]} "
                      f"{'; '.join(g.shares)}")
        return
    parts = build(passages, sorted(SOURCES.glob("*.jsonl")))
    out = Path(args.out)
    for part, rows in parts.items():
        name = f"gold_v4_{part.removeprefix('held-out-')}.jsonl"
        (out / name).write_text("".join(g.model_dump_json(exclude_defaults=False) + "\n" for g in rows),
                                encoding="utf-8")
        print(f"{len(rows)} {part} queries ({sum(g.independent for g in rows)} independent) -> {out / name}")
    print(json.dumps({p: len(r) for p, r in parts.items()}))


if __name__ == "__main__":
    main()
