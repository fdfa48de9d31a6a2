"""The same run against a real S3 API (moto server on 127.0.0.1) gives identical outputs."""

import json
import os
import subprocess
import sys

from m3tune.manifest import read_manifest


def m3tune(*args, env):
    return subprocess.run([sys.executable, "-m", "m3tune.cli", *args], env=env, capture_output=True, text=True)


def test_full_run_on_s3_matches_local(full_ingest, s3_root, s3_endpoint):
    local, local_manifest = full_ingest
    env = {**os.environ, "M3TUNE_S3_ENDPOINT": s3_endpoint}

    first = m3tune("run", "--root", s3_root.uri, env=env)
    assert first.returncode == 0, first.stderr
    assert s3_root.uri in first.stdout

    s3_ingest, local_ingest = s3_root.child("ingest"), local.child("ingest")
    assert sorted(s3_ingest.list()) == sorted(local_ingest.list()) == ["NOTICE.md", "_manifest.json", "passages.jsonl"]
    for name in ("passages.jsonl", "NOTICE.md"):
        assert s3_ingest.read_bytes(name) == local_ingest.read_bytes(name), name
    s3_manifest = read_manifest(s3_ingest)
    assert s3_manifest.outputs == local_manifest.outputs
    assert s3_manifest.inputs == local_manifest.inputs
    assert s3_manifest.config_digest == local_manifest.config_digest

    second = m3tune("run", "--root", s3_root.uri, env=env)
    assert second.returncode == 0 and "skipped" in second.stdout
    assert read_manifest(s3_ingest) == s3_manifest

    status = m3tune("status", "--root", s3_root.uri, "--json", env=env)
    assert status.returncode == 0, status.stderr
    (ingest,) = json.loads(status.stdout)
    assert (ingest["step"], ingest["state"]) == ("ingest", "done")
    assert ingest["counts"]["by_source"]["quran"] == 6236


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
