"""DDP, ZeRO-2 and ZeRO-3 on CPU: the same train step (same data, steps, seed) in 2 gloo processes, one after the
other in one run; wall time of the step and each process's peak resident memory (VmHWM, which the train step
records in its manifest's metrics as peak_rss_mib_per_process), and the per-step losses, which must agree.

    .venv/bin/python benchmarks/bench_deepspeed.py [--model local:e5-small] [--steps 10] [--out runs/bench-ds]

The data: 480 training and 96 validation examples from real Quran verses (m3tune.bench.train.quran_examples,
the test suite's kind of pairs), validation over them plus a 300-passage corpus sample.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODES = {"DDP": [], "ZeRO-2": ["--deepspeed", "zero2"], "ZeRO-3": ["--deepspeed", "zero3"]}


def prepare(root_dir: Path) -> None:
    """ingest (the packaged Quran) and a combine step's train/validation files under ROOT_DIR/data."""
    from m3tune.corpus.ingest import IngestConfig
    from m3tune.corpus.passages import read_passages
    from m3tune.executor import run_step
    from m3tune.runroot import open_root
    from m3tune.bench.train import quran_examples

    root = open_root(str(root_dir / "data"))
    run_step(root, "ingest", IngestConfig(sources=["quran"]))
    from m3tune.manifest import Manifest, OutputInfo, write_manifest

    rows = quran_examples(read_passages(root), random.Random(7), 576)
    combine, outputs = root.child("combine"), {}
    for name, part in (("train.jsonl", rows[:480]), ("validation.jsonl", rows[480:])):
        info = combine.write_bytes(name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part).encode())
        outputs[name] = OutputInfo(sha256=info.sha256, bytes=info.bytes, rows=len(part))
    # the manifest a combine step would publish last: train reads its outputs' digests from it
    write_manifest(combine, Manifest(step="combine", m3tune_version="bench", config={}, config_digest="sha256:0",
                                     inputs={}, outputs=outputs, started_at="2026-01-01T00:00:00",
                                     finished_at="2026-01-01T00:00:01", seconds=1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="local:e5-small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--out", default="runs/bench-deepspeed")
    args = parser.parse_args()
    out = Path(args.out).absolute()
    shutil.rmtree(out, ignore_errors=True)
    prepare(out)
    rows = []
    for mode, flags in MODES.items():
        run = out / mode
        shutil.copytree(out / "data", run)
        cmd = [sys.executable, "-m", "m3tune.cli", "step", "train", "--root", str(run), "--model", args.model,
               "--processes", "2", "--batch-size", str(args.batch_size), "--gradient-accumulation", "1",
               "--max-steps", str(args.steps), "--eval-every", str(args.steps), "--checkpoint-every", str(args.steps),
               "--dim", "384", "--dim", "128", "--negatives", "3", "--passage-max-length", "128",
               "--query-max-length", "32", "--validation-corpus-sample", "300", "--learning-rate", "2e-5",
               "--workdir", str(run / "work"), *flags]
        started = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.time() - started
        manifest = json.loads((run / "train" / "_manifest.json").read_text())
        history = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
        train = [h for h in history if h["kind"] == "train"]
        step_s = [args.batch_size * 2 / h["examples_per_s"] for h in train[1:]]  # the first step warms up
        median = sorted(step_s)[len(step_s) // 2]
        rows.append({"mode": mode, "seconds": round(seconds, 1), "median_step_s": round(median, 2),
                     "peak_rss_mib_per_process": manifest["metrics"]["peak_rss_mib_per_process"],
                     "ran": manifest["counts"]["ran"], "losses": [h["loss"] for h in train]})
        shutil.rmtree(run / "work", ignore_errors=True)
    print(json.dumps(rows, indent=1))
    print(f"| run | step wall (s) | median train step (s) | peak RSS per process (MiB) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} ({r['ran']['engine']}, ZeRO {r['ran']['zero_stage']}) | {r['seconds']} | "
              f"{r['median_step_s']} | {' / '.join(map(str, r['peak_rss_mib_per_process']))} |")
    base = rows[0]["losses"]
    for r in rows[1:]:
        worst = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base))
        print(f"{r['mode']}: largest relative loss difference from DDP {worst:.1e}")


if __name__ == "__main__":
    main()
