"""One writer per run root: lock files in ROOT/_locks/, taken with a create-if-absent write.

`m3tune run` holds `run.json` for the whole run and, as it reaches each step, that step's lock; `m3tune step
NAME` holds `step.NAME.json` (a shard `step.NAME.R-of-N.json`, so an Argo fan-out's pods run side by side) and
is refused while a run holds the root. So no two processes write one step folder, and nothing writes beside a
run. Argo adds a workflow mutex on the root (deploy/argo.py): a second workflow waits instead of failing.

A lock is a small JSON file naming its holder (host, pid, command, start) with a lease (`ttl_s`) that a
heartbeat thread renews every ttl/4: a step runs for hours (train), and a lease refreshed only at step
boundaries would expire under it. Taking over a stale lock is a conditional write too, so of two takers one
wins:

- local root: created with a hard link of a complete temporary file (atomic like O_CREAT|O_EXCL, and no
  reader ever sees a half-written lock); on the same host a holder whose pid is dead is stale, on another
  host (a shared folder) one whose file was not renewed within its lease; a takeover or renewal holds
  flock on the file it read and replaces it only if it is still that file with those bytes;
- S3 root: PUT with If-None-Match: * creates it; a lock of this host whose pid is dead, or one of another
  host whose LastModified is older than its lease (by the server's clock: its Date header), is stale, and replaced with If-Match on the ETag read; the holder renews
  and deletes it with If-Match on its own ETag, so a holder that lost its lease cannot remove the new one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Iterator

from m3tune.errors import BadInput, UserError
from m3tune.storage import LocalStore, S3Store, Store

log = logging.getLogger("m3tune")

LOCKS = "_locks"
RUN = "run"
TTL_S = 120.0
FORMAT = "m3tune-lock/1"
_HELD: set[str] = set()  # tokens of the locks this process holds: its pid alone does not tell them from a past life's


class LockHeld(UserError):
    """Another live process holds the lock."""


class LockLost(UserError):
    """This process's lease expired and another process took the lock over."""


class BadLock(BadInput):
    """A lock file that is not one m3tune wrote."""


def step_lock_name(step: str, shard: tuple[int, int] | None = None) -> str:
    return f"step.{step}" + (f".{shard[0]:05d}-of-{shard[1]:05d}" if shard else "")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class _Local:
    """A lock file on local disk. VERSION: the bytes read (the holder rewrites them at every renewal)."""

    def __init__(self, store: LocalStore, rel: str):
        self.path = store._file(rel)
        self.uri = store.uri_of(rel)

    def create(self, body: bytes) -> bytes | None:
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                tmp = self._temp(body)
                try:
                    os.link(tmp, self.path)  # fails if the lock exists: create-if-absent, the content in place
                finally:
                    os.unlink(tmp)
            except FileExistsError:
                return None
            except FileNotFoundError:  # _locks/ removed by a holder's release meanwhile: make it again
                continue
            return body

    def _temp(self, body: bytes) -> str:
        tmp = str(self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:12]}"))
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def read(self) -> tuple[bytes, bytes, float] | None:
        """(content, version, age in seconds of the last write), or None when there is no lock."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
                age = time.time() - os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return data, data, age

    @contextmanager
    def _if_still(self, version: bytes) -> Iterator[bool]:
        """True (flock held) when the lock file is still the one whose bytes were VERSION."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another taker is at it: it wins, this one reads again
                yield False
                return
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            with os.fdopen(os.dup(fd), "rb") as f:
                yield same and f.read() == version
        finally:
            os.close(fd)

    def replace(self, body: bytes, version: bytes) -> bytes | None:
        with self._if_still(version) as ok:
            if not ok:
                return None
            os.replace(self._temp(body), self.path)  # a new inode: a taker holding the old one sees the change
            return body

    def delete(self, version: bytes) -> bool:
        with self._if_still(version) as ok:
            if ok:
                self.path.unlink()
                try:
                    self.path.parent.rmdir()  # the last lock gone: no empty _locks/ left in the run root
                except OSError:
                    pass
            return ok

    def stale(self, holder: dict, age: float) -> bool:
        return _stale(holder, age)


def _stale(holder: dict, age: float) -> bool:
    """Whether HOLDER's lock (AGE seconds since its last renewal) may be taken over. On this host its pid tells
    at once, whatever the root (a step killed on a laptop and rerun against S3 must not wait out the lease);
    on another host only its lease can."""
    if holder["host"] == socket.gethostname():
        if holder["pid"] == os.getpid():  # ours, or an earlier life's (pid 1 of a restarted container)
            return holder["token"] not in _HELD
        return not _pid_alive(holder["pid"])
    return age > holder["ttl_s"]


