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
from m3tune.errors import ConfigError
from m3tune.executor import step_status
from m3tune.generation.llm import LLMError, LLMSettings
from m3tune.pipeline import get_step
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
    return {r["key"]: r for r in rows if r["kind"] == "item"}


SCRIPT = {
    "test:1": ["429", "ok"],
    "test:2": ["500", "500", "ok"],
    "test:3": ["hang", "ok"],
    "test:4": ["malformed", "ok"],
    "test:5": ["malformed", "malformed"],
    "test:6": ["empty", "empty"],
    "test:7": ["refusal"],
    "test:8": ["500"] * 3,  # one more than max_retries allows: the rerun succeeds
    "test:9": ["html", "badretry", "short", "ok"],
    "test:10": ["sorry"],
    "test:11": ["length"],
    "test:12": ["400"],
}


def test_misbehaving_server_run_finishes_keeps_every_answer_and_never_pays_twice(corpus_root, caplog):
    with ChatServer(SCRIPT) as server:
        manifest, _ = run_step(corpus_root, "generate-queries", config(server))
        first = server.keys()

        got = queries(corpus_root)
        answered = {q.positive_ids[0] for q in got}
        assert answered == {f"test:{i}" for i in (1, 2, 3, 4, 9)}
        assert all(len([q for q in got if q.positive_ids[0] == p]) == 4 for p in answered)
        assert {q.generator.model for q in got} == {"test-model"}
        assert {(q.language, q.type) for q in got} == {("ar", "question"), ("ar", "keyword"),
                                                       ("en", "question"), ("en", "keyword")}
        bad = rejects(corpus_root)
        assert {k: (r["reason"], r["final"]) for k, r in bad.items()} == {
            "test:5": ("malformed", True), "test:6": ("empty_answer", True), "test:7": ("refusal", True),
            "test:10": ("refusal", True), "test:8": ("retries_exhausted", False), "test:11": ("truncated", False),
            "test:12": ("http_400", False)}

        # Retry-After was honoured: the retry of test:1 came at least RETRY_AFTER later
        t1 = [r["at"] for r in server.requests if r["key"] == "test:1"]
        assert t1[1] - t1[0] >= RETRY_AFTER * 0.9
        # the malformed answer was re-asked once, showing the model its answer and the error
        reask = [r for r in server.requests if r["key"] == "test:4"][1]["messages"]
        assert reask[-2]["role"] == "assistant" and "not valid" in reask[-1]["content"]
        # too few queries is malformed too: re-asked, with the count in the message
        short = [r for r in server.requests if r["key"] == "test:9"][-1]["messages"]
        assert "asked for 2 Arabic and 2 English queries, got 1 and 0" in short[-1]["content"]

        llm = manifest.counts["llm"]
        assert llm["requests"] == len(first)
        assert llm["retries"] == {"http_429": 2, "http_500": 4, "timeout": 1, "bad_response": 1, "reask": 4}
        assert llm["prompt_tokens"] > 0 and llm["cost_usd"] > 0
        assert manifest.metrics["requests"] == len(first)
        # failures worth retrying leave the step incomplete: status says stale, a plain rerun finishes it
        assert not manifest.complete and "3 failed for now" in manifest.incomplete_reason
        assert step_status(corpus_root, get_step("generate-queries"), config(server)).state == "stale"

        # The API key is nowhere: not in the manifest, not in any output, not in the logs.
        folder = corpus_root.child("generate-queries")
        for name in folder.list():
            assert SECRET.encode() not in folder.read_bytes(name), name
        assert SECRET not in caplog.text

        # The rerun pays only for what failed transiently (test:8, test:11, test:12), not for final answers.
        run_step(corpus_root, "generate-queries", config(server))
        assert sorted(set(server.keys()[len(first):])) == ["test:11", "test:12", "test:8"]
        assert {q.positive_ids[0] for q in queries(corpus_root)} == answered | {"test:8", "test:11", "test:12"}
        assert read_manifest(folder).complete
        assert not run_step(corpus_root, "generate-queries", config(server))[1]  # done now


