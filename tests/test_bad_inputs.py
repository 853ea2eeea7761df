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
    (["--data.partition", "dirichlet", "--data.client_size", "1000"], "--data.client_size"),
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
    (["--ddp_timeout", "0"], "--ddp_timeout"),
    (["--ddp_stop_timeout", "-5"], "--ddp_stop_timeout"),
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


# Inputs that once ended in a traceback, a vague message or a silent change (issue #17): each
# must give one line that names the option and states the rule or the closest valid name.
CONFIG_FILES = {
    "ok.yaml": "trainer:\n  max_steps: 3\n",
    "list.yaml": "- trainer\n- model\n",
    "scalar.yaml": "just a string\n",
    "tab.yaml": "trainer:\n\tmax_steps: 3\n",
    "typo.yaml": "trainer:\n  max_stepz: 3\n",
    "badclass.yaml": "model:\n  algorithm:\n    class_path: fl_lightning.algorithms.FedSAMM\n",
    # a repeated key: YAML keeps the last value silently (local_lr 5.0 trained, issue #26)
    "dupkey.yaml": "model:\n  local_lr: 0.01\n  batch_size: 10\n  local_lr: 5.0\n",
    "dupsection.yaml": "model:\n  local_lr: 0.01\ntrainer:\n  max_steps: 3\nmodel:\n"
                       "  batch_size: 10\n",
    "anchors.yaml": "base: &b {local_lr: 0.02}\nmodel:\n  <<: *b\n  batch_size: 10\n",
}
EVERY = "an integer >= 1 (the number of rounds between evaluations"
CLEAR_MESSAGES = [
    # the rule that failed, not the type
    (["--data.alpha", "nan"], ["--data.alpha=nan", "finite number > 0"]),
    (["--data.alpha", "-inf"], ["--data.alpha=-inf", "finite number > 0"]),
    (["--model.local_lr", "NaN"], ["--model.local_lr=nan", "finite number >= 0"]),
    (["--model.algorithm.rho=inf"], ["--model.algorithm.rho=inf", "finite number >= 0"]),
    # closest names
    (["--model.algorithm.rh", "2"],
     ["--model.algorithm.rh", "did you mean --model.algorithm.rho?"]),
    ([*FEDPROX, "--model.algorithm.muu", "1"], ["did you mean --model.algorithm.mu?"]),
    (["--model.algorithm", "fl_lightning.algorithms.FedAv"],
     ["--model.algorithm=fl_lightning.algorithms.FedAv",
      "did you mean fl_lightning.algorithms.FedAvg?"]),
    (["--model.algorithm", "Scafold"], ["did you mean fl_lightning.algorithms.SCAFFOLD?"]),
    (["--model.algorithm", "foo.Bar"], ["no module foo", "FedSoL"]),
    (["--model.net", "fl_lightning.models.VGG1"], ["did you mean fl_lightning.models.VGG11?"]),
    (["--model.server_optimizer", "torch.optim.Adamm"], ["did you mean torch.optim.Adam?"]),
    (["--trainer.callbacks+=callbacks.HessianEigenvalue"],
     ["--trainer.callbacks", "did you mean callbacks.HessianEigenvalues?"]),
    (["--trainer.callbacks+=LearningRateMonitr"],
     ["did you mean lightning.pytorch.callbacks.LearningRateMonitor?"]),
    (["--data.dataset", "mnst"], ["--data.dataset='mnst'", "did you mean --data.dataset mnist?"]),
    (["--data.dataset", "pathmnst"], ["did you mean --data.dataset pathmnist?"]),
    (["--data.partitoin", "iid"], ["--data.partitoin", "did you mean --data.partition?"]),
    (["--data.partition", "shrd"],
     ["--data.partition=shrd", "did you mean --data.partition shard?"]),
    # YAML files: the file, the line, the rule; with two files, the one at fault
    (["--config", "list.yaml"], ["--config=list.yaml", "must be a mapping", "not a list"]),
    (["--config", "scalar.yaml"], ["--config=scalar.yaml", "must be a mapping", "not a str"]),
    (["--config", "ok.yaml", "--config", "tab.yaml"],
     ["--config=tab.yaml", "line 2, column 1", "spaces, not tabs"]),
    (["--config", "ok.yaml", "--config", "typo.yaml"],
     ["trainer.max_stepz", "--config typo.yaml", "did you mean trainer.max_steps?"]),
    (["--config", "badclass.yaml"],
     ["--config badclass.yaml", "did you mean fl_lightning.algorithms.FedSAM?"]),
    (["--config", "absent.yaml"], ["--config=absent.yaml", "no such file"]),
    (["--config", "ok.yaml", "--config", "dupkey.yaml"],
     ["--config=dupkey.yaml", "key 'local_lr' appears twice", "lines 2 and 4", "delete"]),
    (["--config", "dupsection.yaml"],
     ["--config=dupsection.yaml", "key 'model' appears twice", "lines 1 and 5"]),
    # merge keys (<<: *anchor) are not repeated keys; the unknown 'base' key is what is wrong
    (["--config", "anchors.yaml"], ["base", "--config anchors.yaml"]),
    # an unknown torch.compile backend: one line listing them, not a traceback in round 1
    (["--model.engine", "fl_lightning.engines.BatchedEngine", "--model.engine.compile", "true",
      "--model.engine.compile_backend", "nosuchbackend"],
     ["--model.engine.compile_backend='nosuchbackend'", "available torch.compile backends",
      "inductor", "aot_eager"]),
    # Trainer options the federated loop cannot honour, with what to use instead
    (["--trainer.val_check_interval", "0"],
     ["--trainer.val_check_interval=0", EVERY]),
    (["--trainer.val_check_interval", "0.5"],
     ["--trainer.val_check_interval=0.5", EVERY]),
    (["--trainer.val_check_interval", "-1"], [EVERY]),
    (["--trainer.accumulate_grad_batches", "4"],
     ["--trainer.accumulate_grad_batches=4", "--model.local_epochs"]),
    (["--trainer.gradient_clip_algorithm", "norm"], ["--trainer.gradient_clip_algorithm=norm"]),
    (["--trainer.limit_train_batches", "0"],
     ["--trainer.limit_train_batches=0", "--trainer.max_steps"]),
    (["--trainer.overfit_batches", "1"], ["--trainer.overfit_batches=1", "--trainer.max_steps"]),
    (["--trainer.check_val_every_n_epoch", "2"],
     ["--trainer.check_val_every_n_epoch=2", "--trainer.val_check_interval"]),
]


