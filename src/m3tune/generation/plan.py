"""`--dry-run` for the generation steps: what a run would send, and what it would cost. Calls nothing."""

from __future__ import annotations

from pydantic import BaseModel

from m3tune.corpus.passages import read_passages
from m3tune.storage import Store

# Rough sizes for the estimate: ~3 characters a token across Arabic and
# English with current tokenizers, and ~30 tokens of JSON per query written.
CHARS_PER_TOKEN = 3.0
TOKENS_PER_QUERY = 30


def _estimate(items, answers_per_item: int, settings) -> str:
    prompt_tokens = sum(sum(len(m["content"]) for m in it.messages) for it in items) / CHARS_PER_TOKEN
    completion_tokens = len(items) * answers_per_item * TOKENS_PER_QUERY
    line = (f"requests: {len(items):,} (plus retries and at most one re-ask each)\n"
            f"tokens (estimate): {prompt_tokens:,.0f} prompt + {completion_tokens:,.0f} completion")
    if settings.price_in is not None and settings.price_out is not None:
        cost = (prompt_tokens * settings.price_in + completion_tokens * settings.price_out) / 1e6
        line += f"\ncost (estimate): ${cost:,.2f}"
    else:
        line += "\ncost: give --price-in and --price-out (USD per million tokens) for an estimate"
    return line


def _show(items, n: int = 2) -> str:
    parts = []
    for it in items[:n]:
        parts.append(f"--- request for {it.key} ---")
        parts += [f"[{m['role']}]\n{m['content']}" for m in it.messages]
    return "\n".join(parts)


def plan_queries(root: Store, config: BaseModel) -> str:
    """What generate-queries would do with CONFIG over the passages ingested in ROOT."""
    from m3tune.generation.offline import Corpus, passage_queries
    from m3tune.generation.prompts import load_prompt
    from m3tune.generation.queries import allocation, select, work_items

    passages = read_passages(root)
    selected = select(passages, sources=config.sources, pilot=config.pilot, seed=config.seed)
    n_ar, n_en = allocation(config.queries_per_passage, config.arabic_share)
    head = f"generate-queries, backend {config.backend}: {len(selected):,} passages, {n_ar} Arabic + {n_en} English queries each"
    if config.backend == "offline":
        corpus = Corpus(passages)
        sample = [q for p in selected[:3] for q in passage_queries(
            corpus, corpus.by_id[p.id], ar=n_ar, en=n_en if p.translation_en else 0, types=config.types)]
        return head + "\nrequests: 0 (offline)\nsample queries:\n" + "\n".join(
            f"  {q.id}  [{q.language} {q.type}]  {q.query}" for q in sample)
    items = list(work_items(selected, load_prompt(config.prompt), n_ar=n_ar, n_en=n_en, types=config.types))
    return f"{head}\nmodel {config.llm.model} at {config.llm.base_url}\n{_estimate(items, n_ar + n_en, config.llm)}\n{_show(items)}"


def plan_conceptual(root: Store, config: BaseModel) -> str:
    """What generate-conceptual would do with CONFIG over the passages ingested in ROOT."""
    from m3tune.generation.conceptual import prepare, theme_items
    from m3tune.generation.offline import theme_queries
    from m3tune.generation.prompts import load_prompt

    passages = read_passages(root)
    corpus, version, themes, candidates = prepare(
        passages, themes_file=config.themes_file, sources=config.sources, max_positives=config.max_positives,
        min_hits_quran=config.min_hits_quran, min_hits_hadith=config.min_hits_hadith)
    head = f"generate-conceptual, backend {config.backend}: {len(themes)} themes ({version})"
    if config.backend == "offline":
        sample = [q for t in themes[:2] for q in theme_queries(t, candidates[t.id])][:8]
        return head + "\nrequests: 0 (offline)\nsample queries:\n" + "\n".join(
            f"  {q.id}  [{q.language}]  {q.query}  ({len(q.positive_ids)} positives)" for q in sample)
    passage_of = {d.passage.id: d.passage for d in corpus.docs}
    items = theme_items(themes, candidates, passage_of, load_prompt(config.prompt), sources=config.sources,
                        queries_per_theme=config.queries_per_theme, arabic_share=config.arabic_share)
    return (f"{head}\nmodel {config.llm.model} at {config.llm.base_url}\n"
            f"{_estimate(items, config.queries_per_theme, config.llm)}\n{_show(items, 1)}")
