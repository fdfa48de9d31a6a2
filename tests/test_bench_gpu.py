"""`m3tune bench gpu`: its refusals (no CUDA here, a run root as --out), its FLOP/MFU arithmetic, BGE-M3's size,
and the measuring code timed for real on the CPU with tiny models (the GPU run itself needs a GPU)."""

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from m3tune.bench import gpu as gpubench
from m3tune.cli import app

runner = CliRunner()
QUALITY_GPU = Path(__file__).parents[1] / "configs" / "quality-gpu.yaml"
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def _files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


@needs_no_cuda
def test_without_cuda_it_exits_at_once_with_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out would land here
    result = runner.invoke(app, ["bench", "gpu", "--budget", "60", "--quality-config", str(QUALITY_GPU)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: bench gpu needs a CUDA device; torch.cuda.is_available() is False")
    assert _files(tmp_path) == []

    result = runner.invoke(app, ["bench", "gpu", "--out", str(tmp_path / "gpu-bench"), "--no-quality"])
    assert result.exit_code == 1 and "needs a CUDA device" in result.output
    assert not (tmp_path / "gpu-bench").exists()


def _run_root(tmp_path):
    root = tmp_path / "runs" / "exp-01"
    (root / "ingest").mkdir(parents=True)
    (root / "ingest" / "_manifest.json").write_text("{}")
    return root


@pytest.mark.parametrize("where", ["root", "inside", "holds"])
def test_an_out_that_is_holds_or_lies_in_a_run_root_is_refused_before_anything(tmp_path, where):
    root = _run_root(tmp_path)
    out = {"root": root, "inside": root / "ingest" / "bench", "holds": tmp_path / "runs"}[where]
    before = _files(tmp_path)
    result = runner.invoke(app, ["bench", "gpu", "--out", str(out)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA device" not in lines[0], result.output  # refused before the CUDA check
    assert {"root": "is a run root", "inside": "lies inside", "holds": "holds a run's files"}[where] in lines[0]
    assert _files(tmp_path) == before


def test_an_out_with_files_is_refused_and_an_empty_or_new_one_passes(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text("{}")
    with pytest.raises(gpubench.ConfigError, match="not empty"):
        gpubench.check_out(tmp_path / "old")
    (tmp_path / "file").write_text("")
    with pytest.raises(gpubench.ConfigError, match="not a folder"):
        gpubench.check_out(tmp_path / "file")
    with pytest.raises(gpubench.ConfigError, match="not a URI"):
        gpubench.check_out(gpubench.Path("s3://bucket/bench"))
    (tmp_path / "empty").mkdir()
    gpubench.check_out(tmp_path / "empty")
    gpubench.check_out(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()


def test_flops_and_mfu_against_a_hand_computed_case():
    # BGE-M3 at seq 512: 6 x 302,311,424 non-embedding parameters = 1,813,868,544, plus attention
    # 12 x 24 x 1024 x 512 = 150,994,944: 1,964,863,488 FLOPs a token.
    per_token = gpubench.flops_per_token(non_embedding_params=302_311_424, layers=24, hidden=1024, seq=512)
    assert per_token == 1_964_863_488
    # 100,000 tokens/s -> 196.4863488 TFLOP/s; on a 989 TFLOP/s card 19.867%.
    assert gpubench.mfu(100_000 * per_token, 989.0) == pytest.approx(196.4863488 / 989.0, rel=1e-12)
    assert gpubench.mfu(100_000 * per_token, None) is None
    assert gpubench.flops_per_token(non_embedding_params=10, layers=2, hidden=4, seq=3) == 60 + 288


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                        ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_by_device_name(name, peak):
    found = gpubench.peak_for(name)
    assert (found[0] if found else None) == peak


def test_bge_m3_architecture_has_its_published_size_on_the_meta_device():
    from transformers import XLMRobertaModel

    config = gpubench.bge_m3_config()
    with torch.device("meta"):  # shapes only: no memory for 568M parameters
        with_pooler = XLMRobertaModel(config)
        ours, attention, _ = gpubench.build_encoder(config, device=torch.device("meta"), attention="sdpa",
                                                    gradient_checkpointing=False)
    assert attention == "sdpa"
    # word 250,002 x 1024 + positions 8,194 x 1024 + one token type x 1024 (+ LayerNorm 2,048);
    # a layer: attention 4 x (1024² + 1024) + FFN 2 x 1024 x 4096 + 4096 + 1024 + two LayerNorms 4,096
    embeddings = 250_002 * 1024 + 8_194 * 1024 + 1024
    layer = 4 * (1024 * 1024 + 1024) + 2 * 1024 * 4096 + 4096 + 1024 + 4096
    assert gpubench.parameter_counts(ours) == (embeddings + 2048 + 24 * layer, 2048 + 24 * layer)
    assert gpubench.parameter_counts(ours)[0] == 566_705_152
    assert gpubench.parameter_counts(with_pooler)[0] == 567_754_752  # BAAI's "568M" counts the pooler
    assert next(ours.parameters()).device.type == "meta"


def _tiny(**extra):
    return gpubench.bge_m3_config(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=130, **extra)


def test_the_encoder_measurement_times_real_training_steps_on_cpu():
    device = torch.device("cpu")
    model, attention, _ = gpubench.build_encoder(_tiny(), device=device, attention="sdpa",
                                                 gradient_checkpointing=True)
    before = [p.detach().clone() for p in model.parameters()]
    r = gpubench.measure_encoder(model, device=device, batch=2, seq=16, steps=3, warmup=1, dtype=torch.bfloat16,
                                 peak_tflops=1.0)
    assert r["timed_steps"] == 3 and r["sequences_per_step"] == 4 and r["peak_memory_gib"] is None
    # "seconds" is reported to 4 decimals: tokens_per_s × seconds is the tokens timed, within that rounding
    assert abs(r["tokens_per_s"] * r["seconds"] - 2 * 2 * 16 * 3) <= r["tokens_per_s"] * 0.5e-4 + 1e-9
    params, non_embedding = gpubench.parameter_counts(model)
    assert (r["parameters"], r["non_embedding_parameters"]) == (params, non_embedding)
    assert r["flops_per_token"] == 6 * non_embedding + 12 * 2 * 32 * 16
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 1e12)
    assert r["losses_finite"] and math.isfinite(r["loss_last"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "no optimizer step happened"


def test_a_past_deadline_still_times_one_step():
    device = torch.device("cpu")
    model, _, _ = gpubench.build_encoder(_tiny(), device=device, attention="sdpa", gradient_checkpointing=False)
    r = gpubench.measure_encoder(model, device=device, batch=2, seq=8, steps=50, warmup=0, deadline=0.0)
    assert r["timed_steps"] == 1 and r["mfu"] is None


def test_the_loop_measurement_counts_what_m3tunes_training_loop_fed_the_model(tmp_path):
    r = gpubench.measure_loop("local:tiny-xlmr", tmp_path, batch=8, steps=6, warmup=2, mixed_precision="no",
                              dims=(32, 16), n_train=64, n_val=8, max_length=32, peak_tflops=1.0)
    assert (r["steps"], r["timed_steps"]) == (6, 4)
    assert r["examples_per_s"] == pytest.approx(8 * 4 / r["seconds"], rel=1e-3)  # seconds is rounded
    # a step feeds 8 queries and 8 positives + up to 24 negatives, padded to at most 64 / 32 tokens
    assert 4 * 16 * 2 / r["seconds"] <= r["tokens_per_s"] <= 4 * (8 * 64 + 32 * 32) / r["seconds"]
    assert 0 <= r["padding_share"] < 1
    assert r["real_tokens_per_s"] == pytest.approx(r["tokens_per_s"] * (1 - r["padding_share"]))
    assert r["mfu"] == pytest.approx(r["model_tflops_per_s"])  # against a 1 TFLOP/s peak
    assert math.isfinite(r["final_loss"])


def test_summary_renders_every_phase_status():
    results = {"command": "m3tune bench gpu --out x", "started_utc": "2026-01-01T00:00:00Z", "budget_s": 540.0,
               "total_s": 500.0, "device": {"name": "NVIDIA H100 80GB HBM3", "count": 1, "capability": "9.0",
                                            "memory_gib": 79.1},
               "software": {"torch": "2.6", "flash_attn": None}, "peak_bf16_tflops": 989.0,
               "peak_source": "table: H100", "flops_formula": gpubench.FLOPS_FORMULA,
               "phases": {"bge-m3": {"status": "ok", "attention": "sdpa", "tokens_per_s": 1234.5,
                                     "model_tflops_per_s": 2.4, "mfu": 0.0024, "peak_memory_gib": 30.2,
                                     "sequences_per_step": 32, "timed_steps": 10, "gradient_checkpointing": False,
                                     "seq": 512},
                          "bge-m3-checkpointing": {"status": "failed", "reason": "OutOfMemoryError: x"},
                          "quality": {"status": "skipped", "reason": "budget: 20 s left"}}}
    text = gpubench.summary_markdown(results)
    assert "| bge-m3 | ok | sdpa | 1,234 | 2.4 | 0.2% | 30.2 |" in text
    assert "| bge-m3-checkpointing | failed |" in text and "budget: 20 s left" in text
    assert "6 x non-embedding parameters" in text


def test_phases_run_in_turn_within_the_budget_and_a_failure_does_not_stop_the_next(tmp_path):
    import json
    import logging
    import time

    ran = []

    def ok(deadline):
        ran.append(deadline)
        return {"tokens_per_s": 1.0}

    def broken(deadline):
        raise RuntimeError("kernel refused\nsecond line")

    results = {"phases": {}}
    deadline = time.monotonic() + 60  # e5-small needs 75 s: skipped; the others need 45 s
    gpubench.run_phases([("e5-small", ok), ("bge-m3", broken), ("bge-m3-checkpointing", ok)], deadline=deadline,
                        results=results, out=tmp_path, log=logging.getLogger("test"))
    phases = results["phases"]
    assert phases["e5-small"]["status"] == "skipped" and "the phase needs about 75 s" in phases["e5-small"]["reason"]
    assert phases["bge-m3"] == {"status": "failed", "reason": "RuntimeError: kernel refused",
                                "wall_s": phases["bge-m3"]["wall_s"]}
    assert phases["bge-m3-checkpointing"]["status"] == "ok" and ran == [deadline]
    assert json.loads((tmp_path / "results.json").read_text()) == results  # on disk after every phase


def test_the_quality_phase_is_cut_off_at_its_deadline_and_says_how_to_resume(tmp_path):
    import time
    from pathlib import Path

    config = Path(__file__).parents[1] / "configs" / "demo.yaml"
    t0 = time.monotonic()
    r = gpubench._phase_quality(tmp_path, config=config, deadline=time.monotonic() + 4)
    assert time.monotonic() - t0 < 30
    assert r["status"] == "cut off" and r["exit_code"] != 0
    assert f"--root {tmp_path / 'quality'}" in r["cut_off"] and r["command"].startswith("m3tune bench quality")
    assert (tmp_path / "quality.log").is_file()


def test_a_quality_run_that_fails_is_an_error_with_its_last_log_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("no-such-step: {}\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match=r"bench quality exited 1: error: .*unknown step 'no-such-step'"):
        gpubench._phase_quality(out, config=config, deadline=gpubench.time.monotonic() + 60)


def test_an_absent_quality_config_or_model_fails_at_once_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/quality-gpu.yaml here
    result = runner.invoke(app, ["bench", "gpu", "--out", "bench"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "--quality-config configs/quality-gpu.yaml: no such file" in lines[0]
    assert _files(tmp_path) == []
    with pytest.raises(gpubench.UserError, match="unknown local model"):
        gpubench.check_model("local:e5-large")
    with pytest.raises(gpubench.ConfigError, match="no such folder"):
        gpubench.check_model(str(tmp_path / "missing-model"))
    assert gpubench.check_model("local:tiny-xlmr")  # a present one passes
