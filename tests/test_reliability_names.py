"""Names that become paths, key variables, data loss and pipes (issue [4/6] Reliability round 3).

Each test fails on the code before its fix (the reason is in its comment). One small run (40 Quran verses,
the offline generators, the tiny encoder) is built once per module and copied by each test that changes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from json_api_server import JSONHandler, ThreadedServer
from m3tune.cli import app
from m3tune.runroot import open_root

DEMO = str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")
SECRET = "aws-secret-PLANTED-0123456789"
QDRANT_KEY = "qdrant-key-PLANTED-0123456789"


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _last_error(result) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A run root mined through mine-negatives on 40 verses (the demo's configs otherwise)."""
    from m3tune.cli import load_run_config
    from m3tune.corpus.ingest import IngestConfig
    from m3tune.executor import run_step

    root = open_root(str(tmp_path_factory.mktemp("names") / "runs" / "small"))
    configs = load_run_config(Path(DEMO))
    configs["ingest"] = IngestConfig(sources=["quran"], limit=40)
    for name in ("ingest", "generate-queries", "generate-conceptual", "generate-exact", "index", "mine-negatives"):
        run_step(root, name, configs.get(name))
    return root.path


@pytest.fixture
def run_copy(small_run, tmp_path) -> Path:
    """A copy of the small run that a test may change."""
    path = tmp_path / "runs" / "copy"
    shutil.copytree(small_run, path)
    return path


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    return victim


def _edit_published(root: Path, step: str, name: str, **changes) -> None:
    """Change fields of the JSON file STEP/NAME and its step's manifest to match (a bucket writer can do both)."""
    path = root / step / name
    data = {**json.loads(path.read_text()), **changes}
    path.write_bytes(json.dumps(data).encode())
    manifest_path = root / step / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    body = path.read_bytes()
    manifest["outputs"][name].update(sha256=hashlib.sha256(body).hexdigest(), bytes=len(body))
    manifest_path.write_text(json.dumps(manifest))


class _Recorder:
    """An HTTP server on loopback that records each request's headers and answers 404 (a Qdrant stand-in that
    only listens)."""

    def __init__(self):
        self.headers: list[dict[str, str]] = []
        recorder = self

        class Handler(JSONHandler):
            def _answer(self):
                recorder.headers.append({k.lower(): v for k, v in self.headers.items()})
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                self._send(404, {"status": {"error": "not found"}, "result": None})

            do_GET = do_PUT = do_POST = do_DELETE = _answer

        self.server = ThreadedServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def recorder():
    r = _Recorder()
    with r.server:
        yield r


# --------------------------------------------------------------------------- 1. names that become paths

@pytest.mark.parametrize("name", ["ABS", "../victim"])
def test_a_collection_name_from_the_cli_never_reaches_a_folder_outside_the_cache(run_copy, tmp_path, name,
                                                                                 m3tune_cache):
    # Before: the name was joined to the cache's qdrant-edge/ folder, and the Edge build renamed what was there
    # aside and removed it: '/abs/victim' (or '../victim' from a cache whose qdrant-edge/ sits beside it) was
    # deleted with everything in it.
    victim = _victim(tmp_path)
    if name == "ABS":
        name = str(victim)
    else:  # '../victim-…' from the cache's qdrant-edge/ folder: a victim beside it
        (m3tune_cache / "qdrant-edge").mkdir(exist_ok=True)
        victim = Path(shutil.move(str(victim), m3tune_cache / f"victim-{tmp_path.name}"))
        name = f"../{victim.name}"
    result = cli("step", "index", "--root", str(run_copy), "--config", DEMO, "--collection", name, "--force")
    assert result.exit_code == 1, result.output
    assert "collection" in _last_error(result) and "not a plain name" in _last_error(result)
    assert (victim / "keep.txt").read_text() == "precious"


