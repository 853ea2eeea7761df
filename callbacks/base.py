"""``RoundCallback``: the public base of the analysis callbacks, and their data helpers.

Subclass :class:`RoundCallback` to measure something after federated rounds: implement
:meth:`RoundCallback.on_round_end`, check your arguments with the ``check_*`` methods in
``__init__``, log with :meth:`RoundCallback.log_round`, and optionally draw a figure in
:meth:`RoundCallback.plot`. The base schedules the measurement (``every_n_rounds``), logs at
the round's own step, keeps a :attr:`~RoundCallback.history` that checkpoints save and restore,
and writes ``<log_dir>/analysis/<prefix>.json`` at the end of training, safely under DDP.
docs/analysis.md ("Writing your own analysis callback") has a complete example.

The batch helpers (:func:`fixed_batches`, :func:`client_batches`, :func:`eval_batches`,
:func:`split_tensors`, :func:`as_input`, :func:`buffers_of`) read the federated data module
and the global network of the ``FederatedModule`` a round hook receives, in the form the
kernels of :mod:`fl_lightning.callbacks.functional` take.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from fl_lightning import validate
from fl_lightning.callbacks.functional import Batch
from fl_lightning.errors import ConfigError
from fl_lightning.hooks import RoundResult

__all__ = [
    "Criterion",
    "RoundCallback",
    "as_input",
    "buffers_of",
    "client_batches",
    "eval_batches",
    "fixed_batches",
    "split_tensors",
]

Criterion = Callable[[Tensor, Tensor], Tensor]


class RoundCallback(pl.Callback):
    """Base of the analysis callbacks: a Lightning ``Callback`` with a round hook.

    The round loop calls :meth:`on_round_end` once per communication round with the
    :class:`~fl_lightning.hooks.RoundResult` of that round. A subclass measures something when
    :meth:`is_due` says so (after every ``every_n_rounds``-th round, rounds counted from 1) and
    hands the numbers to :meth:`log_round`, which logs ``<prefix>/<name>`` to every logger at
    ``step = round - 1`` (the step at which Lightning logs the same round's ``train_loss``,
    ``round`` and ``val_acc``) and appends them to :attr:`history` (saved in checkpoints). At
    the end of training every rank calls :meth:`output_dir` and rank zero writes
    ``<log_dir>/analysis/<prefix>.json`` and the figure of :meth:`plot`.

    DDP: every step that every rank must take (``trainer.log_dir`` is a broadcast, and so are
    barriers and strategy reductions) is taken on every rank; only the file writes happen on
    rank zero. A subclass that writes its own files asks :meth:`output_dir` on every rank and
    writes where it returns a folder (``None`` on the other ranks).

    Arguments are checked in ``__init__`` with :meth:`check_int`, :meth:`check_positive`,
    :meth:`check_choice` or :meth:`fail`: a bad value raises a one-line
    :class:`~fl_lightning.errors.ConfigError` naming the option
    (``--trainer.callbacks.<Class>.<name>``), the value and the fix, before any training.
    (jsonargparse wraps an error raised while it builds a callback in a multi-line "Union
    subtypes" message; ``fl-lightning`` prints the ``ConfigError`` inside it as one line.)

    Args:
        every_n_rounds: measure after every n-th round (an integer >= 1).
        criterion: the loss ``criterion(logits, targets)`` of measurements that need one;
            default cross-entropy.

    Attributes:
        prefix: the name of the logged quantities (``<prefix>/<name>``) and of the output
            files (class attribute; set it in a subclass).
        needs_client_results: set to ``True`` in a subclass whose measurement reads every
            client's result (``RoundResult.clients``): the round then holds every client's
            result instead of folding each into the aggregate as it finishes (``O(K x
            model)`` memory), and under DDP gathers them on every rank instead of
            all-reducing their mean.
        history: one dict per measured round: ``{"round": r, <name>: value, ...}``.
        seconds: wall time spent in measurements (subclasses add to it).

    Raises:
        ConfigError: for ``every_n_rounds`` that is not an integer >= 1.
    """

    prefix = "analysis"
    needs_client_results = False
    #: the round hook is :meth:`measure_global` alone (it reads only the new global model
    #: and the module it is handed): under ``--replicas.*`` every replica gets its own copy,
    #: with its numbers in ``replica_<k>/`` (``fl_lightning/replica_callbacks.py``)
    replica_aware = False

    def __init__(self, every_n_rounds: int = 1, criterion: Criterion | None = None) -> None:
        self.every_n_rounds = self.check_int(every_n_rounds, "every_n_rounds")
        self.criterion: Criterion = criterion if criterion is not None else F.cross_entropy
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0
        self._dir: str | None = None

    # ------------------------------------------------------------------ argument checks
    def option(self, name: str) -> str:
        """The command-line spelling of argument ``name``: ``--trainer.callbacks.<Class>.name``."""
        return f"--trainer.callbacks.{type(self).__name__}.{name}"

    def fail(self, message: str) -> NoReturn:
        """Stop with one line (``message``: the option, the value and the fix).

        Raises:
            ConfigError: always.
        """
        raise ConfigError(message)

    def check_int(self, value: Any, name: str, low: int = 1) -> int:
        """``value`` if it is an integer ``>= low``.

        Raises:
            ConfigError: otherwise, naming :meth:`option` ``(name)`` and the value.
        """
        return _check_int(value, self.option(name), low)

    def check_positive(self, value: Any, name: str, allow_zero: bool = False) -> float:
        """``value`` as a float if it is finite and ``> 0`` (``>= 0`` with ``allow_zero``).

        Raises:
            ConfigError: otherwise, naming :meth:`option` ``(name)`` and the value.
        """
        return _check_positive(value, self.option(name), allow_zero)

    def check_choice(self, value: Any, name: str, choices: Sequence[str]) -> str:
        """``value`` if it is one of ``choices``.

        Raises:
            ConfigError: otherwise, naming :meth:`option` ``(name)``, the value and the choices.
        """
        return validate.choice(value, self.option(name), choices)

    # ------------------------------------------------------------------ the round hook
    def on_round_end(self, trainer: pl.Trainer, module: Any, result: RoundResult) -> None:
        """Called once per communication round, after the server update, on every rank.

        Measure here when :meth:`is_due` ``(result.round)``, then :meth:`log_round`.
        ``result`` is only valid during the call: copy what you keep. ``result.clients``
        holds every client's full result only if :attr:`needs_client_results` is set
        (otherwise their light part, id, size, steps and loss, with empty weights; under DDP
        this rank's share).

        Args:
            trainer: the Lightning ``Trainer``.
            module: the ``FederatedModule`` (its ``net``, ``datamodule``, ``device``,
                ``dtype`` and ``num_classes``; see the batch helpers of this module).
            result: what the round produced (``round`` counts from 0).
        """

    def measure_global(self, trainer: Any, module: Any, result: RoundResult) -> None:
        """When due: ``self.measure(module, result.global_after)`` (a subclass's measurement
        of the new global model), timed into :attr:`seconds`, then :meth:`log_round`; the
        whole ``on_round_end`` of a callback that measures only the global model."""
        if not self.is_due(result.round):
            return
        start = time.perf_counter()
        metrics = self.measure(module, result.global_after)
        self.seconds += time.perf_counter() - start
        self.log_round(trainer, result.round + 1, metrics)

    def replica_metrics(self) -> list[str]:
        """The names :meth:`measure` gives every measured round: a replica-aware callback's
        columns of ``replica_<k>/metrics.csv`` (default none)."""
        return []

    def replica_start(self, module: Any) -> None:
        """A replica-aware callback's copy for another replica, at the start of fit: what
        ``on_fit_start`` does with that replica's ``module`` (default nothing)."""
        del module

    def is_due(self, round_idx: int) -> bool:
        """Whether to measure after round ``round_idx`` (counted from 0)."""
        return (round_idx + 1) % self.every_n_rounds == 0

    def log_round(self, trainer: Any, round_number: int, metrics: dict[str, float]) -> None:
        """Log ``<prefix>/<name>`` of round ``round_number`` (from 1) and keep it in history.

        Straight to ``trainer.loggers`` at the round's own step (``round_number - 1``;
        ``fl_lightning.loggers.RoundCSVLogger`` merges them into the round's row), not through
        ``LightningModule.log``, which would repeat the value in every later round's row.
        """
        row = {"round": float(round_number), **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        logged = {f"{self.prefix}/{k}": float(v) for k, v in metrics.items()}
        for logger in getattr(trainer, "loggers", None) or []:
            logger.log_metrics(logged, step=round_number - 1)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """``(rounds, values)`` of one logged quantity, from :attr:`history`."""
        rows = [r for r in self.history if key in r]
        return [r["round"] for r in rows], [r[key] for r in rows]

    # ------------------------------------------------------------------ checkpoints
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, every_n_rounds=self.every_n_rounds)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history], "seconds": self.seconds}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self.seconds = float(state_dict.get("seconds", 0.0))

    # ------------------------------------------------------------------ output files
    def output_dir(self, trainer: Any) -> str | None:
        """``<log_dir>/analysis`` (created) on rank zero, ``None`` on every other rank.

        Every rank must call it at the same point of a hook: ``trainer.log_dir`` is a
        broadcast under DDP, and a rank that does not ask leaves the others waiting forever.
        The folder is kept for :meth:`save_figure` and :meth:`write_history`, which never ask
        again (they write nothing where it is ``None``).
        """
        log_dir = getattr(trainer, "log_dir", None)  # a collective under DDP: every rank asks
        if log_dir is None or not getattr(trainer, "is_global_zero", True):
            self._dir = None
            return None
        self._dir = os.path.join(log_dir, "analysis")
        os.makedirs(self._dir, exist_ok=True)
        return self._dir

    def save_figure(self, trainer: Any, fig: Any, name: str) -> str | None:
        """Save ``fig`` as ``<log_dir>/analysis/<name>.png``, hand it to image loggers, close it.

        Writes into the folder of the hook's :meth:`output_dir` call (nothing on other ranks;
        no collective is started here).

        Returns:
            the PNG's path, or ``None`` where nothing was written.
        """
        path = None
        if self._dir is not None:
            path = os.path.join(self._dir, f"{name}.png")
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

    def write_history(self, trainer: Any) -> None:
        """Write ``<prefix>.json``: :attr:`history`, ``seconds`` and :meth:`summary`."""
        if self._dir is None:
            return
        with open(os.path.join(self._dir, f"{self.prefix}.json"), "w") as fh:
            json.dump({"history": self.history, "seconds": self.seconds,
                       **self.summary()}, fh, indent=1)

    def summary(self) -> dict[str, Any]:
        """Extra entries of ``<prefix>.json`` (subclasses; default none)."""
        return self._summary()

    def plot(self, trainer: Any) -> None:
        """Draw this callback's figure with :meth:`save_figure` (subclasses; default none)."""
        self._plot(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.output_dir(trainer) is None:  # on every rank (see output_dir)
            return
        self.write_history(trainer)
        if self.history:
            self.plot(trainer)

    def plot_series(self, trainer: Any, keys: Sequence[str], name: str, title: str,
                    logy: bool = False) -> None:
        """One panel per logged key against integer rounds, saved as ``<name>.png``."""
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
        self.save_figure(trainer, fig, name)

    # ------------------------------------------------------------------ older private names
    # Callbacks written against the private base of earlier releases override _plot and
    # _summary and call the names below; they keep working (same behaviour).
    def _summary(self) -> dict[str, Any]:
        return {}

    def _plot(self, trainer: Any) -> None:
        return None

    def _fail(self, message: str) -> NoReturn:
        self.fail(message)

    def _int(self, value: Any, option: str, low: int = 1) -> int:
        return _check_int(value, option, low)

    def _pos(self, value: Any, option: str, allow_zero: bool = False) -> float:
        return _check_positive(value, option, allow_zero)

    def validate(self) -> None:
        """Nothing to do: arguments are checked in ``__init__`` (kept for older callers)."""

    def _due(self, round_idx: int) -> bool:
        return self.is_due(round_idx)

    def _record(self, trainer: Any, round_number: int, metrics: dict[str, float]) -> None:
        self.log_round(trainer, round_number, metrics)

    def _out_dir(self, trainer: Any) -> str | None:
        return self.output_dir(trainer)

    def _save_figure(self, trainer: Any, fig: Any, name: str) -> str | None:
        return self.save_figure(trainer, fig, name)

    def _write_history(self, trainer: Any) -> None:
        self.write_history(trainer)

    def _plot_series(self, trainer: Any, keys: Sequence[str], name: str, title: str,
                     logy: bool = False) -> None:
        self.plot_series(trainer, keys, name, title, logy)


def _check_int(value: Any, option: str, low: int) -> int:
    return validate.integer(value, option, low)


def _check_positive(value: Any, option: str, allow_zero: bool) -> float:
    return validate.number(value, option, 0.0, low_open=not allow_zero)


# ---------------------------------------------------------------------- data from the module
def as_input(x: Tensor, module: Any) -> Tensor:
    """``x`` in the module's floating dtype (``module.dtype``); integer inputs unchanged."""
    dtype = getattr(module, "dtype", torch.float32)
    return x.to(dtype) if x.is_floating_point() else x


def buffers_of(module: Any) -> dict[str, Tensor]:
    """The global network's buffers (BatchNorm statistics), detached, by name."""
    return {k: b.detach() for k, b in module.net.named_buffers()}


def split_tensors(module: Any, split: str) -> tuple[Tensor, Tensor]:
    """All inputs and labels of ``split`` (``"train"``: every client's; ``"test"``).

    On ``module.device``; inputs as stored (pass batches through :func:`as_input`).
    """
    dm = module.datamodule
    if split == "train":
        return dm.train_tensors(module.device)
    if dm.test_x is None:
        dm.setup("test")
    return dm.test_x.to(module.device), dm.test_y.to(module.device)


def fixed_batches(
    module: Any, split: str, num_batches: int, batch_size: int, seed: int
) -> list[Batch]:
    """``num_batches`` disjoint batches of ``batch_size`` samples drawn once from ``split``.

    The draw is a pure function of ``seed`` (the same batches at every round and on resume).
    """
    x, y = split_tensors(module, split)
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(y), generator=gen)[: num_batches * batch_size].to(y.device)
    return [(as_input(x[i], module), y[i]) for i in order.split(batch_size)]


def client_batches(module: Any, client_id: int, batch_size: int) -> list[Batch]:
    """All training samples of ``client_id``, in order, in batches of ``batch_size``."""
    x, y = module.datamodule.train_tensors(module.device)
    idx = module.datamodule.client_indices[client_id].to(y.device)
    return [(as_input(x[i], module), y[i]) for i in idx.split(batch_size)]


def eval_batches(module: Any, max_samples: int | None, batch_size: int) -> list[Batch]:
    """The first ``max_samples`` test samples (all if ``None``), in order, in batches."""
    x, y = split_tensors(module, "test")
    n = len(y) if max_samples is None else min(len(y), int(max_samples))
    return [(as_input(x[i:min(i + batch_size, n)], module), y[i:min(i + batch_size, n)])
            for i in range(0, n, batch_size)]
