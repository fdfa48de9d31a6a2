"""The `m3tune` command line.

    m3tune run     the whole pipeline, locally, resuming
    m3tune step    one step (what each Argo task runs)
    m3tune status  per step: done / stale / missing, with counts
    m3tune analyze shares and targets of any queries/examples JSONL
    m3tune evaluate compare models on the gold standard (the evaluate step's code)
    m3tune render  the Argo WorkflowTemplate / a single-step Job, from the pipeline definition
    m3tune submit  the pipeline on Kubernetes; m3tune rerun: one step as a Job; m3tune runs: recent workflows
    m3tune published / rollback  what each production alias serves and why; move an alias back
"""

from __future__ import annotations

import contextlib
import errno
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

from m3tune.errors import BadInput, ConfigError, UserError

app = typer.Typer(
    name="m3tune",
    help="Fine-tune BGE-M3 for Arabic Islamic search (Quran and Hadith): from corpus to evaluated model.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    # A traceback with locals would print an API key held in a variable (and the clients holding it).
    pretty_exceptions_show_locals=False,
)

EXIT_ERROR = 1
EXIT_TARGETS_MISSED = 3
EXIT_BAD_INPUT = 4

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
WaitLockOpt = Annotated[float, typer.Option(
    "--wait-lock", min=0, envvar="M3TUNE_WAIT_LOCK", show_envvar=True,
    help="Seconds to wait for another m3tune process writing this run root (its lock) before giving up.")]


def _setup(verbose: bool, s3_endpoint: str | None) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    if s3_endpoint:
        os.environ["M3TUNE_S3_ENDPOINT"] = s3_endpoint
    from m3tune.redact import RedactingFilter, install_excepthook

    install_excepthook()  # a traceback (-v, a bug) printed with its credentials masked, its escapes escaped
    handler = RichHandler(console=Console(stderr=True), show_path=False, markup=False, rich_tracebacks=verbose)
    handler.addFilter(RedactingFilter())  # on the handler: records of every logger pass through it
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[handler], force=True)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "httpx", "httpx2", "httpcore", "httpcore2", "openai", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _state["verbose"] = verbose
    from m3tune.redact import has_url_credentials

    if s3_endpoint and has_url_credentials(s3_endpoint):  # boto would not use them, and its errors quote the URL
        raise ConfigError("--s3-endpoint: the URL must not hold credentials (user:password@); give them in the "
                          "AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")


_state: dict[str, Any] = {"verbose": False}


def escape(text: str) -> str:
    """TEXT (a path, a URI, a name) safe inside rich markup: "[/]" in a folder's name is not a closing tag."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    from m3tune.redact import printable

    typer.secho(f"error: {printable(message)}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _errors(fn):
    """Turn the errors a user can fix into one clear line and an exit code, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from m3tune.analysis.analyze import TargetsMissed

        # Each command sets -v in _setup; one in-process call's -v (typer's CliRunner, an embedding program) must
        # not turn the next command's one-line errors into tracebacks, nor an error raised before _setup.
        _state["verbose"] = False
        try:
            return fn(*args, **kwargs)
        except TargetsMissed as e:
            raise _fail(str(e), EXIT_TARGETS_MISSED) from None
        except BadInput as e:
            if _state["verbose"]:
                raise
            raise _fail(str(e), EXIT_BAD_INPUT) from None
        except UserError as e:
            if _state["verbose"]:
                raise
            raise _fail(str(e)) from None
        except OSError as e:
            if _state["verbose"]:
                raise
            # A full disk wherever it happens (a model saved by transformers, a checkpoint, --json FILE):
            # exit 4, as storage.StorageFull, since a rerun fills the same space the same way.
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                where = f" writing {e.filename}" if e.filename else ""
                raise _fail(f"no space left on device{where} ({e.strerror}); free space or raise the volume's "
                            "limit, then rerun", EXIT_BAD_INPUT) from None
            if e.filename is None:  # no file to name (a socket, a bug): keep the traceback
                raise
            # A file the machine refuses (no permission, a file where a folder belongs): the environment's to fix.
            raise _fail(f"cannot use {e.filename}{_cache_hint(str(e.filename))}: {e.strerror}; fix its "
                        "permissions or the path, then rerun") from None

    return wrapper


def _cache_hint(path: str) -> str:
    from m3tune.encoder.tiny import cache_dir

    cache = str(cache_dir())
    return f" (in M3TUNE_CACHE={cache})" if path == cache or path.startswith(cache.rstrip("/") + "/") else ""


