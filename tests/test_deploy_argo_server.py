"""`m3tune submit / runs / rerun --argo-server` through Hera's WorkflowsService, against a loopback Argo Server
(tests/argo_api_server.py: real HTTP and HTTPS on 127.0.0.1, request bodies checked against Hera's models of the
Argo API, the bearer token checked)."""

from __future__ import annotations

import datetime
import json

import pytest
import requests
import typer
from argo_api_server import ArgoAPIServer, check_schema
from click.testing import CliRunner
from kube_server import KubeServer, kubeconfig

from m3tune.cli import app
from m3tune.deploy import argo_server
from m3tune.deploy.argo import render_workflow_template

TOKEN = "planted-argo-token-5d1e0b"
ROOT = "s3://m3tune-runs/runs/exp-01"
COMMAND = typer.main.get_command(app)


def install(server: ArgoAPIServer) -> dict:
    template = render_workflow_template()
    template["metadata"]["namespace"] = "m3tune"
    server.templates[("m3tune", "m3tune")] = template
    return template


@pytest.fixture
def argo(monkeypatch):
    monkeypatch.setenv("ARGO_TOKEN", TOKEN)
    monkeypatch.delenv("M3TUNE_ARGO_SERVER", raising=False)
    with ArgoAPIServer(TOKEN, base="/argo") as server:  # behind a --basehref, as many ingresses serve it
        yield server


def m3tune(*args: str, env: dict | None = None):
    result = CliRunner().invoke(COMMAND, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def one_line_error(code: int, out: str, err: str, *words: str) -> str:
    assert code == 1 and not out, (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)
    assert TOKEN not in err
    return err


def workflow(name: str, *, root: str = ROOT, phase: str = "Failed", created: str = "2025-01-02T03:04:05Z",
             template: dict | None = None, parameters: dict | None = None) -> dict:
    params = [{"name": "root", "value": root}] + [{"name": k, "value": v} for k, v in (parameters or {}).items()]
    status = {"phase": phase, "startedAt": created, "finishedAt": created}
    if template is not None:
        status["storedWorkflowTemplateSpec"] = template["spec"]
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
            "metadata": {"name": name, "namespace": "m3tune", "creationTimestamp": created,
                         "labels": {"app.kubernetes.io/name": "m3tune", "app.kubernetes.io/part-of": "m3tune"}},
            "spec": {"workflowTemplateRef": {"name": "m3tune"}, "arguments": {"parameters": params}},
            "status": status}


# --- submit ------------------------------------------------------------------------------------------------------

def test_submit_sends_the_workflow_the_kubeconfig_path_sends(argo, tmp_path):
    install(argo)
    args = ["-p", f"root={ROOT}", "-p", "mine-negatives-shards=4"]
    code, out, err = m3tune("submit", *args, "--argo-server", argo.url)
    assert code == 0, err
    name = out.strip()
    assert name.startswith("m3tune-") and ("m3tune", name) in argo.workflows
    assert [(r["method"], r["path"]) for r in argo.requests] == [
        ("GET", "/argo/api/v1/workflow-templates/m3tune/m3tune"), ("POST", "/argo/api/v1/workflows/m3tune")]
    assert all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in argo.requests)
    assert all(TOKEN not in r["path"] + json.dumps(r["query"]) for r in argo.requests)  # a header, never the URL
    sent = argo.requests[-1]["body"]["workflow"]

    with KubeServer("planted-kube-token-0c4f2a") as kube:
        template = render_workflow_template()
        template["metadata"]["namespace"] = "m3tune"
        kube.put("workflowtemplates", template)
        config = tmp_path / "kubeconfig"
        config.write_text(kubeconfig(kube.url, "planted-kube-token-0c4f2a"))
        code, _, err = m3tune("submit", *args, "--kubeconfig", str(config))
        assert code == 0, err
        (posted,) = [r["body"] for r in kube.requests if r["method"] == "POST"]
    # the kube stand-in fills in the created object's metadata in place: compare what both paths chose
    assert {k: sent[k] for k in ("apiVersion", "kind", "spec")} == {k: posted[k] for k in ("apiVersion", "kind", "spec")}
    assert sent["metadata"] == {"generateName": posted["metadata"]["generateName"],
                                "labels": posted["metadata"]["labels"]}


