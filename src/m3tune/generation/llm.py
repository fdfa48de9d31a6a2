"""The LLM backend: any OpenAI-compatible chat-completions endpoint, through the `openai` package.

`run_items` sends one request per work item (a passage, or a theme with its
candidate passages) with bounded concurrency and returns what each came to.
What a user pays for is neither lost nor paid for twice:

- Retries: 429, 408/409/425, 5xx, timeouts, connection errors and broken
  responses (not JSON, no choices, a choice with no message, content that is
  not text) are retried with exponential backoff and
  full jitter, honouring `Retry-After`, at most `max_retries` times; then the
  item is rejected as `retries_exhausted` and left for a later run.
- Fatal: a refused key (401/403), no credits (402) or an unknown model (404)
  stops the run at once; nothing more would succeed.
- Structured output: the answer must be one JSON object that the item's
  parser accepts (pydantic, plus the counts asked for). A malformed or empty
  answer is re-asked once with the error; a second one, or a refusal, is a
  final answer: journaled as rejected, not asked again. An answer cut at
  `max_tokens` or another 4xx is rejected but not journaled (raise the limit,
  fix the request, rerun).
- Journal: final answers are written to the step's journal as they arrive
  (every `flush_every` answers, default 1), each batch one new file published
  atomically (so it works on S3), keyed by a digest of the exact request
  (messages, model, temperature, max_tokens, response format). A killed or
  retried run reads the journal first and asks only for what it lacks.
- Budget: requests and cost (the API's `usage.cost`, or `price_in` /
  `price_out` per million tokens) are counted. Past `max_requests`, or when
  the cost so far plus what the requests in flight will cost would pass
  `max_cost`, no new request starts; the run ends cleanly and what is left
  stays pending. A run that leaves anything pending or failed is reported
  incomplete, so `m3tune status` shows it stale and a rerun finishes it.

Hostile answers are bounded (m3tune.apiclient): each request has a total
deadline (`timeout`, however slowly the answer drips), a body is refused past
8 MiB once inflated, and the answer is read from its JSON by m3tune, field
by field, so an odd field is a retry, not a traceback. Everything kept from an
answer (queries, the model name, a refusal) is redacted: an endpoint that
echoes the key in a valid answer gets it stored nowhere. The model recorded
is the one that answered (OpenAI names a dated version of the model asked
for; a router may substitute another), with a warning when it differs. A
`usage.cost` or token count that is not a non-negative number leaves the cost
unknown, and stops a run capped by `max_cost` (a negative or NaN cost would
defeat the cap).

The API key comes from the environment (`OPENROUTER_API_KEY`, then
`OPENAI_API_KEY`, or the variable `api_key_env` names, which must be an API
key variable: m3tune.redact.check_key_env); it is never logged and never part
of a config or manifest, and every detail kept of a failure (an endpoint's
error body, a refusal) is redacted before it reaches a rejects file, the
journal or a log. A run in which every request failed is an error, not an
empty success.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from m3tune.apiclient import (RETRYABLE_STATUS, LLMError, ResponseRefused, client_kwargs, fatal_status,
                              http_module, refused, retry_after)
from m3tune.errors import ConfigError, UserError
from m3tune.jsonl import read_jsonl, write_jsonl
from m3tune.redact import check_key, check_key_env, redact, register
from m3tune.storage import Store

log = logging.getLogger("m3tune.llm")

OPENROUTER_URL = "https://openrouter.ai/api/v1"
JOURNAL_DIR = "journal"
# Refusals some models write as plain text instead of using message.refusal.
_REFUSAL = re.compile(r"^\s*(i'?m sorry|i am sorry|i can(?:'|no)t|i won'?t|i am unable|i'm unable|"
                      r"as an ai|لا أستطيع|عذرا|عذراً|آسف)", re.I)


class LLMUnavailable(UserError):
    """Every request failed for reasons a later run may not meet (the endpoint down, overloaded): exit 1,
    so Argo retries the step; nothing was generated, so reporting success would hide it."""


class LLMSettings(BaseModel):
    """How to reach the endpoint and how hard to push it. Part of a step's config."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(default=OPENROUTER_URL, description="OpenAI-compatible API base URL")
    model: str = Field(default="google/gemini-2.5-flash", description="model name at that endpoint")
    api_key_env: str | None = Field(default=None, description="environment variable holding the key "
                                    "(default: OPENROUTER_API_KEY, then OPENAI_API_KEY)")
    concurrency: int = Field(default=8, ge=1, le=512, description="requests in flight at once")
    timeout: float = Field(default=120.0, gt=0, description="seconds per request")
    max_retries: int = Field(default=5, ge=0, le=20, description="retries of a transient failure per item")
    backoff: float = Field(default=1.0, gt=0, description="first retry delay in seconds (doubles each retry)")
    max_backoff: float = Field(default=60.0, gt=0, description="longest wait, Retry-After included")
    max_requests: int | None = Field(default=None, ge=1, description="stop starting requests after this many")
    max_cost: float | None = Field(default=None, gt=0, description="stop starting requests before this cost (USD) "
                                   "would be passed")
    price_in: float | None = Field(default=None, ge=0, description="USD per million prompt tokens, if the API reports no cost")
    price_out: float | None = Field(default=None, ge=0, description="USD per million completion tokens")
    reports_cost: bool | None = Field(default=None, description="the endpoint reports each request's cost "
                                      "(usage.cost); default: yes for OpenRouter")
    temperature: float = Field(default=0.7, ge=0, le=2, description="sampling temperature")
    max_tokens: int = Field(default=4096, ge=16, description="longest answer, in tokens (thinking models need room)")
    json_mode: bool = Field(default=True, description="send response_format=json_object (turn off for endpoints "
                            "that reject it)")
    flush_every: int = Field(default=1, ge=1, description="answers per journal batch: 1 never pays twice after a "
                             "kill; more means fewer files")

    @field_validator("api_key_env")
    @classmethod
    def _key_variable(cls, name: str | None) -> str | None:
        return check_key_env(name) if name else name


