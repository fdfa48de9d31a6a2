"""The `analyze` step: shares by language, query type and source, against targets.

Reads any JSONL of Query records or Example records (FlagEmbedding format
included; missing language is detected from the script, missing source
from the positive ids). The pipeline runs it with `fail_on_miss` after
`combine`, so data that misses its targets never reaches the GPU step.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from m3tune.arabic import normalize
from m3tune.errors import ConfigError, UserError
from m3tune.jsonl import Rejects, read_jsonl
from m3tune.records import Example, Query, example_facts
from m3tune.storage import absolute_uri, file_digest, split_uri


# The default share of exact-quote queries (combine's too): see docs/design.md, "Exact-quote queries".
EXACT_TARGET = 0.15


class TargetsMissed(UserError):
    """The analyzed data misses one or more share targets."""

    def __init__(self, report: dict[str, Any]):
        self.report = report
        missed = [t for t in report["targets"] if not t["met"]]
        super().__init__("targets missed: " + "; ".join(
            f"{t['name']} {t['share']:.1%} (target {t['target']:.0%}, at least {t['target'] - t['tolerance']:.0%})"
            for t in missed))


class AnalyzeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(default_factory=list, json_schema_extra={"cli": "input"},
                              description="JSONL file of queries or examples (path or URI); none: the outputs "
                              "of the steps analyze follows in the pipeline")
    arabic_target: float = Field(default=0.50, ge=0, le=1, description="share of Arabic queries")
    conceptual_target: float = Field(default=0.20, ge=0, le=1, description="share of conceptual (thematic) queries")
    exact_target: float | None = Field(default=EXACT_TARGET, ge=0, le=1, description="share of exact-quote queries "
                                       "(generate-exact); checked only when the data has one (outside data has "
                                       "none), as combine balances it; null: not checked")
    quran_target: float = Field(default=0.25, ge=0, le=1, description="share of queries whose positives are Quran verses")
    tolerance: float = Field(default=0.05, ge=0, le=1, description="a share of at least target - tolerance is met")
    fail_on_miss: bool = Field(default=True, description="fail (exit 3) when a target is missed: the pipeline's gate")
    skip_invalid: bool = Field(default=False, description="skip invalid lines (written to rejects.jsonl) instead of failing")


    @field_validator("inputs")
    @classmethod
    def _absolute(cls, uris: list[str]) -> list[str]:
        return [absolute_uri(u) for u in uris]


# What analyze reads from the steps it follows in the pipeline.
ANALYZABLE = ("queries.jsonl", "examples.jsonl", "train.jsonl")


def analyze_inputs(config: AnalyzeConfig) -> dict[str, str]:
    digests = {}
    for uri in config.inputs:
        store, name = split_uri(uri)
        digests[f"input:{uri}"] = "sha256:" + file_digest(store, name)
    return digests


def _row_kind(store, name: str) -> type[BaseModel]:
    """Example when the first line that is a JSON object has 'pos' and no 'positive_ids'; else Query."""
    with store.open_read(name) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # the validating reader reports it, by line
            if isinstance(row, dict):
                return Example if "pos" in row and "positive_ids" not in row else Query
    return Query


def _facts(rows: Iterable[BaseModel]) -> Iterator[tuple[str, str, str, str, list[str], int | None]]:
    """(query, language, type, source, positive keys, negatives) per row."""
    for r in rows:
        if isinstance(r, Query):
            yield r.query, r.language, r.type, r.source, list(r.positive_ids), None
        else:
            assert isinstance(r, Example)
            keys = list(r.pos_ids) if r.pos_ids else [f"text:{normalize(t)[:80]}" for t in r.pos]
            yield r.query, *example_facts(r), keys, len(r.neg)


def _top(counter: Counter[str], n: int = 5) -> list[tuple[str, int]]:
    """The N most common, ties by key: the same report from any process (set order is not)."""
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def _shares(counter: Counter[str], total: int) -> dict[str, float]:
    return {k: round(v / total, 4) for k, v in counter.most_common()}


def check_targets(**targets: float | None) -> None:
    """Every target and the tolerance a share in [0, 1]: a negative target (or a NaN, which compares false with
    everything) is met by any data, so the gate before training would pass whatever it is given."""
    for name, value in targets.items():
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise ConfigError(f"--{name.replace('_', '-')} {value}: a share between 0 and 1 (analyze: {name})")


def build_report(rows: Iterable[BaseModel], *, arabic_target: float, conceptual_target: float,
                 quran_target: float, tolerance: float, exact_target: float | None = EXACT_TARGET) -> dict[str, Any]:
    check_targets(arabic_target=arabic_target, conceptual_target=conceptual_target, quran_target=quran_target,
                  tolerance=tolerance, exact_target=exact_target)
    language: Counter[str] = Counter()
    qtype: Counter[str] = Counter()
    source: Counter[str] = Counter()
    per_passage: Counter[str] = Counter()
    queries: Counter[str] = Counter()
    negatives: list[int] = []
    n = 0
    for query, lang, typ, src, keys, negs in _facts(rows):
        n += 1
        language[lang] += 1
        qtype[typ] += 1
        source[src] += 1
        per_passage.update(list(dict.fromkeys(keys)))  # each passage once per row, in a stable order
        queries[normalize(query)] += 1
        if negs is not None:
            negatives.append(negs)
    if n == 0:
        raise UserError("no valid rows to analyze")
    dup_rows = sum(c - 1 for c in queries.values() if c > 1)
    counts = sorted(per_passage.values())
    report: dict[str, Any] = {
        "rows": n,
        "counts": {"language": dict(language), "type": dict(qtype), "source": dict(source)},
        "shares": {"language": _shares(language, n), "type": _shares(qtype, n), "source": _shares(source, n)},
        "duplicates": {"rows": dup_rows, "distinct_queries": len(queries),
                       "most_repeated": [[q, c] for q, c in _top(queries) if c > 1]},
        "per_passage": {"passages": len(per_passage), "mean": round(statistics.fmean(counts), 3),
                        "median": statistics.median(counts), "max": counts[-1],
                        "p95": counts[min(len(counts) - 1, int(0.95 * len(counts)))],
                        "most_used": [[k, c] for k, c in _top(per_passage)]},
    }
    if negatives:
        report["negatives"] = {"mean": round(statistics.fmean(negatives), 3), "min": min(negatives),
                               "max": max(negatives), "without_negatives": sum(1 for x in negatives if x == 0)}
    # Targets are floors, as in the guide: the old data failed by having too
    # few Arabic, conceptual and Quran queries. A share far above its target
    # is reported (`above`) but is not a miss; `combine` balances exactly.
    # The exact target, like combine's, holds only for data that has exact quotes: outside data has none.
    checked = [("arabic", language["ar"] / n, arabic_target),
               ("conceptual", qtype["conceptual"] / n, conceptual_target),
               ("quran", source["quran"] / n, quran_target)]
    if exact_target is not None and qtype["exact"]:
        checked.insert(2, ("exact", qtype["exact"] / n, exact_target))
    elif exact_target is not None:
        report["not_checked"] = {"exact": "no exact-quote row"}
    targets = []
    for name, share, target in checked:
        targets.append({"name": name, "share": round(share, 4), "target": target, "tolerance": tolerance,
                        "met": share >= target - tolerance - 1e-9, "above": share > target + tolerance + 1e-9})
    report["targets"] = targets
    report["ok"] = all(t["met"] for t in targets)
    return report


def analyze_files(uris: list[str], *, rejects: Rejects | None = None, **targets: float) -> dict[str, Any]:
    """One report over the JSONL files at URIS (each of Query or Example rows, detected per file)."""
    kinds: list[str] = []

    def rows() -> Iterator[BaseModel]:
        for uri in uris:
            store, name = split_uri(uri)
            model = _row_kind(store, name)
            kinds.append("examples" if model is Example else "queries")
            with store.open_read(name) as f:
                yield from read_jsonl(f, model, name=uri, rejects=rejects)

    check_targets(**targets)  # before any file is read
    if not uris:
        raise UserError("nothing to analyze: give one or more JSONL files of queries or examples")
    report = build_report(rows(), **targets)
    report = {"input": ", ".join(uris), "kind": "+".join(sorted(set(kinds))), **report}
    if rejects is not None:
        report["rejected"] = len(rejects)
    return report


def show_report(root) -> Any:
    """The tables of the analyze step's report in run ROOT."""
    return render_report(json.loads(root.child("analyze").read_bytes("report.json")))


