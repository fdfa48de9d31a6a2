"""The `m3tune` command line.

    m3tune run     the whole pipeline, locally, resuming
    m3tune step    one step (what each Argo task runs)
    m3tune status  per step: done / stale / missing, with counts
    m3tune analyze shares and targets of any queries/examples JSONL
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import BaseModel, ValidationError

from m3tune.errors import ConfigError, UserError

app = typer.Typer(
    name="m3tune",
    help="Fine-tune BGE-M3 for Arabic Islamic search (Quran and Hadith): from corpus to evaluated model.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
step_app = typer.Typer(help="Run one step of a run (skipped when its manifest proves it done; --force reruns).",
                       no_args_is_help=True)
app.add_typer(step_app, name="step")

EXIT_ERROR = 1
EXIT_TARGETS_MISSED = 3

RootOpt = Annotated[Optional[str], typer.Option(
    "--root", envvar="M3TUNE_ROOT", show_envvar=True,
    help="Run root URI: file:///…/runs/RUN_ID, s3://bucket/prefix/RUN_ID or a path. Or use --runs and --run-id.")]
RunsOpt = Annotated[str, typer.Option(
    "--runs", envvar="M3TUNE_RUNS", show_envvar=True, help="Where runs live; the root is RUNS/RUN_ID.")]
RunIdOpt = Annotated[Optional[str], typer.Option(
    "--run-id", envvar="M3TUNE_RUN_ID", show_envvar=True,
    help="Run id: letters, digits, '.', '_', '-' (no '/', no '..').")]
EndpointOpt = Annotated[Optional[str], typer.Option(
    "--s3-endpoint", envvar="M3TUNE_S3_ENDPOINT", show_envvar=True,
    help="S3-compatible endpoint URL (MinIO, moto, …); credentials come from the usual AWS variables.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs and full tracebacks.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rerun even if the step's manifest proves it done.")]


def _setup(verbose: bool, s3_endpoint: str | None) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    if s3_endpoint:
        os.environ["M3TUNE_S3_ENDPOINT"] = s3_endpoint
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False, markup=False,
                                              rich_tracebacks=verbose)], force=True)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "httpx", "httpx2", "httpcore", "httpcore2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _state["verbose"] = verbose


_state: dict[str, Any] = {"verbose": False}


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _errors(fn):
    """Turn the errors a user can fix into one clear line and an exit code, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from m3tune.analysis.analyze import TargetsMissed

        try:
            return fn(*args, **kwargs)
        except TargetsMissed as e:
            raise _fail(str(e), EXIT_TARGETS_MISSED) from None
        except UserError as e:
            if _state["verbose"]:
                raise
            raise _fail(str(e)) from None

    return wrapper


def _root(root: str | None, runs: str, run_id: str | None):
    from m3tune.storage import open_root, run_root_uri

    if root and run_id:
        raise ConfigError("give either --root or --run-id, not both")
    if not root:
        if not run_id:
            raise ConfigError("no run given: pass --root URI, or --run-id ID (with --runs, default ./runs)")
        root = run_root_uri(runs, run_id)
    return open_root(root)


def _build(model: type[BaseModel], values: dict[str, Any], where: str) -> BaseModel:
    try:
        return model.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(top)'}: {err['msg']}"
                             for err in e.errors(include_url=False))
        raise ConfigError(f"{where}: {problems}") from None


def load_run_config(path: Path | None) -> dict[str, BaseModel]:
    """Per-step configs from a YAML/JSON file {step: {option: value}}; absent steps use defaults."""
    from m3tune.pipeline import STEPS

    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of step name to options")
    configs = {}
    for name, values in data.items():
        if name not in STEPS:
            raise ConfigError(f"{path}: unknown step {name!r}; steps: {', '.join(STEPS)}")
        configs[name] = _build(STEPS[name].config, values or {}, f"{path}: {name}")
    return configs


def _fmt_counts(counts: dict[str, Any]) -> str:
    """{'passages': 21176, 'by_source': {'quran': 6236}} -> 'passages 21,176 · by_source: quran 6,236'."""
    def fmt(v: Any) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k} {fmt(x)}" for k, x in v.items()) or "none"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    return " · ".join(f"{k}: {fmt(v)}" if isinstance(v, dict) else f"{k} {fmt(v)}" for k, v in counts.items())