@dataclass
class WorkItem:
    key: str  # readable: a passage id, a theme
    messages: list[dict[str, str]]
    parse: Callable[[str], BaseModel]  # the answer's validator: raises ValueError / ValidationError

    def digest(self, s: LLMSettings) -> str:
        """What the journal is keyed by: the exact request, so changing anything that shapes it asks again."""
        request = {"messages": self.messages, "model": s.model, "temperature": s.temperature,
                   "max_tokens": s.max_tokens, "json_mode": s.json_mode}
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


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
    unfinished: int = 0  # rejected now but worth asking again: retries exhausted, truncated, 4xx
    stopped: str | None = None
    seconds: float = 0.0

    @property
    def incomplete(self) -> str | None:
        """Why a rerun has work left, or None."""
        parts = []
        if self.pending:
            parts.append(f"{self.pending} not asked ({self.stopped})")
        if self.unfinished:
            parts.append(f"{self.unfinished} failed for now (see rejects.jsonl)")
        return "; ".join(parts) or None

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cost_usd": round(self.cost, 6) if self.cost_known else None,
                "accepted": self.accepted, "from_journal": self.from_journal, "rejected": dict(self.rejected),
                "retries": dict(self.retries), "pending": self.pending, "unfinished": self.unfinished,
                "stopped": self.stopped,
                "requests_per_second": round(self.requests / self.seconds, 2) if self.seconds else None}


class JournalEntry(BaseModel):
    key: str
    request: str  # WorkItem.digest
    model: str
    status: str  # "accepted" or "rejected"
    reason: str | None = None
    answer: dict[str, Any] | None = None


class Journal:
    """Append-only record of final answers, as batch files under STORE/journal/, keyed by request digest."""

    def __init__(self, store: Store):
        self.store = store.child(JOURNAL_DIR)
        self.entries: dict[str, JournalEntry] = {}
        self._buffer: list[JournalEntry] = []

    def _names(self) -> list[str]:
        return [n for n in self.store.list() if n.endswith(".jsonl") and "/" not in n and not n.startswith(".")]

    def _read(self, names: list[str]):
        for name in names:
            with self.store.open_read(name) as f:
                yield from read_jsonl(f, JournalEntry, name=self.store.uri_of(name))

    def load(self) -> dict[str, JournalEntry]:
        for e in self._read(self._names()):
            self.entries.setdefault(e.request, e)
        return self.entries

    def add(self, entry: JournalEntry, flush_every: int) -> list[JournalEntry] | None:
        """Record ENTRY; return a batch to write when FLUSH_EVERY entries are waiting."""
        self.entries[entry.request] = entry
        self._buffer.append(entry)
        if len(self._buffer) >= flush_every:
            batch, self._buffer = self._buffer, []
            return batch
        return None

    def write(self, batch: list[JournalEntry]) -> None:
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
        # Atomic but not fsynced: a killed process loses nothing published, and
        # one fsync per answer cost 6% of throughput at concurrency 32. Only a
        # machine crash can lose the last answers (which a rerun asks again).
        with write_jsonl(self.store, name, durable=False) as w:
            w.write_all(batch)

    def flush(self) -> None:
        if self._buffer:
            batch, self._buffer = self._buffer, []
            self.write(batch)

    def compact(self) -> None:
        """Fold all batch files into one (written before the others are deleted: a kill in between only duplicates)."""
        self.flush()
        names = self._names()
        if len(names) <= 1:
            return
        keep: dict[str, JournalEntry] = {}
        for e in self._read(names):
            keep.setdefault(e.request, e)
        with write_jsonl(self.store, f"part-{time.time_ns():020d}-compacted.jsonl") as w:
            w.write_all(keep.values())
        for name in names:
            self.store.delete(name)


