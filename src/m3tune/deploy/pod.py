"""What every m3tune pod has, whoever launches it (an Argo task, a rerun Job, a JobSet worker).

Plain Kubernetes JSON (dicts), so the Argo renderer, the Job renderer and
the JobSet manifest share one definition. Values are strings: literal ones
for a Job, Argo expressions (`{{workflow.parameters.root}}`) for the template.
Secrets are only ever referenced by name and key, never read.
"""

from __future__ import annotations

from typing import Any

from m3tune.deploy.images import CACHE_DIR, HOME_DIR

CONFIG_MAP = "m3tune-config"  # the run configs, one YAML file a key (the chart's `configs`)
CONFIG_DIR = "/etc/m3tune/config"
SERVICE_ACCOUNT = "m3tune-workflow"  # every step pod: reports task results to Argo, nothing else
JOBSET_SERVICE_ACCOUNT = "m3tune-jobset"  # only the task that creates a multi-node training JobSet
S3_SECRET = "m3tune-s3"  # keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
LLM_SECRET = "m3tune-llm"  # keys OPENROUTER_API_KEY and/or OPENAI_API_KEY (optional)
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
LLM_KEYS = ("OPENROUTER_API_KEY", "OPENAI_API_KEY")
QDRANT_SECRET = "m3tune-qdrant"  # keys QDRANT_URL (required) and QDRANT_API_KEY (optional)
QDRANT_KEYS = {"QDRANT_URL": False, "QDRANT_API_KEY": True}  # key -> optional in the Secret
LABELS = {"app.kubernetes.io/name": "m3tune", "app.kubernetes.io/part-of": "m3tune"}
STEP_LABEL = "m3tune.dev/step"
HOME_SIZE = "1Gi"  # the home folder holds small tool state (matplotlib, torch extensions); caches go to /cache
# How long one pod of a step may run before Kubernetes stops it (seconds): a hung API call or a stuck
# collective ends as a failure that retries, not as a pod that holds a GPU for ever.
CPU_DEADLINE = 24 * 3600
GPU_DEADLINE = 3 * 24 * 3600
CPU_CACHE_SIZE, GPU_CACHE_SIZE, TMP_SIZE = "50Gi", "200Gi", "20Gi"
MAIN_PORT = 29500  # torch.distributed rendezvous on the first node of a multi-node run
WAIT_LOCK_S = 300  # longer than a killed pod's lock lease (runlock.TTL_S, 120 s)


def step_args(name: str, *, root: str, config: str, rank: str | None = None, world_size: str | None = None,
              merge_shards: str | None = None, force: bool = False) -> list[str]:
    """The arguments of `m3tune step NAME` as a pod runs it (CONFIG: a key of the config map)."""
    # --wait-lock: a pod retried after its predecessor was killed (OOM, a lost node) waits out the dead pod's
    # step lock instead of failing the retry
    args = ["step", name, "--root", root, "--config", f"{CONFIG_DIR}/{config}", "--wait-lock", str(WAIT_LOCK_S)]
    if rank is not None:
        args += ["--rank", rank, "--world-size", world_size or ""]
    if merge_shards is not None:
        args += ["--merge-shards", merge_shards]
    return args + (["--force"] if force else [])


def accelerate_command(args: list[str], *, processes: str, machines: str = "1", machine_rank: str | None = None,
                       main_address: str | None = None) -> list[str]:
    """`accelerate launch` running `m3tune ARGS` (the image's entrypoint, as a module) once per GPU."""
    command = ["accelerate", "launch", "--num_machines", machines, "--num_processes", processes]
    if machine_rank is not None:
        # Several machines: torch's launcher (--multi_gpu) meets on the first node's address.
        command += ["--multi_gpu", "--machine_rank", machine_rank, "--main_process_ip", main_address or "",
                    "--main_process_port", str(MAIN_PORT)]
    return command + ["-m", "m3tune.cli", *args]


def env(*, s3_endpoint: str, aws_region: str, s3_secret: str, llm_secret: str | None = None,
        qdrant_secret: str | None = None) -> list[dict[str, Any]]:
    """Storage settings as values, credentials as references to Secrets. The LLM keys (optional in their
    Secret) only where LLM_SECRET is given: a step that calls no API never holds them; production Qdrant's URL
    and key only where QDRANT_SECRET is (publish, the one step that writes to it)."""
    out: list[dict[str, Any]] = [
        {"name": "M3TUNE_S3_ENDPOINT", "value": s3_endpoint},
        {"name": "AWS_DEFAULT_REGION", "value": aws_region},
        {"name": "M3TUNE_CACHE", "value": f"{CACHE_DIR}/m3tune"},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
    ]
    out += [{"name": key, "valueFrom": {"secretKeyRef": {"name": s3_secret, "key": key}}} for key in S3_KEYS]
    if llm_secret is not None:
        out += [{"name": key, "valueFrom": {"secretKeyRef": {"name": llm_secret, "key": key, "optional": True}}}
                for key in LLM_KEYS]
    if qdrant_secret is not None:
        out += [{"name": key, "valueFrom": {"secretKeyRef": {"name": qdrant_secret, "key": key,
                                                             **({"optional": True} if optional else {})}}}
                for key, optional in QDRANT_KEYS.items()]
    return out


def config_volume() -> dict[str, Any]:
    return {"name": "config", "configMap": {"name": CONFIG_MAP}}


def scratch_volumes(*, cache_size: str, tmp_size: str, shm_size: str | None = None) -> list[dict[str, Any]]:
    """The only writable places of a pod whose root filesystem is read-only: the cache (models, embeddings,
    training's work folder), /tmp and the user's home, each an emptyDir with a size limit (past it the
    kubelet evicts the pod rather than fill the node's disk). GPU pods add a memory-backed /dev/shm
    (NCCL and data loaders need more than the container runtime's 64 MiB)."""
    out: list[dict[str, Any]] = [{"name": "cache", "emptyDir": {"sizeLimit": cache_size}},
                                 {"name": "tmp", "emptyDir": {"sizeLimit": tmp_size}},
                                 {"name": "home", "emptyDir": {"sizeLimit": HOME_SIZE}}]
    if shm_size is not None:
        out.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}})
    return out


def volume_mounts(*, gpu: bool = False) -> list[dict[str, Any]]:
    out = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}, {"name": "cache", "mountPath": CACHE_DIR},
           {"name": "tmp", "mountPath": "/tmp"}, {"name": "home", "mountPath": HOME_DIR}]
    return out + ([{"name": "dshm", "mountPath": "/dev/shm"}] if gpu else [])


def security_context(user_id: int) -> dict[str, Any]:
    """The pod's: non-root, and the runtime's default seccomp filter (Pod Security "restricted" wants one;
    at pod level it also covers the containers Argo adds to a task's pod)."""
    return {"runAsNonRoot": True, "runAsUser": user_id, "runAsGroup": user_id, "fsGroup": user_id,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict[str, Any]:
    """Every m3tune container's: no privilege, no capability, no setuid escalation, an immutable image
    (a step writes only to its emptyDirs and the run root)."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "privileged": False,
            "readOnlyRootFilesystem": True, "runAsNonRoot": True}