def test_a_collection_name_read_from_index_json_never_reaches_outside(run_copy, tmp_path):
    # Before: mine-negatives joined index.json's collection to the cache and rebuilt the Edge shard there:
    # the victim folder was renamed aside and removed.
    victim = _victim(tmp_path)
    _edit_published(run_copy, "index", "index.json", collection=str(victim))
    result = cli("step", "mine-negatives", "--root", str(run_copy), "--config", DEMO, "--force")
    assert result.exit_code == 1, result.output
    assert "index.json: field collection" in _last_error(result)
    assert (victim / "keep.txt").read_text() == "precious"


def test_an_embeddings_cache_read_from_index_json_is_not_written_by_mining(run_copy, tmp_path):
    # Before: mine-negatives cached its query vectors in index.json's embeddings_cache, wherever it named.
    outside = tmp_path / "outside"
    _edit_published(run_copy, "index", "index.json", embeddings_cache=str(outside))
    result = cli("step", "mine-negatives", "--root", str(run_copy), "--config", DEMO, "--force")
    assert result.exit_code == 0, result.output
    assert not outside.exists()


@pytest.mark.parametrize("option,value", [("--collection", "a/b"), ("--collection", ".."),
                                          ("--embeddings-cache", "runs/../x")])
def test_a_name_or_location_is_refused_by_the_config_before_the_step_runs(run_copy, option, value):
    # Before: 'a/b' and '..' were taken as collection names, and a cache location with '..' as given.
    result = cli("step", "index", "--root", str(run_copy), "--config", DEMO, option, value, "--force")
    assert result.exit_code == 1, result.output
    assert option.lstrip("-").replace("-", "_") in _last_error(result)
    assert json.loads((run_copy / "index" / "_manifest.json").read_text())["step"] == "index"  # still published


# --------------------------------------------------------------------------- 2. key variables

def test_the_index_step_sends_no_aws_secret_as_a_qdrant_key(run_copy, recorder, monkeypatch):
    # Before: --qdrant-api-key-env took any variable, and its value went out in the api-key header.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    result = cli("step", "index", "--root", str(run_copy), "--config", DEMO, "--qdrant-url", recorder.url,
                 "--qdrant-api-key-env", "AWS_SECRET_ACCESS_KEY", "--force")
    assert result.exit_code == 1, result.output
    assert "AWS credential" in _last_error(result)
    assert "qdrant_api_key_env 'AWS_SECRET_ACCESS_KEY'" in _last_error(result)  # the setting it came from
    assert recorder.headers == []  # refused before any request


@pytest.mark.parametrize("key_env", ["AWS_SECRET_ACCESS_KEY", "QDRANT_API_KEY"])
def test_a_qdrant_url_read_from_index_json_is_sent_no_key(run_copy, recorder, monkeypatch, key_env):
    # Before: mine-negatives opened index.json's qdrant_url with the value of index.json's qdrant_api_key_env:
    # whoever could write the run root received the AWS secret, or the Qdrant key, at a URL of their choice.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("QDRANT_API_KEY", QDRANT_KEY)
    _edit_published(run_copy, "index", "index.json", qdrant_url=recorder.url, qdrant_api_key_env=key_env)
    result = cli("step", "mine-negatives", "--root", str(run_copy), "--config", DEMO, "--force")
    assert result.exit_code == 1, result.output
    assert "qdrant_url" in _last_error(result)
    assert not any(SECRET in v or QDRANT_KEY in v for h in recorder.headers for v in h.values())
    assert recorder.headers == []


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")  # the loopback test server
def test_mining_searches_the_server_its_own_config_names_with_its_own_key(run_copy, monkeypatch):
    # The legitimate way: the index step built the collection on a server, and mine-negatives is given the same
    # URL (and a key variable of its own). Before: mine-negatives had no such options (exit 2).
    from qdrant_server import QdrantRestServer

    monkeypatch.setenv("QDRANT_API_KEY", QDRANT_KEY)
    with QdrantRestServer() as server:
        made = cli("step", "index", "--root", str(run_copy), "--config", DEMO, "--qdrant-url", server.url, "--force")
        assert made.exit_code == 0, made.output
        other = cli("step", "mine-negatives", "--root", str(run_copy), "--config", DEMO, "--force")
        assert other.exit_code == 1 and "qdrant_url" in _last_error(other)
        mined = cli("step", "mine-negatives", "--root", str(run_copy), "--config", DEMO, "--qdrant-url", server.url,
                    "--force")
        assert mined.exit_code == 0, mined.output
        assert any(path.endswith("/points/query/batch") for _, path, _ in server.requests)


