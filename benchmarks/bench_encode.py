"""Benchmark: encoding passages with e5-small, m3tune's Encoder against sentence-transformers' `encode`.

The same 1,000 passages (a seeded sample of the corpus, Quran and hadith in
proportion), the same model (`local:e5-small`, mean pooling, `passage: `
prompt, normalised), the same 128-token truncation and batch size 32 on both
sides. Each contender runs in a fresh process, alternating, REPEATS times
(the vocalized workload once); the best run is the figure and all runs are
shown (the machine is shared).
m3tune runs twice: its default on CPU (ONNX Runtime, the model exported once
per weights and cached: the export is done before the timings and its time
printed) and `runtime="torch"` (the same Encoder on PyTorch). Each run saves
its vectors; the table gives the lowest cosine of each m3tune vector to the
peer's vector of the same passage.

Two workloads:
- "same tokens": texts already stripped of Arabic marks, so both sides
  tokenize and run exactly the same sequences: the engines compared;
- "as the pipeline encodes": the passages as stored (vocalized). m3tune's
  profile strips the marks before tokenizing (Profile.prepare), which is
  what it does in every step; sentence-transformers encodes what it is given.
  This row is the pipeline-level cost, not the same computation.

    .venv/bin/python benchmarks/bench_encode.py [--repeats 2] [--same-tokens-only]
    .venv/bin/python benchmarks/bench_encode.py --interleaved 2   # one process, turns on the same chunks
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

N, MAX_LENGTH, BATCH, REPEATS = 1000, 128, 32, 2


def peak_rss_mb() -> float:
    """This process's peak RSS since it started (VmHWM): getrusage's ru_maxrss would also carry the RSS of the
    parent it was forked from (Linux keeps the pre-exec high-water mark), here a process holding the corpus."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def texts(raw: bool) -> list[str]:
    from m3tune.arabic import strip_marks
    from m3tune.corpus.packaged import hadith_passages, quran_passages

    passages = [*quran_passages(), *hadith_passages("bukhari"), *hadith_passages("muslim")]
    sample = [p.text for p in random.Random(3).sample(passages, N)]
    return sample if raw else [strip_marks(t) for t in sample]


