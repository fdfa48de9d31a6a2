"""A hostile run root, a leaked key, and failures that must not look like success (issue [4/7]).

Each test names the item of the issue it covers; each fails on the code before the fix (the reason is in
its comment). docs/reliability.md has the table of these cases.
"""

import json
import os
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llm_server import ChatServer
from m3tune.cli import app
from m3tune.corpus.ingest import IngestConfig
from m3tune.executor import run_step, step_status
from m3tune.manifest import MANIFEST, Tampered, read_manifest
from m3tune.pipeline import get_step
from m3tune.runroot import open_root
from m3tune.storage import StorageError, download_folder

SMALL = IngestConfig(sources=["quran"], limit=6)
PLANTED = "sk-PLANTED-123-do-not-leak"


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _last_error(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def _published_text(root_dir: Path) -> str:
    """Every file under a local run root, decoded (what a planted secret must be absent from)."""
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in root_dir.rglob("*") if p.is_file())


def _flip_same_size(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    data[i] = ord("x") if data[i] != ord("x") else ord("y")
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- 1. paths from a run root

def test_latest_json_naming_an_outside_folder_removes_nothing(local_root, tmp_path):
    # Before: _resume ran rmtree(work / "checkpoints" / latest["name"]) with the name as written in the
    # bucket, so "/…/victim" (joined as an absolute path) was deleted.
    from accelerate import Accelerator

    from m3tune.training import loop

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    out = local_root.child("train")
    out.write_bytes("checkpoints/latest.json", json.dumps({"step": 1, "name": str(victim),
                                                           "config_digest": "sha256:same"}).encode())
    session = loop.Session(out=out, work=tmp_path / "work", digest="sha256:same", accelerator=Accelerator(cpu=True))
    with pytest.raises(StorageError, match=r"latest.json: field 'name': invalid relative path"):
        loop._resume(session)
    assert (victim / "keep.txt").read_text() == "precious"


def test_download_folder_checks_every_listed_name_before_making_a_folder(s3_root, tmp_path):
    # Before: the parents of each listed key were created first, and only the read refused the name, so a key
    # 'evil/a/../../../outside/x' in the bucket made a folder outside the destination.
    s3_root.client.put_object(Bucket=s3_root.bucket, Key=f"{s3_root.prefix}/evil/ok.txt", Body=b"1")
    s3_root.client.put_object(Bucket=s3_root.bucket, Key=f"{s3_root.prefix}/evil/a/../../../outside/x", Body=b"2")
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(StorageError, match=r"invalid relative path 'a/\.\./\.\./\.\./outside/x'"):
        download_folder(s3_root.child("evil"), dest)
    assert not (tmp_path / "outside").exists() and not dest.exists()


@pytest.mark.parametrize("root", ["s3://bucket/runs//x", "s3://bucket//runs/x", "s3://bucket/runs/x?versionId=1",
                                  "RUNS/x/.", "RUNS/.", "RUNS/./x"])
def test_run_roots_that_name_another_place_are_refused(root, tmp_path):
    # Before: 's3://b/runs//x' ran under another key than s3://b/runs/x, '?…' was dropped, and 'DIR/.' ran in
    # DIR (pathlib drops the '.'), 'runs/.' in the runs folder itself.
    root = root.replace("RUNS", str(tmp_path / "runs"))
    result = cli("status", "--root", root, "--json")
    assert result.exit_code == 1, result.output
    assert "not allowed" in _last_error(result) or "no '?'" in _last_error(result)
    assert not (tmp_path / "runs").exists()


def test_a_leading_dot_slash_is_still_a_run_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_root("./runs/r1").uri == (tmp_path / "runs" / "r1").as_uri()


# ------------------------------------------------------------------------------------ 3. integrity

def _count_step(ctx, *, minimum: int = 1):
    from m3tune.jsonl import read_records
    from m3tune.records import Passage

    n = sum(1 for _ in read_records(ctx.root.child("ingest"), "passages.jsonl", Passage))
    ctx.write_bytes("count.json", json.dumps({"passages": n}).encode())
    return {"counts": {"passages": n}}


def test_a_same_size_edit_of_any_published_file_is_tampered_and_stops_its_consumer(any_root, tmp_path):
    # Before: status compared sizes only, so a same-size edit was "done", and the consumer read the edited
    # bytes while its manifest recorded the old digest.
    from m3tune.corpus.passages import _READ

    run_step(any_root, "ingest", SMALL)
    folder = any_root.child("ingest")
    manifest = read_manifest(folder)
    assert {"passages.jsonl", "NOTICE.md"} <= set(manifest.outputs)
    for name in manifest.outputs:  # every published file of the step, one at a time
        original = folder.read_bytes(name)
        if not original:
            continue  # an empty file has no same-size edit (any write changes its size: tampered by size)
        edited = bytearray(original)
        edited[len(edited) // 2] ^= 0x01
        assert len(edited) == len(original)
        folder.with_integrity(None).write_bytes(name, bytes(edited))  # behind the pipeline's back
        status = step_status(any_root, get_step("ingest"), SMALL)
        assert status.state == "tampered" and f"ingest/{name}: tampered: sha256" in status.reason
        with pytest.raises(Tampered, match=f"ingest/{name}: tampered"):
            folder.read_bytes(name)  # any reader through the run root
        assert step_status(any_root, get_step("ingest"), SMALL, verify=False).state == "done"  # sizes agree
        folder.with_integrity(None).write_bytes(name, original)
    assert step_status(any_root, get_step("ingest"), SMALL).state == "done"

    # a real consumer: generate-queries (offline) reads passages.jsonl and stops with exit 4, publishing nothing
    passages = folder.read_bytes("passages.jsonl")
    edited = passages.replace(b"quran:1:3", b"quran:1:9", 1)  # an unknown id, same size
    assert edited != passages and len(edited) == len(passages)
    folder.with_integrity(None).write_bytes("passages.jsonl", edited)
    _READ.clear()  # the corpus reader keeps a per-process copy keyed by digest; a fresh process has none
    endpoint = ["--s3-endpoint", any_root.endpoint_url] if any_root.uri.startswith("s3://") else []
    result = cli("step", "generate-queries", "--root", any_root.uri, "--pilot", "3", *endpoint)
    assert result.exit_code == 4, result.output
    assert "ingest/passages.jsonl: tampered: sha256" in _last_error(result)
    assert not any_root.child("generate-queries").exists(MANIFEST)
    status = cli("status", "--root", any_root.uri, "--json", *endpoint)
    rows = {r["step"]: r for r in json.loads(status.stdout)}
    assert rows["ingest"]["state"] == "tampered" and "passages.jsonl" in rows["ingest"]["reason"]


def test_a_partly_read_published_file_is_verified_when_its_reader_is_done(local_root):
    run_step(local_root, "ingest", SMALL)
    _flip_same_size(local_root.child("ingest").path / "passages.jsonl")
    with pytest.raises(Tampered):
        with local_root.child("ingest").open_read("passages.jsonl") as f:
            f.readline()  # the first line only: leaving the block reads (and checks) the rest


def test_a_consumers_manifest_records_the_digest_of_what_it_read(local_root, monkeypatch):
    from m3tune.pipeline import STEPS, Step
    from pydantic import BaseModel

    class CountConfig(BaseModel):
        minimum: int = 1

    monkeypatch.setitem(STEPS, "count", Step("count", _count_step, CountConfig, "count", needs=("ingest",)))
    run_step(local_root, "ingest", SMALL)
    _flip_same_size(local_root.child("ingest").path / "passages.jsonl")
    with pytest.raises(Tampered):
        run_step(local_root, "count")
    assert not local_root.child("count").exists(MANIFEST)  # no manifest vouching for a digest it did not read


def _publish_model_step(ctx, *, minimum: int = 1):
    ctx.write_bytes("model/config.json", b'{"model_type": "bert"}')
    ctx.write_bytes("model/weights.bin", b"w" * 64)
    return {}


@pytest.fixture
def published_model(any_root, monkeypatch):
    """A finished step 'pub' whose manifest records model/config.json and model/weights.bin."""
    from pydantic import BaseModel

    from m3tune.pipeline import STEPS, Step

    class PubConfig(BaseModel):
        minimum: int = 1

    monkeypatch.setitem(STEPS, "pub", Step("pub", _publish_model_step, PubConfig, "pub"))
    run_step(any_root, "pub")
    return any_root


def test_a_manifest_planted_inside_a_step_folder_cannot_vouch_for_its_files(published_model):
    # Review: the nearest manifest above a file answered for it, so a planted pub/model/_manifest.json
    # recording the edited bytes made every reader (evaluate's model_path among them) accept them.
    import hashlib

    from m3tune.evaluation.models import model_path

    root = published_model
    model, plain = root.child("pub").child("model"), root.child("pub").child("model").with_integrity(None)
    edited = b"W" * 64  # same size
    plain.write_bytes("weights.bin", edited)
    planted = {"step": "pub", "m3tune_version": "0", "config": {}, "config_digest": "x", "inputs": {},
               "outputs": {"weights.bin": {"sha256": hashlib.sha256(edited).hexdigest(), "bytes": 64},
                           "config.json": {"sha256": hashlib.sha256(b'{"model_type": "bert"}').hexdigest(),
                                           "bytes": 22}},
               "started_at": "", "finished_at": "", "seconds": 0}
    plain.write_bytes(MANIFEST, json.dumps(planted).encode())
    with pytest.raises(Tampered, match="pub/model/weights.bin: tampered: sha256"):
        open_root(root.uri, s3_endpoint=getattr(root, "endpoint_url", None)).child("pub/model").read_bytes("weights.bin")
    with pytest.raises(Tampered, match=r"pub/model/\S+: tampered"):  # the planted manifest is not published
        model_path("run:pub", root)
    assert model.exists("weights.bin")


def test_a_file_added_to_a_published_model_folder_is_refused(published_model, tmp_path):
    # Review: model_path verified the files it listed, and a file the manifest does not record was read
    # unverified, then loaded by transformers by path (an added_tokens.json changes the tokenizer).
    from m3tune.evaluation.models import model_path

    root = published_model
    assert model_path("run:pub", root)  # as published: accepted
    root.child("pub").child("model").with_integrity(None).write_bytes("added_tokens.json", b'{"x": 5}')
    with pytest.raises(Tampered, match=r"pub/model/added_tokens.json: tampered: not published by its step"):
        model_path("run:pub", root)


def test_a_symbolic_link_in_a_local_run_root_reaches_nothing_outside(tmp_path):
    # Review: check_relative stops '..' in a name, not a link planted in the root: with train/checkpoints a
    # link to another folder, a fresh start of train (which lists checkpoints/ and deletes what it lists,
    # as pruning does) deleted every file in that folder.
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    root = open_root(str(tmp_path / "runs" / "linked"))
    (tmp_path / "runs" / "linked" / "train").mkdir(parents=True)
    (tmp_path / "runs" / "linked" / "train" / "checkpoints").symlink_to(victim)
    checkpoints = root.child("train").child("checkpoints")
    with pytest.raises(StorageError, match="a symbolic link leads outside the run root"):
        for rel in checkpoints.list():
            checkpoints.delete(rel)
    with pytest.raises(StorageError, match="a symbolic link leads outside the run root"):
        root.child("train").delete("checkpoints/keep.txt")
    assert (victim / "keep.txt").read_text() == "precious"
    with pytest.raises(StorageError, match="symbolic link"):  # nor is anything written through it
        root.child("train").write_bytes("checkpoints/planted.txt", b"x")
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    # a link to a file outside is not read either; a link inside the root is followed
    (tmp_path / "runs" / "linked" / "outside.json").symlink_to(victim / "keep.txt")
    with pytest.raises(StorageError, match="symbolic link"):
        root.read_bytes("outside.json")
    root.write_bytes("a/inside.txt", b"in")
    (tmp_path / "runs" / "linked" / "b").symlink_to(tmp_path / "runs" / "linked" / "a")
    assert root.child("b").read_bytes("inside.txt") == b"in"


# ----------------------------------------------------------------------------------------- 4. secrets

@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", PLANTED)
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)


def _ingest_small(root_dir: Path) -> None:
    assert cli("step", "ingest", "--root", str(root_dir), "--source", "quran", "--limit", "3").exit_code == 0


def test_a_planted_key_reaches_no_reject_log_journal_or_stderr(tmp_path, secret_env):
    # Before: a 4xx body went verbatim into rejects.jsonl (and the journal reason), quoting the key.
    root_dir = tmp_path / "runs" / "secret"
    _ingest_small(root_dir)
    with ChatServer({"quran:1:2": ["echo"], "quran:1:3": ["echo"]}) as server:
        result = cli("step", "generate-queries", "--root", str(root_dir), "--backend", "openai", "--pilot", "0",
                     "--base-url", server.url, "--model", "m", "--max-retries", "0", "-v")
        assert [r["action"] for r in server.requests].count("echo") == 2
    assert result.exit_code == 0, result.output
    rejects = [json.loads(x) for x in (root_dir / "generate-queries" / "rejects.jsonl").read_text().splitlines()]
    details = [r["detail"] for r in rejects if r.get("reason") == "http_400"]
    assert len(details) == 2 and all("Bearer [REDACTED]" in d for d in details)
    assert PLANTED not in _published_text(root_dir)
    assert PLANTED not in result.stderr and PLANTED not in result.stdout

    # every request refused: the step fails (exit 4), and its message quotes the body redacted
    with ChatServer({"quran:1:1": ["echo"], "quran:1:2": ["echo"], "quran:1:3": ["echo"]}) as server:
        failed = cli("step", "generate-queries", "--root", str(root_dir), "--backend", "openai", "--pilot", "0",
                     "--base-url", server.url, "--model", "other", "--max-retries", "0")
    assert failed.exit_code == 4, failed.output
    assert "every one of the 3 request(s) failed (http_400 3)" in _last_error(failed)
    assert "Bearer [REDACTED]" in _last_error(failed) and PLANTED not in failed.stderr
    assert PLANTED not in _published_text(root_dir)


def test_a_refusal_quoting_the_key_is_redacted_before_it_is_cut(tmp_path, monkeypatch):
    # Before: a refusal was cut to 200 characters, then redacted: a key of no known shape, split by the cut, no
    # longer matched the key's value, and its first half reached rejects.jsonl.
    odd_key = "Zq7PLANTEDodd0shape9key" + "x" * 20
    monkeypatch.setenv("OPENAI_API_KEY", odd_key)
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    root_dir = tmp_path / "runs" / "refusal"
    _ingest_small(root_dir)
    with ChatServer({"quran:1:2": ["refusalkey"]}) as server:
        result = cli("step", "generate-queries", "--root", str(root_dir), "--backend", "openai", "--pilot", "0",
                     "--base-url", server.url, "--model", "m", "--max-retries", "0")
    assert result.exit_code == 0, result.output
    rejects = [json.loads(x) for x in (root_dir / "generate-queries" / "rejects.jsonl").read_text().splitlines()]
    refusals = [r["detail"] for r in rejects if r.get("reason") == "refusal"]
    assert len(refusals) == 1 and len(refusals[0]) <= 200
    assert odd_key[:6] not in _published_text(root_dir)


def _small_gold(tmp_path: Path) -> Path:
    """A one-query gold set over the first verses (the packaged gold cites passages a 3-verse corpus lacks)."""
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"id": "g1", "query": "الحمد لله", "relevant_ids": ["quran:1:2"], "category": "exact",
                                "language": "ar", "source": "quran", "difficulty": "easy"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    return gold


def test_an_embeddings_error_body_is_redacted_on_stderr(tmp_path, secret_env):
    # Before: evaluation/api.py put str(error) (the body, the key in it) in its message.
    from embeddings_server import EmbeddingsServer

    corpus = tmp_path / "passages.jsonl"
    root_dir = tmp_path / "runs" / "ev"
    _ingest_small(root_dir)
    corpus.write_bytes((root_dir / "ingest" / "passages.jsonl").read_bytes())
    gold = _small_gold(tmp_path)
    with EmbeddingsServer(["echo"], key=PLANTED) as server:
        (tmp_path / "run.yaml").write_text(f"evaluate:\n  api_base_url: {server.url}\n")
        result = cli("evaluate", "--corpus", str(corpus), "--test-set", str(gold), "--model", "api:hash-64",
                     "--config", str(tmp_path / "run.yaml"), "--output-dir", str(tmp_path / "out"))
        assert server.requests and server.requests[0]["action"] == "echo"
    assert result.exit_code == 4, result.output
    assert "HTTP 422" in _last_error(result) and "Bearer [REDACTED]" in _last_error(result)
    assert PLANTED not in result.stderr and PLANTED not in result.stdout


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HOME", "M3TUNE_ROOT"])
def test_api_key_env_takes_only_api_key_variables(tmp_path, monkeypatch, name):
    # Before: any variable was sent as the Bearer token, AWS_SECRET_ACCESS_KEY included.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-aws-secret")
    root_dir = tmp_path / "runs" / "k"
    _ingest_small(root_dir)
    with ChatServer() as server:
        result = cli("step", "generate-queries", "--root", str(root_dir), "--backend", "openai",
                     "--base-url", server.url, "--api-key-env", name)
        assert server.requests == []
    assert result.exit_code == 1, result.output
    assert f"api_key_env {name!r}" in _last_error(result)


def test_api_key_env_allow_list_is_extended_by_m3tune_api_key_envs(monkeypatch):
    from m3tune.errors import ConfigError
    from m3tune.generation.llm import LLMSettings
    from m3tune.redact import check_key_env

    assert LLMSettings(api_key_env="GEMINI_API_KEY").api_key_env == "GEMINI_API_KEY"
    with pytest.raises(ValueError, match="M3TUNE_API_KEY_ENVS"):  # a config error, inside pydantic's
        LLMSettings(api_key_env="MY_LLM_TOKEN")
    monkeypatch.setenv("M3TUNE_API_KEY_ENVS", "MY_LLM_TOKEN, OTHER")
    assert LLMSettings(api_key_env="MY_LLM_TOKEN").api_key_env == "MY_LLM_TOKEN"
    monkeypatch.setenv("M3TUNE_API_KEY_ENVS", "AWS_SECRET_ACCESS_KEY")  # never, even when listed
    with pytest.raises(ValueError, match="AWS credential"):
        LLMSettings(api_key_env="AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError, match="AWS credential"):
        check_key_env("AWS_SECRET_ACCESS_KEY")


def test_redact_masks_each_credential_shape(monkeypatch):
    from m3tune.redact import redact

    monkeypatch.setenv("ODD_API_KEY", "zz-odd-shaped-value-77")
    text = ("Authorization: Bearer abc.def-123 key sk-or-v1-0123456789abcdef AKIAABCDEFGHIJKLMNOP "
            "https://me:pr0xy-pass@llm.example/v1 "
            "aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY api_key: 'hunter22' zz-odd-shaped-value-77")
    clean = redact(text)
    for secret in ("abc.def-123", "0123456789abcdef", "AKIAABCDEFGHIJKLMNOP", "wJalrXUtnFEMI", "hunter22",
                   "zz-odd-shaped-value-77", "pr0xy-pass"):
        assert secret not in clean
    assert "https://[REDACTED]@llm.example/v1" in clean and redact("s3://b/runs/x") == "s3://b/runs/x"
    assert redact("آيات عن الصبر, sk-learn, passage quran:2:153") == "آيات عن الصبر, sk-learn, passage quran:2:153"


# ----------------------------------------------------------------------------------- 5. exit codes

def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_generation_with_every_request_failed_fails(tmp_path, secret_env):
    # Before: exit 0 with 0 queries and a manifest, so an Argo task "succeeded" with the endpoint down.
    root_dir = tmp_path / "runs" / "down"
    _ingest_small(root_dir)
    result = cli("step", "generate-queries", "--root", str(root_dir), "--backend", "openai", "--pilot", "0",
                 "--base-url", _closed_port(), "--max-retries", "1", "--backoff", "0.01", "--timeout", "2")
    assert result.exit_code == 1, result.output
    assert "every one of the 3 request(s) failed (retries_exhausted 3)" in _last_error(result)
    assert "is the endpoint up?" in _last_error(result)
    assert not (root_dir / "generate-queries" / MANIFEST).exists()


def test_evaluate_run_train_needs_a_train_manifest(tmp_path):
    # Before: model_path used train/model/ as soon as it held a config.json, manifest or not.
    from m3tune.encoder.profiles import resolve
    import shutil

    root_dir = tmp_path / "runs" / "half"
    _ingest_small(root_dir)
    shutil.copytree(resolve("local:tiny-xlmr"), root_dir / "train" / "model")  # a folder, never published
    result = cli("evaluate", "--root", str(root_dir), "--test-set", str(_small_gold(tmp_path)), "--model", "run:train",
                 "--output-dir", str(tmp_path / "o"))
    assert result.exit_code == 1, result.output
    assert "step 'train' has not finished" in _last_error(result) and "_manifest.json" in _last_error(result)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------- 6. no tracebacks

def test_a_passage_normalizing_to_empty_is_rejected_and_counted(tmp_path):
    # Before: Passage(text_plain="") raised a pydantic ValidationError out of ingest: a traceback, even with
    # --skip-invalid, and nothing published.
    user = tmp_path / "u.jsonl"
    user.write_text('{"id": "u:1", "source": "hadith", "text": "نص سليم"}\n'
                    '{"id": "u:2", "source": "hadith", "text": "\\u064e\\u064b ... ،"}\n'
                    '{"id": "u:3", "source": "hadith", "text": "نص آخر"}\n', encoding="utf-8")
    root_dir = tmp_path / "runs" / "empty"
    strict = cli("step", "ingest", "--root", str(root_dir), "--no-packaged", "--user-file", str(user))
    assert strict.exit_code == 4 and f"{user}:2: field 'text': normalizes to an empty text_plain" in _last_error(strict)
    kept = cli("step", "ingest", "--root", str(root_dir), "--no-packaged", "--user-file", str(user),
               "--skip-invalid")
    assert kept.exit_code == 0, kept.output
    manifest = read_manifest(open_root(str(root_dir)).child("ingest"))
    assert manifest.counts["passages"] == 2 and manifest.counts["rejected"] == 1
    reject = json.loads((root_dir / "ingest" / "rejects.jsonl").read_text())
    assert (reject["line"], reject["field"]) == (2, "text")


def test_a_yaml_config_nested_50000_deep_is_exit_4(tmp_path):
    # Before: PyYAML's recursive composer raised RecursionError: a traceback.
    deep = tmp_path / "deep.yaml"
    deep.write_text("ingest: " + "[" * 50_000 + "]" * 50_000 + "\n")
    result = cli("run", "--root", str(tmp_path / "runs" / "r"), "--config", str(deep))
    assert result.exit_code == 4, result.output
    assert _last_error(result).startswith(f"error: {deep}:1:") and "nested deeper than 64 levels" in _last_error(result)


def test_an_empty_model_folder_is_exit_4(tmp_path):
    # Before: transformers' OSError (or a ValueError) came out as a traceback.
    (tmp_path / "empty-model").mkdir()
    root_dir = tmp_path / "runs" / "m"
    _ingest_small(root_dir)
    result = cli("step", "index", "--root", str(root_dir), "--model", str(tmp_path / "empty-model"))
    assert result.exit_code == 4, result.output
    assert _last_error(result) == (f"error: model {str(tmp_path / 'empty-model')!r}: {tmp_path / 'empty-model'} "
                                   "is empty: not a transformers model folder")
    typo = cli("step", "index", "--root", str(root_dir), "--model", "/typo/model")
    assert typo.exit_code == 1 and "no such folder" in _last_error(typo)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_is_exit_4_with_the_file(tmp_path):
    # /dev/full answers every write with ENOSPC: a real full device. Before: an OSError traceback.
    rows = tmp_path / "q.jsonl"
    rows.write_text(json.dumps({"query": "ما الصبر", "pos": ["نص"]}, ensure_ascii=False) + "\n", encoding="utf-8")
    result = cli("analyze", str(rows), "--json", "/dev/full")
    assert result.exit_code == 4, result.output
    assert _last_error(result).startswith("error: cannot write /dev/full: No space left on device")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_while_copying_a_model_folder_names_the_file(tmp_path):
    from m3tune.storage import LocalStore, StorageFull

    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"0" * 1000)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "weights.bin").symlink_to("/dev/full")  # the destination's device is full
    with pytest.raises(StorageFull, match=r"cannot write .*weights.bin: No space left on device"):
        download_folder(LocalStore(src), dest)


