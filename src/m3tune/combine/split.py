"""Train / validation split grouped by positive passage and by query.

Two examples that share a positive passage or a (normalized) query end up in
the same group (union-find over those keys), and a group goes whole to one
side: no validation query shares a positive, or its text, with a training
query, so validation measures retrieval of passages the model was not
trained to find. Groups are visited in a seeded hash order; one goes to
validation while validation is below its size and moving it keeps every
training share inside its band. Thematic queries with many positives can
join much of the data into one group; a group larger than what validation
still needs stays in training.

Positive keys include the near-duplicates of the positives (the ingest's
groups), so a hadith and its copy under another chain, or a verse and a
hadith quoting it, never sit on both sides.

Stratified by query type: first, for each type of the data (question,
keyword, conceptual, exact), the first group in the seeded order holding
one goes to validation (when it fits the size and the bands), then the
rest is filled as above; a type no group could bring is reported by the
caller.
"""

from __future__ import annotations

import hashlib

from m3tune.combine.balance import ATTRIBUTES, CELLS, Target


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smaller key is the root: an order-free result


def split(keys: list[list[str]], cells: list[int], *, fraction: float, seed: int,
          targets: list[Target], strata: list[str] | None = None) -> list[bool]:
    """Per example (its group keys, its balance cell, its STRATUM: query type): True when it goes to validation."""
    uf = _UnionFind()
    for ks in keys:
        for k in ks[1:]:
            uf.union(ks[0], k)
    groups: dict[str, list[int]] = {}
    for i, ks in enumerate(keys):
        groups.setdefault(uf.find(ks[0]), []).append(i)
    want = max(1, round(fraction * len(keys))) if fraction else 0
    in_train = [sum(1 for c in cells if CELLS[c][a]) for a in range(len(ATTRIBUTES))]
    train_size = len(keys)
    validation = [False] * len(keys)
    taken = 0

    def order(root: str) -> bytes:
        return hashlib.blake2b(f"{seed}\x1f{root}".encode(), digest_size=8).digest()

    ordered = sorted(groups, key=order)

    def move(members: list[int]) -> bool:
        nonlocal taken, train_size, in_train
        if validation[members[0]] or taken + len(members) > want or len(members) >= train_size:
            return False
        moved = [sum(1 for i in members if CELLS[cells[i]][a]) for a in range(len(ATTRIBUTES))]
        size = train_size - len(members)
        if all(t.low - 1e-9 <= (in_train[ATTRIBUTES.index(t.name)] - moved[ATTRIBUTES.index(t.name)]) / size
               <= t.high + 1e-9 for t in targets):
            for i in members:
                validation[i] = True
            taken += len(members)
            train_size = size
            in_train = [x - m for x, m in zip(in_train, moved)]
            return True
        return False

    if want and strata is not None:
        for stratum in sorted(set(strata)):
            for root in ordered:
                if any(strata[i] == stratum for i in groups[root]) and move(groups[root]):
                    break
    for root in ordered:
        if taken >= want:
            break
        move(groups[root])
    return validation
