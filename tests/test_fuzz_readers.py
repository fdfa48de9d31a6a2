"""Fuzzing the readers of what a user or a run root hands m3tune: whatever the bytes, the JSONL record readers
and the run-config loader either read them or raise the project's own errors (UserError: one line, an exit
code), never a traceback."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m3tune.errors import UserError
from m3tune.jsonl import Rejects, read_jsonl
from m3tune.records import Example, GoldQuery, Passage, PassageInput, Query

MODELS = [Passage, PassageInput, Query, Example, GoldQuery]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values with the record fields' names as keys, so that many inputs get past "unknown field" to the
# field validators (types, bounds, parallel lists, NaN, nesting)
FIELDS = ["id", "source", "collection", "text", "text_plain", "translation_en", "meta", "query", "language", "type",
          "positive_ids", "generator", "pos", "neg", "pos_ids", "neg_ids", "pos_scores", "neg_scores", "related_ids",
          "neg_kinds", "relevant_ids", "category", "difficulty", "held_out", "split", "shares", "backend", "model"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["quran", "hadith", "ar", "en", "question", "quran:1:1", "u:1", " ", ""]),
                    st.text(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=3), inner, max_size=4)),
    max_leaves=12)
OBJECTS = st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=8)


def _lines(objects: list[dict]) -> bytes:
    return b"\n".join(json.dumps(o, ensure_ascii=False, allow_nan=True).encode() for o in objects)


def _read_all(data: bytes, model, rejects: Rejects | None = None) -> None:
    try:
        for _ in read_jsonl(io.BytesIO(data), model, name="fuzz.jsonl", rejects=rejects):
            pass
    except UserError as e:
        assert "\n" not in str(e), f"a multi-line error: {e}"


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@FUZZ
@given(data=st.binary(max_size=200))
def test_any_bytes_read_as_records_or_a_user_error(model, data):
    _read_all(data, model)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@FUZZ
@given(objects=st.lists(OBJECTS, min_size=1, max_size=3), skip=st.booleans())
def test_any_json_objects_read_as_records_or_a_user_error(model, objects, skip):
    _read_all(_lines(objects), model, Rejects() if skip else None)


@FUZZ
@given(text=st.text(max_size=120))
def test_any_text_loads_as_a_run_config_or_a_user_error(text):
    from m3tune.cli import run_configs
    from m3tune.yamlfile import load_yaml

    try:
        run_configs(load_yaml(text, "fuzz.yaml"), "fuzz.yaml")
    except UserError as e:
        assert "\n" not in str(e), f"a multi-line error: {e}"


STEP_NAMES = ["ingest", "combine", "analyze", "evaluate", "train", "mine-negatives", "generate-conceptual"]


@FUZZ
@given(config=st.dictionaries(st.sampled_from(STEP_NAMES), st.one_of(st.none(), VALUES), max_size=3))
def test_any_mapping_of_steps_loads_as_a_run_config_or_a_user_error(config):
    from m3tune.cli import run_configs
    from m3tune.yamlfile import load_yaml

    try:
        run_configs(load_yaml(json.dumps(config, allow_nan=True), "fuzz.yaml"), "fuzz.yaml")
    except UserError:
        pass
