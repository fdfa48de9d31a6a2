"""One search interface, three engines.

- `ExactIndex`: chunked matrix product and a partial sort, in numpy: exact,
  no server, memory-bounded by the chunk size.
- `EdgeIndex`: Qdrant's own Rust engine in-process (`qdrant-edge-py`), a
  shard folder on local disk built from the index step's vectors: the
  embedded default of the qdrant backend (exact search, or HNSW).
- `QdrantIndex`: a Qdrant collection through `qdrant-client`, on a server
  (`url`), where it can also be an existing production collection whose
  points already hold the vectors and a `passage_id` payload; or in
  qdrant-client's local mode (`path`), kept only to search a collection made
  that way (`existing: true` without a URL) and as the tests' in-process
  stand-in for a server (the same client calls).

Both return, per query, the K best (score, passage id) pairs, best first.
Scores are inner products of L2-normalised vectors, i.e. cosine similarity.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence

import numpy as np

from m3tune.errors import UserError

log = logging.getLogger("m3tune.index")

Hits = list[list[tuple[float, str]]]

# Local mode warns past 20,000 points (our corpus has 21,176); its cost is measured in
# docs/benchmarks.md instead, and a server is one option away (qdrant_url).
warnings.filterwarnings("ignore", message="Local mode is not recommended", category=UserWarning)


class ExactIndex:
    def __init__(self, vectors: np.ndarray, ids: Sequence[str], *, chunk: int = 512):
        if len(vectors) != len(ids):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.ids = list(ids)
        self.chunk = chunk

    def search(self, queries: np.ndarray, k: int) -> Hits:
        k = min(k, len(self.ids))
        out: Hits = []
        for start in range(0, len(queries), self.chunk):
            top_scores, top = _top_k(queries[start:start + self.chunk] @ self.vectors.T, k)
            for row_idx, row_scores in zip(top.tolist(), top_scores.tolist()):
                out.append([(s, self.ids[i]) for s, i in zip(row_scores, row_idx)])
        return out


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, column indices) of each row's K best, best first.

    torch.topk when torch is there (the encoder brings it): multithreaded,
    ~6x numpy's single-threaded argpartition on 512 x 21,176 scores; numpy
    otherwise, so exact search needs no torch.
    """
    try:
        import torch
    except ImportError:
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
            np.tile(np.arange(scores.shape[1]), (len(scores), 1))
        top_scores = np.take_along_axis(scores, top, axis=1)
    else:
        values, indices = torch.topk(torch.from_numpy(np.ascontiguousarray(scores)), k, dim=1, sorted=True)
        top_scores, top = values.numpy(), indices.numpy()
    # best first, equal scores (twin passages) by row: neither topk nor argpartition orders ties
    order = np.lexsort((top, -top_scores), axis=1)
    return np.take_along_axis(top_scores, order, axis=1), np.take_along_axis(top, order, axis=1)


