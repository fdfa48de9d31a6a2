"""The run's corpus (ROOT/ingest/passages.jsonl), read and validated once per process.

Several steps of one `m3tune run` read the same 21,176 passages; validating
them takes ~0.3 s each time. They are kept per run root and per published
digest, so a rerun of ingest is seen.
"""

from __future__ import annotations

from m3tune.records import Passage
from m3tune.storage import Store

_READ: dict[tuple[str, str], list[Passage]] = {}


def read_passages(root: Store) -> list[Passage]:
    """The passages ingested in ROOT (a shared list: do not modify it)."""
    from m3tune.errors import UserError
    from m3tune.jsonl import read_records
    from m3tune.manifest import read_manifest

    manifest = read_manifest(root.child("ingest"))
    if manifest is None:
        raise UserError(f"no corpus: the ingest step has not finished in {root.uri}")
    key = (root.uri, manifest.outputs["passages.jsonl"].sha256)
    if key not in _READ:
        _READ.clear()  # one corpus at a time is enough
        _READ[key] = list(read_records(root.child("ingest"), "passages.jsonl", Passage))
    return _READ[key]
