"""Training examples, the seeded batch sampler that keeps in-batch negatives true, and the collator.

In-batch negatives are only negatives if no two examples of a batch share a
query or a positive passage: the sampler builds every global batch (all
processes' examples of one micro-step) so that they never do. It depends on
(seed, epoch) alone, so a restarted run rebuilds the same order and skips
the batches it has done. Passages are identified by their id (a text digest
where a file has no ids), so the loss can also mask a hard negative of one
query that happens to be another query's positive.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass

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

    @property
    def conflict_keys(self) -> frozenset[str]:
        # the query normalized as combine normalizes it: two spellings of one query are one query in both
        return frozenset(("q:" + normalize(self.query),) + tuple("p:" + k for k in self.pos_keys))


def to_train_example(ex: Example) -> TrainExample:
    pos_ids = ex.pos_ids or [None] * len(ex.pos)
    neg_ids = ex.neg_ids or [None] * len(ex.neg)
    pos_keys = tuple(passage_key(i, t) for i, t in zip(pos_ids, ex.pos))
    keep = [(t, passage_key(i, t)) for i, t in zip(neg_ids, ex.neg)]
    keep = [(t, k) for t, k in keep if k not in pos_keys]  # a negative that is a positive would teach the opposite
    return TrainExample(ex.query, tuple(ex.pos), pos_keys, tuple(t for t, _ in keep), tuple(k for _, k in keep))


def read_examples(store, rel: str) -> list[TrainExample]:
    from m3tune.jsonl import read_jsonl

    if not store.exists(rel):
        raise UserError(f"{store.uri_of(rel)} does not exist: run the combine step first")
    if store.size(rel) == 0:
        raise UserError(f"{store.uri_of(rel)} is empty: train needs training examples and a validation split "
                        "(combine --validation-split > 0) to validate by retrieval and keep the best weights")
    with store.open_read(rel) as f:
        return [to_train_example(ex) for ex in read_jsonl(f, Example, name=store.uri_of(rel))]


def global_batches(examples: list[TrainExample], size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches of SIZE example indices, none sharing a query or a positive.

    Greedy over a seeded permutation: each example joins the oldest open batch
    it does not conflict with, a full batch is closed, and batches still open
    at the end are dropped (every process needs whole batches). Conflicting
    examples (queries about one theme share tens of positives) just land in
    different batches.
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
    return done


@dataclass
class Batch:
    """One process's share of a global batch: token tensors and the keys the loss masks with."""

    queries: dict
    passages: dict  # positives first (one per query), then `negatives` slots per query
    pos_keys: "object"  # (B, P) int64 positive keys of each query, -1 padded
    col_keys: "object"  # (B * (1 + negatives),) int64 key of each passage column
    col_valid: "object"  # (B * (1 + negatives),) bool: False for empty negative slots


def collate(examples: Iterable[TrainExample], indices: list[int], tokenizer, *, negatives: int, seed: int, epoch: int,
            query_max_length: int, passage_max_length: int, profile=None) -> Batch:
    """Tokenize one process's examples. Each query gets one positive and up to NEGATIVES distinct hard
    negatives, chosen per (seed, epoch, example) so that any process count picks the same ones; slots an
    example cannot fill hold an empty text masked out of the loss (fixed shapes for the all-gather). Texts
    get the model's prompts, as the Encoder gives them at index and evaluation time."""
    import torch

    from m3tune.encoder.profiles import Profile

    profile = profile or Profile(strip_marks=False)
    examples = list(examples)
    queries, positives, negs, pos_keys, pos_cols, neg_cols, valid = [], [], [], [], [], [], []
    for idx, ex in zip(indices, examples):
        rng = random.Random(f"{seed}:{epoch}:{idx}")
        p = rng.randrange(len(ex.pos))
        queries.append(profile.prepare(ex.query, queries=True))
        positives.append(profile.prepare(ex.pos[p], queries=False))
        pos_cols.append(key_hash(ex.pos_keys[p]))
        pos_keys.append([key_hash(k) for k in ex.pos_keys])
        chosen = rng.sample(range(len(ex.negs)), min(negatives, len(ex.negs)))
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


def validation_set(examples: list[TrainExample], extra_corpus: dict[str, str] | None = None) -> ValidationSet:
    """Queries with all their positive keys; the corpus is every distinct pos/neg passage (plus EXTRA_CORPUS)."""
    corpus: dict[str, str] = dict(extra_corpus or {})
    for ex in examples:
        corpus.update(zip(ex.pos_keys, ex.pos))
        corpus.update(zip(ex.neg_keys, ex.negs))
    return ValidationSet([ex.query for ex in examples], [set(ex.pos_keys) for ex in examples],
                         list(corpus), list(corpus.values()))
