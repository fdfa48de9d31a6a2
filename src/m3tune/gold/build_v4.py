"""Build gold v4 (`data/gold_v4_test.jsonl`, `data/gold_v4_dev.jsonl`) from hand-written sources and the corpus.

    python -m m3tune.gold.build_v4 build --corpus runs/full/ingest/passages.jsonl
    python -m m3tune.gold.build_v4 check gold/v4/test-quran.jsonl --corpus ...   (a writer's check)

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
  gives a verbatim phrase rule (`ar`: every passage holding the phrase); build.match resolves both, twins
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
from m3tune.evaluation.gold import PACKAGED
from m3tune.records import GoldQuery, Passage, PassageId, Text, source_of

REPO = Path(__file__).resolve().parents[3]
SOURCES = REPO / "gold" / "v4"
DATA = PACKAGED.parent  # the runtime reads what this writes from its own package folder
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


POOL = SOURCES / "judging" / "pool.jsonl"
JUDGMENTS = SOURCES / "judging" / "judgments.jsonl"


class Pooled(BaseModel):
    """One query's pool (gold/v4/pool.jsonl): the union of the top DEPTH of each system, in first-seen order."""

    model_config = ConfigDict(extra="forbid")

    query_id: Text
    depth: int = Field(ge=1)
    systems: list[Text] = Field(min_length=1)
    pooled: list[PassageId]


class Judgment(BaseModel):
    """One relevance judgment (gold/v4/judgments.jsonl), made by reading the passage against the query."""

    model_config = ConfigDict(extra="forbid")

    query_id: Text
    passage_id: PassageId
    relevant: bool
    note: str = ""


def make_pool(gold: list[GoldQuery], runs: dict[str, dict[str, list[str]]], depth: int) -> list[Pooled]:
    """Each query's pool: the top DEPTH of every system of RUNS ({system: {query id: ranked ids}})."""
    out = []
    for g in gold:
        pooled: dict[str, None] = {}
        for ranked in runs.values():
            pooled.update(dict.fromkeys(ranked.get(g.id, [])[:depth]))
        out.append(Pooled(query_id=g.id, depth=depth, systems=sorted(runs), pooled=list(pooled)))
    return out


def read_judgments(path: Path, pools: dict[str, Pooled]) -> dict[str, dict[str, bool]]:
    """{query id: {passage id: relevant}} of PATH, each row checked against the query's pool (a judgment of a
    passage the pool does not hold is an error: it was judged by another route than the one recorded)."""
    from m3tune.jsonl import RecordError, read_jsonl_numbered

    out: dict[str, dict[str, bool]] = {}
    with open(path, "rb") as f:
        for line, _, j in read_jsonl_numbered(f, Judgment, name=str(path)):
            pool = pools.get(j.query_id)
            if pool is None:
                raise RecordError(str(path), line, "query_id", f"query {j.query_id!r} has no pool")
            if j.passage_id not in pool.pooled:
                raise RecordError(str(path), line, "passage_id", f"{j.passage_id} is not in the pool of query "
                                  f"{j.query_id!r} (depth {pool.depth}, systems {', '.join(pool.systems)})")
            if j.passage_id in out.setdefault(j.query_id, {}):
                raise RecordError(str(path), line, "passage_id", f"{j.passage_id} judged twice for {j.query_id!r}")
            out[j.query_id][j.passage_id] = j.relevant
    return out


def read_pools(path: Path) -> dict[str, Pooled]:
    from m3tune.jsonl import read_jsonl

    with open(path, "rb") as f:
        return {p.query_id: p for p in read_jsonl(f, Pooled, name=str(path))}


def split_of(ids: list[str], test: frozenset[str], partition: frozenset[str]) -> str:
    from m3tune.corpus.heldout import DEV, TEST

    if all(i in test for i in ids):
        return TEST
    if all(i in partition and i not in test for i in ids):
        return DEV
    return "seen" if not all(i in partition for i in ids) else "mixed"


def resolve(sources: list[tuple[str, int, Source]], passages: list[Passage], same: dict[str, list[str]],
            partition: frozenset[str], test: frozenset[str], tafsir: dict[str, str],
            judged: dict[str, dict[str, bool]] | None = None, dropped: list[dict] | None = None) -> list[GoldQuery]:
    """GoldQuery rows for SOURCES ((file, line, source)); a query whose named passages leave its part is an
    error. JUDGED ({query: {passage: relevant}}) adds the pooled passages judged relevant (and their twins); a
    query they take out of its part is not held out after all: it goes to DROPPED, with the passages why."""
    from m3tune.arabic import detect_language
    from m3tune.gold.build import Rule, match
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
        found = [t for pid, ok in (judged or {}).get(s.id, {}).items() if ok for t in same.get(pid, [pid])]
        if part in ("held-out-dev", "held-out-test") and set(found) - set(ids):
            ids = [p.id for p in passages if p.id in set(ids) | set(found)]
            now = split_of(ids, test, partition)
            if now != part:
                out_of_part = [i for i in ids if split_of([i], test, partition) != part]
                if dropped is None:
                    raise RecordError(shown, line, "relevant", f"query {s.id!r}: passages judged relevant "
                                      f"({', '.join(out_of_part[:3])}) lie outside {part}")
                dropped.append({"id": s.id, "query": s.query, "part": part, "outside": out_of_part})
                continue
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
    from m3tune.gold.build import _rule_built, match

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


