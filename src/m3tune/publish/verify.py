"""The checks a new collection passes before the alias moves to it.

- its point count is the corpus's;
- a sample of its points holds the vector the model gives its passage now, encoded afresh (not from the
  embeddings cache that fed the upload) and the passage's id;
- the gold queries searched against it score what evaluate measured for the model at this dimension,
  within a tolerance (a server searches exactly here, as evaluate does, so only ties may differ).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from m3tune.errors import UserError
from m3tune.evaluation.metrics import HEADLINE
from m3tune.records import Passage

Run = dict[str, dict[str, float]]
MIN_COSINE = 0.99  # the same vector up to batch padding and kernel order (bf16 on GPU stays above 0.99)


def search(prod, collection: str, query_ids: Sequence[str], queries: np.ndarray, *, k: int, key: str,
           batch: int = 64) -> Run:
    """The top K passages of each query in COLLECTION (or an alias), as evaluate's runs."""
    from qdrant_client import models

    params = models.SearchParams(exact=True) if prod.remote else None  # local mode is always exact
    run: Run = {}
    for start in range(0, len(queries), batch):
        requests = [models.QueryRequest(query=q.tolist(), limit=k, with_payload=[key], params=params)
                    for q in queries[start:start + batch]]
        responses = prod.call(f"query {collection!r}", prod.client.query_batch_points, collection, requests=requests)
        for qid, response in zip(query_ids[start:start + batch], responses):
            run[qid] = {str(p.payload[key]): float(p.score) for p in response.points if p.payload and key in p.payload}
    return run


def check_count(prod, collection: str, expected: int) -> int:
    found = prod.count(collection)
    if found != expected:
        raise UserError(f"verification: collection {collection!r} holds {found:,} points, the corpus {expected:,}: "
                        "the alias was not moved (rerun to finish the upload)")
    return found


def check_sample(prod, collection: str, passages: Sequence[Passage], fresh: np.ndarray, rows: Sequence[int], *,
                 key: str) -> dict[str, Any]:
    """Points ROWS hold FRESH (their passages re-encoded now, one row each) and their passage's id."""
    points = prod.call(f"retrieve {collection!r}", prod.client.retrieve, collection, ids=list(rows),
                       with_payload=[key], with_vectors=True)
    by_id = {int(p.id): p for p in points}
    worst = 1.0
    for row, ours in zip(rows, fresh):
        point = by_id.get(row)
        if point is None:
            raise UserError(f"verification: collection {collection!r} has no point {row} ({passages[row].id})")
        if (point.payload or {}).get(key) != passages[row].id:
            raise UserError(f"verification: point {row} of {collection!r} is {(point.payload or {}).get(key)!r}, "
                            f"not {passages[row].id!r}: the collection is not this corpus's")
        theirs = np.asarray(point.vector, dtype=np.float32)
        cosine = float(theirs @ ours / (np.linalg.norm(theirs) * np.linalg.norm(ours) + 1e-12))
        worst = min(worst, cosine)
        if cosine < MIN_COSINE:
            raise UserError(f"verification: the vector of {passages[row].id} in {collection!r} is not the model's "
                            f"(cosine {cosine:.4f} to a fresh encoding): the alias was not moved")
    return {"sampled": len(rows), "min_cosine": round(worst, 6)}


def check_metrics(found: dict[str, float], expected: dict[str, float], *, tolerance: float, what: str
                  ) -> dict[str, Any]:
    """FOUND (headline metrics) within TOLERANCE of EXPECTED (evaluate's), or an error naming the first apart."""
    for name in HEADLINE:
        if abs(found[name] - expected[name]) > tolerance:
            raise UserError(f"verification: {what} gives {name} {found[name]:.4f}, evaluate measured "
                            f"{expected[name]:.4f} (tolerance {tolerance:g}): the alias was not moved")
    return {name: {"found": round(found[name], 6), "evaluate": round(expected[name], 6)} for name in HEADLINE}
