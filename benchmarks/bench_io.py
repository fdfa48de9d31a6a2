"""Benchmark: ingest throughput, JSONL read/write rows per second, normalization.

Each figure is measured side by side with its peer in the same process, best
of REPEATS runs, so the ratios hold on a shared, noisy machine. Run:

    .venv/bin/python benchmarks/bench_io.py            # prints a markdown table
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time

REPEATS = 3


def best(fn, repeats=REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    import pyarabic.araby as araby

    from m3tune.arabic import normalize
    from m3tune.executor import run_step
    from m3tune.jsonl import read_jsonl, write_jsonl
    from m3tune.records import Passage
    from m3tune.runroot import open_root
    from m3tune.storage import LocalStore

    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        # 1. the ingest step end to end: the whole packaged corpus
        roots = iter(range(100))
        ingest_s = best(lambda: run_step(open_root(f"{tmp}/runs/r{next(roots)}"), "ingest"))
        data = open_root(f"{tmp}/runs/r0").child("ingest").read_bytes("passages.jsonl")
        n = data.count(b"\n")
        rows_out.append(("ingest step, whole corpus (21,176 passages, 33 MB)", n / ingest_s, None, None))

        # 2. JSONL read + validate
        ours = best(lambda: sum(1 for _ in read_jsonl(io.BytesIO(data), Passage, name="p")))
        peer = best(lambda: sum(1 for line in io.BytesIO(data) if Passage.model_validate(json.loads(line))))
        raw = best(lambda: sum(1 for line in io.BytesIO(data) if json.loads(line)))
        rows_out.append(("JSONL read + validate (m3tune.jsonl.read_jsonl)", n / ours,
                         "json.loads + Passage.model_validate", n / peer))
        rows_out.append(("  (reference: json.loads alone, no validation)", n / raw, None, None))

        # 3. JSONL write
        records = list(read_jsonl(io.BytesIO(data), Passage, name="p"))
        store = LocalStore(tmp)

        def write_ours():
            with write_jsonl(store, "w.jsonl") as w:
                w.write_all(records)

        def write_peer():
            with open(f"{tmp}/w2.jsonl", "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r.model_dump(), ensure_ascii=False) + "\n")

        ours, peer = best(write_ours), best(write_peer)
        rows_out.append(("JSONL write, atomic + sha256 (m3tune.jsonl.write_jsonl)", n / ours,
                         "json.dumps(model_dump()) to a plain file", n / peer))

        # 4. Arabic normalization: one translate table vs pyarabic's helpers chained
        texts = [r.text for r in records]

        def pyarabic_chain(t: str) -> str:
            t = araby.strip_diacritics(araby.strip_tatweel(t))
            t = araby.normalize_alef(araby.normalize_ligature(t))
            return araby.normalize_teh(t)

        ours = best(lambda: [normalize(t) for t in texts])
        peer = best(lambda: [pyarabic_chain(t) for t in texts])
        rows_out.append(("normalize passages (m3tune.arabic.normalize)", n / ours,
                         "pyarabic strip_diacritics/tatweel + normalize_alef/ligature/teh", n / peer))

    print(f"python {sys.version.split()[0]}, best of {REPEATS}\n")
    print("| what | rows/s | peer | peer rows/s | ratio |")
    print("|---|---:|---|---:|---:|")
    for what, rate, peer_name, peer_rate in rows_out:
        ratio = f"{rate / peer_rate:.2f}×" if peer_rate else ""
        print(f"| {what} | {rate:,.0f} | {peer_name or ''} | {f'{peer_rate:,.0f}' if peer_rate else ''} | {ratio} |")


if __name__ == "__main__":
    main()
