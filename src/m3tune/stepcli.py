"""`m3tune step NAME`: one command per pipeline step, its options built from the step's config model.

The config model is the one place a step's parameters are declared: its
fields (with their descriptions and defaults) are the command's options, the
keys of `m3tune run --config`, and what the manifest records. Building the
command from it keeps `--help`, the YAML and the code from drifting apart.

Field names become options (`max_copy_words` → `--max-copy-words`); a field
may name its option (`json_schema_extra={"cli": "source"}`) and add one that
empties a list (`{"cli_empty": "no-packaged"}`); nested models (the LLM
settings) are flattened; a mapping is set in the YAML only. An option not given keeps the model's default.
The command is a plain function whose signature is built here, so Typer
reads it like any hand-written command.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Annotated, Any, Optional

import typer
from pydantic import BaseModel

CFG, EMPTY = "cfg__", "empty__"


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(scalar type, is a list) of a field annotation, Optional removed."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else (str, False)
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _default_text(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def config_parameters(model: type[BaseModel], path: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """Keyword parameters, annotated for Typer, one per field of MODEL (nested models flattened)."""
    out: list[inspect.Parameter] = []
    for name, field in model.model_fields.items():
        scalar, is_list = _unwrap(field.annotation)
        if isinstance(scalar, type) and issubclass(scalar, BaseModel):
            out += config_parameters(scalar, (*path, name))
            continue
        if typing.get_origin(scalar) is dict:  # a mapping (evaluate's per-model profiles): YAML only
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flag = str(extra.get("cli", name.replace("_", "-")))
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or name} (default: {_default_text(default)})" + (" (repeatable)" if is_list else "")
        key = "__".join((*path, name))
        if scalar is bool and not is_list:
            annotation = Annotated[Optional[bool], typer.Option(f"--{flag}/--no-{flag}", help=help_text, show_default=False)]
        elif is_list:
            if typing.get_origin(scalar) is typing.Literal:  # Typer takes no list of Literal: the model checks the values
                help_text += f" one of: {', '.join(map(str, typing.get_args(scalar)))}"
                scalar = str
            annotation = Annotated[Optional[list[scalar]], typer.Option(f"--{flag}", help=help_text, show_default=False)]
        else:
            annotation = Annotated[Optional[scalar], typer.Option(f"--{flag}", help=help_text, show_default=False)]
        out.append(inspect.Parameter(CFG + key, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
        if is_list and extra.get("cli_empty"):
            out.append(inspect.Parameter(EMPTY + key, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
                bool, typer.Option(f"--{extra['cli_empty']}", help=f"No {flag} at all (an empty list).")]))
    return out


def config_values(params: dict[str, Any]) -> dict[str, Any]:
    """The nested dict of the options that were given (to validate with the config model)."""
    values: dict[str, Any] = {}
    for name, value in params.items():
        if name.startswith(EMPTY):
            if not value:
                continue
            value, name = [], CFG + name[len(EMPTY):]
        elif not name.startswith(CFG) or value is None:
            continue
        *parents, leaf = name[len(CFG):].split("__")
        target = values
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = list(value) if isinstance(value, (list, tuple)) else value
    return values


def check_unique(parameters: list[inspect.Parameter], step: str) -> None:
    """Two fields must not claim the same option (a flattened nested model could)."""
    seen: dict[str, str] = {}
    for p in parameters:
        info = typing.get_args(p.annotation)[1] if typing.get_origin(p.annotation) is Annotated else None
        names = [info.default] + list(info.param_decls) if info is not None else []
        for decl in names:
            if not isinstance(decl, str) or not decl.startswith("--"):
                continue
            for flag in decl.split("/"):
                if flag in seen:
                    raise RuntimeError(f"step {step}: option {flag} would set both {seen[flag]} and {p.name}")
                seen[flag] = p.name
