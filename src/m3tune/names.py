"""Names and locations that become paths: one rule for each, wherever the value comes from.

A collection name, a cache folder's name, an id used as a folder: m3tune joins it to a folder of its own
(the cache's `qdrant-edge/`) and may then replace or delete what is at the result. `/abs/victim` or
`../victim` joined so names another place, so every such value, from the command line, a config (through a
pydantic validator) or a file read from a run root (index.json), goes through `safe_name` before it is used.

A location (`embeddings_cache`: a path or a URI) may name any folder the user chooses, so it is checked as a
location (`safe_location`: the run-location rules of `storage.open_store`), and is only ever taken from the
user's own config, never from a file in a run root.
"""

from __future__ import annotations

import re

from m3tune.errors import ConfigError

# A letter or digit first: no '.', '..', hidden names or names that read as options. Used with fullmatch:
# `$` with match() would also accept a trailing newline.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def safe_name(value: object, what: str, where: str = "") -> str:
    """VALUE if it is a plain name (1-128 letters, digits, '.', '_' or '-', starting with a letter or digit:
    no separator, no '.' or '..'), else ConfigError naming WHERE (a file, an option) and WHAT (the field)."""
    if isinstance(value, str) and NAME_PATTERN.fullmatch(value):
        return value
    prefix = f"{where}: " if where else ""
    raise ConfigError(f"{prefix}{what} {value!r}: not a plain name; use 1-128 letters, digits, '.', '_' or '-', "
                      "starting with a letter or digit (no '/', no '..')")


def safe_location(value: str, what: str) -> str:
    """VALUE if it is a usable folder location (a path, file:// or s3:// URI without '..' or '.' segments,
    query parts or control characters), else ConfigError naming WHAT."""
    from m3tune.storage import StorageError, open_store

    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise ConfigError(f"{what} {value!r}: control characters are not allowed in a location")
    try:
        open_store(value)  # builds no client and touches nothing: the location's rules only
    except StorageError as e:
        raise ConfigError(f"{what}: {e}") from None
    return value
