"""``HeterogeneityReport``: write the partition's heterogeneity report when a fit starts."""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from fl_lightning.data.heterogeneity import datamodule_report, describe, write_report

__all__ = ["HeterogeneityReport"]


class HeterogeneityReport(Callback):
    """Write ``<dirpath>/<filename>.json`` and ``.png`` describing how the data is split.

    The report (see :func:`fl_lightning.data.heterogeneity.heterogeneity_report`) holds every
    client's class counts and size, the number of classes per client, and each client's total
    variation distance and Jensen-Shannon divergence to the global label distribution; the PNG
    is a client x class heatmap. It is written once, at the start of ``fit``, by rank 0.

    Args:
        dirpath: output folder; default the trainer's ``log_dir`` (else the working directory).
        filename: file name without extension.

    Attributes:
        report: the last report written (a dict), or ``None``.
        paths: the JSON and PNG paths written, or ``None``.

    Example:
        >>> cb = HeterogeneityReport(dirpath="reports")
        >>> cb.filename
        'heterogeneity'

        On the command line: ``--trainer.callbacks+=HeterogeneityReport``.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "heterogeneity") -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.report: dict | None = None
        self.paths: tuple[str, str] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # trainer.log_dir is a broadcast under DDP: every rank must ask, only rank zero writes
        folder = self.dirpath or trainer.log_dir or os.getcwd()
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "client_indices"):
            return
        self.report = datamodule_report(dm)
        self.paths = write_report(self.report, os.path.join(folder, self.filename), describe(dm))
