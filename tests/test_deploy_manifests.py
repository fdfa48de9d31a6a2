"""Plain Kubernetes objects (manifests/, jobs/) validated strictly, offline; the chart rendered and linted
by Helm's own engine, with default and example values; its values schema; and no secret value anywhere a
render puts one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from m3tune.cli import app, load_run_config
from m3tune.deploy.argo import render_workflow_template
from m3tune.deploy.images import CPU, CUDA

REPO = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.30"
CHART = REPO / "charts/m3tune"


def strict(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", sorted((REPO / "manifests").glob("*.yaml")) + sorted((REPO / "jobs").glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_plain_objects_are_strictly_valid(path):
    objects = docs(path)
    assert objects
    for obj in objects:
        strict(obj)


def test_a_strict_validation_catches_a_misspelt_field():
    import kubernetes_validate

    (job,) = docs(REPO / "jobs/rerun-mine-negatives.yaml")
    job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        strict(job)


EXAMPLE_VALUES = CHART / "examples/production.yaml"
RELEASE = {"name": "m3tune", "namespace": "m3tune"}


def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def example_values() -> dict:
    return yaml.safe_load(EXAMPLE_VALUES.read_text())


def helm_render(values: dict | None = None) -> list[dict]:
    """The chart rendered by Helm's own engine (Helm v4's Go SDK, through helm-python-sdk), as `helm
    template -n m3tune m3tune charts/m3tune -f VALUES` prints it: every object, schema checked first."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(values))
        rendered = chart.render(values, **RELEASE)
    return [obj for path, text in sorted(rendered.items()) if path.endswith(".yaml")
            for obj in yaml.safe_load_all(text) if obj]


@pytest.mark.parametrize("values", [None, "example", {"rbac": {"create": False}}], ids=["default", "example", "no-rbac"])
def test_the_chart_renders_through_helm_to_valid_objects(values):
    from hera.workflows import models as m

    values = example_values() if values == "example" else values
    objects = helm_render(values)
    kinds = [(o["kind"], o["metadata"]["name"]) for o in objects]
    rbac = [(k, n) for n in ("m3tune-workflow", "m3tune-jobset") for k in ("ServiceAccount", "Role", "RoleBinding")]
    wanted = [("ConfigMap", "m3tune-config"), *(rbac if (values or {}).get("rbac", {}).get("create", True) else []),
              ("WorkflowTemplate", "m3tune")]
    assert sorted(kinds) == sorted(wanted)
    for obj in objects:
        assert obj["metadata"]["namespace"] == "m3tune"
        if obj["kind"] == "WorkflowTemplate":  # a custom resource: Hera's models of Argo's API, losing no field
            assert m.WorkflowTemplate.model_validate(obj).model_dump(mode="json", by_alias=True, exclude_none=True) == obj
        else:
            strict(obj)
    # Helm passed the generated template through untouched, except its namespace and parameter defaults
    (wt,) = [o for o in objects if o["kind"] == "WorkflowTemplate"]
    committed = yaml.safe_load((REPO / "argo/workflowtemplate.yaml").read_text())
    strip = lambda t: {**t, "metadata": {k: v for k, v in t["metadata"].items() if k != "namespace"},  # noqa: E731
                       "spec": {**t["spec"], "arguments": None}}
    assert strip(wt) == strip(committed)
    defaults = {p["name"]: p.get("value") for p in wt["spec"]["arguments"]["parameters"]}
    overrides = {k: str(v) for k, v in (values or {}).get("workflowParameters", {}).items()}
    assert {k: defaults[k] for k in overrides} == overrides


def test_helm_lint_finds_nothing_but_the_optional_subchart_it_cannot_fetch_here():
    import helm_python as helm

    for values in (None, example_values()):
        report = helm.lint(CHART, values, strict=True, namespace="m3tune", kube_version="v1.30.0")
        findings = [(msg["severity"], msg["error"]) for msg in report["messages"] if msg["severity"] >= 2]
        # `helm dependency build` fetches the optional Qdrant chart from its repository (no network here)
        assert findings == [(2, "chart directory is missing these dependencies: qdrant")], report
    # and lint does fail a broken chart: a values file the schema refuses
    report = helm.lint(CHART, {"images": {"cpu": {"repository": "x", "tag": "1", "digest": "latest"}}},
                       namespace="m3tune")
    assert any("digest" in e for e in report["errors"]), report


