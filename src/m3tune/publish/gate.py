"""The gate: the new model must beat the published one on the held-out gold queries.

The metric is one evaluate tests (its headline, nDCG@10, by default), the test evaluate's own paired
randomization test (`m3tune.evaluation.metrics.paired_test`) over the same held-out queries. The published
model's per-query values come from its collection's record (written when it was published), so the two are
paired query by query; when production holds no m3tune record, the published model is the one evaluate
compared against (its baseline, the base model the production collection was built with, or the model
`current_model` names).
"""

from __future__ import annotations

from typing import Any

from m3tune.errors import BadInput
from m3tune.evaluation.metrics import PerQuery, paired_test


class GateFailed(BadInput):
    """The new model did not beat the published one: a rerun on the same results fails the same way."""


def judge(new: PerQuery, current: PerQuery, *, new_name: str, current_name: str, metric: str, min_delta: float,
          max_p: float, resamples: int) -> dict[str, Any]:
    """The paired test of NEW against CURRENT on their common queries, and whether it passes."""
    ids = sorted(set(new) & set(current))
    if not ids:
        raise BadInput(f"gate: {new_name} and the published {current_name} share no held-out query to compare on")
    test = paired_test({q: new[q] for q in ids}, {q: current[q] for q in ids}, resamples=resamples)
    delta, p = test[metric]["delta"], test[metric]["p_value"]
    return {"metric": metric, "model": new_name, "vs": current_name, "queries": len(ids),
            "new": sum(new[q][metric] for q in ids) / len(ids),
            "current": sum(current[q][metric] for q in ids) / len(ids),
            "delta": delta, "p_value": p, "min_delta": min_delta, "max_p": max_p, "test": test["test"],
            "resamples": resamples, "passed": bool(delta > min_delta and p <= max_p)}


def explain(result: dict[str, Any]) -> str:
    r = result
    return (f"gate: {r['model']}'s {r['metric']} on {r['queries']} held-out gold queries is {r['new']:.4f} against "
            f"{r['current']:.4f} of the published {r['vs']} (Δ {r['delta']:+.4f}, p {r['p_value']:.3g}); it needs "
            f"Δ > {r['min_delta']:g} and p ≤ {r['max_p']:g}")
