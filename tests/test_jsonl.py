import io
import json

import pytest

from m3tune.jsonl import RecordError, Rejects, read_jsonl, read_records, write_jsonl
from m3tune.records import Example, GoldQuery, Passage, Query

GOOD = {"id": "quran:2:153", "source": "quran", "collection": "quran", "text": "يَٰٓأَيُّهَا ٱلَّذِينَ",
        "text_plain": "يا ايها الذين", "translation_en": "O you who have believed", "meta": {"surah": 2}}


def lines(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode()) + b"\n" for r in rows)


def read(data: bytes, model=Passage, rejects=None):
    return list(read_jsonl(io.BytesIO(data), model, name="passages.jsonl", rejects=rejects))


def test_valid_rows_round_trip(local_root):
    rows = [Passage(**GOOD), Passage(**{**GOOD, "id": "bukhari:1", "source": "hadith", "collection": "bukhari"})]
    with write_jsonl(local_root, "p.jsonl") as w:
        w.write_all(rows)
    assert w.result.rows == 2
    raw = local_root.read_bytes("p.jsonl")
    assert "يَٰٓأَيُّهَا".encode() in raw  # Arabic written as UTF-8, not \u-escaped
    assert list(read_records(local_root, "p.jsonl", Passage)) == rows


@pytest.mark.parametrize("bad_line, line, field, message", [
    (b'{"id": "quran:1:1", "source": "quran",', 2, None, "invalid JSON"),
    ({k: v for k, v in GOOD.items() if k != "text"}, 2, "text", "missing required field"),
    ({**GOOD, "meta": "surah 2"}, 2, "meta", "should be an object"),
    ({**GOOD, "source": "bible"}, 2, "source", "'quran' or 'hadith'"),
    ({**GOOD, "id": "../etc/passwd"}, 2, "id", "should match pattern"),
    ({**GOOD, "txt": "typo"}, 2, "txt", "unknown field"),
    (GOOD["text"].encode("utf-8")[:3] + b"\xff\xfe" + b'"}', 2, None, "not valid UTF-8"),
    (b"[1, 2]", 2, None, "expected a JSON object"),
])
def test_malformed_line_names_file_line_and_field(bad_line, line, field, message):
    with pytest.raises(RecordError) as info:
        read(lines(GOOD, bad_line, GOOD))
    err = info.value
    assert (err.path, err.line, err.field) == ("passages.jsonl", line, field)
    assert message in err.message
    assert str(err).startswith(f"passages.jsonl:{line}: ")


def test_wrong_type_in_nested_list():
    row = {"query": "q", "pos": ["a"], "neg": ["b", "c"], "neg_ids": ["quran:1:1", 5]}
    with pytest.raises(RecordError) as info:
        read(lines(row), Example)
    assert info.value.field == "neg_ids.1"


def test_parallel_lists_must_match():
    row = {"query": "q", "pos": ["a"], "neg": ["b"], "neg_scores": [0.1, 0.2]}
    with pytest.raises(RecordError, match="field 'neg_scores': Value error, has 2 items but neg has 1"):
        read(lines(row), Example)
    with pytest.raises(RecordError, match="field 'pos_scores.0'"):
        read(lines({"query": "q", "pos": ["a"], "pos_scores": [float("nan")]}), Example)


@pytest.mark.parametrize("data", [b"", b"\n\n  \n"])
def test_empty_file_is_an_error(data):
    with pytest.raises(RecordError, match="file is empty"):
        read(data)


def test_skip_invalid_keeps_every_valid_row_and_records_the_bad_ones():
    rejects = Rejects()
    data = lines(GOOD, b"{oops", {**GOOD, "id": "quran:1:2"}, b"\xff\xfe", {**GOOD, "source": 3}, {**GOOD, "id": "quran:1:3"})
    got = read(data, rejects=rejects)
    assert [p.id for p in got] == ["quran:2:153", "quran:1:2", "quran:1:3"]
    assert [(r["line"], r["field"]) for r in rejects.rows] == [(2, None), (4, None), (5, "source")]
    assert rejects.rows[0]["raw"] == "{oops"
    assert rejects.rows[1]["raw"] == "\\xff\\xfe"  # undecodable bytes kept, escaped


def test_blank_lines_and_crlf_are_tolerated():
    data = lines(GOOD).replace(b"\n", b"\r\n") + b"\n\n" + lines({**GOOD, "id": "quran:1:2"})
    assert len(read(data)) == 2


def test_example_keeps_flagembedding_extras():
    row = {"query": "q", "pos": ["a"], "neg": [], "prompt": "Represent this", "type": "question"}
    (ex,) = read(lines(row), Example)
    assert ex.model_extra == {"prompt": "Represent this"}
    assert json.loads(ex.model_dump_json())["prompt"] == "Represent this"


def test_query_and_gold_records():
    q = {"id": "q1", "query": "ما هو الصبر", "language": "ar", "type": "question", "positive_ids": ["quran:2:153"],
         "source": "quran", "generator": {"backend": "offline", "model": "none", "prompt_version": "v1"}}
    assert read(lines(q), Query)[0].positive_ids == ["quran:2:153"]
    with pytest.raises(RecordError) as info:
        read(lines({**q, "positive_ids": []}), Query)
    assert info.value.field == "positive_ids"
    g = {"id": "g1", "query": "الصبر", "relevant_ids": ["quran:2:153"], "category": "thematic", "language": "ar",
         "source": "quran", "difficulty": "medium"}
    assert read(lines(g), GoldQuery)[0].category == "thematic"
    with pytest.raises(RecordError) as info:
        read(lines({**g, "difficulty": "trivial"}), GoldQuery)
    assert info.value.field == "difficulty"
