"""Reliability round 3: odd local inputs, tampered run roots, data and config accepted silently.

Each test names what happened before its fix. A traceback is the CliRunner's `exception` being anything but
SystemExit; a one-line error is the last line of stderr.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from m3tune.cli import app
from m3tune.errors import BadInput, ConfigError, UserError
from m3tune.jsonl import RecordError, read_jsonl
from m3tune.records import Example, GoldQuery, Passage, PassageInput, Query


def cli(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def _last_error(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def _no_traceback(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"traceback: {result.exception!r}\n{result.output}"


def _read(model, text: str, name: str = "f.jsonl") -> list:
    return list(read_jsonl(io.BytesIO(text.encode()), model, name=name))


def _passage(**over) -> dict:
    row = {"id": "u:1", "source": "hadith", "collection": "u", "text": "نص", "text_plain": "نص", "meta": {}}
    row.update(over)
    return row


# ---------------------------------------------------------------------------------- 3. data accepted silently

def test_a_10_mb_meta_value_is_refused_with_file_line_and_field():
    # Before: accepted, then carried, copied and published by every later step.
    line = json.dumps(_passage(meta={"note": "x" * 10_000_000}))
    with pytest.raises(RecordError, match=r"^f.jsonl:1: field 'meta': .*MAX_META_CHARS"):
        _read(Passage, line)


@pytest.mark.parametrize("model,row,field", [
    (Passage, _passage(text_plain=" "), "text_plain"),
    (PassageInput, {"id": "u:1", "source": "hadith", "text": " \t "}, "text"),
    (Query, {"id": "q1", "query": "  ", "language": "ar", "type": "question", "positive_ids": ["u:1"],
             "source": "hadith", "generator": {"backend": "b", "model": "m", "prompt_version": "v"}}, "query"),
    (Example, {"query": "ما الصبر", "pos": [" "]}, "pos.0"),
])
def test_blank_text_is_refused_with_the_field(model, row, field):
    # Before: " " passed min_length=1 and was searched, indexed and trained on as a text.
    with pytest.raises(RecordError, match=rf"^f.jsonl:1: field '{field}': String should match pattern"):
        _read(model, json.dumps(row))


def test_duplicate_json_keys_are_refused_with_the_key():
    # Before: pydantic's parser kept the last value: {"text": "a", ..., "text": "b"} silently became "b".
    line = '{"id": "u:1", "source": "hadith", "text": "نص", "source": "quran"}'
    with pytest.raises(RecordError, match=r"^f.jsonl:2: field 'source': duplicate key"):
        _read(PassageInput, '{"id": "u:0", "source": "hadith", "text": "نص"}\n' + line)
    nested = '{"id": "u:1", "source": "hadith", "text": "نص", "meta": {"g": 1, "g" : 2}}'
    with pytest.raises(RecordError, match=r"^f.jsonl:1: field 'g': duplicate key"):
        _read(PassageInput, nested)


def test_a_5_million_character_query_never_reaches_train_jsonl(tmp_path):
    # Before: accepted by combine (Text had no upper bound) and written to train.jsonl.
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"query": "س" * 5_000_000, "pos": ["نص"]}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    with pytest.raises(RecordError, match=r"in.jsonl:1: field 'query': String should have at most 4000 characters"):
        list(read_jsonl(rows.open("rb"), Example, name=str(rows)))


def test_a_line_beyond_the_line_limit_is_refused_without_reading_it_whole(monkeypatch):
    from m3tune import jsonl

    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 100)
    text = '{"query": "ما", "pos": ["' + "x" * 500 + '"]}\n{"query": "ما", "pos": ["نص"]}\n'
    with pytest.raises(RecordError, match=r"^f.jsonl:1: line longer than 100 bytes"):
        _read(Example, text)
    rejects = jsonl.Rejects()
    kept = list(read_jsonl(io.BytesIO(text.encode()), Example, name="f.jsonl", rejects=rejects))
    assert len(kept) == 1 and rejects.rows[0]["line"] == 1
