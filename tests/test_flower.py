"""A real Flower federation on 127.0.0.1 (SuperLink + 3 SuperNodes, separate processes) gives
the same global weights as fl-lightning's own simulation, and survives a killed SuperNode.

Skipped unless the ``flower`` extra is installed. Every process is started and stopped here;
the timeouts only bound a hung run, they never decide a result.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402

from fl_lightning.cli import FederatedCLI  # noqa: E402
from fl_lightning.flower.federation import LocalFederation  # noqa: E402
from fl_lightning.systems.participation import Participation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "flower_app"
CONFIG = APP / "fedsol_digits.yaml"
ALGORITHMS = {
    "fedavg": "--model.algorithm fl_lightning.algorithms.FedAvg",
    "fedsol": "",  # the app's config: FedSoL, adaptive radius
    "scaffold": "--model.algorithm fl_lightning.algorithms.SCAFFOLD",
}
ROUNDS = 2
RUN_LIMIT_S = 900  # bounds a hung run only


class _RecordedDrops(Participation):
    """The dropouts a Flower run recorded, replayed in the simulation."""

    def __init__(self, dropped: dict[int, list[int]]) -> None:
        super().__init__()
        self.dropped = dropped

    def split(self, seed, round_idx, client_ids):
        return [c for c in client_ids if c in self.dropped.get(round_idx, [])], []


def _simulate(root: Path, args: str, rounds: int, dropped=None) -> dict[str, torch.Tensor]:
    argv = ["--config", str(CONFIG), *args.split(), "--trainer.max_steps", str(rounds),
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root)]
    cli = FederatedCLI(args=argv, run=False)
    if dropped:
        cli.model.systems.participation = _RecordedDrops(dropped)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}


def _wait(proc, what: str) -> None:
    deadline = time.monotonic() + RUN_LIMIT_S
    while proc.poll() is None:
        assert time.monotonic() < deadline, f"{what} did not finish within {RUN_LIMIT_S} s"
        time.sleep(0.2)


def _final(save_dir: Path) -> dict[str, torch.Tensor]:
    assert (save_dir / "summary.json").is_file(), f"the run wrote no summary in {save_dir}"
    return {f"net.{k}": v for k, v in torch.load(save_dir / "final.pt").items()}


def _assert_same(flower: dict, sim: dict, what: str) -> None:
    assert flower.keys() == sim.keys()
    for k in sim:
        assert torch.allclose(flower[k], sim[k], rtol=1e-5, atol=1e-6), (
            f"{what}: {k} differs by {float((flower[k] - sim[k]).abs().max()):.3g}"
        )


def test_flower_federation_matches_simulation_and_drops_a_killed_supernode(tmp_path):
    # FedAvg, FedSoL and SCAFFOLD as three concurrent runs on one federation of 3 SuperNodes;
    # once FedAvg's first round is done, a SuperNode that every run samples is killed
    with LocalFederation(3, tmp_path / "fed") as fed:
        runs = {}
        for name, args in ALGORITHMS.items():
            cfg = {"rounds": ROUNDS, "args": args, "save-dir": str(tmp_path / name),
                   "round-timeout": 300.0}
            runs[name] = fed.submit(APP, cfg, log_name=f"run-{name}.log")
        progress = tmp_path / "fedavg" / "progress.jsonl"
        deadline = time.monotonic() + RUN_LIMIT_S
        while not (progress.is_file() and progress.read_text().strip()):
            assert runs["fedavg"].poll() is None, "the fedavg run stopped before its round 1"
            assert time.monotonic() < deadline, "round 1 never ended"
            time.sleep(0.1)
        first = json.loads(progress.read_text().splitlines()[0])
        assert first["dropped"] == [] and len(first["reported"]) == 2
        victim = first["reported"][0]  # the seeded sampler picks it in every round
        fed.kill(victim)
        for name, proc in runs.items():
            _wait(proc, f"the {name} run")
    for name, args in ALGORITHMS.items():
        history = json.loads((tmp_path / name / "summary.json").read_text())["history"]
        assert [h["round"] for h in history] == list(range(ROUNDS))  # it finished every round
        for h in history:  # only the killed node is ever missing, the others always report
            assert set(h["reported"]) | set(h["dropped"]) == set(h["sampled"])
            assert set(h["dropped"]) <= {victim}
        dropped = {h["round"]: h["dropped"] for h in history if h["dropped"]}
        if name == "fedavg":
            assert dropped == {r: [victim] for r in range(1, ROUNDS)}, history
        # nothing lost: exactly the simulation with the same seed, the same sampled clients
        # and the killed client dropped from the same rounds
        sim = _simulate(tmp_path / f"sim-{name}", args, ROUNDS, dropped)
        _assert_same(_final(tmp_path / name), sim, name)
