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

from m3tune.errors import BadInput, ConfigError

_PART = re.compile(r"^\[(system|user)\]\s*$", re.M)


class BadPrompt(ConfigError, BadInput):
    """A prompt file that cannot be used as written: the same file fails the same way on a rerun (exit 4)."""


def _check_placeholders(text: str, where: str) -> None:
    """Every `$` of TEXT starts a field ($name, ${name}) or is written `$$`: string.Template would otherwise
    raise its ValueError at the first prompt built, a traceback after the passages were read."""
    for m in Template.pattern.finditer(text):
        if m.group("invalid") is not None:
            line = text.count("\n", 0, m.start()) + 1
            found = text[m.start():m.start() + 2]
            raise BadPrompt(f"{where}:{line}: invalid placeholder {found!r}: fields are $name or ${{name}}; "
                            "write $$ for a dollar sign")


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
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read prompt file {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise BadPrompt(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
        _check_placeholders(text, path)
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
