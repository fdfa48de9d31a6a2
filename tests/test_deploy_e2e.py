"""The whole DAG on one machine, as Argo would run it: the commands of the rendered WorkflowTemplate,
in its dependency order, fan-out included, against S3 (moto server on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import DEMO_CONFIG
from m3tune.cli import app
from m3tune.deploy.argo import render_workflow_template
from m3tune.deploy.pod import CONFIG_DIR
from m3tune.executor import pipeline_status
from m3tune.manifest import read_manifest
from m3tune.pipeline import PIPELINE, STEPS

SHARDS = 2


def topological(tasks: list[dict]) -> list[dict]:
    """Argo's order: a task once all its dependencies are done; ties in the template's order."""
    done: set[str] = set()
    order: list[dict] = []
    while len(order) < len(tasks):
        ready = [t for t in tasks if t["name"] not in done and set(t.get("dependencies", [])) <= done]
        assert ready, "cycle in the DAG"
        order.append(ready[0])
        done.add(ready[0]["name"])
    return order


def pod_commands(template: dict, values: dict[str, str]) -> list[tuple[str, list[str], list[str], dict[str, str]]]:
    """(task, launcher, argv after the `m3tune` entrypoint, plain env) of every pod the DAG would start, in order."""
    def sub(text: str, extra: dict[str, str]) -> str:
        text = re.sub(r"\{\{workflow\.parameters\.([\w-]+)\}\}", lambda m: values[m[1]], text)
        return re.sub(r"\{\{(inputs\.parameters\.\w+|item)\}\}", lambda m: extra[m[1]], text)

    spec = template["spec"]
    templates = {t["name"]: t for t in spec["templates"]}
    (dag,) = [t for t in spec["templates"] if t["name"] == spec["entrypoint"]]
    pods = []
    for task in topological(dag["dag"]["tasks"]):
        # Argo's govaluate reads the bare words true/false as booleans; Python needs them named
        if "when" in task and not eval(sub(task["when"], {}), {"true": True, "false": False}):  # noqa: S307 — our own
            continue  # the multi-node twin of a distributed step with one node, or publish when not asked for
        container = templates[task["template"]]["container"]
        # CPU tasks run the image's entrypoint, `m3tune`; a distributed step runs `accelerate launch ... -m
        # m3tune.cli` (the argv after it is the same `step NAME ...`)
        command = container.get("command") or []
        launcher = [sub(c, {}) for c in command[:command.index("m3tune.cli") + 1]] if command else []
        args = command[len(launcher):] + container.get("args", [])
        items = [str(i) for i in range(int(sub(task["withSequence"]["count"], {})))] if "withSequence" in task else [None]
        for item in items:
            extra = {"item": item or ""}
            for p in task.get("arguments", {}).get("parameters", []):
                extra[f"inputs.parameters.{p['name']}"] = sub(p["value"], extra)
            env = {e["name"]: sub(e["value"], extra) for e in container["env"] if "value" in e}
            pods.append((task["name"], launcher, [sub(a, extra) for a in args], env))
    return pods


@pytest.mark.slow
def test_the_argo_dag_runs_end_to_end_on_s3(s3_root, s3_endpoint, tmp_path, monkeypatch):
    # The config map as the pods see it: the demo config, on a slice of the corpus to stay cheap.
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["ingest"] = {"limit": 300}
    # the packaged gold set cites passages beyond the slice (evaluate rightly refuses that): a gold set of the slice
    gold = [{"id": f"g{i}", "query": q, "relevant_ids": [pid], "category": "exact", "language": "ar",
             "source": pid.split(":")[0].replace("bukhari", "hadith"), "difficulty": "easy"}
            for i, (q, pid) in enumerate([("بسم الله الرحمن الرحيم", "quran:1:1"), ("الحمد لله رب العالمين", "quran:1:2"),
                                          ("انما الاعمال بالنيات", "bukhari:1")])]
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in gold))
    config["evaluate"] = {**config.get("evaluate", {}), "test_set": str(tmp_path / "gold.jsonl")}
    (config_dir / "ci.yaml").write_text(yaml.safe_dump(config))

    template = render_workflow_template()
    values = {p["name"]: p.get("value", "") for p in template["spec"]["arguments"]["parameters"]}
    values.update({"root": s3_root.uri, "config": "ci.yaml", "s3-endpoint": s3_endpoint,
                   **{f"{n}-shards": str(SHARDS) for n in PIPELINE if STEPS[n].shardable}})
    pods = pod_commands(template, values)
    tasks = list(dict.fromkeys(t for t, _, _, _ in pods))
    assert [t for t in tasks if not t.endswith("-shard")] == PIPELINE

    def run_all() -> list[str]:
        outputs = []
        for task, launcher, argv, env in pods:
            for key, value in env.items():
                if key != "M3TUNE_CACHE":  # the pod's emptyDir; here the session's cache (and its memoized encoders)
                    monkeypatch.setenv(key, value)
            argv = [a.replace(CONFIG_DIR, str(config_dir)) for a in argv]
            if launcher:  # the pod's own launcher, for real: `accelerate launch` on one CPU process
                bin_dir = Path(sys.executable).parent
                done = subprocess.run([str(bin_dir / launcher[0]), *launcher[1:], *argv], capture_output=True,
                                      text=True, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
                assert done.returncode == 0, f"{task}: {' '.join(launcher + argv)}\n{done.stderr[-3000:]}"
                outputs.append(done.stdout)
                continue
            result = CliRunner().invoke(app, argv)
            assert result.exit_code == 0, f"{task}: {' '.join(argv)}\n{result.output}"
            outputs.append(result.stdout)
        return outputs

    first = run_all()
    assert all(re.match(r"\S+ ran:", out) for out in first)
    for name in PIPELINE:
        assert read_manifest(s3_root.child(name)) is not None, name
        if STEPS[name].shardable:
            assert read_manifest(s3_root.child(name)).counts["shards"] == SHARDS
            assert len([f for f in s3_root.child(name).list() if f.endswith("_manifest.json")]) == SHARDS + 1
    # what `m3tune run` with the same config would see: every step done
    from m3tune.cli import load_run_config

    statuses = pipeline_status(s3_root, load_run_config(config_dir / "ci.yaml"))
    assert {s.step: s.state for s in statuses if s.step in PIPELINE} == {n: "done" for n in PIPELINE}
    # `argo retry` reruns the tasks: every one skips, proven done by its manifest
    second = run_all()
    ran_again = [task for (task, _, _, _), out in zip(pods, second) if not re.match(r"\S+ skipped \(done\)", out)]
    assert not ran_again
