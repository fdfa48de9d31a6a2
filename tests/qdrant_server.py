"""A Qdrant REST server on 127.0.0.1 for tests: the real Qdrant engine of qdrant-client's local mode behind
the REST endpoints that publish, rollback and searches use, so `QdrantClient(url=...)` talks HTTP to it as to
a Qdrant server.

Requests are parsed with the client's own REST models and answered with the engine's results in Qdrant's
envelope (`{"result", "status", "time"}`). One lock serialises the engine (local mode is single-threaded);
the HTTP side is threaded, so a reader and a parallel upload really overlap on the wire.

`latency` seconds are spent on each request outside the engine's lock, standing in for a network round
trip (benchmarks/bench_publish.py).

`hook(method, path)` runs before each request is handled: it may block (to hold a request while a test
kills the client), and a status code it returns is sent instead of handling the request (503 mid-upload).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import BaseModel

_COLLECTION = r"/collections/(?P<c>[^/]+)"



class QdrantRestServer:
    def __init__(self, path: str | None = None, *, latency: float = 0.0):
        from qdrant_client import QdrantClient

        self.engine = QdrantClient(path=path) if path else QdrantClient(":memory:")
        self.lock = threading.Lock()
        self.latency = latency
        self.hook: Callable[[str, str], int | None] | None = None
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of each answered request
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "QdrantRestServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.engine.close()

    # ------------------------------------------------------------------------------------------- routes

    def route(self, method: str, path: str, body: Any) -> Any:
        from qdrant_client.http import models as m

        e = self.engine
        routes: list[tuple[str, str, Callable[..., Any]]] = [
            ("GET", r"/collections", lambda: {"collections": [{"name": c.name} for c in e.get_collections().collections]}),
            ("GET", r"/aliases", lambda: e.get_aliases()),
            ("POST", r"/collections/aliases", lambda: e.update_collection_aliases(
                change_aliases_operations=m.ChangeAliasesOperation.model_validate(body).actions)),
            ("GET", _COLLECTION + r"/aliases", lambda c: e.get_collection_aliases(c)),
            ("GET", _COLLECTION + r"/exists", lambda c: {"exists": e.collection_exists(c)}),
            ("GET", _COLLECTION, lambda c: e.get_collection(c)),
            ("PUT", _COLLECTION, lambda c: self._create(c, m.CreateCollection.model_validate(body))),
            ("PATCH", _COLLECTION, lambda c: e.update_collection(
                c, metadata=m.UpdateCollection.model_validate(body).metadata)),
            ("DELETE", _COLLECTION, lambda c: e.delete_collection(c)),
            ("PUT", _COLLECTION + r"/points", lambda c: self._upsert(c, body)),
            ("POST", _COLLECTION + r"/points", lambda c: self._retrieve(c, m.PointRequest.model_validate(body))),
            ("POST", _COLLECTION + r"/points/count", lambda c: self._count(c, m.CountRequest.model_validate(body))),
            ("POST", _COLLECTION + r"/points/scroll", lambda c: self._scroll(c, m.ScrollRequest.model_validate(body))),
            ("POST", _COLLECTION + r"/points/query/batch", lambda c: e.query_batch_points(
                c, requests=[r.model_copy(update={"params": None})  # the engine is exact: it warns of params
                             for r in m.QueryRequestBatch.model_validate(body).searches])),
            ("POST", _COLLECTION + r"/points/query", lambda c: self._query(c, m.QueryRequest.model_validate(body))),
        ]
        for verb, pattern, fn in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                return fn(*match.groups())
        raise LookupError(f"{method} {path}: not served by this test server")

    def _create(self, c: str, body) -> bool:
        return self.engine.create_collection(c, vectors_config=body.vectors, metadata=body.metadata,
                                             sparse_vectors_config=body.sparse_vectors)

    def _upsert(self, c: str, body: dict[str, Any]) -> dict[str, Any]:
        from qdrant_client.http import models as m

        points = m.PointsBatch.model_validate(body).batch if "batch" in body else \
            m.PointsList.model_validate(body).points
        self.engine.upsert(c, points=points, wait=True)
        return {"operation_id": 0, "status": "completed"}

    def _retrieve(self, c: str, body) -> Any:
        return self.engine.retrieve(c, ids=body.ids, with_payload=body.with_payload if body.with_payload is not None
                                    else True, with_vectors=body.with_vector or False)

    def _count(self, c: str, body) -> dict[str, int]:
        return {"count": self.engine.count(c, count_filter=body.filter, exact=True).count}

    def _scroll(self, c: str, body) -> dict[str, Any]:
        points, offset = self.engine.scroll(c, scroll_filter=body.filter, limit=body.limit or 10, offset=body.offset,
                                            with_payload=body.with_payload if body.with_payload is not None else True,
                                            with_vectors=body.with_vector or False)
        return {"points": points, "next_page_offset": offset}

    def _query(self, c: str, body) -> Any:
        return self.engine.query_points(c, query=body.query, limit=body.limit or 10, with_payload=body.with_payload
                                        or False)  # the engine is exact: search params mean nothing to it

    # ------------------------------------------------------------------------------------------- HTTP

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _answer(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                refuse = server.hook(self.command, path) if server.hook else None
                if refuse:
                    server.requests.append((self.command, path, refuse))
                    self._answer(refuse, {"status": {"error": "Service Unavailable (test server)"}, "time": 0.0})
                    return
                if server.latency:
                    time.sleep(server.latency)
                t0 = time.perf_counter()
                try:
                    with server.lock:
                        result = server.route(self.command, path, json.loads(raw) if raw else None)
                except LookupError as e:
                    status, payload = 404, {"status": {"error": str(e)}, "time": 0.0}
                except (ValueError, KeyError) as e:  # the engine's "not found", "wrong size"...
                    status, payload = (404 if "not found" in str(e).lower() else 400), \
                        {"status": {"error": str(e)}, "time": 0.0}
                else:
                    status, payload = 200, {"result": _jsonable(result), "status": "ok",
                                            "time": time.perf_counter() - t0}
                server.requests.append((self.command, path, status))
                self._answer(status, payload)

            do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = _handle

        return Handler


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
