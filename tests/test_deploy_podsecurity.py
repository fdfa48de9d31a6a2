"""Every pod m3tune can start passes Pod Security "restricted", checked against the documented rules
(https://kubernetes.io/docs/concepts/security/pod-security-standards/, baseline and restricted), plus
m3tune's own rules: a read-only root filesystem whose writable places are size-limited emptyDirs, a
deadline on every pod, the LLM keys only where an API is called, JobSets created by one identity only.

The pods are those of the chart as Helm renders it (default and example values): each WorkflowTemplate
template's pod as Argo builds it (the workflow's security context and volumes, the template's container,
volumes and podSpecPatch evaluated), the JobSet of multi-node training, and the rerun Jobs."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import yaml
from typer.testing import CliRunner

from m3tune.cli import app
from m3tune.deploy import pod as pod_defs
from m3tune.deploy.argo import render_workflow_template
from m3tune.pipeline import PIPELINE, STEPS
from test_deploy_argo import REPO, argo_substitute
from test_deploy_manifests import docs, example_values, helm_render

# --- the Pod Security Standards, as documented -------------------------------------------------------------

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
POD_FIELDS = {"hostNetwork", "hostPID", "hostIPC"}


def restricted_violations(spec: dict, annotations: dict | None = None) -> list[str]:
    """What a pod spec breaks of the baseline and restricted profiles (empty: it passes)."""
    out: list[str] = []
    psc = spec.get("securityContext") or {}
    containers = [("containers", c) for c in spec.get("containers", [])] + \
                 [("initContainers", c) for c in spec.get("initContainers", [])] + \
                 [("ephemeralContainers", c) for c in spec.get("ephemeralContainers", [])]
    if not containers:
        out.append("no containers")
    # baseline
    out += [f"{f}: must be false" for f in sorted(POD_FIELDS) if spec.get(f)]
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("securityContext.windowsOptions.hostProcess")
    for v in spec.get("volumes", []):
        if "hostPath" in v:
            out.append(f"volume {v['name']}: hostPath")
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {v['name']}: type {sorted(kinds - RESTRICTED_VOLUMES)} not allowed")
    for s in psc.get("sysctls", []):
        if s["name"] not in SAFE_SYSCTLS:
            out.append(f"sysctl {s['name']}: not in the safe set")
    for key, value in (annotations or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and \
                value != "runtime/default" and not value.startswith("localhost/"):
            out.append(f"annotation {key}={value}")
    if (psc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
        out.append("securityContext.appArmorProfile: must be RuntimeDefault or Localhost")
    out += _selinux("securityContext", psc)
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp == "Unconfined":
        out.append("securityContext.seccompProfile: Unconfined")
    if psc.get("runAsUser") == 0:
        out.append("securityContext.runAsUser: 0")
    for where, c in containers:
        name = f"{where}[{c.get('name')}]"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{name}: windowsOptions.hostProcess")
        out += [f"{name}: hostPort {p['hostPort']}" for p in c.get("ports", []) if p.get("hostPort")]
        if sc.get("procMount") not in (None, "Default"):
            out.append(f"{name}: procMount {sc['procMount']}")
        if (sc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
            out.append(f"{name}: appArmorProfile")
        out += _selinux(name, sc)
        caps = sc.get("capabilities") or {}
        added = set(caps.get("add") or [])
        if not added <= BASELINE_CAPABILITIES:
            out.append(f"{name}: capabilities.add {sorted(added - BASELINE_CAPABILITIES)} beyond baseline")
        # restricted
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities.drop must include ALL")
        if not added <= {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities.add may hold only NET_BIND_SERVICE")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"{name}: runAsNonRoot must be true (pod or container)")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost (pod or container)")
    return out


def _selinux(where: str, sc: dict) -> list[str]:
    options = sc.get("seLinuxOptions") or {}
    out = [f"{where}: seLinuxOptions.type {options['type']}"] if options.get("type", "") not in SELINUX_TYPES else []
    return out + [f"{where}: seLinuxOptions.{k}" for k in ("user", "role") if options.get(k)]


COMPLIANT = {
    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [{"name": "main", "image": "x", "securityContext": {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
    "volumes": [{"name": "scratch", "emptyDir": {}}],
}


def _set(path: str, value):
    def apply(spec: dict) -> None:
        *parents, last = path.split(".")
        obj = spec
        for key in parents:
            obj = obj[int(key)] if key.isdigit() else obj.setdefault(key, {})
        obj[last] = value
    return apply


def _drop(path: str):
    def apply(spec: dict) -> None:
        *parents, last = path.split(".")
        obj = spec
        for key in parents:
            obj = obj[int(key)] if key.isdigit() else obj[key]
        del obj[last]
    return apply


C = "containers.0.securityContext"
BREACHES = {
    "hostNetwork": _set("hostNetwork", True), "hostPID": _set("hostPID", True), "hostIPC": _set("hostIPC", True),
    "privileged": _set(f"{C}.privileged", True),
    "hostPath": _set("volumes", [{"name": "h", "hostPath": {"path": "/"}}]),
    "hostPort": _set("containers.0.ports", [{"containerPort": 80, "hostPort": 80}]),
    "capability beyond baseline": _set(f"{C}.capabilities", {"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
    "capability beyond restricted": _set(f"{C}.capabilities", {"drop": ["ALL"], "add": ["CHOWN"]}),
    "capabilities not dropped": _set(f"{C}.capabilities", {"drop": ["NET_RAW"]}),
    "privilege escalation unset": _drop(f"{C}.allowPrivilegeEscalation"),
    "privilege escalation": _set(f"{C}.allowPrivilegeEscalation", True),
    "runAsNonRoot unset": _drop("securityContext.runAsNonRoot"),
    "container runs as root": _set(f"{C}.runAsNonRoot", False),
    "runAsUser 0": _set(f"{C}.runAsUser", 0),
    "pod runAsUser 0": _set("securityContext.runAsUser", 0),
    "no seccomp": _drop("securityContext.seccompProfile"),
    "seccomp unconfined": _set(f"{C}.seccompProfile", {"type": "Unconfined"}),
    "nfs volume": _set("volumes", [{"name": "n", "nfs": {"server": "s", "path": "/"}}]),
    "unsafe sysctl": _set("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]),
    "procMount": _set(f"{C}.procMount", "Unmasked"),
    "seLinux type": _set(f"{C}.seLinuxOptions", {"type": "spc_t"}),
    "appArmor": _set(f"{C}.appArmorProfile", {"type": "Unconfined"}),
    "hostProcess": _set("securityContext.windowsOptions", {"hostProcess": True}),
    "init container": _set("initContainers", [{"name": "init", "image": "x"}]),
}


def test_the_checker_passes_a_restricted_pod():
    assert restricted_violations(COMPLIANT) == []


@pytest.mark.parametrize("breach", BREACHES)
def test_the_checker_catches_each_documented_breach(breach):
    spec = copy.deepcopy(COMPLIANT)
    BREACHES[breach](spec)
    assert restricted_violations(spec), breach


def test_the_checker_reads_apparmor_annotations():
    assert restricted_violations(COMPLIANT, {"container.apparmor.security.beta.kubernetes.io/main": "unconfined"})
    assert not restricted_violations(COMPLIANT, {"container.apparmor.security.beta.kubernetes.io/main":
                                                 "runtime/default"})


# --- the pods m3tune starts ---------------------------------------------------------------------------------

def _parameters(template: dict) -> dict[str, str]:
    values = {p["name"]: p.get("value", "") for p in template["spec"]["arguments"]["parameters"]}
    return {**values, "root": "s3://m3tune-runs/runs/exp-01"}


def workflow_pods(template: dict, values: dict[str, str] | None = None) -> list[tuple[str, dict, dict]]:
    """(name, pod spec, metadata) of every pod the WorkflowTemplate's templates start, as Argo builds them:
    the workflow's pod-level fields, the template's container and volumes, its podSpecPatch applied; and
    the pods of a resource template's JobSet."""
    spec = template["spec"]
    values = values or _parameters(template)
    pods = []
    for t in spec["templates"]:
        if "container" in t:
            pod = {"serviceAccountName": t.get("serviceAccountName", spec.get("serviceAccountName")),
                   "securityContext": {**spec.get("securityContext", {}), **t.get("securityContext", {})},
                   "containers": [{"name": "main", **t["container"]}],
                   "volumes": spec.get("volumes", []) + t.get("volumes", [])}
            if "podSpecPatch" in t:
                pod.update(json.loads(argo_substitute(t["podSpecPatch"], values)))
            pods.append((t["name"], pod, t.get("metadata", {})))
        elif "resource" in t:
            obj = yaml.safe_load(argo_substitute(t["resource"]["manifest"], values))
            assert obj["kind"] == "JobSet", t["name"]
            for job in obj["spec"]["replicatedJobs"]:
                pod_template = job["template"]["spec"]["template"]
                pods.append((f"{t['name']}/{job['name']}", pod_template["spec"], pod_template.get("metadata", {})))
    return pods


