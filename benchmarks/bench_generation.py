"""Benchmark: LLM request throughput at concurrency 1, 8, 32 against a loopback server answering after a
fixed delay (goal: within 90% of concurrency / delay), and offline generation throughput.

The server (tests/llm_server.py, a real HTTP server speaking chat completions) runs in its own process so
that it does not share the client's interpreter. Run:

    .venv/bin/python benchmarks/bench_generation.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

DELAYS = (0.1, 0.25)  # seconds; real LLM answers take seconds, which only makes the goal easier
ROOT = Path(__file__).resolve().parent.parent

SERVER = """
import sys, time
sys.path.insert(0, {tests!r})
from llm_server import ChatServer
with ChatServer(delay={delay}) as s:
    print(s.url, flush=True)
    time.sleep(3600)
"""


def llm_rates(delay: float) -> list[tuple[int, int, float]]:
    import os

    from m3tune.generation.llm import LLMSettings, WorkItem, parse_json_answer, run_items
    from m3tune.generation.queries import QueriesAnswer
    from m3tune.storage import LocalStore

    os.environ.setdefault("OPENAI_API_KEY", "bench")
    code = SERVER.format(tests=str(ROOT / "tests"), delay=delay)
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    url = server.stdout.readline().strip()
    rows = []
    try:
        for concurrency in (1, 8, 32):
            n = max(30, concurrency * 20)
            parse = parse_json_answer(QueriesAnswer)
            items = [WorkItem(f"bench:{concurrency}:{i}", [
                {"role": "user", "content": f"Passage bench:{concurrency}:{i} (hadith):\nنص\n"
                                            "Write exactly 2 Arabic and 2 English queries"}], parse) for i in range(n)]
            # the step's defaults (flush_every 1: every answer journaled as it arrives), but no retries
            settings = LLMSettings(base_url=url, model="bench", concurrency=concurrency, timeout=30, max_retries=0)
            with tempfile.TemporaryDirectory() as tmp:
                outcome = run_items(items, settings, LocalStore(tmp))
            stats = outcome.stats
            assert not outcome.rejects and stats.accepted == n, (outcome.rejects[:3], stats)
            rows.append((concurrency, n, stats.requests / stats.seconds))
    finally:
        server.terminate()
    return rows


def offline_rates() -> list[tuple[str, int, float]]:
    from m3tune.executor import run_step
    from m3tune.generation.conceptual import GenerateConceptualConfig
    from m3tune.generation.queries import GenerateQueriesConfig
    from m3tune.runroot import open_root

    with tempfile.TemporaryDirectory() as tmp:
        root = open_root(f"{tmp}/runs/bench")
        run_step(root, "ingest")
        t0 = time.perf_counter()
        manifest, _ = run_step(root, "generate-queries", GenerateQueriesConfig(pilot=0))
        queries_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        concept, _ = run_step(root, "generate-conceptual", GenerateConceptualConfig())
        concept_s = time.perf_counter() - t0
    n = manifest.counts["passages"]
    return [("generate-queries, offline, whole corpus", n, n / queries_s, manifest.counts["queries"]),
            (f"generate-conceptual, offline, {concept.counts['themes']} themes over the corpus", n, n / concept_s,
             concept.counts["queries"])]


def main() -> None:
    print(f"python {sys.version.split()[0]}\n")
    print("| server delay | concurrency | requests | achieved req/s | ideal (concurrency / delay) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for delay in DELAYS:
        for concurrency, n, rate in llm_rates(delay):
            ideal = concurrency / delay
            print(f"| {delay * 1000:.0f} ms | {concurrency} | {n} | {rate:,.1f} | {ideal:,.0f} | {rate / ideal:.0%} |")
    print("\n| offline step | passages | passages/s | queries written |")
    print("|---|---:|---:|---:|")
    for what, n, rate, queries in offline_rates():
        print(f"| {what} | {n:,} | {rate:,.0f} | {queries:,} |")


if __name__ == "__main__":
    main()
