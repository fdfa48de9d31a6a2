"""Benchmark: the embedded vector index. Qdrant Edge (HNSW, and exact without a graph) against the exact
backend (matrix product + torch.topk) and qdrant-client's local mode, on the same vectors and queries.

Three data sets:
- e5: real 384-d geometry, the passage vectors of an e5-small index step (--e5-vectors; 9,811 passages of the
  quality benchmark's run), 1,000 of them held out as queries;
- real: the packaged corpus (21,176 passages) and the offline demo's queries (1,840), encoded with the tiny
  local XLM-RoBERTa (CLS, normalised, 256 tokens) through the index step;
- synthetic: 1,000,000 seeded, clustered 384-d unit vectors (2,000 centres of Zipf-like sizes, each point a
  centre plus noise of its own scale) and 1,000 queries drawn the same way: HNSW's realistic case, not
  uniform noise.

Each contender runs in a fresh process that loads the vectors, then times build (everything before the
first query: upload, graph) and search (top 200 of every query) through m3tune's own classes
(m3tune.index.search); recall@200 is against the exact top 200; peak memory is the process's max RSS, with
its RSS after loading the inputs beside it. Contenders alternate, REPEATS rounds on the real set (best time
shown, all runs listed), one round on the synthetic set. Local mode is not run at 1M: its upload alone is
about 25 s per 21k points in pure Python (docs/benchmarks.md, [3/7]). Nothing is written in a run root of
the user: everything lives in a temporary folder. Run:

    PYTHONPATH=src .venv/bin/python benchmarks/bench_index.py [--sizes real,e5,1m] [--repeats 3] \
        [--e5-vectors RUN/index/vectors.npy] [--contenders edge-hnsw] [--ef 600,1000,2000]

--ef sweeps HNSW's search-time ef over one graph: edge-hnsw gets a row per value, each with the same build.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

K = 200


def _defaults() -> tuple[int, int, int]:
    """The index step's HNSW defaults, read from IndexConfig so that the benchmark measures what ships."""
    from m3tune.index.step import IndexConfig

    fields = IndexConfig.model_fields
    return fields["hnsw_m"].default, fields["hnsw_ef_construct"].default, fields["hnsw_ef"].default


M, EF_CONSTRUCT, EF = _defaults()


def prepare_real(workdir: str) -> str:
    """vectors.npy / queries.npy of the real corpus under WORKDIR/real (tiny encoder); returns the folder."""
    from m3tune.encoder.cache import EmbeddingCache
    from m3tune.executor import run_step
    from m3tune.index.step import EncoderSettings, IndexConfig, cache_store
    from m3tune.mining.mine import load_queries
    from m3tune.runroot import open_root

    root = open_root(f"{workdir}/runs/bench")
    for step in ("ingest", "generate-queries", "generate-conceptual"):
        run_step(root, step)
    settings = EncoderSettings(model="local:tiny-xlmr", max_length=256, batch_size=64)
    run_step(root, "index", IndexConfig(encoder=settings, backend="exact"))
    model = settings.load()
    queries = EmbeddingCache(cache_store(None), model.fingerprint).encode(
        model, [q.query for q in load_queries(root)], queries=True)
    out = f"{workdir}/real"
    os.makedirs(out, exist_ok=True)
    np.save(f"{out}/vectors.npy", np.load(root.child("index").path / "vectors.npy"))
    np.save(f"{out}/queries.npy", queries)
    return out


def prepare_e5(workdir: str, vectors_npy: str, queries: int = 1_000, seed: int = 0) -> str:
    """Real 384-d geometry: an e5-small index step's passage vectors; QUERIES of them (seeded) are held out of
    the index and searched as queries (passage-to-passage: no query encoding needed)."""
    vectors = np.load(vectors_npy).astype(np.float32)
    held = np.zeros(len(vectors), dtype=bool)
    held[np.random.default_rng(seed).choice(len(vectors), queries, replace=False)] = True
    out = f"{workdir}/e5"
    os.makedirs(out, exist_ok=True)
    np.save(f"{out}/vectors.npy", vectors[~held])
    np.save(f"{out}/queries.npy", vectors[held])
    return out


