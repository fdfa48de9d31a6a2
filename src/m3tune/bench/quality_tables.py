"""The held-out-test tables of `m3tune bench quality` on a gold tagged with `split` and `independent` (gold v4).

Read this way (issue [1/6]):

- only held-out-test rows count; the independent ones (no training generator shares their construction rule,
  lexicon or source text) are the headline, the rule-shared ones a "learns the task" figure, reported apart;
- a fine-tuned model's figure is the per-query mean over its training seeds (each seed's own figure beside
  it), because one run's category means move 0.01-0.04 with the seed alone;
- intervals come from resampling whole surahs and books (metrics.cluster_bootstrap), and a difference also
  gets the paired randomization test over queries; a p-value at the resolution floor is written as such.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from m3tune.errors import ConfigError

METRICS = ("ndcg@10", "recall@10", "mrr@10")
PARTS = {"independent": True, "rule-shared": False}
# issue [2/6]: the system publish serves must beat BM25 by this much on independent held-out-test nDCG@10 (its
# cluster interval above 0), and be no more than CATEGORY_SLACK below BM25 in any category
SHIPPED_MIN_GAIN, CATEGORY_SLACK = 0.05, 0.01


def oracle(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The per-query best of A and B (each query takes the system with the higher nDCG@10, all its metrics):
    the ceiling a perfect per-query choice between them would reach."""
    return {q: dict(a[q] if a[q]["ndcg@10"] >= b[q]["ndcg@10"] else b[q]) for q in a}


def seed_mean(runs: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each query's metrics averaged over RUNS (one {query: metrics} per training seed, the same queries)."""
    first = runs[0]
    for run in runs[1:]:
        if run.keys() != first.keys():
            raise ConfigError("quality: the training seeds' evaluations hold different queries")
    return {q: {m: sum(run[q][m] for run in runs) / len(runs) for m in METRICS} for q in first}


def compare(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], ids: list[str], clusters: dict[str, str],
            *, resamples: int) -> dict[str, Any]:
    """A - B on the queries IDS, per metric: mean, cluster-bootstrap interval and p, randomization p."""
    from m3tune.evaluation.metrics import cluster_bootstrap, paired_test

    perm = paired_test({q: a[q] for q in ids}, {q: b[q] for q in ids}, resamples=resamples)
    out = {}
    for m in METRICS:
        boot = cluster_bootstrap([a[q][m] - b[q][m] for q in ids], [clusters[q] for q in ids], resamples=resamples)
        out[m] = {"delta": round(boot["mean"], 4), "ci95": [round(x, 4) for x in boot["ci95"]],
                  "p_cluster": boot["p_value"], "p_randomization": perm[m]["p_value"]}
    return out


def tables(gold, clusters: dict[str, str], values_of: dict[str, dict[str, dict[str, float]]],
           per_seed: dict[str, dict[int, dict[str, dict[str, float]]]], *, base: str, tuned: str,
           bm25: str | None, hybrid: str | None, alpha: float, resamples: int, shipped: str | None = None
           ) -> dict[str, Any]:
    """The report: per part (independent, rule-shared) of held-out-test, every model's means with cluster
    intervals, per category, per seed, and the comparisons; and the verdict on the independent part."""
    from m3tune.corpus.heldout import TEST
    from m3tune.evaluation.metrics import cluster_bootstrap

    untagged = [g.id for g in gold if g.split == TEST and g.independent is None]
    if untagged:
        raise ConfigError(f"quality: held-out-test queries without an independent tag ({', '.join(untagged[:3])}): "
                          "tag every test row independent true or false (m3tune.gold.build_v4 does)")
    out: dict[str, Any] = {"split": TEST, "resamples": resamples, "seeds": list(next(iter(per_seed.values()), {})),
                           "parts": {}}
    pairs = [(tuned, base)] + [(tuned, bm25)] * bool(bm25) + [(hybrid, bm25)] * bool(hybrid and bm25) \
        + [(shipped, bm25)] * bool(shipped and bm25)
    for part, flag in PARTS.items():
        rows = [g for g in gold if g.split == TEST and g.independent is flag]
        if not rows:
            continue
        ids = [g.id for g in rows]
        cats = sorted({g.category for g in rows})
        by_cat = {c: [g.id for g in rows if g.category == c] for c in cats}
        models = {}
        for name, values in values_of.items():
            entry = {}
            for m in METRICS:
                boot = cluster_bootstrap([values[q][m] for q in ids], [clusters[q] for q in ids], resamples=resamples)
                entry[m] = {"mean": round(boot["mean"], 4), "ci95": [round(x, 4) for x in boot["ci95"]]}
            entry["by_category"] = {c: round(sum(values[q]["ndcg@10"] for q in q_ids) / len(q_ids), 4)
                                    for c, q_ids in by_cat.items()}
            if name in per_seed:
                entry["per_seed"] = {seed: {"ndcg@10": round(sum(v[q]["ndcg@10"] for q in ids) / len(ids), 4),
                                            "by_category": {c: round(sum(v[q]["ndcg@10"] for q in q_ids)
                                                                     / len(q_ids), 4) for c, q_ids in by_cat.items()}}
                                     for seed, v in per_seed[name].items()}
            models[name] = entry
        comparisons = {}
        for a, b in pairs:
            comparisons[f"{a} − {b}"] = {
                "overall": compare(values_of[a], values_of[b], ids, clusters, resamples=resamples),
                "by_category": {c: {"n": len(q_ids), **compare(values_of[a], values_of[b], q_ids, clusters,
                                                               resamples=resamples)}
                                for c, q_ids in by_cat.items()}}
        out["parts"][part] = {"queries": len(ids), "clusters": len({clusters[q] for q in ids}),
                              "by_category_n": {c: len(q) for c, q in by_cat.items()},
                              "by_category_clusters": {c: len({clusters[q] for q in q_ids})
                                                       for c, q_ids in by_cat.items()}, "models": models,
                              "comparisons": comparisons}
    head = out["parts"].get("independent")
    if head is None:
        raise ConfigError("quality: the gold has no independent held-out-test query to report on")
    gain = head["comparisons"][f"{tuned} − {base}"]
    goal = {f"{m} (independent held-out-test)": gain["overall"][m]["delta"] > 0
            and gain["overall"][m]["p_randomization"] < alpha and gain["overall"][m]["ci95"][0] > 0
            for m in ("ndcg@10", "recall@10")}
    worse = [c for c, row in gain["by_category"].items()
             if row["ndcg@10"]["delta"] < 0 or row["recall@10"]["delta"] < 0]
    goal["no_category_worse"] = not worse
    out |= {"goal": goal, "goal_met": all(goal.values()), "categories_worse": worse}
    if shipped and bm25:
        win = head["comparisons"][f"{shipped} − {bm25}"]
        below = [c for c, row in win["by_category"].items() if row["ndcg@10"]["delta"] < -CATEGORY_SLACK]
        shipped_goal = {f"{shipped} ≥ {bm25} + {SHIPPED_MIN_GAIN} nDCG@10, interval above 0":
                        win["overall"]["ndcg@10"]["delta"] >= SHIPPED_MIN_GAIN
                        and win["overall"]["ndcg@10"]["ci95"][0] > 0,
                        f"no category more than {CATEGORY_SLACK} below {bm25}": not below}
        out |= {"shipped": shipped, "shipped_goal": shipped_goal, "shipped_goal_met": all(shipped_goal.values()),
                "shipped_categories_below": below}
    return out


