"""How many examples to take from each cell so that every share target holds: an integer program.

A cell is one combination of the four balanced attributes (Arabic or not,
conceptual or not, exact or not, Quran or not; conceptual and exact are
query types, so no row is both), so a choice of counts per cell fixes every
share. "The largest output whose shares all lie within target ± tolerance"
is then a small integer linear program (16 variables, 2 constraints a
target). It is
solved exactly with scipy's `milp` (HiGHS) rather than by a greedy
down-sampler, which can stop short of the optimum when targets interact.
A second solve, at that size, puts the shares as close to their targets as
the input allows, so a later split of the output stays inside the band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

ATTRIBUTES = ("arabic", "conceptual", "exact", "quran")
# cell index = arabic * 8 + conceptual * 4 + exact * 2 + quran
CELLS = list(product((0, 1), repeat=len(ATTRIBUTES)))
# Targets held only when the input has a row of their kind: exact quotes come from one step
# (generate-exact); outside data (FlagEmbedding files, older runs) has none, and is not refused for it.
OPTIONAL = ("exact",)


def cell_of(arabic: bool, conceptual: bool, quran: bool, exact: bool = False) -> int:
    return int(arabic) * 8 + int(conceptual) * 4 + int(exact) * 2 + int(quran)


def cell_for(language: str, qtype: str, source: str) -> int:
    """The cell of an example with these facts (records.example_facts)."""
    return cell_of(language == "ar", qtype == "conceptual", source == "quran", qtype == "exact")


@dataclass(frozen=True)
class Target:
    name: str  # one of ATTRIBUTES
    share: float
    tolerance: float

    @property
    def low(self) -> float:
        return max(0.0, self.share - self.tolerance)

    @property
    def high(self) -> float:
        return min(1.0, self.share + self.tolerance)


def _member(cell: int, attribute: str) -> int:
    return CELLS[cell][ATTRIBUTES.index(attribute)]


def applicable(targets: list[Target], available: list[int]) -> list[Target]:
    """TARGETS without the OPTIONAL ones that no available row has the attribute of."""
    return [t for t in targets if t.name not in OPTIONAL
            or any(n and _member(c, t.name) for c, n in enumerate(available))]


def _solve(available: list[int], targets: list[Target], cap: int | None, size: int | None = None) -> list[int]:
    """Counts per cell: the largest total (or, with SIZE, that total closest to the targets)."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    n = len(available)
    m = len(targets)
    # variables: k_0..k_7 (counts), then d_1..d_m (|share deviation| * size) for the second solve
    rows, low, high = [], [], []
    for t in targets:
        a = np.array([_member(c, t.name) for c in range(n)], dtype=float)
        # low * K <= sum_A k <= high * K, with K = sum k
        rows.append(np.concatenate([a - t.low, np.zeros(m)]))
        low.append(0.0)
        high.append(np.inf)
        rows.append(np.concatenate([a - t.high, np.zeros(m)]))
        low.append(-np.inf)
        high.append(0.0)
    total = np.concatenate([np.ones(n), np.zeros(m)])
    if size is None:
        if cap is not None:
            rows.append(total)
            low.append(0.0)
            high.append(float(cap))
        objective = -total
    else:
        rows.append(total)
        low.append(float(size))
        high.append(float(size))
        for j, t in enumerate(targets):  # d_j >= |sum_A k - share * size|
            a = np.array([_member(c, t.name) for c in range(n)], dtype=float)
            e = np.zeros(m)
            e[j] = 1.0
            rows.append(np.concatenate([a, -e]))
            low.append(-np.inf)
            high.append(t.share * size)
            rows.append(np.concatenate([a, e]))
            low.append(t.share * size)
            high.append(np.inf)
        objective = np.concatenate([np.zeros(n), np.ones(m)])
    result = milp(objective, constraints=LinearConstraint(np.array(rows), low, high),
                  integrality=np.concatenate([np.ones(n), np.zeros(m)]),
                  bounds=Bounds(np.zeros(n + m), np.concatenate([np.array(available, dtype=float),
                                                                 np.full(m, np.inf)])))
    if result.x is None:  # cannot happen (all zeros is feasible), but never trust a solver's silence
        raise RuntimeError(f"balancing failed: {result.message}")
    return [int(round(v)) for v in result.x[:n]]


def choose_counts(available: list[int], targets: list[Target], cap: int | None = None) -> list[int]:
    """Per cell, how many examples to keep: the largest output meeting every target (all zeros: none)."""
    counts = _solve(available, targets, cap)
    size = sum(counts)
    return _solve(available, targets, cap, size) if size else counts


def shares(counts: list[int]) -> dict[str, float]:
    total = sum(counts)
    return {a: (sum(k for c, k in enumerate(counts) if _member(c, a)) / total if total else 0.0) for a in ATTRIBUTES}


def shortfall(available: list[int], targets: list[Target], cap: int | None = None) -> list[str]:
    """Why no output meets the targets: for each target that blocks, what the largest output without it
    looks like, and how many examples of which kind would bring it into its band."""
    reasons = []
    for t in targets:
        counts = _solve(available, [o for o in targets if o.name != t.name], cap)
        size = sum(counts)
        if not size:
            continue
        have = sum(k for c, k in enumerate(counts) if _member(c, t.name))
        share = have / size
        band = f"{t.low:.0%}-{t.high:.0%}"
        if share < t.low:  # x more with the attribute: (have + x) / (size + x) >= low
            fix = (f"about {math.ceil((t.low * size - have) / (1 - t.low)):,} more {t.name} examples would bring "
                   f"it into the band" if t.low < 1 else f"only {t.name} examples may be kept")
        elif share > t.high:  # y more without it: have / (size + y) <= high
            fix = (f"about {math.ceil(have / t.high - size):,} more examples that are not {t.name} would bring it "
                   f"into the band" if t.high > 0 else f"no {t.name} example may be kept")
        else:
            continue
        reasons.append(f"without the {t.name} target, the largest balanced output ({size:,} examples) is "
                       f"{share:.1%} {t.name}, outside {band}: {fix}")
    return reasons or ["the targets cannot be met together: input shares are "
                       + ", ".join(f"{a} {s:.1%}" for a, s in shares(available).items())]


def bottlenecks(available: list[int], counts: list[int]) -> list[str]:
    """The kinds of example the chosen output uses up entirely: more of them is what would let it grow."""
    names = []
    for cell, (k, n) in enumerate(zip(counts, available)):
        if n and k == n:
            a, c, e, q = CELLS[cell]
            kind = "conceptual" if c else "exact" if e else "other-type"
            names.append(f"{'Arabic' if a else 'English'} {kind} {'Quran' if q else 'non-Quran'} ({n:,})")
    return names