def _local_folder(path: str, option: str) -> None:
    """Refuse OPTION's local PATH when it, or a folder above it, is a file: found now, not after the work."""
    if "://" in path:
        return
    for p in (Path(path), *Path(path).absolute().parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{option} {path!r}: {p} is not a folder; name a folder (it is made if missing)")
            return


def _root(root: str | None, runs: str, run_id: str | None):
    from m3tune.runroot import open_root
    from m3tune.storage import run_root_uri

    if root and run_id:
        raise ConfigError("give either --root or --run-id, not both")
    if not root:
        if not run_id:
            raise ConfigError("no run given: pass --root URI, or --run-id ID (with --runs, default ./runs)")
        root = run_root_uri(runs, run_id)
    from m3tune.redact import has_url_credentials

    if has_url_credentials(root):  # refused before any client sees it: an S3 error would quote its parts
        raise ConfigError("--root: a run root URI must not hold credentials (user:password@); give them in the "
                          "AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
    _local_folder(root, "--root")
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
    if path is None:
        return {}
    from m3tune.yamlfile import read_yaml

    return run_configs(read_yaml(path), str(path))


def run_configs(data: Any, where: str) -> dict[str, BaseModel]:
    """Per-step configs from the mapping DATA {step: {option: value}} read from WHERE."""
    from m3tune.pipeline import STEPS

    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of step name to options")
    configs = {}
    for name, values in data.items():
        if name == "quality":  # `m3tune bench quality`'s own section: the steps' sections are a run config
            continue
        if name not in STEPS:
            raise ConfigError(f"{where}: unknown step {name!r}; steps: {', '.join(STEPS)}")
        configs[name] = _build(STEPS[name].config, values or {}, f"{where}: {name}")
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
        console.print(f"  {escape(name)}: {rows}{info.bytes:,} bytes")


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
    publish: Annotated[bool, typer.Option("--publish", help="Then publish the evaluated model to production "
                                          "search (the config's publish: section; off by default).")] = False,
    s3_endpoint: EndpointOpt = None,
    verbose: VerboseOpt = False,
    wait_lock: WaitLockOpt = 0.0,
):
    """Run the whole pipeline locally, in order. Finished steps are skipped, so a rerun resumes."""
    from rich.console import Console

    from m3tune.executor import run_pipeline
    from m3tune.manifest import read_manifest
    from m3tune.pipeline import PIPELINE

    _setup(verbose, s3_endpoint)
    store = _root(root, runs, run_id)
    configs = load_run_config(config)
    from m3tune.pipeline import OPTIONAL

    unknown = [f for f in force if f not in PIPELINE + (OPTIONAL if publish else [])]
    if unknown:
        raise ConfigError(f"--force {unknown[0]!r} is not a pipeline step; steps: {', '.join(PIPELINE)}")
    if publish and until is not None:
        raise ConfigError("--publish runs after evaluate: it does not go with --until")
    from m3tune.runlock import command_line, hold_run

    with hold_run(store, command=command_line(), wait_s=wait_lock) as hold:
        ran = run_pipeline(store, configs, force=set(force), until=until, guard=hold.step)
        if publish:  # optional, and last: it changes production search
            from m3tune.executor import run_step

            with hold.step("publish"):
                ran.append(("publish", run_step(store, "publish", configs.get("publish"),
                                                force="publish" in force)[1]))
    for name, did_run in ran:
        _print_manifest(read_manifest(store.child(name)), did_run)
    from m3tune.pipeline import STEPS

    done = dict(ran)
    for name in ("combine", "analyze", "evaluate", "publish"):  # the data's balance, its gate, the scores, production
        if name in done and STEPS[name].show is not None:
            Console().print(STEPS[name].show(store))
    if "evaluate" in done:
        Console().print(f"\nevaluation report: [bold]{escape(store.child('evaluate').uri_of('report.md'))}[/bold]")
    Console().print(f"\nrun root: [bold]{escape(store.uri)}[/bold]")


@app.command()
@_errors
def status(
    root: RootOpt = None,
    runs: RunsOpt = "runs",
    run_id: RunIdOpt = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", exists=True, dir_okay=False,
                      help="Compare against this config (else the defaults, as `m3tune run` without --config).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Compare published files by size only; without it "
                                        "every published file is read once to check its sha256.")] = False,
    s3_endpoint: EndpointOpt = None,
    verbose: VerboseOpt = False,
):
    """Show each step of a run: done, stale (inputs or config changed), tampered (a published file is not
    what its manifest recorded) or missing, with counts."""
    from rich.console import Console
    from rich.table import Table

    from m3tune.executor import pipeline_status

    _setup(verbose, s3_endpoint)
    store = _root(root, runs, run_id)
    statuses = pipeline_status(store, load_run_config(config), verify=not quick)
    if as_json:
        typer.echo(json.dumps([{"step": s.step, "state": s.state, "reason": s.reason,
                                "counts": s.manifest.counts if s.manifest else None,
                                "finished_at": s.manifest.finished_at if s.manifest else None}
                               for s in statuses], ensure_ascii=False, indent=2))
        return
    table = Table(title=escape(store.uri), title_justify="left")
    for col in ("step", "state", "why", "counts", "finished"):
        table.add_column(col)
    colour = {"done": "green", "stale": "yellow", "missing": "red", "tampered": "bold magenta"}
    for s in statuses:
        table.add_row(s.step, f"[{colour[s.state]}]{s.state}[/]", escape(s.reason),
                      escape(_fmt_counts(s.manifest.counts)) if s.manifest else "",
                      s.manifest.finished_at if s.manifest else "")
    Console().print(table)


def _default(model: str, field: str):
    """A config model's default, so --help and the step agree (models imported lazily)."""
    from m3tune.pipeline import STEPS

    return STEPS[model].config.model_fields[field].default


ArabicOpt = Annotated[float, typer.Option(help="Target share of Arabic queries (a floor).")]
ConceptualOpt = Annotated[float, typer.Option(help="Target share of conceptual queries (a floor).")]
QuranOpt = Annotated[float, typer.Option(help="Target share of queries with Quran positives (a floor).")]
ExactOpt = Annotated[float, typer.Option(help="Target share of exact-quote queries (a floor; checked only where "
                                               "the input holds one).")]
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
    exact_target: ExactOpt = _default("analyze", "exact_target"),
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
                           quran_target=quran_target, exact_target=exact_target, tolerance=tolerance)
    Console().print(render_report(report))
    for r in (rejects.rows if rejects else []):
        typer.secho(f"skipped {r['file']}:{r['line']}: {r['error']}", fg=typer.colors.YELLOW, err=True)
    if json_out:
        from m3tune.storage import write_local

        write_local(json_out, (json.dumps(report, ensure_ascii=False, indent=2) + "\n").encode())
    if fail_on_miss and not report["ok"]:
        raise TargetsMissed(report)


