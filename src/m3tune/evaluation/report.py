"""The evaluation's outputs: results.json (stable schema), per_query.jsonl, report.md and PNG charts.

results.json (`schema: m3tune.evaluate/v1`):

    test_set    {path, sha256, queries, by_category}
    corpus      {passages}
    k, metrics, baseline, targets {recall@10, mrr@10}
    models      [{name, spec, kind, target, dim, seconds {...}, queries_per_second,
                  overall {metric: value}, targets {recall@10: {value, target, met}, mrr@10: ...},
                  breakdowns {category|language|source|difficulty|held_out: {group: {n, metric: value}}},
                  dims {"D": {metric: value}} (Matryoshka; dense models), skipped_dims,
                  intervals {metric: [low, high]} (bootstrap 95%, BCa: ndcg@10, recall@10, capped_recall@10, mrr@10),
                  significance {vs, test, resamples, queries, recall@10: {delta, p_value}, ...} (not the baseline),
                  category_deltas {vs, CATEGORY: {n, small_n, metric: {delta, ci95}}} (not the baseline)}]
    pairwise    {test, correction, resamples, pairs [{a, b, metric: {delta (b - a), p_value, p_holm}}]}
    parts       {held_out|seen: {queries, models {name: {overall, intervals, significance, category_deltas}},
                 pairwise}} (gold queries tagged held_out: true / false; absent when none is tagged)

capped_recall@10 is Recall@10 over min(10, relevant): the target metric, since a query with more than ten
relevant passages cannot reach a plain Recall@10 of 1.

per_query.jsonl: one row per model and query: the query's fields, every
metric, the rank of its first relevant passage (null: not in the top k) and
its top 10 ids, so a regression can be read query by query.
"""

from __future__ import annotations

import io
from typing import Any

from m3tune.evaluation.metrics import BREAKDOWNS, HEADLINE, METRICS, TESTED

SCHEMA = "m3tune.evaluate/v1"
TARGETS = ("recall@10", "mrr@10")


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _mark(ok: bool) -> str:
    return "✅" if ok else "❌"


def _p(p: float, resamples: int) -> str:
    """A p-value as printed: at the resolution floor of a two-sided randomization test with RESAMPLES (0:
    none) as "≤ 2/(R+1)", which is all such a test can say."""
    if resamples and p <= 2 / (resamples + 1) + 1e-12:
        return f"≤ 2/{resamples + 1}"
    return f"{p:.3g}"