def markdown(report: dict[str, Any], *, base: str, tuned: str) -> list[str]:
    """The report as markdown lines: each part's table, categories, comparisons; the verdict."""
    from m3tune.evaluation.metrics import p_text

    r = report["resamples"]
    seeds = report["seeds"]
    lines = []
    for part, p in report["parts"].items():
        title = ("Held-out-test, independent queries (the headline)" if part == "independent"
                 else "Held-out-test, rule-shared queries (a training generator shares their rule: 'learns the task')")
        lines += [f"**{title}**: {p['queries']} queries in {p['clusters']} surahs and books; "
                  f"fine-tuned rows are means over {len(seeds)} training seed(s) {seeds}; intervals: 95%, "
                  f"resampling surahs and books", "",
                  "| model | " + " | ".join(f"{m} [95%]" for m in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
        for name, e in p["models"].items():
            lines.append(f"| {name} | " + " | ".join(
                f"{e[m]['mean']:.3f} [{e[m]['ci95'][0]:.3f}, {e[m]['ci95'][1]:.3f}]" for m in METRICS) + " |")
        cats = list(p["by_category_n"])
        lines += ["", "| nDCG@10 by category | " + " | ".join(
            f"{c} (n={p['by_category_n'][c]}, {p['by_category_clusters'][c]} clusters)" for c in cats)
                  + " |", "|---|" + "---:|" * len(cats)]
        for name, e in p["models"].items():
            lines.append(f"| {name} | " + " | ".join(f"{e['by_category'][c]:.3f}" for c in cats) + " |")
            for seed, s in (e.get("per_seed", {}) if len(seeds) > 1 else {}).items():
                lines.append(f"| {name}, seed {seed} | " + " | ".join(f"{s['by_category'][c]:.3f}" for c in cats)
                             + " |")
        lines += ["", "| difference (nDCG@10): Δ [95% over clusters] randomization p over queries / cluster "
                  "bootstrap p | all | " + " | ".join(cats) + " |", "|---|---:|" + "---:|" * len(cats)]
        for label, comp in p["comparisons"].items():
            cells = [comp["overall"]["ndcg@10"]] + [comp["by_category"][c]["ndcg@10"] for c in cats]
            lines.append(f"| {label} | " + " | ".join(
                f"{x['delta']:+.3f} [{x['ci95'][0]:+.3f}, {x['ci95'][1]:+.3f}] {p_text(x['p_randomization'], r)}"
                f" / {p_text(x['p_cluster'], r, sides=1)}" for x in cells) + " |")
        lines.append("")
    goal = report["goal"]
    lines.append(f"Goal ({tuned} beats {base} on independent held-out-test queries, nDCG@10 and Recall@10: "
                 "randomization p < alpha and the surah/book interval above 0; no category lower on either): "
                 + ("MET" if report["goal_met"] else "NOT MET: " + ", ".join(k for k, ok in goal.items() if not ok)
                    + (f" (lower: {', '.join(report['categories_worse'])})" if report["categories_worse"] else "")))
    if "shipped_goal" in report:
        lines += ["", f"Goal of the served system ({report['shipped']}: beats BM25 by ≥ {SHIPPED_MIN_GAIN} nDCG@10 on "
                  f"independent held-out-test queries with the surah/book interval above 0, no category more than "
                  f"{CATEGORY_SLACK} below it): " + ("MET" if report["shipped_goal_met"] else "NOT MET: " + ", ".join(
                      k for k, ok in report["shipped_goal"].items() if not ok) + (
                      f" (below: {', '.join(report['shipped_categories_below'])})"
                      if report["shipped_categories_below"] else ""))]
    return lines + [""]
