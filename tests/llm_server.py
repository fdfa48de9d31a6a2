"""A real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions protocol, misbehaving on purpose.

Used by the tests and the benchmark. Each request is answered by the next
action scripted for its item (the passage id or theme the prompt names):

    ok          a valid JSON answer for what the prompt asks
    429         HTTP 429 with Retry-After (seconds: RETRY_AFTER)
    500         HTTP 500
    hang        no answer for HANG seconds (past the client's timeout), then a valid one
    malformed   an answer that is not JSON
    empty       an empty answer
    refusal     a refusal (message.refusal set, no content)
    refusalkey  a long refusal quoting the request's key where a 200-character cut would split it
    sorry       a refusal written as plain text
    short       valid JSON with fewer queries than asked
    length      an answer cut short (finish_reason "length")
    html        HTTP 200 with an HTML error page
    badretry    HTTP 429 with an unreadable Retry-After
    invented    (themes) relevant_ids with an id that was not offered, and a scope with no positives
    400 401 402 HTTP 400 (bad request), 401 (bad key), 402 (no credits)

Hostile modes (tests/test_hostile_server.py):

    keyecho     a valid answer quoting the request's key in a query (Arabic and English) and in `model`
    echobare    HTTP 400 quoting the request's key with no `Bearer` before it
    ansi400     HTTP 400 whose message holds ANSI escapes, a bell and rich markup
    ansi        a valid answer whose English queries hold ANSI escapes, control characters and markup
    drip        a valid answer sent one byte every DRIP_EVERY seconds (for DRIP_FOR seconds, then cut)
    bomb        HTTP 200 whose gzip body inflates to BOMB_BYTES
    notjson200  HTTP 200, content-type application/json, a body that is not JSON
    contentint  `content: 12345`
    nomessage   a choice with no `message`
    costabc     `usage.cost: "abc"`     costneg  `usage.cost: -5`     costnan  `usage.cost: NaN`
    tokensmany  `usage.prompt_tokens: "many"`
    othermodel  a valid answer from the model OTHER_MODEL, whatever was asked
    longquery   a valid answer with one 23,000-character English query

Items with no script get `ok`, after `delay` seconds if one is set.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RETRY_AFTER = 1
HANG = 3.0
DRIP_EVERY, DRIP_FOR = 0.5, 12.0
BOMB_BYTES = 100 * 2**20
OTHER_MODEL = "other/cheap-model"
ANSI = "\x1b[2J\x1b[31mred\x1b[0m [bold]markup[/bold] \x07bell\x08"
_ITEM = re.compile(r"^(?:Passage (\S+) \(|Theme: (.+?) \()", re.M)
_COUNTS = re.compile(r"exactly (\d+) Arabic and (\d+) English|Write (\d+) Arabic and (\d+) English")
_CANDIDATE = re.compile(r"^- (\S+): ", re.M)
_AR_LETTERS = "ابتثجحخدذرزسشصضطظعغفقكلمنهوي"


def arabic_word(seed: str, n: int = 4) -> str:
    h = hashlib.sha256(seed.encode()).digest()
    return "".join(_AR_LETTERS[b % len(_AR_LETTERS)] for b in h[:n])


def english_word(seed: str, n: int = 6) -> str:
    h = hashlib.sha256(("en" + seed).encode()).digest()
    return "".join("abcdefghijklmnopqrstuvwxyz"[b % 26] for b in h[:n])


def answer_for(prompt: str, invent: bool = False) -> str:
    """A valid answer to a queries-v1 or conceptual-v1 prompt: unique, non-copying queries."""
    item = _ITEM.search(prompt)
    key = (item.group(1) or item.group(2)) if item else "item"
    counts = _COUNTS.search(prompt)
    n_ar, n_en = (int(g) for g in (counts.group(1, 2) if counts.group(1) else counts.group(3, 4))) if counts else (2, 2)
    if "Candidate passages:" in prompt:
        ids = _CANDIDATE.findall(prompt)
        scopes = sorted({"quran" if i.startswith("quran:") else "hadith" for i in ids}) or ["quran"]
        queries = [{"query": f"آيات عن موضوع {arabic_word(key + str(i))}", "language": "ar", "scope": scopes[i % len(scopes)]}
                   for i in range(n_ar)]
        queries += [{"query": f"verses about topic {english_word(key + str(i))}", "language": "en",
                     "scope": scopes[i % len(scopes)]} for i in range(n_en)]
        by_source: dict[str, list[str]] = {}
        for i in ids:
            by_source.setdefault("quran" if i.startswith("quran:") else "hadith", []).append(i)
        relevant = [i for group in by_source.values() for i in group[: max(1, len(group) // 2)]]  # some of each
        if invent:
            relevant = [i for i in relevant if i.startswith("quran:")] + ["quran:999:1"]
            queries.append({"query": "أحاديث عن موضوع غائب", "language": "ar", "scope": "hadith"})
        return json.dumps({"relevant_ids": relevant, "queries": queries}, ensure_ascii=False)
    types = ["question", "keyword"]
    queries = [{"query": f"ما معنى {arabic_word(key + str(i))} في النص", "language": "ar", "type": types[i % 2]}
               for i in range(n_ar)]
    queries += [{"query": f"what is the meaning of {english_word(key + str(i))}", "language": "en",
                 "type": types[i % 2]} for i in range(n_en)]
    return json.dumps({"queries": queries}, ensure_ascii=False)


@functools.cache
def gzip_bomb(size: int = BOMB_BYTES) -> bytes:
    """SIZE bytes of spaces, gzipped (about a thousandth of SIZE)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
    chunk = b" " * 2**20
    return b"".join([*(packer.compress(chunk) for _ in range(size // len(chunk))), packer.flush()])


def drip_raw(handler, data: bytes) -> None:
    """Send DATA (a whole HTTP response, headers included) a byte every DRIP_EVERY s for DRIP_FOR s at most."""
    end = time.monotonic() + DRIP_FOR
    try:
        for i in range(len(data)):
            if time.monotonic() > end:
                break  # cut: the client sees an incomplete answer (an old client had waited all along)
            handler.wfile.write(data[i:i + 1])
            handler.wfile.flush()
            time.sleep(DRIP_EVERY)
        handler.close_connection = True
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client gave up


def send_raw(handler, status: int, data: bytes, headers=(), *, drip: bool = False) -> None:
    """Answer with DATA as is (HEADERS added); DRIP sends it a byte every DRIP_EVERY s for DRIP_FOR s at most."""
    try:
        handler.send_response(status)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(data)))
        for k, v in headers:
            handler.send_header(k, v)
        handler.end_headers()
        if not drip:
            handler.wfile.write(data)
            return
        handler.wfile.flush()
    except (BrokenPipeError, ConnectionResetError):
        return  # the client gave up
    drip_raw(handler, data)


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default backlog of 5 refuses connections at concurrency 32


def send_json(handler, status: int, payload, headers=()) -> None:
    """Answer HANDLER's request with PAYLOAD as JSON."""
    send_raw(handler, status, json.dumps(payload, ensure_ascii=False).encode(), headers)


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) serving HANDLER; `with` starts and stops it."""

    def _listen(self, handler) -> None:
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class ChatServer(LoopbackServer):
    def __init__(self, script: dict[str, list[str]] | None = None, *, delay: float = 0.0, report_cost: bool = False):
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.delay = delay
        self.report_cost = report_cost
        self.requests: list[dict] = []  # {"key", "action", "at", "messages"}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.endswith("/chat/completions"):
                    return self._json(404, {"error": {"message": "not found"}})
                prompt = next((m["content"] for m in body.get("messages", []) if m["role"] == "user"), "")
                item = _ITEM.search(prompt)
                key = (item.group(1) or item.group(2)) if item else "?"
                with server._lock:
                    todo = server.script.get(key)
                    action = todo.pop(0) if todo else "ok"
                    server.requests.append({"key": key, "action": action, "at": time.monotonic(),
                                            "messages": body.get("messages", []), "body": body})
                server._act(self, action, body, prompt)

            def _json(self, status, payload, headers=()):
                send_json(self, status, payload, headers)

        self._listen(Handler)

    def keys(self) -> list[str]:
        return [r["key"] for r in self.requests]

    def _act(self, handler, action: str, body: dict, prompt: str) -> None:
        def completion(content, refusal=None):
            usage = {"prompt_tokens": len(prompt) // 3, "completion_tokens": len(content or "") // 3}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            if self.report_cost:
                usage["cost"] = 0.001
            return {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "test"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content, "refusal": refusal}}],
                    "usage": usage}

        if action in ("429", "badretry"):
            return handler._json(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                                 [("retry-after", str(RETRY_AFTER) if action == "429" else "soon")])
        if action in ("400", "402"):
            return handler._json(int(action), {"error": {"message": f"error {action}"}})
        if action == "echo":  # a proxy that quotes the request's headers in its error body, key included
            return handler._json(400, {"error": {"message": f"bad request; you sent Authorization: "
                                                            f"{handler.headers.get('authorization')}"}})
        if action == "html":
            data = b"<html><body>502 Bad Gateway</body></html>"
            handler.send_response(200)
            handler.send_header("content-type", "text/html")
            handler.send_header("content-length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        if action == "500":
            return handler._json(500, {"error": {"message": "upstream error"}})
        if action == "401":
            return handler._json(401, {"error": {"message": "invalid api key"}})
        if action == "hang":
            time.sleep(HANG)
        elif self.delay:
            time.sleep(self.delay)
        hostile = self._hostile(handler, action, body, prompt, completion)
        if hostile is not False:
            return hostile
        if action == "malformed":
            return handler._json(200, completion('{"queries": [ this is not json'))
        if action == "empty":
            return handler._json(200, completion(""))
        if action == "refusal":
            return handler._json(200, completion(None, refusal="I can't help with that."))
        if action == "refusalkey":
            key = (handler.headers.get("authorization") or "").removeprefix("Bearer ")
            return handler._json(200, completion(None, refusal="I can't help with that. " + "." * 160 + " key " + key))
        if action == "sorry":
            return handler._json(200, completion("I'm sorry, but I can't help with that request."))
        if action == "short":
            return handler._json(200, completion('{"queries": [{"query": "ما معنى هذا", "language": "ar", "type": "question"}]}'))
        if action == "length":
            body_ = completion('{"queries": [{"query": "ما مع')
            body_["choices"][0]["finish_reason"] = "length"
            return handler._json(200, body_)
        return handler._json(200, completion(answer_for(prompt, invent=action == "invented")))

    def _hostile(self, handler, action: str, body: dict, prompt: str, completion):
        """The hostile modes' answers; False for any other action."""
        key = (handler.headers.get("authorization") or "").removeprefix("Bearer ")
        if action == "echobare":
            return handler._json(400, {"error": {"message": f"bad request; your key was {key} (check it)"}})
        if action == "ansi400":
            return handler._json(400, {"error": {"message": f"bad request {ANSI}"}})
        valid = answer_for(prompt)
        if action == "keyecho":
            answer = json.loads(valid)
            for q in answer["queries"]:
                q["query"] += f" {key}"
            out = completion(json.dumps(answer, ensure_ascii=False))
            out["model"] = f"{body.get('model')} {key}"
            return handler._json(200, out)
        if action == "ansi":
            answer = json.loads(valid)
            for q in answer["queries"]:
                if q["language"] == "en":
                    q["query"] += f" {ANSI}"
            return handler._json(200, completion(json.dumps(answer, ensure_ascii=False)))
        if action == "longquery":
            answer = json.loads(valid)
            answer["queries"][-1]["query"] = "what is the meaning of " + "x" * 23_000
            return handler._json(200, completion(json.dumps(answer, ensure_ascii=False)))
        if action in ("drip", "bomb", "notjson200"):
            data = {"drip": json.dumps(completion(valid)).encode(), "notjson200": b"this is not JSON {",
                    "bomb": gzip_bomb()}[action]
            headers = [("content-encoding", "gzip")] if action == "bomb" else []
            return send_raw(handler, 200, data, headers, drip=action == "drip")
        out = completion(valid)
        if action == "contentint":
            out["choices"][0]["message"]["content"] = 12345
        elif action == "nomessage":
            del out["choices"][0]["message"]
        elif action in ("costabc", "costneg", "costnan"):
            out["usage"]["cost"] = {"costabc": "abc", "costneg": -5.0, "costnan": float("nan")}[action]
        elif action == "tokensmany":
            out["usage"]["prompt_tokens"] = "many"
        elif action == "othermodel":
            out["model"] = OTHER_MODEL
        else:
            return False
        return handler._json(200, out)
