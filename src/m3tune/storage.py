"""Run storage: one folder abstraction over a local directory or an S3 prefix.

Every step reads and writes through a `Store`, so `file://` and `s3://` roots
behave the same. Writes are atomic: a local file is written under a hidden
temporary name in the same folder and renamed into place; an S3 object is
spooled to a local temporary file and sent with one upload, which S3 makes
visible only once complete. A killed writer therefore never leaves a
half-written file under its published name.

S3 goes through boto3 alone (not s3fs): s3fs pulls aiobotocore, which pins
botocore to a narrow range that fights boto3's own pin, and everything here
(streamed GET, atomic PUT, list, delete) is a few boto3 calls.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import io
import os
import re
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO
from urllib.parse import unquote, urlparse

from m3tune.errors import BadInput, UserError

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: `$` would take a final newline
TMP_MARK = ".tmp-"
S3_ENDPOINT_ENV = "M3TUNE_S3_ENDPOINT"


class StorageError(UserError):
    """A storage location is invalid or cannot be read or written."""


class NotFound(StorageError):
    """The file does not exist."""


class StorageFull(StorageError, BadInput):
    """The disk (or quota) is full. Exit 4: a rerun writes the same bytes into the same space, so it fails the
    same way until space is made or the limit raised; Argo must not retry it blindly."""


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _write_failed(where: object, e: OSError) -> StorageError:
    if e.errno in _FULL:
        return StorageFull(f"cannot write {where}: {e.strerror} (free space or raise the volume's limit, then rerun)")
    return StorageError(f"cannot write {where}: {e.strerror or e}")


def validate_run_id(run_id: str) -> str:
    """A run id is one path segment of letters, digits, '.', '_' or '-', not '.' or '..'."""
    if not RUN_ID_PATTERN.fullmatch(run_id or ""):
        raise StorageError(
            f"invalid run id {run_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..')"
        )
    return run_id


def check_relative(rel: str, *, where: str = "") -> str:
    """REL if it is a name that stays inside its folder, else StorageError.

    The one check for every name that comes from a run root (a listing, a manifest, checkpoints/latest.json,
    a journal) or a user, made before anything touches the filesystem: a tampered bucket must not be able to
    name a path outside the folder it is joined to. Refused: '..', '.', empty segments (so no absolute path),
    backslashes, NUL and other control characters (names S3 accepts but no local path should hold).
    """
    parts = rel.split("/") if isinstance(rel, str) else [""]
    if (any(p in ("..", ".", "") for p in parts) or "\\" in rel
            or any(ord(c) < 32 or c == "\x7f" for c in rel)):
        raise StorageError(f"{where + ': ' if where else ''}invalid relative path {rel!r}: "
                           "it must stay inside the run root (no '..', '.', empty segments or absolute paths)")
    return rel


class NotAFile(StorageError):
    """A path to read names a pipe, a device or a socket (exit 1, as a folder or a missing file is)."""


def open_regular(path: Path) -> BinaryIO:
    """PATH opened for reading, if it is a regular file. Opened without blocking and checked on the open file:
    a named pipe (planted in a run root, or given as an input) blocks an ordinary open until a writer comes,
    and a check before the open could be raced."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise NotFound(f"not found: {path}") from None
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise StorageError(f"cannot read {path}: Is a directory")
        if not stat.S_ISREG(mode):
            raise NotAFile(f"cannot read {path}: not a regular file (a pipe, device or socket); give a file")
        os.set_blocking(fd, True)  # reads of the file itself block as usual
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def local_path(base: str | os.PathLike, rel: str, *, where: str = "") -> Path:
    """BASE/REL on this machine, REL checked first (check_relative): the only way a name read from a run root
    becomes a local path (to write, copy or remove)."""
    return Path(base) / check_relative(rel, where=where)


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


def run_root_uri(runs: str, run_id: str) -> str:
    """The root URI of run RUN_ID under the runs location RUNS."""
    validate_run_id(run_id)
    return runs.rstrip("/") + "/" + run_id


@dataclass
class WrittenFile:
    """What a finished atomic write published."""

    name: str
    sha256: str
    bytes: int