def cpu_seconds() -> float:
    """The process's user + system CPU time: less moved than wall time by other jobs on a shared machine (each
    thread's spinning counts too, so it is a second opinion, not the figure)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one(which: str, raw: bool, vectors_file: str) -> dict:
    import torch  # noqa: F401  imported before the clock starts, on both sides
    import transformers  # noqa: F401

    from m3tune.encoder.profiles import resolve

    folder = resolve("local:e5-small")
    batch = texts(raw)
    t0 = time.perf_counter()
    if which == "sentence-transformers":
        from sentence_transformers import SentenceTransformer, models

        transformer = models.Transformer(folder, max_seq_length=MAX_LENGTH)
        model = SentenceTransformer(modules=[transformer, models.Pooling(transformer.get_word_embedding_dimension(),
                                                                         "mean"), models.Normalize()], device="cpu")
        loaded = time.perf_counter()
        cpu0 = cpu_seconds()
        vectors = model.encode(batch, prompt="passage: ", batch_size=BATCH, convert_to_numpy=True)
    else:
        from m3tune.encoder.model import Encoder

        encoder = Encoder("local:e5-small", max_length=MAX_LENGTH, batch_size=BATCH,
                          runtime="torch" if which == "m3tune-torch" else "auto")
        loaded = time.perf_counter()
        cpu0 = cpu_seconds()
        vectors = encoder.encode(batch)
    done = time.perf_counter()
    np.save(vectors_file, vectors)
    return {"seconds": done - loaded, "cpu_seconds": cpu_seconds() - cpu0, "load_seconds": loaded - t0, "passages_per_s": N / (done - loaded),
            "peak_rss_mb": peak_rss_mb(),
            "checksum": float(abs(vectors).sum())}


def interleaved(rounds: int) -> None:
    """The three encoders in one process, taking turns on the same chunks of 100 passages, in a rotating order,
    ROUNDS times over the 1,000: on a machine shared with other jobs every encoder meets the same load, so the
    ratio holds where the fresh-process runs' best-of-N depends on which run found the machine quiet. Speed only
    (memory is the fresh-process rows')."""
    import torch  # noqa: F401
    from sentence_transformers import SentenceTransformer, models

    from m3tune.encoder.model import Encoder
    from m3tune.encoder.profiles import resolve

    batch = texts(False)
    transformer = models.Transformer(resolve("local:e5-small"), max_seq_length=MAX_LENGTH)
    st = SentenceTransformer(modules=[transformer, models.Pooling(transformer.get_word_embedding_dimension(), "mean"),
                                      models.Normalize()], device="cpu")
    ours = {r: Encoder("local:e5-small", max_length=MAX_LENGTH, batch_size=BATCH, runtime=r) for r in ("torch", "onnx")}
    run = {"sentence-transformers": lambda t: st.encode(t, prompt="passage: ", batch_size=BATCH, convert_to_numpy=True),
           "m3tune-torch": ours["torch"].encode, "m3tune": ours["onnx"].encode}
    names = list(run)
    seconds = {n: 0.0 for n in names}
    chunks = [batch[i:i + 100] for i in range(0, len(batch), 100)]
    for r in range(rounds):
        for c, chunk in enumerate(chunks):
            k = (r * len(chunks) + c) % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                run[name](chunk)
                seconds[name] += time.perf_counter() - t0
    total = rounds * len(batch)
    print(f"interleaved: {rounds} x {len(batch)} passages, chunks of 100, rotating order\n")
    print("| encoder | passages/s | ratio to peer |")
    print("|---|---:|---:|")
    for name in names:
        print(f"| {name} | {total / seconds[name]:.1f} | {seconds['sentence-transformers'] / seconds[name]:.2f}x |")


def main(repeats: int, workloads: tuple[bool, ...]) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "M3TUNE_CACHE": os.environ.get("M3TUNE_CACHE", f"{workdir}/cache")}
        # converted and exported once, outside the timings (the export is once per model, cached)
        setup = subprocess.run([sys.executable, "-c", "import time; from m3tune.encoder.profiles import resolve; "
                                "resolve('local:e5-small'); t = time.perf_counter(); from m3tune.encoder.model "
                                "import Encoder; Encoder('local:e5-small'); print(time.perf_counter() - t)"],
                               env=env, check=True, capture_output=True, text=True)
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; {N} passages; local:e5-small, mean "
              f"pooling, max_length {MAX_LENGTH}, batch {BATCH}; ONNX export + first load (once per model, "
              f"cached): {float(setup.stdout.split()[-1]):.1f} s\n")
        print("| workload | encoder | passages/s (best) | all runs | CPU s per run | load s (best run) | peak RSS MB | "
              "min cosine to peer | ratio to peer |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        labels = {"sentence-transformers": "sentence-transformers encode (peer)",
                  "m3tune-torch": "m3tune Encoder, runtime torch", "m3tune": "m3tune Encoder (default: ONNX Runtime)"}
        for raw in workloads:
            # the vocalized row is the pipeline's cost, not an engine comparison: the peer and m3tune's default
            contenders = ("sentence-transformers", "m3tune") if raw else ("sentence-transformers", "m3tune-torch",
                                                                          "m3tune")
            runs: dict[str, list[dict]] = {w: [] for w in contenders}
            # the vocalized row once each (a pipeline figure, not the engine comparison)
            order = [w for i in range(1 if raw else repeats) for w in (contenders if i % 2 == 0 else contenders[::-1])]
            for i, which in enumerate(order):
                out = subprocess.run([sys.executable, __file__, "--one", which, "raw" if raw else "stripped",
                                      f"{workdir}/{which}-{i}.npy"], env=env, capture_output=True, text=True, check=True)
                runs[which].append({**json.loads(out.stdout.strip().splitlines()[-1]), "file": f"{workdir}/{which}-{i}.npy"})
                print(f"  {'raw' if raw else 'stripped'} {which}: {runs[which][-1]['passages_per_s']:.1f}/s",
                      file=sys.stderr, flush=True)
            best = {w: max(r, key=lambda x: x["passages_per_s"]) for w, r in runs.items()}
            peer = np.load(best["sentence-transformers"]["file"])
            for which, results in runs.items():
                cosine = min(float((np.load(r["file"]) * peer).sum(1).min()) for r in results)
                print(f"| {'as the pipeline encodes (vocalized)' if raw else 'same tokens (marks stripped)'} | "
                      f"{labels[which]} | {best[which]['passages_per_s']:.1f} | "
                      f"{', '.join('%.1f' % r['passages_per_s'] for r in results)} | "
                      f"{', '.join('%.0f' % r['cpu_seconds'] for r in results)} | {best[which]['load_seconds']:.1f} | "
                      f"{max(r['peak_rss_mb'] for r in results):,.0f} | "
                      f"{'-' if raw and which != 'sentence-transformers' else '%.7f' % cosine} | "
                      f"{best[which]['passages_per_s'] / best['sentence-transformers']['passages_per_s']:.2f}x |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], sys.argv[3] == "raw", sys.argv[4])))
    else:
        import argparse

        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--repeats", type=int, default=REPEATS, help="runs of each contender, same tokens")
        parser.add_argument("--same-tokens-only", action="store_true", help="leave the vocalized workload out")
        parser.add_argument("--interleaved", type=int, metavar="ROUNDS", help="the encoders in one process, taking "
                            "turns on the same chunks, ROUNDS times over the passages (speed on a shared machine)")
        args = parser.parse_args()
        if args.interleaved:
            interleaved(args.interleaved)
            sys.exit()
        main(args.repeats, (False,) if args.same_tokens_only else (False, True))
