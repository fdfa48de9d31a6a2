"""The LLM backend against a real HTTP server on 127.0.0.1 that misbehaves on purpose."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llm_server import RETRY_AFTER, ChatServer
from m3tune.corpus.ingest import IngestConfig
from m3tune.executor import run_step
from m3tune.generation.conceptual import GenerateConceptualConfig
from m3tune.generation.llm import LLMError, LLMSettings
from m3tune.generation.queries import GenerateQueriesConfig
from m3tune.jsonl import read_records
from m3tune.manifest import read_manifest
from m3tune.records import Query

SECRET = "sk-test-DO-NOT-LOG-4242"


@pytest.fixture
def corpus_root(local_root, tmp_path, monkeypatch):
    """A run whose ingest holds 12 small user passages test:1 … test:12."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    path = tmp_path / "passages.jsonl"
    path.write_text("".join(json.dumps({"id": f"test:{i}", "source": "hadith" if i % 2 else "quran",
                                        "text": f"نص تجريبي رقم {i} عن الصبر والصلاة",
                                        "translation_en": f"test passage number {i}"}, ensure_ascii=False) + "\n"
                            for i in range(1, 13)), encoding="utf-8")
    run_step(local_root, "ingest", IngestConfig(sources=[], user_files=[str(path)]))
    return local_root


def settings(server, **kw) -> LLMSettings:
    base = dict(base_url=server.url, model="test-model", timeout=0.5, max_retries=2, backoff=0.05,
                concurrency=4, price_in=1.0, price_out=2.0, flush_every=2)
    return LLMSettings(**{**base, **kw})


def config(server, **kw) -> GenerateQueriesConfig:
    return GenerateQueriesConfig(backend="openai", pilot=0, llm=settings(server, **kw.pop("llm", {})), **kw)


def queries(root) -> list[Query]:
    return list(read_records(root.child("generate-queries"), "queries.jsonl", Query))


def rejects(root) -> dict[str, dict]:
    rows = [json.loads(x) for x in root.child("generate-queries").read_bytes("rejects.jsonl").splitlines()]
    return {r["key"]: r for r in rows if r["kind"] == "passage"}


SCRIPT = {
    "test:1": ["429", "ok"],
    "test:2": ["500", "500", "ok"],
    "test:3": ["hang", "ok"],
    "test:4": ["malformed", "ok"],
    "test:5": ["malformed", "malformed"],
    "test:6": ["empty", "empty"],
    "test:7": ["refusal"],
    "test:8": ["500"] * 10,
}


def test_misbehaving_server_run_finishes_keeps_every_answer_and_never_pays_twice(corpus_root, caplog):
    with ChatServer(SCRIPT) as server:
        manifest, _ = run_step(corpus_root, "generate-queries", config(server))
        first = server.keys()

        got = queries(corpus_root)
        answered = {q.positive_ids[0] for q in got}
        assert answered == {f"test:{i}" for i in (1, 2, 3, 4, 9, 10, 11, 12)}
        assert all(len([q for q in got if q.positive_ids[0] == p]) == 4 for p in answered)
        assert {q.generator.model for q in got} == {"test-model"}
        assert {(q.language, q.type) for q in got} == {("ar", "question"), ("ar", "keyword"),
                                                       ("en", "question"), ("en", "keyword")}
        bad = rejects(corpus_root)
        assert {k: r["reason"] for k, r in bad.items()} == {
            "test:5": "malformed", "test:6": "empty_answer", "test:7": "refusal", "test:8": "retries_exhausted"}
        assert bad["test:8"]["permanent"] is False and bad["test:5"]["permanent"] is True

        # Retry-After was honoured: the retry of test:1 came at least RETRY_AFTER later
        t1 = [r["at"] for r in server.requests if r["key"] == "test:1"]
        assert t1[1] - t1[0] >= RETRY_AFTER * 0.9
        # the malformed answer was re-asked once, showing the model its answer and the error
        reask = [r for r in server.requests if r["key"] == "test:4"][1]["messages"]
        assert reask[-2]["role"] == "assistant" and "not valid" in reask[-1]["content"]

        llm = manifest.counts["llm"]
        assert llm["requests"] == len(first)
        assert llm["retries"] == {"http_429": 1, "http_500": 4, "timeout": 1, "reask": 3}
        assert llm["prompt_tokens"] > 0 and llm["cost_usd"] > 0
        assert manifest.metrics["requests"] == len(first)

        # The API key is nowhere: not in the manifest, not in any output, not in the logs.
        for name in corpus_root.child("generate-queries").list():
            assert SECRET.encode() not in corpus_root.child("generate-queries").read_bytes(name), name
        assert SECRET not in caplog.text

        # A second run pays only for what failed transiently: test:8.
        run_step(corpus_root, "generate-queries", config(server), force=True)
        assert server.keys()[len(first):] == ["test:8"] * 3
        assert queries(corpus_root) == got


