"""The evaluate step and `m3tune evaluate`: real corpus, real BM25, the tiny encoder, a loopback embeddings API."""

from __future__ import annotations

import json
import math

import pytest

from m3tune.corpus.passages import read_passages
from m3tune.evaluation.gold import load_gold
from m3tune.evaluation.metrics import METRICS, holm, interval, pairwise, per_query
from m3tune.records import GoldQuery
from m3tune.runroot import open_root

TINY = {"base_model": "local:tiny-xlmr", "max_length": 256, "batch_size": 64}  # as configs/demo.yaml's index


@pytest.fixture(scope="module")
def corpus(full_ingest):
    root, _ = full_ingest
    return read_passages(root)


@pytest.fixture(scope="module")
def gold(corpus):
    return load_gold(None, {p.id for p in corpus})


@pytest.fixture(scope="module")
def small_corpus_file(corpus, gold, tmp_path_factory):
    """Every gold passage and 400 others: a corpus small enough to encode in a test."""
    wanted = {pid for g in gold for pid in g.relevant_ids}
    keep = [p for i, p in enumerate(corpus) if p.id in wanted or i % 50 == 0]
    path = tmp_path_factory.mktemp("eval-corpus") / "passages.jsonl"
    path.write_text("".join(p.model_dump_json() + "\n" for p in keep), encoding="utf-8")
    return path, keep


@pytest.mark.parametrize("analyzer", ["arabic", "plain"])
def test_bm25_finds_every_exact_query_in_the_top_10_of_the_full_corpus(corpus, gold, analyzer):
    from m3tune.evaluation.models import BM25

    exact = [g for g in gold if g.category == "exact"]
    run = BM25(corpus, analyzer).rank(exact, 10)
    values = per_query(exact, run)
    missed = [g.id for g in exact if values[g.id]["hit@10"] != 1.0]
    assert not missed
    assert len(corpus) == 21_176


def test_metrics_match_a_hand_computed_case():
    g = [GoldQuery(id="q1", query="x", relevant_ids=["a:1", "a:2"], category="exact", language="ar",
                   source="quran", difficulty="easy"),
         GoldQuery(id="q2", query="y", relevant_ids=["a:3"], category="exact", language="ar",
                   source="quran", difficulty="easy"),
         GoldQuery(id="q3", query="z", relevant_ids=["a:4"], category="exact", language="en",
                   source="quran", difficulty="easy")]
    run = {"q1": {"b:1": 0.9, "a:1": 0.8, "b:2": 0.7, "a:2": 0.6},  # relevant at ranks 2 and 4
           "q2": {"a:3": 0.5, "b:1": 0.4},  # relevant at rank 1
           "q3": {}}  # nothing returned: zeros, not left out
    v = per_query(g, run)
    ndcg_q1 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    expected_q1 = {"recall@1": 0.0, "recall@5": 1.0, "recall@10": 1.0, "recall@20": 1.0, "recall@100": 1.0,
                   "hit@10": 1.0, "mrr@10": 0.5, "ndcg@10": ndcg_q1, "map@10": (1 / 2 + 2 / 4) / 2,
                   "capped_recall@10": 1.0}
    assert v["q1"] == pytest.approx(expected_q1)
    assert v["q2"] == pytest.approx({name: 1.0 for name in METRICS})
    assert v["q3"] == {name: 0.0 for name in METRICS}


