"""The Argo WorkflowTemplate, generated with Hera from the pipeline definition.

One DAG task per step of `PIPELINE`, its dependencies the step's `needs`,
each running `m3tune step NAME --root ROOT --config FILE` in the image its
step calls for. Nothing here names a step: a step added to the pipeline
appears after a re-render (`m3tune render argo --output argo/`).

- A shardable step fans out: `NAME-shard` runs `--rank R --world-size N`
  in N pods (`withSequence`), then `NAME` merges them (`--merge-shards N`);
  N is the parameter `NAME-shards`.
- A GPU step runs in the CUDA image with `nvidia.com/gpu`, a memory-backed
  /dev/shm, and the node selector and tolerations of the parameters
  `gpu-node-selector` / `gpu-tolerations` (JSON, applied by podSpecPatch).
  The patch is one Argo expression that parses each parameter as JSON and
  serialises the patch with `toJson`: a parameter's text is never pasted into
  the patch, so a value cannot add fields of its own (`hostPID`, a volume…).
- Every pod passes Pod Security "restricted": non-root, seccomp
  RuntimeDefault, no privilege escalation, no capabilities, a read-only root
  filesystem with size-limited emptyDirs for /cache, /tmp and the home
  folder, and a deadline (`deadline` / `gpu-deadline` seconds).
- The LLM key Secret reaches only the steps that call an API (`api_keys`);
  only the task that creates a JobSet runs as the ServiceAccount allowed to.
  The Qdrant Secret (production URL and API key) reaches only the steps that
  write to production Qdrant (`qdrant`: publish).
- An optional step (`optional`: publish) runs only when the parameter of its
  name is `true`; it is skipped otherwise, and its needs are the same.
- A distributed step (training) runs under `accelerate launch`: in one pod
  when `NAME-nodes` is 1, else as a JobSet of that many pods created by a
  resource template that waits for its terminal state (`NAME-multinode`).
  Only one of the two tasks runs; the other is skipped, and Argo counts a
  skipped dependency as done.
- One workflow per run root at a time: the workflow holds a mutex named after
  a hash of the `root` parameter (`mutex_name`), so a second workflow on the
  same root waits in Argo's queue; inside, each `m3tune step` holds its own
  lock in the root (m3tune.runlock), which also keeps out a local `m3tune run`.
- Every container task retries with exponential backoff, except on exit 2
  (a usage error) and 3 (a quality target missed): a rerun cannot fix those.
  A retry is cheap because a step skips what its manifest proves done.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from m3tune.deploy import pod, validate
from m3tune.deploy.images import CPU, CUDA, DEFAULT_REGISTRY, USER_ID
from m3tune.errors import ConfigError
from m3tune.pipeline import OPTIONAL, PIPELINE, STEPS, Step

NAME = "m3tune"
TEMPLATE_FILE = "workflowtemplate.yaml"
EXAMPLE_FILE = "workflow.yaml"
EXAMPLE_ROOT = "s3://m3tune-runs/runs/exp-01"
NO_RETRY_EXIT_CODES = (2, 3, 4)
DEFAULT_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


# sprig's sha256sum is the hex SHA-256 of the text: the same name `mutex_name` computes in Python. Hashed because
# a root holds '/' and ':', which Argo's lock keys (NAMESPACE/Mutex/NAME) use as separators.
MUTEX = "m3tune-{{=sprig.sha256sum(workflow.parameters.root)}}"


def mutex_name(root: str) -> str:
    """The mutex a workflow on ROOT (the `root` parameter, as given) holds: what `argo get` shows it waiting for."""
    import hashlib

    return "m3tune-" + hashlib.sha256(root.encode()).hexdigest()


def param(name: str) -> str:
    return "{{workflow.parameters.%s}}" % name


def parameters(steps: list[Step], *, registry: str) -> list[dict[str, str]]:
    """The template's parameters, each with its meaning; `root` has no default (argo submit must give it)."""
    out = [
        {"name": "root", "description": "Run root: s3://BUCKET/PREFIX/RUN_ID (the run id is its last segment)."},
        {"name": "config", "value": "run.yaml", "description": f"Run config: a key of the ConfigMap {pod.CONFIG_MAP}."},
        {"name": "s3-endpoint", "value": "", "description": "S3-compatible endpoint URL (MinIO…); empty for AWS."},
        {"name": "aws-region", "value": "us-east-1", "description": "AWS_DEFAULT_REGION of the pods."},
        {"name": "s3-secret", "value": pod.S3_SECRET,
         "description": "Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."},
        {"name": "llm-secret", "value": pod.LLM_SECRET,
         "description": "Secret with OPENROUTER_API_KEY and/or OPENAI_API_KEY (optional)."},
        {"name": "image-cpu", "value": CPU.ref(registry), "description": "Image of the CPU steps."},
        {"name": "cpu", "value": "2", "description": "CPU request of a CPU step."},
        {"name": "memory", "value": "8Gi", "description": "Memory request (and limit) of a CPU step."},
        {"name": "cache-size", "value": pod.CPU_CACHE_SIZE,
         "description": "Size limit of a CPU pod's /cache emptyDir (past it the pod is evicted)."},
        {"name": "tmp-size", "value": pod.TMP_SIZE, "description": "Size limit of every pod's /tmp emptyDir."},
        {"name": "deadline", "value": str(pod.CPU_DEADLINE),
         "description": "Seconds one pod of a CPU step may run (activeDeadlineSeconds); then it fails and retries."},
    ]
    for step in steps:
        if step.shardable:
            out.append({"name": f"{step.name}-shards", "value": "1",
                        "description": f"Pods {step.name} fans out over (rank / world size)."})
    if any(s.gpu for s in steps):
        out += [
            {"name": "image-gpu", "value": CUDA.ref(registry), "description": "Image of the GPU steps."},
            {"name": "gpus-per-node", "value": "1", "description": "nvidia.com/gpu of a GPU pod."},
            {"name": "gpu-cpu", "value": "8", "description": "CPU request of a GPU pod."},
            {"name": "gpu-memory", "value": "64Gi", "description": "Memory request (and limit) of a GPU pod."},
            {"name": "shm-size", "value": "16Gi", "description": "Size of the memory-backed /dev/shm of a GPU pod."},
            {"name": "gpu-cache-size", "value": pod.GPU_CACHE_SIZE,
             "description": "Size limit of a GPU pod's /cache emptyDir (base model, checkpoints)."},
            {"name": "gpu-deadline", "value": str(pod.GPU_DEADLINE),
             "description": "Seconds one GPU pod (or a multi-node JobSet) may run."},
            {"name": "gpu-node-selector", "value": "{}", "description": "Node selector of GPU pods (JSON object)."},
            {"name": "gpu-tolerations", "value": json.dumps(DEFAULT_TOLERATIONS),
             "description": "Tolerations of GPU pods (JSON list)."},
        ]
    for step in steps:
        if step.distributed:
            out.append({"name": f"{step.name}-nodes", "value": "1",
                        "description": f"Nodes {step.name} runs on: 1 = one pod, more = a JobSet."})
    for step in steps:
        if step.optional:
            out.append({"name": step.name, "value": "false",
                        "description": f"true: run the optional step {step.name} after its needs."})
    if any(s.qdrant for s in steps):
        out.append({"name": "qdrant-secret", "value": pod.QDRANT_SECRET,
                    "description": "Secret with QDRANT_URL and QDRANT_API_KEY (optional) of the production Qdrant."})
    return out