def test_budget_stops_cleanly_and_a_bigger_budget_resumes(corpus_root):
    with ChatServer() as server:
        manifest, _ = run_step(corpus_root, "generate-queries", config(server, llm={"max_requests": 5}))
        llm = manifest.counts["llm"]
        assert llm["requests"] == 5 and llm["stopped"].startswith("max_requests reached")
        assert llm["pending"] == 12 - 5 and len({q.positive_ids[0] for q in queries(corpus_root)}) == 5
        manifest, _ = run_step(corpus_root, "generate-queries", config(server))
        assert manifest.counts["llm"]["requests"] == 7 and manifest.counts["llm"]["from_journal"] == 5
        assert len(server.requests) == 12
        assert len({q.positive_ids[0] for q in queries(corpus_root)}) == 12


def test_max_cost_uses_reported_cost(corpus_root):
    with ChatServer(report_cost=True) as server:  # $0.001 a request, as OpenRouter reports usage.cost
        manifest, _ = run_step(corpus_root, "generate-queries",
                               config(server, llm={"max_cost": 0.0025, "price_in": None, "price_out": None,
                                                   "concurrency": 1}))
        assert manifest.counts["llm"]["requests"] == 3 and manifest.counts["llm"]["cost_usd"] == 0.003
        assert "max_cost reached" in manifest.counts["llm"]["stopped"]


def test_bad_key_stops_the_run_with_a_clear_error(corpus_root):
    with ChatServer({f"test:{i}": ["401"] for i in range(1, 13)}) as server:
        with pytest.raises(LLMError, match="refused the API key"):
            run_step(corpus_root, "generate-queries", config(server, llm={"concurrency": 1}))
        assert read_manifest(corpus_root.child("generate-queries")) is None


def test_missing_key_is_a_clear_error(corpus_root, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with ChatServer() as server:
        with pytest.raises(LLMError, match="no API key: set OPENROUTER_API_KEY or OPENAI_API_KEY"):
            run_step(corpus_root, "generate-queries", config(server))
        assert server.requests == []


def test_conceptual_llm_keeps_only_offered_relevant_ids(local_root, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    run_step(local_root, "ingest", IngestConfig(sources=["quran", "bukhari"], limit=400))
    with ChatServer() as server:
        cfg = GenerateConceptualConfig(backend="openai", llm=settings(server), queries_per_theme=4)
        manifest, _ = run_step(local_root, "generate-conceptual", cfg)
        got = list(read_records(local_root.child("generate-conceptual"), "queries.jsonl", Query))
        prompts = {r["key"]: r["messages"][-1]["content"] for r in server.requests}
    assert got and {q.type for q in got} == {"conceptual"}
    for q in got:
        theme = q.id.split("/")[0].split(":")[1]
        offered = [line.split(": ")[0][2:] for line in prompts[theme_name(theme)].splitlines() if line.startswith("- ")]
        assert set(q.positive_ids) <= set(offered)
        assert q.source == "mixed" or all(p.startswith(f"{q.source}:") if q.source == "quran" else
                                          not p.startswith("quran:") for p in q.positive_ids)
    assert manifest.counts["llm"]["requests"] == len(prompts)


def theme_name(theme_id: str) -> str:
    from m3tune.generation.offline import load_themes

    return next(t.ar[0] for t in load_themes()[1] if t.id == theme_id)


def test_killed_mid_run_loses_no_answer_and_duplicates_nothing(corpus_root, tmp_path):
    env = {**os.environ, "OPENAI_API_KEY": SECRET}
    with ChatServer(delay=0.25) as server:
        args = [sys.executable, "-m", "m3tune.cli", "step", "generate-queries", "--root", corpus_root.uri,
                "--backend", "openai", "--base-url", server.url, "--model", "test-model", "--pilot", "0",
                "--concurrency", "1", "--flush-every", "1", "--timeout", "5"]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        journal = corpus_root.child("generate-queries").child("journal")

        def published():  # batch files, not the temporary one being written
            return [n for n in journal.list() if not n.startswith(".")]

        deadline = time.monotonic() + 30
        while len(published()) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        journaled = len(published())
        assert 3 <= journaled < 12 and not corpus_root.child("generate-queries").exists("queries.jsonl")
        asked_before = server.keys()

        done = subprocess.run(args, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        asked_after = server.keys()[len(asked_before):]
    got = queries(corpus_root)
    assert len({q.id for q in got}) == len(got) == 12 * 4
    # every passage was paid for once, except at most the one in flight when killed
    assert len(asked_before) + len(asked_after) <= 12 + 1
    assert not set(asked_after) & set(asked_before[:journaled])
    assert len(published()) == 1  # compacted
