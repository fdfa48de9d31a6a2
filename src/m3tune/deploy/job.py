"""A Kubernetes Job that reruns one step of an existing run: `m3tune render job STEP --root URI`.

The same pod as the Argo task of that step (image, env, Secrets, config
map, resources), without Argo. The step skips itself when its manifest
proves it done, so a Job for a finished step does nothing unless `--force`.

The Job's name is derived from the run and the step, not random: creating
a second rerun of the same step of the same run while one exists fails
(409) instead of starting two writers in one step folder, which the
executor does not allow.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from m3tune.deploy import pod
from m3tune.deploy.images import CPU, CUDA, DEFAULT_REGISTRY, USER_ID
from m3tune.errors import ConfigError
from m3tune.pipeline import get_step
from m3tune.storage import validate_run_id


def job_name(step: str, run_id: str, suffix: str = "") -> str:
    """`m3tune-rerun-STEP-RUN[-SUFFIX]`, a DNS label (63 characters at most; a hash keeps long ones distinct)."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"m3tune-rerun-{step}-{run_id}{'-' + suffix if suffix else ''}".lower())
    name = re.sub(r"-+", "-", name).strip("-")
    if len(name) > 63:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = name[:54].rstrip("-") + "-" + digest
    return name


def render_job(step_name: str, *, root: str, config: str = "run.yaml", namespace: str | None = None,
               registry: str = DEFAULT_REGISTRY, image: str | None = None, s3_endpoint: str = "",
               aws_region: str = "us-east-1", s3_secret: str = pod.S3_SECRET, llm_secret: str = pod.LLM_SECRET,
               qdrant_secret: str = pod.QDRANT_SECRET,
               rank: int | None = None, world_size: int | None = None, merge_shards: int | None = None,
               gpus: int = 1, cpu: str | None = None, memory: str | None = None, force: bool = False,
               backoff_limit: int = 2) -> dict[str, Any]:
    """The Job (a dict, as the API takes it) that runs STEP once on the run at ROOT."""
    step = get_step(step_name)
    # CONFIG names a key of the mounted ConfigMap; a path (../..) would read outside the mount
    if not re.fullmatch(r"[-._a-zA-Z0-9]+", config) or config in (".", ".."):
        raise ConfigError(f"--config {config!r}: a key of the m3tune-config ConfigMap (a file name such as "
                          "run.yaml), not a path")
    if not root.startswith("s3://"):
        raise ConfigError(f"--root {root!r}: a pod can only reach a run on S3 (s3://BUCKET/PREFIX/RUN_ID)")
    run_id = validate_run_id(root.rstrip("/").rsplit("/", 1)[-1])
    if (rank is None) != (world_size is None):
        raise ConfigError("--rank and --world-size go together")
    if (rank is not None or merge_shards is not None) and not step.shardable:
        raise ConfigError(f"step {step_name!r} is not shardable: no --rank / --merge-shards")
    suffix = f"{rank}-of-{world_size}" if rank is not None else f"merge-{merge_shards}" if merge_shards else ""
    args = pod.step_args(step.name, root=root, config=config, force=force,
                         rank=None if rank is None else str(rank), world_size=None if world_size is None else str(world_size),
                         merge_shards=None if merge_shards is None else str(merge_shards))
    container: dict[str, Any] = {
        "name": "main",
        "image": image or (CUDA if step.gpu else CPU).ref(registry),
        "env": pod.env(s3_endpoint=s3_endpoint, aws_region=aws_region, s3_secret=s3_secret,
                       llm_secret=llm_secret if step.api_keys else None,
                       qdrant_secret=qdrant_secret if step.qdrant else None),
        "securityContext": pod.container_security_context(),
        "volumeMounts": pod.volume_mounts(gpu=step.gpu),
    }
    if step.distributed:
        container["command"] = pod.accelerate_command(args, processes=str(gpus))
    else:
        container["args"] = args  # the image's entrypoint is `m3tune`
    cpu, memory = cpu or ("8" if step.gpu else "2"), memory or ("64Gi" if step.gpu else "8Gi")
    container["resources"] = {"requests": {"cpu": cpu, "memory": memory},
                              "limits": {"memory": memory, **({"nvidia.com/gpu": str(gpus)} if step.gpu else {})}}
    labels = {**pod.LABELS, pod.STEP_LABEL: step.name, "m3tune.dev/run-id": run_id}
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": pod.SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,  # the step talks to S3, never to the Kubernetes API
        "securityContext": pod.security_context(USER_ID),
        "containers": [container],
        "volumes": [pod.config_volume(),
                    *pod.scratch_volumes(cache_size=pod.GPU_CACHE_SIZE if step.gpu else pod.CPU_CACHE_SIZE,
                                         tmp_size=pod.TMP_SIZE, shm_size="16Gi" if step.gpu else None)],
    }
    if step.gpu:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(step.name, run_id, suffix), "labels": labels,
                     "annotations": {"m3tune.dev/root": root}, **({"namespace": namespace} if namespace else {})},
        "spec": {
            "backoffLimit": backoff_limit,
            # the whole Job, every attempt: the Argo task's per-pod deadline times the attempts (a hung step fails
            # instead of holding its node)
            "activeDeadlineSeconds": (pod.GPU_DEADLINE if step.gpu else pod.CPU_DEADLINE) * (backoff_limit + 1),
            "ttlSecondsAfterFinished": 7 * 24 * 3600,
            "template": {"metadata": {"labels": dict(labels)}, "spec": spec},
        },
    }
