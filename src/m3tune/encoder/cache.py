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

from m3tune.storage import Store


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class EmbeddingCache:
    def __init__(self, store: Store, fingerprint: str):
        self.store = store.child(fingerprint)
        self.vectors: dict[str, np.ndarray] = {}
        for name in self.store.list():
            if name.startswith("shard-") and name.endswith(".npz"):
                with np.load(io.BytesIO(self.store.read_bytes(name))) as shard:
                    self.vectors.update(zip(shard["keys"].tolist(), shard["vectors"]))

    def encode(self, encoder, texts: Sequence[str], *, queries: bool = False, desc: str = "encode") -> np.ndarray:
        """Vectors of TEXTS: cached ones looked up, the rest encoded and added to the cache."""
        keys = [text_key(("q:" if queries else "d:") + t) for t in texts]
        missing = sorted({k: i for i, k in enumerate(keys) if k not in self.vectors}.values())
        if missing:
            fresh = encoder.encode([texts[i] for i in missing], queries=queries, desc=desc)
            new_keys = [keys[i] for i in missing]
            self.vectors.update(zip(new_keys, fresh))
            buffer = io.BytesIO()
            np.savez(buffer, keys=np.array(new_keys), vectors=fresh)
            self.store.write_bytes(f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz", buffer.getvalue())
        dim = encoder.dim
        return np.stack([self.vectors[k] for k in keys]) if keys else np.zeros((0, dim), dtype=np.float32)
