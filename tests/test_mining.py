"""Encoder, index backends, and negative mining on the real corpus with the tiny local model."""

import hashlib
import json
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m3tune.arabic import tokens
from m3tune.encoder.cache import EmbeddingCache
from m3tune.encoder.model import Encoder
from m3tune.encoder.tiny import TINY, build_tiny
from m3tune.errors import UserError
from m3tune.index.search import ExactIndex, QdrantIndex
from m3tune.jsonl import read_records
from m3tune.mining.filters import FalseNegativeFilter, jaccard, pick_mix
from m3tune.records import Example, Passage, Query
from m3tune.storage import LocalStore


def unit_vectors(n, dim, seed):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_exact_and_qdrant_return_the_same_top_200(tmp_path):
    vectors, queries = unit_vectors(3000, 32, 0), unit_vectors(40, 32, 1)
    ids = [f"hadith:{i}" for i in range(3000)]
    exact = ExactIndex(vectors, ids, chunk=7).search(queries, 200)
    qdrant = QdrantIndex("same", path=str(tmp_path / "q"))
    qdrant.build(vectors, ids, ["hadith"] * 3000)
    try:
        assert qdrant.count() == 3000
        approx = qdrant.search(queries, 200)
    finally:
        qdrant.close()
    for e, q in zip(exact, approx):
        assert [pid for _, pid in e] == [pid for _, pid in q]  # random vectors: no ties
        assert max(abs(a - b) for (a, _), (b, _) in zip(e, q)) < 1e-5
        assert [s for s, _ in e] == sorted((s for s, _ in e), reverse=True)


def test_qdrant_edge_exact_and_hnsw_against_the_exact_index(tmp_path):
    """Edge's exact search returns the exact backend's top 200; its HNSW graph, at the index step's defaults,
    finds >= 0.99 of it; a rebuild replaces the shard whole."""
    from m3tune.index.search import EdgeIndex
    from m3tune.index.step import IndexConfig

    vectors, queries = unit_vectors(3000, 32, 0), unit_vectors(40, 32, 1)
    ids = [f"hadith:{i}" for i in range(3000)]
    exact = ExactIndex(vectors, ids).search(queries, 200)
    edge = EdgeIndex(str(tmp_path / "edge"))
    with pytest.raises(UserError, match="no Qdrant Edge shard at .*run the index step"):
        edge.search(queries, 200, ids, exact=True, ef=200)
    assert edge.build(vectors, ids, graph=False, m=16, ef_construct=100)["graph"] is None
    same = edge.search(queries, 200, ids, exact=True, ef=200)
    row = {pid: i for i, pid in enumerate(ids)}
    for query, e, q in zip(queries, exact, same):
        # the same ranking, up to two passages within float rounding of each other (Rust SIMD vs BLAS sums)
        assert len(q) == 200 and len({pid for _, pid in q}) == 200
        assert max(abs(a - b) for (a, _), (b, _) in zip(e, q)) < 1e-5
        assert all(abs(float(vectors[row[pid]] @ query) - s) < 1e-5 for s, pid in q)
        assert sum(a != b for (_, a), (_, b) in zip(e, q)) <= 4
    with pytest.raises(UserError, match="has no HNSW graph"):
        edge.search(queries, 200, ids, exact=False, ef=200)
    with pytest.raises(UserError, match="holds 3,000 32-d vectors; the index has 3,000 rows and the queries 8 dims"):
        edge.search(unit_vectors(2, 8, 0), 5, ids, exact=True, ef=5)

    d = {name: field.default for name, field in IndexConfig.model_fields.items()}
    # 3,000 32-d vectors are under Qdrant's 10 MB full-scan threshold: lowered, so the graph is built and searched
    built = edge.build(vectors, ids, graph=True, m=d["hnsw_m"], ef_construct=d["hnsw_ef_construct"], full_scan_kb=1)
    assert built["indexed"] == 3000
    assert edge.matches(vectors, ids, graph=True, m=d["hnsw_m"], ef_construct=d["hnsw_ef_construct"])
    assert not edge.matches(vectors, ids, graph=False, m=d["hnsw_m"], ef_construct=d["hnsw_ef_construct"])
    # an ef far below the 3,000 points (the default, 2500, would visit nearly all of them): the recall is the
    # graph's, not an exhaustive scan's
    approx = edge.search(queries, 200, ids, exact=False, ef=400)
    recall = np.mean([len({p for _, p in a} & {p for _, p in e}) / 200 for a, e in zip(approx, exact)])
    assert recall >= 0.99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edge"]  # no build folder left beside it


