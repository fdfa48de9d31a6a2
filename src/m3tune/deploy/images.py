"""The two container images and what the cluster objects need to know about them.

The Dockerfiles in `images/` are the source of truth for how an image is
built; this module names the images (repository and tag) and the contract
every pod relies on: the entrypoint is `m3tune`, the user is not root, the
caches live under `/cache` (an emptyDir: pods run with a read-only root
filesystem, so /cache, /tmp and the home folder are emptyDirs).
"""

from __future__ import annotations

from dataclasses import dataclass

from m3tune import __version__

DEFAULT_REGISTRY = "m3tune"
ENTRYPOINT = "m3tune"
USER_ID = 10001
CACHE_DIR = "/cache"
HOME_DIR = "/home/m3tune"  # the user's home (useradd --create-home), an emptyDir in a pod


@dataclass(frozen=True)
class Image:
    name: str  # also the bake target
    dockerfile: str  # relative to the repository root
    summary: str

    def ref(self, registry: str = DEFAULT_REGISTRY, tag: str = __version__) -> str:
        return f"{registry}/m3tune-{self.name}:{tag}"


CPU = Image("cpu", "images/Dockerfile.cpu", "data steps and evaluation (CPU)")
CUDA = Image("cuda", "images/Dockerfile.cuda", "training (CUDA, Accelerate, DeepSpeed)")
IMAGES = {image.name: image for image in (CPU, CUDA)}
