"""The LLM backend: any OpenAI-compatible chat-completions endpoint, through the `openai` package.

One `run_items` call sends one request per work item (a passage, or a theme
with its candidate passages) with bounded concurrency, and returns what
each item came to. What a user pays for is never lost nor paid twice:

- Retries: 429, 5xx, timeouts and connection errors are retried with
  exponential backoff and full jitter, honouring `Retry-After`, at most
  `max_retries` times; then the item is rejected as `retries_exhausted`
  (transient: a rerun tries it again).
- Structured output: the answer must be one JSON object that the caller's
  pydantic model accepts. A malformed answer is re-asked once, with the
  validation error; a second malformed answer, an empty answer or a refusal
  rejects the item (permanent: a rerun does not pay for it again).
- Journal: accepted answers and permanent rejections are appended to the
  step's journal every `flush_every` items, each batch one new file published
  atomically (so it works on S3 too). A killed or retried run reads the
  journal first and only calls for what is not in it.
- Budget: requests and cost (the API's `usage`, or `price_in`/`price_out`
  per million tokens) are counted; past `max_requests` or `max_cost` no new
  request starts, the run finishes cleanly, and the rest is left pending.

The API key comes from the environment (`OPENROUTER_API_KEY`, then
`OPENAI_API_KEY`, or the variable `api_key_env` names); it is never logged
and never part of a config or manifest.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from m3tune.errors import UserError
from m3tune.jsonl import read_jsonl, write_jsonl
from m3tune.storage import Store

log = logging.getLogger("m3tune.llm")

OPENROUTER_URL = "https://openrouter.ai/api/v1"
JOURNAL_DIR = "journal"


class LLMError(UserError):
    """The endpoint cannot be used at all (no key, bad key, bad settings): the run stops."""


class LLMSettings(BaseModel):
    """How to reach the endpoint and how hard to push it. Part of a step's config."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(default=OPENROUTER_URL, description="OpenAI-compatible API base URL")
    model: str = Field(default="google/gemini-2.5-flash", description="model name at that endpoint")
    api_key_env: str | None = Field(default=None, description="environment variable holding the key "
                                    "(default: OPENROUTER_API_KEY, then OPENAI_API_KEY)")
    concurrency: int = Field(default=8, ge=1, le=512, description="requests in flight at once")
    timeout: float = Field(default=60.0, gt=0, description="seconds per request")
    max_retries: int = Field(default=5, ge=0, le=20, description="retries of a transient failure per item")
    backoff: float = Field(default=1.0, gt=0, description="first retry delay in seconds (doubles each retry)")
    max_backoff: float = Field(default=60.0, gt=0, description="longest wait, Retry-After included")
    max_requests: int | None = Field(default=None, ge=1, description="stop starting requests after this many")
    max_cost: float | None = Field(default=None, gt=0, description="stop starting requests past this cost (USD)")
    price_in: float | None = Field(default=None, ge=0, description="USD per million prompt tokens, if the API reports no cost")
    price_out: float | None = Field(default=None, ge=0, description="USD per million completion tokens")
    temperature: float = Field(default=0.7, ge=0, le=2)
    max_tokens: int = Field(default=1024, ge=16)
    json_mode: bool = Field(default=True, description="send response_format=json_object")
    flush_every: int = Field(default=32, ge=1, description="journal batch size")


@dataclass
class WorkItem:
    key: str  # what the journal is keyed by, with the prompt version and model: a passage id, a theme
    messages: list[dict[str, str]]


@dataclass
class RunStats:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    cost_known: bool = True
    accepted: int = 0
    from_journal: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    pending: int = 0
    stopped: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cost_usd": round(self.cost, 6) if self.cost_known else None,
                "accepted": self.accepted, "from_journal": self.from_journal, "rejected": dict(self.rejected),
                "retries": dict(self.retries), "pending": self.pending, "stopped": self.stopped,
                "requests_per_second": round(self.requests / self.seconds, 2) if self.seconds else None}


class JournalEntry(BaseModel):
    key: str
    prompt_version: str
    model: str
    status: str  # "accepted" or "rejected"
    reason: str | None = None
    answer: dict[str, Any] | None = None