def _print_manifest(manifest, ran: bool) -> None:
    from rich.console import Console

    verb = ("ran" if manifest.complete else "ran, INCOMPLETE") if ran else "skipped (done)"
    console = Console()
    console.print(f"[bold]{manifest.step}[/bold] {verb}: {_fmt_counts(manifest.counts)}", highlight=False)
    for name, info in manifest.outputs.items():
        rows = f"{info.rows:,} rows, " if info.rows is not None else ""
        console.print(f"  {name}: {rows}{info.bytes:,} bytes")


@app.command()
@_errors
def run(
    root: RootOpt = None,
    runs: RunsOpt = "runs",
    run_id: RunIdOpt = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", exists=True, dir_okay=False,
                      help="YAML with per-step options, e.g. 'ingest: {limit: 100}'. Defaults otherwise.")] = None,
    force: Annotated[list[str], typer.Option("--force", help="Rerun this step even if done (repeatable).")] = [],
    until: Annotated[Optional[str], typer.Option("--until", help="Stop after this step.")] = None,
    s3_endpoint: EndpointOpt = None,
    verbose: VerboseOpt = False,
):
    """Run the whole pipeline locally, in order. Finished steps are skipped, so a rerun resumes."""
    from rich.console import Console

    from m3tune.executor import run_pipeline
    from m3tune.manifest import read_manifest
    from m3tune.pipeline import PIPELINE

    _setup(verbose, s3_endpoint)
    store = _root(root, runs, run_id)
    configs = load_run_config(config)
    unknown = [f for f in force if f not in PIPELINE]
    if unknown:
        raise ConfigError(f"--force {unknown[0]!r} is not a pipeline step; steps: {', '.join(PIPELINE)}")
    ran = run_pipeline(store, configs, force=set(force), until=until)
    for name, did_run in ran:
        _print_manifest(read_manifest(store.child(name)), did_run)
    if "analyze" in dict(ran):
        from m3tune.analysis.analyze import render_report

        Console().print(render_report(json.loads(store.child("analyze").read_bytes("report.json"))))
    Console().print(f"\nrun root: [bold]{store.uri}[/bold]")


@app.command()
@_errors
def status(
    root: RootOpt = None,
    runs: RunsOpt = "runs",
    run_id: RunIdOpt = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", exists=True, dir_okay=False,
                      help="Compare against this config (else the defaults, as `m3tune run` without --config).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    s3_endpoint: EndpointOpt = None,
    verbose: VerboseOpt = False,
):
    """Show each step of a run: done, stale (inputs or config changed) or missing, with counts."""
    from rich.console import Console
    from rich.table import Table

    from m3tune.executor import pipeline_status

    _setup(verbose, s3_endpoint)
    store = _root(root, runs, run_id)
    statuses = pipeline_status(store, load_run_config(config))
    if as_json:
        typer.echo(json.dumps([{"step": s.step, "state": s.state, "reason": s.reason,
                                "counts": s.manifest.counts if s.manifest else None,
                                "finished_at": s.manifest.finished_at if s.manifest else None}
                               for s in statuses], ensure_ascii=False, indent=2))
        return
    table = Table(title=store.uri, title_justify="left")
    for col in ("step", "state", "why", "counts", "finished"):
        table.add_column(col)
    colour = {"done": "green", "stale": "yellow", "missing": "red"}
    for s in statuses:
        table.add_row(s.step, f"[{colour[s.state]}]{s.state}[/]", s.reason,
                      _fmt_counts(s.manifest.counts) if s.manifest else "",
                      s.manifest.finished_at if s.manifest else "")
    Console().print(table)


