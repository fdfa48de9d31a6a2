"""The gold standard: evaluation queries with their relevant passages, validated against the corpus.

The packaged set (`data/gold_standard_v3.jsonl`, built by `m3tune.gold.build`
from the real corpus; rules in `data/README.md`) is the default; any file of
GoldQuery records can replace it. A malformed line, a duplicate query id or
a relevant id missing from the corpus stops the evaluation with the file,
line and field: a gold passage the models cannot return would silently
lower every score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from m3tune.corpus.heldout import DEV, TEST
from m3tune.errors import UserError
from m3tune.jsonl import RecordError, read_jsonl_numbered
from m3tune.records import GoldQuery

PACKAGED = Path(__file__).resolve().parent / "data" / "gold_standard_v3.jsonl"
# Gold v4 (m3tune.gold.build_v4): held-out-test, read once per reported result, and held-out-dev, where choices are made.
V4_TEST, V4_DEV = "packaged:gold_v4_test.jsonl", "packaged:gold_v4_dev.jsonl"
PACKAGED_NAMES = ("gold_standard_v3.jsonl", "gold_dev_v3.jsonl", "gold_confirm_v3.jsonl", "gold_v4_test.jsonl",
                  "gold_v4_dev.jsonl")


def gold_location(test_set: str | None) -> tuple:
    """(store, file name, URI shown) of TEST_SET (a path or URI; None: the packaged set)."""
    from m3tune.storage import LocalStore, split_uri

    if test_set is None:
        return LocalStore(PACKAGED.parent), PACKAGED.name, str(PACKAGED)
    if test_set.startswith("packaged:"):  # a gold file shipped with m3tune, by name: packaged:gold_v4_test.jsonl
        name = test_set.removeprefix("packaged:")
        if name not in PACKAGED_NAMES:
            raise UserError(f"test set {test_set!r}: no such packaged gold; packaged: {', '.join(PACKAGED_NAMES)}")
        return LocalStore(PACKAGED.parent), name, str(PACKAGED.parent / name)
    store, name = split_uri(test_set)
    return store, name, test_set


def gold_digest(test_set: str | None) -> str:
    from m3tune.storage import file_digest

    store, name, _ = gold_location(test_set)
    return file_digest(store, name)


def load_gold(test_set: str | None, passage_ids: set[str] | None = None, *,
              held_out: frozenset[str] | None = None, purpose: Literal["report", "select"] = "report"
              ) -> list[GoldQuery]:
    """The gold queries of TEST_SET, each relevant id checked against PASSAGE_IDS, and each held_out and split
    tag against the partition HELD_OUT, when given. PURPOSE 'select' refuses any row not in held-out-dev."""
    if purpose not in ("report", "select"):
        raise ValueError(f"purpose {purpose!r}: expected 'report' or 'select'")
    store, name, shown = gold_location(test_set)
    if not store.exists(name):
        raise UserError(f"test set not found: {shown}")
    out: list[GoldQuery] = []
    seen: dict[str, int] = {}
    with store.open_read(name) as f:
        for line, _, g in read_jsonl_numbered(f, GoldQuery, name=shown):
            if g.id in seen:
                raise RecordError(shown, line, "id", f"duplicate query id {g.id!r} (first on line {seen[g.id]})")
            seen[g.id] = line
            if passage_ids is not None:
                missing = [pid for pid in g.relevant_ids if pid not in passage_ids]
                if missing:
                    raise RecordError(shown, line, "relevant_ids", f"{', '.join(missing[:5])} not in the corpus "
                                      f"({len(passage_ids):,} passages): wrong corpus, or a wrong id")
            if held_out is not None and g.held_out is not None:
                _check_tag(g, held_out, shown, line)
            if held_out is not None and g.split in (TEST, DEV):
                _check_split(g, shown, line)
            if purpose == "select" and g.split != DEV:
                raise RecordError(shown, line, "split", f"query {g.id!r} is {g.split or 'untagged'}: choices "
                                  f"(configs, weights, thresholds) are made on {DEV} queries only "
                                  f"(packaged: {V4_DEV}); the test set is read once per reported result")
            out.append(g)
    return out


def load_for_selection(test_set: str | None, passage_ids: set[str] | None = None) -> list[GoldQuery]:
    """The gold queries of TEST_SET for a script that chooses something on them (BM25's k1 and b, fusion
    weights, a recipe): every row must be tagged held-out-dev, so no choice can be made on the test set."""
    from m3tune.corpus import heldout

    return load_gold(test_set, passage_ids, held_out=heldout.load(), purpose="select")


def _check_split(g: GoldQuery, shown: str, line: int) -> None:
    """split: held-out-test / held-out-dev needs every relevant passage in that part of the partition."""
    from m3tune.corpus.heldout import split_of

    wrong = [pid for pid in g.relevant_ids if split_of(pid) != g.split]
    if wrong:
        raise RecordError(shown, line, "split", f"query {g.id!r} is tagged {g.split}, but {len(wrong)} of its "
                          f"{len(g.relevant_ids)} relevant passages ({', '.join(wrong[:3])}) lie outside that "
                          "part of the held-out partition")


def _check_tag(g: GoldQuery, held_out: frozenset[str], shown: str, line: int) -> None:
    """held_out: true needs every relevant passage in the partition; false needs one outside it (a query whose
    passages all lie in it is held out, whatever its tag says)."""
    outside = [pid for pid in g.relevant_ids if pid not in held_out]
    if g.held_out and outside:
        raise RecordError(shown, line, "held_out", f"query {g.id!r} is tagged held out, but {len(outside)} of its "
                          f"{len(g.relevant_ids)} relevant passages ({', '.join(outside[:3])}) are outside the "
                          "held-out partition: training may see them")
    if not g.held_out and not outside:
        raise RecordError(shown, line, "held_out", f"query {g.id!r} is tagged seen, but every relevant passage "
                          "is in the held-out partition: tag it held_out: true")
