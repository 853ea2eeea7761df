"""Round progress bars: what a federated run shows in the terminal, one round per tick.

:class:`RoundProgressBar` (tqdm) and :class:`RichRoundProgressBar` (``pip install
fl-lightning[rich]``) show ``round r/R``, the clients trained / skipped / straggling in the round,
the train loss, the last validation accuracy, seconds per round (training + evaluation) and the
ETA, with no nested validation bar. When the output is not a terminal (CI, SLURM, ``| tee``) the
tqdm bar prints one line per round instead, e.g.::

    round 3/60 | clients 5 (skipped 0, straggling 0) | train_loss 0.7230 | val_acc 0.5667
    | 0.66 s/round (train 0.61 + eval 0.05) | ETA 38s      (one line)

``s/round`` and the ETA include the evaluation: its time, spread over the rounds between two
evaluations (``--trainer.val_check_interval``), once one has been timed.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

__all__ = ["RichRoundProgressBar", "RoundProgressBar", "format_round_line"]


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_round_line(stats: dict[str, Any]) -> str:
    """One line for a round: ``round r/R | clients ... | train_loss ... | val_acc ... | ...``."""
    total = stats.get("total")
    parts = [f"round {stats['round']}/{total if total else '?'}"]
    parts.append(
        f"clients {stats['clients']} (skipped {stats['skipped']}, "
        f"straggling {stats['straggling']})"
    )
    if stats.get("train_loss") is not None:
        parts.append(f"train_loss {stats['train_loss']:.4f}")
    if stats.get("val_acc") is not None:
        parts.append(f"val_acc {stats['val_acc']:.4f}")
    train, evaluation = stats["seconds"], stats.get("eval_seconds")
    if evaluation is None:
        parts.append(f"{train:.2f} s/round")
    else:  # the evaluation's share of a round: its time over the rounds between evaluations
        parts.append(f"{train + evaluation:.2f} s/round (train {train:.2f} + eval "
                     f"{evaluation:.2f})")
    if total:
        eta = stats.get("eta")
        parts.append(f"ETA {_duration(train * (total - stats['round']) if eta is None else eta)}")
    return " | ".join(parts)


class _RoundStats:
    """Collects a round's numbers from the round hook and the logged metrics."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}
        self._start: float | None = None
        self._seconds: list[float] = []
        self._eval_start: float | None = None
        self._eval_seconds: list[float] = []
        self.val_acc: float | None = None

    def begin(self) -> None:
        self._start = time.perf_counter()

    def eval_begin(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._eval_start = time.perf_counter()

    def _timing(self, trainer: pl.Trainer) -> None:
        """Seconds per round: training (a moving mean of 10 rounds) plus the evaluation's
        share (the mean of the last 5 evaluations over the rounds between two), and the ETA of
        both (the evaluations still scheduled)."""
        s = self.stats
        if not s or not self._seconds:
            return
        train = sum(self._seconds) / len(self._seconds)
        every = getattr(trainer, "val_check_batch", None)
        every = int(every) if isinstance(every, int | float) and math.isfinite(every) else None
        each = sum(self._eval_seconds) / len(self._eval_seconds) if self._eval_seconds else None
        s["seconds"] = train
        s["eval_seconds"] = each / every if each is not None and every else None
        total, done = s["total"], s["round"]
        if total:
            left = total // every - done // every if every and each is not None else 0
            s["eta"] = train * (total - done) + (each or 0.0) * max(left, 0)

    def round_end(self, trainer: pl.Trainer, result: Any) -> None:
        elapsed = time.perf_counter() - self._start if self._start is not None else 0.0
        self._seconds = (self._seconds + [elapsed])[-10:]  # a moving mean of 10 rounds
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.stats = {
            "round": result.round + 1,
            "total": total,
            "clients": len(result.client_ids),
            "skipped": len(result.skipped_clients),
            "straggling": int(result.systems.get("stragglers", 0)),
            "train_loss": float(result.train_loss),
            "val_acc": self.val_acc,
            "seconds": sum(self._seconds) / len(self._seconds),
        }
        self._timing(trainer)

    def validation_end(self, trainer: pl.Trainer) -> None:
        if self._eval_start is not None:
            elapsed = time.perf_counter() - self._eval_start
            self._eval_seconds = (self._eval_seconds + [elapsed])[-5:]
            self._eval_start = None
            self._timing(trainer)
        value = trainer.callback_metrics.get("val_acc")
        if value is not None:
            self.val_acc = float(value)
            if self.stats:
                self.stats["val_acc"] = self.val_acc

    def postfix(self) -> dict[str, str]:
        s = self.stats
        if not s:
            return {}
        out = {"clients": s["clients"], "skipped": s["skipped"], "straggling": s["straggling"],
               "loss": f"{s['train_loss']:.4f}"}
        if s.get("val_acc") is not None:
            out["val_acc"] = f"{s['val_acc']:.4f}"
        evaluation = s.get("eval_seconds")
        out["s/round"] = f"{s['seconds'] + (evaluation or 0.0):.2f}"
        if evaluation is not None:
            out["eval"] = f"{evaluation:.2f}"
        return out


class _NoValidationBatchesInFit:
    """Progress-bar hooks shared by both round bars: validation during ``fit`` adds no
    per-batch updates (no nested bar); ``validate`` / ``test`` keep the base bar's."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx,  # noqa: D102
                                  dataloader_idx: int = 0) -> None:
        if trainer.state.fn != "fit":
            super().on_validation_batch_start(trainer, pl_module, batch, batch_idx,
                                              dataloader_idx)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,  # noqa: D102
                                dataloader_idx: int = 0) -> None:
        if trainer.state.fn != "fit":
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx,
                                            dataloader_idx)


class RoundProgressBar(_NoValidationBatchesInFit, TQDMProgressBar):
    """A tqdm bar that counts rounds, or one log line per round when not on a terminal.

    The bar reads ``round r/R`` with the round's ``clients`` trained, ``skipped`` (non-finite)
    and ``straggling``, its mean train loss, the last validation accuracy and seconds per round
    (tqdm adds the ETA). Validation draws no bar of its own. Without a terminal on stderr (or with
    ``lines=True``) it prints :func:`format_round_line` after every round instead.

    Args:
        refresh_rate: redraw the bar every n rounds.
        lines: ``True`` always prints lines, ``False`` always draws the bar, ``None`` (default)
            decides by whether stderr is a terminal.

    Example:
        >>> RoundProgressBar(lines=True).lines
        True
    """

    def __init__(self, refresh_rate: int = 1, lines: bool | None = None) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._lines = lines
        self._round = _RoundStats()

    @property
    def lines(self) -> bool:
        """Whether this bar prints one line per round instead of drawing a bar."""
        if self._lines is not None:
            return self._lines
        return not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())

    # ---------------------------------------------------------------- training bar
    def init_train_tqdm(self) -> Tqdm:  # noqa: D102
        return Tqdm(
            desc="round", position=2 * self.process_position, unit="round",
            disable=self.is_disabled or self.lines, leave=True, dynamic_ncols=True,
            file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:  # noqa: D102
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.train_progress_bar.reset(total)
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.set_description(self._description(trainer.global_step, total))

    @staticmethod
    def _description(done: int, total: int | None) -> str:
        return f"round {done}/{total if total else '?'}"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        self._print_line(trainer)  # the previous round's, after its validation
        self._round.begin()

    def on_round_end(self, trainer: pl.Trainer, module: Any, result: Any) -> None:
        """Round hook (:mod:`fl_lightning.hooks`): record the round's numbers."""
        self._round.round_end(trainer, result)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        stats = self._round.stats
        if not stats:
            return
        if self.lines:
            return  # the line is printed after the round's validation (below)
        bar = self.train_progress_bar
        bar.n = trainer.global_step
        bar.set_description(self._description(trainer.global_step, stats["total"]), False)
        if self._should_update(trainer.global_step, bar.total or 0):
            bar.set_postfix(self._round.postfix(), refresh=False)
            bar.refresh()

    def _print_line(self, trainer: pl.Trainer) -> None:
        stats = self._round.stats
        if self.lines and stats and trainer.is_global_zero and not stats.get("_printed"):
            print(format_round_line(stats), file=sys.stderr, flush=True)
            stats["_printed"] = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        self._round.validation_end(trainer)
        if trainer.state.fn == "fit":
            if not self.lines and self._round.stats:
                self.train_progress_bar.set_postfix(self._round.postfix())
            return
        super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: D102
        self._print_line(trainer)
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self._round.postfix())

    # ---------------------------------------------------------------- no nested validation bar
    def on_validation_start(self, trainer, pl_module) -> None:  # noqa: D102
        self._round.eval_begin(trainer)
        if trainer.state.fn != "fit":
            super().on_validation_start(trainer, pl_module)

    def on_sanity_check_start(self, *args: Any) -> None:  # noqa: D102
        return None

    def on_sanity_check_end(self, *args: Any) -> None:  # noqa: D102
        return None

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:  # noqa: D102
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class RichRoundProgressBar(_NoValidationBatchesInFit, RichProgressBar):
    """The rich variant of :class:`RoundProgressBar` (needs ``pip install fl-lightning[rich]``).

    Shows ``round r/R`` and the same round numbers as metrics; validation adds no bar.

    Raises:
        ModuleNotFoundError: without ``rich`` (the CLI turns it into one line, exit 2).
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = True) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self._round = _RoundStats()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        self._round.begin()

    def on_round_end(self, trainer: pl.Trainer, module: Any, result: Any) -> None:
        """Round hook: record the round's numbers."""
        self._round.round_end(trainer, result)

    def on_validation_start(self, trainer, pl_module) -> None:  # noqa: D102
        self._round.eval_begin(trainer)
        super().on_validation_start(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:  # noqa: D102
        self._round.validation_end(trainer)
        super().on_validation_end(trainer, pl_module)

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else "?"
        return f"round {trainer.global_step}/{total}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: D102
        super().on_train_epoch_start(trainer, pl_module)
        if self.train_progress_bar_id is not None and self.progress is not None:
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            self.progress.update(self.train_progress_bar_id, total=total,
                                 completed=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.train_progress_bar_id is not None and self.progress is not None:
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step,
                                 description=self._get_train_description(0))

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:  # noqa: D102
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        extra = {k: str(v) for k, v in self._round.postfix().items() if k != "loss"}
        items.update(extra)
        return items