def _env(step: Step) -> list[dict[str, Any]]:
    return pod.env(s3_endpoint=param("s3-endpoint"), aws_region=param("aws-region"), s3_secret=param("s3-secret"),
                   llm_secret=param("llm-secret") if step.api_keys else None,
                   qdrant_secret=param("qdrant-secret") if step.qdrant else None)


def expr_param(name: str) -> str:
    """A workflow parameter inside an Argo expression (`{{=…}}`); hyphenated names must be indexed."""
    return 'workflow.parameters["%s"]' % name


class Expr(str):
    """An Argo expression standing for one value (not a string) of a manifest that `to_argo_json` serialises."""


def json_param(name: str) -> Expr:
    """The value of the JSON text of parameter NAME (an object, a list…), parsed by Argo."""
    return Expr('jsonpath(%s, "$")' % expr_param(name))


def int_param(name: str) -> Expr:
    return Expr("asInt(%s)" % expr_param(name))


_TAG = re.compile(r"\{\{(=?)(.*?)\}\}")


def _string_expr(text: str) -> str | None:
    """The expression equal to TEXT once Argo substitutes its tags (None: TEXT has none)."""
    parts, pos = [], 0
    for m in _TAG.finditer(text):
        if m.start() > pos:
            parts.append(json.dumps(text[pos:m.start()]))
        body = m[2].strip()
        if m[1]:
            parts.append(f"string({body})")
        elif body.startswith("workflow.parameters."):
            parts.append(expr_param(body.removeprefix("workflow.parameters.")))
        else:
            parts.append(body)  # workflow.name and the like: names without hyphens
        pos = m.end()
    if not parts:
        return None
    if pos < len(text):
        parts.append(json.dumps(text[pos:]))
    return " + ".join(parts)


