"""Peak memory of publishing and reading the index step's vectors.npy: the old bytes-copy path against the
streamed one, side by side on the same file (each measurement in its own process, peak RSS above its start).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_vectors_io.py [--rows 200000] [--dim 1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r'''
import io, json, resource, sys
import numpy as np
from m3tune.runroot import open_root
root, action, path, rows, dim = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
folder = open_root(root).child("index")
if action == "write":
    vectors = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    folder.write_bytes("ids.jsonl", b"".join(b'{"id": "p%d"}\n' % i for i in range(rows)))
    folder.write_bytes("index.json", json.dumps({
        "model": "local:tiny-xlmr", "pooling": "cls", "query_prompt": None, "passage_prompt": None,
        "max_length": 64, "batch_size": 8, "dtype": "fp32", "strip_marks": True, "fingerprint": "f" * 16,
        "dim": dim, "rows": rows, "backend": "exact", "collection": "c", "qdrant_url": None}).encode())
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if (action, path) == ("write", "old"):
    buffer = io.BytesIO()
    np.save(buffer, vectors)
    folder.write_bytes("vectors.npy", buffer.getvalue())
elif action == "write":
    with folder.open_write("vectors.npy") as f:
        np.save(f, vectors)
elif path == "old":
    np.load(io.BytesIO(folder.read_bytes("vectors.npy")))
else:
    from m3tune.index.step import read_index
    read_index(folder)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=1024)
    args = ap.parse_args()
    size_mb = args.rows * args.dim * 4 / 2**20
    print(f"{args.rows:,} x {args.dim:,} float32 ({size_mb:,.0f} MiB); MB of peak RSS above each process's start")
    print("| | old (bytes copy) | new (streamed) |\n|---|---:|---:|")
    with tempfile.TemporaryDirectory() as root:
        for action in ("write", "read"):
            cells = [json.loads(subprocess.check_output([sys.executable, "-c", CHILD, root, action, path,
                                                         str(args.rows), str(args.dim)])) for path in ("old", "new")]
            print(f"| {action} | {cells[0]:,.0f} | {cells[1]:,.0f} |")


if __name__ == "__main__":
    main()
