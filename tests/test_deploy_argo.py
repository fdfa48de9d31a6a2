"""The generated Argo WorkflowTemplate: current with the pipeline, faithful to it, lossless through Hera's models."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from m3tune.cli import app
from m3tune.deploy.argo import jobset_manifest, render_files, render_workflow_template
from m3tune.deploy.images import CPU, CUDA, ENTRYPOINT, HOME_DIR, IMAGES
from m3tune.pipeline import OPTIONAL, PIPELINE, STEPS

REPO = Path(__file__).resolve().parent.parent
JOBS = {  # committed file -> the `m3tune render job` arguments that produce it (as in `make render`)
    "rerun-mine-negatives.yaml": ["mine-negatives", "--root", "s3://m3tune-runs/runs/exp-01"],
    "rerun-mine-negatives-shard.yaml": ["mine-negatives", "--root", "s3://m3tune-runs/runs/exp-01", "--rank", "1",
                                        "--world-size", "4"],
}
STALE = "stale: re-render with `make render` (m3tune render argo --output argo --chart charts/m3tune)"


def test_committed_files_equal_a_fresh_render(tmp_path):
    result = CliRunner().invoke(app, ["render", "argo", "--output", str(tmp_path / "argo"), "--chart",
                                      str(tmp_path / "chart")])
    assert result.exit_code == 0, result.output
    for name, text in render_files().items():
        assert (tmp_path / "argo" / name).read_text() == text
        assert (REPO / "argo" / name).read_text() == text, f"argo/{name} is {STALE}"
    assert (REPO / "charts/m3tune/files/workflowtemplate.yaml").read_text() == render_files()["workflowtemplate.yaml"]
    assert sorted(p.name for p in (REPO / "jobs").glob("*.yaml")) == sorted(JOBS)
    for name, args in JOBS.items():
        fresh = CliRunner().invoke(app, ["render", "job", *args])
        assert fresh.exit_code == 0, fresh.output
        assert (REPO / "jobs" / name).read_text() == fresh.stdout, f"jobs/{name} is {STALE}"


def dag(template: dict) -> dict[str, dict]:
    (entry,) = [t for t in template["spec"]["templates"] if t["name"] == template["spec"]["entrypoint"]]
    return {t["name"]: t for t in entry["dag"]["tasks"]}


def test_the_dag_is_the_pipeline_definition():
    template = render_workflow_template()
    tasks = dag(template)
    by_name = {t["name"]: t for t in template["spec"]["templates"]}
    # one final task per step, in the pipeline's order (a distributed step's multi-node twin beside it), then
    # the optional steps (publish), each run only when its parameter says so
    finals = [n for n in tasks if not n.endswith(("-shard", "-multinode"))]
    assert finals == PIPELINE + OPTIONAL
    assert all(tasks[n]["when"] == "{{workflow.parameters.%s}} == true" % n for n in OPTIONAL)
    for name in PIPELINE + OPTIONAL:
        step, task = STEPS[name], tasks[name]
        if step.shardable:
            shard = tasks[f"{name}-shard"]
            assert task["dependencies"] == [f"{name}-shard"]
            assert set(shard.get("dependencies", [])) == set(step.needs)
            assert shard["withSequence"] == {"count": f"{{{{workflow.parameters.{name}-shards}}}}"}
            args = by_name[f"{name}-shard"]["container"]["args"]
            assert args[args.index("--rank") + 1] == "{{inputs.parameters.rank}}"
            assert "--merge-shards" in by_name[name]["container"]["args"]
        else:  # an upstream distributed step is reached through both of its tasks (one of them skipped)
            wanted = {d for n in step.needs for d in ([n, f"{n}-multinode"] if STEPS[n].distributed else [n])}
            assert set(task.get("dependencies", [])) == wanted
        container = by_name[name]["container"]
        assert container["image"] == "{{workflow.parameters.image-%s}}" % ("gpu" if step.gpu else "cpu")
        args = container["args"] if not step.distributed else container["command"][container["command"].index("step"):]
        assert args[:6] == ["step", name, "--root", "{{workflow.parameters.root}}", "--config",
                                         "/etc/m3tune/config/{{workflow.parameters.config}}"]
        assert by_name[name]["retryStrategy"]["backoff"]["factor"] == "2"
        assert "!= 2" in by_name[name]["retryStrategy"]["expression"]
    params = {p["name"]: p for p in template["spec"]["arguments"]["parameters"]}
    assert "value" not in params["root"] and params["image-cpu"]["value"] == CPU.ref()
    assert template["spec"]["serviceAccountName"] == "m3tune-workflow"


def test_a_step_added_to_the_pipeline_appears_after_a_re_render():
    steps = dict(STEPS)
    steps["combine-like"] = dataclasses.replace(STEPS["analyze"], name="combine-like", needs=("mine-negatives",))
    tasks = dag(render_workflow_template(steps, PIPELINE + ["combine-like"]))
    assert tasks["combine-like"]["dependencies"] == ["mine-negatives"]
    with pytest.raises(Exception, match="needs mine-negatives"):
        render_workflow_template(steps, ["ingest", "combine-like"])


@pytest.fixture(scope="module")
def gpu_template():
    """The template with a GPU, distributed step (train when it is in the pipeline, else index made one)."""
    steps = dict(STEPS)
    name = next((n for n in PIPELINE if STEPS[n].distributed), None)
    if name is None:
        name = "index"
        steps[name] = dataclasses.replace(STEPS[name], gpu=True, distributed=True)
    return name, steps[name], render_workflow_template(steps)


def test_gpu_steps_get_the_cuda_image_gpus_shm_and_node_placement(gpu_template):
    name, _, template = gpu_template
    by_name = {t["name"]: t for t in template["spec"]["templates"]}
    single = by_name[name]
    container = single["container"]
    assert container["image"] == "{{workflow.parameters.image-gpu}}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{workflow.parameters.gpus-per-node}}"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "{{workflow.parameters.shm-size}}"}} in \
        single["volumes"]
    params = {p["name"]: p.get("value") for p in template["spec"]["arguments"]["parameters"]}
    assert json.loads(argo_substitute(single["podSpecPatch"], params)) == {"nodeSelector": {}, "tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    placed = {**params, "gpu-node-selector": '{"pool": "h100"}', "gpu-tolerations": "[]"}
    assert json.loads(argo_substitute(single["podSpecPatch"], placed)) == {"nodeSelector": {"pool": "h100"},
                                                                           "tolerations": []}
    assert container["command"][:2] == ["accelerate", "launch"]
    assert container["command"][-5:-3] == ["-m", "m3tune.cli"] or "m3tune.cli" in container["command"]
    assert params["image-gpu"] == CUDA.ref()
    tasks = dag(template)
    assert tasks[name]["when"] == f"{{{{workflow.parameters.{name}-nodes}}}} == 1"
    assert tasks[f"{name}-multinode"]["when"] == f"{{{{workflow.parameters.{name}-nodes}}}} > 1"
    downstream = [t for t in tasks.values() if name in t.get("dependencies", [])]
    assert all(f"{name}-multinode" in t["dependencies"] for t in downstream)


def _jsonpath_root(text: str, path: str):
    assert path == "$"
    return json.loads(text)  # Argo's jsonpath fails on text that is not JSON, and so the workflow


def argo_substitute(text: str, values: dict[str, str], *, workflow_name: str = "m3tune-x1") -> str:
    """Argo's substitution in a text field it parses afterwards (a podSpecPatch, a resource manifest).

    A simple tag (`{{workflow.parameters.X}}`) is pasted as the parameter's text, as Argo pastes it. An
    expression (`{{=…}}`) is evaluated: the subset m3tune writes (toJson, jsonpath(…, "$"), asInt, string,
    `+`, `*`, string literals, `workflow.parameters["X"]`) is Python syntax too, with the same meaning."""
    env = {"toJson": json.dumps, "jsonpath": _jsonpath_root, "asInt": int, "string": str,
           "workflow": SimpleNamespace(parameters=values, name=workflow_name)}
    # eval of expressions from our own generated template, with no builtins
    text = re.sub(r"\{\{=(.*?)\}\}", lambda m: str(eval(m[1], {"__builtins__": {}}, env)), text)  # noqa: S307
    text = text.replace("{{workflow.name}}", workflow_name)
    return re.sub(r"\{\{workflow\.parameters\.([\w-]+)\}\}", lambda m: values[m[1]], text)


def test_multi_node_training_is_a_jobset_whose_jobs_are_valid(gpu_template):
    import kubernetes_validate

    name, step, template = gpu_template
    by_name = {t["name"]: t for t in template["spec"]["templates"]}
    resource = by_name[f"{name}-multinode"]["resource"]
    assert resource["action"] == "create" and resource["setOwnerReference"] is True
    assert resource["successCondition"] == "status.terminalState == Completed"
    assert resource["failureCondition"] == "status.terminalState == Failed"
    assert resource["manifest"] == jobset_manifest(step)
    values = {p["name"]: p.get("value", "") for p in template["spec"]["arguments"]["parameters"]}
    values.update({f"{name}-nodes": "3", "gpus-per-node": "8", "root": "s3://b/runs/r1"})
    jobset = yaml.safe_load(argo_substitute(resource["manifest"], values))
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["spec"]["network"]["enableDNSHostnames"]
    (workers,) = jobset["spec"]["replicatedJobs"]
    job_spec = workers["template"]["spec"]
    assert job_spec["parallelism"] == job_spec["completions"] == 3 and job_spec["completionMode"] == "Indexed"
    command = job_spec["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--num_machines") + 1] == "3" and command[command.index("--num_processes") + 1] == "24"
    assert command[command.index("--main_process_ip") + 1] == "$(JOBSET_NAME)-workers-0-0.$(JOBSET_NAME)"
    assert job_spec["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert job_spec["activeDeadlineSeconds"] == int(values["gpu-deadline"])
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "train-workers"}, "spec": job_spec}
    kubernetes_validate.validate(job, "1.30", strict=True)  # the JobSet's Job template, strictly


def test_train_waits_for_the_analyze_gate():
    """analyze exits 3 on a missed target; on Argo a task starts when its dependencies are done, so the GPU
    step must depend on analyze or it runs beside it and a miss stops nothing."""
    tasks = dag(render_workflow_template())

    def upstream(name: str) -> set[str]:
        deps = set(tasks[name].get("dependencies", []))
        return deps.union(*(upstream(d) for d in deps)) if deps else deps

    gpu_tasks = [n for n, t in tasks.items() if STEPS[n.removesuffix("-multinode").removesuffix("-shard")].gpu]
    assert {"train", "train-multinode"} <= set(gpu_tasks)
    for name in gpu_tasks:
        assert "analyze" in tasks[name]["dependencies"], name
    assert "analyze" in upstream("evaluate")
    # locally the gate is the pipeline's order
    assert PIPELINE.index("analyze") < PIPELINE.index("train")


def test_a_parameter_cannot_add_fields_to_a_pod(gpu_template):
    """A submitter sets parameters; Argo pastes a simple tag's text into a patch or a manifest as it is.
    m3tune's text fields parse each parameter as one value: a hostile value fails or stays a value."""
    name, _, template = gpu_template
    by_name = {t["name"]: t for t in template["spec"]["templates"]}
    values = {p["name"]: p.get("value", "") for p in template["spec"]["arguments"]["parameters"]}
    values.update({"root": "s3://b/runs/r1", f"{name}-nodes": "2"})
    patch, manifest = by_name[name]["podSpecPatch"], by_name[f"{name}-multinode"]["resource"]["manifest"]
    inject = {**values, "gpu-node-selector": '{}, "hostPID": true, "x": {}'}
    for text in (patch, manifest):
        with pytest.raises(ValueError):  # not one JSON value: Argo's jsonpath fails, the workflow errors
            argo_substitute(text, inject)
    # a value that closes its string and opens new fields stays the string it is
    hostile = 's3://b/runs/r1",\n"hostPID": true, "privileged": "'
    jobset = yaml.safe_load(argo_substitute(manifest, {**values, "root": hostile}))
    pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[command.index("--root") + 1] == hostile
    assert "hostPID" not in pod and set(pod["containers"][0]) == {"name", "image", "command", "env", "ports",
                                                                  "resources", "securityContext", "volumeMounts"}