def to_argo_json(obj: Any) -> str:
    """OBJ as JSON text for a field Argo substitutes and then parses (a resource manifest, a podSpecPatch).

    Argo pastes a simple tag's value into such text as it is, so a parameter holding `"` or a newline could
    close its string and add fields. Here every leaf that depends on a parameter becomes one expression
    serialised by `toJson`: its result is exactly one JSON value, whatever the parameter holds."""
    exprs: list[str] = []

    def walk(value: Any) -> Any:
        if isinstance(value, Expr):
            exprs.append(str(value))
        elif isinstance(value, str) and (expr := _string_expr(value)) is not None:
            exprs.append(expr)
        elif isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        elif isinstance(value, list):
            return [walk(v) for v in value]
        else:
            return value
        return f"\0{len(exprs) - 1}\0"

    text = json.dumps(walk(obj), indent=2, ensure_ascii=False)
    # JSON is YAML, and json.dumps never writes a NUL: each placeholder is exactly one leaf
    return re.sub(r'"\\u0000(\d+)\\u0000"', lambda m: "{{=toJson(%s)}}" % exprs[int(m[1])], text)


# podSpecPatch field -> the parameter (JSON) that gives its value
GPU_PATCH = {"nodeSelector": "gpu-node-selector", "tolerations": "gpu-tolerations"}


def _retry() -> dict[str, Any]:
    keep = " && ".join(f"asInt(lastRetry.exitCode) != {code}" for code in NO_RETRY_EXIT_CODES)
    return {"limit": "3", "retryPolicy": "Always", "expression": keep,
            "backoff": {"duration": "30s", "factor": "2", "maxDuration": "30m"}}


def gpu_patch(fields: dict[str, str] = GPU_PATCH) -> str:
    """The podSpecPatch of a GPU pod, built as data: each field the parsed JSON of its parameter."""
    return to_argo_json({key: json_param(name) for key, name in fields.items()})


def _resources(gpu: bool) -> dict[str, Any]:
    if not gpu:
        return {"requests": {"cpu": param("cpu"), "memory": param("memory")}, "limits": {"memory": param("memory")}}
    return {"requests": {"cpu": param("gpu-cpu"), "memory": param("gpu-memory")},
            "limits": {"memory": param("gpu-memory"), "nvidia.com/gpu": param("gpus-per-node")}}


def _container_template(name: str, step: Step, *, args: list[str], command: list[str] | None = None,
                        inputs: list[str] = ()) -> dict[str, Any]:
    # Without a command the image's entrypoint (`m3tune`) runs the args.
    container: dict[str, Any] = {"image": param("image-gpu" if step.gpu else "image-cpu"),
                                 **({"command": command} if command else {"args": args}),
                                 "env": _env(step),
                                 "resources": _resources(step.gpu),
                                 "securityContext": pod.container_security_context(),
                                 "volumeMounts": pod.volume_mounts(gpu=step.gpu)}
    template: dict[str, Any] = {
        "name": name,
        "metadata": {"labels": {**pod.LABELS, pod.STEP_LABEL: step.name}},
        "activeDeadlineSeconds": param("gpu-deadline" if step.gpu else "deadline"),
        "container": container,
        "retryStrategy": _retry(),
        # the config map is the workflow's volume; the scratch ones are per template, sized by its kind
        "volumes": _scratch_volumes(step.gpu),
    }
    if inputs:
        template["inputs"] = {"parameters": [{"name": i} for i in inputs]}
    if step.gpu:
        template["podSpecPatch"] = gpu_patch()
    return template


def _scratch_volumes(gpu: bool) -> list[dict[str, Any]]:
    return pod.scratch_volumes(cache_size=param("gpu-cache-size" if gpu else "cache-size"), tmp_size=param("tmp-size"),
                               shm_size=param("shm-size") if gpu else None)


