"""``RoundCSVLogger``: a ``CSVLogger`` with one row per communication round.

Lightning writes one CSV row per ``log_metrics`` call: a round's training metrics, its
evaluation (``val_acc``/``val_loss``) and anything logged straight to the logger at the same step
land on separate rows, with an ``epoch`` column that is always 0 in a federated run (the whole
run is one epoch). This logger merges every call made at the same step into that step's row and
drops ``epoch``: ``metrics.csv`` has exactly one row per round, keyed by ``step`` (= round - 1)
and ``round``.
"""

from __future__ import annotations

import csv
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

__all__ = ["RoundCSVLogger"]


class _RoundWriter(ExperimentWriter):
    """Merges the metrics logged at one step into one row."""

    #: the step of the newest row written by :meth:`save_all` (later calls may still extend it)
    _written_step: int | None = None

    def log_metrics(self, metrics_dict: dict[str, Any], step: int | None = None) -> None:
        if not self.metrics and step is not None and step == self._written_step:
            self._unwrite_newest_row()
        self._written_step = None
        super().log_metrics(metrics_dict, step)
        if len(self.metrics) > 1 and self.metrics[-2].get("step") == self.metrics[-1]["step"]:
            row = self.metrics.pop()
            self.metrics[-1].update(row)

    def save_finished_rows(self) -> None:
        """Write every row but the newest (which later calls at its step may still extend)."""
        if len(self.metrics) < 2:
            return
        newest = self.metrics.pop()
        self.save()
        self.metrics = [newest]

    def save_all(self) -> None:
        """Write every row, the newest included (a checkpoint was written: a run killed before
        the next round must leave the checkpointed rounds' rows on disk)."""
        if self.metrics:
            self._written_step = self.metrics[-1]["step"]
        self.save()

    def _unwrite_newest_row(self) -> None:
        """Take the newest written row back from the file, to extend it (rare: a call at the
        step of the newest row after :meth:`save_all`)."""
        with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            return
        newest = {k: v for k, v in rows.pop().items() if v != ""}
        newest["step"] = int(newest["step"])
        with self._fs.open(self.metrics_file_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics = [newest]


class RoundCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<save_dir>/<name>/version_N/metrics.csv`` with one row per round.

    Metrics logged at the same step (the round's ``train_loss``, its ``val_acc``, the analysis
    callbacks' quantities) share one row; ``epoch`` (always 0 here) is left out. A round's row is
    written to disk when the next round logs, when a checkpoint is written (so a run killed
    after a checkpoint keeps the rows of every round the checkpoint holds) and at the end of the
    run, so ``metrics.csv`` can be followed while training.

    Args:
        save_dir: parent folder of the run folders (relative paths are taken under
            ``--trainer.default_root_dir`` by the CLI).
        name: experiment name (the folder under ``save_dir``).
        version: ``version_N`` number or a folder name; the next free number when None.
        prefix: a string put before every metric key.
        flush_logs_every_n_steps: write finished rows once this many are pending.

    Example:
        >>> import tempfile
        >>> logger = RoundCSVLogger(tempfile.mkdtemp(), name="fl")
        >>> logger.log_metrics({"train_loss": 1.0, "epoch": 0}, step=0)
        >>> logger.log_metrics({"val_acc": 0.5}, step=0)
        >>> logger.experiment.metrics
        [{'train_loss': 1.0, 'step': 0, 'val_acc': 0.5}]
    """

    def __init__(
        self,
        save_dir: str = "lightning_logs",
        name: str | None = "fl",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 1,
    ) -> None:
        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
        self._write_step: int | None = None  # the step of the newest checkpoint's round

    @property
    @rank_zero_experiment
    def experiment(self) -> _RoundWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _RoundWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        if not metrics:
            return
        writer = self.experiment
        if step is None:
            step = len(writer.metrics)
        new_step = not writer.metrics or writer.metrics[-1].get("step") != step
        if new_step and len(writer.metrics) >= self._flush_logs_every_n_steps:
            writer.save()  # every pending row belongs to an earlier step: all are finished
        prefixed = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}" if self._prefix else k: v
                    for k, v in metrics.items()}
        writer.log_metrics(prefixed, step)
        if step == self._write_step:  # the round of the checkpoint just written
            writer.save_all()

    @rank_zero_only
    def save(self) -> None:
        """Write the finished rows (Lightning calls this after every logging call)."""
        if self._experiment is not None:
            self._experiment.save_finished_rows()

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """A periodic checkpoint was written: write every row now, the newest included, and the
        checkpointed round's row as soon as it is logged (a round without evaluation is saved
        before Lightning logs its row), so that ``metrics.csv`` holds every round (and
        evaluation) that the checkpoint holds, even if the process is killed next."""
        rounds = getattr(checkpoint_callback, "_last_global_step_saved", None)
        self._write_step = rounds - 1 if isinstance(rounds, int) else None
        if self._experiment is not None:
            self._experiment.save_all()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is None:
            return
        self._experiment.save()