def prepare_synthetic(workdir: str, n: int = 1_000_000, dim: int = 384, queries: int = 1_000,
                      centres: int = 2_000, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, centres + 1) ** 0.8  # Zipf-like cluster sizes
    weights /= weights.sum()
    spread = rng.uniform(0.5, 1.5, centres).astype(np.float32)  # each cluster its own tightness

    def draw(count: int) -> np.ndarray:
        which = rng.choice(centres, size=count, p=weights)
        v = c[which] + rng.standard_normal((count, dim)).astype(np.float32) * (spread[which, None] / np.sqrt(dim))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    out = f"{workdir}/synthetic"
    os.makedirs(out, exist_ok=True)
    vectors = np.lib.format.open_memmap(f"{out}/vectors.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, 100_000):
        vectors[start:start + 100_000] = draw(min(100_000, n - start))
    vectors.flush()
    del vectors
    np.save(f"{out}/queries.npy", draw(queries))
    return out


def truth(folder: str) -> None:
    """The exact top K rows of every query, for recall."""
    from m3tune.index.search import ExactIndex

    vectors, queries = np.load(f"{folder}/vectors.npy"), np.load(f"{folder}/queries.npy")
    hits = ExactIndex(vectors, [str(i) for i in range(len(vectors))]).search(queries, K)
    np.save(f"{folder}/truth.npy", np.array([[int(i) for _, i in row] for row in hits], dtype=np.int64))


def one(which: str, folder: str, scratch: str, efs: list[int]) -> list[dict]:
    """One contender's rows: one row, or for edge-hnsw a row per search ef over the same graph (ef is a
    search-time parameter: sweeping it needs no rebuild, so one 1M build answers every ef)."""
    from m3tune.index.search import EdgeIndex, ExactIndex, QdrantIndex

    vectors, queries = np.load(f"{folder}/vectors.npy"), np.load(f"{folder}/queries.npy")
    truth_rows = np.load(f"{folder}/truth.npy")  # read once: every ef row of a sweep is scored against it
    ids = [str(i) for i in range(len(vectors))]
    loaded_mb = _rss_now_mb()
    t0 = time.perf_counter()
    if which == "exact":
        index = ExactIndex(vectors, ids)
        t1 = time.perf_counter()
        hits = index.search(queries, K)
    elif which in ("edge-hnsw", "edge-exact"):
        index = EdgeIndex(f"{scratch}/edge")
        index.build(vectors, ids, graph=which == "edge-hnsw", m=M, ef_construct=EF_CONSTRUCT)
        t1 = time.perf_counter()
        if which == "edge-hnsw":
            rows = []
            for ef in efs:
                t2 = time.perf_counter()
                hits = index.search(queries, K, ids, exact=False, ef=ef)
                rows.append({**_scored(hits, truth_rows, t1 - t0, time.perf_counter() - t2, loaded_mb), "ef": ef})
            return rows
        hits = index.search(queries, K, ids, exact=True, ef=EF)
    else:
        index = QdrantIndex("bench", path=f"{scratch}/local")
        index.build(vectors, ids, ["bench"] * len(ids))
        t1 = time.perf_counter()
        hits = index.search(queries, K)
        index.close()
    return [_scored(hits, truth_rows, t1 - t0, time.perf_counter() - t1, loaded_mb)]


def _scored(hits, exact: np.ndarray, build_s: float, search_s: float, loaded_mb: float) -> dict:
    recall = float(np.mean([len({int(i) for _, i in row} & set(gold.tolist())) / K for row, gold in zip(hits, exact)]))
    return {"build_s": build_s, "search_s": search_s, "recall": recall, "loaded_mb": loaded_mb,
            "peak_mb": _rss_now_mb("VmHWM:")}


def _rss_now_mb(field: str = "VmRSS:") -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent (here the process that
    # loaded the encoder), while VmHWM belongs to this process's own memory
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="real,1m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contenders", default=None, help="a comma-separated subset of exact, edge-hnsw, "
                        "edge-exact, local (default: all that run at each size), e.g. to add one row")
    parser.add_argument("--ef", default=str(EF), help="HNSW search ef, comma-separated to sweep several over "
                        f"one build (default {EF}, the index step's)")
    parser.add_argument("--e5-vectors", default=None, help="vectors.npy of an e5-small index step (384-d), for "
                        "--sizes e5")
    args = parser.parse_args()
    if not all(e.strip().isdigit() and int(e) > 0 for e in args.ef.split(",")):
        parser.error(f"--ef {args.ef!r}: expected positive integers separated by commas, e.g. 600,1500")
    import qdrant_client
    import qdrant_edge  # noqa: F401
    from importlib.metadata import version

    print(f"python {sys.version.split()[0]}, qdrant-edge-py {version('qdrant-edge-py')}, qdrant-client "
          f"{version('qdrant-client')}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"HNSW m {M}, ef_construct {EF_CONSTRUCT}, search ef {args.ef}; top {K}\n")
    del qdrant_client
    print("| data | index | build s | search s | build + search s (all runs) | recall@200 | RSS after load MB | peak RSS MB |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "M3TUNE_CACHE": f"{workdir}/cache"}
        os.environ.update(env)
        for size in args.sizes.split(","):
            if size == "real":
                folder, repeats, order = prepare_real(workdir), args.repeats, ["exact", "edge-hnsw", "edge-exact", "local"]
            elif size == "e5":
                folder, repeats, order = prepare_e5(workdir, args.e5_vectors), args.repeats, \
                    ["exact", "edge-hnsw", "edge-exact", "local"]
            else:
                folder, repeats, order = prepare_synthetic(workdir), 1, ["exact", "edge-hnsw", "edge-exact"]
            if args.contenders:
                order = [w for w in order if w in args.contenders.split(",")]
            subprocess.run([sys.executable, __file__, "--truth", folder], env=env, check=True)
            n, q = len(np.load(f"{folder}/vectors.npy", mmap_mode="r")), len(np.load(f"{folder}/queries.npy"))
            runs: dict[str, list[dict]] = {}
            for r in range(repeats):
                for which in order if r % 2 == 0 else order[::-1]:
                    if which == "local" and r:  # local mode, far slower, once
                        continue
                    scratch = tempfile.mkdtemp(dir=workdir)
                    out = subprocess.run([sys.executable, __file__, "--one", which, folder, scratch, args.ef],
                                         env=env, capture_output=True, text=True)
                    if out.returncode:
                        sys.exit(f"{which} on {size} failed:\n{out.stderr[-2000:]}")
                    for row in json.loads(out.stdout.strip().splitlines()[-1]):
                        name = f"{which} ef {row['ef']}" if "ef" in row else which
                        runs.setdefault(name, []).append(row)
                    subprocess.run(["rm", "-rf", scratch], check=True)
            for which, results in runs.items():
                best = min(results, key=lambda x: x["build_s"] + x["search_s"])
                print(f"| {n:,} x {q:,} | {which} | {best['build_s']:.1f} | {best['search_s']:.1f} | "
                      f"{', '.join('%.1f' % (x['build_s'] + x['search_s']) for x in results)} | "
                      f"{min(x['recall'] for x in results):.4f} | {best['loaded_mb']:,.0f} | "
                      f"{max(x['peak_mb'] for x in results):,.0f} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], sys.argv[3], sys.argv[4], [int(e) for e in sys.argv[5].split(",")])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--truth":
        truth(sys.argv[2])
    else:
        main()
