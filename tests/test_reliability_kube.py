"""Kubernetes rendering and submission refuse what the pod, the API server or Argo would get wrong later:
each class of value is checked by one rule (`m3tune.deploy.validate`) shared by `render job`, `rerun`,
`submit` and the rendered template's own defaults, before anything is rendered or any request is sent."""

from __future__ import annotations

import functools

import pytest
import typer
import yaml
from click.testing import CliRunner
from kube_server import KubeServer, kubeconfig

from m3tune.cli import app
from m3tune.deploy.argo import render_workflow_template
from m3tune.pipeline import STEPS

TOKEN = "planted-kube-token-reliab"
ROOT = "s3://m3tune-runs/runs/exp-01"
COMMAND = typer.main.get_command(app)  # built once: Typer's CliRunner rebuilds it for every call (0.25 s)


@functools.cache
def template() -> dict:
    return render_workflow_template()


def render(*args: str):
    result = CliRunner().invoke(COMMAND, ["render", "job", *args])
    return result.exit_code, result.stdout, result.stderr


def refused(args: list[str], *words: str) -> str:
    """ARGS to `render job` exit 1 with one line naming every word; nothing on stdout (nothing rendered)."""
    code, out, err = render(*args)
    assert code == 1, (args, code, out, err)
    assert not out, args
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, (args, word, err)
    return err


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    # one server for the module: stopping one waits for its poll (0.5 s); the tests count requests, not objects
    with KubeServer(TOKEN) as server:
        config = tmp_path_factory.mktemp("kube") / "kubeconfig"
        config.write_text(kubeconfig(server.url, TOKEN))
        server.put("workflowtemplates", {**template(), "metadata": {**template()["metadata"], "namespace": "m3tune"}})
        yield server, str(config)


def submit(config: str, *args: str):
    result = CliRunner().invoke(COMMAND, ["submit", *args, "--kubeconfig", config])
    return result.exit_code, result.stdout, result.stderr


def submit_refused(kube, args: list[str], *words: str) -> str:
    server, config = kube
    before = len(server.requests)
    code, out, err = submit(config, *args)
    assert code == 1 and not out, (args, code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, (args, word, err)
    assert len(server.requests) == before, f"{args}: a request was sent before the refusal"
    return err


# --- resource counts -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gpus", ["-1", "0", "1000"])
def test_negative_zero_or_absurd_gpu_counts_are_refused(gpus):
    refused(["train", "--root", ROOT, "--gpus", gpus], "--gpus")


def test_gpus_on_a_cpu_step_is_refused_not_ignored():
    refused(["combine", "--root", ROOT, "--gpus", "2"], "--gpus", "combine")
    assert render("train", "--root", ROOT, "--gpus", "8")[0] == 0


@pytest.mark.parametrize("pair", ["gpus-per-node=-1", "gpus-per-node=0", "mine-negatives-shards=0",
                                  "mine-negatives-shards=100000", "train-nodes=-2", "cpu=-1", "memory=0",
                                  "gpu-memory=lots", "deadline=-5", "tmp-size=1Zi"])
def test_submit_refuses_negative_or_absurd_resource_parameters(kube, pair):
    submit_refused(kube, ["-p", f"root={ROOT}", "-p", pair], pair.split("=")[0])


# --- shards ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank, world, option", [("5", "2", "--rank"), ("2", "2", "--rank"), ("-1", "2", "--rank"),
                                                ("0", "0", "--world-size"), ("0", "-3", "--world-size"),
                                                ("0", "5000", "--world-size")])
def test_a_rank_outside_its_world_size_is_refused(rank, world, option):
    refused(["mine-negatives", "--root", ROOT, "--rank", rank, "--world-size", world], option)


def test_a_rank_with_merge_shards_is_refused_not_half_honoured():
    refused(["mine-negatives", "--root", ROOT, "--rank", "0", "--world-size", "2", "--merge-shards", "2"],
            "--merge-shards")


@pytest.mark.parametrize("n", ["0", "-1"])
def test_merge_shards_below_one_is_refused_at_render_time(n):
    """`--merge-shards 0` rendered a Job whose pod withdraws mine-negatives' manifest and then fails."""
    refused(["mine-negatives", "--root", ROOT, "--merge-shards", n], "--merge-shards")
    assert render("mine-negatives", "--root", ROOT, "--merge-shards", "4")[0] == 0


# --- namespaces ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("namespace", ["Bad_NS", "../kube-system", "a/b", "-x", "a" * 64, "m3tune\n"])
def test_an_invalid_namespace_is_refused(namespace):
    refused(["combine", "--root", ROOT, "--namespace", namespace], "--namespace", "DNS-1123")


def test_submit_and_rerun_refuse_an_invalid_namespace_before_any_request(kube):
    # the namespace is a segment of the API path: '../' would address another resource
    submit_refused(kube, ["-p", f"root={ROOT}", "-n", "../../api/v1/namespaces/kube-system"], "--namespace")
    submit_refused(kube, ["-p", f"root={ROOT}", "--template", "../../../api/v1/secrets"], "--template")
    server, config = kube
    result = CliRunner().invoke(COMMAND, ["rerun", "combine", "--root", ROOT, "-n", "Bad_NS", "--kubeconfig", config])
    assert result.exit_code == 1 and "--namespace" in result.stderr
    assert not [r for r in server.requests if r["method"] == "POST"]