@pytest.mark.parametrize(
    "args,expected", CLEAR_MESSAGES, ids=[" ".join(a) for a, _ in CLEAR_MESSAGES]
)
def test_bad_input_states_the_rule_or_the_closest_name(args, expected, tmp_path, monkeypatch,
                                                       capsys):
    monkeypatch.chdir(tmp_path)
    for name, text in CONFIG_FILES.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICK, *args, "--trainer.enable_progress_bar", "false"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    err = [line for line in lines if "error:" in line]
    assert len(err) == 1, lines
    assert "Traceback" not in "\n".join(lines)
    for part in expected:
        assert part in err[0], err[0]
    assert not (tmp_path / "lightning_logs").exists()


def test_zero_is_refused_with_denormals_flushed():
    """With flush-to-zero on (torch.set_flush_denormal, as the benchmarks run), 0 still fails
    the ``> 0`` checks (a bound of ``math.ulp(0.0)`` compared equal to 0 then)."""
    import torch

    from fl_lightning.errors import ConfigError
    from fl_lightning.module import FederatedModule

    torch.set_flush_denormal(True)
    try:
        for option in ("sample_ratio", "lr_decay"):
            with pytest.raises(ConfigError, match=f"--model.{option}=0 is invalid"):
                FederatedModule(num_classes=10, input_shape=(1, 8, 8), **{option: 0})
    finally:
        torch.set_flush_denormal(False)


def _read_only_folder(tmp_path) -> str:
    """A folder no file can be created in: a read-only one for a normal user; for root (whom
    permissions do not stop), a path in sysfs, which refuses new entries to everyone."""
    import os

    if os.geteuid() != 0:
        folder = tmp_path / "readonly"
        folder.mkdir()
        folder.chmod(0o555)
        return str(folder)
    folder = "/sys/fl-lightning-readonly-data"
    try:
        os.makedirs(folder)
    except OSError:
        return folder
    os.rmdir(folder)
    pytest.skip("no read-only folder to test with")


@pytest.mark.parametrize("dataset,folder", [("mnist", "MNIST/raw"),
                                            ("pneumoniamnist", "medmnist")])
def test_a_download_into_a_read_only_folder_says_so(dataset, folder, tmp_path, monkeypatch,
                                                    capsys):
    """--data.download true with a data folder that cannot be written: one line naming the
    folder and the fix (before: a download error that suggested checking the network)."""
    data_dir = _read_only_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICK, "--data.dataset", dataset, "--data.data_dir", data_dir,
              "--data.download", "true", "--trainer.enable_progress_bar", "false"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1, err
    assert f"must write into {data_dir}/{folder}, which is not writable" in err[0]
    assert "pass a writable --data.data_dir" in err[0] and "internet" not in err[0]
