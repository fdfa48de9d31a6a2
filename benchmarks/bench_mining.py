"""Benchmark: hard-negative mining, m3tune (exact and Qdrant local backends) against sentence-transformers'
`mine_hard_negatives`, on the same model, corpus, queries, rank range and relative margin.

Same work on both sides: encode the corpus and the queries (normalised, max 256 tokens), take the candidates
at ranks [10, 200), drop those scored above 0.95 x the positive (m3tune's threshold = ST's relative_margin
0.05), keep 7 per query (m3tune: its pool of hard / semi-hard / random negatives). m3tune also applies its
Jaccard rule. Both sides encode the same token sequences: the peer is given each text as m3tune's profile
prepares it (Arabic marks stripped, e5's `query: ` / `passage: ` prompt put before it). Each contender runs
in a fresh process with an empty embeddings cache, so wall time and peak memory (max RSS) are its own.

    .venv/bin/python benchmarks/bench_mining.py                     # tiny local XLM-R, the whole corpus
    .venv/bin/python benchmarks/bench_mining.py --model e5-small    # e5-small, 300 passages a source
    .venv/bin/python benchmarks/bench_mining.py --model e5-small --int8    # and m3tune with an int8 encoder

`--model e5-small` mines with multilingual-e5-small (mean pooling) on a deterministic subset (ingest's
`limit 300`: the first 300 passages of each packaged source, 900 in all, and the queries generated from
them): the whole corpus would take over 15 minutes a run on 2 shared CPU cores. Every m3tune rule is on there
(the consistency rule too, with its default judge, the index's encoder); the tiny row keeps its earlier
settings (consistency off: an untrained encoder would judge every query inconsistent). The ONNX export of
the model (once per model, cached) is made before the timings, in the shared model cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

MAX_LENGTH = 256
REPEATS = 3
# model name, pooling, ingest limit per source, whether m3tune's consistency rule is on, repeats
MODELS = {"tiny": ("local:tiny-xlmr", "cls", None, False, REPEATS),
          "e5-small": ("local:e5-small", "mean", 300, True, 2)}


def peak_rss_mb() -> float:
    """This process's peak RSS since it started (VmHWM): getrusage's ru_maxrss would also carry the RSS of the
    parent it was forked from (Linux keeps the pre-exec high-water mark), here a process holding the corpus."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def prepare(workdir: str, limit: int | None) -> str:
    """A run with the corpus (at most LIMIT passages a source) and the offline demo's queries; returns its root."""
    from m3tune.corpus.ingest import IngestConfig
    from m3tune.executor import run_step
    from m3tune.runroot import open_root

    root = open_root(f"{workdir}/runs/bench")
    run_step(root, "ingest", IngestConfig(limit=limit))
    for step in ("generate-queries", "generate-conceptual", "generate-exact"):  # mine-negatives needs all three
        run_step(root, step)
    return root.uri


def peer_inputs(root_uri: str, model: str) -> dict[str, list[str]]:
    """The peer's anchors, positives and corpus, as m3tune's profile of MODEL gives them to the model (marks
    stripped, prompt first): both sides encode the same tokens."""
    from m3tune.encoder.profiles import profile_of
    from m3tune.jsonl import read_records
    from m3tune.records import Passage, Query
    from m3tune.runroot import open_root

    root = open_root(root_uri)
    passages = list(read_records(root.child("ingest"), "passages.jsonl", Passage))
    by_id = {p.id: p for p in passages}
    queries = [q for step in ("generate-queries", "generate-conceptual")
               for q in read_records(root.child(step), "queries.jsonl", Query)]
    profile = profile_of(model)
    return {"anchors": [profile.prepare(q.query, queries=True) for q in queries],
            "positives": [profile.prepare(by_id[q.positive_ids[0]].text, queries=False) for q in queries],
            "corpus": [profile.prepare(p.text, queries=False) for p in passages]}


