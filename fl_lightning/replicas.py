"""Replicas: R runs that differ in seed and/or numeric settings, trained together in one
process (``fl-lightning fit ... --replicas.seed 0,1,2``). See ``docs/sweeps.md``.

- :func:`extract_axes` takes the ``--replicas.<option> v1,v2,...`` arguments off the command
  line (LightningCLI never sees them) and :class:`ReplicaAxes` checks them against the parsed
  config (a numeric option, lists of one length) and gives each replica's config;
- :class:`ReplicaSet` holds the replicas (replica 0 is the trainer's own
  ``FederatedModule``; replicas 1.. are ``FederatedModule`` s with their own server
  optimizer) and drives their rounds in lock-step: every replica plans its round, the planned
  clients of all of them train together (:func:`~fl_lightning.engines.replicated.train_replicas`),
  then each screens, combines and publishes its own round. A replica that diverges is
  reported and stopped; the others go on.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fl_lightning import plotting
from fl_lightning.engines.replicated import train_replicas
from fl_lightning.errors import ConfigError
from fl_lightning.replica_axes import PREFIX, ReplicaAxes, extract_axes
from fl_lightning.replica_callbacks import ReplicaCallbacks
from fl_lightning.round import DivergenceError

if TYPE_CHECKING:
    from fl_lightning.module import FederatedModule
    from fl_lightning.protocol import RoundResult

__all__ = ["ReplicaAxes", "ReplicaSet", "extract_axes", "memory_estimate"]

def memory_estimate(net: torch.nn.Module, replicas: int, clients: int, batched: bool) -> int:
    """Bytes the replicas' weights take while training: per replica its global model, the
    server optimizer's state and the round's copies (about 4 models); with the batched engine
    every ``replica x client`` row also holds its weights, momentum, gradient and its
    replica's global weights (about 4 models)."""
    size = sum(p.numel() * p.element_size() for p in net.parameters())
    per_replica = 4 * size + (4 * size * clients if batched else 4 * size)
    return replicas * per_replica


