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

from m3tune.deploy import pod, validate
from m3tune.deploy.images import CPU, CUDA, DEFAULT_REGISTRY, USER_ID
from m3tune.errors import ConfigError
from m3tune.pipeline import Step, get_step

_PLAIN_RUN_ID = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
_SUFFIX_TAIL = re.compile(r".*-(\d+-of-\d+|merge-\d+)")


def job_name(step: str, run_id: str, suffix: str = "") -> str:
    """`m3tune-rerun-STEP-RUN[-SUFFIX]`, a DNS label (63 characters at most), one per (step, run, shard).

    Distinct reruns never share a name (a shared name would answer 409 "a rerun of this run exists" for
    another run's Job, or `kubectl apply` would edit it). The name is readable when RUN is already a plain
    DNS label (lowercase, single hyphens) that does not end like a suffix (`-1-of-4`, `-merge-4`) and the
    name fits: such a name reads back one way only (no step name is another's prefix; the suffix is the only
    `-R-of-N` / `-merge-N` tail). Any other run id (`exp_1`, `Exp-1`, a long one) would collide once mapped
    (`exp_1` and `exp-1` both become `exp-1`), so its name ends with `--` and a hash of the original step,
    run id and suffix; no readable name holds `--`, so the two kinds never meet. Refusing such run ids
    instead would leave runs that exist with no way to be rerun.
    """
    readable = f"m3tune-rerun-{step}-{run_id}" + (f"-{suffix}" if suffix else "")
    if _PLAIN_RUN_ID.fullmatch(run_id) and not _SUFFIX_TAIL.fullmatch(run_id) and len(readable) <= 63:
        return readable
    digest = hashlib.sha256(f"{step}\0{run_id}\0{suffix}".encode()).hexdigest()[:10]
    stem = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]+", "-", readable.lower())).strip("-")
    return stem[:63 - 2 - len(digest)].rstrip("-") + "--" + digest


def render_job(step_name: str, *, root: str, config: str = "run.yaml", namespace: str | None = None,
               registry: str = DEFAULT_REGISTRY, image: str | None = None, s3_endpoint: str = "",
               aws_region: str = "us-east-1", s3_secret: str = pod.S3_SECRET, llm_secret: str = pod.LLM_SECRET,
               qdrant_secret: str = pod.QDRANT_SECRET,
               rank: int | None = None, world_size: int | None = None, merge_shards: int | None = None,
               gpus: int | None = None, cpu: str | None = None, memory: str | None = None, force: bool = False,
               backoff_limit: int = 2) -> dict[str, Any]:
    """The Job (a dict, as the API takes it) that runs STEP once on the run at ROOT."""
    step = get_step(step_name)
    run_id = _check(step, root=root, config=config, namespace=namespace, s3_endpoint=s3_endpoint, rank=rank,
                    world_size=world_size, merge_shards=merge_shards, gpus=gpus, cpu=cpu, memory=memory)
    validate.region(aws_region, "aws_region")
    for secret, option in ((s3_secret, "s3_secret"), (llm_secret, "llm_secret"), (qdrant_secret, "qdrant_secret")):
        validate.dns_subdomain(secret, option)
    gpus = 1 if gpus is None else gpus
    suffix = f"{rank}-of-{world_size}" if rank is not None else f"merge-{merge_shards}" if merge_shards else ""
    args = pod.step_args(step.name, root=root, config=config, force=force,
                         rank=None if rank is None else str(rank), world_size=None if world_size is None else str(world_size),
                         merge_shards=None if merge_shards is None else str(merge_shards))
    container: dict[str, Any] = {
        "name": "main",
        "image": validate.image(image if image is not None else (CUDA if step.gpu else CPU).ref(registry)),
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
    job = {
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
    validate.check_labels(job)  # every label, as the API server would (a step's name, a label added later)
    return job


def _check(step: Step, *, root: str, config: str, namespace: str | None, s3_endpoint: str, rank: int | None,
           world_size: int | None, merge_shards: int | None, gpus: int | None, cpu: str | None,
           memory: str | None) -> str:
    """Every option of a rerun Job by its rule (`m3tune.deploy.validate`); the run id."""
    validate.config_key(config)
    run_id = validate.run_root(root)
    # the run's label, by which `kubectl get jobs -l m3tune.dev/run-id=…` finds its reruns
    validate.label_value(run_id, "--root (run id)", "m3tune.dev/run-id")
    validate.s3_endpoint(s3_endpoint)
    if namespace is not None:
        validate.namespace(namespace)
    if (rank is not None or world_size is not None or merge_shards is not None) and not step.shardable:
        raise ConfigError(f"step {step.name!r} is not shardable: no --rank / --merge-shards")
    validate.shard(rank, world_size, merge_shards)
    if gpus is not None:
        if not step.gpu:
            raise ConfigError(f"--gpus: step {step.name!r} runs on CPUs (its pod would ignore --gpus)")
        validate.count(gpus, "--gpus", high=validate.MAX_GPUS)
    for value, option in ((cpu, "cpu"), (memory, "memory")):
        if value is not None:
            validate.quantity(value, option)
    return run_id
