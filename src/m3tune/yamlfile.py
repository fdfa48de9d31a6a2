"""Reading the YAML files m3tune takes (run configs, quality configs): strict where PyYAML is lenient.

PyYAML's safe loader keeps the last of two equal keys (so `limit: 100` then
`limit: 5` silently runs with 5) and composes nested nodes recursively (so a
file nested 50,000 levels deep ends in a RecursionError). Here a duplicate
key is an error naming both lines, nesting deeper than MAX_DEPTH is refused
as it is read, and every problem is a `BadYaml` with file, line and column:
the CLI exits 4 (the same file fails the same way on every rerun).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from m3tune.errors import BadInput, ConfigError

MAX_DEPTH = 64  # a run config nests three or four levels; 64 leaves room for anything real


class BadYaml(ConfigError, BadInput):
    """A YAML file that cannot be read as written."""


def _where(name: str, mark) -> str:
    return f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name


class _StrictLoader(yaml.SafeLoader):
    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise BadYaml(f"{_where(self.name, self.peek_event().start_mark)}: nested deeper than "
                              f"{MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: PyYAML's own error says so
                break
            if first is not key_node.start_mark:
                raise BadYaml(f"{_where(self.name, key_node.start_mark)}: duplicate key {key!r} "
                              f"(first at line {first.line + 1}); remove one")
        return super().construct_mapping(node, deep=deep)


def _reader_where(e: yaml.YAMLError, text: str) -> str:
    """'line 2, column 11: character #x0000' for a reader's error (it carries an offset, not a mark)."""
    position, character = getattr(e, "position", None), getattr(e, "character", None)
    if not isinstance(position, int):
        return str(e)
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    shown = f"#x{character:04x}" if isinstance(character, int) else repr(character)
    return f"{line}:{column}: invalid YAML: character {shown}: {getattr(e, 'reason', 'not allowed')}"


def load_yaml(text: str, where: str) -> Any:
    """The data of the YAML document TEXT, read from WHERE (named in errors)."""
    try:
        # inside the try: the reader checks the text (a NUL byte, a control character) as it is handed over
        loader = _StrictLoader(text)
    except yaml.YAMLError as e:
        raise BadYaml(f"{where}:{_reader_where(e, text)}; remove it") from None
    loader.name = where
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise BadYaml(f"{_where(where, mark)}: invalid YAML: {problem}") from None
    except RecursionError:  # a structure deeper than Python's stack that still slipped past compose_node
        raise BadYaml(f"{where}: nested too deeply to read") from None
    finally:
        loader.dispose()


def read_yaml(path: Path) -> Any:
    """The data of the YAML file PATH (empty: {})."""
    from m3tune.storage import StorageError, open_regular

    try:
        with open_regular(path) as f:  # a named pipe given as --config would block a plain read
            text = f.read().decode("utf-8")
    except StorageError as e:
        raise ConfigError(f"{path}: cannot read config: {str(e).rsplit(': ', 1)[-1]}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config: {getattr(e, 'strerror', None) or e}") from None
    data = load_yaml(text, str(path))
    return {} if data is None else data
