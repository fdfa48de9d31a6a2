"""The `ingest` step: packaged corpora and user JSONL -> `passages.jsonl` and its near-duplicate groups
`groups.jsonl` (m3tune.corpus.neardup).

Passages are written in a fixed order (Quran in mushaf order, then each
hadith collection in sunnah.com order, then user files in the order given),
so the same inputs always give byte-identical output, locally or on S3.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from m3tune.arabic import normalize
from m3tune.jsonl import RecordError, Rejects, read_jsonl_numbered
from m3tune.context import StepContext
from m3tune.records import Passage, PassageInput
from m3tune.storage import absolute_uri, file_digest, split_uri

PackagedSource = Literal["quran", "bukhari", "muslim"]


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[PackagedSource] = Field(
        default=["quran", "bukhari", "muslim"], description="packaged corpus to include",
        json_schema_extra={"cli": "source", "cli_empty": "no-packaged"})
    limit: int | None = Field(default=None, ge=1, description="at most this many passages from each source and user file")
    user_files: list[str] = Field(
        default_factory=list, json_schema_extra={"cli": "user-file"},
        description="JSONL file of passages (path, file:// or s3:// URI), added after the packaged ones; "
        "each line needs id, source, text; text_plain and collection are derived when absent")
    skip_invalid: bool = Field(default=False, description="write invalid user lines to rejects.jsonl instead of failing")
    quran_plain: Literal["tanzil", "uthmani"] = Field(
        default="tanzil", description="text_plain of Quran verses from Tanzil's standard spelling (best for "
        "lexical matching) or from the Uthmani text normalized (no Tanzil text involved)")

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, sources: list[str]) -> list[str]:
        if len(set(sources)) != len(sources):
            raise ValueError("each source may be given once")
        return sources

    @field_validator("user_files")
    @classmethod
    def _absolute(cls, uris: list[str]) -> list[str]:
        # recorded in the manifest and compared by `status`, so it must not depend on the current folder
        return [absolute_uri(u) for u in uris]


def ingest_inputs(config: IngestConfig) -> dict[str, str]:
    from m3tune.corpus.packaged import package_versions

    inputs: dict[str, str] = {}
    for source in config.sources:
        inputs.update(package_versions(source, config.quran_plain))
    for uri in config.user_files:
        store, name = split_uri(uri)
        inputs[f"user:{uri}"] = "sha256:" + file_digest(store, name)
    return inputs


def _from_user(row: PassageInput) -> Passage:
    return Passage(
        id=row.id, source=row.source, collection=row.collection or row.id.split(":", 1)[0], text=row.text,
        text_plain=row.text_plain or normalize(row.text), translation_en=row.translation_en, meta=row.meta,
    )


def ingest(ctx: StepContext, *, sources: list[str], limit: int | None, user_files: list[str],
           skip_invalid: bool, quran_plain: str) -> dict[str, Any]:
    from m3tune.corpus.packaged import expected_count, hadith_passages, notice, quran_passages
    from m3tune.progress import track

    origin_of: dict[str, str] = {}  # passage id -> where it came from, to name duplicates
    by_source: Counter[str] = Counter()
    rejects = Rejects() if skip_invalid else None
    written: list[Passage] = []

    with ctx.write_jsonl("passages.jsonl") as out:
        for source in sources:
            passages = (quran_passages(limit, plain_from=quran_plain) if source == "quran"
                        else hadith_passages(source, limit))
            total = min(filter(None, (expected_count(source), limit)))
            for p in track(passages, description=f"ingest {source}", total=total):
                origin_of[p.id] = source
                out.write(p)
                written.append(p)
                by_source[source] += 1
            ctx.log.info("%s: %s passages", source, f"{by_source[source]:,}")

        for uri in user_files:
            store, name = split_uri(uri)
            taken = 0
            with store.open_read(name) as f:
                for line_no, raw, row in read_jsonl_numbered(f, PassageInput, name=uri, rejects=rejects):
                    if limit is not None and taken >= limit:
                        break
                    err = None
                    if row.id in origin_of:
                        err = RecordError(uri, line_no, "id",
                                          f"duplicate passage id {row.id!r}, already from {origin_of[row.id]}")
                    elif row.text_plain is None and not normalize(row.text):
                        # a row of marks or punctuation only: valid JSON, but nothing to search or match
                        err = RecordError(uri, line_no, "text", "normalizes to an empty text_plain (only marks, "
                                          "punctuation or spaces); give text_plain, or drop the row")
                    if err is not None:
                        if rejects is None:
                            raise err
                        rejects.add(err, raw)
                        continue
                    origin_of[row.id] = f"{uri}:{line_no}"
                    written.append(_from_user(row))
                    out.write(written[-1])
                    by_source[f"user:{uri}"] += 1
                    taken += 1
            ctx.log.info("%s: %s passages", uri, f"{taken:,}")

    if rejects is not None:
        ctx.write_rejects(rejects)
    groups = _write_groups(ctx, written)
    kinds = (["quran"] * ("quran" in sources) + ["tanzil"] * ("quran" in sources and quran_plain == "tanzil")
             + ["hadith"] * any(s in sources for s in ("bukhari", "muslim")))
    if kinds:
        ctx.write_bytes("NOTICE.md", ("# Sources and licences of passages.jsonl\n\n"
                                      + "\n\n".join(notice(k) for k in kinds) + "\n").encode())
    return {"counts": {"passages": out.rows, "by_source": dict(by_source),
                       "rejected": len(rejects) if rejects is not None else 0, "near_duplicates": groups}}


def _write_groups(ctx, passages: list[Passage]) -> dict[str, dict[str, int]]:
    """groups.jsonl (m3tune.corpus.neardup) over the passages just written."""
    from m3tune.corpus.neardup import write_groups

    counts = write_groups(ctx, passages)
    ctx.log.info("near-duplicate groups: %s", ", ".join(f"{k} {v['groups']} ({v['members']} passages)"
                                                          for k, v in counts.items()))
    return counts
