"""The `combine` step: every example source into balanced train and validation sets, gold queries kept out.

Two streaming passes over the inputs. The first validates every row, drops
gold leaks, and keeps 15 bytes a row (a seeded 64-bit hash of the row's
query + positives, its balance cell, its file and line); duplicates are rows
with the same hash. The balancer (`balance.py`) then fixes how many rows each
cell keeps, and the sample is, per cell, the rows with the smallest hashes:
a seeded, deterministic down-sampling that needs no shuffle buffer. The
second pass parses only the chosen lines. Memory is the chosen sample plus
those 15 bytes per input row (15 MB for a million rows); no input row is held.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from array import array
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from m3tune.arabic import normalize
from m3tune.combine.balance import CELLS, Target, applicable, bottlenecks, cell_for, choose_counts, shares, shortfall
from m3tune.combine.leakage import KINDS, GoldGuard, gold_passage_texts, load_gold
from m3tune.combine.split import split
from m3tune.errors import BadInput, UserError
from m3tune.jsonl import RecordError, Rejects, read_jsonl_numbered
from m3tune.records import Example, example_facts
from m3tune.storage import absolute_uri, file_digest, split_uri

MINED = "mine-negatives"


class CombineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(default_factory=list, json_schema_extra={"cli": "input"},
                              description="an Example JSONL file to add (FlagEmbedding format, filtered existing "
                              "data, user examples; path or URI)")
    mined: bool = Field(default=True, description="include the run's mined examples (mine-negatives/examples.jsonl)")
    arabic_target: float = Field(default=0.50, ge=0, le=1, description="share of Arabic queries in the output")
    conceptual_target: float = Field(default=0.20, ge=0, le=1,
                                     description="share of conceptual (thematic) queries in the output")
    exact_target: float | None = Field(default=0.15, ge=0, le=1,
                                       description="share of exact-quote queries (generate-exact) in the output; "
                                       "held only when the input has one (outside data has none); null: not "
                                       "balanced")
    quran_target: float = Field(default=0.25, ge=0, le=1,
                                description="share of examples whose positives are Quran verses")
    tolerance: float = Field(default=0.05, ge=0, le=1,
                             description="each output share lies within target ± tolerance (train's too)")
    max_examples: int | None = Field(default=None, ge=1, description="at most this many examples (train + validation)")
    min_examples: int = Field(default=1, ge=1,
                              description="fail, saying what is missing, when fewer would meet the targets")
    validation_split: float = Field(default=0.05, ge=0, lt=0.5,
                                    description="share of the output held out for validation, grouped by positive")
    seed: int = Field(default=42, description="seed of the down-sampling and of the split")
    exclude_gold: list[str] = Field(default_factory=list,
                                    description="gold set JSONL (path or URI): drop examples whose query repeats a "
                                    "gold query (normalized text, or token overlap >= gold-overlap)")
    exclude_packaged_gold: bool = Field(default=True, description="also keep out the queries of the packaged gold "
                                        "set (the evaluate step's default test set)")
    exclude_gold_passages: bool = Field(default=False,
                                        description="also drop examples whose positive is a gold query's relevant "
                                        "passage")
    gold_overlap: float = Field(default=0.8, gt=0, le=1,
                                description="token Jaccard at which a query counts as a near-duplicate of a gold query")
    gold_containment: float = Field(default=0.8, gt=0, le=1,
                                    description="share of one query's tokens the other holds at which it leaks")
    gold_char_ngram: float = Field(default=0.7, gt=0, le=1,
                                   description="character-trigram Jaccard at which a query leaks a gold query")
    gold_cross_language: float = Field(default=0.6, gt=0, le=1,
                                       description="share of content words an Arabic and an English query sharing "
                                       "a positive must each take from the passage's text and translation to count "
                                       "as the same query (needs the run's ingest)")
    held_out: str | None = Field(default="packaged",
                                 description="the held-out partition: passage ids training never sees, one a "
                                 "line ('packaged': m3tune.corpus.heldout's; a path or URI; null: none). "
                                 "They are removed from every example's positives and negatives, and an "
                                 "example left without a positive is dropped")
    skip_invalid: bool = Field(default=False,
                               description="skip invalid lines (written to rejects.jsonl) instead of failing")

    @field_validator("inputs", "exclude_gold")
    @classmethod
    def _absolute(cls, uris: list[str]) -> list[str]:
        return [absolute_uri(u) for u in uris]

    @model_validator(mode="after")
    def _something_to_read(self) -> "CombineConfig":
        if not self.mined and not self.inputs:
            raise ValueError("nothing to combine: mined is false and no input file is given")
        return self


def combine_inputs(config: CombineConfig) -> dict[str, str]:
    from m3tune.evaluation.gold import gold_digest

    from m3tune.corpus import heldout

    digests = {"gold:packaged": "sha256:" + gold_digest(None)} if config.exclude_packaged_gold else {}
    if config.held_out is not None:
        digests[f"held-out:{config.held_out}"] = heldout.digest(config.held_out)
    for kind, uris in (("input", config.inputs), ("gold", config.exclude_gold)):
        for uri in uris:
            store, name = split_uri(uri)
            digests[f"{kind}:{uri}"] = "sha256:" + file_digest(store, name)
    return digests


def combine_needs(config: CombineConfig) -> tuple[str, ...]:
    return (MINED,) if config.mined else ()


def _positive_keys(r: Example, near=None) -> list[str]:
    """Split keys of R's positives: their ids, near-duplicates included (NEAR: the ingest's groups), else texts."""
    if not r.pos_ids:
        return [f"t:{normalize(t)}" for t in r.pos]
    ids = set(r.pos_ids) | set(r.related_ids or ())
    return [f"p:{i}" for i in sorted(near.closure(ids) if near is not None else ids)]


def _without(r: Example, held: frozenset[str]) -> tuple[Example | None, int, int]:
    """(R without the held-out passages, or None when no positive is left; positives removed; negatives
    removed). Rows without ids cannot be checked; they pass unchanged (counted by the caller)."""
    if not held or r.pos_ids is None:
        return r, 0, 0
    keep_pos = [i for i, pid in enumerate(r.pos_ids) if pid not in held]
    keep_neg = [i for i, pid in enumerate(r.neg_ids or ()) if pid not in held]
    removed_pos, removed_neg = len(r.pos_ids) - len(keep_pos), len(r.neg_ids or ()) - len(keep_neg)
    if not keep_pos:
        return None, removed_pos, removed_neg
    if not removed_pos and not removed_neg:
        return r, 0, 0
    update: dict[str, Any] = {}
    for base, keep in (("pos", keep_pos), ("neg", keep_neg)):
        for field in (base, f"{base}_ids", f"{base}_scores") + (("neg_kinds",) if base == "neg" else ()):
            values = getattr(r, field)
            if values is not None:
                update[field] = [values[i] for i in keep]
    return r.model_copy(update=update), removed_pos, removed_neg


def _key_hash(seed: int, r: Example) -> int:
    key = normalize(r.query) + "\x1e" + "\x1f".join(sorted(_positive_keys(r)))
    return int.from_bytes(hashlib.blake2b(f"{seed}\x1d{key}".encode(), digest_size=8).digest(), "little")


class _Profile:
    """Shares by language, type and source, and negatives per example, of a set of examples."""

    def __init__(self) -> None:
        self.n = 0
        self.counts: dict[str, Counter[str]] = {"language": Counter(), "type": Counter(), "source": Counter()}
        self.negatives: Counter[int] = Counter()

    def add(self, r: Example, facts: tuple[str, str, str]) -> None:
        self.n += 1
        for dim, value in zip(("language", "type", "source"), facts):
            self.counts[dim][value] += 1
        self.negatives[len(r.neg)] += 1

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"examples": self.n}
        for dim, counter in self.counts.items():
            out[dim] = {k: {"rows": v, "share": round(v / self.n, 4)} for k, v in sorted(counter.items())}
        if self.n:
            values = list(self.negatives.elements())
            out["negatives"] = {"mean": round(statistics.fmean(values), 3), "min": min(values), "max": max(values),
                                "without": self.negatives[0]}
        return out


def _corpus(ctx) -> list | None:
    """The run's ingested passages (None when the run has no ingest: combine of outside files only)."""
    from m3tune.manifest import read_manifest

    if read_manifest(ctx.root.child("ingest")) is None:
        return None
    from m3tune.corpus.passages import read_passages

    return read_passages(ctx.root)


