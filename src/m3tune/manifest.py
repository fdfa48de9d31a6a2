"""The `_manifest.json` a step publishes last: proof of what it did, from what.

A step whose manifest records the same config digest and input digests as
the ones it would run with now, and whose outputs all exist, is done and is
skipped. Input digests are taken from the upstream steps' manifests (the
sha256 of each file they published) and, for inputs outside the run, from
the files themselves (streamed through sha256 on every check: a user file is
read once more than the step needs) or the versions of the packages they come
from. Upstream data itself is never re-read to decide a skip.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from typing import Any, BinaryIO

from pydantic import BaseModel, Field, ValidationError

from m3tune.errors import BadInput
from m3tune.storage import Integrity, Store, StorageError

MANIFEST = "_manifest.json"


class OutputInfo(BaseModel):
    sha256: str
    bytes: int
    rows: int | None = None


class Manifest(BaseModel):
    step: str
    m3tune_version: str
    config: dict[str, Any]
    config_digest: str
    inputs: dict[str, str] = Field(description="input name -> digest, for the up-to-date check")
    outputs: dict[str, OutputInfo]
    counts: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    started_at: str
    finished_at: str
    seconds: float
    complete: bool = Field(default=True, description="false: outputs published, but a rerun has work left")
    incomplete_reason: str | None = None


def config_digest(config: BaseModel) -> str:
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


class _Recorded(dict):
    """A manifest's outputs: asking for a file it does not record is Tampered naming the manifest (every
    step's manifest records each file the step publishes; one without is edited), not a KeyError."""

    uri = step = ""

    def __missing__(self, name: str):
        raise Tampered(f"{self.uri}: tampered: records no {name!r}, which step {self.step!r} publishes; "
                       f"rerun that step with --force")


def _invalid(uri: str, error: ValidationError) -> "Tampered":
    first = error.errors(include_url=False)[0]
    field = ".".join(map(str, first["loc"])) or "(top)"
    return Tampered(f"{uri}: tampered: not a valid manifest: field '{field}': {first['msg']}; rerun its step "
                    "with --force")


def read_manifest(step_store: Store) -> Manifest | None:
    """The manifest in a step's folder, or None if the step has not finished there."""
    if not step_store.exists(MANIFEST):
        manifest = None
    else:
        uri = step_store.uri_of(MANIFEST)
        try:
            manifest = Manifest.model_validate_json(step_store.read_bytes(MANIFEST))
        except ValidationError as e:
            raise _invalid(uri, e) from None
        manifest.outputs = _Recorded(manifest.outputs)
        manifest.outputs.uri, manifest.outputs.step = uri, manifest.step
    if isinstance(step_store._integrity, RunIntegrity):  # what was just read is the freshest record
        step_store._integrity.remember(step_store._rel, manifest)
    return manifest


def write_manifest(step_store: Store, manifest: Manifest) -> None:
    step_store.write_bytes(MANIFEST, manifest.model_dump_json(indent=2).encode() + b"\n")


class Tampered(StorageError, BadInput):
    """A published file no longer has the bytes its manifest recorded: changed after its step finished
    (tampered with, or corrupted). Exit 4: rerunning the consumer reads the same bytes."""


def tampered_message(uri: str, manifest_uri: str, expected: str, actual: str, size: int, recorded: int) -> str:
    what = (f"sha256 {actual[:16]}…, the manifest recorded {expected[:16]}…" if size == recorded
            else f"{size:,} bytes, the manifest recorded {recorded:,}")
    return (f"{uri}: tampered: {what} ({manifest_uri}); the file changed after its step published it. "
            "Find out why, then rerun that step with --force")


class _VerifyingRaw(io.RawIOBase):
    """Hashes what is read from a published file; at its end, compares with the manifest's record."""

    def __init__(self, inner: BinaryIO, info: "OutputInfo", uri: str, manifest_uri: str):
        self._inner, self._info, self._uri, self._manifest_uri = inner, info, uri, manifest_uri
        self._hash, self._size, self.checked = hashlib.sha256(), 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._inner.readinto(buffer)
        if n:
            self._hash.update(memoryview(buffer)[:n])
            self._size += n
            if self._size > self._info.bytes:  # no need to read gigabytes more to know
                self._fail()
        elif not self.checked:
            self.finish()
        return n

    def _fail(self) -> None:
        raise Tampered(tampered_message(self._uri, self._manifest_uri, self._info.sha256, self._hash.hexdigest(),
                                        self._size, self._info.bytes))

    def finish(self) -> None:
        self.checked = True
        if self._size != self._info.bytes or self._hash.hexdigest() != self._info.sha256:
            self._fail()

    def drain(self) -> None:
        """Read what the consumer left, so that what it did read is known to be part of the published file."""
        while not self.checked:
            if not self.readinto(bytearray(1 << 20)):
                break

    def close(self) -> None:
        self._inner.close()
        super().close()