render_app = typer.Typer(help="Render the Kubernetes objects generated from the pipeline definition.",
                         no_args_is_help=True)
app.add_typer(render_app, name="render")

KubeconfigOpt = Annotated[Optional[str], typer.Option(
    "--kubeconfig", envvar="KUBECONFIG", help="Kubeconfig file (default: ~/.kube/config).")]
ContextOpt = Annotated[Optional[str], typer.Option("--context", help="Kubeconfig context (default: the current one).")]
NamespaceOpt = Annotated[Optional[str], typer.Option(
    "--namespace", "-n", help="Namespace (default: the context's, else m3tune).")]


@render_app.command("argo")
@_errors
def render_argo(
    output: Annotated[Path, typer.Option("--output", "-o", file_okay=False,
                                         help="Folder for workflowtemplate.yaml and workflow.yaml.")] = Path("argo"),
    chart: Annotated[Optional[Path], typer.Option(
        "--chart", file_okay=False, help="Also copy the WorkflowTemplate into this chart's files/ (charts/m3tune).")] = None,
):
    """Generate the Argo WorkflowTemplate (Hera) and an example Workflow from the pipeline definition."""
    from m3tune.deploy.argo import TEMPLATE_FILE, render_files

    files = render_files()
    output.mkdir(parents=True, exist_ok=True)
    targets = [(output / name, text) for name, text in files.items()]
    if chart is not None:
        targets.append((chart / "files" / TEMPLATE_FILE, files[TEMPLATE_FILE]))
    for path, text in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {path}")


def _job(step: str, root: str, config: str, namespace: Optional[str], image: Optional[str], s3_endpoint: str,
         rank: Optional[int], world_size: Optional[int], merge_shards: Optional[int], gpus: Optional[int],
         force: bool):
    from m3tune.deploy.job import render_job

    return render_job(step, root=root, config=config, namespace=namespace, image=image, s3_endpoint=s3_endpoint,
                      rank=rank, world_size=world_size, merge_shards=merge_shards, gpus=gpus, force=force)


JobRootOpt = Annotated[str, typer.Option("--root", help="The run's root: s3://BUCKET/PREFIX/RUN_ID.")]
JobConfigOpt = Annotated[str, typer.Option("--config", help="Run config: a key of the ConfigMap m3tune-config.")]
ImageOpt = Annotated[Optional[str], typer.Option("--image", help="Image (default: the step's, at this version).")]
JobEndpointOpt = Annotated[str, typer.Option("--s3-endpoint", help="S3 endpoint the pod uses (MinIO…); empty for AWS.")]
RankOpt = Annotated[Optional[int], typer.Option("--rank", help="Rerun only this shard, with --world-size.")]
WorldOpt = Annotated[Optional[int], typer.Option("--world-size", help="Number of shards of the run.")]
MergeOpt = Annotated[Optional[int], typer.Option("--merge-shards", help="Rerun the merge of N shards.")]
GpusOpt = Annotated[Optional[int], typer.Option("--gpus", help="GPUs of a GPU step's pod (default 1).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rerun even if the step's manifest proves it done.")]


@render_app.command("job")
@_errors
def render_job_cmd(
    step: Annotated[str, typer.Argument(help="The step to rerun.")],
    root: JobRootOpt,
    config: JobConfigOpt = "run.yaml",
    namespace: NamespaceOpt = None,
    image: ImageOpt = None,
    s3_endpoint: JobEndpointOpt = "",
    rank: RankOpt = None,
    world_size: WorldOpt = None,
    merge_shards: MergeOpt = None,
    gpus: GpusOpt = None,
    force: ForceOpt = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", dir_okay=False,
                                                  help="Write the YAML here (default: stdout).")] = None,
):
    """Print the Kubernetes Job that reruns one step of an existing run (kubectl create -f -)."""
    import yaml

    job = _job(step, root, config, namespace, image, s3_endpoint, rank, world_size, merge_shards, gpus, force)
    text = yaml.safe_dump(job, sort_keys=False, allow_unicode=True, width=120)
    if output:
        output.write_text(text, encoding="utf-8")
    else:
        typer.echo(text, nl=False)


def _kube(kubeconfig: Optional[str], context: Optional[str], namespace: Optional[str], verbose: bool):
    """Logging set up, then (API client, namespace) from the user's kubeconfig."""
    from m3tune.deploy import validate
    from m3tune.deploy.kube import api_client

    _setup(verbose, None)
    client, default_namespace = api_client(kubeconfig, context)
    # a segment of every API path: `../` would address another resource
    option = "--namespace" if namespace else "namespace (of the kubeconfig's context)"
    return client, validate.namespace(namespace or default_namespace or "m3tune", option)


ArgoServerOpt = Annotated[Optional[str], typer.Option(
    "--argo-server", envvar="M3TUNE_ARGO_SERVER", show_envvar=True,
    help="Talk to this Argo Server (https://HOST:PORT, with its base path if it has one) with a bearer token "
         "instead of the Kubernetes API (docs/argo-server.md).")]
