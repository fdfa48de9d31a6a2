"""Speed ratios anyone can rerun: m3tune against the strongest configuration of its peer, measured one way.

    make bench-ratios                                   # every row (not yet timed)
    .venv/bin/python benchmarks/ratios.py --quick       # smaller workloads, the same pairs: 57 minutes on one
                                                        # core with 1 thread (2026-12-07); 2 cores not yet timed
    .venv/bin/python benchmarks/ratios.py --rows encode-onnx,train --pairs 7 --cores 0,1 --threads 2

How every row is measured:
- each contender runs in a fresh process (imports and model loading are outside its clock, on both sides);
- contenders alternate in pairs, AB then BA, at least 5 pairs (a drift in the machine's load falls on both);
- every process is pinned to the same cores (`taskset -c CORES`) with the same thread counts (torch's
  OMP/MKL threads, ONNX Runtime's intra-op threads, the Rust tokenizers' RAYON threads);
- ONNX Runtime's spin-waiting is off on both sides (m3tune's default; the peer's SessionOptions);
- each row gives the medians of both sides, the median and interquartile range of the per-pair ratios, the
  peak memory (VmHWM) of each side, and the machine's 1-minute load average before and after the row.
The ratios are m3tune / peer in throughput for encoding and training (higher is better) and in wall time for
mining (lower is better). The result goes to benchmarks/results/ratios-DATE.json.

The peers, each the strongest configuration it offers for the same work:
- encoding: sentence-transformers' `encode` on PyTorch, and with `backend="onnx"` on its O3-optimized ONNX
  export (`export_optimized_onnx_model`). sentence-transformers 6 cannot load ONNX today (its `onnx` extra
  needs optimum-onnx 0.1.0, which needs transformers < 4.58, while 6.x needs transformers >= 5), so the ONNX
  peer runs in its own virtualenv, `.venv-peer` (sentence-transformers 5.7.0, transformers 4.57.6, the same
  onnxruntime 1.32.0 and torch 2.13.0; `constraints/peer-onnx.txt`), made on first use;
- training: SentenceTransformerTrainer with MultipleNegativesRankingLoss in MatryoshkaLoss, the recipe's
  frozen word embeddings and batch, no-duplicates sampler (`m3tune.bench.train`). The quality recipe does not
  use GradCache, so CachedMultipleNegativesRankingLoss is not the peer's form here (`--cached-peer N` adds it);
- mining: `mine_hard_negatives` on the ONNX O3 model, batch 64 (its fastest documented settings without
  faiss: with under a thousand passages, its exact search is not where the time goes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER_VENV = REPO / ".venv-peer"
MODEL = "local:e5-small"
ROWS = ("encode-onnx", "encode-torch", "train", "mining")
# workload sizes: (passages to encode, training steps, passages per source for mining)
SIZES = {"full": (1000, 20, 300), "quick": (500, 5, 150)}
BATCH, MAX_LENGTH = 32, 128


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile), linear interpolation between the sorted values."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


# ---- the child processes: each measures one contender once and prints one RESULT line ------------------------

def _st_onnx_session_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _st_model(side: str, folder: str, threads: int, max_length: int = MAX_LENGTH):
    """The peer's model: its O3 ONNX export (made by `setup`) or PyTorch on the model folder, mean pooling."""
    from sentence_transformers import SentenceTransformer, models

    if side == "st-onnx":
        model = SentenceTransformer(folder, device="cpu", backend="onnx",
                                    model_kwargs={"file_name": "onnx/model_O3.onnx", "provider": "CPUExecutionProvider",
                                                  "session_options": _st_onnx_session_options(threads)})
    else:
        transformer = models.Transformer(folder, max_seq_length=max_length)
        model = SentenceTransformer(modules=[transformer, models.Pooling(transformer.get_word_embedding_dimension(),
                                                                         "mean")], device="cpu")
    model.max_seq_length = max_length
    return model


def child_encode(side: str, spec: dict) -> dict:
    import numpy as np

    texts = json.loads(Path(spec["texts"]).read_text(encoding="utf-8"))
    if side == "m3tune":
        import torch  # noqa: F401  imported before the clock, as the peer's are

        from m3tune.encoder.model import Encoder

        encoder = Encoder(MODEL, max_length=MAX_LENGTH, batch_size=BATCH)
        assert encoder.runtime == "onnx", encoder.runtime
        t0 = time.perf_counter()
        vectors = encoder.encode(texts)  # the profile puts e5's "passage: " before each text
    else:
        model = _st_model(side, spec["st_folder"], spec["threads"])
        prompted = ["passage: " + t for t in texts]
        t0 = time.perf_counter()
        vectors = model.encode(prompted, batch_size=BATCH, convert_to_numpy=True, normalize_embeddings=True)
    seconds = time.perf_counter() - t0
    np.save(spec["out"], vectors)
    return {"seconds": seconds, "rate": len(texts) / seconds, "unit": "passages/s"}