def test_twin_passages_tie_the_same_way_in_every_build_and_backend(tmp_path):
    """Passages repeated word for word have one vector, so equal scores: the engine returns them in an order
    that changed from build to build (an S3 run's negatives differed from a local run's). Both backends break
    ties by row, including a tie that runs past the top K."""
    from m3tune.index.search import EdgeIndex

    vectors = unit_vectors(3000, 32, 0)
    vectors[1000:1040] = vectors[5]  # forty twins of row 5: a tie wider than the 16 extra asked for
    ids = [f"hadith:{i}" for i in range(3000)]
    query = vectors[[5]] + 0.01
    expected = ["hadith:5"] + [f"hadith:{i}" for i in range(1000, 1029)]
    assert [pid for _, pid in ExactIndex(vectors, ids).search(query, 30)[0]] == expected
    for build in range(3):
        edge = EdgeIndex(str(tmp_path / f"edge{build}"))
        edge.build(vectors, ids, graph=False, m=16, ef_construct=100)
        assert [pid for _, pid in edge.search(query, 30, ids, exact=True, ef=30)[0]] == expected


def test_a_killed_edge_build_is_never_taken_for_a_shard(tmp_path):
    """A build killed before its rename leaves only NAME.tmp-PID, never NAME: the next build (or mining) sees no
    shard, builds one, and clears what the dead process left."""
    import subprocess
    import sys

    from m3tune.index.search import EdgeIndex

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f"edge.tmp-{int(dead.stdout)}"
    (leftover / "shard").mkdir(parents=True)
    (leftover / "shard" / "half-written").write_bytes(b"x")
    edge = EdgeIndex(str(tmp_path / "edge"))
    assert edge.built() is None and edge.count() == 0
    vectors, ids = unit_vectors(50, 8, 0), [f"p{i}" for i in range(50)]
    edge.build(vectors, ids, graph=False, m=16, ef_construct=100)
    assert edge.count() == 50 and not leftover.exists()
    (tmp_path / "edge" / EdgeIndex.MARKER).write_text("{not json")  # a damaged marker: rebuilt, not trusted
    assert edge.built() is None


def test_a_qdrant_server_that_refuses_is_a_clear_error():
    index = QdrantIndex("c", url="http://127.0.0.1:9", timeout=2)
    with pytest.raises(UserError, match="Qdrant collection_exists on collection 'c' at http://127.0.0.1:9 failed"):
        index.search(unit_vectors(1, 8, 0), 5)


def test_tiny_model_is_built_the_same_everywhere(tmp_path):
    a, b = build_tiny(tmp_path / "a"), build_tiny(tmp_path / "b")
    digest = [hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest() for p in (a, b)]
    assert digest[0] == digest[1]
    config = json.loads((a / "config.json").read_text())
    assert config["vocab_size"] == 250002 and config["model_type"] == "xlm-roberta"


def test_encoder_keeps_order_normalises_and_caches(tmp_path):
    encoder = Encoder(TINY, batch_size=2)
    texts = ["آيات عن الصبر", "a much longer English text about patience and prayer", "الصلاة", "x"]
    together = encoder.encode(texts)
    alone = np.stack([encoder.encode([t])[0] for t in texts])
    assert np.allclose(together, alone, atol=1e-5)
    assert np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)
    calls = []
    real = encoder.encode
    encoder.encode = lambda batch, **kw: calls.append(len(batch)) or real(batch, **kw)
    cache = EmbeddingCache(LocalStore(tmp_path), encoder.fingerprint)
    first = cache.encode(encoder, texts)
    again = EmbeddingCache(LocalStore(tmp_path), encoder.fingerprint).encode(encoder, texts + ["new"])
    assert calls == [4, 1]  # the second run encoded only the new text
    assert np.allclose(first, again[:4])


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        Encoder(str(tmp_path / "nope"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-1, 1), st.integers(0, 30)), min_size=1, max_size=40),
       st.sets(st.integers(0, 30), min_size=1, max_size=5), st.floats(0.05, 1), st.floats(0.1, 1), st.floats(0.5, 1))