ArgoTokenEnvOpt = Annotated[Optional[str], typer.Option(
    "--argo-token-env", help="Variable holding the Argo Server's token (a name ending in _TOKEN; default ARGO_TOKEN).")]
ArgoTokenFileOpt = Annotated[Optional[str], typer.Option(
    "--argo-token-file", help="File holding the Argo Server's token (instead of ARGO_TOKEN).")]
ArgoCaOpt = Annotated[Optional[str], typer.Option(
    "--argo-ca-file", help="CA bundle (PEM) that verifies the Argo Server's certificate (default: the system's).")]
ArgoInsecureOpt = Annotated[bool, typer.Option(
    "--argo-insecure-skip-verify", help="Do not verify the Argo Server's certificate (any server could then "
                                        "receive the token).")]


def _given(ctx: typer.Context, *names: str) -> list[str]:
    """The options among NAMES (parameter names) given on the command line (KUBECONFIG set in the environment is
    the kubeconfig path's default, not a choice of it)."""
    options = {p.name: p.opts[0] for p in ctx.command.params}
    return [options[n] for n in names if getattr(ctx.get_parameter_source(n), "name", None) == "COMMANDLINE"]


def _argo(ctx: typer.Context, server: Optional[str], token_env: Optional[str], token_file: Optional[str],
          ca_file: Optional[str], insecure: bool, namespace: Optional[str], verbose: bool):
    """Logging set up, then (Argo Server, namespace); None when --argo-server is not given (the kubeconfig path),
    after refusing the Argo Server options it would ignore, and the kubeconfig options with --argo-server."""
    from m3tune.deploy import validate

    _setup(verbose, None)
    if server is None:
        for option in _given(ctx, "argo_token_env", "argo_token_file", "argo_ca_file", "argo_insecure_skip_verify"):
            raise ConfigError(f"{option} goes with --argo-server URL (the Kubernetes API path takes its "
                              "credentials from the kubeconfig)")
        return None
    for option in _given(ctx, "kubeconfig", "context"):
        raise ConfigError(f"{option}: not with --argo-server (the Argo Server path uses a token, not a kubeconfig); "
                          "give one of the two")
    from m3tune.deploy.argo_server import connect

    argo = connect(server, token_env=token_env, token_file=token_file, ca_file=ca_file, insecure=insecure)
    return argo, validate.namespace(namespace or "m3tune")


@app.command()
@_errors
def submit(
    ctx: typer.Context,
    parameter: Annotated[list[str], typer.Option("--parameter", "-p", help="NAME=VALUE of the WorkflowTemplate "
                                                 "(repeatable), e.g. -p root=s3://bucket/runs/exp-01.")] = [],
    template: Annotated[str, typer.Option("--template", help="The installed WorkflowTemplate.")] = "m3tune",
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    argo_server: ArgoServerOpt = None,
    argo_token_env: ArgoTokenEnvOpt = None,
    argo_token_file: ArgoTokenFileOpt = None,
    argo_ca_file: ArgoCaOpt = None,
    argo_insecure_skip_verify: ArgoInsecureOpt = False,
    verbose: VerboseOpt = False,
):
    """Run the pipeline on the cluster: a Workflow from the installed WorkflowTemplate (no argo CLI needed), through
    the Kubernetes API (kubeconfig) or the Argo Server (--argo-server)."""
    from m3tune.deploy.kube import parse_parameters, submit as submit_workflow

    parameters = parse_parameters(parameter)
    argo = _argo(ctx, argo_server, argo_token_env, argo_token_file, argo_ca_file, argo_insecure_skip_verify,
                 namespace, verbose)
    if argo is not None:
        from m3tune.deploy import argo_server as via_argo

        typer.echo(via_argo.submit(*argo, parameters, template=template))
        return
    client, ns = _kube(kubeconfig, context, namespace, verbose)
    typer.echo(submit_workflow(client, ns, parameters, template=template))


@app.command()
@_errors
def rerun(
    ctx: typer.Context,
    step: Annotated[str, typer.Argument(help="The step to rerun.")],
    root: JobRootOpt,
    config: JobConfigOpt = "run.yaml",
    image: ImageOpt = None,
    s3_endpoint: JobEndpointOpt = "",
    rank: RankOpt = None,
    world_size: WorldOpt = None,
    merge_shards: MergeOpt = None,
    gpus: GpusOpt = None,
    force: ForceOpt = False,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    argo_server: ArgoServerOpt = None,
    argo_token_env: ArgoTokenEnvOpt = None,
    argo_token_file: ArgoTokenFileOpt = None,
    argo_ca_file: ArgoCaOpt = None,
    argo_insecure_skip_verify: ArgoInsecureOpt = False,
    verbose: VerboseOpt = False,
):
    """Rerun one step of an existing run on the cluster, as a Kubernetes Job (what `m3tune render job` prints); with
    --argo-server, as Argo's retry of the run's newest Workflow from that step."""
    from m3tune.deploy.kube import rerun as create_job

    argo = _argo(ctx, argo_server, argo_token_env, argo_token_file, argo_ca_file, argo_insecure_skip_verify,
                 namespace, verbose)
    if argo is not None:
        from m3tune.deploy import argo_server as via_argo

        via_argo.refuse_job_options(_given(ctx, "config", "image", "s3_endpoint", "rank", "world_size", "merge_shards",
                                    "gpus", "force"))
        typer.echo(via_argo.rerun(*argo, step, root))
        return
    client, ns = _kube(kubeconfig, context, namespace, verbose)
    job = _job(step, root, config, ns, image, s3_endpoint, rank, world_size, merge_shards, gpus, force)
    typer.echo(create_job(client, ns, job))