def test_the_stand_in_refuses_a_field_the_argo_schema_lacks(argo):
    """The stand-in's schema check can fail: a misspelt field is a 400, not silently dropped."""
    from hera.workflows.models import WorkflowCreateRequest

    meta = {"generateName": "m3tune-"}
    assert check_schema(WorkflowCreateRequest, {"workflow": {"metadata": meta,
                                                             "spec": {"workflowTemplateRef": {"name": "m3tune"}}}}) is None
    answer = requests.post(f"{argo.url}/api/v1/workflows/m3tune", headers={"Authorization": f"Bearer {TOKEN}"},
                           json={"workflow": {"metadata": meta, "spec": {"workflowTemplateRefs": {"name": "m3tune"}}}},
                           timeout=10)
    assert answer.status_code == 400 and 'unknown field "workflow.spec.workflowTemplateRefs"' in answer.json()["message"]
    answer = requests.put(f"{argo.url}/api/v1/workflows/m3tune/x/retry", headers={"Authorization": f"Bearer {TOKEN}"},
                          json={"restartSuccessful": "sometimes"}, timeout=10)
    assert answer.status_code == 400


def test_submit_refuses_parameters_by_the_same_rules_before_any_request(argo):
    install(argo)
    for args, words in [
        (["-p", "root=s3://m3tune-runs/runs/$(HOME)"], ["-p root"]),
        (["-p", f"root={ROOT}", "-p", "train-nodes=0"], ["-p train-nodes", "from 1 to"]),
        (["-p", f"root={ROOT}", "-p", "gpu-tolerations={}"], ["-p gpu-tolerations", "JSON"]),
        (["-p", f"root={ROOT}", "--template", "Bad_Name"], ["--template"]),
    ]:
        code, out, err = m3tune("submit", *args, "--argo-server", argo.url)
        one_line_error(code, out, err, *words)
    assert not argo.requests
    code, out, err = m3tune("submit", "-p", f"root={ROOT}", "-p", "shards=4", "--argo-server", argo.url)
    one_line_error(code, out, err, "unknown parameter(s) shards", "mine-negatives-shards")
    assert [r["method"] for r in argo.requests] == ["GET"]  # read the template, created nothing


# --- runs --------------------------------------------------------------------------------------------------------

def test_runs_lists_workflows_with_their_step_states(argo):
    template = install(argo)
    older = workflow("m3tune-old", created="2025-01-01T00:00:00Z", phase="Succeeded", template=template)
    newer = workflow("m3tune-abc", template=template)
    newer["status"]["nodes"] = {
        "n0": {"id": "n0", "name": "m3tune-abc", "displayName": "m3tune-abc", "type": "DAG", "phase": "Failed"},
        "n1": {"id": "n1", "name": "m3tune-abc.ingest", "displayName": "ingest", "type": "Retry",
               "phase": "Succeeded"},
        "n2": {"id": "n2", "name": "m3tune-abc.index", "displayName": "index", "type": "Retry", "phase": "Failed"},
    }
    argo.workflows[("m3tune", "m3tune-old")] = older
    argo.workflows[("m3tune", "m3tune-abc")] = newer
    argo.workflows[("m3tune", "other")] = {"metadata": {"name": "other", "labels": {"app": "other"}}, "spec": {}}
    code, out, err = m3tune("runs", "--json", "--argo-server", argo.url)
    assert code == 0, err
    found = json.loads(out)
    assert [r["name"] for r in found] == ["m3tune-abc", "m3tune-old"]
    assert found[0]["phase"] == "Failed" and found[0]["root"] == ROOT
    assert found[0]["steps"]["ingest"] == "Succeeded" and found[0]["steps"]["index"] == "Failed"
    assert found[0]["steps"]["combine"] == "Pending"
    assert list(found[0]["steps"]) == [t["name"] for t in template["spec"]["templates"][0]["dag"]["tasks"]]
    (listing,) = argo.requests
    assert listing["query"]["listOptions.labelSelector"] == [
        "app.kubernetes.io/name=m3tune,app.kubernetes.io/part-of=m3tune"]
    code, out, err = m3tune("runs", "--limit", "1", "--argo-server", argo.url, "-n", "m3tune")
    assert code == 0 and "m3tune-abc" in out and "m3tune-old" not in out, err