class EdgeIndex:
    """A Qdrant Edge shard at PATH whose point ids are row numbers of the index step's vectors.

    The shard is m3tune's own cache, rebuilt from `vectors.npy` wherever it is missing, so it keeps no
    payload: ids.jsonl maps rows to passage ids. `m3tune.json` beside the shard says what was built
    (rows, dimension, ids digest, graph settings); it is written last and the folder is published by
    rename, so a killed build leaves no shard that looks complete.
    """

    MARKER = "m3tune.json"

    def __init__(self, path: str):
        self.path = path
        self.where = path

    def built(self) -> dict | None:
        """What the shard at PATH holds (its marker), or None where there is none."""
        try:
            with open(os.path.join(self.path, self.MARKER)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("unreadable %s: %s (the shard will be rebuilt)", os.path.join(self.path, self.MARKER), e)
            return None

    @staticmethod
    def wanted(vectors: np.ndarray, ids: Sequence[str], *, graph: bool, m: int, ef_construct: int) -> dict:
        import hashlib

        digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()
        return {"rows": int(len(vectors)), "dim": int(vectors.shape[1]), "ids_sha256": digest,
                "graph": {"m": m, "ef_construct": ef_construct} if graph else None}

    def build(self, vectors: np.ndarray, ids: Sequence[str], *, graph: bool, m: int, ef_construct: int,
              batch: int = 4096, full_scan_kb: int = 10_000) -> dict:
        """(Re)build the shard: every row as point ROW; an HNSW graph (M, EF_CONSTRUCT) where GRAPH, else
        none (exact search only). Built in a sibling folder, then swapped in. As in Qdrant, vectors under
        FULL_SCAN_KB (10 MB: 6,500 384-d vectors) get no graph: a full scan of them is faster and exact."""
        import qdrant_edge as qe

        if len(vectors) != len(ids):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        marker = self.wanted(vectors, ids, graph=graph, m=m, ef_construct=ef_construct)
        parent, name = os.path.split(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        _remove_leftovers(parent, name)
        tmp = os.path.join(parent, f"{name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=int(vectors.shape[1]), distance=qe.Distance.Dot),
            hnsw_config=qe.HnswIndexConfig(m=m, ef_construct=ef_construct, full_scan_threshold=full_scan_kb),
            # indexing_threshold 0: no graph is built; without a WAL, flush() is what makes the shard durable
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=full_scan_kb if graph else 0), wal_enabled=False)
        try:
            shard = qe.EdgeShard.create(os.path.join(tmp, "shard"), config)
            try:
                for start in range(0, len(vectors), batch):
                    rows = vectors[start:start + batch].tolist()
                    shard.update(qe.UpdateOperation.upsert_points(
                        [qe.Point(start + i, row) for i, row in enumerate(rows)]))
                shard.optimize()  # builds the graph (where GRAPH) before the shard is published
                shard.flush()
                marker["indexed"] = int(shard.info().indexed_vectors_count)
            finally:
                shard.close()
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"Qdrant Edge: building the shard in {tmp} failed: {type(e).__name__}: {str(e)[:300]}") from None
        with open(os.path.join(tmp, self.MARKER), "w") as f:
            json.dump(marker, f)
        if os.path.exists(self.path):
            old = os.path.join(parent, f"{name}.old-{os.getpid()}")
            os.rename(self.path, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, self.path)
        return marker

    def matches(self, vectors: np.ndarray, ids: Sequence[str], *, graph: bool, m: int, ef_construct: int) -> bool:
        """Whether the shard at PATH was built from these rows with these graph settings."""
        built = self.built() or {}
        return {k: built.get(k) for k in ("rows", "dim", "ids_sha256", "graph")} == \
            self.wanted(vectors, ids, graph=graph, m=m, ef_construct=ef_construct)

    def count(self) -> int:
        return int((self.built() or {}).get("rows", 0))

    def search(self, queries: np.ndarray, k: int, ids: Sequence[str], *, exact: bool, ef: int,
               batch: int = 256) -> Hits:
        """Top K rows per query as (score, IDS[row]); EXACT: brute force in the engine, else HNSW with EF
        candidates (at least K: Qdrant takes the larger)."""
        import qdrant_edge as qe

        marker = self.built()
        if marker is None:
            raise UserError(f"no Qdrant Edge shard at {self.path}: run the index step")
        if marker["rows"] != len(ids) or marker["dim"] != queries.shape[1]:
            raise UserError(f"the Qdrant Edge shard at {self.path} holds {marker['rows']:,} {marker['dim']}-d "
                            f"vectors; the index has {len(ids):,} rows and the queries {queries.shape[1]} dims")
        if not exact and marker["graph"] is None:
            raise UserError(f"the Qdrant Edge shard at {self.path} has no HNSW graph (built for exact search)")
        try:
            shard = qe.EdgeShard.load(os.path.join(self.path, "shard"))
        except Exception as e:
            raise UserError(f"cannot open the Qdrant Edge shard at {self.path}: {str(e)[:300]} "
                            "(delete the folder; the next run rebuilds it)") from None
        params = qe.SearchParams(exact=True) if exact else qe.SearchParams(hnsw_ef=ef)

        def query(vectors: list, limit: int) -> list[list[tuple[float, int]]]:
            requests = [qe.QueryRequest(limit=limit, query=qe.Query.Nearest(q), params=params) for q in vectors]
            return [[(p.score, int(p.id)) for p in points]
                    for points in shard.query_batch(qe.QueryBatchRequest(requests))]

        # Equal scores (a hadith repeated word for word: the same vector) come back from the engine in an
        # order that changes from one build to the next, so which twins make the top K would too (an S3 run
        # and a local one differed so). Ties are broken by row, as the exact backend orders them: each query
        # asks for more than K until the tie at its K-th score is wholly inside what came back.
        out: Hits = []
        try:
            for start in range(0, len(queries), batch):
                vectors = queries[start:start + batch].tolist()
                limit = min(k + 16, len(ids))
                found = query(vectors, limit)
                while True:
                    # the engine returns best first: the tie is open where the last returned equals the K-th
                    open_ties = [i for i, points in enumerate(found)
                                 if len(points) == limit < len(ids) and points[-1][0] == points[k - 1][0]]
                    if not open_ties:
                        break
                    limit = min(limit * 4, len(ids))
                    for i, points in zip(open_ties, query([vectors[i] for i in open_ties], limit)):
                        found[i] = points
                for points in found:
                    out.append([(float(score), ids[row]) for score, row in sorted(points, key=lambda p: (-p[0], p[1]))[:k]])
        except Exception as e:
            raise UserError(f"Qdrant Edge search in {self.path} failed: {type(e).__name__}: {str(e)[:300]}") from None
        finally:
            shard.close()
        return out


