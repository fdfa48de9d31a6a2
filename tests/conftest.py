"""Shared fixtures: run roots on local disk and on a real S3 API (moto server on 127.0.0.1)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from m3tune.runroot import open_root
from m3tune.storage import LocalStore, S3Store

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers (pytest-xdist) on a 2-core machine: one thread each, in the workers and in
    # the m3tune processes they start, rather than four threads fighting over two cores. Every process of a
    # test then computes with the same thread count, so results that must match bit for bit still do.
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks to name the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the tests that read the session's demo run go to one worker, which builds it once
    (a session fixture is built per worker)."""
    for item in items:
        if {"full_run", "full_ingest"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("full_run"))


DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@pytest.fixture(scope="session", autouse=True)
def m3tune_cache(tmp_path_factory):
    """A cache folder of the session's own (tiny model, embeddings, local Qdrant), inherited by subprocesses."""
    path = tmp_path_factory.mktemp("m3tune-cache")
    os.environ["M3TUNE_CACHE"] = str(path)
    return path


def demo_configs():
    from m3tune.cli import load_run_config

    return load_run_config(DEMO_CONFIG)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on loopback, for the whole session."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    import boto3

    name = f"m3tune-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def local_root(tmp_path) -> LocalStore:
    return open_root(str(tmp_path / "runs" / "test-run"))  # type: ignore[return-value]


@pytest.fixture
def s3_root(s3_bucket, s3_endpoint) -> S3Store:
    return open_root(f"s3://{s3_bucket}/prefix/runs/test-run", s3_endpoint=s3_endpoint)  # type: ignore[return-value]


@pytest.fixture(params=["local", "s3"])
def any_root(request):
    """The same test against a local folder and against S3."""
    return request.getfixturevalue(f"{request.param}_root")


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
    """The whole pipeline on embedded defaults (what `make demo-tiny` runs), once, shared by tests that read it."""
    from m3tune.executor import run_pipeline

    root = open_root(str(tmp_path_factory.mktemp("full") / "runs" / "full"))
    ran = run_pipeline(root, demo_configs())
    assert all(did for _, did in ran)
    return root, [name for name, _ in ran]


@pytest.fixture(scope="session")
def full_ingest(full_run):
    """The whole packaged corpus ingested (part of full_run): (root, ingest manifest)."""
    from m3tune.manifest import read_manifest

    root, _ = full_run
    return root, read_manifest(root.child("ingest"))
