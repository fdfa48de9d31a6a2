"""Training examples, the seeded batch sampler that keeps in-batch negatives true, and the collator.

In-batch negatives are only negatives if no two examples of a batch share a
query or a positive passage: the sampler builds every global batch (all
processes' examples of one micro-step) so that they never do. It depends on
(seed, epoch) alone, so a restarted run rebuilds the same order and skips
the batches it has done. Passages are identified by their id (a text digest
where a file has no ids), so the loss can also mask a hard negative of one
query that happens to be another query's positive.

An example carries every positive and the near-duplicates of them
(`related_ids`, from the ingest's groups): each epoch it shows one positive
and NEGATIVES drawn from its mined pool (hard / semi-hard / random shares),
both chosen by (seed, epoch, example index) alone, so a resumed run draws
the same ones; every other positive and near-duplicate is masked in the loss.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from collections import Counter
from dataclasses import dataclass, field

from m3tune.arabic import normalize
from m3tune.errors import UserError
from m3tune.records import Example


def passage_key(pid: str | None, text: str) -> str:
    return pid if pid else "text:" + hashlib.sha1(text.encode("utf-8")).hexdigest()


def key_hash(key: str) -> int:
    """A stable 62-bit integer for a key (loss masks compare ints on the device, not strings)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") >> 2


@dataclass(frozen=True)
class TrainExample:
    query: str
    pos: tuple[str, ...]
    pos_keys: tuple[str, ...]
    negs: tuple[str, ...]
    neg_keys: tuple[str, ...]
    neg_kinds: tuple[str, ...] = ()  # hard / semi_hard / random per negative; empty: unlabelled
    related_keys: tuple[str, ...] = ()  # near-duplicates of the positives: never negatives
    facts: tuple[str, str, str] = ("unknown", "unknown", "unknown")  # (language, type, source), for drop reports

    @property
    def masked_keys(self) -> tuple[str, ...]:
        """Every passage this query must not be scored against as a negative."""
        return self.pos_keys + self.related_keys

    @property
    def conflict_keys(self) -> frozenset[str]:
        # the query normalized as combine normalizes it: two spellings of one query are one query in both
        return frozenset(("q:" + normalize(self.query),) + tuple("p:" + k for k in self.masked_keys))


def to_train_example(ex: Example) -> TrainExample:
    from m3tune.records import example_facts

    pos_ids = ex.pos_ids or [None] * len(ex.pos)
    neg_ids = ex.neg_ids or [None] * len(ex.neg)
    kinds = ex.neg_kinds or [""] * len(ex.neg)
    pos_keys = tuple(passage_key(i, t) for i, t in zip(pos_ids, ex.pos))
    related = tuple(ex.related_ids or ())
    keep = [(t, passage_key(i, t), kind) for i, t, kind in zip(neg_ids, ex.neg, kinds)]
    # a negative that is a positive (or its near-duplicate) would teach the opposite
    keep = [x for x in keep if x[1] not in pos_keys and x[1] not in related]
    return TrainExample(ex.query, tuple(ex.pos), pos_keys, tuple(t for t, _, _ in keep), tuple(k for _, k, _ in keep),
                        tuple(kind for _, _, kind in keep) if ex.neg_kinds else (), related, example_facts(ex))


def read_examples(store, rel: str) -> list[TrainExample]:
    from m3tune.jsonl import read_jsonl

    if not store.exists(rel):
        raise UserError(f"{store.uri_of(rel)} does not exist: run the combine step first")
    if store.size(rel) == 0:
        raise UserError(f"{store.uri_of(rel)} is empty: train needs training examples and a validation split "
                        "(combine --validation-split > 0) to validate by retrieval and keep the best weights")
    with store.open_read(rel) as f:
        return [to_train_example(ex) for ex in read_jsonl(f, Example, name=store.uri_of(rel))]


class Batches(list):
    """An epoch's batches (a list of index lists) with `report`: what the sampler could not place."""

    report: dict


