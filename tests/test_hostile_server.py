"""generate-queries and evaluate's API model against hostile endpoints (issue "[4/6] Reliability round 3").

Every misbehaviour ends in a clear one-line error or a documented, bounded outcome within its deadline, and
nothing an endpoint sends (a key it echoes, escapes, a cost it makes up) is stored or printed as is. Each
test names the class it covers and what the code before its fix did.
"""

import json
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embeddings_server import EmbeddingsServer
from llm_server import ANSI, OTHER_MODEL, ChatServer
from m3tune.cli import app
from m3tune.redact import redact

PLANTED = "sk-PLANTED-hostile-do-not-leak"
VERSES = ["quran:1:1", "quran:1:2", "quran:1:3"]


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _last_error(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def _no_traceback(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def _published_text(root_dir: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in root_dir.rglob("*") if p.is_file())


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", PLANTED)
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    """A 3-verse ingest, copied into each test's run root (ingesting once keeps the file fast)."""
    root_dir = tmp_path_factory.mktemp("ingest") / "run"
    assert cli("step", "ingest", "--root", str(root_dir), "--source", "quran", "--limit", "3").exit_code == 0
    return root_dir


@pytest.fixture
def root_dir(ingested, tmp_path) -> Path:
    dest = tmp_path / "runs" / "r"
    shutil.copytree(ingested, dest)
    return dest


def _every(*actions: str) -> dict[str, list[str]]:
    return {v: list(actions) for v in VERSES}


def generate(root_dir: Path, server: ChatServer, *extra: str):
    return cli("step", "generate-queries", "--root", str(root_dir), "--backend", "openai", "--pilot", "0",
               "--base-url", server.url, "--model", "m", "--max-retries", "0", "--backoff", "0.01",
               "--timeout", "2", *extra)


def evaluate(tmp_path: Path, ingested: Path, server: EmbeddingsServer, **settings):
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"id": "g1", "query": "الحمد لله", "relevant_ids": ["quran:1:2"], "category": "exact",
                                "language": "ar", "source": "quran", "difficulty": "easy"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    config = {"api_base_url": server.url, "api_max_retries": 0, **settings}
    (tmp_path / "run.yaml").write_text(json.dumps({"evaluate": config}))
    return cli("evaluate", "--corpus", str(ingested / "ingest" / "passages.jsonl"), "--test-set", str(gold),
               "--model", "api:hash-64", "--config", str(tmp_path / "run.yaml"), "--output-dir", str(tmp_path / "out"))


# ---------------------------------------------------------------------- 1. keys stored from 200 answers

def test_a_key_echoed_in_a_valid_answer_is_stored_nowhere(root_dir, key_env):
    # Before: only error bodies were redacted; a 200 answer quoting the key put it in queries.jsonl (accepted
    # English queries, the model name), rejects.jsonl (Arabic queries rejected as mostly Latin) and the journal.
    with ChatServer(_every("keyecho")) as server:
        result = generate(root_dir, server)
    assert result.exit_code == 0, result.output
    out = root_dir / "generate-queries"
    assert _lines(out / "queries.jsonl") and "[REDACTED]" in (out / "queries.jsonl").read_text()
    assert PLANTED not in _published_text(root_dir)
    assert PLANTED not in result.stderr and PLANTED not in result.stdout


# ---------------------------------------------------------------------------------- 2. redaction gaps

def test_a_short_key_is_redacted_and_a_too_short_one_refused(root_dir, monkeypatch):
    # Before: a key under 8 characters was never masked, so a 400 body quoting it reached stderr and rejects.jsonl.
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "k3y9Q")
    with ChatServer(_every("echobare")) as server:
        result = generate(root_dir, server)
    assert result.exit_code == 4 and "every one of the 3 request(s) failed" in _last_error(result)
    assert "k3y9Q" not in result.stderr and "k3y9Q" not in _published_text(root_dir)
    # a key of 1-3 characters would mask ordinary letters everywhere: refused before any request
    monkeypatch.setenv("OPENAI_API_KEY", "ab")
    with ChatServer() as server:
        refused = generate(root_dir, server)
        assert server.requests == []
    assert refused.exit_code == 1 and "OPENAI_API_KEY" in _last_error(refused) and "4 characters" in _last_error(refused)


AWS_ID, AWS_SECRET = "AKIDHOSTILE", "wJal/rXU+tnF=EMI%2FK7MDENG"


@pytest.mark.parametrize("text", [f"http://{AWS_ID}:{AWS_SECRET}@127.0.0.1:9/x",
                                  f"s3://{AWS_ID}:{AWS_SECRET}@bucket/runs/r",
                                  f"Could not connect to the endpoint URL: \"https://{AWS_ID}:{AWS_SECRET}@h/b?x=1\""])
def test_url_credentials_with_slashes_and_plus_are_redacted(text):
    # Before: the user-part pattern stopped at '/', so an AWS-style secret (and its key id) stayed.
    clean = redact(text)
    assert AWS_ID not in clean and "rXU" not in clean and "K7MDENG" not in clean, clean


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_url_credentials_reach_no_error_line_or_verbose_traceback(tmp_path):
    # Before: `-v` re-raised the error, and the traceback printed the URL with its secret and key id; without
    # -v, the one-line error printed a password holding '/' as is.
    script = ("import sys; from m3tune.cli import app; sys.argv = ['m3tune'] + sys.argv[1:]; app()")
    runs = [["status", "--root", f"s3://{AWS_ID}:{AWS_SECRET}@bucket/runs/r"],
            ["status", "--root", "s3://bucket/runs/r", "--s3-endpoint",
             f"http://{AWS_ID}:{AWS_SECRET}@127.0.0.1:{_closed_port()}"]]
    env = {**__import__("os").environ, "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}
    for args in runs:
        for verbose in ([], ["-v"]):
            done = subprocess.run([sys.executable, "-c", script, *args, *verbose], capture_output=True, text=True,
                                  timeout=60, env=env, cwd=tmp_path)
            assert done.returncode != 0, done.stderr
            for secret in (AWS_ID, "rXU", "K7MDENG"):
                assert secret not in done.stderr + done.stdout, (args, verbose, done.stderr[-2000:])


# ------------------------------------------------------------------------------------------- 3. hangs

def test_an_answer_dripped_a_byte_at_a_time_times_out(root_dir, key_env):
    # Before: the timeout applied to each read, so a byte every 0.5 s was never timed out (the server here cuts
    # its drip after 12 s; a real one need not).
    with ChatServer({"quran:1:1": ["drip", "drip"]}) as server:
        t0 = time.monotonic()
        result = generate(root_dir, server, "--pilot", "1", "--max-retries", "1")
        elapsed = time.monotonic() - t0
    assert elapsed < 10, elapsed
    assert result.exit_code == 1 and "retries_exhausted" in _last_error(result), result.output
    assert "timeout" in _last_error(result)


@pytest.mark.parametrize("action", ["drip", "driphead"])
def test_embeddings_dripped_a_byte_at_a_time_time_out(tmp_path, ingested, key_env, action):
    # Before: as for chat, never timed out (here: until the server cut its drip after 12 s).
    with EmbeddingsServer([action], key=PLANTED) as server:
        t0 = time.monotonic()
        result = evaluate(tmp_path, ingested, server, api_timeout=1)
        elapsed = time.monotonic() - t0
    assert elapsed < 8, elapsed
    assert result.exit_code == 4 and "timeout" in _last_error(result), result.output


def test_vectors_200000_wide_are_refused_at_once(tmp_path, ingested, key_env):
    # Before: any width was taken (a 200,000-wide answer ran past 300 s on a real corpus).
    with EmbeddingsServer(["huge"], key=PLANTED) as server:
        result = evaluate(tmp_path, ingested, server)
    _no_traceback(result)
    assert result.exit_code == 4 and "200000 dimensions" in _last_error(result) and "8192" in _last_error(result)


@pytest.mark.parametrize("which", ["chat", "embeddings"])
def test_a_gzip_bomb_is_refused_past_the_bound(root_dir, tmp_path, ingested, key_env, which):
    # Before: the body was inflated whole (100 MiB here; 1 GiB reached a 2.25 GB peak).
    tracemalloc.start()
    try:
        if which == "chat":
            with ChatServer(_every("bomb")) as server:
                result = generate(root_dir, server)
        else:
            with EmbeddingsServer(["bomb"], key=PLANTED) as server:
                result = evaluate(tmp_path, ingested, server)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _no_traceback(result)
    assert result.exit_code == 4 and "MiB" in _last_error(result), result.output
    assert peak < 60 * 2**20, peak  # the bound (8 MiB a chat answer, 17 MiB a batch of 64 vectors), not 100 MiB


# --------------------------------------------------------------------- 4. tracebacks from odd answers

@pytest.mark.parametrize("action", ["notjson200", "contentint", "nomessage"])
def test_a_broken_completion_is_retried_then_one_line(root_dir, key_env, action):
    # Before: `content: 12345` and a choice with no message raised AttributeError (a traceback).
    with ChatServer(_every(action)) as server:
        result = generate(root_dir, server)
    _no_traceback(result)
    assert result.exit_code == 1 and "bad_response" in _last_error(result), result.output


@pytest.mark.parametrize("action", ["tokensmany", "costabc"])
def test_unreadable_usage_leaves_the_cost_unknown_without_a_cap(root_dir, key_env, action):
    # Before: `prompt_tokens: "many"` raised TypeError and `cost: "abc"` ValueError (tracebacks).
    with ChatServer(_every(action)) as server:
        result = generate(root_dir, server)
    _no_traceback(result)
    assert result.exit_code == 0, result.output
    manifest = json.loads((root_dir / "generate-queries" / "_manifest.json").read_text())
    assert manifest["counts"]["llm"]["cost_usd"] is None and manifest["counts"]["queries"] > 0


@pytest.mark.parametrize("action", ["costabc", "costneg", "costnan"])
def test_a_cost_that_is_not_a_non_negative_number_stops_a_capped_run(root_dir, key_env, action):
    # Before: a negative or NaN cost was added to the total, so --max-cost never stopped anything ("abc": a
    # traceback).
    with ChatServer(_every(action)) as server:
        result = generate(root_dir, server, "--max-cost", "0.01", "--reports-cost")
        assert len(server.requests) == 1  # under a cap, one at a time until a cost is known: the first stops it
    _no_traceback(result)
    assert result.exit_code == 4 and "usage.cost" in _last_error(result) and "max_cost" in _last_error(result)


@pytest.mark.parametrize("action", ["strings", "datanull", "nan", "notjson"])
def test_a_broken_embeddings_answer_is_one_line_and_never_scored(tmp_path, ingested, key_env, action):
    # Before: strings and `data: null` raised tracebacks; NaN vectors were scored as valid.
    with EmbeddingsServer([action], key=PLANTED) as server:
        result = evaluate(tmp_path, ingested, server)
    _no_traceback(result)
    assert result.exit_code == 4 and "bad_response" in _last_error(result), result.output
    assert not (tmp_path / "out" / "results.json").exists()


# --------------------------------------------------------------------- 5. generation silent acceptances

@pytest.mark.parametrize("actions", [("malformed", "malformed"), ("refusal",), ("sorry",)])
def test_every_answer_rejected_is_exit_4_naming_the_rejects_file(root_dir, key_env, actions):
    # Before: exit 0, 0 queries and a complete manifest.
    with ChatServer(_every(*actions)) as server:
        result = generate(root_dir, server)
    assert result.exit_code == 4, result.output
    message = _last_error(result)
    assert "no query was accepted" in message and "rejects.jsonl" in message, message
    assert not (root_dir / "generate-queries" / "_manifest.json").exists()
    assert len(_lines(root_dir / "generate-queries" / "rejects.jsonl")) == 3


def test_the_model_that_answered_is_recorded(root_dir, key_env):
    # Before: an answer from another model was recorded as the model asked for.
    with ChatServer(_every("othermodel")) as server:
        result = generate(root_dir, server)
    assert result.exit_code == 0, result.output
    queries = _lines(root_dir / "generate-queries" / "queries.jsonl")
    assert queries and {q["generator"]["model"] for q in queries} == {OTHER_MODEL}
    journal = "".join(p.read_text() for p in (root_dir / "generate-queries" / "journal").glob("*.jsonl"))
    assert OTHER_MODEL in journal


def test_a_23000_character_query_is_rejected_as_too_long(root_dir, key_env):
    # Before: kept (max_words counts words; one 23,000-character word passed).
    with ChatServer(_every("longquery")) as server:
        result = generate(root_dir, server)
    assert result.exit_code == 0, result.output
    queries = _lines(root_dir / "generate-queries" / "queries.jsonl")
    assert queries and max(len(q["query"]) for q in queries) < 1000
    rejects = [r for r in _lines(root_dir / "generate-queries" / "rejects.jsonl") if r["kind"] == "query"]
    assert {r["reason"] for r in rejects} == {"too_long"} and len(rejects) == 3


def test_escapes_from_an_endpoint_are_kept_as_text_but_never_printed_raw(root_dir, key_env):
    # Before: the error line printed an endpoint's ANSI escapes and bell as they came.
    with ChatServer(_every("ansi")) as server:
        kept = generate(root_dir, server, "-v")
    assert kept.exit_code == 0, kept.output
    queries = _lines(root_dir / "generate-queries" / "queries.jsonl")
    assert any(ANSI in q["query"] for q in queries)  # the data is kept as written: escaped on output only
    shutil.rmtree(root_dir / "generate-queries" / "journal")  # or the answers above are read again
    with ChatServer(_every("ansi400")) as server:
        failed = generate(root_dir, server, "--force")
    assert failed.exit_code == 4, failed.output
    for out in (kept, failed):
        assert not any(c in out.stderr + out.stdout for c in "\x1b\x07\x08"), repr(out.stderr[-500:])
    assert "\\x1b[31m" in _last_error(failed)


def test_redact_escapes_control_characters_for_terminals():
    from m3tune.redact import printable

    assert printable("a\x1b[31mb\x07\tc\nd") == "a\\x1b[31mb\\x07\tc\nd"