def round_trip(obj: dict, model) -> dict:
    return model.model_validate(obj).model_dump(mode="json", by_alias=True, exclude_none=True)


@pytest.mark.parametrize("name", ["workflowtemplate.yaml", "workflow.yaml"])
def test_argo_objects_survive_hera_models_without_losing_a_field(name, gpu_template):
    from hera.workflows import models as m

    model = m.WorkflowTemplate if name == "workflowtemplate.yaml" else m.Workflow
    committed = yaml.safe_load((REPO / "argo" / name).read_text())
    assert round_trip(committed, model) == committed
    if model is m.WorkflowTemplate:
        assert round_trip(gpu_template[2], model) == gpu_template[2]
        # the check can fail: a misspelt field is silently dropped by the models, and caught here
        typo = copy.deepcopy(committed)
        typo["spec"]["templates"][1]["retryStrategey"] = typo["spec"]["templates"][1].pop("retryStrategy")
        assert round_trip(typo, model) != typo


def test_images_install_declared_extras_run_as_non_root_with_the_m3tune_entrypoint():
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    bake = (REPO / "images/docker-bake.hcl").read_text()
    for image in IMAGES.values():
        text = (REPO / image.dockerfile).read_text()
        (base,) = re.findall(r"^FROM (\S+)", text, re.M)
        (wanted,) = re.findall(r"^ARG EXTRAS=(\S+)", text, re.M)
        assert set(wanted.split(",")) <= extras - {"dev"}, image.name
        assert '".[${EXTRAS}]"' in text
        assert re.search(r"^USER 10001$", text, re.M) and "useradd" in text and "--uid 10001" in text
        assert re.findall(r"^ENTRYPOINT (.+)$", text, re.M) == [json.dumps([ENTRYPOINT])]
        # the home folder the pods mount an emptyDir on (their root filesystem is read-only) is the user's
        assert re.findall(r"^WORKDIR (\S+)$", text, re.M)[-1] == HOME_DIR
        # every install uses the project's pins: the extras' line, and the constraints file it reads is the
        # project's (the CUDA image swaps torch's pin for the base image's own build)
        (install,) = [line for line in text.splitlines() if '".[${EXTRAS}]"' in line]
        constraints = re.search(r"-c (\S+)", install)
        assert constraints, f"{image.dockerfile}: the extras are installed without the constraints file"
        assert constraints[1] == "constraints/dev.txt" or f"constraints/dev.txt; echo \"torch==" in text
        assert "COPY constraints ./constraints" in text
        assert f'dockerfile = "{image.dockerfile}"' in bake and f'm3tune-{image.name}:${{TAG}}' in bake
        if image is CUDA:
            assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base)
            assert {"train", "deepspeed"} <= set(wanted.split(","))
        else:
            assert base.startswith("python:3.11") and "train" not in wanted and "download.pytorch.org/whl/cpu" in text
    from m3tune import __version__

    assert re.search(r'variable "TAG" \{\s*default = "%s"' % re.escape(__version__), bake)


