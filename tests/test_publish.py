"""The publish step, rollback and `m3tune published`, against Qdrant's real engine: local mode, and a server
path through a loopback REST server (tests/qdrant_server.py) that can refuse requests (503) or hold one.

The run is small and real: 588 Quran verses (every gold passage of the Quran-only gold queries and every
40th verse), 16 training steps of the tiny XLM-R, evaluate's base and run:train on those 204 gold queries
(128 held out). Production is the search application's own collection of the base model's vectors, with
payloads of its own, behind the alias `quran-hadith`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from m3tune.errors import UserError
from m3tune.runroot import open_root

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qdrant_server import QdrantRestServer  # noqa: E402

ALIAS = "quran-hadith"
APP = "app-v1"  # the application's collection: m3tune did not make it
LENIENT = {"gate_min_delta": -1.0, "gate_max_p": 1.0}  # the tiny model does not beat base: let the gate pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(root, passages, base vectors, evaluate's config): a finished ingest, train and evaluate."""
    from m3tune.corpus import heldout
    from m3tune.corpus.ingest import IngestConfig
    from m3tune.corpus.passages import read_passages
    from m3tune.evaluation.gold import PACKAGED
    from m3tune.evaluation.models import load_dense, parse_model
    from m3tune.evaluation.step import EvaluateConfig, options_of
    from m3tune.executor import run_step
    from m3tune.manifest import Manifest, OutputInfo, write_manifest
    from m3tune.bench.train import quran_examples
    from m3tune.training.config import TrainConfig

    base = tmp_path_factory.mktemp("publish")
    scratch = open_root(str(base / "runs" / "quran"))
    run_step(scratch, "ingest", IngestConfig(sources=["quran"]))
    quran = read_passages(scratch)
    ids = {p.id for p in quran}
    gold = [json.loads(line) for line in PACKAGED.read_text(encoding="utf-8").splitlines()]
    gold = [g for g in gold if all(r in ids for r in g["relevant_ids"])]
    wanted = {r for g in gold for r in g["relevant_ids"]}
    (base / "gold.jsonl").write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in gold), encoding="utf-8")
    (base / "passages.jsonl").write_text("".join(p.model_dump_json() + "\n" for i, p in enumerate(quran)
                                                 if p.id in wanted or i % 40 == 0), encoding="utf-8")

    root = open_root(str(base / "runs" / "run-1"))
    run_step(root, "ingest", IngestConfig(sources=[], user_files=[str(base / "passages.jsonl")]))
    held = heldout.load("packaged")
    rows = quran_examples([p for p in quran if p.id not in held], random.Random(7), 160)
    data = {"train.jsonl": rows[:128], "validation.jsonl": rows[128:]}
    blobs = {n: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part).encode() for n, part in data.items()}
    outs = {n: root.child("combine").write_bytes(n, b) for n, b in blobs.items()}
    write_manifest(root.child("combine"), Manifest(  # combine's outputs, as that step would publish them
        step="combine", m3tune_version="test", config={}, config_digest="sha256:0", inputs={},
        outputs={k: OutputInfo(sha256=v.sha256, bytes=v.bytes, rows=len(data[k])) for k, v in outs.items()},
        started_at="2026-01-01T00:00:00", finished_at="2026-01-01T00:00:01", seconds=1.0))
    run_step(root, "train", TrainConfig(
        model="local:tiny-xlmr", dims=[32, 16, 8], batch_size=16, gradient_accumulation=1, temperature=0.05,
        learning_rate=1e-2, warmup_ratio=0.05, query_max_length=32, passage_max_length=64, negatives=3,
        patience=None, validation_corpus="validation", epochs=2, eval_every=100, workdir=str(base / "work")))
    ev = EvaluateConfig(test_set=str(base / "gold.jsonl"), base_model="local:tiny-xlmr", models=["base", "run:train"],
                        dims=[32, 16], k=100, max_length=128, batch_size=64, significance_resamples=200)
    run_step(root, "evaluate", ev)
    passages = read_passages(root)
    encoder = load_dense(parse_model("base", ev.base_model), root, options_of(ev.model_dump()))
    return root, passages, encoder.encode([p.text for p in passages]), ev