class _HashingWriter(io.RawIOBase):
    """A write-only binary stream that hashes and counts what passes through."""

    def __init__(self, target: IO[bytes]):
        self._target = target
        self._hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        self._hash.update(data)
        self.size += len(data)
        return self._target.write(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


class Integrity(ABC):
    """What a run root knows about its published files (m3tune.manifest.RunIntegrity, attached by
    m3tune.runroot): every read of one is checked against the sha256 its step's manifest recorded, and every
    change under a step's folder is announced first (so a manifest is withdrawn before what it vouches for
    changes). Storage defines only this hook: it knows nothing of manifests."""

    @abstractmethod
    def reader(self, path: str, stream: BinaryIO, uri: str) -> BinaryIO:
        """STREAM over the file PATH (relative to the run root), verified if a manifest records it."""

    @abstractmethod
    def before_change(self, path: str) -> None:
        """PATH (relative to the run root) is about to be written or deleted."""


class Store(ABC):
    """A folder: a local directory or an S3 prefix. Paths inside are '/'-separated.

    A run root (m3tune.runroot.open_root) carries an Integrity, passed on to its sub-folders: reads of
    published files are verified while they are read, whichever step or command reads them."""

    uri: str
    _integrity: Integrity | None = None
    _rel: str = ""  # this folder's path inside the run root, when it has an Integrity

    def child(self, rel: str) -> "Store":
        """The sub-folder REL."""
        rel = check_relative(rel)
        sub = self._child(rel)
        sub._integrity, sub._rel = self._integrity, _join(self._rel, rel)
        return sub

    def with_integrity(self, integrity: Integrity | None) -> "Store":
        """This folder as the root of a run whose reads and writes go through INTEGRITY (and, on local disk,
        stay inside it: LocalStore._inside)."""
        view = copy.copy(self)
        view._integrity, view._rel = integrity, ""
        if isinstance(view, LocalStore) and view._top is None:  # RunIntegrity's plain view of the root too
            view._top = view.path
        return view

    def open_read(self, rel: str) -> BinaryIO:
        """A binary stream over REL; StorageError if it does not exist (Tampered, on reading it, if it is a
        published file whose bytes are not the ones its manifest recorded)."""
        stream = self._open_read(check_relative(rel))
        if self._integrity is None:
            return stream
        return self._integrity.reader(_join(self._rel, rel), stream, self.uri_of(rel))

    def delete(self, rel: str) -> None:
        """Delete REL if it exists."""
        check_relative(rel)
        if self._integrity is not None:
            self._integrity.before_change(_join(self._rel, rel))
        self._delete(rel)

    @abstractmethod
    def _child(self, rel: str) -> "Store":
        """The sub-folder REL (checked)."""

    @abstractmethod
    def _open_read(self, rel: str) -> BinaryIO:
        """A binary stream over REL (checked)."""

    @abstractmethod
    def _delete(self, rel: str) -> None:
        """Delete REL (checked) if it exists."""

    @abstractmethod
    def exists(self, rel: str) -> bool:
        """Whether the file REL exists."""

    @abstractmethod
    def size(self, rel: str) -> int:
        """The size of REL in bytes."""

    @abstractmethod
    def list(self) -> list[str]:
        """Names of the files directly or indirectly under this folder, relative to it."""

    @abstractmethod
    def _publish(self, rel: str, durable: bool = True) -> AbstractContextManager[IO[bytes]]:
        """A context giving a binary file that becomes REL only if the block succeeds.

        DURABLE also survives a machine crash (fsync); without it, a killed
        process still never leaves a partial file, and writing is cheaper.
        """

    @contextmanager
    def open_write(self, rel: str, *, durable: bool = True) -> Iterator[_HashingWriter]:
        """Write REL atomically. On error nothing is published; `writer.result` tells what was."""
        rel = check_relative(rel)
        if self._integrity is not None:
            self._integrity.before_change(_join(self._rel, rel))
        try:
            with self._publish(rel, durable) as raw:
                writer = _HashingWriter(raw)
                yield writer
        except OSError as e:
            if e.errno not in _FULL:
                raise
            raise _write_failed(self.uri_of(rel), e) from None
        writer.result = WrittenFile(rel, writer.sha256, writer.size)  # type: ignore[attr-defined]

    def read_bytes(self, rel: str) -> bytes:
        with self.open_read(rel) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> WrittenFile:
        with self.open_write(rel) as w:
            w.write(data)
        return w.result  # type: ignore[attr-defined]

    def uri_of(self, rel: str) -> str:
        return self.uri.rstrip("/") + "/" + check_relative(rel)

    def clean_temporaries(self) -> int:
        """Remove temporary files a killed writer left behind; return how many."""
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class LocalStore(Store):
    # The run root this folder belongs to, when it is one (set by with_integrity): every path used under it
    # must resolve inside it. check_relative stops '..' in a name, not a symbolic link planted in the root
    # ('train/checkpoints' -> $HOME), through which a listing and its deletes, or a write, would reach out.
    _top: Path | None = None

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).absolute()
        self.uri = self.path.as_uri()

    def _child(self, rel: str) -> "LocalStore":
        sub = LocalStore(local_path(self.path, rel))
        sub._top = self._top
        return sub

    def _inside(self, path: Path) -> Path:
        """PATH, if it resolves (symbolic links followed) inside this folder's run root; else StorageError."""
        if self._top is not None:
            top, real = os.path.realpath(self._top), os.path.realpath(path)
            if real != top and not real.startswith(top.rstrip(os.sep) + os.sep):
                raise StorageError(f"{path}: a symbolic link leads outside the run root {self._top} (to {real}); "
                                   "remove it")
        return path

    def _file(self, rel: str) -> Path:
        return self._inside(local_path(self.path, rel))

    def _open_read(self, rel: str) -> BinaryIO:
        return open_regular(self._file(rel))

    def exists(self, rel: str) -> bool:
        return self._file(rel).is_file()

    def size(self, rel: str) -> int:
        return self._file(rel).stat().st_size

    def list(self) -> list[str]:
        if not self._inside(self.path).is_dir():
            return []
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*")
                      if p.is_file() and self._inside(p))

    def _delete(self, rel: str) -> None:
        self._file(rel).unlink(missing_ok=True)

    @contextmanager
    def _publish(self, rel: str, durable: bool = True) -> Iterator[IO[bytes]]:
        final = self._file(rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def clean_temporaries(self) -> int:
        if not self._inside(self.path).is_dir():
            return 0
        stale = [p for p in self.path.rglob(f".*{TMP_MARK}*") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client=None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = client

    @property
    def client(self):
        if self._client is None:
            import boto3  # lazy: local runs never pay for it

            self._client = boto3.client("s3", endpoint_url=self.endpoint_url)
        return self._client

    def _key(self, rel: str) -> str:
        rel = check_relative(rel)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _child(self, rel: str) -> "S3Store":
        return S3Store(self.bucket, self._key(rel), endpoint_url=self.endpoint_url, client=self._client)

    def _call(self, what: str, fn, **kw):
        from botocore.exceptions import BotoCoreError, ClientError

        where = f"s3://{self.bucket}/{kw.get('Key', kw.get('Prefix', ''))}"
        try:
            return fn(Bucket=self.bucket, **kw)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"not found: {where}") from None
            raise StorageError(f"S3 {what} {where} failed: {e}") from None
        except BotoCoreError as e:
            raise StorageError(f"S3 {what} {where} failed: {e}") from None

    def _open_read(self, rel: str) -> BinaryIO:
        body = self._call("GET", self.client.get_object, Key=self._key(rel))["Body"]
        # A buffered reader over the streaming body gives line iteration
        # without loading the object into memory.
        return io.BufferedReader(_StreamingRaw(body), buffer_size=1 << 20)  # type: ignore[return-value]

    def exists(self, rel: str) -> bool:
        try:
            self._call("HEAD", self.client.head_object, Key=self._key(rel))
            return True
        except NotFound:
            return False

    def size(self, rel: str) -> int:
        return self._call("HEAD", self.client.head_object, Key=self._key(rel))["ContentLength"]

    def list(self) -> list[str]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        names: list[str] = []
        token = None
        while True:
            kw = {"Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self._call("LIST", self.client.list_objects_v2, **kw)
            # Keys are whatever a bucket writer chose ('a/../../x', '/abs'): every use of a listed name
            # goes through check_relative before it touches anything.
            names += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(names)
            token = page["NextContinuationToken"]

    def _delete(self, rel: str) -> None:
        self._call("DELETE", self.client.delete_object, Key=self._key(rel))

    @contextmanager
    def _publish(self, rel: str, durable: bool = True) -> Iterator[IO[bytes]]:
        # Spool locally, then one upload: S3 shows the object only when the
        # upload completes, so readers never see a partial file.
        with tempfile.TemporaryFile(prefix="m3tune-s3-") as f:
            yield f
            f.seek(0)
            self._call("PUT", lambda **kw: self.client.upload_fileobj(f, kw["Bucket"], kw["Key"]), Key=self._key(rel))


class _StreamingRaw(io.RawIOBase):
    """Adapts botocore's StreamingBody to a raw stream for io.BufferedReader."""

    def __init__(self, body):
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


def open_store(uri: str, *, s3_endpoint: str | None = None) -> Store:
    """The store at URI: 's3://bucket/prefix', 'file:///abs/path' or a plain path."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"invalid S3 URI {uri!r}: expected s3://bucket/prefix")
        if parsed.query or parsed.fragment or parsed.params or "?" in uri or "#" in uri:
            # urlparse would drop them silently and run somewhere else than the URI says
            raise StorageError(f"invalid S3 URI {uri!r}: no '?', '#' or ';' parts")
        path = parsed.path[1:] if parsed.path.startswith("/") else parsed.path
        prefix = path[:-1] if path.endswith("/") else path  # one trailing '/' is a folder's usual spelling
        # 'runs//x' is another key than 'runs/x' on S3: accepting it would run beside the real run, not in it
        if prefix and any(p in ("..", ".", "") for p in prefix.split("/")):
            raise StorageError(f"invalid S3 URI {uri!r}: '..', '.' and empty ('//') segments are not allowed")
        endpoint = s3_endpoint or os.environ.get(S3_ENDPOINT_ENV) or None
        return S3Store(parsed.netloc, prefix, endpoint_url=endpoint)
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"invalid file URI {uri!r}: use file:///absolute/path")
        path = unquote(parsed.path)  # as_uri() percent-encodes; printed URIs must work as input
    elif "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use file://, s3:// or a path")
    else:
        path = uri
    # Checked on the text, not on Path(path).parts: pathlib drops '.' segments, so 'runs/x/.' would become
    # 'runs/x' and 'runs/.' the runs folder itself.
    parts = path.replace("\\", "/").split("/")
    if ".." in parts or "." in parts[1:]:  # a leading './' only names the current folder
        raise StorageError(f"invalid path {uri!r}: '..' and '.' segments are not allowed in a run location")
    return LocalStore(path)


def split_uri(uri: str, *, s3_endpoint: str | None = None) -> tuple[Store, str]:
    """A file URI or path as (store of its folder, file name), for inputs outside a run."""
    if uri.startswith("s3://"):
        parent, _, name = uri.rstrip("/").rpartition("/")
        if parent == "s3:/" or not name:
            raise StorageError(f"invalid S3 object URI {uri!r}: expected s3://bucket/key")
        return open_store(parent, s3_endpoint=s3_endpoint), name
    store_path = Path(unquote(urlparse(uri).path) if uri.startswith("file://") else uri).absolute()
    return LocalStore(store_path.parent), store_path.name


def absolute_uri(uri: str) -> str:
    """URI unchanged when it has a scheme; a plain path made absolute (as a path, not a file:// URI)."""
    if "://" in uri:
        return uri
    return str(Path(uri).absolute())


def write_local(path: str | os.PathLike, data: bytes) -> None:
    """Write DATA to the local file PATH (a report the user asked for by path), naming PATH on failure."""
    try:
        Path(path).write_bytes(data)
    except OSError as e:
        raise _write_failed(path, e) from None


def file_digest(store: Store, rel: str) -> str:
    """sha256 of a stored file, streamed."""
    h = hashlib.sha256()
    with store.open_read(rel) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def upload_folder(local: Path, store: Store, *, remove_others: bool = False) -> dict[str, "WrittenFile"]:
    """Publish every file under the local folder LOCAL into STORE (each atomically, streamed), by relative name.

    REMOVE_OTHERS: then delete what STORE holds that LOCAL does not (a model folder republished must not
    keep a file of an earlier model, such as a head the new base lacks)."""
    import shutil

    written: dict[str, WrittenFile] = {}
    for f in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        rel = f.relative_to(local).as_posix()
        with store.open_write(rel) as w, open(f, "rb") as src:
            shutil.copyfileobj(src, w, 1 << 20)
        written[rel] = w.result  # type: ignore[attr-defined]
    if remove_others:
        for rel in store.list():
            if rel not in written:
                store.delete(rel)
    return written


def download_folder(store: Store, local: Path, *, names: list[str] | None = None) -> list[str]:
    """Copy every file under STORE (or only NAMES) into the local folder LOCAL (streamed: model weights can
    be gigabytes)."""
    import shutil

    names = store.list() if names is None else names
    # every name first, before the first folder is made: a listing of a tampered bucket creates nothing
    targets = [local_path(local, rel, where=store.uri) for rel in names]
    for rel, dest in zip(names, targets):
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with store.open_read(rel) as src, open(dest, "wb") as w:
                shutil.copyfileobj(src, w, 1 << 20)
        except OSError as e:
            raise _write_failed(dest, e) from None
    return names
