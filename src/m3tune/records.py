"""The record contracts between steps (DESIGN.md, "Record contracts").

Every JSONL file the pipeline reads is validated row by row against one of
these models; `m3tune.jsonl` names the file, line and field of a bad row.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import math

import pydantic_core

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

PASSAGE_ID = r"^[a-z][a-z0-9_-]*:[A-Za-z0-9][A-Za-z0-9:._-]*$"
# The longest packaged passage (a hadith of Sahih Muslim) has 14,663 characters; the encoders read 512
# tokens of it. A passage of megabytes is a broken file (a whole book on one line), not a passage: refused.
MAX_PASSAGE_CHARS = 100_000
# A query is read in 128 tokens for training (query_max_length) and the longest gold query has 116
# characters: thousands of characters are a passage or a whole file pasted into the field, which would be
# tokenized, truncated and trained on without a word. 4,000 leaves room for any real quote.
MAX_QUERY_CHARS = 4_000
# A short text field (an id, a collection, a category, a generator's name) is a word or a few.
MAX_NAME_CHARS = 1_000
# meta holds a grade, a chapter, a reference: a few hundred bytes. Ten megabytes is a broken export (a
# book in one field) that every later step would carry, copy and publish: refused, as JSON text.
MAX_META_CHARS = 64_000
# Negatives per example: the miner writes tens; thousands would make one example dwarf a batch.
MAX_NEGATIVES = 1_000
# Some character that is not white space: " " passes min_length=1 but is no text to search or train on.
NOT_BLANK = r"\S"

PassageId = Annotated[str, StringConstraints(pattern=PASSAGE_ID, max_length=MAX_NAME_CHARS)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS, pattern=NOT_BLANK)]
QueryText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUERY_CHARS, pattern=NOT_BLANK)]
Language = Literal["ar", "en"]
Source = Literal["quran", "hadith"]
QueryType = Literal["question", "keyword", "conceptual", "exact"]
Score = Annotated[float, Field(allow_inf_nan=False)]
PassageText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PASSAGE_CHARS, pattern=NOT_BLANK)]


def _finite(value: Any, where: str = "") -> Any:
    # JSON has no NaN or Infinity: the parser accepts them, the writer would turn them into null.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where or 'value'} is {value}: NaN and Infinity are not JSON numbers")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite(v, f"{where}[{i}]")
    return value


def _bounded(meta: dict[str, Any]) -> dict[str, Any]:
    size = len(pydantic_core.to_json(meta))
    if size > MAX_META_CHARS:
        raise ValueError(f"is {size:,} bytes of JSON, more than MAX_META_CHARS ({MAX_META_CHARS:,}): meta is for "
                         "a grade, a chapter or a reference; keep long texts out of it")
    return _finite(meta, "meta")


Meta = Annotated[dict[str, Any], AfterValidator(_bounded)]


class _Strict(BaseModel):
    # Our own records: an unknown field is a typo or a contract drift, so it is an error.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Passage(_Strict):
    """One retrievable unit: a Quran verse or a hadith."""

    id: PassageId = Field(description="stable readable id: quran:2:153, bukhari:1, muslim:196")
    source: Source
    collection: Text = Field(description="quran, bukhari, muslim, ...")
    text: PassageText = Field(description=f"Arabic as displayed (at most {MAX_PASSAGE_CHARS:,} characters)")
    text_plain: PassageText = Field(description="diacritics stripped and normalized (m3tune.arabic.normalize)")
    translation_en: Annotated[str, StringConstraints(max_length=MAX_PASSAGE_CHARS)] | None = None
    meta: Meta = Field(default_factory=dict)


class PassageInput(_Strict):
    """A passage as a user supplies it: text_plain and collection are derived when absent."""

    id: PassageId
    source: Source
    text: PassageText
    collection: Text | None = None
    text_plain: PassageText | None = None
    translation_en: Annotated[str, StringConstraints(max_length=MAX_PASSAGE_CHARS)] | None = None
    meta: Meta = Field(default_factory=dict)


class Generator(_Strict):
    backend: Text
    model: Text
    prompt_version: Text


class Query(_Strict):
    """A training query with the passage(s) that answer it."""

    id: Text
    query: QueryText
    language: Language
    type: QueryType
    positive_ids: list[PassageId] = Field(min_length=1)
    source: Literal["quran", "hadith", "mixed"]
    generator: Generator


class Example(BaseModel):
    """A training example, a superset of FlagEmbedding's {query, pos, neg} format.

    Extra fields are kept (not rejected), so that FlagEmbedding files with
    their own additions pass through the pipeline without losing anything.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    query: QueryText
    pos: list[PassageText] = Field(min_length=1, max_length=MAX_NEGATIVES)
    neg: list[PassageText] = Field(default_factory=list, max_length=MAX_NEGATIVES)
    pos_ids: list[PassageId] | None = None
    neg_ids: list[PassageId] | None = None
    pos_scores: list[Score] | None = None
    neg_scores: list[Score] | None = None
    query_id: str | None = None
    language: Language | None = None
    type: QueryType | None = None
    source: Literal["quran", "hadith", "mixed"] | None = None
    neg_kinds: list[Literal["hard", "semi_hard", "random"]] | None = Field(
        default=None, description="how each negative was mined (training draws its shares per epoch)")
    related_ids: list[PassageId] | None = Field(
        default=None, description="near-duplicates of the positives that are not positives: never negatives")

    @field_validator("neg_ids")
    @classmethod
    def _no_positive_negative(cls, values: list | None, info: ValidationInfo) -> list | None:
        both = sorted(set(values or ()) & set(info.data.get("pos_ids") or ()))
        if both:
            raise ValueError(f"{both[0]!r} is both a positive and a negative ({len(both)} such ids)")
        return values

    @field_validator("related_ids")
    @classmethod
    def _related_not_negative(cls, values: list | None, info: ValidationInfo) -> list | None:
        both = sorted(set(values or ()) & set(info.data.get("neg_ids") or ()))
        if both:
            raise ValueError(f"{both[0]!r} is a near-duplicate of a positive and a negative ({len(both)} such ids)")
        return values

    @field_validator("pos_ids", "pos_scores", "neg_ids", "neg_scores", "neg_kinds")
    @classmethod
    def _parallel_to_texts(cls, values: list | None, info: ValidationInfo) -> list | None:
        # pos and neg are declared first, so they are validated (and in info.data) by now
        base = info.field_name.split("_")[0]
        if values is not None and base in info.data and len(values) != len(info.data[base]):
            raise ValueError(f"has {len(values)} items but {base} has {len(info.data[base])}")
        return values


