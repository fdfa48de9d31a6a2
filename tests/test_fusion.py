"""Fusion worth deploying: normalizations, the floor of a missing passage, recipes checked, weights chosen on
held-out-dev only."""

from __future__ import annotations

import math

import pytest

from m3tune.errors import ConfigError
from m3tune.evaluation import fusion
from m3tune.evaluation.fusion import Recipe, fuse_one, normalize
from m3tune.records import GoldQuery


def test_normalizations_and_floors_match_hand_computed_values():
    scores = {"a": 3.0, "b": 2.0, "c": 1.0}
    out, floor = normalize(scores, "minmax")
    assert out == {"a": 1.0, "b": 0.5, "c": 0.0} and floor == 0.0
    out, floor = normalize(scores, "zscore")
    sd = math.sqrt(2 / 3)
    assert out["a"] == pytest.approx(1 / sd) and out["b"] == 0.0 and floor == pytest.approx(-1 / sd)
    out, floor = normalize({"a": 0.9, "b": 0.5}, "tmm", lo=-1.0)  # a cosine: its theoretical minimum -1
    assert out["a"] == 1.0 and out["b"] == pytest.approx(1.5 / 1.9) and floor == pytest.approx(1.5 / 1.9)
    assert normalize({"a": 2.0, "b": 2.0}, "minmax")[0] == {"a": 1.0, "b": 1.0}  # all equal
    assert normalize({}, "zscore") == ({}, 0.0)
    with pytest.raises(ConfigError, match="unknown"):
        normalize(scores, "softmax")


def test_a_passage_missing_from_one_list_takes_that_lists_floor():
    bm25 = {"a": 10.0, "b": 4.0, "c": 2.0}  # minmax: 1, 0.25, 0 (floor 0)
    dense = {"b": 0.9, "d": 0.7, "c": 0.5}  # minmax: 1, 0.5, 0 (floor 0)
    fused = fuse_one([bm25, dense], (0.5, 0.5), normalization="minmax", kinds=("bm25", "dense"), depth=10)
    assert fused == pytest.approx({"a": 0.5, "b": 0.625, "d": 0.25, "c": 0.0})
    assert list(fused) == ["b", "a", "d", "c"]  # best first
    # z-score's floor is the list's lowest normalized value, not 0 (its mean)
    z = fuse_one([bm25, dense], (0.5, 0.5), normalization="zscore", kinds=("bm25", "dense"), depth=10)
    nb, fb = normalize(bm25, "zscore")
    nd, fd = normalize(dense, "zscore")
    assert z["a"] == pytest.approx(0.5 * nb["a"] + 0.5 * fd) and z["d"] == pytest.approx(0.5 * fb + 0.5 * nd["d"])
    # an empty list (BM25 found no query word) adds 0: the other decides alone
    assert fuse_one([{}, dense], (0.7, 0.3), normalization="minmax", kinds=("bm25", "dense"),
                    depth=10) == pytest.approx({"b": 0.3, "d": 0.15, "c": 0.0})
    # each list is cut to its top DEPTH before it is normalized; the fused list keeps DEPTH
    assert list(fuse_one([bm25, dense], (1.0, 0.0), normalization="minmax", kinds=("bm25", "dense"),
                         depth=2)) == ["a", "b"]


@pytest.mark.parametrize("weights, match", [
    ({"default": (0.5, -0.5)}, "finite number ≥ 0"), ({"default": (float("nan"), 1.0)}, "finite number ≥ 0"),
    ({"default": (0.5, 0.6)}, "must sum to 1"), ({"en": (0.5, 0.5)}, "no 'default'"),
    ({"default": (1.0,)}, "1 weights for 2 members")])
def test_bad_weights_are_clear_errors(weights, match):
    with pytest.raises(ConfigError, match=match):
        Recipe(("bm25", "dense"), ("bm25", "dense"), "minmax", weights)


def test_an_unknown_normalization_or_a_tmm_without_a_minimum_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown"):
        Recipe(("bm25", "dense"), ("bm25", "dense"), "l2", {"default": (0.5, 0.5)})
    with pytest.raises(ConfigError, match="no theoretical minimum for a hybrid"):
        Recipe(("bm25", "h"), ("bm25", "hybrid"), "tmm", {"default": (0.5, 0.5)})
    with pytest.raises(ConfigError, match="not a fusion recipe"):
        Recipe.from_json({"members": ["a", "b"]})
    recipe = Recipe(("bm25", "d"), ("bm25", "dense"), "tmm", {"default": (0.4, 0.6), "en": (0.0, 1.0)})
    assert Recipe.from_json(recipe.to_json()) == recipe and recipe.weights_for("ar") == (0.4, 0.6)


def test_the_weight_grid_covers_the_simplex():
    assert len(fusion.weight_grid(2, 0.05)) == 21 and len(fusion.weight_grid(3, 0.1)) == 66
    assert all(abs(sum(w) - 1) < 1e-9 and min(w) >= 0 for w in fusion.weight_grid(3, 0.1))
    with pytest.raises(ConfigError, match="must divide 1"):
        fusion.weight_grid(2, 0.3)


def _query(qid: str, lang: str, relevant: str, split: str = "held-out-dev") -> GoldQuery:
    return GoldQuery(id=qid, query=qid, relevant_ids=[relevant], category="thematic", language=lang,
                     source="quran", difficulty="medium", split=split)


