import json

import pytest
import typer
from typer.testing import CliRunner

from m3tune.cli import EXIT_TARGETS_MISSED, app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def _commands(group: typer.Typer, prefix=()):
    for cmd in group.registered_commands:
        yield (*prefix, cmd.name or cmd.callback.__name__)
    for sub in group.registered_groups:
        yield (*prefix, sub.name)
        yield from _commands(sub.typer_instance, (*prefix, sub.name))


def test_the_command_loads_without_the_heavy_extras():
    """The core install has no numpy, torch or transformers (they come with the extras): `m3tune --help`
    must load without them, as every step imports them only when it runs."""
    import subprocess
    import sys

    blocker = ("import builtins, sys\n"
               "real = builtins.__import__\n"
               "def refuse(name, *a, **k):\n"
               "    if name.split('.')[0] in ('numpy', 'torch', 'transformers'):\n"
               "        raise ModuleNotFoundError(f'No module named {name!r} (blocked)')\n"
               "    return real(name, *a, **k)\n"
               "builtins.__import__ = refuse\n"
               "sys.argv = ['m3tune', '--help']\n"
               "from m3tune.cli import app\n"
               "app()\n")
    out = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Usage: m3tune" in " ".join(out.stdout.split())


@pytest.mark.parametrize("command", sorted(set(_commands(app))), ids=" ".join)
def test_every_command_explains_itself(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert "Usage: m3tune " + " ".join(command) in " ".join(result.output.split())
    click_command = typer.main.get_command(app)
    for name in command:
        click_command = click_command.commands[name]
    assert click_command.help, "no summary"
    undocumented = [p.name for p in click_command.params if not getattr(p, "help", None) and p.name != "help"
                    and p.param_type_name == "option"]
    assert not undocumented, f"options without help: {undocumented}"


def test_run_then_status(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("ingest:\n  sources: [quran]\n  limit: 7\n")
    root = str(tmp_path / "runs" / "cli")
    result = invoke("run", "--root", root, "--config", str(config), "--until", "ingest")
    assert result.exit_code == 0, result.output
    assert "ingest ran: passages 7" in result.output
    assert (tmp_path / "runs" / "cli" / "ingest" / "passages.jsonl").is_file()
    again = invoke("run", "--runs", str(tmp_path / "runs"), "--run-id", "cli", "--config", str(config), "--until", "ingest")
    assert "ingest skipped (done)" in again.output
    status = invoke("status", "--root", root, "--config", str(config), "--json")
    assert json.loads(status.output)[0]["state"] == "done"
    # without --config, status answers for `m3tune run` without --config: the defaults (all sources)
    status = json.loads(invoke("status", "--root", root, "--json").output)[0]
    assert (status["state"], status["reason"]) == ("stale", "config changed")
    other = tmp_path / "other.yaml"
    other.write_text("ingest:\n  sources: [quran]\n  limit: 8\n")
    stale = invoke("status", "--root", root, "--config", str(other), "--json")
    assert json.loads(stale.output)[0]["state"] == "stale"


@pytest.mark.parametrize("args, message", [
    (("run",), "no run given"),
    (("run", "--run-id", "../etc"), "invalid run id"),
    (("run", "--root", "x/runs/a", "--run-id", "b"), "either --root or --run-id"),
    (("step", "ingest", "--root", "RUNS/r", "--source", "tirmidhi"), "sources.0"),
    (("step", "ingest", "--root", "RUNS/r", "--limit", "0"), "greater than or equal to 1"),
    (("step", "analyze", "--root", "RUNS/r", "--input", "RUNS/none.jsonl"), "not found"),
    (("run", "--root", "RUNS/r", "--force", "nope"), "not a pipeline step"),
    (("step", "ingest", "--root", "RUNS/r", "--source", "quran", "--source", "quran"), "each source may be given once"),
    (("step", "ingest", "--root", "RUNS/r", "--no-packaged", "--user-file", "RUNS"), "cannot read"),
    # a benchmark asked for an absent model fails at once, before any data is built or anything trains
    (("bench", "train", "--model", "local:e5-large"), "unknown local model"),
    (("bench", "train", "--model", "RUNS/no-model"), "no such folder"),
])
def test_user_errors_are_one_clear_line(tmp_path, args, message):
    args = tuple(a.replace("RUNS", str(tmp_path)) for a in args)
    result = runner.invoke(app, list(args))
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and message in result.output
    assert "Traceback" not in result.output


def test_bad_config_file_names_file_and_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("ingest:\n  limt: 5\n")
    result = runner.invoke(app, ["run", "--root", str(tmp_path / "r"), "--config", str(config)])
    assert result.exit_code == 1 and "bad.yaml: ingest: limt: Extra inputs are not permitted" in result.output
    config.write_text("trian: {}\n")
    result = runner.invoke(app, ["run", "--root", str(tmp_path / "r"), "--config", str(config)])
    assert result.exit_code == 1 and "unknown step 'trian'" in result.output


def test_analyze_command_shows_targets_and_exits_3_on_miss(tmp_path):
    gen = {"backend": "offline", "model": "none", "prompt_version": "v1"}
    rows = [{"id": f"q{i}", "query": "hadith about patience", "language": "en", "type": "question",
             "positive_ids": ["bukhari:1"], "source": "hadith", "generator": gen} for i in range(3)]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "{bad\n", encoding="utf-8")
    bad = runner.invoke(app, ["analyze", str(path)])
    assert bad.exit_code == 4 and "q.jsonl:4: invalid JSON" in bad.output  # bad input: not worth a retry
    ok = invoke("analyze", str(path), "--skip-invalid", "--json", str(tmp_path / "r.json"))
    assert ok.exit_code == 0 and "❌" in ok.output and "100.0%" in ok.output and "skipped" in ok.output
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == 3
    miss = runner.invoke(app, ["analyze", str(path), "--skip-invalid", "--fail-on-miss"])
    assert miss.exit_code == EXIT_TARGETS_MISSED
    assert "targets missed: arabic 0.0% (target 50%, at least 45%); conceptual 0.0%" in " ".join(miss.output.split())
    met = invoke("analyze", str(path), "--skip-invalid", "--arabic-target", "0", "--conceptual-target", "0",
                 "--quran-target", "0", "--fail-on-miss")
    assert met.exit_code == 0 and "❌" not in met.output
