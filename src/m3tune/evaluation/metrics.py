"""IR metrics through ir-measures (pytrec_eval computes them), breakdowns, and a paired significance test.

Every metric is computed per query by the library; overall and per-group
figures are plain means of those per-query values, so a breakdown's groups,
weighted by their sizes, add up to the overall figure. A query a model
returns nothing for (BM25 on an English query) scores 0 on every metric.

Significance: a paired randomization (permutation) test on the per-query
differences between a model and the baseline (`scipy.stats.permutation_test`,
two-sided, on the mean difference). It is the test Smucker, Allan and
Carterette (CIKM 2007) recommend for IR evaluation: it assumes no
distribution, where a t-test assumes normal differences and Wilcoxon's ranks
handle the many ties at 0 and 1 that Recall@k and MRR produce poorly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from m3tune.errors import UserError
from m3tune.records import GoldQuery

# Our names (results.json, report.md) and the ir-measures measure each one is.
MEASURES = {
    "recall@1": "R@1", "recall@5": "R@5", "recall@10": "R@10", "recall@20": "R@20", "recall@100": "R@100",
    "hit@10": "Success@10", "mrr@10": "RR@10", "ndcg@10": "nDCG@10", "map@10": "AP@10",
}
# Derived from the library's R@10 and the query's relevant count, not computed here: Recall@10 over
# min(10, |relevant|) (BEIR's capped recall), so a query with 37 relevant passages can still reach 1.
CAPPED = "capped_recall@10"
METRICS = (*MEASURES, CAPPED)
BREAKDOWNS = ("category", "language", "source", "difficulty", "held_out")
TESTED = ("recall@10", "mrr@10", "ndcg@10")
HEADLINE = ("ndcg@10", "recall@10", CAPPED, "mrr@10")  # with bootstrap intervals
SMALL_N = 30  # a group with fewer queries is marked "small n": its intervals are wide

PerQuery = dict[str, dict[str, float]]  # query id -> metric name -> value


def qrels_of(gold: Sequence[GoldQuery]) -> dict[str, dict[str, int]]:
    return {g.id: {pid: 1 for pid in g.relevant_ids} for g in gold}


def per_query(gold: Sequence[GoldQuery], run: dict[str, dict[str, float]]) -> PerQuery:
    """Every metric for every gold query (0 where the model returned nothing)."""
    import ir_measures

    names = {ir_measures.parse_measure(m): name for name, m in MEASURES.items()}
    out: PerQuery = {g.id: {name: 0.0 for name in METRICS} for g in gold}
    # pytrec_eval skips a query with an empty ranking; such a query keeps its zeros.
    nonempty = {qid: docs for qid, docs in run.items() if docs and qid in out}
    if nonempty:
        for m in ir_measures.iter_calc(list(names), qrels_of(gold), nonempty):
            out[m.query_id][names[m.measure]] = float(m.value)
    for g in gold:
        relevant = len(set(g.relevant_ids))
        out[g.id][CAPPED] = min(1.0, out[g.id]["recall@10"] * relevant / min(10, relevant))
    return out


def mean(values: PerQuery, ids: Sequence[str] | None = None) -> dict[str, float]:
    ids = list(values) if ids is None else list(ids)
    return {name: (sum(values[q][name] for q in ids) / len(ids) if ids else 0.0) for name in METRICS}


def breakdowns(gold: Sequence[GoldQuery], values: PerQuery) -> dict[str, dict[str, dict[str, Any]]]:
    """{dimension: {group: {"n": queries, metric: mean}}} for category, language, source, difficulty."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for dim in BREAKDOWNS:
        groups: dict[str, list[str]] = {}
        for g in gold:
            groups.setdefault(str(getattr(g, dim)), []).append(g.id)
        out[dim] = {group: {"n": len(ids), **mean(values, ids)} for group, ids in sorted(groups.items())}
    return out