def build(passages: list[Passage], source_files: list[Path], dropped: list[dict] | None = None
          ) -> dict[str, list[GoldQuery]]:
    """{'held-out-test': rows, 'held-out-dev': rows} over PASSAGES; DROPPED gets the hand-written queries the
    pooled judgments took out of their part."""
    dropped = [] if dropped is None else dropped
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
    judged = read_judgments(JUDGMENTS, read_pools(POOL)) if JUDGMENTS.exists() else None
    hand = resolve(sources, passages, same, partition, test, tafsir, judged, dropped)
    taken, used = _v3_used()
    taken |= {normalize(g.query) for g in hand}
    rows = hand + rule_built(passages, same, test, taken, tafsir, used) + v3_dev_rows(passages, tafsir,
                                                                                     partition - test)
    return {part: [g for g in rows if g.split == part] for part in ("held-out-test", "held-out-dev")}


README = """# Gold v4: held-out-dev and held-out-test

Built by `python -m m3tune.gold.build_v4 build --corpus PASSAGES` from the hand-written sources in
`gold/v4/*.jsonl`, the pooled judgments in `gold/v4/judging/`, and the corpus; a test rebuilds both files and
checks they are unchanged. One GoldQuery a line, with `split`, `independent` and `shares`.

## The two parts

The held-out partition (`m3tune.corpus.heldout`, 2,002 passages training never sees) is split by whole surahs
and books, and by subject, with every near-duplicate group kept on one side:

- **held-out-test** ({test_passages} passages): surahs 12 (Yusuf), 18 (al-Kahf), 24 (an-Nur), 36 (Ya-Sin);
  Bukhari books 70 (Food), 74 (Drinks), 77 (Dress); Muslim books 36 (Drinks), 37 (Clothes and adornment).
  Read once per reported result; nothing is chosen on it.
- **held-out-dev** (the other {dev_passages}): surahs 19, 27, 31; Bukhari 71-73, 75, 76; Muslim 34, 35, 39.
  Every choice (configs, steps, weights, thresholds) is made here; the selection scripts refuse any other file
  (`m3tune.evaluation.gold.load_for_selection`).

| file | queries | independent | exact | thematic | paraphrase | cross_lingual |
|---|---:|---:|---:|---:|---:|---:|
{counts}

## Where the queries come from

- `hand-quote`, `hand-topic`, `hand-question`, `hand-paraphrase`, `hand-english` (ids `tq-`, `th-`, `te-`,
  `d-`): written one by one on 2026-12-07 by the m3tune team's writers (language-model agents given the
  passages of one part and the rules below, not people who search these texts), the way a reader types: quotes
  remembered without diacritics, topics and questions in their own words, English in their own English (not the
  Sahih International wording BM25 and the offline generator read). Relevance: verse ranges and hadith ids
  named by the writer, or verbatim phrases (`m3tune.gold.build.match`), plus the pooled judgments below. A query
  whose relevance reached outside its part was rewritten or dropped while writing.
- `exact-span`, `english-span`, `tafsir-paraphrase` (ids `v4-test-*`): v3's rules with the seed `gold-v4-test`
  over held-out-test passages no v3 query used. A training generator shares each rule (`shares` says which),
  so these rows are `independent: false`: reported apart, as a "learns the task" figure.
- `v3-*` (held-out-dev only): v3's test and confirmation queries whose passages all lie in held-out-dev.
  v3's queries in held-out-test were looked at while [3/7]'s config was chosen; none of them is in v4's test.

## Independence

A hand-written query is `independent` unless one of these checks fires (then `shares` names it):
a run of {run} words shared with the Sahih International translation of a relevant verse (English queries:
the offline generator's text), with al-Tafsir al-Muyassar on a relevant verse (Arabic: `--tafsir`'s text), or,
for a topic or question, with a relevant passage itself (a quote: `generate-exact`'s rule). The writers were
shown these flags and rewrote what they caught. tests/test_gold_v4.py recomputes every tag, and checks that
each rule a rule-built row claims to share is in the named generator's source. Not checked: the offline
generator's theme lexicon (some Arabic queries hold a word form of a seen theme's lexicon), and the quotes do
the task `generate-exact` trains (on passages it never saw): read them as "quotes of unseen text".

## Pooled judgments

{pooling}

## Queries

| id | part | independent | category | query | relevant |
|---|---|---|---|---|---|
"""


