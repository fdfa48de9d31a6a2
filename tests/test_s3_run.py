"""The same run against a real S3 API (moto server on 127.0.0.1) gives identical outputs."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import DEMO_CONFIG
from m3tune.manifest import read_manifest


def m3tune(*args, env):
    return subprocess.run([sys.executable, "-m", "m3tune.cli", *args], env=env, capture_output=True, text=True)


TIMINGS = ("seconds", "examples_per_s", "tokens_per_s", "queries_per_second")


def untimed(data: bytes, name: str) -> bytes:
    """The file without what measures time (throughput per training step, evaluation seconds): all else must match."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMINGS}
        return [strip(v) for v in value] if isinstance(value, list) else value

    if name.endswith(".jsonl") and any(t.encode() in data for t in TIMINGS):
        return b"\n".join(json.dumps(strip(json.loads(line))).encode() for line in data.splitlines())
    if name.endswith(".json") and any(t.encode() in data for t in TIMINGS):
        return json.dumps(strip(json.loads(data))).encode()
    if name.endswith("validation_curves.png"):  # two of its four panels plot throughput (examples/s, tokens/s)
        return b""
    if name.endswith(".md"):  # the report's timing table: rows of "| name | 0.1 / 0.0 / 0.0 | 123 |"
        return b"\n".join(line for line in data.splitlines() if not re.search(rb"\d / [\d.]+ / [\d.]+ \|", line))
    return data


@pytest.mark.slow
def test_full_run_on_s3_matches_local(full_run, s3_root, s3_endpoint):
    local, steps = full_run
    env = {**os.environ, "M3TUNE_S3_ENDPOINT": s3_endpoint}

    first = m3tune("run", "--root", s3_root.uri, "--config", str(DEMO_CONFIG), env=env)
    assert first.returncode == 0, first.stderr
    assert s3_root.uri in first.stdout

    timed_anywhere: set[str] = set()  # "step/file" of outputs that hold timings, as later steps' inputs name them
    for step in steps:
        s3_step, local_step = s3_root.child(step), local.child(step)
        names = sorted(s3_step.list())
        assert names == sorted(local_step.list()) and "_manifest.json" in names, step
        timed = set()
        for name in names:
            if name != "_manifest.json":
                local_bytes = local_step.read_bytes(name)
                if untimed(local_bytes, name) != local_bytes:
                    timed.add(name)
                assert untimed(s3_step.read_bytes(name), name) == untimed(local_bytes, name), f"{step}/{name}"
        s3_manifest, local_manifest = read_manifest(s3_step), read_manifest(local_step)
        assert ({k: v for k, v in s3_manifest.outputs.items() if k not in timed}
                == {k: v for k, v in local_manifest.outputs.items() if k not in timed}), step
        timed_anywhere.update(f"{step}/{name}" for name in timed)
        assert ({k: v for k, v in s3_manifest.inputs.items() if k not in timed_anywhere}
                == {k: v for k, v in local_manifest.inputs.items() if k not in timed_anywhere}), step
        assert s3_manifest.config_digest == local_manifest.config_digest, step
        assert s3_manifest.counts == local_manifest.counts, step

    second = m3tune("run", "--root", s3_root.uri, "--config", str(DEMO_CONFIG), env=env)
    assert second.returncode == 0 and second.stdout.count("skipped (done)") == len(steps)

    status = m3tune("status", "--root", s3_root.uri, "--config", str(DEMO_CONFIG), "--json", env=env)
    assert status.returncode == 0, status.stderr
    states = {s["step"]: s["state"] for s in json.loads(status.stdout)}
    assert states == {step: "done" for step in steps}
    assert json.loads(status.stdout)[0]["counts"]["by_source"]["quran"] == 6236


def test_s3_user_file_and_missing_bucket(s3_root, s3_endpoint, s3_bucket):
    s3_root.child("inputs").write_bytes("u.jsonl", '{"id": "x:1", "source": "hadith", "text": "نص"}\n'.encode())
    env = {**os.environ, "M3TUNE_S3_ENDPOINT": s3_endpoint}
    done = m3tune("step", "ingest", "--root", s3_root.uri, "--no-packaged",
                  "--user-file", s3_root.child("inputs").uri_of("u.jsonl"), env=env)
    assert done.returncode == 0, done.stderr
    assert s3_root.child("ingest").read_bytes("passages.jsonl").count(b"\n") == 1

    missing = m3tune("status", "--root", "s3://no-such-bucket-m3tune/runs/x", env=env)
    assert missing.returncode == 1
    assert "error:" in missing.stderr and "no-such-bucket-m3tune" in missing.stderr