@app.command()
@_errors
def runs(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", help="How many of the most recent runs.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    argo_server: ArgoServerOpt = None,
    argo_token_env: ArgoTokenEnvOpt = None,
    argo_token_file: ArgoTokenFileOpt = None,
    argo_ca_file: ArgoCaOpt = None,
    argo_insecure_skip_verify: ArgoInsecureOpt = False,
    verbose: VerboseOpt = False,
):
    """List recent m3tune Workflows on the cluster and the state of each step (Kubernetes API or Argo Server)."""
    import dataclasses

    from rich.console import Console
    from rich.table import Table

    from m3tune.deploy.kube import runs as list_runs

    argo = _argo(ctx, argo_server, argo_token_env, argo_token_file, argo_ca_file, argo_insecure_skip_verify,
                 namespace, verbose)
    if argo is not None:
        from m3tune.deploy import argo_server as via_argo

        ns = argo[1]
        found = via_argo.runs(*argo, limit=limit)
    else:
        client, ns = _kube(kubeconfig, context, namespace, verbose)
        found = list_runs(client, ns, limit=limit)
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(r) for r in found], indent=2))
        return
    table = Table(title=f"m3tune workflows in {ns}", title_justify="left")
    for col in ("workflow", "phase", "started", "root", "steps"):
        table.add_column(col)
    for r in found:
        table.add_row(r.name, r.phase, r.started, r.root, ", ".join(f"{k}: {v}" for k, v in r.steps.items()))
    Console().print(table)


QdrantUrlOpt = Annotated[Optional[str], typer.Option(
    "--qdrant-url", envvar="QDRANT_URL", show_envvar=True,
    help="Production Qdrant server URL (without it: local mode in --qdrant-path).")]
QdrantPathOpt = Annotated[Optional[str], typer.Option(
    "--qdrant-path", help="Local-mode Qdrant folder (default: the m3tune cache's qdrant/production, as publish's).")]
QdrantKeyOpt = Annotated[str, typer.Option(
    "--qdrant-api-key-env", help="Variable holding the Qdrant API key, if any.")]


def _production(url: Optional[str], path: Optional[str], key_env: str):
    from m3tune.publish.step import open_production
    from m3tune.redact import check_key_env

    return open_production(url, "QDRANT_URL", path, check_key_env(key_env, "--qdrant-api-key-env"), 60.0)


@app.command()
@_errors
def rollback(
    alias: Annotated[str, typer.Option("--alias", help="The production alias to move back.")],
    qdrant_url: QdrantUrlOpt = None,
    qdrant_path: QdrantPathOpt = None,
    qdrant_api_key_env: QdrantKeyOpt = "QDRANT_API_KEY",
    verbose: VerboseOpt = False,
):
    """Point ALIAS back at the collection its current one replaced (publish keeps it: --keep), atomically."""
    from m3tune.publish.production import rollback as roll_back

    _setup(verbose, None)
    prod = _production(qdrant_url, qdrant_path, qdrant_api_key_env)
    try:
        was, now = roll_back(prod, alias)
    finally:
        prod.close()
    typer.echo(f"{alias}: {was} -> {now}")


@app.command()
@_errors
def search(
    query: Annotated[str, typer.Argument(help="The query, Arabic or English.")],
    alias: Annotated[str, typer.Option("--alias", help="The production alias of a fused system publish served.")],
    k: Annotated[int, typer.Option("--k", min=1, max=1000, help="Passages to show.")] = 10,
    language: Annotated[Optional[str], typer.Option(
        "--language", help="ar or en: picks the recipe's weights and BM25's index (default: from the script).")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Read the encoder from this folder or hub id instead of the published run's; it must be "
        "the published model (same fingerprint).")] = None,
    qdrant_url: QdrantUrlOpt = None,
    qdrant_path: QdrantPathOpt = None,
    qdrant_api_key_env: QdrantKeyOpt = "QDRANT_API_KEY",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    verbose: VerboseOpt = False,
):
    """Search the fused system behind ALIAS exactly as evaluate measured it: its dense, translation and BM25
    lists through Qdrant's Query API, fused client-side by the recipe recorded in the collection
    (normalization, per-language weights, depth). Python: m3tune.publish.served.search_alias."""
    from rich.console import Console
    from rich.table import Table

    from m3tune.publish.served import search_alias

    _setup(verbose, None)
    prod = _production(qdrant_url, qdrant_path, qdrant_api_key_env)
    try:
        hits = search_alias(prod, alias, query, k=k, language=language, model=model)
    finally:
        prod.close()
    if as_json:
        typer.echo(json.dumps([{"passage_id": pid, "score": score, "text": p.get("text"),
                                "translation_en": p.get("translation_en")} for pid, score, p in hits],
                              indent=2, ensure_ascii=False))
        return
    table = Table(title=f"{alias}: {query}", title_justify="left")
    for col in ("rank", "passage", "score", "text"):
        table.add_column(col)
    for rank, (pid, score, p) in enumerate(hits, start=1):
        table.add_row(str(rank), pid, f"{score:.4f}", str(p.get("text") or "")[:120])
    Console().print(table)


