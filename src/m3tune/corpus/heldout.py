"""The held-out partition: passages training never sees, so the gold's held-out queries measure generalization.

The partition is a fixed list of whole units, chosen so that near-duplicates
stay together (a hadith is usually repeated within its book, and Bukhari and
Muslim put the same report in books of the same subject):

- Quran: whole surahs, each a self-contained text with its own stories;
- hadith: whole books (`meta.book_number`, as the packaged records number
  them), the same subjects in both collections;
- and every passage with word-for-word the same normalized text as one of
  those (its twins), wherever it sits.

About 9% of the packaged corpus (HELD_OUT below; the exact count is in
`data/held_out_v1.txt`'s header). The units' topics are held out too: the
themes marked `held_out: true` in generation/data/themes.yaml are never used
by generation, and the gold's held-out thematic queries are about them.

combine removes these passages from every example (as positives, so as the
source of a query, and as negatives) and drops an example left without a
positive; the counts are in its stats. Evaluation checks each gold query's
`held_out` tag against this list.

The resolved id list ships as `data/held_out_v1.txt` so that combine and
evaluate need neither the corpus packages nor a pass over the corpus; a test
rebuilds it from the definition and checks that it is unchanged:

    python -m m3tune.corpus.heldout --corpus runs/demo/ingest/passages.jsonl
"""

from __future__ import annotations

import argparse
from functools import lru_cache
from pathlib import Path

from m3tune.errors import ConfigError, UserError
from m3tune.records import Passage

VERSION = "held-out-v1"
DATA = Path(__file__).resolve().parent / "data"
PACKAGED = DATA / "held_out_v1.txt"

HELD_OUT = {
    # Yusuf, al-Kahf, Maryam, an-Nur, an-Naml, Luqman, Ya-Sin: 593 verses
    "quran": {"surah": (12, 18, 19, 24, 27, 31, 36)},
    # Food, Aqiqa, Hunting and slaughter, Sacrifices, Drinks, Patients, Medicine, Dress: 581 hadith
    "bukhari": {"book_number": (70, 71, 72, 73, 74, 75, 76, 77)},
    # Hunting, Sacrifices, Drinks, Clothes and adornment, Greetings (with medicine and omens): 798 hadith
    "muslim": {"book_number": (34, 35, 36, 37, 39)},
}


def in_units(p: Passage) -> bool:
    """Whether P lies in one of HELD_OUT's units (twins aside)."""
    rule = HELD_OUT.get(p.collection)
    return bool(rule) and any(p.meta.get(field) in values for field, values in rule.items())


def _groups(passages: list[Passage], kinds: tuple[str, ...]) -> dict[str, list[str]]:
    from m3tune.corpus.neardup import NearDuplicates, compute_groups

    near = NearDuplicates(compute_groups(passages, kinds))
    return {p.id: near.related(p.id, kinds) for p in passages}


def resolve(passages: list[Passage]) -> list[str]:
    """Ids of the partition in PASSAGES: the units' passages and their twins, in corpus order."""
    # v1 is defined by word-for-word twins only, so the shipped list stays valid; the other near-duplicate
    # kinds (m3tune.corpus.neardup) would add 44 passages: combine drops those from training instead.
    same = _groups(passages, ("twin",))
    chosen = {t for p in passages if in_units(p) for t in same[p.id]}
    return [p.id for p in passages if p.id in chosen]


# held-out-v1 split in two (issue [1/6]), by whole units and by subject, so that a choice made on held-out-dev
# cannot have seen a held-out-test passage or topic. Test: the stories of Yusuf, al-Kahf, an-Nur, Ya-Sin; food,
# drink and dress. Dev: Maryam, an-Naml, Luqman; aqiqa, hunting, sacrifice, the sick, medicine, greetings.
TEST_UNITS = {
    "quran": {"surah": (12, 18, 24, 36)},  # 368 verses
    "bukhari": {"book_number": (70, 74, 77)},  # Food, Drinks, Dress
    "muslim": {"book_number": (36, 37)},  # Drinks, Clothes and adornment
}
DEV, TEST = "held-out-dev", "held-out-test"
PACKAGED_TEST = DATA / "held_out_test_v1.txt"


def in_test_units(p: Passage) -> bool:
    rule = TEST_UNITS.get(p.collection)
    return bool(rule) and any(p.meta.get(field) in values for field, values in rule.items())


