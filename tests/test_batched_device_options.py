"""The batched engine's device options: TF32 and cuDNN flags (set for the round, restored
after), channels_last and bf16 autocast (both run on the CPU, close to fp32)."""

from __future__ import annotations

import pytest
import torch
from test_engines import _plan

from fl_lightning.algorithms import FedAvg
from fl_lightning.engines import BatchedEngine
from fl_lightning.errors import ConfigError
from fl_lightning.models.cnn import FedAvgCNN


def test_tf32_and_cudnn_benchmark_are_set_for_the_round_and_restored():
    seen = []

    class Spy(FedAvg):
        def direction(self, params, x, y, ctx):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark))
            return super().direction(params, x, y, ctx)

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    net = FedAvgCNN(10, (1, 8, 8))
    gp = {k: p.detach().clone() for k, p in net.named_parameters()}
    x, y = torch.randn(120, 1, 8, 8), torch.randint(0, 10, (120,))
    engine = BatchedEngine(tf32=True, cudnn_benchmark=True)
    engine.run_round(Spy(), net, gp, {}, _plan(sizes=(25, 12), n=120), (x, y), 0.01, 0.0, 0.0)
    assert seen and set(seen) == {(True, True)}
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark) == before


@pytest.mark.parametrize("options,tol", [({"channels_last": True}, 1e-5),
                                         ({"autocast": "bf16"}, 5e-3)])
def test_channels_last_and_bf16_autocast_stay_close_to_fp32(options, tol):
    torch.manual_seed(0)
    net = FedAvgCNN(10, (1, 8, 8))
    gp = {k: p.detach().clone() for k, p in net.named_parameters()}
    x, y = torch.randn(120, 1, 8, 8), torch.randint(0, 10, (120,))
    plan = _plan(sizes=(25, 12), n=120, epochs=1)
    ref = BatchedEngine().run_round(FedAvg(), net, gp, {}, plan, (x, y), 0.01, 0.9, 0.0)
    out = BatchedEngine(**options).run_round(FedAvg(), net, gp, {}, plan, (x, y), 0.01, 0.9,
                                             0.0)
    moved = max(float((r.params[k] - gp[k]).abs().max()) for r in ref for k in gp)
    diff = max(float((a.params[k] - b.params[k]).abs().max()) for a, b in zip(ref, out, strict=True)
               for k in gp)
    assert diff < tol * max(moved, 1.0) and moved > 1e-4
    assert all(b.params[k].dtype == torch.float32 for b in out for k in gp)


@pytest.mark.parametrize("option,value", [("tf32", "yes"), ("cudnn_benchmark", 1),
                                          ("channels_last", None), ("autocast", "fp8")])
def test_a_bad_device_option_is_one_clear_error(option, value):
    with pytest.raises(ConfigError, match=f"--model.engine.{option}="):
        BatchedEngine(**{option: value})


def test_device_options_are_settable_from_the_cli(tmp_path, monkeypatch):
    from test_cli import QUICK

    from fl_lightning.cli import FederatedCLI

    monkeypatch.chdir(tmp_path)
    cli = FederatedCLI(args=[
        "--config", QUICK, "--model.engine", "BatchedEngine",
        "--model.engine.init_args.tf32", "true", "--model.engine.init_args.autocast", "bf16",
        "--model.engine.init_args.channels_last", "true",
        "--model.engine.init_args.compile", "reduce-overhead",
    ], run=False)
    engine = cli.model.engine
    assert (engine.tf32, engine.autocast, engine.channels_last, engine.compile) == (
        True, "bf16", True, "reduce-overhead")
