"""The `generate-exact` step: exact-quote queries, a span of a passage as a reader would type it.

Users search by quoting (30 of the 85 hand-checked v2 gold queries are
quotes), while the other generators reject any query that copies more than
`max_copy_words` words of its passage. This step writes the quotes: no LLM,
rule-based, deterministic for a seed.

How spans are chosen, per passage (each with its own seeded RNG, so a span
does not depend on which other passages were drawn):

- passages: those of `sources`, minus the held-out partition
  (m3tune.corpus.heldout), in a seeded order; `pilot` keeps the first N;
- words: a hadith's as a reader types them (marks stripped,
  m3tune.arabic.strip_marks) where they normalize to `text_plain`'s; a
  verse's are `text_plain`'s, as the gold's (strip_marks keeps Uthmani
  spellings no reader types);
- a hadith's span lies in the last third of its words, past the chain of
  narrators, and holds no word of a chain or a blessing formula (the gold's
  exact spans follow the same rule: m3tune.gold.build);
- length: `min_words` to `max_words`, drawn uniformly; spans of one passage
  do not overlap;
- a span needs `min_content_words` words of 3+ letters that are not Arabic
  stop-words (stopwords-iso), so «قال لهم ان» is never a query;
- at most 20 draws per span asked: a short verse or a hadith whose last
  third is mostly chain and formula may give fewer (the rejected draws are
  counted by reason in the manifest).

Positives: every passage of the corpus whose `text_plain` contains the
normalized span as whole words, the first of which may carry a one-letter
proclitic (و ف ب ل ك) — the rule by which the gold decides an exact query's
relevant passages (m3tune.gold.build.match), so a training quote is labelled as the
gold labels one. They are found through an inverted index of words: the
candidates hold the span's two rarest words (after the first), and only they
are checked against the phrase. A span is dropped, and counted, when it
matches more than `max_matches` passages (a formula repeated across the
corpus is no search for one passage), or any held-out passage (held-out
passages are never a source nor a positive), or when its normalized text
repeats an earlier span.

The copy rule of the other generators does not apply to type `exact`
(m3tune.generation.validate); the other checks do. The step is not sharded:
the whole packaged corpus takes seconds.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from m3tune.context import StepContext
from m3tune.records import Generator, Passage, Query, source_of

PROCLITICS = "وفبلك"  # as build_gold's rule: «ومن غشنا» holds «من غشنا»
GENERATOR = Generator(backend="rule", model="exact-span", prompt_version="exact-v1")


class GenerateExactConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pilot: int = Field(default=500, ge=0, description="only the first N passages of a seeded shuffle (as "
                       "generate-queries' pilot); 0 for every passage")
    seed: int = Field(default=13, description="seed of the passage order and of each passage's own span draws")
    sources: list[Literal["quran", "hadith"]] = Field(default=["quran", "hadith"], json_schema_extra={"cli": "source"},
                                                       description="passages spans are taken from (positives "
                                                       "come from the whole corpus)")
    spans_per_passage: int = Field(default=1, ge=1, le=20, description="exact queries per passage, non-overlapping")
    min_words: int = Field(default=4, ge=2, description="shortest span, in words; a span's length is drawn "
                           "uniformly from min-words to max-words")
    max_words: int = Field(default=12, ge=2, le=24, description="longest span, in words; a hadith's span lies in "
                           "the last third of its words, past the chain of narrators, and holds no word of a chain "
                           "or a blessing formula (the gold's exact-span rule)")
    min_content_words: int = Field(default=3, ge=1, description="words of 3+ letters that are not Arabic "
                                   "stop-words (stopwords-iso) a span needs")
    max_matches: int = Field(default=20, ge=1, description="positives are every passage whose text_plain holds "
                             "the normalized span as whole words (its first word may carry و ف ب ل ك: the gold's "
                             "rule); a span found in more passages than this is dropped (a formula or a refrain)")
    held_out: str | None = Field(default="packaged", description="the held-out partition ('packaged': "
                                 "m3tune.corpus.heldout's; a path or URI; null: none): never a source, and a span "
                                 "found in one of its passages is dropped")

    @model_validator(mode="after")
    def _lengths(self) -> "GenerateExactConfig":
        if self.max_words < self.min_words:
            raise ValueError(f"max_words ({self.max_words}) must be at least min_words ({self.min_words})")
        if self.min_content_words > self.max_words:
            raise ValueError(f"min_content_words ({self.min_content_words}) cannot exceed max_words "
                             f"({self.max_words})")
        return self


def generate_exact_inputs(config: GenerateExactConfig) -> dict[str, str]:
    from m3tune.corpus import heldout

    return {f"held-out:{config.held_out}": heldout.digest(config.held_out)} if config.held_out is not None else {}


class PhraseIndex:
    """Which passages contain a normalized phrase as whole words (m3tune.gold.build.match's rule, indexed).

    An inverted index of each passage's words: the passages holding the
    phrase's two rarest words (not the first, which may carry a proclitic)
    are the only candidates, and only they are checked (`contains`). A scan
    of the corpus per span would cost 21k substring searches.
    """

    def __init__(self, passages: list[Passage]):
        self.passages = passages
        self.postings: dict[str, list[int]] = {}
        for i, p in enumerate(passages):
            for w in set(p.text_plain.split()):
                self.postings.setdefault(w, []).append(i)

    def find(self, phrase: str) -> list[str]:
        """Ids of the passages containing PHRASE (normalized here), in corpus order."""
        from m3tune.arabic import normalize

        plain = normalize(phrase)
        words = plain.split()
        if not words:
            return []
        rest = sorted(set(words[1:]), key=lambda w: (len(self.postings.get(w, ())), w))
        if not rest:  # a one-word phrase: its word may carry a proclitic, so no exact posting covers it
            candidates: Iterable[int] = range(len(self.passages))
        else:
            found = set(self.postings.get(rest[0], ()))
            if len(rest) > 1:
                found.intersection_update(self.postings.get(rest[1], ()))
            candidates = sorted(found)
        return [self.passages[i].id for i in candidates if contains(self.passages[i].text_plain, plain)]


def contains(text: str, plain: str) -> bool:
    """Whether normalized TEXT holds the normalized phrase PLAIN as whole words, the first of which may carry
    a one-letter proclitic: build_gold's pattern `(^| )[وفبلك]?PLAIN(?= |$)`, by hand because compiling a
    pattern per span took 9 of the 13 seconds over the whole corpus (tests check both agree)."""
    start = text.find(plain)
    while start >= 0:
        end = start + len(plain)
        before = start == 0 or text[start - 1] == " " or (
            text[start - 1] in PROCLITICS and (start == 1 or text[start - 2] == " "))
        if before and (end == len(text) or text[end] == " "):
            return True
        start = text.find(plain, start + 1)
    return False


def typed_span(p: Passage, typed: list[str], i: int, n: int) -> str:
    """Words I..I+N of P as a reader types them: a hadith's with marks stripped (TYPED) when they normalize to
    text_plain's words (so the span's positives are what it finds); a verse's, or any other, text_plain's
    (strip_marks' Uthmani forms, ذالك or لأية, are not what a reader types: the gold's spans do the same)."""
    from m3tune.arabic import normalize

    plain = p.text_plain.split()[i:i + n]
    if p.source == "hadith" and len(typed) == len(p.text_plain.split()):
        span = typed[i:i + n]
        if normalize(" ".join(span)).split() == plain:
            return " ".join(span)
    return " ".join(plain)


def candidate_spans(p: Passage, rng: random.Random, rejected: Counter[str], *, min_words: int, max_words: int,
                    min_content_words: int, tries: int) -> Iterator[tuple[int, int]]:
    """Drawn (start, length) spans of P's words that pass the word rules, lazily, at most TRIES draws; a
    rejected draw is counted in REJECTED by reason. Spans may overlap here."""
    from m3tune.arabic import CHAIN_WORDS as _CHAIN
    from m3tune.arabic import content_words as _content
    from m3tune.arabic import stop_words_ar as _stop_ar

    words = p.text_plain.split()
    low = 2 * len(words) // 3 if p.source == "hadith" else 0  # a hadith's body: past its chain of narrators
    if len(words) - low < min_words:
        rejected["passage_too_short"] += 1
        return
    stop = _stop_ar()
    for _ in range(tries):
        n = rng.randint(min_words, min(max_words, len(words) - low))
        i = rng.randint(low, len(words) - n)
        span = words[i:i + n]
        if p.source == "hadith" and not _CHAIN.isdisjoint(span):
            rejected["chain_or_formula"] += 1
        elif len(_content(span, stop)) < min_content_words:
            rejected["stop_words"] += 1
        else:
            yield i, n


def passage_spans(p: Passage, index: PhraseIndex, held: frozenset[str], taken: set[str], *, seed: int, count: int,
                  min_words: int, max_words: int, min_content_words: int, max_matches: int
                  ) -> tuple[list[Query], Counter[str]]:
    """Up to COUNT exact queries from P (TAKEN: normalized spans already used, updated), and the rejected
    candidates by reason."""
    from m3tune.arabic import normalize, strip_marks
    from m3tune.arabic import WORD as _WORD

    rng = random.Random(f"{seed}/exact/{p.id}")
    rejected: Counter[str] = Counter()
    spans = candidate_spans(p, rng, rejected, min_words=min_words, max_words=max_words,
                            min_content_words=min_content_words, tries=20 * count)  # 8 left 13% of passages bare
    typed = _WORD.findall(strip_marks(p.text)) if p.source == "hadith" else []
    used: list[tuple[int, int]] = []
    out: list[Query] = []
    for i, n in spans:
        if any(i < j + m and j < i + n for j, m in used):
            rejected["overlaps"] += 1
            continue
        query = typed_span(p, typed, i, n)
        key = normalize(query)
        if key in taken:
            rejected["duplicate"] += 1
            continue
        positives = index.find(key)
        if len(positives) > max_matches:
            rejected["too_common"] += 1
            continue
        if not held.isdisjoint(positives):
            rejected["matches_held_out"] += 1
            continue
        if p.id not in positives:  # the typed words normalize to another phrase than text_plain's
            rejected["not_found_in_source"] += 1
            continue
        taken.add(key)
        used.append((i, n))
        ids = [p.id] + [pid for pid in positives if pid != p.id]  # the source first, as the other generators do
        out.append(Query(id=f"{p.id}/exact-{len(out)}", query=query, language="ar", type="exact", positive_ids=ids,
                         source=source_of(ids), generator=GENERATOR))
        if len(out) == count:
            break
    return out, rejected


def select(passages: list[Passage], held: frozenset[str], *, sources: list[str], pilot: int, seed: int
           ) -> list[Passage]:
    from m3tune.generation.base import seeded_order

    by_id = {p.id: p for p in passages if p.source in sources and p.id not in held}
    order = seeded_order(list(by_id), seed)
    return [by_id[i] for i in (order[:pilot] if pilot else order)]


def exact_queries(passages: list[Passage], held: frozenset[str], *, pilot: int, seed: int, sources: list[str],
                  spans_per_passage: int, min_words: int, max_words: int, min_content_words: int,
                  max_matches: int, progress: bool = False) -> tuple[list[Query], list[Passage], Counter[str]]:
    """(queries, passages they were drawn from, rejected candidate spans by reason) over PASSAGES."""
    selected = select(passages, held, sources=sources, pilot=pilot, seed=seed)
    index = PhraseIndex(passages)
    taken: set[str] = set()
    queries: list[Query] = []
    rejected: Counter[str] = Counter()
    if progress:
        from m3tune.progress import track

        selected_iter = track(selected, description="exact spans", total=len(selected))
    else:
        selected_iter = selected
    for p in selected_iter:
        got, why = passage_spans(p, index, held, taken, seed=seed, count=spans_per_passage, min_words=min_words,
                                 max_words=max_words, min_content_words=min_content_words, max_matches=max_matches)
        queries += got
        rejected.update(why)
    return queries, selected, rejected


def generate_exact(ctx: StepContext, *, pilot: int, seed: int, sources: list[str], spans_per_passage: int,
                   min_words: int, max_words: int, min_content_words: int, max_matches: int,
                   held_out: str | None) -> dict[str, Any]:
    from m3tune.corpus import heldout
    from m3tune.corpus.passages import read_passages
    from m3tune.errors import UserError
    from m3tune.generation.base import check_and_publish

    passages = read_passages(ctx.root)
    held = heldout.load(held_out)
    queries, selected, rejected = exact_queries(
        passages, held, pilot=pilot, seed=seed, sources=sources, spans_per_passage=spans_per_passage,
        min_words=min_words, max_words=max_words, min_content_words=min_content_words, max_matches=max_matches,
        progress=True)
    ctx.log.info("%s passages drawn (pilot %s, %s held out), %d span(s) each asked; %s candidate spans rejected: %s",
                 f"{len(selected):,}", pilot or "off", f"{len(held):,}", spans_per_passage,
                 f"{sum(rejected.values()):,}", dict(rejected) or "none")
    if not queries:  # an empty queries.jsonl is no valid JSONL for mine-negatives: say why here
        raise UserError(f"generate-exact: no span of the {len(selected):,} passages drawn passes the rules "
                        f"(rejected: {dict(rejected) or 'none'}); lower --min-words or --min-content-words, or "
                        "raise --max-matches or --pilot")
    by_id = {p.id: p for p in passages}
    # The validator's other checks (language, length, duplicates) apply; its copy rule exempts type exact.
    result, kept = check_and_publish(ctx, [(q, [by_id[q.positive_ids[0]].text]) for q in queries], min_chars=4,
                                     max_words=max_words, max_copy_words=1,
                                     extra={"passages": len(selected), "rejected_spans": dict(rejected)})
    positives = sorted(len(q.positive_ids) for q in kept)
    result["counts"]["positives_per_query"] = round(sum(positives) / max(1, len(kept)), 2)
    result["counts"]["max_positives"] = positives[-1] if positives else 0
    result["counts"]["words"] = dict(sorted(Counter(len(q.query.split()) for q in kept).items()))
    return result


def plan_exact(root, config: GenerateExactConfig) -> str:
    """`--dry-run`: how many passages would be drawn, and the first spans."""
    from m3tune.corpus import heldout
    from m3tune.corpus.passages import read_passages

    passages = read_passages(root)
    held = heldout.load(config.held_out)
    selected = select(passages, held, sources=config.sources, pilot=config.pilot, seed=config.seed)
    sample, _, _ = exact_queries(passages, held, pilot=min(5, len(selected)) or 1, seed=config.seed,
                                 sources=config.sources, spans_per_passage=config.spans_per_passage,
                                 min_words=config.min_words, max_words=config.max_words,
                                 min_content_words=config.min_content_words, max_matches=config.max_matches)
    head = (f"generate-exact (rule-based, no requests): {len(selected):,} passages, up to "
            f"{config.spans_per_passage} span(s) of {config.min_words}-{config.max_words} words each")
    return head + "\nsample queries:\n" + "\n".join(
        f"  {q.id}  {q.query}  ({len(q.positive_ids)} positives)" for q in sample)