def resolve_test(passages: list[Passage], partition: frozenset[str]) -> list[str]:
    """Ids of held-out-test in PASSAGES: the partition's passages in TEST_UNITS, with every passage of the
    partition that shares a near-duplicate group (any kind: twin, same body, verse quoted) with one of them, so
    that a report and its repetitions never sit on both sides. The rest of the partition is held-out-dev."""
    from m3tune.corpus.neardup import KINDS

    same = _groups(passages, tuple(KINDS))
    seeds = [p.id for p in passages if p.id in partition and in_test_units(p)]
    chosen, todo = set(seeds), list(seeds)
    while todo:  # the closure: a group can join a test passage to a dev one, and that one to another
        for other in same.get(todo.pop(), ()):
            if other in partition and other not in chosen:
                chosen.add(other)
                todo.append(other)
    return [p.id for p in passages if p.id in chosen]


def split_of(pid: str) -> str | None:
    """held-out-test, held-out-dev, or None (not held out) for the passage PID (the packaged lists)."""
    if pid in load_test():
        return TEST
    return DEV if pid in load() else None


def load_test() -> frozenset[str]:
    """The held-out-test ids (data/held_out_test_v1.txt), a subset of the packaged partition."""
    return _read(PACKAGED_TEST.read_text(encoding="utf-8"), str(PACKAGED_TEST))


def write(ids: list[str], path: Path, what: str = "held out from training") -> None:
    header = f"# {VERSION}: {len(ids)} passage ids {what} (m3tune.corpus.heldout); one id a line\n"
    path.write_text(header + "".join(i + "\n" for i in ids), encoding="utf-8")


@lru_cache(maxsize=4)
def _read(text: str, shown: str) -> frozenset[str]:
    ids = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if any(c.isspace() for c in line) or ":" not in line:
            raise UserError(f"{shown}:{n}: expected one passage id (like quran:12:4) a line, got {line[:60]!r}")
        ids.append(line)
    if not ids:
        # an empty file (a failed export, the wrong file) would silently hold nothing out of training
        raise ConfigError(f"held_out {shown}: the list has no passage ids; to hold nothing out, set held_out: null "
                          "in the config")
    return frozenset(ids)


def check_known(held: frozenset[str], known: set[str] | frozenset[str], uri: str | None) -> None:
    """A user's list (not the packaged one, which covers the whole packaged corpus of which a run may ingest
    a part) must name passages of the run's corpus: an id with a typo holds nothing out, without a word."""
    if uri in (None, "packaged"):
        return
    unknown = sorted(held - set(known))
    if unknown:
        raise ConfigError(f"held_out {uri}: {len(unknown)} of its {len(held)} ids are not in the run's corpus "
                          f"(first: {unknown[0]}); fix the list")


def load(uri: str | None = "packaged") -> frozenset[str]:
    """The held-out ids of URI (a file of ids, one a line; 'packaged': data/held_out_v1.txt; None: none)."""
    if uri is None:
        return frozenset()
    if uri == "packaged":
        return _read(PACKAGED.read_text(encoding="utf-8"), str(PACKAGED))
    from m3tune.storage import split_uri

    store, name = split_uri(uri)
    if not store.exists(name):
        raise UserError(f"held-out list not found: {uri}")
    return _read(store.read_bytes(name).decode("utf-8"), uri)


def digest(uri: str | None) -> str | None:
    """sha256 of the list URI names (for manifests), None when there is none."""
    from m3tune.storage import LocalStore, file_digest, split_uri

    if uri is None:
        return None
    store, name = (LocalStore(DATA), PACKAGED.name) if uri == "packaged" else split_uri(uri)
    return "sha256:" + file_digest(store, name)


def main() -> None:
    from m3tune.jsonl import read_jsonl

    parser = argparse.ArgumentParser(description="Write the held-out partition's id list from a full corpus.")
    parser.add_argument("--corpus", required=True, help="passages.jsonl of a full ingest (every packaged source)")
    parser.add_argument("--out", default=str(PACKAGED), help="file to write (default: the packaged list)")
    args = parser.parse_args()
    with open(args.corpus, "rb") as f:
        passages = list(read_jsonl(f, Passage, name=args.corpus))
    ids = resolve(passages)
    write(ids, Path(args.out))
    test = resolve_test(passages, frozenset(ids))
    test_out = Path(args.out).with_name(PACKAGED_TEST.name)
    write(test, test_out, "of the held-out partition in held-out-test (the rest is held-out-dev)")
    print(f"{len(ids)} of {len(passages)} passages held out -> {args.out}; {len(test)} of them held-out-test "
          f"-> {test_out}")


if __name__ == "__main__":
    main()