def test_images_are_pinned_by_digest_when_the_values_give_one():
    import helm_python as helm

    def images(values):
        (wt,) = [o for o in helm_render(values) if o["kind"] == "WorkflowTemplate"]
        params = {p["name"]: p.get("value") for p in wt["spec"]["arguments"]["parameters"]}
        return params["image-cpu"], params["image-gpu"]

    assert images(None) == (CPU.ref(), CUDA.ref())  # tags by default: the chart's appVersion
    example = example_values()
    cpu, gpu = images(example)
    for ref, image in ((cpu, example["images"]["cpu"]), (gpu, example["images"]["cuda"])):
        assert ref == f"{image['repository']}:{image['tag']}@{image['digest']}"
    digest_only = {"images": {**chart_values()["images"], "cpu": {"repository": "r/cpu", "tag": "", "digest":
                                                                 "sha256:" + "ab" * 32}}}
    assert images(digest_only)[0] == "r/cpu:0.1.0@sha256:" + "ab" * 32
    # a mistyped digest, or an image given as a parameter (which would bypass the pin), is refused
    with helm.Chart.load(CHART) as chart:
        for bad in ({"images": {"cpu": {"repository": "r/cpu", "tag": "", "digest": "sha256:abc"}}},
                    {"workflowParameters": {"image-cpu": "r/cpu:latest"}}):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(chart.merge_values(bad))


def test_the_namespace_enforces_pod_security_restricted():
    (namespace,) = docs(REPO / "manifests/namespace.yaml")
    labels = namespace["metadata"]["labels"]
    for mode in ("enforce", "warn", "audit"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
    # helm install --create-namespace makes a namespace without them: the docs say how to add them
    prerequisites = (REPO / "manifests/prerequisites.md").read_text()
    assert "pod-security.kubernetes.io/enforce=restricted" in prerequisites
    assert "manifests/namespace.yaml" in (CHART / "values.yaml").read_text()


def test_every_packaged_run_config_is_a_valid_m3tune_config(tmp_path):
    (config_map,) = docs(REPO / "manifests/config.yaml")
    configs = {**config_map["data"], **chart_values()["configs"],
               **{f"example-{k}": v for k, v in example_values()["configs"].items()}}
    assert {"run.yaml", "demo.yaml"} <= set(configs)
    for name, text in configs.items():
        path = tmp_path / name
        path.write_text(text)
        load_run_config(path)  # raises on an unknown step or option
    assert load_run_config(tmp_path / "demo.yaml")["index"].encoder.model == "local:tiny-xlmr"


def test_values_schema_is_strict_and_values_match_the_template():
    import jsonschema

    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    values = chart_values()
    jsonschema.validate(values, schema)
    jsonschema.validate(example_values(), schema)
    for bad in ({**values, "imagez": "x"}, {**values, "rbac": {"create": True, "extra": 1}},
                {**values, "configs": {"run.txt": "{}"}}, {**values, "workflowParameters": {"Bad Name": "x"}},
                # a root Argo or the kubelet would substitute into the container args (a secret, a tag)
                *({**values, "workflowParameters": {"root": root}} for root in (
                    "s3://b/$(AWS_SECRET_ACCESS_KEY)/r1", "s3://b/{{workflow.name}}/r1", "s3://b/r1\nx"))):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    # the chart's workflowParameters can only set parameters the template has
    names = {p["name"] for p in render_workflow_template()["spec"]["arguments"]["parameters"]}
    assert set(values["workflowParameters"]) <= names
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    (qdrant,) = chart["dependencies"]
    assert qdrant["condition"] == "qdrant.enabled" and values["qdrant"]["enabled"] is False
    assert "{{" not in (CHART / "templates/workflowtemplate.yaml").read_text().split("*/")[-1].replace(
        "{{-", "").replace("{{ ", "").replace("{{", "")  # no raw Argo expression in the Helm template


PLANTED = {"AWS_SECRET_ACCESS_KEY": "planted-aws-secret-9d1e", "AWS_ACCESS_KEY_ID": "AKIAPLANTED0000001",
           "OPENROUTER_API_KEY": "sk-or-planted-5c2b", "OPENAI_API_KEY": "sk-planted-openai-77"}


def test_no_secret_value_in_any_rendered_object_or_manifest(monkeypatch, tmp_path):
    for key, value in PLANTED.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    texts = []
    result = runner.invoke(app, ["render", "argo", "--output", str(tmp_path), "--chart", str(tmp_path / "chart")])
    assert result.exit_code == 0
    texts += [result.output] + [p.read_text() for p in tmp_path.rglob("*.yaml")]
    for step in ("ingest", "mine-negatives", "generate-queries"):
        job = runner.invoke(app, ["render", "job", step, "--root", "s3://b/runs/r1"])
        assert job.exit_code == 0
        texts.append(job.output)
    texts += [p.read_text() for d in ("manifests", "jobs", "argo", "charts", "images") for p in (REPO / d).rglob("*")
              if p.is_file()]
    everything = "\n".join(texts)
    for value in PLANTED.values():
        assert value not in everything
    # the credentials are there, as references
    assert "secretKeyRef" in everything and "AWS_SECRET_ACCESS_KEY" in everything
    # and the example Secrets hold placeholders only
    for secret in docs(REPO / "manifests/secrets.example.yaml"):
        assert set(secret["stringData"].values()) == {"REPLACE_ME"}
