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

Text from outside (an endpoint's error body, a model name, a generated query)
may hold ANSI escapes and control characters that would rewrite a terminal:
`printable` redacts and escapes them, and every log record and the CLI's error
line (`m3tune.cli._fail`) and tracebacks (`install_excepthook`) go through it.
Data is kept as written (queries.jsonl holds the text, JSON-escaped); only what
is printed is escaped.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback

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
    # credentials in a URL's user part (https://user:key@proxy/v1, s3://AKID:SECRET@bucket), as an HTTP
    # library's error quotes it. The password runs to the last '@' before a space or quote, whatever it holds:
    # AWS secrets hold '/', '+', '='; an escaped one '%2F'. A URL with '@' in its path after a port loses its
    # host to the mask: masking too much is the safe side.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s@/?#:\"'<>]+:[^\s@\"'<>]*@"), r"\1" + MASK + "@"),
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), MASK),
    (re.compile(r"(?i)((?:aws_)?secret_access_key|aws_session_token|api[_-]?key|x-api-key|access[_-]?token|"
                r"password|passwd|secret)([\"']?\s*[:=]\s*[\"']?)([^\s\"',;}&]{4,})"), r"\1\2" + MASK),
]
# The shortest API key m3tune sends. A key it sends is registered and masked at any length from this one up:
# below it, masking would blank ordinary letters in every message (a 1-character key, 'a', masks every 'a'),
# so such a key is refused instead (no real API key is that short). Values found only by their variable's
# name (_secret_values) keep an 8-character floor: such a variable may hold a placeholder ('none', 'test').
MIN_KEY_CHARS = 4
_registered: set[str] = set()
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but tab and newline, DEL, C1


def check_key(name: str, value: str) -> str:
    """VALUE, the API key read from variable NAME, if it can be masked; ConfigError if it is too short."""
    if len(value) < MIN_KEY_CHARS:
        raise ConfigError(f"{name} holds a key of {len(value)} character(s): API keys of fewer than "
                          f"{MIN_KEY_CHARS} characters are refused (they could not be masked in logs); check it")
    return value


def register(value: str | None) -> None:
    """Mask VALUE (a key read from somewhere other than a credential variable) from now on."""
    if value and len(value) >= MIN_KEY_CHARS:
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


def has_url_credentials(uri: str) -> bool:
    """URI names a user or password before its host (s3://AKID:SECRET@bucket/…)."""
    return _PATTERNS[2][0].match(uri) is not None


def escape_controls(text: str) -> str:
    """TEXT with control characters (ANSI escapes' ESC, bell, backspace, carriage return…) written as \\xNN."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def printable(text: object) -> str:
    """TEXT fit for a terminal or a log: credentials masked, control characters escaped."""
    return escape_controls(redact(text))


def redact_data(value):
    """A JSON-like VALUE (a reject row) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(v) for v in value]
    return value


def check_key_env(name: str, field: str = "api_key_env") -> str:
    """NAME if it may hold the API key sent to an endpoint, else ConfigError saying how to allow it; FIELD names
    the setting in the message (qdrant_api_key_env for a Qdrant server's key)."""
    extra = {n.strip() for n in os.environ.get(EXTRA_KEY_ENVS, "").split(",") if n.strip()}
    if name.upper().startswith("AWS_"):
        raise ConfigError(f"{field} {name!r}: an AWS credential is never sent to an API endpoint")
    if name in DEFAULT_KEY_ENVS or _KEY_ENV.match(name) or name in extra:
        return name
    raise ConfigError(f"{field} {name!r}: not an API key variable; use one whose name ends in _API_KEY "
                      f"(e.g. OPENROUTER_API_KEY), or list it in {EXTRA_KEY_ENVS}=NAME[,NAME...]")


def key_env_validator(field: str):
    """The pydantic validator of a config FIELD that names an API key variable: `check_key_env`, its message
    naming FIELD. Assign it in the model's body (`_key_variable = key_env_validator("api_key_env")`)."""
    from pydantic import field_validator

    return field_validator(field)(classmethod(lambda cls, name: check_key_env(name, field)))


_TOKEN_ENV = re.compile(r"^[A-Z][A-Z0-9_]*_TOKEN$")


def check_token_env(name: str, option: str = "--argo-token-env") -> str:
    """NAME if it may hold a bearer token sent to a server (ARGO_TOKEN), else ConfigError. As `check_key_env`:
    never an AWS variable, and only a name that says it holds a token (`*_TOKEN`, which `redact` masks by name),
    so a typo cannot send another secret to a server as a Bearer token."""
    if name.upper().startswith("AWS_"):
        raise ConfigError(f"{option} {name!r}: an AWS credential is never sent to a server as a token")
    if not _TOKEN_ENV.match(name):
        raise ConfigError(f"{option} {name!r}: not a token variable; use one whose name ends in _TOKEN "
                          "(e.g. ARGO_TOKEN)")
    return name


class RedactingFilter(logging.Filter):
    """Masks credentials and escapes control characters in every log record (its message formatted first, so
    arguments are covered; its traceback, chained exceptions included, too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = printable(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = "".join(traceback.format_exception(*record.exc_info))
            if printable(text) != text:  # the traceback would print a message as is: print it cleaned instead
                record.exc_info, record.exc_text = None, None
                record.msg, record.args = f"{clean}\n{printable(text)}", None
        return True


def _excepthook(kind, value, tb) -> None:
    sys.stderr.write(printable("".join(traceback.format_exception(kind, value, tb))))


def install_excepthook() -> None:
    """Print uncaught exceptions' tracebacks (`-v`, bugs) cleaned: an exception's message, or one it was
    raised from, can quote a URL with its credentials or an endpoint's escapes."""
    sys.excepthook = _excepthook