def test_weights_are_chosen_per_language_on_the_dev_runs_only():
    """Arabic dev queries are answered by the lexical list, English ones by the dense one: each language gets
    its own weights. The test queries, where the opposite holds, change nothing: the choice never reads them."""
    from m3tune.evaluation.models import ModelSpec
    from m3tune.evaluation.step import _fused

    dev = [_query(f"d{i}", "ar" if i % 2 else "en", f"quran:1:{i}") for i in range(8)]
    test = [_query(f"t{i}", "ar" if i % 2 else "en", f"quran:1:{i}", "held-out-test") for i in range(8)]

    def runs(good_lang: str, good: bool, queries):
        # the member ranks the relevant passage first for GOOD_LANG's queries (or for the others, not GOOD)
        return {g.id: ({g.relevant_ids[0]: 9.0, "x": 5.0, "y": 1.0}
                       if (g.language == good_lang) == good else {"x": 9.0, "y": 5.0, g.relevant_ids[0]: 1.0})
                for g in queries}

    lexical = {**runs("ar", True, dev), **runs("ar", False, test)}
    dense = {**runs("en", True, dev), **runs("en", False, test)}
    runs_of = {"bm25": (ModelSpec("bm25", "bm25", "arabic", "bm25"), lexical),
               "e5": (ModelSpec("e5", "dense", "local:e5-small", "e5"), dense)}
    spec = ModelSpec("tuned", "fusion", "bm25,e5", "tuned=fusion:bm25,e5")
    ranked, out = _fused(spec, runs_of, test, dev, dev_set={"path": "dev"}, normalizations=["minmax"], step=0.25,
                         k=10)
    weights = out["recipe"]["weights"]
    assert weights["ar"][0] > weights["ar"][1] and weights["en"][1] > weights["en"][0]
    assert out["recipe"]["chosen_on"] == {"path": "dev"} and out["sweep"]["chosen"]["dev_mean"] == 1.0
    assert set(ranked.runs[None]) == {g.id for g in test}  # the figures are the test queries'
    # on test the dev-chosen weights are wrong by construction: the fused ranking is the bad list's
    assert all(next(iter(ranked.runs[None][g.id])) != g.relevant_ids[0] for g in test)


def test_a_fusion_member_must_be_listed_before_it():
    from m3tune.evaluation.models import parse_models

    specs = parse_models(["bm25", "base", "tuned=fusion:bm25,base"], "local:tiny-xlmr")
    assert specs[2].kind == "fusion" and specs[2].target == "bm25,base"
    with pytest.raises(ConfigError, match="not a model listed before it"):
        parse_models(["bm25", "tuned=fusion:bm25,base", "base"], "local:tiny-xlmr")
    with pytest.raises(ConfigError, match="two or more distinct"):
        parse_models(["bm25", "tuned=fusion:bm25"], "local:tiny-xlmr")


def test_evaluate_refuses_a_dev_set_with_test_rows_and_a_fusion_without_dev(tmp_path):
    from m3tune.evaluation.gold import load_gold
    from m3tune.evaluation.step import EvaluateConfig, run_evaluation
    from m3tune.jsonl import RecordError
    from m3tune.records import Passage

    gold = load_gold("packaged:gold_v4_test.jsonl")
    ids = sorted({pid for g in gold for pid in g.relevant_ids})
    passages = [Passage(id=pid, source="quran", collection="quran", text="نص", text_plain="نص", meta={})
                for pid in ids]
    config = EvaluateConfig(test_set="packaged:gold_v4_test.jsonl", base_model="local:tiny-xlmr", held_out=None,
                            models=["bm25", "base", "tuned=fusion:bm25,base"], dev_set="packaged:gold_v4_test.jsonl")
    with pytest.raises(RecordError, match="split.*held-out-test: choices"):
        run_evaluation(passages, config)
    with pytest.raises(ConfigError, match="set evaluate's dev_set"):
        run_evaluation(passages, config.model_copy(update={"dev_set": None}))
    with pytest.raises(ValueError, match="fusion normalization 'l2'"):
        EvaluateConfig(fusion_normalizations=["l2"])


def test_a_quote_takes_the_lexical_list_alone_when_the_recipe_routes_it():
    pairs = ["p:a_b", "p:b_c"]
    assert fusion.quote_share(pairs, [{"p:x_y"}, {"p:a_b", "p:b_c", "p:c_d"}]) == 1.0
    assert fusion.quote_share(pairs, [{"p:a_b"}, {"p:b_c"}]) == 0.5  # in two passages, not one
    assert fusion.quote_share(["p:a_b"], [{"p:a_b"}]) == 0.0  # one pair (two words) is not a quote
    # in the top QUOTE_DEPTH passages only
    assert fusion.quote_share(pairs, [set()] * fusion.QUOTE_DEPTH + [{"p:a_b", "p:b_c"}]) == 0.0
    bm25 = {"q": {"a": 10.0, "b": 4.0}}
    dense = {"q": {"b": 0.9, "a": 0.1}}
    routed = Recipe(("bm25", "d"), ("bm25", "dense"), "minmax", {"default": (0.2, 0.8)}, quote_share=0.8)
    assert list(fusion.fuse(routed, [bm25, dense], {"q": "ar"}, {"q": 0.8})["q"]) == ["a", "b"]  # BM25 alone
    assert list(fusion.fuse(routed, [bm25, dense], {"q": "ar"}, {"q": 0.6})["q"]) == ["b", "a"]  # fused
    with pytest.raises(ConfigError, match="no member is bm25"):
        Recipe(("d", "e"), ("dense", "dense"), "minmax", {"default": (0.5, 0.5)}, quote_share=1.0)
    with pytest.raises(ConfigError, match="a share in"):
        Recipe(("bm25", "e"), ("bm25", "dense"), "minmax", {"default": (0.5, 0.5)}, quote_share=1.5)


def test_the_fusion_is_chosen_on_independent_dev_rows_unless_told_otherwise():
    from m3tune.evaluation.step import EvaluateConfig

    assert EvaluateConfig().fusion_select == "independent"
    with pytest.raises(ValueError, match="fusion_select"):
        EvaluateConfig(fusion_select="test")