def example_facts(example: Example) -> tuple[str, str, str]:
    """(language, type, source) of an example: its own fields, else the query's script, "unknown", and the
    positive ids' source ("unknown" without ids). FlagEmbedding rows carry none of them."""
    from m3tune.arabic import detect_language

    source = example.source or (source_of(example.pos_ids) if example.pos_ids else "unknown")
    return example.language or detect_language(example.query), example.type or "unknown", source


def source_of(passage_ids: list[str]) -> str:
    """quran, hadith or mixed: what the passages with these ids are (ids say their source)."""
    kinds = {"quran" if i.startswith("quran:") else "hadith" for i in passage_ids}
    return kinds.pop() if len(kinds) == 1 else "mixed"


class GoldQuery(_Strict):
    """An evaluation query with its relevant passages."""

    id: Text
    query: QueryText
    relevant_ids: list[PassageId] = Field(min_length=1)
    category: Text = Field(description="exact, thematic, cross_lingual, paraphrase, ...")
    language: Language
    source: Literal["quran", "hadith", "mixed"]
    difficulty: Literal["easy", "medium", "hard"]
    held_out: bool | None = Field(default=None, description="every relevant passage lies in the held-out "
                                  "partition (m3tune.corpus.heldout), so training cannot have seen it; "
                                  "None: not tagged")
    origin: Text | None = Field(default=None, description="how the query was made: v2 (hand-checked), or the "
                                "build rule (exact-span, english-span, tafsir-paraphrase, ...)")
    split: Literal["held-out-dev", "held-out-test", "seen"] | None = Field(
        default=None, description="which part of the held-out partition every relevant passage lies in "
        "(m3tune.corpus.heldout: held-out-dev is where choices are made, held-out-test is read once per "
        "reported result); seen: some relevant passage may be trained on; None: not tagged (gold v3)")
    independent: bool | None = Field(
        default=None, description="no training generator shares this query's construction rule, its lexicon "
        "or the text it was cut from (gold v4 tags every query; the headline is held-out-test and independent)")
    shares: list[PassageText] = Field(default_factory=list, description="what a training generator shares with this "
                               "query, when it is not independent (the rule, the text), one reason an item")
