"""``GlobalOscillation``: does the global model converge, or wander in a region?"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from fl_lightning.callbacks.base import RoundCallback
from fl_lightning.callbacks.functional import flatten, oscillation_stats
from fl_lightning.hooks import RoundResult

__all__ = ["GlobalOscillation"]


class GlobalOscillation(RoundCallback):
    """Step sizes and geometry of the global trajectory, and the spread of late evaluations.

    Every round (``w_t`` the global weights after round ``t``)::

        step_norm     = ||w_{t+1} - w_t||_2

    and every ``every_n_rounds`` rounds, over the last ``window`` rounds ``w_{T-W+1}..w_T``::

        radius        = sqrt(mean_t ||w_t - w_bar||^2),  w_bar the window mean
        straightness  = ||w_T - w_{T-W+1}|| / sum_t ||w_{t+1} - w_t||   (net displacement /
                        path length: near 1 while the model travels, near 0 when it oscillates)

    (also ``path_length`` and ``displacement``). A converging model has ``step_norm`` and
    ``radius`` tending to 0; under heterogeneous clients and partial participation FedAvg keeps
    a positive stationary radius around its fixed point ("Why Federated Optimization Fails to
    Achieve Perfect Fitting"). After every validation it also records ``val_acc`` and
    ``val_loss`` and logs their spread over the last ``tail`` share of evaluations:
    ``acc_std``, ``acc_range`` (max - min), ``loss_std``, ``loss_range``.

    Cost: ``window`` copies of the weights in host memory (float32: 6.7 MB each for the
    MNIST CNN), no forward pass.

    Args:
        every_n_rounds: compute the window statistics every n rounds (the window itself and the
            step norm are updated every round).
        window: number of recent global models kept (``W``).
        tail: share of the evaluations the spread is computed over (the last 20% by default).

    Attributes:
        center: the last window mean ``w_bar`` (flat, float64), for tests and notebooks.
        evaluations: ``(round, val_acc, val_loss)`` of every validation seen.

    Example:
        >>> GlobalOscillation(window=20).window
        20
    """

    prefix = "oscillation"

    def __init__(self, every_n_rounds: int = 1, window: int = 10, tail: float = 0.2) -> None:
        super().__init__(every_n_rounds)
        self.window = self.check_int(window, "window", 2)
        self.tail = self.check_positive(tail, "tail")
        if self.tail > 1:
            self.fail(f"{self.option('tail')}={tail!r} is invalid: it is a share in (0, 1]")
        self._weights: deque[torch.Tensor] = deque(maxlen=self.window)
        self.center: torch.Tensor | None = None
        self.evaluations: list[tuple[float, float, float]] = []

    @override
    def on_round_end(self, trainer: pl.Trainer, module: Any, result: RoundResult) -> None:
        after = flatten(result.global_after).detach()
        step = float(torch.linalg.vector_norm((after - flatten(result.global_before)).double()))
        if not self._weights:
            self._weights.append(flatten(result.global_before).detach().float().cpu())
        self._weights.append(after.float().cpu() if after.dtype != torch.float64
                             else after.cpu())
        metrics = {"step_norm": step}
        if self.is_due(result.round) and len(self._weights) >= 2:
            w = torch.stack(list(self._weights))
            metrics.update(oscillation_stats(w))
            self.center = w.double().mean(0)
        self.log_round(trainer, result.round + 1, metrics)

    def spread(self) -> dict[str, float]:
        """Spread of ``val_acc`` / ``val_loss`` over the last ``tail`` share of evaluations."""
        if len(self.evaluations) < 2:
            return {}
        n = max(2, math.ceil(self.tail * len(self.evaluations)))
        t = torch.tensor(self.evaluations[-n:], dtype=torch.float64)
        acc, loss = t[:, 1], t[:, 2]
        return {
            "acc_std": float(acc.std(unbiased=False)),
            "acc_range": float(acc.max() - acc.min()),
            "loss_std": float(loss.std(unbiased=False)),
            "loss_range": float(loss.max() - loss.min()),
            "tail_evals": float(n),
        }

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        m = trainer.callback_metrics
        if "val_acc" not in m or "val_loss" not in m:
            return
        self.evaluations.append(
            (float(trainer.global_step), float(m["val_acc"]), float(m["val_loss"]))
        )
        spread = self.spread()
        if spread:
            logged = {f"{self.prefix}/{k}": v for k, v in spread.items()}
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=max(trainer.global_step - 1, 0))

    @override
    def summary(self) -> dict[str, Any]:
        return {"evaluations": self.evaluations, "spread": self.spread()}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "weights": list(self._weights),
                "evaluations": list(self.evaluations)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._weights = deque(state_dict.get("weights", []), maxlen=self.window)
        self.evaluations = [tuple(e) for e in state_dict.get("evaluations", [])]

    @override
    def plot(self, trainer: Any) -> None:
        self.plot_series(trainer, ["step_norm", "radius", "straightness"], "oscillation",
                          f"global trajectory (window {self.window} rounds)", logy=False)