def _app_collection(client, name: str, vectors: np.ndarray, passages, *, alias: str | None = ALIAS) -> None:
    """The search application's collection: its own point ids and payload fields; cosine distance."""
    from qdrant_client import models

    client.create_collection(name, vectors_config=models.VectorParams(size=int(vectors.shape[1]),
                                                                      distance=models.Distance.COSINE))
    client.upsert(name, wait=True, points=models.Batch(
        ids=[1000 + i for i in range(len(passages))], vectors=vectors.tolist(),
        payloads=[{"passage_id": p.id, "app_title": f"title {i}"} for i, p in enumerate(passages)]))
    if alias:
        client.update_collection_aliases(change_aliases_operations=[models.CreateAliasOperation(
            create_alias=models.CreateAlias(collection_name=name, alias_name=alias))])


def _config(**kw):
    from m3tune.publish.step import PublishConfig

    return PublishConfig(**{"alias": ALIAS, "batch_size": 64, "parallel": 4, "retry_backoff": 0.01, **kw})


def _state(client) -> tuple:
    """What the application sees: aliases, collections, their point counts."""
    names = sorted(c.name for c in client.get_collections().collections)
    return ({a.alias_name: a.collection_name for a in client.get_aliases().aliases}, names,
            {n: client.count(n, exact=True).count for n in names})


def _top(client, collection: str, query: np.ndarray, k: int = 5) -> tuple[str, ...]:
    hits = client.query_points(collection, query=query.tolist(), limit=k, with_payload=["passage_id"]).points
    return tuple(h.payload["passage_id"] for h in hits)


def _points(client, collection: str) -> dict[int, tuple]:
    points, _ = client.scroll(collection, limit=100_000, with_payload=True, with_vectors=True)
    return {int(p.id): (json.dumps(p.payload, sort_keys=True), np.round(np.asarray(p.vector), 6).tolist())
            for p in points}


def _record(client, collection: str) -> dict:
    return client.get_collection(collection).config.metadata["m3tune"]


# ------------------------------------------------------------------------------------------- server path


def test_reader_sees_old_then_new_answers_never_an_error_while_uploads_get_503(run):
    from qdrant_client import QdrantClient

    from m3tune.executor import run_step

    root, passages, base_vectors, _ = run
    query = base_vectors[7]  # the application's query vector: the same before and after
    with QdrantRestServer() as server:
        client = QdrantClient(url=server.url, check_compatibility=False)
        _app_collection(client, APP, base_vectors, passages)
        old = _top(client, APP, query)
        upserts = []

        def refuse_some(method: str, path: str) -> int | None:
            if method == "PUT" and path.endswith("/points"):
                upserts.append(path)
                return 503 if len(upserts) in (2, 5) else None  # two uploads refused once each
            return None

        server.hook = refuse_some
        answers, errors, stop = [], [], threading.Event()

        def reader():
            own = QdrantClient(url=server.url, check_compatibility=False)
            while not stop.is_set():
                try:
                    answers.append(_top(own, ALIAS, query))
                except Exception as e:  # noqa: BLE001 - any failure of a search is what the test looks for
                    errors.append(repr(e))
            own.close()

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        try:
            while not answers and not errors:
                time.sleep(0.01)
            manifest, ran = run_step(root, "publish", _config(qdrant_url=server.url, **LENIENT))
            n = len(answers)
            while len(answers) < n + 3 and not errors:
                time.sleep(0.01)
        finally:
            stop.set()
            thread.join(30)

        published = json.loads(root.child("publish").read_bytes("publish.json"))
        target = published["collection"]
        new = _top(client, target, query)
        assert ran and not errors
        assert old != new, "the two models must rank differently for the switch to show"
        assert all(a for a in answers), "an empty answer"
        assert set(answers) <= {old, new}
        switch = answers.index(new)
        assert switch > 0 and all(a == old for a in answers[:switch]) and all(a == new for a in answers[switch:])
        # refused uploads were retried, and the collection is whole, with the application's payloads
        assert [s for m, p, s in server.requests if m == "PUT" and p.endswith("/points")].count(503) == 2
        assert published["upload"]["retries"] == 2
        assert client.count(target, exact=True).count == len(passages)
        point = client.retrieve(target, ids=[3], with_payload=True)[0]
        assert point.payload == {"passage_id": passages[3].id, "app_title": "title 3"}
        assert {a.alias_name: a.collection_name for a in client.get_aliases().aliases} == {ALIAS: target}
        record = _record(client, target)
        assert record["previous"] == APP and record["run_id"] == "run-1" and record["state"] == "ready"
        assert record["model"]["fingerprint"] == manifest.counts["published"]["model_fingerprint"]
        assert record["gate"]["passed"] and not record["forced"]
        assert manifest.counts["published"]["collection"] == target
        client.close()