def _unknown_id(r: Example, known: set[str] | None) -> tuple[str, str] | None:
    """(field, id) of the first positive or negative id not in the run's corpus KNOWN (None: unchecked)."""
    if known is None:
        return None
    for field in ("pos_ids", "neg_ids"):
        for pid in getattr(r, field) or ():
            if pid not in known:
                return field, pid
    return None


def _sources(ctx, inputs: list[str], mined: bool) -> list[tuple[Any, str, str]]:
    """(store, file name, label for messages) per input; the mined file first."""
    found = []
    if mined:
        folder = ctx.root.child(MINED)
        found.append((folder, "examples.jsonl", f"{MINED}/examples.jsonl"))
    for uri in inputs:
        store, name = split_uri(uri)
        found.append((store, name, uri))
    return found


def combine(ctx, *, inputs: list[str], mined: bool, arabic_target: float, conceptual_target: float,
            exact_target: float | None,
            quran_target: float, tolerance: float, max_examples: int | None, min_examples: int,
            validation_split: float, seed: int, exclude_gold: list[str], exclude_packaged_gold: bool,
            exclude_gold_passages: bool,
            gold_overlap: float, gold_containment: float, gold_char_ngram: float, gold_cross_language: float,
            held_out: str | None, skip_invalid: bool) -> dict[str, Any]:
    import numpy as np

    from m3tune.corpus import heldout

    targets = [Target("arabic", arabic_target, tolerance), Target("conceptual", conceptual_target, tolerance),
               Target("quran", quran_target, tolerance)]
    if exact_target is not None:
        targets.append(Target("exact", exact_target, tolerance))
    # The output is balanced within 80% of the tolerance when a split follows: the largest output sits on
    # the band's edges, where moving almost any group to validation would push train out of its band.
    inner = [Target(t.name, t.share, t.tolerance * (0.8 if validation_split else 1.0)) for t in targets]
    gold = load_gold(exclude_gold, packaged=exclude_packaged_gold)
    corpus = _corpus(ctx)
    known = {p.id for p in corpus} if corpus is not None else None  # ids are checked against it when there
    guard = GoldGuard(gold, overlap=gold_overlap, exclude_passages=exclude_gold_passages,
                      containment=gold_containment, char_ngram=gold_char_ngram, cross_language=gold_cross_language,
                      texts=gold_passage_texts(corpus, gold) if corpus is not None and gold else None)
    held = heldout.load(held_out)
    if known is not None:
        heldout.check_known(held, known, held_out)
    near, removed_near = None, 0
    if corpus is not None:
        from m3tune.corpus.neardup import read_groups

        near = read_groups(ctx.root)
        # the partition's near-duplicates of other kinds (a body under another chain, a quoted verse) are kept
        # out of training too, so the v1 list (twins only) stays valid
        widened = near.closure(held) if held else frozenset()
        removed_near = len(widened) - len(held)
        held = frozenset(widened) if held else held
    files = _sources(ctx, inputs, mined)
    rejects = Rejects() if skip_invalid else None

    # Pass 1: validate, drop leaks, remember (hash, cell, file, line) per row.
    hashes, cells, file_of, line_of = array("Q"), array("B"), array("H"), array("I")
    before = _Profile()
    leaks = Counter()
    removed = Counter()  # what the held-out partition took away
    try:
        for f_index, (store, name, label) in enumerate(files):
            if store.exists(name) and store.size(name) == 0:  # one empty source (no mined example) is no error
                ctx.log.warning("%s is empty", label)
                continue
            ctx.log.info("reading %s", label)
            with store.open_read(name) as f:
                for line, raw, r in read_jsonl_numbered(f, Example, name=label, rejects=rejects):
                    unknown = _unknown_id(r, known)
                    if unknown:
                        err = RecordError(label, line, unknown[0], f"{unknown[1]} is not in the run's corpus "
                                          f"(ingest/passages.jsonl, {len(known):,} passages)")
                        if rejects is None:
                            raise err
                        rejects.add(err, raw)
                        continue
                    facts = example_facts(r)
                    before.add(r, facts)
                    leak = guard.query_leak(r.query, r.pos_ids)
                    if leak:
                        leaks["gold_query"] += 1
                        leaks[leak[0]] += 1
                        continue
                    if guard.passage_leak(r.pos_ids):
                        leaks["gold_passage"] += 1
                        continue
                    if held and r.pos_ids is None:
                        removed["unchecked_rows"] += 1
                    r, pos_gone, neg_gone = _without(r, held)
                    removed["positives"] += pos_gone
                    removed["negatives"] += neg_gone
                    if r is None:
                        removed["examples"] += 1
                        continue
                    if pos_gone or neg_gone:
                        removed["examples_trimmed"] += 1
                    language, qtype, source = facts
                    hashes.append(_key_hash(seed, r))
                    cells.append(cell_for(language, qtype, source))
                    file_of.append(f_index)
                    line_of.append(line)
    finally:
        if rejects is not None:
            ctx.write_rejects(rejects)
    if not before.n:
        raise UserError("no valid examples to combine")

    # Balance: distinct rows (the first of equal hashes) per cell, then the counts the targets allow.
    h = np.frombuffer(hashes, dtype=np.uint64)
    c = np.frombuffer(cells, dtype=np.uint8)
    _, first = np.unique(h, return_index=True)  # ascending hash: the seeded sampling order
    first_cells = c[first]
    available = np.bincount(first_cells, minlength=len(CELLS)).astype(int).tolist()
    if len(applicable(targets, available)) < len(targets):
        ctx.log.warning("no exact-quote example in the input: its share target is not held")
        targets, inner = applicable(targets, available), applicable(inner, available)
    counts = choose_counts(available, inner, max_examples)
    if not sum(counts):
        raise BadInput(f"no output meets the targets (the input has {len(first):,} distinct examples; bands "
                        f"{'narrowed to 80% of the tolerance for the split' if validation_split else 'as given'}): "
                        + "; ".join(shortfall(available, inner, max_examples)))
    if sum(counts) < min_examples:
        raise BadInput(f"only {sum(counts):,} examples meet every target (need {min_examples:,}; the input has "
                        f"{len(first):,} distinct examples); all of these kinds are used up, and more of them would "
                        "let the output grow: " + ", ".join(bottlenecks(available, counts)))
    chosen = np.sort(np.concatenate([first[first_cells == cell][:k] for cell, k in enumerate(counts)]))
    wanted = {(int(file_of[i]) << 32) | int(line_of[i]) for i in chosen}
    duplicates = len(h) - len(first)
    del hashes, cells, file_of, line_of, h, c, first, first_cells

    # Pass 2: parse the chosen lines only (numbered as pass 1's reader numbers them).
    rows: list[Example] = []
    row_cells: list[int] = []
    row_facts: list[tuple[str, str, str]] = []
    for f_index, (store, name, label) in enumerate(files):
        with store.open_read(name) as f:
            for line, raw in enumerate(f, start=1):
                if ((f_index << 32) | line) not in wanted:
                    continue
                try:
                    r = Example.model_validate_json(raw.removeprefix(b"\xef\xbb\xbf") if line == 1 else raw)
                except ValueError as e:  # valid in pass 1: the file changed under us
                    raise RecordError(label, line, None, f"changed while combine read it: {e}") from None
                r, _, _ = _without(r, held)
                if r is None:  # kept in pass 1: the file changed under us
                    raise RecordError(label, line, "pos_ids", "changed while combine read it")
                language, qtype, source = facts = example_facts(r)
                filled = {"language": language, **({"source": source} if source != "unknown" else {})}
                rows.append(r.model_copy(update=filled))
                row_facts.append(facts)
                row_cells.append(cell_for(language, qtype, source))
    keys = [[f"q:{normalize(r.query)}", *_positive_keys(r, near)] for r in rows]
    in_validation = split(keys, row_cells, fraction=validation_split, seed=seed, targets=targets,
                          strata=[f[1] for f in row_facts])
    missing = sorted({f[1] for f in row_facts} - {f[1] for f, v in zip(row_facts, in_validation) if v})
    if validation_split and missing:
        ctx.log.warning("validation holds no %s query: every group holding one is too large for the split or "
                        "would take train out of its band", ", ".join(missing))
    if validation_split and not any(in_validation):
        raise BadInput(f"no validation split possible: of the {len(rows):,} examples, every group sharing a "
                        f"positive or a query is too large for {validation_split:.0%} of them, or would take "
                        "train out of its target band; raise --validation-split, or add examples")

    profiles = {"train": _Profile(), "validation": _Profile()}
    for part, flag in (("train", False), ("validation", True)):
        with ctx.write_jsonl(f"{part}.jsonl") as out:
            for r, facts, v in zip(rows, row_facts, in_validation):
                if v == flag:
                    out.write(r)
                    profiles[part].add(r, facts)
    train_cells = [cell for cell, v in zip(row_cells, in_validation) if not v]
    train_counts = [train_cells.count(cell) for cell in range(len(CELLS))]
    output_shares, train_shares, input_shares = shares(counts), shares(train_counts), shares(available)
    stats = {
        "input": {"files": [label for _, _, label in files], "rows": before.n,
                  "invalid": len(rejects) if rejects is not None else 0,
                  "gold_query_leaks": leaks["gold_query"], "gold_passage_leaks": leaks["gold_passage"],
                  "gold_query_leaks_by_kind": {k: leaks[k] for k in KINDS
                                               if k != "cross_language" or guard.checks_cross_language},
                  "cross_language_checked": guard.checks_cross_language,
                  "duplicates": duplicates,
                  "held_out": {"list": held_out, "passages": len(held), "near_duplicates_added": removed_near,
                               **{k: removed[k] for k in ("examples", "examples_trimmed", "positives",
                                                          "negatives", "unchecked_rows")}},
                  "distinct": sum(available), "before": before.summary()},
        "targets": [{"name": t.name, "target": t.share, "tolerance": t.tolerance,
                     "input_share": round(input_shares[t.name], 4), "output_share": round(output_shares[t.name], 4),
                     "train_share": round(train_shares[t.name], 4),
                     "met": t.low - 1e-9 <= output_shares[t.name] <= t.high + 1e-9
                     and t.low - 1e-9 <= train_shares[t.name] <= t.high + 1e-9} for t in targets],
        "output": {"examples": len(rows), "train": profiles["train"].summary(),
                   "validation": profiles["validation"].summary(), "validation_missing_types": missing},
        "seed": seed,
    }
    ctx.write_bytes("stats.json", json.dumps(stats, ensure_ascii=False, indent=2).encode() + b"\n")
    return {"counts": {"input": before.n, "distinct": sum(available), "examples": len(rows),
                       "train": profiles["train"].n, "validation": profiles["validation"].n,
                       "gold_query_leaks": leaks["gold_query"], "gold_passage_leaks": leaks["gold_passage"],
                       "held_out_examples": removed["examples"], "held_out_positives": removed["positives"],
                       "held_out_negatives": removed["negatives"]},
            "metrics": {f"{t.name}_share": round(output_shares[t.name], 4) for t in targets}}


