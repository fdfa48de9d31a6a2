import pytest

from m3tune.runroot import open_root
from m3tune.storage import StorageError, file_digest, open_store, run_root_uri, split_uri, validate_run_id


@pytest.mark.parametrize("run_id", ["..", ".", "../x", "a/b", "", "/abs", "-lead", "a\\b", "x" * 129, "a b", "..."])
def test_bad_run_ids_are_refused(run_id):
    with pytest.raises(StorageError, match="invalid run id"):
        validate_run_id(run_id)
    with pytest.raises(StorageError):
        run_root_uri("s3://bucket/runs", run_id)


@pytest.mark.parametrize("run_id", ["demo", "2026-11-27_a", "v2.1", "A"])
def test_good_run_ids(run_id):
    assert run_root_uri("s3://bucket/runs/", run_id) == f"s3://bucket/runs/{run_id}"


@pytest.mark.parametrize("uri", ["runs/../etc", "file:///tmp/runs/../x", "s3://bucket/runs/../x", "s3://bucket",
                                 "s3:///runs/x", "ftp://host/runs/x", "runs/bad id"])
def test_bad_roots_are_refused(uri):
    with pytest.raises(StorageError):
        open_root(uri)


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/etc/passwd", "", "a//b", "./x", "a\\..\\x"])
def test_paths_cannot_escape_the_root(any_root, rel):
    with pytest.raises(StorageError, match="invalid relative path"):
        any_root.write_bytes(rel, b"x")
    with pytest.raises(StorageError):
        any_root.child(rel)


def test_write_read_list_delete(any_root):
    w = any_root.write_bytes("step/a.txt", b"hello")
    assert (w.name, w.bytes) == ("step/a.txt", 5)
    assert any_root.read_bytes("step/a.txt") == b"hello"
    assert any_root.exists("step/a.txt") and not any_root.exists("step/b.txt")
    assert any_root.child("step").list() == ["a.txt"]
    assert any_root.size("step/a.txt") == 5
    assert file_digest(any_root, "step/a.txt") == w.sha256
    any_root.delete("step/a.txt")
    assert not any_root.exists("step/a.txt")
    with pytest.raises(StorageError, match="not found"):
        any_root.read_bytes("step/a.txt")


def test_failed_write_publishes_nothing_and_keeps_the_old_file(any_root):
    any_root.write_bytes("out.jsonl", b"old\n")
    with pytest.raises(RuntimeError):
        with any_root.open_write("out.jsonl") as f:
            f.write(b"new, half")
            raise RuntimeError("killed mid-write")
    assert any_root.read_bytes("out.jsonl") == b"old\n"
    assert any_root.list() == ["out.jsonl"]  # no temporary left behind


def test_large_streamed_read(any_root):
    data = b"".join(b'{"n": %d}\n' % i for i in range(200_000))
    any_root.write_bytes("big.jsonl", data)
    with any_root.open_read("big.jsonl") as f:
        assert sum(1 for _ in f) == 200_000


def test_split_uri(tmp_path, s3_bucket, s3_endpoint):
    store, name = split_uri(str(tmp_path / "x.jsonl"))
    assert (store.uri, name) == (tmp_path.as_uri(), "x.jsonl")
    store, name = split_uri(f"s3://{s3_bucket}/in/x.jsonl", s3_endpoint=s3_endpoint)
    assert (store.uri, name) == (f"s3://{s3_bucket}/in", "x.jsonl")
    assert open_store(f"file://{tmp_path}").uri == tmp_path.as_uri()


def test_printed_file_uris_work_as_input(tmp_path):
    root = open_root(str(tmp_path / "with space" / "runs" / "r1"))
    root.write_bytes("a.txt", b"x")
    assert "%20" in root.uri
    again = open_root(root.uri)
    assert again.read_bytes("a.txt") == b"x"
    store, name = split_uri(root.uri_of("a.txt"))
    assert store.read_bytes(name) == b"x"


def test_reading_a_folder_is_a_clear_error(tmp_path):
    (tmp_path / "d").mkdir()
    store, name = split_uri(str(tmp_path / "d"))
    with pytest.raises(StorageError, match="cannot read"):
        store.open_read(name)