# --------------------------------------------------------------------------- 3. data loss

@pytest.mark.parametrize("n", ["0", "-1"])
def test_merge_shards_below_one_touches_nothing(run_copy, n):
    # Before: --merge-shards 0 deleted mine-negatives/_manifest.json, then crashed with IndexError.
    manifest = (run_copy / "mine-negatives" / "_manifest.json").read_bytes()
    result = cli("step", "mine-negatives", "--root", str(run_copy), "--merge-shards", n)
    assert result.exit_code == 1, result.output
    assert "--merge-shards" in _last_error(result)
    assert (run_copy / "mine-negatives" / "_manifest.json").read_bytes() == manifest


def test_train_refuses_a_non_empty_work_dir_it_did_not_create(tmp_path):
    # Before: training in --workdir DIR removed DIR/out, DIR/best and DIR/checkpoints whole (a user's own
    # folders of those names among them).
    from m3tune.context import StepContext
    from m3tune.errors import UserError
    from m3tune.training.step import train

    work = tmp_path / "mine"
    for sub in ("out", "best", "checkpoints"):
        (work / sub).mkdir(parents=True)
        (work / sub / "keep.txt").write_text("precious")
    root = open_root(str(tmp_path / "runs" / "t"))
    with pytest.raises(UserError) as refused:
        # two processes: the step clears the work dir's out/ before it launches them
        train(StepContext(root=root, name="train"), model="local:tiny-xlmr", dims=[32], processes=2,
              workdir=str(work))
    assert all((work / sub / "keep.txt").is_file() for sub in ("out", "best", "checkpoints"))
    assert f"workdir {work}: not empty and not made by m3tune" in str(refused.value)


def test_a_work_dir_m3tune_made_is_taken_again(tmp_path):
    from m3tune.training.step import WORKDIR_MARK, claim_workdir

    work = tmp_path / "new" / "work"
    claim_workdir(work)
    (work / "out").mkdir()
    claim_workdir(work)  # its own: a rerun may clear what it made
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_workdir(empty)  # an empty folder holds nothing to lose
    assert all((p / WORKDIR_MARK).is_file() for p in (work, empty))


# --------------------------------------------------------------------------- 4. pipes