def child_train(side: str, spec: dict) -> dict:
    from m3tune.bench import train as bench

    args = dict(model=MODEL, batch=BATCH, steps=spec["steps"], dims=[384, 256, 128], temperature=0.02,
                max_length=MAX_LENGTH, negatives=1, workdir=spec["out"],
                options={"freeze_embeddings": True, **({"cached": spec["cached"]} if side == "st-cached" else {})})
    result = (bench.run_m3tune if side == "m3tune" else bench.run_sentence_transformers)(spec["root"], **args)
    # the training steps alone, tokenizing included, on both sides (m3tune's validation and both sides' saving
    # are outside it); the whole run's rate is kept beside it
    return {"seconds": BATCH * spec["steps"] / result["steps_only_examples_per_s"],
            "rate": result["steps_only_examples_per_s"], "unit": "examples/s",
            "whole_run_rate": result["examples_per_s"], "steady_rate": result["steady_examples_per_s"]}


def child_mine(side: str, spec: dict) -> dict:
    import bench_mining  # beside this script (sys.path[0]); it imports only the standard library at the top

    if side == "m3tune":
        result = bench_mining.ours(spec["root"], "exact", "e5-small")
        return {"seconds": result["seconds"], "rate": result["seconds"], "unit": "s",
                "rows": result["rows"], "negatives": result["negatives"]}
    data = json.loads(Path(spec["texts"]).read_text(encoding="utf-8"))
    t0 = time.perf_counter()  # the peer's model load is inside its clock, as m3tune's index step loads its own
    model = _st_model(side, spec["st_folder"], spec["threads"], max_length=bench_mining.MAX_LENGTH)
    rows, negatives = bench_mining.mine_with_peer(data, model)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rate": seconds, "unit": "s", "rows": rows, "negatives": negatives}


def child_setup_st_onnx(spec: dict) -> dict:
    """Export the model to ONNX with the peer's own tools and optimize it at O3 (once, outside every clock)."""
    from sentence_transformers import SentenceTransformer, export_optimized_onnx_model, models

    folder = spec["st_folder"]
    transformer = models.Transformer(spec["model_folder"], max_seq_length=MAX_LENGTH, backend="onnx")
    model = SentenceTransformer(modules=[transformer, models.Pooling(transformer.get_word_embedding_dimension(),
                                                                     "mean")], device="cpu", backend="onnx")
    model.save(folder)
    export_optimized_onnx_model(model, "O3", folder)
    return {"files": sorted(os.listdir(Path(folder) / "onnx"))}


def child(kind: str, side: str, spec: dict) -> None:
    if "cache" in spec:  # this run's own embeddings cache (set before m3tune is imported)
        os.environ["M3TUNE_CACHE"] = spec["cache"]
    from bench_mining import peak_rss_mb  # VmHWM: this process's own peak, not its parent's

    result = {"encode": child_encode, "train": child_train, "mine": child_mine}[kind](side, spec) \
        if kind != "setup" else child_setup_st_onnx(spec)
    result["peak_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


# ---- the parent: workloads, the alternating pairs, the table --------------------------------------------------

def ensure_peer_venv(log) -> Path:
    """.venv-peer with sentence-transformers' ONNX backend (see the module docstring), made once."""
    python = PEER_VENV / "bin" / "python"
    if python.exists():
        return python
    log(f"making {PEER_VENV} (sentence-transformers[onnx] with transformers 4.57, a few minutes, once)")
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints/peer-onnx.txt"),
                    "torch", "sentence-transformers[onnx]", "datasets"], check=True)
    return python


