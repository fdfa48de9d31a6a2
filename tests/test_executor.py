import json
import os
import signal
import subprocess
import sys
import time

import pytest
from pydantic import BaseModel

from m3tune.corpus.ingest import IngestConfig
from m3tune.executor import MissingInput, pipeline_status, run_pipeline, run_step, step_status
from m3tune.jsonl import read_records
from m3tune.manifest import MANIFEST, Tampered, config_digest, read_manifest
from m3tune.pipeline import PIPELINE, STEPS, Step, get_step
from m3tune.records import Passage
from m3tune.storage import file_digest

SMALL = IngestConfig(sources=["quran", "bukhari"], limit=5)


def test_second_run_is_skipped_and_changes_make_it_rerun(local_root):
    manifest, ran = run_step(local_root, "ingest", SMALL)
    assert ran and manifest.counts["passages"] == 10
    again, ran_again = run_step(local_root, "ingest", SMALL)
    assert not ran_again and again == manifest
    assert step_status(local_root, get_step("ingest"), SMALL).state == "done"

    bigger = IngestConfig(sources=["quran", "bukhari"], limit=6)
    status = step_status(local_root, get_step("ingest"), bigger)
    assert (status.state, status.reason) == ("stale", "config changed")
    manifest2, ran2 = run_step(local_root, "ingest", bigger)
    assert ran2 and manifest2.counts["passages"] == 12

    _, forced = run_step(local_root, "ingest", bigger, force=True)
    assert forced


def test_manifest_records_what_was_done(local_root):
    manifest, _ = run_step(local_root, "ingest", SMALL)
    folder = local_root.child("ingest")
    on_disk = json.loads(folder.read_bytes(MANIFEST))
    assert on_disk["step"] == "ingest" and on_disk["m3tune_version"]
    assert on_disk["config"] == SMALL.model_dump(mode="json")
    assert on_disk["config_digest"] == config_digest(SMALL)
    info = manifest.outputs["passages.jsonl"]
    assert info.sha256 == file_digest(folder, "passages.jsonl")
    assert info.rows == 10 and info.bytes == folder.size("passages.jsonl")
    assert on_disk["seconds"] >= 0 and on_disk["finished_at"] >= on_disk["started_at"]


def test_deleted_output_and_changed_user_file_make_the_step_stale(local_root, tmp_path):
    user = tmp_path / "u.jsonl"
    user.write_text('{"id": "x:1", "source": "hadith", "text": "نص"}\n', encoding="utf-8")
    config = IngestConfig(sources=[], user_files=[str(user)])
    run_step(local_root, "ingest", config)
    user.write_text('{"id": "x:1", "source": "hadith", "text": "نص آخر"}\n', encoding="utf-8")
    status = step_status(local_root, get_step("ingest"), config)
    assert status.state == "stale" and status.reason.startswith("inputs changed: user:")
    run_step(local_root, "ingest", config)
    local_root.child("ingest").delete("passages.jsonl")
    status = step_status(local_root, get_step("ingest"), config)
    assert (status.state, status.reason) == ("stale", "output missing: passages.jsonl")
    _, ran = run_step(local_root, "ingest", config)
    assert ran and [p.text for p in read_records(local_root.child("ingest"), "passages.jsonl", Passage)] == ["نص آخر"]


class CountConfig(BaseModel):
    minimum: int = 1


def count_passages(ctx, *, minimum: int):
    n = sum(1 for _ in read_records(ctx.root.child("ingest"), "passages.jsonl", Passage))
    ctx.write_bytes("count.json", json.dumps({"passages": n}).encode())
    return {"counts": {"passages": n}}