@step_app.command("ingest")
@_errors
def step_ingest(
    root: RootOpt = None,
    runs: RunsOpt = "runs",
    run_id: RunIdOpt = None,
    source: Annotated[Optional[list[str]], typer.Option(
        "--source", help="Packaged corpus: quran, bukhari, muslim (repeatable; default all three).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most N passages from each source and user file.")] = None,
    user_file: Annotated[Optional[list[str]], typer.Option(
        "--user-file", help="JSONL of passages (id, source, text; path or URI), added after the packaged ones.")] = None,
    no_packaged: Annotated[bool, typer.Option("--no-packaged", help="Only the user files, no packaged corpus.")] = False,
    skip_invalid: Annotated[bool, typer.Option(help="Write invalid user lines to rejects.jsonl and go on.")] = False,
    force: ForceOpt = False,
    s3_endpoint: EndpointOpt = None,
    verbose: VerboseOpt = False,
):
    """Build passages.jsonl from the packaged Quran (6,236 verses) and hadith (Bukhari, Muslim) and user files."""
    from m3tune.corpus.ingest import IngestConfig

    values: dict[str, Any] = {"limit": limit, "skip_invalid": skip_invalid, "user_files": user_file or []}
    if no_packaged:
        values["sources"] = []
    elif source:
        values["sources"] = source
    _run_one("ingest", IngestConfig, values, root, runs, run_id, force, s3_endpoint, verbose)


def _default(model: str, field: str):
    """A config model's default, so --help and the step agree (models imported lazily)."""
    from m3tune.pipeline import STEPS

    return STEPS[model].config.model_fields[field].default


ArabicOpt = Annotated[float, typer.Option(help="Target share of Arabic queries (a floor).")]
ConceptualOpt = Annotated[float, typer.Option(help="Target share of conceptual queries (a floor).")]
QuranOpt = Annotated[float, typer.Option(help="Target share of queries with Quran positives (a floor).")]
ToleranceOpt = Annotated[float, typer.Option(help="A share of at least target - tolerance is met.")]
FailOnMissOpt = Annotated[bool, typer.Option(help="Exit 3 when a target is missed.")]
SkipInvalidOpt = Annotated[bool, typer.Option(help="Skip invalid lines (reported with file, line, reason).")]


@step_app.command("analyze")
@_errors
def step_analyze(
    input: Annotated[Optional[list[str]], typer.Option(
        "--input", help="JSONL of queries or examples (repeatable; path or URI). "
                        "Default: what the steps before analyze in the pipeline published.")] = None,
    root: RootOpt = None,
    runs: RunsOpt = "runs",
    run_id: RunIdOpt = None,
    arabic_target: ArabicOpt = _default("analyze", "arabic_target"),
    conceptual_target: ConceptualOpt = _default("analyze", "conceptual_target"),
    quran_target: QuranOpt = _default("analyze", "quran_target"),
    tolerance: ToleranceOpt = _default("analyze", "tolerance"),
    fail_on_miss: FailOnMissOpt = False,
    skip_invalid: SkipInvalidOpt = False,
    force: ForceOpt = False,
    s3_endpoint: EndpointOpt = None,
    verbose: VerboseOpt = False,
):
    """Analyze queries/examples into ROOT/analyze/report.json, as a pipeline step (rejects.jsonl with --skip-invalid)."""
    from rich.console import Console

    from m3tune.analysis.analyze import AnalyzeConfig, render_report

    values = {"inputs": input or [], "arabic_target": arabic_target, "conceptual_target": conceptual_target,
              "quran_target": quran_target, "tolerance": tolerance, "fail_on_miss": fail_on_miss,
              "skip_invalid": skip_invalid}
    store = _run_one("analyze", AnalyzeConfig, values, root, runs, run_id, force, s3_endpoint, verbose)
    Console().print(render_report(json.loads(store.child("analyze").read_bytes("report.json"))))


BackendOpt = Annotated[Optional[str], typer.Option(
    "--backend", help="offline (default; no network, deterministic, weaker) or openai (any OpenAI-compatible API).")]
BaseUrlOpt = Annotated[Optional[str], typer.Option(
    "--base-url", help="OpenAI-compatible API base URL (default OpenRouter). Key from OPENROUTER_API_KEY or OPENAI_API_KEY.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Model name at that endpoint.")]