def paired_test(model: PerQuery, baseline: PerQuery, *, resamples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Per tested metric: mean difference (model - baseline), its two-sided p-value, and the test's name."""
    import numpy as np
    from scipy.stats import permutation_test

    ids = sorted(model)
    out: dict[str, Any] = {"test": "paired randomization (scipy.stats.permutation_test, two-sided)",
                           "resamples": resamples, "queries": len(ids)}
    for name in TESTED:
        a = np.array([model[q][name] for q in ids])
        b = np.array([baseline[q][name] for q in ids])
        delta = float((a - b).mean()) if len(ids) else 0.0
        if not len(ids) or np.allclose(a, b):
            p = 1.0  # identical per-query values: no difference to test
        else:
            result = permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), vectorized=True,
                                      permutation_type="samples", alternative="two-sided",
                                      n_resamples=resamples, rng=np.random.default_rng(seed))
            p = float(result.pvalue)
        out[name] = {"delta": delta, "p_value": p}
    return out


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of P_VALUES (family-wise error), in their order.

    Written here: six lines, and statsmodels (its multipletests) would be a large dependency for them.
    """
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def interval(values: Sequence[float], *, resamples: int = 10_000, seed: int = 0, level: float = 0.95
             ) -> list[float]:
    """A bootstrap LEVEL confidence interval [low, high] of the mean of VALUES (scipy.stats.bootstrap, BCa;
    percentile where BCa is undefined, as when every value is the same)."""
    import numpy as np
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=float)
    if len(data) < 2 or np.allclose(data, data[0]):
        return [float(data.mean()) if len(data) else 0.0] * 2
    for method in ("BCa", "percentile"):
        with np.errstate(all="ignore"):
            ci = bootstrap((data,), np.mean, confidence_level=level, n_resamples=resamples, method=method,
                           rng=np.random.default_rng(seed)).confidence_interval
        if np.isfinite(ci.low) and np.isfinite(ci.high):
            break
    return [float(ci.low), float(ci.high)]


def pairwise(values_of: dict[str, PerQuery], *, resamples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Every pair of models: paired randomization tests on TESTED metrics, Holm-adjusted per metric over
    all the pairs, so "significant" holds for the whole table at once."""
    names = list(values_of)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    tests = [paired_test(values_of[b], values_of[a], resamples=resamples, seed=seed) for a, b in pairs]
    rows = [{"a": a, "b": b} for a, b in pairs]
    for name in TESTED:
        adjusted = holm([t[name]["p_value"] for t in tests])
        for row, t, p in zip(rows, tests, adjusted):
            row[name] = {"delta": t[name]["delta"], "p_value": t[name]["p_value"], "p_holm": p}
    return {"test": tests[0]["test"] if tests else None, "correction": "Holm, per metric over every pair",
            "resamples": resamples, "pairs": rows}


def category_deltas(gold: Sequence[GoldQuery], model: PerQuery, baseline: PerQuery, *, resamples: int = 10_000
                    ) -> dict[str, dict[str, Any]]:
    """Per category: the mean paired difference (model - baseline) of each TESTED metric with its bootstrap
    interval; "small_n" below SMALL_N queries."""
    groups: dict[str, list[str]] = {}
    for g in gold:
        groups.setdefault(g.category, []).append(g.id)
    out: dict[str, dict[str, Any]] = {}
    for category, ids in sorted(groups.items()):
        row: dict[str, Any] = {"n": len(ids), "small_n": len(ids) < SMALL_N}
        for name in TESTED:
            diffs = [model[q][name] - baseline[q][name] for q in ids]
            row[name] = {"delta": sum(diffs) / len(diffs), "ci95": interval(diffs, resamples=resamples)}
        out[category] = row
    return out


PARTS = {"held_out": True, "seen": False}  # GoldQuery.held_out of each part


def parts(gold: Sequence[GoldQuery], values_of: dict[str, PerQuery], *, resamples: int = 10_000
          ) -> dict[str, dict[str, Any]]:
    """The headline tables again for the held-out and the seen part of a tagged gold set (none untagged):
    {part: {queries, models: {name: {overall, intervals, significance (vs the first model), category_deltas}},
    pairwise}}."""
    out: dict[str, dict[str, Any]] = {}
    names = list(values_of)
    for part, flag in PARTS.items():
        sub = [g for g in gold if g.held_out is flag]
        if not sub:
            continue
        ids = [g.id for g in sub]
        values = {name: {q: values_of[name][q] for q in ids} for name in names}
        models: dict[str, Any] = {}
        for i, name in enumerate(names):
            entry: dict[str, Any] = {"overall": mean(values[name]),
                                     "intervals": {m: interval([values[name][q][m] for q in ids],
                                                               resamples=resamples) for m in HEADLINE}}
            if i:
                entry["significance"] = {"vs": names[0], **paired_test(values[name], values[names[0]],
                                                                        resamples=resamples)}
                entry["category_deltas"] = {"vs": names[0], **category_deltas(sub, values[name], values[names[0]],
                                                                               resamples=resamples)}
            models[name] = entry
        out[part] = {"queries": len(ids), "models": models, "pairwise": pairwise(values, resamples=resamples)}
    return out


