"""benchmarks/gpu_suite.py smoke-runs on the CPU on tiny MNIST files and writes every section."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from test_datasets import write_idx

REPO = Path(__file__).resolve().parents[1]


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks/gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_smoke_on_cpu(tmp_path, capsys):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (400, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(400) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(20) % 10)
    out = tmp_path / "suite.json"
    suite = _suite()
    suite.main(["--device", "cpu", "--smoke", "--no-verify", "--data-dir",
                str(tmp_path / "data"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["config"]["batched_engine"] == {
        "compile": "none", "compile_backend": "inductor", "tf32": False,
        "cudnn_benchmark": False, "channels_last": False, "autocast": "none"}
    assert set(result["rounds"]) == {f"{a}/{e}" for a in ("fedavg", "fedsol", "fedsol_head",
                                                          "scaffold")
                                     for e in ("sequential", "batched")}
    assert all(r["seconds_per_round"] > 0 for r in result["rounds"].values())
    prof = result["profile"]
    # the batched engine runs the clients' step as one call: fewer operators per client-step
    assert prof["batched"]["aten_ops_per_step"] > 0 and prof["sequential"]["steps"] == 8
    assert result["bare"]["total_batch"] == 4 * 10
    assert result["scaffold_1000"]["stored_clients"] == 20
    conv = result["grouped_conv"]  # grouped and dense convolutions agree up to fp32 rounding
    assert conv["max_abs_grad_diff_float64"] < 1e-12 and conv["max_abs_grad_diff"] < 1e-3
    assert "batched fedavg throughput / bare loop (target >= 0.7)" in result["ratios"]
    assert "| fedavg/batched |" in capsys.readouterr().out


def test_gpu_suite_hands_its_engine_options_to_the_batched_engine():
    # a compiled round costs 6-10 s on this CPU (dynamo): the smoke run stays eager, and this
    # checks that the options reach every BatchedEngine the suite builds
    suite = _suite()
    args = argparse.Namespace(compile="reduce-overhead", compile_backend="eager", tf32=True,
                              cudnn_benchmark=True, channels_last=True, autocast="bf16")
    engine = suite.engines(args)["batched"]()
    assert (engine.compile, engine.compile_backend, engine.tf32, engine.cudnn_benchmark,
            engine.channels_last, engine.autocast) == (
        "reduce-overhead", "eager", True, True, True, "bf16")
    with pytest.raises(SystemExit, match="--sections 'rounds,speed'"):
        suite.main(["--sections", "rounds,speed"])
    with pytest.raises(SystemExit):  # argparse: invalid choice
        suite.main(["--compile", "fast"])
