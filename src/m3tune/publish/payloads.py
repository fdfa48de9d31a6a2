"""Each passage's payload in the new collection: the production collection's own, else built from the corpus.

The search application reads the payloads it wrote itself (titles, links, whatever it keeps); a new
collection must carry them over unchanged, matched by the passage id payload key. A passage production
does not have yet gets the corpus's fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from m3tune.errors import UserError
from m3tune.records import Passage


def corpus_payload(p: Passage, key: str) -> dict[str, Any]:
    return {key: p.id, "source": p.source, "collection": p.collection, "text": p.text,
            "translation_en": p.translation_en}


def production_payloads(prod, collection: str, key: str, corpus_ids: set[str]) -> dict[str, dict[str, Any]]:
    """{passage id: payload} of every point of COLLECTION. A point without KEY, a passage held twice, or a
    passage the corpus lacks is an error: publishing would drop or duplicate what the application serves."""
    out: dict[str, dict[str, Any]] = {}
    offset = None
    while True:
        points, offset = prod.call(f"scroll {collection!r}", prod.client.scroll, collection, limit=1024,
                                   offset=offset, with_payload=True, with_vectors=False)
        for point in points:
            payload = point.payload or {}
            if key not in payload:
                raise UserError(f"Qdrant collection {collection!r}: point {point.id} has no {key!r} payload, so its "
                                f"payload cannot be matched to a passage (set payload_key)")
            pid = str(payload[key])
            if pid in out:
                raise UserError(f"Qdrant collection {collection!r} holds passage {pid!r} in more than one point "
                                "(chunks?): publish writes one point per passage")
            out[pid] = payload
        if offset is None:
            break
    extra = sorted(set(out) - corpus_ids)
    if extra:
        raise UserError(f"Qdrant collection {collection!r} holds {len(extra)} passage(s) the run's corpus lacks "
                        f"({', '.join(extra[:5])}): publishing would drop them from search; nothing changed")
    return out


def payloads(passages: Sequence[Passage], copied: dict[str, dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return [copied.get(p.id) or corpus_payload(p, key) for p in passages]
