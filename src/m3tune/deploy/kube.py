"""Submitting without the argo CLI: the `kubernetes` client with the user's kubeconfig.

    submit  a Workflow from the installed WorkflowTemplate (checked first: it exists, the parameters are its own)
    rerun   the single-step Job of `m3tune.deploy.job`
    runs    recent m3tune Workflows and the state of each step

Errors from the API come back as one line that says what to do (403: which
permission; 404: what is not installed; 409: what exists already), never
with the request's headers (they carry the user's token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from m3tune.deploy import pod, validate
from m3tune.deploy.argo import NAME
from m3tune.errors import ConfigError, UserError

ARGO = ("argoproj.io", "v1alpha1")


class KubeError(UserError):
    """The Kubernetes API refused or could not be reached."""


def api_client(kubeconfig: str | None = None, context: str | None = None):
    """A client for the kubeconfig's cluster (default: $KUBECONFIG or ~/.kube/config) and its namespace."""
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    try:
        client = config.new_client_from_config(config_file=kubeconfig, context=context)
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)
        if context:
            contexts, _ = config.list_kube_config_contexts(config_file=kubeconfig)
            active = next((c for c in contexts if c["name"] == context), active)
    except (ConfigException, OSError) as e:
        raise KubeError(f"kubeconfig {kubeconfig or '(default)'}: {e}") from None
    namespace = (active or {}).get("context", {}).get("namespace")
    return client, namespace


def _why(e: Exception, doing: str, namespace: str) -> KubeError:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(e, HTTPError):
        return KubeError(f"{doing}: cannot reach the Kubernetes API ({type(e).__name__}: {e})")
    assert isinstance(e, ApiException)
    try:
        message = json.loads(e.body or "{}").get("message") or e.reason
    except ValueError:
        message = e.reason
    hints = {
        401: "your kubeconfig's credentials were refused; log in again",
        403: f"you lack the permission in namespace {namespace!r} (see manifests/rbac.yaml, Role m3tune-submitter)",
        404: f"not found in namespace {namespace!r}; is m3tune installed there (helm install … -n {namespace})?",
        409: "it exists already",
    }
    hint = hints.get(e.status, "")
    return KubeError(f"{doing}: HTTP {e.status}: {message}" + (f" — {hint}" if hint else ""))


def _call(doing: str, namespace: str, fn, *args, **kwargs):
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, **kwargs)
    except (ApiException, HTTPError) as e:
        raise _why(e, doing, namespace) from None


def parse_parameters(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"-p {pair!r}: expected NAME=VALUE")
        if key in out:  # the last one would win silently
            raise ConfigError(f"-p {key}: given twice; give each parameter once")
        out[key] = value
    return out


def check_submission(parameters: dict[str, str], template: str) -> None:
    """What the template would pass on to a pod, Argo or the kubelet: checked before any request."""
    validate.dns_subdomain(template, "--template")
    validate.check_parameters(parameters)


def workflow_body(installed: dict[str, Any], parameters: dict[str, str], template: str) -> dict[str, Any]:
    """The Workflow that runs the installed WorkflowTemplate INSTALLED (named TEMPLATE) with PARAMETERS, checked
    against the template's declared parameters. Both submission paths (Kubernetes API, Argo Server) send it."""
    declared = {p["name"]: p for p in installed.get("spec", {}).get("arguments", {}).get("parameters", [])}
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(unknown)}; WorkflowTemplate {template} takes: "
                          f"{', '.join(declared)}")
    missing = sorted(n for n, p in declared.items() if "value" not in p and n not in parameters)
    if missing:
        raise ConfigError(f"missing parameter(s): {', '.join(missing)} (-p NAME=VALUE)")
    return {
        "apiVersion": "/".join(ARGO),
        "kind": "Workflow",
        "metadata": {"generateName": f"{template}-", "labels": dict(pod.LABELS)},
        "spec": {"workflowTemplateRef": {"name": template},
                 "arguments": {"parameters": [{"name": k, "value": v} for k, v in parameters.items()]}},
    }