@app.command()
@_errors
def published(
    qdrant_url: QdrantUrlOpt = None,
    qdrant_path: QdrantPathOpt = None,
    qdrant_api_key_env: QdrantKeyOpt = "QDRANT_API_KEY",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    verbose: VerboseOpt = False,
):
    """List each alias of the production Qdrant, the collection it points to and why: the run, model, gate
    and metrics m3tune recorded when it published it."""
    from rich.console import Console
    from rich.table import Table

    from m3tune.publish.production import published as list_published

    _setup(verbose, None)
    prod = _production(qdrant_url, qdrant_path, qdrant_api_key_env)
    try:
        rows = list_published(prod)
    finally:
        prod.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    table = Table(title=f"aliases at {prod.where}", title_justify="left")
    for col in ("alias", "collection", "points", "published", "model", "gate", "previous"):
        table.add_column(col)
    for r in rows:
        gate = r["gate"] or {}
        table.add_row(r["alias"], r["collection"], f"{r['points']:,}",
                      f"{r['published_at']} (run {r['run_id']})" if r["made_by_m3tune"] else "not by m3tune",
                      f"{r['model']['name']} {r['model']['fingerprint']} at {r['dim']} dims" if r["model"] else "",
                      (f"{gate['metric']} {gate['new']:.4f} vs {gate['current']:.4f} (Δ {gate['delta']:+.4f}, "
                       f"p {gate['p_value']:.3g}){' FORCED' if r['forced'] else ''}") if gate else "",
                      r["previous"] or "")
    Console().print(table)


@app.command()
@_errors
def evaluate(
    test_set: Annotated[Optional[str], typer.Option("--test-set", help="Gold standard JSONL (default: the packaged "
                        "gold_standard_v3.jsonl).")] = None,
    corpus: Annotated[Optional[str], typer.Option("--corpus", help="passages.jsonl to search (path or URI); "
                      "default: the corpus of the run given by --root / --run-id.")] = None,
    model: Annotated[list[str], typer.Option("--model", help="A model to evaluate (repeatable; the first is the "
                     "baseline): base, bm25, bm25-plain, hybrid:SPEC, bilingual:SPEC, bilingual-body:SPEC, fusion:A,B, "
                     "api:MODEL, run:train, a hub id or folder; NAME=SPEC "
                     "names it.")] = [],
    compare_all: Annotated[bool, typer.Option("--compare-all", help="Every model of the config (the --config "
                           "file's evaluate.models, else base, run:train, bm25), then any --model.")] = False,
    dims: Annotated[Optional[str], typer.Option("--dims", help="Matryoshka dimensions, e.g. 1024,512,256,128.")] = None,
    base_model: Annotated[Optional[str], typer.Option("--base-model", help="What 'base' names "
                          "(default BAAI/bge-m3).")] = None,
    output_dir: Annotated[str, typer.Option("--output-dir", help="Where results.json, report.md, "
                          "per_query.jsonl and the charts go.")] = "evaluation",
    output_json: Annotated[Optional[Path], typer.Option("--output-json", help="Also write results.json "
                           "here.")] = None,
    target_recall10: Annotated[Optional[float], typer.Option("--target-recall10", help="Recall@10 target "
                               "(default 0.65).")] = None,
    target_mrr: Annotated[Optional[float], typer.Option("--target-mrr", help="MRR@10 target (default 0.35).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", exists=True, dir_okay=False,
                      help="A run config: its evaluate: section gives the models and encoder settings.")] = None,
    root: Annotated[Optional[str], typer.Option("--root", help="A run: its corpus, and its model for "
                    "run:train.")] = None,
    runs: RunsOpt = "runs",
    run_id: RunIdOpt = None,
    s3_endpoint: EndpointOpt = None,
    verbose: VerboseOpt = False,
):
    """Compare models on the gold standard: Recall@k, MRR, nDCG, MAP, breakdowns, significance, report.

    The same code as the pipeline's `evaluate` step, on any corpus file.
    """
    from rich.console import Console

    from m3tune.evaluation.step import EvaluateConfig, render_results, run_evaluation
    from m3tune.storage import open_store

    _setup(verbose, s3_endpoint)
    if not model and not compare_all:
        raise ConfigError("name the models: --model SPEC (repeatable) or --compare-all")
    base = load_run_config(config).get("evaluate") or EvaluateConfig()
    values = base.model_dump()
    values["models"] = (list(base.models) if compare_all else []) + list(model)
    given = {"test_set": test_set, "base_model": base_model, "target_recall10": target_recall10,
             "target_mrr": target_mrr}
    values.update({k: v for k, v in given.items() if v is not None})
    if dims is not None:
        try:
            values["dims"] = [int(d) for d in dims.replace(" ", "").split(",") if d]
        except ValueError:
            raise ConfigError(f"--dims {dims!r}: expected comma-separated integers, e.g. 1024,512,256") from None
    cfg = _build(EvaluateConfig, values, "evaluate")
    _local_folder(output_dir, "--output-dir")
    store = _root(root, runs, run_id) if (root or run_id) else None
    if corpus:
        from m3tune.evaluation.step import read_corpus

        passages = read_corpus(corpus)
    elif store is not None:
        from m3tune.corpus.passages import read_passages

        passages = read_passages(store)
    else:
        raise ConfigError("no corpus: give --corpus PASSAGES_JSONL, or a run with --root / --run-id")
    files = run_evaluation(passages, cfg, root=store, log=logging.getLogger("m3tune.evaluate"))
    out = open_store(output_dir)
    for name, data in files.items():
        out.write_bytes(name, data)
    if output_json:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        from m3tune.storage import write_local

        write_local(output_json, files["results.json"])
    Console().print(render_results(json.loads(files["results.json"])))
    Console().print(f"\nreport: [bold]{escape(out.uri_of('report.md'))}[/bold]")