def test_sigkill_mid_upload_then_rerun_equals_an_unbroken_run(run, tmp_path):
    from qdrant_client import QdrantClient

    from m3tune.executor import run_step

    root, passages, base_vectors, _ = run
    options = ["--alias", ALIAS, "--batch-size", "100", "--parallel", "1", "--gate-min-delta", "-1",
               "--gate-max-p", "1"]
    config = _config(batch_size=100, parallel=1, **LENIENT)
    with QdrantRestServer() as unbroken, QdrantRestServer() as killed:
        for server in (unbroken, killed):
            with closing(QdrantClient(url=server.url, check_compatibility=False)) as client:
                _app_collection(client, APP, base_vectors, passages)
        run_step(root, "publish", config.model_copy(update={"qdrant_url": unbroken.url}))

        held, release, upserts = threading.Event(), threading.Event(), []

        def hold_third(method: str, path: str) -> int | None:
            if method == "PUT" and path.endswith("/points"):
                upserts.append(path)
                if len(upserts) == 3:  # the third batch waits here until its sender is killed
                    held.set()
                    release.wait(60)
                    return 503
            return None

        killed.hook = hold_third
        proc = subprocess.Popen([sys.executable, "-m", "m3tune.cli", "step", "publish", "--root", root.uri,
                                 "--qdrant-url", killed.url, *options], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=os.environ.copy())
        try:
            assert held.wait(120), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no upload"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            release.set()
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == -signal.SIGKILL
        killed.hook = None
        with closing(QdrantClient(url=killed.url, check_compatibility=False)) as client:
            aliases, names, counts = _state(client)
            target = next(n for n in names if n != APP)
            assert aliases == {ALIAS: APP}, "a killed publish moved the alias"
            assert counts[target] == 200 and _record(client, target)["state"] == "uploading"

        manifest, ran = run_step(root, "publish", config.model_copy(update={"qdrant_url": killed.url}))
        assert ran and manifest.counts["already_there"] == 200 and manifest.counts["uploaded"] == len(passages) - 200
        with closing(QdrantClient(url=killed.url, check_compatibility=False)) as a, \
                closing(QdrantClient(url=unbroken.url, check_compatibility=False)) as b:
            assert _state(a) == _state(b)
            assert _points(a, target) == _points(b, target)
            ra, rb = _record(a, target), _record(b, target)
            for r in (ra, rb):
                del r["created_at"], r["published_at"]
            assert ra == rb


# ------------------------------------------------------------------------------------------- local mode


