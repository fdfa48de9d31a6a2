"""benchmarks/ratios.py: its refusals and its arithmetic (the measurement itself is a benchmark, `make
bench-ratios`, minutes to an hour; docs/benchmarks.md holds its figures)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "ratios.py"


def ratios():
    spec = importlib.util.spec_from_file_location("ratios", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, message", [
    (["--pairs", "3"], "--pairs: at least 5"),
    (["--rows", "encode-onnx,warp"], "--rows: unknown ['warp']"),
    (["--rows", ","], "--rows: unknown none given"),
    (["--threads", "0"], "--threads: at least 1"),
    (["--steps", "-1"], "--passages, --steps and --mine-limit: at least 1"),
    (["--cached-peer", "0"], "--cached-peer: a mini-batch of at least 1"),
])
def test_bad_arguments_are_refused_before_anything_runs(args, message, tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


def test_quartiles_of_the_pair_ratios():
    module = ratios()
    assert module.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert module.quartiles([1.2]) == (1.2, 1.2, 1.2)


def test_pairs_alternate_and_the_ratio_is_of_each_pair(monkeypatch):
    """AB, BA, AB ...: the order of every run, and each pair's ratio from its own two runs."""
    module = ratios()
    calls = []

    class Runner:  # the real Runner starts processes; this one records the order and answers fixed rates
        log = staticmethod(lambda message: None)

        def run(self, python, kind, side, spec):
            calls.append((side, spec["i"]))
            return {"seconds": 1.0, "rate": 2.0 if side == "ours" else 1.0 + spec["i"], "unit": "x/s",
                    "peak_mb": 100.0}

    spec = lambda i, name: {"i": i}  # noqa: E731
    result = module.alternate(Runner(), 5, ("py", "k", "ours", spec), ("py", "k", "peer", spec), "row")
    assert calls == [("ours", 0), ("peer", 0), ("peer", 1), ("ours", 1), ("ours", 2), ("peer", 2), ("peer", 3),
                     ("ours", 3), ("ours", 4), ("peer", 4)]
    assert result["ratios"] == [2.0, 1.0, 2 / 3, 0.5, 0.4]
    assert result["ratio_median"] == 2 / 3 and (result["ratio_q1"], result["ratio_q3"]) == (0.5, 1.0)