class Journal:
    """Append-only record of paid-for answers, as batch files under STORE/journal/."""

    def __init__(self, store: Store, prompt_version: str, model: str):
        self.store = store.child(JOURNAL_DIR)
        self.prompt_version, self.model = prompt_version, model
        self.entries: dict[str, JournalEntry] = {}
        self._buffer: list[JournalEntry] = []

    def load(self) -> dict[str, JournalEntry]:
        """Entries of earlier runs for this prompt version and model (others are kept, not used)."""
        for name in self.store.list():
            if not name.endswith(".jsonl") or "/" in name:
                continue
            with self.store.open_read(name) as f:
                for e in read_jsonl(f, JournalEntry, name=self.store.uri_of(name)):
                    if e.prompt_version == self.prompt_version and e.model == self.model:
                        self.entries.setdefault(e.key, e)
        return self.entries

    def add(self, entry: JournalEntry, flush_every: int) -> None:
        self.entries[entry.key] = entry
        self._buffer.append(entry)
        if len(self._buffer) >= flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
        with write_jsonl(self.store, name) as w:
            w.write_all(self._buffer)
        self._buffer = []

    def compact(self) -> None:
        """Fold all batch files into one (written before the others are deleted: a kill in between only duplicates)."""
        self.flush()
        names = [n for n in self.store.list() if n.endswith(".jsonl") and "/" not in n]
        if len(names) <= 1:
            return
        keep: dict[tuple[str, str, str], JournalEntry] = {}
        for name in names:
            with self.store.open_read(name) as f:
                for e in read_jsonl(f, JournalEntry, name=self.store.uri_of(name)):
                    keep.setdefault((e.key, e.prompt_version, e.model), e)
        compacted = f"part-{time.time_ns():020d}-compacted.jsonl"
        with write_jsonl(self.store, compacted) as w:
            w.write_all(keep.values())
        for name in names:
            self.store.delete(name)


def api_key(settings: LLMSettings) -> str:
    names = [settings.api_key_env] if settings.api_key_env else ["OPENROUTER_API_KEY", "OPENAI_API_KEY"]
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    raise LLMError(f"no API key: set {' or '.join(names)} (or use backend 'offline', which needs none)")