def global_batches(examples: list[TrainExample], size: int, *, seed: int, epoch: int,
                   max_drop_share: float = 1.0) -> Batches:
    """The epoch's batches of SIZE example indices, none sharing a query, a positive or a near-duplicate.

    Greedy over a seeded permutation: each example joins the oldest open batch
    it does not conflict with, a full batch is closed. Conflicting examples
    (queries about one theme share tens of positives) land in different
    batches. Batches still open at the end are then merged where no two of
    their examples conflict (first fit, largest first); what still does not
    make a whole batch is left out of this epoch (every process needs whole
    batches). Leftovers are not carried over: the next epoch is a new
    permutation, so an example left out once is rarely left out again, and
    carrying would make epoch E's plan depend on every earlier one.

    `report` counts the examples left out by type, language and source; more
    than MAX_DROP_SHARE of one type's examples left out is an error (the
    sampler would undo combine's balance).
    """
    order = list(range(len(examples)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    keys = [examples[i].conflict_keys for i in range(len(examples))]
    open_batches: list[tuple[list[int], set[str]]] = []
    done: list[list[int]] = []
    for i in order:
        for members, taken in open_batches:
            if taken.isdisjoint(keys[i]):
                members.append(i)
                taken |= keys[i]
                if len(members) == size:
                    done.append(members)
                    open_batches = [b for b in open_batches if b[0] is not members]
                break
        else:
            if size == 1:
                done.append([i])
            else:
                open_batches.append(([i], set(keys[i])))
    left: list[tuple[list[int], set[str]]] = []
    for members, taken in sorted(open_batches, key=lambda b: -len(b[0])):
        for target in left:
            if len(target[0]) + len(members) <= size and target[1].isdisjoint(taken):
                target[0].extend(members)
                target[1].update(taken)
                break
        else:
            left.append((list(members), set(taken)))
    dropped: list[int] = []
    for members, _ in left:
        if len(members) == size:
            done.append(members)
        else:
            dropped += members
    out = Batches(done)
    out.report = drop_report(examples, dropped, max_drop_share=max_drop_share, epoch=epoch)
    return out


def drop_report(examples: list[TrainExample], dropped: list[int], *, max_drop_share: float, epoch: int) -> dict:
    """{"dropped": n, "by_type"/"by_language"/"by_source": {value: n}}; an error past MAX_DROP_SHARE of a type."""
    report: dict = {"examples": len(examples), "dropped": len(dropped)}
    for n, name in enumerate(("language", "type", "source")):
        report[f"by_{name}"] = dict(sorted(Counter(examples[i].facts[n] for i in dropped).items()))
    totals = Counter(ex.facts[1] for ex in examples)
    for kind, lost in report["by_type"].items():
        if lost / totals[kind] > max_drop_share:
            raise UserError(f"epoch {epoch}: the sampler could place {lost} of the {totals[kind]} '{kind}' examples "
                            f"in no batch free of shared positives ({lost / totals[kind]:.0%} > max_drop_share "
                            f"{max_drop_share:.0%}): lower --batch-size, or add examples of other themes")
    return report


@dataclass
class Batch:
    """One process's share of a global batch: token tensors and the keys the loss masks with."""

    queries: dict
    passages: dict  # positives first (one per query), then `negatives` slots per query
    pos_keys: "object"  # (B, P) int64 keys of each query's positives and their near-duplicates, -1 padded
    col_keys: "object"  # (B * (1 + negatives),) int64 key of each passage column
    col_valid: "object"  # (B * (1 + negatives),) bool: False for empty negative slots


NEGATIVE_KINDS = ("hard", "semi_hard", "random")


def draw_negatives(ex: TrainExample, n: int, rng: random.Random,
                   mix: tuple[float, float, float] = (0.6, 0.3, 0.1)) -> list[int]:
    """Indices of N distinct negatives of EX's pool, drawn with RNG: MIX shares of hard / semi-hard / random
    (largest remainders), a kind short of its share filled from the others; an unlabelled pool is drawn
    uniformly (FlagEmbedding's `train_group_size - 1` random draws from `neg`)."""
    n = min(n, len(ex.negs))
    if not ex.neg_kinds:
        return rng.sample(range(len(ex.negs)), n)
    pools = {k: [j for j, kind in enumerate(ex.neg_kinds) if kind == k] for k in NEGATIVE_KINDS}
    exact = [n * w / (sum(mix) or 1) for w in mix]
    want = [int(x) for x in exact]
    for j in sorted(range(3), key=lambda j: want[j] - exact[j])[:n - sum(want)]:
        want[j] += 1
    chosen: list[int] = []
    for k, w in zip(NEGATIVE_KINDS, want):
        chosen += rng.sample(pools[k], min(w, len(pools[k])))
    taken = set(chosen)
    rest = [j for j in range(len(ex.negs)) if j not in taken]
    chosen += rng.sample(rest, n - len(chosen))
    return chosen


def collate(examples: Iterable[TrainExample], indices: list[int], tokenizer, *, negatives: int, seed: int, epoch: int,
            query_max_length: int, passage_max_length: int, profile=None,
            negative_mix: tuple[float, float, float] = (0.6, 0.3, 0.1), positive_pool: int | None = None) -> Batch:
    """Tokenize one process's examples. Each query gets one of its positives and up to NEGATIVES distinct
    negatives of its pool (NEGATIVE_MIX: hard / semi-hard / random shares), chosen per (seed, epoch, example)
    so that any process count picks the same ones; slots an example cannot fill hold an empty text masked
    out of the loss (fixed shapes for the all-gather). The positive is drawn from the first POSITIVE_POOL
    (None: all), as generators list them best first; every positive and near-duplicate of a query is
    masked in its row. Texts get the model's prompts, as the Encoder gives them at index and evaluation
    time."""
    import torch

    from m3tune.encoder.profiles import Profile

    profile = profile or Profile(strip_marks=False)
    examples = list(examples)
    queries, positives, negs, pos_keys, pos_cols, neg_cols, valid = [], [], [], [], [], [], []
    for idx, ex in zip(indices, examples):
        rng = random.Random(f"{seed}:{epoch}:{idx}")
        p = rng.randrange(min(len(ex.pos), positive_pool or len(ex.pos)))
        queries.append(profile.prepare(ex.query, queries=True))
        positives.append(profile.prepare(ex.pos[p], queries=False))
        pos_cols.append(key_hash(ex.pos_keys[p]))
        pos_keys.append([key_hash(k) for k in ex.masked_keys])
        chosen = draw_negatives(ex, negatives, rng, negative_mix)
        for j in range(negatives):
            if j < len(chosen):
                negs.append(profile.prepare(ex.negs[chosen[j]], queries=False))
                neg_cols.append(key_hash(ex.neg_keys[chosen[j]]))
                valid.append(True)
            else:
                negs.append("")
                neg_cols.append(-1)
                valid.append(False)
    width = max(len(k) for k in pos_keys)
    pos_keys = [k + [-1] * (width - len(k)) for k in pos_keys]
    from m3tune.encoder.model import tokenize

    q, p = tokenize(tokenizer, queries, query_max_length), tokenize(tokenizer, positives + negs, passage_max_length)
    return Batch(q, p, torch.tensor(pos_keys, dtype=torch.long),
                 torch.tensor(pos_cols + neg_cols, dtype=torch.long),
                 torch.tensor([True] * len(positives) + valid, dtype=torch.bool))


@dataclass
class ValidationSet:
    queries: list[str]
    relevant: list[set[str]]
    corpus_keys: list[str]
    corpus_texts: list[str]
    types: tuple[str, ...] = ()  # each query's type (question, keyword, conceptual, exact), for per-type metrics

    def type_counts(self) -> dict[str, int]:
        from collections import Counter

        return dict(sorted(Counter(self.types).items()))


def validation_set(examples: list[TrainExample], extra_corpus: dict[str, str] | None = None, *,
                   types: list[str] | None = None, with_negatives: bool = True) -> ValidationSet:
    """Queries with every positive key (all relevant); the corpus is every distinct positive, the mined negatives
    WITH_NEGATIVES, and EXTRA_CORPUS (a sample of the run's corpus: retrieval, not reranking). TYPES: each
    example's query type."""
    if types is not None and len(types) != len(examples):
        raise ValueError(f"{len(types)} types for {len(examples)} validation examples")
    corpus: dict[str, str] = dict(extra_corpus or {})
    for ex in examples:
        corpus.update(zip(ex.pos_keys, ex.pos))
        if with_negatives:
            corpus.update(zip(ex.neg_keys, ex.negs))
    return ValidationSet([ex.query for ex in examples], [set(ex.pos_keys) for ex in examples],
                         list(corpus), list(corpus.values()), tuple(types or ["unknown"] * len(examples)))