bench_app = typer.Typer(help="Benchmarks that need no run root.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("train")
@_errors
def bench_train(
    gpu: Annotated[bool, typer.Option("--gpu", help="BGE-M3's full architecture (random weights) on the GPU: "
                                      "tokens/s and MFU at sequence length 512. Without it: m3tune's loop against "
                                      "sentence-transformers' trainer on CPU.")] = False,
    model: Annotated[str, typer.Option("--model", help="CPU: the model both trainers train (local:tiny-xlmr: "
                                       "seconds; local:e5-small: minutes).")] = "local:e5-small",
    batch: Annotated[Optional[int], typer.Option(help="Examples per step (GPU default 8 queries + 8 passages; "
                                                 "CPU default 16).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Timed steps (GPU default 10, CPU default 10).")] = None,
    seq: Annotated[Optional[int], typer.Option(help="Tokens per sequence (GPU default 512, CPU default 256).")]
    = None,
    rounds: Annotated[int, typer.Option(min=1, help="CPU: runs of each contender, in turn.")] = 1,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU: torch threads in both processes (default: "
                                                   "one per core).")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(help="GPU: recompute activations.")] = False,
    peak_tflops: Annotated[Optional[float], typer.Option(help="GPU: the card's dense bf16 peak for MFU "
                                                         "(default: from its name).")] = None,
    workdir: Annotated[Optional[Path], typer.Option(help="CPU: scratch folder (default: a temporary one).")] = None,
):
    """Training throughput: examples/s and peak memory against sentence-transformers (CPU), or tokens/s and
    MFU of BGE-M3 (--gpu)."""
    import tempfile

    from m3tune.bench import train as bench

    _setup(False, None)
    if gpu:
        result = bench.gpu_throughput(batch=batch or 8, steps=steps or 10, seq=seq or 512,
                                      gradient_checkpointing=gradient_checkpointing, peak_tflops=peak_tflops)
    else:
        dims = bench.default_dims(model)  # an absent model fails here, at once
        with tempfile.TemporaryDirectory(prefix="m3tune-bench-") as tmp:
            result = bench.compare_cpu(workdir=workdir or Path(tmp), model=model, dims=dims, batch=batch or 16,
                                       steps=steps or 10, max_length=seq or 256, rounds=rounds, threads=threads,
                                       log=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps(result, indent=2))


@bench_app.command("quality")
@_errors
def bench_quality(
    config: Annotated[Path, typer.Option("--config", "-c", exists=True, dir_okay=False,
                                         help="Quality config: a run config (per-step sections) plus a "
                                              "`quality:` section (configs/quality-cpu.yaml, quality-gpu.yaml).")]
    = Path("configs/quality-cpu.yaml"),
    root: Annotated[Optional[str], typer.Option("--root", help="Run root (default: runs/quality-NAME, NAME the "
                                                "config's file name); a rerun resumes.")] = None,
    s3_endpoint: EndpointOpt = None,
    verbose: VerboseOpt = False,
):
    """Does the pipeline make a real model better? The whole pipeline on a real base model (one run root per
    training seed of `quality: train_seeds`, on the same data), then base vs fine-tuned vs BM25 vs hybrid on
    the gold: on gold v4, held-out-test with the independent (hand-written) queries first and the rule-shared
    ones apart, fine-tuned figures as seed means, intervals over surahs and books. Exit 3 when the goal
    (fine-tuned beats base on nDCG@10 and Recall@10 at p < 0.05 with the interval above 0, on independent
    held-out-test queries; no category lower) is missed."""
    from rich.console import Console

    from m3tune.bench.quality import QualitySettings, markdown, run_quality
    from m3tune.yamlfile import read_yaml

    _setup(verbose, s3_endpoint)
    data = read_yaml(config)
    if not isinstance(data, dict):
        raise ConfigError(f"{config}: expected a mapping of sections")
    settings = _build(QualitySettings, data.get("quality") or {}, f"{config}: quality")
    configs = run_configs(data, str(config))
    store = _root(root or f"runs/{config.stem}", "runs", None)
    from m3tune.runlock import command_line, hold_run

    # the root's run lock, as `m3tune run` holds it: no `m3tune run`/`step` writes this root meanwhile (the
    # seed roots ROOT-seedS are this command's own and are not locked)
    with hold_run(store, command=command_line()):
        summary = run_quality(store, configs, settings, log=logging.getLogger("m3tune.quality"))
    Console().print(markdown(summary), highlight=False)
    Console().print(f"summary: [bold]{escape(store.child('quality').uri_of('summary.md'))}[/bold]")
    if not summary["goal_met"]:
        raise typer.Exit(EXIT_TARGETS_MISSED)