def render_report(report: dict[str, Any]):
    """A rich renderable: the shares and targets as tables."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    # a file's name is text, not markup: "[/]" in a path would end a tag that was never opened
    shares = Table(title=f"{escape(report['input'])}: {report['rows']:,} {report['kind']}", title_justify="left")
    shares.add_column("dimension")
    shares.add_column("value")
    shares.add_column("rows", justify="right")
    shares.add_column("share", justify="right")
    for dim in ("language", "type", "source"):
        for value, share in report["shares"][dim].items():
            shares.add_row(dim, escape(value), f"{report['counts'][dim][value]:,}", f"{share:.1%}")
    targets = Table(title="targets", title_justify="left")
    for col in ("target", "share", "goal", ""):
        targets.add_column(col, justify="right" if col in ("share", "goal") else "left")
    for t in report["targets"]:
        mark = ("✅" if t["met"] else "❌") + (" (above target)" if t.get("above") else "")
        targets.add_row(f"{t['name']} queries", f"{t['share']:.1%}", f"≥ {t['target']:.0%} (± {t['tolerance']:.0%})",
                        mark)
    for name, why in report.get("not_checked", {}).items():
        targets.add_row(f"{name} queries", "—", "not checked", escape(why))
    d, p = report["duplicates"], report["per_passage"]
    extra = Table.grid(padding=(0, 2))
    extra.add_row("duplicate queries", f"{d['rows']:,} rows ({d['distinct_queries']:,} distinct)")
    extra.add_row("examples per passage", f"mean {p['mean']}, median {p['median']}, p95 {p['p95']}, "
                  f"max {p['max']} over {p['passages']:,} passages")
    if "negatives" in report:
        n = report["negatives"]
        extra.add_row("negatives per example", f"mean {n['mean']}, min {n['min']}, max {n['max']}")
    return Group(shares, targets, extra)


def analyze(ctx, *, inputs: list[str], arabic_target: float, conceptual_target: float, quran_target: float,
            exact_target: float | None, tolerance: float, fail_on_miss: bool, skip_invalid: bool) -> dict[str, Any]:
    labels = None
    if not inputs:  # in the pipeline: what the steps before it published
        found = [(need, name) for need in ctx.needs for name in ANALYZABLE if ctx.root.child(need).exists(name)]
        inputs = [ctx.root.child(need).uri_of(name) for need, name in found]
        labels = [f"{need}/{name}" for need, name in found]  # relative to the run: same on any store
    rejects = Rejects() if skip_invalid else None
    try:
        report = analyze_files(inputs, rejects=rejects, arabic_target=arabic_target,
                               conceptual_target=conceptual_target, quran_target=quran_target,
                               exact_target=exact_target, tolerance=tolerance)
        if labels is not None:
            report["input"] = ", ".join(labels)
    finally:
        if rejects is not None:
            ctx.write_rejects(rejects)  # even when no valid row is left: they say why
    ctx.write_bytes("report.json", json.dumps(report, ensure_ascii=False, indent=2).encode() + b"\n")
    if fail_on_miss and not report["ok"]:
        raise TargetsMissed(report)
    return {"counts": {"rows": report["rows"], **{f"{k}_{v}": n for k in ("language", "source")
                                                   for v, n in report["counts"][k].items()}},
            "metrics": {t["name"] + "_share": t["share"] for t in report["targets"]}}
