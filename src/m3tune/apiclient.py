"""What m3tune's clients of OpenAI-compatible APIs share: chat completions (m3tune.generation.llm) and
embeddings (m3tune.evaluation.api), kept below both so that neither step package imports the other: the
errors and statuses that stop a run or are retried, and bounded HTTP answers.

The `openai` client reads a whole body, inflated, before it looks at it, and
its timeout applies to each read: an endpoint that drips a byte every half
second, or sends a 1 MB gzip body that inflates to 1 GiB, holds a run (or its
memory) without limit. The clients m3tune builds read every body through
hooks that inflate it themselves, in steps of at most `_STEP` bytes, refuse it
past a size bound, and give up past a total deadline counted from the
request's start.
"""

from __future__ import annotations

import email.utils
import time
import zlib

from m3tune.errors import BadInput

# What a real answer needs is far less: a chat answer of max_tokens=4096 is some 50 KB, a batch of 64 vectors
# of 8192 dimensions some 17 MB. 64 MiB keeps a hostile body's peak bounded while no real one comes near it.
MAX_RESPONSE_BYTES = 64 * 2**20
_STEP = 2**20  # most bytes inflated at once: one step of a gzip bomb stays small
_STARTED = "m3tune_started"
RETRYABLE_STATUS = {408, 409, 425, 429}


class ResponseRefused(Exception):
    """A body past the size bound, or in an encoding m3tune does not inflate."""


def http_module():
    """The HTTP library the installed openai client is built on (httpx, or httpx2 from openai 3 on)."""
    from openai import _base_client

    return getattr(_base_client, "httpx2", None) or _base_client.httpx


def _inflater(encoding: str):
    """A zlib decompressor for a Content-Encoding, None for none; ResponseRefused for any other."""
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return None
    if name in ("gzip", "x-gzip"):
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    if name == "deflate":
        return zlib.decompressobj()
    raise ResponseRefused(f"content-encoding {encoding!r} is not one m3tune reads (gzip, deflate)")


class _Reader:
    """Collects one response's body: inflated in steps, counted against LIMIT, timed against TIMEOUT."""

    def __init__(self, response, limit: int, timeout: float):
        self.response, self.limit = response, limit
        started = response.request.extensions.get(_STARTED, time.monotonic())
        self.deadline = started + timeout
        self.inflate = _inflater(response.headers.get("content-encoding", ""))
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, raw: bytes) -> None:
        if time.monotonic() > self.deadline:
            raise http_module().ReadTimeout("the answer took longer than the timeout in all",
                                            request=self.response.request)
        if self.inflate is None:
            return self._keep(raw)
        while raw:
            self._keep(self.inflate.decompress(raw, _STEP))
            raw = self.inflate.unconsumed_tail

    def _keep(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise ResponseRefused(f"{self.response.request.url.host}: the answer is larger than "
                                  f"{self.limit // 2**20} MiB once inflated; refused")
        self.parts.append(data)

    def done(self) -> None:
        if self.inflate is not None:
            self._keep(self.inflate.flush())
        # what httpx's own read() leaves: later reads (.content, .json(), the client's error path) use it
        self.response._content = b"".join(self.parts)


async def _start(request) -> None:
    request.extensions[_STARTED] = time.monotonic()


def client_kwargs(*, limit: int = MAX_RESPONSE_BYTES, timeout: float) -> dict:
    """Keyword arguments for openai.AsyncOpenAI: an HTTP client whose answers are bounded. (The callers also
    wrap each call in asyncio.wait_for: this deadline covers the body, not a server that drips its headers.)"""
    import openai

    async def read_async(response) -> None:
        reader = _Reader(response, limit, timeout)
        try:
            async for raw in response.aiter_raw():
                reader.add(raw)
        finally:
            await response.aclose()
        reader.done()

    hooks = {"request": [_start], "response": [read_async]}
    http = openai.DefaultAsyncHttpxClient(event_hooks=hooks)
    # only what _inflater reads: a server may still send another encoding, which is then refused
    return {"http_client": http, "default_headers": {"Accept-Encoding": "gzip, deflate"}}


def refused(error: BaseException) -> ResponseRefused | None:
    """The ResponseRefused behind ERROR (the openai client wraps it in APIConnectionError), or None."""
    while error is not None:
        if isinstance(error, ResponseRefused):
            return error
        error = error.__cause__ or error.__context__
    return None


class LLMError(BadInput):
    """The endpoint cannot be used at all (no key, bad key, no credits, bad settings): the run stops."""


def fatal_status(status: int, base_url: str, model: str) -> "LLMError | None":
    """The error that stops a run for an HTTP status no retry can mend (a bad key, no credits, no such model)."""
    if status in (401, 403):
        return LLMError(f"{base_url} refused the API key (HTTP {status}); check the key")
    if status == 402:
        return LLMError(f"{base_url}: payment required (HTTP 402): out of credits?")
    if status == 404:
        return LLMError(f"{base_url}: model {model!r} or endpoint not found (HTTP 404)")
    return None


def retry_after(response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    value = response.headers.get("retry-after") if response is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