def api_key(settings: LLMSettings) -> str:
    names = [check_key_env(settings.api_key_env)] if settings.api_key_env else ["OPENROUTER_API_KEY", "OPENAI_API_KEY"]
    for name in names:
        if os.environ.get(name):
            key = check_key(name, os.environ[name])
            register(key)  # masked in every message from now on, whatever its shape
            return key
    raise LLMError(f"no API key: set {' or '.join(names)} (or use backend 'offline', which needs none)")


MAX_MODEL_CHARS = 200  # a model name recorded from an answer: longer is not a name
# An answer of max_tokens tokens is some 4 bytes a token, 6 where JSON escapes it: 4,096 tokens are ~100 KB,
# and the largest max_tokens in use (64k) under 2 MiB. 8 MiB leaves room, and `concurrency` answers in flight
# at once (8 by default) then hold at most 64 MiB however hostile the endpoint.
MAX_CHAT_RESPONSE_BYTES = 8 * 2**20


@dataclass
class _Completion:
    """What m3tune reads of a chat completion, each field checked."""

    content: str
    refusal: str | None
    finish_reason: str | None
    model: str
    usage: dict[str, Any] | None


def _read_completion(body: bytes, asked: str) -> _Completion:
    """BODY's completion; _Retry("bad_response") saying what is wrong with it."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _Retry("bad_response", detail="the body is not JSON") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Retry("bad_response", detail="no choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise _Retry("bad_response", detail="choices[0] has no message")
    fields = {"content": message.get("content"), "refusal": message.get("refusal"),
              "finish_reason": choice.get("finish_reason")}
    for name, value in fields.items():
        if value is not None and not isinstance(value, str):
            raise _Retry("bad_response", detail=f"{name} is a {type(value).__name__}, not text")
    model = data.get("model")
    model = redact(model)[:MAX_MODEL_CHARS] if isinstance(model, str) and model.strip() else asked
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
    return _Completion(fields["content"] or "", fields["refusal"], fields["finish_reason"], model, usage)


def _read_usage(usage: dict[str, Any] | None) -> tuple[int, int, float | None, str | None]:
    """(prompt tokens, completion tokens, reported cost or None, what is unreadable or None) of USAGE."""
    if usage is None:
        return 0, 0, None, None
    problems = []

    def count(name: str) -> int:
        value = usage.get(name)
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problems.append(f"usage.{name} {str(value)[:40]!r} is not a count")
            return 0
        return value

    prompt, completion = count("prompt_tokens"), count("completion_tokens")
    cost = usage.get("cost")
    if cost is not None and (isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost)
                             or cost < 0):
        return prompt, completion, None, f"usage.cost {str(cost)[:40]!r} is not a non-negative number"
    if cost is not None:  # a readable cost is the cost, whatever the token counts say
        return prompt, completion, float(cost), None
    return prompt, completion, None, "; ".join(problems) or None


class _Rejected(Exception):
    """An item ends without an accepted answer. JOURNAL: final (never asked again) or worth a rerun."""

    def __init__(self, reason: str, detail: str, *, journal: bool):
        super().__init__(reason)
        # the detail goes to rejects.jsonl and the journal: an error body can quote the request's key
        self.reason, self.detail, self.journal = reason, redact(detail), journal


class _Retry(Exception):
    def __init__(self, kind: str, response=None, detail: str = ""):
        super().__init__(kind)
        self.kind, self.response, self.detail = kind, response, detail


class _Budget(Exception):
    pass


def _short(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors(include_url=False)[0]
        return redact(f"{'.'.join(map(str, err['loc'])) or 'answer'}: {err['msg']}")
    return redact(str(e))[:200]  # redacted before the cut: a cut key would no longer look like one


class _Runner:
    def __init__(self, settings: LLMSettings, journal: Journal):
        try:
            from openai import AsyncOpenAI
        except ImportError:
            raise LLMError("backend 'openai' needs the openai package: pip install 'm3tune[llm]'") from None
        self.s, self.journal = settings, journal
        self._prices = settings.price_in is not None and settings.price_out is not None
        openrouter = "openrouter.ai" in settings.base_url
        reports_cost = settings.reports_cost if settings.reports_cost is not None else openrouter
        if settings.max_cost is not None and not self._prices and not reports_cost:
            raise ConfigError("max_cost needs price_in and price_out (USD per million tokens), or an endpoint "
                              "that reports the cost of each request (OpenRouter)")
        self.client = AsyncOpenAI(base_url=settings.base_url, api_key=api_key(settings), max_retries=0,
                                  timeout=settings.timeout, **client_kwargs(limit=MAX_CHAT_RESPONSE_BYTES,
                                                                timeout=settings.timeout))
        self._response_type = http_module().Response
        self._models_seen: set[str] = {settings.model}
        self._usage_warned = False
        self._extra_body = {"usage": {"include": True}} if openrouter else {}
        self.stats = RunStats()
        self.rejects: list[dict[str, Any]] = []
        self._cond = asyncio.Condition()
        self._in_flight = 0
        self._costed = 0  # responses whose cost is known

    # --- budget ------------------------------------------------------------------------------
    async def _start(self) -> None:
        """Reserve one request within the budget, or raise _Budget."""
        s = self.s
        async with self._cond:
            # The cost of a request is unknown until one comes back: under a cost cap, one at a time till then.
            while s.max_cost is not None and not self._costed and self._in_flight:
                await self._cond.wait()
            if not self.stats.stopped:
                average = self.stats.cost / self._costed if self._costed else 0.0
                if s.max_requests is not None and self.stats.requests >= s.max_requests:
                    self.stats.stopped = f"max_requests reached ({s.max_requests})"
                elif s.max_cost is not None and self.stats.cost + (self._in_flight + 1) * average > s.max_cost:
                    self.stats.stopped = (f"max_cost: ${self.stats.cost:.4f} spent, the next request would pass "
                                          f"${s.max_cost}")
                if self.stats.stopped:
                    log.warning("stopping: %s; what is not yet asked stays pending for a later run",
                                self.stats.stopped)
            if self.stats.stopped:
                raise _Budget()
            self.stats.requests += 1
            self._in_flight += 1

    def _count(self, usage: dict[str, Any] | None) -> None:
        prompt, completion, cost, problem = _read_usage(usage)
        self.stats.prompt_tokens += prompt
        self.stats.completion_tokens += completion
        if problem:
            self.stats.cost_known = False
            if self.s.max_cost is not None:  # a cost it cannot read (or a negative one) would defeat the cap
                self.stats.stopped = "unreadable cost"  # set before the slot is freed: no other request starts
                raise LLMError(f"{self.s.base_url}: {problem}, so max_cost cannot be enforced: stopping (answers "
                               "so far are kept); use price_in / price_out with reports_cost off, or no max_cost")
            if not self._usage_warned:
                self._usage_warned = True
                log.warning("%s: %s; the run's cost is reported as unknown", self.s.base_url, problem)
            return
        if cost is None and usage is not None and self._prices:
            cost = (prompt * self.s.price_in + completion * self.s.price_out) / 1e6
        if cost is None:
            self.stats.cost_known = False
            if self.s.max_cost is not None:
                self.stats.stopped = "no cost reported"
                raise LLMError("the endpoint reported no usage cost: give price_in and price_out to enforce max_cost")
            return
        self.stats.cost += cost
        self._costed += 1

    # --- one request, with retries -----------------------------------------------------------
    async def _once(self, messages: list[dict[str, str]]) -> _Completion:
        import openai

        body: dict[str, Any] = {"model": self.s.model, "messages": messages, "temperature": self.s.temperature,
                                "max_tokens": self.s.max_tokens, **self._extra_body}
        if self.s.json_mode:
            body["response_format"] = {"type": "json_object"}
        await self._start()
        try:
            # The client's own POST with a plain body: the same auth, errors and typed
            # response as chat.completions.create, without its per-call recursive
            # transform of the (already plain) parameters, which cost ~1 ms a request
            # and capped throughput at high concurrency (benchmarks/bench_generation.py).
            # The body comes back raw (bounded by m3tune.apiclient) and is read here: the client's own
            # models accept any type in any field. The wait_for is the request's total deadline: the
            # client's timeout applies to each read, and a byte every half second never trips it.
            raw = await asyncio.wait_for(
                self.client.post("/chat/completions", body=body, cast_to=self._response_type),
                timeout=self.s.timeout)
            completion = _read_completion(raw.content, self.s.model)
            self._count(completion.usage)  # before the slot is released, so the budget sees this cost
        except (openai.APITimeoutError, asyncio.TimeoutError):
            raise _Retry("timeout") from None
        except (openai.APIConnectionError, ResponseRefused) as e:
            too_large = refused(e)
            if too_large:  # a bomb or an encoding it cannot read: the same request gets the same answer
                raise _Rejected("refused_response", str(too_large), journal=False) from None
            raise _Retry("connection") from None
        except openai.APIStatusError as e:
            status = e.status_code
            fatal = fatal_status(status, self.s.base_url, self.s.model)
            if fatal:
                raise fatal from None
            if status >= 500 or status in RETRYABLE_STATUS:
                raise _Retry(f"http_{status}", e.response) from None
            raise _Rejected(f"http_{status}", _short(e), journal=False) from None
        except openai.APIResponseValidationError:
            raise _Retry("bad_response") from None
        finally:
            async with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()
        if completion.finish_reason == "error":
            raise _Retry("finish_error")
        return completion

    async def _call(self, messages: list[dict[str, str]]):
        attempt = 0
        while True:
            try:
                return await self._once(messages)
            except _Retry as e:
                attempt += 1
                if attempt > self.s.max_retries:
                    detail = f" ({e.detail})" if e.detail else ""
                    raise _Rejected("retries_exhausted", f"gave up after {self.s.max_retries} retries: {e.kind}{detail}",
                                    journal=False) from None
                self.stats.retries[e.kind] += 1
                wait = retry_after(e.response)
                if wait is None:
                    wait = random.uniform(0, self.s.backoff * 2 ** (attempt - 1))  # full jitter
                await asyncio.sleep(min(wait, self.s.max_backoff))

    # --- one item: ask, check, re-ask once -----------------------------------------------------
    async def item(self, item: WorkItem, digest: str) -> JournalEntry | None:
        messages = list(item.messages)
        try:
            for asked in range(2):
                answered = await self._call(messages)
                # redacted before anything reads it: a valid answer can quote the key too (queries, rejects,
                # the journal and the re-ask all hold it redacted)
                content = redact(answered.content).strip()
                refusal = answered.refusal
                if refusal or answered.finish_reason == "content_filter" or (content and _REFUSAL.match(content)):
                    # redacted before the cut: a key cut in half would no longer look like one
                    raise _Rejected("refusal", redact(refusal or content or "content_filter")[:200], journal=True)
                if answered.finish_reason == "length":
                    raise _Rejected("truncated", f"answer cut at max_tokens={self.s.max_tokens}", journal=False)
                try:
                    if not content:
                        raise ValueError("empty answer")
                    answer = item.parse(content)
                except (ValueError, ValidationError) as e:
                    if asked == 0:
                        self.stats.retries["reask"] += 1
                        messages = messages + [
                            {"role": "assistant", "content": content},
                            {"role": "user", "content": f"That answer was not valid ({_short(e)}). Reply again with "
                                                        "only the JSON object described above, nothing else."}]
                        continue
                    raise _Rejected("empty_answer" if not content else "malformed", _short(e), journal=True) from None
                self.stats.accepted += 1
                self._note_model(answered.model)
                return JournalEntry(key=item.key, request=digest, model=answered.model, status="accepted",
                                    answer=answer.model_dump(mode="json"))
        except _Rejected as e:
            self.stats.rejected[e.reason] += 1
            self.rejects.append({"key": item.key, "reason": e.reason, "detail": e.detail, "final": e.journal})
            if e.journal:
                return JournalEntry(key=item.key, request=digest, model=self.s.model, status="rejected",
                                    reason=f"{e.reason}: {e.detail}")
            self.stats.unfinished += 1
        except _Budget:
            self.stats.pending += 1
        return None


    def _note_model(self, model: str) -> None:
        if model not in self._models_seen:
            self._models_seen.add(model)
            log.warning("%s answered as model %r, not %r: the queries record the model that answered",
                        self.s.base_url, model, self.s.model)


def parse_json_answer(model: type[BaseModel], check: Callable[[BaseModel], None] | None = None) -> Callable[[str], BaseModel]:
    """A parser for answers that must be one JSON object of MODEL (a ```json fence is tolerated),
    then pass CHECK (which raises ValueError, e.g. for too few queries)."""

    def parse(content: str) -> BaseModel:
        text = content.strip()
        if text.startswith("```"):
            text = text.strip("`")
            text = text[4:] if text.lower().startswith("json") else text
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        answer = model.model_validate(data)
        if check is not None:
            check(answer)
        return answer

    return parse


@dataclass
class Outcome:
    stats: RunStats
    answers: dict[str, dict[str, Any]]  # item key -> accepted answer (this run or the journal)
    rejects: list[dict[str, Any]]  # this run's, and final rejections from the journal
    models: dict[str, str] = field(default_factory=dict)  # item key -> the model that wrote its accepted answer


def run_items(items: Sequence[WorkItem], settings: LLMSettings, store: Store, *,
              progress: Callable[[int], None] | None = None) -> Outcome:
    """Ask the endpoint about every item whose exact request is not in STORE's journal yet."""
    journal = Journal(store)
    done = journal.load()
    digests = {it.key: it.digest(settings) for it in items}
    todo = [it for it in items if digests[it.key] not in done]
    if len(todo) < len(items):
        log.info("journal: %d of %d items already answered, not asked again", len(items) - len(todo), len(items))

    async def main() -> _Runner:
        runner = _Runner(settings, journal)
        runner.stats.from_journal = len(items) - len(todo)
        queue: asyncio.Queue[WorkItem] = asyncio.Queue()
        for it in todo:
            queue.put_nowait(it)

        async def worker() -> None:
            while not queue.empty():
                it = queue.get_nowait()
                entry = await runner.item(it, digests[it.key])
                if entry is not None:
                    batch = journal.add(entry, settings.flush_every)
                    if batch:  # written off the event loop: an S3 PUT must not stall the other requests
                        await asyncio.to_thread(journal.write, batch)
                if progress:
                    progress(1)

        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(worker() for _ in range(min(settings.concurrency, max(1, len(todo))))))
        finally:
            runner.stats.seconds = time.perf_counter() - t0
            journal.flush()
            await runner.client.close()
        return runner

    runner = asyncio.run(main()) if todo else None
    stats = runner.stats if runner else RunStats(from_journal=len(items))
    rejects = runner.rejects if runner else []
    answers: dict[str, dict[str, Any]] = {}
    models: dict[str, str] = {}
    asked = {it.key for it in todo}
    for it in items:
        entry = journal.entries.get(digests[it.key])
        if entry is None:
            continue
        if entry.status == "accepted":
            answers[it.key] = entry.answer or {}
            models[it.key] = entry.model
        elif it.key not in asked:  # a final rejection from an earlier run
            rejects.append({"key": it.key, "reason": (entry.reason or "").split(":")[0], "detail": entry.reason,
                            "final": True, "from_journal": True})
    journal.compact()
    if runner is not None and not answers:  # answers kept from an earlier run still make queries
        _all_failed(runner, len(todo), settings.base_url)
    return Outcome(stats, answers, rejects, models)


def _all_failed(runner: _Runner, asked: int, base_url: str) -> None:
    """Raise when nothing was answered (not now, not in the journal), every item asked failed and none came
    to a final answer: an endpoint that is down must not look like a step that generated nothing. A budget stop or final rejections are outcomes, not this."""
    stats = runner.stats
    if not stats.unfinished or stats.accepted or stats.unfinished + stats.pending < asked:
        return
    reasons = ", ".join(f"{k} {v}" for k, v in stats.rejected.most_common())
    first = next((r["detail"] for r in runner.rejects if r.get("detail")), "")
    message = (f"{base_url}: every one of the {stats.unfinished} request(s) failed ({reasons}); nothing was "
               f"generated{'; first: ' + first if first else ''}")
    if set(stats.rejected) <= {"retries_exhausted"}:  # timeouts, 5xx, refused connections: it may come back
        raise LLMUnavailable(message + "; is the endpoint up? A rerun asks again")
    # a 4xx for every request, every answer cut at max_tokens: the same request fails the same way again
    raise LLMError(message + "; fix the request or settings (max_tokens, model, json_mode), then rerun")
