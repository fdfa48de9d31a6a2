"""A run root: the one store every step and command reads and writes a run through.

Integrity wraps storage, never the other way round: `m3tune.storage` knows folders, atomic publishing and an
`Integrity` hook, and nothing of manifests; `m3tune.manifest` records what a step published and checks it
(RunIntegrity). `open_root` and `verified` put the two together, so a read of a published file is verified against its
step's manifest while it is read, and a change under a step's folder withdraws that step's manifest first,
whichever step or command does it.
"""

from __future__ import annotations

from m3tune.manifest import RunIntegrity
from m3tune.storage import S3Store, Store, StorageError, open_store, validate_run_id


def open_root(uri: str, *, s3_endpoint: str | None = None) -> Store:
    """The store of one run: its last path segment is the run id, validated."""
    store = open_store(uri, s3_endpoint=s3_endpoint)
    last = store.uri.rstrip("/").rsplit("/", 1)[-1]
    if isinstance(store, S3Store) and not store.prefix:
        raise StorageError(f"invalid run root {uri!r}: expected s3://bucket/prefix/RUN_ID")
    validate_run_id(last)
    return verified(store)


def verified(root: Store) -> Store:
    """ROOT, a run's folder, as its run root: reads verified against the manifests, changes announced to them.
    A view of its own over the manifest cache every view of that root shares, so a root handed over bare (by a
    test, a benchmark) is verified too."""
    return root.with_integrity(RunIntegrity(root))