def test_capped_recall_divides_by_at_most_ten_relevant():
    many = [f"a:{i}" for i in range(12)]
    g = [GoldQuery(id="many", query="x", relevant_ids=many, category="thematic", language="ar", source="quran",
                   difficulty="medium"),
         GoldQuery(id="few", query="y", relevant_ids=["a:1", "a:2", "a:3"], category="exact", language="ar",
                   source="quran", difficulty="easy")]
    # many: 5 of its 12 relevant in a top 10 (the other five slots wrong); few: 2 of 3
    run = {"many": {**{f"a:{i}": 1.0 - i / 100 for i in range(5)}, **{f"b:{i}": 0.5 - i / 100 for i in range(5)}},
           "few": {"a:1": 0.9, "b:1": 0.8, "a:2": 0.7}}
    v = per_query(g, run)
    assert v["many"]["recall@10"] == pytest.approx(5 / 12) and v["many"]["capped_recall@10"] == pytest.approx(5 / 10)
    assert v["few"]["recall@10"] == pytest.approx(2 / 3) == v["few"]["capped_recall@10"]


def test_holm_matches_a_hand_computed_case():
    # sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> kept monotone at 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


def test_intervals_hold_the_mean_and_pairwise_tests_are_adjusted():
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.2, 1.0, 1.0, 0.0] * 3
    low, high = interval(values)
    assert low < sum(values) / len(values) < high and 0 <= low and high <= 1
    assert interval([1.0] * 5) == [1.0, 1.0]  # no spread, no interval
    ids = [f"q{i}" for i in range(len(values))]
    a = {q: {"recall@10": v, "mrr@10": v, "ndcg@10": v} for q, v in zip(ids, values)}
    b = {q: {k: min(1.0, x + 0.3) for k, x in r.items()} for q, r in a.items()}
    c = {q: dict(r) for q, r in a.items()}
    out = pairwise({"a": a, "b": b, "c": c}, resamples=2000)
    assert [(r["a"], r["b"]) for r in out["pairs"]] == [("a", "b"), ("a", "c"), ("b", "c")]
    for row in out["pairs"]:
        assert row["ndcg@10"]["p_holm"] >= row["ndcg@10"]["p_value"]
    ab, ac, bc = out["pairs"]
    assert ab["ndcg@10"]["delta"] > 0 and ab["ndcg@10"]["p_holm"] < 0.05
    assert ac["ndcg@10"]["delta"] == 0 and ac["ndcg@10"]["p_holm"] == 1.0
    assert bc["ndcg@10"]["delta"] < 0