def markdown(results: dict[str, Any]) -> str:
    models = results["models"]
    t = results["targets"]
    lines = [f"# Evaluation: {len(models)} model(s) on {results['test_set']['queries']} gold queries",
             "", f"Test set: `{results['test_set']['path']}` (sha256 {results['test_set']['sha256'][:12]}), "
             f"corpus: {results['corpus']['passages']:,} passages, top {results['k']} per query. "
             f"Targets: Recall@10 ≥ {t['recall@10']:.0%}, MRR@10 ≥ {t['mrr@10']:.2f}.", "",
             "## Models × metrics", ""]
    names = [n for n in METRICS if n in models[0]["overall"]]  # results written before a metric was added
    lines.append("| model | " + " | ".join(names) + " | targets |")
    lines.append("|---|" + "---|" * (len(names) + 1))
    for m in models:
        o = m["overall"]
        marks = " ".join(f"{k} {_mark(v['met'])}" for k, v in m["targets"].items())
        lines.append(f"| {m['name']} | " + " | ".join(f"{o[n]:.3f}" for n in names) + f" | {marks} |")
    lines += ["", "Recall@10 and MRR@10 against the targets: ✅ met, ❌ missed."]
    sig = [m for m in models if m.get("significance")]
    if sig:
        lines += ["", f"## Against the baseline ({results['baseline']})", "",
                  f"Paired randomization test, two-sided, {sig[0]['significance']['resamples']:,} resamples over "
                  f"{sig[0]['significance']['queries']} queries.", "",
                  "| model | " + " | ".join(f"Δ {n} (p)" for n in TESTED) + " |", "|---|" + "---|" * len(TESTED)]
        for m in sig:
            s = m["significance"]
            lines.append(f"| {m['name']} | " + " | ".join(
                f"{s[n]['delta']:+.3f} ({_p(s[n]['p_value'], s['resamples'])}{' *' if s[n]['p_value'] < 0.05 else ''})"
                for n in TESTED) + " |")
        lines.append("\n`*`: p < 0.05.")
    if all(m.get("intervals") for m in models):
        lines += ["", "## Headline metrics with 95% intervals", "",
                  "Bootstrap (BCa) over the queries, 95%.", "",
                  "| model | " + " | ".join(HEADLINE) + " |", "|---|" + "---|" * len(HEADLINE)]
        for m in models:
            lines.append(f"| {m['name']} | " + " | ".join(
                f"{m['overall'][n]:.3f} [{m['intervals'][n][0]:.3f}, {m['intervals'][n][1]:.3f}]"
                for n in HEADLINE) + " |")
    pairs = (results.get("pairwise") or {}).get("pairs") or []
    if pairs:
        lines += ["", "## Every pair of models", "",
                  f"Paired randomization tests, Holm-adjusted per metric over the {len(pairs)} pairs "
                  "(Δ = second − first).", "",
                  "| first | second | " + " | ".join(f"Δ {n} (p Holm)" for n in TESTED) + " |",
                  "|---|---|" + "---|" * len(TESTED)]
        for row in pairs:
            lines.append(f"| {row['a']} | {row['b']} | " + " | ".join(
                f"{row[n]['delta']:+.3f} ({_p(row[n]['p_holm'], 0)}{' *' if row[n]['p_holm'] < 0.05 else ''})"
                for n in TESTED) + " |")
        lines.append("\n`*`: Holm-adjusted p < 0.05.")
    deltas = [m for m in models if m.get("category_deltas")]
    if deltas:
        lines += ["", f"## By category, against the baseline ({results['baseline']}): Δ nDCG@10 [95% interval]",
                  "", "| category | n | " + " | ".join(m["name"] for m in deltas) + " |",
                  "|---|---|" + "---|" * len(deltas)]
        for c, row in ((c, v) for c, v in deltas[0]["category_deltas"].items() if c != "vs"):
            cells = [f"{m['category_deltas'][c]['ndcg@10']['delta']:+.3f} "
                     f"[{m['category_deltas'][c]['ndcg@10']['ci95'][0]:+.3f}, "
                     f"{m['category_deltas'][c]['ndcg@10']['ci95'][1]:+.3f}]" for m in deltas]
            lines.append(f"| {c} | {row['n']}{' (small n)' if row['small_n'] else ''} | " + " | ".join(cells) + " |")
    for dim in BREAKDOWNS:
        groups = list(models[0]["breakdowns"][dim])
        lines += ["", f"## By {dim} (Recall@10 / MRR@10)", "",
                  f"| {dim} | n | " + " | ".join(m["name"] for m in models) + " |",
                  "|---|---|" + "---|" * len(models)]
        for g in groups:
            n = models[0]["breakdowns"][dim][g]["n"]
            cells = [f"{_pct(m['breakdowns'][dim][g]['recall@10'])} / {m['breakdowns'][dim][g]['mrr@10']:.3f}"
                     for m in models]
            lines.append(f"| {g} | {n} | " + " | ".join(cells) + " |")
    lines += _parts(results)
    dims = [m for m in models if m.get("dims")]
    if dims:
        lines += ["", "## Matryoshka dimensions (Recall@10 / MRR@10)", "",
                  "| model | " + " | ".join(f"{d}" for d in _all_dims(dims)) + " |", "|---|" + "---|" * len(_all_dims(dims))]
        for m in dims:
            cells = [f"{_pct(m['dims'][str(d)]['recall@10'])} / {m['dims'][str(d)]['mrr@10']:.3f}"
                     if str(d) in m["dims"] else "n/a" for d in _all_dims(dims)]
            lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    lines += ["", "## Speed", "", "| model | seconds (encode passages / queries / search) | queries/s |",
              "|---|---|---|"]
    for m in models:
        s = m["seconds"]
        parts = " / ".join(f"{s.get(k, 0.0):.2f}" for k in ("encode_passages", "encode_queries", "search"))
        lines.append(f"| {m['name']} | {parts} | {m['queries_per_second']:.1f} |")
    charts = results.get("charts", [])
    if charts:
        lines += ["", "## Charts", ""] + [f"![{c}]({c})" for c in charts]
    lines += ["", "Per-query results: `per_query.jsonl` (one row per model and query)."]
    return "\n".join(lines) + "\n"


