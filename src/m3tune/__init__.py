"""m3tune: fine-tune BGE-M3 for Arabic Islamic search (Quran and Hadith)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("m3tune")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
