"""Streaming JSONL: validated reading that names file, line and field; atomic writing.

Reading never loads a whole file: lines are validated one at a time with
pydantic's JSON parser (one pass in Rust, no intermediate dict). A bad line
either stops the read with a `RecordError` ("passages.jsonl:12: field
'source': ...") or, when a `Rejects` sink is given, is written there verbatim
with the reason and skipped, so nothing valid is lost either way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError

from m3tune.errors import BadInput
from m3tune.records import NOT_BLANK
from m3tune.storage import Store, WrittenFile

M = TypeVar("M", bound=BaseModel)

# The longest line a reader takes. The largest real record (an example with its positives and tens of mined
# negatives, each at most records.MAX_PASSAGE_CHARS) is a few megabytes; a line of hundreds of megabytes is a
# file without newlines or a hostile one, and reading it whole would take the pod's memory before any check.
MAX_LINE_BYTES = 32 * 1024 * 1024


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
    if kind == "string_pattern_mismatch" and first.get("ctx", {}).get("pattern") == NOT_BLANK:
        return field, "blank: white space only, no text" + suffix
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


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> None:
    # object_pairs_hook: called for every object of the line, nested ones too, with its keys in order
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKey(next(k for i, k in enumerate(keys) if k in keys[:i]))


def _duplicate_key(raw: bytes) -> str | None:
    """The first key that appears twice in one object of the valid JSON line RAW, else None. pydantic's
    parser, like every JSON parser, keeps the last value: {"text": "a", "text": "b"} would silently be "b"."""
    if raw.count(b":") < 2:  # fewer than two keys: nothing to compare
        return None
    try:
        json.loads(raw, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        return e.key
    except ValueError:  # what pydantic accepted and json does not (cannot happen for valid JSON): no verdict
        return None
    return None


def _lines(stream: BinaryIO) -> Iterator[tuple[bytes, bool]]:
    """(line, too long) for each line of STREAM; a line over MAX_LINE_BYTES is skipped to its end unread."""
    while True:
        raw = stream.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) <= MAX_LINE_BYTES or raw.endswith(b"\n"):
            yield raw, False
            continue
        while raw and not raw.endswith(b"\n"):  # drain the rest of the long line
            raw = stream.readline(MAX_LINE_BYTES)
        yield b"", True


def read_jsonl_numbered(stream: BinaryIO, model: type[M], *, name: str,
                        rejects: Rejects | None = None) -> Iterator[tuple[int, bytes, M]]:
    """As read_jsonl, with each record's line number and raw bytes (for errors found after parsing)."""
    validate = model.model_validate_json
    seen = 0
    for line_no, (raw, too_long) in enumerate(_lines(stream), start=1):
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as some editors write
            raw = raw[3:]
        raw = raw.strip()
        if not raw and not too_long:
            continue
        seen += 1
        try:
            if too_long:
                raise RecordError(name, line_no, None, f"line longer than {MAX_LINE_BYTES:,} bytes "
                                  "(jsonl.MAX_LINE_BYTES): one record a line, each far smaller")
            record = validate(raw)
            duplicate = _duplicate_key(raw)
            if duplicate is not None:
                raise RecordError(name, line_no, duplicate, "duplicate key: a JSON reader keeps only the last "
                                  "value; remove one")
            yield line_no, raw, record
        except ValidationError as e:
            field, message = _describe(e, raw)
            err = RecordError(name, line_no, field, message)
            if rejects is None:
                raise err from None
            rejects.add(err, raw)
        except RecordError as err:
            if rejects is None:
                raise
            rejects.add(err, raw[:10_000])
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