def test_journal_is_keyed_by_the_exact_request(corpus_root):
    with ChatServer() as server:
        run_step(corpus_root, "generate-queries", config(server))
        assert len(server.requests) == 12
        run_step(corpus_root, "generate-queries", config(server, queries_per_passage=6))
        assert len(server.requests) == 24  # a different request: asked again
        assert {len([q for q in queries(corpus_root) if q.positive_ids[0] == "test:1"])} == {6}
        run_step(corpus_root, "generate-queries", config(server))
        assert len(server.requests) == 24  # the first request is still in the journal


def test_budget_stops_cleanly_and_reruns_resume(corpus_root):
    with ChatServer() as server:
        cfg = config(server, llm={"max_requests": 5})
        manifest, _ = run_step(corpus_root, "generate-queries", cfg)
        llm = manifest.counts["llm"]
        assert llm["requests"] == 5 and llm["stopped"].startswith("max_requests reached")
        assert llm["pending"] == 12 - 5 and len({q.positive_ids[0] for q in queries(corpus_root)}) == 5
        assert not manifest.complete and "7 not asked" in manifest.incomplete_reason
        run_step(corpus_root, "generate-queries", cfg)  # the same budget again: 5 more
        manifest, _ = run_step(corpus_root, "generate-queries", cfg)
        assert manifest.complete and manifest.counts["llm"]["from_journal"] == 10
        assert len(server.requests) == 12
        assert len({q.positive_ids[0] for q in queries(corpus_root)}) == 12


@pytest.mark.parametrize("concurrency", [1, 4])
def test_max_cost_is_never_passed(corpus_root, concurrency):
    with ChatServer(report_cost=True) as server:  # $0.001 a request, as OpenRouter reports usage.cost
        manifest, _ = run_step(corpus_root, "generate-queries", config(
            server, llm={"max_cost": 0.0025, "price_in": None, "price_out": None, "concurrency": concurrency,
                         "reports_cost": True}))
        llm = manifest.counts["llm"]
        assert llm["requests"] == 2 and llm["cost_usd"] == 0.002 and "max_cost" in llm["stopped"]


def test_max_cost_without_a_way_to_know_cost_is_refused(corpus_root):
    with ChatServer() as server:
        with pytest.raises(ConfigError, match="max_cost needs price_in and price_out"):
            run_step(corpus_root, "generate-queries", config(
                server, llm={"max_cost": 1.0, "price_in": None, "price_out": None}))
        assert server.requests == []
        # said to report its cost, but it does not: stop at the first answer rather than spend blind
        with pytest.raises(LLMError, match="reported no usage cost"):
            run_step(corpus_root, "generate-queries", config(
                server, llm={"max_cost": 1.0, "price_in": None, "price_out": None, "reports_cost": True,
                             "concurrency": 1}))
        assert len(server.requests) == 1


@pytest.mark.parametrize("status, message", [("401", "refused the API key"), ("402", "payment required")])
def test_bad_key_or_no_credit_stops_the_run_with_a_clear_error(corpus_root, status, message):
    with ChatServer({f"test:{i}": [status] for i in range(1, 13)}) as server:
        with pytest.raises(LLMError, match=message):
            run_step(corpus_root, "generate-queries", config(server, llm={"concurrency": 1}))
        assert len(server.requests) == 1
        assert read_manifest(corpus_root.child("generate-queries")) is None


def test_missing_key_is_a_clear_error(corpus_root, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with ChatServer() as server:
        with pytest.raises(LLMError, match="no API key: set OPENROUTER_API_KEY or OPENAI_API_KEY"):
            run_step(corpus_root, "generate-queries", config(server))
        assert server.requests == []


def test_llm_run_on_s3_resumes_from_its_journal(s3_root, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("M3TUNE_S3_ENDPOINT", s3_endpoint)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"s3:{i}", "source": "hadith", "text": f"نص رقم {i}"},
                                       ensure_ascii=False) + "\n" for i in range(6)), encoding="utf-8")
    run_step(s3_root, "ingest", IngestConfig(sources=[], user_files=[str(path)]))
    with ChatServer({"s3:3": ["500"] * 10}) as server:
        manifest, _ = run_step(s3_root, "generate-queries", config(server))
        assert not manifest.complete and len(server.requests) == 5 + 3
        run_step(s3_root, "generate-queries", config(server, llm={"max_retries": 0}))
        assert len(server.requests) == 5 + 3 + 1  # only s3:3 again
    assert [n for n in s3_root.child("generate-queries").child("journal").list()] and \
        len(s3_root.child("generate-queries").child("journal").list()) == 1