def test_kept_candidates_pass_every_rule(candidates, positives, min_pos, max_jaccard, threshold):
    """Property: whatever the scores and texts, no kept negative is a positive or breaks a rule."""
    words = [frozenset({f"w{i % 7}", f"w{i % 5}", f"w{i}"}) for i in range(31)]
    rules = FalseNegativeFilter(threshold=threshold, jaccard=max_jaccard, tokens=lambda pid: words[int(pid)])
    pos_ids = {str(p) for p in positives}
    pos_tokens = [words[p] for p in positives]
    kept = rules.keep([(s, str(i)) for s, i in candidates], pos_ids, pos_tokens, min_pos)
    for score, pid in kept:
        assert pid not in pos_ids
        assert score <= threshold * min_pos
        assert all(jaccard(words[int(pid)], p) < max_jaccard for p in pos_tokens)
    assert len(kept) + sum(rules.dropped.values()) == len(candidates)


def test_mix_takes_hard_from_the_top_and_semi_hard_from_the_middle():
    survivors = [(1 - i / 100, f"p{i}") for i in range(21)]
    hard, semi = pick_mix(survivors, hard=4, semi_hard=2)
    assert [p for _, p in hard] == ["p0", "p1", "p2", "p3"]
    assert [p for _, p in semi] == ["p11", "p12"]
    assert pick_mix(survivors[:3], hard=4, semi_hard=2) == (survivors[:3], [])


def test_mined_examples_on_the_real_corpus_never_use_a_positive_and_pass_both_filters(full_run):
    root, _ = full_run
    passages = {p.id: p for p in read_records(root.child("ingest"), "passages.jsonl", Passage)}
    queries = {q.id: q for step in ("generate-queries", "generate-conceptual", "generate-exact")
               if root.child(step).exists("queries.jsonl")
               for q in read_records(root.child(step), "queries.jsonl", Query)}
    from m3tune.corpus.neardup import body, read_groups

    near = read_groups(root)
    manifest = json.loads(root.child("mine-negatives").read_bytes("_manifest.json"))
    config, counts = manifest["config"], manifest["counts"]
    examples = list(read_records(root.child("mine-negatives"), "examples.jsonl", Example))
    rejects = [json.loads(x) for x in root.child("mine-negatives").read_bytes("rejects.jsonl").splitlines()]
    assert len(examples) == counts["examples"] == (len(queries) - counts["rejected_inconsistent"]
                                                   - counts.get("examples_dropped_too_few_negatives", 0)) > 0
    assert counts["consistency_exempt_conceptual"] == sum(q.type == "conceptual" for q in queries.values())
    assert len(rejects) == counts["rejected_inconsistent"] and {r["reason"] for r in rejects} == {"inconsistent"}
    assert not {e.query_id for e in examples} & {r["query_id"] for r in rejects}
    negatives = 0
    for ex in examples:
        q = queries[ex.query_id]
        forbidden = near.closure(q.positive_ids)  # twins, same bodies, quoted verses
        assert not forbidden & set(ex.neg_ids), ex.query_id  # thematic queries included
        assert ex.pos_ids == q.positive_ids  # every positive, never cut
        assert set(ex.related_ids or ()) == forbidden - set(q.positive_ids)
        assert len(ex.neg_kinds) == len(ex.neg_ids)
        assert len(set(ex.neg_ids)) == len(ex.neg_ids)
        min_pos = ex.model_extra["min_pos_score"]  # over all positives, thematic queries included
        assert min_pos <= min(ex.pos_scores) + 1e-6
        assert len(ex.neg_ids) >= config["min_negatives"]
        # the positive-aware rule's reference: the median of every positive's score, by default
        assert config["positive_reference"] == "median"
        reference = statistics.median(ex.pos_scores)
        pos_tokens = [frozenset(tokens(body(passages[p]))) for p in q.positive_ids]
        for nid, score in zip(ex.neg_ids, ex.neg_scores):
            negatives += 1
            assert score <= config["threshold"] * reference + 1e-6
            neg_tokens = frozenset(tokens(body(passages[nid])))
            assert all(jaccard(neg_tokens, p) < config["jaccard"] for p in pos_tokens)
        assert ex.pos == [passages[p].text for p in ex.pos_ids]
    assert negatives == counts["hard"] + counts["semi_hard"] + counts["random"] > 0
    assert set(counts["dropped"]) <= {"positive", "positive_aware", "jaccard"} and counts["dropped"]
    assert counts["candidates"] == (len(examples) + counts.get("examples_dropped_too_few_negatives", 0)) * (
        config["end_rank"] - config["start_rank"])


