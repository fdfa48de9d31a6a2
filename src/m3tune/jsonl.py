"""Streaming JSONL: validated reading that names file, line and field; atomic writing.

Reading never loads a whole file: lines are validated one at a time with
pydantic's JSON parser (one pass in Rust, no intermediate dict). A bad line
either stops the read with a `RecordError` ("passages.jsonl:12: field
'source': ...") or, when a `Rejects` sink is given, is written there verbatim
with the reason and skipped, so nothing valid is lost either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError

from m3tune.errors import BadInput
from m3tune.storage import Store, WrittenFile

M = TypeVar("M", bound=BaseModel)


class RecordError(BadInput, ValueError):
    """A JSONL line that is not a valid record."""

    def __init__(self, path: str, line: int, field: str | None, message: str):
        self.path, self.line, self.field, self.message = path, line, field, message
        where = f"{path}:{line}" if line else path
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")


@dataclass
class WrittenJsonl(WrittenFile):
    rows: int = 0


def _describe(error: ValidationError, raw: bytes) -> tuple[str | None, str]:
    """(field, message) for the first problem of a line, in a reader's words."""
    first = error.errors(include_url=False)[0]
    more = error.error_count() - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''} on this line)" if more else ""
    if first["type"] == "json_invalid":
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"not valid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}"
        return None, f"invalid JSON: {first['ctx'].get('error', first['msg'])}"
    if first["type"] == "model_type":
        return None, "expected a JSON object"
    field = ".".join(str(p) for p in first["loc"]) or None
    kind = first["type"]
    if kind == "missing":
        return field, "missing required field" + suffix
    if kind == "extra_forbidden":
        return field, "unknown field (not part of this record type)" + suffix
    message = first["msg"]
    if "input" in first and kind not in ("value_error",):
        shown = repr(first["input"])
        message += f", got {shown if len(shown) <= 60 else shown[:57] + '...'}"
    return field, message + suffix


class Rejects:
    """Collects invalid lines, with file, line, field and reason, for a rejects file."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, err: RecordError, raw: bytes) -> None:
        from m3tune.redact import redact

        # a rejects file is published beside the outputs: a key pasted into a bad line must not travel with it
        self.rows.append({"file": err.path, "line": err.line, "field": err.field, "error": redact(err.message),
                          "raw": redact(raw.decode("utf-8", errors="backslashreplace"))})

    def __len__(self) -> int:
        return len(self.rows)


def read_jsonl(stream: BinaryIO, model: type[M], *, name: str, rejects: Rejects | None = None) -> Iterator[M]:
    """Yield one validated MODEL per non-blank line of STREAM (a file called NAME in errors).

    Without REJECTS the first invalid line raises RecordError; with it, the
    line is recorded there and skipped. A file with no records at all raises.
    """
    for _, _, record in read_jsonl_numbered(stream, model, name=name, rejects=rejects):
        yield record


def read_jsonl_numbered(stream: BinaryIO, model: type[M], *, name: str,
                        rejects: Rejects | None = None) -> Iterator[tuple[int, bytes, M]]:
    """As read_jsonl, with each record's line number and raw bytes (for errors found after parsing)."""
    validate = model.model_validate_json
    seen = 0
    for line_no, raw in enumerate(stream, start=1):
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as some editors write
            raw = raw[3:]
        raw = raw.strip()
        if not raw:
            continue
        seen += 1
        try:
            yield line_no, raw, validate(raw)
        except ValidationError as e:
            field, message = _describe(e, raw)
            err = RecordError(name, line_no, field, message)
            if rejects is None:
                raise err from None
            rejects.add(err, raw)
    if not seen:
        raise RecordError(name, 0, None, "file is empty: expected one JSON object per line")


def read_records(store: Store, rel: str, model: type[M], *, rejects: Rejects | None = None) -> Iterator[M]:
    """Validated records of the JSONL file REL in STORE (see read_jsonl)."""
    with store.open_read(rel) as f:
        yield from read_jsonl(f, model, name=store.uri_of(rel), rejects=rejects)


class JsonlWriter:
    def __init__(self, raw) -> None:
        self._raw = raw
        self.rows = 0

    def write(self, record: BaseModel | dict[str, Any]) -> None:
        # pydantic_core.to_json serializes models and plain dicts alike,
        # straight to UTF-8 bytes (Arabic stays readable, not \\u-escaped).
        self._raw.write(pydantic_core.to_json(record) + b"\n")
        self.rows += 1

    def write_all(self, records: Iterable[BaseModel | dict[str, Any]]) -> None:
        for r in records:
            self.write(r)


@contextmanager
def write_jsonl(store: Store, rel: str, *, durable: bool = True) -> Iterator[JsonlWriter]:
    """Write REL atomically as JSONL; afterwards `writer.result` is a WrittenJsonl."""
    with store.open_write(rel, durable=durable) as raw:
        writer = JsonlWriter(raw)
        yield writer
    written = raw.result
    writer.result = WrittenJsonl(written.name, written.sha256, written.bytes, writer.rows)  # type: ignore[attr-defined]