def _remove_leftovers(parent: str, name: str) -> None:
    """Folders a killed build left beside NAME (NAME.tmp-PID, NAME.old-PID) whose process is gone."""
    for entry in os.listdir(parent):
        stem, _, pid = entry.rpartition("-")
        if stem in (f"{name}.tmp", f"{name}.old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class QdrantIndex:
    def __init__(self, collection: str, *, path: str | None = None, url: str | None = None,
                 api_key: str | None = None, timeout: int = 60):
        from qdrant_client import QdrantClient

        self.collection = collection
        try:
            self.client = QdrantClient(url=url, api_key=api_key, timeout=timeout, check_compatibility=False) if url else \
                QdrantClient(path=path) if path else QdrantClient(":memory:")
        except Exception as e:  # qdrant-client raises many kinds: connection, lock, value
            raise UserError(f"cannot open Qdrant {'at ' + url if url else 'in ' + str(path)}: {e}") from None
        self.where = url or path or ":memory:"
        self.remote = bool(url)

    def _call(self, what: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"Qdrant {what} on collection {self.collection!r} at {self.where} failed: "
                            f"{type(e).__name__}: {str(e)[:300]}") from None

    def exists(self) -> bool:
        return bool(self._call("collection_exists", self.client.collection_exists, self.collection))

    def count(self) -> int:
        return int(self._call("count", self.client.count, self.collection, exact=True).count)

    def made_by_m3tune(self) -> bool:
        info = self._call("get_collection", self.client.get_collection, self.collection)
        return (info.config.metadata or {}).get("created_by") == "m3tune"

    def check_matches(self, vectors: np.ndarray, ids: Sequence[str], sample: int = 16) -> None:
        """An existing collection must hold these vectors: same size, dot/cosine distance, same sample vectors."""
        from qdrant_client import models

        info = self._call("get_collection", self.client.get_collection, self.collection)
        params = info.config.params.vectors
        if getattr(params, "size", None) != vectors.shape[1]:
            raise UserError(f"Qdrant collection {self.collection!r} holds {getattr(params, 'size', '?')}-d vectors; "
                            f"this encoder makes {vectors.shape[1]}-d ones")
        if params.distance not in (models.Distance.DOT, models.Distance.COSINE):
            raise UserError(f"Qdrant collection {self.collection!r} uses {params.distance} distance; "
                            "mining needs dot or cosine")
        row = {pid: i for i, pid in enumerate(ids)}
        wanted = [ids[i] for i in np.linspace(0, len(ids) - 1, num=min(sample, len(ids)), dtype=int)]
        found = self._call("scroll", self.client.scroll, self.collection, with_vectors=True, limit=len(wanted),
                           scroll_filter=models.Filter(must=[models.FieldCondition(
                               key="passage_id", match=models.MatchAny(any=wanted))]))[0]
        if not found:
            raise UserError(f"Qdrant collection {self.collection!r} has none of the corpus's passages "
                            "(no point with those passage_id payloads)")
        for point in found:
            theirs = np.asarray(point.vector, dtype=np.float32)
            ours = vectors[row[point.payload["passage_id"]]]
            if float(theirs @ ours / (np.linalg.norm(theirs) * np.linalg.norm(ours) + 1e-12)) < 0.99:
                raise UserError(f"Qdrant collection {self.collection!r}: the vector of {point.payload['passage_id']} "
                                "is not this encoder's: index it with the same model, or name another collection")

    def build(self, vectors: np.ndarray, ids: Sequence[str], sources: Sequence[str], *, m: int | None = None,
              ef_construct: int | None = None) -> None:
        """(Re)create the collection with VECTORS; payload: passage id and source. Marked as made by m3tune.
        M, EF_CONSTRUCT: the collection's HNSW graph (None: the server's defaults)."""
        from qdrant_client import models

        if self.exists():
            if not self.made_by_m3tune():
                raise UserError(f"Qdrant collection {self.collection!r} exists at {self.where} and was not made "
                                "by m3tune: refusing to replace it (use existing: true to search it as it is)")
            self._call("delete_collection", self.client.delete_collection, self.collection)
        self._call("create_collection", self.client.create_collection, self.collection,
                   vectors_config=models.VectorParams(size=int(vectors.shape[1]), distance=models.Distance.DOT),
                   hnsw_config=models.HnswConfigDiff(m=m, ef_construct=ef_construct) if m or ef_construct else None,
                   metadata={"created_by": "m3tune"})
        self._call("upload_collection", self.client.upload_collection, self.collection, vectors=vectors,
                   payload=[{"passage_id": i, "source": s} for i, s in zip(ids, sources)],
                   ids=list(range(len(ids))), batch_size=256, wait=True)

    def search(self, queries: np.ndarray, k: int, *, batch: int = 64, exact: bool = True,
               ef: int | None = None) -> Hits:
        """Top K passages per query. EXACT asks a server for exact search rather than HNSW's approximation
        (with EF candidates; None: the server's default); a passage stored as several points (chunks) counts
        once, at its best score."""
        from qdrant_client import models

        if not self.exists():
            raise UserError(f"Qdrant collection {self.collection!r} does not exist at {self.where}")
        out: Hits = []
        # local mode is always exact
        params = models.SearchParams(exact=exact, hnsw_ef=None if exact else ef) if self.remote else None
        for start in range(0, len(queries), batch):
            requests = [models.QueryRequest(query=q.tolist(), limit=k, with_payload=["passage_id"], params=params)
                        for q in queries[start:start + batch]]
            for response in self._call("query", self.client.query_batch_points, self.collection, requests=requests):
                hits, seen = [], set()
                for p in response.points:
                    if not p.payload or "passage_id" not in p.payload:
                        raise UserError(f"Qdrant collection {self.collection!r}: point {p.id} has no passage_id payload")
                    pid = str(p.payload["passage_id"])
                    if pid not in seen:
                        seen.add(pid)
                        hits.append((float(p.score), pid))
                out.append(hits)
        return out

    def close(self) -> None:
        self.client.close()
