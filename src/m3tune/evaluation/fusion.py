"""Score fusion worth deploying: a convex combination of per-query normalized scores, its recipe chosen on
held-out-dev (Bruch, Gai and Ingber, "An Analysis of Fusion Functions for Hybrid Retrieval", TOIS 2023).

A recipe names its member lists (models of the evaluation, each a top-DEPTH ranking with scores), one
normalization, and per query language a weight per member. For one query:

    fused(p) = Σ_i  w_lang[i] · norm_i(score_i(p))

- norm_i is computed over list i's own top DEPTH for that query:
    minmax  (s − min) / (max − min)                 Bruch et al.'s MM
    zscore  (s − mean) / std                        their z-score
    tmm     (s − lo) / (max − lo), lo the member's theoretical minimum (THEORETICAL_MIN: −1 for a cosine,
            0 for BM25)                             their theoretical min-max, the one they recommend
  A list whose scores are all equal normalizes to 1 (minmax, tmm above lo) or 0 (zscore).
- A passage missing from list i takes that list's floor: the normalized value of the lowest score the
  list returned, as if it were ranked last (0 under minmax). An empty list (BM25 finds no query word in the
  corpus) adds 0 to every passage.
- Weights are finite, ≥ 0, and sum to 1 (within 1e-6) per language; a language the recipe does not name
  uses its `default` weights.
- The fused ranking keeps the top DEPTH; ties break by passage id, so a ranking is reproducible.
- Optionally (`quote_share`, chosen on dev like the rest among QUOTE_SHARES, or off), a query that is a
  quote takes the BM25 member's list alone: an Arabic query of QUOTE_MIN_PAIRS or more adjacent word pairs,
  at least that share of which occur in one of BM25's top QUOTE_DEPTH passages (`quote_share`; under 1, as
  a quote may follow another spelling of the text, or run across two verses). A quote is what the lexical
  run finds best; the weights of the other queries are then chosen without them.

`choose` picks the normalization and each language's weights by grid search on held-out-dev queries only
(`gold.load_for_selection` refuses any other row), maximizing mean nDCG@10, and records the whole sweep.

Own code rather than ranx's `fuse`/`optimize_fusion`: ranx (with numba) would be a large dependency for
thirty lines; its fusion gives a passage missing from a run 0 after normalization, which under z-score
is the run's mean rather than its floor; and it optimizes one weight vector, where the queries here need
one per language. Its MIN/MAX/ZMUV normalizations are the ones implemented here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from m3tune.errors import ConfigError

Run = dict[str, dict[str, float]]  # query id -> passage id -> score
NORMALIZATIONS = ("minmax", "zscore", "tmm")
# by model kind: BM25 ≥ 0, a cosine ≥ −1
THEORETICAL_MIN = {"bm25": 0.0, "dense": -1.0, "bilingual": -1.0, "bilingual-body": -1.0}
DEFAULT = "default"
SUM_TOLERANCE = 1e-6
QUOTE_MIN_PAIRS, QUOTE_DEPTH = 2, 10
QUOTE_SHARES = (1.0, 0.8, 0.6)  # the quote route's thresholds the dev sweep tries (and off)


@dataclass(frozen=True)
class Recipe:
    """What a fused system is: its members (model names, in order), each member's kind, the normalization,
    the weights per query language ('default' for any other), and the depth of each member's list."""

    members: tuple[str, ...]
    kinds: tuple[str, ...]
    normalization: str
    weights: dict[str, tuple[float, ...]]
    depth: int = 100
    chosen_on: dict[str, Any] = field(default_factory=dict)  # the dev set, its digest and query count
    quote_share: float | None = None  # a query whose quote_share reaches it takes BM25's list alone; None: off

    def __post_init__(self):
        check_recipe(self)

    def weights_for(self, language: str) -> tuple[float, ...]:
        return self.weights.get(language, self.weights[DEFAULT])

    def to_json(self) -> dict[str, Any]:
        return {"members": list(self.members), "kinds": list(self.kinds), "normalization": self.normalization,
                "weights": {lang: list(w) for lang, w in self.weights.items()}, "depth": self.depth,
                "quote_share": self.quote_share, "chosen_on": self.chosen_on}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, where: str = "fusion recipe") -> Recipe:
        try:
            return cls(members=tuple(data["members"]), kinds=tuple(data["kinds"]),
                       normalization=data["normalization"],
                       weights={str(k): tuple(float(x) for x in v) for k, v in data["weights"].items()},
                       depth=int(data.get("depth", 100)), chosen_on=dict(data.get("chosen_on") or {}),
                       quote_share=None if data.get("quote_share") is None else float(data["quote_share"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where}: not a fusion recipe ({type(e).__name__}: {e})") from None


def check_recipe(recipe: Recipe) -> None:
    """A clear error for a recipe the fusion cannot honour: unknown normalization, bad weights."""
    if recipe.normalization not in NORMALIZATIONS:
        raise ConfigError(f"fusion normalization {recipe.normalization!r}: unknown (one of "
                          f"{', '.join(NORMALIZATIONS)})")
    if len(recipe.members) < 2 or len(set(recipe.members)) != len(recipe.members):
        raise ConfigError(f"fusion members {list(recipe.members)}: give two or more distinct models")
    if len(recipe.kinds) != len(recipe.members):
        raise ConfigError(f"fusion: {len(recipe.kinds)} kinds for {len(recipe.members)} members")
    if recipe.normalization == "tmm":
        unknown = [k for k in recipe.kinds if k not in THEORETICAL_MIN]
        if unknown:
            raise ConfigError(f"fusion normalization tmm: no theoretical minimum for a {unknown[0]} model "
                              f"(known: {', '.join(THEORETICAL_MIN)})")
    if recipe.quote_share is not None:
        if "bm25" not in recipe.kinds:
            raise ConfigError("fusion quote_share: a quote takes the BM25 member's list, and no member is bm25")
        if not (math.isfinite(recipe.quote_share) and 0 < recipe.quote_share <= 1):
            raise ConfigError(f"fusion quote_share {recipe.quote_share}: a share in (0, 1], or null (off)")
    if DEFAULT not in recipe.weights:
        raise ConfigError(f"fusion weights: no {DEFAULT!r} entry (the weights of a language not named)")
    if recipe.depth < 1:
        raise ConfigError(f"fusion depth {recipe.depth}: must be ≥ 1")
    for lang, w in recipe.weights.items():
        if len(w) != len(recipe.members):
            raise ConfigError(f"fusion weights[{lang}]: {len(w)} weights for {len(recipe.members)} members")
        if any(not math.isfinite(x) or x < 0 for x in w):
            raise ConfigError(f"fusion weights[{lang}] {list(w)}: each must be a finite number ≥ 0")
        if abs(sum(w) - 1.0) > SUM_TOLERANCE:
            raise ConfigError(f"fusion weights[{lang}] {list(w)} sum to {sum(w):.6g}: they must sum to 1")


def normalize(scores: Mapping[str, float], method: str, lo: float | None = None) -> tuple[dict[str, float], float]:
    """SCORES normalized by METHOD, and the list's floor (what a passage it lacks scores). LO: the
    member's theoretical minimum (tmm)."""
    if not scores:
        return {}, 0.0
    values = list(scores.values())
    top, bottom = max(values), min(values)
    if method == "minmax":
        span = top - bottom
        out = {p: (s - bottom) / span if span > 0 else 1.0 for p, s in scores.items()}
    elif method == "zscore":
        mu = sum(values) / len(values)
        sd = math.sqrt(sum((s - mu) ** 2 for s in values) / len(values))
        out = {p: (s - mu) / sd if sd > 0 else 0.0 for p, s in scores.items()}
    elif method == "tmm":
        if lo is None:
            raise ConfigError("tmm normalization needs the member's theoretical minimum")
        span = top - lo
        out = {p: (s - lo) / span if span > 0 else 1.0 for p, s in scores.items()}
    else:
        raise ConfigError(f"normalization {method!r}: unknown (one of {', '.join(NORMALIZATIONS)})")
    return out, min(out.values())


def _ranked(scores: Mapping[str, float], depth: int) -> dict[str, float]:
    top = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:depth]
    return dict(top)


def fuse_one(lists: Sequence[Mapping[str, float]], weights: Sequence[float], *, normalization: str,
             kinds: Sequence[str], depth: int) -> dict[str, float]:
    """One query's fused top DEPTH from its member LISTS (each cut to its own top DEPTH first)."""
    normed = [normalize(_ranked(scores, depth), normalization, THEORETICAL_MIN.get(kind))
              for scores, kind in zip(lists, kinds)]
    candidates = {p for scores, _ in normed for p in scores}
    fused = {p: sum(w * scores.get(p, floor) for w, (scores, floor) in zip(weights, normed) if w)
             for p in candidates}
    return _ranked(fused, depth)


def lexical_only(recipe: Recipe) -> tuple[float, ...]:
    """The weights that keep the first BM25 member's list alone (a routed quote)."""
    first = recipe.kinds.index("bm25")
    return tuple(1.0 if i == first else 0.0 for i in range(len(recipe.kinds)))


def routed(recipe: Recipe, share: float) -> bool:
    """Whether a query of quote SHARE takes BM25's list alone under RECIPE."""
    return recipe.quote_share is not None and share >= recipe.quote_share


def fuse(recipe: Recipe, runs: Sequence[Run], languages: Mapping[str, str], shares: Mapping[str, float] | None = None
         ) -> Run:
    """The fused run of every query in LANGUAGES (query id -> language) from the members' RUNS; SHARES: each
    query's quote_share (absent: 0), a routed quote taking BM25's list alone."""
    if len(runs) != len(recipe.members):
        raise ConfigError(f"fusion: {len(runs)} runs for {len(recipe.members)} members")
    shares = shares or {}
    return {qid: fuse_one([run.get(qid, {}) for run in runs],
                          lexical_only(recipe) if routed(recipe, shares.get(qid, 0.0)) else recipe.weights_for(lang),
                          normalization=recipe.normalization, kinds=recipe.kinds, depth=recipe.depth)
            for qid, lang in languages.items()}


def quote_share(pairs: Sequence, top_passages: Sequence[set]) -> float:
    """The largest share of a query's adjacent word pairs (PAIRS: its BM25 pair terms, or their ids) that one
    passage of TOP_PASSAGES holds (the pair-term sets of BM25's top QUOTE_DEPTH); 0 under QUOTE_MIN_PAIRS pairs."""
    wanted = set(pairs)
    if len(wanted) < QUOTE_MIN_PAIRS:
        return 0.0
    return max((len(wanted & terms) / len(wanted) for terms in top_passages[:QUOTE_DEPTH]), default=0.0)


def weight_grid(members: int, step: float) -> list[tuple[float, ...]]:
    """Every weight vector on the simplex with coordinates in multiples of STEP."""
    n = round(1 / step)
    if not 0 < step <= 0.5 or abs(n * step - 1) > 1e-9:
        raise ConfigError(f"fusion grid step {step}: must divide 1 (e.g. 0.05, 0.1)")
    return [tuple(c / n for c in combo) + ((n - sum(combo)) / n,)
            for combo in itertools.product(range(n + 1), repeat=members - 1) if sum(combo) <= n]


def choose(members: Sequence[str], kinds: Sequence[str], runs: Sequence[Run], dev, *, normalizations:
           Sequence[str] = NORMALIZATIONS, step: float = 0.05, depth: int = 100, metric: str = "ndcg@10",
           chosen_on: dict[str, Any] | None = None, shares: Mapping[str, float] | None = None
           ) -> tuple[Recipe, dict[str, Any]]:
    """The recipe that maximizes mean METRIC on DEV (held-out-dev gold queries, checked by the caller's
    loader): one normalization for all, weights per query language (and 'default': the best over every
    dev query), the quote route off or at one of QUOTE_SHARES (tried when a member is BM25; SHARES: each dev
    query's quote_share). Ties keep the first in (route off, then QUOTE_SHARES' order; normalization order;
    grid order). Returns it and the sweep."""
    from m3tune.evaluation import metrics

    if not dev:
        raise ConfigError("fusion: no held-out-dev query to choose the weights on")
    for name in normalizations:
        if name not in NORMALIZATIONS:
            raise ConfigError(f"fusion normalization {name!r}: unknown (one of {', '.join(NORMALIZATIONS)})")
    grid = weight_grid(len(members), step)
    langs = sorted({g.language for g in dev})
    groups = {DEFAULT: [g.id for g in dev], **{lang: [g.id for g in dev if g.language == lang] for lang in langs}}
    sweep: dict[str, Any] = {"metric": metric, "step": step, "depth": depth, "queries": {k: len(v) for k, v in
                                                                                         groups.items()},
                             "normalizations": {}}
    best: tuple[float, str, dict[str, tuple[float, ...]], float | None] | None = None
    routes = (None, *QUOTE_SHARES) if "bm25" in kinds else (None,)
    shares = shares or {}
    sweep["quotes"] = {str(t): sum(shares.get(g.id, 0.0) >= t for g in dev) for t in QUOTE_SHARES}
    for route, method in itertools.product(routes, normalizations):
        # every grid point over every dev query once; each language's best is read from the same values
        table = []
        for w in grid:
            recipe = Recipe(tuple(members), tuple(kinds), method, {DEFAULT: w}, depth, quote_share=route)
            values = metrics.per_query(dev, fuse(recipe, runs, {g.id: DEFAULT for g in dev}, shares))
            table.append((w, {group: sum(values[q][metric] for q in ids) / len(ids) for group, ids in groups.items()}))
        chosen = {group: max(table, key=lambda row: row[1][group]) for group in groups}
        weights = {group: row[0] for group, row in chosen.items()}
        # the normalization's figure: each language's queries under their own weights
        n = len(dev)
        overall = sum(chosen[lang][1][lang] * len(groups[lang]) for lang in langs) / n
        sweep["normalizations"][method + (f" + quote route at {route}" if route is not None else "")] = {
            "dev_mean": round(overall, 6),
            "weights": {g: list(w) for g, w in weights.items()},
            "by_language": {g: round(chosen[g][1][g], 6) for g in groups},
            "grid": [{"weights": list(w), **{g: round(v, 6) for g, v in vals.items()}} for w, vals in table]}
        if best is None or overall > best[0] + 1e-12:
            best = (overall, method, weights, route)
    assert best is not None
    recipe = Recipe(tuple(members), tuple(kinds), best[1], best[2], depth, chosen_on=dict(chosen_on or {}),
                    quote_share=best[3])
    sweep["chosen"] = {"normalization": best[1], "quote_share": best[3], "dev_mean": round(best[0], 6)}
    return recipe, sweep