def test_step_compares_tiny_bm25_hybrid_with_breakdowns_that_add_up(full_ingest, tmp_path):
    from m3tune.executor import run_step, step_status
    from m3tune.pipeline import STEPS

    src, _ = full_ingest
    root = open_root(str(tmp_path / "runs" / "eval"))
    for name in src.child("ingest").list():  # this run's corpus: the full ingest, as published
        root.child("ingest").write_bytes(name, src.child("ingest").read_bytes(name))
    config = STEPS["evaluate"].config(models=["base", "bm25", "hybrid:base", "bm25-plain"], dims=[16, 8], **TINY)
    assert STEPS["evaluate"].upstream(config) == ("ingest",)  # no run:train named: train is not needed
    manifest, ran = run_step(root, "evaluate", config)
    assert ran and step_status(root, STEPS["evaluate"], config).state == "done"
    out = root.child("evaluate")
    assert {"results.json", "per_query.jsonl", "report.md", "recall10_by_category.png",
            "matryoshka_recall10.png"} <= set(out.list())
    results = json.loads(out.read_bytes("results.json"))
    assert results["schema"] == "m3tune.evaluate/v1" and results["corpus"]["passages"] == 21_176
    assert [m["name"] for m in results["models"]] == ["base", "bm25", "hybrid:base", "bm25-plain"]
    n = results["test_set"]["queries"]
    for m in results["models"]:
        for dim, groups in m["breakdowns"].items():
            assert sum(grp["n"] for grp in groups.values()) == n
            for metric in METRICS:
                assert sum(grp["n"] * grp[metric] for grp in groups.values()) / n == pytest.approx(m["overall"][metric])
    base, bm25, plain = results["models"][0], results["models"][1], results["models"][3]
    assert sorted(base["dims"]) == ["16", "32", "8"] and base["dim"] == 32
    assert bm25["breakdowns"]["category"]["exact"]["hit@10"] == plain["breakdowns"]["category"]["exact"]["hit@10"] == 1.0
    assert plain["breakdowns"]["language"]["en"]["recall@10"] == 0.0  # Arabic words only: no word in common
    assert bm25["breakdowns"]["language"]["en"]["recall@10"] > 0.3  # English queries over the translations
    assert bm25["overall"]["ndcg@10"] > plain["overall"]["ndcg@10"]
    assert 0 <= bm25["significance"]["recall@10"]["p_value"] <= 1 and bm25["significance"]["vs"] == "base"
    rows = [json.loads(line) for line in out.read_bytes("per_query.jsonl").splitlines()]
    assert len(rows) == 4 * n
    assert manifest.metrics["bm25/recall@10"] == pytest.approx(round(bm25["overall"]["recall@10"], 4))
    report = out.read_bytes("report.md").decode()
    assert "| bm25 |" in report and "❌" in report and "## By difficulty" in report
    assert "## Every pair of models" in report and "(small n)" in report and "95% intervals" in report
    assert len(results["pairwise"]["pairs"]) == 6  # 4 models
    for m in results["models"]:
        low, high = m["intervals"]["ndcg@10"]
        assert low <= m["overall"]["ndcg@10"] <= high
    exact = sum(g.category == "exact" for g in load_gold(None))
    assert plain["category_deltas"]["vs"] == "base" and plain["category_deltas"]["exact"]["n"] == exact
    # the held-out and the seen part: each model's part means are those of its per-query rows with that tag
    parts = results["parts"]
    assert parts["held_out"]["queries"] + parts["seen"]["queries"] == n and parts["held_out"]["queries"] >= 150
    for part, flag in (("held_out", True), ("seen", False)):
        for name, m in parts[part]["models"].items():
            mine = [r for r in rows if r["model"] == name and r["held_out"] is flag]
            assert len(mine) == parts[part]["queries"]
            assert m["overall"]["ndcg@10"] == pytest.approx(sum(r["ndcg@10"] for r in mine) / len(mine))
            assert m["intervals"]["ndcg@10"][0] <= m["overall"]["ndcg@10"] <= m["intervals"]["ndcg@10"][1]
        assert parts[part]["models"]["bm25"]["significance"]["vs"] == "base"
        assert len(parts[part]["pairwise"]["pairs"]) == 6
    assert "## Held out (training never saw their passages)" in report and "## Seen: " in report
    assert out.read_bytes("recall10_by_category.png").startswith(b"\x89PNG")


def test_run_model_needs_the_train_step(local_root):
    from m3tune.executor import MissingInput, run_step
    from m3tune.pipeline import STEPS

    config = STEPS["evaluate"].config(models=["base", "run:train", "bm25"])
    assert STEPS["evaluate"].upstream(config) == ("ingest", "train")
    with pytest.raises(MissingInput, match="'ingest'"):
        run_step(local_root, "evaluate", config)


