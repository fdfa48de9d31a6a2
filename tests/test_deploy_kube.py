"""`m3tune submit / rerun / runs` through the real kubernetes client, against a loopback Kubernetes API."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kube_server import KubeServer, kubeconfig
from m3tune.cli import app
from m3tune.deploy.argo import render_workflow_template

TOKEN = "planted-kube-token-7f3a9c"
ROOT = "s3://m3tune-runs/runs/exp-01"


@pytest.fixture
def kube(tmp_path):
    with KubeServer(TOKEN) as server:
        config = tmp_path / "kubeconfig"
        config.write_text(kubeconfig(server.url, TOKEN))
        yield server, str(config)


def m3tune(config: str, *args: str):
    result = CliRunner().invoke(app, [*args, "--kubeconfig", config])
    return result.exit_code, result.stdout, result.stderr


def installed_template(server: KubeServer) -> dict:
    template = render_workflow_template()
    template["metadata"]["namespace"] = "m3tune"
    server.put("workflowtemplates", template)
    return template


def test_submit_creates_a_workflow_from_the_installed_template(kube):
    server, config = kube
    installed_template(server)
    code, out, err = m3tune(config, "submit", "-p", f"root={ROOT}", "-p", "mine-negatives-shards=4")
    assert code == 0, err
    name = out.strip()
    assert name.startswith("m3tune-")
    posted = [r for r in server.requests if r["method"] == "POST"]
    assert [r["path"] for r in posted] == ["/apis/argoproj.io/v1alpha1/namespaces/m3tune/workflows"]
    body = posted[0]["body"]
    assert body["spec"]["workflowTemplateRef"] == {"name": "m3tune"}
    assert body["spec"]["arguments"]["parameters"] == [{"name": "root", "value": ROOT},
                                                       {"name": "mine-negatives-shards", "value": "4"}]
    assert body["metadata"]["labels"]["app.kubernetes.io/part-of"] == "m3tune"
    assert all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in server.requests)
    assert ("workflows", "m3tune", name) in server.objects


def test_submit_refuses_unknown_or_missing_parameters_before_creating_anything(kube):
    server, config = kube
    installed_template(server)
    code, _, err = m3tune(config, "submit", "-p", f"root={ROOT}", "-p", "shards=4")
    assert code == 1 and "unknown parameter(s) shards" in err and "mine-negatives-shards" in err
    code, _, err = m3tune(config, "submit", "-p", "config=run.yaml")
    assert code == 1 and "missing parameter(s): root" in err
    code, _, err = m3tune(config, "submit", "-p", "root")
    assert code == 1 and "expected NAME=VALUE" in err
    assert not [r for r in server.requests if r["method"] == "POST"]


def test_submit_without_template_or_permission_says_what_to_do(kube):
    server, config = kube
    code, _, err = m3tune(config, "submit", "-p", f"root={ROOT}")
    assert code == 1 and "HTTP 404" in err and "helm install" in err
    installed_template(server)
    server.forbid("/apis/argoproj.io/v1alpha1/namespaces/m3tune/workflows")
    code, _, err = m3tune(config, "submit", "-p", f"root={ROOT}")
    assert code == 1 and "HTTP 403" in err and 'cannot post resource "workflows"' in err
    assert "m3tune-submitter" in err and TOKEN not in err


def test_rerun_creates_the_single_step_job_and_refuses_a_second_writer(kube):
    server, config = kube
    code, out, err = m3tune(config, "rerun", "mine-negatives", "--root", ROOT, "--rank", "1", "--world-size", "4")
    assert code == 0, err
    assert out.strip() == "m3tune-rerun-mine-negatives-exp-01-1-of-4"
    job = server.objects[("jobs", "m3tune", out.strip())]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["step", "mine-negatives", "--root", ROOT, "--config", "/etc/m3tune/config/run.yaml",
                                 "--wait-lock", "300", "--rank", "1", "--world-size", "4"]
    code, _, err = m3tune(config, "rerun", "mine-negatives", "--root", ROOT, "--rank", "1", "--world-size", "4")
    assert code == 1 and "HTTP 409" in err and "already exists" in err and "kubectl -n m3tune get job" in err
    code, _, err = m3tune(config, "rerun", "ingest", "--root", ROOT, "--rank", "1", "--world-size", "4")
    assert code == 1 and "not shardable" in err
    code, _, err = m3tune(config, "rerun", "ingest", "--root", "runs/local")
    assert code == 1 and "s3://" in err


def test_runs_lists_workflows_with_their_step_states(kube):
    server, config = kube
    template = installed_template(server)
    phases = {"ingest": "Succeeded", "generate-queries": "Succeeded", "generate-conceptual": "Failed"}
    nodes = {"m3tune-abc": {"id": "m3tune-abc", "displayName": "m3tune-abc", "type": "DAG", "phase": "Failed"}}
    for i, (task, phase) in enumerate(phases.items()):
        nodes[f"m3tune-abc-{i}"] = {"id": f"m3tune-abc-{i}", "displayName": task, "type": "Retry", "phase": phase}
        nodes[f"m3tune-abc-{i}9"] = {"id": f"m3tune-abc-{i}9", "displayName": f"{task}(0)", "type": "Pod",
                                     "phase": phase}
    server.put("workflows", {
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
        "metadata": {"name": "m3tune-abc", "namespace": "m3tune", "creationTimestamp": "2025-01-02T03:04:05Z",
                     "labels": {"app.kubernetes.io/name": "m3tune", "app.kubernetes.io/part-of": "m3tune"}},
        "spec": {"workflowTemplateRef": {"name": "m3tune"}, "arguments": {"parameters": [{"name": "root", "value": ROOT}]}},
        "status": {"phase": "Failed", "startedAt": "2025-01-02T03:04:06Z", "finishedAt": "2025-01-02T03:10:00Z",
                   "nodes": nodes, "storedWorkflowTemplateSpec": template["spec"]},
    })
    server.put("workflows", {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
                             "metadata": {"name": "other", "namespace": "m3tune", "labels": {"app": "other"}},
                             "spec": {}})
    code, out, err = m3tune(config, "runs", "--json")
    assert code == 0, err
    (run,) = json.loads(out)
    assert run["name"] == "m3tune-abc" and run["phase"] == "Failed" and run["root"] == ROOT
    assert run["steps"]["ingest"] == "Succeeded" and run["steps"]["generate-conceptual"] == "Failed"
    assert run["steps"]["mine-negatives"] == "Pending"
    assert list(run["steps"]) == [t["name"] for t in template["spec"]["templates"][0]["dag"]["tasks"]]
    (listing,) = [r for r in server.requests if r["method"] == "GET" and r["path"].endswith("/workflows")]
    assert listing["query"]["labelSelector"] == ["app.kubernetes.io/name=m3tune,app.kubernetes.io/part-of=m3tune"]
    code, out, _ = m3tune(config, "runs")
    assert code == 0 and "m3tune-abc" in out and "Failed" in out


def test_a_bad_token_is_refused_and_never_printed(kube, tmp_path):
    server, _ = kube
    bad = tmp_path / "bad"
    bad.write_text(kubeconfig(server.url, "planted-wrong-token-11"))
    code, out, err = m3tune(str(bad), "runs")
    assert code == 1 and "HTTP 401" in err and "log in again" in err
    assert "planted-wrong-token-11" not in out + err
    verbose = CliRunner().invoke(app, ["runs", "--kubeconfig", str(bad), "-v"])  # -v: the traceback, still no token
    assert verbose.exit_code == 1 and "HTTP 401" in str(verbose.exception)
    assert "planted-wrong-token-11" not in verbose.output + repr(verbose.exception)


def test_one_commands_verbose_does_not_leak_into_the_next(kube, tmp_path):
    # the -v call above leaves the CLI's verbose state set; a later in-process command (render job, which never
    # calls _setup before its error) must still print one line, not re-raise a traceback
    server, _ = kube
    bad = tmp_path / "bad"
    bad.write_text(kubeconfig(server.url, "planted-wrong-token-12"))
    assert CliRunner().invoke(app, ["runs", "--kubeconfig", str(bad), "-v"]).exit_code == 1
    after = CliRunner().invoke(app, ["render", "job", "combine", "--root", "s3://b/runs/r1", "--gpus", "2"])
    assert after.exit_code == 1 and isinstance(after.exception, SystemExit)
    assert "error:" in after.output and "--gpus" in after.output