def test_a_url_without_the_servers_base_path_says_so(argo):
    """Outside its API the Argo Server answers its web UI's page (200, HTML): not taken for an answer."""
    code, out, err = m3tune("runs", "--argo-server", argo.url.removesuffix("/argo"))
    one_line_error(code, out, err, "is not the Argo API's", "base path")
    assert [r["path"] for r in argo.requests] == ["/api/v1/workflows/m3tune"]


def test_runs_with_none_lists_none(argo):
    code, out, err = m3tune("runs", "--json", "--argo-server", argo.url)  # the server answers "items": null
    assert code == 0 and json.loads(out) == [], err


# --- rerun -------------------------------------------------------------------------------------------------------

def test_rerun_retries_the_runs_newest_workflow_from_the_step(argo):
    template = install(argo)
    argo.workflows[("m3tune", "m3tune-old")] = workflow("m3tune-old", created="2025-01-01T00:00:00Z")
    argo.workflows[("m3tune", "m3tune-new")] = workflow("m3tune-new", template=template)
    argo.workflows[("m3tune", "m3tune-else")] = workflow("m3tune-else", root="s3://m3tune-runs/runs/exp-02",
                                                          created="2025-02-01T00:00:00Z")
    code, out, err = m3tune("rerun", "combine", "--root", ROOT, "--argo-server", argo.url)
    assert code == 0, err
    assert out.strip() == "m3tune-new"
    retry = argo.requests[-1]
    assert (retry["method"], retry["path"]) == ("PUT", "/argo/api/v1/workflows/m3tune/m3tune-new/retry")
    assert retry["body"] == {"name": "m3tune-new", "namespace": "m3tune", "restartSuccessful": True,
                             "nodeFieldSelector": "templateName=combine"}
    assert argo.workflows[("m3tune", "m3tune-new")]["status"]["phase"] == "Running"

    # still running: Argo's own refusal, as one line that says to wait
    code, out, err = m3tune("rerun", "combine", "--root", ROOT, "--argo-server", argo.url)
    one_line_error(code, out, err, "HTTP 400", "Cannot retry a workflow in phase Running", argo.url, "wait")


def test_rerun_of_a_multinode_training_selects_its_jobset_task(argo):
    template = install(argo)
    argo.workflows[("m3tune", "m3tune-mn")] = workflow("m3tune-mn", template=template,
                                                       parameters={"train-nodes": "4"})
    code, _, err = m3tune("rerun", "train", "--root", ROOT, "--argo-server", argo.url)
    assert code == 0, err
    assert argo.requests[-1]["body"]["nodeFieldSelector"] == "templateName=train-multinode"
    argo.workflows[("m3tune", "m3tune-mn")] = workflow("m3tune-mn", template=template)  # the default: one node
    code, _, err = m3tune("rerun", "train", "--root", ROOT, "--argo-server", argo.url)
    assert code == 0, err
    assert argo.requests[-1]["body"]["nodeFieldSelector"] == "templateName=train"


