"""Shared plumbing of the analysis callbacks: scheduling, logging, history, figures, data.

Private to the package: the public classes document what they inherit from here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from fl_lightning.callbacks.functional import Batch
from fl_lightning.errors import ConfigError

Criterion = Callable[[Tensor, Tensor], Tensor]


class _RoundCallback(pl.Callback):
    """Base of the analysis callbacks.

    Runs its measurement after every ``every_n_rounds``-th round (rounds counted from 1), logs
    ``<prefix>/<name>`` scalars to every logger at ``step = round - 1`` (rounds counted from 1:
    the step at which Lightning logs the same round's ``train_loss``, ``round`` and
    ``val_acc``), keeps them in :attr:`history` (saved in checkpoints), and at the end of
    training writes ``<log_dir>/analysis/<prefix>.json`` and, where it has one, a figure.
    """

    prefix = "analysis"
    #: whether the measurement reads every client's result of the round
    #: (``RoundResult.clients``): under DDP the round then gathers every client's result on
    #: every rank instead of all-reducing the mean (each rank trains only its share)
    needs_client_results = False

    def __init__(self, every_n_rounds: int = 1, criterion: Criterion | None = None) -> None:
        self._errors: list[str] = []
        self.every_n_rounds = self._int(
            every_n_rounds, f"--trainer.callbacks.{type(self).__name__}.every_n_rounds"
        )
        self.criterion: Criterion = criterion if criterion is not None else F.cross_entropy
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0  # wall time spent in measurements (the cost the docs report)

    # ------------------------------------------------------------------ validation
    # Bad values are recorded in ``__init__`` and raised as ``ConfigError`` by ``setup`` (or
    # the first round): raised inside ``__init__`` under the CLI, jsonargparse would wrap the
    # one-line message into a multi-line union-type error.
    def _fail(self, message: str) -> None:
        self._errors.append(message)

    def _int(self, value: Any, option: str, low: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            self._fail(f"{option}={value!r} is invalid: it must be an integer >= {low}")
            return low
        return value

    def _pos(self, value: Any, option: str, allow_zero: bool = False) -> float:
        v = float(value)
        if not (math.isfinite(v) and (v >= 0 if allow_zero else v > 0)):
            bound = ">= 0" if allow_zero else "> 0"
            self._fail(f"{option}={value!r} is invalid: it must be a finite number {bound}")
            return 1.0
        return v

    def validate(self) -> None:
        """Raise the first configuration error found in ``__init__``.

        Raises:
            ConfigError: one line naming the option, the bad value and the fix.
        """
        if self._errors:
            raise ConfigError(self._errors[0])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.validate()

    # ------------------------------------------------------------------ scheduling, logging
    def _due(self, round_idx: int) -> bool:
        self.validate()
        return (round_idx + 1) % self.every_n_rounds == 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, every_n_rounds=self.every_n_rounds)

    def _record(self, trainer: Any, round_number: int, metrics: dict[str, float]) -> None:
        row = {"round": float(round_number), **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        logged = {f"{self.prefix}/{k}": float(v) for k, v in metrics.items()}
        # Straight to the loggers at the round's own step (fl_lightning.loggers.RoundCSVLogger
        # merges them into the round's row). Not through LightningModule.log: Lightning would
        # repeat a value logged at round r in every later round's row until it is logged again.
        step = round_number - 1  # the step Lightning logs this round's own metrics at
        for logger in getattr(trainer, "loggers", None) or []:
            logger.log_metrics(logged, step=step)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """``(rounds, values)`` of one logged quantity, from :attr:`history`."""
        rows = [r for r in self.history if key in r]
        return [r["round"] for r in rows], [r[key] for r in rows]

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history], "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self.seconds = float(state_dict.get("seconds", 0.0))

    # ------------------------------------------------------------------ output files
    def _out_dir(self, trainer: Any) -> str | None:
        """``<log_dir>/analysis`` (created) on rank zero, ``None`` on every other rank.

        Every rank must call it at the same point: ``trainer.log_dir`` is a broadcast under
        DDP, and a rank that does not ask leaves the others waiting forever. The folder is
        kept for :meth:`_save_figure` and :meth:`_write_history`, which never ask again.
        """
        log_dir = getattr(trainer, "log_dir", None)  # a collective under DDP: every rank asks
        if log_dir is None or not getattr(trainer, "is_global_zero", True):
            self._dir: str | None = None
            return None
        self._dir = os.path.join(log_dir, "analysis")
        os.makedirs(self._dir, exist_ok=True)
        return self._dir

    def _save_figure(self, trainer: Any, fig: Any, name: str) -> str | None:
        """Save ``fig`` as ``<log_dir>/analysis/<name>.png`` and hand it to image loggers.

        Into the folder the hook's :meth:`_out_dir` call found (nothing is written on ranks
        other than zero, and no collective is started here).
        """
        out = getattr(self, "_dir", None)
        path = None
        if out is not None:
            path = os.path.join(out, f"{name}.png")
            fig.savefig(path, dpi=110, bbox_inches="tight")
        step = max(int(getattr(trainer, "global_step", 1)) - 1, 0)
        for logger in getattr(trainer, "loggers", None) or []:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):  # TensorBoard
                experiment.add_figure(f"{self.prefix}/{name}", fig, global_step=step)
            elif hasattr(logger, "log_image") and path is not None:  # W&B, Neptune, ...
                logger.log_image(key=f"{self.prefix}/{name}", images=[path], step=step)
        import matplotlib.pyplot as plt

        plt.close(fig)
        return path

    def _write_history(self, trainer: Any) -> None:
        out = getattr(self, "_dir", None)
        if out is None:
            return
        with open(os.path.join(out, f"{self.prefix}.json"), "w") as fh:
            json.dump({"history": self.history, "seconds": self.seconds,
                       **self._summary()}, fh, indent=1)

    def _summary(self) -> dict[str, Any]:
        return {}

    def _plot(self, trainer: Any) -> None:
        """Draw this callback's figure (subclasses)."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._out_dir(trainer) is None:  # on every rank (see _out_dir); writes on rank zero
            return
        self._write_history(trainer)
        if self.history:
            self._plot(trainer)

    def _plot_series(self, trainer: Any, keys: Sequence[str], name: str, title: str,
                     logy: bool = False) -> None:
        """One panel per key against integer rounds (:mod:`fl_lightning.plotting` style)."""
        from fl_lightning import plotting

        keys = [k for k in keys if self.series(k)[0]]
        if not keys:
            return
        fig, axes = plotting.subplots(len(keys), width=3.8, height=3.1)
        for ax, key in zip(axes, keys, strict=True):
            x, y = self.series(key)
            plotting.plot_rounds(ax, x, y, key=key, logy=logy)
        fig.suptitle(title)
        fig.tight_layout()
        self._save_figure(trainer, fig, name)