def submit(client, namespace: str, parameters: dict[str, str], *, template: str = NAME) -> str:
    """Create a Workflow from the installed WorkflowTemplate TEMPLATE; return its name."""
    from kubernetes.client import CustomObjectsApi

    check_submission(parameters, template)
    api = CustomObjectsApi(client)
    installed = _call(f"reading WorkflowTemplate {template}", namespace, api.get_namespaced_custom_object,
                      *ARGO, namespace, "workflowtemplates", template)
    body = workflow_body(installed, parameters, template)
    created = _call("creating the Workflow", namespace, api.create_namespaced_custom_object,
                    *ARGO, namespace, "workflows", body)
    return created["metadata"]["name"]


def rerun(client, namespace: str, job: dict[str, Any]) -> str:
    """Create the single-step Job JOB; return its name."""
    from kubernetes.client import BatchV1Api

    name = job["metadata"]["name"]
    try:
        created = _call(f"creating Job {name}", namespace, BatchV1Api(client).create_namespaced_job, namespace, job)
    except KubeError as e:
        if "HTTP 409" in str(e):
            raise KubeError(f"{e}: a rerun of this step of this run exists; see `kubectl -n {namespace} get job "
                            f"{name}`, and delete it before rerunning (two writers in one step folder are refused)"
                            ) from None
        raise
    return created.metadata.name


@dataclass
class RunInfo:
    name: str
    phase: str
    started: str
    finished: str
    root: str
    steps: dict[str, str] = field(default_factory=dict)


def _steps(workflow: dict[str, Any]) -> dict[str, str]:
    """Task name -> phase: a DAG task's node is the one whose display name is the bare task name
    (its retries and fan-out children are shown as `task(0)`, `task(0:1)`)."""
    nodes = workflow.get("status", {}).get("nodes", {}) or {}
    tasks = [t["name"] for t in _dag_tasks(workflow)]
    by_name = {n.get("displayName"): n.get("phase", "") for n in nodes.values() if n.get("type") != "DAG"}
    return {t: by_name.get(t, "Pending") for t in tasks} if tasks else {
        k: v for k, v in by_name.items() if k and "(" not in k}


def _dag_tasks(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workflow.get("status", {}).get("storedWorkflowTemplateSpec") or workflow.get("spec", {})
    for t in spec.get("templates", []):
        if t.get("name") == spec.get("entrypoint") and "dag" in t:
            return t["dag"].get("tasks", [])
    return []


def run_info(workflow: dict[str, Any]) -> RunInfo:
    status = workflow.get("status", {})
    params = {p["name"]: p.get("value", "")
              for p in workflow.get("spec", {}).get("arguments", {}).get("parameters", [])}
    return RunInfo(name=workflow["metadata"]["name"], phase=status.get("phase", "Pending"),
                   started=status.get("startedAt") or "", finished=status.get("finishedAt") or "",
                   root=params.get("root", ""), steps=_steps(workflow))


def newest_first(workflows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(workflows, key=lambda w: w["metadata"].get("creationTimestamp", ""), reverse=True)


def label_selector() -> str:
    """The labels every m3tune Workflow carries (`workflow_body`, the template's workflowMetadata)."""
    return ",".join(f"{k}={v}" for k, v in pod.LABELS.items())


def runs(client, namespace: str, *, limit: int = 10) -> list[RunInfo]:
    """The most recent m3tune Workflows, newest first, with the phase of each step."""
    from kubernetes.client import CustomObjectsApi

    validate.count(limit, "--limit", high=1000)  # a slice by 0 or -1 would show none, or all but the oldest
    listed = _call("listing Workflows", namespace, CustomObjectsApi(client).list_namespaced_custom_object,
                   *ARGO, namespace, "workflows", label_selector=label_selector())
    return [run_info(wf) for wf in newest_first(listed.get("items", []))[:limit]]
