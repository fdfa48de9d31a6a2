"""A real HTTP server on 127.0.0.1 speaking the OpenAI embeddings protocol (`POST /v1/embeddings`).

Each text's vector is a hashed bag of its normalized words (64 dims), so
retrieval through it is real (lexical) retrieval. `script` lists what the
next requests get, in order, before every later one is answered:

    429     HTTP 429 with Retry-After: 0
    500     HTTP 500
    401     HTTP 401 (bad key)
    short   a valid-looking answer with one vector fewer than inputs
    wide    an answer whose vectors have one dimension too many
    ok      a valid answer

Hostile modes (tests/test_hostile_server.py):

    huge      vectors HUGE_DIM wide
    strings   each embedding a string
    datanull  `data: null`
    nan       vectors of NaN
    notjson   HTTP 200, content-type application/json, a body that is not JSON
    bomb      HTTP 200 whose gzip body inflates to llm_server.BOMB_BYTES
    drip      a valid answer sent one byte every llm_server.DRIP_EVERY seconds
    driphead  the same, its status line and headers included
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler

from llm_server import LoopbackServer, drip_raw, gzip_bomb, send_json, send_raw

DIM = 64
HUGE_DIM = 200_000


def vector(text: str) -> list[float]:
    from m3tune.arabic import tokens

    v = [0.0] * DIM
    for word in tokens(text):
        h = hashlib.sha256(word.encode()).digest()
        v[h[0] % DIM] += 1.0 if h[1] % 2 else -1.0
    if not any(v):
        v[0] = 1.0
    return v


class EmbeddingsServer(LoopbackServer):
    def __init__(self, script: list[str] | None = None, *, key: str = "test-key"):
        self.script = list(script or [])
        self.requests: list[dict] = []  # {"action", "inputs", "model", "input_type"}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                if not self.path.endswith("/embeddings"):
                    return self._json(404, {"error": {"message": "not found"}})
                with server._lock:
                    action = server.script.pop(0) if server.script else "ok"
                    if self.headers.get("authorization") != f"Bearer {key}":
                        action = "401"
                    inputs = body.get("input", [])
                    server.requests.append({"action": action, "inputs": inputs, "model": body.get("model"),
                                            "input_type": body.get("input_type")})
                if action == "429":
                    return self._json(429, {"error": {"message": "rate limited"}}, [("retry-after", "0")])
                if action == "echo":  # an error body quoting the request's key, as some proxies write
                    return self._json(422, {"error": {"message": "unprocessable; authorization was "
                                                                 f"{self.headers.get('authorization')}"}})
                if action in ("500", "401"):
                    return self._json(int(action), {"error": {"message": f"error {action}"}})
                if action in ("notjson", "bomb"):
                    return send_raw(self, 200, gzip_bomb() if action == "bomb" else b"not JSON {",
                                    [("content-encoding", "gzip")] if action == "bomb" else [])
                data = [{"object": "embedding", "index": i, "embedding": vector(t) + ([0.5] if action == "wide" else [])}
                        for i, t in enumerate(inputs)]
                for d in data:
                    if action == "huge":
                        d["embedding"] = [0.5] * HUGE_DIM
                    elif action == "strings":
                        d["embedding"] = "0.1,0.2"
                    elif action == "nan":
                        d["embedding"] = [float("nan")] * DIM
                if action == "datanull":
                    data = None
                if action in ("drip", "driphead"):
                    payload = json.dumps({"object": "list", "data": data, "model": body.get("model"), "usage": {}})
                    if action == "drip":
                        return send_raw(self, 200, payload.encode(), drip=True)
                    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
                    return drip_raw(self, (head + payload).encode())
                if action == "short":
                    data = data[:-1]
                if data:
                    data.reverse()  # the protocol orders by `index`, not by position: clients must sort
                self._json(200, {"object": "list", "data": data, "model": body.get("model"),
                                 "usage": {"prompt_tokens": 1, "total_tokens": 1}})

            def _json(self, status, payload, headers=()):
                send_json(self, status, payload, headers)

        self._listen(Handler)

    def texts_served(self) -> int:
        return sum(len(r["inputs"]) for r in self.requests if r["action"] == "ok")