def jobset_manifest(step: Step) -> str:
    """The JobSet of a multi-node run of STEP: one indexed Job of N pods, one `accelerate launch` each,
    meeting on pod 0 through the JobSet's headless service. Argo evaluates its {{=…}} before creating it."""
    nodes = param(f"{step.name}-nodes")
    processes = "{{=%s * %s}}" % (int_param(f"{step.name}-nodes"), int_param("gpus-per-node"))
    args = pod.step_args(step.name, root=param("root"), config=param("config"))
    command = pod.accelerate_command(args, processes=processes, machines=nodes, machine_rank="$(MACHINE_RANK)",
                                     main_address="$(JOBSET_NAME)-workers-0-0.$(JOBSET_NAME)")
    env = _env(step) + [
        {"name": "MACHINE_RANK",
         "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "JOBSET_NAME",
         "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['jobset.sigs.k8s.io/jobset-name']"}}},
    ]
    pod_spec = {
        "restartPolicy": "Never",
        "serviceAccountName": pod.SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "securityContext": pod.security_context(USER_ID),
        **{key: json_param(name) for key, name in GPU_PATCH.items()},
        "containers": [{
            "name": "main",
            "image": param("image-gpu"),
            "command": command,
            "env": env,
            "ports": [{"containerPort": pod.MAIN_PORT, "name": "rendezvous"}],
            "resources": _resources(True),
            "securityContext": pod.container_security_context(),
            "volumeMounts": pod.volume_mounts(gpu=True),
        }],
        "volumes": [pod.config_volume(), *_scratch_volumes(True)],
    }
    manifest = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        # a new name for every attempt: `argo retry` must not collide with the JobSet of the failed one
        "metadata": {"generateName": "{{workflow.name}}-%s-" % step.name,
                     "labels": {**pod.LABELS, pod.STEP_LABEL: step.name}},
        "spec": {
            "network": {"enableDNSHostnames": True},
            "failurePolicy": {"maxRestarts": 2},
            "replicatedJobs": [{
                "name": "workers",
                "replicas": 1,
                "template": {"spec": {
                    "parallelism": int_param(f"{step.name}-nodes"), "completions": int_param(f"{step.name}-nodes"),
                    "completionMode": "Indexed", "backoffLimit": 0, "activeDeadlineSeconds": int_param("gpu-deadline"),
                    "template": {"metadata": {"labels": {**pod.LABELS, pod.STEP_LABEL: step.name}},
                                 "spec": pod_spec},
                }},
            }],
        },
    }
    return to_argo_json(manifest)


