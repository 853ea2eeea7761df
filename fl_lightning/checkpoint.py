"""``RoundCheckpoint``: checkpoints every n rounds and at the end of a run, newest k kept.

A round's checkpoint holds the round with its scheduled evaluation done: when the global model
is evaluated after the round (``--trainer.val_check_interval``), the file is written at the end
of that evaluation, not before it, so a resume never skips a scheduled evaluation
(:func:`evaluation_follows`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["RoundCheckpoint", "evaluation_follows"]


def evaluation_follows(trainer: pl.Trainer) -> bool:
    """Whether Lightning evaluates the global model right after the round that has just ended.

    Called from ``on_train_batch_end``: the training loop takes the same decision right after
    that hook, from the same counters (``val_check_interval``, the last round, an early stop).
    """
    loop = trainer.fit_loop
    return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


class RoundCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` keyed on rounds: every ``every_n_rounds`` rounds and at the end of
    the run (whatever the round count), keeping the ``keep_last`` newest files
    ``round=<r>.ckpt``. A round whose evaluation is scheduled is saved at the end of that
    evaluation (``on_validation_end``), so the checkpoint holds the round with its evaluation
    logged, and a resume from it does not evaluate it again. Files are written through
    Lightning's checkpoint IO, which serializes to memory first and then moves a temporary file
    into place, so a kill never leaves a half-written checkpoint.

    Args:
        every_n_rounds: rounds between two checkpoints.
        keep_last: how many of the newest checkpoints to keep.
        dirpath: folder (default: the logger's ``<log_dir>/checkpoints``).
        kwargs: any other ``ModelCheckpoint`` argument.

    Example:
        >>> cb = RoundCheckpoint(every_n_rounds=5, keep_last=2)
        >>> cb.save_top_k
        2
    """

    def __init__(
        self,
        every_n_rounds: int = 10,
        keep_last: int = 3,
        dirpath: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("filename", "round={round:.0f}")
        kwargs.setdefault("auto_insert_metric_name", False)
        super().__init__(
            dirpath=dirpath,
            monitor="round",
            mode="max",
            save_top_k=keep_last,
            every_n_train_steps=every_n_rounds,
            **kwargs,
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self._every_n_train_steps
        due = every >= 1 and trainer.global_step % every == 0
        if due and evaluation_follows(trainer):
            self._defer_save_until_validation = True  # written by on_validation_end
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._defer_save_until_validation and not self._should_skip_saving_checkpoint(trainer):
            self._defer_save_until_validation = False
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
            return
        super().on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            if "round" in candidates:
                self._save_topk_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