def _parts(results: dict[str, Any]) -> list[str]:
    """The held-out and seen parts' tables (results["parts"]), held out first: the headline."""
    lines: list[str] = []
    for part, p in (results.get("parts") or {}).items():
        title = "Held out (training never saw their passages)" if part == "held_out" else "Seen"
        names = list(p["models"])
        lines += ["", f"## {title}: {p['queries']} queries", "",
                  "| model | " + " | ".join(f"{n} [95%]" for n in HEADLINE) + " | "
                  + " | ".join(f"Δ {n} vs {names[0]} (p)" for n in TESTED) + " |",
                  "|---|" + "---|" * (len(HEADLINE) + len(TESTED))]
        for name, m in p["models"].items():
            cells = [f"{m['overall'][n]:.3f} [{m['intervals'][n][0]:.3f}, {m['intervals'][n][1]:.3f}]"
                     for n in HEADLINE]
            sig = m.get("significance")
            cells += [f"{sig[n]['delta']:+.3f} ({_p(sig[n]['p_value'], sig['resamples'])})" if sig else "—"
                      for n in TESTED]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        deltas = [(name, m) for name, m in p["models"].items() if m.get("category_deltas")]
        if deltas:
            lines += ["", f"Δ nDCG@10 against {names[0]} by category [95% interval]:", "",
                      "| category | n | " + " | ".join(name for name, _ in deltas) + " |",
                      "|---|---|" + "---|" * len(deltas)]
            for c, row in ((c, v) for c, v in deltas[0][1]["category_deltas"].items() if c != "vs"):
                cells = [f"{m['category_deltas'][c]['ndcg@10']['delta']:+.3f} "
                         f"[{m['category_deltas'][c]['ndcg@10']['ci95'][0]:+.3f}, "
                         f"{m['category_deltas'][c]['ndcg@10']['ci95'][1]:+.3f}]" for _, m in deltas]
                lines.append(f"| {c} | {row['n']}{' (small n)' if row['small_n'] else ''} | " + " | ".join(cells)
                             + " |")
        significant = [r for r in p["pairwise"]["pairs"] if r["ndcg@10"]["p_holm"] < 0.05]
        lines += ["", f"Pairs apart on nDCG@10 (Holm-adjusted p < 0.05, over {len(p['pairwise']['pairs'])} pairs): "
                  + (", ".join(f"{r['b']} − {r['a']} {r['ndcg@10']['delta']:+.3f}" for r in significant)
                     or "none")]
    return lines


def _all_dims(models: list[dict[str, Any]]) -> list[int]:
    return sorted({int(d) for m in models for d in m["dims"]}, reverse=True)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def charts(results: dict[str, Any]) -> dict[str, bytes]:
    """{file name: PNG}: Recall@10 per category and model; Recall@10 over Matryoshka dimensions."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    models = results["models"]
    groups = list(models[0]["breakdowns"]["category"])
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    for i, m in enumerate(models):
        xs = [j + i * width for j in range(len(groups))]
        ax.bar(xs, [m["breakdowns"]["category"][g]["recall@10"] for g in groups], width, label=m["name"])
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(groups))], groups)
    ax.axhline(results["targets"]["recall@10"], color="grey", linestyle="--", linewidth=1, label="target")
    ax.set_ylim(0, 1)
    ax.set_ylabel("Recall@10")
    ax.set_title("Recall@10 by category")
    ax.legend(fontsize="small")
    out["recall10_by_category.png"] = _png(fig)
    plt.close(fig)

    dense = [m for m in models if m.get("dims")]
    if dense:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in dense:
            points = sorted([(int(d), v["recall@10"]) for d, v in m["dims"].items()])
            ax.plot([d for d, _ in points], [v for _, v in points], marker="o", label=m["name"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("dimensions")
        ax.set_ylabel("Recall@10")
        ax.set_ylim(0, 1)
        ax.set_title("Matryoshka: Recall@10 by embedding size")
        ax.legend(fontsize="small")
        out["matryoshka_recall10.png"] = _png(fig)
        plt.close(fig)
    return out