# ---------------------------------------------------------------------------- 7. silent acceptance

def test_duplicate_yaml_keys_are_an_error_naming_both_lines(tmp_path):
    # Before: yaml.safe_load kept the last value: `limit: 100` then `limit: 5` ran with 5, silently.
    config = tmp_path / "run.yaml"
    config.write_text("ingest:\n  limit: 100\n  sources: [quran]\n  limit: 5\n")
    result = cli("run", "--root", str(tmp_path / "runs" / "r"), "--config", str(config), "--until", "ingest")
    assert result.exit_code == 4, result.output
    assert _last_error(result) == f"error: {config}:4:3: duplicate key 'limit' (first at line 2); remove one"
    assert not (tmp_path / "runs" / "r").exists()


def test_a_9_mb_passage_is_refused_with_the_limit(tmp_path):
    # Before: accepted, and encoded, indexed and searched as one passage.
    user = tmp_path / "big.jsonl"
    user.write_text(json.dumps({"id": "big:1", "source": "hadith", "text": "نص " * 3_000_000},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    assert user.stat().st_size > 9_000_000
    result = cli("step", "ingest", "--root", str(tmp_path / "runs" / "b"), "--no-packaged", "--user-file", str(user))
    assert result.exit_code == 4, result.output
    assert f"{user}:1: field 'text': String should have at most 100000 characters" in _last_error(result)


def test_nan_and_infinity_in_meta_are_refused_with_the_field(tmp_path):
    # Before: parsed as floats and written back as null: the value silently changed.
    user = tmp_path / "nan.jsonl"
    user.write_text('{"id": "n:1", "source": "hadith", "text": "نص", "meta": {"grade": {"score": NaN}}}\n'
                    '{"id": "n:2", "source": "hadith", "text": "نص", "meta": {"w": [1, Infinity]}}\n'
                    '{"id": "n:3", "source": "hadith", "text": "نص", "meta": {"w": [1, 2.5]}}\n',
                    encoding="utf-8")
    root_dir = tmp_path / "runs" / "nan"
    result = cli("step", "ingest", "--root", str(root_dir), "--no-packaged", "--user-file", str(user))
    assert result.exit_code == 4, result.output
    assert f"{user}:1: field 'meta': Value error, meta.grade.score is nan" in _last_error(result)
    skipped = cli("step", "ingest", "--root", str(root_dir), "--no-packaged", "--user-file", str(user),
                  "--skip-invalid")
    assert skipped.exit_code == 0, skipped.output
    rejects = [json.loads(x) for x in (root_dir / "ingest" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in rejects] == [(1, "meta"), (2, "meta")]