def test_downstream_step_follows_its_upstream(local_root, monkeypatch):
    monkeypatch.setitem(STEPS, "count", Step("count", count_passages, CountConfig, "count passages", needs=("ingest",)))
    with pytest.raises(MissingInput, match="needs 'ingest'"):
        run_step(local_root, "count")
    assert local_root.child("count").list() == []
    run_step(local_root, "ingest", SMALL)
    manifest, ran = run_step(local_root, "count")
    assert ran and manifest.counts == {"passages": 10}
    assert set(manifest.inputs) == {"ingest/passages.jsonl", "ingest/groups.jsonl", "ingest/NOTICE.md"}
    assert not run_step(local_root, "count")[1]
    run_step(local_root, "ingest", IngestConfig(sources=["quran"], limit=2))
    status = step_status(local_root, get_step("count"))
    assert status.state == "stale" and "ingest/passages.jsonl" in status.reason
    assert run_step(local_root, "count")[0].counts == {"passages": 2}


def test_pipeline_runs_in_order_and_reports_status(local_root):
    statuses = pipeline_status(local_root)
    assert [(s.step, s.state) for s in statuses] == [(name, "missing") for name in PIPELINE]
    assert run_pipeline(local_root, {"ingest": SMALL}, until="ingest") == [("ingest", True)]
    assert run_pipeline(local_root, {"ingest": SMALL}, until="ingest") == [("ingest", False)]
    status = pipeline_status(local_root, {"ingest": SMALL})
    assert [(s.step, s.state) for s in status[:2]] == [("ingest", "done"), ("generate-queries", "missing")]
    assert status[0].manifest.counts["by_source"] == {"quran": 5, "bukhari": 5}


def _big_user_file(path, rows=150_000):
    line = '{"id": "big:%d", "source": "hadith", "text": "حَدَّثَنَا قُتَيْبَةُ بْنُ سَعِيدٍ حديث رقم %d"}\n'
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(line % (i, i))


