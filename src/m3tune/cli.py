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

import inspect

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


def _setup(verbose: bool, s3_endpoint: str | None) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    if s3_endpoint:
        os.environ["M3TUNE_S3_ENDPOINT"] = s3_endpoint
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False, markup=False,
                                              rich_tracebacks=verbose)], force=True)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "httpx", "httpx2", "httpcore", "httpcore2", "openai", "bm25s"):
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


step_app = typer.Typer(help="Run one step of a run (skipped when its manifest proves it done; --force reruns). "
                            "Each step's options are the fields of its config.", no_args_is_help=True)
app.add_typer(step_app, name="step")

_COMMON = [
    inspect.Parameter("root", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=RootOpt),
    inspect.Parameter("runs", inspect.Parameter.KEYWORD_ONLY, default="runs", annotation=RunsOpt),
    inspect.Parameter("run_id", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=RunIdOpt),
    inspect.Parameter("force", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--force", help="Rerun even if the step's manifest proves it done.")]),
    inspect.Parameter("s3_endpoint", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=EndpointOpt),
    inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=VerboseOpt),
]
_DRY_RUN = inspect.Parameter("dry_run", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
    bool, typer.Option("--dry-run", help="Print sample prompts and an estimate of requests, tokens and cost; "
                                         "call nothing, write nothing.")])


_SHARDING = [
    inspect.Parameter("rank", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[int], typer.Option("--rank", help="Run only this shard (0-based), with --world-size.")]),
    inspect.Parameter("world_size", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[int], typer.Option("--world-size", help="Number of shards the work is split into.")]),
    inspect.Parameter("merge_shards", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[int], typer.Option("--merge-shards", help="Publish the step's outputs from its N finished shards.")]),
]


def _register_step(step) -> None:
    """`m3tune step NAME`, its options built from the step's config model (m3tune.stepcli)."""
    from m3tune.stepcli import check_unique, config_parameters, config_values

    parameters = (_COMMON + ([_DRY_RUN] if step.plan is not None else []) + (_SHARDING if step.shardable else [])
                  + config_parameters(step.config))
    check_unique(parameters, step.name)

    def command(*, root, runs, run_id, force, s3_endpoint, verbose, dry_run=False, rank=None, world_size=None,
                merge_shards=None, **params):
        from rich.console import Console

        from m3tune.executor import merge_shards as merge, run_step

        _setup(verbose, s3_endpoint)
        store = _root(root, runs, run_id)
        config = _build(step.config, config_values(params), f"step {step.name}")
        if dry_run:
            Console().print(step.plan(store, config), highlight=False, markup=False)
            return
        if (rank is None) != (world_size is None):
            raise ConfigError("--rank and --world-size go together")
        if merge_shards is not None:
            manifest, ran = merge(store, step.name, config, world_size=merge_shards, force=force)
        else:
            shard = (rank, world_size) if world_size is not None else None
            manifest, ran = run_step(store, step.name, config, force=force, shard=shard)
        _print_manifest(manifest, ran)
        if step.show is not None:
            Console().print(step.show(store))

    wrapped = _errors(command)
    wrapped.__signature__ = inspect.Signature(parameters)  # what Typer reads to build the options
    wrapped.__doc__ = (f"{step.summary[0].upper()}{step.summary[1:]}.\n\nEvery option below is also a key of "
                       f"`{step.name}:` in `m3tune run --config`; options not given keep their defaults.")
    step_app.command(step.name, short_help=step.summary)(wrapped)


def _register_steps() -> None:
    from m3tune.pipeline import STEPS

    for step in STEPS.values():
        _register_step(step)


_register_steps()


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
