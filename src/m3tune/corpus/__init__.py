"""The corpus: packaged Quran and hadith texts, read offline, and the ingest step."""