def mine_with_peer(inputs: dict[str, list[str]], model) -> tuple[int, int]:
    """`mine_hard_negatives` over INPUTS (peer_inputs) with MODEL: (rows, negatives). Imports only the peer's
    packages, so benchmarks/ratios.py runs it in the peer's own virtualenv too."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    mined = mine_hard_negatives(Dataset.from_dict({"anchor": inputs["anchors"], "positive": inputs["positives"]}),
                                model, corpus=inputs["corpus"], range_min=10, range_max=200, relative_margin=0.05,
                                num_negatives=7, sampling_strategy="top", batch_size=64, output_format="n-tuple",
                                verbose=False)
    return len(mined), sum(1 for row in mined for k, v in row.items() if k.startswith("negative") and v)


def peer(root_uri: str, model_key: str) -> dict:
    from sentence_transformers import SentenceTransformer, models

    from m3tune.encoder.profiles import resolve

    name, pooling = MODELS[model_key][:2]
    inputs = peer_inputs(root_uri, name)
    t0, c0 = time.perf_counter(), time.process_time()
    transformer = models.Transformer(resolve(name), max_seq_length=MAX_LENGTH)
    model = SentenceTransformer(modules=[transformer, models.Pooling(transformer.get_word_embedding_dimension(), pooling),
                                         models.Normalize()], device="cpu")
    rows, negatives = mine_with_peer(inputs, model)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_s": cpu, "rows": rows, "negatives": negatives}


def ours(root_uri: str, which: str, model_key: str) -> dict:
    import torch  # noqa: F401  imported before the clock starts, as the peer's are
    import transformers  # noqa: F401

    from m3tune.executor import run_step
    from m3tune.index.step import EncoderSettings, IndexConfig
    from m3tune.mining.mine import MineConfig
    from m3tune.runroot import open_root

    root = open_root(root_uri)
    t0, c0 = time.perf_counter(), time.process_time()
    name, _, _, consistency, _ = MODELS[model_key]
    # exact-int8: the same, the encoder's matrix products in int8 (`dtype: int8`: another computation, stated)
    backend, dtype = ("exact", "int8") if which == "exact-int8" else (which, "auto")
    run_step(root, "index", IndexConfig(encoder=EncoderSettings(model=name, max_length=MAX_LENGTH, batch_size=64,
                                                                dtype=dtype), backend=backend), force=True)
    manifest, _ = run_step(root, "mine-negatives", MineConfig() if consistency else MineConfig(consistency_k=None),
                           force=True)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    c = manifest.counts
    return {"seconds": seconds, "cpu_s": cpu, "rows": c["examples"],
            "negatives": c["hard"] + c["semi_hard"] + c["random"]}


def one(which: str, root_uri: str, model_key: str) -> None:
    result = peer(root_uri, model_key) if which == "sentence-transformers" else ours(root_uri, which, model_key)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def main(model_key: str, int8: bool) -> None:
    name, pooling, limit, consistency, repeats = MODELS[model_key]
    with tempfile.TemporaryDirectory() as workdir:
        # the models (converted, exported) in one cache shared by every run; the embeddings in a fresh one each
        models_cache = f"{workdir}/cache"
        os.environ["M3TUNE_CACHE"] = models_cache
        root_uri = prepare(workdir, limit)
        from m3tune.encoder.model import Encoder

        Encoder(name)  # built / converted and exported once, outside the timings
        if int8:
            Encoder(name, dtype="int8")  # quantized once, outside the timings
        from m3tune.jsonl import read_records
        from m3tune.records import Passage
        from m3tune.runroot import open_root

        n = sum(1 for _ in read_records(open_root(root_uri).child("ingest"), "passages.jsonl", Passage))
        print(f"python {sys.version.split()[0]}, 2 cores; corpus {n:,} passages; {name}, {pooling}, "
              f"max_length {MAX_LENGTH}; m3tune consistency rule {'on' if consistency else 'off'}\n")
        # CPU s: the process's CPU time (all its threads) over the timed part of the best run; the load: the
        # 1-minute load average as each run started (the machine is shared)
        print("| miner | wall s (best of runs) | all runs s | CPU s (best run) | peak RSS MB | examples | negatives |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        # The peer and the exact backend alternate, REPEATS times each (the machine is shared and noisy: the best
        # of each is the figure, all runs are shown); Qdrant local mode, much slower, runs once (tiny only).
        runs: dict[str, list[dict]] = {"sentence-transformers": [], "exact": [], "exact-int8": [], "qdrant": []}
        contenders = ("sentence-transformers", "exact") + (("exact-int8",) if int8 else ())
        order = [w for i in range(repeats) for w in (contenders if i % 2 == 0 else contenders[::-1])]
        order += ["qdrant"] if model_key == "tiny" else []
        for i, which in enumerate(order):
            # a fresh embeddings cache for each (everyone encodes everything), the model from the shared one
            run_cache = f"{workdir}/cache-{which}-{i}"
            os.makedirs(run_cache)
            os.symlink(f"{models_cache}/models", f"{run_cache}/models")
            load = os.getloadavg()[0]
            if os.path.isdir(f"{models_cache}/onnx"):
                os.symlink(f"{models_cache}/onnx", f"{run_cache}/onnx")
            out = subprocess.run([sys.executable, __file__, "--one", which, root_uri, model_key],
                                 env={**os.environ, "M3TUNE_CACHE": run_cache}, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{which} failed: {out.stderr[-2000:]}")
            runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
            if which.startswith("exact"):  # kept for the fp32 / int8 comparison below
                shutil.copy(f"{root_uri.removeprefix('file://')}/mine-negatives/examples.jsonl",
                            f"{workdir}/examples-{which}.jsonl")
            print(f"  {which}: {runs[which][-1]['seconds']:.1f} s, CPU {runs[which][-1]['cpu_s']:.1f} s, load "
                  f"{load:.1f} at start", file=sys.stderr, flush=True)
        for which, results in runs.items():
            if not results:
                continue
            best = min(results, key=lambda r: r["seconds"])
            label = {"sentence-transformers": "sentence-transformers mine_hard_negatives (peer)",
                     "exact": "m3tune index + mine-negatives, exact",
                     "exact-int8": "m3tune index + mine-negatives, exact, encoder dtype int8",
                     "qdrant": "m3tune index + mine-negatives, Qdrant local"}[which]
            print(f"| {label} | {best['seconds']:.1f} | {', '.join('%.1f' % r['seconds'] for r in results)} | "
                  f"{best['cpu_s']:.1f} | {max(r['peak_rss_mb'] for r in results):,.0f} | {best['rows']:,} | {best['negatives']:,} |")
        if int8:
            print("\n" + agreement(f"{workdir}/examples-exact.jsonl", f"{workdir}/examples-exact-int8.jsonl"))


def agreement(fp32: str, int8: str) -> str:
    """How far int8 mining's output is from fp32's: the queries both keep, and per query the overlap of the
    negatives (Jaccard of the passage ids) and of the positives' scores."""
    def read(path):
        with open(path, encoding="utf-8") as f:
            return {e["query_id"]: e for e in map(json.loads, f)}

    a, b = read(fp32), read(int8)
    both = a.keys() & b.keys()
    jaccard = [len(set(a[q]["neg_ids"]) & set(b[q]["neg_ids"]))
               / max(1, len(set(a[q]["neg_ids"]) | set(b[q]["neg_ids"]))) for q in both]
    hard = [len({n for n, k in zip(a[q]["neg_ids"], a[q]["neg_kinds"]) if k == "hard"}
                & {n for n, k in zip(b[q]["neg_ids"], b[q]["neg_kinds"]) if k == "hard"}) for q in both]
    hard_a = sum(k == "hard" for q in both for k in a[q]["neg_kinds"])
    gap = [abs(x - y) for q in both for x, y in zip(a[q]["pos_scores"], b[q]["pos_scores"])]
    return (f"int8 against fp32: examples {len(b):,} vs {len(a):,} ({len(both):,} queries in both); negatives per "
            f"query, Jaccard of the ids: mean {sum(jaccard) / len(jaccard):.3f}; hard negatives also chosen by int8: "
            f"{sum(hard) / max(1, hard_a):.1%}; positive scores: mean |difference| {sum(gap) / len(gap):.4f}, "
            f"max {max(gap):.4f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        import argparse

        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
        parser.add_argument("--int8", action="store_true", help="a third contender: m3tune with the encoder's "
                            "matrix products in int8 (index dtype int8), and how its output differs from fp32's")
        args = parser.parse_args()
        main(args.model, args.int8)