class _S3:
    """A lock object on S3. VERSION: its ETag."""

    def __init__(self, store: S3Store, rel: str):
        self.store, self.key = store, store._key(rel)
        self.uri = store.uri_of(rel)

    def _conditional(self, what: str, call, **kw) -> dict | None:
        """CALL's response, or None when its condition failed: 412, 409 (a concurrent conditional write
        won), 404 (deleted meanwhile). Any other failure is a StorageError naming the lock."""
        from botocore.exceptions import BotoCoreError, ClientError

        from m3tune.storage import StorageError

        try:
            return call(Bucket=self.store.bucket, Key=self.key, **kw)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                            "NoSuchKey", "404"):
                return None
            raise StorageError(f"S3 {what} {self.uri} failed: {e}") from None
        except BotoCoreError as e:
            raise StorageError(f"S3 {what} {self.uri} failed: {e}") from None

    def create(self, body: bytes) -> str | None:
        resp = self._conditional("PUT", self.store.client.put_object, Body=body, IfNoneMatch="*")
        return resp and resp["ETag"]

    def replace(self, body: bytes, version: str) -> str | None:
        resp = self._conditional("PUT", self.store.client.put_object, Body=body, IfMatch=version)
        return resp and resp["ETag"]

    def read(self) -> tuple[bytes, str, float] | None:
        resp = self._conditional("GET", self.store.client.get_object)
        if resp is None:
            return None
        data = resp["Body"].read()
        # The server's clock on both sides (LastModified, the response's Date): skew between the holder's
        # clock and this machine's does not matter.
        date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date) if date else _now()
        return data, resp["ETag"], (now - resp["LastModified"]).total_seconds()

    def delete(self, version: str) -> bool:
        return self._conditional("DELETE", self.store.client.delete_object, IfMatch=version) is not None

    def stale(self, holder: dict, age: float) -> bool:
        return _stale(holder, age)


def _backend(root: Store, rel: str):
    if isinstance(root, LocalStore):
        return _Local(root, rel)
    if isinstance(root, S3Store):
        return _S3(root, rel)
    raise TypeError(f"no lock for a {type(root).__name__}")


def _parse(data: bytes, uri: str) -> dict:
    try:
        holder = json.loads(data.decode("utf-8"))
        if not isinstance(holder, dict) or holder.get("format") != FORMAT:
            raise ValueError(f"not {FORMAT}")
        for field, kind in (("host", str), ("pid", int), ("command", str), ("started", str), ("token", str),
                            ("ttl_s", (int, float))):
            if not isinstance(holder.get(field), kind) or isinstance(holder.get(field), bool):
                raise ValueError(f"field {field!r} missing or of the wrong type")
        if not (math.isfinite(holder["ttl_s"]) and holder["ttl_s"] > 0):  # NaN and Infinity parse: never stale
            raise ValueError("field 'ttl_s' is not a positive number")
        if not 0 < holder["pid"] < 2 ** 31:  # 0 and -1 would signal process groups when checked
            raise ValueError("field 'pid' is not a process id")
    except (UnicodeDecodeError, ValueError) as e:
        raise BadLock(f"{uri}: not an m3tune lock ({e}); if no m3tune process is writing this run, delete the "
                      "file and rerun") from None
    return holder


def describe(holder: dict) -> str:
    return (f"'{holder['command']}' (pid {holder['pid']} on {holder['host']}, since {holder['started']}, "
            f"lease {holder['ttl_s']:g} s)")


