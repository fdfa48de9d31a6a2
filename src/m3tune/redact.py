"""Credentials out of every message: errors, logs, rejects files and journals.

An endpoint's 4xx body can echo the request's `Authorization` header, a proxy
can quote a key in its error page, and a user row can hold one; whatever
m3tune prints or publishes goes through `redact` first. It removes what looks
like a credential (Bearer tokens, `sk-…` keys, AWS access key ids and
secrets, `api_key=…`-style pairs) and the exact value of every credential
variable set in the environment (the configured API key among them), so a
key of an unusual shape is caught too.

`--api-key-env` may name only a variable meant for an API key (its name ends
in `_API_KEY`), or one listed in `M3TUNE_API_KEY_ENVS` (comma-separated);
AWS variables never, so a typo cannot send the bucket's secret to an LLM
endpoint as a Bearer token.
"""

from __future__ import annotations

import logging
import os
import re

from m3tune.errors import ConfigError

MASK = "[REDACTED]"
EXTRA_KEY_ENVS = "M3TUNE_API_KEY_ENVS"
DEFAULT_KEY_ENVS = ("OPENROUTER_API_KEY", "OPENAI_API_KEY")

_KEY_ENV = re.compile(r"^[A-Z][A-Z0-9_]*_API_KEY$")
# Variables whose value is a credential: their values are masked wherever they appear.
_SECRET_ENV = re.compile(r"(_API_KEY|_TOKEN|_SECRET|SECRET_ACCESS_KEY|_PASSWORD|_KEY_ID)$")
_PATTERNS = [
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{4,}"), r"\1 " + MASK),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{6,}"), "sk-" + MASK),
    # credentials in a URL's user part (https://user:key@proxy/v1), as an HTTP library's error quotes it
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@:]+:[^/\s@]+@"), r"\1" + MASK + "@"),
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), MASK),
    (re.compile(r"(?i)((?:aws_)?secret_access_key|aws_session_token|api[_-]?key|x-api-key|access[_-]?token|"
                r"password|passwd|secret)([\"']?\s*[:=]\s*[\"']?)([^\s\"',;}&]{4,})"), r"\1\2" + MASK),
]
_registered: set[str] = set()


def register(value: str | None) -> None:
    """Mask VALUE (a key read from somewhere other than a credential variable) from now on."""
    if value and len(value) >= 8:
        _registered.add(value)


def _secret_values() -> list[str]:
    # 8 characters at least: a short value ('test', 'none') would mask ordinary words
    values = {v for k, v in os.environ.items() if _SECRET_ENV.search(k.upper()) and len(v) >= 8}
    extra = {n.strip() for n in os.environ.get(EXTRA_KEY_ENVS, "").split(",") if n.strip()}
    values |= {os.environ[n] for n in extra if len(os.environ.get(n, "")) >= 8}
    return sorted(values | _registered, key=len, reverse=True)  # longest first: no half-masked key


def redact(text: object) -> str:
    """TEXT with every credential replaced by [REDACTED]."""
    out = str(text)
    for value in _secret_values():
        out = out.replace(value, MASK)
    for pattern, replacement in _PATTERNS:
        out = pattern.sub(replacement, out)
    return out


def redact_data(value):
    """A JSON-like VALUE (a reject row) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(v) for v in value]
    return value


def check_key_env(name: str) -> str:
    """NAME if it may hold the API key sent to an endpoint, else ConfigError saying how to allow it."""
    extra = {n.strip() for n in os.environ.get(EXTRA_KEY_ENVS, "").split(",") if n.strip()}
    if name.upper().startswith("AWS_"):
        raise ConfigError(f"api_key_env {name!r}: an AWS credential is never sent to an API endpoint")
    if name in DEFAULT_KEY_ENVS or _KEY_ENV.match(name) or name in extra:
        return name
    raise ConfigError(f"api_key_env {name!r}: not an API key variable; use one whose name ends in _API_KEY "
                      f"(e.g. OPENROUTER_API_KEY), or list it in {EXTRA_KEY_ENVS}=NAME[,NAME...]")


class RedactingFilter(logging.Filter):
    """Masks credentials in every log record (its message formatted first, so arguments are covered)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            if redact(str(exc)) != str(exc):  # the traceback would print the message as is
                record.exc_info, record.exc_text = None, None
                record.msg = f"{clean} ({type(exc).__name__}: {redact(exc)})"
                record.args = None
        return True
