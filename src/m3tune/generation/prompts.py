"""Versioned prompt files: `prompts/NAME.txt`, with a [system] and a [user] part.

The file name is the prompt version recorded with every generated query and
keyed in the journal, so changing a prompt means a new file (queries-v2),
never an edit: answers to the old prompt are then neither reused nor lost.
Fields are `$name` (string.Template), so JSON braces need no escaping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from string import Template

from m3tune.errors import ConfigError

_PART = re.compile(r"^\[(system|user)\]\s*$", re.M)


@dataclass(frozen=True)
class Prompt:
    version: str
    system: str
    user: str

    def messages(self, **values: object) -> list[dict[str, str]]:
        try:
            return [{"role": "system", "content": Template(self.system).substitute(values)},
                    {"role": "user", "content": Template(self.user).substitute(values).strip()}]
        except KeyError as e:
            raise ConfigError(f"prompt {self.version}: no value given for ${e.args[0]}") from None


def load_prompt(version: str) -> Prompt:
    """The packaged prompt VERSION (e.g. 'queries-v1'), or a file path ending in .txt."""
    if version.endswith(".txt"):
        path = version
        try:
            text = open(path, encoding="utf-8").read()
        except OSError as e:
            raise ConfigError(f"cannot read prompt file {path}: {e.strerror}") from None
        version = path.rsplit("/", 1)[-1][:-4]
    else:
        resource = files("m3tune.generation").joinpath(f"prompts/{version}.txt")
        if not resource.is_file():
            available = sorted(p.name[:-4] for p in files("m3tune.generation").joinpath("prompts").iterdir()
                               if p.name.endswith(".txt"))
            raise ConfigError(f"unknown prompt {version!r}; packaged prompts: {', '.join(available)}")
        text = resource.read_text(encoding="utf-8")
    parts = _PART.split(text)
    sections = dict(zip(parts[1::2], (p.strip() for p in parts[2::2])))
    if set(sections) != {"system", "user"}:
        raise ConfigError(f"prompt {version}: needs exactly one [system] and one [user] part")
    return Prompt(version, sections["system"], sections["user"])