ApiKeyEnvOpt = Annotated[Optional[str], typer.Option("--api-key-env", help="Read the API key from this variable instead.")]
ConcurrencyOpt = Annotated[Optional[int], typer.Option("--concurrency", help="Requests in flight at once.")]
TimeoutOpt = Annotated[Optional[float], typer.Option("--timeout", help="Seconds per request.")]
RetriesOpt = Annotated[Optional[int], typer.Option("--max-retries", help="Retries of a 429/5xx/timeout per item.")]
MaxRequestsOpt = Annotated[Optional[int], typer.Option("--max-requests", help="Stop starting requests after N.")]
MaxCostOpt = Annotated[Optional[float], typer.Option("--max-cost", help="Stop starting requests past this cost (USD).")]
PriceInOpt = Annotated[Optional[float], typer.Option("--price-in", help="USD per million prompt tokens (if the API reports no cost).")]
PriceOutOpt = Annotated[Optional[float], typer.Option("--price-out", help="USD per million completion tokens.")]
FlushOpt = Annotated[Optional[int], typer.Option("--flush-every", help="Answers per journal batch (durability vs. files).")]
PromptOpt = Annotated[Optional[str], typer.Option("--prompt", help="Prompt version (packaged name) or a .txt prompt file.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print sample prompts and an estimate of requests, tokens "
                                                           "and cost; call nothing, write nothing.")]


