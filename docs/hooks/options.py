"""MkDocs hook: the generated pages — the README as the home page, and every step's options from its config.

Each step's options are read from its pydantic config class (the one `m3tune step NAME` builds its options
from and `m3tune run --config` validates against), so the reference cannot drift from the code: a field added,
renamed or given another default changes the page at the next build. The README is the one copy of the home
page; its links into docs/ are made relative to the site here rather than kept twice.
"""

from __future__ import annotations

import json
import re
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

REPO = Path(__file__).resolve().parents[2]
OPTIONS_PAGE = "reference/options.md"


def type_text(annotation: Any) -> str:
    """A field's type as a reader writes it in YAML terms: `int | None`, `list[str]`, `"exact" | "qdrant"`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return type_text(typing.get_args(annotation)[0])
    if origin in (list, dict, tuple, set):
        return f"{origin.__name__}[{', '.join(type_text(a) for a in typing.get_args(annotation))}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (Optional stripped), which the CLI and this page flatten into its own fields."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def field_rows(model: type[BaseModel], path: tuple[str, ...] = ()) -> list[tuple[str, str, str, str, str]]:
    """(YAML key, command-line option, type, default, description) for every field of MODEL, nested flattened.

    The option follows `m3tune.stepcli.config_parameters`: the field's `cli` name or its own, a boolean as
    `--x/--no-x`; a mapping has no option (it is set in the YAML only)."""
    rows = []
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        if nested is not None:
            rows += field_rows(nested, (*path, name))
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flag = str(extra.get("cli", name.replace("_", "-")))
        annotation = type_text(field.annotation)
        if "dict[" in annotation:
            option = "YAML only"
        elif annotation in ("bool", "bool | None"):
            option = f"`--{flag}` / `--no-{flag}`"
        else:
            option = f"`--{flag}`"
        if extra.get("cli_empty"):
            option += f", `--{extra['cli_empty']}`"
        rows.append((".".join((*path, name)), option, annotation, _default_text(field), field.description or ""))
    return rows


def options_page() -> str:
    from m3tune.pipeline import OPTIONAL, PIPELINE, STEPS

    lines = [
        "# Step options",
        "",
        "Generated at each docs build from the steps' pydantic configs (`docs/hooks/options.py`): every field,",
        "its type, default and description. A field is a key under the step's name in `m3tune run --config",
        "run.yaml` (a dotted key is nested: `llm.model` is `llm: {model: …}`) and an option of",
        "`m3tune step NAME` (`m3tune step NAME --help` prints the same list).",
        "",
        "Steps in the order `m3tune run` runs them, then the optional ones and those `m3tune run` leaves out.",
        "",
    ]
    order = PIPELINE + [n for n in OPTIONAL if n not in PIPELINE] + [n for n in STEPS if n not in PIPELINE + OPTIONAL]
    for name in order:
        step = STEPS[name]
        lines += [f"## {name}", "", f"{step.summary[0].upper()}{step.summary[1:]}.", "",
                  f"Config class: `{step.config.__module__}.{step.config.__name__}`.", "",
                  "| key | option | type | default | description |", "|---|---|---|---|---|"]
        for key, option, annotation, default, description in field_rows(step.config):
            lines.append(f"| `{key}` | {option} | `{_cell(annotation)}` | `{_cell(default)}` | {_cell(description)} |")
        lines.append("")
    return "\n".join(lines)


def readme_page() -> str:
    """README.md with its docs/ links made site-relative (the README links into docs/ from the repository root)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.sub(r"\]\(docs/", "](", text)


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for path, content in ((OPTIONS_PAGE, options_page()), ("index.md", readme_page())):
        existing = files.get_file_from_path(path)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, path, content=content))
    return files
