"""The docs: a short README, a site that builds strictly, an options page that lists every step field, and
every command of README.md and docs/*.md checked against the real CLI.

Each `m3tune` command in a shell block is parsed by the real command tree (a wrong subcommand, option, value
type or missing argument fails); a `m3tune step NAME` command's options are validated by the step's config
model, as the step would; the cheap ones (`--help`, `m3tune render job`) are run. Everything else is in
NOT_RUN with the reason; a command that is neither fails the test, so a new command in the docs needs a
decision here.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from m3tune.cli import app
from m3tune.pipeline import STEPS

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "shell", "console")

# Commands not run, by (program, first argument); "*": any first argument. Their reason is the test's record
# of why a reader's command is trusted without running it.
NOT_RUN = {
    ("make", "demo"): "15-25 minutes of training on 2 cores; test_bench_quality.py runs its summary on the tiny demo",
    ("make", "test"): "the whole suite, this file included",
    ("make", "bench-ratios"): "the speed ratios against the peers (27 minutes with --quick on 2 cores); "
                              "tests/test_ratios.py checks the harness",
    ("for", "*"): "docs/benchmarks.md's timing loop over `make demo`",
    ("kubectl", "*"): "needs a cluster (the objects are validated offline by tests/test_deploy_manifests.py)",
    ("helm", "*"): "needs a cluster and Qdrant's chart repository (the chart is rendered and linted by "
                   "tests/test_deploy_manifests.py through Helm's engine)",
    ("argo", "*"): "needs a cluster with Argo Workflows",
    ("pip", "install"): "needs the package index; the Makefile and .ci/image-installs install the extras",
    ("export", "*"): "sets a variable only",
    # docs/benchmarks.md's measurements: each runs for minutes to hours; their scripts' existence is checked
    (".venv/bin/python", "*"): "a benchmark script (minutes to hours); test_benchmark_scripts_exist checks it",
}
# Files the docs' commands name as the reader's own, which the CLI requires to exist: a repository file of
# the same kind stands in for each while the command is parsed.
READERS_FILES = {"run.yaml": "configs/demo.yaml"}
# m3tune subcommands that are run, not only parsed: they print and touch nothing.
RUN_CHEAPLY = {("render", "job")}
ROOT = get_command(app)


def shell_blocks(path: Path) -> list[str]:
    """The text of every fenced block tagged as shell in PATH (untagged blocks are diagrams, tables or
    benchmarks.md's historical commands with placeholders such as `<side>`)."""
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S)
            if m.group(1) in SHELL]


def commands(block: str) -> list[list[str]]:
    """Each command of BLOCK as its words: continuations joined, comments dropped, pipelines split, the
    leading VAR=value assignments, `nice -n N` and `taskset -c CORES` removed."""
    out = []
    for line in re.sub(r"\\\n", " ", block).splitlines():
        words = shlex.split(line, comments=True)
        while words:
            head, _, words = (words[:words.index("|")], "|", words[words.index("|") + 1:]) if "|" in words \
                else (words, "", [])
            while head and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", head[0]):
                head = head[1:]
            if head[:1] in (["nice"], ["taskset"]):  # nice -n N CMD, taskset -c CORES CMD: CMD is checked
                head = head[3:]
            if head:
                out.append(head)
    return out


def doc_commands() -> list[tuple[str, list[str]]]:
    return [(f"{page.relative_to(REPO)}: {' '.join(words)}", words)
            for page in PAGES for block in shell_blocks(page) for words in commands(block)]


def parse(args: list[str]):
    """(the command, its parsed context) for `m3tune ARGS`, as the real CLI parses it; raises its usage error."""
    cmd, ctx, name = ROOT, None, "m3tune"
    while True:
        ctx = cmd.make_context(name, list(args), parent=ctx)
        if not hasattr(cmd, "resolve_command"):  # a command, not a group
            return cmd, ctx
        name, cmd, args = cmd.resolve_command(ctx, [*ctx._protected_args, *ctx.args])


def test_readme_is_short_and_keeps_the_two_commands_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    first = shell_blocks(REPO / "README.md")[0]
    assert [c[:2] for c in commands(first)] == [["make", "demo"], ["make", "test"]]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert "make test" in [line.split("#")[0].strip() for line in ci]  # CI runs the README's test command