def test_rerun_refuses_what_the_argo_server_cannot_do_before_any_request(argo):
    argo.workflows[("m3tune", "m3tune-new")] = workflow("m3tune-new")
    for extra, option in [(["--force"], "--force"), (["--image", "ghcr.io/x/y:1"], "--image"),
                          (["--rank", "1", "--world-size", "4"], "--rank"), (["--gpus", "2"], "--gpus"),
                          (["--config", "run.yaml"], "--config"), (["--s3-endpoint", "http://minio:9000"],
                                                                   "--s3-endpoint")]:
        code, out, err = m3tune("rerun", "mine-negatives", "--root", ROOT, *extra, "--argo-server", argo.url)
        one_line_error(code, out, err, option, "not with --argo-server", "--kubeconfig")
    code, out, err = m3tune("rerun", "no-such-step", "--root", ROOT, "--argo-server", argo.url)
    one_line_error(code, out, err, "unknown step")
    code, out, err = m3tune("rerun", "combine", "--root", "runs/local", "--argo-server", argo.url)
    one_line_error(code, out, err, "--root", "s3://")
    assert not argo.requests
    code, out, err = m3tune("rerun", "combine", "--root", "s3://m3tune-runs/runs/exp-09", "--argo-server", argo.url)
    one_line_error(code, out, err, "no m3tune Workflow of the run s3://m3tune-runs/runs/exp-09", argo.url,
                   "m3tune submit")
    assert [r["method"] for r in argo.requests] == ["GET"]


# --- refusals: 401, 403, 404, 409 ----------------------------------------------------------------------------------

def test_a_refused_token_is_one_line_without_the_token(argo, monkeypatch):
    from m3tune import cli

    # -v below leaves the CLI's module state verbose, which a later command that sets up no logging (render job)
    # would keep: restored when this test ends
    monkeypatch.setitem(cli._state, "verbose", False)
    install(argo)
    wrong = "planted-wrong-token-9a8b7c"
    for args in (["runs"], ["submit", "-p", f"root={ROOT}"]):
        code, out, err = m3tune(*args, "--argo-server", argo.url, env={"ARGO_TOKEN": wrong})
        one_line_error(code, out, err, "HTTP 401", argo.url, "argo auth token", "ARGO_TOKEN")
        assert wrong not in err
    result = CliRunner().invoke(COMMAND, ["runs", "--argo-server", argo.url, "-v"], env={"ARGO_TOKEN": wrong})
    assert result.exit_code == 1 and "HTTP 401" in str(result.exception)  # -v: the exception, still no token
    assert wrong not in result.output + repr(result.exception)
    assert all(r["headers"]["authorization"] == f"Bearer {wrong}" for r in argo.requests)


def test_a_bearer_prefix_in_the_token_is_not_doubled(argo, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"Bearer {TOKEN}\n")  # as `argo auth token` prints it
    code, _, err = m3tune("runs", "--argo-server", argo.url, "--argo-token-file", str(token_file))
    assert code == 0, err
    assert argo.requests[-1]["headers"]["authorization"] == f"Bearer {TOKEN}"