def _tasks_and_templates(steps: list[Step]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    names = {s.name for s in steps}
    tasks: list[dict[str, Any]] = []
    templates: list[dict[str, Any]] = []
    # What a downstream task waits for: a step's final task(s).
    finals: dict[str, list[str]] = {}
    for step in steps:
        missing = [n for n in step.needs if n not in names]
        if missing:
            raise ConfigError(f"step {step.name!r} needs {', '.join(missing)}, which the pipeline does not run")
        deps = sorted({t for n in step.needs for t in finals[n]}, key=[t["name"] for t in tasks].index)
        root, config = param("root"), param("config")
        if step.shardable and step.gpu:
            raise ConfigError(f"step {step.name!r}: a sharded GPU step is not supported by the Argo renderer")
        if step.shardable:
            shards = param(f"{step.name}-shards")
            templates.append(_container_template(f"{step.name}-shard", step, inputs=["rank"], args=pod.step_args(
                step.name, root=root, config=config, rank="{{inputs.parameters.rank}}", world_size=shards)))
            tasks.append({"name": f"{step.name}-shard", "template": f"{step.name}-shard", "dependencies": deps,
                          "withSequence": {"count": shards},
                          "arguments": {"parameters": [{"name": "rank", "value": "{{item}}"}]}})
            templates.append(_container_template(step.name, step, args=pod.step_args(
                step.name, root=root, config=config, merge_shards=shards)))
            tasks.append({"name": step.name, "template": step.name, "dependencies": [f"{step.name}-shard"]})
            finals[step.name] = [step.name]
        elif step.distributed:
            nodes = param(f"{step.name}-nodes")
            command = pod.accelerate_command(pod.step_args(step.name, root=root, config=config),
                                             processes=param("gpus-per-node"))
            templates.append(_container_template(step.name, step, args=[], command=command))
            tasks.append({"name": step.name, "template": step.name, "dependencies": deps, "when": f"{nodes} == 1"})
            multi = f"{step.name}-multinode"
            templates.append({
                "name": multi,
                "metadata": {"labels": {**pod.LABELS, pod.STEP_LABEL: step.name}},
                # the one pod that may create JobSets: a JobSet's pods could mount any Secret of the namespace
                "serviceAccountName": pod.JOBSET_SERVICE_ACCOUNT,
                # activeDeadlineSeconds applies to container templates only; a resource template has a timeout
                "timeout": param("gpu-deadline") + "s",
                "resource": {"action": "create", "setOwnerReference": True, "manifest": jobset_manifest(step),
                             "successCondition": "status.terminalState == Completed",
                             "failureCondition": "status.terminalState == Failed"},
            })
            tasks.append({"name": multi, "template": multi, "dependencies": deps, "when": f"{nodes} > 1"})
            finals[step.name] = [step.name, multi]
        else:
            templates.append(_container_template(step.name, step, args=pod.step_args(step.name, root=root,
                                                                                      config=config)))
            tasks.append({"name": step.name, "template": step.name, "dependencies": deps,
                          **({"when": f"{param(step.name)} == true"} if step.optional else {})})
            finals[step.name] = [step.name]
    for task in tasks:
        if not task["dependencies"]:
            del task["dependencies"]
    return tasks, templates


def render_workflow_template(steps: dict[str, Step] | None = None, pipeline: list[str] | None = None, *,
                             registry: str = DEFAULT_REGISTRY) -> dict[str, Any]:
    """The WorkflowTemplate of PIPELINE (default: m3tune's), as a dict, built and serialised by Hera."""
    from hera.workflows import WorkflowTemplate
    from hera.workflows import models as m

    steps = steps if steps is not None else STEPS
    order = [steps[name] for name in (pipeline if pipeline is not None else PIPELINE + OPTIONAL)]
    tasks, templates = _tasks_and_templates(order)
    dag = {"name": "pipeline", "dag": {"tasks": tasks}}
    wt = WorkflowTemplate(
        api_version="argoproj.io/v1alpha1",
        kind="WorkflowTemplate",
        name=NAME,
        labels=dict(pod.LABELS),
        annotations={"m3tune.dev/generated-by": "m3tune render argo (from m3tune.pipeline); do not edit"},
        entrypoint="pipeline",
        service_account_name=pod.SERVICE_ACCOUNT,
        arguments=m.Arguments(parameters=[m.Parameter.model_validate(p) for p in parameters(order, registry=registry)]),
        workflow_metadata=m.WorkflowMetadata(labels=dict(pod.LABELS)),
        pod_gc=m.PodGC(strategy="OnPodSuccess"),  # failed pods stay, with their logs
        synchronization=m.Synchronization(mutexes=[m.Mutex(name=MUTEX)]),
        security_context=m.PodSecurityContext.model_validate(pod.security_context(USER_ID)),
        volumes=[m.Volume.model_validate(pod.config_volume())],
        templates=[m.Template.model_validate(t) for t in [dag, *templates]],
    ).to_dict()
    # the defaults pass the rules `m3tune submit` applies to the values a user gives (a registry, a new parameter)
    validate.check_parameters({p["name"]: p["value"] for p in wt["spec"]["arguments"]["parameters"] if "value" in p},
                              steps)
    validate.check_labels(wt)
    return wt


def render_example_workflow(template: dict[str, Any]) -> dict[str, Any]:
    """A Workflow for `argo submit` / `kubectl create` that runs the installed template on one run root."""
    from hera.workflows import Workflow
    from hera.workflows import models as m

    wf = Workflow(
        api_version="argoproj.io/v1alpha1",
        kind="Workflow",
        generate_name=f"{NAME}-",
        labels=dict(pod.LABELS),
        workflow_template_ref=m.WorkflowTemplateRef(name=template["metadata"]["name"]),
        arguments=m.Arguments(parameters=[m.Parameter(name="root", value=EXAMPLE_ROOT),
                                          m.Parameter(name="config", value="run.yaml")]),
    )
    return wf.to_dict()


def to_yaml(obj: dict[str, Any], header: str) -> str:
    body = yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, width=120)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body


def render_files() -> dict[str, str]:
    """The committed files, by name: the WorkflowTemplate and the example Workflow."""
    template = render_workflow_template()
    how = "Generated by `m3tune render argo --output argo/` (make render) from m3tune.pipeline: do not edit."
    return {
        TEMPLATE_FILE: to_yaml(template, how + "\nInstall: kubectl apply -n m3tune -f argo/workflowtemplate.yaml "
                                              "(or helm install, which ships it)."),
        EXAMPLE_FILE: to_yaml(render_example_workflow(template),
                              how + "\nSubmit: kubectl create -n m3tune -f argo/workflow.yaml, or\n"
                                    f"  argo submit -n m3tune --from workflowtemplate/{NAME} -p root={EXAMPLE_ROOT}"),
    }