# --- job names -------------------------------------------------------------------------------------------------

def job_name(*args: str) -> str:
    code, out, err = render(*args)
    assert code == 0, err
    return yaml.safe_load(out)["metadata"]["name"]


def test_distinct_reruns_never_share_a_job_name():
    roots = ["exp_1", "exp-1", "Exp-1", "exp.1", "exp--1", "exp-1-0-of-2", "exp-1-merge-2"]
    names = {job_name("mine-negatives", "--root", f"s3://b/runs/{r}") for r in roots}
    names |= {job_name("mine-negatives", "--root", "s3://b/runs/exp-1", "--rank", "0", "--world-size", "2"),
              job_name("mine-negatives", "--root", "s3://b/runs/exp-1", "--merge-shards", "2")}
    assert len(names) == len(roots) + 2, names
    assert all(len(n) <= 63 for n in names)
    # a run id that is already a DNS label keeps its readable name (the committed jobs/ files)
    assert job_name("mine-negatives", "--root", ROOT) == "m3tune-rerun-mine-negatives-exp-01"


def test_job_names_are_injective_over_many_run_ids_and_shards():
    import itertools
    import re

    from m3tune.deploy.job import job_name

    ids = {"".join(p) for n in range(1, 5) for p in itertools.product("a1-_.A", repeat=n)}
    ids |= {f"{a}-{r}-of-{w}" for a in ("x", "x-1") for r in range(3) for w in range(1, 3)}
    ids |= {f"x-merge-{n}" for n in range(3)} | {"x" * n for n in range(40, 70)}
    ids = {i for i in ids if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", i)}
    keys = [(step, i, suffix) for step in ("mine-negatives", "combine") for i in ids
            for suffix in ("", "0-of-2", "1-of-2", "merge-2")]
    names = [job_name(*key) for key in keys]
    assert len(set(names)) == len(keys)
    assert all(re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", n) for n in names)


def test_step_names_cannot_be_confused_in_a_job_name():
    for a in STEPS:
        assert not any(b != a and b.startswith(a + "-") for b in STEPS), a


# --- labels ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("run_id", ["r" * 64, "r" * 128, "exp_", "exp."])
def test_a_run_id_that_is_no_label_value_is_refused(run_id):
    refused(["combine", "--root", f"s3://b/runs/{run_id}"], "label", "63")


def test_every_label_of_a_rendered_object_is_checked():
    from m3tune.deploy.validate import check_labels
    from m3tune.errors import ConfigError

    good = {"metadata": {"labels": {"m3tune.dev/run-id": "exp_1"}}}
    check_labels(good)
    for labels in ({"m3tune.dev/run-id": "a b"}, {"m3tune.dev/run-id": "x" * 64}, {"bad key!": "x"},
                   {"m3tune.dev/run-id": "ok", "x/" + "y" * 64: "v"}):
        with pytest.raises(ConfigError, match="label"):
            check_labels({"spec": {"template": {"metadata": {"labels": labels}}}})


# --- the config path -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["../../../proc/self/environ", "..", "a/b.yaml", "run.yaml\n"])
def test_submit_refuses_a_config_path_as_render_job_does(kube, config):
    err = submit_refused(kube, ["-p", f"root={ROOT}", "-p", f"config={config}"], "a key of the m3tune-config")
    assert err == refused(["combine", "--root", ROOT, "--config", config]).replace("--config", "-p config", 1)


# --- images ----------------------------------------------------------------------------------------------------

BAD_IMAGES = ["m3tune/m3tune-cpu:1; rm -rf /", "$(curl evil)/x", "m3tune/x:`id`", "m3tune/x:1 --privileged",
              "M3TUNE/x:1", "x:1\ny", "x@sha256:abc", "x:" + "t" * 129, ""]


@pytest.mark.parametrize("image", BAD_IMAGES)
def test_an_image_that_is_no_image_reference_is_refused(image):
    refused(["combine", "--root", ROOT, "--image", image], "--image")


def test_valid_image_references_pass():
    for image in ("ghcr.io/org/m3tune-cpu:0.4.0", "localhost:5000/m3tune-cpu", "m3tune-cpu@sha256:" + "a" * 64,
                  "registry.example.com:443/a/b/c:v1.2-rc_3@sha256:" + "0" * 64):
        assert render("combine", "--root", ROOT, "--image", image)[0] == 0, image


@pytest.mark.parametrize("pair", ["image-cpu=m3tune/x:1; id", "image-gpu=$(id)"])
def test_submit_refuses_an_image_that_is_no_image_reference(kube, pair):
    submit_refused(kube, ["-p", f"root={ROOT}", "-p", pair], pair.split("=")[0])


# --- roots -----------------------------------------------------------------------------------------------------

BAD_ROOTS = ["s3://b/{{workflow.name}}/r1", "s3://b/runs/{{=sprig.env('X')}}", "s3://b/$(AWS_SECRET_ACCESS_KEY)/r1",
             "s3://b/runs/r1\n", "s3://b/runs\n--force/r1", "s3://b/ru ns/r1", "s3://b/runs/r1;id", "s3://b/r`id`/r1",
             "s3://b/runs//r1", "s3://b/runs/../r1", "s3://b/r1?versionId=1", "s3://B_ad/runs/r1", "s3://b"]


@pytest.mark.parametrize("root", BAD_ROOTS)
def test_a_root_argo_or_a_shell_would_interpret_is_refused(root):
    refused(["combine", "--root", root], "--root")


@pytest.mark.parametrize("root", BAD_ROOTS[:5])
def test_submit_refuses_a_root_argo_or_a_shell_would_interpret(kube, root):
    submit_refused(kube, ["-p", f"root={root}"], "root")


def test_any_parameter_with_an_argo_tag_or_a_variable_reference_is_refused(kube):
    for pair in ("aws-region={{workflow.uid}}", "gpu-node-selector={\"a\": \"$(HOME)\"}"):
        submit_refused(kube, ["-p", f"root={ROOT}", "-p", pair], pair.split("=")[0])


# --- credentials -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("--root", "s3://AKIDPLANTED:SECRETPLANTED@bucket/runs/r1"),
    ("--root", "s3://AKIDPLANTED@bucket/runs/r1"),
    ("--root", "https://AKIDPLANTED:SECRETPLANTED@s3.example.com/bucket/runs/r1"),
    ("--s3-endpoint", "http://AKIDPLANTED:SECRETPLANTED@minio:9000"),
    ("--s3-endpoint", "https://AKIDPLANTED@minio.example.com"),
])
def test_credentials_in_a_root_or_an_endpoint_are_refused_and_not_echoed(option, value):
    args = ["combine", "--root", ROOT, option, value] if option != "--root" else ["combine", "--root", value]
    err = refused(args, option, "Secret")
    assert "PLANTED" not in err


