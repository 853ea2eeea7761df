"""Stopping at a round boundary: SIGTERM, Ctrl-C and DDP's agreed stop, each with a checkpoint.

:class:`StopAtRoundBoundary` is mixed into :class:`fl_lightning.module.FederatedModule`: at the
end of every round it asks whether the run was told to stop (a SIGTERM, a first Ctrl-C; under
DDP the ranks agree, :func:`fl_lightning.ddpfault.agreed_stop`) and then writes
``preempted-round=<r>.ckpt`` and raises :class:`Preempted`, which the CLI turns into one line
and exit code. When the round's evaluation is scheduled, the stop waits for the end of that
evaluation, so that no evaluation is lost (``docs/reliability.md``).
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException

from fl_lightning.checkpoint import evaluation_follows
from fl_lightning.ddpfault import agreed_stop
from fl_lightning.interrupt import interrupt_requested

__all__ = ["Preempted", "StopAtRoundBoundary"]


class Preempted(SIGTERMException):
    """The run received SIGTERM (or Ctrl-C: ``signal="SIGINT"``); a checkpoint at the last
    round boundary was written. ``ranks``: under DDP, the ranks that received it when not all
    did."""

    def __init__(self, path: str, rounds: int, signal: str = "SIGTERM",
                 ranks: tuple[int, ...] = ()) -> None:
        super().__init__(path, rounds)
        self.path = path
        self.rounds = rounds
        self.signal = signal
        self.ranks = ranks


class StopAtRoundBoundary:
    """The LightningModule hooks that stop a run at a round boundary with a checkpoint (a
    mixin: the module provides ``trainer``, ``global_step`` and ``_record_evaluation``)."""

    _stop_after_evaluation: tuple[str, tuple[int, ...]] | None = None

    def on_validation_end(self) -> None:
        trainer = self._trainer
        if trainer is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._record_evaluation()
        # a stop asked for during the round (deferred to here) or during its evaluation
        stop = self._stop_signal(self._stop_after_evaluation)
        if stop is not None:
            raise Preempted(self._save_preemption_checkpoint(), self.global_step, *stop)

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        # Lightning's evaluation loop stops at once (no checkpoint) on a SIGTERM received
        # during an evaluation: let the evaluation finish and stop after it instead
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self._defer_sigterm()

    def _defer_sigterm(self) -> None:
        """Take over a received SIGTERM: stop after the evaluation in flight (with its
        checkpoint) rather than in the middle of it, as Lightning's loops would."""
        connector = self.trainer._signal_connector
        if connector.received_sigterm:
            connector.received_sigterm = False
            self._stop_after_evaluation = self._stop_after_evaluation or ("SIGTERM", ())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning only notices SIGTERM at the end of an epoch (= the whole run here): stop at
        # the round boundary instead, with a checkpoint to resume from; when the round's
        # evaluation is scheduled, after it (on_validation_end), so that no evaluation is lost.
        stop = self._stop_signal()
        if stop is None:
            return
        if evaluation_follows(self.trainer):
            self._defer_sigterm()
            self._stop_after_evaluation = stop
            return
        # the round's metrics row, which Lightning would log right after this hook
        self.trainer._logger_connector.update_train_step_metrics()
        raise Preempted(self._save_preemption_checkpoint(), self.global_step, *stop)

    def _stop_signal(
        self, pending: tuple[str, tuple[int, ...]] | None = None
    ) -> tuple[str, tuple[int, ...]] | None:
        """``(signal, ranks)`` when the run was asked to stop (``pending``: a stop already
        agreed on and taken over), else None. A first Ctrl-C (fl_lightning.interrupt) acts as
        SIGTERM; under DDP the ranks agree on the decision (one small all-reduce,
        :func:`fl_lightning.ddpfault.agreed_stop`, on every rank at the same hooks), so every
        rank stops after the same round, whichever rank received the signal."""
        sigint = interrupt_requested() or (pending is not None and pending[0] == "SIGINT")
        sigterm = self.trainer.received_sigterm or (
            pending is not None and pending[0] == "SIGTERM")
        stop = agreed_stop(self.trainer, sigterm, sigint)
        return pending if pending is not None and stop is not None else stop

    def _save_preemption_checkpoint(self) -> str:
        trainer = self.trainer
        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None) or os.path.join(
            trainer.log_dir or trainer.default_root_dir, "checkpoints"
        )
        path = os.path.join(folder, f"preempted-round={self.global_step}.ckpt")
        trainer.save_checkpoint(path)
        return path
