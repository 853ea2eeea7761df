"""A callback that reads every round's result (docs/extending.md)."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import torch

from fl_lightning.hooks import RoundResult


class UpdateNormLog(pl.Callback):
    """Logs the norm of the global update ``||w_after - w_before||`` and the mean norm of the
    clients' updates every round, and writes them to ``<log_dir>/update_norms.json`` at the end.

    Args:
        every_n_rounds: measure after every n-th round (counted from 1).
    """

    def __init__(self, every_n_rounds: int = 1) -> None:
        self.every_n_rounds = int(every_n_rounds)
        self.history: list[dict[str, float]] = []

    def on_round_end(self, trainer: pl.Trainer, module: pl.LightningModule,
                     result: RoundResult) -> None:
        if (result.round + 1) % self.every_n_rounds:
            return
        before, after = result.global_before, result.global_after
        step = torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in before))
        clients = [torch.sqrt(sum(((c.params[k] - before[k]) ** 2).sum() for k in before))
                   for c in result.clients]
        row = {"round": result.round + 1, "global_update": float(step),
               "client_update": float(torch.stack(clients).mean())}
        self.history.append(row)
        module.log("update/global", row["global_update"], on_step=True, batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # every rank asks (a broadcast under DDP)
        if trainer.is_global_zero and log_dir:
            with open(os.path.join(log_dir, "update_norms.json"), "w") as fh:
                json.dump(self.history, fh)