def test_conceptual_llm_keeps_only_offered_relevant_ids(local_root, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    run_step(local_root, "ingest", IngestConfig(sources=["quran", "bukhari"], limit=400))
    with ChatServer({"الصبر": ["invented"]}) as server:
        cfg = GenerateConceptualConfig(backend="openai", llm=settings(server), queries_per_theme=4)
        manifest, _ = run_step(local_root, "generate-conceptual", cfg)
        got = list(read_records(local_root.child("generate-conceptual"), "queries.jsonl", Query))
        prompts = {r["key"]: r["messages"][-1]["content"] for r in server.requests}
    assert got and {q.type for q in got} == {"conceptual"}
    for q in got:
        theme = q.id.split("/")[0].split(":")[1]
        offered = [line.split(": ")[0][2:] for line in prompts[theme_name(theme)].splitlines() if line.startswith("- ")]
        assert set(q.positive_ids) <= set(offered) | twins_of(local_root, offered)
        assert "quran:999:1" not in q.positive_ids
        assert q.source == "mixed" or all(p.startswith(f"{q.source}:") if q.source == "quran" else
                                          not p.startswith("quran:") for p in q.positive_ids)
    assert manifest.counts["llm"]["requests"] == len(prompts)
    # the patience answer named an id never offered, and hadith queries while keeping no hadith
    dropped = [json.loads(x) for x in local_root.child("generate-conceptual").read_bytes("rejects.jsonl").splitlines()]
    assert {(d["key"], d["reason"]) for d in dropped} == {("theme:patience", "unknown_relevant_ids"),
                                                          ("theme:patience", "no_positives_in_scope")}
    assert manifest.counts["dropped"]["unknown_relevant_ids"] == 1
    patience = [q for q in got if q.id.startswith("theme:patience/")]
    assert patience and all(q.source == "quran" for q in patience)


def twins_of(root, ids) -> set[str]:
    from m3tune.generation.base import twins
    from m3tune.records import Passage

    same = twins(list(read_records(root.child("ingest"), "passages.jsonl", Passage)))
    return {t for i in ids for t in same[i]}


def theme_name(theme_id: str) -> str:
    from m3tune.generation.offline import load_themes

    return next(t.ar[0] for t in load_themes()[1] if t.id == theme_id)


def test_killed_mid_run_loses_no_answer_and_duplicates_nothing(corpus_root, tmp_path):
    env = {**os.environ, "OPENAI_API_KEY": SECRET}
    with ChatServer(delay=0.25) as server:
        # the defaults: flush_every 1; concurrency 4, so up to 4 answers can be in flight at the kill
        args = [sys.executable, "-m", "m3tune.cli", "step", "generate-queries", "--root", corpus_root.uri,
                "--backend", "openai", "--base-url", server.url, "--model", "test-model", "--pilot", "0",
                "--concurrency", "4", "--timeout", "5"]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        journal = corpus_root.child("generate-queries").child("journal")

        def journaled() -> set[str]:  # published batch files, not the temporary one being written
            return {json.loads(line)["key"] for name in journal.list() if not name.startswith(".")
                    for line in journal.read_bytes(name).splitlines()}

        deadline = time.monotonic() + 30
        while len(journaled()) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kept = journaled()
        assert 3 <= len(kept) < 12 and not corpus_root.child("generate-queries").exists("queries.jsonl")
        asked_before = server.keys()

        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        asked_after = server.keys()[len(asked_before):]
    assert not set(asked_after) & kept  # nothing journaled is paid for again
    assert len(asked_before) + len(asked_after) <= 12 + 4  # only the answers in flight at the kill, twice
    got = queries(corpus_root)
    assert len({q.id for q in got}) == len(got) == 12 * 4
    assert len([n for n in journal.list() if not n.startswith(".")]) == 1  # compacted
