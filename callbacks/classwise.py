"""``ClassWiseAccuracy``: per-class test accuracy of the global model over rounds."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from fl_lightning.callbacks.base import (
    RoundCallback,
    buffers_of,
    eval_batches,
)
from fl_lightning.callbacks.functional import class_accuracy
from fl_lightning.hooks import RoundResult

__all__ = ["ClassWiseAccuracy"]


class ClassWiseAccuracy(RoundCallback):
    """Accuracy of the global model on each class of the test split, with a heatmap.

    ``acc_c = #{i : y_i = c, argmax f(w; x_i) = c} / #{i : y_i = c}`` at the global weights
    after every ``every_n_rounds``-th round. Logs ``classwise/acc_<c>``, ``classwise/min``
    (the worst class), ``classwise/std`` (spread over classes) and ``classwise/acc`` (overall).
    At the end of training it draws ``<log_dir>/analysis/classwise.png``: rounds x classes.
    Under label skew the global model forgets the classes of the last clients it saw; this
    shows which ones.

    Cost: one pass over ``max_samples`` test samples (all when None) per measurement.

    Args:
        every_n_rounds: measure after every n-th round.
        max_samples: evaluate on the first ``max_samples`` test samples only.
        batch_size: evaluation batch size.

    Example:
        >>> ClassWiseAccuracy(every_n_rounds=5).every_n_rounds
        5
    """

    prefix = "classwise"
    replica_aware = True

    def __init__(
        self, every_n_rounds: int = 1, max_samples: int | None = None, batch_size: int = 1000
    ) -> None:
        super().__init__(every_n_rounds)
        self.max_samples = (
            None if max_samples is None else self.check_int(max_samples, "max_samples")
        )
        self.batch_size = self.check_int(batch_size, "batch_size")

    @override
    def replica_metrics(self) -> list[str]:
        return ["acc", "min", "std"]

    def measure(self, module: Any, params: dict[str, torch.Tensor]) -> dict[str, float]:
        batches = eval_batches(module, self.max_samples, self.batch_size)
        correct, count, _ = class_accuracy(
            module.net, params, buffers_of(module), batches, module.num_classes
        )
        acc = correct / count.clamp_min(1.0)
        present = count > 0
        out = {f"acc_{c}": float(acc[c]) for c in range(len(acc)) if bool(present[c])}
        out["min"] = float(acc[present].min())
        out["std"] = float(acc[present].std(unbiased=False))
        out["acc"] = float(correct.sum() / count.sum())
        return out

    @override
    def on_round_end(self, trainer: pl.Trainer, module: Any, result: RoundResult) -> None:
        self.measure_global(trainer, module, result)

    def plot(self, trainer: Any) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        classes = sorted(
            {int(k[4:]) for r in self.history for k in r if k.startswith("acc_")}
        )
        rounds = [int(r["round"]) for r in self.history]
        mat = torch.tensor([[r.get(f"acc_{c}", float("nan")) for c in classes]
                            for r in self.history])
        fig, ax = plt.subplots(figsize=(max(3.5, 0.35 * len(classes) + 2), 3.4))
        im = ax.imshow(mat.T.numpy(), aspect="auto", cmap="magma", vmin=0.0, vmax=1.0,
                       origin="lower", interpolation="nearest",
                       extent=(rounds[0] - 0.5, rounds[-1] + 0.5, -0.5, len(classes) - 0.5))
        ax.set_yticks(range(len(classes)), [str(c) for c in classes])
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("class")
        ax.set_title("class-wise test accuracy of the global model")
        fig.colorbar(im, ax=ax, label="accuracy")
        self.save_figure(trainer, fig, "classwise")