def _llm(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _dry_run(name: str, model, values, root, runs, run_id, verbose) -> None:
    from rich.console import Console

    from m3tune.generation.plan import plan

    _setup(verbose, None)
    store = _root(root, runs, run_id)
    config = _build(model, {k: v for k, v in values.items() if v is not None}, f"step {name}")
    Console().print(plan(store, name, config), highlight=False, markup=False)


@step_app.command("generate-queries")
@_errors
def step_generate_queries(
    root: RootOpt = None,
    runs: RunsOpt = "runs",
    run_id: RunIdOpt = None,
    backend: BackendOpt = None,
    pilot: Annotated[Optional[int], typer.Option(help="First N passages of a seeded shuffle (default 500); 0 = all.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the passage order.")] = None,
    source: Annotated[Optional[list[str]], typer.Option("--source", help="quran, hadith (repeatable; default both).")] = None,
    queries_per_passage: Annotated[Optional[int], typer.Option(help="Queries per passage (default 4).")] = None,
    arabic_share: Annotated[Optional[float], typer.Option(help="Share of Arabic queries per passage (default 0.5).")] = None,
    type_: Annotated[Optional[list[str]], typer.Option("--type", help="question, keyword (repeatable; default both).")] = None,
    prompt: PromptOpt = None,
    base_url: BaseUrlOpt = None,
    model: ModelOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    concurrency: ConcurrencyOpt = None,
    timeout: TimeoutOpt = None,
    max_retries: RetriesOpt = None,
    max_requests: MaxRequestsOpt = None,
    max_cost: MaxCostOpt = None,
    price_in: PriceInOpt = None,
    price_out: PriceOutOpt = None,
    flush_every: FlushOpt = None,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    s3_endpoint: EndpointOpt = None,
    verbose: VerboseOpt = False,
):
    """Native Arabic and English cross-lingual queries per passage -> ROOT/generate-queries/queries.jsonl."""
    from m3tune.generation.queries import GenerateQueriesConfig

    values = {"backend": backend, "pilot": pilot, "seed": seed, "sources": source,
              "queries_per_passage": queries_per_passage, "arabic_share": arabic_share, "types": type_,
              "prompt": prompt,
              "llm": _llm(base_url=base_url, model=model, api_key_env=api_key_env, concurrency=concurrency,
                          timeout=timeout, max_retries=max_retries, max_requests=max_requests, max_cost=max_cost,
                          price_in=price_in, price_out=price_out, flush_every=flush_every)}
    if s3_endpoint:
        os.environ["M3TUNE_S3_ENDPOINT"] = s3_endpoint
    if dry_run:
        return _dry_run("generate-queries", GenerateQueriesConfig, values, root, runs, run_id, verbose)
    _run_one("generate-queries", GenerateQueriesConfig, values, root, runs, run_id, force, s3_endpoint, verbose)


@step_app.command("generate-conceptual")
@_errors
def step_generate_conceptual(
    root: RootOpt = None,
    runs: RunsOpt = "runs",
    run_id: RunIdOpt = None,
    backend: BackendOpt = None,
    themes: Annotated[Optional[str], typer.Option("--themes", help="YAML theme list (default: the packaged one).")] = None,
    source: Annotated[Optional[list[str]], typer.Option("--source", help="quran, hadith (repeatable; default both).")] = None,
    max_positives: Annotated[Optional[int], typer.Option(help="Passages assigned to a theme, per source (default 25).")] = None,
    queries_per_theme: Annotated[Optional[int], typer.Option(help="Queries asked of the LLM per theme (default 12).")] = None,
    prompt: PromptOpt = None,
    base_url: BaseUrlOpt = None,
    model: ModelOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    concurrency: ConcurrencyOpt = None,
    timeout: TimeoutOpt = None,
    max_retries: RetriesOpt = None,
    max_requests: MaxRequestsOpt = None,
    max_cost: MaxCostOpt = None,
    price_in: PriceInOpt = None,
    price_out: PriceOutOpt = None,
    flush_every: FlushOpt = None,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    s3_endpoint: EndpointOpt = None,
    verbose: VerboseOpt = False,
):
    """Thematic queries («آيات عن الصبر», "verses about patience") with all their positives -> queries.jsonl."""
    from m3tune.generation.conceptual import GenerateConceptualConfig

    values = {"backend": backend, "themes_file": themes, "sources": source, "max_positives": max_positives,
              "queries_per_theme": queries_per_theme, "prompt": prompt,
              "llm": _llm(base_url=base_url, model=model, api_key_env=api_key_env, concurrency=concurrency,
                          timeout=timeout, max_retries=max_retries, max_requests=max_requests, max_cost=max_cost,
                          price_in=price_in, price_out=price_out, flush_every=flush_every)}
    if s3_endpoint:
        os.environ["M3TUNE_S3_ENDPOINT"] = s3_endpoint
    if dry_run:
        return _dry_run("generate-conceptual", GenerateConceptualConfig, values, root, runs, run_id, verbose)
    _run_one("generate-conceptual", GenerateConceptualConfig, values, root, runs, run_id, force, s3_endpoint, verbose)


def _run_one(name, model, values, root, runs, run_id, force, s3_endpoint, verbose):
    from m3tune.executor import run_step

    _setup(verbose, s3_endpoint)
    store = _root(root, runs, run_id)
    config = _build(model, {k: v for k, v in values.items() if v is not None}, f"step {name}")
    manifest, ran = run_step(store, name, config, force=force)
    _print_manifest(manifest, ran)
    return store


@app.command()
@_errors
def analyze(
    inputs: Annotated[list[str], typer.Argument(help="JSONL files of queries or examples (paths or URIs).")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON here.")] = None,
    arabic_target: ArabicOpt = _default("analyze", "arabic_target"),
    conceptual_target: ConceptualOpt = _default("analyze", "conceptual_target"),
    quran_target: QuranOpt = _default("analyze", "quran_target"),
    tolerance: ToleranceOpt = _default("analyze", "tolerance"),
    fail_on_miss: FailOnMissOpt = False,
    skip_invalid: SkipInvalidOpt = False,
    s3_endpoint: EndpointOpt = None,
    verbose: VerboseOpt = False,
):
    """Print shares by language, type and source of queries/examples JSONL, with ✅/❌ against targets."""
    from rich.console import Console

    from m3tune.analysis.analyze import TargetsMissed, analyze_files, render_report
    from m3tune.jsonl import Rejects

    _setup(verbose, s3_endpoint)
    rejects = Rejects() if skip_invalid else None
    report = analyze_files(inputs, rejects=rejects, arabic_target=arabic_target, conceptual_target=conceptual_target,
                           quran_target=quran_target, tolerance=tolerance)
    Console().print(render_report(report))
    for r in (rejects.rows if rejects else []):
        typer.secho(f"skipped {r['file']}:{r['line']}: {r['error']}", fg=typer.colors.YELLOW, err=True)
    if json_out:
        json_out.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    if fail_on_miss and not report["ok"]:
        raise TargetsMissed(report)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
