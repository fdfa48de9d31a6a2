"""The production Qdrant: the alias the search application queries, the collections behind it, and the
record m3tune keeps on each collection it publishes.

Qdrant moves an alias inside one `update_collection_aliases` call, atomically: a search of the alias finds
the old collection or the new one, never neither. The record lives in the collection's own metadata
(`created_by: m3tune` and `m3tune: {...}`): the alias it was made for, the run and model it holds, the
gate's result, its verification, and the collection it replaced (`previous`: what rollback goes back to).
Only a collection whose record says m3tune published it for the same alias is ever deleted.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from typing import Any

from m3tune.errors import ConfigError, UserError

log = logging.getLogger("m3tune.publish")

MADE_BY = "m3tune"
RECORD = "m3tune"  # the metadata key of m3tune's record
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
# Local mode warns past 20,000 points (our corpus has 21,176): it serves tests and laptops; production is a
# server (qdrant_url). Its cost is in docs/benchmarks.md.
warnings.filterwarnings("ignore", message="Local mode is not recommended", category=UserWarning)


def check_alias(alias: str) -> str:
    if not _NAME.match(alias):
        raise ConfigError(f"alias {alias!r}: use 1-100 letters, digits, '_' or '-'")
    return alias


class Production:
    """A Qdrant client (server with URL, else local mode in PATH) whose failures are one clear line."""

    def __init__(self, *, url: str | None = None, path: str | None = None, api_key: str | None = None,
                 timeout: float = 60):
        from qdrant_client import QdrantClient

        if not url and not path:
            raise ConfigError("no Qdrant given: a server URL (qdrant_url / QDRANT_URL) or a local folder (qdrant_path)")
        try:
            self.client = QdrantClient(url=url, api_key=api_key, timeout=int(timeout), check_compatibility=False) \
                if url else QdrantClient(path=path)
        except Exception as e:  # qdrant-client raises many kinds: connection, lock, value
            raise UserError(f"cannot open Qdrant {'at ' + url if url else 'in ' + str(path)}: {e}") from None
        self.where = url or str(path)
        self.remote = bool(url)

    def call(self, what: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"Qdrant {what} at {self.where} failed: {type(e).__name__}: {str(e)[:300]}") from None

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------------------------------- reading

    def aliases(self) -> dict[str, str]:
        """{alias: collection} of every alias."""
        return {a.alias_name: a.collection_name
                for a in self.call("get_aliases", self.client.get_aliases).aliases}

    def alias_target(self, alias: str) -> str | None:
        return self.aliases().get(alias)

    def collections(self) -> list[str]:
        return [c.name for c in self.call("get_collections", self.client.get_collections).collections]

    def is_collection(self, name: str) -> bool:
        """NAME is a collection itself (an alias of that name answers collection_exists too)."""
        return name in self.collections()

    def metadata(self, name: str) -> dict[str, Any]:
        info = self.call(f"get_collection {name!r}", self.client.get_collection, name)
        return dict(info.config.metadata or {})

    def record(self, name: str) -> dict[str, Any] | None:
        """m3tune's publish record on collection NAME; None when m3tune did not publish it."""
        meta = self.metadata(name)
        rec = meta.get(RECORD)
        return rec if meta.get("created_by") == MADE_BY and isinstance(rec, dict) and rec.get("alias") else None

    def vector_size(self, name: str) -> int:
        """The size of NAME's (unnamed) dense vector; named vectors are refused, with what they are."""
        params = self.call(f"get_collection {name!r}", self.client.get_collection, name).config.params.vectors
        if isinstance(params, dict):
            raise UserError(f"Qdrant collection {name!r} at {self.where} has named vectors ({', '.join(params)}): "
                            "publish writes one unnamed dense vector per point (named dense, sparse and multi-vector "
                            "heads will follow with issue [6/7])")
        return int(params.size)

    def count(self, name: str) -> int:
        return int(self.call(f"count {name!r}", self.client.count, name, exact=True).count)

    # ------------------------------------------------------------------------------------------- changing

    def create(self, name: str, *, size: int, record: dict[str, Any]) -> None:
        from qdrant_client import models

        self.call(f"create_collection {name!r}", self.client.create_collection, name,
                  vectors_config=models.VectorParams(size=size, distance=models.Distance.DOT),
                  metadata={"created_by": MADE_BY, RECORD: record})

    def set_record(self, name: str, record: dict[str, Any]) -> None:
        self.call(f"update_collection {name!r}", self.client.update_collection, name,
                  metadata={"created_by": MADE_BY, RECORD: record})

    def switch(self, alias: str, to: str, *, expected: str | None) -> float:
        """Point ALIAS at TO in one atomic call; EXPECTED is where it must point now (None: nowhere), so a
        publish never undoes a switch someone made meanwhile. Returns the call's seconds."""
        from qdrant_client import models

        now = self.alias_target(alias)
        if now != expected:
            raise UserError(f"alias {alias!r} at {self.where} now points to {now!r}, not {expected!r} as when this "
                            "publish began: someone else moved it; nothing changed, rerun to publish over it")
        ops: list[Any] = []
        if expected is not None:
            ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
        ops.append(models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=to, alias_name=alias)))
        t0 = time.perf_counter()
        self.call(f"update_collection_aliases {alias!r} -> {to!r}", self.client.update_collection_aliases,
                  change_aliases_operations=ops)
        return time.perf_counter() - t0

    def delete_old(self, alias: str, *, keep: int, current: str) -> list[str]:
        """Delete the collections m3tune published for ALIAS beyond the KEEP most recent ones other than
        CURRENT; never one any alias points to, never one m3tune did not publish for ALIAS."""
        aliased = set(self.aliases().values())
        ours = []
        for name in self.collections():
            if name == current or name in aliased:
                continue
            rec = self.record(name)
            if rec is not None and rec.get("alias") == alias:
                ours.append((rec.get("published_at") or "", name))  # never published (a failed upload): oldest
        ours.sort(reverse=True)
        deleted = []
        for _, name in ours[keep:]:
            self.call(f"delete_collection {name!r}", self.client.delete_collection, name)
            log.info("deleted %s (published by m3tune for %s; more than --keep %d behind)", name, alias, keep)
            deleted.append(name)
        return deleted


