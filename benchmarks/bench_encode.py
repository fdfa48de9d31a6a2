"""Benchmark: encoding passages with e5-small, m3tune's Encoder against sentence-transformers' `encode`.

The same 1,000 passages (a seeded sample of the corpus, Quran and hadith in
proportion), the same model (`local:e5-small`, mean pooling, `passage: `
prompt, normalised), the same 128-token truncation and batch size 32 on both
sides. Each contender runs in a fresh process, alternating, REPEATS times;
the best run is the figure and all runs are shown (the machine is shared).

Two workloads:
- "same tokens": texts already stripped of Arabic marks, so both sides
  tokenize and run exactly the same sequences: the engines compared;
- "as the pipeline encodes": the passages as stored (vocalized). m3tune's
  profile strips the marks before tokenizing (Profile.prepare), which is
  what it does in every step; sentence-transformers encodes what it is given.
  This row is the pipeline-level cost, not the same computation.

    .venv/bin/python benchmarks/bench_encode.py
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

N, MAX_LENGTH, BATCH, REPEATS = 1000, 128, 32, 2


def texts(raw: bool) -> list[str]:
    from m3tune.arabic import strip_marks
    from m3tune.corpus.packaged import hadith_passages, quran_passages

    passages = [*quran_passages(), *hadith_passages("bukhari"), *hadith_passages("muslim")]
    sample = [p.text for p in random.Random(3).sample(passages, N)]
    return sample if raw else [strip_marks(t) for t in sample]


def one(which: str, raw: bool) -> dict:
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
        vectors = model.encode(batch, prompt="passage: ", batch_size=BATCH, convert_to_numpy=True)
    else:
        from m3tune.encoder.model import Encoder

        encoder = Encoder("local:e5-small", max_length=MAX_LENGTH, batch_size=BATCH)
        loaded = time.perf_counter()
        vectors = encoder.encode(batch)
    done = time.perf_counter()
    return {"seconds": done - loaded, "load_seconds": loaded - t0, "passages_per_s": N / (done - loaded),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "checksum": float(abs(vectors).sum())}


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "M3TUNE_CACHE": os.environ.get("M3TUNE_CACHE", f"{workdir}/cache")}
        subprocess.run([sys.executable, "-c", "from m3tune.encoder.profiles import resolve; "
                        "resolve('local:e5-small')"], env=env, check=True)  # converted once, outside the timings
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; {N} passages; local:e5-small, mean "
              f"pooling, max_length {MAX_LENGTH}, batch {BATCH}\n")
        print("| workload | encoder | passages/s (best) | all runs | peak RSS MB | ratio to peer |")
        print("|---|---|---:|---:|---:|---:|")
        for raw in (False, True):
            runs: dict[str, list[dict]] = {"sentence-transformers": [], "m3tune": []}
            order = [w for i in range(REPEATS) for w in (("sentence-transformers", "m3tune") if i % 2 == 0
                                                         else ("m3tune", "sentence-transformers"))]
            for which in order:
                out = subprocess.run([sys.executable, __file__, "--one", which, "raw" if raw else "stripped"],
                                     env=env, capture_output=True, text=True, check=True)
                runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
            best = {w: max(r, key=lambda x: x["passages_per_s"]) for w, r in runs.items()}
            for which, results in runs.items():
                label = "sentence-transformers encode (peer)" if which != "m3tune" else "m3tune Encoder"
                print(f"| {'as the pipeline encodes (vocalized)' if raw else 'same tokens (marks stripped)'} | "
                      f"{label} | {best[which]['passages_per_s']:.1f} | "
                      f"{', '.join('%.1f' % r['passages_per_s'] for r in results)} | "
                      f"{max(r['peak_rss_mb'] for r in results):,.0f} | "
                      f"{best[which]['passages_per_s'] / best['sentence-transformers']['passages_per_s']:.2f}x |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], sys.argv[3] == "raw")))
    else:
        main()
