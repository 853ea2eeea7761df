"""``HessianEigenvalues``: the top of the loss Hessian spectrum of the global model."""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from fl_lightning.callbacks.base import (
    Criterion,
    RoundCallback,
    buffers_of,
    fixed_batches,
)
from fl_lightning.callbacks.functional import hessian_eigenvalues
from fl_lightning.hooks import RoundResult

__all__ = ["HessianEigenvalues", "condition_ratio"]

#: ``lambda_k`` at or below this share of ``|lambda_1|`` is Lanczos noise, not a curvature
RATIO_TOLERANCE = 1e-4


def condition_ratio(lambda_1: float, lambda_k: float) -> float:
    """``lambda_1 / lambda_k``, or NaN (a gap in the plot) when it has no meaning.

    The ratio describes the conditioning of a positive curvature; with ``lambda_k <= 1e-4 *
    |lambda_1|`` (about 0, or negative) it is a division by rounding noise (e.g. -19,548) and is
    reported as NaN, with a warning.

    Example:
        >>> condition_ratio(10.0, 2.0)
        5.0
        >>> condition_ratio(10.0, -5e-4)
        nan
    """
    if not (math.isfinite(lambda_1) and math.isfinite(lambda_k)) or (
        lambda_k <= RATIO_TOLERANCE * abs(lambda_1)
    ):
        rank_zero_warn(
            f"hessian: lambda_k={lambda_k:.3g} is about 0 or negative (lambda_1={lambda_1:.3g}): "
            "lambda_1/lambda_k is not meaningful and is logged as NaN (a gap in the plot)"
        )
        return math.nan
    return lambda_1 / lambda_k


class HessianEigenvalues(RoundCallback):
    """Top-``k`` eigenvalues of the global model's loss Hessian, every ``every_n_rounds`` rounds.

    At the global weights ``w`` after the round, with a fixed set of batches ``B`` drawn once
    (same batches every time, a pure function of ``seed``)::

        L(w) = sum_b (|b| / |B|) CE(f(w; x_b), y_b)        (the mean loss over B)
        lambda_1 >= ... >= lambda_k    the largest eigenvalues of  H = grad^2 L(w)

    computed by Lanczos with full reorthogonalization (``num_iter`` steps) on Hessian-vector
    products ``H v = jvp(grad L)(w; v)`` (``torch.func``), on the module's device. Logs
    ``hessian/lambda_1 .. lambda_k``, ``hessian/ratio_1_k`` = ``lambda_1 / lambda_k`` (NaN
    when ``lambda_k`` is about 0 or negative, see :func:`condition_ratio`; the FedSoL paper's
    ``lambda_1 / lambda_5`` with the default ``k=5``) and ``hessian/trace_k`` (their sum).
    A sharp (large ``lambda_1``) and ill-conditioned (large ratio) global model is what the
    paper links to client drift.

    Cost: ``num_iter`` Hessian-vector products on ``num_batches * batch_size`` samples (each about
    2-3 forward+backward passes) and ``num_iter`` vectors of the model's size in memory. For
    the MNIST CNN (1.66M parameters) with 2 batches of 500 and 20 steps: see docs/analysis.md.

    Args:
        every_n_rounds: measure after every n-th round.
        k: number of eigenvalues.
        num_iter: Lanczos steps (at least ``k``; more steps, more accurate ``lambda_k``).
        num_batches: number of batches in the fixed set.
        batch_size: samples per batch.
        split: draw the batches from the ``train`` (union of all clients: the global
            objective) or the ``test`` split.
        seed: seed of the batch draw and of the Lanczos start vector.
        criterion: loss ``criterion(logits, y)`` (default: mean cross-entropy).

    Attributes:
        history: one row per measurement: ``round``, ``lambda_1..k``, ``ratio_1_k``,
            ``trace_k``, ``seconds``.
        eigenvectors: the last measurement's eigenvectors (``[num_params, k]``), reused by
            :class:`~callbacks.LossLandscape` when it draws at the same round on the same
            batches (add it after this callback).
        last_round: the round (from 1) of the last measurement.

    Raises:
        ConfigError: for ``k``, ``num_iter``, ``num_batches``
            or ``batch_size`` below 1, or ``num_iter < k``.

    Example:
        >>> cb = HessianEigenvalues(every_n_rounds=10, k=5, num_batches=2, batch_size=500)
        >>> cb.k
        5
    """

    prefix = "hessian"

    def __init__(
        self,
        every_n_rounds: int = 10,
        k: int = 5,
        num_iter: int = 20,
        num_batches: int = 2,
        batch_size: int = 500,
        split: Literal["train", "test"] = "train",
        seed: int = 0,
        criterion: Criterion | None = None,
    ) -> None:
        super().__init__(every_n_rounds, criterion)
        self.k = self.check_int(k, "k")
        self.num_iter = self.check_int(num_iter, "num_iter")
        if self.num_iter < self.k:
            self.fail(
                f"{self.option('num_iter')}={num_iter} is invalid: it must be >= k={k} "
                f"(e.g. {2 * k + 10})"
            )
        self.num_batches = self.check_int(num_batches, "num_batches")
        self.batch_size = self.check_int(batch_size, "batch_size")
        self.split = self.check_choice(split, "split", ("train", "test"))
        self.seed = int(seed)
        self.eigenvectors: torch.Tensor | None = None
        self.last_round: int | None = None

    def measure(self, module: Any, params: dict[str, torch.Tensor]) -> dict[str, float]:
        """Eigenvalues of the Hessian at ``params`` (a dict like ``module.net``'s parameters)."""
        batches = fixed_batches(module, self.split, self.num_batches, self.batch_size, self.seed)
        start = time.perf_counter()
        evals, evecs = hessian_eigenvalues(
            module.net, params, buffers_of(module), batches, k=self.k, num_iter=self.num_iter,
            criterion=self.criterion, seed=self.seed,
        )
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.eigenvectors = evecs.detach()
        vals = [float(v) for v in evals]
        out = {f"lambda_{i + 1}": v for i, v in enumerate(vals)}
        out[f"ratio_1_{len(vals)}"] = condition_ratio(vals[0], vals[-1])
        out["trace_k"] = sum(vals)
        out["seconds"] = seconds
        return out

    @override
    def on_round_end(self, trainer: pl.Trainer, module: Any, result: RoundResult) -> None:
        if not self.is_due(result.round):
            return
        with torch.enable_grad():
            metrics = self.measure(module, result.global_after)
        self.last_round = result.round + 1
        self.log_round(trainer, result.round + 1, metrics)

    def plot(self, trainer: Any) -> None:
        self.plot_series(
            trainer, ["lambda_1", f"ratio_1_{self.k}"], "hessian",
            "Hessian spectrum of the global model", logy=False,
        )