def test_unknown_positive_is_a_counted_reject(full_run, tmp_path):
    from m3tune.mining.mine import mine

    root, _ = full_run
    passages = list(read_records(root.child("ingest"), "passages.jsonl", Passage))
    gen = {"backend": "offline", "model": "m", "prompt_version": "v"}
    queries = [Query(id="ok", query="آيات عن الصبر", language="ar", type="conceptual", positive_ids=["quran:2:153"],
                     source="quran", generator=gen),
               Query(id="bad", query="الصبر", language="ar", type="question", positive_ids=["quran:999:1"],
                     source="quran", generator=gen)]
    examples, counts, rejects = mine(root, queries, passages, start_rank=10, end_rank=50, threshold=0.95,
                                     jaccard=0.6, hard=2, semi_hard=1, random=1, source="all", seed=1)
    assert [e.query_id for e in examples] == ["ok"]
    assert rejects == [{"query_id": "bad", "reason": "unknown_positive", "ids": ["quran:999:1"]}]
    assert counts["rejected_unknown_positive"] == 1


def test_a_paraphrase_people_wrote_is_not_dropped_for_sharing_few_words_with_its_verse(full_run):
    from m3tune.generation.offline import TAFSIR_GENERATOR
    from m3tune.mining.mine import mine

    root, _ = full_run
    passages = list(read_records(root.child("ingest"), "passages.jsonl", Passage))
    # al-Muyassar on 2:153 «استعينوا بالصبر والصلاة»: BM25 cannot find the verse from it, and a generator's
    # query of the same words is dropped as inconsistent; the scholar's sentence is kept, and counted
    clause = "يا أيها المؤمنون اطلبوا العون من الله في كل أموركم"
    queries = [Query(id=f"q-{gen['backend']}", query=clause, language="ar", type="question", positive_ids=["quran:2:153"],
                     source="quran", generator=gen)
               for gen in ({"backend": "offline", "model": "m", "prompt_version": "v"}, TAFSIR_GENERATOR.model_dump())]
    examples, counts, rejects = mine(root, queries, passages, start_rank=10, end_rank=50, threshold=0.95,
                                     jaccard=0.6, hard=2, semi_hard=1, random=1, source="all", seed=1,
                                     consistency_k=20, consistency_judge="bm25")
    assert [e.query_id for e in examples] == ["q-reference"]
    assert [r["query_id"] for r in rejects] == ["q-offline"]
    assert counts["consistency_exempt_reference"] == counts["rejected_inconsistent"] == 1


