"""What a Lightning user meets first: outputs, terminal, --help, short names, failures (#16)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tomllib

from fl_lightning import plotting, registry
from fl_lightning.callbacks.hessian import condition_ratio
from fl_lightning.cli import main
from fl_lightning.cli_help import SHORT_HELP
from fl_lightning.loggers import RoundCSVLogger
from fl_lightning.progress import format_round_line
from fl_lightning.trainer_options import UNSUPPORTED

REPO = Path(__file__).resolve().parents[1]
QUICK = str(REPO / "configs" / "quickstart.yaml")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


#: Run in one fresh process by the test below, in this order; argv[1] holds the fit commands.
FRESH_PROCESS = """
import json, os, sys
from fl_lightning.data.datasets import dataset_info, load_dataset
load_dataset("digits", None, False, "train")  # read without importing scikit-learn
assert "sklearn" not in sys.modules, "reading digits imported scikit-learn"
assert dataset_info("pathmnist").input_shape == (3, 28, 28)
assert "medmnist" in sys.modules
# medmnist creates ~/.medmnist when imported; our loader removes it again if it was absent
assert not os.path.exists(os.path.join(os.environ["HOME"], ".medmnist")), "~/.medmnist left"
from fl_lightning.cli import main
mnist, quick = json.loads(sys.argv[1])
main(mnist)
print("=== quick start ===", file=sys.stderr, flush=True)
main(quick)
"""


def test_fresh_process_writes_only_under_its_run_folders(tmp_path):
    """One fresh process (so that medmnist and matplotlib, imported by torchmetrics, start
    cold) with an empty $HOME and no MPLCONFIGDIR, working directory ``work``:

    1. reading digits imports no scikit-learn, and medmnist's ~/.medmnist is removed again;
    2. 2 rounds of MNIST on idx files in ``work``: the data folder is left as it was, only
       ``work/lightning_logs`` is created;
    3. the README's quick start, 3 rounds, output not a terminal: everything lands under
       --trainer.default_root_dir (nothing more in the working directory), one metrics row
       per round, clients.csv and curves.png, and one log line per round with its round and
       accuracy.

    At the end $HOME is still empty. (One process for what were three tests, each with a
    process of its own: a start costs ~10 s of imports.)"""
    from test_cli import FAST, _tiny_mnist
    from test_datasets import snapshot

    data, home, work, root = (tmp_path / d for d in ("data", "home", "work", "root"))
    _tiny_mnist(data)
    home.mkdir()
    work.mkdir()
    mnist = ["fit", "--config", str(REPO / "configs/mnist/fedavg_shard.yaml"), *FAST,
             "--data.data_dir", str(data), "--data.num_clients", "6", "--model.sample_ratio",
             "0.5", "--trainer.max_steps", "2", "--data.verify_checksums", "false"]
    quick = ["fit", "--config", QUICK, "--trainer.max_steps", "3",
             "--trainer.val_check_interval", "1", "--model.local_epochs", "1",
             "--trainer.default_root_dir", str(root), "--trainer.callbacks+=RoundProgressBar",
             "--trainer.callbacks.lines=true"]
    env = {k: v for k, v in _env(HOME=str(home)).items()
           if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    before = snapshot(data)
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, json.dumps([mnist, quick])],
        cwd=work, env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert snapshot(data) == before
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []
    # the MNIST run's logger folder only: the quick start wrote nothing here
    assert sorted(str(p.relative_to(work)) for p in work.glob("*/*/*")) == [
        "lightning_logs/fl/version_0"]
    assert sorted(p.name for p in work.iterdir()) == ["lightning_logs"]
    assert (work / "lightning_logs/fl/version_0/final_metrics.json").is_file()
    run = root / "lightning_logs" / "fl" / "version_0"
    assert (run / "curves.png").stat().st_size > 10_000
    assert (run / "checkpoints" / "round=3.ckpt").is_file()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]  # one row per round
    assert [float(r["round"]) for r in rows] == [1.0, 2.0, 3.0]
    assert all(r["train_loss"] and r["val_acc"] for r in rows) and "epoch" not in rows[0]
    clients = list(csv.DictReader(open(run / "clients.csv")))
    assert len(clients) == 3 * 5  # 5 of the 20 clients per round
    assert {c["status"] for c in clients} == {"trained"}
    assert all(int(c["num_samples"]) > 0 for c in clients)
    quick_err = proc.stderr.split("=== quick start ===\n", 1)[1]
    lines = [ln for ln in quick_err.splitlines() if ln.startswith("round ")]
    assert [ln.split(" | ")[0] for ln in lines] == ["round 1/3", "round 2/3", "round 3/3"]
    accs = [float(r["val_acc"]) for r in rows]
    for line, acc in zip(lines, accs, strict=True):
        assert "clients 5 (skipped 0, straggling 0)" in line
        assert f"val_acc {acc:.4f}" in line
    noise = proc.stdout + proc.stderr  # of both runs
    for unwanted in ("Validation DataLoader", "Tip:", "manual optimization", "v_num", "LeafSpec"):
        assert unwanted not in noise


def test_fit_help_is_short_and_lists_only_project_models(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) <= 245  # 229 at 80 columns (about 232 with the suite's callbacks)
    lines = out.splitlines()
    for option in SHORT_HELP:  # every short help names a real option, and is the one shown
        at = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith(f"--{option} ")
                  or f", --{option} " in ln)
        assert SHORT_HELP[option] in " ".join(ln.strip() for ln in lines[at:at + 3]), option
    for option in UNSUPPORTED:  # the Trainer options the rounds refuse say so
        assert SHORT_HELP[f"trainer.{option}"].startswith("Refused: "), option
    assert "torch.nn" not in out and "Bilinear" not in out
    net = out[out.index("--model.net VALUE"):out.index("--model.algorithm VALUE")]
    for name in ("FedAvgCNN", "MLP2NN", "ResNet18", "VGG11", "SLViT"):
        assert name in net
    engine = out[out.index("--model.engine VALUE"):out.index("--model.on_nonfinite")]
    assert "BatchedEngine" in engine and "SequentialEngine" in engine
    assert "HessianEigenvalues" in out and "RoundProgressBar" in out
    callbacks = out[out.index("--trainer.callbacks VALUE"):out.index("--trainer.fast_dev_run")]
    assert "WeightDivergence" in callbacks and "RoundCallback" not in callbacks  # a base


def test_short_names_resolve(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICK, "--model.engine", "BatchedEngine",
              "--model.algorithm", "FedProx", "--model.net", "MLP2NN",
              "--model.aggregator", "Krum", "--model.server_optimizer", "FedYogi",
              "--trainer.callbacks+=HessianEigenvalues", "--trainer.callbacks+=RoundProgressBar",
              "--trainer.logger", "RoundCSVLogger", "--print_config"])
    out = capsys.readouterr().out
    for path in ("fl_lightning.engines.BatchedEngine", "fl_lightning.algorithms.FedProx",
                 "fl_lightning.models.MLP2NN", "fl_lightning.systems.Krum",
                 "fl_lightning.optim.FedYogi", "fl_lightning.callbacks.HessianEigenvalues",
                 "fl_lightning.progress.RoundProgressBar", "fl_lightning.loggers.RoundCSVLogger"):
        assert f"class_path: {path}" in out
    names = registry.short_names()
    assert names["BatchedEngine"] == "fl_lightning.engines.BatchedEngine"
    assert names["FedSoL"] == "fl_lightning.algorithms.FedSoL"
    assert names["ClassWiseAccuracy"] == "fl_lightning.callbacks.ClassWiseAccuracy"


def test_missing_tensorboard_is_one_line_exit_2(tmp_path, monkeypatch, capfd):
    for name in ("tensorboard", "tensorboardX"):  # unimportable, whether installed or not
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(sys, "argv", ["fl-lightning"])  # as from a terminal: args only
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop, warnings.catch_warnings(record=True) as shown:
        warnings.resetwarnings()  # what a terminal shows (pytest records warnings instead)
        warnings.simplefilter("default")
        main(["fit", "--config", QUICK, "--trainer.logger",
              "lightning.pytorch.loggers.TensorBoardLogger", "--trainer.logger.save_dir",
              "lightning_logs"])
    assert stop.value.code == 2
    hidden_by_python = (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                        ResourceWarning)
    assert [str(w.message) for w in shown if not issubclass(w.category, hidden_by_python)] == []
    err = capfd.readouterr().err  # the file descriptor: Lightning's own log lines too
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "tensorboard" in lines[0] and "fl-lightning[tensorboard]" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["predict", "tune"])
def test_unsupported_subcommand_is_one_line_exit_2(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--config", QUICK])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and command in err[0] and "fit" in err[0]


def test_missing_rich_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "rich", None)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", QUICK, "--trainer.callbacks+=RichRoundProgressBar"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fl-lightning[rich]" in err[0]


# ---------------------------------------------------------------------- units
def test_round_csv_logger_merges_a_step_into_one_row(tmp_path):
    logger = RoundCSVLogger(str(tmp_path), name="fl")
    logger.log_metrics({"train_loss": 1.0, "round": 1.0, "epoch": 0}, step=0)
    logger.save()  # Lightning saves after every call: the open row stays pending
    logger.log_metrics({"hessian/lambda_1": 3.0}, step=0)
    logger.log_metrics({"val_acc": 0.5}, step=0)
    logger.log_metrics({"train_loss": 0.8, "round": 2.0}, step=1)
    logger.finalize("success")
    rows = list(csv.DictReader(open(tmp_path / "fl" / "version_0" / "metrics.csv")))
    assert len(rows) == 2 and "epoch" not in rows[0]
    assert rows[0]["hessian/lambda_1"] == "3.0" and rows[0]["val_acc"] == "0.5"
    assert rows[1]["train_loss"] == "0.8" and rows[1]["val_acc"] == ""


def test_round_line_has_round_clients_accuracy_and_eta():
    line = format_round_line({"round": 4, "total": 10, "clients": 5, "skipped": 1,
                              "straggling": 2, "train_loss": 0.5, "val_acc": 0.875,
                              "seconds": 2.0})
    assert line == ("round 4/10 | clients 5 (skipped 1, straggling 2) | train_loss 0.5000 | "
                    "val_acc 0.8750 | 2.00 s/round | ETA 12s")


def test_seconds_per_round_and_eta_include_the_evaluation(monkeypatch):
    """A round of 7.2 s training and an evaluation of 8.2 s every 2 rounds: 11.30 s/round
    (train 7.20 + eval 4.10), and the ETA counts the 6 rounds and 3 evaluations still to come
    (before: 7.20 s/round and an ETA of training only)."""
    from types import SimpleNamespace

    from fl_lightning import progress

    clock = iter([0.0, 7.2, 7.2, 15.4])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    trainer = SimpleNamespace(max_steps=10, val_check_batch=2, state=SimpleNamespace(fn="fit"),
                              sanity_checking=False, callback_metrics={"val_acc": 0.5})
    result = SimpleNamespace(round=3, client_ids=[1, 2], skipped_clients=[], systems={},
                             train_loss=0.25)
    stats = progress._RoundStats()
    stats.begin()
    stats.round_end(trainer, result)
    stats.eval_begin(trainer)
    stats.validation_end(trainer)
    line = format_round_line(stats.stats)
    assert line.endswith("| val_acc 0.5000 | 11.30 s/round (train 7.20 + eval 4.10) | ETA 1m08s")
    assert stats.postfix()["s/round"] == "11.30" and stats.postfix()["eval"] == "4.10"


def test_hessian_ratio_is_a_gap_when_lambda_k_is_about_zero(tmp_path):
    assert condition_ratio(10.0, 2.5) == 4.0
    with pytest.warns(UserWarning, match="not meaningful"):
        assert math.isnan(condition_ratio(0.97, -4.96e-5))  # was printed as -19,548
    fig, axes = plotting.subplots(1)
    with pytest.warns(UserWarning, match="1 of 3 values"):
        plotting.plot_rounds(axes[0], [10, 20, 30], [3.1, math.nan, 2.9], key="hessian/ratio_1_5")
    assert axes[0].get_title() == "Hessian condition: lambda_1 / lambda_5"
    assert axes[0].get_xlabel() == "round"
    assert all(float(t).is_integer() for t in axes[0].get_xticks())
    plotting.save(fig, str(tmp_path / "r.png"))


def test_old_callbacks_name_warns_and_is_the_same_package(monkeypatch):
    import fl_lightning.callbacks as new

    for name in [n for n in sys.modules if n == "callbacks" or n.startswith("callbacks.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.warns(DeprecationWarning, match="fl_lightning.callbacks"):
        import callbacks
    from callbacks.hessian import HessianEigenvalues

    assert callbacks is new and HessianEigenvalues is new.HessianEigenvalues
    # the alias leaves the real package as it was (its __spec__ names the real module)
    assert new.__spec__.name == "fl_lightning.callbacks"
    assert callbacks.hessian.__spec__.name == "fl_lightning.callbacks.hessian"


def test_a_callbacks_package_of_your_own_wins_over_the_old_name(tmp_path, monkeypatch):
    import fl_lightning.callbacks  # noqa: F401  (the finder is installed)

    (tmp_path / "callbacks").mkdir()
    (tmp_path / "callbacks" / "__init__.py").write_text("MINE = True\n")
    for name in [n for n in sys.modules if n == "callbacks" or n.startswith("callbacks.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no deprecation: it is yours
        import callbacks
    assert callbacks.MINE and callbacks.__file__ == str(tmp_path / "callbacks" / "__init__.py")
    monkeypatch.delitem(sys.modules, "callbacks")


def test_every_subpackage_is_packaged():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {str(p.parent.relative_to(REPO)).replace(os.sep, ".")
             for p in (REPO / "fl_lightning").rglob("__init__.py")}
    assert found | {"fl_lightning.callbacks"} == set(config["packages"])
    assert config["package-dir"] == {"fl_lightning.callbacks": "callbacks"}
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert {"tensorboard", "rich"} <= set(extras["optional-dependencies"])


def test_plotting_warns_only_for_non_finite(recwarn):
    fig, axes = plotting.subplots(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plotting.plot_rounds(axes[0], [1, 2], [0.1, 0.2], key="val_acc")
    assert axes[0].get_ylabel() == "accuracy"
