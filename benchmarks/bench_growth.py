"""Benchmark: how mining's and training's wall time and peak memory grow with the corpus and the examples.

Mining (index + mine-negatives, the exact backend, the tiny local XLM-R `local:tiny-xlmr`, 256 tokens, every
rule on but the consistency rule, which an untrained encoder would fail every query on): the corpus at 1x,
5x and 25x a seeded sample of BASE_PASSAGES packaged passages (Quran and hadith). Copy 0 of each passage is
the real one; every further copy is perturbed (seeded: one word dropped, two neighbouring words swapped), so
no two passages are the same text and every one is encoded. The queries grow with the corpus, as they do in
a pipeline: the offline generators (`generate-queries`, `generate-exact`) read a pilot of one passage in
QUERY_EVERY (`generate-conceptual`'s theme queries, which mine-negatives also needs, are a fixed number).

Training (the train step's loop as the step runs it: `loop.setup`, `train`, `save`; tiny model, batch 16, one
epoch, validation before and after, the final model saved): BASE_EXAMPLES real Quran examples (`m3tune.bench.train.quran_examples`)
at 1x, 5x and 25x, validation a quarter of it. One epoch, not a fixed number of steps: steps grow with the
examples, and so does everything else an epoch does (reading and checking the data, the sampler, the
validation), which a fixed-steps run would hide.

Each (workload, scale) runs in a fresh process with an empty embeddings cache; wall time and peak memory
(max RSS) are its own. A straight line `wall = a + b * n` is fitted to the three points: its residuals say
whether the growth is linear. The process's RSS after its imports is printed too (memory the size does not
move).

    .venv/bin/python benchmarks/bench_growth.py [--only mining|training]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCALES = (1, 5, 25)
BASE_PASSAGES = 2000
QUERY_EVERY = 8
BASE_EXAMPLES = 100
MAX_LENGTH = 256


def rss_mb() -> float:
    """This process's peak RSS since it started (VmHWM): getrusage's ru_maxrss would also carry the RSS of the
    parent it was forked from (Linux keeps the pre-exec high-water mark), here a process holding the corpus."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def perturbed(text: str, rng: random.Random) -> str:
    """TEXT with one word dropped and two neighbouring words swapped (a text of one or two words: repeated)."""
    words = text.split()
    if len(words) < 3:
        return f"{text} {text}"
    del words[rng.randrange(len(words))]
    i = rng.randrange(len(words) - 1)
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def corpus_file(path: str, scale: int) -> int:
    """Write SCALE copies of the seeded base sample to PATH (user passage JSONL); returns the passages."""
    from m3tune.corpus.packaged import hadith_passages, quran_passages

    passages = [*quran_passages(), *hadith_passages("bukhari"), *hadith_passages("muslim")]
    base = random.Random(3).sample(passages, BASE_PASSAGES)
    rng = random.Random(11)
    with open(path, "w", encoding="utf-8") as f:
        for copy in range(scale):
            for p in base:
                row = {"id": p.id if copy == 0 else f"{p.id}.r{copy}", "source": p.source,
                       "collection": p.collection, "text": p.text if copy == 0 else perturbed(p.text, rng)}
                if p.translation_en:
                    row["translation_en"] = p.translation_en
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return scale * BASE_PASSAGES