@pytest.fixture(scope="module", params=["default", "example"])
def rendered(request):
    """The chart's WorkflowTemplate, as Helm renders it with default or example values."""
    objects = helm_render(None if request.param == "default" else example_values())
    (template,) = [o for o in objects if o["kind"] == "WorkflowTemplate"]
    return template, objects


def rerun_jobs() -> list[dict]:
    jobs = [d for p in sorted((REPO / "jobs").glob("*.yaml")) for d in docs(p)]
    for step in STEPS:
        args = ["render", "job", step, "--root", "s3://b/runs/r1"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        jobs.append(yaml.safe_load(result.stdout))
    return jobs


def test_every_workflow_pod_passes_restricted(rendered):
    template, objects = rendered
    pods = workflow_pods(template)
    names = {name for name, _, _ in pods}
    assert set(PIPELINE) <= names and "train-multinode/workers" in names
    for name, spec, metadata in pods:
        assert restricted_violations(spec, metadata.get("annotations")) == [], name
    # and whatever other pod-bearing object the chart may render
    for obj in objects:
        spec = _pod_template(obj)
        if spec is not None:
            assert restricted_violations(spec["spec"], spec.get("metadata", {}).get("annotations")) == [], obj


def _pod_template(obj: dict) -> dict | None:
    kind = obj["kind"]
    if kind == "Pod":
        return obj
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return obj["spec"]["template"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return None


def test_every_rerun_job_passes_restricted():
    for job in rerun_jobs():
        spec = job["spec"]["template"]
        assert restricted_violations(spec["spec"], spec["metadata"].get("annotations")) == [], job["metadata"]["name"]


def _writable_and_limited(name: str, spec: dict) -> None:
    """A read-only image, and every place a container may write is an emptyDir with a size limit."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
        writable = [m for m in c.get("volumeMounts", []) if not m.get("readOnly")]
        paths = {m["mountPath"] for m in writable}
        assert {"/tmp", pod_defs.CACHE_DIR, pod_defs.HOME_DIR} <= paths, name
        for mount in writable:
            volume = volumes[mount["name"]]
            assert "emptyDir" in volume and volume["emptyDir"].get("sizeLimit"), (name, mount)
        # the caches the steps write go under a writable mount
        for e in c.get("env", []):
            if e["name"] in ("M3TUNE_CACHE", "HF_HOME"):
                assert any(e["value"].startswith(p + "/") for p in paths), (name, e)


def test_pods_write_only_to_size_limited_emptydirs_and_have_a_deadline(rendered):
    template, _ = rendered
    values = _parameters(template)
    for name, spec, _ in workflow_pods(template):
        _writable_and_limited(name, spec)
    for t in template["spec"]["templates"]:
        if "container" in t:
            assert int(argo_substitute(t["activeDeadlineSeconds"], values)) > 0, t["name"]
        elif "resource" in t:  # activeDeadlineSeconds applies to container templates only
            assert argo_substitute(t["timeout"], values) == values["gpu-deadline"] + "s"
            jobset = yaml.safe_load(argo_substitute(t["resource"]["manifest"], values))
            for job in jobset["spec"]["replicatedJobs"]:
                assert job["template"]["spec"]["activeDeadlineSeconds"] == int(values["gpu-deadline"])
    for job in rerun_jobs():
        _writable_and_limited(job["metadata"]["name"], job["spec"]["template"]["spec"])
        assert job["spec"]["activeDeadlineSeconds"] > 0


def _keys(container: dict, names) -> set[str]:
    return {e["name"] for e in container.get("env", []) if e["name"] in names}


@pytest.mark.parametrize("keys, flag, expected", [
    (pod_defs.LLM_KEYS, "api_keys", {"generate-queries", "generate-conceptual", "evaluate"}),
    (tuple(pod_defs.QDRANT_KEYS), "qdrant", {"publish"}),
], ids=["llm", "qdrant"])
def test_secret_keys_reach_only_the_steps_that_need_them(keys, flag, expected):
    """LLM keys only where a step calls an API; production Qdrant's URL and key only in publish: in the Argo
    pods and in the Jobs of `m3tune rerun` alike."""
    callers = {n for n, s in STEPS.items() if getattr(s, flag)}
    assert callers == expected
    template = render_workflow_template()
    seen = set()
    for name, spec, metadata in workflow_pods(template):
        step = metadata["labels"][pod_defs.STEP_LABEL]
        (container,) = spec["containers"]
        assert _keys(container, keys) == (set(keys) if step in callers else set()), name
        seen.add(step)
    assert callers <= seen
    for job in rerun_jobs():
        step = job["metadata"]["labels"][pod_defs.STEP_LABEL]
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert _keys(container, keys) == (set(keys) if step in callers else set()), step


def _rules(objects: list[dict], role: str) -> set[tuple[str, str, str]]:
    (found,) = [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == role]
    return {(g, r, v) for rule in found["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def test_only_the_jobset_task_may_create_jobsets(rendered):
    template, objects = rendered
    by_pod = {name: spec["serviceAccountName"] for name, spec, _ in workflow_pods(template)}
    creators = {name for name, t in ((t["name"], t) for t in template["spec"]["templates"])
                if t.get("serviceAccountName") == pod_defs.JOBSET_SERVICE_ACCOUNT}
    assert creators == {"train-multinode"}  # the one resource template that creates a JobSet
    assert all(sa == pod_defs.SERVICE_ACCOUNT for name, sa in by_pod.items()), by_pod  # incl. the JobSet's workers
    jobset_create = ("jobset.x-k8s.io", "jobsets", "create")
    for roles in (objects, docs(REPO / "manifests/rbac.yaml")):
        assert jobset_create not in _rules(roles, pod_defs.SERVICE_ACCOUNT)
        assert jobset_create in _rules(roles, pod_defs.JOBSET_SERVICE_ACCOUNT)
        bindings = {o["metadata"]["name"]: (o["roleRef"]["name"], [s["name"] for s in o["subjects"]])
                    for o in roles if o["kind"] == "RoleBinding"}
        for account in (pod_defs.SERVICE_ACCOUNT, pod_defs.JOBSET_SERVICE_ACCOUNT):
            assert bindings[account] == (account, [account])


def test_a_gpu_step_added_to_the_pipeline_gets_the_same_pod_security():
    steps = dict(STEPS)
    steps["index"] = dataclasses.replace(STEPS["index"], gpu=True)
    for name, spec, _ in workflow_pods(render_workflow_template(steps)):
        assert restricted_violations(spec) == [], name
