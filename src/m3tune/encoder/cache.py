"""Embeddings cache: vectors keyed by encoder fingerprint + text digest, so reruns do not re-encode.

Each encoder (model, pooling, max length, instruction: `Encoder.fingerprint`)
has its own folder of shard files (`shard-*.npz`: text digests and vectors),
one per `add`, published atomically through the storage layer, so a killed
run keeps what it had finished and the cache works on S3 as well as on disk.
"""

from __future__ import annotations

import hashlib
import io
import time
import uuid
from collections.abc import Sequence

import numpy as np

from m3tune.errors import BadInput
from m3tune.storage import Store


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read_shard(store: Store, name: str) -> dict[str, np.ndarray]:
    """{text key: vector} of one shard, checked: a shard cut short (a copy interrupted, a full disk) or
    edited would otherwise fail inside numpy's zip reader, or serve vectors of another shape or NaN."""
    import zipfile

    where = store.uri_of(name)
    fix = "remove it (the cache is rebuilt by encoding again)"
    try:
        with np.load(io.BytesIO(store.read_bytes(name)), allow_pickle=False) as shard:
            keys, vectors = shard["keys"], shard["vectors"]
    except (zipfile.BadZipFile, ValueError, KeyError, EOFError, OSError) as e:
        raise BadInput(f"{where}: corrupt embeddings cache shard ({type(e).__name__}: {e}); {fix}") from None
    if vectors.ndim != 2 or keys.ndim != 1 or len(keys) != len(vectors) or vectors.dtype.kind != "f" \
            or keys.dtype.kind != "U":
        raise BadInput(f"{where}: corrupt embeddings cache shard ({keys.shape} keys {keys.dtype}, vectors "
                       f"{vectors.shape} {vectors.dtype}); {fix}")
    if not np.isfinite(vectors).all():
        raise BadInput(f"{where}: corrupt embeddings cache shard (vectors with NaN or Infinity); {fix}")
    return dict(zip(keys.tolist(), vectors))


def _check_finite(vectors: np.ndarray, what: str, then: str) -> None:
    # a diverged model encodes NaN: indexed or published, such vectors match nothing, without an error
    bad = int((~np.isfinite(vectors)).any(axis=1).sum()) if vectors.size else 0
    if bad:
        raise BadInput(f"{what} {bad} of {len(vectors)} vectors with NaN or Infinity (diverged weights?); {then}")


class EmbeddingCache:
    def __init__(self, store: Store, fingerprint: str):
        self.store = store.child(fingerprint)
        self.vectors: dict[str, np.ndarray] = {}
        for name in self.store.list():
            if name.startswith("shard-") and name.endswith(".npz"):
                self.vectors.update(_read_shard(self.store, name))

    def encode(self, encoder, texts: Sequence[str], *, queries: bool = False, desc: str = "encode") -> np.ndarray:
        """Vectors of TEXTS: cached ones looked up, the rest encoded and added to the cache."""
        keys = [text_key(("q:" if queries else "d:") + t) for t in texts]
        missing = sorted({k: i for i, k in enumerate(keys) if k not in self.vectors}.values())
        if missing:
            fresh = encoder.encode([texts[i] for i in missing], queries=queries, desc=desc)
            _check_finite(fresh, f"{getattr(encoder, 'name', 'the encoder')} encoded", "nothing cached")
            new_keys = [keys[i] for i in missing]
            self.vectors.update(zip(new_keys, fresh))
            buffer = io.BytesIO()
            np.savez(buffer, keys=np.array(new_keys), vectors=fresh)
            self.store.write_bytes(f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz", buffer.getvalue())
        dim = encoder.dim
        if not keys:
            return np.zeros((0, dim), dtype=np.float32)
        vectors = [self.vectors[k] for k in keys]
        widths = {v.shape for v in vectors}
        # an API encoder knows its width only after its first answer (dim 0): the cached vectors must then
        # still share one width
        ok = widths == {(dim,)} if dim else (len(widths) == 1 and len(next(iter(widths))) == 1)
        if not ok:
            # a shard planted or left by another model under this fingerprint: its vectors would be uploaded
            # and searched as this encoder's (or fail in np.stack)
            other = sorted(w for w in widths if w != (dim,))[0] if dim else sorted(widths)
            made = f"{dim}-d ones" if dim else "one width"
            raise BadInput(f"{self.store.uri}: cached vectors of shape {other}, but "
                           f"{getattr(encoder, 'name', 'the encoder')} makes {made}: a foreign or tampered cache; "
                           "remove the folder (it is rebuilt)")
        return np.stack(vectors)