def test_rollback_restores_old_answers_and_published_says_why(run, tmp_path):
    from qdrant_client import QdrantClient

    from m3tune.cli import app
    from m3tune.executor import run_step

    root, passages, base_vectors, _ = run
    path = str(tmp_path / "qdrant")
    with closing(QdrantClient(path=path)) as client:
        _app_collection(client, APP, base_vectors, passages)
    with closing(QdrantClient(path=path)) as client:  # as read back from disk (near-ties of the tiny model)
        old = _top(client, ALIAS, base_vectors[3])
    run_step(root, "publish", _config(qdrant_path=path, **LENIENT))
    with closing(QdrantClient(path=path)) as client:
        target = client.get_aliases().aliases[0].collection_name
        new = _top(client, ALIAS, base_vectors[3])
    assert target != APP and new != old

    cli = CliRunner()
    listed = cli.invoke(app, ["published", "--qdrant-path", path, "--json"])
    assert listed.exit_code == 0, listed.output
    row = json.loads(listed.output)[0]
    assert row["alias"] == ALIAS and row["collection"] == target and row["made_by_m3tune"]
    assert row["run_id"] == "run-1" and row["previous"] == APP and row["model"]["name"] == "run:train"
    assert row["gate"]["metric"] == "ndcg@10" and row["points"] == len(passages)

    back = cli.invoke(app, ["rollback", "--alias", ALIAS, "--qdrant-path", path])
    assert back.exit_code == 0, back.output
    with closing(QdrantClient(path=path)) as client:
        assert _top(client, ALIAS, base_vectors[3]) == old
        assert target in [c.name for c in client.get_collections().collections]  # kept: it can come back
    again = cli.invoke(app, ["rollback", "--alias", ALIAS, "--qdrant-path", path])
    assert again.exit_code == 1 and "was not published by m3tune" in again.output


def test_keep_deletes_only_older_collections_m3tune_published_for_the_alias(run, tmp_path):
    from qdrant_client import QdrantClient, models

    from m3tune.executor import run_step

    root, passages, base_vectors, _ = run
    path = str(tmp_path / "qdrant")
    with closing(QdrantClient(path=path)) as client:
        _app_collection(client, APP, base_vectors, passages)
        _app_collection(client, "someone-else", base_vectors[:10], passages[:10], alias=None)
        client.create_collection("index-made", vectors_config=models.VectorParams(size=32, distance=models.Distance.DOT),
                                 metadata={"created_by": "m3tune"})  # the index step's kind: no publish record
    config = _config(qdrant_path=path, **LENIENT)
    trained = run_step(root, "publish", config)[0].counts["published"]["collection"]
    based = run_step(root, "publish", config.model_copy(update={"model": "base"}))[0].counts["published"]
    assert based["previous"] == trained
    with closing(QdrantClient(path=path)) as client:
        assert {APP, "someone-else", "index-made", trained, based["collection"]} == \
            {c.name for c in client.get_collections().collections}
    again = run_step(root, "publish", config.model_copy(update={"keep": 0}))[0]
    assert again.counts["published"]["collection"] == trained and again.counts["uploaded"] == 0  # already whole
    assert again.counts["deleted"] == 1
    with closing(QdrantClient(path=path)) as client:
        assert {c.name for c in client.get_collections().collections} == {APP, "someone-else", "index-made", trained}
        assert _record(client, trained)["previous"] == based["collection"]


# ------------------------------------------------------------------------------------------- bad input


def _refused(root, config, path: str, match: str, error=UserError):
    """CONFIG's publish fails with an error matching MATCH, and production is exactly as it was."""
    from qdrant_client import QdrantClient

    from m3tune.executor import run_step

    with closing(QdrantClient(path=path)) as client:
        before = _state(client)
    with pytest.raises(error, match=match):
        run_step(root, "publish", config)
    with closing(QdrantClient(path=path)) as client:
        assert _state(client) == before