def test_readme_commands_use_what_the_template_and_cli_take():
    # the README's ten lines and the Kubernetes page's guide
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Running on Kubernetes")
    section = readme[start:readme.index("\n## ", start + 1)] + (REPO / "docs" / "kubernetes.md").read_text()
    names = {p["name"] for p in render_workflow_template()["spec"]["arguments"]["parameters"]}
    given = re.findall(r"-p ([\w-]+)=", section) + re.findall(r"workflowParameters\.([\w-]+)=", section)
    assert given and set(given) <= names
    for line in re.findall(r"^m3tune render job ([^|\n]+)", section, re.M):
        result = CliRunner().invoke(app, ["render", "job", *line.split()])
        assert result.exit_code == 0, (line, result.output)
    for cmd in ("submit", "rerun", "runs"):
        assert f"m3tune {cmd}" in section
        assert CliRunner().invoke(app, [cmd, "--help"]).exit_code == 0


def test_render_job_takes_a_config_map_key_not_a_path():
    """`--config ../..` would have the pod read a file outside the mounted ConfigMap."""
    for bad in ("../..", "../run.yaml", "a/b.yaml", ".."):
        result = CliRunner().invoke(app, ["render", "job", "combine", "--root", "s3://b/runs/r1", "--config", bad])
        assert result.exit_code != 0 and "a key of the m3tune-config ConfigMap" in result.output, bad
    ok = CliRunner().invoke(app, ["render", "job", "combine", "--root", "s3://b/runs/r1", "--config", "exp-2.yaml"])
    assert ok.exit_code == 0, ok.output