class Runner:
    def __init__(self, cores: str, threads: int, log):
        self.cores, self.threads, self.log = cores, threads, log
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                    "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true",
                    "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}

    def run(self, python: Path | str, kind: str, side: str, spec: dict) -> dict:
        spec = {**spec, "threads": self.threads}
        command = ["taskset", "-c", self.cores, str(python), __file__, "--child", kind, side, json.dumps(spec)]
        out = subprocess.run(command, capture_output=True, text=True, env=self.env)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if out.returncode or line is None:
            raise SystemExit(f"{kind} {side} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        return json.loads(line[7:])


def alternate(runner: Runner, pairs: int, ours: tuple, peer: tuple, label: str) -> dict:
    """PAIRS pairs of fresh runs, AB then BA; OURS and PEER are (python, kind, side, spec_for(i, name))."""
    load_before = os.getloadavg()[0]
    runs = {"m3tune": [], "peer": []}
    for i in range(pairs):
        order = (("m3tune", ours), ("peer", peer)) if i % 2 == 0 else (("peer", peer), ("m3tune", ours))
        for name, (python, kind, side, spec_for) in order:
            result = runner.run(python, kind, side, spec_for(i, name))
            runs[name].append(result)
            runner.log(f"  {label} pair {i + 1}/{pairs} {name}: {result['seconds']:.1f} s, {result['rate']:.2f} "
                       f"{result['unit']}, peak {result['peak_mb']:,.0f} MB, load {os.getloadavg()[0]:.2f}")
    ratios = [a["rate"] / b["rate"] for a, b in zip(runs["m3tune"], runs["peer"])]
    q1, median, q3 = quartiles(ratios)
    return {"row": label, "unit": runs["m3tune"][0]["unit"], "pairs": pairs,
            "m3tune_median": statistics.median(r["rate"] for r in runs["m3tune"]),
            "peer_median": statistics.median(r["rate"] for r in runs["peer"]),
            "ratio_median": median, "ratio_q1": q1, "ratio_q3": q3, "ratios": ratios,
            "m3tune_peak_mb": statistics.median(r["peak_mb"] for r in runs["m3tune"]),
            "peer_peak_mb": statistics.median(r["peak_mb"] for r in runs["peer"]),
            "load_before": load_before, "load_after": os.getloadavg()[0], "runs": runs}


def encode_texts(n: int) -> list[str]:
    """N passages, a seeded sample of the corpus in proportion, Arabic marks stripped (both sides tokenize the
    same sequences; m3tune's profile would strip them again, a no-op it pays for)."""
    import random

    from m3tune.arabic import strip_marks
    from m3tune.corpus.packaged import hadith_passages, quran_passages

    passages = [*quran_passages(), *hadith_passages("bukhari"), *hadith_passages("muslim")]
    return [strip_marks(p.text) for p in random.Random(3).sample(passages, n)]


def cosine_floor(ours: str, peer: str) -> float:
    import numpy as np

    return float((np.load(ours) * np.load(peer)).sum(1).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller workloads ({} passages, {} steps, {} "
                        "passages a source for mining), the same number of pairs".format(*SIZES["quick"]))
    parser.add_argument("--pairs", type=int, default=5, help="AB/BA pairs per row (at least 5)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--cores", default="0,1", help="taskset core list every process is pinned to")
    parser.add_argument("--threads", type=int, default=2, help="threads of every contender (torch, ONNX Runtime, "
                        "tokenizers)")
    parser.add_argument("--cached-peer", type=int, metavar="MINI_BATCH", help="train row: the peer with "
                        "CachedMultipleNegativesRankingLoss at this mini-batch instead (recipes that use GradCache)")
    parser.add_argument("--passages", type=int, help="encode rows: this many passages (overrides the size)")
    parser.add_argument("--steps", type=int, help="train row: this many steps (overrides the size)")
    parser.add_argument("--mine-limit", type=int, help="mining row: passages a source (overrides the size)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder of ratios-DATE.json")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        parser.error(f"--rows: unknown {unknown or 'none given'}; expected some of {', '.join(ROWS)}")
    if args.pairs < 5:
        parser.error("--pairs: at least 5 (a median and quartiles of fewer ratios say little)")
    if args.threads < 1:
        parser.error("--threads: at least 1")
    if args.cached_peer is not None and args.cached_peer < 1:
        parser.error("--cached-peer: a mini-batch of at least 1")
    if shutil.which("taskset") is None:
        parser.error("taskset (util-linux) is needed to pin every contender to the same cores")
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    n_texts, steps, mine_limit = SIZES["quick" if args.quick else "full"]
    n_texts, steps, mine_limit = args.passages or n_texts, args.steps or steps, args.mine_limit or mine_limit
    if min(n_texts, steps, mine_limit) < 1:
        parser.error("--passages, --steps and --mine-limit: at least 1")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    peer_python = ensure_peer_venv(log) if {"encode-onnx", "mining"} & set(rows) else None
    results = []
    with tempfile.TemporaryDirectory(prefix="m3tune-ratios-") as tmp:
        workdir = Path(tmp)
        # one model cache for every process (the model converted and exported once, outside the clocks)
        cache = workdir / "cache"
        runner = Runner(args.cores, args.threads, log)
        runner.env["M3TUNE_CACHE"] = str(cache)
        os.environ["M3TUNE_CACHE"] = str(cache)
        from m3tune.encoder.model import Encoder
        from m3tune.encoder.profiles import resolve

        if set(rows) - {"train"}:  # the rows that encode with ONNX Runtime
            Encoder(MODEL)  # m3tune's ONNX export, once, outside the clocks
        st_folder, st_torch = str(workdir / "st-onnx"), resolve(MODEL)
        if peer_python:
            files = runner.run(peer_python, "setup", "st-onnx", {"st_folder": st_folder, "model_folder": st_torch})
            log(f"the peer's ONNX export: {files['files']}")
        if {"encode-onnx", "encode-torch"} & set(rows):
            texts = workdir / "texts.json"
            texts.write_text(json.dumps(encode_texts(n_texts), ensure_ascii=False), encoding="utf-8")
            for row, python, side in (("encode-onnx", peer_python, "st-onnx"),
                                      ("encode-torch", sys.executable, "st-torch")):
                if row not in rows:
                    continue
                folder = st_torch if side == "st-torch" else st_folder

                def vectors(i, name, row=row, folder=folder):
                    return {"texts": str(texts), "st_folder": folder, "out": str(workdir / f"{row}-{name}-{i}.npy")}

                result = alternate(runner, args.pairs, (sys.executable, "encode", "m3tune", vectors),
                                   (python, "encode", side, vectors), row)
                result["min_cosine_to_peer"] = min(cosine_floor(str(workdir / f"{row}-m3tune-{i}.npy"),
                                                                str(workdir / f"{row}-peer-{i}.npy"))
                                                   for i in range(args.pairs))
                result["work"] = f"{n_texts} passages, max_length {MAX_LENGTH}, batch {BATCH}"
                results.append(result)
        if "train" in rows:
            from m3tune.bench.train import prepare

            root = str(workdir / "train-root")
            prepare(root, n_train=max(1200, BATCH * steps * 2), n_val=32)
            side = "st-cached" if args.cached_peer else "st"

            def train_spec(i, name):
                # m3tune's checkpoints from the run before would make this one resume (nothing left to train)
                shutil.rmtree(Path(root) / "train", ignore_errors=True)
                return {"root": root, "steps": steps, "cached": args.cached_peer,
                        "out": str(workdir / f"train-{name}-{i}")}

            result = alternate(runner, args.pairs, (sys.executable, "train", "m3tune", train_spec),
                               (sys.executable, "train", side, train_spec), "train")
            result["work"] = (f"{steps} steps of {BATCH} (1 hard negative), max_length {MAX_LENGTH}, dims 384/256/128, "
                              f"word embeddings frozen; peer {'CachedMNRL' if args.cached_peer else 'MNRL'} + "
                              "MatryoshkaLoss")
            results.append(result)
        if "mining" in rows:
            import bench_mining  # beside this script (sys.path[0])

            root_uri = bench_mining.prepare(str(workdir / "mine"), mine_limit)
            data = workdir / "mine-texts.json"
            data.write_text(json.dumps(bench_mining.peer_inputs(root_uri, MODEL), ensure_ascii=False),
                            encoding="utf-8")

            def mine_spec(i, name):
                # a fresh embeddings cache for each run (everyone encodes everything), the models shared
                run_cache = workdir / f"cache-{name}-{i}"
                run_cache.mkdir()
                for sub in ("models", "onnx"):
                    if (cache / sub).is_dir():
                        (run_cache / sub).symlink_to(cache / sub)
                return {"root": root_uri, "texts": str(data), "st_folder": st_folder, "cache": str(run_cache)}

            result = alternate(runner, args.pairs, (sys.executable, "mine", "m3tune", mine_spec),
                               (peer_python, "mine", "st-onnx", mine_spec), "mining")
            result["work"] = f"ingest limit {mine_limit} a source, ranks [10, 200), margin 0.05, 7 negatives"
            results.append(result)
    finished = time.strftime("%Y-%m-%d %H:%M:%S")
    report = {"started": started, "finished": finished, "quick": args.quick, "cores": args.cores,
              "threads": args.threads, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "rows": results}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"ratios-{started[:10]}.json"
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    tmp_out.replace(out)
    print(table(report))
    print(f"\nwritten: {out}")


def table(report: dict) -> str:
    lines = ["| row | m3tune (median) | peer (median) | ratio m3tune/peer (median) | IQR of the pair ratios | "
             "peak MB m3tune / peer | load before / after |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['row']} ({r['unit']}) | {r['m3tune_median']:.2f} | {r['peer_median']:.2f} | "
                     f"{r['ratio_median']:.2f}x | {r['ratio_q1']:.2f}-{r['ratio_q3']:.2f} | "
                     f"{r['m3tune_peak_mb']:,.0f} / {r['peer_peak_mb']:,.0f} | "
                     f"{r['load_before']:.2f} / {r['load_after']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    else:
        main()
