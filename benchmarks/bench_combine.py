"""Benchmark: combine over a large synthetic input — rows/second and peak memory at two input sizes.

The input is N synthetic Example rows (Arabic and English queries, Quran and
hadith positives, 7 negatives each, ~1 kB a row) written once, outside the
timings. Each measurement runs in a fresh process: `combine` with the default
targets and a fixed output cap, and, as the yardstick, a plain validated read
of the same file (`m3tune.jsonl.read_jsonl` into Example records, nothing
kept). Peak memory is the process's max RSS; if combine streams, it stays flat
as N grows. Run:

    .venv/bin/python benchmarks/bench_combine.py            # 250,000 and 1,000,000 rows
"""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import tempfile
import time

CAP = 50_000
WORDS_AR = "الصلاة الزكاة الصيام الحج الصبر الرحمة التوبة الجنة النار العلم الصدق الوالدين اليتيم الدعاء الذكر".split()
WORDS_EN = "prayer charity fasting pilgrimage patience mercy repentance paradise fire knowledge truth parents".split()


def make_input(path: str, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            arabic = rng.random() < 0.7
            quran = rng.random() < 0.4
            words = WORDS_AR if arabic else WORDS_EN
            pos = f"quran:{rng.randint(1, 114)}:{rng.randint(1, 286)}" if quran else f"bukhari:{rng.randint(1, 7563)}"
            negs = [f"muslim:{rng.randint(1, 7000)}" for _ in range(7)]
            row = {"query": " ".join(rng.choice(words) for _ in range(6)) + f" {i}", "pos": ["نص " * 20],
                   "neg": ["نص آخر " * 10] * 7, "pos_ids": [pos], "neg_ids": negs, "query_id": f"q{i}",
                   "language": "ar" if arabic else "en", "type": "conceptual" if rng.random() < 0.2 else "question",
                   "source": "quran" if quran else "hadith"}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def one(which: str, path: str, workdir: str) -> None:
    t0 = time.perf_counter()
    if which == "read":
        from m3tune.jsonl import read_jsonl
        from m3tune.records import Example

        with open(path, "rb") as f:
            rows = sum(1 for _ in read_jsonl(f, Example, name=path))
        out = {"rows": rows}
    else:
        from m3tune.combine.step import CombineConfig
        from m3tune.executor import run_step
        from m3tune.runroot import open_root

        manifest, _ = run_step(open_root(f"{workdir}/run"), "combine",
                               CombineConfig(mined=False, inputs=[path], max_examples=CAP), force=True)
        out = {"rows": manifest.counts["input"], "examples": manifest.counts["examples"]}
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def main(sizes: list[int]) -> None:
    print(f"python {sys.version.split()[0]}; output cap {CAP:,} examples\n")
    print("| input rows | what | wall s | rows/s | peak RSS MB | output |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in sizes:
        with tempfile.TemporaryDirectory() as workdir:
            path = f"{workdir}/input.jsonl"
            make_input(path, n)
            for which in ("read", "combine"):
                done = subprocess.run([sys.executable, __file__, "--one", which, path, workdir],
                                      capture_output=True, text=True, check=True)
                r = json.loads(done.stdout.strip().splitlines()[-1])
                label = "validated read only (yardstick)" if which == "read" else "m3tune combine"
                print(f"| {n:,} | {label} | {r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} | "
                      f"{r['peak_rss_mb']:,.0f} | {r.get('examples', '')} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main([int(x) for x in sys.argv[1:]] or [250_000, 1_000_000])