def test_a_netrc_entry_for_the_server_does_not_replace_the_token(argo, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login alice password planted-netrc-password\n")
    netrc.chmod(0o600)
    code, _, err = m3tune("runs", "--argo-server", argo.url, env={"NETRC": str(netrc)})
    assert code == 0, err
    assert argo.requests[-1]["headers"]["authorization"] == f"Bearer {TOKEN}"


def test_forbidden_missing_and_conflict_each_say_what_to_do(argo):
    code, out, err = m3tune("submit", "-p", f"root={ROOT}", "--argo-server", argo.url)
    one_line_error(code, out, err, "HTTP 404", argo.url, "WorkflowTemplate m3tune", "helm install")
    install(argo)
    argo.fail("/api/v1/workflows/m3tune", 403)
    code, out, err = m3tune("submit", "-p", f"root={ROOT}", "--argo-server", argo.url)
    one_line_error(code, out, err, "HTTP 403", argo.url, 'cannot post resource "workflows"', "'m3tune'",
                   "m3tune-submitter")
    argo.fail("/api/v1/workflows/m3tune", 409)
    code, out, err = m3tune("submit", "-p", f"root={ROOT}", "--argo-server", argo.url)
    one_line_error(code, out, err, "HTTP 409", argo.url, "the object has been modified", "m3tune runs")
    assert not argo.workflows


def test_a_conflict_or_a_workflow_deleted_before_its_retry_says_what_to_do(argo, monkeypatch):
    argo.workflows[("m3tune", "m3tune-gone")] = workflow("m3tune-gone")
    argo.fail("/api/v1/workflows/m3tune/m3tune-gone/retry", 409)
    code, out, err = m3tune("rerun", "combine", "--root", ROOT, "--argo-server", argo.url)
    one_line_error(code, out, err, "HTTP 409", "run the command again")
    argo.failing.clear()

    listed = argo_server._workflows

    def listed_then_deleted(server, service, namespace):
        found = listed(server, service, namespace)
        argo.workflows.clear()  # deleted by someone else between the listing and the retry
        return found

    monkeypatch.setattr(argo_server, "_workflows", listed_then_deleted)
    code, out, err = m3tune("rerun", "combine", "--root", ROOT, "--argo-server", argo.url)
    one_line_error(code, out, err, "HTTP 404", "the Workflow is gone", "submit the run again")


# --- bad input: one line, before any request ----------------------------------------------------------------------

def refused_before_any_request(server: ArgoAPIServer, args: list[str], *words: str, env: dict | None = None) -> str:
    before = len(server.requests)
    code, out, err = m3tune(*args, env=env)
    err = one_line_error(code, out, err, *words)
    assert len(server.requests) == before, f"{args}: a request was sent before the refusal"
    return err


def test_bad_tokens_are_refused_before_any_request(argo, tmp_path):
    url = ["--argo-server", argo.url]
    refused_before_any_request(argo, ["runs", *url, "--argo-token-file", str(tmp_path / "nope")],
                               "--argo-token-file", "no such file")
    refused_before_any_request(argo, ["runs", *url, "--argo-token-file", str(tmp_path)], "a folder")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00token")
    refused_before_any_request(argo, ["runs", *url, "--argo-token-file", str(binary)], "not UTF-8")
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    refused_before_any_request(argo, ["runs", *url, "--argo-token-file", str(empty)], "the token is empty")
    refused_before_any_request(argo, ["runs", *url], "ARGO_TOKEN", "the token is empty", env={"ARGO_TOKEN": ""})
    refused_before_any_request(argo, ["runs", *url], "ARGO_TOKEN is not set", "--argo-token-file",
                               env={"ARGO_TOKEN": None})
    spaced = "planted-two words-3c2d"
    err = refused_before_any_request(argo, ["runs", *url], "one word", env={"ARGO_TOKEN": spaced})
    assert spaced not in err and "words-3c2d" not in err
    refused_before_any_request(argo, ["runs", *url], "character(s)", env={"ARGO_TOKEN": "ab"})
    refused_before_any_request(argo, ["runs", *url, "--argo-token-env", "AWS_SECRET_ACCESS_KEY"], "AWS")
    refused_before_any_request(argo, ["runs", *url, "--argo-token-env", "HOME"], "_TOKEN")
    refused_before_any_request(argo, ["runs", *url, "--argo-token-env", "ARGO_TOKEN", "--argo-token-file", str(empty)],
                               "give one source")


def test_bad_server_urls_are_refused_before_any_request(argo):
    port = argo.server_address[1]
    refused_before_any_request(argo, ["runs", "--argo-server", f"127.0.0.1:{port}"], "no scheme", "https://")
    err = refused_before_any_request(argo, ["runs", "--argo-server", f"https://alice:{TOKEN}@127.0.0.1:{port}"],
                                     "user or password", "ARGO_TOKEN")
    assert "alice" not in err
    err = refused_before_any_request(argo, ["runs", "--argo-server", f"alice:hunter2-secret@127.0.0.1:{port}"],
                                     "user or password")
    assert "hunter2-secret" not in err
    refused_before_any_request(argo, ["runs", "--argo-server", f"ftp://127.0.0.1:{port}"], "http:// or https://")
    refused_before_any_request(argo, ["runs", "--argo-server", f"{argo.url}?token=x"], "without query")
    refused_before_any_request(argo, ["runs", "--argo-server", ""], "empty")
    refused_before_any_request(argo, ["runs", "--argo-server", argo.url, "-n", "../kube-system"], "--namespace")


def test_options_of_the_other_path_are_refused_not_ignored(argo, tmp_path):
    refused_before_any_request(argo, ["runs", "--argo-server", argo.url, "--kubeconfig", str(tmp_path / "k")],
                               "--kubeconfig", "not with --argo-server")
    refused_before_any_request(argo, ["runs", "--argo-server", argo.url, "--context", "prod"], "--context")
    refused_before_any_request(argo, ["runs", "--argo-insecure-skip-verify"], "goes with --argo-server")
    refused_before_any_request(argo, ["submit", "-p", f"root={ROOT}", "--argo-token-file", "t"],
                               "--argo-token-file goes with --argo-server")
    refused_before_any_request(argo, ["runs", "--argo-server", argo.url, "--argo-ca-file", str(tmp_path / "ca.pem")],
                               "--argo-ca-file", "http://", "no TLS")
    refused_before_any_request(argo, ["runs", "--argo-server", argo.url, "--argo-insecure-skip-verify"],
                               "--argo-insecure-skip-verify", "http://")


def test_kubeconfig_from_the_environment_does_not_block_the_argo_server(argo, tmp_path):
    code, _, err = m3tune("runs", "--argo-server", argo.url, env={"KUBECONFIG": str(tmp_path / "absent")})
    assert code == 0, err
    code, _, err = m3tune("runs", env={"M3TUNE_ARGO_SERVER": argo.url})  # the variable chooses the Argo Server
    assert code == 0 and argo.requests, err


def test_a_server_that_never_answers_times_out(argo, monkeypatch):
    import socket

    monkeypatch.setattr(argo_server, "TIMEOUT", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # accepts (the kernel does), never answers
        code, out, err = m3tune("runs", "--argo-server", f"http://127.0.0.1:{silent.getsockname()[1]}")
    one_line_error(code, out, err, "cannot reach the Argo Server", "ReadTimeout")


# --- TLS ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made here."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "m3tune test Argo Server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


def test_tls_verifies_with_the_given_ca_or_refuses(certificate, monkeypatch, tmp_path):
    cert, key = certificate
    monkeypatch.setenv("ARGO_TOKEN", TOKEN)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    with ArgoAPIServer(TOKEN, certfile=str(cert), keyfile=str(key)) as server:
        assert server.url.startswith("https://")
        code, out, err = m3tune("runs", "--json", "--argo-server", server.url, "--argo-ca-file", str(cert))
        assert code == 0 and json.loads(out) == [], err
        (request,) = server.requests
        assert request["headers"]["authorization"] == f"Bearer {TOKEN}"

        # the system's CAs do not know it: refused, and the token was never sent
        code, out, err = m3tune("runs", "--argo-server", server.url)
        one_line_error(code, out, err, "TLS with the Argo Server", server.url, "--argo-ca-file")
        assert len(server.requests) == 1

        code, out, err = m3tune("runs", "--json", "--argo-server", server.url, "--argo-insecure-skip-verify")
        assert code == 0 and json.loads(out) == [], err
        assert "TLS verification is off" in err and TOKEN not in err

        not_pem = tmp_path / "ca.pem"
        not_pem.write_text("not a certificate")
        refused_before_any_request(server, ["runs", "--argo-server", server.url, "--argo-ca-file", str(not_pem)],
                                   "no PEM certificate")
        refused_before_any_request(server, ["runs", "--argo-server", server.url, "--argo-ca-file",
                                            str(tmp_path / "absent.pem")], "no such file")
        refused_before_any_request(server, ["runs", "--argo-server", server.url, "--argo-ca-file", str(cert),
                                            "--argo-insecure-skip-verify"], "give one")