def prepare_mining(root_uri: str, scale: int, workdir: str) -> dict:
    from m3tune.corpus.ingest import IngestConfig
    from m3tune.executor import run_step
    from m3tune.generation.exact import GenerateExactConfig
    from m3tune.generation.queries import GenerateQueriesConfig
    from m3tune.runroot import open_root

    root = open_root(root_uri)
    n = corpus_file(f"{workdir}/corpus-{scale}.jsonl", scale)
    run_step(root, "ingest", IngestConfig(sources=[], user_files=[f"{workdir}/corpus-{scale}.jsonl"]))
    manifest, _ = run_step(root, "generate-queries", GenerateQueriesConfig(pilot=n // QUERY_EVERY))
    exact, _ = run_step(root, "generate-exact", GenerateExactConfig(pilot=n // QUERY_EVERY))
    conceptual, _ = run_step(root, "generate-conceptual")  # mine-negatives needs it (themes: a fixed count)
    return {"passages": n, "queries": sum(m.counts["queries"] for m in (manifest, exact, conceptual))}


def mine(root_uri: str) -> dict:
    import torch  # noqa: F401  imported before the clock starts
    import transformers  # noqa: F401

    from m3tune.executor import run_step
    from m3tune.index.step import EncoderSettings, IndexConfig
    from m3tune.mining.mine import MineConfig
    from m3tune.runroot import open_root

    root = open_root(root_uri)
    base_rss = rss_mb()
    t0 = time.perf_counter()
    run_step(root, "index", IndexConfig(encoder=EncoderSettings(model="local:tiny-xlmr", max_length=MAX_LENGTH,
                                                                batch_size=64), backend="exact"), force=True)
    t1 = time.perf_counter()
    index_rss = rss_mb()
    manifest, _ = run_step(root, "mine-negatives", MineConfig(consistency_k=None), force=True)
    t2 = time.perf_counter()
    return {"seconds": t2 - t0, "index_seconds": t1 - t0, "mine_seconds": t2 - t1, "rss_after_imports_mb": base_rss,
            "rss_after_index_mb": index_rss, "examples": manifest.counts["examples"]}


def prepare_training(root_uri: str, scale: int) -> dict:
    from m3tune.bench.train import prepare

    n = scale * BASE_EXAMPLES
    prepare(root_uri, n_train=n, n_val=n // 4)
    return {"examples": n, "validation": n // 4}


def train(root_uri: str, workdir: str) -> dict:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from m3tune.training import loop
    from m3tune.training.config import TrainConfig

    base_rss = rss_mb()
    config = TrainConfig(model="local:tiny-xlmr", dims=[32, 16], batch_size=16, gradient_accumulation=1, epochs=1,
                         eval_every=10**6, checkpoint_every=10**6, patience=None, query_max_length=64,
                         passage_max_length=128, negatives=3, validation_corpus="validation")
    # the train step's loop as the step runs it (bench.prepare writes combine's files without a manifest)
    t0 = time.perf_counter()
    session = loop.setup(config, root_uri=root_uri, work=Path(workdir))  # model, data, sampler plans
    t1 = time.perf_counter()
    loop.train(session)  # the steps, validation before and after
    loop.save(session)
    t2 = time.perf_counter()
    loop.cleanup(session)
    steps = [h for h in session.history if h["kind"] == "train"]
    step_seconds = sum(config.batch_size / h["examples_per_s"] for h in steps)
    return {"seconds": t2 - t0, "setup_seconds": t1 - t0, "step_seconds": step_seconds,
            "validation_and_save_seconds": t2 - t1 - step_seconds, "rss_after_imports_mb": base_rss,
            "steps": len(steps)}


def fit(points: list[tuple[float, float]]) -> tuple[float, float, list[float]]:
    """(a, b, residuals) of the least-squares line y = a + b x."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    a = my - b * mx
    return a, b, [y - (a + b * x) for x, y in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["mining", "training"])
    args = parser.parse_args()
    workloads = [w for w in ("mining", "training") if args.only in (None, w)]
    with tempfile.TemporaryDirectory(prefix="m3tune-bench-growth-") as workdir:
        os.environ["M3TUNE_CACHE"] = models_cache = f"{workdir}/cache"
        from m3tune.encoder.model import Encoder

        Encoder("local:tiny-xlmr")  # built and exported once, outside the timings
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; tiny local XLM-R; scales {SCALES}\n")
        for workload in workloads:
            rows = []
            for scale in SCALES:
                root_uri = f"{workdir}/runs/{workload}-{scale}"
                size = prepare_mining(root_uri, scale, workdir) if workload == "mining" else \
                    prepare_training(root_uri, scale)
                run_cache = f"{workdir}/cache-{workload}-{scale}"  # an empty embeddings cache, the shared models
                os.makedirs(run_cache)
                for sub in ("models", "onnx"):
                    if os.path.isdir(f"{models_cache}/{sub}"):
                        os.symlink(f"{models_cache}/{sub}", f"{run_cache}/{sub}")
                out = subprocess.run([sys.executable, __file__, "--one", workload, root_uri, f"{workdir}/work-{scale}"],
                                     env={**os.environ, "M3TUNE_CACHE": run_cache}, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{workload} at {scale}x failed: {out.stderr[-3000:]}")
                rows.append({"scale": scale, **size, **json.loads(out.stdout.strip().splitlines()[-1])})
                print(f"  {workload} {scale}x: {rows[-1]}", file=sys.stderr, flush=True)
            print(json.dumps(rows))
            report(workload, rows)


def report(workload: str, rows: list[dict]) -> None:
    size = "passages" if workload == "mining" else "examples"
    a, b, residuals = fit([(r[size], r["seconds"]) for r in rows])
    ma, mb, _ = fit([(r[size], r["peak_rss_mb"]) for r in rows])
    if workload == "mining":
        print("| scale | passages | queries | examples mined | wall s | index s | mine s | peak RSS MB | "
              "RSS after imports MB | wall / passage ms |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['scale']}x | {r['passages']:,} | {r['queries']:,} | {r['examples']:,} | {r['seconds']:.1f} | "
                  f"{r['index_seconds']:.1f} | {r['mine_seconds']:.1f} | {r['peak_rss_mb']:,.0f} | "
                  f"{r['rss_after_imports_mb']:,.0f} | {1000 * r['seconds'] / r['passages']:.2f} |")
    else:
        print("| scale | examples | validation | steps | wall s | setup s | steps s | validation + save s | "
              "peak RSS MB | RSS after imports MB | wall / example ms |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['scale']}x | {r['examples']:,} | {r['validation']:,} | {r['steps']} | {r['seconds']:.1f} | "
                  f"{r['setup_seconds']:.1f} | {r['step_seconds']:.1f} | {r['validation_and_save_seconds']:.1f} | "
                  f"{r['peak_rss_mb']:,.0f} | {r['rss_after_imports_mb']:,.0f} | "
                  f"{1000 * r['seconds'] / r['examples']:.2f} |")
    print(f"\nline fit: wall = {a:.1f} s + {1000 * b:.2f} ms x {size} (residuals "
          f"{', '.join('%+.1f' % e for e in residuals)} s); peak RSS = {ma:,.0f} MB + {1024 * mb:.1f} KB x {size}\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        result = mine(sys.argv[3]) if sys.argv[2] == "mining" else train(sys.argv[3], sys.argv[4])
        print(json.dumps({**result, "peak_rss_mb": rss_mb()}))
    else:
        main()
