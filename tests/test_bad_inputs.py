"""Every bad option stops before training with one line naming the option and the fix."""

from __future__ import annotations

import pytest
from test_cli import QUICK

from fl_lightning.cli import main

FEDPROX = ["--model.algorithm", "fl_lightning.algorithms.FedProx"]
PART = ["--model.participation", "fl_lightning.systems.Participation"]
ATTACK = ["--model.attack", "fl_lightning.systems.SignFlip"]


def _sys(option: str, cls: str) -> list[str]:
    return [f"--model.{option}", f"fl_lightning.systems.{cls}"]


DP = ["--model.privacy", "fl_lightning.systems.DPFedAvg"]
QUANT, TOPK = _sys("compressor", "StochasticQuantizer"), _sys("compressor", "TopK")
TRIM, KRUM = _sys("aggregator", "TrimmedMean"), _sys("aggregator", "Krum")
NORMB, MEDIAN = _sys("aggregator", "NormBounding"), _sys("aggregator", "CoordinateMedian")
SECAGG = ["--model.secure_aggregation", "fl_lightning.systems.SecureAggregation"]
BAD_INPUTS = [
    # data: partitions
    (["--data.alpha", "0"], "--data.alpha"),
    (["--data.alpha", "-0.5"], "--data.alpha"),
    (["--data.alpha", "nan"], "--data.alpha"),
    (["--data.alpha", "inf"], "--data.alpha"),
    (["--data.partition", "shard", "--data.shards_per_client", "100"], "--data.shards_per_client"),
    (["--data.partition", "shard", "--data.shards_per_client", "0"], "--data.shards_per_client"),
    (["--data.partition", "dirichlet"], "--data.partition"),
    (["--data.num_clients", "5000"], "--data.num_clients"),
    (["--data.num_clients", "0"], "--data.num_clients"),
    (["--data.num_clients", "-3"], "--data.num_clients"),
    (["--data.num_clients", "abc"], "--data.num_clients"),
    (["--data.partitoin", "iid"], "--data.partitoin"),
    (["--data.sampling", "random"], "--data.sampling"),
    (["--data.eval_batch_size", "0"], "--data.eval_batch_size"),
    (["--data.augment", "heavy"], "--data.augment"),
    (["--data.seed", "-1"], "--data.seed"),
    # data: datasets and files
    (["--data.dataset", "cifar100x"], "--data.dataset"),
    (["--data.dataset", "chestmnist"], "--data.dataset"),
    (["--data.dataset", "mnist", "--data.data_dir", "nowhere"], "--data.data_dir"),
    (["--data.dataset", "pneumoniamnist", "--data.data_dir", "nowhere"], "--data.data_dir"),
    (["--data.dataset", "cifar10", "--data.data_dir", "nowhere"], "--data.data_dir"),
    # model: the round protocol and local optimizer
    (["--model.sample_ratio", "0"], "--model.sample_ratio"),
    (["--model.sample_ratio", "1.5"], "--model.sample_ratio"),
    (["--model.sample_ratio", "-0.1"], "--model.sample_ratio"),
    (["--model.local_epochs", "0"], "--model.local_epochs"),
    (["--model.batch_size", "0"], "--model.batch_size"),
    (["--model.batch_size", "-5"], "--model.batch_size"),
    (["--model.local_lr", "-0.1"], "--model.local_lr"),
    (["--model.local_lr", "nan"], "--model.local_lr"),
    (["--model.lr_decay", "0"], "--model.lr_decay"),
    (["--model.momentum", "1.5"], "--model.momentum"),
    (["--model.weight_decay", "-1"], "--model.weight_decay"),
    (["--model.on_nonfinite", "explode"], "--model.on_nonfinite"),
    # model: algorithm, network, server optimizer
    (["--model.algorithm.rho", "-1"], "--model.algorithm.rho"),
    (["--model.algorithm.rho", "inf"], "--model.algorithm.rho"),
    (["--model.algorithm.temperature", "0"], "--model.algorithm.temperature"),
    ([*FEDPROX, "--model.algorithm.mu", "-1"], "--model.algorithm.mu"),
    (["--model.algorithm", "foo.Bar"], "--model.algorithm"),
    (["--model.algorithm", "torch.nn.Linear"], "--model.algorithm"),
    (["--model.net", "foo.Net"], "--model.net"),
    (["--model.server_optimizer", "foo.Opt"], "--model.server_optimizer"),
    # model: systems heterogeneity, attacks, robustness, privacy, compression
    ([*PART, "--model.participation.dropout_ratio", "1.0"], "--model.participation.dropout_ratio"),
    ([*PART, "--model.participation.dropout_ratio", "-0.1"],
     "--model.participation.dropout_ratio"),
    ([*PART, "--model.participation.straggler_ratio", "1.5"],
     "--model.participation.straggler_ratio"),
    ([*PART, "--model.participation.straggler_work", "0"], "--model.participation.straggler_work"),
    ([*ATTACK, "--model.attack.share", "1.0"], "--model.attack.share"),
    ([*ATTACK, "--model.attack.scale", "-2"], "--model.attack.scale"),
    ([*QUANT, "--model.compressor.bits", "0"], "--model.compressor.bits"),
    ([*QUANT, "--model.compressor.bits", "33"], "--model.compressor.bits"),
    ([*TOPK, "--model.compressor.ratio", "0"], "--model.compressor.ratio"),
    ([*TOPK, "--model.compressor.ratio", "1.5"], "--model.compressor.ratio"),
    ([*TRIM, "--model.aggregator.beta", "0.5"], "--model.aggregator.beta"),
    ([*KRUM, "--model.aggregator.num_byzantine", "2"], "--model.aggregator.num_byzantine"),
    ([*KRUM, "--model.aggregator.multi", "0"], "--model.aggregator.multi"),
    ([*NORMB, "--model.aggregator.max_norm", "0"], "--model.aggregator.max_norm"),
    ([*DP, "--model.privacy.noise_multiplier", "0"], "--model.privacy.noise_multiplier"),
    ([*DP, "--model.privacy.clip_norm", "-1"], "--model.privacy.clip_norm"),
    ([*DP, "--model.privacy.delta", "1"], "--model.privacy.delta"),
    ([*SECAGG, "--model.secure_aggregation.frac_bits", "60"], "--model.secure_aggregation"),
    ([*SECAGG, *MEDIAN], "--model.aggregator"),
    ([*SECAGG, *TOPK], "--model.compressor"),
    (["--model.algorithm", "fl_lightning.algorithms.SCAFFOLD", *MEDIAN],
     "--model.aggregator"),
    (["--model.algorithm", "fl_lightning.algorithms.FedNova", *DP], "--model.privacy"),
    # client engines
    (["--model.engine", "fl_lightning.engines.BatchedEngine", "--model.net",
      "fl_lightning.models.PflSimpleCNN"], "--model.engine.randomness different"),
    (["--model.engine", "fl_lightning.engines.BatchedEngine", "--model.engine.randomness",
      "same"], "--model.engine.randomness"),
    (["--model.engine", "fl_lightning.engines.BatchedEngine", "--model.engine.compile", "2"],
     "--model.engine.compile"),
    # trainer and run options
    (["--trainer.precision", "16-mixed"], "--trainer.precision"),
    (["--trainer.precision", "16-true"], "--trainer.precision"),
    (["--trainer.gradient_clip_val", "1.0"], "--trainer.gradient_clip_val"),
    (["--trainer.max_steps", "-1"], "--trainer.max_steps"),
    (["--checkpoint_every_n_rounds", "0"], "--checkpoint_every_n_rounds"),
    (["--keep_last_checkpoints", "0"], "--keep_last_checkpoints"),
    (["--resume_changes", "maybe"], "--resume_changes"),
    (["--ckpt_path", "missing.ckpt"], "--ckpt_path"),
]


@pytest.mark.parametrize("args,option", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_gives_one_clear_line(args, option, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICK, *args, "--trainer.enable_progress_bar", "false"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1, err
    assert option in err[0]
    assert not (tmp_path / "nowhere").exists()
    assert not list(tmp_path.glob("lightning_logs/fl/*/checkpoints/*.ckpt"))


def test_there_are_at_least_forty_bad_inputs():
    assert len(BAD_INPUTS) >= 40