def test_every_page_is_in_the_site_nav():
    """A page left out of the nav is still built but found by nobody (mkdocs only reports it as info)."""
    import yaml

    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]

    nav = set(pages(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]))
    on_disk = {p.name for p in (REPO / "docs").glob("*.md")}
    assert on_disk <= nav, on_disk - nav
    assert {"index.md", "reference/options.md"} <= nav  # the two generated pages


@pytest.mark.parametrize("where,words", doc_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_documented_command(where, words):
    program = words[0].rsplit("/", 1)[-1] if words[0].endswith("/m3tune") else words[0]
    if program != "m3tune":
        key = (program, words[1] if len(words) > 1 else "")
        assert key in NOT_RUN or (program, "*") in NOT_RUN, f"{where}: run it here, or say in NOT_RUN why not"
        return
    args = words[1:]
    if "--help" in args or tuple(args[:2]) in RUN_CHEAPLY:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (where, result.output)
        assert result.output.strip(), where
        return
    args = [str(REPO / READERS_FILES[a]) if a in READERS_FILES else a for a in args]
    try:
        cmd, ctx = parse(args)
    except Exception as e:  # the CLI's own usage error: no such option, a bad value, a missing argument
        pytest.fail(f"{where}: {getattr(e, 'format_message', lambda: str(e))()}")
    if args[0] == "step":
        from m3tune.stepcli import config_values

        # an option not given parses as None, or () for a list, which Typer hands the command as None
        given = {k: None if v == () else v for k, v in ctx.params.items()}
        STEPS[args[1]].config.model_validate(config_values(given))  # what the step would build


def test_the_documented_commands_are_found():
    """The parser above must see the commands a reader sees (a fence or continuation rule gone wrong would
    make the test above check nothing)."""
    found = {" ".join(w[:3]) for _, w in doc_commands()}
    assert {"make demo", "make test", "m3tune step train", "m3tune render job", "m3tune submit -n",
            "kubectl apply -f", "m3tune step publish"} <= found, found
    assert len(doc_commands()) >= 60
    # and NOT_RUN names only commands the docs still hold, so its reasons stay about real commands
    used = {(w[0], w[1] if len(w) > 1 else "") for _, w in doc_commands()}
    stale = [key for key in NOT_RUN if key not in used and not (key[1] == "*" and any(u[0] == key[0] for u in used))]
    assert not stale, stale


def test_benchmark_scripts_exist():
    scripts = {w for _, words in doc_commands() for w in words if re.fullmatch(r"benchmarks/\w+\.py", w)}
    assert scripts and all((REPO / s).is_file() for s in scripts), sorted(s for s in scripts if not (REPO / s).is_file())


def _hook():
    spec = importlib.util.spec_from_file_location("docs_options_hook", REPO / "docs" / "hooks" / "options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fields(model, prefix=""):
    """Every leaf field of MODEL as a dotted key, found by walking the pydantic schema (not the hook's code)."""
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})

    def walk(props, prefix):
        for name, prop in props.items():
            ref = prop.get("$ref") or next((a["$ref"] for a in prop.get("anyOf", []) if "$ref" in a), None)
            target = defs.get(ref.rsplit("/", 1)[-1], {}) if ref else {}
            if "properties" in target:
                yield from walk(target["properties"], f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    return list(walk(schema["properties"], prefix))


def test_options_page_lists_every_field_of_every_step():
    page = _hook().options_page()
    sections = dict(re.findall(r"^## (\S+)\n(.*?)(?=^## |\Z)", page, re.M | re.S))
    assert set(sections) == set(STEPS)
    for name, step in STEPS.items():
        keys = re.findall(r"^\| `([\w.]+)` \|", sections[name], re.M)
        assert keys == _fields(step.config), name  # every field, each once, in the model's order
        for key in keys:
            field = step.config.model_fields[key.split(".")[0]]
            if "." not in key and field.description:
                row = next(r for r in sections[name].splitlines() if r.startswith(f"| `{key}` |"))
                assert " ".join(field.description.split()).replace("|", "\\|") in row, (name, key)


def test_site_builds_strictly(tmp_path):
    """mkdocs comes with the dev install, so its absence is a failure, not a skip."""
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin",
                                 "PYTHONPATH": str(REPO / "src"), "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    options = (site / "reference" / "options" / "index.html").read_text()
    assert all(f">{name}<" in options or f"{name}</h2>" in options for name in STEPS)
    home = (site / "index.html").read_text()
    assert "Two commands" in home and 'href="quality/"' in home  # the README, its docs/ links made site-relative