def _with_timeout(fn, seconds: float, fifo: Path):
    """FN's result, or a failure if it is still running after SECONDS (a read blocked on FIFO: unblocked)."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        with open(fifo, "wb"):  # a writer that closes at once: the blocked read sees the end of the file
            pass
        thread.join(30)
        pytest.fail(f"still blocked on {fifo} after {seconds} s")
    return box["result"]


def test_a_user_file_that_is_a_pipe_is_refused_not_waited_on(tmp_path):
    # Before: ingest opened the named pipe and waited for a writer that never came.
    fifo = tmp_path / "passages.jsonl"
    os.mkfifo(fifo)
    result = _with_timeout(lambda: cli("step", "ingest", "--root", str(tmp_path / "runs" / "p"), "--no-packaged",
                                       "--user-file", str(fifo)), 20, fifo)
    assert result.exit_code == 1, result.output
    assert str(fifo) in _last_error(result) and "not a regular file" in _last_error(result)


def test_a_config_file_that_is_a_pipe_is_refused_not_waited_on(tmp_path):
    # Before: --config passed Typer's checks (it exists, it is no folder) and its read waited for a writer.
    fifo = tmp_path / "run.yaml"
    os.mkfifo(fifo)
    result = _with_timeout(lambda: cli("step", "ingest", "--root", str(tmp_path / "runs" / "p"), "--config",
                                       str(fifo)), 20, fifo)
    assert result.exit_code == 1, result.output
    assert str(fifo) in _last_error(result) and "not a regular file" in _last_error(result)


def test_a_pipe_in_the_run_root_is_refused_not_waited_on(run_copy):
    # Before: a read of ingest/passages.jsonl, made a named pipe by a writer of the run root, waited forever.
    from m3tune.storage import StorageError

    fifo = run_copy / "ingest" / "passages.jsonl"
    fifo.unlink()
    os.mkfifo(fifo)
    store = open_root(str(run_copy)).child("ingest")

    def read():
        try:
            store.read_bytes("passages.jsonl")
        except StorageError as e:
            return str(e)
        return "read"

    message = _with_timeout(read, 20, fifo)
    assert str(fifo) in message and "not a regular file" in message


def test_a_name_with_a_final_newline_is_no_plain_name():
    # Before: both patterns ended in `$` under re.match, which also matches before a final newline, so
    # 'exp-01\n' passed as a run id (and rendered into a Job) and as a collection name.
    from m3tune.errors import ConfigError
    from m3tune.names import safe_name
    from m3tune.storage import StorageError, validate_run_id

    with pytest.raises(StorageError):
        validate_run_id("exp-01\n")
    with pytest.raises(ConfigError):
        safe_name("quran\n", "collection")
    assert validate_run_id("exp-01") == "exp-01" and safe_name("quran", "collection") == "quran"


def test_asking_for_fewer_negatives_than_min_negatives_is_a_config_error():
    # Before: hard 0, semi_hard 0, random 0 with min_negatives 1 dropped every example: 0 examples, exit 0.
    from pydantic import ValidationError

    from m3tune.mining.mine import MineConfig

    with pytest.raises(ValidationError, match="every example would be dropped"):
        MineConfig(hard=0, semi_hard=0, random=0)
    with pytest.raises(ValidationError, match="min_negatives is 5"):
        MineConfig(hard=2, semi_hard=1, random=1, min_negatives=5)
    assert MineConfig(hard=0, semi_hard=0, random=0, min_negatives=0).min_negatives == 0  # in-batch only


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_vectors_with_nan_in_a_run_root_are_refused_naming_the_file(tmp_path, bad):
    # Before: an all-NaN vectors.npy of the right shape was read, searched and published as valid.
    import numpy as np

    from m3tune.errors import UserError
    from m3tune.index.step import read_vectors
    from m3tune.runroot import open_root

    folder = open_root(str(tmp_path / "runs" / "r")).child("index")
    vectors = np.ones((3, 4), np.float32)
    vectors[1, 2] = float(bad)
    buffer = io.BytesIO()
    np.save(buffer, vectors)
    folder.write_bytes("vectors.npy", buffer.getvalue())
    with pytest.raises(UserError, match=r"vectors.npy: 1 of its 3 vectors hold NaN or infinite values"):
        read_vectors(folder, rows=3, dim=4)
    vectors[1, 2] = 0.5
    buffer = io.BytesIO()
    np.save(buffer, vectors)
    folder.write_bytes("vectors.npy", buffer.getvalue())
    assert read_vectors(folder, rows=3, dim=4).shape == (3, 4)


@pytest.mark.parametrize("theme_id", ["../victim", "a/b", "x\n"])
def test_a_theme_id_is_a_plain_name(tmp_path, theme_id):
    # Before: any string was taken as a theme id (it names work items, journal entries and query ids).
    from m3tune.errors import ConfigError
    from m3tune.generation.offline import load_themes

    themes = tmp_path / "themes.yaml"
    themes.write_text(json.dumps({"version": 1, "themes": [{"id": theme_id, "ar": ["صبر"], "en": ["patience"],
                                                             "lexicon": ["صبر"]}]}), encoding="utf-8")
    with pytest.raises(ConfigError, match="theme id .*not a plain name"):
        load_themes(str(themes))