@pytest.mark.parametrize("pair", ["root=s3://AKIDPLANTED:SECRETPLANTED@bucket/runs/r1",
                                  "s3-endpoint=http://AKIDPLANTED:SECRETPLANTED@minio:9000"])
def test_submit_refuses_credentials_in_a_root_or_an_endpoint(kube, pair):
    args = ["-p", pair] if pair.startswith("root=") else ["-p", f"root={ROOT}", "-p", pair]
    err = submit_refused(kube, args, pair.split("=")[0], "Secret")
    assert "PLANTED" not in err


@pytest.mark.parametrize("endpoint", ["minio:9000", "ftp://minio", "http://minio:9000/?x=1", "http://mi nio",
                                      "http://$(HOST)", "http://minio:99999"])
def test_an_endpoint_that_is_no_http_url_is_refused(endpoint):
    refused(["combine", "--root", ROOT, "--s3-endpoint", endpoint], "--s3-endpoint")


def test_valid_endpoints_pass():
    for endpoint in ("", "http://minio:9000", "https://s3.eu-central-1.amazonaws.com", "http://10.0.0.5:9000/",
                     "http://minio.m3tune.svc.cluster.local:9000"):
        assert render("combine", "--root", ROOT, "--s3-endpoint", endpoint)[0] == 0, endpoint


# --- one rule table ----------------------------------------------------------------------------------------------

def test_every_template_parameter_has_a_rule_its_default_passes():
    from m3tune.deploy.validate import check_parameters, parameter_rules

    declared = {p["name"]: p.get("value") for p in template()["spec"]["arguments"]["parameters"]}
    assert not set(declared) - set(parameter_rules(STEPS))
    check_parameters({k: v for k, v in declared.items() if v is not None})


def test_a_parameter_given_twice_is_refused(kube):
    submit_refused(kube, ["-p", f"root={ROOT}", "-p", "root=s3://b/runs/other"], "root", "twice")


def test_valid_submissions_still_pass(kube):
    server, config = kube
    code, name, err = submit(config, "-p", f"root={ROOT}", "-p", "mine-negatives-shards=8", "-p", "train-nodes=2",
                            "-p", "gpus-per-node=8", "-p", "s3-endpoint=http://minio:9000", "-p", "config=exp-2.yaml",
                            "-p", "gpu-memory=512Gi", "-p", "cpu=500m", "-p", "publish=true",
                            "-p", 'gpu-node-selector={"gpu": "h100"}')
    assert code == 0, err
    assert ("workflows", "m3tune", name.strip()) in server.objects


def test_render_argo_holds_its_own_defaults_to_the_submit_rules():
    from m3tune.errors import ConfigError

    with pytest.raises(ConfigError, match="image-cpu"):
        render_workflow_template(registry="my registry;id")


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_runs_refuses_a_limit_below_one(kube, limit):
    server, config = kube
    before = len(server.requests)
    result = CliRunner().invoke(COMMAND, ["runs", "--limit", limit, "--kubeconfig", config])
    assert result.exit_code == 1 and "--limit" in result.stderr, result.output
    assert len(server.requests) == before