def passage_units(passages) -> dict[str, str | None]:
    """Each passage's cluster for the bootstrap: its surah (`quran:12`) or its book (`bukhari:book70`); None for
    a hadith whose book is unknown (book 0 in the packaged records)."""
    out: dict[str, str | None] = {}
    for p in passages:
        if p.source == "quran":
            out[p.id] = f"quran:{p.meta.get('surah', p.id.split(':')[1])}"
        else:
            book = p.meta.get("book_number")
            out[p.id] = f"{p.collection}:book{book}" if book else None
    return out


def query_clusters(gold: Sequence[GoldQuery], units: dict[str, str | None], prefer: frozenset[str] = frozenset()
                   ) -> dict[str, str]:
    """Each query's cluster: the unit most of its relevant passages lie in, counting only the passages of
    PREFER (the held-out units' own passages, not their twins elsewhere) when it holds any, then the units
    known; ties go to the unit named first. A relevant passage missing from UNITS is an error."""
    from collections import Counter

    out = {}
    for g in gold:
        missing = [pid for pid in g.relevant_ids if pid not in units]
        if missing:
            raise UserError(f"gold query {g.id!r}: relevant passage {missing[0]} is not in the corpus")
        ids = [pid for pid in g.relevant_ids if pid in prefer] or [pid for pid in g.relevant_ids if units[pid]] \
            or g.relevant_ids
        counts = Counter(units[pid] or pid for pid in ids)
        first = {u: i for i, u in reversed(list(enumerate(units[pid] or pid for pid in ids)))}
        out[g.id] = max(counts, key=lambda u: (counts[u], -first[u]))
    return out


def cluster_bootstrap(values: Sequence[float], clusters: Sequence[str], *, resamples: int = 10_000, seed: int = 0,
                      level: float = 0.95) -> dict[str, Any]:
    """The mean of VALUES with a percentile interval from resampling whole CLUSTERS (surahs, books) with
    replacement, and a two-sided bootstrap p-value of "the mean is 0" (for paired differences).

    Queries about one surah or one book are not independent draws: they share its wording, its length, its
    topic, and resampling queries alone ignores that (Field & Welsh 2007). With few clusters of uneven size
    (gold v4's test has 9) the percentile interval can itself under-cover, so reports print the cluster
    count and read it beside the randomization test over queries. Written here because
    scipy.stats.bootstrap and ranx resample observations only.
    The p-value is twice the share of resampled means on the far side of 0, floored at 1/(resamples+1):
    `p_floor` says when it sits at the floor (then write "p <= 1/(resamples+1)")."""
    import numpy as np

    if len(values) != len(clusters):
        raise ValueError(f"{len(values)} values but {len(clusters)} clusters")
    data = np.asarray(values, dtype=float)
    if not len(data):
        return {"mean": 0.0, "ci95": [0.0, 0.0], "p_value": 1.0, "p_floor": False, "clusters": 0}
    names = sorted(set(clusters))
    index = {c: i for i, c in enumerate(names)}
    which = np.array([index[c] for c in clusters])
    sums = np.bincount(which, weights=data, minlength=len(names))
    sizes = np.bincount(which, minlength=len(names)).astype(float)
    draws = np.random.default_rng(seed).integers(0, len(names), size=(resamples, len(names)))
    means = sums[draws].sum(axis=1) / sizes[draws].sum(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    floor = 1 / (resamples + 1)
    tail = min(np.mean(means <= 0), np.mean(means >= 0)) if not np.allclose(data, 0) else 0.5
    p = min(1.0, max(floor, 2 * float(tail)))
    return {"mean": float(data.mean()), "ci95": [float(low), float(high)], "p_value": p,
            "p_floor": p <= floor + 1e-15, "clusters": len(names), "resamples": resamples}


def p_text(p: float, resamples: int, *, sides: int = 2) -> str:
    """P as written in a report: at the resolution floor of R resamples, "p ≤ SIDES/(R+1)" (a two-sided
    randomization test's smallest p is 2/(R+1): scipy counts the observed statistic as one resample and
    doubles the smaller tail), else its value."""
    if p <= sides / (resamples + 1) + 1e-12:
        return f"p ≤ {sides}/{resamples + 1}"
    return f"p = {p:.4f}"