def show_stats(root) -> Any:
    """What `m3tune step combine` prints: the shares against the targets, and the sizes."""
    from rich.table import Table

    stats = json.loads(root.child("combine").read_bytes("stats.json"))
    out = stats["output"]
    table = Table(title=f"combine: {stats['input']['rows']:,} input rows → {out['train']['examples']:,} train + "
                        f"{out['validation']['examples']:,} validation", title_justify="left")
    for col in ("target", "input", "output", "train", "goal", ""):
        table.add_column(col, justify="left" if col in ("target", "") else "right")
    for t in stats["targets"]:
        table.add_row(f"{t['name']} share", f"{t['input_share']:.1%}", f"{t['output_share']:.1%}",
                      f"{t['train_share']:.1%}", f"{t['target']:.0%} ± {t['tolerance']:.0%}", "✅" if t["met"] else "❌")
    i = stats["input"]
    table.caption = (f"{i['duplicates']:,} duplicates, {i['gold_query_leaks']:,} gold query leaks, "
                     f"{i['gold_passage_leaks']:,} gold passage leaks, {i['invalid']:,} invalid lines dropped"
                     + (f"; held out: {i['held_out']['examples']:,} examples dropped, "
                        f"{i['held_out']['positives']:,} positives and {i['held_out']['negatives']:,} negatives "
                        "removed" if i.get("held_out") else ""))
    return table