@bench_app.command("gpu")
@_errors
def bench_gpu(
    out: Annotated[Optional[Path], typer.Option("--out", file_okay=False,
                                                help="The one folder everything is written to (results.json, "
                                                     "summary.md, the quality run); new or empty, never a run root "
                                                     "(default: ./gpu-bench-<timestamp>).")] = None,
    budget: Annotated[float, typer.Option("--budget", min=60,
                                          help="Seconds for the whole run; a phase that would not fit in what is "
                                               "left is skipped with the reason recorded.")] = 540.0,
    peak_tflops: Annotated[Optional[float], typer.Option(
        help="The device's dense bf16 peak in TFLOP/s, for MFU (default: from a table by device name; "
             "H100/H200 SXM 989).")] = None,
    model: Annotated[str, typer.Option("--model", help="The small model timed in m3tune's training loop.")]
    = "local:e5-small",
    batch: Annotated[int, typer.Option(help="BGE-M3 phases: queries per step, as many passages, of 512 tokens.")]
    = 16,
    quality_config: Annotated[Path, typer.Option(
        help="The quality benchmark's config run last, with the time left as its limit.")]
    = Path("configs/quality-gpu.yaml"),
    no_quality: Annotated[bool, typer.Option("--no-quality", help="Skip the quality benchmark.")] = False,
    verbose: VerboseOpt = False,
):
    """The GPU run in one unattended command (under 10 minutes): m3tune's training loop on e5-small, BGE-M3's
    full architecture (random weights, seq 512, bf16, SDPA or FlashAttention, gradient checkpointing off and on)
    with tokens/s, MFU and peak memory, then the quality benchmark's GPU config. Without CUDA it exits 1 at once,
    writing nothing."""
    import time

    started = time.monotonic()
    from m3tune.bench import gpu as gpubench

    _setup(verbose, None)
    out = out or Path(f"gpu-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    command = " ".join(["m3tune", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else "m3tune bench gpu"
    results = gpubench.run(out, budget_s=budget, started=started, model=model, batch=batch, peak_tflops=peak_tflops,
                           quality_config=None if no_quality else quality_config, command=command,
                           log=logging.getLogger("m3tune.bench"))
    typer.echo(gpubench.summary_markdown(results))
    typer.echo(f"results: {out / 'results.json'}")
    failed = [name for name, p in results["phases"].items() if p["status"] == "failed"]
    if failed:
        raise _fail(f"bench gpu: {', '.join(failed)} failed ({results['phases'][failed[0]]['reason']}); "
                    f"see {out / 'results.json'}")


step_app = typer.Typer(help="Run one step of a run (skipped when its manifest proves it done; --force reruns). "
                            "Each step's options are the fields of its config.", no_args_is_help=True)
app.add_typer(step_app, name="step")

_COMMON = [
    inspect.Parameter("root", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=RootOpt),
    inspect.Parameter("runs", inspect.Parameter.KEYWORD_ONLY, default="runs", annotation=RunsOpt),
    inspect.Parameter("run_id", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=RunIdOpt),
    inspect.Parameter("force", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--force", help="Rerun even if the step's manifest proves it done.")]),
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[Path], typer.Option("--config", "-c", exists=True, dir_okay=False,
                                     help="The run's YAML config (as `m3tune run --config`): this step's section "
                                          "is its base; options given here override it.")]),
    inspect.Parameter("s3_endpoint", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=EndpointOpt),
    inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=VerboseOpt),
    inspect.Parameter("wait_lock", inspect.Parameter.KEYWORD_ONLY, default=0.0, annotation=WaitLockOpt),
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


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """BASE with OVERRIDE's keys laid over it, nested mappings merged key by key."""
    out = dict(base)
    for key, value in override.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _register_step(step) -> None:
    """`m3tune step NAME`, its options built from the step's config model (m3tune.stepcli)."""
    from m3tune.stepcli import check_unique, config_parameters, config_values

    parameters = (_COMMON + ([_DRY_RUN] if step.plan is not None else []) + (_SHARDING if step.shardable else [])
                  + config_parameters(step.config))
    check_unique(parameters, step.name)

    def command(*, root, runs, run_id, force, config=None, s3_endpoint=None, verbose=False, wait_lock=0.0,
                dry_run=False, rank=None, world_size=None, merge_shards=None, **params):
        from rich.console import Console

        from m3tune.executor import merge_shards as merge, run_step

        _setup(verbose, s3_endpoint)
        store = _root(root, runs, run_id)
        # The same config file drives `m3tune run` and each Argo task's `m3tune step`, so both run alike.
        base = load_run_config(config).get(step.name)
        values = _merged(base.model_dump() if base is not None else {}, config_values(params))
        config = _build(step.config, values, f"step {step.name}")
        if dry_run:
            if wait_lock:  # a dry run writes nothing and takes no lock: there is nothing to wait for
                raise ConfigError("--wait-lock (or M3TUNE_WAIT_LOCK) does not go with --dry-run, which writes "
                                  "nothing and takes no lock")
            Console().print(step.plan(store, config), highlight=False, markup=False)
            return
        if (rank is None) != (world_size is None):
            raise ConfigError("--rank and --world-size go together")
        if merge_shards is not None and merge_shards < 1:  # checked before the merge withdraws the manifest
            raise ConfigError(f"--merge-shards {merge_shards}: the number of shards to merge, 1 or more")
        # stdout carries the step's report alone: what a library prints there while the step runs goes to stderr
        # (DeepSpeed, when installed on a CPU machine, prints its accelerator detection to stdout as soon as
        # Accelerate imports it, which transformers' save_pretrained does)
        from m3tune.runlock import command_line, hold_step

        shard = (rank, world_size) if world_size is not None and merge_shards is None else None
        with contextlib.redirect_stdout(sys.stderr), hold_step(store, step.name, shard=shard, command=command_line(),
                                                               wait_s=wait_lock):
            if merge_shards is not None:
                manifest, ran = merge(store, step.name, config, world_size=merge_shards, force=force)
            else:
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