def available_memory(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes (``None``: unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Replica:
    """One run of the set: its module (the global model, algorithm, data module), server
    optimizer (``None``: the trainer's, replica 0), and what it has logged."""

    index: int
    values: dict[str, Any]
    module: FederatedModule
    optimizer: torch.optim.Optimizer | None = None
    stopped: str | None = None
    rounds: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    written: int = 0


class ReplicaSet:
    """R replicas driven in lock-step by replica 0's ``FederatedModule`` (the driver).

    Args:
        axes: the replica axes.
        modules: one ``FederatedModule`` per replica, replica 0 being the driver; each other
            one attached to its data module.
        callbacks: the replica-aware analysis callbacks (``None``: none).
    """

    def __init__(self, axes: ReplicaAxes, modules: Sequence[FederatedModule],
                 callbacks: ReplicaCallbacks | None = None) -> None:
        self.axes = axes
        self.replicas = [Replica(k, axes.values[k], m) for k, m in enumerate(modules)]
        self.callbacks = callbacks or ReplicaCallbacks([], len(modules))
        self._pending: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.replicas)

    # ------------------------------------------------------------------ start
    def start(self, driver: FederatedModule) -> None:
        """At ``on_train_start``: move replicas 1.. to the driver's device and dtype, build
        their rounds and optimizers, restore a checkpoint's replica state."""
        pending, self._pending = self._pending, None
        for rep in self.replicas[1:]:
            module = rep.module
            data = module.datamodule
            if data is not driver.datamodule and data.train_x is None:
                with _SharedLoads(driver.datamodule):
                    data.setup("fit")
                mine = driver.datamodule
                if data.train_x is mine.train_x and data.test_x is mine.test_x:
                    data._device_cache = mine._device_cache  # one copy per device and dtype
            module.to(device=driver.device, dtype=driver.dtype)
            module.setup("fit")
            rep.optimizer = module.configure_optimizers()
            if pending is not None:
                self._load_replica(rep, pending["replicas"][rep.index])
                self.callbacks.load_state_dict(rep.index, pending["replicas"][rep.index])
            module._round = module.build_round(optimizer=rep.optimizer)
            module.algorithm.init_server({k: p.detach() for k, p in module.net.named_parameters()})
        if pending is not None:
            first = pending["replicas"][0]
            self.replicas[0].stopped = first["stopped"]
            self.replicas[0].rounds = first["rounds"]
        self.callbacks.start(self.replicas)

    # ------------------------------------------------------------------ rounds
    def run_round(self, driver: FederatedModule, round_idx: int) -> RoundResult | None:
        """One round of every live replica; returns replica 0's result (``None``: stopped)."""
        self._flush(driver)
        live = [rep for rep in self.replicas if rep.stopped is None]
        rounds = [rep.module.round for rep in live]
        states = [rnd.plan(round_idx) for rnd in rounds]
        train_replicas(list(zip(rounds, states, strict=True)),
                       lambda i: self.axes.step_key(live[i].index))
        first = None
        for rep, rnd, state in zip(live, rounds, states, strict=True):
            try:
                rnd.screen(state)
                rnd.combine(state)
                result = rnd.publish(state)
            except DivergenceError as err:
                self._stop(rep, err)
                continue
            rep.rounds = round_idx + 1
            rep.rows.append({
                "step": round_idx, "round": round_idx + 1,
                "train_loss": float(result.train_loss), "local_lr": result.lr,
                "skipped_clients": len(result.skipped_clients),
                **{k: float(v) for k, v in result.systems.items()},  # stragglers, bytes_up, ...
            })
            self.callbacks.round_end(rep, result)
            if rep.index == 0:
                first = result
            else:
                rep.module.curves["train_loss"].append((round_idx + 1, float(result.train_loss)))
        if all(rep.stopped is not None for rep in self.replicas):
            raise DivergenceError(
                f"every replica diverged (the last in round {round_idx + 1}); the lines above "
                "say where: lower --model.local_lr or the algorithm's strength; the "
                "checkpoints written so far are kept"
            )
        return first

    def _stop(self, rep: Replica, err: DivergenceError) -> None:
        rep.stopped = f"replica {rep.index} ({self.axes.label(rep.index)}) stopped: {err}"
        print(f"fl-lightning: {rep.stopped}; the other replicas go on", file=sys.stderr,
              flush=True)

    def validation_end(self, driver: FederatedModule, step: int, metrics: dict) -> None:
        """After an evaluation at round ``step``: each live replica's test accuracy and loss
        (replica 0's are the ones Lightning logged)."""
        for rep in self.replicas:
            if (rep.stopped is not None or not rep.rows or rep.rows[-1]["round"] != step
                    or "val_acc" in rep.rows[-1]):  # evaluated already (checkpoint, then hook)
                continue
            if rep.index == 0:
                if "val_acc" not in metrics:
                    continue
                got = {"val_acc": float(metrics["val_acc"]),
                       "val_loss": float(metrics.get("val_loss", math.nan))}
            else:
                found = rep.module.evaluate()
                got = {"val_acc": found["test_acc"], "val_loss": found["test_loss"]}
                for key, value in got.items():
                    rep.module.curves[key].append((step, value))
            rep.rows[-1].update(got)

    # ------------------------------------------------------------------ outputs
    def folder(self, driver: FederatedModule, k: int) -> str | None:
        return None if driver._out_dir is None else os.path.join(driver._out_dir,
                                                                 f"replica_{k}")

    def _flush(self, driver: FederatedModule) -> None:
        """Append each replica's finished rows to ``<log_dir>/replica_<k>/metrics.csv``."""
        base = ["step", "round", "train_loss", "local_lr", "skipped_clients", "val_acc",
                "val_loss"]
        analysis = self.callbacks.columns()
        for rep in self.replicas:
            folder = self.folder(driver, rep.index)
            if folder is None or rep.written >= len(rep.rows):
                continue
            # the systems metrics a cell run alone logs too (the same in every round of a run)
            systems = [k for k in rep.rows[0] if k not in base and k not in analysis]
            columns = [*base, *systems, *analysis]
            self.callbacks.fill(rep, rep.rows[rep.written:])
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, "metrics.csv")
            new = not os.path.isfile(path)
            with open(path, "a") as fh:
                if new:
                    fh.write(",".join(columns) + "\n")
                for row in rep.rows[rep.written:]:
                    fh.write(",".join("" if row.get(c) is None else str(row[c])
                                      for c in columns) + "\n")
            rep.written = len(rep.rows)

    def train_end(self, driver: FederatedModule) -> dict[str, Any]:
        """Write every replica's ``final_metrics.json`` and ``curves.png`` under its folder and
        ``replicas.json`` (one entry per replica) in the run folder; returns replica 0's."""
        self._flush(driver)
        summary = []
        for rep in self.replicas:
            module = rep.module
            metrics: dict[str, Any] = {"rounds": rep.rounds, **module.evaluate(),
                                       **module.systems.final_metrics(rep.rounds),
                                       "replica": rep.index, "values": rep.values}
            if rep.stopped is not None:
                metrics["stopped"] = rep.stopped
            summary.append(metrics)
            folder = self.folder(driver, rep.index)
            if folder is None:
                continue
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "final_metrics.json"), "w") as fh:
                json.dump(metrics, fh, indent=2)
            self.callbacks.write(rep, folder)
            plotting.curves(module.curves, os.path.join(folder, "curves.png"),
                            title=f"{type(module.algorithm).__name__}, replica {rep.index} "
                            f"({self.axes.label(rep.index)}), {rep.rounds} rounds")
            state = "stopped (diverged)" if rep.stopped else "final global test accuracy"
            print(f"fl-lightning: replica {rep.index} ({self.axes.label(rep.index)}): {state} "
                  f"{metrics['test_acc']:.4f} (loss {metrics['test_loss']:.4f}) after "
                  f"{rep.rounds} rounds; saved {folder}")
        if driver._out_dir is not None:
            with open(os.path.join(driver._out_dir, "replicas.json"), "w") as fh:
                json.dump(summary, fh, indent=2)
        return summary[0]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the replicas (replica 0's weights, optimizer and
        algorithm state are the checkpoint's own)."""
        out = []
        for rep in self.replicas:
            entry: dict[str, Any] = {"values": rep.values, "stopped": rep.stopped,
                                     "rounds": rep.rounds}
            if rep.index:
                module = rep.module
                entry.update(
                    net=module.net.state_dict(),
                    optimizer=rep.optimizer.state_dict() if rep.optimizer else None,
                    algorithm=module.algorithm.state_dict(),
                    systems=module.systems.state_dict() if module.systems.active else {},
                    curves={k: [list(p) for p in v] for k, v in module.curves.items()},
                    callbacks=self.callbacks.state_dict(rep.index),
                )
            out.append(entry)
        return {"names": self.axes.names, "replicas": out}

    def load_state_dict(self, state: dict[str, Any] | None, path: str) -> None:
        """Check that the checkpoint's replicas are this run's; keep their state for
        :meth:`start` (the replicas are moved to their device and dtype there first)."""
        mine = [rep.values for rep in self.replicas]
        theirs = None if state is None else [r["values"] for r in state["replicas"]]
        if theirs != mine:
            raise ConfigError(
                f"--ckpt_path={path} holds "
                + ("no replicas" if theirs is None else f"the replicas {theirs}")
                + f", not this run's {mine}: resume with the replica options it was written with"
            )
        self._pending = state

    @staticmethod
    def _load_replica(rep: Replica, entry: dict[str, Any]) -> None:
        module = rep.module
        module.net.load_state_dict(entry["net"])
        if entry.get("optimizer") is not None:
            rep.optimizer.load_state_dict(entry["optimizer"])
        module.algorithm.load_state_dict(entry.get("algorithm", {}))
        module.systems.load_state_dict(entry.get("systems", {}))
        for key, points in entry.get("curves", {}).items():
            module.curves[key] = [(int(r), float(v)) for r, v in points]
        rep.stopped, rep.rounds = entry["stopped"], entry["rounds"]


def build_replicas(cli: Any, axes: ReplicaAxes) -> ReplicaSet:
    """Replicas 1.. of ``cli``'s run (its model is replica 0), each instantiated from its own
    config right after ``seed_everything`` of its own seed, as the run alone would be (the
    global random state is then put back as replica 0 left it).

    Raises:
        ConfigError: under DDP; with a round callback that is not replica-aware (it would see
            replica 0 only); when the replicas' weights would not fit in memory.
    """
    import random

    import numpy as np
    from lightning.pytorch import seed_everything

    from fl_lightning.engines.batched import BatchedEngine

    trainer, model, sub = cli.trainer, cli.model, cli.subcommand
    if trainer.world_size > 1:
        raise ConfigError(f"{PREFIX}* cannot be combined with --trainer.strategy ddp "
                          f"({trainer.world_size} processes): run the replicas on one device")
    callbacks = ReplicaCallbacks(trainer.callbacks, len(axes))
    dm = cli.datamodule
    batched = isinstance(model.engine, BatchedEngine)
    need = memory_estimate(model.net, len(axes), model.clients_per_round(dm.num_clients), batched)
    device = trainer.strategy.root_device
    free = available_memory(device)
    # the joint replicas x clients call is not chunked: an explicit budget bounds it whole
    budget = model.engine.memory_budget if batched else None
    limit = budget if budget is not None else free
    if limit is not None and need > limit:
        has = (f"--model.engine.memory_budget allows {budget / 2**20:.0f} MiB"
               if budget is not None else f"{device} has {free / 2**20:.0f} MiB free")
        raise ConfigError(
            f"{PREFIX}* asks for {len(axes)} replicas, whose weights need about "
            f"{need / 2**20:.0f} MiB ({len(axes)} replicas x "
            f"{'clients per round x ' if batched else ''}{type(model.net).__name__}) but "
            f"{has}: use fewer replicas"
            + (" or --model.engine SequentialEngine" if batched else "")
            + (" or a larger --model.engine.memory_budget" if budget is not None else "")
        )
    saved = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    base = cli.config[sub]
    modules = [model]
    try:
        for k in range(1, len(axes)):
            config = copy.deepcopy(cli.config)
            config[sub] = axes.config(base, k)
            seed = config[sub].get("seed_everything")
            if seed is not False and seed is not None:
                seed_everything(seed, workers=True, verbose=False)
            built = cli.parser.instantiate_classes(config)[sub]
            module = built["model"]
            same_data = config[sub]["data"] == base["data"]
            module.attach(dm if same_data else built["data"])
            modules.append(module)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.random.set_rng_state(saved[2])
    return ReplicaSet(axes, modules, callbacks)


class _SharedLoads:
    """While active, ``load_dataset`` of the data module returns the tensors ``loaded`` (the
    driver's data module) already holds for the same dataset and folder: the data are read
    once, each replica partitions them with its own seed."""

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded

    def __enter__(self) -> None:
        from fl_lightning.data import module as data_module

        self.saved = data_module.load_dataset
        original, loaded = self.saved, self.loaded

        def load(dataset: str, data_dir: str, download: bool, split: str, *args: Any) -> Any:
            if (dataset, data_dir) == (loaded.dataset, loaded.data_dir):
                pair = ((loaded.train_x, loaded.train_y) if split == "train"
                        else (loaded.test_x, loaded.test_y))
                if pair[0] is not None:
                    return pair
            return original(dataset, data_dir, download, split, *args)

        data_module.load_dataset = load

    def __exit__(self, *exc: Any) -> None:
        from fl_lightning.data import module as data_module

        data_module.load_dataset = self.saved
