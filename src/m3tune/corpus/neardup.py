"""Near-duplicate groups of the corpus, computed once by `ingest` and published as `ingest/groups.jsonl`.

Three kinds, each a list of passage ids that must never be each other's
negatives (mining's filters, training's loss masks) and that stay on one side
of a split (combine):

- `twin`: word for word the same normalized text (`text_plain`). Hadith
  collections repeat reports; Bukhari and Muslim share many.
- `matn`: the same body of a hadith under another chain of narrators. The
  packaged text does not mark where the chain (isnad) ends, and guessing it
  from narrator names is fragile, so the rule is conservative: the body is
  what follows the first quotation mark (the reported words, which the
  digitisation quotes), normalized, when it has at least MIN_MATN_WORDS
  words. Hadith without a quotation mark, or with a shorter quoted part, get
  no body and join no `matn` group (they can still be twins).
- `verse_quote`: a Quran verse of at least MIN_VERSE_WORDS normalized words
  whose whole normalized text occurs, word-bounded, inside a hadith; the
  group is the verse and every hadith quoting it. Shorter verses ("الحمد لله
  رب العالمين") are common phrases, not quotations.

A passage may sit in several groups (a hadith quoting two verses); `related`
joins them. Groups are sorted (kind, then first id), each group's ids in
corpus order, so the same corpus always gives the same file.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from m3tune.arabic import normalize
from m3tune.records import Passage

KINDS = ("twin", "matn", "verse_quote")
MIN_MATN_WORDS = 8
MIN_VERSE_WORDS = 6
_QUOTE = re.compile('["\u201c\u201d\u00ab\u00bb]')


def hadith_body(p: Passage) -> str | None:
    """A hadith's reported words as written (`text` after its first quotation mark, without the chain of
    narrators) where the rule in the module docstring finds a body; None for a verse or a hadith without one."""
    if p.source != "hadith":
        return None
    m = _QUOTE.search(p.text)
    if m is None:
        return None
    quoted = p.text[m.end():]
    return quoted if len(normalize(quoted).split()) >= MIN_MATN_WORDS else None


def body(p: Passage) -> str:
    """The normalized text a passage is compared by: a hadith's quoted body (without its chain) where the rule
    in the module docstring finds one, else the whole text_plain."""
    quoted = hadith_body(p)
    return p.text_plain if quoted is None else normalize(quoted)


def _matn(p: Passage) -> str | None:
    if p.source != "hadith" or _QUOTE.search(p.text) is None:
        return None
    b = body(p)
    return b if b != p.text_plain else None


def compute_groups(passages: list[Passage], kinds: Iterable[str] = KINDS) -> list[dict]:
    """[{"kind", "ids"}] over PASSAGES: every group of KINDS of at least two passages, in a fixed order."""
    kinds = tuple(kinds)
    order = {p.id: n for n, p in enumerate(passages)}
    out: list[dict] = []
    by_text: dict[str, list[str]] = {}
    by_matn: dict[str, list[str]] = {}
    for p in passages:
        by_text.setdefault(p.text_plain, []).append(p.id)
        m = _matn(p)
        if m is not None:
            by_matn.setdefault(m, []).append(p.id)
    out += [{"kind": "twin", "ids": ids} for ids in by_text.values() if len(ids) > 1]
    twin_sets = {frozenset(ids) for ids in by_text.values()}
    # a matn group adds something only where its members are not already all one twin group
    out += [{"kind": "matn", "ids": ids} for ids in by_matn.values()
            if len(ids) > 1 and frozenset(ids) not in twin_sets]
    if "verse_quote" in kinds:
        out += _verse_quotes(passages)
    out = [g for g in out if g["kind"] in kinds]
    for g in out:
        g["ids"] = sorted(set(g["ids"]), key=order.__getitem__)
    out.sort(key=lambda g: (KINDS.index(g["kind"]), order[g["ids"][0]], len(g["ids"])))
    return out


def _verse_quotes(passages: list[Passage]) -> list[dict]:
    # Word 4-grams of every hadith index the candidates; a candidate is confirmed by a word-bounded substring
    # test, so the result is exactly "the verse's normalized text occurs in the hadith's".
    hadith = [p for p in passages if p.source == "hadith"]
    grams: dict[tuple[str, ...], set[int]] = {}
    for n, p in enumerate(hadith):
        w = p.text_plain.split()
        for i in range(len(w) - 3):
            grams.setdefault(tuple(w[i:i + 4]), set()).add(n)
    out = []
    for v in passages:
        if v.source != "quran":
            continue
        w = v.text_plain.split()
        if len(w) < MIN_VERSE_WORDS:
            continue
        needle = f" {v.text_plain} "
        quoted = [hadith[n].id for n in sorted(grams.get(tuple(w[:4]), ()))
                  if needle in f" {hadith[n].text_plain} "]
        if quoted:
            out.append({"kind": "verse_quote", "ids": [v.id, *quoted]})
    return out


def group_counts(groups: Iterable[dict]) -> dict[str, dict[str, int]]:
    """Per kind: how many groups and how many distinct passages in them (for ingest's counts)."""
    n: Counter[str] = Counter()
    members: dict[str, set[str]] = {k: set() for k in KINDS}
    for g in groups:
        n[g["kind"]] += 1
        members[g["kind"]].update(g["ids"])
    return {k: {"groups": n[k], "members": len(members[k])} for k in KINDS}


class NearDuplicates:
    """The groups of one corpus, looked up by passage id."""

    def __init__(self, groups: Iterable[dict]):
        self.groups = list(groups)
        self._of: dict[str, list[int]] = {}
        for n, g in enumerate(self.groups):
            for pid in g["ids"]:
                self._of.setdefault(pid, []).append(n)

    def related(self, pid: str, kinds: Iterable[str] = KINDS) -> list[str]:
        """PID first, then every passage sharing a group of KINDS with it (in group order)."""
        kinds = set(kinds)
        seen = {pid: None}
        for n in self._of.get(pid, ()):
            if self.groups[n]["kind"] in kinds:
                seen.update(dict.fromkeys(self.groups[n]["ids"]))
        return list(seen)

    def closure(self, ids: Iterable[str], kinds: Iterable[str] = KINDS) -> set[str]:
        """IDS and every passage related to one of them."""
        kinds = tuple(kinds)
        return {r for pid in ids for r in self.related(pid, kinds)}


def write_groups(ctx, passages: list[Passage]) -> dict[str, dict[str, int]]:
    """Publish groups.jsonl in the step of CTX; returns the counts by kind."""
    groups = compute_groups(passages)
    with ctx.write_jsonl("groups.jsonl") as out:
        for g in groups:
            out.write(g)
    return group_counts(groups)


_READ: dict[tuple[str, str], NearDuplicates] = {}


def read_groups(root) -> NearDuplicates:
    """The near-duplicate groups published by ROOT's ingest, checked (kinds, ids of the corpus)."""
    import json

    from m3tune.corpus.passages import read_passages
    from m3tune.errors import UserError
    from m3tune.manifest import read_manifest

    manifest = read_manifest(root.child("ingest"))
    if manifest is None:
        raise UserError(f"no corpus: the ingest step has not finished in {root.uri}")
    out = manifest.outputs.get("groups.jsonl")
    if out is None:
        raise UserError(f"{root.child('ingest').uri_of('groups.jsonl')} missing: this corpus was ingested by an "
                        "older m3tune; rerun the ingest step")
    key = (root.uri, out.sha256)
    if key not in _READ:
        known = {p.id for p in read_passages(root)}
        name = root.child("ingest").uri_of("groups.jsonl")
        groups = []
        for n, line in enumerate(root.child("ingest").read_bytes("groups.jsonl").splitlines(), start=1):
            try:
                g = json.loads(line)
                ok = (isinstance(g, dict) and g.get("kind") in KINDS and isinstance(g.get("ids"), list)
                      and len(g["ids"]) > 1 and all(i in known for i in g["ids"]))
            except ValueError:
                ok = False
            if not ok:
                raise UserError(f"{name}:{n}: expected {{\"kind\": one of {', '.join(KINDS)}, \"ids\": at least "
                                "two passage ids of the corpus}; rerun the ingest step")
            groups.append(g)
        _READ.clear()
        _READ[key] = NearDuplicates(groups)
    return _READ[key]