class _VerifiedReader(io.BufferedReader):
    """A buffered reader over _VerifyingRaw. Leaving a `with` block before the end reads the rest (verifying
    it): normally, so that a partial read is known to be of the published file; on an error (a malformed
    line), so that a tampered file is reported as tampered, its root cause. A generator closed early, an
    interrupt, or garbage collection just close."""

    def __exit__(self, kind, value, tb):
        try:
            if not self.closed and (kind is None or issubclass(kind, Exception)):
                try:
                    self.raw.drain()  # type: ignore[attr-defined]
                except Tampered as tampered:
                    if kind is None:
                        raise
                    raise tampered from value
                except Exception:
                    if kind is None:
                        raise  # otherwise the error being handled is the one to report
        finally:
            super().__exit__(kind, value, tb)


_CACHE_LOCK = threading.RLock()
# root URI -> {step folder (relative) -> its manifest, or None}: shared by every view of a root in this
# process, so a change made through one is seen by all.
_MANIFESTS: dict[str, dict[str, "Manifest | None"]] = {}


class RunIntegrity(Integrity):
    """The manifests of one run root, consulted for every read and change made through the root."""

    def __init__(self, root: Store):
        self._root = root.with_integrity(None)  # manifests themselves are read plainly
        self._cache = _MANIFESTS.setdefault(self._root.uri, {})
        self._guards: list[tuple[str, Any]] = []

    def _manifest(self, folder: str) -> "Manifest | None":
        with _CACHE_LOCK:
            if folder in self._cache:
                return self._cache[folder]
        manifest = read_manifest(self._root.child(folder))
        with _CACHE_LOCK:
            self._cache[folder] = manifest
        return manifest

    def remember(self, folder: str, manifest: "Manifest | None") -> None:
        with _CACHE_LOCK:
            self._cache[folder] = manifest

    def record_of(self, path: str) -> "tuple[OutputInfo, str] | None":
        """(what the outermost manifest above PATH recorded of it, that manifest's URI), or None.

        Outermost first: the step's own manifest decides for every file it records. A `_manifest.json` planted
        deeper (train/model/_manifest.json, vouching for edited weights) must not answer for them; the deeper
        ones (a shard's) only answer for files no manifest above records."""
        parts = path.split("/")
        for depth in range(1, len(parts)):
            folder, name = "/".join(parts[:depth]), "/".join(parts[depth:])
            manifest = self._manifest(folder)
            if manifest is not None and name in manifest.outputs:
                return manifest.outputs[name], self._root.child(folder).uri_of(MANIFEST)
        return None

    def reader(self, path: str, stream: BinaryIO, uri: str) -> BinaryIO:
        if path.rsplit("/", 1)[-1] == MANIFEST:
            return stream
        record = self.record_of(path)
        if record is None:
            return stream
        return _VerifiedReader(_VerifyingRaw(stream, record[0], uri, record[1]), buffer_size=1 << 20)  # type: ignore[return-value]

    def guard(self, folder: str, before_first_change) -> None:
        """Call BEFORE_FIRST_CHANGE once, before the first write or delete under FOLDER through this root."""
        self._guards.append((folder, before_first_change))

    def before_change(self, path: str) -> None:
        with _CACHE_LOCK:
            for folder in [f for f in self._cache if path == f or path.startswith(f + "/") or f.startswith(path + "/")]:
                del self._cache[folder]
            due = [g for g in self._guards if path.startswith(g[0] + "/")]
            self._guards = [g for g in self._guards if g not in due]
            for _, callback in due:  # under the lock: no other thread's write may overtake the withdrawal
                callback()


def published(root: Store, step: str, *, what: str) -> Manifest:
    """STEP's manifest in ROOT, or a clear error: what a step has not published (no manifest: never run, still
    running, or died half-way) must not be used as if it had, whatever files its folder holds."""
    from m3tune.errors import UserError

    manifest = read_manifest(root.child(step))
    if manifest is None:
        raise UserError(f"{what}: step {step!r} has not finished in {root.uri} (no {MANIFEST}); "
                        f"run it first (m3tune step {step} --root {root.uri})")
    if not manifest.complete:
        raise UserError(f"{what}: step {step!r} is incomplete in {root.uri} ({manifest.incomplete_reason}); "
                        "rerun it to finish")
    return manifest


def published_files(step_store: Store, manifest: Manifest, sub: str) -> list[str]:
    """The files under the folder SUB of a finished step, when its MANIFEST records each of them; Tampered
    naming one it does not. For a folder a library reads whole by path (a model folder handed to
    transformers): a file added behind the step's back (an added_tokens.json, a second weights file) is read
    by the library without any digest to check it against, so it must not be there at all."""
    folder = step_store.child(sub)
    names = folder.list()
    extra = [n for n in names if f"{sub}/{n}" not in manifest.outputs]
    if extra:
        raise Tampered(f"{folder.uri_of(extra[0])}: tampered: not published by its step ({len(extra)} file(s) "
                       f"in {folder.uri} that {step_store.uri_of(MANIFEST)} does not record). Find out why, "
                       "then remove them or rerun that step with --force")
    return names


def verify_files(folder: Store, names: list[str]) -> None:
    """Read each of NAMES in FOLDER through its run root once (verifying it against its manifest), for files
    a library will read by path itself (a model folder handed to transformers)."""
    for name in names:
        with folder.open_read(name) as f:
            while f.read(1 << 20):
                pass