def readme(parts: dict[str, list[GoldQuery]], dropped: list[dict]) -> str:
    from collections import Counter

    from m3tune.corpus import heldout

    cats = ("exact", "thematic", "paraphrase", "cross_lingual")
    counts = []
    for part, rows in parts.items():
        c = Counter(g.category for g in rows if g.independent)
        counts.append(f"| gold_v4_{part.removeprefix('held-out-')}.jsonl | {len(rows)} | "
                      f"{sum(g.independent for g in rows)} | " + " | ".join(
                          f"{c[k]} ({sum(g.category == k for g in rows)})" for k in cats) + " |")
    counts.append("\nIn the category columns: independent (all).")
    if POOL.exists():
        pools = read_pools(POOL)
        judged = read_judgments(JUDGMENTS, pools) if JUDGMENTS.exists() else {}
        n = sum(len(v) for v in judged.values())
        first = next(iter(pools.values()))
        pooling = (f"Every hand-written held-out-test query was pooled (`m3tune.gold.build_v4 pool`): the top "
                   f"{first.depth} of each of {len(first.systems)} systems ({', '.join(first.systems)}). "
                   f"Each pooled passage not already relevant by the writer's rule was read against the query and "
                   f"judged (`judging/judgments.jsonl`: {n} judgments, "
                   f"{sum(v for j in judged.values() for v in j.values())} relevant, added with their twins). A "
                   f"query a judged-relevant passage takes out of held-out-test is not held out: dropped "
                   f"({len(dropped)}): " + (", ".join(f"{d['id']} ({', '.join(d['outside'][:2])})" for d in dropped)
                                            or "none") + ".")
    else:
        pooling = "Not pooled yet: relevance is the writers' (verse ranges, ids, verbatim phrases)."
    partition, test = heldout.load(), heldout.load_test()
    text = README.format(test_passages=f"{len(test):,}", dev_passages=f"{len(partition - test):,}",
                         counts="\n".join(counts), run=SHARED_RUN, pooling=pooling)
    for part, rows in parts.items():
        for g in rows:
            shown = ", ".join(g.relevant_ids[:5]) + (f" … ({len(g.relevant_ids)})" if len(g.relevant_ids) > 5 else "")
            text += (f"| {g.id} | {part.removeprefix('held-out-')} | {'yes' if g.independent else 'no'} | "
                     f"{g.category} | {g.query.replace('|', '/')} | {shown} |\n")
    return text


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
    pl = sub.add_parser("pool", help="write gold/v4/judging/pool.jsonl: the top DEPTH of each system's ranking "
                        "of the hand-written held-out-test queries, from evaluate's per_query.jsonl files")
    pl.add_argument("per_query", nargs="+", help="PER_QUERY.jsonl[:MODEL,MODEL...] (default: every model)")
    pl.add_argument("--depth", type=int, default=10)
    pl.add_argument("--corpus", required=True)
    c = sub.add_parser("check", help="resolve and check hand-written source files, one line a query")
    c.add_argument("files", nargs="+")
    c.add_argument("--corpus", required=True)
    args = parser.parse_args()
    passages = _passages(args.corpus)
    if args.command == "pool":
        runs: dict[str, dict[str, list[str]]] = {}
        for spec in args.per_query:
            path, _, models = spec.partition(":")
            with open(path, encoding="utf-8") as f:
                for row in map(json.loads, f):
                    if not models or row["model"] in models.split(","):
                        runs.setdefault(f"{path}:{row['model']}", {})[row["query_id"]] = row["top10"]
        if args.depth > 10:
            raise UserError("--depth: evaluate's per_query.jsonl keeps each model's top 10")
        gold = [g for g in build(passages, sorted(SOURCES.glob("*.jsonl")))["held-out-test"]
                if g.origin.startswith("hand-")]
        pools = make_pool(gold, runs, args.depth)
        POOL.parent.mkdir(parents=True, exist_ok=True)
        POOL.write_text("".join(p.model_dump_json() + "\n" for p in pools), encoding="utf-8")
        todo = sum(len(set(p.pooled) - set(g.relevant_ids)) for p, g in zip(pools, gold))
        print(f"{len(pools)} pools of depth {args.depth} over {len(runs)} systems; {todo} passages to judge "
              f"-> {POOL}")
        return
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
    dropped: list[dict] = []
    parts = build(passages, sorted(SOURCES.glob("*.jsonl")), dropped)
    out = Path(args.out)
    (out / "README_v4.md").write_text(readme(parts, dropped), encoding="utf-8")
    for part, rows in parts.items():
        name = f"gold_v4_{part.removeprefix('held-out-')}.jsonl"
        (out / name).write_text("".join(g.model_dump_json(exclude_defaults=False) + "\n" for g in rows),
                                encoding="utf-8")
        print(f"{len(rows)} {part} queries ({sum(g.independent for g in rows)} independent) -> {out / name}")
    print(json.dumps({p: len(r) for p, r in parts.items()}))


if __name__ == "__main__":
    main()