def test_filter_negatives_removes_false_negatives_and_never_touches_positives(local_root, tmp_path, full_run):
    from m3tune.executor import run_step
    from m3tune.index.step import EncoderSettings
    from m3tune.mining.filter_existing import FilterConfig

    root, _ = full_run
    by_id = {p.id: p for p in read_records(root.child("ingest"), "passages.jsonl", Passage)}
    pos = by_id["quran:2:153"].text
    near_copy = " ".join(pos.split()[:-1])  # the verse less its last word: not the same text, Jaccard 0.9
    rows = [
        {"query": "الصبر والصلاة", "pos": [pos], "neg": [near_copy, by_id["bukhari:1"].text, pos],
         "prompt": "kept as is"},
        {"query": "النية", "pos": [by_id["bukhari:1"].text], "neg": [by_id["bukhari:1"].text],
         "pos_ids": ["bukhari:1"], "neg_ids": ["bukhari:1"]},
    ]
    path = tmp_path / "old.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "{broken\n", encoding="utf-8")
    cfg = FilterConfig(input=str(path), encoder=EncoderSettings(model="local:tiny-xlmr"), threshold=10.0,
                       skip_invalid=True)
    manifest, _ = run_step(local_root, "filter-negatives", cfg)
    out = list(read_records(local_root.child("filter-negatives"), "examples.jsonl", Example))
    assert len(out) == 1 and out[0].pos == [pos] and out[0].model_extra == {"prompt": "kept as is"}
    assert out[0].neg == [by_id["bukhari:1"].text]  # the near copy (jaccard) and the positive itself are gone
    counts = manifest.counts
    assert counts["removed"] == {"jaccard": 1, "positive": 2} and counts["negatives_in"] == 4
    assert counts["examples_dropped_too_few_negatives"] == 1 and counts["rejected_lines"] == 1
    assert manifest.metrics["removed_share"] == 0.75
    # a strict threshold: every negative scoring above 0.95 x the positive goes too
    manifest, _ = run_step(local_root, "filter-negatives", cfg.model_copy(update={"threshold": 0.95, "min_negatives": 0}))
    kept = list(read_records(local_root.child("filter-negatives"), "examples.jsonl", Example))
    assert all(s <= 0.95 * min(e.pos_scores) + 1e-6 for e in kept for s in e.neg_scores)


def test_bm25_consistency_judge_finds_good_queries_and_not_vague_ones(full_run):
    from m3tune.mining.consistency import bm25_top_k

    root, _ = full_run
    passages = list(read_records(root.child("ingest"), "passages.jsonl", Passage))
    gen = {"backend": "offline", "model": "m", "prompt_version": "v"}

    def q(text, lang, pid):
        return Query(id=text, query=text, language=lang, type="question", positive_ids=[pid], source="quran",
                     generator=gen)

    good_ar = q("استعينوا بالصبر والصلاة", "ar", "quran:2:153")
    hadith_en = q("actions are judged by intentions", "en", "bukhari:1")  # no translation to judge against
    good_en = q("seek help through patience and prayer", "en", "quran:2:153")
    vague = q("ما هو الدين", "ar", "quran:2:153")
    unknown = q("zzzz qqqq", "en", "quran:2:153")
    top = bm25_top_k([good_ar, good_en, vague, unknown, hadith_en], passages, 20)
    assert "quran:2:153" in top[0] and "quran:2:153" in top[1]
    assert "quran:2:153" not in top[2]
    assert top[3] == []
    assert top[4] is None


@pytest.mark.slow
def test_mining_from_an_existing_collection_gives_the_same_examples(full_run, tmp_path):
    """A production collection (vectors already there, passage_id payloads, here two points per passage as
    chunked stores keep them) is searched as it is, never replaced."""
    from qdrant_client import QdrantClient, models

    from m3tune.executor import run_step
    from m3tune.index.step import EncoderSettings, IndexConfig, local_qdrant_path
    from m3tune.mining.mine import mine
    from m3tune.runroot import open_root

    root, _ = full_run
    folder = root.child("index")
    info = json.loads(folder.read_bytes("index.json"))
    vectors = np.load(folder.path / "vectors.npy")
    rows = [json.loads(x) for x in folder.read_bytes("ids.jsonl").splitlines()]
    client = QdrantClient(path=local_qdrant_path("prod-passages"))  # made by someone else: no m3tune marker
    client.create_collection("prod-passages", vectors_config=models.VectorParams(size=vectors.shape[1],
                                                                                 distance=models.Distance.COSINE))
    client.upload_collection("prod-passages", vectors=np.concatenate([vectors, vectors]), ids=list(range(2 * len(rows))),
                             payload=[{"passage_id": r["id"]} for r in rows] * 2, wait=True)
    client.close()

    other = open_root(str(tmp_path / "runs" / "prod"))
    for name in ("passages.jsonl", "groups.jsonl", "_manifest.json"):
        other.child("ingest").write_bytes(name, root.child("ingest").read_bytes(name))
    tiny = EncoderSettings(**{k: info[k] for k in EncoderSettings.model_fields})
    with pytest.raises(UserError, match="was not made by m3tune: refusing to replace it"):
        QdrantIndex("prod-passages", path=local_qdrant_path("prod-passages")).build(vectors, [r["id"] for r in rows],
                                                                                    [r["source"] for r in rows])
    wrong = EncoderSettings(**{**tiny.model_dump(), "pooling": "mean"})  # other vectors than the collection's
    with pytest.raises(UserError, match="is not this encoder's"):
        run_step(other, "index", IndexConfig(encoder=wrong, collection="prod-passages", existing=True))
    run_step(other, "index", IndexConfig(encoder=tiny, collection="prod-passages", existing=True))
    assert json.loads(other.child("index").read_bytes("index.json"))["existing"] is True

    passages = list(read_records(root.child("ingest"), "passages.jsonl", Passage))
    queries = list(read_records(root.child("generate-conceptual"), "queries.jsonl", Query))[:40]
    config = json.loads(root.child("mine-negatives").read_bytes("_manifest.json"))["config"]
    ours = mine(root, queries, passages, **config)[0]
    theirs = mine(other, queries, passages, **config)[0]
    assert [e.neg_ids for e in ours] == [e.neg_ids for e in theirs] and any(e.neg_ids for e in ours)
    assert all(len(set(e.neg_ids)) == len(e.neg_ids) for e in theirs)  # two points per passage, counted once


def test_mining_rebuilds_a_missing_edge_shard(full_run):
    """The embedded default is a Qdrant Edge shard in the local cache: on another machine (or after the cache is
    cleared) mine-negatives rebuilds it from the published vectors and finds the same negatives."""
    import shutil
    from pathlib import Path

    from m3tune.index.search import EdgeIndex
    from m3tune.index.step import local_edge_path
    from m3tune.mining.mine import mine

    root, _ = full_run
    info = json.loads(root.child("index").read_bytes("index.json"))
    path = Path(local_edge_path(info["collection"]))
    assert info["backend"] == "qdrant" and info["qdrant_url"] is None and info["qdrant_exact"] is True
    assert json.loads((path / EdgeIndex.MARKER).read_text())["rows"] == info["rows"]
    passages = list(read_records(root.child("ingest"), "passages.jsonl", Passage))
    queries = list(read_records(root.child("generate-conceptual"), "queries.jsonl", Query))[:40]
    config = json.loads(root.child("mine-negatives").read_bytes("_manifest.json"))["config"]
    before = mine(root, queries, passages, **config)[0]
    shutil.rmtree(path)
    after = mine(root, queries, passages, **config)[0]
    assert (path / EdgeIndex.MARKER).exists()
    assert [e.neg_ids for e in before] == [e.neg_ids for e in after] and any(e.neg_ids for e in after)


@pytest.mark.slow
def test_sharded_mining_merges_to_the_same_examples(full_run, tmp_path):
    """Three shards, each on its block of the queries, then merged: the same bytes as one run."""
    import os
    import subprocess
    import sys

    import shutil

    from m3tune.runroot import open_root

    shutil.copytree(full_run[0].path, tmp_path / "runs" / "copy")  # the shared run stays as it is
    root = open_root(str(tmp_path / "runs" / "copy"))
    folder = root.child("mine-negatives")
    whole = folder.read_bytes("examples.jsonl")
    manifest = json.loads(folder.read_bytes("_manifest.json"))
    base = [sys.executable, "-m", "m3tune.cli", "step", "mine-negatives", "--root", root.uri,
            "--consistency-judge", "bm25"]
    env = dict(os.environ)

    def shard(rank):
        done = subprocess.run(base + ["--rank", str(rank), "--world-size", "3"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr

    shard(0)
    shard(2)
    early = subprocess.run(base + ["--merge-shards", "3"], env=env, capture_output=True, text=True, timeout=120)
    assert early.returncode == 1 and "shard(s) 1 of 3 not finished" in early.stderr
    shard(1)
    merged = subprocess.run(base + ["--merge-shards", "3", "--force"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert merged.returncode == 0, merged.stderr
    assert folder.read_bytes("examples.jsonl") == whole
    after = json.loads(folder.read_bytes("_manifest.json"))
    assert after["counts"]["shards"] == 3 and after["inputs"] == manifest["inputs"]
    assert {k: v for k, v in after["counts"].items() if k != "shards"} == manifest["counts"]
    assert sorted(n for n in folder.list() if n.startswith("shards/")) == sorted(
        f"shards/{r:05d}-of-00003/{f}" for r in range(3) for f in ("_manifest.json", "examples.jsonl", "rejects.jsonl"))


def test_empty_corpus_is_a_clear_error(local_root):
    from m3tune.corpus.ingest import IngestConfig
    from m3tune.executor import run_step
    from m3tune.index.step import EncoderSettings, IndexConfig
    from m3tune.jsonl import RecordError

    run_step(local_root, "ingest", IngestConfig(sources=[]))  # no packaged corpus, no user file: 0 passages
    with pytest.raises(RecordError, match="passages.jsonl: file is empty"):
        run_step(local_root, "index", IndexConfig(encoder=EncoderSettings(model="local:tiny-xlmr"), backend="exact"))
    assert local_root.child("index").list() == []


def test_a_themes_weakest_positive_does_not_empty_its_negative_pool():
    """NV-Retriever's positive-aware rule has one positive; a theme has tens, the weakest ranked thousands deep.
    Compared with that one, every candidate looks like an answer; compared with the median, only those that
    score like the theme's typical answer do."""
    from m3tune.mining.filters import FalseNegativeFilter, reference_score

    positive_scores = [0.90, 0.86, 0.84, 0.80, 0.31]  # the last: a verse of the theme the encoder barely finds
    candidates = [(0.83, "near-answer"), (0.70, "hard"), (0.55, "semi"), (0.35, "random")]

    def kept(how: str) -> list[str]:
        rules = FalseNegativeFilter(threshold=0.95, jaccard=0.6, tokens=lambda _: frozenset())
        return [pid for _, pid in rules.keep(candidates, set(), [], reference_score(positive_scores, how))]

    assert kept("lowest") == []
    assert kept("median") == ["hard", "semi", "random"]  # 0.95 x 0.84 = 0.798: the near-answer goes
    assert kept("highest") == ["near-answer", "hard", "semi", "random"]  # 0.95 x 0.90 = 0.855
    assert reference_score([0.5], "median") == reference_score([0.5], "lowest") == 0.5  # one positive: as before
    with pytest.raises(ValueError, match="positive_reference must be one of"):
        reference_score([0.5], "mean")


def test_an_index_folder_that_does_not_hold_together_is_named_before_mining(tmp_path):
    import io
    import json

    from m3tune.errors import UserError
    from m3tune.index.step import read_index
    from m3tune.runroot import open_root

    folder = open_root(str(tmp_path / "run")).child("index")
    info = {"model": "local:tiny-xlmr", "pooling": "cls", "query_prompt": None, "passage_prompt": None,
            "max_length": 64, "batch_size": 8, "dtype": "int8", "strip_marks": True, "fingerprint": "f" * 16,
            "dim": 4, "rows": 2, "backend": "exact", "collection": "c", "qdrant_url": None}

    def publish(info=info, vectors=np.eye(2, 4, dtype=np.float32), ids=b'{"id": "a"}\n{"id": "b"}\n'):
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        folder.write_bytes("index.json", json.dumps(info).encode())
        folder.write_bytes("vectors.npy", buffer.getvalue())
        folder.write_bytes("ids.jsonl", ids)

    publish()
    got, vectors, ids = read_index(folder)
    assert (got["dtype"], got["qdrant_url"], ids, vectors.shape) == ("int8", None, ["a", "b"], (2, 4))
    publish({**info, "dtype": "int4"})
    with pytest.raises(UserError, match=r"index/index.json: field dtype: .*rerun the index step"):
        read_index(folder)
    publish({k: v for k, v in info.items() if k != "fingerprint"})
    with pytest.raises(UserError, match=r"index/index.json: field fingerprint: Field required"):
        read_index(folder)
    publish(vectors=np.eye(3, 4, dtype=np.float32))
    with pytest.raises(UserError, match=r"index/vectors.npy: float32 array of shape \(3, 4\), index.json says"):
        read_index(folder)
    publish(vectors=np.eye(2, 4, dtype=np.float64))
    with pytest.raises(UserError, match=r"index/vectors.npy: float64 array of shape \(2, 4\), index.json says"):
        read_index(folder)
    buffer = io.BytesIO()
    np.save(buffer, np.eye(2, 4, dtype=np.float32))
    folder.write_bytes("vectors.npy", buffer.getvalue()[:-5])
    with pytest.raises(UserError, match=r"index/vectors.npy: ends after 27 of its 32 data bytes \(rerun the index"):
        read_index(folder)
    folder.write_bytes("vectors.npy", buffer.getvalue() + b"x")
    with pytest.raises(UserError, match=r"index/vectors.npy: holds more than the 32 data bytes its header gives"):
        read_index(folder)
    folder.write_bytes("vectors.npy", b'{"id": "a"}')
    with pytest.raises(UserError, match=r"index/vectors.npy: not a numpy array file"):
        read_index(folder)
    publish(ids=b'{"id": "a"}\n{"passage": "b"}\n')
    with pytest.raises(UserError, match=r"index/ids.jsonl:2: field 'id': missing required field \(rerun the index"):
        read_index(folder)
    publish(ids=b'{"id": "a"}\n')
    with pytest.raises(UserError, match=r"index/ids.jsonl: 1 ids, index.json says 2 rows"):
        read_index(folder)
