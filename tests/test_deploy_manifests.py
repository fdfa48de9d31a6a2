"""Plain Kubernetes objects (manifests/, jobs/, the chart's core objects) validated strictly, offline;
the chart's values schema; and no secret value anywhere a render puts one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from m3tune.cli import app, load_run_config
from m3tune.deploy.argo import render_workflow_template

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


# The chart's core templates use only this subset of Helm's template language, so that this
# test can render them without a Helm binary (none exists here): values by path, release and
# chart fields, `if` on a value, and `toYaml VALUE | nindent N`. Anything else fails the test.
_TAG = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}")


def helm_lite(text: str, values: dict, release: dict) -> str:
    def lookup(path: str):
        root, *rest = path.lstrip(".").split(".")
        obj = {"Values": values, "Release": release, "Chart": {"Version": "0.1.0", "Name": "m3tune"}}[root]
        for key in rest:
            obj = obj[key]
        return obj

    out, keep = [], [True]
    for line in text.splitlines():
        tags = _TAG.findall(line)
        if tags and _TAG.sub("", line).strip() == "" and len(tags) == 1 and (tags[0].startswith(("if ", "end"))):
            keep.append(bool(lookup(tags[0][3:]))) if tags[0].startswith("if ") else keep.pop()
            continue
        if not all(keep):
            continue
        if m := re.fullmatch(r"(\s*)\{\{-\s*toYaml (\S+) \| nindent (\d+)\s*\}\}", line):
            out.append(re.sub(r"^", " " * int(m[3]), yaml.safe_dump(lookup(m[2]), sort_keys=False).rstrip(), flags=re.M))
            continue
        for tag in tags:
            assert re.fullmatch(r"\.(Values|Release|Chart)(\.\w+)+", tag), f"unsupported template: {tag}"
        out.append(_TAG.sub(lambda m: str(lookup(m[1])), line))
    return "\n".join(out) + "\n"


def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_chart_core_objects_render_to_valid_objects():
    values = chart_values()
    release = {"Namespace": "m3tune", "Name": "m3tune"}
    kinds = []
    for name in ("rbac.yaml", "configmap.yaml"):
        rendered = helm_lite((CHART / "templates" / name).read_text(), values, release)
        for obj in yaml.safe_load_all(rendered):
            if obj:
                strict(obj)
                kinds.append(obj["kind"])
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap"]
    off = helm_lite((CHART / "templates/rbac.yaml").read_text(), {**values, "rbac": {"create": False}}, release)
    assert not [d for d in yaml.safe_load_all(off) if d]


def test_every_packaged_run_config_is_a_valid_m3tune_config(tmp_path):
    (config_map,) = docs(REPO / "manifests/config.yaml")
    configs = {**config_map["data"], **chart_values()["configs"]}
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
    for bad in ({**values, "imagez": "x"}, {**values, "rbac": {"create": True, "extra": 1}},
                {**values, "configs": {"run.txt": "{}"}}, {**values, "workflowParameters": {"Bad Name": "x"}}):
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