# ---------------------------------------------------------------------- data from the module
def _as_input(x: Tensor, module: Any) -> Tensor:
    dtype = getattr(module, "dtype", torch.float32)
    return x.to(dtype) if x.is_floating_point() else x


def _buffers(module: Any) -> dict[str, Tensor]:
    return {k: b.detach() for k, b in module.net.named_buffers()}


def _split_tensors(module: Any, split: str) -> tuple[Tensor, Tensor]:
    dm = module.datamodule
    if split == "train":
        return dm.train_tensors(module.device)
    if dm.test_x is None:
        dm.setup("test")
    return dm.test_x.to(module.device), dm.test_y.to(module.device)


def _fixed_batches(
    module: Any, split: str, num_batches: int, batch_size: int, seed: int
) -> list[Batch]:
    """``num_batches`` disjoint batches of ``batch_size`` samples drawn once from ``split``.

    The draw is a pure function of ``seed`` (the same batches at every round and on resume).
    """
    x, y = _split_tensors(module, split)
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(y), generator=gen)[: num_batches * batch_size].to(y.device)
    return [(_as_input(x[i], module), y[i]) for i in order.split(batch_size)]


def _client_batches(module: Any, client_id: int, batch_size: int) -> list[Batch]:
    """All training samples of ``client_id``, in order, in batches of ``batch_size``."""
    x, y = module.datamodule.train_tensors(module.device)
    idx = module.datamodule.client_indices[client_id].to(y.device)
    return [(_as_input(x[i], module), y[i]) for i in idx.split(batch_size)]


def _eval_batches(module: Any, max_samples: int | None, batch_size: int) -> list[Batch]:
    x, y = _split_tensors(module, "test")
    n = len(y) if max_samples is None else min(len(y), int(max_samples))
    return [(_as_input(x[i:min(i + batch_size, n)], module), y[i:min(i + batch_size, n)])
            for i in range(0, n, batch_size)]