def _retry_after(response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), if any."""
    value = response.headers.get("retry-after") if response is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


def _usage_cost(usage, settings: LLMSettings) -> float | None:
    reported = getattr(usage, "cost", None)
    if reported is None and getattr(usage, "model_extra", None):
        reported = usage.model_extra.get("cost")
    if reported is not None:
        return float(reported)
    if settings.price_in is not None and settings.price_out is not None:
        return (usage.prompt_tokens * settings.price_in + usage.completion_tokens * settings.price_out) / 1e6
    return None


class _Runner:
    def __init__(self, settings: LLMSettings, parse: Callable[[str], BaseModel], journal: Journal,
                 client=None):
        try:
            from openai import AsyncOpenAI
        except ImportError:
            raise LLMError("backend 'openai' needs the openai package: pip install 'm3tune[llm]'") from None

        self.s, self.parse, self.journal = settings, parse, journal
        self.client = client or AsyncOpenAI(base_url=settings.base_url, api_key=api_key(settings),
                                            max_retries=0, timeout=settings.timeout)
        from openai.types.chat import ChatCompletion

        self._completion_type = ChatCompletion
        self.stats = RunStats()
        self.rejects: list[dict[str, Any]] = []
        self._budget_lock = asyncio.Lock()
        self._extra_body = {"usage": {"include": True}} if "openrouter.ai" in settings.base_url else None

    async def _may_start(self) -> bool:
        async with self._budget_lock:
            s = self.s
            if self.stats.stopped:
                return False
            if s.max_requests is not None and self.stats.requests >= s.max_requests:
                self.stats.stopped = f"max_requests reached ({s.max_requests})"
            elif s.max_cost is not None and self.stats.cost >= s.max_cost:
                self.stats.stopped = f"max_cost reached (${self.stats.cost:.4f} of ${s.max_cost})"
            if self.stats.stopped:
                log.warning("stopping: %s; items not yet started stay pending for a later run", self.stats.stopped)
                return False
            self.stats.requests += 1
            return True

    async def _call(self, messages: list[dict[str, str]]):
        """One successful response, or raise _Transient / _Permanent after the retry policy."""
        import openai

        attempt = 0
        while True:
            if not await self._may_start():
                raise _Budget()
            try:
                body: dict[str, Any] = {"model": self.s.model, "messages": messages,
                                        "temperature": self.s.temperature, "max_tokens": self.s.max_tokens,
                                        **(self._extra_body or {})}
                if self.s.json_mode:
                    body["response_format"] = {"type": "json_object"}
                # The client's own POST with a plain body: the same auth, errors and typed
                # response as chat.completions.create, without its per-call recursive
                # transform of the (already plain) parameters, which cost ~1 ms a request
                # and capped throughput at high concurrency (benchmarks/bench_generation.py).
                return await self.client.post("/chat/completions", body=body, cast_to=self._completion_type)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise LLMError(f"{self.s.base_url} refused the API key ({e.status_code}); check the key") from None
            except openai.NotFoundError as e:
                raise LLMError(f"{self.s.base_url}: model {self.s.model!r} or endpoint not found ({e.status_code})") from None
            except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                    openai.APIConnectionError, openai.APIStatusError) as e:
                status = getattr(e, "status_code", None)
                if isinstance(e, openai.APIStatusError) and status is not None and status < 500 and status != 429:
                    raise _Permanent(f"http_{status}", str(e)[:200]) from None
                kind = ("timeout" if isinstance(e, openai.APITimeoutError) else
                        "connection" if isinstance(e, openai.APIConnectionError) else f"http_{status}")
                attempt += 1
                if attempt > self.s.max_retries:
                    raise _Transient(kind, f"gave up after {self.s.max_retries} retries: {kind}") from None
                self.stats.retries[kind] += 1
                wait = _retry_after(getattr(e, "response", None))
                if wait is None:
                    wait = random.uniform(0, self.s.backoff * 2 ** (attempt - 1))  # full jitter
                await asyncio.sleep(min(wait, self.s.max_backoff))

    def _count(self, response) -> None:
        usage = getattr(response, "usage", None)
        if usage is None:
            self.stats.cost_known = self.stats.cost_known and self.s.max_cost is None
            return
        self.stats.prompt_tokens += usage.prompt_tokens or 0
        self.stats.completion_tokens += usage.completion_tokens or 0
        cost = _usage_cost(usage, self.s)
        if cost is None:
            self.stats.cost_known = False
        else:
            self.stats.cost += cost

    async def item(self, item: WorkItem) -> None:
        messages = list(item.messages)
        try:
            for asked in range(2):
                response = await self._call(messages)
                self._count(response)
                choice = response.choices[0] if response.choices else None
                message = choice.message if choice else None
                if message is not None and (getattr(message, "refusal", None) or choice.finish_reason == "content_filter"):
                    raise _Permanent("refusal", (getattr(message, "refusal", None) or "content_filter")[:200])
                content = (message.content or "").strip() if message else ""
                try:
                    if not content:
                        raise ValueError("empty answer")
                    answer = self.parse(content)
                except (ValueError, ValidationError) as e:
                    if asked == 0:
                        messages = messages + [
                            {"role": "assistant", "content": content},
                            {"role": "user", "content": f"That answer was not valid ({_short(e)}). Reply again with "
                                                        "only the JSON object described above, nothing else."}]
                        self.stats.retries["reask"] += 1
                        continue
                    raise _Permanent("empty_answer" if not content else "malformed", _short(e)) from None
                self.stats.accepted += 1
                self.journal.add(JournalEntry(key=item.key, prompt_version=self.journal.prompt_version,
                                              model=self.journal.model, status="accepted",
                                              answer=answer.model_dump(mode="json")), self.s.flush_every)
                return
        except _Transient as e:  # not journaled: a rerun tries the item again
            self.stats.rejected["retries_exhausted"] += 1
            self.rejects.append({"key": item.key, "reason": "retries_exhausted", "detail": e.detail, "permanent": False})
        except _Permanent as e:  # journaled: a rerun does not pay for it again
            self.stats.rejected[e.reason] += 1
            self.rejects.append({"key": item.key, "reason": e.reason, "detail": e.detail, "permanent": True})
            self.journal.add(JournalEntry(key=item.key, prompt_version=self.journal.prompt_version,
                                          model=self.journal.model, status="rejected",
                                          reason=f"{e.reason}: {e.detail}"), self.s.flush_every)
        except _Budget:
            self.stats.pending += 1


class _Permanent(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


class _Transient(_Permanent):
    """Retries exhausted on 429/5xx/timeouts: worth trying again in a later run."""


class _Budget(Exception):
    pass


def _short(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors(include_url=False)[0]
        return f"{'.'.join(map(str, err['loc'])) or 'answer'}: {err['msg']}"
    return str(e)[:200]


def parse_json_answer(model: type[BaseModel]) -> Callable[[str], BaseModel]:
    """A parser for answers that must be one JSON object of MODEL (a ```json fence is tolerated)."""

    def parse(content: str) -> BaseModel:
        text = content.strip()
        if text.startswith("```"):
            text = text.strip("`")
            text = text[4:] if text.lower().startswith("json") else text
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        return model.model_validate(data)

    return parse


def run_items(items: Sequence[WorkItem], settings: LLMSettings, parse: Callable[[str], BaseModel], journal: Journal,
              *, client=None, progress: Callable[[int], None] | None = None) -> tuple[RunStats, list[dict[str, Any]]]:
    """Call the endpoint for every item not already in the journal; return (stats, rejects)."""
    done = journal.load()
    todo = [it for it in items if it.key not in done]
    if len(todo) < len(items):
        log.info("journal: %d of %d items already answered, not asked again", len(items) - len(todo), len(items))

    async def main() -> tuple[RunStats, list[dict[str, Any]]]:
        runner = _Runner(settings, parse, journal, client)
        runner.stats.from_journal = len(items) - len(todo)
        queue: asyncio.Queue[WorkItem] = asyncio.Queue()
        for it in todo:
            queue.put_nowait(it)

        async def worker() -> None:
            while True:
                try:
                    it = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await runner.item(it)
                if progress:
                    progress(1)

        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(worker() for _ in range(min(settings.concurrency, max(1, len(todo))))))
        finally:
            runner.stats.seconds = time.perf_counter() - t0
            journal.flush()
            await runner.client.close()
        return runner.stats, runner.rejects

    return asyncio.run(main())