def test_api_model_through_a_loopback_server_with_retries_and_cache(small_corpus_file, monkeypatch, tmp_path):
    from embeddings_server import EmbeddingsServer

    from m3tune.errors import UserError
    from m3tune.evaluation.models import EncodeOptions, parse_model, rank_model

    _, passages = small_corpus_file
    gold = load_gold(None, {p.id for p in passages})
    monkeypatch.setenv("EVAL_TEST_API_KEY", "test-key")
    spec = parse_model("lexical=api:hash-64", "unused")
    with EmbeddingsServer(["429", "500", "429"]) as server:
        options = EncodeOptions(api_base_url=server.url, api_key_env="EVAL_TEST_API_KEY", api_batch_size=100,
                                api_backoff=0.01, embeddings_cache=str(tmp_path / "cache"))
        ranked = rank_model(spec, gold, passages, k=100, dims=[32], options=options)
        first = server.texts_served()
        assert [r["action"] for r in server.requests[:4]] == ["429", "500", "429", "ok"]
        # each distinct text asked once, retries aside (hadith twins share a text, and so a vector)
        assert first == len({p.text for p in passages}) + len({g.query for g in gold})
        values = per_query(gold, ranked.runs[None])
        exact = [g.id for g in gold if g.category == "exact"]
        assert sum(values[q]["hit@10"] for q in exact) / len(exact) > 0.5  # the hashed words do retrieve
        again = rank_model(spec, gold, passages, k=100, dims=[32], options=options)
        assert server.texts_served() == first  # the rerun cost nothing: every vector came from the cache
        assert again.runs == ranked.runs and set(again.runs) == {None, 32}
    with EmbeddingsServer(key="another-key") as server:
        options = EncodeOptions(api_base_url=server.url, api_key_env="EVAL_TEST_API_KEY",
                                embeddings_cache=str(tmp_path / "cache2"))
        with pytest.raises(UserError, match="refused the API key"):
            rank_model(spec, gold[:2], passages, k=10, dims=[], options=options)


def test_api_vectors_of_the_wrong_size_or_too_few_are_clear_errors(monkeypatch):
    from embeddings_server import DIM, EmbeddingsServer

    from m3tune.evaluation.api import ApiEncoder
    from m3tune.generation.llm import LLMError

    monkeypatch.setenv("EVAL_TEST_API_KEY", "test-key")
    with EmbeddingsServer(["ok", "wide"]) as server:
        encoder = ApiEncoder("hash-64", base_url=server.url, api_key_env="EVAL_TEST_API_KEY", batch_size=2)
        with pytest.raises(LLMError, match=rf"vectors of \[{DIM + 1}\] dimensions, expected {DIM}"):
            encoder.encode(["a", "b", "c", "d"])  # the second batch comes back one wider than the first
    with EmbeddingsServer(["short"] * 3) as server:
        encoder = ApiEncoder("hash-64", base_url=server.url, api_key_env="EVAL_TEST_API_KEY", max_retries=2,
                             backoff=0.01)
        with pytest.raises(LLMError, match="after 2 retries \\(bad_response: 1 vectors for 2 inputs\\)"):
            encoder.encode(["a", "b"])


def test_api_roles_go_as_input_type_and_marks_are_stripped_when_asked(monkeypatch):
    from embeddings_server import EmbeddingsServer

    from m3tune.evaluation.api import ApiEncoder

    monkeypatch.setenv("EVAL_TEST_API_KEY", "test-key")
    with EmbeddingsServer() as server:
        plain = ApiEncoder("hash-64", base_url=server.url, api_key_env="EVAL_TEST_API_KEY")
        roles = ApiEncoder("hash-64", base_url=server.url, api_key_env="EVAL_TEST_API_KEY", input_type=True,
                           strip_marks=True)
        roles.encode(["بِسْمِ اللَّهِ"], queries=True)
        roles.encode(["بِسْمِ اللَّهِ"])
        plain.encode(["بِسْمِ اللَّهِ"], queries=True)
    sent = [(r["input_type"], r["inputs"]) for r in server.requests]
    assert sent == [("query", ["بسم الله"]), ("passage", ["بسم الله"]), (None, ["بِسْمِ اللَّهِ"])]
    assert plain.fingerprint != roles.fingerprint  # different vectors, different cache


