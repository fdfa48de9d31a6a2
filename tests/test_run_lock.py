"""One writer per run root (m3tune.runlock): real `m3tune run` / `m3tune step` processes on one root, and the
S3 lock's conditional writes on a real S3 API (moto server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from m3tune.runlock import (FORMAT, BadLock, Lock, LockHeld, LockLost, _backend, hold_run, hold_step, launched_worker,
                            step_lock_name)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "m3tune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def m3tune(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "m3tune.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def wait_for_lock(path, proc: subprocess.Popen) -> dict:
    """The lock at PATH once PROC has written it (its holder's fields)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            holder = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            assert proc.poll() is None, f"exited {proc.returncode} before taking the lock: {proc.stderr.read()}"
            time.sleep(0.005)
            continue
        assert holder["pid"] == proc.pid
        return holder
    proc.kill()
    pytest.fail(f"{path} never appeared")


@pytest.fixture
def tiny_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("ingest: {limit: 100}\n")
    return config


def one_line(stderr: str) -> str:
    return " ".join(stderr.split())


def test_a_second_run_is_refused_with_the_holder_named_and_a_waiting_one_resumes_after_it(tmp_path, tiny_config):
    root = tmp_path / "runs" / "r1"
    lock_file = root / "_locks" / "run.json"
    first = start("run", "--root", str(root), "--until", "ingest", "-c", str(tiny_config))
    wait_for_lock(lock_file, first)
    wait_for_lock(root / "_locks" / "step.ingest.json", first)  # the step it is in: ingest
    os.kill(first.pid, signal.SIGSTOP)  # a live holder, paused mid-run: nothing it does races the checks below
    try:
        second = m3tune("run", "--root", str(root), "--until", "ingest", "-c", str(tiny_config))
        assert second.returncode == 1
        err = one_line(second.stderr)
        assert f"pid {first.pid} on {socket.gethostname()}" in err and "m3tune run --root" in err
        assert str(lock_file) in err and "--wait-lock" in err
        step = m3tune("step", "ingest", "--root", str(root), "--limit", "100", "--force")
        assert step.returncode == 1 and f"pid {first.pid}" in one_line(step.stderr)
        assert "step.ingest.json" in one_line(step.stderr)  # the run holds the step it is in
        waiting = start("run", "--root", str(root), "--until", "ingest", "-c", str(tiny_config), "--wait-lock", "120")
        time.sleep(1.0)
        assert waiting.poll() is None  # still waiting
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert "ingest skipped (done)" in out  # the waiter found the first run's work, and kept it
    status = m3tune("status", "--root", str(root), "-c", str(tiny_config))  # every published byte checked
    assert status.returncode == 0 and "│ ingest " in status.stdout and "up to date" in status.stdout
    manifest = json.loads((root / "ingest" / "_manifest.json").read_text())
    # the refused `m3tune step --force` wrote nothing: the first run's manifest is the one in place
    assert manifest["counts"]["passages"] == 300
    assert sorted(p.name for p in root.iterdir()) == ["ingest"]  # no lock left behind, no _locks/ either


def test_a_holder_that_died_is_taken_over(tmp_path, tiny_config):
    root = tmp_path / "runs" / "r2"
    lock_file = root / "_locks" / "run.json"
    first = start("run", "--root", str(root), "--until", "ingest", "-c", str(tiny_config))
    dead = wait_for_lock(lock_file, first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert json.loads(lock_file.read_text())["token"] == dead["token"]  # left behind by the killed run
    second = m3tune("run", "--root", str(root), "--until", "ingest", "-c", str(tiny_config))
    assert second.returncode == 0, second.stderr
    assert "took over the stale lock" in one_line(second.stderr) and f"pid {first.pid}" in one_line(second.stderr)
    assert not lock_file.exists()


def test_a_failing_step_releases_its_lock(tmp_path):
    root = tmp_path / "runs" / "r3"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    step = m3tune("step", "ingest", "--root", str(root), "--no-packaged", "--user-file", str(bad))
    assert step.returncode == 4 and "bad.jsonl:1" in step.stderr
    run = m3tune("run", "--root", str(root), "--until", "ingest", "-c", str(_write(tmp_path / "c.yaml",
                 f"ingest: {{sources: [], user_files: ['{bad}']}}\n")))
    assert run.returncode == 4, run.stderr
    assert not (root / "_locks").exists()


def _write(path, text):
    path.write_text(text)
    return path


def _lock_body(**fields) -> bytes:
    holder = {"format": FORMAT, "host": socket.gethostname(), "pid": 1, "command": "m3tune run --root x",
              "started": "2026-01-01T00:00:00+00:00", "ttl_s": 120, "token": "t" * 32, **fields}
    return json.dumps(holder).encode()


def test_a_garbage_lock_file_is_one_clear_line(tmp_path, tiny_config):
    root = tmp_path / "runs" / "r4"
    (root / "_locks").mkdir(parents=True)
    (root / "_locks" / "run.json").write_text("{half a lo")
    run = m3tune("run", "--root", str(root), "--until", "ingest", "-c", str(tiny_config))
    assert run.returncode == 4
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and str(root / "_locks" / "run.json") in lines[0]
    assert "not an m3tune lock" in lines[0] and "delete the file" in lines[0]
    (root / "_locks" / "run.json").write_bytes(_lock_body(pid="12"))
    run = m3tune("run", "--root", str(root), "--until", "ingest", "-c", str(tiny_config))
    assert run.returncode == 4 and "field 'pid'" in run.stderr
    assert not (root / "ingest").exists()


def test_a_live_local_holder_is_refused_and_taken_over_once_dead(local_root):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        path = local_root.path / "_locks" / "run.json"
        path.parent.mkdir(parents=True)
        path.write_bytes(_lock_body(pid=sleeper.pid, command="m3tune run --root elsewhere"))
        with pytest.raises(LockHeld, match=f"'m3tune run --root elsewhere' \\(pid {sleeper.pid} on "):
            Lock(local_root, "run", command="test").acquire()
        # a live holder on another machine (a shared folder) is judged by its lease, not by a pid here
        path.write_bytes(_lock_body(host="elsewhere.example", pid=sleeper.pid, ttl_s=60))
        with pytest.raises(LockHeld):
            Lock(local_root, "run", command="test").acquire()
        os.utime(path, (time.time() - 61, time.time() - 61))  # not renewed for longer than its lease
        with Lock(local_root, "run", command="test"):
            assert json.loads(path.read_text())["command"] == "test"
        path.parent.mkdir()  # the release removed the emptied _locks/
        path.write_bytes(_lock_body(pid=sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()
    with Lock(local_root, "run", command="after"):
        assert json.loads(path.read_text())["command"] == "after"
    assert not path.exists()


def test_two_local_takers_of_one_stale_lock_one_wins(local_root):
    path = local_root.path / "_locks" / "run.json"
    path.parent.mkdir(parents=True)
    stale = _lock_body(pid=2 ** 22 + 12345)  # above the kernel's pid_max: no such process
    path.write_bytes(stale)
    a, b = _backend(local_root, "_locks/run.json"), _backend(local_root, "_locks/run.json")
    assert a.read()[1] == b.read()[1] == stale
    assert a.replace(b"a", stale) == b"a"
    assert b.replace(b"b", stale) is None  # its condition (the bytes it read) no longer holds
    assert path.read_bytes() == b"a"


def test_step_locks_and_the_run_lock(local_root):
    with hold_step(local_root, "mine-negatives", shard=(0, 2), command="shard 0"):
        with hold_step(local_root, "mine-negatives", shard=(1, 2), command="shard 1"):  # an Argo fan-out
            with pytest.raises(LockHeld, match="'shard 0'"):
                with hold_step(local_root, "mine-negatives", shard=(0, 2), command="again"):
                    pass
    with hold_run(local_root, command="the run") as run:
        with pytest.raises(LockHeld, match="'the run'.*holds the run root"):
            with hold_step(local_root, "ingest", command="a step"):
                pass
        assert not (local_root.path / "_locks" / "step.ingest.json").exists()
        with run.step("ingest"):
            with pytest.raises(LockHeld, match="'the run'.*step.ingest lock"):
                Lock(local_root, step_lock_name("ingest"), command="x").acquire()
    with hold_step(local_root, "ingest", command="a step"):
        with pytest.raises(LockHeld, match="'a step'"):
            with hold_run(local_root, command="the run") as run:
                with run.step("ingest"):
                    pass
    assert not (local_root.path / "_locks").exists()


def test_a_waiting_step_goes_on_when_the_run_ends(local_root):
    run = Lock(local_root, "run", command="the run").acquire()
    threading.Timer(0.5, run.release).start()
    t0 = time.monotonic()
    with hold_step(local_root, "ingest", command="a step", wait_s=30):
        assert time.monotonic() - t0 >= 0.4


def test_only_the_first_process_of_a_launch_takes_the_lock():
    assert not launched_worker({})
    assert not launched_worker({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "8"})
    assert launched_worker({"LOCAL_RANK": "3", "RANK": "3", "WORLD_SIZE": "8"})
    assert launched_worker({"WORLD_SIZE": "2", "JOB_COMPLETION_INDEX": "1"})
    assert not launched_worker({"PET_NNODES": "2", "PET_NODE_RANK": "0"})
    assert not launched_worker({"RANK": "1"})  # one node: RANK alone launches nothing


# --- S3 (moto) -------------------------------------------------------------------------------------------------


def test_s3_lock_is_a_conditional_put_and_names_its_holder(s3_root):
    first = Lock(s3_root, "run", command="m3tune run --root s3 first").acquire()
    try:
        with pytest.raises(LockHeld, match="'m3tune run --root s3 first' \\(pid"):
            Lock(s3_root, "run", command="second").acquire()
        key = s3_root._key("_locks/run.json")
        body = s3_root.client.get_object(Bucket=s3_root.bucket, Key=key)["Body"].read()
        assert json.loads(body)["token"] == first.token
    finally:
        first.release()
    assert not s3_root.child("_locks").with_integrity(None).list()
    with Lock(s3_root, "run", command="second"):
        pass


def test_an_expired_s3_lock_is_taken_over_by_one_taker(s3_root):
    client, key = s3_root.client, s3_root._key("_locks/run.json")
    client.put_object(Bucket=s3_root.bucket, Key=key, Body=_lock_body(host="pod-gone", ttl_s=1))
    a, b = _backend(s3_root, "_locks/run.json"), _backend(s3_root, "_locks/run.json")
    assert b.create(b"b") is None  # If-None-Match: * on an existing lock
    time.sleep(2.2)  # LastModified and Date are whole seconds
    (_, etag_a, age), (_, etag_b, _) = a.read(), b.read()
    assert age > 1 and etag_a == etag_b
    assert a.replace(b"a", etag_a) is not None
    assert b.replace(b"b", etag_b) is None  # If-Match on the ETag both read: the second taker loses
    assert client.get_object(Bucket=s3_root.bucket, Key=key)["Body"].read() == b"a"
    client.put_object(Bucket=s3_root.bucket, Key=key, Body=_lock_body(host="pod-gone", ttl_s=1))
    time.sleep(2.2)
    with Lock(s3_root, "run", command="taker") as lock:
        assert json.loads(client.get_object(Bucket=s3_root.bucket, Key=key)["Body"].read())["token"] == lock.token


def test_an_s3_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(s3_root):
    # a step killed on this machine and rerun against S3 (test_executor's killed-step test) must not wait out
    # the 120 s lease: the pid tells, as on a local root; a live pid here is still refused
    client, key = s3_root.client, s3_root._key("_locks/step.ingest.json")
    dead = subprocess.Popen(["true"])
    dead.wait()
    client.put_object(Bucket=s3_root.bucket, Key=key, Body=_lock_body(pid=dead.pid, command="m3tune step ingest"))
    with Lock(s3_root, "step.ingest", command="rerun") as lock:
        assert json.loads(client.get_object(Bucket=s3_root.bucket, Key=key)["Body"].read())["token"] == lock.token
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        client.put_object(Bucket=s3_root.bucket, Key=key, Body=_lock_body(pid=sleeper.pid))
        with pytest.raises(LockHeld, match=f"pid {sleeper.pid} on "):
            Lock(s3_root, "step.ingest", command="rerun").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_s3_lease_is_renewed_while_held_and_a_lost_lease_stops_the_holder(s3_root):
    client, key = s3_root.client, s3_root._key("_locks/run.json")
    holder = Lock(s3_root, "run", command="long step", ttl_s=3).acquire()  # renewed every 0.75 s
    try:
        first = holder.version
        time.sleep(4.5)  # past one lease: only renewals keep it
        assert holder.version != first
        with pytest.raises(LockHeld, match="'long step'"):
            Lock(s3_root, "run", command="taker").acquire()
        # another process overwrites it (as a taker would after a stalled holder's lease ran out)
        client.put_object(Bucket=s3_root.bucket, Key=key, Body=_lock_body(host="other"))
        deadline = time.monotonic() + 10
        while not holder.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(LockLost, match="taken over"):
            holder.check()
    finally:
        holder.release()
    # the new holder's lock is not deleted by the one that lost it
    assert json.loads(client.get_object(Bucket=s3_root.bucket, Key=key)["Body"].read())["host"] == "other"


# --- Argo --------------------------------------------------------------------------------------------------------


def test_the_workflow_template_holds_a_mutex_named_after_the_root():
    from m3tune.deploy.argo import MUTEX, mutex_name, render_workflow_template

    spec = render_workflow_template()["spec"]
    assert spec["synchronization"] == {"mutexes": [{"name": MUTEX}]}
    assert MUTEX == "m3tune-{{=sprig.sha256sum(workflow.parameters.root)}}"
    root = "s3://m3tune-runs/runs/exp-01"
    assert mutex_name(root) == "m3tune-" + hashlib.sha256(root.encode()).hexdigest()
    from m3tune.deploy.pod import WAIT_LOCK_S
    from m3tune.runlock import TTL_S

    assert WAIT_LOCK_S > TTL_S  # a retried pod outwaits the lease of the pod it replaces
    tasks = [t for t in spec["templates"] if "container" in t]
    assert tasks and all("--wait-lock" in t["container"].get("args", t["container"].get("command", []))
                         for t in tasks)


@pytest.mark.parametrize("fields, problem", [
    ({"format": "other/1"}, "not m3tune-lock/1"), ({"pid": 0}, "field 'pid' is not a process id"),
    ({"pid": True}, "field 'pid'"), ({"ttl_s": float("nan")}, "field 'ttl_s'"), ({"ttl_s": -1}, "field 'ttl_s'"),
    ({"host": None}, "field 'host'")])
def test_a_lock_file_with_a_wrong_field_is_refused(local_root, fields, problem):
    path = local_root.path / "_locks" / "run.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(_lock_body(**fields))
    with pytest.raises(BadLock, match=f"run.json: not an m3tune lock .*{problem}"):
        Lock(local_root, "run", command="x").acquire()
    assert path.read_bytes() == _lock_body(**fields)  # left for the user to look at


def test_wait_lock_with_a_dry_run_is_an_error_not_ignored(tmp_path):
    # a dry run writes nothing and takes no lock, so a --wait-lock given with it would do nothing
    root = tmp_path / "runs" / "dry"
    ran = m3tune("step", "generate-queries", "--root", str(root), "--dry-run", "--wait-lock", "5")
    assert ran.returncode == 1 and "--wait-lock" in ran.stderr and "--dry-run" in ran.stderr
    assert not root.exists() or not (root / "_locks").exists()