class Lock:
    """The lock NAME of ROOT (ROOT/_locks/NAME.json), held from acquire() to release(); a context manager."""

    def __init__(self, root: Store, name: str, *, command: str, ttl_s: float = TTL_S, wait_s: float = 0.0):
        self.root, self.name, self.command, self.ttl_s, self.wait_s = root, name, command, ttl_s, wait_s
        self.backend = _backend(root.with_integrity(None), f"{LOCKS}/{name}.json")
        self.uri = self.backend.uri
        self.token = uuid.uuid4().hex
        self.started = _now().isoformat(timespec="seconds")
        self.version = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"format": FORMAT, "host": socket.gethostname(), "pid": os.getpid(),
                           "command": self.command, "started": self.started,
                           "renewed": _now().isoformat(timespec="seconds"), "ttl_s": self.ttl_s,
                           "token": self.token}, indent=1).encode() + b"\n"

    def holder(self) -> dict | None:
        """The live holder of this lock (another process), or None when it is free or stale."""
        found = self.backend.read()
        if found is None:
            return None
        holder = _parse(found[0], self.uri)
        return None if holder["token"] == self.token or self.backend.stale(holder, found[2]) else holder

    def _try(self) -> dict | None:
        """Take the lock (None), or the holder that has it."""
        while True:
            body = self._body()
            self.version = self.backend.create(body)
            if self.version is not None:
                return None
            found = self.backend.read()
            if found is None:
                continue  # released between the two calls: create again
            data, version, age = found
            holder = _parse(data, self.uri)
            if not self.backend.stale(holder, age):
                return holder
            self.version = self.backend.replace(body, version)
            if self.version is not None:
                log.warning("took over the stale lock %s of %s", self.uri, describe(holder))
                return None
            # another taker won; read again to name it

    def acquire(self) -> "Lock":
        deadline = time.monotonic() + self.wait_s
        said = False
        while True:
            holder = self._try()
            if holder is None:
                _HELD.add(self.token)
                break
            if time.monotonic() >= deadline:
                raise LockHeld(self._held_message(holder))
            if not said:
                log.info("waiting up to %.0f s for %s, held by %s", self.wait_s, self.uri, describe(holder))
                said = True
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._renew, name=f"m3tune-lock-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _held_message(self, holder: dict) -> str:
        what = "the run root" if self.name == RUN else f"its {self.name} lock"
        return (f"{self.root.uri} is being written by {describe(holder)}, which holds {what} ({self.uri}); let it "
                "finish, or pass --wait-lock SECONDS to wait for it. A holder that died on another machine is "
                "taken over once its lease runs out")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                version = self.backend.replace(self._body(), self.version)
                if version is None:
                    found = self.backend.read()
                    # still ours: another process held the file's flock a moment (a taker backing off)
                    version = self.version if found is not None and found[1] == self.version else None
            except Exception as e:  # a network blip: the next beat tries again, the lease covers 3 misses
                log.warning("could not renew %s: %s", self.uri, e)
                continue
            if version is None:
                log.error("lost the lock %s: another process took it over (this one was not renewing it); "
                          "stopping at the next step boundary", self.uri)
                self.lost.set()
                return
            self.version = version

    def check(self) -> None:
        """Raise LockLost when another process took the lock over (called where stopping is safe)."""
        if self.lost.is_set():
            raise LockLost(f"{self.uri}: the lock was taken over by another process while this one held it; "
                           "stopped. Check `m3tune status` before rerunning")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.version is not None and not self.lost.is_set():
            try:
                if not self.backend.delete(self.version):
                    log.warning("%s was no longer this process's lock; left as it is", self.uri)
            except UserError as e:  # the work is done: a lock left behind expires with its lease
                log.warning("could not remove %s (%s); it is taken over once its lease runs out", self.uri, e)
        self.version = None
        _HELD.discard(self.token)

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def launched_worker(env=os.environ) -> bool:
    """True in a process other than the first of a multi-process launch (`accelerate launch ... m3tune step
    train`, the pods of a multi-node job; the rules of training.step): the first holds the lock for all."""
    if "LOCAL_RANK" in env:
        rank = env.get("RANK", "0")
    elif int(env.get("PET_NNODES") or env.get("WORLD_SIZE") or "1") > 1:
        rank = env.get("PET_NODE_RANK") or env.get("JOB_COMPLETION_INDEX") or env.get("RANK") or "0"
    else:
        return False
    return rank != "0"


def command_line() -> str:
    return " ".join(["m3tune", *sys.argv[1:]])[:300]


@contextmanager
def hold_step(root: Store, step: str, *, shard: tuple[int, int] | None = None, command: str,
              wait_s: float = 0.0, ttl_s: float = TTL_S) -> Iterator[Lock | None]:
    """`m3tune step`: the step's (or shard's) lock, refused while a run holds the root."""
    if launched_worker():
        yield None
        return
    with Lock(root, step_lock_name(step, shard), command=command, wait_s=wait_s, ttl_s=ttl_s) as lock:
        run = Lock(root, RUN, command=command, wait_s=0.0)
        deadline = time.monotonic() + wait_s
        while (holder := run.holder()) is not None:  # taken after the step's own: see the module's docstring
            if time.monotonic() >= deadline:
                raise LockHeld(run._held_message(holder))
            time.sleep(1.0)
        yield lock
        lock.check()


class RunHold:
    """`m3tune run`: the root's lock, and the lock of each step as the run reaches it."""

    def __init__(self, lock: Lock):
        self.lock = lock

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.lock.check()
        with Lock(self.lock.root, step_lock_name(name), command=self.lock.command, wait_s=self.lock.wait_s,
                  ttl_s=self.lock.ttl_s):
            yield
        self.lock.check()


@contextmanager
def hold_run(root: Store, *, command: str, wait_s: float = 0.0, ttl_s: float = TTL_S) -> Iterator[RunHold]:
    with Lock(root, RUN, command=command, wait_s=wait_s, ttl_s=ttl_s) as lock:
        yield RunHold(lock)