def _kill_while_writing(args, folder, env):
    proc = subprocess.Popen([sys.executable, "-m", "m3tune.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if folder.is_dir() and any(".passages.jsonl.tmp-" in p.name for p in folder.iterdir()):
            break
        time.sleep(0.01)
    else:
        proc.kill()
        pytest.fail("the step never started writing")
    time.sleep(0.3)
    assert proc.poll() is None, "the step finished before it could be killed; make the input bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_step_publishes_nothing_and_reruns_cleanly(tmp_path):
    user = tmp_path / "big.jsonl"
    _big_user_file(user)
    root_dir = tmp_path / "runs" / "killed"
    folder = root_dir / "ingest"
    args = ["step", "ingest", "--root", str(root_dir), "--no-packaged", "--user-file", str(user)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    _kill_while_writing(args, folder, env)
    names = sorted(p.name for p in folder.iterdir())
    assert "passages.jsonl" not in names and MANIFEST not in names
    assert any(".tmp-" in n for n in names)  # the half-written file, never under its real name
    from m3tune.runroot import open_root
    root = open_root(str(root_dir))
    status = step_status(root, get_step("ingest"))
    assert (status.state, status.reason) == ("missing", "started but not finished (no manifest)")

    done = subprocess.run([sys.executable, "-m", "m3tune.cli", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, "groups.jsonl", "passages.jsonl"]
    manifest = read_manifest(root.child("ingest"))
    assert manifest.outputs["passages.jsonl"].rows == 150_000

    # A forced rerun killed half-way withdraws the old manifest first: the old
    # output stays readable, but nothing vouches for it until a rerun finishes.
    _kill_while_writing([*args, "--force"], folder, env)
    assert not (folder / MANIFEST).exists() and (folder / "passages.jsonl").exists()
    assert step_status(root, get_step("ingest")).state == "missing"
    _, ran = run_step(root, "ingest", IngestConfig(sources=[], user_files=[str(user)]))
    assert ran and sorted(p.name for p in folder.iterdir()) == [MANIFEST, "groups.jsonl", "passages.jsonl"]


def test_rerun_removes_outputs_the_new_run_does_not_produce(local_root, tmp_path):
    user = tmp_path / "u.jsonl"
    user.write_text('{"id": "x:1", "source": "hadith", "text": "نص"}\n{bad\n', encoding="utf-8")
    run_step(local_root, "ingest", IngestConfig(sources=["quran"], limit=1, user_files=[str(user)], skip_invalid=True))
    folder = local_root.child("ingest")
    assert sorted(folder.list()) == ["NOTICE.md", MANIFEST, "groups.jsonl", "passages.jsonl", "rejects.jsonl"]
    run_step(local_root, "ingest", IngestConfig(sources=[], user_files=[str(user)], skip_invalid=True))
    assert sorted(folder.list()) == [MANIFEST, "groups.jsonl", "passages.jsonl", "rejects.jsonl"]  # no NOTICE without packaged text
    user.write_text('{"id": "x:1", "source": "hadith", "text": "نص"}\n', encoding="utf-8")
    run_step(local_root, "ingest", IngestConfig(sources=[], user_files=[str(user)]))
    assert sorted(folder.list()) == [MANIFEST, "groups.jsonl", "passages.jsonl"]  # the old rejects are gone


def test_corrupt_manifest_is_stale_and_force_repairs_it(local_root):
    run_step(local_root, "ingest", SMALL)
    local_root.child("ingest").write_bytes(MANIFEST, b"{not a manifest")
    status = step_status(local_root, get_step("ingest"), SMALL)
    assert status.state == "stale" and status.reason.startswith("manifest unreadable")
    _, ran = run_step(local_root, "ingest", SMALL, force=True)
    assert ran and step_status(local_root, get_step("ingest"), SMALL).state == "done"


def test_changed_output_is_tampered_and_only_force_reruns_it(local_root):
    # A published file that no longer matches its manifest was changed behind the pipeline's back: not
    # "stale" (inputs or config changed), and not silently regenerated, which would hide it.
    run_step(local_root, "ingest", SMALL)
    local_root.child("ingest").write_bytes("passages.jsonl", b"{}\n")
    status = step_status(local_root, get_step("ingest"), SMALL)
    assert status.state == "tampered" and "ingest/passages.jsonl: tampered" in status.reason
    with pytest.raises(Tampered, match="passages.jsonl"):
        run_step(local_root, "ingest", SMALL)
    assert run_step(local_root, "ingest", SMALL, force=True)[1]
    assert step_status(local_root, get_step("ingest"), SMALL).state == "done"


def test_user_file_is_recorded_absolute_and_a_missing_one_makes_status_stale(local_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "u.jsonl").write_text('{"id": "x:1", "source": "hadith", "text": "نص"}\n', encoding="utf-8")
    config = IngestConfig(sources=[], user_files=["u.jsonl"])
    assert config.user_files == [str(tmp_path / "u.jsonl")]
    run_step(local_root, "ingest", config)
    monkeypatch.chdir("/")
    assert step_status(local_root, get_step("ingest"), config).state == "done"
    (tmp_path / "u.jsonl").unlink()
    status = step_status(local_root, get_step("ingest"), config)
    assert status.state == "stale" and status.reason.startswith("inputs unavailable: not found")


def test_duplicate_sources_are_refused():
    with pytest.raises(ValueError, match="each source may be given once"):
        IngestConfig(sources=["quran", "quran"])


def test_killed_s3_step_publishes_nothing(tmp_path, s3_root, s3_endpoint):
    user = tmp_path / "big.jsonl"
    _big_user_file(user, rows=300_000)
    env = {**os.environ, "M3TUNE_S3_ENDPOINT": s3_endpoint}
    args = [sys.executable, "-m", "m3tune.cli", "step", "ingest", "--root", s3_root.uri, "--no-packaged",
            "--user-file", str(user)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    assert proc.poll() is None, "the step finished before it could be killed; make the input bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert s3_root.child("ingest").list() == []
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(s3_root.child("ingest").list()) == [MANIFEST, "groups.jsonl", "passages.jsonl"]