def test_bad_input_is_a_clear_error_and_production_does_not_change(run, tmp_path):
    from qdrant_client import QdrantClient, models

    from m3tune.evaluation.models import load_dense, parse_model
    from m3tune.evaluation.step import options_of
    from m3tune.manifest import read_manifest
    from m3tune.publish.gate import GateFailed

    root, passages, base_vectors, ev = run
    path = str(tmp_path / "qdrant")
    with closing(QdrantClient(path=path)) as client:
        _app_collection(client, APP, base_vectors, passages)
        _app_collection(client, "app-16", base_vectors[:, :16], passages, alias="small")
    # an alias whose collection holds vectors of another size
    _refused(root, _config(qdrant_path=path, alias="small", **LENIENT), path, r"of 16-d vectors; this publish serves 32-d")
    # a model whose dims differ: asked for more than it makes; a collection of its name holding another size
    _refused(root, _config(qdrant_path=path, dim=64, **LENIENT), path, "makes 32-d vectors; dim 64 is larger")
    fingerprint = load_dense(parse_model("run:train", ev.base_model), root, options_of(ev.model_dump())).fingerprint
    corpus = read_manifest(root.child("ingest")).outputs["passages.jsonl"].sha256
    planted = f"{ALIAS}-{fingerprint[:12]}-{corpus[:12]}-d32"
    with closing(QdrantClient(path=path)) as client:
        client.create_collection(planted, vectors_config=models.VectorParams(size=16, distance=models.Distance.DOT),
                                 metadata={"created_by": "m3tune", "m3tune": {"alias": ALIAS}})
    _refused(root, _config(qdrant_path=path, **LENIENT), path, f"{planted}' holds 16-d vectors")
    with closing(QdrantClient(path=path)) as client:
        client.delete_collection(planted)
    # a gate that fails: the tiny model does not beat base on the held-out queries
    _refused(root, _config(qdrant_path=path), path, r"gate: run:train's ndcg@10 on 128 held-out", GateFailed)
    # a missing evaluate result
    (Path(root.path) / "evaluate" / "_manifest.json").rename(Path(root.path) / "evaluate" / "_manifest.moved")
    try:
        _refused(root, _config(qdrant_path=path, **LENIENT), path, "evaluate")
    finally:
        (Path(root.path) / "evaluate" / "_manifest.moved").rename(Path(root.path) / "evaluate" / "_manifest.json")


def test_force_gate_publishes_a_failing_model_and_records_it(run, tmp_path):
    from qdrant_client import QdrantClient

    from m3tune.executor import run_step

    root, passages, base_vectors, _ = run
    path = str(tmp_path / "qdrant")
    with closing(QdrantClient(path=path)) as client:
        _app_collection(client, APP, base_vectors, passages)
    manifest, _ = run_step(root, "publish", _config(qdrant_path=path, force_gate=True))
    assert manifest.counts["published"]["forced"] is True
    with closing(QdrantClient(path=path)) as client:
        record = _record(client, client.get_aliases().aliases[0].collection_name)
    assert record["forced"] is True and record["gate"]["passed"] is False
    assert record["gate"]["vs"].startswith("base (evaluate's baseline model, serving app-v1)")


def test_argo_runs_publish_only_when_asked_and_only_its_pod_holds_the_qdrant_secret():
    from m3tune.deploy.argo import render_workflow_template

    spec = render_workflow_template()["spec"]
    tasks = {t["name"]: t for t in spec["templates"][0]["dag"]["tasks"]}
    assert tasks["publish"]["dependencies"] == ["evaluate"]
    assert tasks["publish"]["when"] == "{{workflow.parameters.publish}} == true"
    assert {"name": "publish", "value": "false"} == {k: v for k, v in next(
        p for p in spec["arguments"]["parameters"] if p["name"] == "publish").items() if k in ("name", "value")}
    for template in spec["templates"][1:]:
        env = (template.get("container") or {}).get("env", [])
        refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in env if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}
        assert ("{{workflow.parameters.qdrant-secret}}" in refs) == (template["name"] == "publish"), template["name"]