def rollback(prod: Production, alias: str) -> tuple[str, str]:
    """Point ALIAS back at the collection its current one replaced; (from, to)."""
    check_alias(alias)
    current = prod.alias_target(alias)
    if current is None:
        raise UserError(f"alias {alias!r} does not exist at {prod.where}: nothing to roll back")
    rec = prod.record(current)
    previous = (rec or {}).get("previous")
    if not previous:
        why = "was not published by m3tune" if rec is None else "replaced nothing (the alias's first publish)"
        raise UserError(f"alias {alias!r} points to {current!r}, which {why}: no previous collection to go back to")
    if previous not in prod.collections():
        raise UserError(f"alias {alias!r}: the previous collection {previous!r} no longer exists at {prod.where} "
                        "(deleted past --keep?): nothing changed")
    if prod.vector_size(previous) != prod.vector_size(current):
        raise UserError(f"alias {alias!r}: the previous collection {previous!r} holds {prod.vector_size(previous)}-d "
                        f"vectors, the current {prod.vector_size(current)}-d: the application's queries would not "
                        "fit; nothing changed")
    prod.switch(alias, previous, expected=current)
    log.info("alias %s: %s -> %s (rolled back)", alias, current, previous)
    return current, previous


def published(prod: Production) -> list[dict[str, Any]]:
    """Per alias: the collection it points to and, when m3tune published it, why (run, model, gate, metrics)."""
    rows = []
    for alias, collection in sorted(prod.aliases().items()):
        rec = prod.record(collection) or {}
        rows.append({"alias": alias, "collection": collection, "made_by_m3tune": bool(rec),
                     "points": prod.count(collection),
                     **{k: rec.get(k) for k in ("run_id", "root", "model", "dim", "published_at", "previous",
                                                 "forced", "gate", "metrics")}})
    return rows