def test_cli_evaluate_writes_report_and_output_json(small_corpus_file, tmp_path):
    from typer.testing import CliRunner

    from m3tune.cli import app

    path, passages = small_corpus_file
    out_json = tmp_path / "results.json"
    args = ["evaluate", "--corpus", str(path), "--model", "bm25", "--model", "tiny=local:tiny-xlmr",
            "--dims", "16,8", "--output-dir", str(tmp_path / "out"), "--output-json", str(out_json),
            "--target-recall10", "0.5", "--target-mrr", "0.3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads(out_json.read_text(encoding="utf-8"))
    assert results == json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert results["targets"] == {"recall@10": 0.5, "mrr@10": 0.3}
    assert results["corpus"]["passages"] == len(passages)
    assert [m["name"] for m in results["models"]] == ["bm25", "tiny"]
    assert "report:" in result.output and (tmp_path / "out" / "report.md").is_file()
    bad = CliRunner().invoke(app, ["evaluate", "--corpus", str(path)])
    assert bad.exit_code != 0 and "--compare-all" in bad.output


def test_bilingual_scores_each_passage_by_the_better_of_its_text_and_its_translation(tmp_path):
    """Equal inputs: the dense model reads the translation BM25 reads for English queries; a passage appears
    once, with the better of its two scores, and a passage without a translation keeps its one vector."""
    import numpy as np

    from m3tune.encoder.model import load_encoder
    from m3tune.evaluation.models import dense_rank
    from m3tune.records import GoldQuery, Passage

    encoder = load_encoder("local:tiny-xlmr", max_length=64, batch_size=8)
    passages = [Passage(id=f"quran:1:{i}", source="quran", collection="quran", text=t, text_plain=t, meta={},
                        translation_en=e)
                for i, (t, e) in enumerate([("الحمد لله رب العالمين", "All praise is due to Allah"),
                                            ("الرحمن الرحيم", "The Entirely Merciful"),
                                            ("مالك يوم الدين", None)], start=1)]
    queries = [GoldQuery(id="q", query="praise be to God", relevant_ids=["quran:1:1"], category="cross_lingual",
                         language="en", source="quran", difficulty="easy")]
    one = dense_rank(encoder, queries, passages, k=3, dims=(), cache_uri=None).runs[None]["q"]
    two = dense_rank(encoder, queries, passages, k=3, dims=(), cache_uri=None, kind="bilingual").runs[None]["q"]
    assert sorted(one) == sorted(two) == [p.id for p in passages]  # each passage once
    q = encoder.encode(["praise be to God"], queries=True)[0]
    for p in passages:
        own = float(np.dot(q, encoder.encode([p.text], queries=False)[0]))
        best = max(own, float(np.dot(q, encoder.encode([p.translation_en], queries=False)[0]))) \
            if p.translation_en else own
        assert one[p.id] == pytest.approx(own, abs=1e-5) and two[p.id] == pytest.approx(best, abs=1e-5)


def test_bilingual_body_adds_a_hadiths_body_and_each_passage_still_appears_once():
    """bilingual-body: a hadith with a body (the words after its first quotation mark, 8 or more) gets a third
    vector, the body alone; a hadith without one, and a verse, keep what bilingual gives them. K passages come
    back even when every passage has several vectors (the search reads deep enough)."""
    import numpy as np

    from m3tune.corpus.neardup import hadith_body
    from m3tune.encoder.model import load_encoder
    from m3tune.evaluation.models import dense_rank, parse_model
    from m3tune.records import GoldQuery, Passage

    assert parse_model("bilingual-body:run:train", "b").kind == "bilingual-body"
    assert parse_model("bilingual-body:", "b").target == "b"
    chain = "حدثنا عبد الله بن يوسف قال اخبرنا مالك عن نافع عن عبد الله بن عمر ان رسول الله قال "
    said = "انما الاعمال بالنيات وانما لكل امرئ ما نوى فمن كانت هجرته الى دنياه يصيبها"
    encoder = load_encoder("local:tiny-xlmr", max_length=64, batch_size=8)
    passages = [Passage(id="quran:1:1", source="quran", collection="quran", text="الحمد لله رب العالمين",
                        text_plain="الحمد لله رب العالمين", meta={}, translation_en="All praise is due to Allah"),
                Passage(id="bukhari:1", source="hadith", collection="bukhari", text=chain + '"' + said + '"',
                        text_plain=chain + said, meta={}),
                Passage(id="bukhari:2", source="hadith", collection="bukhari", text=chain + '"قصير"',
                        text_plain=chain + "قصير", meta={})]
    assert hadith_body(passages[1]) == said + '"' and hadith_body(passages[2]) is None
    assert hadith_body(passages[0]) is None
    queries = [GoldQuery(id="q", query="الاعمال بالنيات", relevant_ids=["bukhari:1"], category="paraphrase",
                         language="ar", source="hadith", difficulty="easy")]
    two = dense_rank(encoder, queries, passages, k=3, dims=(), cache_uri=None, kind="bilingual").runs[None]["q"]
    three = dense_rank(encoder, queries, passages, k=3, dims=(), cache_uri=None,
                       kind="bilingual-body").runs[None]["q"]
    assert sorted(three) == sorted(p.id for p in passages)  # each passage once, all three within k=3
    q = encoder.encode(["الاعمال بالنيات"], queries=True)[0]
    body = float(np.dot(q, encoder.encode([said + '"'], queries=False)[0]))
    assert three["bukhari:1"] == pytest.approx(max(two["bukhari:1"], body), abs=1e-5)
    assert three["bukhari:2"] == pytest.approx(two["bukhari:2"], abs=1e-6)
    assert three["quran:1:1"] == pytest.approx(two["quran:1:1"], abs=1e-6)


def test_evaluate_reads_the_index_steps_vectors_from_a_shared_cache_byte_for_byte(tmp_path, monkeypatch):
    """make quality encodes the corpus with the base model once: index writes its vectors into the embeddings
    cache that evaluate reads (the same encoder, so the same fingerprint), evaluate's base row then encodes
    the queries only, and its ranking is the one a fresh encoding gives."""
    import numpy as np

    from m3tune.corpus.ingest import IngestConfig
    from m3tune.corpus.passages import read_passages
    from m3tune.encoder.model import Encoder
    from m3tune.evaluation.models import EncodeOptions, load_dense, parse_model, rank_model
    from m3tune.executor import run_step
    from m3tune.index.step import IndexConfig
    from m3tune.records import GoldQuery
    from m3tune.runroot import open_root

    root = open_root(str(tmp_path / "run"))
    run_step(root, "ingest", IngestConfig(sources=["quran"], limit=40))
    cache = str(tmp_path / "cache")
    run_step(root, "index", IndexConfig(encoder={"model": "local:tiny-xlmr", "max_length": 64, "batch_size": 8},
                                        backend="exact", embeddings_cache=cache))
    passages = read_passages(root)
    queries = [GoldQuery(id="q", query="الحمد لله", relevant_ids=[passages[1].id], category="exact", language="ar",
                         source="quran", difficulty="easy")]
    spec = parse_model("base", "local:tiny-xlmr")
    fingerprint = load_dense(spec, None, EncodeOptions(max_length=64, batch_size=8)).fingerprint
    encoded: list[int] = []
    original = Encoder.encode

    def counting(self, texts, **kw):
        encoded.append(len(texts))
        return original(self, texts, **kw)

    monkeypatch.setattr(Encoder, "encode", counting)
    shared = rank_model(spec, queries, passages, k=10, dims=(), options=EncodeOptions(
        max_length=64, batch_size=8, embeddings_cache=cache))
    assert encoded == [1]  # the query alone: every passage vector came from index's
    fresh = rank_model(spec, queries, passages, k=10, dims=(), options=EncodeOptions(max_length=64, batch_size=8))
    assert encoded[1:] == [len(passages), 1]
    assert shared.runs[None] == fresh.runs[None]  # byte for byte: the same scores, not merely close ones
    from m3tune.encoder.cache import EmbeddingCache, text_key
    from m3tune.index.step import cache_store

    stored = EmbeddingCache(cache_store(cache), fingerprint).vectors
    assert np.array_equal(np.load(tmp_path / "run" / "index" / "vectors.npy"),
                          np.stack([stored[text_key("d:" + p.text)] for p in passages]))
