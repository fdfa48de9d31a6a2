"""Upload the points a collection lacks: batched, in parallel, each batch retried on 5xx and timeouts.

Point i is passage i of the corpus (its row in passages.jsonl), so the collection's own point ids say
what a killed upload already wrote: a rerun asks for them and sends only the rest.

Own code rather than qdrant-client's `upload_points`: that one parallelises with processes (each
re-importing the client and re-sending its share, and impossible in local mode), retries every error
alike (a 400 for a wrong vector size is retried as often as a 503) and cannot skip what is there.
Threads over one client suffice: the work is waiting on the server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from m3tune.errors import UserError

log = logging.getLogger("m3tune.publish")


def transient(e: BaseException) -> bool:
    """A failure worth retrying: a 5xx (or 429), a timeout, a dropped connection; not a 4xx."""
    import httpx
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    if isinstance(e, UnexpectedResponse):
        return e.status_code >= 500 or e.status_code == 429
    # the client wraps transport failures (timeouts, resets, refused connections) in ResponseHandlingException
    return isinstance(e, (ResponseHandlingException, httpx.TransportError, TimeoutError, ConnectionError))


def present_ids(prod, collection: str) -> set[int]:
    """The ids of the points COLLECTION holds (ids only: no payload, no vector)."""
    ids: set[int] = set()
    offset = None
    while True:
        points, offset = prod.call(f"scroll {collection!r}", prod.client.scroll, collection, limit=10_000,
                                   offset=offset, with_payload=False, with_vectors=False)
        ids.update(int(p.id) for p in points)
        if offset is None:
            return ids


def _with_retries(send: Callable[[], Any], *, what: str, max_retries: int, backoff: float) -> int:
    """Call SEND until it succeeds; retry transient failures up to MAX_RETRIES times, waiting BACKOFF,
    2 x BACKOFF, ... (at most 30 s). Returns the retries it took."""
    for attempt in range(max_retries + 1):
        try:
            send()
            return attempt
        except Exception as e:
            if not transient(e) or attempt == max_retries:
                tries = f" after {attempt + 1} tries" if attempt else ""
                raise UserError(f"{what} failed{tries}: {type(e).__name__}: {str(e)[:300]}") from None
            wait_s = min(30.0, backoff * 2 ** attempt)
            log.warning("%s: %s; retry %d of %d in %.1fs", what, str(e).splitlines()[0][:200], attempt + 1,
                        max_retries, wait_s)
            time.sleep(wait_s)
    raise AssertionError("unreachable")


def upload(prod, collection: str, vectors: np.ndarray, payloads: Sequence[dict[str, Any]], ids: Sequence[int], *,
           batch_size: int, parallel: int, max_retries: int, backoff: float,
           points: Callable[[list[int]], Any] | None = None) -> dict[str, Any]:
    """Upsert points IDS (rows of VECTORS and PAYLOADS) into COLLECTION; {points, batches, retries, seconds}.
    POINTS: builds a batch's points itself (named dense and sparse vectors); VECTORS and PAYLOADS are unused."""
    from qdrant_client import models

    batches = [list(ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)]
    retries = 0
    done = 0
    t0 = time.perf_counter()

    def send(batch: list[int]) -> int:
        sent = points(batch) if points is not None else models.Batch(
            ids=batch, vectors=vectors[batch].tolist(), payloads=[payloads[i] for i in batch])
        return _with_retries(lambda: prod.client.upsert(collection, points=sent, wait=True),
                             what=f"upload of points {batch[0]}-{batch[-1]} to {collection!r} at {prod.where}",
                             max_retries=max_retries, backoff=backoff)

    # Local mode is one process's files: one writer. A server takes PARALLEL batches at once.
    workers = parallel if prod.remote else 1
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="upload") as pool:
        pending = {pool.submit(send, b): len(b) for b in batches}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in finished:
                n = pending.pop(future)
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()  # type: ignore[misc]
                retries += future.result()
                before, done = done, done + n
                if done == len(ids) or done * 10 // len(ids) > before * 10 // len(ids):  # every tenth
                    log.info("uploaded %s of %s points", f"{done:,}", f"{len(ids):,}")
    seconds = time.perf_counter() - t0
    return {"points": len(ids), "batches": len(batches), "retries": retries, "seconds": round(seconds, 3),
            "points_per_second": round(len(ids) / seconds, 1) if ids and seconds else 0.0}
